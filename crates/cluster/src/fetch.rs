//! A node's fetch loop for one service (docs/SCALE-OUT.md §4 "Competing
//! instances"): pulls from the service's two consumers no more than its
//! instances on this node can take, and hands each message over with
//! what the core needs to deliver and settle it.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_nats::jetstream::consumer::pull::Batch;
use async_nats::jetstream::consumer::PullConsumer;
use bytes::Bytes;
use courier_proto::{decode_message, Message};
use courier_store::AckHandle;
use futures_util::{FutureExt as _, StreamExt as _};
use tokio::sync::{watch, Notify};

use crate::ack_subject::AckSubject;
use crate::consumers::{consumer_name, Lane};
use crate::names::MESSAGES_STREAM;
use crate::store::{is_traced, REPLY_TO_HEADER};
use crate::Connection;

/// How long one pull waits for messages. Never a pull without one
/// (SCALE-OUT §16): the server holds a "no wait" pull open while the
/// consumer is at `max_ack_pending` and then fills it with redeliveries.
pub const FETCH_EXPIRES: Duration = Duration::from_secs(1);
/// How long a lookup of a consumer may take before it is tried again.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(1);

fn lookup_timed_out() -> async_nats::jetstream::stream::ConsumerError {
    async_nats::jetstream::stream::ConsumerError::new(
        async_nats::jetstream::stream::ConsumerErrorKind::TimedOut,
    )
}

/// The most messages a pull asks for while messages trickle in, whatever
/// the credit. JetStream gives each arriving message to the oldest
/// waiting pull until that pull has its batch: a large batch would let
/// one node take everything that trickles in for a whole `FETCH_EXPIRES`
/// while instances on other nodes idle. A full pull ends and its node
/// asks again, behind the others.
pub const FETCH_BATCH_MIN: u32 = 32;
/// The most messages one pull asks for, whatever the credit. A pull that
/// came back full found a backlog, where every node's pulls fill at once
/// and a small batch only adds round trips: the next pull asks for twice
/// as many, up to this; a pull that came back short goes back to
/// [`FETCH_BATCH_MIN`].
pub const FETCH_BATCH_MAX: u32 = 1024;

/// The next pull's batch after one that asked for `asked` and received
/// `received`, when the last batch size was `last`.
pub fn next_batch_size(last: u32, asked: u32, received: u32) -> u32 {
    if asked == 0 || received < asked {
        FETCH_BATCH_MIN
    } else if asked == last {
        (last * 2).min(FETCH_BATCH_MAX)
    } else {
        // Full, but the credit asked for less than the batch size: the
        // credit bounded the pull, not the backlog.
        last
    }
}

/// The most fetched messages handed to the core in one call.
pub const HANDOFF_MAX: usize = 256;
/// When there is no credit, how often it is looked at again even if
/// nobody signals room (a missed signal costs no more than this).
pub const ROOM_RECHECK: Duration = Duration::from_millis(250);
/// The first and the longest pause before looking for a consumer again
/// (it does not exist until the service subscribes) or after a failed pull.
pub const RETRY_PAUSE_MIN: Duration = Duration::from_millis(100);
pub const RETRY_PAUSE_MAX: Duration = Duration::from_secs(2);

/// Tells whether the message named `name` at stream seq `seq`, fetched
/// from the service's consumer of the lane, belongs to a history replay
/// instead (SCALE-OUT §4): such a message is acknowledged on the
/// consumer and not handed over.
pub type Skip = dyn Fn(Lane, &str, u64) -> bool + Send + Sync;

/// A message fetched for `service`, to hand to one of its instances.
#[derive(Clone, Debug)]
pub struct Fetched {
    pub service: String,
    pub lane: Lane,
    pub message: Arc<Message>,
    /// JetStream's delivery count: 1 on the first delivery.
    pub attempt: u32,
    /// The message's seq in `COURIER_MSGS` (dead letters are named by it).
    pub stream_seq: u64,
    /// Its ack subject: what [`courier_store::MessageStore::hold_fetched`]
    /// takes to settle it.
    pub handle: AckHandle,
    /// The node that accepted a command (`Courier-Reply-To`).
    pub reply_node: Option<String>,
    /// The accepting node traces its activity (`Courier-Traced`).
    pub traced: bool,
    /// Its consumer's `ack_wait`: JetStream hands it out again after
    /// this unless it is settled or kept alive ([`crate::in_progress`]).
    pub ack_wait: Duration,
}

