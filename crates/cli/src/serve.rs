//! `courier serve`: the broker, from the command line's flags.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use courier_server::{Server, ServerConfig};
use courier_store::{FsyncPolicy, LogConfig};

use crate::args::parse_duration;
use crate::serve_limits;

#[derive(Args)]
pub(crate) struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7700")]
    pub(crate) listen: SocketAddr,
    /// Where messages and delivery state live: `embedded` (this machine's
    /// log in --data-dir) or a NATS JetStream cluster,
    /// `nats://h1:4222,h2:4222,h3:4222` (`tls://…` for TLS): then this is
    /// one stateless node of any number serving the same clients, and
    /// everything acknowledged lives in the cluster with three replicas
    /// (docs/SCALE-OUT.md).
    #[arg(long, value_name = "URLS", default_value = "embedded", conflicts_with_all = ["in_memory", "fsync"])]
    pub(crate) backend: String,
    #[command(flatten)]
    pub(crate) cluster: crate::serve_cluster::ClusterArgs,
    /// Where the broker keeps its log, snapshot and state.
    #[arg(long, default_value = "./courier-data")]
    pub(crate) data_dir: PathBuf,
    /// When a send is acknowledged: `always` (after fsync; nothing
    /// acknowledged is lost), `interval:MS` (fsync at most every MS ms; a
    /// machine crash loses up to MS ms of acknowledged sends), `never` (the
    /// OS decides; a machine crash can lose anything not yet written back).
    #[arg(long, default_value = "always", value_parser = parse_fsync)]
    pub(crate) fsync: FsyncPolicy,
    /// Keep events in the log at least this long for `--from` replays.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    pub(crate) retention: Duration,
    /// Retention for events named by a pattern: PATTERN=AGE or
    /// PATTERN=AGE,SIZE (e.g. 'metrics.>=1h,64MiB'); repeatable; the first
    /// matching rule wins, others get --retention.
    #[arg(long = "retain", value_parser = parse_retention_rule)]
    pub(crate) retain: Vec<courier_server::RetentionRule>,
    /// Give up retained history when the log grows past this size (e.g. 10GiB).
    #[arg(long, value_parser = parse_size)]
    pub(crate) retention_bytes: Option<u64>,
    /// Keep everything in memory: nothing survives a restart.
    #[arg(long)]
    pub(crate) in_memory: bool,
    /// Messages a service may send per second, all its instances together,
    /// in bursts of up to one second's worth; more are refused with
    /// `rate_limited` (retry later). 0: no limit.
    #[arg(long, default_value_t = courier_server::BrokerConfig::default().send_rate_per_service)]
    pub(crate) send_rate: u32,
    /// The application's manifest: who may connect, send and receive what
    /// (reloaded on SIGHUP and when the file changes).
    #[arg(long)]
    pub(crate) manifest: Option<PathBuf>,
    /// Accept unauthenticated connections on a non-loopback address.
    #[arg(long)]
    pub(crate) insecure: bool,
    /// Serve TLS with this certificate chain (PEM, leaf first).
    #[arg(long, requires = "tls_key")]
    pub(crate) tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, requires = "tls_cert")]
    pub(crate) tls_key: Option<PathBuf>,
    /// Verify client certificates against this CA (PEM); a verified
    /// certificate authenticates as the service whose `certificates` list
    /// its subject. Optional per client: token-only clients still connect.
    #[arg(long, requires = "tls_cert")]
    pub(crate) tls_client_ca: Option<PathBuf>,
    /// The HTTP port: /healthz, /readyz and /metrics (Prometheus). `off`
    /// serves none. Guarded by the manifest's [admin] tokens; without a
    /// manifest, loopback clients only.
    #[arg(long, default_value = "127.0.0.1:7780", value_parser = parse_http_addr)]
    pub(crate) http: HttpAddr,
    /// DNS for the service registry on this address, UDP and TCP (e.g.
    /// 127.0.0.1:8600): `NAME.service.courier` answers A and SRV with the
    /// service's healthy instances. Off unless given; a non-loopback
    /// address needs --insecure (DNS has no authentication).
    #[arg(long, value_name = "ADDR")]
    pub(crate) dns: Option<std::net::SocketAddr>,
    /// Distinct message names the metrics label by name; traffic of names
    /// past it is counted under name="_other".
    #[arg(long, default_value_t = courier_server::BrokerConfig::default().metrics_names_max)]
    pub(crate) metrics_names_max: usize,
    /// Activity traces (`courier trace`, /v1/activities): `on` or `off`.
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    pub(crate) trace: String,
    /// How long an activity's trace is kept after its first message.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub(crate) trace_retention: Duration,
    /// The most the traces hold in memory, and about the most they take
    /// on disk (in DATA_DIR/trace); the oldest activities go first.
    #[arg(long, default_value = "64MiB", value_parser = parse_size)]
    pub(crate) trace_bytes_max: u64,
    /// Accepted messages a second traced whole; above it, activities are
    /// sampled by a hash of their id (each kept one whole; the skipped
    /// ones counted in /metrics). 0: trace everything.
    #[arg(long, default_value_t = 2_000)]
    pub(crate) trace_rate: u32,
    /// Keep payloads in traces (at most 16 KiB of each).
    #[arg(long)]
    pub(crate) trace_payloads: bool,
    /// The key each service's webhook secret derives from (made on first
    /// start). Default: webhook.key in --data-dir; with --in-memory, a key
    /// for this process only.
    #[arg(long, value_name = "FILE")]
    pub(crate) webhook_key: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) limits: serve_limits::ServeLimits,
}

