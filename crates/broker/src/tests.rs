//! Delivery rules, tested without sockets or clocks.

use super::*;
use bytes::Bytes;
use courier_store::{MemoryLog, MemoryStore};
use proptest::prelude::*;

const MS: Nanos = NANOS_PER_MS;

struct Harness<S: MessageStore = MemoryStore> {
    broker: Broker<S>,
    now: Nanos,
}

impl Harness {
    fn new() -> Harness {
        Harness::with_store(MemoryStore::new())
    }
}

impl<S: MessageStore> Harness<S> {
    fn with_store(store: S) -> Harness<S> {
        Harness {
            broker: Broker::new(Config::default(), store),
            now: 1_000 * MS,
        }
    }

    fn connect(&mut self, conn: ConnId, service: &str, max_in_flight: u32) {
        self.broker
            .connect(conn, service, &format!("{service}-{conn}"), max_in_flight);
    }

    fn subscribe(&mut self, conn: ConnId, pattern: &str) {
        self.broker
            .subscribe(conn, 0, pattern, 0, 0, StartFrom::New, self.now);
    }

    fn send(&mut self, conn: ConnId, seq: u64, message: Message) {
        self.broker.send(conn, seq, message, self.now);
    }

    fn advance(&mut self, ms: u64) {
        self.now += ms * MS;
        self.broker.tick(self.now);
    }

    fn actions(&mut self) -> Vec<Action> {
        let mut out = Vec::new();
        self.broker.take_actions(&mut out);
        out
    }

    /// (conn, delivery, attempt, name, payload) of every delivery since last call.
    fn deliveries(&mut self) -> Vec<(ConnId, DeliveryId, u32, String, Bytes)> {
        self.actions()
            .into_iter()
            .filter_map(|a| match a {
                Action::Deliver {
                    conn,
                    delivery,
                    attempt,
                    message,
                } => Some((
                    conn,
                    delivery,
                    attempt,
                    message.name.to_string(),
                    message.payload.clone(),
                )),
                _ => None,
            })
            .collect()
    }
}

fn command(name: &str, payload: &'static str) -> Message {
    Message::new(Kind::Command, name, payload)
}

fn event(name: &str, payload: &'static str) -> Message {
    Message::new(Kind::Event, name, payload)
}

fn results(actions: &[Action]) -> Vec<(u64, ErrorCode)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::SendResult { seq, code, .. } => Some((*seq, *code)),
            _ => None,
        })
        .collect()
}

#[test]
fn command_without_receiver_is_refused_with_its_name() {
    let mut h = Harness::new();
    h.connect(1, "web", 0);
    h.send(1, 7, command("todo.create", "{}"));
    let actions = h.actions();
    match &actions[..] {
        [Action::SendResult {
            seq: 7,
            code,
            reason,
            ..
        }] => {
            assert_eq!(*code, ErrorCode::NoReceiver);
            assert!(
                reason.contains("no service receives todo.create"),
                "{reason}"
            );
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn commands_compete_across_instances_of_one_service() {
    let mut h = Harness::new();
    h.connect(1, "web", 0);
    for conn in [2, 3] {
        h.connect(conn, "todo", 0);
        h.subscribe(conn, "todo.create");
    }
    for i in 0..10 {
        h.send(1, i, command("todo.create", "x"));
    }
    let deliveries = h.deliveries();
    assert_eq!(deliveries.len(), 10, "each command delivered exactly once");
    let to_2 = deliveries.iter().filter(|d| d.0 == 2).count();
    assert_eq!(to_2, 5, "round robin between the two instances");
}

#[test]
fn events_fan_out_across_services_and_compete_within_one() {
    let mut h = Harness::new();
    h.connect(1, "todo", 0);
    h.connect(2, "audit", 0);
    h.connect(3, "audit", 0);
    h.connect(4, "mail", 0);
    h.subscribe(2, "todo.*");
    h.subscribe(3, "todo.*");
    h.subscribe(4, "todo.>");
    h.send(1, 1, event("todo.created", "a"));
    h.send(1, 2, event("todo.item.deleted", "b"));
    let deliveries = h.deliveries();
    let audit: Vec<_> = deliveries.iter().filter(|d| d.0 == 2 || d.0 == 3).collect();
    let mail: Vec<_> = deliveries.iter().filter(|d| d.0 == 4).collect();
    assert_eq!(audit.len(), 1, "todo.* matches one segment only");
    assert_eq!(mail.len(), 2, "todo.> matches the rest");
}

#[test]
fn event_without_subscriber_is_accepted_and_dropped() {
    let mut h = Harness::new();
    h.connect(1, "todo", 0);
    h.send(1, 1, event("todo.created", "a"));
    assert_eq!(results(&h.actions()), vec![(1, ErrorCode::Ok)]);
    assert_eq!(h.broker.metrics().dropped_unrouted, 1);
}

#[test]
fn broker_sets_sender_and_timestamp() {
    let mut h = Harness::new();
    h.connect(1, "web", 0);
    h.connect(2, "todo", 0);
    h.subscribe(2, "todo.create");
    let mut m = command("todo.create", "x");
    m.sender = "admin".into();
    m.timestamp = 5;
    h.send(1, 1, m);
    let delivered = h
        .actions()
        .into_iter()
        .find_map(|a| match a {
            Action::Deliver { message, .. } => Some(message),
            _ => None,
        })
        .expect("delivered");
    assert_eq!(delivered.sender, "web");
    assert_eq!(delivered.timestamp, h.now);
}

#[test]
fn subscription_belongs_to_the_service_and_messages_wait() {
    let mut h = Harness::new();
    h.connect(1, "web", 0);
    h.connect(2, "todo", 0);
    h.subscribe(2, "todo.create");
    h.broker.disconnect(2, h.now);
    h.send(1, 1, command("todo.create", "waiting"));
    assert_eq!(results(&h.actions()), vec![(1, ErrorCode::Ok)]);
    h.connect(3, "todo", 0);
    h.subscribe(3, "todo.create");
    let d = h.deliveries();
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].0, 3);
    assert_eq!(d[0].4, Bytes::from_static(b"waiting"));
}

#[test]
fn unsubscribe_removes_the_subscription_and_its_backlog() {
    let mut h = Harness::new();
    h.connect(1, "web", 0);
    h.connect(2, "todo", 0);
    h.subscribe(2, "todo.create");
    h.broker.disconnect(2, h.now);
    h.send(1, 1, command("todo.create", "x"));
    assert_eq!(h.broker.store().len(), 1);
    h.connect(3, "todo", 1);
    h.broker.unsubscribe(3, 9, "todo.create");
    assert_eq!(h.broker.store().len(), 0, "backlog released");
    h.send(1, 2, command("todo.create", "y"));
    let r = results(&h.actions());
    assert_eq!(r.last(), Some(&(2, ErrorCode::NoReceiver)));
}

#[test]
fn unacked_delivery_goes_to_another_instance_after_the_deadline() {
    let mut h = Harness::new();
    h.connect(1, "web", 0);
    h.connect(2, "todo", 0);
    h.connect(3, "todo", 0);
    h.broker
        .subscribe(2, 0, "todo.create", 100, 0, StartFrom::New, h.now);
    h.subscribe(3, "todo.create");
    h.send(1, 1, command("todo.create", "x"));
    let first = h.deliveries();
    assert_eq!(first.len(), 1);
    let (first_conn, _, attempt, ..) = first[0].clone();
    assert_eq!(attempt, 1);
    h.advance(99);
    assert!(h.deliveries().is_empty(), "not before the deadline");
    h.advance(1);
    let second = h.deliveries();
    assert_eq!(second.len(), 1);
    assert_eq!(second[0].2, 2, "attempt counts up");
    assert_ne!(
        second[0].0, first_conn,
        "round robin moves on to the other instance"
    );
}

#[test]
fn disconnect_redelivers_at_once_to_another_instance() {
    let mut h = Harness::new();
    h.connect(1, "web", 0);
    h.connect(2, "todo", 0);
    h.subscribe(2, "todo.create");
    h.send(1, 1, command("todo.create", "x"));
    assert_eq!(h.deliveries()[0].0, 2);
    h.connect(3, "todo", 0);
    h.subscribe(3, "todo.create");
    h.broker.disconnect(2, h.now);
    let again = h.deliveries();
    assert_eq!(again.len(), 1);
    assert_eq!((again[0].0, again[0].2), (3, 2));
}

#[test]
fn nack_with_delay_then_dead_letter_after_max_deliveries() {
    let mut h = Harness::new();
    h.connect(1, "web", 0);
    h.connect(2, "todo", 0);
    h.broker
        .subscribe(2, 0, "todo.create", 0, 3, StartFrom::New, h.now);
    h.send(1, 1, command("todo.create", "poison"));
    for attempt in 1..=3 {
        let d = h.deliveries();
        assert_eq!(d.len(), 1, "attempt {attempt}");
        assert_eq!(d[0].2, attempt);
        h.broker.nack(2, d[0].1, 50, h.now);
        h.advance(49);
        if attempt < 3 {
            assert!(h.deliveries().is_empty(), "nack delay holds it back");
            h.advance(1);
        }
    }
    assert!(h.deliveries().is_empty());
    let dead = h.broker.dead_letters("todo");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].0.attempts, 3);
    assert_eq!(
        dead[0].1.as_ref().map(|m| m.payload.clone()),
        Some(Bytes::from_static(b"poison"))
    );
    assert_eq!(h.broker.metrics().dead_lettered, 1);
}

#[test]
fn ack_from_another_connection_is_ignored() {
    let mut h = Harness::new();
    h.connect(1, "web", 0);
    h.connect(2, "todo", 0);
    h.connect(3, "todo", 0);
    h.subscribe(2, "todo.create");
    h.send(1, 1, command("todo.create", "x"));
    let d = h.deliveries();
    h.broker.ack(3, d[0].1, h.now);
    h.broker.ack(1, d[0].1, h.now);
    assert_eq!(h.broker.metrics().acked, 0);
    h.broker.ack(2, d[0].1, h.now);
    assert_eq!(h.broker.metrics().acked, 1);
    assert!(
        h.broker.store().is_empty(),
        "acked by its only receiver: released"
    );
}

#[test]
fn same_key_is_delivered_in_order_one_at_a_time() {
    let mut h = Harness::new();
    h.connect(1, "web", 0);
    h.connect(2, "todo", 0);
    h.connect(3, "todo", 0);
    h.subscribe(2, "todo.update");
    h.subscribe(3, "todo.update");
    for (i, payload) in ["k1-a", "k1-b", "k1-c"].into_iter().enumerate() {
        let mut m = command("todo.update", payload);
        m.key = Some(Bytes::from_static(b"k1"));
        h.send(1, i as u64, m);
    }
    let mut other = command("todo.update", "k2-a");
    other.key = Some(Bytes::from_static(b"k2"));
    h.send(1, 9, other);
    let d = h.deliveries();
    let payloads: Vec<_> = d.iter().map(|d| d.4.clone()).collect();
    assert_eq!(
        payloads,
        vec![Bytes::from_static(b"k1-a"), Bytes::from_static(b"k2-a")]
    );
    let k1 = d
        .iter()
        .find(|d| d.4 == Bytes::from_static(b"k1-a"))
        .expect("k1-a")
        .clone();
    // A nack keeps the key: k1-b must not overtake k1-a.
    h.broker.nack(k1.0, k1.1, 0, h.now);
    let again = h.deliveries();
    assert_eq!(
        again.iter().map(|d| d.4.clone()).collect::<Vec<_>>(),
        vec![Bytes::from_static(b"k1-a")]
    );
    h.broker.ack(again[0].0, again[0].1, h.now);
    let next = h.deliveries();
    assert_eq!(
        next.iter().map(|d| d.4.clone()).collect::<Vec<_>>(),
        vec![Bytes::from_static(b"k1-b")]
    );
}

#[test]
fn duplicate_id_within_window_is_acknowledged_and_dropped() {
    let mut h = Harness::new();
    h.connect(1, "web", 0);
    h.connect(2, "todo", 0);
    h.subscribe(2, "todo.create");
    let m = command("todo.create", "x");
    h.send(1, 1, m.clone());
    h.send(1, 2, m.clone());
    let actions = h.actions();
    assert_eq!(
        results(&actions),
        vec![(1, ErrorCode::Ok), (2, ErrorCode::Ok)]
    );
    assert_eq!(
        actions
            .iter()
            .filter(|a| matches!(a, Action::Deliver { .. }))
            .count(),
        1
    );
    assert_eq!(h.broker.metrics().duplicates, 1);
    let first = actions.iter().find_map(|a| match a {
        Action::Deliver { conn, delivery, .. } => Some((*conn, *delivery)),
        _ => None,
    });
    let (conn, delivery) = first.expect("delivered once");
    h.broker.ack(conn, delivery, h.now);
    h.advance(120_001);
    h.send(1, 3, m);
    assert_eq!(
        h.deliveries().len(),
        1,
        "after the window the id is new again"
    );
}

