//! W-HTTP-a: request/reply through the HTTP gateway (`POST
//! /v1/requests/{name}`, answered synchronously) beside the same
//! request/reply through the native protocol, against one broker and one
//! Rust responder.
//!
//! Both sides send the W4 request (16 B, transient, `Courier-Transient:
//! true` over HTTP) and get the W4 reply. Throughput and tails are taken
//! with [`CLIENTS`] requesters at once, each with one request in flight:
//! on HTTP each its own HTTP/1.1 keep-alive connection (driven by hand, as
//! wrk drives one: the request's bytes built once, the answer read to its
//! `Content-Length`), natively each its own SDK client and connection —
//! the same shape, so the comparison is of the protocols, not of how many
//! sockets carry the requests. Beside them, for reference, the native
//! protocol's best case: the same requesters as tasks sharing one SDK
//! connection, whose writes carry many requests each. The latency the
//! gateway adds is taken one request at a time, where queueing does not
//! hide it. The sides alternate within a run, so CPU steal falls on both.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::courier::{connect, w4_ask, w4_responder, W4_NAME, W4_REQUESTER};
use super::process::{free_loopback_addr, DataDir, ServerChild};
use super::*;

/// Requesters at once, on each side.
const CLIENTS: usize = 64;
/// The targets: the gateway reaches at least this share of the native
/// throughput, and adds at most this much at p50.
const THROUGHPUT_SHARE_TARGET: f64 = 0.5;
const ADDED_P50_TARGET_MICROS: f64 = 100.0;

/// How many requests each phase of a run makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct GatewayPlan {
    pub(super) concurrent: u64,
    pub(super) sequential: u64,
    pub(super) warmup: u64,
}

/// What one phase of one side measured.
#[derive(Clone, Copy, Debug, Default)]
struct Phase {
    per_second: f64,
    p50_micros: f64,
    p99_micros: f64,
}

/// One run's figures: (native, gateway) per phase, and the native
/// requesters at once on one shared connection.
#[derive(Clone, Copy, Debug, Default)]
struct RunFigures {
    concurrent: (Phase, Phase),
    sequential: (Phase, Phase),
    shared_connection: Phase,
}

pub(super) async fn run(
    exe: &Path,
    plan: GatewayPlan,
    runs: u32,
    timeout: Duration,
    json: bool,
) -> anyhow::Result<()> {
    progress(&format!(
        "W-HTTP-a: {} requests from {CLIENTS} requesters at once, then {} one at a time, per side and run ({} warm-up)",
        plan.concurrent, plan.sequential, plan.warmup
    ));
    let mut all = Vec::new();
    for run in 1..=runs {
        let which = format!("W-HTTP-a run {run}/{runs}");
        progress(&format!("{which} …"));
        let started = Instant::now();
        let figures = tokio::time::timeout(timeout, one_run(exe, plan, run % 2 == 0))
            .await
            .map_err(|_| {
                anyhow!(
                    "{which} did not finish within {} (--timeout)",
                    humantime::format_duration(timeout)
                )
            })?
            .with_context(|| which.clone())?;
        progress(&format!(
            "{which}: native {:.0}/s, gateway {:.0}/s; one at a time p50 native {:.1} µs, gateway {:.1} µs ({:.1} s)",
            figures.concurrent.0.per_second,
            figures.concurrent.1.per_second,
            figures.sequential.0.p50_micros,
            figures.sequential.1.p50_micros,
            started.elapsed().as_secs_f64()
        ));
        all.push(figures);
    }
    let rows = rows(&all);
    if json {
        for row in &rows {
            println!(
                "{}",
                json!({
                    "workload": "W-HTTP-a",
                    "metric": row.metric,
                    "native": row.native,
                    "gateway": row.gateway,
                    "comparison": row.comparison,
                    "target": row.target,
                    "met": row.met,
                })
            );
        }
    } else {
        print!("{}", table(&rows, runs));
    }
    Ok(())
}

