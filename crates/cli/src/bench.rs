//! `courier bench`: the durable-path figures of issue 3 — the Courier side
//! of issue 4's side-by-side table.
//!
//! Every run starts a real broker process (this same binary, `serve`) on a
//! free loopback port with a fresh data directory, drives it through the
//! SDK, and kills it afterwards — also on error, timeout or Ctrl-C (the
//! process and the directory are owned by guards that clean up on drop).
//!
//! Results are kept per *system* (one column each in the table, one key
//! each in the JSON), so `--against nats` can add a second [`System`]
//! whose runs interleave with Courier's without changing the output code.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, Context as _};
use bytes::Bytes;
use clap::Args;
use courier_client::{Client, ClientOptions, PendingAck};
use serde_json::{json, Map, Value};
use tokio::sync::{oneshot, Notify};

/// Message sizes and client settings; printed with the table.
const SMALL_BYTES: usize = 128;
const LARGE_BYTES: usize = 1024;
/// Unacknowledged sends kept in flight by the pipelined workloads.
const WINDOW: usize = 256;
/// Deliveries the W6 consumer takes at once.
const MAX_IN_FLIGHT: u32 = 1024;
/// The broker's `--fsync` for every run (its default).
const FSYNC: &str = "always";
/// `--quick` divides every message count by this.
const QUICK_DIVISOR: f64 = 20.0;
/// No workload runs with fewer messages than this, however small the scale.
const MIN_MESSAGES: u64 = 10;
/// A broker must print its ready line within this.
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// A consumer that handles nothing for this long has stalled.
const STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// W7a polls `Client::connect` this often while the broker restarts.
const CONNECT_POLL: Duration = Duration::from_millis(1);
/// Lines of the broker's stderr kept for error messages.
const STDERR_TAIL_LINES: usize = 8;

/// `courier bench`: durable publish, consume and restart figures.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// A small smoke run: every message count divided by 20.
    #[arg(long)]
    quick: bool,
    /// Runs per workload; the table shows the median and the spread (min–max).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    runs: u32,
    /// Print one JSON object per workload and metric instead of the table
    /// (the settings then go to stderr).
    #[arg(long)]
    json: bool,
    /// Run only these workloads, comma-separated: W5a, W5b, W6, W7a, W7b
    /// (W5 and W7 name both halves).
    #[arg(long, value_parser = parse_only)]
    only: Option<Only>,
    /// Each run of a workload must finish within this (e.g. 90s, 10m), or
    /// the bench stops with an error.
    #[arg(long, default_value = "10m", value_parser = crate::parse_duration)]
    timeout: Duration,
    /// Multiplies every message count (after --quick); for tests.
    #[arg(long, default_value_t = 1.0, hide = true)]
    scale: f64,
}

// ---------------------------------------------------------------------------
// What is measured

/// Workload ids of issue 4.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Workload {
    W5a,
    W5b,
    W6,
    W7a,
    W7b,
}

impl Workload {
    const ALL: [Workload; 5] = [
        Workload::W5a,
        Workload::W5b,
        Workload::W6,
        Workload::W7a,
        Workload::W7b,
    ];

    fn id(self) -> &'static str {
        match self {
            Workload::W5a => "W5a",
            Workload::W5b => "W5b",
            Workload::W6 => "W6",
            Workload::W7a => "W7a",
            Workload::W7b => "W7b",
        }
    }
}

/// The workloads `--only` selected, in canonical order, without repeats.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Only(Vec<Workload>);

fn parse_only(text: &str) -> Result<Only, String> {
    use Workload::*;
    let mut picked = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let named: &[Workload] = match part.to_ascii_lowercase().as_str() {
            "w5a" => &[W5a],
            "w5b" => &[W5b],
            "w5" => &[W5a, W5b],
            "w6" => &[W6],
            "w7a" => &[W7a],
            "w7b" => &[W7b],
            "w7" => &[W7a, W7b],
            _ => {
                return Err(format!(
                    "unknown workload {part:?}; choose from W5a, W5b, W6, W7a, W7b (W5 and W7 name both halves), comma-separated"
                ))
            }
        };
        picked.extend_from_slice(named);
    }
    if picked.is_empty() {
        return Err("no workload named; write e.g. --only W5a,W6".to_string());
    }
    picked.sort();
    picked.dedup();
    Ok(Only(picked))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Metric {
    Throughput,
    LatencyP50,
    LatencyP99,
    ReadyLine,
    FirstConnect,
    RssWithBacklog,
    RssAfterRestart,
}

impl Metric {
    fn name(self) -> &'static str {
        match self {
            Metric::Throughput => "throughput",
            Metric::LatencyP50 => "latency p50",
            Metric::LatencyP99 => "latency p99",
            Metric::ReadyLine => "restart: spawn to ready line",
            Metric::FirstConnect => "restart: spawn to first connect",
            Metric::RssWithBacklog => "RSS, backlog just written",
            Metric::RssAfterRestart => "RSS, backlog after restart",
        }
    }

    fn unit(self) -> &'static str {
        match self {
            Metric::Throughput => "msg/s",
            Metric::LatencyP50 | Metric::LatencyP99 => "µs",
            Metric::ReadyLine | Metric::FirstConnect => "ms",
            Metric::RssWithBacklog | Metric::RssAfterRestart => "MiB",
        }
    }

    fn higher_is_better(self) -> bool {
        matches!(self, Metric::Throughput)
    }
}

/// Every row the table can have, in the order it is printed.
const ROWS: [(Workload, Metric); 9] = [
    (Workload::W5a, Metric::Throughput),
    (Workload::W5a, Metric::LatencyP50),
    (Workload::W5a, Metric::LatencyP99),
    (Workload::W5b, Metric::Throughput),
    (Workload::W6, Metric::Throughput),
    (Workload::W7a, Metric::ReadyLine),
    (Workload::W7a, Metric::FirstConnect),
    (Workload::W7b, Metric::RssWithBacklog),
    (Workload::W7b, Metric::RssAfterRestart),
];

/// One figure from one run.
type Measurement = (Workload, Metric, f64);

/// A system under test: one column of the table, one key in the JSON.
/// Issue 4 adds NATS here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum System {
    Courier,
}

