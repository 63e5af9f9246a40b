//! The checker of the fault loop (docs/SCALE-OUT.md §17), Jepsen-style:
//! a pure function over what the clients recorded — every acknowledged
//! send, every delivery a handler saw, every fault and every disconnect —
//! so that it can be tried on made-up histories without a cluster.
//!
//! The rules, as implemented:
//!
//! - **lost**: acknowledged (the send's result was a success) and never
//!   delivered.
//! - **duplicated**: an id delivered more than once. A later delivery is
//!   *explained* when the delivery before it could have lost its ack to a
//!   fault: it was recorded within `ack_slack` before a fault began, or
//!   while one lasted, or within `ack_slack` after it ended (the ack was
//!   on its way through a node or a server that died, froze or was
//!   rejoining), or within `ack_slack` before its instance's connection
//!   dropped. Anything else is *unexplained*. With faults back to back,
//!   most of the run lies in some window, so this rule is loose; `lost`
//!   and `out_of_order` carry most of the check.
//! - **out_of_order**: per chain (one sender's messages of one key, sent
//!   one after another, each waiting for its acknowledgement), with the
//!   handlers' record times: message n+1 is handled before message n ever
//!   was; or message n is handled again after n+1 was, and that repeat is
//!   not an explained duplicate. An explained repeat of an already
//!   handled message after n+1 is allowed (SCALE-OUT §13: a crash may
//!   deliver again what was in flight) and counted as `late_repeats`.
//!   Two of a key in flight at once is not observable from record times
//!   alone (a handler acks as soon as it has recorded), so it is not
//!   checked separately.

#![allow(dead_code)] // the end-to-end test and the unit tests use different parts

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use uuid::Uuid;

/// A send the bus acknowledged.
#[derive(Clone, Debug)]
pub struct Sent {
    pub id: Uuid,
    pub sender: u32,
    pub key: Option<u32>,
    /// The message's number among its sender's messages of its key.
    pub seq: u64,
    /// When the acknowledgement came, since the run began.
    pub at: Duration,
}

/// One delivery, as a handler recorded it before acking.
#[derive(Clone, Debug)]
pub struct Delivery {
    pub instance: String,
    pub id: Uuid,
    pub attempt: u32,
    pub sender: u32,
    pub key: Option<u32>,
    pub seq: u64,
    /// Since the run began; deliveries are recorded in this order.
    pub at: Duration,
}

/// One fault, from its injection until the cluster was whole again.
#[derive(Clone, Debug)]
pub struct Fault {
    pub cycle: usize,
    pub what: String,
    pub start: Duration,
    pub end: Duration,
}

/// Everything a run recorded.
#[derive(Clone, Debug, Default)]
pub struct History {
    pub acknowledged: Vec<Sent>,
    /// In record order.
    pub deliveries: Vec<Delivery>,
    pub faults: Vec<Fault>,
    /// (instance, when its connection dropped).
    pub disconnects: Vec<(String, Duration)>,
    pub cycles: usize,
}

/// What the checker found.
#[derive(Clone, Debug, Default)]
pub struct Verdict {
    pub lost: Vec<Sent>,
    /// Ids delivered more than once.
    pub duplicated: usize,
    /// Repeats no fault explains: (the delivery, the one before it).
    pub unexplained: Vec<(Delivery, Delivery)>,
    pub out_of_order: Vec<String>,
    /// Explained repeats of a key's message after its successor was handled.
    pub late_repeats: usize,
    /// Distinct ids delivered.
    pub delivered: usize,
    pub deliveries: usize,
    pub acknowledged: usize,
    /// Delivered ids that no acknowledged send has.
    pub unsent: Vec<Uuid>,
    pub cycles: usize,
}

impl Verdict {
    pub fn passed(&self) -> bool {
        self.lost.is_empty() && self.unexplained.is_empty() && self.out_of_order.is_empty()
    }

