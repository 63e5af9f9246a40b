//! W10, written once for both sides ([`RoutingSide`]): a routing table of
//! many services' wildcard subscriptions, then W1a's transient events
//! through it, each matching one subscription of one service. Every
//! event has a name of its own, so the route caches of both servers
//! (Courier's of 10,000 names, nats-server's of its sublist) miss and
//! each event is matched against the table.

use super::side::{Audience, RoutingSide};
use super::*;

/// Subscriptions of each service of the table.
pub(super) const PATTERNS_PER_SERVICE: u64 = 100;

/// Service `k`'s name (NATS: its connection's name).
pub(super) fn service(k: u64) -> String {
    format!("bench-w10-s{k:04}")
}

/// Service `k`'s patterns: `w10.s<k>.t<j>.*` for even `j`,
/// `w10.s<k>.t<j>.>` for odd; Courier's wildcards and NATS's are the
/// same.
pub(super) fn patterns(k: u64) -> Vec<String> {
    (0..PATTERNS_PER_SERVICE)
        .map(|j| {
            let last = if j % 2 == 0 { "*" } else { ">" };
            format!("w10.s{k:04}.t{j:02}.{last}")
        })
        .collect()
}

pub(super) fn patterns_shown() -> &'static str {
    "w10.sNNNN.tJJ.* for even JJ, w10.sNNNN.tJJ.> for odd, JJ 00–99"
}

/// Event `i` for service `k`: it matches pattern `i mod 100` of `k`'s,
/// and no other; fixed width, so every event has the same size.
pub(super) fn name(k: u64, i: u64) -> String {
    format!("w10.s{k:04}.t{:02}.m{i:08}", i % PATTERNS_PER_SERVICE)
}

/// The service that receives the events: the middle one of `services`.
pub(super) fn receiver(services: u64) -> u64 {
    services / 2
}

pub(super) fn name_shown(services: u64) -> String {
    format!(
        "w10.s{:04}.tJJ.mIIIIIIII (I the event's number, JJ = I mod 100)",
        receiver(services)
    )
}

/// The names of a run's transient events: W1–W3's one name, or W10's, a
/// new one per event.
pub(super) enum Names {
    One(&'static str),
    Routed { service: u64, sent: AtomicU64 },
}

impl Names {
    pub(super) fn routed(service: u64) -> Names {
        Names::Routed {
            service,
            sent: AtomicU64::new(0),
        }
    }

    /// The next event's name.
    pub(super) fn next(&self) -> std::borrow::Cow<'static, str> {
        match self {
            Names::One(name) => (*name).into(),
            Names::Routed { service, sent } => {
                name(*service, sent.fetch_add(1, Ordering::Relaxed)).into()
            }
        }
    }

    /// A name as long as every one of the run's.
    pub(super) fn sample(&self) -> std::borrow::Cow<'static, str> {
        match self {
            Names::One(name) => (*name).into(),
            Names::Routed { service, .. } => name(*service, 0).into(),
        }
    }
}

/// One run of W10 on `side`.
pub(super) async fn run<S: RoutingSide>(
    side: &mut S,
    plan: &Plan,
) -> anyhow::Result<Vec<Measurement>> {
    let services = plan.w10_services;
    let receiving = receiver(services);
    let address = side.address();
    let started = Instant::now();
    // The receiving service subscribes with the events' receiver below.
    let table = side
        .watch(w9::connect_many(
            "routing table: services subscribed",
            services - 1,
            |i| S::table_service(&address, if i >= receiving { i + 1 } else { i }),
        ))
        .await?;
    progress(&format!(
        "  routing table: {} subscriptions of {} services in {:.1} s",
        thousands(services * PATTERNS_PER_SERVICE),
        thousands(services),
        started.elapsed().as_secs_f64()
    ));
    let measured = transient::run_counted(
        side,
        plan.w10,
        plan.warmup,
        Audience::Routed { service: receiving },
        Size::Tiny,
        Workload::W10,
    )
    .await;
    S::close_table(table).await;
    measured
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_event_matches_one_pattern_of_one_service() {
        let event = name(500, 1_234_567);
        assert_eq!(event, "w10.s0500.t67.m01234567");
        assert_eq!(event.len(), name(500, 0).len());
        for k in [499, 500, 501] {
            let matching = patterns(k)
                .iter()
                .filter(|p| courier_proto::pattern_matches(p, &event))
                .count();
            assert_eq!(matching, usize::from(k == 500), "service {k}");
        }
        assert_eq!(patterns(3)[0], "w10.s0003.t00.*");
        assert_eq!(patterns(3)[99], "w10.s0003.t99.>");
        assert_eq!(receiver(1_000), 500);
    }
}
