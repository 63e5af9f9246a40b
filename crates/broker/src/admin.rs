//! Commands the broker itself answers: names under `courier.`, sent with
//! an ordinary request, answered with an ordinary reply. The CLI's
//! `dead-letters` and `services` use them, so operations need no second
//! protocol (and later get the same authentication as everything else).

use std::sync::Arc;

use courier_proto::{ErrorCode, Kind, Message};
use courier_store::MessageStore;
use serde_json::{json, Value};

use crate::{Broker, ConnId, DeadLetter, Nanos};

/// Names under this prefix belong to the broker.
pub const SYSTEM_PREFIX: &str = "courier.";

type Refusal = (ErrorCode, String);

fn payload_value(m: &Message) -> Value {
    if m.payload.is_empty() {
        return Value::Null;
    }
    serde_json::from_slice(&m.payload)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&m.payload).into_owned()))
}

/// A dead letter as the CLI and the console show it; `full` adds the
/// whole envelope and the payload (JSON when it parses, else text).
pub fn dead_letter_json(d: &DeadLetter, m: Option<&Arc<Message>>, full: bool) -> Value {
    let mut v = json!({
        "id": d.seq,
        "attempts": d.attempts,
        "reason": d.reason,
        "dead_lettered_at": d.at,
    });
    match m {
        Some(m) => {
            v["name"] = json!(m.name.as_str());
            v["message_id"] = json!(m.id.to_string());
            v["sender"] = json!(m.sender.as_str());
            v["timestamp"] = json!(m.timestamp);
            if full {
                v["version"] = json!(m.version.to_string());
                v["activity_id"] = json!(m.activity_id.to_string());
                v["key"] = json!(m
                    .key
                    .as_ref()
                    .map(|k| String::from_utf8_lossy(k).into_owned()));
                v["headers"] = Value::Object(
                    m.headers
                        .iter()
                        .map(|(k, val)| (k.clone(), json!(val)))
                        .collect(),
                );
                v["payload"] = payload_value(m);
            }
        }
        None => v["unreadable"] = json!(true),
    }
    v
}

