//! The table's rows: the metrics, and the target each row is judged by.

use super::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Metric {
    Throughput,
    LatencyP50,
    LatencyP90,
    LatencyP99,
    LatencyP999,
    ReadyLine,
    FirstConnect,
    RssWithBacklog,
    RssAfterRestart,
    RelayThroughput,
    DirectPublish,
    CommitToAcceptP50,
    CommitToAcceptP99,
    SendToAcceptP50,
    SendToAcceptP99,
    MegabytesPerSecond,
    DiskShare,
    LoadThroughput,
    RssPerIdleConnection,
    P99BeforeIdle,
    P99WithIdle,
    P99IdleGrowth,
    /// W8's throughput as a share of the same side's W6 in the same run
    /// index: what ordering keys cost against the unordered drain.
    ShareOfW6,
}

impl Metric {
    pub(super) fn name(self) -> &'static str {
        match self {
            Metric::Throughput => "throughput",
            Metric::LatencyP50 => "latency p50",
            Metric::LatencyP90 => "latency p90",
            Metric::LatencyP99 => "latency p99",
            Metric::LatencyP999 => "latency p99.9",
            Metric::ReadyLine => "restart: spawn to ready line",
            Metric::FirstConnect => "restart: spawn to first use",
            Metric::RssWithBacklog => "RSS, backlog just written",
            Metric::RssAfterRestart => "RSS, backlog after restart",
            Metric::RelayThroughput => "relay, PostgreSQL → broker",
            Metric::DirectPublish => "direct publish, SDK → broker",
            Metric::CommitToAcceptP50 => "commit → acceptance p50",
            Metric::CommitToAcceptP99 => "commit → acceptance p99",
            Metric::SendToAcceptP50 => "direct send → acceptance p50",
            Metric::SendToAcceptP99 => "direct send → acceptance p99",
            Metric::MegabytesPerSecond => "throughput, MB/s",
            Metric::DiskShare => "share of the disk's write+fsync",
            Metric::LoadThroughput => "W5b publishing beside it",
            Metric::RssPerIdleConnection => "server RSS per idle connection",
            Metric::P99BeforeIdle => "W4a p99 before they connect",
            Metric::P99WithIdle => "W4a p99 with them connected",
            Metric::P99IdleGrowth => "W4a p99 with ÷ before",
            Metric::ShareOfW6 => "throughput ÷ W6's",
        }
    }

    pub(super) fn unit(self) -> &'static str {
        match self {
            Metric::Throughput
            | Metric::RelayThroughput
            | Metric::DirectPublish
            | Metric::LoadThroughput => "msg/s",
            Metric::MegabytesPerSecond => "MB/s",
            Metric::DiskShare | Metric::ShareOfW6 => "%",
            Metric::LatencyP50
            | Metric::LatencyP90
            | Metric::LatencyP99
            | Metric::LatencyP999
            | Metric::P99BeforeIdle
            | Metric::P99WithIdle
            | Metric::CommitToAcceptP50
            | Metric::CommitToAcceptP99
            | Metric::SendToAcceptP50
            | Metric::SendToAcceptP99 => "µs",
            Metric::ReadyLine | Metric::FirstConnect => "ms",
            Metric::RssWithBacklog | Metric::RssAfterRestart => "MiB",
            Metric::RssPerIdleConnection => "KiB",
            Metric::P99IdleGrowth => "×",
        }
    }

    pub(super) fn higher_is_better(self) -> bool {
        matches!(
            self,
            Metric::Throughput
                | Metric::RelayThroughput
                | Metric::DirectPublish
                | Metric::LoadThroughput
                | Metric::MegabytesPerSecond
                | Metric::DiskShare
                | Metric::ShareOfW6
        )
    }
}

/// The goal for one row: a least ratio (Courier's advantage, see
/// [`ratio`]) and/or a most value for Courier's own figure.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct Target {
    pub(super) min_ratio: Option<f64>,
    pub(super) max_courier: Option<f64>,
    pub(super) min_courier: Option<f64>,
}

impl Target {
    pub(super) const fn ratio(min: f64) -> Option<Target> {
        Some(Target {
            min_ratio: Some(min),
            max_courier: None,
            min_courier: None,
        })
    }

    pub(super) const fn at_most(max: f64) -> Option<Target> {
        Some(Target {
            min_ratio: None,
            max_courier: Some(max),
            min_courier: None,
        })
    }

    pub(super) const fn at_least(min: f64) -> Option<Target> {
        Some(Target {
            min_ratio: None,
            max_courier: None,
            min_courier: Some(min),
        })
    }

    pub(super) fn text(self, unit: &str) -> String {
        let mut parts = Vec::new();
        if let Some(min) = self.min_courier {
            parts.push(format!("≥ {} {unit}", format_value(min)));
        }
        if let Some(max) = self.max_courier {
            parts.push(format!("≤ {} {unit}", format_value(max)));
        }
        if let Some(min) = self.min_ratio {
            // Two decimals only where the first does not say it (0.95×).
            if (min * 10.0).fract().abs() < 1e-9 {
                parts.push(format!("≥ {min:.1}×"));
            } else {
                parts.push(format!("≥ {min:.2}×"));
            }
        }
        parts.join(", ")
    }

