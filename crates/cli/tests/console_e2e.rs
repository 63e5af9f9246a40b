//! The broker's console and admin API against real `courier serve`
//! processes carrying real traffic: the JSON API and its errors over plain
//! HTTP, `courier pause`/`resume` across a restart, and the page itself in
//! headless Chromium (chromedriver's WebDriver API), clicked as a person
//! would. Screenshots go to `$CARGO_TARGET_DIR/console-screenshots/`.
//!
//! The browser tests need Debian's `chromium` and `chromium-driver`
//! (scripts/test.sh installs them); without them they fail and say so.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::webdriver::{base64_decode, screenshot_dir, Browser};
use common::Broker;
use courier_client::{Client, ClientOptions};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(30);

/// One browser at a time: two cores run the brokers, the clients and
/// Chromium.
static BROWSER: Mutex<()> = Mutex::new(());

fn one_browser() -> std::sync::MutexGuard<'static, ()> {
    BROWSER
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// An HTTP call to the broker's port: (status, content type, body).
fn call(
    http: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String, String) {
    let addr = http.trim_start_matches("http://").trim_end_matches('/');
    let mut s = TcpStream::connect(addr).expect("connect to the HTTP port");
    s.set_read_timeout(Some(T)).expect("timeout");
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("write request");
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("read answer");
    let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status code");
    let content_type = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-type:")
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_default();
    (status, content_type, body.to_string())
}

fn get_json(http: &str, path: &str) -> Value {
    let (status, _, body) = call(http, "GET", path, &[], "");
    assert_eq!(status, 200, "GET {path}: {body}");
    serde_json::from_str(&body).expect("JSON")
}

/// Asserts an RFC 9457 problem document with `status` whose detail
/// contains `needle`.
fn assert_problem(answer: (u16, String, String), status: u16, needle: &str) {
    let (got, content_type, body) = answer;
    assert_eq!(got, status, "{body}");
    assert_eq!(content_type, "application/problem+json", "{body}");
    let problem: Value = serde_json::from_str(&body).expect("a JSON problem");
    assert_eq!(problem["status"], status);
    let detail = problem["detail"].as_str().expect("a detail");
    assert!(detail.contains(needle), "{detail:?} names {needle:?}");
}

fn service<'a>(services: &'a Value, name: &str) -> Option<&'a Value> {
    services["services"]
        .as_array()?
        .iter()
        .find(|s| s["name"] == name)
}

