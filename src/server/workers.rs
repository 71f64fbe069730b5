//! Several reactors in one process: `--workers N` (SPEC §14).
//!
//! Owns: what the workers share, and nothing else: `Shared` (the process-wide connection count
//! that `--max-connections` is checked against, one `WorkerGauges` per worker, which the
//! per-worker section of /metrics is rendered from, and one scrape queue per worker, through
//! which a worker answering /metrics or /stats.json gathers the others' figures, `scrape.rs`),
//! `WorkerSlot` (one worker's handle on them), and `reuseport_listeners` (one listening socket
//! per worker on the same port).
//! Does not: run a loop (each worker is an ordinary `Reactor` on its own thread, started by the
//! command line), carry messages between workers (the bus for raw rooms is the app's,
//! `app/raw_bus.rs`; for `/ws` the engine's, `engine/bus/`), or decide anything about
//! connections.
//!
//! # Why nothing is shared on the hot path
//!
//! Each worker is today's single-threaded reactor: its own poller, listener, slab, timer wheel,
//! buffers and hub. What the workers touch together is written at accept and close (the
//! connection count, an atomic add) and once per loop iteration (the gauges: a handful of
//! relaxed stores into the worker's own cache line, which no other worker writes), never per
//! message. A reactor built without a `WorkerSlot` (`--workers 1`) has none of it: the only
//! trace is a `None` checked once per iteration and once per accept and close.
//!
//! # How connections are spread
//!
//! Linux: every worker has its own listening socket bound to the same address with
//! `SO_REUSEPORT`, and the kernel spreads new connections over them by a hash of the
//! connection's addresses and ports (docs/operations.md, "Workers"). That hash knows nothing of
//! load: the spread is even only on average, and a worker that stops accepting (shutdown) loses
//! what was waiting in its own queue. Elsewhere `--workers` above 1 is refused (a single
//! accepting thread handing sockets over is not built yet).

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use super::handler::ServerEndpoint;
use super::metrics::Metrics;
use crate::poller::waker::Waker;

/// What every worker of one process shares.
#[derive(Debug)]
pub struct Shared {
    /// `--max-connections`, for the whole process (lowered by a worker whose poller cannot
    /// watch that many descriptors, see `WorkerSlot::cap`).
    max_connections: AtomicUsize,
    /// Connections admitted (not the ones admitted only to be told 503) over every worker.
    open: AtomicUsize,
    /// One per worker, by index.
    gauges: Box<[WorkerGauges]>,
    /// One per worker, by index: what other workers ask of it for /metrics and /stats.json,
    /// and what they answer to its own questions (`scrape.rs`).
    inboxes: Box<[ScrapeInbox]>,
}

/// One worker's queue of scrape messages. Used only while a scrape is answered (never per
/// message), so a lock is the plain choice; `pending` lets the worker's every other wake-up
/// skip the lock.
#[derive(Debug, Default)]
struct ScrapeInbox {
    queue: Mutex<Vec<ScrapeMessage>>,
    /// Set with every message queued, cleared by the worker as it takes them.
    pending: AtomicBool,
    /// The worker's waker (the one the bus between workers rings too, `app/raw_bus.rs`), set
    /// once when the bus is built. A worker without one is still asked; it just does not
    /// answer before the deadline, and the scrape says so.
    waker: OnceLock<Waker>,
}

/// What crosses between workers for a process-wide /metrics or /stats.json (`scrape.rs`).
#[derive(Debug)]
pub enum ScrapeMessage {
    /// Worker `from` is answering its scrape number `id` and asks for this worker's figures.
    Ask {
        from: usize,
        id: u32,
        endpoint: ServerEndpoint,
    },
    /// Worker `from`'s figures, for scrape `id` of the worker they are posted to.
    Figures {
        from: usize,
        id: u32,
        figures: Figures,
    },
}

