//! What every task of a server shares (`Shared`): the broker core behind
//! its one lock, and carrying out the actions of each batch.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use courier_broker::{Action, Broker, ConnId, FastMap, Nanos};
use courier_proto::{ErrorCode, ErrorFrame, Frame};
use courier_store::MessageStore;
use tokio::sync::Notify;
use tracing::{error, warn};

use crate::background::{answer_services_query, answer_trace_query};
use crate::outbox::OutState;
use crate::{
    backend_sync, console, core_lock, gateway, group_commit, registry, tail, trace, Outbox,
    ServerConfig,
};

pub(crate) type Store = Box<dyn MessageStore>;

pub(crate) struct Shared {
    pub(crate) config: ServerConfig,
    /// Broker time for the core's inputs, and the wall clock (`clock.rs`).
    pub(crate) clock: crate::clock::Clock,
    /// The service registry's checks and watchers (`registry.rs`).
    pub(crate) registry: registry::RegistryEdge,
    /// Credentials each live connection presented (and the subject of its
    /// verified client certificate), to check again when the manifest changes.
    pub(crate) credentials: Mutex<HashMap<ConnId, (courier_proto::Credentials, Option<String>)>>,
    /// Set when the listener speaks TLS.
    pub(crate) tls: Option<tokio_rustls::TlsAcceptor>,
    /// Modification time of the manifest file in force.
    pub(crate) manifest_modified: Mutex<Option<SystemTime>>,
    pub(crate) handshakes: std::sync::atomic::AtomicUsize,
    /// Connections open (see [`ServerConfig::connections_max`]).
    pub(crate) connections: std::sync::atomic::AtomicUsize,
    /// Connections over the cap being told so.
    pub(crate) refusals: std::sync::atomic::AtomicUsize,
    /// The second (unix) of the last "too many handshakes" warning.
    pub(crate) cap_warned_at: AtomicU64,
    /// The second (unix) of the last "too many connections" warning.
    pub(crate) connections_warned_at: AtomicU64,
    /// Connections paused for back-pressure, checked on every tick.
    pub(crate) paused: Mutex<std::collections::HashSet<ConnId>>,
    pub(crate) core: Mutex<Broker<Store>>,
    /// How the core's lock is taken, waited for and held (`/metrics`).
    pub(crate) core_lock: core_lock::LockStats,
    pub(crate) outboxes: Mutex<FastMap<ConnId, Arc<Outbox>>>,
    /// Where each live connection comes from and since when, for the
    /// console (the broker core knows nothing of sockets or clocks).
    pub(crate) peers: Mutex<FastMap<ConnId, console::Peer>>,
    pub(crate) next_conn: AtomicU64,
    /// When the timer task plans to wake next (broker time).
    pub(crate) timer_due: AtomicU64,
    pub(crate) timer_wake: Arc<Notify>,
    /// How long recovery took at start-up, for `/metrics`.
    pub(crate) recovery_seconds: f64,
    /// Frames decoded from clients, and entries encoded for them (batched
    /// into fewer frames), for `/metrics`.
    pub(crate) frames_in: AtomicU64,
    pub(crate) entries_out: AtomicU64,
    /// Live tails and the channel that feeds them.
    pub(crate) tails: tail::Tails,
    /// Activity traces, unless off.
    pub(crate) tracer: Option<trace::Tracer>,
    /// The HTTP gateway's webhook posts, for `/metrics`.
    pub(crate) webhooks: Arc<gateway::webhook::WebhookCounters>,
    /// What the gateway's webhook secrets derive from.
    pub(crate) webhook_key: gateway::webhook::WebhookKey,
    /// Wakes the thread that fsyncs outside the core's lock.
    pub(crate) committer: Arc<group_commit::Committer>,
    /// A cluster backend's syncs, which take the committer's place there.
    pub(crate) backend_syncs: backend_sync::BackendSyncs,
    /// Held for a whole checkpoint: one at a time (they share the
    /// snapshot's temporary file).
    pub(crate) checkpointing: Mutex<()>,
    /// Held while a pass encodes its actions into outboxes; taken before
    /// the core's lock is let go, so passes encode in the core's order.
    /// Never held while waiting for the core's lock.
    pub(crate) dispatching: Mutex<()>,
    /// The edge to a cluster backend (`cluster_edge/`), when on one.
    pub(crate) cluster: Option<crate::cluster_edge::ClusterEdge>,
}

/// What the broker wants the operator to hear: harm to durable data at
/// error level, the rest as warnings.
pub(crate) fn say_alerts(core: &mut Broker<Store>) {
    for error in core.take_errors() {
        error!("{error}");
    }
    for alert in core.take_alerts() {
        warn!("{alert}");
    }
}

