//! Delivery: handing queued messages to instances with room, acks, nacks,
//! retries, dead letters and time passing.

use super::*;

impl<S: MessageStore> Broker<S> {
    /// Sends ready messages of `service` to instances with room.
    pub(crate) fn pump(&mut self, service: &str, now: Nanos) {
        let wall_now = self.wall(now);
        /// Ready messages no connected instance consumes are skipped over;
        /// past this many, the scan stops until something changes.
        const UNMATCHED_SCAN_MAX: usize = 1024;
        let mut index = 0;
        let mut skipped = 0;
        if let Some(svc) = self.services.get_mut(service) {
            // Keys parked for a connection that has room again.
            for conn in svc.queue.parked_for() {
                // A connection gone lets all of its keys go.
                let room = self.conns.get(&conn).map_or(usize::MAX, |c| {
                    if c.paused {
                        0
                    } else {
                        c.max_in_flight.saturating_sub(c.in_flight) as usize
                    }
                });
                if room > 0 {
                    svc.queue.unpark(conn, room);
                }
            }
        }
        loop {
            let Some(svc) = self.services.get_mut(service) else {
                return;
            };
            if svc.queue.ready.len() <= index || svc.is_paused() {
                return;
            }
            let partly_paused = !svc.paused.is_empty();
            // Without an instance that has room, looking at messages (which
            // may mean reading them from disk) is wasted work.
            let has_room = svc.instances.iter().chain(&svc.relays).any(|i| {
                self.conns.get(i).is_some_and(|c| {
                    !c.draining
                        && !c.paused
                        && !c.patterns.is_empty()
                        && c.in_flight < c.max_in_flight
                        && self.registry.is_routable(service, &c.instance)
                })
            });
            if !has_room {
                return;
            }
            let Some(entry) = svc.queue.ready.get(index) else {
                return;
            };
            if let Some(holder) = entry.key().and_then(|key| svc.queue.key_holder(key)) {
                let full = self
                    .conns
                    .get(&holder)
                    .is_none_or(|c| c.paused || c.in_flight >= c.max_in_flight);
                if full {
                    // Out to a connection with no room: it waits aside,
                    // not read from the store at every pass.
                    svc.queue.park(index, holder);
                    continue;
                }
            }
            let message = match self.store.get(entry.seq) {
                Ok(Some(message)) => message,
                Ok(None) => {
                    // Gone from the store (purged): nothing left to deliver.
                    svc.queue.ready.remove(index);
                    svc.queue.release_key(&entry);
                    continue;
                }
                Err(e) => {
                    // Never skipped silently: it stays in the backlog (and
                    // in snapshots), set aside so it is not tried again
                    // until the next start, and holds its key; the operator
                    // hears of it once, of more in the same range in a
                    // summary.
                    self.metrics.unreadable_messages += 1;
                    if let Some(entry) = svc.queue.ready.remove(index) {
                        svc.queue.unreadable.push(entry);
                    }
                    let reason = e.to_string();
                    let line = format!(
                        "message {} for {service} cannot be read: {e}; it stays in the backlog, set aside until the next start",
                        entry.seq
                    );
                    let (lines, repeated) = self.repeats.say(
                        &format!("{service}\u{0}{reason}"),
                        line,
                        || format!("messages for {service} cannot be read ({reason})"),
                        now,
                    );
                    self.metrics.damage_warnings_repeated += u64::from(repeated);
                    self.alerts.extend(lines);
                    continue;
                }
            };
            if message.expires_at.is_some_and(|t| t <= wall_now) {
                svc.queue.ready.remove(index);
                svc.queue.release_key(&entry);
                svc.queue.count_out(message.payload.len() as u64);
                self.metrics.expired += 1;
                if self.upstream {
                    // Done with: the backend must not deliver it again.
                    self.store
                        .upstream(courier_store::Upstream::Ack { seq: entry.seq });
                }
                let slot = self.traffic.slot(&message.name);
                if let Some(t) = self.traffic.traffic(slot, service) {
                    t.expired += 1;
                }
                if traces_stored(
                    &self.sampler,
                    &self.store,
                    self.upstream,
                    entry.seq,
                    &message,
                    now,
                ) {
                    push_trace(
                        &mut self.traces,
                        &mut self.traces_bytes,
                        TraceRecord::Settled {
                            seq: entry.seq,
                            service: courier_proto::SharedStr::from(service),
                            outcome: Outcome::Expired,
                            at: wall_now,
                        },
                    );
                }
                release(&mut self.store, &mut self.refs, entry.seq);
                continue;
            }
            if partly_paused && !svc.takes_now(&message.name) {
                // Only paused subscriptions take it: it waits for a resume.
                index += 1;
                skipped += 1;
                if skipped >= UNMATCHED_SCAN_MAX {
                    return;
                }
                continue;
            }
            let len = courier_proto::delivery_frame_len(&message);
            if len > self.config.frame_bytes_max as usize {
                // Accepted under a larger limit (the broker was restarted
                // with a smaller one): it cannot be delivered, and it is
                // not dropped either.
                let Some(entry) = svc.queue.ready.remove(index) else {
                    return;
                };
                let max = self.config.frame_bytes_max;
                self.alerts.push(format!(
                    "message {} for {service} is {len} bytes as a DELIVER frame, over the frame limit of {max}; dead-lettered",
                    entry.seq
                ));
                let slot = self.traffic.slot(&message.name);
                self.dead_letter(
                    service,
                    entry,
                    message.payload.len() as u64,
                    slot,
                    format!("its DELIVER frame would be {len} bytes, over the broker's frame limit of {max} (was it accepted under a larger limit?)"),
                    now,
                );
                continue;
            }
            let keyed = entry.key().is_some();
            let holder = entry.key().and_then(|key| svc.queue.key_holder(key));
            let picked = match holder {
                // A key out on a connection goes on there (pipelined) or
                // not at all until it comes back.
                Some(conn) => self.pick_holder(service, conn, &message.name),
                None => self.pick(service, &message.name, keyed),
            };
            match picked {
                Pick::Conn(conn) => {
                    let Some(svc) = self.services.get_mut(service) else {
                        return;
                    };
                    let Some(mut entry) = svc.queue.ready.remove(index) else {
                        return;
                    };
                    entry.attempts += 1;
                    let attempt = entry.attempts;
                    let keyed = entry.key().is_some();
                    let relay = self.conns.get(&conn).is_some_and(|c| c.relay);
                    // A relay's node runs the deadline of its instances.
                    let deadline = if relay {
                        queue::NOT_ARMED
                    } else {
                        now + u64::from(svc.ack_deadline_ms) * NANOS_PER_MS
                    };
                    self.next_delivery += 1;
                    let delivery = self.next_delivery;
                    let seq = entry.seq;
                    let slot = self.traffic.slot(&message.name);
                    let traced = traces_stored(
                        &self.sampler,
                        &self.store,
                        self.upstream,
                        seq,
                        &message,
                        now,
                    );
                    let pipelined = self.conns.get(&conn).is_some_and(|c| c.pipelined_keys);
                    let first_of_key = svc.queue.start(
                        delivery,
                        queue::InFlight {
                            entry,
                            conn,
                            deadline,
                            name: slot,
                            traced,
                            bytes: message.payload.len() as u64,
                        },
                        pipelined,
                    );
                    // Tells a pipelined receiver that whatever of this key
                    // it still holds from before was taken back.
                    let wire_attempt = if pipelined && keyed && first_of_key {
                        attempt | courier_proto::ATTEMPT_KEY_START
                    } else {
                        attempt
                    };
                    if message.kind == Kind::Command
                        && !message.headers.is_empty()
                        && message.header(REPLY_WINDOW_HEADER).is_some()
                    {
                        self.note_stream_handler(message.id, service, delivery);
                    }
                    if let Some(c) = self.conns.get_mut(&conn) {
                        c.in_flight += 1;
                    }
                    // A relay's delivery is counted and traced on the node
                    // that hands it to an instance.
                    if !relay {
                        if let Some(c) = self.conns.get(&conn).filter(|_| traced) {
                            push_trace(
                                &mut self.traces,
                                &mut self.traces_bytes,
                                TraceRecord::Delivered {
                                    message: message.clone(),
                                    seq,
                                    service: c.service.clone(),
                                    instance: c.instance.clone(),
                                    attempt,
                                    at: wall_now,
                                },
                            );
                        }
                        self.journal(Op::Delivered {
                            service: service.to_string(),
                            seq,
                        });
                        self.metrics.delivered += 1;
                        if let Some(t) = self.traffic.traffic(slot, service) {
                            t.delivered += 1;
                            t.redelivered += u64::from(attempt > 1);
                        }
                        if attempt > 1 {
                            self.metrics.redelivered += 1;
                        }
                    }
                    self.actions.push(Action::Deliver {
                        conn,
                        delivery,
                        attempt: wire_attempt,
                        message,
                        log_seq: seq,
                    });
                }
                Pick::AllBusy
                    if holder.is_some()
                        || (!keyed
                            && self
                                .services
                                .get(service)
                                .is_some_and(|s| !s.relays.is_empty())) =>
                {
                    // Only its holder may take it (or, unkeyed, only the
                    // instances here); others may take the rest.
                    index += 1;
                    skipped += 1;
                    if skipped >= UNMATCHED_SCAN_MAX {
                        return;
                    }
                }
                Pick::AllBusy => return,
                Pick::NoneMatching => {
                    index += 1;
                    skipped += 1;
                    if skipped >= UNMATCHED_SCAN_MAX {
                        return;
                    }
                }
            }
        }
    }