/// One worker's own figures for one endpoint.
#[derive(Debug)]
pub enum Figures {
    /// Its /metrics families (Prometheus text), without the per-worker section.
    Metrics(String),
    /// Its /stats.json fields.
    Stats(Vec<(&'static str, u64)>),
}

/// One worker's figures, read by whichever worker answers /metrics or /stats.json. Written by
/// that worker only, except `bus_depth`, which the workers that post to its queue raise.
/// Aligned to its own cache line (128 bytes covers the adjacent-line
/// prefetcher too), so one worker's stores never invalidate another's line.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct WorkerGauges {
    /// Sockets the worker holds, in any state.
    pub connections: AtomicU64,
    /// The counters of the same names in the worker's `Metrics`, as of its last publish.
    pub loop_iterations: AtomicU64,
    pub accepted: AtomicU64,
    pub messages_in: AtomicU64,
    pub messages_out: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    /// The bus (`app/raw_bus.rs`): messages this worker put on other workers' queues, took
    /// off its own, and could not put because the target's queue was full (dropped, counted).
    pub bus_sent: AtomicU64,
    pub bus_received: AtomicU64,
    pub bus_drops: AtomicU64,
    /// Messages waiting in this worker's own queue: raised by the senders, lowered by this
    /// worker as it takes them.
    pub bus_depth: AtomicU64,
    /// (room, other worker with members there) pairs this worker knows of.
    pub bus_remote_rooms: AtomicU64,
}

/// One worker's figures at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub connections: u64,
    pub loop_iterations: u64,
    pub accepted: u64,
    pub messages_in: u64,
    pub messages_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub bus_sent: u64,
    pub bus_received: u64,
    pub bus_drops: u64,
    pub bus_depth: u64,
    pub bus_remote_rooms: u64,
}

impl Snapshot {
    fn add(&mut self, other: &Snapshot) {
        self.connections += other.connections;
        self.loop_iterations += other.loop_iterations;
        self.accepted += other.accepted;
        self.messages_in += other.messages_in;
        self.messages_out += other.messages_out;
        self.bytes_in += other.bytes_in;
        self.bytes_out += other.bytes_out;
        self.bus_sent += other.bus_sent;
        self.bus_received += other.bus_received;
        self.bus_drops += other.bus_drops;
        self.bus_depth += other.bus_depth;
        self.bus_remote_rooms += other.bus_remote_rooms;
    }
}

impl Shared {
    /// What `workers` reactors share, with `--max-connections` for them all.
    pub fn new(workers: usize, max_connections: usize) -> Arc<Shared> {
        Arc::new(Shared {
            max_connections: AtomicUsize::new(max_connections),
            open: AtomicUsize::new(0),
            gauges: (0..workers).map(|_| WorkerGauges::default()).collect(),
            inboxes: (0..workers).map(|_| ScrapeInbox::default()).collect(),
        })
    }

    /// Gives worker `index`'s waker to the others, so that a scrape can wake it (the bus
    /// between workers calls this once per worker as it builds the wakers, `app/raw_bus.rs`).
    /// A second call for the same worker changes nothing.
    ///
    /// # Panics
    /// `index` is not below `workers()`.
    pub fn set_waker(&self, index: usize, waker: Waker) {
        let _ = self.inboxes[index].waker.set(waker);
    }

    /// How many workers share this.
    pub fn workers(&self) -> usize {
        self.gauges.len()
    }

    /// The handle worker `index` gives its reactor (`Reactor::join_workers`).
    ///
    /// # Panics
    /// `index` is not below `workers()` (a bug in the caller, not a client's doing).
    pub fn slot(self: &Arc<Shared>, index: usize) -> WorkerSlot {
        assert!(
            index < self.workers(),
            "worker {index} of {}",
            self.workers()
        );
        WorkerSlot {
            index,
            shared: Arc::clone(self),
        }
    }

