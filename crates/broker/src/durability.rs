//! Group commit with the fsync outside the caller's lock.
//!
//! [`Broker::take_actions`] syncs the store before it hands over a batch's
//! actions: simple, but whoever holds the broker waits on the disk. The
//! network edge instead calls [`Broker::take_ready_actions`] after each
//! batch: actions that need no durability go out at once, the others are
//! **held**, each with the seq below which every record must be durable
//! first (the store's `next_seq` at the end of its batch). A storage
//! thread runs [`Broker::start_sync`] (writes the buffer to the OS), the
//! fsync itself without the lock ([`SyncJob::run`]), and
//! [`Broker::finish_sync`], which releases what the fsync made durable.
//! Batches of every connection that arrive meanwhile share the next fsync.
//!
//! The rules:
//! - a batch that appended or journaled anything holds all its actions
//!   but deliveries of transient messages and replies, which are stored
//!   nowhere: an acknowledgement, a delivery of a stored message and a
//!   change's answer leave only once their records are durable;
//! - except a first delivery of a message whose record is durable already
//!   (a backlog) when nothing is held for its connection: it leaves at
//!   once, before the bookkeeping of its batch (delivered, acked) is
//!   durable. A crash before that bookkeeping is durable delivers the
//!   message again, the duplicate at-least-once allows. Consuming a
//!   backlog thus never waits for the disk; a redelivery still waits for
//!   its batch (a receiver nacking without delay must not spend the
//!   attempts in a tight loop);
//! - on a backend that keeps delivery state, where a batch that only
//!   delivers stores nothing, a delivery queues behind the held
//!   deliveries to its connection from any batch, so that a connection's
//!   deliveries keep their order (one broker's delivering batches journal,
//!   and are held as a whole);
//! - answers (everything but deliveries) to one connection keep their
//!   order: one queues behind the held answers to its connection; a PONG
//!   waits for everything stored before it (it confirms quiet sends, which
//!   are answered with nothing), so it is still a barrier;
//! - the answer `duplicate` to a send is given once the first copy is
//!   durable (the batch that answers it counts as one that stored);
//! - held actions are released in the order they were decided (their seqs
//!   never decrease);
//! - when the store threw records away (a failed write or fsync,
//!   [`MessageStore::discards`]), every batch not yet durable fails as one
//!   failed sync did before: sends refused, deliveries dropped, the state
//!   rebuilt from the store — or, if they only did delivery bookkeeping,
//!   the entries are kept to write again and the actions released.

use std::collections::VecDeque;

use courier_proto::Kind;
use courier_store::{MessageStore, Seq, StoreError, SyncJob};

use crate::{Action, Broker, ConnId};

/// A batch whose records are not known to be durable yet.
#[derive(Debug)]
pub(crate) struct UnsyncedBatch {
    /// The store's `next_seq` when the batch ended.
    end: Seq,
    /// Its journal entries, to write again if only bookkeeping was lost.
    ops: Vec<bytes::Bytes>,
    /// The ids it accepted (on a backend; see `Broker::batch_ids`).
    ids: Vec<uuid::Uuid>,
    structural: bool,
    appended: bool,
}

/// What waits for the disk (see the module's documentation).
#[derive(Debug, Default)]
pub(crate) struct Durability {
    /// Actions and the seq below which records must be durable before
    /// each leaves; in decision order, seqs never decreasing.
    held: VecDeque<(Seq, Action)>,
    /// Answers in `held` per connection.
    held_answers: crate::FastMap<ConnId, u32>,
    /// Deliveries in `held` per connection.
    held_deliveries: crate::FastMap<ConnId, u32>,
    /// Records below this seq are durable.
    durable_below: Seq,
    batches: VecDeque<UnsyncedBatch>,
    /// Released by a sync, not yet taken.
    released: Vec<Action>,
    /// [`MessageStore::discards`] when last looked at.
    discards_seen: u64,
}

fn conn_of(action: &Action) -> ConnId {
    match action {
        Action::Deliver { conn, .. }
        | Action::SendResult { conn, .. }
        | Action::OpResult { conn, .. }
        | Action::Drained { conn }
        | Action::Pong { conn, .. }
        | Action::StartTail { conn, .. }
        | Action::TraceQuery { conn, .. }
        | Action::ServicesQuery { conn, .. }
        | Action::DeadLetterQuery { conn, .. }
        | Action::Close { conn, .. }
        | Action::ForwardReply { conn, .. }
        | Action::FindReplyRoute { conn, .. } => *conn,
        // No connection's: never held (a transient message or a reply is
        // stored nowhere), so its "connection" orders nothing.
        Action::ForwardTransient { .. } | Action::AnswerForwardedReply { .. } => 0,
    }
}

