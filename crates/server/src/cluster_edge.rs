//! A node's edge to a NATS JetStream cluster (docs/SCALE-OUT.md): the
//! tasks that feed the core what other nodes did and what the backend
//! holds for this node's instances.
//!
//! - **Fetching.** For every service with an instance here that consumes,
//!   a loop pulls from the service's consumers no more than the core's
//!   [`Broker::fetch_credit`], and hands each message to
//!   [`Broker::fetched`] (the keyed lane only under its lease). Loops
//!   start and stop as instances come and go.
//! - **Transient messages** no instance here takes are offered to the
//!   nodes with instances of their service, and taken from them.
//! - **Subscriptions.** A watch of the `courier_services` bucket feeds
//!   [`Broker::subscriptions_changed`]: a subscription made on any node
//!   routes on every node.
//! - **Replies.** A reply to a command accepted on another node leaves as
//!   a core NATS request to `courier.node.<node>.reply`
//!   ([`courier_broker::Action::ForwardReply`]); this node answers those
//!   requests for its own requesters with [`Broker::remote_reply`]. A
//!   reply whose requester's node is gone, or whose requester left it, is
//!   offered to its service's instances on any node (`courier.r.<service>`),
//!   else parked on the node that has it.
//! - **Registration.** The node's record in `courier_nodes`, renewed.
//!
//! [`Broker::fetch_credit`]: courier_broker::Broker::fetch_credit
//! [`Broker::fetched`]: courier_broker::Broker::fetched
//! [`Broker::subscriptions_changed`]: courier_broker::Broker::subscriptions_changed
//! [`Broker::remote_reply`]: courier_broker::Broker::remote_reply

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use courier_broker::{ConnId, RemoteReply, RemoteSubscriptions};
use courier_cluster::consumers::Lane;
use courier_cluster::lease::{Acquired, Holding, Lease, LeaseKeeper, LeaseTiming};
use courier_cluster::{Connection, NodeId};
use courier_proto::{ErrorCode, Message};
use futures_util::StreamExt as _;
use tokio::sync::{mpsc, watch, Notify};
use tracing::{info, warn};

use crate::Shared;

/// How long a node waits for the requester's node to take a reply.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the fetch loops are checked against the consuming services
/// when nothing woke the check earlier.
const FETCHERS_CHECK_EVERY: Duration = Duration::from_millis(250);

/// What a server on a cluster backend is given.
pub struct ClusterNode {
    pub connection: Connection,
    pub node: NodeId,
    /// The node's record in `courier_nodes` is put into this bucket.
    pub nodes: async_nats::jetstream::kv::Store,
    /// `courier_leases`: the keyed lanes' leases.
    pub leases: async_nats::jetstream::kv::Store,
    /// The record put there (its addresses are filled in at start).
    pub record: courier_cluster::nodes::NodeRecord,
    /// Started with `--accept-weaker-durability` past a failed check
    /// (the `courier_durability_weaker` gauge).
    pub durability_weaker: bool,
}

impl std::fmt::Debug for ClusterNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterNode")
            .field("node", &self.node.as_str())
            .finish_non_exhaustive()
    }
}

/// A reply on its way to the node its command was accepted on.
pub(crate) struct Forward {
    pub conn: ConnId,
    pub seq: u64,
    pub quiet: bool,
    pub node: String,
    /// The command's sender, whose instances elsewhere take the reply if
    /// `node` is gone.
    pub requester: String,
    pub message: Arc<Message>,
}

/// A transient message offered to another node's instances.
pub(crate) struct Transient {
    pub service: String,
    pub message: Arc<Message>,
}

/// The edge's state the server shares.
pub(crate) struct ClusterEdge {
    pub node: Arc<ClusterNode>,
    /// Replies to forward ([`courier_broker::Action::ForwardReply`]).
    pub forwards: mpsc::UnboundedSender<Forward>,
    forwards_rx: std::sync::Mutex<Option<mpsc::UnboundedReceiver<Forward>>>,
    /// Transient messages to offer ([`courier_broker::Action::ForwardTransient`]).
    pub transients: mpsc::UnboundedSender<Transient>,
    transients_rx: std::sync::Mutex<Option<mpsc::UnboundedReceiver<Transient>>>,
    /// The dead-letter commands (`cluster_dead_letters.rs`).
    pub dead_letters: crate::cluster_dead_letters::Queries,
    /// Woken after every pass of the core: room may have freed up for a
    /// fetch loop, or a service may have gained or lost its consumers.
    pub room: Arc<Notify>,
}

