//! Time as the hub sees it: a monotonic instant for TTLs and rate limits, wall-clock
//! milliseconds for message timestamps and token expiry.
//!
//! Owns: the `Clock` trait, the real `SystemClock` and `ManualClock`, which tests move by hand.
//! Does not: schedule anything (the hub has no timers; it checks deadlines when it runs).
//!
//! Two clocks because they answer different questions: a TTL must not jump when an operator
//! fixes the system time (monotonic), while a timestamp or a JWT `exp` is a date (wall clock).

use std::cell::Cell;
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub trait Clock {
    /// Monotonic time, for deadlines.
    fn now(&self) -> Instant;
    /// Milliseconds since the Unix epoch, for timestamps and token expiry.
    fn unix_ms(&self) -> u64;
}

/// The operating system's clocks.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn unix_ms(&self) -> u64 {
        // A clock set before 1970 reads as the epoch rather than failing.
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }
}

/// A clock that moves only when told; clones share the same time, so a test keeps one and
/// hands the other to the hub.
#[derive(Clone)]
pub struct ManualClock {
    state: Rc<Cell<(Instant, u64)>>,
}

impl ManualClock {
    /// Starts at an arbitrary instant and at `unix_ms` on the wall clock.
    pub fn new(unix_ms: u64) -> ManualClock {
        ManualClock {
            state: Rc::new(Cell::new((Instant::now(), unix_ms))),
        }
    }

    /// Moves both clocks forward.
    pub fn advance(&self, by: Duration) {
        let (now, ms) = self.state.get();
        let by_ms = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
        self.state.set((now + by, ms.saturating_add(by_ms)));
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.state.get().0
    }

    fn unix_ms(&self) -> u64 {
        self.state.get().1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_both_clocks_and_is_shared() {
        let clock = ManualClock::new(1_000);
        let handle = clock.clone();
        let start = clock.now();
        handle.advance(Duration::from_millis(1500));
        assert_eq!(clock.now() - start, Duration::from_millis(1500));
        assert_eq!(clock.unix_ms(), 2_500);
    }
}
