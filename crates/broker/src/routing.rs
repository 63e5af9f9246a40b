//! Routing accepted commands, events and replies to services and instances.

use super::*;

impl<S: MessageStore> Broker<S> {
    /// Routes a command or event to every service whose subscriptions match.
    pub(crate) fn route(
        &mut self,
        conn: ConnId,
        mut message: Arc<Message>,
        now: Nanos,
    ) -> Result<Seq, (ErrorCode, String)> {
        let targets = self.receivers(&message.name, message.version.major);
        if targets.is_empty() {
            if message.kind == Kind::Command {
                let reason = if self.manifest.is_some() {
                    format!(
                        "no service may receive {} at major version {} and is subscribed to it; check the receives of courier.toml",
                        message.name, message.version.major
                    )
                } else {
                    format!(
                        "no service receives {}; subscribe a service to it first",
                        message.name
                    )
                };
                return Err((ErrorCode::NoReceiver, reason));
            }
            self.metrics.dropped_unrouted += 1;
            let traced = self.sample(&message);
            self.record_accepted(traced, &message, 0, &targets);
            self.tap(&message, targets);
            if !message.transient {
                // Kept for history replay (`--from`) until retention ends;
                // no service holds a reference.
                let seq = self
                    .store
                    .append_traced(message, traced)
                    .map_err(|e| (ErrorCode::StorageFailed, format!("not stored: {e}")))?;
                self.dirty = true;
                self.batch_appended = true;
                self.store.remove(seq);
                return Ok(seq);
            }
            return Ok(0);
        }
        if message.kind == Kind::Command {
            let command = self.traffic.slot(&message.name);
            let window = streams::requested_window(&message).ok().flatten();
            self.remember_reply_route(conn, message.id, command, targets.to_vec(), window, now);
        }
        if !message.transient {
            // The store keeps recent messages cached and the queue keeps
            // keys: their own copies let the read buffer be reused in place
            // instead of being pinned, then freed, 64 KiB at a time.
            Arc::make_mut(&mut message).detach();
        }
        if message.transient {
            let traced = self.sample(&message);
            self.record_accepted(traced, &message, 0, &targets);
            self.tap(&message, targets.clone());
            for service in targets.iter() {
                self.deliver_transient(service, &message, traced, false);
            }
            return Ok(0);
        }
        // Decided before it is stored: a backend carries the answer to the
        // nodes that deliver it.
        let traced = self.sample(&message);
        let seq = self
            .store
            .append_traced(message.clone(), traced)
            .map_err(|e| (ErrorCode::StorageFailed, format!("not stored: {e}")))?;
        self.dirty = true;
        self.batch_appended = true;
        // Before its deliveries (in `pump` below): records keep the order
        // things happened in.
        self.record_accepted(traced, &message, seq, &targets);
        if self.upstream {
            // The backend's consumers deliver it, on whichever node
            // fetches for each receiver (`upstream.rs`).
            self.tap(&message, targets.clone());
            return Ok(seq);
        }
        self.enqueue(seq, &message, &targets, now);
        self.tap(&message, targets.clone());
        for service in targets.iter() {
            self.pump(service, now);
        }
        Ok(seq)
    }

    /// Services whose subscriptions match `name`, in name order.
    /// With a manifest, only services it allows to receive `name` at
    /// `major` count: a wildcard subscription is cut down to what is allowed.
    ///
    /// Found through the pattern index (`courier_proto::pattern_index`), and cached per
    /// name and major version: matching patterns and asking the manifest
    /// for every routed message was the largest cost of a send. Every
    /// change to patterns or the manifest empties the cache.
    pub(crate) fn receivers(&mut self, name: &str, major: u16) -> Receivers {
        if let Some(hit) = self
            .route_cache
            .get(name)
            .and_then(|per_major| per_major.iter().find(|(m, _)| *m == major))
        {
            return hit.1.clone();
        }
        // The index, not a scan: a miss costs the name's segments and the
        // matches, however many subscriptions there are.
        let mut matched: Vec<&String> = Vec::new();
        self.subscribers.matching_into(name, &mut matched);
        matched.sort_unstable();
        matched.dedup();
        let targets: Receivers = matched
            .into_iter()
            .filter(|n| {
                self.manifest
                    .as_ref()
                    .is_none_or(|m| m.may_receive(n, name, major).is_ok())
            })
            .cloned()
            .collect();
        if self.route_cache.len() >= ROUTE_CACHE_NAMES_MAX {
            self.route_cache.clear();
        }
        self.route_cache
            .entry(name.to_string())
            .or_default()
            .push((major, targets.clone()));
        targets
    }

    /// Forgets every cached route: patterns or the manifest changed.
    pub(crate) fn routes_changed(&mut self) {
        self.route_cache.clear();
    }

