//! History replays on a cluster (docs/SCALE-OUT.md §4 "History replay"):
//! this node's copy of the subscription table, which tells the fetch
//! loops what belongs to a replay, and the keyed lane holder's part —
//! join each unfinished replay, hand it out, end it — before the keyed
//! lane goes on.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use courier_cluster::fetch::Skip;
use courier_cluster::replay::{self, Drained};
use courier_cluster::services::{PatternState, ServiceSubscriptions};
use courier_cluster::Connection;
use tokio::sync::{watch, Notify};
use tracing::info;

use super::fetching::{credit_of, deliver_to};
use super::ClusterNode;
use crate::Shared;

/// Every service's entry of `courier_services` as this node last saw it.
#[derive(Debug)]
pub(crate) struct SubscriptionTable {
    entries: Mutex<HashMap<String, ServiceSubscriptions>>,
    /// Bumped on every change, for whoever waits for one.
    version: watch::Sender<u64>,
}

impl Default for SubscriptionTable {
    fn default() -> SubscriptionTable {
        SubscriptionTable {
            entries: Mutex::default(),
            version: watch::Sender::new(0),
        }
    }
}

impl SubscriptionTable {
    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<String, ServiceSubscriptions>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A change of `service`'s entry (`None`: it has no subscription). A
    /// pattern's `from_seq` and `keyed_from_seq` only grow while it stays
    /// subscribed: a value this node wrote itself is kept until the watch
    /// brings it.
    pub(crate) fn update(&self, service: &str, entry: Option<ServiceSubscriptions>) {
        {
            let mut entries = self.entries();
            match entry {
                None => {
                    entries.remove(service);
                }
                Some(mut entry) => {
                    if let Some(known) = entries.get(service) {
                        for (pattern, state) in &mut entry.patterns {
                            if let Some(old) = known.patterns.get(pattern) {
                                state.from_seq = state.from_seq.max(old.from_seq);
                                state.keyed_from_seq = state.keyed_from_seq.max(old.keyed_from_seq);
                            }
                        }
                    }
                    entries.insert(service.to_string(), entry);
                }
            }
        }
        self.version.send_modify(|v| *v += 1);
    }

    /// What the keyed lane's holder wrote of `pattern`.
    fn note(&self, service: &str, pattern: &str, state: &PatternState) {
        let mut entries = self.entries();
        if let Some(known) = entries
            .get_mut(service)
            .and_then(|e| e.patterns.get_mut(pattern))
        {
            known.from_seq = known.from_seq.max(state.from_seq);
            known.keyed_from_seq = known.keyed_from_seq.max(state.keyed_from_seq);
        }
    }

    /// The fetch loops' test: a message of `service` that a replay hands
    /// out instead.
    pub(crate) fn skip_for(self: &Arc<Self>, service: &str) -> Box<Skip> {
        let table = self.clone();
        let service = service.to_string();
        Box::new(move |lane, name, seq| {
            table
                .entries()
                .get(&service)
                .is_some_and(|entry| entry.replays(lane, name, seq))
        })
    }

    /// Whether the keyed lane of `service` has a change waiting for its
    /// holder: a replay to join, a held pattern to leave.
    fn keyed_change_waiting(&self, service: &str) -> bool {
        self.entries()
            .get(service)
            .is_some_and(ServiceSubscriptions::keyed_lane_change_waiting)
    }

