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
mod backfill;
mod checkpoint;
mod config;
mod connections;
mod dead_letters;
mod dedup;
mod delivery;
mod durability;
mod expiring;
mod inspection;
mod journal;
mod outputs;
mod queue;
mod recovery;
mod refcount;
pub mod registry;
mod relays;
mod repeats;
mod routing;
mod send;
mod services;
pub mod stats;
mod storage;
mod streams;
mod subscriptions;
mod tap;
mod trace;
mod upstream;

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use courier_manifest::Manifest;
use courier_proto::{validate_name, validate_pattern, ErrorCode, Kind, Message};
use courier_store::{MessageStore, Seq};
use uuid::Uuid;

pub use admin::{
    dead_letter_json, ADVERTISE_COMMAND, DEAD_LETTERS_PAGE_DEFAULT, DEAD_LETTERS_PAGE_MAX,
    SYSTEM_PREFIX,
};
pub use config::{Config, RetentionRule};
pub use courier_proto::StartFrom;
pub use dead_letters::{DeadLetterAnswer, DeadLetterFound, DeadLetterPage, DeadLetterQuery};
use delivery::release;
use expiring::ExpiringMap;
use inspection::{push_trace, traces, traces_stored};
pub use journal::JournalError;
use journal::Op;
pub use outputs::{Action, InstanceInfo, Metrics, PauseError, ServiceInfo, SubscriptionGauges};
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
pub use upstream::{Fetched, KnownReplyRoute, RemoteReply, RemoteSubscriptions};

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

/// The services a message goes to, in name order; shared by the route cache.
type Receivers = Arc<[String]>;

/// Distinct message names whose routes are cached; past it the cache
/// starts over (names are the senders' to choose).
const ROUTE_CACHE_NAMES_MAX: usize = 10_000;

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
    patterns: courier_proto::pattern_index::PatternList,
    draining: bool,
    /// Its outbox is full (it does not read): no deliveries until resumed.
    paused: bool,
    /// Its service's (the same `Arc`).
    send_bucket: Arc<SendBucket>,
    /// Commands it sent whose replies are a flow-controlled stream.
    streams: std::collections::HashSet<Uuid, foldhash::fast::RandomState>,
    /// It takes a key's messages pipelined (protocol version 4).
    pipelined_keys: bool,
    /// Another node's instances of the service, reached through its edge
    /// (`relays.rs`): keyed deliveries only, no ack deadline here.
    relay: bool,
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
        !self.draining && self.patterns.matches(name)
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
    /// Other nodes' instances, when this node holds the service's keyed
    /// lane on a replicated backend (`relays.rs`).
    relays: Vec<ConnId>,
    /// This node holds the service's keyed lane on a replicated backend:
    /// its keyed retries stay here (`upstream.rs`).
    keyed_lane_here: bool,
    /// Round-robin cursor into `instances`.
    next_instance: usize,
    queue: Queue,
    /// Unfinished history replays, and what was routed to the service
    /// after them, waiting to enter `queue` in this order (`backfill.rs`).
    waiting: VecDeque<backfill::Waiting>,
    parked_replies: VecDeque<Arc<Message>>,
    /// The send rate's token bucket (its connections hold it too).
    send_bucket: Arc<SendBucket>,
    /// Its timers as `services` last read them.
    noted: services::Noted,
}

impl Service {
    fn new(config: &Config) -> Service {
        Service {
            patterns: BTreeSet::new(),
            paused: BTreeSet::new(),
            ack_deadline_ms: config.ack_deadline_ms,
            max_deliveries: config.max_deliveries,
            instances: Vec::new(),
            relays: Vec::new(),
            keyed_lane_here: false,
            next_instance: 0,
            queue: Queue::default(),
            waiting: VecDeque::new(),
            parked_replies: VecDeque::new(),
            send_bucket: SendBucket::new(config.send_rate_per_service),
            noted: Default::default(),
        }
    }

