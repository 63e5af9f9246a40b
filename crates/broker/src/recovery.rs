//! Recovery: rebuilding the broker's state from the store after a restart
//! (or after a failed sync). Checkpoints, which keep it short, and the
//! snapshot's format are in `checkpoint.rs`.
//!
//! The state is a fold over the log: a snapshot holds the fold up to some
//! seq; recovery loads it and replays the records after it — messages are
//! routed again to the services subscribed at that point, journal entries
//! are applied where they stood. Acks and nacks name messages by seq; while
//! replaying they are collected as marks and applied in one pass at the end,
//! which rebuilds each queue in seq order (per-key order included).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use courier_proto::{Kind, Message};
use courier_store::{MessageStore, Replayed, Seq, StoreError};
use uuid::Uuid;

use crate::journal::Op;
use crate::queue::{DeadLetter, Entry};
use crate::{Broker, Nanos, ReplyRoute};

/// Records read per chunk while replaying; bounds recovery's extra memory.
/// Measured on a restart replaying 47k records of 1 KiB: with 4096 a
/// chunk, the broker's RSS was 49 MiB after recovery, 12 of them live (the
/// allocator kept the rest of the freed chunks' pages); with 256 it was
/// 14 MiB, and the replay took 81 instead of 115 ms (a chunk stays in cache).
const REPLAY_CHUNK_RECORDS: usize = 256;

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
            let svc = self.services.get_or_insert(&service, config);
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
        self.subscribers.clear();
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
}