    /// The receiver handled a delivery.
    pub fn ack(&mut self, conn: ConnId, delivery: DeliveryId, now: Nanos) {
        let wall_now = self.wall(now);
        let relay = self.is_relay(conn);
        let Some(flight) = self.take_flight(conn, delivery, now) else {
            // A reply of a flow-controlled stream: one credit back.
            self.ack_reply(conn, delivery, now);
            return;
        };
        let service = flight.1;
        if !relay {
            // A relay's are counted where they were handled.
            self.metrics.acked += 1;
            if let Some(t) = self.traffic.traffic(flight.0.name, &service) {
                t.acked += 1;
            }
        }
        let seq = flight.0.entry.seq;
        self.journal(Op::Acked {
            service: service.to_string(),
            seq,
        });
        if flight.0.traced {
            push_trace(
                &mut self.traces,
                &mut self.traces_bytes,
                TraceRecord::Settled {
                    seq,
                    service: service.clone(),
                    outcome: Outcome::Acked,
                    at: wall_now,
                },
            );
        }
        if let Some(svc) = self.services.get_mut(service.as_str()) {
            svc.queue.release_key(&flight.0.entry);
            svc.queue.count_out(flight.0.bytes);
        }
        release(&mut self.store, &mut self.refs, seq);
        self.pump(&service, now);
    }