    /// Whether the medians meet it; `None` while a figure is missing.
    pub(super) fn met(self, courier: Option<f64>, ratio: Option<f64>) -> Option<bool> {
        let mut met = true;
        if let Some(min) = self.min_courier {
            met &= courier? >= min;
        }
        if let Some(max) = self.max_courier {
            met &= courier? <= max;
        }
        if let Some(min) = self.min_ratio {
            met &= ratio? >= min;
        }
        Some(met)
    }
}

/// How far Courier is ahead: Courier ÷ NATS where higher is better,
/// NATS ÷ Courier where lower is better; above 1 means Courier leads.
pub(super) fn ratio(metric: Metric, courier: f64, nats: f64) -> Option<f64> {
    let (num, den) = if metric.higher_is_better() {
        (courier, nats)
    } else {
        (nats, courier)
    };
    (den > 0.0 && num.is_finite() && den.is_finite()).then(|| num / den)
}

/// Observed ÷ unobserved at least this: observing costs at most 5 %.
pub(super) const OBSERVED_RATIO_MIN: f64 = 0.95;

/// The memory ceiling, 150 MB, in the MiB the table shows.
pub(super) const MIB_PER_150_MB: f64 = 150_000_000.0 / (1024.0 * 1024.0);

/// Every row the table can have, in the order it is printed, with the
/// target for it.
pub(super) const ROWS: [(Workload, Metric, Option<Target>); 55] = [
    (Workload::W1a, Metric::Throughput, Target::ratio(1.3)),
    (Workload::W1b, Metric::Throughput, Target::ratio(1.2)),
    (Workload::W2a, Metric::Throughput, Target::ratio(1.3)),
    (Workload::W2b, Metric::Throughput, Target::ratio(1.2)),
    (Workload::W3a, Metric::Throughput, Target::ratio(1.3)),
    (Workload::W3b, Metric::Throughput, Target::ratio(1.2)),
    (Workload::W4a, Metric::LatencyP50, Target::ratio(1.0)),
    (Workload::W4a, Metric::LatencyP90, None),
    (Workload::W4a, Metric::LatencyP99, Target::ratio(1.0)),
    (Workload::W4a, Metric::LatencyP999, None),
    (Workload::W4a, Metric::Throughput, None),
    (Workload::W4b, Metric::Throughput, Target::ratio(1.2)),
    (Workload::W5a, Metric::Throughput, None),
    (Workload::W5a, Metric::LatencyP50, None),
    (Workload::W5a, Metric::LatencyP99, None),
    (Workload::W5aAlways, Metric::Throughput, Target::ratio(1.0)),
    (Workload::W5aAlways, Metric::LatencyP50, None),
    (Workload::W5aAlways, Metric::LatencyP99, None),
    (Workload::W5b, Metric::Throughput, Target::ratio(1.5)),
    (Workload::W5bAlways, Metric::Throughput, Target::ratio(20.0)),
    (Workload::W6, Metric::Throughput, Target::ratio(1.5)),
    (Workload::W8a, Metric::Throughput, Target::ratio(20.0)),
    (Workload::W8b, Metric::Throughput, Target::ratio(3.0)),
    (
        Workload::W8a,
        Metric::ShareOfW6,
        Target::at_least(W8A_SHARE_OF_W6_MIN),
    ),
    (
        Workload::W8b,
        Metric::ShareOfW6,
        Target::at_least(W8B_SHARE_OF_W6_MIN),
    ),
    (Workload::W7a, Metric::ReadyLine, Target::at_most(1000.0)),
    (Workload::W7a, Metric::FirstConnect, Target::at_most(1000.0)),
    (
        Workload::W7b,
        Metric::RssWithBacklog,
        Some(Target {
            min_ratio: Some(1.0),
            max_courier: Some(MIB_PER_150_MB),
            min_courier: None,
        }),
    ),
    (
        Workload::W7b,
        Metric::RssAfterRestart,
        Some(Target {
            min_ratio: Some(1.0),
            max_courier: Some(MIB_PER_150_MB),
            min_courier: None,
        }),
    ),
    (Workload::W13c1, Metric::Throughput, None),
    (Workload::W13c1Always, Metric::Throughput, None),
    (Workload::W13c4, Metric::Throughput, None),
    (Workload::W13c4Always, Metric::Throughput, None),
    (Workload::W13c16, Metric::Throughput, None),
    (
        Workload::W13c16Always,
        Metric::Throughput,
        Target::ratio(5.0),
    ),
    (Workload::W13c64, Metric::Throughput, None),
    (
        Workload::W13c64Always,
        Metric::Throughput,
        Target::ratio(5.0),
    ),
    (
        Workload::W11,
        Metric::MegabytesPerSecond,
        Target::ratio(1.5),
    ),
    (Workload::W11, Metric::DiskShare, Target::at_least(50.0)),
    (
        Workload::W11Always,
        Metric::MegabytesPerSecond,
        Target::ratio(10.0),
    ),
    (Workload::W11Always, Metric::DiskShare, None),
    (Workload::W12, Metric::LatencyP50, None),
    (Workload::W12, Metric::LatencyP99, Target::ratio(1.0)),
    (Workload::W12, Metric::LoadThroughput, None),
    // Courier ≤ NATS: the ratio is NATS ÷ Courier for a lower-is-better row.
    (
        Workload::W9,
        Metric::RssPerIdleConnection,
        Target::ratio(1.0),
    ),
    (Workload::W9, Metric::P99BeforeIdle, None),
    (Workload::W9, Metric::P99WithIdle, None),
    (
        Workload::W9,
        Metric::P99IdleGrowth,
        Target::at_most(W9_P99_GROWTH_MAX),
    ),
    (Workload::W10, Metric::Throughput, Target::ratio(1.2)),
    (
        Workload::Outbox,
        Metric::RelayThroughput,
        Target::at_least(OUTBOX_RELAY_MIN),
    ),
    (Workload::Outbox, Metric::DirectPublish, None),
    (Workload::Outbox, Metric::CommitToAcceptP50, None),
    (
        Workload::Outbox,
        Metric::CommitToAcceptP99,
        Target::at_most(OUTBOX_COMMIT_TO_ACCEPT_P99_MAX_US),
    ),
    (Workload::Outbox, Metric::SendToAcceptP50, None),
    (Workload::Outbox, Metric::SendToAcceptP99, None),
];

