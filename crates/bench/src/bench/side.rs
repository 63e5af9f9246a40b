//! The one interface both systems under test offer the workloads, and the
//! workloads written once against it.
//!
//! The Courier side ([`super::courier::CourierSide`]: the SDK against a
//! `courier serve` child) and the NATS side
//! ([`super::nats::NatsSide`]: async-nats against a nats-server child with
//! JetStream) each implement [`Side`]; a workload that only publishes
//! durable events and asks requests is then one function for both, and
//! the two columns of its row measure the same code path by construction.
//! Workloads whose mechanics differ between the systems (W1–W3's flow
//! control, W6–W8's consumers, W7's restart) stay per side, in
//! `courier.rs` and `nats.rs`.

use std::future::Future;

use super::*;

/// A system under test, started fresh for one run: its server, on a free
/// loopback port, with a data directory of its own.
pub(super) trait Side {
    /// A connection that publishes durable events (NATS: a JetStream
    /// context whose file stream holds the subject).
    type Publisher: Clone + Send + Sync + 'static;
    /// A requester and the responder it asks, on the same server.
    type Requester: Send + Sync + 'static;

    /// Where clients connect.
    fn address(&self) -> String;

    /// The server's data directory (W11 measures the disk there).
    fn data_dir(&self) -> &Path;

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

    /// Publishes `count` durable events, keeping at most `window`
    /// unacknowledged.
    fn publish_pipelined<'a>(
        publisher: &'a Self::Publisher,
        name: &'static str,
        payload: &'a Bytes,
        count: u64,
        window: usize,
    ) -> impl Future<Output = anyhow::Result<()>> + Send + 'a;

    /// Connects a responder that answers every request with
    /// [`TINY_BYTES`], and a requester on another connection.
    fn requester(address: &str) -> impl Future<Output = anyhow::Result<Self::Requester>> + Send;

    /// One request of [`TINY_BYTES`]; request `i` of `of` (for errors).
    fn request<'a>(
        requester: &'a Self::Requester,
        i: u64,
        of: u64,
    ) -> impl Future<Output = anyhow::Result<()>> + Send + 'a;

    /// Closes the requester's and the responder's connections.
    fn close_requester(requester: Self::Requester) -> impl Future<Output = ()> + Send;
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

/// The event name (NATS: the subject) W5 publishes to.
pub(super) const W5_NAME: &str = "bench.w5.published";

/// W5a: durable events one at a time, each ack awaited; throughput and
/// the p50 and p99 of one publish, filed under `workload`.
pub(super) async fn publish_one_by_one<S: Side>(
    side: &mut S,
    plan: &Plan,
    workload: Workload,
) -> anyhow::Result<Vec<Measurement>> {
    let address = side.address();
    let work = async {
        let publisher = S::publisher(&address, W5_NAME).await?;
        let payload = Bytes::from(vec![b'x'; SMALL_BYTES]);
        for i in 0..plan.w5a_warmup {
            S::publish(&publisher, W5_NAME, payload.clone())
                .await
                .with_context(|| format!("warm-up publish {} of {}", i + 1, plan.w5a_warmup))?;
        }
        let mut latencies = Vec::with_capacity(usize::try_from(plan.w5a).unwrap_or(0));
        let started = Instant::now();
        for i in 0..plan.w5a {
            let t = Instant::now();
            S::publish(&publisher, W5_NAME, payload.clone())
                .await
                .with_context(|| format!("publish {} of {}", i + 1, plan.w5a))?;
            latencies.push(t.elapsed().as_nanos() as u64);
        }
        let elapsed = started.elapsed();
        latencies.sort_unstable();
        let micros = |p| percentile(&latencies, p).unwrap_or(0) as f64 / 1000.0;
        Ok(vec![
            (workload, Metric::Throughput, per_second(plan.w5a, elapsed)),
            (workload, Metric::LatencyP50, micros(50.0)),
            (workload, Metric::LatencyP99, micros(99.0)),
        ])
    };
    side.watch(work).await
}

/// W5b: durable events pipelined with a window of [`WINDOW`].
pub(super) async fn publish_windowed<S: Side>(
    side: &mut S,
    plan: &Plan,
    workload: Workload,
) -> anyhow::Result<Vec<Measurement>> {
    let address = side.address();
    let work = async {
        let publisher = S::publisher(&address, W5_NAME).await?;
        let payload = Bytes::from(vec![b'x'; SMALL_BYTES]);
        S::publish_pipelined(&publisher, W5_NAME, &payload, plan.w5b_warmup, WINDOW)
            .await
            .context("warm-up")?;
        let started = Instant::now();
        S::publish_pipelined(&publisher, W5_NAME, &payload, plan.w5b, WINDOW).await?;
        let elapsed = started.elapsed();
        Ok(vec![(
            workload,
            Metric::Throughput,
            per_second(plan.w5b, elapsed),
        )])
    };
    side.watch(work).await
}

