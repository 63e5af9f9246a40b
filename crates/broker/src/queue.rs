//! One service's delivery queue: what waits, what is in flight, what is
//! deferred, and the per-key locks that keep keyed messages in order.
//!
//! This is pure bookkeeping: it never looks at the clock itself (times are
//! passed in) and never talks to connections; [`crate::Broker`] decides who
//! gets what.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use bytes::Bytes;
use courier_store::Seq;

use crate::{DeliveryId, Nanos};

/// A message waiting in (or travelling through) one service's queue.
///
/// A backlog holds one per waiting message, so it is kept at 24 bytes:
/// the rare ordering key lives behind a pointer, not inline (`Bytes` alone
/// is 32) — a shared one: the entry is copied as it moves through the
/// queue, and its key goes into the key table, each a count, not a copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    pub seq: Seq,
    /// Deliveries made so far.
    pub attempts: u32,
    key: Option<Arc<Bytes>>,
}

impl Entry {
    pub fn new(seq: Seq, attempts: u32, key: Option<Bytes>) -> Entry {
        Entry {
            seq,
            attempts,
            // Its own copy: a key sliced from a read buffer or a log read
            // would keep all of that alive while the entry waits.
            key: key.map(|key| Arc::new(Bytes::copy_from_slice(&key))),
        }
    }

    /// The ordering key, if the message has one.
    pub fn key(&self) -> Option<&Bytes> {
        self.key.as_deref()
    }

    /// The ordering key as the key table holds it.
    fn shared_key(&self) -> Option<&Arc<Bytes>> {
        self.key.as_ref()
    }
}

/// Consecutive seqs waiting to go out, in one piece: `first`, `first + 1`
/// … `first + count - 1`. A span of more than one holds first deliveries
/// of messages without a key only; anything else (a retry, a keyed
/// message) is a span of one. Same 24 bytes as an [`Entry`].
#[derive(Debug, Clone, PartialEq, Eq)]
struct Span {
    first: Seq,
    count: u32,
    attempts: u32,
    key: Option<Arc<Bytes>>,
}

impl Span {
    fn of(entry: Entry) -> Span {
        Span {
            first: entry.seq,
            count: 1,
            attempts: entry.attempts,
            key: entry.key,
        }
    }

    fn extends(&self) -> bool {
        self.attempts == 0 && self.key.is_none() && self.count < u32::MAX
    }

    /// The entry at `offset` within the span.
    fn entry(&self, offset: u32) -> Entry {
        Entry {
            seq: self.first + u64::from(offset),
            attempts: self.attempts,
            key: self.key.clone(),
        }
    }
}

/// The ready messages of a queue, in order, as spans of consecutive seqs.
///
/// A backlog that built up while a service was offline is one run of
/// consecutive seqs (nothing else was logged in between): one span holds
/// all of it, where a deque of entries cost 24 bytes a message.
#[derive(Debug, Default)]
pub(crate) struct Ready {
    spans: VecDeque<Span>,
    len: usize,
    /// Where the last lookup ended: a span and how many entries come
    /// before it. The pump scans by increasing index; starting from here
    /// keeps that scan linear in the spans instead of quadratic. Valid as
    /// long as no span before it changes: pushing at the front resets it.
    cursor: std::cell::Cell<(usize, usize)>,
}

impl Ready {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn push_back(&mut self, entry: Entry) {
        self.len += 1;
        if entry.attempts == 0 && entry.key.is_none() {
            if let Some(back) = self.spans.back_mut() {
                if back.extends() && back.first + u64::from(back.count) == entry.seq {
                    back.count += 1;
                    self.back_grew();
                    return;
                }
            }
        }
        self.spans.push_back(Span::of(entry));
    }

