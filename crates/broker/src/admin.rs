//! Commands the broker itself answers: names under `courier.`, sent with
//! an ordinary request, answered with an ordinary reply. The CLI's
//! `dead-letters` and `services` use them, so operations need no second
//! protocol (and later get the same authentication as everything else).

use std::sync::Arc;

use courier_proto::{ErrorCode, Kind, Message};
use courier_store::MessageStore;
use serde_json::{json, Value};

use crate::streams::ReplyFate;
use crate::{Broker, ConnId, DeadLetter, DeadLetterFound, DeadLetterQuery, Nanos};

/// Names under this prefix belong to the broker.
pub const SYSTEM_PREFIX: &str = "courier.";
/// The one broker command every connection may send, manifest or not: it
/// sets where the sender's own instance serves, in the registry.
pub const ADVERTISE_COMMAND: &str = "courier.registry.advertise";
/// Dead letters `courier.dead-letters.list` lists when not told `limit`.
pub const DEAD_LETTERS_PAGE_DEFAULT: usize = 100;
/// The largest `limit` it takes: a page reads each of its messages.
pub const DEAD_LETTERS_PAGE_MAX: usize = 1000;

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
        seq: u64,
        quiet: bool,
        command: &Message,
        now: Nanos,
    ) -> Result<ReplyFate, Refusal> {
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
            "courier.tail" => {
                let filter = crate::TailFilter::from_args(&args)?;
                self.actions.push(crate::Action::StartTail {
                    conn,
                    request: command.id,
                    activity_id: command.activity_id,
                    filter,
                });
                // The network edge answers from here on, reply by reply.
                return Ok(ReplyFate::Delivered);
            }
            "courier.trace.get" | "courier.trace.find" => {
                if !self.is_tracing() {
                    return Err((
                        ErrorCode::InvalidName,
                        format!(
                            "{}: activity traces are off on this broker (it was started with --trace off)",
                            command.name
                        ),
                    ));
                }
                let query = if command.name.as_str() == "courier.trace.get" {
                    crate::TraceQuery::activity_from_args(&args)?
                } else {
                    crate::TraceQuery::Activities(crate::ActivityFilter::from_args(
                        &args,
                        self.wall(now),
                    )?)
                };
                self.actions.push(crate::Action::TraceQuery {
                    conn,
                    request: command.id,
                    activity_id: command.activity_id,
                    query,
                });
                // The network edge answers: the traces live there.
                return Ok(ReplyFate::Delivered);
            }
            "courier.dead-letters.list"
            | "courier.dead-letters.show"
            | "courier.dead-letters.replay"
            | "courier.dead-letters.purge" => {
                let query = match command.name.as_str() {
                    "courier.dead-letters.list" => {
                        // Paging: a page by id (`limit`, so one answer
                        // reads a bounded number of messages); a page too
                        // long for one frame is cut (see `fit`). Either
                        // way the last element says after which id the
                        // rest is listed.
                        let after = match args.get("after") {
                            None | Some(Value::Null) => 0,
                            Some(v) => v.as_u64().ok_or_else(|| {
                                (
                                    ErrorCode::InvalidMessage,
                                    format!(
                                        "after must be a dead letter id (a whole number), not {v}"
                                    ),
                                )
                            })?,
                        };
                        let limit = match args.get("limit") {
                            None | Some(Value::Null) => DEAD_LETTERS_PAGE_DEFAULT,
                            Some(v) => v
                                .as_u64()
                                .filter(|n| (1..=DEAD_LETTERS_PAGE_MAX as u64).contains(n))
                                .ok_or_else(|| {
                                    (
                                        ErrorCode::InvalidMessage,
                                        format!(
                                            "limit must be a whole number from 1 to {DEAD_LETTERS_PAGE_MAX}, not {v}"
                                        ),
                                    )
                                })? as usize,
                        };
                        DeadLetterQuery::List {
                            service: service()?,
                            after,
                            limit,
                        }
                    }
                    "courier.dead-letters.show" => DeadLetterQuery::Show {
                        service: service()?,
                        id: id()?,
                    },
                    "courier.dead-letters.replay" => DeadLetterQuery::Replay {
                        service: service()?,
                        id: id()?,
                    },
                    _ => DeadLetterQuery::Purge {
                        service: service()?,
                        id: args.get("id").and_then(Value::as_u64),
                    },
                };
                if self.upstream {
                    // The backend keeps the dead letters: the edge reads
                    // them and answers (`dead_letters_answered`), the send
                    // with the reply.
                    self.actions.push(crate::Action::DeadLetterQuery {
                        conn,
                        seq,
                        quiet,
                        request: command.id,
                        activity_id: command.activity_id,
                        query,
                    });
                    return Ok(ReplyFate::Held);
                }
                self.dead_letters_here(query, now)?.answer()
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
                        "replies_dropped": m.replies_dropped, "replies_held": m.replies_held,
                        "replies_discarded": m.replies_discarded, "unauthorized": m.unauthorized,
                        "rate_limited": m.rate_limited, "connections_refused": m.connections_refused,
                        "storage_failures": m.storage_failures, "unreadable_messages": m.unreadable_messages,
                        "journal_entries_dropped": m.journal_entries_dropped,
                        "frames_rejected": m.frames_rejected, "handshakes_refused": m.handshakes_refused,
                        "slow_consumers_cut": m.slow_consumers_cut, "receivers_paused": m.receivers_paused,
                        "in_flight_requests_lowered": m.in_flight_requests_lowered, "degraded": self.is_degraded(),
                        "frame_timeouts": m.frame_timeouts, "keepalive_timeouts": m.keepalive_timeouts,
                        "connections_over_cap": m.connections_over_cap, "connections_open": m.connections_open,
                        "records_lost": m.records_lost, "messages_lost": m.messages_lost,
                        "damage_warnings_repeated": m.damage_warnings_repeated,
                        "scrub_bytes": m.scrub_bytes, "scrub_passes": m.scrub_passes,
                        "scrub_damage_found": m.scrub_damage_found,
                        "store_len": self.store.len(),
                    }),
                )
            }
            ADVERTISE_COMMAND => {
                let address = args
                    .get("address")
                    .and_then(Value::as_str)
                    .ok_or_else(|| {
                        (
                            ErrorCode::InvalidMessage,
                            format!("{} needs {{\"address\": \"HOST:PORT\"}}", command.name),
                        )
                    })?
                    .to_string();
                let meta = match args.get("meta") {
                    None | Some(Value::Null) => None,
                    Some(Value::Object(object)) => Some(
                        object
                            .iter()
                            .map(|(k, v)| {
                                let v = v.as_str().map_or_else(|| v.to_string(), str::to_string);
                                (k.clone(), v)
                            })
                            .collect(),
                    ),
                    Some(_) => {
                        return Err((
                            ErrorCode::InvalidMessage,
                            format!("{}: \"meta\" must be an object of strings", command.name),
                        ))
                    }
                };
                let Some(c) = self.conns.get(&conn) else {
                    return Ok(ReplyFate::Delivered);
                };
                let (service, instance) = (c.service.to_string(), c.instance.to_string());
                self.advertise_bus_instance(&service, &instance, address.clone(), meta)
                    .map_err(|e| (ErrorCode::InvalidMessage, format!("{}: {e}", command.name)))?;
                (
                    "courier.registry.advertised",
                    json!({"service": service, "id": instance, "address": address}),
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
                if self.upstream {
                    self.actions.push(crate::Action::ServicesQuery {
                        conn,
                        request: command.id,
                        activity_id: command.activity_id,
                        listing: json!(services),
                    });
                    // The edge answers once the other nodes said which
                    // instances they hold.
                    return Ok(ReplyFate::Delivered);
                }
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
        let reply = self.admin_reply(
            command.id,
            command.activity_id,
            &command.name,
            outcome,
            body,
            now,
        )?;
        self.deliver_untracked(conn, Arc::new(reply));
        Ok(ReplyFate::Delivered)
    }

    /// A dead-letter command answered from this broker's own queues.
    fn dead_letters_here(
        &mut self,
        query: DeadLetterQuery,
        now: Nanos,
    ) -> Result<DeadLetterFound, Refusal> {
        let unknown = |service: &str, id: u64| {
            (
                ErrorCode::InvalidMessage,
                format!("service {service} has no dead letter {id}"),
            )
        };
        Ok(match query {
            DeadLetterQuery::List {
                service,
                after,
                limit,
            } => DeadLetterFound::Listing {
                page: self.dead_letters_page(&service, after, limit),
                limit,
            },
            DeadLetterQuery::Show { service, id } => {
                let (d, m) = self
                    .find_dead_letter(&service, id)
                    .ok_or_else(|| unknown(&service, id))?;
                DeadLetterFound::Letter(d, m)
            }
            DeadLetterQuery::Replay { service, id } => {
                self.revive(&service, id, now)
                    .map_err(|e| (ErrorCode::InvalidMessage, e))?;
                DeadLetterFound::Replayed { service, id }
            }
            DeadLetterQuery::Purge { service, id } => {
                let only = id.map(|id| vec![id]);
                let purged = self.purge(&service, only.as_deref());
                DeadLetterFound::Purged { service, purged }
            }
        })
    }

    /// The broker's reply to its command `request` (named `command`):
    /// `body` fitted into one frame (see `fit`), or why it cannot be.
    pub(crate) fn admin_reply(
        &self,
        request: uuid::Uuid,
        activity_id: uuid::Uuid,
        command: &str,
        outcome: &str,
        body: Value,
        now: Nanos,
    ) -> Result<Message, Refusal> {
        let mut reply = Message::new(Kind::Reply, outcome, Vec::new());
        reply.response_to = Some(request);
        reply.activity_id = activity_id;
        reply.sender = "courier".into();
        reply.timestamp = self.wall(now);
        reply.is_final = true;
        reply
            .headers
            .push(("content-type".into(), "application/json".into()));
        let room = (self.config.frame_bytes_max as usize)
            .saturating_sub(courier_proto::delivery_frame_len(&reply));
        reply.payload = fit(body, room)
            .map_err(|len| {
                (
                    ErrorCode::PayloadTooLarge,
                    format!(
                        "the answer to {command} is {len} bytes of JSON, more than the {room} that fit in one frame under the broker's frame limit of {}",
                        self.config.frame_bytes_max
                    ),
                )
            })?
            .into();
        Ok(reply)
    }
}

