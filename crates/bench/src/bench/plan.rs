//! Message counts for one invocation, and how each job is described.

use super::*;

/// Message counts for one invocation.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Plan {
    /// W1–W3, per size.
    pub(super) transient_tiny: u64,
    pub(super) transient_kib: u64,
    /// Messages sent before the timed part of W1–W3 and W4.
    pub(super) warmup: u64,
    pub(super) w4a: u64,
    pub(super) w4b: u64,
    pub(super) w5a: u64,
    pub(super) w5a_warmup: u64,
    pub(super) w5b: u64,
    pub(super) w5b_warmup: u64,
    pub(super) w6: u64,
    pub(super) w7: u64,
    /// W7's event size (`--curves`' backlog curve takes a smaller one).
    pub(super) w7_bytes: usize,
    /// W8a and W8b.
    pub(super) w8: u64,
    /// W13: events per connection count, shared by the connections.
    pub(super) w13: u64,
    pub(super) w13_warmup: u64,
    /// W11: 1 MiB events.
    pub(super) w11: u64,
    pub(super) gateway: gateway::GatewayPlan,
    /// W9: idle connections (10,000; `--quick` 1,000).
    pub(super) w9_connections: u64,
    /// W10: services in the routing table, each with
    /// [`w10::PATTERNS_PER_SERVICE`] subscriptions (1,000; `--quick` 100).
    pub(super) w10_services: u64,
    /// W10: events through the table.
    pub(super) w10: u64,
    /// Rows in the outbox when the relay starts.
    pub(super) outbox_relay: u64,
    /// Business transactions timed one at a time.
    pub(super) outbox_latency: u64,
    /// Where the outbox's scratch databases are made.
    pub(super) postgres_url: String,
}

impl Plan {
    pub(super) fn new(quick: bool, scale: f64) -> Result<Plan, String> {
        if !(scale > 0.0 && scale <= 10.0) {
            return Err(format!("--scale {scale} must be above 0 and at most 10"));
        }
        let factor = if quick { scale / QUICK_DIVISOR } else { scale };
        let n = |base: u64| ((base as f64 * factor).round() as u64).max(MIN_MESSAGES);
        // W9 and W10 keep their shape under --quick: a tenth, not a twentieth.
        let crowd = |full: u64, least: u64| {
            let base = if quick { full / 10 } else { full };
            ((base as f64 * scale).round() as u64).max(least)
        };
        Ok(Plan {
            transient_tiny: n(1_000_000),
            transient_kib: n(200_000),
            warmup: n(1_000),
            w4a: n(20_000),
            w4b: n(200_000),
            w5a: n(20_000),
            w5a_warmup: n(1_000),
            w5b: n(200_000),
            w5b_warmup: n(10_000),
            w6: n(200_000),
            w7: n(1_000_000),
            w7_bytes: LARGE_BYTES,
            w8: n(200_000),
            w13: n(8_000),
            w13_warmup: n(640),
            w11: n(2_000),
            gateway: gateway::GatewayPlan {
                concurrent: n(40_000),
                sequential: n(5_000),
                warmup: n(1_000),
            },
            w9_connections: crowd(10_000, 1),
            w10_services: crowd(1_000, 2),
            w10: n(W10_MESSAGES),
            outbox_relay: n(200_000),
            outbox_latency: n(2_000),
            postgres_url: outbox::DEFAULT_POSTGRES_URL.to_string(),
        })
    }

    pub(super) fn transient(&self, size: Size) -> u64 {
        match size {
            Size::Tiny => self.transient_tiny,
            Size::Kib => self.transient_kib,
        }
    }

