//! The trace index: every traced activity's records, grouped by
//! activity id, bounded in age (`retention`) and in memory (`bytes_max`).
//!
//! Memory: an activity costs [`ACTIVITY_FIXED_BYTES`] plus the capacity
//! of its record buffer, and each stored message of it
//! [`SEQ_ENTRY_BYTES`] for the map from store seq to activity; the index
//! sums these (`bytes`) and evicts whole activities, oldest first, while
//! the sum is over `bytes_max`, and those started longer than `retention`
//! ago. The constants count a hash table's worst slack (it doubles), so
//! the sum bounds what is really allocated (a test measures it).
//!
//! Sampling happens before any record is made, in the broker core
//! (`courier_broker::TraceSampler`): what reaches the index is kept.

use std::collections::VecDeque;
use std::mem::size_of;

use courier_broker::{ActivityFilter, FastMap, Nanos, Outcome, TraceRecord, DEAD_LETTERED};
use courier_proto::{pattern_matches, Kind};
use serde_json::{json, Value};
use uuid::Uuid;

use super::record::{self, Record};
use super::tree;

/// What one traced activity holds besides its records.
struct Activity {
    first_at: Nanos,
    last_at: Nanos,
    /// The first message's name.
    name: String,
    messages: u32,
    /// Final replies' names, each once, at most `OUTCOMES_KEPT_MAX`.
    outcomes: Vec<String>,
    dead_lettered: bool,
    /// Encoded records (`record.rs`), end to end, in the order they came.
    records: Vec<u8>,
    /// Stored messages of it (seq → this activity in `seqs`).
    stored: u32,
    /// Records left out once it held `ACTIVITY_RECORDS_BYTES_MAX`.
    dropped: u32,
    /// What it counts for in the index's `bytes`.
    cost: usize,
}

/// Room a growing record buffer gets beyond the record that needs it
/// (and a quarter of what it holds).
const RECORDS_SLACK_BYTES: usize = 32;
/// The most record bytes one activity keeps (some 5,000 messages with
/// their deliveries): one endless activity (a long stream, a batch job)
/// must not push every other out, nor make a tree too large to send.
pub(crate) const ACTIVITY_RECORDS_BYTES_MAX: usize = 1024 * 1024;
/// Final outcomes an activity summary lists.
const OUTCOMES_KEPT_MAX: usize = 8;

/// Bytes one activity costs besides its records and names: the boxed
/// struct, its slot in the id map and its place in the eviction queue,
/// the map and queue counted at twice their entries (both double when
/// they grow).
pub(crate) const ACTIVITY_FIXED_BYTES: usize =
    size_of::<Activity>() + 2 * (size_of::<(Uuid, Box<Activity>)>() + 1) + 2 * size_of::<Uuid>();
/// Bytes one stored message costs in the seq → activity map (a hash
/// table entry and its control byte, at its worst load after doubling).
pub(crate) const SEQ_ENTRY_BYTES: usize = (size_of::<(u64, Uuid)>() + 1) * 16 / 7;

/// Accepted messages a second above which activities are sampled
/// (`--trace-rate`), unless 0 (trace everything).
pub(crate) const TRACE_RATE_DEFAULT: u32 = 2_000;

#[derive(Debug, Clone)]
pub(crate) struct IndexConfig {
    pub retention_ns: Nanos,
    pub bytes_max: usize,
    pub payloads: bool,
    /// On a cluster: a delivery of an activity this node never saw
    /// accepted (another node accepted it) files the activity here too;
    /// a query merges every node's part. On one broker such a delivery
    /// belongs to an activity the sampler skipped, and is not kept.
    pub deliveries_of_unseen: bool,
}

/// Counters for `/metrics`; they only go up.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct IndexStats {
    pub messages_traced: u64,
    /// Records left out of activities over `ACTIVITY_RECORDS_BYTES_MAX`.
    pub records_truncated: u64,
    /// Records of messages the index does not hold (skipped, evicted).
    pub records_unmatched: u64,
    pub evicted_retention: u64,
    pub evicted_size: u64,
}

/// What filing a record changes besides the record bytes.
enum Filed<'a> {
    Accepted {
        name: &'a str,
        seq: u64,
        final_reply: bool,
    },
    /// On a cluster, a delivery names the seq its node holds the
    /// message under, which outcomes name (see `deliveries_of_unseen`).
    Delivered {
        name: &'a str,
        seq: u64,
    },
    Event {
        dead: bool,
    },
}

impl Filed<'_> {
    fn is_accepted(&self) -> bool {
        matches!(self, Filed::Accepted { .. })
    }
}