    /// Puts a stored message into the queue of each target service.
    pub(crate) fn enqueue(&mut self, seq: Seq, message: &Message, targets: &[String], now: Nanos) {
        let deliver_at = message.deliver_at.map(|at| self.broker_time_at(at));
        for service in targets {
            let Some(svc) = self.services.get_mut(service) else {
                continue;
            };
            self.refs.add(seq);
            svc.queue.count_in(message.payload.len() as u64);
            let entry = Entry::new(seq, 0, message.key.clone());
            if !svc.waiting.is_empty() {
                // Behind an unfinished history replay (`backfill.rs`).
                svc.waiting
                    .push_back(backfill::Waiting::Routed(entry, deliver_at));
                continue;
            }
            match deliver_at {
                Some(at) if at > now => svc.queue.defer(at, entry),
                _ => svc.queue.make_ready(entry),
            }
        }
    }

    pub(crate) fn remember_reply_route(
        &mut self,
        conn: ConnId,
        command: Uuid,
        command_name: stats::Slot,
        receivers: Vec<String>,
        window: Option<u32>,
        now: Nanos,
    ) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if window.is_some() {
            c.streams.insert(command);
        }
        let route = ReplyRoute {
            service: c.service.to_string(),
            conn,
            receivers,
            command: command_name,
            accepted_at: now,
            stream: window.map(|w| Box::new(Stream::new(conn, w))),
        };
        if let Some((old, route)) = self.reply_routes.insert(command, route, now) {
            if let Some(stream) = route.stream {
                self.expire_stream(
                    old,
                    stream,
                    "was forgotten: too many commands await replies",
                );
            }
        }
    }

    /// `traced`: the accepting node's sampler picked its activity;
    /// `remote`: it came from another node already, and goes no further.
    pub(crate) fn deliver_transient(
        &mut self,
        service: &str,
        message: &Arc<Message>,
        traced: bool,
        remote: bool,
    ) {
        let Some(svc) = self.services.get_mut(service) else {
            return;
        };
        if !svc.paused.is_empty() && !svc.takes_now(&message.name) {
            // At most once: not kept for a paused subscription either.
            self.metrics.transient_dropped_paused += 1;
            return;
        }
        let n = svc.instances.len();
        let mut paused = false;
        for k in 0..n {
            let idx = (svc.next_instance + k) % n;
            let conn = svc.instances[idx];
            let Some(c) = self.conns.get(&conn) else {
                continue;
            };
            if !c.wants(&message.name) {
                continue;
            }
            if c.paused {
                paused = true;
                continue;
            }
            svc.next_instance = idx + 1;
            self.deliver_untracked_as(conn, message.clone(), traced);
            return;
        }
        if paused {
            self.metrics.transient_dropped_paused += 1;
        } else if self.upstream && !remote {
            // No instance here takes it: one on another node may
            // (`Action::ForwardTransient`), at most once as always.
            self.actions.push(Action::ForwardTransient {
                service: service.to_string(),
                message: message.clone(),
                traced,
            });
        } else {
            self.metrics.dropped_unrouted += 1;
        }
    }

    /// A delivery that needs no ack (a reply, a transient message): nothing
    /// is kept in flight for it, and acks for it are ignored.
    pub(crate) fn deliver_untracked(&mut self, conn: ConnId, message: Arc<Message>) {
        // The broker's own answers belong to no traced activity.
        let traced =
            !message.name.starts_with(SYSTEM_PREFIX) && traces(&self.sampler, &message, self.now);
        self.deliver_untracked_as(conn, message, traced);
    }

    /// [`Broker::deliver_untracked`] of a message whose activity is
    /// `traced` or not.
    pub(crate) fn deliver_untracked_as(
        &mut self,
        conn: ConnId,
        message: Arc<Message>,
        traced: bool,
    ) {
        self.next_delivery += 1;
        self.metrics.delivered += 1;
        let wall_now = self.wall(self.now);
        if let Some(c) = self.conns.get(&conn) {
            let counted = self.traffic.locate(&message.name, &c.service);
            self.traffic.at(counted).delivered += 1;
            if traced && self.sampler.is_some() {
                push_trace(
                    &mut self.traces,
                    &mut self.traces_bytes,
                    TraceRecord::Delivered {
                        message: message.clone(),
                        seq: 0,
                        service: c.service.clone(),
                        instance: c.instance.clone(),
                        attempt: 1,
                        at: wall_now,
                    },
                );
            }
        }
        self.actions.push(Action::Deliver {
            conn,
            delivery: self.next_delivery,
            attempt: 1,
            message,
            log_seq: 0,
        });
    }

    /// A reply goes to the connection that sent the command, else to another
    /// instance of its service, else it waits for one — unless its command
    /// asked for a flow-controlled stream (`streams.rs`).
    pub(crate) fn route_reply(
        &mut self,
        conn: ConnId,
        seq: u64,
        quiet: bool,
        message: Arc<Message>,
        now: Nanos,
    ) -> Result<ReplyFate, (ErrorCode, String)> {
        let Some(command) = message.response_to else {
            return Err((
                ErrorCode::InvalidMessage,
                "reply without response_to".to_string(),
            ));
        };
        if self.upstream && self.reply_routes.get(&command).is_none() {
            if let Some(forward) = self.forward_reply(conn, seq, quiet, &message)? {
                return Ok(forward);
            }
            return Ok(self.find_reply_route(conn, seq, quiet, &message));
        }
        let Some(route) = self.reply_routes.get(&command) else {
            return Err((
                ErrorCode::UnknownRequest,
                format!("no command {command} awaits replies (it finished, timed out, or was never sent)"),
            ));
        };
        if !route.receivers.iter().any(|r| *r == message.sender) {
            return Err((
                ErrorCode::Unauthorized,
                format!(
                    "service {} may not reply to command {command}: it was not delivered to {}",
                    message.sender, message.sender
                ),
            ));
        }
        let service = route.service.clone();
        let (route_conn, command_slot, accepted_at) =
            (route.conn, route.command, route.accepted_at);
        if route.stream.is_some() {
            let stream = self
                .reply_routes
                .get_mut(&command)
                .and_then(|r| r.stream.take());
            if let Some(stream) = stream {
                let reply = message.clone();
                let sender = streams::ReplySender::Local { conn, seq, quiet };
                let fate = self.route_stream_reply(sender, message, stream, now)?;
                self.count_reply(command_slot, accepted_at, &reply, &service);
                return Ok(fate);
            }
        }
        self.count_reply(command_slot, accepted_at, &message, &service);
        let target = self.reply_target(Some(route_conn), &service);
        if message.is_final {
            self.reply_routes.remove(&command);
        }
        match target {
            Some(conn) => {
                self.deliver_untracked(conn, message);
            }
            None => self.park_reply(&service, message),
        }
        Ok(ReplyFate::Delivered)
    }

    /// Where a reply goes: the requesting connection if it is still here,
    /// else another instance of its `service` here (the reply names its
    /// command, which the instance that sent it knows).
    pub(crate) fn reply_target(&self, requester: Option<ConnId>, service: &str) -> Option<ConnId> {
        if let Some(requester) = requester.filter(|r| self.conns.contains_key(r)) {
            return Some(requester);
        }
        self.services
            .get(service)
            .and_then(|s| s.instances.first().copied())
    }

    /// Keeps a reply for `service` until one of its instances connects
    /// here (at most `parked_replies_max` per service, the oldest dropped).
    pub fn park_reply(&mut self, service: &str, message: Arc<Message>) {
        let config = &self.config;
        let svc = self.services.get_or_insert(service, config);
        if svc.parked_replies.len() >= self.config.parked_replies_max {
            svc.parked_replies.pop_front();
            self.metrics.replies_dropped += 1;
        }
        let mut message = message;
        Arc::make_mut(&mut message).detach();
        svc.parked_replies.push_back(message);
        self.metrics.replies_parked += 1;
    }

    /// Counts an accepted reply for its command's outcomes (and the
    /// latency to the final one), and shows it to the tails and traces.
    pub(crate) fn count_reply(
        &mut self,
        command: stats::Slot,
        accepted_at: Nanos,
        message: &Arc<Message>,
        requester: &str,
    ) {
        self.traffic.outcome(command, &message.name);
        if message.is_final && accepted_at != 0 {
            let latency = self.now.saturating_sub(accepted_at);
            self.traffic.final_reply(command, latency);
        }
        let traced = self.sample(message);
        if self.tapping || traced {
            // Only then: a reply's receivers are made for it alone.
            let requester: Receivers = Arc::from([requester.to_string()]);
            if traced {
                self.trace(TraceRecord::Accepted {
                    message: message.clone(),
                    seq: 0,
                    receivers: requester.clone(),
                });
            }
            self.tap(message, requester);
        }
    }

    /// An instance for a message named `name` that no connection holds
    /// the key of, in turn; a keyed one may go to a relay too
    /// (`relays.rs`), counted after the instances here.
    pub(crate) fn pick(&mut self, service: &str, name: &str, keyed: bool) -> Pick {
        let Some(svc) = self.services.get_mut(service) else {
            return Pick::NoneMatching;
        };
        let local = svc.instances.len();
        let n = if keyed {
            local + svc.relays.len()
        } else {
            local
        };
        let mut any_matching = false;
        for k in 0..n {
            let idx = (svc.next_instance + k) % n;
            let conn = match svc.instances.get(idx) {
                Some(conn) => *conn,
                None => svc.relays[idx - local],
            };
            let Some(c) = self.conns.get(&conn) else {
                continue;
            };
            if !c.wants(name) {
                continue;
            }
            any_matching = true;
            // An instance whose checks are critical is passed over, as if
            // busy, until it recovers.
            if c.in_flight < c.max_in_flight
                && !c.paused
                && self.registry.is_routable(service, &c.instance)
            {
                svc.next_instance = idx + 1;
                return Pick::Conn(conn);
            }
        }
        if any_matching {
            Pick::AllBusy
        } else {
            Pick::NoneMatching
        }
    }

    /// Whether `conn`, which holds the key of a message named `name`, can
    /// take it now.
    pub(crate) fn pick_holder(&self, service: &str, conn: ConnId, name: &str) -> Pick {
        match self.conns.get(&conn) {
            Some(c)
                if c.wants(name)
                    && c.in_flight < c.max_in_flight
                    && !c.paused
                    && self.registry.is_routable(service, &c.instance) =>
            {
                Pick::Conn(conn)
            }
            _ => Pick::AllBusy,
        }
    }
}
