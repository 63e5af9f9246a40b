//! Delivering for a replicated backend that keeps delivery state itself
//! (docs/SCALE-OUT.md): a node's core queues nothing it accepts — the
//! store publishes it, and the backend's consumers hand it to whichever
//! node fetches for the receiving service — and it delivers what its edge
//! fetched ([`Broker::fetched`]). What becomes of each delivery is told to
//! the store ([`Upstream`]) instead of journaled: the backend's consumer
//! redelivers, counts attempts and keeps dead letters, shared by every
//! node. The rules of delivery (instances, in-flight limits, keys, pauses,
//! deadlines, expiry) stay this core's, unchanged.

use courier_store::{AckHandle, Upstream};

use super::*;
use crate::journal::Op;

/// A message a node fetched from the backend for one of its services.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub service: String,
    pub message: Arc<Message>,
    /// Deliveries so far, this one included (the backend counts them).
    pub attempt: u32,
    pub handle: AckHandle,
    /// The node the command was accepted on, when another one: its
    /// replies go there.
    pub reply_node: Option<String>,
    /// The accepting node traces the message's activity: this node records
    /// its deliveries and outcomes, whatever its own sampler would say
    /// (that one follows what this node accepts, not what it delivers).
    pub traced: bool,
}

/// Where the replies to a command accepted on another node go.
pub(crate) struct RemoteRoute {
    pub node: String,
    /// The service the command was fetched for: only it may reply here.
    pub service: String,
    /// The service that sent the command: where its replies go when its
    /// node is gone.
    pub requester: String,
}

/// Where a command's replies go, as the node that knows says
/// ([`Broker::reply_route_of`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownReplyRoute {
    /// The node the command was accepted on; `None`: the node answering.
    pub node: Option<String>,
    /// The services the command went to: only they may reply.
    pub receivers: Vec<String>,
    /// The command's sender: its instances elsewhere take the replies if
    /// its node is gone.
    pub requester: String,
}

/// What became of a reply another node forwarded here
/// ([`Broker::remote_reply`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RemoteReply {
    /// The answer for the replier.
    Answer(ErrorCode, String),
    /// It waits for the requester's credit in its flow-controlled stream:
    /// the answer comes later, as [`Action::AnswerForwardedReply`] with
    /// the number given.
    Pending,
    /// The requesting connection is gone and no other instance of its
    /// service is here: the edge offers the reply to the service's
    /// instances on other nodes (then parks it, [`Broker::park_reply`]).
    ToService(String),
}

impl<S: MessageStore> Broker<S> {
    /// Whether delivery state is the backend's (see the module).
    pub fn delivers_upstream(&self) -> bool {
        self.upstream
    }

    /// A journal entry, as the backend's operation: outcomes of fetched
    /// deliveries and subscription changes. Those the next sync must wait
    /// for (subscriptions, dead letters) make the batch dirty, so what
    /// answers them is held until the backend confirmed them.
    pub(crate) fn tell_upstream(&mut self, op: Op) {
        let change = match op {
            Op::Subscribe {
                service,
                pattern,
                ack_deadline_ms,
                max_deliveries,
                ..
            } => {
                // 0 keeps the service's setting (or the default): the
                // backend is told the value in force, its consumers'
                // redelivery timer.
                let svc = self.services.get(&service);
                let ack_deadline_ms = match ack_deadline_ms {
                    0 => svc.map_or(self.config.ack_deadline_ms, |s| s.ack_deadline_ms),
                    ms => ms,
                };
                let max_deliveries = match max_deliveries {
                    0 => svc.map_or(self.config.max_deliveries, |s| s.max_deliveries),
                    n => n,
                };
                Upstream::Subscribe {
                    service,
                    pattern,
                    ack_deadline_ms,
                    max_deliveries,
                    history: std::mem::take(&mut self.history_asked),
                }
            }
            Op::Unsubscribe { service, pattern } => Upstream::Unsubscribe { service, pattern },
            Op::Paused { service, pattern } => Upstream::Pause {
                service,
                pattern,
                whole: self.pausing_whole,
            },
            Op::Resumed { service, pattern } => Upstream::Resume {
                service,
                pattern,
                whole: self.pausing_whole,
            },
            Op::Acked { seq, .. } => return self.store.upstream(Upstream::Ack { seq }),
            Op::Nacked { seq, until, .. } => {
                let delay_ms = until.saturating_sub(self.now) / NANOS_PER_MS;
                return self.store.upstream(Upstream::Nak { seq, delay_ms });
            }
            Op::DeadLettered {
                service,
                seq,
                attempts,
                reason,
                at,
            } => Upstream::DeadLetter {
                service,
                seq,
                attempts,
                reason,
                at,
            },
            Op::Registry(op) => {
                let (service, id) = op.instance();
                return self.replicate_registry_entry(&service, &id, false);
            }
            // The backend counts deliveries and keeps dead letters.
            Op::Delivered { .. } | Op::Revived { .. } | Op::Purged { .. } => return,
        };
        self.dirty = true;
        self.batch_structural = true;
        self.store.upstream(change);
    }

