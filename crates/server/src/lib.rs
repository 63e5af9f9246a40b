//! Courier's network edge: accepts TCP connections, speaks the frame
//! protocol, and feeds the sans-I/O [`courier_broker::Broker`].
//!
//! Architecture invariant: this is the only crate that opens sockets. The
//! broker core sits behind one mutex; a connection's reader decodes every
//! frame it has, applies them all under one lock (one group commit), and
//! encodes the resulting actions into each target connection's outbox. A
//! per-connection writer task turns an outbox into one `write` call, so
//! under load many frames share a syscall.
#![forbid(unsafe_code)]

mod auth;
mod console;
mod dns;
mod gateway;
mod group_commit;
mod http;
mod metrics_text;
mod openapi;
mod registry;
mod tail;
mod tls;
mod trace;

pub use auth::{load_manifest, ADMIN_SERVICE};
pub use gateway::webhook::{webhook_signature, WebhookKey, WebhookKeyError};
pub use tls::{certificate_subject, TlsSettings, ALPN};
pub use trace::TraceSettings;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use courier_broker::{Action, Broker, ConnId, FastMap, Nanos, RecoveryReport};
use courier_proto::{
    decode_frame, decode_frame_as, ErrorCode, ErrorFrame, Frame, FrameWriter, Welcome,
    FRAME_BYTES_MAX_DEFAULT, PROTOCOL_VERSION, PROTOCOL_VERSION_MIN,
};
use courier_store::MessageStore;
use futures_util::FutureExt as _;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tracing::{debug, error, info, warn};

pub use courier_broker::{Config as BrokerConfig, RetentionRule};

/// Listener settings; each limit is named with its unit.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// The frame limit announced in WELCOME, for both directions: the
    /// longest frame a client may send, and the longest the broker sends
    /// (it refuses messages whose delivery would be longer). Overrides
    /// `broker.frame_bytes_max`.
    pub frame_bytes_max: u32,
    /// A connection must finish HELLO within this time (its TLS handshake
    /// included), whether it goes silent or shuts its write side.
    pub handshake_timeout_ms: u64,
    /// Once a frame has begun to arrive, all of it must arrive within this
    /// time, or the connection is closed (`read_timeout`).
    pub frame_timeout_ms: u64,
    /// An established connection that sends nothing (not even a PING) for
    /// this long is closed (`read_timeout`). The SDK pings every 10 s.
    pub keepalive_timeout_ms: u64,
    /// Connections open at once, in their handshake or established; more
    /// are answered `too_many_connections` and closed, so the process never
    /// runs out of file descriptors. `courier serve` sizes it from its
    /// open-files limit.
    pub connections_max: usize,
    /// Bytes queued for one connection at which it gets no more deliveries
    /// until it has written all but a quarter of them (back-pressure).
    pub pause_bytes: usize,
    /// Bytes queued for one connection before it counts as a slow consumer
    /// and is cut off (its unacked deliveries go to other instances).
    pub pending_bytes_max: usize,
    /// Reads are made in chunks of at least this size.
    pub read_buffer_bytes: usize,
    /// A snapshot is taken this often (when anything changed), so recovery
    /// replays at most this much log.
    pub checkpoint_interval_ms: u64,
    /// `courier.toml`: who may connect, send and receive what. Reloaded on
    /// SIGHUP and when the file changes.
    pub manifest_path: Option<std::path::PathBuf>,
    /// Accept unauthenticated connections on a non-loopback address.
    pub insecure: bool,
    /// Connections still in their handshake at once; more are closed at once.
    pub handshakes_max: usize,
    /// The background scrub of the log's sealed segments; `None`: off.
    pub scrub: Option<ScrubSettings>,
    /// TLS on the listener: every connection's TLS handshake comes before
    /// HELLO and counts against `handshake_timeout_ms`. TLS alone is not
    /// authentication (the `insecure` rule is unchanged).
    pub tls: Option<TlsSettings>,
    /// The HTTP port (health, readiness, metrics); `None` serves none.
    pub http: Option<SocketAddr>,
    /// DNS for the service registry (UDP and TCP, `NAME.service.courier.`);
    /// `None` serves none.
    pub dns: Option<SocketAddr>,
    /// Activity traces; `None` keeps none.
    pub trace: Option<TraceSettings>,
    /// The file of the key the HTTP gateway derives each service's webhook
    /// secret from, made on first start; `None`: a key for this process
    /// only (its secrets change with every start).
    pub webhook_key: Option<std::path::PathBuf>,
    pub broker: BrokerConfig,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 7700)),
            frame_bytes_max: FRAME_BYTES_MAX_DEFAULT,
            handshake_timeout_ms: 10_000,
            frame_timeout_ms: FRAME_TIMEOUT_MS_DEFAULT,
            keepalive_timeout_ms: KEEPALIVE_TIMEOUT_MS_DEFAULT,
            connections_max: CONNECTIONS_MAX_DEFAULT,
            pending_bytes_max: 64 * 1024 * 1024,
            pause_bytes: 4 * 1024 * 1024,
            read_buffer_bytes: 64 * 1024,
            checkpoint_interval_ms: 30_000,
            manifest_path: None,
            insecure: false,
            handshakes_max: 1024,
            scrub: None,
            tls: None,
            http: None,
            dns: None,
            trace: Some(TraceSettings::default()),
            webhook_key: None,
            broker: BrokerConfig::default(),
        }
    }
}

/// Where and how fast the background scrub reads (docs/STORAGE.md §8.8).
#[derive(Debug, Clone)]
pub struct ScrubSettings {
    /// The log's directory (`LogConfig::dir`).
    pub log_dir: std::path::PathBuf,
    /// Bytes read per second at most (the scrub's whole I/O).
    pub bytes_per_sec: u64,
    /// A pass starts this long after the previous one started (or when it
    /// ends, if it took longer). The first starts with the broker.
    pub pass_interval_ms: u64,
}

/// Default of [`ScrubSettings::bytes_per_sec`]: a 64 MiB segment in 8 s,
/// a 10 GiB log in about 21 minutes, a small share of any disk.
pub const SCRUB_BYTES_PER_SEC_DEFAULT: u64 = 8 * 1024 * 1024;
/// Default of [`ScrubSettings::pass_interval_ms`]: hourly.
pub const SCRUB_PASS_INTERVAL_MS_DEFAULT: u64 = 3_600_000;

/// Default of [`ServerConfig::frame_timeout_ms`]: a frame of the default
/// 8 MiB limit still arrives at 280 KB/s.
pub const FRAME_TIMEOUT_MS_DEFAULT: u64 = 30_000;
/// Default of [`ServerConfig::keepalive_timeout_ms`]: six of the SDK's
/// 10-second PING intervals, so a lost PING or two never cuts an idle
/// client, while a dead peer's descriptor is freed within a minute.
pub use courier_proto::KEEPALIVE_TIMEOUT_MS_DEFAULT;
/// Default of [`ServerConfig::connections_max`] when nothing sized it from
/// the process's open-files limit.
pub const CONNECTIONS_MAX_DEFAULT: usize = 4096;
/// Connections being refused (over the cap) at once; past it, a new one
/// is closed without its ERROR frame rather than hold another descriptor.
const REFUSALS_MAX: usize = 64;
/// How long a refused connection is kept to read what the client sent,
/// so closing does not reset the connection before the ERROR is read.
const REFUSAL_LINGER_MS: u64 = 1_000;
/// How long a closing connection may take to write what is left in its
/// outbox (its ERROR frame, say) before it is closed regardless: a peer
/// that stopped reading must not keep the descriptor.
const CLOSE_LINGER_MS: u64 = 5_000;

