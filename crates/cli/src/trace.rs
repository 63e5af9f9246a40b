//! `courier trace`: an activity's causal tree (the broker command
//! `courier.trace.get`), or without an id the recent activities
//! (`courier.trace.find`).

use clap::Args;
use serde_json::{json, Value};

use crate::admin::{admin_request, admin_request_named};
use crate::conn::Broker;
use crate::output;

#[derive(Args)]
pub struct TraceArgs {
    /// The activity to show (any message's `activity_id`); without it,
    /// recent activities are listed, newest first, one JSON line each.
    activity_id: Option<String>,
    /// Print the tree as one JSON object (children nested) instead of an
    /// indented tree.
    #[arg(long)]
    json: bool,
    /// Listing: only activities whose first message matches this name
    /// pattern (`todo.*`).
    #[arg(long, conflicts_with = "activity_id")]
    name: Option<String>,
    /// Listing: only activities with this final outcome (a final reply's
    /// name), or `dead-lettered`.
    #[arg(long, conflicts_with = "activity_id")]
    outcome: Option<String>,
    /// Listing: only activities started since then (`15m`, `2h`, an RFC
    /// 3339 time).
    #[arg(long, conflicts_with = "activity_id")]
    since: Option<String>,
    /// Listing: at most this many (1–1000).
    #[arg(long, default_value_t = 50, conflicts_with = "activity_id")]
    limit: u32,
    #[command(flatten)]
    admin: Broker,
}

pub async fn run(args: TraceArgs) -> anyhow::Result<()> {
    let Some(id) = args.activity_id else {
        let listing = admin_request(
            &args.admin,
            "courier.trace.find",
            json!({
                "name": args.name,
                "outcome": args.outcome,
                "since": args.since,
                "limit": args.limit,
            }),
        )
        .await?;
        for activity in listing["activities"].as_array().into_iter().flatten() {
            output::line(activity);
        }
        return Ok(());
    };
    let (outcome, body) = admin_request_named(
        &args.admin,
        "courier.trace.get",
        json!({ "activity_id": id }),
    )
    .await?;
    if outcome == "courier.trace.not-found" || outcome == "courier.trace.too-large" {
        anyhow::bail!(
            "{}",
            body["reason"]
                .as_str()
                .unwrap_or("no trace of that activity")
        );
    }
    if args.json {
        output::line(&body);
    } else {
        print!("{}", render(&body));
    }
    Ok(())
}

/// The tree as indented text: a line per message (kind, name, sender →
/// receivers, when it was accepted), under it a line per delivery
/// attempt (service/instance, attempt, when delivered and settled, how),
/// then the messages it caused, indented once more. Times are
/// milliseconds after the activity's first message.
pub fn render(tree: &Value) -> String {
    let mut out = String::new();
    let outcomes: Vec<&str> = tree["outcomes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    out.push_str(&format!(
        "activity {} — {} message(s) in {} ms, started {}{}{}\n",
        text(&tree["activity_id"]),
        tree["messages"],
        ms(&tree["duration_ms"]),
        rfc3339(&tree["started_at"]),
        if outcomes.is_empty() {
            String::new()
        } else {
            format!(", outcome {}", outcomes.join(", "))
        },
        if tree["dead_lettered"] == true {
            ", DEAD-LETTERED"
        } else {
            ""
        },
    ));
    for root in tree["roots"].as_array().into_iter().flatten() {
        node(root, 0, &mut out);
    }
    out
}

