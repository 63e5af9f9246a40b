//! [`ClusterStore`]: the broker core's [`MessageStore`] on a NATS
//! JetStream cluster (docs/SCALE-OUT.md §3, §4, §7, §16).
//!
//! The core calls the store under its lock, so nothing here waits on the
//! network: `append` and `upstream` hand their writes to tasks on the
//! node's runtime and return. The writes made since the last
//! `start_sync` form one batch, and the sync job's wait (run by the core
//! without its lock, on a thread of its own) blocks until every write of
//! the batch finished — the group commit of SCALE-OUT §3: a send's
//! SEND_RESULT, and a subscriber's RESULT, go out once their writes are
//! acknowledged by the cluster.
//!
//! Delivery state is the consumers' (`keeps_deliveries` is false): the
//! store keeps only the messages the node fetched, until the core
//! removes them, and settles each upstream as the core reports.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::context::{PublishAckFuture, PublishError, PublishErrorKind};
use async_nats::jetstream::kv;
use async_nats::jetstream::message::PublishMessage;
use async_nats::HeaderMap;
use bytes::{Bytes, BytesMut};
use courier_proto::{encode_message, encoded_message_len, Kind, Message};
use courier_store::{
    AckHandle, MessageStore, Replayed, Seq, StorageStats, StoreError, SyncDone, SyncJob, Upstream,
};
use tokio::sync::mpsc;

use crate::ack_subject::AckSubject;
use crate::consumers::MAX_ACK_PENDING_DEFAULT;
use crate::in_progress::InProgress;
use crate::names::{service_token, NodeId};
use crate::relay::{GivenBack, RelayHandle};
use crate::services::ServiceWriter;
use crate::{Connection, Provisioned};

/// Writes (publishes, settlements) waiting for the publisher task: a
/// full queue refuses sends (`storage_failed`) rather than grow without
/// bound while the cluster does not answer.
pub const PUBLISH_QUEUE_MAX: usize = 65_536;
/// Subscription changes waiting for their writer.
pub const SERVICE_QUEUE_MAX: usize = 1_024;
/// The longest a sync waits for its batch. Every write has its own
/// timeout ([`crate::JETSTREAM_TIMEOUT`] per request); this bounds a
/// subscription change's several requests and retries too.
pub const SYNC_WAIT_MAX: Duration = Duration::from_secs(60);

/// The header naming the node (and so the route) a command's replies go
/// back to (SCALE-OUT §3).
pub const REPLY_TO_HEADER: &str = "Courier-Reply-To";
/// On a message whose activity the accepting node traces: every node that
/// delivers it records the delivery too, and no node records one without
/// it (each node's sampler sees only what that node accepts).
pub const TRACED_HEADER: &str = "Courier-Traced";

/// Says in `headers` that the accepting node traces the message's
/// activity, when it does ([`TRACED_HEADER`]).
pub fn mark_traced(headers: &mut HeaderMap, traced: bool) {
    if traced {
        headers.insert(TRACED_HEADER, "1");
    }
}

/// Whether `headers` say the accepting node traces the message's activity.
pub fn is_traced(headers: Option<&HeaderMap>) -> bool {
    headers.is_some_and(|h| h.get(TRACED_HEADER).is_some())
}
/// Dead letters' headers (SCALE-OUT §7).
pub const ATTEMPTS_HEADER: &str = "Courier-Attempts";
pub const REASON_HEADER: &str = "Courier-Reason";
pub const DEAD_LETTERED_AT_HEADER: &str = "Courier-Dead-Lettered-At";
/// Per-message TTL, whole seconds (JetStream, `allow_msg_ttl`).
pub const TTL_HEADER: &str = "Nats-TTL";
/// A deferred message's schedule and the subject it fires into.
pub const SCHEDULE_HEADER: &str = "Nats-Schedule";
pub const SCHEDULE_TARGET_HEADER: &str = "Nats-Schedule-Target";

/// Settings of the consumers a subscription change creates.
#[derive(Clone, Copy, Debug)]
pub struct StoreOptions {
    pub consumer_replicas: usize,
    pub max_ack_pending: i64,
}

impl Default for StoreOptions {
    fn default() -> StoreOptions {
        StoreOptions {
            consumer_replicas: 3,
            max_ack_pending: MAX_ACK_PENDING_DEFAULT,
        }
    }
}

/// A schedule's time (`@at` and RFC 3339 UTC, whole seconds rounded up:
/// never delivered before `deliver_at`).
pub fn schedule_at(deliver_at: u64) -> String {
    let seconds = deliver_at.div_ceil(1_000_000_000);
    let time = UNIX_EPOCH + Duration::from_secs(seconds);
    format!("@at {}", humantime::format_rfc3339_seconds(time))
}