impl System {
    fn key(self) -> &'static str {
        match self {
            System::Courier => "courier",
        }
    }

    fn title(self) -> &'static str {
        match self {
            System::Courier => "Courier",
        }
    }
}

/// A unit of work run once per run: W7a and W7b share one (the backlog
/// is built once, then measured, then the broker is killed and restarted).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Job {
    PublishOneByOne,
    PublishPipelined,
    Consume,
    Restart,
}

impl Job {
    fn for_selection(selected: &[Workload]) -> Vec<Job> {
        let mut jobs = Vec::new();
        for w in selected {
            let job = match w {
                Workload::W5a => Job::PublishOneByOne,
                Workload::W5b => Job::PublishPipelined,
                Workload::W6 => Job::Consume,
                Workload::W7a | Workload::W7b => Job::Restart,
            };
            if !jobs.contains(&job) {
                jobs.push(job);
            }
        }
        jobs
    }

    fn label(self) -> &'static str {
        match self {
            Job::PublishOneByOne => "W5a",
            Job::PublishPipelined => "W5b",
            Job::Consume => "W6",
            Job::Restart => "W7",
        }
    }
}

/// Message counts for one invocation.
#[derive(Clone, Debug, PartialEq)]
struct Plan {
    w5a: u64,
    w5a_warmup: u64,
    w5b: u64,
    w5b_warmup: u64,
    w6: u64,
    w7: u64,
}

impl Plan {
    fn new(quick: bool, scale: f64) -> Result<Plan, String> {
        if !(scale > 0.0 && scale <= 10.0) {
            return Err(format!("--scale {scale} must be above 0 and at most 10"));
        }
        let factor = if quick { scale / QUICK_DIVISOR } else { scale };
        let n = |base: u64| ((base as f64 * factor).round() as u64).max(MIN_MESSAGES);
        Ok(Plan {
            w5a: n(20_000),
            w5a_warmup: n(1_000),
            w5b: n(200_000),
            w5b_warmup: n(10_000),
            w6: n(200_000),
            w7: n(1_000_000),
        })
    }

    fn describe(&self, job: Job) -> String {
        match job {
            Job::PublishOneByOne => format!(
                "{} durable events of {SMALL_BYTES} B, each ack awaited before the next send (after {} warm-up)",
                thousands(self.w5a),
                thousands(self.w5a_warmup)
            ),
            Job::PublishPipelined => format!(
                "{} durable events of {SMALL_BYTES} B, pipelined with a window of {WINDOW} unacknowledged (after {} warm-up)",
                thousands(self.w5b),
                thousands(self.w5b_warmup)
            ),
            Job::Consume => format!(
                "a backlog of {} × {SMALL_BYTES} B events published to an offline subscribed service, then consumed with acks (max_in_flight {MAX_IN_FLIGHT}), timed from subscribing until all are handled and the consumer drained",
                thousands(self.w6)
            ),
            Job::Restart => format!(
                "a backlog of {} × {} events for an offline subscribed service (pipelined, window {WINDOW}); VmRSS; kill -9; restart on the same log: spawn to ready line and to the first Client::connect (polled every {} ms); VmRSS",
                thousands(self.w7),
                bytes_text(LARGE_BYTES as u64),
                CONNECT_POLL.as_millis()
            ),
        }
    }
}

// ---------------------------------------------------------------------------
// Statistics and formatting (pure)

/// Nearest-rank percentile of sorted values: the smallest value with at
/// least `p` percent of the values at or below it.
fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

#[derive(Clone, Copy, Debug, PartialEq)]
struct Summary {
    median: f64,
    min: f64,
    max: f64,
}

/// Median (the mean of the middle two for an even count) and min–max.
fn summarize(values: &[f64]) -> Option<Summary> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    let median = if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    };
    Some(Summary {
        median,
        min: sorted[0],
        max: sorted[sorted.len() - 1],
    })
}

