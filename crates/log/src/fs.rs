//! The few file operations the log needs, behind a trait so tests can put
//! [`crate::FaultyFs`] in between and make the disk fail or the machine
//! crash at chosen points.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;

/// How [`FileSystem::open`] opens a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenMode {
    /// Read only; the file must exist.
    Read,
    /// Read, and append at the end; the file must exist.
    Append,
    /// Read and append to a new, empty file, replacing any file of that name.
    Create,
}

/// The file operations of the log. Paths are absolute or relative to the
/// process's working directory, exactly as [`crate::LogConfig::dir`] gives.
pub trait FileSystem: Send + Sync + fmt::Debug {
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Box<dyn LogFile>>;
    /// Atomically replaces `to` with `from` (POSIX `rename`).
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Names (not paths) of the entries of a directory; names that are not
    /// UTF-8 are left out (the log never creates such names).
    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>>;
    /// Makes creations, renames and removals in the directory durable.
    fn sync_dir(&self, path: &Path) -> io::Result<()>;
}

/// An open file. Writes always go to the end (the log only appends);
/// `set_len` only ever shrinks a file to undo a failed or torn write.
pub trait LogFile: Send {
    /// Reads at `offset` without moving any cursor; returns bytes read,
    /// 0 at the end of the file.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes all of `buf` at the end of the file.
    fn append(&mut self, buf: &[u8]) -> io::Result<()>;
    /// `fdatasync`: the file's data, and its size, are durable when it
    /// returns `Ok`.
    fn sync_data(&mut self) -> io::Result<()>;
    fn set_len(&mut self, len: u64) -> io::Result<()>;
    /// Current size in bytes.
    fn size(&self) -> io::Result<u64>;
    /// A second handle on the same open file, so that one thread can
    /// fdatasync it while another appends ([`crate::PendingSync`]).
    /// `Unsupported` makes the log fsync in place instead.
    fn try_clone(&self) -> io::Result<Box<dyn LogFile>> {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }
}

/// Reads exactly `buf.len()` bytes at `offset`.
pub(crate) fn read_exact_at(
    file: &dyn LogFile,
    mut offset: u64,
    mut buf: &mut [u8],
) -> io::Result<()> {
    while !buf.is_empty() {
        match file.read_at(offset, buf) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "file ended before the bytes the log expected there",
                ))
            }
            Ok(n) => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `std::fs`: the file system the log uses outside tests.
#[derive(Clone, Copy, Debug, Default)]
pub struct RealFs;

impl FileSystem for RealFs {
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        std::fs::create_dir_all(path)
    }

    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Box<dyn LogFile>> {
        let file = match mode {
            OpenMode::Read => File::open(path)?,
            OpenMode::Append => OpenOptions::new().read(true).append(true).open(path)?,
            OpenMode::Create => {
                // Remove-then-create-new instead of truncate: std refuses
                // `append` together with `truncate`, and appending mode is
                // what keeps every write at the end after a `set_len`.
                match std::fs::remove_file(path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
                OpenOptions::new()
                    .read(true)
                    .append(true)
                    .create_new(true)
                    .open(path)?
            }
        };
        Ok(Box::new(RealFile(file)))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(path)? {
            if let Ok(name) = entry?.file_name().into_string() {
                names.push(name);
            }
        }
        Ok(names)
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        // On Unix a directory's entries become durable by fsyncing the
        // directory itself; Windows has no such call (NTFS journals them).
        if cfg!(unix) {
            File::open(path)?.sync_all()
        } else {
            Ok(())
        }
    }
}

struct RealFile(File);

impl LogFile for RealFile {
    #[cfg(unix)]
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        std::os::unix::fs::FileExt::read_at(&self.0, buf, offset)
    }

    #[cfg(windows)]
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        std::os::windows::fs::FileExt::seek_read(&self.0, buf, offset)
    }

    #[cfg(not(any(unix, windows)))]
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        use std::io::{Read, Seek, SeekFrom};
        let mut file = &self.0;
        file.seek(SeekFrom::Start(offset))?;
        file.read(buf)
    }

    fn append(&mut self, buf: &[u8]) -> io::Result<()> {
        io::Write::write_all(&mut self.0, buf)
    }

    fn sync_data(&mut self) -> io::Result<()> {
        self.0.sync_data()
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }

    fn try_clone(&self) -> io::Result<Box<dyn LogFile>> {
        Ok(Box::new(RealFile(self.0.try_clone()?)))
    }
}