    /// The findings one by one (at most `max` of each kind), with the
    /// fault nearest to each, for a failure message.
    pub fn details(&self, history: &History, max: usize) -> String {
        let mut out = Vec::new();
        for sent in self.lost.iter().take(max) {
            out.push(format!(
                "lost {} (sender {}, key {:?}, seq {}) acknowledged at {:?}; nearest fault: {}",
                sent.id,
                sent.sender,
                sent.key,
                sent.seq,
                sent.at,
                nearest_fault(&history.faults, sent.at)
            ));
        }
        for (later, earlier) in self.unexplained.iter().take(max) {
            out.push(format!(
                "unexplained repeat of {}: {} attempt {} at {:?}, after {} attempt {} at {:?}; nearest fault: {}",
                later.id,
                later.instance,
                later.attempt,
                later.at,
                earlier.instance,
                earlier.attempt,
                earlier.at,
                nearest_fault(&history.faults, earlier.at)
            ));
        }
        for line in self.out_of_order.iter().take(max) {
            out.push(format!("out of order: {line}"));
        }
        out.join("\n")
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "lost {}, duplicated {} (unexplained {}), out_of_order {}, delivered {}, acknowledged {}, cycles {}",
            self.lost.len(),
            self.duplicated,
            self.unexplained.len(),
            self.out_of_order.len(),
            self.delivered,
            self.acknowledged,
            self.cycles
        )
    }
}

fn nearest_fault(faults: &[Fault], at: Duration) -> String {
    let distance = |f: &Fault| {
        if at < f.start {
            f.start - at
        } else {
            at.saturating_sub(f.end)
        }
    };
    faults
        .iter()
        .min_by_key(|f| distance(f))
        .map(|f| format!("cycle {} {} ({:?}..{:?})", f.cycle, f.what, f.start, f.end))
        .unwrap_or_else(|| "none".to_string())
}

/// Whether a delivery recorded at `d` by `instance` could have lost its
/// ack to a fault or a disconnect (the rule in the module's text).
fn fault_explains(history: &History, d: &Delivery, ack_slack: Duration) -> bool {
    let in_fault = history
        .faults
        .iter()
        .any(|f| d.at + ack_slack >= f.start && d.at <= f.end + ack_slack);
    let dropped = history
        .disconnects
        .iter()
        .any(|(instance, at)| *instance == d.instance && d.at <= *at && d.at + ack_slack >= *at);
    in_fault || dropped
}

