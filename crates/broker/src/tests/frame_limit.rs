//! The frame limit: deliveries larger than a receiver takes.

use super::*;

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
