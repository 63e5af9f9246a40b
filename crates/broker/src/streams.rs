//! Flow-controlled reply streams (PROTOCOL §8.8): the requester grants a
//! window of replies per request, and replies beyond it wait in the broker.
//!
//! A command whose header `courier-reply-window` says W opens a stream.
//! At most W of its replies are delivered to the requesting connection
//! and not yet acked; an ACK of one gives one credit back, a NACK of one
//! ends the stream. Replies beyond the window are held here, in arrival
//! order, at most W of them per stream (and `held_reply_bytes_max` in
//! all), and their SEND_RESULT is written when they go out: a responder
//! that awaits each reply's result is paced by the requester's reading.
//! Nothing is dropped without an answer: a held reply is delivered, or its
//! sender hears that it was discarded (the requester stopped reading or
//! left: code 0, reason `discarded: …`) or refused (the route expired).

use std::collections::VecDeque;
use std::sync::Arc;

use courier_proto::{ErrorCode, Message};
use courier_store::MessageStore;
use uuid::Uuid;

use crate::{Action, Broker, ConnId, DeliveryId, Nanos, NANOS_PER_MS};

pub use courier_proto::{REPLY_WINDOW_HEADER, REPLY_WINDOW_MAX};

/// Deliveries of the command one stream remembers, to keep their ack
/// deadlines alive while the handlers reply (redeliveries add more).
const HANDLERS_MAX: usize = 16;

/// The window a command asks for: `None` without the header, `Err` with
/// what is wrong with it.
pub(crate) fn requested_window(m: &Message) -> Result<Option<u32>, String> {
    let Some(value) = m.header(REPLY_WINDOW_HEADER) else {
        return Ok(None);
    };
    let window = value
        .bytes()
        .all(|b| b.is_ascii_digit())
        .then(|| value.parse::<u32>().ok())
        .flatten()
        .filter(|w| (1..=REPLY_WINDOW_MAX).contains(w));
    match window {
        Some(w) => Ok(Some(w)),
        None => Err(format!(
            "header {REPLY_WINDOW_HEADER} of {} is {value:?}; it must be a whole number of replies from 1 to {REPLY_WINDOW_MAX}",
            m.name
        )),
    }
}

/// The state of one flow-controlled stream, kept with its reply route.
#[derive(Debug)]
pub(crate) struct Stream {
    /// The connection that sent the command: its replies go there only.
    requester: ConnId,
    window: u32,
    /// Replies delivered to the requester and not yet acked, oldest first.
    unacked: VecDeque<DeliveryId>,
    /// Replies waiting for credit, in arrival order.
    held: VecDeque<Held>,
    /// A final reply is among `held`: nothing may follow it.
    final_held: bool,
    /// The command's deliveries to handlers, `(service, delivery)`.
    handlers: Vec<(String, DeliveryId)>,
    /// Set when the requester stopped reading or left: replies are then
    /// accepted and discarded, with this reason.
    discarding: Option<&'static str>,
    /// A reply went out to the requester: from then on the stream is
    /// bound to its connection.
    started: bool,
}

/// A reply waiting for credit, and who awaits its SEND_RESULT.
#[derive(Debug)]
struct Held {
    message: Arc<Message>,
    /// Each send of it (a responder that reconnected sends it again,
    /// under a new seq).
    senders: Vec<ReplySender>,
}

/// Who sent a reply of a stream and awaits its SEND_RESULT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReplySender {
    /// A connection here, and its send.
    Local { conn: ConnId, seq: u64, quiet: bool },
    /// A replier on another node, whose node forwarded the reply and
    /// awaits the answer under this number ([`Action::AnswerForwardedReply`]).
    Remote { answer: u64 },
}

impl Held {
    fn bytes(&self) -> usize {
        courier_proto::encoded_message_len(&self.message)
    }
}

impl Stream {
    pub(crate) fn new(requester: ConnId, window: u32) -> Stream {
        Stream {
            requester,
            window,
            unacked: VecDeque::new(),
            held: VecDeque::new(),
            final_held: false,
            handlers: Vec::new(),
            discarding: None,
            started: false,
        }
    }

