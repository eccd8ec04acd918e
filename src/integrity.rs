//! Checking a bundle against its manifest before it is used.
//!
//! A bundle is a folder: `manifest.json` plus the files it lists (`files`: a path relative to the
//! folder, the size, the SHA-256). [`read_verified`] reads the manifest (JSON, then its schema: see
//! [`crate::manifest::read`]) and checks that every listed file stays inside the folder, exists, has the
//! recorded size and, unless the caller trusts the bundle, the recorded SHA-256. Sizes are checked for
//! every file before any is hashed, so a truncated file is reported at once, not after minutes spent
//! hashing the others. Hashing streams each file in 1 MiB chunks: bundles reach 28 GB.

use std::fs::File;
use std::io::{ErrorKind, Read};
use std::path::{Component, Path};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use crate::manifest::Manifest;
use crate::onnx::WrittenFile;

/// What to check beyond the manifest's schema and the files' sizes, which are always checked (cheap).
#[derive(Debug, Clone, Copy)]
pub struct Checks {
    /// Compare each file's SHA-256 with the manifest's (reads every byte of the bundle).
    pub hashes: bool,
    /// Show a progress bar while hashing a large bundle.
    pub progress: bool,
}

impl Default for Checks {
    fn default() -> Self {
        Checks {
            hashes: true,
            progress: false,
        }
    }
}

/// Bundles at least this large show a progress bar while hashed (smaller ones take under a second).
const PROGRESS_FROM_BYTES: u64 = 256 << 20;
const CHUNK_BYTES: usize = 1 << 20;

/// Read the manifest at `manifest_path` and check the bundle's files against it, as `checks` says.
pub fn read_verified(manifest_path: &Path, checks: &Checks) -> Result<Manifest> {
    let manifest = crate::manifest::read(manifest_path)?;
    let dir = match manifest_path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    verify_files(&manifest, manifest_path, dir, checks)?;
    Ok(manifest)
}

/// Check every file of `manifest` (found in `dir`): inside the folder, present, the recorded size,
/// and with `checks.hashes` the recorded SHA-256.
pub fn verify_files(
    manifest: &Manifest,
    manifest_path: &Path,
    dir: &Path,
    checks: &Checks,
) -> Result<()> {
    for (i, f) in manifest.files.iter().enumerate() {
        check_inside_bundle(&f.path).with_context(|| {
            format!(
                "'{}': files[{i}].path '{}'",
                manifest_path.display(),
                f.path
            )
        })?;
    }
    for f in &manifest.files {
        check_size(dir, f)?;
    }
    if !checks.hashes {
        return Ok(());
    }
    let total: u64 = manifest.files.iter().map(|f| f.bytes).sum();
    let bar = crate::progress::bytes_bar(
        total,
        "verifying the bundle",
        checks.progress && total >= PROGRESS_FROM_BYTES,
    );
    for f in &manifest.files {
        check_hash(dir, f, &bar)?;
    }
    bar.finish_and_clear();
    Ok(())
}

/// A manifest's file path must name a file under the bundle folder: relative, no `..`.
fn check_inside_bundle(path: &str) -> Result<()> {
    if path.is_empty() {
        bail!("is empty");
    }
    for component in Path::new(path).components() {
        match component {
            Component::Normal(_) | Component::CurDir => {}
            Component::ParentDir => bail!("contains '..': it would leave the bundle folder"),
            Component::RootDir | Component::Prefix(_) => {
                bail!("is absolute: bundle files are named relative to the manifest's folder")
            }
        }
    }
    Ok(())
}

fn check_size(dir: &Path, f: &WrittenFile) -> Result<()> {
    let path = dir.join(&f.path);
    let meta = std::fs::symlink_metadata(&path).with_context(|| {
        format!(
            "'{}': missing from the bundle (the manifest lists it)",
            path.display()
        )
    })?;
    if meta.file_type().is_symlink() {
        bail!(
            "'{}': a symbolic link (a bundle's files must be plain files inside its folder)",
            path.display()
        );
    }
    if !meta.is_file() {
        bail!(
            "'{}': not a file (the manifest lists it as a {}-byte file)",
            path.display(),
            f.bytes
        );
    }
    if meta.len() != f.bytes {
        bail!(
            "'{}': size {} bytes, manifest says {} (truncated or replaced?)",
            path.display(),
            meta.len(),
            f.bytes
        );
    }
    Ok(())
}

fn check_hash(dir: &Path, f: &WrittenFile, bar: &indicatif::ProgressBar) -> Result<()> {
    let path = dir.join(&f.path);
    let actual = sha256_streamed(&path, bar).with_context(|| format!("'{}'", path.display()))?;
    if actual != f.sha256 {
        bail!(
            "'{}': SHA-256 {actual} does not match the manifest's {} (damaged or swapped)",
            path.display(),
            f.sha256
        );
    }
    Ok(())
}

/// SHA-256 of a file read in fixed chunks (memory stays at one chunk whatever the file's size).
fn sha256_streamed(path: &Path, bar: &indicatif::ProgressBar) -> Result<String> {
    let mut file = File::open(path).context("cannot open")?;
    let mut hasher = Sha256::new();
    let mut chunk = vec![0u8; CHUNK_BYTES];
    loop {
        let n = match file.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("cannot read"),
        };
        hasher.update(&chunk[..n]);
        bar.inc(n as u64);
    }
    Ok(crate::output::hex(&hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_must_stay_inside_the_bundle() {
        for ok in ["model.onnx", "./model.onnx.data", "weights/part-1.bin"] {
            assert!(check_inside_bundle(ok).is_ok(), "{ok}");
        }
        for (bad, why) in [
            ("../x", "'..'"),
            ("weights/../../x", "'..'"),
            ("/etc/passwd", "absolute"),
            ("", "empty"),
        ] {
            let err = check_inside_bundle(bad).unwrap_err().to_string();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn streamed_hash_matches_sha256_across_chunks() {
        // 2.5 chunks of a known pattern: the chunk boundaries must not change the digest.
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("f");
        let bytes: Vec<u8> = (0..CHUNK_BYTES * 5 / 2).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        let whole = crate::output::hex(&Sha256::digest(&bytes));
        let bar = indicatif::ProgressBar::hidden();
        assert_eq!(sha256_streamed(&path, &bar).unwrap(), whole);
        assert_eq!(bar.position(), bytes.len() as u64);
        // And the known digest of "abc" (FIPS 180-2), through a file.
        std::fs::write(&path, b"abc").unwrap();
        assert_eq!(
            sha256_streamed(&path, &indicatif::ProgressBar::hidden()).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