    /// The receiver could not handle a delivery now; retry after `delay_ms`.
    pub fn nack(&mut self, conn: ConnId, delivery: DeliveryId, delay_ms: u32, now: Nanos) {
        let wall_now = self.wall(now);
        let relay = self.is_relay(conn);
        let Some((flight, service)) = self.take_flight(conn, delivery, now) else {
            // A reply of a flow-controlled stream: the requester stops
            // reading it.
            self.nack_reply(conn, delivery, now);
            return;
        };
        self.take_back_key(&service, &flight);
        if !relay {
            self.metrics.nacked += 1;
            if let Some(t) = self.traffic.traffic(flight.name, &service) {
                t.nacked += 1;
            }
        }
        if flight.traced {
            push_trace(
                &mut self.traces,
                &mut self.traces_bytes,
                TraceRecord::Settled {
                    seq: flight.entry.seq,
                    service: service.clone(),
                    outcome: Outcome::Nacked { delay_ms },
                    at: wall_now,
                },
            );
        }
        self.retry_or_dead_letter(
            &service,
            flight,
            u64::from(delay_ms) * NANOS_PER_MS,
            NACKED,
            now,
        );
        self.pump(&service, now);
    }

    /// Removes a delivery from flight if `conn` really holds it. Acks for
    /// transient messages and replies, or for unknown ids, find nothing.
    pub(crate) fn take_flight(
        &mut self,
        conn: ConnId,
        delivery: DeliveryId,
        now: Nanos,
    ) -> Option<(queue::InFlight, courier_proto::SharedStr)> {
        let c = self.conns.get_mut(&conn)?;
        let svc = self.services.get_mut(c.service.as_str())?;
        if svc.queue.in_flight.get(&delivery).map(|f| f.conn) != Some(conn) {
            return None;
        }
        let next_deadline = if c.relay {
            queue::NOT_ARMED
        } else {
            now + u64::from(svc.ack_deadline_ms) * NANOS_PER_MS
        };
        let flight = svc.queue.finish(delivery, next_deadline)?;
        c.in_flight = c.in_flight.saturating_sub(1);
        Some((flight, c.service.clone()))
    }