#[test]
fn quiet_sends_are_answered_only_when_refused() {
    let mut h = Harness::new();
    h.connect(1, "web", 0);
    h.connect(2, "todo", 0);
    h.subscribe(2, "todo.created");
    let _ = h.actions();
    let mut accepted = event("todo.created", "x");
    accepted.transient = true;
    h.broker.send_quiet(1, 1, accepted.clone(), h.now);
    // An accepted duplicate is an acceptance too: no answer either.
    h.broker.send_quiet(1, 2, accepted, h.now);
    h.broker
        .send_quiet(1, 3, command("todo.nobody", "x"), h.now);
    let mut bad_name = event("todo.created", "x");
    bad_name.name = "Not Valid".into();
    h.broker.send_quiet(1, 4, bad_name, h.now);
    let actions = h.actions();
    assert_eq!(
        results(&actions),
        vec![(3, ErrorCode::NoReceiver), (4, ErrorCode::InvalidName)],
        "only the refusals are answered"
    );
    let delivered: Vec<_> = actions
        .iter()
        .filter(|a| matches!(a, Action::Deliver { conn: 2, .. }))
        .collect();
    assert_eq!(delivered.len(), 1, "accepted once, the duplicate dropped");
    assert_eq!(h.broker.metrics().accepted, 1);
    assert_eq!(h.broker.metrics().duplicates, 1);
    assert_eq!(h.broker.metrics().refused, 2);
}

#[test]
fn a_pong_follows_the_answers_to_everything_sent_before_its_ping() {
    let mut h = Harness::new();
    h.connect(1, "web", 0);
    h.connect(2, "todo", 0);
    h.subscribe(2, "todo.created");
    let _ = h.actions();
    h.send(1, 1, event("todo.created", "durable"));
    h.broker
        .send_quiet(1, 2, command("todo.nobody", "x"), h.now);
    h.broker.ping(1, 99);
    let answers: Vec<String> = h
        .actions()
        .iter()
        .filter_map(|a| match a {
            Action::SendResult { conn: 1, seq, .. } => Some(format!("result {seq}")),
            Action::Pong { conn: 1, nonce } => Some(format!("pong {nonce}")),
            _ => None,
        })
        .collect();
    assert_eq!(answers, ["result 1", "result 2", "pong 99"]);
}

#[test]
fn refused_send_retried_with_the_same_id_is_routed_not_deduplicated() {
    let mut h = Harness::new();
    h.connect(1, "web", 0);
    let m = command("todo.create", "x");
    h.send(1, 1, m.clone());
    assert_eq!(results(&h.actions()), vec![(1, ErrorCode::NoReceiver)]);
    h.connect(2, "todo", 0);
    h.subscribe(2, "todo.create");
    h.send(1, 2, m);
    let actions = h.actions();
    assert_eq!(results(&actions), vec![(2, ErrorCode::Ok)]);
    assert_eq!(
        actions
            .iter()
            .filter(|a| matches!(a, Action::Deliver { .. }))
            .count(),
        1
    );
}

#[test]
fn redelivery_after_disconnect_counts_towards_max_deliveries() {
    let mut h = Harness::new();
    h.connect(1, "web", 0);
    h.connect(2, "todo", 0);
    h.broker
        .subscribe(2, 0, "todo.create", 0, 2, StartFrom::New, h.now);
    h.send(1, 1, command("todo.create", "crashy"));
    for conn in [3, 4] {
        assert_eq!(h.deliveries().len(), 1);
        h.connect(conn, "todo", 0);
        h.subscribe(conn, "todo.create");
        h.broker.disconnect(conn - 1, h.now);
    }
    assert!(
        h.deliveries().is_empty(),
        "two crashes used up max_deliveries = 2"
    );
    assert_eq!(h.broker.dead_letters("todo").len(), 1);
}

#[test]
fn expired_messages_are_refused_or_dropped() {
    let mut h = Harness::new();
    h.connect(1, "web", 0);
    h.connect(2, "todo", 0);
    h.subscribe(2, "todo.create");
    let mut stale = command("todo.create", "x");
    stale.expires_at = Some(h.now - 1);
    h.send(1, 1, stale);
    assert_eq!(results(&h.actions()), vec![(1, ErrorCode::Expired)]);

    h.broker.disconnect(2, h.now);
    let mut short = command("todo.create", "y");
    short.expires_at = Some(h.now + 10 * MS);
    h.send(1, 2, short);
    h.advance(20);
    h.connect(3, "todo", 0);
    h.subscribe(3, "todo.create");
    assert!(h.deliveries().is_empty(), "expired while waiting");
    assert_eq!(h.broker.metrics().expired, 1);
    assert!(h.broker.store().is_empty());
}

#[test]
fn deferred_delivery_waits_for_deliver_at() {
    let mut h = Harness::new();
    h.connect(1, "web", 0);
    h.connect(2, "todo", 0);
    h.subscribe(2, "todo.remind");
    let mut later = command("todo.remind", "x");
    later.deliver_at = Some(h.now + 500 * MS);
    h.send(1, 1, later);
    assert_eq!(results(&h.actions()), vec![(1, ErrorCode::Ok)]);
    assert_eq!(h.broker.next_timer(), Some(h.now + 500 * MS));
    h.advance(499);
    assert!(h.deliveries().is_empty());
    h.advance(1);
    assert_eq!(h.deliveries().len(), 1);
}

#[test]
fn transient_messages_go_to_connected_instances_only() {
    let mut h = Harness::new();
    h.connect(1, "web", 0);
    h.connect(2, "todo", 0);
    h.subscribe(2, "todo.ping");
    let mut m = event("todo.ping", "x");
    m.transient = true;
    h.send(1, 1, m.clone());
    assert_eq!(h.deliveries().len(), 1);
    assert!(
        h.broker.store().is_empty(),
        "transient messages are never stored"
    );
    h.broker.disconnect(2, h.now);
    m.id = Uuid::now_v7();
    h.send(1, 2, m);
    assert_eq!(results(&h.actions()), vec![(2, ErrorCode::Ok)]);
    h.connect(3, "todo", 0);
    h.subscribe(3, "todo.ping");
    assert!(h.deliveries().is_empty(), "at most once: nothing waited");
}

#[test]
fn flow_control_limits_deliveries_in_flight() {
    let mut h = Harness::new();
    h.connect(1, "web", 0);
    h.connect(2, "todo", 2);
    h.subscribe(2, "todo.create");
    for i in 0..5 {
        h.send(1, i, command("todo.create", "x"));
    }
    let d = h.deliveries();
    assert_eq!(d.len(), 2);
    h.broker.ack(2, d[0].1, h.now);
    assert_eq!(h.deliveries().len(), 1);
    h.broker.flow(2, 10, h.now);
    assert_eq!(h.deliveries().len(), 2);
}

#[test]
fn replies_stream_back_to_the_requesting_instance() {
    let mut h = Harness::new();
    h.connect(1, "web", 0);
    h.connect(5, "web", 0);
    h.connect(2, "file", 0);
    h.subscribe(2, "file.copy");
    let cmd = command("file.copy", "{}");
    let cmd_id = cmd.id;
    h.send(5, 1, cmd);
    h.deliveries();
    for (i, (name, last)) in [("file.copy.in-progress", false), ("file.copy.done", true)]
        .into_iter()
        .enumerate()
    {
        let mut r = Message::new(Kind::Reply, name, "");
        r.response_to = Some(cmd_id);
        r.is_final = last;
        h.send(2, 10 + i as u64, r);
    }
    let d = h.deliveries();
    assert_eq!(
        d.iter().map(|d| (d.0, d.3.as_str())).collect::<Vec<_>>(),
        vec![(5, "file.copy.in-progress"), (5, "file.copy.done")]
    );
    let mut late = Message::new(Kind::Reply, "file.copy.done", "");
    late.response_to = Some(cmd_id);
    h.send(2, 20, late);
    assert_eq!(
        results(&h.actions()),
        vec![(20, ErrorCode::UnknownRequest)],
        "the stream ended with its final reply"
    );
}

#[test]
fn reply_goes_to_another_instance_when_the_requester_is_gone() {
    let mut h = Harness::new();
    h.connect(1, "web", 0);
    h.connect(5, "web", 0);
    h.connect(2, "todo", 0);
    h.subscribe(2, "todo.create");
    let cmd = command("todo.create", "{}");
    let id = cmd.id;
    h.send(5, 1, cmd);
    h.deliveries();
    h.broker.disconnect(5, h.now);
    let mut r = Message::new(Kind::Reply, "todo.created", "");
    r.response_to = Some(id);
    h.send(2, 2, r);
    assert_eq!(
        h.deliveries().iter().map(|d| d.0).collect::<Vec<_>>(),
        vec![1]
    );
}

#[test]
fn reply_waits_while_no_instance_of_the_requester_is_connected() {
    let mut h = Harness::new();
    h.connect(5, "web", 0);
    h.connect(2, "todo", 0);
    h.subscribe(2, "todo.create");
    let cmd = command("todo.create", "{}");
    let id = cmd.id;
    h.send(5, 1, cmd);
    h.deliveries();
    h.broker.disconnect(5, h.now);
    let mut r = Message::new(Kind::Reply, "todo.created", "");
    r.response_to = Some(id);
    h.send(2, 2, r);
    assert!(h.deliveries().is_empty());
    h.connect(6, "web", 0);
    assert_eq!(
        h.deliveries().iter().map(|d| d.0).collect::<Vec<_>>(),
        vec![6]
    );
}

#[test]
fn invalid_names_and_patterns_are_refused() {
    let mut h = Harness::new();
    h.connect(1, "web", 0);
    h.send(1, 1, command("Todo Create", "x"));
    h.broker
        .subscribe(1, 4, "todo.>.x", 0, 0, StartFrom::New, h.now);
    let actions = h.actions();
    assert_eq!(results(&actions), vec![(1, ErrorCode::InvalidName)]);
    assert!(actions.iter().any(|a| matches!(
        a,
        Action::OpResult {
            request: 4,
            code: ErrorCode::InvalidPattern,
            ..
        }
    )));
}

#[test]
fn an_acceptance_says_where_the_log_holds_the_message() {
    let mut h = Harness::new();
    h.connect(1, "web", 0);
    h.connect(2, "todo", 0);
    h.subscribe(2, "todo.create");
    h.actions();
    let log_seq_of = |actions: &[Action], wanted: u64| {
        actions.iter().find_map(|a| match a {
            Action::SendResult {
                seq, code, log_seq, ..
            } if *seq == wanted => Some((*code, *log_seq)),
            _ => None,
        })
    };
    let first = command("todo.create", "a");
    let first_id = first.id;
    h.send(1, 1, first);
    h.send(1, 2, command("todo.create", "b"));
    let actions = h.actions();
    let (code, one) = log_seq_of(&actions, 1).expect("answered");
    assert!(code.is_ok());
    let (_, two) = log_seq_of(&actions, 2).expect("answered");
    assert!(one > 0 && two > one, "log seqs {one} then {two}");
    assert_eq!(
        h.broker
            .store_mut()
            .get(one)
            .expect("read")
            .expect("stored")
            .payload,
        Bytes::from_static(b"a")
    );
    // Nothing stored: a transient message, a duplicate, a refusal.
    let mut transient = command("todo.create", "c");
    transient.transient = true;
    h.send(1, 3, transient);
    let mut again = command("todo.create", "a");
    again.id = first_id;
    h.send(1, 4, again);
    h.send(1, 5, command("nobody.listens", "d"));
    let actions = h.actions();
    assert_eq!(log_seq_of(&actions, 3), Some((ErrorCode::Ok, 0)));
    assert_eq!(log_seq_of(&actions, 4), Some((ErrorCode::Ok, 0)));
    assert_eq!(log_seq_of(&actions, 5), Some((ErrorCode::NoReceiver, 0)));
}

