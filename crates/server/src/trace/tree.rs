//! An activity's causal tree, built from its trace records: each message
//! under the message it was sent while handling (`parent_id`) — a
//! command, its replies and the events its handler published, the
//! commands those caused — with what became of every delivery.
//!
//! The JSON shape is the one `GET /v1/activities/{id}` and
//! `courier.trace.get` answer with (`docs/PROTOCOL.md` §8.10).

use std::collections::HashMap;

use courier_proto::Kind;
use serde_json::{json, Map, Value};
use uuid::Uuid;

use super::record::{Accepted, Record, SettledAs};

/// One delivery attempt to one service, and what became of it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Attempt {
    service: String,
    instance: Option<String>,
    attempt: Option<u32>,
    delivered_at: Option<u64>,
    outcome: Option<SettledAs>,
    settled_at: Option<u64>,
}

struct Node<'a> {
    message: &'a Accepted,
    attempts: Vec<Attempt>,
    children: Vec<usize>,
    /// It names a parent this activity's trace does not hold.
    parent_missing: bool,
}

/// Milliseconds from `start` to `t`, to the microsecond.
fn ms_since(start: u64, t: u64) -> f64 {
    ((t.saturating_sub(start)) / 1_000) as f64 / 1_000.0
}

/// The tree of `activity` from its records (in the order they happened).
pub(crate) fn build(activity: Uuid, records: &[Record]) -> Value {
    let mut nodes: Vec<Node> = Vec::new();
    let mut by_id: HashMap<Uuid, usize> = HashMap::new();
    let mut by_seq: HashMap<u64, usize> = HashMap::new();
    for record in records {
        if let Record::Accepted(a) = record {
            by_id.insert(a.id, nodes.len());
            if a.seq != 0 {
                by_seq.insert(a.seq, nodes.len());
            }
            nodes.push(Node {
                message: a,
                attempts: Vec::new(),
                children: Vec::new(),
                parent_missing: false,
            });
        }
    }
    for record in records {
        match record {
            Record::Accepted(_) => {}
            Record::Delivered(d) => {
                let node = if d.seq != 0 {
                    by_seq.get(&d.seq)
                } else {
                    by_id.get(&d.message)
                };
                if let Some(&i) = node {
                    nodes[i].attempts.push(Attempt {
                        service: d.service.clone(),
                        instance: Some(d.instance.clone()),
                        attempt: Some(d.attempt),
                        delivered_at: Some(d.at),
                        outcome: None,
                        settled_at: None,
                    });
                }
            }
            Record::Settled(s) => {
                let Some(&i) = by_seq.get(&s.seq) else {
                    continue;
                };
                let attempts = &mut nodes[i].attempts;
                // The latest open attempt of that service; an outcome
                // without one (expired before any delivery) stands alone.
                match attempts
                    .iter_mut()
                    .rev()
                    .find(|a| a.service == s.service && a.outcome.is_none())
                {
                    Some(open) => {
                        open.outcome = Some(s.outcome.clone());
                        open.settled_at = Some(s.at);
                    }
                    None => attempts.push(Attempt {
                        service: s.service.clone(),
                        instance: None,
                        attempt: None,
                        delivered_at: None,
                        outcome: Some(s.outcome.clone()),
                        settled_at: Some(s.at),
                    }),
                }
            }
        }
    }
    let mut roots = Vec::new();
    for i in 0..nodes.len() {
        let m = nodes[i].message;
        // A reply from a client that sets no parent_id still hangs under
        // the command it answers.
        let cause = m.parent_id.or(if m.kind == Kind::Reply {
            m.response_to
        } else {
            None
        });
        match cause.and_then(|c| by_id.get(&c).copied()) {
            Some(parent) if parent != i => nodes[parent].children.push(i),
            _ => {
                nodes[i].parent_missing = cause.is_some();
                roots.push(i);
            }
        }
    }
    // Children in the order they were accepted (records come in that
    // order already; the sort keeps it for equal times).
    for i in 0..nodes.len() {
        let mut children = std::mem::take(&mut nodes[i].children);
        children.sort_by_key(|&c| (nodes[c].message.at, c));
        nodes[i].children = children;
    }
    roots.sort_by_key(|&r| (nodes[r].message.at, r));

    let start = nodes
        .iter()
        .map(|n| n.message.at)
        .min()
        .or_else(|| records.iter().map(Record::at).min())
        .unwrap_or(0);
    let end = records.iter().map(Record::at).max().unwrap_or(start);
    let summary = summarize(records);
    json!({
        "activity_id": activity.to_string(),
        "name": nodes.iter().min_by_key(|n| n.message.at).map(|n| n.message.name.clone()),
        "started_at": start,
        "duration_ms": ms_since(start, end),
        "messages": nodes.len(),
        "outcomes": summary.outcomes,
        "dead_lettered": summary.dead_lettered,
        "roots": roots.iter().map(|&r| node_json(&nodes, r, start)).collect::<Vec<_>>(),
    })
}