/// `body` as JSON of at most `room` bytes, so that the answer's DELIVER
/// frame stays within the frame limit: a list too long is cut, ending with
/// a note that says how many of how many it shows; a dead letter whose
/// payload is too large to show loses the payload, with a note that says
/// so. `Err` with the JSON's length when even that does not fit.
fn fit(body: Value, room: usize) -> Result<Vec<u8>, usize> {
    let json = serde_json::to_vec(&body).unwrap_or_default();
    if json.len() <= room {
        return Ok(json);
    }
    match body {
        Value::Array(items) => {
            let total = items.len();
            let cut = |shown: usize| -> Vec<u8> {
                let mut list: Vec<Value> = items[..shown].to_vec();
                let after = list
                    .last()
                    .and_then(|last| last.get("id"))
                    .cloned()
                    .unwrap_or(Value::Null);
                list.push(json!({
                    "truncated": true,
                    "shown": shown,
                    "total": total,
                    "reason": "the whole list does not fit in one frame",
                    "rest_after": after,
                }));
                serde_json::to_vec(&list).unwrap_or_default()
            };
            // The longest prefix that fits, by bisection: `lo` fits, `hi` not.
            let (mut lo, mut hi) = (0, total);
            if cut(0).len() > room {
                return Err(json.len());
            }
            while hi - lo > 1 {
                let mid = lo + (hi - lo) / 2;
                if cut(mid).len() <= room {
                    lo = mid;
                } else {
                    hi = mid;
                }
            }
            Ok(cut(lo))
        }
        Value::Object(mut fields) if fields.contains_key("payload") => {
            let bytes = fields.get("payload").map_or(0, |p| {
                serde_json::to_vec(p).map_or(0, |encoded| encoded.len())
            });
            fields.insert("payload".into(), Value::Null);
            fields.insert(
                "payload_omitted".into(),
                json!(format!(
                    "the payload, {bytes} bytes as JSON, does not fit in one frame; replay the dead letter to receive it"
                )),
            );
            let json = serde_json::to_vec(&fields).unwrap_or_default();
            if json.len() <= room {
                Ok(json)
            } else {
                Err(json.len())
            }
        }
        _ => Err(json.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_that_fit_are_whole_and_longer_lists_are_cut_with_a_note() {
        let list = Value::Array(
            (1..=10)
                .map(|id| json!({"id": id, "pad": "x".repeat(40)}))
                .collect(),
        );
        let whole = serde_json::to_vec(&list).expect("json");
        assert_eq!(fit(list.clone(), whole.len()), Ok(whole.clone()));
        let room = 300;
        let cut = fit(list, room).expect("fits cut");
        assert!(cut.len() <= room);
        let cut: Value = serde_json::from_slice(&cut).expect("json");
        let items = cut.as_array().expect("a list");
        let note = items.last().expect("a note");
        assert_eq!(note["truncated"], true);
        assert_eq!(note["total"], 10);
        let shown = note["shown"].as_u64().expect("shown") as usize;
        assert_eq!(items.len(), shown + 1);
        assert!((1..10).contains(&shown), "{shown}");
        assert_eq!(note["rest_after"], items[shown - 1]["id"]);
    }

    #[test]
    fn a_payload_too_large_to_show_is_left_out_with_a_note() {
        let letter = json!({"id": 4, "payload": "x".repeat(1000)});
        let fitted = fit(letter, 300).expect("fits without the payload");
        assert!(fitted.len() <= 300);
        let fitted: Value = serde_json::from_slice(&fitted).expect("json");
        assert_eq!(fitted["id"], 4);
        assert_eq!(fitted["payload"], Value::Null);
        assert!(fitted["payload_omitted"]
            .as_str()
            .expect("a note")
            .contains("1002 bytes"));
        assert_eq!(fit(json!({"a": "y".repeat(100)}), 50), Err(108));
    }
}
