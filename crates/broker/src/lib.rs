//! Courier's routing and delivery rules as a sans-I/O state machine.
//!
//! [`Broker`] is fed events — a connection said hello, sent messages,
//! acked a delivery, time passed — each with the current time, and answers
//! with [`Action`]s for the I/O layer to carry out. It opens no sockets,
//! reads no clock and spawns nothing, so every rule here is tested
//! deterministically, without sleeping.
//!
//! Architecture invariant: only `courier-server` turns actions into bytes
//! on sockets; this crate never blocks and never does network I/O.
#![forbid(unsafe_code)]

mod admin;
mod dedup;
mod durability;
mod expiring;
mod journal;
mod queue;
mod recovery;
mod refcount;
pub mod registry;
mod repeats;
pub mod stats;
mod streams;
mod tap;
mod trace;

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use courier_manifest::Manifest;
use courier_proto::{validate_name, validate_pattern, ErrorCode, Kind, Message};
use courier_store::{MessageStore, Seq};
use uuid::Uuid;

pub use admin::{dead_letter_json, ADVERTISE_COMMAND, SYSTEM_PREFIX};
use expiring::ExpiringMap;
pub use journal::JournalError;
use journal::Op;
pub use queue::DeadLetter;
use queue::{Entry, Queue};
pub use recovery::RecoveryReport;
use streams::{ReplyFate, Stream};
pub use streams::{REPLY_WINDOW_HEADER, REPLY_WINDOW_MAX};
pub use tap::{TailFilter, Tapped};
pub use trace::{
    ActivityFilter, Outcome, TraceQuery, TraceRecord, TraceSampler, ACTIVITIES_LIMIT_DEFAULT,
    ACTIVITIES_LIMIT_MAX, DEAD_LETTERED,
};

/// The maps touched for every message (here and in the server): keyed by
/// a fast hasher seeded at random per process (keys come from clients, so
/// not a fixed one).
pub type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Unix time in nanoseconds; the broker's only notion of time.
pub type Nanos = u64;
pub type ConnId = u64;
pub type DeliveryId = u64;

const NANOS_PER_MS: u64 = 1_000_000;
/// Why a delivery is retried after a NACK (dead letters and traces say it).
const NACKED: &str = "nacked";
/// Journal entries kept in memory while the disk fails; past this, the
/// oldest delivery bookkeeping is lost (counted), never messages.
const DEFERRED_JOURNAL_ENTRIES_MAX: usize = 1_000_000;

/// Tunables, each with a unit in its name.
#[derive(Debug, Clone)]
pub struct Config {
    /// How long a delivery may stay unacked before it goes to another instance.
    pub ack_deadline_ms: u32,
    /// Deliveries of one message before it goes to the dead letters.
    pub max_deliveries: u32,
    /// How long a message id is remembered for dedup.
    pub dedup_window_ms: u64,
    /// Most ids remembered for dedup; the oldest are forgotten first.
    pub dedup_ids_max: usize,
    /// How long the broker routes replies to a command after it was sent.
    pub reply_route_ms: u64,
    /// Most commands awaiting replies at once; the oldest routes are dropped.
    pub reply_routes_max: usize,
    /// Replies held per service while none of its instances is connected.
    pub parked_replies_max: usize,
    /// Bytes of replies held for flow-controlled streams (PROTOCOL §8.8),
    /// all streams together; past it a reply that would wait is refused
    /// (`stream_full`), so a slow requester cannot grow broker memory.
    pub held_reply_bytes_max: usize,
    /// In-flight deliveries per connection when HELLO asks for 0.
    pub max_in_flight_default: u32,
    /// A connection never gets more than this many deliveries in flight.
    pub max_in_flight_limit: u32,
    /// Events stay in the log at least this long, for `--from` replays,
    /// unless a rule in `retention_rules` matches them first.
    pub event_retention_ms: u64,
    /// Per name pattern retention of events; the first matching rule wins.
    pub retention_rules: Vec<RetentionRule>,
    /// Sends per second one service may make (all its instances together);
    /// bursts up to one second's worth. 0: no limit.
    pub send_rate_per_service: u32,
    /// The frame limit announced in WELCOME: no frame the broker sends is
    /// longer. A message is accepted only if its DELIVER frame fits
    /// (`courier_proto::delivery_frame_len` of the message as delivered).
    pub frame_bytes_max: u32,
    /// Connections one service may hold at once.
    pub connections_per_service_max: u32,
    /// Log written since the last snapshot before another is taken, so a
    /// restart after a crash replays at most about this much.
    pub checkpoint_log_bytes: u64,
    /// Distinct message names counted under their own name in the
    /// per-name metrics; traffic of names past it is counted as `_other`.
    pub metrics_names_max: usize,
    /// Above this many bytes of log, retained history is given up at the
    /// next checkpoint (all of it that no service is still owed, and that
    /// the snapshot covers), whatever its age. 0: no cap.
    pub retention_bytes_max: u64,
}

/// How long, and how much of, the events named by `pattern` are kept for
/// history replays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetentionRule {
    pub pattern: String,
    pub max_age_ms: u64,
    /// 0: no size limit. Only the newest events of this rule, up to this
    /// many payload bytes, are replayed.
    pub max_bytes: u64,
}

impl Config {
    /// The retention that applies to events named `name`: (max age in ns,
    /// max bytes or 0, rule index or `None` for the default).
    pub fn retention_for(&self, name: &str) -> (Nanos, u64, Option<usize>) {
        let rule = self
            .retention_rules
            .iter()
            .enumerate()
            .find(|(_, r)| courier_proto::pattern_matches(&r.pattern, name));
        match rule {
            Some((i, r)) => (r.max_age_ms * NANOS_PER_MS, r.max_bytes, Some(i)),
            None => (self.event_retention_ms * NANOS_PER_MS, 0, None),
        }
    }

    /// The longest age any event is kept (what the log must keep).
    pub fn longest_retention(&self) -> Nanos {
        self.retention_rules
            .iter()
            .map(|r| r.max_age_ms)
            .chain(std::iter::once(self.event_retention_ms))
            .max()
            .unwrap_or(0)
            * NANOS_PER_MS
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            ack_deadline_ms: 30_000,
            max_deliveries: 5,
            dedup_window_ms: 120_000,
            dedup_ids_max: 1_000_000,
            reply_route_ms: 600_000,
            reply_routes_max: 1_000_000,
            parked_replies_max: 10_000,
            held_reply_bytes_max: 64 * 1024 * 1024,
            max_in_flight_default: 256,
            max_in_flight_limit: 65_536,
            event_retention_ms: 24 * 3600 * 1000,
            retention_rules: Vec::new(),
            retention_bytes_max: 0,
            send_rate_per_service: 1_000_000,
            frame_bytes_max: courier_proto::FRAME_BYTES_MAX_DEFAULT,
            connections_per_service_max: 1024,
            checkpoint_log_bytes: 128 * 1024 * 1024,
            metrics_names_max: 10_000,
        }
    }
}

/// The services a message goes to, in name order; shared by the route cache.
type Receivers = Arc<[String]>;

/// Distinct message names whose routes are cached; past it the cache
/// starts over (names are the senders' to choose).
const ROUTE_CACHE_NAMES_MAX: usize = 10_000;

/// What the I/O layer must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Deliver {
        conn: ConnId,
        delivery: DeliveryId,
        attempt: u32,
        message: Arc<Message>,
    },
    SendResult {
        conn: ConnId,
        seq: u64,
        code: ErrorCode,
        reason: String,
        /// Where the log holds the accepted message; 0: it holds none.
        log_seq: Seq,
    },
    OpResult {
        conn: ConnId,
        request: u64,
        code: ErrorCode,
        reason: String,
    },
    /// No delivery follows for this connection.
    Drained { conn: ConnId },
    /// The answer to a PING: it follows every answer to what the
    /// connection sent before the PING, so a client's flush can wait on it.
    Pong { conn: ConnId, nonce: u64 },
    /// An admin asked to tail the bus (`courier.tail`): the network edge
    /// sends it what [`Broker::take_taps`] yields, filtered, as replies to
    /// `request`, for as long as the connection lives.
    StartTail {
        conn: ConnId,
        request: Uuid,
        activity_id: Uuid,
        filter: TailFilter,
    },
    /// An admin asked about the activity traces (`courier.trace.get`,
    /// `courier.trace.find`): the network edge, which keeps them, answers
    /// `request` with one final reply.
    TraceQuery {
        conn: ConnId,
        request: Uuid,
        activity_id: Uuid,
        query: TraceQuery,
    },
    /// The broker gave up on the connection: the edge sends ERROR `code`
    /// with `reason` after what is queued for it, and closes it. The core
    /// has already taken back everything it held.
    Close {
        conn: ConnId,
        code: ErrorCode,
        reason: String,
    },
}

/// Counters for `/metrics` and tests; they only ever go up.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metrics {
    pub accepted: u64,
    pub refused: u64,
    pub duplicates: u64,
    pub delivered: u64,
    pub redelivered: u64,
    pub acked: u64,
    pub nacked: u64,
    pub dead_lettered: u64,
    pub expired: u64,
    /// Events (and transient messages) nobody was there to take.
    pub dropped_unrouted: u64,
    /// Transient messages dropped because every instance that would take
    /// them was paused (not reading its deliveries): at most once means
    /// they are not kept for it. Not counted in `dropped_unrouted`.
    pub transient_dropped_paused: u64,
    pub replies_parked: u64,
    pub replies_dropped: u64,
    /// Replies of flow-controlled streams that waited for the requester's
    /// credit.
    pub replies_held: u64,
    /// Replies accepted and dropped because their requester had stopped
    /// reading the stream or disconnected (each sender was told).
    pub replies_discarded: u64,
    /// Sends and subscriptions the manifest did not allow.
    pub unauthorized: u64,
    /// Sends refused because their service was over its send rate.
    pub rate_limited: u64,
    /// Connections refused because their service had too many.
    pub connections_refused: u64,
    /// Syncs that failed (disk full, I/O error); each rebuilt the state.
    pub storage_failures: u64,
    /// Stored messages that could not be read back (checksum, I/O).
    pub unreadable_messages: u64,
    /// Journal entries dropped while the disk failed for too long.
    pub journal_entries_dropped: u64,
    /// Counted by the network edge: malformed or oversized frames (each
    /// closed its connection), refused handshakes, and connections cut off
    /// for not reading (slow consumers).
    pub frames_rejected: u64,
    pub handshakes_refused: u64,
    pub slow_consumers_cut: u64,
    /// Times a receiver was paused because it did not read its deliveries.
    pub receivers_paused: u64,
    /// Receivers that asked for more deliveries in flight than the limit.
    pub in_flight_requests_lowered: u64,
    /// Counted by the network edge: connections closed because a frame
    /// they had begun did not arrive whole within the frame deadline, or
    /// because nothing arrived within the keepalive deadline.
    pub frame_timeouts: u64,
    pub keepalive_timeouts: u64,
    /// Connections refused because the broker held its maximum.
    pub connections_over_cap: u64,
    /// Connections open now (a gauge kept by the network edge), in their
    /// handshake or established.
    pub connections_open: u64,
    /// Records the store found gone at start-up although they had been
    /// durable (`docs/STORAGE.md` §8.7), and the queue entries that named
    /// them, moved to dead letters.
    pub records_lost: u64,
    pub messages_lost: u64,
    /// Damage warnings held back as repeats of one already said (the
    /// summary line says how many).
    pub damage_warnings_repeated: u64,
    /// Counted by the network edge's background scrub: bytes of sealed
    /// segments checked, passes finished, damaged ranges found.
    pub scrub_bytes: u64,
    pub scrub_passes: u64,
    pub scrub_damage_found: u64,
}

pub use courier_proto::StartFrom;

/// A subscription a service holds, as reported by [`Broker::services`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceInfo {
    pub name: String,
    pub patterns: Vec<String>,
    /// Of `patterns`, those paused by an operator.
    pub paused: Vec<String>,
    pub instances: Vec<String>,
    pub depth: usize,
    pub in_flight: usize,
    pub dead_letters: usize,
}

