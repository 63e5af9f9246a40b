//! Subscriptions of services: subscribing (with backfill from the log),
//! unsubscribing, and pausing or resuming a subscription.

use super::*;

impl<S: MessageStore> Broker<S> {
    /// The connection's service subscribes to `pattern` and this connection
    /// consumes it. The subscription belongs to the service: it outlives
    /// the connection until [`Broker::unsubscribe`].
    #[allow(clippy::too_many_arguments)] // one per SUBSCRIBE field
    pub fn subscribe(
        &mut self,
        conn: ConnId,
        request: u64,
        pattern: &str,
        ack_deadline_ms: u32,
        max_deliveries: u32,
        from: StartFrom,
        now: Nanos,
    ) {
        self.now = now;
        if let Err(e) = validate_pattern(pattern) {
            return self.op_result(conn, request, ErrorCode::InvalidPattern, e.to_string());
        }
        let Some(service) = self.conns.get(&conn).map(|c| c.service.to_string()) else {
            return;
        };
        if let Some(manifest) = &self.manifest {
            // Deliveries are filtered by `may_receive` message by message;
            // a subscription that could never receive anything is refused.
            if let Err(denial) = manifest.cut_subscription(&service, pattern) {
                self.metrics.unauthorized += 1;
                return self.op_result(conn, request, ErrorCode::Unauthorized, denial.to_string());
            }
        }
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        c.patterns.insert(pattern);
        self.membership_changes += 1;
        let service = c.service.to_string();
        let existing = self.services.get(&service);
        let is_new = !existing.is_some_and(|s| s.patterns.contains(pattern));
        let settings_change = existing.is_none_or(|s| {
            (ack_deadline_ms != 0 && ack_deadline_ms != s.ack_deadline_ms)
                || (max_deliveries != 0 && max_deliveries != s.max_deliveries)
        });
        if self.degraded && (is_new || settings_change) {
            return self.op_result(
                conn,
                request,
                ErrorCode::StorageFailed,
                "the broker's disk is failing; a new subscription cannot be made durable now — retry later".to_string(),
            );
        }
        // On a backend, the history is the backend's to replay: it is
        // asked for with the change (and kept to when the pattern is new
        // to the service cluster-wide).
        let from_seq = if is_new && !self.upstream {
            self.start_seq(from)
        } else {
            0
        };
        if self.upstream {
            self.history_asked = if is_new { from } else { StartFrom::New };
        }
        // On a backend, a pattern known from another node's subscription
        // is told again: the backend's write is idempotent and makes sure
        // the service's consumers exist before the RESULT.
        if is_new || settings_change || self.upstream {
            let op_seq = self.journal(Op::Subscribe {
                service: service.clone(),
                pattern: pattern.to_string(),
                ack_deadline_ms,
                max_deliveries,
                from_seq,
            });
            self.apply_subscribe(&service, pattern, ack_deadline_ms, max_deliveries);
            if from_seq > 0 {
                self.start_backfill(&service, pattern, from_seq, op_seq, now);
            }
            // The subscription is only promised once it is durable.
            self.unsynced.push(Action::OpResult {
                conn,
                request,
                code: ErrorCode::Ok,
                reason: String::new(),
            });
        } else {
            self.op_result(conn, request, ErrorCode::Ok, String::new());
        }
        self.pump(&service, now);
    }

    /// The first seq a new subscription reads from (0: only new messages).
    pub(crate) fn start_seq(&mut self, from: StartFrom) -> Seq {
        match from {
            StartFrom::New => 0,
            StartFrom::Beginning => 1,
            StartFrom::Time(t) => match self.store.seq_at_time(t) {
                Ok(seq) => seq.max(1),
                Err(e) => {
                    self.alerts
                        .push(format!("cannot look up the log by time: {e}"));
                    0
                }
            },
        }
    }

    pub(crate) fn apply_subscribe(
        &mut self,
        service: &str,
        pattern: &str,
        ack_deadline_ms: u32,
        max_deliveries: u32,
    ) {
        let config = &self.config;
        let svc = self.services.get_or_insert(service, config);
        if svc.patterns.insert(pattern.to_string()) {
            self.subscribers.insert(pattern, &service.to_string());
            self.route_cache.clear();
            self.membership_changes += 1;
        }
        if ack_deadline_ms != 0 {
            svc.ack_deadline_ms = ack_deadline_ms;
        }
        if max_deliveries != 0 {
            svc.max_deliveries = max_deliveries;
        }
    }

