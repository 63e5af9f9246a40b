//! `/metrics`: the broker's counters and gauges in the OpenMetrics text
//! format (prometheus-client's encoder).
//!
//! A scrape copies what it needs under the core's lock
//! ([`MetricsSnapshot::take`]) and encodes after releasing it, so the
//! broker's traffic waits only for the copy, not for the text.
//!
//! Cardinality: `name` labels are bounded by the broker's
//! `metrics_names_max` (past it, traffic counts under `name="_other"`),
//! outcomes by `OUTCOMES_PER_NAME_MAX` per command name, `service` labels
//! by the services that exist, and `reason` labels by the protocol's error
//! codes.

use std::fmt;
use std::time::Instant;

use courier_broker::stats::{NameStats, OTHER};
use courier_broker::{Metrics, SubscriptionGauges};
use courier_store::histogram::Histogram;
use courier_store::StorageStats;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, MetricEncoder};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::http::seconds;
use crate::{Nanos, Shared};

/// Everything one scrape shows, copied out of the core.
#[derive(Debug)]
pub(crate) struct MetricsSnapshot {
    pub counters: Metrics,
    pub names: Vec<NameStats>,
    pub names_max: usize,
    pub names_over_cap: u64,
    pub subscriptions: Vec<SubscriptionGauges>,
    pub connections: Vec<(String, usize)>,
    pub storage: StorageStats,
    pub degraded: bool,
    pub recovery_seconds: f64,
    pub frames_in: u64,
    pub entries_out: u64,
    /// The core's lock: takings, time waited for it and held.
    pub core_lock: crate::core_lock::LockTotals,
    /// `None` when traces are off.
    pub traces: Option<crate::trace::TraceGauges>,
    /// The core's sampler: messages skipped, and the level (2^-level of
    /// new activities traced).
    pub trace_sampling: Option<(u64, u8)>,
    /// The gateway's webhook posts: delivered, retried, given up.
    pub webhooks: (u64, u64, u64),
    /// On a cluster backend: whether the node runs with weaker durability.
    pub durability_weaker: Option<bool>,
    /// On a cluster backend: its leases and, on one node, its counts
    /// (added after the core's part is taken).
    pub cluster: Option<crate::cluster_edge::gauges::ClusterGauges>,
}

impl MetricsSnapshot {
    pub(crate) fn take(shared: &Shared, now: Nanos) -> MetricsSnapshot {
        // Before the core's lock: the two are never held together.
        let traces = shared.tracer.as_ref().map(crate::trace::Tracer::gauges);
        let webhooks = shared.webhooks.snapshot();
        let mut core = shared.core();
        // Before this taking is counted: it shows what came before the scrape.
        let core_lock = shared.core_lock.totals();
        let traffic = core.traffic();
        let (names, names_max, names_over_cap) = (
            traffic.names().to_vec(),
            traffic.names_max(),
            traffic.names_over_cap,
        );
        let subscriptions = core.subscription_gauges(now);
        MetricsSnapshot {
            core_lock,
            webhooks,
            traces,
            trace_sampling: core.trace_sampling(),
            durability_weaker: shared.cluster.as_ref().map(|e| e.node.durability_weaker),
            cluster: None,
            counters: core.metrics().clone(),
            names,
            names_max,
            names_over_cap,
            subscriptions,
            connections: core.connections_by_service(),
            storage: core.store().storage_stats(),
            degraded: core.is_degraded(),
            recovery_seconds: shared.recovery_seconds,
            frames_in: shared.frames_in.load(std::sync::atomic::Ordering::Relaxed),
            entries_out: shared
                .entries_out
                .load(std::sync::atomic::Ordering::Relaxed),
        }
    }
}

/// The exposition text of a snapshot; `started` is when the scrape began
/// (its duration is the last gauge).
pub(crate) fn encode_metrics(snapshot: MetricsSnapshot, started: Instant) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Exposition { snapshot, started }));
    let mut text = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &registry) {
        // Writing to a String cannot fail; say so plainly if it ever does.
        text = format!("# encoding the metrics failed: {e}\n# EOF\n");
    }
    text
}

