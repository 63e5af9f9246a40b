//! W1–W3 on the Courier side ([`TransientSide`]): transient events as
//! quiet sends, with the flow control that keeps the broker from pausing
//! a receiver (and dropping its transient messages): flushes bound what
//! the broker has not routed yet, a lead bounds how far the publisher may
//! run ahead of the slowest receiving service.

use super::side::{spread, Audience, TransientSide, AUDIENCE_SIZE};
use super::w10::Names;
use super::*;

pub(super) const W1_NAME: &str = "bench.w1.published";
pub(super) const W2_NAME: &str = "bench.w2.published";
pub(super) const W3_NAME: &str = "bench.w3.published";
pub(super) const W1_SERVICE: &str = "bench-w1-subscriber";
pub(super) const W2_SERVICES: [&str; 4] = [
    "bench-w2-subscriber-1",
    "bench-w2-subscriber-2",
    "bench-w2-subscriber-3",
    "bench-w2-subscriber-4",
];
pub(super) const W3_SERVICE: &str = "bench-w3-worker";
pub(super) const TRANSIENT_PUBLISHER: &str = "bench-transient-publisher";
/// Transient sends W1–W3 keep past the last flush the broker answered.
/// They are quiet sends (no answer unless refused), so flushes — a PING
/// the broker answers once it has routed everything before it — are the
/// publisher's only brake: they bound the burst of deliveries the broker
/// may queue for a receiver at once. Past the server's `pause_bytes`
/// (4 MiB) queued for a receiver, the broker pauses it and drops its
/// transient messages; with acknowledged sends, a window of 4 096 × 1 KiB
/// lost events that way, 1 024 did not; with quiet sends, 2 048 lost 310 of
/// W1b's 201,000 (2026-12-03), 1 024 none. So the window is counted in
/// bytes — about 1 MiB of encoded messages, the SDK's own bound on quiet
/// sends it holds (`QUIET_BUFFER_BYTES_MAX`) — and never below 1 024
/// messages: 1 024 at 1 KiB, ~12,000 at 16 B (where 1 024 left the cores
/// idle between flushes: W1a 0.86M msg/s, 1.1–1.3M with 12,288).
pub(super) const TRANSIENT_WINDOW_BYTES: usize = 1024 * 1024;
pub(super) const TRANSIENT_WINDOW_MIN: usize = 1024;
/// How far (in encoded bytes) the W1–W3 publisher may run ahead of the
/// slowest receiver: half the broker's default `pause_bytes` (4 MiB), past
/// which it pauses the receiver and drops its transient messages. The
/// flush window alone did not bound this — a run of 3ac5bc0 lost 512 of
/// W1b's 201,000 when the subscriber fell behind (2026-12-03).
pub(super) const TRANSIENT_LEAD_BYTES: usize = 2 * 1024 * 1024;
/// Sends between two looks at the receivers' progress.
const LEAD_CHECK_EVERY: u64 = 64;

/// The most events of `payload_bytes` the publisher may have sent beyond
/// what the slowest receiver handled: [`TRANSIENT_LEAD_BYTES`] of DELIVER
/// entries (the message, its delivery id and attempt), and at least one
/// flush window.
pub(super) fn transient_lead(name: &str, payload_bytes: usize) -> u64 {
    // A DELIVER entry is its delivery id (8 bytes), attempt (4) and the message.
    let entry = 12 + event_len(name, payload_bytes);
    (TRANSIENT_LEAD_BYTES / entry).max(transient_window(name, payload_bytes)) as u64
}

/// The transient window for events named `name` with `payload_bytes` of
/// payload: [`TRANSIENT_WINDOW_BYTES`] of encoded SEND entries, at least
/// [`TRANSIENT_WINDOW_MIN`] of them, and even (flushes go every half).
pub(super) fn transient_window(name: &str, payload_bytes: usize) -> usize {
    // A SEND entry is its seq (8 bytes) and the message.
    let entry = 8 + event_len(name, payload_bytes);
    (TRANSIENT_WINDOW_BYTES / entry).max(TRANSIENT_WINDOW_MIN) & !1
}

/// The encoded size of an event named `name` with `payload_bytes` of
/// payload, as the bench's publisher sends it.
fn event_len(name: &str, payload_bytes: usize) -> usize {
    let sample = courier_proto::Message::new(
        courier_proto::Kind::Event,
        name,
        bytes::Bytes::from(vec![0u8; payload_bytes]),
    );
    courier_proto::encoded_message_len(&sample)
}

/// A W1–W3 receiver that handles nothing for this long after the last send
/// was acknowledged makes the bench ask the broker whether it dropped any.
const LOSS_CHECK_AFTER: Duration = Duration::from_secs(2);

