//! W1–W3 on the NATS side ([`TransientSide`]): core NATS publish and
//! subscribe, at most once; a subscriber or queue member per connection,
//! their deliveries counted together.

use super::nats::NatsSide;
use super::nats::{connect, ClientEvents, Tasks, LOSS_GRACE, MIN_SUBSCRIPTION_CAPACITY};
use super::side::{spread, Audience, RoutingSide, TransientSide};
use super::w10::Names;
use super::*;

use futures_util::StreamExt as _;

/// Core NATS subject of W1–W3, and W3's queue group.
const TRANSIENT_SUBJECT: &str = "bench.transient";
const QUEUE_GROUP: &str = "bench-workers";

/// Deliveries counted over all subscribers of W1–W3, and when the count
/// reached the target.
#[derive(Default)]
struct Tally {
    count: AtomicU64,
    target: AtomicU64,
    reached: Notify,
    reached_at: Mutex<Option<Instant>>,
}

impl Tally {
    /// Counts one delivery.
    fn add(&self) {
        let now = self.count.fetch_add(1, Ordering::SeqCst) + 1;
        if now == self.target.load(Ordering::SeqCst) {
            *self.reached_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
            self.reached.notify_one();
        }
    }

    /// Sets the next target; call while no delivery is under way.
    fn aim(&self, target: u64) {
        *self.reached_at.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.target.store(target, Ordering::SeqCst);
    }

    fn count(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }

    /// Waits until the target is reached; returns when that happened. Fails
    /// once the clients reported trouble (dropped messages, a lost
    /// connection) and deliveries stop, or when they stop for
    /// [`STALL_TIMEOUT`].
    async fn wait(&self, events: &ClientEvents) -> anyhow::Result<Instant> {
        let target = self.target.load(Ordering::SeqCst);
        let mut last = self.count();
        let mut last_change = Instant::now();
        loop {
            let now = self.count();
            if now >= target {
                let at = *self.reached_at.lock().unwrap_or_else(|p| p.into_inner());
                return Ok(at.unwrap_or_else(Instant::now));
            }
            if now != last {
                (last, last_change) = (now, Instant::now());
            } else if events.troubled() && last_change.elapsed() > LOSS_GRACE {
                bail!(
                    "messages were lost: {} of {} deliveries arrived{}",
                    thousands(now),
                    thousands(target),
                    events.note()
                );
            } else if last_change.elapsed() > STALL_TIMEOUT {
                bail!(
                    "deliveries stopped at {} of {} for {} s{}",
                    thousands(now),
                    thousands(target),
                    STALL_TIMEOUT.as_secs(),
                    events.note()
                );
            }
            let _ = tokio::time::timeout(Duration::from_millis(100), self.reached.notified()).await;
        }
    }
}

/// Core-publishes `count` messages (through the client's write buffer),
/// then flushes.
async fn publish_core(
    client: &async_nats::Client,
    names: &Names,
    payload: &Bytes,
    count: u64,
) -> anyhow::Result<()> {
    for i in 0..count {
        client
            .publish(names.next().into_owned(), payload.clone())
            .await
            .with_context(|| format!("publish {} of {count} failed", i + 1))?;
    }
    client.flush().await.context("the publisher's flush failed")
}

/// W1–W3's subscribers, NATS side: their connections and tasks, and the
/// deliveries counted over all of them.
pub(super) struct NatsReceivers {
    tally: Arc<Tally>,
    // Aborted on drop: they hold the subscriptions.
    tasks: Tasks,
    _subscribers: Vec<async_nats::Client>,
    events: Arc<ClientEvents>,
    copies: u64,
    names: Names,
}

impl TransientSide for NatsSide {
    type Receivers = NatsReceivers;
    type Sender = async_nats::Client;

