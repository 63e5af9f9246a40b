//! A node's flags on a cluster (docs/SCALE-OUT.md §14, §15): it refuses
//! a cluster whose servers acknowledge before they sync, naming the
//! server and the fix, and starts with `--accept-weaker-durability`,
//! saying so on `/metrics`; `--nats-max-ack-pending` sets its consumers'
//! limit.

mod cluster_common;
mod common;

use std::io::Read as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cluster_common::nats::{self, NatsCluster, Sync};
use common::*;

/// How long a refusing node may take to say so and exit.
const REFUSED_WITHIN: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread")]
async fn a_cluster_that_acknowledges_before_it_syncs_is_refused_unless_accepted() {
    let cluster = NatsCluster::start([Sync::Always, Sync::Default, Sync::Always]).await;
    let secrets = tempdir::Dir::new("secrets");
    let courier_pass = secrets.path().join("nats.pass");
    let system_pass = secrets.path().join("sys.pass");
    std::fs::write(&courier_pass, nats::COURIER_PASSWORD).expect("write");
    std::fs::write(&system_pass, nats::SYSTEM_PASSWORD).expect("write");
    let backend = cluster.backend_text();
    let flags = [
        "--backend",
        backend.as_str(),
        "--nats-user",
        nats::COURIER_USER,
        "--nats-password-file",
        courier_pass.to_str().expect("a UTF-8 path"),
        "--nats-system-user",
        nats::SYSTEM_USER,
        "--nats-system-password-file",
        system_pass.to_str().expect("a UTF-8 path"),
        "--node-id",
        "a",
    ];

    let (status, said) = refusal(&flags);
    assert!(!status.success(), "started on a weaker cluster: {said}");
    assert!(
        said.contains("n2 syncs every") && said.contains("--accept-weaker-durability"),
        "the refusal names neither the server nor the fix: {said}"
    );

    let listen = format!("127.0.0.1:{}", free_port());
    let mut accepted = flags.to_vec();
    accepted.extend([
        "--accept-weaker-durability",
        "--nats-max-ack-pending",
        "500",
    ]);
    let node = Broker::start_on_with(&listen, tempdir::Dir::new("node"), &accepted);
    let http = node.http.as_deref().expect("the node's HTTP port");
    let (status, body) = http_get(http, "/metrics", None);
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        metric(&body, "courier_durability_weaker"),
        Some(1.0),
        "the gauge does not say so"
    );

    let _worker = node.spawn(&["subscribe", "job.*", "--service", "worker"]);
    let connection = cluster.connect("test-observer").await;
    let limit = wait_until_async(|| async {
        let mut consumer: async_nats::jetstream::consumer::PullConsumer = connection
            .jetstream
            .get_consumer_from_stream("svc-worker", "COURIER_MSGS")
            .await
            .ok()?;
        Some(consumer.info().await.ok()?.config.max_ack_pending)
    })
    .await;
    assert_eq!(limit, 500);
}

/// Where an operator's JWTs define the accounts, a node logs in with the
/// credentials files `nsc` writes (its system user's too, for the sync
/// check, which it passes); a file that is not one is refused before
/// anything is connected, naming the flag.
#[tokio::test(flavor = "multi_thread")]
async fn a_node_logs_in_with_credentials_files_where_an_operator_defines_the_accounts() {
    let cluster = NatsCluster::start_with([Sync::Always; 3], nats::Accounts::Operator).await;
    let credentials = cluster.credentials().expect("operator mode").clone();
    let secrets = tempdir::Dir::new("secrets");
    let courier_creds = secrets.path().join("courier.creds");
    let system_creds = secrets.path().join("sys.creds");
    let not_creds = secrets.path().join("nats.pass");
    std::fs::write(&courier_creds, &credentials.courier).expect("write");
    std::fs::write(&system_creds, &credentials.system).expect("write");
    std::fs::write(&not_creds, nats::COURIER_PASSWORD).expect("write");
    let path = |p: &std::path::Path| p.to_str().expect("a UTF-8 path").to_string();
    let backend = cluster.backend_text();
    let flags_with = |creds: &str| {
        vec![
            "--backend".to_string(),
            backend.clone(),
            "--nats-creds".to_string(),
            creds.to_string(),
            "--nats-system-creds".to_string(),
            path(&system_creds),
            "--node-id".to_string(),
            "a".to_string(),
        ]
    };

    let flags = flags_with(&path(&not_creds));
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let (status, said) = refusal(&flags);
    assert!(
        !status.success(),
        "started with a password as credentials: {said}"
    );
    assert!(
        said.contains("--nats-creds") && said.contains("not a NATS credentials file"),
        "the refusal names neither the flag nor the cause: {said}"
    );

    let flags = flags_with(&path(&courier_creds));
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let listen = format!("127.0.0.1:{}", free_port());
    let node = Broker::start_on_with(&listen, tempdir::Dir::new("node"), &flags);
    let http = node.http.as_deref().expect("the node's HTTP port");
    let (status, body) = http_get(http, "/metrics", None);
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        metric(&body, "courier_durability_weaker"),
        Some(0.0),
        "the servers' sync was not checked as the system user"
    );

    let audit = node.spawn(&["subscribe", "order.*", "--service", "audit"]);
    node.wait_consumers("audit", 1, None);
    cluster_common::until_received(&node, &audit, "order.probed");
    let out = node.run(&["publish", "order.placed", "--data", "{\"id\":7}"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let event = loop {
        let event = audit.json_line(REFUSED_WITHIN);
        if event["name"] != "order.probed" {
            break event;
        }
    };
    assert_eq!(event["name"], "order.placed");
    assert_eq!(event["payload"]["id"], 7);
}

/// Runs `courier serve` with `flags`, expecting it to exit by itself:
/// its exit status and what it said.
fn refusal(flags: &[&str]) -> (std::process::ExitStatus, String) {
    let data = tempdir::Dir::new("refused");
    let mut refused = Command::new(courier_bin())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--http",
            "off",
            "--data-dir",
        ])
        .arg(data.path())
        .args(flags)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn courier serve");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = refused.try_wait().expect("wait for courier serve") {
            break status;
        }
        if started.elapsed() > REFUSED_WITHIN {
            let _ = refused.kill();
            panic!("the node did not refuse the cluster within {REFUSED_WITHIN:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut said = String::new();
    refused
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut said)
        .expect("read stderr");
    (status, said)
}

/// `probe`'s first answer within 30 s.
async fn wait_until_async<T, F, Fut>(mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(found) = probe().await {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "the service's consumer never appeared"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
