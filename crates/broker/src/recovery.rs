//! Recovery: rebuilding the broker's state from the store after a restart
//! (or after a failed sync), and checkpoints that keep recovery short.
//!
//! The state is a fold over the log: a snapshot holds the fold up to some
//! seq; recovery loads it and replays the records after it — messages are
//! routed again to the services subscribed at that point, journal entries
//! are applied where they stood. Acks and nacks name messages by seq; while
//! replaying they are collected as marks and applied in one pass at the end,
//! which rebuilds each queue in seq order (per-key order included).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;
use courier_proto::{Kind, Message};
use courier_store::{MessageStore, RemovalJob, Replayed, Seq, SnapshotJob, StoreError};
use uuid::Uuid;

use crate::dedup::fingerprint;
use crate::journal::{JournalError, Op, Reader, Writer};
use crate::queue::{DeadLetter, Entry};
use crate::{Broker, Nanos, ReplyRoute, Service};

/// Records read per chunk while replaying; bounds recovery's extra memory.
/// Measured on a restart replaying 47k records of 1 KiB: with 4096 a
/// chunk, the broker's RSS was 49 MiB after recovery, 12 of them live (the
/// allocator kept the rest of the freed chunks' pages); with 256 it was
/// 14 MiB, and the replay took 81 instead of 115 ms (a chunk stays in cache).
const REPLAY_CHUNK_RECORDS: usize = 256;
const SNAPSHOT_MAGIC: &[u8; 4] = b"CRSN";
/// 6: each service's backlog bytes (payload bytes of its waiting
/// messages) after its dead letters; older snapshots are counted from
/// the messages once, at recovery.
/// 5: the service registry follows the reply routes, as a section tagged
/// `RGST` (its instances and their visible health; `registry.rs`).
/// 4: each service's paused patterns after its patterns. 3: queue entries
/// in runs of consecutive seqs (a count after each), and the dedup
/// window's ids in buckets by timestamp after those without one. Versions
/// 4, 3, 2 (fingerprints with their times only) and 1 (whole ids) still
/// load.
const SNAPSHOT_VERSION: u32 = 6;
const REGISTRY_SECTION: &[u8; 4] = b"RGST";

/// What recovery found, for the start-up log line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// The snapshot's last seq, if one was loaded.
    pub snapshot_covers: Option<Seq>,
    pub records_replayed: u64,
    pub messages_replayed: u64,
    /// Journal entries that could not be decoded (reported, skipped).
    pub bad_journal_entries: u64,
    pub services: usize,
    /// Messages waiting across all services.
    pub backlog: usize,
    pub dead_letters: usize,
}

/// Marks collected while replaying, per service, applied when the replay
/// ends.
type Marks = HashMap<String, ServiceMarks>;

#[derive(Default)]
struct ServiceMarks {
    /// Acked or dead-lettered: not in the queue any more.
    removed: HashSet<Seq>,
    /// Delivery attempts begun.
    attempts: HashMap<Seq, u32>,
    /// Nacked: not before this time.
    until: HashMap<Seq, Nanos>,
}

impl ServiceMarks {
    fn is_empty(&self) -> bool {
        self.removed.is_empty() && self.attempts.is_empty() && self.until.is_empty()
    }
}