    /// Adds `count` consecutive first deliveries without a key.
    pub fn push_back_run(&mut self, first: Seq, count: u32) {
        if count == 0 {
            return;
        }
        self.len += count as usize;
        if let Some(back) = self.spans.back_mut() {
            if back.extends()
                && back.first + u64::from(back.count) == first
                && back.count.checked_add(count).is_some()
            {
                back.count += count;
                self.back_grew();
                return;
            }
        }
        self.spans.push_back(Span {
            first,
            count,
            attempts: 0,
            key: None,
        });
    }

    /// The last span took more entries: a cursor left past it (its span
    /// was removed) would count them as before whatever span comes next.
    fn back_grew(&self) {
        if self.cursor.get().0 >= self.spans.len() {
            self.cursor.set((0, 0));
        }
    }

    pub fn push_front(&mut self, entry: Entry) {
        self.cursor.set((0, 0));
        self.len += 1;
        if entry.attempts == 0 && entry.key.is_none() {
            if let Some(front) = self.spans.front_mut() {
                if front.extends() && entry.seq + 1 == front.first {
                    front.first -= 1;
                    front.count += 1;
                    return;
                }
            }
        }
        self.spans.push_front(Span::of(entry));
    }

    #[cfg(test)]
    pub fn pop_front(&mut self) -> Option<Entry> {
        self.remove(0)
    }

    /// The span holding the `index`th ready entry, and the offset in it.
    fn locate(&self, index: usize) -> Option<(usize, u32)> {
        let (mut i, mut before) = self.cursor.get();
        if before > index || i >= self.spans.len() {
            (i, before) = (0, 0);
        }
        while let Some(span) = self.spans.get(i) {
            let count = span.count as usize;
            if index < before + count {
                self.cursor.set((i, before));
                return Some((i, (index - before) as u32));
            }
            before += count;
            i += 1;
        }
        None
    }

    pub fn get(&self, index: usize) -> Option<Entry> {
        let (i, offset) = self.locate(index)?;
        Some(self.spans[i].entry(offset))
    }

    pub fn remove(&mut self, index: usize) -> Option<Entry> {
        let (i, offset) = self.locate(index)?;
        self.len -= 1;
        let span = &mut self.spans[i];
        if span.count == 1 {
            let span = self.spans.remove(i)?;
            return Some(Entry {
                seq: span.first,
                attempts: span.attempts,
                key: span.key,
            });
        }
        let entry = span.entry(offset);
        if offset == 0 {
            span.first += 1;
            span.count -= 1;
        } else if offset == span.count - 1 {
            span.count -= 1;
        } else {
            let right = Span {
                first: entry.seq + 1,
                count: span.count - offset - 1,
                attempts: span.attempts,
                key: None,
            };
            span.count = offset;
            self.spans.insert(i + 1, right);
        }
        Some(entry)
    }

    /// Every ready entry, in order.
    pub fn iter(&self) -> impl Iterator<Item = Entry> + '_ {
        self.spans
            .iter()
            .flat_map(|span| (0..span.count).map(move |offset| span.entry(offset)))
    }

    /// The spans, as their first entry and how many seqs they hold.
    pub fn runs(&self) -> impl Iterator<Item = (Entry, u32)> + '_ {
        self.spans.iter().map(|span| (span.entry(0), span.count))
    }

    pub fn clear(&mut self) {
        self.spans.clear();
        self.len = 0;
        self.cursor.set((0, 0));
    }
}

#[derive(Debug, Clone)]
pub(crate) struct InFlight {
    pub entry: Entry,
    pub conn: u64,
    pub deadline: Nanos,
    /// Where the message's name is counted (`stats.rs`), so an ack or a
    /// nack counts without reading the message again.
    pub name: crate::stats::Slot,
    /// Its activity is traced: what becomes of the delivery is recorded
    /// (decided with the message at hand, so an ack need not read it).
    pub traced: bool,
    /// Its payload's size, so an ack takes it off [`Queue::bytes`]
    /// without reading the message again.
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub seq: Seq,
    pub attempts: u32,
    pub reason: String,
    pub at: Nanos,
}