/// `--http ADDR` or `--http off`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct HttpAddr(Option<std::net::SocketAddr>);

impl HttpAddr {
    pub(crate) fn addr(&self) -> Option<std::net::SocketAddr> {
        self.0
    }
}

pub(crate) fn parse_http_addr(text: &str) -> Result<HttpAddr, String> {
    if text.eq_ignore_ascii_case("off") {
        return Ok(HttpAddr(None));
    }
    text.parse()
        .map(|a| HttpAddr(Some(a)))
        .map_err(|e| format!("{text:?} is not HOST:PORT or off ({e})"))
}

/// `512`, `64KiB`, `10MB`, `2GiB` …
pub(crate) fn parse_size(text: &str) -> Result<u64, String> {
    let size: bytesize::ByteSize = text.trim().parse().map_err(|e| {
        format!("{text:?} is not a size ({e}); write e.g. 64MiB, 10GB or a number of bytes")
    })?;
    // bytesize saturates what does not fit; a size that large is a typo.
    match size.as_u64() {
        u64::MAX => Err(format!("{text:?} is too large")),
        bytes => Ok(bytes),
    }
}

/// `PATTERN=AGE` or `PATTERN=AGE,SIZE`.
pub(crate) fn parse_retention_rule(text: &str) -> Result<courier_server::RetentionRule, String> {
    let (pattern, limits) = text.rsplit_once('=').ok_or_else(|| {
        format!("{text:?} is not PATTERN=AGE or PATTERN=AGE,SIZE (e.g. 'metrics.>=1h,64MiB')")
    })?;
    courier_client::proto::validate_pattern(pattern).map_err(|e| format!("{pattern:?}: {e}"))?;
    let (age, size) = match limits.split_once(',') {
        Some((age, size)) => (age, Some(size)),
        None => (limits, None),
    };
    Ok(courier_server::RetentionRule {
        pattern: pattern.to_string(),
        max_age_ms: parse_duration(age)?.as_millis().min(u128::from(u64::MAX)) as u64,
        max_bytes: size.map(parse_size).transpose()?.unwrap_or(0),
    })
}

pub(crate) fn parse_fsync(text: &str) -> Result<FsyncPolicy, String> {
    match text {
        "always" => Ok(FsyncPolicy::Always),
        "never" => Ok(FsyncPolicy::Never),
        other => match other.strip_prefix("interval:").map(str::parse::<u64>) {
            Some(Ok(ms)) if ms > 0 => Ok(FsyncPolicy::Interval(Duration::from_millis(ms))),
            _ => Err(format!(
                "{other:?} is not always, never or interval:MS (e.g. interval:100)"
            )),
        },
    }
}

