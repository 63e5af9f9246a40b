//! Keyed messages to other nodes' instances (docs/SCALE-OUT.md §5 "Other
//! nodes' instances"). The keyed lane's holder is the only node that
//! fetches a service's keyed messages; its core hands them to the
//! service's instances on other nodes through a relay per node
//! (`courier_broker`'s `relays.rs`). This file is both ends:
//!
//! - **A node that does not hold the lane** pulls while it has instances
//!   of the service ([`pull_keyed_lane`]); it takes relayed deliveries
//!   ([`take_relayed`]) into its core like fetched ones, their outcomes
//!   going back to the holder through its store.
//! - **The holder** answers pulls by opening or updating a relay
//!   ([`serve_pulls`]), sends what its core delivers to a relay
//!   ([`send_relayed`]), feeds the outcomes back to its core
//!   ([`take_outcomes`]), and closes relays whose node stopped pulling
//!   ([`reap_relays`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use bytes::BytesMut;
use courier_broker::ConnId;
use courier_cluster::ack_subject::AckSubject;
use courier_cluster::relay::{
    self, Admission, GivenBack, Outcome, Pull, PullAnswer, RelayHandle, ATTEMPT_HEADER, PULL_EVERY,
    RELAY_IDLE, SERVICE_HEADER, SETTLE_HEADER,
};
use courier_proto::{Kind, Message, ATTEMPT_KEY_START};
use futures_util::StreamExt as _;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::Shared;

/// How long a pull waits for the holder's answer.
const PULL_PATIENCE: Duration = Duration::from_secs(1);
/// How often a pulling node looks whether its instances changed.
const PULL_CHECK_EVERY: Duration = Duration::from_millis(250);
/// How often the holder looks for relays whose node stopped pulling.
const REAP_EVERY: Duration = Duration::from_secs(2);

/// A delivery the core made to a relay, on its way to the relay's node.
pub(crate) struct Relayed {
    pub conn: ConnId,
    pub delivery: u64,
    pub attempt: u32,
    pub message: Arc<Message>,
    pub log_seq: u64,
}

/// A relay this node opened as a keyed lane's holder.
struct Relay {
    service: String,
    node: String,
    last_pull: Instant,
}

/// The relays this node holds open, and their deliveries' way out.
pub(crate) struct Relays {
    open: Mutex<HashMap<ConnId, Relay>>,
    deliveries: mpsc::UnboundedSender<Relayed>,
    deliveries_rx: Mutex<Option<mpsc::UnboundedReceiver<Relayed>>>,
    /// The high half of this process's relay numbers (random, never 0):
    /// a node started again under the same id counts its connections
    /// from 1 again, and an outcome meant for a relay of its last run
    /// must not settle a delivery of this one.
    run: u64,
}

/// The low half of a relay number: the relay's connection id.
const RELAY_CONN_BITS: u64 = 0xFFFF_FFFF;

impl Default for Relays {
    fn default() -> Relays {
        use std::hash::{BuildHasher, Hasher};
        let (deliveries, rx) = mpsc::unbounded_channel();
        // Seeded at random per process by the standard library.
        let random = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        Relays {
            open: Mutex::default(),
            deliveries,
            deliveries_rx: Mutex::new(Some(rx)),
            run: (random & RELAY_CONN_BITS).max(1) << 32,
        }
    }
}

impl Relays {
    fn open(&self) -> MutexGuard<'_, HashMap<ConnId, Relay>> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The number other nodes know the relay of `conn` by.
    fn number(&self, conn: ConnId) -> u64 {
        self.run | (conn & RELAY_CONN_BITS)
    }

    /// The open relay an outcome's relay `number` names: `None` for a
    /// relay of another run of this node, or one closed since.
    fn conn_of(&self, number: u64) -> Option<ConnId> {
        if number & !RELAY_CONN_BITS != self.run {
            return None;
        }
        let conn = number & RELAY_CONN_BITS;
        self.open().contains_key(&conn).then_some(conn)
    }

    /// Hands the core's delivery to a relay on to its node; `false`: no
    /// such relay here.
    pub(crate) fn send(&self, relayed: Relayed) -> bool {
        if !self.open().contains_key(&relayed.conn) {
            return false;
        }
        self.deliveries.send(relayed).is_ok()
    }