#[derive(Debug, Error)]
pub enum ServerError {
    #[error("{0}")]
    Manifest(String),
    #[error(
        "refusing to listen on {0} without authentication: anyone who can reach it could send anything; \
         pass --manifest courier.toml, or --insecure if that is really what you want"
    )]
    Insecure(SocketAddr),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("{0}")]
    WebhookKey(#[from] gateway::webhook::WebhookKeyError),
    #[error("cannot start the activity traces' thread: {0}")]
    Trace(std::io::Error),
    #[error("cannot recover the broker's state from its store: {0}")]
    Recovery(#[from] courier_store::StoreError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot listen for HTTP on {addr}: {source}; pass --http with a free address, or --http off")]
    BindHttp {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(
        "refusing to serve HTTP on {0} without authentication: anyone who can reach it could read the broker's metrics; \
         pass --manifest courier.toml (its [admin] tokens guard the port), or --insecure if that is really what you want"
    )]
    InsecureHttp(SocketAddr),
    #[error("cannot serve DNS on {addr} (UDP and TCP): {source}; pass --dns with a free address")]
    BindDns {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(
        "refusing to serve DNS on {0}: DNS has no authentication, so anyone who can reach it could list the registry's services and addresses; \
         bind it to loopback (e.g. --dns 127.0.0.1:8600), or pass --insecure if that is really what you want"
    )]
    InsecureDns(SocketAddr),
}

type Store = Box<dyn MessageStore>;

/// Bytes waiting to be written to one connection.
struct Outbox {
    state: Mutex<OutState>,
    wake: Notify,
    /// The timer task's wake-up: a paused connection whose outbox drained
    /// below `resume_below` is resumed at once, not at the next tick.
    timer_wake: Arc<Notify>,
    resume_below: usize,
    /// Set once the connection is gone (tails writing to it stop).
    gone: std::sync::atomic::AtomicBool,
}

struct OutState {
    writer: FrameWriter,
    /// Set when the connection must close once the outbox is flushed.
    closing: bool,
    /// Bytes the writer task took and has not finished writing: they count
    /// against the connection's limit as much as those still queued.
    writing: usize,
    /// The broker paused deliveries to this connection (outbox too full).
    paused: bool,
}

impl Outbox {
    /// An outbox whose frames keep to `frame_bytes_max`, the limit the
    /// broker announces in WELCOME.
    fn new(timer_wake: Arc<Notify>, resume_below: usize, frame_bytes_max: u32) -> Arc<Outbox> {
        Arc::new(Outbox {
            state: Mutex::new(OutState {
                writer: FrameWriter::with_frame_bytes_max(frame_bytes_max),
                closing: false,
                writing: 0,
                paused: false,
            }),
            wake: Notify::new(),
            timer_wake,
            resume_below,
            gone: std::sync::atomic::AtomicBool::new(false),
        })
    }

    fn is_gone(&self) -> bool {
        self.gone.load(Ordering::Relaxed)
    }

    fn lock(&self) -> MutexGuard<'_, OutState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn push(&self, frame: &Frame) {
        let mut state = self.lock();
        if let Err(e) = state.writer.push(frame) {
            warn!(error = %e, "frame could not be encoded; dropped");
        }
        drop(state);
        self.wake.notify_one();
    }

    /// Sends an ERROR frame, then closes the connection.
    fn fail(&self, code: ErrorCode, message: String) {
        let mut state = self.lock();
        let _ = state
            .writer
            .push(&Frame::Error(ErrorFrame { code, message }));
        state.closing = true;
        drop(state);
        self.wake.notify_one();
    }
}

struct Shared {
    config: ServerConfig,
    /// The service registry's checks and watchers (`registry.rs`).
    registry: registry::RegistryEdge,
    /// Credentials each live connection presented (and the subject of its
    /// verified client certificate), to check again when the manifest changes.
    credentials: Mutex<HashMap<ConnId, (courier_proto::Credentials, Option<String>)>>,
    /// Set when the listener speaks TLS.
    tls: Option<tokio_rustls::TlsAcceptor>,
    /// Modification time of the manifest file in force.
    manifest_modified: Mutex<Option<SystemTime>>,
    handshakes: std::sync::atomic::AtomicUsize,
    /// Connections open (see [`ServerConfig::connections_max`]).
    connections: std::sync::atomic::AtomicUsize,
    /// Connections over the cap being told so.
    refusals: std::sync::atomic::AtomicUsize,
    /// The second (unix) of the last "too many handshakes" warning.
    cap_warned_at: AtomicU64,
    /// The second (unix) of the last "too many connections" warning.
    connections_warned_at: AtomicU64,
    /// Connections paused for back-pressure, checked on every tick.
    paused: Mutex<std::collections::HashSet<ConnId>>,
    core: Mutex<Broker<Store>>,
    outboxes: Mutex<FastMap<ConnId, Arc<Outbox>>>,
    /// Where each live connection comes from and since when, for the
    /// console (the broker core knows nothing of sockets or clocks).
    peers: Mutex<FastMap<ConnId, console::Peer>>,
    next_conn: AtomicU64,
    /// When the timer task plans to wake next (unix ns).
    timer_due: AtomicU64,
    timer_wake: Arc<Notify>,
    /// How long recovery took at start-up, for `/metrics`.
    recovery_seconds: f64,
    /// Frames decoded from clients, and entries encoded for them (batched
    /// into fewer frames), for `/metrics`.
    frames_in: AtomicU64,
    entries_out: AtomicU64,
    /// Live tails and the channel that feeds them.
    tails: tail::Tails,
    /// Activity traces, unless off.
    tracer: Option<trace::Tracer>,
    /// The HTTP gateway's webhook posts, for `/metrics`.
    webhooks: Arc<gateway::webhook::WebhookCounters>,
    /// What the gateway's webhook secrets derive from.
    webhook_key: gateway::webhook::WebhookKey,
    /// Wakes the thread that fsyncs outside the core's lock.
    committer: Arc<group_commit::Committer>,
}

/// What the broker wants the operator to hear: harm to durable data at
/// error level, the rest as warnings.
fn say_alerts(core: &mut Broker<Store>) {
    for error in core.take_errors() {
        error!("{error}");
    }
    for alert in core.take_alerts() {
        warn!("{alert}");
    }
}

