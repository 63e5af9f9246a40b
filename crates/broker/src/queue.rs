//! One service's delivery queue: what waits, what is in flight, what is
//! deferred, and the per-key locks that keep keyed messages in order.
//!
//! This is pure bookkeeping: it never looks at the clock itself (times are
//! passed in) and never talks to connections; [`crate::Broker`] decides who
//! gets what.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use bytes::Bytes;
use courier_store::Seq;

use crate::{DeliveryId, Nanos};

/// A message waiting in (or travelling through) one service's queue.
///
/// A backlog holds one per waiting message, so it is kept at 24 bytes:
/// the rare ordering key lives behind a pointer, not inline (`Bytes` alone
/// is 32).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    pub seq: Seq,
    /// Deliveries made so far.
    pub attempts: u32,
    key: Option<Box<Bytes>>,
}

impl Entry {
    pub fn new(seq: Seq, attempts: u32, key: Option<Bytes>) -> Entry {
        Entry {
            seq,
            attempts,
            key: key.map(Box::new),
        }
    }

    /// The ordering key, if the message has one.
    pub fn key(&self) -> Option<&Bytes> {
        self.key.as_deref()
    }
}

#[derive(Debug, Clone)]
pub(crate) struct InFlight {
    pub entry: Entry,
    pub conn: u64,
    pub deadline: Nanos,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub seq: Seq,
    pub attempts: u32,
    pub reason: String,
    pub at: Nanos,
}

#[derive(Default)]
pub(crate) struct Queue {
    /// Ready to go, in arrival order.
    pub ready: VecDeque<Entry>,
    /// Not before the time in the key; the `u64` keeps equal times in order.
    deferred: BTreeMap<(Nanos, u64), Entry>,
    deferred_tiebreak: u64,
    pub in_flight: crate::FastMap<DeliveryId, InFlight>,
    deadlines: BTreeSet<(Nanos, DeliveryId)>,
    /// Key → the message that holds it: dispatched and not yet acked, or
    /// waiting to be redelivered.
    key_holder: crate::FastMap<Bytes, Seq>,
    /// Keyed messages that arrived while their key was held, in order.
    key_waiting: crate::FastMap<Bytes, VecDeque<Entry>>,
    pub dead_letters: Vec<DeadLetter>,
}

impl Queue {
    /// Messages held by this queue in any state (dead letters excluded).
    pub fn depth(&self) -> usize {
        self.ready.len()
            + self.deferred.len()
            + self.in_flight.len()
            + self.key_waiting.values().map(VecDeque::len).sum::<usize>()
    }

    /// Adds a message that may go out now, unless its key is busy.
    ///
    /// Invariant: per key, at most one message (the holder) is ready,
    /// in flight or waiting to be retried; the others wait in arrival order.
    pub fn make_ready(&mut self, entry: Entry) {
        if let Some(key) = entry.key() {
            match self.key_holder.get(key) {
                None => {
                    self.key_holder.insert(key.clone(), entry.seq);
                }
                Some(holder) if *holder == entry.seq => {}
                Some(_) => {
                    self.key_waiting
                        .entry(key.clone())
                        .or_default()
                        .push_back(entry);
                    return;
                }
            }
        }
        self.ready.push_back(entry);
    }

    /// Retries go to the front: they are older than anything ready.
    pub fn make_ready_again(&mut self, entry: Entry) {
        self.ready.push_front(entry);
    }

    pub fn defer(&mut self, until: Nanos, entry: Entry) {
        self.deferred_tiebreak += 1;
        self.deferred.insert((until, self.deferred_tiebreak), entry);
    }

    /// Moves every deferred message due at `now` to ready.
    pub fn release_due(&mut self, now: Nanos) {
        while let Some(entry) = self
            .deferred
            .first_key_value()
            .filter(|((t, _), _)| *t <= now)
            .map(|(k, _)| *k)
        {
            if let Some(e) = self.deferred.remove(&entry) {
                self.make_ready(e);
            }
        }
    }

    /// Records a dispatch; the caller has bumped `attempts`.
    pub fn start(&mut self, delivery: DeliveryId, conn: u64, entry: Entry, deadline: Nanos) {
        self.deadlines.insert((deadline, delivery));
        self.in_flight.insert(
            delivery,
            InFlight {
                entry,
                conn,
                deadline,
            },
        );
    }

    /// Takes a delivery out of flight (ack, nack, deadline or disconnect).
    pub fn finish(&mut self, delivery: DeliveryId) -> Option<InFlight> {
        let flight = self.in_flight.remove(&delivery)?;
        self.deadlines.remove(&(flight.deadline, delivery));
        Some(flight)
    }

    /// The message is done with (acked, dead-lettered, expired): frees its
    /// key for the next waiting message of that key.
    pub fn release_key(&mut self, entry: &Entry) {
        let Some(key) = entry.key() else { return };
        if self.key_holder.get(key) != Some(&entry.seq) {
            return;
        }
        self.key_holder.remove(key);
        let Some(waiting) = self.key_waiting.get_mut(key) else {
            return;
        };
        let next = waiting.pop_front();
        if waiting.is_empty() {
            self.key_waiting.remove(key);
        }
        if let Some(next) = next {
            self.key_holder.insert(key.clone(), next.seq);
            self.ready.push_back(next);
        }
    }