    /// The relays open: (service, node), sorted.
    pub(crate) fn listing(&self) -> Vec<(String, String)> {
        let mut listing: Vec<(String, String)> = self
            .open()
            .values()
            .map(|r| (r.service.clone(), r.node.clone()))
            .collect();
        listing.sort();
        listing
    }

    fn of(&self, service: &str, node: &str) -> Option<ConnId> {
        self.open()
            .iter()
            .find(|(_, r)| r.service == service && r.node == node)
            .map(|(conn, _)| *conn)
    }
}

/// Starts the tasks every node runs: taking relayed deliveries, sending
/// its relays' deliveries, hearing their outcomes, closing idle relays.
pub(super) fn start(shared: &Arc<Shared>) -> Vec<crate::AbortOnDrop> {
    let Some(edge) = &shared.cluster else {
        return Vec::new();
    };
    let mut tasks = vec![
        crate::AbortOnDrop(tokio::spawn(take_relayed(Arc::downgrade(shared)))),
        crate::AbortOnDrop(tokio::spawn(take_outcomes(Arc::downgrade(shared)))),
        crate::AbortOnDrop(tokio::spawn(reap_relays(Arc::downgrade(shared)))),
    ];
    let rx = edge
        .relays
        .deliveries_rx
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take();
    if let Some(rx) = rx {
        tasks.push(crate::AbortOnDrop(tokio::spawn(send_relayed(
            Arc::downgrade(shared),
            rx,
        ))));
    }
    tasks
}

/// A delivery on its way to a relay's node, with what its headers say.
struct Outgoing {
    service: String,
    node: String,
    handle: RelayHandle,
    /// Where a command's replies go.
    reply_node: Option<String>,
    /// The accepting node traces its activity.
    traced: bool,
    relayed: Relayed,
}

/// The holder's side: sends each delivery to its relay's node, naming
/// where the outcome goes and, for a command, the node its replies go to.
async fn send_relayed(shared: Weak<Shared>, mut deliveries: mpsc::UnboundedReceiver<Relayed>) {
    let mut batch = Vec::new();
    while deliveries.recv_many(&mut batch, 256).await > 0 {
        let Some(strong) = shared.upgrade() else {
            return;
        };
        let Some(edge) = &strong.cluster else {
            return;
        };
        let holder = edge.node.node.as_str().to_string();
        let client = edge.node.connection.client.clone();
        let targets: HashMap<ConnId, (String, String)> = edge
            .relays
            .open()
            .iter()
            .map(|(conn, r)| (*conn, (r.service.clone(), r.node.clone())))
            .collect();
        let mut out = Vec::with_capacity(batch.len());
        {
            let core = strong.core();
            for relayed in batch.drain(..) {
                let Some((service, node)) = targets.get(&relayed.conn) else {
                    continue; // closed: the core took it back
                };
                // A message relayed here by the last holder is relayed on:
                // its outcome comes back here and goes on to that holder.
                let store = core.store();
                let Some(stream_seq) = store.fetched_handle(relayed.log_seq).and_then(|h| {
                    AckSubject::parse(&h)
                        .map(|ack| ack.stream_seq)
                        .or_else(|| RelayHandle::parse(&h).map(|r| r.stream_seq))
                }) else {
                    continue; // settled meanwhile
                };
                let reply_node = (relayed.message.kind == Kind::Command).then(|| {
                    core.reply_node_of(&relayed.message.id)
                        .unwrap_or_else(|| holder.clone())
                });
                let handle = RelayHandle {
                    holder: holder.clone(),
                    relay: edge.relays.number(relayed.conn),
                    delivery: relayed.delivery,
                    stream_seq,
                };
                out.push(Outgoing {
                    service: service.clone(),
                    node: node.clone(),
                    handle,
                    reply_node,
                    traced: store.fetched_traced(relayed.log_seq),
                    relayed,
                });
            }
        }
        drop(strong);
        for outgoing in out {
            let Outgoing {
                service,
                node,
                handle,
                reply_node,
                traced,
                relayed,
            } = outgoing;
            let mut payload = BytesMut::new();
            if let Err(e) = courier_proto::encode_message(&relayed.message, &mut payload) {
                warn!(error = %e, "a keyed delivery for another node cannot be encoded; it goes back when that node is gone");
                continue;
            }
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(SERVICE_HEADER, service.as_str());
            headers.insert(ATTEMPT_HEADER, relayed.attempt.to_string().as_str());
            headers.insert(SETTLE_HEADER, handle.subject().as_str());
            if let Some(reply_node) = &reply_node {
                headers.insert(courier_cluster::store::REPLY_TO_HEADER, reply_node.as_str());
            }
            courier_cluster::store::mark_traced(&mut headers, traced);
            let sent = client
                .publish_with_headers(relay::deliver_subject(&node), headers, payload.freeze())
                .await;
            if let Err(e) = sent {
                debug!(error = %e, %node, "a keyed delivery did not leave for its node");
            }
        }
    }
}

