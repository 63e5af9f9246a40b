//! One activity as several nodes of a cluster saw it, merged into what
//! one broker would have seen (docs/SCALE-OUT.md §11): each node traces
//! what its own core did — acceptances there, deliveries to its
//! connections, their outcomes — and a query on any node merges the
//! parts.
//!
//! Seqs are each node's own (its store numbers what it holds, and a
//! message fetched from the cluster gets a seq there unrelated to the
//! accepting node's), so the merge gives every message one seq of its
//! own, found by its id: a delivery names its message, an outcome the seq
//! its node delivered it under.

use std::collections::HashMap;

use serde_json::{json, Value};
use uuid::Uuid;

use super::record::Record;

/// Every node's records of one activity as one record list, seqs made
/// common, in time order; an outcome whose delivery its node did not
/// trace is left out (nothing to hang it on).
pub(crate) fn merge_records(per_node: Vec<Vec<Record>>) -> Vec<Record> {
    let mut common: HashMap<Uuid, u64> = HashMap::new();
    let mut seq_of = |id: Uuid| {
        let next = common.len() as u64 + 1;
        *common.entry(id).or_insert(next)
    };
    let mut merged = Vec::new();
    // A reply may be traced where it was sent and where it was handed
    // over: one message, once.
    let mut accepted: std::collections::HashSet<Uuid> = std::collections::HashSet::new();
    for records in per_node {
        let mut local: HashMap<u64, Uuid> = HashMap::new();
        for record in &records {
            match record {
                Record::Accepted(a) if a.seq != 0 => {
                    local.insert(a.seq, a.id);
                }
                Record::Delivered(d) if d.seq != 0 => {
                    local.insert(d.seq, d.message);
                }
                _ => {}
            }
        }
        for record in records {
            match record {
                Record::Accepted(mut a) => {
                    if accepted.insert(a.id) {
                        a.seq = seq_of(a.id);
                        merged.push(Record::Accepted(a));
                    }
                }
                Record::Delivered(mut d) => {
                    d.seq = seq_of(d.message);
                    merged.push(Record::Delivered(d));
                }
                Record::Settled(mut s) => {
                    if let Some(&message) = local.get(&s.seq) {
                        s.seq = seq_of(message);
                        merged.push(Record::Settled(s));
                    }
                }
            }
        }
    }
    // Stable: one node's records of one instant keep their order.
    merged.sort_by_key(Record::at);
    merged
}

