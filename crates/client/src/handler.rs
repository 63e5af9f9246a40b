//! Handlers and the context they get for each delivery.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use courier_proto::{Kind, Message, Nack};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::{Client, Error, Handling, Inner, MessageBuilder, Result, HANDLING};

/// Any error a handler may return; it nacks the delivery.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

type HandlerFuture = Pin<Box<dyn Future<Output = std::result::Result<(), BoxError>> + Send>>;
pub(crate) type Handler = Arc<dyn Fn(Incoming) -> HandlerFuture + Send + Sync>;

pub(crate) fn boxed<F, Fut, E>(handler: F) -> Handler
where
    F: Fn(Incoming) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = std::result::Result<(), E>> + Send + 'static,
    E: Into<BoxError>,
{
    Arc::new(move |incoming| {
        let fut = handler(incoming);
        Box::pin(async move { fut.await.map_err(Into::into) })
    })
}

/// A delivered command or event, and the means to answer it.
///
/// Messages sent through it (or through any [`Client`] on the handler's
/// task) carry this message's `activity_id`, its id as their `parent_id`,
/// and a child of its `traceparent`.
pub struct Incoming {
    pub(crate) client: Client,
    pub(crate) generation: u64,
    pub(crate) delivery: u64,
    pub(crate) attempt: u32,
    pub(crate) delivered: Arc<Delivered>,
    /// Its place in its key's line, when the connection takes keys
    /// pipelined ([`KeyLine`]).
    pub(crate) ticket: Option<Box<KeyTicket>>,
}

/// What a delivery's handler and its runner share: one allocation per
/// delivery for the message and whether it was settled.
pub(crate) struct Delivered {
    pub(crate) message: Message,
    pub(crate) settled: AtomicBool,
    /// Settled by a nack, an error or `abandon`: the broker takes the
    /// key's later deliveries back.
    pub(crate) failed: AtomicBool,
}

impl Delivered {
    pub(crate) fn new(message: Message) -> Arc<Delivered> {
        Arc::new(Delivered {
            message,
            settled: AtomicBool::new(false),
            failed: AtomicBool::new(false),
        })
    }
}

/// A delivery's place among its key's on a pipelined connection
/// (protocol version 4, PROTOCOL §8.4).
#[derive(Debug, Clone)]
pub(crate) struct KeyTicket {
    key: Bytes,
    /// The key start it came after ([`KeyLine::run`]).
    run: u64,
    /// Its arrival number within the key.
    n: u64,
}

/// One ordering key on a pipelined connection: the broker sends a key's
/// next deliveries before the earlier ones are acked, and this hands them
/// to handlers one at a time, in arrival order (which is the key's order).
/// A failed one (nack, error, abandon) makes the broker take back every
/// later delivery of the key; those that arrive before the broker's next
/// key start (bit 31 of `attempt`) are dropped unhandled.
#[derive(Default)]
pub(crate) struct KeyLine {
    /// Key starts seen.
    run: u64,
    arrivals: u64,
    /// Deliveries of this run arrived after this one are stale.
    drop_after: Option<u64>,
    /// A delivery of the key is with a handler (concurrent handlers).
    busy: bool,
    /// Deliveries waiting for it, in order (concurrent handlers).
    waiting: VecDeque<(Handler, Incoming)>,
    /// Tickets given out and not yet finished or dropped.
    outstanding: u64,
}

impl KeyLine {
    fn live(&self, ticket: &KeyTicket) -> bool {
        ticket.run == self.run && self.drop_after.is_none_or(|last| ticket.n <= last)
    }

    fn forgettable(&self) -> bool {
        self.outstanding == 0 && self.drop_after.is_none() && !self.busy
    }
}

impl Incoming {
    pub fn name(&self) -> &str {
        &self.delivered.message.name
    }

    pub fn kind(&self) -> Kind {
        self.delivered.message.kind
    }

    /// 1 on the first delivery; more when redelivered.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The raw payload bytes, whatever their encoding.
    pub fn payload(&self) -> &Bytes {
        &self.delivered.message.payload
    }