#[test]
fn drain_stops_new_deliveries() {
    let mut h = Harness::new();
    h.connect(1, "web", 0);
    h.connect(2, "todo", 0);
    h.subscribe(2, "todo.create");
    h.broker.drain(2);
    let actions = h.actions();
    assert!(actions
        .iter()
        .any(|a| matches!(a, Action::Drained { conn: 2 })));
    assert!(actions.iter().any(|a| matches!(
        a,
        Action::OpResult {
            code: ErrorCode::Ok,
            ..
        }
    )));
    h.send(1, 1, command("todo.create", "x"));
    assert!(h.deliveries().is_empty());
}

// ---- state-machine property test --------------------------------------

#[derive(Debug, Clone)]
enum Op {
    Send { key: u8 },
    Connect,
    Disconnect(usize),
    Ack(usize),
    Nack(usize),
    Advance(u16),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..4).prop_map(|key| Op::Send { key }),
        1 => Just(Op::Connect),
        1 => (0usize..8).prop_map(Op::Disconnect),
        4 => (0usize..32).prop_map(Op::Ack),
        1 => (0usize..32).prop_map(Op::Nack),
        1 => (0u16..300).prop_map(Op::Advance),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

    /// Against a simple model: every accepted message ends acked exactly
    /// once or dead-lettered; never two of one key in flight; each key's
    /// messages are first delivered in send order; nothing is invented.
    #[test]
    fn delivery_rules_hold(ops in proptest::collection::vec(op(), 1..200)) {
        let mut h = Harness::new();
        h.connect(1, "sender", 0);
        h.broker.subscribe(1000, 0, "jobs.run", 0, 0, StartFrom::New, h.now); // unknown conn: ignored
        let mut next_conn = 100;
        h.connect(next_conn, "worker", 3);
        h.broker.subscribe(next_conn, 0, "jobs.run", 100, 4, StartFrom::New, h.now);
        let mut live: Vec<ConnId> = vec![next_conn];
        let mut sent: Vec<(u8, Bytes)> = Vec::new();
        let mut in_flight: Vec<(ConnId, DeliveryId, Bytes)> = Vec::new();
        let mut acked: Vec<Bytes> = Vec::new();
        let mut first_delivery_order: HashMap<u8, Vec<Bytes>> = HashMap::new();
        let mut seen_first: std::collections::HashSet<Bytes> = Default::default();

        let mut absorb = |h: &mut Harness<MemoryStore>, in_flight: &mut Vec<(ConnId, DeliveryId, Bytes)>| -> Result<(), TestCaseError> {
            for a in h.actions() {
                if let Action::Deliver { conn, delivery, message, .. } = a {
                    // Deliveries the broker took back (deadline) are no longer in flight.
                    let held: Vec<DeliveryId> = h.broker.services.get("worker").map(|s| s.queue.in_flight.keys().copied().collect()).unwrap_or_default();
                    in_flight.retain(|f| held.contains(&f.1));
                    let key = message.key.clone().expect("keyed");
                    prop_assert!(!in_flight.iter().any(|(_, _, p)| p[..1] == key[..]), "two of key {:?} in flight", key);
                    in_flight.push((conn, delivery, message.payload.clone()));
                    if seen_first.insert(message.payload.clone()) {
                        first_delivery_order.entry(key[0]).or_default().push(message.payload.clone());
                    }
                }
            }
            Ok(())
        };

        for op in ops {
            match op {
                Op::Send { key } => {
                    let payload = Bytes::from(format!("{}{}", key as char, sent.len()));
                    let mut m = Message::new(Kind::Command, "jobs.run", payload.clone());
                    m.key = Some(Bytes::from(vec![key]));
                    m.payload = {
                        let mut p = vec![key];
                        p.extend_from_slice(&payload);
                        Bytes::from(p)
                    };
                    sent.push((key, m.payload.clone()));
                    h.send(1, sent.len() as u64, m);
                }
                Op::Connect => {
                    next_conn += 1;
                    h.connect(next_conn, "worker", 3);
                    h.subscribe(next_conn, "jobs.run");
                    live.push(next_conn);
                }
                Op::Disconnect(i) => {
                    if !live.is_empty() {
                        let conn = live.remove(i % live.len());
                        in_flight.retain(|(c, _, _)| *c != conn);
                        h.broker.disconnect(conn, h.now);
                    }
                }
                Op::Ack(i) => {
                    if !in_flight.is_empty() {
                        let (conn, d, p) = in_flight.remove(i % in_flight.len());
                        h.broker.ack(conn, d, h.now);
                        acked.push(p);
                    }
                }
                Op::Nack(i) => {
                    if !in_flight.is_empty() {
                        let (conn, d, _) = in_flight.remove(i % in_flight.len());
                        h.broker.nack(conn, d, 10, h.now);
                    }
                }
                Op::Advance(ms) => {
                    // Time passing makes held deliveries overdue: the model
                    // forgets them as the broker does.
                    h.advance(u64::from(ms));
                }
            }
            // Deliveries past their deadline were taken back by the broker.
            let overdue: Vec<DeliveryId> = in_flight.iter().map(|f| f.1).filter(|d| {
                h.broker.services.get("worker").is_some_and(|s| !s.queue.in_flight.contains_key(d))
            }).collect();
            in_flight.retain(|f| !overdue.contains(&f.1));
            absorb(&mut h, &mut in_flight)?;
            let counted = h.broker.services.get("worker").map_or(0, |s| s.queue.backlog_bytes());
            prop_assert_eq!(counted, h.broker.backlog_bytes_read("worker"), "backlog bytes as counted and as read");
        }
        // Settle: a fresh consumer acks everything until nothing is left.
        next_conn += 1;
        h.connect(next_conn, "worker", 1000);
        h.subscribe(next_conn, "jobs.run");
        for _ in 0..100 {
            let overdue: Vec<DeliveryId> = in_flight.iter().map(|f| f.1).filter(|d| {
                h.broker.services.get("worker").is_some_and(|s| !s.queue.in_flight.contains_key(d))
            }).collect();
            in_flight.retain(|f| !overdue.contains(&f.1));
            absorb(&mut h, &mut in_flight)?;
            for (conn, d, p) in std::mem::take(&mut in_flight) {
                h.broker.ack(conn, d, h.now);
                acked.push(p);
            }
            h.advance(100);
        }
        let dead: Vec<Bytes> = h.broker.dead_letters("worker").into_iter().filter_map(|(_, m)| m.map(|m| m.payload.clone())).collect();
        let mut done: Vec<Bytes> = acked.iter().chain(dead.iter()).cloned().collect();
        done.sort();
        let mut expected: Vec<Bytes> = sent.iter().map(|(_, p)| p.clone()).collect();
        expected.sort();
        prop_assert_eq!(done, expected, "every message acked exactly once or dead-lettered");
        for (key, order) in first_delivery_order {
            let sent_order: Vec<Bytes> = sent.iter().filter(|(k, _)| *k == key).map(|(_, p)| p.clone()).filter(|p| order.contains(p)).collect();
            prop_assert_eq!(order, sent_order, "key {} first-delivered out of order", key);
        }
        prop_assert_eq!(h.broker.store().len(), dead.len(), "only dead letters stay stored");
    }
}

// ---- pipelined ordering keys: a property test --------------------------

/// What a model instance does next (indices wrap over what exists).
#[derive(Debug, Clone)]
enum KeyOp {
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

fn key_op() -> impl Strategy<Value = KeyOp> {
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

struct KeyModel {
    h: Harness,
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
}

impl KeyModel {
    fn new() -> KeyModel {
        let mut h = Harness::new();
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
        }
    }

    fn connect(&mut self, pipelined: bool) {
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
                self.h.broker.nack(conn, delivery, 20, self.h.now);
            }
        }
    }

    fn apply(&mut self, op: KeyOp) {
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
        self.absorb();
    }

    /// No handler saw key k's message n + 1 before message n's last
    /// attempt — the delivery of n whose ack the broker took — was handed
    /// to a handler, unless the instance that saw n + 1 crashed (or was
    /// closed) afterwards: the at-least-once duplicate. (A delivery read
    /// after the broker took it back is a duplicate of its message, as
    /// with any message; it is not n's last attempt.)
    fn check_order(&self) -> Result<(), TestCaseError> {
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
        let mut m = KeyModel::new();
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
                m.absorb();
            }
            m.h.advance(50);
            m.absorb();
        }
        m.check_order()?;
        prop_assert_eq!(m.gone_at.len(), gone, "an instance was closed while all went well");
        let depth = m.h.broker.services.get("worker").map_or(0, |s| s.queue.depth());
        prop_assert_eq!(depth, 0, "everything acked or dead-lettered");
        let dead = m.h.broker.dead_letters("worker").len();
        prop_assert_eq!(m.h.broker.store().len(), dead, "only dead letters stay stored");
    }
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

// ---- recovery -----------------------------------------------------------

impl Harness<MemoryLog> {
    /// `kill -9` and restart: a new broker on what the log had synced.
    fn crash_and_recover(&mut self) -> RecoveryReport {
        let log = self.broker.store().crash();
        self.broker = Broker::new(Config::default(), log);
        self.broker.recover(self.now).expect("recovers")
    }
}

fn keyed(name: &str, key: &'static str, payload: &'static str) -> Message {
    let mut m = command(name, payload);
    m.key = Some(Bytes::from_static(key.as_bytes()));
    m
}

/// Sends, delivers, acks one, nacks one with a delay, dead-letters one and
/// leaves two in flight; returns the harness before the crash.
fn busy_broker() -> Harness<MemoryLog> {
    let mut h = Harness::with_store(MemoryLog::new());
    h.connect(1, "web", 0);
    h.connect(2, "work", 0);
    h.broker
        .subscribe(2, 0, "job.>", 60_000, 2, StartFrom::New, h.now);
    for (i, payload) in ["acked", "nacked", "poison", "inflight-a", "inflight-b"]
        .into_iter()
        .enumerate()
    {
        h.send(1, i as u64, command(&format!("job.{payload}"), payload));
    }
    h.send(1, 9, keyed("job.keyed", "k", "k1"));
    h.send(1, 10, keyed("job.keyed", "k", "k2"));
    let d = h.deliveries();
    assert_eq!(d.len(), 6, "k2 waits behind k1");
    let by_payload = |p: &str| {
        d.iter()
            .find(|x| x.4 == Bytes::copy_from_slice(p.as_bytes()))
            .expect("delivered")
            .1
    };
    h.broker.ack(2, by_payload("acked"), h.now);
    h.broker.nack(2, by_payload("nacked"), 5_000, h.now);
    h.broker.nack(2, by_payload("poison"), 0, h.now);
    let again = h.deliveries();
    let poison = again
        .iter()
        .find(|x| x.4 == Bytes::from_static(b"poison"))
        .expect("redelivered");
    h.broker.nack(2, poison.1, 0, h.now);
    h.actions();
    assert_eq!(h.broker.dead_letters("work").len(), 1);
    h
}

#[test]
fn restart_resumes_subscriptions_backlog_attempts_and_dead_letters() {
    let mut h = busy_broker();
    let report = h.crash_and_recover();
    assert_eq!(
        report.services, 1,
        "only the subscribed service is durable: {report:?}"
    );
    assert_eq!(report.dead_letters, 1);
    h.connect(3, "work", 0);
    h.subscribe(3, "job.>");
    let d = h.deliveries();
    let mut got: Vec<(String, u32)> = d
        .iter()
        .map(|x| (String::from_utf8_lossy(&x.4).into_owned(), x.2))
        .collect();
    got.sort();
    // Acked: gone. Nacked with a delay: not yet. Dead letter: stays dead.
    // In flight at the crash: again, with the crashed attempt counted.
    assert_eq!(
        got,
        vec![
            ("inflight-a".into(), 2),
            ("inflight-b".into(), 2),
            ("k1".into(), 2)
        ],
        "{d:?}"
    );
    h.advance(5_000);
    let later = h.deliveries();
    assert_eq!(
        later.iter().map(|x| (x.4.clone(), x.2)).collect::<Vec<_>>(),
        vec![(Bytes::from_static(b"nacked"), 2)]
    );
    let k1 = d
        .iter()
        .find(|x| x.4 == Bytes::from_static(b"k1"))
        .expect("k1");
    h.broker.ack(3, k1.1, h.now);
    assert_eq!(
        h.deliveries()
            .iter()
            .map(|x| x.4.clone())
            .collect::<Vec<_>>(),
        vec![Bytes::from_static(b"k2")]
    );
    let dead = h.broker.dead_letters("work");
    assert_eq!(
        dead[0].1.as_ref().map(|m| m.payload.clone()),
        Some(Bytes::from_static(b"poison"))
    );
}

