//! The broker's HTTP port against real `courier serve` processes: health
//! and readiness, Prometheus metrics counted from real traffic (parsed as
//! the exposition format), who may read them, and the name cap.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::{http_get as get, Broker};

const T: Duration = Duration::from_secs(20);

/// One sample of the exposition format: metric name and labels → value.
type Samples = BTreeMap<(String, BTreeMap<String, String>), f64>;

/// Parses the OpenMetrics text format as Prometheus reads it: `# TYPE`
/// and `# HELP` lines, samples `name{k="v",…} value`, and `# EOF` last.
fn parse_exposition(text: &str) -> Samples {
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines.last(),
        Some(&"# EOF"),
        "the exposition ends with # EOF"
    );
    let mut samples = Samples::new();
    let mut typed = std::collections::HashSet::new();
    for line in lines {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let name = rest.split_whitespace().next().expect("type name");
            assert!(
                typed.insert(name.to_string()),
                "one TYPE per family: {name}"
            );
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("sample value");
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("a number in {line:?}")),
        };
        let (name, labels) = match series.split_once('{') {
            Some((name, labels)) => (name, labels.strip_suffix('}').expect("closing brace")),
            None => (series, ""),
        };
        let mut map = BTreeMap::new();
        for pair in split_labels(labels) {
            let (k, v) = pair.split_once('=').expect("label k=v");
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .expect("quoted label value");
            map.insert(k.to_string(), v.to_string());
        }
        assert!(
            samples.insert((name.to_string(), map), value).is_none(),
            "each series once: {line}"
        );
    }
    samples
}

