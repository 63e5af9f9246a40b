//! Faults under two Courier nodes on a real three-server NATS JetStream
//! cluster (docs/SCALE-OUT.md): a node killed with deliveries in flight
//! (its own, or keys relayed to it by the keyed lane's holder),
//! a delivery that fails until it is a dead letter, a nats-server killed
//! while a client sends. Clients are the Rust SDK, as a user's services
//! are.

mod cluster_common;
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cluster_common::sdk::{connect, opts, publish_keyed, send_when_routed};
use cluster_common::Nodes;
use common::{wait_for_async, Broker};
use courier_client::{Client, ErrorCode, Incoming};
use uuid::Uuid;

/// How long anything the cluster owes (a routing, a redelivery after the
/// ack deadline, a recovery after a server's restart) may take, at most.
const T: Duration = Duration::from_secs(60);
/// The ack deadline of the services here: short, so that what a dead
/// node held comes back soon.
const ACK_DEADLINE: Duration = Duration::from_secs(2);

/// (message id, attempt) of each delivery a handler saw, in order.
type Seen = Arc<Mutex<Vec<(Uuid, u32)>>>;

fn seen(log: &Seen) -> Vec<(Uuid, u32)> {
    log.lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .clone()
}

/// Subscribes `client` to `pattern` with a handler that records each
/// delivery and then acks it (`hold: false`) or keeps it forever
/// unsettled (`hold: true`).
async fn recording(client: &Client, pattern: &str, hold: bool) -> Seen {
    let log: Seen = Arc::default();
    let handler_log = log.clone();
    client
        .on(pattern, move |msg: Incoming| {
            let log = handler_log.clone();
            async move {
                log.lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .push((msg.message().id, msg.attempt()));
                if hold {
                    std::future::pending::<()>().await;
                }
                Ok::<(), courier_client::Error>(())
            }
        })
        .await
        .unwrap_or_else(|e| panic!("subscribe to {pattern}: {e}"));
    log
}

/// (key, index, attempt) of each keyed delivery, in the order handled.
type KeyedLog = Arc<Mutex<Vec<(usize, usize, u32)>>>;