/// A delivery of something no store holds: it waits for no disk.
fn stored_nowhere(action: &Action) -> bool {
    matches!(action, Action::Deliver { message, .. } if message.transient || message.kind == Kind::Reply)
        || matches!(
            action,
            Action::ForwardTransient { .. } | Action::AnswerForwardedReply { .. }
        )
}

impl Durability {
    fn hold(&mut self, needs: Seq, action: Action) {
        let held = if matches!(action, Action::Deliver { .. }) {
            &mut self.held_deliveries
        } else {
            &mut self.held_answers
        };
        *held.entry(conn_of(&action)).or_insert(0) += 1;
        self.held.push_back((needs, action));
    }

    /// A first delivery of a message already durable, with nothing held
    /// before it for its connection: no delivery (their order), and no
    /// answer (a subscription's RESULT comes before its first delivery).
    /// A redelivery still waits for the fsync of the nack or expiry that
    /// caused it: a receiver nacking without delay would otherwise spend a
    /// message's attempts in a tight loop.
    fn delivers_durable(&self, action: &Action) -> bool {
        matches!(action, Action::Deliver { conn, log_seq, attempt, .. }
            if *log_seq != 0
                && *log_seq < self.durable_below
                && *attempt & !courier_proto::ATTEMPT_KEY_START == 1
                && !self.held_deliveries.contains_key(conn)
                && !self.held_answers.contains_key(conn))
    }

    /// A delivery to a connection whose earlier deliveries wait for the
    /// disk waits behind them, even from a batch that stored nothing (on a
    /// backend that keeps delivery state, most of them; asked only there):
    /// a pipelined receiver takes a key's deliveries in arrival order.
    fn deliveries_held_for(&self, action: &Action) -> bool {
        !stored_nowhere(action)
            && matches!(action, Action::Deliver { conn, .. } if self.held_deliveries.contains_key(conn))
    }

    fn answers_held_for(&self, action: &Action) -> bool {
        !matches!(action, Action::Deliver { .. })
            && self.held_answers.contains_key(&conn_of(action))
    }

    /// Records below `covers` are durable: the mark moves up.
    fn made_durable(&mut self, covers: Seq) {
        self.durable_below = self.durable_below.max(covers);
        self.durable_to(covers);
    }

    /// Releases what waited for records below `covers`.
    fn durable_to(&mut self, covers: Seq) {
        while self.batches.front().is_some_and(|b| b.end <= covers) {
            self.batches.pop_front();
        }
        while self.held.front().is_some_and(|(needs, _)| *needs <= covers) {
            let Some((_, action)) = self.held.pop_front() else {
                break;
            };
            let held = if matches!(action, Action::Deliver { .. }) {
                &mut self.held_deliveries
            } else {
                &mut self.held_answers
            };
            let conn = conn_of(&action);
            if let Some(count) = held.get_mut(&conn) {
                *count -= 1;
                if *count == 0 {
                    held.remove(&conn);
                }
            }
            self.released.push(action);
        }
    }
}

