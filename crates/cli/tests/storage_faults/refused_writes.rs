//! ENOSPC and EIO on a write or an fsync: refused, alerted, recovered.

use super::*;

/// The shape shared by ENOSPC on fsync and EIO on write: one injected
/// fault, then the disk works again.
fn one_fault_refuses_then_recovers(op: FaultOp, fault: Fault, seed: u64, says: &[&str]) {
    let disk = Disk::new(seed);
    let (mut node, damage) = disk.start(START);
    assert!(damage.is_empty(), "{damage:?}");
    busy(&mut node);

    // The disk fails under the next batch: two sends in it.
    let failures_before = node.broker.metrics().storage_failures;
    disk.fs.fail_nth(op, 1, fault);
    let refused_a = command("refused-a");
    node.send(WEB, 10, refused_a.clone());
    node.send(WEB, 11, command("refused-b"));
    let alerts_before = node.alerts.len();
    let actions = node.take();
    assert_eq!(disk.fs.pending_faults(), 0, "the injected fault fired");
    let r = results(&actions);
    assert_eq!(
        r.iter().map(|x| (x.0, x.1)).collect::<Vec<_>>(),
        vec![
            (10, ErrorCode::StorageFailed),
            (11, ErrorCode::StorageFailed)
        ],
        "refused, never acknowledged: {actions:?}"
    );
    for (_, _, reason) in &r {
        for word in says {
            assert!(reason.contains(word), "reason {reason:?} says {word:?}");
        }
    }
    let d = deliveries(&actions);
    assert!(
        !d.iter().any(|x| x.3.starts_with("refused")),
        "nothing refused is delivered: {d:?}"
    );
    // The failed batch voided work's delivery of early-2: it comes again.
    assert_eq!(
        d.iter().map(|x| (x.0, x.3.as_str())).collect::<Vec<_>>(),
        vec![(WORK, "early-2")],
        "earlier messages are still delivered: {d:?}"
    );
    let early_2 = d[0].1;
    assert_eq!(
        node.broker.metrics().storage_failures,
        failures_before + 1,
        "counted for the metrics"
    );
    let alerts = &node.alerts[alerts_before..];
    assert!(
        alerts
            .iter()
            .any(|a| a.contains("storage sync failed") && says.iter().all(|w| a.contains(w))),
        "the operator hears that the sync failed, and why: {alerts:?}"
    );

    // Earlier messages are still read and delivered: audit comes back for
    // its backlog, which holds only what was accepted.
    node.connect(AUDIT, "audit", 0);
    node.subscribe(AUDIT, "job.>");
    let actions = node.take();
    assert_eq!(
        sorted(payloads_to(&actions, AUDIT)),
        vec!["early-1", "early-2"],
        "{actions:?}"
    );

    // The disk works again: the retry of refused-a (same id) and a new
    // send are accepted and each delivered once.
    disk.fs.clear_faults();
    // The broker notices on its next tick (the server ticks every 100 ms).
    node.broker.tick(node.now);
    node.send(WEB, 12, refused_a.clone());
    node.send(WEB, 13, command("after"));
    let actions = node.take();
    assert_eq!(
        results(&actions)
            .into_iter()
            .map(|x| (x.0, x.1))
            .collect::<Vec<_>>(),
        vec![(12, ErrorCode::Ok), (13, ErrorCode::Ok)],
        "{actions:?}"
    );
    assert_eq!(
        sorted(payloads_to(&actions, WORK)),
        vec!["after", "refused-a"]
    );
    assert_eq!(
        sorted(payloads_to(&actions, AUDIT)),
        vec!["after", "refused-a"]
    );
    let mut work_held: Vec<DeliveryId> = deliveries(&actions)
        .into_iter()
        .filter(|x| x.0 == WORK)
        .map(|x| x.1)
        .collect();
    work_held.push(early_2);
    // Retried once more after it was accepted: a duplicate, not delivered.
    node.send(WEB, 14, refused_a);
    let actions = node.take();
    assert_eq!(
        results(&actions)
            .into_iter()
            .map(|x| (x.0, x.1))
            .collect::<Vec<_>>(),
        vec![(14, ErrorCode::Ok)]
    );
    assert!(deliveries(&actions).is_empty(), "{actions:?}");
    // work acks all it holds; audit acks nothing.
    for delivery in work_held {
        node.ack(WORK, delivery);
    }
    let actions = node.take();
    assert!(deliveries(&actions).is_empty(), "{actions:?}");

    // The machine crashes. Everything acknowledged was synced.
    disk.crash(node);
    let (mut node, damage) = disk.start(START + 10_000 * MS);
    assert!(damage.is_empty(), "{damage:?}");
    assert!(
        node.alerts.is_empty(),
        "a clean log recovers silently: {:?}",
        node.alerts
    );
    node.connect(WORK, "work", 0);
    node.subscribe(WORK, "job.>");
    node.connect(AUDIT, "audit", 0);
    node.subscribe(AUDIT, "job.>");
    let actions = node.take();
    assert_eq!(
        payloads_to(&actions, WORK),
        Vec::<String>::new(),
        "work acked everything durably"
    );
    assert_eq!(
        sorted(payloads_to(&actions, AUDIT)),
        vec!["after", "early-1", "early-2", "refused-a"],
        "every acknowledged message, once; refused-b, never acknowledged, is not invented"
    );
}

