//! One process per log directory: `<dir>/lock`, held with `flock` for as
//! long as the process uses the log — exclusively by a writer, shared by a
//! reader that must not race one (`courier verify`). The kernel drops it
//! when the process dies, so a crash never leaves a stale lock.

use std::fs::{File, OpenOptions, TryLockError};
use std::io;
use std::path::{Path, PathBuf};

use crate::error::LogError;

const LOCK_FILE_NAME: &str = "lock";

/// A held lock on a log directory; released on drop.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
    path: PathBuf,
}

impl DirLock {
    /// The writer's lock: no other process may hold the directory at all.
    /// Creates the directory and its lock file if missing.
    pub fn exclusive(dir: &Path) -> Result<DirLock, LogError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| LogError::io("create the log directory", dir, e))?;
        let path = dir.join(LOCK_FILE_NAME);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| LogError::io("open the lock file", &path, e))?;
        match file.try_lock() {
            Ok(()) => Ok(DirLock { _file: file, path }),
            Err(TryLockError::WouldBlock) => Err(LogError::Locked { path }),
            Err(TryLockError::Error(e)) => Err(LogError::io("lock", &path, e)),
        }
    }

    /// A reader's lock: refused while a writer holds the directory, and
    /// keeps one from starting meanwhile. `None` when the directory has no
    /// lock file (no writer has used it since locks exist): nothing to
    /// share then, and nothing is created.
    pub fn shared(dir: &Path) -> Result<Option<DirLock>, LogError> {
        let path = dir.join(LOCK_FILE_NAME);
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(LogError::io("open the lock file", &path, e)),
        };
        match file.try_lock_shared() {
            Ok(()) => Ok(Some(DirLock { _file: file, path })),
            Err(TryLockError::WouldBlock) => Err(LogError::Locked { path }),
            Err(TryLockError::Error(e)) => Err(LogError::io("lock", &path, e)),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_writer_or_readers_at_a_time() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("log");
        assert!(DirLock::shared(&dir).expect("no lock file").is_none());
        let writer = DirLock::exclusive(&dir).expect("first writer");
        assert!(matches!(
            DirLock::exclusive(&dir),
            Err(LogError::Locked { .. })
        ));
        let refused = DirLock::shared(&dir).expect_err("a writer holds it");
        assert!(refused.to_string().contains("stop it"), "{refused}");
        drop(writer);
        let reader = DirLock::shared(&dir).expect("free").expect("lock file");
        assert!(matches!(
            DirLock::exclusive(&dir),
            Err(LogError::Locked { .. })
        ));
        drop(reader);
        DirLock::exclusive(&dir).expect("free again");
    }
}