#[derive(Debug)]
struct Exposition {
    snapshot: MetricsSnapshot,
    started: Instant,
}

/// One metric family being written: its descriptor is out, samples follow.
struct Family<'a> {
    encoder: MetricEncoder<'a>,
}

impl<'a> Family<'a> {
    fn open(
        encoder: &'a mut DescriptorEncoder<'_>,
        name: &'a str,
        help: &str,
        kind: MetricType,
    ) -> Result<Family<'a>, fmt::Error> {
        Ok(Family {
            encoder: encoder.encode_descriptor(name, help, None, kind)?,
        })
    }

    fn counter(&mut self, labels: &impl EncodeLabelSet, value: u64) -> fmt::Result {
        self.encoder
            .encode_family(labels)?
            .encode_counter::<NoLabels, _, f64>(&value, None)
    }

    fn counter_seconds(&mut self, labels: &impl EncodeLabelSet, seconds: f64) -> fmt::Result {
        self.encoder
            .encode_family(labels)?
            .encode_counter::<NoLabels, _, f64>(&seconds, None)
    }

    fn gauge(&mut self, labels: &impl EncodeLabelSet, value: f64) -> fmt::Result {
        self.encoder.encode_family(labels)?.encode_gauge(&value)
    }

    fn histogram(&mut self, labels: &impl EncodeLabelSet, h: &Histogram) -> fmt::Result {
        self.encoder
            .encode_family(labels)?
            .encode_histogram::<NoLabels>(h.sum, h.count, &per_bucket(h), None)
    }
}

/// The encoder wants each bucket's own count (it sums them) and `f64::MAX`
/// for the `+Inf` bound.
fn per_bucket(h: &Histogram) -> Vec<(f64, u64)> {
    let mut below = 0;
    h.cumulative()
        .into_iter()
        .map(|(le, total)| {
            let own = total - below;
            below = total;
            (if le.is_finite() { le } else { f64::MAX }, own)
        })
        .collect()
}

type NoLabels = [(&'static str, &'static str); 0];

const NONE: NoLabels = [];

impl Collector for Exposition {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let s = &self.snapshot;
        encode_traffic(&mut encoder, &s.names)?;
        encode_subscriptions(&mut encoder, &s.subscriptions)?;
        encode_broker(&mut encoder, s)?;
        if let Some(cluster) = &s.cluster {
            encode_cluster(&mut encoder, cluster)?;
        }
        if let (Some(traces), Some(sampling)) = (&s.traces, s.trace_sampling) {
            encode_traces(&mut encoder, traces, sampling)?;
        }
        let mut webhooks = Family::open(
            &mut encoder,
            "courier_gateway_webhook_posts",
            "Replies posted to webhooks by the HTTP gateway: delivered (answered 2xx), retried (an attempt failed and another follows), given_up (the last attempt failed)",
            MetricType::Counter,
        )?;
        let (delivered, retried, given_up) = s.webhooks;
        webhooks.counter(&[("result", "delivered")], delivered)?;
        webhooks.counter(&[("result", "retried")], retried)?;
        webhooks.counter(&[("result", "given_up")], given_up)?;
        Family::open(
            &mut encoder,
            "courier_metrics_names",
            "Distinct message names counted under their own name label (the rest count as name=\"_other\")",
            MetricType::Gauge,
        )?
        .gauge(&NONE, s.names.iter().filter(|n| n.name != OTHER).count() as f64)?;
        Family::open(
            &mut encoder,
            "courier_metrics_names_max",
            "The cap on distinct name labels (serve --metrics-names-max)",
            MetricType::Gauge,
        )?
        .gauge(&NONE, s.names_max as f64)?;
        Family::open(
            &mut encoder,
            "courier_metrics_names_over_cap",
            "Messages counted under name=\"_other\" because the name cap was reached",
            MetricType::Counter,
        )?
        .counter(&NONE, s.names_over_cap)?;
        Family::open(
            &mut encoder,
            "courier_metrics_scrape_seconds",
            "Time this scrape took until its last family (copying and encoding)",
            MetricType::Gauge,
        )?
        .gauge(&NONE, self.started.elapsed().as_secs_f64())?;
        Ok(())
    }
}