impl<S: MessageStore> Broker<S> {
    /// Hands over the actions that may leave now and holds those that wait
    /// for the disk (see the module's documentation); call after each batch
    /// of input, and run [`Broker::start_sync`] / [`Broker::finish_sync`]
    /// elsewhere while [`Broker::sync_wanted`].
    pub fn take_ready_actions(&mut self, out: &mut Vec<Action>) {
        if !self.store.persistent() {
            // Nothing is ever written: a sync is free.
            return self.take_actions(out);
        }
        out.append(&mut self.durability.released);
        // Answers in `unsynced` of a batch that stored nothing (transient
        // sends, refusals) need no fsync of their own.
        let batch_dirty = self.dirty;
        if self.records_discarded() && (batch_dirty || !self.durability.batches.is_empty()) {
            self.unsynced_failed(StoreError::Io(
                "records not yet durable were thrown away after a write or fsync failed"
                    .to_string(),
            ));
        } else if batch_dirty {
            let end = self.store.next_seq();
            self.durability.batches.push_back(UnsyncedBatch {
                end,
                ops: std::mem::take(&mut self.batch_ops),
                ids: std::mem::take(&mut self.batch_ids),
                structural: self.batch_structural,
                appended: self.batch_appended,
            });
            self.dirty = false;
            self.batch_structural = false;
            self.batch_appended = false;
            let batch: Vec<Action> = self
                .actions
                .drain(..)
                .chain(self.unsynced.drain(..))
                .collect();
            for action in batch {
                if stored_nowhere(&action) || self.durability.delivers_durable(&action) {
                    out.push(action);
                } else {
                    self.durability.hold(end, action);
                }
            }
        } else if let Some(end) = self.durability.batches.back().map(|b| b.end) {
            let batch: Vec<Action> = self
                .actions
                .drain(..)
                .chain(self.unsynced.drain(..))
                .collect();
            for action in batch {
                // A PONG confirms quiet sends too, which leave nothing
                // held to queue behind: it waits for everything stored.
                if matches!(action, Action::Pong { .. })
                    || self.durability.answers_held_for(&action)
                    || (self.upstream && self.durability.deliveries_held_for(&action))
                {
                    self.durability.hold(end, action);
                } else {
                    out.push(action);
                }
            }
        }
        out.append(&mut self.durability.released);
        out.append(&mut self.actions);
        out.append(&mut self.unsynced);
        self.alerts.extend(self.store.take_reports());
    }

    /// Something waits for the disk: a sync should run.
    pub fn sync_wanted(&self) -> bool {
        !self.durability.batches.is_empty() || !self.durability.held.is_empty()
    }

    /// Writes what was appended to the OS and returns the fsync to run
    /// outside the broker's lock, or `None` when everything is durable
    /// already (per the store's policy) — then what waited is released.
    pub fn start_sync(&mut self) -> Option<SyncJob> {
        let result = self.store.start_sync();
        self.alerts.extend(self.store.take_reports());
        match result {
            Ok(Some(job)) => Some(job),
            Ok(None) => {
                if !self.records_discarded() {
                    self.durability.made_durable(self.store.next_seq());
                }
                None
            }
            Err(error) => {
                self.sync_failed(error);
                None
            }
        }
    }

    /// Takes back a job of [`Broker::start_sync`] with what its `run`
    /// returned: on success what it made durable is released (taken with
    /// the next [`Broker::take_ready_actions`]); on failure the batches it
    /// covered fail (see the module's documentation).
    pub fn finish_sync(&mut self, job: SyncJob, result: std::io::Result<()>) {
        let covers = job.covers();
        let result = self.store.finish_sync(job, result);
        self.alerts.extend(self.store.take_reports());
        match result {
            Ok(()) if !self.records_discarded() => self.durability.made_durable(covers),
            Ok(()) => self.unsynced_failed(StoreError::Io(
                "records not yet durable were thrown away after a write failed".to_string(),
            )),
            Err(error) => self.sync_failed(error),
        }
    }

    /// A sync failed. If the store threw records away, every batch not yet
    /// durable failed; otherwise (a job that began before records it
    /// covered were already given up for) nothing new is durable, and the
    /// next sync tries again.
    fn sync_failed(&mut self, error: StoreError) {
        if self.records_discarded() && self.sync_wanted() {
            self.unsynced_failed(error);
        } else {
            self.metrics.storage_failures += 1;
            self.alerts.push(format!("storage sync failed: {error}"));
        }
    }

    /// Whether the store threw records away since the last look.
    fn records_discarded(&mut self) -> bool {
        let discards = self.store.discards();
        let changed = discards != self.durability.discards_seen;
        self.durability.discards_seen = discards;
        changed
    }

    /// Every batch not yet durable, the current one included, failed as
    /// one: their actions and journal entries go through the failure path
    /// of a synchronous sync ([`Broker::storage_failed`]).
    pub(crate) fn unsynced_failed(&mut self, error: StoreError) {
        let mut ops = Vec::new();
        let mut ids = Vec::new();
        for batch in self.durability.batches.drain(..) {
            ops.extend(batch.ops);
            ids.extend(batch.ids);
            self.batch_structural |= batch.structural;
            self.batch_appended |= batch.appended;
        }
        ops.append(&mut self.batch_ops);
        self.batch_ops = ops;
        ids.append(&mut self.batch_ids);
        self.batch_ids = ids;
        self.durability.held_answers.clear();
        self.durability.held_deliveries.clear();
        // Released ones were durable: they leave as they are, first.
        let released = std::mem::take(&mut self.durability.released);
        let mut actions: Vec<Action> = self
            .durability
            .held
            .drain(..)
            .map(|(_, action)| action)
            .collect();
        actions.append(&mut self.actions);
        self.actions = actions;
        self.storage_failed(&error);
        let mut actions = released;
        actions.append(&mut self.actions);
        self.actions = actions;
        self.batch_ops.clear();
        self.batch_ids.clear();
        self.batch_structural = false;
        self.batch_appended = false;
        self.dirty = false;
        // What the failure path kept for the disk was released with the rest.
        self.durability.batches.clear();
    }

