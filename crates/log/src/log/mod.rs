//! The log itself: the `Log` and what it holds. Opening and recovery are
//! `open.rs`, appends and syncs with their failure rules `write.rs`, reads,
//! scans and time lookups `read.rs`, segment removal, the snapshot slot
//! and the index files `files.rs`.

use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::error::{Damage, LogError};
use crate::format::segment_file_name;
use crate::fs::{FileSystem, LogFile};
use crate::segment::{ReadAhead, Segment};
use crate::{LogConfig, Seq};

mod files;
mod open;
mod read;
mod seal;
mod write;

pub(crate) use files::{
    check_snapshot, index_next_seq, read_index, remove_if_present, snapshot_mark,
    write_snapshot_durably, DurableMark,
};
pub(crate) use open::reconcile_boundaries;
use seal::SealWork;
use write::FsyncGate;
pub use write::PendingSync;

/// Appended records wait in memory until `sync`, or until they reach this
/// many bytes and are written (not fsynced) early, so memory stays bounded
/// however long a caller appends without syncing.
pub(crate) const PENDING_BYTES_MAX: usize = 1024 * 1024;

const SEGMENTS_DIR_NAME: &str = "segments";
const SNAPSHOT_FILE_NAME: &str = "snapshot";
const SNAPSHOT_TMP_FILE_NAME: &str = "snapshot.tmp";

/// Counters since the log was opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogMetrics {
    pub appends: u64,
    /// `sync` calls that had something to write or fsync.
    pub syncs: u64,
    /// Successful `fdatasync`s of segment and index files and directories.
    pub fsyncs: u64,
    /// Bytes handed to the OS for segment files.
    pub bytes_written: u64,
    /// Damaged ranges found (at open and since); one range may span
    /// several records.
    pub corrupt_records_found: u64,
    pub torn_tails_truncated: u64,
    /// Seqs a durable mark (the snapshot, an index file) proves were
    /// written, found missing at open: records lost, never reissued.
    pub records_lost: u64,
    pub write_errors: u64,
    pub fsync_errors: u64,
    /// Appended records thrown away after a write or fsync error.
    pub records_discarded: u64,
    pub segments_sealed: u64,
    pub segments_removed: u64,
}

/// One segment as [`Log::segments`] reports it. For an empty segment
/// `last_seq` is `first_seq - 1` and the timestamps are 0.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentInfo {
    pub path: PathBuf,
    pub first_seq: Seq,
    pub last_seq: Seq,
    pub bytes: u64,
    pub first_timestamp: u64,
    pub last_timestamp: u64,
    pub sealed: bool,
}

/// The state of the active segment at one moment, to roll back to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Mark {
    bytes: u64,
    next_seq: Seq,
    records: u64,
    first_timestamp: u64,
    last_timestamp: u64,
    max_timestamp: u64,
}

impl Mark {
    fn of(segment: &Segment) -> Mark {
        Mark {
            bytes: segment.bytes,
            next_seq: segment.next_seq,
            records: segment.records,
            first_timestamp: segment.first_timestamp,
            last_timestamp: segment.last_timestamp,
            max_timestamp: segment.max_timestamp,
        }
    }

    fn restore(self, segment: &mut Segment) {
        segment.bytes = self.bytes;
        segment.next_seq = self.next_seq;
        segment.records = self.records;
        segment.first_timestamp = self.first_timestamp;
        segment.last_timestamp = self.last_timestamp;
        segment.max_timestamp = self.max_timestamp;
        segment.index.retain(|entry| entry.offset < self.bytes);
        segment
            .damaged
            .retain(|damaged| damaged.offset < self.bytes);
    }
}

