//! Fixed-bucket histograms, summed as Prometheus's are: the broker's reply
//! latencies and the store's fsync latencies and group-commit sizes.

/// Counts of observations at or below each bound (and past the last).
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    bounds: &'static [f64],
    /// One count per bound, not cumulative; observations past the last
    /// bound are only in `count`.
    buckets: Vec<u64>,
    pub count: u64,
    pub sum: f64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            buckets: vec![0; bounds.len()],
            count: 0,
            sum: 0.0,
        }
    }

    pub fn observe(&mut self, value: f64) {
        self.count += 1;
        self.sum += value;
        if let Some(i) = self.bounds.iter().position(|le| value <= *le) {
            self.buckets[i] += 1;
        }
    }

    /// `(le, cumulative count)` pairs, ending with `+Inf`.
    pub fn cumulative(&self) -> Vec<(f64, u64)> {
        let mut total = 0;
        let mut out: Vec<(f64, u64)> = self
            .bounds
            .iter()
            .zip(&self.buckets)
            .map(|(le, n)| {
                total += n;
                (*le, total)
            })
            .collect();
        out.push((f64::INFINITY, self.count));
        out
    }

    /// The observations at or below each bound and above the one before
    /// it, one count per bound (those past the last are only in `count`).
    pub fn buckets(&self) -> &[u64] {
        &self.buckets
    }

    /// A histogram over `bounds` with these per-bound counts (as
    /// [`Histogram::buckets`] gives them), total and sum; `None` unless
    /// there is one count per bound and they add up to at most `count`.
    pub fn from_counts(
        bounds: &'static [f64],
        buckets: Vec<u64>,
        count: u64,
        sum: f64,
    ) -> Option<Histogram> {
        let counted = buckets.iter().try_fold(0u64, |a, n| a.checked_add(*n))?;
        (buckets.len() == bounds.len() && counted <= count).then_some(Histogram {
            bounds,
            buckets,
            count,
            sum,
        })
    }

    /// Adds `other`'s observations (another node's, say). Over other
    /// bounds, each of its buckets goes to the first bound here at or
    /// above its own, so nothing is counted below where it was.
    pub fn add(&mut self, other: &Histogram) {
        self.count += other.count;
        self.sum += other.sum;
        for (le, n) in other.bounds.iter().zip(&other.buckets) {
            if let Some(i) = self.bounds.iter().position(|own| le <= own) {
                self.buckets[i] += n;
            }
        }
    }

    /// The bound below which `q` (0–1) of the observations fall (the upper
    /// bound of the bucket holding that rank); `None` without observations
    /// or when it lies past the last bound.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let rank = (q * self.count as f64).ceil().max(1.0) as u64;
        self.cumulative()
            .into_iter()
            .find(|(_, n)| *n >= rank)
            .map(|(le, _)| le)
            .filter(|le| le.is_finite())
    }
}

/// Seconds, from 100 µs to a minute: latencies of replies and fsyncs.
pub const SECONDS_BUCKETS: [f64; 16] = [
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    10.0, 60.0,
];

/// Records per group commit.
pub const BATCH_BUCKETS: [f64; 12] = [
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0, 4096.0, 16384.0,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_sums_and_quantiles() {
        let mut h = Histogram::new(&SECONDS_BUCKETS);
        for micros in [50.0, 80.0, 300.0, 700.0, 2_000_000.0] {
            h.observe(micros / 1e6);
        }
        let cumulative = h.cumulative();
        assert_eq!(cumulative[0], (0.000_1, 2));
        assert_eq!(cumulative[2], (0.000_5, 3));
        assert_eq!(cumulative[3], (0.001, 4));
        assert_eq!(cumulative.last(), Some(&(f64::INFINITY, 5)));
        assert_eq!(h.quantile(0.5), Some(0.000_5));
        assert_eq!(h.quantile(1.0), Some(2.5));
        assert!((h.sum - 2.00113).abs() < 1e-9);
        assert_eq!(Histogram::new(&SECONDS_BUCKETS).quantile(0.5), None);
    }

    #[test]
    fn histograms_add_and_come_back_from_their_counts() {
        let mut a = Histogram::new(&SECONDS_BUCKETS);
        let mut b = Histogram::new(&SECONDS_BUCKETS);
        a.observe(0.000_05);
        b.observe(0.000_05);
        b.observe(0.003);
        b.observe(100.0);
        a.add(&b);
        assert_eq!(a.count, 4);
        assert_eq!(a.cumulative()[0], (0.000_1, 2));
        assert_eq!(a.cumulative()[5], (0.005, 3));
        assert_eq!(a.cumulative().last(), Some(&(f64::INFINITY, 4)));
        let back = Histogram::from_counts(&SECONDS_BUCKETS, a.buckets().to_vec(), a.count, a.sum);
        assert_eq!(back.as_ref(), Some(&a));
        assert_eq!(
            Histogram::from_counts(&SECONDS_BUCKETS, vec![1; 3], 3, 0.0),
            None
        );
        assert_eq!(
            Histogram::from_counts(&SECONDS_BUCKETS, vec![1; 16], 3, 0.0),
            None
        );

        // Other bounds: nothing lands below where it was counted.
        let mut batches = Histogram::new(&BATCH_BUCKETS);
        let mut seconds = Histogram::new(&SECONDS_BUCKETS);
        seconds.observe(1.5);
        batches.add(&seconds);
        // 1.5 was counted at or below 2.5: here at or below 4.
        assert_eq!(batches.cumulative()[1], (2.0, 0));
        assert_eq!(batches.cumulative()[2], (4.0, 1));
    }

    #[test]
    fn past_the_last_bound_counts_only_in_inf() {
        let mut h = Histogram::new(&BATCH_BUCKETS);
        h.observe(1e9);
        assert_eq!(h.cumulative()[BATCH_BUCKETS.len() - 1].1, 0);
        assert_eq!(h.cumulative().last(), Some(&(f64::INFINITY, 1)));
        assert_eq!(h.quantile(0.5), None);
    }
}