/// What both lanes' loops share: the credit, and what each lane asked
/// for and has not received yet, so that the two together never ask for
/// more than the credit.
struct Shared<C, D> {
    credit: C,
    room: Arc<Notify>,
    deliver: Mutex<D>,
    /// Whether a fetched message belongs to a history replay instead.
    skip: Box<Skip>,
    /// Per lane (unkeyed, keyed): messages asked for, not yet received.
    asked: [AtomicU32; 2],
    /// How many lanes share the credit.
    lanes: u32,
}

fn index(lane: Lane) -> usize {
    match lane {
        Lane::Unkeyed => 0,
        Lane::Keyed => 1,
    }
}

/// Fetches `service`'s messages from both its consumers until `stop`
/// turns true (or its sender is gone). `credit` is what this node's
/// instances of the service can take now (the sum of `max_in_flight −
/// in_flight`); the loop waits on `room` when it is 0. Messages go to
/// `deliver` as they arrive, those that arrived together in one call (at
/// most [`HANDOFF_MAX`]); one that does not decode is terminated
/// (`+TERM`) and logged. A consumer that does not exist yet is looked for again with a
/// growing pause.
pub async fn run<C, D>(
    connection: Connection,
    service: String,
    credit: C,
    room: Arc<Notify>,
    deliver: D,
    stop: watch::Receiver<bool>,
) where
    C: Fn() -> u32 + Send + Sync,
    D: FnMut(Vec<Fetched>) + Send,
{
    run_lanes(
        connection,
        service,
        &[Lane::Unkeyed, Lane::Keyed],
        credit,
        room,
        deliver,
        Box::new(|_, _, _| false),
        0,
        &Mutex::default(),
        stop,
    )
    .await
}

/// [`run`] on the given lanes only: a node that does not hold the
/// service's keyed lane (SCALE-OUT §5) fetches the unkeyed one alone;
/// what `skip` names is acknowledged and not handed over. `gather`: the
/// messages a new holder of the lanes knows are due again from the last
/// one (see [`first_pull`]). `keyed_gaps`: what the keyed lane's holder
/// knows of its deliveries from an earlier run in the same tenure, taken
/// at the start and given back at the end (a pull that was waiting at the
/// consumer's leader when the lane stopped shows as a gap in the next run).
#[allow(clippy::too_many_arguments)] // the loop's inputs, each its own
pub async fn run_lanes<C, D>(
    connection: Connection,
    service: String,
    lanes: &[Lane],
    credit: C,
    room: Arc<Notify>,
    deliver: D,
    skip: Box<Skip>,
    gather: u32,
    keyed_gaps: &Mutex<DeliveryGaps>,
    stop: watch::Receiver<bool>,
) where
    C: Fn() -> u32 + Send + Sync,
    D: FnMut(Vec<Fetched>) + Send,
{
    let running: Vec<Lane> = [Lane::Unkeyed, Lane::Keyed]
        .into_iter()
        .filter(|lane| lanes.contains(lane))
        .collect();
    let shared = Shared {
        credit,
        room,
        deliver: Mutex::new(deliver),
        skip,
        asked: [AtomicU32::new(0), AtomicU32::new(0)],
        lanes: if running.len() == 2 { 2 } else { 1 },
    };
    let (connection, service, shared) = (&connection, &service, &shared);
    let loops = running.iter().map(|&lane| {
        let stop = stop.clone();
        async move {
            let mut gaps = match lane {
                Lane::Keyed => std::mem::take(&mut *lock(keyed_gaps)),
                Lane::Unkeyed => DeliveryGaps::default(),
            };
            lane_loop(connection, service, lane, shared, gather, &mut gaps, stop).await;
            if lane == Lane::Keyed {
                *lock(keyed_gaps) = gaps;
            }
        }
    });
    futures_util::future::join_all(loops).await;
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Whether to stop: `stop` is true or its sender is gone.
fn stopping(stop: &watch::Receiver<bool>) -> bool {
    *stop.borrow() || stop.has_changed().is_err()
}

/// Sleeps `pause`; false when told to stop meanwhile.
async fn pause_unless_stopped(pause: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(pause) => !stopping(stop),
        _ = stop.changed() => !stopping(stop),
    }
}

