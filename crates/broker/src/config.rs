//! The broker's tunables and retention rules.

use super::*;

/// Tunables, each with a unit in its name.
#[derive(Debug, Clone)]
pub struct Config {
    /// How long a delivery may stay unacked before it goes to another instance.
    pub ack_deadline_ms: u32,
    /// Deliveries of one message before it goes to the dead letters.
    pub max_deliveries: u32,
    /// How long a message id is remembered for dedup.
    pub dedup_window_ms: u64,
    /// Most ids remembered for dedup; the oldest are forgotten first.
    pub dedup_ids_max: usize,
    /// How long the broker routes replies to a command after it was sent.
    pub reply_route_ms: u64,
    /// Most commands awaiting replies at once; the oldest routes are dropped.
    pub reply_routes_max: usize,
    /// Replies held per service while none of its instances is connected.
    pub parked_replies_max: usize,
    /// Bytes of replies held for flow-controlled streams (PROTOCOL §8.8),
    /// all streams together; past it a reply that would wait is refused
    /// (`stream_full`), so a slow requester cannot grow broker memory.
    pub held_reply_bytes_max: usize,
    /// In-flight deliveries per connection when HELLO asks for 0.
    pub max_in_flight_default: u32,
    /// A connection never gets more than this many deliveries in flight.
    pub max_in_flight_limit: u32,
    /// Events stay in the log at least this long, for `--from` replays,
    /// unless a rule in `retention_rules` matches them first.
    pub event_retention_ms: u64,
    /// Per name pattern retention of events; the first matching rule wins.
    pub retention_rules: Vec<RetentionRule>,
    /// Sends per second one service may make (all its instances together);
    /// bursts up to one second's worth. 0: no limit.
    pub send_rate_per_service: u32,
    /// The frame limit announced in WELCOME: no frame the broker sends is
    /// longer. A message is accepted only if its DELIVER frame fits
    /// (`courier_proto::delivery_frame_len` of the message as delivered).
    pub frame_bytes_max: u32,
    /// Connections one service may hold at once.
    pub connections_per_service_max: u32,
    /// Log written since the last snapshot before another is taken, so a
    /// restart after a crash replays at most about this much.
    pub checkpoint_log_bytes: u64,
    /// Distinct message names counted under their own name in the
    /// per-name metrics; traffic of names past it is counted as `_other`.
    pub metrics_names_max: usize,
    /// Above this many bytes of log, retained history is given up at the
    /// next checkpoint (all of it that no service is still owed, and that
    /// the snapshot covers), whatever its age. 0: no cap.
    pub retention_bytes_max: u64,
}

/// How long, and how much of, the events named by `pattern` are kept for
/// history replays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetentionRule {
    pub pattern: String,
    pub max_age_ms: u64,
    /// 0: no size limit. Only the newest events of this rule, up to this
    /// many payload bytes, are replayed.
    pub max_bytes: u64,
}

impl Config {
    /// The retention that applies to events named `name`: (max age in ns,
    /// max bytes or 0, rule index or `None` for the default).
    pub fn retention_for(&self, name: &str) -> (Nanos, u64, Option<usize>) {
        let rule = self
            .retention_rules
            .iter()
            .enumerate()
            .find(|(_, r)| courier_proto::pattern_matches(&r.pattern, name));
        match rule {
            Some((i, r)) => (r.max_age_ms * NANOS_PER_MS, r.max_bytes, Some(i)),
            None => (self.event_retention_ms * NANOS_PER_MS, 0, None),
        }
    }

    /// The longest age any event is kept (what the log must keep).
    pub fn longest_retention(&self) -> Nanos {
        self.retention_rules
            .iter()
            .map(|r| r.max_age_ms)
            .chain(std::iter::once(self.event_retention_ms))
            .max()
            .unwrap_or(0)
            * NANOS_PER_MS
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            ack_deadline_ms: 30_000,
            max_deliveries: 5,
            dedup_window_ms: 120_000,
            dedup_ids_max: 1_000_000,
            reply_route_ms: 600_000,
            reply_routes_max: 1_000_000,
            parked_replies_max: 10_000,
            held_reply_bytes_max: 64 * 1024 * 1024,
            max_in_flight_default: 256,
            max_in_flight_limit: 65_536,
            event_retention_ms: 24 * 3600 * 1000,
            retention_rules: Vec::new(),
            retention_bytes_max: 0,
            send_rate_per_service: 1_000_000,
            frame_bytes_max: courier_proto::FRAME_BYTES_MAX_DEFAULT,
            connections_per_service_max: 1024,
            checkpoint_log_bytes: 128 * 1024 * 1024,
            metrics_names_max: 10_000,
        }
    }
}