/// Where a batch's fsync runs (see [`Shared::with_core_deferred`]).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Commit {
    InPlace,
    /// The batch of a connection (`None`: of the broker's own timers).
    Deferred(Option<ConnId>),
    Committing,
}

impl Shared {
    pub(crate) fn core(&self) -> core_lock::Measured<'_, Broker<Store>> {
        core_lock::lock(&self.core, &self.core_lock)
    }

    pub(crate) fn peers(&self) -> MutexGuard<'_, FastMap<ConnId, console::Peer>> {
        self.peers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn outboxes(&self) -> MutexGuard<'_, FastMap<ConnId, Arc<Outbox>>> {
        self.outboxes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs `f` on the broker, then carries out every action it produced.
    /// Actions are encoded after the core's lock is let go, under the
    /// dispatch lock taken before, so frames for one connection leave in
    /// the order the broker decided them. What `f`
    /// stored is durable when this returns (the fsync ran under the lock).
    pub(crate) fn with_core(&self, f: impl FnOnce(&mut Broker<Store>, Nanos)) {
        self.run_core(f, Commit::InPlace);
    }

    /// Like [`Shared::with_core`], but the fsync runs on the group-commit
    /// thread (`group_commit.rs`), without the lock: what must wait for it
    /// (acknowledgements, deliveries of stored messages) leaves when it is
    /// done, everything else at once.
    pub(crate) fn with_core_deferred(&self, f: impl FnOnce(&mut Broker<Store>, Nanos)) {
        self.run_core(f, Commit::Deferred(None));
    }

    /// [`Shared::with_core_deferred`] for a batch of `conn`'s: the commit
    /// thread counts the connections whose batches an fsync covers.
    pub(crate) fn with_core_deferred_for(
        &self,
        conn: ConnId,
        f: impl FnOnce(&mut Broker<Store>, Nanos),
    ) {
        self.run_core(f, Commit::Deferred(Some(conn)));
    }

    /// For the group-commit thread itself: deferred, without waking it.
    pub(crate) fn with_core_committing(&self, f: impl FnOnce(&mut Broker<Store>, Nanos)) {
        self.run_core(f, Commit::Committing);
    }

    pub(crate) fn run_core(&self, f: impl FnOnce(&mut Broker<Store>, Nanos), commit: Commit) {
        let mut core = self.core();
        let now = self.clock.now();
        core.set_wall_offset(self.clock.wall_offset(now));
        core.set_tapping(self.tails.any());
        f(&mut core, now);
        let mut actions = Vec::new();
        let mut wake_committer = None;
        let mut backend_sync = None;
        if self.backend_syncs.attached() {
            // A cluster backend's sync waits on the network for answers
            // that this runtime's tasks deliver: never in place, and no
            // thread waits on it (`backend_sync.rs`).
            core.take_ready_actions(&mut actions);
            backend_sync = self.backend_syncs.begin(&mut core, &mut actions);
        } else if commit == Commit::InPlace || !self.committer.running() {
            core.take_actions(&mut actions);
        } else {
            core.take_ready_actions(&mut actions);
            if let Commit::Deferred(conn) = commit {
                if core.sync_wanted() {
                    wake_committer = Some(conn);
                }
            }
        }
        // Sent under the lock, so every tail sees the core's order.
        for tapped in core.take_taps() {
            self.tails.accepted(tapped);
        }
        // One send per batch, under the lock too: the trace thread sees
        // acceptances before the deliveries and acks that follow them.
        if let Some(tracer) = &self.tracer {
            let mut records = Vec::new();
            let bytes = core.take_traces(&mut records);
            if !records.is_empty() {
                tracer.submit(records, bytes);
            }
        }
        say_alerts(&mut core);
        let checks = core.take_registry_checks();
        self.registry.after_core(core.registry().index(), checks);
        let next_timer = core.next_timer();
        let membership = core.membership_changes();
        // Frames are encoded without the core's lock: the dispatch lock,
        // taken before the core's is let go, keeps every pass's frames in
        // the order the core decided them, while the next pass already
        // changes the state.
        let dispatching = self
            .dispatching
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        drop(core);
        let (cut, full) = self.dispatch(actions);
        drop(dispatching);
        if cut > 0 || !full.is_empty() {
            let mut core = self.core();
            core.metrics_mut().slow_consumers_cut += cut;
            let mut paused = self.paused.lock().unwrap_or_else(|p| p.into_inner());
            for conn in full {
                core.set_paused(conn, true, now);
                paused.insert(conn);
            }
        }
        if let Some(conn) = wake_committer {
            self.committer.wake(conn);
        }
        if let Some(begun) = backend_sync {
            self.backend_syncs.start(begun, commit);
        }
        if let Some(edge) = &self.cluster {
            // Acks free room the fetch loops wait for.
            edge.room.notify_waiters();
            edge.membership.send_if_modified(|seen| {
                let moved = membership > *seen;
                *seen = (*seen).max(membership);
                moved
            });
        }
        if let Some(t) = next_timer {
            if t < self.timer_due.load(Ordering::Relaxed) {
                self.timer_wake.notify_one();
            }
        }
    }

    /// Resumes paused connections whose outbox has drained (on each tick).
    pub(crate) fn resume_drained(&self, core: &mut Broker<Store>, now: Nanos) {
        let mut paused = self.paused.lock().unwrap_or_else(|p| p.into_inner());
        if paused.is_empty() {
            return;
        }
        let outboxes = self.outboxes();
        let low = self.config.pause_bytes / 4;
        paused.retain(|conn| {
            let Some(outbox) = outboxes.get(conn) else {
                return false;
            };
            let mut state = outbox.lock();
            let pending = state.writer.len() + state.writing;
            if pending <= low {
                state.paused = false;
                drop(state);
                core.set_paused(*conn, false, now);
                false
            } else {
                true
            }
        });
    }

    /// Hands a reply to the cluster edge, which sends it to its command's
    /// node; without one (never: only a cluster backend forwards), the
    /// sender hears why.
    fn forward_reply(&self, forward: crate::cluster_edge::Forward) {
        let Some(edge) = &self.cluster else {
            warn!(
                conn = forward.conn,
                "a reply to forward without a cluster backend; dropped"
            );
            return;
        };
        if edge.forwards.send(forward).is_err() {
            warn!("the cluster edge has stopped; a reply was not forwarded");
        }
    }

    /// A delivery to another node's instances through a relay this node
    /// holds (`cluster_edge/relaying.rs`); other actions for a connection
    /// that is gone are dropped.
    fn relay(&self, action: Action) {
        let (
            Some(edge),
            Action::Deliver {
                conn,
                delivery,
                attempt,
                message,
                log_seq,
            },
        ) = (&self.cluster, action)
        else {
            return;
        };
        edge.relays.send(crate::cluster_edge::relaying::Relayed {
            conn,
            delivery,
            attempt,
            message,
            log_seq,
        });
    }

    /// Encodes actions into outboxes; returns how many connections were cut
    /// off as slow consumers, and those now over the pause threshold.
    pub(crate) fn dispatch(&self, actions: Vec<Action>) -> (u64, Vec<ConnId>) {
        if actions.is_empty() {
            return (0, Vec::new());
        }
        self.entries_out
            .fetch_add(actions.len() as u64, Ordering::Relaxed);
        let outboxes = self.outboxes();
        let mut touched: Vec<Arc<Outbox>> = Vec::new();
        let mut slow: Vec<ConnId> = Vec::new();
        let mut full: Vec<ConnId> = Vec::new();
        // Actions for one connection come in runs (a batch of deliveries,
        // a batch of results): one map lookup and one lock per run.
        let mut current: Option<(ConnId, MutexGuard<'_, OutState>)> = None;
        for action in actions {
            // Not for a connection here: for the node its command came from.
            let action = match action {
                Action::ForwardReply {
                    conn,
                    seq,
                    quiet,
                    node,
                    requester,
                    message,
                } => {
                    self.forward_reply(crate::cluster_edge::Forward {
                        conn,
                        seq,
                        quiet,
                        node,
                        requester,
                        message,
                    });
                    continue;
                }
                Action::FindReplyRoute {
                    conn,
                    seq,
                    quiet,
                    message,
                } => {
                    let find = crate::cluster_edge::Find {
                        conn,
                        seq,
                        quiet,
                        message,
                    };
                    match &self.cluster {
                        Some(edge) => {
                            if edge.finds.send(find).is_err() {
                                warn!("the cluster edge has stopped; a reply's route was not asked for");
                            }
                        }
                        None => warn!(
                            conn,
                            "a reply's route to ask for without a cluster backend; dropped"
                        ),
                    }
                    continue;
                }
                Action::ForwardTransient {
                    service,
                    message,
                    traced,
                } => {
                    if let Some(edge) = &self.cluster {
                        let _ = edge.transients.send(crate::cluster_edge::Transient {
                            service,
                            message,
                            traced,
                        });
                    }
                    continue;
                }
                Action::AnswerForwardedReply {
                    answer,
                    code,
                    reason,
                } => {
                    if let Some(edge) = &self.cluster {
                        let _ = edge.answers.send((answer, code, reason));
                    }
                    continue;
                }
                action @ Action::DeadLetterQuery { .. } => {
                    crate::cluster_dead_letters::ask(self, action);
                    continue;
                }
                other => other,
            };
            let conn = match &action {
                Action::Deliver { conn, .. }
                | Action::SendResult { conn, .. }
                | Action::OpResult { conn, .. }
                | Action::Drained { conn }
                | Action::Pong { conn, .. }
                | Action::StartTail { conn, .. }
                | Action::TraceQuery { conn, .. }
                | Action::ServicesQuery { conn, .. }
                | Action::Close { conn, .. }
                | Action::ForwardReply { conn, .. }
                | Action::FindReplyRoute { conn, .. } => *conn,
                Action::ForwardTransient { .. }
                | Action::DeadLetterQuery { .. }
                | Action::AnswerForwardedReply { .. } => continue,
            };
            if current.as_ref().is_none_or(|(c, _)| *c != conn) {
                current = None;
                let Some(outbox) = outboxes.get(&conn) else {
                    self.relay(action);
                    continue;
                };
                if !touched.iter().any(|o| Arc::ptr_eq(o, outbox)) {
                    touched.push(outbox.clone());
                }
                current = Some((conn, outbox.lock()));
            }
            let Some((_, state)) = current.as_mut() else {
                continue;
            };
            if state.closing {
                continue;
            }
            let encoded = match action {
                Action::Deliver {
                    delivery,
                    attempt,
                    message,
                    ..
                } => state.writer.push_delivery(delivery, attempt, &message),
                Action::SendResult {
                    seq,
                    code,
                    reason,
                    log_seq,
                    ..
                } => state.writer.push_send_outcome(seq, code, &reason, log_seq),
                Action::OpResult {
                    request,
                    code,
                    reason,
                    ..
                } => state.writer.push(&Frame::Result(courier_proto::OpResult {
                    request,
                    code,
                    reason,
                })),
                Action::Drained { .. } => state.writer.push(&Frame::Drained),
                Action::Close { code, reason, .. } => {
                    // The core already let go of the connection; the
                    // ERROR follows what was queued before it.
                    warn!(conn, %reason, "closing the connection");
                    let pushed = state.writer.push(&Frame::Error(ErrorFrame {
                        code,
                        message: reason,
                    }));
                    state.closing = true;
                    pushed
                }
                Action::Pong { nonce, .. } => state.writer.push(&Frame::Pong(nonce)),
                Action::ForwardReply { .. }
                | Action::FindReplyRoute { .. }
                | Action::ForwardTransient { .. }
                | Action::DeadLetterQuery { .. }
                | Action::AnswerForwardedReply { .. } => Ok(()),
                Action::StartTail {
                    conn,
                    request,
                    activity_id,
                    filter,
                } => {
                    if let Some(outbox) = outboxes.get(&conn) {
                        self.tails
                            .start_bus_tail(outbox.clone(), request, activity_id, filter);
                    }
                    Ok(())
                }
                Action::ServicesQuery {
                    conn,
                    request,
                    activity_id,
                    listing,
                } => {
                    if let Some(outbox) = outboxes.get(&conn) {
                        answer_services_query(
                            self.cluster.as_ref().map(|edge| edge.node.clone()),
                            outbox.clone(),
                            request,
                            activity_id,
                            listing,
                        );
                    }
                    Ok(())
                }
                Action::TraceQuery {
                    conn,
                    request,
                    activity_id,
                    query,
                } => {
                    if let (Some(outbox), Some(tracer)) = (outboxes.get(&conn), &self.tracer) {
                        answer_trace_query(
                            tracer.clone(),
                            self.cluster.as_ref().map(|edge| edge.node.clone()),
                            outbox.clone(),
                            request,
                            activity_id,
                            query,
                        );
                    }
                    Ok(())
                }
            };
            if let Err(e) = encoded {
                warn!(conn, error = %e, "could not encode a frame; dropped");
            }
            let pending = state.writer.len() + state.writing;
            if pending > self.config.pending_bytes_max {
                if !slow.contains(&conn) {
                    slow.push(conn);
                }
            } else if pending > self.config.pause_bytes && !full.contains(&conn) {
                state.paused = true;
                full.push(conn);
            }
        }
        drop(current);
        for outbox in touched {
            outbox.wake.notify_one();
        }
        let cut = slow.len() as u64;
        full.retain(|c| !slow.contains(c));
        for conn in slow {
            if let Some(outbox) = outboxes.get(&conn) {
                warn!(
                    conn,
                    "slow consumer: outbox over its byte limit; closing the connection"
                );
                let mut state = outbox.lock();
                state.writer.take();
                state.closing = true;
                drop(state);
                outbox.fail(
                    ErrorCode::SlowConsumer,
                    format!(
                        "more than {} bytes were waiting for this connection; read faster or lower max_in_flight",
                        self.config.pending_bytes_max
                    ),
                );
            }
        }
        (cut, full)
    }
}
