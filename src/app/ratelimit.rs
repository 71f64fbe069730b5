//! A token bucket: the per-connection message rate limit of SPEC §6 (`--rate`, `--burst`).
//!
//! Owns: `TokenBucket` and its refill arithmetic.
//! Does not: decide what happens beyond the limit (the hub closes the connection with 1008) or
//! read a clock (it is handed `now`).
//!
//! The bucket holds at most `burst` tokens and gains `rate` per second; each message takes one.
//! A client may therefore send `burst` messages at once, and `rate` per second for ever.

use std::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RateLimit {
    /// Messages per second, sustained.
    pub per_second: f64,
    /// Messages that may arrive at once (the bucket's size), at least 1.
    pub burst: f64,
}

#[derive(Clone, Debug)]
pub struct TokenBucket {
    limit: RateLimit,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(limit: RateLimit, now: Instant) -> TokenBucket {
        TokenBucket {
            limit,
            tokens: limit.burst,
            last: now,
        }
    }

    /// Takes one token if there is one. `now` earlier than the last call counts as no time.
    pub fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now.max(self.last);
        self.tokens = (self.tokens + elapsed * self.limit.per_second).min(self.limit.burst);
        // The epsilon absorbs float rounding, so a client sending exactly at the rate is never
        // refused for owing a billionth of a token.
        if self.tokens >= 1.0 - 1e-9 {
            self.tokens = (self.tokens - 1.0).max(0.0);
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// (name, rate, burst, [(ms since start, expected outcome)]).
    fn check(name: &str, per_second: f64, burst: f64, steps: &[(u64, bool)]) {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(RateLimit { per_second, burst }, start);
        for (i, &(ms, expected)) in steps.iter().enumerate() {
            let now = start + Duration::from_millis(ms);
            assert_eq!(bucket.take(now), expected, "{name}: step {i} at {ms} ms");
        }
    }

    #[test]
    fn bucket_table() {
        check(
            "burst then empty",
            1.0,
            3.0,
            &[(0, true), (0, true), (0, true), (0, false)],
        );
        check(
            "refills at the rate",
            10.0,
            1.0,
            &[
                (0, true),
                (50, false),
                (100, true),
                (150, false),
                (200, true),
            ],
        );
        check(
            "never above burst",
            100.0,
            2.0,
            &[(10_000, true), (10_000, true), (10_000, false)],
        );
        check(
            "steady at the rate",
            2.0,
            1.0,
            &[(0, true), (500, true), (1000, true), (1499, false)],
        );
    }
}
