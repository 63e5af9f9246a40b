//! Replies posted to webhooks, signed, retried, given up.

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
    let mut opts =
        courier_client::ClientOptions::new(&broker.addr, if token.is_some() { "" } else { "todo" });
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