impl Activity {
    /// What it holds on the heap and in the seq map (it only grows).
    fn heap_bytes(&self) -> usize {
        self.records.capacity()
            + self.name.capacity()
            + self.outcomes.capacity() * size_of::<String>()
            + self.outcomes.iter().map(String::capacity).sum::<usize>()
            + self.stored as usize * SEQ_ENTRY_BYTES
    }
}

/// Where a batch's new records go besides memory: the disk log. Each is
/// (its time, whether it is an accepted message, its bytes in `bytes`).
#[derive(Default)]
pub(crate) struct Written {
    pub bytes: Vec<u8>,
    pub records: Vec<(Nanos, bool, std::ops::Range<usize>)>,
}

impl Written {
    pub fn clear(&mut self) {
        self.bytes.clear();
        self.records.clear();
    }
}

pub(crate) struct TraceIndex {
    config: IndexConfig,
    activities: FastMap<Uuid, Box<Activity>>,
    /// Activity ids in the order they were first seen: eviction order.
    order: VecDeque<Uuid>,
    /// A stored message's seq → its activity, for deliveries and outcomes
    /// (the core names those by seq).
    seqs: FastMap<u64, Uuid>,
    /// What everything above counts for (see the module's doc).
    bytes: usize,
    pub stats: IndexStats,
}

impl TraceIndex {
    pub fn new(config: IndexConfig) -> TraceIndex {
        TraceIndex {
            config,
            activities: FastMap::default(),
            order: VecDeque::new(),
            seqs: FastMap::default(),
            bytes: 0,
            stats: IndexStats::default(),
        }
    }

    pub fn config(&self) -> &IndexConfig {
        &self.config
    }

    pub fn activities(&self) -> usize {
        self.activities.len()
    }

    /// Bytes the index counts itself as holding (never above `bytes_max`
    /// after [`TraceIndex::evict`]).
    pub fn memory_bytes(&self) -> usize {
        self.bytes
    }

    /// Takes one record from the core (sampled there already): encodes
    /// it, files it under its activity, and appends it to `written` for
    /// the disk.
    pub fn apply(&mut self, record: &TraceRecord, written: &mut Written) {
        let start = written.bytes.len();
        let (activity, at, filed) = match record {
            TraceRecord::Accepted {
                message,
                seq,
                receivers,
            } => {
                record::encode_accepted(
                    &mut written.bytes,
                    message,
                    *seq,
                    receivers,
                    self.config.payloads,
                );
                let filed = Filed::Accepted {
                    name: &message.name,
                    seq: *seq,
                    final_reply: message.kind == Kind::Reply && message.is_final,
                };
                (message.activity_id, message.timestamp, filed)
            }
            TraceRecord::Delivered {
                message, at, seq, ..
            } => {
                if !self.config.deliveries_of_unseen {
                    if !self.activities.contains_key(&message.activity_id) {
                        self.stats.records_unmatched += 1;
                        return;
                    }
                    record::encode_event(&mut written.bytes, record, &message.activity_id);
                    (message.activity_id, *at, Filed::Event { dead: false })
                } else {
                    record::encode_event(&mut written.bytes, record, &message.activity_id);
                    let filed = Filed::Delivered {
                        name: &message.name,
                        seq: *seq,
                    };
                    (message.activity_id, *at, filed)
                }
            }
            TraceRecord::Settled {
                seq, at, outcome, ..
            } => {
                let Some(activity) = self.seqs.get(seq).copied() else {
                    self.stats.records_unmatched += 1;
                    return;
                };
                record::encode_event(&mut written.bytes, record, &activity);
                let dead = matches!(outcome, Outcome::DeadLettered { .. });
                (activity, *at, Filed::Event { dead })
            }
        };
        let range = start..written.bytes.len();
        written
            .records
            .push((at, filed.is_accepted(), range.clone()));
        self.file(activity, at, &written.bytes[range], filed);
    }

    /// Takes one record read back from the disk at start-up (it was kept
    /// when written: no sampling), unless it is older than the retention.
    pub fn load(&mut self, bytes: &[u8], now: Nanos) -> Result<(), record::RecordError> {
        let (decoded, used) = record::decode(bytes)?;
        if used != bytes.len() {
            return Err(record::RecordError::Truncated { offset: used });
        }
        if decoded.at().saturating_add(self.config.retention_ns) < now {
            return Ok(());
        }
        let filed = match &decoded {
            Record::Accepted(a) => Filed::Accepted {
                name: &a.name,
                seq: a.seq,
                final_reply: a.kind == Kind::Reply && a.is_final,
            },
            Record::Delivered(d) if self.config.deliveries_of_unseen => Filed::Delivered {
                name: "",
                seq: d.seq,
            },
            Record::Delivered(_) => Filed::Event { dead: false },
            Record::Settled(s) => Filed::Event {
                dead: matches!(s.outcome, record::SettledAs::DeadLettered { .. }),
            },
        };
        self.file(decoded.activity(), decoded.at(), bytes, filed);
        Ok(())
    }