fn encode_traffic(encoder: &mut DescriptorEncoder, names: &[NameStats]) -> fmt::Result {
    type Pick = fn(&courier_broker::stats::Traffic) -> u64;
    let per_service: [(&str, &str, Pick); 7] = [
        (
            "courier_messages_sent",
            "Messages accepted, by name and sending service",
            |t| t.sent,
        ),
        (
            "courier_messages_delivered",
            "Deliveries (first attempts and redeliveries), by name and receiving service",
            |t| t.delivered,
        ),
        (
            "courier_messages_redelivered",
            "Deliveries after the first attempt, by name and receiving service",
            |t| t.redelivered,
        ),
        (
            "courier_messages_acked",
            "Deliveries acked, by name and receiving service",
            |t| t.acked,
        ),
        (
            "courier_messages_nacked",
            "Deliveries nacked, by name and receiving service",
            |t| t.nacked,
        ),
        (
            "courier_messages_expired",
            "Messages dropped unhandled at their TTL, by name and receiving service",
            |t| t.expired,
        ),
        (
            "courier_messages_dead_lettered",
            "Messages moved to the dead letters, by name and receiving service",
            |t| t.dead_lettered,
        ),
    ];
    for (metric, help, pick) in per_service {
        let mut family = Family::open(encoder, metric, help, MetricType::Counter)?;
        for n in names {
            for (service, traffic) in &n.by_service {
                let value = pick(traffic);
                if value > 0 {
                    family.counter(
                        &[("name", n.name.as_str()), ("service", service.as_str())],
                        value,
                    )?;
                }
            }
        }
    }
    let mut refused = Family::open(
        encoder,
        "courier_messages_refused",
        "Sends refused, by name, sending service and reason (the protocol's error code name)",
        MetricType::Counter,
    )?;
    for n in names {
        for (service, traffic) in &n.by_service {
            for (code, count) in &traffic.refused {
                refused.counter(
                    &[
                        ("name", n.name.as_str()),
                        ("service", service.as_str()),
                        ("reason", code.as_str()),
                    ],
                    *count,
                )?;
            }
        }
    }
    let mut latency = Family::open(
        encoder,
        "courier_command_reply_seconds",
        "Time from a command's acceptance to its final reply, by command name",
        MetricType::Histogram,
    )?;
    for n in names.iter().filter(|n| n.reply_latency.count > 0) {
        latency.histogram(&[("name", n.name.as_str())], &n.reply_latency)?;
    }
    let mut outcomes = Family::open(
        encoder,
        "courier_command_replies",
        "Replies by command name and outcome (the reply's name)",
        MetricType::Counter,
    )?;
    for n in names {
        for (outcome, count) in &n.outcomes {
            outcomes.counter(
                &[("name", n.name.as_str()), ("outcome", outcome.as_str())],
                *count,
            )?;
        }
    }
    Ok(())
}