/// One ordering key of a queue.
///
/// Invariant: the key's messages are, in order, `in_flight` (all on one
/// connection, `conn`), then `next` (ready, deferred for a retry, or set
/// aside unreadable), then `waiting`. Without `pipelined` at most one of
/// `in_flight` and `next` is non-empty, which is one message out at a
/// time; with it, `next` may go to `conn` while earlier ones are out.
#[derive(Debug, Default)]
struct KeyState {
    /// Delivered and not settled, oldest first: (delivery, seq).
    in_flight: VecDeque<(DeliveryId, Seq)>,
    /// The connection holding `in_flight` (meaningless while empty).
    conn: u64,
    /// `conn` takes the key's next messages before the earlier are acked.
    pipelined: bool,
    /// The message that goes out next, if it is not waiting.
    next: Option<Seq>,
    /// `next` itself while it waits for room on `conn` (then it is not in
    /// `ready`, [`Queue::park`]).
    parked: Option<Entry>,
    /// Later messages, in order.
    waiting: VecDeque<Entry>,
}

impl KeyState {
    fn is_empty(&self) -> bool {
        self.in_flight.is_empty() && self.next.is_none() && self.waiting.is_empty()
    }

    fn held(&self) -> usize {
        self.waiting.len() + usize::from(self.parked.is_some())
    }

    /// Whether the front of `waiting` may become `next`.
    fn may_advance(&self) -> bool {
        self.next.is_none() && (self.in_flight.is_empty() || self.pipelined)
    }
}

/// A pipelined delivery that is not the first unacked of its key on its
/// connection has no ack deadline running: its deadline starts when the
/// one before it is acked ([`Queue::finish`]).
pub(crate) const NOT_ARMED: Nanos = Nanos::MAX;

#[derive(Default)]
pub(crate) struct Queue {
    /// Ready to go, in arrival order.
    pub ready: Ready,
    /// Not before the time in the key; the `u64` keeps equal times in order.
    deferred: BTreeMap<(Nanos, u64), Entry>,
    deferred_tiebreak: u64,
    pub in_flight: crate::FastMap<DeliveryId, InFlight>,
    deadlines: BTreeSet<(Nanos, DeliveryId)>,
    /// Per ordering key: what is out, what goes next, what waits
    /// ([`KeyState`]). A key with nothing in any state has no entry.
    keys: crate::FastMap<Arc<Bytes>, KeyState>,
    /// Per connection, the keys whose next message is parked for it, in
    /// the order they were parked.
    parked: crate::FastMap<u64, VecDeque<Arc<Bytes>>>,
    /// Messages whose record could not be read: kept (counted in the
    /// depth, saved in snapshots as ready, holding their key) but not
    /// tried again until the next start, so they neither stall the pump
    /// nor repeat their warning.
    pub unreadable: Vec<Entry>,
    pub dead_letters: Vec<DeadLetter>,
    /// Payload bytes of the messages counted in [`Queue::depth`]. Entries
    /// do not carry their size (a backlog of first deliveries is one span
    /// of seqs), so the broker adds a message's size when it enters the
    /// queue and takes it off when the message leaves with the message
    /// (or its [`InFlight`]) at hand. An empty queue holds no bytes,
    /// whatever the count says ([`Queue::backlog_bytes`]).
    pub bytes: u64,
}

impl Queue {
    /// Messages held by this queue in any state (dead letters excluded).
    pub fn depth(&self) -> usize {
        self.ready.len()
            + self.deferred.len()
            + self.in_flight.len()
            + self.unreadable.len()
            + self.keys.values().map(KeyState::held).sum::<usize>()
    }

