//! What the edge reads out for metrics, tails, traces and the console.

use super::*;

impl<S: MessageStore> Broker<S> {
    pub fn services(&self) -> Vec<ServiceInfo> {
        let mut out: Vec<ServiceInfo> = self
            .services
            .iter()
            .map(|(name, s)| ServiceInfo {
                name: name.clone(),
                patterns: s.patterns.iter().cloned().collect(),
                paused: s.paused.iter().cloned().collect(),
                instances: s
                    .instances
                    .iter()
                    .filter_map(|c| self.conns.get(c))
                    .map(|c| c.instance.to_string())
                    .collect(),
                depth: s.queue.depth(),
                in_flight: s.queue.in_flight.len(),
                dead_letters: s.queue.dead_letters.len(),
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Whether accepted messages are recorded for tails (the network edge
    /// turns it on while at least one tail runs).
    pub fn set_tapping(&mut self, on: bool) {
        self.tapping = on;
        if !on {
            self.taps.clear();
        }
    }

    /// What was accepted since the last call, while tapping.
    pub fn take_taps(&mut self) -> Vec<Tapped> {
        std::mem::take(&mut self.taps)
    }

    /// Whether what happens to messages is recorded for activity traces
    /// (the network edge turns it on unless traces are off): `Some(rate)`
    /// traces every activity up to `rate` accepted messages a second and
    /// samples whole activities above it (0: every activity).
    pub fn set_tracing(&mut self, rate: Option<u32>) {
        self.sampler = rate.map(trace::TraceSampler::new);
        if rate.is_none() {
            self.traces.clear();
            self.traces_bytes = 0;
        }
    }

    /// Whether activity traces are kept.
    pub fn is_tracing(&self) -> bool {
        self.sampler.is_some()
    }

    /// Accepted messages the sampler left out of the traces, and 2^-level
    /// is the share of new activities traced now.
    pub fn trace_sampling(&self) -> Option<(u64, u8)> {
        self.sampler.as_ref().map(|s| (s.skipped, s.level()))
    }

    /// What happened since the last call, while tracing; `out` (emptied
    /// first) takes the records and hands its allocation over for the next.
    /// Returns about how many bytes of memory the records hold on to.
    pub fn take_traces(&mut self, out: &mut Vec<TraceRecord>) -> usize {
        out.clear();
        std::mem::swap(out, &mut self.traces);
        std::mem::take(&mut self.traces_bytes)
    }

    pub(crate) fn trace(&mut self, record: TraceRecord) {
        push_trace(&mut self.traces, &mut self.traces_bytes, record);
    }

    /// Records an accepted message that the sampler (`sample`) picked,
    /// when it did.
    pub(crate) fn record_accepted(
        &mut self,
        traced: bool,
        message: &Arc<Message>,
        seq: Seq,
        receivers: &Receivers,
    ) {
        if traced {
            self.trace(TraceRecord::Accepted {
                message: message.clone(),
                seq,
                receivers: receivers.clone(),
            });
        }
    }

    /// Counts an accepted message for the sampler; whether it is traced.
    pub(crate) fn sample(&mut self, message: &Message) -> bool {
        let now = self.now;
        self.sampler
            .as_mut()
            .is_some_and(|s| s.accept(&message.activity_id, now))
    }

    pub(crate) fn tap(&mut self, message: &Arc<Message>, receivers: Receivers) {
        if self.tapping {
            self.taps.push(Tapped {
                message: message.clone(),
                receivers,
            });
        }
    }

    /// Traffic per message name and service, for `/metrics`.
    pub fn traffic(&self) -> &stats::TrafficStats {
        &self.traffic
    }

    /// Every subscribed service's queue as `/metrics` shows it. Reads the
    /// oldest waiting message of each service from the store for its age,
    /// against `wall_now`: the wall clock, which message timestamps are on.
    pub fn subscription_gauges(&mut self, wall_now: Nanos) -> Vec<SubscriptionGauges> {
        let mut out: Vec<SubscriptionGauges> = Vec::with_capacity(self.services.len());
        for (name, s) in self.services.iter() {
            let oldest_seq = s.queue.runs().map(|(entry, _, _)| entry.seq).min();
            let consumers: Vec<&Conn> = s
                .instances
                .iter()
                .filter_map(|c| self.conns.get(c))
                .filter(|c| !c.patterns.is_empty())
                .collect();
            out.push(SubscriptionGauges {
                service: name.clone(),
                patterns: s.patterns.iter().cloned().collect(),
                paused: s.paused.iter().cloned().collect(),
                backlog: s.queue.depth(),
                backlog_bytes: s.queue.backlog_bytes(),
                in_flight: s.queue.in_flight.len(),
                consumers: consumers.len(),
                consumers_paused: consumers.iter().filter(|c| c.paused).count(),
                dead_letters: s.queue.dead_letters.len(),
                oldest_unacked_age: None,
                oldest_seq,
            });
        }
        for gauge in &mut out {
            if let Some(seq) = gauge.oldest_seq {
                if let Ok(Some(m)) = self.store.get(seq) {
                    gauge.oldest_unacked_age = Some(wall_now.saturating_sub(m.timestamp));
                }
            }
        }
        out.sort_by(|a, b| a.service.cmp(&b.service));
        out
    }

    /// Every live connection, by service then connection order.
    pub fn instances(&self) -> Vec<InstanceInfo> {
        let mut out: Vec<InstanceInfo> = self
            .conns
            .iter()
            .filter(|(_, c)| !c.relay)
            .map(|(id, c)| InstanceInfo {
                conn: *id,
                service: c.service.to_string(),
                instance: c.instance.to_string(),
                in_flight: c.in_flight,
                max_in_flight: c.max_in_flight,
                patterns: c.patterns.to_vec(),
                draining: c.draining,
                paused: c.paused,
            })
            .collect();
        out.sort_by(|a, b| a.service.cmp(&b.service).then(a.conn.cmp(&b.conn)));
        out
    }

    /// Live connections per service (instances and senders alike).
    pub fn connections_by_service(&self) -> Vec<(String, usize)> {
        let mut counts: std::collections::BTreeMap<&str, usize> = Default::default();
        for c in self.conns.values().filter(|c| !c.relay) {
            *counts.entry(c.service.as_str()).or_default() += 1;
        }
        counts
            .into_iter()
            .map(|(service, n)| (service.to_string(), n))
            .collect()
    }
}

/// Whether what happens to `message` is recorded: its activity is traced.
pub(crate) fn traces(sampler: &Option<trace::TraceSampler>, message: &Message, now: Nanos) -> bool {
    sampler
        .as_ref()
        .is_some_and(|s| s.traces(&message.activity_id, now))
}

/// [`traces`] for the stored message at `seq`. On a node that fetches
/// from a backend the node that accepted the message decided, and the
/// store holds the answer: this node's sampler follows only what this
/// node accepts, so a node that delivers more than it accepts would trace
/// activities the accepting node left out, and pay for it.
pub(crate) fn traces_stored<S: MessageStore>(
    sampler: &Option<trace::TraceSampler>,
    store: &S,
    upstream: bool,
    seq: Seq,
    message: &Message,
    now: Nanos,
) -> bool {
    if upstream {
        sampler.is_some() && store.fetched_traced(seq)
    } else {
        traces(sampler, message, now)
    }
}

/// Records `record`, counting the memory it holds on to (the message it
/// pins). A free function: callers hold other parts of the broker.
pub(crate) fn push_trace(traces: &mut Vec<TraceRecord>, bytes: &mut usize, record: TraceRecord) {
    *bytes += std::mem::size_of::<TraceRecord>()
        + match &record {
            TraceRecord::Accepted { message, .. } | TraceRecord::Delivered { message, .. } => {
                message.payload.len()
            }
            TraceRecord::Settled { .. } => 0,
        };
    traces.push(record);
}
