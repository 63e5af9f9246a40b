//! A node's core on a replicated backend: it queues nothing it accepts,
//! delivers what was fetched, and tells the store how each delivery ended.

use super::*;
use courier_store::{AckHandle, Replayed, StoreError, Upstream};
use std::collections::{BTreeMap, HashMap};

/// Holds fetched messages and records what the core told it, as the
/// cluster store does against JetStream.
#[derive(Default)]
struct BackendStore {
    /// Readable by seq like a log's records: a core that queued what it
    /// appended would deliver it.
    appended: BTreeMap<Seq, Arc<Message>>,
    /// Appended seqs the core said it traces (a backend carries that).
    appended_traced: std::collections::HashSet<Seq>,
    /// Held seqs whose accepting node traces them.
    held_traced: std::collections::HashSet<Seq>,
    held: BTreeMap<Seq, (Arc<Message>, AckHandle)>,
    /// Held messages removed without an outcome (given back).
    given_back: Vec<AckHandle>,
    told: Vec<Upstream>,
    next_seq: Seq,
    syncs: u32,
    /// The next sync fails (no quorum).
    fail_next_sync: bool,
    /// Failed syncs: the writes they waited for may not be stored.
    discards: u64,
    /// Seqs the core told an outcome of (ack, nak, dead letter).
    settled: std::collections::HashSet<Seq>,
    /// Every held seq's handle, kept after it is removed: outcomes come
    /// by seq.
    handle_of: HashMap<Seq, AckHandle>,
    /// A JetStream consumer of what was appended, for the key model.
    consumer: SimConsumer,
    /// Syncs run as jobs ([`Broker::start_sync`]), as the server runs
    /// them, instead of in place.
    sync_jobs: bool,
}

/// A durable pull consumer as JetStream runs one (as
/// `courier_cluster::model` has it): redeliveries that are due go first,
/// in stream order, then new messages in stream order; a NAK makes a
/// message due after its delay. Handles are stream seqs.
#[derive(Default)]
struct SimConsumer {
    /// The last stream seq handed out as new.
    fetched_upto: Seq,
    /// Handed out and not settled: stream seq → (deliveries, due again).
    pending: BTreeMap<Seq, (u32, Option<Nanos>)>,
}

impl BackendStore {
    fn take_seq(&mut self) -> Seq {
        self.next_seq += 1;
        self.next_seq
    }
}

impl MessageStore for BackendStore {
    fn append(&mut self, message: Arc<Message>) -> Result<Seq, StoreError> {
        let seq = self.take_seq();
        self.appended.insert(seq, message);
        Ok(seq)
    }
    fn append_traced(&mut self, message: Arc<Message>, traced: bool) -> Result<Seq, StoreError> {
        let seq = self.append(message)?;
        if traced {
            self.appended_traced.insert(seq);
        }
        Ok(seq)
    }
    fn journal(&mut self, _entry: &[u8]) -> Result<Seq, StoreError> {
        Err(StoreError::Io("no journal on a backend".to_string()))
    }
    fn get(&mut self, seq: Seq) -> Result<Option<Arc<Message>>, StoreError> {
        Ok(self
            .held
            .get(&seq)
            .map(|h| h.0.clone())
            .or_else(|| self.appended.get(&seq).cloned()))
    }
    fn remove(&mut self, seq: Seq) {
        let settled = self.settled.contains(&seq);
        if let Some((_, handle)) = self.held.remove(&seq) {
            if !settled {
                self.given_back.push(handle);
            }
        }
    }
    fn sync(&mut self) -> Result<(), StoreError> {
        self.syncs += 1;
        if std::mem::take(&mut self.fail_next_sync) {
            self.discards += 1;
            return Err(StoreError::Io("no quorum".to_string()));
        }
        Ok(())
    }
    fn discards(&self) -> u64 {
        self.discards
    }
    fn replay_chunk(&mut self, _: Seq, _: usize) -> Result<Vec<(Seq, Replayed)>, StoreError> {
        Ok(Vec::new())
    }
    fn save_snapshot(&mut self, _: Seq, _: &[u8]) -> Result<(), StoreError> {
        Ok(())
    }
    fn load_snapshot(&mut self) -> Result<Option<(Seq, Bytes)>, StoreError> {
        Ok(None)
    }
    fn scan_messages(
        &mut self,
        _: Seq,
        _: &mut dyn FnMut(Seq, Arc<Message>),
    ) -> Result<(), StoreError> {
        Ok(())
    }
    fn seq_at_time(&mut self, _: u64) -> Result<Seq, StoreError> {
        Ok(self.next_seq + 1)
    }
    fn next_seq(&self) -> Seq {
        self.next_seq + 1
    }
    fn compact(&mut self, _: Seq, _: u64) -> Result<u64, StoreError> {
        Ok(0)
    }
    fn len(&self) -> usize {
        self.held.len()
    }
    fn keeps_deliveries(&self) -> bool {
        false
    }
    fn persistent(&self) -> bool {
        self.sync_jobs
    }
    fn start_sync(&mut self) -> Result<Option<courier_store::SyncJob>, StoreError> {
        if self.sync_jobs {
            return Ok(Some(courier_store::SyncJob::marker(self.next_seq + 1)));
        }
        self.sync().map(|()| None)
    }
    fn hold_fetched(
        &mut self,
        message: Arc<Message>,
        handle: AckHandle,
        traced: bool,
    ) -> Result<Seq, StoreError> {
        let seq = self.take_seq();
        if traced {
            self.held_traced.insert(seq);
        }
        self.handle_of.insert(seq, handle.clone());
        self.held.insert(seq, (message, handle));
        Ok(seq)
    }
    fn fetched_traced(&self, seq: Seq) -> bool {
        self.held_traced.contains(&seq)
    }
    fn upstream(&mut self, change: Upstream) {
        if let Upstream::Ack { seq }
        | Upstream::Nak { seq, .. }
        | Upstream::DeadLetter { seq, .. } = &change
        {
            self.settled.insert(*seq);
        }
        self.told.push(change);
    }
}

impl BackendStore {
    /// The consumer takes the node's outcomes: acks and dead letters settle,
    /// NAKs (and what was given back unsettled) come due after their delay.
    fn consumer_takes_outcomes(&mut self, now: Nanos) {
        let stream_seq = |handle: Option<&AckHandle>| handle.and_then(|h| h.parse::<Seq>().ok());
        for told in std::mem::take(&mut self.told) {
            match told {
                Upstream::Ack { seq } | Upstream::DeadLetter { seq, .. } => {
                    if let Some(s) = stream_seq(self.handle_of.get(&seq)) {
                        self.consumer.pending.remove(&s);
                    }
                }
                Upstream::Nak { seq, delay_ms } => {
                    if let Some(s) = stream_seq(self.handle_of.get(&seq)) {
                        if let Some(p) = self.consumer.pending.get_mut(&s) {
                            p.1 = Some(now + delay_ms * MS);
                        }
                    }
                }
                _ => {}
            }
        }
        for handle in std::mem::take(&mut self.given_back) {
            if let Some(p) =
                stream_seq(Some(&handle)).and_then(|s| self.consumer.pending.get_mut(&s))
            {
                p.1 = Some(now);
            }
        }
    }

    /// The next message the consumer hands out at `now`, if any.
    fn consumer_next(&mut self, now: Nanos) -> Option<(Seq, u32, Arc<Message>)> {
        let due = self
            .consumer
            .pending
            .iter()
            .find(|(_, (_, due))| due.is_some_and(|t| t <= now))
            .map(|(s, _)| *s);
        let seq = match due {
            Some(seq) => seq,
            None => {
                let (seq, _) = self
                    .appended
                    .range(self.consumer.fetched_upto + 1..)
                    .find(|(_, m)| m.name.as_str() == "jobs.run")?;
                self.consumer.fetched_upto = *seq;
                *seq
            }
        };
        let message = self.appended.get(&seq)?.clone();
        let pending = self.consumer.pending.entry(seq).or_insert((0, None));
        pending.0 += 1;
        pending.1 = None;
        Some((seq, pending.0, message))
    }
}