    /// Worker `index`'s gauges (the bus writes its own counters there directly).
    ///
    /// # Panics
    /// `index` is not below `workers()`.
    pub fn gauges(&self, index: usize) -> &WorkerGauges {
        &self.gauges[index]
    }

    /// Every worker's figures as last published, by index.
    pub fn snapshots(&self) -> Vec<Snapshot> {
        self.gauges
            .iter()
            .map(|g| Snapshot {
                connections: g.connections.load(Ordering::Relaxed),
                loop_iterations: g.loop_iterations.load(Ordering::Relaxed),
                accepted: g.accepted.load(Ordering::Relaxed),
                messages_in: g.messages_in.load(Ordering::Relaxed),
                messages_out: g.messages_out.load(Ordering::Relaxed),
                bytes_in: g.bytes_in.load(Ordering::Relaxed),
                bytes_out: g.bytes_out.load(Ordering::Relaxed),
                bus_sent: g.bus_sent.load(Ordering::Relaxed),
                bus_received: g.bus_received.load(Ordering::Relaxed),
                bus_drops: g.bus_drops.load(Ordering::Relaxed),
                bus_depth: g.bus_depth.load(Ordering::Relaxed),
                bus_remote_rooms: g.bus_remote_rooms.load(Ordering::Relaxed),
            })
            .collect()
    }
}

/// One worker's handle on what the workers share.
#[derive(Debug)]
pub struct WorkerSlot {
    index: usize,
    shared: Arc<Shared>,
}

impl WorkerSlot {
    pub fn index(&self) -> usize {
        self.index
    }

    pub fn shared(&self) -> &Shared {
        &self.shared
    }