fn now_nanos() -> Nanos {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// A running broker.
pub struct Server {
    shared: Arc<Shared>,
    listener: TcpListener,
    http: Option<http::HttpListener>,
    dns: Option<dns::DnsListener>,
    recovery: RecoveryReport,
}

/// Operations on a running server from outside its tasks.
#[derive(Clone)]
pub struct ServerHandle {
    shared: Arc<Shared>,
}

impl ServerHandle {
    /// Reads the manifest file again. A bad one is refused (the error names
    /// line and column) and the one in force stays; a good one takes effect
    /// at once, and connections whose credentials it no longer accepts are
    /// closed.
    pub fn reload_manifest(&self) -> Result<(), String> {
        reload_manifest(&self.shared)
    }

    /// Snapshots the state and compacts the store (also done periodically);
    /// returns the bytes freed.
    pub fn checkpoint(&self) -> Result<u64, courier_store::StoreError> {
        let mut core = self.shared.core();
        let freed = core.checkpoint(now_nanos());
        say_alerts(&mut core);
        freed
    }
}

impl Server {
    /// Binds the listener; call [`Server::run`] to serve.
    pub async fn bind(config: ServerConfig, store: Store) -> Result<Server, ServerError> {
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| ServerError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let mut manifest_modified = None;
        let manifest = match &config.manifest_path {
            Some(path) => {
                let (manifest, modified) = load_manifest(path).map_err(ServerError::Manifest)?;
                manifest_modified = modified;
                Some(manifest)
            }
            None => None,
        };
        if manifest.is_none() && !config.insecure && !config.listen.ip().is_loopback() {
            return Err(ServerError::Insecure(config.listen));
        }
        if let Some(addr) = config.http {
            if manifest.is_none() && !config.insecure && !addr.ip().is_loopback() {
                return Err(ServerError::InsecureHttp(addr));
            }
        }
        let http = match config.http {
            Some(addr) => Some(
                http::HttpListener::bind(addr)
                    .await
                    .map_err(|source| ServerError::BindHttp { addr, source })?,
            ),
            None => None,
        };
        let dns = match config.dns {
            Some(addr) if !config.insecure && !addr.ip().is_loopback() => {
                return Err(ServerError::InsecureDns(addr));
            }
            Some(addr) => Some(
                dns::DnsListener::bind(addr)
                    .await
                    .map_err(|source| ServerError::BindDns { addr, source })?,
            ),
            None => None,
        };
        let tls = match &config.tls {
            Some(settings) => Some(tls::acceptor(settings).map_err(ServerError::Tls)?),
            None => None,
        };
        // One limit both ways: what clients may send, and what the broker
        // accepts only if its delivery fits.
        let broker_config = BrokerConfig {
            frame_bytes_max: config.frame_bytes_max,
            ..config.broker.clone()
        };
        let mut core = Broker::new(broker_config, store);
        core.set_manifest(manifest);
        let recovery_started = std::time::Instant::now();
        let recovery = core.recover(now_nanos())?;
        let recovery_seconds = recovery_started.elapsed().as_secs_f64();
        say_alerts(&mut core);
        let tracer = match &config.trace {
            Some(settings) => {
                Some(trace::Tracer::start(settings, now_nanos()).map_err(ServerError::Trace)?)
            }
            None => None,
        };
        core.set_tracing(
            tracer
                .as_ref()
                .and(config.trace.as_ref())
                .map(|settings| settings.rate),
        );
        let webhook_key = match &config.webhook_key {
            Some(path) => gateway::webhook::WebhookKey::load_or_create(path),
            None => gateway::webhook::WebhookKey::ephemeral(),
        }?;
        Ok(Server {
            recovery,
            http,
            dns,
            shared: Arc::new(Shared {
                config,
                registry: registry::RegistryEdge::new(),
                credentials: Mutex::new(HashMap::new()),
                tls,
                manifest_modified: Mutex::new(manifest_modified),
                handshakes: std::sync::atomic::AtomicUsize::new(0),
                connections: std::sync::atomic::AtomicUsize::new(0),
                refusals: std::sync::atomic::AtomicUsize::new(0),
                cap_warned_at: AtomicU64::new(0),
                connections_warned_at: AtomicU64::new(0),
                paused: Mutex::new(std::collections::HashSet::new()),
                core: Mutex::new(core),
                outboxes: Mutex::new(FastMap::default()),
                peers: Mutex::new(FastMap::default()),
                next_conn: AtomicU64::new(1),
                timer_due: AtomicU64::new(u64::MAX),
                timer_wake: Arc::new(Notify::new()),
                recovery_seconds,
                frames_in: AtomicU64::new(0),
                entries_out: AtomicU64::new(0),
                tails: tail::Tails::new(),
                tracer,
                webhooks: Arc::default(),
                webhook_key,
                committer: Arc::default(),
            }),
            listener,
        })
    }

    /// What recovery found at start-up.
    pub fn recovery(&self) -> &RecoveryReport {
        &self.recovery
    }

    pub fn handle(&self) -> ServerHandle {
        ServerHandle {
            shared: self.shared.clone(),
        }
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The HTTP port's address, if it serves one (useful with port 0).
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().and_then(|h| h.local_addr().ok())
    }

    /// The DNS port's address (UDP and TCP), if it serves one.
    pub fn dns_addr(&self) -> Option<SocketAddr> {
        self.dns.as_ref().and_then(|d| d.local_addr().ok())
    }

    /// Serves until the task is dropped.
    pub async fn run(mut self) {
        let _dns = self
            .dns
            .take()
            .map(|dns| AbortOnDrop(tokio::spawn(dns.serve(self.shared.clone()))));
        let _http = self.http.take().map(|http| {
            AbortOnDrop(tokio::spawn(
                http.serve(self.shared.clone(), self.listener.local_addr()),
            ))
        });
        if let Some(settings) = self.shared.config.scrub.clone() {
            let shared = Arc::downgrade(&self.shared);
            let spawned = std::thread::Builder::new()
                .name("courier-scrub".to_string())
                .spawn(move || run_scrub(shared, settings));
            if let Err(e) = spawned {
                warn!(error = %e, "cannot start the background scrub; sealed segments are checked only when read");
            }
        }
        group_commit::start(&self.shared);
        let _timer = tokio::spawn(run_timer(self.shared.clone()));
        let _checks = AbortOnDrop(tokio::spawn(registry::report_results(self.shared.clone())));
        let _reloader = tokio::spawn(watch_manifest(self.shared.clone()));
        loop {
            match self.listener.accept().await {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    match ConnectionSlot::take(&self.shared) {
                        Some(slot) => {
                            tokio::spawn(serve_connection(self.shared.clone(), slot, stream, peer));
                        }
                        None => refuse_over_cap(&self.shared, stream, peer),
                    }
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// Where a batch's fsync runs (see [`Shared::with_core_deferred`]).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Commit {
    InPlace,
    Deferred,
    Committing,
}

/// Stops a spawned task when the server's task is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Shared {
    fn core(&self) -> MutexGuard<'_, Broker<Store>> {
        self.core
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn peers(&self) -> MutexGuard<'_, FastMap<ConnId, console::Peer>> {
        self.peers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn outboxes(&self) -> MutexGuard<'_, FastMap<ConnId, Arc<Outbox>>> {
        self.outboxes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs `f` on the broker, then carries out every action it produced.
    /// Actions are written while the core lock is held, so frames for one
    /// connection leave in the order the broker decided them. What `f`
    /// stored is durable when this returns (the fsync ran under the lock).
    fn with_core(&self, f: impl FnOnce(&mut Broker<Store>, Nanos)) {
        self.run_core(f, Commit::InPlace);
    }

    /// Like [`Shared::with_core`], but the fsync runs on the group-commit
    /// thread (`group_commit.rs`), without the lock: what must wait for it
    /// (acknowledgements, deliveries of stored messages) leaves when it is
    /// done, everything else at once.
    fn with_core_deferred(&self, f: impl FnOnce(&mut Broker<Store>, Nanos)) {
        self.run_core(f, Commit::Deferred);
    }

    /// For the group-commit thread itself: deferred, without waking it.
    fn with_core_committing(&self, f: impl FnOnce(&mut Broker<Store>, Nanos)) {
        self.run_core(f, Commit::Committing);
    }

    fn run_core(&self, f: impl FnOnce(&mut Broker<Store>, Nanos), commit: Commit) {
        let mut core = self.core();
        let now = now_nanos();
        core.set_tapping(self.tails.any());
        f(&mut core, now);
        let mut actions = Vec::new();
        let mut wake_committer = false;
        if commit == Commit::InPlace || !self.committer.running() {
            core.take_actions(&mut actions);
        } else {
            core.take_ready_actions(&mut actions);
            wake_committer = commit == Commit::Deferred && core.sync_wanted();
        }
        // Sent under the lock, so every tail sees the core's order.
        for tapped in core.take_taps() {
            let _ = self.tails.sender.send(Arc::new(tapped));
        }
        // One send per batch, under the lock too: the trace thread sees
        // acceptances before the deliveries and acks that follow them.
        if let Some(tracer) = &self.tracer {
            let mut records = Vec::new();
            let bytes = core.take_traces(&mut records);
            if !records.is_empty() {
                tracer.submit(records, bytes);
            }
        }
        say_alerts(&mut core);
        let checks = core.take_registry_checks();
        self.registry.after_core(core.registry().index(), checks);
        let next_timer = core.next_timer();
        let (cut, full) = self.dispatch(actions);
        core.metrics_mut().slow_consumers_cut += cut;
        if !full.is_empty() {
            let mut paused = self.paused.lock().unwrap_or_else(|p| p.into_inner());
            for conn in full {
                core.set_paused(conn, true, now);
                paused.insert(conn);
            }
        }
        drop(core);
        if wake_committer {
            self.committer.wake();
        }
        if let Some(t) = next_timer {
            if t < self.timer_due.load(Ordering::Relaxed) {
                self.timer_wake.notify_one();
            }
        }
    }

    /// Resumes paused connections whose outbox has drained (on each tick).
    fn resume_drained(&self, core: &mut Broker<Store>, now: Nanos) {
        let mut paused = self.paused.lock().unwrap_or_else(|p| p.into_inner());
        if paused.is_empty() {
            return;
        }
        let outboxes = self.outboxes();
        let low = self.config.pause_bytes / 4;
        paused.retain(|conn| {
            let Some(outbox) = outboxes.get(conn) else {
                return false;
            };
            let mut state = outbox.lock();
            let pending = state.writer.len() + state.writing;
            if pending <= low {
                state.paused = false;
                drop(state);
                core.set_paused(*conn, false, now);
                false
            } else {
                true
            }
        });
    }

    /// Encodes actions into outboxes; returns how many connections were cut
    /// off as slow consumers, and those now over the pause threshold.
    fn dispatch(&self, actions: Vec<Action>) -> (u64, Vec<ConnId>) {
        if actions.is_empty() {
            return (0, Vec::new());
        }
        self.entries_out
            .fetch_add(actions.len() as u64, Ordering::Relaxed);
        let outboxes = self.outboxes();
        let mut touched: Vec<Arc<Outbox>> = Vec::new();
        let mut slow: Vec<ConnId> = Vec::new();
        let mut full: Vec<ConnId> = Vec::new();
        // Actions for one connection come in runs (a batch of deliveries,
        // a batch of results): one map lookup and one lock per run.
        let mut current: Option<(ConnId, MutexGuard<'_, OutState>)> = None;
        for action in actions {
            let conn = match &action {
                Action::Deliver { conn, .. }
                | Action::SendResult { conn, .. }
                | Action::OpResult { conn, .. }
                | Action::Drained { conn }
                | Action::Pong { conn, .. }
                | Action::StartTail { conn, .. }
                | Action::TraceQuery { conn, .. }
                | Action::Close { conn, .. } => *conn,
            };
            if current.as_ref().is_none_or(|(c, _)| *c != conn) {
                current = None;
                let Some(outbox) = outboxes.get(&conn) else {
                    continue;
                };
                if !touched.iter().any(|o| Arc::ptr_eq(o, outbox)) {
                    touched.push(outbox.clone());
                }
                current = Some((conn, outbox.lock()));
            }
            let Some((_, state)) = current.as_mut() else {
                continue;
            };
            if state.closing {
                continue;
            }
            let encoded = match action {
                Action::Deliver {
                    delivery,
                    attempt,
                    message,
                    ..
                } => state.writer.push_delivery(delivery, attempt, &message),
                Action::SendResult {
                    seq,
                    code,
                    reason,
                    log_seq,
                    ..
                } => state.writer.push_send_outcome(seq, code, &reason, log_seq),
                Action::OpResult {
                    request,
                    code,
                    reason,
                    ..
                } => state.writer.push(&Frame::Result(courier_proto::OpResult {
                    request,
                    code,
                    reason,
                })),
                Action::Drained { .. } => state.writer.push(&Frame::Drained),
                Action::Close { code, reason, .. } => {
                    // The core already let go of the connection; the
                    // ERROR follows what was queued before it.
                    warn!(conn, %reason, "closing the connection");
                    let pushed = state.writer.push(&Frame::Error(ErrorFrame {
                        code,
                        message: reason,
                    }));
                    state.closing = true;
                    pushed
                }
                Action::Pong { nonce, .. } => state.writer.push(&Frame::Pong(nonce)),
                Action::StartTail {
                    conn,
                    request,
                    activity_id,
                    filter,
                } => {
                    if let Some(outbox) = outboxes.get(&conn) {
                        self.tails
                            .start_bus_tail(outbox.clone(), request, activity_id, filter);
                    }
                    Ok(())
                }
                Action::TraceQuery {
                    conn,
                    request,
                    activity_id,
                    query,
                } => {
                    if let (Some(outbox), Some(tracer)) = (outboxes.get(&conn), &self.tracer) {
                        answer_trace_query(
                            tracer.clone(),
                            outbox.clone(),
                            request,
                            activity_id,
                            query,
                        );
                    }
                    Ok(())
                }
            };
            if let Err(e) = encoded {
                warn!(conn, error = %e, "could not encode a frame; dropped");
            }
            let pending = state.writer.len() + state.writing;
            if pending > self.config.pending_bytes_max {
                if !slow.contains(&conn) {
                    slow.push(conn);
                }
            } else if pending > self.config.pause_bytes && !full.contains(&conn) {
                state.paused = true;
                full.push(conn);
            }
        }
        drop(current);
        for outbox in touched {
            outbox.wake.notify_one();
        }
        let cut = slow.len() as u64;
        full.retain(|c| !slow.contains(c));
        for conn in slow {
            if let Some(outbox) = outboxes.get(&conn) {
                warn!(
                    conn,
                    "slow consumer: outbox over its byte limit; closing the connection"
                );
                let mut state = outbox.lock();
                state.writer.take();
                state.closing = true;
                drop(state);
                outbox.fail(
                    ErrorCode::SlowConsumer,
                    format!(
                        "more than {} bytes were waiting for this connection; read faster or lower max_in_flight",
                        self.config.pending_bytes_max
                    ),
                );
            }
        }
        (cut, full)
    }
}

/// Answers a `courier.trace.*` command off the broker's lock (a tree
/// may take a while to build) with one final reply.
fn answer_trace_query(
    tracer: trace::Tracer,
    outbox: Arc<Outbox>,
    request: uuid::Uuid,
    activity_id: uuid::Uuid,
    query: courier_broker::TraceQuery,
) {
    tokio::task::spawn_blocking(move || {
        let (outcome, body) = tracer.answer(&query);
        let mut reply =
            courier_proto::Message::new(courier_proto::Kind::Reply, outcome, body.to_string());
        reply.response_to = Some(request);
        reply.activity_id = activity_id;
        reply.sender = "courier".into();
        reply.timestamp = now_nanos();
        reply
            .headers
            .push(("content-type".into(), "application/json".into()));
        let limit = outbox.lock().writer.frame_bytes_max() as usize;
        let size = courier_proto::delivery_frame_len(&reply);
        if size > limit {
            // The connection could not take it: say so instead.
            let why = serde_json::json!({
                "reason": format!(
                    "the answer is {size} bytes, more than this connection's frame limit of {limit}; read it over HTTP (GET /v1/activities on the broker's HTTP port)"
                ),
            });
            reply.name = "courier.trace.too-large".into();
            reply.payload = why.to_string().into();
        }
        outbox.deliver(&reply, usize::MAX);
    });
}

fn reload_manifest(shared: &Shared) -> Result<(), String> {
    let Some(path) = &shared.config.manifest_path else {
        return Err("no --manifest was given; nothing to reload".to_string());
    };
    let (manifest, modified) = load_manifest(path)?;
    *shared
        .manifest_modified
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = modified;
    let credentials: Vec<(ConnId, (courier_proto::Credentials, Option<String>))> = shared
        .credentials
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|(c, cred)| (*c, cred.clone()))
        .collect();
    let mut revoked = Vec::new();
    {
        let mut core = shared.core();
        for (conn, (cred, subject)) in credentials {
            let hello = courier_proto::Hello {
                version: PROTOCOL_VERSION,
                service: String::new(),
                instance: String::new(),
                max_in_flight: 0,
                credentials: cred,
            };
            let still = auth::authenticate(Some(&manifest), &hello, subject.as_deref());
            let current = core.connection_service(conn);
            let same = matches!((&still, &current), (Ok(a), Some(s)) if a.service == *s);
            if !same {
                revoked.push(conn);
            }
        }
        core.set_manifest(Some(manifest));
    }
    let outboxes = shared.outboxes();
    for conn in &revoked {
        if let Some(outbox) = outboxes.get(conn) {
            outbox.fail(
                ErrorCode::Unauthorized,
                "the reloaded manifest no longer accepts this connection's credentials".to_string(),
            );
        }
    }
    info!(path = %path.display(), revoked = revoked.len(), "manifest reloaded");
    Ok(())
}

/// Reloads the manifest on SIGHUP and when its file changes.
async fn watch_manifest(shared: Arc<Shared>) {
    /// How often the file's modification time is checked.
    const MANIFEST_POLL_MS: u64 = 1_000;
    let Some(path) = shared.config.manifest_path.clone() else {
        return;
    };
    #[cfg(unix)]
    let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            warn!(error = %e, "cannot listen for SIGHUP; the manifest reloads only when its file changes");
            None
        }
    };
    loop {
        #[cfg(unix)]
        let signalled = async {
            match hangup.as_mut() {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let signalled = std::future::pending::<()>();
        let forced = tokio::select! {
            _ = signalled => true,
            _ = tokio::time::sleep(Duration::from_millis(MANIFEST_POLL_MS)) => false,
        };
        let modified = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
        let known = *shared
            .manifest_modified
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if forced || (modified.is_some() && modified != known) {
            if let Err(e) = reload_manifest(&shared) {
                warn!("manifest reload refused, the previous manifest stays in force: {e}");
                *shared
                    .manifest_modified
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = modified;
            }
        }
    }
}

async fn run_timer(shared: Arc<Shared>) {
    /// Housekeeping (dedup and reply-route expiry, the periodic fsync of
    /// `--fsync interval:MS`) runs at least this often.
    const TICK_INTERVAL_MAX_MS: u64 = 100;
    let mut next_checkpoint = now_nanos() + shared.config.checkpoint_interval_ms * 1_000_000;
    loop {
        let now = now_nanos();
        let next = {
            let core = shared.core();
            core.next_timer()
        };
        let due = next
            .unwrap_or(u64::MAX)
            .min(now + TICK_INTERVAL_MAX_MS * 1_000_000);
        shared.timer_due.store(due, Ordering::Relaxed);
        let wait = Duration::from_nanos(due.saturating_sub(now));
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shared.timer_wake.notified() => {}
        }
        shared.with_core_deferred(|core, now| {
            core.tick(now);
            shared.resume_drained(core, now);
        });
        let due = shared.core().checkpoint_due();
        if due || now_nanos() >= next_checkpoint {
            next_checkpoint = now_nanos() + shared.config.checkpoint_interval_ms * 1_000_000;
            let handle = ServerHandle {
                shared: shared.clone(),
            };
            if let Err(e) = handle.checkpoint() {
                warn!(error = %e, "checkpoint failed; recovery will replay more of the log");
            }
        }
    }
}

/// The background scrub, on a thread of its own (it paces itself by
/// sleeping): passes over the sealed segments at the configured rate;
/// damage is reported once and counted. Ends when the server is gone.
fn run_scrub(shared: std::sync::Weak<Shared>, settings: ScrubSettings) {
    let mut scrubber = courier_store::Scrubber::new(&settings.log_dir, settings.bytes_per_sec);
    let interval = Duration::from_millis(settings.pass_interval_ms);
    loop {
        let started = std::time::Instant::now();
        let mut found = |damage: courier_store::Damage| {
            if let Some(shared) = shared.upgrade() {
                let mut core = shared.core();
                core.report_scrub_damage(damage.to_string());
                say_alerts(&mut core);
            }
        };
        let mut read = |bytes: u64| {
            if let Some(shared) = shared.upgrade() {
                shared.core().metrics_mut().scrub_bytes += bytes;
            }
        };
        let result = scrubber.pass(&mut found, &mut read);
        let Some(alive) = shared.upgrade() else {
            return;
        };
        match result {
            Ok(bytes) => {
                alive.core().metrics_mut().scrub_passes += 1;
                debug!(
                    bytes,
                    ms = started.elapsed().as_millis() as u64,
                    "scrub pass done"
                );
            }
            Err(e) => warn!(error = %e, "a scrub pass failed; the next one tries again"),
        }
        drop(alive);
        std::thread::sleep(interval.saturating_sub(started.elapsed()));
    }
}

/// Counts a connection as "in its handshake" until dropped.
struct HandshakeSlot<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for HandshakeSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One of [`ServerConfig::connections_max`] places, held by a connection
/// from accept to close; the `connections_open` gauge follows.
struct ConnectionSlot {
    shared: Arc<Shared>,
}

impl ConnectionSlot {
    fn take(shared: &Arc<Shared>) -> Option<ConnectionSlot> {
        let open = shared.connections.fetch_add(1, Ordering::Relaxed) + 1;
        if open > shared.config.connections_max {
            shared.connections.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        shared.core().metrics_mut().connections_open = open as u64;
        Some(ConnectionSlot {
            shared: shared.clone(),
        })
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let open = self.shared.connections.fetch_sub(1, Ordering::Relaxed) - 1;
        self.shared.core().metrics_mut().connections_open = open as u64;
    }
}

/// A connection over the cap: told so with an ERROR frame (plain TCP; a
/// TLS client could not read a plaintext frame, so it is only closed), and
/// closed. Said once a second at most, and at most `REFUSALS_MAX` are
/// being told at once: a flood must hold neither descriptors nor the log.
fn refuse_over_cap(shared: &Arc<Shared>, stream: TcpStream, peer: SocketAddr) {
    shared.core().metrics_mut().connections_over_cap += 1;
    let second = now_nanos() / 1_000_000_000;
    if shared.connections_warned_at.swap(second, Ordering::Relaxed) != second {
        warn!(%peer, max = shared.config.connections_max, "the broker holds its maximum of connections; refusing new ones (--connections-max)");
    }
    if shared.tls.is_some() {
        return;
    }
    if shared.refusals.fetch_add(1, Ordering::Relaxed) >= REFUSALS_MAX {
        shared.refusals.fetch_sub(1, Ordering::Relaxed);
        return;
    }
    let shared = shared.clone();
    let message = format!(
        "the broker holds its maximum of {} connections; retry later, or raise courier serve --connections-max (and the open-files limit)",
        shared.config.connections_max
    );
    tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + Duration::from_millis(REFUSAL_LINGER_MS);
        tell_and_close(stream, ErrorCode::TooManyConnections, message, deadline).await;
        shared.refusals.fetch_sub(1, Ordering::Relaxed);
    });
}

/// Writes one ERROR frame to a plain-TCP connection that has sent nothing
/// the broker will read, and closes it. What the client sends first (its
/// HELLO) is read and dropped — closing with unread bytes would reset the
/// connection before the client read the ERROR: the broker waits for it
/// until `deadline`, then takes what else is there and closes.
async fn tell_and_close(
    mut stream: TcpStream,
    code: ErrorCode,
    message: String,
    deadline: tokio::time::Instant,
) {
    /// What is read and discarded before closing.
    const DISCARD_BYTES_MAX: usize = 64 * 1024;
    let mut out = FrameWriter::new();
    let _ = out.push(&Frame::Error(ErrorFrame { code, message }));
    let mut scratch = vec![0u8; 4096];
    let mut discarded = 0;
    let written = tokio::time::timeout_at(deadline, stream.write_all(&out.take())).await;
    if !matches!(written, Ok(Ok(()))) || stream.shutdown().await.is_err() {
        return;
    }
    match tokio::time::timeout_at(deadline, stream.read(&mut scratch)).await {
        Ok(Ok(n)) if n > 0 => discarded += n,
        _ => return,
    }
    while discarded < DISCARD_BYTES_MAX {
        match stream.try_read(&mut scratch) {
            Ok(n) if n > 0 => discarded += n,
            _ => return,
        }
    }
}

async fn serve_connection(
    shared: Arc<Shared>,
    _place: ConnectionSlot,
    stream: TcpStream,
    peer: SocketAddr,
) {
    let slot = HandshakeSlot(&shared.handshakes);
    if shared.handshakes.fetch_add(1, Ordering::Relaxed) >= shared.config.handshakes_max {
        // Unauthenticated connections cost memory and a task each; past the
        // cap they are dropped before a byte is read. Said once a second at
        // most: a flood must not flood the log too.
        shared.core().metrics_mut().handshakes_refused += 1;
        let second = now_nanos() / 1_000_000_000;
        if shared.cap_warned_at.swap(second, Ordering::Relaxed) != second {
            warn!(%peer, max = shared.config.handshakes_max, "too many connections in their handshake; dropping new ones");
        }
        return;
    }
    // The TLS handshake and HELLO share one deadline.
    let deadline =
        tokio::time::Instant::now() + Duration::from_millis(shared.config.handshake_timeout_ms);
    let Some(acceptor) = shared.tls.clone() else {
        // Plain TCP keeps TcpStream's own owned halves: reader and writer
        // task never contend for a lock.
        let (reader, writer) = stream.into_split();
        serve_stream(
            &shared,
            slot,
            reader,
            writer,
            peer,
            None,
            deadline,
            Reads::Socket,
        )
        .await;
        return;
    };
    let Some(stream) = refuse_plaintext(&shared.config, stream, peer, deadline).await else {
        return;
    };
    let stream = match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
        Err(_) => {
            info!(%peer, "TLS handshake not finished within the handshake timeout; closing");
            return;
        }
        Ok(Err(e)) => {
            info!(%peer, error = %e, "TLS handshake failed");
            return;
        }
        Ok(Ok(stream)) => stream,
    };
    // rustls has verified the chain against --tls-client-ca by now.
    let subject = match stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
    {
        None => None,
        Some(leaf) => match tls::certificate_subject(leaf) {
            Ok(subject) => Some(subject),
            Err(e) => {
                info!(%peer, error = %e, "client certificate subject unreadable; closing");
                return;
            }
        },
    };
    // A TLS session is one state machine for both directions, so its halves
    // share a lock (`tokio::io::split`); only the TLS path pays for that.
    let (reader, writer) = tokio::io::split(stream);
    serve_stream(
        &shared,
        slot,
        reader,
        writer,
        peer,
        subject,
        deadline,
        Reads::Socket,
    )
    .await;
}

