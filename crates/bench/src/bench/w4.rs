//! W4, request/reply, on either side alone or on both at once; and W12,
//! W4a's requests while another connection publishes.
//!
//! With both sides, one run sets up Courier's and NATS's servers and
//! clients side by side, then alternates between them in [`W4_SLICES`]
//! slices of the run's requests (the side that went second in a slice
//! goes first in the next). On this VM the hypervisor steals CPU in
//! bursts of a second or more, and the latency tails follow the steal; a
//! side that ran all its requests inside such a burst lost its p99 to it,
//! not to the other side. Slices of a few hundred milliseconds give both
//! sides the same share of every burst.

use super::cluster::Clustered;
use super::nats::{NatsRequester, NatsSide};
use super::runner::Others;
use super::side::{publish_pipelined, Fsync, Side};
use super::*;

use futures_util::stream::{FuturesUnordered, StreamExt as _};

/// Slices a W4 run alternates between the sides in.
pub(super) const W4_SLICES: u64 = 10;

/// Which requests a call makes: numbers `first ..` of `of` in all (for
/// error messages), `count` of them, `in_flight` at a time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Requests {
    pub(super) first: u64,
    pub(super) count: u64,
    pub(super) of: u64,
    pub(super) in_flight: usize,
}

/// Makes the requests `ask(i)` describes and returns the time they took;
/// one at a time (`in_flight` 1), each one's latency in nanoseconds goes
/// to `latencies`.
pub(super) async fn timed_requests<F, Fut>(
    requests: Requests,
    latencies: &mut Vec<u64>,
    mut ask: F,
) -> anyhow::Result<Duration>
where
    F: FnMut(u64) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let mut numbers = requests.first..requests.first + requests.count;
    let started = Instant::now();
    if requests.in_flight <= 1 {
        for i in numbers.by_ref() {
            let t = Instant::now();
            ask(i).await?;
            latencies.push(t.elapsed().as_nanos() as u64);
        }
    } else {
        let mut pending = FuturesUnordered::new();
        while pending.len() < requests.in_flight {
            let Some(i) = numbers.next() else { break };
            pending.push(ask(i));
        }
        while let Some(answered) = pending.next().await {
            answered?;
            if let Some(i) = numbers.next() {
                pending.push(ask(i));
            }
        }
    }
    Ok(started.elapsed())
}

/// One side's W4 server, responder and requester.
enum W4Side {
    // Boxed: each holds servers and clients; one of each per run.
    Courier(Box<(CourierSide, CourierRequester)>),
    Nats(Box<(NatsSide, NatsRequester)>),
    CourierCluster(Box<(Clustered<CourierSide>, CourierRequester)>),
    NatsCluster(Box<(Clustered<NatsSide>, NatsRequester)>),
}

impl W4Side {
    async fn start(system: System, exe: &Path, others: Others<'_>) -> anyhow::Result<W4Side> {
        super::process::observe_as(system);
        let cluster = || {
            others
                .cluster
                .ok_or_else(|| anyhow!("internal: no cluster for the cluster columns"))
        };
        match system {
            System::Courier | System::CourierUnobserved => {
                let mut side = CourierSide::start(exe).await?;
                let requester = side
                    .watch(CourierSide::requester(&side.address(), &side.address()))
                    .await?;
                Ok(W4Side::Courier(Box::new((side, requester))))
            }
            System::Nats => {
                let nats = others
                    .nats
                    .ok_or_else(|| anyhow!("internal: no nats-server for the NATS side"))?;
                let mut side = NatsSide::start(nats, Fsync::Default).await?;
                let requester = side
                    .watch(NatsSide::requester(&side.address(), &side.address()))
                    .await?;
                Ok(W4Side::Nats(Box::new((side, requester))))
            }
            System::CourierCluster => {
                let mut side = super::cluster::courier_side(exe, cluster()?).await?;
                let address = side.address();
                let requester = side
                    .watch(Clustered::<CourierSide>::requester(&address, &address))
                    .await?;
                Ok(W4Side::CourierCluster(Box::new((side, requester))))
            }
            System::JetStreamR3 => {
                // Core NATS only: the cluster's streams are left alone (the
                // Courier nodes of the same run have theirs there).
                let mut side = super::cluster::jetstream_side(cluster()?)?;
                let address = side.address();
                let requester = side
                    .watch(Clustered::<NatsSide>::requester(&address, &address))
                    .await?;
                Ok(W4Side::NatsCluster(Box::new((side, requester))))
            }
        }
    }

