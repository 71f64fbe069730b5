//! One thread of the load generator: its own mio `Poll` loop over its share of the
//! connections, from connect to close.
//!
//! Owns: the stages of a run as one thread sees them (open its connections, wait for the go,
//! run the traffic of the mode, drain what is in flight, close), the per-connection windows and
//! the rate limit, and the counting into a `Tally`.
//! Does not: parse flags (`flags.rs`, `plan.rs`), sample the server or print (`coordinator.rs`),
//! or speak the protocol (`client.rs` does, with `protocol/`).
//!
//! SPEC §11. The stages, in order (each bounded in time, so every run ends by itself):
//! 1. Opening: connect and upgrade every connection of this thread, at most `OPEN_BATCH` at a
//!    time, each within `--connect-timeout`; then tell the coordinator this thread is ready.
//! 2. Ready: wait for the coordinator's go (all threads ready).
//! 3. Running: warm-up then the measured window; messages are counted into the window by the
//!    time they are sent or received.
//! 4. Draining: on the coordinator's stop, send nothing new and wait (at most `DRAIN_TIMEOUT`)
//!    for what is in flight.
//! 5. Closing: close handshake on every connection, at most `CLOSE_TIMEOUT`.

use super::client::{Client, Codec, Dial, Failure, State, Step, TlsTarget};
use super::stats::{self, Tally};
use mio::{Events, Interest, Poll, Token};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Connections of one thread in connect or handshake at once while opening: enough to keep
/// the server busy, few enough not to overflow its accept backlog.
pub const OPEN_BATCH: usize = 128;

/// How long the in-flight messages may take to come back after the stop.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// How long the close handshakes may take.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);

/// The longest a thread sleeps in `poll` without looking at the clock and the shared flags.
const TICK: Duration = Duration::from_millis(50);

/// Size of the receive buffer each thread reads into.
const RECV_BUFFER_BYTES: usize = 64 * 1024;

/// The token of the coordinator's waker in every worker's poll.
pub const WAKER: Token = Token(usize::MAX);

/// What the connections of a run do once open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Traffic {
    /// Each connection keeps `window` messages in flight to an echo endpoint.
    Echo,
    /// Senders keep `window` messages in flight each, as seen by their witness.
    Broadcast,
    /// Nothing: connections stay open and quiet.
    Idle,
    /// Each slot loops connect, handshake, close.
    Connect,
}

/// One connection of the plan (in connect mode: one concurrent slot).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnPlan {
    /// The resource name to request (`/echo`, `/r/bench-3`).
    pub resource: String,
    /// The local address to bind, if any.
    pub source: Option<IpAddr>,
    /// Broadcast: the slot (of this thread) whose deliveries credit this sender's window;
    /// `None` for a connection that does not send.
    pub witness: Option<usize>,
}

/// Everything one thread needs, fixed before it starts.
#[derive(Debug)]
pub struct Plan {
    pub traffic: Traffic,
    pub target: SocketAddr,
    /// `Host` header value.
    pub host: String,
    /// `wss://`: how to set up TLS on every connection.
    pub tls: Option<TlsTarget>,
    pub conns: Vec<ConnPlan>,
    /// Connect mode: the source addresses to cycle through, starting at `source_offset` and
    /// stepping by `source_step` (so threads do not pick the same ones in lockstep).
    pub sources: Vec<IpAddr>,
    pub source_offset: usize,
    pub source_step: usize,
    pub connect_timeout: Duration,
    pub warmup: Duration,
    pub duration: Duration,
    pub window: u32,
    pub size: usize,
    /// This thread's share of `--rate`, in messages per second.
    pub rate: Option<f64>,
    pub seed: u64,
    /// `--compression`: offer permessage-deflate, and send chat-like JSON (which it is for)
    /// instead of the alphabet filler (which compresses unrealistically well).
    pub compression: bool,
}