/// One service's subscription as `/metrics` and the console show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionGauges {
    pub service: String,
    pub patterns: Vec<String>,
    /// Of `patterns`, those paused by an operator.
    pub paused: Vec<String>,
    /// Messages waiting for the service in any state (ready, deferred, in
    /// flight, behind a busy key); dead letters are not counted.
    pub backlog: usize,
    /// Payload bytes of those messages.
    pub backlog_bytes: u64,
    pub in_flight: usize,
    /// Connected instances that consume (not those that only send).
    pub consumers: usize,
    /// Of those, paused because they do not read their deliveries.
    pub consumers_paused: usize,
    pub dead_letters: usize,
    /// How long ago the oldest message the service still owes an ack for
    /// was accepted (ns); `None` when it owes none (or it is unreadable).
    pub oldest_unacked_age: Option<Nanos>,
    oldest_seq: Option<Seq>,
}

/// One connection as the console shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceInfo {
    pub conn: ConnId,
    pub service: String,
    pub instance: String,
    pub in_flight: u32,
    pub max_in_flight: u32,
    /// Patterns it consumes; empty when it only sends.
    pub patterns: Vec<String>,
    /// It asked for no more deliveries (graceful shutdown).
    pub draining: bool,
    /// Paused by back-pressure: it does not read its deliveries.
    pub paused: bool,
}

/// Why a subscription could not be paused or resumed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PauseError {
    #[error("service {0} has no subscriptions")]
    UnknownService(String),
    #[error("service {service} is not subscribed to {pattern}; its subscriptions: {subscribed}")]
    NotSubscribed {
        service: String,
        pattern: String,
        subscribed: String,
    },
    #[error(
        "the broker's disk is failing; a pause or resume cannot be made durable now — retry later"
    )]
    StorageFailing,
}

struct Conn {
    /// Shared: every message the connection sends is stamped with it by
    /// reference count, not copied.
    service: courier_proto::SharedStr,
    /// Authenticated as the manifest's admin role.
    admin: bool,
    /// Shared like `service`: trace records name it by reference count.
    instance: courier_proto::SharedStr,
    max_in_flight: u32,
    in_flight: u32,
    /// Patterns this connection consumes; empty means it only sends.
    patterns: Vec<String>,
    draining: bool,
    /// Its outbox is full (it does not read): no deliveries until resumed.
    paused: bool,
    /// Its service's (the same `Arc`).
    send_bucket: Arc<SendBucket>,
    /// Commands it sent whose replies are a flow-controlled stream.
    streams: std::collections::HashSet<Uuid, foldhash::fast::RandomState>,
    /// It takes a key's messages pipelined (protocol version 4).
    pipelined_keys: bool,
}

/// A service's send-rate token bucket, held by each of its connections
/// too: a send takes its token without looking its service up by name
/// (that lookup was ~6 % of the broker's samples at 16 B). Atomic only
/// because the broker must be `Send`; it is used under the broker's one
/// lock, so `Relaxed` is enough.
struct SendBucket {
    /// Tokens left, in billionths of a token: a nanosecond at `rate` adds
    /// `rate` of them, so refilling is integer arithmetic, exact, without a
    /// division.
    nano_tokens: AtomicU64,
    /// When last refilled (unix ns).
    refilled_at: AtomicU64,
}

const NANO_TOKENS_PER_TOKEN: u64 = 1_000_000_000;

impl SendBucket {
    /// Full: a new service may send a second's worth at once.
    fn new(rate: u32) -> Arc<SendBucket> {
        Arc::new(SendBucket {
            nano_tokens: AtomicU64::new(SendBucket::capacity(rate)),
            refilled_at: AtomicU64::new(0),
        })
    }

    /// A second's worth of sends (fits: `u32::MAX` · 10⁹ < `u64::MAX`).
    fn capacity(rate: u32) -> u64 {
        u64::from(rate) * NANO_TOKENS_PER_TOKEN
    }

    /// Refills for the time passed and takes one token.
    fn take(&self, rate: u32, now: Nanos) -> bool {
        let elapsed_ns = now.saturating_sub(self.refilled_at.load(Ordering::Relaxed));
        let tokens = self
            .nano_tokens
            .load(Ordering::Relaxed)
            .saturating_add(elapsed_ns.saturating_mul(u64::from(rate)))
            .min(SendBucket::capacity(rate));
        self.refilled_at.store(now, Ordering::Relaxed);
        let taken = tokens >= NANO_TOKENS_PER_TOKEN;
        let left = if taken {
            tokens - NANO_TOKENS_PER_TOKEN
        } else {
            tokens
        };
        self.nano_tokens.store(left, Ordering::Relaxed);
        taken
    }
}

impl Conn {
    fn wants(&self, name: &str) -> bool {
        !self.draining
            && self
                .patterns
                .iter()
                .any(|p| courier_proto::pattern_matches(p, name))
    }
}

struct Service {
    patterns: BTreeSet<String>,
    /// Patterns an operator paused (a subset of `patterns`): messages
    /// only they match wait in the queue until resumed.
    paused: BTreeSet<String>,
    ack_deadline_ms: u32,
    max_deliveries: u32,
    /// Connected instances, in connection order.
    instances: Vec<ConnId>,
    /// Round-robin cursor into `instances`.
    next_instance: usize,
    queue: Queue,
    parked_replies: VecDeque<Arc<Message>>,
    /// The send rate's token bucket (its connections hold it too).
    send_bucket: Arc<SendBucket>,
}

impl Service {
    fn new(config: &Config) -> Service {
        Service {
            patterns: BTreeSet::new(),
            paused: BTreeSet::new(),
            ack_deadline_ms: config.ack_deadline_ms,
            max_deliveries: config.max_deliveries,
            instances: Vec::new(),
            next_instance: 0,
            queue: Queue::default(),
            parked_replies: VecDeque::new(),
            send_bucket: SendBucket::new(config.send_rate_per_service),
        }
    }

    fn receives(&self, name: &str) -> bool {
        self.patterns
            .iter()
            .any(|p| courier_proto::pattern_matches(p, name))
    }

    /// Every subscription is paused: nothing is delivered at all.
    fn is_paused(&self) -> bool {
        !self.paused.is_empty() && self.paused.len() == self.patterns.len()
    }

    /// Whether `name` matches a subscription that is not paused.
    fn takes_now(&self, name: &str) -> bool {
        self.patterns
            .iter()
            .any(|p| !self.paused.contains(p) && courier_proto::pattern_matches(p, name))
    }

    /// Whether it can be forgotten: nothing subscribed, nobody connected.
    fn is_idle(&self) -> bool {
        self.patterns.is_empty()
            && self.instances.is_empty()
            && self.queue.depth() == 0
            && self.parked_replies.is_empty()
    }
}

struct ReplyRoute {
    service: String,
    conn: ConnId,
    /// Services the command went to: only they may reply to it.
    receivers: Vec<String>,
    /// Where the command's name is counted, and when it was accepted: for
    /// the outcome counts and the latency to its final reply. Routes
    /// loaded from a snapshot have neither ([`stats::Slot::MAX`], 0).
    command: stats::Slot,
    accepted_at: Nanos,
    /// Set when the requester asked for flow control (PROTOCOL §8.8).
    stream: Option<Box<Stream>>,
}

/// Which instance a message should go to.
enum Pick {
    Conn(ConnId),
    /// Instances take this name, but none has room now.
    AllBusy,
    /// No connected instance consumes this name.
    NoneMatching,
}

/// The broker's whole routing and delivery state.
pub struct Broker<S: MessageStore> {
    config: Config,
    store: S,
    conns: FastMap<ConnId, Conn>,
    services: FastMap<String, Service>,
    /// References per stored message: services that still owe an ack (or
    /// hold it as a dead letter). Ordered, so the oldest live seq is cheap.
    refs: refcount::RefCounts,
    /// Ids of accepted messages within the dedup window.
    /// Kept as [`dedup::fingerprint`]s, in buckets by the ids' timestamps.
    dedup: dedup::DedupWindow,
    /// Name → (major version, receiving services); see `receivers`.
    route_cache: FastMap<String, Vec<(u16, Receivers)>>,
    /// Command id → where its replies go.
    reply_routes: ExpiringMap<Uuid, ReplyRoute>,
    /// Replies of flow-controlled streams delivered and not yet acked →
    /// their command.
    reply_deliveries: FastMap<DeliveryId, Uuid>,
    /// Bytes of replies held for credit, all streams together.
    held_reply_bytes: usize,
    next_delivery: DeliveryId,
    /// Actions held until the store's next sync: acknowledgements of
    /// durable sends must not leave before the data is durable.
    unsynced: Vec<Action>,
    actions: Vec<Action>,
    metrics: Metrics,
    /// Something was appended or journaled since the last sync.
    dirty: bool,
    /// The latest time an input carried.
    now: Nanos,
    /// Things an operator must hear about (corruption, storage failures).
    alerts: Vec<String>,
    /// Harm to durable data an operator must act on (records lost).
    errors: Vec<String>,
    /// Damage warnings already said, whose repeats are only counted.
    repeats: repeats::Repeats,
    /// The store's `next_seq` at the last checkpoint.
    checkpointed_at: Seq,
    /// The store's size at the last checkpoint.
    checkpointed_bytes: u64,
    /// The store failed a sync and has not worked since.
    degraded: bool,
    /// Journal entries waiting for the disk (while degraded), in order.
    deferred_ops: Vec<bytes::Bytes>,
    /// Journal entries written since the last good sync.
    batch_ops: Vec<bytes::Bytes>,
    /// The batch changed more than delivery bookkeeping.
    batch_structural: bool,
    /// The batch appended messages.
    batch_appended: bool,
    /// Who may send and receive what; `None` lets everyone do everything.
    manifest: Option<Arc<Manifest>>,
    /// Traffic per message name and service (`stats.rs`).
    traffic: stats::TrafficStats,
    /// Someone tails the bus: accepted messages are copied to `taps`.
    tapping: bool,
    taps: Vec<Tapped>,
    /// Activity traces are kept: what happens to the messages of the
    /// activities the sampler picks is recorded in `traces` (`trace.rs`).
    sampler: Option<trace::TraceSampler>,
    traces: Vec<TraceRecord>,
    /// Bytes the records in `traces` hold on to (the messages they pin).
    traces_bytes: usize,
    /// Services' instances and their health (`registry.rs`).
    registry: registry::Registry,
    /// Checks due, for the edge to run.
    registry_checks: Vec<(String, String, registry::Check)>,
    /// Actions waiting for an fsync run outside the lock (`durability.rs`).
    durability: durability::Durability,
}

impl<S: MessageStore> Broker<S> {
    pub fn new(config: Config, store: S) -> Broker<S> {
        let config_names_max = config.metrics_names_max;
        let dedup = dedup::DedupWindow::new(config.dedup_window_ms, config.dedup_ids_max);
        let reply_routes = ExpiringMap::new(
            config.reply_route_ms * NANOS_PER_MS,
            config.reply_routes_max,
        );
        Broker {
            config,
            store,
            conns: FastMap::default(),
            services: FastMap::default(),
            refs: refcount::RefCounts::default(),
            dedup,
            route_cache: FastMap::default(),
            reply_routes,
            reply_deliveries: FastMap::default(),
            held_reply_bytes: 0,
            next_delivery: 0,
            unsynced: Vec::new(),
            actions: Vec::new(),
            metrics: Metrics::default(),
            dirty: false,
            now: 0,
            alerts: Vec::new(),
            errors: Vec::new(),
            repeats: repeats::Repeats::default(),
            checkpointed_at: 0,
            checkpointed_bytes: 0,
            degraded: false,
            deferred_ops: Vec::new(),
            batch_ops: Vec::new(),
            batch_structural: false,
            batch_appended: false,
            manifest: None,
            traffic: stats::TrafficStats::new(config_names_max),
            tapping: false,
            taps: Vec::new(),
            sampler: None,
            traces: Vec::new(),
            traces_bytes: 0,
            registry: registry::Registry::default(),
            registry_checks: Vec::new(),
            durability: Default::default(),
        }
    }

