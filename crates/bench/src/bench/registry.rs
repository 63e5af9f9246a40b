//! `courier bench --only registry`: the service registry's figures, each
//! printed with its goal and verdict.
//!
//! (a) a registry change (a registration over HTTP) until a watcher's
//! long-poll (`GET /v1/services/NAME?index=N`) returns with it, p50/p99;
//! (b) DNS (`--dns`) queries a second and p99 from a bounded, closed-loop
//! load of SRV queries over UDP; (c) the broker's CPU (from
//! /proc/PID/stat) while 10,000 instances are checked by TCP connect every
//! 5 s, as a share of one core, beside the same broker idle.

use std::net::UdpSocket;

use super::process::{free_loopback_addr, DataDir, ServerChild};
use super::*;

/// Changes timed in (a), DNS queries in (b), instances in (c); `--quick`
/// divides the first two by 10 and the last by 20.
const WATCH_CHANGES: usize = 200;
const DNS_QUERIES: usize = 200_000;
const INSTANCES: usize = 10_000;
/// Threads of the DNS load, each with one query outstanding at a time.
const DNS_CLIENTS: usize = 2;
const CHECK_INTERVAL: &str = "5s";
/// (c) waits this long for checks to run steadily, then measures this long.
const CPU_SETTLE: Duration = Duration::from_secs(7);
const CPU_WINDOW: Duration = Duration::from_secs(20);
/// Linux reports process CPU times in ticks of 1/100 s (USER_HZ).
const TICKS_PER_SECOND: f64 = 100.0;

const WATCH_P99_GOAL_MS: f64 = 100.0;
const DNS_RATE_GOAL: f64 = 20_000.0;
const DNS_P99_GOAL_MS: f64 = 1.0;
const CPU_GOAL_PERCENT: f64 = 5.0;