/// What one receiving service of W1–W3 has handled, however many
/// instances it runs.
struct Tally {
    service: String,
    handled: Arc<AtomicU64>,
    catch_up: Arc<CatchUp>,
}

/// Receptions of a W1–W3 run: one tally per receiving service, the count
/// each must reach, and a signal when one reaches it.
struct Receivers {
    tallies: Vec<Tally>,
    goal: Arc<AtomicU64>,
    reached: Arc<Notify>,
}

/// The publisher's wait for one receiving service: the count it waits for
/// (`u64::MAX`: it does not wait), and its wake-up once the service has
/// handled that many. One relaxed load per handled event when nobody waits.
struct CatchUp {
    at: AtomicU64,
    reached: Notify,
}

impl CatchUp {
    fn handled(&self, count: u64) {
        if count >= self.at.load(Ordering::Relaxed) {
            self.at.store(u64::MAX, Ordering::Relaxed);
            self.reached.notify_one();
        }
    }
}

impl Receivers {
    fn new() -> Receivers {
        Receivers {
            tallies: Vec::new(),
            goal: Arc::new(AtomicU64::new(u64::MAX)),
            reached: Arc::new(Notify::new()),
        }
    }

    /// Returns once every receiving service has handled `count`.
    async fn caught_up(&self, count: u64) {
        for tally in &self.tallies {
            let catch_up = &tally.catch_up;
            loop {
                // Set before looking, so a receiver that passes `count`
                // between the look and the wait still leaves its wake-up.
                catch_up.at.store(count, Ordering::Relaxed);
                if tally.handled.load(Ordering::Relaxed) >= count {
                    catch_up.at.store(u64::MAX, Ordering::Relaxed);
                    break;
                }
                // A permit left by an earlier wait may wake us early.
                catch_up.reached.notified().await;
            }
        }
    }

    /// Connects `instances` instances of `service`, each handling
    /// `patterns` by counting what they match; the clients go to `clients`
    /// (to be shut down). Each connects from the next of `addr`'s servers
    /// (see [`spread`]).
    async fn subscribe(
        &mut self,
        addr: &str,
        service: &str,
        instances: usize,
        patterns: &[String],
        clients: &mut Vec<Client>,
    ) -> anyhow::Result<()> {
        let handled = Arc::new(AtomicU64::new(0));
        let catch_up = Arc::new(CatchUp {
            at: AtomicU64::new(u64::MAX),
            reached: Notify::new(),
        });
        for _ in 0..instances {
            // The publisher, connected last, is client 0.
            let client = connect(&spread(addr, clients.len() + 1), service, None).await?;
            clients.push(client.clone());
            let subscribed = patterns.iter().map(|pattern| {
                let (h, goal, reached) = (handled.clone(), self.goal.clone(), self.reached.clone());
                let catch_up = catch_up.clone();
                let on = client.on(pattern, move |_msg| {
                    let count = h.fetch_add(1, Ordering::Relaxed) + 1;
                    if count == goal.load(Ordering::Relaxed) {
                        reached.notify_one();
                    }
                    catch_up.handled(count);
                    std::future::ready(Ok::<(), courier_client::Error>(()))
                });
                async move {
                    on.await
                        .with_context(|| format!("cannot subscribe {service} to {pattern}"))
                }
            });
            futures_util::future::try_join_all(subscribed).await?;
        }
        self.tallies.push(Tally {
            service: service.to_string(),
            handled,
            catch_up,
        });
        Ok(())
    }

    /// Every tally must reach `goal` from now on.
    fn expect(&self, goal: u64) {
        self.goal.store(goal, Ordering::Relaxed);
    }

    /// What the slowest receiving service has handled.
    fn slowest(&self) -> u64 {
        self.tallies
            .iter()
            .map(|t| t.handled.load(Ordering::Relaxed))
            .min()
            .unwrap_or(0)
    }

    fn counts(&self) -> Vec<u64> {
        self.tallies
            .iter()
            .map(|t| t.handled.load(Ordering::Relaxed))
            .collect()
    }

