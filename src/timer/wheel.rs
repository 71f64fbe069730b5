//! The hashed timing wheel: a ring of buckets, each an intrusive doubly-linked list of timer
//! nodes that live in one slab.
//!
//! Owns: the bucket ring, the node slab and its free list, handle generations, the cursor tick,
//! and the conversion between `Instant`s and tick numbers.
//! Does not: read the clock, run callbacks, or interpret the values it stores.
//!
//! SPEC §5. The algorithm, guarantees and costs are written up in the parent module (`timer`).
//!
//! # Invariants
//!
//! 1. Ticks up to and including `cursor` are done: every pending node has `due > cursor`.
//! 2. A pending node is linked into the bucket `due & mask`, and into no other.
//! 3. A bucket's `earliest` is at most the smallest `due` in its list (exact right after `expire`
//!    walked it; `u64::MAX` when the list is empty), and is greater than `cursor`.
//! 4. `len` is the number of pending nodes; every other node is on the free list.
//! 5. A node's `generation` changes every time the node is freed, so a handle matches its node
//!    only while the timer it was issued for is pending (up to `u32` wrap, see the parent module).

use std::fmt;
use std::num::NonZeroU32;
use std::ops::{Index, IndexMut};
use std::time::{Duration, Instant};

const NANOS_PER_SEC: u128 = 1_000_000_000;

/// Names one armed timer, for `TimerWheel::cancel`.
///
/// It is a slab index plus the generation the node had when the timer was armed, so a handle
/// kept after its timer fired or was cancelled is recognised as stale instead of cancelling
/// whichever timer reuses the node.
///
/// 8 bytes: a server keeps one per connection (docs/benchmarks.md, "Idle memory").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TimerHandle {
    index: NodeId,
    generation: u32,
}

/// The index of a node in the slab, stored plus one in a `NonZeroU32`: 4 bytes, and an
/// `Option<NodeId>` (a list link) is 4 bytes too, where `Option<usize>` takes 16. The links
/// are most of a node, and a server keeps a node per connection. Limit: `u32::MAX - 1` timers
/// pending at once (`NodeId::new` panics beyond; a server holds about one per connection).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct NodeId(NonZeroU32);

impl NodeId {
    fn new(index: usize) -> NodeId {
        u32::try_from(index)
            .ok()
            .and_then(|i| i.checked_add(1))
            .and_then(NonZeroU32::new)
            .map(NodeId)
            .unwrap_or_else(|| panic!("TimerWheel: more than u32::MAX - 1 timers"))
    }

    fn get(self) -> usize {
        // A u32 always fits in usize on the targets this server supports (32 and 64 bits).
        (self.0.get() - 1) as usize
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.get())
    }
}

impl<T> Index<NodeId> for Vec<Node<T>> {
    type Output = Node<T>;
    fn index(&self, id: NodeId) -> &Node<T> {
        &self[id.get()]
    }
}

impl<T> IndexMut<NodeId> for Vec<Node<T>> {
    fn index_mut(&mut self, id: NodeId) -> &mut Node<T> {
        &mut self[id.get()]
    }
}

/// A hashed timing wheel holding values of type `T` until their deadline passes.
///
/// See the `timer` module doc for the algorithm, guarantees and costs.
pub struct TimerWheel<T> {
    /// The instant of tick 0. Tick `n` covers `[start + n*tick, start + (n+1)*tick)`.
    start: Instant,
    /// The tick length in nanoseconds (never zero), kept as `u128` to do tick arithmetic on
    /// `Duration::as_nanos` without conversions.
    tick_nanos: u128,
    /// The same tick as a `Duration`, for `tick()`.
    tick: Duration,
    /// The ring of buckets; its length is a power of two.
    buckets: Vec<Bucket>,
    /// `buckets.len() - 1`: `due & mask` is `due % buckets.len()` without a division.
    mask: u64,
    /// The last tick `expire` has processed (invariant 1). Starts at 0: tick 0 is the tick that
    /// contains `start`, so nothing can fire before the first tick boundary.
    cursor: u64,
    /// Every node ever allocated, pending or free. Indices are stable, so handles can name them.
    nodes: Vec<Node<T>>,
    /// Head of the free list, threaded through `Node::next` of free nodes.
    free_head: Option<NodeId>,
    /// Number of pending timers.
    len: usize,
}

/// One bucket: the timers whose due tick is congruent to this bucket's index.
#[derive(Clone, Copy, Debug)]
struct Bucket {
    /// First node of the unsorted, doubly-linked list.
    head: Option<NodeId>,
    /// A lower bound on the due ticks in the list, so `next_timeout` need not walk lists
    /// (invariant 3). `u64::MAX` when empty.
    earliest: u64,
}

const EMPTY_BUCKET: Bucket = Bucket {
    head: None,
    earliest: u64::MAX,
};