fn keyed_log_of(log: &KeyedLog) -> Vec<(usize, usize, u32)> {
    log.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// An instance of `ledger` on `node` subscribed to `ledger.*` from
/// `start`, which takes `pause` over each event (key `k<n>`, payload an
/// index) and records it.
async fn keyed_instance(
    node: &Broker,
    start: courier_client::StartFrom,
    pause: Duration,
) -> (Client, KeyedLog) {
    let mut o = opts(node, "ledger");
    o.ack_deadline = Some(ACK_DEADLINE);
    let client = connect(o).await;
    let log: KeyedLog = Arc::default();
    let handler_log = log.clone();
    let handler = move |msg: Incoming| {
        let log = handler_log.clone();
        async move {
            let key = msg
                .message()
                .key
                .as_deref()
                .and_then(|k| std::str::from_utf8(k).ok())
                .and_then(|k| k.strip_prefix('k'))
                .and_then(|k| k.parse::<usize>().ok())
                .expect("key k<n>");
            let index: usize = std::str::from_utf8(msg.payload())
                .ok()
                .and_then(|p| p.parse().ok())
                .expect("an index");
            tokio::time::sleep(pause).await;
            log.lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((key, index, msg.attempt()));
            Ok::<(), courier_client::Error>(())
        }
    };
    client
        .on_from("ledger.*", start, handler)
        .await
        .expect("subscribed");
    (client, log)
}

/// Waits until the instance of the node that died (what it `handled`)
/// and the one that went on (`going_on`) together handled every event of
/// `keys` × `per_key`.
async fn every_event_handled(
    handled: &[(usize, usize, u32)],
    going_on: &KeyedLog,
    keys: usize,
    per_key: usize,
) {
    let all: BTreeSet<(usize, usize)> = (0..keys)
        .flat_map(|k| (0..per_key).map(move |i| (k, i)))
        .collect();
    wait_for_async("every event handled", T, || {
        let done: BTreeSet<(usize, usize)> = handled
            .iter()
            .chain(keyed_log_of(going_on).iter())
            .map(|(k, i, _)| (*k, *i))
            .collect();
        let complete = done == all;
        async move { complete.then_some(()) }
    })
    .await;
}

/// Each key went in order on both nodes' instances (`(node, log)`: the
/// one whose node died, and the one that went on), and the one that went
/// on took each key up from the first event the other had not handled:
/// nothing skipped.
fn went_on_in_order(
    died: (&str, &[(usize, usize, u32)]),
    went_on: (&str, &[(usize, usize, u32)]),
    keys: usize,
    per_key: usize,
) {
    for key in 0..keys {
        let of_key = |log: &[(usize, usize, u32)]| -> Vec<usize> {
            log.iter()
                .filter(|(k, _, _)| *k == key)
                .map(|(_, i, _)| *i)
                .collect()
        };
        let (before, after) = (of_key(died.1), of_key(went_on.1));
        // (index, attempt) of the key's events as a node's instance
        // handled them: what a failure shows.
        let attempts = |log: &[(usize, usize, u32)]| -> Vec<(usize, u32)> {
            log.iter()
                .filter(|(k, _, _)| *k == key)
                .map(|(_, i, attempt)| (*i, *attempt))
                .collect()
        };
        for ((node, log), seen) in [(died, &before), (went_on, &after)] {
            assert!(
                seen.windows(2).all(|w| w[1] >= w[0]),
                "key k{key} went back on node {node}: (index, attempt) {:?}; the other node handled {:?}",
                attempts(log),
                attempts(if node == died.0 { went_on.1 } else { died.1 })
            );
        }
        let done = before.iter().map(|i| i + 1).max().unwrap_or(0);
        let from = after.iter().copied().find(|i| *i >= done);
        if done < per_key {
            assert_eq!(
                from,
                Some(done),
                "key k{key}: node {} handled up to {done}, node {} went on from {from:?}",
                died.0,
                went_on.0
            );
        }
    }
}

/// One cluster and two nodes for every scenario: a cluster takes seconds
/// to form, and three at once on one machine race for ports.
#[tokio::test(flavor = "multi_thread")]
async fn nodes_and_servers_fail_and_nothing_acknowledged_is_lost() {
    let started = Instant::now();
    let mut nodes = Nodes::start_watched().await;
    eprintln!("cluster and nodes up in {:?}", started.elapsed());
    let started = Instant::now();
    a_node_killed_with_deliveries_in_flight_leaves_them_to_the_other(&mut nodes).await;
    eprintln!("a node killed: {:?}", started.elapsed());
    let started = Instant::now();
    a_failing_delivery_is_retried_after_its_delay_then_dead_lettered(&nodes).await;
    eprintln!("dead letters: {:?}", started.elapsed());
    let started = Instant::now();
    a_reply_finds_its_requester_after_the_requesters_node_died(&mut nodes).await;
    eprintln!(
        "a reply after the requester's node died: {:?}",
        started.elapsed()
    );
    let started = Instant::now();
    a_reply_nobody_can_take_waits_in_the_cluster_for_its_requester(&mut nodes).await;
    eprintln!("a parked reply: {:?}", started.elapsed());
}

/// A cluster of its own: the messages stream's leader killed under load.
#[tokio::test(flavor = "multi_thread")]
async fn the_stream_leader_killed_under_load_loses_nothing_acknowledged() {
    let mut nodes = Nodes::start_watched().await;
    let started = Instant::now();
    a_server_killed_under_load_loses_no_acknowledged_event(&mut nodes).await;
    eprintln!("a server killed: {:?}", started.elapsed());
}

/// A cluster of its own: the node handing out a history replay killed
/// part way; the other node goes on with it from each key's first
/// unacknowledged event, in order, and then with the keys' new events.
#[tokio::test(flavor = "multi_thread")]
async fn a_replay_goes_on_at_the_next_holder_when_its_node_dies() {
    const KEYS: usize = 4;
    const PER_KEY: usize = 150;
    const NEW: usize = 10;
    // Slow enough that the replay is still going when its node dies.
    const PAUSE: Duration = Duration::from_millis(5);
    async fn instance(node: &Broker, history: bool) -> (Client, KeyedLog) {
        let start = if history {
            courier_client::StartFrom::Beginning
        } else {
            courier_client::StartFrom::New
        };
        keyed_instance(node, start, PAUSE).await
    }

    let mut nodes = Nodes::start_watched().await;
    // The history, through node b, before any service takes it.
    let web = connect(opts(&nodes.b, "bank")).await;
    publish_keyed(&web, KEYS, PER_KEY).await;
    // Node a's instance alone: node a holds the keyed lane and replays.
    let (on_a, by_a) = instance(&nodes.a, true).await;
    wait_for_async("node a's instance handles some of the history", T, || {
        let n = keyed_log_of(&by_a).len();
        async move { (n >= 100).then_some(()) }
    })
    .await;
    let (on_b, by_b) = instance(&nodes.b, false).await;
    nodes.a.child.kill().expect("kill -9 node a");
    nodes.a.child.wait().expect("reap node a");
    let handled_on_a = keyed_log_of(&by_a);
    on_a.shutdown().await;
    assert!(
        handled_on_a.len() < KEYS * PER_KEY,
        "the replay ended before node a died"
    );

    // Node b goes on with it: every event handled, keys in order.
    every_event_handled(&handled_on_a, &by_b, KEYS, PER_KEY).await;
    // New events after the history, in order behind it.
    for index in PER_KEY..PER_KEY + NEW {
        web.event("ledger.entry")
            .key("k0")
            .json(&index)
            .expect("payload")
            .send()
            .await
            .expect("accepted");
    }
    wait_for_async("the new events handled on node b", T, || {
        let n = keyed_log_of(&by_b)
            .iter()
            .filter(|(k, i, _)| *k == 0 && *i >= PER_KEY)
            .count();
        async move { (n >= NEW).then_some(()) }
    })
    .await;
    let by_b = keyed_log_of(&by_b);
    eprintln!(
        "node a handled {} of the history before it died, node b {} after (repeats: {})",
        handled_on_a.len(),
        by_b.len(),
        handled_on_a.len() + by_b.len() - KEYS * PER_KEY - NEW
    );
    went_on_in_order(("a", &handled_on_a), ("b", &by_b), KEYS, PER_KEY);
    // The replay ended: its consumer is gone.
    let connection = nodes.cluster.connect("replay check").await;
    let stream = connection
        .jetstream
        .get_stream(courier_cluster::names::MESSAGES_STREAM)
        .await
        .expect("the messages stream");
    let replay = courier_cluster::consumers::replay_consumer_name("ledger", "ledger.*");
    wait_for_async("the replay's consumer goes", T, || {
        let stream = stream.clone();
        let replay = replay.clone();
        async move {
            let found = stream.consumer_info(&replay).await.is_ok();
            (!found).then_some(())
        }
    })
    .await;
    on_b.shutdown().await;
    web.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_relayed_to_a_node_that_dies_go_on_at_the_holder() {
    const KEYS: usize = 8;
    const PER_KEY: usize = 100;
    async fn instance(node: &Broker) -> (Client, KeyedLog) {
        let start = courier_client::StartFrom::New;
        keyed_instance(node, start, Duration::from_millis(2)).await
    }
    fn metrics_of(node: &Broker) -> String {
        let http = node.http.as_deref().expect("the node's HTTP port");
        common::http_get(http, "/metrics", None).1
    }

    let mut nodes = Nodes::start_watched().await;
    // Node a's instance first: node a holds the keyed lane.
    let (on_a, by_a) = instance(&nodes.a).await;
    wait_for_async("node a leads the keyed lane", T, || {
        let held = metrics_of(&nodes.a).contains("courier_lease_held{lease=\"keyed.ledger\"} 1");
        async move { held.then_some(()) }
    })
    .await;
    // Node b's instance pulls its share: node a relays keys to it.
    let (on_b, by_b) = instance(&nodes.b).await;
    wait_for_async("node a relays to node b", T, || {
        let relaying = metrics_of(&nodes.a).contains("courier_keyed_relay{service=\"ledger\",");
        async move { relaying.then_some(()) }
    })
    .await;
    let web = connect(opts(&nodes.a, "bank")).await;
    publish_keyed(&web, KEYS, PER_KEY).await;
    wait_for_async("node b's instance handles some keys", T, || {
        let n = keyed_log_of(&by_b).len();
        async move { (n >= 60).then_some(()) }
    })
    .await;
    nodes.b.child.kill().expect("kill -9 node b");
    nodes.b.child.wait().expect("reap node b");
    let handled_on_b = keyed_log_of(&by_b);
    on_b.shutdown().await;
    assert!(
        handled_on_b.len() < KEYS * PER_KEY,
        "everything was handled before node b died"
    );

    // The holder takes back what was out on node b's relay: every event
    // handled, each key in order, none skipped.
    every_event_handled(&handled_on_b, &by_a, KEYS, PER_KEY).await;
    let by_a = keyed_log_of(&by_a);
    let keys_on_b: BTreeSet<usize> = handled_on_b.iter().map(|(k, _, _)| *k).collect();
    eprintln!(
        "node b's instance handled {} events of keys {keys_on_b:?} before its node died, node a's {} (repeats: {})",
        handled_on_b.len(),
        by_a.len(),
        handled_on_b.len() + by_a.len() - KEYS * PER_KEY
    );
    assert!(!keys_on_b.is_empty(), "node b was relayed no key");
    went_on_in_order(("b", &handled_on_b), ("a", &by_a), KEYS, PER_KEY);
    on_a.shutdown().await;
    web.shutdown().await;
}

async fn a_node_killed_with_deliveries_in_flight_leaves_them_to_the_other(nodes: &mut Nodes) {
    const COMMANDS: usize = 50;
    /// Sent while only node a's instance consumes, so that it holds some.
    const FIRST: usize = 5;
    const HELD_MAX: u32 = 10;
    // Attempts enough that what node a held is never dead-lettered on the
    // way (its core gives a delivery back at the ack deadline, and it may
    // take it again before it dies).
    const MAX_DELIVERIES: u32 = 20;
    let service_opts = |node: &Broker| {
        let mut o = opts(node, "work");
        o.ack_deadline = Some(ACK_DEADLINE);
        o.max_deliveries = Some(MAX_DELIVERIES);
        o
    };

    // Node a's instance takes deliveries and never settles them.
    let mut o = service_opts(&nodes.a);
    o.max_in_flight = HELD_MAX;
    o.drain_timeout = Duration::from_millis(100);
    let holder = connect(o).await;
    let held = recording(&holder, "work.do", true).await;
    nodes.a.wait_consumers("work", 1, None);

    let web = connect(opts(&nodes.b, "web")).await;
    let mut sent = vec![send_when_routed(&web, "work.do", &serde_json::json!(0)).await];
    for n in 1..FIRST {
        sent.push(
            web.send("work.do", &serde_json::json!(n))
                .await
                .unwrap_or_else(|e| panic!("send {n}: {e}")),
        );
    }
    wait_for_async("node a's instance holds a delivery", T, || {
        let held = seen(&held);
        async move { (!held.is_empty()).then_some(()) }
    })
    .await;

    // Node b's instance acks. The rest is sent while node a dies.
    let acker = connect(service_opts(&nodes.b)).await;
    let handled = recording(&acker, "work.do", false).await;
    nodes.b.wait_consumers("work", 1, None);
    let sender = {
        let web = web.clone();
        tokio::spawn(async move {
            let mut ids = Vec::new();
            for n in FIRST..COMMANDS {
                match web.send("work.do", &serde_json::json!(n)).await {
                    Ok(id) => ids.push(id),
                    Err(e) => panic!("send {n} through node b: {e}"),
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            ids
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let held_at_kill = seen(&held);
    nodes.a.child.kill().expect("kill -9 node a");
    nodes.a.child.wait().expect("reap node a");
    let killed_at = Instant::now();
    let rest = tokio::time::timeout(T, sender)
        .await
        .expect("the sends through node b finished in time")
        .expect("the sender task");
    sent.extend(rest);
    // Whatever node a's instance got, it got before its node died.
    let held_ids: BTreeSet<Uuid> = seen(&held).iter().map(|(id, _)| *id).collect();
    holder.shutdown().await;

    // Every acknowledged send is handled by node b's instance.
    let wanted: BTreeSet<Uuid> = sent.iter().copied().collect();
    assert_eq!(wanted.len(), COMMANDS, "every send got an id of its own");
    let all = wait_for_async("every acknowledged command handled on node b", T, || {
        let handled = seen(&handled);
        let got: BTreeSet<Uuid> = handled.iter().map(|(id, _)| *id).collect();
        let done = wanted.is_subset(&got);
        async move { done.then_some(handled) }
    })
    .await;
    eprintln!(
        "node a held {} (at the kill {}: {:?}); node b had all {COMMANDS} {:?} after the kill",
        held_ids.len(),
        held_at_kill.len(),
        held_at_kill,
        killed_at.elapsed()
    );
    // Nothing more comes once the deadline of anything outstanding passed.
    tokio::time::sleep(ACK_DEADLINE + Duration::from_secs(1)).await;
    let all_later = seen(&handled);
    assert_eq!(
        all_later.len(),
        all.len(),
        "deliveries after all were handled: {:?}",
        &all_later[all.len()..]
    );

    let mut first_attempt: BTreeMap<Uuid, u32> = BTreeMap::new();
    let mut times: BTreeMap<Uuid, usize> = BTreeMap::new();
    for (id, attempt) in &all_later {
        assert!(wanted.contains(id), "node b handled {id}, never sent");
        first_attempt.entry(*id).or_insert(*attempt);
        *times.entry(*id).or_default() += 1;
    }
    for id in &held_ids {
        assert!(
            first_attempt[id] >= 2,
            "{id}, held by node a, came to node b as attempt {}",
            first_attempt[id]
        );
    }
    let twice: Vec<(&Uuid, &usize)> = times.iter().filter(|(_, n)| **n > 1).collect();
    eprintln!(
        "ids node b handled more than once: {twice:?}; attempts seen on node b: {:?}",
        all_later.iter().map(|(_, a)| a).collect::<BTreeSet<_>>()
    );
    for (id, n) in &twice {
        assert!(
            held_ids.contains(id),
            "{id} handled {n} times on node b, and node a never had it; {}",
            nodes.log_tails(30)
        );
    }

    // Node a, started again with its flags, serves: a request through it
    // is answered from node b.
    let node_a = nodes.start_node("a");
    nodes.a = node_a;
    let echo = connect(opts(&nodes.b, "echo")).await;
    echo.on("echo.ping", |msg: Incoming| async move {
        let text: String = msg.json()?;
        msg.reply("echo.pong", &text).await
    })
    .await
    .expect("subscribe echo.ping");
    let caller = connect(opts(&nodes.a, "web")).await;
    let deadline = Instant::now() + cluster_common::ROUTED_WITHIN;
    let reply = loop {
        match caller.request("echo.ping", &"after the restart").await {
            Ok(reply) => break reply,
            Err(e) if e.code() == Some(ErrorCode::NoReceiver) && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!(
                "a request through the restarted node a: {e}; {}",
                nodes.log_tails(30)
            ),
        }
    };
    assert_eq!(reply.name(), "echo.pong");
    assert_eq!(
        reply.json::<String>().expect("a JSON string"),
        "after the restart"
    );
    for client in [&web, &acker, &echo, &caller] {
        client.shutdown().await;
    }
}

async fn a_failing_delivery_is_retried_after_its_delay_then_dead_lettered(nodes: &Nodes) {
    const SERVICE: &str = "flaky";
    const NACK_DELAY: Duration = Duration::from_millis(300);
    let mut o = opts(&nodes.a, SERVICE);
    o.max_deliveries = Some(2);
    o.nack_delay = NACK_DELAY;
    o.ack_deadline = Some(ACK_DEADLINE);
    let failing = connect(o).await;
    let deliveries: Arc<Mutex<Vec<(u32, Instant)>>> = Arc::default();
    let log = deliveries.clone();
    failing
        .on("flaky.run", move |msg: Incoming| {
            let log = log.clone();
            async move {
                log.lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .push((msg.attempt(), Instant::now()));
                Err::<(), _>(std::io::Error::other("always fails"))
            }
        })
        .await
        .expect("subscribe flaky.run");
    let web = connect(opts(&nodes.b, "web")).await;
    let id = send_when_routed(&web, "flaky.run", &serde_json::json!("once")).await;

    let got = |deliveries: &Arc<Mutex<Vec<(u32, Instant)>>>| {
        deliveries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    };
    wait_for_async("the second attempt", T, || {
        let n = got(&deliveries).len();
        async move { (n >= 2).then_some(()) }
    })
    .await;

    // Stored in COURIER_DEAD, read as an operator would, past the nodes.
    let connection = nodes.cluster.connect("test-reader").await;
    let dead = connection
        .jetstream
        .get_stream("COURIER_DEAD")
        .await
        .expect("stream COURIER_DEAD");
    let filter = format!("courier.dl.{SERVICE}.>");
    let subject = wait_for_async("a dead letter of flaky", T, || {
        let dead = dead.clone();
        let filter = filter.clone();
        async move {
            use futures_util::TryStreamExt as _;
            let mut info = dead.info_with_subjects(&filter).await.ok()?;
            let mut subjects = Vec::new();
            while let Ok(Some((subject, count))) = info.try_next().await {
                subjects.push((subject, count));
            }
            match subjects.as_slice() {
                [] => None,
                [(subject, 1)] => Some(subject.clone()),
                more => panic!("more than one dead letter of {SERVICE}: {more:?}"),
            }
        }
    })
    .await;
    let letter = dead
        .get_last_raw_message_by_subject(&subject)
        .await
        .expect("the dead letter");
    let header = |name: &str| letter.headers.get(name).map(|v| v.as_str().to_string());
    assert_eq!(
        header("Courier-Attempts").as_deref(),
        Some("2"),
        "{:?}",
        letter.headers
    );
    let reason = header("Courier-Reason").unwrap_or_default();
    assert!(
        !reason.is_empty(),
        "no Courier-Reason: {:?}",
        letter.headers
    );
    let message = courier_proto::decode_message(letter.payload.clone()).expect("a Courier message");
    assert_eq!(message.id, id);
    eprintln!("dead letter {subject}: reason {reason:?}");

    // Not delivered again: past the nack delay and the ack deadline.
    tokio::time::sleep(ACK_DEADLINE + Duration::from_secs(1)).await;
    let deliveries = got(&deliveries);
    let attempts: Vec<u32> = deliveries.iter().map(|(a, _)| *a).collect();
    assert_eq!(attempts, [1, 2], "delivered as attempts 1 and 2 only");
    let gap = deliveries[1].1 - deliveries[0].1;
    assert!(
        gap >= NACK_DELAY - Duration::from_millis(10),
        "the second attempt came {gap:?} after the first, before the nack delay {NACK_DELAY:?}"
    );
    eprintln!("second attempt {gap:?} after the first");
    failing.shutdown().await;
    web.shutdown().await;
}

async fn a_server_killed_under_load_loses_no_acknowledged_event(nodes: &mut Nodes) {
    const EVENTS: usize = 200;
    /// Sent before the server is killed.
    const BEFORE_KILL: usize = 30;
    /// How long one event may take to be acknowledged, retries included.
    const SEND_WITHIN: Duration = Duration::from_secs(60);

    let ledger = connect(opts(&nodes.b, "ledger")).await;
    let received = recording(&ledger, "tick.*", false).await;
    // The SDK's send timeout (30 s) is longer than a node waits for
    // JetStream's acknowledgement, so a send lost with the leader comes
    // back as the node's own refusal.
    let web = connect(opts(&nodes.a, "web")).await;
    // In force cluster-wide once a probe through node a reached node b.
    let probe_deadline = Instant::now() + cluster_common::ROUTED_WITHIN;
    let mut probes = BTreeSet::new();
    while seen(&received).is_empty() {
        assert!(Instant::now() < probe_deadline, "no probe reached node b");
        probes.insert(
            web.publish("tick.probe", &"probe")
                .await
                .expect("publish a probe"),
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Aim at the leader of the messages stream: its loss interrupts
    // every write until a new leader is elected.
    let connection = nodes.cluster.connect("test-observer").await;
    let mut messages = connection
        .jetstream
        .get_stream("COURIER_MSGS")
        .await
        .expect("stream COURIER_MSGS");
    let leader = messages
        .info()
        .await
        .expect("COURIER_MSGS info")
        .cluster
        .as_ref()
        .and_then(|c| c.leader.clone())
        .expect("COURIER_MSGS has a leader");
    let victim = nodes.cluster.index_of(&leader);

    let progress = Arc::new(AtomicUsize::new(0));
    let refusals: Arc<Mutex<Vec<(usize, String)>>> = Arc::default();
    let sender = {
        let (web, progress, refusals) = (web.clone(), progress.clone(), refusals.clone());
        tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut slowest = Duration::ZERO;
            for n in 0..EVENTS {
                let id = Uuid::now_v7();
                let started = Instant::now();
                let deadline = started + SEND_WITHIN;
                loop {
                    let sent = web
                        .event("tick.n")
                        .id(id)
                        .json(&n)
                        .expect("a JSON payload")
                        .send()
                        .await;
                    match sent {
                        Ok(_) => break,
                        Err(e) => {
                            refusals
                                .lock()
                                .unwrap_or_else(|poisoned| poisoned.into_inner())
                                .push((n, e.to_string()));
                            assert!(
                                Instant::now() < deadline,
                                "event {n} ({id}) not acknowledged within {SEND_WITHIN:?}: {e}"
                            );
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    }
                }
                slowest = slowest.max(started.elapsed());
                acked.push(id);
                progress.store(n + 1, Ordering::Release);
            }
            (acked, slowest)
        })
    };
    wait_for_async("events sent before the kill", T, || {
        let n = progress.load(Ordering::Acquire);
        async move { (n >= BEFORE_KILL).then_some(()) }
    })
    .await;
    nodes.cluster.kill9(victim);
    let killed_at = Instant::now();
    let sent_at_kill = progress.load(Ordering::Acquire);
    tokio::time::sleep(Duration::from_secs(2)).await;
    nodes.cluster.restart(victim).await;
    eprintln!(
        "killed {leader} (the COURIER_MSGS leader) after {sent_at_kill} events; back with the cluster {:?} later",
        killed_at.elapsed()
    );
    let (acked, slowest) = tokio::time::timeout(T * 2, sender)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "the sender did not finish: {} of {EVENTS} acknowledged; {}\n{}",
                progress.load(Ordering::Acquire),
                nodes.log_tails(30),
                nodes.cluster.logs()
            )
        })
        .expect("the sender task");
    let refusals = refusals
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .clone();
    eprintln!(
        "{} sends refused or timed out and retried with the same id: {refusals:?}; the slowest event took {slowest:?} to be acknowledged",
        refusals.len()
    );

    // Every acknowledged event reaches node b's subscriber, once.
    let wanted: BTreeSet<Uuid> = acked.iter().copied().collect();
    assert_eq!(wanted.len(), EVENTS);
    wait_for_async("every acknowledged event on node b", T, || {
        let got: BTreeSet<Uuid> = seen(&received).iter().map(|(id, _)| *id).collect();
        let missing = wanted.difference(&got).count();
        async move { (missing == 0).then_some(()) }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut times: BTreeMap<Uuid, Vec<u32>> = BTreeMap::new();
    for (id, attempt) in seen(&received) {
        if probes.contains(&id) {
            continue;
        }
        assert!(wanted.contains(&id), "node b received {id}, never sent");
        times.entry(id).or_default().push(attempt);
    }
    // A delivery in flight when the consumer's leader died may come
    // again (its ack went to the dead leader): as a redelivery, counted
    // by JetStream. Anything else received twice is a defect.
    let doubled: Vec<(&Uuid, &Vec<u32>)> = times.iter().filter(|(_, a)| a.len() > 1).collect();
    let unexplained: Vec<&(&Uuid, &Vec<u32>)> = doubled
        .iter()
        .filter(|(_, attempts)| attempts.windows(2).any(|w| w[1] <= w[0]))
        .collect();
    assert!(
        unexplained.is_empty(),
        "events received again, not as a redelivery (id, attempts): {unexplained:?}; {}",
        nodes.log_tails(30)
    );
    // No more than the subscriber may hold at once (the SDK's default
    // max_in_flight) can have been in flight.
    assert!(
        doubled.len() <= 64,
        "{} events received again, more than were in flight",
        doubled.len()
    );
    eprintln!(
        "{} events redelivered (in flight at the kill): {doubled:?}",
        doubled.len()
    );
    web.shutdown().await;
    ledger.shutdown().await;
}

/// A responder that answers `{service}.ask` with `{service}.answer` (the
/// request's text) only when told: `asked` is notified when a command
/// arrives, `answer` lets it reply, `replied` says how its reply was
/// answered ("ok" or the error).
struct HeldResponder {
    client: Client,
    asked: Arc<tokio::sync::Notify>,
    answer: Arc<tokio::sync::Notify>,
    replied: Arc<Mutex<Option<String>>>,
}

async fn held_responder(node: &Broker, service: &str) -> HeldResponder {
    let asked = Arc::new(tokio::sync::Notify::new());
    let answer = Arc::new(tokio::sync::Notify::new());
    let replied: Arc<Mutex<Option<String>>> = Arc::default();
    let client = connect(opts(node, service)).await;
    let outcome = format!("{service}.answer");
    {
        let (asked, answer, replied) = (asked.clone(), answer.clone(), replied.clone());
        client
            .on(&format!("{service}.ask"), move |msg: Incoming| {
                let (asked, answer, replied) = (asked.clone(), answer.clone(), replied.clone());
                let outcome = outcome.clone();
                async move {
                    asked.notify_one();
                    answer.notified().await;
                    let text: String = msg.json()?;
                    let sent = msg.reply(&outcome, &text).await;
                    *replied.lock().unwrap_or_else(|p| p.into_inner()) = Some(
                        sent.as_ref()
                            .map_or_else(|e| e.to_string(), |_| "ok".into()),
                    );
                    sent
                }
            })
            .await
            .expect("subscribe the held responder");
    }
    node.wait_consumers(service, 1, None);
    HeldResponder {
        client,
        asked,
        answer,
        replied,
    }
}

/// A request of `name` with `text` through `client`, on a task of its
/// own, sent again while its node does not route it yet.
fn request_task(
    client: &Client,
    name: &str,
    text: &'static str,
    timeout: Duration,
) -> tokio::task::JoinHandle<courier_client::Result<courier_client::Reply>> {
    let (client, name) = (client.clone(), name.to_string());
    tokio::spawn(async move {
        let deadline = Instant::now() + cluster_common::ROUTED_WITHIN;
        loop {
            match client
                .command(name.clone())
                .json(&text)?
                .timeout(timeout)
                .request()
                .await
            {
                Err(e) if e.code() == Some(ErrorCode::NoReceiver) && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                answered => return answered,
            }
        }
    })
}

/// A request through node a is answered from node b after node a died:
/// the requester moved to node b by itself (it was given both
/// addresses), and the reply, which node a can no longer take, goes to
/// the requesting service's instance wherever it is now.
async fn a_reply_finds_its_requester_after_the_requesters_node_died(nodes: &mut Nodes) {
    let slow = held_responder(&nodes.b, "slow").await;
    let mut o = opts(&nodes.a, "asker");
    o.url = format!("{},{}", nodes.a.addr, nodes.b.addr);
    o.send_timeout = T;
    let asker = connect(o).await;
    assert_eq!(
        asker.broker_address(),
        nodes.a.addr,
        "the first address first"
    );
    let request = request_task(&asker, "slow.ask", "still there?", T);
    tokio::time::timeout(T, slow.asked.notified())
        .await
        .expect("the command reached the responder on node b");

    nodes.a.child.kill().expect("kill -9 node a");
    nodes.a.child.wait().expect("reap node a");
    wait_for_async("the requester moved to node b", T, || {
        let moved = asker.is_connected() && asker.broker_address() == nodes.b.addr;
        async move { moved.then_some(()) }
    })
    .await;
    slow.answer.notify_one();

    let reply = tokio::time::timeout(T, request)
        .await
        .unwrap_or_else(|_| panic!("no reply within {T:?}; {}", nodes.log_tails(30)))
        .expect("the request task")
        .unwrap_or_else(|e| panic!("the request failed: {e}; {}", nodes.log_tails(30)));
    assert_eq!(reply.name(), "slow.answer");
    assert_eq!(
        reply.json::<String>().expect("a JSON string"),
        "still there?"
    );

    let node_a = nodes.start_node("a");
    nodes.a = node_a;
    for client in [&slow.client, &asker] {
        client.shutdown().await;
    }
}

/// A reply whose requester's node died, with no instance of the
/// requesting service anywhere, is accepted and kept in the cluster — not
/// in the memory of the node it went through — and reaches the requester
/// when it comes back.
async fn a_reply_nobody_can_take_waits_in_the_cluster_for_its_requester(nodes: &mut Nodes) {
    let keeper = held_responder(&nodes.b, "keeper").await;
    // Given node a alone: it cannot move anywhere while node a is down.
    let node_a_addr = nodes.a.addr.clone();
    let mut o = opts(&nodes.a, "lonely");
    o.send_timeout = T;
    let lonely = connect(o).await;
    let request = request_task(&lonely, "keeper.ask", "kept?", T * 2);
    tokio::time::timeout(T, keeper.asked.notified())
        .await
        .expect("the command reached the responder on node b");
    nodes.a.child.kill().expect("kill -9 node a");
    nodes.a.child.wait().expect("reap node a");
    keeper.answer.notify_one();
    wait_for_async("the responder's reply answered", T, || {
        let replied = keeper
            .replied
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        async move { replied }
    })
    .await;
    assert_eq!(
        keeper
            .replied
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_deref(),
        Some("ok"),
        "a reply with nobody to take it is accepted"
    );
    // Node b, which had it, dies too: the reply is not in its memory.
    nodes.b.child.kill().expect("kill -9 node b");
    nodes.b.child.wait().expect("reap node b");
    nodes.a = nodes.start_node_on("a", &node_a_addr);
    let reply = tokio::time::timeout(T, request)
        .await
        .unwrap_or_else(|_| panic!("no reply within {T:?}; {}", nodes.log_tails(30)))
        .expect("the request task")
        .unwrap_or_else(|e| panic!("the request failed: {e}; {}", nodes.log_tails(30)));
    assert_eq!(reply.name(), "keeper.answer");
    assert_eq!(reply.json::<String>().expect("a JSON string"), "kept?");

    nodes.b = nodes.start_node("b");
    keeper.client.shutdown().await;
    lonely.shutdown().await;
}
