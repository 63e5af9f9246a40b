//! What comes back: the broker's acceptance (`PendingAck`, `Receipt`),
//! replies, and flow-controlled reply streams.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use courier_proto::Message;
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::state::{Waiting, REPLY_BUFFER_MAX};
use crate::{proto, Error, Inner, Result};

/// The broker's answer to one queued message, to be awaited.
pub struct PendingAck {
    pub(crate) inner: Arc<Inner>,
    pub(crate) seq: u64,
    pub(crate) id: Uuid,
    /// A reply: its answer may wait for the requester's credit.
    pub(crate) reply: bool,
    pub(crate) rx: oneshot::Receiver<Result<u64>>,
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

    /// Waits (up to [`ClientOptions::send_timeout`](crate::ClientOptions::send_timeout)) until the broker
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
    pub(crate) message: Arc<Message>,
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
    pub(crate) inner: Arc<Inner>,
    pub(crate) command: Uuid,
    pub(crate) rx: mpsc::Receiver<Result<Reply>>,
    pub(crate) sleep: Pin<Box<tokio::time::Sleep>>,
    pub(crate) timeout: Duration,
    pub(crate) done: bool,
    /// The broker's answer to the command's send, until it came.
    pub(crate) acceptance: Option<oneshot::Receiver<Result<u64>>>,
    /// The command's send seq when it went QUIET (no acceptance comes).
    pub(crate) quiet_seq: Option<u64>,
    /// The final reply came.
    pub(crate) answered: bool,
    /// The window of a flow-controlled stream (PROTOCOL §8.8).
    pub(crate) window: Option<u32>,
    /// Replies the application took and the broker has not yet heard of,
    /// as `(generation, delivery)`: acked in a batch, half a window at a
    /// time, or at once when nothing more is buffered (the broker may be
    /// waiting for exactly that credit).
    pub(crate) to_ack: Vec<(u64, u64)>,
}

impl ReplyStream {
    /// A stream for the replies to `command`, and the entry under which
    /// the client's tables wait for them. With a `window`, the stream is
    /// flow-controlled and buffers that many replies; without, up to
    /// [`REPLY_BUFFER_MAX`].
    pub(crate) fn open(
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
    pub(crate) async fn accepted(mut self) -> Result<ReplyStream> {
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
    pub(crate) fn send_acks(&mut self) {
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
    pub(crate) fn lost(&self) -> u64 {
        let state = self.inner.lock();
        state.requests.get(&self.command).map_or(0, |w| w.lost)
    }

    pub(crate) fn poll_reply(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Reply>>> {
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
