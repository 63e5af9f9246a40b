//! The files beside the segments: the snapshot slot, the sparse index
//! files, removal of old segments, and the durable marks they prove.

use std::io;
use std::path::Path;

use bytes::Bytes;

use crate::error::{Damage, LogError};
use crate::format::{
    decode_index, decode_snapshot, encode_index, index_file_name, segment_file_name, SnapshotParts,
    INDEX_ENTRY_BYTES, INDEX_HEADER_BYTES, INDEX_TRAILER_BYTES, RECORD_HEADER_BYTES,
    SNAPSHOT_HEADER_BYTES, SNAPSHOT_TRAILER_BYTES,
};
use crate::fs::{read_exact_at, FileSystem, OpenMode};
use crate::jobs::{SegmentRemoval, SnapshotWrite};
use crate::segment::Segment;
use crate::{Seq, SNAPSHOT_BYTES_MAX};

use super::*;

impl Log {
    /// Deletes the sealed segments (oldest first) whose records all have a
    /// seq below `seq`; never the active segment. Returns the bytes freed
    /// (segment and index files).
    pub fn remove_segments_before(&mut self, seq: Seq) -> Result<u64, LogError> {
        let mut freed = 0;
        let mut removed = 0;
        let mut result = Ok(());
        let removable = self.sealed.len() - usize::from(self.sealing.is_some());
        for segment in &self.sealed[..removable] {
            if segment.next_seq > seq {
                break;
            }
            let path = self.segments_dir.join(segment_file_name(segment.first_seq));
            if let Err(e) = remove_if_present(&*self.fs, &path) {
                result = Err(e);
                break;
            }
            removed += 1;
            freed += segment.bytes;
            self.readahead.invalidate(segment.first_seq);
            if self
                .reader
                .as_ref()
                .is_some_and(|(key, _)| *key == segment.first_seq)
            {
                self.reader = None;
            }
            // Segment first, index second: a crash between leaves an
            // orphan index, which open removes, never a segment without one.
            let index_path = self.segments_dir.join(index_file_name(segment.first_seq));
            match remove_if_present(&*self.fs, &index_path) {
                Ok(()) => freed += segment.index_bytes,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        self.sealed.drain(..removed);
        self.metrics.segments_removed += removed as u64;
        result?;
        if removed > 0 {
            self.sync_dir_counted(&self.segments_dir.clone())?;
        }
        Ok(freed)
    }

    /// Lets go of the sealed segments (oldest first) whose records all have
    /// a seq below `seq`, as [`Log::remove_segments_before`] would remove
    /// them, and hands their files over to delete outside the log
    /// ([`SegmentRemoval::run`]); from here on the log reads none of them.
    pub fn detach_segments_before(&mut self, seq: Seq) -> SegmentRemoval {
        // A segment whose seal is still to run stays until it ran.
        let removable = self.sealed.len() - usize::from(self.sealing.is_some());
        let count = self.sealed[..removable]
            .iter()
            .take_while(|segment| segment.next_seq <= seq)
            .count();
        if count == 0 {
            return SegmentRemoval::default();
        }
        let mut segments = Vec::with_capacity(count);
        for segment in self.sealed.drain(..count) {
            self.readahead.invalidate(segment.first_seq);
            if self
                .reader
                .as_ref()
                .is_some_and(|(key, _)| *key == segment.first_seq)
            {
                self.reader = None;
            }
            segments.push((
                self.segments_dir.join(segment_file_name(segment.first_seq)),
                self.segments_dir.join(index_file_name(segment.first_seq)),
                segment.bytes,
                segment.index_bytes,
            ));
        }
        self.metrics.segments_removed += count as u64;
        SegmentRemoval {
            fs: Some(Arc::clone(&self.fs)),
            dir: self.segments_dir.clone(),
            segments,
        }
    }

    /// Begins saving a snapshot outside the log: `bytes`, recorded as
    /// covering every record up to and including `covers`. The returned
    /// [`SnapshotWrite`] writes its temporary file without the log; before
    /// it is installed, [`Log::snapshot_ready`] must say the records it
    /// covers are durable. One at a time (they share the temporary file).
    pub fn begin_snapshot(&mut self, covers: Seq, bytes: Bytes) -> Result<SnapshotWrite, LogError> {
        if bytes.len() as u64 > SNAPSHOT_BYTES_MAX {
            return Err(LogError::SnapshotTooLarge {
                len: bytes.len(),
                max: SNAPSHOT_BYTES_MAX,
            });
        }
        if covers >= self.next_seq() {
            return Err(LogError::SnapshotAhead {
                covers,
                next_seq: self.next_seq(),
            });
        }
        Ok(SnapshotWrite {
            fs: Arc::clone(&self.fs),
            tmp: self.snapshot_tmp_path.clone(),
            path: self.snapshot_path.clone(),
            dir: self.config.dir.clone(),
            parts: SnapshotParts::new(covers, bytes),
            covers,
            discarded_at_begin: self.metrics.records_discarded,
            written: false,
        })
    }

    /// Whether `snapshot` may be installed: the records it covers are made
    /// durable first if they are not yet, whatever the policy (usually a
    /// sync outside the log made them durable meanwhile, and this does no
    /// I/O). An error if records were discarded since it began (their seqs
    /// may be issued again, so the state it holds may be of records that
    /// are gone), or if making them durable failed.
    pub fn snapshot_ready(&mut self, snapshot: &SnapshotWrite) -> Result<(), LogError> {
        if self.metrics.records_discarded != snapshot.discarded_at_begin {
            return Err(LogError::io(
                "save the snapshot at",
                &snapshot.path,
                io::Error::other("records it covers were discarded after a write or fsync failed"),
            ));
        }
        if snapshot.covers >= self.next_seq() {
            return Err(LogError::SnapshotAhead {
                covers: snapshot.covers,
                next_seq: self.next_seq(),
            });
        }
        if snapshot.covers >= self.durable_next() {
            self.make_all_durable()?;
        }
        Ok(())
    }

    /// Atomically replaces the snapshot with `bytes`, recorded as covering
    /// every record up to and including `covers`: written to a temporary
    /// file, fsynced, renamed over the old one, directory fsynced. The
    /// records it covers are made durable first, whatever the policy, so a
    /// crash can never leave a snapshot ahead of the log.
    pub fn save_snapshot(&mut self, covers: Seq, bytes: &[u8]) -> Result<(), LogError> {
        if bytes.len() as u64 > SNAPSHOT_BYTES_MAX {
            return Err(LogError::SnapshotTooLarge {
                len: bytes.len(),
                max: SNAPSHOT_BYTES_MAX,
            });
        }
        if covers >= self.next_seq() {
            return Err(LogError::SnapshotAhead {
                covers,
                next_seq: self.next_seq(),
            });
        }
        if covers >= self.durable_next() {
            self.make_all_durable()?;
        }
        let parts = SnapshotParts::new(covers, Bytes::copy_from_slice(bytes));
        let tmp = self.snapshot_tmp_path.clone();
        let result = write_snapshot_durably(&*self.fs, &tmp, &parts).and_then(|()| {
            self.fs.rename(&tmp, &self.snapshot_path).map_err(|e| {
                LogError::io("rename the snapshot into place at", &self.snapshot_path, e)
            })
        });
        if let Err(e) = result {
            let _ = self.fs.remove_file(&tmp);
            return Err(e);
        }
        self.metrics.fsyncs += 1;
        self.sync_dir_counted(&self.config.dir.clone())
    }

    /// Writes and fdatasyncs every record appended so far, whatever the
    /// policy.
    fn make_all_durable(&mut self) -> Result<(), LogError> {
        self.check_poisoned()?;
        self.flush()?;
        self.seal_in_place()?;
        if self.written != self.durable {
            self.fsync_active()?;
        }
        Ok(())
    }

    /// The last snapshot saved, with the seq it covers. `None` if there is
    /// none, or if it cannot be read or fails its checks — then a
    /// [`Damage::SnapshotUnreadable`] is queued for [`Log::take_damage`].
    pub fn load_snapshot(&mut self) -> Result<Option<(Seq, Bytes)>, LogError> {
        match read_snapshot(&*self.fs, &self.snapshot_path) {
            Ok(found) => Ok(found),
            Err((offset, reason)) => {
                self.damage.push(Damage::SnapshotUnreadable {
                    path: self.snapshot_path.clone(),
                    offset,
                    reason,
                });
                Ok(None)
            }
        }
    }
}

pub(crate) fn remove_if_present(fs: &dyn FileSystem, path: &Path) -> Result<(), LogError> {
    match fs.remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(LogError::io("remove", path, e)),
    }
}

/// Creates `path` with `bytes` and fsyncs it (not its directory).
pub(crate) fn write_file_durably(
    fs: &dyn FileSystem,
    path: &Path,
    bytes: &[u8],
) -> Result<(), LogError> {
    let mut file = fs
        .open(path, OpenMode::Create)
        .map_err(|e| LogError::io("create", path, e))?;
    file.append(bytes)
        .map_err(|e| LogError::io("write", path, e))?;
    file.sync_data().map_err(|e| LogError::io("fsync", path, e))
}

/// Creates `path` with the snapshot `parts` and fsyncs it (not its
/// directory).
pub(crate) fn write_snapshot_durably(
    fs: &dyn FileSystem,
    path: &Path,
    parts: &SnapshotParts,
) -> Result<(), LogError> {
    let mut file = fs
        .open(path, OpenMode::Create)
        .map_err(|e| LogError::io("create", path, e))?;
    let trailer = parts.trailer();
    for part in [&parts.header[..], &parts.body[..], &trailer[..]] {
        file.append(part)
            .map_err(|e| LogError::io("write", path, e))?;
    }
    file.sync_data().map_err(|e| LogError::io("fsync", path, e))
}

/// Writes a sealed segment's index: temporary file, fsync, rename,
/// directory fsync, so the index is either whole or absent. Returns its size.
pub(crate) fn write_index(
    fs: &dyn FileSystem,
    segments_dir: &Path,
    segment: &Segment,
) -> Result<u64, LogError> {
    let bytes = encode_index(&segment.to_index());
    write_index_bytes(fs, segments_dir, segment.first_seq, &bytes)
}

/// [`write_index`] of an index already encoded.
pub(crate) fn write_index_bytes(
    fs: &dyn FileSystem,
    segments_dir: &Path,
    first_seq: Seq,
    bytes: &[u8],
) -> Result<u64, LogError> {
    let name = index_file_name(first_seq);
    let tmp = segments_dir.join(format!("{name}.tmp"));
    let path = segments_dir.join(name);
    let result = write_file_durably(fs, &tmp, bytes)
        .and_then(|()| {
            fs.rename(&tmp, &path)
                .map_err(|e| LogError::io("rename the index into place at", &path, e))
        })
        .and_then(|()| {
            fs.sync_dir(segments_dir)
                .map_err(|e| LogError::io("fsync the directory", segments_dir, e))
        });
    if let Err(e) = result {
        let _ = fs.remove_file(&tmp);
        return Err(e);
    }
    Ok(bytes.len() as u64)
}

/// Reads and checks a sealed segment's index file; the error says where
/// and what is wrong with it.
pub(crate) fn read_index(
    fs: &dyn FileSystem,
    path: &Path,
    first_seq: Seq,
    segment_bytes: u64,
) -> Result<(crate::format::IndexFile, u64), (u64, String)> {
    let file = match fs.open(path, OpenMode::Read) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err((0, "the index file is missing".to_string()))
        }
        Err(e) => return Err((0, format!("the index file cannot be opened: {e}"))),
    };
    let size = file
        .size()
        .map_err(|e| (0, format!("the index file's size cannot be read: {e}")))?;
    // No more entries than records could fit in the segment.
    let entries_max = segment_bytes / RECORD_HEADER_BYTES as u64 + 1;
    let size_max =
        (INDEX_HEADER_BYTES + INDEX_TRAILER_BYTES) as u64 + entries_max * INDEX_ENTRY_BYTES as u64;
    if size > size_max {
        return Err((
            0,
            format!("the index file is {size} bytes, more than its segment could need"),
        ));
    }
    let mut bytes = vec![0; size as usize];
    read_exact_at(&*file, 0, &mut bytes)
        .map_err(|e| (0, format!("the index file cannot be read: {e}")))?;
    let index = decode_index(&bytes, first_seq, segment_bytes)?;
    Ok((index, size))
}