    /// Whether [`Queue::depth`] is 0, without counting: the per-key
    /// lines are looked at only when nothing else is held (counting them
    /// on every ack made each ack's cost grow with the number of keys).
    pub fn is_empty(&self) -> bool {
        self.ready.is_empty()
            && self.deferred.is_empty()
            && self.in_flight.is_empty()
            && self.unreadable.is_empty()
            && self.keys.values().all(|k| k.held() == 0)
    }

    /// Payload bytes waiting: what [`Queue::depth`] counts, in bytes.
    pub fn backlog_bytes(&self) -> u64 {
        if self.is_empty() {
            0
        } else {
            self.bytes
        }
    }

    /// A message of `bytes` payload entered the queue.
    pub fn count_in(&mut self, bytes: u64) {
        self.bytes = self.bytes.saturating_add(bytes);
    }

    /// A message of `bytes` payload left the queue (acked, expired,
    /// dead-lettered). Emptying the queue forgets any difference, so a
    /// message that left unread (its record gone) cannot skew the count
    /// for good.
    pub fn count_out(&mut self, bytes: u64) {
        self.bytes = self.bytes.saturating_sub(bytes);
        // The tests' builds check the shortcut against the count.
        debug_assert_eq!(self.is_empty(), self.depth() == 0);
        if self.is_empty() {
            self.bytes = 0;
        }
    }

    /// Adds a message that may go out now, unless its key is busy.
    ///
    /// Invariant ([`KeyState`]): per key, the messages go out in arrival
    /// order; the one that goes next is ready (or deferred for a retry),
    /// the later ones wait.
    pub fn make_ready(&mut self, entry: Entry) {
        if let Some(key) = entry.shared_key() {
            let state = self.keys.entry(key.clone()).or_default();
            if state.next == Some(entry.seq) {
                // A retry whose delay is over.
            } else if state.may_advance() && state.waiting.is_empty() {
                state.next = Some(entry.seq);
            } else {
                state.waiting.push_back(entry);
                return;
            }
        }
        self.ready.push_back(entry);
    }

    /// Retries go to the front: they are older than anything ready. A
    /// keyed one is its key's next message again ([`Queue::take_back`]
    /// made room for it).
    pub fn make_ready_again(&mut self, entry: Entry) {
        if let Some(key) = entry.shared_key() {
            self.keys.entry(key.clone()).or_default().next = Some(entry.seq);
        }
        self.ready.push_front(entry);
    }

    /// A retry after a delay; a keyed one holds its key meanwhile.
    pub fn defer_retry(&mut self, until: Nanos, entry: Entry) {
        if let Some(key) = entry.shared_key() {
            self.keys.entry(key.clone()).or_default().next = Some(entry.seq);
        }
        self.defer(until, entry);
    }

    /// A deferred message read back at recovery: one delivered before
    /// (a retry after a nack's delay) holds its key as it did, one never
    /// delivered (sent with a delay) takes its place among its key's only
    /// when due.
    pub fn defer_again(&mut self, until: Nanos, entry: Entry) {
        if entry.attempts > 0 {
            self.defer_retry(until, entry);
        } else {
            self.defer(until, entry);
        }
    }

    /// Not before `until`; a keyed message takes its place among its
    /// key's only then.
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

    /// Records a dispatch; the caller has bumped `attempts`. A keyed
    /// message was its key's next; to a `pipelined` connection the one
    /// after it becomes ready at once, and unless it is the first of its
    /// key out there its deadline is not armed yet ([`NOT_ARMED`]).
    /// Returns whether it is the first of its key now out on `conn`.
    pub fn start(&mut self, delivery: DeliveryId, mut flight: InFlight, pipelined: bool) -> bool {
        let mut first = true;
        if let Some(key) = flight.entry.shared_key() {
            let state = self.keys.entry(key.clone()).or_default();
            if state.next == Some(flight.entry.seq) {
                state.next = None;
            }
            first = state.in_flight.is_empty();
            state.in_flight.push_back((delivery, flight.entry.seq));
            state.conn = flight.conn;
            state.pipelined = pipelined;
            if !first {
                flight.deadline = NOT_ARMED;
            }
            if state.may_advance() {
                if let Some(next) = state.waiting.pop_front() {
                    state.next = Some(next.seq);
                    self.ready.push_back(next);
                }
            }
        }
        if flight.deadline != NOT_ARMED {
            self.deadlines.insert((flight.deadline, delivery));
        }
        self.in_flight.insert(delivery, flight);
        first
    }