    #[cfg(test)]
    pub(crate) fn held_len(&self) -> usize {
        self.held.len()
    }

    fn has_credit(&self) -> bool {
        self.unacked.len() < self.window as usize
    }
}

/// What became of an accepted reply.
pub(crate) enum ReplyFate {
    /// Delivered now (or parked for an instance of the requester).
    Delivered,
    /// Waiting for credit: its SEND_RESULT comes when it goes out.
    Held,
    /// Accepted and dropped on purpose; the reason says why.
    Discarded(String),
}

impl<S: MessageStore> Broker<S> {
    /// A reply to a flow-controlled stream, from `conn` (its send `seq`).
    pub(crate) fn route_stream_reply(
        &mut self,
        sender: ReplySender,
        message: Arc<Message>,
        mut stream: Box<Stream>,
        now: Nanos,
    ) -> Result<ReplyFate, (ErrorCode, String)> {
        let command = message.response_to.unwrap_or_default();
        let outcome = self.stream_reply(sender, message, &mut stream, now);
        self.put_back(command, stream);
        outcome
    }

    fn stream_reply(
        &mut self,
        sender: ReplySender,
        message: Arc<Message>,
        stream: &mut Stream,
        now: Nanos,
    ) -> Result<ReplyFate, (ErrorCode, String)> {
        let command = message.response_to.unwrap_or_default();
        if let Some(reason) = stream.discarding {
            if message.is_final {
                self.end_stream(command, stream);
            }
            self.metrics.replies_discarded += 1;
            return Ok(ReplyFate::Discarded(format!("discarded: {reason}")));
        }
        if let Some(held) = stream.held.iter_mut().find(|h| h.message.id == message.id) {
            // Sent again (its responder reconnected): it answers this send too.
            held.senders.push(sender);
            return Ok(ReplyFate::Held);
        }
        if stream.final_held {
            return Err((
                ErrorCode::UnknownRequest,
                format!("command {command} already has a final reply, waiting for the requester to read it; nothing may follow it"),
            ));
        }
        // The handler is working: its delivery is not overdue.
        self.keep_handlers_alive(stream, sender, now);
        if stream.has_credit() && stream.held.is_empty() {
            self.deliver_in_stream(command, stream, message);
            return Ok(ReplyFate::Delivered);
        }
        let bytes = courier_proto::encoded_message_len(&message);
        if stream.held.len() >= stream.window as usize
            || self.held_reply_bytes + bytes > self.config.held_reply_bytes_max
        {
            let (held, window) = (stream.held.len(), stream.window);
            return Err((
                ErrorCode::StreamFull,
                format!(
                    "the requester of command {command} has {window} replies unread (its window) and the broker holds {held} more for it; wait for the answer to an earlier reply of this stream before sending more"
                ),
            ));
        }
        stream.final_held |= message.is_final;
        self.held_reply_bytes += bytes;
        self.metrics.replies_held += 1;
        let mut message = message;
        Arc::make_mut(&mut message).detach();
        stream.held.push_back(Held {
            message,
            senders: vec![sender],
        });
        Ok(ReplyFate::Held)
    }

    /// Puts a stream taken out of its route back, unless the route is gone
    /// (the stream ended).
    fn put_back(&mut self, command: Uuid, stream: Box<Stream>) {
        if let Some(route) = self.reply_routes.get_mut(&command) {
            route.stream = Some(stream);
        }
    }

