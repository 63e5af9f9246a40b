//! The live tail: a copy of every message the broker accepts, replies
//! included, with the services chosen to receive it — for watching, never
//! for consuming. A tail is not a subscription: it takes no deliveries,
//! changes no routing (a command nobody receives is still refused with
//! `no_receiver`), and keeps no backlog once it is gone.
//!
//! The core only records what it accepted while someone tails
//! ([`crate::Broker::set_tapping`]); the network edge fans the records out
//! to each tail, dropping lines (and saying how many) for a tail that
//! cannot keep up rather than slowing the bus.

use std::sync::Arc;

use courier_proto::{pattern_matches, validate_pattern, ErrorCode, Kind, Message};
use serde_json::{json, Value};

/// One accepted message as the tail sees it.
#[derive(Debug, Clone)]
pub struct Tapped {
    pub message: Arc<Message>,
    /// The services chosen to receive it: a command's or an event's
    /// subscribed services, a reply's requesting service; empty for an
    /// event nobody subscribes to (kept for retention only) and for the
    /// broker's own commands.
    pub receivers: Arc<[String]>,
}

/// What one tail wants to see.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TailFilter {
    /// A name pattern (`todo.*`, `>`); `None` is every name.
    pub pattern: Option<String>,
    /// Only messages this service sent or is to receive.
    pub service: Option<String>,
    pub kind: Option<Kind>,
    /// Include payloads (as JSON when they parse, else as text).
    pub payload: bool,
}