/// `1234567` → `1,234,567`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A figure with the precision it deserves: 41,235 · 412 · 41.2 · 4.12.
fn format_value(v: f64) -> String {
    if !v.is_finite() {
        return v.to_string();
    }
    let magnitude = v.abs();
    if magnitude >= 1000.0 {
        let sign = if v < 0.0 { "-" } else { "" };
        format!("{sign}{}", thousands(magnitude.round() as u64))
    } else if magnitude >= 100.0 {
        format!("{v:.0}")
    } else if magnitude >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn bytes_text(bytes: u64) -> String {
    const KIB: f64 = 1024.0;
    let b = bytes as f64;
    if b >= KIB * KIB * KIB {
        format!("{:.2} GiB", b / (KIB * KIB * KIB))
    } else if b >= KIB * KIB {
        format!("{:.1} MiB", b / (KIB * KIB))
    } else if bytes >= 1024 && bytes % 1024 == 0 {
        format!("{} KiB", bytes / 1024)
    } else {
        format!("{bytes} B")
    }
}

/// The runs of one table row, per system.
#[derive(Clone, Debug, PartialEq)]
struct Row {
    workload: Workload,
    metric: Metric,
    /// `runs[i]` is system `i`'s value per run, in run order.
    runs: Vec<Vec<f64>>,
}

/// Everything measured, per row and system.
#[derive(Clone, Debug)]
struct Results {
    systems: Vec<System>,
    rows: Vec<Row>,
}

impl Results {
    fn new(selected: &[Workload], systems: &[System]) -> Results {
        Results {
            systems: systems.to_vec(),
            rows: ROWS
                .iter()
                .filter(|(w, _)| selected.contains(w))
                .map(|&(workload, metric)| Row {
                    workload,
                    metric,
                    runs: vec![Vec::new(); systems.len()],
                })
                .collect(),
        }
    }

    /// Files one run's measurements; those of unselected rows are dropped.
    fn record(&mut self, system: System, measured: &[Measurement]) {
        let Some(s) = self.systems.iter().position(|x| *x == system) else {
            return;
        };
        for &(workload, metric, value) in measured {
            if let Some(row) = self
                .rows
                .iter_mut()
                .find(|r| r.workload == workload && r.metric == metric)
            {
                row.runs[s].push(value);
            }
        }
    }

    /// A Markdown table (aligned, so it reads in a terminal too).
    fn table(&self) -> String {
        let mut header = vec!["workload".to_string(), "metric".to_string()];
        let single = self.systems.len() == 1;
        for system in &self.systems {
            header.push(format!("{} (median)", system.title()));
            header.push(if single {
                "spread".to_string()
            } else {
                format!("{} spread", system.title())
            });
        }
        header.push("unit".to_string());
        let mut lines = vec![header];
        for row in &self.rows {
            let mut cells = vec![row.workload.id().to_string(), row.metric.name().to_string()];
            for runs in &row.runs {
                match summarize(runs) {
                    Some(s) if runs.len() > 1 => {
                        cells.push(format_value(s.median));
                        cells.push(format!("{}–{}", format_value(s.min), format_value(s.max)));
                    }
                    Some(s) => {
                        cells.push(format_value(s.median));
                        cells.push("— (1 run)".to_string());
                    }
                    None => {
                        cells.push("—".to_string());
                        cells.push("—".to_string());
                    }
                }
            }
            cells.push(row.metric.unit().to_string());
            lines.push(cells);
        }
        let columns = lines[0].len();
        let widths: Vec<usize> = (0..columns)
            .map(|c| {
                lines
                    .iter()
                    .map(|l| l[c].chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        // Text columns left, figures right.
        let right = |c: usize| c >= 2 && c < columns - 1;
        let mut out = String::new();
        for (i, cells) in lines.iter().enumerate() {
            out.push('|');
            for (c, cell) in cells.iter().enumerate() {
                let pad = widths[c] - cell.chars().count();
                if right(c) && i > 0 {
                    let _ = write!(out, " {}{cell} |", " ".repeat(pad));
                } else {
                    let _ = write!(out, " {cell}{} |", " ".repeat(pad));
                }
            }
            out.push('\n');
            if i == 0 {
                out.push('|');
                for (c, w) in widths.iter().enumerate() {
                    let dashes = "-".repeat(*w);
                    if right(c) {
                        let _ = write!(out, " {}: |", &dashes[1..]);
                    } else {
                        let _ = write!(out, " {dashes} |");
                    }
                }
                out.push('\n');
            }
        }
        out
    }

    /// One JSON object per row: `workload`, `metric`, `unit`,
    /// `higher_is_better`, the median per system under its key
    /// (`courier`), and `runs`: one object per run with each system's
    /// value (`[{"courier": …}, …]`).
    fn json_lines(&self) -> Vec<String> {
        self.rows
            .iter()
            .map(|row| {
                let mut o = Map::new();
                o.insert("workload".into(), json!(row.workload.id()));
                o.insert("metric".into(), json!(row.metric.name()));
                o.insert("unit".into(), json!(row.metric.unit()));
                o.insert(
                    "higher_is_better".into(),
                    json!(row.metric.higher_is_better()),
                );
                for (system, runs) in self.systems.iter().zip(&row.runs) {
                    let median = summarize(runs).map(|s| round3(s.median));
                    o.insert(system.key().into(), json!(median));
                }
                let count = row.runs.iter().map(Vec::len).max().unwrap_or(0);
                let runs: Vec<Value> = (0..count)
                    .map(|i| {
                        let mut run = Map::new();
                        for (system, values) in self.systems.iter().zip(&row.runs) {
                            run.insert(
                                system.key().into(),
                                json!(values.get(i).copied().map(round3)),
                            );
                        }
                        Value::Object(run)
                    })
                    .collect();
                o.insert("runs".into(), Value::Array(runs));
                Value::Object(o).to_string()
            })
            .collect()
    }
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// One line of a run's figures for the progress output.
fn summary_line(measured: &[Measurement]) -> String {
    measured
        .iter()
        .map(|(w, m, v)| format!("{} {} {} {}", w.id(), m.name(), format_value(*v), m.unit()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The command line as typed, quoted where a shell would need it.
fn command_line(args: impl IntoIterator<Item = String>) -> String {
    args.into_iter()
        .map(|a| {
            let plain = !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
            if plain {
                a
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

// ---------------------------------------------------------------------------
// The machine

struct Machine {
    nproc: usize,
    cpu: String,
}

impl Machine {
    fn detect() -> Machine {
        let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|info| cpu_model(&info))
            .unwrap_or_else(|| "unknown (no model name in /proc/cpuinfo)".to_string());
        Machine { nproc, cpu }
    }
}

/// The 1, 5 and 15 minute load averages, from /proc (Linux): other work on
/// the machine skews the figures, so they are printed with them.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .filter(|l| !l.is_empty())
        .unwrap_or_else(|| "unknown".to_string())
}

/// The first `model name` of /proc/cpuinfo.
fn cpu_model(cpuinfo: &str) -> Option<String> {
    cpuinfo.lines().find_map(|l| {
        let (key, value) = l.split_once(':')?;
        (key.trim() == "model name").then(|| value.trim().to_string())
    })
}

/// Resident memory of a process in MiB, from /proc (Linux).
fn rss_mib(pid: u32) -> anyhow::Result<f64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {path}; measuring RSS needs Linux's /proc"))?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no VmRSS line in {path}"))?;
    Ok(kib as f64 / 1024.0)
}

// ---------------------------------------------------------------------------
// Broker processes and their data

/// A fresh directory under the system's temp dir, removed on drop.
struct DataDir(PathBuf);

impl DataDir {
    fn create() -> anyhow::Result<DataDir> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "courier-bench-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        // Left by an earlier process that had our pid and was killed.
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir(&path).with_context(|| {
            format!(
                "cannot create the data directory {}; point TMPDIR at a writable directory",
                path.display()
            )
        })?;
        Ok(DataDir(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }

    /// Bytes of all files under it.
    fn size(&self) -> u64 {
        fn walk(dir: &Path) -> u64 {
            let Ok(entries) = std::fs::read_dir(dir) else {
                return 0;
            };
            entries
                .flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => walk(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        }
        walk(&self.0)
    }
}

impl Drop for DataDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `127.0.0.1:<port>` with a port free right now.
fn free_loopback_addr() -> anyhow::Result<String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .context("cannot bind a loopback port to find a free one")?;
    Ok(listener.local_addr()?.to_string())
}

/// A `courier serve` child process; killed (SIGKILL) and reaped on drop.
struct BrokerProcess {
    child: Child,
    addr: String,
    spawned_at: Instant,
    /// The first stdout line and when it was read; `None` at EOF.
    ready: Option<oneshot::Receiver<Option<(Instant, String)>>>,
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
    stderr_closed: Arc<AtomicBool>,
}

impl BrokerProcess {
    /// Spawns `exe serve` on `addr` with its log in `dir`; does not wait.
    fn spawn(exe: &Path, addr: &str, dir: &Path) -> anyhow::Result<BrokerProcess> {
        let spawned_at = Instant::now();
        let mut child = Command::new(exe)
            .args(["serve", "--listen", addr, "--fsync", FSYNC, "--data-dir"])
            .arg(dir)
            .env("COURIER_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start the broker {} serve", exe.display()))?;
        let (tx, rx) = oneshot::channel();
        if let Some(stdout) = child.stdout.take() {
            std::thread::spawn(move || {
                let mut lines = BufReader::new(stdout).lines();
                let first = lines.next().and_then(Result::ok);
                let _ = tx.send(first.map(|line| (Instant::now(), line)));
                // Keep draining, so a later line never meets a full pipe.
                lines.for_each(drop);
            });
        }
        let stderr_tail = Arc::new(Mutex::new(VecDeque::new()));
        let stderr_closed = Arc::new(AtomicBool::new(false));
        if let Some(stderr) = child.stderr.take() {
            let (tail, closed) = (stderr_tail.clone(), stderr_closed.clone());
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    let mut tail = tail.lock().unwrap_or_else(|p| p.into_inner());
                    if tail.len() == STDERR_TAIL_LINES {
                        tail.pop_front();
                    }
                    tail.push_back(line);
                }
                closed.store(true, Ordering::Release);
            });
        }
        Ok(BrokerProcess {
            child,
            addr: addr.to_string(),
            spawned_at,
            ready: Some(rx),
            stderr_tail,
            stderr_closed,
        })
    }

    /// Spawns a broker on a fresh port and waits until it is ready.
    async fn start(exe: &Path, dir: &Path) -> anyhow::Result<BrokerProcess> {
        let mut broker = BrokerProcess::spawn(exe, &free_loopback_addr()?, dir)?;
        broker.wait_ready().await?;
        Ok(broker)
    }

    /// Waits for the ready line; returns the time since spawning.
    async fn wait_ready(&mut self) -> anyhow::Result<Duration> {
        let Some(rx) = self.ready.take() else {
            return Err(anyhow!("internal: the ready line was already awaited"));
        };
        match tokio::time::timeout(READY_TIMEOUT, rx).await {
            Ok(Ok(Some((at, line)))) => {
                if !line.starts_with("courier listening on") {
                    bail!(
                        "the broker's first line was {line:?}, not `courier listening on …`; is {} the courier binary?",
                        std::env::current_exe().unwrap_or_default().display()
                    );
                }
                Ok(at.duration_since(self.spawned_at))
            }
            Ok(_) => {
                let why = self.exit_report().await;
                bail!("the broker exited before it was ready{why}")
            }
            Err(_) => bail!(
                "the broker printed no ready line within {} s{}",
                READY_TIMEOUT.as_secs(),
                self.stderr_note()
            ),
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn rss_mib(&self) -> anyhow::Result<f64> {
        rss_mib(self.pid())
    }

    /// `kill -9` and reap.
    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn stderr_lines(&self) -> Vec<String> {
        self.stderr_tail
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    fn stderr_note(&self) -> String {
        let lines = self.stderr_lines();
        if lines.is_empty() {
            String::new()
        } else {
            format!("; its stderr ends: {}", lines.join(" | "))
        }
    }

    /// Once the process is gone: its exit status and the end of its stderr.
    async fn exit_report(&mut self) -> String {
        let mut status: Option<ExitStatus> = None;
        for _ in 0..200 {
            if let Ok(Some(s)) = self.child.try_wait() {
                status = Some(s);
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for _ in 0..100 {
            if self.stderr_closed.load(Ordering::Acquire) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let status = status.map_or_else(|| "still running".to_string(), |s| s.to_string());
        format!(" ({status}){}", self.stderr_note())
    }

    /// Runs `work`, but stops it as soon as the broker process exits:
    /// a dead broker fails the run at once, not at a client timeout.
    async fn watch<T>(
        &mut self,
        work: impl std::future::Future<Output = anyhow::Result<T>>,
    ) -> anyhow::Result<T> {
        tokio::pin!(work);
        let result = loop {
            tokio::select! {
                result = &mut work => break result,
                _ = tokio::time::sleep(Duration::from_millis(100)) => {
                    if let Ok(Some(_)) = self.child.try_wait() {
                        let why = self.exit_report().await;
                        bail!("the broker exited in the middle of the run{why}");
                    }
                }
            }
        };
        self.explain(result).await
    }

    /// Adds the broker's fate to an error if it died meanwhile.
    async fn explain<T>(&mut self, result: anyhow::Result<T>) -> anyhow::Result<T> {
        match result {
            Ok(v) => Ok(v),
            Err(e) => {
                if let Ok(Some(_)) = self.child.try_wait() {
                    let why = self.exit_report().await;
                    Err(e.context(format!("the broker died{why}")))
                } else {
                    Err(e)
                }
            }
        }
    }

    /// The broker's own `recovered …` log line, if it printed one.
    fn recovery_line(&self) -> Option<String> {
        self.stderr_lines()
            .into_iter()
            .find(|l| l.contains("recovered"))
            .map(|l| match l.find("recovered") {
                Some(i) => l[i..].to_string(),
                None => l,
            })
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

// ---------------------------------------------------------------------------
// The workloads, Courier side

const W5_NAME: &str = "bench.w5.published";
const W6_NAME: &str = "bench.w6.published";
const W7_NAME: &str = "bench.w7.published";
const W6_SERVICE: &str = "bench-consumer";
const W7_SERVICE: &str = "bench-offline";

async fn connect(addr: &str, service: &str, max_in_flight: Option<u32>) -> anyhow::Result<Client> {
    let mut opts = ClientOptions::new(addr, service);
    if let Some(m) = max_in_flight {
        opts.max_in_flight = m;
    }
    Client::connect(opts)
        .await
        .with_context(|| format!("cannot connect to the broker at {addr} as {service}"))
}

/// Subscribes `service` to `name` and leaves: messages then wait for it.
async fn subscribe_offline(addr: &str, service: &str, name: &str) -> anyhow::Result<()> {
    let client = connect(addr, service, None).await?;
    client
        .on(name, |_msg| async { Ok::<(), courier_client::Error>(()) })
        .await
        .with_context(|| format!("cannot subscribe {service} to {name}"))?;
    client.shutdown().await;
    Ok(())
}

/// Publishes `count` events, keeping at most `window` unacknowledged.
async fn publish_pipelined(
    client: &Client,
    name: &str,
    payload: &Bytes,
    count: u64,
    window: usize,
) -> anyhow::Result<()> {
    let mut pending: VecDeque<(u64, PendingAck)> = VecDeque::with_capacity(window);
    for i in 0..count {
        if pending.len() >= window {
            if let Some((j, ack)) = pending.pop_front() {
                ack.wait()
                    .await
                    .with_context(|| format!("publish {} of {count} failed", j + 1))?;
            }
        }
        let ack = client
            .event(name)
            .payload(payload.clone())
            .enqueue()
            .with_context(|| format!("publish {} of {count} could not be queued", i + 1))?;
        pending.push_back((i, ack));
    }
    for (j, ack) in pending {
        ack.wait()
            .await
            .with_context(|| format!("publish {} of {count} failed", j + 1))?;
    }
    Ok(())
}

/// Subscribes `service` to `name` and leaves it offline, then publishes
/// `count` events of `payload_bytes` to it, pipelined; returns how long the
/// publishing took. W6 and W7 both start from such a backlog.
async fn build_backlog(
    addr: &str,
    service: &str,
    name: &str,
    payload_bytes: usize,
    count: u64,
) -> anyhow::Result<Duration> {
    subscribe_offline(addr, service, name).await?;
    let producer = connect(addr, "bench-publisher", None).await?;
    let payload = Bytes::from(vec![b'x'; payload_bytes]);
    let started = Instant::now();
    publish_pipelined(&producer, name, &payload, count, WINDOW)
        .await
        .context("publishing the backlog")?;
    let elapsed = started.elapsed();
    producer.shutdown().await;
    Ok(elapsed)
}

fn per_second(count: u64, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64().max(1e-9)
}

fn progress(text: &str) {
    eprintln!("courier bench: {text}");
}

async fn run_job(
    system: System,
    job: Job,
    exe: &Path,
    plan: &Plan,
) -> anyhow::Result<Vec<Measurement>> {
    match system {
        System::Courier => match job {
            Job::PublishOneByOne => courier_w5a(exe, plan).await,
            Job::PublishPipelined => courier_w5b(exe, plan).await,
            Job::Consume => courier_w6(exe, plan).await,
            Job::Restart => courier_w7(exe, plan).await,
        },
    }
}

async fn courier_w5a(exe: &Path, plan: &Plan) -> anyhow::Result<Vec<Measurement>> {
    let dir = DataDir::create()?;
    let mut broker = BrokerProcess::start(exe, dir.path()).await?;
    let addr = broker.addr.clone();
    let result = async {
        let client = connect(&addr, "bench-publisher", None).await?;
        let payload = Bytes::from(vec![b'x'; SMALL_BYTES]);
        let send = |i: u64, of: u64| {
            let builder = client.event(W5_NAME).payload(payload.clone());
            async move {
                builder
                    .send()
                    .await
                    .with_context(|| format!("publish {} of {of} failed", i + 1))
            }
        };
        for i in 0..plan.w5a_warmup {
            send(i, plan.w5a_warmup).await?;
        }
        let mut latencies = Vec::with_capacity(plan.w5a as usize);
        let started = Instant::now();
        for i in 0..plan.w5a {
            let t = Instant::now();
            send(i, plan.w5a).await?;
            latencies.push(t.elapsed().as_nanos() as u64);
        }
        let elapsed = started.elapsed();
        client.shutdown().await;
        latencies.sort_unstable();
        let micros = |p| percentile(&latencies, p).unwrap_or(0) as f64 / 1000.0;
        Ok(vec![
            (
                Workload::W5a,
                Metric::Throughput,
                per_second(plan.w5a, elapsed),
            ),
            (Workload::W5a, Metric::LatencyP50, micros(50.0)),
            (Workload::W5a, Metric::LatencyP99, micros(99.0)),
        ])
    };
    broker.watch(result).await
}

async fn courier_w5b(exe: &Path, plan: &Plan) -> anyhow::Result<Vec<Measurement>> {
    let dir = DataDir::create()?;
    let mut broker = BrokerProcess::start(exe, dir.path()).await?;
    let addr = broker.addr.clone();
    let result = async {
        let client = connect(&addr, "bench-publisher", None).await?;
        let payload = Bytes::from(vec![b'x'; SMALL_BYTES]);
        publish_pipelined(&client, W5_NAME, &payload, plan.w5b_warmup, WINDOW)
            .await
            .context("warm-up")?;
        let started = Instant::now();
        publish_pipelined(&client, W5_NAME, &payload, plan.w5b, WINDOW).await?;
        let elapsed = started.elapsed();
        client.shutdown().await;
        Ok(vec![(
            Workload::W5b,
            Metric::Throughput,
            per_second(plan.w5b, elapsed),
        )])
    };
    broker.watch(result).await
}

async fn courier_w6(exe: &Path, plan: &Plan) -> anyhow::Result<Vec<Measurement>> {
    let dir = DataDir::create()?;
    let mut broker = BrokerProcess::start(exe, dir.path()).await?;
    let addr = broker.addr.clone();
    let count = plan.w6;
    let result = async {
        let setup = build_backlog(&addr, W6_SERVICE, W6_NAME, SMALL_BYTES, count).await?;
        progress(&format!(
            "  backlog of {} published in {:.1} s ({} msg/s, one subscribed offline service)",
            thousands(count),
            setup.as_secs_f64(),
            format_value(per_second(count, setup))
        ));

        let handled = Arc::new(AtomicU64::new(0));
        let redelivered = Arc::new(AtomicU64::new(0));
        let all_handled = Arc::new(Notify::new());
        let consumer = connect(&addr, W6_SERVICE, Some(MAX_IN_FLIGHT)).await?;
        let started = Instant::now();
        let (h, r, done) = (handled.clone(), redelivered.clone(), all_handled.clone());
        consumer
            .on(W6_NAME, move |msg| {
                let (h, r, done) = (h.clone(), r.clone(), done.clone());
                async move {
                    if msg.attempt() > 1 {
                        r.fetch_add(1, Ordering::Relaxed);
                    } else if h.fetch_add(1, Ordering::Relaxed) + 1 == count {
                        done.notify_one();
                    }
                    Ok::<(), courier_client::Error>(())
                }
            })
            .await
            .context("cannot subscribe the consumer")?;
        let mut last = 0;
        let mut last_change = Instant::now();
        loop {
            let now = handled.load(Ordering::Relaxed);
            if now >= count {
                break;
            }
            if now != last {
                (last, last_change) = (now, Instant::now());
            } else if last_change.elapsed() > STALL_TIMEOUT {
                bail!(
                    "deliveries stopped at {} of {} for {} s",
                    thousands(now),
                    thousands(count),
                    STALL_TIMEOUT.as_secs()
                );
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), all_handled.notified()).await;
        }
        // The acks are applied (and journaled) before the broker answers
        // the drain, so this includes them.
        consumer.shutdown().await;
        let elapsed = started.elapsed();
        let again = redelivered.load(Ordering::Relaxed);
        if again > 0 {
            progress(&format!("  note: {again} deliveries were redeliveries"));
        }
        Ok(vec![(
            Workload::W6,
            Metric::Throughput,
            per_second(count, elapsed),
        )])
    };
    broker.watch(result).await
}

/// Connects as soon as the broker lets us; the time since `since`.
async fn first_connect(addr: &str, since: Instant) -> anyhow::Result<(Duration, Client)> {
    loop {
        match Client::connect(ClientOptions::new(addr, "bench-probe")).await {
            Ok(client) => return Ok((since.elapsed(), client)),
            Err(e) if since.elapsed() > READY_TIMEOUT => {
                bail!(
                    "no connection to the restarted broker at {addr} within {} s: {e}",
                    READY_TIMEOUT.as_secs()
                )
            }
            Err(_) => tokio::time::sleep(CONNECT_POLL).await,
        }
    }
}

async fn courier_w7(exe: &Path, plan: &Plan) -> anyhow::Result<Vec<Measurement>> {
    let dir = DataDir::create()?;
    let mut broker = BrokerProcess::start(exe, dir.path()).await?;
    let addr = broker.addr.clone();
    let count = plan.w7;
    let rss_before = broker.rss_mib()?;
    let built = build_backlog(&addr, W7_SERVICE, W7_NAME, LARGE_BYTES, count);
    let build_time = broker.watch(built).await?;
    let rss_with_backlog = broker.rss_mib()?;
    let log_bytes = dir.size();
    progress(&format!(
        "  backlog of {} × {} published in {:.1} s ({} msg/s); data dir {}; broker VmRSS {:.1} MiB before, {:.1} MiB with it ({:.0} B per waiting message)",
        thousands(count),
        bytes_text(LARGE_BYTES as u64),
        build_time.as_secs_f64(),
        format_value(per_second(count, build_time)),
        bytes_text(log_bytes),
        rss_before,
        rss_with_backlog,
        (rss_with_backlog - rss_before) * 1024.0 * 1024.0 / count as f64
    ));

    broker.kill9();
    drop(broker);
    let mut broker = BrokerProcess::spawn(exe, &addr, dir.path())?;
    let spawned_at = broker.spawned_at;
    let restarted = async {
        let (ready, (connected, client)) =
            tokio::try_join!(broker.wait_ready(), first_connect(&addr, spawned_at))?;
        Ok((ready, connected, client))
    }
    .await;
    let (ready, connected, client) = broker.explain(restarted).await?;
    let rss_after_restart = broker.rss_mib()?;
    // The restarted broker must still hold the whole backlog.
    let checked = async {
        let reply = client
            .command("courier.services.list")
            .json(&json!({}))?
            .request()
            .await
            .context("courier.services.list after the restart")?;
        let services: Value = reply.json()?;
        let backlog = services
            .as_array()
            .into_iter()
            .flatten()
            .find(|s| s["name"] == W7_SERVICE)
            .and_then(|s| s["backlog"].as_u64());
        client.shutdown().await;
        match backlog {
            Some(b) if b == count => Ok(()),
            other => Err(anyhow!(
                "after the restart the backlog of {W7_SERVICE} is {other:?}, not {count}: the broker lost messages"
            )),
        }
    };
    broker.watch(checked).await?;
    if let Some(line) = broker.recovery_line() {
        progress(&format!("  restarted broker: {line}"));
    }
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    Ok(vec![
        (Workload::W7a, Metric::ReadyLine, ms(ready)),
        (Workload::W7a, Metric::FirstConnect, ms(connected)),
        (Workload::W7b, Metric::RssWithBacklog, rss_with_backlog),
        (Workload::W7b, Metric::RssAfterRestart, rss_after_restart),
    ])
}

// ---------------------------------------------------------------------------
// The command

/// Runs the selected workloads and prints the table (or JSON lines).
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let plan = Plan::new(args.quick, args.scale).map_err(anyhow::Error::msg)?;
    let selected = args
        .only
        .clone()
        .map_or_else(|| Workload::ALL.to_vec(), |o| o.0);
    let exe = std::env::current_exe()
        .context("cannot find this program's own path, which the bench starts as the broker")?;
    let command = command_line(std::env::args());
    let date = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    let machine = Machine::detect();
    let load_at_start = load_average();
    let systems = [System::Courier];
    let jobs = Job::for_selection(&selected);
    if cfg!(debug_assertions) {
        progress(
            "this is a debug build; for figures build with `cargo build --release -p courier-cli`",
        );
    }

    let mut results = Results::new(&selected, &systems);
    let work = async {
        for &job in &jobs {
            progress(&format!("{}: {}", job.label(), plan.describe(job)));
            for run in 1..=args.runs {
                for &system in &systems {
                    let which = format!(
                        "{} run {run}/{} ({})",
                        job.label(),
                        args.runs,
                        system.title()
                    );
                    progress(&format!("{which} …"));
                    let started = Instant::now();
                    let measured = tokio::time::timeout(args.timeout, run_job(system, job, &exe, &plan))
                        .await
                        .map_err(|_| {
                            anyhow!(
                                "{which} did not finish within {} (--timeout) and was stopped; a stuck broker or a slow disk? Try --quick, or raise --timeout",
                                humantime::format_duration(args.timeout)
                            )
                        })?
                        .with_context(|| which.clone())?;
                    progress(&format!(
                        "{which}: {} ({:.1} s)",
                        summary_line(&measured),
                        started.elapsed().as_secs_f64()
                    ));
                    results.record(system, &measured);
                }
            }
        }
        Ok::<(), anyhow::Error>(())
    };
    // Flattened into one message: main would otherwise print only an SDK
    // error found inside it (e.g. "no reply within 30s"), without context.
    let flatten = |e: anyhow::Error| anyhow!("{e:#}");
    tokio::select! {
        done = work => done.map_err(flatten)?,
        _ = tokio::signal::ctrl_c() => bail!("interrupted; the brokers were stopped and their data directories removed"),
    }

    let load = format!(
        "{load_at_start} at the start, {} at the end",
        load_average()
    );
    let settings = settings_lines(&args, &plan, &selected, &machine, &load, &date, &command);
    if args.json {
        let mut out = std::io::stdout().lock();
        for line in results.json_lines() {
            use std::io::Write as _;
            writeln!(out, "{line}").context("cannot write to stdout")?;
        }
        for line in settings {
            eprintln!("{line}");
        }
    } else {
        print!("{}", results.table());
        println!();
        for line in settings {
            println!("{line}");
        }
    }
    Ok(())
}

/// What was run, how, where and when — printed after the table.
fn settings_lines(
    args: &BenchArgs,
    plan: &Plan,
    selected: &[Workload],
    machine: &Machine,
    load: &str,
    date: &str,
    command: &str,
) -> Vec<String> {
    let mut lines = vec!["Workloads:".to_string()];
    for job in Job::for_selection(selected) {
        lines.push(format!("  {:<4} {}", job.label(), plan.describe(job)));
    }
    lines.push("Courier server:".to_string());
    lines.push(format!(
        "  courier serve --listen 127.0.0.1:<free port> --data-dir <fresh dir in {}> --fsync {FSYNC} (other flags at their defaults); a fresh broker and data dir per run; build: {}",
        std::env::temp_dir().display(),
        if cfg!(debug_assertions) { "debug (not for figures)" } else { "release" }
    ));
    lines.push("Courier client:".to_string());
    lines.push(format!(
        "  courier-client SDK in the bench process, tokio multi-thread runtime ({} workers); W5 publishes events no service subscribes to (kept in the log for --from replays, like a stream without consumers), W6 and W7 events for one subscribed service that is offline while they arrive; window {WINDOW}, consumer max_in_flight {MAX_IN_FLIGHT}, payloads {SMALL_BYTES} B (W5, W6) and {} (W7)",
        machine.nproc,
        bytes_text(LARGE_BYTES as u64)
    ));
    lines.push(format!(
        "Runs: {} per workload (median shown; spread = min–max); at most {} per run{}",
        args.runs,
        humantime::format_duration(args.timeout),
        if args.quick {
            "; --quick: message counts ÷ 20"
        } else {
            ""
        }
    ));
    lines.push(format!(
        "Machine: nproc {}, CPU {}; load average (1, 5, 15 min) {load}",
        machine.nproc, machine.cpu
    ));
    lines.push(format!("Date: {date}"));
    lines.push(format!("Command: {command}"));
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    fn args(list: &[&str]) -> Result<BenchArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("bench").chain(list.iter().copied())).map(|c| c.bench)
    }

    #[test]
    fn only_parses_ids_groups_and_case_and_keeps_canonical_order() {
        use Workload::*;
        assert_eq!(parse_only("W6,W5a"), Ok(Only(vec![W5a, W6])));
        assert_eq!(parse_only("w7, W5"), Ok(Only(vec![W5a, W5b, W7a, W7b])));
        assert_eq!(parse_only("W5a,W5a,w5a"), Ok(Only(vec![W5a])));
        assert_eq!(parse_only("W7b,"), Ok(Only(vec![W7b])));
        let unknown = parse_only("W5a,W9").expect_err("W9 is unknown");
        assert!(unknown.contains("\"W9\"") && unknown.contains("W5a, W5b, W6, W7a, W7b"));
        assert!(parse_only(" , ").is_err());
    }

    #[test]
    fn flags_and_defaults() {
        let a = args(&[]).expect("defaults parse");
        assert_eq!(a.runs, 3);
        assert_eq!(a.timeout, Duration::from_secs(600));
        assert!(!a.quick && !a.json && a.only.is_none());
        let a = args(&[
            "--quick",
            "--runs",
            "1",
            "--json",
            "--only",
            "W5a,W6",
            "--timeout",
            "90s",
        ])
        .expect("parse");
        assert!(a.quick && a.json);
        assert_eq!(a.runs, 1);
        assert_eq!(a.only, Some(Only(vec![Workload::W5a, Workload::W6])));
        assert_eq!(a.timeout, Duration::from_secs(90));
        assert!(args(&["--runs", "0"]).is_err());
        assert!(args(&["--only", "W4"]).is_err());
    }

    #[test]
    fn plan_counts_follow_the_issue_and_shrink_with_quick_and_scale() {
        let full = Plan::new(false, 1.0).expect("plan");
        assert_eq!(
            (full.w5a, full.w5b, full.w6, full.w7),
            (20_000, 200_000, 200_000, 1_000_000)
        );
        let quick = Plan::new(true, 1.0).expect("plan");
        assert_eq!(
            (quick.w5a, quick.w5b, quick.w6, quick.w7),
            (1_000, 10_000, 10_000, 50_000)
        );
        let tiny = Plan::new(true, 0.001).expect("plan");
        assert_eq!(tiny.w5a, MIN_MESSAGES);
        assert!(Plan::new(false, 0.0).is_err());
        assert!(Plan::new(false, f64::NAN).is_err());
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let values: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&values, 50.0), Some(50));
        assert_eq!(percentile(&values, 99.0), Some(99));
        assert_eq!(percentile(&values, 100.0), Some(100));
        assert_eq!(percentile(&values, 0.0), Some(1));
        assert_eq!(percentile(&[7], 99.0), Some(7));
        assert_eq!(percentile(&[1, 2, 3], 50.0), Some(2));
        assert_eq!(percentile(&[1, 2, 3, 4], 50.0), Some(2));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn median_and_spread() {
        let s = summarize(&[3.0, 1.0, 2.0]).expect("summary");
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        let s = summarize(&[4.0, 1.0, 2.0, 10.0]).expect("summary");
        assert_eq!((s.median, s.min, s.max), (3.0, 1.0, 10.0));
        assert_eq!(summarize(&[5.0]).map(|s| s.median), Some(5.0));
        assert_eq!(summarize(&[]), None);
    }

    #[test]
    fn figures_are_formatted_by_magnitude() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_000), "1,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(format_value(41_234.6), "41,235");
        assert_eq!(format_value(412.4), "412");
        assert_eq!(format_value(41.24), "41.2");
        assert_eq!(format_value(4.124), "4.12");
        assert_eq!(bytes_text(1024), "1 KiB");
        assert_eq!(bytes_text(128), "128 B");
        assert_eq!(bytes_text(3 << 29), "1.50 GiB");
    }

    fn sample() -> Results {
        let mut r = Results::new(&[Workload::W5a, Workload::W7b], &[System::Courier]);
        for (tput, p50) in [(1000.0, 400.0), (3000.0, 600.0), (2000.0, 500.0)] {
            r.record(
                System::Courier,
                &[
                    (Workload::W5a, Metric::Throughput, tput),
                    (Workload::W5a, Metric::LatencyP50, p50),
                    (Workload::W5a, Metric::LatencyP99, 900.0),
                    // Not selected: dropped.
                    (Workload::W7a, Metric::ReadyLine, 12.0),
                    (Workload::W7b, Metric::RssWithBacklog, 80.5),
                    (Workload::W7b, Metric::RssAfterRestart, 60.25),
                ],
            );
        }
        r
    }

    #[test]
    fn the_table_has_a_row_per_selected_metric_with_median_and_spread() {
        let table = sample().table();
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 2 + 5, "{table}");
        assert!(lines[0].starts_with("| workload | metric"), "{table}");
        assert!(lines[0].contains("Courier (median)") && lines[0].contains("spread"));
        assert!(
            lines[1].contains("---:"),
            "figures are right-aligned: {table}"
        );
        let width = lines[0].chars().count();
        assert!(lines.iter().all(|l| l.chars().count() == width), "{table}");
        let tput = lines[2];
        assert!(tput.contains("W5a") && tput.contains("throughput"));
        assert!(tput.contains("2,000") && tput.contains("1,000–3,000") && tput.contains("msg/s"));
        assert!(
            lines[3].contains("500") && lines[3].contains("400–600") && lines[3].contains("µs")
        );
        assert!(!table.contains("W7a"));
        assert!(lines[5].contains("W7b") && lines[5].contains("80.5") && lines[5].contains("MiB"));
    }

    #[test]
    fn one_run_shows_no_spread() {
        let mut r = Results::new(&[Workload::W6], &[System::Courier]);
        r.record(
            System::Courier,
            &[(Workload::W6, Metric::Throughput, 12_345.0)],
        );
        let table = r.table();
        assert!(
            table.contains("12,345") && table.contains("— (1 run)"),
            "{table}"
        );
    }

    #[test]
    fn json_lines_carry_the_fields_of_issue_4() {
        let lines = sample().json_lines();
        assert_eq!(lines.len(), 5);
        let first: Value = serde_json::from_str(&lines[0]).expect("JSON");
        assert_eq!(first["workload"], "W5a");
        assert_eq!(first["metric"], "throughput");
        assert_eq!(first["unit"], "msg/s");
        assert_eq!(first["higher_is_better"], true);
        assert_eq!(first["courier"], 2000.0);
        assert_eq!(
            first["runs"],
            json!([{"courier": 1000.0}, {"courier": 3000.0}, {"courier": 2000.0}])
        );
        let p50: Value = serde_json::from_str(&lines[1]).expect("JSON");
        assert_eq!(p50["higher_is_better"], false);
        assert_eq!(p50["unit"], "µs");
        for line in &lines {
            let v: Value = serde_json::from_str(line).expect("JSON");
            assert!(v["courier"].as_f64().is_some_and(|x| x > 0.0), "{line}");
        }
    }

    #[test]
    fn every_metric_is_in_the_row_list_and_jobs_cover_the_selection() {
        for w in Workload::ALL {
            assert!(ROWS.iter().any(|(rw, _)| *rw == w), "{w:?} has no row");
        }
        assert_eq!(
            Job::for_selection(&[Workload::W7a, Workload::W7b]),
            vec![Job::Restart]
        );
        assert_eq!(
            Job::for_selection(&Workload::ALL),
            vec![
                Job::PublishOneByOne,
                Job::PublishPipelined,
                Job::Consume,
                Job::Restart
            ]
        );
    }

    #[test]
    fn command_lines_are_quoted_for_a_shell() {
        let line =
            command_line(["courier", "bench", "--only", "W5a,W6", "a b", "it's"].map(String::from));
        assert_eq!(line, r"courier bench --only W5a,W6 'a b' 'it'\''s'");
    }

    #[tokio::test]
    async fn a_broker_that_exits_before_its_ready_line_is_reported_with_its_stderr() {
        let dir = DataDir::create().expect("data dir");
        let path = dir.path().to_path_buf();
        // `sh serve --listen …` fails at once: there is no script `serve`.
        let err = BrokerProcess::start(Path::new("/bin/sh"), dir.path())
            .await
            .err()
            .expect("not a broker");
        let msg = format!("{err:#}");
        assert!(
            msg.starts_with("the broker exited before it was ready (exit status: "),
            "{msg}"
        );
        assert!(
            msg.contains("its stderr ends: ") && msg.contains("serve"),
            "{msg}"
        );
        assert!(!msg.contains('\n'), "one line: {msg}");
        drop(dir);
        assert!(!path.exists(), "the data dir is removed on drop");
    }

    #[test]
    fn cpu_model_comes_from_the_first_model_name() {
        let info = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\nprocessor\t: 1\nmodel name\t: AMD EPYC 7B13\n";
        assert_eq!(cpu_model(info).as_deref(), Some("AMD EPYC 7B13"));
        assert_eq!(cpu_model("flags: x"), None);
    }
}