pub(crate) async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("COURIER_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let started = std::time::Instant::now();
    let mut cluster = None;
    // A node on a cluster backend keeps nothing on its own disk.
    let local_files = args.backend == "embedded" && !args.in_memory;
    let (store, description): (Box<dyn courier_store::MessageStore>, String) = if args.backend
        != "embedded"
    {
        let node = crate::serve_cluster::join(&args).await?;
        let description = format!(
            "NATS JetStream cluster {} as node {}",
            args.backend,
            node.node.node.as_str()
        );
        cluster = Some(node.node);
        (node.store, description)
    } else if args.in_memory {
        (
            Box::new(courier_store::MemoryStore::new()),
            "memory (nothing survives a restart)".to_string(),
        )
    } else {
        let dir = args.data_dir.join("log");
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create the data directory {} — check its permissions or pick another with --data-dir", dir.display()))?;
        let mut config = LogConfig::new(&dir);
        config.fsync = args.fsync;
        let (store, damage) = courier_store::LogStore::open(config)
            .with_context(|| format!("cannot open the log in {}", dir.display()))?;
        for d in &damage {
            if d.is_harmful() {
                tracing::error!(damage = %d, "the log was damaged; see docs/STORAGE.md");
            } else {
                tracing::warn!(damage = %d, "the log was damaged; see docs/STORAGE.md");
            }
        }
        let fsync = match args.fsync {
            FsyncPolicy::Always => "always".to_string(),
            FsyncPolicy::Interval(d) => format!("interval:{}", d.as_millis()),
            FsyncPolicy::Never => "never".to_string(),
        };
        (
            Box::new(store),
            format!("log in {}, fsync {fsync}", dir.display()),
        )
    };
    let broker = courier_server::BrokerConfig {
        event_retention_ms: args.retention.as_millis().min(u128::from(u64::MAX)) as u64,
        retention_rules: args.retain,
        retention_bytes_max: args.retention_bytes.unwrap_or(0),
        send_rate_per_service: args.send_rate,
        metrics_names_max: args.metrics_names_max,
        ..courier_server::BrokerConfig::default()
    };
    let mut config = ServerConfig {
        listen: args.listen,
        broker,
        manifest_path: args.manifest.clone(),
        insecure: args.insecure,
        tls: match (args.tls_cert, args.tls_key) {
            (Some(cert_chain), Some(key)) => Some(courier_server::TlsSettings {
                cert_chain,
                key,
                client_ca: args.tls_client_ca,
            }),
            _ => None,
        },
        http: args.http.0,
        dns: args.dns,
        webhook_key: args
            .webhook_key
            .clone()
            .or_else(|| local_files.then(|| args.data_dir.join("webhook.key"))),
        trace: (args.trace == "on").then(|| courier_server::TraceSettings {
            retention_ms: args.trace_retention.as_millis().min(u128::from(u64::MAX)) as u64,
            bytes_max: args.trace_bytes_max,
            rate: args.trace_rate,
            payloads: args.trace_payloads,
            dir: local_files.then(|| args.data_dir.join("trace")),
        }),
        cluster,
        ..ServerConfig::default()
    };
    args.limits
        .apply(&mut config, local_files.then(|| args.data_dir.join("log")));
    let server = Server::bind(config, store).await?;
    let r = server.recovery().clone();
    tracing::info!(
        services = r.services,
        backlog = r.backlog,
        dead_letters = r.dead_letters,
        snapshot = ?r.snapshot_covers,
        records_replayed = r.records_replayed,
        ms = started.elapsed().as_millis() as u64,
        "recovered"
    );
    let addr = server.local_addr()?;
    println!("courier listening on {addr} (store: {description})");
    if let Some(http) = server.http_addr() {
        println!("courier http on http://{http}/ (/metrics, /healthz, /readyz)");
    }
    if let Some(dns) = server.dns_addr() {
        println!("courier dns on {dns} (udp and tcp; NAME.service.courier)");
    }
    let handle = server.handle();
    let stop = async {
        #[cfg(unix)]
        {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        tokio::signal::ctrl_c().await?;
        Ok::<(), std::io::Error>(())
    };
    tokio::select! {
        _ = server.run() => Ok(()),
        _ = stop => {
            // A snapshot now makes the next start read almost no log.
            if let Err(e) = handle.checkpoint() {
                eprintln!("courier: final checkpoint failed ({e}); the next start replays more log");
            }
            eprintln!("courier: stopped");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_retention_rules() {
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("10GB"), Ok(10_000_000_000));
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("1.5KiB"), Ok(1536));
        assert!(parse_size("5 parsecs").is_err());
        assert!(parse_size("-5MB").is_err());
        assert!(parse_size("99999999999999GiB").is_err(), "too large");
        let rule = parse_retention_rule("metrics.>=1h,64MiB").expect("rule");
        assert_eq!(
            (rule.pattern.as_str(), rule.max_age_ms, rule.max_bytes),
            ("metrics.>", 3_600_000, 64 << 20)
        );
        let rule = parse_retention_rule("audit.*=7d").expect("days");
        assert_eq!((rule.max_age_ms, rule.max_bytes), (7 * 86_400_000, 0));
        assert!(parse_retention_rule("Bad Pattern=1h").is_err());
        assert!(parse_retention_rule("nothing").is_err());
    }
}
