//! What the callers of a `Client` and its connection's driver share: the
//! state under one lock (`State`), and the handles around it (`Inner`).

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use courier_proto::{FrameWriter, Message};
use tokio::sync::{broadcast, mpsc, oneshot, watch, Notify};
use uuid::Uuid;

use courier_proto::pattern_index::PatternIndex;

use crate::handler::Handler;
use crate::handshake::{HandlersRunning, WriteWake};
use crate::pending::PendingSends;

use crate::{
    handler, ClientOptions, ConnectionEvent, Connector, ErrorCode, Incoming, Reply, Result,
    StartFrom,
};

pub(crate) struct PendingSend {
    pub(crate) message: Box<Message>,
    /// The broker's answer: the log seq it stored the message at (0: none).
    pub(crate) done: oneshot::Sender<Result<u64>>,
}

pub(crate) struct Subscription {
    pub(crate) pattern: String,
    /// Where the subscription starts when the broker does not know it yet.
    pub(crate) start: StartFrom,
    pub(crate) handler: Handler,
}

/// Subscriptions tested one by one to find a delivery's handler; past
/// this many they are indexed.
const SUBSCRIPTIONS_SCANNED_MAX: usize = 8;

/// The client's subscriptions, in the order subscribed; past
/// [`SUBSCRIPTIONS_SCANNED_MAX`] also their positions by pattern, so that
/// finding a delivery's handler costs the name's segments, not a test of
/// every pattern.
#[derive(Default)]
pub(crate) struct Subscriptions {
    list: Vec<Subscription>,
    index: Option<Box<PatternIndex<usize>>>,
}

impl Subscriptions {
    /// Subscribes `pattern` (again: it moves to the end, with its new
    /// handler).
    pub(crate) fn subscribe(&mut self, subscription: Subscription) {
        self.list.retain(|s| s.pattern != subscription.pattern);
        self.list.push(subscription);
        self.reindex();
    }