    /// Returns once the keyed lane of `service` has a change waiting.
    pub(crate) async fn keyed_change_appears(&self, service: &str) {
        let mut version = self.version.subscribe();
        while !self.keyed_change_waiting(service) {
            if version.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    /// The consumers of `service`'s unfinished replays and holds.
    pub(crate) fn hand_out_consumers(&self, service: &str) -> Vec<String> {
        self.entries()
            .get(service)
            .map_or_else(Vec::new, |entry| entry.hand_out_consumers(service))
    }
}

/// Waited for after the last pull of the keyed lane's expiry, before its
/// consumer's delivered seq is read: the server may still fill a pull
/// until it expires.
const PULL_LAPSE_MARGIN: std::time::Duration = std::time::Duration::from_millis(200);

/// The keyed lane holder's part: every unfinished replay of `service`,
/// in turn, joined to the keyed lane, handed out and ended. `Stopped`
/// when `stop` came first; an error leaves the rest to the next try.
/// `due_again`: what the last holder left due, by consumer; a replay's
/// first pull takes its consumer's share at once.
#[allow(clippy::too_many_arguments)] // the lane's context, each its own
pub(crate) async fn hand_out_replays(
    shared: &Weak<Shared>,
    node: &ClusterNode,
    table: &Arc<SubscriptionTable>,
    connection: &Connection,
    service: &str,
    room: &Arc<Notify>,
    due_again: &mut super::fetching::DueAgain,
    stop: &watch::Receiver<bool>,
) -> Result<Drained, String> {
    // Read from the bucket's leader: this node's copy may not show a
    // subscription made on another node a moment ago.
    let entry = courier_cluster::services::read(&node.services.services, service)
        .await
        .map_err(|e| e.to_string())?;
    let Some((entry, _)) = entry else {
        return Ok(Drained::Done);
    };
    table.update(service, Some(entry.clone()));
    // Patterns paused alone leave the keyed consumer, at a seq read while
    // nothing is fetched from it (a pull made before lapses first).
    let leaving: Vec<&String> = entry
        .patterns
        .iter()
        .filter(|(_, s)| s.paused && s.hold.as_ref().is_some_and(|h| !h.keyed_left))
        .map(|(p, _)| p)
        .collect();
    if !leaving.is_empty() {
        tokio::time::sleep(courier_cluster::fetch::FETCH_EXPIRES + PULL_LAPSE_MARGIN).await;
        let keyed_after = node
            .services
            .keyed_delivered(service)
            .await
            .map_err(|e| e.to_string())?
            .unwrap_or(0);
        for pattern in leaving {
            node.services
                .leave_keyed_lane(service, pattern, keyed_after)
                .await
                .map_err(|e| e.to_string())?;
            info!(%service, %pattern, keyed_after, "paused: the pattern's keyed messages wait");
        }
    }
    for (pattern, state) in entry.patterns.iter().filter(|(_, s)| s.replay.is_some()) {
        let state = if state.keyed_join_waiting() {
            let joined = node
                .services
                .join_keyed_lane(service, pattern)
                .await
                .map_err(|e| e.to_string())?;
            let Some(joined) = joined else { continue };
            table.note(service, pattern, &joined);
            joined
        } else {
            state.clone()
        };
        if state.replay.is_none() {
            continue;
        }
        info!(%service, %pattern, from_seq = state.from_seq, keyed_from_seq = state.keyed_from_seq, "replaying history");
        let gather = due_again
            .remove(&replay::consumer_of(service, pattern, &state))
            .unwrap_or(0);
        let drained = replay::drain(
            connection,
            service,
            pattern,
            &state,
            credit_of(shared.clone(), service.to_string(), true),
            room.clone(),
            deliver_to(shared.clone()),
            gather,
            stop.clone(),
        )
        .await
        .map_err(|e| e.to_string())?;
        if drained == Drained::Stopped {
            return Ok(Drained::Stopped);
        }
        node.services
            .end_replay(service, pattern)
            .await
            .map_err(|e| e.to_string())?;
        info!(%service, %pattern, "history replayed");
    }
    Ok(Drained::Done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use courier_cluster::consumers::Lane;
    use courier_cluster::services::Replay;

    fn skips(
        table: &Arc<SubscriptionTable>,
        service: &str,
        lane: Lane,
        name: &str,
        seq: u64,
    ) -> bool {
        (table.skip_for(service))(lane, name, seq)
    }

    fn entry(patterns: &[(&str, u64, u64, Option<Replay>)]) -> ServiceSubscriptions {
        ServiceSubscriptions {
            ack_deadline_ms: 1000,
            max_deliveries: 3,
            patterns: patterns
                .iter()
                .map(|(p, from, keyed, replay)| {
                    (
                        p.to_string(),
                        PatternState {
                            from_seq: *from,
                            keyed_from_seq: *keyed,
                            replay: replay.clone(),
                            ..PatternState::default()
                        },
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn a_replayed_patterns_messages_up_to_its_join_are_the_replays() {
        let table = Arc::new(SubscriptionTable::default());
        table.update(
            "audit",
            Some(entry(&[
                (
                    "audit.*",
                    10,
                    20,
                    Some(Replay {
                        keyed_joined: true,
                        keyed_read: true,
                    }),
                ),
                ("audit.login", 0, 0, None),
            ])),
        );
        assert!(skips(&table, "audit", Lane::Unkeyed, "audit.x", 10));
        assert!(!skips(&table, "audit", Lane::Unkeyed, "audit.x", 11));
        assert!(skips(&table, "audit", Lane::Keyed, "audit.x", 20));
        assert!(!skips(&table, "audit", Lane::Keyed, "audit.x", 21));
        // Another pattern that takes it from before: the consumer's.
        assert!(!skips(&table, "audit", Lane::Unkeyed, "audit.login", 5));
        // A name no pattern takes, another service: the consumer's.
        assert!(!skips(&table, "audit", Lane::Unkeyed, "other", 1));
        assert!(!skips(&table, "billing", Lane::Unkeyed, "audit.x", 1));
    }

    #[test]
    fn what_this_node_wrote_outlives_an_older_view() {
        let table = Arc::new(SubscriptionTable::default());
        let joining = Some(Replay::default());
        table.update("s", Some(entry(&[("a.*", 10, 0, joining.clone())])));
        assert!(table.keyed_change_waiting("s"));
        let joined = PatternState {
            from_seq: 10,
            keyed_from_seq: 30,
            replay: Some(Replay {
                keyed_joined: true,
                keyed_read: true,
            }),
            ..PatternState::default()
        };
        table.note("s", "a.*", &joined);
        // The watch brings the entry from before the join.
        table.update("s", Some(entry(&[("a.*", 10, 0, joining)])));
        assert!(skips(&table, "s", Lane::Keyed, "a.b", 30));
        table.update("s", None);
        assert!(!skips(&table, "s", Lane::Keyed, "a.b", 30));
        assert!(table.hand_out_consumers("s").is_empty());
    }
}
