//! The HTTP gateway's streams against a real `courier serve`: durable
//! subscriptions as Server-Sent Events and over WebSocket, and replies
//! posted to webhooks.

#[path = "../common/mod.rs"]
mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::Duration;

use common::{token_pair, Broker};

const T: Duration = Duration::from_secs(20);

mod browser_credentials;
mod sse;
mod tls_only;
mod webhooks;
mod websocket;
mod websocket_replies;
mod ws;

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
