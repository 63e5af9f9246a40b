//! `courier dead-letters` on a real three-server NATS JetStream cluster
//! with two nodes (docs/SCALE-OUT.md §7): what was dead-lettered through
//! node a is listed, shown, replayed and purged through node b, with the
//! same answers as on one broker.

mod cluster_common;
mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cluster_common::sdk::{connect, opts, send_when_routed};
use cluster_common::Nodes;
use common::{json_lines, metric, stderr, wait_for_async, Broker};
use courier_client::Incoming;
use uuid::Uuid;

/// How long anything the cluster owes (a routing, a dead letter) may take.
const T: Duration = Duration::from_secs(60);
const SERVICE: &str = "flaky";

/// `courier dead-letters …` through `node`, blocking off the runtime.
async fn dead_letters(node: &Broker, args: &[&str]) -> std::process::Output {
    let mut all = vec!["dead-letters".to_string()];
    all.extend(args.iter().map(|a| a.to_string()));
    all.extend(["--service".to_string(), SERVICE.to_string()]);
    let cli = node.cli(&[]);
    tokio::task::spawn_blocking(move || {
        let mut cli = cli;
        cli.args(&all).output().expect("run courier")
    })
    .await
    .expect("the CLI ran")
}

async fn listed(node: &Broker, args: &[&str]) -> Vec<serde_json::Value> {
    let mut all = vec!["list"];
    all.extend_from_slice(args);
    let out = dead_letters(node, &all).await;
    assert!(out.status.success(), "{}", stderr(&out));
    json_lines(&out)
}

/// An HTTP call to a node's port off the runtime (`{}` as a POST's
/// body): status and body.
async fn http_async(http: &str, method: &str, path: &str) -> (u16, String) {
    let (http, method, path) = (http.to_string(), method.to_string(), path.to_string());
    tokio::task::spawn_blocking(move || {
        let headers = [("Content-Type", "application/json")];
        let body = if method == "POST" { "{}" } else { "" };
        let (status, _, body) = common::http_call(&http, &method, &path, &headers, body);
        (status, body)
    })
    .await
    .expect("the HTTP call ran")
}

/// `GET path`, which must answer 200 with JSON.
async fn get_json(http: &str, path: &str) -> serde_json::Value {
    let (status, body) = http_async(http, "GET", path).await;
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).expect("JSON")
}