/// Checks a run's history (the rules in the module's text).
pub fn check(history: &History, ack_slack: Duration) -> Verdict {
    let mut verdict = Verdict {
        acknowledged: history.acknowledged.len(),
        deliveries: history.deliveries.len(),
        cycles: history.cycles,
        ..Verdict::default()
    };
    let acked: BTreeSet<Uuid> = history.acknowledged.iter().map(|s| s.id).collect();
    let mut by_id: BTreeMap<Uuid, Vec<usize>> = BTreeMap::new();
    for (i, d) in history.deliveries.iter().enumerate() {
        by_id.entry(d.id).or_default().push(i);
    }
    verdict.delivered = by_id.len();
    verdict.lost = history
        .acknowledged
        .iter()
        .filter(|s| !by_id.contains_key(&s.id))
        .cloned()
        .collect();
    verdict.unsent = by_id
        .keys()
        .filter(|id| !acked.contains(id))
        .copied()
        .collect();

    // Whether each delivery (by index) is an explained repeat.
    let mut repeat_explained: BTreeMap<usize, bool> = BTreeMap::new();
    for indices in by_id.values() {
        if indices.len() < 2 {
            continue;
        }
        verdict.duplicated += 1;
        for pair in indices.windows(2) {
            let (earlier, later) = (&history.deliveries[pair[0]], &history.deliveries[pair[1]]);
            let explained = fault_explains(history, earlier, ack_slack);
            repeat_explained.insert(pair[1], explained);
            if !explained {
                verdict.unexplained.push((later.clone(), earlier.clone()));
            }
        }
    }

    // Per chain (sender, key) and seq: the record indices of its deliveries.
    let mut chains: BTreeMap<(u32, u32), BTreeMap<u64, Vec<usize>>> = BTreeMap::new();
    for (i, d) in history.deliveries.iter().enumerate() {
        if let Some(key) = d.key {
            chains
                .entry((d.sender, key))
                .or_default()
                .entry(d.seq)
                .or_default()
                .push(i);
        }
    }
    for ((sender, key), seqs) in &chains {
        for (seq, indices) in seqs {
            let Some(before) = seq.checked_sub(1) else {
                continue;
            };
            let first_next = indices[0];
            let at = history.deliveries[first_next].at;
            let Some(previous) = seqs.get(&before) else {
                verdict.out_of_order.push(format!(
                    "sender {sender} key {key}: seq {seq} handled at {at:?}, seq {before} never"
                ));
                continue;
            };
            if previous[0] > first_next {
                // Who handled each, which attempt, and when each send was
                // acknowledged: what tells a store-order fault from a
                // delivery-order one.
                let acknowledged_at = |seq: u64| {
                    history
                        .acknowledged
                        .iter()
                        .find(|s| s.sender == *sender && s.key == Some(*key) && s.seq == seq)
                        .map(|s| s.at)
                };
                let (later, earlier) = (
                    &history.deliveries[first_next],
                    &history.deliveries[previous[0]],
                );
                verdict.out_of_order.push(format!(
                    "sender {sender} key {key}: seq {seq} handled at {at:?} ({} attempt {}; acknowledged at {:?}) before seq {before} first was, at {:?} ({} attempt {}; acknowledged at {:?}); nearest fault: {}",
                    later.instance,
                    later.attempt,
                    acknowledged_at(*seq),
                    earlier.at,
                    earlier.instance,
                    earlier.attempt,
                    acknowledged_at(before),
                    nearest_fault(&history.faults, at)
                ));
                continue;
            }
            for &late in previous.iter().filter(|&&i| i > first_next) {
                let d = &history.deliveries[late];
                if repeat_explained.get(&late).copied().unwrap_or(false) {
                    verdict.late_repeats += 1;
                } else {
                    verdict.out_of_order.push(format!(
                        "sender {sender} key {key}: seq {before} handled again at {:?} ({} attempt {}) after seq {seq} at {at:?}, and no fault explains it",
                        d.at, d.instance, d.attempt
                    ));
                }
            }
        }
    }
    verdict
}

#[cfg(test)]
mod tests {
    use super::*;

