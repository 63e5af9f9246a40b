//! Activity traces across nodes (docs/SCALE-OUT.md §11): each node keeps
//! its own part of every activity (`trace/`) — acceptances there,
//! deliveries to its connections, their outcomes. A query on any node
//! asks every node in `courier_nodes` on `courier.node.<id>.trace`, at
//! once, and merges the parts; a node that does not answer within
//! [`TRACE_ASK_PATIENCE`] is named in the answer's `partial`.

use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use courier_broker::{ActivityFilter, TraceQuery};
use futures_util::StreamExt as _;
use serde_json::{json, Value};
use tracing::warn;
use uuid::Uuid;

use super::ClusterNode;
use crate::trace::Tracer;
use crate::Shared;

/// How long a query waits for each other node's part.
const TRACE_ASK_PATIENCE: Duration = Duration::from_secs(1);

fn trace_subject(node: &str) -> String {
    format!("courier.node.{node}.trace")
}

/// What one node asks another.
#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
enum Question {
    /// Its part of one activity (the id, hyphenated).
    Activity(String),
    /// Its listing, for a filter given as `courier.trace.find`'s
    /// arguments.
    Activities(Value),
}

/// A filter as the arguments it was read from, for another node to read.
fn filter_args(filter: &ActivityFilter) -> Value {
    json!({
        "name": filter.name,
        "outcome": filter.outcome,
        "since": filter.since.map(|since| since.to_string()),
        "limit": filter.limit.to_string(),
    })
}

/// A node's part of an activity on the wire: the records dropped for
/// size (4 bytes, big-endian), then the records as its index files them;
/// nothing at all when it has no part.
fn encode_part(part: Option<(Vec<u8>, u32)>) -> Bytes {
    let Some((records, dropped)) = part else {
        return Bytes::new();
    };
    let mut out = BytesMut::with_capacity(4 + records.len());
    out.put_u32(dropped);
    out.put_slice(&records);
    out.freeze()
}

fn decode_part(bytes: &[u8]) -> Option<(Vec<u8>, u32)> {
    let (dropped, records) = bytes.split_first_chunk::<4>()?;
    Some((records.to_vec(), u32::from_be_bytes(*dropped)))
}

/// Answers other nodes' questions for this node's part of the traces
/// (an empty part when traces are off here).
pub(super) async fn serve_trace_questions(shared: Weak<Shared>) {
    let Some((client, subject, tracer)) = shared.upgrade().and_then(|s| {
        let edge = s.cluster.as_ref()?;
        Some((
            edge.node.connection.client.clone(),
            trace_subject(edge.node.node.as_str()),
            s.tracer.clone(),
        ))
    }) else {
        return;
    };
    let mut questions = match client.subscribe(subject).await {
        Ok(questions) => questions,
        Err(e) => {
            warn!(error = %e, "cannot answer other nodes' trace queries; their answers will name this node as partial");
            return;
        }
    };
    while let Some(question) = questions.next().await {
        let Some(to) = question.reply else {
            continue;
        };
        let Ok(question) = serde_json::from_slice::<Question>(&question.payload) else {
            continue;
        };
        let (client, tracer) = (client.clone(), tracer.clone());
        // The index may take a while: off the runtime, not in this loop.
        tokio::spawn(async move {
            let answered = tokio::task::spawn_blocking(move || match (question, tracer) {
                (Question::Activity(id), Some(tracer)) => match Uuid::parse_str(&id) {
                    Ok(id) => encode_part(tracer.records(&id)),
                    Err(_) => Bytes::new(),
                },
                (Question::Activity(_), None) => Bytes::new(),
                (Question::Activities(args), tracer) => {
                    let listing = match (
                        ActivityFilter::from_args(&args, crate::wall_nanos()),
                        tracer,
                    ) {
                        (Ok(filter), Some(tracer)) => tracer.find(&filter),
                        _ => json!({ "activities": [] }),
                    };
                    Bytes::from(listing.to_string())
                }
            })
            .await;
            if let Ok(answer) = answered {
                if let Err(e) = client.publish(to, answer).await {
                    warn!(error = %e, "could not answer a trace query");
                }
            }
        });
    }
}

