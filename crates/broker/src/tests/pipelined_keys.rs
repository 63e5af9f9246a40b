//! Pipelined ordering keys: a property test and the cases it found.

use super::*;

/// What a model instance does next (indices wrap over what exists).
#[derive(Debug, Clone)]
pub(super) enum KeyOp {
    Send {
        key: u8,
    },
    /// A new instance; `pipelined`: it speaks version 4.
    Connect {
        pipelined: bool,
    },
    /// The instance takes the next frame the broker wrote to it.
    Receive(usize),
    /// A running handler finishes: acks, or nacks (the verdict is queued
    /// on the instance's socket, not yet at the broker).
    Finish {
        instance: usize,
        handler: usize,
        ack: bool,
    },
    /// The instance's socket delivers its queued verdicts to the broker.
    Flush(usize),
    /// `kill -9`: running handlers stop, unsent verdicts are lost.
    Crash(usize),
    Advance(u16),
}

pub(super) fn key_op() -> impl Strategy<Value = KeyOp> {
    prop_oneof![
        4 => (0u8..3).prop_map(|key| KeyOp::Send { key }),
        1 => proptest::bool::weighted(0.75).prop_map(|pipelined| KeyOp::Connect { pipelined }),
        8 => (0usize..8).prop_map(KeyOp::Receive),
        6 => ((0usize..8), (0usize..8), proptest::bool::weighted(0.8))
            .prop_map(|(instance, handler, ack)| KeyOp::Finish { instance, handler, ack }),
        4 => (0usize..8).prop_map(KeyOp::Flush),
        1 => (0usize..8).prop_map(KeyOp::Crash),
        2 => (0u16..250).prop_map(KeyOp::Advance),
    ]
}

/// A delivery as an instance holds it: (delivery, key, index within the
/// key, run, attempt). `run` counts the key-start marks the instance has
/// seen for the key, so it knows which of its deliveries are from before
/// one.
type Held = (DeliveryId, u8, usize, u64, u32);

/// One instance as the SDK behaves: a version-4 one hands a key's
/// deliveries to its handler one at a time, in arrival order, drops what
/// arrived before a nack until the broker marks a key start; an older one
/// runs every delivery at once (the broker sends it one per key).
struct ModelInstance {
    conn: ConnId,
    pipelined: bool,
    alive: bool,
    /// Frames written to it and not yet read, in order.
    wire: VecDeque<(DeliveryId, u32, u8, usize)>,
    /// Verdicts written by it and not yet read by the broker: (delivery,
    /// ack, key, index).
    verdicts: VecDeque<(DeliveryId, bool, u8, usize)>,
    running: Vec<Held>,
    /// Per key: deliveries waiting for the running one, the current run,
    /// whether it drops until the next key start.
    lines: HashMap<u8, (VecDeque<Held>, u64, bool)>,
}

impl ModelInstance {
    fn busy(&self, key: u8) -> bool {
        self.pipelined && self.running.iter().any(|r| r.1 == key)
    }
}

/// Where the model's messages live: one broker's own store, or a backend
/// that keeps delivery state (the cluster's JetStream), simulated.
pub(super) trait ModelBackend: MessageStore + Sized {
    fn fresh() -> Self;
    /// After every step: what the backend does on its own (hands the node
    /// what it may fetch, takes the node's outcomes).
    fn run(_h: &mut Harness<Self>) {}
    /// At the end: nothing the backend holds is left undone.
    fn settled(h: &mut Harness<Self>) -> Result<(), TestCaseError> {
        let dead = h.broker.dead_letters("worker").len();
        prop_assert_eq!(
            h.broker.store().len(),
            dead,
            "only dead letters stay stored"
        );
        Ok(())
    }
}

impl ModelBackend for MemoryStore {
    fn fresh() -> Self {
        MemoryStore::new()
    }
}

pub(super) struct KeyModel<S: ModelBackend = MemoryStore> {
    h: Harness<S>,
    instances: Vec<ModelInstance>,
    next_conn: ConnId,
    /// Messages sent per key.
    sent: HashMap<u8, usize>,
    /// (key, index, attempt, instance, step) each time a handler is given
    /// a message.
    seen: Vec<(u8, usize, u32, usize, u64)>,
    /// The step at which an instance crashed or was closed by the broker.
    gone_at: HashMap<usize, u64>,
    /// The delivery whose ack the broker took, per (key, index).
    acked: HashMap<(u8, usize), DeliveryId>,
    /// When each delivery was handed to a handler.
    seen_at: HashMap<DeliveryId, u64>,
    step: u64,
    /// The delay a handler's nack asks for.
    nack_delay_ms: u32,
}