    /// Deliveries whose deadline has passed at `now`.
    pub fn overdue(&self, now: Nanos) -> Vec<DeliveryId> {
        self.deadlines
            .iter()
            .take_while(|(t, _)| *t <= now)
            .map(|(_, d)| *d)
            .collect()
    }

    pub fn deliveries_of(&self, conn: u64) -> Vec<DeliveryId> {
        self.in_flight
            .iter()
            .filter(|(_, f)| f.conn == conn)
            .map(|(d, _)| *d)
            .collect()
    }

    pub fn next_timer(&self) -> Option<Nanos> {
        let deferred = self.deferred.keys().next().map(|(t, _)| *t);
        let deadline = self.deadlines.iter().next().map(|(t, _)| *t);
        match (deferred, deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Seqs of every message the queue holds (dead letters included).
    pub fn seqs(&self) -> std::collections::HashSet<Seq> {
        self.entries()
            .map(|(e, _)| e.seq)
            .chain(self.dead_letters.iter().map(|d| d.seq))
            .collect()
    }

    /// Every waiting or in-flight entry, with the time it is deferred to.
    /// In-flight entries are listed as ready: a snapshot or a rebuild
    /// treats them as not delivered (they come back after a crash anyway).
    pub fn entries(&self) -> impl Iterator<Item = (&Entry, Option<Nanos>)> {
        self.ready
            .iter()
            .map(|e| (e, None))
            .chain(self.deferred.iter().map(|((t, _), e)| (e, Some(*t))))
            .chain(self.in_flight.values().map(|f| (&f.entry, None)))
            .chain(
                self.key_waiting
                    .values()
                    .flat_map(|w| w.iter().map(|e| (e, None))),
            )
    }

    /// Empties the queue (not its dead letters) and returns its entries as
    /// [`Queue::entries`] lists them, for rebuilding it in seq order.
    pub fn take_entries(&mut self) -> Vec<(Entry, Option<Nanos>)> {
        let out = self.entries().map(|(e, t)| (e.clone(), t)).collect();
        self.ready.clear();
        self.deferred.clear();
        self.in_flight.clear();
        self.deadlines.clear();
        self.key_holder.clear();
        self.key_waiting.clear();
        out
    }

    /// Every message the queue holds, for purging; leaves it empty.
    pub fn drain_all(&mut self) -> Vec<Seq> {
        let mut seqs: Vec<Seq> = self.ready.drain(..).map(|e| e.seq).collect();
        seqs.extend(
            std::mem::take(&mut self.deferred)
                .into_values()
                .map(|e| e.seq),
        );
        seqs.extend(self.in_flight.drain().map(|(_, f)| f.entry.seq));
        seqs.extend(
            self.key_waiting
                .drain()
                .flat_map(|(_, w)| w.into_iter().map(|e| e.seq)),
        );
        seqs.extend(self.dead_letters.drain(..).map(|d| d.seq));
        self.deadlines.clear();
        self.key_holder.clear();
        seqs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keyed(seq: Seq, key: &'static str) -> Entry {
        Entry::new(seq, 0, Some(Bytes::from_static(key.as_bytes())))
    }

    #[test]
    fn an_entry_stays_small_because_a_backlog_holds_one_per_message() {
        assert_eq!(std::mem::size_of::<Entry>(), 24);
        let e = keyed(7, "k");
        assert_eq!(e.key().map(|k| &k[..]), Some(&b"k"[..]));
        assert_eq!(Entry::new(8, 2, None).key(), None);
    }

    #[test]
    fn keyed_messages_wait_for_their_key() {
        let mut q = Queue::default();
        q.make_ready(keyed(1, "a"));
        q.make_ready(keyed(2, "a"));
        q.make_ready(keyed(3, "b"));
        assert_eq!(
            q.ready.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![1, 3]
        );
        let first = q.ready.pop_front().expect("1");
        q.start(10, 1, first, 100);
        q.make_ready(keyed(4, "a"));
        assert_eq!(
            q.key_waiting
                .get(&Bytes::from_static(b"a"))
                .map(VecDeque::len),
            Some(2)
        );
        let flight = q.finish(10).expect("in flight");
        q.release_key(&flight.entry);
        assert_eq!(
            q.ready.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![3, 2]
        );
    }

    #[test]
    fn deferred_entries_come_out_in_time_order() {
        let mut q = Queue::default();
        q.defer(30, keyed(1, "x"));
        q.defer(10, keyed(2, "y"));
        q.defer(10, keyed(3, "z"));
        assert_eq!(q.next_timer(), Some(10));
        q.release_due(9);
        assert!(q.ready.is_empty());
        q.release_due(10);
        assert_eq!(
            q.ready.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![2, 3]
        );
        assert_eq!(q.next_timer(), Some(30));
    }
}
