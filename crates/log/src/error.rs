//! What can go wrong (`LogError`) and what open or a read found broken on
//! disk (`Damage`). Every message names the file and says what to do.

use std::fmt;
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};

use crate::Seq;

/// Why a log operation failed.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The OS refused a file operation.
    #[error("cannot {op} {}: {source}; check that the disk is healthy and the log directory is writable, then retry (after a failed write or fsync, next_seq() says which appends were kept)", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The disk is full (ENOSPC).
    #[error("no space left on the device to {op} {}; free disk space, then retry (next_seq() says which appends were kept)", path.display())]
    NoSpace { op: &'static str, path: PathBuf },
    /// A read or scan reached a damaged record: it is reported, not skipped.
    #[error("damaged record in {} at byte {offset}: {reason}; records {seq}..{resume_seq} cannot be read: restore them from a backup or replica, or continue reading at seq {resume_seq}", segment.display())]
    Corrupt {
        segment: PathBuf,
        offset: u64,
        /// The first sequence number that cannot be read.
        seq: Seq,
        /// The first sequence number after the damage (may equal
        /// `next_seq()` when the damage reaches the end of the log).
        resume_seq: Seq,
        reason: String,
    },
    #[error("record body of {len} bytes exceeds record_bytes_max ({max} bytes); split the record or raise the limit")]
    RecordTooLarge { len: usize, max: u32 },
    /// An earlier write failed and undoing it failed too, so the file may
    /// hold bytes the log does not know about.
    #[error("the log stopped accepting writes: {reason}; reopen it (Log::open repairs the tail) once the disk is healthy")]
    Poisoned { reason: String },
    /// Another process holds the log directory's lock.
    #[error("another process holds the lock {} (a running courier serve?); stop it first, or use another --data-dir", path.display())]
    Locked { path: PathBuf },
    #[error("invalid log configuration: {reason}; fix the configuration and open again")]
    InvalidConfig { reason: String },
    #[error("snapshot of {len} bytes exceeds the limit of {max} bytes; make the snapshot smaller")]
    SnapshotTooLarge { len: usize, max: u64 },
    #[error("a snapshot cannot cover seq {covers}: the log ends before seq {next_seq}; save a snapshot only for records already appended")]
    SnapshotAhead { covers: Seq, next_seq: Seq },
    /// An internal check failed; the data on disk was not touched by it.
    #[error("internal check failed: {reason}; this is a bug in courier-log, please report it")]
    Bug { reason: String },
}

impl LogError {
    /// Maps an I/O error, treating "disk full" specially so callers can say
    /// what helps.
    pub(crate) fn io(op: &'static str, path: &Path, source: io::Error) -> LogError {
        if is_no_space(&source) {
            LogError::NoSpace {
                op,
                path: path.to_path_buf(),
            }
        } else {
            LogError::Io {
                op,
                path: path.to_path_buf(),
                source,
            }
        }
    }
}

/// ENOSPC: the error kind where the platform maps it, else the raw code.
fn is_no_space(error: &io::Error) -> bool {
    const ENOSPC_LINUX: i32 = 28;
    error.kind() == io::ErrorKind::StorageFull
        || (cfg!(target_os = "linux") && error.raw_os_error() == Some(ENOSPC_LINUX))
}

/// Something [`crate::Log::open`] (or a later read, scan or snapshot load)
/// found broken on disk, and what the log did about it. Each entry names
/// the file and the byte offset; `Display` gives a sentence for an operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Damage {
    /// The last segment ended in an incomplete or checksum-failing record
    /// with nothing valid after it, past every durable mark (nothing on
    /// disk records those bytes as durable): the remains of a write a
    /// crash cut short. The file was truncated to the end of the last
    /// valid record.
    TornTail {
        segment: PathBuf,
        offset: u64,
        bytes_dropped: u64,
    },
    /// The last segment ends (whole or in a torn record) before a seq that
    /// a durable mark — the snapshot's `covers`, an index file — proves was
    /// durable: records that were fsynced are gone (a file cut short, a
    /// disk that lost writes). Nothing was truncated; the segment was
    /// sealed as it is and the log goes on at `seqs.end`, so none of the
    /// lost seqs is ever issued again. Reads of `seqs` return
    /// [`LogError::Corrupt`].
    DurableRecordsLost {
        segment: PathBuf,
        /// Where the last intact record ends.
        offset: u64,
        /// Bytes from `offset` to the end of the file (the remains of the
        /// lost records, kept).
        bytes: u64,
        seqs: Range<Seq>,
        /// The durable mark that proves it, in words.
        mark: String,
    },
    /// Bytes that do not decode as the expected record, with valid records
    /// (or a sealed segment's end) after them. Nothing was deleted; reads of
    /// `seqs` return [`LogError::Corrupt`]; records after the damage were
    /// found again by resynchronising on the next valid record.
    CorruptRecord {
        segment: PathBuf,
        offset: u64,
        /// Bytes of the damaged region.
        bytes: u64,
        /// Sequence numbers that cannot be read (may be empty when the
        /// damaged bytes held no record the log expected).
        seqs: Range<Seq>,
        reason: String,
    },
    /// Segment boundaries do not fit: records a segment should hold are
    /// missing, or two segments claim the same seqs (`offset` is where the
    /// segment ends). Reads of `seqs` return [`LogError::Corrupt`].
    MissingRecords {
        segment: PathBuf,
        offset: u64,
        seqs: Range<Seq>,
        reason: String,
    },
    /// A sealed segment's index file was missing or failed its checks and
    /// was rebuilt by scanning the segment. `offset` is where in the index
    /// file the problem was found (0 when it was missing).
    IndexRebuilt {
        index: PathBuf,
        offset: u64,
        reason: String,
    },
    /// The snapshot could not be read or failed its checks;
    /// [`crate::Log::load_snapshot`] returned `None`.
    SnapshotUnreadable {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
}