    pub(super) fn describe(&self, job: Job) -> String {
        match job {
            Job::PubSub(size) => format!(
                "{} events of {} from 1 publisher to 1 subscriber, at most once (Courier: transient events; NATS: core publish), timed from the first publish until the subscriber has received the last (after {} warm-up)",
                thousands(self.transient(size)),
                bytes_text(size.bytes() as u64),
                thousands(self.warmup)
            ),
            Job::FanOut(size) => format!(
                "{} events of {} from 1 publisher, each to 4 subscribers (Courier: 4 services; NATS: 4 subscriptions, one connection each), at most once; msg/s = events published per second until all 4 received the last (after {} warm-up)",
                thousands(self.transient(size)),
                bytes_text(size.bytes() as u64),
                thousands(self.warmup)
            ),
            Job::Competing(size) => format!(
                "{} events of {} from 1 publisher, shared by 4 competing consumers (Courier: 1 service with 4 instances; NATS: a queue group of 4, one connection each), at most once; timed until all were received (after {} warm-up)",
                thousands(self.transient(size)),
                bytes_text(size.bytes() as u64),
                thousands(self.warmup)
            ),
            Job::RequestSequential => format!(
                "{} requests of {TINY_BYTES} B, each answered with {TINY_BYTES} B before the next is sent (Courier: transient command and reply; NATS: core request/reply), 1 requester, 1 responder (after {} warm-up)",
                thousands(self.w4a),
                thousands(self.warmup)
            ),
            Job::RequestConcurrent => format!(
                "{} requests of {TINY_BYTES} B with {REQUESTS_IN_FLIGHT} in flight from one requester connection, 1 responder (after {} warm-up)",
                thousands(self.w4b),
                thousands(self.warmup)
            ),
            Job::PublishOneByOne => format!(
                "{} durable events of {SMALL_BYTES} B, each ack awaited before the next send (after {} warm-up)",
                thousands(self.w5a),
                thousands(self.w5a_warmup)
            ),
            Job::PublishPipelined => format!(
                "{} durable events of {SMALL_BYTES} B, pipelined with a window of {WINDOW} unacknowledged (after {} warm-up)",
                thousands(self.w5b),
                thousands(self.w5b_warmup)
            ),
            Job::Consume => format!(
                "a backlog of {} × {SMALL_BYTES} B durable events waiting for an offline consumer, then consumed with explicit acks (at most {MAX_IN_FLIGHT} unacknowledged), timed from subscribing until all are acked and the acks applied",
                thousands(self.w6)
            ),
            Job::Ordered(keys) => format!(
                "a backlog of {} × {SMALL_BYTES} B durable events with {} ordering key{} waiting for an offline service, then consumed in order by 2 instances with explicit acks (Courier: pipelined keys, max_in_flight {MAX_IN_FLIGHT} each; NATS: max_ack_pending 1 per consumer), each instance checking that every key's messages come in order; timed from subscribing until all are acked",
                thousands(self.w8),
                thousands(keys.count()),
                if keys.count() == 1 { "" } else { "s" }
            ),
            Job::Restart => format!(
                "a backlog of {} × {} durable events for an offline consumer (pipelined, window {WINDOW}); VmRSS; kill -9; restart on the same data: spawn to ready line, and to the first connection that sees the whole backlog (polled every {} ms); VmRSS",
                thousands(self.w7),
                bytes_text(self.w7_bytes as u64),
                CONNECT_POLL.as_millis()
            ),
            Job::PublishConcurrent => format!(
                "{} durable events of {SMALL_BYTES} B from each of {} connections at once (the events shared among them), each connection awaiting every ack before its next send; one broker (one nats-server per fsync setting) for the four counts (after {} warm-up per count)",
                thousands(self.w13),
                W13_CONNECTIONS.map(|c| c.to_string()).join(", "),
                thousands(self.w13_warmup)
            ),
            Job::LargeEvents => format!(
                "{} durable events of 1 MiB, pipelined with at most {} unacknowledged (no warm-up); MB/s (10⁶ B), and that as a share of the disk's own write+fsync bandwidth, measured right after in the same data dir: min({}, {}) writes of 1 MiB to a fresh file, each followed by an fdatasync",
                thousands(self.w11),
                publish::W11_WINDOW,
                thousands(self.w11),
                publish::DISK_PROBE_MIB_MAX
            ),
            Job::RequestUnderLoad => format!(
                "W4a's {} requests of {TINY_BYTES} B one at a time (after {} warm-up without load) while another connection publishes durable events of {SMALL_BYTES} B pipelined (window {WINDOW}, as W5b) as fast as it can; the requests' latency, and the publishing rate meanwhile",
                thousands(self.w4a),
                thousands(self.warmup)
            ),
            Job::IdleConnections => format!(
                "{} idle connections ({}; Courier: SDK clients on one socket descriptor each (a Connector; the SDK's default keeps a second one per socket), each subscribed to its service's {}; NATS: async-nats clients with one queue subscription each on the same subject, a queue group per service), connected {} at a time; the server's VmRSS just before they connect and {} s after the last did: (after − before) ÷ connections; W4a ({} requests of {TINY_BYTES} B one at a time after {} warm-up) on the same server and requester connection just before they connect, and again while all are connected (Courier's broker with --connections-max {})",
                thousands(self.w9_connections),
                w9::shape(self.w9_connections),
                w9::pattern_shown(),
                w9::CONNECTING_AT_ONCE,
                w9::SETTLE.as_secs(),
                thousands(self.w4a),
                thousands(self.warmup),
                thousands(w9::connections_max(self.w9_connections))
            ),
            Job::RoutingTable => format!(
                "{} services × {} subscriptions = {} (one connection per service: {}), then {} transient events of {TINY_BYTES} B from 1 publisher (after {} warm-up) named {}: each matches one subscription of one service (1 in {}), and every name is new, so neither server's route cache holds it; timed and flow-controlled as W1a",
                thousands(self.w10_services),
                w10::PATTERNS_PER_SERVICE,
                thousands(self.w10_services * w10::PATTERNS_PER_SERVICE),
                w10::patterns_shown(),
                thousands(self.w10),
                thousands(self.warmup),
                w10::name_shown(self.w10_services),
                thousands(self.w10_services)
            ),
            Job::Outbox => format!(
                "the transactional outbox on PostgreSQL (a scratch database per run): one relay publishes a backlog of {} rows of {SMALL_BYTES} B (batches of 1,000 read, published pipelined, deleted in one statement), timed until the outbox is empty; beside it the same count and size published by the SDK straight to the broker (window {WINDOW}); then {} business transactions one at a time (Outbox::enqueue + commit) with the relay on LISTEN/NOTIFY, each timed from the commit's return until the relay has the broker's acceptance, and after each one durable event sent by the SDK straight to the broker, timed from the send until its acceptance (the floor at the same moments: the broker's fsync)",
                thousands(self.outbox_relay),
                thousands(self.outbox_latency)
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_counts_follow_the_workloads_and_shrink_with_quick_and_scale() {
        let full = Plan::new(false, 1.0).expect("plan");
        assert_eq!(
            (full.w5a, full.w5b, full.w6, full.w7),
            (20_000, 200_000, 200_000, 1_000_000)
        );
        let quick = Plan::new(true, 1.0).expect("plan");
        assert_eq!(
            (quick.w5a, quick.w5b, quick.w6, quick.w7),
            (1_000, 10_000, 10_000, 50_000)
        );
        let tiny = Plan::new(true, 0.001).expect("plan");
        assert_eq!(tiny.w5a, MIN_MESSAGES);
        assert!(Plan::new(false, 0.0).is_err());
        assert!(Plan::new(false, f64::NAN).is_err());
    }
}
