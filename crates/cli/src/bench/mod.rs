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

mod courier;
mod process;

use courier::*;
use process::*;

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
