//! Connections: handshake, flow control, pausing, draining and leaving.

use super::*;

impl<S: MessageStore> Broker<S> {
    /// A connection finished its handshake.
    pub fn connect(&mut self, conn: ConnId, service: &str, instance: &str, max_in_flight: u32) {
        let _refused = self.connect_as(conn, service, instance, max_in_flight, false);
    }

    /// Whether `service` may open one more connection.
    pub fn may_connect(&self, service: &str) -> Result<(), String> {
        let open = self.services.get(service).map_or(0, |s| s.instances.len());
        let max = self.config.connections_per_service_max as usize;
        if open >= max {
            return Err(format!(
                "service {service} already has {open} connections, the most allowed ({max}); close some or raise the limit"
            ));
        }
        Ok(())
    }

    /// Like [`Broker::connect`]; `admin` connections may use the broker's
    /// own `courier.*` commands when a manifest is in force.
    pub fn connect_as(
        &mut self,
        conn: ConnId,
        service: &str,
        instance: &str,
        max_in_flight: u32,
        admin: bool,
    ) -> Result<(), String> {
        if let Err(reason) = self.may_connect(service) {
            self.metrics.connections_refused += 1;
            return Err(reason);
        }
        let max_in_flight = self.effective_max_in_flight(max_in_flight);
        let config = &self.config;
        let svc = self.services.get_or_insert(service, config);
        svc.instances.push(conn);
        self.membership_changes += 1;
        self.conns.insert(
            conn,
            Conn {
                service: courier_proto::SharedStr::from(service),
                admin,
                instance: courier_proto::SharedStr::from(instance),
                max_in_flight,
                in_flight: 0,
                patterns: Default::default(),
                draining: false,
                paused: false,
                send_bucket: svc.send_bucket.clone(),
                streams: Default::default(),
                pipelined_keys: false,
                relay: false,
            },
        );
        // Replies that arrived while no instance of this service was here.
        let parked = std::mem::take(&mut svc.parked_replies);
        for reply in parked {
            self.deliver_untracked(conn, reply);
        }
        let now = self.now;
        self.register_bus_instance(service, instance, now);
        Ok(())
    }

    /// A request above the limit is lowered to it (counted and reported),
    /// not refused: the connection still works, just with less in flight.
    pub(crate) fn effective_max_in_flight(&mut self, asked: u32) -> u32 {
        if asked == 0 {
            return self.config.max_in_flight_default;
        }
        let limit = self.config.max_in_flight_limit;
        if asked > limit {
            self.metrics.in_flight_requests_lowered += 1;
            self.alerts.push(format!(
                "a receiver asked for {asked} deliveries in flight; it gets the limit of {limit}"
            ));
        }
        asked.min(limit)
    }

    /// The connection takes ordering keys pipelined (it spoke protocol
    /// version 4, `docs/PROTOCOL.md` §8.4): the broker may send a key's
    /// next messages to it before the earlier ones are acked, trusting it
    /// to handle them one at a time, in order. Set once, before it
    /// subscribes.
    pub fn set_pipelined_keys(&mut self, conn: ConnId, on: bool) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.pipelined_keys = on;
        }
    }

    /// Gives up on a connection: everything it held is taken back at once
    /// (as if it had crashed), and the edge closes it with an ERROR.
    pub(crate) fn close_connection(
        &mut self,
        conn: ConnId,
        code: ErrorCode,
        reason: String,
        now: Nanos,
    ) {
        if !self.conns.contains_key(&conn) {
            return;
        }
        self.actions.push(Action::Close { conn, code, reason });
        self.disconnect(conn, now);
    }

    /// The connection is gone; its unacked deliveries go to other instances now.
    pub fn disconnect(&mut self, conn: ConnId, now: Nanos) {
        let Some(c) = self.conns.remove(&conn) else {
            return;
        };
        // Its flow-controlled streams under way cannot be delivered in
        // order to anyone else: they end (their responders hear so).
        for command in &c.streams {
            self.requester_left(*command, now);
        }
        if !c.relay {
            self.deregister_bus_instance(&c.service, &c.instance);
        }
        let Some(svc) = self.services.get_mut(c.service.as_str()) else {
            return;
        };
        svc.instances.retain(|i| *i != conn);
        svc.relays.retain(|i| *i != conn);
        self.membership_changes += 1;
        // Oldest first: a key's first delivery out is retried (counted)
        // and takes the later ones of its key back with it, in order.
        let mut deliveries: Vec<(Seq, DeliveryId)> = svc
            .queue
            .deliveries_of(conn)
            .into_iter()
            .filter_map(|d| svc.queue.in_flight.get(&d).map(|f| (f.entry.seq, d)))
            .collect();
        deliveries.sort_unstable();
        for (_, delivery) in deliveries {
            let Some(svc) = self.services.get_mut(c.service.as_str()) else {
                break;
            };
            if let Some(flight) = svc.queue.finish(delivery, queue::NOT_ARMED) {
                if let Some(key) = flight.entry.key() {
                    svc.queue.take_back(key, flight.entry.seq);
                }
                self.retry_or_dead_letter(&c.service, flight, 0, "receiver disconnected", now);
            }
        }
        self.pump(&c.service, now);
        if self.upstream {
            self.give_back_unservable(&c.service);
        }
        if self
            .services
            .get(c.service.as_str())
            .is_some_and(Service::is_idle)
        {
            self.services.remove(c.service.as_str());
        }
    }

    /// Changes how many deliveries the connection takes at once.
    pub fn flow(&mut self, conn: ConnId, max_in_flight: u32, now: Nanos) {
        let max = self.effective_max_in_flight(max_in_flight);
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        c.max_in_flight = max;
        let service = c.service.to_string();
        self.pump(&service, now);
    }

    /// Stop delivering to this connection (graceful shutdown); in-flight
    /// deliveries may still be acked.
    /// The network edge's back-pressure: a connection whose unwritten bytes
    /// pile up gets no deliveries until it has caught up (memory stays
    /// bounded; its messages wait in the queue, or go to other instances).
    pub fn set_paused(&mut self, conn: ConnId, paused: bool, now: Nanos) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if c.paused == paused {
            return;
        }
        c.paused = paused;
        if paused {
            self.metrics.receivers_paused += 1;
        } else {
            let service = c.service.to_string();
            self.pump(&service, now);
        }
    }

    pub fn drain(&mut self, conn: ConnId) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.draining = true;
            self.actions.push(Action::Drained { conn });
        }
    }
}