/// A seq up to which the directory proves records durable, whatever the
/// last segment now holds, and what proves it (for the operator).
pub(crate) struct DurableMark {
    /// Every record below this seq was durable.
    pub(crate) next_seq: Seq,
    pub(crate) proof: String,
}

/// The snapshot's `covers`, as a durable mark: `save_snapshot` makes the
/// records it covers durable before it writes the snapshot. `None` when
/// there is no snapshot or it fails its checks (`load_snapshot` reports
/// that).
pub(crate) fn snapshot_mark(fs: &dyn FileSystem, path: &Path) -> Option<DurableMark> {
    let covers = check_snapshot(fs, path).ok().flatten()?;
    (covers > 0).then(|| DurableMark {
        next_seq: covers.saturating_add(1),
        proof: format!(
            "the snapshot {} covers every record up to seq {covers}",
            path.display()
        ),
    })
}

/// Checks the snapshot as it reads it, a piece at a time (a large one costs
/// no memory here): `Ok(None)` if there is none, its `covers` if it holds
/// together, else where and what is wrong.
pub(crate) fn check_snapshot(
    fs: &dyn FileSystem,
    path: &Path,
) -> Result<Option<Seq>, (u64, String)> {
    const CHUNK_BYTES: u64 = 1024 * 1024;
    let file = match fs.open(path, OpenMode::Read) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err((0, format!("the snapshot cannot be opened: {e}"))),
    };
    let size = file
        .size()
        .map_err(|e| (0, format!("the snapshot's size cannot be read: {e}")))?;
    let header_bytes = SNAPSHOT_HEADER_BYTES as u64;
    let trailer_bytes = SNAPSHOT_TRAILER_BYTES as u64;
    if size < header_bytes + trailer_bytes
        || size > SNAPSHOT_BYTES_MAX + header_bytes + trailer_bytes
    {
        return Err((
            0,
            format!("the snapshot is {size} bytes, outside its limits"),
        ));
    }
    let unreadable = |e: io::Error| (0, format!("the snapshot cannot be read: {e}"));
    let mut header = [0u8; SNAPSHOT_HEADER_BYTES];
    read_exact_at(&*file, 0, &mut header).map_err(unreadable)?;
    let Some((covers, body_len)) = crate::format::snapshot_header(&header) else {
        return Err((
            0,
            "the snapshot's magic or version is not CLSN 1".to_string(),
        ));
    };
    if body_len != size - header_bytes - trailer_bytes {
        return Err((
            16,
            format!("snapshot body length {body_len} does not match the file"),
        ));
    }
    let body_end = size - trailer_bytes;
    let mut crc = crc32c::crc32c(&header);
    let mut chunk = Vec::new();
    let mut at = header_bytes;
    while at < body_end {
        let len = (body_end - at).min(CHUNK_BYTES);
        chunk.resize(len as usize, 0);
        read_exact_at(&*file, at, &mut chunk).map_err(unreadable)?;
        crc = crc32c::crc32c_append(crc, &chunk);
        at += len;
    }
    let mut trailer = [0u8; SNAPSHOT_TRAILER_BYTES];
    read_exact_at(&*file, body_end, &mut trailer).map_err(unreadable)?;
    let stored = u32::from_be_bytes(trailer);
    if stored != crc {
        return Err((
            body_end,
            format!("snapshot checksum mismatch (stored {stored:#010x}, computed {crc:#010x})"),
        ));
    }
    Ok(Some(covers))
}