impl super::pipelined_keys::ModelBackend for BackendStore {
    fn fresh() -> Self {
        BackendStore::default()
    }

    /// The edge's fetch loop: as many as the node has room for.
    fn run(h: &mut Harness<Self>) {
        let now = h.now;
        h.broker.store_mut().consumer_takes_outcomes(now);
        while h.broker.fetch_credit("worker", false) > 0 {
            let Some((seq, attempt, message)) = h.broker.store_mut().consumer_next(now) else {
                break;
            };
            let fetched = Fetched {
                service: "worker".to_string(),
                message,
                attempt,
                handle: seq.to_string(),
                reply_node: None,
                traced: false,
            };
            h.broker.fetched(fetched, now);
            h.broker.store_mut().consumer_takes_outcomes(now);
        }
    }

    fn settled(h: &mut Harness<Self>) -> Result<(), TestCaseError> {
        let now = h.now;
        h.broker.store_mut().consumer_takes_outcomes(now);
        let store = h.broker.store();
        prop_assert!(
            store.consumer.pending.is_empty(),
            "unsettled on the backend: {:?}",
            store.consumer.pending
        );
        prop_assert!(store.held.is_empty(), "still held on the node");
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, .. ProptestConfig::default() })]

    /// On a backend that keeps delivery state (a node's keyed lane on the
    /// cluster): the same property as one broker's under crashes,
    /// deadline expiries and nacks, with the backend's redeliveries in
    /// its own order; nacks without a delay here (given back at once)…
    #[test]
    fn pipelined_keys_never_overtake_on_a_backend(
        ops in proptest::collection::vec(super::pipelined_keys::key_op(), 1..250)
    ) {
        super::pipelined_keys::never_overtake::<BackendStore>(ops, 0)?;
    }

    /// … and with one (kept on the node: given back, the backend would
    /// hand out the key's later messages before the delay is over).
    #[test]
    fn pipelined_keys_never_overtake_on_a_backend_after_a_delayed_nack(
        ops in proptest::collection::vec(super::pipelined_keys::key_op(), 1..250)
    ) {
        super::pipelined_keys::never_overtake::<BackendStore>(ops, 20)?;
    }

    /// … and on the keyed lane's holder, which keeps every keyed retry
    /// (a NAK would race the messages of the key already on their way).
    #[test]
    fn pipelined_keys_never_overtake_on_the_keyed_lanes_holder(
        ops in proptest::collection::vec(super::pipelined_keys::key_op(), 1..250)
    ) {
        super::pipelined_keys::never_overtake_as::<BackendStore>(ops, 0, true)?;
    }
}

fn node() -> Harness<BackendStore> {
    Harness::with_store(BackendStore::default())
}

fn fetched(service: &str, message: Message, attempt: u32, handle: &str) -> Fetched {
    Fetched {
        service: service.to_string(),
        message: Arc::new(message),
        attempt,
        handle: handle.to_string(),
        reply_node: None,
        traced: false,
    }
}

/// The delivery records this node made since the last call, by handle.
fn delivered_records(h: &mut Harness<BackendStore>) -> Vec<String> {
    let mut records = Vec::new();
    h.broker.take_traces(&mut records);
    records
        .iter()
        .filter_map(|r| match r {
            TraceRecord::Delivered { seq, .. } => h.broker.store().handle_of.get(seq).cloned(),
            _ => None,
        })
        .collect()
}

#[test]
fn a_delivering_node_traces_what_the_accepting_node_traces_and_nothing_else() {
    // The accepting node: its sampler's answer goes to the backend with
    // the message.
    let mut accepting = node();
    accepting.broker.set_tracing(Some(0));
    accepting.connect(1, "worker", 10);
    accepting.subscribe(1, "job.*");
    accepting.connect(2, "web", 10);
    accepting.send(2, 7, event("job.done", "x"));
    accepting.send(2, 8, event("audit.done", "x"));
    let store = accepting.broker.store();
    assert_eq!(store.appended.len(), 2, "routed, and kept for replays");
    assert!(
        store
            .appended
            .keys()
            .all(|seq| store.appended_traced.contains(seq)),
        "a traced activity's message went to the backend without saying so"
    );

    // The delivering node traces everything it would accept itself (rate
    // 0), yet records deliveries only of what the accepting node traced.
    let mut h = node();
    h.broker.set_tracing(Some(0));
    h.connect(1, "worker", 10);
    h.subscribe(1, "job.*");
    let _ = delivered_records(&mut h);
    let traced_elsewhere = Fetched {
        traced: true,
        ..fetched("worker", event("job.done", "a"), 1, "101")
    };
    h.broker.fetched(traced_elsewhere, h.now);
    h.broker
        .fetched(fetched("worker", event("job.done", "b"), 1, "102"), h.now);
    let delivered = h.actions();
    assert_eq!(
        delivered
            .iter()
            .filter(|a| matches!(a, Action::Deliver { .. }))
            .count(),
        2,
        "{delivered:?}"
    );
    assert_eq!(delivered_records(&mut h), vec!["101".to_string()]);
}

#[test]
fn an_accepted_message_is_published_not_queued_here() {
    let mut h = node();
    assert!(h.broker.delivers_upstream());
    h.connect(1, "worker", 10);
    h.subscribe(1, "job.*");
    h.connect(2, "web", 10);
    h.send(2, 7, command("job.run", "x"));
    let actions = h.actions();
    assert_eq!(results(&actions), vec![(7, ErrorCode::Ok)]);
    assert!(
        !actions.iter().any(|a| matches!(a, Action::Deliver { .. })),
        "delivered here as well as by the backend: {actions:?}"
    );
    let store = h.broker.store();
    assert_eq!(store.appended.len(), 1);
    assert!(store.syncs >= 1, "answered before the backend confirmed");
}

#[test]
fn a_subscription_is_told_upstream_and_answered_after_the_sync() {
    let mut h = node();
    h.connect(1, "worker", 10);
    // The connection's registry entry was told; the subscription follows.
    h.broker.store_mut().told.clear();
    h.broker
        .subscribe(1, 5, "job.*", 2_000, 3, StartFrom::New, h.now);
    let syncs_before = h.broker.store().syncs;
    let actions = h.actions();
    assert!(actions.iter().any(|a| matches!(
        a,
        Action::OpResult {
            request: 5,
            code: ErrorCode::Ok,
            ..
        }
    )));
    assert!(h.broker.store().syncs > syncs_before);
    assert_eq!(
        h.broker.store().told,
        vec![Upstream::Subscribe {
            service: "worker".to_string(),
            pattern: "job.*".to_string(),
            ack_deadline_ms: 2_000,
            max_deliveries: 3,
            history: StartFrom::New,
        }]
    );
    // History replay is the backend's: asked for with the change of a
    // pattern new to the service, never for one it has.
    h.broker
        .subscribe(1, 6, "audit.>", 0, 0, StartFrom::Time(42), h.now);
    h.broker
        .subscribe(1, 7, "job.*", 0, 0, StartFrom::Beginning, h.now);
    let actions = h.actions();
    for request in [6, 7] {
        assert!(actions.iter().any(|a| matches!(
            a,
            Action::OpResult { request: r, code: ErrorCode::Ok, .. } if *r == request
        )));
    }
    let told = &h.broker.store().told;
    assert!(
        matches!(&told[1], Upstream::Subscribe { pattern, history: StartFrom::Time(42), .. } if pattern == "audit.>"),
        "{told:?}"
    );
    assert!(
        matches!(&told[2], Upstream::Subscribe { pattern, history: StartFrom::New, .. } if pattern == "job.*"),
        "{told:?}"
    );
}

#[test]
fn a_fetched_message_is_delivered_and_its_ack_told_upstream() {
    let mut h = node();
    h.connect(1, "worker", 10);
    h.subscribe(1, "job.*");
    h.actions();
    h.broker.fetched(
        fetched("worker", command("job.run", "a"), 1, "ack-a"),
        h.now,
    );
    let delivered = h.deliveries();
    assert_eq!(delivered.len(), 1);
    assert_eq!(delivered[0].2, 1);
    let seq = *h.broker.store().held.keys().next().expect("held");
    h.broker.ack(1, delivered[0].1, h.now);
    h.actions();
    let store = h.broker.store();
    assert!(store.told.contains(&Upstream::Ack { seq }));
    assert!(store.held.is_empty(), "still held after its ack");
    assert!(store.given_back.is_empty());
}