/// Label pairs, split at commas outside quotes.
fn split_labels(labels: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut start, mut quoted) = (0, false);
    for (i, c) in labels.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => {
                out.push(&labels[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if start < labels.len() {
        out.push(&labels[start..]);
    }
    out
}

fn value(samples: &Samples, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let labels: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    samples.get(&(name.to_string(), labels)).copied()
}

fn metrics(broker: &Broker, token: Option<&str>) -> Samples {
    let http = broker.http.as_deref().expect("the HTTP port is on");
    let (status, body) = get(http, "/metrics", token);
    assert_eq!(status, 200, "{body}");
    parse_exposition(&body)
}

#[test]
fn health_and_readiness_answer() {
    let broker = Broker::start();
    let http = broker.http.as_deref().expect("the HTTP port is on");
    assert_eq!(get(http, "/healthz", None), (200, "ok\n".to_string()));
    assert_eq!(get(http, "/readyz", None), (200, "ready\n".to_string()));
    assert_eq!(get(http, "/nothing-here", None).0, 404);
}

#[test]
fn metrics_count_real_traffic_per_name_service_and_outcome() {
    let broker = Broker::start();
    let responder = broker.spawn(&[
        "reply",
        "todo.create",
        "--service",
        "todo",
        "--outcome",
        "todo.created",
        "--echo",
    ]);
    responder.wait_stderr("replying to todo.create", T);
    for _ in 0..3 {
        let out = broker.run(&["request", "todo.create", "--service", "web", "--data", "{}"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Refused: nobody receives it.
    let out = broker.run(&["send", "nobody.listens", "--service", "web"]);
    assert_eq!(out.status.code(), Some(4));
    // Events for a subscribed service, consumed with acks.
    let out = broker.run(&[
        "subscribe",
        "audit.*",
        "--service",
        "audit",
        "--idle-timeout",
        "1s",
    ]);
    assert!(out.status.success());
    let out = broker.run(&[
        "publish",
        "audit.seen",
        "--service",
        "web",
        "--count",
        "5",
        "--data",
        "seen {seq}",
    ]);
    assert!(out.status.success());

    let m = metrics(&broker, None);
    let sent = |name, service| {
        value(
            &m,
            "courier_messages_sent_total",
            &[("name", name), ("service", service)],
        )
    };
    assert_eq!(sent("todo.create", "web"), Some(3.0));
    assert_eq!(sent("audit.seen", "web"), Some(5.0));
    assert_eq!(
        sent("todo.created", "todo"),
        Some(3.0),
        "replies count as sent by the responder"
    );
    let delivered = value(
        &m,
        "courier_messages_delivered_total",
        &[("name", "todo.create"), ("service", "todo")],
    );
    assert_eq!(delivered, Some(3.0));
    assert_eq!(
        value(
            &m,
            "courier_messages_acked_total",
            &[("name", "todo.create"), ("service", "todo")]
        ),
        Some(3.0)
    );
    assert_eq!(
        value(
            &m,
            "courier_messages_refused_total",
            &[
                ("name", "nobody.listens"),
                ("service", "web"),
                ("reason", "no_receiver")
            ]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &m,
            "courier_command_replies_total",
            &[("name", "todo.create"), ("outcome", "todo.created")]
        ),
        Some(3.0)
    );
    assert_eq!(
        value(
            &m,
            "courier_command_reply_seconds_count",
            &[("name", "todo.create")]
        ),
        Some(3.0)
    );
    assert_eq!(
        value(
            &m,
            "courier_command_reply_seconds_bucket",
            &[("name", "todo.create"), ("le", "+Inf")]
        ),
        Some(3.0)
    );
    // The five events wait for audit, which is offline.
    assert_eq!(
        value(
            &m,
            "courier_subscription_backlog_messages",
            &[("service", "audit")]
        ),
        Some(5.0)
    );
    // "seen 0" … "seen 4": six bytes each.
    assert_eq!(
        value(
            &m,
            "courier_subscription_backlog_bytes",
            &[("service", "audit")]
        ),
        Some(30.0)
    );
    assert_eq!(
        value(
            &m,
            "courier_subscription_consumers",
            &[("service", "audit")]
        ),
        Some(0.0)
    );
    let oldest = value(
        &m,
        "courier_subscription_oldest_unacked_seconds",
        &[("service", "audit")],
    )
    .expect("the oldest unacked age of a backlog");
    assert!((0.0..60.0).contains(&oldest), "{oldest}");
    assert_eq!(
        value(&m, "courier_connections", &[("service", "todo")]),
        Some(1.0)
    );
    assert!(value(&m, "courier_log_bytes", &[]).is_some_and(|b| b > 0.0));
    assert!(value(&m, "courier_fsync_seconds_count", &[]).is_some_and(|n| n > 0.0));
    assert!(value(&m, "courier_group_commit_records_count", &[]).is_some_and(|n| n > 0.0));
    assert_eq!(value(&m, "courier_degraded", &[]), Some(0.0));
    assert!(value(&m, "courier_frames_in_total", &[]).is_some_and(|n| n > 0.0));
    // Every frame so far took the core's lock and held it a while.
    let takings = value(&m, "courier_core_lock_takings_total", &[]).expect("lock takings");
    assert!(takings >= 5.0, "{takings}");
    let held = value(&m, "courier_core_lock_held_seconds_total", &[]).expect("lock held");
    assert!(held > 0.0 && held < 60.0, "{held}");
    assert!(value(&m, "courier_core_lock_wait_seconds_total", &[]).is_some_and(|w| w >= 0.0));

    // Consuming them acks them: the backlog empties, the counters move.
    let out = broker.run(&["subscribe", "audit.*", "--service", "audit", "--count", "5"]);
    assert!(out.status.success());
    let m = metrics(&broker, None);
    assert_eq!(
        value(
            &m,
            "courier_messages_acked_total",
            &[("name", "audit.seen"), ("service", "audit")]
        ),
        Some(5.0)
    );
    assert_eq!(
        value(
            &m,
            "courier_subscription_backlog_messages",
            &[("service", "audit")]
        ),
        Some(0.0)
    );
    assert_eq!(
        value(
            &m,
            "courier_subscription_backlog_bytes",
            &[("service", "audit")]
        ),
        Some(0.0)
    );
    assert_eq!(
        value(
            &m,
            "courier_subscription_oldest_unacked_seconds",
            &[("service", "audit")]
        ),
        None
    );

    // The CLI prints the same page.
    let http = broker.http.clone().expect("http");
    let out = broker.run(&[
        "metrics",
        "--prometheus",
        "--http",
        http.trim_start_matches("http://").trim_end_matches('/'),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = parse_exposition(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(
        value(
            &printed,
            "courier_messages_sent_total",
            &[("name", "todo.create"), ("service", "web")]
        ),
        Some(3.0)
    );
}

#[test]
fn names_past_the_cap_are_counted_as_other() {
    let broker = Broker::start_with(&["--metrics-names-max", "2"]);
    let out = broker.run(&[
        "subscribe",
        "x.>",
        "--service",
        "sink",
        "--idle-timeout",
        "1s",
    ]);
    assert!(out.status.success());
    for name in ["x.one", "x.two", "x.three", "x.four", "x.four"] {
        let out = broker.run(&["publish", name, "--service", "src"]);
        assert!(out.status.success());
    }
    let m = metrics(&broker, None);
    let sent = |name| {
        value(
            &m,
            "courier_messages_sent_total",
            &[("name", name), ("service", "src")],
        )
    };
    assert_eq!(sent("x.one"), Some(1.0));
    assert_eq!(sent("x.two"), Some(1.0));
    assert_eq!(sent("x.three"), None);
    assert_eq!(sent("_other"), Some(3.0));
    assert_eq!(
        value(&m, "courier_metrics_names_over_cap_total", &[]),
        Some(3.0)
    );
    assert_eq!(value(&m, "courier_metrics_names_max", &[]), Some(2.0));
}

#[test]
fn under_a_manifest_metrics_need_an_admin_token() {
    let dir = common::tempdir::Dir::new("obs-manifest");
    let manifest = dir.path().join("courier.toml");
    std::fs::write(
        &manifest,
        format!(
            "[services.web]\nsends = [\"todo.create\"]\ntokens = [\"{}\"]\n\n[admin]\ntokens = [\"{}\"]\n",
            token_hash("crr_web_secret"),
            token_hash("crr_admin_secret")
        ),
    )
    .expect("write manifest");
    let broker = Broker::start_with(&["--manifest", manifest.to_str().expect("utf-8 path")]);
    let http = broker.http.as_deref().expect("http");
    let (status, body) = get(http, "/metrics", None);
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("Authorization: Bearer"), "{body}");
    let (status, body) = get(http, "/metrics", Some("crr_web_secret"));
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("belongs to service web"), "{body}");
    let (status, _) = get(http, "/metrics", Some("crr_nobody"));
    assert_eq!(status, 401);
    assert!(metrics(&broker, Some("crr_admin_secret"))
        .contains_key(&("courier_degraded".to_string(), BTreeMap::new())));
    // Probes need no credentials.
    assert_eq!(get(http, "/healthz", None).0, 200);
}

#[test]
fn a_public_http_address_without_a_manifest_is_refused() {
    let out = std::process::Command::new(common::courier_bin())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--in-memory",
            "--http",
            "0.0.0.0:0",
        ])
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(6), "{stderr}");
    assert!(
        stderr.contains("HTTP") && stderr.contains("--manifest"),
        "{stderr}"
    );
}

#[test]
fn http_off_serves_no_port() {
    let broker = Broker::start_with(&["--http", "off"]);
    assert!(broker.http.is_none());
}

fn token_hash(token: &str) -> String {
    courier_manifest::hash_token(token)
}

#[test]
fn a_tail_follows_commands_and_replies_without_becoming_a_receiver() {
    let broker = Broker::start();
    let tail = broker.spawn(&["tail", "todo.>", "--payload"]);
    tail.wait_stderr("tailing todo.>", T);
    let responder = broker.spawn(&[
        "reply",
        "todo.create",
        "--service",
        "todo",
        "--outcome",
        "todo.created",
        "--echo",
    ]);
    responder.wait_stderr("replying to todo.create", T);
    let out = broker.run(&[
        "request",
        "todo.create",
        "--service",
        "web",
        "--data",
        r#"{"text":"milk"}"#,
    ]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    // The tail receives nothing: a command nobody receives is refused.
    let out = broker.run(&["send", "todo.delete", "--service", "web"]);
    assert_eq!(out.status.code(), Some(4), "{}", common::stderr(&out));
    assert!(common::stderr(&out).contains("no_receiver"));
    let out = broker.run(&["publish", "other.thing", "--service", "web"]);
    assert!(out.status.success());
    let out = broker.run(&["publish", "todo.listed", "--service", "web"]);
    assert!(out.status.success());

    let command = tail.json_line(T);
    assert_eq!(command["name"], "todo.create");
    assert_eq!(command["kind"], "command");
    assert_eq!(command["sender"], "web");
    assert_eq!(command["receivers"], serde_json::json!(["todo"]));
    assert_eq!(command["payload"]["text"], "milk");
    let reply = tail.json_line(T);
    assert_eq!(reply["kind"], "reply");
    assert_eq!(reply["outcome"], "todo.created");
    assert_eq!(reply["final"], true);
    assert_eq!(reply["response_to"], command["id"]);
    assert_eq!(reply["receivers"], serde_json::json!(["web"]));
    assert_eq!(reply["activity_id"], command["activity_id"]);
    // The refused command is not shown; neither is a name outside the pattern.
    let event = tail.json_line(T);
    assert_eq!(event["name"], "todo.listed");
    assert_eq!(
        event["receivers"],
        serde_json::json!([]),
        "kept for retention only"
    );
}

#[test]
fn an_sse_tail_that_lags_is_told_how_many_it_missed_and_misses_nothing_else() {
    let broker = Broker::start();
    let http = broker.http.clone().expect("http");
    let addr = http.trim_start_matches("http://").trim_end_matches('/');
    let mut sse = TcpStream::connect(addr).expect("connect");
    write!(
        sse,
        "GET /v1/tail?pattern=lag.%3E HTTP/1.0\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n"
    )
    .expect("request");
    sse.set_read_timeout(Some(T)).expect("timeout");
    let mut reader = std::io::BufReader::new(sse.try_clone().expect("clone"));
    // Wait for the tail to start, then stop reading while the bus runs.
    let mut seen = String::new();
    while !seen.contains("event: started") {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut reader, &mut line).expect("read");
        assert!(!line.is_empty(), "the stream ended before it started");
        seen.push_str(&line);
    }
    const EVENTS: u64 = 60_000;
    let count = EVENTS.to_string();
    let data = "x".repeat(200);
    let out = broker.run(&[
        "publish",
        "lag.tick",
        "--service",
        "src",
        "--transient",
        "--count",
        &count,
        "--data",
        &data,
    ]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    // Mark the end, then read everything up to it.
    let out = broker.run(&["publish", "lag.end", "--service", "src"]);
    assert!(out.status.success());
    let (mut lines, mut dropped) = (0u64, 0u64);
    // The started event's data line is still unread.
    let mut event = String::from("started");
    loop {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut reader, &mut line).expect("read the stream");
        assert!(!line.is_empty(), "the stream ended early");
        let line = line.trim_end();
        if let Some(name) = line.strip_prefix("event: ") {
            event = name.to_string();
        } else if let Some(data) = line.strip_prefix("data: ") {
            let v: serde_json::Value = serde_json::from_str(data).expect("JSON data");
            match event.as_str() {
                "message" if v["name"] == "lag.end" => break,
                "message" => {
                    assert_eq!(v["name"], "lag.tick");
                    lines += 1;
                }
                "dropped" => dropped += v["dropped"].as_u64().expect("a count"),
                "started" => assert_eq!(v["pattern"], "lag.>"),
                other => panic!("unexpected event {other}"),
            }
        }
    }
    assert!(dropped > 0, "a tail that was not read fell behind");
    assert_eq!(lines + dropped, EVENTS, "every message shown or counted");
}

/// A real `prometheus` (Debian's package; `scripts/test.sh` installs it)
/// scrapes the broker and answers a query over what it scraped.
#[test]
fn a_real_prometheus_scrapes_the_broker() {
    let Ok(prometheus) = which("prometheus") else {
        panic!("prometheus is not installed: apt-get install prometheus (scripts/test.sh does)");
    };
    let broker = Broker::start();
    let out = broker.run(&[
        "subscribe",
        "scrape.*",
        "--service",
        "sink",
        "--idle-timeout",
        "1s",
    ]);
    assert!(out.status.success());
    let out = broker.run(&["publish", "scrape.me", "--service", "src", "--count", "7"]);
    assert!(out.status.success());

    let dir = common::tempdir::Dir::new("prometheus");
    let target = broker
        .http
        .as_deref()
        .expect("http")
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: courier\n    static_configs:\n      - targets: ['{target}']\n"
        ),
    )
    .expect("write config");
    let web = format!("127.0.0.1:{}", common::free_port());
    let mut server = std::process::Command::new(prometheus)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address={web}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start prometheus");
    let query = "/api/v1/query?query=courier_messages_sent_total%7Bname%3D%22scrape.me%22%7D";
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut last = String::new();
    let found = loop {
        if std::time::Instant::now() > deadline {
            break None;
        }
        if let Ok(mut s) = TcpStream::connect(&web) {
            let _ = s.set_read_timeout(Some(T));
            let _ = write!(s, "GET {query} HTTP/1.0\r\nHost: {web}\r\n\r\n");
            let mut answer = String::new();
            let _ = s.read_to_string(&mut answer);
            if let Some((_, body)) = answer.split_once("\r\n\r\n") {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(body) {
                    if let Some(sample) = v["data"]["result"].as_array().and_then(|r| r.first()) {
                        break Some(sample.clone());
                    }
                    last = body.to_string();
                }
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let _ = server.kill();
    let _ = server.wait();
    let sample =
        found.unwrap_or_else(|| panic!("prometheus never had the series; last answer: {last}"));
    assert_eq!(sample["metric"]["service"], "src");
    assert_eq!(sample["value"][1], "7", "{sample}");
}

fn which(program: &str) -> Result<std::path::PathBuf, ()> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
        .ok_or(())
}