fn encode_subscriptions(
    encoder: &mut DescriptorEncoder,
    subs: &[SubscriptionGauges],
) -> fmt::Result {
    type Pick = fn(&SubscriptionGauges) -> Option<f64>;
    let gauges: [(&str, &str, Pick); 7] = [
        (
            "courier_subscription_backlog_messages",
            "Messages waiting for the service (ready, deferred, in flight, behind a busy key)",
            |g| Some(g.backlog as f64),
        ),
        (
            "courier_subscription_backlog_bytes",
            "Payload bytes of the messages waiting for the service",
            |g| Some(g.backlog_bytes as f64),
        ),
        (
            "courier_subscription_in_flight",
            "Deliveries awaiting an ack",
            |g| Some(g.in_flight as f64),
        ),
        (
            "courier_subscription_oldest_unacked_seconds",
            "Age of the oldest message the service still owes an ack for",
            |g| g.oldest_unacked_age.map(seconds),
        ),
        (
            "courier_subscription_consumers",
            "Connected instances that consume",
            |g| Some(g.consumers as f64),
        ),
        (
            "courier_subscription_consumers_paused",
            "Consumers paused because they do not read their deliveries",
            |g| Some(g.consumers_paused as f64),
        ),
        (
            "courier_subscription_dead_letters",
            "Messages in the service's dead letters",
            |g| Some(g.dead_letters as f64),
        ),
    ];
    for (metric, help, pick) in gauges {
        let mut family = Family::open(encoder, metric, help, MetricType::Gauge)?;
        for g in subs {
            if let Some(value) = pick(g) {
                family.gauge(&[("service", g.service.as_str())], value)?;
            }
        }
    }
    let mut paused = Family::open(
        encoder,
        "courier_subscription_paused",
        "1 while an operator has paused the service's subscription to the pattern (courier pause), else 0",
        MetricType::Gauge,
    )?;
    for g in subs {
        for pattern in &g.patterns {
            let value = f64::from(u8::from(g.paused.contains(pattern)));
            paused.gauge(
                &[
                    ("service", g.service.as_str()),
                    ("pattern", pattern.as_str()),
                ],
                value,
            )?;
        }
    }
    Ok(())
}

fn encode_broker(encoder: &mut DescriptorEncoder, s: &MetricsSnapshot) -> fmt::Result {
    let mut connections = Family::open(
        encoder,
        "courier_connections",
        "Live connections, by service",
        MetricType::Gauge,
    )?;
    for (service, n) in &s.connections {
        connections.gauge(&[("service", service.as_str())], *n as f64)?;
    }
    let c = &s.counters;
    let counters: [(&str, &str, u64); 24] = [
        ("courier_frames_in", "Frames decoded from clients (a batch frame counts once)", s.frames_in),
        ("courier_entries_out", "Frame entries encoded for clients: deliveries, send results, operation results, pongs (batched into fewer frames)", s.entries_out),
        ("courier_accepted", "Sends accepted (all names)", c.accepted),
        ("courier_refused", "Sends refused (all names and reasons)", c.refused),
        ("courier_duplicates", "Sends dropped as duplicates within the dedup window", c.duplicates),
        ("courier_delivered", "Deliveries (all names)", c.delivered),
        ("courier_redelivered", "Redeliveries (all names)", c.redelivered),
        ("courier_acked", "Acks (all names)", c.acked),
        ("courier_nacked", "Nacks (all names)", c.nacked),
        ("courier_dead_lettered", "Messages dead-lettered (all names)", c.dead_lettered),
        ("courier_expired", "Messages expired unhandled (all names)", c.expired),
        ("courier_dropped_unrouted", "Events and transient messages nobody was there to take", c.dropped_unrouted),
        ("courier_transient_dropped_paused", "Transient messages dropped because every taker was paused", c.transient_dropped_paused),
        ("courier_replies_parked", "Replies parked until an instance of the requesting service connects", c.replies_parked),
        ("courier_replies_dropped", "Parked replies dropped past the parking limit", c.replies_dropped),
        ("courier_unauthorized", "Sends and subscriptions the manifest did not allow", c.unauthorized),
        ("courier_rate_limited", "Sends refused over the service's send rate", c.rate_limited),
        ("courier_connections_refused", "Connections refused over a service's connection limit", c.connections_refused),
        ("courier_storage_failures", "Syncs that failed (disk full or erroring)", c.storage_failures),
        ("courier_unreadable_messages", "Stored messages that could not be read back", c.unreadable_messages),
        ("courier_frames_rejected", "Malformed or oversized frames (each closed its connection)", c.frames_rejected),
        ("courier_handshakes_refused", "Handshakes refused", c.handshakes_refused),
        ("courier_slow_consumers_cut", "Connections cut off for not reading their deliveries", c.slow_consumers_cut),
        ("courier_receivers_paused", "Times a receiver was paused for not reading its deliveries", c.receivers_paused),
    ];
    for (metric, help, value) in counters {
        Family::open(encoder, metric, help, MetricType::Counter)?.counter(&NONE, value)?;
    }
    let lock = &s.core_lock;
    Family::open(
        encoder,
        "courier_core_lock_takings",
        "Times the broker core's one lock was taken",
        MetricType::Counter,
    )?
    .counter(&NONE, lock.takings)?;
    for (metric, help, nanos) in [
        (
            "courier_core_lock_wait_seconds",
            "Time spent waiting for the broker core's lock, summed over its takers",
            lock.waited_ns,
        ),
        (
            "courier_core_lock_held_seconds",
            "Time the broker core's lock was held (over wall time: the share of one CPU it serialises)",
            lock.held_ns,
        ),
    ] {
        Family::open(encoder, metric, help, MetricType::Counter)?
            .counter_seconds(&NONE, nanos as f64 / 1e9)?;
    }
    let st = &s.storage;
    let mut gauges: Vec<(&str, &str, f64)> = vec![
        (
            "courier_log_bytes",
            "Bytes of log on disk",
            st.log_bytes as f64,
        ),
        (
            "courier_log_segments",
            "Segment files of the log",
            st.segments as f64,
        ),
        (
            "courier_recovery_seconds",
            "How long recovering the state took at start-up",
            s.recovery_seconds,
        ),
        (
            "courier_degraded",
            "1 while the disk fails and durable sends are refused",
            f64::from(u8::from(s.degraded)),
        ),
    ];
    if let Some(weaker) = s.durability_weaker {
        gauges.push((
            "courier_durability_weaker",
            "1 when the node started with --accept-weaker-durability past servers that acknowledge before they sync (or could not be asked)",
            f64::from(u8::from(weaker)),
        ));
    }
    if let Some(free) = st.disk_free_bytes {
        gauges.push((
            "courier_disk_free_bytes",
            "Bytes free for the log on its file system",
            free as f64,
        ));
    }
    for (metric, help, value) in gauges {
        Family::open(encoder, metric, help, MetricType::Gauge)?.gauge(&NONE, value)?;
    }
    Family::open(
        encoder,
        "courier_fsync_seconds",
        "Time each sync of the log took",
        MetricType::Histogram,
    )?
    .histogram(&NONE, &st.sync_seconds)?;
    Family::open(
        encoder,
        "courier_group_commit_records",
        "Records each sync made durable",
        MetricType::Histogram,
    )?
    .histogram(&NONE, &st.sync_batch_records)?;
    Ok(())
}