    pub(crate) fn unsubscribe(&mut self, pattern: &str) {
        self.list.retain(|s| s.pattern != pattern);
        self.reindex();
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &Subscription> {
        self.list.iter()
    }

    /// Positions move when one is removed: the index is built again
    /// (subscribing is rare; deliveries are not).
    fn reindex(&mut self) {
        self.index = (self.list.len() > SUBSCRIPTIONS_SCANNED_MAX).then(|| {
            let mut index = PatternIndex::default();
            for (position, s) in self.list.iter().enumerate() {
                index.insert(&s.pattern, &position);
            }
            Box::new(index)
        });
    }

    /// The handler of the first subscription, in subscription order,
    /// whose pattern `name` matches.
    pub(crate) fn handler_for(&self, name: &str) -> Option<Handler> {
        let first = match &self.index {
            Some(index) => {
                let mut matched = Vec::new();
                index.matching_into(name, &mut matched);
                matched.into_iter().min().copied()
            }
            None => self
                .list
                .iter()
                .position(|s| courier_proto::pattern_matches(&s.pattern, name)),
        };
        first
            .and_then(|position| self.list.get(position))
            .map(|s| s.handler.clone())
    }
}

/// Replies buffered per request without flow control (`request`, which
/// takes the first); past it the rest of the stream is lost, and said so.
pub(crate) const REPLY_BUFFER_MAX: u32 = 1024;

pub(crate) struct State {
    pub(crate) writer: FrameWriter,
    /// The connection's socket for writes from the caller's thread (plain
    /// TCP only): a lone request is written straight away instead of
    /// waking a worker to write it, one thread hand-off less per round
    /// trip. Only while nothing is queued or being written (`writing`),
    /// so bytes still leave in order.
    pub(crate) direct: Option<std::net::TcpStream>,
    /// The write loop took bytes from `writer` and is writing them.
    pub(crate) writing: bool,
    /// Counts connections; deliveries from an older one can't be acked.
    pub(crate) generation: u64,
    pub(crate) connected: bool,
    /// The index in `Inner::addresses` of the broker connected to now, or
    /// last: the next attempt starts after it.
    pub(crate) address: usize,
    pub(crate) frame_bytes_max: u32,
    pub(crate) next_seq: u64,
    pub(crate) pending_sends: PendingSends<PendingSend>,
    pub(crate) requests: HashMap<Uuid, Waiting>,
    /// Transient commands of [`MessageBuilder::request`], sent QUIET: the
    /// command's id by send seq, until its request ends. The broker answers
    /// only a refusal, which ends the request; so does a lost connection
    /// (transient is at most once: the command is not sent again).
    pub(crate) quiet_requests: HashMap<u64, Uuid>,
    pub(crate) subscriptions: Subscriptions,
    pub(crate) next_op: u64,
    pub(crate) pending_ops: HashMap<u64, oneshot::Sender<Result<()>>>,
    pub(crate) drained: Option<oneshot::Sender<()>>,
    pub(crate) shut_down: bool,
    /// Flushes waiting for their PONG, by nonce, oldest first.
    pub(crate) flushes: VecDeque<(u64, oneshot::Sender<Result<()>>)>,
    pub(crate) next_flush: u64,
    /// Refusals of sends nobody awaits (see [`Client::unheard_refusals`]).
    pub(crate) unheard_refusals: u64,
    pub(crate) last_unheard_refusal: Option<(ErrorCode, String)>,
    /// Where [`ConnectionEvent`]s go; dropped when the driver stops, which
    /// ends every [`ConnectionEvents`].
    pub(crate) events: Option<broadcast::Sender<ConnectionEvent>>,
    /// Ordering keys of this connection's deliveries while any is out
    /// (protocol version 4 only): what hands them over one at a time.
    pub(crate) key_lines: HashMap<bytes::Bytes, handler::KeyLine>,
}

impl State {
    /// Tells every [`ConnectionEvents`] reader (none listening is fine).
    pub(crate) fn emit(&self, event: ConnectionEvent) {
        if let Some(events) = &self.events {
            let _ = events.send(event);
        }
    }
}

/// A request waiting for replies, by its command's id.
pub(crate) struct Waiting {
    /// Room for the buffer's replies plus one slot, kept for the error
    /// that ends the stream, so it always finds room.
    pub(crate) replies: mpsc::Sender<Result<Reply>>,
    /// Its key in [`State::quiet_requests`], when the command went QUIET.
    pub(crate) quiet_seq: Option<u64>,
    /// A flow-controlled stream (PROTOCOL §8.8): the broker sends no more
    /// than the buffer holds, and once under way (`received`) the stream
    /// ends with its connection.
    pub(crate) flow_controlled: bool,
    /// Replies that arrived.
    pub(crate) received: u64,
    /// Replies that found the buffer full. From the first one on, every
    /// later reply is counted here rather than buffered — the stream never
    /// skips a reply and goes on — and it ends with
    /// [`Error::RepliesLost`]. Only a broker without flow control (or a
    /// request without it) can make this happen.
    pub(crate) lost: u64,
}

pub(crate) struct Inner {
    pub(crate) opts: ClientOptions,
    /// The brokers of `opts.url`, in the order written (with a connector,
    /// `opts.url` as it is: it only names the broker in errors).
    pub(crate) addresses: Vec<String>,
    /// Where connections come from when not TCP to `opts.url`.
    pub(crate) connector: Option<Connector>,
    /// The service the broker authenticated the first connection as
    /// (`opts.service`, or what WELCOME named when that was left empty).
    pub(crate) service: String,
    pub(crate) state: Mutex<State>,
    /// Something was written to `state.writer` (see [`Inner::wake_writer`]).
    pub(crate) writer_wake: Notify,
    /// Whether a write to `state.writer` needs `writer_wake`, or the
    /// driver, reading, will look anyway.
    pub(crate) write_wake: WriteWake,
    /// The write loop handed `state.writer`'s bytes to the socket, or the
    /// connection ended: quiet senders waiting for room look again.
    pub(crate) writer_drained: Notify,
    /// The last running handler finished while `shutdown` waited.
    pub(crate) handler_done: Notify,
    /// Handlers started and not finished; `shutdown` waits for none.
    pub(crate) handlers: HandlersRunning,
    pub(crate) shutdown: watch::Sender<bool>,
    /// The queue of the one handler task, when handlers run sequentially.
    pub(crate) sequential: Option<mpsc::Sender<(Handler, Incoming)>>,
}

impl Inner {
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The broker address at `index` of `addresses`.
    pub(crate) fn address(&self, index: usize) -> &str {
        self.addresses
            .get(index)
            .map_or(self.opts.url.as_str(), String::as_str)
    }