/// Asks `consumer` for up to `ask` messages; the pull ends after
/// [`FETCH_EXPIRES`] with fewer if fewer come.
pub(crate) async fn pull(
    consumer: &PullConsumer,
    ask: u32,
) -> Result<Batch, async_nats::jetstream::consumer::pull::BatchError> {
    consumer
        .batch()
        .max_messages(ask as usize)
        .expires(FETCH_EXPIRES)
        .messages()
        .await
}

/// The first pull's size for a holder that knows `gather` messages are
/// due again from the last holder, when the credit would ask for `ask`:
/// all of them (up to [`FETCH_BATCH_MAX`]) in one pull, handed to the
/// core together in stream order ([`in_log_order`]). JetStream hands them
/// out in the order their deadlines ran out, not stream order; pulled a
/// few at a time, a key's later message could go out before an earlier
/// one that came in the next pull. The core keeps what its instances
/// have no room for yet.
pub fn first_pull(ask: u32, gather: u32) -> u32 {
    ask.max(gather.min(FETCH_BATCH_MAX))
}

/// The next pull's size when the credit would ask for `ask`, and whether
/// it gathers the last holder's redeliveries: the first pull with credit
/// takes all `gather` of them ([`first_pull`]), and nothing of it goes to
/// the core before it ends; `gather` is then spent.
pub fn gathering_pull(ask: u32, gather: &mut u32) -> (u32, bool) {
    if ask > 0 && *gather > 0 {
        (first_pull(ask, std::mem::take(gather)), true)
    } else {
        (ask, false)
    }
}

/// Added to an ack deadline when waiting for what it makes due again:
/// JetStream looks for expired deliveries on a timer, not at the instant.
pub const REDELIVERY_MARGIN: Duration = Duration::from_millis(500);

/// Finds deliveries that went nowhere on a keyed lane. One node at a time
/// pulls the lane, so the consumer numbers its deliveries to that node
/// one after another (the consumer seq of each ack subject). A number
/// skipped is a delivery the consumer counts as made that never arrived:
/// a pull's inbox was gone with a lost connection, or the pull had been
/// given up. JetStream hands it out again only after `ack_wait`, and a
/// later message of its key, pulled meanwhile, would go first.
#[derive(Debug, Default)]
pub struct DeliveryGaps {
    last: Option<u64>,
}

impl DeliveryGaps {
    /// Notes the delivery numbered `consumer_seq`; true when one before it
    /// never came. A number not above the last one starts the count again
    /// (the consumer was made anew).
    pub fn skipped_before(&mut self, consumer_seq: u64) -> bool {
        let skipped = self.last.is_some_and(|last| consumer_seq > last + 1);
        self.last = Some(consumer_seq);
        skipped
    }

    /// Forgets the last number: the next pull gathers what went missing.
    pub fn restart(&mut self) {
        self.last = None;
    }
}

