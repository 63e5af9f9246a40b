//! The fault loop of docs/SCALE-OUT.md §17 on two Courier nodes and a
//! real three-server NATS JetStream cluster: under a steady load of
//! durable commands (a quarter of them keyed), cycle after cycle kills,
//! freezes and restarts nats-servers and Courier nodes by the PIDs this
//! test started; then every acknowledged command must be delivered, no
//! duplicate may lack a fault to explain it, and no key's messages may be
//! handled out of order (the checker in `fault_checker`, whose rules are
//! written there).
//!
//! `cargo test -p courier-cli --test cluster_fault_loop_e2e checker` runs
//! the checker's own tests alone, without a cluster.

mod cluster_common;
mod common;
mod fault_checker;

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cluster_common::Nodes;
use courier_client::{Client, ClientOptions, ConnectionEvent, Incoming};
use fault_checker::{Delivery, Fault, History, Sent};
use uuid::Uuid;

/// The ack deadline of `orders`: short, so that what a fault strands comes
/// back within a cycle or two.
const ACK_DEADLINE: Duration = Duration::from_secs(2);
/// Attempts before a dead letter: more than a message can meet in the
/// loop, so that none is dead-lettered on the way.
const MAX_DELIVERIES: u32 = 100;
/// Cycles at the least; more while `LOOP_TIME` lasts.
const CYCLES_MIN: usize = 50;
const LOOP_TIME: Duration = Duration::from_secs(150);
const SENDERS: u32 = 2;
const KEYS: u64 = 8;
/// Between one sender's acknowledged send and its next, so that the load
/// leaves the two cores to the cluster's recovery.
const SEND_PAUSE: Duration = Duration::from_millis(10);
/// How long one send may wait for the broker's acknowledgement before it
/// is sent again with the same id.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one command may take to be acknowledged, retries included.
const SEND_WITHIN: Duration = Duration::from_secs(90);
/// How long the drain after the last cycle may take: a keyed lane whose
/// holder died waits for the lease to age out (10 s) and the ack deadline.
const DRAIN_WITHIN: Duration = Duration::from_secs(60);
/// A node stopped this long loses its leases: their keys age out after
/// 10 s, and another node takes them.
const LEASE_OUTLIVED: Duration = Duration::from_secs(12);
/// How long an ack may take from a handler to JetStream, at most, for the
/// checker's rule on duplicates (a loaded debug build on two cores).
const ACK_SLACK: Duration = Duration::from_secs(1);

/// What the clients record, timed from one start.
struct Log {
    start: Instant,
    /// Sends acknowledged so far.
    acknowledged: AtomicUsize,
    deliveries: Mutex<Vec<Delivery>>,
    disconnects: Mutex<Vec<(String, Duration)>>,
}

impl Log {
    fn now(&self) -> Duration {
        self.start.elapsed()
    }