#[test]
fn a_keyed_retry_waiting_out_its_nack_delay_keeps_its_key_across_a_restart() {
    for with_snapshot in [false, true] {
        let mut h = Harness::with_store(MemoryLog::new());
        h.connect(1, "web", 0);
        h.connect(2, "work", 0);
        h.subscribe(2, "job.keyed");
        h.send(1, 0, keyed("job.keyed", "k", "k1"));
        h.send(1, 1, keyed("job.keyed", "k", "k2"));
        let d = h.deliveries();
        assert_eq!(payloads(&d), vec![Bytes::from_static(b"k1")]);
        h.broker.nack(2, d[0].1, 5_000, h.now);
        h.actions();
        if with_snapshot {
            h.advance(10);
            h.broker.checkpoint(h.now).expect("checkpoint");
        }
        let report = h.crash_and_recover();
        assert_eq!(report.snapshot_covers.is_some(), with_snapshot);
        h.connect(3, "work", 0);
        h.subscribe(3, "job.keyed");
        assert!(
            h.deliveries().is_empty(),
            "k2 waits for k1's retry (snapshot: {with_snapshot})"
        );
        h.advance(5_000);
        let retry = h.deliveries();
        assert_eq!(
            retry.iter().map(|x| (x.4.clone(), x.2)).collect::<Vec<_>>(),
            vec![(Bytes::from_static(b"k1"), 2)],
            "snapshot: {with_snapshot}"
        );
        h.broker.ack(3, retry[0].1, h.now);
        assert_eq!(payloads(&h.deliveries()), vec![Bytes::from_static(b"k2")]);
    }
}

#[test]
fn ids_stamped_now_are_still_duplicates_after_a_checkpoint_and_a_crash() {
    let mut h = Harness::with_store(MemoryLog::new());
    // The clock at the ids' own time: they go to the dedup window's
    // timestamp buckets, which the snapshot keeps sealed.
    h.now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_nanos() as Nanos;
    h.connect(1, "web", 0);
    let sent: Vec<Message> = (0..50).map(|_| event("thing.happened", "x")).collect();
    for (seq, m) in sent.iter().enumerate() {
        h.send(1, seq as u64, m.clone());
    }
    h.actions();
    h.advance(500);
    h.broker.checkpoint(h.now).expect("checkpoint");
    // Sent after the checkpoint: found again by replaying the log.
    let later = event("thing.happened", "y");
    h.send(1, 50, later.clone());
    h.actions();
    let report = h.crash_and_recover();
    assert!(report.snapshot_covers.is_some(), "{report:?}");
    h.connect(1, "web", 0);
    for (seq, m) in sent.into_iter().chain([later]).enumerate() {
        h.send(1, 100 + seq as u64, m);
    }
    assert_eq!(h.broker.metrics().duplicates, 51);
    h.send(1, 200, event("thing.happened", "z"));
    assert_eq!(h.broker.metrics().duplicates, 51, "a new id is not one");
}

#[test]
fn a_checkpoint_gives_the_same_state_as_a_full_replay() {
    let mut a = busy_broker();
    let mut b = busy_broker();
    b.broker.checkpoint(b.now).expect("checkpoint");
    // More work after the checkpoint, on both.
    for h in [&mut a, &mut b] {
        h.send(1, 20, command("job.after", "after"));
        h.actions();
    }
    let ra = a.crash_and_recover();
    let rb = b.crash_and_recover();
    assert!(rb.snapshot_covers.is_some() && ra.snapshot_covers.is_none());
    assert!(
        rb.records_replayed < ra.records_replayed,
        "{rb:?} vs {ra:?}"
    );
    assert_eq!(
        (ra.backlog, ra.dead_letters, ra.services),
        (rb.backlog, rb.dead_letters, rb.services)
    );
    assert_eq!(a.broker.services(), b.broker.services());
    let letters = |h: &mut Harness<MemoryLog>| {
        h.broker
            .dead_letters("work")
            .into_iter()
            .map(|(d, _)| d)
            .collect::<Vec<_>>()
    };
    assert_eq!(letters(&mut a), letters(&mut b));
    // The compacted log still recovers to the same state.
    let rc = b.crash_and_recover();
    assert_eq!(rc.backlog, rb.backlog);
}

#[test]
fn unsynced_sends_are_never_acknowledged_and_a_failed_sync_rebuilds_state() {
    let mut h = Harness::with_store(MemoryLog::new());
    h.connect(1, "web", 0);
    h.connect(2, "work", 0);
    h.subscribe(2, "job.run");
    h.actions();
    h.broker.store_mut().failing_syncs = 1;
    h.send(1, 1, command("job.run", "lost"));
    let actions = h.actions();
    assert_eq!(results(&actions), vec![(1, ErrorCode::StorageFailed)]);
    assert!(
        !actions.iter().any(|a| matches!(a, Action::Deliver { .. })),
        "nothing unsynced is delivered"
    );
    assert_eq!(h.broker.metrics().storage_failures, 1);
    assert!(h
        .broker
        .take_alerts()
        .iter()
        .any(|a| a.contains("storage sync failed")));
    // Until the disk has been seen working again, durable sends are refused
    // without touching it.
    assert!(h.broker.is_degraded());
    h.send(1, 5, command("job.run", "early"));
    assert_eq!(results(&h.actions()), vec![(5, ErrorCode::StorageFailed)]);
    // Space is back: the next tick notices, and sends are accepted again.
    h.advance(100);
    assert!(!h.broker.is_degraded());
    assert!(h
        .broker
        .take_alerts()
        .iter()
        .any(|a| a.contains("storage works again")));
    h.send(1, 2, command("job.run", "kept"));
    let actions = h.actions();
    assert_eq!(results(&actions), vec![(2, ErrorCode::Ok)]);
    let delivered: Vec<_> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Deliver { message, .. } => Some(message.payload.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(delivered, vec![Bytes::from_static(b"kept")]);
    h.crash_and_recover();
    h.connect(3, "work", 0);
    h.subscribe(3, "job.run");
    assert_eq!(
        h.deliveries()
            .iter()
            .map(|d| d.4.clone())
            .collect::<Vec<_>>(),
        vec![Bytes::from_static(b"kept")]
    );
}

#[test]
fn history_replay_from_the_beginning_or_a_time() {
    let mut h = Harness::with_store(MemoryLog::new());
    h.connect(1, "web", 0);
    for i in 0..4u64 {
        let mut m = event("todo.created", "x");
        m.payload = Bytes::from(i.to_string());
        h.send(1, i, m);
        h.advance(10);
    }
    // Sent at +0, +10, +20, +30 ms; now is +40 ms.
    let cutoff = h.now - 25 * MS;
    h.connect(2, "late", 0);
    h.broker
        .subscribe(2, 0, "todo.*", 0, 0, StartFrom::Beginning, h.now);
    let all: Vec<_> = h.deliveries().into_iter().map(|d| d.4).collect();
    assert_eq!(all.len(), 4);
    h.connect(3, "later", 0);
    h.broker
        .subscribe(3, 0, "todo.*", 0, 0, StartFrom::Time(cutoff), h.now);
    let recent: Vec<_> = h.deliveries().into_iter().map(|d| d.4).collect();
    assert_eq!(
        recent,
        vec![Bytes::from_static(b"2"), Bytes::from_static(b"3")]
    );
    h.connect(4, "fresh", 0);
    h.broker
        .subscribe(4, 0, "todo.*", 0, 0, StartFrom::New, h.now);
    assert!(h.deliveries().is_empty());
}

#[test]
fn retention_rules_limit_history_by_age_and_size_per_pattern() {
    let config = Config {
        retention_rules: vec![
            RetentionRule {
                pattern: "metrics.>".into(),
                max_age_ms: 10,
                max_bytes: 0,
            },
            RetentionRule {
                pattern: "big.>".into(),
                max_age_ms: 60_000,
                max_bytes: 10,
            },
        ],
        ..Config::default()
    };
    let mut h = Harness::with_store(MemoryLog::new());
    h.broker = Broker::new(config, MemoryLog::new());
    h.connect(1, "web", 0);
    h.send(1, 1, event("metrics.cpu", "old"));
    h.send(1, 2, event("audit.login", "kept"));
    for (i, p) in ["b1---", "b2---", "b3---"].into_iter().enumerate() {
        h.send(1, 10 + i as u64, event("big.blob", p));
    }
    h.advance(20);
    h.connect(2, "reader", 0);
    h.broker
        .subscribe(2, 0, ">", 0, 0, StartFrom::Beginning, h.now);
    let mut got: Vec<Bytes> = h.deliveries().into_iter().map(|d| d.4).collect();
    got.sort();
    assert_eq!(
        got,
        vec![
            Bytes::from_static(b"b2---"),
            Bytes::from_static(b"b3---"),
            Bytes::from_static(b"kept")
        ],
        "metrics.* is past its 10 ms; big.* keeps only its newest 10 bytes"
    );
}

#[derive(Debug, Clone)]
enum CrashOp {
    Send { key: u8 },
    Ack(usize),
    Nack(usize),
    Advance(u16),
    Crash,
    Checkpoint,
}

fn crash_op() -> impl Strategy<Value = CrashOp> {
    prop_oneof![
        5 => (0u8..3).prop_map(|key| CrashOp::Send { key }),
        4 => (0usize..16).prop_map(CrashOp::Ack),
        1 => (0usize..16).prop_map(CrashOp::Nack),
        1 => (0u16..200).prop_map(CrashOp::Advance),
        1 => Just(CrashOp::Crash),
        1 => Just(CrashOp::Checkpoint),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, .. ProptestConfig::default() })]

    /// With crashes and checkpoints at any point: every acknowledged send is
    /// delivered (at least once) and finally acked or dead-lettered; nothing
    /// unacknowledged or invented shows up; acked messages never come back.
    #[test]
    fn nothing_acknowledged_is_lost_across_crashes(ops in proptest::collection::vec(crash_op(), 1..120)) {
        let mut h = Harness::with_store(MemoryLog::new());
        let attach = |h: &mut Harness<MemoryLog>, conn: ConnId| {
            h.connect(1, "sender", 0);
            h.connect(conn, "worker", 4);
            h.broker.subscribe(conn, 0, "jobs.run", 100, 1000, StartFrom::New, h.now);
        };
        let mut conn = 100;
        attach(&mut h, conn);
        let mut accepted: HashMap<u64, Bytes> = HashMap::new();
        let mut sent: HashMap<u64, Bytes> = HashMap::new();
        let mut acked: std::collections::HashSet<Bytes> = Default::default();
        let mut in_flight: Vec<(DeliveryId, Bytes)> = Vec::new();
        let mut n = 0u64;
        let absorb = |h: &mut Harness<MemoryLog>, in_flight: &mut Vec<(DeliveryId, Bytes)>, accepted: &mut HashMap<u64, Bytes>, sent: &HashMap<u64, Bytes>, acked: &std::collections::HashSet<Bytes>| -> Result<(), TestCaseError> {
            for a in h.actions() {
                match a {
                    Action::Deliver { delivery, message, .. } => {
                        prop_assert!(sent.values().any(|p| *p == message.payload), "invented {:?}", message.payload);
                        prop_assert!(!acked.contains(&message.payload), "acked message came back: {:?}", message.payload);
                        in_flight.retain(|(_, p)| *p != message.payload);
                        in_flight.push((delivery, message.payload.clone()));
                    }
                    Action::SendResult { seq, code, .. } if code.is_ok() => {
                        if let Some(p) = sent.get(&seq) {
                            accepted.insert(seq, p.clone());
                        }
                    }
                    _ => {}
                }
            }
            Ok(())
        };
        for op in ops {
            match op {
                CrashOp::Send { key } => {
                    n += 1;
                    let payload = Bytes::from(format!("m{n}"));
                    let mut m = Message::new(Kind::Command, "jobs.run", payload.clone());
                    m.key = Some(Bytes::from(vec![key]));
                    sent.insert(n, payload);
                    h.send(1, n, m);
                }
                CrashOp::Ack(i) if !in_flight.is_empty() => {
                    let (d, p) = in_flight.remove(i % in_flight.len());
                    h.broker.ack(conn, d, h.now);
                    h.actions();
                    acked.insert(p);
                }
                CrashOp::Nack(i) if !in_flight.is_empty() => {
                    let (d, _) = in_flight.remove(i % in_flight.len());
                    h.broker.nack(conn, d, 10, h.now);
                }
                CrashOp::Ack(_) | CrashOp::Nack(_) => {}
                CrashOp::Advance(ms) => h.advance(u64::from(ms)),
                CrashOp::Crash => {
                    // Whatever was not taken (synced) before the crash is lost.
                    h.crash_and_recover();
                    in_flight.clear();
                    conn += 1;
                    attach(&mut h, conn);
                }
                CrashOp::Checkpoint => {
                    h.broker.checkpoint(h.now).expect("checkpoint");
                }
            }
            absorb(&mut h, &mut in_flight, &mut accepted, &sent, &acked)?;
            let counted = h.broker.services.get("worker").map_or(0, |s| s.queue.backlog_bytes());
            prop_assert_eq!(counted, h.broker.backlog_bytes_read("worker"), "backlog bytes as counted and as read");
        }
        // Settle: ack everything until nothing more comes.
        for _ in 0..50 {
            for (d, p) in std::mem::take(&mut in_flight) {
                h.broker.ack(conn, d, h.now);
                acked.insert(p);
            }
            h.advance(200);
            absorb(&mut h, &mut in_flight, &mut accepted, &sent, &acked)?;
        }
        for p in accepted.values() {
            prop_assert!(acked.contains(p), "acknowledged {:?} was never delivered and acked", p);
        }
    }
}