    /// Takes one place under the process-wide `--max-connections`, if one is free. The check
    /// and the increment are one atomic step, so two workers accepting at once cannot both
    /// take the last place.
    pub fn try_admit(&self) -> bool {
        self.shared
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
                (open < self.shared.max_connections.load(Ordering::Relaxed)).then_some(open + 1)
            })
            .is_ok()
    }

    /// Lowers the process-wide `--max-connections` to what this worker's poller can watch
    /// (select(2): descriptors are numbered per process, so one cap holds for every worker).
    pub fn cap(&self, max_connections: usize) {
        self.shared
            .max_connections
            .fetch_min(max_connections, Ordering::Relaxed);
    }

    /// Gives back a place taken by `try_admit` (the connection closed).
    pub fn release(&self) {
        self.shared.open.fetch_sub(1, Ordering::AcqRel);
    }

    /// Queues `message` for worker `to` and wakes it. Never blocks on anything but the lock of
    /// that worker's queue, which is held for a push or a take only.
    ///
    /// # Panics
    /// `to` is not below `workers()`.
    pub fn post(&self, to: usize, message: ScrapeMessage) {
        let inbox = &self.shared.inboxes[to];
        {
            // A worker that panicked while holding the lock left a queue that is still whole.
            let mut queue = inbox.queue.lock().unwrap_or_else(PoisonError::into_inner);
            queue.push(message);
            inbox.pending.store(true, Ordering::Release);
        }
        if let Some(waker) = inbox.waker.get() {
            waker.wake();
        }
    }

    /// Takes every scrape message waiting for this worker (after its waker was drained, in
    /// that order, as `poller/waker.rs` explains). Costs one atomic swap when there is none.
    pub fn take_messages(&self) -> Vec<ScrapeMessage> {
        let inbox = &self.shared.inboxes[self.index];
        if !inbox.pending.swap(false, Ordering::AcqRel) {
            return Vec::new();
        }
        let mut queue = inbox.queue.lock().unwrap_or_else(PoisonError::into_inner);
        std::mem::take(&mut *queue)
    }

    /// Publishes this worker's figures (once per loop iteration, and before rendering).
    pub fn publish(&self, connections: usize, metrics: &Metrics) {
        let g = &self.shared.gauges[self.index];
        g.connections.store(connections as u64, Ordering::Relaxed);
        g.loop_iterations
            .store(metrics.loop_iterations, Ordering::Relaxed);
        g.accepted.store(metrics.accepted, Ordering::Relaxed);
        g.messages_in.store(metrics.messages_in, Ordering::Relaxed);
        g.messages_out
            .store(metrics.messages_out, Ordering::Relaxed);
        g.bytes_in.store(metrics.bytes_in, Ordering::Relaxed);
        g.bytes_out.store(metrics.bytes_out, Ordering::Relaxed);
    }

    /// The process totals: every worker's figures summed.
    pub fn totals(&self) -> Snapshot {
        sum(&self.shared.snapshots())
    }

    /// Appends the per-worker gauges and the process totals (Prometheus text), read from what
    /// every worker last published. The other families of /metrics are the workers' own,
    /// merged into process totals by the answering worker (`scrape.rs`, `totals.rs`);
    /// docs/operations.md explains how to read them.
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write;
        let snapshots = self.shared.snapshots();
        let mut family = |name: &str, kind: &str, help: &str, value: &dyn Fn(&Snapshot) -> u64| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (i, s) in snapshots.iter().enumerate() {
                let _ = writeln!(out, "{name}{{worker=\"{i}\"}} {}", value(s));
            }
        };
        family(
            "wsrelay_worker_connections",
            "gauge",
            "Sockets each worker holds, in any state.",
            &|s| s.connections,
        );
        family(
            "wsrelay_worker_loop_iterations_total",
            "counter",
            "Loop iterations of each worker.",
            &|s| s.loop_iterations,
        );
        family(
            "wsrelay_worker_accepted_total",
            "counter",
            "TCP connections each worker accepted.",
            &|s| s.accepted,
        );
        family(
            "wsrelay_worker_messages_in_total",
            "counter",
            "WebSocket data messages each worker received.",
            &|s| s.messages_in,
        );
        family(
            "wsrelay_worker_messages_out_total",
            "counter",
            "WebSocket data messages each worker queued for sending.",
            &|s| s.messages_out,
        );
        family(
            "wsrelay_worker_bus_sent_total",
            "counter",
            "Raw-room messages each worker put on other workers' bus queues.",
            &|s| s.bus_sent,
        );
        family(
            "wsrelay_worker_bus_received_total",
            "counter",
            "Raw-room messages each worker took off its bus queue.",
            &|s| s.bus_received,
        );
        family(
            "wsrelay_worker_bus_drops_total",
            "counter",
            "Raw-room messages each worker dropped because another worker's bus queue was full.",
            &|s| s.bus_drops,
        );
        family(
            "wsrelay_worker_bus_depth",
            "gauge",
            "Messages waiting in each worker's bus queue.",
            &|s| s.bus_depth,
        );
        family(
            "wsrelay_worker_bus_remote_rooms",
            "gauge",
            "(raw room, other worker with members there) pairs each worker knows of.",
            &|s| s.bus_remote_rooms,
        );
        // From the same reading as the per-worker lines, so that the totals are their sums.
        let total = sum(&snapshots);
        let mut gauge = |name: &str, kind: &str, help: &str, value: u64| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            let _ = writeln!(out, "{name} {value}");
        };
        gauge(
            "wsrelay_workers",
            "gauge",
            "Reactor threads in this process (--workers).",
            self.shared.workers() as u64,
        );
        gauge(
            "wsrelay_worker_answering",
            "gauge",
            "The worker that answered this scrape, after gathering every other worker's figures.",
            self.index as u64,
        );
        gauge(
            "wsrelay_process_connections",
            "gauge",
            "Sockets held by all workers.",
            total.connections,
        );
        gauge(
            "wsrelay_process_admitted_connections",
            "gauge",
            "Connections counted against --max-connections, over all workers.",
            self.shared.open.load(Ordering::Relaxed) as u64,
        );
        gauge(
            "wsrelay_process_accepted_total",
            "counter",
            "TCP connections accepted by all workers.",
            total.accepted,
        );
        gauge(
            "wsrelay_process_messages_in_total",
            "counter",
            "WebSocket data messages received by all workers.",
            total.messages_in,
        );
        gauge(
            "wsrelay_process_messages_out_total",
            "counter",
            "WebSocket data messages queued for sending by all workers.",
            total.messages_out,
        );
        gauge(
            "wsrelay_process_bytes_in_total",
            "counter",
            "Bytes read from sockets by all workers.",
            total.bytes_in,
        );
        gauge(
            "wsrelay_process_bytes_out_total",
            "counter",
            "Bytes written to sockets by all workers.",
            total.bytes_out,
        );
    }
}