impl<S: ModelBackend> KeyModel<S> {
    pub(super) fn new(nack_delay_ms: u32) -> KeyModel<S> {
        let mut h = Harness::with_store(S::fresh());
        h.connect(1, "sender", 0);
        KeyModel {
            h,
            instances: Vec::new(),
            next_conn: 100,
            sent: HashMap::new(),
            seen: Vec::new(),
            gone_at: HashMap::new(),
            acked: HashMap::new(),
            seen_at: HashMap::new(),
            step: 0,
            nack_delay_ms,
        }
    }

    pub(super) fn connect(&mut self, pipelined: bool) {
        self.next_conn += 1;
        let conn = self.next_conn;
        self.h.connect(conn, "worker", 4);
        self.h.broker.set_pipelined_keys(conn, pipelined);
        self.h
            .broker
            .subscribe(conn, 0, "jobs.run", 100, 6, StartFrom::New, self.h.now);
        self.instances.push(ModelInstance {
            conn,
            pipelined,
            alive: true,
            wire: VecDeque::new(),
            verdicts: VecDeque::new(),
            running: Vec::new(),
            lines: HashMap::new(),
        });
    }

    fn live(&self, i: usize) -> Option<usize> {
        let live: Vec<usize> = (0..self.instances.len())
            .filter(|&j| self.instances[j].alive)
            .collect();
        (!live.is_empty()).then(|| live[i % live.len()])
    }

    fn gone(&mut self, i: usize) {
        let instance = &mut self.instances[i];
        instance.alive = false;
        instance.wire.clear();
        instance.verdicts.clear();
        instance.running.clear();
        instance.lines.clear();
        self.gone_at.insert(i, self.step);
    }

    /// Moves the broker's actions onto the instances' wires.
    fn absorb(&mut self) {
        for action in self.h.actions() {
            match action {
                Action::Deliver {
                    conn,
                    delivery,
                    attempt,
                    message,
                    ..
                } => {
                    let key = message.key.as_ref().expect("keyed")[0];
                    let index: usize = std::str::from_utf8(&message.payload)
                        .expect("utf-8")
                        .parse()
                        .expect("index");
                    if let Some(instance) = self.instances.iter_mut().find(|i| i.conn == conn) {
                        instance.wire.push_back((delivery, attempt, key, index));
                    }
                }
                Action::Close { conn, .. } => {
                    if let Some(i) = self.instances.iter().position(|i| i.conn == conn) {
                        self.gone(i);
                    }
                }
                _ => {}
            }
        }
    }

    fn hand_over(&mut self, i: usize, held: Held) {
        self.step += 1;
        self.seen.push((held.1, held.2, held.4, i, self.step));
        self.seen_at.insert(held.0, self.step);
        self.instances[i].running.push(held);
    }

    fn receive(&mut self, i: usize) {
        let Some((delivery, attempt, key, index)) = self.instances[i].wire.pop_front() else {
            return;
        };
        let instance = &mut self.instances[i];
        if !instance.pipelined {
            assert_eq!(
                attempt & courier_proto::ATTEMPT_KEY_START,
                0,
                "a key start went to a connection of version 3"
            );
            self.hand_over(i, (delivery, key, index, 0, attempt));
            return;
        }
        let line = instance.lines.entry(key).or_default();
        if attempt & courier_proto::ATTEMPT_KEY_START != 0 {
            line.1 += 1;
            line.2 = false;
            line.0.clear();
        }
        if line.2 {
            return;
        }
        let held = (
            delivery,
            key,
            index,
            line.1,
            attempt & !courier_proto::ATTEMPT_KEY_START,
        );
        if instance.busy(key) {
            if let Some(line) = instance.lines.get_mut(&key) {
                line.0.push_back(held);
            }
        } else {
            self.hand_over(i, held);
        }
    }

    fn finish(&mut self, i: usize, handler: usize, ack: bool) {
        let instance = &mut self.instances[i];
        if instance.running.is_empty() {
            return;
        }
        let held = instance.running.remove(handler % instance.running.len());
        instance.verdicts.push_back((held.0, ack, held.1, held.2));
        if !instance.pipelined {
            return;
        }
        let line = instance.lines.entry(held.1).or_default();
        if !ack && held.3 == line.1 {
            line.2 = true;
            line.0.clear();
        }
        if let Some(next) = line.0.pop_front() {
            self.hand_over(i, next);
        }
    }

