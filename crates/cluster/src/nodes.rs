//! The node registry, KV `courier_nodes` (docs/SCALE-OUT.md §11): each
//! node puts its key every [`NODE_PUT_EVERY`]; the bucket's max age
//! removes the key of a node that stopped, so the live keys are the live
//! nodes.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::kv;
use futures_util::TryStreamExt as _;
use serde::{Deserialize, Serialize};

use crate::names::NodeId;

/// How often a node puts its key (the bucket's max age is 15 s: three
/// missed puts and the node is gone from the list).
pub const NODE_PUT_EVERY: Duration = Duration::from_secs(5);

/// What a node says of itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// The address clients reach the node's bus port at.
    pub bus: String,
    /// Its HTTP port (metrics, console), if it serves one.
    #[serde(default)]
    pub http: Option<String>,
    /// Unix milliseconds.
    pub started_at: u64,
    /// Courier's version.
    pub version: String,
    /// The manifest's hash: nodes given different manifests warn.
    #[serde(default)]
    pub manifest_hash: Option<String>,
}

impl NodeRecord {
    /// A record of a node starting now.
    pub fn starting_now(bus: String, http: Option<String>) -> NodeRecord {
        NodeRecord {
            bus,
            http,
            started_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            version: env!("CARGO_PKG_VERSION").to_string(),
            manifest_hash: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("node registry (KV courier_nodes): {0}")]
    Store(String),
}

fn store_error(e: impl std::fmt::Display) -> RegistryError {
    RegistryError::Store(e.to_string())
}

/// Puts `node`'s record once; returns the key's revision.
pub async fn put_node(
    store: &kv::Store,
    node: &NodeId,
    record: &NodeRecord,
) -> Result<u64, RegistryError> {
    let body = serde_json::to_vec(record).map_err(store_error)?;
    store
        .put(node.as_str(), body.into())
        .await
        .map_err(store_error)
}

/// The live nodes: every key of the bucket, in key order. A key whose
/// value cannot be read (another version's format) is skipped with a
/// warning.
pub async fn list_nodes(store: &kv::Store) -> Result<Vec<(String, NodeRecord)>, RegistryError> {
    let mut keys: Vec<String> = store
        .keys()
        .await
        .map_err(store_error)?
        .try_collect()
        .await
        .map_err(store_error)?;
    keys.sort();
    let mut nodes = Vec::with_capacity(keys.len());
    for key in keys {
        let Some(value) = store.get(&key).await.map_err(store_error)? else {
            continue;
        };
        match serde_json::from_slice(&value) {
            Ok(record) => nodes.push((key, record)),
            Err(e) => tracing::warn!("node {key} in the registry has an unreadable record: {e}"),
        }
    }
    Ok(nodes)
}

/// A node's registration, kept by a task that puts its key every
/// [`NODE_PUT_EVERY`]. Dropping it stops the task and leaves the key to
/// age out, as a crash would; [`Registration::deregister`] removes it at
/// once.
pub struct Registration {
    store: kv::Store,
    node: NodeId,
    task: tokio::task::JoinHandle<()>,
}

/// Puts the key (awaited: the node is listed when this returns), then
/// keeps it put every `every`. A failed put is logged and retried at the
/// next tick; a node paused longer than the max age reappears at its
/// next put.
pub async fn register(
    store: kv::Store,
    node: NodeId,
    record: NodeRecord,
    every: Duration,
) -> Result<Registration, RegistryError> {
    put_node(&store, &node, &record).await?;
    let task = tokio::spawn({
        let (store, node) = (store.clone(), node.clone());
        async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                if let Err(e) = put_node(&store, &node, &record).await {
                    tracing::warn!("cannot renew this node's registration: {e}");
                }
            }
        }
    });
    Ok(Registration { store, node, task })
}

impl Registration {
    pub fn node(&self) -> &NodeId {
        &self.node
    }

    /// A clean stop: no more puts, and the key goes now.
    pub async fn deregister(self) -> Result<(), RegistryError> {
        self.task.abort();
        self.store
            .delete(self.node.as_str())
            .await
            .map_err(store_error)
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails, which is its point
mod tests {
    use super::*;

    #[test]
    fn a_record_is_the_documented_json() {
        let r = NodeRecord {
            bus: "127.0.0.1:7701".into(),
            http: Some("127.0.0.1:7781".into()),
            started_at: 1,
            version: "0.1.0".into(),
            manifest_hash: None,
        };
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"bus":"127.0.0.1:7701","http":"127.0.0.1:7781","started_at":1,"version":"0.1.0","manifest_hash":null}"#
        );
        let old: NodeRecord =
            serde_json::from_str(r#"{"bus":"b","started_at":2,"version":"v"}"#).unwrap();
        assert_eq!(old.http, None);
    }
}
