//! ONNX external data: tensors whose bytes live in a side file next to the model.
//!
//! A tensor's `external_data` entries give `location` (a path relative to the model's folder), and
//! optionally `offset` and `length` in bytes. Reading is zero-copy: each data file is memory-mapped once
//! and tensors are slices of that map. Locations that are absolute, escape the model folder, name a
//! missing file, or point past its end are rejected with the tensor and location in the message.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context, Result};
use bytes::Bytes;

use crate::onnx::proto::StringStringEntryProto;

/// Memory-maps each external data file once and hands out slices of it.
pub struct ExternalData {
    model_dir: PathBuf,
    files: HashMap<PathBuf, Bytes>,
}

/// Where a tensor's external bytes are, as written in the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalRef {
    pub location: String,
    pub offset: u64,
    pub length: Option<u64>,
}

impl ExternalRef {
    pub fn parse(tensor: &str, entries: &[StringStringEntryProto]) -> Result<ExternalRef> {
        let mut location = None;
        let mut offset = 0u64;
        let mut length = None;
        for e in entries {
            match e.key.as_str() {
                "location" => location = Some(e.value.clone()),
                "offset" => offset = parse_u64(tensor, "offset", &e.value)?,
                "length" => length = Some(parse_u64(tensor, "length", &e.value)?),
                _ => {} // "checksum" and future keys are informational
            }
        }
        let Some(location) = location else {
            bail!("tensor '{tensor}': external data has no 'location'");
        };
        Ok(ExternalRef {
            location,
            offset,
            length,
        })
    }
}

fn parse_u64(tensor: &str, key: &str, value: &str) -> Result<u64> {
    value.trim().parse::<u64>().with_context(|| {
        format!("tensor '{tensor}': external data {key} '{value}' is not a byte count")
    })
}

impl ExternalData {
    /// The data files mapped so far.
    pub fn files(&self) -> Vec<PathBuf> {
        let mut f: Vec<PathBuf> = self.files.keys().cloned().collect();
        f.sort();
        f
    }

    pub fn new(model_dir: &Path) -> ExternalData {
        ExternalData {
            model_dir: model_dir.to_path_buf(),
            files: HashMap::new(),
        }
    }

    /// The bytes of `r` for tensor `tensor` (checked against the file, not against the dtype).
    pub fn slice(&mut self, tensor: &str, r: &ExternalRef) -> Result<Bytes> {
        let path = self.resolve(tensor, &r.location)?;
        let file = self.map(tensor, &r.location, &path)?;
        let file_len = file.len() as u64;
        let length = r.length.unwrap_or(file_len.saturating_sub(r.offset));
        let end = r.offset.checked_add(length);
        match end {
            Some(end) if end <= file_len => Ok(file.slice(r.offset as usize..end as usize)),
            _ => bail!(
                "tensor '{tensor}': external data '{}' offset {} + length {length} is beyond the file's {file_len} bytes",
                r.location,
                r.offset
            ),
        }
    }

    /// Resolve a location relative to the model folder, refusing anything that could leave it.
    fn resolve(&self, tensor: &str, location: &str) -> Result<PathBuf> {
        let rel = Path::new(location);
        let looks_absolute = rel.is_absolute()
            || location.starts_with('/')
            || location.starts_with('\\')
            || location.get(1..2) == Some(":");
        if location.is_empty() || looks_absolute {
            bail!("tensor '{tensor}': external data location '{location}' must be a relative path inside the model folder");
        }
        if rel
            .components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
            || location.split(['/', '\\']).any(|part| part == "..")
        {
            bail!(
                "tensor '{tensor}': external data location '{location}' escapes the model folder"
            );
        }
        let path = self.model_dir.join(rel);
        if !path.is_file() {
            bail!(
                "tensor '{tensor}': external data file '{}' does not exist",
                path.display()
            );
        }
        // A symlink inside the folder may still point outside it.
        let real = path.canonicalize()?;
        let root = self.model_dir.canonicalize()?;
        if !real.starts_with(&root) {
            bail!("tensor '{tensor}': external data location '{location}' resolves outside the model folder");
        }
        Ok(real)
    }

