//! Keeping fetched messages alive on JetStream while this node holds
//! them (docs/SCALE-OUT.md §4, §5): a message fetched and not settled yet
//! gets `+WPI` ("work in progress") every third of its consumer's
//! `ack_wait` (two chances to reach JetStream before it gives up on the
//! message), so JetStream hands it out again only when the node stops
//! sending it — dead, paused, or cut off — and never while the node still
//! holds it: a keyed retry waiting out its delay, a message queued behind
//! a hot key, a delivery whose deadline a reply stream restarted. The
//! core's own deadlines decide when a held message goes back.
//!
//! The fetch loop's hand-over records each message ([`InProgress::hold`]);
//! the store forgets it when it settles or drops it
//! ([`InProgress::release`]); [`keep_alive`] sends the `+WPI`s.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use crate::ack_subject::AckSubject;

/// How often the held messages are looked over. A message's `+WPI` goes
/// out at most this late after a third of its `ack_wait`.
pub const KEEP_ALIVE_TICK: Duration = Duration::from_millis(100);
/// The shortest period between two `+WPI`s of one message, whatever its
/// `ack_wait`.
pub const KEEP_ALIVE_PERIOD_MIN: Duration = Duration::from_millis(50);

const WORK_IN_PROGRESS: &[u8] = b"+WPI";

/// One consumer's held messages: kept alive together, in stream order,
/// on one schedule. JetStream redelivers what expired in the order it
/// expired, and a message's clock restarts at its `+WPI`: messages of a
/// key kept alive apart would expire — after a node dies — in the order
/// of their last `+WPI`, and the next holder would get a key's later
/// message before an earlier one. Refreshed together and in stream order,
/// they expire in stream order; one fetched after the last refresh
/// expires after them.
struct ConsumerHeld {
    next: Instant,
    every: Duration,
    /// Ack subjects by stream seq.
    handles: BTreeMap<u64, String>,
}

/// The messages this node holds unsettled, by consumer.
#[derive(Default)]
pub struct InProgress {
    held: Mutex<HashMap<String, ConsumerHeld>>,
}

/// A handle that is not an ack subject (none are) is kept under its own
/// name, seq 0.
fn consumer_and_seq(handle: &str) -> (String, u64) {
    match AckSubject::parse(handle) {
        Some(ack) => (ack.consumer.to_string(), ack.stream_seq),
        None => (handle.to_string(), 0),
    }
}

impl InProgress {
    pub fn new() -> Arc<InProgress> {
        Arc::new(InProgress::default())
    }

