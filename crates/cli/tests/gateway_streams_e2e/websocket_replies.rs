//! Commands delivered over WebSocket, answered by reply frames.

use super::ws::{next, open, put};
use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_delivered_over_websocket_is_answered_by_reply_frames() {
    let broker = Broker::start();
    let http = broker.http.clone().expect("an HTTP port");
    let mut socket = open(&http, "pattern=todo.create&service=todo").await;

    // A single final reply.
    let answer = request_in_background(&http, "todo.create", &[], r#"{"text":"milk"}"#);
    let delivered = next(&mut socket).await;
    assert_eq!(delivered["kind"], "command", "{delivered}");
    let delivery = delivered["delivery"].as_str().expect("a delivery id");
    put(
        &mut socket,
        serde_json::json!({"type": "reply", "delivery": delivery, "ref": 0}),
    )
    .await;
    let unnamed = next(&mut socket).await;
    assert_eq!(unnamed["type"], "error", "{unnamed}");
    assert!(unnamed["detail"].as_str().unwrap_or("").contains("outcome"));
    put(
        &mut socket,
        serde_json::json!({"type": "reply", "delivery": delivery, "outcome": "todo.created", "payload": {"id": 7}, "ref": 1}),
    )
    .await;
    let replied = next(&mut socket).await;
    assert_eq!(replied["type"], "replied", "{replied}");
    assert_eq!(replied["ref"], 1);
    assert_eq!(replied["final"], true);
    let answer = tokio::task::spawn_blocking(move || answer.recv_timeout(T))
        .await
        .expect("join")
        .expect("the request's answer");
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.body, r#"{"id":7}"#);
    assert_eq!(
        answer.header("courier-outcome").as_deref(),
        Some("todo.created")
    );
    assert_eq!(
        answer.header("courier-id").as_deref(),
        replied["id"].as_str()
    );
    // The final reply acked it.
    put(
        &mut socket,
        serde_json::json!({"type": "ack", "delivery": delivery, "ref": 2}),
    )
    .await;
    let settled = next(&mut socket).await;
    assert_eq!(settled["type"], "error", "{settled}");
    assert_eq!(settled["ref"], 2);

    // A stream of replies, read by the requester as ndjson.
    let answer = request_in_background(&http, "todo.create", &[], "{}");
    let delivered = next(&mut socket).await;
    let delivery = delivered["delivery"].as_str().expect("a delivery id");
    for (n, outcome, is_final) in [(1, "todo.validated", false), (2, "todo.created", true)] {
        put(
            &mut socket,
            serde_json::json!({"type": "reply", "delivery": delivery, "outcome": outcome, "final": is_final, "payload": {"n": n}}),
        )
        .await;
        let replied = next(&mut socket).await;
        assert_eq!(replied["type"], "replied", "{replied}");
        assert_eq!(replied["final"], is_final);
    }
    let answer = tokio::task::spawn_blocking(move || answer.recv_timeout(T))
        .await
        .expect("join")
        .expect("the request's answer");
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(
        answer.header("content-type").as_deref(),
        Some("application/x-ndjson")
    );
    let lines: Vec<serde_json::Value> = answer
        .body
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(lines.len(), 2, "{}", answer.body);
    assert_eq!(lines[0]["name"], "todo.validated");
    assert_eq!(lines[0]["final"], false);
    assert_eq!(lines[0]["payload"], serde_json::json!({"n": 1}));
    assert_eq!(lines[1]["name"], "todo.created");
    assert_eq!(lines[1]["final"], true);
    assert_eq!(lines[1]["sender"], "todo");
}