    async fn requests(
        &mut self,
        requests: Requests,
        latencies: &mut Vec<u64>,
    ) -> anyhow::Result<Duration> {
        match self {
            W4Side::Courier(pair) => {
                let (side, requester) = &mut **pair;
                side_requests(side, requester, requests, latencies).await
            }
            W4Side::Nats(pair) => {
                let (side, requester) = &mut **pair;
                side_requests(side, requester, requests, latencies).await
            }
            W4Side::CourierCluster(pair) => {
                let (side, requester) = &mut **pair;
                side_requests(side, requester, requests, latencies).await
            }
            W4Side::NatsCluster(pair) => {
                let (side, requester) = &mut **pair;
                side_requests(side, requester, requests, latencies).await
            }
        }
    }

    async fn stop(self) {
        match self {
            W4Side::Courier(pair) => CourierSide::close_requester(pair.1).await,
            W4Side::Nats(pair) => NatsSide::close_requester(pair.1).await,
            W4Side::CourierCluster(pair) => CourierSide::close_requester(pair.1).await,
            W4Side::NatsCluster(pair) => NatsSide::close_requester(pair.1).await,
        }
    }
}

/// What one side's timed requests of a run add up to.
#[derive(Default)]
struct Tally {
    latencies: Vec<u64>,
    requests: u64,
    elapsed: Duration,
    /// /proc/stat ticks during this side's slices, summed.
    cpu: CpuTimes,
}

impl Tally {
    fn measurements(mut self, job: Job) -> Vec<Measurement> {
        let throughput = per_second(self.requests, self.elapsed);
        if job == Job::RequestConcurrent {
            return vec![(Workload::W4b, Metric::Throughput, throughput)];
        }
        self.latencies.sort_unstable();
        let micros = |p| percentile(&self.latencies, p).unwrap_or(0) as f64 / 1000.0;
        vec![
            (Workload::W4a, Metric::LatencyP50, micros(50.0)),
            (Workload::W4a, Metric::LatencyP90, micros(90.0)),
            (Workload::W4a, Metric::LatencyP99, micros(99.0)),
            (Workload::W4a, Metric::LatencyP999, micros(99.9)),
            (Workload::W4a, Metric::Throughput, throughput),
        ]
    }

    /// ", CPU steal 3.2 % in its slices"; empty without /proc/stat.
    fn steal_text(&self) -> String {
        self.cpu
            .steal_percent()
            .map_or_else(String::new, |percent| {
                format!(", CPU steal {percent:.1} % in its slices")
            })
    }
}

/// The sizes of `slices` slices of `count` (the first ones one larger
/// where it does not divide).
fn slice_sizes(count: u64, slices: u64) -> Vec<u64> {
    let slices = slices.clamp(1, count.max(1));
    (0..slices)
        .map(|k| count / slices + u64::from(k < count % slices))
        .collect()
}

/// One run of a W4 job on `systems`: one alone in one stretch, or both
/// alternating in [`W4_SLICES`] slices (then each side's request count,
/// time and steal go to the progress output). Returns each one's figures.
pub(super) async fn run(
    systems: &[System],
    job: Job,
    exe: &Path,
    others: Others<'_>,
    plan: &Plan,
) -> anyhow::Result<Vec<(System, Vec<Measurement>)>> {
    let (count, in_flight) = match job {
        Job::RequestSequential => (plan.w4a, 1),
        Job::RequestConcurrent => (plan.w4b, REQUESTS_IN_FLIGHT),
        other => bail!("internal: {} is not a W4 job", other.label()),
    };
    let mut sides = Vec::with_capacity(systems.len());
    for &system in systems {
        // Those started before are dropped on error: their servers killed.
        sides.push((system, W4Side::start(system, exe, others).await?));
    }
    let result = timed_run(&mut sides, plan.warmup, count, in_flight).await;
    for (_, side) in sides {
        side.stop().await;
    }
    let tallies = result?;
    let interleaved = systems.len() > 1;
    Ok(systems
        .iter()
        .zip(tallies)
        .map(|(&system, tally)| {
            if interleaved {
                progress(&format!(
                    "  {}: {} requests in {:.2} s{}",
                    system.title(),
                    thousands(tally.requests),
                    tally.elapsed.as_secs_f64(),
                    tally.steal_text()
                ));
            }
            (system, tally.measurements(job))
        })
        .collect())
}

