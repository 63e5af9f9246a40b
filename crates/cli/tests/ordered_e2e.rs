//! Ordering keys taken pipelined (protocol version 4) by real instances:
//! a `courier subscribe` process and an SDK client share a service; one
//! nacks, the other is killed with `kill -9`; each key still arrives in
//! order at each instance, and nothing is lost. On a cluster
//! (`COURIER_E2E_BACKEND=cluster`) the two instances are on different
//! nodes: one node holds the keyed lane and relays keys to the other.

mod cluster_common;
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cluster_common::bus::Bus;
use courier_client::{Client, ClientOptions, Incoming};

const KEYS: usize = 8;
const PER_KEY: usize = 400;
const T: Duration = Duration::from_secs(60);

/// (key, index) of a payload `"<index>"` with key `k<key>`.
fn parse(key: Option<&str>, payload: &serde_json::Value) -> (usize, usize) {
    let key = key
        .and_then(|k| k.strip_prefix('k'))
        .and_then(|k| k.parse().ok())
        .expect("key k<n>");
    let index = match payload {
        serde_json::Value::Number(n) => n.as_u64().expect("index") as usize,
        serde_json::Value::String(s) => s.parse().expect("index"),
        other => panic!("payload {other:?}"),
    };
    (key, index)
}

/// Per key, the indices an instance was handed, in order, never go back
/// but to take the one it just had again (a redelivery after a nack).
fn assert_in_order(who: &str, seen: &[(usize, usize)]) {
    let mut last: BTreeMap<usize, usize> = BTreeMap::new();
    for (key, index) in seen {
        if let Some(before) = last.get(key) {
            assert!(
                index >= before,
                "{who}: key k{key} went from {before} back to {index}"
            );
        }
        last.insert(*key, *index);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_events_stay_in_order_per_key_under_nacks_and_a_kill_9() {
    let broker = Bus::start().await;

    // Instance B: the SDK in this process. It nacks a few first attempts
    // and takes its time over some deliveries (their handlers wait, so the
    // key's line carries on from a task).
    let mut o = ClientOptions::new(broker.addr(), "ledger");
    o.nack_delay = Duration::from_millis(5);
    o.reconnect_delay_max = Duration::from_millis(200);
    let b = Client::connect(o).await.expect("connect B");
    let handled: Arc<Mutex<Vec<(usize, usize, u32)>>> = Arc::default();
    let log = handled.clone();
    b.on("ledger.>", move |msg: Incoming| {
        let log = log.clone();
        async move {
            let payload: serde_json::Value =
                serde_json::from_slice(msg.payload()).expect("JSON payload");
            let key = msg
                .message()
                .key
                .as_ref()
                .map(|k| String::from_utf8_lossy(k).into_owned());
            let (key, index) = parse(key.as_deref(), &payload);
            log.lock().expect("log").push((key, index, msg.attempt()));
            if index % 10 == 3 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            if index % 37 == 5 && msg.attempt() == 1 {
                return Err(std::io::Error::other("not now"));
            }
            Ok(())
        }
    })
    .await
    .expect("subscribe B");

    // Instance A: `courier subscribe`, killed part way.
    let mut a = broker.spawn(&["subscribe", "ledger.>", "--service", "ledger"]);
    broker.wait_consumers("ledger", 2);

    let publisher = Client::connect(ClientOptions::new(broker.addr(), "bank"))
        .await
        .expect("connect publisher");
    cluster_common::sdk::publish_keyed(&publisher, KEYS, PER_KEY).await;

    let mut by_a: Vec<(usize, usize)> = Vec::new();
    let a_lines = tokio::task::spawn_blocking(move || {
        for _ in 0..300 {
            let line = a.json_line(T);
            let key = line["key"].as_str().map(str::to_string);
            by_a.push(parse(key.as_deref(), &line["payload"]));
        }
        a.kill9();
        // What it printed before it died, beyond what was read so far.
        for line in a.rest(T) {
            let key = line["key"].as_str().map(str::to_string);
            by_a.push(parse(key.as_deref(), &line["payload"]));
        }
        by_a
    });
    let by_a = a_lines.await.expect("A's lines");
    let killed_at = handled.lock().expect("log").len();

    // Everything A did not print must reach B, in order.
    let all: BTreeSet<(usize, usize)> = (0..KEYS)
        .flat_map(|k| (0..PER_KEY).map(move |i| (k, i)))
        .collect();
    let started = Instant::now();
    loop {
        let done: BTreeSet<(usize, usize)> = handled
            .lock()
            .expect("log")
            .iter()
            .map(|(k, i, _)| (*k, *i))
            .chain(by_a.iter().copied())
            .collect();
        if done == all {
            break;
        }
        if started.elapsed() > T {
            let missing: Vec<_> = all.difference(&done).collect();
            panic!(
                "{} of {} messages handled after {T:?}; missing {missing:?}",
                done.len(),
                all.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    b.shutdown().await;

    let by_b: Vec<(usize, usize, u32)> = handled.lock().expect("log").clone();
    assert_in_order("courier subscribe", &by_a);
    assert_in_order(
        "SDK instance",
        &by_b.iter().map(|(k, i, _)| (*k, *i)).collect::<Vec<_>>(),
    );
    assert!(
        by_b.iter()
            .any(|(_, i, attempt)| i % 37 == 5 && *attempt > 1),
        "nacked deliveries came again"
    );
    // A held keys when it died: B took them over from A's first unacked
    // message (or earlier), and went on in order to the end of each.
    let a_keys: BTreeSet<usize> = by_a.iter().map(|(k, _)| *k).collect();
    assert!(!a_keys.is_empty(), "A was handed some keys");
    for key in &a_keys {
        let handled_before = by_a
            .iter()
            .map(|(k, i)| (*k, *i))
            .chain(by_b[..killed_at].iter().map(|(k, i, _)| (*k, *i)))
            .filter(|(k, _)| k == key)
            .map(|(_, i)| i)
            .max()
            .expect("A had the key");
        if handled_before == PER_KEY - 1 {
            continue;
        }
        let first = by_b[killed_at..]
            .iter()
            .find(|(k, _, _)| k == key)
            .map(|(_, i, _)| *i)
            .expect("B took the key over");
        assert!(
            first <= handled_before + 1,
            "key k{key}: handled up to {handled_before} before the kill, B went on from {first}"
        );
    }
}