/// `size` bytes of chat-like JSON records, with varying names and numbers so that it compresses
/// the way real chat traffic does (several times, not a hundred times). The stamp and sender
/// id overwrite its first bytes when it is sent.
fn chat_filler(size: usize) -> Vec<u8> {
    let names = ["alice", "bob", "carol", "dave", "erin", "frank", "grace"];
    let mut out = String::with_capacity(size + 128);
    let mut i: u64 = 0;
    while out.len() < size {
        let name = names[(i as usize * 5) % names.len()];
        out.push_str(&format!(
            r#"{{"type":"message","room":"room-{}","from":"{name}","id":"{:08x}","text":"message {i} from {name}","ts":{}}},"#,
            i % 13,
            i.wrapping_mul(0x9e37_79b9) as u32,
            1_700_000_000_000 + i * 7919,
        ));
        i += 1;
    }
    let mut bytes = out.into_bytes();
    bytes.truncate(size);
    bytes
}

/// Progress counters a worker publishes once per loop iteration, for the progress line.
#[derive(Default)]
pub struct Progress {
    pub opened: AtomicU64,
    pub received_total: AtomicU64,
    pub completed: AtomicU64,
    pub errors: AtomicU64,
}

/// What the coordinator and the workers share.
pub struct Shared {
    /// The clock origin of every stamp and every window boundary.
    pub base: Instant,
    /// Nanoseconds after `base` at which traffic starts, plus one; 0 until the go.
    go_at: AtomicU64,
    stop: AtomicBool,
    ready: AtomicUsize,
    /// Connect mode: cycles that may still be started (the `--connections` cap).
    pub cycles_left: AtomicU64,
    pub progress: Vec<Progress>,
}

impl Shared {
    pub fn new(threads: usize, cycles: u64) -> Shared {
        Shared {
            base: Instant::now(),
            go_at: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            ready: AtomicUsize::new(0),
            cycles_left: AtomicU64::new(cycles),
            progress: (0..threads).map(|_| Progress::default()).collect(),
        }
    }

    /// Threads that finished opening their connections.
    pub fn ready(&self) -> usize {
        self.ready.load(Ordering::Acquire)
    }

    /// Starts the traffic at `at` (the coordinator then wakes every worker).
    pub fn go(&self, at: Instant) {
        let nanos = at.saturating_duration_since(self.base).as_nanos() as u64;
        self.go_at.store(nanos.saturating_add(1), Ordering::Release);
    }