    /// The connection the key's deliveries are out on, if any are.
    pub fn key_holder(&self, key: &Bytes) -> Option<u64> {
        self.keys
            .get(key)
            .filter(|k| !k.in_flight.is_empty())
            .map(|k| k.conn)
    }

    /// The ready entry at `index` is keyed, and the connection holding its
    /// key has no room: it leaves `ready` until that connection has room
    /// ([`Queue::unpark`]), so the pump does not look at it again and
    /// again meanwhile.
    pub fn park(&mut self, index: usize, conn: u64) {
        let Some(entry) = self.ready.remove(index) else {
            return;
        };
        let Some(key) = entry.shared_key().cloned() else {
            self.ready.push_front(entry);
            return;
        };
        let state = self.keys.entry(key.clone()).or_default();
        state.parked = Some(entry);
        self.parked.entry(conn).or_default().push_back(key);
    }

    /// `conn` has room for `room` more: that many of the keys parked for
    /// it put their next message back at the front of `ready`.
    pub fn unpark(&mut self, conn: u64, room: usize) {
        let Some(keys) = self.parked.get_mut(&conn) else {
            return;
        };
        let mut back = 0;
        while back < room {
            let Some(key) = keys.pop_front() else { break };
            let Some(state) = self.keys.get_mut(&key) else {
                continue;
            };
            if let Some(entry) = state.parked.take() {
                self.ready.push_front(entry);
                back += 1;
            }
        }
        if keys.is_empty() {
            self.parked.remove(&conn);
        }
    }

    /// Connections with keys parked for them.
    pub fn parked_for(&self) -> Vec<u64> {
        self.parked.keys().copied().collect()
    }

    /// Whether `delivery` (in flight) has later deliveries of its key out
    /// on the same connection.
    pub fn has_followers(&self, delivery: DeliveryId) -> bool {
        let Some(key) = self.in_flight.get(&delivery).and_then(|f| f.entry.key()) else {
            return false;
        };
        self.keys.get(key).is_some_and(|k| {
            k.in_flight.len() > 1 && k.in_flight.back().is_some_and(|(d, _)| *d != delivery)
        })
    }

    /// Moves the ack deadline of `delivery` to `deadline`, if `conn` holds it.
    pub fn extend(&mut self, delivery: DeliveryId, conn: u64, deadline: Nanos) {
        let Some(flight) = self.in_flight.get_mut(&delivery) else {
            return;
        };
        if flight.conn != conn || flight.deadline >= deadline {
            return;
        }
        self.deadlines.remove(&(flight.deadline, delivery));
        flight.deadline = deadline;
        self.deadlines.insert((deadline, delivery));
    }

    /// Takes a delivery out of flight (ack, nack, deadline or disconnect).
    /// The next delivery of its key out on that connection, if any, now
    /// is the first unacked: its deadline is armed at `next_deadline`.
    pub fn finish(&mut self, delivery: DeliveryId, next_deadline: Nanos) -> Option<InFlight> {
        let flight = self.in_flight.remove(&delivery)?;
        if flight.deadline != NOT_ARMED {
            self.deadlines.remove(&(flight.deadline, delivery));
        }
        if let Some(key) = flight.entry.key() {
            if let Some(state) = self.keys.get_mut(key) {
                // Acks come in the key's order: the delivery is almost
                // always the first, so this finds it at once (a scan of
                // the whole window per ack made a hot key's cost grow with
                // its window).
                let position = state.in_flight.iter().position(|(d, _)| *d == delivery);
                if let Some(index) = position {
                    state.in_flight.remove(index);
                }
                if position == Some(0) {
                    if let Some(&(next, _)) = state.in_flight.front() {
                        if let Some(f) = self.in_flight.get_mut(&next) {
                            if f.deadline == NOT_ARMED && next_deadline != NOT_ARMED {
                                f.deadline = next_deadline;
                                self.deadlines.insert((next_deadline, next));
                            }
                        }
                    }
                }
            }
        }
        Some(flight)
    }

