//! Timer wheel micro benchmarks (SPEC §11): arm+cancel with many live timers, and expiry
//! throughput, each against the usual alternative, a binary heap of deadlines.
//!
//! Run: `cargo bench --bench timer`. The interesting figure is the ratio of the two lines in
//! each group, measured in the same run.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashSet, VecDeque};
use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use wsrelay::timer::{TimerHandle, TimerWheel, DEFAULT_SLOTS, DEFAULT_TICK};

/// Deadlines are spread over this span after start: longer than one default revolution (51.2 s),
/// like a server whose heartbeats (30 s) and handshake/pong deadlines (10 s) overlap.
const SPAN_MS: u64 = 60_000;

/// The reference: a min-heap of `(deadline, id)` with lazy cancellation, the way timers are
/// usually done without a wheel. `cancel` only forgets the id; the heap entry is dropped when
/// it reaches the top, or when dead entries outnumber live ones and the heap is compacted
/// (otherwise a cancel-heavy load grows the heap without bound).
struct HeapTimers {
    heap: BinaryHeap<Reverse<(Instant, u64)>>,
    live: HashSet<u64>,
    next_id: u64,
}

impl HeapTimers {
    fn new() -> HeapTimers {
        HeapTimers {
            heap: BinaryHeap::new(),
            live: HashSet::new(),
            next_id: 0,
        }
    }

    fn arm(&mut self, deadline: Instant) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.live.insert(id);
        self.heap.push(Reverse((deadline, id)));
        id
    }

    fn cancel(&mut self, id: u64) -> bool {
        let was_live = self.live.remove(&id);
        if self.heap.len() > 2 * self.live.len() + 1024 {
            let live = &self.live;
            self.heap.retain(|Reverse((_, id))| live.contains(id));
        }
        was_live
    }

    fn expire(&mut self, now: Instant, out: &mut Vec<u64>) {
        while let Some(&Reverse((deadline, id))) = self.heap.peek() {
            if deadline > now {
                break;
            }
            self.heap.pop();
            if self.live.remove(&id) {
                out.push(id);
            }
        }
    }
}

/// A small deterministic xorshift generator, so both structures see the same deadlines.
struct Rng(u64);

impl Rng {
    fn next_ms(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % SPAN_MS
    }
}

fn deadline(start: Instant, rng: &mut Rng) -> Instant {
    start + Duration::from_millis(rng.next_ms())
}

/// Steady state with `live` pending timers: each iteration cancels the oldest timer and arms a
/// new one at a random deadline, so the count stays at `live`.
fn arm_cancel(c: &mut Criterion) {
    let mut group = c.benchmark_group("timer/arm+cancel");
    for live in [10_000usize, 100_000] {
        let start = Instant::now();

        group.bench_function(BenchmarkId::new("wheel", live), |b| {
            let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
            let mut wheel = TimerWheel::new(DEFAULT_TICK, DEFAULT_SLOTS, start);
            let mut ring: VecDeque<TimerHandle> = (0..live as u64)
                .map(|id| wheel.arm(deadline(start, &mut rng), id))
                .collect();
            let mut id = live as u64;
            b.iter(|| {
                if let Some(oldest) = ring.pop_front() {
                    black_box(wheel.cancel(oldest));
                }
                ring.push_back(wheel.arm(deadline(start, &mut rng), id));
                id += 1;
            });
        });

        group.bench_function(BenchmarkId::new("heap", live), |b| {
            let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
            let mut heap = HeapTimers::new();
            let mut ring: VecDeque<u64> = (0..live)
                .map(|_| heap.arm(deadline(start, &mut rng)))
                .collect();
            b.iter(|| {
                if let Some(oldest) = ring.pop_front() {
                    black_box(heap.cancel(oldest));
                }
                ring.push_back(heap.arm(deadline(start, &mut rng)));
            });
        });
    }
    group.finish();
}

/// Expiry throughput: 100k timers over 60 s, drained by expire calls one tick apart, as the
/// reactor would. Reported per timer fired.
fn expire(c: &mut Criterion) {
    const TIMERS: u64 = 100_000;
    let mut group = c.benchmark_group("timer/expire");
    group.throughput(Throughput::Elements(TIMERS));
    let start = Instant::now();
    let ticks = SPAN_MS / DEFAULT_TICK.as_millis() as u64 + 1;

    group.bench_function(BenchmarkId::new("wheel", TIMERS), |b| {
        b.iter_batched(
            || {
                let mut rng = Rng(0x2545_F491_4F6C_DD1D);
                let mut wheel = TimerWheel::new(DEFAULT_TICK, DEFAULT_SLOTS, start);
                for id in 0..TIMERS {
                    wheel.arm(deadline(start, &mut rng), id);
                }
                (wheel, Vec::with_capacity(TIMERS as usize))
            },
            |(mut wheel, mut out)| {
                for tick in 1..=ticks as u32 {
                    wheel.expire(start + DEFAULT_TICK * tick, &mut out);
                }
                assert_eq!(out.len() as u64, TIMERS);
                (wheel, out)
            },
            BatchSize::LargeInput,
        );
    });

    group.bench_function(BenchmarkId::new("heap", TIMERS), |b| {
        b.iter_batched(
            || {
                let mut rng = Rng(0x2545_F491_4F6C_DD1D);
                let mut heap = HeapTimers::new();
                for _ in 0..TIMERS {
                    heap.arm(deadline(start, &mut rng));
                }
                (heap, Vec::with_capacity(TIMERS as usize))
            },
            |(mut heap, mut out)| {
                for tick in 1..=ticks as u32 {
                    heap.expire(start + DEFAULT_TICK * tick, &mut out);
                }
                assert_eq!(out.len() as u64, TIMERS);
                (heap, out)
            },
            BatchSize::LargeInput,
        );
    });
    group.finish();
}

criterion_group! {
    name = benches;
    // Short runs: the build machine is shared, and the ratios are stable well before this.
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = arm_cancel, expire
}
criterion_main!(benches);