/// A slab entry: a pending timer, or a free node waiting to be reused.
struct Node<T> {
    /// Changed on every free (invariant 5) so stale handles stop matching.
    generation: u32,
    /// `Some` while the timer is pending, `None` while the node is on the free list.
    value: Option<T>,
    /// The absolute tick at which the timer fires. Meaningless on a free node.
    due: u64,
    /// Previous node in the bucket list; `None` for the head. Unused on a free node.
    prev: Option<NodeId>,
    /// Next node in the bucket list, or, on a free node, the next free node.
    next: Option<NodeId>,
}

impl<T> TimerWheel<T> {
    /// Creates an empty wheel whose tick 0 starts at `start`.
    ///
    /// `tick` is the granularity (SPEC default 100 ms, `timer::DEFAULT_TICK`); `slots` is the
    /// number of buckets, rounded up to a power of two (0 counts as 1; default 512,
    /// `timer::DEFAULT_SLOTS`).
    ///
    /// # Panics
    ///
    /// If `tick` is zero, or `slots` is so large that the next power of two overflows `usize`.
    /// Both are programming errors in the caller's configuration, not input.
    pub fn new(tick: Duration, slots: usize, start: Instant) -> TimerWheel<T> {
        assert!(!tick.is_zero(), "TimerWheel tick must be non-zero");
        let slots = slots
            .max(1)
            .checked_next_power_of_two()
            .unwrap_or_else(|| panic!("TimerWheel slots {slots} has no power of two in usize"));
        TimerWheel {
            start,
            tick_nanos: tick.as_nanos(),
            tick,
            buckets: vec![EMPTY_BUCKET; slots],
            // A power of two no larger than usize::MAX always fits in u64 on supported targets.
            mask: (slots - 1) as u64,
            cursor: 0,
            nodes: Vec::new(),
            free_head: None,
            len: 0,
        }
    }

    /// Arms a timer that fires once `deadline` has passed, and returns a handle to cancel it.
    ///
    /// O(1). The deadline is rounded up to the next tick boundary so the timer never fires
    /// early. A deadline in the past or within the tick the wheel's cursor is on fires at the
    /// next tick boundary after the cursor, i.e. at the first `expire` in a later tick.
    pub fn arm(&mut self, deadline: Instant, value: T) -> TimerHandle {
        let due = self.ceil_tick(deadline).max(self.cursor.saturating_add(1));
        let index = self.alloc(value, due);
        self.link(index);
        self.len += 1;
        TimerHandle {
            index,
            generation: self.nodes[index].generation,
        }
    }

    /// Cancels a pending timer and returns its value.
    ///
    /// O(1). Returns `None`, and changes nothing, if the timer already fired or was cancelled
    /// (the handle is stale: its generation no longer matches the node).
    pub fn cancel(&mut self, handle: TimerHandle) -> Option<T> {
        let node = self.nodes.get(handle.index.get())?;
        if node.generation != handle.generation || node.value.is_none() {
            return None;
        }
        self.unlink(handle.index);
        self.free(handle.index)
    }

    /// Advances the wheel to `now` and pushes the value of every timer that is due into `out`,
    /// in tick order (timers of the same tick in no particular order).
    ///
    /// A timer is due when the tick boundary its deadline was rounded up to is `<= now`. A `now`
    /// in the same tick as the previous call, or earlier, does nothing.
    ///
    /// Cost: one bucket per elapsed tick, but never more than one revolution of buckets (see the
    /// module doc on long pauses), plus one comparison per timer in the buckets visited.
    pub fn expire(&mut self, now: Instant, out: &mut Vec<T>) {
        let target = self.floor_tick(now);
        if target <= self.cursor {
            return;
        }
        let elapsed = target - self.cursor;
        if elapsed <= self.buckets.len() as u64 {
            // The usual case: walk the buckets of ticks cursor+1 ..= target in order. A due
            // node met at tick t has due == t (it is > cursor by invariant 1, congruent to t,
            // and <= target < cursor + one revolution), so `out` comes out in tick order.
            for tick in self.cursor + 1..=target {
                self.drain_bucket(self.bucket_of(tick), target, |due, value| {
                    debug_assert_eq!(due, tick);
                    out.push(value);
                });
            }
        } else {
            // A pause longer than one revolution: walking every elapsed tick would cost
            // O(elapsed) for nothing, since each bucket would be visited many times. Visit each
            // bucket once instead, take everything due by `target`, and sort by due tick to keep
            // the tick-order promise. The stable sort keeps this path's output deterministic.
            let mut fired: Vec<(u64, T)> = Vec::new();
            for bucket in 0..self.buckets.len() {
                self.drain_bucket(bucket, target, |due, value| fired.push((due, value)));
            }
            fired.sort_by_key(|&(due, _)| due);
            out.extend(fired.into_iter().map(|(_, value)| value));
        }
        self.cursor = target;
    }