impl<S: MessageStore> Broker<S> {
    /// Loads the newest snapshot and replays the log after it. Call once,
    /// before any connection.
    pub fn recover(&mut self, now: Nanos) -> Result<RecoveryReport, StoreError> {
        self.now = now;
        let mut report = RecoveryReport::default();
        let mut after = 0;
        if let Some((covers, bytes)) = self.store.load_snapshot()? {
            match self.restore_snapshot(bytes) {
                Ok(()) => {
                    after = covers;
                    report.snapshot_covers = Some(covers);
                }
                Err(e) => {
                    // Replaying the whole log gives the same state, slower.
                    self.alerts.push(format!(
                        "snapshot unreadable ({e}); replaying the whole log"
                    ));
                    self.clear_state();
                }
            }
        }
        let mut marks = Marks::default();
        // Payload sizes of the messages replayed into queues, in seq
        // order: what settling the marks takes off the backlog bytes
        // without reading the messages again.
        let mut sizes: Vec<(Seq, u32)> = Vec::new();
        // About how much log lies after the snapshot (record framing not
        // counted): what the next checkpoint-by-growth starts from.
        let mut replayed_bytes: u64 = 0;
        loop {
            let chunk = self.store.replay_chunk(after, REPLAY_CHUNK_RECORDS)?;
            let Some((last, _)) = chunk.last() else { break };
            after = *last;
            for (seq, record) in chunk {
                report.records_replayed += 1;
                match record {
                    Replayed::Message(message) => {
                        report.messages_replayed += 1;
                        replayed_bytes += courier_proto::encoded_message_len(&message) as u64;
                        if self.replay_message(seq, &message, now) {
                            let size = u32::try_from(message.payload.len()).unwrap_or(u32::MAX);
                            sizes.push((seq, size));
                        }
                    }
                    Replayed::State(bytes) => {
                        replayed_bytes += bytes.len() as u64;
                        match Op::decode(bytes) {
                            Ok(op) => self.replay_op(seq, op, &mut marks, now),
                            Err(e) => {
                                report.bad_journal_entries += 1;
                                self.alerts
                                    .push(format!("journal entry {seq} unreadable: {e}"));
                            }
                        }
                    }
                }
            }
        }
        let lost = self.store.lost_records();
        self.metrics.records_lost = lost.iter().map(|seqs| seqs.end - seqs.start).sum();
        self.settle_marks(marks, &lost, &sizes, now);
        drop(sizes);
        if let Some(covers) = report.snapshot_covers {
            // The snapshot on disk is as good as one taken now, but for
            // what was replayed: no checkpoint is due at once (taking one
            // at every start cost a snapshot's worth of memory and I/O).
            self.checkpointed_at = covers + 1;
            self.checkpointed_bytes = (self.store.len() as u64).saturating_sub(replayed_bytes);
        }
        self.alerts.extend(self.store.take_reports());
        self.dedup.expire(self.wall(now));
        self.reply_routes.expire(now);
        report.services = self.services.len();
        report.backlog = self.services.values().map(|s| s.queue.depth()).sum();
        report.dead_letters = self
            .services
            .values()
            .map(|s| s.queue.dead_letters.len())
            .sum();
        Ok(report)
    }

