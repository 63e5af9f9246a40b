//! The service registry on the cluster, KV `courier_registry`
//! (docs/SCALE-OUT.md §11): every node writes the entries it changes and
//! watches the bucket, so a lookup on any node sees what every node
//! registered. The values are the core's records of an instance (its
//! spec and visible health), opaque here.
//!
//! - `i.<service>.<id, hex>`: an instance registered through the HTTP
//!   port or the CLI; it stays until deregistered (or removed by its
//!   checks), whichever node it was registered through.
//! - `b.<node id>.<service>.<id, hex>`: a bus connection's own entry on
//!   that node; it leaves with its connection, or with the node: the node
//!   that runs the checks removes the entries of nodes gone from
//!   `courier_nodes` ([`remove_entries_of_gone_nodes`]).
//!
//! TTL heartbeats are not stored: a node that takes one says so on core
//! NATS ([`REGISTRY_HEARTBEATS`]), and every node (the one running the
//! checks among them) counts it.

use std::time::Duration;

use async_nats::jetstream::kv::{self, Operation};
use bytes::Bytes;
use futures_util::{Stream as FuturesStream, StreamExt as _, TryStreamExt as _};
use serde::{Deserialize, Serialize};

use crate::names::{NodeId, REGISTRY_BUCKET, REGISTRY_HEARTBEATS};
use crate::Connection;

#[derive(Debug, thiserror::Error)]
pub enum ServiceRegistryError {
    #[error("service registry (KV {REGISTRY_BUCKET}), key {key}: {reason}")]
    Store { key: String, reason: String },
}

fn store_error(key: &str, e: impl std::fmt::Display) -> ServiceRegistryError {
    ServiceRegistryError::Store {
        key: key.to_string(),
        reason: e.to_string(),
    }
}

/// An instance id as one KV key token: any bytes, so hex.
fn id_token(id: &str) -> String {
    id.bytes().map(|b| format!("{b:02x}")).collect()
}