impl ClusterEdge {
    pub(crate) fn new(node: Arc<ClusterNode>) -> ClusterEdge {
        let (forwards, rx) = mpsc::unbounded_channel();
        let (transients, transients_rx) = mpsc::unbounded_channel();
        ClusterEdge {
            node,
            forwards,
            forwards_rx: std::sync::Mutex::new(Some(rx)),
            transients,
            transients_rx: std::sync::Mutex::new(Some(transients_rx)),
            dead_letters: crate::cluster_dead_letters::Queries::new(),
            room: Arc::new(Notify::new()),
        }
    }
}

/// The subject a node takes forwarded replies on.
fn reply_subject(node: &str) -> String {
    format!("courier.node.{node}.reply")
}

/// Starts the edge's tasks; they end when the server's tasks are dropped
/// (each holds the server only weakly).
pub(crate) fn start(shared: &Arc<Shared>) -> Vec<crate::AbortOnDrop> {
    let Some(edge) = &shared.cluster else {
        return Vec::new();
    };
    let forwards = edge
        .forwards_rx
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    let mut tasks = vec![
        crate::AbortOnDrop(tokio::spawn(run_fetchers(Arc::downgrade(shared)))),
        crate::AbortOnDrop(tokio::spawn(watch_subscriptions(Arc::downgrade(shared)))),
        crate::AbortOnDrop(tokio::spawn(serve_forwarded_replies(Arc::downgrade(
            shared,
        )))),
        crate::AbortOnDrop(tokio::spawn(run_reply_takers(Arc::downgrade(shared)))),
        crate::AbortOnDrop(tokio::spawn(keep_registered(edge.node.clone()))),
        crate::AbortOnDrop(tokio::spawn(reclaim_while_leading(edge.node.clone()))),
    ];
    tasks.extend(edge.dead_letters.start(shared));
    if let Some(rx) = forwards {
        tasks.push(crate::AbortOnDrop(tokio::spawn(forward_replies(
            Arc::downgrade(shared),
            rx,
        ))));
    }
    let transients = edge
        .transients_rx
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    if let Some(rx) = transients {
        tasks.push(crate::AbortOnDrop(tokio::spawn(offer_transients(
            edge.node.connection.client.clone(),
            rx,
        ))));
    }
    tasks
}

/// Where a service's transient messages are offered to other nodes: a
/// core NATS subject per service and name, taken by one node of the
/// service's queue group (SCALE-OUT §9).
fn transient_subject(service: &str, name: &str) -> String {
    format!(
        "courier.t.{}.{name}",
        courier_cluster::names::service_token(service)
    )
}

/// Offers transient messages no instance here takes to the nodes that
/// have instances of their service: at most once, as on one broker.
async fn offer_transients(
    client: async_nats::Client,
    mut transients: mpsc::UnboundedReceiver<Transient>,
) {
    while let Some(Transient { service, message }) = transients.recv().await {
        let mut payload = BytesMut::new();
        if courier_proto::encode_message(&message, &mut payload).is_err() {
            continue;
        }
        let subject = transient_subject(&service, &message.name);
        if let Err(e) = client.publish(subject, payload.freeze()).await {
            tracing::debug!(error = %e, "a transient message was not offered to other nodes");
        }
    }
}

/// Takes the transient messages other nodes offer to `service` while it
/// has instances here (one node of the queue group gets each).
async fn take_transients(
    shared: Weak<Shared>,
    client: async_nats::Client,
    service: String,
    mut stop: watch::Receiver<bool>,
) {
    let token = courier_cluster::names::service_token(&service);
    let subject = format!("courier.t.{token}.>");
    let mut offered = match client.queue_subscribe(subject, token).await {
        Ok(offered) => offered,
        Err(e) => {
            warn!(error = %e, %service, "cannot take transient messages from other nodes");
            return;
        }
    };
    loop {
        let message = tokio::select! {
            message = offered.next() => message,
            _ = stop.changed() => None,
        };
        let Some(message) = message else {
            return;
        };
        let Some(shared) = shared.upgrade() else {
            return;
        };
        match courier_proto::decode_message(message.payload) {
            Ok(decoded) => shared.with_core_deferred(|core, now| {
                core.remote_transient(&service, Arc::new(decoded), now)
            }),
            Err(e) => tracing::debug!(error = %e, "an offered transient message does not decode"),
        }
    }
}