fn node_json(nodes: &[Node], i: usize, start: u64) -> Value {
    let n = &nodes[i];
    let m = n.message;
    let mut o = Map::new();
    o.insert("id".into(), json!(m.id.to_string()));
    o.insert("kind".into(), json!(m.kind.as_str()));
    o.insert("name".into(), json!(m.name));
    o.insert("version".into(), json!(m.version.to_string()));
    o.insert("sender".into(), json!(m.sender));
    o.insert("receivers".into(), json!(m.receivers));
    o.insert(
        "parent_id".into(),
        json!(m.parent_id.map(|p| p.to_string())),
    );
    if let Some(r) = m.response_to {
        o.insert("response_to".into(), json!(r.to_string()));
    }
    if m.kind == Kind::Reply {
        o.insert("final".into(), json!(m.is_final));
    }
    if m.transient {
        o.insert("transient".into(), json!(true));
    }
    if let Some(key) = &m.key {
        o.insert("key".into(), json!(key));
    }
    if let Some(t) = m.expires_at {
        o.insert("expires_at".into(), json!(t));
    }
    if let Some(t) = m.deliver_at {
        o.insert("deliver_at".into(), json!(t));
    }
    o.insert("accepted_at".into(), json!(m.at));
    o.insert("accepted_ms".into(), json!(ms_since(start, m.at)));
    o.insert(
        "deliveries".into(),
        Value::Array(n.attempts.iter().map(|a| attempt_json(a, start)).collect()),
    );
    o.insert(
        "dead_lettered".into(),
        json!(n
            .attempts
            .iter()
            .any(|a| matches!(a.outcome, Some(SettledAs::DeadLettered { .. })))),
    );
    if n.parent_missing {
        o.insert("parent_missing".into(), json!(true));
    }
    if let Some((full, kept)) = &m.payload {
        let value = if kept.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(kept)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(kept).into_owned()))
        };
        o.insert("payload".into(), value);
        if *full as usize > kept.len() {
            o.insert("payload_bytes".into(), json!(full));
        }
    }
    o.insert(
        "children".into(),
        Value::Array(
            n.children
                .iter()
                .map(|&c| node_json(nodes, c, start))
                .collect(),
        ),
    );
    Value::Object(o)
}

fn attempt_json(a: &Attempt, start: u64) -> Value {
    let mut o = Map::new();
    o.insert("service".into(), json!(a.service));
    o.insert("instance".into(), json!(a.instance));
    o.insert("attempt".into(), json!(a.attempt));
    o.insert("delivered_at".into(), json!(a.delivered_at));
    o.insert(
        "delivered_ms".into(),
        json!(a.delivered_at.map(|t| ms_since(start, t))),
    );
    o.insert(
        "outcome".into(),
        json!(a.outcome.as_ref().map(SettledAs::as_str)),
    );
    o.insert("settled_at".into(), json!(a.settled_at));
    o.insert(
        "settled_ms".into(),
        json!(a.settled_at.map(|t| ms_since(start, t))),
    );
    match &a.outcome {
        Some(SettledAs::Nacked { delay_ms }) => {
            o.insert("delay_ms".into(), json!(delay_ms));
        }
        Some(SettledAs::Released { reason }) | Some(SettledAs::DeadLettered { reason }) => {
            o.insert("reason".into(), json!(reason));
        }
        _ => {}
    }
    Value::Object(o)
}

/// What a listing shows of an activity besides its name and times.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Summary {
    /// The names of its final replies, in order, each once.
    pub outcomes: Vec<String>,
    pub dead_lettered: bool,
}