    const SLACK: Duration = Duration::from_secs(1);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn id(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    fn sent(n: u128, key: Option<u32>, seq: u64) -> Sent {
        Sent {
            id: id(n),
            sender: 0,
            key,
            seq,
            at: ms(0),
        }
    }

    fn delivery(n: u128, key: Option<u32>, seq: u64, attempt: u32, at: u64) -> Delivery {
        Delivery {
            instance: "orders-1".to_string(),
            id: id(n),
            attempt,
            sender: 0,
            key,
            seq,
            at: ms(at),
        }
    }

    fn fault(start: u64, end: u64) -> Fault {
        Fault {
            cycle: 0,
            what: "kill -9 node a".to_string(),
            start: ms(start),
            end: ms(end),
        }
    }

    fn history(sent: Vec<Sent>, deliveries: Vec<Delivery>, faults: Vec<Fault>) -> History {
        History {
            acknowledged: sent,
            deliveries,
            faults,
            disconnects: Vec::new(),
            cycles: 1,
        }
    }

    #[test]
    fn checker_a_clean_run_passes() {
        let h = history(
            vec![sent(1, Some(3), 0), sent(2, Some(3), 1), sent(3, None, 0)],
            vec![
                delivery(1, Some(3), 0, 1, 10),
                delivery(3, None, 0, 1, 15),
                delivery(2, Some(3), 1, 1, 20),
            ],
            vec![],
        );
        let v = check(&h, SLACK);
        assert!(v.passed(), "{v}");
        assert_eq!(
            v.to_string(),
            "lost 0, duplicated 0 (unexplained 0), out_of_order 0, delivered 3, acknowledged 3, cycles 1"
        );
    }

    #[test]
    fn checker_counts_an_acknowledged_send_never_delivered_as_lost() {
        let h = history(
            vec![sent(1, None, 0), sent(2, None, 1)],
            vec![delivery(1, None, 0, 1, 10)],
            vec![],
        );
        let v = check(&h, SLACK);
        assert_eq!(v.lost.len(), 1);
        assert_eq!(v.lost[0].id, id(2));
    }

    #[test]
    fn checker_explains_a_repeat_only_near_a_fault() {
        let deliveries = vec![
            delivery(1, None, 0, 1, 10_000),
            delivery(1, None, 0, 2, 12_500),
        ];
        let near = history(
            vec![sent(1, None, 0)],
            deliveries.clone(),
            vec![fault(10_500, 11_000)],
        );
        let v = check(&near, SLACK);
        assert_eq!((v.duplicated, v.unexplained.len()), (1, 0), "{v}");
        let far = history(
            vec![sent(1, None, 0)],
            deliveries,
            vec![fault(30_000, 31_000)],
        );
        let v = check(&far, SLACK);
        assert_eq!((v.duplicated, v.unexplained.len()), (1, 1), "{v}");
    }

    #[test]
    fn checker_explains_a_repeat_after_its_instance_disconnected() {
        let mut h = history(
            vec![sent(1, None, 0)],
            vec![
                delivery(1, None, 0, 1, 10_000),
                delivery(1, None, 0, 2, 12_500),
            ],
            vec![],
        );
        h.disconnects.push(("orders-1".to_string(), ms(10_200)));
        assert!(check(&h, SLACK).passed());
    }

    #[test]
    fn checker_finds_a_key_handled_out_of_order() {
        let h = history(
            vec![sent(1, Some(0), 0), sent(2, Some(0), 1)],
            vec![
                delivery(2, Some(0), 1, 1, 10),
                delivery(1, Some(0), 0, 1, 20),
            ],
            vec![],
        );
        let v = check(&h, SLACK);
        assert_eq!(v.out_of_order.len(), 1, "{v}");
        assert!(
            v.out_of_order[0].contains("before seq 0"),
            "{:?}",
            v.out_of_order
        );
    }

    #[test]
    fn checker_allows_a_handled_message_again_after_a_crash_but_not_without_one() {
        let deliveries = vec![
            delivery(1, Some(0), 0, 1, 10_000),
            delivery(2, Some(0), 1, 1, 10_100),
            delivery(1, Some(0), 0, 2, 13_000),
            delivery(2, Some(0), 1, 2, 13_100),
        ];
        let sends = vec![sent(1, Some(0), 0), sent(2, Some(0), 1)];
        let crash = history(
            sends.clone(),
            deliveries.clone(),
            vec![fault(10_200, 10_700)],
        );
        let v = check(&crash, SLACK);
        assert!(v.passed(), "{v}");
        assert_eq!(v.late_repeats, 1);
        let calm = history(sends, deliveries, vec![]);
        let v = check(&calm, SLACK);
        assert_eq!(v.out_of_order.len(), 1, "{v}");
        assert_eq!(v.unexplained.len(), 2, "{v}");
    }

    #[test]
    fn checker_finds_a_key_message_handled_whose_predecessor_never_was() {
        let h = history(
            vec![sent(1, Some(0), 0), sent(2, Some(0), 1)],
            vec![delivery(2, Some(0), 1, 1, 10)],
            vec![],
        );
        let v = check(&h, SLACK);
        assert_eq!((v.lost.len(), v.out_of_order.len()), (1, 1), "{v}");
    }
}