    fn held(&self) -> MutexGuard<'_, HashMap<String, ConsumerHeld>> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Keeps each `(ack subject, the consumer's ack_wait)` alive from
    /// `now` on, on its consumer's schedule.
    pub fn hold<'a>(&self, fetched: impl IntoIterator<Item = (&'a str, Duration)>, now: Instant) {
        let mut held = self.held();
        for (handle, ack_wait) in fetched {
            let every = (ack_wait / 3).max(KEEP_ALIVE_PERIOD_MIN);
            let (consumer, seq) = consumer_and_seq(handle);
            let entry = held.entry(consumer).or_insert_with(|| ConsumerHeld {
                next: now + every,
                every,
                handles: BTreeMap::new(),
            });
            entry.every = entry.every.min(every);
            entry.handles.insert(seq, handle.to_string());
        }
    }

    /// Stops keeping `handle` alive: it was settled, or given up.
    pub fn release(&self, handle: &str) {
        let (consumer, seq) = consumer_and_seq(handle);
        let mut held = self.held();
        if let Some(entry) = held.get_mut(&consumer) {
            entry.handles.remove(&seq);
            if entry.handles.is_empty() {
                held.remove(&consumer);
            }
        }
    }

    /// Stops keeping alive every message of `consumer` (a keyed lane
    /// whose lease this node lost: the new holder must get them back).
    pub fn release_consumer(&self, consumer: &str) {
        self.held().remove(consumer);
    }

    /// How many messages are kept alive.
    pub fn len(&self) -> usize {
        self.held().values().map(|c| c.handles.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The ack subjects whose `+WPI` is due at `now`, each due
    /// consumer's all of them in stream order; each is due again a period
    /// later.
    pub fn take_due(&self, now: Instant) -> Vec<String> {
        let mut due = Vec::new();
        for entry in self.held().values_mut() {
            if entry.next <= now {
                entry.next = now + entry.every;
                due.extend(entry.handles.values().cloned());
            }
        }
        due
    }
}

/// Sends the due `+WPI`s every [`KEEP_ALIVE_TICK`] until `in_progress`
/// is dropped everywhere else. A `+WPI` that cannot be sent is not
/// retried before its next period: one missed leaves a third of `ack_wait`.
pub async fn keep_alive(client: async_nats::Client, in_progress: std::sync::Weak<InProgress>) {
    let mut tick = tokio::time::interval(KEEP_ALIVE_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(in_progress) = in_progress.upgrade() else {
            return;
        };
        let due = in_progress.take_due(Instant::now());
        drop(in_progress);
        for handle in due {
            if let Err(e) = client
                .publish(handle, Bytes::from_static(WORK_IN_PROGRESS))
                .await
            {
                tracing::debug!("a +WPI was not sent: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack(consumer: &str, stream_seq: u64) -> String {
        format!("$JS.ACK.COURIER_MSGS.{consumer}.1.{stream_seq}.{stream_seq}.1700000000000000000.0")
    }

    #[test]
    fn a_held_message_is_due_every_third_of_ack_wait_until_released() {
        let in_progress = InProgress::default();
        let start = Instant::now();
        let (a, b) = (ack("svc-todo", 1), ack("svc-audit", 2));
        in_progress.hold(
            [
                (a.as_str(), Duration::from_secs(3)),
                (b.as_str(), Duration::from_secs(30)),
            ],
            start,
        );
        assert!(in_progress.take_due(start).is_empty());
        assert!(in_progress
            .take_due(start + Duration::from_millis(999))
            .is_empty());
        assert_eq!(
            in_progress.take_due(start + Duration::from_secs(1)),
            vec![a.clone()]
        );
        // Due again a whole period after it was last sent.
        assert!(in_progress
            .take_due(start + Duration::from_millis(1500))
            .is_empty());
        assert_eq!(
            in_progress.take_due(start + Duration::from_secs(2)),
            vec![a.clone()]
        );
        in_progress.release(&a);
        let due = in_progress.take_due(start + Duration::from_secs(20));
        assert_eq!(due, [b]);
        assert_eq!(in_progress.len(), 1);
    }

    #[test]
    fn a_consumers_messages_are_kept_alive_together_in_stream_order() {
        let in_progress = InProgress::default();
        let start = Instant::now();
        let wait = Duration::from_secs(3);
        let later = ack("svc-todo-keyed", 49);
        in_progress.hold([(later.as_str(), wait)], start);
        let earlier: Vec<String> = (34..=48).map(|seq| ack("svc-todo-keyed", seq)).collect();
        // Fetched half a period later (a redelivery of earlier seqs, say).
        in_progress.hold(
            earlier.iter().map(|h| (h.as_str(), wait)),
            start + Duration::from_millis(500),
        );
        let due = in_progress.take_due(start + Duration::from_secs(1));
        let mut expected = earlier.clone();
        expected.push(later);
        assert_eq!(due, expected, "all of the consumer's, lowest seq first");
    }

    #[test]
    fn a_lost_lane_lease_releases_that_consumers_messages_only() {
        let in_progress = InProgress::default();
        let start = Instant::now();
        let (keyed, unkeyed) = (ack("svc-todo-keyed", 1), ack("svc-todo", 2));
        in_progress.hold(
            [
                (keyed.as_str(), Duration::from_secs(1)),
                (unkeyed.as_str(), Duration::from_secs(1)),
            ],
            start,
        );
        in_progress.release_consumer("svc-todo-keyed");
        assert_eq!(
            in_progress.take_due(start + Duration::from_secs(1)),
            [unkeyed]
        );
    }

    #[test]
    fn a_tiny_ack_wait_is_kept_alive_no_more_often_than_the_minimum() {
        let in_progress = InProgress::default();
        let start = Instant::now();
        let a = ack("svc-todo", 1);
        in_progress.hold([(a.as_str(), Duration::from_millis(10))], start);
        assert!(in_progress
            .take_due(start + Duration::from_millis(40))
            .is_empty());
        assert_eq!(in_progress.take_due(start + KEEP_ALIVE_PERIOD_MIN), [a]);
    }
}
