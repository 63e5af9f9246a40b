//! Activity traces against real `courier serve` processes: a request →
//! reply → event → command chain across CLI processes and SDK services
//! as one causal tree in `courier trace` and `GET /v1/activities/{id}`,
//! the listing, `kill -9` and restart, retention, the size cap (and the
//! broker's memory under it), sampling, and traces turned off.

mod common;

use std::time::Duration;

use common::{http_get, json_lines, metric, stderr, wait_for, Broker};
use courier_client::{Client, ClientOptions, Incoming};
use serde_json::Value;

const T: Duration = Duration::from_secs(20);

/// `courier trace ID --json`, if the broker has the activity yet.
fn trace_json(broker: &Broker, activity: &str) -> Option<Value> {
    let out = broker.run(&["trace", activity, "--json"]);
    if !out.status.success() {
        return None;
    }
    json_lines(&out).into_iter().next()
}

/// Waits until the services listing shows `service` subscribed to `pattern`.
fn wait_subscribed(broker: &Broker, service: &str, pattern: &str) {
    wait_for(&format!("{service} subscribed to {pattern}"), T, || {
        let out = broker.run(&["services"]);
        json_lines(&out)
            .iter()
            .any(|s| {
                s["name"] == service
                    && s["patterns"]
                        .as_array()
                        .is_some_and(|p| p.iter().any(|p| p == pattern))
                    && s["instances"].as_array().is_some_and(|i| !i.is_empty())
            })
            .then_some(())
    });
}