#[test]
fn a_nack_goes_back_to_the_backend_and_is_not_retried_here() {
    let mut h = node();
    h.connect(1, "worker", 10);
    h.subscribe(1, "job.*");
    h.actions();
    h.broker.fetched(
        fetched("worker", command("job.run", "a"), 2, "ack-a"),
        h.now,
    );
    let delivered = h.deliveries();
    assert_eq!(delivered[0].2, 2, "the backend's attempt count is kept");
    let seq = *h.broker.store().held.keys().next().expect("held");
    h.broker.nack(1, delivered[0].1, 250, h.now);
    h.actions();
    assert!(h
        .broker
        .store()
        .told
        .contains(&Upstream::Nak { seq, delay_ms: 250 }));
    h.advance(1_000);
    assert!(h.deliveries().is_empty(), "retried here too");
    assert!(h.broker.store().held.is_empty());
}

#[test]
fn the_last_attempt_becomes_the_backends_dead_letter() {
    let mut h = node();
    h.connect(1, "worker", 10);
    h.broker
        .subscribe(1, 0, "job.*", 0, 3, StartFrom::New, h.now);
    h.actions();
    h.broker.fetched(
        fetched("worker", command("job.run", "a"), 3, "ack-a"),
        h.now,
    );
    let delivered = h.deliveries();
    let seq = *h.broker.store().held.keys().next().expect("held");
    h.broker.nack(1, delivered[0].1, 0, h.now);
    h.actions();
    let told = &h.broker.store().told;
    assert!(
        told.iter().any(|t| matches!(t, Upstream::DeadLetter { seq: s, attempts: 3, service, .. } if *s == seq && service == "worker")),
        "{told:?}"
    );
    assert!(
        h.broker.dead_letters("worker").is_empty(),
        "kept here as well"
    );
}

#[test]
fn what_no_instance_here_can_take_goes_back_at_once() {
    let mut h = node();
    h.connect(1, "worker", 1);
    h.subscribe(1, "job.*");
    h.actions();
    assert_eq!(h.broker.fetch_credit("worker", false), 1);
    h.broker.fetched(
        fetched("worker", command("job.run", "a"), 1, "ack-a"),
        h.now,
    );
    h.broker.fetched(
        fetched("worker", command("job.run", "b"), 1, "ack-b"),
        h.now,
    );
    assert_eq!(h.deliveries().len(), 1);
    assert_eq!(h.broker.fetch_credit("worker", false), 0);
    assert_eq!(h.broker.consuming_services(), vec!["worker".to_string()]);
    h.broker.disconnect(1, h.now);
    h.actions();
    let store = h.broker.store();
    assert!(store.held.is_empty(), "kept after its only consumer left");
    // The one in flight is nacked (an attempt); the waiting one is given
    // back unsettled.
    assert_eq!(store.given_back, vec!["ack-b".to_string()]);
    assert!(store
        .told
        .iter()
        .any(|t| matches!(t, Upstream::Nak { delay_ms: 0, .. })));
    assert!(h.broker.consuming_services().is_empty());
}

#[test]
fn the_membership_count_moves_with_what_the_service_lists_read_and_not_with_traffic() {
    let mut h = node();
    let mut seen = h.broker.membership_changes();
    let mut moved = |h: &Harness<BackendStore>, by: &str| {
        let now = h.broker.membership_changes();
        assert!(now > seen, "{by} left the count at {now}");
        seen = now;
    };
    h.connect(1, "worker", 4);
    moved(&h, "a connect");
    h.subscribe(1, "job.*");
    moved(&h, "a subscription");
    h.connect(2, "web", 4);
    moved(&h, "a second connect");
    let quiet = h.broker.membership_changes();
    h.broker.fetched(
        fetched("worker", command("job.run", "a"), 1, "ack-a"),
        h.now,
    );
    h.send(2, 1, command("job.run", "b"));
    assert!(!h.deliveries().is_empty());
    assert_eq!(
        h.broker.membership_changes(),
        quiet,
        "sends and deliveries moved it"
    );
    h.broker.subscriptions_changed(
        "report",
        Some(RemoteSubscriptions {
            ack_deadline_ms: 1_000,
            max_deliveries: 4,
            patterns: vec![("job.*".to_string(), false)],
        }),
        h.now,
    );
    moved(&h, "another node's subscription");
    h.broker.unsubscribe(1, 2, "job.*");
    moved(&h, "an unsubscribe");
    h.broker.disconnect(1, h.now);
    moved(&h, "a disconnect");
}

#[test]
fn a_message_for_a_service_not_subscribed_here_is_given_back() {
    let mut h = node();
    h.broker.fetched(
        fetched("worker", command("job.run", "a"), 1, "ack-a"),
        h.now,
    );
    assert!(h.deliveries().is_empty());
    assert!(h.broker.store().held.is_empty());
}

#[test]
fn subscriptions_made_on_other_nodes_route_here() {
    let mut h = node();
    h.connect(2, "web", 10);
    h.send(2, 1, command("job.run", "x"));
    assert_eq!(results(&h.actions())[0].1, ErrorCode::NoReceiver);
    h.broker.store_mut().told.clear();
    h.broker.subscriptions_changed(
        "worker",
        Some(RemoteSubscriptions {
            ack_deadline_ms: 1_000,
            max_deliveries: 4,
            patterns: vec![("job.*".to_string(), false)],
        }),
        h.now,
    );
    h.send(2, 2, command("job.run", "x"));
    assert_eq!(results(&h.actions()), vec![(2, ErrorCode::Ok)]);
    assert!(
        h.broker.store().told.is_empty(),
        "another node's change told back"
    );
    h.broker.subscriptions_changed("worker", None, h.now);
    h.send(2, 3, command("job.run", "x"));
    assert_eq!(results(&h.actions())[0].1, ErrorCode::NoReceiver);
}

#[test]
fn a_reply_to_a_command_from_another_node_is_forwarded_there() {
    let mut h = node();
    h.connect(1, "worker", 10);
    h.subscribe(1, "job.*");
    h.actions();
    let cmd = command("job.run", "a");
    let id = cmd.id;
    let mut f = fetched("worker", cmd, 1, "ack-a");
    f.reply_node = Some("node-b".to_string());
    h.broker.fetched(f, h.now);
    assert_eq!(h.deliveries().len(), 1);
    let mut reply = Message::new(Kind::Reply, "job.done", "ok");
    reply.response_to = Some(id);
    reply.is_final = true;
    h.send(1, 9, reply);
    let actions = h.actions();
    let forwarded = actions.iter().find_map(|a| match a {
        Action::ForwardReply {
            conn: 1,
            seq: 9,
            node,
            message,
            ..
        } => Some((node.clone(), message.clone())),
        _ => None,
    });
    let (node, message) = forwarded.expect("forwarded");
    assert_eq!(node, "node-b");
    assert_eq!(message.sender.as_str(), "worker");
    assert!(
        results(&actions).is_empty(),
        "answered before node-b took it"
    );
    h.broker
        .forwarded_reply_answer(1, 9, false, ErrorCode::Ok, String::new());
    assert_eq!(results(&h.actions()), vec![(9, ErrorCode::Ok)]);
    // Final: a second reply finds no route here, and none elsewhere.
    let mut again = Message::new(Kind::Reply, "job.done", "ok");
    again.response_to = Some(id);
    h.send(1, 10, again);
    let actions = h.actions();
    let asked = actions.iter().find_map(|a| match a {
        Action::FindReplyRoute {
            conn: 1,
            seq: 10,
            message,
            ..
        } => Some(message.clone()),
        _ => None,
    });
    let asked = asked.expect("the other nodes asked");
    h.broker.reply_route_found(1, 10, false, asked, None, h.now);
    assert_eq!(results(&h.actions()), vec![(10, ErrorCode::UnknownRequest)]);
}

