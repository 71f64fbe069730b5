//! The reconnect policy of `wsrelay client`: how long to wait before the next attempt, and which
//! server URL it goes to.
//!
//! Owns: `Backoff` (exponential delays with jitter, reset once a connection has proved stable,
//! fail-over to the next URL after repeated failed attempts) and `BackoffPolicy`, its numbers.
//! Does not: sleep, read a clock or draw random numbers: the caller passes the connection's
//! uptime and a uniform number in [0, 1), so the schedule is a pure function tested by hand.
//!
//! SPEC §7 ("exponential backoff with jitter, 1 s doubling to a 30 s cap, reset after a
//! connection stays up; ... after three failed attempts the client fails over to the next").
//!
//! The schedule: attempt `n` (counted since the last stable connection) waits
//! `min(cap, initial * 2^(n-1))`, scaled by a factor drawn uniformly from
//! `[1 - jitter, 1 + jitter)` and clamped to the cap: with the defaults 0.8-1.2 s, 1.6-2.4 s,
//! 3.2-4.8 s, ..., 24-30 s, 24-30 s. Jitter spreads the reconnects of many clients that lost the
//! same server at the same instant, so the restarted server is not hit by all of them at once.
//!
//! Fail-over picks the URL only; the delay keeps growing across URLs, so a client facing a
//! whole cluster that is down still backs off to the cap instead of cycling at a second.

use std::time::Duration;

/// The numbers of the policy; `Default` gives SPEC §7's.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BackoffPolicy {
    /// The nominal delay of the first attempt.
    pub initial: Duration,
    /// No delay exceeds this, jitter included.
    pub cap: Duration,
    /// Relative spread of each delay: 0.2 draws from 80 % to 120 % of the nominal delay.
    pub jitter: f64,
    /// A connection that stayed up this long resets the schedule to `initial`; a shorter one
    /// (a server that accepts and then drops us) keeps it growing, so we cannot spin.
    pub stable_after: Duration,
    /// Failed attempts in a row on one URL before the next URL is tried.
    pub attempts_per_url: u32,
}

impl Default for BackoffPolicy {
    fn default() -> Self {
        BackoffPolicy {
            initial: Duration::from_secs(1),
            cap: Duration::from_secs(30),
            jitter: 0.2,
            stable_after: Duration::from_secs(10),
            attempts_per_url: 3,
        }
    }
}

/// The reconnect state across the whole run of the client.
///
/// Invariant: `url_index < url_count` (and `url_count >= 1`).
#[derive(Clone, Debug)]
pub struct Backoff {
    policy: BackoffPolicy,
    url_count: usize,
    url_index: usize,
    /// Delays handed out since the last stable connection: the number of the next attempt
    /// minus one.
    attempt: u32,
    /// Failed attempts in a row on the current URL.
    failures_on_url: u32,
}

impl Backoff {
    /// A fresh schedule over `url_count` URLs (at least one is assumed), starting at the first.
    pub fn new(policy: BackoffPolicy, url_count: usize) -> Self {
        Backoff {
            policy,
            url_count: url_count.max(1),
            url_index: 0,
            attempt: 0,
            failures_on_url: 0,
        }
    }

    /// Which URL the next attempt goes to.
    pub fn url_index(&self) -> usize {
        self.url_index
    }

    /// An attempt on the current URL failed (refused, unreachable, bad answer). Returns `true`
    /// when this moved on to the next URL.
    pub fn connect_failed(&mut self) -> bool {
        self.failures_on_url = self.failures_on_url.saturating_add(1);
        if self.failures_on_url >= self.policy.attempts_per_url && self.url_count > 1 {
            self.url_index = (self.url_index + 1) % self.url_count;
            self.failures_on_url = 0;
            true
        } else {
            false
        }
    }

    /// The handshake on the current URL completed.
    pub fn connected(&mut self) {
        self.failures_on_url = 0;
    }

    /// An established connection was lost after `uptime`.
    pub fn disconnected(&mut self, uptime: Duration) {
        if uptime >= self.policy.stable_after {
            self.attempt = 0;
        }
    }

    /// The delay before the next attempt and that attempt's number (1 for the first reconnect
    /// since the last stable connection). `unit` is a uniform random number in [0, 1); values
    /// outside are clamped into it.
    pub fn next_delay(&mut self, unit: f64) -> (Duration, u32) {
        self.attempt = self.attempt.saturating_add(1);
        let nominal = nominal_delay(&self.policy, self.attempt);
        (jittered(&self.policy, nominal, unit), self.attempt)
    }
}

/// `min(cap, initial * 2^(attempt-1))`, without overflow for any attempt number.
pub fn nominal_delay(policy: &BackoffPolicy, attempt: u32) -> Duration {
    let doublings = attempt.saturating_sub(1).min(31);
    policy
        .initial
        .saturating_mul(1u32 << doublings)
        .min(policy.cap)
}

