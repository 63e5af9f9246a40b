//! A broker whose bus port speaks TLS only, and demands client
//! certificates: the gateway's streams reach the bus in-process, with no
//! socket, so neither matters to them.

use super::ws::{next, open, put};
use super::*;

fn tls_broker(dir: &common::tempdir::Dir) -> Broker {
    let certs = dir.path().join("certs");
    let out = std::process::Command::new(common::courier_bin())
        .arg("dev-certs")
        .arg(&certs)
        .output()
        .expect("run courier dev-certs");
    assert!(out.status.success(), "{}", common::stderr(&out));
    let file = |name: &str| certs.join(name).to_str().expect("utf-8 path").to_string();
    let (cert, key, ca) = (file("server.pem"), file("server-key.pem"), file("ca.pem"));
    Broker::start_with(&[
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--tls-client-ca",
        &ca,
    ])
}

#[test]
fn sse_and_websocket_subscribers_receive_ack_and_reply_on_a_tls_only_broker() {
    let dir = common::tempdir::Dir::new("gateway-tls-only");
    let broker = tls_broker(&dir);
    let http = broker.http.clone().expect("an HTTP port");

    // Server-Sent Events: a command received, acked, then answered.
    let mut stream = Stream::subscribed(&http, "pattern=todo.create&service=todo", &[]);
    let answer = request_in_background(
        &http,
        "todo.create",
        &[("Content-Type", "application/json")],
        r#"{"text":"milk"}"#,
    );
    let got = stream.delivery();
    assert_eq!(got.data["kind"], "command");
    assert_eq!(got.data["payload"], r#"{"text":"milk"}"#);
    let delivery = got.id.expect("a delivery id");
    let acked = ack(&http, &delivery, &[]);
    assert_eq!(acked.status, 204, "{}", acked.body);
    let replied = reply(
        &http,
        &delivery,
        &[
            ("Courier-Outcome", "todo.created"),
            ("Content-Type", "application/json"),
        ],
        r#"{"id":7}"#,
    );
    assert_eq!(replied.status, 202, "{}", replied.body);
    let answer = answer.recv_timeout(T).expect("the request's answer");
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.body, r#"{"id":7}"#);
    assert_eq!(answer.header("courier-sender").as_deref(), Some("todo"));
    // An event too, acked: it does not come again.
    let mut events = Stream::subscribed(&http, "pattern=todo.archived&service=audit", &[]);
    let event = publish(&http, "todo.archived", "{}");
    let got = events.delivery();
    assert_eq!(got.data["id"], event.as_str());
    let acked = ack(&http, got.id.as_deref().expect("id"), &[]);
    assert_eq!(acked.status, 204, "{}", acked.body);
    events.close();
    let mut events = Stream::subscribed(&http, "pattern=todo.archived&service=audit", &[]);
    assert!(events.quiet_for(Duration::from_millis(300)));

    // WebSocket: the same, settled and answered by frames.
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    runtime.block_on(async {
        let mut socket = open(&http, "pattern=bill.charge&service=billing").await;
        let answer = request_in_background(&http, "bill.charge", &[], r#"{"cents":250}"#);
        let delivered = next(&mut socket).await;
        assert_eq!(delivered["type"], "delivery", "{delivered}");
        assert_eq!(delivered["kind"], "command");
        let delivery = delivered["delivery"].as_str().expect("a delivery id");
        for out in [
            serde_json::json!({"type": "ack", "delivery": delivery}),
            serde_json::json!({"type": "reply", "delivery": delivery, "outcome": "bill.charged", "payload": {"ok": true}, "ref": 1}),
        ] {
            put(&mut socket, out).await;
        }
        let replied = next(&mut socket).await;
        assert_eq!(replied["type"], "replied", "{replied}");
        assert_eq!(replied["ref"], 1);
        let answer = tokio::task::spawn_blocking(move || answer.recv_timeout(T))
            .await
            .expect("join")
            .expect("the request's answer");
        assert_eq!(answer.status, 200, "{}", answer.body);
        assert_eq!(answer.body, r#"{"ok":true}"#);
        assert_eq!(
            answer.header("courier-outcome").as_deref(),
            Some("bill.charged")
        );
        assert_eq!(answer.header("courier-sender").as_deref(), Some("billing"));
    });
}