/// Keeps one fetch loop per service that has a consuming instance here.
async fn run_fetchers(shared: Weak<Shared>) {
    let mut running: HashMap<String, watch::Sender<bool>> = HashMap::new();
    loop {
        let Some(strong) = shared.upgrade() else {
            return;
        };
        let Some(edge) = &strong.cluster else {
            return;
        };
        let room = edge.room.clone();
        let connection = edge.node.connection.clone();
        let wanted = strong.core().consuming_services();
        drop(strong);
        running.retain(|service, stop| {
            let keep = wanted.contains(service);
            if !keep {
                let _ = stop.send(true);
            }
            keep
        });
        for service in wanted {
            if running.contains_key(&service) {
                continue;
            }
            let (stop, stopped) = watch::channel(false);
            running.insert(service.clone(), stop);
            tokio::spawn(fetch_service(
                shared.clone(),
                connection.clone(),
                service,
                room.clone(),
                stopped,
            ));
        }
        let _ = tokio::time::timeout(FETCHERS_CHECK_EVERY, room.notified()).await;
    }
}

/// What a fetch loop asks before each pull: the room `service`'s
/// instances here have.
fn credit_of(shared: Weak<Shared>, service: String) -> impl Fn() -> u32 + Send + Sync {
    move || {
        shared
            .upgrade()
            .map_or(0, |s| s.core().fetch_credit(&service))
    }
}

/// Where a fetch loop hands what it fetched: the core, in one pass.
fn deliver_to(shared: Weak<Shared>) -> impl FnMut(Vec<courier_cluster::fetch::Fetched>) + Send {
    move |batch| {
        let Some(shared) = shared.upgrade() else {
            return;
        };
        shared.with_core_deferred(|core, now| {
            for fetched in batch {
                let fetched = courier_broker::Fetched {
                    service: fetched.service,
                    message: fetched.message,
                    attempt: fetched.attempt,
                    handle: fetched.handle,
                    reply_node: fetched.reply_node,
                };
                core.fetched(fetched, now);
            }
        });
    }
}

/// Fetches `service`'s messages until `stop`: its unkeyed lane always,
/// its keyed lane only while this node holds the lane's lease
/// (SCALE-OUT §5) — one fetcher at a time keeps each key's messages in
/// order across nodes — and takes the transient messages other nodes
/// offer it.
async fn fetch_service(
    shared: Weak<Shared>,
    connection: Connection,
    service: String,
    room: Arc<Notify>,
    stop: watch::Receiver<bool>,
) {
    let unkeyed = courier_cluster::fetch::run_lanes(
        connection.clone(),
        service.clone(),
        &[Lane::Unkeyed],
        credit_of(shared.clone(), service.clone()),
        room.clone(),
        deliver_to(shared.clone()),
        stop.clone(),
    );
    let transients = take_transients(
        shared.clone(),
        connection.client.clone(),
        service.clone(),
        stop.clone(),
    );
    let keyed = lead_keyed_lane(shared, connection, service, room, stop);
    tokio::join!(unkeyed, keyed, transients);
}

/// How often a node that does not hold a keyed lane's lease tries again.
const LANE_LEASE_RETRY: Duration = Duration::from_secs(1);
/// Added to the lane's ack deadline when a new holder waits for what the
/// last one left unacknowledged.
const TAKEOVER_MARGIN: Duration = Duration::from_millis(500);

