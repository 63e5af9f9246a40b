//! The Courier SDK for Rust services.
//!
//! A service embeds one [`Client`]. It sends commands ([`Client::send`]),
//! publishes events ([`Client::publish`]), asks and awaits replies
//! ([`Client::request`], [`Client::request_stream`]), and handles the
//! commands and events it receives ([`Client::on`]). The client reconnects
//! by itself after a broker restart, subscribes again, and re-sends what
//! was not yet acknowledged (safe: the broker drops duplicates by id).
//!
//! ```
//! use courier_client::{Client, ClientOptions};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize)]
//! struct Todo { text: String }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # // A broker in this process, on a free port (normally: `courier serve`).
//! # let config = courier_server::ServerConfig { listen: "127.0.0.1:0".parse()?, ..Default::default() };
//! # let server = courier_server::Server::bind(config, Box::new(courier_store::MemoryStore::new())).await?;
//! # let url = server.local_addr()?.to_string();
//! # tokio::spawn(server.run());
//! // The todo service: handles todo.create and replies todo.created.
//! let todo = Client::connect(ClientOptions::new(&url, "todo")).await?;
//! todo.on("todo.create", |msg| async move {
//!     let new: Todo = msg.json()?;
//!     msg.reply("todo.created", &new).await?;
//!     Ok::<(), courier_client::Error>(())
//! }).await?;
//!
//! // The web service: asks and awaits the reply.
//! let web = Client::connect(ClientOptions::new(&url, "web")).await?;
//! let reply = web.request("todo.create", &Todo { text: "milk".into() }).await?;
//! assert_eq!(reply.name(), "todo.created");
//! let created: Todo = reply.json()?;
//! assert_eq!(created.text, "milk");
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

mod connection;
mod discovery;
mod error;
mod events;
mod handler;
#[cfg(feature = "otel")]
mod otel;
mod pending;
mod trace_context;

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use courier_proto::{
    delivery_frame_len, validate_name, validate_pattern, FrameWriter, Kind, Message, Version,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::{broadcast, mpsc, oneshot, watch, Notify};
use uuid::Uuid;

use pending::PendingSends;

pub use courier_proto::{self as proto, ErrorCode, StartFrom};
pub use courier_resilience::{
    self as resilience, Backoff, Balance, BreakerConfig, BreakerState, Idempotency, Policy,
    PolicySnapshot,
};
pub use discovery::{Discovery, Endpoint, Endpoints};
pub use error::{Error, Result};
pub use events::{ConnectionEvent, ConnectionEvents};
pub use handler::{BoxError, Incoming};
pub use trace_context::{TraceParent, TRACEPARENT};

use handler::Handler;

/// Bytes of quiet sends that may wait for the socket before
/// [`MessageBuilder::send_quiet`] waits for room.
pub const QUIET_BUFFER_BYTES_MAX: usize = 1024 * 1024;

tokio::task_local! {
    /// The message being handled on this task.
    static HANDLING: Handling;
}

/// What a message sent while handling another inherits from it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Handling {
    activity: Uuid,
    /// The handled message: the parent of everything sent now.
    message: Uuid,
    pub(crate) trace: TraceParent,
}

impl Handling {
    pub(crate) fn of(message: &Message) -> Handling {
        Handling {
            activity: message.activity_id,
            message: message.id,
            trace: TraceParent::of(message),
        }
    }

    /// Makes `message` a consequence of the handled one: same activity,
    /// the handled message as its parent, a child of its trace.
    pub(crate) fn mark(&self, message: &mut Message) {
        message.activity_id = self.activity;
        message.parent_id = Some(self.message);
        trace_context::set_traceparent(message, &self.trace.child(message.id));
        mark_current_span(message);
    }
}

/// With the `otel` feature, a message sent while an OpenTelemetry span is
/// current names that span as its sender in `traceparent` (a handler's
/// span, or the program's own, e.g. an HTTP request's).
fn mark_current_span(message: &mut Message) {
    #[cfg(feature = "otel")]
    if let Some(span) = otel::current() {
        trace_context::set_traceparent(message, &span);
    }
    #[cfg(not(feature = "otel"))]
    let _ = message;
}

/// The activity id a message sent now would carry: the one of the message
/// being handled, if this runs inside a handler.
pub fn current_activity() -> Option<Uuid> {
    HANDLING.try_with(|h| h.activity).ok()
}

/// The `parent_id` a message sent now would carry: the id of the message
/// being handled, if this runs inside a handler.
pub fn current_message() -> Option<Uuid> {
    HANDLING.try_with(|h| h.message).ok()
}

/// How to reach the broker and behave on the way.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// `host:port` of the broker.
    pub url: String,
    /// The service this client acts for. Empty: the one its token or
    /// client certificate belongs to (a broker with a manifest names it in
    /// WELCOME; see [`Client::service`]).
    pub service: String,
    /// This instance's name; the broker makes one up when empty.
    pub instance: String,
    /// Credentials for brokers that require them.
    pub token: Option<String>,
    /// `host:port` of the broker's HTTP port, where [`Client::discover`]
    /// looks services up. `None`: the host of `url` with port 7780 (what
    /// `courier serve --http` listens on by default).
    pub http: Option<String>,
    /// TLS to the broker; `None` is plain TCP.
    pub tls: Option<ClientTls>,
    /// Deliveries this instance handles at once (flow control).
    pub max_in_flight: u32,
    /// Replies of a [`Client::request_stream`] received and not yet taken
    /// by the application, at most (flow control of reply streams,
    /// PROTOCOL §8.8): the broker holds the rest back, and with them the
    /// responder. From 1 to 65 536.
    pub reply_window: u32,
    /// How long `send` waits for the broker's acknowledgement.
    pub send_timeout: Duration,
    /// How long `request` waits for a reply unless told otherwise.
    pub request_timeout: Duration,
    /// Ack deadline asked for this service's subscriptions; `None` keeps the broker's.
    pub ack_deadline: Option<Duration>,
    /// Deliveries of one message before it goes to the dead letters; `None` keeps the broker's.
    pub max_deliveries: Option<u32>,
    /// Retry delay when a handler returns an error.
    pub nack_delay: Duration,
    pub reconnect_delay_min: Duration,
    pub reconnect_delay_max: Duration,
    /// How long `shutdown` waits for running handlers.
    pub drain_timeout: Duration,
    /// Run handlers one at a time in delivery order, instead of each on its
    /// own task (up to `max_in_flight` at once).
    pub sequential: bool,
    /// `HOST:PORT` this instance serves on (its HTTP port, say), told to the
    /// broker on every (re)connect so the service registry, its lookups and
    /// its DNS name list it; `None` advertises nothing. See
    /// [`ClientOptions::advertise`].
    pub advertise: Option<String>,
}

impl ClientOptions {
    /// Options with defaults for everything but where and who.
    ///
    /// ```
    /// let opts = courier_client::ClientOptions::new("127.0.0.1:7700", "web");
    /// assert_eq!(opts.max_in_flight, 64);
    /// ```
    pub fn new(url: impl Into<String>, service: impl Into<String>) -> ClientOptions {
        ClientOptions {
            url: url.into(),
            service: service.into(),
            instance: String::new(),
            token: None,
            http: None,
            tls: None,
            max_in_flight: 64,
            reply_window: 64,
            send_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(30),
            ack_deadline: None,
            max_deliveries: None,
            nack_delay: Duration::from_secs(1),
            reconnect_delay_min: Duration::from_millis(50),
            reconnect_delay_max: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(30),
            sequential: false,
            advertise: None,
        }
    }

