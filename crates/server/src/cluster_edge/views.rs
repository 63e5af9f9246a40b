//! The console's services page across nodes (docs/SCALE-OUT.md §12):
//! every node knows every service's subscriptions (they are the
//! cluster's), but only its own connections; the page asks every node in
//! `courier_nodes` for its instances on `courier.node.<id>.instances` and
//! shows them all, each with the node it is connected to; each service's
//! backlog, messages in flight and dead letters are the cluster's, read
//! from its consumers and `COURIER_DEAD`.

use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use serde_json::{json, Value};

use super::ClusterNode;
use crate::console::instance_json;
use crate::{ConnId, FastMap, Shared};

/// How long the page waits for each other node's instances.
const INSTANCES_ASK_PATIENCE: Duration = Duration::from_secs(1);

pub(super) fn instances_subject(node: &str) -> String {
    format!("courier.node.{node}.instances")
}

/// This node's instances as the services page shows them, each with its
/// service and this node's id.
pub(crate) fn local_instances(shared: &Shared, node: &str) -> Vec<Value> {
    let instances = shared.core().instances();
    let peers: FastMap<ConnId, crate::console::Peer> = shared
        .peers()
        .iter()
        .map(|(conn, peer)| (*conn, *peer))
        .collect();
    instances
        .iter()
        .map(|i| {
            let mut json = instance_json(i, peers.get(&i.conn));
            json["service"] = json!(i.service);
            json["node"] = json!(node);
            json
        })
        .collect()
}

/// Answers other nodes' questions for this node's instances.
pub(super) async fn serve_instance_questions(shared: Weak<Shared>) {
    let lost = ("instances", super::PARTIAL_ELSEWHERE);
    super::answer_questions(shared, instances_subject, lost, |shared, _| {
        let node = shared
            .cluster
            .as_ref()
            .map_or("", |edge| edge.node.node.as_str());
        Some(Bytes::from(
            Value::Array(local_instances(shared, node)).to_string(),
        ))
    })
    .await;
}

/// The services page (`console::services_json`'s shape, built from this
/// node's instances) with every other node's instances added; nodes that
/// did not answer are named in `partial`.
pub(crate) async fn services_everywhere(node: &Arc<ClusterNode>, mut page: Value) -> Value {
    let (elsewhere, mut silent) = other_nodes_instances(node).await;
    add_instances(&mut page, elsewhere);
    if let Some(rows) = page["services"].as_array_mut() {
        silent.extend(put_cluster_counts(node, rows).await);
    }
    if !silent.is_empty() {
        page["partial"] = json!(silent);
    }
    page
}

/// Every other node's instances (each naming its `service`, `instance`
/// and `node`), and the nodes that did not answer.
async fn other_nodes_instances(node: &Arc<ClusterNode>) -> (Vec<Value>, Vec<String>) {
    let (answers, silent) = super::ask_every_other_node(
        node,
        instances_subject,
        Bytes::new(),
        INSTANCES_ASK_PATIENCE,
    )
    .await;
    let instances = answers
        .iter()
        .filter_map(|(_, answer)| serde_json::from_slice::<Vec<Value>>(answer).ok())
        .flatten()
        .collect();
    (instances, silent)
}

/// `courier.services.list`'s listing (the core's: the cluster's services,
/// this node's instance ids) with every other node's instance ids added,
/// and the nodes that did not answer.
pub(crate) async fn listing_everywhere(
    node: &Arc<ClusterNode>,
    mut listing: Value,
) -> (Value, Vec<String>) {
    let (elsewhere, mut silent) = other_nodes_instances(node).await;
    add_instance_ids(&mut listing, &elsewhere);
    if let Some(rows) = listing.as_array_mut() {
        silent.extend(put_cluster_counts(node, rows).await);
    }
    (listing, silent)
}

/// How many services' counts are asked for at once.
const COUNTS_IN_FLIGHT_MAX: usize = 8;

/// A service's counts as the cluster holds them.
#[derive(Debug)]
pub(crate) struct ClusterCounts {
    pub backlog: u64,
    pub in_flight: u64,
    pub dead_letters: u64,
    /// Each of its consumers' unacknowledged messages, by consumer name.
    pub ack_pending: Vec<(String, u64)>,
}

async fn cluster_counts(
    js: &async_nats::jetstream::Context,
    service: &str,
) -> Result<ClusterCounts, String> {
    let pending = courier_cluster::consumers::service_pending(js, service).await?;
    let dead_letters = courier_cluster::dead_letters::count(js, service)
        .await
        .map_err(|e| e.to_string())?;
    Ok(ClusterCounts {
        backlog: pending.backlog,
        in_flight: pending.in_flight,
        dead_letters,
        ack_pending: pending.ack_pending,
    })
}

/// Each service's counts as the cluster holds them, a few services at a
/// time, in the order given.
pub(crate) async fn counts_of(
    node: &ClusterNode,
    services: Vec<String>,
) -> Vec<(String, Result<ClusterCounts, String>)> {
    use futures_util::StreamExt as _;
    let js = &node.connection.jetstream;
    futures_util::stream::iter(services)
        .map(|service| async move {
            let counts = cluster_counts(js, &service).await;
            (service, counts)
        })
        .buffered(COUNTS_IN_FLIGHT_MAX)
        .collect()
        .await
}