fn node_names(nodes: &Value) -> Vec<String> {
    nodes
        .as_array()
        .into_iter()
        .flatten()
        .map(|n| {
            format!(
                "{} {}",
                n["kind"].as_str().unwrap_or("?"),
                n["name"].as_str().unwrap_or("?")
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_reply_event_command_chain_is_one_tree_in_courier_trace_and_over_http() {
    let broker = Broker::start();
    // smtp: a `courier subscribe` process that acks every mail.send.
    let _smtp = broker.spawn(&["subscribe", "mail.send", "--service", "smtp"]);
    // todo: an SDK service that publishes todo.created, then replies.
    let todo = Client::connect(ClientOptions::new(broker.addr.clone(), "todo"))
        .await
        .expect("connect");
    todo.on("todo.create", |msg: Incoming| async move {
        msg.client().publish("todo.created", &"milk").await?;
        msg.reply("todo.created", &"ok").await?;
        Ok::<(), courier_client::Error>(())
    })
    .await
    .expect("subscribe");
    // mailer: an SDK service that sends mail.send for each todo.created.
    let mailer = Client::connect(ClientOptions::new(broker.addr.clone(), "mailer"))
        .await
        .expect("connect");
    mailer
        .on("todo.created", |msg: Incoming| async move {
            msg.command("mail.send").json(&"welcome")?.send().await?;
            Ok::<(), courier_client::Error>(())
        })
        .await
        .expect("subscribe");
    tokio::task::block_in_place(|| wait_subscribed(&broker, "smtp", "mail.send"));

    // web: `courier request` as a process.
    let out = tokio::task::block_in_place(|| {
        broker.run(&[
            "request",
            "todo.create",
            "--data",
            "{\"text\":\"milk\"}",
            "--service",
            "web",
        ])
    });
    assert!(out.status.success(), "{}", stderr(&out));
    let reply = json_lines(&out).remove(0);
    let activity = reply["activity_id"].as_str().expect("activity").to_string();
    assert_eq!(
        reply["parent_id"], reply["response_to"],
        "a reply's cause is its command"
    );

    // The chain is complete once smtp acked mail.send.
    let tree = tokio::task::block_in_place(|| {
        wait_for("the whole chain in the trace", T, || {
            let tree = trace_json(&broker, &activity)?;
            let mail = &tree["roots"][0]["children"][0]["children"][0];
            (mail["deliveries"][0]["outcome"] == "acked").then_some(tree)
        })
    });
    assert_eq!(tree["activity_id"], activity);
    assert_eq!(tree["messages"], 4);
    assert_eq!(tree["outcomes"], serde_json::json!(["todo.created"]));
    assert_eq!(tree["dead_lettered"], false);
    assert_eq!(node_names(&tree["roots"]), ["command todo.create"]);
    let command = &tree["roots"][0];
    assert_eq!(
        (command["sender"].as_str(), command["parent_id"].as_str()),
        (Some("web"), None)
    );
    assert_eq!(command["receivers"], serde_json::json!(["todo"]));
    assert_eq!(command["deliveries"][0]["service"], "todo");
    assert_eq!(command["deliveries"][0]["outcome"], "acked");
    // Published before the reply was sent: the event comes first.
    assert_eq!(
        node_names(&command["children"]),
        ["event todo.created", "reply todo.created"]
    );
    let event = &command["children"][0];
    assert_eq!(event["sender"], "todo");
    assert_eq!(event["parent_id"], command["id"]);
    assert_eq!(event["deliveries"][0]["service"], "mailer");
    assert_eq!(event["deliveries"][0]["outcome"], "acked");
    assert_eq!(node_names(&event["children"]), ["command mail.send"]);
    let mail = &event["children"][0];
    assert_eq!(mail["sender"], "mailer");
    assert_eq!(mail["deliveries"][0]["service"], "smtp");
    assert!(
        mail["deliveries"][0]["instance"]
            .as_str()
            .is_some_and(|i| i.starts_with("smtp")),
        "{mail}"
    );
    let answer = &command["children"][1];
    assert_eq!(answer["final"], true);
    assert_eq!(answer["response_to"], command["id"]);
    assert_eq!(answer["deliveries"][0]["service"], "web");
    // Times count from the first message and follow cause to effect.
    let at = |n: &Value, field: &str| n[field].as_f64().expect("a time");
    assert_eq!(at(command, "accepted_ms"), 0.0);
    assert!(at(command, "accepted_ms") <= at(&command["deliveries"][0], "delivered_ms"));
    assert!(at(&command["deliveries"][0], "delivered_ms") <= at(event, "accepted_ms"));
    assert!(at(event, "accepted_ms") <= at(mail, "accepted_ms"));
    assert!(at(mail, "accepted_ms") <= at(&mail["deliveries"][0], "settled_ms"));

    // The same tree as indented text.
    let out = tokio::task::block_in_place(|| broker.run(&["trace", &activity]));
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].starts_with(&format!("activity {activity} — 4 message(s)")),
        "{text}"
    );
    let expected = [
        "command todo.create web → todo",
        "  ↳ todo/",
        "  event todo.created todo → mailer",
        "    ↳ mailer/",
        "    command mail.send mailer → smtp",
        "      ↳ smtp/",
        "  reply todo.created todo → web",
        "    ↳ web/",
    ];
    assert_eq!(lines.len(), 1 + expected.len(), "{text}");
    for (line, start) in lines[1..].iter().zip(expected) {
        assert!(
            line.starts_with(start),
            "{line:?} should start with {start:?}\n{text}"
        );
    }

    // Over HTTP: the same tree, and the listing.
    let http = broker.http.clone().expect("http");
    let (status, body) = http_get(&http, &format!("/v1/activities/{activity}"), None);
    assert_eq!(status, 200, "{body}");
    let over_http: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(over_http, tree);
    let (status, body) = http_get(
        &http,
        "/v1/activities?name=todo.*&outcome=todo.created&since=1h&limit=5",
        None,
    );
    assert_eq!(status, 200, "{body}");
    let listing: Value = serde_json::from_str(&body).expect("json");
    let first = &listing["activities"][0];
    assert_eq!(first["activity_id"], activity);
    assert_eq!(first["name"], "todo.create");
    assert_eq!(first["messages"], 4);
    assert_eq!(first["outcomes"], serde_json::json!(["todo.created"]));
    assert_eq!(first["dead_lettered"], false);
    assert!(first["duration_ms"].as_f64().is_some_and(|d| d >= 0.0));
    assert_eq!(listing["activities"].as_array().map(Vec::len), Some(1));
    let (status, body) = http_get(&http, "/v1/activities?outcome=todo.failed", None);
    assert_eq!((status, body.as_str()), (200, "{\"activities\":[]}"));
    // The CLI's listing.
    let out = tokio::task::block_in_place(|| broker.run(&["trace", "--name", "todo.create"]));
    assert_eq!(json_lines(&out)[0]["activity_id"], activity);
    // What is not there says so.
    let (status, body) = http_get(&http, "/v1/activities/not-a-uuid", None);
    assert_eq!(status, 400, "{body}");
    let unknown = uuid::Uuid::now_v7();
    let (status, body) = http_get(&http, &format!("/v1/activities/{unknown}"), None);
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("no trace of activity"), "{body}");
    let (status, body) = http_get(&http, "/v1/activities?limit=0", None);
    assert_eq!(status, 400, "{body}");
    let out = tokio::task::block_in_place(|| broker.run(&["trace", &unknown.to_string()]));
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("no trace of activity"),
        "{}",
        stderr(&out)
    );
    todo.shutdown().await;
    mailer.shutdown().await;
}