#[test]
fn disk_full_on_fsync_refuses_the_send_and_the_broker_recovers() {
    one_fault_refuses_then_recovers(
        FaultOp::Sync,
        Fault::NoSpace,
        1,
        &["disk is full", "free disk space", "fsync"],
    );
}

#[test]
fn io_error_on_write_refuses_the_send_and_the_broker_recovers() {
    one_fault_refuses_then_recovers(
        FaultOp::Write,
        Fault::Io,
        2,
        &["I/O", "write", "input/output error"],
    );
}

#[test]
fn io_error_on_fsync_refuses_the_send_and_the_broker_recovers() {
    one_fault_refuses_then_recovers(
        FaultOp::Sync,
        Fault::Io,
        3,
        &["I/O", "fsync", "input/output error"],
    );
}

#[test]
fn disk_full_on_write_refuses_the_send_and_the_broker_recovers() {
    one_fault_refuses_then_recovers(
        FaultOp::Write,
        Fault::NoSpace,
        4,
        &["disk is full", "free disk space", "write"],
    );
}

#[test]
fn a_disk_that_stays_full_refuses_every_send_until_space_returns() {
    let disk = Disk::new(5);
    let (mut node, _) = disk.start(START);
    busy(&mut node);
    // Every write fails with ENOSPC until space returns.
    disk.fs.fail_from(FaultOp::Write, 1, Fault::NoSpace);
    let mut refused = Vec::new();
    for i in 0..4u64 {
        let m = command(&format!("full-{i}"));
        refused.push(m.clone());
        let failures = node.broker.metrics().storage_failures;
        let alerts = node.alerts.len();
        node.send(WEB, 100 + i, m);
        let actions = node.take();
        let r = results(&actions);
        assert_eq!(r.len(), 1, "{actions:?}");
        assert_eq!((r[0].0, r[0].1), (100 + i, ErrorCode::StorageFailed));
        // The first refusal names the disk's error; later ones come from a
        // broker that knows its disk is failing and does not touch it.
        assert!(
            (r[0].2.contains("disk is full") && r[0].2.contains("free disk space"))
                || (i > 0 && r[0].2.contains("disk is failing")),
            "attempt {i}: a clear reason each time: {:?}",
            r[0].2
        );
        assert!(
            !payloads_to(&actions, WORK)
                .iter()
                .any(|p| p.starts_with("full")),
            "{actions:?}"
        );
        if i == 0 {
            assert!(node.broker.metrics().storage_failures > failures);
            assert!(
                node.alerts[alerts..]
                    .iter()
                    .any(|a| a.contains("storage sync failed") && a.contains("disk is full")),
                "attempt {i}: {:?}",
                &node.alerts[alerts..]
            );
        }
        // While the disk stays full, the periodic retry fails and changes nothing.
        node.broker.tick(node.now);
    }
    assert_eq!(disk.fs.pending_faults(), 1, "the disk is still full");

    // Reads go on while the disk is full: audit comes back and is given
    // its backlog (read from the store), nothing it was never sent.
    node.connect(AUDIT, "audit", 0);
    node.subscribe(AUDIT, "job.>");
    let actions = node.take();
    assert_eq!(
        sorted(payloads_to(&actions, AUDIT)),
        vec!["early-1", "early-2"],
        "{actions:?}"
    );

    // Space returns: the refused sends, retried with their ids, and a new
    // one are accepted and delivered once each.
    disk.fs.clear_faults();
    // The broker notices on its next tick (the server ticks every 100 ms).
    node.broker.tick(node.now);
    // Anything the broker still has to write goes first.
    node.take();
    let mut expected = Vec::new();
    for (i, m) in refused.into_iter().enumerate() {
        expected.push(text(&m.payload));
        node.send(WEB, 200 + i as u64, m);
    }
    node.send(WEB, 300, command("after"));
    expected.push("after".to_string());
    let actions = node.take();
    assert!(
        results(&actions).iter().all(|r| r.1 == ErrorCode::Ok) && results(&actions).len() == 5,
        "{actions:?}"
    );
    let mut work = payloads_to(&actions, WORK);
    work.retain(|p| p != "early-2");
    assert_eq!(sorted(work), sorted(expected.clone()), "{actions:?}");
    let mut audit = payloads_to(&actions, AUDIT);
    audit.retain(|p| !p.starts_with("early"));
    assert_eq!(sorted(audit), sorted(expected.clone()), "{actions:?}");

    // And it all survives a crash: audit acked nothing, so it gets all.
    disk.crash(node);
    let (mut node, damage) = disk.start(START + 10_000 * MS);
    assert!(damage.is_empty(), "{damage:?}");
    node.connect(AUDIT, "audit", 0);
    node.subscribe(AUDIT, "job.>");
    let actions = node.take();
    let mut all = expected;
    all.extend(["early-1".to_string(), "early-2".to_string()]);
    assert_eq!(sorted(payloads_to(&actions, AUDIT)), sorted(all));
}