/// Where a deferred message waits as a schedule: a subject of its own
/// (a schedule's subject is its identity), outside every consumer's
/// filter.
pub fn schedule_subject(message: &Message) -> String {
    format!("courier.m.s.{}", message.id.simple())
}

/// The subject a durable message is stored on in `COURIER_MSGS`:
/// `courier.m.{c,e,ck,ek}.<name>`. Replies are never stored there (they
/// are routed, SCALE-OUT §10).
pub fn message_subject(message: &Message) -> Option<String> {
    let kind = match (message.kind, message.key.is_some()) {
        (Kind::Command, false) => "c",
        (Kind::Event, false) => "e",
        (Kind::Command, true) => "ck",
        (Kind::Event, true) => "ek",
        (Kind::Reply, _) => return None,
    };
    Some(format!("courier.m.{kind}.{}", message.name))
}

/// `courier.dl.<service token>.<stream seq>` in `COURIER_DEAD`.
pub fn dead_letter_subject(service: &str, stream_seq: u64) -> String {
    format!("courier.dl.{}.{stream_seq}", service_token(service))
}

/// Whole seconds from `now` (unix ns) to `expires_at`, rounded up, at
/// least 1 (JetStream's smallest TTL).
pub fn ttl_seconds(expires_at: u64, now: u64) -> u64 {
    expires_at
        .saturating_sub(now)
        .div_ceil(1_000_000_000)
        .max(1)
}

fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn encode(message: &Message) -> Result<Bytes, StoreError> {
    let mut buf = BytesMut::with_capacity(encoded_message_len(message));
    encode_message(message, &mut buf)
        .map_err(|e| StoreError::Io(format!("message {} cannot be encoded: {e}", message.id)))?;
    Ok(buf.freeze())
}

