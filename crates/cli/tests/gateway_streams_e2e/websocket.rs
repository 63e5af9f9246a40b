//! Durable subscriptions over WebSocket: deliveries as frames, settled by frames.

use super::ws::{next, open, put};
use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_come_as_frames_and_an_ack_frame_settles_them() {
    let broker = Broker::start();
    let http = broker.http.clone().expect("an HTTP port");
    let query = "pattern=todo.*&service=notifier&max_in_flight=1";
    let mut socket = open(&http, query).await;
    put(
        &mut socket,
        serde_json::json!({"type": "send", "name": "todo.created", "payload": {"n": 1}, "ref": 1}),
    )
    .await;
    let sent = next(&mut socket).await;
    assert_eq!(sent["type"], "sent", "{sent}");
    assert_eq!(sent["ref"], 1);
    let delivered = next(&mut socket).await;
    assert_eq!(delivered["type"], "delivery", "{delivered}");
    assert_eq!(delivered["id"], sent["id"]);
    assert_eq!(delivered["payload"], r#"{"n":1}"#);
    assert_eq!(delivered["headers"]["content-type"], "application/json");
    let delivery = delivered["delivery"].as_str().expect("a delivery id");

    // A nack with a delay brings it back, counted.
    put(
        &mut socket,
        serde_json::json!({"type": "nack", "delivery": delivery, "delay": "10ms"}),
    )
    .await;
    let again = next(&mut socket).await;
    assert_eq!(again["id"], sent["id"], "{again}");
    assert_eq!(again["attempt"], 2);
    let delivery = again["delivery"].as_str().expect("a delivery id");
    put(
        &mut socket,
        serde_json::json!({"type": "ack", "delivery": delivery}),
    )
    .await;
    // Settled: acking it again is an error, answered on the socket.
    put(
        &mut socket,
        serde_json::json!({"type": "ack", "delivery": delivery, "ref": "twice"}),
    )
    .await;
    let twice = next(&mut socket).await;
    assert_eq!(twice["type"], "error", "{twice}");
    assert_eq!(twice["ref"], "twice");
    let _ = socket.close(None).await;

    // The acked one never comes again; the next does.
    let mut socket = open(&http, query).await;
    let later = {
        let http = http.clone();
        tokio::task::spawn_blocking(move || publish(&http, "todo.updated", "{}"))
            .await
            .expect("join")
    };
    let got = next(&mut socket).await;
    assert_eq!(got["id"], later.as_str(), "{got}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_websocket_gets_problem_json_before_the_upgrade() {
    let broker = Broker::start();
    let http = broker.http.clone().expect("an HTTP port");
    let url = format!("ws://{}/v1/ws?service=notifier", addr_of(&http));
    match tokio_tungstenite::connect_async(url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status().as_u16(), 400);
            let body = response.body().as_deref().unwrap_or_default();
            let problem: serde_json::Value = serde_json::from_slice(body).expect("JSON");
            assert!(problem["detail"]
                .as_str()
                .unwrap_or("")
                .contains("?pattern="));
        }
        other => panic!("expected a 400 answer, got {other:?}"),
    }
}