fn encode_cluster(
    encoder: &mut DescriptorEncoder,
    c: &crate::cluster_edge::gauges::ClusterGauges,
) -> fmt::Result {
    let mut leases = Family::open(
        encoder,
        "courier_lease_held",
        "1 while this node holds the lease (the keyed lanes', the reclaimer's, the registry's), 0 for one it held since it started",
        MetricType::Gauge,
    )?;
    for (lease, held) in &c.leases {
        leases.gauge(&[("lease", lease.as_str())], f64::from(u8::from(*held)))?;
    }
    let mut relays = Family::open(
        encoder,
        "courier_keyed_relay",
        "1 for each other node this node relays a service's keyed messages to, as the holder of its keyed lane",
        MetricType::Gauge,
    )?;
    for (service, node) in &c.relays {
        relays.gauge(
            &[("service", service.as_str()), ("node", node.as_str())],
            1.0,
        )?;
    }
    let Some((reading, age)) = &c.counts else {
        return Ok(());
    };
    type Pick = fn(&crate::cluster_edge::views::ClusterCounts) -> u64;
    let per_service: [(&str, &str, Pick); 3] = [
        (
            "courier_cluster_backlog_messages",
            "Messages JetStream holds for the service not yet delivered, both lanes (served by the holder of the reclaimer lease only)",
            |c| c.backlog,
        ),
        (
            "courier_cluster_in_flight",
            "Messages delivered to the service's nodes and not acknowledged, both lanes (reclaimer holder only)",
            |c| c.in_flight,
        ),
        (
            "courier_cluster_dead_letters",
            "The service's dead letters in COURIER_DEAD (reclaimer holder only)",
            |c| c.dead_letters,
        ),
    ];
    for (metric, help, pick) in per_service {
        let mut family = Family::open(encoder, metric, help, MetricType::Gauge)?;
        for (service, counts) in &reading.services {
            family.gauge(&[("service", service.as_str())], pick(counts) as f64)?;
        }
    }
    let mut ack_pending = Family::open(
        encoder,
        "courier_nats_ack_pending",
        "A service consumer's unacknowledged messages; JetStream delivers no more from it at max_ack_pending (reclaimer holder only)",
        MetricType::Gauge,
    )?;
    for (_, counts) in &reading.services {
        for (consumer, pending) in &counts.ack_pending {
            ack_pending.gauge(&[("consumer", consumer.as_str())], *pending as f64)?;
        }
    }
    for (metric, help, value) in [
        (
            "courier_cluster_counts_age_seconds",
            "How old the cluster counts above are (they are read at most every 5 s)",
            age.as_secs_f64(),
        ),
        (
            "courier_cluster_counts_unread",
            "Services whose cluster counts could not be read at that reading",
            reading.unread as f64,
        ),
    ] {
        Family::open(encoder, metric, help, MetricType::Gauge)?.gauge(&NONE, value)?;
    }
    Ok(())
}