    /// After a synchronous sync succeeded: everything waited for is durable.
    pub(crate) fn all_durable(&mut self, out: &mut Vec<Action>) {
        let next = self.store.next_seq();
        self.durability.durable_to(Seq::MAX);
        self.durability.durable_below = self.durability.durable_below.max(next);
        out.append(&mut self.durability.released);
    }

    /// Whether anything is held or unsynced from earlier batches.
    pub(crate) fn durability_pending(&self) -> bool {
        self.sync_wanted() || !self.durability.released.is_empty()
    }

    /// Notes the store's discards as seen; returns whether they changed.
    pub(crate) fn take_discarded(&mut self) -> bool {
        self.records_discarded()
    }
}

#[cfg(test)]
mod tests {
    use courier_proto::{ErrorCode, Message};
    use courier_store::MemoryLog;
    use proptest::prelude::*;

    use crate::{Action, Broker, Config, ConnId, Nanos, StartFrom};

    const NOW: Nanos = 1_000_000_000_000;
    /// The property test's consumer of one message at a time.
    const SLOW: ConnId = 9;

    fn broker() -> Broker<MemoryLog> {
        let mut broker = Broker::new(Config::default(), MemoryLog::new());
        broker.connect(1, "worker", "worker-1", 1_000);
        broker.subscribe(1, 0, "job.*", 0, 0, StartFrom::New, NOW);
        let mut out = Vec::new();
        broker.take_actions(&mut out);
        broker
    }

    fn event(name: &str, transient: bool) -> Message {
        let mut m = Message::new(courier_proto::Kind::Event, name, "x");
        m.transient = transient;
        m
    }

    fn ready(broker: &mut Broker<MemoryLog>) -> Vec<Action> {
        let mut out = Vec::new();
        broker.take_ready_actions(&mut out);
        out
    }

