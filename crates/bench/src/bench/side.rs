//! The one interface both systems under test offer the workloads.
//!
//! The Courier side ([`super::courier::CourierSide`]: the SDK against a
//! `courier serve` child) and the NATS side
//! ([`super::nats::NatsSide`]: async-nats against a nats-server child with
//! JetStream) each implement [`Side`] and its extensions; every workload
//! is then one function for both (its message counts, sizes, phases and
//! what is timed written once), and the two columns of its row measure
//! the same shape by construction. What differs between the systems —
//! W1–W3's flow control, how a consumer takes a backlog, how a server
//! restarts — is an operation of the trait, implemented per side.
//!
//! [`Side`]: durable publishing and request/reply (W4, W5, W11–W13);
//! [`TransientSide`]: at-most-once fan-out (W1–W3); [`BacklogSide`]:
//! events that wait for an offline consumer, then that consumer (W6,
//! W8); [`RestartSide`]: kill -9 and a restart on the same data (W7);
//! [`IdleSide`]: idle subscribed connections by the thousand (W9);
//! [`RoutingSide`]: a routing table of many wildcard subscriptions (W10).

use std::future::Future;

use super::*;

/// A system under test, started fresh for one run: its server, on a free
/// loopback port, with a data directory of its own.
pub(super) trait Side {
    /// A connection that publishes durable events (NATS: a JetStream
    /// context whose file stream holds the subject).
    type Publisher: Clone + Send + Sync + 'static;
    /// A durable event sent, its ack not awaited yet.
    type Pending: Send + 'static;
    /// A requester and the responder it asks, on the same server.
    type Requester: Send + Sync + 'static;

    /// Where clients connect.
    fn address(&self) -> String;

    /// The server's data directory (W11 measures the disk there).
    fn data_dir(&self) -> &Path;

    /// The server's resident memory (W7, W9).
    fn rss_mib(&self) -> anyhow::Result<f64>;

    /// What moves a cluster's leaders to where a durable workload's
    /// clients enter it, before the workload is timed; one server has no
    /// leaders to move.
    fn leaders(&self) -> Leaders {
        Leaders::default()
    }

    /// Runs `work`, but fails as soon as the server dies.
    fn watch<T>(
        &mut self,
        work: impl Future<Output = anyhow::Result<T>>,
    ) -> impl Future<Output = anyhow::Result<T>>;

    /// Connects a publisher of durable events named `name`.
    fn publisher(
        address: &str,
        name: &'static str,
    ) -> impl Future<Output = anyhow::Result<Self::Publisher>> + Send;

    /// Publishes one durable event and waits for its ack.
    fn publish<'a>(
        publisher: &'a Self::Publisher,
        name: &'static str,
        payload: Bytes,
    ) -> impl Future<Output = anyhow::Result<()>> + Send + 'a;

    /// Sends one durable event named `name`, ordered by `key` when it has
    /// one, without awaiting its ack.
    fn send<'a>(
        publisher: &'a Self::Publisher,
        name: &'static str,
        key: Option<Key>,
        payload: Bytes,
    ) -> impl Future<Output = anyhow::Result<Self::Pending>> + Send + 'a;

    /// Waits for the ack of one [`Side::send`].
    fn acked(pending: Self::Pending) -> impl Future<Output = anyhow::Result<()>> + Send;

    /// Closes a publisher's connection (so that it cannot reconnect to a
    /// restarted server).
    fn close_publisher(publisher: Self::Publisher) -> impl Future<Output = ()>;

    /// Connects a responder to `responder` that answers every request
    /// with [`TINY_BYTES`], and a requester to `requester` on another
    /// connection (one server: the same address twice).
    fn requester(
        requester: &str,
        responder: &str,
    ) -> impl Future<Output = anyhow::Result<Self::Requester>> + Send;

    /// One request of [`TINY_BYTES`]; request `i` of `of` (for errors).
    fn request<'a>(
        requester: &'a Self::Requester,
        i: u64,
        of: u64,
    ) -> impl Future<Output = anyhow::Result<()>> + Send + 'a;

    /// Closes the requester's and the responder's connections.
    fn close_requester(requester: Self::Requester) -> impl Future<Output = ()> + Send;
}

