//! `MessageBuilder`: a message's options (key, headers, TTL, timeout …)
//! before it is sent, published or requested.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use courier_proto::{Kind, Message, Version};
use serde::Serialize;
use uuid::Uuid;

use crate::state::nanos_from_now;
use crate::{
    mark_current_span, proto, Client, Error, ErrorCode, PendingAck, Receipt, Reply, ReplyStream,
    Result, HANDLING,
};

/// A message under construction; finish with `send`, `request` or
/// `request_stream`.
pub struct MessageBuilder {
    pub(crate) client: Client,
    /// Boxed: the builder is moved through every call of the chain and
    /// into the send's future, and a ~250-byte envelope copied at each
    /// step was a fifth of a fast publisher's time.
    pub(crate) message: Box<Message>,
    pub(crate) timeout: Option<Duration>,
    pub(crate) reply_window: Option<u32>,
}

impl MessageBuilder {
    pub(crate) fn new(client: Client, kind: Kind, name: String) -> MessageBuilder {
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
        let name = name.into();
        if name == crate::TRACEPARENT {
            // The sender's own trace (from an HTTP request, say) is
            // continued instead of the one the handled message gave.
            self.message.headers.retain(|(k, _)| *k != name);
        }
        self.message.headers.push((name, value.into()));
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
        let old = self.message.id;
        if self.message.activity_id == old {
            self.message.activity_id = id;
        }
        self.message.id = id;
        crate::trace_context::follow_new_id(&mut self.message, old);
        self
    }

    /// At most once, in memory only: lowest latency, no redelivery.
    pub fn transient(mut self) -> MessageBuilder {
        self.message.transient = true;
        self
    }

    /// Belongs to this activity rather than the current one: then it is
    /// not a consequence of the message being handled, and carries neither
    /// its id as `parent_id` nor a child of its trace.
    pub fn activity(mut self, activity_id: Uuid) -> MessageBuilder {
        if activity_id != self.message.activity_id {
            self.message.activity_id = activity_id;
            self.message.parent_id = None;
            crate::trace_context::drop_derived(&mut self.message);
        }
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
    /// is behind by at most [`QUIET_BUFFER_BYTES_MAX`](crate::QUIET_BUFFER_BYTES_MAX) (the future is then
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
    /// application at once; [`ClientOptions::reply_window`](crate::ClientOptions::reply_window) otherwise.
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
pub(crate) fn set_reply_window(message: &mut Message, window: u32) {
    message
        .headers
        .retain(|(name, _)| name != proto::REPLY_WINDOW_HEADER);
    message
        .headers
        .push((proto::REPLY_WINDOW_HEADER.into(), window.to_string()));
}

/// Where [`MessageBuilder::send_quiet`] stands once it was called.
pub(crate) enum QuietOutcome {
    Queued(Result<Uuid>),
    NoRoom(Client, Box<Message>),
}

pub(crate) fn too_large(name: &str, len: usize, max: usize) -> Error {
    Error::Refused {
        code: ErrorCode::PayloadTooLarge,
        reason: format!(
            "{name} would be delivered as a frame of {len} bytes, {} over the broker's frame limit of {max} (the broker adds this service's name as the sender); make the payload smaller",
            len - max
        ),
    }
}