impl Damage {
    /// The damaged file.
    pub fn path(&self) -> &Path {
        match self {
            Damage::TornTail { segment, .. }
            | Damage::DurableRecordsLost { segment, .. }
            | Damage::CorruptRecord { segment, .. }
            | Damage::MissingRecords { segment, .. } => segment,
            Damage::IndexRebuilt { index, .. } => index,
            Damage::SnapshotUnreadable { path, .. } => path,
        }
    }

    /// Where in [`Damage::path`] the damage starts.
    pub fn offset(&self) -> u64 {
        match self {
            Damage::TornTail { offset, .. }
            | Damage::DurableRecordsLost { offset, .. }
            | Damage::CorruptRecord { offset, .. }
            | Damage::MissingRecords { offset, .. }
            | Damage::IndexRebuilt { offset, .. }
            | Damage::SnapshotUnreadable { offset, .. } => *offset,
        }
    }
}

impl Damage {
    /// Records that cannot be read because of this damage (empty when
    /// none: a torn tail, a rebuilt index, the snapshot).
    pub fn unreadable_seqs(&self) -> Range<Seq> {
        match self {
            Damage::DurableRecordsLost { seqs, .. }
            | Damage::CorruptRecord { seqs, .. }
            | Damage::MissingRecords { seqs, .. } => seqs.clone(),
            Damage::TornTail { .. }
            | Damage::IndexRebuilt { .. }
            | Damage::SnapshotUnreadable { .. } => 0..0,
        }
    }

    /// Records that are gone from the disk altogether (not merely
    /// damaged in place), which no read will ever return.
    pub fn lost_seqs(&self) -> Range<Seq> {
        match self {
            Damage::DurableRecordsLost { seqs, .. } | Damage::MissingRecords { seqs, .. } => {
                seqs.clone()
            }
            _ => 0..0,
        }
    }

    /// Whether this is harm to durable data (an error for the operator),
    /// rather than the expected remains of a crash or derived data rebuilt
    /// without loss.
    pub fn is_harmful(&self) -> bool {
        match self {
            Damage::TornTail { .. } | Damage::IndexRebuilt { .. } => false,
            Damage::SnapshotUnreadable { .. } => true,
            other => !other.unreadable_seqs().is_empty(),
        }
    }
}

impl fmt::Display for Damage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Damage::TornTail {
                segment,
                offset,
                bytes_dropped,
            } => write!(
                f,
                "{}: dropped {bytes_dropped} bytes at byte {offset}, the remains of a write cut short by a crash; no durable mark (snapshot, index) reaches past the records before them, so the log holds everything it recorded as durable",
                segment.display()
            ),
            Damage::DurableRecordsLost {
                segment,
                offset,
                bytes,
                seqs,
                mark,
            } => write!(
                f,
                "{}: records {}..{} are lost: the segment ends at byte {offset} ({bytes} bytes of remains after it, kept), yet {mark}, so they were durable; the log goes on at seq {} and never issues their seqs again; restore the segment file from a backup (stop the broker first) to get them back, or accept the loss",
                segment.display(),
                seqs.start,
                seqs.end,
                seqs.end
            ),
            Damage::CorruptRecord {
                segment,
                offset,
                bytes,
                seqs,
                reason,
            } => write!(
                f,
                "{}: {bytes} damaged bytes at byte {offset} ({reason}); records {}..{} cannot be read and were kept on disk; the disk may be failing: check it and restore those records from a backup or replica",
                segment.display(),
                seqs.start,
                seqs.end
            ),
            Damage::MissingRecords {
                segment,
                offset,
                seqs,
                reason,
            } => write!(
                f,
                "{}: records {}..{} are missing at byte {offset} ({reason}), so they are lost; check whether segment files were removed or restored by hand, restore the missing records from a backup (stop the broker first), or accept the loss",
                segment.display(),
                seqs.start,
                seqs.end
            ),
            Damage::IndexRebuilt {
                index,
                offset,
                reason,
            } => write!(
                f,
                "{}: index rebuilt from its segment ({reason}, at byte {offset}); no data lost",
                index.display()
            ),
            Damage::SnapshotUnreadable {
                path,
                offset,
                reason,
            } => write!(
                f,
                "{}: snapshot ignored ({reason}, at byte {offset}); state must be rebuilt from the log, and records removed before the snapshot are lost",
                path.display()
            ),
        }
    }
}
