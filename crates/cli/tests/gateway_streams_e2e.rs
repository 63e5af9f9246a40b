//! The HTTP gateway's streams against a real `courier serve`: durable
//! subscriptions as Server-Sent Events and over WebSocket, and replies
//! posted to webhooks.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::Duration;

use common::Broker;

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

fn addr_of(http: &str) -> &str {
    http.trim_start_matches("http://").trim_end_matches('/')
}

/// `POST path` over HTTP/1.0 (so the answer ends with the connection).
fn post(http: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Answer {
    let addr = addr_of(http);
    let mut s = TcpStream::connect(addr).expect("connect to the HTTP port");
    s.set_read_timeout(Some(T)).expect("timeout");
    let mut extra = String::new();
    for (k, v) in headers {
        extra.push_str(&format!("{k}: {v}\r\n"));
    }
    write!(
        s,
        "POST {path} HTTP/1.0\r\nHost: {addr}\r\n{extra}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("write request");
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("read answer");
    let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
    Answer {
        status: status_of(head),
        head: head.to_string(),
        body: body.to_string(),
    }
}

fn status_of(head: &str) -> u16 {
    head.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status code")
}

/// Publishes an event through the gateway: its message id.
fn publish(http: &str, name: &str, body: &str) -> String {
    let answer = post(
        http,
        &format!("/v1/messages/{name}"),
        &[("Content-Type", "application/json")],
        body,
    );
    assert_eq!(answer.status, 202, "{}", answer.body);
    answer.json()["id"].as_str().expect("an id").to_string()
}

/// One Server-Sent Event.
#[derive(Debug)]
struct Event {
    event: String,
    id: Option<String>,
    data: serde_json::Value,
}

/// A `GET /v1/subscribe` stream, read as it comes.
struct Stream {
    reader: BufReader<TcpStream>,
}

impl Stream {
    /// Opens the stream; the answer instead if it was refused.
    fn open(http: &str, query: &str, headers: &[(&str, &str)]) -> Result<Stream, Answer> {
        let addr = addr_of(http);
        let mut s = TcpStream::connect(addr).expect("connect to the HTTP port");
        s.set_read_timeout(Some(T)).expect("timeout");
        let mut extra = String::new();
        for (k, v) in headers {
            extra.push_str(&format!("{k}: {v}\r\n"));
        }
        // HTTP/1.0: the stream comes as it is, not chunked.
        write!(
            s,
            "GET /v1/subscribe?{query} HTTP/1.0\r\nHost: {addr}\r\nAccept: text/event-stream\r\n{extra}\r\n"
        )
        .expect("write request");
        let mut reader = BufReader::new(s);
        let mut head = String::new();
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).expect("read the head");
            if line == "\r\n" || line.is_empty() {
                break;
            }
            head.push_str(&line);
        }
        let status = status_of(&head);
        if status != 200 {
            let mut body = String::new();
            reader.read_to_string(&mut body).expect("read the body");
            return Err(Answer { status, head, body });
        }
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: text/event-stream"),
            "{head}"
        );
        Ok(Stream { reader })
    }

    /// Opens the stream and waits for its `subscribed` event.
    fn subscribed(http: &str, query: &str, headers: &[(&str, &str)]) -> Stream {
        let mut stream = Stream::open(http, query, headers)
            .unwrap_or_else(|refused| panic!("{}: {}", refused.status, refused.body));
        let first = stream.next();
        assert_eq!(first.event, "subscribed", "{first:?}");
        stream
    }

    fn next(&mut self) -> Event {
        let mut event = String::from("message");
        let mut id = None;
        let mut data = String::new();
        loop {
            let mut line = String::new();
            let n = self.reader.read_line(&mut line).expect("read an event");
            assert!(n > 0, "the stream ended");
            let line = line.trim_end_matches(['\r', '\n']);
            if line.is_empty() {
                if data.is_empty() {
                    continue;
                }
                return Event {
                    event,
                    id,
                    data: serde_json::from_str(&data).expect("JSON data"),
                };
            }
            if let Some(v) = line.strip_prefix("event:") {
                event = v.trim().to_string();
            } else if let Some(v) = line.strip_prefix("id:") {
                id = Some(v.trim().to_string());
            } else if let Some(v) = line.strip_prefix("data:") {
                data.push_str(v.trim_start());
            }
        }
    }

    /// The next delivery event.
    fn delivery(&mut self) -> Event {
        let event = self.next();
        assert_eq!(event.event, "delivery", "{event:?}");
        assert_eq!(event.id.as_deref(), event.data["delivery"].as_str());
        event
    }

    /// Whether nothing but keep-alive comments arrives for `wait`.
    fn quiet_for(&mut self, wait: Duration) -> bool {
        self.reader
            .get_ref()
            .set_read_timeout(Some(wait))
            .expect("timeout");
        let mut line = String::new();
        let quiet = match self.reader.read_line(&mut line) {
            Ok(_) => line.starts_with(':'),
            Err(e) => matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
        };
        self.reader
            .get_ref()
            .set_read_timeout(Some(T))
            .expect("timeout");
        quiet
    }

    /// Goes away as a client does: the connection closes.
    fn close(self) {
        let _ = self.reader.get_ref().shutdown(Shutdown::Both);
    }
}