    /// Puts a manifest in force (or removes it). Takes effect for the next
    /// send, delivery and subscription; live connections are the server's
    /// to re-check.
    pub fn set_manifest(&mut self, manifest: Option<Arc<Manifest>>) {
        self.manifest = manifest;
        self.routes_changed();
    }

    pub fn manifest(&self) -> Option<&Arc<Manifest>> {
        self.manifest.as_ref()
    }

    /// The service a live connection acts for.
    pub fn connection_service(&self, conn: ConnId) -> Option<String> {
        self.conns.get(&conn).map(|c| c.service.to_string())
    }

    /// Messages for the operator's log since the last call.
    pub fn take_alerts(&mut self) -> Vec<String> {
        std::mem::take(&mut self.alerts)
    }

    /// Harm to durable data found since the last call (records lost), for
    /// the operator's log at error level; each says what to do.
    pub fn take_errors(&mut self) -> Vec<String> {
        std::mem::take(&mut self.errors)
    }

    /// Damage found outside the broker's own reads (the network edge's
    /// background scrub): said once as a warning and counted.
    pub fn report_scrub_damage(&mut self, damage: String) {
        self.metrics.scrub_damage_found += 1;
        self.alerts
            .push(format!("the background scrub found damage: {damage}"));
    }

    /// Appends a delivery-state change to the store's journal; returns
    /// its seq (0 if the write failed: the next sync then fails too and
    /// rebuilds the state).
    fn journal(&mut self, op: Op) -> Seq {
        // Frozen: kept for the batch by reference count, not by a copy.
        let bytes = op.encode().freeze();
        if self.degraded {
            // The disk is failing: keep the change in memory, in order, and
            // write it when the disk works again (see `retry_storage`).
            if self.deferred_ops.len() < DEFERRED_JOURNAL_ENTRIES_MAX {
                self.deferred_ops.push(bytes);
            } else {
                self.metrics.journal_entries_dropped += 1;
            }
            return self.store.next_seq();
        }
        self.dirty = true;
        self.batch_structural |= op.is_structural();
        self.batch_ops.push(bytes.clone());
        match self.store.journal(&bytes) {
            Ok(seq) => seq,
            Err(e) => {
                self.alerts.push(format!("journal write failed: {e}"));
                0
            }
        }
    }

    /// While degraded, tries to write the deferred journal entries; on
    /// success the broker is back to normal.
    fn retry_storage(&mut self) {
        // Twice: a store may need a failed attempt to reopen its files.
        for _ in 0..2 {
            let written = self
                .deferred_ops
                .iter()
                .all(|op| self.store.journal(op).is_ok());
            if written && self.store.sync().is_ok() {
                let count = self.deferred_ops.len();
                self.deferred_ops.clear();
                self.degraded = false;
                // What a reopen of the store threw away on the way was no
                // batch's: nothing is stored while degraded.
                self.take_discarded();
                self.alerts.push(format!(
                    "storage works again; {count} deferred journal entries written"
                ));
                return;
            }
        }
    }

    /// Whether the store is failing (durable sends are refused meanwhile).
    pub fn is_degraded(&self) -> bool {
        self.degraded
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// For the network edge's own counters (see [`Metrics`]).
    pub fn metrics_mut(&mut self) -> &mut Metrics {
        &mut self.metrics
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    pub fn store_mut(&mut self) -> &mut S {
        &mut self.store
    }

    /// Makes everything accepted so far durable, then hands over the actions
    /// produced since the last call. One call per batch of input is the
    /// group commit: all sends in the batch share one sync.
    pub fn take_actions(&mut self, out: &mut Vec<Action>) {
        let discarded = self.take_discarded();
        if self.dirty || !self.unsynced.is_empty() || self.durability_pending() {
            // Deliveries in `actions` wait for the sync too: nothing leaves
            // the broker before it is as durable as its acknowledgement says.
            // Records thrown away since the last look (a failed write) fail
            // the batch even if this sync succeeds.
            let synced = if discarded {
                Err(courier_store::StoreError::Io(
                    "records not yet durable were thrown away after a write failed".to_string(),
                ))
            } else {
                self.store.sync()
            };
            match synced {
                Ok(()) => {
                    self.dirty = false;
                    self.all_durable(out);
                    self.actions.append(&mut self.unsynced);
                }
                Err(error) => {
                    self.take_discarded();
                    self.unsynced_failed(error);
                }
            }
            self.batch_ops.clear();
            self.batch_structural = false;
            self.batch_appended = false;
        }
        self.alerts.extend(self.store.take_reports());
        out.append(&mut self.actions);
    }

    /// A sync failed: whatever this batch wrote may be lost, so nothing of
    /// it is reported as done, and the state is rebuilt from what the store
    /// really holds instead of assuming a retry would succeed.
    fn storage_failed(&mut self, error: &courier_store::StoreError) {
        self.metrics.storage_failures += 1;
        self.degraded = true;
        self.dirty = false;
        if !self.batch_appended && !self.batch_structural {
            // Only delivery bookkeeping (delivered, acked, nacked) was lost:
            // the state in memory is right; write it again later. Nothing
            // else changes, so a failing disk cannot cause a redelivery loop.
            self.alerts.push(format!(
                "storage sync failed: {error}; delivery state is kept in memory until the disk works again"
            ));
            self.deferred_ops.append(&mut self.batch_ops);
            self.actions.append(&mut self.unsynced);
            return;
        }
        self.alerts.push(format!(
            "storage sync failed: {error}; refusing this batch and rebuilding state from the log"
        ));
        // Nothing of the batch happened: its sends are refused, its
        // deliveries dropped, and seqs it used are issued again.
        self.traces.clear();
        self.traces_bytes = 0;
        let reason = format!("not stored: {error}");
        let batch: Vec<Action> = self
            .actions
            .drain(..)
            .chain(self.unsynced.drain(..))
            .collect();
        for action in batch {
            match action {
                Action::SendResult {
                    conn, seq, code, ..
                } if code.is_ok() => self.actions.push(Action::SendResult {
                    conn,
                    seq,
                    code: ErrorCode::StorageFailed,
                    reason: reason.clone(),
                    log_seq: 0,
                }),
                Action::OpResult {
                    conn,
                    request,
                    code,
                    ..
                } if code.is_ok() => self.actions.push(Action::OpResult {
                    conn,
                    request,
                    code: ErrorCode::StorageFailed,
                    reason: reason.clone(),
                }),
                // The message may not exist any more; the rebuilt state
                // delivers again whatever survived.
                Action::Deliver { .. } => {}
                other => self.actions.push(other),
            }
        }
        self.dirty = false;
        let now = self.now;
        if let Err(e) = self.rebuild(now) {
            self.alerts.push(format!(
                "rebuilding state after a storage failure failed too: {e}"
            ));
        }
    }

    // ---- connections -------------------------------------------------

    /// A connection finished its handshake.
    pub fn connect(&mut self, conn: ConnId, service: &str, instance: &str, max_in_flight: u32) {
        let _refused = self.connect_as(conn, service, instance, max_in_flight, false);
    }

    /// Whether `service` may open one more connection.
    pub fn may_connect(&self, service: &str) -> Result<(), String> {
        let open = self.services.get(service).map_or(0, |s| s.instances.len());
        let max = self.config.connections_per_service_max as usize;
        if open >= max {
            return Err(format!(
                "service {service} already has {open} connections, the most allowed ({max}); close some or raise the limit"
            ));
        }
        Ok(())
    }

    /// Like [`Broker::connect`]; `admin` connections may use the broker's
    /// own `courier.*` commands when a manifest is in force.
    pub fn connect_as(
        &mut self,
        conn: ConnId,
        service: &str,
        instance: &str,
        max_in_flight: u32,
        admin: bool,
    ) -> Result<(), String> {
        if let Err(reason) = self.may_connect(service) {
            self.metrics.connections_refused += 1;
            return Err(reason);
        }
        let max_in_flight = self.effective_max_in_flight(max_in_flight);
        let config = &self.config;
        let svc = self
            .services
            .entry(service.to_string())
            .or_insert_with(|| Service::new(config));
        svc.instances.push(conn);
        self.conns.insert(
            conn,
            Conn {
                service: courier_proto::SharedStr::from(service),
                admin,
                instance: courier_proto::SharedStr::from(instance),
                max_in_flight,
                in_flight: 0,
                patterns: Vec::new(),
                draining: false,
                paused: false,
                send_bucket: svc.send_bucket.clone(),
                streams: Default::default(),
                pipelined_keys: false,
            },
        );
        // Replies that arrived while no instance of this service was here.
        let parked = std::mem::take(&mut svc.parked_replies);
        for reply in parked {
            self.deliver_untracked(conn, reply);
        }
        let now = self.now;
        self.register_bus_instance(service, instance, now);
        Ok(())
    }

    /// A request above the limit is lowered to it (counted and reported),
    /// not refused: the connection still works, just with less in flight.
    fn effective_max_in_flight(&mut self, asked: u32) -> u32 {
        if asked == 0 {
            return self.config.max_in_flight_default;
        }
        let limit = self.config.max_in_flight_limit;
        if asked > limit {
            self.metrics.in_flight_requests_lowered += 1;
            self.alerts.push(format!(
                "a receiver asked for {asked} deliveries in flight; it gets the limit of {limit}"
            ));
        }
        asked.min(limit)
    }

    /// The connection takes ordering keys pipelined (it spoke protocol
    /// version 4, `docs/PROTOCOL.md` §8.4): the broker may send a key's
    /// next messages to it before the earlier ones are acked, trusting it
    /// to handle them one at a time, in order. Set once, before it
    /// subscribes.
    pub fn set_pipelined_keys(&mut self, conn: ConnId, on: bool) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.pipelined_keys = on;
        }
    }

    /// Gives up on a connection: everything it held is taken back at once
    /// (as if it had crashed), and the edge closes it with an ERROR.
    fn close_connection(&mut self, conn: ConnId, code: ErrorCode, reason: String, now: Nanos) {
        if !self.conns.contains_key(&conn) {
            return;
        }
        self.actions.push(Action::Close { conn, code, reason });
        self.disconnect(conn, now);
    }

    /// The connection is gone; its unacked deliveries go to other instances now.
    pub fn disconnect(&mut self, conn: ConnId, now: Nanos) {
        let Some(c) = self.conns.remove(&conn) else {
            return;
        };
        // Its flow-controlled streams under way cannot be delivered in
        // order to anyone else: they end (their responders hear so).
        for command in &c.streams {
            self.requester_left(*command, now);
        }
        self.deregister_bus_instance(&c.service, &c.instance);
        let Some(svc) = self.services.get_mut(c.service.as_str()) else {
            return;
        };
        svc.instances.retain(|i| *i != conn);
        // Oldest first: a key's first delivery out is retried (counted)
        // and takes the later ones of its key back with it, in order.
        let mut deliveries: Vec<(Seq, DeliveryId)> = svc
            .queue
            .deliveries_of(conn)
            .into_iter()
            .filter_map(|d| svc.queue.in_flight.get(&d).map(|f| (f.entry.seq, d)))
            .collect();
        deliveries.sort_unstable();
        for (_, delivery) in deliveries {
            let Some(svc) = self.services.get_mut(c.service.as_str()) else {
                break;
            };
            if let Some(flight) = svc.queue.finish(delivery, queue::NOT_ARMED) {
                if let Some(key) = flight.entry.key() {
                    svc.queue.take_back(key, flight.entry.seq);
                }
                self.retry_or_dead_letter(&c.service, flight, 0, "receiver disconnected", now);
            }
        }
        self.pump(&c.service, now);
        if self
            .services
            .get(c.service.as_str())
            .is_some_and(Service::is_idle)
        {
            self.services.remove(c.service.as_str());
        }
    }

    /// Changes how many deliveries the connection takes at once.
    pub fn flow(&mut self, conn: ConnId, max_in_flight: u32, now: Nanos) {
        let max = self.effective_max_in_flight(max_in_flight);
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        c.max_in_flight = max;
        let service = c.service.to_string();
        self.pump(&service, now);
    }