    /// Advertises where this instance serves, as `HOST:PORT` (e.g. the
    /// address its HTTP server listens on): the broker's registry then
    /// lists it with that address, and `NAME.service.courier` resolves to
    /// it. A host of `0.0.0.0` tells callers nothing; give the address
    /// they can reach.
    ///
    /// ```
    /// let opts = courier_client::ClientOptions::new("127.0.0.1:7700", "web")
    ///     .advertise("127.0.0.1:3000");
    /// assert_eq!(opts.advertise.as_deref(), Some("127.0.0.1:3000"));
    /// ```
    pub fn advertise(mut self, address: impl Into<String>) -> ClientOptions {
        self.advertise = Some(address.into());
        self
    }

    /// Reads what the `courier` CLI reads: `COURIER_URL` (default
    /// `127.0.0.1:7700`), `COURIER_TOKEN` when set, `COURIER_HTTP` (the
    /// HTTP port, for discovery) when set, and with
    /// `COURIER_TLS_CA` set, TLS trusting that CA, with the client
    /// certificate of `COURIER_TLS_CERT` and `COURIER_TLS_KEY` when both are
    /// set. The service is `COURIER_SERVICE`; without it, a token or a
    /// client certificate decides (the service stays empty and the broker
    /// takes it from the credentials), and without those it is `cli`.
    /// `COURIER_ADVERTISE` (`HOST:PORT`), when set, is the address
    /// advertised (see [`ClientOptions::advertise`]).
    pub fn from_env() -> ClientOptions {
        ClientOptions::from_vars(|name| std::env::var_os(name))
    }

    /// [`ClientOptions::from_env`] with the variables looked up by `var`.
    fn from_vars(var: impl Fn(&str) -> Option<std::ffi::OsString>) -> ClientOptions {
        let text = |name: &str| var(name).map(|v| v.to_string_lossy().into_owned());
        let url = text("COURIER_URL").unwrap_or_else(|| "127.0.0.1:7700".to_string());
        let token = text("COURIER_TOKEN");
        let cert = var("COURIER_TLS_CERT");
        let key = var("COURIER_TLS_KEY");
        let service = match text("COURIER_SERVICE") {
            Some(service) => service,
            None if token.is_some() || (cert.is_some() && key.is_some()) => String::new(),
            None => "cli".to_string(),
        };
        let mut opts = ClientOptions::new(url, service);
        opts.token = token;
        opts.http = text("COURIER_HTTP");
        opts.advertise = text("COURIER_ADVERTISE").filter(|a| !a.trim().is_empty());
        opts.tls = var("COURIER_TLS_CA").map(|ca| {
            let mut tls = ClientTls::new(ca);
            if let (Some(cert), Some(key)) = (cert, key) {
                tls.client_cert = Some((cert.into(), key.into()));
            }
            tls
        });
        opts
    }
}

/// TLS to the broker (rustls, TLS 1.3). PEM files are read at each
/// (re)connect, so renewed certificates are picked up without a restart.
///
/// ```
/// let mut opts = courier_client::ClientOptions::new("127.0.0.1:7700", "web");
/// opts.tls = Some(courier_client::ClientTls::new("certs/ca.pem")
///     .with_client_cert("certs/web.pem", "certs/web-key.pem"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTls {
    /// CA certificate(s) that sign the broker's certificate; the only ones
    /// trusted.
    pub ca: std::path::PathBuf,
    /// Client certificate chain and its private key, for brokers that
    /// authenticate by certificate (mTLS).
    pub client_cert: Option<(std::path::PathBuf, std::path::PathBuf)>,
    /// The name the broker's certificate must carry; by default the host of
    /// [`ClientOptions::url`].
    pub server_name: Option<String>,
}

impl ClientTls {
    /// Trusts the CA in `ca`; no client certificate.
    pub fn new(ca: impl Into<std::path::PathBuf>) -> ClientTls {
        ClientTls {
            ca: ca.into(),
            client_cert: None,
            server_name: None,
        }
    }

    /// Presents this client certificate (chain, leaf first) and key.
    pub fn with_client_cert(
        mut self,
        cert: impl Into<std::path::PathBuf>,
        key: impl Into<std::path::PathBuf>,
    ) -> ClientTls {
        self.client_cert = Some((cert.into(), key.into()));
        self
    }
}

/// The read half of a byte stream a [`Connector`] opens.
pub type BoxRead = Pin<Box<dyn tokio::io::AsyncRead + Send>>;
/// The write half of a byte stream a [`Connector`] opens.
pub type BoxWrite = Pin<Box<dyn tokio::io::AsyncWrite + Send>>;
/// What [`Connector`] returns: a new byte stream to the broker, or why not.
pub type Connecting = Pin<Box<dyn Future<Output = std::io::Result<(BoxRead, BoxWrite)>> + Send>>;

/// Opens byte streams to the broker other than a TCP socket: the broker's
/// own HTTP gateway, say, reaches its bus in memory. Called for the first
/// connection and for every reconnect; the protocol over the stream is
/// the same (HELLO, WELCOME, frames).
#[derive(Clone)]
pub struct Connector(Arc<dyn Fn() -> Connecting + Send + Sync>);

impl Connector {
    /// A connector that calls `open` for each connection.
    pub fn new(open: impl Fn() -> Connecting + Send + Sync + 'static) -> Connector {
        Connector(Arc::new(open))
    }
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Connector")
    }
}

struct PendingSend {
    message: Box<Message>,
    /// The broker's answer: the log seq it stored the message at (0: none).
    done: oneshot::Sender<Result<u64>>,
}

struct Subscription {
    pattern: String,
    /// Where the subscription starts when the broker does not know it yet.
    start: StartFrom,
    handler: Handler,
}

/// Replies buffered per request without flow control (`request`, which
/// takes the first); past it the rest of the stream is lost, and said so.
const REPLY_BUFFER_MAX: u32 = 1024;

pub(crate) struct State {
    writer: FrameWriter,
    /// The connection's socket for writes from the caller's thread (plain
    /// TCP only): a lone request is written straight away instead of
    /// waking a worker to write it, one thread hand-off less per round
    /// trip. Only while nothing is queued or being written (`writing`),
    /// so bytes still leave in order.
    direct: Option<std::net::TcpStream>,
    /// The write loop took bytes from `writer` and is writing them.
    writing: bool,
    /// Counts connections; deliveries from an older one can't be acked.
    generation: u64,
    connected: bool,
    frame_bytes_max: u32,
    next_seq: u64,
    pending_sends: PendingSends<PendingSend>,
    requests: HashMap<Uuid, Waiting>,
    /// Transient commands of [`MessageBuilder::request`], sent QUIET: the
    /// command's id by send seq, until its request ends. The broker answers
    /// only a refusal, which ends the request; so does a lost connection
    /// (transient is at most once: the command is not sent again).
    quiet_requests: HashMap<u64, Uuid>,
    subscriptions: Vec<Subscription>,
    next_op: u64,
    pending_ops: HashMap<u64, oneshot::Sender<Result<()>>>,
    drained: Option<oneshot::Sender<()>>,
    shut_down: bool,
    /// Flushes waiting for their PONG, by nonce, oldest first.
    flushes: VecDeque<(u64, oneshot::Sender<Result<()>>)>,
    next_flush: u64,
    /// Refusals of sends nobody awaits (see [`Client::unheard_refusals`]).
    unheard_refusals: u64,
    last_unheard_refusal: Option<(ErrorCode, String)>,
    /// Where [`ConnectionEvent`]s go; dropped when the driver stops, which
    /// ends every [`ConnectionEvents`].
    events: Option<broadcast::Sender<ConnectionEvent>>,
    /// Ordering keys of this connection's deliveries while any is out
    /// (protocol version 4 only): what hands them over one at a time.
    key_lines: HashMap<bytes::Bytes, handler::KeyLine>,
}

impl State {
    /// Tells every [`ConnectionEvents`] reader (none listening is fine).
    pub(crate) fn emit(&self, event: ConnectionEvent) {
        if let Some(events) = &self.events {
            let _ = events.send(event);
        }
    }
}

