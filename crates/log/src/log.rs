//! The log itself: opening and recovery, appends and syncs with their
//! failure rules, reads, scans and time lookups, segment removal and the
//! snapshot slot.

use std::collections::BTreeSet;
use std::fmt;
use std::io;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use bytes::Bytes;

use crate::error::{Damage, LogError};
use crate::format::{
    check_record, decode_index, decode_record, decode_snapshot, encode_index, encode_record,
    encode_snapshot, index_file_name, parse_segments_dir_entry, segment_file_name, Bad,
    SegmentsDirEntry, INDEX_ENTRY_BYTES, INDEX_HEADER_BYTES, INDEX_TRAILER_BYTES,
    RECORD_HEADER_BYTES, SNAPSHOT_HEADER_BYTES, SNAPSHOT_TRAILER_BYTES,
};
use crate::fs::{read_exact_at, FileSystem, LogFile, OpenMode, RealFs};
use crate::jobs::{remove_if_present, write_file_durably, SegmentRemoval, SnapshotWrite};
use crate::segment::{decode_at, find_resync, scan_segment, Damaged, ReadAhead, Segment};
use crate::{FsyncPolicy, LogConfig, Record, RecordKind, Seq, SNAPSHOT_BYTES_MAX};

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
struct Mark {
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

/// What an fdatasync run outside the log ([`PendingSync::run`]) found, kept
/// until the log hears of it: by [`Log::finish_sync`], or by its own next
/// fsync of the file, which then fails too (a failed fsync may already have
/// dropped the pages, and a later one on the same file says `Ok` without
/// having written them).
#[derive(Debug, Default)]
struct FsyncGate {
    failed: Option<String>,
}

fn lock_gate(gate: &Mutex<FsyncGate>) -> MutexGuard<'_, FsyncGate> {
    gate.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// An fdatasync of the active segment taken out of the log by
/// [`Log::begin_sync`], so that the caller can run it ([`PendingSync::run`])
/// without holding whatever guards the log while others go on appending.
/// Its records count as durable only once [`Log::finish_sync`] accepted
/// the result.
pub struct PendingSync {
    file: Box<dyn LogFile>,
    gate: Arc<Mutex<FsyncGate>>,
    /// First seq of the segment it syncs.
    segment: Seq,
    mark: Mark,
    rollbacks: u64,
    path: PathBuf,
}

impl fmt::Debug for PendingSync {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PendingSync")
            .field("path", &self.path)
            .field("covers", &self.covers())
            .finish()
    }
}

impl PendingSync {
    /// Every record below this seq is durable once the sync finished `Ok`.
    pub fn covers(&self) -> Seq {
        self.mark.next_seq
    }

    /// The fdatasync itself: the slow part, needing no access to the log.
    /// Waits for any fsync the log itself is running on the file.
    pub fn run(&mut self) -> io::Result<()> {
        let mut gate = lock_gate(&self.gate);
        let result = self.file.sync_data();
        if let Err(e) = &result {
            gate.failed.get_or_insert_with(|| e.to_string());
        }
        result
    }
}

