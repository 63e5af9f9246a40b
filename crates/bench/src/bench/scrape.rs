//! `courier bench --metrics-scrape`: how long the broker takes to answer
//! `GET /metrics` once it has counted traffic of many names from many
//! services — the page a Prometheus scrape reads every few seconds.

use super::courier::connect;
use super::process::{free_loopback_addr, DataDir, ServerChild};
use super::*;

/// Names, services and scrapes of a full run (`--quick` divides the first
/// two by 20).
const NAMES: usize = 10_000;
const SERVICES: usize = 1_000;
const SCRAPES: usize = 40;
/// The answer time the broker is built to stay under at full size.
const TARGET_MS: f64 = 50.0;
/// The one service that receives every name.
const SINK: &str = "bench-sink";

pub(super) async fn run(exe: &Path, quick: bool) -> anyhow::Result<()> {
    let (names, services) = if quick {
        (NAMES / 20, SERVICES / 20)
    } else {
        (NAMES, SERVICES)
    };
    let dir = DataDir::create()?;
    let (addr, http) = (free_loopback_addr()?, free_loopback_addr()?);
    progress(&format!(
        "starting a broker with its HTTP port on {http}, then {names} names from {services} services …"
    ));
    let (server, ready) = spawn(exe, &addr, &http, dir.path())?;
    match tokio::time::timeout(Duration::from_secs(30), ready).await {
        Ok(Ok(Some(line))) if line.starts_with("courier listening on") => {}
        _ => bail!(
            "the broker did not start within 30 s{}",
            server.stderr_note()
        ),
    }

    let received = Arc::new(AtomicU64::new(0));
    let all_received = Arc::new(Notify::new());
    let sink = connect(&addr, SINK, Some(1024)).await?;
    let (count, done, expected) = (received.clone(), all_received.clone(), names as u64);
    sink.on("scrape.>", move |_msg| {
        let (count, done) = (count.clone(), done.clone());
        async move {
            if count.fetch_add(1, Ordering::Relaxed) + 1 == expected {
                done.notify_one();
            }
            Ok::<(), courier_client::Error>(())
        }
    })
    .await
    .context("cannot subscribe the receiving service")?;

    // Each service sends its share of the names; all stay connected, as a
    // real application's would while it is scraped.
    let per_service = names.div_ceil(services);
    let mut senders = Vec::with_capacity(services);
    for s in 0..services {
        let client = connect(&addr, &format!("bench-svc-{s:04}"), None).await?;
        let mut acks = Vec::with_capacity(per_service);
        for n in (s * per_service..((s + 1) * per_service).min(names)).map(|n| n as u64) {
            acks.push(
                client
                    .event(format!("scrape.name-{n:05}"))
                    .payload(bytes::Bytes::from_static(b"{}"))
                    .enqueue()?,
            );
        }
        for ack in acks {
            ack.wait().await.context("a send was refused")?;
        }
        senders.push(client);
    }
    let notified = all_received.notified();
    if received.load(Ordering::Relaxed) < expected {
        tokio::time::timeout(Duration::from_secs(60), notified)
            .await
            .map_err(|_| {
                anyhow!(
                    "the receiving service got {} of {expected} messages within 60 s",
                    received.load(Ordering::Relaxed)
                )
            })?;
    }

    progress(&format!("scraping /metrics {SCRAPES} times …"));
    let mut took = Vec::with_capacity(SCRAPES);
    let mut page = String::new();
    for _ in 0..SCRAPES {
        let started = Instant::now();
        page = courier_client::http::get(&http, "/metrics", None).await?;
        took.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    took.sort_by(f64::total_cmp);
    let series = page
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .count();
    let labelled_names = page
        .lines()
        .filter(|l| l.starts_with("courier_messages_sent_total{"))
        .count();
    let at = |p: f64| took[((took.len() - 1) as f64 * p).round() as usize];
    let (p50, p99, max) = (at(0.50), at(0.99), at(1.0));
    println!(
        "/metrics of a broker that counted {names} names from {services} services (each name sent by one, received by {SINK}): {series} series ({labelled_names} of them courier_messages_sent_total), {:.1} MiB per answer",
        page.len() as f64 / (1024.0 * 1024.0)
    );
    println!(
        "answer time over {SCRAPES} scrapes (connect, GET, whole body read): p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms; target < {TARGET_MS} ms at {NAMES} names and {SERVICES} services: {}",
        match (quick, max < TARGET_MS) {
            (true, _) => "not judged (--quick)",
            (false, true) => "met",
            (false, false) => "NOT met",
        }
    );
    println!(
        "Command: {}; build: {}",
        command_line(std::env::args()),
        if cfg!(debug_assertions) {
            "debug (not for figures)"
        } else {
            "release"
        }
    );
    for client in senders {
        client.shutdown().await;
    }
    sink.shutdown().await;
    drop(server);
    Ok(())
}

/// `courier serve` with its HTTP port on `http`; the receiver gets the
/// first stdout line (the ready line).
fn spawn(
    exe: &Path,
    addr: &str,
    http: &str,
    dir: &Path,
) -> anyhow::Result<(ServerChild, tokio::sync::oneshot::Receiver<Option<String>>)> {
    let spawned_at = Instant::now();
    let mut child = Command::new(exe)
        .args([
            "serve", "--listen", addr, "--http", http, "--fsync", "never",
        ])
        .arg("--data-dir")
        .arg(dir)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start the broker {} serve", exe.display()))?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    if let Some(stdout) = child.stdout.take() {
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let _ = tx.send(lines.next().and_then(Result::ok));
            lines.for_each(drop);
        });
    }
    Ok((
        ServerChild::new("the broker", child, spawned_at, |_| {}),
        rx,
    ))
}