/// A request waiting for replies, by its command's id.
pub(crate) struct Waiting {
    /// Room for the buffer's replies plus one slot, kept for the error
    /// that ends the stream, so it always finds room.
    replies: mpsc::Sender<Result<Reply>>,
    /// Its key in [`State::quiet_requests`], when the command went QUIET.
    quiet_seq: Option<u64>,
    /// A flow-controlled stream (PROTOCOL §8.8): the broker sends no more
    /// than the buffer holds, and once under way (`received`) the stream
    /// ends with its connection.
    flow_controlled: bool,
    /// Replies that arrived.
    received: u64,
    /// Replies that found the buffer full. From the first one on, every
    /// later reply is counted here rather than buffered — the stream never
    /// skips a reply and goes on — and it ends with
    /// [`Error::RepliesLost`]. Only a broker without flow control (or a
    /// request without it) can make this happen.
    lost: u64,
}

pub(crate) struct Inner {
    opts: ClientOptions,
    /// Where connections come from when not TCP to `opts.url`.
    connector: Option<Connector>,
    /// The service the broker authenticated the first connection as
    /// (`opts.service`, or what WELCOME named when that was left empty).
    service: String,
    state: Mutex<State>,
    /// Something was written to `state.writer` (see [`Inner::wake_writer`]).
    writer_wake: Notify,
    /// Set with every write to `state.writer`; the write loop clears it
    /// when it looks.
    write_requested: AtomicBool,
    /// The driver task is handling frames it read. Its write loop is polled
    /// right after that, in the same poll, and looks at `write_requested`:
    /// a wake now would only make the running task reschedule itself, as a
    /// yield that also wakes an idle worker thread.
    reading: AtomicBool,
    /// The write loop handed `state.writer`'s bytes to the socket, or the
    /// connection ended: quiet senders waiting for room look again.
    writer_drained: Notify,
    /// The last running handler finished.
    handler_done: Notify,
    /// Handlers started and not finished; `shutdown` waits for zero.
    handlers_running: std::sync::atomic::AtomicUsize,
    /// `shutdown` waits for `handler_done`: only then does the last handler
    /// out notify it (a notify per delivery showed in profiles).
    awaiting_handlers: std::sync::atomic::AtomicBool,
    shutdown: watch::Sender<bool>,
    /// The queue of the one handler task, when handlers run sequentially.
    sequential: Option<mpsc::Sender<(Handler, Incoming)>>,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Tells the write loop that `state.writer` has bytes (call after the
    /// lock is released).
    ///
    /// SeqCst pairs with the driver's `reading` store: a caller that saw
    /// `reading` set stored `write_requested` before the driver cleared
    /// `reading`, so the write loop, which looks after that, sees it.
    pub(crate) fn wake_writer(&self) {
        self.write_requested.store(true, Ordering::SeqCst);
        if !self.reading.load(Ordering::SeqCst) {
            self.writer_wake.notify_one();
        }
    }
}

/// A connection to the broker on behalf of one service instance. Cheap to
/// clone; clones share the connection.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

/// Writes all `state.writer` holds to the socket from this thread, without
/// blocking: `true` if the socket took all of it. What it did not take goes
/// back to the writer, for the write loop (an error, too, is left to it).
fn write_direct(state: &mut State) -> bool {
    let Some(socket) = &state.direct else {
        return false;
    };
    let bytes = state.writer.take();
    // WouldBlock or a failure: the write loop takes it all, and meets the
    // failure itself.
    let written = std::io::Write::write(&mut &*socket, &bytes).unwrap_or_default();
    if written == bytes.len() {
        return true;
    }
    state.writer.push_unwritten(&bytes[written..]);
    false
}

/// An advertised address must be `HOST:PORT`, as the registry holds it.
fn check_advertised(address: &str) -> Result<()> {
    let port = address
        .rsplit_once(':')
        .map(|(host, port)| (host, port.parse::<u16>()));
    match port {
        Some((host, Ok(port))) if !host.is_empty() && port > 0 => Ok(()),
        _ => Err(Error::Options(format!(
            "advertised address {address:?} is not HOST:PORT (COURIER_ADVERTISE or ClientOptions::advertise); write for example 127.0.0.1:3000"
        ))),
    }
}

fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Unix nanoseconds `after` from now, saturating at the clock's end
/// rather than wrapping into the past.
fn nanos_from_now(after: Duration) -> u64 {
    now_nanos().saturating_add(u64::try_from(after.as_nanos()).unwrap_or(u64::MAX))
}

impl Client {
    /// Connects and completes the handshake. Fails at once if the broker
    /// cannot be reached; after that, the client reconnects by itself.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), courier_client::Error> {
    /// let client = courier_client::Client::connect(courier_client::ClientOptions::from_env()).await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect(opts: ClientOptions) -> Result<Client> {
        Client::connect_via(opts, None).await
    }

    /// Connects like [`Client::connect`], but over the byte streams
    /// `connector` opens instead of TCP to [`ClientOptions::url`] (which
    /// then only names the broker in errors; TLS options do not apply).
    pub async fn connect_with(opts: ClientOptions, connector: Connector) -> Result<Client> {
        Client::connect_via(opts, Some(connector)).await
    }

