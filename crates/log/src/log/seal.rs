//! Segment rolls. Under the caller's hand (in `append`) a roll only
//! switches appends to a new segment file; the sealed segment's fdatasync,
//! its index file and the directory fsync — the seal — wait for the next
//! sync, which runs them in place ([`Log::sync`]) or outside the log
//! ([`PendingSync::run`]). No record of the new segment is reported
//! durable before the seal finished, so a crash before then leaves at
//! most an unfinished roll for open to finish or undo.

use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::error::LogError;
use crate::format::{encode_index, segment_file_name};
use crate::fs::{FileSystem, LogFile, OpenMode};
use crate::segment::Segment;
use crate::Seq;

use super::files::{remove_if_present, write_index_bytes};
use super::write::{lock_gate, FsyncGate};
use super::*;

/// The seal of one segment, run by whoever syncs next; it stays with the
/// log (in its shared slot) until the log took its outcome.
pub(crate) struct SealWork {
    fs: Arc<dyn FileSystem>,
    segments_dir: PathBuf,
    path: PathBuf,
    first_seq: Seq,
    /// The segment's handle from when it was active.
    file: Box<dyn LogFile>,
    index: Vec<u8>,
    /// Its fdatasync succeeded (or every byte was durable at the roll).
    fsynced: bool,
    /// Successful fsyncs not yet counted in the log's metrics.
    fsyncs: u64,
    /// `None` until it ran (or while a failed index write waits to be
    /// tried again).
    outcome: Option<Result<u64, LogError>>,
}

impl SealWork {
    fn run(&mut self, gate: &Mutex<FsyncGate>) -> bool {
        if let Some(outcome) = &self.outcome {
            return outcome.is_ok();
        }
        let outcome = self.seal(gate);
        let ok = outcome.is_ok();
        self.outcome = Some(outcome);
        ok
    }

    fn seal(&mut self, gate: &Mutex<FsyncGate>) -> Result<u64, LogError> {
        if !self.fsynced {
            let gate = lock_gate(gate);
            // An fsync of this segment run outside the log failed: the
            // pages it could not write may be marked clean by now.
            if let Some(reason) = &gate.failed {
                return Err(LogError::io(
                    "fsync",
                    &self.path,
                    io::Error::other(reason.clone()),
                ));
            }
            self.file
                .sync_data()
                .map_err(|e| LogError::io("fsync", &self.path, e))?;
            drop(gate);
            self.fsynced = true;
            self.fsyncs += 1;
        }
        // Its directory fsync also makes the new segment's entry durable:
        // that file was created before this work was queued.
        let index_bytes =
            write_index_bytes(&*self.fs, &self.segments_dir, self.first_seq, &self.index)?;
        self.fsyncs += 2;
        Ok(index_bytes)
    }
}

fn lock_seal(seal: &Mutex<Option<SealWork>>) -> MutexGuard<'_, Option<SealWork>> {
    seal.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Runs the waiting seal, if any and not yet run; whether none failed.
pub(crate) fn run_seal(seal: &Mutex<Option<SealWork>>, gate: &Mutex<FsyncGate>) -> bool {
    lock_seal(seal).as_mut().is_none_or(|work| work.run(gate))
}

impl Log {
    /// Seals the full active segment and starts the next one. What runs
    /// here, under the caller's hand: the buffer written to the segment,
    /// the next segment file created (no fsync) and made the active one,
    /// the seal queued. A seal still waiting from the roll before is run
    /// here first, so at most one waits.
    pub(crate) fn roll(&mut self) -> Result<(), LogError> {
        self.seal_in_place()?;
        self.flush()?;
        if self.active.next_seq == self.active.first_seq {
            // Everything was discarded: nothing to seal.
            return Ok(());
        }
        let next_first = self.active.next_seq;
        let path = self.segments_dir.join(segment_file_name(next_first));
        let new_file = self
            .fs
            .open(&path, OpenMode::Create)
            .map_err(|e| LogError::io("create", &path, e))?;
        let index = encode_index(&self.active.to_index());
        let max_timestamp = self.active.max_timestamp;
        let sealed_path = self.active_path();
        let mut sealed =
            std::mem::replace(&mut self.active, Segment::empty(next_first, max_timestamp));
        sealed.sealed = true;
        let file = std::mem::replace(&mut self.active_file, new_file);
        *lock_seal(&self.seal) = Some(SealWork {
            fs: Arc::clone(&self.fs),
            segments_dir: self.segments_dir.clone(),
            path: sealed_path,
            first_seq: sealed.first_seq,
            file,
            index,
            fsynced: self.written == self.durable,
            fsyncs: 0,
            outcome: None,
        });
        self.sealing = Some(self.durable);
        self.sealed.push(sealed);
        self.written = Mark::of(&self.active);
        self.durable = self.written;
        self.metrics.segments_sealed += 1;
        Ok(())
    }