/// `count` listening sockets on `addr`, every one with `SO_REUSEPORT`, so that the kernel
/// spreads new connections over them. Port 0 picks a free port for the first and binds the
/// others to the same one.
///
/// # Errors
/// The address is taken (by a socket without `SO_REUSEPORT`, or another user's), or invalid.
#[cfg(target_os = "linux")]
pub fn reuseport_listeners(addr: SocketAddr, count: usize) -> io::Result<Vec<TcpListener>> {
    let mut listeners = Vec::with_capacity(count);
    let mut bound = addr;
    for _ in 0..count {
        let listener = super::accept::listen(bound, true)?;
        bound = listener.local_addr()?;
        listeners.push(listener);
    }
    Ok(listeners)
}

/// See the Linux version: elsewhere the kernel does not balance `SO_REUSEPORT` listeners (the
/// BSDs give every connection to the last one bound), so several workers are refused.
#[cfg(not(target_os = "linux"))]
pub fn reuseport_listeners(_addr: SocketAddr, _count: usize) -> io::Result<Vec<TcpListener>> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "--workers above 1 needs Linux (SO_REUSEPORT balancing); use --workers 1",
    ))
}

/// The process's totals of the workers' published figures.
fn sum(snapshots: &[Snapshot]) -> Snapshot {
    let mut total = Snapshot::default();
    for s in snapshots {
        total.add(s);
    }
    total
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn max_connections_is_for_the_whole_process() {
        let shared = Shared::new(2, 3);
        let (a, b) = (shared.slot(0), shared.slot(1));
        assert!(a.try_admit());
        assert!(b.try_admit());
        assert!(a.try_admit());
        assert!(
            !b.try_admit(),
            "the fourth connection of the process is over"
        );
        assert!(!a.try_admit());
        b.release();
        assert!(a.try_admit(), "a close anywhere frees a place everywhere");
    }

    #[test]
    fn totals_sum_every_worker() {
        let shared = Shared::new(3, 10);
        let metrics = Metrics {
            messages_in: 5,
            loop_iterations: 7,
            ..Metrics::default()
        };
        shared.slot(0).publish(2, &metrics);
        shared.slot(2).publish(4, &metrics);
        let total = shared.slot(1).totals();
        assert_eq!(total.connections, 6);
        assert_eq!(total.messages_in, 10);
        assert_eq!(total.loop_iterations, 14);
        let mut text = String::new();
        shared.slot(1).render_metrics(&mut text);
        assert!(text.contains("wsrelay_worker_connections{worker=\"2\"} 4\n"));
        assert!(text.contains("wsrelay_worker_connections{worker=\"1\"} 0\n"));
        assert!(text.contains("wsrelay_worker_answering 1\n"));
        assert!(text.contains("wsrelay_process_messages_in_total 10\n"));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn reuseport_listeners_share_one_port() {
        let listeners = reuseport_listeners("127.0.0.1:0".parse().unwrap(), 3).unwrap();
        let port = listeners[0].local_addr().unwrap().port();
        assert_ne!(port, 0);
        for l in &listeners {
            assert_eq!(l.local_addr().unwrap().port(), port);
        }
    }
}