/// The holder's side: what the other nodes' instances did with relayed
/// deliveries, as JetStream would hear it.
async fn take_outcomes(shared: Weak<Shared>) {
    let Some((client, node)) = shared.upgrade().and_then(|s| {
        let edge = s.cluster.as_ref()?;
        Some((
            edge.node.connection.client.clone(),
            edge.node.node.as_str().to_string(),
        ))
    }) else {
        return;
    };
    let mut outcomes = match client.subscribe(relay::settled_subjects(&node)).await {
        Ok(outcomes) => outcomes,
        Err(e) => {
            warn!(error = %e, "cannot hear what other nodes' instances did with keyed messages; they come back after the ack deadline");
            return;
        }
    };
    while let Some(message) = outcomes.next().await {
        let (Some(handle), Some(outcome)) = (
            RelayHandle::parse(message.subject.as_str()),
            Outcome::parse(&message.payload),
        ) else {
            debug!(subject = %message.subject, "an outcome of a relayed delivery that does not read");
            continue;
        };
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let Some(edge) = &shared.cluster else {
            return;
        };
        let Some(conn) = edge.relays.conn_of(handle.relay) else {
            debug!(subject = %message.subject, "an outcome for a relay closed or of an earlier run of this node");
            continue;
        };
        match outcome {
            Outcome::Ack => {
                shared.with_core_deferred(|core, now| core.ack(conn, handle.delivery, now))
            }
            Outcome::Nak { delay_ms } => shared
                .with_core_deferred(|core, now| core.nack(conn, handle.delivery, delay_ms, now)),
            Outcome::InProgress => {}
            Outcome::Gone => {
                if edge.relays.open().remove(&conn).is_some() {
                    info!("closed the relay of keyed messages to a node with no instance left");
                }
                shared.with_core_deferred(|core, now| core.close_relay(conn, now));
            }
        }
    }
}

/// The other side: deliveries the keyed lane's holder relays to this
/// node's instances, taken into the core as fetched messages whose
/// handle is the holder's outcome subject.
async fn take_relayed(shared: Weak<Shared>) {
    let Some((client, node, given_back)) = shared.upgrade().and_then(|s| {
        let edge = s.cluster.as_ref()?;
        Some((
            edge.node.connection.client.clone(),
            edge.node.node.as_str().to_string(),
            edge.node.given_back.clone(),
        ))
    }) else {
        return;
    };
    let mut relayed = match client.subscribe(relay::deliver_subject(&node)).await {
        Ok(relayed) => relayed,
        Err(e) => {
            warn!(error = %e, "cannot take keyed messages from other nodes; this node's instances get only those this node fetches");
            return;
        }
    };
    while let Some(delivery) = relayed.next().await {
        let taken = match read_relayed(&delivery, &given_back) {
            Arrival::Taken(taken) => taken,
            Arrival::Dropped => continue,
            Arrival::Retired(handle) => {
                // Its holder no longer leads the lane for this node: it
                // returns the message to the backend for the next one.
                let back = client.publish(handle, bytes::Bytes::from_static(b"-NAK"));
                if let Err(e) = back.await {
                    debug!(error = %e, "a delivery of a retired relay was not given back; its holder gives it back when the relay closes");
                }
                continue;
            }
        };
        let Some(shared) = shared.upgrade() else {
            return;
        };
        if shared.core().relay_pull_of(&taken.service).is_none() {
            // No instance here takes it (the last one left): the holder
            // closes the relay and gives what is out on it back at once,
            // instead of relaying each message here to be refused.
            let refused = client.publish(taken.handle, bytes::Bytes::from_static(relay::GONE));
            if let Err(e) = refused.await {
                debug!(error = %e, "a relayed delivery was not refused; the relay closes when this node stops pulling");
            }
            continue;
        }
        shared.with_core_deferred(|core, now| core.fetched(taken, now));
    }
}