pub(super) async fn run(exe: &Path, quick: bool) -> anyhow::Result<()> {
    let (changes, queries, instances, window) = if quick {
        (
            WATCH_CHANGES / 10,
            DNS_QUERIES / 10,
            INSTANCES / 20,
            Duration::from_secs(5),
        )
    } else {
        (WATCH_CHANGES, DNS_QUERIES, INSTANCES, CPU_WINDOW)
    };
    let dir = DataDir::create()?;
    let (addr, http) = (free_loopback_addr()?, free_loopback_addr()?);
    let dns = free_loopback_addr()?;
    progress(&format!(
        "starting a broker with its HTTP port on {http} and DNS on {dns} …"
    ));
    let server = spawn(exe, &addr, &http, &dns, dir.path())?;
    wait_ready(&http, &server).await?;

    let judged = |met: bool| match (quick, met) {
        (true, _) => "not judged (--quick)",
        (false, true) => "met",
        (false, false) => "NOT met",
    };

    progress(&format!(
        "(a) {changes} registrations, each timed until a watcher's long-poll returns with it …"
    ));
    let mut watch = watch_latencies(&http, changes).await?;
    watch.sort_by(f64::total_cmp);
    let (p50, p99) = (percentile(&watch, 0.50), percentile(&watch, 0.99));
    println!(
        "(a) registry change → watcher (POST /v1/services/NAME until GET ?index=N returns it), {changes} changes: p50 {p50:.2} ms, p99 {p99:.2} ms; goal p99 ≤ {WATCH_P99_GOAL_MS} ms: {}",
        judged(p99 <= WATCH_P99_GOAL_MS)
    );

    progress(&format!(
        "(b) {queries} DNS SRV queries from {DNS_CLIENTS} threads, one outstanding each …"
    ));
    for i in 0..3 {
        register(
            &http,
            "bench-dns",
            &json!({"id": format!("bench-dns-{i}"), "address": format!("127.0.0.1:{}", 9000 + i)}),
        )
        .await?;
    }
    let dns_addr: std::net::SocketAddr = dns.parse().context("the DNS address")?;
    let (rate, mut latencies) =
        tokio::task::spawn_blocking(move || dns_load(dns_addr, queries, DNS_CLIENTS))
            .await
            .context("internal: the DNS load panicked")??;
    latencies.sort_by(f64::total_cmp);
    let (p50, p99) = (percentile(&latencies, 0.50), percentile(&latencies, 0.99));
    println!(
        "(b) DNS over UDP, SRV of a service of 3 instances, {queries} queries, {DNS_CLIENTS} clients: {rate:.0} queries/s, p50 {:.3} ms, p99 {:.3} ms; goal ≥ {DNS_RATE_GOAL:.0} queries/s with p99 ≤ {DNS_P99_GOAL_MS} ms: {}",
        p50,
        p99,
        judged(rate >= DNS_RATE_GOAL && p99 <= DNS_P99_GOAL_MS)
    );

    progress(&format!("(c) the broker's CPU idle for {window:?} …"));
    let idle = cpu_percent(server.pid(), window).await?;
    progress(&format!(
        "(c) registering {instances} instances with a TCP check every {CHECK_INTERVAL} …"
    ));
    let target = std::net::TcpListener::bind("127.0.0.1:0").context("bind the checks' target")?;
    let target_addr = target.local_addr()?.to_string();
    // Accepts and closes: all a TCP check needs. Its cost is the bench's.
    std::thread::spawn(move || {
        for stream in target.incoming() {
            drop(stream);
        }
    });
    for i in 0..instances {
        register(
            &http,
            "bench-checked",
            &json!({
                "id": format!("bench-checked-{i:05}"),
                "address": target_addr,
                "check": format!("tcp://{target_addr}"),
                "interval": CHECK_INTERVAL,
            }),
        )
        .await?;
    }
    tokio::time::sleep(CPU_SETTLE).await;
    let healthy = healthy_count(&http, "bench-checked").await?;
    progress(&format!(
        "(c) {healthy} of {instances} healthy; measuring the broker's CPU for {window:?} …"
    ));
    let busy = cpu_percent(server.pid(), window).await?;
    println!(
        "(c) {instances} instances with a TCP check every {CHECK_INTERVAL} ({healthy} passing): the broker used {busy:.2} % of one core (idle, before registering: {idle:.2} %), over {:.0} s from /proc; goal ≤ {CPU_GOAL_PERCENT} %: {}",
        window.as_secs_f64(),
        judged(busy <= CPU_GOAL_PERCENT && healthy == instances)
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
    drop(server);
    Ok(())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// `courier serve` with HTTP and DNS; stdout and stderr are drained.
fn spawn(exe: &Path, addr: &str, http: &str, dns: &str, dir: &Path) -> anyhow::Result<ServerChild> {
    let spawned_at = Instant::now();
    let mut child = Command::new(exe)
        .args(["serve", "--listen", addr, "--http", http, "--dns", dns])
        .args(["--fsync", "never", "--trace", "off"])
        .arg("--data-dir")
        .arg(dir)
        .env("NO_COLOR", "1")
        .env("COURIER_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start the broker {} serve", exe.display()))?;
    if let Some(stdout) = child.stdout.take() {
        std::thread::spawn(move || BufReader::new(stdout).lines().for_each(drop));
    }
    Ok(ServerChild::new("the broker", child, spawned_at, |_| {}))
}

async fn wait_ready(http: &str, server: &ServerChild) -> anyhow::Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    while Instant::now() < deadline {
        if courier_client::http::get(http, "/v1/registry", None)
            .await
            .is_ok()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!(
        "the broker's HTTP port did not answer within {READY_TIMEOUT:?}{}",
        server.stderr_note()
    )
}

async fn register(http: &str, service: &str, body: &Value) -> anyhow::Result<u64> {
    let answer = courier_client::http::request(
        "POST",
        http,
        &format!("/v1/services/{service}"),
        None,
        Some(&body.to_string()),
    )
    .await?;
    let answer: Value = serde_json::from_str(&answer).context("the registration's answer")?;
    answer["index"]
        .as_u64()
        .ok_or_else(|| anyhow!("the registration's answer has no index: {answer}"))
}

async fn healthy_count(http: &str, service: &str) -> anyhow::Result<usize> {
    let answer = courier_client::http::get(http, &format!("/v1/services/{service}"), None).await?;
    let answer: Value = serde_json::from_str(&answer).context("the lookup's answer")?;
    Ok(answer["instances"].as_array().map_or(0, Vec::len))
}

/// (a): a watcher long-polls in its own task and reports each index it
/// is answered with; each registration is timed from just before its POST
/// until the watcher has seen its index.
async fn watch_latencies(http: &str, changes: usize) -> anyhow::Result<Vec<f64>> {
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel::<(u64, Instant)>();
    let armed = Arc::new(Notify::new());
    let watcher = {
        let (http, armed) = (http.to_string(), armed.clone());
        tokio::spawn(async move {
            let mut index = None;
            loop {
                let path = match index {
                    // The first poll answers at once, with the index to watch from.
                    None => "/v1/services/bench-watch".to_string(),
                    Some(index) => format!("/v1/services/bench-watch?index={index}&wait=30s"),
                };
                let poll = courier_client::http::get(&http, &path, None);
                armed.notify_one();
                let Ok(answer) = poll.await else { return };
                let at = Instant::now();
                let Ok(answer) = serde_json::from_str::<Value>(&answer) else {
                    return;
                };
                let Some(answered) = answer["index"].as_u64() else {
                    return;
                };
                index = Some(answered);
                if seen_tx.send((answered, at)).is_err() {
                    return;
                }
            }
        })
    };
    let mut latencies = Vec::with_capacity(changes);
    let first = tokio::time::timeout(Duration::from_secs(10), seen.recv()).await;
    if !matches!(first, Ok(Some(_))) {
        bail!("the watcher got no first answer within 10 s");
    }
    for i in 0..changes {
        // Let the watcher's next long-poll reach the broker first.
        armed.notified().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
        let started = Instant::now();
        let index = register(
            http,
            "bench-watch",
            &json!({"id": format!("bench-watch-{i}"), "address": "127.0.0.1:1"}),
        )
        .await?;
        loop {
            match tokio::time::timeout(Duration::from_secs(10), seen.recv()).await {
                Ok(Some((seen_index, at))) if seen_index >= index => {
                    latencies.push(at.duration_since(started).as_secs_f64() * 1000.0);
                    break;
                }
                Ok(Some(_)) => {}
                _ => bail!("the watcher did not see change {index} within 10 s"),
            }
        }
    }
    watcher.abort();
    Ok(latencies)
}

/// A DNS query for `name` (SRV, class IN) with message id `id`.
fn srv_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = Vec::with_capacity(12 + name.len() + 6);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.').filter(|l| !l.is_empty()) {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&[0, 33, 0, 1]);
    q
}

