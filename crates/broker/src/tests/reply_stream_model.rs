//! Reply streams: a state-machine property test.

use super::*;

#[derive(Debug, Clone)]
enum StreamOp {
    /// The responder sends its next reply (the final one if `last`).
    Reply {
        last: bool,
    },
    /// The responder sends an earlier, refused reply again (a retry).
    Resend(usize),
    /// The requester's application took one of its unacked replies.
    Ack(usize),
    /// The requester stops reading.
    Nack(usize),
    RequesterLeaves,
    /// The responder's connection drops; it reconnects and sends again
    /// every reply not yet answered, as the SDK does.
    ResponderReconnects,
    Advance(u32),
}

fn stream_op() -> impl Strategy<Value = StreamOp> {
    prop_oneof![
        8 => prop::bool::weighted(0.05).prop_map(|last| StreamOp::Reply { last }),
        1 => (0usize..64).prop_map(StreamOp::Resend),
        8 => (0usize..8).prop_map(StreamOp::Ack),
        1 => (0usize..8).prop_map(StreamOp::Nack),
        1 => Just(StreamOp::RequesterLeaves),
        1 => Just(StreamOp::ResponderReconnects),
        2 => prop_oneof![0u32..40_000, 550_000u32..650_000].prop_map(StreamOp::Advance),
    ]
}

/// What the property test sees of one flow-controlled stream.
struct StreamModel {
    h: Harness,
    command: Uuid,
    window: usize,
    requester: ConnId,
    responder: ConnId,
    next_seq: u64,
    /// Every reply made, by index (the payload is the index).
    replies: Vec<Message>,
    /// `(conn, seq)` → reply index, for every send.
    sends: HashMap<(ConnId, u64), usize>,
    /// `(conn, seq)` → every answer it got.
    answers: HashMap<(ConnId, u64), Vec<(ErrorCode, String)>>,
    /// Replies the broker took (not refused at once), in the order taken.
    taken: Vec<usize>,
    /// Reply indexes the requester received, in order.
    delivered: Vec<usize>,
    unacked: Vec<DeliveryId>,
    /// The requester stopped reading or left: nothing more may arrive.
    stopped: bool,
    /// The requester left before any reply reached it: the rest of the
    /// replies are routed without flow control (parked here: the
    /// requesting service has no other instance).
    unbound: bool,
}

impl StreamModel {
    fn new(window: usize) -> StreamModel {
        let mut h = Harness::new();
        h.connect(5, "web", 0);
        h.connect(2, "file", 0);
        h.subscribe(2, "file.copy");
        let cmd = stream_command(&window.to_string());
        let command = cmd.id;
        h.send(5, 1, cmd);
        h.actions();
        StreamModel {
            h,
            command,
            window,
            requester: 5,
            responder: 2,
            next_seq: 100,
            replies: Vec::new(),
            sends: HashMap::new(),
            answers: HashMap::new(),
            taken: Vec::new(),
            delivered: Vec::new(),
            unacked: Vec::new(),
            stopped: false,
            unbound: false,
        }
    }

    fn absorb(&mut self) -> Result<(), TestCaseError> {
        for a in self.h.actions() {
            match a {
                Action::Deliver {
                    conn,
                    delivery,
                    message,
                    ..
                } if message.kind == Kind::Reply => {
                    prop_assert_eq!(conn, self.requester, "a reply of the stream went elsewhere");
                    prop_assert!(!self.stopped, "a reply arrived after the requester stopped");
                    let index: usize = std::str::from_utf8(&message.payload)
                        .ok()
                        .and_then(|p| p.parse().ok())
                        .expect("payload is the reply's index");
                    self.delivered.push(index);
                    if !message.is_final {
                        self.unacked.push(delivery);
                    }
                    prop_assert!(
                        self.unacked.len() <= self.window,
                        "{} replies unacked, window {}",
                        self.unacked.len(),
                        self.window
                    );
                }
                Action::SendResult {
                    conn,
                    seq,
                    code,
                    reason,
                    ..
                } => self
                    .answers
                    .entry((conn, seq))
                    .or_default()
                    .push((code, reason)),
                _ => {}
            }
        }
        let held = self
            .h
            .broker
            .reply_routes
            .get(&self.command)
            .and_then(|r| r.stream.as_ref())
            .map_or(0, |s| s.held_len());
        prop_assert!(held <= self.window, "{} held, window {}", held, self.window);
        Ok(())
    }

