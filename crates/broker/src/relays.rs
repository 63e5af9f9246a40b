//! Relays (docs/SCALE-OUT.md §5): on a replicated backend one node at a
//! time fetches a service's keyed messages — the keyed lane's holder —
//! and the service's instances on other nodes get their share through a
//! relay, one per such node. To this core a relay is one more instance
//! of the service, with the other node's room as its window, that takes
//! only keyed messages: a key goes out to it and stays there while any
//! of its deliveries is out, pipelined, as to a version-4 connection.
//! What the other node's instances do with them comes back as acks and
//! nacks of the relay. It has no ack deadline here: the other node runs
//! the deadlines of its instances and nacks what passes one; a relay
//! whose node is gone is closed by the edge, which gives everything out
//! on it back, each key from its first unacked message.

use super::*;

impl<S: MessageStore> Broker<S> {
    /// Opens a relay to `node`'s instances of `service`, which consume
    /// `patterns` and take `max_in_flight` deliveries at once.
    pub fn open_relay(
        &mut self,
        conn: ConnId,
        service: &str,
        node: &str,
        patterns: &[String],
        max_in_flight: u32,
        now: Nanos,
    ) {
        self.now = now;
        let config = &self.config;
        let svc = self.services.get_or_insert(service, config);
        svc.relays.push(conn);
        let mut list = courier_proto::pattern_index::PatternList::default();
        for pattern in patterns {
            list.insert(pattern);
        }
        self.conns.insert(
            conn,
            Conn {
                service: courier_proto::SharedStr::from(service),
                admin: false,
                instance: courier_proto::SharedStr::from(format!("node {node}")),
                max_in_flight: max_in_flight.max(1),
                in_flight: 0,
                patterns: list,
                draining: false,
                paused: false,
                send_bucket: svc.send_bucket.clone(),
                streams: Default::default(),
                pipelined_keys: true,
                relay: true,
            },
        );
        self.pump(service, now);
    }

    /// The relay's node told its instances' patterns and room again.
    pub fn update_relay(
        &mut self,
        conn: ConnId,
        patterns: &[String],
        max_in_flight: u32,
        now: Nanos,
    ) {
        self.now = now;
        let Some(c) = self.conns.get_mut(&conn).filter(|c| c.relay) else {
            return;
        };
        let mut list = courier_proto::pattern_index::PatternList::default();
        for pattern in patterns {
            list.insert(pattern);
        }
        c.patterns = list;
        c.max_in_flight = max_in_flight.max(1);
        self.membership_changes += 1;
        let service = c.service.to_string();
        self.pump(&service, now);
    }

    /// How many deliveries are out on the relay (`None`: no such relay).
    pub fn relay_in_flight(&self, conn: ConnId) -> Option<u32> {
        self.conns
            .get(&conn)
            .filter(|c| c.relay)
            .map(|c| c.in_flight)
    }

    /// Closes the relay: what is out on it goes back as if its node's
    /// instances had crashed.
    pub fn close_relay(&mut self, conn: ConnId, now: Nanos) {
        self.now = now;
        if self.conns.get(&conn).is_some_and(|c| c.relay) {
            self.disconnect(conn, now);
        }
    }

    /// Where a command fetched here was accepted, for the node a relay
    /// hands it to: its replies go there (`None`: this node).
    pub fn reply_node_of(&self, command: &Uuid) -> Option<String> {
        self.remote_routes
            .get(command)
            .map(|route| route.node.clone())
    }

    /// What this node's instances of `service` that consume take, for the
    /// keyed lane's holder on another node: the patterns they subscribed
    /// (sorted, each once) and how many deliveries they take at once
    /// together. `None`: no instance here consumes.
    pub fn relay_pull_of(&self, service: &str) -> Option<(Vec<String>, u32)> {
        let svc = self.services.get(service)?;
        let mut patterns = BTreeSet::new();
        let mut capacity: u32 = 0;
        for c in svc.instances.iter().filter_map(|i| self.conns.get(i)) {
            if c.draining || c.patterns.is_empty() {
                continue;
            }
            patterns.extend(c.patterns.to_vec());
            capacity = capacity.saturating_add(c.max_in_flight);
        }
        if patterns.is_empty() {
            return None;
        }
        Some((patterns.into_iter().collect(), capacity))
    }

    pub(crate) fn is_relay(&self, conn: ConnId) -> bool {
        self.conns.get(&conn).is_some_and(|c| c.relay)
    }
}
