//! Trace records: what the core did with each message it accepted, for
//! the activity traces the network edge keeps (`courier trace`).
//!
//! Observability must not cost the hot path, so the core only appends
//! compact records to a `Vec` while tracing is on — a reference count on
//! the message it already holds, the names it already shares — and the
//! network edge takes them under the lock it holds anyway
//! ([`crate::Broker::take_traces`]). Encoding, indexing, sampling and
//! disk writes all happen elsewhere, off the broker's lock.
//!
//! Deliveries that need an ack are identified by the message's store
//! `seq` (what the queues hold), not its id: the edge learns which seq is
//! which message from the `Accepted` record.

use std::sync::Arc;

use courier_proto::{validate_pattern, ErrorCode, Message, SharedStr};
use courier_store::Seq;
use serde_json::Value;
use uuid::Uuid;

use crate::Nanos;

/// One thing the core did, in the order it did it.
#[derive(Debug, Clone, PartialEq)]
pub enum TraceRecord {
    /// The broker accepted `message` (its `timestamp` is when).
    Accepted {
        message: Arc<Message>,
        /// Its place in the store; 0 when it is not stored (transient
        /// messages, replies, events nobody receives).
        seq: Seq,
        /// The services chosen to receive it (a reply's: the requester).
        receivers: Arc<[String]>,
    },
    /// Handed to an instance of `service`.
    Delivered {
        message: Arc<Message>,
        /// 0 for deliveries that take no ack (replies, transient messages).
        seq: Seq,
        service: SharedStr,
        instance: SharedStr,
        attempt: u32,
        at: Nanos,
    },
    /// What became of a delivery that takes an ack, by the message's seq.
    Settled {
        seq: Seq,
        service: SharedStr,
        outcome: Outcome,
        at: Nanos,
    },
}

/// The end of one delivery attempt of a stored message to a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Acked,
    /// The receiver asked for a retry after `delay_ms`.
    Nacked {
        delay_ms: u32,
    },
    /// Taken back for another attempt without an answer (the ack
    /// deadline passed, the receiver disconnected).
    Released {
        reason: &'static str,
    },
    /// Given up after its last attempt; now in the service's dead letters.
    DeadLettered {
        reason: &'static str,
    },
    /// Dropped undelivered: its `expires_at` passed.
    Expired,
}

impl Outcome {
    /// The word traces show for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Acked => "acked",
            Outcome::Nacked { .. } => "nacked",
            Outcome::Released { .. } => "released",
            Outcome::DeadLettered { .. } => "dead_lettered",
            Outcome::Expired => "expired",
        }
    }
}

/// A question about the activity traces (`courier.trace.get`,
/// `courier.trace.find`), which the network edge answers: the traces live
/// there, not in the core.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TraceQuery {
    /// One activity's causal tree.
    Activity(Uuid),
    /// Recent activities matching a filter, newest first.
    Activities(ActivityFilter),
}

/// Which recent activities `courier.trace.find` (and `GET /v1/activities`)
/// lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActivityFilter {
    /// A name pattern the activity's first message matches (`todo.*`).
    pub name: Option<String>,
    /// A final reply's name (an outcome) the activity had, or
    /// `dead-lettered` for activities with a dead letter.
    pub outcome: Option<String>,
    /// Only activities started at or after this time (unix ns).
    pub since: Option<Nanos>,
    pub limit: usize,
}

/// The most activities one listing returns.
pub const ACTIVITIES_LIMIT_MAX: usize = 1000;
/// What a listing returns when it does not say.
pub const ACTIVITIES_LIMIT_DEFAULT: usize = 50;
/// The outcome filter that stands for "had a dead letter".
pub const DEAD_LETTERED: &str = "dead-lettered";

type Refusal = (ErrorCode, String);

impl TraceQuery {
    /// Reads `courier.trace.get`'s `{"activity_id"}`.
    pub fn activity_from_args(args: &Value) -> Result<TraceQuery, Refusal> {
        let id = args
            .get("activity_id")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                (
                    ErrorCode::InvalidMessage,
                    "courier.trace.get needs {\"activity_id\": UUID}".to_string(),
                )
            })?;
        let id = Uuid::parse_str(id).map_err(|e| {
            (
                ErrorCode::InvalidMessage,
                format!("courier.trace.get: activity_id {id:?} is not a UUID: {e}"),
            )
        })?;
        Ok(TraceQuery::Activity(id))
    }
}

