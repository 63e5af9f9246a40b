//! The service registry across nodes (docs/SCALE-OUT.md §11): every
//! node's core holds the whole registry, fed from `courier_registry`; one
//! node at a time, the holder of the `registry` lease, runs the checks,
//! lapses TTLs and removes what its checks or a node's death remove, and
//! the markers removals leave in the bucket once every watch read them.

use std::sync::Weak;
use std::time::Duration;

use courier_cluster::names::REGISTRY_LEASE;
use courier_cluster::service_registry;
use tracing::{debug, info, warn};

use super::{follow, while_leading, ClusterNode, Followed};
use crate::Shared;
use courier_cluster::Connection;

/// How often the registry's leader looks for bus entries of nodes gone
/// from `courier_nodes` (a node is gone 15 s after its last put).
const GONE_NODES_CHECK_EVERY: Duration = Duration::from_secs(5);

/// How long a node waits before asking again for a lease another holds.
const LEASE_ASK_AGAIN: Duration = Duration::from_secs(2);

/// Feeds the core every change of `courier_registry`, from any node.
pub(super) async fn watch_registry(shared: Weak<Shared>) {
    let open = |connection: Connection| async move {
        match service_registry::watch(&connection).await {
            Ok(changes) => Ok(Box::pin(changes)
                as Followed<
                    Result<
                        service_registry::RegistryUpdate,
                        service_registry::ServiceRegistryError,
                    >,
                >),
            Err(e) => Err(e.to_string()),
        }
    };
    follow(
        shared,
        "the cluster's registry",
        open,
        |shared, change| match change {
            Ok((name, record)) => shared.with_core_deferred(|core, now| {
                core.registry_replicated(&name.service, &name.id, record, now)
            }),
            Err(e) => warn!(error = %e, "a registry change could not be read"),
        },
    )
    .await;
}

/// Counts every TTL heartbeat any node took (this one's come back too,
/// and count twice: a heartbeat is idempotent).
pub(super) async fn hear_heartbeats(shared: Weak<Shared>) {
    let open = |connection: Connection| async move {
        match service_registry::heartbeats(&connection).await {
            Ok(heartbeats) => Ok(Box::pin(heartbeats) as Followed<service_registry::Heartbeat>),
            Err(e) => Err(e.to_string()),
        }
    };
    follow(
        shared,
        "the cluster's registry heartbeats",
        open,
        |shared, heartbeat| {
            shared.with_core_deferred(|core, now| {
                core.registry_heard_heartbeat(&heartbeat.service, &heartbeat.id, now)
            })
        },
    )
    .await;
}

/// While this node holds the `registry` lease, runs the registry's checks
/// here and removes the bus entries of nodes that died (their connections
/// went with them) and the old markers of removals.
pub(super) async fn lead_registry(shared: Weak<Shared>) {
    let Some(node) = shared
        .upgrade()
        .and_then(|s| s.cluster.as_ref().map(|e| e.node.clone()))
    else {
        return;
    };
    while_leading(&node, REGISTRY_LEASE, LEASE_ASK_AGAIN, |keeper| {
        let (shared, node) = (shared.clone(), node.clone());
        async move {
            let Some(strong) = shared.upgrade() else {
                return;
            };
            info!("this node runs the registry's checks");
            strong.with_core(|core, now| core.set_registry_checks_here(true, now));
            drop(strong);
            let mut markers_purged_at = tokio::time::Instant::now();
            while keeper.is_valid_at(tokio::time::Instant::now()) {
                if markers_purged_at.elapsed() >= service_registry::REMOVAL_MARKERS_KEPT {
                    markers_purged_at = tokio::time::Instant::now();
                    purge_removal_markers(&node).await;
                }
                remove_entries_of_gone_nodes(&node).await;
                let mut holding = keeper.watch();
                let _ = tokio::time::timeout(GONE_NODES_CHECK_EVERY, holding.changed()).await;
            }
            warn!("this node no longer leads the registry; another runs its checks");
            if let Some(strong) = shared.upgrade() {
                strong.with_core(|core, now| core.set_registry_checks_here(false, now));
            }
        }
    })
    .await;
}

async fn purge_removal_markers(node: &ClusterNode) {
    let kept = service_registry::REMOVAL_MARKERS_KEPT;
    match service_registry::purge_old_removals(&node.registry, kept).await {
        Ok(purged) => debug!(purged, "purged the registry's old removal markers"),
        Err(e) => warn!(error = %e, "the registry's removal markers stay for now"),
    }
}

async fn remove_entries_of_gone_nodes(node: &ClusterNode) {
    let live: Vec<String> = match courier_cluster::nodes::list_nodes(&node.nodes).await {
        Ok(nodes) => nodes.into_iter().map(|(id, _)| id).collect(),
        Err(e) => {
            warn!(error = %e, "cannot list the cluster's nodes");
            return;
        }
    };
    match service_registry::remove_entries_of_gone_nodes(&node.registry, &live).await {
        Ok(0) => {}
        Ok(removed) => debug!(removed, "removed the bus instances of nodes that are gone"),
        Err(e) => warn!(error = %e, "the bus instances of gone nodes stay for now"),
    }
}