    /// `seq` of `key` failed (nacked, overdue, its connection gone; it is
    /// out of flight already): every later delivery of the key still out
    /// is taken back, and they and the key's next message go back to the
    /// front of the key's waiting line, in order, so the key starts again
    /// from `seq`. Returns what was taken out of flight; their attempts
    /// are not counted (they come again behind `seq`, never handled:
    /// the receiver handles a key's deliveries in order).
    pub fn take_back(&mut self, key: &Bytes, seq: Seq) -> Vec<InFlight> {
        let Some(state) = self.keys.get_mut(key) else {
            return Vec::new();
        };
        let mut back: VecDeque<Entry> = VecDeque::new();
        let mut taken = Vec::new();
        let later: Vec<DeliveryId> = state
            .in_flight
            .iter()
            .filter(|(_, s)| *s > seq)
            .map(|(d, _)| *d)
            .collect();
        state.in_flight.retain(|(_, s)| *s <= seq);
        let next = state.next.take();
        for delivery in later {
            if let Some(mut flight) = self.in_flight.remove(&delivery) {
                if flight.deadline != NOT_ARMED {
                    self.deadlines.remove(&(flight.deadline, delivery));
                }
                flight.entry.attempts = flight.entry.attempts.saturating_sub(1);
                back.push_back(flight.entry.clone());
                taken.push(flight);
            }
        }
        let parked = state.parked.take();
        if let Some(entry) = parked {
            back.push_back(entry);
        } else if let Some(next) = next {
            back.extend(self.take_entry(next));
        }
        let Some(state) = self.keys.get_mut(key) else {
            return taken;
        };
        while let Some(entry) = back.pop_back() {
            state.waiting.push_front(entry);
        }
        taken
    }

    /// The entry of `seq` out of wherever a key's next waits: ready, set
    /// aside unreadable, or deferred for a retry.
    fn take_entry(&mut self, seq: Seq) -> Option<Entry> {
        let in_ready = self.ready.iter().position(|e| e.seq == seq);
        if let Some(index) = in_ready {
            return self.ready.remove(index);
        }
        if let Some(index) = self.unreadable.iter().position(|e| e.seq == seq) {
            return Some(self.unreadable.remove(index));
        }
        let due = self
            .deferred
            .iter()
            .find(|(_, e)| e.seq == seq)
            .map(|(k, _)| *k);
        due.and_then(|k| self.deferred.remove(&k))
    }

    /// On a backend that redelivers (docs/SCALE-OUT.md §5), a message of
    /// `key` went back to it: every later message of the key held here
    /// and not out — its next (wherever that waits), the parked one and
    /// the waiting line — leaves too, returned in order, to go back behind
    /// it. Kept here, the next would go out before the backend hands the
    /// earlier one out again. Deliveries still out keep the key.
    pub fn give_back_key(&mut self, key: &Bytes) -> Vec<Entry> {
        let Some(state) = self.keys.get_mut(key) else {
            return Vec::new();
        };
        let next = state.next.take();
        let mut back: Vec<Entry> = Vec::new();
        if let Some(parked) = state.parked.take() {
            back.push(parked);
        } else if let Some(next) = next {
            back.extend(self.take_entry(next));
        }
        let Some(state) = self.keys.get_mut(key) else {
            return back;
        };
        back.extend(state.waiting.drain(..));
        if state.is_empty() {
            self.keys.remove(key);
        }
        back
    }