/// A durable workload's traffic, as far as a cluster places it: the
/// replicated group that takes it, and the client whose server it enters
/// the cluster through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Leg {
    /// W5's publisher: its events named this, into their stream.
    Publish(&'static str),
    /// W6's publisher: the backlog, into its stream.
    Backlog,
    /// W6's consumer: its pulls and acks, into the consumer.
    Consume,
}

/// See [`Side::leaders`]: nothing, or a cluster's leaders to move.
#[derive(Default)]
pub(super) struct Leaders(Option<super::cluster::LeaderMover>);

impl Leaders {
    pub(super) fn of(mover: super::cluster::LeaderMover) -> Leaders {
        Leaders(Some(mover))
    }

    /// Leads `leg`'s group from the server its client is connected to.
    pub(super) async fn place(&self, leg: Leg) -> anyhow::Result<()> {
        match &self.0 {
            Some(mover) => mover.place(leg).await,
            None => Ok(()),
        }
    }
}

/// Where client `client` of a run connects: `address`'s servers from
/// the `client`-th on (counting from 0, modulo their number), then the
/// others. One server is itself; on a cluster the clients of a run
/// spread over its servers or nodes as users' would, the publisher (0)
/// on the first.
pub(super) fn spread(address: &str, client: usize) -> String {
    let mut servers: Vec<&str> = address.split(',').collect();
    let by = client % servers.len();
    servers.rotate_left(by);
    servers.join(",")
}

/// The ordering key of a W8 event: `value` of the run's keys; NATS puts
/// it in the subject, in one of `partitions`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Key {
    pub(super) value: u64,
    pub(super) partitions: u64,
}

/// Sends from this many on show their progress every tenth.
const PROGRESS_FROM: u64 = 1_000_000;

/// Publishes `count` durable events, keeping at most `window`
/// unacknowledged; event `i` is `event(i)`: its name, key and payload.
pub(super) async fn publish_each<S: Side>(
    publisher: &S::Publisher,
    count: u64,
    window: usize,
    mut event: impl FnMut(u64) -> (&'static str, Option<Key>, Bytes),
) -> anyhow::Result<()> {
    let mut pending: VecDeque<(u64, S::Pending)> = VecDeque::with_capacity(window);
    // A backlog of millions takes tens of seconds: say how far it got.
    let step = if count >= PROGRESS_FROM {
        count / 10
    } else {
        u64::MAX
    };
    let started = Instant::now();
    for i in 0..count {
        if i > 0 && i % step == 0 {
            progress(&format!(
                "  published {} of {} after {:.1} s",
                thousands(i),
                thousands(count),
                started.elapsed().as_secs_f64()
            ));
        }
        if pending.len() >= window {
            if let Some((j, ack)) = pending.pop_front() {
                S::acked(ack)
                    .await
                    .with_context(|| format!("publish {} of {count} failed", j + 1))?;
            }
        }
        let (name, key, payload) = event(i);
        let ack = S::send(publisher, name, key, payload)
            .await
            .with_context(|| format!("publish {} of {count} could not be sent", i + 1))?;
        pending.push_back((i, ack));
    }
    for (j, ack) in pending {
        S::acked(ack)
            .await
            .with_context(|| format!("publish {} of {count} failed", j + 1))?;
    }
    Ok(())
}

/// Publishes `count` durable events named `name`, keeping at most
/// `window` unacknowledged.
pub(super) async fn publish_pipelined<S: Side>(
    publisher: &S::Publisher,
    name: &'static str,
    payload: &Bytes,
    count: u64,
    window: usize,
) -> anyhow::Result<()> {
    publish_each::<S>(publisher, count, window, |_| (name, None, payload.clone())).await
}

/// Who receives W1–W3's transient events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Audience {
    /// W1: one receiver.
    One,
    /// W2: four receivers, each gets every event (Courier: 4 services;
    /// NATS: 4 subscriptions).
    FanOut,
    /// W3: four competing receivers, each event goes to one (Courier: one
    /// service with 4 instances; NATS: a queue group of 4).
    Competing,
    /// W10: service `service` of the routing table, on one connection
    /// with all its subscriptions; each event has a name of its own that
    /// one of them matches (see the `w10` module).
    Routed { service: u64 },
}