    /// The linear rule the pattern index stands in for (tests compare them).
    #[cfg(test)]
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
            && self.relays.is_empty()
            && self.queue.is_empty()
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
    services: services::Services,
    /// Every service's `patterns`, indexed for routing: kept in step with
    /// them wherever they change (`receivers`).
    subscribers: courier_proto::pattern_index::PatternIndex<String>,
    /// References per stored message: services that still owe an ack (or
    /// hold it as a dead letter). Ordered, so the oldest live seq is cheap.
    refs: refcount::RefCounts,
    /// Ids of accepted messages within the dedup window.
    /// Kept as [`dedup::fingerprint`]s, in buckets by the ids' timestamps.
    dedup: dedup::DedupWindow,
    /// Name → (major version, receiving services); see `receivers`.
    route_cache: FastMap<String, Vec<(u16, Receivers)>>,
    /// See [`Broker::membership_changes`].
    membership_changes: u64,
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
    /// The latest time an input carried (broker time: deadlines, delays,
    /// timers and rate buckets run on it).
    now: Nanos,
    /// How far the wall clock is ahead of broker time (negative: behind);
    /// see [`Broker::set_wall_offset`].
    wall_offset: i64,
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
    /// On a backend: the ids accepted since the last good sync. A failed
    /// sync withdraws them from the dedup window, or a resend of a send
    /// refused as not stored would be acknowledged as its duplicate.
    batch_ids: Vec<uuid::Uuid>,
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
    /// The store's backend keeps delivery state, not this core
    /// (`upstream.rs`): set once, from [`MessageStore::keeps_deliveries`].
    upstream: bool,
    /// The history a SUBSCRIBE being told to the backend asked for: set
    /// just before its change is made, taken by it (`upstream.rs`).
    history_asked: StartFrom,
    /// A pause or resume being told to the backend is the whole service's
    /// (`subscriptions.rs`).
    pausing_whole: bool,
    /// Commands fetched from a replicated backend that were accepted on
    /// another node: where their replies go (`upstream.rs`).
    remote_routes: ExpiringMap<Uuid, upstream::RemoteRoute>,
}

impl<S: MessageStore> Broker<S> {
    pub fn new(config: Config, store: S) -> Broker<S> {
        let config_names_max = config.metrics_names_max;
        let dedup = dedup::DedupWindow::new(config.dedup_window_ms, config.dedup_ids_max);
        let reply_routes = ExpiringMap::new(
            config.reply_route_ms * NANOS_PER_MS,
            config.reply_routes_max,
        );
        let remote_routes = ExpiringMap::new(
            config.reply_route_ms * NANOS_PER_MS,
            config.reply_routes_max,
        );
        let upstream = !store.keeps_deliveries();
        Broker {
            config,
            store,
            conns: FastMap::default(),
            services: Default::default(),
            subscribers: courier_proto::pattern_index::PatternIndex::default(),
            refs: refcount::RefCounts::default(),
            dedup,
            route_cache: FastMap::default(),
            membership_changes: 0,
            reply_routes,
            reply_deliveries: FastMap::default(),
            held_reply_bytes: 0,
            next_delivery: 0,
            unsynced: Vec::new(),
            actions: Vec::new(),
            metrics: Metrics::default(),
            dirty: false,
            now: 0,
            wall_offset: 0,
            alerts: Vec::new(),
            errors: Vec::new(),
            repeats: repeats::Repeats::default(),
            checkpointed_at: 0,
            checkpointed_bytes: 0,
            degraded: false,
            deferred_ops: Vec::new(),
            batch_ops: Vec::new(),
            batch_ids: Vec::new(),
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
            upstream,
            history_asked: StartFrom::New,
            pausing_whole: false,
            remote_routes,
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

    /// How far the wall clock is ahead of broker time (negative: behind),
    /// as the network edge last read both. Inputs carry broker time, which
    /// never jumps; the wall clock is read through this offset only where
    /// the envelope means wall time: message timestamps, `expires_at`,
    /// `deliver_at`, dedup windows (ids carry the sender's clock), trace
    /// and dead-letter times. A step of the wall clock thus moves no
    /// deadline, delay, timer or rate bucket.
    pub fn set_wall_offset(&mut self, offset: i64) {
        self.wall_offset = offset;
    }

    /// Wall time at broker time `now`.
    pub(crate) fn wall(&self, now: Nanos) -> Nanos {
        now.saturating_add_signed(self.wall_offset)
    }

    /// Broker time at which the wall clock shows `wall` (a `deliver_at`).
    pub(crate) fn broker_time_at(&self, wall: Nanos) -> Nanos {
        wall.saturating_add_signed(self.wall_offset.saturating_neg())
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
}

#[cfg(test)]
mod tests;