/// Takes the lease of `service`'s keyed lane whenever it is free, and
/// fetches the lane while the lease is valid.
async fn lead_keyed_lane(
    shared: Weak<Shared>,
    connection: Connection,
    service: String,
    room: Arc<Notify>,
    mut stop: watch::Receiver<bool>,
) {
    let Some((leases, node)) = shared.upgrade().and_then(|s| {
        s.cluster
            .as_ref()
            .map(|e| (e.node.leases.clone(), e.node.node.clone()))
    }) else {
        return;
    };
    let key = courier_cluster::names::keyed_lane_lease(&service);
    while !*stop.borrow() {
        let acquired = Lease::acquire(&leases, &key, &node, LeaseTiming::default()).await;
        let keeper = match acquired {
            Ok(Acquired::Gained(lease)) => LeaseKeeper::keep(*lease),
            Ok(Acquired::HeldBy { .. }) => {
                let _ = tokio::time::timeout(LANE_LEASE_RETRY, stop.changed()).await;
                continue;
            }
            Err(e) => {
                warn!(error = %e, %service, "cannot take the keyed lane's lease; retrying");
                let _ = tokio::time::timeout(LANE_LEASE_RETRY, stop.changed()).await;
                continue;
            }
        };
        info!(%service, "leading the keyed lane");
        let mut holding = keeper.watch();
        let (lane_stop, lane_stopped) = watch::channel(false);
        let lane = async {
            wait_for_takeover(&connection, &service).await;
            courier_cluster::fetch::run_lanes(
                connection.clone(),
                service.clone(),
                &[Lane::Keyed],
                credit_of(shared.clone(), service.clone()),
                room.clone(),
                deliver_to(shared.clone()),
                lane_stopped,
            )
            .await;
        };
        let fence = lease_ends(&mut holding);
        let stopping = async {
            while !*stop.borrow() {
                if stop.changed().await.is_err() {
                    break;
                }
            }
        };
        tokio::select! {
            () = lane => {}
            () = fence => {
                warn!(%service, "the keyed lane's lease ended; this node stops fetching it");
                let _ = lane_stop.send(true);
            }
            () = stopping => {
                let _ = lane_stop.send(true);
                if let Err(e) = keeper.release().await {
                    warn!(error = %e, %service, "could not release the keyed lane's lease; it ages out");
                }
                return;
            }
        }
    }
}

/// Returns when the lease may no longer be acted on: lost, or its last
/// confirmed renewal too old (no quorum to renew it).
async fn lease_ends(holding: &mut watch::Receiver<Holding>) {
    loop {
        let valid_until = match &*holding.borrow() {
            Holding::Held { valid_until, .. } => *valid_until,
            Holding::Lost { .. } => return,
        };
        let expired = tokio::time::sleep_until(valid_until);
        tokio::select! {
            () = expired => return,
            changed = holding.changed() => if changed.is_err() { return },
        }
    }
}

/// A new holder of a keyed lane waits until what the previous holder had
/// fetched and not acknowledged is due for redelivery: JetStream hands
/// redeliveries out before newer messages, so each key resumes from its
/// first unacknowledged message, in order.
async fn wait_for_takeover(connection: &Connection, service: &str) {
    let name = courier_cluster::consumers::consumer_name(service, Lane::Keyed);
    let consumer: Result<async_nats::jetstream::consumer::PullConsumer, _> = connection
        .jetstream
        .get_consumer_from_stream(&name, courier_cluster::names::MESSAGES_STREAM)
        .await;
    let Ok(mut consumer) = consumer else {
        return; // none yet: nothing was fetched from it
    };
    let Ok(info) = consumer.info().await else {
        return;
    };
    if info.num_ack_pending == 0 {
        return;
    }
    let wait = info.config.ack_wait + TAKEOVER_MARGIN;
    info!(
        %service,
        unacknowledged = info.num_ack_pending,
        "waiting {wait:?} for the last holder's unacknowledged keyed messages"
    );
    tokio::time::sleep(wait).await;
}