    fn flush(&mut self, i: usize) {
        let conn = self.instances[i].conn;
        for (delivery, ack, key, index) in std::mem::take(&mut self.instances[i].verdicts) {
            let held = self
                .h
                .broker
                .services
                .get("worker")
                .and_then(|s| s.queue.in_flight.get(&delivery))
                .map(|f| f.conn);
            if ack && held == Some(conn) {
                self.acked.insert((key, index), delivery);
            }
            if ack {
                self.h.broker.ack(conn, delivery, self.h.now);
            } else {
                self.h
                    .broker
                    .nack(conn, delivery, self.nack_delay_ms, self.h.now);
            }
        }
    }

    pub(super) fn apply(&mut self, op: KeyOp) {
        match op {
            KeyOp::Send { key } => {
                let index = self.sent.entry(key).or_default();
                let mut m = Message::new(Kind::Command, "jobs.run", index.to_string());
                m.key = Some(Bytes::from(vec![key]));
                *index += 1;
                self.h.send(1, self.step, m);
            }
            KeyOp::Connect { pipelined } => self.connect(pipelined),
            KeyOp::Receive(i) => {
                if let Some(i) = self.live(i) {
                    self.receive(i);
                }
            }
            KeyOp::Finish {
                instance,
                handler,
                ack,
            } => {
                if let Some(i) = self.live(instance) {
                    self.finish(i, handler, ack);
                }
            }
            KeyOp::Flush(i) => {
                if let Some(i) = self.live(i) {
                    self.flush(i);
                }
            }
            KeyOp::Crash(i) => {
                if let Some(i) = self.live(i) {
                    let conn = self.instances[i].conn;
                    self.gone(i);
                    self.h.broker.disconnect(conn, self.h.now);
                }
            }
            KeyOp::Advance(ms) => self.h.advance(u64::from(ms)),
        }
        self.step += 1;
        S::run(&mut self.h);
        self.absorb();
    }

    /// No handler saw key k's message n + 1 before message n's last
    /// attempt — the delivery of n whose ack the broker took — was handed
    /// to a handler, unless the instance that saw n + 1 crashed (or was
    /// closed) afterwards: the at-least-once duplicate. (A delivery read
    /// after the broker took it back is a duplicate of its message, as
    /// with any message; it is not n's last attempt.)
    pub(super) fn check_order(&self) -> Result<(), TestCaseError> {
        for (key, index, _, instance, at) in &self.seen {
            if *index == 0 {
                continue;
            }
            let Some(last) = self.acked.get(&(*key, index - 1)) else {
                continue;
            };
            let before = self.seen_at.get(last).copied().unwrap_or(u64::MAX);
            let exempt = self.gone_at.get(instance).is_some_and(|g| g > at);
            prop_assert!(
                before < *at || exempt,
                "key {} message {} seen by instance {} at step {} before message {}'s last attempt (step {})",
                key, index, instance, at, index - 1, before
            );
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, .. ProptestConfig::default() })]

    /// Pipelined keys under random nacks, deadline expiries and crashes,
    /// beside instances of older clients: no handler sees a key's message
    /// n + 1 before message n's last attempt (but what an instance that
    /// then crashed had already handled), and everything is acked or
    /// dead-lettered in the end.
    #[test]
    fn pipelined_keys_never_overtake(ops in proptest::collection::vec(key_op(), 1..250)) {
        never_overtake::<MemoryStore>(ops, 20)?;
    }
}

/// The property of [`pipelined_keys_never_overtake`] on backend `S`, the
/// handlers' nacks asking for `nack_delay_ms`.
pub(super) fn never_overtake<S: ModelBackend>(
    ops: Vec<KeyOp>,
    nack_delay_ms: u32,
) -> Result<(), TestCaseError> {
    never_overtake_as::<S>(ops, nack_delay_ms, false)
}

