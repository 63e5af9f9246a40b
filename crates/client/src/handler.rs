//! Handlers and the context they get for each delivery.

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
}

/// What a delivery's handler and its runner share: one allocation per
/// delivery for the message and whether it was settled.
pub(crate) struct Delivered {
    pub(crate) message: Message,
    pub(crate) settled: AtomicBool,
}

impl Delivered {
    pub(crate) fn new(message: Message) -> Arc<Delivered> {
        Arc::new(Delivered {
            message,
            settled: AtomicBool::new(false),
        })
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
        Ok(())
    }

    fn settle(&self, nack_delay: Option<Duration>) -> Result<()> {
        if self.delivered.settled.swap(true, Ordering::AcqRel) {
            return Err(Error::AlreadySettled);
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

/// Runs `handler` on its own task (or, with [`crate::ClientOptions::sequential`],
/// queues it for the client's one handler task).
///
/// Borrows what it can: every reference count taken per delivery (the
/// handler's, the client's) was an atomic add and subtract.
pub(crate) fn spawn(inner: &Arc<Inner>, handler: &Handler, incoming: Incoming) {
    inner.handlers_running.fetch_add(1, Ordering::AcqRel);
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
    // Most handlers finish without waiting for anything (count, store in
    // memory, send a reply into the outbox): those run to the end right
    // here, on the connection's reader, without a task of their own — a
    // spawn per delivery was the SDK's largest cost per message. A handler
    // that has to wait goes on on its own task, which polls it again at
    // once with its own waker (the no-op one used here is never relied on).
    let delivered = incoming.delivered.clone();
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
        Poll::Ready(result) => finish(inner, generation, delivery, &delivered, result),
        Poll::Pending => {
            let inner = inner.clone();
            tokio::spawn(async move {
                #[cfg(feature = "otel")]
                let future = tracing::Instrument::instrument(&mut future, span);
                #[cfg(not(feature = "otel"))]
                let future = &mut future;
                let result = HANDLING.scope(handling, future).await;
                finish(&inner, generation, delivery, &delivered, result);
            });
        }
    }
}

/// Runs one handler with the message's activity in scope, then acks or
/// nacks unless the handler settled it.
pub(crate) async fn run(handler: Handler, incoming: Incoming) {
    let inner = incoming.client.inner.clone();
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
                Some(inner.opts.nack_delay)
            }
        };
        settle(inner, generation, delivery, &delivered.message, nack);
    }
    // Only the last one out wakes `shutdown`, which waits for zero (see
    // there for the ordering).
    if inner.handlers_running.fetch_sub(1, Ordering::SeqCst) == 1
        && inner.awaiting_handlers.load(Ordering::SeqCst)
    {
        inner.handler_done.notify_waiters();
    }
}
