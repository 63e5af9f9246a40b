//! Tails: each one reads the broker's accepted messages from a broadcast
//! channel the core's lock fills in order, filters them, and sends them as
//! JSON lines — over the bus, as replies to the admin's `courier.tail`
//! command, or over HTTP, as Server-Sent Events.
//!
//! A tail never slows the bus: the channel is bounded and overwrites its
//! oldest lines for a tail that lags, and a bus tail whose connection has
//! more than `TAIL_PENDING_BYTES_MAX` unwritten drops lines too; either
//! way the tail is told how many it missed (a `dropped` line).
//!
//! On a cluster a node's tails see every node's accepted messages: while
//! a node has tails, the others relay theirs to it (`cluster_edge/tails.rs`)
//! into the same channel, and each line names the node that accepted it.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::response::sse::{Event, KeepAlive, Sse};
use courier_broker::{TailFilter, Tapped};
use courier_proto::{Kind, Message};
use serde_json::{json, Value};
use tokio::sync::broadcast;
use tracing::warn;
use uuid::Uuid;

use crate::{wall_nanos, Outbox};

/// Accepted messages held for tails that have not read them yet; past it
/// the slowest tails lose the oldest (and are told how many).
pub(crate) const TAIL_BUFFER_MESSAGES: usize = 8192;

/// Unwritten bytes on a bus tail's connection past which it drops lines.
const TAIL_PENDING_BYTES_MAX: usize = 1024 * 1024;

/// How often a bus tail whose channel is quiet checks its connection.
const GONE_CHECK: Duration = Duration::from_millis(500);

/// One accepted message on its way to the tails.
pub(crate) struct TailItem {
    pub(crate) tapped: Tapped,
    /// On a cluster, the node that accepted it.
    pub(crate) node: Option<Arc<str>>,
    /// Another node relayed it here: it goes no further.
    pub(crate) relayed: bool,
}

/// The tails' shared parts: the channel and the count of live tails (the
/// core records accepted messages only while it is above zero, or while
/// another node's tails want this node's).
#[derive(Clone)]
pub(crate) struct Tails {
    sender: broadcast::Sender<Arc<TailItem>>,
    live: Arc<AtomicUsize>,
    /// This node's id on a cluster.
    node: Option<Arc<str>>,
    /// Until when (ms since `epoch`) other nodes' tails want this node's
    /// accepted messages.
    wanted_until: Arc<AtomicU64>,
    epoch: Instant,
}

impl Tails {
    pub(crate) fn new(node: Option<&str>) -> Tails {
        let (sender, _) = broadcast::channel(TAIL_BUFFER_MESSAGES);
        Tails {
            sender,
            live: Arc::new(AtomicUsize::new(0)),
            node: node.map(Arc::from),
            wanted_until: Arc::new(AtomicU64::new(0)),
            epoch: Instant::now(),
        }
    }

    /// Whether the core should record what it accepts.
    pub(crate) fn any(&self) -> bool {
        self.local() || self.wanted_elsewhere()
    }