impl<S: MessageStore> Broker<S> {
    /// Answers a `courier.*` command with a reply to `conn`.
    pub(crate) fn system_command(
        &mut self,
        conn: ConnId,
        command: &Message,
        now: Nanos,
    ) -> Result<(), Refusal> {
        let args: Value = if command.payload.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&command.payload).map_err(|e| {
                (
                    ErrorCode::InvalidMessage,
                    format!("{}: payload is not JSON: {e}", command.name),
                )
            })?
        };
        let service = || -> Result<String, Refusal> {
            args.get("service")
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| {
                    (
                        ErrorCode::InvalidMessage,
                        format!("{} needs {{\"service\": NAME}}", command.name),
                    )
                })
        };
        let id = || -> Result<u64, Refusal> {
            args.get("id").and_then(Value::as_u64).ok_or_else(|| {
                (
                    ErrorCode::InvalidMessage,
                    format!("{} needs {{\"id\": N}}", command.name),
                )
            })
        };
        let (outcome, body) = match command.name.as_str() {
            "courier.dead-letters.list" => {
                let service = service()?;
                let letters: Vec<Value> = self
                    .dead_letters(&service)
                    .iter()
                    .map(|(d, m)| dead_letter_json(d, m.as_ref(), false))
                    .collect();
                ("courier.dead-letters.listing", json!(letters))
            }
            "courier.dead-letters.show" => {
                let (service, id) = (service()?, id()?);
                let letters = self.dead_letters(&service);
                let (d, m) = letters.iter().find(|(d, _)| d.seq == id).ok_or_else(|| {
                    (
                        ErrorCode::InvalidMessage,
                        format!("service {service} has no dead letter {id}"),
                    )
                })?;
                ("courier.dead-letter", dead_letter_json(d, m.as_ref(), true))
            }
            "courier.dead-letters.replay" => {
                let (service, id) = (service()?, id()?);
                self.revive(&service, id, now)
                    .map_err(|e| (ErrorCode::InvalidMessage, e))?;
                (
                    "courier.dead-letters.replayed",
                    json!({"service": service, "id": id}),
                )
            }
            "courier.dead-letters.purge" => {
                let service = service()?;
                let only = args.get("id").and_then(Value::as_u64).map(|id| vec![id]);
                let purged = self.purge(&service, only.as_deref());
                (
                    "courier.dead-letters.purged",
                    json!({"service": service, "purged": purged}),
                )
            }
            "courier.subscriptions.pause" | "courier.subscriptions.resume" => {
                let service = service()?;
                let pattern = match args.get("pattern") {
                    None | Some(Value::Null) => None,
                    Some(Value::String(p)) => Some(p.as_str()),
                    Some(_) => {
                        return Err((
                            ErrorCode::InvalidMessage,
                            format!(
                            "{}: \"pattern\" is a string (or left out for all of the service's)",
                            command.name
                        ),
                        ))
                    }
                };
                let pause = command.name.as_str() == "courier.subscriptions.pause";
                let changed = if pause {
                    self.pause_subscription(&service, pattern, now)
                } else {
                    self.resume_subscription(&service, pattern, now)
                };
                let patterns = changed.map_err(|e| {
                    let code = match e {
                        crate::PauseError::StorageFailing => ErrorCode::StorageFailed,
                        _ => ErrorCode::InvalidMessage,
                    };
                    (code, e.to_string())
                })?;
                let paused = self.paused_patterns(&service);
                (
                    if pause {
                        "courier.subscriptions.paused"
                    } else {
                        "courier.subscriptions.resumed"
                    },
                    json!({"service": service, "patterns": patterns, "paused": paused}),
                )
            }
            "courier.metrics" => {
                let m = self.metrics().clone();
                (
                    "courier.metrics.current",
                    json!({
                        "accepted": m.accepted, "refused": m.refused, "duplicates": m.duplicates,
                        "delivered": m.delivered, "redelivered": m.redelivered, "acked": m.acked,
                        "nacked": m.nacked, "dead_lettered": m.dead_lettered, "expired": m.expired,
                        "dropped_unrouted": m.dropped_unrouted,
                        "transient_dropped_paused": m.transient_dropped_paused,
                        "replies_parked": m.replies_parked,
                        "replies_dropped": m.replies_dropped, "unauthorized": m.unauthorized,
                        "rate_limited": m.rate_limited, "connections_refused": m.connections_refused,
                        "storage_failures": m.storage_failures, "unreadable_messages": m.unreadable_messages,
                        "journal_entries_dropped": m.journal_entries_dropped,
                        "frames_rejected": m.frames_rejected, "handshakes_refused": m.handshakes_refused,
                        "slow_consumers_cut": m.slow_consumers_cut, "receivers_paused": m.receivers_paused,
                        "in_flight_requests_lowered": m.in_flight_requests_lowered, "degraded": self.is_degraded(),
                        "store_len": self.store.len(),
                    }),
                )
            }
            "courier.services.list" => {
                let services: Vec<Value> = self
                    .services()
                    .into_iter()
                    .map(|s| {
                        json!({
                            "name": s.name, "patterns": s.patterns, "paused": s.paused, "instances": s.instances,
                            "backlog": s.depth, "in_flight": s.in_flight, "dead_letters": s.dead_letters,
                        })
                    })
                    .collect();
                ("courier.services.listing", json!(services))
            }
            other => {
                return Err((
                    ErrorCode::InvalidName,
                    format!(
                        "{other} is not a broker command; names under {SYSTEM_PREFIX} are reserved"
                    ),
                ))
            }
        };
        let mut reply = Message::new(
            Kind::Reply,
            outcome,
            serde_json::to_vec(&body).unwrap_or_default(),
        );
        reply.response_to = Some(command.id);
        reply.activity_id = command.activity_id;
        reply.sender = "courier".into();
        reply.timestamp = now;
        reply.is_final = true;
        reply
            .headers
            .push(("content-type".into(), "application/json".into()));
        self.deliver_untracked(conn, Arc::new(reply));
        Ok(())
    }
}
