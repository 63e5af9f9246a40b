//! Courier nodes on a real NATS JetStream cluster: three nats-servers on
//! loopback ports (`sync_interval: always`) and two `courier serve
//! --backend nats://…` processes, with clients spread across both nodes,
//! as a user runs them (docs/SCALE-OUT.md §19).

mod cluster_common;
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use courier_client::proto::{decode_frame, ErrorCode, Frame, FrameWriter, Kind, Message};
use uuid::Uuid;

use cluster_common::{send_when_routed, until_received, Nodes};
use common::*;
use futures_util::TryStreamExt as _;

const T: Duration = Duration::from_secs(30);

/// One check run on the shared nodes.
type Scenario = fn(&Nodes);

/// One cluster and two nodes for every scenario: a cluster takes seconds
/// to form, and three at once on one machine race for ports.
#[tokio::test(flavor = "multi_thread")]
async fn two_nodes_serve_one_bus() {
    let nodes = Nodes::start().await;
    let scenarios: [(&str, Scenario); 15] = [
        (
            "request and reply",
            a_command_sent_through_one_node_is_answered_from_the_other,
        ),
        (
            "reply through another node",
            a_reply_through_a_node_that_never_saw_the_command_reaches_the_requester,
        ),
        (
            "reply stream across nodes",
            a_reply_stream_from_another_node_is_paced_by_the_requesters_window,
        ),
        (
            "fan-out and competing",
            events_reach_every_service_and_commands_one_instance_of_it,
        ),
        (
            "dedup",
            a_resend_through_the_other_node_is_dropped_as_a_duplicate,
        ),
        ("keyed lane", keyed_messages_go_in_order_across_nodes),
        ("history replay", history_is_replayed_to_a_new_subscription),
        (
            "one pattern paused",
            a_pattern_paused_alone_waits_and_comes_in_order,
        ),
        (
            "keyed retry past the ack deadline",
            a_keyed_retry_longer_than_the_ack_deadline_is_delivered_once_in_order,
        ),
        (
            "deferred and expiring",
            deferred_messages_wait_and_expired_ones_are_dropped,
        ),
        (
            "transient",
            transient_messages_reach_instances_on_other_nodes,
        ),
        (
            "sampled traces",
            a_delivering_node_traces_only_what_the_accepting_node_picked,
        ),
        ("manifest", the_manifests_rules_hold_on_every_node),
        ("tail", a_tail_on_one_node_sees_what_every_node_accepts),
        ("registry", the_registry_is_one_on_every_node),
    ];
    for (name, scenario) in scenarios
        .into_iter()
        .filter(|(n, _)| std::env::var("ONLY").map_or(true, |o| o == *n))
    {
        let started = Instant::now();
        scenario(&nodes);
        eprintln!("{name}: {:?}", started.elapsed());
    }
}

