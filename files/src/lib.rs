//! The one way fedslm writes a file that must be whole or absent: PKI files, model files and checkpoints, the
//! store's derived files, kept scores, image files, caches and reports.
//!
//! The bytes go to `<name>.partial` beside the target (created afresh, mode 0600 for private keys), are
//! flushed and fsynced, the file is renamed over the target, and the folder is fsynced so that the rename
//! itself survives a power cut. A reader sees the old file or the new one, never half of one; a crash leaves
//! at most a `.partial` file, which the next write replaces.

pub mod failpoint;

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// Who may read the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// The process's umask decides (usually readable by all).
    Shared,
    /// Owner only (0600) from the moment the file exists: private keys.
    Private,
}

/// Writes `bytes` to `path` atomically and durably.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomic_with(path, Access::Shared, |w| w.write_all(bytes))
}

/// Writes `path` atomically and durably from `write`, which streams into a buffered writer (a model of tens of
/// megabytes needs no second copy in memory). Missing parent folders are created.
pub fn write_atomic_with(
    path: &Path,
    access: Access,
    write: impl FnOnce(&mut BufWriter<File>) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir)?;
    let tmp = partial_path(path);
    let mut options = OpenOptions::new();
    options.write(true).create(true).truncate(true);
    if access == Access::Private {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut w = BufWriter::with_capacity(1 << 20, options.open(&tmp)?);
    write(&mut w)?;
    let file = w.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)?;
    sync_dir(dir)
}

/// Makes a folder's entries (a rename, a new file) durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The temporary name of a file being written: `<name>.partial` beside it.
pub fn partial_path(path: &Path) -> PathBuf {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".partial");
    PathBuf::from(tmp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_write_replaces_the_file_whole_and_leaves_no_partial_file() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("sub/dir/file.csv");
        write_atomic(&path, b"first").unwrap();
        write_atomic(&path, b"second").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        assert!(!partial_path(&path).exists());
    }

    #[test]
    fn a_failed_write_leaves_the_old_file_as_it_was() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("model.safetensors");
        write_atomic(&path, b"old").unwrap();
        let e = write_atomic_with(&path, Access::Shared, |w| {
            w.write_all(b"half")?;
            Err(std::io::Error::other("disk full"))
        })
        .unwrap_err();
        assert_eq!(e.to_string(), "disk full");
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
    }

    #[test]
    fn a_private_file_is_the_owners_alone() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("center.key");
        write_atomic_with(&path, Access::Private, |w| w.write_all(b"key")).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