    /// How long the reactor may sleep before the next timer is due: `None` if no timer is
    /// pending, `Duration::ZERO` if one is already due, else the time from `now` to the tick
    /// boundary of the earliest pending timer.
    ///
    /// O(slots): reads one lower bound per bucket. After a `cancel` the bound can be stale, so
    /// the answer may be earlier than strictly needed (a wakeup that finds nothing); it is never
    /// later. The caller should round the duration *up* to its poller's resolution, or it wakes
    /// just before the boundary and has to wait again.
    pub fn next_timeout(&self, now: Instant) -> Option<Duration> {
        if self.len == 0 {
            return None;
        }
        let earliest = self.buckets.iter().map(|b| b.earliest).min()?;
        match self.tick_start(earliest) {
            Some(due_at) => Some(due_at.saturating_duration_since(now)),
            // A due tick beyond what `Instant` can represent: as good as never.
            None => Some(Duration::MAX),
        }
    }

    /// Number of pending timers.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if no timer is pending.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The tick length: the granularity of deadlines and the most a timer can be late.
    pub fn tick(&self) -> Duration {
        self.tick
    }

    /// Number of buckets (the `slots` given to `new`, rounded up to a power of two).
    pub fn slots(&self) -> usize {
        self.buckets.len()
    }

    // ---- ticks and instants -------------------------------------------------------------

    /// The tick containing `at` (rounded down). Instants before `start` count as tick 0; ticks
    /// past `u64::MAX` saturate (about 58 years at a 100 ns tick).
    fn floor_tick(&self, at: Instant) -> u64 {
        let nanos = at.saturating_duration_since(self.start).as_nanos();
        u64::try_from(nanos / self.tick_nanos).unwrap_or(u64::MAX)
    }

    /// The first tick boundary at or after `at` (rounded up): the never-early rounding.
    fn ceil_tick(&self, at: Instant) -> u64 {
        let nanos = at.saturating_duration_since(self.start).as_nanos();
        u64::try_from(nanos.div_ceil(self.tick_nanos)).unwrap_or(u64::MAX)
    }

    /// The instant at which tick `tick` begins, or `None` if it is not representable.
    fn tick_start(&self, tick: u64) -> Option<Instant> {
        let nanos = self.tick_nanos.checked_mul(u128::from(tick))?;
        let secs = u64::try_from(nanos / NANOS_PER_SEC).ok()?;
        // The remainder is below 10^9, so it fits in u32.
        let subsec = (nanos % NANOS_PER_SEC) as u32;
        self.start.checked_add(Duration::new(secs, subsec))
    }

    fn bucket_of(&self, tick: u64) -> usize {
        // The mask is below the bucket count, so the result fits in usize.
        (tick & self.mask) as usize
    }

    // ---- slab and lists -----------------------------------------------------------------

    /// Takes a node from the free list (or grows the slab) and fills it. Not yet linked.
    fn alloc(&mut self, value: T, due: u64) -> NodeId {
        match self.free_head {
            Some(index) => {
                let node = &mut self.nodes[index];
                self.free_head = node.next;
                node.value = Some(value);
                node.due = due;
                node.prev = None;
                node.next = None;
                index
            }
            None => {
                self.nodes.push(Node {
                    generation: 0,
                    value: Some(value),
                    due,
                    prev: None,
                    next: None,
                });
                NodeId::new(self.nodes.len() - 1)
            }
        }
    }

    /// Puts an unlinked node on the free list and returns the value it held (`None` only if the
    /// node was already free, which callers rule out before unlinking).
    fn free(&mut self, index: NodeId) -> Option<T> {
        let node = &mut self.nodes[index];
        // Invariant 5: from here on, handles issued for this occupant are stale.
        node.generation = node.generation.wrapping_add(1);
        node.prev = None;
        node.next = self.free_head;
        self.free_head = Some(index);
        let value = node.value.take();
        if value.is_some() {
            self.len -= 1;
        }
        value
    }

    /// Pushes a filled node onto the head of its bucket's list.
    fn link(&mut self, index: NodeId) {
        let due = self.nodes[index].due;
        let bucket = self.bucket_of(due);
        let old_head = self.buckets[bucket].head;
        self.nodes[index].prev = None;
        self.nodes[index].next = old_head;
        if let Some(head) = old_head {
            self.nodes[head].prev = Some(index);
        }
        let bucket = &mut self.buckets[bucket];
        bucket.head = Some(index);
        bucket.earliest = bucket.earliest.min(due);
    }