#[test]
fn a_reply_to_a_command_another_node_knows_goes_where_that_node_says() {
    let mut h = node();
    h.broker.subscriptions_changed(
        "ledger",
        Some(RemoteSubscriptions {
            patterns: vec![("ledger.*".to_string(), false)],
            ..Default::default()
        }),
        h.now,
    );
    // What this node says of the commands it accepted and fetched.
    h.connect(2, "shop", 10);
    let accepted = command("ledger.post", "x");
    let accepted_id = accepted.id;
    h.send(2, 1, accepted);
    h.actions();
    assert_eq!(
        h.broker.reply_route_of(accepted_id),
        Some(KnownReplyRoute {
            node: None,
            receivers: vec!["ledger".to_string()],
            requester: "shop".to_string(),
        })
    );
    h.connect(1, "ledger", 10);
    h.subscribe(1, "ledger.*");
    h.actions();
    let mut elsewhere = command("ledger.post", "y");
    elsewhere.sender = "shop".into();
    let elsewhere_id = elsewhere.id;
    let mut f = fetched("ledger", elsewhere, 1, "ack-y");
    f.reply_node = Some("node-c".to_string());
    h.broker.fetched(f, h.now);
    h.actions();
    assert_eq!(
        h.broker.reply_route_of(elsewhere_id),
        Some(KnownReplyRoute {
            node: Some("node-c".to_string()),
            receivers: vec!["ledger".to_string()],
            requester: "shop".to_string(),
        })
    );
    assert_eq!(h.broker.reply_route_of(Uuid::now_v7()), None);

    // A replier that moved here replies to a command it got elsewhere.
    let unknown = Uuid::now_v7();
    let reply = |is_final: bool| {
        let mut reply = Message::new(Kind::Reply, "ledger.posted", "ok");
        reply.response_to = Some(unknown);
        reply.is_final = is_final;
        reply
    };
    h.send(1, 7, reply(false));
    let actions = h.actions();
    assert!(results(&actions).is_empty(), "answered before it was found");
    let asked = actions
        .iter()
        .find_map(|a| match a {
            Action::FindReplyRoute {
                conn: 1,
                seq: 7,
                message,
                ..
            } => Some(message.clone()),
            _ => None,
        })
        .expect("the other nodes asked");
    assert_eq!(
        asked.sender.as_str(),
        "ledger",
        "stamped before it is asked for"
    );
    let known = KnownReplyRoute {
        node: Some("node-b".to_string()),
        receivers: vec!["ledger".to_string()],
        requester: "shop".to_string(),
    };
    h.broker.reply_route_found(
        1,
        7,
        false,
        asked,
        Some(("node-b".to_string(), known.clone())),
        h.now,
    );
    let forwarded = h.actions().into_iter().find_map(|a| match a {
        Action::ForwardReply {
            conn: 1,
            seq: 7,
            node,
            requester,
            ..
        } => Some((node, requester)),
        _ => None,
    });
    assert_eq!(forwarded, Some(("node-b".to_string(), "shop".to_string())));
    // The stream's next reply goes straight there.
    h.send(1, 8, reply(true));
    assert!(h.actions().iter().any(|a| matches!(
        a,
        Action::ForwardReply { seq: 8, node, .. } if node == "node-b"
    )));

    // Only a service the command went to may reply to it.
    h.connect(3, "mallory", 10);
    let mut forged = reply(true);
    forged.response_to = Some(Uuid::now_v7());
    h.send(3, 1, forged);
    let asked = h
        .actions()
        .into_iter()
        .find_map(|a| match a {
            Action::FindReplyRoute { message, .. } => Some(message),
            _ => None,
        })
        .expect("asked");
    h.broker.reply_route_found(
        3,
        1,
        false,
        asked,
        Some(("node-b".to_string(), known)),
        h.now,
    );
    assert_eq!(results(&h.actions()), vec![(1, ErrorCode::Unauthorized)]);
}

#[test]
fn a_forwarded_reply_reaches_the_requester_on_this_node() {
    let mut h = node();
    h.broker.subscriptions_changed(
        "worker",
        Some(RemoteSubscriptions {
            patterns: vec![("job.*".to_string(), false)],
            ..Default::default()
        }),
        h.now,
    );
    h.connect(2, "web", 10);
    let cmd = command("job.run", "x");
    let id = cmd.id;
    h.send(2, 1, cmd);
    h.actions();
    let mut reply = Message::new(Kind::Reply, "job.done", "ok");
    reply.response_to = Some(id);
    reply.sender = "intruder".into();
    let answer = h.broker.remote_reply(Arc::new(reply.clone()), 1, h.now);
    assert!(
        matches!(answer, RemoteReply::Answer(ErrorCode::Unauthorized, _)),
        "{answer:?}"
    );
    reply.sender = "worker".into();
    reply.is_final = true;
    let answer = h.broker.remote_reply(Arc::new(reply.clone()), 1, h.now);
    assert_eq!(answer, RemoteReply::Answer(ErrorCode::Ok, String::new()));
    let delivered = h.deliveries();
    assert_eq!(delivered.len(), 1);
    assert_eq!(delivered[0].0, 2);
    let answer = h.broker.remote_reply(Arc::new(reply), 1, h.now);
    assert!(
        matches!(answer, RemoteReply::Answer(ErrorCode::UnknownRequest, _)),
        "{answer:?}"
    );
}