    /// Delivers a reply of the stream to its requester, tracked for its ACK.
    fn deliver_in_stream(&mut self, command: Uuid, stream: &mut Stream, message: Arc<Message>) {
        self.next_delivery += 1;
        let delivery = self.next_delivery;
        self.metrics.delivered += 1;
        let wall_now = self.wall(self.now);
        if let Some(c) = self.conns.get(&stream.requester) {
            let counted = self.traffic.locate(&message.name, &c.service);
            self.traffic.at(counted).delivered += 1;
            if crate::traces(&self.sampler, &message, self.now) {
                crate::push_trace(
                    &mut self.traces,
                    &mut self.traces_bytes,
                    crate::TraceRecord::Delivered {
                        message: message.clone(),
                        seq: 0,
                        service: c.service.clone(),
                        instance: c.instance.clone(),
                        attempt: 1,
                        at: wall_now,
                    },
                );
            }
        }
        let is_final = message.is_final;
        stream.started = true;
        self.actions.push(Action::Deliver {
            conn: stream.requester,
            delivery,
            attempt: 1,
            message,
            log_seq: 0,
        });
        if is_final {
            // The stream is over: nothing to ack any more.
            self.end_stream(command, stream);
        } else {
            stream.unacked.push_back(delivery);
            self.reply_deliveries.insert(delivery, command);
        }
    }

    /// The stream is over (its final reply went out or was discarded):
    /// its route and its bookkeeping go.
    fn end_stream(&mut self, command: Uuid, stream: &mut Stream) {
        self.reply_routes.remove(&command);
        self.forget_stream(command, stream);
    }

    fn forget_stream(&mut self, command: Uuid, stream: &mut Stream) {
        for delivery in stream.unacked.drain(..) {
            self.reply_deliveries.remove(&delivery);
        }
        if let Some(c) = self.conns.get_mut(&stream.requester) {
            c.streams.remove(&command);
        }
    }

    /// An ACK of a reply delivery: one credit back to its stream, which
    /// lets the oldest held replies go. `false` if `delivery` is no reply
    /// of a stream of `conn`.
    pub(crate) fn ack_reply(&mut self, conn: ConnId, delivery: DeliveryId, now: Nanos) -> bool {
        let Some(command) = self.stream_of_delivery(conn, delivery) else {
            return false;
        };
        self.reply_deliveries.remove(&delivery);
        let Some(mut stream) = self.take_stream(command) else {
            return true;
        };
        if stream.unacked.front() == Some(&delivery) {
            stream.unacked.pop_front();
        } else {
            stream.unacked.retain(|d| *d != delivery);
        }
        self.release_held(command, &mut stream, now);
        self.put_back(command, stream);
        true
    }

    /// A NACK of a reply delivery: the requester stops reading the stream.
    pub(crate) fn nack_reply(&mut self, conn: ConnId, delivery: DeliveryId, now: Nanos) -> bool {
        let Some(command) = self.stream_of_delivery(conn, delivery) else {
            return false;
        };
        self.abandon_stream(command, "the requester stopped reading the stream", now);
        true
    }

    /// The command whose stream `delivery` belongs to, if `conn` requested it.
    fn stream_of_delivery(&self, conn: ConnId, delivery: DeliveryId) -> Option<Uuid> {
        let command = *self.reply_deliveries.get(&delivery)?;
        let requester = self.reply_routes.get(&command)?.stream.as_ref()?.requester;
        (requester == conn).then_some(command)
    }

    fn take_stream(&mut self, command: Uuid) -> Option<Box<Stream>> {
        self.reply_routes.get_mut(&command)?.stream.take()
    }

    /// Delivers held replies while the requester has credit, oldest first,
    /// and answers their senders.
    fn release_held(&mut self, command: Uuid, stream: &mut Stream, now: Nanos) {
        while stream.has_credit() {
            let Some(held) = stream.held.pop_front() else {
                return;
            };
            self.held_reply_bytes = self.held_reply_bytes.saturating_sub(held.bytes());
            // Accepted now: from here on a copy sent again is a duplicate.
            self.dedup.insert(&held.message.id, self.wall(now));
            self.metrics.accepted += 1;
            for sender in &held.senders {
                self.keep_handlers_alive(stream, *sender, now);
                self.answer_reply_sender(*sender, ErrorCode::Ok, String::new());
            }
            let is_final = held.message.is_final;
            self.deliver_in_stream(command, stream, held.message);
            if is_final {
                return;
            }
        }
    }