/// Each of `publishers` sends `each` events one at a time, all at once;
/// returns how long until the last ack.
async fn publish_from_each<S: Side>(
    publishers: &[S::Publisher],
    payload: &Bytes,
    each: u64,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for publisher in publishers {
        let (publisher, payload) = (publisher.clone(), payload.clone());
        tasks.spawn(async move {
            for i in 0..each {
                S::publish(&publisher, W5_NAME, payload.clone())
                    .await
                    .with_context(|| format!("publish {} of {each}", i + 1))?;
            }
            Ok::<(), anyhow::Error>(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.context("a publishing task failed")??;
    }
    Ok(started.elapsed())
}

/// W13: durable events from 1, 4, 16 and 64 connections at once, each
/// awaiting every ack (what one fsync shared across connections buys);
/// `twin` picks each count's row. Returns the figures and each count's
/// rate.
pub(super) async fn publish_concurrent<S: Side>(
    side: &mut S,
    plan: &Plan,
    twin: impl Fn(usize) -> Workload,
) -> anyhow::Result<(Vec<Measurement>, Vec<(usize, f64)>)> {
    let address = side.address();
    let work = async {
        let payload = Bytes::from(vec![b'x'; SMALL_BYTES]);
        let mut measured = Vec::new();
        let mut rates = Vec::new();
        for connections in W13_CONNECTIONS {
            let mut publishers = Vec::with_capacity(connections);
            for _ in 0..connections {
                publishers.push(S::publisher(&address, W5_NAME).await?);
            }
            let n = connections as u64;
            publish_from_each::<S>(&publishers, &payload, (plan.w13_warmup / n).max(1))
                .await
                .context("warm-up")?;
            let each = (plan.w13 / n).max(1);
            let elapsed = publish_from_each::<S>(&publishers, &payload, each).await?;
            let rate = per_second(each * n, elapsed);
            rates.push((connections, rate));
            measured.push((twin(connections), Metric::Throughput, rate));
        }
        Ok((measured, rates))
    };
    side.watch(work).await
}

/// Asks `requests` of `requester`, timed (see [`timed_requests`]).
pub(super) async fn requests<S: Side>(
    side: &mut S,
    requester: &S::Requester,
    requests: Requests,
    latencies: &mut Vec<u64>,
) -> anyhow::Result<Duration> {
    let ask = |i| S::request(requester, i, requests.of);
    side.watch(timed_requests(requests, latencies, ask)).await
}

/// W11's event name (NATS: subject).
pub(super) const W11_NAME: &str = "bench.w11.stored";
/// W11's payload: 1 MiB.
pub(super) const W11_BYTES: usize = 1024 * 1024;
/// W11's unacknowledged events at most: 16 MiB in flight.
pub(super) const W11_WINDOW: usize = 16;
/// The disk's own figure is taken on at most this many MiB.
pub(super) const DISK_PROBE_MIB_MAX: u64 = 256;

/// MB (10⁶ bytes) per second.
fn megabytes_per_second(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / 1e6 / elapsed.as_secs_f64().max(1e-9)
}

/// The disk's own write+fsync bandwidth in `dir`, in MB/s: `mib` writes
/// of 1 MiB to a fresh file there, each followed by an fdatasync (each
/// event made durable before the next), the file removed afterwards.
pub(super) async fn disk_write_fsync(dir: &Path, mib: u64) -> anyhow::Result<f64> {
    use std::io::Write as _;
    let path = dir.join("courier-bench-disk-probe");
    let probe = path.clone();
    let timed = tokio::task::spawn_blocking(move || -> anyhow::Result<Duration> {
        let mut file = std::fs::File::create(&probe)
            .with_context(|| format!("cannot create {}", probe.display()))?;
        let block = vec![b'x'; W11_BYTES];
        let started = Instant::now();
        for _ in 0..mib {
            file.write_all(&block)
                .with_context(|| format!("cannot write {}", probe.display()))?;
            file.sync_data()
                .with_context(|| format!("cannot fdatasync {}", probe.display()))?;
        }
        Ok(started.elapsed())
    })
    .await
    .context("internal: the disk probe panicked")?;
    let _ = std::fs::remove_file(&path);
    Ok(megabytes_per_second(mib * W11_BYTES as u64, timed?))
}

/// W11: [`Plan::w11`] durable events of 1 MiB, pipelined ([`W11_WINDOW`]
/// unacknowledged); MB/s, and that as a share of the disk's own
/// write+fsync bandwidth measured right after in the same data directory.
pub(super) async fn large_events<S: Side>(
    side: &mut S,
    plan: &Plan,
    workload: Workload,
) -> anyhow::Result<Vec<Measurement>> {
    let address = side.address();
    let count = plan.w11;
    let work = async {
        let publisher = S::publisher(&address, W11_NAME).await?;
        let payload = Bytes::from(vec![b'x'; W11_BYTES]);
        let started = Instant::now();
        S::publish_pipelined(&publisher, W11_NAME, &payload, count, W11_WINDOW).await?;
        Ok(started.elapsed())
    };
    let elapsed = side.watch(work).await?;
    let rate = megabytes_per_second(count * W11_BYTES as u64, elapsed);
    let disk = disk_write_fsync(side.data_dir(), count.min(DISK_PROBE_MIB_MAX)).await?;
    progress(&format!(
        "  {} × 1 MiB in {:.2} s: {rate:.0} MB/s; the disk alone (1 MiB writes, each fdatasync'd, in the same data dir): {disk:.0} MB/s",
        thousands(count),
        elapsed.as_secs_f64()
    ));
    Ok(vec![
        (workload, Metric::MegabytesPerSecond, rate),
        (workload, Metric::DiskShare, rate * 100.0 / disk.max(1e-9)),
    ])
}

/// W12's event name (NATS: subject) for the publishing beside the requests.
pub(super) const W12_NAME: &str = "bench.w12.published";
/// The load's events go in chunks of this many (each chunk pipelined).
const W12_CHUNK: u64 = 1_000;

/// W12: W4a's requests, one at a time, while another connection publishes
/// durable events pipelined (W5b) as fast as it can; the requests' p50
/// and p99, and the publishing rate meanwhile.
pub(super) async fn requests_under_load<S: Side + 'static>(
    side: &mut S,
    plan: &Plan,
) -> anyhow::Result<Vec<Measurement>> {
    let address = side.address();
    let count = plan.w4a;
    let work = async {
        let requester = S::requester(&address).await?;
        let publisher = S::publisher(&address, W12_NAME).await?;
        let measured = async {
            let mut latencies = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
            let warmup = Requests {
                first: 0,
                count: plan.warmup,
                of: plan.warmup,
                in_flight: 1,
            };
            timed_requests(warmup, &mut latencies, |i| {
                S::request(&requester, i, plan.warmup)
            })
            .await
            .context("warm-up")?;
            latencies.clear();
            let stop = Arc::new(AtomicBool::new(false));
            let published = Arc::new(AtomicU64::new(0));
            let (load_stop, load_published) = (stop.clone(), published.clone());
            let load = tokio::spawn(async move {
                let payload = Bytes::from(vec![b'x'; SMALL_BYTES]);
                let started = Instant::now();
                while !load_stop.load(Ordering::Relaxed) {
                    S::publish_pipelined(&publisher, W12_NAME, &payload, W12_CHUNK, WINDOW)
                        .await
                        .context("the publishing beside the requests")?;
                    load_published.fetch_add(W12_CHUNK, Ordering::Relaxed);
                }
                Ok::<Duration, anyhow::Error>(started.elapsed())
            });
            // The load is at full speed once its first chunk is in.
            while published.load(Ordering::Relaxed) == 0 && !load.is_finished() {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let requests = Requests {
                first: 0,
                count,
                of: count,
                in_flight: 1,
            };
            let asked = timed_requests(requests, &mut latencies, |i| {
                S::request(&requester, i, count)
            })
            .await;
            stop.store(true, Ordering::Relaxed);
            let loaded = load
                .await
                .context("internal: the publishing task panicked")?;
            asked?;
            let load_rate = per_second(published.load(Ordering::Relaxed), loaded?);
            latencies.sort_unstable();
            let micros = |p| percentile(&latencies, p).unwrap_or(0) as f64 / 1000.0;
            Ok(vec![
                (Workload::W12, Metric::LatencyP50, micros(50.0)),
                (Workload::W12, Metric::LatencyP99, micros(99.0)),
                (Workload::W12, Metric::LoadThroughput, load_rate),
            ])
        }
        .await;
        S::close_requester(requester).await;
        measured
    };
    side.watch(work).await
}