    fn go_instant(&self) -> Option<Instant> {
        match self.go_at.load(Ordering::Acquire) {
            0 => None,
            n => Some(self.base + Duration::from_nanos(n - 1)),
        }
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Takes one cycle from the connect-mode budget; false when it is spent.
    fn take_cycle(&self) -> bool {
        self.cycles_left
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok()
    }
}

/// The witness of a sender: the next member of its room, which shares this thread. Each sender's
/// window is credited when its witness receives one of its messages, so flow control never
/// crosses threads. Rooms occupy `members` consecutive slots from `room_start`.
pub fn witness(sender: usize, room_start: usize, members: usize) -> usize {
    room_start + (sender - room_start + 1) % members
}

/// Messages a sender limited to `rate` per second may still send, `elapsed` after it started,
/// having sent `sent`: a token bucket that starts with one token and earns `rate` per second.
/// A sender that fell behind (a busy thread) catches up in a burst.
pub fn tokens(rate: f64, elapsed: Duration, sent: u64) -> u64 {
    // `as` saturates: a huge rate times a long time is u64::MAX, not a wrap.
    let earned = ((rate * elapsed.as_secs_f64()) as u64).saturating_add(1);
    earned.saturating_sub(sent)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    Opening,
    Ready,
    Running,
    Draining { until: Instant },
    Closing { until: Instant },
    Done,
}

/// One connection's bookkeeping.
#[derive(Default)]
struct Slot {
    client: Option<Client>,
    /// The handshake of the current client was counted.
    counted_open: bool,
    /// Messages sent and not yet seen back (echo) or by the witness (broadcast).
    inflight: u64,
    /// Messages this connection may send as soon as the rate allows.
    owed: u64,
    /// Listed in `Worker::wanting`.
    wanting: bool,
    /// Listed in `Worker::dirty`.
    dirty: bool,
}

pub struct Worker {
    index: usize,
    plan: Plan,
    poll: Poll,
    shared: Arc<Shared>,
    slots: Vec<Slot>,
    rng: fastrand::Rng,
    recv_buf: Box<[u8]>,
    /// The message sent, rewritten with a fresh stamp each time.
    payload: Vec<u8>,
    /// permessage-deflate codecs for all this thread's connections (`--compression`).
    codec: Codec,
    tally: Tally,
    stage: Stage,
    /// Opening: the next slot to connect, and how many are connecting now.
    next_open: usize,
    opening: usize,
    /// Slots with `owed > 0`, and slots with bytes to write.
    wanting: Vec<usize>,
    dirty: Vec<usize>,
    inflight_total: u64,
    /// Running: when traffic started, and the measured window.
    go: Option<Instant>,
    window: Option<(Instant, Instant)>,
    /// Messages sent since the go, for the rate limit.
    rate_sent: u64,
    /// Connect mode: cycles started by this thread (picks the source address).
    cycles_started: usize,
    next_deadline_scan: Instant,
    /// Scratch: sender slots to credit after a read (broadcast).
    credits: Vec<u32>,
    first_error: Option<String>,
}

impl Worker {
    pub fn new(index: usize, plan: Plan, poll: Poll, shared: Arc<Shared>) -> Worker {
        let payload = if plan.compression {
            chat_filler(plan.size)
        } else {
            // Recognisable filler for anyone reading a packet capture.
            (0..plan.size).map(|i| b'a' + (i % 26) as u8).collect()
        };
        let slots = (0..plan.conns.len()).map(|_| Slot::default()).collect();
        let rng = fastrand::Rng::with_seed(plan.seed);
        let now = Instant::now();
        Worker {
            index,
            plan,
            poll,
            shared,
            slots,
            rng,
            recv_buf: vec![0u8; RECV_BUFFER_BYTES].into_boxed_slice(),
            payload,
            codec: Codec::new(),
            tally: Tally::new(),
            stage: Stage::Opening,
            next_open: 0,
            opening: 0,
            wanting: Vec::new(),
            dirty: Vec::new(),
            inflight_total: 0,
            go: None,
            window: None,
            rate_sent: 0,
            cycles_started: 0,
            next_deadline_scan: now,
            credits: Vec::new(),
            first_error: None,
        }
    }

    /// Runs every stage and returns what this thread counted, and the first failure it saw.
    pub fn run(mut self) -> (Tally, Option<String>) {
        if self.plan.traffic == Traffic::Connect {
            // Nothing to open ahead: the cycles are the traffic.
            self.stage = Stage::Ready;
            self.shared.ready.fetch_add(1, Ordering::AcqRel);
        }
        let mut events = Events::with_capacity(1024);
        loop {
            let now = Instant::now();
            self.advance(now);
            if self.stage == Stage::Done {
                break;
            }
            self.release(now);
            self.flush_dirty();
            self.publish();
            let timeout = self.timeout(now);
            match self.poll.poll(&mut events, Some(timeout)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.note_error(format!("poll failed: {e}"));
                    break;
                }
            }
            let now = Instant::now();
            for event in events.iter() {
                if event.token() != WAKER {
                    self.on_event(event.token().0, now);
                }
            }
        }
        // Whatever is still open (only after a poll failure) is dropped and counted.
        for i in 0..self.slots.len() {
            if self.slots[i].client.is_some() {
                self.fail(i, Failure::Timeout);
            }
        }
        self.publish();
        (self.tally, self.first_error)
    }

    // ----- stages ----------------------------------------------------------------------