/// Room in each direction of an in-process connection's pipe before its
/// writer waits for the reader.
const IN_PROCESS_PIPE_BYTES: usize = 256 * 1024;

/// A bus connection from inside the broker's process (the HTTP gateway's):
/// an in-memory pipe whose far end is served as an accepted socket is —
/// handshake, authentication, manifest rules, limits and dedup are the
/// bus's own — without a trip through the kernel's loopback. It holds one
/// of the `connections_max` places, as any connection does.
pub(crate) fn connect_in_process(
    shared: &Arc<Shared>,
    peer: SocketAddr,
) -> std::io::Result<tokio::io::DuplexStream> {
    let Some(place) = ConnectionSlot::take(shared) else {
        shared.core().metrics_mut().connections_over_cap += 1;
        return Err(std::io::Error::other(format!(
            "the broker holds its maximum of {} connections; retry later, or raise courier serve --connections-max",
            shared.config.connections_max
        )));
    };
    let (ours, theirs) = tokio::io::duplex(IN_PROCESS_PIPE_BYTES);
    let shared = shared.clone();
    tokio::spawn(async move {
        let _place = place;
        shared.handshakes.fetch_add(1, Ordering::Relaxed);
        let slot = HandshakeSlot(&shared.handshakes);
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(shared.config.handshake_timeout_ms);
        let (reader, writer) = tokio::io::split(theirs);
        serve_stream(
            &shared,
            slot,
            reader,
            writer,
            peer,
            None,
            deadline,
            Reads::Gathered,
        )
        .await;
    });
    Ok(ours)
}