    fn map(&mut self, tensor: &str, location: &str, path: &Path) -> Result<Bytes> {
        if let Some(b) = self.files.get(path) {
            return Ok(b.clone());
        }
        let file = File::open(path).with_context(|| {
            format!("tensor '{tensor}': cannot open external data '{location}'")
        })?;
        let bytes = map_file(&file)
            .with_context(|| format!("tensor '{tensor}': cannot map external data '{location}'"))?;
        self.files.insert(path.to_path_buf(), bytes.clone());
        Ok(bytes)
    }
}

/// Memory-map a whole file as `Bytes` (empty files give empty bytes; mapping them is an error on Linux).
pub fn map_file(file: &File) -> Result<Bytes> {
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(Bytes::new());
    }
    // SAFETY: the map is read-only. ditc never writes its inputs; a file truncated by another process
    // while mapped is outside what any memory-mapping reader can defend against.
    let map = unsafe { memmap2::Mmap::map(file)? };
    Ok(Bytes::from_owner(map))
}

/// Ask the kernel to drop the resident pages behind `bytes` once they have been streamed elsewhere.
///
/// Memory-mapped weights count toward resident memory while their pages stay mapped; copying a 30 GB
/// checkpoint would otherwise grow RSS to 30 GB. `MADV_PAGEOUT` is non-destructive (the content is
/// kept; file pages are simply re-read if touched again), so this is safe on any memory.
pub fn release_pages(bytes: &[u8]) {
    #[cfg(target_os = "linux")]
    {
        const PAGE: usize = 4096;
        let start = (bytes.as_ptr() as usize).div_ceil(PAGE) * PAGE;
        let end = (bytes.as_ptr() as usize + bytes.len()) / PAGE * PAGE;
        if end > start {
            // SAFETY: the range lies inside `bytes`, which is valid for the call; MADV_PAGEOUT does not
            // change the memory's contents. Errors (e.g. old kernels) are ignored: this is only a hint.
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_PAGEOUT);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = bytes;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(k: &str, v: &str) -> StringStringEntryProto {
        StringStringEntryProto {
            key: k.into(),
            value: v.into(),
        }
    }

    #[test]
    fn rejects_hostile_locations() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("w.bin"), [0u8; 16]).unwrap();
        let mut ext = ExternalData::new(dir.path());
        for bad in ["/etc/passwd", "../w.bin", "a/../../w.bin", "C:\\x", ""] {
            let r = ExternalRef::parse("t", &[entry("location", bad)]).unwrap();
            let err = ext.slice("t", &r).unwrap_err().to_string();
            assert!(err.contains("'t'"), "{bad}: {err}");
        }
        let missing = ExternalRef::parse("t", &[entry("location", "nope.bin")]).unwrap();
        assert!(ext
            .slice("t", &missing)
            .unwrap_err()
            .to_string()
            .contains("does not exist"));
        let past_end = ExternalRef::parse(
            "t",
            &[
                entry("location", "w.bin"),
                entry("offset", "8"),
                entry("length", "9"),
            ],
        )
        .unwrap();
        assert!(ext
            .slice("t", &past_end)
            .unwrap_err()
            .to_string()
            .contains("beyond"));
        let huge = ExternalRef::parse(
            "t",
            &[
                entry("location", "w.bin"),
                entry("offset", "18446744073709551615"),
                entry("length", "9"),
            ],
        )
        .unwrap();
        assert!(ext.slice("t", &huge).is_err());
        assert!(ExternalRef::parse("t", &[entry("location", "w"), entry("offset", "-1")]).is_err());
    }

    #[test]
    fn slices_in_bounds() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("w.bin"), (0u8..16).collect::<Vec<_>>()).unwrap();
        let mut ext = ExternalData::new(dir.path());
        let r = ExternalRef::parse(
            "t",
            &[
                entry("location", "./w.bin"),
                entry("offset", "4"),
                entry("length", "3"),
            ],
        )
        .unwrap();
        assert_eq!(&ext.slice("t", &r).unwrap()[..], &[4, 5, 6]);
    }
}