    /// A message the edge fetched for `fetched.service`: held by the store
    /// and queued for the service's instances on this node. Refused (and
    /// given back to the backend at once) when the service has no
    /// subscription here any more.
    pub fn fetched(&mut self, fetched: Fetched, now: Nanos) {
        self.now = now;
        let Fetched {
            service,
            message,
            attempt,
            handle,
            reply_node,
            traced,
        } = fetched;
        let seq = match self.store.hold_fetched(message.clone(), handle, traced) {
            Ok(seq) => seq,
            Err(e) => {
                self.alerts.push(format!(
                    "a fetched message for {service} cannot be held: {e}"
                ));
                return;
            }
        };
        // No instance here consumes it (any more): a relayed delivery can
        // come after the last one left.
        let consumed_here = self.services.get(&service).is_some_and(|s| {
            !s.patterns.is_empty()
                && s.instances
                    .iter()
                    .any(|i| self.conns.get(i).is_some_and(|c| !c.patterns.is_empty()))
        });
        if !consumed_here {
            self.store.upstream(Upstream::Nak { seq, delay_ms: 0 });
            self.store.remove(seq);
            return;
        }
        if let (Some(node), Kind::Command) = (reply_node, message.kind) {
            if self.reply_routes.get(&message.id).is_none() {
                let route = upstream::RemoteRoute {
                    node,
                    service: service.clone(),
                    requester: message.sender.to_string(),
                };
                self.remote_routes.insert(message.id, route, now);
            }
        }
        self.refs.add(seq);
        let entry = Entry::new(seq, attempt.saturating_sub(1), message.key.clone());
        if let Some(svc) = self.services.get_mut(&service) {
            svc.queue.count_in(message.payload.len() as u64);
            svc.queue.make_ready(entry);
        }
        self.pump(&service, now);
    }

    /// How many more messages `service`'s instances on this node can take
    /// now: their free in-flight room, less what already waits here for
    /// them. The edge fetches no more than this, so a node never holds
    /// work it cannot hand out while other nodes could.
    ///
    /// `keyed`: for the keyed lane, whose messages the relays to other
    /// nodes' instances take too (`relays.rs`).
    pub fn fetch_credit(&self, service: &str, keyed: bool) -> u32 {
        let Some(svc) = self.services.get(service) else {
            return 0;
        };
        if svc.is_paused() {
            return 0;
        }
        let relays: &[ConnId] = if keyed { &svc.relays } else { &[] };
        let room: u64 = svc
            .instances
            .iter()
            .chain(relays)
            .filter_map(|i| self.conns.get(i))
            .filter(|c| !c.draining && !c.paused && !c.patterns.is_empty())
            .map(|c| u64::from(c.max_in_flight.saturating_sub(c.in_flight)))
            .sum();
        let waiting = svc.queue.ready.len() as u64;
        u32::try_from(room.saturating_sub(waiting)).unwrap_or(u32::MAX)
    }

