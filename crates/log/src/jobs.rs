//! Disk work taken out of the log, so that its owner can run it without
//! holding whatever guards the log (the broker's lock) while appends go on:
//! writing a snapshot ([`Log::begin_snapshot`](crate::Log::begin_snapshot))
//! and deleting old segments
//! ([`Log::detach_segments_before`](crate::Log::detach_segments_before)).
//! Neither touches a file the log still writes or reads.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use crate::error::LogError;
use crate::format::SnapshotParts;
use crate::fs::FileSystem;
use crate::log::{remove_if_present, write_snapshot_durably};
use crate::Seq;

/// A snapshot being saved outside the log. [`SnapshotWrite::write`] puts
/// it in the temporary file and fdatasyncs it; once the log said the
/// records it covers are durable ([`Log::snapshot_ready`](crate::Log::snapshot_ready)),
/// [`SnapshotWrite::install`] renames it over the snapshot and fsyncs the
/// directory. A crash at any point leaves the old snapshot or the new one.
pub struct SnapshotWrite {
    pub(crate) fs: Arc<dyn FileSystem>,
    pub(crate) tmp: PathBuf,
    pub(crate) path: PathBuf,
    pub(crate) dir: PathBuf,
    pub(crate) parts: SnapshotParts,
    pub(crate) covers: Seq,
    /// The log's count of discarded records when it began: if it grew,
    /// seqs the snapshot covers may have been issued again.
    pub(crate) discarded_at_begin: u64,
    pub(crate) written: bool,
}

impl fmt::Debug for SnapshotWrite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SnapshotWrite")
            .field("path", &self.path)
            .field("covers", &self.covers)
            .field("bytes", &self.parts.len())
            .finish()
    }
}

impl SnapshotWrite {
    /// The last record the snapshot covers.
    pub fn covers(&self) -> Seq {
        self.covers
    }

    /// Writes the temporary file and fdatasyncs it: the slow part, needing
    /// no access to the log. Nothing reads the temporary file.
    pub fn write(&mut self) -> Result<(), LogError> {
        let result = write_snapshot_durably(&*self.fs, &self.tmp, &self.parts);
        if result.is_err() {
            let _ = self.fs.remove_file(&self.tmp);
        }
        self.written = result.is_ok();
        result
    }

    /// Renames the written snapshot into place and fsyncs the directory.
    /// Call only after [`Log::snapshot_ready`](crate::Log::snapshot_ready)
    /// returned `Ok` for it: a snapshot must never cover records a crash
    /// could take away.
    pub fn install(self) -> Result<(), LogError> {
        if !self.written {
            return Err(LogError::Bug {
                reason: "a snapshot was installed before it was written".to_string(),
            });
        }
        if let Err(e) = self.fs.rename(&self.tmp, &self.path) {
            let _ = self.fs.remove_file(&self.tmp);
            return Err(LogError::io(
                "rename the snapshot into place at",
                &self.path,
                e,
            ));
        }
        self.fs
            .sync_dir(&self.dir)
            .map_err(|e| LogError::io("fsync the directory", &self.dir, e))
    }
}

/// Sealed segments the log has let go of
/// ([`Log::detach_segments_before`](crate::Log::detach_segments_before)),
/// to delete outside it: oldest first, each segment's `.log` before its
/// `.idx`, then the directory fsynced. What cannot be deleted stays on
/// disk, and the next open finds it again (covered by the snapshot, it is
/// removed by a later checkpoint).
#[derive(Debug, Default)]
pub struct SegmentRemoval {
    pub(crate) fs: Option<Arc<dyn FileSystem>>,
    pub(crate) dir: PathBuf,
    /// Segment file, index file, and their sizes.
    pub(crate) segments: Vec<(PathBuf, PathBuf, u64, u64)>,
}

impl SegmentRemoval {
    /// Segments to delete.
    pub fn len(&self) -> usize {
        self.segments.len()
    }

    pub fn is_empty(&self) -> bool {
        self.segments.is_empty()
    }

    /// Deletes the files and fsyncs the directory; returns the bytes freed.
    pub fn run(self) -> Result<u64, LogError> {
        let Some(fs) = self.fs else {
            return Ok(0);
        };
        let mut freed = 0;
        for (segment, index, bytes, index_bytes) in &self.segments {
            remove_if_present(&*fs, segment)?;
            freed += bytes;
            remove_if_present(&*fs, index)?;
            freed += index_bytes;
        }
        if !self.segments.is_empty() {
            fs.sync_dir(&self.dir)
                .map_err(|e| LogError::io("fsync the directory", &self.dir, e))?;
        }
        Ok(freed)
    }
}
