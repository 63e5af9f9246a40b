//! Routing and delivery rules: commands, events, acks, deadlines, keys, dedup, TTL, deferral, transient messages and replies.

use super::*;

/// Where most of these rules start: `web` on connection 1 sends, and
/// `todo` on connection 2 receives `pattern`.
fn web_and_todo(pattern: &str) -> Harness {
    set_up(&[(1, "web"), (2, "todo")], &[(2, pattern)])
}

/// A broker with these instances (connection, service; no in-flight
/// limit) connected, then these subscriptions (connection, pattern) made.
fn set_up(instances: &[(ConnId, &str)], subscriptions: &[(ConnId, &str)]) -> Harness {
    let mut h = Harness::new();
    for (conn, service) in instances {
        h.connect(*conn, service, 0);
    }
    for (conn, pattern) in subscriptions {
        h.subscribe(*conn, pattern);
    }
    h
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
    let mut h = set_up(
        &[(1, "todo"), (2, "audit"), (3, "audit"), (4, "mail")],
        &[(2, "todo.*"), (3, "todo.*"), (4, "todo.>")],
    );
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
    let mut h = web_and_todo("todo.create");
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
    let mut h = web_and_todo("todo.create");
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
    let mut h = web_and_todo("todo.create");
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
    let mut h = web_and_todo("todo.create");
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
    let mut h = set_up(&[(1, "web"), (2, "todo")], &[]);
    // A max_deliveries of its own.
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
    let mut h = set_up(
        &[(1, "web"), (2, "todo"), (3, "todo")],
        &[(2, "todo.create")],
    );
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
    let mut h = set_up(
        &[(1, "web"), (2, "todo"), (3, "todo")],
        &[(2, "todo.update"), (3, "todo.update")],
    );
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
    let mut h = web_and_todo("todo.create");
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
    let mut h = web_and_todo("todo.created");
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
    let mut h = web_and_todo("todo.created");
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
    let mut h = set_up(&[(1, "web"), (2, "todo")], &[]);
    // A max_deliveries of its own.
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
    let mut h = web_and_todo("todo.create");
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
    let mut h = web_and_todo("todo.remind");
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
    let mut h = web_and_todo("todo.ping");
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
    let mut h = set_up(&[(1, "web"), (5, "web"), (2, "file")], &[(2, "file.copy")]);
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
    let mut h = set_up(
        &[(1, "web"), (5, "web"), (2, "todo")],
        &[(2, "todo.create")],
    );
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
    let mut h = set_up(&[(5, "web"), (2, "todo")], &[(2, "todo.create")]);
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
    let mut h = web_and_todo("todo.create");
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
    let mut h = web_and_todo("todo.create");
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

#[test]
fn the_next_timer_is_the_earliest_of_many_services_queues() {
    let mut h = Harness::new();
    h.connect(1, "web", 0);
    for k in 0..100u64 {
        h.connect(k + 2, &format!("svc{k:03}"), 0);
        h.subscribe(k + 2, &format!("job.{k}"));
    }
    h.actions();
    assert_eq!(h.broker.next_timer(), None);
    let start = h.now;
    for k in 0..100u64 {
        h.send(1, k, command(&format!("job.{k}"), "x"));
        h.now += MS;
    }
    let deliveries = h.deliveries();
    assert_eq!(deliveries.len(), 100);
    let deadline = |k: u64| start + k * MS + 30_000 * MS;
    assert_eq!(h.broker.next_timer(), Some(deadline(0)));
    // The earliest goes; the next service's deadline is the timer.
    h.broker.ack(deliveries[0].0, deliveries[0].1, h.now);
    assert_eq!(h.broker.next_timer(), Some(deadline(1)));
    // A later one going changes nothing.
    h.broker.ack(deliveries[50].0, deliveries[50].1, h.now);
    assert_eq!(h.broker.next_timer(), Some(deadline(1)));
    // A delay sooner than every deadline comes first.
    let mut later = command("job.7", "y");
    later.deliver_at = Some(h.now + 500 * MS);
    h.send(1, 200, later);
    assert_eq!(h.broker.next_timer(), Some(h.now + 500 * MS));
    for (conn, delivery, ..) in deliveries {
        h.broker.ack(conn, delivery, h.now);
    }
    h.advance(500);
    let redelivered = h.deliveries();
    assert_eq!(redelivered.len(), 1);
    assert_eq!(h.broker.next_timer(), Some(h.now + 30_000 * MS));
    h.broker.ack(redelivered[0].0, redelivered[0].1, h.now);
    assert_eq!(h.broker.next_timer(), None);
}