/// A broker, the responder, and both sides' requesters; the phases.
async fn one_run(exe: &Path, plan: GatewayPlan, gateway_first: bool) -> anyhow::Result<RunFigures> {
    let dir = DataDir::create()?;
    let (addr, http) = (free_loopback_addr()?, free_loopback_addr()?);
    let mut server = spawn(exe, &addr, &http, dir.path()).await?;
    let http: SocketAddr = http
        .parse()
        .with_context(|| format!("internal: {http} is not an address"))?;
    let work = async {
        let responder = w4_responder(&addr).await?;
        let mut requesters = Vec::with_capacity(CLIENTS);
        for _ in 0..CLIENTS {
            requesters.push(connect(&addr, W4_REQUESTER, None).await?);
        }
        let payload = Bytes::from(vec![b'x'; TINY_BYTES]);
        let mut figures = RunFigures::default();
        // Warm both paths up: the gateway opens its bus connection on the
        // first request.
        native(&requesters, &payload, CLIENTS, plan.warmup).await?;
        gateway(http, &payload, CLIENTS, plan.warmup).await?;
        for (first, phase_clients, count) in [
            (gateway_first, CLIENTS, plan.concurrent),
            (!gateway_first, 1, plan.sequential),
        ] {
            let (n, g) = if first {
                let g = gateway(http, &payload, phase_clients, count).await?;
                (
                    native(&requesters, &payload, phase_clients, count).await?,
                    g,
                )
            } else {
                let n = native(&requesters, &payload, phase_clients, count).await?;
                (n, gateway(http, &payload, phase_clients, count).await?)
            };
            if phase_clients == 1 {
                figures.sequential = (n, g);
            } else {
                figures.concurrent = (n, g);
            }
        }
        figures.shared_connection =
            native(&requesters[..1], &payload, CLIENTS, plan.concurrent).await?;
        requesters.push(responder);
        shutdown_all(&requesters).await;
        Ok(figures)
    };
    server.watch(work).await
}

/// `courier serve` with its HTTP port on `http`, ready.
async fn spawn(exe: &Path, addr: &str, http: &str, dir: &Path) -> anyhow::Result<ServerChild> {
    let spawned_at = Instant::now();
    let mut child = Command::new(exe)
        .args(["serve", "--listen", addr, "--http", http, "--fsync", FSYNC])
        .arg("--data-dir")
        .arg(dir)
        .env("NO_COLOR", "1")
        .env("COURIER_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start the broker {} serve", exe.display()))?;
    let (tx, rx) = oneshot::channel();
    if let Some(stdout) = child.stdout.take() {
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let _ = tx.send(lines.next().and_then(Result::ok));
            lines.for_each(drop);
        });
    }
    let server = ServerChild::new("the broker", child, spawned_at, |_| {});
    match tokio::time::timeout(READY_TIMEOUT, rx).await {
        Ok(Ok(Some(line))) if line.starts_with("courier listening on") => Ok(server),
        _ => bail!(
            "the broker did not start within {} s{}",
            READY_TIMEOUT.as_secs(),
            server.stderr_note()
        ),
    }
}

/// `count` native requests from `clients` tasks, task i on client
/// `i % connections.len()`.
async fn native(
    connections: &[Client],
    payload: &Bytes,
    clients: usize,
    count: u64,
) -> anyhow::Result<Phase> {
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(clients);
    for (_, client) in (0..clients).zip(connections.iter().cycle()) {
        let (client, payload, next) = (client.clone(), payload.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    return Ok::<_, anyhow::Error>(latencies);
                }
                let t = Instant::now();
                w4_ask(&client, &payload, i, count).await?;
                latencies.push(t.elapsed().as_nanos() as u64);
            }
        }));
    }
    gather(tasks, count, started).await
}

