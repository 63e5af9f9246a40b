//! `courier`: the broker and the client tools in one binary.

mod allocator;
mod bench;
#[cfg(feature = "dev-certs")]
mod certs;
#[cfg(not(feature = "dev-certs"))]
#[path = "certs_absent.rs"]
mod certs;
mod conn;
mod http_get;
mod outbox;
mod output;
mod pause;
mod registry;
mod reply;
mod send;
mod serve_limits;
mod subscribe;
mod tail;
mod trace;
mod up;
mod verify;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, CommandFactory as _, Parser, Subcommand};
use courier_client::{Error as ClientError, StartFrom};
use courier_server::{Server, ServerConfig};
use courier_store::{FsyncPolicy, LogConfig};

use conn::Conn;

/// Exit codes, distinct per kind of failure so scripts can tell them apart.
mod exit {
    pub const FAILURE: u8 = 1;
    /// clap's code for a bad command line; also [`super::UsageError`].
    pub const USAGE: u8 = 2;
    pub const UNREACHABLE: u8 = 3;
    pub const REFUSED: u8 = 4;
    pub const TIMEOUT: u8 = 5;
    pub const CANNOT_LISTEN: u8 = 6;
}

/// Flags that clap accepts one by one but not together.
#[derive(Debug)]
struct UsageError(String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

#[derive(Parser)]
#[command(
    name = "courier",
    version,
    about = "Courier: commands, replies and events between services"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7700")]
    listen: SocketAddr,
    /// Where the broker keeps its log, snapshot and state.
    #[arg(long, default_value = "./courier-data")]
    data_dir: PathBuf,
    /// When a send is acknowledged: `always` (after fsync; nothing
    /// acknowledged is lost), `interval:MS` (fsync at most every MS ms; a
    /// machine crash loses up to MS ms of acknowledged sends), `never` (the
    /// OS decides; a machine crash can lose anything not yet written back).
    #[arg(long, default_value = "always", value_parser = parse_fsync)]
    fsync: FsyncPolicy,
    /// Keep events in the log at least this long for `--from` replays.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    retention: Duration,
    /// Retention for events named by a pattern: PATTERN=AGE or
    /// PATTERN=AGE,SIZE (e.g. 'metrics.>=1h,64MiB'); repeatable; the first
    /// matching rule wins, others get --retention.
    #[arg(long = "retain", value_parser = parse_retention_rule)]
    retain: Vec<courier_server::RetentionRule>,
    /// Give up retained history when the log grows past this size (e.g. 10GiB).
    #[arg(long, value_parser = parse_size)]
    retention_bytes: Option<u64>,
    /// Keep everything in memory: nothing survives a restart.
    #[arg(long)]
    in_memory: bool,
    /// Messages a service may send per second, all its instances together,
    /// in bursts of up to one second's worth; more are refused with
    /// `rate_limited` (retry later). 0: no limit.
    #[arg(long, default_value_t = courier_server::BrokerConfig::default().send_rate_per_service)]
    send_rate: u32,
    /// The application's manifest: who may connect, send and receive what
    /// (reloaded on SIGHUP and when the file changes).
    #[arg(long)]
    manifest: Option<PathBuf>,
    /// Accept unauthenticated connections on a non-loopback address.
    #[arg(long)]
    insecure: bool,
    /// Serve TLS with this certificate chain (PEM, leaf first).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Verify client certificates against this CA (PEM); a verified
    /// certificate authenticates as the service whose `certificates` list
    /// its subject. Optional per client: token-only clients still connect.
    #[arg(long, requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// The HTTP port: /healthz, /readyz and /metrics (Prometheus). `off`
    /// serves none. Guarded by the manifest's [admin] tokens; without a
    /// manifest, loopback clients only.
    #[arg(long, default_value = "127.0.0.1:7780", value_parser = parse_http_addr)]
    http: HttpAddr,
    /// DNS for the service registry on this address, UDP and TCP (e.g.
    /// 127.0.0.1:8600): `NAME.service.courier` answers A and SRV with the
    /// service's healthy instances. Off unless given; a non-loopback
    /// address needs --insecure (DNS has no authentication).
    #[arg(long, value_name = "ADDR")]
    dns: Option<std::net::SocketAddr>,
    /// Distinct message names the metrics label by name; traffic of names
    /// past it is counted under name="_other".
    #[arg(long, default_value_t = courier_server::BrokerConfig::default().metrics_names_max)]
    metrics_names_max: usize,
    /// Activity traces (`courier trace`, /v1/activities): `on` or `off`.
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    trace: String,
    /// How long an activity's trace is kept after its first message.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    trace_retention: Duration,
    /// The most the traces hold in memory, and about the most they take
    /// on disk (in DATA_DIR/trace); the oldest activities go first.
    #[arg(long, default_value = "64MiB", value_parser = parse_size)]
    trace_bytes_max: u64,
    /// Accepted messages a second traced whole; above it, activities are
    /// sampled by a hash of their id (each kept one whole; the skipped
    /// ones counted in /metrics). 0: trace everything.
    #[arg(long, default_value_t = 2_000)]
    trace_rate: u32,
    /// Keep payloads in traces (at most 16 KiB of each).
    #[arg(long)]
    trace_payloads: bool,
    /// The key each service's webhook secret derives from (made on first
    /// start). Default: webhook.key in --data-dir; with --in-memory, a key
    /// for this process only.
    #[arg(long, value_name = "FILE")]
    webhook_key: Option<PathBuf>,
    #[command(flatten)]
    limits: serve_limits::ServeLimits,
}