    /// A keyed delivery failed (nack, deadline): the later deliveries of
    /// its key out on the same connection come back too, so the key starts
    /// again from the failed one, in order (`Queue::take_back`).
    pub(crate) fn take_back_key(&mut self, service: &str, flight: &queue::InFlight) {
        let Some(key) = flight.entry.key() else {
            return;
        };
        let Some(svc) = self.services.get_mut(service) else {
            return;
        };
        let taken = svc.queue.take_back(key, flight.entry.seq);
        for later in taken {
            if let Some(c) = self.conns.get_mut(&later.conn) {
                c.in_flight = c.in_flight.saturating_sub(1);
            }
        }
    }

    pub(crate) fn retry_or_dead_letter(
        &mut self,
        service: &str,
        flight: queue::InFlight,
        delay: Nanos,
        why: &'static str,
        now: Nanos,
    ) {
        let wall_now = self.wall(now);
        let queue::InFlight {
            entry,
            name,
            traced,
            bytes,
            ..
        } = flight;
        let Some(svc) = self.services.get_mut(service) else {
            return;
        };
        let dead = entry.attempts >= svc.max_deliveries;
        if traced && (dead || why != NACKED) {
            let outcome = if dead {
                Outcome::DeadLettered { reason: why }
            } else {
                Outcome::Released { reason: why }
            };
            push_trace(
                &mut self.traces,
                &mut self.traces_bytes,
                TraceRecord::Settled {
                    seq: entry.seq,
                    service: courier_proto::SharedStr::from(service),
                    outcome,
                    at: wall_now,
                },
            );
        }
        let Some(svc) = self.services.get_mut(service) else {
            return;
        };
        if dead {
            let reason = format!(
                "{why} on attempt {} of {}",
                entry.attempts, svc.max_deliveries
            );
            self.dead_letter(service, entry, bytes, name, reason, now);
        } else if self.upstream && entry.key().is_some() && (delay > 0 || svc.keyed_lane_here) {
            // A keyed retry stays here, holding its key as on one broker:
            // NAKed with a delay, the backend would hand out the key's
            // later messages meanwhile; NAKed at once by the keyed lane's
            // holder, the key's later messages already on their way here
            // would come before it. Unsettled on the backend, it comes
            // back in the key's order if this node goes (its deadline
            // there passes) or gives its work back.
            if delay == 0 {
                svc.queue.make_ready_again(entry);
            } else {
                svc.queue.defer_retry(now + delay, entry);
            }
        } else if self.upstream {
            // The backend's consumer redelivers (to any node) and counts
            // the attempt; kept here too, it would be delivered twice.
            svc.queue.release_key(&entry);
            svc.queue.count_out(bytes);
            // The key starts again from this message on the backend: what
            // of it waits here goes back behind it, in order and after the
            // same delay, or it would be handled first.
            let behind = match entry.key() {
                Some(key) => svc.queue.give_back_key(key),
                None => Vec::new(),
            };
            for later in &behind {
                let bytes = match self.store.get(later.seq) {
                    Ok(Some(message)) => message.payload.len() as u64,
                    _ => 0,
                };
                if let Some(svc) = self.services.get_mut(service) {
                    svc.queue.count_out(bytes);
                }
            }
            for seq in std::iter::once(entry.seq).chain(behind.iter().map(|e| e.seq)) {
                self.journal(Op::Nacked {
                    service: service.to_string(),
                    seq,
                    until: now + delay,
                });
                release(&mut self.store, &mut self.refs, seq);
            }
        } else if delay == 0 {
            svc.queue.make_ready_again(entry);
        } else {
            let seq = entry.seq;
            svc.queue.defer_retry(now + delay, entry);
            self.journal(Op::Nacked {
                service: service.to_string(),
                seq,
                until: now + delay,
            });
        }
    }

    /// Moves a message of `service` that is in no other state to its dead
    /// letters, for good.
    pub(crate) fn dead_letter(
        &mut self,
        service: &str,
        entry: Entry,
        bytes: u64,
        name: stats::Slot,
        reason: String,
        now: Nanos,
    ) {
        let wall_now = self.wall(now);
        let Some(svc) = self.services.get_mut(service) else {
            return;
        };
        svc.queue.release_key(&entry);
        svc.queue.count_out(bytes);
        let letter = DeadLetter {
            seq: entry.seq,
            attempts: entry.attempts,
            reason,
            at: wall_now,
        };
        if !self.upstream {
            // On a backend the dead letter is the backend's to keep.
            svc.queue.dead_letters.push(letter.clone());
        }
        self.metrics.dead_lettered += 1;
        if let Some(t) = self.traffic.traffic(name, service) {
            t.dead_lettered += 1;
        }
        self.journal(Op::DeadLettered {
            service: service.to_string(),
            seq: letter.seq,
            attempts: letter.attempts,
            reason: letter.reason,
            at: wall_now,
        });
        if self.upstream {
            release(&mut self.store, &mut self.refs, letter.seq);
        }
    }

