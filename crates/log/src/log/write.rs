//! Appends and syncs with their failure rules: the buffer, the fsync
//! gate, a sync split in two (`PendingSync`) and what a failed write or
//! fsync takes back. Segment rolls and their seals are `seal.rs`.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::error::LogError;
use crate::format::{check_record, encode_record, RECORD_HEADER_BYTES};
use crate::fs::LogFile;
use crate::{FsyncPolicy, RecordKind, Seq};

use super::seal::run_seal;
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
        if self.pending.is_empty() && self.sealing.is_none() && !(unsynced && fsync_due) {
            return Ok(());
        }
        self.metrics.syncs += 1;
        self.flush()?;
        self.seal_in_place()?;
        if fsync_due && self.written != self.durable {
            self.fsync_active()?;
        }
        Ok(())
    }

    /// Like [`Log::sync`], but leaves the slow part to the caller: writes
    /// the buffer to the OS and, when the policy wants an fsync or a rolled
    /// segment waits for its seal (whatever the policy), returns them as a
    /// [`PendingSync`] to [`run`](PendingSync::run) anywhere and hand back
    /// to [`Log::finish_sync`]; appends may go on meanwhile. `Ok(None)`:
    /// every append so far is already durable per the policy. One may be
    /// out at a time.
    pub fn begin_sync(&mut self) -> Result<Option<PendingSync>, LogError> {
        self.check_poisoned()?;
        if self.sync_in_flight {
            return Err(LogError::Bug {
                reason: "a sync was begun while another is out".to_string(),
            });
        }
        // A seal an earlier job ran, whose sync was refused before its
        // outcome was taken.
        self.settle_seal()?;
        let fsync_due = self.fsync_due();
        let unsynced = self.written != self.durable;
        if self.pending.is_empty() && self.sealing.is_none() && !(unsynced && fsync_due) {
            return Ok(None);
        }
        self.metrics.syncs += 1;
        self.flush()?;
        let fsync = fsync_due && self.written != self.durable;
        if !fsync && self.sealing.is_none() {
            return Ok(None);
        }
        let file = if fsync {
            let Ok(file) = self.active_file.try_clone() else {
                // A file that cannot be shared is synced here and now.
                self.seal_in_place()?;
                self.fsync_active()?;
                return Ok(None);
            };
            Some(file)
        } else {
            None
        };
        self.sync_in_flight = true;
        Ok(Some(PendingSync {
            file,
            seal: Arc::clone(&self.seal),
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
    /// failed [`Log::sync`]; if the seal it ran failed, or the fsync failed
    /// on a segment rolled away from whose seal had not run, the roll's
    /// records are discarded as `docs/STORAGE.md` §6.2 says. A sync begun
    /// before records were discarded (after some other failure, or by
    /// another log) fails: what it covered may be gone.
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
        let failure = match (result, failed) {
            (Ok(()), None) => None,
            (Err(e), _) => Some(e),
            (Ok(()), Some(reason)) => Some(io::Error::other(reason)),
        };
        // The seal it ran comes first: no record past the sealed segment
        // is durable unless it finished, and if it failed, what it took
        // back is all there is to say.
        self.settle_seal()?;
        let Some(e) = failure else {
            if still_active && self.sealing.is_some() {
                return Err(LogError::Bug {
                    reason: "a sync was finished without having run the seal it carried"
                        .to_string(),
                });
            }
            if pending.file.is_some() {
                self.metrics.fsyncs += 1;
                self.last_fsync = Some(self.config.clock.now());
                if still_active && pending.mark.next_seq > self.durable.next_seq {
                    self.durable = pending.mark;
                } else if let Some(sealing) = self.sealing.as_mut() {
                    // The segment was rolled away from meanwhile and waits
                    // for its seal: what this fsync made durable stays, even
                    // if the seal's fsync fails.
                    if !still_active && pending.mark.next_seq > sealing.next_seq {
                        *sealing = pending.mark;
                    }
                }
            }
            return Ok(());
        };
        self.metrics.fsync_errors += 1;
        let error = LogError::io("fsync", &pending.path, e);
        if still_active {
            self.roll_back_to(self.durable, true);
        } else if self.sealing.is_some() {
            // The segment was rolled away from and its seal has not run:
            // the pages this fsync could not write may be gone, so the roll
            // is undone and the segment cut back as after a failed `sync`.
            self.undo_roll();
        }
        // Otherwise the segment was sealed meanwhile, and the seal fsynced
        // it whole (it would itself have failed had this failure come
        // first): its records stay, but nothing is reported durable by
        // this sync.
        Err(error)
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
    /// A second handle of the active segment, when the policy wants it
    /// fsynced.
    pub(crate) file: Option<Box<dyn LogFile>>,
    /// The log's waiting seal, if any: run first.
    pub(crate) seal: Arc<Mutex<Option<SealWork>>>,
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

    /// The slow part, needing no access to the log: the seal of a segment
    /// rolled away from, if one waits (its fdatasync, index file and
    /// directory fsync), then the fdatasync of the active segment. Waits
    /// for any fsync the log itself is running on the file.
    pub fn run(&mut self) -> io::Result<()> {
        if !run_seal(&self.seal, &self.gate) {
            // What failed is kept with the seal for `finish_sync`.
            return Err(io::Error::other("sealing the previous segment failed"));
        }
        let Some(file) = self.file.as_mut() else {
            return Ok(());
        };
        let mut gate = lock_gate(&self.gate);
        let result = file.sync_data();
        if let Err(e) = &result {
            gate.failed.get_or_insert_with(|| e.to_string());
        }
        result
    }
}
