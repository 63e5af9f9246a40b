//! Recovery: restarts from the journal and from checkpoints, crashes, history replay and retention.

use super::*;

impl Harness<MemoryLog> {
    /// `kill -9` and restart: a new broker on what the log had synced.
    pub(super) fn crash_and_recover(&mut self) -> RecoveryReport {
        let log = self.broker.store().crash();
        self.broker = Broker::new(Config::default(), log);
        self.broker.recover(self.now).expect("recovers")
    }
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