    async fn connect_via(opts: ClientOptions, connector: Option<Connector>) -> Result<Client> {
        if let Some(address) = &opts.advertise {
            check_advertised(address)?;
        }
        let first = connection::establish(&opts, connector.as_ref()).await?;
        let (shutdown, _) = watch::channel(false);
        let (sequential, sequential_rx) = if opts.sequential {
            let (tx, rx) = mpsc::channel(opts.max_in_flight.max(1) as usize * 2);
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let inner = Arc::new(Inner {
            sequential,
            state: Mutex::new(State {
                writer: FrameWriter::new(),
                direct: None,
                writing: false,
                generation: 0,
                connected: false,
                frame_bytes_max: first.frame_bytes_max,
                next_seq: 0,
                pending_sends: PendingSends::new(),
                requests: HashMap::new(),
                quiet_requests: HashMap::new(),
                subscriptions: Vec::new(),
                next_op: 0,
                pending_ops: HashMap::new(),
                drained: None,
                shut_down: false,
                flushes: VecDeque::new(),
                next_flush: 0,
                unheard_refusals: 0,
                last_unheard_refusal: None,
                events: Some(broadcast::channel(events::CONNECTION_EVENTS_MAX).0),
                key_lines: HashMap::new(),
            }),
            service: first.service.clone(),
            opts,
            connector,
            writer_wake: Notify::new(),
            write_requested: AtomicBool::new(false),
            reading: AtomicBool::new(false),
            writer_drained: Notify::new(),
            handler_done: Notify::new(),
            handlers_running: std::sync::atomic::AtomicUsize::new(0),
            awaiting_handlers: std::sync::atomic::AtomicBool::new(false),
            shutdown,
        });
        let mut first = first;
        connection::on_connected(&inner, &mut first);
        if let Some(mut rx) = sequential_rx {
            tokio::spawn(async move {
                while let Some((handler, incoming)) = rx.recv().await {
                    handler::run(handler, incoming).await;
                }
            });
        }
        tokio::spawn(connection::drive(inner.clone(), first));
        Ok(Client { inner })
    }

    /// The service this client acts for: [`ClientOptions::service`], or,
    /// when that was left empty for the token or client certificate to
    /// decide, the service the broker authenticated it as.
    pub fn service(&self) -> &str {
        &self.inner.service
    }

    /// Starts a command with options (key, headers, TTL …).
    ///
    /// ```no_run
    /// # async fn run(client: courier_client::Client) -> Result<(), courier_client::Error> {
    /// client.command("todo.create").key("user-1").json(&serde_json::json!({"text": "milk"}))?.send().await?;
    /// # Ok(()) }
    /// ```
    pub fn command(&self, name: impl Into<String>) -> MessageBuilder {
        MessageBuilder::new(self.clone(), Kind::Command, name.into())
    }

    /// Starts an event with options.
    pub fn event(&self, name: impl Into<String>) -> MessageBuilder {
        MessageBuilder::new(self.clone(), Kind::Event, name.into())
    }

    /// Sends a command with a JSON payload; returns its id once the broker
    /// accepted it (not once it was handled).
    ///
    /// ```no_run
    /// # async fn run(client: courier_client::Client) -> Result<(), courier_client::Error> {
    /// let id = client.send("todo.create", &serde_json::json!({"text": "milk"})).await?;
    /// # Ok(()) }
    /// ```
    pub async fn send<T: Serialize + ?Sized>(&self, name: &str, payload: &T) -> Result<Uuid> {
        self.command(name).json(payload)?.send().await
    }

    /// Publishes an event with a JSON payload.
    ///
    /// ```no_run
    /// # async fn run(client: courier_client::Client) -> Result<(), courier_client::Error> {
    /// client.publish("todo.created", &serde_json::json!({"id": 1})).await?;
    /// # Ok(()) }
    /// ```
    pub async fn publish<T: Serialize + ?Sized>(&self, name: &str, payload: &T) -> Result<Uuid> {
        self.event(name).json(payload)?.send().await
    }

    /// Sends a command and waits for its first reply (within
    /// [`ClientOptions::request_timeout`]).
    ///
    /// ```no_run
    /// # async fn run(client: courier_client::Client) -> Result<(), courier_client::Error> {
    /// let reply = client.request("todos.list", &()).await?;
    /// let todos: Vec<String> = reply.json()?;
    /// # Ok(()) }
    /// ```
    pub async fn request<T: Serialize + ?Sized>(&self, name: &str, payload: &T) -> Result<Reply> {
        self.command(name).json(payload)?.request().await
    }

    /// Sends a command and returns the stream of its replies, which ends
    /// after the final one.
    ///
    /// ```no_run
    /// # async fn run(client: courier_client::Client) -> Result<(), courier_client::Error> {
    /// let mut replies = client.request_stream("file.copy", &serde_json::json!({"from": "a"})).await?;
    /// while let Some(reply) = replies.next_reply().await {
    ///     let reply = reply?;
    ///     println!("{}: {}", reply.name(), String::from_utf8_lossy(reply.payload()));
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn request_stream<T: Serialize + ?Sized>(
        &self,
        name: &str,
        payload: &T,
    ) -> Result<ReplyStream> {
        self.command(name).json(payload)?.request_stream().await
    }

    /// Sends a message built by hand; the broker sets `timestamp` and `sender`.
    pub async fn send_message(&self, message: Message) -> Result<Uuid> {
        let id = message.id;
        self.submit(Box::new(message)).await?;
        Ok(id)
    }

    fn check(&self, message: &Message) -> Result<()> {
        validate_name(&message.name)?;
        let max = self.inner.lock().frame_bytes_max;
        self.check_size(message, max)
    }

    /// Refuses, before it is sent, a message the broker would refuse for
    /// its size: one whose DELIVER frame, with this service's name as its
    /// sender, would be longer than the broker's frame limit.
    fn check_size(&self, message: &Message, frame_bytes_max: u32) -> Result<()> {
        // The name the broker stamps: the authenticated service's.
        let len = delivery_frame_len(message) - message.sender.len() + self.inner.service.len();
        let max = frame_bytes_max as usize;
        if len > max {
            return Err(too_large(&message.name, len, max));
        }
        Ok(())
    }

    /// Queues `message` as a QUIET send (the broker answers only if it
    /// refuses it) if the socket's buffer has room: `Ok(None)` when more
    /// than [`QUIET_BUFFER_BYTES_MAX`] already wait, so a fast publisher
    /// can't grow memory.
    fn try_send_quiet(&self, message: &Message) -> Result<Option<Uuid>> {
        validate_name(&message.name)?;
        let mut state = self.inner.lock();
        if state.shut_down {
            return Err(Error::Shutdown);
        }
        if !state.connected {
            // At most once: nothing is kept to re-send after a reconnect,
            // so there is nothing to queue it for.
            return Err(Error::Closed(
                "not connected to the broker; a quiet send is not queued across reconnects".into(),
            ));
        }
        self.check_size(message, state.frame_bytes_max)?;
        if state.writer.len() >= QUIET_BUFFER_BYTES_MAX {
            return Ok(None);
        }
        state.next_seq += 1;
        let seq = state.next_seq;
        state.writer.push_quiet_send(seq, message)?;
        drop(state);
        self.inner.wake_writer();
        Ok(Some(message.id))
    }

    /// [`Client::try_send_quiet`], waiting for room as often as it takes.
    async fn send_quiet_when_room(&self, message: Box<Message>) -> Result<Uuid> {
        loop {
            let room = self.inner.writer_drained.notified();
            tokio::pin!(room);
            // Registered before looking again, so a drain between the look
            // and the wait is not missed.
            room.as_mut().enable();
            if let Some(id) = self.try_send_quiet(&message)? {
                return Ok(id);
            }
            self.inner.wake_writer();
            room.await;
        }
    }

    /// Resolves once the broker has answered everything this client sent
    /// before the call — accepted durable messages are on disk, refusals of
    /// quiet sends are counted in [`Client::unheard_refusals`] — by a PING
    /// that the broker answers behind those answers. The PING is queued at
    /// the call, so flushes can be pipelined like sends.
    pub fn flush(&self) -> impl Future<Output = Result<()>> + Send + 'static {
        let queued = {
            let mut state = self.inner.lock();
            if state.shut_down {
                Err(Error::Shutdown)
            } else if !state.connected {
                Err(Error::Closed("not connected to the broker".into()))
            } else {
                state.next_flush += 1;
                let nonce = state.next_flush;
                let (tx, rx) = oneshot::channel();
                state.flushes.push_back((nonce, tx));
                let _ = state.writer.push(&courier_proto::Frame::Ping(nonce));
                Ok(rx)
            }
        };
        self.inner.wake_writer();
        let timeout = self.inner.opts.send_timeout;
        async move {
            let rx = queued?;
            match tokio::time::timeout(timeout, rx).await {
                Ok(Ok(result)) => result,
                Ok(Err(_)) => Err(Error::Shutdown),
                Err(_) => Err(Error::Timeout(timeout)),
            }
        }
    }

    /// How many refusals came for sends nobody awaits: quiet sends
    /// ([`MessageBuilder::send_quiet`]), and sends whose wait timed out
    /// before the broker answered. Each is also logged as a warning.
    pub fn unheard_refusals(&self) -> u64 {
        self.inner.lock().unheard_refusals
    }

    /// The code and reason of the latest refusal counted in
    /// [`Client::unheard_refusals`].
    pub fn last_unheard_refusal(&self) -> Option<(ErrorCode, String)> {
        self.inner.lock().last_unheard_refusal.clone()
    }

    async fn submit(&self, message: Box<Message>) -> Result<Receipt> {
        self.enqueue(message)?.wait_receipt().await
    }

    /// Queues `message` for sending now, in call order, without waiting
    /// for the broker; await the returned [`PendingAck`] for its fate.
    fn enqueue(&self, message: Box<Message>) -> Result<PendingAck> {
        self.check(&message)?;
        let id = message.id;
        let reply = message.kind == Kind::Reply;
        let (done, rx) = oneshot::channel();
        let seq = {
            let mut state = self.inner.lock();
            if state.shut_down {
                return Err(Error::Shutdown);
            }
            state.next_seq += 1;
            let seq = state.next_seq;
            if state.connected {
                state.writer.push_send(seq, &message)?;
            }
            state
                .pending_sends
                .insert(seq, PendingSend { message, done });
            seq
        };
        self.inner.wake_writer();
        Ok(PendingAck {
            inner: self.inner.clone(),
            seq,
            id,
            reply,
            rx,
        })
    }

