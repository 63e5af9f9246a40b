//! Tails across nodes (docs/SCALE-OUT.md §12): a tail on any node sees
//! what every node accepts. A node with tails says so every second on
//! `courier.tails.wanted`; a node that heard it lately records what its
//! core accepts and relays each message to `courier.tails.feed` (the
//! envelope as on the wire, the accepting node and the receiving services
//! in headers); nodes with tails put what others relayed into their
//! tails' channel. Nothing is relayed while no node tails.
//!
//! Like a node's own tails, relaying never slows the bus: the relay reads
//! the same bounded channel, and what it falls behind on is lost to the
//! other nodes' tails without a count.

use std::sync::{Arc, Weak};
use std::time::Duration;

use async_nats::HeaderMap;
use bytes::BytesMut;
use courier_broker::Tapped;
use futures_util::StreamExt as _;
use tokio::sync::broadcast::error::RecvError;
use tracing::{debug, warn};

use crate::Shared;

const WANTED_SUBJECT: &str = "courier.tails.wanted";
const FEED_SUBJECT: &str = "courier.tails.feed";
const NODE_HEADER: &str = "Courier-Node";
const RECEIVERS_HEADER: &str = "Courier-Receivers";

/// How often a node with tails says so, and how often it looks whether
/// it has any.
const WANT_EVERY: Duration = Duration::from_secs(1);
const TAILS_CHECK_EVERY: Duration = Duration::from_millis(100);
/// How long one "wanted" keeps a node relaying: a few missed ones do not
/// stop it, a node whose tails ended stops being fed soon after.
const WANT_LASTS: Duration = Duration::from_secs(3);

/// The NATS client and this node's id, while the server lives.
fn edge_of(shared: &Weak<Shared>) -> Option<(async_nats::Client, String)> {
    let shared = shared.upgrade()?;
    let edge = shared.cluster.as_ref()?;
    Some((
        edge.node.connection.client.clone(),
        edge.node.node.as_str().to_string(),
    ))
}

/// Says every [`WANT_EVERY`] that this node has tails (at once when the
/// first one starts).
pub(super) async fn announce_tails(shared: Weak<Shared>) {
    let Some((client, node)) = edge_of(&shared) else {
        return;
    };
    let mut last_said: Option<tokio::time::Instant> = None;
    loop {
        tokio::time::sleep(TAILS_CHECK_EVERY).await;
        let Some(strong) = shared.upgrade() else {
            return;
        };
        let local = strong.tails.local();
        drop(strong);
        if !local {
            last_said = None;
            continue;
        }
        if last_said.is_some_and(|at| at.elapsed() < WANT_EVERY) {
            continue;
        }
        if let Err(e) = client.publish(WANTED_SUBJECT, node.clone().into()).await {
            debug!(error = %e, "could not ask the other nodes for their tail lines");
        }
        last_said = Some(tokio::time::Instant::now());
    }
}

/// Hears other nodes' tails ask, and relays this node's accepted messages
/// while any asked within [`WANT_LASTS`].
pub(super) async fn relay_to_other_tails(shared: Weak<Shared>) {
    let Some((client, node)) = edge_of(&shared) else {
        return;
    };
    let mut wants = match client.subscribe(WANTED_SUBJECT).await {
        Ok(wants) => wants,
        Err(e) => {
            warn!(error = %e, "cannot hear other nodes' tails; they will not see what this node accepts");
            return;
        }
    };
    let Some(mut accepted) = shared.upgrade().map(|s| s.tails.watch()) else {
        return;
    };
    loop {
        tokio::select! {
            want = wants.next() => {
                let Some(want) = want else { return };
                if want.payload.as_ref() == node.as_bytes() {
                    continue;
                }
                let Some(shared) = shared.upgrade() else { return };
                shared.tails.want_elsewhere(WANT_LASTS);
                // The core records what it accepts from its next pass.
            }
            item = accepted.recv() => {
                let item = match item {
                    Ok(item) => item,
                    Err(RecvError::Lagged(_)) => continue,
                    Err(RecvError::Closed) => return,
                };
                if item.relayed {
                    continue;
                }
                let Some(wanted) = shared.upgrade().map(|s| s.tails.wanted_elsewhere()) else {
                    return;
                };
                if !wanted {
                    continue;
                }
                let mut payload = BytesMut::new();
                if courier_proto::encode_message(&item.tapped.message, &mut payload).is_err() {
                    continue;
                }
                let mut headers = HeaderMap::new();
                headers.insert(NODE_HEADER, node.as_str());
                let receivers = serde_json::to_string(&item.tapped.receivers[..]).unwrap_or_default();
                headers.insert(RECEIVERS_HEADER, receivers.as_str());
                if let Err(e) = client.publish_with_headers(FEED_SUBJECT, headers, payload.freeze()).await {
                    debug!(error = %e, "a tail line was not relayed to other nodes");
                }
            }
        }
    }
}

/// Puts what other nodes relay into this node's tails.
pub(super) async fn take_other_nodes_lines(shared: Weak<Shared>) {
    let Some((client, node)) = edge_of(&shared) else {
        return;
    };
    let mut feed = match client.subscribe(FEED_SUBJECT).await {
        Ok(feed) => feed,
        Err(e) => {
            warn!(error = %e, "cannot take other nodes' tail lines; tails here show this node's only");
            return;
        }
    };
    while let Some(line) = feed.next().await {
        let Some(headers) = line.headers.as_ref() else {
            continue;
        };
        let Some(from) = headers.get(NODE_HEADER).map(|v| v.as_str().to_string()) else {
            continue;
        };
        if from == node {
            continue;
        }
        let receivers: Vec<String> = headers
            .get(RECEIVERS_HEADER)
            .and_then(|v| serde_json::from_str(v.as_str()).ok())
            .unwrap_or_default();
        let message = match courier_proto::decode_message(line.payload) {
            Ok(message) => message,
            Err(e) => {
                debug!(error = %e, node = %from, "a relayed tail line does not decode");
                continue;
            }
        };
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let tapped = Tapped {
            message: Arc::new(message),
            receivers: receivers.into(),
        };
        shared.tails.relayed(tapped, &from);
    }
}