    /// Removes a pending node from its bucket's list in O(1), using its prev/next links.
    fn unlink(&mut self, index: NodeId) {
        let Node {
            prev, next, due, ..
        } = self.nodes[index];
        let bucket = self.bucket_of(due);
        match prev {
            Some(prev) => self.nodes[prev].next = next,
            None => self.buckets[bucket].head = next,
        }
        if let Some(next) = next {
            self.nodes[next].prev = prev;
        }
        if self.buckets[bucket].head.is_none() {
            // Cheap to keep exact here; a non-empty bucket keeps its (maybe stale) bound.
            self.buckets[bucket].earliest = u64::MAX;
        }
    }

    /// Walks one bucket, hands every node due by `target` to `fired` (with its due tick) and
    /// recomputes the bucket's exact `earliest` from the nodes that stay.
    fn drain_bucket(&mut self, bucket: usize, target: u64, mut fired: impl FnMut(u64, T)) {
        let mut earliest = u64::MAX;
        let mut cursor = self.buckets[bucket].head;
        while let Some(index) = cursor {
            let node = &self.nodes[index];
            cursor = node.next;
            let due = node.due;
            if due <= target {
                self.unlink(index);
                if let Some(value) = self.free(index) {
                    fired(due, value);
                }
            } else {
                earliest = earliest.min(due);
            }
        }
        self.buckets[bucket].earliest = earliest;
    }
}

impl<T> TimerWheel<T> {
    /// Bytes of one node holding a `T`: a server keeps one per connection (its heartbeat), so
    /// tests bound it with the server's value type.
    #[cfg(test)]
    pub(crate) fn node_bytes() -> usize {
        std::mem::size_of::<Node<T>>()
    }
}