impl TailFilter {
    /// Reads `{"pattern", "service", "kind", "payload"}` (all optional).
    pub fn from_args(args: &Value) -> Result<TailFilter, (ErrorCode, String)> {
        let text = |field: &str| -> Result<Option<String>, (ErrorCode, String)> {
            match args.get(field) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) if s.is_empty() => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(other) => Err((
                    ErrorCode::InvalidMessage,
                    format!("courier.tail: {field} must be a string, not {other}"),
                )),
            }
        };
        let pattern = text("pattern")?;
        if let Some(p) = &pattern {
            validate_pattern(p).map_err(|e| {
                (
                    ErrorCode::InvalidPattern,
                    format!("courier.tail: pattern {p:?}: {e}"),
                )
            })?;
        }
        let kind = match text("kind")?.as_deref() {
            None => None,
            Some("command") => Some(Kind::Command),
            Some("event") => Some(Kind::Event),
            Some("reply") => Some(Kind::Reply),
            Some(other) => {
                return Err((
                    ErrorCode::InvalidMessage,
                    format!("courier.tail: kind {other:?} is not command, reply or event"),
                ))
            }
        };
        Ok(TailFilter {
            pattern,
            service: text("service")?,
            kind,
            payload: args
                .get("payload")
                .and_then(Value::as_bool)
                .unwrap_or(false),
        })
    }

    pub fn matches(&self, tapped: &Tapped) -> bool {
        let m = &tapped.message;
        if self.kind.is_some_and(|k| k != m.kind) {
            return false;
        }
        if let Some(pattern) = &self.pattern {
            if !pattern_matches(pattern, &m.name) {
                return false;
            }
        }
        if let Some(service) = &self.service {
            if m.sender != *service && !tapped.receivers.iter().any(|r| r == service) {
                return false;
            }
        }
        true
    }

    /// The tail's JSON line for a message (envelope field names, as the
    /// CLI prints messages elsewhere).
    pub fn line(&self, tapped: &Tapped) -> Value {
        let m = &tapped.message;
        let mut line = json!({
            "id": m.id.to_string(),
            "name": m.name.as_str(),
            "kind": m.kind.as_str(),
            "version": m.version.to_string(),
            "sender": m.sender.as_str(),
            "receivers": tapped.receivers.as_ref(),
            "activity_id": m.activity_id.to_string(),
            "parent_id": m.parent_id.map(|p| p.to_string()),
            "timestamp": m.timestamp,
            "transient": m.transient,
        });
        if let Some(command) = m.response_to {
            line["response_to"] = json!(command.to_string());
        }
        if m.kind == Kind::Reply {
            line["outcome"] = json!(m.name.as_str());
            line["final"] = json!(m.is_final);
        }
        if let Some(key) = &m.key {
            line["key"] = json!(String::from_utf8_lossy(key));
        }
        if let Some(t) = m.expires_at {
            line["expires_at"] = json!(t);
        }
        if let Some(t) = m.deliver_at {
            line["deliver_at"] = json!(t);
        }
        if !m.headers.is_empty() {
            line["headers"] = Value::Object(
                m.headers
                    .iter()
                    .map(|(k, v)| (k.clone(), json!(v)))
                    .collect(),
            );
        }
        if self.payload {
            line["payload"] = if m.payload.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&m.payload).unwrap_or_else(|_| {
                    Value::String(String::from_utf8_lossy(&m.payload).into_owned())
                })
            };
        }
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tapped(kind: Kind, name: &str, sender: &str, receivers: &[&str]) -> Tapped {
        let mut m = Message::new(kind, name, "{\"n\":1}");
        m.sender = sender.into();
        Tapped {
            message: Arc::new(m),
            receivers: receivers.iter().map(|r| r.to_string()).collect(),
        }
    }

    #[test]
    fn filters_by_pattern_service_and_kind() {
        let filter =
            TailFilter::from_args(&json!({"pattern": "todo.*", "service": "todo"})).expect("valid");
        assert!(filter.matches(&tapped(Kind::Command, "todo.create", "web", &["todo"])));
        assert!(filter.matches(&tapped(Kind::Reply, "todo.created", "todo", &["web"])));
        assert!(!filter.matches(&tapped(Kind::Command, "todo.create", "web", &["other"])));
        assert!(!filter.matches(&tapped(Kind::Event, "user.created", "todo", &[])));
        let replies = TailFilter::from_args(&json!({"kind": "reply"})).expect("valid");
        assert!(replies.matches(&tapped(Kind::Reply, "a.b", "x", &[])));
        assert!(!replies.matches(&tapped(Kind::Event, "a.b", "x", &[])));
        assert!(TailFilter::default().matches(&tapped(Kind::Event, "a.b", "x", &[])));
    }

    #[test]
    fn bad_filters_are_refused_with_the_reason() {
        let bad = TailFilter::from_args(&json!({"kind": "query"}));
        assert!(matches!(bad, Err((ErrorCode::InvalidMessage, ref r)) if r.contains("query")));
        let bad = TailFilter::from_args(&json!({"pattern": "a..b"}));
        assert!(
            matches!(bad, Err((ErrorCode::InvalidPattern, _))),
            "{bad:?}"
        );
        let bad = TailFilter::from_args(&json!({"service": 3}));
        assert!(matches!(bad, Err((ErrorCode::InvalidMessage, _))));
    }

    #[test]
    fn a_line_carries_the_envelope_and_payload_only_when_asked() {
        let t = tapped(Kind::Reply, "todo.created", "todo", &["web"]);
        let plain = TailFilter::default().line(&t);
        assert_eq!(plain["name"], "todo.created");
        assert_eq!(plain["outcome"], "todo.created");
        assert_eq!(plain["receivers"], json!(["web"]));
        assert_eq!(plain["sender"], "todo");
        assert_eq!(plain["parent_id"], Value::Null, "a root message has none");
        assert!(plain.get("payload").is_none());
        let mut caused = Message::clone(&t.message);
        let parent = courier_proto::new_id();
        caused.parent_id = Some(parent);
        let caused = Tapped {
            message: Arc::new(caused),
            receivers: t.receivers.clone(),
        };
        assert_eq!(
            TailFilter::default().line(&caused)["parent_id"],
            parent.to_string()
        );
        let with = TailFilter {
            payload: true,
            ..TailFilter::default()
        };
        assert_eq!(with.line(&t)["payload"], json!({"n": 1}));
    }
}