// ---- contracts ----------------------------------------------------------

fn manifest() -> Arc<courier_manifest::Manifest> {
    let text = format!(
        r#"
[services.web]
sends = ["todos.list@1", "todo.create@1"]
receives = ["todo.created@1"]
tokens = ["{web}"]

[services.todo]
receives = ["todos.list@1", "todo.create@1"]
sends = ["todo.created@1"]
tokens = ["{todo}"]

[services.ops]
sends = ["todo.secret@1"]
receives = ["todo.created@1"]
tokens = ["{ops}"]

[admin]
tokens = ["{admin}"]
"#,
        web = courier_manifest::hash_token("web-token"),
        todo = courier_manifest::hash_token("todo-token"),
        ops = courier_manifest::hash_token("ops-token"),
        admin = courier_manifest::hash_token("admin-token"),
    );
    Arc::new(courier_manifest::Manifest::parse(&text).expect("valid manifest"))
}

fn op_results(actions: &[Action]) -> Vec<(u64, ErrorCode, String)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::OpResult {
                request,
                code,
                reason,
                ..
            } => Some((*request, *code, reason.clone())),
            _ => None,
        })
        .collect()
}

fn refusal(actions: &[Action], seq: u64) -> (ErrorCode, String) {
    actions
        .iter()
        .find_map(|a| match a {
            Action::SendResult {
                seq: s,
                code,
                reason,
                ..
            } if *s == seq => Some((*code, reason.clone())),
            _ => None,
        })
        .expect("a send result")
}