impl<T> fmt::Debug for TimerWheel<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TimerWheel")
            .field("tick", &self.tick)
            .field("slots", &self.buckets.len())
            .field("cursor", &self.cursor)
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, HashMap};

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    impl<T> TimerWheel<T> {
        /// Walks every list and the free list and checks the invariants in the module doc.
        fn assert_invariants(&self) {
            let mut pending = 0;
            for (b, bucket) in self.buckets.iter().enumerate() {
                let mut prev = None;
                let mut cursor = bucket.head;
                let mut min_due = u64::MAX;
                while let Some(i) = cursor {
                    let node = &self.nodes[i];
                    assert!(node.value.is_some(), "free node {i} linked in bucket {b}");
                    assert_eq!(node.prev, prev, "broken back link at node {i}");
                    assert!(node.due > self.cursor, "invariant 1: node {i} is overdue");
                    assert_eq!(self.bucket_of(node.due), b, "invariant 2: node {i}");
                    min_due = min_due.min(node.due);
                    pending += 1;
                    prev = Some(i);
                    cursor = node.next;
                }
                assert!(
                    bucket.earliest <= min_due,
                    "invariant 3: bound above minimum"
                );
                assert!(
                    bucket.earliest > self.cursor,
                    "invariant 3: bound at or below cursor"
                );
                if bucket.head.is_none() {
                    assert_eq!(bucket.earliest, u64::MAX, "invariant 3: empty bucket");
                }
            }
            assert_eq!(pending, self.len, "invariant 4: len");
            let mut free = 0;
            let mut cursor = self.free_head;
            while let Some(i) = cursor {
                assert!(
                    self.nodes[i].value.is_none(),
                    "pending node {i} on free list"
                );
                free += 1;
                cursor = self.nodes[i].next;
            }
            assert_eq!(pending + free, self.nodes.len(), "invariant 4: lost nodes");
        }
    }

    /// One step of a scripted scenario; times are milliseconds after the wheel's start.
    #[derive(Clone, Copy, Debug)]
    enum Step {
        /// Arm timer `name` (its value is the name) with this deadline.
        Arm(&'static str, u64),
        /// Cancel timer `name`; `true` if it should still have been pending.
        Cancel(&'static str, bool),
        /// `expire` at this time; exactly these timers must come out, in tick order.
        Expire(u64, &'static [&'static str]),
        /// `next_timeout` at this time must give this many ms (`None`: no timers).
        NextTimeout(u64, Option<u64>),
    }
    use Step::*;

    /// Runs a scenario on a wheel with a `tick_ms` tick and `slots` buckets.
    fn check(name: &str, tick_ms: u64, slots: usize, steps: &[Step]) {
        let start = Instant::now();
        let mut wheel = TimerWheel::new(ms(tick_ms), slots, start);
        let mut handles = HashMap::new();
        // The tick each timer is due at, by the documented rule, to check the order of `out`.
        let mut due_tick = HashMap::new();
        let mut last_tick = 0;
        let mut out = Vec::new();
        for (i, &step) in steps.iter().enumerate() {
            let at = format!("{name}: step {i} {step:?}");
            match step {
                Arm(timer, deadline) => {
                    handles.insert(timer, wheel.arm(start + ms(deadline), timer));
                    due_tick.insert(timer, deadline.div_ceil(tick_ms).max(last_tick + 1));
                }
                Cancel(timer, pending) => {
                    let expected = if pending { Some(timer) } else { None };
                    assert_eq!(wheel.cancel(handles[timer]), expected, "{at}");
                }
                Expire(now, expected) => {
                    out.clear();
                    wheel.expire(start + ms(now), &mut out);
                    let mut got = out.clone();
                    got.sort_unstable();
                    let mut want = expected.to_vec();
                    want.sort_unstable();
                    assert_eq!(got, want, "{at}: fired set");
                    let ticks: Vec<u64> = out.iter().map(|t| due_tick[t]).collect();
                    assert!(ticks.is_sorted(), "{at}: not in tick order: {out:?}");
                    last_tick = last_tick.max(now / tick_ms);
                }
                NextTimeout(now, expected) => {
                    assert_eq!(
                        wheel.next_timeout(start + ms(now)),
                        expected.map(ms),
                        "{at}"
                    );
                }
            }
            wheel.assert_invariants();
        }
    }

    #[test]
    fn fires_at_the_first_tick_boundary_at_or_after_the_deadline() {
        let cases: &[(&str, &[Step])] = &[
            (
                "mid-tick deadline waits for the boundary",
                &[
                    Arm("a", 50),
                    Expire(0, &[]),
                    Expire(99, &[]),
                    Expire(100, &["a"]),
                ],
            ),
            (
                "deadline on a boundary fires at it",
                &[Arm("a", 200), Expire(199, &[]), Expire(200, &["a"])],
            ),
            (
                "just past a boundary is almost one tick late, not more",
                &[Arm("a", 101), Expire(199, &[]), Expire(200, &["a"])],
            ),
            (
                "deadline at start fires at the first boundary",
                &[
                    Arm("a", 0),
                    Expire(0, &[]),
                    Expire(50, &[]),
                    Expire(100, &["a"]),
                ],
            ),
            (
                "fires once",
                &[Arm("a", 100), Expire(100, &["a"]), Expire(10_000, &[])],
            ),
            (
                "time going backwards does nothing",
                &[
                    Arm("a", 300),
                    Expire(250, &[]),
                    Expire(100, &[]),
                    Expire(300, &["a"]),
                ],
            ),
        ];
        for (name, steps) in cases {
            check(name, 100, 8, steps);
        }
    }

    #[test]
    fn past_deadlines_fire_at_the_next_tick() {
        let cases: &[(&str, &[Step])] = &[
            (
                "deadline long past",
                &[
                    Expire(1050, &[]),
                    Arm("a", 200),
                    Expire(1099, &[]),
                    Expire(1100, &["a"]),
                ],
            ),
            (
                "deadline inside the cursor's tick",
                &[
                    Expire(1000, &[]),
                    Arm("a", 1000),
                    Arm("b", 1050),
                    Expire(1099, &[]),
                    Expire(1100, &["a", "b"]),
                ],
            ),
            (
                "a late expire fires a past deadline at once",
                &[Expire(1000, &[]), Arm("a", 500), Expire(5000, &["a"])],
            ),
            (
                "overdue timer makes next_timeout zero",
                &[Arm("a", 100), NextTimeout(500, Some(0))],
            ),
        ];
        for (name, steps) in cases {
            check(name, 100, 8, steps);
        }
    }

    #[test]
    fn many_timers_share_a_bucket() {
        let cases: &[(&str, usize, &[Step])] = &[
            (
                "same tick",
                8,
                &[
                    Arm("a", 110),
                    Arm("b", 150),
                    Arm("c", 199),
                    Arm("d", 200),
                    Expire(199, &[]),
                    Expire(200, &["a", "b", "c", "d"]),
                ],
            ),
            (
                "same bucket, different revolutions",
                4,
                &[
                    Arm("a", 100),
                    Arm("b", 500),
                    Arm("c", 900),
                    Expire(100, &["a"]),
                    Expire(499, &[]),
                    Expire(500, &["b"]),
                    Expire(899, &[]),
                    Expire(900, &["c"]),
                ],
            ),
            (
                "one bucket for everything",
                1,
                &[
                    Arm("c", 300),
                    Arm("a", 100),
                    Arm("b", 200),
                    Expire(100, &["a"]),
                    Expire(300, &["b", "c"]),
                ],
            ),
        ];
        for (name, slots, steps) in cases {
            check(name, 100, *slots, steps);
        }
    }

    #[test]
    fn expires_in_tick_order() {
        let cases: &[(&str, usize, &[Step])] = &[
            (
                "within one revolution",
                8,
                &[
                    Arm("c", 300),
                    Arm("a", 100),
                    Arm("b", 200),
                    Expire(300, &["a", "b", "c"]),
                ],
            ),
            (
                "across a gap of several revolutions",
                4,
                &[
                    Arm("c", 1100),
                    Arm("a", 100),
                    Arm("e", 3000),
                    Arm("b", 500),
                    Arm("d", 1150),
                    Expire(2000, &["a", "b", "c", "d"]),
                    Expire(3000, &["e"]),
                ],
            ),
        ];
        for (name, slots, steps) in cases {
            check(name, 100, *slots, steps);
        }
    }

    #[test]
    fn far_timers_survive_passes_of_their_bucket() {
        // 4 buckets of 100 ms: one revolution is 400 ms.
        let cases: &[(&str, &[Step])] = &[
            (
                "stepping one tick at a time",
                &[
                    Arm("a", 500),
                    Expire(100, &[]),
                    Expire(200, &[]),
                    Expire(300, &[]),
                    Expire(400, &[]),
                    Expire(499, &[]),
                    Expire(500, &["a"]),
                ],
            ),
            (
                "five revolutions, one revolution at a time",
                &[
                    Arm("a", 2050),
                    Expire(400, &[]),
                    Expire(800, &[]),
                    Expire(1200, &[]),
                    Expire(1600, &[]),
                    Expire(2000, &[]),
                    Expire(2099, &[]),
                    Expire(2100, &["a"]),
                ],
            ),
            (
                "next_timeout sees beyond one revolution",
                &[
                    Arm("a", 1000),
                    NextTimeout(0, Some(1000)),
                    NextTimeout(300, Some(700)),
                ],
            ),
        ];
        for (name, steps) in cases {
            check(name, 100, 4, steps);
        }
    }

    #[test]
    fn long_gaps_between_expire_calls() {
        // 4 buckets of 100 ms: one revolution is 400 ms.
        let cases: &[(&str, &[Step])] = &[
            (
                "exactly one revolution",
                &[
                    Arm("a", 100),
                    Arm("b", 400),
                    Arm("c", 500),
                    Expire(400, &["a", "b"]),
                    Expire(500, &["c"]),
                ],
            ),
            (
                "one revolution and one tick",
                &[
                    Arm("a", 100),
                    Arm("b", 400),
                    Arm("c", 500),
                    Arm("d", 600),
                    Expire(500, &["a", "b", "c"]),
                    Expire(600, &["d"]),
                ],
            ),
            (
                "a thousand revolutions: due timers fire once, later ones on time",
                &[
                    Arm("a", 150),
                    Arm("b", 1_000),
                    Arm("c", 10_000),
                    Arm("d", 400_050),
                    Arm("e", 400_100),
                    Arm("f", 400_200),
                    Expire(400_000, &["a", "b", "c"]),
                    Expire(400_099, &[]),
                    Expire(400_100, &["d", "e"]),
                    Expire(400_199, &[]),
                    Expire(400_200, &["f"]),
                ],
            ),
            (
                "arming after a gap rounds against the new cursor",
                &[
                    Expire(1_000_000, &[]),
                    Arm("a", 1_000_000),
                    Arm("b", 1_000_150),
                    NextTimeout(1_000_000, Some(100)),
                    Expire(1_000_100, &["a"]),
                    Expire(1_000_200, &["b"]),
                ],
            ),
        ];
        for (name, steps) in cases {
            check(name, 100, 4, steps);
        }
    }

    #[test]
    fn cancel() {
        let cases: &[(&str, &[Step])] = &[
            (
                "before expiry: it never fires, its bucket-mates do",
                &[
                    Arm("a", 100),
                    Arm("b", 100),
                    Cancel("a", true),
                    Expire(100, &["b"]),
                ],
            ),
            (
                "after expiry: None, and nothing else changes",
                &[
                    Arm("a", 100),
                    Arm("b", 200),
                    Expire(100, &["a"]),
                    Cancel("a", false),
                    Expire(200, &["b"]),
                ],
            ),
            (
                "twice: the second is None",
                &[
                    Arm("a", 100),
                    Cancel("a", true),
                    Cancel("a", false),
                    Expire(1000, &[]),
                ],
            ),
            (
                "stale handle does not touch the node's next occupant",
                &[
                    Arm("a", 100),
                    Cancel("a", true),
                    Arm("b", 200),
                    Cancel("a", false),
                    Expire(200, &["b"]),
                ],
            ),
            (
                // Nodes are pushed at the head, so "c" is the list head and "a" its tail.
                "list head",
                &[
                    Arm("a", 100),
                    Arm("b", 100),
                    Arm("c", 100),
                    Cancel("c", true),
                    Expire(100, &["a", "b"]),
                ],
            ),
            (
                "list middle",
                &[
                    Arm("a", 100),
                    Arm("b", 100),
                    Arm("c", 100),
                    Cancel("b", true),
                    Expire(100, &["a", "c"]),
                ],
            ),
            (
                "list tail",
                &[
                    Arm("a", 100),
                    Arm("b", 100),
                    Arm("c", 100),
                    Cancel("a", true),
                    Expire(100, &["b", "c"]),
                ],
            ),
            (
                "a far timer",
                &[
                    Arm("a", 5_000),
                    Expire(1_000, &[]),
                    Cancel("a", true),
                    Expire(10_000, &[]),
                ],
            ),
        ];
        for (name, steps) in cases {
            check(name, 100, 8, steps);
        }
    }

    /// The handle a connection keeps is 8 bytes, a list link 4 (the node itself is bounded
    /// with the server's value type, `server::connection`'s size test).
    #[test]
    fn a_handle_and_a_link_stay_small() {
        use std::mem::size_of;
        assert_eq!(size_of::<TimerHandle>(), 8);
        assert_eq!(size_of::<Option<NodeId>>(), 4);
    }

    #[test]
    fn next_timeout() {
        let cases: &[(&str, &[Step])] = &[
            ("no timers", &[NextTimeout(0, None)]),
            (
                "until the boundary of the earliest timer",
                &[
                    Arm("b", 1000),
                    Arm("a", 250),
                    NextTimeout(0, Some(300)),
                    NextTimeout(120, Some(180)),
                    NextTimeout(300, Some(0)),
                ],
            ),
            (
                "after an expire",
                &[
                    Arm("a", 100),
                    Arm("b", 300),
                    Expire(100, &["a"]),
                    NextTimeout(150, Some(150)),
                ],
            ),
            (
                "cancel that empties a bucket is exact",
                &[
                    Arm("a", 100),
                    Arm("b", 300),
                    Cancel("a", true),
                    NextTimeout(0, Some(300)),
                ],
            ),
            (
                // Documented behaviour: the bucket's bound stays at "a" until expire walks it, so
                // the reactor wakes once for nothing; it is never told to sleep past "b".
                "cancel in a shared bucket may wake early, never late",
                &[
                    Arm("a", 100),
                    Arm("b", 900),
                    Cancel("a", true),
                    NextTimeout(0, Some(100)),
                    Expire(100, &[]),
                    NextTimeout(100, Some(800)),
                ],
            ),
            (
                "all cancelled",
                &[Arm("a", 100), Cancel("a", true), NextTimeout(0, None)],
            ),
        ];
        for (name, steps) in cases {
            check(name, 100, 8, steps);
        }
    }

    #[test]
    fn slots_round_up_to_a_power_of_two() {
        let start = Instant::now();
        for (slots, expected) in [(0, 1), (1, 1), (3, 4), (500, 512), (512, 512), (513, 1024)] {
            let wheel: TimerWheel<()> = TimerWheel::new(ms(100), slots, start);
            assert_eq!(wheel.slots(), expected, "slots {slots}");
            assert_eq!(wheel.tick(), ms(100));
        }
    }

    #[test]
    fn freed_nodes_are_reused() {
        let start = Instant::now();
        let mut wheel = TimerWheel::new(ms(100), 8, start);
        let mut out = Vec::new();
        for round in 0..100u64 {
            let handles: Vec<_> = (0..10).map(|i| wheel.arm(start + ms(i * 100), i)).collect();
            for &h in &handles[..5] {
                assert!(wheel.cancel(h).is_some());
            }
            wheel.expire(start + ms(round * 10_000 + 5_000), &mut out);
            assert!(wheel.is_empty(), "round {round}");
        }
        assert_eq!(
            wheel.nodes.len(),
            10,
            "the slab grows to the peak, not the total"
        );
        wheel.assert_invariants();
    }

    #[test]
    fn generation_wraps_without_reviving_stale_handles() {
        let start = Instant::now();
        let mut wheel = TimerWheel::new(ms(100), 8, start);
        let first = wheel.arm(start + ms(100), "first");
        assert_eq!(wheel.cancel(first), Some("first"));
        // Fast-forward this node to the last generation before the wrap.
        wheel.nodes[first.index].generation = u32::MAX;
        let before_wrap = wheel.arm(start + ms(100), "before wrap");
        assert_eq!(before_wrap.index, first.index);
        let mut out = Vec::new();
        wheel.expire(start + ms(100), &mut out);
        assert_eq!(out, ["before wrap"]);
        let after_wrap = wheel.arm(start + ms(300), "after wrap");
        assert_eq!(after_wrap.index, first.index);
        assert_eq!(after_wrap.generation, 0, "wrapped, no overflow panic");
        assert_eq!(wheel.cancel(before_wrap), None);
        assert_eq!(wheel.cancel(after_wrap), Some("after wrap"));
        wheel.assert_invariants();
    }

    #[test]
    fn extreme_instants_saturate_instead_of_overflowing() {
        let start = Instant::now();
        let mut wheel = TimerWheel::new(Duration::from_nanos(1), 8, start);
        // Far enough that the tick count does not fit in u64.
        let far = start + Duration::from_secs(u64::MAX / 4);
        let handle = wheel.arm(far, "far");
        let mut out = Vec::new();
        wheel.expire(start + Duration::from_secs(3600), &mut out);
        assert!(out.is_empty());
        assert!(wheel.next_timeout(start).is_some());
        assert_eq!(wheel.cancel(handle), Some("far"));
        // Before `start` counts as tick 0.
        let early = wheel.arm(start - ms(1), "early");
        assert_eq!(wheel.cancel(early), Some("early"));
        wheel.assert_invariants();
    }

    // ---- property test against a sorted model ---------------------------------------------

    #[derive(Clone, Debug)]
    enum Op {
        /// Arm a timer this many ms after the current time (negative: in the past).
        Arm(i64),
        /// Cancel the n-th handle ever returned (modulo their count); may be stale.
        Cancel(usize),
        /// Move time forward by this many ms and call expire.
        Advance(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (-300i64..3_000).prop_map(Op::Arm),
            2 => any::<usize>().prop_map(Op::Cancel),
            3 => (0u64..60).prop_map(Op::Advance),
            1 => (0u64..5_000).prop_map(Op::Advance),
        ]
    }

    /// The model's record of one pending timer, in ms after start.
    #[derive(Clone, Copy, Debug)]
    struct Expected {
        deadline: u64,
        /// The first tick boundary after the tick the wheel was in when this timer was armed:
        /// a past deadline fires there.
        arm_boundary: u64,
    }

    proptest! {
        /// Random arm/cancel/advance sequences against a BTreeMap keyed by due time: the same
        /// timers expire, in tick order, none early, none more than one tick late; `cancel`
        /// agrees on what is pending; `next_timeout` never overshoots.
        #[test]
        fn wheel_agrees_with_a_sorted_model(
            tick_ms in 1u64..20,
            slots in prop::sample::select(vec![1usize, 2, 4, 16]),
            ops in prop::collection::vec(op(), 1..200),
        ) {
            let start = Instant::now();
            let mut wheel = TimerWheel::new(ms(tick_ms), slots, start);
            // (due ms, id) -> what the model knows; due = the boundary the timer waits for.
            let mut model: BTreeMap<(u64, usize), Expected> = BTreeMap::new();
            let mut handles: Vec<(TimerHandle, (u64, usize))> = Vec::new();
            let mut now = 0u64;
            let mut out = Vec::new();
            for op in ops {
                match op {
                    Op::Arm(offset) => {
                        let deadline = now.saturating_add_signed(offset);
                        let arm_boundary = (now / tick_ms + 1) * tick_ms;
                        let due = (deadline.div_ceil(tick_ms) * tick_ms).max(arm_boundary);
                        let id = handles.len();
                        let handle = wheel.arm(start + ms(deadline), id);
                        model.insert((due, id), Expected { deadline, arm_boundary });
                        handles.push((handle, (due, id)));
                    }
                    Op::Cancel(n) => {
                        if !handles.is_empty() {
                            let (handle, key) = handles[n % handles.len()];
                            let expected = model.remove(&key).map(|_| key.1);
                            prop_assert_eq!(wheel.cancel(handle), expected);
                        }
                    }
                    Op::Advance(by) => {
                        now += by;
                        out.clear();
                        wheel.expire(start + ms(now), &mut out);
                        let still_pending = model.split_off(&(now + 1, 0));
                        let fired = std::mem::replace(&mut model, still_pending);
                        let mut got = out.clone();
                        got.sort_unstable();
                        let mut want: Vec<usize> = fired.keys().map(|&(_, id)| id).collect();
                        want.sort_unstable();
                        prop_assert_eq!(&got, &want, "same set at {} ms", now);
                        let dues: Vec<u64> = out.iter().map(|&id| handles[id].1 .0).collect();
                        prop_assert!(dues.is_sorted(), "tick order at {} ms: {:?}", now, dues);
                        for e in fired.values() {
                            prop_assert!(e.deadline <= now, "early: {:?} at {} ms", e, now);
                        }
                        for e in model.values() {
                            prop_assert!(
                                now < (e.deadline + tick_ms).max(e.arm_boundary),
                                "more than one tick late: {:?} at {} ms", e, now
                            );
                        }
                    }
                }
                prop_assert_eq!(wheel.len(), model.len());
                let next = wheel.next_timeout(start + ms(now));
                match model.keys().next() {
                    None => prop_assert_eq!(next, None),
                    Some(&(due, _)) => {
                        let exact = ms(due.saturating_sub(now));
                        prop_assert!(next.is_some_and(|d| d <= exact), "{:?} > {:?}", next, exact);
                    }
                }
                wheel.assert_invariants();
            }
        }
    }
}