    fn acks(actions: &[Action]) -> Vec<(ConnId, u64, ErrorCode)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::SendResult {
                    conn, seq, code, ..
                } => Some((*conn, *seq, *code)),
                _ => None,
            })
            .collect()
    }

    fn deliveries(actions: &[Action]) -> usize {
        actions
            .iter()
            .filter(|a| matches!(a, Action::Deliver { .. }))
            .count()
    }

    #[test]
    fn an_ack_and_its_delivery_wait_for_the_fsync() {
        let mut broker = broker();
        let synced_before = broker.store().crash().synced_next_seq();
        broker.connect(2, "sender", "sender-1", 10);
        broker.send(2, 7, event("job.run", false), NOW);
        assert!(
            ready(&mut broker).is_empty(),
            "nothing leaves before the fsync"
        );
        assert!(broker.sync_wanted());
        let job = broker.start_sync().expect("a sync to run");
        broker.connect(3, "sender", "sender-2", 10);
        broker.send(3, 1, event("job.run", false), NOW);
        assert!(ready(&mut broker).is_empty(), "begun is not durable");
        // A crash now would lose the message: it was not acknowledged.
        assert_eq!(broker.store().crash().synced_next_seq(), synced_before);
        broker.finish_sync(job, Ok(()));
        let out = ready(&mut broker);
        assert_eq!(acks(&out), vec![(2, 7, ErrorCode::Ok)]);
        assert_eq!(deliveries(&out), 1);
        // The second send came after the job began: it waits for the next.
        let job = broker.start_sync().expect("a second sync");
        assert!(ready(&mut broker).is_empty());
        broker.finish_sync(job, Ok(()));
        let out = ready(&mut broker);
        assert_eq!(acks(&out), vec![(3, 1, ErrorCode::Ok)]);
        assert!(!broker.sync_wanted());
    }

    #[test]
    fn one_fsync_releases_the_batches_of_every_connection() {
        let mut broker = broker();
        for conn in 10..26 {
            broker.connect(conn, "sender", &format!("sender-{conn}"), 10);
            broker.send(conn, 1, event("job.run", false), NOW);
            assert!(ready(&mut broker).is_empty());
        }
        let job = broker.start_sync().expect("a sync");
        broker.finish_sync(job, Ok(()));
        let out = ready(&mut broker);
        assert_eq!(acks(&out).len(), 16);
        assert!(acks(&out).iter().all(|(_, _, code)| *code == ErrorCode::Ok));
        assert_eq!(deliveries(&out), 16);
        assert!(broker.start_sync().is_none(), "nothing left to sync");
    }

    #[test]
    fn transient_traffic_does_not_wait_for_the_disk() {
        let mut broker = broker();
        broker.connect(2, "sender", "sender-1", 10);
        broker.connect(3, "sender", "sender-2", 10);
        broker.send(2, 1, event("job.run", false), NOW);
        assert!(ready(&mut broker).is_empty());
        let _job = broker.start_sync().expect("a sync");
        broker.send(3, 1, event("job.run", true), NOW);
        let out = ready(&mut broker);
        assert_eq!(acks(&out), vec![(3, 1, ErrorCode::Ok)]);
        assert_eq!(deliveries(&out), 1);
    }

    #[test]
    fn answers_to_a_connection_keep_their_order_behind_a_held_ack() {
        let mut broker = broker();
        broker.connect(2, "sender", "sender-1", 10);
        broker.send(2, 1, event("job.run", false), NOW);
        assert!(ready(&mut broker).is_empty());
        let job = broker.start_sync().expect("a sync");
        // A transient send's ack and a PONG on the same connection queue
        // behind the durable ack; another connection's transient ack does
        // not, but its PONG waits for what is stored (it may have sent
        // quietly).
        broker.send(2, 2, event("job.run", true), NOW);
        broker.ping(2, 99);
        broker.connect(3, "sender", "sender-2", 10);
        broker.send(3, 1, event("job.run", true), NOW);
        broker.ping(3, 5);
        let out = ready(&mut broker);
        assert_eq!(deliveries(&out), 2, "the transient deliveries left");
        assert_eq!(acks(&out), vec![(3, 1, ErrorCode::Ok)]);
        assert!(!out.iter().any(|a| matches!(a, Action::Pong { .. })));
        broker.finish_sync(job, Ok(()));
        let out = ready(&mut broker);
        let order: Vec<String> = out
            .iter()
            .filter_map(|a| match a {
                Action::SendResult { seq, .. } => Some(format!("result {seq}")),
                Action::Pong { nonce, .. } => Some(format!("pong {nonce}")),
                _ => None,
            })
            .collect();
        assert_eq!(order, ["result 1", "result 2", "pong 99", "pong 5"]);
    }

    /// Deliveries of `actions` as (conn, delivery, log seq).
    fn delivered(actions: &[Action]) -> Vec<(ConnId, u64, u64)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Deliver {
                    conn,
                    delivery,
                    log_seq,
                    ..
                } => Some((*conn, *delivery, *log_seq)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_durable_backlog_is_delivered_without_waiting_for_its_bookkeeping() {
        let mut broker = broker();
        // One message in flight at a time: each ack brings the next.
        broker.connect(4, "slow", "slow-1", 1);
        broker.subscribe(4, 0, "job.*", 0, 0, StartFrom::New, NOW);
        broker.connect(2, "sender", "sender-1", 10);
        for seq in 1..=3 {
            broker.send(2, seq, event("job.run", false), NOW);
        }
        assert!(ready(&mut broker).is_empty(), "nothing before the fsync");
        let job = broker.start_sync().expect("a sync");
        broker.finish_sync(job, Ok(()));
        let out = ready(&mut broker);
        let first: Vec<_> = delivered(&out).into_iter().filter(|d| d.0 == 4).collect();
        assert_eq!(first.len(), 1, "{out:?}");
        broker.ack(4, first[0].1, NOW);
        let out = ready(&mut broker);
        let second = delivered(&out);
        assert_eq!(second.len(), 1, "the next one left at once: {out:?}");
        assert!(second[0].2 > first[0].2);
        assert!(
            broker.sync_wanted(),
            "the ack and the delivery's record wait for the next fsync"
        );
        // A message not yet durable still waits, and so does whatever of
        // the same connection follows it.
        broker.send(2, 4, event("job.run", false), NOW);
        broker.ack(4, second[0].1, NOW);
        let out = ready(&mut broker);
        let third = delivered(&out);
        assert_eq!(third.iter().filter(|d| d.0 == 4).count(), 1, "{out:?}");
        broker.ack(4, third.iter().find(|d| d.0 == 4).expect("slow's").1, NOW);
        assert_eq!(
            delivered(&ready(&mut broker))
                .iter()
                .filter(|d| d.0 == 4)
                .count(),
            0,
            "the fourth message is not durable yet"
        );
        let job = broker.start_sync().expect("a sync");
        broker.finish_sync(job, Ok(()));
        let out = ready(&mut broker);
        let fourth: Vec<_> = delivered(&out).into_iter().filter(|d| d.0 == 4).collect();
        assert_eq!(fourth.len(), 1);
        // A nack without delay: the redelivery waits for the nack's fsync,
        // so attempts are not spent in a tight loop.
        broker.nack(4, fourth[0].1, 0, NOW);
        assert_eq!(delivered(&ready(&mut broker)).len(), 0);
        let job = broker.start_sync().expect("a sync");
        broker.finish_sync(job, Ok(()));
        assert_eq!(delivered(&ready(&mut broker)).len(), 1);
    }

    #[test]
    fn a_subscriptions_result_comes_before_its_first_backlog_delivery() {
        let mut broker = broker();
        let settle = |broker: &mut Broker<MemoryLog>| {
            let _ = ready(broker);
            if let Some(job) = broker.start_sync() {
                broker.finish_sync(job, Ok(()));
            }
            ready(broker)
        };
        broker.connect(6, "late", "late-1", 10);
        broker.subscribe(6, 1, "job.*", 0, 0, StartFrom::New, NOW);
        settle(&mut broker);
        broker.disconnect(6, NOW);
        broker.connect(2, "sender", "sender-1", 10);
        broker.send(2, 1, event("job.run", false), NOW);
        settle(&mut broker);
        // The backlog is durable; a new instance subscribes.
        broker.connect(7, "late", "late-2", 10);
        broker.subscribe(7, 5, "job.*", 0, 0, StartFrom::New, NOW);
        let mut out = ready(&mut broker);
        out.extend(settle(&mut broker));
        let order: Vec<&str> = out
            .iter()
            .filter_map(|a| match a {
                Action::OpResult { conn: 7, .. } => Some("result"),
                Action::Deliver { conn: 7, .. } => Some("deliver"),
                _ => None,
            })
            .collect();
        assert_eq!(order, ["result", "deliver"], "{out:?}");
    }

    #[test]
    fn a_failed_fsync_refuses_every_batch_waiting_for_it() {
        let mut broker = broker();
        let synced_before = broker.store().crash().synced_next_seq();
        broker.connect(2, "sender", "sender-1", 10);
        broker.connect(3, "sender", "sender-2", 10);
        broker.send(2, 1, event("job.run", false), NOW);
        assert!(ready(&mut broker).is_empty());
        let job = broker.start_sync().expect("a sync");
        broker.send(3, 1, event("job.run", false), NOW);
        assert!(ready(&mut broker).is_empty());
        broker.finish_sync(job, Err(std::io::Error::other("injected EIO")));
        let out = ready(&mut broker);
        assert_eq!(
            acks(&out),
            vec![
                (2, 1, ErrorCode::StorageFailed),
                (3, 1, ErrorCode::StorageFailed)
            ]
        );
        assert_eq!(deliveries(&out), 0, "nothing lost was delivered");
        assert!(broker.is_degraded());
        assert!(!broker.sync_wanted());
        assert_eq!(broker.store().crash().synced_next_seq(), synced_before);
    }

    #[derive(Debug, Clone)]
    enum Step {
        Send {
            conn: ConnId,
            transient: bool,
        },
        Ping {
            conn: ConnId,
        },
        Start,
        Finish {
            ok: bool,
        },
        Ready,
        /// The slow consumer acks (or nacks) its oldest delivery.
        Settle {
            nack: bool,
        },
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => (2..5u64, any::<bool>()).prop_map(|(conn, transient)| Step::Send { conn, transient }),
            1 => (2..5u64).prop_map(|conn| Step::Ping { conn }),
            2 => Just(Step::Start),
            2 => (0..8u8).prop_map(|n| Step::Finish { ok: n > 0 }),
            3 => Just(Step::Ready),
            3 => any::<bool>().prop_map(|nack| Step::Settle { nack }),
        ]
    }

    proptest! {
        /// Whatever the interleaving of batches, fsyncs and their failures:
        /// no acknowledgement or delivery of a stored message leaves before
        /// its record survives a crash (a backlog's deliveries included,
        /// which leave before their bookkeeping is durable), every send is
        /// answered once, and a connection's answers keep their order.
        #[test]
        fn nothing_leaves_before_it_is_durable(steps in prop::collection::vec(step(), 1..80)) {
            let mut broker = broker();
            for conn in 2..5 {
                broker.connect(conn, "sender", &format!("sender-{conn}"), 10);
            }
            // A consumer taking one message at a time: its acks bring the
            // next, from a backlog that may be durable already.
            broker.connect(SLOW, "slow", "slow-1", 1);
            broker.subscribe(SLOW, 0, "job.*", 0, 0, StartFrom::New, NOW);
            let mut outstanding = std::collections::VecDeque::new();
            let mut job = None;
            let mut next_seq = [0u64; 5];
            let mut answered: Vec<Vec<u64>> = vec![Vec::new(); 5];
            let mut sent = 0usize;
            let mut check = |broker: &mut Broker<MemoryLog>, out: Vec<Action>| {
                let mut to_slow = Vec::new();
                let durable = broker.store().crash();
                let mut kept = Vec::new();
                courier_store::MessageStore::scan_messages(&mut durable.clone(), 0, &mut |_, m| {
                    kept.push(m.id);
                })
                .expect("scan");
                for action in out {
                    match action {
                        Action::SendResult { conn, seq, code, log_seq, .. } => {
                            if code == ErrorCode::Ok && log_seq > 0 {
                                prop_assert!(log_seq < durable.synced_next_seq(), "ack of {} before its fsync", log_seq);
                            }
                            let conn = conn as usize;
                            prop_assert!(answered[conn].last().is_none_or(|last| *last < seq), "answers out of order");
                            answered[conn].push(seq);
                        }
                        Action::Deliver { conn, delivery, message, .. } if !message.transient => {
                            prop_assert!(kept.contains(&message.id), "delivered before its fsync");
                            if conn == SLOW {
                                to_slow.push(delivery);
                            }
                        }
                        _ => {}
                    }
                }
                Ok(to_slow)
            };
            for step in steps {
                match step {
                    Step::Send { conn, transient } => {
                        next_seq[conn as usize] += 1;
                        sent += 1;
                        broker.send(conn, next_seq[conn as usize], event("job.run", transient), NOW);
                        let out = ready(&mut broker);
                        outstanding.extend(check(&mut broker, out)?);
                    }
                    Step::Ping { conn } => {
                        broker.ping(conn, 0);
                        let out = ready(&mut broker);
                        outstanding.extend(check(&mut broker, out)?);
                    }
                    Step::Start => {
                        if job.is_none() {
                            job = broker.start_sync();
                        }
                    }
                    Step::Finish { ok } => {
                        if let Some(j) = job.take() {
                            let result = if ok { Ok(()) } else { Err(std::io::Error::other("injected")) };
                            broker.finish_sync(j, result);
                        }
                    }
                    Step::Ready => {
                        let out = ready(&mut broker);
                        outstanding.extend(check(&mut broker, out)?);
                    }
                    Step::Settle { nack } => {
                        if let Some(delivery) = outstanding.pop_front() {
                            if nack {
                                broker.nack(SLOW, delivery, 0, NOW);
                            } else {
                                broker.ack(SLOW, delivery, NOW);
                            }
                            let out = ready(&mut broker);
                            outstanding.extend(check(&mut broker, out)?);
                        }
                    }
                }
                // A degraded broker refuses durable sends until the disk works.
                if broker.is_degraded() {
                    broker.tick(NOW);
                    let mut out = Vec::new();
                    broker.take_actions(&mut out);
                    outstanding.extend(check(&mut broker, out)?);
                }
            }
            if let Some(j) = job.take() {
                broker.finish_sync(j, Ok(()));
            }
            let mut out = Vec::new();
            broker.take_actions(&mut out);
            outstanding.extend(check(&mut broker, out)?);
            let answers: usize = answered.iter().map(Vec::len).sum();
            prop_assert_eq!(answers, sent, "every send answered once");
        }
    }
}
