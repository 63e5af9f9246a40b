//! Delivery rules, tested without sockets or clocks.

use super::*;
use bytes::Bytes;
use courier_store::{MemoryLog, MemoryStore};
use proptest::prelude::*;

const MS: Nanos = NANOS_PER_MS;

struct Harness<S: MessageStore = MemoryStore> {
    broker: Broker<S>,
    now: Nanos,
}

impl Harness {
    fn new() -> Harness {
        Harness::with_store(MemoryStore::new())
    }
}

impl<S: MessageStore> Harness<S> {
    fn with_store(store: S) -> Harness<S> {
        Harness {
            broker: Broker::new(Config::default(), store),
            now: 1_000 * MS,
        }
    }

    fn connect(&mut self, conn: ConnId, service: &str, max_in_flight: u32) {
        self.broker
            .connect(conn, service, &format!("{service}-{conn}"), max_in_flight);
    }

    fn subscribe(&mut self, conn: ConnId, pattern: &str) {
        self.broker
            .subscribe(conn, 0, pattern, 0, 0, StartFrom::New, self.now);
    }

    fn send(&mut self, conn: ConnId, seq: u64, message: Message) {
        self.broker.send(conn, seq, message, self.now);
    }

    fn advance(&mut self, ms: u64) {
        self.now += ms * MS;
        self.broker.tick(self.now);
    }

    fn actions(&mut self) -> Vec<Action> {
        // As the server does after every pass; debug builds check its
        // answer against every service's queue.
        self.broker.next_timer();
        let mut out = Vec::new();
        self.broker.take_actions(&mut out);
        out
    }

    /// (conn, delivery, attempt, name, payload) of every delivery since last call.
    fn deliveries(&mut self) -> Vec<(ConnId, DeliveryId, u32, String, Bytes)> {
        self.actions()
            .into_iter()
            .filter_map(|a| match a {
                Action::Deliver {
                    conn,
                    delivery,
                    attempt,
                    message,
                    ..
                } => Some((
                    conn,
                    delivery,
                    attempt,
                    message.name.to_string(),
                    message.payload.clone(),
                )),
                _ => None,
            })
            .collect()
    }
}

fn command(name: &str, payload: &'static str) -> Message {
    Message::new(Kind::Command, name, payload)
}

fn event(name: &str, payload: &'static str) -> Message {
    Message::new(Kind::Event, name, payload)
}

fn results(actions: &[Action]) -> Vec<(u64, ErrorCode)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::SendResult { seq, code, .. } => Some((*seq, *code)),
            _ => None,
        })
        .collect()
}

mod clocks;
mod contracts;
mod dead_letter_pages;
mod frame_limit;
mod limits;
mod model;
mod pausing;
mod pipelined_keys;
mod recovery;
mod registry;
mod reply_stream_model;
mod reply_streams;
mod routing_index;
mod rules;
mod upstream;

fn payloads(deliveries: &[(ConnId, DeliveryId, u32, String, Bytes)]) -> Vec<Bytes> {
    deliveries.iter().map(|d| d.4.clone()).collect()
}

fn refusal(actions: &[Action], seq: u64) -> (ErrorCode, String) {
    actions
        .iter()
        .find_map(|a| match a {
            Action::SendResult {
                seq: s,
                code,
                reason,
                ..
            } if *s == seq => Some((*code, reason.clone())),
            _ => None,
        })
        .expect("a send result")
}

/// A `file.copy` command whose replies are a stream with `window` credit.
fn stream_command(window: &str) -> Message {
    let mut m = command("file.copy", "{}");
    m.headers
        .push((REPLY_WINDOW_HEADER.to_string(), window.to_string()));
    m
}

fn reply_to(command: Uuid, payload: &str, is_final: bool) -> Message {
    let mut r = Message::new(Kind::Reply, "file.copy.progress", payload.to_string());
    r.response_to = Some(command);
    r.is_final = is_final;
    r
}

fn delivery_ids(actions: &[Action], to: ConnId) -> Vec<DeliveryId> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Deliver { conn, delivery, .. } if *conn == to => Some(*delivery),
            _ => None,
        })
        .collect()
}

/// (conn, payload) of each delivery.
fn delivered_to(actions: &[Action]) -> Vec<(ConnId, String)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Deliver { conn, message, .. } => Some((
                *conn,
                String::from_utf8_lossy(&message.payload).into_owned(),
            )),
            _ => None,
        })
        .collect()
}

fn keyed(name: &str, key: &'static str, payload: &'static str) -> Message {
    let mut m = command(name, payload);
    m.key = Some(Bytes::from_static(key.as_bytes()));
    m
}