/// A TLS client starts with a handshake record (`0x16`). Anything else is
/// most likely a Courier client without TLS: it gets a plaintext ERROR
/// frame saying so (rather than TLS alert bytes it cannot read), and the
/// connection closes. `None` when the connection is done with.
async fn refuse_plaintext(
    config: &ServerConfig,
    stream: TcpStream,
    peer: SocketAddr,
    deadline: tokio::time::Instant,
) -> Option<TcpStream> {
    /// The first byte of every TLS handshake record.
    const TLS_HANDSHAKE: u8 = 0x16;
    let mut first = [0u8; 1];
    match tokio::time::timeout_at(deadline, stream.peek(&mut first)).await {
        Ok(Ok(1..)) if first[0] == TLS_HANDSHAKE => return Some(stream),
        Ok(Ok(1..)) => {}
        Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return None,
    }
    info!(%peer, "a client spoke plain TCP to the TLS listener; refusing");
    let message = format!(
        "this broker requires TLS on {}: connect with --tls-ca CA.pem (or COURIER_TLS_CA; ClientOptions::tls in the SDK)",
        config.listen
    );
    tell_and_close(stream, ErrorCode::HandshakeRequired, message, deadline).await;
    None
}

/// How a connection's reader takes what arrives.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Reads {
    /// As it comes: a socket's client batches its own writes, and a read
    /// costs a system call.
    Socket,
    /// Gathered: once bytes are there, the tasks already runnable go first
    /// and the read takes what they wrote too. An in-process client (the
    /// HTTP gateway) writes each of its callers' frames as that caller
    /// runs, one small write each; read one at a time they would cost a
    /// core lock and a write to each recipient apiece, where gathered they
    /// share one.
    Gathered,
}