    fn deliveries(&self) -> Vec<Delivery> {
        self.deliveries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}

/// Sends tried again: (sender, why the try failed, when).
type Retries = Arc<Mutex<Vec<(u32, String, Duration)>>>;

/// Retries as runs of one sender and one reason with gaps under 2 s
/// (where the load stalled), the runs longer than a second, with the
/// fault under way when each began.
fn stalls(retries: &[(u32, String, Duration)], faults: &[Fault]) -> Vec<String> {
    let mut runs: Vec<(u32, String, Duration, Duration, usize)> = Vec::new();
    for (sender, reason, at) in retries {
        match runs
            .iter_mut()
            .rev()
            .find(|r| r.0 == *sender && r.1 == *reason)
        {
            Some(run) if *at - run.3 < Duration::from_secs(2) => {
                run.3 = *at;
                run.4 += 1;
            }
            _ => runs.push((*sender, reason.clone(), *at, *at, 1)),
        }
    }
    runs.iter()
        .filter(|r| r.3 - r.2 > Duration::from_secs(1))
        .map(|(sender, reason, from, to, n)| {
            let during = faults.iter().rev().find(|f| f.start <= *from).map_or_else(
                || "before the first fault".to_string(),
                |f| format!("cycle {} {}", f.cycle, f.what),
            );
            format!("sender {sender}: {n} x {reason} from {from:?} to {to:?} (after {during})")
        })
        .collect()
}

/// What a command carries, for the checker.
#[derive(serde::Serialize, serde::Deserialize)]
struct Order {
    sender: u32,
    key: Option<u32>,
    seq: u64,
}

fn options(url: &str, service: &str, instance: &str) -> ClientOptions {
    let mut o = ClientOptions::new(url, service);
    o.instance = instance.to_string();
    o.reconnect_delay_max = Duration::from_millis(200);
    o.send_timeout = SEND_TIMEOUT;
    o
}

async fn connect(o: ClientOptions) -> Client {
    let url = o.url.clone();
    Client::connect(o)
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"))
}

/// Records every time `client`'s connection drops.
fn watch_connection(client: &Client, name: &str, log: &Arc<Log>) {
    let mut events = client.connection_events();
    let (name, log) = (name.to_string(), log.clone());
    tokio::spawn(async move {
        while let Some(event) = events.next().await {
            if let ConnectionEvent::Lost { .. } = event {
                let at = log.now();
                log.disconnects
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .push((name.clone(), at));
            }
        }
    });
}

/// An instance of `orders` that records each delivery, then acks it.
async fn instance(url: &str, name: &str, log: &Arc<Log>) -> Client {
    let mut o = options(url, "orders", name);
    o.ack_deadline = Some(ACK_DEADLINE);
    o.max_deliveries = Some(MAX_DELIVERIES);
    let client = connect(o).await;
    watch_connection(&client, name, log);
    let (name, log) = (name.to_string(), log.clone());
    client
        .on("orders.place", move |msg: Incoming| {
            let (name, log) = (name.clone(), log.clone());
            async move {
                let order: Order = msg.json()?;
                let mut deliveries = log
                    .deliveries
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                // Timed under the lock: the record order is the time order.
                let at = log.now();
                deliveries.push(Delivery {
                    instance: name,
                    id: msg.message().id,
                    attempt: msg.attempt(),
                    sender: order.sender,
                    key: order.key,
                    seq: order.seq,
                    at,
                });
                Ok::<(), courier_client::Error>(())
            }
        })
        .await
        .expect("subscribe orders.place");
    client
}

/// Sends commands until `stop`, each until acknowledged (again with the
/// same id after a refusal or a timeout); returns the acknowledged ones,
/// or what kept one from being acknowledged in time.
async fn send_orders(
    client: Client,
    sender: u32,
    log: Arc<Log>,
    stop: Arc<AtomicBool>,
    retries: Retries,
) -> (Vec<Sent>, Option<String>) {
    let mut next_seq = [0u64; KEYS as usize + 1];
    let mut acknowledged = Vec::new();
    let mut n: u64 = 0;
    while !stop.load(Ordering::Acquire) {
        let key = n
            .is_multiple_of(4)
            .then(|| ((n / 4 + u64::from(sender) * 3) % KEYS) as u32);
        let slot = key.map_or(KEYS as usize, |k| k as usize);
        let seq = next_seq[slot];
        let order = Order { sender, key, seq };
        let id = Uuid::now_v7();
        let started = Instant::now();
        loop {
            let mut message = match client.command("orders.place").id(id).json(&order) {
                Ok(message) => message,
                Err(e) => return (acknowledged, Some(e.to_string())),
            };
            if let Some(key) = key {
                message = message.key(format!("k{key}"));
            }
            match message.send().await {
                Ok(_) => break,
                Err(e) if started.elapsed() < SEND_WITHIN => {
                    let reason = e
                        .code()
                        .map_or_else(|| e.to_string(), |code| format!("{code:?}"));
                    let at = log.now();
                    retries
                        .lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner())
                        .push((sender, reason, at));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => {
                    let why = format!(
                        "sender {sender}: command {id} (key {key:?}, seq {seq}) not acknowledged within {SEND_WITHIN:?}: {e}"
                    );
                    return (acknowledged, Some(why));
                }
            }
        }
        acknowledged.push(Sent {
            id,
            sender,
            key,
            seq,
            at: log.now(),
        });
        log.acknowledged.fetch_add(1, Ordering::Relaxed);
        next_seq[slot] += 1;
        n += 1;
        tokio::time::sleep(SEND_PAUSE).await;
    }
    (acknowledged, None)
}

fn signal(signal: &str, pid: u32) {
    let status = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill {signal} {pid} failed");
}

/// Node `a` (0) or `b` (1).
fn node(nodes: &mut Nodes, i: usize) -> &mut common::Broker {
    if i == 0 {
        &mut nodes.a
    } else {
        &mut nodes.b
    }
}

const NODE_IDS: [&str; 2] = ["a", "b"];

/// The node that holds the keyed lane of `orders` now, if one does.
async fn keyed_lane_holder(cluster: &cluster_common::nats::NatsCluster) -> Option<usize> {
    let connection = cluster.connect("fault-loop").await;
    let leases = connection
        .jetstream
        .get_key_value(courier_cluster::names::LEASES_BUCKET)
        .await
        .ok()?;
    let lease = courier_cluster::names::keyed_lane_lease("orders");
    let (value, _) = courier_cluster::lease::holder(&leases, &lease)
        .await
        .ok()??;
    NODE_IDS.iter().position(|id| *id == value.node)
}
/// A node start slower than this is reported with what the node logged.
const SLOW_START: Duration = Duration::from_secs(5);

fn kill_node(nodes: &mut Nodes, i: usize) {
    let child = &mut node(nodes, i).child;
    let _ = child.kill();
    let _ = child.wait();
}

/// Starts node `i` again on its address and flags; keeps the dead one's
/// log in `past_logs`.
fn restart_node(nodes: &mut Nodes, i: usize, past_logs: &mut Vec<(String, common::StderrLog)>) {
    let id = NODE_IDS[i];
    if let Some(log) = nodes.logs.get(id) {
        past_logs.push((id.to_string(), log.clone()));
    }
    let addr = node(nodes, i).addr.clone();
    let started = Instant::now();
    let fresh = tokio::task::block_in_place(|| nodes.start_node_on(id, &addr));
    *node(nodes, i) = fresh;
    // A slow start is where a cycle's time goes: say what the node did.
    if started.elapsed() > SLOW_START {
        let said = nodes
            .logs
            .get(id)
            .map(common::StderrLog::text)
            .filter(|text| !text.is_empty())
            .unwrap_or_else(|| "nothing (at level info)".to_string());
        eprintln!(
            "node {id} took {:?} to start again; before its ready line it said {said}",
            started.elapsed()
        );
    }
}

/// Runs fault `cycle` (round-robin over the five of §17; the server and
/// the node hit move on every round); returns what it did.
async fn fault(
    nodes: &mut Nodes,
    cycle: usize,
    past_logs: &mut Vec<(String, common::StderrLog)>,
) -> String {
    let round = cycle / 5;
    let server = round % nodes.cluster.server_count();
    let n = round % 2;
    match cycle % 5 {
        0 => {
            nodes.cluster.kill9(server);
            tokio::time::sleep(Duration::from_secs(1)).await;
            nodes.cluster.restart(server).await;
            format!("kill -9 server n{}", server + 1)
        }
        1 => {
            kill_node(nodes, n);
            tokio::time::sleep(Duration::from_millis(500)).await;
            restart_node(nodes, n, past_logs);
            format!("kill -9 node {}", NODE_IDS[n])
        }
        2 => {
            nodes.cluster.kill9(server);
            kill_node(nodes, n);
            tokio::time::sleep(Duration::from_secs(1)).await;
            nodes.cluster.restart(server).await;
            restart_node(nodes, n, past_logs);
            format!("kill -9 server n{} and node {}", server + 1, NODE_IDS[n])
        }
        3 => {
            // Every other round, the keyed lane's holder past its lease
            // (10 s max age): the other node takes the lane while this one
            // sleeps, and this one must give it up when it wakes.
            let (n, stopped_for, what) = if round % 2 == 1 {
                match keyed_lane_holder(&nodes.cluster).await {
                    Some(holder) => (holder, LEASE_OUTLIVED, " (the keyed lane's holder)"),
                    None => (n, LEASE_OUTLIVED, " (no keyed lane holder found)"),
                }
            } else {
                (n, ACK_DEADLINE + Duration::from_secs(1), "")
            };
            let pid = node(nodes, n).child.id();
            signal("-STOP", pid);
            tokio::time::sleep(stopped_for).await;
            signal("-CONT", pid);
            format!("kill -STOP node {}{what} for {stopped_for:?}", NODE_IDS[n])
        }
        _ => {
            let pid = nodes.cluster.pid(server).expect("the server runs");
            signal("-STOP", pid);
            tokio::time::sleep(Duration::from_secs(2)).await;
            signal("-CONT", pid);
            nodes.cluster.wait_formed().await;
            format!("kill -STOP server n{}", server + 1)
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_fault_loop_loses_reorders_and_doubles_nothing_unexplained() {
    let run_started = Instant::now();
    let mut nodes = Nodes::start_watched().await;
    let log = Arc::new(Log {
        start: Instant::now(),
        acknowledged: AtomicUsize::new(0),
        deliveries: Mutex::default(),
        disconnects: Mutex::default(),
    });
    let (a, b) = (nodes.a.addr.clone(), nodes.b.addr.clone());
    let a_first = format!("{a},{b}");
    let b_first = format!("{b},{a}");
    let instances = [
        instance(&a_first, "orders-1", &log).await,
        instance(&b_first, "orders-2", &log).await,
    ];
    for node in [&nodes.a, &nodes.b] {
        tokio::task::block_in_place(|| node.wait_consumers("orders", 1, None));
    }

    let stop = Arc::new(AtomicBool::new(false));
    let retries = Retries::default();
    let mut senders = Vec::new();
    let mut sender_clients = Vec::new();
    for sender in 0..SENDERS {
        let url = if sender == 0 { &a_first } else { &b_first };
        let name = format!("shop-{sender}");
        let client = connect(options(url, &name, &name)).await;
        watch_connection(&client, &name, &log);
        sender_clients.push(client.clone());
        senders.push(tokio::spawn(send_orders(
            client,
            sender,
            log.clone(),
            stop.clone(),
            retries.clone(),
        )));
    }
    eprintln!(
        "cluster, nodes and clients up in {:?}",
        run_started.elapsed()
    );

    let loop_started = Instant::now();
    let mut faults = Vec::new();
    let mut past_logs = Vec::new();
    let mut cycle = 0;
    while cycle < CYCLES_MIN || loop_started.elapsed() < LOOP_TIME {
        let start = log.now();
        let what = fault(&mut nodes, cycle, &mut past_logs).await;
        let end = log.now();
        eprintln!(
            "cycle {cycle}: {what} ({:?}); so far {} acknowledged, {} delivered",
            end - start,
            log.acknowledged.load(Ordering::Relaxed),
            log.deliveries().len()
        );
        faults.push(Fault {
            cycle,
            what,
            start,
            end,
        });
        cycle += 1;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let loop_time = loop_started.elapsed();
    eprintln!(
        "{cycle} cycles in {loop_time:?} ({:?} a cycle)",
        loop_time / cycle as u32
    );

    // No more faults: the senders finish their last command, then every
    // acknowledged one must arrive.
    stop.store(true, Ordering::Release);
    let mut acknowledged = Vec::new();
    let mut failures = Vec::new();
    for (sender, task) in senders.into_iter().enumerate() {
        let sent = tokio::time::timeout(SEND_WITHIN + Duration::from_secs(10), task)
            .await
            .unwrap_or_else(|_| panic!("sender {sender} did not finish; {}", nodes.log_tails(40)))
            .expect("the sender task");
        // A sender that gave up is reported after the checker's line, with
        // what it had acknowledged until then checked as the rest.
        let (sent, failure) = sent;
        acknowledged.extend(sent);
        failures.extend(failure);
    }
    let drain_started = Instant::now();
    let wanted: std::collections::BTreeSet<Uuid> = acknowledged.iter().map(|s| s.id).collect();
    loop {
        let got: std::collections::BTreeSet<Uuid> = log.deliveries().iter().map(|d| d.id).collect();
        if wanted.is_subset(&got) || drain_started.elapsed() > DRAIN_WITHIN {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let drained_in = drain_started.elapsed();
    // Repeats of what was in flight at the end come within a deadline.
    tokio::time::sleep(ACK_DEADLINE + Duration::from_secs(1)).await;

    let history = History {
        acknowledged,
        deliveries: log.deliveries(),
        faults,
        disconnects: log
            .disconnects
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone(),
        cycles: cycle,
    };
    let verdict = fault_checker::check(&history, ACK_SLACK);
    let retries = retries
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .clone();
    let mut retry_reasons = std::collections::BTreeMap::<&str, usize>::new();
    for (_, reason, _) in &retries {
        *retry_reasons.entry(reason).or_default() += 1;
    }
    for stall in stalls(&retries, &history.faults) {
        eprintln!("stalled: {stall}");
    }
    let connected: Vec<String> = instances
        .iter()
        .chain(&sender_clients)
        .map(|c| {
            format!(
                "{} {}",
                if c.is_connected() { "on" } else { "off" },
                c.broker_address()
            )
        })
        .collect();
    eprintln!(
        "orders: {verdict}\n  drained in {drained_in:?}; {} deliveries, {} late repeats, {} delivered ids never acknowledged, sends retried {:?}, {} disconnects; clients at the end: {connected:?}; whole run {:?}",
        verdict.deliveries,
        verdict.late_repeats,
        verdict.unsent.len(),
        retry_reasons,
        history.disconnects.len(),
        run_started.elapsed()
    );
    for failure in &failures {
        eprintln!("gave up: {failure}");
    }
    if !verdict.passed() || !failures.is_empty() {
        let past: Vec<String> = past_logs
            .iter()
            .map(|(id, log)| {
                let warnings: Vec<String> = log
                    .lines()
                    .into_iter()
                    .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                    .collect();
                let tail = &warnings[warnings.len().saturating_sub(10)..];
                format!("--- node {id}, an earlier run ---\n{}", tail.join("\n"))
            })
            .collect();
        let lost: std::collections::BTreeSet<Uuid> = verdict.lost.iter().map(|s| s.id).collect();
        eprintln!("{}", where_lost_ones_are(&nodes.cluster, &lost).await);
        eprintln!(
            "{}\n{}\n{}",
            verdict.details(&history, 20),
            past.join("\n"),
            nodes.log_tails(40)
        );
    }
    for client in instances.iter().chain(&sender_clients) {
        client.shutdown().await;
    }
    assert!(cycle >= CYCLES_MIN);
    assert!(
        failures.is_empty(),
        "commands not acknowledged in time (the bus stalled): {failures:?}"
    );
    assert!(
        verdict.lost.is_empty(),
        "{} acknowledged commands never delivered",
        verdict.lost.len()
    );
    assert!(
        verdict.unexplained.is_empty(),
        "{} repeats no fault explains",
        verdict.unexplained.len()
    );
    assert!(
        verdict.out_of_order.is_empty(),
        "{} keyed deliveries out of order",
        verdict.out_of_order.len()
    );
}

/// Where the lost commands are: in the log or not, at which seqs, and
/// each consumer's position — a message never stored, one a consumer
/// has passed, and one it still holds look different here.
async fn where_lost_ones_are(
    cluster: &cluster_common::nats::NatsCluster,
    lost: &std::collections::BTreeSet<Uuid>,
) -> String {
    use async_nats::jetstream::consumer::pull::OrderedConfig;
    use futures_util::StreamExt as _;
    if lost.is_empty() {
        return String::new();
    }
    let connection = cluster.connect("fault-checker").await;
    let mut lines = Vec::new();
    let mut stream = match connection.jetstream.get_stream("COURIER_MSGS").await {
        Ok(stream) => stream,
        Err(e) => return format!("COURIER_MSGS: {e}"),
    };
    let last = match stream.info().await {
        Ok(info) => {
            lines.push(format!("COURIER_MSGS: {:?}", info.state));
            info.state.last_sequence
        }
        Err(e) => return format!("COURIER_MSGS info: {e}"),
    };
    let mut consumers = stream.consumers();
    while let Some(consumer) = consumers.next().await {
        match consumer {
            Ok(c) => lines.push(format!(
                "consumer {}: delivered {}, ack floor {}, ack pending {}, pending {}, redelivered {}, waiting {}, paused {}, leader {:?}",
                c.name,
                c.delivered.stream_sequence,
                c.ack_floor.stream_sequence,
                c.num_ack_pending,
                c.num_pending,
                c.num_redelivered,
                c.num_waiting,
                c.paused,
                c.cluster.and_then(|c| c.leader)
            )),
            Err(e) => lines.push(format!("a consumer's info: {e}")),
        }
    }
    let scan = stream
        .create_consumer(OrderedConfig::default())
        .await
        .expect("an ordered consumer over COURIER_MSGS");
    let mut messages = scan.messages().await.expect("its messages");
    let mut found = 0;
    while let Ok(Some(Ok(message))) =
        tokio::time::timeout(Duration::from_secs(5), messages.next()).await
    {
        let Ok(info) = message.info() else { continue };
        let seq = info.stream_sequence;
        let id = message
            .headers
            .as_ref()
            .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
            .and_then(|v| Uuid::parse_str(v.as_str()).ok());
        if let Some(id) = id.filter(|id| lost.contains(id)) {
            found += 1;
            if found <= 20 {
                lines.push(format!(
                    "lost {id}: in the log at seq {seq} on {}",
                    message.subject
                ));
            }
        }
        if seq >= last {
            break;
        }
    }
    lines.push(format!(
        "{found} of the {} lost commands are in the log",
        lost.len()
    ));
    lines.join("\n")
}