/// A batch's fsync fails while the disk keeps failing: the fsync that makes
/// the log's cut-back durable fails too, which poisons the log (STORAGE.md
/// §7: "until it is reopened"). The store reopens it, and the broker is
/// back once the disk works ("recovers when space returns"). This was a
/// bug: the broker refused every send until restarted.
#[test]
fn fsyncs_that_keep_failing_for_a_while_do_not_stop_the_broker_for_good() {
    let disk = Disk::new(7);
    let (mut node, _) = disk.start(START);
    busy(&mut node);
    disk.fs.fail_from(FaultOp::Sync, 1, Fault::NoSpace);
    for i in 0..2u64 {
        node.send(WEB, 100 + i, command(&format!("full-{i}")));
        let r = results(&node.take());
        assert_eq!(r[0].1, ErrorCode::StorageFailed, "{r:?}");
    }
    // The disk works again.
    disk.fs.clear_faults();
    // The broker notices on its next tick (the server ticks every 100 ms).
    node.broker.tick(node.now);
    node.take();
    node.send(WEB, 200, command("after"));
    let actions = node.take();
    let r = results(&actions);
    assert_eq!(
        r.iter().map(|x| (x.0, x.1)).collect::<Vec<_>>(),
        vec![(200, ErrorCode::Ok)],
        "the disk has worked again for a while, yet: {r:?}"
    );
    assert_eq!(payloads_to(&actions, WORK), vec!["after"]);
}

/// While the disk stays full and nothing happens, the broker does not hand
/// the same in-flight messages out again and again. This was a bug: every
/// batch that found the disk full (an idle timer tick included) voided all
/// in-flight deliveries, rebuilt the state and delivered them all again.
/// Now delivery bookkeeping waits in memory while the disk fails.
#[test]
fn an_idle_broker_on_a_full_disk_does_not_redeliver_in_a_loop() {
    let disk = Disk::new(6);
    let (mut node, _) = disk.start(START);
    busy(&mut node);
    disk.fs.fail_from(FaultOp::Sync, 1, Fault::NoSpace);
    node.send(WEB, 10, command("refused"));
    let actions = node.take();
    assert_eq!(results(&actions)[0].1, ErrorCode::StorageFailed);
    // The failed batch voided work's delivery of early-2: delivered again
    // (at least once, as documented).
    assert_eq!(payloads_to(&actions, WORK), vec!["early-2"]);
    // Nothing more happens but time passing (the server ticks every
    // 100 ms).
    let mut again = Vec::new();
    for _ in 0..5 {
        node.now += 100 * MS;
        node.broker.tick(node.now);
        again.extend(deliveries(&node.take()));
    }
    assert!(
        again.is_empty(),
        "idle for 500 ms on a full disk, work was handed early-2 {} more times: {again:?}",
        again.len()
    );
}