/// The `next_seq` an index file records for segment `first_seq`, if the
/// file holds together (its checksum, magic, version and entries), however
/// long the segment is now.
pub(crate) fn index_next_seq(fs: &dyn FileSystem, path: &Path, first_seq: Seq) -> Option<Seq> {
    let file = fs.open(path, OpenMode::Read).ok()?;
    let size = file.size().ok()?;
    let mut header = [0u8; INDEX_HEADER_BYTES];
    read_exact_at(&*file, 0, &mut header).ok()?;
    let segment_bytes = crate::format::be_u64(&header, 24);
    let entries_max =
        segment_bytes.min(crate::SEGMENT_BYTES_LIMIT) / RECORD_HEADER_BYTES as u64 + 1;
    let size_max =
        (INDEX_HEADER_BYTES + INDEX_TRAILER_BYTES) as u64 + entries_max * INDEX_ENTRY_BYTES as u64;
    if size > size_max {
        return None;
    }
    let mut bytes = vec![0; usize::try_from(size).ok()?];
    read_exact_at(&*file, 0, &mut bytes).ok()?;
    decode_index(&bytes, first_seq, segment_bytes)
        .ok()
        .map(|index| index.next_seq)
}

/// Reads and checks the snapshot: `Ok(None)` if there is none; the error
/// says where and what is wrong with it.
pub(crate) fn read_snapshot(
    fs: &dyn FileSystem,
    path: &Path,
) -> Result<Option<(Seq, Bytes)>, (u64, String)> {
    let file = match fs.open(path, OpenMode::Read) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err((0, format!("the snapshot cannot be opened: {e}"))),
    };
    let size = file
        .size()
        .map_err(|e| (0, format!("the snapshot's size cannot be read: {e}")))?;
    let size_max = SNAPSHOT_BYTES_MAX + (SNAPSHOT_HEADER_BYTES + SNAPSHOT_TRAILER_BYTES) as u64;
    if size > size_max {
        return Err((
            0,
            format!("the snapshot is {size} bytes, more than the limit of {size_max}"),
        ));
    }
    let mut bytes = vec![0; size as usize];
    read_exact_at(&*file, 0, &mut bytes)
        .map_err(|e| (0, format!("the snapshot cannot be read: {e}")))?;
    decode_snapshot(bytes).map(Some)
}