async fn lane_loop<C, D>(
    connection: &Connection,
    service: &str,
    lane: Lane,
    shared: &Shared<C, D>,
    mut gather: u32,
    gaps: &mut DeliveryGaps,
    mut stop: watch::Receiver<bool>,
) where
    C: Fn() -> u32 + Send + Sync,
    D: FnMut(Vec<Fetched>) + Send,
{
    let name = consumer_name(service, lane);
    let mine = &shared.asked[index(lane)];
    let mut consumer: Option<PullConsumer> = None;
    let mut retry = RETRY_PAUSE_MIN;
    let mut batch_size = FETCH_BATCH_MIN;
    // A pull already asked for while the last one was filling, and its size.
    let mut next_pull: Option<(Batch, u32)> = None;
    while !stopping(&stop) {
        let Some(pulling) = consumer.as_ref() else {
            // Bounded well below the JetStream context's timeout: while a
            // new consumer's leader is elected, a lookup can go unanswered,
            // and waiting it out would stall the lane for seconds.
            let lookup = tokio::time::timeout(
                LOOKUP_TIMEOUT,
                connection
                    .jetstream
                    .get_consumer_from_stream::<async_nats::jetstream::consumer::pull::Config, _, _>(&name, MESSAGES_STREAM),
            )
            .await
            .unwrap_or_else(|_| Err(lookup_timed_out()));
            match lookup {
                Ok(found) => {
                    consumer = Some(found);
                    retry = RETRY_PAUSE_MIN;
                }
                Err(e) => {
                    tracing::debug!("consumer {name}: {e}; looking again in {retry:?}");
                    if !pause_unless_stopped(retry, &mut stop).await {
                        return;
                    }
                    retry = (retry * 2).min(RETRY_PAUSE_MAX);
                }
            }
            continue;
        };
        let (mut batch, ask, gathering) = match next_pull.take() {
            Some((batch, ask)) => (batch, ask, false),
            None => match pull_with_credit(pulling, shared, lane, batch_size, &mut gather).await {
                Ok(Some(started)) => (started.batch, started.ask, started.gathering),
                Ok(None) => {
                    tokio::select! {
                        _ = shared.room.notified() => {}
                        _ = tokio::time::sleep(ROOM_RECHECK) => {}
                        _ = stop.changed() => {}
                    }
                    continue;
                }
                Err(e) => {
                    tracing::warn!("consumer {name}: pull failed: {e}; retrying in {retry:?}");
                    consumer = None;
                    if !pause_unless_stopped(retry, &mut stop).await {
                        return;
                    }
                    retry = (retry * 2).min(RETRY_PAUSE_MAX);
                    continue;
                }
            },
        };
        let lane_ack_wait = pulling.cached_info().config.ack_wait;
        let mut gap_found = false;
        let mut received = 0u32;
        // Messages that arrived together go to the core in one pass.
        let mut ready: Vec<Fetched> = Vec::new();
        let mut taken = 0u32;
        loop {
            let polled = batch.next().now_or_never();
            let polled = match polled {
                Some(next) if ready.len() < HANDOFF_MAX || gathering => Some(next),
                polled => {
                    if !gathering {
                        hand_over(shared, mine, &mut ready, &mut taken);
                    }
                    polled
                }
            };
            let next = match polled {
                Some(next) => next,
                None => tokio::select! {
                    biased;
                    _ = stop.changed() => {
                        if stopping(&stop) {
                            break;
                        }
                        continue;
                    }
                    next = tokio::time::timeout(FETCH_EXPIRES + LOOKUP_TIMEOUT, batch.next()) => match next {
                        Ok(next) => next,
                        // The server never ended the pull (a consumer's leader
                        // moving): ask again rather than wait on it.
                        Err(_) => break,
                    },
                },
            };
            match next {
                None => break,
                Some(Ok(message)) => {
                    received += 1;
                    taken += 1;
                    if next_pull.is_none() && pipelines(lane, batch_size, ask, received) {
                        next_pull = ask_ahead(pulling, shared, mine, ask - received).await;
                    }
                    if lane == Lane::Keyed && delivery_skipped(gaps, &message) {
                        // Neither this message nor the rest of the pull
                        // may go out before the one that went missing.
                        gap_found = true;
                        break;
                    }
                    let fetched = decode(connection, service, lane, lane_ack_wait, message).await;
                    match fetched {
                        Some(f) if (shared.skip)(lane, &f.message.name, f.stream_seq) => {
                            settle_skipped(connection, service, f).await;
                        }
                        fetched => ready.extend(fetched),
                    }
                }
                Some(Err(e)) => {
                    hand_over(shared, mine, &mut ready, &mut taken);
                    // Consumer deleted (the service unsubscribed), a lost
                    // connection, a server's refusal (503 while its leader
                    // is elected): look it up again, after a pause.
                    tracing::debug!("consumer {name}: {e}; looking it up again in {retry:?}");
                    consumer = None;
                    next_pull = None;
                    mine.store(0, Ordering::Release);
                    if !pause_unless_stopped(retry, &mut stop).await {
                        return;
                    }
                    retry = (retry * 2).min(RETRY_PAUSE_MAX);
                    break;
                }
            }
        }
        hand_over(shared, mine, &mut ready, &mut taken);
        batch_size = next_batch_size(batch_size, ask, received);
        if gap_found || stopping(&stop) {
            next_pull = None;
        }
        mine.store(
            next_pull.as_ref().map_or(0, |(_, ask)| *ask),
            Ordering::Release,
        );
        // The other lane may be waiting for what this one asked for.
        shared.room.notify_waiters();
        if gap_found {
            // What was dropped, the missing delivery and the rest of the
            // pull come back once their deadlines run out, in the order
            // the deadlines gave; the next pull gathers them all and
            // hands them over in log order, as after a takeover.
            let pause = lane_ack_wait + REDELIVERY_MARGIN;
            tracing::warn!(
                "consumer {name}: a delivery never arrived; pausing the lane {pause:?} until it is due again"
            );
            if !pause_unless_stopped(pause, &mut stop).await {
                return;
            }
            gather = FETCH_BATCH_MAX;
            gaps.restart();
        }
    }
}