    /// Moves through the stages as time, counts and the coordinator's flags say.
    fn advance(&mut self, now: Instant) {
        if now >= self.next_deadline_scan {
            self.next_deadline_scan = now + TICK;
            self.expire_handshakes(now);
        }
        match self.stage {
            Stage::Opening => {
                if self.shared.stopping() {
                    self.stage = Stage::Draining { until: now };
                    return;
                }
                while self.opening < OPEN_BATCH && self.next_open < self.slots.len() {
                    let i = self.next_open;
                    self.next_open += 1;
                    self.start(i, now);
                }
                if self.next_open == self.slots.len() && self.opening == 0 {
                    self.stage = Stage::Ready;
                    self.shared.ready.fetch_add(1, Ordering::AcqRel);
                }
            }
            Stage::Ready => {
                if self.shared.stopping() {
                    self.stage = Stage::Draining { until: now };
                } else if let Some(go) = self.shared.go_instant() {
                    let start = go + self.plan.warmup;
                    self.go = Some(go);
                    self.window = Some((start, start + self.plan.duration));
                    self.stage = Stage::Running;
                    self.start_traffic(now);
                }
            }
            Stage::Running => {
                if self.shared.stopping() {
                    for i in std::mem::take(&mut self.wanting) {
                        self.slots[i].owed = 0;
                        self.slots[i].wanting = false;
                    }
                    self.stage = Stage::Draining {
                        until: now + DRAIN_TIMEOUT,
                    };
                }
            }
            Stage::Draining { until } => {
                let drained = match self.plan.traffic {
                    // In-flight cycles finish (or time out) by themselves.
                    Traffic::Connect => self.live() == 0,
                    _ => self.inflight_total == 0,
                };
                if drained || now >= until {
                    for i in 0..self.slots.len() {
                        self.close_slot(i);
                    }
                    self.stage = Stage::Closing {
                        until: now + CLOSE_TIMEOUT,
                    };
                }
            }
            Stage::Closing { until } => {
                if self.live() == 0 {
                    self.stage = Stage::Done;
                } else if now >= until {
                    for i in 0..self.slots.len() {
                        if self.slots[i].client.is_some() {
                            self.fail(i, Failure::Timeout);
                        }
                    }
                    self.stage = Stage::Done;
                }
            }
            Stage::Done => {}
        }
    }

    /// What each connection does when the go comes.
    fn start_traffic(&mut self, now: Instant) {
        match self.plan.traffic {
            Traffic::Echo | Traffic::Broadcast => {
                for i in 0..self.slots.len() {
                    let sends = match self.plan.traffic {
                        Traffic::Echo => true,
                        _ => self.plan.conns[i].witness.is_some(),
                    };
                    let open = self.slots[i]
                        .client
                        .as_ref()
                        .is_some_and(|c| c.state() == State::Open);
                    if sends && open {
                        self.owe(i, u64::from(self.plan.window));
                    }
                }
            }
            Traffic::Idle => {}
            Traffic::Connect => {
                for i in 0..self.slots.len() {
                    self.start_cycle(i, now);
                }
            }
        }
    }

    /// Connections (or cycles) still alive.
    fn live(&self) -> usize {
        self.slots.iter().filter(|s| s.client.is_some()).count()
    }

    /// Connect and handshake deadlines: a connection not open within `--connect-timeout` fails.
    fn expire_handshakes(&mut self, now: Instant) {
        let limit = self.plan.connect_timeout;
        for i in 0..self.slots.len() {
            let overdue = self.slots[i].client.as_ref().is_some_and(|c| {
                matches!(c.state(), State::Connecting | State::Handshaking)
                    && now.saturating_duration_since(c.started) > limit
            });
            if overdue {
                self.fail(i, Failure::Timeout);
            }
        }
    }

    fn timeout(&self, now: Instant) -> Duration {
        let mut timeout = TICK;
        if let (Stage::Running, Some(rate), false) =
            (self.stage, self.plan.rate, self.wanting.is_empty())
        {
            // A rate so low that the next token lies beyond `Duration`'s range just waits a tick.
            if let Ok(after_go) = Duration::try_from_secs_f64(self.rate_sent as f64 / rate) {
                let next_token = self.go.unwrap_or(now) + after_go;
                timeout = timeout.min(next_token.saturating_duration_since(now));
            }
        }
        if let Stage::Draining { until } | Stage::Closing { until } = self.stage {
            timeout = timeout.min(until.saturating_duration_since(now));
        }
        timeout
    }

    fn publish(&self) {
        if let Some(p) = self.shared.progress.get(self.index) {
            p.opened.store(self.tally.opened, Ordering::Relaxed);
            p.received_total
                .store(self.tally.received_total, Ordering::Relaxed);
            p.completed.store(self.tally.completed, Ordering::Relaxed);
            p.errors.store(self.tally.errors.total, Ordering::Relaxed);
        }
    }