/// Handshake and life of one connection over any byte stream.
#[allow(clippy::too_many_arguments)]
async fn serve_stream<R, W>(
    shared: &Shared,
    slot: HandshakeSlot<'_>,
    mut reader: R,
    writer: W,
    peer: SocketAddr,
    subject: Option<String>,
    deadline: tokio::time::Instant,
    reads: Reads,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let outbox = Outbox::new(
        shared.timer_wake.clone(),
        shared.config.pause_bytes / 4,
        shared.config.frame_bytes_max,
    );
    let writer_task = tokio::spawn(run_writer(writer, outbox.clone()));
    let mut buf = BytesMut::with_capacity(HANDSHAKE_READ_BYTES);
    let hello = match tokio::time::timeout_at(deadline, read_frame(&mut reader, &mut buf)).await {
        Err(_) => {
            shared.core().metrics_mut().handshakes_refused += 1;
            outbox.fail(
                ErrorCode::HandshakeTimeout,
                format!("no HELLO within {} ms", shared.config.handshake_timeout_ms),
            );
            close(&outbox, writer_task).await;
            return;
        }
        // Closed, or only the write side shut: a HELLO that has not
        // arrived by now never will. (`read_frame` sets no deadline.)
        Ok(Err(ReadError::Closed | ReadError::TimedOut(_))) => {
            close(&outbox, writer_task).await;
            return;
        }
        Ok(Err(ReadError::Decode(code, message))) => {
            shared.core().metrics_mut().frames_rejected += 1;
            shared.core().metrics_mut().handshakes_refused += 1;
            outbox.fail(code, message);
            close(&outbox, writer_task).await;
            return;
        }
        Ok(Ok(Frame::Hello(hello))) => hello,
        Ok(Ok(other)) => {
            shared.core().metrics_mut().handshakes_refused += 1;
            outbox.fail(
                ErrorCode::HandshakeRequired,
                format!("the first frame must be HELLO, not {}", frame_name(&other)),
            );
            close(&outbox, writer_task).await;
            return;
        }
    };
    if !(PROTOCOL_VERSION_MIN..=PROTOCOL_VERSION).contains(&hello.version) {
        shared.core().metrics_mut().handshakes_refused += 1;
        outbox.fail(
            ErrorCode::UnsupportedVersion,
            format!(
                "protocol version {} is not supported; this broker speaks versions {PROTOCOL_VERSION_MIN} to {PROTOCOL_VERSION}",
                hello.version
            ),
        );
        close(&outbox, writer_task).await;
        return;
    }
    // The version both ends speak: what the connection's frames are
    // written and read as from WELCOME on (a version-1 client never sees
    // flag 0x80, and sending it stays malformed).
    let version = hello.version.min(PROTOCOL_VERSION);
    outbox.lock().writer.set_version(version);
    let identity = {
        let core = shared.core();
        auth::authenticate(
            core.manifest().map(|m| m.as_ref()),
            &hello,
            subject.as_deref(),
        )
    };
    let identity = match identity {
        Ok(identity) => identity,
        Err((code, reason)) => {
            info!(%peer, %reason, "handshake refused");
            shared.core().metrics_mut().handshakes_refused += 1;
            outbox.fail(code, reason);
            close(&outbox, writer_task).await;
            return;
        }
    };
    drop(slot);
    let conn = shared.next_conn.fetch_add(1, Ordering::Relaxed);
    let instance = if hello.instance.is_empty() {
        format!("{}-{conn}", identity.service)
    } else {
        hello.instance.clone()
    };
    shared
        .credentials
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(conn, (hello.credentials.clone(), subject));
    shared.peers().insert(
        conn,
        console::Peer {
            addr: peer,
            connected_at: now_nanos(),
        },
    );
    shared.outboxes().insert(conn, outbox.clone());
    // WELCOME and the broker's first actions (parked replies) leave in
    // that order: both happen under the core lock.
    let mut refused = None;
    shared.with_core(|core, _now| {
        if let Err(reason) = core.may_connect(&identity.service) {
            refused = Some(reason);
            return;
        }
        outbox.push(&Frame::Welcome(Welcome {
            version,
            connection_id: conn,
            frame_bytes_max: shared.config.frame_bytes_max,
            broker: format!("courier {}", env!("CARGO_PKG_VERSION")),
            // A client that left the name to its credentials (or the admin,
            // whatever name it gave) learns it here; one whose name stands
            // gets the WELCOME it always got.
            service: (identity.service != hello.service).then(|| identity.service.clone()),
        }));
        if let Err(reason) = core.connect_as(
            conn,
            &identity.service,
            &instance,
            hello.max_in_flight,
            identity.admin,
        ) {
            refused = Some(reason);
        } else if version >= courier_proto::PIPELINED_KEYS_VERSION {
            core.set_pipelined_keys(conn, true);
        }
    });
    if let Some(reason) = refused {
        info!(%peer, %reason, "connection refused");
        shared.outboxes().remove(&conn);
        shared.peers().remove(&conn);
        shared
            .credentials
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&conn);
        outbox.fail(ErrorCode::TooManyConnections, reason);
        close(&outbox, writer_task).await;
        return;
    }
    debug!(conn, %peer, service = %identity.service, %instance, "connected");

    let end = read_loop(shared, conn, version, reads, &mut reader, &mut buf).await;
    match end {
        ReadError::Closed => debug!(conn, "disconnected"),
        ReadError::Decode(code, message) => {
            info!(conn, %peer, %code, %message, "closing connection after a bad frame");
            shared.core().metrics_mut().frames_rejected += 1;
            outbox.fail(code, message);
        }
        ReadError::TimedOut(timeout) => {
            let message = match timeout {
                Timeout::Frame => format!(
                    "a frame began more than {} ms ago and has not arrived whole; closing",
                    shared.config.frame_timeout_ms
                ),
                Timeout::Keepalive => format!(
                    "nothing arrived for {} ms; a client must send something (a PING will do) more often than that",
                    shared.config.keepalive_timeout_ms
                ),
            };
            info!(conn, %peer, %message, "closing connection");
            {
                let mut core = shared.core();
                let metrics = core.metrics_mut();
                match timeout {
                    Timeout::Frame => metrics.frame_timeouts += 1,
                    Timeout::Keepalive => metrics.keepalive_timeouts += 1,
                }
            }
            outbox.fail(ErrorCode::ReadTimeout, message);
        }
    }
    shared.with_core_deferred(|core, now| core.disconnect(conn, now));
    shared.outboxes().remove(&conn);
    outbox.gone.store(true, Ordering::Relaxed);
    shared
        .credentials
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&conn);
    shared.peers().remove(&conn);
    close(&outbox, writer_task).await;
}

