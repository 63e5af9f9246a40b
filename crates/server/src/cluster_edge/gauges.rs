//! What `/metrics` adds on a cluster (docs/SCALE-OUT.md §12): the leases
//! this node holds, the relays of keyed messages it keeps open, and — from the holder of the `reclaimer` lease only,
//! so that a sum over the nodes never counts them twice — each service's
//! backlog, in-flight and dead letters as JetStream holds them, and each
//! consumer's unacknowledged messages.

use std::sync::Arc;
use std::time::Duration;

use courier_cluster::names::RECLAIMER_LEASE;
use tokio::time::Instant;

use super::views::{counts_of, ClusterCounts};
use super::ClusterNode;

/// A reading younger than this is served again instead of asking
/// JetStream at every scrape (three requests per service).
pub(crate) const READING_FRESH_FOR: Duration = Duration::from_secs(5);
/// The longest a scrape waits for a new reading; past it, the last one
/// is served (or none).
pub(crate) const READING_PATIENCE: Duration = Duration::from_secs(2);

/// The cluster's counts as last read, and when.
#[derive(Debug)]
pub(crate) struct Reading {
    pub at: Instant,
    pub services: Vec<(String, ClusterCounts)>,
    /// Services whose counts could not be read then.
    pub unread: u64,
}

/// The cluster part of one scrape.
#[derive(Debug)]
pub(crate) struct ClusterGauges {
    /// Every lease held since start, and whether it is held now.
    pub leases: Vec<(String, bool)>,
    /// The relays of keyed messages open here: (service, node), sorted.
    pub relays: Vec<(String, String)>,
    /// Only on the holder of the `reclaimer` lease: the cluster's counts
    /// and how old they are.
    pub counts: Option<(Arc<Reading>, Duration)>,
}

/// The last reading, shared by this node's scrapes.
#[derive(Default)]
pub(crate) struct Readings {
    last: tokio::sync::Mutex<Option<Arc<Reading>>>,
}

/// The cluster gauges for a scrape; `services` are those the core knows.
pub(crate) async fn gather(edge: &super::ClusterEdge, services: Vec<String>) -> ClusterGauges {
    let (node, readings) = (&edge.node, &edge.readings);
    let now = Instant::now();
    let leases = node.held_leases.at(now);
    let relays = edge.relays.listing();
    if !node.held_leases.holds(RECLAIMER_LEASE, now) {
        return ClusterGauges {
            leases,
            relays,
            counts: None,
        };
    }
    // One reading at a time: a scrape that waits here gets the reading
    // the one before it made.
    let mut last = readings.last.lock().await;
    let stale = last
        .as_ref()
        .is_none_or(|r| r.at.elapsed() >= READING_FRESH_FOR);
    if stale {
        match tokio::time::timeout(READING_PATIENCE, read(node, services)).await {
            Ok(reading) => *last = Some(Arc::new(reading)),
            Err(_) => tracing::debug!(
                "the cluster's counts were not read within {READING_PATIENCE:?}; the last reading is served"
            ),
        }
    }
    let counts = last.as_ref().map(|r| (r.clone(), r.at.elapsed()));
    ClusterGauges {
        leases,
        relays,
        counts,
    }
}

async fn read(node: &ClusterNode, services: Vec<String>) -> Reading {
    let mut reading = Reading {
        at: Instant::now(),
        services: Vec::new(),
        unread: 0,
    };
    for (service, counts) in counts_of(node, services).await {
        match counts {
            Ok(counts) => reading.services.push((service, counts)),
            Err(e) => {
                tracing::debug!("the cluster's counts of {service} were not read: {e}");
                reading.unread += 1;
            }
        }
    }
    reading
}