    /// Files an encoded record under its activity, updating its summary
    /// and what it costs.
    fn file(&mut self, activity: Uuid, at: Nanos, bytes: &[u8], filed: Filed) {
        let entry = match self.activities.get_mut(&activity) {
            Some(entry) => entry,
            None => {
                self.order.push_back(activity);
                self.bytes += ACTIVITY_FIXED_BYTES;
                self.activities
                    .entry(activity)
                    .or_insert(Box::new(Activity {
                        first_at: at,
                        last_at: at,
                        name: String::new(),
                        messages: 0,
                        outcomes: Vec::new(),
                        dead_lettered: false,
                        records: Vec::new(),
                        stored: 0,
                        dropped: 0,
                        cost: ACTIVITY_FIXED_BYTES,
                    }))
            }
        };
        entry.last_at = entry.last_at.max(at);
        if entry.records.len() + bytes.len() > ACTIVITY_RECORDS_BYTES_MAX {
            entry.dropped = entry.dropped.saturating_add(1);
            self.stats.records_truncated += 1;
            return;
        }
        let before = entry.heap_bytes();
        if entry.records.capacity() - entry.records.len() < bytes.len() {
            // Grows by a quarter rather than doubling: most activities
            // are small, and their slack would be a third of the index.
            let len = entry.records.len();
            entry
                .records
                .reserve_exact(bytes.len() + len / 4 + RECORDS_SLACK_BYTES);
        }
        entry.records.extend_from_slice(bytes);
        entry.first_at = entry.first_at.min(at);
        entry.last_at = entry.last_at.max(at);
        match filed {
            Filed::Accepted {
                name,
                seq,
                final_reply,
            } => {
                self.stats.messages_traced += 1;
                entry.messages += 1;
                if entry.name.is_empty() {
                    entry.name = name.to_string();
                }
                if final_reply
                    && entry.outcomes.len() < OUTCOMES_KEPT_MAX
                    && !entry.outcomes.iter().any(|o| o == name)
                {
                    entry.outcomes.push(name.to_string());
                }
                if seq != 0 && self.seqs.insert(seq, activity).is_none() {
                    entry.stored += 1;
                }
            }
            Filed::Delivered { name, seq } => {
                if entry.name.is_empty() {
                    entry.name = name.to_string();
                }
                if seq != 0 && self.seqs.insert(seq, activity).is_none() {
                    entry.stored += 1;
                }
            }
            Filed::Event { dead } => entry.dead_lettered |= dead,
        }
        let grown = entry.heap_bytes() - before;
        entry.cost += grown;
        self.bytes += grown;
    }

    /// Evicts activities started longer than the retention ago, then the
    /// oldest while over `bytes_max`.
    pub fn evict(&mut self, now: Nanos) {
        while let Some(oldest) = self.order.front().copied() {
            let expired = self
                .activities
                .get(&oldest)
                .is_none_or(|a| a.first_at.saturating_add(self.config.retention_ns) < now);
            let over = self.bytes > self.config.bytes_max;
            if !expired && !over {
                break;
            }
            if expired {
                self.stats.evicted_retention += 1;
            } else {
                self.stats.evicted_size += 1;
            }
            self.remove_front();
        }
        if self.activities.is_empty() {
            // Nothing is left to count: whatever slack the tables kept is
            // given back, and the sum starts over exactly.
            self.activities.shrink_to_fit();
            self.seqs.shrink_to_fit();
            self.order.shrink_to_fit();
            self.bytes = 0;
        }
    }

    fn remove_front(&mut self) {
        let Some(id) = self.order.pop_front() else {
            return;
        };
        let Some(activity) = self.activities.remove(&id) else {
            return;
        };
        if activity.stored > 0 {
            for r in record::decode_all(&activity.records) {
                let seq = match r {
                    Record::Accepted(a) => a.seq,
                    Record::Delivered(d) if self.config.deliveries_of_unseen => d.seq,
                    _ => continue,
                };
                if seq != 0 && self.seqs.get(&seq) == Some(&id) {
                    self.seqs.remove(&seq);
                }
            }
        }
        self.bytes = self.bytes.saturating_sub(activity.cost);
    }