    fn send(&mut self, index: usize) -> Result<(), TestCaseError> {
        self.next_seq += 1;
        let key = (self.responder, self.next_seq);
        self.sends.insert(key, index);
        let message = self.replies[index].clone();
        self.h.send(key.0, key.1, message);
        self.absorb()?;
        let refused = self
            .answers
            .get(&key)
            .is_some_and(|a| a.iter().any(|(code, _)| !code.is_ok()));
        if !refused && !self.taken.contains(&index) {
            self.taken.push(index);
        }
        Ok(())
    }

    fn apply(&mut self, op: StreamOp) -> Result<(), TestCaseError> {
        match op {
            StreamOp::Reply { last } => {
                let index = self.replies.len();
                self.replies
                    .push(reply_to(self.command, &index.to_string(), last));
                self.send(index)?;
            }
            StreamOp::Resend(i) => {
                // A client retries what was refused, never what the broker
                // took (beyond the dedup window that would duplicate it).
                let refused: Vec<usize> = (0..self.replies.len())
                    .filter(|index| {
                        let answers: Vec<&(ErrorCode, String)> = self
                            .sends
                            .iter()
                            .filter(|(_, i)| *i == index)
                            .filter_map(|(key, _)| self.answers.get(key))
                            .flatten()
                            .collect();
                        !answers.is_empty() && answers.iter().all(|(code, _)| !code.is_ok())
                    })
                    .collect();
                if !refused.is_empty() {
                    self.send(refused[i % refused.len()])?;
                }
            }
            StreamOp::Ack(i) => {
                if !self.unacked.is_empty() {
                    let d = self.unacked.remove(i % self.unacked.len());
                    self.h.broker.ack(self.requester, d, self.h.now);
                }
            }
            StreamOp::Nack(i) => {
                if !self.unacked.is_empty() && !self.stopped {
                    let d = self.unacked[i % self.unacked.len()];
                    self.h.broker.nack(self.requester, d, 0, self.h.now);
                    self.stopped = true;
                }
            }
            StreamOp::RequesterLeaves => {
                let stream_open = self
                    .h
                    .broker
                    .reply_routes
                    .get(&self.command)
                    .is_some_and(|r| r.stream.is_some());
                if !self.stopped && stream_open && self.delivered.is_empty() {
                    self.unbound = true;
                }
                self.h.broker.disconnect(self.requester, self.h.now);
                self.stopped = true;
            }
            StreamOp::ResponderReconnects => {
                self.h.broker.disconnect(self.responder, self.h.now);
                self.responder += 100;
                self.h.connect(self.responder, "file", 0);
                self.h.subscribe(self.responder, "file.copy");
                let mut unanswered: Vec<(u64, usize)> = self
                    .sends
                    .iter()
                    .filter(|(key, _)| !self.answers.contains_key(key))
                    .map(|((_, seq), index)| (*seq, *index))
                    .collect();
                unanswered.sort_unstable();
                self.absorb()?;
                for (_, index) in unanswered {
                    self.send(index)?;
                }
            }
            StreamOp::Advance(ms) => self.h.advance(u64::from(ms)),
        }
        self.absorb()
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

    /// Against a model of one stream: the requester never holds more than
    /// its window unacked, nor does the broker hold more; what arrives is
    /// exactly what the broker took, in that order, each once; and every
    /// send is answered exactly once — a reply taken and not delivered was
    /// answered as discarded (the requester stopped) or refused (the route
    /// expired), never lost in silence.
    #[test]
    fn reply_stream_rules_hold(
        window in 1usize..5,
        ops in proptest::collection::vec(stream_op(), 1..150),
    ) {
        let mut m = StreamModel::new(window);
        for op in ops {
            m.apply(op)?;
        }
        // Settle: the requester reads everything, the responder ends the
        // stream, then the route's time runs out.
        for _ in 0..20 {
            for d in std::mem::take(&mut m.unacked) {
                m.h.broker.ack(m.requester, d, m.h.now);
            }
            m.absorb()?;
        }
        let index = m.replies.len();
        m.replies.push(reply_to(m.command, &index.to_string(), true));
        m.send(index)?;
        for _ in 0..20 {
            for d in std::mem::take(&mut m.unacked) {
                m.h.broker.ack(m.requester, d, m.h.now);
            }
            m.absorb()?;
        }
        m.h.advance(Config::default().reply_route_ms + 1);
        m.absorb()?;

        let mut seen = std::collections::HashSet::new();
        prop_assert!(m.delivered.iter().all(|i| seen.insert(*i)), "delivered twice: {:?}", m.delivered);
        prop_assert_eq!(&m.delivered[..], &m.taken[..m.delivered.len()], "delivered out of the order taken");
        for (key, index) in &m.sends {
            let answers = m.answers.get(key).map_or(0, Vec::len);
            prop_assert_eq!(answers, 1, "send {:?} of reply {} answered {} times", key, index, answers);
        }
        if m.unbound {
            // Parked for an instance of the requester, as any reply.
            prop_assert!(m.h.broker.metrics().replies_parked > 0 || m.taken.is_empty());
        } else {
            for index in m.taken.iter().filter(|i| !m.delivered.contains(i)) {
                let told = m.sends.iter().filter(|(_, i)| *i == index).any(|(key, _)| {
                    m.answers[key].iter().any(|(code, reason)| {
                        reason.starts_with("discarded") || *code == ErrorCode::UnknownRequest
                    })
                });
                prop_assert!(told, "reply {} was taken, not delivered, and nobody was told", index);
            }
        }
        prop_assert_eq!(m.h.broker.held_reply_bytes, 0);
        prop_assert!(m.h.broker.reply_deliveries.is_empty());
    }
}

#[test]
fn a_stream_and_its_held_replies_outlive_a_rebuild_after_a_failed_sync() {
    let mut h = Harness::with_store(MemoryLog::new());
    h.connect(5, "web", 0);
    h.connect(2, "file", 0);
    h.subscribe(2, "file.copy");
    h.subscribe(2, "file.audit");
    let cmd = stream_command("1");
    let id = cmd.id;
    h.send(5, 1, cmd);
    h.actions();
    h.send(2, 10, reply_to(id, "r1", false));
    h.send(2, 11, reply_to(id, "r2", true));
    let first = delivery_ids(&h.actions(), 5);
    h.broker.store_mut().failing_syncs = 1;
    h.send(5, 2, event("file.audit", "lost"));
    assert_eq!(results(&h.actions()), vec![(2, ErrorCode::StorageFailed)]);
    assert_eq!(
        h.broker.metrics().storage_failures,
        1,
        "the state was rebuilt"
    );
    h.advance(100);
    h.actions();
    h.broker.ack(5, first[0], h.now);
    let actions = h.actions();
    assert_eq!(delivered_to(&actions), vec![(5, "r2".into())]);
    assert_eq!(results(&actions), vec![(11, ErrorCode::Ok)]);
}
#[test]
fn a_tail_sees_commands_replies_and_events_without_changing_routing() {
    let mut h = Harness::new();
    h.connect(1, "web", 16);
    h.connect(2, "todo", 16);
    h.subscribe(2, "todo.create");
    h.connect(3, "admin", 16);
    h.broker.set_tapping(true);
    h.send(3, 1, command("courier.tail", "{\"pattern\":\"todo.>\"}"));
    let started = h
        .actions()
        .into_iter()
        .find_map(|a| match a {
            Action::StartTail { conn, filter, .. } => Some((conn, filter)),
            _ => None,
        })
        .expect("the tail starts");
    assert_eq!(started.0, 3);
    assert_eq!(started.1.pattern.as_deref(), Some("todo.>"));

    let create = command("todo.create", "{}");
    let create_id = create.id;
    h.send(1, 2, create);
    let delivered = h.deliveries();
    assert_eq!(delivered.len(), 1, "only the subscribed service gets it");
    assert_eq!(delivered[0].0, 2);
    let mut reply = Message::new(Kind::Reply, "todo.created", "{}");
    reply.response_to = Some(create_id);
    h.send(2, 3, reply);
    // A command nobody receives is still refused while a tail runs.
    h.send(1, 4, command("todo.delete", "{}"));
    let refused = h.actions().into_iter().any(|a| {
        matches!(
            a,
            Action::SendResult {
                seq: 4,
                code: ErrorCode::NoReceiver,
                ..
            }
        )
    });
    assert!(refused, "no_receiver despite the tail");

    let taps = h.broker.take_taps();
    let seen: Vec<(&str, Vec<String>)> = taps
        .iter()
        .map(|t| (t.message.name.as_str(), t.receivers.to_vec()))
        .collect();
    assert_eq!(
        seen,
        vec![
            ("courier.tail", vec![]),
            ("todo.create", vec!["todo".to_string()]),
            ("todo.created", vec!["web".to_string()]),
        ]
    );
    assert_eq!(taps[1].message.sender, "web", "stamped with its sender");

    h.broker.set_tapping(false);
    h.send(1, 5, command("todo.create", "{}"));
    assert!(
        h.broker.take_taps().is_empty(),
        "nothing is recorded untapped"
    );
}

/// Each trace record in short: (what, message name or seq, service, detail).
fn trace_lines(h: &mut Harness<impl MessageStore>) -> Vec<String> {
    let mut records = Vec::new();
    h.broker.take_traces(&mut records);
    records
        .iter()
        .map(|r| match r {
            TraceRecord::Accepted {
                message,
                seq,
                receivers,
            } => format!(
                "accepted {} seq={seq} to={}",
                message.name,
                receivers.join(",")
            ),
            TraceRecord::Delivered {
                message,
                seq,
                service,
                instance,
                attempt,
                ..
            } => format!(
                "delivered {} seq={seq} to={service}/{instance} attempt={attempt}",
                message.name
            ),
            TraceRecord::Settled {
                seq,
                service,
                outcome,
                ..
            } => format!("{} seq={seq} by={service} {outcome:?}", outcome.as_str()),
        })
        .collect()
}

#[test]
fn traces_record_acceptance_deliveries_and_their_outcomes_in_order() {
    let mut h = Harness::new();
    h.connect(1, "web", 16);
    h.connect(2, "todo", 16);
    h.subscribe(2, "todo.create");
    h.connect(3, "audit", 16);
    h.subscribe(3, "todo.created");
    h.broker.set_tracing(Some(0));
    let create = command("todo.create", "{}");
    let create_id = create.id;
    h.send(1, 1, create);
    let delivered = h.deliveries();
    h.broker.ack(2, delivered[0].1, h.now);
    let mut reply = Message::new(Kind::Reply, "todo.created", "{}");
    reply.response_to = Some(create_id);
    reply.parent_id = Some(create_id);
    h.send(2, 2, reply);
    h.send(2, 3, event("todo.created", "{}"));
    let event_delivery = h.deliveries().last().expect("the event").1;
    h.broker.nack(3, event_delivery, 0, h.now);
    let again = h.deliveries();
    assert_eq!(again.len(), 1, "redelivered at once");
    // The ack deadline (30 s) passes without an answer.
    h.advance(31_000);
    h.deliveries();
    // A broker command leaves no trace.
    h.send(1, 4, command("courier.services.list", ""));
    assert_eq!(
        trace_lines(&mut h),
        [
            "accepted todo.create seq=3 to=todo",
            "delivered todo.create seq=3 to=todo/todo-2 attempt=1",
            "acked seq=3 by=todo Acked",
            "accepted todo.created seq=0 to=web",
            "delivered todo.created seq=0 to=web/web-1 attempt=1",
            "accepted todo.created seq=6 to=audit",
            "delivered todo.created seq=6 to=audit/audit-3 attempt=1",
            "nacked seq=6 by=audit Nacked { delay_ms: 0 }",
            "delivered todo.created seq=6 to=audit/audit-3 attempt=2",
            "released seq=6 by=audit Released { reason: \"ack deadline passed\" }",
            "delivered todo.created seq=6 to=audit/audit-3 attempt=3",
        ]
    );

    h.broker.set_tracing(None);
    h.send(1, 5, command("todo.create", "{}"));
    h.deliveries();
    assert!(
        trace_lines(&mut h).is_empty(),
        "nothing is recorded untraced"
    );
}

#[test]
fn traces_record_dead_letters_and_expiry() {
    let mut h = Harness::new();
    h.connect(1, "web", 16);
    h.connect(2, "todo", 16);
    h.broker
        .subscribe(2, 0, "todo.create", 0, 1, StartFrom::New, h.now);
    h.broker.set_tracing(Some(0));
    h.send(1, 1, command("todo.create", "{}"));
    let delivered = h.deliveries();
    h.broker.nack(2, delivered[0].1, 0, h.now);
    // Expires while todo has no room: it is dropped before delivery.
    h.broker.flow(2, 1, h.now);
    h.send(1, 2, command("todo.create", "blocker"));
    let mut soon = command("todo.create", "late");
    soon.expires_at = Some(h.now + 10 * MS);
    h.send(1, 3, soon);
    let blocker = h.deliveries();
    assert_eq!(blocker.len(), 1);
    h.advance(20);
    h.broker.ack(2, blocker[0].1, h.now);
    h.deliveries();
    let lines = trace_lines(&mut h);
    assert!(
        lines.contains(
            &"dead_lettered seq=2 by=todo DeadLettered { reason: \"nacked\" }".to_string()
        ),
        "{lines:#?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("expired seq=") && l.ends_with("by=todo Expired")),
        "{lines:#?}"
    );
}

#[test]
fn a_failed_sync_voids_the_batch_s_trace_records() {
    let mut h = Harness::with_store(MemoryLog::new());
    h.connect(1, "web", 16);
    h.connect(2, "todo", 16);
    h.subscribe(2, "todo.create");
    h.actions();
    h.broker.set_tracing(Some(0));
    h.broker.store_mut().failing_syncs = 1;
    h.send(1, 1, command("todo.create", "{}"));
    let refused = results(&h.actions());
    assert_eq!(refused, [(1, ErrorCode::StorageFailed)]);
    assert!(
        trace_lines(&mut h).is_empty(),
        "a refused send was never accepted"
    );
}
