//! Sending: commands, events and requests, checked and queued; sends are
//! kept until the broker answers them (re-sent after a reconnect).

use std::future::Future;
use std::time::Duration;

use courier_proto::{delivery_frame_len, validate_name, Kind, Message};
use serde::Serialize;
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::builder::{set_reply_window, too_large};
use crate::state::{write_direct, PendingSend};
use crate::{
    proto, Client, Error, ErrorCode, PendingAck, Receipt, Reply, ReplyStream, Result,
    QUIET_BUFFER_BYTES_MAX,
};

impl Client {
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
    /// [`ClientOptions::request_timeout`](crate::ClientOptions::request_timeout)).
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

    pub(crate) fn check(&self, message: &Message) -> Result<()> {
        validate_name(&message.name)?;
        let max = self.inner.lock().frame_bytes_max;
        self.check_size(message, max)
    }

    /// Refuses, before it is sent, a message the broker would refuse for
    /// its size: one whose DELIVER frame, with this service's name as its
    /// sender, would be longer than the broker's frame limit.
    pub(crate) fn check_size(&self, message: &Message, frame_bytes_max: u32) -> Result<()> {
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
    pub(crate) fn try_send_quiet(&self, message: &Message) -> Result<Option<Uuid>> {
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
    pub(crate) async fn send_quiet_when_room(&self, message: Box<Message>) -> Result<Uuid> {
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
    /// ([`MessageBuilder::send_quiet`](crate::MessageBuilder::send_quiet)), and sends whose wait timed out
    /// before the broker answered. Each is also logged as a warning.
    pub fn unheard_refusals(&self) -> u64 {
        self.inner.lock().unheard_refusals
    }

    /// The code and reason of the latest refusal counted in
    /// [`Client::unheard_refusals`].
    pub fn last_unheard_refusal(&self) -> Option<(ErrorCode, String)> {
        self.inner.lock().last_unheard_refusal.clone()
    }

    pub(crate) async fn submit(&self, message: Box<Message>) -> Result<Receipt> {
        self.enqueue(message)?.wait_receipt().await
    }

    /// Queues `message` for sending now, in call order, without waiting
    /// for the broker; await the returned [`PendingAck`] for its fate.
    pub(crate) fn enqueue(&self, message: Box<Message>) -> Result<PendingAck> {
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

    pub(crate) async fn open_request(
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
    pub(crate) fn start_request(
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
    pub(crate) fn start_quiet_request(
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
            && !self.inner.write_wake.is_reading();
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
}