/// The embedded durable log. One writer: every method that touches files
/// takes `&mut self`.
///
/// Failure contract: `append` only buffers (it writes early when the buffer
/// is full, and seals a full segment), `sync` makes records durable per
/// [`FsyncPolicy`]. When a write fails, the records not yet written are
/// discarded; when an fsync fails, every record since the last successful
/// fsync is discarded (the file is truncated back), because after a failed
/// fsync the OS may have dropped those pages and a later fsync that returns
/// `Ok` proves nothing about them. In both cases the error is returned and
/// [`Log::next_seq`] tells where the log continues: seqs from there on are
/// issued again, and no seq that was durable is ever reissued.
///
/// Dropping a `Log` writes nothing: records appended since the last `sync`
/// may be lost, exactly as in a crash. The log has no threads or timers, so
/// under [`FsyncPolicy::Interval`] the caller's next `sync` is what fsyncs.
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
    /// A new segment file's directory entry is not yet known to be durable.
    dir_sync_pending: bool,
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
    /// Opens (or creates) the log in `config.dir` on the real file system.
    /// Returns what recovery found and did; damage never makes it fail,
    /// only invalid configuration or the OS refusing file operations.
    pub fn open(config: LogConfig) -> Result<(Log, Vec<Damage>), LogError> {
        Log::open_with(config, Arc::new(RealFs))
    }

    /// [`Log::open`] on a given file system (fault injection in tests).
    ///
    /// Reads only what it must: each sealed segment's index file (a sealed
    /// segment's records are checked when read, or by [`Log::verify`]), and
    /// all of the last segment, whose tail a crash may have torn.
    pub fn open_with(
        config: LogConfig,
        fs: Arc<dyn FileSystem>,
    ) -> Result<(Log, Vec<Damage>), LogError> {
        config.validate()?;
        let segments_dir = config.dir.join(SEGMENTS_DIR_NAME);
        let snapshot_path = config.dir.join(SNAPSHOT_FILE_NAME);
        let snapshot_tmp_path = config.dir.join(SNAPSHOT_TMP_FILE_NAME);
        fs.create_dir_all(&segments_dir)
            .map_err(|e| LogError::io("create the log directory", &segments_dir, e))?;
        // A snapshot write a crash cut short; the previous snapshot stands.
        remove_if_present(&*fs, &snapshot_tmp_path)?;

        let mut segment_seqs = BTreeSet::new();
        let mut index_seqs = BTreeSet::new();
        let names = fs
            .list_dir(&segments_dir)
            .map_err(|e| LogError::io("list", &segments_dir, e))?;
        for name in names {
            match parse_segments_dir_entry(&name) {
                Some(SegmentsDirEntry::Segment(seq)) => {
                    segment_seqs.insert(seq);
                }
                Some(SegmentsDirEntry::Index(seq)) => {
                    index_seqs.insert(seq);
                }
                // An index write a crash cut short; sealing writes it again.
                Some(SegmentsDirEntry::IndexTmp) => {
                    remove_if_present(&*fs, &segments_dir.join(&name))?
                }
                // Not ours: leave it alone.
                None => {}
            }
        }
        for &seq in index_seqs.difference(&segment_seqs) {
            // Left by a crash between removing a segment and its index.
            remove_if_present(&*fs, &segments_dir.join(index_file_name(seq)))?;
        }
        // What the directory proves durable besides the last segment's own
        // records: nothing it covers may be taken for a torn write.
        let mut mark = snapshot_mark(&*fs, &snapshot_path);

        // Whatever directory entries are here now must stay: a previous run
        // may have created a segment and died (or failed) before it fsynced
        // the directory, and records are about to be added to that segment.
        for dir in [&config.dir, &segments_dir] {
            fs.sync_dir(dir)
                .map_err(|e| LogError::io("fsync the directory", dir, e))?;
        }
        let mut metrics = LogMetrics {
            fsyncs: 2,
            ..LogMetrics::default()
        };
        let mut damage = Vec::new();
        let Some(&last_seq) = segment_seqs.last() else {
            let log = Log::create_fresh(
                config,
                fs,
                segments_dir,
                snapshot_path,
                snapshot_tmp_path,
                metrics,
            )?;
            return Ok((log, damage));
        };
        let firsts: Vec<Seq> = segment_seqs.iter().copied().collect();
        let mut sealed = Vec::with_capacity(firsts.len());
        let mut max_timestamp = 0;
        for pair in firsts.windows(2) {
            let segment = load_sealed(
                &*fs,
                &segments_dir,
                pair[0],
                pair[1],
                &config,
                max_timestamp,
                &mut damage,
            )?;
            max_timestamp = segment.max_timestamp;
            sealed.push(segment);
        }

        // The last segment: scanned whole, its torn tail cut off.
        let path = segments_dir.join(segment_file_name(last_seq));
        let mut active_file = fs
            .open(&path, OpenMode::Append)
            .map_err(|e| LogError::io("open", &path, e))?;
        if index_seqs.contains(&last_seq) {
            // Written by a roll that did not complete: an index describes
            // only a sealed segment. What it describes was fsynced first,
            // so it is a durable mark.
            let index_path = segments_dir.join(index_file_name(last_seq));
            if let Some(next_seq) = index_next_seq(&*fs, &index_path, last_seq) {
                let by_index = DurableMark {
                    next_seq,
                    proof: format!(
                        "its index file {} records seqs up to {}",
                        index_path.display(),
                        next_seq.saturating_sub(1)
                    ),
                };
                if mark.as_ref().is_none_or(|m| m.next_seq < next_seq) {
                    mark = Some(by_index);
                }
            }
            remove_if_present(&*fs, &index_path)?;
        }
        let file_len = active_file
            .size()
            .map_err(|e| LogError::io("read the size of", &path, e))?;
        let scanned = scan_segment(
            &*active_file,
            &path,
            last_seq,
            file_len,
            config.index_every_records,
            max_timestamp,
            true,
            None,
        )
        .map_err(|e| LogError::io("read", &path, e))?;
        let mut active = match mark {
            Some(mark) if scanned.segment.next_seq < mark.next_seq => {
                // Not a torn write: durable records are gone. Nothing is
                // cut; the segment is sealed as it is and a new one starts
                // at the mark, so no lost seq is issued again.
                let lost = scanned.segment.next_seq..mark.next_seq;
                metrics.records_lost += lost.end - lost.start;
                damage.extend(
                    scanned
                        .damage
                        .into_iter()
                        .filter(|d| !matches!(d, Damage::TornTail { .. })),
                );
                let (segment, file) = seal_short_segment(
                    &*fs,
                    &segments_dir,
                    &path,
                    scanned.segment,
                    file_len,
                    mark,
                    &mut damage,
                )?;
                active_file = file;
                metrics.fsyncs += 3;
                let active = Segment::empty(segment.next_seq, segment.max_timestamp);
                sealed.push(segment);
                active
            }
            _ => {
                if let Some(at) = scanned.torn_at {
                    active_file
                        .set_len(at)
                        .map_err(|e| LogError::io("truncate the torn tail of", &path, e))?;
                    // Durable before new records go after it, so a crash
                    // cannot bring the torn bytes back between them.
                    active_file
                        .sync_data()
                        .map_err(|e| LogError::io("fsync", &path, e))?;
                    metrics.torn_tails_truncated += 1;
                    metrics.fsyncs += 1;
                }
                damage.extend(scanned.damage);
                scanned.segment
            }
        };
        reconcile_boundaries(&segments_dir, &mut sealed, &mut active, &mut damage);
        metrics.records_lost += damage
            .iter()
            .map(|d| match d {
                Damage::MissingRecords { .. } => d.lost_seqs().end - d.lost_seqs().start,
                _ => 0,
            })
            .sum::<u64>();
        metrics.corrupt_records_found = damage
            .iter()
            .filter(|d| matches!(d, Damage::CorruptRecord { .. }))
            .count() as u64;

        let mark = Mark::of(&active);
        let log = Log {
            config,
            fs,
            segments_dir,
            snapshot_path,
            snapshot_tmp_path,
            sealed,
            active,
            active_file,
            pending: Vec::new(),
            written: mark,
            durable: mark,
            dir_sync_pending: false,
            last_fsync: None,
            gate: Arc::default(),
            sync_in_flight: false,
            rollbacks: 0,
            poisoned: None,
            reader: None,
            readahead: ReadAhead::default(),
            damage: Vec::new(),
            metrics,
        };
        Ok((log, damage))
    }

    /// A directory without segments: start one. If a snapshot is there, the
    /// segments it summarised were removed by hand; start after it so no seq
    /// it covers is issued again.
    fn create_fresh(
        config: LogConfig,
        fs: Arc<dyn FileSystem>,
        segments_dir: PathBuf,
        snapshot_path: PathBuf,
        snapshot_tmp_path: PathBuf,
        metrics: LogMetrics,
    ) -> Result<Log, LogError> {
        let first_seq = match read_snapshot(&*fs, &snapshot_path) {
            Ok(Some((covers, _))) => covers.saturating_add(1).max(1),
            Ok(None) | Err(_) => 1,
        };
        let path = segments_dir.join(segment_file_name(first_seq));
        let active_file = fs
            .open(&path, OpenMode::Create)
            .map_err(|e| LogError::io("create", &path, e))?;
        fs.sync_dir(&segments_dir)
            .map_err(|e| LogError::io("fsync the directory", &segments_dir, e))?;
        let active = Segment::empty(first_seq, 0);
        let mark = Mark::of(&active);
        Ok(Log {
            config,
            fs,
            segments_dir,
            snapshot_path,
            snapshot_tmp_path,
            sealed: Vec::new(),
            active,
            active_file,
            pending: Vec::new(),
            written: mark,
            durable: mark,
            dir_sync_pending: false,
            last_fsync: None,
            gate: Arc::default(),
            sync_in_flight: false,
            rollbacks: 0,
            poisoned: None,
            reader: None,
            readahead: ReadAhead::default(),
            damage: Vec::new(),
            metrics: LogMetrics {
                fsyncs: metrics.fsyncs + 1,
                ..metrics
            },
        })
    }

    /// Appends a record and returns its seq. The record is buffered (or
    /// written), not durable: call [`Log::sync`]. On error the record was not
    /// appended, and earlier unsynced records may have been discarded too
    /// (see the type's failure contract and [`Log::next_seq`]).
    pub fn append(
        &mut self,
        kind: RecordKind,
        timestamp: u64,
        body: &[u8],
    ) -> Result<Seq, LogError> {
        self.check_poisoned()?;
        if body.len() > self.config.record_bytes_max as usize {
            return Err(LogError::RecordTooLarge {
                len: body.len(),
                max: self.config.record_bytes_max,
            });
        }
        let record_len = (RECORD_HEADER_BYTES + body.len()) as u64;
        if self.active.next_seq > self.active.first_seq
            && self.active.bytes + record_len > self.config.segment_bytes_max
        {
            self.roll()?;
        }
        if !self.pending.is_empty()
            && self.pending.len() as u64 + record_len > PENDING_BYTES_MAX as u64
        {
            self.flush()?;
        }
        let seq = self.active.next_seq;
        let offset = self.active.bytes;
        let start = self.pending.len();
        encode_record(&mut self.pending, kind, seq, timestamp, body);
        // Pair assertion: what goes to disk must decode back to what the
        // caller gave, checksum included, or it is not written at all.
        let encoded_ok = match check_record(&self.pending[start..]) {
            Ok(header) => {
                header.seq == seq
                    && header.kind == kind
                    && header.timestamp == timestamp
                    && header.total_len == record_len
                    && self.pending[start + RECORD_HEADER_BYTES..] == *body
            }
            Err(_) => false,
        };
        if !encoded_ok {
            self.pending.truncate(start);
            return Err(LogError::Bug {
                reason: format!("record {seq} does not decode back to what was appended"),
            });
        }
        self.active.push_record(
            offset,
            record_len,
            seq,
            timestamp,
            self.config.index_every_records,
        );
        self.metrics.appends += 1;
        Ok(seq)
    }

    /// Makes every append so far durable per the [`FsyncPolicy`]: `Always`
    /// writes and fdatasyncs; `Interval` writes, and fdatasyncs if the last
    /// fsync is older than the interval; `Never` only writes. A no-op when
    /// there is nothing new. On error nothing new is durable, and records
    /// were discarded as the type's failure contract says.
    pub fn sync(&mut self) -> Result<(), LogError> {
        self.check_poisoned()?;
        let fsync_due = self.fsync_due();
        let unsynced = self.written != self.durable;
        if self.pending.is_empty() && !self.dir_sync_pending && !(unsynced && fsync_due) {
            return Ok(());
        }
        self.metrics.syncs += 1;
        self.flush()?;
        if self.dir_sync_pending {
            self.sync_segments_dir()?;
        }
        if fsync_due && self.written != self.durable {
            self.fsync_active()?;
        }
        Ok(())
    }

    /// Like [`Log::sync`], but leaves the fdatasync, the slow part, to the
    /// caller: writes the buffer to the OS and, when the policy wants an
    /// fsync, returns it as a [`PendingSync`] to [`run`](PendingSync::run)
    /// anywhere and hand back to [`Log::finish_sync`]; appends may go on
    /// meanwhile. `Ok(None)`: every append so far is already durable per
    /// the policy. One may be out at a time.
    pub fn begin_sync(&mut self) -> Result<Option<PendingSync>, LogError> {
        self.check_poisoned()?;
        if self.sync_in_flight {
            return Err(LogError::Bug {
                reason: "a sync was begun while another is out".to_string(),
            });
        }
        let fsync_due = self.fsync_due();
        let unsynced = self.written != self.durable;
        if self.pending.is_empty() && !self.dir_sync_pending && !(unsynced && fsync_due) {
            return Ok(None);
        }
        self.metrics.syncs += 1;
        self.flush()?;
        if self.dir_sync_pending {
            self.sync_segments_dir()?;
        }
        if !fsync_due || self.written == self.durable {
            return Ok(None);
        }
        let Ok(file) = self.active_file.try_clone() else {
            // A file that cannot be shared is synced here and now.
            self.fsync_active()?;
            return Ok(None);
        };
        self.sync_in_flight = true;
        Ok(Some(PendingSync {
            file,
            gate: Arc::clone(&self.gate),
            segment: self.active.first_seq,
            mark: self.written,
            rollbacks: self.rollbacks,
            path: self.active_path(),
        }))
    }

    /// Takes the result of a [`PendingSync`] begun by this log. `Ok`: the
    /// records below [`PendingSync::covers`] are durable. On error nothing
    /// new is durable, and if the fsync failed on the active segment,
    /// everything since the last successful fsync is discarded, as after a
    /// failed [`Log::sync`]. A sync begun before records were discarded
    /// (after some other failure, or by another log) fails: what it covered
    /// may be gone.
    pub fn finish_sync(
        &mut self,
        pending: PendingSync,
        result: io::Result<()>,
    ) -> Result<(), LogError> {
        if !Arc::ptr_eq(&pending.gate, &self.gate) {
            return Err(LogError::Bug {
                reason: "a sync was finished by a log that did not begin it".to_string(),
            });
        }
        self.sync_in_flight = false;
        let failed = lock_gate(&self.gate).failed.take();
        if pending.rollbacks != self.rollbacks {
            return Err(LogError::io(
                "fsync",
                &pending.path,
                io::Error::other(
                    "records it covered were discarded after another write or fsync failed",
                ),
            ));
        }
        let still_active = pending.segment == self.active.first_seq;
        match (result, failed) {
            (Ok(()), None) => {
                self.metrics.fsyncs += 1;
                self.last_fsync = Some(self.config.clock.now());
                if still_active && pending.mark.next_seq > self.durable.next_seq {
                    self.durable = pending.mark;
                }
                // Otherwise the segment was sealed meanwhile, and sealing
                // fsynced it whole.
                Ok(())
            }
            (Err(e), _) => Err(self.fsync_failed(&pending, still_active, e)),
            (Ok(()), Some(reason)) => {
                Err(self.fsync_failed(&pending, still_active, io::Error::other(reason)))
            }
        }
    }

    fn fsync_failed(
        &mut self,
        pending: &PendingSync,
        still_active: bool,
        e: io::Error,
    ) -> LogError {
        self.metrics.fsync_errors += 1;
        let error = LogError::io("fsync", &pending.path, e);
        if still_active {
            self.roll_back_to(self.durable, true);
        }
        // A sealed segment was fsynced whole by the seal, which would have
        // failed had this fsync's failure come first; its records stay,
        // but nothing is reported durable by this sync.
        error
    }

    fn fsync_due(&self) -> bool {
        match self.config.fsync {
            FsyncPolicy::Always => true,
            FsyncPolicy::Interval(interval) => self
                .last_fsync
                .is_none_or(|last| self.config.clock.now().duration_since(last) >= interval),
            FsyncPolicy::Never => false,
        }
    }

    /// Reads the record `seq`, checking its checksum. `None` if it was
    /// removed or never written; [`LogError::Corrupt`] if it is damaged.
    pub fn read(&mut self, seq: Seq) -> Result<Option<Record>, LogError> {
        if seq < self.first_seq() || seq >= self.next_seq() {
            return Ok(None);
        }
        let pos = self.position_of(seq);
        if let Some(damaged) = self.segment(pos).damaged_containing(seq) {
            return Err(self.corrupt_error(pos, damaged));
        }
        // Read ahead no further than the records this walk can visit.
        let segment = self.segment(pos);
        let fill_end = segment
            .entry_after(segment.start_for(seq).0)
            .map_or(u64::MAX, |entry| entry.offset);
        let mut found = None;
        self.walk_segment(pos, seq, fill_end, &mut |record| {
            found = Some(record);
            ControlFlow::Break(())
        })?;
        match found {
            Some(record) if record.seq == seq => Ok(Some(record)),
            _ => Err(LogError::Bug {
                reason: format!("seq {seq} belongs to a segment but was not found in it"),
            }),
        }
    }

    /// Hands every record from `from` on to `f`, in seq order, until `f`
    /// breaks or the log ends. Stops with [`LogError::Corrupt`] at damage
    /// (whose `resume_seq` says where to go on) rather than skipping it.
    pub fn scan(
        &mut self,
        from: Seq,
        f: &mut dyn FnMut(Record) -> ControlFlow<()>,
    ) -> Result<(), LogError> {
        let from = from.max(self.first_seq());
        if from >= self.next_seq() {
            return Ok(());
        }
        let mut pos = self.position_of(from);
        while pos <= self.sealed.len() {
            if self.walk_segment(pos, from, u64::MAX, f)? {
                return Ok(());
            }
            pos += 1;
        }
        Ok(())
    }

    /// The first seq whose timestamp is at least `timestamp`, or
    /// `next_seq()` if there is none. Exact whatever order timestamps came
    /// in: index entries carry the running maximum, so a binary search
    /// finds where to start and a short scan the record. If damage stands
    /// between, the first damaged seq is returned (starting a replay there
    /// errs on the side of too early).
    pub fn seq_at_time(&mut self, timestamp: u64) -> Result<Seq, LogError> {
        let count = self.sealed.len() + 1;
        let pos = partition_point(count, |pos| self.segment(pos).max_timestamp < timestamp);
        if pos == count {
            return Ok(self.next_seq());
        }
        let segment = self.segment(pos);
        let entries_before = segment
            .index
            .partition_point(|entry| entry.max_timestamp < timestamp);
        let start = match entries_before
            .checked_sub(1)
            .and_then(|i| segment.index.get(i))
        {
            Some(entry) => entry.seq,
            None => segment.first_seq,
        };
        let mut answer = None;
        let result = self.scan(start, &mut |record| {
            if record.timestamp >= timestamp {
                answer = Some(record.seq);
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        });
        match result {
            Ok(()) => Ok(answer.unwrap_or(self.next_seq())),
            Err(LogError::Corrupt { seq, .. }) => Ok(answer.unwrap_or(seq)),
            Err(e) => Err(e),
        }
    }

    /// Reads every record from `first_seq()` on, checking checksums, going
    /// on past damage. Returns the number of intact records; damage found
    /// for the first time is reported through [`Log::take_damage`].
    pub fn verify(&mut self) -> Result<u64, LogError> {
        let mut intact = 0;
        let mut from = self.first_seq();
        loop {
            match self.scan(from, &mut |_| {
                intact += 1;
                ControlFlow::Continue(())
            }) {
                Ok(()) => return Ok(intact),
                Err(LogError::Corrupt { resume_seq, .. }) if resume_seq > from => from = resume_seq,
                Err(e) => return Err(e),
            }
        }
    }

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

    /// Deletes the sealed segments (oldest first) whose records all have a
    /// seq below `seq`; never the active segment. Returns the bytes freed
    /// (segment and index files).
    pub fn remove_segments_before(&mut self, seq: Seq) -> Result<u64, LogError> {
        let mut freed = 0;
        let mut removed = 0;
        let mut result = Ok(());
        for segment in &self.sealed {
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
        let count = self
            .sealed
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
    pub fn begin_snapshot(&mut self, covers: Seq, bytes: &[u8]) -> Result<SnapshotWrite, LogError> {
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
            encoded: encode_snapshot(covers, bytes),
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
        if snapshot.covers >= self.durable.next_seq {
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
        if covers >= self.durable.next_seq {
            self.make_all_durable()?;
        }
        let encoded = encode_snapshot(covers, bytes);
        let tmp = self.snapshot_tmp_path.clone();
        let result = write_file_durably(&*self.fs, &tmp, &encoded).and_then(|()| {
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

    /// Writes the pending records to the active file (one write). On error
    /// they are discarded and the file cut back to what was written before.
    fn flush(&mut self) -> Result<(), LogError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        match self.active_file.append(&self.pending) {
            Ok(()) => {
                self.metrics.bytes_written += self.pending.len() as u64;
                self.pending.clear();
                self.written = Mark::of(&self.active);
                Ok(())
            }
            Err(e) => {
                self.metrics.write_errors += 1;
                let error = LogError::io("write", &self.active_path(), e);
                self.roll_back_to(self.written, false);
                Err(error)
            }
        }
    }

    /// Writes and fdatasyncs every record appended so far, whatever the
    /// policy.
    fn make_all_durable(&mut self) -> Result<(), LogError> {
        self.check_poisoned()?;
        self.flush()?;
        if self.dir_sync_pending {
            self.sync_segments_dir()?;
        }
        if self.written != self.durable {
            self.fsync_active()?;
        }
        Ok(())
    }

    /// fdatasync of the active file; on error, everything since the last
    /// successful one is discarded.
    fn fsync_active(&mut self) -> Result<(), LogError> {
        let gate = Arc::clone(&self.gate);
        let mut gate = lock_gate(&gate);
        // A failure of an fsync run outside the log counts as this one's:
        // the pages it could not write may be marked clean by now.
        let result = match gate.failed.take() {
            Some(reason) => Err(io::Error::other(reason)),
            None => self.active_file.sync_data(),
        };
        drop(gate);
        match result {
            Ok(()) => {
                self.metrics.fsyncs += 1;
                self.durable = self.written;
                self.last_fsync = Some(self.config.clock.now());
                Ok(())
            }
            Err(e) => {
                self.metrics.fsync_errors += 1;
                let error = LogError::io("fsync", &self.active_path(), e);
                self.roll_back_to(self.durable, true);
                Err(error)
            }
        }
    }

    /// Makes the new active segment's directory entry durable; until then
    /// none of its records is. On error they are discarded like after a
    /// failed fsync, and the next sync tries again.
    fn sync_segments_dir(&mut self) -> Result<(), LogError> {
        match self.fs.sync_dir(&self.segments_dir) {
            Ok(()) => {
                self.metrics.fsyncs += 1;
                self.dir_sync_pending = false;
                Ok(())
            }
            Err(e) => {
                self.metrics.fsync_errors += 1;
                let error = LogError::io("fsync the directory", &self.segments_dir, e);
                self.roll_back_to(self.durable, true);
                Err(error)
            }
        }
    }

    fn sync_dir_counted(&mut self, dir: &Path) -> Result<(), LogError> {
        match self.fs.sync_dir(dir) {
            Ok(()) => {
                self.metrics.fsyncs += 1;
                Ok(())
            }
            Err(e) => {
                self.metrics.fsync_errors += 1;
                Err(LogError::io("fsync the directory", dir, e))
            }
        }
    }

    /// Forgets everything after `mark` in memory and cuts the file back to
    /// it. If the file cannot be cut back, it holds bytes the log no longer
    /// knows, so the log refuses writes until reopened (open repairs it).
    fn roll_back_to(&mut self, mark: Mark, after_failed_fsync: bool) {
        self.pending.clear();
        self.readahead.invalidate(self.active.first_seq);
        self.metrics.records_discarded += self.active.next_seq - mark.next_seq;
        mark.restore(&mut self.active);
        self.written = mark;
        if after_failed_fsync {
            self.durable = mark;
            self.rollbacks += 1;
        }
        let path = self.active_path();
        let gate = Arc::clone(&self.gate);
        let cut = self.active_file.set_len(mark.bytes).and_then(|()| {
            // After a failed fsync, make the cut durable too, so a crash
            // cannot bring back records whose seqs are about to be reissued.
            if after_failed_fsync {
                let mut gate = lock_gate(&gate);
                // What an outside fsync failed on is cut off here.
                gate.failed = None;
                self.active_file.sync_data()
            } else {
                Ok(())
            }
        });
        if let Err(e) = cut {
            self.poisoned = Some(format!(
                "after a failed write, {} could not be cut back to {} bytes ({e})",
                path.display(),
                mark.bytes
            ));
        }
    }

    /// Seals the full active segment and starts the next one: the segment
    /// is fsynced (whatever the policy, so sealed segments are immutable and
    /// whole), its index written (temporary file, fsync, rename, directory
    /// fsync), then the new segment file created and its directory entry
    /// fsynced.
    fn roll(&mut self) -> Result<(), LogError> {
        self.flush()?;
        if self.dir_sync_pending {
            self.sync_segments_dir()?;
        }
        if self.written != self.durable {
            self.fsync_active()?;
        }
        if self.active.next_seq == self.active.first_seq {
            // Everything was discarded: nothing to seal.
            return Ok(());
        }
        let index_bytes = write_index(&*self.fs, &self.segments_dir, &self.active)?;
        self.metrics.fsyncs += 2;
        let next_first = self.active.next_seq;
        let path = self.segments_dir.join(segment_file_name(next_first));
        let new_file = self
            .fs
            .open(&path, OpenMode::Create)
            .map_err(|e| LogError::io("create", &path, e))?;
        let max_timestamp = self.active.max_timestamp;
        let mut sealed =
            std::mem::replace(&mut self.active, Segment::empty(next_first, max_timestamp));
        sealed.sealed = true;
        sealed.index_bytes = index_bytes;
        self.sealed.push(sealed);
        self.active_file = new_file;
        self.written = Mark::of(&self.active);
        self.durable = self.written;
        self.metrics.segments_sealed += 1;
        // From here on the new segment is the active one; if its directory
        // entry cannot be made durable now, `sync` keeps trying before it
        // claims any of its records durable.
        self.dir_sync_pending = true;
        self.sync_segments_dir()
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

    fn corrupt_error(&self, pos: usize, damaged: &Damaged) -> LogError {
        LogError::Corrupt {
            segment: self
                .segments_dir
                .join(segment_file_name(self.segment(pos).first_seq)),
            offset: damaged.offset,
            seq: damaged.seqs.start,
            resume_seq: damaged.seqs.end,
            reason: damaged.reason.clone(),
        }
    }

    /// Walks segment `pos` from the index entry at or before `from`, handing
    /// records from `from` on to `f`, reading ahead up to byte `fill_end`.
    /// `Ok(true)` if `f` broke off.
    fn walk_segment(
        &mut self,
        pos: usize,
        from: Seq,
        fill_end: u64,
        f: &mut dyn FnMut(Record) -> ControlFlow<()>,
    ) -> Result<bool, LogError> {
        let (mut offset, mut expected) = self.segment(pos).start_for(from);
        loop {
            let segment = self.segment(pos);
            if expected >= segment.next_seq {
                return Ok(false);
            }
            if let Some(damaged) = segment.damaged_at(offset) {
                if !damaged.seqs.is_empty() && damaged.seqs.end > from {
                    return Err(self.corrupt_error(pos, damaged));
                }
                if damaged.end_offset == offset && damaged.seqs.end <= expected {
                    return Err(LogError::Bug {
                        reason: format!("damaged range at byte {offset} makes no progress"),
                    });
                }
                offset = damaged.end_offset;
                expected = expected.max(damaged.seqs.end);
                continue;
            }
            match self.record_at(pos, offset, fill_end)? {
                Ok((record, len)) if record.seq == expected => {
                    offset += len;
                    expected += 1;
                    if record.seq >= from && f(record).is_break() {
                        return Ok(true);
                    }
                }
                Ok((record, _)) => {
                    let bad = Bad::Seq {
                        found: record.seq,
                        expected,
                    };
                    self.discover_damage(pos, offset, expected, bad)?;
                }
                Err(bad) => self.discover_damage(pos, offset, expected, bad)?,
            }
        }
    }

    /// The record at `offset` of segment `pos`, from the file or, for the
    /// active segment's unwritten tail, from the pending buffer.
    fn record_at(
        &mut self,
        pos: usize,
        offset: u64,
        fill_end: u64,
    ) -> Result<Result<(Record, u64), Bad>, LogError> {
        let is_active = pos == self.sealed.len();
        if is_active && offset >= self.written.bytes {
            let start = usize::try_from(offset - self.written.bytes).unwrap_or(usize::MAX);
            let Some(bytes) = self.pending.get(start..) else {
                return Ok(Err(Bad::Incomplete { need: 1, have: 0 }));
            };
            return Ok(match check_record(bytes) {
                Ok(header) => decode_record(bytes[..header.total_len as usize].to_vec()),
                Err(bad) => Err(bad),
            });
        }
        let (key, file_end) = {
            let segment = self.segment(pos);
            let end = if is_active {
                self.written.bytes
            } else {
                segment.bytes
            };
            (segment.first_seq, end)
        };
        // The path is only built when needed (a reader to open, an error to
        // report): reads are hot, and formatting a file name per record was
        // a third of a consuming broker's CPU.
        let segments_dir = &self.segments_dir;
        let path = || segments_dir.join(segment_file_name(key));
        let file = if is_active {
            &*self.active_file
        } else {
            open_reader(&*self.fs, &mut self.reader, key, &path)?
        };
        decode_at(&mut self.readahead, key, file, file_end, fill_end, offset)
            .map_err(|e| LogError::io("read", &path(), e))
    }

    /// A record that should be `expected` at `offset` is bad: find the next
    /// intact record (searching no further than the next index entry, a
    /// known-good record), remember the range between as damaged and report
    /// it. The walk that found it then meets the range and errs or skips it.
    fn discover_damage(
        &mut self,
        pos: usize,
        offset: u64,
        expected: Seq,
        bad: Bad,
    ) -> Result<(), LogError> {
        let is_active = pos == self.sealed.len();
        let (key, limit, limit_seq) = {
            let segment = self.segment(pos);
            let (end, end_seq) = if is_active {
                (self.written.bytes, self.written.next_seq)
            } else {
                (segment.bytes, segment.next_seq)
            };
            let (limit, limit_seq) = match segment.entry_after(offset) {
                Some(entry) if entry.offset <= end => (entry.offset, entry.seq),
                _ => (end, end_seq),
            };
            (segment.first_seq, limit, limit_seq.max(expected))
        };
        if is_active && offset >= self.written.bytes {
            return Err(LogError::Bug {
                reason: format!("appended record at byte {offset} does not decode: {bad}"),
            });
        }
        let path = self.segments_dir.join(segment_file_name(key));
        let found = {
            let file = if is_active {
                &*self.active_file
            } else {
                open_reader(&*self.fs, &mut self.reader, key, &|| path.clone())?
            };
            find_resync(file, offset + 1, limit, offset, expected, limit_seq)
                .map_err(|e| LogError::io("read", &path, e))?
        };
        let (end_offset, seqs_end) = found.unwrap_or((limit, limit_seq));
        let reason = bad.to_string();
        self.damage.push(Damage::CorruptRecord {
            segment: path,
            offset,
            bytes: end_offset - offset,
            seqs: expected..seqs_end,
            reason: reason.clone(),
        });
        self.metrics.corrupt_records_found += 1;
        self.segment_mut(pos).add_damaged(Damaged {
            offset,
            end_offset,
            seqs: expected..seqs_end,
            reason,
        });
        Ok(())
    }
}

/// `partition_point` over `0..count`.
fn partition_point(count: usize, mut pred: impl FnMut(usize) -> bool) -> usize {
    let (mut low, mut high) = (0, count);
    while low < high {
        let mid = low + (high - low) / 2;
        if pred(mid) {
            low = mid + 1;
        } else {
            high = mid;
        }
    }
    low
}

/// The cached handle on sealed segment `key`, opened if another one is
/// cached. A free function so callers can borrow other fields meanwhile.
fn open_reader<'a>(
    fs: &dyn FileSystem,
    cache: &'a mut Option<(Seq, Box<dyn LogFile>)>,
    key: Seq,
    path: &dyn Fn() -> PathBuf,
) -> Result<&'a dyn LogFile, LogError> {
    if cache.as_ref().is_none_or(|(cached, _)| *cached != key) {
        *cache = None;
        let path = path();
        let file = fs
            .open(&path, OpenMode::Read)
            .map_err(|e| LogError::io("open", &path, e))?;
        *cache = Some((key, file));
    }
    match cache {
        Some((_, file)) => Ok(&**file),
        None => Err(LogError::Bug {
            reason: "segment reader vanished".to_string(),
        }),
    }
}

/// Writes a sealed segment's index: temporary file, fsync, rename,
/// directory fsync, so the index is either whole or absent. Returns its size.
fn write_index(
    fs: &dyn FileSystem,
    segments_dir: &Path,
    segment: &Segment,
) -> Result<u64, LogError> {
    let bytes = encode_index(&segment.to_index());
    let name = index_file_name(segment.first_seq);
    let tmp = segments_dir.join(format!("{name}.tmp"));
    let path = segments_dir.join(name);
    let result = write_file_durably(fs, &tmp, &bytes)
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

/// A sealed segment from its index, or, if that is missing or bad, from a
/// scan (reported, and the index written again).
fn load_sealed(
    fs: &dyn FileSystem,
    segments_dir: &Path,
    first_seq: Seq,
    next_first_seq: Seq,
    config: &LogConfig,
    earlier_max_timestamp: u64,
    damage: &mut Vec<Damage>,
) -> Result<Segment, LogError> {
    let path = segments_dir.join(segment_file_name(first_seq));
    let file = fs
        .open(&path, OpenMode::Read)
        .map_err(|e| LogError::io("open", &path, e))?;
    let file_len = file
        .size()
        .map_err(|e| LogError::io("read the size of", &path, e))?;
    let index_path = segments_dir.join(index_file_name(first_seq));
    match read_index(fs, &index_path, first_seq, file_len) {
        Ok((index, index_bytes)) => Ok(Segment::from_index(
            index,
            earlier_max_timestamp,
            index_bytes,
        )),
        Err((offset, reason)) => {
            let scanned = scan_segment(
                &*file,
                &path,
                first_seq,
                file_len,
                config.index_every_records,
                earlier_max_timestamp,
                false,
                Some(next_first_seq),
            )
            .map_err(|e| LogError::io("read", &path, e))?;
            damage.push(Damage::IndexRebuilt {
                index: index_path,
                offset,
                reason,
            });
            damage.extend(scanned.damage);
            let mut segment = scanned.segment;
            segment.sealed = true;
            // Best effort: without it the next open scans this segment
            // again (and reports it again), which is slow, not wrong.
            if let Ok(index_bytes) = write_index(fs, segments_dir, &segment) {
                segment.index_bytes = index_bytes;
            }
            Ok(segment)
        }
    }
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

/// The last segment ends before `mark`: seals it as it is (no byte cut),
/// with an index of its intact records, reports the loss, and starts the
/// next segment at the mark. Returns the sealed segment (its lost seqs
/// read as damaged) and the new active file.
fn seal_short_segment(
    fs: &dyn FileSystem,
    segments_dir: &Path,
    path: &Path,
    mut segment: Segment,
    file_len: u64,
    mark: DurableMark,
    damage: &mut Vec<Damage>,
) -> Result<(Segment, Box<dyn LogFile>), LogError> {
    let intact_end = segment.bytes;
    let lost = segment.next_seq..mark.next_seq;
    damage.push(Damage::DurableRecordsLost {
        segment: path.to_path_buf(),
        offset: intact_end,
        bytes: file_len - intact_end,
        seqs: lost.clone(),
        mark: mark.proof.clone(),
    });
    // The index says where the intact records end; the next open finds
    // the lost seqs between this segment and the next and reports them
    // again, for as long as the segment is kept.
    segment.bytes = file_len;
    segment.sealed = true;
    segment.index_bytes = write_index(fs, segments_dir, &segment)?;
    segment.add_damaged(Damaged {
        offset: intact_end,
        end_offset: file_len,
        seqs: lost.clone(),
        reason: format!("records lost although {}", mark.proof),
    });
    segment.next_seq = mark.next_seq;
    let next_path = segments_dir.join(segment_file_name(mark.next_seq));
    let file = fs
        .open(&next_path, OpenMode::Create)
        .map_err(|e| LogError::io("create", &next_path, e))?;
    fs.sync_dir(segments_dir)
        .map_err(|e| LogError::io("fsync the directory", segments_dir, e))?;
    Ok((segment, file))
}

/// Each segment must end where the next begins. A gap means records are
/// missing; an overlap means two files claim the same seqs (the later one
/// wins). Both only happen when files were changed by hand or the disk
/// lost data; both are reported, and the missing seqs read as damaged.
pub(crate) fn reconcile_boundaries(
    segments_dir: &Path,
    sealed: &mut [Segment],
    active: &mut Segment,
    damage: &mut Vec<Damage>,
) {
    let mut next_firsts: Vec<Seq> = sealed.iter().skip(1).map(|s| s.first_seq).collect();
    next_firsts.push(active.first_seq);
    for (segment, next_first) in sealed.iter_mut().zip(next_firsts) {
        let path = segments_dir.join(segment_file_name(segment.first_seq));
        if segment.next_seq < next_first {
            let seqs = segment.next_seq..next_first;
            let reason = format!(
                "the segment ends before seq {} but the next one starts at seq {next_first}",
                segment.next_seq
            );
            damage.push(Damage::MissingRecords {
                segment: path,
                offset: segment.bytes,
                seqs: seqs.clone(),
                reason: reason.clone(),
            });
            segment.add_damaged(Damaged {
                offset: segment.bytes,
                end_offset: segment.bytes,
                seqs,
                reason,
            });
            segment.next_seq = next_first;
        } else if segment.next_seq > next_first {
            damage.push(Damage::MissingRecords {
                segment: path,
                offset: segment.bytes,
                seqs: next_first..segment.next_seq,
                reason: format!(
                    "the segment holds seqs up to {} but the next one starts at seq {next_first}; the next segment's records are used",
                    segment.next_seq - 1
                ),
            });
            segment.next_seq = next_first;
            segment.index.retain(|entry| entry.seq < next_first);
            segment.damaged.retain(|d| d.seqs.start < next_first);
            for damaged in &mut segment.damaged {
                damaged.seqs.end = damaged.seqs.end.min(next_first);
            }
        }
    }
}

/// Reads and checks the snapshot: `Ok(None)` if there is none; the error
/// says where and what is wrong with it.
fn read_snapshot(fs: &dyn FileSystem, path: &Path) -> Result<Option<(Seq, Bytes)>, (u64, String)> {
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