/// Every node's listing of recent activities (`TraceIndex::find`'s
/// shape) as one: an activity's parts joined — its name and start from
/// the part that began first, its end the latest, its messages summed
/// (each is accepted on one node), its outcomes and dead letters
/// together — newest first, at most `limit`.
pub(crate) fn merge_listings(listings: &[Value], limit: usize) -> Value {
    struct Joined {
        name: Value,
        started_at: u64,
        ended_at: u64,
        messages: u64,
        outcomes: Vec<Value>,
        dead_lettered: bool,
    }
    let mut joined: HashMap<String, Joined> = HashMap::new();
    for listing in listings {
        let Some(activities) = listing["activities"].as_array() else {
            continue;
        };
        for part in activities {
            let Some(id) = part["activity_id"].as_str() else {
                continue;
            };
            let started_at = part["started_at"].as_u64().unwrap_or(0);
            let duration_ns = (part["duration_ms"].as_f64().unwrap_or(0.0) * 1e6) as u64;
            let ended_at = started_at.saturating_add(duration_ns);
            let outcomes = part["outcomes"].as_array().cloned().unwrap_or_default();
            let entry = joined.entry(id.to_string()).or_insert(Joined {
                name: part["name"].clone(),
                started_at,
                ended_at,
                messages: 0,
                outcomes: Vec::new(),
                dead_lettered: false,
            });
            let named = part["name"].as_str().is_some_and(|n| !n.is_empty());
            if started_at < entry.started_at && named
                || entry.name.as_str().is_none_or(str::is_empty)
            {
                entry.name = part["name"].clone();
            }
            entry.started_at = entry.started_at.min(started_at);
            entry.ended_at = entry.ended_at.max(ended_at);
            entry.messages += part["messages"].as_u64().unwrap_or(0);
            for outcome in outcomes {
                if !entry.outcomes.contains(&outcome) {
                    entry.outcomes.push(outcome);
                }
            }
            entry.dead_lettered |= part["dead_lettered"] == true;
        }
    }
    let mut joined: Vec<(String, Joined)> = joined.into_iter().collect();
    joined.sort_by(|a, b| b.1.started_at.cmp(&a.1.started_at).then(a.0.cmp(&b.0)));
    joined.truncate(limit);
    let activities: Vec<Value> = joined
        .into_iter()
        .map(|(id, a)| {
            json!({
                "activity_id": id,
                "name": a.name,
                "started_at": a.started_at,
                "duration_ms": ((a.ended_at - a.started_at) / 1_000) as f64 / 1_000.0,
                "messages": a.messages,
                "outcomes": a.outcomes,
                "dead_lettered": a.dead_lettered,
            })
        })
        .collect();
    json!({ "activities": activities })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::record::{Accepted, Delivered, Settled, SettledAs};
    use crate::trace::tree;
    use courier_proto::{Kind, Version};

    const MS: u64 = 1_000_000;
    const ACTIVITY: Uuid = Uuid::from_u128(1);

    fn accepted(
        at_ms: u64,
        id: u128,
        seq: u64,
        kind: Kind,
        name: &str,
        response_to: Option<u128>,
    ) -> Record {
        Record::Accepted(Accepted {
            at: at_ms * MS,
            id: Uuid::from_u128(id),
            activity: ACTIVITY,
            seq,
            kind,
            name: name.into(),
            version: Version::default(),
            sender: "shop".into(),
            receivers: vec!["ledger".into()],
            parent_id: None,
            response_to: response_to.map(Uuid::from_u128),
            key: None,
            is_final: kind == Kind::Reply,
            transient: false,
            expires_at: None,
            deliver_at: None,
            payload: None,
        })
    }

    fn delivered(at_ms: u64, message: u128, seq: u64) -> Record {
        Record::Delivered(Delivered {
            at: at_ms * MS,
            activity: ACTIVITY,
            message: Uuid::from_u128(message),
            seq,
            attempt: 1,
            service: "ledger".into(),
            instance: "ledger-1".into(),
        })
    }

    fn settled(at_ms: u64, seq: u64) -> Record {
        Record::Settled(Settled {
            at: at_ms * MS,
            activity: ACTIVITY,
            seq,
            outcome: SettledAs::Acked,
            service: "ledger".into(),
        })
    }

    #[test]
    fn a_command_accepted_on_one_node_and_handled_on_another_is_one_tree() {
        // Node a accepted the command (its seq 7) and later the reply;
        // node b held the fetched command as its seq 7 too, and acked it,
        // and traced the reply it was handed too.
        let node_a = vec![
            accepted(0, 10, 7, Kind::Command, "ledger.post", None),
            accepted(5, 11, 0, Kind::Reply, "ledger.posted", Some(10)),
        ];
        let node_b = vec![
            delivered(2, 10, 7),
            accepted(5, 11, 0, Kind::Reply, "ledger.posted", Some(10)),
            settled(6, 7),
        ];
        let merged = merge_records(vec![node_a, node_b]);
        let at: Vec<u64> = merged.iter().map(|r| r.at() / MS).collect();
        assert_eq!(at, vec![0, 2, 5, 6], "in time order");
        let tree = tree::build(ACTIVITY, &merged);
        let command = &tree["roots"][0];
        assert_eq!(command["name"], "ledger.post");
        assert_eq!(command["deliveries"][0]["service"], "ledger");
        assert_eq!(command["deliveries"][0]["outcome"], "acked");
        assert_eq!(command["children"][0]["name"], "ledger.posted");
        assert_eq!(tree["messages"], 2);
        assert_eq!(tree["outcomes"], json!(["ledger.posted"]));
    }

    #[test]
    fn seqs_of_different_nodes_never_meet() {
        // Both nodes use seq 1 for different messages: each outcome stays
        // with its own node's delivery.
        let node_a = vec![
            accepted(0, 10, 1, Kind::Command, "a.run", None),
            delivered(1, 20, 2),
            settled(3, 2),
        ];
        let node_b = vec![
            accepted(0, 20, 1, Kind::Command, "b.run", None),
            delivered(1, 10, 1),
        ];
        let tree = tree::build(ACTIVITY, &merge_records(vec![node_a, node_b]));
        let roots = tree["roots"].as_array().expect("roots");
        let by_name = |name: &str| roots.iter().find(|r| r["name"] == name).expect(name);
        assert_eq!(
            by_name("b.run")["deliveries"][0]["outcome"],
            "acked",
            "{tree}"
        );
        assert!(
            by_name("a.run")["deliveries"][0]["outcome"].is_null(),
            "{tree}"
        );
    }

    #[test]
    fn an_outcome_whose_delivery_is_not_traced_is_left_out() {
        let merged = merge_records(vec![vec![settled(1, 99)]]);
        assert!(merged.is_empty());
    }

    #[test]
    fn listings_join_an_activitys_parts_newest_first() {
        let node_a = json!({"activities": [
            {"activity_id": "x", "name": "ledger.post", "started_at": 1_000, "duration_ms": 0.002,
             "messages": 2, "outcomes": ["ledger.posted"], "dead_lettered": false},
            {"activity_id": "y", "name": "old.thing", "started_at": 500, "duration_ms": 0.0,
             "messages": 1, "outcomes": [], "dead_lettered": false},
        ]});
        let node_b = json!({"activities": [
            {"activity_id": "x", "name": "ledger.post", "started_at": 2_000, "duration_ms": 0.005,
             "messages": 1, "outcomes": [], "dead_lettered": true},
            {"activity_id": "z", "name": "mail.send", "started_at": 9_000, "duration_ms": 0.0,
             "messages": 1, "outcomes": [], "dead_lettered": false},
        ]});
        let merged = merge_listings(&[node_a, node_b], 2);
        let activities = merged["activities"].as_array().expect("activities");
        assert_eq!(activities.len(), 2, "the limit holds: {merged}");
        assert_eq!(activities[0]["activity_id"], "z");
        let x = &activities[1];
        assert_eq!(x["activity_id"], "x");
        assert_eq!(x["name"], "ledger.post");
        assert_eq!(x["started_at"], 1_000);
        assert_eq!(x["duration_ms"], 0.006, "to node b's end");
        assert_eq!(x["messages"], 3);
        assert_eq!(x["outcomes"], json!(["ledger.posted"]));
        assert_eq!(x["dead_lettered"], true);
    }
}