/// The embedded durable log. One writer: every method that touches files
/// takes `&mut self`.
///
/// Failure contract: `append` only buffers (it writes early when the buffer
/// is full, and rolls a full segment, whose seal — the fsyncs — waits for
/// the next sync), `sync` makes records durable per
/// [`FsyncPolicy`](crate::FsyncPolicy). When a write fails, the records not yet written are
/// discarded; when an fsync fails, every record since the last successful
/// fsync is discarded (the file is truncated back), because after a failed
/// fsync the OS may have dropped those pages and a later fsync that returns
/// `Ok` proves nothing about them. In both cases the error is returned and
/// [`Log::next_seq`] tells where the log continues: seqs from there on are
/// issued again, and no seq that was durable is ever reissued.
///
/// Dropping a `Log` writes nothing: records appended since the last `sync`
/// may be lost, exactly as in a crash. The log has no threads or timers, so
/// under [`FsyncPolicy::Interval`](crate::FsyncPolicy::Interval) the caller's next `sync` is what fsyncs.
pub struct Log {
    config: LogConfig,
    fs: Arc<dyn FileSystem>,
    segments_dir: PathBuf,
    snapshot_path: PathBuf,
    snapshot_tmp_path: PathBuf,
    sealed: Vec<Segment>,
    active: Segment,
    active_file: Box<dyn LogFile>,
    /// Encoded records appended but not yet written to the active file.
    pending: Vec<u8>,
    /// The active segment after the last successful write.
    written: Mark,
    /// The active segment after the last successful fsync.
    durable: Mark,
    /// The seal of the segment rolled away from (its fdatasync, index file
    /// and the directory fsync that also covers the new segment's entry),
    /// left to the next sync, in place or in a [`PendingSync`]; at most one
    /// waits. Shared with the job that runs it.
    seal: Arc<Mutex<Option<SealWork>>>,
    /// While a seal waits: the sealed segment's last durable mark, to cut
    /// it back to if its fdatasync fails. The records of the active
    /// segment are not durable before the seal finished.
    sealing: Option<Mark>,
    last_fsync: Option<Instant>,
    /// Serialises every fdatasync of the active segment, the log's own and
    /// one run outside it ([`PendingSync::run`]), and keeps the failure of
    /// the latter for the log to hear of (see [`Log::begin_sync`]).
    gate: Arc<Mutex<FsyncGate>>,
    /// A [`PendingSync`] is out and not yet finished.
    sync_in_flight: bool,
    /// Grows whenever records that were written were discarded after a
    /// failed fsync: a [`PendingSync`] begun before covers none of them.
    rollbacks: u64,
    poisoned: Option<String>,
    /// An open handle on the sealed segment read last.
    reader: Option<(Seq, Box<dyn LogFile>)>,
    readahead: ReadAhead,
    damage: Vec<Damage>,
    metrics: LogMetrics,
}

impl fmt::Debug for Log {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Log")
            .field("dir", &self.config.dir)
            .field("first_seq", &self.first_seq())
            .field("next_seq", &self.next_seq())
            .field("segments", &(self.sealed.len() + 1))
            .field("poisoned", &self.poisoned)
            .finish()
    }
}

impl Log {
    /// The oldest seq still stored (equal to `next_seq()` when empty).
    pub fn first_seq(&self) -> Seq {
        self.sealed
            .first()
            .map_or(self.active.first_seq, |s| s.first_seq)
    }

    /// The seq the next append gets.
    pub fn next_seq(&self) -> Seq {
        self.active.next_seq
    }

    /// Every segment, oldest first; the last is the active one.
    pub fn segments(&self) -> Vec<SegmentInfo> {
        self.sealed
            .iter()
            .chain(std::iter::once(&self.active))
            .map(|segment| SegmentInfo {
                path: self.segments_dir.join(segment_file_name(segment.first_seq)),
                first_seq: segment.first_seq,
                last_seq: segment.next_seq.saturating_sub(1),
                bytes: segment.bytes,
                first_timestamp: segment.first_timestamp,
                last_timestamp: segment.last_timestamp,
                sealed: segment.sealed,
            })
            .collect()
    }

    /// Damage found since open (or since the last call) by reads, scans,
    /// [`Log::verify`] and [`Log::load_snapshot`]; each damaged range is
    /// reported once.
    pub fn take_damage(&mut self) -> Vec<Damage> {
        std::mem::take(&mut self.damage)
    }

    pub fn metrics(&self) -> LogMetrics {
        self.metrics
    }

    /// The file system the log was opened on (to reopen it the same way).
    pub fn file_system(&self) -> Arc<dyn FileSystem> {
        self.fs.clone()
    }

    pub fn config(&self) -> &LogConfig {
        &self.config
    }

    // -----------------------------------------------------------------------
    // Writing.

    fn check_poisoned(&self) -> Result<(), LogError> {
        match &self.poisoned {
            Some(reason) => Err(LogError::Poisoned {
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }

    fn active_path(&self) -> PathBuf {
        self.segments_dir
            .join(segment_file_name(self.active.first_seq))
    }

    // -----------------------------------------------------------------------
    // Reading.

    /// Segment `pos`: the sealed ones by age, then the active one.
    fn segment(&self, pos: usize) -> &Segment {
        self.sealed.get(pos).unwrap_or(&self.active)
    }

    fn segment_mut(&mut self, pos: usize) -> &mut Segment {
        match self.sealed.get_mut(pos) {
            Some(segment) => segment,
            None => &mut self.active,
        }
    }

    /// The segment holding `seq` (which is at least `first_seq()`).
    fn position_of(&self, seq: Seq) -> usize {
        if seq >= self.active.first_seq {
            return self.sealed.len();
        }
        self.sealed
            .partition_point(|segment| segment.first_seq <= seq)
            .saturating_sub(1)
    }
}
