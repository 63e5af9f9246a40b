//! What is measured: the workloads, the jobs whose runs measure them, and
//! the systems (columns) they run on.

use super::*;

// ---------------------------------------------------------------------------
// What is measured

/// Workload ids. W1–W3 come in two message sizes (`a`: 16 B,
/// `b`: 1 KiB); W5 is compared twice, against JetStream at its default
/// fsync and at `sync_interval: always` (Courier's column is the same runs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Workload {
    W1a,
    W1b,
    W2a,
    W2b,
    W3a,
    W3b,
    W4a,
    W4b,
    W5a,
    W5aAlways,
    W5b,
    W5bAlways,
    W6,
    W7a,
    W7b,
    /// Ordered delivery: a keyed backlog, one key (W8a) or 1,000 (W8b).
    W8a,
    W8b,
    /// Durable events one at a time from 1, 4, 16 and 64 connections at
    /// once (group commit across connections); each compared with
    /// JetStream at its default fsync and, the `Always` twin, at `always`.
    W13c1,
    W13c1Always,
    W13c4,
    W13c4Always,
    W13c16,
    W13c16Always,
    W13c64,
    W13c64Always,
    /// 1 MiB durable events, pipelined (W11-always: against JetStream
    /// with `sync_interval: always`).
    W11,
    W11Always,
    /// W4a's requests while another connection publishes as W5b does.
    W12,
    /// 10,000 idle subscribed connections: the server's memory per
    /// connection, and W4a's p99 beside them.
    W9,
    /// W1a-shaped traffic through a routing table of 100,000 wildcard
    /// subscriptions, each event matching one service in 1,000.
    W10,
    /// The transactional outbox (needs PostgreSQL; only with `--only`).
    Outbox,
}

impl Workload {
    /// Every workload; [`Workload::DEFAULT`] without `--only`.
    pub(super) const ALL: [Workload; 31] = [
        Workload::W1a,
        Workload::W1b,
        Workload::W2a,
        Workload::W2b,
        Workload::W3a,
        Workload::W3b,
        Workload::W4a,
        Workload::W4b,
        Workload::W5a,
        Workload::W5aAlways,
        Workload::W5b,
        Workload::W5bAlways,
        Workload::W6,
        Workload::W7a,
        Workload::W7b,
        Workload::W8a,
        Workload::W8b,
        Workload::W13c1,
        Workload::W13c1Always,
        Workload::W13c4,
        Workload::W13c4Always,
        Workload::W13c16,
        Workload::W13c16Always,
        Workload::W13c64,
        Workload::W13c64Always,
        Workload::W11,
        Workload::W11Always,
        Workload::W12,
        Workload::W9,
        Workload::W10,
        Workload::Outbox,
    ];

    /// What runs without `--only`: everything but the outbox, which needs
    /// a PostgreSQL.
    pub(super) const DEFAULT: [Workload; Workload::ALL.len() - 1] =
        Workload::all_but(Workload::Outbox);

    /// [`Workload::ALL`] without `left_out` (which it holds once).
    const fn all_but(left_out: Workload) -> [Workload; Workload::ALL.len() - 1] {
        let mut picked = [Workload::W1a; Workload::ALL.len() - 1];
        let (mut i, mut j) = (0, 0);
        while i < Workload::ALL.len() {
            // `==` is not const; the discriminants are.
            if Workload::ALL[i] as u8 != left_out as u8 {
                picked[j] = Workload::ALL[i];
                j += 1;
            }
            i += 1;
        }
        picked
    }

    /// W13's row for `connections` publishers (JetStream `always` when
    /// `always`).
    pub(super) fn w13(connections: usize, always: bool) -> Workload {
        match (connections, always) {
            (1, false) => Workload::W13c1,
            (1, true) => Workload::W13c1Always,
            (4, false) => Workload::W13c4,
            (4, true) => Workload::W13c4Always,
            (16, false) => Workload::W13c16,
            (16, true) => Workload::W13c16Always,
            (_, false) => Workload::W13c64,
            (_, true) => Workload::W13c64Always,
        }
    }