/// Closes a connection: what its outbox still holds (an ERROR frame, say)
/// is written, then the socket is shut. A peer that does not read gets
/// `CLOSE_LINGER_MS`, then its writer is dropped, and the descriptor with it.
async fn close(outbox: &Outbox, mut writer_task: tokio::task::JoinHandle<()>) {
    outbox.lock().closing = true;
    outbox.wake.notify_one();
    let linger = Duration::from_millis(CLOSE_LINGER_MS);
    if tokio::time::timeout(linger, &mut writer_task)
        .await
        .is_err()
    {
        writer_task.abort();
    }
}

enum ReadError {
    Closed,
    Decode(ErrorCode, String),
    TimedOut(Timeout),
}

/// Which deadline a connection missed.
#[derive(Clone, Copy)]
enum Timeout {
    /// A frame began and did not arrive whole in time.
    Frame,
    /// Nothing arrived in time.
    Keepalive,
}

/// Largest HELLO accepted: its fields (two names of at most 255 bytes, a
/// token of at most 65 535) with room to spare. Until a connection is
/// authenticated it may make the broker buffer no more than this.
const HELLO_BYTES_MAX: u32 = 70 * 1024;
/// What an unauthenticated connection's reads are sized by.
const HANDSHAKE_READ_BYTES: usize = 4 * 1024;