/// Receivers of W2, and instances of W3's competing consumers.
pub(super) const AUDIENCE_SIZE: usize = 4;

impl Audience {
    pub(super) fn of(job: Job) -> Option<(Audience, Size)> {
        match job {
            Job::PubSub(size) => Some((Audience::One, size)),
            Job::FanOut(size) => Some((Audience::FanOut, size)),
            Job::Competing(size) => Some((Audience::Competing, size)),
            _ => None,
        }
    }

    /// Connections that receive.
    pub(super) fn receivers(self) -> usize {
        match self {
            Audience::One | Audience::Routed { .. } => 1,
            Audience::FanOut | Audience::Competing => AUDIENCE_SIZE,
        }
    }

    /// Deliveries per published event.
    pub(super) fn copies(self) -> u64 {
        match self {
            Audience::One | Audience::Competing | Audience::Routed { .. } => 1,
            Audience::FanOut => AUDIENCE_SIZE as u64,
        }
    }
}

/// What W1–W3 need: transient (at most once) events from one publisher
/// to an [`Audience`], each system with its own flow control.
pub(super) trait TransientSide: Side {
    /// The receiving connections and their count of deliveries.
    type Receivers;
    /// The publisher of transient events.
    type Sender;

    /// Connects and subscribes `audience`; `capacity` is the most events
    /// a run publishes (NATS sizes its subscription buffers by it).
    fn receivers(
        address: &str,
        audience: Audience,
        capacity: u64,
    ) -> impl Future<Output = anyhow::Result<Self::Receivers>>;

    /// Connects the publisher (closed with the receivers).
    fn sender(
        address: &str,
        receivers: &mut Self::Receivers,
    ) -> impl Future<Output = anyhow::Result<Self::Sender>>;

    /// From now on every event published so far, `published` in all, is
    /// to be received (by each receiving service or subscription).
    fn expect(receivers: &Self::Receivers, published: u64);

    /// Publishes `count` transient events of `payload`.
    fn publish_transient(
        sender: &Self::Sender,
        receivers: &Self::Receivers,
        payload: &Bytes,
        count: u64,
    ) -> impl Future<Output = anyhow::Result<()>>;

    /// Waits until what [`TransientSide::expect`] set was received, and
    /// returns when that was; fails when deliveries were lost or stopped.
    fn received(
        receivers: &Self::Receivers,
        sender: &Self::Sender,
    ) -> impl Future<Output = anyhow::Result<Instant>>;

    /// Closes every receiving connection and the publisher's.
    fn close_transient(receivers: Self::Receivers) -> impl Future<Output = ()>;
}

/// What W9 needs: many idle connections, each subscribed, beside the
/// requests of W4a.
pub(super) trait IdleSide: Side {
    /// One idle connection and its subscription.
    type Idle: Send + 'static;

    /// Connects an instance of W9's service `service` (see the `w9`
    /// module) and subscribes it; it then stays idle.
    fn idle(address: &str, service: u64)
        -> impl Future<Output = anyhow::Result<Self::Idle>> + Send;

    /// Closes the idle connections.
    fn close_idle(idle: Vec<Self::Idle>) -> impl Future<Output = ()>;
}

/// What W10 needs besides W1's events: a routing table of many services'
/// wildcard subscriptions, each service on a connection of its own.
pub(super) trait RoutingSide: TransientSide {
    /// One service of the table: its connection and subscriptions.
    type TableService: Send + 'static;

    /// Connects W10's service `service` and subscribes it to all its
    /// patterns (see the `w10` module).
    fn table_service(
        address: &str,
        service: u64,
    ) -> impl Future<Output = anyhow::Result<Self::TableService>> + Send;

    /// Closes the table's connections.
    fn close_table(table: Vec<Self::TableService>) -> impl Future<Output = ()>;
}