/// `--http ADDR` or `--http off`.
#[derive(Clone, Copy, Debug)]
struct HttpAddr(Option<std::net::SocketAddr>);

fn parse_http_addr(text: &str) -> Result<HttpAddr, String> {
    if text.eq_ignore_ascii_case("off") {
        return Ok(HttpAddr(None));
    }
    text.parse()
        .map(|a| HttpAddr(Some(a)))
        .map_err(|e| format!("{text:?} is not HOST:PORT or off ({e})"))
}

/// `512`, `64KiB`, `10MB`, `2GiB` …
fn parse_size(text: &str) -> Result<u64, String> {
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
fn parse_retention_rule(text: &str) -> Result<courier_server::RetentionRule, String> {
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

fn parse_fsync(text: &str) -> Result<FsyncPolicy, String> {
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

#[derive(Subcommand)]
enum Command {
    /// Runs the broker.
    Serve(ServeArgs),
    /// Sends a command; prints {"id", "seq"} per accepted message.
    Send(send::SendArgs),
    /// Publishes an event; prints {"id", "seq"} per accepted message.
    Publish(send::SendArgs),
    /// Sends a command and prints its replies, one JSON line each.
    Request(send::RequestArgs),
    /// Acts as a responder: replies to every NAME command it receives.
    Reply(reply::ReplyArgs),
    /// Receives for the service: subscribes it to PATTERN and prints each
    /// delivery (commands and events), acking it.
    ///
    /// The subscription belongs to the service (--service): it stays after
    /// this command exits, and messages wait for it until `courier
    /// unsubscribe`. A wildcard receives commands too, not only events:
    /// `subscribe '>' --service X` makes X a receiver of every command (as
    /// its manifest allows), beside each command's own receiver — X gets
    /// its own copy of each and acks it, its backlog grows while nothing
    /// reads it, and a command with no other receiver is accepted instead
    /// of refused. Watching traffic without becoming a receiver is for a
    /// non-intrusive tail, a separate command still to come.
    Subscribe(subscribe::SubscribeArgs),
    /// Removes the service's subscription to PATTERN.
    Unsubscribe {
        pattern: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Inspects, replays or purges a service's dead letters.
    #[command(name = "dead-letters", subcommand)]
    DeadLetters(DeadLetters),
    /// Lists services: subscriptions, instances, backlog, dead letters.
    /// With NAME (or --json), the registry's instances of it (healthy
    /// ones; --all for every one with its state) from the HTTP port.
    Services {
        /// A service whose registered instances to list.
        name: Option<String>,
        /// Every instance with its state, not only healthy ones.
        #[arg(long)]
        all: bool,
        /// One JSON object instead of a table.
        #[arg(long)]
        json: bool,
        /// The broker's HTTP port (with NAME or --json).
        #[arg(long, env = "COURIER_HTTP", default_value = "127.0.0.1:7780")]
        http: String,
        #[command(flatten)]
        admin: Admin,
    },
    /// Pauses a service's subscription: its messages wait in the broker
    /// (the backlog grows) until `courier resume`.
    Pause(pause::PauseArgs),
    /// Resumes a paused subscription: what waited is delivered.
    Resume(pause::PauseArgs),
    /// Registers an instance off the bus (a database, an HTTP API) and
    /// prints its id.
    Register(registry::RegisterArgs),
    /// Removes a registered instance.
    Deregister(registry::InstanceArgs),
    /// Passes an instance's TTL check.
    Heartbeat(registry::InstanceArgs),
    /// Prints a service's instances, then one JSON line per change.
    Watch(registry::WatchArgs),
    /// Measures durable publish, consume and restart against a broker it
    /// starts itself; prints a table (or --json lines). Runs the
    /// courier-bench program (beside this one, or on the PATH) with these
    /// arguments: `courier bench --help` lists them.
    #[command(disable_help_flag = true)]
    Bench(bench::BenchArgs),
    /// Publishes a database's outbox (courier-outbox, PostgreSQL or
    /// SQLite) to the broker: rows leave the outbox only once the broker
    /// accepted them. Several relays may share one PostgreSQL database.
    #[command(name = "outbox-relay")]
    OutboxRelay(outbox::OutboxRelayArgs),
    /// Follows everything the broker accepts, replies included, as one JSON
    /// line per message, without receiving anything (admin only). A tail
    /// that cannot keep up skips lines and says how many on stderr.
    Tail(tail::TailArgs),
    /// Shows an activity's causal tree: each message under the one it was
    /// sent while handling, with every delivery, its timings and outcome
    /// (admin only). Without an id, lists recent activities.
    Trace(trace::TraceArgs),
    /// Prints the broker's counters as one JSON object, or with
    /// --prometheus every metric of its HTTP port's /metrics.
    Metrics {
        #[command(flatten)]
        admin: Admin,
        /// Print the Prometheus text of the broker's HTTP port instead.
        #[arg(long)]
        prometheus: bool,
        /// The broker's HTTP port (with --prometheus).
        #[arg(long, env = "COURIER_HTTP", default_value = "127.0.0.1:7780")]
        http: String,
    },
    /// Tokens for courier.toml.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Writes a development CA, a broker certificate for localhost and a
    /// client certificate (subject CN=NAME) per service into DIR.
    #[command(name = "dev-certs")]
    DevCerts {
        /// Where to write the PEM files.
        dir: PathBuf,
        /// A service to make a client certificate for (repeatable;
        /// default: web, todo, admin).
        #[arg(long = "service")]
        services: Vec<String>,
        /// Replace files that already exist.
        #[arg(long)]
        force: bool,
    },
    /// Reads a stopped broker's whole log (every record, index and the
    /// snapshot) and prints every damaged range; exit 7 if there is any.
    Verify(verify::VerifyArgs),
    /// Runs a whole application from its courier.toml: checks it, builds
    /// it, starts the broker and every service instance, restarts what
    /// crashes, and stops everything on Ctrl-C.
    Up(up::UpArgs),
    /// Stops the `courier up` running for a directory.
    Down(up::DownArgs),
    /// Validates an application's manifest; one line per problem.
    Check {
        /// The manifest, e.g. courier.toml.
        manifest: PathBuf,
    },
    /// Prints a shell completion script, e.g.
    /// `courier completions bash > /etc/bash_completion.d/courier`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Prints a fresh token (first line) and the `sha256:…` line for courier.toml (second).
    New,
    /// Prints the secret the HTTP gateway signs a service's webhooks with
    /// (`Courier-Signature`, see the README), from the broker's webhook key.
    #[command(name = "webhook-secret")]
    WebhookSecret {
        /// The service whose requests name the webhooks (without a
        /// manifest: http).
        #[arg(long)]
        service: String,
        /// The broker's --data-dir, which holds its webhook.key.
        #[arg(long, default_value = "./courier-data")]
        data_dir: PathBuf,
        /// The broker's --webhook-key, if it was given one.
        #[arg(long, value_name = "FILE")]
        webhook_key: Option<PathBuf>,
    },
}

/// Connection for operations on the broker (not acting as a service).
#[derive(Args, Clone)]
struct Admin {
    /// Broker address.
    #[arg(long, env = "COURIER_URL", default_value = "127.0.0.1:7700")]
    url: String,
    #[arg(long, env = "COURIER_TOKEN")]
    token: Option<String>,
    /// Connect with TLS, trusting this CA certificate (PEM).
    #[arg(long, env = "COURIER_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for brokers that authenticate by certificate.
    #[arg(long, env = "COURIER_TLS_CERT", requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, env = "COURIER_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

#[derive(Args, Clone)]
struct DeadLetterTarget {
    /// The service whose dead letters these are.
    #[arg(long)]
    service: String,
    #[command(flatten)]
    admin: Admin,
}

#[derive(Subcommand)]
enum DeadLetters {
    /// One JSON line per dead letter.
    List(DeadLetterTarget),
    /// One dead letter with its whole message.
    Show {
        id: u64,
        #[command(flatten)]
        target: DeadLetterTarget,
    },
    /// Puts a dead letter back in the service's queue.
    Replay {
        id: u64,
        #[command(flatten)]
        target: DeadLetterTarget,
    },
    /// Deletes the service's dead letters (or only --id).
    Purge {
        #[arg(long)]
        id: Option<u64>,
        #[command(flatten)]
        target: DeadLetterTarget,
    },
}

/// `beginning`, `end`, or an RFC 3339 time such as `2026-11-24T12:00:00Z`.
fn parse_start(text: &str) -> Result<StartFrom, String> {
    match text {
        "beginning" => Ok(StartFrom::Beginning),
        "end" => Ok(StartFrom::New),
        time => {
            let at = humantime::parse_rfc3339_weak(time).map_err(|e| {
                format!("{time:?} is not beginning, end or an RFC 3339 time like 2026-11-24T12:00:00Z: {e}")
            })?;
            let nanos = at
                .duration_since(std::time::UNIX_EPOCH)
                .map_err(|_| format!("{time:?} is before 1970"))?
                .as_nanos();
            Ok(StartFrom::Time(nanos.min(u128::from(u64::MAX)) as u64))
        }
    }
}

/// `500ms`, `5s`, `2m`, `1h`, `7d`, plain seconds, or what `humantime`
/// reads (`1h 30m`, `2days`).
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let factor = match unit {
        "ms" => Some(0.001),
        "" | "s" => Some(1.0),
        "m" => Some(60.0),
        "h" => Some(3600.0),
        "d" => Some(86_400.0),
        _ => None,
    };
    let simple = factor.zip(number.parse::<f64>().ok());
    let Some((factor, value)) = simple else {
        return humantime::parse_duration(text).map_err(|e| {
            format!("{text:?} is not a duration ({e}); write e.g. 500ms, 5s, 2m, 1h or 7d")
        });
    };
    Duration::try_from_secs_f64(value * factor).map_err(|_| {
        format!(
            "{text:?} is too long a duration; the longest is {} seconds (about 584 billion years)",
            u64::MAX
        )
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("courier: cannot start the async runtime: {e}");
            return ExitCode::from(exit::FAILURE);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = exit_code(&e);
            eprintln!("courier: {}", one_line(&e));
            ExitCode::from(code)
        }
    }
}

fn one_line(e: &anyhow::Error) -> String {
    if let Some(client) = e.downcast_ref::<ClientError>() {
        return client.to_string();
    }
    format!("{e:#}")
}

fn exit_code(e: &anyhow::Error) -> u8 {
    if e.downcast_ref::<verify::DamageFound>().is_some() {
        return verify::EXIT_DAMAGE_FOUND;
    }
    if e.downcast_ref::<UsageError>().is_some() {
        return exit::USAGE;
    }
    if let Some(gave_up) = e.downcast_ref::<conn::GaveUp>() {
        return if gave_up.unreachable {
            exit::UNREACHABLE
        } else {
            exit::TIMEOUT
        };
    }
    if let Some(client) = e.downcast_ref::<ClientError>() {
        return match client {
            ClientError::Connect { .. } => exit::UNREACHABLE,
            ClientError::Refused { .. } => exit::REFUSED,
            ClientError::Timeout(_) => exit::TIMEOUT,
            _ => exit::FAILURE,
        };
    }
    if e.downcast_ref::<courier_server::ServerError>().is_some() {
        return exit::CANNOT_LISTEN;
    }
    exit::FAILURE
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Send(args) => send::send(args, false).await,
        Command::Publish(args) => send::send(args, true).await,
        Command::Request(args) => send::request(args).await,
        Command::Reply(args) => reply::reply(args).await,
        Command::Subscribe(args) => subscribe::subscribe(args).await,
        Command::DeadLetters(action) => dead_letters(action).await,
        Command::Pause(args) => pause::run(args, true).await,
        Command::Resume(args) => pause::run(args, false).await,
        Command::Token(TokenCommand::New) => {
            let token = courier_manifest::generate_token()
                .context("cannot read random bytes from the OS")?;
            println!("{token}");
            println!("{}", courier_manifest::hash_token(&token));
            Ok(())
        }
        Command::Token(TokenCommand::WebhookSecret {
            service,
            data_dir,
            webhook_key,
        }) => {
            let path = webhook_key.unwrap_or_else(|| data_dir.join("webhook.key"));
            let key = courier_server::WebhookKey::load(&path)?;
            println!("{}", key.secret(&service));
            Ok(())
        }
        Command::Check { manifest } => check(&manifest),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "courier",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Command::Verify(args) => verify::run(args),
        Command::Up(args) => up::up(args).await,
        Command::Down(args) => up::down(args).await,
        Command::DevCerts {
            dir,
            services,
            force,
        } => dev_certs(&dir, services, force),
        Command::Metrics {
            admin,
            prometheus: true,
            http,
        } => {
            let text = http_get::get(&http, "/metrics", admin.token.as_deref()).await?;
            print!("{text}");
            Ok(())
        }
        Command::Metrics { admin, .. } => {
            output::line(&admin_request(&admin, "courier.metrics", serde_json::json!({})).await?);
            Ok(())
        }
        Command::Bench(args) => bench::run(args),
        Command::Tail(args) => tail::run(args).await,
        Command::OutboxRelay(args) => outbox::run(args).await,
        Command::Trace(args) => trace::run(args).await,
        Command::Register(args) => registry::register(args).await,
        Command::Deregister(args) => registry::deregister(args).await,
        Command::Heartbeat(args) => registry::heartbeat(args).await,
        Command::Watch(args) => registry::watch(args).await,
        Command::Services {
            name,
            all,
            json,
            http,
            admin,
        } if name.is_some() || json || all => {
            registry::show(name.as_deref(), all, json, &http, admin.token.as_deref()).await
        }
        Command::Services { admin, .. } => {
            let listing =
                admin_request(&admin, "courier.services.list", serde_json::json!({})).await?;
            for service in listing.as_array().into_iter().flatten() {
                output::line(service);
            }
            Ok(())
        }
        Command::Unsubscribe { pattern, conn } => {
            let client = conn::connect(
                &conn,
                conn::Settings::default(),
                &conn::Deadline::after(None),
            )
            .await?;
            client.unsubscribe(&pattern).await?;
            client.shutdown().await;
            Ok(())
        }
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("COURIER_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let started = std::time::Instant::now();
    let (store, description): (Box<dyn courier_store::MessageStore>, String) = if args.in_memory {
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
            .or_else(|| (!args.in_memory).then(|| args.data_dir.join("webhook.key"))),
        trace: (args.trace == "on").then(|| courier_server::TraceSettings {
            retention_ms: args.trace_retention.as_millis().min(u128::from(u64::MAX)) as u64,
            bytes_max: args.trace_bytes_max,
            rate: args.trace_rate,
            payloads: args.trace_payloads,
            dir: (!args.in_memory).then(|| args.data_dir.join("trace")),
        }),
        ..ServerConfig::default()
    };
    args.limits.apply(
        &mut config,
        (!args.in_memory).then(|| args.data_dir.join("log")),
    );
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

fn dev_certs(dir: &std::path::Path, services: Vec<String>, force: bool) -> anyhow::Result<()> {
    let services = if services.is_empty() {
        certs::DEFAULT_SERVICES
            .iter()
            .map(|s| s.to_string())
            .collect()
    } else {
        services
    };
    let written = certs::write_dev_certs(dir, &services, force)?;
    for path in &written {
        println!("{}", path.display());
    }
    let d = dir.display();
    let first = services.first().map_or("web", String::as_str);
    eprintln!(
        "courier: development certificates only (the CA key is in {d}/ca-key.pem).\n\
         broker:  courier serve --tls-cert {d}/server.pem --tls-key {d}/server-key.pem --tls-client-ca {d}/ca.pem\n\
         clients: --tls-ca {d}/ca.pem --tls-cert {d}/{first}.pem --tls-key {d}/{first}-key.pem\n\
         manifest: certificates = [\"CN={first}\"] under [services.{first}]"
    );
    Ok(())
}

fn check(path: &std::path::Path) -> anyhow::Result<()> {
    let (manifest, _) = courier_server::load_manifest(path).map_err(|e| anyhow::anyhow!(e))?;
    let problems = courier_manifest::check(&manifest);
    let origin = path.display().to_string();
    for p in &problems {
        println!("{}", p.display_in(&origin));
    }
    if courier_manifest::has_errors(&problems) {
        anyhow::bail!(
            "{origin}: {} problem(s); fix the errors above",
            problems.len()
        );
    }
    eprintln!(
        "courier: {origin} is consistent ({} warning(s))",
        problems.len()
    );
    Ok(())
}

/// Sends a `courier.*` command to the broker and returns its reply's payload.
async fn admin_request(
    admin: &Admin,
    name: &str,
    args: serde_json::Value,
) -> anyhow::Result<serde_json::Value> {
    Ok(admin_request_named(admin, name, args).await?.1)
}

/// Like [`admin_request`], with the reply's name (its outcome).
async fn admin_request_named(
    admin: &Admin,
    name: &str,
    args: serde_json::Value,
) -> anyhow::Result<(String, serde_json::Value)> {
    let client = connect_admin(admin).await?;
    let reply = client.command(name).json(&args)?.request().await;
    client.shutdown().await;
    let reply = reply?;
    Ok((reply.name().to_string(), reply.json()?))
}

/// A connection for the broker's own commands.
async fn connect_admin(admin: &Admin) -> anyhow::Result<courier_client::Client> {
    let conn = Conn {
        url: admin.url.clone(),
        service: std::env::var("COURIER_SERVICE").ok(),
        token: admin.token.clone(),
        tls_ca: admin.tls_ca.clone(),
        tls_cert: admin.tls_cert.clone(),
        tls_key: admin.tls_key.clone(),
    };
    conn::connect(
        &conn,
        conn::Settings::default(),
        &conn::Deadline::after(None),
    )
    .await
}

async fn dead_letters(action: DeadLetters) -> anyhow::Result<()> {
    use serde_json::json;
    match action {
        DeadLetters::List(t) => {
            let listing = admin_request(
                &t.admin,
                "courier.dead-letters.list",
                json!({"service": t.service}),
            )
            .await?;
            for letter in listing.as_array().into_iter().flatten() {
                output::line(letter);
            }
        }
        DeadLetters::Show { id, target: t } => {
            output::line(
                &admin_request(
                    &t.admin,
                    "courier.dead-letters.show",
                    json!({"service": t.service, "id": id}),
                )
                .await?,
            );
        }
        DeadLetters::Replay { id, target: t } => {
            output::line(
                &admin_request(
                    &t.admin,
                    "courier.dead-letters.replay",
                    json!({"service": t.service, "id": id}),
                )
                .await?,
            );
        }
        DeadLetters::Purge { id, target: t } => {
            let mut args = json!({"service": t.service});
            if let Some(id) = id {
                args["id"] = json!(id);
            }
            output::line(&admin_request(&t.admin, "courier.dead-letters.purge", args).await?);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use courier_client::ErrorCode;

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

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("ms").is_err());
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
        // Long but representable: fine (a deadline that far is no deadline).
        assert_eq!(
            parse_duration("10000000000d"),
            Ok(Duration::from_secs(864_000_000_000_000))
        );
        // Beyond a Duration: a clear error, not a panic.
        for huge in [
            "99999999999999999999999s",
            "1e400",
            "9999999999999999999999999years",
        ] {
            let error = parse_duration(huge).expect_err(huge);
            assert!(error.contains(huge), "{error}");
        }
        let error = parse_duration("99999999999999999999999s").expect_err("too long");
        assert!(error.contains("too long"), "{error}");
    }

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn refused_and_unreachable_have_distinct_exit_codes() {
        let refused = anyhow::Error::new(ClientError::Refused {
            code: ErrorCode::NoReceiver,
            reason: "x".into(),
        });
        let unreachable = anyhow::Error::new(ClientError::Connect {
            addr: "a".into(),
            source: std::io::Error::other("x"),
        });
        assert_eq!(exit_code(&refused), exit::REFUSED);
        assert_eq!(exit_code(&unreachable), exit::UNREACHABLE);
    }
}