#[test]
fn the_manifest_decides_who_sends_and_receives_what() {
    let mut h = Harness::new();
    h.broker.set_manifest(Some(manifest()));
    h.connect(1, "web", 0);
    h.connect(2, "todo", 0);
    h.connect(3, "ops", 0);
    // A wildcard subscription is cut down to what todo may receive.
    h.broker
        .subscribe(2, 7, "todo.>", 0, 0, StartFrom::New, h.now);
    h.broker
        .subscribe(2, 8, "billing.>", 0, 0, StartFrom::New, h.now);
    let ops = op_results(&h.actions());
    assert_eq!(ops[0].1, ErrorCode::Unauthorized, "{ops:?}");
    assert!(
        ops[0].2.contains("todo") && ops[0].2.contains("billing.>"),
        "{ops:?}"
    );
    assert_eq!(ops[1].1, ErrorCode::Ok);

    h.send(1, 1, command("todo.create", "ok"));
    h.send(1, 2, command("todo.delete", "no"));
    let mut v2 = command("todo.create", "v2");
    v2.version = courier_proto::Version::new(2, 0);
    h.send(1, 3, v2);
    // ops may send todo.secret, but nobody may receive it, even via todo.>.
    h.send(3, 4, command("todo.secret", "s"));
    let actions = h.actions();
    assert_eq!(refusal(&actions, 1).0, ErrorCode::Ok);
    let (code, reason) = refusal(&actions, 2);
    assert_eq!(code, ErrorCode::Unauthorized);
    assert!(
        reason.contains("service web may not send todo.delete"),
        "{reason}"
    );
    assert!(
        reason.contains("todo.create@1"),
        "the rule is named: {reason}"
    );
    let (code, reason) = refusal(&actions, 3);
    assert_eq!(code, ErrorCode::Unauthorized, "{reason}");
    assert!(reason.contains("major version 2"), "{reason}");
    let (code, reason) = refusal(&actions, 4);
    assert_eq!(code, ErrorCode::NoReceiver, "{reason}");
    let delivered: Vec<Bytes> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Deliver { message, .. } => Some(message.payload.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(delivered, vec![Bytes::from_static(b"ok")]);
}

#[test]
fn only_a_service_that_received_the_command_may_reply_to_it() {
    let mut h = Harness::new();
    h.broker.set_manifest(Some(manifest()));
    h.connect(1, "web", 0);
    h.connect(2, "todo", 0);
    h.connect(3, "ops", 0);
    h.subscribe(2, "todo.create");
    let cmd = command("todo.create", "x");
    let id = cmd.id;
    h.send(1, 1, cmd);
    h.actions();
    let mut forged = Message::new(Kind::Reply, "todo.created", "forged");
    forged.response_to = Some(id);
    h.send(3, 2, forged);
    let (code, reason) = refusal(&h.actions(), 2);
    assert_eq!(code, ErrorCode::Unauthorized);
    assert!(reason.contains("service ops may not reply"), "{reason}");
    let mut real = Message::new(Kind::Reply, "todo.created", "real");
    real.response_to = Some(id);
    h.send(2, 3, real);
    let actions = h.actions();
    assert_eq!(refusal(&actions, 3).0, ErrorCode::Ok);
    assert!(actions
        .iter()
        .any(|a| matches!(a, Action::Deliver { conn: 1, .. })));
}

#[test]
fn broker_commands_need_the_admin_identity_under_a_manifest() {
    let mut h = Harness::new();
    h.broker.set_manifest(Some(manifest()));
    h.connect(1, "web", 0);
    h.broker
        .connect_as(9, "admin", "admin-1", 0, true)
        .expect("admin connects");
    let mut list = command("courier.services.list", "");
    h.send(1, 1, list.clone());
    let (code, reason) = refusal(&h.actions(), 1);
    assert_eq!(code, ErrorCode::Unauthorized);
    assert!(reason.contains("only the admin identity"), "{reason}");
    list.id = Uuid::now_v7();
    h.send(9, 2, list);
    let actions = h.actions();
    assert_eq!(refusal(&actions, 2).0, ErrorCode::Ok);
    assert!(actions
        .iter()
        .any(|a| matches!(a, Action::Deliver { conn: 9, .. })));
}

#[test]
fn any_connection_may_advertise_where_its_own_instance_serves() {
    let mut h = Harness::new();
    h.broker.set_manifest(Some(manifest()));
    h.connect(1, "web", 0);
    let index = h.broker.registry().index();
    h.send(
        1,
        1,
        command(
            "courier.registry.advertise",
            r#"{"address": "127.0.0.1:3000", "meta": {"zone": "a"}}"#,
        ),
    );
    let actions = h.actions();
    assert_eq!(refusal(&actions, 1).0, ErrorCode::Ok);
    let reply = actions
        .iter()
        .find_map(|a| match a {
            Action::Deliver {
                conn: 1, message, ..
            } => Some(message.clone()),
            _ => None,
        })
        .expect("the broker answers");
    assert_eq!(reply.name, "courier.registry.advertised");
    let entry = h.broker.registry().get("web", "web-1").expect("registered");
    assert_eq!(entry.spec.address, "127.0.0.1:3000");
    assert_eq!(entry.spec.meta["zone"], "a");
    assert!(
        h.broker.registry().index() > index,
        "watchers see the change"
    );

    h.send(
        1,
        2,
        command("courier.registry.advertise", r#"{"address": "localhost"}"#),
    );
    let (code, reason) = refusal(&h.actions(), 2);
    assert_eq!(code, ErrorCode::InvalidMessage);
    assert!(reason.contains("HOST:PORT"), "{reason}");
    h.send(1, 3, command("courier.registry.advertise", "{}"));
    let (code, reason) = refusal(&h.actions(), 3);
    assert_eq!(code, ErrorCode::InvalidMessage);
    assert!(reason.contains("address"), "{reason}");
    // The exception is this one command: the others stay the admin's.
    h.send(1, 4, command("courier.services.list", ""));
    assert_eq!(refusal(&h.actions(), 4).0, ErrorCode::Unauthorized);

    h.broker.disconnect(1, h.now);
    assert!(h.broker.registry().get("web", "web-1").is_none());
}

// ---- limits --------------------------------------------------------------

fn harness_with_send_rate(per_service: u32) -> Harness {
    let mut h = Harness::new();
    h.broker = Broker::new(
        Config {
            send_rate_per_service: per_service,
            ..Config::default()
        },
        MemoryStore::new(),
    );
    h
}

#[test]
fn a_service_over_its_send_rate_is_refused_and_recovers() {
    let mut h = harness_with_send_rate(10);
    h.connect(1, "chatty", 0);
    h.connect(2, "quiet", 0);
    for i in 0..12 {
        h.send(1, i, event("noise.made", "x"));
    }
    h.send(2, 100, event("calm.note", "x"));
    let r = results(&h.actions());
    assert_eq!(
        r.iter().filter(|(_, c)| c.is_ok()).count(),
        11,
        "10 for chatty (its burst) and quiet's one: {r:?}"
    );
    assert_eq!(
        r.iter()
            .filter(|(_, c)| *c == ErrorCode::RateLimited)
            .count(),
        2
    );
    assert_eq!(h.broker.metrics().rate_limited, 2);
    h.advance(500);
    for i in 0..6 {
        h.send(1, 200 + i, event("noise.made", "x"));
    }
    let r = results(&h.actions());
    assert_eq!(
        r.iter().filter(|(_, c)| c.is_ok()).count(),
        5,
        "half a second refills half the rate: {r:?}"
    );
}

#[test]
fn instances_of_a_service_share_its_send_rate() {
    let mut h = harness_with_send_rate(10);
    h.connect(1, "chatty", 0);
    h.connect(2, "chatty", 0);
    for i in 0..12 {
        h.send(1 + i % 2, i, event("noise.made", "x"));
    }
    let r = results(&h.actions());
    assert_eq!(r.iter().filter(|(_, c)| c.is_ok()).count(), 10, "{r:?}");
    assert_eq!(
        r.iter()
            .filter(|(_, c)| *c == ErrorCode::RateLimited)
            .count(),
        2
    );
    // A refused send takes no token.
    h.advance(100);
    h.send(1, 50, event("Bad Name", "x"));
    h.send(2, 51, event("noise.made", "x"));
    let r = results(&h.actions());
    assert_eq!(r.len(), 2, "{r:?}");
    assert_eq!(r.iter().filter(|(_, c)| c.is_ok()).count(), 1, "{r:?}");
    assert!(r.iter().any(|(_, c)| *c == ErrorCode::InvalidName), "{r:?}");
}

#[test]
fn connections_per_service_are_capped() {
    let mut h = Harness::new();
    h.broker = Broker::new(
        Config {
            connections_per_service_max: 2,
            ..Config::default()
        },
        MemoryStore::new(),
    );
    assert!(h.broker.connect_as(1, "web", "a", 0, false).is_ok());
    assert!(h.broker.connect_as(2, "web", "b", 0, false).is_ok());
    let refused = h.broker.connect_as(3, "web", "c", 0, false);
    assert!(
        refused
            .as_ref()
            .is_err_and(|r| r.contains("already has 2 connections")),
        "{refused:?}"
    );
    assert!(
        h.broker.connect_as(4, "todo", "a", 0, false).is_ok(),
        "other services are not affected"
    );
    h.broker.disconnect(1, h.now);
    assert!(h.broker.connect_as(5, "web", "d", 0, false).is_ok());
    assert_eq!(h.broker.metrics().connections_refused, 1);
}

#[test]
fn a_version_1_snapshot_with_whole_dedup_ids_still_loads_and_still_deduplicates() {
    let id = Uuid::now_v7();
    let mut v1 = Vec::new();
    v1.extend_from_slice(b"CRSN");
    v1.extend_from_slice(&1u32.to_be_bytes()); // version 1
    v1.extend_from_slice(&0u32.to_be_bytes()); // no services
    v1.extend_from_slice(&1u32.to_be_bytes()); // one dedup id …
    v1.extend_from_slice(&16u32.to_be_bytes());
    v1.extend_from_slice(id.as_bytes());
    v1.extend_from_slice(&(1_000 * MS).to_be_bytes()); // … remembered at 1 s
    v1.extend_from_slice(&0u32.to_be_bytes()); // no reply routes
    let mut h = Harness::new();
    h.broker
        .restore_snapshot(Bytes::from(v1))
        .expect("a version 1 snapshot loads");
    h.connect(1, "sender", 10);
    let mut m = Message::new(Kind::Event, "thing.happened", "x");
    m.id = id;
    h.send(1, 1, m);
    assert_eq!(h.broker.metrics().duplicates, 1, "the old id still counts");
}

#[test]
fn a_version_2_snapshot_with_timed_fingerprints_still_loads_and_still_deduplicates() {
    let id = Uuid::now_v7();
    let mut v2 = Vec::new();
    v2.extend_from_slice(b"CRSN");
    v2.extend_from_slice(&2u32.to_be_bytes()); // version 2
    v2.extend_from_slice(&0u32.to_be_bytes()); // no services
    v2.extend_from_slice(&1u32.to_be_bytes()); // one dedup fingerprint …
    v2.extend_from_slice(&crate::dedup::fingerprint(&id).to_be_bytes());
    v2.extend_from_slice(&(1_000 * MS).to_be_bytes()); // … remembered at 1 s
    v2.extend_from_slice(&0u32.to_be_bytes()); // no reply routes
    let mut h = Harness::new();
    h.broker
        .restore_snapshot(Bytes::from(v2))
        .expect("a version 2 snapshot loads");
    h.connect(1, "sender", 10);
    let mut m = Message::new(Kind::Event, "thing.happened", "x");
    m.id = id;
    h.send(1, 1, m);
    assert_eq!(h.broker.metrics().duplicates, 1, "the old id still counts");
}

#[test]
fn cached_routes_follow_every_subscription_change() {
    let mut h = Harness::new();
    h.connect(1, "sender", 100);
    h.connect(2, "audit", 100);
    h.connect(3, "billing", 100);
    h.subscribe(2, "order.placed");
    let receivers = |h: &mut Harness| -> Vec<ConnId> {
        let mut conns: Vec<ConnId> = h.deliveries().into_iter().map(|d| d.0).collect();
        conns.sort_unstable();
        conns
    };
    h.send(1, 1, Message::new(Kind::Event, "order.placed", "1"));
    assert_eq!(receivers(&mut h), vec![2]);
    h.subscribe(3, "order.*");
    h.send(1, 2, Message::new(Kind::Event, "order.placed", "2"));
    assert_eq!(
        receivers(&mut h),
        vec![2, 3],
        "a new subscriber is routed to"
    );
    h.broker.unsubscribe(2, 7, "order.placed");
    h.send(1, 3, Message::new(Kind::Event, "order.placed", "3"));
    assert_eq!(receivers(&mut h), vec![3], "an unsubscribed service is not");
}

#[test]
fn transient_messages_for_a_paused_receiver_are_dropped_and_counted_apart() {
    let mut h = Harness::new();
    h.connect(1, "sender", 100);
    h.connect(2, "ticker", 100);
    h.subscribe(2, "tick");
    h.actions();
    let mut tick = Message::new(Kind::Event, "tick", "1");
    tick.transient = true;
    h.broker.set_paused(2, true, h.now);
    h.send(1, 1, tick.clone());
    assert!(
        h.deliveries().is_empty(),
        "nothing goes to a paused receiver"
    );
    assert_eq!(h.broker.metrics().transient_dropped_paused, 1);
    assert_eq!(h.broker.metrics().dropped_unrouted, 0);
    h.broker.set_paused(2, false, h.now);
    tick.id = Uuid::now_v7();
    h.send(1, 2, tick);
    assert_eq!(h.deliveries().len(), 1, "delivered again once resumed");
    assert_eq!(h.broker.metrics().transient_dropped_paused, 1);
}

#[test]
fn send_bucket_refills_exactly_at_its_rate_up_to_one_second() {
    const MS: Nanos = 1_000_000;
    let start = 5_000 * MS;
    let bucket = SendBucket::new(10);
    // Full at first: a second's worth at once, then nothing.
    assert_eq!((0..12).filter(|_| bucket.take(10, start)).count(), 10);
    // 10/s: a token each 100 ms, not before.
    assert!(!bucket.take(10, start + 99 * MS));
    assert!(bucket.take(10, start + 100 * MS));
    assert!(!bucket.take(10, start + 150 * MS));
    assert!(bucket.take(10, start + 200 * MS));
    // A long pause refills one second's worth, no more (and no overflow).
    let later = start + 3_600_000 * MS;
    assert_eq!((0..12).filter(|_| bucket.take(10, later)).count(), 10);
    // The highest rate fits: a full second of it, then a token per ns.
    let fastest = SendBucket::new(u32::MAX);
    assert!(fastest.take(u32::MAX, u64::MAX));
    assert!(fastest.take(u32::MAX, 0));
}

// ---- pausing subscriptions ----------------------------------------------

fn gauges_of(h: &mut Harness<impl MessageStore>, service: &str) -> SubscriptionGauges {
    let now = h.now;
    h.broker
        .subscription_gauges(now)
        .into_iter()
        .find(|g| g.service == service)
        .expect("the service's gauges")
}

fn payloads(deliveries: &[(ConnId, DeliveryId, u32, String, Bytes)]) -> Vec<Bytes> {
    deliveries.iter().map(|d| d.4.clone()).collect()
}

#[test]
fn a_paused_subscription_gets_no_deliveries_and_its_backlog_grows_until_resumed() {
    let mut h = Harness::new();
    h.connect(1, "web", 0);
    h.connect(2, "audit", 0);
    h.subscribe(2, "todo.*");
    h.actions();
    assert_eq!(
        h.broker.pause_subscription("audit", Some("todo.*"), h.now),
        Ok(vec!["todo.*".to_string()])
    );
    for payload in ["1", "2", "3"] {
        h.send(1, 0, event("todo.created", payload));
    }
    h.advance(60_000);
    assert!(h.deliveries().is_empty(), "nothing goes out while paused");
    let g = gauges_of(&mut h, "audit");
    assert_eq!(
        (g.backlog, g.paused.clone()),
        (3, vec!["todo.*".to_string()])
    );
    assert_eq!(h.broker.services()[0].paused, vec!["todo.*".to_string()]);
    // Pausing again changes nothing; resuming delivers what waited, in order.
    assert!(h.broker.pause_subscription("audit", None, h.now).is_ok());
    assert_eq!(
        h.broker.resume_subscription("audit", None, h.now),
        Ok(vec!["todo.*".to_string()])
    );
    let d = h.deliveries();
    assert_eq!(
        payloads(&d),
        vec![
            Bytes::from_static(b"1"),
            Bytes::from_static(b"2"),
            Bytes::from_static(b"3")
        ]
    );
    assert!(gauges_of(&mut h, "audit").paused.is_empty());
}

#[test]
fn pausing_one_pattern_holds_only_what_no_other_subscription_takes() {
    let mut h = Harness::new();
    h.connect(1, "web", 0);
    h.connect(2, "audit", 0);
    h.subscribe(2, "todo.*");
    h.subscribe(2, "user.*");
    h.actions();
    h.broker
        .pause_subscription("audit", Some("todo.*"), h.now)
        .expect("paused");
    h.send(1, 0, event("todo.created", "held"));
    h.send(1, 1, event("user.joined", "flows"));
    assert_eq!(
        payloads(&h.deliveries()),
        vec![Bytes::from_static(b"flows")]
    );
    // A transient message for the paused subscription is not kept for it.
    let mut tick = event("todo.ticked", "gone");
    tick.transient = true;
    h.send(1, 2, tick);
    assert!(h.deliveries().is_empty());
    assert_eq!(h.broker.metrics().transient_dropped_paused, 1);
    h.broker
        .resume_subscription("audit", Some("todo.*"), h.now)
        .expect("resumed");
    assert_eq!(payloads(&h.deliveries()), vec![Bytes::from_static(b"held")]);
}

#[test]
fn pausing_what_is_not_subscribed_is_refused_with_what_is() {
    let mut h = Harness::new();
    h.connect(2, "audit", 0);
    h.subscribe(2, "todo.*");
    assert_eq!(
        h.broker.pause_subscription("nobody", None, h.now),
        Err(PauseError::UnknownService("nobody".into()))
    );
    let refused = h
        .broker
        .pause_subscription("audit", Some("user.*"), h.now)
        .expect_err("not subscribed");
    assert!(
        refused.to_string().contains("its subscriptions: todo.*"),
        "{refused}"
    );
    // Unsubscribing forgets the pause: a new subscription starts flowing.
    h.broker
        .pause_subscription("audit", None, h.now)
        .expect("paused");
    h.broker.unsubscribe(2, 1, "todo.*");
    h.subscribe(2, "todo.*");
    assert!(gauges_of(&mut h, "audit").paused.is_empty());
}

#[test]
fn the_pause_command_answers_with_the_paused_patterns() {
    let mut h = Harness::new();
    h.connect(1, "ops", 0);
    h.connect(2, "audit", 0);
    h.subscribe(2, "todo.*");
    h.actions();
    let pause = command(
        "courier.subscriptions.pause",
        r#"{"service":"audit","pattern":"todo.*"}"#,
    );
    h.send(1, 1, pause);
    let actions = h.actions();
    assert_eq!(refusal(&actions, 1).0, ErrorCode::Ok);
    let reply = actions
        .iter()
        .find_map(|a| match a {
            Action::Deliver {
                conn: 1, message, ..
            } => Some(message.clone()),
            _ => None,
        })
        .expect("a reply");
    assert_eq!(reply.name, "courier.subscriptions.paused");
    let body: serde_json::Value = serde_json::from_slice(&reply.payload).expect("JSON");
    assert_eq!(body["paused"], serde_json::json!(["todo.*"]));
    let wrong = command(
        "courier.subscriptions.resume",
        r#"{"service":"audit","pattern":"user.*"}"#,
    );
    h.send(1, 2, wrong);
    let (code, reason) = refusal(&h.actions(), 2);
    assert_eq!(code, ErrorCode::InvalidMessage);
    assert!(reason.contains("not subscribed to user.*"), "{reason}");
}

#[test]
fn a_pause_survives_a_restart_from_the_journal_and_from_a_snapshot() {
    for with_snapshot in [false, true] {
        let mut h = Harness::with_store(MemoryLog::new());
        h.connect(1, "web", 0);
        h.connect(2, "audit", 0);
        h.subscribe(2, "todo.*");
        h.subscribe(2, "user.*");
        h.actions();
        h.broker
            .pause_subscription("audit", Some("todo.*"), h.now)
            .expect("paused");
        // Paused and resumed again: the journal's last word counts.
        h.broker
            .pause_subscription("audit", Some("user.*"), h.now)
            .expect("paused");
        h.broker
            .resume_subscription("audit", Some("user.*"), h.now)
            .expect("resumed");
        h.send(1, 0, event("todo.created", "waited"));
        h.actions();
        if with_snapshot {
            h.advance(10);
            h.broker.checkpoint(h.now).expect("checkpoint");
        }
        let report = h.crash_and_recover();
        assert_eq!(report.snapshot_covers.is_some(), with_snapshot);
        h.connect(3, "audit", 0);
        h.subscribe(3, "todo.*");
        h.subscribe(3, "user.*");
        assert!(h.deliveries().is_empty(), "still paused after the restart");
        let g = gauges_of(&mut h, "audit");
        assert_eq!((g.backlog, g.paused), (1, vec!["todo.*".to_string()]));
        h.broker
            .resume_subscription("audit", Some("todo.*"), h.now)
            .expect("resumed");
        assert_eq!(
            payloads(&h.deliveries()),
            vec![Bytes::from_static(b"waited")]
        );
        // The resume is journaled too.
        h.crash_and_recover();
        assert!(gauges_of(&mut h, "audit").paused.is_empty());
    }
}

// ---- the frame limit ------------------------------------------------------

const FRAME_LIMIT: u32 = 2_000;

fn harness_with_frame_limit() -> Harness {
    let config = Config {
        frame_bytes_max: FRAME_LIMIT,
        ..Config::default()
    };
    Harness {
        broker: Broker::new(config, MemoryStore::new()),
        now: 1_000 * MS,
    }
}

/// A message from a service named `sender_len` bytes long whose DELIVER
/// frame is `len` bytes: the broker adds the sender to what was sent.
fn delivered_as(mut m: Message, sender_len: usize, len: usize) -> Message {
    let fixed = courier_proto::delivery_frame_len(&m) + sender_len;
    m.payload = Bytes::from(vec![b'x'; len - fixed]);
    m
}

/// Every delivery's DELIVER frame, encoded as the server does, must fit.
fn delivered_frame_lengths(actions: &[Action]) -> Vec<usize> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Deliver {
                delivery,
                attempt,
                message,
                ..
            } => {
                let mut w = courier_proto::FrameWriter::with_frame_bytes_max(FRAME_LIMIT);
                w.push_delivery(*delivery, *attempt, message)
                    .expect("within the frame limit");
                Some(w.take().len() - 4)
            }
            _ => None,
        })
        .collect()
}