/// What becomes of a delivery another node relayed here.
enum Arrival {
    /// The core takes it.
    Taken(courier_broker::Fetched),
    /// It does not read, or is stale (its key was given back and has not
    /// started again).
    Dropped,
    /// It came through a retired relay: it goes back to its holder
    /// through this handle.
    Retired(String),
}

fn read_relayed(delivery: &async_nats::Message, given_back: &GivenBack) -> Arrival {
    let Some((fetched, handle, key_start)) = decode_relayed(delivery) else {
        return Arrival::Dropped;
    };
    match given_back.admit(&handle, fetched.message.key.as_ref(), key_start) {
        Admission::Take => Arrival::Taken(fetched),
        Admission::Stale => Arrival::Dropped,
        Admission::Retired => Arrival::Retired(fetched.handle),
    }
}

/// A relayed delivery as the core takes it, its relay handle, and whether
/// it starts its key; `None` when it does not read.
fn decode_relayed(
    delivery: &async_nats::Message,
) -> Option<(courier_broker::Fetched, RelayHandle, bool)> {
    let headers = delivery.headers.as_ref()?;
    let header = |name: &str| headers.get(name).map(|v| v.as_str().to_string());
    let service = header(SERVICE_HEADER)?;
    let attempt: u32 = header(ATTEMPT_HEADER)?.parse().ok()?;
    let settle = header(SETTLE_HEADER)?;
    let handle = RelayHandle::parse(&settle)?;
    let message = match courier_proto::decode_message(delivery.payload.clone()) {
        Ok(message) => message,
        Err(e) => {
            debug!(error = %e, "a relayed delivery does not decode");
            return None;
        }
    };
    let fetched = courier_broker::Fetched {
        service,
        message: Arc::new(message),
        attempt: (attempt & !ATTEMPT_KEY_START).max(1),
        handle: settle,
        reply_node: header(courier_cluster::store::REPLY_TO_HEADER),
        traced: courier_cluster::store::is_traced(Some(headers)),
    };
    Some((fetched, handle, attempt & ATTEMPT_KEY_START != 0))
}

/// The other side: while this node has instances of `service` that
/// consume and another node holds the keyed lane, tells that node what
/// they take — at once when it changes, else every [`PULL_EVERY`].
pub(super) async fn pull_keyed_lane(
    shared: Weak<Shared>,
    service: String,
    mut stop: watch::Receiver<bool>,
) {
    let lease = courier_cluster::names::keyed_lane_lease(&service);
    let subject = relay::pull_subject(&service);
    let mut last: Option<(Pull, Instant)> = None;
    let mut answered: Option<PullAnswer> = None;
    while !*stop.borrow() {
        let _ = tokio::time::timeout(PULL_CHECK_EVERY, stop.changed()).await;
        let Some(strong) = shared.upgrade() else {
            return;
        };
        let Some(edge) = &strong.cluster else {
            return;
        };
        let now = Instant::now();
        if edge.node.held_leases.holds(&lease, now) {
            last = None;
            continue;
        }
        let Some((patterns, capacity)) = strong.core().relay_pull_of(&service) else {
            continue;
        };
        let pull = Pull {
            node: edge.node.node.as_str().to_string(),
            patterns,
            capacity,
        };
        let due = last
            .as_ref()
            .is_none_or(|(sent, at)| *sent != pull || now.duration_since(*at) >= PULL_EVERY);
        if !due {
            continue;
        }
        let client = edge.node.connection.client.clone();
        let given_back = edge.node.given_back.clone();
        drop(strong);
        let Ok(body) = serde_json::to_vec(&pull) else {
            continue;
        };
        let asked =
            tokio::time::timeout(PULL_PATIENCE, client.request(subject.clone(), body.into()));
        let answer = match asked.await {
            Ok(Ok(answer)) => answer,
            // No holder yet, or it is busy: asked again shortly.
            _ => continue,
        };
        last = Some((pull, now));
        let Ok(answer) = serde_json::from_slice::<PullAnswer>(&answer.payload) else {
            continue;
        };
        if let Some(before) = answered.as_ref().filter(|before| **before != answer) {
            // Another relay (another holder, or the same one that closed
            // the last, perhaps taking back what was out on it): nothing
            // of the last is handled here any more, and what it relayed
            // and is still queued here goes back. The new relay's first
            // deliveries, if already here, go back with them; its holder
            // retries them in their keys' order.
            given_back.retire_relay(&before.holder, before.relay);
            if let Some(shared) = shared.upgrade() {
                shared.with_core_deferred(|core, now| core.keyed_relay_moved(&service, now));
            }
            info!(%service, holder = %answer.holder, "taking keyed messages from the keyed lane's holder");
        }
        answered = Some(answer);
    }
}

