//! The console's traffic pages across nodes (docs/SCALE-OUT.md §12):
//! each node counts what passed through it, so `/v1/names` and
//! `/v1/topology` on any node ask every node in `courier_nodes` for its
//! counters on `courier.node.<id>.names` and add them up per name and
//! service. `/metrics` stays per node: a scraper asks each.

use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use courier_broker::stats::{add_names, NameStats, Traffic};
use courier_proto::{ErrorCode, SharedStr};
use courier_store::histogram::{Histogram, SECONDS_BUCKETS};
use serde::{Deserialize, Serialize};
use tracing::warn;

use super::ClusterNode;
use crate::Shared;

/// How long a page waits for each other node's counters.
const NAMES_ASK_PATIENCE: Duration = Duration::from_secs(1);

fn names_subject(node: &str) -> String {
    format!("courier.node.{node}.names")
}

/// One node's counters as they cross to another node.
#[derive(Serialize, Deserialize, Default, Debug, PartialEq)]
struct NodeCounts {
    names: Vec<NameCounts>,
    /// Sends counted under the catch-all name past the node's cap.
    over_cap: u64,
}

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct NameCounts {
    name: String,
    services: Vec<ServiceCounts>,
    /// Reply latency, one count per bound of `SECONDS_BUCKETS`.
    latency_buckets: Vec<u64>,
    latency_count: u64,
    latency_sum: f64,
    outcomes: Vec<(String, u64)>,
}

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct ServiceCounts {
    service: String,
    sent: u64,
    /// Per numeric error code.
    refused: Vec<(u16, u64)>,
    delivered: u64,
    redelivered: u64,
    acked: u64,
    nacked: u64,
    expired: u64,
    dead_lettered: u64,
}

fn encode(names: &[NameStats], over_cap: u64) -> Bytes {
    let counts = NodeCounts {
        names: names
            .iter()
            .map(|n| NameCounts {
                name: n.name.as_str().to_string(),
                services: n
                    .by_service
                    .iter()
                    .map(|(service, t)| ServiceCounts {
                        service: service.as_str().to_string(),
                        sent: t.sent,
                        refused: t.refused.iter().map(|(c, n)| (c.as_u16(), *n)).collect(),
                        delivered: t.delivered,
                        redelivered: t.redelivered,
                        acked: t.acked,
                        nacked: t.nacked,
                        expired: t.expired,
                        dead_lettered: t.dead_lettered,
                    })
                    .collect(),
                latency_buckets: n.reply_latency.buckets().to_vec(),
                latency_count: n.reply_latency.count,
                latency_sum: n.reply_latency.sum,
                outcomes: n
                    .outcomes
                    .iter()
                    .map(|(o, c)| (o.as_str().to_string(), *c))
                    .collect(),
            })
            .collect(),
        over_cap,
    };
    Bytes::from(serde_json::to_vec(&counts).unwrap_or_default())
}

/// Another node's counters; `None` if they do not parse or their latency
/// buckets are not this build's.
fn decode(answer: &[u8]) -> Option<(Vec<NameStats>, u64)> {
    let counts: NodeCounts = serde_json::from_slice(answer).ok()?;
    let names = counts
        .names
        .into_iter()
        .map(|n| {
            Some(NameStats {
                name: SharedStr::from(n.name),
                by_service: n
                    .services
                    .into_iter()
                    .map(|s| {
                        let traffic = Traffic {
                            sent: s.sent,
                            refused: s
                                .refused
                                .into_iter()
                                .map(|(code, n)| (ErrorCode::from_u16(code), n))
                                .collect(),
                            delivered: s.delivered,
                            redelivered: s.redelivered,
                            acked: s.acked,
                            nacked: s.nacked,
                            expired: s.expired,
                            dead_lettered: s.dead_lettered,
                        };
                        (SharedStr::from(s.service), traffic)
                    })
                    .collect(),
                reply_latency: Histogram::from_counts(
                    &SECONDS_BUCKETS,
                    n.latency_buckets,
                    n.latency_count,
                    n.latency_sum,
                )?,
                outcomes: n
                    .outcomes
                    .into_iter()
                    .map(|(o, c)| (SharedStr::from(o), c))
                    .collect(),
            })
        })
        .collect::<Option<Vec<_>>>()?;
    Some((names, counts.over_cap))
}

/// Answers other nodes' questions for this node's counters.
pub(super) async fn serve_names_questions(shared: Weak<Shared>) {
    let lost = ("traffic counters", super::PARTIAL_ELSEWHERE);
    super::answer_questions(shared, names_subject, lost, |shared, _| {
        let (names, _, over_cap) = crate::console::traffic_copy(shared);
        Some(encode(&names, over_cap))
    })
    .await;
}

/// This node's counters (`names`, `over_cap`) with every other node's
/// added; the nodes that did not answer (or answered what this build
/// cannot read) are the third part.
pub(crate) async fn names_everywhere(
    node: &Arc<ClusterNode>,
    mut names: Vec<NameStats>,
    mut over_cap: u64,
) -> (Vec<NameStats>, u64, Vec<String>) {
    let (answers, mut silent) =
        super::ask_every_other_node(node, names_subject, Bytes::new(), NAMES_ASK_PATIENCE).await;
    for (other, answer) in answers {
        match decode(&answer) {
            Some((theirs, their_over_cap)) => {
                add_names(&mut names, &theirs);
                over_cap += their_over_cap;
            }
            None => {
                warn!(node = %other, "a node's traffic counters did not parse; left out of the page");
                silent.push(other);
            }
        }
    }
    (names, over_cap, silent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_cross_between_nodes_unchanged() {
        let mut latency = Histogram::new(&SECONDS_BUCKETS);
        latency.observe(0.003);
        latency.observe(100.0);
        let names = vec![NameStats {
            name: SharedStr::from("todo.create"),
            by_service: vec![(
                SharedStr::from("web"),
                Traffic {
                    sent: 3,
                    refused: vec![(ErrorCode::Unauthorized, 2)],
                    delivered: 4,
                    redelivered: 5,
                    acked: 6,
                    nacked: 7,
                    expired: 8,
                    dead_lettered: 9,
                },
            )],
            reply_latency: latency,
            outcomes: vec![(SharedStr::from("todo.created"), 1)],
        }];
        let (back, over_cap) = decode(&encode(&names, 11)).expect("decodes");
        assert_eq!(over_cap, 11);
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].name, names[0].name);
        assert_eq!(back[0].by_service, names[0].by_service);
        assert_eq!(back[0].reply_latency, names[0].reply_latency);
        assert_eq!(back[0].outcomes, names[0].outcomes);
    }

    #[test]
    fn counters_of_other_latency_buckets_are_refused() {
        let wrong = br#"{"names":[{"name":"x","services":[],"latency_buckets":[1,2],"latency_count":3,"latency_sum":0.1,"outcomes":[]}],"over_cap":0}"#;
        assert!(decode(wrong).is_none());
        assert!(decode(b"not json").is_none());
    }
}