#[test]
fn a_message_is_accepted_if_its_delivery_fits_the_frame_limit_exactly_and_refused_one_byte_over() {
    let mut h = harness_with_frame_limit();
    let long_name = "s".repeat(200);
    h.connect(1, &long_name, 0);
    h.connect(2, "recv", 0);
    h.subscribe(2, "big.*");
    for (seq, kind, name) in [(1, Kind::Command, "big.cmd"), (2, Kind::Event, "big.event")] {
        let fits = delivered_as(Message::new(kind, name, ""), 200, FRAME_LIMIT as usize);
        let over = delivered_as(Message::new(kind, name, ""), 200, FRAME_LIMIT as usize + 1);
        h.send(1, seq, fits);
        h.send(1, seq + 10, over);
        let actions = h.actions();
        assert_eq!(
            delivered_frame_lengths(&actions),
            vec![FRAME_LIMIT as usize],
            "{name}: the largest accepted message is delivered in a frame of exactly the limit"
        );
        assert_eq!(results(&actions)[0], (seq, ErrorCode::Ok));
        let (code, reason) = refusal(&actions, seq + 10);
        assert_eq!(code, ErrorCode::PayloadTooLarge);
        assert!(
            reason.contains("2001 bytes, 1 byte(s) over the broker's frame limit of 2000")
                && reason.contains("the sender (200 bytes"),
            "{reason}"
        );
    }
    // A reply, from the long name to the receiver's request.
    h.subscribe(1, "big.ask");
    let ask = command("big.ask", "");
    let ask_id = ask.id;
    h.send(2, 30, ask);
    h.deliveries();
    for (seq, len) in [(31, FRAME_LIMIT as usize + 1), (32, FRAME_LIMIT as usize)] {
        let mut reply = Message::new(Kind::Reply, "big.answer", "");
        reply.response_to = Some(ask_id);
        h.send(1, seq, delivered_as(reply, 200, len));
    }
    let actions = h.actions();
    assert_eq!(refusal(&actions, 31).0, ErrorCode::PayloadTooLarge);
    assert_eq!(
        delivered_frame_lengths(&actions),
        vec![FRAME_LIMIT as usize],
        "the refused reply did not end the stream: the one that fits is delivered"
    );
}

#[test]
fn a_stored_message_too_large_for_a_lowered_limit_is_dead_lettered_not_sent() {
    let mut h = harness_with_frame_limit();
    h.connect(1, "web", 0);
    h.connect(2, "recv", 0);
    h.subscribe(2, "big.event");
    h.broker.disconnect(2, h.now);
    h.send(
        1,
        1,
        delivered_as(event("big.event", ""), 3, FRAME_LIMIT as usize),
    );
    assert_eq!(results(&h.actions()), vec![(1, ErrorCode::Ok)]);
    h.broker.config.frame_bytes_max = FRAME_LIMIT - 1;
    h.connect(3, "recv", 0);
    h.subscribe(3, "big.event");
    assert!(h.deliveries().is_empty(), "nothing above the limit is sent");
    let letters = h.broker.dead_letters("recv");
    assert_eq!(letters.len(), 1);
    assert!(
        letters[0]
            .0
            .reason
            .contains("over the broker's frame limit of 1999"),
        "{}",
        letters[0].0.reason
    );
    assert!(h
        .broker
        .take_alerts()
        .iter()
        .any(|a| a.contains("dead-lettered")));
}

#[test]
fn broker_answers_fit_the_frame_limit_however_large_the_dead_letters() {
    let mut h = harness_with_frame_limit();
    h.connect(1, "web", 0);
    h.connect(2, "recv", 0);
    h.broker
        .subscribe(2, 0, "big.event", 0, 1, StartFrom::New, h.now);
    // A payload of control characters is six bytes each as JSON.
    let mut m = event("big.event", "");
    m.payload = Bytes::from(vec![1u8; 1_500]);
    h.send(1, 1, m);
    for _ in 0..40 {
        h.send(1, 2, event("big.event", "small"));
    }
    for (_, delivery, ..) in h.deliveries() {
        h.broker.nack(2, delivery, 0, h.now);
    }
    let letters = h.broker.dead_letters("recv");
    assert_eq!(letters.len(), 41);
    let big = letters[0].0.seq;
    let ask = |h: &mut Harness, name: &str, args: serde_json::Value| {
        h.send(1, 9, Message::new(Kind::Command, name, args.to_string()));
        let actions = h.actions();
        assert_eq!(delivered_frame_lengths(&actions).len(), 1, "{actions:?}");
        actions
            .into_iter()
            .find_map(|a| match a {
                Action::Deliver { message, .. } => {
                    serde_json::from_slice::<serde_json::Value>(&message.payload).ok()
                }
                _ => None,
            })
            .expect("a JSON answer")
    };
    let shown = ask(
        &mut h,
        "courier.dead-letters.show",
        serde_json::json!({"service": "recv", "id": big}),
    );
    assert_eq!(shown["payload"], serde_json::Value::Null);
    assert!(shown["payload_omitted"].is_string(), "{shown}");
    let listing = ask(
        &mut h,
        "courier.dead-letters.list",
        serde_json::json!({"service": "recv"}),
    );
    let items = listing.as_array().expect("a list");
    let note = items.last().expect("a note");
    assert_eq!(note["truncated"], true, "{listing}");
    assert_eq!(note["total"], 41);
    let shown = note["shown"].as_u64().expect("shown") as usize;
    let rest = ask(
        &mut h,
        "courier.dead-letters.list",
        serde_json::json!({"service": "recv", "after": note["rest_after"]}),
    );
    let rest_ids: Vec<u64> = rest
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|l| l["id"].as_u64())
        .collect();
    assert_eq!(
        rest_ids.first().copied(),
        letters.get(shown).map(|l| l.0.seq),
        "the next page starts after the last one shown"
    );
}

// ---- flow-controlled reply streams ---------------------------------------

/// A `file.copy` command whose replies are a stream with `window` credit.
fn stream_command(window: &str) -> Message {
    let mut m = command("file.copy", "{}");
    m.headers
        .push((REPLY_WINDOW_HEADER.to_string(), window.to_string()));
    m
}

fn reply_to(command: Uuid, payload: &str, is_final: bool) -> Message {
    let mut r = Message::new(Kind::Reply, "file.copy.progress", payload.to_string());
    r.response_to = Some(command);
    r.is_final = is_final;
    r
}

/// Requester `web` on conn 5 (and another instance on 1), responder
/// `file` on conn 2; the command is sent and delivered to conn 2.
fn streaming(window: &str) -> (Harness, Uuid) {
    let mut h = Harness::new();
    h.connect(1, "web", 0);
    h.connect(5, "web", 0);
    h.connect(2, "file", 0);
    h.subscribe(2, "file.copy");
    let cmd = stream_command(window);
    let id = cmd.id;
    h.send(5, 1, cmd);
    let actions = h.actions();
    assert_eq!(results(&actions), vec![(1, ErrorCode::Ok)]);
    assert_eq!(delivered_to(&actions), vec![(2, "{}".to_string())]);
    (h, id)
}

/// (conn, payload) of each delivery.
fn delivered_to(actions: &[Action]) -> Vec<(ConnId, String)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Deliver { conn, message, .. } => Some((
                *conn,
                String::from_utf8_lossy(&message.payload).into_owned(),
            )),
            _ => None,
        })
        .collect()
}

fn delivery_ids(actions: &[Action], to: ConnId) -> Vec<DeliveryId> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Deliver { conn, delivery, .. } if *conn == to => Some(*delivery),
            _ => None,
        })
        .collect()
}

#[test]
fn replies_beyond_the_window_wait_and_credit_releases_them_in_order() {
    let (mut h, id) = streaming("2");
    for (seq, payload) in [(10, "r1"), (11, "r2"), (12, "r3"), (13, "r4")] {
        h.send(2, seq, reply_to(id, payload, false));
    }
    // A fifth while two are unread and two wait: refused, not dropped.
    h.send(2, 14, reply_to(id, "r5", false));
    h.broker.ping(2, 99);
    let actions = h.actions();
    assert_eq!(
        delivered_to(&actions),
        vec![(5, "r1".into()), (5, "r2".into())],
        "the window: two replies out, unacked"
    );
    assert_eq!(
        results(&actions),
        vec![
            (10, ErrorCode::Ok),
            (11, ErrorCode::Ok),
            (14, ErrorCode::StreamFull)
        ],
        "held replies are answered when they go out"
    );
    let (_, reason) = refusal(&actions, 14);
    assert!(
        reason.contains("wait for the answer to an earlier reply"),
        "{reason}"
    );
    assert!(
        actions
            .iter()
            .any(|a| matches!(a, Action::Pong { conn: 2, nonce: 99 })),
        "a PONG does not wait for held replies"
    );
    let first = delivery_ids(&actions, 5);
    // Credit back, one reply at a time, oldest first.
    h.broker.ack(5, first[0], h.now);
    let actions = h.actions();
    assert_eq!(delivered_to(&actions), vec![(5, "r3".into())]);
    assert_eq!(results(&actions), vec![(12, ErrorCode::Ok)]);
    let third = delivery_ids(&actions, 5);
    h.send(2, 15, reply_to(id, "r5", false));
    assert!(h.actions().is_empty(), "r5 waits behind r4");
    h.broker.ack(5, first[1], h.now);
    let actions = h.actions();
    assert_eq!(delivered_to(&actions), vec![(5, "r4".into())]);
    assert_eq!(results(&actions), vec![(13, ErrorCode::Ok)]);
    let r4 = delivery_ids(&actions, 5);
    h.broker.ack(5, third[0], h.now);
    let actions = h.actions();
    assert_eq!(delivered_to(&actions), vec![(5, "r5".into())]);
    assert_eq!(results(&actions), vec![(15, ErrorCode::Ok)]);
    h.send(2, 16, reply_to(id, "done", true));
    assert!(h.actions().is_empty(), "the final waits for credit too");
    h.broker.ack(5, r4[0], h.now);
    let actions = h.actions();
    assert_eq!(delivered_to(&actions), vec![(5, "done".into())]);
    assert_eq!(results(&actions), vec![(16, ErrorCode::Ok)]);
    h.send(2, 17, reply_to(id, "late", true));
    assert_eq!(
        results(&h.actions()),
        vec![(17, ErrorCode::UnknownRequest)],
        "the stream ended with its final reply"
    );
    assert_eq!(h.broker.held_reply_bytes, 0);
    assert!(h.broker.reply_deliveries.is_empty());
}