    /// Advances time: deferred messages fall due, overdue deliveries go to
    /// other instances, old dedup ids and reply routes are forgotten.
    pub fn tick(&mut self, now: Nanos) {
        self.now = now;
        if self.degraded {
            self.retry_storage();
        }
        // History replays go on a pass at a time (`backfill.rs`).
        self.continue_backfills(now);
        // Lets a store with a periodic fsync policy catch up while idle.
        self.dirty |= self.store.persistent();
        self.dedup.expire(self.wall(now));
        let mut expired = Vec::new();
        self.reply_routes.expire_each(now, |command, route| {
            if let Some(stream) = route.stream {
                expired.push((command, stream));
            }
        });
        let route_ms = self.config.reply_route_ms;
        for (command, stream) in expired {
            self.expire_stream(
                command,
                stream,
                &format!("stopped taking replies: its reply route expired after {route_ms} ms"),
            );
        }
        self.alerts.extend(self.repeats.summaries(now));
        self.registry_tick(now);
        let names: Vec<String> = self.services.keys().cloned().collect();
        for service in names {
            let Some(svc) = self.services.get_mut(&service) else {
                continue;
            };
            svc.queue.release_due(now);
            let mut give_up = Vec::new();
            for delivery in svc.queue.overdue(now) {
                let Some(svc) = self.services.get_mut(&service) else {
                    break;
                };
                if svc.queue.has_followers(delivery) {
                    // Its receiver may have handled it, acked and begun
                    // the next of its key while the deadline passed here:
                    // taking the key back would let that next one be
                    // handled before this one's retry. So the connection
                    // goes, as if it had crashed.
                    if let Some(flight) = svc.queue.in_flight.get(&delivery) {
                        give_up.push(flight.conn);
                    }
                    continue;
                }
                let Some(flight) = svc.queue.finish(delivery, queue::NOT_ARMED) else {
                    continue;
                };
                if let Some(c) = self.conns.get_mut(&flight.conn) {
                    c.in_flight = c.in_flight.saturating_sub(1);
                }
                self.take_back_key(&service, &flight);
                self.retry_or_dead_letter(&service, flight, 0, "ack deadline passed", now);
            }
            give_up.sort_unstable();
            give_up.dedup();
            for conn in give_up {
                let deadline = self.services.get(&service).map_or(0, |s| s.ack_deadline_ms);
                self.close_connection(
                    conn,
                    ErrorCode::AckDeadlinePassed,
                    format!(
                        "a delivery of an ordering key was not acked within the ack deadline ({deadline} ms) while later ones of its key were out to this connection; everything it held is delivered again, in order. Ack or nack each delivery within the deadline"
                    ),
                    now,
                );
            }
            self.pump(&service, now);
        }
    }

    /// When [`Broker::tick`] next has work, if ever. Asked after every
    /// pass of the core: it reads the services touched since it was last
    /// asked, not every service (`services.rs`).
    pub fn next_timer(&mut self) -> Option<Nanos> {
        self.services.settle();
        let (replaying, queues) = self.services.settled_timers();
        let next = if replaying {
            Some(self.now)
        } else {
            queues.into_iter().chain(self.registry.next_timer()).min()
        };
        debug_assert_eq!(next, self.next_timer_by_scan(), "settled timers");
        next
    }

    /// What [`Broker::next_timer`] answers, read from every service: the
    /// rule it keeps, checked in debug builds.
    fn next_timer_by_scan(&self) -> Option<Nanos> {
        if self.backfills_pending() {
            return Some(self.now);
        }
        self.services
            .values()
            .filter_map(|s| s.queue.next_timer())
            .chain(self.registry.next_timer())
            .min()
    }
}

/// One service no longer needs `seq`; the last one out removes it.
pub(crate) fn release<S: MessageStore>(store: &mut S, refs: &mut refcount::RefCounts, seq: Seq) {
    if refs.release(seq) {
        store.remove(seq);
    }
}