    async fn open_request(
        &self,
        mut message: Box<Message>,
        timeout: Duration,
        window: u32,
    ) -> Result<ReplyStream> {
        let window = window.clamp(1, proto::REPLY_WINDOW_MAX);
        set_reply_window(&mut message, window);
        let stream = self.start_request(message, timeout, Some(window))?;
        // On refusal `stream` is dropped, which forgets the request.
        let stream = stream.accepted().await?;
        Ok(stream)
    }

    /// Registers the request and queues the command; the stream still
    /// holds the broker's answer to the send, to be awaited.
    fn start_request(
        &self,
        message: Box<Message>,
        timeout: Duration,
        window: Option<u32>,
    ) -> Result<ReplyStream> {
        let id = message.id;
        let (waiting, mut stream) = ReplyStream::open(&self.inner, id, timeout, None, window);
        self.inner.lock().requests.insert(id, waiting);
        let ack = self.enqueue(message)?;
        stream.acceptance = Some(ack.rx);
        Ok(stream)
    }

    /// Registers the request and queues the command as a QUIET send
    /// (see [`State::quiet_requests`]); while disconnected, as
    /// [`Client::start_request`] does.
    fn start_quiet_request(
        &self,
        message: Box<Message>,
        timeout: Duration,
        window: Option<u32>,
    ) -> Result<ReplyStream> {
        validate_name(&message.name)?;
        let id = message.id;
        let mut state = self.inner.lock();
        if state.shut_down {
            return Err(Error::Shutdown);
        }
        if !state.connected {
            drop(state);
            return self.start_request(message, timeout, window);
        }
        self.check_size(&message, state.frame_bytes_max)?;
        // The only request, nothing else queued or being written, and the
        // driver not about to write anyway: the caller writes it.
        let lone = state.requests.is_empty()
            && state.writer.is_empty()
            && !state.writing
            && !self.inner.reading.load(Ordering::SeqCst);
        state.next_seq += 1;
        let seq = state.next_seq;
        state.writer.push_quiet_send(seq, &message)?;
        let (waiting, stream) = ReplyStream::open(&self.inner, id, timeout, Some(seq), window);
        state.requests.insert(id, waiting);
        state.quiet_requests.insert(seq, id);
        let written = lone && write_direct(&mut state);
        drop(state);
        if !written {
            self.inner.wake_writer();
        }
        Ok(stream)
    }

    /// Handles every command or event whose name matches `pattern` (`*` and
    /// `>` wildcards). The subscription belongs to the service: messages
    /// wait for it while no instance runs. The handler's `Ok` acks the
    /// delivery, its `Err` nacks it for a retry after
    /// [`ClientOptions::nack_delay`] — unless it settled it itself.
    ///
    /// A handler starts on the connection's reader and moves to a task of
    /// its own when it first has to wait, so one that finishes at once
    /// costs no task; put long CPU work in `tokio::task::spawn_blocking`,
    /// or it holds up the deliveries behind it.
    ///
    /// ```no_run
    /// # async fn run(client: courier_client::Client) -> Result<(), courier_client::Error> {
    /// client.on("todo.*", |msg| async move {
    ///     println!("{} from {}", msg.name(), msg.message().sender);
    ///     Ok::<(), courier_client::Error>(())
    /// }).await?;
    /// # Ok(()) }
    /// ```
    pub async fn on<F, Fut, E>(&self, pattern: &str, handler: F) -> Result<()>
    where
        F: Fn(Incoming) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<(), E>> + Send + 'static,
        E: Into<BoxError>,
    {
        self.on_from(pattern, StartFrom::New, handler).await
    }

    /// Like [`Client::on`], but a subscription the broker does not know
    /// yet starts at `start`: [`StartFrom::Beginning`] or
    /// [`StartFrom::Time`] first replays retained events (history).
    ///
    /// ```no_run
    /// # async fn run(client: courier_client::Client) -> Result<(), courier_client::Error> {
    /// use courier_client::StartFrom;
    /// client.on_from("todo.*", StartFrom::Beginning, |msg| async move {
    ///     println!("{}", msg.name());
    ///     Ok::<(), courier_client::Error>(())
    /// }).await?;
    /// # Ok(()) }
    /// ```
    pub async fn on_from<F, Fut, E>(
        &self,
        pattern: &str,
        start: StartFrom,
        handler: F,
    ) -> Result<()>
    where
        F: Fn(Incoming) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<(), E>> + Send + 'static,
        E: Into<BoxError>,
    {
        validate_pattern(pattern)?;
        let handler = handler::boxed(handler);
        let rx = {
            let mut state = self.inner.lock();
            state.subscriptions.retain(|s| s.pattern != pattern);
            state.subscriptions.push(Subscription {
                pattern: pattern.to_string(),
                start,
                handler,
            });
            if state.connected {
                Some(connection::push_subscribe(
                    &self.inner,
                    &mut state,
                    pattern,
                    start,
                ))
            } else {
                None
            }
        };
        self.inner.wake_writer();
        match rx {
            Some(rx) => self.await_op(rx).await,
            // Subscribed on the next connect.
            None => Ok(()),
        }
    }

    /// Removes the service's subscription to `pattern` (for every
    /// instance); messages waiting for it are discarded.
    pub async fn unsubscribe(&self, pattern: &str) -> Result<()> {
        let rx = {
            let mut state = self.inner.lock();
            state.subscriptions.retain(|s| s.pattern != pattern);
            state.next_op += 1;
            let request = state.next_op;
            let (tx, rx) = oneshot::channel();
            state.pending_ops.insert(request, tx);
            state.writer.push(&courier_proto::Frame::Unsubscribe {
                request,
                pattern: pattern.to_string(),
            })?;
            rx
        };
        self.inner.wake_writer();
        self.await_op(rx).await
    }

    async fn await_op(&self, rx: oneshot::Receiver<Result<()>>) -> Result<()> {
        let timeout = self.inner.opts.send_timeout;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(Error::Closed(
                "connection lost before the broker answered".into(),
            )),
            Err(_) => Err(Error::Timeout(timeout)),
        }
    }

    /// Stops taking deliveries, waits (up to
    /// [`ClientOptions::drain_timeout`]) for running handlers to finish and
    /// their acks to be written, then closes the connection.
    pub async fn shutdown(&self) {
        let drained = {
            let mut state = self.inner.lock();
            if state.shut_down {
                return;
            }
            state.shut_down = true;
            if state.connected {
                let (tx, rx) = oneshot::channel();
                state.drained = Some(tx);
                let _ = state.writer.push(&courier_proto::Frame::Drain);
                Some(rx)
            } else {
                None
            }
        };
        self.inner.wake_writer();
        let deadline = tokio::time::Instant::now() + self.inner.opts.drain_timeout;
        if let Some(rx) = drained {
            let _ = tokio::time::timeout_at(deadline, rx).await;
        }
        // SeqCst pairs with `handler::finish`: either it sees this flag and
        // notifies, or its decrement comes first and the load below sees it.
        self.inner
            .awaiting_handlers
            .store(true, std::sync::atomic::Ordering::SeqCst);
        loop {
            let notified = self.inner.handler_done.notified();
            if self
                .inner
                .handlers_running
                .load(std::sync::atomic::Ordering::SeqCst)
                == 0
            {
                break;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                tracing::warn!("handlers still running at the drain timeout; closing anyway");
                break;
            }
        }
        let _ = self.inner.shutdown.send(true);
        self.inner.wake_writer();
    }

    /// Whether a connection to the broker is up right now.
    pub fn is_connected(&self) -> bool {
        self.inner.lock().connected
    }

    /// The changes of the connection to the broker from now on: lost,
    /// reconnect attempts, restored (see [`ConnectionEvent`]). For telling
    /// a user that the bus is away rather than waiting silently; the client
    /// reconnects by itself whether anyone listens or not.
    pub fn connection_events(&self) -> ConnectionEvents {
        let rx = match &self.inner.lock().events {
            Some(events) => events.subscribe(),
            // Shut down: a stream that ends at once.
            None => broadcast::channel(1).1,
        };
        ConnectionEvents::new(rx)
    }
}