    /// Waits until every tally has reached `goal`, once the publisher's
    /// sends are all acknowledged. Transient deliveries the broker dropped
    /// never come: when no count moves for [`LOSS_CHECK_AFTER`], `broker`
    /// is asked for its drop counter, and the run fails if it dropped any,
    /// or in any case after [`STALL_TIMEOUT`].
    async fn wait_for(&self, goal: u64, broker: &Client) -> anyhow::Result<()> {
        let mut last = Vec::new();
        let mut last_change = Instant::now();
        let mut checked = false;
        loop {
            let counts = self.counts();
            if counts.iter().all(|c| *c >= goal) {
                if let Some((t, c)) = self.tallies.iter().zip(&counts).find(|(_, c)| **c > goal) {
                    bail!(
                        "{} handled {} transient events, more than the {} published: a delivery came twice",
                        t.service,
                        thousands(*c),
                        thousands(goal)
                    );
                }
                return Ok(());
            }
            let stalled = last_change.elapsed();
            // The publisher's sends are all acknowledged by now, so the
            // broker has routed every event: a drop it counted is final.
            if counts != last {
                (last, last_change, checked) = (counts, Instant::now(), false);
            } else if (!checked && stalled > LOSS_CHECK_AFTER) || stalled > STALL_TIMEOUT {
                checked = true;
                let metrics = broker_metrics(broker).await;
                let dropped: u64 = ["dropped_unrouted", "transient_dropped_paused"]
                    .iter()
                    .filter_map(|counter| metrics.as_ref().ok()?[counter].as_u64())
                    .sum();
                if dropped > 0 || stalled > STALL_TIMEOUT {
                    let each: Vec<String> = self
                        .tallies
                        .iter()
                        .zip(&counts)
                        .map(|(t, c)| format!("{} received {}", t.service, thousands(*c)))
                        .collect();
                    let total: u64 = counts.iter().sum();
                    let expected = goal * self.tallies.len() as u64;
                    let why = match &metrics {
                        Ok(m) => format!(
                            "broker metrics: dropped_unrouted {}, transient_dropped_paused {}, receivers_paused {}, slow_consumers_cut {}, delivered {}",
                            m["dropped_unrouted"], m["transient_dropped_paused"], m["receivers_paused"], m["slow_consumers_cut"], m["delivered"]
                        ),
                        Err(e) => format!("the broker's metrics could not be read: {e:#}"),
                    };
                    bail!(
                        "transient events lost: {} of {} arrived ({}), none more for {:.1} s; {why}. \
                         Transient delivery is at most once: the broker drops a transient message for a \
                         service with no connected instance it may deliver to, and it pauses a receiver \
                         while more than the server's pause_bytes (4 MiB) of deliveries wait to be \
                         written to it (receivers_paused), dropping its transient messages meanwhile \
                         (transient_dropped_paused); the receivers must keep up with the \
                         publisher, e.g. with a smaller TRANSIENT_LEAD_BYTES in bench/courier_transient.rs",
                        thousands(total),
                        thousands(expected),
                        each.join(", "),
                        stalled.as_secs_f64(),
                    );
                }
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), self.reached.notified()).await;
        }
    }
}

/// The broker's counters (`courier.metrics`).
async fn broker_metrics(client: &Client) -> anyhow::Result<Value> {
    let reply = client
        .command("courier.metrics")
        .json(&json!({}))?
        .timeout(Duration::from_secs(5))
        .request()
        .await
        .context("courier.metrics")?;
    Ok(reply.json::<Value>()?)
}

/// Publishes `count` transient events as quiet sends (the broker answers
/// only refusals), with a flush every half [`transient_window`] sends and
/// at most two flushes unanswered, and never more than
/// [`transient_lead`] events ahead of the slowest receiving service;
/// fails if the broker refused any.
async fn publish_transient(
    client: &Client,
    names: &Names,
    payload: &Bytes,
    count: u64,
    receivers: &Receivers,
    lost: &Mutex<Option<String>>,
) -> anyhow::Result<()> {
    let refused_before = client.unheard_refusals();
    let sample = names.sample();
    let every = (transient_window(&sample, payload.len()) / 2) as u64;
    let lead = transient_lead(&sample, payload.len());
    let received_before = receivers.slowest();
    let mut flushes = VecDeque::with_capacity(3);
    for i in 0..count {
        if i % LEAD_CHECK_EVERY == 0 && i > lead {
            // The flushes bound what the broker has not routed yet, not
            // what waits in its outbox for a slow receiver: this does.
            // Once past the lead, the publisher waits until the receivers
            // are a quarter of it behind. A 1 ms sleep instead (~30 per W1b
            // run) overslept while they ran dry; resuming at half the lead
            // cost the fan-out 2–15 % (W2b), a quarter did not (2026-12-03,
            // alternating runs with `--only`).
            if receivers.slowest() < received_before + (i - lead) {
                receivers.caught_up(received_before + (i - lead / 4)).await;
            }
        }
        client
            .event(names.next())
            .payload(payload.clone())
            .transient()
            .send_quiet()
            .await
            .with_context(|| format!("transient publish {} of {count} failed", i + 1))?;
        if (i + 1) % every == 0 {
            flushes.push_back(client.flush());
            if flushes.len() > 2 {
                if let Some(flush) = flushes.pop_front() {
                    flushed(flush, lost).await?;
                }
            }
        }
    }
    flushes.push_back(client.flush());
    for flush in flushes {
        flushed(flush, lost).await?;
    }
    let refused = client.unheard_refusals() - refused_before;
    if refused > 0 {
        let last = client
            .last_unheard_refusal()
            .map(|(code, reason)| format!("{reason} [{code}]"))
            .unwrap_or_default();
        bail!("the broker refused {refused} of {count} transient publishes; the last: {last}");
    }
    Ok(())
}

