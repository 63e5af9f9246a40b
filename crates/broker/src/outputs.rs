//! What the broker hands the edge: actions to carry out, and the
//! counters and listings it reads out.

use super::*;

/// What the I/O layer must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Deliver {
        conn: ConnId,
        delivery: DeliveryId,
        attempt: u32,
        message: Arc<Message>,
        /// Where the log holds the message; 0: it holds none (a transient
        /// message, a reply).
        log_seq: Seq,
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
    /// An admin's `courier.services.list` on a replicated backend: the
    /// core's `listing` has the cluster's services but only this node's
    /// instances; the edge adds the other nodes' and answers `request`
    /// with one final `courier.services.listing` reply.
    ServicesQuery {
        conn: ConnId,
        request: Uuid,
        activity_id: Uuid,
        listing: serde_json::Value,
    },
    /// An admin's `courier.dead-letters.*` command on a replicated
    /// backend, which keeps the dead letters (`upstream.rs`): the edge
    /// carries out `query` there and hands the outcome to
    /// [`crate::Broker::dead_letters_answered`], which answers `request`
    /// with its reply and then the command's send `seq`.
    DeadLetterQuery {
        conn: ConnId,
        seq: u64,
        quiet: bool,
        request: Uuid,
        activity_id: Uuid,
        query: DeadLetterQuery,
    },
    /// A reply to a command accepted on another node of a replicated
    /// backend (`upstream.rs`): the edge hands it to `node`, whose core
    /// takes it with [`crate::Broker::remote_reply`], and answers `conn`'s
    /// send `seq` with what that returned
    /// ([`crate::Broker::forwarded_reply_answer`]).
    ForwardReply {
        conn: ConnId,
        seq: u64,
        quiet: bool,
        node: String,
        /// The command's sender: its instances elsewhere take the reply
        /// if `node` is gone ([`crate::Broker::reply_to_service`]).
        requester: String,
        message: Arc<Message>,
    },
    /// The answer to a reply another node forwarded here
    /// ([`crate::Broker::remote_reply`] said
    /// [`crate::RemoteReply::Pending`]): it waited for the requester's
    /// credit in its stream, and went out, or was discarded or refused.
    /// The edge sends it to the node awaiting `answer`.
    AnswerForwardedReply {
        answer: u64,
        code: ErrorCode,
        reason: String,
    },
    /// A reply to a command this node does not know (its replier
    /// reconnected here while handling it), on a replicated backend: the
    /// edge asks the other nodes where its replies go
    /// ([`crate::Broker::reply_route_of`]) and hands their answer to
    /// [`crate::Broker::reply_route_found`].
    FindReplyRoute {
        conn: ConnId,
        seq: u64,
        quiet: bool,
        message: Arc<Message>,
    },
    /// A transient message for `service`, which has no instance here that
    /// takes it, on a replicated backend: the edge offers it to the nodes
    /// with instances of the service (one of them, at most once), whose
    /// cores take it with [`crate::Broker::remote_transient`].
    ForwardTransient {
        service: String,
        message: Arc<Message>,
        /// This node traces its activity: the node that delivers it
        /// records the delivery ([`crate::Fetched::traced`]).
        traced: bool,
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
    pub(crate) oldest_seq: Option<Seq>,
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