#[tokio::test(flavor = "multi_thread")]
async fn dead_letters_of_one_node_are_listed_shown_replayed_and_purged_through_the_other() {
    let nodes = Nodes::start_watched().await;
    // Fails every delivery until told to take them; one attempt each.
    let mut o = opts(&nodes.a, SERVICE);
    o.max_deliveries = Some(1);
    let failing = connect(o).await;
    let taking = Arc::new(AtomicBool::new(false));
    let seen: Arc<Mutex<Vec<(Uuid, u32)>>> = Arc::default();
    let (handler_taking, handler_seen) = (taking.clone(), seen.clone());
    failing
        .on("flaky.run", move |msg: Incoming| {
            let (taking, seen) = (handler_taking.clone(), handler_seen.clone());
            async move {
                seen.lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .push((msg.message().id, msg.attempt()));
                if taking.load(Ordering::SeqCst) {
                    Ok(())
                } else {
                    Err(std::io::Error::other("always fails"))
                }
            }
        })
        .await
        .expect("subscribe flaky.run");
    let web = connect(opts(&nodes.b, "web")).await;
    let first = send_when_routed(&web, "flaky.run", &serde_json::json!({"n": 1})).await;
    let second = send_when_routed(&web, "flaky.run", &serde_json::json!({"n": 2})).await;

    // Both dead-lettered on the cluster, listed through the other node.
    let b = &nodes.b;
    let listing = wait_for_async("two dead letters listed through node b", T, || async move {
        let listing = listed(b, &[]).await;
        (listing.len() == 2).then_some(listing)
    })
    .await;
    let ids: Vec<u64> = listing.iter().filter_map(|l| l["id"].as_u64()).collect();
    assert_eq!(ids.len(), 2, "{listing:?}");
    assert!(ids[0] < ids[1], "not by id: {listing:?}");
    for (letter, id) in listing.iter().zip([first, second]) {
        assert_eq!(letter["name"], "flaky.run", "{letter}");
        assert_eq!(letter["message_id"], id.to_string(), "{letter}");
        assert_eq!(letter["attempts"], 1, "{letter}");
        assert_eq!(letter["sender"], "web", "{letter}");
        assert!(
            letter["dead_lettered_at"].as_u64().unwrap_or(0) > 0,
            "{letter}"
        );
    }
    let (id1, id2) = (ids[0].to_string(), ids[1].to_string());

    // Pages by id, with the note that says where the rest starts.
    let page = listed(&nodes.b, &["--limit", "1"]).await;
    assert_eq!(page.len(), 2, "{page:?}");
    assert_eq!(page[0]["id"], ids[0]);
    assert_eq!(page[1]["truncated"], true);
    assert_eq!(page[1]["rest_after"], ids[0]);
    assert_eq!(page[1]["total"], 2);
    let rest = listed(&nodes.b, &["--after", &id1]).await;
    assert_eq!(rest.len(), 1, "{rest:?}");
    assert_eq!(rest[0]["id"], ids[1]);

    // The console's pages read the cluster's dead letters, on either node.
    for node in [&nodes.a, &nodes.b] {
        let http = node.http.clone().expect("the node's HTTP port");
        let page = get_json(&http, &format!("/v1/dead-letters/{SERVICE}?limit=1")).await;
        assert_eq!(page["total"], 2, "{page}");
        assert_eq!(page["dead_letters"][0]["id"], ids[0], "{page}");
        assert_eq!(page["dead_letters"][0]["name"], "flaky.run", "{page}");
        assert_eq!(page["rest_after"], ids[0], "{page}");
        let rest = get_json(&http, &format!("/v1/dead-letters/{SERVICE}?after={id1}")).await;
        assert_eq!(rest["total"], 2, "{rest}");
        assert_eq!(rest["dead_letters"][0]["id"], ids[1], "{rest}");
        assert!(rest["rest_after"].is_null(), "{rest}");
        let one = get_json(&http, &format!("/v1/dead-letters/{SERVICE}/{id1}")).await;
        assert_eq!(one["payload"]["n"], 1, "{one}");
        // The services page counts the cluster's, not what this node holds.
        let page = get_json(&http, "/v1/services").await;
        let row = page["services"]
            .as_array()
            .and_then(|rows| rows.iter().find(|row| row["name"] == SERVICE))
            .unwrap_or_else(|| panic!("no {SERVICE} row: {page}"));
        assert_eq!(row["dead_letters"], 2, "{row}");
        assert_eq!(row["backlog"], 0, "{row}");
        assert!(page.get("partial").is_none(), "{page}");
    }

    let out = dead_letters(&nodes.b, &["show", &id1]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let shown = &json_lines(&out)[0];
    assert_eq!(shown["id"], ids[0]);
    assert_eq!(shown["payload"]["n"], 1, "{shown}");
    assert_eq!(shown["activity_id"].as_str().map(str::len), Some(36));

    // Replayed through node b: delivered again to the service on node a,
    // as a first attempt, and no longer a dead letter.
    taking.store(true, Ordering::SeqCst);
    let out = dead_letters(&nodes.b, &["replay", &id1]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let replayed = &json_lines(&out)[0];
    assert_eq!(replayed["service"], SERVICE);
    assert_eq!(replayed["id"], ids[0]);
    wait_for_async("the replay delivered", T, || {
        let seen = seen
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        async move { seen.iter().filter(|(id, _)| *id == first).nth(1).copied() }
    })
    .await;
    let first_seen: Vec<u32> = seen
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .iter()
        .filter(|(id, _)| *id == first)
        .map(|(_, attempt)| *attempt)
        .collect();
    assert_eq!(first_seen, [1, 1], "the replay is not a first attempt");
    let listing = listed(&nodes.b, &[]).await;
    assert_eq!(listing.len(), 1, "{listing:?}");
    assert_eq!(listing[0]["id"], ids[1]);

    // What is gone is refused as on one broker.
    for args in [["show", id1.as_str()], ["replay", id1.as_str()]] {
        let out = dead_letters(&nodes.b, &args).await;
        assert!(!out.status.success(), "{args:?} of a replayed dead letter");
        assert!(
            stderr(&out).contains(&format!("has no dead letter {id1}")),
            "{}",
            stderr(&out)
        );
    }

    // Purged: one by id, then nothing is left to purge.
    let out = dead_letters(&nodes.b, &["purge", "--id", &id2]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(json_lines(&out)[0]["purged"], 1);
    assert!(listed(&nodes.b, &[]).await.is_empty());
    let out = dead_letters(&nodes.a, &["purge"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(json_lines(&out)[0]["purged"], 0);
    // What is gone is gone for the console too, and its purge finds none.
    let http = nodes.a.http.clone().expect("node a's HTTP port");
    let (status, body) =
        http_async(&http, "GET", &format!("/v1/dead-letters/{SERVICE}/{id1}")).await;
    assert_eq!(status, 404, "{body}");
    assert!(
        body.contains(&format!("has no dead letter {id1}")),
        "{body}"
    );
    let (status, body) =
        http_async(&http, "POST", &format!("/v1/dead-letters/{SERVICE}/purge")).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(r#""purged":0"#), "{body}");
    let (status, body) = http_async(&http, "GET", "/v1/dead-letters/nobody").await;
    assert_eq!(status, 404, "{body}");

    // With its instance gone, what is sent to the service waits in the
    // cluster: both nodes' services pages count it.
    failing.shutdown().await;
    until_every_services_row(&nodes, "the instance gone from every node", |row| {
        row["instances"].as_array().is_some_and(Vec::is_empty)
    })
    .await;
    for n in 0..3 {
        let sent = web
            .command("flaky.run")
            .json(&serde_json::json!({ "n": 10 + n }))
            .expect("a command")
            .send()
            .await;
        assert!(sent.is_ok(), "{sent:?}");
    }
    until_every_services_row(&nodes, "the backlog counted on every node", |row| {
        row["backlog"] == 3
    })
    .await;
    // /metrics: the cluster's counts come from one node only, the holder
    // of the reclaimer lease, so that Prometheus' sum is right.
    let backlog = format!("courier_cluster_backlog_messages{{service=\"{SERVICE}\"}}");
    let reclaimer = r#"courier_lease_held{lease="reclaimer"}"#;
    let (serving, silent) = wait_for_async("one node serving the cluster's counts", T, || {
        let backlog = &backlog;
        let nodes = &nodes;
        async move {
            let mut pages = Vec::new();
            for node in [&nodes.a, &nodes.b] {
                let http = node.http.clone().expect("the node's HTTP port");
                let (status, text) = http_async(&http, "GET", "/metrics").await;
                assert_eq!(status, 200, "{text}");
                pages.push(text);
            }
            let (a, b) = (pages.remove(0), pages.remove(0));
            match (metric(&a, backlog), metric(&b, backlog)) {
                (Some(3.0), None) => Some((a, b)),
                (None, Some(3.0)) => Some((b, a)),
                _ => None,
            }
        }
    })
    .await;
    assert_eq!(metric(&serving, reclaimer), Some(1.0), "{serving}");
    assert_ne!(metric(&silent, reclaimer), Some(1.0), "{silent}");
    let in_flight = format!("courier_cluster_in_flight{{service=\"{SERVICE}\"}}");
    assert_eq!(metric(&serving, &in_flight), Some(0.0), "{serving}");
    let ack_pending = format!("courier_nats_ack_pending{{consumer=\"svc-{SERVICE}\"}}");
    assert_eq!(metric(&serving, &ack_pending), Some(0.0), "{serving}");
    // Read at most every 5 s, so never much older.
    assert!(
        metric(&serving, "courier_cluster_counts_age_seconds").is_some_and(|age| age < 10.0),
        "{serving}"
    );
    assert!(!silent.contains("courier_cluster_dead_letters"), "{silent}");
    web.shutdown().await;
}

/// Waits until the services page of every node has a row for `SERVICE`
/// for which `holds`.
async fn until_every_services_row(
    nodes: &Nodes,
    what: &str,
    holds: impl Fn(&serde_json::Value) -> bool,
) {
    let holds = &holds;
    for node in [&nodes.a, &nodes.b] {
        let http = node.http.clone().expect("the node's HTTP port");
        let http = &http;
        wait_for_async(what, T, || async move {
            let page = get_json(http, "/v1/services").await;
            let rows = page["services"].as_array().cloned().unwrap_or_default();
            rows.into_iter()
                .find(|row| row["name"] == SERVICE && holds(row))
        })
        .await;
    }
}
