//! Tensors in the IR: a name, an element type, dimensions, and bytes that may still be on disk.
//!
//! Raw data is a [`Bytes`] in ONNX's little-endian raw layout. For weights read from a file it is a slice
//! of a memory map, so an initializer costs no memory until something touches its pages.

use anyhow::{bail, Result};
use bytes::Bytes;
use half::{bf16, f16};

use super::DataType;

#[derive(Clone, Debug, PartialEq)]
pub enum TensorData {
    /// Little-endian raw bytes (possibly a slice of a memory-mapped file).
    Raw(Bytes),
    /// `string` tensors: one byte string per element.
    Strings(Vec<Bytes>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub name: String,
    pub dtype: DataType,
    pub dims: Vec<i64>,
    pub data: TensorData,
    pub doc_string: String,
}

/// Number of elements for `dims`, or an error for negative dims or overflow.
pub fn checked_numel(dims: &[i64]) -> Option<u64> {
    dims.iter().try_fold(1u64, |acc, &d| {
        if d < 0 {
            None
        } else {
            acc.checked_mul(d as u64)
        }
    })
}

impl Tensor {
    /// A tensor from raw little-endian bytes, checking that the byte count matches dtype x shape.
    pub fn from_raw(name: &str, dtype: DataType, dims: Vec<i64>, raw: Bytes) -> Result<Tensor> {
        let Some(numel) = checked_numel(&dims) else {
            bail!("tensor '{name}': invalid dims {dims:?} (negative or too large)");
        };
        let Some(expected) = dtype.storage_bytes(numel) else {
            bail!("tensor '{name}': {dtype} cannot be stored as raw bytes");
        };
        if raw.len() as u64 != expected {
            bail!(
                "tensor '{name}': data has {} bytes, but {dtype} {dims:?} needs {expected}",
                raw.len()
            );
        }
        Ok(Tensor {
            name: name.to_string(),
            dtype,
            dims,
            data: TensorData::Raw(raw),
            doc_string: String::new(),
        })
    }

    pub fn from_f32(name: &str, dims: Vec<i64>, values: &[f32]) -> Tensor {
        let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Tensor::from_raw(name, DataType::F32, dims, Bytes::from(raw)).expect("shape matches values")
    }

    pub fn from_i64(name: &str, dims: Vec<i64>, values: &[i64]) -> Tensor {
        let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Tensor::from_raw(name, DataType::I64, dims, Bytes::from(raw)).expect("shape matches values")
    }

    pub fn numel(&self) -> u64 {
        checked_numel(&self.dims).unwrap_or(0)
    }

    /// Bytes of payload (for strings, the sum of their lengths).
    pub fn byte_len(&self) -> u64 {
        match &self.data {
            TensorData::Raw(b) => b.len() as u64,
            TensorData::Strings(s) => s.iter().map(|b| b.len() as u64).sum(),
        }
    }

    pub fn raw(&self) -> Option<&Bytes> {
        match &self.data {
            TensorData::Raw(b) => Some(b),
            TensorData::Strings(_) => None,
        }
    }

    /// Integer contents widened to i64 (for shape arithmetic on small constants).
    pub fn to_i64_vec(&self) -> Option<Vec<i64>> {
        let raw = self.raw()?;
        let v = match self.dtype {
            DataType::I64 => chunks::<8>(raw).map(i64::from_le_bytes).collect(),
            DataType::I32 => chunks::<4>(raw)
                .map(|c| i32::from_le_bytes(c) as i64)
                .collect(),
            DataType::U32 => chunks::<4>(raw)
                .map(|c| u32::from_le_bytes(c) as i64)
                .collect(),
            DataType::I16 => chunks::<2>(raw)
                .map(|c| i16::from_le_bytes(c) as i64)
                .collect(),
            DataType::U16 => chunks::<2>(raw)
                .map(|c| u16::from_le_bytes(c) as i64)
                .collect(),
            DataType::I8 => raw.iter().map(|&b| b as i8 as i64).collect(),
            DataType::U8 | DataType::Bool => raw.iter().map(|&b| b as i64).collect(),
            DataType::U64 => chunks::<8>(raw)
                .map(|c| u64::from_le_bytes(c) as i64)
                .collect(),
            _ => return None,
        };
        Some(v)
    }

    /// Floating-point contents widened to f32 (f32, f16, bf16, f64).
    pub fn to_f32_vec(&self) -> Option<Vec<f32>> {
        let raw = self.raw()?;
        let v = match self.dtype {
            DataType::F32 => chunks::<4>(raw).map(f32::from_le_bytes).collect(),
            DataType::F16 => chunks::<2>(raw)
                .map(|c| f16::from_le_bytes(c).to_f32())
                .collect(),
            DataType::BF16 => chunks::<2>(raw)
                .map(|c| bf16::from_le_bytes(c).to_f32())
                .collect(),
            DataType::F64 => chunks::<8>(raw)
                .map(|c| f64::from_le_bytes(c) as f32)
                .collect(),
            _ => return None,
        };
        Some(v)
    }
}

fn chunks<const N: usize>(raw: &[u8]) -> impl Iterator<Item = [u8; N]> + '_ {
    raw.chunks_exact(N).map(|c| {
        let mut a = [0u8; N];
        a.copy_from_slice(c);
        a
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_length_must_match_shape() {
        let err = Tensor::from_raw("w", DataType::F32, vec![2, 3], Bytes::from(vec![0u8; 20]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("'w'") && err.contains("needs 24"), "{err}");
        assert!(Tensor::from_raw("w", DataType::F32, vec![-1], Bytes::new()).is_err());
    }

    #[test]
    fn widening_reads() {
        let t = Tensor::from_i64("s", vec![2], &[3, -4]);
        assert_eq!(t.to_i64_vec().unwrap(), vec![3, -4]);
        let raw = Bytes::from(half::bf16::from_f32(1.5).to_le_bytes().to_vec());
        let b = Tensor::from_raw("b", DataType::BF16, vec![1], raw).unwrap();
        assert_eq!(b.to_f32_vec().unwrap(), vec![1.5]);
    }
}