/// A message under construction; finish with `send`, `request` or
/// `request_stream`.
pub struct MessageBuilder {
    client: Client,
    /// Boxed: the builder is moved through every call of the chain and
    /// into the send's future, and a ~250-byte envelope copied at each
    /// step was a fifth of a fast publisher's time.
    message: Box<Message>,
    timeout: Option<Duration>,
    reply_window: Option<u32>,
}

impl MessageBuilder {
    fn new(client: Client, kind: Kind, name: String) -> MessageBuilder {
        let mut message = Box::new(Message::new(kind, name, Bytes::new()));
        match HANDLING.try_with(|h| *h) {
            Ok(handling) => handling.mark(&mut message),
            Err(_) => mark_current_span(&mut message),
        }
        MessageBuilder {
            client,
            message,
            timeout: None,
            reply_window: None,
        }
    }

    /// Serializes `payload` as JSON and sets `content-type`.
    pub fn json<T: Serialize + ?Sized>(mut self, payload: &T) -> Result<MessageBuilder> {
        self.message.payload = Bytes::from(serde_json::to_vec(payload)?);
        self.message.headers.retain(|(k, _)| k != "content-type");
        self.message
            .headers
            .push(("content-type".into(), "application/json".into()));
        Ok(self)
    }

    /// Raw payload bytes, in any encoding.
    pub fn payload(mut self, payload: impl Into<Bytes>) -> MessageBuilder {
        self.message.payload = payload.into();
        self
    }

    /// Ordering key: same key ⇒ delivered in order, one at a time per service.
    pub fn key(mut self, key: impl Into<Bytes>) -> MessageBuilder {
        self.message.key = Some(key.into());
        self
    }

    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> MessageBuilder {
        self.message.headers.push((name.into(), value.into()));
        self
    }

    pub fn version(mut self, version: Version) -> MessageBuilder {
        self.message.version = version;
        self
    }

    /// Dropped undelivered if not delivered within `ttl` (a `ttl` beyond
    /// the year 2554, the end of the envelope's nanosecond clock, means
    /// never).
    pub fn ttl(mut self, ttl: Duration) -> MessageBuilder {
        self.message.expires_at = Some(nanos_from_now(ttl));
        self
    }

    /// Not delivered before `delay` has passed.
    pub fn deliver_after(mut self, delay: Duration) -> MessageBuilder {
        self.message.deliver_at = Some(nanos_from_now(delay));
        self
    }

    /// Sets the message's id, the broker's dedup key: a message sent again
    /// with the same id within the broker's dedup window is accepted and
    /// dropped, so a retry after an unclear failure (a crash, a lost
    /// connection) cannot deliver twice. By default every message gets a
    /// fresh UUID v7. A message that starts its own activity names it
    /// after its id, so the activity follows the id here.
    ///
    /// ```no_run
    /// # async fn run(client: courier_client::Client) -> Result<(), courier_client::Error> {
    /// let id = uuid::Uuid::now_v7();
    /// client.command("payment.capture").id(id).send().await?;
    /// // Unsure whether that arrived? Sending it again is safe.
    /// client.command("payment.capture").id(id).send().await?;
    /// # Ok(()) }
    /// ```
    pub fn id(mut self, id: Uuid) -> MessageBuilder {
        if self.message.activity_id == self.message.id {
            self.message.activity_id = id;
        }
        self.message.id = id;
        self
    }

    /// At most once, in memory only: lowest latency, no redelivery.
    pub fn transient(mut self) -> MessageBuilder {
        self.message.transient = true;
        self
    }

    /// Belongs to this activity rather than the current one.
    pub fn activity(mut self, activity_id: Uuid) -> MessageBuilder {
        self.message.activity_id = activity_id;
        self
    }

    /// How long `request` waits for replies.
    pub fn timeout(mut self, timeout: Duration) -> MessageBuilder {
        self.timeout = Some(timeout);
        self
    }

    /// The message as it stands.
    pub fn message(&self) -> &Message {
        &self.message
    }

    /// Sends; resolves once the broker accepted it.
    pub async fn send(self) -> Result<Uuid> {
        Ok(self.client.submit(self.message).await?.id)
    }

    /// Sends like [`MessageBuilder::send`], and says where the broker's
    /// log holds the message.
    pub async fn send_receipt(self) -> Result<Receipt> {
        self.client.submit(self.message).await
    }

    /// Queues the message at once — messages queued one after another
    /// reach the broker in that order — and returns its acknowledgement to
    /// await later. For pipelining many sends without a round trip each.
    ///
    /// ```no_run
    /// # async fn run(client: courier_client::Client) -> Result<(), courier_client::Error> {
    /// let mut acks = Vec::new();
    /// for i in 0..100 {
    ///     acks.push(client.event("metric.sampled").json(&i)?.enqueue()?);
    /// }
    /// for ack in acks {
    ///     ack.wait().await?;
    /// }
    /// # Ok(()) }
    /// ```
    pub fn enqueue(self) -> Result<PendingAck> {
        self.client.enqueue(self.message)
    }

    /// Sends without asking for the broker's acceptance: returns once the
    /// message is queued for the socket, in call order with other sends.
    /// The broker answers only a refusal, which lands in
    /// [`Client::unheard_refusals`]; [`Client::flush`] waits until every
    /// earlier send was answered. Meant for transient messages (at most
    /// once): nothing is re-sent after a reconnect, and while disconnected
    /// it fails at once. The message is queued at the call when the socket
    /// is behind by at most [`QUIET_BUFFER_BYTES_MAX`] (the future is then
    /// ready at once); otherwise the future waits for room.
    ///
    /// ```no_run
    /// # async fn run(client: courier_client::Client) -> Result<(), courier_client::Error> {
    /// for i in 0..10_000 {
    ///     client.event("metric.sampled").json(&i)?.transient().send_quiet().await?;
    /// }
    /// client.flush().await?;
    /// assert_eq!(client.unheard_refusals(), 0);
    /// # Ok(()) }
    /// ```
    pub fn send_quiet(self) -> impl Future<Output = Result<Uuid>> + Send + 'static {
        // The usual case is settled here, so the future carries only the
        // outcome, not the envelope (nor a waiting future's state).
        let MessageBuilder {
            client, message, ..
        } = self;
        let outcome = match client.try_send_quiet(&message) {
            Ok(Some(id)) => QuietOutcome::Queued(Ok(id)),
            Err(e) => QuietOutcome::Queued(Err(e)),
            Ok(None) => QuietOutcome::NoRoom(client, message),
        };
        async move {
            match outcome {
                QuietOutcome::Queued(result) => result,
                QuietOutcome::NoRoom(client, message) => {
                    Box::pin(async move { client.send_quiet_when_room(message).await }).await
                }
            }
        }
    }

    /// Sends and waits for the first reply.
    pub async fn request(self) -> Result<Reply> {
        let timeout = self
            .timeout
            .unwrap_or(self.client.inner.opts.request_timeout);
        // A transient command goes QUIET: the broker's acceptance would
        // arrive well before the reply (it is written as the command is
        // routed), a second wake-up of the connection and of the caller
        // per request. Only a refusal is answered, into the stream.
        let mut stream = if self.message.transient {
            self.client
                .start_quiet_request(self.message, timeout, None)?
        } else {
            self.client.start_request(self.message, timeout, None)?
        };
        match stream.next_reply().await {
            Some(reply) => reply,
            None => Err(Error::Closed("reply stream ended without a reply".into())),
        }
    }

    /// How many replies of a `request_stream` may wait for the
    /// application at once; [`ClientOptions::reply_window`] otherwise.
    pub fn reply_window(mut self, replies: u32) -> MessageBuilder {
        self.reply_window = Some(replies);
        self
    }

    /// Sends and returns the stream of replies, flow-controlled (PROTOCOL
    /// §8.8): the client buffers at most the reply window of replies not
    /// yet taken, acknowledges each as the application takes it, and the
    /// broker holds the rest back — and with them the responder — so a
    /// long stream arrives whole and in order however slowly it is read.
    /// Dropping the stream before its final reply tells the broker to stop
    /// it. If the connection is lost once replies have arrived, the stream
    /// ends with [`Error::Closed`] (the broker ends it too); before the
    /// first reply, the request waits on across a reconnect, as `request`
    /// does.
    pub async fn request_stream(self) -> Result<ReplyStream> {
        let timeout = self
            .timeout
            .unwrap_or(self.client.inner.opts.request_timeout);
        let window = self
            .reply_window
            .unwrap_or(self.client.inner.opts.reply_window);
        self.client
            .open_request(self.message, timeout, window)
            .await
    }

    /// Like [`MessageBuilder::request_stream`] (flow-controlled), but
    /// returns at once without waiting for the broker's acceptance: a
    /// refusal is the stream's first item. A transient command goes QUIET,
    /// as with [`MessageBuilder::request`], so the broker answers the send
    /// only if it refuses it; a durable one is acknowledged as usual, and
    /// re-sent across a reconnect until it is. For a caller that awaits
    /// the replies anyway: one wake-up less per request.
    pub fn request_stream_now(self) -> Result<ReplyStream> {
        let timeout = self
            .timeout
            .unwrap_or(self.client.inner.opts.request_timeout);
        let window = self
            .reply_window
            .unwrap_or(self.client.inner.opts.reply_window)
            .clamp(1, proto::REPLY_WINDOW_MAX);
        let mut message = self.message;
        set_reply_window(&mut message, window);
        if message.transient {
            self.client
                .start_quiet_request(message, timeout, Some(window))
        } else {
            self.client.start_request(message, timeout, Some(window))
        }
    }
}