/// How long a failed flush waits for the SDK to say why the connection
/// was lost (it fails the flush first, then reports the loss).
const LOST_REASON_WAIT: Duration = Duration::from_millis(100);

/// Awaits a flush of the transient publisher; a failure says why the
/// SDK lost the connection, which tells which side gave up.
async fn flushed(
    flush: impl std::future::Future<Output = courier_client::Result<()>>,
    lost: &Mutex<Option<String>>,
) -> anyhow::Result<()> {
    let Err(e) = flush.await else {
        return Ok(());
    };
    tokio::time::sleep(LOST_REASON_WAIT).await;
    let reason = lost.lock().unwrap_or_else(|p| p.into_inner()).clone();
    Err(anyhow::Error::from(e).context(match reason {
        Some(reason) => format!(
            "flush after transient publishes (the publisher's connection was lost: {reason})"
        ),
        None => "flush after transient publishes".to_string(),
    }))
}

/// W1–W3's (and W10's) receiving services, Courier side: their tallies,
/// the event names they receive, and every connection of the run (the
/// publisher's too), to shut down at the end.
pub(super) struct CourierReceivers {
    receivers: Receivers,
    names: Names,
    clients: Vec<Client>,
    /// Why the publisher's connection was last lost, if it was.
    lost: Arc<Mutex<Option<String>>>,
}

impl TransientSide for CourierSide {
    type Receivers = CourierReceivers;
    type Sender = Client;

    async fn receivers(
        address: &str,
        audience: Audience,
        _capacity: u64,
    ) -> anyhow::Result<CourierReceivers> {
        let one = |name: &'static str| (Names::One(name), vec![name.to_string()]);
        let ((names, patterns), services): (_, Vec<(String, usize)>) = match audience {
            Audience::One => (one(W1_NAME), vec![(W1_SERVICE.to_string(), 1)]),
            Audience::FanOut => (
                one(W2_NAME),
                W2_SERVICES.map(|s| (s.to_string(), 1)).to_vec(),
            ),
            Audience::Competing => (one(W3_NAME), vec![(W3_SERVICE.to_string(), AUDIENCE_SIZE)]),
            Audience::Routed { service } => (
                (Names::routed(service), w10::patterns(service)),
                vec![(w10::service(service), 1)],
            ),
        };
        let mut run = CourierReceivers {
            receivers: Receivers::new(),
            names,
            clients: Vec::new(),
            lost: Arc::new(Mutex::new(None)),
        };
        for (service, instances) in services {
            let subscribed = run
                .receivers
                .subscribe(address, &service, instances, &patterns, &mut run.clients)
                .await;
            if let Err(e) = subscribed {
                shutdown_all(&run.clients).await;
                return Err(e);
            }
        }
        Ok(run)
    }

    async fn sender(address: &str, receivers: &mut CourierReceivers) -> anyhow::Result<Client> {
        let publisher = connect(address, TRANSIENT_PUBLISHER, None).await?;
        receivers.clients.push(publisher.clone());
        let mut events = publisher.connection_events();
        let lost = receivers.lost.clone();
        // Ends when the publisher is shut down.
        tokio::spawn(async move {
            while let Some(event) = events.next().await {
                if let courier_client::ConnectionEvent::Lost { reason } = event {
                    *lost.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason);
                }
            }
        });
        Ok(publisher)
    }

    fn expect(receivers: &CourierReceivers, published: u64) {
        receivers.receivers.expect(published);
    }

    async fn publish_transient(
        sender: &Client,
        receivers: &CourierReceivers,
        payload: &Bytes,
        count: u64,
    ) -> anyhow::Result<()> {
        publish_transient(
            sender,
            &receivers.names,
            payload,
            count,
            &receivers.receivers,
            &receivers.lost,
        )
        .await
    }

    async fn received(receivers: &CourierReceivers, sender: &Client) -> anyhow::Result<Instant> {
        let goal = receivers.receivers.goal.load(Ordering::Relaxed);
        receivers.receivers.wait_for(goal, sender).await?;
        Ok(Instant::now())
    }

    async fn close_transient(receivers: CourierReceivers) {
        shutdown_all(&receivers.clients).await;
    }
}