    fn in_window(&self, now: Instant) -> bool {
        self.window.is_some_and(|(a, b)| now >= a && now < b)
    }

    // ----- connections -----------------------------------------------------------------

    /// Starts connecting slot `i` (its previous client, if any, is gone).
    fn start(&mut self, i: usize, now: Instant) {
        let plan = &self.plan.conns[i];
        let source = match self.plan.traffic {
            Traffic::Connect if !self.plan.sources.is_empty() => {
                let k = self.plan.source_offset + self.cycles_started * self.plan.source_step;
                self.plan.sources.get(k % self.plan.sources.len()).copied()
            }
            _ => plan.source,
        };
        let dial = Dial {
            target: self.plan.target,
            tls: self.plan.tls.as_ref(),
            host: &self.plan.host,
            compression: self.plan.compression,
        };
        match Client::connect(dial, source, &plan.resource, &mut self.rng, now) {
            Ok(mut client) => {
                // Edge-triggered: registering both interests once costs nothing while idle.
                let registered = self.poll.registry().register(
                    client.stream_mut(),
                    Token(i),
                    Interest::READABLE | Interest::WRITABLE,
                );
                match registered {
                    Ok(()) => {
                        let slot = &mut self.slots[i];
                        slot.client = Some(client);
                        slot.counted_open = false;
                        self.opening += 1;
                    }
                    Err(e) => {
                        self.note_error(format!("cannot watch a socket: {e}"));
                        self.tally.errors.count(Failure::Connect);
                    }
                }
            }
            Err(e) => {
                self.note_error(format!("connect to {} failed: {e}", self.plan.target));
                self.tally.errors.count(Failure::Connect);
            }
        }
    }

    /// Connect mode: starts the next cycle in slot `i`, if running and the budget allows.
    fn start_cycle(&mut self, i: usize, now: Instant) {
        if self.stage == Stage::Running && self.shared.take_cycle() {
            self.start(i, now);
            self.cycles_started += 1;
        }
    }

    /// Handles readiness of slot `i`.
    fn on_event(&mut self, i: usize, now: Instant) {
        let Some(client) = self.slots.get_mut(i).and_then(|s| s.client.as_mut()) else {
            return; // a stale event for a slot closed earlier in this batch
        };
        let was_open = client.handshake_done();
        let in_window = self.window.is_some_and(|(a, b)| now >= a && now < b);
        let now_ns = now.saturating_duration_since(self.shared.base).as_nanos() as u64;
        let tally = &mut self.tally;
        let credits = &mut self.credits;
        let broadcast = self.plan.traffic == Traffic::Broadcast;
        let mut received = 0u64;
        let codec = &mut self.codec;
        let result = client.on_ready(&mut self.recv_buf, codec, &mut self.rng, |payload| {
            received += 1;
            tally.received_total += 1;
            if in_window {
                tally.received += 1;
                tally.received_bytes += payload.len() as u64;
                if let Some(sent_ns) = stats::read_stamp(payload) {
                    tally.record_latency(now_ns.saturating_sub(sent_ns));
                }
            }
            if broadcast {
                if let Some(sender) = stats::read_sender(payload) {
                    credits.push(sender);
                }
            }
        });
        let opened_now = !was_open && client.handshake_done();
        let handshake_ns = now.saturating_duration_since(client.started).as_nanos() as u64;
        if opened_now {
            self.on_open(i, in_window, handshake_ns);
        }
        match self.plan.traffic {
            Traffic::Echo => self.credit(i, received),
            Traffic::Broadcast => {
                for k in 0..self.credits.len() {
                    let sender = self.credits[k] as usize;
                    if self.plan.conns.get(sender).and_then(|c| c.witness) == Some(i) {
                        self.credit(sender, 1);
                    }
                }
                self.credits.clear();
            }
            Traffic::Idle | Traffic::Connect => {}
        }
        match result {
            Ok(Step::Pending) => {}
            Ok(Step::Closed) => self.on_closed(i, now),
            Err(failure) => self.fail(i, failure),
        }
    }

