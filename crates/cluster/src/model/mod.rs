//! A model of the JetStream calls a Courier node makes, for deterministic
//! tests (docs/SCALE-OUT.md §16): streams with the duplicate window,
//! durable pull consumers with filters, `ack_wait` redelivery, ACK, NAK
//! with delay, in-progress and `max_ack_pending`, and KV buckets with
//! revisions and max age.
//!
//! Sans-I/O, as the broker core: every call carries the time (`now`, in
//! milliseconds since the model began), so a test moves time by passing a
//! later `now` and nothing sleeps. What it models was checked against
//! nats-server 2.15.1 (`tests/cluster_model.rs` runs one scenario on both
//! and compares every answer). It models one healthy cluster: quorum loss,
//! leader changes and stale direct gets are the real cluster tests' ground.

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;

mod kv;

use kv::Bucket;

/// Milliseconds since the model began.
pub type Millis = u64;

/// A publish's acknowledgement, as a PubAck says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PubAck {
    pub seq: u64,
    /// The id was stored within the window: nothing new was stored and
    /// `seq` is the first copy's.
    pub duplicate: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    #[error("no stream takes subject {0}")]
    NoStream(String),
    #[error("no stream {0}")]
    UnknownStream(String),
    #[error("no consumer {consumer} on stream {stream}")]
    UnknownConsumer { stream: String, consumer: String },
    #[error("no bucket {0}")]
    UnknownBucket(String),
    /// A compare-and-set found another revision (`wrong last sequence`).
    #[error("wrong last revision for {key}: expected {expected}, it is {actual}")]
    WrongRevision {
        key: String,
        expected: u64,
        actual: u64,
    },
}

/// A stream's settings the model honours.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamSpec {
    pub name: String,
    /// Subject filters (`*`, `>` as in NATS).
    pub subjects: Vec<String>,
    pub duplicate_window: Millis,
    /// `max_msgs_per_subject` with `discard: old`; `None`: no limit.
    pub max_msgs_per_subject: Option<usize>,
}

/// A durable pull consumer's settings the model honours.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsumerSpec {
    pub name: String,
    /// Empty: every subject of the stream.
    pub filter_subjects: Vec<String>,
    pub ack_wait: Millis,
    pub max_ack_pending: usize,
    /// `deliver_policy: new` (true) or `all`.
    pub deliver_new: bool,
}

/// One message handed out by a fetch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    pub stream_seq: u64,
    pub subject: String,
    pub payload: Bytes,
    /// `num_delivered`: 1 on the first delivery.
    pub delivered: u32,
}

/// A consumer's counters, as its info reports them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConsumerState {
    /// The last stream seq delivered (messages the filter skipped do not
    /// count).
    pub delivered_stream_seq: u64,
    /// Every message at or below this was acked (or skipped by the filter).
    pub ack_floor_stream_seq: u64,
    pub num_ack_pending: usize,
    /// Matching messages not yet delivered.
    pub num_pending: usize,
}

#[derive(Clone, Debug)]
struct Stored {
    subject: String,
    payload: Bytes,
}

#[derive(Clone, Debug)]
struct Outstanding {
    delivered: u32,
    /// Redelivered from then on (its ack deadline, or its NAK delay).
    due: Millis,
}

#[derive(Clone, Debug)]
struct Consumer {
    spec: ConsumerSpec,
    /// The next stream seq not yet looked at.
    next_seq: u64,
    /// The last stream seq delivered: messages the filter skipped do not
    /// move it (as on the server; the reclaimer of SCALE-OUT.md §3 relies
    /// on knowing that).
    last_delivered: u64,
    outstanding: BTreeMap<u64, Outstanding>,
}

#[derive(Clone, Debug)]
struct Stream {
    spec: StreamSpec,
    messages: BTreeMap<u64, Stored>,
    last_seq: u64,
    /// Message id → (seq, stored at).
    ids: HashMap<String, (u64, Millis)>,
    consumers: BTreeMap<String, Consumer>,
}

