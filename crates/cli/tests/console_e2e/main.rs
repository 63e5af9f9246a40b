//! The broker's console and admin API against real `courier serve`
//! processes carrying real traffic: the JSON API and its errors over plain
//! HTTP, `courier pause`/`resume` across a restart, and the page itself in
//! headless Chromium (chromedriver's WebDriver API), clicked as a person
//! would. Screenshots go to `$CARGO_TARGET_DIR/console-screenshots/`.
//!
//! The browser tests need Debian's `chromium` and `chromium-driver`
//! (scripts/test.sh installs them); without them they fail and say so.

#[path = "../common/mod.rs"]
mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::webdriver::{base64_decode, screenshot_dir, Browser};
use common::{http_call as call, Broker};
use courier_client::{Client, ClientOptions};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(30);

mod api;
mod browser;

/// One browser at a time: two cores run the brokers, the clients and
/// Chromium.
static BROWSER: Mutex<()> = Mutex::new(());

fn one_browser() -> std::sync::MutexGuard<'static, ()> {
    BROWSER
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
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
    common::wait_until(&format!("{what} (GET {path})"), T, || {
        let v = get_json(http, path);
        if check(&v) {
            Ok(v)
        } else {
            Err(v)
        }
    })
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