/// A lane's pull, started ([`pull_with_credit`]).
struct Started {
    batch: Batch,
    ask: u32,
    /// It gathers the last holder's redeliveries ([`gathering_pull`]).
    gathering: bool,
}

/// Starts `lane`'s next pull for what the credit allows, at most
/// `batch_size`, and counts it as asked for; `None` when the instances
/// have no room. With two lanes, half the credit each, so that one lane
/// waiting out an empty pull does not hold all of it from the other.
async fn pull_with_credit<C, D>(
    pulling: &PullConsumer,
    shared: &Shared<C, D>,
    lane: Lane,
    batch_size: u32,
    gather: &mut u32,
) -> Result<Option<Started>, async_nats::jetstream::consumer::pull::BatchError>
where
    C: Fn() -> u32 + Send + Sync,
{
    let mine = &shared.asked[index(lane)];
    let other = &shared.asked[1 - index(lane)];
    let total = (shared.credit)();
    let free = total.saturating_sub(other.load(Ordering::Acquire));
    let (ask, gathering) = gathering_pull(
        free.min(total.div_ceil(shared.lanes)).min(batch_size),
        gather,
    );
    if ask == 0 {
        return Ok(None);
    }
    mine.store(ask, Ordering::Release);
    match pull(pulling, ask).await {
        Ok(batch) => Ok(Some(Started {
            batch,
            ask,
            gathering,
        })),
        Err(e) => {
            mine.store(0, Ordering::Release);
            Err(e)
        }
    }
}

/// Whether a pull of `ask` that has `received` so far should have the
/// next one asked for now: on the unkeyed lane, once pulls come back full
/// at the largest `batch_size` (a backlog drains), at the pull's half. The
/// next pull then waits at the consumer's leader when this one is done,
/// and the node holds more than its instances' window unacknowledged at
/// JetStream, which the hop every message takes through the node needs.
/// The keyed lane asks once at a time: its deliveries must come numbered
/// one after another ([`DeliveryGaps`]).
fn pipelines(lane: Lane, batch_size: u32, ask: u32, received: u32) -> bool {
    lane == Lane::Unkeyed
        && batch_size == FETCH_BATCH_MAX
        && ask >= FETCH_BATCH_MIN
        && received == ask / 2
}

/// The most messages a node asks for beyond what its instances have room
/// for, and only in a pull asked ahead ([`pipelines`]). They wait in the
/// node's queue, kept alive like every message it holds, until an
/// instance has room.
pub const PREFETCH_MAX: u32 = 4 * FETCH_BATCH_MAX;

/// Asks for the next pull ahead: what the instances have room for beyond
/// the `outstanding` messages of the pull still filling, plus up to
/// [`PREFETCH_MAX`]. None when that is less than a small pull or the pull
/// cannot be made: the lane asks again once this one ends.
async fn ask_ahead<C, D>(
    pulling: &PullConsumer,
    shared: &Shared<C, D>,
    mine: &AtomicU32,
    outstanding: u32,
) -> Option<(Batch, u32)>
where
    C: Fn() -> u32 + Send + Sync,
{
    let ask = (shared.credit)()
        .saturating_add(PREFETCH_MAX)
        .saturating_sub(outstanding)
        .min(PREFETCH_MAX);
    if ask < FETCH_BATCH_MIN {
        return None;
    }
    match pull(pulling, ask).await {
        Ok(batch) => {
            mine.fetch_add(ask, Ordering::AcqRel);
            Some((batch, ask))
        }
        Err(e) => {
            tracing::debug!("a pull asked ahead failed: {e}");
            None
        }
    }
}

