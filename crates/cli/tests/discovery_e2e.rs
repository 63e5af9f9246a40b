//! The SDK's discovery and resilience against real `courier` processes: a
//! Rust caller finds HTTP services registered with `courier register` and
//! checked over HTTP through `client.discover()`, calls them under a
//! policy with a circuit breaker while they are killed, hang and come
//! back, watches registry changes, and balances calls over instances.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{free_port, Broker};
use courier_client::resilience::{self, prometheus_text};
use courier_client::{
    Balance, BreakerConfig, BreakerState, Client, ClientOptions, Discovery, Idempotency, Policy,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const T: Duration = Duration::from_secs(20);

fn http_port(broker: &Broker) -> String {
    broker
        .http
        .as_deref()
        .expect("an HTTP port")
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string()
}

async fn caller(registry: &Broker) -> Client {
    let mut opts = ClientOptions::new(&registry.addr, "caller");
    opts.http = Some(http_port(registry));
    Client::connect(opts).await.expect("connect the caller")
}

/// `courier register NAME --address ADDRESS [more]`: the instance id.
fn register(registry: &Broker, name: &str, address: &str, more: &[&str]) -> String {
    let mut args = vec!["register", name, "--address", address];
    args.extend_from_slice(more);
    let out = registry
        .cli(&args)
        .env("COURIER_HTTP", http_port(registry))
        .output()
        .expect("run courier register");
    assert!(out.status.success(), "{}", common::stderr(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn deregister(registry: &Broker, name: &str, id: &str) {
    let out = registry
        .cli(&["deregister", name, id])
        .env("COURIER_HTTP", http_port(registry))
        .output()
        .expect("run courier deregister");
    assert!(out.status.success(), "{}", common::stderr(&out));
}

/// `GET path` on `address`: the status, or an error for anything but 200.
async fn get(address: &str, path: &str) -> std::io::Result<u16> {
    let mut stream = TcpStream::connect(address).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await?;
    let status = String::from_utf8_lossy(&answer)
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| std::io::Error::other("not an HTTP answer"))?;
    if status == 200 {
        Ok(status)
    } else {
        Err(std::io::Error::other(format!("status {status}")))
    }
}

/// A small HTTP service in this process: `/health` always answers 200;
/// `/work` answers 200 and counts, or never answers while `hang` is set.
struct TestService {
    address: String,
    hang: Arc<AtomicBool>,
    served: Arc<AtomicU32>,
}

impl TestService {
    async fn start() -> TestService {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address").to_string();
        let hang = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicU32::new(0));
        let (h, s) = (hang.clone(), served.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve_one(stream, h.clone(), s.clone()));
            }
        });
        TestService {
            address,
            hang,
            served,
        }
    }
}

async fn serve_one(mut stream: TcpStream, hang: Arc<AtomicBool>, served: Arc<AtomicU32>) {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let work = String::from_utf8_lossy(&head).starts_with("GET /work");
    if work && hang.load(Ordering::SeqCst) {
        // Holds the connection without answering, as a stuck service does.
        tokio::time::sleep(Duration::from_secs(60)).await;
        return;
    }
    if work {
        served.fetch_add(1, Ordering::SeqCst);
    }
    let _ = stream
        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
        .await;
}

async fn wait_endpoints(discovery: &mut Discovery, n: usize) {
    discovery
        .wait_for(T, |e| e.endpoints.len() == n)
        .await
        .unwrap_or_else(|e| panic!("{n} endpoint(s) of {}: {e}", discovery.service()));
}

fn breaker(cool_down: Duration) -> BreakerConfig {
    BreakerConfig {
        consecutive_failures: 3,
        failure_rate: None,
        cool_down,
        half_open_probes: 1,
        ..BreakerConfig::default()
    }
}

