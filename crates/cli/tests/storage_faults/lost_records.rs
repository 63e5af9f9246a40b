//! Records the snapshot covers cut from the log: their seqs are never lent out again.

use super::*;

fn event(payload: &str) -> Message {
    Message::new(Kind::Event, "job.done", payload.to_string())
}

/// Events acked in part by one service, waiting for another (offline),
/// a checkpoint whose snapshot covers them all, then the segment cut
/// inside the records: the lost events become dead letters of both
/// services (unreadable), the acked ones never come back, the survivors
/// are delivered, and new events get new seqs — their deliveries, acks
/// and dedup entries are theirs alone, also across a crash.
#[test]
fn lost_records_never_lend_their_seqs_to_backlog_acks_or_dedup() {
    let disk = Disk::new(0x10_57);
    let (mut node, _) = disk.start(START);
    node.connect(WEB, "web", 0);
    node.connect(WORK, "work", 0);
    node.connect(AUDIT, "audit", 0);
    node.subscribe(WORK, "job.>");
    node.subscribe(AUDIT, "job.>");
    node.take();
    node.broker.disconnect(AUDIT, node.now);
    let sent: Vec<Message> = (0..30).map(|i| event(&format!("e{i:02}"))).collect();
    for (i, m) in sent.iter().enumerate() {
        node.send(WEB, i as u64, m.clone());
    }
    let actions = node.take();
    assert!(results(&actions).iter().all(|r| r.1 == ErrorCode::Ok));
    let d = deliveries(&actions);
    assert_eq!(d.len(), 30);
    for (_, delivery, _, payload) in &d[..10] {
        assert!(payload < &"e10".to_string());
        node.ack(WORK, *delivery);
    }
    node.take();
    node.now += MS;
    node.broker.checkpoint(node.now).expect("checkpoint");
    let covers = node.broker.store().next_seq() - 1;
    let now = node.now;
    drop(node);

    // Cut inside the record of e20: e20 … e29 are gone.
    let segment = disk
        .config
        .dir
        .join("segments")
        .join(format!("{:020}.log", 1));
    let bytes = std::fs::read(&segment).expect("read segment");
    let at = bytes
        .windows(3)
        .position(|w| w == b"e20")
        .expect("e20 in the segment");
    std::fs::write(&segment, &bytes[..at]).expect("cut");

    let (mut node, damage) = disk.start(now);
    assert!(
        matches!(&damage[..], [Damage::DurableRecordsLost { seqs, .. }] if seqs.end == covers + 1),
        "{damage:?}"
    );
    assert_eq!(
        node.broker.metrics().messages_lost,
        20,
        "10 each for work and audit"
    );
    for service in ["work", "audit"] {
        let letters = node.broker.dead_letters(service);
        assert_eq!(letters.len(), 10, "{service}");
        for (letter, message) in &letters {
            assert!(letter.seq <= covers && message.is_none(), "{letter:?}");
            assert!(letter.reason.contains("record lost"), "{letter:?}");
        }
    }
    assert!(
        node.broker.store().next_seq() > covers,
        "no covered seq is issued again"
    );
    node.connect(WORK, "work", 0);
    node.subscribe(WORK, "job.>");
    node.connect(WEB, "web", 0);
    let actions = node.take();
    let got = sorted(payloads_to(&actions, WORK));
    let owed: Vec<String> = (10..20).map(|i| format!("e{i:02}")).collect();
    assert_eq!(
        got, owed,
        "the unacked survivors, and nothing acked or lost"
    );

    // New events: their own seqs, delivered as themselves and acked.
    let fresh: Vec<Message> = (0..5).map(|i| event(&format!("n{i}"))).collect();
    for (i, m) in fresh.iter().enumerate() {
        node.send(WEB, 100 + i as u64, m.clone());
    }
    // A resend of an accepted event is a duplicate, by its id.
    node.send(WEB, 200, sent[5].clone());
    let actions = node.take();
    assert!(results(&actions).iter().all(|r| r.1 == ErrorCode::Ok));
    assert_eq!(node.broker.metrics().duplicates, 1);
    let fresh_deliveries: Vec<_> = deliveries(&actions)
        .into_iter()
        .filter(|d| d.0 == WORK)
        .collect();
    assert_eq!(
        fresh_deliveries
            .iter()
            .map(|d| d.3.as_str())
            .collect::<Vec<_>>(),
        vec!["n0", "n1", "n2", "n3", "n4"]
    );
    for d in &fresh_deliveries {
        node.ack(WORK, d.1);
    }
    node.take();
    let now = node.now;

    // A crash: the acks of the new events settle them and nothing else.
    disk.crash(node);
    let (mut node, _) = disk.start(now + 1_000 * MS);
    node.connect(WORK, "work", 0);
    node.subscribe(WORK, "job.>");
    let actions = node.take();
    assert_eq!(sorted(payloads_to(&actions, WORK)), owed);
    for service in ["work", "audit"] {
        assert_eq!(node.broker.dead_letters(service).len(), 10, "{service}");
    }
    let audit = node
        .broker
        .services()
        .into_iter()
        .find(|s| s.name == "audit")
        .expect("audit");
    assert_eq!(
        audit.depth,
        20 + 5,
        "e00 … e19 and the new events wait for audit"
    );
}