/// The backlogs of W6–W8: events published while their consumer is not
/// connected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Backlog {
    /// W6: consumed by one consumer afterwards.
    Consume,
    /// W7: never consumed; the server restarts under it.
    Restart,
    /// W8: keyed, consumed in order by 2 instances afterwards.
    Ordered(Keys),
}

/// What W6–W8 need: events that wait for a consumer that is not
/// connected, then that consumer.
pub(super) trait BacklogSide: Side {
    /// What consumes a backlog, connected but not consuming yet.
    type Consumer;
    /// How the progress line calls the backlog's reader before it
    /// connects, e.g. "one subscribed offline service".
    const BACKLOG_WAITS_FOR: &'static str;

    /// A publisher of `backlog`'s events, with what must be in place for
    /// them to wait (Courier: the service subscribed, then gone; NATS: the
    /// stream, and for W7 its durable consumer).
    fn backlog_publisher(
        address: &str,
        backlog: Backlog,
    ) -> impl Future<Output = anyhow::Result<Self::Publisher>>;

    /// What is set up before the consuming is timed.
    fn consumer(
        address: &str,
        backlog: Backlog,
    ) -> impl Future<Output = anyhow::Result<Self::Consumer>>;

    /// W6, timed: takes all `count` events with explicit acks (at most
    /// [`MAX_IN_FLIGHT`] unacknowledged) until the server has applied the
    /// acks; returns how many deliveries were redeliveries.
    fn consume_all(
        consumer: Self::Consumer,
        count: u64,
    ) -> impl Future<Output = anyhow::Result<u64>>;

    /// W8, timed: 2 instances take all `count` keyed events with explicit
    /// acks, each delivery shown to `order`, until the server has applied
    /// the acks.
    fn consume_in_order(
        consumer: Self::Consumer,
        keys: Keys,
        count: u64,
        order: Arc<OrderCheck>,
    ) -> impl Future<Output = anyhow::Result<()>>;
}

/// What W7 needs: kill -9 and a restart on the same data and port.
pub(super) trait RestartSide: BacklogSide {
    /// How the progress lines name the server ("broker") and its data
    /// ("data dir").
    const SERVER: &'static str;
    const DATA: &'static str;

    /// The bytes in its data directory.
    fn data_bytes(&self) -> u64;

    /// Kills the server (SIGKILL) and starts it again on the same data
    /// and port; the time from spawning to its ready line, and to the
    /// first connection that sees the whole backlog of `count`.
    fn restart(&mut self, count: u64)
        -> impl Future<Output = anyhow::Result<(Duration, Duration)>>;

    /// Once the backlog is written, before the RSS with it is read: where
    /// the restart is chosen by what the backlog made (on the cluster,
    /// JetStream's side restarts the server leading the stream).
    fn backlog_written(&mut self) -> impl Future<Output = anyhow::Result<()>> {
        async { Ok(()) }
    }

    /// Fails unless the backlog's consumer still has all `count` waiting.
    fn check_backlog(&mut self, count: u64) -> impl Future<Output = anyhow::Result<()>>;

    /// What the restarted server logged of its recovery.
    fn recovery_note(&self) -> Option<String>;
}

/// Which fsync setting a NATS server of a run has, and so which row its
/// figures go to; Courier's broker syncs before every ack either way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Fsync {
    /// JetStream's `sync_interval` left at its default (2 min).
    Default,
    /// `sync_interval: always`: fsync before every ack.
    Always,
}

impl Fsync {
    pub(super) const BOTH: [Fsync; 2] = [Fsync::Default, Fsync::Always];

    /// `default` or its `-always` twin.
    pub(super) fn pick(self, default: Workload, always: Workload) -> Workload {
        match self {
            Fsync::Default => default,
            Fsync::Always => always,
        }
    }

    /// How an error of a run on it is introduced.
    pub(super) fn described(self) -> &'static str {
        match self {
            Fsync::Default => "JetStream at its default fsync",
            Fsync::Always => "JetStream with sync_interval: always",
        }
    }
}