    /// The payload decoded from JSON.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T> {
        Ok(serde_json::from_slice(&self.delivered.message.payload)?)
    }

    /// The whole envelope.
    pub fn message(&self) -> &Message {
        &self.delivered.message
    }

    /// The client, for sending more messages in the same activity.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Replies to this command with a final reply named by its outcome.
    pub async fn reply<T: Serialize + ?Sized>(&self, outcome: &str, payload: &T) -> Result<()> {
        self.reply_builder(outcome, true)
            .json(payload)?
            .send()
            .await
            .map(|_| ())
    }

    /// Sends a reply that says more follow (a streaming reply).
    pub async fn reply_progress<T: Serialize + ?Sized>(
        &self,
        outcome: &str,
        payload: &T,
    ) -> Result<()> {
        self.reply_builder(outcome, false)
            .json(payload)?
            .send()
            .await
            .map(|_| ())
    }

    /// A reply to finish by hand (raw payload, headers); `is_final` says
    /// whether more follow.
    pub fn reply_builder(&self, outcome: &str, is_final: bool) -> MessageBuilder {
        let mut builder =
            MessageBuilder::new(self.client.clone(), Kind::Reply, outcome.to_string());
        builder.message.response_to = Some(self.delivered.message.id);
        builder.message.is_final = is_final;
        self.caused(builder)
    }

    /// Starts a command caused by this message (in its activity).
    pub fn command(&self, name: &str) -> MessageBuilder {
        self.caused(self.client.command(name))
    }

    /// Starts an event caused by this message (in its activity).
    pub fn event(&self, name: &str) -> MessageBuilder {
        self.caused(self.client.event(name))
    }

    /// Whatever task it is built on, a message made through `Incoming`
    /// is this message's consequence.
    fn caused(&self, mut builder: MessageBuilder) -> MessageBuilder {
        Handling::of(&self.delivered.message).mark(&mut builder.message);
        builder
    }

    /// Marks the delivery handled. Done for you when the handler returns `Ok`.
    pub fn ack(&self) -> Result<()> {
        self.settle(None)
    }

    /// Asks for redelivery after `delay`. Done for you when the handler
    /// returns `Err`.
    pub fn nack(&self, delay: Duration) -> Result<()> {
        self.settle(Some(delay))
    }

    /// Leaves the delivery unsettled without telling the broker: it comes
    /// again (with `attempt + 1`) when its ack deadline passes or this
    /// connection closes, whichever is first. For a handler that hands the
    /// delivery on to someone who went away before settling it, and whose
    /// connection is about to close: a NACK would have it redelivered to
    /// this very connection while it drains.
    pub fn abandon(&self) -> Result<()> {
        if self.delivered.settled.swap(true, Ordering::AcqRel) {
            return Err(Error::AlreadySettled);
        }
        self.delivered.failed.store(true, Ordering::Release);
        Ok(())
    }

    fn settle(&self, nack_delay: Option<Duration>) -> Result<()> {
        if self.delivered.settled.swap(true, Ordering::AcqRel) {
            return Err(Error::AlreadySettled);
        }
        if nack_delay.is_some() {
            self.delivered.failed.store(true, Ordering::Release);
        }
        settle(
            &self.client.inner,
            self.generation,
            self.delivery,
            &self.delivered.message,
            nack_delay,
        );
        Ok(())
    }
}

/// Writes the ACK or NACK, if the delivery came on the current connection;
/// after a reconnect the broker has already taken it back.
pub(crate) fn settle(
    inner: &Inner,
    generation: u64,
    delivery: u64,
    message: &Message,
    nack_delay: Option<Duration>,
) {
    if message.transient {
        return;
    }
    let mut state = inner.lock();
    if !state.connected || state.generation != generation {
        return;
    }
    match nack_delay {
        None => state.writer.push_ack(delivery),
        Some(delay) => state.writer.push_nack(Nack {
            delivery,
            delay_ms: delay.as_millis().min(u128::from(u32::MAX)) as u32,
        }),
    }
    drop(state);
    inner.wake_writer();
}