fn summarize(records: &[Record]) -> Summary {
    let mut summary = Summary::default();
    for record in records {
        match record {
            Record::Accepted(a)
                if a.kind == Kind::Reply && a.is_final && !summary.outcomes.contains(&a.name) =>
            {
                summary.outcomes.push(a.name.clone());
            }
            Record::Settled(s) if matches!(s.outcome, SettledAs::DeadLettered { .. }) => {
                summary.dead_lettered = true;
            }
            _ => {}
        }
    }
    summary
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::record::{Delivered, Settled};
    use courier_proto::Version;

    const MS: u64 = 1_000_000;
    const T0: u64 = 1_000_000 * MS;

    struct Script {
        activity: Uuid,
        records: Vec<Record>,
        next: u128,
    }

    impl Script {
        fn new() -> Script {
            Script {
                activity: Uuid::from_u128(1),
                records: Vec::new(),
                next: 100,
            }
        }

        #[allow(clippy::too_many_arguments)]
        fn accept(
            &mut self,
            at_ms: u64,
            kind: Kind,
            name: &str,
            sender: &str,
            to: &[&str],
            parent: Option<Uuid>,
            response_to: Option<Uuid>,
            seq: u64,
        ) -> Uuid {
            self.next += 1;
            let id = Uuid::from_u128(self.next);
            self.records.push(Record::Accepted(Accepted {
                at: T0 + at_ms * MS,
                id,
                activity: self.activity,
                seq,
                kind,
                name: name.into(),
                version: Version::default(),
                sender: sender.into(),
                receivers: to.iter().map(|s| s.to_string()).collect(),
                parent_id: parent,
                response_to,
                key: None,
                is_final: kind == Kind::Reply,
                transient: false,
                expires_at: None,
                deliver_at: None,
                payload: None,
            }));
            id
        }

        fn deliver(&mut self, at_ms: u64, message: Uuid, seq: u64, service: &str, attempt: u32) {
            self.records.push(Record::Delivered(Delivered {
                at: T0 + at_ms * MS,
                activity: self.activity,
                message,
                seq,
                attempt,
                service: service.into(),
                instance: format!("{service}-1"),
            }));
        }

        fn settle(&mut self, at_ms: u64, seq: u64, service: &str, outcome: SettledAs) {
            self.records.push(Record::Settled(Settled {
                at: T0 + at_ms * MS,
                activity: self.activity,
                seq,
                outcome,
                service: service.into(),
            }));
        }
    }

    /// The tree as indented lines: `kind name` per node, `> service
    /// attempt outcome` per delivery.
    fn outline(tree: &Value) -> Vec<String> {
        fn walk(node: &Value, depth: usize, out: &mut Vec<String>) {
            let pad = "  ".repeat(depth);
            let missing = if node["parent_missing"] == true {
                " (parent missing)"
            } else {
                ""
            };
            out.push(format!(
                "{pad}{} {} @{}{missing}",
                node["kind"].as_str().unwrap_or("?"),
                node["name"].as_str().unwrap_or("?"),
                node["accepted_ms"]
            ));
            for d in node["deliveries"].as_array().into_iter().flatten() {
                out.push(format!(
                    "{pad}  > {} #{} {} @{}",
                    d["service"].as_str().unwrap_or("?"),
                    d["attempt"],
                    d["outcome"].as_str().unwrap_or("open"),
                    d["settled_ms"]
                ));
            }
            for child in node["children"].as_array().into_iter().flatten() {
                walk(child, depth + 1, out);
            }
        }
        let mut out = Vec::new();
        for root in tree["roots"].as_array().into_iter().flatten() {
            walk(root, 0, &mut out);
        }
        out
    }

    #[test]
    fn a_command_its_reply_its_event_and_the_command_that_caused() {
        let mut s = Script::new();
        let create = s.accept(
            0,
            Kind::Command,
            "todo.create",
            "web",
            &["todo"],
            None,
            None,
            3,
        );
        s.deliver(1, create, 3, "todo", 1);
        // Published by todo's handler before it replied.
        let created = s.accept(
            5,
            Kind::Event,
            "todo.created",
            "todo",
            &["mail"],
            Some(create),
            None,
            7,
        );
        let reply = s.accept(
            6,
            Kind::Reply,
            "todo.done",
            "todo",
            &["web"],
            Some(create),
            Some(create),
            0,
        );
        s.deliver(6, reply, 0, "web", 1);
        s.settle(7, 3, "todo", SettledAs::Acked);
        s.deliver(8, created, 7, "mail", 1);
        let send = s.accept(
            9,
            Kind::Command,
            "mail.send",
            "mail",
            &["smtp"],
            Some(created),
            None,
            9,
        );
        s.settle(10, 7, "mail", SettledAs::Acked);
        s.deliver(11, send, 9, "smtp", 1);
        s.settle(12, 9, "smtp", SettledAs::Acked);
        let tree = build(s.activity, &s.records);
        assert_eq!(
            outline(&tree),
            [
                "command todo.create @0.0",
                "  > todo #1 acked @7.0",
                "  event todo.created @5.0",
                "    > mail #1 acked @10.0",
                "    command mail.send @9.0",
                "      > smtp #1 acked @12.0",
                "  reply todo.done @6.0",
                "    > web #1 open @null",
            ]
        );
        assert_eq!(tree["messages"], 4);
        assert_eq!(tree["duration_ms"], 12.0);
        assert_eq!(tree["outcomes"], json!(["todo.done"]));
        assert_eq!(tree["dead_lettered"], false);
        assert_eq!(tree["name"], "todo.create");
        let root = &tree["roots"][0];
        assert_eq!(root["deliveries"][0]["instance"], "todo-1");
        assert_eq!(root["deliveries"][0]["delivered_ms"], 1.0);
        assert_eq!(root["receivers"], json!(["todo"]));
        assert_eq!(root["children"][1]["final"], true);
    }

    #[test]
    fn redeliveries_and_a_dead_letter_are_attempts_of_one_node() {
        let mut s = Script::new();
        let job = s.accept(
            0,
            Kind::Command,
            "job.run",
            "cron",
            &["worker"],
            None,
            None,
            2,
        );
        s.deliver(1, job, 2, "worker", 1);
        s.settle(2, 2, "worker", SettledAs::Nacked { delay_ms: 100 });
        s.deliver(102, job, 2, "worker", 2);
        s.settle(
            30_102,
            2,
            "worker",
            SettledAs::Released {
                reason: "ack deadline passed".into(),
            },
        );
        s.deliver(30_103, job, 2, "worker", 3);
        s.settle(30_104, 2, "worker", SettledAs::Nacked { delay_ms: 0 });
        s.settle(
            30_104,
            2,
            "worker",
            SettledAs::DeadLettered {
                reason: "nacked".into(),
            },
        );
        let tree = build(s.activity, &s.records);
        assert_eq!(
            outline(&tree),
            [
                "command job.run @0.0",
                "  > worker #1 nacked @2.0",
                "  > worker #2 released @30102.0",
                "  > worker #3 nacked @30104.0",
                "  > worker #null dead_lettered @30104.0",
            ]
        );
        let root = &tree["roots"][0];
        assert_eq!(root["dead_lettered"], true);
        assert_eq!(root["deliveries"][0]["delay_ms"], 100);
        assert_eq!(root["deliveries"][1]["reason"], "ack deadline passed");
        assert_eq!(tree["dead_lettered"], true);
    }

    #[test]
    fn messages_whose_parent_is_not_in_the_trace_become_roots_that_say_so() {
        let mut s = Script::new();
        let lost = Uuid::from_u128(99);
        let orphan = s.accept(0, Kind::Event, "a.b", "x", &["y"], Some(lost), None, 4);
        s.deliver(1, orphan, 4, "y", 1);
        // A reply from a version-1 client: no parent_id, but it answers a
        // command of the activity.
        let command = s.accept(2, Kind::Command, "c.d", "y", &["z"], Some(orphan), None, 5);
        s.accept(
            3,
            Kind::Reply,
            "c.done",
            "z",
            &["y"],
            None,
            Some(command),
            0,
        );
        // Expired before anyone took it.
        s.settle(4, 5, "z", SettledAs::Expired);
        // Records of messages this trace never saw accepted are ignored.
        s.settle(5, 777, "z", SettledAs::Acked);
        s.deliver(5, Uuid::from_u128(5), 0, "z", 1);
        let tree = build(s.activity, &s.records);
        assert_eq!(
            outline(&tree),
            [
                "event a.b @0.0 (parent missing)",
                "  > y #1 open @null",
                "  command c.d @2.0",
                "    > z #null expired @4.0",
                "    reply c.done @3.0",
            ]
        );
    }

    #[test]
    fn an_empty_trace_is_an_empty_tree() {
        let tree = build(Uuid::from_u128(5), &[]);
        assert_eq!(tree["messages"], 0);
        assert_eq!(tree["roots"], json!([]));
    }
}