/// Waits for `check` on successive answers of `GET path`.
fn wait_json(http: &str, path: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    let deadline = std::time::Instant::now() + T;
    loop {
        let v = get_json(http, path);
        if check(&v) {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}; last {path}: {v}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A `web` instance that stays connected and, every 100 ms until dropped,
/// asks `todo.create` and publishes `todo.requested`: real traffic with a
/// live requester.
struct Requester {
    stop: Arc<AtomicBool>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Requester {
    fn start(broker: &Broker) -> Requester {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a runtime");
        let stop = Arc::new(AtomicBool::new(false));
        let client = runtime
            .block_on(Client::connect(ClientOptions::new(
                broker.addr.clone(),
                "web",
            )))
            .expect("web connects");
        let running = stop.clone();
        runtime.spawn(async move {
            let mut n = 0u64;
            while !running.load(Ordering::Relaxed) {
                n += 1;
                if let Ok(builder) = client.command("todo.create").json(&json!({"text": n})) {
                    let _ = builder.request().await;
                }
                if let Ok(builder) = client.event("todo.requested").json(&json!({"n": n})) {
                    let _ = builder.send().await;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            client.shutdown().await;
        });
        Requester {
            stop,
            runtime: Some(runtime),
        }
    }
}

impl Drop for Requester {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

// ---- the JSON API --------------------------------------------------------

#[test]
fn the_api_reports_services_names_and_topology_of_real_traffic() {
    let broker = Broker::start();
    let http = broker.http.clone().expect("the HTTP port is on");
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
    let _web = Requester::start(&broker);
    let names = wait_json(&http, "/v1/names", "three replies counted", |v| {
        v["names"].as_array().is_some_and(|names| {
            names.iter().any(|n| {
                n["name"] == "todo.create" && n["reply_latency"]["count"].as_u64().unwrap_or(0) >= 3
            })
        })
    });
    let create = names["names"]
        .as_array()
        .and_then(|n| n.iter().find(|n| n["name"] == "todo.create"))
        .expect("todo.create");
    assert!(create["totals"]["sent"].as_u64() >= Some(3), "{create}");
    assert_eq!(create["outcomes"][0]["outcome"], "todo.created");
    let p50 = create["reply_latency"]["p50"].as_f64().expect("p50");
    let p99 = create["reply_latency"]["p99"].as_f64().expect("p99");
    assert!(0.0 < p50 && p50 <= p99 && p99 < 30.0, "{create}");

    let services = get_json(&http, "/v1/services");
    let todo = service(&services, "todo").expect("todo is listed");
    assert_eq!(
        todo["patterns"],
        json!([{"pattern": "todo.create", "paused": false}])
    );
    let instance = &todo["instances"][0];
    assert!(
        instance["peer"]
            .as_str()
            .is_some_and(|p| p.starts_with("127.0.0.1:")),
        "{instance}"
    );
    assert!(instance["connected_at"].as_u64().is_some_and(|t| t > 0));
    assert_eq!(instance["consumes"], json!(["todo.create"]));
    let web = service(&services, "web").expect("the requester is listed");
    assert_eq!(web["instances"].as_array().map(Vec::len), Some(1), "{web}");
    assert_eq!(web["instances"][0]["consumes"], json!([]));

    let topology = get_json(&http, "/v1/topology");
    let edges = topology["edges"].as_array().expect("edges");
    let edge = |from: &str, to: &str, name: &str| {
        edges
            .iter()
            .find(|e| e["from"] == from && e["to"] == to && e["name"] == name)
    };
    assert!(
        edge("web", "todo", "todo.create").is_some_and(|e| e["count"].as_u64() >= Some(3)),
        "{topology}"
    );
    assert!(edge("todo", "web", "todo.created").is_some(), "{topology}");
    assert_eq!(topology["services"], json!(["todo", "web"]));
}

#[test]
fn every_api_error_is_a_problem_document() {
    let broker = Broker::start();
    let http = broker.http.clone().expect("http");
    assert_problem(
        call(&http, "GET", "/v1/no-such-thing", &[], ""),
        404,
        "no endpoint /v1/no-such-thing",
    );
    assert_problem(
        call(&http, "GET", "/v1/dead-letters/nobody", &[], ""),
        404,
        "knows no service nobody",
    );
    assert_problem(
        call(
            &http,
            "GET",
            "/v1/dead-letters/nobody/not-a-number",
            &[],
            "",
        ),
        400,
        "is not a dead letter id",
    );
    assert_problem(
        call(&http, "DELETE", "/v1/services", &[], ""),
        405,
        "answers GET",
    );
    let json_header = [("Content-Type", "application/json")];
    assert_problem(
        call(&http, "POST", "/v1/subscriptions/audit/pause", &[], "{}"),
        415,
        "Content-Type: application/json",
    );
    assert_problem(
        call(
            &http,
            "POST",
            "/v1/subscriptions/audit/pause",
            &[
                ("Content-Type", "application/json"),
                ("Origin", "http://elsewhere.example"),
            ],
            "{}",
        ),
        403,
        "console's own page",
    );
    assert_problem(
        call(
            &http,
            "POST",
            "/v1/subscriptions/audit/pause",
            &json_header,
            "{\"pattern\": 7}",
        ),
        400,
        "\"pattern\" is a string",
    );
    assert_problem(
        call(
            &http,
            "POST",
            "/v1/subscriptions/audit/pause",
            &json_header,
            "{not json",
        ),
        400,
        "not JSON",
    );
    assert_problem(
        call(
            &http,
            "POST",
            "/v1/subscriptions/audit/pause",
            &json_header,
            "{}",
        ),
        404,
        "service audit has no subscriptions",
    );
    let out = broker.run(&[
        "subscribe",
        "audit.*",
        "--service",
        "audit",
        "--idle-timeout",
        "50ms",
    ]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    assert_problem(
        call(
            &http,
            "POST",
            "/v1/subscriptions/audit/resume",
            &json_header,
            r#"{"pattern": "user.*"}"#,
        ),
        404,
        "its subscriptions: audit.*",
    );
    assert_problem(
        call(
            &http,
            "POST",
            "/v1/dead-letters/audit/9/replay",
            &json_header,
            "{}",
        ),
        404,
        "has no dead letter 9",
    );
    // The page and its files are served, with a policy that loads nothing
    // from elsewhere.
    let (status, content_type, page) = call(&http, "GET", "/", &[], "");
    assert_eq!(
        (status, content_type.as_str()),
        (200, "text/html; charset=utf-8")
    );
    assert!(page.contains("/assets/app.js"), "{page}");
    for asset in ["app.js", "api.js", "charts.js", "console.css", "icon.svg"] {
        assert_eq!(
            call(&http, "GET", &format!("/assets/{asset}"), &[], "").0,
            200,
            "{asset}"
        );
    }
    assert!(!page.contains("http://") && !page.contains("https://"));
}

#[test]
fn under_a_manifest_the_api_needs_an_admin_token_and_the_page_does_not() {
    let dir = common::tempdir::Dir::new("console-manifest");
    let manifest = dir.path().join("courier.toml");
    std::fs::write(
        &manifest,
        format!(
            "[services.web]\nsends = [\"todo.create\"]\ntokens = [\"{}\"]\n\n[admin]\ntokens = [\"{}\"]\n",
            courier_manifest::hash_token("crr_web_secret"),
            courier_manifest::hash_token("crr_admin_secret")
        ),
    )
    .expect("write manifest");
    let broker = Broker::start_with(&["--manifest", manifest.to_str().expect("utf-8 path")]);
    let http = broker.http.clone().expect("http");
    assert_eq!(call(&http, "GET", "/", &[], "").0, 200);
    assert_eq!(call(&http, "GET", "/assets/app.js", &[], "").0, 200);
    assert_problem(
        call(&http, "GET", "/v1/services", &[], ""),
        401,
        "Authorization: Bearer",
    );
    assert_problem(
        call(
            &http,
            "POST",
            "/v1/dead-letters/web/purge",
            &[("Content-Type", "application/json")],
            "{}",
        ),
        401,
        "Authorization: Bearer",
    );
    assert_problem(
        call(
            &http,
            "GET",
            "/v1/names",
            &[("Authorization", "Bearer crr_web_secret")],
            "",
        ),
        403,
        "belongs to service web",
    );
    let (status, _, body) = call(
        &http,
        "GET",
        "/v1/topology",
        &[("Authorization", "Bearer crr_admin_secret")],
        "",
    );
    assert_eq!(status, 200, "{body}");
}

#[test]
fn courier_pause_holds_a_subscription_across_a_restart_and_resume_lets_it_go() {
    let broker = Broker::start();
    let http = broker.http.clone().expect("http");
    let out = broker.run(&[
        "subscribe",
        "audit.*",
        "--service",
        "audit",
        "--idle-timeout",
        "50ms",
    ]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let out = broker.run(&["pause", "audit.*", "--service", "audit"]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    assert_eq!(
        common::json_lines(&out),
        vec![json!({"service": "audit", "patterns": ["audit.*"], "paused": ["audit.*"]})]
    );
    let out = broker.run(&[
        "publish",
        "audit.seen",
        "--service",
        "web",
        "--count",
        "3",
        "--data",
        "{\"n\":{seq}}",
    ]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let metrics = common::json_lines(&broker.run(&["services"]));
    let audit = metrics
        .iter()
        .find(|s| s["name"] == "audit")
        .expect("audit listed");
    assert_eq!(audit["paused"], json!(["audit.*"]));
    assert_eq!(audit["backlog"], 3);
    let (_, _, text) = call(&http, "GET", "/metrics", &[], "");
    assert!(
        text.contains(r#"courier_subscription_paused{service="audit",pattern="audit.*"} 1"#),
        "{text}"
    );

    // Paused still after a crash: a consumer gets nothing.
    let broker = broker.crash_and_restart();
    let http = broker.http.clone().expect("http");
    let out = broker.run(&[
        "subscribe",
        "audit.*",
        "--service",
        "audit",
        "--idle-timeout",
        "300ms",
    ]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    assert!(
        common::json_lines(&out).is_empty(),
        "nothing delivered while paused"
    );
    let services = get_json(&http, "/v1/services");
    let audit = service(&services, "audit").expect("audit");
    assert_eq!(
        audit["patterns"],
        json!([{"pattern": "audit.*", "paused": true}])
    );
    assert_eq!(audit["backlog"], 3);

    let out = broker.run(&["resume", "--service", "audit"]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    assert_eq!(common::json_lines(&out)[0]["paused"], json!([]));
    let got = common::json_lines(&broker.run(&[
        "subscribe",
        "audit.*",
        "--service",
        "audit",
        "--count",
        "3",
        "--idle-timeout",
        "10s",
    ]));
    let ns: Vec<&Value> = got.iter().map(|m| &m["payload"]["n"]).collect();
    assert_eq!(
        ns,
        [&json!(0), &json!(1), &json!(2)],
        "delivered in order after resume"
    );
    let out = broker.run(&["pause", "nothing.*", "--service", "audit"]);
    assert_eq!(out.status.code(), Some(4), "{}", common::stderr(&out));
    assert!(
        common::stderr(&out).contains("not subscribed to nothing.*"),
        "{}",
        common::stderr(&out)
    );
}

#[test]
fn screenshots_decode_from_base64() {
    assert_eq!(base64_decode("aGVsbG8=").as_deref(), Some(&b"hello"[..]));
    assert_eq!(base64_decode("aGk=").as_deref(), Some(&b"hi"[..]));
    assert_eq!(base64_decode("YWJj").as_deref(), Some(&b"abc"[..]));
    assert_eq!(base64_decode("!!"), None);
}

// ---- the page in a browser -----------------------------------------------

fn open_console(browser: &Browser, http: &str, view: &str) {
    browser.goto(http);
    browser.wait_text("#status", "Updated", T);
    browser.click_css(&format!("a[data-view-link='{view}']"), T);
    browser.wait_for(&format!("the {view} view"), T, |b| {
        let shown = b
            .script(
                "return !document.querySelector(arguments[0]).hidden",
                json!([format!("[data-view='{view}']")]),
            )
            .ok()?;
        shown.as_bool().filter(|s| *s)
    });
}

#[test]
fn the_console_shows_services_instances_topology_and_rates_of_real_traffic() {
    let _one = one_browser();
    let broker = Broker::start();
    let http = broker.http.clone().expect("http");
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
        "subscribe",
        "todo.requested",
        "--service",
        "audit",
        "--idle-timeout",
        "50ms",
    ]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let _audit = broker.spawn(&["subscribe", "todo.requested", "--service", "audit"]);
    let _web = Requester::start(&broker);
    let browser = Browser::start();

    open_console(&browser, &http, "services");
    let todo = browser.wait_text("[data-test=service][data-service=todo]", "todo.create", T);
    assert!(
        todo.contains("127.0.0.1:"),
        "the instance's address: {todo}"
    );
    browser.wait_text(
        "[data-test=service][data-service=web] [data-test=instance]",
        "127.0.0.1:",
        T,
    );
    browser.screenshot("services");

    browser.click_css("a[data-view-link=topology]", T);
    browser.wait_for("the edge web → todo", T, |b| {
        b.find_all("[data-test=edge][data-from=web][data-to=todo]")
            .into_iter()
            .next()
    });
    browser.wait_for("todo.create flowing at a rate above zero", T, |b| {
        let row = b
            .visible_text("[data-test=flow][data-from=web][data-to=todo][data-name='todo.create']");
        (row.contains("/s") && !row.contains(" 0/s")).then_some(row)
    });
    browser.wait_for("the edge label names todo.create", T, |b| {
        let named = b
            .script(
                "return [...document.querySelectorAll('[data-test=edge-label][data-from=web][data-to=todo] text')].map(t => t.textContent).join('|')",
                json!([]),
            )
            .ok()?;
        named.as_str().filter(|t| t.contains("todo.create")).map(str::to_string)
    });
    browser.screenshot("topology");

    browser.click_css("a[data-view-link=names]", T);
    let row = browser.wait_text(
        "[data-test=name-row][data-name='todo.create']",
        "todo.created",
        T,
    );
    assert!(
        row.contains("ms") || row.contains("µs"),
        "latency shown: {row}"
    );
    browser.wait_for("a send rate above zero", T, |b| {
        let rate =
            b.visible_text("[data-test=name-row][data-name='todo.create'] [data-test=sent-rate]");
        (rate.ends_with("/s") && rate != "0/s").then_some(rate)
    });
    browser.screenshot("names");

    // The tail and the traces: live on a broker that serves them, a clear
    // notice on one that does not.
    browser.click_css("a[data-view-link=tail]", T);
    browser.click_css("[data-test=tail-start]", T);
    let tail = browser.wait_for("the tail's lines or its notice", T, |b| {
        let state = b
            .script(
                "return document.getElementById('tail-state').dataset.state || ''",
                json!([]),
            )
            .ok()?;
        match state.as_str()? {
            "unavailable" => Some(b.visible_text("[data-test=tail-state]")),
            _ => b
                .find_all("[data-test=tail-line][data-name='todo.create']")
                .first()
                .map(|_| "live".to_string()),
        }
    });
    assert_eq!(tail, "live", "the tail shows the traffic");
    browser.screenshot("tail");
    browser.click_css("a[data-view-link=traces]", T);
    let name_field = browser
        .find_all("#trace-form input[name=name]")
        .into_iter()
        .next()
        .expect("the trace search's name field");
    browser
        .type_into(&name_field, "todo.create")
        .expect("type the name");
    browser.click_css("[data-test=trace-search]", T);
    let traces = browser.wait_for("the traces' list or their notice", T, |b| {
        let state = b
            .script(
                "return document.getElementById('trace-state').dataset.state || ''",
                json!([]),
            )
            .ok()?;
        if state.as_str()? == "unavailable" {
            return Some(b.visible_text("[data-test=trace-state]"));
        }
        b.find_all("[data-test=trace]")
            .first()
            .map(|_| "listed".to_string())
    });
    assert_eq!(traces, "listed", "the traffic's activities are listed");
    browser.click_css("[data-test=trace]", T);
    browser.wait_for("an activity's timeline with its message", T, |b| {
        b.find_all("[data-test=trace-timeline] [data-test=trace-node][data-name='todo.create']")
            .into_iter()
            .next()
    });
    browser.screenshot("traces");
    eprintln!("screenshots in {}", screenshot_dir().display());
}

#[test]
fn a_dead_letter_is_inspected_and_replayed_from_the_console_and_delivered() {
    let _one = one_browser();
    let broker = Broker::start();
    let http = broker.http.clone().expect("http");
    // A mailer that fails every delivery; after two it is a dead letter.
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let mut opts = ClientOptions::new(broker.addr.clone(), "mailer");
        opts.max_deliveries = Some(2);
        opts.nack_delay = Duration::ZERO;
        let failing = Client::connect(opts).await.expect("mailer connects");
        failing
            .on("mail.send", |_msg| async {
                Err::<(), std::io::Error>(std::io::Error::other("the mail server is down"))
            })
            .await
            .expect("subscribe");
        let out = broker.run(&["send", "mail.send", "--data", r#"{"to":"ada@example.com"}"#]);
        assert!(out.status.success(), "{}", common::stderr(&out));
        wait_json(&http, "/v1/services", "a dead letter", |v| {
            service(v, "mailer").is_some_and(|m| m["dead_letters"] == 1)
        });
        failing.shutdown().await;
    });

    let browser = Browser::start();
    open_console(&browser, &http, "dead-letters");
    browser.click_css("[data-test=dead-letter-service][data-service=mailer]", T);
    let row = browser.wait_text("[data-test=dead-letter]", "mail.send", T);
    assert!(row.contains("nacked on attempt 2 of 2"), "{row}");
    browser.click_css("[data-test=dead-letter] [data-test=inspect]", T);
    browser.wait_text("[data-test=dead-letter-payload]", "ada@example.com", T);
    browser.screenshot("dead-letter");

    // A healthy mailer is waiting; replay hands it the message.
    let consumer = broker.spawn(&[
        "subscribe",
        "mail.send",
        "--service",
        "mailer",
        "--count",
        "1",
    ]);
    browser.click_css("[data-test=dead-letter] [data-test=replay]", T);
    let delivered = consumer.json_line(T);
    assert_eq!(delivered["payload"]["to"], "ada@example.com");
    browser.wait_text(
        "[data-test=dead-letter-detail]",
        "back in mailer's queue",
        T,
    );
    browser.wait_text("[data-test=dead-letter-services]", "No dead letters", T);
    browser.screenshot("dead-letter-replayed");
    let services = get_json(&http, "/v1/services");
    assert_eq!(
        service(&services, "mailer").expect("mailer")["dead_letters"],
        0
    );
}

#[test]
fn a_subscription_paused_with_a_click_backs_up_and_drains_when_resumed() {
    let _one = one_browser();
    let broker = Broker::start();
    let http = broker.http.clone().expect("http");
    let consumer = broker.spawn(&["subscribe", "audit.*", "--service", "audit"]);
    // Live once a first event comes through.
    let deadline = std::time::Instant::now() + T;
    loop {
        let out = broker.run(&["publish", "audit.ready", "--service", "web"]);
        assert!(out.status.success(), "{}", common::stderr(&out));
        if !consumer.no_line(Duration::from_millis(300)) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the consumer never got an event"
        );
    }
    while !consumer.no_line(Duration::from_millis(200)) {}

    let browser = Browser::start();
    open_console(&browser, &http, "subscriptions");
    browser.click_css(
        "[data-test=subscription][data-service=audit] [data-test=pause][data-pattern='audit.*']",
        T,
    );
    browser.wait_text(
        "[data-test=subscription][data-service=audit] [data-test=pattern][data-pattern='audit.*']",
        "paused",
        T,
    );
    let out = broker.run(&["publish", "audit.seen", "--service", "web", "--count", "5"]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    browser.wait_for("a backlog of 5 on the page", T, |b| {
        let backlog =
            b.visible_text("[data-test=subscription][data-service=audit] [data-test=backlog]");
        (backlog == "5").then_some(())
    });
    let services = get_json(&http, "/v1/services");
    let audit = service(&services, "audit").expect("audit");
    assert_eq!(
        (audit["backlog"].as_u64(), audit["in_flight"].as_u64()),
        (Some(5), Some(0))
    );
    assert!(
        consumer.no_line(Duration::from_millis(300)),
        "nothing delivered while paused"
    );
    browser.screenshot("subscription-paused");

    browser.click_css(
        "[data-test=subscription][data-service=audit] [data-test=resume][data-pattern='audit.*']",
        T,
    );
    for _ in 0..5 {
        assert_eq!(consumer.json_line(T)["name"], "audit.seen");
    }
    browser.wait_for("the backlog drained on the page", T, |b| {
        let backlog =
            b.visible_text("[data-test=subscription][data-service=audit] [data-test=backlog]");
        (backlog == "0").then_some(())
    });
    browser.wait_text(
        "[data-test=subscription][data-service=audit] [data-test=pattern][data-pattern='audit.*']",
        "active",
        T,
    );
    browser.screenshot("subscription-resumed");
}

#[test]
fn the_page_asks_for_an_admin_token_and_keeps_it_for_the_tab() {
    let _one = one_browser();
    let dir = common::tempdir::Dir::new("console-token");
    let manifest = dir.path().join("courier.toml");
    std::fs::write(
        &manifest,
        format!(
            "[services.audit]\nreceives = [\"audit.*\"]\ntokens = [\"{}\"]\n\n[admin]\ntokens = [\"{}\"]\n",
            courier_manifest::hash_token("crr_audit_secret"),
            courier_manifest::hash_token("crr_admin_secret")
        ),
    )
    .expect("write manifest");
    let broker = Broker::start_with(&["--manifest", manifest.to_str().expect("utf-8 path")]);
    let http = broker.http.clone().expect("http");
    let out = broker.run(&[
        "subscribe",
        "audit.*",
        "--token",
        "crr_audit_secret",
        "--idle-timeout",
        "50ms",
    ]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let browser = Browser::start();
    browser.goto(&http);
    let input = browser.wait_for("the token dialog", T, |b| {
        let open = b
            .script(
                "return document.getElementById('token-dialog').open",
                json!([]),
            )
            .ok()?;
        open.as_bool()
            .filter(|o| *o)
            .and_then(|_| b.find_all("#token-input").into_iter().next())
    });
    browser.screenshot("token-dialog");
    browser
        .type_into(&input, "crr_admin_secret")
        .expect("type the token");
    browser.click_css("[data-test=token-save]", T);
    browser.wait_text("[data-test=service][data-service=audit]", "audit.*", T);
    // Kept for the tab: a reload asks no more.
    browser.goto(&http);
    browser.wait_text("[data-test=service][data-service=audit]", "audit.*", T);
    let open = browser
        .script(
            "return document.getElementById('token-dialog').open",
            json!([]),
        )
        .expect("script");
    assert_eq!(open, json!(false));
}