    /// Removes the service's subscription to `pattern`. With its last
    /// subscription gone, the messages waiting for the service go too.
    pub fn unsubscribe(&mut self, conn: ConnId, request: u64, pattern: &str) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        let service = c.service.to_string();
        if self.degraded {
            return self.op_result(
                conn,
                request,
                ErrorCode::StorageFailed,
                "the broker's disk is failing; retry the unsubscribe later".to_string(),
            );
        }
        if let Err(reason) = self.apply_unsubscribe(&service, pattern) {
            return self.op_result(conn, request, ErrorCode::NotSubscribed, reason);
        }
        self.journal(Op::Unsubscribe {
            service,
            pattern: pattern.to_string(),
        });
        self.unsynced.push(Action::OpResult {
            conn,
            request,
            code: ErrorCode::Ok,
            reason: String::new(),
        });
    }

    pub(crate) fn apply_unsubscribe(&mut self, service: &str, pattern: &str) -> Result<(), String> {
        let Some(svc) = self.services.get_mut(service) else {
            return Err(format!("service {service} has no subscriptions"));
        };
        if !svc.patterns.remove(pattern) {
            return Err(format!("service {service} is not subscribed to {pattern}"));
        }
        svc.paused.remove(pattern);
        self.subscribers.remove(pattern, &service.to_string());
        self.route_cache.clear();
        self.membership_changes += 1;
        for instance in svc.instances.iter().chain(&svc.relays) {
            if let Some(c) = self.conns.get_mut(instance) {
                c.patterns.remove(pattern);
            }
        }
        if svc.patterns.is_empty() {
            for seq in svc.queue.drain_all() {
                release(&mut self.store, &mut self.refs, seq);
            }
            for waiting in std::mem::take(&mut svc.waiting) {
                if let backfill::Waiting::Routed(entry, _) = waiting {
                    release(&mut self.store, &mut self.refs, entry.seq);
                }
            }
            for instance in svc.instances.iter().chain(&svc.relays) {
                if let Some(c) = self.conns.get_mut(instance) {
                    c.in_flight = 0;
                }
            }
        }
        if svc.is_idle() {
            self.services.remove(service);
        }
        Ok(())
    }

    pub(crate) fn op_result(
        &mut self,
        conn: ConnId,
        request: u64,
        code: ErrorCode,
        reason: String,
    ) {
        self.actions.push(Action::OpResult {
            conn,
            request,
            code,
            reason,
        });
    }

    /// Pauses the service's subscription to `pattern` (every one of them
    /// with `None`): messages it alone takes wait in the queue, counted in
    /// the backlog, until [`Broker::resume_subscription`]. Deliveries in
    /// flight may still be acked. Journaled, so it survives a restart.
    /// Returns the patterns it applied to.
    pub fn pause_subscription(
        &mut self,
        service: &str,
        pattern: Option<&str>,
        now: Nanos,
    ) -> Result<Vec<String>, PauseError> {
        self.set_subscription_paused(service, pattern, true, now)
    }

    /// Undoes [`Broker::pause_subscription`]; what waited is delivered.
    pub fn resume_subscription(
        &mut self,
        service: &str,
        pattern: Option<&str>,
        now: Nanos,
    ) -> Result<Vec<String>, PauseError> {
        self.set_subscription_paused(service, pattern, false, now)
    }

    pub(crate) fn set_subscription_paused(
        &mut self,
        service: &str,
        pattern: Option<&str>,
        paused: bool,
        now: Nanos,
    ) -> Result<Vec<String>, PauseError> {
        self.now = now;
        let svc = self
            .services
            .get(service)
            .filter(|s| !s.patterns.is_empty())
            .ok_or_else(|| PauseError::UnknownService(service.to_string()))?;
        let targets: Vec<String> = match pattern {
            None => svc.patterns.iter().cloned().collect(),
            Some(p) if svc.patterns.contains(p) => vec![p.to_string()],
            Some(p) => {
                return Err(PauseError::NotSubscribed {
                    service: service.to_string(),
                    pattern: p.to_string(),
                    subscribed: svc.patterns.iter().cloned().collect::<Vec<_>>().join(", "),
                })
            }
        };
        let changes: Vec<String> = targets
            .iter()
            .filter(|p| svc.paused.contains(*p) != paused)
            .cloned()
            .collect();
        if changes.is_empty() {
            return Ok(targets);
        }
        if self.degraded {
            return Err(PauseError::StorageFailing);
        }
        // Told to a backend as one change of every pattern, not as a
        // pause of each alone.
        self.pausing_whole = pattern.is_none();
        for pattern in changes {
            let op = if paused {
                Op::Paused {
                    service: service.to_string(),
                    pattern: pattern.clone(),
                }
            } else {
                Op::Resumed {
                    service: service.to_string(),
                    pattern: pattern.clone(),
                }
            };
            self.journal(op);
            self.apply_paused(service, &pattern, paused);
        }
        self.pausing_whole = false;
        if !paused {
            self.pump(service, now);
        }
        Ok(targets)
    }

    /// The service's paused patterns, in order.
    pub fn paused_patterns(&self, service: &str) -> Vec<String> {
        self.services
            .get(service)
            .map(|s| s.paused.iter().cloned().collect())
            .unwrap_or_default()
    }

    pub(crate) fn apply_paused(&mut self, service: &str, pattern: &str, paused: bool) {
        let Some(svc) = self.services.get_mut(service) else {
            return;
        };
        if !svc.patterns.contains(pattern) {
            return;
        }
        if paused {
            svc.paused.insert(pattern.to_string());
        } else {
            svc.paused.remove(pattern);
        }
    }
}