/// A keyed delivery arrived on a pipelined connection: it goes to a
/// handler when the one before it of its key is settled (at once if none
/// is out), or is dropped if the broker takes it back (see [`KeyLine`]).
/// `key_start`: bit 31 of its `attempt` was set.
pub(crate) fn deliver_keyed(
    inner: &Arc<Inner>,
    handler: &Handler,
    mut incoming: Incoming,
    key: Bytes,
    key_start: bool,
) {
    let mut state = inner.lock();
    if state.generation != incoming.generation {
        return;
    }
    let line = state.key_lines.entry(key.clone()).or_default();
    if key_start {
        line.run += 1;
        line.drop_after = None;
        // Whatever of an earlier run still waits was taken back.
        let stale = std::mem::take(&mut line.waiting);
        line.outstanding = line.outstanding.saturating_sub(stale.len() as u64);
    }
    if line.drop_after.is_some() {
        return;
    }
    line.arrivals += 1;
    line.outstanding += 1;
    incoming.ticket = Some(Box::new(KeyTicket {
        key,
        run: line.run,
        n: line.arrivals,
    }));
    if inner.sequential.is_some() {
        // The one handler task runs deliveries in arrival order; it looks
        // at the line again before each.
        drop(state);
        spawn(inner, handler, incoming);
        return;
    }
    if line.busy {
        line.waiting.push_back((handler.clone(), incoming));
        return;
    }
    line.busy = true;
    drop(state);
    run_line(inner, handler.clone(), incoming);
}

/// The key of a pipelined connection's delivery that no handler here
/// takes was nacked: the broker takes it and the key's later deliveries
/// back.
pub(crate) fn key_refused(inner: &Inner, generation: u64, key: &Bytes, key_start: bool) {
    let mut state = inner.lock();
    if state.generation != generation {
        return;
    }
    let line = state.key_lines.entry(key.clone()).or_default();
    if key_start {
        line.run += 1;
        let stale = std::mem::take(&mut line.waiting);
        line.outstanding = line.outstanding.saturating_sub(stale.len() as u64);
    }
    line.drop_after = Some(line.arrivals);
}

/// Runs `incoming` and then, one at a time, what of its key queued behind
/// it; a handler that has to wait goes on on a task, which carries on
/// with the line when it is done.
fn run_line(inner: &Arc<Inner>, handler: Handler, incoming: Incoming) {
    let mut next = Some((handler, incoming));
    while let Some((handler, incoming)) = next.take() {
        let generation = incoming.generation;
        let delivered = incoming.delivered.clone();
        let Some(ticket) = incoming.ticket.clone() else {
            return;
        };
        inner.handlers.started();
        if !start(inner, &handler, incoming, true) {
            return;
        }
        next = line_finished(inner, generation, &ticket, &delivered);
    }
}

/// A keyed delivery's handler is done: its line hears how it went and
/// hands out what comes next of the key, if anything.
fn line_finished(
    inner: &Inner,
    generation: u64,
    ticket: &KeyTicket,
    delivered: &Delivered,
) -> Option<(Handler, Incoming)> {
    let mut state = inner.lock();
    if state.generation != generation {
        return None;
    }
    let line = state.key_lines.get_mut(&ticket.key)?;
    line.outstanding = line.outstanding.saturating_sub(1);
    if delivered.failed.load(Ordering::Acquire) && ticket.run == line.run {
        line.drop_after = Some(line.drop_after.map_or(ticket.n, |d| d.min(ticket.n)));
    }
    let mut next = None;
    while let Some((handler, incoming)) = line.waiting.pop_front() {
        match &incoming.ticket {
            Some(t) if line.live(t) => {
                next = Some((handler, incoming));
                break;
            }
            _ => line.outstanding = line.outstanding.saturating_sub(1),
        }
    }
    if next.is_none() {
        line.busy = false;
        if line.forgettable() {
            state.key_lines.remove(&ticket.key);
        }
    }
    next
}

/// Whether a delivery still goes to its handler: keyed ones of a
/// pipelined connection may have been taken back since they arrived
/// (sequential handlers look just before running each).
pub(crate) fn still_live(inner: &Inner, incoming: &Incoming) -> bool {
    let Some(ticket) = &incoming.ticket else {
        return true;
    };
    let mut state = inner.lock();
    if state.generation != incoming.generation {
        return false;
    }
    let Some(line) = state.key_lines.get_mut(&ticket.key) else {
        return false;
    };
    if line.live(ticket) {
        return true;
    }
    line.outstanding = line.outstanding.saturating_sub(1);
    if line.forgettable() {
        state.key_lines.remove(&ticket.key);
    }
    false
}

/// Runs `handler` on its own task (or, with [`crate::ClientOptions::sequential`],
/// queues it for the client's one handler task).
///
/// Borrows what it can: every reference count taken per delivery (the
/// handler's, the client's) was an atomic add and subtract.
pub(crate) fn spawn(inner: &Arc<Inner>, handler: &Handler, incoming: Incoming) {
    inner.handlers.started();
    if let Some(queue) = &inner.sequential {
        match queue.try_send((handler.clone(), incoming)) {
            Ok(()) => return,
            Err(tokio::sync::mpsc::error::TrySendError::Full((handler, incoming)))
            | Err(tokio::sync::mpsc::error::TrySendError::Closed((handler, incoming))) => {
                tokio::spawn(run(handler, incoming));
                return;
            }
        }
    }
    start(inner, handler, incoming, false);
}