/// Asks the broker for a flow-controlled reply stream (PROTOCOL §8.8).
fn set_reply_window(message: &mut Message, window: u32) {
    message
        .headers
        .retain(|(name, _)| name != proto::REPLY_WINDOW_HEADER);
    message
        .headers
        .push((proto::REPLY_WINDOW_HEADER.into(), window.to_string()));
}

/// Where [`MessageBuilder::send_quiet`] stands once it was called.
enum QuietOutcome {
    Queued(Result<Uuid>),
    NoRoom(Client, Box<Message>),
}

fn too_large(name: &str, len: usize, max: usize) -> Error {
    Error::Refused {
        code: ErrorCode::PayloadTooLarge,
        reason: format!(
            "{name} would be delivered as a frame of {len} bytes, {} over the broker's frame limit of {max} (the broker adds this service's name as the sender); make the payload smaller",
            len - max
        ),
    }
}

/// The broker's answer to one queued message, to be awaited.
pub struct PendingAck {
    inner: Arc<Inner>,
    seq: u64,
    id: Uuid,
    /// A reply: its answer may wait for the requester's credit.
    reply: bool,
    rx: oneshot::Receiver<Result<u64>>,
}

/// What the broker's acceptance of a message says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Receipt {
    /// The message's id.
    pub id: Uuid,
    /// Where the broker's log holds it (its seq there): `None` for what
    /// the log does not keep (transient messages, replies, duplicates of
    /// an earlier send) and from brokers of protocol version 2 or older.
    pub seq: Option<u64>,
}

impl PendingAck {
    /// The message's id.
    pub fn id(&self) -> Uuid {
        self.id
    }

    /// Waits (up to [`ClientOptions::send_timeout`]) until the broker
    /// accepted or refused the message.
    ///
    /// A reply to a flow-controlled stream (PROTOCOL §8.8) is answered
    /// when it goes out to the requester, which may be much later: its
    /// wait has no time limit but the stream's (the broker refuses it when
    /// the request's reply route expires, and discards it with an answer
    /// when the requester stops reading or leaves). That wait is the
    /// back-pressure that paces a responder to its requester.
    pub async fn wait(self) -> Result<Uuid> {
        self.wait_receipt().await.map(|receipt| receipt.id)
    }

    /// [`PendingAck::wait`], and where the broker's log holds the message.
    pub async fn wait_receipt(self) -> Result<Receipt> {
        let id = self.id;
        let receipt = move |log_seq: u64| Receipt {
            id,
            seq: (log_seq != 0).then_some(log_seq),
        };
        if self.reply {
            return match self.rx.await {
                Ok(result) => result.map(receipt),
                Err(_) => Err(Error::Shutdown),
            };
        }
        let timeout = self.inner.opts.send_timeout;
        match tokio::time::timeout(timeout, self.rx).await {
            Ok(Ok(result)) => result.map(receipt),
            Ok(Err(_)) => Err(Error::Shutdown),
            Err(_) => {
                self.inner.lock().pending_sends.remove(self.seq);
                Err(Error::Timeout(timeout))
            }
        }
    }
}

/// One reply to a command.
#[derive(Debug, Clone)]
pub struct Reply {
    message: Arc<Message>,
    /// Its delivery id and the connection it came on: a flow-controlled
    /// stream acks it when the application takes it.
    pub(crate) delivery: u64,
    pub(crate) generation: u64,
}

impl Reply {
    /// The outcome, in domain language (`todo.created`).
    pub fn name(&self) -> &str {
        &self.message.name
    }

    /// No more replies follow.
    pub fn is_final(&self) -> bool {
        self.message.is_final
    }

    pub fn payload(&self) -> &Bytes {
        &self.message.payload
    }

    pub fn json<T: DeserializeOwned>(&self) -> Result<T> {
        Ok(serde_json::from_slice(&self.message.payload)?)
    }

    /// The whole envelope.
    pub fn message(&self) -> &Message {
        &self.message
    }
}

/// The replies to one command; ends after the final reply, or with
/// [`Error::Timeout`] when the requester's timeout passes first.
pub struct ReplyStream {
    inner: Arc<Inner>,
    command: Uuid,
    rx: mpsc::Receiver<Result<Reply>>,
    sleep: Pin<Box<tokio::time::Sleep>>,
    timeout: Duration,
    done: bool,
    /// The broker's answer to the command's send, until it came.
    acceptance: Option<oneshot::Receiver<Result<u64>>>,
    /// The command's send seq when it went QUIET (no acceptance comes).
    quiet_seq: Option<u64>,
    /// The final reply came.
    answered: bool,
    /// The window of a flow-controlled stream (PROTOCOL §8.8).
    window: Option<u32>,
    /// Replies the application took and the broker has not yet heard of,
    /// as `(generation, delivery)`: acked in a batch, half a window at a
    /// time, or at once when nothing more is buffered (the broker may be
    /// waiting for exactly that credit).
    to_ack: Vec<(u64, u64)>,
}

impl ReplyStream {
    /// A stream for the replies to `command`, and the entry under which
    /// the client's tables wait for them. With a `window`, the stream is
    /// flow-controlled and buffers that many replies; without, up to
    /// [`REPLY_BUFFER_MAX`].
    fn open(
        inner: &Arc<Inner>,
        command: Uuid,
        timeout: Duration,
        quiet_seq: Option<u64>,
        window: Option<u32>,
    ) -> (Waiting, ReplyStream) {
        // One slot more than the buffer: the error that ends a stream
        // always finds room (see `Waiting::replies`).
        let slots = window.unwrap_or(REPLY_BUFFER_MAX) as usize + 1;
        let (replies, rx) = mpsc::channel(slots);
        let stream = ReplyStream {
            inner: inner.clone(),
            command,
            rx,
            sleep: Box::pin(tokio::time::sleep(timeout)),
            timeout,
            done: false,
            acceptance: None,
            quiet_seq,
            answered: false,
            window,
            to_ack: Vec::new(),
        };
        let waiting = Waiting {
            replies,
            quiet_seq,
            flow_controlled: window.is_some(),
            received: 0,
            lost: 0,
        };
        (waiting, stream)
    }