/// `nominal` scaled by a factor in `[1 - jitter, 1 + jitter)` chosen by `unit`, at most the cap.
fn jittered(policy: &BackoffPolicy, nominal: Duration, unit: f64) -> Duration {
    let unit = if unit.is_finite() {
        unit.clamp(0.0, 1.0)
    } else {
        0.5
    };
    let factor = 1.0 + policy.jitter * (2.0 * unit - 1.0);
    nominal.mul_f64(factor.max(0.0)).min(policy.cap)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    /// The delays of `count` attempts in a row, each drawn with `unit`.
    fn schedule(unit: f64, count: usize) -> Vec<Duration> {
        let mut b = Backoff::new(BackoffPolicy::default(), 1);
        (0..count).map(|_| b.next_delay(unit).0).collect()
    }

    #[test]
    fn doubles_to_the_cap() {
        let cases: &[(&str, f64, &[f64])] = &[
            ("middle", 0.5, &[1., 2., 4., 8., 16., 30., 30., 30.]),
            ("lowest", 0.0, &[0.8, 1.6, 3.2, 6.4, 12.8, 24., 24., 24.]),
            ("highest", 1.0, &[1.2, 2.4, 4.8, 9.6, 19.2, 30., 30., 30.]),
        ];
        for &(name, unit, want) in cases {
            let want: Vec<Duration> = want.iter().map(|&s| secs(s)).collect();
            let got = schedule(unit, want.len());
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                let diff = g.as_secs_f64() - w.as_secs_f64();
                assert!(
                    diff.abs() < 1e-9,
                    "{name}: attempt {}: {g:?} != {w:?}",
                    i + 1
                );
            }
        }
    }

    /// Whatever the random draw, every delay lies within the jitter bounds of its nominal delay.
    #[test]
    fn jitter_stays_within_bounds() {
        let policy = BackoffPolicy::default();
        for step in 0..=100 {
            let unit = f64::from(step) / 100.0;
            for (i, delay) in schedule(unit, 10).into_iter().enumerate() {
                let nominal = nominal_delay(&policy, i as u32 + 1).as_secs_f64();
                let d = delay.as_secs_f64();
                assert!(
                    d >= nominal * 0.8 - 1e-9,
                    "unit {unit}: {d} < 0.8 * {nominal}"
                );
                assert!(d <= (nominal * 1.2).min(30.0) + 1e-9, "unit {unit}: {d}");
            }
        }
        for odd in [f64::NAN, -3.0, 7.0, f64::INFINITY] {
            let d = schedule(odd, 1)[0].as_secs_f64();
            assert!((0.8..=1.2).contains(&d), "{odd}: {d}");
        }
    }

    #[test]
    fn attempt_numbers_count_up() {
        let mut b = Backoff::new(BackoffPolicy::default(), 1);
        let numbers: Vec<u32> = (0..4).map(|_| b.next_delay(0.5).1).collect();
        assert_eq!(numbers, [1, 2, 3, 4]);
    }

    #[test]
    fn huge_attempt_numbers_do_not_overflow() {
        let policy = BackoffPolicy::default();
        for attempt in [32, 33, 1000, u32::MAX] {
            assert_eq!(nominal_delay(&policy, attempt), policy.cap, "{attempt}");
        }
    }

    #[test]
    fn a_stable_connection_resets_the_schedule() {
        let cases: &[(&str, f64, u32)] = &[
            ("short-lived", 9.9, 4),
            ("stable", 10.0, 1),
            ("long", 3600.0, 1),
        ];
        for &(name, uptime, next_attempt) in cases {
            let mut b = Backoff::new(BackoffPolicy::default(), 1);
            for _ in 0..3 {
                b.next_delay(0.5);
            }
            b.connected();
            b.disconnected(secs(uptime));
            assert_eq!(b.next_delay(0.5).1, next_attempt, "{name}");
        }
    }

    #[test]
    fn fails_over_after_three_failures_and_wraps() {
        let mut b = Backoff::new(BackoffPolicy::default(), 3);
        let mut visited = Vec::new();
        for _ in 0..10 {
            visited.push(b.url_index());
            b.connect_failed();
        }
        assert_eq!(visited, [0, 0, 0, 1, 1, 1, 2, 2, 2, 0]);
    }

    #[test]
    fn a_success_resets_the_failures_on_that_url() {
        let mut b = Backoff::new(BackoffPolicy::default(), 2);
        assert!(!b.connect_failed());
        assert!(!b.connect_failed());
        b.connected();
        assert!(!b.connect_failed());
        assert!(!b.connect_failed());
        assert!(b.connect_failed());
        assert_eq!(b.url_index(), 1);
    }

    #[test]
    fn one_url_never_fails_over() {
        let mut b = Backoff::new(BackoffPolicy::default(), 1);
        for _ in 0..10 {
            assert!(!b.connect_failed());
            assert_eq!(b.url_index(), 0);
        }
    }
}
