//! Pausing and resuming subscriptions.

use super::*;

fn gauges_of(h: &mut Harness<impl MessageStore>, service: &str) -> SubscriptionGauges {
    let now = h.now;
    h.broker
        .subscription_gauges(now)
        .into_iter()
        .find(|g| g.service == service)
        .expect("the service's gauges")
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