/// Notes a keyed lane's delivery in `gaps`; true when one before it never
/// arrived. A message without an ack subject is left to [`decode`].
fn delivery_skipped(gaps: &mut DeliveryGaps, message: &async_nats::jetstream::Message) -> bool {
    let consumer_seq = message
        .reply
        .as_ref()
        .and_then(|reply| AckSubject::parse(reply).map(|ack| ack.consumer_seq));
    consumer_seq.is_some_and(|seq| gaps.skipped_before(seq))
}

/// Puts what one hand-over carries in the log's order, which is each
/// key's send order. JetStream gives messages back in the order their
/// ack deadlines ran out, and keep-alives (`+WPI`) move those deadlines:
/// a dead holder's messages of one key can come back to the next holder
/// a later one first.
pub fn in_log_order(ready: &mut [Fetched]) {
    if !ready.is_sorted_by_key(|f| f.stream_seq) {
        ready.sort_by_key(|f| f.stream_seq);
    }
}

/// Hands what is ready to the core in one call, in the log's order, and
/// counts it as no longer asked for.
fn hand_over<C, D>(
    shared: &Shared<C, D>,
    mine: &AtomicU32,
    ready: &mut Vec<Fetched>,
    taken: &mut u32,
) where
    D: FnMut(Vec<Fetched>) + Send,
{
    if !ready.is_empty() {
        in_log_order(ready);
        let mut deliver = shared
            .deliver
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        (*deliver)(std::mem::take(ready));
    }
    let done = std::mem::take(taken);
    let _ = mine.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
        Some(n.saturating_sub(done))
    });
}

/// Acknowledges on its consumer a message that a history replay hands
/// out instead.
async fn settle_skipped(connection: &Connection, service: &str, fetched: Fetched) {
    let acked = connection
        .client
        .publish(fetched.handle, Bytes::from_static(b"+ACK"))
        .await;
    if let Err(e) = acked {
        // Fetched again after its ack deadline, and skipped again.
        tracing::debug!(
            "service {service}: message {} left to its replay was not acked: {e}",
            fetched.stream_seq
        );
    }
}