    /// Counts the changes of which services have instances and patterns
    /// here (connects, disconnects, subscription changes, the backend's
    /// views): the edge lists [`Broker::consuming_services`] and
    /// [`Broker::services_with_instances`] again only when it moved, not
    /// after every pass.
    pub fn membership_changes(&self) -> u64 {
        self.membership_changes
    }

    /// Services with an instance on this node that consumes: the edge
    /// fetches for these.
    pub fn consuming_services(&self) -> Vec<String> {
        self.services
            .iter()
            .filter(|(_, s)| {
                !s.patterns.is_empty()
                    && s.instances
                        .iter()
                        .any(|i| self.conns.get(i).is_some_and(|c| !c.patterns.is_empty()))
            })
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// The backend's view of `service`'s subscriptions (another node, or
    /// this one, changed them): patterns and pauses as given, none when
    /// `None`. Not told upstream again. Only routing and this node's
    /// queue follow; connections keep the patterns they subscribed.
    pub fn subscriptions_changed(
        &mut self,
        service: &str,
        subscriptions: Option<RemoteSubscriptions>,
        now: Nanos,
    ) {
        self.now = now;
        let subscriptions = subscriptions.unwrap_or_default();
        let config = &self.config;
        let svc = self.services.get_or_insert(service, config);
        if subscriptions.ack_deadline_ms != 0 {
            svc.ack_deadline_ms = subscriptions.ack_deadline_ms;
        }
        if subscriptions.max_deliveries != 0 {
            svc.max_deliveries = subscriptions.max_deliveries;
        }
        let wanted: BTreeSet<String> = subscriptions
            .patterns
            .iter()
            .map(|(p, _)| p.clone())
            .collect();
        let paused: BTreeSet<String> = subscriptions
            .patterns
            .iter()
            .filter(|(_, paused)| *paused)
            .map(|(p, _)| p.clone())
            .collect();
        if svc.patterns == wanted && svc.paused == paused {
            return;
        }
        let gone: Vec<String> = svc.patterns.difference(&wanted).cloned().collect();
        let new: Vec<String> = wanted.difference(&svc.patterns).cloned().collect();
        svc.patterns = wanted;
        svc.paused = paused;
        self.membership_changes += 1;
        for pattern in &gone {
            self.subscribers.remove(pattern, &service.to_string());
        }
        for pattern in &new {
            self.subscribers.insert(pattern, &service.to_string());
        }
        self.routes_changed();
        self.pump(service, now);
        self.give_back_unservable(service);
    }

    /// Gives everything fetched for `service` back to the backend when no
    /// instance here consumes it any more (the last one left, or the
    /// subscription ended): other nodes' instances take it at once
    /// instead of after the backend's ack deadline.
    pub(crate) fn give_back_unservable(&mut self, service: &str) {
        let Some(svc) = self.services.get_mut(service) else {
            return;
        };
        let consumed_here = !svc.patterns.is_empty()
            && svc
                .instances
                .iter()
                .any(|i| self.conns.get(i).is_some_and(|c| !c.patterns.is_empty()));
        if consumed_here {
            return;
        }
        // In the order fetched (the backend's): it hands them out again in
        // the order given back, and a key must come back in its order.
        let mut seqs = svc.queue.drain_all();
        seqs.sort_unstable();
        for seq in seqs {
            // Unsettled: the store gives it back to the backend.
            release(&mut self.store, &mut self.refs, seq);
        }
        for instance in svc.instances.iter().chain(&svc.relays) {
            if let Some(c) = self.conns.get_mut(instance) {
                c.in_flight = 0;
            }
        }
    }

    /// This node holds `service`'s keyed lane now: it fetches the keyed
    /// messages, so a failed one (nack, deadline, its instance gone) is
    /// retried here, in its key's line, instead of going back to the
    /// backend — whose redelivery would come after the key's later
    /// messages already on their way here.
    ///
    /// What it holds of the lane and has not handed out came through the
    /// last holder's relay: it goes back now (its outcome to that holder,
    /// which is gone or no longer leads), or it would go out here before
    /// the key's earlier messages the last holder had out, which come to
    /// this node again after the backend's ack deadline.
    pub fn keyed_lane_gained(&mut self, service: &str, now: Nanos) {
        self.give_back_keyed_held(service, now);
        let config = &self.config;
        self.services.get_or_insert(service, config).keyed_lane_here = true;
    }

    /// This node no longer holds `service`'s keyed lane (its lease ended):
    /// every keyed message it fetched and has not handed out goes back to
    /// the backend now, in the order fetched, for the next holder — kept,
    /// it would go to an instance here after the next holder began. What
    /// is out stays out: its ack still counts, and a deadline that passes
    /// gives it back as ever.
    pub fn keyed_lane_lost(&mut self, service: &str, now: Nanos) {
        if let Some(svc) = self.services.get_mut(service) {
            svc.keyed_lane_here = false;
        }
        self.give_back_keyed_held(service, now);
    }

    /// Another relay now brings `service`'s keyed messages to this node
    /// (its pull is answered by a new holder of the lane, or by a new
    /// relay of the same one): what is held here and not handed out goes
    /// back to whoever relayed it. Kept, it could go out here after the
    /// key's earlier messages, which come again through the new relay.
    pub fn keyed_relay_moved(&mut self, service: &str, now: Nanos) {
        self.give_back_keyed_held(service, now);
    }

    /// Every keyed message of `service` held here and not out goes back,
    /// in the order fetched.
    fn give_back_keyed_held(&mut self, service: &str, now: Nanos) {
        self.now = now;
        let Some(svc) = self.services.get_mut(service) else {
            return;
        };
        let back = svc.queue.give_back_keyed();
        for entry in back {
            let bytes = match self.store.get(entry.seq) {
                Ok(Some(message)) => message.payload.len() as u64,
                _ => 0,
            };
            if let Some(svc) = self.services.get_mut(service) {
                svc.queue.count_out(bytes);
            }
            self.journal(Op::Nacked {
                service: service.to_string(),
                seq: entry.seq,
                until: now,
            });
            release(&mut self.store, &mut self.refs, entry.seq);
        }
    }

    /// A reply from `conn` to a command fetched here that was accepted on
    /// another node: it goes there ([`Action::ForwardReply`]), and the
    /// send is answered when that node has taken it. `None`: the command
    /// is not one of those.
    pub(crate) fn forward_reply(
        &mut self,
        conn: ConnId,
        seq: u64,
        quiet: bool,
        message: &Arc<Message>,
    ) -> Result<Option<ReplyFate>, (ErrorCode, String)> {
        let Some(command) = message.response_to else {
            return Ok(None);
        };
        let Some(route) = self.remote_routes.get(&command) else {
            return Ok(None);
        };
        if route.service != message.sender.as_str() {
            return Err((
                ErrorCode::Unauthorized,
                format!(
                    "service {} may not reply to command {command}: it was not delivered to {}",
                    message.sender, message.sender
                ),
            ));
        }
        let (node, requester) = (route.node.clone(), route.requester.clone());
        if message.is_final {
            self.remote_routes.remove(&command);
        }
        self.actions.push(Action::ForwardReply {
            conn,
            seq,
            quiet,
            node,
            requester,
            message: message.clone(),
        });
        Ok(Some(ReplyFate::Held))
    }

    /// A reply from `conn` to a command this node neither accepted nor
    /// fetched — its replier reconnected here while handling it: the
    /// edge asks the other nodes where its replies go
    /// ([`Action::FindReplyRoute`]), and [`Broker::reply_route_found`]
    /// takes their answer.
    pub(crate) fn find_reply_route(
        &mut self,
        conn: ConnId,
        seq: u64,
        quiet: bool,
        message: &Arc<Message>,
    ) -> ReplyFate {
        self.actions.push(Action::FindReplyRoute {
            conn,
            seq,
            quiet,
            message: message.clone(),
        });
        ReplyFate::Held
    }

    /// Where the replies to `command` go, if this node knows: it accepted
    /// the command (`node` is `None`: here), or it fetched the command
    /// for one of its instances. Asked for another node's
    /// [`Action::FindReplyRoute`].
    pub fn reply_route_of(&self, command: Uuid) -> Option<KnownReplyRoute> {
        if let Some(route) = self.reply_routes.get(&command) {
            return Some(KnownReplyRoute {
                node: None,
                receivers: route.receivers.clone(),
                requester: route.service.clone(),
            });
        }
        self.remote_routes
            .get(&command)
            .map(|route| KnownReplyRoute {
                node: Some(route.node.clone()),
                receivers: vec![route.service.clone()],
                requester: route.requester.clone(),
            })
    }

    /// The other nodes' answer to [`Action::FindReplyRoute`]: the reply
    /// goes to the node its command was accepted on, as a reply to a
    /// command fetched here does ([`Action::ForwardReply`]); `None` (no
    /// node knows the command) refuses it as one broker does.
    pub fn reply_route_found(
        &mut self,
        conn: ConnId,
        seq: u64,
        quiet: bool,
        message: Arc<Message>,
        found: Option<(String, KnownReplyRoute)>,
        now: Nanos,
    ) {
        self.now = now;
        let Some(command) = message.response_to else {
            self.metrics.refused += 1;
            let reason = "reply without response_to".to_string();
            self.send_result(conn, seq, ErrorCode::InvalidMessage, reason);
            return;
        };
        let Some((node, route)) = found else {
            self.metrics.refused += 1;
            self.send_result(
                conn,
                seq,
                ErrorCode::UnknownRequest,
                format!("no command {command} awaits replies (it finished, timed out, or was never sent)"),
            );
            return;
        };
        if !route.receivers.iter().any(|r| *r == message.sender) {
            self.metrics.refused += 1;
            self.send_result(
                conn,
                seq,
                ErrorCode::Unauthorized,
                format!(
                    "service {} may not reply to command {command}: it was not delivered to {}",
                    message.sender, message.sender
                ),
            );
            return;
        }
        // Later replies of a stream go straight there.
        if !message.is_final {
            let remote = RemoteRoute {
                node: node.clone(),
                service: message.sender.to_string(),
                requester: route.requester.clone(),
            };
            self.remote_routes.insert(command, remote, now);
        }
        self.actions.push(Action::ForwardReply {
            conn,
            seq,
            quiet,
            node,
            requester: route.requester,
            message,
        });
    }

    /// How the requester's node took a reply this node forwarded
    /// ([`Action::ForwardReply`]): the replier's send is answered with it.
    pub fn forwarded_reply_answer(
        &mut self,
        conn: ConnId,
        seq: u64,
        quiet: bool,
        code: ErrorCode,
        reason: String,
    ) {
        if code == ErrorCode::Ok {
            self.metrics.accepted += 1;
            if quiet {
                return;
            }
        } else {
            self.metrics.refused += 1;
        }
        self.send_result(conn, seq, code, reason);
    }

    /// A reply another node forwarded to the command's requester on this
    /// one (its sender already stamped and checked there): routed as a
    /// reply sent here would be — to the requesting connection, else to
    /// another instance of its service here, else
    /// [`RemoteReply::ToService`]: its instance may have moved to another
    /// node.
    pub fn remote_reply(&mut self, message: Arc<Message>, answer: u64, now: Nanos) -> RemoteReply {
        self.now = now;
        let Some(command) = message.response_to else {
            return RemoteReply::Answer(
                ErrorCode::InvalidMessage,
                "reply without response_to".to_string(),
            );
        };
        let Some(route) = self.reply_routes.get(&command) else {
            return RemoteReply::Answer(
                ErrorCode::UnknownRequest,
                format!("no command {command} awaits replies (it finished, timed out, or was never sent)"),
            );
        };
        if !route.receivers.iter().any(|r| *r == message.sender) {
            return RemoteReply::Answer(
                ErrorCode::Unauthorized,
                format!(
                    "service {} may not reply to command {command}: it was not delivered to {}",
                    message.sender, message.sender
                ),
            );
        }
        let service = route.service.clone();
        let (route_conn, command_slot, accepted_at) =
            (route.conn, route.command, route.accepted_at);
        // A flow-controlled stream's window is the requester's, kept here:
        // a forwarded reply waits for its credit as a reply sent here
        // does, and its node hears the answer when it goes out.
        let stream = self
            .reply_routes
            .get_mut(&command)
            .and_then(|r| r.stream.take());
        if let Some(stream) = stream {
            let sender = streams::ReplySender::Remote { answer };
            let fate = self.route_stream_reply(sender, message.clone(), stream, now);
            return match fate {
                Ok(fate) => {
                    self.count_reply(command_slot, accepted_at, &message, &service);
                    match fate {
                        ReplyFate::Delivered => RemoteReply::Answer(ErrorCode::Ok, String::new()),
                        ReplyFate::Held => RemoteReply::Pending,
                        ReplyFate::Discarded(reason) => RemoteReply::Answer(ErrorCode::Ok, reason),
                    }
                }
                Err((code, reason)) => RemoteReply::Answer(code, reason),
            };
        }
        self.count_reply(command_slot, accepted_at, &message, &service);
        if message.is_final {
            if let Some(route) = self.reply_routes.remove(&command) {
                if let Some(c) = self.conns.get_mut(&route.conn) {
                    c.streams.remove(&command);
                }
            }
        }
        match self.reply_target(Some(route_conn), &service) {
            Some(conn) => {
                self.deliver_untracked(conn, message);
                RemoteReply::Answer(ErrorCode::Ok, String::new())
            }
            None => RemoteReply::ToService(service),
        }
    }

    /// A reply offered to `service`'s instances here (its requester's node
    /// is gone, or its requester left that node): delivered to one of
    /// them, as a parked reply is — the instance that sent the command
    /// knows it by its `response_to`. Returns the answer for the replier;
    /// `None` if no instance of `service` is here.
    pub fn reply_to_service(
        &mut self,
        service: &str,
        message: Arc<Message>,
        now: Nanos,
    ) -> Option<(ErrorCode, String)> {
        self.now = now;
        let conn = self.reply_target(None, service)?;
        self.deliver_untracked(conn, message);
        Some((ErrorCode::Ok, String::new()))
    }

    /// Services with an instance connected here: each takes the replies
    /// other nodes offer it ([`Broker::reply_to_service`]).
    pub fn services_with_instances(&self) -> Vec<String> {
        self.services
            .iter()
            .filter(|(_, s)| !s.instances.is_empty())
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// A transient message another node offered to `service`'s instances
    /// here ([`Action::ForwardTransient`]): delivered to one of them, or
    /// dropped, at most once as always. A command's replies go back to
    /// `reply_node`, the node that accepted it; `traced`: that node traces
    /// its activity.
    pub fn remote_transient(
        &mut self,
        service: &str,
        message: Arc<Message>,
        reply_node: Option<String>,
        traced: bool,
        now: Nanos,
    ) {
        self.now = now;
        if let (Some(node), Kind::Command) = (reply_node, message.kind) {
            if self.reply_routes.get(&message.id).is_none() {
                let route = RemoteRoute {
                    node,
                    service: service.to_string(),
                    requester: message.sender.to_string(),
                };
                self.remote_routes.insert(message.id, route, now);
            }
        }
        self.deliver_transient(service, &message, traced, true);
    }
}

/// A service's subscriptions as the backend holds them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RemoteSubscriptions {
    pub ack_deadline_ms: u32,
    pub max_deliveries: u32,
    /// Each pattern and whether it is paused.
    pub patterns: Vec<(String, bool)>,
}
