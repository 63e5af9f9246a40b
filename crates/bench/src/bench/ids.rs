//! `courier bench --ids`: what a fresh message id costs. Every send that
//! does not bring its own id takes one, so on a fast publisher the id is
//! on the hot path. Courier's generator (`courier_proto::new_id`: UUID v7
//! from a per-thread ChaCha12 pool keyed by the OS) beside the two plain
//! ways it replaces: `Uuid::now_v7` (the OS's randomness for every id) and
//! a 4 KiB pool refilled from the OS (no ChaCha). The table says whether
//! the hand-written generator still pays for itself.

use std::hint::black_box;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::*;

const IDS_FULL: u64 = 5_000_000;
const IDS_QUICK: u64 = 200_000;
const RUNS: usize = 5;
const POOL_BYTES: usize = 4096;
const ID_RANDOM_BYTES: usize = 10;

/// A generator under test: draws `count` ids, returns the time taken.
type Generator = fn(u64) -> anyhow::Result<Duration>;

const GENERATORS: [(&str, Generator); 3] = [
    ("courier new_id (ChaCha12 pool)", courier_ids),
    ("uuid Uuid::now_v7 (OS per id)", uuid_ids),
    ("pool refilled from the OS", os_pool_ids),
];

pub(super) fn run(quick: bool) -> anyhow::Result<()> {
    let count = if quick { IDS_QUICK } else { IDS_FULL };
    progress(&format!(
        "{} ids per run, {RUNS} runs per generator, interleaved, one thread",
        thousands(count)
    ));
    let mut rates: Vec<Vec<f64>> = vec![Vec::with_capacity(RUNS); GENERATORS.len()];
    for run in 0..RUNS {
        for (i, (name, generate)) in GENERATORS.iter().enumerate() {
            let took = generate(count)?;
            let rate = count as f64 / took.as_secs_f64().max(1e-9);
            progress(&format!(
                "  run {}: {name}: {} ids/s",
                run + 1,
                thousands(rate as u64)
            ));
            rates[i].push(rate);
        }
    }
    let medians: Vec<f64> = rates.iter_mut().map(|r| median(r)).collect();
    println!("| generator | ids/s (median) | spread | ns per id | Courier's advantage |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    for (i, (name, _)) in GENERATORS.iter().enumerate() {
        let (low, high) = spread(&rates[i]);
        println!(
            "| {name} | {} | {}–{} | {:.1} | {:.2}× |",
            thousands(medians[i] as u64),
            thousands(low as u64),
            thousands(high as u64),
            1e9 / medians[i],
            medians[0] / medians[i]
        );
    }
    println!(
        "Ids: UUID v7 (48-bit millisecond, 74 random bits); {} per run, {RUNS} runs (median shown; spread = min–max). Courier's reads the coarse real-time clock, the other two the precise one (as Uuid::now_v7 does).",
        thousands(count)
    );
    Ok(())
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn spread(values: &[f64]) -> (f64, f64) {
    values.iter().fold((f64::MAX, f64::MIN), |(low, high), v| {
        (low.min(*v), high.max(*v))
    })
}

fn courier_ids(count: u64) -> anyhow::Result<Duration> {
    let started = Instant::now();
    for _ in 0..count {
        black_box(courier_proto::new_id());
    }
    Ok(started.elapsed())
}

fn uuid_ids(count: u64) -> anyhow::Result<Duration> {
    let started = Instant::now();
    for _ in 0..count {
        black_box(uuid::Uuid::now_v7());
    }
    Ok(started.elapsed())
}

fn os_pool_ids(count: u64) -> anyhow::Result<Duration> {
    let mut pool = [0u8; POOL_BYTES];
    let mut used = POOL_BYTES;
    let started = Instant::now();
    for _ in 0..count {
        if used + ID_RANDOM_BYTES > POOL_BYTES {
            getrandom::fill(&mut pool).map_err(|e| anyhow!("the OS gave no randomness: {e}"))?;
            used = 0;
        }
        let mut random = [0u8; ID_RANDOM_BYTES];
        random.copy_from_slice(&pool[used..used + ID_RANDOM_BYTES]);
        used += ID_RANDOM_BYTES;
        let millis = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        black_box(uuid::Builder::from_unix_timestamp_millis(millis, &random).into_uuid());
    }
    Ok(started.elapsed())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_generator_gives_distinct_version_7_ids() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..1000 {
            for id in [courier_proto::new_id(), uuid::Uuid::now_v7(), {
                let mut random = [0u8; ID_RANDOM_BYTES];
                getrandom::fill(&mut random).expect("the OS gives randomness");
                uuid::Builder::from_unix_timestamp_millis(1, &random).into_uuid()
            }] {
                assert_eq!(id.get_version_num(), 7);
                assert!(seen.insert(id), "{id} twice");
            }
        }
        assert!(os_pool_ids(10_000).is_ok());
    }
}
