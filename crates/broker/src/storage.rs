//! Journaling delivery-state changes and handing actions over once what
//! they depend on is durable; what the broker does when its disk fails.

use super::*;

impl<S: MessageStore> Broker<S> {
    /// Appends a delivery-state change to the store's journal; returns
    /// its seq (0 if the write failed: the next sync then fails too and
    /// rebuilds the state).
    pub(crate) fn journal(&mut self, op: Op) -> Seq {
        if self.upstream {
            self.tell_upstream(op);
            return self.store.next_seq();
        }
        // Frozen: kept for the batch by reference count, not by a copy.
        let bytes = op.encode().freeze();
        if self.degraded {
            // The disk is failing: keep the change in memory, in order, and
            // write it when the disk works again (see `retry_storage`).
            if self.deferred_ops.len() < DEFERRED_JOURNAL_ENTRIES_MAX {
                self.deferred_ops.push(bytes);
            } else {
                self.metrics.journal_entries_dropped += 1;
            }
            return self.store.next_seq();
        }
        self.dirty = true;
        self.batch_structural |= op.is_structural();
        self.batch_ops.push(bytes.clone());
        match self.store.journal(&bytes) {
            Ok(seq) => seq,
            Err(e) => {
                self.alerts.push(format!("journal write failed: {e}"));
                0
            }
        }
    }

    /// While degraded, tries to write the deferred journal entries; on
    /// success the broker is back to normal.
    pub(crate) fn retry_storage(&mut self) {
        // Twice: a store may need a failed attempt to reopen its files.
        for _ in 0..2 {
            let written = self
                .deferred_ops
                .iter()
                .all(|op| self.store.journal(op).is_ok());
            if written && self.store.sync().is_ok() {
                let count = self.deferred_ops.len();
                self.deferred_ops.clear();
                self.degraded = false;
                // What a reopen of the store threw away on the way was no
                // batch's: nothing is stored while degraded.
                self.take_discarded();
                self.alerts.push(format!(
                    "storage works again; {count} deferred journal entries written"
                ));
                return;
            }
        }
    }

    /// Makes everything accepted so far durable, then hands over the actions
    /// produced since the last call. One call per batch of input is the
    /// group commit: all sends in the batch share one sync.
    pub fn take_actions(&mut self, out: &mut Vec<Action>) {
        let discarded = self.take_discarded();
        if self.dirty || !self.unsynced.is_empty() || self.durability_pending() {
            // Deliveries in `actions` wait for the sync too: nothing leaves
            // the broker before it is as durable as its acknowledgement says.
            // Records thrown away since the last look (a failed write) fail
            // the batch even if this sync succeeds.
            let synced = if discarded {
                Err(courier_store::StoreError::Io(
                    "records not yet durable were thrown away after a write failed".to_string(),
                ))
            } else {
                self.store.sync()
            };
            match synced {
                Ok(()) => {
                    self.dirty = false;
                    self.all_durable(out);
                    self.actions.append(&mut self.unsynced);
                }
                Err(error) => {
                    self.take_discarded();
                    self.unsynced_failed(error);
                }
            }
            self.batch_ops.clear();
            self.batch_ids.clear();
            self.batch_structural = false;
            self.batch_appended = false;
        }
        self.alerts.extend(self.store.take_reports());
        out.append(&mut self.actions);
    }

    /// A sync failed: whatever this batch wrote may be lost, so nothing of
    /// it is reported as done, and the state is rebuilt from what the store
    /// really holds instead of assuming a retry would succeed.
    pub(crate) fn storage_failed(&mut self, error: &courier_store::StoreError) {
        self.metrics.storage_failures += 1;
        self.degraded = true;
        self.dirty = false;
        if !self.batch_appended && !self.batch_structural {
            // Only delivery bookkeeping (delivered, acked, nacked) was lost:
            // the state in memory is right; write it again later. Nothing
            // else changes, so a failing disk cannot cause a redelivery loop.
            self.alerts.push(format!(
                "storage sync failed: {error}; delivery state is kept in memory until the disk works again"
            ));
            self.deferred_ops.append(&mut self.batch_ops);
            // Its answers stand, so do its ids.
            self.batch_ids.clear();
            self.actions.append(&mut self.unsynced);
            return;
        }
        // The batch's acceptances become refusals (a resend with the same
        // id is safe). On a backend that keeps delivery state, nothing is
        // rebuilt: its fetched messages' deliveries stand. Otherwise
        // nothing of the batch happened: its deliveries are dropped (the
        // message may not exist any more; the rebuilt state delivers again
        // whatever survived) and the seqs it used are issued again.
        let rebuild = !self.upstream;
        if rebuild {
            self.alerts.push(format!(
                "storage sync failed: {error}; refusing this batch and rebuilding state from the log"
            ));
            self.traces.clear();
            self.traces_bytes = 0;
        } else {
            self.alerts.push(format!(
                "storage sync failed: {error}; refusing this batch's sends and changes"
            ));
        }
        let reason = format!("not stored: {error}");
        let batch: Vec<Action> = self
            .actions
            .drain(..)
            .chain(self.unsynced.drain(..))
            .collect();
        for action in batch {
            match action {
                Action::SendResult {
                    conn, seq, code, ..
                } if code.is_ok() => self.actions.push(Action::SendResult {
                    conn,
                    seq,
                    code: ErrorCode::StorageFailed,
                    reason: reason.clone(),
                    log_seq: 0,
                }),
                Action::OpResult {
                    conn,
                    request,
                    code,
                    ..
                } if code.is_ok() => self.actions.push(Action::OpResult {
                    conn,
                    request,
                    code: ErrorCode::StorageFailed,
                    reason: reason.clone(),
                }),
                Action::Deliver { .. } if rebuild => {}
                other => self.actions.push(other),
            }
        }
        if !rebuild {
            // Refused, so not accepted: a resend is a new send.
            for id in std::mem::take(&mut self.batch_ids) {
                self.dedup.remove(&id);
            }
            self.batch_ops.clear();
            return;
        }
        self.batch_ids.clear();
        self.dirty = false;
        let now = self.now;
        if let Err(e) = self.rebuild(now) {
            self.alerts.push(format!(
                "rebuilding state after a storage failure failed too: {e}"
            ));
        }
    }
}