/// Each row's `backlog`, `in_flight` and `dead_letters` as the cluster
/// holds them (a node's core holds only what it fetched): the service's
/// consumers' pending and unacknowledged messages, and its dead letters
/// in `COURIER_DEAD`. A row whose counts cannot be read keeps this
/// node's and is named in what is returned.
async fn put_cluster_counts(node: &ClusterNode, rows: &mut [Value]) -> Vec<String> {
    let names: Vec<String> = rows
        .iter()
        .filter_map(|row| row["name"].as_str().map(str::to_string))
        .collect();
    let counted = counts_of(node, names).await;
    let mut unread = Vec::new();
    for (service, counts) in counted {
        let Some(row) = rows.iter_mut().find(|row| row["name"] == service.as_str()) else {
            continue;
        };
        match counts {
            Ok(counts) => {
                row["backlog"] = json!(counts.backlog);
                row["in_flight"] = json!(counts.in_flight);
                row["dead_letters"] = json!(counts.dead_letters);
            }
            Err(e) => unread.push(format!("the cluster's counts of {service} ({e})")),
        }
    }
    unread
}

/// Adds instances (each naming its `service` and `instance`) to the
/// listing's rows by id; a service it lacks gets a row of its own.
pub(crate) fn add_instance_ids(listing: &mut Value, instances: &[Value]) {
    let Some(services) = listing.as_array_mut() else {
        return;
    };
    for instance in instances {
        let (Some(service), Some(id)) =
            (instance["service"].as_str(), instance["instance"].as_str())
        else {
            continue;
        };
        let row = match services.iter().position(|s| s["name"] == service) {
            Some(row) => row,
            None => {
                services.push(json!({
                    "name": service, "patterns": [], "paused": [], "instances": [],
                    "backlog": 0, "in_flight": 0, "dead_letters": 0,
                }));
                services.len() - 1
            }
        };
        if let Some(ids) = services[row]["instances"].as_array_mut() {
            if !ids.iter().any(|known| known == id) {
                ids.push(json!(id));
            }
        }
    }
    services.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
}

/// Files instances (each naming its `service`) under their services on
/// the page; a service the page does not list yet (connected elsewhere,
/// subscribed to nothing) gets a row of its own.
pub(crate) fn add_instances(page: &mut Value, instances: Vec<Value>) {
    let Some(services) = page["services"].as_array_mut() else {
        return;
    };
    for mut instance in instances {
        let Some(service) = instance["service"].as_str().map(str::to_string) else {
            continue;
        };
        if let Some(object) = instance.as_object_mut() {
            object.remove("service");
        }
        let row = match services.iter().position(|s| s["name"] == service.as_str()) {
            Some(row) => row,
            None => {
                services.push(json!({
                    "name": service,
                    "patterns": [],
                    "paused": false,
                    "instances": [],
                    "backlog": 0,
                    "backlog_bytes": 0,
                    "in_flight": 0,
                    "dead_letters": 0,
                    "oldest_unacked_seconds": null,
                    "consumers": 0,
                    "consumers_paused": 0,
                }));
                services.len() - 1
            }
        };
        if let Some(list) = services[row]["instances"].as_array_mut() {
            list.push(instance);
        }
    }
    services.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn other_nodes_instance_ids_join_the_services_listing() {
        let mut listing = json!([
            {"name": "ledger", "patterns": ["ledger.*"], "instances": ["l-1"]},
        ]);
        add_instance_ids(
            &mut listing,
            &[
                json!({"service": "ledger", "instance": "l-2", "node": "b"}),
                json!({"service": "ledger", "instance": "l-1", "node": "a"}),
                json!({"service": "audit", "instance": "a-1", "node": "b"}),
                json!({"instance": "nameless"}),
            ],
        );
        assert_eq!(listing[0]["name"], "audit");
        assert_eq!(listing[0]["instances"], json!(["a-1"]));
        assert_eq!(listing[0]["patterns"], json!([]));
        assert_eq!(listing[1]["instances"], json!(["l-1", "l-2"]));
        assert_eq!(listing.as_array().map(Vec::len), Some(2));
    }

    #[test]
    fn other_nodes_instances_join_their_services_rows() {
        let mut page = json!({"at": 1, "services": [
            {"name": "ledger", "patterns": [], "instances": [{"instance": "l-1", "node": "a"}]},
        ]});
        add_instances(
            &mut page,
            vec![
                json!({"service": "ledger", "instance": "l-2", "node": "b"}),
                json!({"service": "audit", "instance": "a-1", "node": "b"}),
                json!({"instance": "nameless"}),
            ],
        );
        let services = page["services"].as_array().expect("services");
        let names: Vec<&str> = services.iter().filter_map(|s| s["name"].as_str()).collect();
        assert_eq!(names, vec!["audit", "ledger"]);
        assert_eq!(services[0]["instances"][0]["instance"], "a-1");
        assert_eq!(services[0]["backlog"], 0);
        let ledger: Vec<&str> = services[1]["instances"]
            .as_array()
            .expect("instances")
            .iter()
            .filter_map(|i| i["node"].as_str())
            .collect();
        assert_eq!(ledger, vec!["a", "b"]);
        assert!(services[1]["instances"][1].get("service").is_none());
    }
}