/// A header value on one line: NATS headers end at a line break.
fn header_text(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// The writes of one sync: how many are still out, the first failure,
/// and what to call once none is out.
struct Batch {
    state: Mutex<BatchState>,
}

#[derive(Default)]
struct BatchState {
    outstanding: u64,
    failed: u64,
    first_failure: Option<String>,
    /// Set once the batch's sync started; called by whoever settles the
    /// batch's last write.
    when_settled: Option<SyncDone>,
}

impl BatchState {
    fn result(&self) -> io::Result<()> {
        match &self.first_failure {
            None => Ok(()),
            Some(reason) => Err(io::Error::other(format!(
                "{} of the batch's writes to the NATS cluster failed; the first: {reason}",
                self.failed
            ))),
        }
    }

    /// The callback and its result, once nothing is out and a sync waits.
    fn take_settled(&mut self) -> Option<(SyncDone, io::Result<()>)> {
        if self.outstanding > 0 {
            return None;
        }
        let done = self.when_settled.take()?;
        Some((done, self.result()))
    }
}

impl Batch {
    fn new() -> Arc<Batch> {
        Arc::new(Batch {
            state: Mutex::new(BatchState::default()),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, BatchState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn ticket(self: &Arc<Batch>) -> Ticket {
        self.state().outstanding += 1;
        Ticket {
            batch: Some(self.clone()),
        }
    }

    /// Calls `done` once every write finished: at once if none is out.
    fn when_settled(&self, done: SyncDone) {
        let settled = {
            let mut state = self.state();
            state.when_settled = Some(done);
            state.take_settled()
        };
        if let Some((done, result)) = settled {
            done(result);
        }
    }
}

/// One write of a batch: finished once, with its result; dropped
/// unfinished (its task gone), it counts as failed.
struct Ticket {
    batch: Option<Arc<Batch>>,
}

impl Ticket {
    /// Finishes the write; if it was its batch's last and the batch's sync
    /// started, the sync's callback runs here.
    fn finish(self, result: Result<(), String>) {
        if let Some((done, result)) = self.settle(result) {
            done(result);
        }
    }

    /// [`Ticket::finish`] for the loop that sends every write: the sync's
    /// callback (the core's release of the batch, under its lock) runs in
    /// a task of its own, so that the loop goes on sending meanwhile.
    fn finish_in_send_loop(self, result: Result<(), String>) {
        if let Some((done, result)) = self.settle(result) {
            tokio::spawn(async move { done(result) });
        }
    }

    /// Counts the write finished; the sync's callback and its result if
    /// nothing of the batch is out any more.
    fn settle(mut self, result: Result<(), String>) -> Option<(SyncDone, io::Result<()>)> {
        let batch = self.batch.take()?;
        let mut state = batch.state();
        state.outstanding = state.outstanding.saturating_sub(1);
        if let Err(reason) = result {
            state.failed += 1;
            state.first_failure.get_or_insert(reason);
        }
        // Called outside the batch's lock.
        state.take_settled()
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.batch.is_some() {
            let ticket = Ticket {
                batch: self.batch.take(),
            };
            ticket.finish(Err("the write was dropped unfinished".to_string()));
        }
    }
}

/// A write for the publisher task, in the order made.
enum Op {
    /// A JetStream publish; its PubAck settles it.
    Publish {
        subject: String,
        headers: HeaderMap,
        payload: Bytes,
        ticket: Ticket,
    },
    /// A core NATS publish: on a message's ack subject, or a registry
    /// heartbeat.
    Settle {
        subject: String,
        body: Bytes,
        ticket: Ticket,
    },
    /// A publish to `COURIER_DEAD`, then `+ACK` on `ack` once stored.
    DeadLetter {
        subject: String,
        headers: HeaderMap,
        payload: Bytes,
        ack: String,
        ticket: Ticket,
    },
}

struct ServiceOp {
    change: Upstream,
    ticket: Ticket,
}

/// A fetched message the core may still read and settle.
struct Held {
    message: Arc<Message>,
    handle: AckHandle,
    /// The accepting node traces its activity.
    traced: bool,
    /// An outcome (ack, nak, dead letter) was sent for it.
    settled: bool,
}

/// The core's store on a NATS JetStream cluster (module docs).
pub struct ClusterStore {
    node: NodeId,
    next_seq: Seq,
    held: HashMap<Seq, Held>,
    /// Held messages kept alive on JetStream until settled.
    in_progress: Arc<InProgress>,
    /// Keys given back to a relay's holder (`relay.rs`).
    given_back: Arc<GivenBack>,
    /// The subscription table's writer (the keyed lane's holder joins
    /// and ends history replays with it).
    service_writer: ServiceWriter,
    /// Writes made since the last `start_sync`.
    batch: Arc<Batch>,
    batch_writes: u64,
    publishes: mpsc::Sender<Op>,
    changes: mpsc::Sender<ServiceOp>,
    /// Whether `COURIER_MSGS` takes `Nats-TTL`.
    ttl_allowed: bool,
    /// Whether `COURIER_MSGS` takes schedules (deferred sends).
    schedules_allowed: bool,
    discards: u64,
    sync_started: Option<(Instant, u64)>,
    stats: StorageStats,
    reports: Vec<String>,
}

impl ClusterStore {
    /// A store writing through `connection`, its tasks on `runtime`;
    /// `provisioned` are the node's streams and buckets.
    pub fn new(
        connection: Connection,
        runtime: tokio::runtime::Handle,
        node: NodeId,
        provisioned: &Provisioned,
        options: StoreOptions,
    ) -> ClusterStore {
        let (publishes, publish_queue) = mpsc::channel(PUBLISH_QUEUE_MAX);
        let (changes, change_queue) = mpsc::channel(SERVICE_QUEUE_MAX);
        let service_writer = ServiceWriter {
            services: provisioned.services.clone(),
            messages: provisioned.messages.clone(),
            replicas: options.consumer_replicas,
            max_ack_pending: options.max_ack_pending,
        };
        let writer = ChangeWriter {
            services: service_writer.clone(),
            registry: provisioned.registry.clone(),
            node: node.clone(),
        };
        let in_progress = InProgress::new();
        runtime.spawn(crate::in_progress::keep_alive(
            connection.client.clone(),
            Arc::downgrade(&in_progress),
        ));
        runtime.spawn(publish_loop(connection, publish_queue));
        runtime.spawn(change_loop(writer, change_queue));
        ClusterStore {
            node,
            next_seq: 1,
            held: HashMap::new(),
            in_progress,
            given_back: Arc::default(),
            service_writer,
            batch: Batch::new(),
            batch_writes: 0,
            publishes,
            changes,
            ttl_allowed: provisioned.messages.cached_info().config.allow_message_ttl,
            schedules_allowed: provisioned
                .messages
                .cached_info()
                .config
                .allow_message_schedules,
            discards: 0,
            sync_started: None,
            stats: StorageStats::default(),
            reports: Vec::new(),
        }
    }

    /// Where the fetch loops record what they hand to the core, so that
    /// JetStream does not hand it out again while this node holds it.
    pub fn in_progress(&self) -> Arc<InProgress> {
        self.in_progress.clone()
    }

    /// The keys this node gave back to a relay's holder: their relayed
    /// deliveries on the way are dropped until the key starts again.
    pub fn given_back(&self) -> Arc<GivenBack> {
        self.given_back.clone()
    }

    /// What changes the subscription table and the service consumers.
    pub fn service_writer(&self) -> ServiceWriter {
        self.service_writer.clone()
    }

    fn take_seq(&mut self) -> Seq {
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
    }

    fn ticket(&mut self) -> Ticket {
        self.batch_writes += 1;
        self.batch.ticket()
    }

    /// Queues a write of the current batch; one that cannot be queued
    /// fails the batch (its ticket is dropped unfinished).
    fn queue_write(&mut self, make: impl FnOnce(Ticket) -> Op) {
        let op = make(self.ticket());
        if let Err(e) = self.publishes.try_send(op) {
            tracing::warn!(
                "a write to the NATS cluster could not be queued ({e}); the next sync fails"
            );
        }
    }

    /// Sends `body` on a held message's ack subject, unless it was
    /// settled already; whether it was sent.
    fn settle(&mut self, seq: Seq, body: &'static str) -> bool {
        let Some(held) = self.held.get_mut(&seq) else {
            return false;
        };
        if held.settled {
            return false;
        }
        held.settled = true;
        self.in_progress.release(&held.handle);
        let subject = held.handle.clone();
        self.queue_write(|ticket| Op::Settle {
            subject,
            body: Bytes::from_static(body.as_bytes()),
            ticket,
        });
        true
    }

    fn nak(&mut self, seq: Seq, delay_ms: u64) {
        let Some(held) = self.held.get_mut(&seq) else {
            tracing::debug!("NAK of seq {seq}, which this node does not hold");
            return;
        };
        if held.settled {
            return;
        }
        held.settled = true;
        self.in_progress.release(&held.handle);
        if let (Some(key), Some(relayed)) = (&held.message.key, RelayHandle::parse(&held.handle)) {
            self.given_back.given_back(&relayed, key);
        }
        let body = if delay_ms == 0 {
            Bytes::from_static(b"-NAK")
        } else {
            let ns = u128::from(delay_ms) * 1_000_000;
            Bytes::from(format!("-NAK {{\"delay\": {ns}}}"))
        };
        let subject = held.handle.clone();
        self.queue_write(|ticket| Op::Settle {
            subject,
            body,
            ticket,
        });
    }

    fn dead_letter(&mut self, service: &str, seq: Seq, attempts: u32, reason: &str, at: u64) {
        let Some(held) = self.held.get_mut(&seq) else {
            tracing::debug!("dead letter of seq {seq}, which this node does not hold");
            return;
        };
        if held.settled {
            return;
        }
        held.settled = true;
        self.in_progress.release(&held.handle);
        let ack = held.handle.clone();
        let message = held.message.clone();
        let traced = held.traced;
        // Waited for like a change (see `change`).
        self.take_seq();
        let built = AckSubject::parse(&ack)
            .map(|parsed| parsed.stream_seq)
            .or_else(|| RelayHandle::parse(&ack).map(|relayed| relayed.stream_seq))
            .ok_or_else(|| {
                format!("the message's ack handle `{ack}` is not a JetStream ack subject")
            })
            .and_then(|parsed| {
                encode(&message)
                    .map(|payload| (parsed, payload))
                    .map_err(|e| e.to_string())
            });
        match built {
            Ok((stream_seq, payload)) => {
                let mut headers = HeaderMap::new();
                headers.insert(
                    async_nats::header::NATS_MESSAGE_ID,
                    format!("dl.{service}.{stream_seq}").as_str(),
                );
                headers.insert(ATTEMPTS_HEADER, attempts.to_string().as_str());
                headers.insert(REASON_HEADER, header_text(reason).as_str());
                headers.insert(DEAD_LETTERED_AT_HEADER, at.to_string().as_str());
                // Its replay, if any, is traced like the original.
                mark_traced(&mut headers, traced);
                let subject = dead_letter_subject(service, stream_seq);
                self.queue_write(|ticket| Op::DeadLetter {
                    subject,
                    headers,
                    payload,
                    ack,
                    ticket,
                });
            }
            Err(reason) => {
                let report = format!("service {service}: seq {seq} not dead-lettered: {reason}");
                tracing::warn!("{report}");
                self.reports.push(report.clone());
                self.ticket().finish(Err(report));
            }
        }
    }

    fn change(&mut self, change: Upstream) {
        // A seq of its own: what waits for the change (the subscriber's
        // RESULT) waits for a sync that covers it, not for one already
        // under way when it was made (the core releases by seq).
        self.take_seq();
        let ticket = self.ticket();
        if let Err(e) = self.changes.try_send(ServiceOp { change, ticket }) {
            tracing::warn!("a subscription change could not be queued ({e}); the next sync fails");
        }
    }
}

impl MessageStore for ClusterStore {
    fn append(&mut self, message: Arc<Message>) -> Result<Seq, StoreError> {
        self.append_traced(message, false)
    }

    fn append_traced(&mut self, message: Arc<Message>, traced: bool) -> Result<Seq, StoreError> {
        let subject = message_subject(&message).ok_or_else(|| {
            StoreError::Io("a reply is routed to its requester, never stored in the log".into())
        })?;
        let payload = encode(&message)?;
        let mut headers = HeaderMap::new();
        headers.insert(
            async_nats::header::NATS_MESSAGE_ID,
            message.id.hyphenated().to_string().as_str(),
        );
        if message.kind == Kind::Command {
            headers.insert(REPLY_TO_HEADER, self.node.as_str());
        }
        mark_traced(&mut headers, traced);
        if let (Some(expires_at), true) = (message.expires_at, self.ttl_allowed) {
            headers.insert(
                TTL_HEADER,
                ttl_seconds(expires_at, unix_ns()).to_string().as_str(),
            );
        }
        // Deferred: stored as a schedule of its own that the servers fire
        // at `deliver_at` into the message's subject, replicated like any
        // message, so it survives every node (§8).
        let subject = match message.deliver_at {
            Some(at) if at > unix_ns() && !self.schedules_allowed => {
                return Err(StoreError::Io(
                    "deferred delivery is not available: the cluster's message stream has a byte limit (--retention-bytes), and JetStream schedules no messages in a stream that refuses sends when full".to_string(),
                ));
            }
            Some(at) if at > unix_ns() => {
                headers.insert(SCHEDULE_HEADER, schedule_at(at).as_str());
                headers.insert(SCHEDULE_TARGET_HEADER, subject.as_str());
                schedule_subject(&message)
            }
            _ => subject,
        };
        // Reserved first: a send refused for a full queue fails alone,
        // not the batch it would have joined.
        let permit = self.publishes.try_reserve().map_err(|e| {
            StoreError::Io(format!(
                "{e}: {PUBLISH_QUEUE_MAX} writes are waiting for the NATS cluster"
            ))
        })?;
        // Fields, not `self.ticket()`: the permit borrows `publishes`.
        self.batch_writes += 1;
        let ticket = self.batch.ticket();
        permit.send(Op::Publish {
            subject,
            headers,
            payload,
            ticket,
        });
        Ok(self.take_seq())
    }

    fn journal(&mut self, _entry: &[u8]) -> Result<Seq, StoreError> {
        // Delivery state is the consumers'; nothing to keep.
        Ok(self.take_seq())
    }

    fn get(&mut self, seq: Seq) -> Result<Option<Arc<Message>>, StoreError> {
        Ok(self.held.get(&seq).map(|h| h.message.clone()))
    }

    /// A held message the core forgot without an outcome is NAKed at
    /// once: it must not sit until the consumer's `ack_wait`.
    fn remove(&mut self, seq: Seq) {
        let Some(held) = self.held.get(&seq) else {
            return;
        };
        if !held.settled {
            self.nak(seq, 0);
        }
        self.held.remove(&seq);
    }

    fn sync(&mut self) -> Result<(), StoreError> {
        match self.start_sync()? {
            None => Ok(()),
            Some(mut job) => {
                let result = job.run();
                self.finish_sync(job, result)
            }
        }
    }

    fn start_sync(&mut self) -> Result<Option<SyncJob>, StoreError> {
        if self.batch_writes == 0 {
            return Ok(None);
        }
        let batch = std::mem::replace(&mut self.batch, Batch::new());
        let writes = std::mem::take(&mut self.batch_writes);
        self.sync_started = Some((Instant::now(), writes));
        Ok(Some(SyncJob::acknowledged(
            self.next_seq,
            SYNC_WAIT_MAX,
            move |done| batch.when_settled(done),
        )))
    }

    fn finish_sync(&mut self, job: SyncJob, result: io::Result<()>) -> Result<(), StoreError> {
        let _ = job;
        if let Some((started, writes)) = self.sync_started.take() {
            self.stats
                .sync_seconds
                .observe(started.elapsed().as_secs_f64());
            self.stats.sync_batch_records.observe(writes as f64);
        }
        result.map_err(|e| {
            self.discards += 1;
            StoreError::Io(e.to_string())
        })
    }

    fn discards(&self) -> u64 {
        self.discards
    }

    fn replay_chunk(
        &mut self,
        _after: Seq,
        _max_records: usize,
    ) -> Result<Vec<(Seq, Replayed)>, StoreError> {
        Ok(Vec::new())
    }

    fn save_snapshot(&mut self, _covers: Seq, _state: &[u8]) -> Result<(), StoreError> {
        Ok(())
    }

    fn load_snapshot(&mut self) -> Result<Option<(Seq, Bytes)>, StoreError> {
        Ok(None)
    }

    fn scan_messages(
        &mut self,
        _from: Seq,
        _f: &mut dyn FnMut(Seq, Arc<Message>),
    ) -> Result<(), StoreError> {
        Ok(())
    }

    fn seq_at_time(&mut self, _timestamp: u64) -> Result<Seq, StoreError> {
        Ok(self.next_seq)
    }

    fn next_seq(&self) -> Seq {
        self.next_seq
    }

    fn compact(&mut self, _before: Seq, _older_than: u64) -> Result<u64, StoreError> {
        Ok(0)
    }

    fn len(&self) -> usize {
        self.held.len()
    }

    fn persistent(&self) -> bool {
        true
    }

    fn storage_stats(&self) -> StorageStats {
        self.stats.clone()
    }

    fn take_reports(&mut self) -> Vec<String> {
        std::mem::take(&mut self.reports)
    }

    fn keeps_deliveries(&self) -> bool {
        false
    }

    fn hold_fetched(
        &mut self,
        message: Arc<Message>,
        handle: AckHandle,
        traced: bool,
    ) -> Result<Seq, StoreError> {
        let seq = self.take_seq();
        self.held.insert(
            seq,
            Held {
                message,
                handle,
                traced,
                settled: false,
            },
        );
        Ok(seq)
    }

    fn fetched_handle(&self, seq: Seq) -> Option<AckHandle> {
        self.held.get(&seq).map(|held| held.handle.clone())
    }

    fn fetched_traced(&self, seq: Seq) -> bool {
        self.held.get(&seq).is_some_and(|held| held.traced)
    }

    fn upstream(&mut self, change: Upstream) {
        match change {
            Upstream::Ack { seq } => {
                if !self.settle(seq, "+ACK") {
                    tracing::debug!("ACK of seq {seq}, which this node does not hold unsettled");
                }
            }
            Upstream::Nak { seq, delay_ms } => self.nak(seq, delay_ms),
            Upstream::DeadLetter {
                service,
                seq,
                attempts,
                reason,
                at,
            } => self.dead_letter(&service, seq, attempts, &reason, at),
            // A bus connection's entry holds nothing up: the connection
            // works whether or not other nodes see it yet, so its write
            // fails no batch (it is retried, then reported).
            change @ Upstream::Registry { on_bus: true, .. } => {
                let detached = Ticket { batch: None };
                if let Err(e) = self.changes.try_send(ServiceOp {
                    change,
                    ticket: detached,
                }) {
                    tracing::warn!("a bus connection's registry entry could not be queued ({e})");
                }
            }
            change @ (Upstream::Subscribe { .. }
            | Upstream::Unsubscribe { .. }
            | Upstream::Pause { .. }
            | Upstream::Resume { .. }
            | Upstream::Registry { .. }) => self.change(change),
            Upstream::RegistryHeartbeat { service, id } => {
                let heartbeat = crate::service_registry::Heartbeat { service, id };
                let body = match serde_json::to_vec(&heartbeat) {
                    Ok(body) => body,
                    Err(e) => {
                        tracing::warn!("a registry heartbeat could not be encoded: {e}");
                        return;
                    }
                };
                // Not stored, and one lost is one missed: it fails no batch.
                let publish = Op::Settle {
                    subject: crate::names::REGISTRY_HEARTBEATS.to_string(),
                    body: body.into(),
                    ticket: Ticket { batch: None },
                };
                if let Err(e) = self.publishes.try_send(publish) {
                    tracing::warn!("a registry heartbeat could not be queued ({e})");
                }
            }
        }
    }
}

/// Sends the writes in the order made — a stream's order is its
/// publishes' order, which per-key ordering relies on — and waits for
/// their PubAcks concurrently (each in a task of its own), so that a
/// batch of sends costs about one round trip, not one per send.
async fn publish_loop(connection: Connection, mut ops: mpsc::Receiver<Op>) {
    while let Some(op) = ops.recv().await {
        match op {
            Op::Publish {
                subject,
                headers,
                payload,
                ticket,
            } => {
                let publish = Publish {
                    subject,
                    headers,
                    payload,
                };
                let first = publish.send(&connection.jetstream).await;
                let jetstream = connection.jetstream.clone();
                tokio::spawn(async move {
                    ticket.finish(publish.stored(&jetstream, first).await);
                });
            }
            Op::Settle {
                subject,
                body,
                ticket,
            } => {
                let sent = connection.client.publish(subject, body).await;
                ticket.finish_in_send_loop(sent.map_err(|e| e.to_string()));
            }
            Op::DeadLetter {
                subject,
                headers,
                payload,
                ack,
                ticket,
            } => {
                let publish = Publish {
                    subject,
                    headers,
                    payload,
                };
                let first = publish.send(&connection.jetstream).await;
                let (jetstream, client) = (connection.jetstream.clone(), connection.client.clone());
                tokio::spawn(async move {
                    // Acked only once the dead letter is stored: a failure
                    // leaves the original to be redelivered and
                    // dead-lettered again (the dead letter's id makes that
                    // a duplicate).
                    let result = match publish.stored(&jetstream, first).await {
                        Ok(()) => client
                            .publish(ack, Bytes::from_static(b"+ACK"))
                            .await
                            .map_err(|e| e.to_string()),
                        Err(e) => Err(format!("dead letter not stored: {e}")),
                    };
                    ticket.finish(result);
                });
            }
        }
    }
}

/// How long a publish waits for its PubAck before it is made again: a
/// server that died with it never answers, and its stream's next leader
/// is elected within a few seconds.
const PUBACK_PATIENCE: Duration = Duration::from_secs(2);
/// How long a publish is made again, from its first try, before what
/// waits on it fails (its send is refused `storage_failed`); within the
/// SDK's send timeout (30 s), so the client hears the refusal.
const PUBLISH_RETRY_FOR: Duration = Duration::from_secs(12);
const PUBLISH_RETRY_PAUSE: Duration = Duration::from_millis(50);

/// A JetStream publish that can be made again: it carries `Nats-Msg-Id`,
/// so the stream stores it once however often it arrives (SCALE-OUT §6).
struct Publish {
    subject: String,
    headers: HeaderMap,
    payload: Bytes,
}

impl Publish {
    async fn send(
        &self,
        jetstream: &async_nats::jetstream::Context,
    ) -> Result<PublishAckFuture, PublishError> {
        let message = PublishMessage::build()
            .payload(self.payload.clone())
            .headers(self.headers.clone());
        jetstream.send_publish(self.subject.clone(), message).await
    }

    /// Waits for the PubAck of `first`, publishing again while the cluster
    /// cannot store it for a moment (a leader being elected answers "no
    /// stream", a dead one nothing at all), so that a failover delays
    /// sends instead of refusing them. A duplicate (`duplicate: true`) is
    /// stored already: success. Another refusal (a full stream, a message
    /// too large) fails at once.
    async fn stored(
        &self,
        jetstream: &async_nats::jetstream::Context,
        first: Result<PublishAckFuture, PublishError>,
    ) -> Result<(), String> {
        let started = tokio::time::Instant::now();
        let repeatable = self
            .headers
            .get(async_nats::header::NATS_MESSAGE_ID)
            .is_some();
        let mut pause = PUBLISH_RETRY_PAUSE;
        let mut attempt = first;
        loop {
            let error = match attempt {
                Ok(ack) => match tokio::time::timeout(PUBACK_PATIENCE, ack).await {
                    Ok(Ok(_)) => return Ok(()),
                    Ok(Err(e)) => e,
                    Err(_) => PublishError::new(PublishErrorKind::TimedOut),
                },
                Err(e) => e,
            };
            let passing = matches!(
                error.kind(),
                PublishErrorKind::StreamNotFound
                    | PublishErrorKind::TimedOut
                    | PublishErrorKind::BrokenPipe
                    | PublishErrorKind::MaxAckPending
            );
            if !repeatable || !passing || started.elapsed() + pause > PUBLISH_RETRY_FOR {
                return Err(error.to_string());
            }
            tracing::debug!(subject = %self.subject, "{error}; publishing again in {pause:?}");
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(1));
            attempt = self.send(jetstream).await;
        }
    }
}

/// Where the changes of [`change_loop`] go.
struct ChangeWriter {
    services: ServiceWriter,
    registry: kv::Store,
    node: NodeId,
}

impl ChangeWriter {
    async fn change(&self, change: &Upstream) -> Result<(), String> {
        match change {
            Upstream::Registry {
                service,
                id,
                on_bus,
                record,
            } => {
                let write = |key: String, record: Option<Bytes>| async move {
                    crate::service_registry::write(&self.registry, &key, record)
                        .await
                        .map_err(|e| e.to_string())
                };
                let registered = crate::service_registry::entry_key(service, id, None);
                let bus = crate::service_registry::entry_key(service, id, Some(&self.node));
                match record {
                    Some(record) if *on_bus => write(bus, Some(record.clone())).await,
                    Some(record) => write(registered, Some(record.clone())).await,
                    // What left may have been either: both keys go.
                    None => {
                        write(registered, None).await?;
                        write(bus, None).await
                    }
                }
            }
            change => self
                .services
                .change(change)
                .await
                .map_err(|e| e.to_string()),
        }
    }
}

/// Carries out subscription and registry changes one at a time, in the
/// order made: a subscribe and an unsubscribe of one pattern must not
/// swap, nor two changes of one instance.
async fn change_loop(writer: ChangeWriter, mut ops: mpsc::Receiver<ServiceOp>) {
    while let Some(ServiceOp { change, ticket }) = ops.recv().await {
        let mut result = writer.change(&change).await;
        // A change is idempotent: one that met a passing refusal (a
        // stream leader being elected answers "no responders") is made
        // again, for a while, before its sync fails.
        let mut pause = CHANGE_RETRY_PAUSE;
        let deadline = tokio::time::Instant::now() + CHANGE_RETRY_FOR;
        while let Err(e) = &result {
            if tokio::time::Instant::now() + pause > deadline {
                tracing::warn!("{e}");
                break;
            }
            tracing::debug!("{e}; trying again in {pause:?}");
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(1));
            result = writer.change(&change).await;
        }
        ticket.finish(result);
    }
}

/// How long a failing subscription change is tried again before its sync
/// fails, and the first pause between tries.
const CHANGE_RETRY_FOR: Duration = Duration::from_secs(5);
const CHANGE_RETRY_PAUSE: Duration = Duration::from_millis(50);

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails, which is its point
mod tests {
    use super::*;
    use courier_proto::decode_message;

    #[test]
    fn subjects_follow_kind_and_key() {
        let mut m = Message::new(Kind::Command, "todo.create", "{}");
        assert_eq!(message_subject(&m).unwrap(), "courier.m.c.todo.create");
        m.key = Some(Bytes::from_static(b"k1"));
        assert_eq!(message_subject(&m).unwrap(), "courier.m.ck.todo.create");
        let mut e = Message::new(Kind::Event, "todo.created", "{}");
        assert_eq!(message_subject(&e).unwrap(), "courier.m.e.todo.created");
        e.key = Some(Bytes::from_static(b"k1"));
        assert_eq!(message_subject(&e).unwrap(), "courier.m.ek.todo.created");
        assert!(message_subject(&Message::new(Kind::Reply, "todo.done", "")).is_none());
        assert_eq!(
            dead_letter_subject("billing.eu", 42),
            "courier.dl.billing~eu.42"
        );
    }

    #[test]
    fn the_stored_body_decodes_to_the_message() {
        let mut m = Message::new(Kind::Event, "todo.created", "{\"text\":\"milk\"}");
        m.key = Some(Bytes::from_static(b"list-7"));
        m.expires_at = Some(1_900_000_000_000_000_000);
        m.sender = "todo".into();
        m.timestamp = 1_800_000_000_000_000_000;
        m.parent_id = Some(courier_proto::new_id());
        m.headers = vec![("trace".into(), "abc".into())];
        let body = encode(&m).unwrap();
        assert_eq!(decode_message(body).unwrap(), m);
    }

    #[test]
    fn ttl_rounds_up_to_whole_seconds() {
        let s = 1_000_000_000;
        assert_eq!(ttl_seconds(10 * s, 10 * s), 1);
        assert_eq!(ttl_seconds(10 * s + 1, 10 * s), 1);
        assert_eq!(ttl_seconds(12 * s + 1, 10 * s), 3);
        assert_eq!(ttl_seconds(5 * s, 10 * s), 1);
    }

    fn sync_of(batch: &Arc<Batch>, limit: Duration) -> SyncJob {
        let batch = batch.clone();
        SyncJob::acknowledged(1, limit, move |done| batch.when_settled(done))
    }

    #[test]
    fn a_batch_waits_for_every_write_and_reports_the_first_failure() {
        let batch = Batch::new();
        let a = batch.ticket();
        let b = batch.ticket();
        let mut job = sync_of(&batch, Duration::from_secs(10));
        let waiter = std::thread::spawn(move || job.run());
        a.finish(Ok(()));
        b.finish(Err("no quorum".into()));
        let e = waiter.join().unwrap().unwrap_err();
        assert!(e.to_string().contains("no quorum"), "{e}");

        let batch = Batch::new();
        drop(batch.ticket());
        let e = sync_of(&batch, Duration::from_secs(1)).run().unwrap_err();
        assert!(e.to_string().contains("dropped"), "{e}");

        let batch = Batch::new();
        let _held = batch.ticket();
        let e = sync_of(&batch, Duration::from_millis(50))
            .run()
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
    }

    #[test]
    fn a_batch_calls_back_once_from_its_last_write_outside_its_lock() {
        let batch = Batch::new();
        let a = batch.ticket();
        let b = batch.ticket();
        let calls = Arc::new(Mutex::new(Vec::new()));
        let wait = sync_of(&batch, Duration::from_secs(1))
            .take_backend_wait()
            .unwrap();
        {
            let (calls, batch) = (calls.clone(), batch.clone());
            // Taking the batch's lock in the callback would deadlock if
            // it ran under it.
            wait.start(move |result| {
                let outstanding = batch.state().outstanding;
                calls.lock().unwrap().push((result.is_ok(), outstanding));
            });
        }
        a.finish(Ok(()));
        assert!(calls.lock().unwrap().is_empty(), "a write is still out");
        b.finish(Ok(()));
        assert_eq!(*calls.lock().unwrap(), [(true, 0)]);

        // Settled before its sync started: called at once.
        let batch = Batch::new();
        batch.ticket().finish(Ok(()));
        let mut job = sync_of(&batch, Duration::from_millis(50));
        assert!(job.run().is_ok());
    }
}