    /// Every record below this seq is durable.
    pub(crate) fn durable_next(&self) -> Seq {
        self.sealing
            .map_or(self.durable.next_seq, |sealing| sealing.next_seq)
    }

    /// Runs the waiting seal here and now, if any.
    pub(crate) fn seal_in_place(&mut self) -> Result<(), LogError> {
        if self.sealing.is_none() {
            return Ok(());
        }
        run_seal(&self.seal, &self.gate);
        self.settle_seal()
    }

    /// Takes in the outcome of the waiting seal, if it ran. A failed
    /// fdatasync undoes the roll (the sealed segment is cut back to its
    /// last durable mark and active again, the new segment removed); a
    /// failed index write or directory fsync, after the fdatasync
    /// succeeded, discards the new segment's records (its entry may not be
    /// durable) and leaves the seal to be run again.
    pub(crate) fn settle_seal(&mut self) -> Result<(), LogError> {
        if self.sealing.is_none() {
            return Ok(());
        }
        let mut slot = lock_seal(&self.seal);
        let Some(work) = slot.as_mut() else {
            return Ok(());
        };
        let Some(outcome) = work.outcome.take() else {
            return Ok(());
        };
        self.metrics.fsyncs += std::mem::take(&mut work.fsyncs);
        match outcome {
            Ok(index_bytes) => {
                *slot = None;
                drop(slot);
                if let Some(segment) = self.sealed.last_mut() {
                    segment.index_bytes = index_bytes;
                }
                self.sealing = None;
                Ok(())
            }
            Err(error) if work.fsynced => {
                drop(slot);
                self.metrics.fsync_errors += 1;
                self.roll_back_to(self.durable, true);
                Err(error)
            }
            Err(error) => {
                drop(slot);
                self.metrics.fsync_errors += 1;
                self.undo_roll();
                Err(error)
            }
        }
    }

    /// The waiting seal's segment could not be made durable: it becomes
    /// the active segment again, cut back to its last durable mark, and
    /// the segment rolled to is removed with its records (none of them
    /// was durable). If that file cannot be removed, the log refuses
    /// writes until reopened; open removes it.
    pub(crate) fn undo_roll(&mut self) {
        let Some(durable) = self.sealing.take() else {
            return;
        };
        let Some(work) = lock_seal(&self.seal).take() else {
            return;
        };
        let Some(mut segment) = self.sealed.pop() else {
            return;
        };
        let rolled_to = self.active_path();
        self.readahead.invalidate(self.active.first_seq);
        self.readahead.invalidate(segment.first_seq);
        if self
            .reader
            .as_ref()
            .is_some_and(|(key, _)| *key == segment.first_seq)
        {
            self.reader = None;
        }
        self.pending.clear();
        self.metrics.records_discarded += self.active.next_seq - segment.next_seq;
        self.metrics.segments_sealed = self.metrics.segments_sealed.saturating_sub(1);
        segment.sealed = false;
        segment.index_bytes = 0;
        self.active = segment;
        self.active_file = work.file;
        // The segment was written whole before the roll.
        self.written = Mark::of(&self.active);
        self.durable = durable;
        let removed = remove_if_present(&*self.fs, &rolled_to).and_then(|()| {
            self.fs
                .sync_dir(&self.segments_dir)
                .map_err(|e| LogError::io("fsync the directory", &self.segments_dir, e))
        });
        self.roll_back_to(durable, true);
        if let Err(e) = removed {
            self.poisoned = Some(format!(
                "a roll that failed could not be undone, {} remains ({e})",
                rolled_to.display()
            ));
        }
    }
}