/// Asks every other node `question`: the answers that came, and the
/// nodes that gave none in time.
async fn ask(node: &ClusterNode, question: &Question) -> (Vec<Bytes>, Vec<String>) {
    let Ok(payload) = serde_json::to_vec(question) else {
        return (Vec::new(), Vec::new());
    };
    let (answers, silent) = super::ask_every_other_node(
        node,
        trace_subject,
        Bytes::from(payload),
        TRACE_ASK_PATIENCE,
    )
    .await;
    (
        answers.into_iter().map(|(_, answer)| answer).collect(),
        silent,
    )
}

/// One activity's causal tree from every node's part; `None` if no node
/// has one.
pub(crate) async fn tree(node: &ClusterNode, tracer: &Tracer, activity: Uuid) -> Option<Value> {
    let here = {
        let tracer = tracer.clone();
        tokio::task::spawn_blocking(move || tracer.records(&activity))
    };
    let (answers, silent) = ask(node, &Question::Activity(activity.to_string())).await;
    let mut parts: Vec<(Vec<u8>, u32)> = here.await.ok().flatten().into_iter().collect();
    parts.extend(answers.iter().filter_map(|answer| decode_part(answer)));
    let mut tree = Tracer::tree_of_parts(&activity, parts)?;
    if !silent.is_empty() {
        tree["partial"] = json!(silent);
    }
    Some(tree)
}

/// Recent activities matching `filter` on every node, newest first.
pub(crate) async fn find(node: &ClusterNode, tracer: &Tracer, filter: &ActivityFilter) -> Value {
    let here = {
        let (tracer, filter) = (tracer.clone(), filter.clone());
        tokio::task::spawn_blocking(move || tracer.find(&filter))
    };
    let (answers, silent) = ask(node, &Question::Activities(filter_args(filter))).await;
    let mut listings: Vec<Value> = here.await.ok().into_iter().collect();
    listings.extend(
        answers
            .iter()
            .filter_map(|answer| serde_json::from_slice(answer).ok()),
    );
    let mut merged = Tracer::merge_listings(&listings, filter.limit);
    if !silent.is_empty() {
        merged["partial"] = json!(silent);
    }
    merged
}

/// The answer to a broker command about traces, cluster-wide:
/// (reply name, body), as [`Tracer::answer`] gives one node's.
pub(crate) async fn answer(
    node: &Arc<ClusterNode>,
    tracer: &Tracer,
    query: &TraceQuery,
) -> (&'static str, Value) {
    match query {
        TraceQuery::Activity(id) => match tree(node, tracer, *id).await {
            Some(tree) => ("courier.trace.tree", tree),
            None => ("courier.trace.not-found", tracer.not_found(id)),
        },
        TraceQuery::Activities(filter) => {
            ("courier.trace.activities", find(node, tracer, filter).await)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_round_trip() {
        let part = (vec![1, 2, 3], 7);
        assert_eq!(decode_part(&encode_part(Some(part.clone()))), Some(part));
        assert_eq!(decode_part(&encode_part(None)), None);
    }

    #[test]
    fn a_filter_reads_back_as_itself() {
        let filter = ActivityFilter {
            name: Some("ledger.*".to_string()),
            outcome: Some("ledger.posted".to_string()),
            since: Some(1_796_000_000_000_000_000),
            limit: 20,
        };
        let args = filter_args(&filter);
        let read = ActivityFilter::from_args(&args, 0).expect("reads");
        assert_eq!(read, filter);
        let question = Question::Activities(args);
        let bytes = serde_json::to_vec(&question).expect("encode");
        assert_eq!(
            serde_json::from_slice::<Question>(&bytes).expect("decode"),
            question
        );
    }
}
