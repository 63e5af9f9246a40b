//! The HTTP gateway against a real `courier serve`: plain HTTP requests,
//! answered by services on the bus.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use common::Broker;
use courier_client::{Client, ClientOptions};

const T: Duration = Duration::from_secs(20);

struct Answer {
    status: u16,
    head: String,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|line| {
            let (k, v) = line.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

/// `POST path` with headers and a body, over HTTP/1.1.
fn post(http: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Answer {
    let (status, head, body) = common::http_exchange(http, "POST", path, headers, body);
    Answer { status, head, body }
}

async fn connect(broker: &Broker, service: &str, token: Option<&str>) -> Client {
    let mut opts = ClientOptions::new(&broker.addr, service);
    opts.token = token.map(str::to_string);
    Client::connect(opts).await.expect("connect")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_posted_command_reaches_its_handler_with_its_content_type_and_id() {
    let broker = Broker::start();
    let http = broker.http.clone().expect("an HTTP port");
    let todo = connect(&broker, "todo", None).await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    todo.on("todo.create", move |msg| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(msg.message().clone());
            Ok::<(), courier_client::Error>(())
        }
    })
    .await
    .expect("subscribe");

    let id = "0190e0a0-0000-7000-8000-000000000001";
    let answer = tokio::task::spawn_blocking(move || {
        post(
            &http,
            "/v1/messages/todo.create",
            &[("Content-Type", "application/json"), ("Courier-Id", id)],
            r#"{"text":"milk"}"#,
        )
    })
    .await
    .expect("join");
    assert_eq!(answer.status, 202, "{}", answer.body);
    // The id, and where the broker's log holds the message.
    let accepted = answer.json();
    assert_eq!(accepted["id"], id);
    let seq = accepted["seq"]
        .as_u64()
        .expect("a durable message has a seq");
    assert!(seq >= 1, "{accepted}");
    assert_eq!(accepted.as_object().map(|o| o.len()), Some(2), "{accepted}");

    let got = tokio::time::timeout(T, rx.recv())
        .await
        .expect("delivered")
        .expect("a message");
    assert_eq!(got.id.to_string(), id);
    assert_eq!(&got.payload[..], br#"{"text":"milk"}"#);
    assert!(got
        .headers
        .iter()
        .any(|(k, v)| k == "content-type" && v == "application/json"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_is_answered_with_the_final_reply_or_504_after_its_timeout() {
    let broker = Broker::start();
    let http = broker.http.clone().expect("an HTTP port");
    let todo = connect(&broker, "todo", None).await;
    todo.on("todo.create", |msg| async move {
        msg.reply("todo.created", &serde_json::json!({"id": 7}))
            .await?;
        Ok::<(), courier_client::Error>(())
    })
    .await
    .expect("subscribe");
    // Handles todo.archive and never replies.
    todo.on("todo.archive", |_msg| async move {
        Ok::<(), courier_client::Error>(())
    })
    .await
    .expect("subscribe");

    let (answer, late, unrouted) = tokio::task::spawn_blocking(move || {
        (
            post(
                &http,
                "/v1/requests/todo.create?timeout=10s",
                &[],
                r#"{"text":"milk"}"#,
            ),
            post(&http, "/v1/requests/todo.archive?timeout=300ms", &[], "{}"),
            // Refused by the broker, durable or transient (a transient
            // command goes QUIET: only its refusal is answered).
            [
                post(&http, "/v1/requests/todo.nobody?timeout=10s", &[], "{}"),
                post(
                    &http,
                    "/v1/requests/todo.nobody?timeout=10s",
                    &[("Courier-Transient", "true")],
                    "{}",
                ),
            ],
        )
    })
    .await
    .expect("join");
    for refused in &unrouted {
        assert_eq!(refused.status, 404, "{}", refused.body);
        assert_eq!(
            refused.header("courier-error").as_deref(),
            Some("no_receiver")
        );
    }
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(
        answer.header("courier-outcome").as_deref(),
        Some("todo.created")
    );
    assert_eq!(answer.json()["id"], 7);
    assert_eq!(late.status, 504, "{}", late.body);
    assert_eq!(
        late.header("content-type").as_deref(),
        Some("application/problem+json")
    );
}

#[test]
fn bad_envelope_headers_and_timeouts_are_refused_with_the_fix() {
    let broker = Broker::start();
    let http = broker.http.clone().expect("an HTTP port");
    let bad_id = post(
        &http,
        "/v1/messages/todo.create",
        &[("Courier-Id", "seven")],
        "",
    );
    assert_eq!(bad_id.status, 400);
    assert!(bad_id.json()["detail"]
        .as_str()
        .unwrap_or("")
        .contains("UUID"));
    let bad_timeout = post(&http, "/v1/requests/todo.create?timeout=forever", &[], "");
    assert_eq!(bad_timeout.status, 400);
    let bad_name = post(&http, "/v1/messages/Todo..Create", &[], "");
    assert_eq!(bad_name.status, 400, "{}", bad_name.body);
}

fn write_manifest(path: &Path, web_hash: &str, todo_hash: &str, admin_hash: &str) {
    std::fs::write(
        path,
        format!(
            r#"[services.web]
sends = ["todo.create@1"]
receives = ["todo.created@1"]
tokens = ["{web_hash}"]

[services.todo]
receives = ["todo.create@1"]
sends = ["todo.created@1"]
tokens = ["{todo_hash}"]

[admin]
tokens = ["{admin_hash}"]
"#
        ),
    )
    .expect("write manifest");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_a_manifest_the_gateway_takes_service_tokens_and_keeps_the_rules() {
    let dir = common::tempdir::Dir::new("gateway-manifest");
    let (web, web_hash) = common::token_pair();
    let (todo_token, todo_hash) = common::token_pair();
    let (admin, admin_hash) = common::token_pair();
    let path = dir.path().join("courier.toml");
    write_manifest(&path, &web_hash, &todo_hash, &admin_hash);
    let broker = Broker::start_with(&["--manifest", path.to_str().expect("utf-8 path")]);
    let http = broker.http.clone().expect("an HTTP port");
    let todo = connect(&broker, "", Some(&todo_token)).await;
    todo.on("todo.create", |msg| async move {
        msg.reply("todo.created", &serde_json::json!({"ok": true}))
            .await?;
        Ok::<(), courier_client::Error>(())
    })
    .await
    .expect("subscribe");

    let answers = tokio::task::spawn_blocking(move || {
        let bearer = |t: &str| format!("Bearer {t}");
        let web_auth = bearer(&web);
        let admin_auth = bearer(&admin);
        vec![
            post(&http, "/v1/messages/todo.create", &[], "{}"),
            post(
                &http,
                "/v1/messages/todo.create",
                &[("Authorization", "Bearer nope")],
                "{}",
            ),
            post(
                &http,
                "/v1/messages/todo.create",
                &[("Authorization", &admin_auth)],
                "{}",
            ),
            post(
                &http,
                "/v1/messages/todo.created",
                &[("Authorization", &web_auth)],
                "{}",
            ),
            post(
                &http,
                "/v1/requests/todo.create",
                &[("Authorization", &web_auth)],
                "{}",
            ),
        ]
    })
    .await
    .expect("join");
    assert_eq!(answers[0].status, 401, "{}", answers[0].body);
    assert_eq!(answers[1].status, 401, "{}", answers[1].body);
    assert_eq!(answers[2].status, 403, "{}", answers[2].body);
    // The manifest lets web send todo.create only: the broker's refusal,
    // with its code, comes back as problem+json.
    assert_eq!(answers[3].status, 403, "{}", answers[3].body);
    assert_eq!(
        answers[3].header("courier-error").as_deref(),
        Some("unauthorized")
    );
    assert!(answers[3].json()["detail"]
        .as_str()
        .unwrap_or("")
        .contains("unauthorized"));
    assert_eq!(answers[4].status, 200, "{}", answers[4].body);
    assert_eq!(
        answers[4].header("courier-outcome").as_deref(),
        Some("todo.created")
    );
}

/// `GET path`, no credentials: the answer, its body de-chunked.
fn get(http: &str, path: &str) -> Answer {
    let addr = http.trim_start_matches("http://").trim_end_matches('/');
    let mut s = TcpStream::connect(addr).expect("connect to the HTTP port");
    s.set_read_timeout(Some(T)).expect("timeout");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("read answer");
    let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status code");
    Answer {
        status,
        head: head.to_string(),
        body: body.to_string(),
    }
}

fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n").expect("chunk size line");
        let size = usize::from_str_radix(size.trim(), 16).expect("hex chunk size");
        if size == 0 {
            return out;
        }
        out.push_str(&after[..size]);
        rest = after[size..].trim_start_matches("\r\n");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_of_replies_comes_as_ndjson_and_async_requests_are_polled() {
    let broker = Broker::start();
    let http = broker.http.clone().expect("an HTTP port");
    let todo = connect(&broker, "todo", None).await;
    todo.on("todos.export", |msg| async move {
        for n in 0..3 {
            msg.reply_progress("todos.exported.part", &serde_json::json!({ "n": n }))
                .await?;
        }
        msg.reply("todos.exported", &serde_json::json!({ "parts": 3 }))
            .await?;
        Ok::<(), courier_client::Error>(())
    })
    .await
    .expect("subscribe");

    let streamed = {
        let http = http.clone();
        tokio::task::spawn_blocking(move || post(&http, "/v1/requests/todos.export", &[], "{}"))
            .await
            .expect("join")
    };
    assert_eq!(streamed.status, 200, "{}", streamed.body);
    assert_eq!(
        streamed.header("content-type").as_deref(),
        Some("application/x-ndjson")
    );
    let lines: Vec<serde_json::Value> = dechunk(&streamed.body)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(lines.len(), 4, "{lines:?}");
    assert_eq!(lines[1]["payload"]["n"], 1);
    assert_eq!(lines[3]["name"], "todos.exported");
    assert_eq!(lines[3]["final"], true);

    let accepted = {
        let http = http.clone();
        tokio::task::spawn_blocking(move || {
            post(
                &http,
                "/v1/requests/todos.export",
                &[("Prefer", "respond-async")],
                "{}",
            )
        })
        .await
        .expect("join")
    };
    assert_eq!(accepted.status, 202, "{}", accepted.body);
    let location = accepted.header("location").expect("a Location");
    let deadline = std::time::Instant::now() + T;
    let done = loop {
        let http = http.clone();
        let location = location.clone();
        let polled = tokio::task::spawn_blocking(move || get(&http, &location))
            .await
            .expect("join");
        assert_eq!(polled.status, 200, "{}", polled.body);
        let status = polled.json()["status"].as_str().unwrap_or("").to_string();
        assert!(status == "pending" || status == "done", "{status}");
        if status == "done" {
            break polled.json();
        }
        assert!(std::time::Instant::now() < deadline, "still pending");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(done["replies"].as_array().map(Vec::len), Some(4));
    assert_eq!(done["replies"][3]["payload"]["parts"], 3);

    let unknown = tokio::task::spawn_blocking(move || {
        get(&http, "/v1/requests/0190e0a0-0000-7000-8000-0000000000ff")
    })
    .await
    .expect("join");
    assert_eq!(unknown.status, 404, "{}", unknown.body);
}