    /// Whether this node has tails of its own.
    pub(crate) fn local(&self) -> bool {
        self.live.load(Ordering::Relaxed) > 0
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Whether other nodes' tails asked for this node's messages lately.
    pub(crate) fn wanted_elsewhere(&self) -> bool {
        self.now_ms() < self.wanted_until.load(Ordering::Relaxed)
    }

    /// Another node's tails want this node's messages for `lasting`.
    pub(crate) fn want_elsewhere(&self, lasting: Duration) {
        let until = self
            .now_ms()
            .saturating_add(u64::try_from(lasting.as_millis()).unwrap_or(u64::MAX));
        self.wanted_until.fetch_max(until, Ordering::Relaxed);
    }

    /// What this node's core accepted, to every tail (under the core's
    /// lock, so they see the core's order).
    pub(crate) fn accepted(&self, tapped: Tapped) {
        let item = TailItem {
            tapped,
            node: self.node.clone(),
            relayed: false,
        };
        let _ = self.sender.send(Arc::new(item));
    }

    /// What another node accepted, to this node's tails.
    pub(crate) fn relayed(&self, tapped: Tapped, node: &str) {
        if !self.local() {
            return;
        }
        let item = TailItem {
            tapped,
            node: Some(Arc::from(node)),
            relayed: true,
        };
        let _ = self.sender.send(Arc::new(item));
    }

    /// Everything sent to the tails, for the relay to other nodes (not
    /// counted as a tail).
    pub(crate) fn watch(&self) -> broadcast::Receiver<Arc<TailItem>> {
        self.sender.subscribe()
    }

    /// A new tail's receiver; the count drops when the guard does.
    fn join(&self) -> (broadcast::Receiver<Arc<TailItem>>, LiveTail) {
        self.live.fetch_add(1, Ordering::Relaxed);
        (self.sender.subscribe(), LiveTail(self.live.clone()))
    }

    /// Starts a tail that answers `request` on a bus connection.
    pub(crate) fn start_bus_tail(
        &self,
        outbox: Arc<Outbox>,
        request: Uuid,
        activity_id: Uuid,
        filter: TailFilter,
    ) {
        let (rx, live) = self.join();
        tokio::spawn(run_bus_tail(rx, live, outbox, request, activity_id, filter));
    }

    /// A tail as Server-Sent Events: `started`, then `message` events (one
    /// JSON line each) and `dropped` events when it fell behind.
    pub(crate) fn sse(
        &self,
        filter: TailFilter,
    ) -> Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>> {
        let (rx, live) = self.join();
        let started = Event::default()
            .event("started")
            .data(started_line(&filter).to_string());
        let state = SseTail {
            rx,
            filter,
            _live: live,
        };
        let lines = futures_util::stream::unfold(state, |mut state| async move {
            loop {
                match state.rx.recv().await {
                    Ok(item) => {
                        if state.filter.matches(&item.tapped) {
                            let line = tail_line(&state.filter, &item).to_string();
                            let event = Event::default().event("message").data(line);
                            return Some((Ok(event), state));
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        let event = Event::default()
                            .event("dropped")
                            .data(json!({ "dropped": n }).to_string());
                        return Some((Ok(event), state));
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        });
        let stream = futures_util::StreamExt::chain(
            futures_util::stream::once(async move { Ok(started) }),
            lines,
        );
        Sse::new(stream).keep_alive(KeepAlive::default())
    }
}

struct SseTail {
    rx: broadcast::Receiver<Arc<TailItem>>,
    filter: TailFilter,
    _live: LiveTail,
}

/// Counts a tail as live while it exists.
struct LiveTail(Arc<AtomicUsize>);

impl Drop for LiveTail {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A tail's line for `item`; on a cluster it names the node that
/// accepted the message.
fn tail_line(filter: &TailFilter, item: &TailItem) -> Value {
    let mut line = filter.line(&item.tapped);
    if let Some(node) = &item.node {
        line["node"] = json!(node.as_ref());
    }
    line
}

fn started_line(filter: &TailFilter) -> Value {
    json!({
        "pattern": filter.pattern.as_deref().unwrap_or(">"),
        "service": filter.service,
        "kind": filter.kind.map(Kind::as_str),
        "payload": filter.payload,
    })
}

async fn run_bus_tail(
    mut rx: broadcast::Receiver<Arc<TailItem>>,
    _live: LiveTail,
    outbox: Arc<Outbox>,
    request: Uuid,
    activity_id: Uuid,
    filter: TailFilter,
) {
    let reply = |outcome: &str, body: &Value| {
        let mut m = Message::new(Kind::Reply, outcome, body.to_string());
        m.response_to = Some(request);
        m.activity_id = activity_id;
        m.sender = "courier".into();
        m.timestamp = wall_nanos();
        m.is_final = false;
        m.headers
            .push(("content-type".into(), "application/json".into()));
        m
    };
    let mut dropped: u64 = 0;
    if !outbox.deliver(
        &reply("courier.tail.started", &started_line(&filter)),
        usize::MAX,
    ) {
        return;
    }
    loop {
        if outbox.is_gone() {
            return;
        }
        let item = match tokio::time::timeout(GONE_CHECK, rx.recv()).await {
            Err(_) => continue,
            Ok(Ok(item)) => item,
            Ok(Err(broadcast::error::RecvError::Lagged(n))) => {
                dropped += n;
                continue;
            }
            Ok(Err(broadcast::error::RecvError::Closed)) => return,
        };
        if !filter.matches(&item.tapped) {
            continue;
        }
        if dropped > 0 {
            let notice = reply("courier.tail.dropped", &json!({ "dropped": dropped }));
            if outbox.deliver(&notice, TAIL_PENDING_BYTES_MAX) {
                dropped = 0;
            }
        }
        let line = reply("courier.tail.line", &tail_line(&filter, &item));
        if !outbox.deliver(&line, TAIL_PENDING_BYTES_MAX) {
            dropped += 1;
        }
    }
}

impl Outbox {
    /// Queues a delivery unless more than `pending_max` bytes wait to be
    /// written; whether it was queued.
    pub(crate) fn deliver(&self, message: &Message, pending_max: usize) -> bool {
        let mut state = self.lock();
        if state.closing || state.writer.len() + state.writing > pending_max {
            return false;
        }
        if let Err(e) = state.writer.push_delivery(0, 1, message) {
            warn!(error = %e, "a tail line could not be encoded; dropped");
            return false;
        }
        drop(state);
        self.wake.notify_one();
        true
    }
}
