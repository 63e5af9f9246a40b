//! Statistics and formatting (pure).

use super::*;

/// Events per second.
pub(super) fn per_second(count: u64, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64().max(1e-9)
}

/// Nearest-rank percentile of sorted values: the smallest value with at
/// least `p` percent of the values at or below it.
pub(super) fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    // In thousandths of a percent, in integers: as floats, 99.9 % of 1,000
    // came to 999.0000000000001 and the rank one too high.
    let per_100k = (p.clamp(0.0, 100.0) * 1000.0).round() as u128;
    let n = sorted.len() as u128;
    let rank = (per_100k * n).div_ceil(100_000) as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct Summary {
    pub(super) median: f64,
    pub(super) min: f64,
    pub(super) max: f64,
}

/// Median (the mean of the middle two for an even count) and min–max.
pub(super) fn summarize(values: &[f64]) -> Option<Summary> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    let median = if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    };
    Some(Summary {
        median,
        min: sorted[0],
        max: sorted[sorted.len() - 1],
    })
}

/// `1234567` → `1,234,567`.
pub(super) fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A figure with the precision it deserves: 41,235 · 412 · 41.2 · 4.12.
pub(super) fn format_value(v: f64) -> String {
    if !v.is_finite() {
        return v.to_string();
    }
    let magnitude = v.abs();
    if magnitude >= 1000.0 {
        let sign = if v < 0.0 { "-" } else { "" };
        format!("{sign}{}", thousands(magnitude.round() as u64))
    } else if magnitude >= 100.0 {
        format!("{v:.0}")
    } else if magnitude >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

pub(super) fn bytes_text(bytes: u64) -> String {
    pub(super) const KIB: f64 = 1024.0;
    let b = bytes as f64;
    if b >= KIB * KIB * KIB {
        format!("{:.2} GiB", b / (KIB * KIB * KIB))
    } else if b >= KIB * KIB {
        format!("{:.1} MiB", b / (KIB * KIB))
    } else if bytes >= 1024 && bytes.is_multiple_of(1024) {
        format!("{} KiB", bytes / 1024)
    } else {
        format!("{bytes} B")
    }
}

pub(super) fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let values: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&values, 50.0), Some(50));
        assert_eq!(percentile(&values, 99.0), Some(99));
        assert_eq!(percentile(&values, 100.0), Some(100));
        assert_eq!(percentile(&values, 0.0), Some(1));
        assert_eq!(percentile(&[7], 99.0), Some(7));
        assert_eq!(percentile(&[1, 2, 3], 50.0), Some(2));
        assert_eq!(percentile(&[1, 2, 3, 4], 50.0), Some(2));
        assert_eq!(percentile(&[], 50.0), None);
        let thousand: Vec<u64> = (1..=1_000).collect();
        assert_eq!(percentile(&thousand, 99.9), Some(999));
        let twenty_thousand: Vec<u64> = (1..=20_000).collect();
        assert_eq!(percentile(&twenty_thousand, 99.9), Some(19_980));
        assert_eq!(percentile(&twenty_thousand, 99.0), Some(19_800));
    }

    #[test]
    fn median_and_spread() {
        let s = summarize(&[3.0, 1.0, 2.0]).expect("summary");
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        let s = summarize(&[4.0, 1.0, 2.0, 10.0]).expect("summary");
        assert_eq!((s.median, s.min, s.max), (3.0, 1.0, 10.0));
        assert_eq!(summarize(&[5.0]).map(|s| s.median), Some(5.0));
        assert_eq!(summarize(&[]), None);
    }

    #[test]
    fn figures_are_formatted_by_magnitude() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_000), "1,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(format_value(41_234.6), "41,235");
        assert_eq!(format_value(412.4), "412");
        assert_eq!(format_value(41.24), "41.2");
        assert_eq!(format_value(4.124), "4.12");
        assert_eq!(bytes_text(1024), "1 KiB");
        assert_eq!(bytes_text(128), "128 B");
        assert_eq!(bytes_text(3 << 29), "1.50 GiB");
    }
}
