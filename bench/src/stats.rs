//! Order statistics of a set of timings.

use std::time::Duration;

/// Median, 90th percentile and extremes of some samples.
#[derive(Clone, Copy, Debug)]
pub struct Summary {
    pub n: usize,
    pub min: Duration,
    pub median: Duration,
    pub p90: Duration,
    pub max: Duration,
}

/// Summarise `samples` (nearest-rank percentiles). Panics if empty.
pub fn summarize(samples: &[Duration]) -> Summary {
    assert!(!samples.is_empty(), "no samples to summarise");
    let mut s = samples.to_vec();
    s.sort();
    let n = s.len();
    let median = if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2
    };
    // Nearest rank: the smallest sample with at least 90% at or below it.
    let p90 = s[(n * 9).div_ceil(10) - 1];
    Summary {
        n,
        min: s[0],
        median,
        p90,
        max: s[n - 1],
    }
}

/// Format a duration in the unit that suits it.
pub fn fmt(d: Duration) -> String {
    let ns = d.as_nanos();
    if ns >= 1_000_000_000 {
        format!("{:.3} s", d.as_secs_f64())
    } else if ns >= 1_000_000 {
        format!("{:.2} ms", ns as f64 / 1e6)
    } else if ns >= 1_000 {
        format!("{:.1} µs", ns as f64 / 1e3)
    } else {
        format!("{ns} ns")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: &[u64]) -> Vec<Duration> {
        v.iter().map(|&m| Duration::from_millis(m)).collect()
    }

    #[test]
    fn median_and_p90_of_odd_and_even_counts() {
        let s = summarize(&ms(&[5, 1, 3, 2, 4]));
        assert_eq!(s.median, Duration::from_millis(3));
        assert_eq!(s.p90, Duration::from_millis(5));
        let s = summarize(&ms(&[10, 1, 2, 3, 4, 5, 6, 7, 8, 9]));
        assert_eq!(s.median, Duration::from_micros(5500));
        assert_eq!(s.p90, Duration::from_millis(9));
        assert_eq!((s.min, s.max), (ms(&[1])[0], ms(&[10])[0]));
    }
}