impl ActivityFilter {
    /// Reads `{"name", "outcome", "since", "limit"}` (all optional).
    /// `since` is unix nanoseconds, an RFC 3339 time
    /// (`2026-12-05T10:00:00Z`), or an age (`15m`: started in the last
    /// fifteen minutes, counted back from `now`); numbers may come as
    /// strings, as they do from a URL.
    pub fn from_args(args: &Value, now: Nanos) -> Result<ActivityFilter, Refusal> {
        let bad = |what: String| {
            (
                ErrorCode::InvalidMessage,
                format!("courier.trace.find: {what}"),
            )
        };
        let text = |field: &str| -> Result<Option<String>, Refusal> {
            match args.get(field) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) if s.is_empty() => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(Value::Number(n)) => Ok(Some(n.to_string())),
                Some(other) => Err(bad(format!("{field} must be a string, not {other}"))),
            }
        };
        let name = text("name")?;
        if let Some(pattern) = &name {
            validate_pattern(pattern).map_err(|e| {
                (
                    ErrorCode::InvalidPattern,
                    format!("courier.trace.find: name {pattern:?}: {e}"),
                )
            })?;
        }
        let since = match text("since")? {
            None => None,
            Some(since) => Some(parse_since(&since, now).map_err(bad)?),
        };
        let limit = match text("limit")? {
            None => ACTIVITIES_LIMIT_DEFAULT,
            Some(limit) => match limit.parse::<usize>() {
                Ok(n) if (1..=ACTIVITIES_LIMIT_MAX).contains(&n) => n,
                _ => {
                    return Err(bad(format!(
                        "limit {limit:?} is not a number from 1 to {ACTIVITIES_LIMIT_MAX}"
                    )))
                }
            },
        };
        Ok(ActivityFilter {
            name,
            outcome: text("outcome")?,
            since,
            limit,
        })
    }
}

/// Unix ns, an RFC 3339 time, or an age such as `90s`, `15m`, `2h`, `1d`.
fn parse_since(text: &str, now: Nanos) -> Result<Nanos, String> {
    if let Ok(ns) = text.parse::<u64>() {
        return Ok(ns);
    }
    if let Ok(at) = humantime::parse_rfc3339_weak(text) {
        return at
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos().min(u128::from(u64::MAX)) as u64)
            .map_err(|_| format!("since {text:?} is before 1970"));
    }
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let seconds: u64 = match (number.parse::<u64>(), unit) {
        (Ok(n), "s") => n,
        (Ok(n), "m") => n.saturating_mul(60),
        (Ok(n), "h") => n.saturating_mul(3600),
        (Ok(n), "d") => n.saturating_mul(86_400),
        _ => {
            return Err(format!(
                "since {text:?} is not unix nanoseconds, an RFC 3339 time (2026-12-05T10:00:00Z) or an age (90s, 15m, 2h, 1d)"
            ))
        }
    };
    Ok(now.saturating_sub(seconds.saturating_mul(1_000_000_000)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const NOW: Nanos = 1_800_000_000_000_000_000;

    #[test]
    fn a_filter_reads_every_form_of_since_and_bounds_its_limit() {
        let f = ActivityFilter::from_args(&json!({}), NOW).expect("empty is every activity");
        assert_eq!(f.limit, ACTIVITIES_LIMIT_DEFAULT);
        assert_eq!((f.name, f.outcome, f.since), (None, None, None));
        let f = ActivityFilter::from_args(
            &json!({"name": "todo.*", "outcome": "todo.created", "since": "15m", "limit": "3"}),
            NOW,
        )
        .expect("valid");
        assert_eq!(f.since, Some(NOW - 15 * 60 * 1_000_000_000));
        assert_eq!((f.name.as_deref(), f.limit), (Some("todo.*"), 3));
        let f = ActivityFilter::from_args(&json!({"since": 42}), NOW).expect("ns");
        assert_eq!(f.since, Some(42));
        let f = ActivityFilter::from_args(&json!({"since": "1970-01-01T00:00:01Z"}), NOW)
            .expect("rfc 3339");
        assert_eq!(f.since, Some(1_000_000_000));
        for bad in [
            json!({"since": "yesterday"}),
            json!({"limit": 0}),
            json!({"limit": 1001}),
            json!({"name": "Not A Pattern"}),
            json!({"outcome": ["a"]}),
        ] {
            let refused = ActivityFilter::from_args(&bad, NOW);
            assert!(refused.is_err(), "{bad} must be refused");
        }
    }

    #[test]
    fn get_needs_a_uuid() {
        let id = Uuid::now_v7();
        assert_eq!(
            TraceQuery::activity_from_args(&json!({"activity_id": id.to_string()})),
            Ok(TraceQuery::Activity(id))
        );
        let refused = TraceQuery::activity_from_args(&json!({"activity_id": "nope"}));
        assert!(
            matches!(refused, Err((ErrorCode::InvalidMessage, ref r)) if r.contains("not a UUID"))
        );
        assert!(TraceQuery::activity_from_args(&json!({})).is_err());
    }
}