fn encode_traces(
    encoder: &mut DescriptorEncoder,
    t: &crate::trace::TraceGauges,
    (skipped, level): (u64, u8),
) -> fmt::Result {
    let counters: [(&str, &str, u64); 7] = [
        (
            "courier_trace_records_truncated",
            "Records left out of activities that reached their size limit (1 MiB each)",
            t.stats.records_truncated,
        ),
        (
            "courier_trace_messages_traced",
            "Accepted messages kept in activity traces",
            t.stats.messages_traced,
        ),
        (
            "courier_trace_messages_skipped",
            "Accepted messages not traced: above --trace-rate, their activity was not sampled",
            skipped,
        ),
        (
            "courier_trace_records_unmatched",
            "Deliveries and outcomes of messages no trace holds (their activity was skipped or evicted)",
            t.stats.records_unmatched,
        ),
        (
            "courier_trace_records_dropped",
            "Trace records lost because the trace thread fell behind (its queue was full)",
            t.records_dropped,
        ),
        (
            "courier_trace_batches_dropped",
            "Batches of trace records lost because the trace thread fell behind",
            t.batches_dropped,
        ),
        (
            "courier_trace_disk_errors",
            "Failures of the trace log (after one, traces are kept in memory only)",
            t.disk_errors,
        ),
    ];
    for (metric, help, value) in counters {
        Family::open(encoder, metric, help, MetricType::Counter)?.counter(&NONE, value)?;
    }
    let mut evicted = Family::open(
        encoder,
        "courier_trace_activities_evicted",
        "Activities dropped from the traces, by reason (retention: older than --trace-retention; size: over --trace-bytes-max)",
        MetricType::Counter,
    )?;
    evicted.counter(&[("reason", "retention")], t.stats.evicted_retention)?;
    evicted.counter(&[("reason", "size")], t.stats.evicted_size)?;
    let gauges: [(&str, &str, f64); 5] = [
        (
            "courier_trace_activities",
            "Activities the traces hold",
            t.activities as f64,
        ),
        (
            "courier_trace_memory_bytes",
            "Bytes the trace index holds in memory",
            t.memory_bytes as f64,
        ),
        (
            "courier_trace_memory_bytes_max",
            "The trace index's memory bound (--trace-bytes-max)",
            t.memory_bytes_max as f64,
        ),
        (
            "courier_trace_disk_bytes",
            "Bytes of the trace log on disk",
            t.disk_bytes as f64,
        ),
        (
            "courier_trace_sample_ratio",
            "The share of new activities traced now (1 up to --trace-rate messages a second)",
            1.0 / f64::from(1u32 << level.min(31)),
        ),
    ];
    for (metric, help, value) in gauges {
        Family::open(encoder, metric, help, MetricType::Gauge)?.gauge(&NONE, value)?;
    }
    Ok(())
}