/// Warms every side up, then times `count` requests on each, in slices
/// that alternate between the sides when there are several.
async fn timed_run(
    sides: &mut [(System, W4Side)],
    warmup: u64,
    count: u64,
    in_flight: usize,
) -> anyhow::Result<Vec<Tally>> {
    let mut discarded = Vec::new();
    for (system, side) in sides.iter_mut() {
        let requests = Requests {
            first: 0,
            count: warmup,
            of: warmup,
            in_flight,
        };
        side.requests(requests, &mut discarded)
            .await
            .with_context(|| format!("{}'s warm-up", system.title()))?;
        discarded.clear();
    }
    let slices = if sides.len() > 1 {
        slice_sizes(count, W4_SLICES)
    } else {
        vec![count]
    };
    // Room for every latency up front: no reallocation inside a timed slice.
    let latencies = if in_flight <= 1 { count } else { 0 };
    let mut tallies: Vec<Tally> = sides
        .iter()
        .map(|_| Tally {
            latencies: Vec::with_capacity(usize::try_from(latencies).unwrap_or(0)),
            ..Tally::default()
        })
        .collect();
    for (k, &size) in slices.iter().enumerate() {
        let first = slices[..k].iter().sum();
        let mut order: Vec<usize> = (0..sides.len()).collect();
        if k % 2 == 1 {
            order.reverse();
        }
        for i in order {
            let tally = &mut tallies[i];
            let requests = Requests {
                first,
                count: size,
                of: count,
                in_flight,
            };
            let before = CpuTimes::read();
            let (system, side) = &mut sides[i];
            tally.elapsed += side
                .requests(requests, &mut tally.latencies)
                .await
                .with_context(|| format!("{}'s side", system.title()))?;
            tally.requests += size;
            let after = CpuTimes::read();
            if let Some(span) = before.zip(after).and_then(|(b, a)| a.since(b)) {
                tally.cpu.total += span.total;
                tally.cpu.steal += span.steal;
            }
        }
    }
    Ok(tallies)
}

/// Asks `requests` of `requester`, timed (see [`timed_requests`]).
async fn side_requests<S: Side>(
    side: &mut S,
    requester: &S::Requester,
    requests: Requests,
    latencies: &mut Vec<u64>,
) -> anyhow::Result<Duration> {
    let ask = |i| S::request(requester, i, requests.of);
    side.watch(timed_requests(requests, latencies, ask)).await
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
        let requester = S::requester(&address, &address).await?;
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
                    publish_pipelined::<S>(&publisher, W12_NAME, &payload, W12_CHUNK, WINDOW)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_cover_the_count_and_differ_by_at_most_one() {
        assert_eq!(slice_sizes(20_000, 10), vec![2_000; 10]);
        assert_eq!(slice_sizes(23, 10), vec![3, 3, 3, 2, 2, 2, 2, 2, 2, 2]);
        assert_eq!(slice_sizes(4, 10), vec![1, 1, 1, 1]);
        assert_eq!(slice_sizes(0, 10), vec![0]);
        for count in [1, 10, 99, 1_000, 200_000] {
            let sizes = slice_sizes(count, W4_SLICES);
            assert_eq!(sizes.iter().sum::<u64>(), count);
            let (min, max) = (sizes.iter().min(), sizes.iter().max());
            assert!(max.zip(min).is_some_and(|(max, min)| max - min <= 1));
        }
    }

    #[test]
    fn a_tally_gives_nearest_rank_percentiles_and_requests_per_second() {
        let tally = Tally {
            latencies: (1..=1_000).rev().map(|us| us * 1_000).collect(),
            requests: 1_000,
            elapsed: Duration::from_millis(500),
            ..Tally::default()
        };
        let figures = tally.measurements(Job::RequestSequential);
        assert_eq!(
            figures,
            vec![
                (Workload::W4a, Metric::LatencyP50, 500.0),
                (Workload::W4a, Metric::LatencyP90, 900.0),
                (Workload::W4a, Metric::LatencyP99, 990.0),
                (Workload::W4a, Metric::LatencyP999, 999.0),
                (Workload::W4a, Metric::Throughput, 2_000.0),
            ]
        );
        let concurrent = Tally {
            requests: 300,
            elapsed: Duration::from_millis(100),
            ..Tally::default()
        };
        assert_eq!(
            concurrent.measurements(Job::RequestConcurrent),
            vec![(Workload::W4b, Metric::Throughput, 3_000.0)]
        );
    }
}