    /// Stop delivering to this connection (graceful shutdown); in-flight
    /// deliveries may still be acked.
    /// The network edge's back-pressure: a connection whose unwritten bytes
    /// pile up gets no deliveries until it has caught up (memory stays
    /// bounded; its messages wait in the queue, or go to other instances).
    pub fn set_paused(&mut self, conn: ConnId, paused: bool, now: Nanos) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if c.paused == paused {
            return;
        }
        c.paused = paused;
        if paused {
            self.metrics.receivers_paused += 1;
        } else {
            let service = c.service.to_string();
            self.pump(&service, now);
        }
    }

    pub fn drain(&mut self, conn: ConnId) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.draining = true;
            self.actions.push(Action::Drained { conn });
        }
    }

    // ---- subscriptions -----------------------------------------------

    /// The connection's service subscribes to `pattern` and this connection
    /// consumes it. The subscription belongs to the service: it outlives
    /// the connection until [`Broker::unsubscribe`].
    #[allow(clippy::too_many_arguments)] // one per SUBSCRIBE field
    pub fn subscribe(
        &mut self,
        conn: ConnId,
        request: u64,
        pattern: &str,
        ack_deadline_ms: u32,
        max_deliveries: u32,
        from: StartFrom,
        now: Nanos,
    ) {
        self.now = now;
        if let Err(e) = validate_pattern(pattern) {
            return self.op_result(conn, request, ErrorCode::InvalidPattern, e.to_string());
        }
        let Some(service) = self.conns.get(&conn).map(|c| c.service.to_string()) else {
            return;
        };
        if let Some(manifest) = &self.manifest {
            // Deliveries are filtered by `may_receive` message by message;
            // a subscription that could never receive anything is refused.
            if let Err(denial) = manifest.cut_subscription(&service, pattern) {
                self.metrics.unauthorized += 1;
                return self.op_result(conn, request, ErrorCode::Unauthorized, denial.to_string());
            }
        }
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if !c.patterns.iter().any(|p| p == pattern) {
            c.patterns.push(pattern.to_string());
        }
        let service = c.service.to_string();
        let existing = self.services.get(&service);
        let is_new = !existing.is_some_and(|s| s.patterns.contains(pattern));
        let settings_change = existing.is_none_or(|s| {
            (ack_deadline_ms != 0 && ack_deadline_ms != s.ack_deadline_ms)
                || (max_deliveries != 0 && max_deliveries != s.max_deliveries)
        });
        if self.degraded && (is_new || settings_change) {
            return self.op_result(
                conn,
                request,
                ErrorCode::StorageFailed,
                "the broker's disk is failing; a new subscription cannot be made durable now — retry later".to_string(),
            );
        }
        let from_seq = if is_new { self.start_seq(from) } else { 0 };
        if is_new || settings_change {
            let op_seq = self.journal(Op::Subscribe {
                service: service.clone(),
                pattern: pattern.to_string(),
                ack_deadline_ms,
                max_deliveries,
                from_seq,
            });
            self.apply_subscribe(&service, pattern, ack_deadline_ms, max_deliveries);
            if from_seq > 0 {
                self.backfill(&service, pattern, from_seq, op_seq, now);
            }
            // The subscription is only promised once it is durable.
            self.unsynced.push(Action::OpResult {
                conn,
                request,
                code: ErrorCode::Ok,
                reason: String::new(),
            });
        } else {
            self.op_result(conn, request, ErrorCode::Ok, String::new());
        }
        self.pump(&service, now);
    }

    /// The first seq a new subscription reads from (0: only new messages).
    fn start_seq(&mut self, from: StartFrom) -> Seq {
        match from {
            StartFrom::New => 0,
            StartFrom::Beginning => 1,
            StartFrom::Time(t) => match self.store.seq_at_time(t) {
                Ok(seq) => seq.max(1),
                Err(e) => {
                    self.alerts
                        .push(format!("cannot look up the log by time: {e}"));
                    0
                }
            },
        }
    }

    fn apply_subscribe(
        &mut self,
        service: &str,
        pattern: &str,
        ack_deadline_ms: u32,
        max_deliveries: u32,
    ) {
        let config = &self.config;
        let svc = self
            .services
            .entry(service.to_string())
            .or_insert_with(|| Service::new(config));
        if svc.patterns.insert(pattern.to_string()) {
            self.route_cache.clear();
        }
        if ack_deadline_ms != 0 {
            svc.ack_deadline_ms = ack_deadline_ms;
        }
        if max_deliveries != 0 {
            svc.max_deliveries = max_deliveries;
        }
    }

    /// Queues the retained events in `[from, until)` that match `pattern`
    /// for `service` (history replay for a new subscription).
    fn backfill(&mut self, service: &str, pattern: &str, from: Seq, until: Seq, now: Nanos) {
        struct Found {
            seq: Seq,
            key: Option<bytes::Bytes>,
            deliver_at: Option<Nanos>,
            rule: Option<usize>,
            bytes: u64,
        }
        let mut found: Vec<Found> = Vec::new();
        let config = &self.config;
        let scanned = self.store.scan_messages(from, &mut |seq, m| {
            if seq < until
                && m.kind == Kind::Event
                && courier_proto::pattern_matches(pattern, &m.name)
            {
                let (max_age, _, rule) = config.retention_for(&m.name);
                // Older than its retention: gone for replays, even if the
                // log has not reclaimed its segment yet.
                if now.saturating_sub(m.timestamp) <= max_age {
                    found.push(Found {
                        seq,
                        key: m.key.clone(),
                        deliver_at: m.deliver_at,
                        rule,
                        bytes: m.payload.len() as u64,
                    });
                }
            }
        });
        if let Err(e) = scanned {
            self.alerts
                .push(format!("history replay for {service} stopped early: {e}"));
        }
        // Size limits keep the newest events of each rule.
        let mut used: HashMap<usize, u64> = HashMap::new();
        let mut keep = vec![true; found.len()];
        for (i, f) in found.iter().enumerate().rev() {
            let Some(rule) = f.rule else { continue };
            let max = self.config.retention_rules[rule].max_bytes;
            if max > 0 {
                let total = used.entry(rule).or_insert(0);
                *total += f.bytes;
                keep[i] = *total <= max;
            }
        }
        let found: Vec<Found> = found
            .into_iter()
            .zip(keep)
            .filter(|(_, k)| *k)
            .map(|(f, _)| f)
            .collect();
        let Some(svc) = self.services.get_mut(service) else {
            return;
        };
        let queued = svc.queue.seqs();
        for Found {
            seq,
            key,
            deliver_at,
            bytes,
            ..
        } in found
        {
            if queued.contains(&seq) {
                continue;
            }
            self.refs.add(seq);
            svc.queue.count_in(bytes);
            let entry = Entry::new(seq, 0, key);
            match deliver_at {
                Some(at) if at > now => svc.queue.defer(at, entry),
                _ => svc.queue.make_ready(entry),
            }
        }
    }

    /// Removes the service's subscription to `pattern`. With its last
    /// subscription gone, the messages waiting for the service go too.
    pub fn unsubscribe(&mut self, conn: ConnId, request: u64, pattern: &str) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        let service = c.service.to_string();
        if self.degraded {
            return self.op_result(
                conn,
                request,
                ErrorCode::StorageFailed,
                "the broker's disk is failing; retry the unsubscribe later".to_string(),
            );
        }
        if let Err(reason) = self.apply_unsubscribe(&service, pattern) {
            return self.op_result(conn, request, ErrorCode::NotSubscribed, reason);
        }
        self.journal(Op::Unsubscribe {
            service,
            pattern: pattern.to_string(),
        });
        self.unsynced.push(Action::OpResult {
            conn,
            request,
            code: ErrorCode::Ok,
            reason: String::new(),
        });
    }

    fn apply_unsubscribe(&mut self, service: &str, pattern: &str) -> Result<(), String> {
        let Some(svc) = self.services.get_mut(service) else {
            return Err(format!("service {service} has no subscriptions"));
        };
        if !svc.patterns.remove(pattern) {
            return Err(format!("service {service} is not subscribed to {pattern}"));
        }
        svc.paused.remove(pattern);
        self.route_cache.clear();
        for instance in &svc.instances {
            if let Some(c) = self.conns.get_mut(instance) {
                c.patterns.retain(|p| p != pattern);
            }
        }
        if svc.patterns.is_empty() {
            for seq in svc.queue.drain_all() {
                release(&mut self.store, &mut self.refs, seq);
            }
            for instance in &svc.instances {
                if let Some(c) = self.conns.get_mut(instance) {
                    c.in_flight = 0;
                }
            }
        }
        if svc.is_idle() {
            self.services.remove(service);
        }
        Ok(())
    }

    fn op_result(&mut self, conn: ConnId, request: u64, code: ErrorCode, reason: String) {
        self.actions.push(Action::OpResult {
            conn,
            request,
            code,
            reason,
        });
    }

    // ---- sending -----------------------------------------------------

    /// A message from `conn`, which numbered it `seq`; answered with a
    /// send result whether accepted or refused.
    pub fn send(&mut self, conn: ConnId, seq: u64, message: impl Into<Arc<Message>>, now: Nanos) {
        self.accept_send(conn, seq, message.into(), false, now);
    }

    /// A QUIET send (PROTOCOL §5.3): answered only if refused, so an
    /// accepted one costs no send result.
    pub fn send_quiet(
        &mut self,
        conn: ConnId,
        seq: u64,
        message: impl Into<Arc<Message>>,
        now: Nanos,
    ) {
        self.accept_send(conn, seq, message.into(), true, now);
    }

    fn accept_send(
        &mut self,
        conn: ConnId,
        seq: u64,
        mut message: Arc<Message>,
        quiet: bool,
        now: Nanos,
    ) {
        self.now = now;
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        let (sender, admin) = (c.service.clone(), c.admin);
        let checked = self
            .check(&message, now)
            .and_then(|()| self.check_delivery_size(&message, &sender));
        // Only a send that passed the checks takes a token.
        let rate = self.config.send_rate_per_service;
        let has_token = checked.is_err() || rate == 0 || c.send_bucket.take(rate, now);
        if let Err(refusal) = checked {
            self.metrics.refused += 1;
            self.traffic.refused(&message.name, &sender, refusal.0);
            return self.send_result(conn, seq, refusal.0, refusal.1);
        }
        if !has_token {
            self.metrics.refused += 1;
            self.metrics.rate_limited += 1;
            self.traffic
                .refused(&message.name, &sender, ErrorCode::RateLimited);
            let rate = self.config.send_rate_per_service;
            return self.send_result(
                conn,
                seq,
                ErrorCode::RateLimited,
                format!("service {sender} is over its send rate of {rate}/s; retry later (the SDK's send_timeout covers it)"),
            );
        }
        if let Err(reason) = self.authorize_send(&sender, admin, &message) {
            self.metrics.refused += 1;
            self.metrics.unauthorized += 1;
            self.traffic
                .refused(&message.name, &sender, ErrorCode::Unauthorized);
            return self.send_result(conn, seq, ErrorCode::Unauthorized, reason);
        }
        self.dedup.expire(now);
        if self.dedup.contains(&message.id) {
            self.metrics.duplicates += 1;
            // "Accepted" says durable: the answer waits for a sync, which
            // covers the first copy if it is still on its way to the disk.
            self.dirty |= self.store.persistent();
            if !quiet {
                self.send_result(conn, seq, ErrorCode::Ok, "duplicate".to_string());
            }
            return;
        }
        if self.degraded
            && !message.transient
            && message.kind != Kind::Reply
            && !message.name.starts_with(SYSTEM_PREFIX)
        {
            self.metrics.refused += 1;
            self.traffic
                .refused(&message.name, &sender, ErrorCode::StorageFailed);
            return self.send_result(
                conn,
                seq,
                ErrorCode::StorageFailed,
                "the broker's disk is failing (full or erroring; see its log): durable messages are refused until it works again — retry later".to_string(),
            );
        }
        let id = message.id;
        let counted = self.traffic.locate(&message.name, &sender);
        // Not shared yet (it was just decoded): no copy is made.
        let stamped = Arc::make_mut(&mut message);
        stamped.timestamp = now;
        stamped.sender = sender;
        // Where the log holds it, once routed (0: it holds none).
        let mut log_seq: Seq = 0;
        let outcome = match message.kind {
            Kind::Command if message.name.starts_with(SYSTEM_PREFIX) => {
                let answered = self.system_command(conn, &message, now);
                if answered.is_ok() {
                    self.tap(&message, Arc::from([]));
                }
                answered.map(|()| ReplyFate::Delivered)
            }
            _ if message.name.starts_with(SYSTEM_PREFIX) => Err((
                ErrorCode::InvalidName,
                format!(
                    "{}: names under {SYSTEM_PREFIX} are reserved for the broker",
                    message.name
                ),
            )),
            Kind::Reply => self.route_reply(conn, seq, quiet, message, now),
            Kind::Command | Kind::Event => self.route(conn, message, now).map(|stored| {
                log_seq = stored;
                ReplyFate::Delivered
            }),
        };
        match outcome {
            // Answered when it goes out to the requester (streams.rs).
            Ok(ReplyFate::Held) => {}
            Ok(ReplyFate::Discarded(reason)) => {
                self.dedup.insert(&id, now);
                self.metrics.accepted += 1;
                if !quiet {
                    self.send_result(conn, seq, ErrorCode::Ok, reason);
                }
            }
            Ok(ReplyFate::Delivered) => {
                // Only accepted ids count for dedup: a refused send retried
                // with the same id must be tried again, not dropped.
                self.dedup.insert(&id, now);
                self.metrics.accepted += 1;
                self.traffic.at(counted).sent += 1;
                if quiet {
                    return;
                }
                let result = Action::SendResult {
                    conn,
                    seq,
                    code: ErrorCode::Ok,
                    reason: String::new(),
                    log_seq,
                };
                self.unsynced.push(result);
            }
            Err((code, reason)) => {
                self.metrics.refused += 1;
                self.traffic.at(counted).refuse(code);
                self.send_result(conn, seq, code, reason);
            }
        }
    }

    /// The manifest's word on a send; replies are checked against the
    /// command they answer instead (see `route_reply`).
    fn authorize_send(&self, sender: &str, admin: bool, m: &Message) -> Result<(), String> {
        let Some(manifest) = &self.manifest else {
            return Ok(());
        };
        if m.name.starts_with(SYSTEM_PREFIX) {
            // Any connection may say where it serves: it changes only its
            // own registry entry.
            return if admin || m.name.as_str() == ADVERTISE_COMMAND {
                Ok(())
            } else {
                Err(format!(
                    "{}: only the admin identity may use the broker's {SYSTEM_PREFIX}* commands",
                    m.name
                ))
            };
        }
        match m.kind {
            Kind::Reply => Ok(()),
            Kind::Command | Kind::Event => manifest
                .may_send(sender, &m.name, m.version.major)
                .map_err(|d| d.to_string()),
        }
    }

    /// A PING from `conn`: its PONG queues behind the answers to every
    /// earlier send, durable ones included (they wait for the fsync).
    pub fn ping(&mut self, conn: ConnId, nonce: u64) {
        let action = Action::Pong { conn, nonce };
        if self.unsynced.is_empty() {
            self.actions.push(action);
        } else {
            self.unsynced.push(action);
        }
    }

    fn send_result(&mut self, conn: ConnId, seq: u64, code: ErrorCode, reason: String) {
        // A refusal carries no durability promise, but it must not overtake
        // the acceptance of an earlier send on the same connection.
        let action = Action::SendResult {
            conn,
            seq,
            code,
            reason,
            log_seq: 0,
        };
        if self.unsynced.is_empty() {
            self.actions.push(action);
        } else {
            self.unsynced.push(action);
        }
    }

    fn check(&self, m: &Message, now: Nanos) -> Result<(), (ErrorCode, String)> {
        validate_name(&m.name).map_err(|e| (ErrorCode::InvalidName, e.to_string()))?;
        if m.expires_at.is_some_and(|t| t <= now) {
            return Err((
                ErrorCode::Expired,
                format!(
                    "{} expired before it was sent (expires_at is in the past)",
                    m.name
                ),
            ));
        }
        match (m.kind, m.response_to) {
            (Kind::Reply, None) => Err((
                ErrorCode::InvalidMessage,
                format!(
                    "reply {} has no response_to; a reply names the command it answers",
                    m.name
                ),
            )),
            (Kind::Command | Kind::Event, Some(_)) => Err((
                ErrorCode::InvalidMessage,
                format!(
                    "{} {} has a response_to; only replies answer commands",
                    m.kind.as_str(),
                    m.name
                ),
            )),
            (Kind::Command, None) if !m.headers.is_empty() => streams::requested_window(m)
                .map(|_| ())
                .map_err(|reason| (ErrorCode::InvalidMessage, reason)),
            _ => Ok(()),
        }
    }

    /// Refuses a message whose DELIVER frame would be longer than the frame
    /// limit: the broker never sends a frame above the limit it announced,
    /// so what it could not deliver it does not accept. What the broker
    /// adds to a sent message is the sender (the service name, in place of
    /// whatever the client put there) and 4 bytes of delivery fields.
    fn check_delivery_size(&self, m: &Message, sender: &str) -> Result<(), (ErrorCode, String)> {
        let max = self.config.frame_bytes_max as usize;
        let len = courier_proto::delivery_frame_len(m) - m.sender.len() + sender.len();
        if len <= max {
            return Ok(());
        }
        let over = len - max;
        Err((
            ErrorCode::PayloadTooLarge,
            format!(
                "{} would be delivered as a DELIVER frame of {len} bytes, {over} byte(s) over the broker's frame limit of {max}: \
                 the broker adds the sender ({} bytes, the service name) and 4 bytes of delivery fields to what was sent; \
                 make the payload at least {over} byte(s) smaller",
                m.name,
                sender.len()
            ),
        ))
    }

    /// Routes a command or event to every service whose subscriptions match.
    fn route(
        &mut self,
        conn: ConnId,
        mut message: Arc<Message>,
        now: Nanos,
    ) -> Result<Seq, (ErrorCode, String)> {
        let targets = self.receivers(&message.name, message.version.major);
        if targets.is_empty() {
            if message.kind == Kind::Command {
                let reason = if self.manifest.is_some() {
                    format!(
                        "no service may receive {} at major version {} and is subscribed to it; check the receives of courier.toml",
                        message.name, message.version.major
                    )
                } else {
                    format!(
                        "no service receives {}; subscribe a service to it first",
                        message.name
                    )
                };
                return Err((ErrorCode::NoReceiver, reason));
            }
            self.metrics.dropped_unrouted += 1;
            self.trace_accepted(&message, 0, &targets);
            self.tap(&message, targets);
            if !message.transient {
                // Kept for history replay (`--from`) until retention ends;
                // no service holds a reference.
                let seq = self
                    .store
                    .append(message)
                    .map_err(|e| (ErrorCode::StorageFailed, format!("not stored: {e}")))?;
                self.dirty = true;
                self.batch_appended = true;
                self.store.remove(seq);
                return Ok(seq);
            }
            return Ok(0);
        }
        if message.kind == Kind::Command {
            let command = self.traffic.slot(&message.name);
            let window = streams::requested_window(&message).ok().flatten();
            self.remember_reply_route(conn, message.id, command, targets.to_vec(), window, now);
        }
        if !message.transient {
            // The store keeps recent messages cached and the queue keeps
            // keys: their own copies let the read buffer be reused in place
            // instead of being pinned, then freed, 64 KiB at a time.
            Arc::make_mut(&mut message).detach();
        }
        if message.transient {
            self.trace_accepted(&message, 0, &targets);
            self.tap(&message, targets.clone());
            for service in targets.iter() {
                self.deliver_transient(service, &message);
            }
            return Ok(0);
        }
        let seq = self
            .store
            .append(message.clone())
            .map_err(|e| (ErrorCode::StorageFailed, format!("not stored: {e}")))?;
        self.dirty = true;
        self.batch_appended = true;
        // Before its deliveries (in `pump` below): records keep the order
        // things happened in.
        self.trace_accepted(&message, seq, &targets);
        self.enqueue(seq, &message, &targets, now);
        self.tap(&message, targets.clone());
        for service in targets.iter() {
            self.pump(service, now);
        }
        Ok(seq)
    }

    /// Services whose subscriptions match `name`, in name order.
    /// With a manifest, only services it allows to receive `name` at
    /// `major` count: a wildcard subscription is cut down to what is allowed.
    ///
    /// Cached per name and major version: matching every service's patterns
    /// (and asking the manifest) for every routed message was the largest
    /// cost of a send. Every change to patterns or the manifest empties it.
    fn receivers(&mut self, name: &str, major: u16) -> Receivers {
        if let Some(hit) = self
            .route_cache
            .get(name)
            .and_then(|per_major| per_major.iter().find(|(m, _)| *m == major))
        {
            return hit.1.clone();
        }
        let mut targets: Vec<String> = self
            .services
            .iter()
            .filter(|(n, s)| {
                s.receives(name)
                    && self
                        .manifest
                        .as_ref()
                        .is_none_or(|m| m.may_receive(n, name, major).is_ok())
            })
            .map(|(n, _)| n.clone())
            .collect();
        targets.sort_unstable();
        let targets: Receivers = targets.into();
        if self.route_cache.len() >= ROUTE_CACHE_NAMES_MAX {
            self.route_cache.clear();
        }
        self.route_cache
            .entry(name.to_string())
            .or_default()
            .push((major, targets.clone()));
        targets
    }

    /// Forgets every cached route: patterns or the manifest changed.
    fn routes_changed(&mut self) {
        self.route_cache.clear();
    }

    /// Puts a stored message into the queue of each target service.
    fn enqueue(&mut self, seq: Seq, message: &Message, targets: &[String], now: Nanos) {
        for service in targets {
            let Some(svc) = self.services.get_mut(service) else {
                continue;
            };
            self.refs.add(seq);
            svc.queue.count_in(message.payload.len() as u64);
            let entry = Entry::new(seq, 0, message.key.clone());
            match message.deliver_at {
                Some(at) if at > now => svc.queue.defer(at, entry),
                _ => svc.queue.make_ready(entry),
            }
        }
    }

    fn remember_reply_route(
        &mut self,
        conn: ConnId,
        command: Uuid,
        command_name: stats::Slot,
        receivers: Vec<String>,
        window: Option<u32>,
        now: Nanos,
    ) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if window.is_some() {
            c.streams.insert(command);
        }
        let route = ReplyRoute {
            service: c.service.to_string(),
            conn,
            receivers,
            command: command_name,
            accepted_at: now,
            stream: window.map(|w| Box::new(Stream::new(conn, w))),
        };
        if let Some((old, route)) = self.reply_routes.insert(command, route, now) {
            if let Some(stream) = route.stream {
                self.expire_stream(
                    old,
                    stream,
                    "was forgotten: too many commands await replies",
                );
            }
        }
    }

    fn deliver_transient(&mut self, service: &str, message: &Arc<Message>) {
        let Some(svc) = self.services.get_mut(service) else {
            return;
        };
        if !svc.paused.is_empty() && !svc.takes_now(&message.name) {
            // At most once: not kept for a paused subscription either.
            self.metrics.transient_dropped_paused += 1;
            return;
        }
        let n = svc.instances.len();
        let mut paused = false;
        for k in 0..n {
            let idx = (svc.next_instance + k) % n;
            let conn = svc.instances[idx];
            let Some(c) = self.conns.get(&conn) else {
                continue;
            };
            if !c.wants(&message.name) {
                continue;
            }
            if c.paused {
                paused = true;
                continue;
            }
            svc.next_instance = idx + 1;
            self.deliver_untracked(conn, message.clone());
            return;
        }
        if paused {
            self.metrics.transient_dropped_paused += 1;
        } else {
            self.metrics.dropped_unrouted += 1;
        }
    }

    /// A delivery that needs no ack (a reply, a transient message): nothing
    /// is kept in flight for it, and acks for it are ignored.
    fn deliver_untracked(&mut self, conn: ConnId, message: Arc<Message>) {
        self.next_delivery += 1;
        self.metrics.delivered += 1;
        if let Some(c) = self.conns.get(&conn) {
            let counted = self.traffic.locate(&message.name, &c.service);
            self.traffic.at(counted).delivered += 1;
            // The broker's own answers belong to no traced activity.
            if !message.name.starts_with(SYSTEM_PREFIX) && traces(&self.sampler, &message, self.now)
            {
                push_trace(
                    &mut self.traces,
                    &mut self.traces_bytes,
                    TraceRecord::Delivered {
                        message: message.clone(),
                        seq: 0,
                        service: c.service.clone(),
                        instance: c.instance.clone(),
                        attempt: 1,
                        at: self.now,
                    },
                );
            }
        }
        self.actions.push(Action::Deliver {
            conn,
            delivery: self.next_delivery,
            attempt: 1,
            message,
        });
    }

    /// A reply goes to the connection that sent the command, else to another
    /// instance of its service, else it waits for one — unless its command
    /// asked for a flow-controlled stream (`streams.rs`).
    fn route_reply(
        &mut self,
        conn: ConnId,
        seq: u64,
        quiet: bool,
        message: Arc<Message>,
        now: Nanos,
    ) -> Result<ReplyFate, (ErrorCode, String)> {
        let Some(command) = message.response_to else {
            return Err((
                ErrorCode::InvalidMessage,
                "reply without response_to".to_string(),
            ));
        };
        let Some(route) = self.reply_routes.get(&command) else {
            return Err((
                ErrorCode::UnknownRequest,
                format!("no command {command} awaits replies (it finished, timed out, or was never sent)"),
            ));
        };
        if !route.receivers.iter().any(|r| *r == message.sender) {
            return Err((
                ErrorCode::Unauthorized,
                format!(
                    "service {} may not reply to command {command}: it was not delivered to {}",
                    message.sender, message.sender
                ),
            ));
        }
        let service = route.service.clone();
        let (route_conn, command_slot, accepted_at) =
            (route.conn, route.command, route.accepted_at);
        if route.stream.is_some() {
            let stream = self
                .reply_routes
                .get_mut(&command)
                .and_then(|r| r.stream.take());
            if let Some(stream) = stream {
                let reply = message.clone();
                let fate = self.route_stream_reply(conn, seq, quiet, message, stream, now)?;
                self.count_reply(command_slot, accepted_at, &reply, &service);
                return Ok(fate);
            }
        }
        self.count_reply(command_slot, accepted_at, &message, &service);
        let target = if self.conns.contains_key(&route_conn) {
            Some(route_conn)
        } else {
            self.services
                .get(&service)
                .and_then(|s| s.instances.first().copied())
        };
        if message.is_final {
            self.reply_routes.remove(&command);
        }
        match target {
            Some(conn) => {
                self.deliver_untracked(conn, message);
            }
            None => {
                let config = &self.config;
                let svc = self
                    .services
                    .entry(service)
                    .or_insert_with(|| Service::new(config));
                if svc.parked_replies.len() >= self.config.parked_replies_max {
                    svc.parked_replies.pop_front();
                    self.metrics.replies_dropped += 1;
                }
                let mut message = message;
                Arc::make_mut(&mut message).detach();
                svc.parked_replies.push_back(message);
                self.metrics.replies_parked += 1;
            }
        }
        Ok(ReplyFate::Delivered)
    }

    /// Counts an accepted reply for its command's outcomes (and the
    /// latency to the final one), and shows it to the tails and traces.
    fn count_reply(
        &mut self,
        command: stats::Slot,
        accepted_at: Nanos,
        message: &Arc<Message>,
        requester: &str,
    ) {
        self.traffic.outcome(command, &message.name);
        if message.is_final && accepted_at != 0 {
            let latency = self.now.saturating_sub(accepted_at);
            self.traffic.final_reply(command, latency);
        }
        let traced = self.sample(message);
        if self.tapping || traced {
            // Only then: a reply's receivers are made for it alone.
            let requester: Receivers = Arc::from([requester.to_string()]);
            if traced {
                self.trace(TraceRecord::Accepted {
                    message: message.clone(),
                    seq: 0,
                    receivers: requester.clone(),
                });
            }
            self.tap(message, requester);
        }
    }

    // ---- delivery ----------------------------------------------------

    fn pick(&mut self, service: &str, name: &str) -> Pick {
        let Some(svc) = self.services.get_mut(service) else {
            return Pick::NoneMatching;
        };
        let n = svc.instances.len();
        let mut any_matching = false;
        for k in 0..n {
            let idx = (svc.next_instance + k) % n;
            let conn = svc.instances[idx];
            let Some(c) = self.conns.get(&conn) else {
                continue;
            };
            if !c.wants(name) {
                continue;
            }
            any_matching = true;
            // An instance whose checks are critical is passed over, as if
            // busy, until it recovers.
            if c.in_flight < c.max_in_flight
                && !c.paused
                && self.registry.is_routable(service, &c.instance)
            {
                svc.next_instance = idx + 1;
                return Pick::Conn(conn);
            }
        }
        if any_matching {
            Pick::AllBusy
        } else {
            Pick::NoneMatching
        }
    }

    /// Whether `conn`, which holds the key of a message named `name`, can
    /// take it now.
    fn pick_holder(&self, service: &str, conn: ConnId, name: &str) -> Pick {
        match self.conns.get(&conn) {
            Some(c)
                if c.wants(name)
                    && c.in_flight < c.max_in_flight
                    && !c.paused
                    && self.registry.is_routable(service, &c.instance) =>
            {
                Pick::Conn(conn)
            }
            _ => Pick::AllBusy,
        }
    }

    /// Sends ready messages of `service` to instances with room.
    fn pump(&mut self, service: &str, now: Nanos) {
        /// Ready messages no connected instance consumes are skipped over;
        /// past this many, the scan stops until something changes.
        const UNMATCHED_SCAN_MAX: usize = 1024;
        let mut index = 0;
        let mut skipped = 0;
        if let Some(svc) = self.services.get_mut(service) {
            // Keys parked for a connection that has room again.
            for conn in svc.queue.parked_for() {
                // A connection gone lets all of its keys go.
                let room = self.conns.get(&conn).map_or(usize::MAX, |c| {
                    if c.paused {
                        0
                    } else {
                        c.max_in_flight.saturating_sub(c.in_flight) as usize
                    }
                });
                if room > 0 {
                    svc.queue.unpark(conn, room);
                }
            }
        }
        loop {
            let Some(svc) = self.services.get_mut(service) else {
                return;
            };
            if svc.queue.ready.len() <= index || svc.is_paused() {
                return;
            }
            let partly_paused = !svc.paused.is_empty();
            // Without an instance that has room, looking at messages (which
            // may mean reading them from disk) is wasted work.
            let has_room = svc.instances.iter().any(|i| {
                self.conns.get(i).is_some_and(|c| {
                    !c.draining
                        && !c.paused
                        && !c.patterns.is_empty()
                        && c.in_flight < c.max_in_flight
                        && self.registry.is_routable(service, &c.instance)
                })
            });
            if !has_room {
                return;
            }
            let Some(entry) = svc.queue.ready.get(index) else {
                return;
            };
            if let Some(holder) = entry.key().and_then(|key| svc.queue.key_holder(key)) {
                let full = self
                    .conns
                    .get(&holder)
                    .is_none_or(|c| c.paused || c.in_flight >= c.max_in_flight);
                if full {
                    // Out to a connection with no room: it waits aside,
                    // not read from the store at every pass.
                    svc.queue.park(index, holder);
                    continue;
                }
            }
            let message = match self.store.get(entry.seq) {
                Ok(Some(message)) => message,
                Ok(None) => {
                    // Gone from the store (purged): nothing left to deliver.
                    svc.queue.ready.remove(index);
                    svc.queue.release_key(&entry);
                    continue;
                }
                Err(e) => {
                    // Never skipped silently: it stays in the backlog (and
                    // in snapshots), set aside so it is not tried again
                    // until the next start, and holds its key; the operator
                    // hears of it once, of more in the same range in a
                    // summary.
                    self.metrics.unreadable_messages += 1;
                    if let Some(entry) = svc.queue.ready.remove(index) {
                        svc.queue.unreadable.push(entry);
                    }
                    let reason = e.to_string();
                    let line = format!(
                        "message {} for {service} cannot be read: {e}; it stays in the backlog, set aside until the next start",
                        entry.seq
                    );
                    let (lines, repeated) = self.repeats.say(
                        &format!("{service}\u{0}{reason}"),
                        line,
                        || format!("messages for {service} cannot be read ({reason})"),
                        now,
                    );
                    self.metrics.damage_warnings_repeated += u64::from(repeated);
                    self.alerts.extend(lines);
                    continue;
                }
            };
            if message.expires_at.is_some_and(|t| t <= now) {
                svc.queue.ready.remove(index);
                svc.queue.release_key(&entry);
                svc.queue.count_out(message.payload.len() as u64);
                self.metrics.expired += 1;
                let slot = self.traffic.slot(&message.name);
                if let Some(t) = self.traffic.traffic(slot, service) {
                    t.expired += 1;
                }
                if traces(&self.sampler, &message, now) {
                    push_trace(
                        &mut self.traces,
                        &mut self.traces_bytes,
                        TraceRecord::Settled {
                            seq: entry.seq,
                            service: courier_proto::SharedStr::from(service),
                            outcome: Outcome::Expired,
                            at: now,
                        },
                    );
                }
                release(&mut self.store, &mut self.refs, entry.seq);
                continue;
            }
            if partly_paused && !svc.takes_now(&message.name) {
                // Only paused subscriptions take it: it waits for a resume.
                index += 1;
                skipped += 1;
                if skipped >= UNMATCHED_SCAN_MAX {
                    return;
                }
                continue;
            }
            let len = courier_proto::delivery_frame_len(&message);
            if len > self.config.frame_bytes_max as usize {
                // Accepted under a larger limit (the broker was restarted
                // with a smaller one): it cannot be delivered, and it is
                // not dropped either.
                let Some(entry) = svc.queue.ready.remove(index) else {
                    return;
                };
                let max = self.config.frame_bytes_max;
                self.alerts.push(format!(
                    "message {} for {service} is {len} bytes as a DELIVER frame, over the frame limit of {max}; dead-lettered",
                    entry.seq
                ));
                let slot = self.traffic.slot(&message.name);
                self.dead_letter(
                    service,
                    entry,
                    message.payload.len() as u64,
                    slot,
                    format!("its DELIVER frame would be {len} bytes, over the broker's frame limit of {max} (was it accepted under a larger limit?)"),
                    now,
                );
                continue;
            }
            let holder = entry.key().and_then(|key| svc.queue.key_holder(key));
            let picked = match holder {
                // A key out on a connection goes on there (pipelined) or
                // not at all until it comes back.
                Some(conn) => self.pick_holder(service, conn, &message.name),
                None => self.pick(service, &message.name),
            };
            match picked {
                Pick::Conn(conn) => {
                    let Some(svc) = self.services.get_mut(service) else {
                        return;
                    };
                    let Some(mut entry) = svc.queue.ready.remove(index) else {
                        return;
                    };
                    entry.attempts += 1;
                    let attempt = entry.attempts;
                    let keyed = entry.key().is_some();
                    let deadline = now + u64::from(svc.ack_deadline_ms) * NANOS_PER_MS;
                    self.next_delivery += 1;
                    let delivery = self.next_delivery;
                    let seq = entry.seq;
                    let slot = self.traffic.slot(&message.name);
                    let traced = traces(&self.sampler, &message, now);
                    let pipelined = self.conns.get(&conn).is_some_and(|c| c.pipelined_keys);
                    let first_of_key = svc.queue.start(
                        delivery,
                        queue::InFlight {
                            entry,
                            conn,
                            deadline,
                            name: slot,
                            traced,
                            bytes: message.payload.len() as u64,
                        },
                        pipelined,
                    );
                    // Tells a pipelined receiver that whatever of this key
                    // it still holds from before was taken back.
                    let wire_attempt = if pipelined && keyed && first_of_key {
                        attempt | courier_proto::ATTEMPT_KEY_START
                    } else {
                        attempt
                    };
                    if message.kind == Kind::Command
                        && !message.headers.is_empty()
                        && message.header(REPLY_WINDOW_HEADER).is_some()
                    {
                        self.note_stream_handler(message.id, service, delivery);
                    }
                    if let Some(c) = self.conns.get_mut(&conn) {
                        c.in_flight += 1;
                        if traced {
                            push_trace(
                                &mut self.traces,
                                &mut self.traces_bytes,
                                TraceRecord::Delivered {
                                    message: message.clone(),
                                    seq,
                                    service: c.service.clone(),
                                    instance: c.instance.clone(),
                                    attempt,
                                    at: now,
                                },
                            );
                        }
                    }
                    self.journal(Op::Delivered {
                        service: service.to_string(),
                        seq,
                    });
                    self.metrics.delivered += 1;
                    if let Some(t) = self.traffic.traffic(slot, service) {
                        t.delivered += 1;
                        t.redelivered += u64::from(attempt > 1);
                    }
                    if attempt > 1 {
                        self.metrics.redelivered += 1;
                    }
                    self.actions.push(Action::Deliver {
                        conn,
                        delivery,
                        attempt: wire_attempt,
                        message,
                    });
                }
                Pick::AllBusy if holder.is_some() => {
                    // Only its holder may take it; others may take the rest.
                    index += 1;
                    skipped += 1;
                    if skipped >= UNMATCHED_SCAN_MAX {
                        return;
                    }
                }
                Pick::AllBusy => return,
                Pick::NoneMatching => {
                    index += 1;
                    skipped += 1;
                    if skipped >= UNMATCHED_SCAN_MAX {
                        return;
                    }
                }
            }
        }
    }

    /// The receiver handled a delivery.
    pub fn ack(&mut self, conn: ConnId, delivery: DeliveryId, now: Nanos) {
        let Some(flight) = self.take_flight(conn, delivery, now) else {
            // A reply of a flow-controlled stream: one credit back.
            self.ack_reply(conn, delivery, now);
            return;
        };
        self.metrics.acked += 1;
        let service = flight.1;
        if let Some(t) = self.traffic.traffic(flight.0.name, &service) {
            t.acked += 1;
        }
        let seq = flight.0.entry.seq;
        self.journal(Op::Acked {
            service: service.to_string(),
            seq,
        });
        if flight.0.traced {
            push_trace(
                &mut self.traces,
                &mut self.traces_bytes,
                TraceRecord::Settled {
                    seq,
                    service: service.clone(),
                    outcome: Outcome::Acked,
                    at: now,
                },
            );
        }
        if let Some(svc) = self.services.get_mut(service.as_str()) {
            svc.queue.release_key(&flight.0.entry);
            svc.queue.count_out(flight.0.bytes);
        }
        release(&mut self.store, &mut self.refs, seq);
        self.pump(&service, now);
    }

    /// The receiver could not handle a delivery now; retry after `delay_ms`.
    pub fn nack(&mut self, conn: ConnId, delivery: DeliveryId, delay_ms: u32, now: Nanos) {
        let Some((flight, service)) = self.take_flight(conn, delivery, now) else {
            // A reply of a flow-controlled stream: the requester stops
            // reading it.
            self.nack_reply(conn, delivery, now);
            return;
        };
        self.take_back_key(&service, &flight);
        self.metrics.nacked += 1;
        if let Some(t) = self.traffic.traffic(flight.name, &service) {
            t.nacked += 1;
        }
        if flight.traced {
            push_trace(
                &mut self.traces,
                &mut self.traces_bytes,
                TraceRecord::Settled {
                    seq: flight.entry.seq,
                    service: service.clone(),
                    outcome: Outcome::Nacked { delay_ms },
                    at: now,
                },
            );
        }
        self.retry_or_dead_letter(
            &service,
            flight,
            u64::from(delay_ms) * NANOS_PER_MS,
            NACKED,
            now,
        );
        self.pump(&service, now);
    }

    /// Removes a delivery from flight if `conn` really holds it. Acks for
    /// transient messages and replies, or for unknown ids, find nothing.
    fn take_flight(
        &mut self,
        conn: ConnId,
        delivery: DeliveryId,
        now: Nanos,
    ) -> Option<(queue::InFlight, courier_proto::SharedStr)> {
        let c = self.conns.get_mut(&conn)?;
        let svc = self.services.get_mut(c.service.as_str())?;
        if svc.queue.in_flight.get(&delivery).map(|f| f.conn) != Some(conn) {
            return None;
        }
        let next_deadline = now + u64::from(svc.ack_deadline_ms) * NANOS_PER_MS;
        let flight = svc.queue.finish(delivery, next_deadline)?;
        c.in_flight = c.in_flight.saturating_sub(1);
        Some((flight, c.service.clone()))
    }

    /// A keyed delivery failed (nack, deadline): the later deliveries of
    /// its key out on the same connection come back too, so the key starts
    /// again from the failed one, in order (`Queue::take_back`).
    fn take_back_key(&mut self, service: &str, flight: &queue::InFlight) {
        let Some(key) = flight.entry.key() else {
            return;
        };
        let Some(svc) = self.services.get_mut(service) else {
            return;
        };
        let taken = svc.queue.take_back(key, flight.entry.seq);
        for later in taken {
            if let Some(c) = self.conns.get_mut(&later.conn) {
                c.in_flight = c.in_flight.saturating_sub(1);
            }
        }
    }

    fn retry_or_dead_letter(
        &mut self,
        service: &str,
        flight: queue::InFlight,
        delay: Nanos,
        why: &'static str,
        now: Nanos,
    ) {
        let queue::InFlight {
            entry,
            name,
            traced,
            bytes,
            ..
        } = flight;
        let Some(svc) = self.services.get_mut(service) else {
            return;
        };
        let dead = entry.attempts >= svc.max_deliveries;
        if traced && (dead || why != NACKED) {
            let outcome = if dead {
                Outcome::DeadLettered { reason: why }
            } else {
                Outcome::Released { reason: why }
            };
            push_trace(
                &mut self.traces,
                &mut self.traces_bytes,
                TraceRecord::Settled {
                    seq: entry.seq,
                    service: courier_proto::SharedStr::from(service),
                    outcome,
                    at: now,
                },
            );
        }
        let Some(svc) = self.services.get_mut(service) else {
            return;
        };
        if dead {
            let reason = format!(
                "{why} on attempt {} of {}",
                entry.attempts, svc.max_deliveries
            );
            self.dead_letter(service, entry, bytes, name, reason, now);
        } else if delay == 0 {
            svc.queue.make_ready_again(entry);
        } else {
            let seq = entry.seq;
            svc.queue.defer_retry(now + delay, entry);
            self.journal(Op::Nacked {
                service: service.to_string(),
                seq,
                until: now + delay,
            });
        }
    }

    /// Moves a message of `service` that is in no other state to its dead
    /// letters, for good.
    fn dead_letter(
        &mut self,
        service: &str,
        entry: Entry,
        bytes: u64,
        name: stats::Slot,
        reason: String,
        now: Nanos,
    ) {
        let Some(svc) = self.services.get_mut(service) else {
            return;
        };
        svc.queue.release_key(&entry);
        svc.queue.count_out(bytes);
        let letter = DeadLetter {
            seq: entry.seq,
            attempts: entry.attempts,
            reason,
            at: now,
        };
        svc.queue.dead_letters.push(letter.clone());
        self.metrics.dead_lettered += 1;
        if let Some(t) = self.traffic.traffic(name, service) {
            t.dead_lettered += 1;
        }
        self.journal(Op::DeadLettered {
            service: service.to_string(),
            seq: letter.seq,
            attempts: letter.attempts,
            reason: letter.reason,
            at: now,
        });
    }

    /// Advances time: deferred messages fall due, overdue deliveries go to
    /// other instances, old dedup ids and reply routes are forgotten.
    pub fn tick(&mut self, now: Nanos) {
        self.now = now;
        if self.degraded {
            self.retry_storage();
        }
        // Lets a store with a periodic fsync policy catch up while idle.
        self.dirty |= self.store.persistent();
        self.dedup.expire(now);
        let mut expired = Vec::new();
        self.reply_routes.expire_each(now, |command, route| {
            if let Some(stream) = route.stream {
                expired.push((command, stream));
            }
        });
        let route_ms = self.config.reply_route_ms;
        for (command, stream) in expired {
            self.expire_stream(
                command,
                stream,
                &format!("stopped taking replies: its reply route expired after {route_ms} ms"),
            );
        }
        self.alerts.extend(self.repeats.summaries(now));
        self.registry_tick(now);
        let names: Vec<String> = self.services.keys().cloned().collect();
        for service in names {
            let Some(svc) = self.services.get_mut(&service) else {
                continue;
            };
            svc.queue.release_due(now);
            let mut give_up = Vec::new();
            for delivery in svc.queue.overdue(now) {
                let Some(svc) = self.services.get_mut(&service) else {
                    break;
                };
                if svc.queue.has_followers(delivery) {
                    // Its receiver may have handled it, acked and begun
                    // the next of its key while the deadline passed here:
                    // taking the key back would let that next one be
                    // handled before this one's retry. So the connection
                    // goes, as if it had crashed.
                    if let Some(flight) = svc.queue.in_flight.get(&delivery) {
                        give_up.push(flight.conn);
                    }
                    continue;
                }
                let Some(flight) = svc.queue.finish(delivery, queue::NOT_ARMED) else {
                    continue;
                };
                if let Some(c) = self.conns.get_mut(&flight.conn) {
                    c.in_flight = c.in_flight.saturating_sub(1);
                }
                self.take_back_key(&service, &flight);
                self.retry_or_dead_letter(&service, flight, 0, "ack deadline passed", now);
            }
            give_up.sort_unstable();
            give_up.dedup();
            for conn in give_up {
                let deadline = self.services.get(&service).map_or(0, |s| s.ack_deadline_ms);
                self.close_connection(
                    conn,
                    ErrorCode::AckDeadlinePassed,
                    format!(
                        "a delivery of an ordering key was not acked within the ack deadline ({deadline} ms) while later ones of its key were out to this connection; everything it held is delivered again, in order. Ack or nack each delivery within the deadline"
                    ),
                    now,
                );
            }
            self.pump(&service, now);
        }
    }

    /// When [`Broker::tick`] next has work, if ever.
    pub fn next_timer(&self) -> Option<Nanos> {
        self.services
            .values()
            .filter_map(|s| s.queue.next_timer())
            .chain(self.registry.next_timer())
            .min()
    }

    // ---- inspection --------------------------------------------------

    pub fn services(&self) -> Vec<ServiceInfo> {
        let mut out: Vec<ServiceInfo> = self
            .services
            .iter()
            .map(|(name, s)| ServiceInfo {
                name: name.clone(),
                patterns: s.patterns.iter().cloned().collect(),
                paused: s.paused.iter().cloned().collect(),
                instances: s
                    .instances
                    .iter()
                    .filter_map(|c| self.conns.get(c))
                    .map(|c| c.instance.to_string())
                    .collect(),
                depth: s.queue.depth(),
                in_flight: s.queue.in_flight.len(),
                dead_letters: s.queue.dead_letters.len(),
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Whether accepted messages are recorded for tails (the network edge
    /// turns it on while at least one tail runs).
    pub fn set_tapping(&mut self, on: bool) {
        self.tapping = on;
        if !on {
            self.taps.clear();
        }
    }

    /// What was accepted since the last call, while tapping.
    pub fn take_taps(&mut self) -> Vec<Tapped> {
        std::mem::take(&mut self.taps)
    }

    /// Whether what happens to messages is recorded for activity traces
    /// (the network edge turns it on unless traces are off): `Some(rate)`
    /// traces every activity up to `rate` accepted messages a second and
    /// samples whole activities above it (0: every activity).
    pub fn set_tracing(&mut self, rate: Option<u32>) {
        self.sampler = rate.map(trace::TraceSampler::new);
        if rate.is_none() {
            self.traces.clear();
            self.traces_bytes = 0;
        }
    }

    /// Whether activity traces are kept.
    pub fn is_tracing(&self) -> bool {
        self.sampler.is_some()
    }

    /// Accepted messages the sampler left out of the traces, and 2^-level
    /// is the share of new activities traced now.
    pub fn trace_sampling(&self) -> Option<(u64, u8)> {
        self.sampler.as_ref().map(|s| (s.skipped, s.level()))
    }

    /// What happened since the last call, while tracing; `out` (emptied
    /// first) takes the records and hands its allocation over for the next.
    /// Returns about how many bytes of memory the records hold on to.
    pub fn take_traces(&mut self, out: &mut Vec<TraceRecord>) -> usize {
        out.clear();
        std::mem::swap(out, &mut self.traces);
        std::mem::take(&mut self.traces_bytes)
    }

    fn trace(&mut self, record: TraceRecord) {
        push_trace(&mut self.traces, &mut self.traces_bytes, record);
    }

    fn trace_accepted(&mut self, message: &Arc<Message>, seq: Seq, receivers: &Receivers) {
        if self.sample(message) {
            self.trace(TraceRecord::Accepted {
                message: message.clone(),
                seq,
                receivers: receivers.clone(),
            });
        }
    }

    /// Counts an accepted message for the sampler; whether it is traced.
    fn sample(&mut self, message: &Message) -> bool {
        let now = self.now;
        self.sampler
            .as_mut()
            .is_some_and(|s| s.accept(&message.activity_id, now))
    }

    fn tap(&mut self, message: &Arc<Message>, receivers: Receivers) {
        if self.tapping {
            self.taps.push(Tapped {
                message: message.clone(),
                receivers,
            });
        }
    }

    /// Traffic per message name and service, for `/metrics`.
    pub fn traffic(&self) -> &stats::TrafficStats {
        &self.traffic
    }

    /// Every subscribed service's queue as `/metrics` shows it. Reads the
    /// oldest waiting message of each service from the store for its age.
    pub fn subscription_gauges(&mut self, now: Nanos) -> Vec<SubscriptionGauges> {
        let mut out: Vec<SubscriptionGauges> = Vec::with_capacity(self.services.len());
        for (name, s) in &self.services {
            let oldest_seq = s.queue.runs().map(|(entry, _, _)| entry.seq).min();
            let consumers: Vec<&Conn> = s
                .instances
                .iter()
                .filter_map(|c| self.conns.get(c))
                .filter(|c| !c.patterns.is_empty())
                .collect();
            out.push(SubscriptionGauges {
                service: name.clone(),
                patterns: s.patterns.iter().cloned().collect(),
                paused: s.paused.iter().cloned().collect(),
                backlog: s.queue.depth(),
                backlog_bytes: s.queue.backlog_bytes(),
                in_flight: s.queue.in_flight.len(),
                consumers: consumers.len(),
                consumers_paused: consumers.iter().filter(|c| c.paused).count(),
                dead_letters: s.queue.dead_letters.len(),
                oldest_unacked_age: None,
                oldest_seq,
            });
        }
        for gauge in &mut out {
            if let Some(seq) = gauge.oldest_seq {
                if let Ok(Some(m)) = self.store.get(seq) {
                    gauge.oldest_unacked_age = Some(now.saturating_sub(m.timestamp));
                }
            }
        }
        out.sort_by(|a, b| a.service.cmp(&b.service));
        out
    }

    /// Every live connection, by service then connection order.
    pub fn instances(&self) -> Vec<InstanceInfo> {
        let mut out: Vec<InstanceInfo> = self
            .conns
            .iter()
            .map(|(id, c)| InstanceInfo {
                conn: *id,
                service: c.service.to_string(),
                instance: c.instance.to_string(),
                in_flight: c.in_flight,
                max_in_flight: c.max_in_flight,
                patterns: c.patterns.clone(),
                draining: c.draining,
                paused: c.paused,
            })
            .collect();
        out.sort_by(|a, b| a.service.cmp(&b.service).then(a.conn.cmp(&b.conn)));
        out
    }

    /// Pauses the service's subscription to `pattern` (every one of them
    /// with `None`): messages it alone takes wait in the queue, counted in
    /// the backlog, until [`Broker::resume_subscription`]. Deliveries in
    /// flight may still be acked. Journaled, so it survives a restart.
    /// Returns the patterns it applied to.
    pub fn pause_subscription(
        &mut self,
        service: &str,
        pattern: Option<&str>,
        now: Nanos,
    ) -> Result<Vec<String>, PauseError> {
        self.set_subscription_paused(service, pattern, true, now)
    }

    /// Undoes [`Broker::pause_subscription`]; what waited is delivered.
    pub fn resume_subscription(
        &mut self,
        service: &str,
        pattern: Option<&str>,
        now: Nanos,
    ) -> Result<Vec<String>, PauseError> {
        self.set_subscription_paused(service, pattern, false, now)
    }

    fn set_subscription_paused(
        &mut self,
        service: &str,
        pattern: Option<&str>,
        paused: bool,
        now: Nanos,
    ) -> Result<Vec<String>, PauseError> {
        self.now = now;
        let svc = self
            .services
            .get(service)
            .filter(|s| !s.patterns.is_empty())
            .ok_or_else(|| PauseError::UnknownService(service.to_string()))?;
        let targets: Vec<String> = match pattern {
            None => svc.patterns.iter().cloned().collect(),
            Some(p) if svc.patterns.contains(p) => vec![p.to_string()],
            Some(p) => {
                return Err(PauseError::NotSubscribed {
                    service: service.to_string(),
                    pattern: p.to_string(),
                    subscribed: svc.patterns.iter().cloned().collect::<Vec<_>>().join(", "),
                })
            }
        };
        let changes: Vec<String> = targets
            .iter()
            .filter(|p| svc.paused.contains(*p) != paused)
            .cloned()
            .collect();
        if changes.is_empty() {
            return Ok(targets);
        }
        if self.degraded {
            return Err(PauseError::StorageFailing);
        }
        for pattern in changes {
            let op = if paused {
                Op::Paused {
                    service: service.to_string(),
                    pattern: pattern.clone(),
                }
            } else {
                Op::Resumed {
                    service: service.to_string(),
                    pattern: pattern.clone(),
                }
            };
            self.journal(op);
            self.apply_paused(service, &pattern, paused);
        }
        if !paused {
            self.pump(service, now);
        }
        Ok(targets)
    }

    /// The service's paused patterns, in order.
    pub fn paused_patterns(&self, service: &str) -> Vec<String> {
        self.services
            .get(service)
            .map(|s| s.paused.iter().cloned().collect())
            .unwrap_or_default()
    }

    fn apply_paused(&mut self, service: &str, pattern: &str, paused: bool) {
        let Some(svc) = self.services.get_mut(service) else {
            return;
        };
        if !svc.patterns.contains(pattern) {
            return;
        }
        if paused {
            svc.paused.insert(pattern.to_string());
        } else {
            svc.paused.remove(pattern);
        }
    }

    /// Live connections per service (instances and senders alike).
    pub fn connections_by_service(&self) -> Vec<(String, usize)> {
        let mut counts: std::collections::BTreeMap<&str, usize> = Default::default();
        for c in self.conns.values() {
            *counts.entry(c.service.as_str()).or_default() += 1;
        }
        counts
            .into_iter()
            .map(|(service, n)| (service.to_string(), n))
            .collect()
    }

    /// The service's dead letters with their messages (`None` if unreadable).
    pub fn dead_letters(&mut self, service: &str) -> Vec<(DeadLetter, Option<Arc<Message>>)> {
        self.dead_letters_first(service, usize::MAX)
    }

    /// Like [`Broker::dead_letters`], the oldest `max` only: each one is a
    /// read from the store.
    pub fn dead_letters_first(
        &mut self,
        service: &str,
        max: usize,
    ) -> Vec<(DeadLetter, Option<Arc<Message>>)> {
        let letters: Vec<DeadLetter> = self
            .services
            .get(service)
            .map(|s| s.queue.dead_letters.iter().take(max).cloned().collect())
            .unwrap_or_default();
        letters
            .into_iter()
            .map(|d| {
                let message = self.store.get(d.seq).ok().flatten();
                (d, message)
            })
            .collect()
    }

    /// How many dead letters the service holds; `None` for a service the
    /// broker does not know.
    pub fn dead_letter_count(&self, service: &str) -> Option<usize> {
        self.services
            .get(service)
            .map(|s| s.queue.dead_letters.len())
    }

    /// One dead letter of the service with its message (`None` inside if
    /// unreadable); `None` if the service has no such dead letter.
    pub fn find_dead_letter(
        &mut self,
        service: &str,
        seq: Seq,
    ) -> Option<(DeadLetter, Option<Arc<Message>>)> {
        let letter = self
            .services
            .get(service)?
            .queue
            .dead_letters
            .iter()
            .find(|d| d.seq == seq)?
            .clone();
        let message = self.store.get(seq).ok().flatten();
        Some((letter, message))
    }

    /// Puts a dead letter back in the service's queue, as a fresh message.
    pub fn revive(&mut self, service: &str, seq: Seq, now: Nanos) -> Result<(), String> {
        self.now = now;
        let (key, bytes) = match self.store.get(seq) {
            Ok(Some(m)) => (m.key.clone(), m.payload.len() as u64),
            Ok(None) => return Err(format!("message {seq} is no longer stored")),
            Err(e) => return Err(format!("message {seq} cannot be read: {e}")),
        };
        let svc = self
            .services
            .get_mut(service)
            .ok_or_else(|| format!("service {service} has no dead letters"))?;
        let position = svc
            .queue
            .dead_letters
            .iter()
            .position(|d| d.seq == seq)
            .ok_or_else(|| format!("service {service} has no dead letter {seq}"))?;
        svc.queue.dead_letters.remove(position);
        svc.queue.count_in(bytes);
        svc.queue.make_ready(Entry::new(seq, 0, key));
        self.journal(Op::Revived {
            service: service.to_string(),
            seq,
        });
        self.pump(service, now);
        Ok(())
    }

    /// Deletes the service's dead letters (all of them, or those listed).
    pub fn purge(&mut self, service: &str, only: Option<&[Seq]>) -> usize {
        let Some(svc) = self.services.get_mut(service) else {
            return 0;
        };
        let (gone, kept): (Vec<DeadLetter>, Vec<DeadLetter>) =
            std::mem::take(&mut svc.queue.dead_letters)
                .into_iter()
                .partition(|d| only.is_none_or(|list| list.contains(&d.seq)));
        svc.queue.dead_letters = kept;
        let seqs: Vec<Seq> = gone.iter().map(|d| d.seq).collect();
        for seq in &seqs {
            release(&mut self.store, &mut self.refs, *seq);
        }
        if !seqs.is_empty() {
            self.journal(Op::Purged {
                service: service.to_string(),
                seqs: seqs.clone(),
            });
        }
        seqs.len()
    }
}

/// Whether what happens to `message` is recorded: its activity is traced.
fn traces(sampler: &Option<trace::TraceSampler>, message: &Message, now: Nanos) -> bool {
    sampler
        .as_ref()
        .is_some_and(|s| s.traces(&message.activity_id, now))
}

/// Records `record`, counting the memory it holds on to (the message it
/// pins). A free function: callers hold other parts of the broker.
fn push_trace(traces: &mut Vec<TraceRecord>, bytes: &mut usize, record: TraceRecord) {
    *bytes += std::mem::size_of::<TraceRecord>()
        + match &record {
            TraceRecord::Accepted { message, .. } | TraceRecord::Delivered { message, .. } => {
                message.payload.len()
            }
            TraceRecord::Settled { .. } => 0,
        };
    traces.push(record);
}

/// One service no longer needs `seq`; the last one out removes it.
fn release<S: MessageStore>(store: &mut S, refs: &mut refcount::RefCounts, seq: Seq) {
    if refs.release(seq) {
        store.remove(seq);
    }
}

#[cfg(test)]
mod tests;