    /// One activity's causal tree, if the index holds it.
    pub fn tree(&self, activity: &Uuid) -> Option<Value> {
        let entry = self.activities.get(activity)?;
        let mut tree = tree::build(*activity, &record::decode_all(&entry.records));
        if entry.dropped > 0 {
            tree["truncated"] = json!(true);
            tree["records_dropped"] = json!(entry.dropped);
        }
        Some(tree)
    }

    /// One activity's records as filed (encoded), and how many were
    /// dropped for its size: this node's part of it, for a query on
    /// another node to merge.
    pub fn records(&self, activity: &Uuid) -> Option<(&[u8], u32)> {
        let entry = self.activities.get(activity)?;
        Some((&entry.records, entry.dropped))
    }

    /// Recent activities matching `filter`, newest first.
    pub fn find(&self, filter: &ActivityFilter) -> Value {
        let mut found = Vec::new();
        for id in self.order.iter().rev() {
            if found.len() >= filter.limit {
                break;
            }
            let Some(a) = self.activities.get(id) else {
                continue;
            };
            if filter.since.is_some_and(|since| a.first_at < since) {
                continue;
            }
            if let Some(pattern) = &filter.name {
                if !pattern_matches(pattern, &a.name) {
                    continue;
                }
            }
            if let Some(outcome) = &filter.outcome {
                let matched = if outcome == DEAD_LETTERED {
                    a.dead_lettered
                } else {
                    a.outcomes.iter().any(|o| o == outcome)
                };
                if !matched {
                    continue;
                }
            }
            found.push(json!({
                "activity_id": id.to_string(),
                "name": a.name,
                "started_at": a.first_at,
                "duration_ms": ((a.last_at - a.first_at) / 1_000) as f64 / 1_000.0,
                "messages": a.messages,
                "outcomes": a.outcomes,
                "dead_lettered": a.dead_lettered,
            }));
        }
        json!({ "activities": found })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use courier_broker::Outcome;
    use courier_proto::{Message, SharedStr};
    use std::sync::Arc;

    const MS: Nanos = 1_000_000;
    const T0: Nanos = 1_700_000_000_000_000_000;

    fn config(bytes_max: usize) -> IndexConfig {
        IndexConfig {
            retention_ns: 3_600_000 * MS,
            bytes_max,
            payloads: false,
            deliveries_of_unseen: false,
        }
    }

    fn accepted(m: &Arc<Message>, seq: u64, to: &str) -> TraceRecord {
        TraceRecord::Accepted {
            message: m.clone(),
            seq,
            receivers: Arc::from([to.to_string()]),
        }
    }

    fn message(kind: Kind, name: &str, at: Nanos, cause: Option<&Message>) -> Arc<Message> {
        let mut m = Message::new(kind, name, "{}");
        m.timestamp = at;
        m.sender = "svc".into();
        if let Some(cause) = cause {
            m.activity_id = cause.activity_id;
            m.parent_id = Some(cause.id);
        }
        Arc::new(m)
    }

    /// A command, its delivery and ack, then an event it caused: four
    /// records, two messages.
    fn activity(index: &mut TraceIndex, seq: u64, at: Nanos, written: &mut Written) -> Uuid {
        let command = message(Kind::Command, "job.run", at, None);
        let event = message(Kind::Event, "job.done", at + MS, Some(&command));
        for record in [
            accepted(&command, seq, "worker"),
            TraceRecord::Delivered {
                message: command.clone(),
                seq,
                service: SharedStr::from("worker"),
                instance: SharedStr::from("worker-1"),
                attempt: 1,
                at: at + MS,
            },
            accepted(&event, seq + 1, "audit"),
            TraceRecord::Settled {
                seq,
                service: SharedStr::from("worker"),
                outcome: Outcome::Acked,
                at: at + 2 * MS,
            },
        ] {
            index.apply(&record, written);
        }
        command.activity_id
    }

    #[test]
    fn far_more_than_the_cap_stays_under_it_oldest_out_first() {
        const CAP: usize = 256 * 1024;
        let mut index = TraceIndex::new(config(CAP));
        let mut written = Written::default();
        let mut ids = Vec::new();
        let mut peak = 0;
        for i in 0..20_000u64 {
            ids.push(activity(&mut index, 2 * i + 1, T0 + i * MS, &mut written));
            index.evict(T0 + i * MS);
            peak = peak.max(index.memory_bytes());
            written.clear();
        }
        assert!(peak <= CAP, "peak {peak} over the cap {CAP}");
        let kept = index.activities();
        let per_activity = index.memory_bytes() / kept;
        eprintln!(
            "{kept} activities kept of 20000 under {CAP} B: {per_activity} B each \
             (fixed {ACTIVITY_FIXED_BYTES}, per stored message {SEQ_ENTRY_BYTES})"
        );
        assert!(kept > 100 && kept < 20_000 / 10, "{kept} kept");
        assert_eq!(
            index.stats.evicted_size as usize + kept,
            20_000,
            "every activity was kept or evicted for size"
        );
        assert!(index.tree(&ids[0]).is_none(), "the oldest went first");
        let newest = index
            .tree(ids.last().expect("ids"))
            .expect("the newest stays");
        assert_eq!(newest["messages"], 2);
        assert_eq!(
            index.seqs.len(),
            2 * kept,
            "evicted activities leave nothing in the seq map"
        );
    }

    #[test]
    fn one_endless_activity_keeps_its_first_megabyte_and_says_it_was_cut() {
        let mut index = TraceIndex::new(config(usize::MAX));
        let mut written = Written::default();
        let root = message(Kind::Command, "job.run", T0, None);
        index.apply(&accepted(&root, 1, "worker"), &mut written);
        for i in 0..20_000u64 {
            let step = message(Kind::Event, "job.step", T0 + i, Some(&root));
            index.apply(&accepted(&step, 2 + i, "audit"), &mut written);
        }
        let tree = index.tree(&root.activity_id).expect("kept");
        assert_eq!(tree["truncated"], true);
        let kept = tree["messages"].as_u64().expect("count");
        assert!(kept > 5_000 && kept < 20_000, "{kept} kept");
        assert_eq!(tree["records_dropped"].as_u64(), Some(20_001 - kept));
        assert!(index.memory_bytes() < 2 * ACTIVITY_RECORDS_BYTES_MAX);
        assert_eq!(index.stats.records_truncated, 20_001 - kept);
    }

    #[test]
    fn activities_older_than_the_retention_go_even_when_idle() {
        let mut index = TraceIndex::new(config(usize::MAX));
        let mut written = Written::default();
        let old = activity(&mut index, 1, T0, &mut written);
        let young = activity(&mut index, 3, T0 + 3_000_000 * MS, &mut written);
        index.evict(T0 + 3_600_000 * MS + 1);
        assert!(index.tree(&old).is_none());
        assert!(index.tree(&young).is_some());
        assert_eq!(index.stats.evicted_retention, 1);
        index.evict(T0 + 10 * 3_600_000 * MS);
        assert_eq!((index.activities(), index.memory_bytes()), (0, 0));
    }

    #[test]
    fn on_a_cluster_a_delivery_of_an_activity_accepted_elsewhere_is_kept_with_its_outcome() {
        let command = message(Kind::Command, "job.run", T0, None);
        let delivered = TraceRecord::Delivered {
            message: command.clone(),
            seq: 5,
            service: SharedStr::from("worker"),
            instance: SharedStr::from("worker-1"),
            attempt: 1,
            at: T0 + MS,
        };
        let settled = TraceRecord::Settled {
            seq: 5,
            service: SharedStr::from("worker"),
            outcome: Outcome::Acked,
            at: T0 + 2 * MS,
        };
        // One broker: an activity it never saw accepted was skipped by
        // the sampler; its delivery is not kept.
        let mut one = TraceIndex::new(config(usize::MAX));
        let mut written = Written::default();
        one.apply(&delivered, &mut written);
        one.apply(&settled, &mut written);
        assert_eq!(one.activities(), 0);
        assert_eq!(one.stats.records_unmatched, 2);

        let mut node = TraceIndex::new(IndexConfig {
            deliveries_of_unseen: true,
            ..config(usize::MAX)
        });
        node.apply(&delivered, &mut written);
        node.apply(&settled, &mut written);
        assert_eq!(node.stats.records_unmatched, 0);
        let (records, dropped) = node.records(&command.activity_id).expect("kept");
        assert_eq!(dropped, 0);
        let kinds: Vec<&str> = record::decode_all(records)
            .iter()
            .map(|r| match r {
                Record::Accepted(_) => "accepted",
                Record::Delivered(_) => "delivered",
                Record::Settled(_) => "settled",
            })
            .collect();
        assert_eq!(kinds, vec!["delivered", "settled"]);
        let listed = node.find(&ActivityFilter {
            name: None,
            outcome: None,
            since: None,
            limit: 10,
        });
        assert_eq!(listed["activities"][0]["name"], "job.run");
        // Evicted with its seq: a later outcome of seq 5 matches nothing.
        node.evict(T0 + 10 * 3_600_000 * MS);
        node.apply(&settled, &mut written);
        assert_eq!(node.stats.records_unmatched, 1);
    }
}