    pub(super) fn id(self) -> &'static str {
        match self {
            Workload::W1a => "W1a",
            Workload::W1b => "W1b",
            Workload::W2a => "W2a",
            Workload::W2b => "W2b",
            Workload::W3a => "W3a",
            Workload::W3b => "W3b",
            Workload::W4a => "W4a",
            Workload::W4b => "W4b",
            Workload::W5a => "W5a",
            Workload::W5aAlways => "W5a-always",
            Workload::W5b => "W5b",
            Workload::W5bAlways => "W5b-always",
            Workload::W6 => "W6",
            Workload::W7a => "W7a",
            Workload::W7b => "W7b",
            Workload::W8a => "W8a",
            Workload::W8b => "W8b",
            Workload::W13c1 => "W13-1",
            Workload::W13c1Always => "W13-1-always",
            Workload::W13c4 => "W13-4",
            Workload::W13c4Always => "W13-4-always",
            Workload::W13c16 => "W13-16",
            Workload::W13c16Always => "W13-16-always",
            Workload::W13c64 => "W13-64",
            Workload::W13c64Always => "W13-64-always",
            Workload::W11 => "W11",
            Workload::W11Always => "W11-always",
            Workload::W12 => "W12",
            Workload::W9 => "W9",
            Workload::W10 => "W10",
            Workload::Outbox => "outbox",
        }
    }

    /// What the NATS column of this workload runs.
    pub(super) fn nats_side(self) -> &'static str {
        match self {
            Workload::W1a | Workload::W1b => "core pub/sub, 1 subscriber",
            Workload::W2a | Workload::W2b => "core pub/sub, 4 subscribers",
            Workload::W3a | Workload::W3b => "core pub/sub, queue group of 4",
            Workload::W4a | Workload::W4b => "core request/reply",
            Workload::W5a => {
                "JetStream file stream, sync publish, default fsync (sync_interval 2 min)"
            }
            Workload::W5aAlways => "JetStream file stream, sync publish, sync_interval: always",
            Workload::W5b => {
                "JetStream file stream, async publish, default fsync (sync_interval 2 min)"
            }
            Workload::W5bAlways => "JetStream file stream, async publish, sync_interval: always",
            Workload::W6 => "JetStream pull consumer, explicit ack",
            Workload::W7a | Workload::W7b => "JetStream file stream, same data, default fsync",
            Workload::W8a => "JetStream pull consumer, max_ack_pending 1, 2 pullers",
            Workload::W8b => {
                "JetStream, subject partitioned into 16, one pull consumer each with max_ack_pending 1"
            }
            Workload::W13c1 | Workload::W13c4 | Workload::W13c16 | Workload::W13c64 => {
                "JetStream file stream, sync publish from as many connections, default fsync"
            }
            Workload::W13c1Always
            | Workload::W13c4Always
            | Workload::W13c16Always
            | Workload::W13c64Always => {
                "JetStream file stream, sync publish from as many connections, sync_interval: always"
            }
            Workload::W11 => {
                "JetStream file stream, async publish of 1 MiB messages, default fsync (sync_interval 2 min)"
            }
            Workload::W11Always => {
                "JetStream file stream, async publish of 1 MiB messages, sync_interval: always"
            }
            Workload::W12 => {
                "core request/reply beside JetStream async publish on another connection, default fsync"
            }
            Workload::W9 => {
                "core NATS connections, one queue subscription each (a queue group per service), beside core request/reply"
            }
            Workload::W10 => {
                "core pub/sub, the same subjects and wildcard subscriptions, one connection per service"
            }
            Workload::Outbox => "none (Courier's outbox only)",
        }
    }

    /// The job whose runs measure this workload.
    pub(super) fn job(self) -> Job {
        match self {
            Workload::W1a => Job::PubSub(Size::Tiny),
            Workload::W1b => Job::PubSub(Size::Kib),
            Workload::W2a => Job::FanOut(Size::Tiny),
            Workload::W2b => Job::FanOut(Size::Kib),
            Workload::W3a => Job::Competing(Size::Tiny),
            Workload::W3b => Job::Competing(Size::Kib),
            Workload::W4a => Job::RequestSequential,
            Workload::W4b => Job::RequestConcurrent,
            Workload::W5a | Workload::W5aAlways => Job::PublishOneByOne,
            Workload::W5b | Workload::W5bAlways => Job::PublishPipelined,
            Workload::W6 => Job::Consume,
            Workload::W7a | Workload::W7b => Job::Restart,
            Workload::W8a => Job::Ordered(Keys::One),
            Workload::W8b => Job::Ordered(Keys::Thousand),
            Workload::W13c1
            | Workload::W13c1Always
            | Workload::W13c4
            | Workload::W13c4Always
            | Workload::W13c16
            | Workload::W13c16Always
            | Workload::W13c64
            | Workload::W13c64Always => Job::PublishConcurrent,
            Workload::W11 | Workload::W11Always => Job::LargeEvents,
            Workload::W12 => Job::RequestUnderLoad,
            Workload::W9 => Job::IdleConnections,
            Workload::W10 => Job::RoutingTable,
            Workload::Outbox => Job::Outbox,
        }
    }

    /// Courier's figures for W5 fill two rows: the same runs are compared
    /// with JetStream at its default fsync and at `always`.
    pub(super) fn courier_twin(self) -> Option<Workload> {
        match self {
            Workload::W5a => Some(Workload::W5aAlways),
            Workload::W5b => Some(Workload::W5bAlways),
            Workload::W13c1 => Some(Workload::W13c1Always),
            Workload::W13c4 => Some(Workload::W13c4Always),
            Workload::W13c16 => Some(Workload::W13c16Always),
            Workload::W13c64 => Some(Workload::W13c64Always),
            Workload::W11 => Some(Workload::W11Always),
            _ => None,
        }
    }
}