/// (b): `clients` threads, each with one query outstanding at a time,
/// until `queries` answers have come; the rate and every latency (ms).
fn dns_load(
    server: std::net::SocketAddr,
    queries: usize,
    clients: usize,
) -> anyhow::Result<(f64, Vec<f64>)> {
    let per_client = queries.div_ceil(clients);
    let started = Instant::now();
    let threads: Vec<_> = (0..clients)
        .map(|c| {
            std::thread::spawn(move || -> anyhow::Result<Vec<f64>> {
                let socket = UdpSocket::bind("127.0.0.1:0")?;
                socket.connect(server)?;
                socket.set_read_timeout(Some(Duration::from_secs(2)))?;
                let mut latencies = Vec::with_capacity(per_client);
                let mut answer = [0u8; 1500];
                for n in 0..per_client {
                    let id = ((c * per_client + n) & 0xffff) as u16;
                    let query = srv_query(id, "bench-dns.service.courier");
                    let sent = Instant::now();
                    socket.send(&query)?;
                    loop {
                        let len = socket
                            .recv(&mut answer)
                            .context("no DNS answer within 2 s")?;
                        // An answer of an earlier, timed-out query is skipped.
                        if len >= 12 && answer[..2] == id.to_be_bytes() {
                            let answers = u16::from_be_bytes([answer[6], answer[7]]);
                            if answers != 3 {
                                bail!("the answer holds {answers} SRV records, not 3");
                            }
                            break;
                        }
                    }
                    latencies.push(sent.elapsed().as_secs_f64() * 1000.0);
                }
                Ok(latencies)
            })
        })
        .collect();
    let mut all = Vec::with_capacity(queries);
    for thread in threads {
        let latencies = thread
            .join()
            .map_err(|_| anyhow!("internal: a DNS client thread panicked"))??;
        all.extend(latencies);
    }
    let rate = all.len() as f64 / started.elapsed().as_secs_f64();
    Ok((rate, all))
}

/// The process's user and system time over `window`, as a share of one
/// core (from /proc/PID/stat, fields 14 and 15).
async fn cpu_percent(pid: u32, window: Duration) -> anyhow::Result<f64> {
    let before = cpu_ticks(pid)?;
    let started = Instant::now();
    tokio::time::sleep(window).await;
    let after = cpu_ticks(pid)?;
    let seconds = after.saturating_sub(before) as f64 / TICKS_PER_SECOND;
    Ok(seconds / started.elapsed().as_secs_f64() * 100.0)
}

fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("cannot read /proc/{pid}/stat (is this Linux?)"))?;
    // The command name (field 2) may hold spaces; the fields after it don't.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| anyhow!("/proc/{pid}/stat is not as expected"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3, so utime (14) is index 11.
    let ticks = |i: usize| -> anyhow::Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .ok_or_else(|| anyhow!("/proc/{pid}/stat has no field {}", i + 3))
    };
    Ok(ticks(11)? + ticks(12)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_srv_query_is_encoded_as_dns_says() {
        let q = srv_query(0x1234, "a.service.courier");
        assert_eq!(&q[..4], &[0x12, 0x34, 0x01, 0x00]);
        assert_eq!(&q[12..14], &[1, b'a']);
        assert_eq!(&q[q.len() - 5..], &[0, 0, 33, 0, 1]);
    }

    #[test]
    fn percentiles_pick_by_rank() {
        let sorted: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&sorted, 0.5), 51.0);
        assert_eq!(percentile(&sorted, 0.99), 99.0);
    }
}
