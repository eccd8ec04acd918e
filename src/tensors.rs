//! Named tensors in safetensors files: runtime inputs and outputs, keyed by graph input/output names.
//!
//! Reading is zero-copy (the file is memory-mapped and each tensor is a slice of the map). Writing goes
//! through a temporary file and a rename.

use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::ir::Tensor;
use crate::output::write_file_atomically;

/// All tensors of a safetensors file, in file order (zero-copy slices of the mapped file).
pub fn read_safetensors(path: &Path) -> Result<Vec<Tensor>> {
    let mut tensors = crate::checkpoint::read_shard(path)?;
    // Slices of one map: their addresses give the file order.
    tensors.sort_by_key(|t| t.raw().map(|b| b.as_ptr() as usize).unwrap_or(0));
    Ok(tensors)
}

/// Write tensors (by their names) as a safetensors file, atomically.
pub fn write_safetensors(path: &Path, tensors: &[Tensor]) -> Result<()> {
    let mut owned: Vec<(String, safetensors::tensor::TensorView<'_>)> = Vec::new();
    for t in tensors {
        let Some(dtype) = t.dtype.to_safetensors() else {
            bail!(
                "tensor '{}': {} cannot be stored in safetensors",
                t.name,
                t.dtype
            );
        };
        let shape: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
        let raw = t
            .raw()
            .with_context(|| format!("tensor '{}' has no raw data", t.name))?;
        let view = safetensors::tensor::TensorView::new(dtype, shape, raw)
            .map_err(|e| anyhow::anyhow!("tensor '{}': {e}", t.name))?;
        owned.push((t.name.clone(), view));
    }
    let bytes = safetensors::serialize(owned, None)
        .map_err(|e| anyhow::anyhow!("cannot serialize '{}': {e}", path.display()))?;
    write_file_atomically(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let a = Tensor::from_f32("a", vec![2], &[1.0, -2.0]);
        let b = Tensor::from_i64("b", vec![1], &[7]);
        write_safetensors(&path, &[a.clone(), b.clone()]).unwrap();
        let mut back = read_safetensors(&path).unwrap();
        back.sort_by(|x, y| x.name.cmp(&y.name));
        assert_eq!(back, vec![a, b]);
    }

    #[test]
    fn rejects_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.safetensors");
        std::fs::write(&path, b"\xff\xff\xff\xff\xff\xff\xff\x7f{}").unwrap();
        assert!(read_safetensors(&path).is_err());
    }
}
