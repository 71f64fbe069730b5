//! Time as the hub sees it: a monotonic instant for TTLs and rate limits, wall-clock
//! milliseconds for message timestamps and token expiry.
//!
//! Owns: the `Clock` trait, the real `SystemClock`, `LoopClock` (the system clock read once per
//! loop iteration by the reactor and shared with the hub) and `ManualClock`, which tests move
//! by hand.
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

/// The system clock as the reactor read it at the start of this loop iteration, after its wait
/// (SPEC §2: the timers and the hub share that one reading; the reactor's only other read is
/// before the wait, for its timeout; none is per message).
///
/// Why: reading the clock costs a `clock_gettime` each time (a vDSO call, but still the largest
/// user-space item in a profile of the echo benchmark when the hub read it per message). Within
/// one iteration every message is handled "now" anyway: the reactor judges its own deadlines on
/// the same instant. The wall clock is read at most once per iteration, on first use (most
/// iterations, on `/echo` or raw rooms, never need it).
///
/// Clones share the time: the app keeps one to `set` (`Handler::set_now`), the hub reads
/// another. Before the first `set` (an app used without a reactor), it reads the system clock
/// on every call, like `SystemClock`.
#[derive(Clone, Default)]
pub struct LoopClock {
    state: Rc<Cell<IterationTime>>,
}

/// The iteration's instant and, once someone asked for it, its wall-clock milliseconds; `None`
/// before the first iteration.
type IterationTime = Option<(Instant, Option<u64>)>;

impl LoopClock {
    pub fn new() -> LoopClock {
        LoopClock::default()
    }

    /// A new loop iteration began at `now`: every reading until the next `set` returns it.
    pub fn set(&self, now: Instant) {
        self.state.set(Some((now, None)));
    }
}

impl Clock for LoopClock {
    fn now(&self) -> Instant {
        match self.state.get() {
            Some((now, _)) => now,
            None => Instant::now(),
        }
    }

    fn unix_ms(&self) -> u64 {
        match self.state.get() {
            Some((_, Some(ms))) => ms,
            Some((now, None)) => {
                let ms = SystemClock.unix_ms();
                self.state.set(Some((now, Some(ms))));
                ms
            }
            None => SystemClock.unix_ms(),
        }
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

    #[test]
    fn loop_clock_holds_the_iteration_time_and_reads_the_wall_clock_once() {
        let clock = LoopClock::new();
        let hub_side = clock.clone();
        // Not set yet: the system clock, live.
        let before = Instant::now();
        assert!(hub_side.now() >= before);
        let start = Instant::now() - Duration::from_secs(5);
        clock.set(start);
        assert_eq!(
            hub_side.now(),
            start,
            "the instant the reactor set, not a new reading"
        );
        let ms = hub_side.unix_ms();
        assert!(ms > 1_600_000_000_000, "a real wall-clock reading: {ms}");
        std::thread::sleep(Duration::from_millis(3));
        assert_eq!(hub_side.unix_ms(), ms, "read once per iteration");
        assert_eq!(hub_side.now(), start);
        // The next iteration reads the wall clock again.
        clock.set(start + Duration::from_millis(10));
        assert_eq!(hub_side.now(), start + Duration::from_millis(10));
        assert!(hub_side.unix_ms() >= ms + 3);
    }
}