    /// Every keyed message held here and not out, [`Queue::give_back_key`]
    /// for each key, in seq order (the order fetched): a node that no
    /// longer holds the keyed lane gives them all back.
    pub fn give_back_keyed(&mut self) -> Vec<Entry> {
        let keys: Vec<Arc<Bytes>> = self.keys.keys().cloned().collect();
        let mut back: Vec<Entry> = keys
            .iter()
            .flat_map(|key| self.give_back_key(key))
            .collect();
        back.sort_unstable_by_key(|e| e.seq);
        back
    }

    /// The message is done with (acked, dead-lettered, expired): the key
    /// lets its next message go when that is due.
    pub fn release_key(&mut self, entry: &Entry) {
        let Some(key) = entry.key() else { return };
        let Some(state) = self.keys.get_mut(key) else {
            return;
        };
        if state.next == Some(entry.seq) {
            state.next = None;
        }
        if state.may_advance() {
            if let Some(next) = state.waiting.pop_front() {
                state.next = Some(next.seq);
                self.ready.push_back(next);
            }
        }
        if state.is_empty() {
            self.keys.remove(key);
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
        self.runs()
            .flat_map(|(e, count, _)| (0..u64::from(count)).map(move |i| e.seq + i))
            .chain(self.dead_letters.iter().map(|d| d.seq))
            .collect()
    }

    /// Every waiting or in-flight entry as runs — the first entry, how many
    /// consecutive seqs, and the time it is deferred to. Only ready entries
    /// come in runs longer than one. In-flight entries are listed as ready:
    /// a snapshot or a rebuild treats them as not delivered (they come back
    /// after a crash anyway).
    pub fn runs(&self) -> impl Iterator<Item = (Entry, u32, Option<Nanos>)> + '_ {
        self.ready
            .runs()
            .map(|(e, count)| (e, count, None))
            .chain(
                self.deferred
                    .iter()
                    .map(|((t, _), e)| (e.clone(), 1, Some(*t))),
            )
            .chain(self.in_flight.values().map(|f| (f.entry.clone(), 1, None)))
            .chain(self.unreadable.iter().map(|e| (e.clone(), 1, None)))
            .chain(self.keys.values().flat_map(|k| {
                k.parked
                    .iter()
                    .chain(k.waiting.iter())
                    .map(|e| (e.clone(), 1, None))
            }))
    }

    /// Empties the queue (not its dead letters) and returns its entries as
    /// [`Queue::runs`] lists them, for rebuilding it in seq order.
    pub fn take_runs(&mut self) -> Vec<(Entry, u32, Option<Nanos>)> {
        let out = self.runs().collect();
        self.ready.clear();
        self.deferred.clear();
        self.in_flight.clear();
        self.deadlines.clear();
        self.keys.clear();
        self.parked.clear();
        self.unreadable.clear();
        out
    }

    /// Every message the queue holds, for purging; leaves it empty.
    pub fn drain_all(&mut self) -> Vec<Seq> {
        let mut seqs: Vec<Seq> = self.ready.iter().map(|e| e.seq).collect();
        self.ready.clear();
        seqs.extend(
            std::mem::take(&mut self.deferred)
                .into_values()
                .map(|e| e.seq),
        );
        seqs.extend(self.in_flight.drain().map(|(_, f)| f.entry.seq));
        seqs.extend(self.unreadable.drain(..).map(|e| e.seq));
        seqs.extend(
            self.keys
                .drain()
                .flat_map(|(_, k)| k.parked.into_iter().chain(k.waiting).map(|e| e.seq)),
        );
        self.parked.clear();
        seqs.extend(self.dead_letters.drain(..).map(|d| d.seq));
        self.deadlines.clear();
        self.bytes = 0;
        seqs
    }
}

#[cfg(test)]
mod tests;