    async fn receivers(
        address: &str,
        audience: Audience,
        capacity: u64,
    ) -> anyhow::Result<NatsReceivers> {
        let events = Arc::new(ClientEvents::default());
        let capacity = usize::try_from(capacity)
            .unwrap_or(usize::MAX)
            .max(MIN_SUBSCRIPTION_CAPACITY);
        let tally = Arc::new(Tally::default());
        let mut tasks = Tasks::default();
        let mut subscribers = Vec::new();
        let (names, subjects) = match audience {
            Audience::Routed { service } => (Names::routed(service), w10::patterns(service)),
            Audience::One | Audience::FanOut | Audience::Competing => (
                Names::One(TRANSIENT_SUBJECT),
                vec![TRANSIENT_SUBJECT.to_string()],
            ),
        };
        for i in 1..=audience.receivers() {
            let name = match audience {
                Audience::Routed { service } => w10::service(service),
                _ => format!("bench-subscriber-{i}"),
            };
            let client = connect(&spread(address, i), &name, capacity, &events).await?;
            for subject in &subjects {
                let mut subscription = match audience {
                    Audience::Competing => {
                        client
                            .queue_subscribe(subject.clone(), QUEUE_GROUP.to_string())
                            .await
                    }
                    Audience::One | Audience::FanOut | Audience::Routed { .. } => {
                        client.subscribe(subject.clone()).await
                    }
                }
                .with_context(|| format!("{name} cannot subscribe to {subject}"))?;
                let tally = tally.clone();
                tasks.0.push(tokio::spawn(async move {
                    while subscription.next().await.is_some() {
                        tally.add();
                    }
                }));
            }
            // The server has the subscriptions once it answers the ping.
            client
                .flush()
                .await
                .with_context(|| format!("{name}: flush after subscribing failed"))?;
            subscribers.push(client);
        }
        Ok(NatsReceivers {
            tally,
            tasks,
            _subscribers: subscribers,
            events,
            copies: audience.copies(),
            names,
        })
    }

    async fn sender(
        address: &str,
        receivers: &mut NatsReceivers,
    ) -> anyhow::Result<async_nats::Client> {
        connect(
            address,
            "bench-publisher",
            MIN_SUBSCRIPTION_CAPACITY,
            &receivers.events,
        )
        .await
    }

    fn expect(receivers: &NatsReceivers, published: u64) {
        receivers.tally.aim(published * receivers.copies);
    }

    async fn publish_transient(
        sender: &async_nats::Client,
        receivers: &NatsReceivers,
        payload: &Bytes,
        count: u64,
    ) -> anyhow::Result<()> {
        publish_core(sender, &receivers.names, payload, count).await
    }

    async fn received(
        receivers: &NatsReceivers,
        _sender: &async_nats::Client,
    ) -> anyhow::Result<Instant> {
        receivers.tally.wait(&receivers.events).await
    }

    async fn close_transient(receivers: NatsReceivers) {
        drop(receivers.tasks);
    }
}

/// One service of W10's table, NATS side: its connection and the
/// subscriptions it holds (dropping one unsubscribes it).
pub(super) struct NatsTableService {
    _client: async_nats::Client,
    _subscriptions: Vec<async_nats::Subscriber>,
}

impl RoutingSide for NatsSide {
    type TableService = NatsTableService;

    async fn table_service(address: &str, service: u64) -> anyhow::Result<NatsTableService> {
        let name = w10::service(service);
        let events = Arc::new(ClientEvents::default());
        let client = connect(address, &name, MIN_SUBSCRIPTION_CAPACITY, &events).await?;
        let mut subscriptions = Vec::new();
        for subject in w10::patterns(service) {
            subscriptions.push(
                client
                    .subscribe(subject.clone())
                    .await
                    .with_context(|| format!("{name} cannot subscribe to {subject}"))?,
            );
        }
        client
            .flush()
            .await
            .with_context(|| format!("{name}: flush after subscribing failed"))?;
        Ok(NatsTableService {
            _client: client,
            _subscriptions: subscriptions,
        })
    }

    async fn close_table(table: Vec<NatsTableService>) {
        drop(table);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audiences_map_to_receivers_and_deliveries() {
        assert_eq!(Job::PubSub(Size::Tiny).workload(), Workload::W1a);
        assert_eq!(Job::FanOut(Size::Kib).workload(), Workload::W2b);
        assert_eq!(Job::Competing(Size::Tiny).workload(), Workload::W3a);
        assert_eq!((Audience::One.receivers(), Audience::One.copies()), (1, 1));
        assert_eq!(
            (Audience::FanOut.receivers(), Audience::FanOut.copies()),
            (4, 4)
        );
        assert_eq!(
            (
                Audience::Competing.receivers(),
                Audience::Competing.copies()
            ),
            (4, 1)
        );
        assert_eq!(
            Audience::of(Job::Competing(Size::Kib)),
            Some((Audience::Competing, Size::Kib))
        );
        assert_eq!(Audience::of(Job::Consume), None);
    }

    #[tokio::test]
    async fn the_tally_reports_when_its_target_was_reached_and_fails_on_loss() {
        let tally = Tally::default();
        let events = ClientEvents::default();
        tally.aim(3);
        for _ in 0..3 {
            tally.add();
        }
        let at = tally.wait(&events).await.expect("reached");
        assert!(at <= Instant::now());
        tally.aim(5);
        tally.add();
        events.record(async_nats::Event::SlowConsumer(1));
        let err = tally.wait(&events).await.expect_err("lost");
        let msg = format!("{err:#}");
        assert!(
            msg.contains("4 of 5 deliveries arrived") && msg.contains("1 slow-consumer drop"),
            "{msg}"
        );
    }
}