/// Feeds the core every change of `courier_services`, from any node.
async fn watch_subscriptions(shared: Weak<Shared>) {
    loop {
        let Some(connection) = shared
            .upgrade()
            .and_then(|s| s.cluster.as_ref().map(|e| e.node.connection.clone()))
        else {
            return;
        };
        let mut changes = match courier_cluster::services::watch(&connection).await {
            Ok(changes) => Box::pin(changes),
            Err(e) => {
                warn!(error = %e, "cannot watch the cluster's subscriptions; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        while let Some(change) = changes.next().await {
            let Some(shared) = shared.upgrade() else {
                return;
            };
            match change {
                Ok((service, subscriptions)) => {
                    let subscriptions = subscriptions.map(|s| RemoteSubscriptions {
                        ack_deadline_ms: s.ack_deadline_ms,
                        max_deliveries: s.max_deliveries,
                        patterns: s
                            .patterns
                            .into_iter()
                            .map(|(pattern, state)| (pattern, state.paused))
                            .collect(),
                    });
                    shared.with_core_deferred(|core, now| {
                        core.subscriptions_changed(&service, subscriptions, now)
                    });
                }
                Err(e) => warn!(error = %e, "a subscription change could not be read"),
            }
        }
        warn!("the watch of the cluster's subscriptions ended; watching again");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Encodes a node's answer to a forwarded reply: the code, then the reason.
fn encode_answer(code: ErrorCode, reason: &str) -> Bytes {
    let mut out = BytesMut::with_capacity(2 + reason.len());
    out.put_u16(code.as_u16());
    out.put_slice(reason.as_bytes());
    out.freeze()
}

fn decode_answer(bytes: &[u8]) -> (ErrorCode, String) {
    match bytes {
        [high, low, reason @ ..] => (
            ErrorCode::from_u16(u16::from_be_bytes([*high, *low])),
            String::from_utf8_lossy(reason).into_owned(),
        ),
        _ => (
            ErrorCode::StorageFailed,
            "the requester's node answered with nothing readable".to_string(),
        ),
    }
}

/// Takes replies other nodes forward to this node's requesters.
async fn serve_forwarded_replies(shared: Weak<Shared>) {
    let Some((client, subject)) = shared.upgrade().and_then(|s| {
        s.cluster.as_ref().map(|e| {
            (
                e.node.connection.client.clone(),
                reply_subject(e.node.node.as_str()),
            )
        })
    }) else {
        return;
    };
    let mut requests = match client.subscribe(subject.clone()).await {
        Ok(requests) => requests,
        Err(e) => {
            warn!(error = %e, %subject, "cannot take forwarded replies; replies to this node's requesters from other nodes will fail");
            return;
        }
    };
    let shared_weak = shared;
    while let Some(request) = requests.next().await {
        let Some(shared) = shared_weak.upgrade() else {
            return;
        };
        let Some(to) = request.reply else {
            continue;
        };
        let message = match courier_proto::decode_message(request.payload.clone()) {
            Ok(message) => Arc::new(message),
            Err(e) => {
                let reason = format!("the forwarded reply cannot be decoded: {e}");
                let _ = client
                    .publish(to, encode_answer(ErrorCode::InvalidMessage, &reason))
                    .await;
                continue;
            }
        };
        let mut fate = RemoteReply::Answer(ErrorCode::Ok, String::new());
        shared.with_core_deferred(|core, now| fate = core.remote_reply(message.clone(), now));
        drop(shared);
        let client = client.clone();
        let shared_weak = shared_weak.clone();
        // Offering it elsewhere waits on other nodes: not in this loop.
        tokio::spawn(async move {
            let (code, reason) = match fate {
                RemoteReply::Answer(code, reason) => (code, reason),
                RemoteReply::ToService(service) => {
                    to_service_or_parked(&shared_weak, &client, &service, &request.payload, message)
                        .await
                }
            };
            if let Err(e) = client.publish(to, encode_answer(code, &reason)).await {
                warn!(error = %e, "could not answer a forwarded reply");
            }
        });
    }
}

/// Where a service's instances on other nodes take replies whose
/// requesting connection is gone: one node of the service's queue group
/// (SCALE-OUT §10).
fn service_reply_subject(service: &str) -> String {
    format!(
        "courier.r.{}",
        courier_cluster::names::service_token(service)
    )
}

/// Offers a reply to `service`'s instances on the other nodes; if none
/// takes it, gives it to one here, else parks it in this node's core for
/// the next instance of `service` to connect here. The answer for the
/// replier.
async fn to_service_or_parked(
    shared: &Weak<Shared>,
    client: &async_nats::Client,
    service: &str,
    encoded: &Bytes,
    message: Arc<Message>,
) -> (ErrorCode, String) {
    let request = client.request(service_reply_subject(service), encoded.clone());
    match tokio::time::timeout(FORWARD_TIMEOUT, request).await {
        Ok(Ok(answer)) => {
            let (code, reason) = decode_answer(&answer.payload);
            // Its instance there left meanwhile: park it here after all.
            if code != ErrorCode::UnknownRequest {
                return (code, reason);
            }
        }
        Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => {}
        Ok(Err(e)) => {
            return (
                ErrorCode::StorageFailed,
                format!(
                    "the reply could not be offered to service {service}'s instances: {e}; retry"
                ),
            )
        }
        Err(_) => {
            return (
                ErrorCode::StorageFailed,
                format!(
                    "no node with an instance of {service} took the reply within {} s; retry",
                    FORWARD_TIMEOUT.as_secs()
                ),
            )
        }
    }
    let Some(shared) = shared.upgrade() else {
        return (
            ErrorCode::StorageFailed,
            "the node is shutting down; retry".to_string(),
        );
    };
    // An instance that connected here a moment ago may not be taking
    // offers yet: it comes first.
    let mut answer = (ErrorCode::Ok, String::new());
    shared.with_core_deferred(|core, now| {
        match core.reply_to_service(service, message.clone(), now) {
            Some(taken) => answer = taken,
            None => core.park_reply(service, message),
        }
    });
    answer
}

/// Keeps one taker of offered replies per service with an instance here.
async fn run_reply_takers(shared: Weak<Shared>) {
    let mut running: HashMap<String, watch::Sender<bool>> = HashMap::new();
    loop {
        let Some(strong) = shared.upgrade() else {
            return;
        };
        let Some(edge) = &strong.cluster else {
            return;
        };
        let room = edge.room.clone();
        let client = edge.node.connection.client.clone();
        let wanted = strong.core().services_with_instances();
        drop(strong);
        running.retain(|service, stop| {
            let keep = wanted.contains(service);
            if !keep {
                let _ = stop.send(true);
            }
            keep
        });
        for service in wanted {
            if running.contains_key(&service) {
                continue;
            }
            let (stop, stopped) = watch::channel(false);
            running.insert(service.clone(), stop);
            tokio::spawn(take_service_replies(
                shared.clone(),
                client.clone(),
                service,
                stopped,
            ));
        }
        let _ = tokio::time::timeout(FETCHERS_CHECK_EVERY, room.notified()).await;
    }
}

/// Takes the replies other nodes offer `service` while it has instances
/// here ([`Broker::reply_to_service`]); answers `UnknownRequest` if they
/// all left meanwhile, so the offering node keeps the reply.
///
/// [`Broker::reply_to_service`]: courier_broker::Broker::reply_to_service
async fn take_service_replies(
    shared: Weak<Shared>,
    client: async_nats::Client,
    service: String,
    mut stop: watch::Receiver<bool>,
) {
    let subject = service_reply_subject(&service);
    let group = courier_cluster::names::service_token(&service);
    let mut offered = match client.queue_subscribe(subject, group).await {
        Ok(offered) => offered,
        Err(e) => {
            warn!(error = %e, %service, "cannot take replies other nodes offer; they wait on those nodes instead");
            return;
        }
    };
    loop {
        let request = tokio::select! {
            request = offered.next() => request,
            _ = stop.changed() => None,
        };
        let Some(request) = request else {
            return;
        };
        let Some(to) = request.reply else {
            continue;
        };
        let answer = match courier_proto::decode_message(request.payload) {
            Ok(message) => {
                let mut taken = None;
                if let Some(shared) = shared.upgrade() {
                    shared.with_core_deferred(|core, now| {
                        taken = core.reply_to_service(&service, Arc::new(message), now)
                    });
                }
                taken.unwrap_or_else(|| {
                    (
                        ErrorCode::UnknownRequest,
                        format!("no instance of {service} is on this node any more"),
                    )
                })
            }
            Err(e) => (
                ErrorCode::InvalidMessage,
                format!("the offered reply cannot be decoded: {e}"),
            ),
        };
        if let Err(e) = client.publish(to, encode_answer(answer.0, &answer.1)).await {
            warn!(error = %e, "could not answer an offered reply");
        }
    }
}

/// Sends replies to their command's node and answers their senders.
async fn forward_replies(shared: Weak<Shared>, mut forwards: mpsc::UnboundedReceiver<Forward>) {
    while let Some(forward) = forwards.recv().await {
        let Some(client) = shared
            .upgrade()
            .and_then(|s| s.cluster.as_ref().map(|e| e.node.connection.client.clone()))
        else {
            return;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let (code, reason) = match forward_one(&client, &forward).await {
                Some(answer) => answer,
                // The requester's node is gone: its instances reconnect
                // elsewhere, and one of them takes the reply.
                None => match encoded(&forward.message) {
                    Ok(payload) => {
                        to_service_or_parked(
                            &shared,
                            &client,
                            &forward.requester,
                            &payload,
                            forward.message.clone(),
                        )
                        .await
                    }
                    Err(answer) => answer,
                },
            };
            if let Some(shared) = shared.upgrade() {
                shared.with_core_deferred(|core, _now| {
                    core.forwarded_reply_answer(
                        forward.conn,
                        forward.seq,
                        forward.quiet,
                        code,
                        reason,
                    )
                });
            }
        });
    }
}

fn encoded(message: &Message) -> Result<Bytes, (ErrorCode, String)> {
    let mut payload = BytesMut::new();
    courier_proto::encode_message(message, &mut payload).map_err(|e| {
        (
            ErrorCode::InvalidMessage,
            format!("the reply cannot be encoded: {e}"),
        )
    })?;
    Ok(payload.freeze())
}

/// The requester's node's answer to a forwarded reply; `None` if that
/// node is gone (nothing listens on its subject).
async fn forward_one(
    client: &async_nats::Client,
    forward: &Forward,
) -> Option<(ErrorCode, String)> {
    let payload = match encoded(&forward.message) {
        Ok(payload) => payload,
        Err(answer) => return Some(answer),
    };
    let request = client.request(reply_subject(&forward.node), payload);
    Some(match tokio::time::timeout(FORWARD_TIMEOUT, request).await {
        Ok(Ok(answer)) => decode_answer(&answer.payload),
        Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => return None,
        Ok(Err(e)) => (
            ErrorCode::StorageFailed,
            format!(
                "the reply could not reach node {}: {e}; retry",
                forward.node
            ),
        ),
        Err(_) => (
            ErrorCode::StorageFailed,
            format!(
                "node {} did not take the reply within {} s; retry",
                forward.node,
                FORWARD_TIMEOUT.as_secs()
            ),
        ),
    })
}

/// How often the holder of the `reclaimer` lease purges what no consumer
/// needs any more.
const RECLAIM_EVERY: Duration = Duration::from_secs(30);

/// Takes the `reclaimer` lease whenever it is free and, while it holds
/// it, gives the log's space back every [`RECLAIM_EVERY`]
/// (`courier_cluster::reclaim`): one node at a time does, whichever.
async fn reclaim_while_leading(node: Arc<ClusterNode>) {
    loop {
        let acquired = Lease::acquire(
            &node.leases,
            courier_cluster::names::RECLAIMER_LEASE,
            &node.node,
            LeaseTiming::default(),
        )
        .await;
        let keeper = match acquired {
            Ok(Acquired::Gained(lease)) => LeaseKeeper::keep(*lease),
            Ok(Acquired::HeldBy { .. }) => {
                tokio::time::sleep(RECLAIM_EVERY).await;
                continue;
            }
            Err(e) => {
                warn!(error = %e, "cannot take the reclaimer's lease; retrying");
                tokio::time::sleep(LANE_LEASE_RETRY).await;
                continue;
            }
        };
        while keeper.is_valid_at(tokio::time::Instant::now()) {
            match courier_cluster::reclaim::reclaim_once(&node.connection.jetstream).await {
                Ok(Some(below)) => {
                    tracing::debug!(below, "purged the stored sends every consumer is past")
                }
                Ok(None) => {}
                Err(e) => warn!(error = %e, "the log's space was not reclaimed this time"),
            }
            tokio::time::sleep(RECLAIM_EVERY).await;
        }
    }
}

/// Puts the node's record into `courier_nodes` now and every few seconds,
/// so other nodes and the console find it while it lives.
async fn keep_registered(node: Arc<ClusterNode>) {
    let mut announced = false;
    loop {
        match courier_cluster::nodes::put_node(&node.nodes, &node.node, &node.record).await {
            Ok(_) if !announced => {
                announced = true;
                info!(node = node.node.as_str(), "registered in the cluster");
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "could not renew this node's registration"),
        }
        tokio::time::sleep(courier_cluster::nodes::NODE_PUT_EVERY).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_round_trip() {
        let bytes = encode_answer(ErrorCode::UnknownRequest, "gone");
        assert_eq!(
            decode_answer(&bytes),
            (ErrorCode::UnknownRequest, "gone".to_string())
        );
        assert_eq!(decode_answer(&[]).0, ErrorCode::StorageFailed);
    }
}
