//! Courier's embedded durable log: an append-only sequence of opaque,
//! checksummed records in segment files, with a sparse index, a snapshot
//! slot, and recovery rules for torn writes, bit rot and failing disks.
//!
//! The log is a storage engine and nothing more: it knows records
//! (`seq`, `timestamp`, `kind`, `body`) and nothing of messages, services or
//! delivery. The byte layout of every file it writes is specified in
//! `docs/STORAGE.md`.
//!
//! Architecture invariants:
//! - `courier-log` does no network I/O and starts no threads; one writer
//!   (`&mut Log`) does all file I/O through a [`FileSystem`], so tests can
//!   inject disk-full, I/O errors and crashes ([`FaultyFs`]).
//! - Nothing appended counts as durable until [`Log::sync`] returned `Ok`
//!   (under [`FsyncPolicy::Always`]). After any write or fsync error the
//!   log discards what it cannot vouch for, and [`Log::next_seq`] says where
//!   it continues; a sequence number that was ever durable is never reused.
//! - Every record is checksummed when written (and decoded back before it
//!   is handed to the OS) and checked again on every read; damage is
//!   reported, never skipped silently, and never makes [`Log::open`] fail.
#![forbid(unsafe_code)]

mod clock;
mod error;
mod faulty;
mod format;
mod fs;
mod jobs;
mod lock;
mod log;
mod segment;
mod verify;

use std::path::PathBuf;
use std::time::Duration;

pub use clock::Clock;
pub use error::{Damage, LogError};
pub use faulty::{Fault, FaultCounts, FaultOp, FaultyFs};
pub use fs::{FileSystem, LogFile, OpenMode, RealFs};
pub use jobs::{SegmentRemoval, SnapshotWrite};
pub use lock::DirLock;
pub use log::{Log, LogMetrics, PendingSync, SegmentInfo};
pub use verify::{verify_dir, Scrubber, VerifyProgress, VerifyReport};

/// Record sequence number: the first record of a fresh log gets 1, every
/// append the next one; a number is never reused once it was durable.
pub type Seq = u64;

/// Default for [`LogConfig::segment_bytes_max`]: big enough that sealing
/// (one fsync and one small index file) is rare, small enough that removing
/// a whole segment frees space in useful steps.
pub const SEGMENT_BYTES_MAX_DEFAULT: u64 = 64 * 1024 * 1024;
/// Smallest accepted `segment_bytes_max`; tiny segments are only useful in
/// tests (they make rolling frequent).
pub const SEGMENT_BYTES_MIN: u64 = 256;
/// Largest accepted `segment_bytes_max`; bounds how much one open scans and
/// how large one index file can grow.
pub const SEGMENT_BYTES_LIMIT: u64 = 4 * 1024 * 1024 * 1024;
/// Default for [`LogConfig::index_every_records`]: a lookup decodes at most
/// this many records after the index entry it starts from.
pub const INDEX_EVERY_RECORDS_DEFAULT: u32 = 64;
/// Largest accepted `index_every_records`, so a lookup's scan stays short.
pub const INDEX_EVERY_RECORDS_LIMIT: u32 = 65_536;
/// Default for [`LogConfig::record_bytes_max`] (bytes of one record body).
pub const RECORD_BYTES_MAX_DEFAULT: u32 = 16 * 1024 * 1024;
/// Hard cap on a record body, for configuration and for decoding: a length
/// field above it is damage, whatever `record_bytes_max` is now, so lowering
/// the configured limit never makes old records unreadable.
pub const RECORD_BODY_BYTES_LIMIT: u32 = 256 * 1024 * 1024;
/// Largest snapshot body [`Log::save_snapshot`] accepts and
/// [`Log::load_snapshot`] will read into memory.
pub const SNAPSHOT_BYTES_MAX: u64 = 1024 * 1024 * 1024;

/// When [`Log::sync`] asks the disk to make appended records durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// Every `sync` that has new records ends with `fdatasync`: `Ok` means
    /// durable.
    Always,
    /// `sync` writes new records to the OS every time but calls `fdatasync`
    /// only when the last one is older than the interval; `Ok` means
    /// durable only up to the last fsync.
    Interval(Duration),
    /// `sync` only writes to the OS; a machine crash may lose anything not
    /// yet in a sealed segment (the seal of a rolled segment, run by the
    /// next sync, always fsyncs it).
    Never,
}

/// How a [`Log`] lays out and flushes its files. `LogConfig::new` gives the
/// defaults; [`Log::open`] rejects values outside the documented limits.
#[derive(Clone, Debug)]
pub struct LogConfig {
    /// The log's directory; created if missing. One log per directory and
    /// one process per log.
    pub dir: PathBuf,
    /// A segment is sealed and a new one started before an append would make
    /// it larger than this (a single larger record gets a segment alone).
    pub segment_bytes_max: u64,
    /// Every this-many-th record of a segment gets a sparse index entry.
    pub index_every_records: u32,
    /// Largest record body [`Log::append`] accepts, in bytes.
    pub record_bytes_max: u32,
    pub fsync: FsyncPolicy,
    /// Time for the `Interval` policy; [`Clock::system`] unless a test
    /// drives it.
    pub clock: Clock,
}

impl LogConfig {
    pub fn new(dir: impl Into<PathBuf>) -> LogConfig {
        LogConfig {
            dir: dir.into(),
            segment_bytes_max: SEGMENT_BYTES_MAX_DEFAULT,
            index_every_records: INDEX_EVERY_RECORDS_DEFAULT,
            record_bytes_max: RECORD_BYTES_MAX_DEFAULT,
            fsync: FsyncPolicy::Always,
            clock: Clock::system(),
        }
    }

    pub(crate) fn validate(&self) -> Result<(), LogError> {
        let invalid = |reason: String| Err(LogError::InvalidConfig { reason });
        if !(SEGMENT_BYTES_MIN..=SEGMENT_BYTES_LIMIT).contains(&self.segment_bytes_max) {
            return invalid(format!(
                "segment_bytes_max is {} but must be between {SEGMENT_BYTES_MIN} and {SEGMENT_BYTES_LIMIT}",
                self.segment_bytes_max
            ));
        }
        if !(1..=INDEX_EVERY_RECORDS_LIMIT).contains(&self.index_every_records) {
            return invalid(format!(
                "index_every_records is {} but must be between 1 and {INDEX_EVERY_RECORDS_LIMIT}",
                self.index_every_records
            ));
        }
        if self.record_bytes_max > RECORD_BODY_BYTES_LIMIT {
            return invalid(format!(
                "record_bytes_max is {} but must be at most {RECORD_BODY_BYTES_LIMIT}",
                self.record_bytes_max
            ));
        }
        Ok(())
    }
}

/// What a record holds, as far as the log's user is concerned; the log
/// treats both alike.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum RecordKind {
    Message = 1,
    State = 2,
}

impl RecordKind {
    pub(crate) fn from_u8(byte: u8) -> Option<RecordKind> {
        match byte {
            1 => Some(RecordKind::Message),
            2 => Some(RecordKind::State),
            _ => None,
        }
    }
}

/// One record as stored: the log assigns `seq`; `timestamp` (Unix
/// nanoseconds) and `body` are the caller's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub seq: Seq,
    pub timestamp: u64,
    pub kind: RecordKind,
    pub body: bytes::Bytes,
}