/// The whole modelled account: streams (with their consumers) and
/// buckets.
#[derive(Clone, Debug, Default)]
pub struct JetStreamModel {
    streams: BTreeMap<String, Stream>,
    buckets: BTreeMap<String, Bucket>,
}

/// Whether NATS subject `subject` matches filter `filter`.
pub fn subject_matches(filter: &str, subject: &str) -> bool {
    let mut f = filter.split('.');
    let mut s = subject.split('.');
    loop {
        match (f.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

impl Stream {
    fn matches(&self, consumer: &ConsumerSpec, subject: &str) -> bool {
        consumer.filter_subjects.is_empty()
            || consumer
                .filter_subjects
                .iter()
                .any(|f| subject_matches(f, subject))
    }

    fn forget_old_ids(&mut self, now: Millis) {
        let window = self.spec.duplicate_window;
        self.ids
            .retain(|_, (_, at)| at.saturating_add(window) > now);
    }
}

impl JetStreamModel {
    pub fn new() -> JetStreamModel {
        JetStreamModel::default()
    }

    /// Creates a stream; an existing one of that name is kept as it is.
    pub fn add_stream(&mut self, spec: StreamSpec) {
        self.streams.entry(spec.name.clone()).or_insert(Stream {
            spec,
            messages: BTreeMap::new(),
            last_seq: 0,
            ids: HashMap::new(),
            consumers: BTreeMap::new(),
        });
    }

    /// Creates a durable consumer; an existing one keeps its position and
    /// takes the new settings (JetStream's create-or-update).
    pub fn add_consumer(&mut self, stream: &str, spec: ConsumerSpec) -> Result<(), ModelError> {
        let s = self
            .streams
            .get_mut(stream)
            .ok_or_else(|| ModelError::UnknownStream(stream.to_string()))?;
        let next_seq = if spec.deliver_new { s.last_seq + 1 } else { 1 };
        s.consumers
            .entry(spec.name.clone())
            .and_modify(|c| c.spec = spec.clone())
            .or_insert(Consumer {
                spec,
                next_seq,
                last_delivered: next_seq - 1,
                outstanding: BTreeMap::new(),
            });
        Ok(())
    }

    /// Publishes with an optional `Nats-Msg-Id`: stored unless the id was
    /// stored within the stream's duplicate window.
    pub fn publish(
        &mut self,
        subject: &str,
        msg_id: Option<&str>,
        payload: Bytes,
        now: Millis,
    ) -> Result<PubAck, ModelError> {
        let stream = self
            .streams
            .values_mut()
            .find(|s| s.spec.subjects.iter().any(|f| subject_matches(f, subject)))
            .ok_or_else(|| ModelError::NoStream(subject.to_string()))?;
        stream.forget_old_ids(now);
        if let Some(id) = msg_id {
            if let Some((seq, _)) = stream.ids.get(id) {
                return Ok(PubAck {
                    seq: *seq,
                    duplicate: true,
                });
            }
        }
        stream.last_seq += 1;
        let seq = stream.last_seq;
        stream.messages.insert(
            seq,
            Stored {
                subject: subject.to_string(),
                payload,
            },
        );
        if let Some(id) = msg_id {
            stream.ids.insert(id.to_string(), (seq, now));
        }
        if let Some(limit) = stream.spec.max_msgs_per_subject {
            let of_subject: Vec<u64> = stream
                .messages
                .iter()
                .filter(|(_, m)| m.subject == subject)
                .map(|(seq, _)| *seq)
                .collect();
            for old in &of_subject[..of_subject.len().saturating_sub(limit)] {
                stream.messages.remove(old);
            }
        }
        Ok(PubAck {
            seq,
            duplicate: false,
        })
    }

    fn consumer_mut(
        &mut self,
        stream: &str,
        consumer: &str,
    ) -> Result<(&mut Stream, String), ModelError> {
        let s = self
            .streams
            .get_mut(stream)
            .ok_or_else(|| ModelError::UnknownStream(stream.to_string()))?;
        if !s.consumers.contains_key(consumer) {
            return Err(ModelError::UnknownConsumer {
                stream: stream.to_string(),
                consumer: consumer.to_string(),
            });
        }
        Ok((s, consumer.to_string()))
    }

    /// A pull of at most `max` messages: those due again (deadline passed
    /// or NAK delay over) first, in stream order, then new ones in stream
    /// order while fewer than `max_ack_pending` are outstanding.
    pub fn fetch(
        &mut self,
        stream: &str,
        consumer: &str,
        max: usize,
        now: Millis,
    ) -> Result<Vec<Delivery>, ModelError> {
        let (s, name) = self.consumer_mut(stream, consumer)?;
        let Stream {
            messages,
            consumers,
            last_seq,
            ..
        } = s;
        let Some(c) = consumers.get_mut(&name) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        let due: Vec<u64> = c
            .outstanding
            .iter()
            .filter(|(_, o)| o.due <= now)
            .map(|(seq, _)| *seq)
            .collect();
        for seq in due {
            if out.len() == max {
                return Ok(out);
            }
            let Some(message) = messages.get(&seq) else {
                // Purged or removed while outstanding: nothing to redeliver.
                c.outstanding.remove(&seq);
                continue;
            };
            if let Some(o) = c.outstanding.get_mut(&seq) {
                o.delivered += 1;
                o.due = now + c.spec.ack_wait;
                out.push(Delivery {
                    stream_seq: seq,
                    subject: message.subject.clone(),
                    payload: message.payload.clone(),
                    delivered: o.delivered,
                });
            }
        }
        while out.len() < max
            && c.outstanding.len() < c.spec.max_ack_pending
            && c.next_seq <= *last_seq
        {
            let seq = c.next_seq;
            c.next_seq += 1;
            let Some(message) = messages.get(&seq) else {
                continue;
            };
            let matches = c.spec.filter_subjects.is_empty()
                || c.spec
                    .filter_subjects
                    .iter()
                    .any(|f| subject_matches(f, &message.subject));
            if !matches {
                continue;
            }
            c.last_delivered = seq;
            c.outstanding.insert(
                seq,
                Outstanding {
                    delivered: 1,
                    due: now + c.spec.ack_wait,
                },
            );
            out.push(Delivery {
                stream_seq: seq,
                subject: message.subject.clone(),
                payload: message.payload.clone(),
                delivered: 1,
            });
        }
        Ok(out)
    }

    /// `+ACK`: the message is done for this consumer. An ack of a message
    /// not outstanding (acked already) changes nothing; returns whether it
    /// was outstanding.
    pub fn ack(&mut self, stream: &str, consumer: &str, seq: u64) -> Result<bool, ModelError> {
        let (s, name) = self.consumer_mut(stream, consumer)?;
        Ok(s.consumers
            .get_mut(&name)
            .is_some_and(|c| c.outstanding.remove(&seq).is_some()))
    }

    /// `-NAK` with a delay: redelivered no sooner than `now + delay`.
    pub fn nak(
        &mut self,
        stream: &str,
        consumer: &str,
        seq: u64,
        delay: Millis,
        now: Millis,
    ) -> Result<bool, ModelError> {
        self.set_due(stream, consumer, seq, now + delay)
    }

    /// `+WPI`: the ack deadline starts over.
    pub fn in_progress(
        &mut self,
        stream: &str,
        consumer: &str,
        seq: u64,
        now: Millis,
    ) -> Result<bool, ModelError> {
        let ack_wait = self
            .streams
            .get(stream)
            .and_then(|s| s.consumers.get(consumer))
            .map_or(0, |c| c.spec.ack_wait);
        self.set_due(stream, consumer, seq, now + ack_wait)
    }

    fn set_due(
        &mut self,
        stream: &str,
        consumer: &str,
        seq: u64,
        due: Millis,
    ) -> Result<bool, ModelError> {
        let (s, name) = self.consumer_mut(stream, consumer)?;
        let Some(o) = s
            .consumers
            .get_mut(&name)
            .and_then(|c| c.outstanding.get_mut(&seq))
        else {
            return Ok(false);
        };
        o.due = due;
        Ok(true)
    }

    /// The consumer's counters, as its info reports them.
    pub fn consumer_state(
        &self,
        stream: &str,
        consumer: &str,
    ) -> Result<ConsumerState, ModelError> {
        let s = self
            .streams
            .get(stream)
            .ok_or_else(|| ModelError::UnknownStream(stream.to_string()))?;
        let c = s
            .consumers
            .get(consumer)
            .ok_or_else(|| ModelError::UnknownConsumer {
                stream: stream.to_string(),
                consumer: consumer.to_string(),
            })?;
        let delivered_stream_seq = c.last_delivered;
        let ack_floor_stream_seq = c
            .outstanding
            .keys()
            .next()
            .map_or(delivered_stream_seq, |first| first - 1);
        let num_pending = s
            .messages
            .range(c.next_seq..)
            .filter(|(_, m)| s.matches(&c.spec, &m.subject))
            .count();
        Ok(ConsumerState {
            delivered_stream_seq,
            ack_floor_stream_seq,
            num_ack_pending: c.outstanding.len(),
            num_pending,
        })
    }

    /// Removes every message below `seq` (a purge request with `seq`).
    pub fn purge_below(&mut self, stream: &str, seq: u64) -> Result<usize, ModelError> {
        let s = self
            .streams
            .get_mut(stream)
            .ok_or_else(|| ModelError::UnknownStream(stream.to_string()))?;
        let keep = s.messages.split_off(&seq);
        let purged = s.messages.len();
        s.messages = keep;
        Ok(purged)
    }

    /// The stream's stored messages, as (seq, subject, payload).
    pub fn messages(&self, stream: &str) -> Vec<(u64, String, Bytes)> {
        self.streams.get(stream).map_or_else(Vec::new, |s| {
            s.messages
                .iter()
                .map(|(seq, m)| (*seq, m.subject.clone(), m.payload.clone()))
                .collect()
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails, which is its point
mod tests {
    use super::*;

    const S: &str = "COURIER_MSGS";

    fn model() -> JetStreamModel {
        let mut m = JetStreamModel::new();
        m.add_stream(StreamSpec {
            name: S.into(),
            subjects: vec!["courier.m.>".into()],
            duplicate_window: 120_000,
            max_msgs_per_subject: None,
        });
        m.add_consumer(
            S,
            ConsumerSpec {
                name: "svc-todo".into(),
                filter_subjects: vec!["courier.m.c.todo.*".into()],
                ack_wait: 1_000,
                max_ack_pending: 2,
                deliver_new: true,
            },
        )
        .unwrap();
        m
    }

    fn seqs(d: &[Delivery]) -> Vec<(u64, u32)> {
        d.iter().map(|d| (d.stream_seq, d.delivered)).collect()
    }

    #[test]
    fn subjects_match_as_in_nats() {
        assert!(subject_matches("a.*.c", "a.b.c"));
        assert!(subject_matches("a.>", "a.b.c"));
        assert!(!subject_matches("a.>", "a"));
        assert!(!subject_matches("a.*", "a.b.c"));
        assert!(subject_matches("a.b", "a.b"));
        assert!(!subject_matches("a.b", "a.bc"));
    }

    #[test]
    fn a_resent_id_within_the_window_is_acknowledged_and_dropped() {
        let mut m = model();
        let first = m
            .publish("courier.m.c.todo.create", Some("x"), "1".into(), 0)
            .unwrap();
        let again = m
            .publish("courier.m.c.todo.create", Some("x"), "1".into(), 119_999)
            .unwrap();
        assert_eq!(
            again,
            PubAck {
                seq: first.seq,
                duplicate: true
            }
        );
        assert_eq!(m.messages(S).len(), 1);
        let later = m
            .publish("courier.m.c.todo.create", Some("x"), "1".into(), 120_000)
            .unwrap();
        assert!(!later.duplicate && later.seq == 2, "the window is over");
        assert_eq!(
            m.publish("other.x", None, "".into(), 0),
            Err(ModelError::NoStream("other.x".into()))
        );
    }

    #[test]
    fn deliveries_come_back_after_ack_wait_or_their_nak_delay() {
        let mut m = model();
        for i in 0..3 {
            m.publish("courier.m.c.todo.create", None, format!("{i}").into(), 0)
                .unwrap();
        }
        m.publish("courier.m.c.other.create", None, "x".into(), 0)
            .unwrap();
        // max_ack_pending 2: the third waits.
        let d = m.fetch(S, "svc-todo", 10, 0).unwrap();
        assert_eq!(seqs(&d), [(1, 1), (2, 1)]);
        assert!(m.fetch(S, "svc-todo", 10, 999).unwrap().is_empty());
        assert!(m.ack(S, "svc-todo", 1).unwrap());
        assert!(!m.ack(S, "svc-todo", 1).unwrap(), "acked once");
        assert!(m.nak(S, "svc-todo", 2, 500, 10).unwrap());
        assert_eq!(seqs(&m.fetch(S, "svc-todo", 10, 11).unwrap()), [(3, 1)]);
        assert_eq!(seqs(&m.fetch(S, "svc-todo", 10, 510).unwrap()), [(2, 2)]);
        // Nothing acked: both come back after ack_wait, in stream order.
        assert!(m.in_progress(S, "svc-todo", 3, 900).unwrap());
        assert_eq!(seqs(&m.fetch(S, "svc-todo", 10, 1_510).unwrap()), [(2, 3)]);
        assert_eq!(seqs(&m.fetch(S, "svc-todo", 10, 1_900).unwrap()), [(3, 2)]);
        let state = m.consumer_state(S, "svc-todo").unwrap();
        assert_eq!(
            state,
            ConsumerState {
                delivered_stream_seq: 3,
                ack_floor_stream_seq: 1,
                num_ack_pending: 2,
                num_pending: 0
            }
        );
        // All acked, the non-matching seq 4 looked at: neither counter
        // moves past the last match.
        m.ack(S, "svc-todo", 2).unwrap();
        m.ack(S, "svc-todo", 3).unwrap();
        assert!(m.fetch(S, "svc-todo", 10, 2_000).unwrap().is_empty());
        let state = m.consumer_state(S, "svc-todo").unwrap();
        assert_eq!(
            (state.delivered_stream_seq, state.ack_floor_stream_seq),
            (3, 3)
        );
    }

    #[test]
    fn a_parked_subject_keeps_its_newest_messages() {
        let mut m = JetStreamModel::new();
        m.add_stream(StreamSpec {
            name: "COURIER_PARKED".into(),
            subjects: vec!["courier.p.>".into()],
            duplicate_window: 0,
            max_msgs_per_subject: Some(2),
        });
        for i in 0..3 {
            m.publish("courier.p.web", None, format!("{i}").into(), 0)
                .unwrap();
        }
        m.publish("courier.p.other", None, "o".into(), 0).unwrap();
        let kept: Vec<u64> = m
            .messages("COURIER_PARKED")
            .iter()
            .map(|(s, _, _)| *s)
            .collect();
        assert_eq!(kept, [2, 3, 4]);
        assert_eq!(m.purge_below("COURIER_PARKED", 4).unwrap(), 2);
    }
}