/// Starts a handler (`handlers` already counts it); `true` if it
/// finished at once. `line`: it is keyed on a pipelined connection, and its
/// task carries on with its key's line when done.
fn start(inner: &Arc<Inner>, handler: &Handler, incoming: Incoming, line: bool) -> bool {
    // Most handlers finish without waiting for anything (count, store in
    // memory, send a reply into the outbox): those run to the end right
    // here, on the connection's reader, without a task of their own — a
    // spawn per delivery was the SDK's largest cost per message. A handler
    // that has to wait goes on on its own task, which polls it again at
    // once with its own waker (the no-op one used here is never relied on).
    let delivered = incoming.delivered.clone();
    let ticket = if line { incoming.ticket.clone() } else { None };
    let (generation, delivery) = (incoming.generation, incoming.delivery);
    let handling = Handling::of(&delivered.message);
    #[cfg(feature = "otel")]
    let span = crate::otel::handler_span(&delivered.message, &handling.trace);
    let (mut future, first) = HANDLING.sync_scope(handling, || {
        #[cfg(feature = "otel")]
        let _entered = span.enter();
        let mut future = handler(incoming);
        let mut cx = Context::from_waker(Waker::noop());
        let first = future.as_mut().poll(&mut cx);
        (future, first)
    });
    match first {
        Poll::Ready(result) => {
            finish(inner, generation, delivery, &delivered, result);
            true
        }
        Poll::Pending => {
            let inner = inner.clone();
            tokio::spawn(async move {
                #[cfg(feature = "otel")]
                let future = tracing::Instrument::instrument(&mut future, span);
                #[cfg(not(feature = "otel"))]
                let future = &mut future;
                let result = HANDLING.scope(handling, future).await;
                finish(&inner, generation, delivery, &delivered, result);
                if let Some(ticket) = ticket {
                    if let Some((handler, incoming)) =
                        line_finished(&inner, generation, &ticket, &delivered)
                    {
                        run_line(&inner, handler, incoming);
                    }
                }
            });
            false
        }
    }
}

/// Runs one handler with the message's activity in scope, then acks or
/// nacks unless the handler settled it.
pub(crate) async fn run(handler: Handler, incoming: Incoming) {
    let inner = incoming.client.inner.clone();
    if !still_live(&inner, &incoming) {
        handler_gone(&inner);
        return;
    }
    let ticket = incoming.ticket.clone();
    let delivered = incoming.delivered.clone();
    let (generation, delivery) = (incoming.generation, incoming.delivery);
    let handling = Handling::of(&delivered.message);
    #[cfg(feature = "otel")]
    let future = tracing::Instrument::instrument(
        handler(incoming),
        crate::otel::handler_span(&delivered.message, &handling.trace),
    );
    #[cfg(not(feature = "otel"))]
    let future = handler(incoming);
    let result = HANDLING.scope(handling, future).await;
    finish(&inner, generation, delivery, &delivered, result);
    if let Some(ticket) = ticket {
        // Sequential: nothing waits in the line; the failure is noted.
        let _ = line_finished(&inner, generation, &ticket, &delivered);
    }
}

fn finish(
    inner: &Inner,
    generation: u64,
    delivery: u64,
    delivered: &Delivered,
    result: std::result::Result<(), BoxError>,
) {
    if !delivered.settled.swap(true, Ordering::AcqRel) {
        let nack = match &result {
            Ok(()) => None,
            Err(error) => {
                tracing::warn!(name = %delivered.message.name, %error, "handler failed; nacking for a retry");
                delivered.failed.store(true, Ordering::Release);
                Some(inner.opts.nack_delay)
            }
        };
        settle(inner, generation, delivery, &delivered.message, nack);
    }
    handler_gone(inner);
}

/// A handler finished, or a delivery queued for one was dropped.
fn handler_gone(inner: &Inner) {
    // Only the last one out wakes `shutdown`, and only while it waits.
    if inner.handlers.finished() {
        inner.handler_done.notify_waiters();
    }
}
