//! The service registry.

use super::*;

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