#[test]
fn a_reply_sent_again_while_held_waits_once_and_answers_both_sends() {
    let (mut h, id) = streaming("1");
    h.send(2, 10, reply_to(id, "r1", false));
    let r2 = reply_to(id, "r2", false);
    h.send(2, 11, r2.clone());
    let first = delivery_ids(&h.actions(), 5);
    // The responder reconnected: its new connection sends r2 again.
    h.connect(3, "file", 0);
    h.subscribe(3, "file.copy");
    h.broker.disconnect(2, h.now);
    h.actions();
    h.send(3, 7, r2.clone());
    assert!(results(&h.actions()).is_empty(), "still waiting for credit");
    h.broker.ack(5, first[0], h.now);
    let actions = h.actions();
    assert_eq!(
        delivered_to(&actions),
        vec![(5, "r2".into())],
        "delivered once"
    );
    for (conn, seq) in [(3, 7), (2, 11)] {
        assert!(
            actions.iter().any(|a| matches!(
                a,
                Action::SendResult { conn: c, seq: s, code: ErrorCode::Ok, .. } if *c == conn && *s == seq
            )),
            "send {seq} on {conn} is answered: {actions:?}"
        );
    }
    h.send(3, 8, r2);
    let actions = h.actions();
    assert!(actions.iter().any(|a| matches!(
        a,
        Action::SendResult { seq: 8, code: ErrorCode::Ok, reason, .. } if reason == "duplicate"
    )));
    assert!(delivered_to(&actions).is_empty());
}

#[test]
fn the_requester_disconnecting_ends_its_stream_and_every_responder_hears_it() {
    let (mut h, id) = streaming("1");
    h.send(2, 10, reply_to(id, "r1", false));
    h.send(2, 11, reply_to(id, "r2", false));
    h.actions();
    h.broker.disconnect(5, h.now);
    let actions = h.actions();
    let (code, reason) = refusal(&actions, 11);
    assert_eq!(code, ErrorCode::Ok);
    assert_eq!(reason, "discarded: the requester's connection closed");
    h.send(2, 12, reply_to(id, "r3", false));
    h.send(2, 13, reply_to(id, "done", true));
    let actions = h.actions();
    assert!(
        delivered_to(&actions).is_empty(),
        "not re-routed to the other instance (conn 1): it cannot get the stream in order"
    );
    assert_eq!(
        results(&actions),
        vec![(12, ErrorCode::Ok), (13, ErrorCode::Ok)]
    );
    h.send(2, 14, reply_to(id, "after the end", true));
    assert_eq!(results(&h.actions()), vec![(14, ErrorCode::UnknownRequest)]);
    assert_eq!(h.broker.metrics().replies_discarded, 3);
    assert_eq!(h.broker.held_reply_bytes, 0);
}

#[test]
fn a_requester_that_leaves_before_the_first_reply_gets_its_replies_routed_as_any() {
    let (mut h, id) = streaming("1");
    h.broker.disconnect(5, h.now);
    // Nothing was under way: the replies go to another instance of the
    // requesting service (conn 1), as without flow control.
    h.send(2, 10, reply_to(id, "r1", false));
    h.send(2, 11, reply_to(id, "r2", false));
    h.send(2, 12, reply_to(id, "done", true));
    let actions = h.actions();
    assert_eq!(
        delivered_to(&actions),
        vec![(1, "r1".into()), (1, "r2".into()), (1, "done".into())]
    );
    assert_eq!(
        results(&actions),
        vec![
            (10, ErrorCode::Ok),
            (11, ErrorCode::Ok),
            (12, ErrorCode::Ok)
        ]
    );
}

#[test]
fn a_nack_of_a_reply_stops_the_stream() {
    let (mut h, id) = streaming("1");
    h.send(2, 10, reply_to(id, "r1", false));
    h.send(2, 11, reply_to(id, "r2", false));
    let first = delivery_ids(&h.actions(), 5);
    h.broker.nack(1, first[0], 0, h.now);
    assert!(
        h.actions().is_empty(),
        "only the requesting connection may stop its stream"
    );
    h.broker.nack(5, first[0], 0, h.now);
    let (code, reason) = refusal(&h.actions(), 11);
    assert_eq!(
        (code, reason.as_str()),
        (
            ErrorCode::Ok,
            "discarded: the requester stopped reading the stream"
        )
    );
    h.send(2, 12, reply_to(id, "done", true));
    let actions = h.actions();
    assert!(delivered_to(&actions).is_empty());
    assert_eq!(results(&actions), vec![(12, ErrorCode::Ok)]);
}

#[test]
fn held_replies_are_refused_when_the_reply_route_expires() {
    let (mut h, id) = streaming("1");
    h.send(2, 10, reply_to(id, "r1", false));
    h.send(2, 11, reply_to(id, "r2", false));
    h.actions();
    h.advance(Config::default().reply_route_ms + 1);
    let actions = h.actions();
    let (code, reason) = refusal(&actions, 11);
    assert_eq!(code, ErrorCode::UnknownRequest);
    assert!(
        reason.contains("reply route expired after 600000 ms"),
        "{reason}"
    );
    assert_eq!(h.broker.held_reply_bytes, 0);
    assert!(h.broker.reply_deliveries.is_empty());
}

#[test]
fn a_handler_that_keeps_replying_keeps_its_delivery() {
    let (mut h, id) = streaming("1");
    // The ack deadline is 30 s; the handler replies every 20 s, paced by
    // the requester, for a minute.
    let mut last = None;
    for i in 0..3 {
        h.advance(20_000);
        if let Some(d) = last {
            h.broker.ack(5, d, h.now);
        }
        h.send(2, 10 + i, reply_to(id, "tick", false));
        let actions = h.actions();
        assert!(
            !delivered_to(&actions).iter().any(|(conn, _)| *conn == 2),
            "the command was not taken back at {} s",
            20 * (i + 1)
        );
        last = delivery_ids(&actions, 5).first().copied().or(last);
    }
    h.advance(31_000);
    assert_eq!(
        delivered_to(&h.actions()),
        vec![(2, "{}".into())],
        "silent for longer than the deadline: redelivered"
    );
}

#[test]
fn a_bad_reply_window_is_refused_with_what_is_allowed() {
    let mut h = Harness::new();
    h.connect(1, "web", 0);
    h.connect(2, "file", 0);
    h.subscribe(2, "file.copy");
    for (seq, window) in [(1, "0"), (2, "65537"), (3, "ten"), (4, "+5"), (5, "")] {
        h.send(1, seq, stream_command(window));
        let (code, reason) = refusal(&h.actions(), seq);
        assert_eq!(code, ErrorCode::InvalidMessage, "{window:?}");
        assert!(reason.contains("from 1 to 65536"), "{reason}");
    }
    h.send(1, 6, stream_command("65536"));
    assert_eq!(results(&h.actions()), vec![(6, ErrorCode::Ok)]);
}

#[test]
fn held_replies_are_bounded_in_bytes_across_streams() {
    let mut h = Harness::with_store(MemoryStore::new());
    h.broker.config.held_reply_bytes_max = 400;
    h.connect(5, "web", 0);
    h.connect(2, "file", 0);
    h.subscribe(2, "file.copy");
    let cmd = stream_command("100");
    let id = cmd.id;
    h.send(5, 1, cmd);
    h.actions();
    let mut refused = 0;
    for seq in 0..300 {
        h.send(2, 10 + seq, reply_to(id, "0123456789", false));
        for (_, code) in results(&h.actions()) {
            refused += usize::from(code == ErrorCode::StreamFull);
        }
    }
    assert!(h.broker.held_reply_bytes <= 400);
    assert_eq!(
        refused,
        300 - 100 - h.broker.metrics().replies_held as usize
    );
    assert!(h.broker.metrics().replies_held > 0);
}

// ---- reply streams: state-machine property test -------------------------

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

// ---- service registry ---------------------------------------------------

fn registry_spec(id: &str, check: crate::registry::Check) -> crate::registry::InstanceSpec {
    crate::registry::InstanceSpec {
        service: "db".into(),
        id: id.into(),
        address: "127.0.0.1:5432".into(),
        meta: Default::default(),
        check,
        interval_ms: 1000,
        flap_threshold: 1,
        deregister_after_ms: 0,
        on_bus: false,
    }
}

#[test]
fn the_registry_survives_a_restart_from_the_journal_and_from_a_snapshot() {
    use crate::registry::{Check, Health};
    let mut h = Harness::with_store(MemoryLog::new());
    h.connect(1, "web", 0);
    let tcp = Check::Tcp {
        address: "127.0.0.1:5432".into(),
        timeout_ms: 500,
    };
    h.broker
        .registry_register(registry_spec("db-1", tcp.clone()), h.now)
        .expect("registers");
    h.broker
        .registry_register(registry_spec("db-2", tcp), h.now)
        .expect("registers");
    h.broker
        .registry_check_result("db", "db-1", Health::Passing, String::new(), h.now);
    h.broker
        .registry_deregister("db", "db-2")
        .expect("deregisters");
    assert_eq!(h.broker.registry().instances("web", true).len(), 1);
    h.actions();
    let healthy = |h: &Harness<MemoryLog>| -> Vec<String> {
        h.broker
            .registry()
            .instances("db", false)
            .iter()
            .map(|i| i.spec.id.clone())
            .collect()
    };
    let index = h.broker.registry().index();

    h.crash_and_recover();
    assert_eq!(healthy(&h), vec!["db-1".to_string()], "from the journal");
    assert!(
        h.broker.registry().instances("web", true).is_empty(),
        "bus instances leave with their connection"
    );
    // Bus connections are not journaled, so the index may restart lower:
    // watchers holding a larger one are answered at once.
    assert!(h.broker.registry().index() > 0 && index > 0);

    h.broker.checkpoint(h.now).expect("checkpoint");
    let report = h.crash_and_recover();
    assert!(report.snapshot_covers.is_some(), "{report:?}");
    assert_eq!(healthy(&h), vec!["db-1".to_string()], "from the snapshot");
    assert_eq!(report.bad_journal_entries, 0);
}

#[test]
fn due_checks_are_handed_to_the_edge_on_tick() {
    let mut h = Harness::with_store(MemoryLog::new());
    let http = crate::registry::Check::Http {
        url: "http://127.0.0.1:1/health".into(),
        timeout_ms: 100,
    };
    h.broker
        .registry_register(registry_spec("db-1", http), h.now)
        .expect("registers");
    h.broker.tick(h.now);
    let checks = h.broker.take_registry_checks();
    assert_eq!(checks.len(), 1);
    assert_eq!(checks[0].1, "db-1");
    h.broker.tick(h.now);
    assert!(
        h.broker.take_registry_checks().is_empty(),
        "not due again yet"
    );
    assert_eq!(h.broker.next_timer(), Some(h.now + 1_000_000_000));
}

#[test]
fn an_instance_whose_check_is_critical_gets_no_new_work_until_it_recovers() {
    use crate::registry::{Check, Health};
    let mut h = Harness::with_store(MemoryStore::new());
    h.connect(1, "web", 0);
    h.connect(2, "worker", 0);
    h.subscribe(2, "job.run");
    let mut spec = registry_spec("worker-2", Check::Ttl { ttl_ms: 60_000 });
    spec.service = "worker".into();
    h.broker.registry_register(spec, h.now).expect("registers");
    h.broker
        .registry_check_result("worker", "worker-2", Health::Critical, String::new(), h.now);
    assert!(!h.broker.registry().is_routable("worker", "worker-2"));
    h.send(1, 1, command("job.run", "held"));
    assert!(h.deliveries().is_empty(), "nothing for a critical instance");
    h.broker
        .registry_heartbeat("worker", "worker-2", h.now)
        .expect("heartbeat");
    let d = h.deliveries();
    assert_eq!(d.len(), 1, "delivered once it passes again");
    assert_eq!(d[0].0, 2);
}

#[test]
fn a_keyed_backlog_drains_through_two_pipelined_instances() {
    let mut h = Harness::new();
    h.connect(1, "web", 0);
    h.subscribe(1, "ledger.entry");
    h.broker.disconnect(1, h.now);
    h.connect(9, "bank", 0);
    let mut sent = 0u64;
    for index in 0..10 {
        for key in 0..1000 {
            let mut m = event("ledger.entry", "x");
            m.key = Some(Bytes::from(format!("{key}")));
            m.payload = Bytes::from(format!("{index}"));
            sent += 1;
            h.send(9, sent, m);
        }
    }
    h.actions();
    for conn in [2, 3] {
        h.broker.connect(conn, "web", &format!("web-{conn}"), 1024);
        h.broker.set_pipelined_keys(conn, true);
        h.subscribe(conn, "ledger.entry");
    }
    let mut acked = 0;
    for _ in 0..100 {
        let d = h.deliveries();
        if d.is_empty() {
            break;
        }
        for (conn, delivery, ..) in d {
            h.broker.ack(conn, delivery, h.now);
            acked += 1;
        }
    }
    assert_eq!(acked, 10_000);
}