    /// The requester stopped reading, or left: what is held, and whatever
    /// comes later until the final reply, is accepted and discarded.
    pub(crate) fn abandon_stream(&mut self, command: Uuid, reason: &'static str, now: Nanos) {
        let Some(mut stream) = self.take_stream(command) else {
            return;
        };
        stream.discarding = Some(reason);
        let held = std::mem::take(&mut stream.held);
        let final_went = stream.final_held;
        for h in held {
            self.held_reply_bytes = self.held_reply_bytes.saturating_sub(h.bytes());
            self.dedup.insert(&h.message.id, self.wall(now));
            self.metrics.accepted += 1;
            self.metrics.replies_discarded += 1;
            for sender in h.senders {
                self.answer_reply_sender(sender, ErrorCode::Ok, format!("discarded: {reason}"));
            }
        }
        if final_went {
            self.end_stream(command, &mut stream);
            return;
        }
        self.forget_stream(command, &mut stream);
        self.put_back(command, stream);
    }

    /// The requesting connection closed. A stream that has delivered
    /// nothing yet (so holds nothing either) loses its flow control and
    /// its replies are routed as any others (to another instance of the
    /// requesting service, or parked for one): a requester that reconnects
    /// before the first reply still gets its replies. A stream under way
    /// cannot continue in order elsewhere: it is abandoned.
    pub(crate) fn requester_left(&mut self, command: Uuid, now: Nanos) {
        let Some(mut stream) = self.take_stream(command) else {
            return;
        };
        if stream.started || !stream.held.is_empty() {
            self.put_back(command, stream);
            self.abandon_stream(command, "the requester's connection closed", now);
        } else {
            self.forget_stream(command, &mut stream);
        }
    }

    /// A stream whose route is gone before its end (expired, or evicted by
    /// newer routes): held replies are refused, as later ones will be.
    pub(crate) fn expire_stream(&mut self, command: Uuid, mut stream: Box<Stream>, why: &str) {
        for h in std::mem::take(&mut stream.held) {
            self.held_reply_bytes = self.held_reply_bytes.saturating_sub(h.bytes());
            self.metrics.refused += 1;
            for sender in h.senders {
                self.answer_reply_sender(
                    sender,
                    ErrorCode::UnknownRequest,
                    format!("command {command} {why} while this reply waited for the requester's credit"),
                );
            }
        }
        self.forget_stream(command, &mut stream);
    }

    /// The command was delivered to a handler: its replies keep that
    /// delivery's ack deadline alive.
    pub(crate) fn note_stream_handler(
        &mut self,
        command: Uuid,
        service: &str,
        delivery: DeliveryId,
    ) {
        let Some(stream) = self
            .reply_routes
            .get_mut(&command)
            .and_then(|r| r.stream.as_mut())
        else {
            return;
        };
        if stream.handlers.len() >= HANDLERS_MAX {
            stream.handlers.remove(0);
        }
        stream.handlers.push((service.to_string(), delivery));
    }

    /// The SEND_RESULT of a reply that waited in its stream: to the
    /// connection here (a quiet send hears only a refusal), or to the node
    /// that forwarded it.
    fn answer_reply_sender(&mut self, sender: ReplySender, code: ErrorCode, reason: String) {
        match sender {
            ReplySender::Local { conn, seq, quiet } => {
                if !quiet || code != ErrorCode::Ok {
                    self.send_result(conn, seq, code, reason);
                }
            }
            ReplySender::Remote { answer } => {
                self.actions.push(Action::AnswerForwardedReply {
                    answer,
                    code,
                    reason,
                });
            }
        }
    }

    /// A handler on `conn` replied (or its reply went out): it is alive, so
    /// its delivery of the command gets a fresh ack deadline — a handler
    /// paced by a slow requester is not taken for a dead one. A handler on
    /// another node is kept alive there.
    fn keep_handlers_alive(&mut self, stream: &Stream, sender: ReplySender, now: Nanos) {
        let ReplySender::Local { conn, .. } = sender else {
            return;
        };
        for (service, delivery) in &stream.handlers {
            if let Some(svc) = self.services.get_mut(service) {
                let deadline = now + u64::from(svc.ack_deadline_ms) * NANOS_PER_MS;
                svc.queue.extend(*delivery, conn, deadline);
            }
        }
    }
}
