//! Appends and syncs with their failure rules: the buffer, the fsync
//! gate, a sync split in two (`PendingSync`), segment rolls and what a
//! failed write or fsync takes back.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::error::LogError;
use crate::format::{check_record, encode_record, segment_file_name, RECORD_HEADER_BYTES};
use crate::fs::{LogFile, OpenMode};
use crate::segment::Segment;
use crate::{FsyncPolicy, RecordKind, Seq};

use super::files::write_index;
use super::*;

impl Log {
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

    pub(crate) fn fsync_failed(
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

    pub(crate) fn fsync_due(&self) -> bool {
        match self.config.fsync {
            FsyncPolicy::Always => true,
            FsyncPolicy::Interval(interval) => self
                .last_fsync
                .is_none_or(|last| self.config.clock.now().duration_since(last) >= interval),
            FsyncPolicy::Never => false,
        }
    }

    /// Writes the pending records to the active file (one write). On error
    /// they are discarded and the file cut back to what was written before.
    pub(crate) fn flush(&mut self) -> Result<(), LogError> {
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

    /// fdatasync of the active file; on error, everything since the last
    /// successful one is discarded.
    pub(crate) fn fsync_active(&mut self) -> Result<(), LogError> {
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
    pub(crate) fn sync_segments_dir(&mut self) -> Result<(), LogError> {
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

    pub(crate) fn sync_dir_counted(&mut self, dir: &Path) -> Result<(), LogError> {
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
    pub(crate) fn roll_back_to(&mut self, mark: Mark, after_failed_fsync: bool) {
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
    pub(crate) fn roll(&mut self) -> Result<(), LogError> {
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
}

/// What an fdatasync run outside the log ([`PendingSync::run`]) found, kept
/// until the log hears of it: by [`Log::finish_sync`], or by its own next
/// fsync of the file, which then fails too (a failed fsync may already have
/// dropped the pages, and a later one on the same file says `Ok` without
/// having written them).
#[derive(Debug, Default)]
pub(crate) struct FsyncGate {
    pub(crate) failed: Option<String>,
}

pub(crate) fn lock_gate(gate: &Mutex<FsyncGate>) -> MutexGuard<'_, FsyncGate> {
    gate.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// An fdatasync of the active segment taken out of the log by
/// [`Log::begin_sync`], so that the caller can run it ([`PendingSync::run`])
/// without holding whatever guards the log while others go on appending.
/// Its records count as durable only once [`Log::finish_sync`] accepted
/// the result.
pub struct PendingSync {
    pub(crate) file: Box<dyn LogFile>,
    pub(crate) gate: Arc<Mutex<FsyncGate>>,
    /// First seq of the segment it syncs.
    pub(crate) segment: Seq,
    pub(crate) mark: Mark,
    pub(crate) rollbacks: u64,
    pub(crate) path: PathBuf,
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