    /// The handshake of slot `i` just completed.
    fn on_open(&mut self, i: usize, in_window: bool, handshake_ns: u64) {
        self.slots[i].counted_open = true;
        self.opening = self.opening.saturating_sub(1);
        self.tally.opened += 1;
        if self.plan.traffic == Traffic::Connect && in_window {
            self.tally.record_latency(handshake_ns);
        }
        // A connect cycle goes on at once with the close handshake; any other connection that
        // opens after the stop (it was slow) is closed at once too.
        let stopping = matches!(self.stage, Stage::Draining { .. } | Stage::Closing { .. });
        if self.plan.traffic == Traffic::Connect || stopping {
            self.close_slot(i);
        }
    }

    /// A clean end: both Close frames exchanged and the server hung up.
    fn on_closed(&mut self, i: usize, now: Instant) {
        self.tally.clean_closes += 1;
        self.drop_client(i);
        if self.plan.traffic == Traffic::Connect {
            if self.in_window(now) {
                self.tally.completed += 1;
            }
            self.start_cycle(i, now);
        }
    }

    /// Starts the close handshake of slot `i` if it is open. One still connecting is left to
    /// finish: `on_open` closes it then (the stage says so), or its deadline fails it.
    fn close_slot(&mut self, i: usize) {
        if let Some(client) = self.slots[i].client.as_mut() {
            if client.state() == State::Open {
                client.close(&mut self.rng);
                self.mark_dirty(i);
            }
        }
    }

    /// Counts a failure of slot `i` and drops its connection; in connect mode the slot goes on
    /// with a new cycle.
    fn fail(&mut self, i: usize, failure: Failure) {
        if self.first_error.is_none() {
            self.first_error = Some(failure.to_string());
        }
        self.tally.errors.count(failure);
        if !self.slots[i].counted_open {
            self.opening = self.opening.saturating_sub(1);
        }
        // Broadcast: messages in flight to this member will never be seen; free the window of
        // the sender it witnesses, which would otherwise wait for them until the drain deadline.
        if self.plan.traffic == Traffic::Broadcast {
            if let Some(sender) =
                (0..self.plan.conns.len()).find(|&s| self.plan.conns[s].witness == Some(i))
            {
                let stuck = std::mem::take(&mut self.slots[sender].inflight);
                self.inflight_total = self.inflight_total.saturating_sub(stuck);
            }
        }
        self.drop_client(i);
        if self.plan.traffic == Traffic::Connect {
            self.start_cycle(i, Instant::now());
        }
    }

    fn drop_client(&mut self, i: usize) {
        let slot = &mut self.slots[i];
        if let Some(mut client) = slot.client.take() {
            // Deregister before the descriptor is closed (dropping the stream closes it).
            let _ = self.poll.registry().deregister(client.stream_mut());
        }
        self.inflight_total = self.inflight_total.saturating_sub(slot.inflight);
        slot.inflight = 0;
        slot.owed = 0;
    }

    fn note_error(&mut self, message: String) {
        if self.first_error.is_none() {
            self.first_error = Some(message);
        }
    }

    // ----- sending ---------------------------------------------------------------------

    /// `n` messages of slot `i` came back (or were seen by the witness): they are no longer in
    /// flight, and while running, as many new ones are owed.
    fn credit(&mut self, i: usize, n: u64) {
        if n == 0 {
            return;
        }
        let slot = &mut self.slots[i];
        let done = n.min(slot.inflight);
        slot.inflight -= done;
        self.inflight_total = self.inflight_total.saturating_sub(done);
        if self.stage == Stage::Running {
            self.owe(i, done);
        }
    }

    fn owe(&mut self, i: usize, n: u64) {
        let slot = &mut self.slots[i];
        slot.owed += n;
        if !slot.wanting {
            slot.wanting = true;
            self.wanting.push(i);
        }
    }

    /// How many messages the rate limit lets this thread send now (a token bucket that starts
    /// with one token and fills at `rate`).
    fn allowance(&self, now: Instant) -> u64 {
        match (self.plan.rate, self.go) {
            (Some(rate), Some(go)) => {
                tokens(rate, now.saturating_duration_since(go), self.rate_sent)
            }
            _ => u64::MAX,
        }
    }