#[test]
fn a_trace_survives_kill_9_and_a_restart() {
    let broker = Broker::start();
    let _worker = broker.spawn(&["subscribe", "job.run", "--service", "worker"]);
    wait_subscribed(&broker, "worker", "job.run");
    let out = broker.run(&["send", "job.run", "--service", "cron"]);
    assert!(out.status.success(), "{}", stderr(&out));
    // A message that starts an activity names it after itself.
    let activity = json_lines(&out)[0]["id"].as_str().expect("id").to_string();
    let before = wait_for("the ack in the trace", T, || {
        let tree = trace_json(&broker, &activity)?;
        (tree["roots"][0]["deliveries"][0]["outcome"] == "acked").then_some(tree)
    });
    let broker = broker.crash_and_restart();
    let http = broker.http.clone().expect("http");
    let (status, body) = http_get(&http, &format!("/v1/activities/{activity}"), None);
    assert_eq!(status, 200, "{body}");
    let after: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(after, before, "read back whole");
}

#[test]
fn traces_go_past_their_retention_and_past_the_size_cap_and_memory_stays_bounded() {
    const CAP: u64 = 4 * 1024 * 1024;
    const EVENTS: usize = 30_000;
    let broker = Broker::start_with(&[
        "--in-memory",
        "--trace-payloads",
        "--trace-bytes-max",
        "4MiB",
        "--trace-retention",
        "3s",
        "--trace-rate",
        "0",
    ]);
    let http = broker.http.clone().expect("http");
    let out = broker.run(&["publish", "early.bird", "--service", "src"]);
    let early = json_lines(&out)[0]["id"].as_str().expect("id").to_string();
    wait_for("the first trace", T, || trace_json(&broker, &early));
    let baseline = common::rss_bytes(broker.child.id());
    // 30,000 events with 2 KiB payloads, each its own activity: ~70 MiB
    // of traces, payloads kept, against a 4 MiB cap.
    let payload = "p".repeat(2048);
    let out = broker.run(&[
        "publish",
        "bulk.item",
        "--service",
        "src",
        "--count",
        &EVENTS.to_string(),
        "--data",
        &payload,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let ids = json_lines(&out);
    let last = ids.last().expect("ids")["id"]
        .as_str()
        .expect("id")
        .to_string();
    let text = wait_for("every event traced", T, || {
        let (_, text) = http_get(&http, "/metrics", None);
        (metric(&text, "courier_trace_messages_traced_total")? >= (EVENTS + 1) as f64)
            .then_some(text)
    });
    // The cap, the store's cache of recent messages (4096 x 2 KiB) and
    // the dedup window's ids, with room: nowhere near the 70 MiB traced.
    // Held, not passing through: while the trace thread lags (a busy
    // machine), its queue may pin up to 64 MiB of messages for a moment,
    // which the allocator returns about a second after they are let go.
    const HELD_MAX: u64 = 40 * 1024 * 1024;
    let mut grown = 0;
    let settled = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < settled {
        grown = common::rss_bytes(broker.child.id()).saturating_sub(baseline);
        if grown < HELD_MAX {
            break;
        }
        // A scrape allocates, which lets the allocator return freed pages.
        let _ = http_get(&http, "/metrics", None);
        std::thread::sleep(Duration::from_millis(100));
    }
    let memory = metric(&text, "courier_trace_memory_bytes").expect("memory gauge");
    eprintln!(
        "traces: {memory} B held of {CAP}; broker RSS grew {} KiB over {EVENTS} traced events",
        grown / 1024
    );
    assert!(memory <= CAP as f64, "{memory} over the cap");
    assert!(
        text.contains("courier_trace_activities_evicted_total{reason=\"size\"}"),
        "{text}"
    );
    assert!(grown < HELD_MAX, "RSS grew {grown} B and stayed");
    assert_eq!(
        http_get(&http, &format!("/v1/activities/{early}"), None).0,
        404,
        "the oldest went first"
    );
    assert_eq!(
        http_get(&http, &format!("/v1/activities/{last}"), None).0,
        200,
        "the newest stays"
    );
    // Past the retention, everything goes, traffic or not.
    wait_for("every trace past its retention", T, || {
        let (_, body) = http_get(&http, "/v1/activities", None);
        (body == "{\"activities\":[]}").then_some(())
    });
    let (_, text) = http_get(&http, "/metrics", None);
    assert!(
        text.lines().any(|l| l
            .starts_with("courier_trace_activities_evicted_total{reason=\"retention\"}")
            && !l.ends_with(" 0")),
        "{text}"
    );
}

#[test]
fn above_the_trace_rate_activities_are_sampled_and_the_skipped_counted() {
    let broker = Broker::start_with(&["--in-memory", "--trace-rate", "50"]);
    let http = broker.http.clone().expect("http");
    // Bursts of 2,000 until the sampler, which looks at each second's
    // rate, has skipped some.
    let text = wait_for("skipped activities", T, || {
        let out = broker.run(&[
            "publish",
            "burst.tick",
            "--service",
            "src",
            "--count",
            "2000",
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
        let (_, text) = http_get(&http, "/metrics", None);
        (metric(&text, "courier_trace_messages_skipped_total")? > 0.0).then_some(text)
    });
    let traced = metric(&text, "courier_trace_messages_traced_total").expect("traced");
    let skipped = metric(&text, "courier_trace_messages_skipped_total").expect("skipped");
    let accepted = metric(&text, "courier_accepted_total").expect("accepted");
    assert_eq!(
        traced + skipped,
        accepted,
        "every message is traced or counted as skipped"
    );
    assert!(
        metric(&text, "courier_trace_sample_ratio").is_some_and(|r| r < 1.0),
        "{text}"
    );
}

#[test]
fn with_traces_off_the_broker_says_so() {
    let broker = Broker::start_with(&["--in-memory", "--trace", "off"]);
    let out = broker.run(&["trace", &uuid::Uuid::now_v7().to_string()]);
    assert_eq!(out.status.code(), Some(4), "refused: {}", stderr(&out));
    assert!(
        stderr(&out).contains("activity traces are off"),
        "{}",
        stderr(&out)
    );
    let (status, body) = http_get(
        broker.http.as_deref().expect("http"),
        "/v1/activities",
        None,
    );
    assert_eq!(status, 503, "{body}");
    let (_, text) = http_get(broker.http.as_deref().expect("http"), "/metrics", None);
    assert!(
        !text.contains("courier_trace_"),
        "no trace metrics when off"
    );
}