    /// The id of the command these replies answer.
    pub fn command_id(&self) -> Uuid {
        self.command
    }

    /// Replies received and not yet taken by the application (and the
    /// error that ends the stream, once it came); a flow-controlled stream
    /// never buffers more replies than its reply window.
    pub fn buffered(&self) -> usize {
        self.rx.len()
    }

    /// The next reply, `None` after the final one.
    pub async fn next_reply(&mut self) -> Option<Result<Reply>> {
        std::future::poll_fn(|cx| self.poll_reply(cx)).await
    }

    /// Waits until the broker accepted the command (or refused it).
    async fn accepted(mut self) -> Result<ReplyStream> {
        if let Some(rx) = self.acceptance.take() {
            match tokio::time::timeout(self.timeout, rx).await {
                Ok(Ok(result)) => {
                    result?;
                }
                Ok(Err(_)) => return Err(Error::Shutdown),
                Err(_) => return Err(Error::Timeout(self.timeout)),
            }
        }
        Ok(self)
    }

    /// Tells the broker about the replies the application took: credit
    /// for as many more. Acks from an older connection are void (the
    /// broker ended that stream with it).
    fn send_acks(&mut self) {
        if self.to_ack.is_empty() {
            return;
        }
        let mut state = self.inner.lock();
        let (connected, generation) = (state.connected, state.generation);
        for (acked_on, delivery) in self.to_ack.drain(..) {
            if connected && acked_on == generation {
                state.writer.push_ack(delivery);
            }
        }
        drop(state);
        self.inner.wake_writer();
    }

    /// Where a stream whose buffer overflowed stands: the replies lost
    /// so far, if any.
    fn lost(&self) -> u64 {
        let state = self.inner.lock();
        state.requests.get(&self.command).map_or(0, |w| w.lost)
    }

    fn poll_reply(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Reply>>> {
        if self.done {
            return Poll::Ready(None);
        }
        if let Some(rx) = self.acceptance.as_mut() {
            match Pin::new(rx).poll(cx) {
                Poll::Ready(Ok(Ok(_))) => self.acceptance = None,
                Poll::Ready(Ok(Err(e))) => {
                    self.done = true;
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Ready(Err(_)) => {
                    self.done = true;
                    return Poll::Ready(Some(Err(Error::Shutdown)));
                }
                // No reply can come first: the broker answers the send in
                // the same batch that delivers the command.
                Poll::Pending => {}
            }
        }
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(Ok(reply))) => {
                if reply.is_final() {
                    self.done = true;
                    self.answered = true;
                } else if let Some(window) = self.window {
                    // The application has it now: credit for one more.
                    self.to_ack.push((reply.generation, reply.delivery));
                    if self.to_ack.len() >= (window as usize / 2).max(1) || self.rx.is_empty() {
                        self.send_acks();
                    }
                }
                Poll::Ready(Some(Ok(reply)))
            }
            Poll::Ready(Some(Err(e))) => {
                self.done = true;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                self.done = true;
                Poll::Ready(Some(Err(Error::Shutdown)))
            }
            Poll::Pending => {
                self.send_acks();
                match self.sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        self.done = true;
                        let lost = self.lost();
                        Poll::Ready(Some(Err(if lost > 0 {
                            Error::RepliesLost(lost)
                        } else {
                            Error::Timeout(self.timeout)
                        })))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

impl futures_core::Stream for ReplyStream {
    type Item = Result<Reply>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_reply(cx)
    }
}

impl Drop for ReplyStream {
    fn drop(&mut self) {
        if self.answered {
            // The final reply took the request out of the client's tables.
            return;
        }
        // A flow-controlled stream given up before its end: a NACK of one
        // of its replies that the broker has not seen acked tells it to
        // stop (and to tell the responder). With none at hand, the next
        // reply to arrive is NACKed instead (`connection::route_reply`).
        let mut unacked = self.to_ack.last().copied();
        if self.window.is_some() {
            while let Ok(item) = self.rx.try_recv() {
                if let Ok(reply) = item {
                    if !reply.is_final() {
                        unacked = Some((reply.generation, reply.delivery));
                    }
                }
            }
        }
        let mut state = self.inner.lock();
        state.requests.remove(&self.command);
        if let Some(seq) = self.quiet_seq {
            state.quiet_requests.remove(&seq);
        }
        let Some((generation, delivery)) = unacked else {
            return;
        };
        if state.connected && state.generation == generation {
            state.writer.push_nack(proto::Nack {
                delivery,
                delay_ms: 0,
            });
            drop(state);
            self.inner.wake_writer();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from(vars: &[(&str, &str)]) -> ClientOptions {
        ClientOptions::from_vars(|name| {
            vars.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| std::ffi::OsString::from(v))
        })
    }

    #[test]
    fn from_env_lets_credentials_decide_the_service_unless_it_is_named() {
        let plain = from(&[]);
        assert_eq!(
            (plain.url.as_str(), plain.service.as_str()),
            ("127.0.0.1:7700", "cli")
        );
        assert_eq!(plain.token, None);

        let token = from(&[("COURIER_TOKEN", "crr_x"), ("COURIER_URL", "h:1")]);
        assert_eq!(token.service, "", "the broker takes it from the token");
        assert_eq!(
            (token.url.as_str(), token.token.as_deref()),
            ("h:1", Some("crr_x"))
        );

        let named = from(&[("COURIER_TOKEN", "crr_x"), ("COURIER_SERVICE", "web")]);
        assert_eq!(named.service, "web");

        let cert = from(&[
            ("COURIER_TLS_CA", "ca.pem"),
            ("COURIER_TLS_CERT", "web.pem"),
            ("COURIER_TLS_KEY", "web-key.pem"),
        ]);
        assert_eq!(cert.service, "");
        let tls = cert.tls.expect("tls");
        assert_eq!(
            tls.client_cert,
            Some(("web.pem".into(), "web-key.pem".into()))
        );

        let ca_only = from(&[("COURIER_TLS_CA", "ca.pem")]);
        assert_eq!(ca_only.service, "cli", "a CA alone authenticates nobody");
    }

    #[test]
    fn the_advertised_address_comes_from_the_environment_and_must_be_host_port() {
        let opts = from(&[("COURIER_ADVERTISE", "127.0.0.1:3000")]);
        assert_eq!(opts.advertise.as_deref(), Some("127.0.0.1:3000"));
        assert_eq!(from(&[("COURIER_ADVERTISE", "")]).advertise, None);
        assert_eq!(from(&[]).advertise, None);
        assert!(check_advertised("127.0.0.1:3000").is_ok());
        assert!(check_advertised("[::1]:3000").is_ok());
        for bad in ["localhost", ":3000", "h:port", "h:0", "h:70000"] {
            let e = check_advertised(bad).expect_err(bad).to_string();
            assert!(
                e.contains("HOST:PORT") && e.contains("COURIER_ADVERTISE"),
                "{e}"
            );
        }
    }

    #[test]
    fn far_deadlines_saturate_instead_of_wrapping_into_the_past() {
        assert_eq!(nanos_from_now(Duration::MAX), u64::MAX);
        let soon = nanos_from_now(Duration::from_secs(1));
        assert!(soon > now_nanos() && soon < now_nanos() + 2_000_000_000);
    }
}