    /// Sends owed messages, as many as the rate allows.
    fn release(&mut self, now: Instant) {
        if self.stage != Stage::Running || self.wanting.is_empty() {
            return;
        }
        let mut allowance = self.allowance(now);
        let in_window = self.in_window(now);
        let now_ns = now.saturating_duration_since(self.shared.base).as_nanos() as u64;
        let mut still_wanting = Vec::new();
        for i in std::mem::take(&mut self.wanting) {
            let owed = self.slots[i].owed;
            let n = owed.min(allowance);
            for _ in 0..n {
                self.send_one(i, now_ns, in_window);
            }
            allowance -= n;
            let slot = &mut self.slots[i];
            slot.owed -= n;
            if slot.owed > 0 {
                still_wanting.push(i);
            } else {
                slot.wanting = false;
            }
        }
        self.wanting = still_wanting;
    }

    fn send_one(&mut self, i: usize, now_ns: u64, in_window: bool) {
        let Some(client) = self.slots[i].client.as_mut() else {
            return;
        };
        if client.state() != State::Open {
            return;
        }
        stats::write_stamp(&mut self.payload, now_ns);
        if self.plan.traffic == Traffic::Broadcast {
            stats::write_sender(&mut self.payload, i as u32);
        }
        client.send_binary(&self.payload, &mut self.codec, &mut self.rng);
        self.slots[i].inflight += 1;
        self.inflight_total += 1;
        self.rate_sent += 1;
        self.tally.sent_total += 1;
        if in_window {
            self.tally.sent += 1;
        }
        self.mark_dirty(i);
    }

    fn mark_dirty(&mut self, i: usize) {
        let slot = &mut self.slots[i];
        if !slot.dirty {
            slot.dirty = true;
            self.dirty.push(i);
        }
    }

    /// Writes every connection that has something queued: all the messages one iteration
    /// produced for a connection leave in one write.
    fn flush_dirty(&mut self) {
        for i in std::mem::take(&mut self.dirty) {
            self.slots[i].dirty = false;
            let result = match self.slots[i].client.as_mut() {
                Some(client) => client.flush(),
                None => Ok(()),
            };
            if let Err(failure) = result {
                self.fail(i, failure);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn witnesses_cycle_within_each_room() {
        // (sender, room_start, members, expected witness)
        let cases: &[(usize, usize, usize, usize)] =
            &[(0, 0, 2, 1), (1, 0, 2, 0), (10, 10, 5, 11), (14, 10, 5, 10)];
        for &(sender, start, members, want) in cases {
            assert_eq!(
                witness(sender, start, members),
                want,
                "{sender} in {start}+{members}"
            );
        }
    }

    #[test]
    fn rate_tokens() {
        let ms = Duration::from_millis;
        // (rate per second, elapsed, sent, tokens left)
        let cases: &[(f64, Duration, u64, u64)] = &[
            (1000.0, ms(0), 0, 1),
            (1000.0, ms(0), 1, 0),
            (1000.0, ms(10), 1, 10),
            (1000.0, ms(10), 11, 0),
            (1000.0, ms(10), 50, 0),
            (0.5, ms(1999), 1, 0),
            (0.5, ms(2000), 1, 1),
            (f64::MAX, Duration::from_secs(3600), 5, u64::MAX - 5),
        ];
        for &(rate, elapsed, sent, want) in cases {
            assert_eq!(
                tokens(rate, elapsed, sent),
                want,
                "{rate}/s after {elapsed:?}, {sent} sent"
            );
        }
    }

    #[test]
    fn cycle_budget_is_taken_once_per_cycle() {
        let shared = Shared::new(1, 2);
        assert!(shared.take_cycle());
        assert!(shared.take_cycle());
        assert!(!shared.take_cycle());
        assert_eq!(shared.cycles_left.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn go_instant_round_trips() {
        let shared = Shared::new(1, 0);
        assert_eq!(shared.go_instant(), None);
        let at = shared.base + Duration::from_millis(1500);
        shared.go(at);
        assert_eq!(shared.go_instant(), Some(at));
    }
}