/// `count` requests through the gateway from `clients` HTTP/1.1
/// keep-alive connections.
async fn gateway(
    http: SocketAddr,
    payload: &Bytes,
    clients: usize,
    count: u64,
) -> anyhow::Result<Phase> {
    let next = Arc::new(AtomicU64::new(0));
    let mut connections = Vec::with_capacity(clients);
    for _ in 0..clients {
        connections.push(RawConnection::open(http).await?);
    }
    let request = Arc::new(w4_http_request(http, payload));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(clients);
    for mut connection in connections {
        let (request, next) = (request.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    return Ok::<_, anyhow::Error>(latencies);
                }
                let t = Instant::now();
                let (status, body) = connection
                    .exchange(&request)
                    .await
                    .with_context(|| format!("HTTP request {} of {count}", i + 1))?;
                if status != 200 || body != TINY_BYTES {
                    bail!(
                        "HTTP request {} of {count}: the gateway answered {status} with {body} B, not 200 with the {TINY_BYTES} B reply",
                        i + 1
                    );
                }
                latencies.push(t.elapsed().as_nanos() as u64);
            }
        }));
    }
    gather(tasks, count, started).await
}

async fn gather(
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<Vec<u64>>>>,
    count: u64,
    started: Instant,
) -> anyhow::Result<Phase> {
    let mut latencies = Vec::with_capacity(count as usize);
    for task in tasks {
        latencies.extend(task.await.context("internal: a requester panicked")??);
    }
    let elapsed = started.elapsed();
    latencies.sort_unstable();
    let micros = |p| percentile(&latencies, p).unwrap_or(0) as f64 / 1000.0;
    Ok(Phase {
        per_second: per_second(count, elapsed),
        p50_micros: micros(50.0),
        p99_micros: micros(99.0),
    })
}

/// The W4 request over HTTP, as the bytes every request repeats.
fn w4_http_request(http: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let mut request = format!(
        "POST /v1/requests/{W4_NAME}?timeout=30s HTTP/1.1\r\nhost: {http}\r\n\
         content-type: application/octet-stream\r\ncourier-transient: true\r\n\
         content-length: {}\r\n\r\n",
        payload.len()
    )
    .into_bytes();
    request.extend_from_slice(payload);
    request
}

/// One keep-alive HTTP/1.1 connection driven by hand, as a load
/// generator such as wrk drives one: the request's bytes built once and
/// written whole, the answer read up to its `Content-Length`. Nothing is
/// spent between the socket and the request that the gateway's own
/// figure would pay for (hyper's client adds a dispatch channel, a
/// header map and a body stream per request).
struct RawConnection {
    stream: tokio::net::TcpStream,
    read: Vec<u8>,
}

impl RawConnection {
    async fn open(http: SocketAddr) -> anyhow::Result<RawConnection> {
        let stream = tokio::net::TcpStream::connect(http)
            .await
            .with_context(|| format!("cannot connect to the broker's HTTP port {http}"))?;
        stream.set_nodelay(true)?;
        Ok(RawConnection {
            stream,
            read: Vec::with_capacity(4096),
        })
    }

    /// Sends `request` and reads its answer: the status and the body's
    /// length.
    async fn exchange(&mut self, request: &[u8]) -> anyhow::Result<(u16, usize)> {
        self.stream
            .write_all(request)
            .await
            .context("the HTTP connection closed")?;
        loop {
            if let Some((status, head, body)) = parse_answer(&self.read)? {
                if self.read.len() >= head + body {
                    self.read.drain(..head + body);
                    return Ok((status, body));
                }
            }
            if self.stream.read_buf(&mut self.read).await? == 0 {
                bail!("the broker closed the HTTP connection");
            }
        }
    }
}