/// Calls until one succeeds (each failure is a call the caller made and
/// saw fail): the breaker has to find out by itself that the service is back.
async fn call_until_success<T>(
    what: &str,
    mut call: impl AsyncFnMut() -> Result<T, resilience::Error>,
) {
    let deadline = Instant::now() + T;
    loop {
        if call().await.is_ok() {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: not within {T:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_http_service_opens_the_breaker_and_its_return_closes_it() {
    let registry = Broker::start();
    // The flaky service is a courier process: its HTTP port's /healthz is
    // both the check and what the caller calls.
    let port = free_port().to_string();
    let service_http = format!("127.0.0.1:{port}");
    let service = Broker::start_with(&["--http", &service_http]);
    register(
        &registry,
        "flaky",
        &service_http,
        &[
            "--check",
            &format!("http://{service_http}/healthz"),
            "--interval",
            "200ms",
        ],
    );
    let client = caller(&registry).await;
    let mut flaky = client.discover("flaky").await.expect("discover");
    wait_endpoints(&mut flaky, 1).await;

    let timeout = Duration::from_secs(2);
    let policy = Policy::builder("flaky")
        .timeout(timeout)
        .retries(0)
        .breaker(breaker(Duration::from_secs(1)))
        .build();
    let call = async || {
        flaky
            .call(&policy, Idempotency::Idempotent, |endpoint| async move {
                get(&endpoint.address, "/healthz").await
            })
            .await
    };
    assert_eq!(call().await.expect("the service answers"), 200);

    // kill -9: connections are refused, then the registry drops it.
    drop(service);
    let mut failures = 0;
    while policy.breaker_state() != Some(BreakerState::Open) {
        assert!(call().await.is_err(), "a call to the killed service");
        failures += 1;
        assert!(failures <= 3, "the breaker opens after 3 failures in a row");
    }
    for _ in 0..10 {
        let started = Instant::now();
        let refused = call().await.expect_err("the breaker is open");
        let took = started.elapsed();
        assert!(
            matches!(refused, resilience::Error::Open { .. }),
            "{refused}"
        );
        assert!(took < timeout / 20, "fails fast: {took:?}");
    }

    // Back on the same port: the check passes again, the caller's next
    // probe goes through and closes the breaker.
    let _service = Broker::start_with(&["--http", &service_http]);
    call_until_success("the caller reaches the service again", call).await;
    assert_eq!(policy.breaker_state(), Some(BreakerState::Closed));
    let snapshot = policy.snapshot();
    assert!(snapshot.breaker_opened >= 1, "{snapshot:?}");
    assert!(snapshot.rejected_open >= 10, "{snapshot:?}");
    let metrics = prometheus_text(&[snapshot]);
    assert!(
        metrics.contains("courier_call_breaker_state{policy=\"flaky\",state=\"closed\"} 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_killed_instance_opens_only_its_own_breaker_and_calls_go_to_the_other() {
    let registry = Broker::start();
    // Two instances of a flaky HTTP service, each a courier process whose
    // /healthz the caller calls. They are registered without a check, so
    // the registry keeps listing a dead one: only the caller's breakers
    // keep calls away from it.
    let address = || format!("127.0.0.1:{}", free_port());
    let (address_a, address_b) = (address(), address());
    let instance = |address: &str| Broker::start_with(&["--http", address]);
    let (a, b) = (instance(&address_a), instance(&address_b));
    register(&registry, "flaky", &address_a, &["--id", "flaky-a"]);
    register(&registry, "flaky", &address_b, &["--id", "flaky-b"]);
    let client = caller(&registry).await;
    let mut flaky = client.discover("flaky").await.expect("discover");
    wait_endpoints(&mut flaky, 2).await;

    let timeout = Duration::from_secs(2);
    let policy = Policy::builder("flaky")
        .timeout(timeout)
        .retries(1)
        .breaker(breaker(Duration::from_secs(1)))
        .build();
    let call = async || {
        flaky
            .call(&policy, Idempotency::Idempotent, |endpoint| async move {
                get(&endpoint.address, "/healthz")
                    .await
                    .map(|_| endpoint.id)
            })
            .await
    };
    let state = |id: &str| policy.endpoint_breaker_state(id);
    let mut answered = std::collections::BTreeSet::new();
    for _ in 0..4 {
        answered.insert(call().await.expect("both answer"));
    }
    assert_eq!(answered.len(), 2, "round robin reaches both: {answered:?}");

    // kill -9 one: every call still succeeds (a failed attempt at it is
    // retried at the other) until its breaker opens; the other's stays
    // closed.
    drop(a);
    let mut calls = 0;
    while state("flaky-a") != Some(BreakerState::Open) {
        assert_eq!(call().await.expect("b answers"), "flaky-b");
        calls += 1;
        assert!(calls <= 10, "a's breaker opens after 3 failed attempts");
    }
    assert_eq!(state("flaky-b"), Some(BreakerState::Closed));
    assert_eq!(policy.breaker_state(), Some(BreakerState::Closed));
    let turned_away = |id: &str| {
        policy
            .snapshot()
            .endpoints
            .iter()
            .find(|e| e.endpoint == id)
            .map_or(0, |e| e.rejected)
    };
    let turned_away_before = turned_away("flaky-a");
    for _ in 0..20 {
        let started = Instant::now();
        assert_eq!(call().await.expect("b answers"), "flaky-b");
        let took = started.elapsed();
        assert!(took < timeout / 4, "no timeout: {took:?}");
    }
    assert!(
        turned_away("flaky-a") > turned_away_before,
        "calls were turned away from a"
    );
    assert_eq!(policy.snapshot().timed_out, 0);
    let metrics = prometheus_text(&[policy.snapshot()]);
    for series in [
        "courier_call_endpoint_breaker_state{policy=\"flaky\",endpoint=\"flaky-a\",state=\"closed\"} 0",
        "courier_call_endpoint_breaker_state{policy=\"flaky\",endpoint=\"flaky-b\",state=\"closed\"} 1",
        "courier_call_endpoint_breakers{policy=\"flaky\",state=\"closed\"} 1",
    ] {
        assert!(metrics.contains(series), "{series} in {metrics}");
    }
    assert!(
        metrics.contains(
            "courier_call_endpoint_rejections_total{policy=\"flaky\",endpoint=\"flaky-a\"}"
        ),
        "{metrics}"
    );

    // Kill the other too: once its breaker opens as well, calls fail at
    // once without being made.
    drop(b);
    let mut failures = 0;
    while policy.breaker_state() != Some(BreakerState::Open) {
        assert!(call().await.is_err(), "a call to two killed instances");
        failures += 1;
        assert!(failures <= 10, "every breaker opens");
    }
    for _ in 0..10 {
        let started = Instant::now();
        let refused = call().await.expect_err("every breaker is open");
        let took = started.elapsed();
        assert!(
            matches!(refused, resilience::Error::Open { .. }),
            "{refused}"
        );
        assert!(took < timeout / 20, "fails fast: {took:?}");
    }

    // Back on the same ports: the breakers' probes find them and close
    // both breakers by themselves.
    let (_a, _b) = (instance(&address_a), instance(&address_b));
    call_until_success("the caller reaches the service again", call).await;
    let deadline = Instant::now() + T;
    while state("flaky-a") != Some(BreakerState::Closed)
        || state("flaky-b") != Some(BreakerState::Closed)
    {
        assert!(
            Instant::now() < deadline,
            "both breakers close: {:?}, {:?}",
            state("flaky-a"),
            state("flaky-b")
        );
        call().await.expect("the instances are back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let snapshot = policy.snapshot();
    assert!(snapshot.breaker_opened >= 2, "{snapshot:?}");
    assert!(snapshot.rejected_open >= 10, "{snapshot:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_service_costs_timeouts_only_until_the_breaker_opens() {
    let registry = Broker::start();
    let service = TestService::start().await;
    register(
        &registry,
        "stuck",
        &service.address,
        &[
            "--check",
            &format!("http://{}/health", service.address),
            "--interval",
            "200ms",
        ],
    );
    let client = caller(&registry).await;
    let mut stuck = client.discover("stuck").await.expect("discover");
    wait_endpoints(&mut stuck, 1).await;

    let timeout = Duration::from_millis(800);
    let policy = Policy::builder("stuck")
        .timeout(timeout)
        .retries(0)
        .breaker(breaker(Duration::from_millis(500)))
        .bulkhead(8)
        .build();
    let call = async || {
        stuck
            .call(&policy, Idempotency::NotIdempotent, |endpoint| async move {
                get(&endpoint.address, "/work").await
            })
            .await
    };
    call().await.expect("the service answers");

    service.hang.store(true, Ordering::SeqCst);
    for _ in 0..3 {
        let started = Instant::now();
        let failed = call().await.expect_err("a hanging call times out");
        assert!(matches!(failed, resilience::Error::Timeout(_)), "{failed}");
        assert!(started.elapsed() >= timeout);
    }
    assert_eq!(policy.breaker_state(), Some(BreakerState::Open));
    let started = Instant::now();
    let refused = call().await.expect_err("open");
    assert!(
        matches!(refused, resilience::Error::Open { .. }),
        "{refused}"
    );
    assert!(
        started.elapsed() < timeout / 10,
        "fails fast: {:?}",
        started.elapsed()
    );

    service.hang.store(false, Ordering::SeqCst);
    call_until_success("the service recovers", call).await;
    assert_eq!(policy.breaker_state(), Some(BreakerState::Closed));
    let snapshot = policy.snapshot();
    assert_eq!(snapshot.timed_out, 3, "{snapshot:?}");
    assert_eq!(snapshot.breaker_opened, 1, "{snapshot:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bus_requests_run_under_the_same_policy() {
    let registry = Broker::start();
    let client = caller(&registry).await;
    let policy = Policy::builder("pricing")
        .timeout(Duration::from_millis(300))
        .retries(0)
        .breaker(breaker(Duration::from_millis(300)))
        .build();
    // Nobody handles pricing.quote yet: requests go unanswered.
    let quote = serde_json::json!({"sku": 7});
    let ask = async || {
        policy
            .call(|| client.request("pricing.quote", &quote))
            .await
    };
    for _ in 0..3 {
        assert!(ask().await.is_err());
    }
    assert_eq!(policy.breaker_state(), Some(BreakerState::Open));
    let started = Instant::now();
    assert!(matches!(ask().await, Err(resilience::Error::Open { .. })));
    assert!(started.elapsed() < Duration::from_millis(30));

    let pricing = Client::connect(ClientOptions::new(&registry.addr, "pricing"))
        .await
        .expect("connect pricing");
    pricing
        .on("pricing.quote", |msg| async move {
            msg.reply("pricing.quoted", &serde_json::json!({"cents": 250}))
                .await?;
            Ok::<(), courier_client::Error>(())
        })
        .await
        .expect("handle pricing.quote");
    let deadline = Instant::now() + T;
    let reply = loop {
        if let Ok(reply) = ask().await {
            break reply;
        }
        assert!(Instant::now() < deadline, "a request succeeds again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(reply.name(), "pricing.quoted");
    assert_eq!(policy.breaker_state(), Some(BreakerState::Closed));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_discovery_sees_registry_changes_in_order() {
    let registry = Broker::start();
    let client = caller(&registry).await;
    let mut orders = client.discover("orders").await.expect("discover");
    assert!(orders.endpoints().endpoints.is_empty());

    let ids = |e: &courier_client::Endpoints| -> Vec<String> {
        let mut ids: Vec<String> = e.endpoints.iter().map(|e| e.id.clone()).collect();
        ids.sort();
        ids
    };
    let mut last_index = orders.endpoints().index;
    let mut next = async |expected: Vec<&str>| {
        let seen = tokio::time::timeout(T, orders.changed())
            .await
            .expect("a change within the deadline")
            .expect("the watch goes on");
        assert_eq!(ids(&seen), expected);
        assert!(seen.index > last_index, "the index moves forward");
        last_index = seen.index;
        seen
    };

    register(&registry, "orders", "127.0.0.1:9001", &["--id", "orders-a"]);
    next(vec!["orders-a"]).await;
    register(&registry, "orders", "127.0.0.1:9002", &["--id", "orders-b"]);
    let both = next(vec!["orders-a", "orders-b"]).await;
    assert!(both
        .endpoints
        .iter()
        .any(|e| e.address == "127.0.0.1:9002" && e.port == Some(9002)));
    deregister(&registry, "orders", "orders-a");
    next(vec!["orders-b"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_are_spread_over_two_instances() {
    let registry = Broker::start();
    let one = TestService::start().await;
    let two = TestService::start().await;
    for service in [&one, &two] {
        register(&registry, "pair", &service.address, &[]);
    }
    let client = caller(&registry).await;
    let policy = Policy::builder("pair").build();

    let mut round_robin = client.discover("pair").await.expect("discover");
    wait_endpoints(&mut round_robin, 2).await;
    for _ in 0..20 {
        round_robin
            .call(&policy, Idempotency::Idempotent, |e| async move {
                get(&e.address, "/work").await
            })
            .await
            .expect("a call");
    }
    let served = || {
        (
            one.served.swap(0, Ordering::SeqCst),
            two.served.swap(0, Ordering::SeqCst),
        )
    };
    assert_eq!(served(), (10, 10), "round robin: each in turn");

    let two_choices = client
        .discover_with("pair", Balance::PowerOfTwoChoices)
        .await
        .expect("discover");
    // Ten calls at once, then ten more: each pick avoids the busier one.
    for _ in 0..2 {
        let calls = (0..10).map(|_| {
            two_choices.call(&policy, Idempotency::Idempotent, |e| async move {
                get(&e.address, "/work").await
            })
        });
        for result in futures_util::future::join_all(calls).await {
            result.expect("a call");
        }
    }
    let (a, b) = served();
    assert_eq!(a + b, 20);
    assert!(
        a >= 5 && b >= 5,
        "two choices spread the calls: {a} and {b}"
    );
    assert_eq!(policy.snapshot().succeeded, 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_a_manifest_discovery_runs_on_the_callers_own_token() {
    let dir = common::tempdir::Dir::new("discovery-manifest");
    let manifest = common::manifest_with_admin(
        &dir,
        "caller",
        "sends = [\"api.ping\"]",
        "crr_caller_secret",
        "crr_admin_secret",
    );
    let registry = Broker::start_with(&["--manifest", &manifest]);
    let register_as_admin = |id: &str, address: &str| {
        let out = registry
            .cli(&["register", "api", "--address", address, "--id", id])
            .env("COURIER_HTTP", http_port(&registry))
            .env("COURIER_TOKEN", "crr_admin_secret")
            .output()
            .expect("run courier register");
        assert!(out.status.success(), "{}", common::stderr(&out));
    };
    register_as_admin("api-1", "127.0.0.1:9101");

    let mut opts = ClientOptions::new(&registry.addr, "caller");
    opts.http = Some(http_port(&registry));
    opts.token = Some("crr_caller_secret".to_string());
    let client = Client::connect(opts).await.expect("connect the caller");
    let mut api = client
        .discover("api")
        .await
        .expect("a service's token looks up the registry");
    wait_endpoints(&mut api, 1).await;
    // The watch long-polls on the same token.
    register_as_admin("api-2", "127.0.0.1:9102");
    wait_endpoints(&mut api, 2).await;
}