fn node(n: &Value, depth: usize, out: &mut String) {
    let pad = "  ".repeat(depth);
    let receivers: Vec<&str> = n["receivers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    // Replies and transient messages take no ack: their deliveries end
    // when they are handed over.
    let acked = n["kind"] != "reply" && n["transient"] != true;
    let mut notes = Vec::new();
    if n["kind"] == "reply" {
        notes.push(if n["final"] == true {
            "final"
        } else {
            "more follow"
        });
    }
    if n["transient"] == true {
        notes.push("transient");
    }
    if n["parent_missing"] == true {
        notes.push("its cause is not in the trace");
    }
    out.push_str(&format!(
        "{pad}{} {} {} → {}  +{} ms{}\n",
        text(&n["kind"]),
        text(&n["name"]),
        text(&n["sender"]),
        if receivers.is_empty() {
            "(nobody)".to_string()
        } else {
            receivers.join(", ")
        },
        ms(&n["accepted_ms"]),
        if notes.is_empty() {
            String::new()
        } else {
            format!("  ({})", notes.join(", "))
        },
    ));
    for d in n["deliveries"].as_array().into_iter().flatten() {
        let who = match d["instance"].as_str() {
            Some(instance) => format!("{}/{instance}", text(&d["service"])),
            None => text(&d["service"]).to_string(),
        };
        let mut line = format!("{pad}  ↳ {who}");
        if let Some(attempt) = d["attempt"].as_u64() {
            if attempt > 1 {
                line.push_str(&format!(" attempt {attempt}"));
            }
            line.push_str(&format!(": delivered +{} ms", ms(&d["delivered_ms"])));
        } else {
            line.push(':');
        }
        match d["outcome"].as_str() {
            None if acked => line.push_str(", no answer yet"),
            None => {}
            Some(outcome) => {
                let outcome = match outcome {
                    "dead_lettered" => "DEAD-LETTERED",
                    other => other,
                };
                line.push_str(&format!(", {outcome} +{} ms", ms(&d["settled_ms"])));
                if let Some(reason) = d["reason"].as_str() {
                    line.push_str(&format!(" ({reason})"));
                }
                if let Some(delay) = d["delay_ms"].as_u64() {
                    line.push_str(&format!(" (retry in {delay} ms)"));
                }
            }
        }
        out.push_str(&line);
        out.push('\n');
    }
    for child in n["children"].as_array().into_iter().flatten() {
        node(child, depth + 1, out);
    }
}

fn text(v: &Value) -> &str {
    v.as_str().unwrap_or("?")
}

/// Milliseconds with up to three decimals, no trailing zeros.
fn ms(v: &Value) -> String {
    let Some(ms) = v.as_f64() else {
        return "?".to_string();
    };
    let text = format!("{ms:.3}");
    text.trim_end_matches('0').trim_end_matches('.').to_string()
}

fn rfc3339(v: &Value) -> String {
    match v.as_u64() {
        Some(ns) => humantime::format_rfc3339_micros(
            std::time::UNIX_EPOCH + std::time::Duration::from_nanos(ns),
        )
        .to_string(),
        None => "?".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tree_renders_as_indented_lines() {
        let tree = json!({
            "activity_id": "0190-a",
            "messages": 3,
            "duration_ms": 1013.5,
            "started_at": 1_700_000_000_000_000_000u64,
            "outcomes": ["todo.created"],
            "dead_lettered": true,
            "roots": [{
                "kind": "command", "name": "todo.create", "sender": "web", "receivers": ["todo"],
                "accepted_ms": 0.0,
                "deliveries": [{"service": "todo", "instance": "todo-1", "attempt": 1,
                    "delivered_ms": 0.412, "outcome": "acked", "settled_ms": 12.1}],
                "children": [
                    {"kind": "reply", "name": "todo.created", "final": true, "sender": "todo",
                     "receivers": ["web"], "accepted_ms": 11.8,
                     "deliveries": [{"service": "web", "instance": "web-3", "attempt": 1,
                        "delivered_ms": 11.9, "outcome": null}],
                     "children": []},
                    {"kind": "event", "name": "todo.created", "sender": "todo", "receivers": ["mail"],
                     "accepted_ms": 11.5,
                     "deliveries": [
                        {"service": "mail", "instance": "mail-1", "attempt": 1, "delivered_ms": 11.6,
                         "outcome": "nacked", "settled_ms": 13.0, "delay_ms": 1000},
                        {"service": "mail", "instance": "mail-1", "attempt": 2, "delivered_ms": 1013.0,
                         "outcome": "dead_lettered", "settled_ms": 1013.5, "reason": "nacked"}],
                     "children": []}
                ]
            }]
        });
        assert_eq!(
            render(&tree),
            "activity 0190-a — 3 message(s) in 1013.5 ms, started 2023-11-14T22:13:20.000000Z, outcome todo.created, DEAD-LETTERED\n\
             command todo.create web → todo  +0 ms\n\
             \x20 ↳ todo/todo-1: delivered +0.412 ms, acked +12.1 ms\n\
             \x20 reply todo.created todo → web  +11.8 ms  (final)\n\
             \x20   ↳ web/web-3: delivered +11.9 ms\n\
             \x20 event todo.created todo → mail  +11.5 ms\n\
             \x20   ↳ mail/mail-1: delivered +11.6 ms, nacked +13 ms (retry in 1000 ms)\n\
             \x20   ↳ mail/mail-1 attempt 2: delivered +1013 ms, DEAD-LETTERED +1013.5 ms (nacked)\n"
        );
    }
}
