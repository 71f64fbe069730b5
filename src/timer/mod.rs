//! Timers for the reactor: a hashed timing wheel that answers "which deadlines have passed?" and
//! "how long may I sleep?" in constant time per timer.
//!
//! Owns: `TimerWheel` (arm, cancel, expire, next timeout) and `TimerHandle`.
//! Does not: read the clock (every call that needs the time takes `now`, so tests drive time by
//! hand), run callbacks, or know what a timer means; the value stored with a timer is opaque.
//!
//! Implements SPEC §5 (timer wheel and heartbeats). docs/timer-wheel.md is the long-form tutorial.
//!
//! # Algorithm
//!
//! Time is cut into *ticks* of a fixed length, counted from a start instant. The wheel is a ring
//! of `slots` buckets (a power of two). A timer due at tick `t` goes into bucket `t % slots`
//! (computed as `t & (slots - 1)`), an unsorted doubly-linked list. A cursor remembers the last
//! tick that has been processed; `expire(now)` moves the cursor forward one tick at a time and,
//! at each tick, takes from that tick's bucket every timer that is due.
//!
//! A bucket is shared by every tick that is congruent modulo `slots`, so a timer further away
//! than one revolution shares its bucket with nearer ones and must survive the cursor passing
//! over it. The classic design stores a *rounds* count in the timer and decrements it on each
//! pass; this wheel stores the absolute due tick instead and fires a timer when `due <= now`.
//! The two carry the same information (`rounds = (due - cursor - 1) / slots`), cost the same
//! (one comparison per timer visited), but the absolute tick needs no repair when the cursor
//! skips ahead after a long pause (see *Costs*).
//!
//! This is "Scheme 6" of G. Varghese and A. Lauck, *Hashed and Hierarchical Timing Wheels: Data
//! Structures for the Efficient Implementation of a Timer Facility*, Proc. 11th ACM Symposium on
//! Operating Systems Principles (SOSP), 1987; extended in IEEE/ACM Transactions on Networking
//! 5(6), 1997.
//!
//! # Guarantees
//!
//! * **Never early.** A deadline is rounded *up* to the next tick boundary, so a timer is handed
//!   out only by an `expire(now)` with `now >= deadline`.
//! * **At most one tick late.** The tick boundary a timer waits for is less than one tick after
//!   its deadline, and `next_timeout` tells the reactor to wake exactly at that boundary. A
//!   reactor that sleeps for `next_timeout` and then calls `expire` therefore sees each timer
//!   less than one tick after its deadline (plus however late the OS wakes it).
//! * **Past deadlines.** A deadline in the past, or inside the tick the cursor is on, fires at the
//!   next tick boundary after the cursor: a timer is never handed out by the same `expire` tick
//!   it was armed in, so a handler that re-arms "now" cannot loop forever inside one `expire`.
//! * **Tick order.** One `expire` call returns timers sorted by due tick; timers of the same tick
//!   come in no particular order.
//! * **Stale handles are harmless.** A handle names a node in a slab plus that node's generation.
//!   Cancelling a timer that already fired or was cancelled returns `None` and touches nothing,
//!   even if the node now holds a different timer. The generation is a `u32` that wraps: a handle
//!   could only be confused after the *same* node was reused 2^32 times while the handle was
//!   kept, which the reactor never does (it drops a handle when its timer fires or is cancelled).
//!
//! # Costs
//!
//! | operation            | cost                                                            |
//! |----------------------|-----------------------------------------------------------------|
//! | `arm`                | O(1): round the deadline, take a node from the free list, push it on a list head |
//! | `cancel`             | O(1): unlink from the doubly-linked list, push the node on the free list |
//! | `expire(now)`        | O(ticks elapsed, at most `slots`) + O(timers in the buckets visited) |
//! | `next_timeout(now)`  | O(slots): a minimum over one lower-bound word per bucket        |
//!
//! *Long pauses.* If more than one revolution passed since the last `expire`, every bucket is
//! visited exactly once (not once per elapsed tick), due timers are collected with their due
//! ticks and sorted, so a pause of an hour costs one revolution plus a sort of what fired.
//!
//! *`next_timeout`.* Each bucket keeps a lower bound on the due ticks it holds: lowered by `arm`,
//! reset when the bucket empties, and recomputed exactly whenever `expire` walks the bucket.
//! `cancel` leaves it alone (finding the new minimum would mean walking the list), so after a
//! cancel the answer can be *earlier* than needed: the reactor wakes, `expire` finds nothing,
//! and the bucket's bound is exact again. It is never later than needed.
//!
//! *Memory.* One slab node per pending timer: 48 bytes of links, due tick and generation plus an
//! `Option<T>` (64 bytes in all for a `u64` value on a 64-bit target). Freed nodes are reused
//! through a free list; the slab never shrinks, so it holds as many nodes as the peak number of
//! pending timers. Each bucket is 24 bytes.
//!
//! # The defaults
//!
//! `DEFAULT_TICK` = 100 ms and `DEFAULT_SLOTS` = 512 give one revolution of 512 x 100 ms =
//! 51.2 s in 12 KiB of buckets. Every SPEC §5 timer at its default (handshake 10 s, heartbeat
//! 30 s, pong 10 s, close 5 s) fits in one revolution, so in practice a bucket holds only timers
//! that are due when the cursor reaches it. Timers fire 0-100 ms after their deadline; a
//! heartbeat does not need more precision, and coarse ticks mean one wakeup serves every timer
//! that falls in the same 100 ms.

mod wheel;

pub use self::wheel::{TimerHandle, TimerWheel};

use std::time::Duration;

/// Default tick: timers fire up to this much after their deadline (SPEC §5).
pub const DEFAULT_TICK: Duration = Duration::from_millis(100);

/// Default number of buckets; with `DEFAULT_TICK` one revolution is 51.2 s (SPEC §5).
pub const DEFAULT_SLOTS: usize = 512;