/// [`never_overtake`]; `holds_lane`: on a backend, the node holds the
/// service's keyed lane (its keyed retries stay on it).
pub(super) fn never_overtake_as<S: ModelBackend>(
    ops: Vec<KeyOp>,
    nack_delay_ms: u32,
    holds_lane: bool,
) -> Result<(), TestCaseError> {
    let mut m = KeyModel::<S>::new(nack_delay_ms);
    if holds_lane {
        let now = m.h.now;
        m.h.broker.keyed_lane_gained("worker", now);
    }
    m.connect(true);
    for op in ops {
        m.apply(op);
        m.check_order()?;
    }
    // Settle: faults stop; a fresh instance joins; everyone reads,
    // acks and flushes until nothing is left — without the broker
    // giving up on anyone (a key start lets an instance that dropped
    // a key's stale deliveries take the key again).
    m.connect(true);
    let gone = m.gone_at.len();
    for _ in 0..400 {
        for i in 0..m.instances.len() {
            if !m.instances[i].alive {
                continue;
            }
            while !m.instances[i].wire.is_empty() {
                m.receive(i);
            }
            while !m.instances[i].running.is_empty() {
                m.finish(i, 0, true);
            }
            m.flush(i);
            S::run(&mut m.h);
            m.absorb();
        }
        m.h.advance(50);
        S::run(&mut m.h);
        m.absorb();
    }
    m.check_order()?;
    prop_assert_eq!(
        m.gone_at.len(),
        gone,
        "an instance was closed while all went well"
    );
    let depth =
        m.h.broker
            .services
            .get("worker")
            .map_or(0, |s| s.queue.depth());
    prop_assert_eq!(depth, 0, "everything acked or dead-lettered");
    S::settled(&mut m.h)
}

#[test]
fn a_pipelined_key_goes_out_ahead_and_a_nack_starts_it_again_in_order() {
    let mut h = Harness::new();
    h.connect(1, "web", 0);
    h.connect(2, "todo", 0);
    h.broker.set_pipelined_keys(2, true);
    h.subscribe(2, "todo.update");
    for (i, payload) in ["a", "b", "c"].into_iter().enumerate() {
        h.send(1, i as u64, keyed("todo.update", "k", payload));
    }
    let d = h.deliveries();
    assert_eq!(
        payloads(&d),
        vec![
            Bytes::from_static(b"a"),
            Bytes::from_static(b"b"),
            Bytes::from_static(b"c")
        ],
        "all three out before any ack"
    );
    assert_eq!(
        d.iter().map(|d| d.2).collect::<Vec<_>>(),
        vec![1 | courier_proto::ATTEMPT_KEY_START, 1, 1],
        "the first is marked as the start of its key"
    );
    h.broker.ack(2, d[0].1, h.now);
    h.broker.nack(2, d[1].1, 0, h.now);
    let again = h.deliveries();
    assert_eq!(
        payloads(&again),
        vec![Bytes::from_static(b"b"), Bytes::from_static(b"c")],
        "from the nacked one on, in order"
    );
    assert_eq!(
        again.iter().map(|d| d.2).collect::<Vec<_>>(),
        vec![2 | courier_proto::ATTEMPT_KEY_START, 1],
        "c's first delivery, taken back unhandled, does not count"
    );
}

#[test]
fn an_overdue_key_with_later_deliveries_out_closes_the_connection() {
    let mut h = Harness::new();
    h.connect(1, "web", 0);
    for conn in [2, 3] {
        h.connect(conn, "todo", 0);
        h.broker.set_pipelined_keys(conn, true);
        h.broker
            .subscribe(conn, 0, "todo.update", 100, 0, StartFrom::New, h.now);
    }
    for (i, payload) in ["a", "b"].into_iter().enumerate() {
        h.send(1, i as u64, keyed("todo.update", "k", payload));
    }
    let d = h.deliveries();
    assert_eq!(d.len(), 2);
    let holder = d[0].0;
    h.advance(101);
    let actions = h.actions();
    assert!(
        actions.iter().any(|a| matches!(
            a,
            Action::Close { conn, code: ErrorCode::AckDeadlinePassed, .. } if *conn == holder
        )),
        "{actions:?}"
    );
    let again: Vec<(ConnId, Bytes)> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Deliver { conn, message, .. } => Some((*conn, message.payload.clone())),
            _ => None,
        })
        .collect();
    let other = if holder == 2 { 3 } else { 2 };
    assert_eq!(
        again,
        vec![
            (other, Bytes::from_static(b"a")),
            (other, Bytes::from_static(b"b"))
        ]
    );
}

#[test]
fn an_older_client_still_gets_one_delivery_per_key_at_a_time() {
    let mut h = Harness::new();
    h.connect(1, "web", 0);
    h.connect(2, "todo", 0);
    h.subscribe(2, "todo.update");
    for (i, payload) in ["a", "b"].into_iter().enumerate() {
        h.send(1, i as u64, keyed("todo.update", "k", payload));
    }
    let d = h.deliveries();
    assert_eq!(payloads(&d), vec![Bytes::from_static(b"a")]);
    assert_eq!(d[0].2, 1, "no key-start mark for a version-3 connection");
}