    /// After a failed sync: forget the in-memory state, recover it from the
    /// store, and re-attach the live connections (their in-flight deliveries
    /// are void; those messages are delivered again).
    pub(crate) fn rebuild(&mut self, now: Nanos) -> Result<RecoveryReport, StoreError> {
        // Flow-controlled streams live with live connections, not in the
        // log: they are kept as they are (held replies included).
        let streaming: Vec<(Uuid, Nanos)> = self
            .reply_routes
            .iter()
            .filter(|(_, route, _)| route.stream.is_some())
            .map(|(command, _, t)| (*command, t))
            .collect();
        let streams: Vec<(Uuid, ReplyRoute, Nanos)> = streaming
            .into_iter()
            .filter_map(|(command, t)| Some((command, self.reply_routes.remove(&command)?, t)))
            .collect();
        // A pipelined receiver may go on to the next deliveries of a key
        // whose earlier ones this rebuild voids: it must go, as if crashed.
        let mut pipelined: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| c.pipelined_keys && c.in_flight > 0)
            .map(|(id, _)| *id)
            .collect();
        pipelined.sort_unstable();
        self.clear_state();
        let report = self.recover(now);
        for (command, route, t) in streams {
            if let Some((old, evicted)) = self.reply_routes.insert(command, route, t) {
                if let Some(stream) = evicted.stream {
                    self.expire_stream(
                        old,
                        stream,
                        "was forgotten: too many commands await replies",
                    );
                }
            }
        }
        let report = report?;
        let mut conns: Vec<(u64, String)> = self
            .conns
            .iter()
            .map(|(id, c)| (*id, c.service.to_string()))
            .collect();
        conns.sort_unstable();
        for (id, service) in conns {
            if let Some(c) = self.conns.get_mut(&id) {
                c.in_flight = 0;
            }
            let config = &self.config;
            let svc = self
                .services
                .entry(service)
                .or_insert_with(|| Service::new(config));
            svc.instances.push(id);
        }
        for conn in pipelined {
            self.close_connection(
                conn,
                courier_proto::ErrorCode::StorageFailed,
                "the broker's storage failed and its state was rebuilt: the deliveries this connection held are void and come again, in order; reconnect".into(),
                now,
            );
        }
        let names: Vec<String> = self.services.keys().cloned().collect();
        for name in names {
            self.pump(&name, now);
        }
        Ok(report)
    }

    fn clear_state(&mut self) {
        self.services.clear();
        self.routes_changed();
        self.refs.clear();
        self.dedup.clear();
        self.reply_routes.clear();
        self.registry.clear_durable();
    }

    /// Replays one message; whether it went into some queue.
    fn replay_message(&mut self, seq: Seq, message: &Arc<Message>, now: Nanos) -> bool {
        self.dedup.insert(&message.id, message.timestamp);
        let targets = self.receivers(&message.name, message.version.major);
        if message.kind == Kind::Command {
            let route = ReplyRoute {
                service: message.sender.to_string(),
                // The requesting connection is gone; any instance will do.
                conn: 0,
                receivers: targets.to_vec(),
                stream: None,
                command: self.traffic.slot(&message.name),
                accepted_at: message.timestamp,
            };
            self.reply_routes
                .insert(message.id, route, message.timestamp);
        }
        self.enqueue(seq, message, &targets, now);
        !targets.is_empty()
    }

    fn replay_op(&mut self, seq: Seq, op: Op, marks: &mut Marks, now: Nanos) {
        match op {
            Op::Subscribe {
                service,
                pattern,
                ack_deadline_ms,
                max_deliveries,
                from_seq,
            } => {
                let is_new = !self
                    .services
                    .get(&service)
                    .is_some_and(|s| s.patterns.contains(&pattern));
                self.apply_subscribe(&service, &pattern, ack_deadline_ms, max_deliveries);
                if is_new && from_seq > 0 {
                    self.backfill(&service, &pattern, from_seq, seq, now);
                }
            }
            Op::Unsubscribe { service, pattern } => {
                let emptied = self
                    .services
                    .get(&service)
                    .is_some_and(|s| s.patterns.len() == 1 && s.patterns.contains(&pattern));
                let _ = self.apply_unsubscribe(&service, &pattern);
                if emptied {
                    // Marks for the old queue must not touch a later one.
                    marks.remove(&service);
                }
            }
            Op::Delivered { service, seq } => {
                *marks
                    .entry(service)
                    .or_default()
                    .attempts
                    .entry(seq)
                    .or_insert(0) += 1
            }
            Op::Acked { service, seq } => {
                marks.entry(service).or_default().removed.insert(seq);
            }
            Op::Nacked {
                service,
                seq,
                until,
            } => {
                marks.entry(service).or_default().until.insert(seq, until);
            }
            Op::DeadLettered {
                service,
                seq,
                attempts,
                reason,
                at,
            } => {
                if let Some(svc) = self.services.get_mut(&service) {
                    svc.queue.dead_letters.push(DeadLetter {
                        seq,
                        attempts,
                        reason,
                        at,
                    });
                    // The dead letter keeps the queue's reference.
                    self.refs.add(seq);
                }
                marks.entry(service).or_default().removed.insert(seq);
            }
            Op::Revived { service, seq } => {
                let message = self.store.get(seq).ok().flatten();
                let key = message.as_ref().and_then(|m| m.key.clone());
                let bytes = message.map_or(0, |m| m.payload.len() as u64);
                if let Some(svc) = self.services.get_mut(&service) {
                    if let Some(i) = svc.queue.dead_letters.iter().position(|d| d.seq == seq) {
                        svc.queue.dead_letters.remove(i);
                        svc.queue.count_in(bytes);
                        svc.queue.make_ready(Entry::new(seq, 0, key));
                        // The entry reuses the dead letter's reference.
                    }
                }
                if let Some(m) = marks.get_mut(&service) {
                    m.removed.remove(&seq);
                    m.attempts.remove(&seq);
                    m.until.remove(&seq);
                }
            }
            Op::Purged { service, seqs } => {
                if let Some(svc) = self.services.get_mut(&service) {
                    svc.queue.dead_letters.retain(|d| !seqs.contains(&d.seq));
                }
                for seq in seqs {
                    crate::release(&mut self.store, &mut self.refs, seq);
                }
            }
            Op::Paused { service, pattern } => self.apply_paused(&service, &pattern, true),
            Op::Resumed { service, pattern } => self.apply_paused(&service, &pattern, false),
            Op::Registry(op) => self.registry.apply(op, now),
        }
    }

    /// Applies the replay's marks and rebuilds every queue in seq order.
    /// Entries whose records are `lost` (sorted ranges: gone from the store
    /// for good) go to their service's dead letters instead, journaled, and
    /// the operator is told per service what to do.
    /// `sizes`: payload sizes of the messages replayed into queues, by
    /// seq, for the backlog bytes of what the marks remove.
    fn settle_marks(
        &mut self,
        mut marks: Marks,
        lost: &[std::ops::Range<Seq>],
        sizes: &[(Seq, u32)],
        now: Nanos,
    ) {
        let is_lost = |seq: Seq| {
            let after = lost.partition_point(|seqs| seqs.end <= seq);
            lost.get(after).is_some_and(|seqs| seqs.contains(&seq))
        };
        let mut names: Vec<String> = self.services.keys().cloned().collect();
        names.sort();
        for name in names {
            let Some(svc) = self.services.get_mut(&name) else {
                continue;
            };
            let marks = marks.remove(&name).unwrap_or_default();
            let mut runs = svc.queue.take_runs();
            runs.sort_by_key(|(e, _, _)| e.seq);
            let mut released = Vec::new();
            let mut gone = Vec::new();
            for (first, count, deferred) in runs {
                let end = first.seq + u64::from(count);
                let touches_lost = lost
                    .iter()
                    .any(|seqs| seqs.start < end && first.seq < seqs.end);
                if count > 1 && marks.is_empty() && !touches_lost {
                    // A run of first deliveries nothing was recorded for.
                    svc.queue.ready.push_back_run(first.seq, count);
                    continue;
                }
                for i in 0..u64::from(count) {
                    let mut entry = first.clone();
                    entry.seq += i;
                    if marks.removed.contains(&entry.seq) {
                        released.push(entry.seq);
                        continue;
                    }
                    entry.attempts += marks.attempts.get(&entry.seq).copied().unwrap_or(0);
                    if is_lost(entry.seq) {
                        gone.push(entry);
                        continue;
                    }
                    match marks.until.get(&entry.seq).copied().or(deferred) {
                        Some(t) if t > now => svc.queue.defer_again(t, entry),
                        _ => svc.queue.make_ready(entry),
                    }
                }
            }
            let mut released_bytes: u64 = 0;
            for seq in released {
                released_bytes += match sizes.binary_search_by_key(&seq, |(s, _)| *s) {
                    Ok(i) => u64::from(sizes[i].1),
                    // From before the snapshot: only the record knows.
                    Err(_) => self.payload_bytes(seq),
                };
                // Acked entries drop their reference; dead-lettered ones
                // were given one of their own when replayed.
                crate::release(&mut self.store, &mut self.refs, seq);
            }
            if let Some(svc) = self.services.get_mut(&name) {
                svc.queue.bytes = svc.queue.bytes.saturating_sub(released_bytes);
            }
            if !gone.is_empty() {
                self.dead_letter_lost(&name, gone, now);
                // Lost records cannot say their size: count what is left.
                self.recount_backlog_bytes(&name);
            }
        }
    }

    /// A stored message's payload size; 0 if it cannot be read.
    fn payload_bytes(&mut self, seq: Seq) -> u64 {
        match self.store.get(seq) {
            Ok(Some(m)) => m.payload.len() as u64,
            _ => 0,
        }
    }

    /// Counts the service's backlog bytes from its messages (recovery
    /// from a snapshot that does not hold them, lost records).
    pub(crate) fn recount_backlog_bytes(&mut self, service: &str) {
        let bytes = self.backlog_bytes_read(service);
        if let Some(svc) = self.services.get_mut(service) {
            svc.queue.bytes = bytes;
        }
    }

    /// The service's backlog bytes as its messages say, read one by one.
    pub(crate) fn backlog_bytes_read(&mut self, service: &str) -> u64 {
        let Some(svc) = self.services.get(service) else {
            return 0;
        };
        let seqs: Vec<(Seq, u32)> = svc
            .queue
            .runs()
            .map(|(e, count, _)| (e.seq, count))
            .collect();
        let mut bytes = 0;
        for (first, count) in seqs {
            for seq in first..first + u64::from(count) {
                bytes += self.payload_bytes(seq);
            }
        }
        bytes
    }

    /// Moves queue entries whose records are lost to the service's dead
    /// letters (each keeps the reference its entry held), journaled so the
    /// move survives the next restart, and says so once for the service.
    fn dead_letter_lost(&mut self, service: &str, gone: Vec<Entry>, now: Nanos) {
        let wall_now = self.wall(now);
        let (Some(first), Some(last)) = (gone.first(), gone.last()) else {
            return;
        };
        let (first, last, count) = (first.seq, last.seq, gone.len());
        let reason = "record lost: the log no longer holds it although it was durable (docs/STORAGE.md §8.7)";
        for entry in gone {
            if let Some(svc) = self.services.get_mut(service) {
                svc.queue.dead_letters.push(DeadLetter {
                    seq: entry.seq,
                    attempts: entry.attempts,
                    reason: reason.to_string(),
                    at: wall_now,
                });
            }
            self.journal(Op::DeadLettered {
                service: service.to_string(),
                seq: entry.seq,
                attempts: entry.attempts,
                reason: reason.to_string(),
                at: wall_now,
            });
        }
        self.metrics.messages_lost += count as u64;
        self.errors.push(format!(
            "{count} acknowledged messages for {service} (seqs {first} to {last}) are lost with their records; they are in its dead letters, marked unreadable: restore the log's segment from a backup and replay them (courier dead-letters replay), or purge them to accept the loss (courier dead-letters purge --service {service})"
        ));
    }

    /// Saves a snapshot of the state, then lets the store drop records that
    /// neither the snapshot nor any live message needs. Returns bytes freed.
    /// All in place; the network edge runs the same steps with the disk
    /// work outside its lock: [`Broker::begin_checkpoint`],
    /// [`SnapshotJob::write`], [`Broker::checkpoint_ready`],
    /// [`SnapshotJob::install`], [`Broker::finish_checkpoint`],
    /// [`RemovalJob::run`].
    pub fn checkpoint(&mut self, now: Nanos) -> Result<u64, StoreError> {
        if !self.store.persistent() || self.store.next_seq() == self.checkpointed_at {
            return Ok(0);
        }
        while self.backfills_pending() {
            self.continue_backfills(now);
        }
        self.store.sync()?;
        self.dirty = false;
        let Some(mut snapshot) = self.begin_checkpoint(now)? else {
            return Ok(0);
        };
        snapshot.write()?;
        self.checkpoint_ready(&snapshot)?;
        let covers = snapshot.covers();
        snapshot.install()?;
        self.finish_checkpoint(covers, now)?.run()
    }

    /// A checkpoint's first step, under whatever guards the broker: the
    /// state as of the last record appended, encoded. `None` if nothing
    /// was appended since the last checkpoint (or nothing survives a
    /// restart), or while a history replay is unfinished (its progress is
    /// in no snapshot). Write the job without the broker, then
    /// [`Broker::checkpoint_ready`]. One checkpoint at a time.
    pub fn begin_checkpoint(&mut self, now: Nanos) -> Result<Option<SnapshotJob>, StoreError> {
        self.now = now;
        if !self.store.persistent()
            || self.store.next_seq() == self.checkpointed_at
            || self.backfills_pending()
        {
            return Ok(None);
        }
        let covers = self.store.next_seq().saturating_sub(1);
        let state = self.snapshot_bytes();
        self.store.start_snapshot(covers, &state).map(Some)
    }

    /// Whether a written snapshot may be installed: the records it covers
    /// are durable (usually the group commit made them so meanwhile; if
    /// not, they are fsynced here), and none was thrown away since it
    /// began. On error, drop the job: the snapshot in place stays.
    pub fn checkpoint_ready(&mut self, snapshot: &SnapshotJob) -> Result<(), StoreError> {
        self.store.snapshot_ready(snapshot)
    }

    /// A checkpoint's last step, once its snapshot covering `covers` is in
    /// place: the store lets go of the records nothing needs any more, and
    /// the job it returns deletes their files, to run without the broker.
    pub fn finish_checkpoint(&mut self, covers: Seq, now: Nanos) -> Result<RemovalJob, StoreError> {
        self.now = now;
        self.checkpointed_at = self.checkpointed_at.max(covers + 1);
        let oldest_live = self.refs.oldest().unwrap_or(covers + 1);
        let before = oldest_live.min(covers + 1);
        let retention = self.config.longest_retention();
        let mut removal = self
            .store
            .start_compact(before, self.wall(now).saturating_sub(retention))?;
        let cap = self.config.retention_bytes_max;
        if cap > 0 && self.store.len() as u64 > cap {
            // Over the size cap: give up retained history (never messages
            // still owed to a service, nor records the snapshot needs).
            removal.then(self.store.start_compact(before, u64::MAX)?);
        }
        self.checkpointed_bytes = self.store.len() as u64;
        Ok(removal)
    }

    /// Whether the log grew enough since the last checkpoint that recovery
    /// would replay more than `checkpoint_log_bytes`: then a checkpoint is
    /// due now, not only on the timer.
    pub fn checkpoint_due(&self) -> bool {
        self.store.persistent()
            && (self.store.len() as u64).saturating_sub(self.checkpointed_bytes)
                >= self.config.checkpoint_log_bytes
    }

    fn snapshot_bytes(&self) -> bytes::BytesMut {
        let mut w = Writer::new();
        // Sized up front (about 40 bytes an entry) so the buffer is not
        // copied as it grows.
        let backlog: usize = self.services.values().map(|s| s.queue.depth()).sum();
        w.0.reserve(4096 + backlog * 40 + self.dedup.len() * 32);
        w.0.extend_from_slice(SNAPSHOT_MAGIC);
        w.u32(SNAPSHOT_VERSION);
        // Services with nothing durable (senders only) are not saved.
        let mut names: Vec<&String> = self
            .services
            .iter()
            .filter(|(_, s)| !s.patterns.is_empty() || !s.queue.dead_letters.is_empty())
            .map(|(n, _)| n)
            .collect();
        names.sort();
        w.u32(names.len() as u32);
        for name in names {
            let svc = &self.services[name];
            w.str(name);
            w.u32(svc.ack_deadline_ms);
            w.u32(svc.max_deliveries);
            w.u32(svc.patterns.len() as u32);
            for p in &svc.patterns {
                w.str(p);
            }
            w.u32(svc.paused.len() as u32);
            for p in &svc.paused {
                w.str(p);
            }
            // Counted, then written straight from the queue: collecting a
            // large backlog first would double the snapshot's memory. Runs
            // of consecutive seqs are one record each.
            w.u32(svc.queue.runs().count() as u32);
            for (e, count, until) in svc.queue.runs() {
                w.u64(e.seq);
                w.u32(e.attempts);
                match e.key() {
                    Some(k) => {
                        w.u8(1);
                        w.bytes(k);
                    }
                    None => w.u8(0),
                }
                w.u64(until.unwrap_or(0));
                w.u32(count);
            }
            w.u32(svc.queue.dead_letters.len() as u32);
            for d in &svc.queue.dead_letters {
                w.u64(d.seq);
                w.u32(d.attempts);
                w.str(&d.reason);
                w.u64(d.at);
            }
            w.u64(svc.queue.backlog_bytes());
        }
        // Counted while written, then the count is patched in: collecting
        // a million ids first cost tens of MiB that the allocator kept.
        let count_at = w.0.len();
        w.u32(0);
        let mut count: u32 = 0;
        for (fp, t) in self.dedup.others() {
            w.u64(fp);
            w.u64(t);
            count += 1;
        }
        w.0[count_at..count_at + 4].copy_from_slice(&count.to_be_bytes());
        let count_at = w.0.len();
        w.u32(0);
        let mut buckets: u32 = 0;
        for (start_ms, fps) in self.dedup.buckets() {
            w.u64(start_ms);
            let len_at = w.0.len();
            w.u32(0);
            let mut len: u32 = 0;
            for fp in fps {
                w.u64(fp);
                len += 1;
            }
            w.0[len_at..len_at + 4].copy_from_slice(&len.to_be_bytes());
            buckets += 1;
        }
        w.0[count_at..count_at + 4].copy_from_slice(&buckets.to_be_bytes());
        let count_at = w.0.len();
        w.u32(0);
        let mut count: u32 = 0;
        for (id, route, t) in self.reply_routes.iter() {
            count += 1;
            w.bytes(id.as_bytes());
            w.str(&route.service);
            w.u64(t);
            w.u32(route.receivers.len() as u32);
            for r in &route.receivers {
                w.str(r);
            }
        }
        w.0[count_at..count_at + 4].copy_from_slice(&count.to_be_bytes());
        // The service registry, a tagged section of its own at the end.
        w.0.extend_from_slice(REGISTRY_SECTION);
        self.registry.write_snapshot(&mut w);
        w.0
    }

    pub(crate) fn restore_snapshot(&mut self, bytes: Bytes) -> Result<(), JournalError> {
        if bytes.len() < 8 || &bytes[..4] != SNAPSHOT_MAGIC {
            return Err(JournalError::BadSnapshot);
        }
        let mut r = Reader::new(bytes.slice(4..));
        let version = r.u32()?;
        if !(1..=SNAPSHOT_VERSION).contains(&version) {
            return Err(JournalError::BadSnapshot);
        }
        let services = r.u32()?;
        let mut uncounted = Vec::new();
        for _ in 0..services {
            let name = r.str()?;
            let ack_deadline_ms = r.u32()?;
            let max_deliveries = r.u32()?;
            let mut svc = Service::new(&self.config);
            svc.ack_deadline_ms = ack_deadline_ms;
            svc.max_deliveries = max_deliveries;
            for _ in 0..r.u32()? {
                svc.patterns.insert(r.str()?);
            }
            if version >= 4 {
                for _ in 0..r.u32()? {
                    let pattern = r.str()?;
                    if !svc.patterns.contains(&pattern) {
                        return Err(JournalError::BadSnapshot);
                    }
                    svc.paused.insert(pattern);
                }
            }
            let mut runs = Vec::new();
            for _ in 0..r.u32()? {
                let seq = r.u64()?;
                let attempts = r.u32()?;
                let key = if r.u8()? == 1 { Some(r.bytes()?) } else { None };
                let until = r.u64()?;
                let count = if version >= 3 { r.u32()? } else { 1 };
                if count == 0 || (count > 1 && (attempts > 0 || key.is_some() || until > 0)) {
                    return Err(JournalError::BadSnapshot);
                }
                runs.push((Entry::new(seq, attempts, key), count, until));
            }
            runs.sort_by_key(|(e, _, _)| e.seq);
            for (entry, count, until) in runs {
                for seq in entry.seq..entry.seq.saturating_add(u64::from(count)) {
                    self.refs.add(seq);
                }
                if count > 1 {
                    svc.queue.ready.push_back_run(entry.seq, count);
                } else if until > 0 {
                    svc.queue.defer_again(until, entry);
                } else {
                    svc.queue.make_ready(entry);
                }
            }
            for _ in 0..r.u32()? {
                let letter = DeadLetter {
                    seq: r.u64()?,
                    attempts: r.u32()?,
                    reason: r.str()?,
                    at: r.u64()?,
                };
                self.refs.add(letter.seq);
                svc.queue.dead_letters.push(letter);
            }
            if version >= 6 {
                svc.queue.bytes = r.u64()?;
            } else {
                uncounted.push(name.clone());
            }
            self.services.insert(name, svc);
            self.routes_changed();
        }
        let ids = r.u32()?;
        self.dedup.reserve_others(ids as usize);
        for _ in 0..ids {
            let id = if version == 1 {
                fingerprint(&Uuid::from_bytes(r.id()?))
            } else {
                r.u64()?
            };
            let t = r.u64()?;
            self.dedup.restore_other(id, t);
        }
        if version >= 3 {
            for _ in 0..r.u32()? {
                let start_ms = r.u64()?;
                let len = r.u32()?;
                let mut fps = Vec::with_capacity(len.min(1 << 20) as usize);
                for _ in 0..len {
                    fps.push(r.u64()?);
                }
                self.dedup.restore_bucket(start_ms, fps);
            }
        }
        for _ in 0..r.u32()? {
            let id = Uuid::from_bytes(r.id()?);
            let service = r.str()?;
            let t = r.u64()?;
            let mut receivers = Vec::new();
            for _ in 0..r.u32()? {
                receivers.push(r.str()?);
            }
            let route = ReplyRoute {
                service,
                conn: 0,
                receivers,
                stream: None,
                command: crate::stats::Slot::MAX,
                accepted_at: 0,
            };
            self.reply_routes.insert(id, route, t);
        }
        if version >= 5 {
            if r.magic()? != *REGISTRY_SECTION {
                return Err(JournalError::BadSnapshot);
            }
            let now = self.now;
            self.registry.read_snapshot(&mut r, now)?;
        }
        if !r.is_empty() {
            return Err(JournalError::BadSnapshot);
        }
        for name in uncounted {
            self.recount_backlog_bytes(&name);
        }
        Ok(())
    }
}