/// Reads the first frame (HELLO) with the handshake's small limits.
async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
) -> Result<Frame, ReadError> {
    loop {
        match decode_frame(buf, HELLO_BYTES_MAX) {
            Ok(Some(frame)) => return Ok(frame),
            Ok(None) => {}
            Err(e) => return Err(ReadError::Decode(e.code(), e.to_string())),
        }
        buf.reserve(HANDSHAKE_READ_BYTES);
        match reader.read_buf(buf).await {
            Ok(0) | Err(_) => return Err(ReadError::Closed),
            Ok(_) => {}
        }
    }
}

async fn read_loop<R: AsyncRead + Unpin>(
    shared: &Shared,
    conn: ConnId,
    version: u16,
    reads: Reads,
    reader: &mut R,
    buf: &mut BytesMut,
) -> ReadError {
    let frame_timeout = Duration::from_millis(shared.config.frame_timeout_ms);
    let keepalive = Duration::from_millis(shared.config.keepalive_timeout_ms);
    let mut frames = Vec::new();
    // When bytes last arrived, and when the frame still incomplete in
    // `buf` began to (a monotonic clock: tokio's, so tests may pause it).
    let mut last_read = tokio::time::Instant::now();
    let mut partial_since: Option<tokio::time::Instant> = None;
    // One timer for the connection, moved only when a deadline comes
    // closer, and otherwise checked when it fires: resetting it per read
    // would cost a timer-wheel update per read.
    let timer = tokio::time::sleep_until(last_read + keepalive);
    tokio::pin!(timer);
    loop {
        let mut failure = None;
        loop {
            match decode_frame_as(buf, shared.config.frame_bytes_max, version) {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => break,
                Err(e) => {
                    failure = Some(ReadError::Decode(e.code(), e.to_string()));
                    break;
                }
            }
        }
        let decoded_any = !frames.is_empty();
        if decoded_any {
            shared
                .frames_in
                .fetch_add(frames.len() as u64, Ordering::Relaxed);
            // Everything decoded from this read is applied under one lock.
            shared.with_core_deferred(|core, now| {
                for frame in frames.drain(..) {
                    if let Err(refused) = apply(core, conn, frame, now) {
                        failure = Some(refused);
                        break;
                    }
                }
            });
            frames.clear();
        }
        if let Some(failure) = failure {
            return failure;
        }
        partial_since = match partial_since {
            _ if buf.is_empty() => None,
            // What is left began in the read that completed the frames.
            _ if decoded_any => Some(last_read),
            Some(since) => Some(since),
            None => Some(last_read),
        };
        let (deadline, missed) = match partial_since {
            Some(since) => (since + frame_timeout, Timeout::Frame),
            None => (last_read + keepalive, Timeout::Keepalive),
        };
        if deadline < timer.deadline() {
            timer.as_mut().reset(deadline);
        }
        buf.reserve(shared.config.read_buffer_bytes);
        loop {
            tokio::select! {
                biased;
                read = reader.read_buf(buf) => match read {
                    Ok(0) | Err(_) => return ReadError::Closed,
                    Ok(_) => {
                        last_read = tokio::time::Instant::now();
                        break;
                    }
                },
                () = &mut timer => {
                    if tokio::time::Instant::now() >= deadline {
                        return ReadError::TimedOut(missed);
                    }
                    timer.as_mut().reset(deadline);
                }
            }
        }
        if reads == Reads::Gathered {
            tokio::task::yield_now().await;
            // What the others wrote meanwhile; a close or an error is
            // read again, and answered, by the next wait.
            while buf.len() < buf.capacity() {
                match reader.read_buf(buf).now_or_never() {
                    Some(Ok(1..)) => {}
                    _ => break,
                }
            }
        }
    }
}

/// Applies one client frame; an error when the frame is not one a client
/// may send. The connection then closes with an ERROR, sent like one for a
/// malformed frame: after the answers to the frames before it.
fn apply(
    core: &mut Broker<Store>,
    conn: ConnId,
    frame: Frame,
    now: Nanos,
) -> Result<(), ReadError> {
    match frame {
        Frame::Send(entries) => {
            for entry in entries {
                if entry.quiet {
                    core.send_quiet(conn, entry.seq, entry.message, now);
                } else {
                    core.send(conn, entry.seq, entry.message, now);
                }
            }
        }
        Frame::Subscribe(s) => core.subscribe(
            conn,
            s.request,
            &s.pattern,
            s.ack_deadline_ms,
            s.max_deliveries,
            s.start,
            now,
        ),
        Frame::Unsubscribe { request, pattern } => core.unsubscribe(conn, request, &pattern),
        Frame::Ack(ids) => {
            for id in ids {
                core.ack(conn, id, now);
            }
        }
        Frame::Nack(entries) => {
            for n in entries {
                core.nack(conn, n.delivery, n.delay_ms, now);
            }
        }
        Frame::Flow { max_in_flight } => core.flow(conn, max_in_flight, now),
        Frame::Ping(nonce) => core.ping(conn, nonce),
        Frame::Pong(_) => {}
        Frame::Drain => core.drain(conn),
        other @ (Frame::Hello(_)
        | Frame::Welcome(_)
        | Frame::SendResult(_)
        | Frame::Result(_)
        | Frame::Deliver(_)
        | Frame::Error(_)
        | Frame::Drained) => {
            return Err(ReadError::Decode(
                ErrorCode::MalformedFrame,
                format!(
                    "{} is not a frame a client may send after the handshake",
                    frame_name(&other)
                ),
            ));
        }
    }
    Ok(())
}

fn frame_name(frame: &Frame) -> &'static str {
    match frame {
        Frame::Hello(_) => "HELLO",
        Frame::Welcome(_) => "WELCOME",
        Frame::Send(_) => "SEND",
        Frame::SendResult(_) => "SEND_RESULT",
        Frame::Subscribe(_) => "SUBSCRIBE",
        Frame::Unsubscribe { .. } => "UNSUBSCRIBE",
        Frame::Result(_) => "RESULT",
        Frame::Deliver(_) => "DELIVER",
        Frame::Ack(_) => "ACK",
        Frame::Nack(_) => "NACK",
        Frame::Flow { .. } => "FLOW",
        Frame::Ping(_) => "PING",
        Frame::Pong(_) => "PONG",
        Frame::Error(_) => "ERROR",
        Frame::Drain => "DRAIN",
        Frame::Drained => "DRAINED",
    }
}

async fn run_writer<W: AsyncWrite + Unpin>(mut writer: W, outbox: Arc<Outbox>) {
    loop {
        let (bytes, closing) = {
            let mut state = outbox.lock();
            let bytes = state.writer.take();
            state.writing = bytes.len();
            (bytes, state.closing)
        };
        // The flush is free on TCP; a TLS stream may still hold encrypted
        // bytes after `write_all` until flushed.
        if !bytes.is_empty()
            && (writer.write_all(&bytes).await.is_err() || writer.flush().await.is_err())
        {
            return;
        }
        let resume = {
            let mut state = outbox.lock();
            state.writing = 0;
            state.paused && state.writer.len() <= outbox.resume_below
        };
        if resume {
            outbox.timer_wake.notify_one();
        }
        if closing {
            let _ = writer.shutdown().await;
            return;
        }
        outbox.wake.notified().await;
    }
}