fn id_from_token(token: &str) -> Option<String> {
    if !token.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..token.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(token.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

/// The key of instance `id` of `service`: a bus connection's to `node`
/// when `on_bus`, else a registered one's.
pub fn entry_key(service: &str, id: &str, on_bus: Option<&NodeId>) -> String {
    match on_bus {
        Some(node) => format!("b.{}.{service}.{}", node.as_str(), id_token(id)),
        None => format!("i.{service}.{}", id_token(id)),
    }
}

/// What a key names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryName {
    pub service: String,
    pub id: String,
    /// The node whose bus connection it is; `None`: a registered instance.
    pub node: Option<String>,
}

/// The [`EntryName`] of a key of the bucket; `None` for a key Courier
/// does not write.
pub fn parse_key(key: &str) -> Option<EntryName> {
    let mut parts = key.split('.');
    let (node, service, id) = match parts.next()? {
        "i" => (None, parts.next()?, parts.next()?),
        "b" => (Some(parts.next()?), parts.next()?, parts.next()?),
        _ => return None,
    };
    if parts.next().is_some() || service.is_empty() {
        return None;
    }
    Some(EntryName {
        service: service.to_string(),
        id: id_from_token(id)?,
        node: node.map(str::to_string),
    })
}

/// One change of the bucket: the instance and its record (`None`: gone).
pub type RegistryUpdate = (EntryName, Option<Bytes>);

/// Every entry of `courier_registry`: first the current values, then each
/// change as it is made. Keys Courier does not write are skipped.
pub async fn watch(
    connection: &Connection,
) -> Result<
    impl FuturesStream<Item = Result<RegistryUpdate, ServiceRegistryError>>,
    ServiceRegistryError,
> {
    let store = connection
        .jetstream
        .get_key_value(REGISTRY_BUCKET)
        .await
        .map_err(|e| store_error(">", e))?;
    let watch = store
        .watch_with_history(">")
        .await
        .map_err(|e| store_error(">", e))?;
    Ok(watch.filter_map(|entry| async move {
        let entry = match entry {
            Ok(entry) => entry,
            Err(e) => return Some(Err(store_error(">", e))),
        };
        let name = parse_key(&entry.key)?;
        Some(Ok(match entry.operation {
            Operation::Put => (name, Some(entry.value)),
            Operation::Delete | Operation::Purge => (name, None),
        }))
    }))
}

/// Writes instance `id` of `service` as `record` (`None`: deletes it).
pub async fn write(
    store: &kv::Store,
    key: &str,
    record: Option<Bytes>,
) -> Result<(), ServiceRegistryError> {
    match record {
        Some(record) => store
            .put(key, record)
            .await
            .map(|_| ())
            .map_err(|e| store_error(key, e)),
        None => store.delete(key).await.map_err(|e| store_error(key, e)),
    }
}

/// Deletes the bus entries of every node not in `live` (the nodes of
/// `courier_nodes`): their connections died with them. How many went.
pub async fn remove_entries_of_gone_nodes(
    store: &kv::Store,
    live: &[String],
) -> Result<usize, ServiceRegistryError> {
    let keys: Vec<String> = store
        .keys()
        .await
        .map_err(|e| store_error("b.>", e))?
        .try_collect()
        .await
        .map_err(|e| store_error("b.>", e))?;
    let mut removed = 0;
    for key in keys {
        let Some(EntryName {
            node: Some(node), ..
        }) = parse_key(&key)
        else {
            continue;
        };
        if live.contains(&node) {
            continue;
        }
        store.delete(&key).await.map_err(|e| store_error(&key, e))?;
        removed += 1;
    }
    Ok(removed)
}

/// How long a removal's marker stays in the bucket. A watch that starts
/// reads every key's last entry, markers too: a node whose watch was down
/// (its NATS connection lost) for less than this sees the removals made
/// meanwhile when it watches again.
pub const REMOVAL_MARKERS_KEPT: Duration = Duration::from_secs(600);

/// Purges the markers of removals older than `older_than`. A removed key
/// leaves a marker behind, and bus connections come and go by the
/// million over a cluster's life: without this the bucket would grow by
/// one marker per connection ever made. A key put again since its
/// removal keeps its value (the purge stops at the marker). How many went.
pub async fn purge_old_removals(
    store: &kv::Store,
    older_than: Duration,
) -> Result<usize, ServiceRegistryError> {
    let filter = format!("{}>", store.prefix);
    let subjects: Vec<String> = store
        .stream
        .info_with_subjects(&filter)
        .await
        .map_err(|e| store_error(">", e))?
        .map_ok(|(subject, _count)| subject)
        .try_collect()
        .await
        .map_err(|e| store_error(">", e))?;
    // Only keys without a value can end in a marker: one read each.
    let live: std::collections::HashSet<String> = store
        .keys()
        .await
        .map_err(|e| store_error(">", e))?
        .map_ok(|key| format!("{}{key}", store.prefix))
        .try_collect()
        .await
        .map_err(|e| store_error(">", e))?;
    let now = std::time::SystemTime::now();
    let mut purged = 0;
    for subject in subjects.into_iter().filter(|s| !live.contains(s)) {
        let last = match store.stream.get_last_raw_message_by_subject(&subject).await {
            Ok(last) => last,
            // Purged or put meanwhile by another: nothing to do here.
            Err(e) => {
                tracing::debug!("{subject}: {e}");
                continue;
            }
        };
        let removal = matches!(
            last.headers.get("KV-Operation").map(|v| v.as_str()),
            Some("DEL") | Some("PURGE")
        );
        let written = std::time::SystemTime::from(last.time);
        let old = now
            .duration_since(written)
            .is_ok_and(|age| age >= older_than);
        if !(removal && old) {
            continue;
        }
        store
            .stream
            .purge()
            .filter(subject.as_str())
            .sequence(last.sequence + 1)
            .await
            .map_err(|e| store_error(&subject, e))?;
        purged += 1;
    }
    Ok(purged)
}

/// A heartbeat as it travels on [`REGISTRY_HEARTBEATS`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub service: String,
    pub id: String,
}

/// The heartbeats every node takes, from now on.
pub async fn heartbeats(
    connection: &Connection,
) -> Result<impl FuturesStream<Item = Heartbeat>, ServiceRegistryError> {
    let subscriber = connection
        .client
        .subscribe(REGISTRY_HEARTBEATS)
        .await
        .map_err(|e| store_error(REGISTRY_HEARTBEATS, e))?;
    Ok(subscriber.filter_map(|message| async move {
        match serde_json::from_slice(&message.payload) {
            Ok(heartbeat) => Some(heartbeat),
            Err(e) => {
                tracing::warn!("an unreadable registry heartbeat was ignored: {e}");
                None
            }
        }
    }))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn keys_name_their_instance_whatever_its_id() {
        let node = NodeId::new("node-a").unwrap();
        for id in ["db-1", "a.b c/ä", "x"] {
            let registered = entry_key("db", id, None);
            assert_eq!(
                parse_key(&registered),
                Some(EntryName {
                    service: "db".into(),
                    id: id.into(),
                    node: None
                })
            );
            let bus = entry_key("todo", id, Some(&node));
            assert!(bus.starts_with("b.node-a.todo."), "{bus}");
            assert_eq!(
                parse_key(&bus),
                Some(EntryName {
                    service: "todo".into(),
                    id: id.into(),
                    node: Some("node-a".into())
                })
            );
            // One KV token per part: the id's dots and spaces are hex.
            assert_eq!(registered.split('.').count(), 3);
        }
    }

    #[test]
    fn keys_courier_does_not_write_are_not_entries() {
        for key in [
            "x.db.6131",
            "i.db",
            "i.db.zz",
            "i.db.613",
            "b.n.db",
            "i..61",
            "i.db.61.62",
        ] {
            assert_eq!(parse_key(key), None, "{key}");
        }
    }
}
