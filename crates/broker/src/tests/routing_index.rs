//! Routing through the pattern index finds exactly the services the
//! linear rule (every service's patterns, one by one) finds, through
//! subscribes, unsubscribes, pauses, disconnects, checkpoints and restarts.

use super::*;

impl<S: MessageStore> Broker<S> {
    /// The rule `receivers` followed before the index: every service
    /// tested, sorted by name.
    fn receivers_by_scan(&self, name: &str) -> Vec<String> {
        let mut targets: Vec<String> = self
            .services
            .iter()
            .filter(|(_, s)| s.receives(name))
            .map(|(n, _)| n.clone())
            .collect();
        targets.sort_unstable();
        targets
    }

    fn assert_routes_as_by_scan(&mut self, names: &[&str]) {
        let held: usize = self.services.values().map(|s| s.patterns.len()).sum();
        assert_eq!(
            self.subscribers.len(),
            held,
            "the index holds every pattern"
        );
        for name in names {
            let scanned = self.receivers_by_scan(name);
            // Twice: a miss, then the route cache.
            for _ in 0..2 {
                assert_eq!(&*self.receivers(name, 1), &scanned[..], "routing {name}");
            }
        }
    }
}

const NAMES: [&str; 8] = [
    "job.a",
    "job.b",
    "job.a.x",
    "job",
    "mail.a",
    "mail.a.b",
    "x",
    "job.b.c.d",
];

const PATTERNS: [&str; 8] = [
    "job.a", "job.*", "job.>", ">", "*.a", "mail.>", "*", "job.*.x",
];

#[derive(Debug, Clone)]
enum Op {
    Subscribe(ConnId, usize),
    Unsubscribe(ConnId, usize),
    Pause(usize, Option<usize>),
    Resume(usize, Option<usize>),
    Reconnect(ConnId),
    Checkpoint,
    Restart,
}

/// Connections 1–4 act for services s1, s2, s3 and s1 again.
fn service_of(conn: ConnId) -> String {
    format!("s{}", (conn - 1) % 3 + 1)
}

fn op() -> impl Strategy<Value = Op> {
    let conn = 1u64..=4;
    let pattern = 0..PATTERNS.len();
    prop_oneof![
        6 => (conn.clone(), pattern.clone()).prop_map(|(c, p)| Op::Subscribe(c, p)),
        3 => (conn.clone(), pattern.clone()).prop_map(|(c, p)| Op::Unsubscribe(c, p)),
        1 => (1usize..=3, proptest::option::of(pattern.clone()))
            .prop_map(|(s, p)| Op::Pause(s, p)),
        1 => (1usize..=3, proptest::option::of(pattern)).prop_map(|(s, p)| Op::Resume(s, p)),
        1 => conn.prop_map(Op::Reconnect),
        1 => Just(Op::Checkpoint),
        1 => Just(Op::Restart),
    ]
}

fn connect_all(h: &mut Harness<MemoryLog>) {
    for conn in 1..=4 {
        h.connect(conn, &service_of(conn), 0);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]
    #[test]
    fn routes_as_the_linear_rule(ops in proptest::collection::vec(op(), 1..60)) {
        let mut h = Harness::with_store(MemoryLog::new());
        connect_all(&mut h);
        for op in ops {
            match op {
                Op::Subscribe(conn, p) => h.subscribe(conn, PATTERNS[p]),
                Op::Unsubscribe(conn, p) => h.broker.unsubscribe(conn, 0, PATTERNS[p]),
                Op::Pause(s, p) => {
                    let _ = h.broker.pause_subscription(&format!("s{s}"), p.map(|p| PATTERNS[p]), h.now);
                }
                Op::Resume(s, p) => {
                    let _ = h.broker.resume_subscription(&format!("s{s}"), p.map(|p| PATTERNS[p]), h.now);
                }
                Op::Reconnect(conn) => {
                    h.broker.disconnect(conn, h.now);
                    h.connect(conn, &service_of(conn), 0);
                }
                Op::Checkpoint => {
                    h.advance(1);
                    h.broker.checkpoint(h.now).expect("checkpoint");
                }
                Op::Restart => {
                    h.actions();
                    h.crash_and_recover();
                    connect_all(&mut h);
                }
            }
            h.actions();
            h.broker.assert_routes_as_by_scan(&NAMES);
        }
    }
}

#[test]
fn routes_through_many_services_as_the_linear_rule() {
    let mut h = Harness::with_store(MemoryLog::new());
    for k in 0..50u64 {
        h.connect(k + 1, &format!("svc{k:02}"), 0);
        for j in 0..20u64 {
            let last = ["*", ">", "x"][(j % 3) as usize];
            h.subscribe(k + 1, &format!("w.s{:02}.t{j:02}.{last}", k % 10));
        }
    }
    let names: Vec<String> = (0..200u64)
        .map(|i| format!("w.s{:02}.t{:02}.x", i % 12, i % 22))
        .chain(["w.s03.t01.a.b".to_string(), "w.s03".to_string()])
        .collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    h.broker.assert_routes_as_by_scan(&names);
    for k in (0..50u64).step_by(3) {
        h.broker
            .unsubscribe(k + 1, 0, &format!("w.s{:02}.t01.>", k % 10));
    }
    h.actions();
    h.broker.assert_routes_as_by_scan(&names);
    h.crash_and_recover();
    h.broker.assert_routes_as_by_scan(&names);
}

/// What a route costs with W10's table (1,000 services × 100 patterns)
/// and names that never repeat, through the index and by the old scan:
/// `cargo test --release -p courier-broker -- --ignored --nocapture route_cost`.
#[test]
#[ignore = "a measurement; run it in release"]
fn route_cost_with_100_000_subscriptions() {
    let mut h = Harness::new();
    for k in 0..1_000u64 {
        h.connect(k + 1, &format!("s{k:04}"), 0);
        for j in 0..100u64 {
            let last = if j.is_multiple_of(2) { "*" } else { ">" };
            h.subscribe(k + 1, &format!("w10.s{k:04}.t{j:02}.{last}"));
        }
    }
    h.actions();
    let name = |i: u64| format!("w10.s0500.t{:02}.m{i:08}", i % 100);
    let routes = 200_000u64;
    let started = std::time::Instant::now();
    for i in 0..routes {
        assert_eq!(h.broker.receivers(&name(i), 1).len(), 1);
    }
    let indexed = started.elapsed().as_nanos() as f64 / routes as f64;
    let scans = 200u64;
    let started = std::time::Instant::now();
    for i in 0..scans {
        assert_eq!(h.broker.receivers_by_scan(&name(i)).len(), 1);
    }
    let scanned = started.elapsed().as_nanos() as f64 / scans as f64;
    println!(
        "100,000 subscriptions, new names: {indexed:.0} ns a route through the index, {scanned:.0} ns by the scan ({:.0}x)",
        scanned / indexed
    );
}