/// An HTTP/1.1 answer's status, head length and `Content-Length`, once
/// its head is all in `bytes`.
fn parse_answer(bytes: &[u8]) -> anyhow::Result<Option<(u16, usize, usize)>> {
    let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = std::str::from_utf8(&bytes[..end]).context("an HTTP head that is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|line| line.strip_prefix("HTTP/1.1 "))
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("not an HTTP/1.1 status line: {head:?}"))?;
    let mut length = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            bail!("a malformed header line: {line:?}");
        };
        if name.eq_ignore_ascii_case("content-length") {
            length = Some(value.trim().parse().context("a bad Content-Length")?);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            bail!(
                "a chunked answer ({line:?}): the load generator reads Content-Length answers only"
            );
        }
    }
    let length = length.with_context(|| format!("an answer without Content-Length: {head:?}"))?;
    Ok(Some((status, end + 4, length)))
}

/// One line of the comparison.
struct Row {
    metric: &'static str,
    native: f64,
    gateway: f64,
    /// Gateway ÷ native, or gateway − native (µs).
    comparison: f64,
    target: Option<&'static str>,
    met: Option<bool>,
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

/// The medians over the runs, with the comparisons and verdicts.
fn rows(runs: &[RunFigures]) -> Vec<Row> {
    let m = |f: &dyn Fn(&RunFigures) -> f64| median(runs.iter().map(f).collect());
    let throughput = (
        m(&|r| r.concurrent.0.per_second),
        m(&|r| r.concurrent.1.per_second),
    );
    let share = if throughput.0 > 0.0 {
        throughput.1 / throughput.0
    } else {
        0.0
    };
    let pair = |metric, native: f64, gateway: f64| Row {
        metric,
        native,
        gateway,
        comparison: gateway - native,
        target: None,
        met: None,
    };
    let ratio = |metric, native: f64, gateway: f64| Row {
        metric,
        native,
        gateway,
        comparison: if native > 0.0 { gateway / native } else { 0.0 },
        target: None,
        met: None,
    };
    let sequential_p50 = (
        m(&|r| r.sequential.0.p50_micros),
        m(&|r| r.sequential.1.p50_micros),
    );
    let added = sequential_p50.1 - sequential_p50.0;
    let shared_connection = m(&|r| r.shared_connection.per_second);
    vec![
        Row {
            metric: "64 at once, a connection each: requests/s",
            native: throughput.0,
            gateway: throughput.1,
            comparison: share,
            target: Some("gateway ≥ 50 % of native"),
            met: Some(share >= THROUGHPUT_SHARE_TARGET),
        },
        pair(
            "64 at once: p50 µs",
            m(&|r| r.concurrent.0.p50_micros),
            m(&|r| r.concurrent.1.p50_micros),
        ),
        pair(
            "64 at once: p99 µs",
            m(&|r| r.concurrent.0.p99_micros),
            m(&|r| r.concurrent.1.p99_micros),
        ),
        Row {
            metric: "one at a time: p50 µs",
            native: sequential_p50.0,
            gateway: sequential_p50.1,
            comparison: added,
            target: Some("gateway adds ≤ 100 µs"),
            met: Some(added <= ADDED_P50_TARGET_MICROS),
        },
        pair(
            "one at a time: p99 µs",
            m(&|r| r.sequential.0.p99_micros),
            m(&|r| r.sequential.1.p99_micros),
        ),
        ratio(
            "one at a time: requests/s",
            m(&|r| r.sequential.0.per_second),
            m(&|r| r.sequential.1.per_second),
        ),
        ratio(
            "64 at once, native on one connection: requests/s",
            shared_connection,
            throughput.1,
        ),
    ]
}

fn table(rows: &[Row], runs: u32) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "W-HTTP-a: sync POST /v1/requests/{{name}} (HTTP/1.1 keep-alive, driven by hand) beside the native protocol; \
         16 B transient request and reply, one Rust responder; median of {runs} run(s)"
    );
    let _ = writeln!(
        out,
        "| {:<48} | {:>12} | {:>12} | {:>17} | {:<26} | {:<7} |",
        "metric", "native", "gateway", "gateway vs native", "target", "verdict"
    );
    let _ = writeln!(
        out,
        "|{}|{}|{}|{}|{}|{}|",
        "-".repeat(50),
        "-".repeat(14),
        "-".repeat(14),
        "-".repeat(19),
        "-".repeat(28),
        "-".repeat(9)
    );
    for row in rows {
        let comparison = if row.metric.ends_with("requests/s") {
            format!("{:.2} ×", row.comparison)
        } else {
            format!("{:+.1} µs", row.comparison)
        };
        let verdict = match row.met {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "",
        };
        let _ = writeln!(
            out,
            "| {:<48} | {:>12.1} | {:>12.1} | {:>17} | {:<26} | {:<7} |",
            row.metric,
            row.native,
            row.gateway,
            comparison,
            row.target.unwrap_or(""),
            verdict
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_read_to_their_content_length_and_nothing_else_is_taken() {
        let answer =
            b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nContent-Length: 5\r\n\r\nhello";
        assert_eq!(parse_answer(answer).ok().flatten(), Some((200, 64, 5)));
        assert_eq!(parse_answer(&answer[..40]).ok().flatten(), None);
        let refused: &[u8] = b"HTTP/1.1 504 Gateway Timeout\r\ncontent-length: 0\r\n\r\n";
        assert_eq!(
            parse_answer(refused).ok().flatten(),
            Some((504, refused.len(), 0))
        );
        let chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
        assert!(parse_answer(chunked).is_err());
        assert!(parse_answer(b"HTTP/1.1 200 OK\r\n\r\n").is_err());
    }

    #[test]
    fn the_request_carries_the_payload_after_its_head() {
        let addr: SocketAddr = "127.0.0.1:8080".parse().expect("an address");
        let request = w4_http_request(addr, b"0123456789abcdef");
        let text = String::from_utf8(request).expect("text");
        assert!(text.starts_with(&format!(
            "POST /v1/requests/{W4_NAME}?timeout=30s HTTP/1.1\r\n"
        )));
        assert!(text.contains("\r\ncontent-length: 16\r\n\r\n0123456789abcdef"));
        assert!(text.ends_with("\r\n\r\n0123456789abcdef"));
    }

    fn phase(per_second: f64, p50_micros: f64) -> Phase {
        Phase {
            per_second,
            p50_micros,
            p99_micros: p50_micros * 2.0,
        }
    }

    #[test]
    fn verdicts_compare_the_gateway_with_the_native_medians() {
        let run = |native: f64, gateway: f64, added: f64| RunFigures {
            concurrent: (phase(native, 500.0), phase(gateway, 900.0)),
            sequential: (phase(10_000.0, 60.0), phase(5_000.0, 60.0 + added)),
            shared_connection: phase(native * 2.0, 300.0),
        };
        let rows = rows(&[
            run(100_000.0, 60_000.0, 40.0),
            run(90_000.0, 30_000.0, 300.0),
            run(110_000.0, 70_000.0, 50.0),
        ]);
        assert_eq!(rows[0].native, 100_000.0);
        assert_eq!(rows[0].gateway, 60_000.0);
        assert_eq!(rows[0].met, Some(true));
        assert_eq!(rows[3].comparison, 50.0);
        assert_eq!(rows[3].met, Some(true));
        // The shared connection's figure is for reference: no verdict.
        assert_eq!(rows[6].native, 200_000.0);
        assert_eq!(rows[6].comparison, 0.3);
        assert_eq!(rows[6].met, None);
        let slow = rows_of(run(100_000.0, 40_000.0, 150.0));
        assert_eq!(slow[0].met, Some(false));
        assert_eq!(slow[3].met, Some(false));
        let printed = table(&slow, 1);
        assert!(printed.contains("MISSED"), "{printed}");
        assert!(printed.contains("0.40 ×"), "{printed}");
    }

    fn rows_of(run: RunFigures) -> Vec<Row> {
        rows(&[run])
    }
}
