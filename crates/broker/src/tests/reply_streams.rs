//! Flow-controlled reply streams.

use super::*;

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