    /// Tells the write loop that `state.writer` has bytes (call after the
    /// lock is released).
    pub(crate) fn wake_writer(&self) {
        if self.write_wake.request() {
            self.writer_wake.notify_one();
        }
    }
}

/// Writes all `state.writer` holds to the socket from this thread, without
/// blocking: `true` if the socket took all of it. What it did not take goes
/// back to the writer, for the write loop (an error, too, is left to it).
pub(crate) fn write_direct(state: &mut State) -> bool {
    let Some(socket) = &state.direct else {
        return false;
    };
    let bytes = state.writer.take();
    // WouldBlock or a failure: the write loop takes it all, and meets the
    // failure itself.
    let written = std::io::Write::write(&mut &*socket, &bytes).unwrap_or_default();
    if written == bytes.len() {
        return true;
    }
    state.writer.push_unwritten(&bytes[written..]);
    false
}

pub(crate) fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Unix nanoseconds `after` from now, saturating at the clock's end
/// rather than wrapping into the past.
pub(crate) fn nanos_from_now(after: Duration) -> u64 {
    now_nanos().saturating_add(u64::try_from(after.as_nanos()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subscription(pattern: &str) -> Subscription {
        Subscription {
            pattern: pattern.to_string(),
            start: StartFrom::New,
            handler: crate::handler::boxed(|_| async { Ok::<(), crate::BoxError>(()) }),
        }
    }

    /// The pattern of the subscription whose handler `handler_for` gave.
    fn handled_by(subs: &Subscriptions, name: &str) -> Option<String> {
        let handler = subs.handler_for(name)?;
        subs.iter()
            .find(|s| std::sync::Arc::ptr_eq(&s.handler, &handler))
            .map(|s| s.pattern.clone())
    }

    #[test]
    fn the_first_matching_subscription_handles_a_name_indexed_or_not() {
        let mut subs = Subscriptions::default();
        for pattern in ["todo.>", "todo.created", "todo.*"] {
            subs.subscribe(subscription(pattern));
        }
        assert!(subs.index.is_none(), "few patterns: scanned");
        assert_eq!(handled_by(&subs, "todo.created").as_deref(), Some("todo.>"));
        for n in 0..20 {
            subs.subscribe(subscription(&format!("other.{n}.*")));
        }
        assert!(subs.index.is_some(), "many patterns: indexed");
        assert_eq!(handled_by(&subs, "todo.created").as_deref(), Some("todo.>"));
        assert_eq!(handled_by(&subs, "other.7.x").as_deref(), Some("other.7.*"));
        assert_eq!(handled_by(&subs, "other.7"), None);
        // Positions move: the index follows.
        subs.unsubscribe("todo.>");
        assert_eq!(
            handled_by(&subs, "todo.created").as_deref(),
            Some("todo.created")
        );
        assert_eq!(handled_by(&subs, "todo.done").as_deref(), Some("todo.*"));
        subs.subscribe(subscription("todo.created"));
        assert_eq!(
            handled_by(&subs, "todo.created").as_deref(),
            Some("todo.*"),
            "moved to the end"
        );
        assert_eq!(
            handled_by(&subs, "other.19.y").as_deref(),
            Some("other.19.*")
        );
    }

    #[test]
    fn far_deadlines_saturate_instead_of_wrapping_into_the_past() {
        assert_eq!(nanos_from_now(Duration::MAX), u64::MAX);
        let soon = nanos_from_now(Duration::from_secs(1));
        assert!(soon > now_nanos() && soon < now_nanos() + 2_000_000_000);
    }
}