fn ack(http: &str, delivery: &str, headers: &[(&str, &str)]) -> Answer {
    post(http, &format!("/v1/acks/{delivery}"), headers, "")
}

#[test]
fn a_published_event_arrives_as_an_sse_delivery_and_an_ack_removes_it() {
    let broker = Broker::start();
    let http = broker.http.clone().expect("an HTTP port");
    let mut stream = Stream::subscribed(&http, "pattern=todo.*&service=notifier", &[]);
    let answer = post(
        &http,
        "/v1/messages/todo.created",
        &[
            ("Content-Type", "application/json"),
            ("Courier-Key", "user-1"),
        ],
        r#"{"text":"milk"}"#,
    );
    assert_eq!(answer.status, 202, "{}", answer.body);
    let id = answer.json()["id"].as_str().expect("an id").to_string();

    let got = stream.delivery();
    assert_eq!(got.data["id"], id.as_str());
    assert_eq!(got.data["name"], "todo.created");
    assert_eq!(got.data["kind"], "event");
    assert_eq!(got.data["key"], "user-1");
    assert_eq!(got.data["attempt"], 1);
    assert_eq!(got.data["encoding"], "utf-8");
    assert_eq!(got.data["payload"], r#"{"text":"milk"}"#);
    assert_eq!(got.data["headers"]["content-type"], "application/json");
    let delivery = got.id.expect("an event id");
    let acked = ack(&http, &delivery, &[]);
    assert_eq!(acked.status, 204, "{}", acked.body);
    let again = ack(&http, &delivery, &[]);
    assert_eq!(again.status, 404, "{}", again.body);
    assert_eq!(
        again.header("content-type").as_deref(),
        Some("application/problem+json")
    );
    stream.close();

    // A second connection of the service gets what came after, and not
    // the acked event.
    let mut second = Stream::subscribed(&http, "pattern=todo.*&service=notifier", &[]);
    let later = publish(&http, "todo.updated", r#"{"n":2}"#);
    let got = second.delivery();
    assert_eq!(got.data["id"], later.as_str(), "{got:?}");
}

#[test]
fn binary_payloads_come_as_base64() {
    let broker = Broker::start();
    let http = broker.http.clone().expect("an HTTP port");
    let mut stream = Stream::subscribed(&http, "pattern=blob.*&service=store", &[]);
    let addr = addr_of(&http);
    let mut s = TcpStream::connect(addr).expect("connect");
    let body = [0xffu8, 0x00, 0x01];
    write!(
        s,
        "POST /v1/messages/blob.stored HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/octet-stream\r\nContent-Length: 3\r\n\r\n"
    )
    .expect("write");
    s.write_all(&body).expect("write body");
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("read");
    assert!(answer.starts_with("HTTP/1.0 202"), "{answer}");
    let got = stream.delivery();
    assert_eq!(got.data["encoding"], "base64");
    assert_eq!(got.data["payload"], "/wAB");
}

#[test]
fn an_unacked_delivery_comes_back_after_a_reconnect_with_last_event_id() {
    let broker = Broker::start();
    let http = broker.http.clone().expect("an HTTP port");
    let query = "pattern=todo.*&service=notifier";
    let mut first = Stream::subscribed(&http, query, &[]);
    let a = publish(&http, "todo.created", r#"{"n":1}"#);
    let b = publish(&http, "todo.created", r#"{"n":2}"#);
    let got_a = first.delivery();
    let got_b = first.delivery();
    assert_eq!(got_a.data["id"], a.as_str());
    assert_eq!(got_b.data["id"], b.as_str());
    let acked = ack(&http, got_a.id.as_deref().expect("id"), &[]);
    assert_eq!(acked.status, 204, "{}", acked.body);
    let last = got_b.id.expect("id");
    first.close();

    let mut second = Stream::subscribed(&http, query, &[("Last-Event-ID", &last)]);
    let again = second.delivery();
    assert_eq!(again.data["id"], b.as_str(), "{again:?}");
    assert_eq!(again.data["attempt"], 2);
    let c = publish(&http, "todo.created", r#"{"n":3}"#);
    let next = second.delivery();
    // Not the acked one.
    assert_eq!(next.data["id"], c.as_str(), "{next:?}");
}

#[test]
fn max_in_flight_holds_back_deliveries_until_acked_and_a_nack_redelivers() {
    let broker = Broker::start();
    let http = broker.http.clone().expect("an HTTP port");
    let mut stream = Stream::subscribed(
        &http,
        "pattern=todo.*&service=notifier&max_in_flight=1",
        &[],
    );
    let ids: Vec<String> = (0..3)
        .map(|n| publish(&http, "todo.created", &format!(r#"{{"n":{n}}}"#)))
        .collect();
    let first = stream.delivery();
    assert_eq!(first.data["id"], ids[0].as_str());
    assert!(
        stream.quiet_for(Duration::from_millis(700)),
        "a second delivery came while the first was unacked"
    );
    let nacked = post(
        &http,
        &format!("/v1/nacks/{}?delay=10ms", first.id.as_deref().expect("id")),
        &[],
        "",
    );
    assert_eq!(nacked.status, 204, "{}", nacked.body);
    // One at a time still: each comes after the one before was acked;
    // the nacked one again, with its attempt counted.
    let mut seen = Vec::new();
    for _ in 0..3 {
        let got = stream.delivery();
        seen.push((
            got.data["id"].as_str().unwrap_or("").to_string(),
            got.data["attempt"].as_u64().unwrap_or(0),
        ));
        assert!(
            stream.quiet_for(Duration::from_millis(200)),
            "more than one delivery in flight: {seen:?}"
        );
        assert_eq!(ack(&http, got.id.as_deref().expect("id"), &[]).status, 204);
    }
    seen.sort();
    let mut expected = vec![
        (ids[0].clone(), 2),
        (ids[1].clone(), 1),
        (ids[2].clone(), 1),
    ];
    expected.sort();
    assert_eq!(seen, expected);
    let bad = post(&http, "/v1/nacks/whatever?delay=soon", &[], "");
    assert_eq!(bad.status, 400, "{}", bad.body);
}

#[test]
fn with_auto_ack_a_delivery_is_acked_as_it_is_sent() {
    let broker = Broker::start();
    let http = broker.http.clone().expect("an HTTP port");
    let query = "pattern=todo.*&service=notifier&ack=auto&max_in_flight=1";
    let mut stream = Stream::subscribed(&http, query, &[]);
    let a = publish(&http, "todo.created", r#"{"n":1}"#);
    let b = publish(&http, "todo.created", r#"{"n":2}"#);
    let got_a = stream.delivery();
    // With max_in_flight=1, b comes only because a was acked.
    let got_b = stream.delivery();
    assert_eq!(got_a.data["id"], a.as_str());
    assert_eq!(got_b.data["id"], b.as_str());
    let settled = ack(&http, got_a.id.as_deref().expect("id"), &[]);
    assert_eq!(settled.status, 404, "{}", settled.body);
    stream.close();
    let mut again = Stream::subscribed(&http, query, &[]);
    let c = publish(&http, "todo.created", r#"{"n":3}"#);
    assert_eq!(again.delivery().data["id"], c.as_str());
}

#[test]
fn bad_subscribe_queries_are_refused_with_the_fix() {
    let broker = Broker::start();
    let http = broker.http.clone().expect("an HTTP port");
    for (query, needle) in [
        ("service=notifier", "?pattern="),
        ("pattern=todo.*", "?service="),
        (
            "pattern=todo.*&service=notifier&max_in_flight=0",
            "max_in_flight",
        ),
        ("pattern=todo.*&service=notifier&ack=sometimes", "?ack="),
        ("pattern=Todo..*&service=notifier", "empty segment"),
    ] {
        let refused = match Stream::open(&http, query, &[]) {
            Ok(_) => panic!("{query} was taken"),
            Err(refused) => refused,
        };
        assert_eq!(refused.status, 400, "{query}: {}", refused.body);
        assert_eq!(
            refused.header("content-type").as_deref(),
            Some("application/problem+json")
        );
        let detail = refused.json()["detail"].as_str().unwrap_or("").to_string();
        assert!(detail.contains(needle), "{query}: {detail}");
    }
}

fn token_pair() -> (String, String) {
    let out = std::process::Command::new(common::courier_bin())
        .args(["token", "new"])
        .output()
        .expect("run");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut lines = text.lines();
    (
        lines.next().expect("token").to_string(),
        lines.next().expect("hash").to_string(),
    )
}

/// A broker with a manifest: `web` sends todo.create and receives
/// todo.created; `notifier` receives todo.created.
fn manifest_broker(dir: &common::tempdir::Dir) -> (Broker, String, String) {
    let (web, web_hash) = token_pair();
    let (notifier, notifier_hash) = token_pair();
    let path = dir.path().join("courier.toml");
    std::fs::write(
        &path,
        format!(
            r#"[services.web]
sends = ["todo.create@1", "todo.created@1"]
receives = ["todo.created@1"]
tokens = ["{web_hash}"]

[services.notifier]
receives = ["todo.created@1"]
tokens = ["{notifier_hash}"]
"#
        ),
    )
    .expect("write manifest");
    let broker = Broker::start_with(&["--manifest", path.to_str().expect("utf-8 path")]);
    (broker, web, notifier)
}

#[test]
fn under_a_manifest_subscribing_takes_the_service_token_and_its_rules() {
    let dir = common::tempdir::Dir::new("gateway-subscribe-manifest");
    let (broker, web, notifier) = manifest_broker(&dir);
    let http = broker.http.clone().expect("an HTTP port");
    let notifier_auth = format!("Bearer {notifier}");
    let web_auth = format!("Bearer {web}");
    let refusals = [
        (Vec::new(), "pattern=todo.*", 401),
        (
            vec![("Authorization", "Bearer nope")],
            "pattern=todo.*",
            401,
        ),
        (
            vec![("Authorization", notifier_auth.as_str())],
            "pattern=todo.*&service=web",
            403,
        ),
        // The manifest lets notifier receive todo.created only.
        (
            vec![("Authorization", notifier_auth.as_str())],
            "pattern=billing.*",
            403,
        ),
    ];
    for (headers, query, status) in refusals {
        let refused = match Stream::open(&http, query, &headers) {
            Ok(_) => panic!("{query} with {headers:?} was taken"),
            Err(refused) => refused,
        };
        assert_eq!(refused.status, status, "{query}: {}", refused.body);
        assert_eq!(
            refused.header("content-type").as_deref(),
            Some("application/problem+json"),
            "{query}"
        );
        assert!(refused.json()["detail"].is_string());
    }

    let auth = [("Authorization", notifier_auth.as_str())];
    let mut stream = Stream::subscribed(&http, "pattern=todo.*&service=notifier", &auth);
    let sent = post(
        &http,
        "/v1/messages/todo.created",
        &[("Authorization", &web_auth)],
        "{}",
    );
    assert_eq!(sent.status, 202, "{}", sent.body);
    let got = stream.delivery();
    assert_eq!(got.data["sender"], "web");
    let delivery = got.id.expect("id");
    // Only the subscriber's own token settles its deliveries.
    let foreign = ack(&http, &delivery, &[("Authorization", &web_auth)]);
    assert_eq!(foreign.status, 404, "{}", foreign.body);
    let own = ack(&http, &delivery, &auth);
    assert_eq!(own.status, 204, "{}", own.body);
}

mod websocket {
    use super::*;
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message as Frame;

    pub(super) type Socket = tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >;

    async fn open(http: &str, query: &str) -> Socket {
        let url = format!("ws://{}/v1/ws?{query}", addr_of(http));
        let (mut socket, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("a WebSocket");
        let first = next(&mut socket).await;
        assert_eq!(first["type"], "subscribed", "{first}");
        socket
    }

    pub(super) async fn next(socket: &mut Socket) -> serde_json::Value {
        loop {
            let frame = tokio::time::timeout(T, socket.next())
                .await
                .expect("a frame in time")
                .expect("the socket open")
                .expect("a good frame");
            if let Frame::Text(text) = frame {
                return serde_json::from_str(text.as_str()).expect("JSON");
            }
        }
    }

    async fn put(socket: &mut Socket, frame: serde_json::Value) {
        socket
            .send(Frame::Text(frame.to_string().into()))
            .await
            .expect("send a frame");
    }

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
}

mod webhooks {
    use super::*;
    use hmac::{Hmac, KeyInit, Mac};
    use std::net::TcpListener;
    use std::sync::mpsc;

    /// A request the webhook endpoint received.
    struct Post {
        head: String,
        body: Vec<u8>,
    }

    impl Post {
        fn header(&self, name: &str) -> String {
            self.head
                .lines()
                .find_map(|line| {
                    let (k, v) = line.split_once(':')?;
                    k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
                })
                .unwrap_or_else(|| panic!("no {name} in {}", self.head))
        }

        /// Checks `Courier-Signature` as a receiver would.
        fn verify(&self, secret: &str) {
            let signature = self.header("courier-signature");
            let (t, v1) = signature
                .split_once(',')
                .and_then(|(t, v)| Some((t.strip_prefix("t=")?, v.strip_prefix("v1=")?)))
                .unwrap_or_else(|| panic!("t=…,v1=… expected: {signature}"));
            let sent: u64 = t.parse().expect("a unix time");
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock")
                .as_secs();
            assert!(now.abs_diff(sent) < 60, "stale timestamp {sent}");
            let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("a key");
            mac.update(format!("{t}.").as_bytes());
            mac.update(&self.body);
            let expected: String = mac
                .finalize()
                .into_bytes()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            assert_eq!(v1, expected, "the signature does not verify");
        }
    }

    /// A webhook endpoint answering the i-th POST with `statuses[i]`
    /// (200 past the end).
    fn endpoint(statuses: Vec<u16>) -> (String, mpsc::Receiver<Post>) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!(
            "http://{}/hook?from=courier",
            listener.local_addr().expect("addr")
        );
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for (n, stream) in listener.incoming().enumerate() {
                let Ok(stream) = stream else { return };
                let mut reader = BufReader::new(stream);
                let mut head = String::new();
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        break;
                    }
                    if line == "\r\n" {
                        break;
                    }
                    head.push_str(&line);
                }
                let length: usize = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse().ok())?
                    })
                    .unwrap_or(0);
                let mut body = vec![0; length];
                let _ = reader.read_exact(&mut body);
                let status = statuses.get(n).copied().unwrap_or(200);
                let _ = write!(
                    reader.get_mut(),
                    "HTTP/1.1 {status} Whatever\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
                if tx.send(Post { head, body }).is_err() {
                    return;
                }
            }
        });
        (url, rx)
    }

    /// What `courier token webhook-secret` prints for `service` of `broker`.
    fn secret_for(broker: &Broker, service: &str) -> String {
        let out = std::process::Command::new(common::courier_bin())
            .args([
                "token",
                "webhook-secret",
                "--service",
                service,
                "--data-dir",
            ])
            .arg(broker.data_dir.path())
            .output()
            .expect("run");
        assert!(out.status.success(), "{}", common::stderr(&out));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn webhook_posts(http: &str, result: &str) -> f64 {
        let (status, text) = common::http_get(http, "/metrics", None);
        assert_eq!(status, 200, "{text}");
        let series = format!("courier_gateway_webhook_posts_total{{result=\"{result}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&series)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {series} in /metrics"))
    }

    async fn responder(broker: &Broker, token: Option<&str>) -> courier_client::Client {
        let mut opts = courier_client::ClientOptions::new(
            &broker.addr,
            if token.is_some() { "" } else { "todo" },
        );
        opts.token = token.map(str::to_string);
        let todo = courier_client::Client::connect(opts)
            .await
            .expect("connect");
        todo.on("todo.create", |msg| async move {
            msg.reply_progress("todo.validated", &serde_json::json!({"step": 1}))
                .await?;
            msg.reply("todo.created", &serde_json::json!({"id": 7}))
                .await?;
            Ok::<(), courier_client::Error>(())
        })
        .await
        .expect("subscribe");
        todo
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn each_reply_is_posted_to_the_webhook_signed_with_the_services_secret() {
        let dir = common::tempdir::Dir::new("gateway-webhook-manifest");
        let (web, web_hash) = token_pair();
        let (todo_token, todo_hash) = token_pair();
        let path = dir.path().join("courier.toml");
        std::fs::write(
            &path,
            format!(
                r#"[services.web]
sends = ["todo.create@1"]
receives = ["todo.created@1", "todo.validated@1"]
tokens = ["{web_hash}"]

[services.todo]
receives = ["todo.create@1"]
sends = ["todo.created@1", "todo.validated@1"]
tokens = ["{todo_hash}"]
"#
            ),
        )
        .expect("write manifest");
        let broker = Broker::start_with(&["--manifest", path.to_str().expect("utf-8 path")]);
        let http = broker.http.clone().expect("an HTTP port");
        let _todo = responder(&broker, Some(&todo_token)).await;
        let (url, posts) = endpoint(Vec::new());

        let accepted = {
            let (http, web) = (http.clone(), web.clone());
            tokio::task::spawn_blocking(move || {
                post(
                    &http,
                    "/v1/requests/todo.create",
                    &[
                        ("Authorization", &format!("Bearer {web}")),
                        ("Courier-Reply-To", &url),
                    ],
                    r#"{"text":"milk"}"#,
                )
            })
            .await
            .expect("join")
        };
        assert_eq!(accepted.status, 202, "{}", accepted.body);
        let request = accepted.json()["id"].as_str().expect("an id").to_string();

        let secret = secret_for(&broker, "web");
        assert_ne!(secret, secret_for(&broker, "todo"));
        let (first, last) = tokio::task::spawn_blocking(move || {
            (
                posts.recv_timeout(T).expect("the first reply"),
                posts.recv_timeout(T).expect("the final reply"),
            )
        })
        .await
        .expect("join");
        for (post, outcome, is_final) in [
            (&first, "todo.validated", "false"),
            (&last, "todo.created", "true"),
        ] {
            assert!(
                post.head.starts_with("POST /hook?from=courier HTTP/1.1"),
                "{}",
                post.head
            );
            post.verify(&secret);
            assert_eq!(post.header("courier-outcome"), outcome);
            assert_eq!(post.header("courier-final"), is_final);
            assert_eq!(post.header("courier-request"), request);
            assert_eq!(post.header("courier-sender"), "todo");
            assert_eq!(post.header("content-type"), "application/json");
        }
        assert_eq!(last.body, br#"{"id":7}"#);
        // Signed with another service's secret, it would not verify.
        let forged = std::panic::catch_unwind(|| last.verify(&secret_for(&broker, "todo")));
        assert!(forged.is_err());
        // Nor with the same service's secret under another broker's key.
        let other = Broker::start();
        let foreign = std::panic::catch_unwind(|| last.verify(&secret_for(&other, "web")));
        assert!(foreign.is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_webhook_is_retried_until_it_answers_2xx() {
        let broker = Broker::start();
        let http = broker.http.clone().expect("an HTTP port");
        let _todo = responder(&broker, None).await;
        // The final reply fails twice before it is taken.
        let (url, posts) = endpoint(vec![200, 503, 500, 204]);
        let accepted = {
            let http = http.clone();
            tokio::task::spawn_blocking(move || {
                post(
                    &http,
                    "/v1/requests/todo.create",
                    &[("Courier-Reply-To", &url)],
                    "{}",
                )
            })
            .await
            .expect("join")
        };
        assert_eq!(accepted.status, 202, "{}", accepted.body);
        let got: Vec<Post> = tokio::task::spawn_blocking(move || {
            (0..4)
                .map(|_| posts.recv_timeout(T).expect("a post"))
                .collect()
        })
        .await
        .expect("join");
        let secret = secret_for(&broker, "http");
        let attempts: Vec<(String, String)> = got
            .iter()
            .map(|p| {
                p.verify(&secret);
                (p.header("courier-outcome"), p.header("courier-attempt"))
            })
            .collect();
        let expected: Vec<(String, String)> = [
            ("todo.validated", "1"),
            ("todo.created", "1"),
            ("todo.created", "2"),
            ("todo.created", "3"),
        ]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        assert_eq!(attempts, expected);
        assert_eq!(got[1].header("courier-id"), got[3].header("courier-id"));
        let counted = tokio::task::spawn_blocking(move || {
            common::wait_for("the delivered posts counted", T, || {
                (webhook_posts(&http, "delivered") == 2.0).then(|| webhook_posts(&http, "retried"))
            })
        })
        .await
        .expect("join");
        assert_eq!(counted, 2.0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unreachable_webhook_is_given_up_and_counted() {
        let broker = Broker::start();
        let http = broker.http.clone().expect("an HTTP port");
        let _todo = responder(&broker, None).await;
        // A port nothing listens on any more.
        let closed = TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr");
        let url = format!("http://{closed}/hook");
        let http2 = http.clone();
        let accepted = tokio::task::spawn_blocking(move || {
            post(
                &http2,
                "/v1/requests/todo.create",
                &[("Courier-Reply-To", &url)],
                "{}",
            )
        })
        .await
        .expect("join");
        assert_eq!(accepted.status, 202, "{}", accepted.body);
        // Both replies (progress and final) given up, each after 6 tries.
        let retried = tokio::task::spawn_blocking(move || {
            common::wait_for("both replies given up", Duration::from_secs(40), || {
                (webhook_posts(&http, "given_up") == 2.0).then(|| {
                    (
                        webhook_posts(&http, "retried"),
                        webhook_posts(&http, "delivered"),
                    )
                })
            })
        })
        .await
        .expect("join");
        assert_eq!(retried, (10.0, 0.0));
    }

    #[test]
    fn the_webhook_key_outlives_a_restart_and_a_missing_one_is_named() {
        let broker = Broker::start();
        let before = secret_for(&broker, "web");
        assert_eq!(before.len(), 64, "{before}");
        let broker = broker.crash_and_restart();
        assert_eq!(secret_for(&broker, "web"), before);
        let empty = common::tempdir::Dir::new("no-webhook-key");
        let out = std::process::Command::new(common::courier_bin())
            .args(["token", "webhook-secret", "--service", "web", "--data-dir"])
            .arg(empty.path())
            .output()
            .expect("run");
        assert!(!out.status.success());
        let said = common::stderr(&out);
        assert!(
            said.contains("webhook.key") && said.contains("--data-dir"),
            "{said}"
        );
    }

    #[test]
    fn a_webhook_must_be_https_or_loopback() {
        let broker = Broker::start();
        let http = broker.http.clone().expect("an HTTP port");
        let refused = post(
            &http,
            "/v1/requests/todo.create",
            &[("Courier-Reply-To", "http://hooks.example.com/x")],
            "{}",
        );
        assert_eq!(refused.status, 400, "{}", refused.body);
        assert!(refused.json()["detail"]
            .as_str()
            .unwrap_or("")
            .contains("https://"));
    }
}

#[test]
fn a_stream_that_goes_away_leaves_its_unacked_deliveries_to_the_next() {
    let broker = Broker::start();
    let http = broker.http.clone().expect("an HTTP port");
    let query = "pattern=todo.*&service=notifier";
    let mut first = Stream::subscribed(&http, query, &[]);
    let a = publish(&http, "todo.created", "{}");
    assert_eq!(first.delivery().data["id"], a.as_str());
    first.close();
    // No Last-Event-ID: the gateway notices the closed stream by itself.
    let mut second = Stream::subscribed(&http, query, &[]);
    let again = second.delivery();
    assert_eq!(again.data["id"], a.as_str());
    assert_eq!(again.data["attempt"], 2);
}

#[test]
fn transient_events_arrive_with_nothing_to_settle() {
    let broker = Broker::start();
    let http = broker.http.clone().expect("an HTTP port");
    let mut stream = Stream::subscribed(&http, "pattern=sensor.*&service=dashboard", &[]);
    let sent = post(
        &http,
        "/v1/messages/sensor.measured",
        &[("Courier-Transient", "true")],
        "21.5",
    );
    assert_eq!(sent.status, 202, "{}", sent.body);
    let got = stream.delivery();
    assert_eq!(got.data["transient"], true);
    assert_eq!(got.data["payload"], "21.5");
    let settled = ack(&http, got.id.as_deref().expect("id"), &[]);
    assert_eq!(settled.status, 404, "{}", settled.body);
}

/// `POST /v1/requests/{name}` on a thread of its own (it waits for the
/// reply), with the answer sent back when it comes.
fn request_in_background(
    http: &str,
    name: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> std::sync::mpsc::Receiver<Answer> {
    let (tx, rx) = std::sync::mpsc::channel();
    let (http, path, body) = (
        http.to_string(),
        format!("/v1/requests/{name}?timeout=15s"),
        body.to_string(),
    );
    let headers: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    std::thread::spawn(move || {
        let headers: Vec<(&str, &str)> = headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let _ = tx.send(post(&http, &path, &headers, &body));
    });
    rx
}

fn reply(http: &str, delivery: &str, headers: &[(&str, &str)], body: &str) -> Answer {
    post(http, &format!("/v1/replies/{delivery}"), headers, body)
}

#[test]
fn a_command_delivered_over_sse_is_answered_through_the_gateway() {
    let broker = Broker::start();
    let http = broker.http.clone().expect("an HTTP port");
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

    let unnamed = reply(&http, &delivery, &[], "{}");
    assert_eq!(unnamed.status, 400, "{}", unnamed.body);
    assert!(unnamed.body.contains("Courier-Outcome"), "{}", unnamed.body);
    // Nacked, it comes again, answered by its new delivery id only.
    let nacked = post(&http, &format!("/v1/nacks/{delivery}"), &[], "");
    assert_eq!(nacked.status, 204, "{}", nacked.body);
    let again = stream.delivery();
    assert_eq!(again.data["attempt"], 2);
    let stale = reply(
        &http,
        &delivery,
        &[("Courier-Outcome", "todo.created")],
        "{}",
    );
    assert_eq!(stale.status, 404, "{}", stale.body);
    let delivery = again.id.expect("a delivery id");
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
    let reply_id = replied.json()["id"].as_str().expect("an id").to_string();

    let answer = answer.recv_timeout(T).expect("the request's answer");
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.body, r#"{"id":7}"#);
    assert_eq!(
        answer.header("courier-outcome").as_deref(),
        Some("todo.created")
    );
    assert_eq!(answer.header("courier-sender").as_deref(), Some("todo"));
    assert_eq!(
        answer.header("courier-id").as_deref(),
        Some(reply_id.as_str())
    );
    assert_eq!(
        answer.header("content-type").as_deref(),
        Some("application/json")
    );
    // The final reply acked the delivery, and ended what may be answered.
    let acked = ack(&http, &delivery, &[]);
    assert_eq!(acked.status, 404, "{}", acked.body);
    let again = reply(
        &http,
        &delivery,
        &[("Courier-Outcome", "todo.created")],
        "{}",
    );
    assert_eq!(again.status, 404, "{}", again.body);
    // An event is acked, never answered.
    let mut events = Stream::subscribed(&http, "pattern=todo.created&service=audit", &[]);
    publish(&http, "todo.created", "{}");
    let got = events.delivery();
    let not_a_command = reply(
        &http,
        got.id.as_deref().expect("id"),
        &[("Courier-Outcome", "todo.seen")],
        "{}",
    );
    assert_eq!(not_a_command.status, 404, "{}", not_a_command.body);
}

#[test]
fn a_stream_of_replies_over_sse_reaches_the_requester_as_ndjson() {
    let broker = Broker::start();
    let http = broker.http.clone().expect("an HTTP port");
    // With ?ack=auto the delivery is settled as it is sent, and still
    // answerable while the stream lasts.
    let mut stream =
        Stream::subscribed(&http, "pattern=report.build&service=reports&ack=auto", &[]);
    let answer = request_in_background(&http, "report.build", &[], "{}");
    let delivery = stream.delivery().id.expect("a delivery id");
    for (n, outcome, is_final) in [
        (1, "report.progressed", "false"),
        (2, "report.progressed", "false"),
        (3, "report.built", "true"),
    ] {
        let replied = reply(
            &http,
            &delivery,
            &[
                ("Courier-Outcome", outcome),
                ("Courier-Final", is_final),
                ("Content-Type", "application/json"),
            ],
            &format!(r#"{{"n":{n}}}"#),
        );
        assert_eq!(replied.status, 202, "{}", replied.body);
    }
    let answer = answer.recv_timeout(T).expect("the request's answer");
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
    let seen: Vec<(String, bool, serde_json::Value)> = lines
        .iter()
        .map(|l| {
            (
                l["name"].as_str().unwrap_or("").to_string(),
                l["final"].as_bool().unwrap_or(true),
                l["payload"]["n"].clone(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        vec![
            ("report.progressed".into(), false, 1.into()),
            ("report.progressed".into(), false, 2.into()),
            ("report.built".into(), true, 3.into()),
        ]
    );
    let bad = reply(
        &http,
        &delivery,
        &[
            ("Courier-Outcome", "report.built"),
            ("Courier-Final", "maybe"),
        ],
        "",
    );
    assert_eq!(bad.status, 400, "{}", bad.body);
}

mod websocket_replies {
    use super::*;
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message as Frame;

    type Socket = tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >;

    async fn next(socket: &mut Socket) -> serde_json::Value {
        loop {
            let frame = tokio::time::timeout(T, socket.next())
                .await
                .expect("a frame in time")
                .expect("the socket open")
                .expect("a good frame");
            if let Frame::Text(text) = frame {
                return serde_json::from_str(text.as_str()).expect("JSON");
            }
        }
    }

    async fn put(socket: &mut Socket, frame: serde_json::Value) {
        socket
            .send(Frame::Text(frame.to_string().into()))
            .await
            .expect("send a frame");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_command_delivered_over_websocket_is_answered_by_reply_frames() {
        let broker = Broker::start();
        let http = broker.http.clone().expect("an HTTP port");
        let url = format!(
            "ws://{}/v1/ws?pattern=todo.create&service=todo",
            addr_of(&http)
        );
        let (mut socket, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("a WebSocket");
        assert_eq!(next(&mut socket).await["type"], "subscribed");

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
}

mod browser_credentials {
    use super::*;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    /// Everything under `dir`, as bytes, with its path.
    fn files_under(dir: &std::path::Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
        let mut out = Vec::new();
        let Ok(entries) = std::fs::read_dir(dir) else {
            return out;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                out.extend(files_under(&path));
            } else if let Ok(bytes) = std::fs::read(&path) {
                out.push((path, bytes));
            }
        }
        out
    }

    fn contains(haystack: &[u8], needle: &str) -> bool {
        haystack
            .windows(needle.len())
            .any(|w| w == needle.as_bytes())
    }

    async fn websocket(
        http: &str,
        protocol: &str,
    ) -> Result<
        (
            tokio_tungstenite::WebSocketStream<
                tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
            >,
            Option<String>,
        ),
        u16,
    > {
        let url = format!("ws://{}/v1/ws?pattern=todo.*", addr_of(http));
        let mut request = url.into_client_request().expect("a request");
        request.headers_mut().insert(
            "sec-websocket-protocol",
            protocol.parse().expect("a header value"),
        );
        match tokio_tungstenite::connect_async(request).await {
            Ok((socket, response)) => Ok((
                socket,
                response
                    .headers()
                    .get("sec-websocket-protocol")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string),
            )),
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                Err(response.status().as_u16())
            }
            Err(e) => panic!("{e}"),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn browsers_send_the_token_as_a_query_or_a_subprotocol_and_it_is_never_logged() {
        let dir = common::tempdir::Dir::new("gateway-browser-credentials");
        let (web, web_hash) = token_pair();
        let (notifier, notifier_hash) = token_pair();
        let manifest = dir.path().join("courier.toml");
        std::fs::write(
            &manifest,
            format!(
                r#"[services.web]
sends = ["todo.created@1"]
tokens = ["{web_hash}"]

[services.notifier]
receives = ["todo.created@1"]
tokens = ["{notifier_hash}"]
"#
            ),
        )
        .expect("write manifest");
        let log = dir.path().join("broker.log");
        let broker = Broker::start_logging_to(
            &log,
            &["--manifest", manifest.to_str().expect("utf-8 path")],
        );
        let http = broker.http.clone().expect("an HTTP port");

        // Server-Sent Events: ?access_token=.
        let sse = {
            let (http, notifier, web) = (http.clone(), notifier.clone(), web.clone());
            tokio::task::spawn_blocking(move || {
                for (query, headers, status) in [
                    ("pattern=todo.*&access_token=crr_nope", vec![], 401),
                    (
                        &*format!("pattern=todo.*&access_token={notifier}"),
                        vec![("Authorization", format!("Bearer {notifier}"))],
                        400,
                    ),
                ] {
                    let headers: Vec<(&str, &str)> =
                        headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
                    match Stream::open(&http, query, &headers) {
                        Ok(_) => panic!("{query} was taken"),
                        Err(refused) => {
                            assert_eq!(refused.status, status, "{query}: {}", refused.body)
                        }
                    }
                }
                let mut stream = Stream::subscribed(
                    &http,
                    &format!("pattern=todo.*&access_token={notifier}"),
                    &[],
                );
                let sent = post(
                    &http,
                    "/v1/messages/todo.created",
                    &[("Authorization", &format!("Bearer {web}"))],
                    r#"{"text":"milk"}"#,
                );
                assert_eq!(sent.status, 202, "{}", sent.body);
                let got = stream.delivery();
                assert_eq!(got.data["sender"], "web");
                let acked = ack(
                    &http,
                    got.id.as_deref().expect("id"),
                    &[("Authorization", &format!("Bearer {notifier}"))],
                );
                assert_eq!(acked.status, 204, "{}", acked.body);
            })
        };
        sse.await.expect("the SSE checks");

        // WebSocket: the courier.bearer.<token> subprotocol, echoed.
        assert_eq!(
            websocket(&http, "courier.bearer.crr_nope").await.err(),
            Some(401)
        );
        let offered = format!("courier.bearer.{notifier}");
        let (_socket, chosen) = websocket(&http, &offered).await.expect("a WebSocket");
        assert_eq!(chosen.as_deref(), Some(offered.as_str()));
        let url = format!(
            "ws://{}/v1/ws?pattern=todo.*&access_token={notifier}",
            addr_of(&http)
        );
        tokio_tungstenite::connect_async(url)
            .await
            .expect("a WebSocket with ?access_token=");

        // The token is nowhere in what the broker wrote: its log (at
        // trace level), its message log, its traces.
        let text = std::fs::read(&log).expect("the broker's log");
        assert!(!text.is_empty(), "the broker logged nothing at trace level");
        for token in [&notifier, &web] {
            assert!(!contains(&text, token), "a token is in the broker's log");
            for (path, bytes) in files_under(broker.data_dir.path()) {
                assert!(!contains(&bytes, token), "a token is in {}", path.display());
            }
        }
    }
}

/// A broker whose bus port speaks TLS only, and demands client
/// certificates: the gateway's streams reach the bus in-process, with no
/// socket, so neither matters to them.
mod tls_only {
    use super::*;
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message as Frame;

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

    async fn frame(socket: &mut super::websocket::Socket) -> serde_json::Value {
        super::websocket::next(socket).await
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
            let url = format!(
                "ws://{}/v1/ws?pattern=bill.charge&service=billing",
                addr_of(&http)
            );
            let (mut socket, _) = tokio_tungstenite::connect_async(url)
                .await
                .expect("a WebSocket");
            let first = frame(&mut socket).await;
            assert_eq!(first["type"], "subscribed", "{first}");
            let answer = request_in_background(&http, "bill.charge", &[], r#"{"cents":250}"#);
            let delivered = frame(&mut socket).await;
            assert_eq!(delivered["type"], "delivery", "{delivered}");
            assert_eq!(delivered["kind"], "command");
            let delivery = delivered["delivery"].as_str().expect("a delivery id");
            for out in [
                serde_json::json!({"type": "ack", "delivery": delivery}),
                serde_json::json!({"type": "reply", "delivery": delivery, "outcome": "bill.charged", "payload": {"ok": true}, "ref": 1}),
            ] {
                socket
                    .send(Frame::Text(out.to_string().into()))
                    .await
                    .expect("send a frame");
            }
            let replied = frame(&mut socket).await;
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
}