/// Reads one fetched message, or terminates it when it cannot be read:
/// nothing from the network may stop the loop.
pub(crate) async fn decode(
    connection: &Connection,
    service: &str,
    lane: Lane,
    ack_wait: Duration,
    message: async_nats::jetstream::Message,
) -> Option<Fetched> {
    let message = message.message;
    let Some(reply) = message.reply.as_ref().map(|r| r.to_string()) else {
        tracing::warn!(
            "service {service}: a message on {} came without an ack subject; skipped",
            message.subject
        );
        return None;
    };
    let Some(ack) = AckSubject::parse(&reply) else {
        tracing::warn!(
            "service {service}: a message on {} came with `{reply}`, not an ack subject; skipped",
            message.subject
        );
        return None;
    };
    let (attempt, stream_seq) = (
        u32::try_from(ack.delivered).unwrap_or(u32::MAX),
        ack.stream_seq,
    );
    match decode_message(message.payload.clone()) {
        Ok(decoded) => {
            let headers = message.headers.as_ref();
            let reply_node = headers
                .and_then(|h| h.get(REPLY_TO_HEADER))
                .map(|v| v.as_str().to_string());
            let traced = is_traced(headers);
            Some(Fetched {
                service: service.to_string(),
                lane,
                message: Arc::new(decoded),
                attempt,
                stream_seq,
                handle: reply,
                reply_node,
                traced,
                ack_wait,
            })
        }
        Err(e) => {
            // Redelivering it would fail the same way, forever.
            tracing::warn!(
                "service {service}: message {stream_seq} on {} does not decode ({e}); terminated",
                message.subject
            );
            if let Err(e) = connection
                .client
                .publish(reply, Bytes::from_static(b"+TERM"))
                .await
            {
                tracing::warn!("service {service}: +TERM of message {stream_seq} not sent: {e}");
            }
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use courier_proto::Kind;

    fn fetched(stream_seq: u64, attempt: u32) -> Fetched {
        Fetched {
            service: "ledger".to_string(),
            lane: Lane::Keyed,
            message: Arc::new(Message::new(Kind::Event, "ledger.entry", Bytes::new())),
            attempt,
            stream_seq,
            handle: format!("ack-{stream_seq}-{attempt}"),
            reply_node: None,
            traced: false,
            ack_wait: Duration::from_secs(30),
        }
    }

    #[test]
    fn a_new_holder_pulls_the_last_holder_s_redeliveries_at_once() {
        assert_eq!(first_pull(32, 0), 32);
        assert_eq!(first_pull(32, 150), 150);
        assert_eq!(first_pull(512, 150), 512);
        assert_eq!(first_pull(32, 100_000), FETCH_BATCH_MAX);
    }

    #[test]
    fn a_hand_over_goes_in_log_order_whatever_order_the_deadlines_gave_back() {
        // A dead holder's messages, the later one's deadline run out first.
        let mut ready = vec![
            fetched(51, 2),
            fetched(36, 2),
            fetched(37, 2),
            fetched(52, 1),
        ];
        in_log_order(&mut ready);
        let order: Vec<(u64, u32)> = ready.iter().map(|f| (f.stream_seq, f.attempt)).collect();
        assert_eq!(order, [(36, 2), (37, 2), (51, 2), (52, 1)]);
        // One seq given twice keeps the order it came in.
        let mut twice = vec![fetched(9, 3), fetched(4, 1), fetched(9, 2)];
        in_log_order(&mut twice);
        let handles: Vec<&str> = twice.iter().map(|f| f.handle.as_str()).collect();
        assert_eq!(handles, ["ack-4-1", "ack-9-3", "ack-9-2"]);
    }

    #[test]
    fn a_skipped_delivery_number_is_a_gap_a_repeated_or_lower_one_is_not() {
        let mut gaps = DeliveryGaps::default();
        assert!(!gaps.skipped_before(7), "the first number seen is no gap");
        assert!(!gaps.skipped_before(8));
        assert!(gaps.skipped_before(10), "9 never came");
        assert!(!gaps.skipped_before(11));
        assert!(
            !gaps.skipped_before(3),
            "a consumer made anew counts from 1"
        );
        assert!(!gaps.skipped_before(4));
        gaps.restart();
        assert!(!gaps.skipped_before(40), "after a restart nothing is known");
        assert!(gaps.skipped_before(42));
    }

    #[test]
    fn only_a_draining_unkeyed_backlog_asks_ahead_once_at_half_a_pull() {
        let max = FETCH_BATCH_MAX;
        assert!(pipelines(Lane::Unkeyed, max, 1024, 512));
        assert!(!pipelines(Lane::Unkeyed, max, 1024, 511));
        assert!(!pipelines(Lane::Unkeyed, max, 1024, 513), "once a pull");
        assert!(
            pipelines(Lane::Unkeyed, max, 4096, 2048),
            "an asked-ahead pull too"
        );
        assert!(
            !pipelines(Lane::Keyed, max, 1024, 512),
            "the keyed lane never"
        );
        assert!(!pipelines(Lane::Unkeyed, 256, 256, 128), "no backlog yet");
        assert!(!pipelines(Lane::Unkeyed, max, 16, 8), "too small to matter");
    }

    #[test]
    fn the_first_pull_with_credit_gathers_once() {
        let mut gather = 300;
        assert_eq!(
            gathering_pull(0, &mut gather),
            (0, false),
            "no credit: wait"
        );
        assert_eq!(gather, 300);
        assert_eq!(gathering_pull(32, &mut gather), (300, true));
        assert_eq!(gather, 0);
        assert_eq!(gathering_pull(32, &mut gather), (32, false));
    }

    #[test]
    fn full_pulls_grow_the_batch_short_ones_shrink_it() {
        assert_eq!(next_batch_size(FETCH_BATCH_MIN, 32, 32), 64);
        assert_eq!(next_batch_size(512, 512, 512), FETCH_BATCH_MAX);
        assert_eq!(
            next_batch_size(FETCH_BATCH_MAX, 1024, 1024),
            FETCH_BATCH_MAX
        );
        // A trickle: the pull expired short.
        assert_eq!(next_batch_size(512, 512, 3), FETCH_BATCH_MIN);
        // The credit asked for less than the batch size and got it all.
        assert_eq!(next_batch_size(256, 10, 10), 256);
        // Nothing asked, nothing learned about the backlog.
        assert_eq!(next_batch_size(256, 0, 0), FETCH_BATCH_MIN);
    }
}