/// One figure from one run.
pub(super) type Measurement = (Workload, Metric, f64);

/// A system under test: one column of the table, one key in the JSON.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum System {
    Courier,
    Nats,
    /// Courier with its observability off (`--observability compare`).
    CourierUnobserved,
    /// Two Courier nodes on a three-server JetStream cluster
    /// (`--backend cluster`).
    CourierCluster,
    /// async-nats on that cluster's replicated streams (`--backend cluster`).
    JetStreamR3,
}

impl System {
    pub(super) fn key(self) -> &'static str {
        match self {
            System::Courier => "courier",
            System::Nats => "nats",
            System::CourierUnobserved => "courier_unobserved",
            System::CourierCluster => "courier_cluster",
            System::JetStreamR3 => "jetstream_r3",
        }
    }

    pub(super) fn title(self) -> &'static str {
        match self {
            System::Courier => "Courier",
            System::Nats => "NATS",
            System::CourierUnobserved => "Courier unobserved",
            System::CourierCluster => "Courier cluster",
            System::JetStreamR3 => "JetStream R3",
        }
    }
}

/// Message sizes of W1–W3.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Size {
    /// 16 B
    Tiny,
    /// 1 KiB
    Kib,
}

impl Size {
    pub(super) fn bytes(self) -> usize {
        match self {
            Size::Tiny => TINY_BYTES,
            Size::Kib => LARGE_BYTES,
        }
    }
}

/// A unit of work run once per run and system. One job can fill several
/// workloads: W7a and W7b share one (the backlog is built once, measured,
/// then the broker is killed and restarted), and NATS's W5 jobs run
/// JetStream at both fsync settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Job {
    PubSub(Size),
    FanOut(Size),
    Competing(Size),
    RequestSequential,
    RequestConcurrent,
    PublishOneByOne,
    PublishPipelined,
    Consume,
    Restart,
    /// W8: a keyed backlog consumed in order by 2 instances.
    Ordered(Keys),
    PublishConcurrent,
    /// W11: 1 MiB durable events, pipelined.
    LargeEvents,
    /// W12: W4a beside W5b.
    RequestUnderLoad,
    /// W9: idle subscribed connections, then W4a beside them.
    IdleConnections,
    /// W10: a big routing table, then W1a-shaped traffic through it.
    RoutingTable,
    Outbox,
}

/// How many ordering keys W8's events spread over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Keys {
    One,
    Thousand,
}

impl Keys {
    pub(super) fn count(self) -> u64 {
        match self {
            Keys::One => 1,
            Keys::Thousand => 1_000,
        }
    }
}

impl Job {
    pub(super) fn for_selection(selected: &[Workload]) -> Vec<Job> {
        let mut jobs = Vec::new();
        for w in selected {
            let job = w.job();
            if !jobs.contains(&job) {
                jobs.push(job);
            }
        }
        jobs
    }

    /// The workload a run of this job is filed under first (W5's runs
    /// also fill their `-always` twins).
    pub(super) fn workload(self) -> Workload {
        Workload::ALL
            .into_iter()
            .find(|w| w.job() == self)
            .unwrap_or(Workload::W1a)
    }

    /// W4: one run measures both sides, alternating between them (see
    /// the `w4` module).
    pub(super) fn is_request_reply(self) -> bool {
        matches!(self, Job::RequestSequential | Job::RequestConcurrent)
    }

    /// The systems each run measures together: all at once for W4; every
    /// other job runs each system on its own, one after the other.
    pub(super) fn run_groups(self, systems: &[System]) -> Vec<Vec<System>> {
        if self.is_request_reply() {
            vec![systems.to_vec()]
        } else {
            systems.iter().map(|&s| vec![s]).collect()
        }
    }

    pub(super) fn label(self) -> &'static str {
        match self {
            Job::PubSub(Size::Tiny) => "W1a",
            Job::PubSub(Size::Kib) => "W1b",
            Job::FanOut(Size::Tiny) => "W2a",
            Job::FanOut(Size::Kib) => "W2b",
            Job::Competing(Size::Tiny) => "W3a",
            Job::Competing(Size::Kib) => "W3b",
            Job::RequestSequential => "W4a",
            Job::RequestConcurrent => "W4b",
            Job::PublishOneByOne => "W5a",
            Job::PublishPipelined => "W5b",
            Job::Consume => "W6",
            Job::Restart => "W7",
            Job::Ordered(Keys::One) => "W8a",
            Job::Ordered(Keys::Thousand) => "W8b",
            Job::PublishConcurrent => "W13",
            Job::LargeEvents => "W11",
            Job::RequestUnderLoad => "W12",
            Job::IdleConnections => "W9",
            Job::RoutingTable => "W10",
            Job::Outbox => "outbox",
        }
    }
}