/// The holder's side, while it holds `service`'s keyed lane: answers
/// pulls by opening a relay to the pulling node, or updating it.
pub(super) async fn serve_pulls(shared: Weak<Shared>, service: String) {
    let Some(client) = shared
        .upgrade()
        .and_then(|s| Some(s.cluster.as_ref()?.node.connection.client.clone()))
    else {
        return;
    };
    let mut pulls = match client.subscribe(relay::pull_subject(&service)).await {
        Ok(pulls) => pulls,
        Err(e) => {
            warn!(error = %e, %service, "cannot hear other nodes pull keyed messages; only this node's instances get them");
            return;
        }
    };
    while let Some(request) = pulls.next().await {
        let Some(reply_to) = request.reply else {
            continue;
        };
        let Ok(pull) = serde_json::from_slice::<Pull>(&request.payload) else {
            continue;
        };
        let Some(strong) = shared.upgrade() else {
            return;
        };
        let Some(edge) = &strong.cluster else {
            return;
        };
        let holder = edge.node.node.as_str().to_string();
        if pull.node == holder {
            continue;
        }
        let conn = match edge.relays.of(&service, &pull.node) {
            Some(conn) => {
                strong.with_core_deferred(|core, now| {
                    core.update_relay(conn, &pull.patterns, pull.capacity, now);
                });
                conn
            }
            None => {
                let conn = strong
                    .next_conn
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                edge.relays.open().insert(
                    conn,
                    Relay {
                        service: service.clone(),
                        node: pull.node.clone(),
                        last_pull: Instant::now(),
                    },
                );
                info!(%service, node = %pull.node, "relaying keyed messages to another node's instances");
                strong.with_core_deferred(|core, now| {
                    core.open_relay(
                        conn,
                        &service,
                        &pull.node,
                        &pull.patterns,
                        pull.capacity,
                        now,
                    );
                });
                conn
            }
        };
        if let Some(relay) = edge.relays.open().get_mut(&conn) {
            relay.last_pull = Instant::now();
        }
        let answer = PullAnswer {
            holder,
            relay: edge.relays.number(conn),
        };
        drop(strong);
        if let Ok(body) = serde_json::to_vec(&answer) {
            if let Err(e) = client.publish(reply_to, body.into()).await {
                debug!(error = %e, "a pull was not answered");
            }
        }
    }
}

/// The holder's side: closes relays whose node stopped pulling — at once
/// when nothing is out on them, else once their node is gone (what is
/// out goes back, each key from its first unacked message). A node that
/// still answers keeps what it has until it settles it.
async fn reap_relays(shared: Weak<Shared>) {
    loop {
        tokio::time::sleep(REAP_EVERY).await;
        let Some(strong) = shared.upgrade() else {
            return;
        };
        let Some(edge) = &strong.cluster else {
            return;
        };
        let now = Instant::now();
        let idle: Vec<(ConnId, String)> = edge
            .relays
            .open()
            .iter()
            .filter(|(_, r)| now.duration_since(r.last_pull) >= RELAY_IDLE)
            .map(|(conn, r)| (*conn, r.node.clone()))
            .collect();
        if idle.is_empty() {
            continue;
        }
        let client = edge.node.connection.client.clone();
        for (conn, node) in idle {
            let out = strong.core().relay_in_flight(conn);
            let close = match out {
                None | Some(0) => true,
                Some(_) => !super::replies::node_answers(&client, &node).await,
            };
            if close {
                edge.relays.open().remove(&conn);
                strong.with_core_deferred(|core, now| core.close_relay(conn, now));
                info!(%node, "closed the relay of keyed messages to a node that stopped pulling");
            }
        }
    }
}