/// The answers to forwarded replies, by the number their node awaits.
fn forwarded_answers(actions: &[Action]) -> Vec<(u64, ErrorCode, String)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::AnswerForwardedReply {
                answer,
                code,
                reason,
            } => Some((*answer, *code, reason.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn forwarded_replies_of_a_stream_wait_for_the_requesters_credit() {
    let mut h = node();
    h.broker.subscriptions_changed(
        "file",
        Some(RemoteSubscriptions {
            patterns: vec![("file.copy".to_string(), false)],
            ..Default::default()
        }),
        h.now,
    );
    h.connect(5, "web", 10);
    let cmd = stream_command("2");
    let id = cmd.id;
    h.send(5, 1, cmd);
    h.actions();
    let reply = |payload: &str, is_final: bool| {
        let mut r = reply_to(id, payload, is_final);
        r.sender = "file".into();
        Arc::new(r)
    };
    // Two go out at once; the next two wait; a fifth is refused.
    for (answer, payload) in [(1, "r1"), (2, "r2")] {
        let fate = h.broker.remote_reply(reply(payload, false), answer, h.now);
        assert_eq!(fate, RemoteReply::Answer(ErrorCode::Ok, String::new()));
    }
    let (r3, r4) = (reply("r3", false), reply("r4", false));
    for (answer, waiting) in [(3, &r3), (4, &r4)] {
        let fate = h.broker.remote_reply(waiting.clone(), answer, h.now);
        assert_eq!(fate, RemoteReply::Pending, "waits for credit");
    }
    let fate = h.broker.remote_reply(reply("r5", false), 5, h.now);
    assert!(
        matches!(fate, RemoteReply::Answer(ErrorCode::StreamFull, _)),
        "{fate:?}"
    );
    let actions = h.actions();
    assert_eq!(
        delivered_to(&actions),
        vec![(5, "r1".into()), (5, "r2".into())]
    );
    let first = delivery_ids(&actions, 5);
    // A resend of a waiting reply (its responder's node asked again) is
    // answered with it.
    let again = h.broker.remote_reply(r3, 6, h.now);
    assert_eq!(again, RemoteReply::Pending);
    // Credit back: r3 goes out and both its senders hear it.
    h.broker.ack(5, first[0], h.now);
    let actions = h.actions();
    assert_eq!(delivered_to(&actions), vec![(5, "r3".into())]);
    assert_eq!(
        forwarded_answers(&actions),
        vec![
            (3, ErrorCode::Ok, String::new()),
            (6, ErrorCode::Ok, String::new())
        ]
    );
    // The requester stops reading: r4 is discarded, its sender told why.
    h.broker.nack(5, first[1], 0, h.now);
    let answers = forwarded_answers(&h.actions());
    assert_eq!(answers.len(), 1);
    assert_eq!((answers[0].0, answers[0].1), (4, ErrorCode::Ok));
    assert!(answers[0].2.starts_with("discarded: "), "{answers:?}");
}

#[test]
fn a_reply_whose_requester_left_this_node_goes_to_its_service_elsewhere_or_waits_here() {
    let mut h = node();
    h.broker.subscriptions_changed(
        "worker",
        Some(RemoteSubscriptions {
            patterns: vec![("job.*".to_string(), false)],
            ..Default::default()
        }),
        h.now,
    );
    h.connect(2, "web", 10);
    let cmd = command("job.run", "x");
    let id = cmd.id;
    h.send(2, 1, cmd);
    h.actions();
    assert_eq!(h.broker.services_with_instances(), vec!["web".to_string()]);
    h.broker.disconnect(2, h.now);
    h.actions();
    assert!(h.broker.services_with_instances().is_empty());
    let mut reply = Message::new(Kind::Reply, "job.done", "ok");
    reply.response_to = Some(id);
    reply.sender = "worker".into();
    let answer = h.broker.remote_reply(Arc::new(reply.clone()), 1, h.now);
    assert_eq!(
        answer,
        RemoteReply::ToService("web".to_string()),
        "no instance of web here: offered to its instances on other nodes"
    );
    assert_eq!(
        h.broker
            .reply_to_service("web", Arc::new(reply.clone()), h.now),
        None,
        "none here to take it"
    );
    // Nowhere to go: kept for the next instance of web to connect here.
    h.broker.park_reply("web", Arc::new(reply.clone()));
    h.connect(3, "web", 10);
    let delivered = h.deliveries();
    assert_eq!(delivered.len(), 1);
    assert_eq!(delivered[0].0, 3);
    // An instance here takes what other nodes offer its service.
    assert_eq!(
        h.broker.reply_to_service("web", Arc::new(reply), h.now),
        Some((ErrorCode::Ok, String::new()))
    );
    assert_eq!(h.deliveries().len(), 1);
}

#[test]
fn a_pattern_pauses_alone_or_the_whole_service_on_a_backend() {
    let mut h = node();
    h.connect(1, "worker", 10);
    h.subscribe(1, "job.*");
    h.subscribe(1, "audit.>");
    h.actions();
    let told = h.broker.store().told.len();
    let paused = h
        .broker
        .pause_subscription("worker", Some("job.*"), h.now)
        .expect("one pattern pauses");
    assert_eq!(paused, ["job.*"]);
    assert_eq!(
        h.broker.store().told[told..],
        [Upstream::Pause {
            service: "worker".into(),
            pattern: "job.*".into(),
            whole: false,
        }],
        "the backend holds the pattern's messages"
    );
    assert_eq!(
        h.broker.fetch_credit("worker", false),
        10,
        "the other pattern goes on"
    );
    h.broker
        .resume_subscription("worker", Some("job.*"), h.now)
        .expect("it resumes");
    let paused = h
        .broker
        .pause_subscription("worker", None, h.now)
        .expect("the whole service pauses");
    assert_eq!(paused.len(), 2);
    assert_eq!(
        h.broker.fetch_credit("worker", false),
        0,
        "fetches while paused"
    );
    h.broker
        .resume_subscription("worker", None, h.now)
        .expect("the whole service resumes");
    assert_eq!(h.broker.fetch_credit("worker", false), 10);
}

#[test]
fn the_services_listing_is_handed_to_the_edge_to_add_other_nodes_instances() {
    let mut h = node();
    h.connect(1, "worker", 10);
    h.subscribe(1, "job.*");
    h.connect(2, "ops", 10);
    h.actions();
    let list = command("courier.services.list", "");
    let request = list.id;
    h.send(2, 3, list);
    let actions = h.actions();
    assert_eq!(results(&actions), vec![(3, ErrorCode::Ok)]);
    assert!(
        !actions
            .iter()
            .any(|a| matches!(a, Action::Deliver { conn: 2, .. })),
        "answered with this node's instances only: {actions:?}"
    );
    let listing = actions
        .iter()
        .find_map(|a| match a {
            Action::ServicesQuery {
                conn: 2,
                request: r,
                listing,
                ..
            } if *r == request => Some(listing),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no question to the edge: {actions:?}"));
    let worker = listing
        .as_array()
        .and_then(|l| l.iter().find(|s| s["name"] == "worker"))
        .unwrap_or_else(|| panic!("no worker: {listing}"));
    assert_eq!(worker["patterns"], serde_json::json!(["job.*"]));
    assert_eq!(worker["instances"].as_array().map(Vec::len), Some(1));
}

#[test]
fn a_transient_message_no_instance_here_takes_is_offered_to_other_nodes() {
    let mut h = node();
    h.broker.set_tracing(Some(0));
    h.broker.subscriptions_changed(
        "dash",
        Some(RemoteSubscriptions {
            patterns: vec![("metrics.*".to_string(), false)],
            ..Default::default()
        }),
        h.now,
    );
    h.connect(2, "probe", 10);
    let mut m = event("metrics.cpu", "0.5");
    m.transient = true;
    h.send(2, 1, m);
    let actions = h.actions();
    let offered: Vec<(&str, bool)> = actions
        .iter()
        .filter_map(|a| match a {
            Action::ForwardTransient {
                service, traced, ..
            } => Some((service.as_str(), *traced)),
            _ => None,
        })
        .collect();
    assert_eq!(
        offered,
        vec![("dash", true)],
        "offered, saying it is traced"
    );
    // Offered here from elsewhere: one local instance takes it, or nobody.
    let mut m = event("metrics.cpu", "0.7");
    m.transient = true;
    let m = Arc::new(m);
    h.broker
        .remote_transient("dash", m.clone(), None, false, h.now);
    let actions = h.actions();
    assert!(
        !actions
            .iter()
            .any(|a| matches!(a, Action::ForwardTransient { .. })),
        "offered on again: {actions:?}"
    );
    h.connect(1, "dash", 10);
    h.subscribe(1, "metrics.*");
    h.actions();
    let mut records = Vec::new();
    h.broker.take_traces(&mut records);
    // What the offering node left out is not traced here, however this
    // node's own sampler would answer; what it traces is.
    h.broker
        .remote_transient("dash", m.clone(), None, false, h.now);
    h.broker.remote_transient("dash", m, None, true, h.now);
    let delivered = h.deliveries();
    assert_eq!(delivered.len(), 2);
    assert_eq!(delivered[0].0, 1);
    h.broker.take_traces(&mut records);
    let traced = records
        .iter()
        .filter(|r| matches!(r, TraceRecord::Delivered { .. }))
        .count();
    assert_eq!(traced, 1, "{records:?}");
}

#[test]
fn a_reply_to_a_transient_command_offered_here_goes_back_to_the_node_that_took_it() {
    let mut h = node();
    h.connect(1, "worker", 10);
    h.subscribe(1, "job.*");
    h.actions();
    let mut cmd = command("job.run", "x");
    cmd.transient = true;
    cmd.sender = "web".into();
    let id = cmd.id;
    h.broker.remote_transient(
        "worker",
        Arc::new(cmd),
        Some("node-a".to_string()),
        false,
        h.now,
    );
    assert_eq!(h.deliveries().len(), 1);
    let mut reply = Message::new(Kind::Reply, "job.done", "ok");
    reply.response_to = Some(id);
    reply.transient = true;
    h.send(1, 7, reply);
    let forwarded = h.actions().into_iter().find_map(|a| match a {
        Action::ForwardReply {
            node, requester, ..
        } => Some((node, requester)),
        _ => None,
    });
    assert_eq!(
        forwarded,
        Some(("node-a".to_string(), "web".to_string())),
        "forwarded to the node the command came from"
    );
}

#[test]
fn a_failed_publish_refuses_its_send_and_keeps_the_nodes_state() {
    let mut h = node();
    h.connect(1, "worker", 10);
    h.subscribe(1, "job.*");
    h.actions();
    h.broker.fetched(
        fetched("worker", command("job.run", "a"), 1, "ack-a"),
        h.now,
    );
    assert_eq!(h.deliveries().len(), 1);
    h.connect(2, "web", 10);
    h.broker.store_mut().fail_next_sync = true;
    h.send(2, 1, command("job.run", "x"));
    let actions = h.actions();
    assert_eq!(results(&actions), vec![(1, ErrorCode::StorageFailed)]);
    // Nothing rebuilt from the (empty) store: the subscription routes, and
    // what was fetched is still held and in flight.
    h.advance(10);
    h.send(2, 2, command("job.run", "y"));
    assert_eq!(results(&h.actions()), vec![(2, ErrorCode::Ok)]);
    assert_eq!(h.broker.store().held.len(), 1);
    assert_eq!(h.broker.fetch_credit("worker", false), 9);
}

/// A send refused as not stored, sent again with its id, is a new send:
/// stored, and acknowledged once stored — never acknowledged as the
/// duplicate of a copy the backend does not have. Both ways of syncing:
/// in place, and on the group-commit thread (how a node runs).
#[test]
fn a_send_refused_as_not_stored_is_stored_when_sent_again() {
    for on_commit_thread in [false, true] {
        let mut h = node();
        h.connect(1, "worker", 10);
        h.subscribe(1, "job.*");
        h.connect(2, "web", 10);
        h.actions();
        let sync_and_take = |h: &mut Harness<BackendStore>| {
            if !on_commit_thread {
                return h.actions();
            }
            let mut out = Vec::new();
            h.broker.take_ready_actions(&mut out);
            if let Some(mut job) = h.broker.start_sync() {
                let result = job.run();
                h.broker.finish_sync(job, result);
            }
            h.broker.take_ready_actions(&mut out);
            out
        };
        let order = command("job.run", "x");
        h.broker.store_mut().fail_next_sync = true;
        h.send(2, 1, order.clone());
        let refused = sync_and_take(&mut h);
        assert_eq!(
            results(&refused),
            vec![(1, ErrorCode::StorageFailed)],
            "{refused:?}"
        );
        h.advance(10);
        h.send(2, 2, order.clone());
        let answered = sync_and_take(&mut h);
        let reasons: Vec<&str> = answered
            .iter()
            .filter_map(|a| match a {
                Action::SendResult { seq: 2, reason, .. } => Some(reason.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(results(&answered), vec![(2, ErrorCode::Ok)]);
        assert_eq!(
            reasons,
            [""],
            "answered as a duplicate of what was not stored"
        );
        assert_eq!(
            h.broker.store().appended.len(),
            2,
            "the resend was not stored"
        );
        // Now it is stored: a third copy is the duplicate.
        h.send(2, 3, order);
        let again = sync_and_take(&mut h);
        assert_eq!(results(&again), vec![(3, ErrorCode::Ok)]);
        assert_eq!(h.broker.store().appended.len(), 2);
    }
}

/// The dead-letter commands on a backend: checked here, carried out by
/// the edge, answered as on one broker.
#[test]
fn dead_letter_commands_go_to_the_edge_and_are_answered_as_on_one_broker() {
    let mut h = node();
    h.connect(1, "ops", 10);
    let ask = |h: &mut Harness<BackendStore>, seq: u64, name: &str, args: serde_json::Value| {
        let command = Message::new(Kind::Command, name, args.to_string());
        let id = command.id;
        h.send(1, seq, command);
        (id, h.actions())
    };
    let queries = |actions: &[Action]| -> Vec<(u64, DeadLetterQuery)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::DeadLetterQuery {
                    conn: 1,
                    seq,
                    query,
                    ..
                } => Some((*seq, query.clone())),
                _ => None,
            })
            .collect()
    };

    // Bad arguments are refused here, before anything goes to the edge.
    let (_, actions) = ask(
        &mut h,
        1,
        "courier.dead-letters.list",
        serde_json::json!({"service": "worker", "limit": 0}),
    );
    assert_eq!(results(&actions), vec![(1, ErrorCode::InvalidMessage)]);
    assert!(queries(&actions).is_empty());
    let (_, actions) = ask(
        &mut h,
        2,
        "courier.dead-letters.show",
        serde_json::json!({"service": "worker"}),
    );
    assert_eq!(results(&actions), vec![(2, ErrorCode::InvalidMessage)]);
    assert!(queries(&actions).is_empty());

    // Good ones go to the edge, and the send waits for its answer.
    let (request, actions) = ask(
        &mut h,
        3,
        "courier.dead-letters.list",
        serde_json::json!({"service": "worker", "after": 4, "limit": 1}),
    );
    assert_eq!(
        queries(&actions),
        vec![(
            3,
            DeadLetterQuery::List {
                service: "worker".to_string(),
                after: 4,
                limit: 1
            }
        )]
    );
    assert!(results(&actions).is_empty(), "answered before the edge");
    let (_, actions) = ask(
        &mut h,
        4,
        "courier.dead-letters.purge",
        serde_json::json!({"service": "worker"}),
    );
    assert_eq!(
        queries(&actions)[0].1,
        DeadLetterQuery::Purge {
            service: "worker".to_string(),
            id: None
        }
    );
    let (_, actions) = ask(
        &mut h,
        5,
        "courier.dead-letters.replay",
        serde_json::json!({"service": "worker", "id": 9}),
    );
    assert_eq!(
        queries(&actions)[0].1,
        DeadLetterQuery::Replay {
            service: "worker".to_string(),
            id: 9
        }
    );

    // The edge's page: the reply as on one broker, with its note, then
    // the send's result.
    let letter = DeadLetter {
        seq: 7,
        attempts: 3,
        reason: "nacked".to_string(),
        at: 11,
    };
    let page = DeadLetterPage {
        letters: vec![(letter, Some(Arc::new(command("job.run", "a"))))],
        total_after: 2,
    };
    h.broker.dead_letters_answered(
        DeadLetterAnswer {
            conn: 1,
            seq: 3,
            quiet: false,
            request,
            activity_id: Uuid::nil(),
            command: "courier.dead-letters.list",
            found: Ok(DeadLetterFound::Listing { page, limit: 1 }),
        },
        h.now,
    );
    let actions = h.actions();
    let reply = actions
        .iter()
        .find_map(|a| match a {
            Action::Deliver {
                conn: 1, message, ..
            } => Some(message.clone()),
            _ => None,
        })
        .expect("a reply");
    assert_eq!(reply.name.as_str(), "courier.dead-letters.listing");
    assert_eq!(reply.response_to, Some(request));
    let listing: serde_json::Value = serde_json::from_slice(&reply.payload).expect("JSON");
    assert_eq!(listing[0]["id"], 7);
    assert_eq!(listing[0]["attempts"], 3);
    assert_eq!(listing[0]["name"], "job.run");
    assert_eq!(listing[1]["truncated"], true);
    assert_eq!(listing[1]["rest_after"], 7);
    assert_eq!(listing[1]["total"], 2);
    assert_eq!(results(&actions), vec![(3, ErrorCode::Ok)]);

    // What the edge did not find refuses the send, as on one broker.
    h.broker.dead_letters_answered(
        DeadLetterAnswer {
            conn: 1,
            seq: 5,
            quiet: false,
            request: Uuid::nil(),
            activity_id: Uuid::nil(),
            command: "courier.dead-letters.replay",
            found: Err((
                ErrorCode::InvalidMessage,
                "service worker has no dead letter 9".to_string(),
            )),
        },
        h.now,
    );
    let actions = h.actions();
    assert!(!actions.iter().any(|a| matches!(a, Action::Deliver { .. })));
    assert_eq!(results(&actions), vec![(5, ErrorCode::InvalidMessage)]);
}

#[test]
fn the_registry_goes_to_the_backend_and_what_it_holds_comes_back() {
    let registered = |told: &[Upstream]| -> Vec<(String, bool, bool)> {
        told.iter()
            .filter_map(|t| match t {
                Upstream::Registry {
                    id, on_bus, record, ..
                } => Some((id.clone(), *on_bus, record.is_some())),
                _ => None,
            })
            .collect()
    };
    let mut h = node();
    // A bus connection's own entry, and its going.
    h.connect(1, "worker", 10);
    h.broker.disconnect(1, h.now);
    assert_eq!(
        registered(&h.broker.store().told),
        vec![
            ("worker-1".to_string(), true, true),
            ("worker-1".to_string(), true, false)
        ]
    );
    h.broker.store_mut().told.clear();

    let db = registry_spec("db-1");
    h.broker.registry_register(db, h.now).expect("registered");
    h.broker
        .registry_heartbeat("db", "db-1", h.now)
        .expect("a TTL instance takes heartbeats");
    h.broker
        .registry_deregister("db", "db-1")
        .expect("deregistered");
    let told = &h.broker.store().told;
    assert_eq!(
        registered(told),
        vec![
            ("db-1".to_string(), false, true),
            ("db-1".to_string(), false, false)
        ]
    );
    assert!(told.iter().any(|t| matches!(
        t,
        Upstream::RegistryHeartbeat { service, id } if service == "db" && id == "db-1"
    )));

    // What another node registered is here, without being told back.
    let mut there = node();
    there
        .broker
        .registry_register(registry_spec("db-2"), there.now)
        .expect("registered");
    let record = there.broker.store().told.iter().find_map(|t| match t {
        Upstream::Registry { record, .. } => record.clone(),
        _ => None,
    });
    h.broker.store_mut().told.clear();
    h.broker.registry_replicated("db", "db-2", record, h.now);
    assert_eq!(h.broker.registry().instances("db", false).len(), 1);
    assert!(registered(&h.broker.store().told).is_empty());
    h.broker.registry_replicated("db", "db-2", None, h.now);
    assert!(h.broker.registry().instances("db", true).is_empty());
}

fn registry_spec(id: &str) -> crate::registry::InstanceSpec {
    crate::registry::InstanceSpec {
        service: "db".into(),
        id: id.into(),
        address: "127.0.0.1:5432".into(),
        meta: BTreeMap::new(),
        check: crate::registry::Check::Ttl { ttl_ms: 10_000 },
        interval_ms: 0,
        flap_threshold: 1,
        deregister_after_ms: 0,
        on_bus: false,
    }
}

#[test]
fn a_keyed_message_given_back_takes_the_later_ones_of_its_key_back_behind_it() {
    let mut h = node();
    h.connect(1, "worker", 10);
    h.connect(2, "worker", 10);
    h.subscribe(1, "job.*");
    h.subscribe(2, "job.*");
    h.actions();
    for (payload, handle) in [("1", "ack-1"), ("2", "ack-2"), ("3", "ack-3")] {
        h.broker.fetched(
            fetched("worker", keyed("job.run", "k", payload), 1, handle),
            h.now,
        );
    }
    let delivered = h.deliveries();
    let first = delivered
        .iter()
        .find(|d| d.4 == Bytes::from_static(b"1"))
        .expect("the key's first delivered");
    let holder = first.0;
    let seqs: Vec<Seq> = h.broker.store().held.keys().copied().collect();
    h.broker.store_mut().told.clear();

    // The holder goes with the key's first unacknowledged: the backend
    // hands the key out again from it, so nothing of the key may go to the
    // other instance meanwhile, and the later ones go back behind it.
    h.broker.disconnect(holder, h.now);
    assert!(
        h.deliveries().is_empty(),
        "a later message of the key went out before the first came back"
    );
    let naks = naks_told(&h);
    assert_eq!(naks, seqs, "given back in the key's order");
    assert!(h.broker.store().held.is_empty());

    // A nack with a delay: the retry stays here, holding its key (NAKed,
    // the backend would hand out the key's later messages meanwhile), and
    // goes out first when the delay is over.
    for (payload, handle) in [("4", "ack-4"), ("5", "ack-5")] {
        h.broker.fetched(
            fetched("worker", keyed("job.run", "k", payload), 1, handle),
            h.now,
        );
    }
    let delivered = h.deliveries();
    assert_eq!(
        delivered.len(),
        1,
        "one of the key out at a time: {delivered:?}"
    );
    h.broker.store_mut().told.clear();
    h.broker.nack(delivered[0].0, delivered[0].1, 300, h.now);
    assert!(
        h.deliveries().is_empty(),
        "the key went on before the retry"
    );
    assert!(
        !h.broker
            .store()
            .told
            .iter()
            .any(|t| matches!(t, Upstream::Nak { .. })),
        "given back to the backend: {:?}",
        h.broker.store().told
    );
    h.advance(300);
    let again = h.deliveries();
    assert_eq!(again.len(), 1, "{again:?}");
    assert_eq!(
        (again[0].2, again[0].4.clone()),
        (2, delivered[0].4.clone())
    );
}

/// The seqs the store was told to NAK, in the order told.
fn naks_told(h: &Harness<BackendStore>) -> Vec<Seq> {
    h.broker
        .store()
        .told
        .iter()
        .filter_map(|t| match t {
            Upstream::Nak { seq, .. } => Some(*seq),
            _ => None,
        })
        .collect()
}

/// The seqs the store holds, lowest first (the order fetched).
fn held_in_order(h: &Harness<BackendStore>) -> Vec<Seq> {
    let mut seqs: Vec<Seq> = h.broker.store().held.keys().copied().collect();
    seqs.sort_unstable();
    seqs
}

#[test]
fn a_node_that_loses_the_keyed_lane_gives_back_what_it_has_not_handed_out() {
    let mut h = node();
    h.connect(1, "worker", 10);
    h.subscribe(1, "job.*");
    h.actions();
    let fetch = |h: &mut Harness<BackendStore>, key: &'static str, payload: &'static str| {
        let handle = format!("ack-{payload}");
        h.broker.fetched(
            fetched("worker", keyed("job.run", key, payload), 1, &handle),
            h.now,
        );
    };
    fetch(&mut h, "k", "1");
    fetch(&mut h, "k", "2");
    fetch(&mut h, "j", "3");
    fetch(&mut h, "k", "4");
    let out = h.deliveries();
    let out_payloads: Vec<Bytes> = out.iter().map(|d| d.4.clone()).collect();
    assert_eq!(
        out_payloads,
        [Bytes::from_static(b"1"), Bytes::from_static(b"3")]
    );
    // A retry after a delay waits here too, holding its key.
    let j = out
        .iter()
        .find(|d| d.4 == Bytes::from_static(b"3"))
        .expect("j out");
    h.broker.nack(j.0, j.1, 5_000, h.now);
    h.actions();
    let held = held_in_order(&h);
    h.broker.store_mut().told.clear();

    h.broker.keyed_lane_lost("worker", h.now);
    let naks: Vec<(Seq, u64)> = h
        .broker
        .store()
        .told
        .iter()
        .filter_map(|t| match t {
            Upstream::Nak { seq, delay_ms } => Some((*seq, *delay_ms)),
            _ => None,
        })
        .collect();
    // Everything but "1", which is out: in the order fetched, at once.
    assert_eq!(naks, [(held[1], 0), (held[2], 0), (held[3], 0)]);
    // The delivery out still settles; nothing of the lane goes out after.
    h.broker.ack(out[0].0, out[0].1, h.now);
    h.advance(10_000);
    assert!(
        h.deliveries().is_empty(),
        "a message of the lost lane went out"
    );
    assert!(h.broker.store().held.is_empty());
}

#[test]
fn a_node_whose_relay_moves_gives_back_what_the_last_holder_relayed_and_is_not_out() {
    let mut h = node();
    h.connect(1, "worker", 1);
    h.subscribe(1, "job.*");
    h.actions();
    // Relayed by the last holder: the instance here has room for one.
    for (key, payload) in [("k", "1"), ("k", "2"), ("j", "3")] {
        h.broker.fetched(
            fetched(
                "worker",
                keyed("job.run", key, payload),
                1,
                &format!("ack-{payload}"),
            ),
            h.now,
        );
    }
    let out = h.deliveries();
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(out[0].4, Bytes::from_static(b"1"));
    let held = held_in_order(&h);
    h.broker.store_mut().told.clear();

    h.broker.keyed_relay_moved("worker", h.now);
    let naks = naks_told(&h);
    assert_eq!(naks, [held[1], held[2]], "not what was held and not out");
    h.broker.ack(out[0].0, out[0].1, h.now);
    h.advance(10_000);
    assert!(
        h.deliveries().is_empty(),
        "a message of the last holder's relay went out"
    );
}

#[test]
fn a_relay_takes_keyed_messages_only_without_a_deadline_and_its_failures_stay_here_in_order() {
    const RELAY: ConnId = 100;
    let mut h = node();
    h.connect(1, "worker", 1);
    h.subscribe(1, "job.*");
    h.broker.keyed_lane_gained("worker", h.now);
    h.broker
        .open_relay(RELAY, "worker", "b", &["job.*".to_string()], 10, h.now);
    h.actions();
    assert!(
        h.broker.instances().iter().all(|i| i.conn != RELAY),
        "a relay is listed as an instance here"
    );
    assert_eq!(h.broker.fetch_credit("worker", false), 1);
    assert_eq!(h.broker.fetch_credit("worker", true), 11);

    // Unkeyed work stays with the instances here, however full.
    for (payload, handle) in [("u1", "ack-u1"), ("u2", "ack-u2")] {
        h.broker.fetched(
            fetched("worker", command("job.run", payload), 1, handle),
            h.now,
        );
    }
    let out = h.deliveries();
    assert_eq!(
        out.iter().map(|d| d.0).collect::<Vec<_>>(),
        [1],
        "unkeyed work went to a relay: {out:?}"
    );
    h.broker.ack(out[0].0, out[0].1, h.now);
    let next = h.deliveries();
    assert_eq!(next.iter().map(|d| d.0).collect::<Vec<_>>(), [1]);
    h.broker.ack(next[0].0, next[0].1, h.now);

    // A key that goes to the relay goes there pipelined, marked as a
    // key start on its first delivery.
    for (payload, handle) in [("1", "ack-1"), ("2", "ack-2"), ("3", "ack-3")] {
        h.broker.fetched(
            fetched("worker", keyed("job.run", "k", payload), 1, handle),
            h.now,
        );
    }
    let relayed = h.deliveries();
    assert_eq!(
        relayed
            .iter()
            .map(|d| (d.0, d.4.clone()))
            .collect::<Vec<_>>(),
        [
            (RELAY, Bytes::from_static(b"1")),
            (RELAY, Bytes::from_static(b"2")),
            (RELAY, Bytes::from_static(b"3"))
        ]
    );
    assert_ne!(relayed[0].2 & courier_proto::ATTEMPT_KEY_START, 0);
    assert_eq!(relayed[1].2 & courier_proto::ATTEMPT_KEY_START, 0);
    assert_eq!(h.broker.relay_in_flight(RELAY), Some(3));

    // The other node runs the deadlines: none passes here.
    h.advance(60_000);
    assert!(h.deliveries().is_empty());
    assert_eq!(h.broker.relay_in_flight(RELAY), Some(3));

    // Its first acked; its second nacked by the other node: the key
    // starts again from the second, here (this node holds the keyed lane:
    // nothing goes back to the backend, where the key's later messages
    // could overtake it).
    h.broker.store_mut().told.clear();
    h.broker.ack(RELAY, relayed[0].1, h.now);
    h.broker.nack(RELAY, relayed[1].1, 0, h.now);
    // The other node's give-back of the third comes after: already back.
    h.broker.nack(RELAY, relayed[2].1, 0, h.now);
    let told_naks = |h: &Harness<BackendStore>| {
        h.broker
            .store()
            .told
            .iter()
            .filter(|t| matches!(t, Upstream::Nak { .. }))
            .count()
    };
    assert_eq!(told_naks(&h), 0, "given back to the backend");
    let again = h.deliveries();
    let payloads: Vec<(Bytes, u32)> = again
        .iter()
        .map(|d| (d.4.clone(), d.2 & !courier_proto::ATTEMPT_KEY_START))
        .collect();
    assert_eq!(payloads[0], (Bytes::from_static(b"2"), 2), "{again:?}");
    for d in &again {
        h.broker.ack(d.0, d.1, h.now);
    }
    let rest = h.deliveries();
    for d in &rest {
        h.broker.ack(d.0, d.1, h.now);
    }
    let handled: Vec<Bytes> = again.iter().chain(&rest).map(|d| d.4.clone()).collect();
    assert_eq!(
        handled,
        [Bytes::from_static(b"2"), Bytes::from_static(b"3")]
    );
    assert_eq!(h.broker.relay_in_flight(RELAY), Some(0));

    // Closed (its node is gone): what is out on it comes again, in order,
    // to the instance here once it has room. (It is busy: the key goes to
    // the relay first.)
    h.broker.fetched(
        fetched("worker", command("job.run", "u3"), 1, "ack-u3"),
        h.now,
    );
    for (payload, handle) in [("4", "ack-4"), ("5", "ack-5")] {
        h.broker.fetched(
            fetched("worker", keyed("job.run", "j", payload), 1, handle),
            h.now,
        );
    }
    let out = h.deliveries();
    let busy: Vec<_> = out.iter().filter(|d| d.0 == 1).collect();
    let relayed: Vec<_> = out.iter().filter(|d| d.0 == RELAY).collect();
    assert_eq!(relayed.len(), 2, "{out:?}");
    h.broker.close_relay(RELAY, h.now);
    assert_eq!(h.broker.relay_in_flight(RELAY), None);
    assert_eq!(told_naks(&h), 0, "given back to the backend");
    assert!(h.deliveries().is_empty(), "the instance here had no room");
    h.broker.ack(busy[0].0, busy[0].1, h.now);
    let again = h.deliveries();
    assert_eq!(again.len(), 1, "{again:?}");
    assert_eq!(
        (again[0].4.clone(), again[0].2),
        (Bytes::from_static(b"4"), 2)
    );
}

#[test]
fn a_connections_deliveries_keep_their_order_while_a_redelivery_waits_for_the_sync() {
    let mut h = node();
    h.connect(1, "worker", 10);
    h.broker.set_pipelined_keys(1, true);
    h.subscribe(1, "job.*");
    h.broker.keyed_lane_gained("worker", h.now);
    h.actions();
    h.broker.store_mut().sync_jobs = true;
    let ready = |h: &mut Harness<BackendStore>| {
        h.broker.next_timer();
        let mut out = Vec::new();
        h.broker.take_ready_actions(&mut out);
        out.into_iter()
            .filter_map(|a| match a {
                Action::Deliver {
                    delivery,
                    attempt,
                    message,
                    ..
                } => Some((delivery, attempt, message.payload.clone())),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    for (payload, handle) in [("1", "ack-1"), ("2", "ack-2")] {
        h.broker.fetched(
            fetched("worker", keyed("job.run", "k", payload), 1, handle),
            h.now,
        );
    }
    let first = ready(&mut h);
    assert_eq!(first.len(), 2, "{first:?}");
    // The first is nacked for a retry in 10 ms: the retry (a redelivery)
    // and the key's second wait for the sync of the pass that delivers
    // them...
    h.broker.nack(1, first[0].0, 10, h.now);
    ready(&mut h);
    h.now += 10 * MS;
    h.broker.tick(h.now);
    assert!(
        ready(&mut h).is_empty(),
        "a redelivery left before the sync"
    );
    // ... and so does the key's third, fetched meanwhile, though its pass
    // stored nothing: it must not overtake them.
    h.broker.fetched(
        fetched("worker", keyed("job.run", "k", "3"), 1, "ack-3"),
        h.now,
    );
    assert!(
        ready(&mut h).is_empty(),
        "a later delivery overtook the held ones"
    );
    let job = h.broker.start_sync().expect("a sync");
    h.broker.finish_sync(job, Ok(()));
    let out = ready(&mut h);
    let order: Vec<(Bytes, u32)> = out
        .iter()
        .map(|(_, attempt, payload)| {
            (
                payload.clone(),
                *attempt & !courier_proto::ATTEMPT_KEY_START,
            )
        })
        .collect();
    assert_eq!(
        order,
        [
            (Bytes::from_static(b"1"), 2),
            (Bytes::from_static(b"2"), 1),
            (Bytes::from_static(b"3"), 1)
        ]
    );
    assert_ne!(out[0].1 & courier_proto::ATTEMPT_KEY_START, 0);
}
