//! Fetching (docs/SCALE-OUT.md §4, §5, §9): a loop per service with a
//! consuming instance here pulls its unkeyed lane always and its keyed
//! lane while this node holds the lane's lease (else it pulls its share
//! from the holder, `relaying.rs`); transient messages no
//! instance here takes are offered to the nodes with instances of their
//! service, and taken from them.

use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::BytesMut;
use courier_cluster::consumers::Lane;
use courier_cluster::lease::{Acquired, Holding, Lease, LeaseKeeper, LeaseTiming};
use courier_cluster::Connection;
use futures_util::StreamExt as _;
use tokio::sync::{mpsc, watch, Notify};
use tracing::{info, warn};

use super::replays::{self, SubscriptionTable};
use super::{per_service, ClusterEdge, Transient};
use crate::Shared;
use courier_cluster::replay::Drained;

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
/// A command's offer names this node, where its replies go back to.
pub(super) async fn offer_transients(
    client: async_nats::Client,
    node: String,
    mut transients: mpsc::UnboundedReceiver<Transient>,
) {
    while let Some(Transient {
        service,
        message,
        traced,
    }) = transients.recv().await
    {
        let mut payload = BytesMut::new();
        if courier_proto::encode_message(&message, &mut payload).is_err() {
            continue;
        }
        let subject = transient_subject(&service, &message.name);
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(courier_cluster::store::REPLY_TO_HEADER, node.as_str());
        courier_cluster::store::mark_traced(&mut headers, traced);
        let offered = client
            .publish_with_headers(subject, headers, payload.freeze())
            .await;
        if let Err(e) = offered {
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
        let headers = message.headers.as_ref();
        let reply_node = headers
            .and_then(|h| h.get(courier_cluster::store::REPLY_TO_HEADER))
            .map(|v| v.as_str().to_string());
        let traced = courier_cluster::store::is_traced(headers);
        match courier_proto::decode_message(message.payload) {
            Ok(decoded) => shared.with_core_deferred(|core, now| {
                core.remote_transient(&service, Arc::new(decoded), reply_node, traced, now)
            }),
            Err(e) => tracing::debug!(error = %e, "an offered transient message does not decode"),
        }
    }
}

/// Keeps one fetch loop per service that has a consuming instance here.
pub(super) async fn run_fetchers(shared: Weak<Shared>) {
    let wanted = |shared: &Shared| shared.core().consuming_services();
    let fetcher = |edge: &ClusterEdge, shared: Weak<Shared>, service, stop| {
        fetch_service(
            shared,
            edge.node.connection.clone(),
            service,
            edge.room.clone(),
            edge.subscriptions.clone(),
            stop,
        )
    };
    per_service(shared, wanted, fetcher).await;
}

/// What a fetch loop asks before each pull: the room `service`'s
/// instances here have — and, for the keyed lane (`keyed`), its relays
/// to other nodes' instances.
pub(super) fn credit_of(
    shared: Weak<Shared>,
    service: String,
    keyed: bool,
) -> impl Fn() -> u32 + Send + Sync {
    move || {
        shared
            .upgrade()
            .map_or(0, |s| s.core().fetch_credit(&service, keyed))
    }
}

/// Where a fetch loop hands what it fetched: the core, in one pass,
/// each message kept alive on JetStream until the core settles it.
pub(super) fn deliver_to(
    shared: Weak<Shared>,
) -> impl FnMut(Vec<courier_cluster::fetch::Fetched>) + Send {
    move |batch| {
        let Some(shared) = shared.upgrade() else {
            return;
        };
        if let Some(edge) = &shared.cluster {
            let held = batch.iter().map(|f| (f.handle.as_str(), f.ack_wait));
            edge.node
                .in_progress
                .hold(held, tokio::time::Instant::now());
        }
        shared.with_core_deferred(|core, now| {
            for fetched in batch {
                let fetched = courier_broker::Fetched {
                    service: fetched.service,
                    message: fetched.message,
                    attempt: fetched.attempt,
                    handle: fetched.handle,
                    reply_node: fetched.reply_node,
                    traced: fetched.traced,
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
    table: Arc<SubscriptionTable>,
    stop: watch::Receiver<bool>,
) {
    let no_keyed_lane = std::sync::Mutex::default();
    let unkeyed = courier_cluster::fetch::run_lanes(
        connection.clone(),
        service.clone(),
        &[Lane::Unkeyed],
        credit_of(shared.clone(), service.clone(), false),
        room.clone(),
        deliver_to(shared.clone()),
        table.skip_for(&service),
        0,
        &no_keyed_lane,
        stop.clone(),
    );
    let transients = take_transients(
        shared.clone(),
        connection.client.clone(),
        service.clone(),
        stop.clone(),
    );
    let pulls = super::relaying::pull_keyed_lane(shared.clone(), service.clone(), stop.clone());
    let keyed = lead_keyed_lane(shared, connection, service, room, table, stop);
    tokio::join!(unkeyed, keyed, transients, pulls);
}

/// The pause before a new holder asks a consumer again what it holds
/// unacknowledged, when the last question went unanswered.
const TAKEOVER_ASK_PAUSE: Duration = Duration::from_millis(250);

/// How often a node that does not hold a keyed lane's lease tries again.
pub(super) const LANE_LEASE_RETRY: Duration = Duration::from_secs(1);

/// Takes the lease of `service`'s keyed lane whenever it is free, and
/// while the lease is valid hands out the service's history replays
/// (`replays.rs`), then fetches the lane until another replay comes.
async fn lead_keyed_lane(
    shared: Weak<Shared>,
    connection: Connection,
    service: String,
    room: Arc<Notify>,
    table: Arc<SubscriptionTable>,
    mut stop: watch::Receiver<bool>,
) {
    let Some(node) = shared
        .upgrade()
        .and_then(|s| s.cluster.as_ref().map(|e| e.node.clone()))
    else {
        return;
    };
    let key = courier_cluster::names::keyed_lane_lease(&service);
    while !*stop.borrow() {
        let acquired = Lease::acquire(&node.leases, &key, &node.node, LeaseTiming::default()).await;
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
        node.held_leases.began(&key, &keeper);
        if let Some(shared) = shared.upgrade() {
            shared.with_core_deferred(|core, now| core.keyed_lane_gained(&service, now));
        }
        // Other nodes' instances pull their share while this node leads.
        let _pulls = crate::AbortOnDrop(tokio::spawn(super::relaying::serve_pulls(
            shared.clone(),
            service.clone(),
        )));
        let mut holding = keeper.watch();
        let (lane_stop, lane_stopped) = watch::channel(false);
        let lane = async {
            let mut due_again = wait_for_takeover(&connection, &service, &table).await;
            let mut lane_stopped = lane_stopped;
            // Kept across the lane's runs in this tenure: a pull left
            // waiting at the leader when a replay stopped the lane is a
            // gap the next run sees.
            let keyed_gaps = std::sync::Mutex::default();
            loop {
                let replays = replays::hand_out_replays(
                    &shared,
                    &node,
                    &table,
                    &connection,
                    &service,
                    &room,
                    &mut due_again,
                    &lane_stopped,
                )
                .await;
                match replays {
                    Ok(Drained::Done) => {}
                    Ok(Drained::Stopped) => return,
                    Err(e) => {
                        warn!(error = %e, %service, "a history replay did not go on; trying again");
                        let _ =
                            tokio::time::timeout(LANE_LEASE_RETRY, lane_stopped.changed()).await;
                        continue;
                    }
                }
                // The keyed lane, until this lease ends or another
                // replay waits to be joined.
                let (keyed_stop, keyed_stopped) = watch::channel(false);
                let keyed_consumer =
                    courier_cluster::consumers::consumer_name(&service, Lane::Keyed);
                let keyed = courier_cluster::fetch::run_lanes(
                    connection.clone(),
                    service.clone(),
                    &[Lane::Keyed],
                    credit_of(shared.clone(), service.clone(), true),
                    room.clone(),
                    deliver_to(shared.clone()),
                    table.skip_for(&service),
                    due_again.remove(&keyed_consumer).unwrap_or(0),
                    &keyed_gaps,
                    keyed_stopped,
                );
                tokio::pin!(keyed);
                tokio::select! {
                    () = &mut keyed => return,
                    () = table.keyed_change_appears(&service) => {}
                    _ = lane_stopped.changed() => {}
                }
                let _ = keyed_stop.send(true);
                keyed.await;
                if *lane_stopped.borrow() {
                    return;
                }
            }
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
            () = lane => node.held_leases.ended(&key),
            () = fence => {
                node.held_leases.ended(&key);
                warn!(%service, "the keyed lane's lease ended; this node stops fetching it");
                let _ = lane_stop.send(true);
                // What this node holds of the lane goes to the next
                // holder: at once what it has not handed out, and after
                // `ack_wait`, as after a crash, what its instances have
                // (no longer kept alive), unless they settle it first.
                if let Some(shared) = shared.upgrade() {
                    shared.with_core_deferred(|core, now| core.keyed_lane_lost(&service, now));
                }
                let consumer = courier_cluster::consumers::consumer_name(&service, Lane::Keyed);
                node.in_progress.release_consumer(&consumer);
                for consumer in table.hand_out_consumers(&service) {
                    node.in_progress.release_consumer(&consumer);
                }
            }
            () = stopping => {
                node.held_leases.ended(&key);
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
/// fetched and not acknowledged — from the keyed consumer or a history
/// replay's — is due for redelivery: JetStream hands redeliveries out
/// before newer messages, so each key resumes from its first
/// unacknowledged message, in order.
async fn wait_for_takeover(
    connection: &Connection,
    service: &str,
    table: &SubscriptionTable,
) -> DueAgain {
    let mut consumers = vec![courier_cluster::consumers::consumer_name(
        service,
        Lane::Keyed,
    )];
    consumers.extend(table.hand_out_consumers(service));
    let mut wait = Duration::ZERO;
    let mut due_again = DueAgain::new();
    for name in consumers {
        // Asked until answered: taken for "nothing delivered", a question
        // lost while the consumer's leader is elected (the last holder's
        // server died, say) would let this holder pull a key's later
        // messages before the earlier ones JetStream hands out again.
        let mut asked = 0u32;
        let unacknowledged = loop {
            match courier_cluster::consumers::unacknowledged(&connection.jetstream, &name).await {
                Ok(found) => break found,
                Err(e) => {
                    asked += 1;
                    if asked == 1 || asked.is_multiple_of(20) {
                        warn!(%service, error = %e, "cannot read what the last holder left unacknowledged; asking again");
                    }
                    tokio::time::sleep(TAKEOVER_ASK_PAUSE).await;
                }
            }
        };
        if let Some((pending, ack_wait)) = unacknowledged.filter(|(pending, _)| *pending > 0) {
            wait = wait.max(ack_wait + courier_cluster::fetch::REDELIVERY_MARGIN);
            due_again.insert(name, pending);
        }
    }
    if due_again.is_empty() {
        return due_again;
    }
    let unacknowledged: u64 = due_again.values().map(|&n| u64::from(n)).sum();
    info!(
        %service,
        unacknowledged,
        "waiting {wait:?} for the last holder's unacknowledged keyed messages"
    );
    tokio::time::sleep(wait).await;
    due_again
}

/// What a new holder of a keyed lane knows is due again from the last
/// holder, by consumer: each consumer's first pull takes that many at
/// once ([`courier_cluster::fetch::first_pull`]).
pub(super) type DueAgain = std::collections::HashMap<String, u32>;
