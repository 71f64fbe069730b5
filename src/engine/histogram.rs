//! A fixed-bucket histogram rendered in the Prometheus text format (SPEC §13: batch sizes and
//! fsync latency).
//!
//! Owns: `Histogram`, counts per upper bound plus a sum, and its rendering.
//! Does not: measure anything (callers `record` values), or keep percentiles: Prometheus
//! computes quantiles from the cumulative buckets.

use crate::server::metrics::Writer;
use std::fmt::Write as _;

#[derive(Clone, Debug)]
pub struct Histogram {
    /// Upper bounds, increasing; a value lands in the first bucket whose bound it does not exceed.
    bounds: &'static [f64],
    /// One count per bound, plus one for values above the last (`+Inf`).
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Histogram {
        debug_assert!(bounds.windows(2).all(|w| w[0] < w[1]));
        Histogram {
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
            count: 0,
        }
    }

    pub fn record(&mut self, value: f64) {
        let at = self.bounds.partition_point(|&b| b < value);
        self.counts[at] += 1;
        self.sum += value;
        self.count += 1;
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn sum(&self) -> f64 {
        self.sum
    }

    /// Writes the family `name` (`_bucket` with cumulative counts, `_sum`, `_count`).
    pub fn render(&self, out: &mut String, name: &str, help: &str) {
        Writer::new(out).family(name, "histogram", help);
        let mut cumulative = 0;
        for (bound, count) in self.bounds.iter().zip(&self.counts) {
            cumulative += count;
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}", self.sum);
        let _ = writeln!(out, "{name}_count {}", self.count);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_inclusive() {
        let mut h = Histogram::new(&[1.0, 10.0]);
        for v in [0.5, 1.0, 2.0, 50.0] {
            h.record(v);
        }
        let mut out = String::new();
        h.render(&mut out, "x", "help");
        assert!(out.contains("x_bucket{le=\"1\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"10\"} 3\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 4\n"), "{out}");
        assert!(out.contains("x_sum 53.5\n"), "{out}");
        assert!(out.contains("x_count 4\n"), "{out}");
    }
}