/// W9: W4a's p99 with the idle connections at most this many times its
/// p99 before they connected.
pub(super) const W9_P99_GROWTH_MAX: f64 = 1.1;

/// Ordered drains against the unordered one (W6), in percent: one key
/// may cost half, a thousand keys a fifth.
pub(super) const W8A_SHARE_OF_W6_MIN: f64 = 50.0;
pub(super) const W8B_SHARE_OF_W6_MIN: f64 = 80.0;

/// The relay's goal, msg/s from PostgreSQL to the broker.
pub(super) const OUTBOX_RELAY_MIN: f64 = 20_000.0;
/// The relay's goal for commit → broker acceptance at p99, in µs.
pub(super) const OUTBOX_COMMIT_TO_ACCEPT_P99_MAX_US: f64 = 5_000.0;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_in_the_row_list_and_jobs_cover_the_selection() {
        for w in Workload::ALL {
            assert!(ROWS.iter().any(|(rw, _, _)| *rw == w), "{w:?} has no row");
        }
        assert_eq!(
            Job::for_selection(&[Workload::W7a, Workload::W7b]),
            vec![Job::Restart]
        );
        assert_eq!(
            Job::for_selection(&Workload::ALL).last(),
            Some(&Job::Outbox)
        );
        assert_eq!(
            Job::for_selection(&Workload::DEFAULT),
            vec![
                Job::PubSub(Size::Tiny),
                Job::PubSub(Size::Kib),
                Job::FanOut(Size::Tiny),
                Job::FanOut(Size::Kib),
                Job::Competing(Size::Tiny),
                Job::Competing(Size::Kib),
                Job::RequestSequential,
                Job::RequestConcurrent,
                Job::PublishOneByOne,
                Job::PublishPipelined,
                Job::Consume,
                Job::Restart,
                Job::Ordered(Keys::One),
                Job::Ordered(Keys::Thousand),
                Job::PublishConcurrent,
                Job::LargeEvents,
                Job::RequestUnderLoad,
                Job::IdleConnections,
                Job::RoutingTable
            ]
        );
        for job in Job::for_selection(&Workload::ALL) {
            assert!(Workload::ALL
                .iter()
                .any(|w| w.job() == job && w.id().starts_with(job.label())));
        }
    }

    #[test]
    fn the_ratio_is_couriers_advantage_whichever_way_is_better() {
        assert_eq!(ratio(Metric::Throughput, 300.0, 100.0), Some(3.0));
        assert_eq!(ratio(Metric::LatencyP50, 50.0, 100.0), Some(2.0));
        assert_eq!(ratio(Metric::LatencyP99, 200.0, 100.0), Some(0.5));
        assert_eq!(ratio(Metric::Throughput, 1.0, 0.0), None);
    }

    #[test]
    fn targets_judge_ratio_and_ceiling_on_the_medians() {
        let both = Target {
            min_ratio: Some(1.0),
            max_courier: Some(143.0),
            min_courier: None,
        };
        assert_eq!(both.met(Some(120.0), Some(1.5)), Some(true));
        assert_eq!(both.met(Some(150.0), Some(1.5)), Some(false));
        assert_eq!(both.met(Some(120.0), Some(0.9)), Some(false));
        assert_eq!(both.met(Some(120.0), None), None);
        assert_eq!(both.text("MiB"), "≤ 143 MiB, ≥ 1.0×");
        let floor = Target::at_least(20_000.0).expect("a target");
        assert_eq!(floor.met(Some(25_000.0), None), Some(true));
        assert_eq!(floor.met(Some(15_000.0), None), Some(false));
        assert_eq!(floor.text("msg/s"), "≥ 20,000 msg/s");
    }
}