fn a_command_sent_through_one_node_is_answered_from_the_other(nodes: &Nodes) {
    // Servers that sync before they acknowledge: durability as one node's.
    let http = nodes.a.http.as_deref().expect("node a's HTTP port");
    let (_, metrics) = http_get(http, "/metrics", None);
    assert_eq!(metric(&metrics, "courier_durability_weaker"), Some(0.0));

    let responder = nodes.a.spawn(&[
        "reply",
        "todo.create",
        "--service",
        "todo",
        "--outcome",
        "todo.created",
        "--echo",
    ]);
    responder.wait_stderr("replying to todo.create", T);
    let out = send_when_routed(
        &nodes.b,
        &[
            "request",
            "todo.create",
            "--service",
            "web",
            "--data",
            r#"{"text":"milk"}"#,
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let replies = json_lines(&out);
    assert_eq!(replies.len(), 1, "{replies:?}");
    assert_eq!(replies[0]["sender"], "todo");
    assert_eq!(replies[0]["payload"]["text"], "milk");
    assert_eq!(replies[0]["final"], true);
    // One trace of it, asked on either node: the command accepted on b,
    // its delivery and ack on a, the reply accepted on a.
    let activity = replies[0]["activity_id"].as_str().expect("activity id");
    for node in [&nodes.b, &nodes.a] {
        let deadline = Instant::now() + T;
        let tree = loop {
            let out = node.run(&["trace", activity, "--json"]);
            assert!(out.status.success(), "{}", stderr(&out));
            let tree: serde_json::Value =
                serde_json::from_slice(&out.stdout).expect("the tree is JSON");
            if tree["roots"][0]["deliveries"][0]["outcome"] == "acked" {
                break tree;
            }
            assert!(Instant::now() < deadline, "no whole trace: {tree}");
            std::thread::sleep(Duration::from_millis(200));
        };
        let command = &tree["roots"][0];
        assert_eq!(command["name"], "todo.create", "{tree}");
        assert_eq!(command["deliveries"][0]["service"], "todo", "{tree}");
        assert_eq!(command["children"][0]["name"], "todo.created", "{tree}");
        assert_eq!(tree["messages"], 2, "{tree}");
        assert!(tree.get("partial").is_none(), "{tree}");
    }
    let out = nodes.a.run(&["trace", "--name", "todo.create"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let listed = json_lines(&out);
    let entry = listed
        .iter()
        .find(|a| a["activity_id"] == activity)
        .unwrap_or_else(|| panic!("the activity is listed: {listed:?}"));
    assert_eq!(entry["messages"], 2, "{entry}");
    assert_eq!(
        entry["outcomes"],
        serde_json::json!(["todo.created"]),
        "{entry}"
    );

    // The traffic pages add both nodes' counters: b counted web's send,
    // a the delivery to todo and its ack; the edge web → todo needs both.
    for node in [&nodes.a, &nodes.b] {
        let http = node.http.as_deref().expect("the node's HTTP port");
        let deadline = Instant::now() + T;
        loop {
            let (status, body) = http_get(http, "/v1/topology", None);
            assert_eq!(status, 200, "{body}");
            let page: serde_json::Value = serde_json::from_str(&body).expect("JSON");
            assert!(page.get("partial").is_none(), "{page}");
            let edge = page["edges"].as_array().and_then(|edges| {
                edges
                    .iter()
                    .find(|e| e["from"] == "web" && e["to"] == "todo" && e["name"] == "todo.create")
            });
            if edge.is_some() {
                break;
            }
            assert!(Instant::now() < deadline, "no edge web → todo: {page}");
            std::thread::sleep(Duration::from_millis(200));
        }
        let (status, body) = http_get(http, "/v1/names", None);
        assert_eq!(status, 200, "{body}");
        let page: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        let create = page["names"]
            .as_array()
            .and_then(|names| names.iter().find(|n| n["name"] == "todo.create"))
            .unwrap_or_else(|| panic!("no todo.create: {page}"));
        let totals = &create["totals"];
        assert!(totals["sent"].as_u64() >= Some(1), "{create}");
        assert!(totals["delivered"].as_u64() >= Some(1), "{create}");
        assert!(totals["acked"].as_u64() >= Some(1), "{create}");
        assert!(
            create["reply_latency"]["count"].as_u64() >= Some(1),
            "{create}"
        );
    }

    // And through the responder's own node.
    let out = nodes.a.run(&[
        "request",
        "todo.create",
        "--service",
        "web",
        "--data",
        r#"{"text":"bread"}"#,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(json_lines(&out)[0]["payload"]["text"], "bread");
}

/// One reply sent by a raw client of `service` connected to `addr`, and
/// the broker's answer to it.
fn raw_reply(addr: &str, service: &str, command: Uuid, is_final: bool) -> (ErrorCode, String) {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(T)).expect("read timeout");
    stream
        .write_all(&common::hello_frame(service))
        .expect("hello");
    let mut w = FrameWriter::new();
    let mut reply = Message::new(Kind::Reply, "ledger.posted", r#"{"posted":true}"#);
    reply.response_to = Some(command);
    reply.is_final = is_final;
    w.push_send(1, &reply).expect("encode");
    stream.write_all(&w.take()).expect("send");
    let mut buf = BytesMut::new();
    let mut chunk = [0u8; 4096];
    loop {
        while let Some(frame) = decode_frame(&mut buf, u32::MAX).expect("frames decode") {
            match frame {
                Frame::SendResult(mut outcomes) => {
                    let outcome = outcomes.remove(0);
                    return (outcome.code, outcome.reason);
                }
                Frame::Error(e) => panic!("the node closed the connection: {}", e.message),
                _ => {}
            }
        }
        match stream.read(&mut chunk) {
            Ok(0) => panic!("the node closed the connection"),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => panic!("no answer to the reply: {e}"),
        }
    }
}

/// A replier that reconnected to another node while handling a command
/// replies there: that node never saw the command, asks the others, and
/// the reply reaches the requester; only the receiving service may reply.
/// Runs `work` to completion on a runtime of its own (a scenario runs
/// on the test's runtime, which it may not block on).
fn on_own_runtime<T: Send>(work: impl std::future::Future<Output = T> + Send) -> T {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("a runtime")
                    .block_on(work)
            })
            .join()
            .expect("the scenario's thread")
    })
}

/// A flow-controlled reply stream whose responder is on node a and whose
/// requester is on node b: the window is the requester's, on b, and the
/// responder, awaiting each reply's answer, is paced by the requester's
/// reading as on one broker.
fn a_reply_stream_from_another_node_is_paced_by_the_requesters_window(nodes: &Nodes) {
    use cluster_common::sdk::{connect, opts};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    const WINDOW: u32 = 2;
    const REPLIES: u64 = 20;
    on_own_runtime(async {
        let responder = connect(opts(&nodes.a, "copier")).await;
        let sent = Arc::new(AtomicU64::new(0));
        let counter = sent.clone();
        responder
            .on("copy.run", move |msg| {
                let counter = counter.clone();
                async move {
                    for i in 0..REPLIES {
                        msg.reply_builder("copy.progress", i + 1 == REPLIES)
                            .payload(i.to_string())
                            .send()
                            .await?;
                        counter.store(i + 1, Ordering::Relaxed);
                    }
                    Ok::<(), courier_client::Error>(())
                }
            })
            .await
            .expect("subscribe copy.run");
        let mut o = opts(&nodes.b, "copyweb");
        o.reply_window = WINDOW;
        let requester = connect(o).await;
        let deadline = Instant::now() + T;
        let mut stream = loop {
            match requester.request_stream("copy.run", &()).await {
                Ok(stream) => break stream,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("not routed yet: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("request_stream: {e}"),
            }
        };
        let mut next = 0u64;
        while let Some(reply) = tokio::time::timeout(T, stream.next_reply())
            .await
            .expect("the next reply within 30 s")
        {
            let reply = reply.unwrap_or_else(|e| panic!("reply {next}: {e}"));
            assert_eq!(reply.payload().as_ref(), next.to_string().as_bytes());
            assert_eq!(reply.is_final(), next + 1 == REPLIES);
            next += 1;
            if next <= 4 {
                // A slow reader at first: the responder must wait for it.
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            if next == 4 {
                let ahead = sent.load(Ordering::Relaxed);
                assert!(
                    ahead <= next + 2 * u64::from(WINDOW) + 1,
                    "the responder on node a ran {ahead} replies ahead of a requester on node b at {next}: the window does not pace it"
                );
            }
        }
        assert_eq!(next, REPLIES, "every reply, in order");
        // The final reply's answer reaches the responder after the reply
        // reached the requester: through node b, NATS and node a.
        let answered_by = Instant::now() + T;
        while sent.load(Ordering::Relaxed) < REPLIES {
            assert!(
                Instant::now() < answered_by,
                "the responder heard {} of {REPLIES} answers",
                sent.load(Ordering::Relaxed)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        requester.shutdown().await;
        responder.shutdown().await;
    });
}

fn a_reply_through_a_node_that_never_saw_the_command_reaches_the_requester(nodes: &Nodes) {
    let ledger = nodes
        .a
        .spawn(&["subscribe", "ledger.post", "--service", "ledger"]);
    // In force once a probe came through (a command accepted before the
    // service's consumer exists does not reach it).
    let deadline = Instant::now() + T;
    while ledger.try_json_line(Duration::from_millis(300)).is_none() {
        assert!(Instant::now() < deadline, "no probe reached ledger");
        let probe = nodes
            .a
            .run(&["send", "ledger.post", "--data", r#""probe""#]);
        assert!(
            probe.status.success() || stderr(&probe).contains("no_receiver"),
            "{}",
            stderr(&probe)
        );
    }
    let mut requester = nodes.a.spawn(&[
        "request",
        "ledger.post",
        "--service",
        "shop",
        "--timeout",
        "30s",
        "--data",
        r#"{"amount":5}"#,
    ]);
    let delivered = loop {
        let m = ledger.json_line(T);
        if m["payload"] != "probe" {
            break m;
        }
    };
    assert_eq!(delivered["payload"]["amount"], 5);
    let command: Uuid = delivered["id"]
        .as_str()
        .and_then(|id| id.parse().ok())
        .expect("the command's id");

    let (code, reason) = raw_reply(&nodes.b.addr, "mallory", command, true);
    assert_eq!(code, ErrorCode::Unauthorized, "{reason}");
    let (code, reason) = raw_reply(&nodes.b.addr, "ledger", command, true);
    assert_eq!(code, ErrorCode::Ok, "{reason}");
    assert_eq!(
        requester.wait_exit(T),
        Some(0),
        "the requester got its reply"
    );
    let replies = requester.rest(T);
    assert_eq!(replies.len(), 1, "{replies:?}");
    assert_eq!(replies[0]["name"], "ledger.posted");
    assert_eq!(replies[0]["sender"], "ledger");
    assert_eq!(replies[0]["payload"]["posted"], true);
    // The final reply ended the command: no node knows it any more.
    let (code, reason) = raw_reply(&nodes.b.addr, "ledger", command, true);
    assert_eq!(code, ErrorCode::UnknownRequest, "{reason}");
}

fn events_reach_every_service_and_commands_one_instance_of_it(nodes: &Nodes) {
    let audit = nodes
        .a
        .spawn(&["subscribe", "order.*", "--service", "audit"]);
    let mail = nodes
        .b
        .spawn(&["subscribe", "order.*", "--service", "mail"]);
    until_received(&nodes.b, &audit, "order.probe");
    until_received(&nodes.a, &mail, "order.probe");
    // Instances of one service on both nodes share its commands.
    let work_a = nodes.a.spawn(&["subscribe", "job.*", "--service", "work"]);
    nodes.a.wait_consumers("work", 1, None);
    let work_b = nodes.b.spawn(&["subscribe", "job.*", "--service", "work"]);
    nodes.b.wait_consumers("work", 1, None);
    // In force on both nodes once each instance has had a probe: each
    // node fetches for its own instance as soon as the service's consumer
    // exists.
    let probe_deadline = Instant::now() + T;
    let (mut probed_a, mut probed_b) = (false, false);
    while !(probed_a && probed_b) {
        assert!(
            Instant::now() < probe_deadline,
            "job probes reached a: {probed_a}, b: {probed_b}"
        );
        assert!(nodes.a.run(&["publish", "job.probe"]).status.success());
        probed_a |= work_a.try_json_line(Duration::from_millis(100)).is_some();
        probed_b |= work_b.try_json_line(Duration::from_millis(100)).is_some();
    }
    // The console on either node shows both instances, each with its node.
    for node in [&nodes.a, &nodes.b] {
        let http = node.http.as_deref().expect("the node's HTTP port");
        let (status, body) = http_get(http, "/v1/services", None);
        assert_eq!(status, 200, "{body}");
        let page: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        let work = page["services"]
            .as_array()
            .and_then(|s| s.iter().find(|s| s["name"] == "work"))
            .unwrap_or_else(|| panic!("no work row: {page}"));
        let mut on: Vec<&str> = work["instances"]
            .as_array()
            .expect("instances")
            .iter()
            .filter_map(|i| i["node"].as_str())
            .collect();
        on.sort();
        assert_eq!(on, vec!["a", "b"], "{work}");
        assert!(page.get("partial").is_none(), "{page}");
        // And `courier services` (courier.services.list) through it.
        let out = node.run(&["services"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let listed = json_lines(&out);
        let work = listed
            .iter()
            .find(|s| s["name"] == "work")
            .unwrap_or_else(|| panic!("no work line: {listed:?}"));
        assert_eq!(
            work["instances"].as_array().map(Vec::len),
            Some(2),
            "{work}"
        );
        assert!(!stderr(&out).contains("did not answer"), "{}", stderr(&out));
    }
    const EVENTS: usize = 20;
    const COMMANDS: usize = 60;
    for n in 0..EVENTS {
        let node = if n % 2 == 0 { &nodes.a } else { &nodes.b };
        let out = node.run(&["publish", "order.placed", "--data", &format!("{n}")]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let first = send_when_routed(&nodes.b, &["send", "job.run", "--data", "0"]);
    assert!(first.status.success(), "{}", stderr(&first));
    for n in 1..COMMANDS {
        let node = if n % 2 == 0 { &nodes.a } else { &nodes.b };
        let out = node.run(&["send", "job.run", "--data", &format!("{n}")]);
        assert!(out.status.success(), "{}", stderr(&out));
    }

    // Every service has every event once (probes aside).
    for (service, subscriber) in [("audit", &audit), ("mail", &mail)] {
        let mut placed = BTreeSet::new();
        while placed.len() < EVENTS {
            let m = subscriber.json_line(T);
            if m["name"] == "order.placed" {
                let n = m["payload"].as_u64().expect("a number");
                assert!(placed.insert(n), "{service} got event {m} twice");
            }
        }
    }

    // Each command reaches exactly one instance of `work`, and both
    // nodes' instances take a share.
    let mut by_instance: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    let mut seen = BTreeSet::new();
    let deadline = Instant::now() + T;
    while seen.len() < COMMANDS {
        assert!(
            Instant::now() < deadline,
            "only {} of {COMMANDS} commands arrived: {by_instance:?}",
            seen.len()
        );
        for (instance, subscriber) in [("a", &work_a), ("b", &work_b)] {
            while let Some(m) = subscriber.try_json_line(Duration::from_millis(20)) {
                if m["name"] == "job.probe" {
                    continue;
                }
                let n = m["payload"].as_u64().expect("a number");
                assert!(seen.insert(n), "command {n} delivered twice: {m}");
                assert_eq!(m["attempt"], 1, "{m}");
                by_instance.entry(instance).or_default().push(n);
            }
        }
    }
    assert!(
        by_instance.get("a").is_some_and(|v| !v.is_empty())
            && by_instance.get("b").is_some_and(|v| !v.is_empty()),
        "one node's instance took all the work: {by_instance:?}"
    );
    for subscriber in [&work_a, &work_b] {
        assert!(
            subscriber.no_line(Duration::from_millis(500)),
            "a duplicate"
        );
    }
}

fn a_resend_through_the_other_node_is_dropped_as_a_duplicate(nodes: &Nodes) {
    let worker = nodes.a.spawn(&["subscribe", "pay.*", "--service", "pay"]);
    until_received(&nodes.b, &worker, "pay.probe");
    while worker.try_json_line(Duration::from_millis(300)).is_some() {}
    let id = "01a24a5a-0000-7000-8000-000000000001";
    let out = send_when_routed(&nodes.a, &["send", "pay.charge", "--id", id, "--data", "1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = send_when_routed(&nodes.b, &["send", "pay.charge", "--id", id, "--data", "1"]);
    assert!(
        out.status.success(),
        "the resend is acknowledged: {}",
        stderr(&out)
    );
    let first = worker.json_line(T);
    assert_eq!(first["id"], id);
    assert!(
        worker.no_line(Duration::from_secs(2)),
        "the resend through node b was delivered again"
    );
}

/// One node at a time leads a service's keyed lane (its lease) and hands
/// each key to one instance at a time: its own, or, through the relay the
/// other node pulls from it, that node's. Whichever instance handles a
/// key, its messages come in send order, each once.
fn keyed_messages_go_in_order_across_nodes(nodes: &Nodes) {
    let on_a = nodes
        .a
        .spawn(&["subscribe", "ledger.*", "--service", "ledger"]);
    let on_b = nodes
        .b
        .spawn(&["subscribe", "ledger.*", "--service", "ledger"]);
    nodes.a.wait_consumers("ledger", 1, None);
    nodes.b.wait_consumers("ledger", 1, None);
    const KEYS: usize = 4;
    const PER_KEY: u64 = 25;
    let probe = send_when_routed(&nodes.a, &["send", "ledger.probe"]);
    assert!(probe.status.success(), "{}", stderr(&probe));
    for k in 0..KEYS {
        let node = if k % 2 == 0 { &nodes.a } else { &nodes.b };
        let out = node.run(&[
            "send",
            "ledger.entry",
            "--key",
            &format!("account-{k}"),
            "--count",
            &PER_KEY.to_string(),
            "--data",
            "{seq}",
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let mut keyed: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let total = KEYS * PER_KEY as usize;
    let deadline = Instant::now() + T;
    while keyed.values().map(Vec::len).sum::<usize>() < total {
        assert!(
            Instant::now() < deadline,
            "keyed messages missing: {keyed:?}"
        );
        for subscriber in [&on_a, &on_b] {
            while let Some(m) = subscriber.try_json_line(Duration::from_millis(20)) {
                if m["name"] != "ledger.entry" {
                    continue;
                }
                let key = m["key"].as_str().expect("a key").to_string();
                keyed
                    .entry(key)
                    .or_default()
                    .push(m["payload"].as_u64().expect("a number"));
            }
        }
    }
    for (key, seqs) in &keyed {
        let expected: Vec<u64> = (0..PER_KEY).collect();
        assert_eq!(seqs, &expected, "{key} out of order or repeated");
    }
}

/// One pattern of a service paused through one node: its messages wait
/// in the cluster while the service's other pattern goes on, and come
/// once resumed through the other node — a key's in order, each once,
/// before the key's later ones.
fn a_pattern_paused_alone_waits_and_comes_in_order(nodes: &Nodes) {
    type Got = std::sync::Arc<std::sync::Mutex<Vec<(String, u64)>>>;
    on_own_runtime(async {
        let worker = cluster_common::sdk::connect(cluster_common::sdk::opts(&nodes.b, "pp")).await;
        let got: Got = Got::default();
        for pattern in ["pa.*", "pb.*"] {
            let got = got.clone();
            worker
                .on(pattern, move |msg: courier_client::Incoming| {
                    let got = got.clone();
                    async move {
                        let n = std::str::from_utf8(msg.payload())
                            .ok()
                            .and_then(|p| p.parse().ok())
                            .expect("a number");
                        got.lock().expect("log").push((msg.name().to_string(), n));
                        Ok::<(), courier_client::Error>(())
                    }
                })
                .await
                .expect("subscribed");
        }
        let front =
            cluster_common::sdk::connect(cluster_common::sdk::opts(&nodes.a, "front")).await;
        let publish = |name: &'static str, from: u64, count: u64| {
            let front = front.clone();
            async move {
                for n in from..from + count {
                    front
                        .event(name)
                        .key("k1")
                        .json(&n)
                        .expect("payload")
                        .send()
                        .await
                        .expect("accepted");
                }
            }
        };
        let of = |got: &Got, name: &str| -> Vec<u64> {
            got.lock()
                .expect("log")
                .iter()
                .filter(|(n, _)| n == name)
                .map(|(_, p)| *p)
                .collect()
        };
        let wait = |got: Got, name: &'static str, n: usize| async move {
            let deadline = Instant::now() + T;
            while of(&got, name).len() < n {
                assert!(
                    Instant::now() < deadline,
                    "{name} missing: {:?}",
                    got.lock().expect("log")
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        publish("pa.x", 0, 2).await;
        wait(got.clone(), "pa.x", 2).await;

        let paused = nodes.a.run(&["pause", "pa.*", "--service", "pp"]);
        assert!(paused.status.success(), "{}", stderr(&paused));
        publish("pa.x", 2, 3).await;
        publish("pb.x", 0, 3).await;
        wait(got.clone(), "pb.x", 3).await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(of(&got, "pa.x"), [0, 1], "a paused pattern's messages wait");

        let resumed = nodes.b.run(&["resume", "pa.*", "--service", "pp"]);
        assert!(resumed.status.success(), "{}", stderr(&resumed));
        wait(got.clone(), "pa.x", 5).await;
        publish("pa.x", 5, 2).await;
        wait(got.clone(), "pa.x", 7).await;
        tokio::time::sleep(Duration::from_millis(1000)).await;
        assert_eq!(
            of(&got, "pa.x"),
            [0, 1, 2, 3, 4, 5, 6],
            "held, then in order behind them, each once"
        );
        assert_eq!(of(&got, "pb.x"), [0, 1, 2]);
        // A pattern pauses again once what it held is handed out.
        let connection = nodes.cluster.connect("pause check").await;
        let stream = connection
            .jetstream
            .get_stream(courier_cluster::names::MESSAGES_STREAM)
            .await
            .expect("the messages stream");
        let held = courier_cluster::consumers::held_consumer_name("pp", "pa.*");
        let gone = || async {
            let deadline = Instant::now() + T;
            while stream.consumer_info(&held).await.is_ok() {
                assert!(Instant::now() < deadline, "{held} still there");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        };
        gone().await;

        // The whole service paused, one pattern resumed: the other's
        // messages wait from where the whole pause stopped them.
        let paused = nodes.a.run(&["pause", "--service", "pp"]);
        assert!(paused.status.success(), "{}", stderr(&paused));
        publish("pa.x", 7, 1).await;
        publish("pb.x", 3, 1).await;
        tokio::time::sleep(Duration::from_millis(1000)).await;
        assert_eq!(of(&got, "pb.x"), [0, 1, 2], "the whole service waits");
        let resumed = nodes.b.run(&["resume", "pb.*", "--service", "pp"]);
        assert!(resumed.status.success(), "{}", stderr(&resumed));
        wait(got.clone(), "pb.x", 4).await;
        tokio::time::sleep(Duration::from_millis(1000)).await;
        assert_eq!(of(&got, "pa.x").len(), 7, "pa.* is still paused");
        let resumed = nodes.a.run(&["resume", "--service", "pp"]);
        assert!(resumed.status.success(), "{}", stderr(&resumed));
        wait(got.clone(), "pa.x", 8).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(of(&got, "pa.x"), [0, 1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(of(&got, "pb.x"), [0, 1, 2, 3]);

        // The holds ended: the consumer goes.
        gone().await;
        worker.shutdown().await;
        front.shutdown().await;
    });
}

/// Events stored while no service took them are kept for the retention
/// and replayed to a subscription new to its service, from the beginning
/// or from a time: each once, a key's history in order before its new
/// messages, whichever node the events went through. The replay's
/// consumer goes once it is done.
fn history_is_replayed_to_a_new_subscription(nodes: &Nodes) {
    let publish = |node: &Broker, args: &[&str]| {
        let mut all = vec!["publish"];
        all.extend_from_slice(args);
        let out = node.run(&all);
        assert!(out.status.success(), "{}", stderr(&out));
    };
    publish(&nodes.a, &["hist.note", "--count", "5", "--data", "{seq}"]);
    publish(
        &nodes.b,
        &[
            "hist.step",
            "--key",
            "k1",
            "--count",
            "5",
            "--data",
            "{seq}",
        ],
    );
    // Stored timestamps are the servers' clocks, in whole nanoseconds:
    // a clear gap keeps the first five before the time.
    std::thread::sleep(Duration::from_millis(1200));
    let since = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
    std::thread::sleep(Duration::from_millis(200));
    publish(&nodes.a, &["hist.note", "--count", "2", "--data", "1{seq}"]);

    let all = nodes.b.spawn(&[
        "subscribe",
        "hist.*",
        "--service",
        "replay-all",
        "--from",
        "beginning",
    ]);
    let recent = nodes.a.spawn(&[
        "subscribe",
        "hist.note",
        "--service",
        "replay-since",
        "--from",
        &since,
    ]);
    let mut got: BTreeMap<&str, Vec<(String, u64)>> = BTreeMap::new();
    let read_until =
        |got: &mut BTreeMap<&str, Vec<(String, u64)>>, all_n: usize, recent_n: usize| {
            let deadline = Instant::now() + T;
            while got.get("all").map_or(0, Vec::len) < all_n
                || got.get("recent").map_or(0, Vec::len) < recent_n
            {
                assert!(
                    Instant::now() < deadline,
                    "replayed events missing: {got:?}"
                );
                for (who, subscriber) in [("all", &all), ("recent", &recent)] {
                    while let Some(m) = subscriber.try_json_line(Duration::from_millis(20)) {
                        let name = m["name"].as_str().expect("a name").to_string();
                        let payload = m["payload"].as_u64().expect("a number");
                        got.entry(who).or_default().push((name, payload));
                    }
                }
            }
        };
    read_until(&mut got, 12, 2);
    // New events after the history, through either node.
    publish(
        &nodes.a,
        &[
            "hist.step",
            "--key",
            "k1",
            "--count",
            "3",
            "--data",
            "1{seq}",
        ],
    );
    publish(&nodes.b, &["hist.note", "--data", "20"]);
    read_until(&mut got, 16, 3);
    // Nothing comes twice.
    std::thread::sleep(Duration::from_millis(1500));
    read_until(&mut got, 16, 3);
    let of = |who: &str, name: &str| -> Vec<u64> {
        got[who]
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, p)| *p)
            .collect()
    };
    assert_eq!(
        of("all", "hist.step"),
        [0, 1, 2, 3, 4, 10, 11, 12],
        "the key's history, then its new events, in order, once"
    );
    let mut notes = of("all", "hist.note");
    notes.sort_unstable();
    assert_eq!(notes, [0, 1, 2, 3, 4, 10, 11, 20], "{got:?}");
    let mut recent_notes = of("recent", "hist.note");
    recent_notes.sort_unstable();
    assert_eq!(recent_notes, [10, 11, 20], "replayed from the time only");
    assert_eq!(got["all"].len(), 16, "{got:?}");
    assert_eq!(got["recent"].len(), 3, "{got:?}");
    // Both replays end: their consumers go.
    let replay_all = courier_cluster::consumers::replay_consumer_name("replay-all", "hist.*");
    let replay_since =
        courier_cluster::consumers::replay_consumer_name("replay-since", "hist.note");
    on_own_runtime(async {
        let connection = nodes.cluster.connect("history replay check").await;
        let stream = connection
            .jetstream
            .get_stream(courier_cluster::names::MESSAGES_STREAM)
            .await
            .expect("the messages stream");
        let deadline = Instant::now() + T;
        loop {
            let names: Vec<String> = stream
                .consumer_names()
                .try_collect()
                .await
                .expect("the consumers");
            let replays: Vec<&String> = names
                .iter()
                .filter(|n| **n == replay_all || **n == replay_since)
                .collect();
            if replays.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "replays still going: {replays:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
}

/// A keyed message nacked for longer than its ack deadline waits on the
/// node that holds the lane, its key's later messages behind it; the node
/// keeps them all alive on JetStream meanwhile (`+WPI`), so none is handed
/// out a second time.
fn a_keyed_retry_longer_than_the_ack_deadline_is_delivered_once_in_order(nodes: &Nodes) {
    const ACK_DEADLINE: Duration = Duration::from_secs(1);
    const RETRY_AFTER: Duration = Duration::from_millis(2500);
    let addr = nodes.b.addr.clone();
    let handled: std::sync::Arc<std::sync::Mutex<Vec<(String, u32, Instant)>>> =
        std::sync::Arc::default();
    let (subscribed_tx, subscribed) = std::sync::mpsc::channel();
    let (stop_tx, stop) = tokio::sync::oneshot::channel::<()>();
    let log = handled.clone();
    let instance = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        runtime.block_on(async move {
            let mut o = courier_client::ClientOptions::new(addr, "payments");
            o.ack_deadline = Some(ACK_DEADLINE);
            o.nack_delay = RETRY_AFTER;
            let client = courier_client::Client::connect(o).await.expect("connect");
            client
                .on("payments.*", move |msg: courier_client::Incoming| {
                    let log = log.clone();
                    async move {
                        let payload = String::from_utf8_lossy(msg.payload()).into_owned();
                        let first_try_of_0 = payload == "0" && msg.attempt() == 1;
                        log.lock()
                            .expect("log")
                            .push((payload, msg.attempt(), Instant::now()));
                        if first_try_of_0 {
                            return Err(std::io::Error::other("later"));
                        }
                        Ok(())
                    }
                })
                .await
                .expect("subscribe");
            subscribed_tx.send(()).expect("the test waits");
            let _ = stop.await;
            client.shutdown().await;
        });
    });
    subscribed.recv_timeout(T).expect("subscribed");
    nodes.b.wait_consumers("payments", 1, None);
    let probe = send_when_routed(&nodes.a, &["send", "payments.probe"]);
    assert!(probe.status.success(), "{}", stderr(&probe));
    let out = nodes.a.run(&[
        "send",
        "payments.charge",
        "--key",
        "card-1",
        "--count",
        "3",
        "--data",
        "{seq}",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let charges = |log: &[(String, u32, Instant)]| {
        log.iter()
            .filter(|(p, _, _)| p.len() == 1)
            .map(|(p, attempt, _)| (p.clone(), *attempt))
            .collect::<Vec<_>>()
    };
    let expected: Vec<(String, u32)> = [("0", 1), ("0", 2), ("1", 1), ("2", 1)]
        .into_iter()
        .map(|(p, a)| (p.to_string(), a))
        .collect();
    let deadline = Instant::now() + T;
    while charges(&handled.lock().expect("log")).len() < expected.len() {
        assert!(
            Instant::now() < deadline,
            "charges missing: {:?}",
            charges(&handled.lock().expect("log"))
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Long enough for JetStream to hand anything out again twice over.
    std::thread::sleep(3 * ACK_DEADLINE);
    let log = handled.lock().expect("log").clone();
    assert_eq!(charges(&log), expected, "each charge once, in order");
    let at = |payload: &str, attempt: u32| {
        log.iter()
            .find(|(p, a, _)| p == payload && *a == attempt)
            .map(|(_, _, at)| *at)
            .expect("handled")
    };
    let waited = at("0", 2) - at("0", 1);
    assert!(waited >= RETRY_AFTER, "retried after {waited:?}");
    let _ = stop_tx.send(());
    instance.join().expect("the instance's thread");
}

/// A deferred send waits in the cluster (a schedule the servers fire),
/// not on a node; an expired one is dropped undelivered wherever it is
/// fetched.
fn deferred_messages_wait_and_expired_ones_are_dropped(nodes: &Nodes) {
    // Subscribed, then gone: its messages wait in the cluster.
    let mut first = nodes
        .a
        .spawn(&["subscribe", "remind.*", "--service", "remind"]);
    until_received(&nodes.b, &first, "remind.probe");
    first.kill9();
    let out = nodes
        .b
        .run(&["send", "remind.soon", "--ttl", "1s", "--data", "stale"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let sent_at = Instant::now();
    let out = nodes
        .b
        .run(&["send", "remind.later", "--delay", "3s", "--data", "later"]);
    assert!(out.status.success(), "{}", stderr(&out));
    std::thread::sleep(Duration::from_millis(1500));
    let again = nodes
        .a
        .spawn(&["subscribe", "remind.*", "--service", "remind"]);
    let deadline = Instant::now() + T;
    loop {
        assert!(Instant::now() < deadline, "the deferred message never came");
        let Some(m) = again.try_json_line(Duration::from_millis(100)) else {
            continue;
        };
        match m["name"].as_str() {
            Some("remind.probe") => continue,
            Some("remind.later") => {
                let waited = sent_at.elapsed();
                assert!(
                    waited >= Duration::from_millis(2900),
                    "delivered after {waited:?}, before its delay of 3 s"
                );
                break;
            }
            _ => panic!("an expired or unexpected message was delivered: {m}"),
        }
    }
    assert!(again.no_line(Duration::from_millis(500)), "more arrived");
}

/// A transient message reaches an instance on another node (at most
/// once), and one on the accepting node when there is one; a transient
/// command's reply comes back across nodes.
fn transient_messages_reach_instances_on_other_nodes(nodes: &Nodes) {
    let dash = nodes
        .a
        .spawn(&["subscribe", "gauge.*", "--service", "dash"]);
    nodes.a.wait_consumers("dash", 1, None);
    let deadline = Instant::now() + T;
    loop {
        assert!(
            Instant::now() < deadline,
            "no transient message crossed nodes"
        );
        let out = nodes
            .b
            .run(&["publish", "gauge.cpu", "--transient", "--data", "0.5"]);
        assert!(out.status.success(), "{}", stderr(&out));
        if let Some(m) = dash.try_json_line(Duration::from_millis(300)) {
            assert_eq!(m["name"], "gauge.cpu");
            assert_eq!(m["payload"], 0.5);
            break;
        }
    }

    // A transient command taken by an instance on the other node is
    // answered: the reply goes back to the node that accepted it.
    let responder = nodes.a.spawn(&[
        "reply",
        "clock.read",
        "--service",
        "clock",
        "--outcome",
        "clock.time",
        "--echo",
    ]);
    responder.wait_stderr("replying to clock.read", T);
    nodes.a.wait_consumers("clock", 1, None);
    let deadline = Instant::now() + T;
    let replies = loop {
        let out = nodes.b.run(&[
            "request",
            "clock.read",
            "--service",
            "web",
            "--transient",
            "--timeout",
            "2s",
            "--data",
            r#"{"zone":"utc"}"#,
        ]);
        if out.status.success() {
            break json_lines(&out);
        }
        // Dropped while the offer was not yet in force across nodes.
        assert!(
            Instant::now() < deadline,
            "no transient reply crossed nodes: {}",
            stderr(&out)
        );
    };
    assert_eq!(replies.len(), 1, "{replies:?}");
    assert_eq!(replies[0]["name"], "clock.time");
    assert_eq!(replies[0]["sender"], "clock");
    assert_eq!(replies[0]["payload"]["zone"], "utc");
}

/// Two more nodes, sampling traces above 50 messages a second: the one
/// that only delivers what the other accepts records exactly the
/// activities the accepting node's sampler picked (SCALE-OUT §11). Its
/// own sampler sees no sends, and would pick every one.
fn a_delivering_node_traces_only_what_the_accepting_node_picked(nodes: &Nodes) {
    const BURST: usize = 2000;
    let accepting = nodes.start_node_with("e", &["--trace-rate", "50"]);
    let delivering = nodes.start_node_with("f", &["--trace-rate", "50"]);
    let accepting_http = accepting.http.clone().expect("the node's HTTP port");
    let delivering_http = delivering.http.clone().expect("the node's HTTP port");
    let sink = delivering.spawn(&["subscribe", "burst.*", "--service", "sink"]);
    delivering.wait_consumers("sink", 1, None);
    // Until the subscription is in force on the accepting node, what it
    // accepts for `burst.*` goes nowhere, traced or not.
    until_received(&accepting, &sink, "burst.probe");
    // What the two nodes traced before the bursts, once it stops moving.
    let traces = || {
        let (_, picked) = http_get(&accepting_http, "/metrics", None);
        let (_, held) = http_get(&delivering_http, "/metrics", None);
        let count = |text: &str, name: &str| metric(text, name).unwrap_or(0.0);
        (
            count(&picked, "courier_trace_messages_traced_total"),
            count(&picked, "courier_trace_messages_skipped_total"),
            count(&held, "courier_trace_activities"),
        )
    };
    let mut before = traces();
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let now = traces();
        if now == before {
            break;
        }
        before = now;
    }
    let (traced_before, skipped_before, held_before) = before;
    // Bursts until the accepting node's sampler has left some out.
    let mut bursts = 0;
    wait_for("activities left out by the sampler", T, || {
        let count = BURST.to_string();
        let out = accepting.run(&[
            "publish",
            "burst.tick",
            "--service",
            "src",
            "--count",
            &count,
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
        bursts += 1;
        (traces().1 > skipped_before).then_some(())
    });
    let sent = (bursts * BURST) as f64;
    let delivered_line = "courier_messages_delivered_total{name=\"burst.tick\",service=\"sink\"}";
    wait_until("every burst delivered on the other node", T, || {
        let (_, text) = http_get(&delivering_http, "/metrics", None);
        let delivered = metric(&text, delivered_line).unwrap_or(0.0);
        if delivered >= sent {
            Ok(())
        } else {
            Err(format!("{delivered} of {sent} delivered"))
        }
    });
    wait_until(
        "the delivering node's traces match the sampler's picks",
        T,
        || {
            let (traced, _, held) = traces();
            let (traced, held) = (traced - traced_before, held - held_before);
            if traced > 0.0 && traced < sent && held == traced {
                Ok(())
            } else {
                Err(format!(
                "{sent} sent: {traced} traced on the accepting node, {held} new activities on the delivering one"
            ))
            }
        },
    );
}

/// Two more nodes, both given one manifest (SCALE-OUT §15: every node
/// the same file): who may connect, send and receive what holds on each,
/// and an allowed command crosses from one to the other.
fn the_manifests_rules_hold_on_every_node(nodes: &Nodes) {
    let (shop, shop_hash) = common::token_pair();
    let (stock, stock_hash) = common::token_pair();
    let (_, admin_hash) = common::token_pair();
    let dir = tempdir::Dir::new("manifest");
    let path = dir.path().join("courier.toml");
    std::fs::write(
        &path,
        format!(
            r#"[services.shop]
sends = ["stock.reserve@1"]
receives = ["stock.reserved@1"]
tokens = ["{shop_hash}"]

[services.stock]
receives = ["stock.reserve@1"]
sends = ["stock.reserved@1"]
tokens = ["{stock_hash}"]

[admin]
tokens = ["{admin_hash}"]
"#
        ),
    )
    .expect("write the manifest");
    let manifest = path.to_str().expect("a UTF-8 path");
    let c = nodes.start_node_with("c", &["--manifest", manifest]);
    let d = nodes.start_node_with("d", &["--manifest", manifest]);

    let receiver = c.spawn(&[
        "subscribe",
        "stock.>",
        "--service",
        "stock",
        "--token",
        &stock,
    ]);
    let out = send_when_routed(
        &d,
        &[
            "send",
            "stock.reserve",
            "--service",
            "shop",
            "--token",
            &shop,
            "--data",
            r#"{"sku":"milk"}"#,
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let got = receiver.json_line(T);
    assert_eq!(got["name"], "stock.reserve");
    assert_eq!(got["sender"], "shop", "the sender comes from the token");

    for node in [&c, &d] {
        let out = node.run(&["send", "stock.reserve", "--service", "shop"]);
        assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
        assert!(
            stderr(&out).contains("requires credentials"),
            "{}",
            stderr(&out)
        );
        let out = node.run(&[
            "send",
            "stock.release",
            "--service",
            "shop",
            "--token",
            &shop,
        ]);
        assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
        let err = stderr(&out);
        assert!(
            err.contains("service shop may not send stock.release")
                && err.contains("stock.reserve@1"),
            "{err}"
        );
        let out = node.run(&[
            "publish",
            "stock.audited",
            "--service",
            "stock",
            "--token",
            &stock,
        ]);
        assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    }
}

fn a_tail_on_one_node_sees_what_every_node_accepts(nodes: &Nodes) {
    let tail = nodes.a.spawn(&["tail", "tailed.>", "--payload"]);
    tail.wait_stderr("tailing tailed.>", T);
    // Node b relays once it heard that a has a tail (within a second).
    let deadline = Instant::now() + T;
    let line = loop {
        let out = nodes.b.run(&[
            "publish",
            "tailed.thing",
            "--service",
            "web",
            "--data",
            r#"{"n":1}"#,
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
        if let Some(line) = tail.try_json_line(Duration::from_millis(500)) {
            break line;
        }
        assert!(Instant::now() < deadline, "no tail line from node b");
    };
    assert_eq!(line["name"], "tailed.thing", "{line}");
    assert_eq!(line["node"], "b", "{line}");
    assert_eq!(line["sender"], "web", "{line}");
    assert_eq!(line["payload"]["n"], 1, "{line}");
    // Its own node's, named too.
    let out = nodes.a.run(&["publish", "tailed.here", "--service", "web"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let deadline = Instant::now() + T;
    loop {
        let line = tail.json_line(T);
        if line["name"] == "tailed.here" {
            assert_eq!(line["node"], "a", "{line}");
            break;
        }
        assert!(Instant::now() < deadline, "no line of node a's own");
    }
}

/// `courier register` and friends through `node`'s HTTP port.
fn registry_cli(node: &Broker, args: &[&str]) -> std::process::Output {
    let http = node.http.as_deref().expect("the node's HTTP port");
    let http = http
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    node.cli(args)
        .env("COURIER_HTTP", http)
        .output()
        .expect("run courier")
}

/// Every instance of `service` in `node`'s registry, with its health.
fn registry_instances(node: &Broker, service: &str) -> BTreeMap<String, String> {
    let http = node.http.as_deref().expect("the node's HTTP port");
    let (status, body) = http_get(http, &format!("/v1/services/{service}?all=1"), None);
    assert_eq!(status, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    answer["instances"]
        .as_array()
        .expect("instances")
        .iter()
        .map(|i| {
            (
                i["id"].as_str().expect("id").to_string(),
                i["health"].as_str().expect("health").to_string(),
            )
        })
        .collect()
}

/// One registry on both nodes: what is registered, heartbeated or
/// deregistered through one is seen through the other, a bus connection
/// to one is an instance on both, and the checks run somewhere.
fn the_registry_is_one_on_every_node(nodes: &Nodes) {
    let out = registry_cli(
        &nodes.a,
        &[
            "register",
            "regdb",
            "--address",
            "127.0.0.1:5432",
            "--check",
            "ttl:2s",
            "--flap-threshold",
            "1",
            "--id",
            "regdb-1",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    wait_for("the registration through a is seen on b", T, || {
        registry_instances(&nodes.b, "regdb")
            .contains_key("regdb-1")
            .then_some(())
    });
    // No heartbeat: whichever node runs the checks lapses the TTL, and
    // both nodes see it.
    for node in [&nodes.a, &nodes.b] {
        wait_for("the TTL lapses on both nodes", T, || {
            (registry_instances(node, "regdb")
                .get("regdb-1")
                .map(String::as_str)
                == Some("critical"))
            .then_some(())
        });
    }
    // A heartbeat through b passes the check on a.
    let out = registry_cli(&nodes.b, &["heartbeat", "regdb", "regdb-1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_for("the heartbeat through b is seen on a", T, || {
        (registry_instances(&nodes.a, "regdb")
            .get("regdb-1")
            .map(String::as_str)
            == Some("passing"))
        .then_some(())
    });

    // A bus connection to b is an instance on a's registry, until it goes.
    let mut sub = nodes
        .b
        .spawn(&["subscribe", "regbus.*", "--service", "regbus"]);
    wait_for("the bus instance on b is in a's registry", T, || {
        (registry_instances(&nodes.a, "regbus").len() == 1).then_some(())
    });
    sub.kill9();
    wait_for("the closed connection leaves a's registry", T, || {
        registry_instances(&nodes.a, "regbus")
            .is_empty()
            .then_some(())
    });

    let out = registry_cli(&nodes.b, &["deregister", "regdb", "regdb-1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_for("the deregistration through b is seen on a", T, || {
        registry_instances(&nodes.a, "regdb")
            .is_empty()
            .then_some(())
    });
}
