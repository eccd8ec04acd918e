//! Output files that appear whole or not at all.
//!
//! [`Staging`] creates each file under a temporary name in the destination folder; [`Staging::commit`]
//! renames them all into place. If anything fails before that (or the staging is dropped), the temporary
//! files are removed, and so is the destination folder if this run created it.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

pub struct Staging {
    dir: PathBuf,
    created_dir: bool,
    files: Vec<(PathBuf, PathBuf)>,
    committed: bool,
}

impl Staging {
    /// Fail early, before writing, when `bytes` more would not fit on the output's filesystem.
    pub fn ensure_free_space(&self, bytes: u64) -> Result<()> {
        let Some(free) = free_bytes(&self.dir) else {
            return Ok(()); // unknown (not Linux/Unix, or statvfs failed): let the writes decide
        };
        check_fits(bytes, free, &self.dir)
    }

    /// Stage files for `dir` (created, with parents, if missing).
    pub fn new(dir: &Path) -> Result<Staging> {
        let created_dir = !dir.exists();
        fs::create_dir_all(dir).with_context(|| format!("cannot create '{}'", dir.display()))?;
        Ok(Staging {
            dir: dir.to_path_buf(),
            created_dir,
            files: Vec::new(),
            committed: false,
        })
    }

    /// Create `name` (relative to the folder) under a temporary name.
    pub fn create(&mut self, name: &str) -> Result<File> {
        let final_path = self.dir.join(name);
        let tmp = self
            .dir
            .join(format!(".{name}.ditc-partial-{}", std::process::id()));
        let file =
            File::create(&tmp).with_context(|| format!("cannot create '{}'", tmp.display()))?;
        self.files.push((tmp, final_path));
        Ok(file)
    }

    /// Write a whole small file.
    pub fn write(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        let mut f = self.create(name)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        Ok(())
    }

    /// Move every staged file into place.
    pub fn commit(mut self) -> Result<()> {
        for (tmp, final_path) in &self.files {
            fs::rename(tmp, final_path)
                .with_context(|| format!("cannot move output into '{}'", final_path.display()))?;
        }
        self.committed = true;
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        for (tmp, _) in &self.files {
            let _ = fs::remove_file(tmp);
        }
        if self.created_dir {
            let _ = fs::remove_dir(&self.dir);
        }
    }
}

/// Write one file atomically (temporary name, then rename).
pub fn write_file_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .with_context(|| format!("'{}' is not a file path", path.display()))?
        .to_string_lossy()
        .into_owned();
    let mut staging = Staging::new(dir)?;
    staging.write(&name, bytes)?;
    staging.commit()
}

/// A writer that counts bytes and computes SHA-256 on the way through.
pub struct HashingWriter<W: Write> {
    inner: W,
    hasher: Sha256,
    written: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: Sha256::new(),
            written: 0,
        }
    }

    pub fn position(&self) -> u64 {
        self.written
    }

    /// `(bytes written, hex sha256, inner writer)` after flushing.
    pub fn finish(mut self) -> (u64, String, W) {
        let _ = self.inner.flush();
        (self.written, hex(&self.hasher.finalize()), self.inner)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Bytes available to this user on the filesystem holding `dir`.
fn free_bytes(dir: &Path) -> Option<u64> {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
        // SAFETY: statvfs is plain data; all-zero is a valid value.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: `path` is a valid NUL-terminated string and `st` a writable statvfs.
        if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
            return None;
        }
        Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        None
    }
}

/// An error when `needed` bytes (plus 64 MiB of slack for the graph and manifest) exceed `free`.
fn check_fits(needed: u64, free: u64, dir: &Path) -> Result<()> {
    const SLACK: u64 = 64 << 20;
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    if needed.saturating_add(SLACK) > free {
        anyhow::bail!(
            "not enough disk space in '{}': the output needs {:.2} GiB, {:.2} GiB are free; nothing was written",
            dir.display(),
            gib(needed),
            gib(free)
        );
    }
    Ok(())
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = File::open(path).with_context(|| format!("cannot open '{}'", path.display()))?;
    let mut h = HashingWriter::new(io::sink());
    io::copy(&mut f, &mut h)?;
    Ok(h.finish().1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn space_check_counts_the_slack() {
        let dir = Path::new("/out");
        assert!(check_fits(1 << 30, 2 << 30, dir).is_ok());
        let err = check_fits(1 << 30, (1 << 30) + (1 << 20), dir)
            .unwrap_err()
            .to_string();
        assert!(err.contains("needs 1.00 GiB"), "{err}");
        assert!(
            check_fits(u64::MAX, u64::MAX - 1, dir).is_err(),
            "no overflow"
        );
    }

    #[test]
    fn dropped_staging_leaves_nothing() {
        let root = tempfile::tempdir().unwrap();
        let out = root.path().join("bundle");
        {
            let mut s = Staging::new(&out).unwrap();
            s.write("a.txt", b"x").unwrap();
        }
        assert!(!out.exists());
        let mut s = Staging::new(&out).unwrap();
        s.write("a.txt", b"x").unwrap();
        s.commit().unwrap();
        assert_eq!(fs::read(out.join("a.txt")).unwrap(), b"x");
        assert_eq!(fs::read_dir(&out).unwrap().count(), 1);
    }

    #[test]
    fn sha256_of_abc() {
        let mut h = HashingWriter::new(io::sink());
        h.write_all(b"abc").unwrap();
        assert_eq!(
            h.finish().1,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
