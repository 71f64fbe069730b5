//! The reactor: one thread, one loop, every connection.
//!
//! Owns: the listening socket, the slab of connections, the shared receive buffer, the ready
//! list, the timer wheel and the counters; accepting, reading, dispatching, writing, deadlines.
//! Does not: parse WebSocket or HTTP bytes itself (`protocol` does), or know which readiness
//! mechanism it runs on (`Reactor<P: Poller>` is generic, so the epoll path pays nothing for
//! the others).
//!
//! One iteration of the loop (SPEC §2):
//! 1. Wait for readiness, no longer than until the next timer is due (zero if the ready list has
//!    connections whose read budget ran out last time).
//! 2. Dispatch every event: accept on the listener until `WouldBlock`; read a connection until
//!    `WouldBlock` or its budget is spent; write a connection that became writable.
//! 3. Serve the ready list carried over from the previous iteration.
//! 4. Fire expired timers (handshake, heartbeat, pong and close deadlines, accept retry,
//!    shutdown).
//! 5. Flush every connection that had bytes queued in this iteration (the dirty list): what the
//!    app sent to one connection in one iteration leaves in one vectored write.

pub mod config;
pub mod connection;
pub mod handler;
pub mod metrics;
pub mod outbound;
mod signals;

pub use config::Config;
pub use connection::ConnId;
pub use handler::{Handler, Outbox, Route, Sent, SlowConsumer};

use crate::poller::waker::WakeReceiver;
use crate::poller::{Event, Interest, Poller, Token};
use crate::protocol::frame::{self, OpCode, Role};
use crate::protocol::handshake::{self, HandshakeError};
use crate::protocol::message::Event as WsEvent;
use crate::protocol::{CloseCode, ProtocolError};
use crate::timer::TimerWheel;
use connection::{Connection, Deadline, State};
use log::{debug, info, trace, warn};
use metrics::{Gauges, Metrics};
use mio::net::{TcpListener, TcpStream};
use outbound::{Flush, OutboundPool};
use slab::Slab;
use std::borrow::Cow;
use std::io::{self, Read};
use std::net::{Shutdown, SocketAddr};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

/// Size of the one receive buffer shared by all connections. Complete frames are parsed straight
/// out of it; only a partial tail is copied into the connection.
const RECV_BUFFER_BYTES: usize = 64 * 1024;

/// Bytes read from one connection per loop iteration before the others get their turn.
const READ_BUDGET_BYTES: usize = 4 * RECV_BUFFER_BYTES;

/// Slots in the timer wheel: with the default 100 ms tick, one revolution is 51.2 s, longer than
/// the default heartbeat interval, so the common timers never need a second round.
const TIMER_SLOTS: usize = 512;

/// Tokens outside the range of `ConnId::token` (no slab slot reaches u32::MAX - 2).
const LISTENER: Token = Token(usize::MAX);
const SIGNALS: Token = Token(usize::MAX - 1);
const WAKER: Token = Token(usize::MAX - 2);

/// How long the listener stays paused after accept failed for lack of descriptors.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// Connections admitted beyond `--max-connections` only to be told 503 (and then closed). Past
/// this many at once, excess sockets are closed without an answer.
const MAX_REJECTING: usize = 64;

/// Why the loop stopped.
#[derive(Debug, PartialEq, Eq)]
pub enum Exit {
    /// Shutdown completed: every connection closed, or the shutdown deadline passed.
    Graceful,
    /// A second signal arrived during shutdown: stop at once.
    Immediate,
}

/// What a timer in the wheel stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TimerEvent {
    /// A connection's deadline; ignored if the connection is gone (generation mismatch).
    Conn(ConnId, Deadline),
    /// The listener was paused on EMFILE/ENFILE; try accepting again.
    AcceptRetry,
    /// Graceful shutdown has waited `--shutdown-timeout`: close what is left.
    ShutdownDeadline,
}

pub struct Reactor<P: Poller, H: Handler> {
    /// The readiness backend (epoll/kqueue, poll or select).
    poller: P,
    /// The application: endpoints, rooms, messaging. Sees `ConnId`s, never sockets.
    handler: H,
    listener: TcpListener,
    local_addr: SocketAddr,
    /// Whether the listener is registered (it is paused on descriptor exhaustion and at
    /// shutdown).
    listening: bool,
    conns: Slab<Connection>,
    /// How many connections in the slab were admitted only to be refused with 503.
    rejecting: usize,
    /// The app's per-connection state, indexed by slab slot; `Some` exactly for open
    /// connections. Kept beside the slab (not inside `Connection`) so that a callback can hold a
    /// session and the `Outbox` (which borrows the slab) at the same time.
    sessions: Vec<Option<H::Session>>,
    /// Bumped for every accepted connection, so that ids of closed connections are never reused.
    next_generation: u32,
    /// The one receive buffer of SPEC §2, shared by every connection.
    recv_buf: Box<[u8]>,
    /// Connections that still had input when their read budget ran out. Served first thing in
    /// the next iteration, with a zero poll timeout: edge-triggered backends would not report
    /// them again.
    ready: Vec<ConnId>,
    /// Connections with bytes queued since their last flush (see `Outbox`).
    dirty: Vec<ConnId>,
    /// The dirty list being flushed; kept between iterations so its storage is reused.
    flushing: Vec<ConnId>,
    /// Storage lent to the outbound queues: spare rings, the gather buffer (`OutboundPool`).
    outbound_pool: OutboundPool,
    /// Closes the app asked for during a callback, applied right after it.
    close_requests: Vec<(ConnId, CloseCode, &'static str)>,
    /// Set while `apply_close_requests` runs (see there).
    applying_closes: bool,
    events: Vec<Event>,
    timers: TimerWheel<TimerEvent>,
    expired: Vec<TimerEvent>,
    /// SIGINT/SIGTERM arrive as bytes on this socket (see `signals.rs`), which every poller can
    /// watch like any other descriptor.
    signals: Option<signals::SignalPipe>,
    /// Another thread (the file engine's storage thread) makes this readable when it has
    /// answers for the app (`poller/waker.rs`).
    waker: Option<WakeReceiver>,
    /// Set once shutdown has begun: no more accepting; the loop ends when the slab is empty.
    shutting_down: bool,
    /// When the last "out of descriptors" warning was logged (they are rate-limited).
    last_accept_warning: Option<Instant>,
    config: Config,
    metrics: Metrics,
    /// The time read once per loop iteration; everything in one iteration uses it.
    now: Instant,
    /// When the reactor was created (uptime in /stats.json).
    started: Instant,
}

impl<P: Poller, H: Handler> Reactor<P, H> {
    /// Binds the listener and registers it with the poller.
    ///
    /// # Errors
    /// The address is taken or invalid, or the poller refuses the listener.
    pub fn bind(mut poller: P, handler: H, mut config: Config) -> io::Result<Reactor<P, H>> {
        let listener = TcpListener::bind(config.listen)?;
        if let Some(limit) = poller.fd_limit() {
            // Descriptors below the listener's are taken by stdio, the poller and the listener
            // itself; every connection needs one more, below the backend's limit.
            // A few more are opened after this point (the signal pipe): keep a margin.
            let cap = limit.saturating_sub(listener.as_raw_fd() as usize + 1 + 8);
            if config.max_connections > cap {
                info!(
                    "the {} poller cannot watch descriptors >= {limit}: capping --max-connections from {} to {cap}",
                    poller.name(),
                    config.max_connections
                );
                config.max_connections = cap;
            }
        }
        let local_addr = listener.local_addr()?;
        poller.register(listener.as_raw_fd(), LISTENER, Interest::READABLE)?;
        let now = Instant::now();
        Ok(Reactor {
            poller,
            handler,
            listener,
            local_addr,
            listening: true,
            conns: Slab::new(),
            rejecting: 0,
            sessions: Vec::new(),
            next_generation: 0,
            recv_buf: vec![0u8; RECV_BUFFER_BYTES].into_boxed_slice(),
            ready: Vec::new(),
            dirty: Vec::new(),
            flushing: Vec::new(),
            outbound_pool: OutboundPool::default(),
            close_requests: Vec::new(),
            applying_closes: false,
            events: Vec::with_capacity(1024),
            timers: TimerWheel::new(config.timer_tick, TIMER_SLOTS, now),
            expired: Vec::new(),
            signals: None,
            waker: None,
            shutting_down: false,
            last_accept_warning: None,
            config,
            metrics: Metrics::default(),
            now,
            started: now,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn poller_name(&self) -> &'static str {
        self.poller.name()
    }

    /// Routes SIGINT and SIGTERM into the loop: the first starts a graceful shutdown, a second
    /// one ends the loop at once.
    ///
    /// # Errors
    /// The signal pipe could not be created or registered.
    pub fn handle_signals(&mut self) -> io::Result<()> {
        let pipe = signals::SignalPipe::new()?;
        self.poller
            .register(pipe.as_raw_fd(), SIGNALS, Interest::READABLE)?;
        self.signals = Some(pipe);
        Ok(())
    }

    /// Watches `waker`: when another thread makes it readable, the app's `on_wake` runs (SPEC
    /// §13: an engine's answers come back through a channel and the reactor's waker).
    ///
    /// # Errors
    /// The descriptor could not be registered.
    pub fn watch_waker(&mut self, waker: WakeReceiver) -> io::Result<()> {
        self.poller
            .register(waker.as_raw_fd(), WAKER, Interest::READABLE)?;
        self.waker = Some(waker);
        Ok(())
    }

    /// The waker fired: empty it (before the app looks, see `waker.rs`), then let the app act
    /// on what the other thread left for it, with an `Outbox` for its sends.
    fn on_wake(&mut self) {
        if let Some(waker) = self.waker.as_mut() {
            waker.drain();
        }
        let mut out = Outbox {
            conns: &mut self.conns,
            metrics: &mut self.metrics,
            dirty: &mut self.dirty,
            closes: &mut self.close_requests,
            pool: &mut self.outbound_pool,
            max_outbound: self.config.max_outbound,
            policy: self.config.slow_consumer,
        };
        self.handler.on_wake(&mut out);
        self.apply_close_requests();
    }

    /// Runs the loop until shutdown.
    ///
    /// # Errors
    /// Only a failure of the poller itself; errors on one connection close that connection.
    pub fn run(&mut self) -> io::Result<Exit> {
        loop {
            if let Some(exit) = self.turn()? {
                return Ok(exit);
            }
        }
    }

    /// One iteration of the loop (see the module doc). Returns `Some` when the loop is over.
    fn turn(&mut self) -> io::Result<Option<Exit>> {
        self.metrics.loop_iterations += 1;
        self.now = Instant::now();
        let timeout = if self.ready.is_empty() {
            self.timers.next_timeout(self.now)
        } else {
            Some(Duration::ZERO)
        };

        let mut events = std::mem::take(&mut self.events);
        let before = Instant::now();
        self.poller.wait(&mut events, timeout)?;
        self.now = Instant::now();
        self.metrics.poll_wait += self.now - before;
        self.metrics.poll_wakeups += 1;
        self.metrics.poll_events += events.len() as u64;

        let mut exit = None;
        for event in &events {
            trace!("event {event:?}");
            match event.token {
                LISTENER => self.accept_all(),
                SIGNALS => exit = exit.or(self.on_signal()),
                WAKER => self.on_wake(),
                token => {
                    let id = ConnId::from_token(token.0);
                    if event.readable {
                        self.on_readable(id);
                    }
                    if event.writable {
                        self.flush(id);
                    }
                }
            }
        }
        self.events = events;
        if exit.is_some() {
            return Ok(exit);
        }

        for id in std::mem::take(&mut self.ready) {
            if let Some(conn) = self.conn_mut(id) {
                conn.on_ready_list = false;
                self.on_readable(id);
            }
        }

        self.timers.expire(self.now, &mut self.expired);
        for timer in std::mem::take(&mut self.expired) {
            self.metrics.timer_expiries += 1;
            match timer {
                TimerEvent::Conn(id, deadline) => self.on_deadline(id, deadline),
                TimerEvent::AcceptRetry => self.resume_accepting(),
                TimerEvent::ShutdownDeadline => {
                    info!(
                        "shutdown deadline passed; closing {} remaining connections",
                        self.conns.len()
                    );
                    let ids: Vec<ConnId> = self.conns.iter().map(|(_, c)| c.id).collect();
                    for id in ids {
                        self.close_now(id);
                    }
                }
            }
        }

        self.flush_dirty();

        if self.shutting_down && self.conns.is_empty() {
            info!("all connections closed; exiting");
            return Ok(Some(Exit::Graceful));
        }
        Ok(None)
    }

    /// Flushes every connection that had bytes queued in this iteration.
    ///
    /// The list is swapped with `flushing` rather than taken: `mem::take` would free its storage
    /// every iteration, and a fan-out to n members would regrow it (log n allocations each time).
    fn flush_dirty(&mut self) {
        let mut batch = std::mem::take(&mut self.flushing);
        while !self.dirty.is_empty() {
            std::mem::swap(&mut batch, &mut self.dirty);
            for id in batch.drain(..) {
                if let Some(conn) = self.conn_mut(id) {
                    conn.dirty = false;
                    self.flush(id);
                }
            }
        }
        self.flushing = batch;
    }

    /// Queues the connection for the end-of-iteration flush.
    fn mark_dirty(&mut self, id: ConnId) {
        if let Some(conn) = live(&mut self.conns, id) {
            if !conn.dirty {
                conn.dirty = true;
                self.dirty.push(id);
            }
        }
    }

    // ----- signals and shutdown ---------------------------------------------------------

    fn on_signal(&mut self) -> Option<Exit> {
        let count = self.signals.as_mut().map_or(0, |s| s.drain());
        if count == 0 {
            return None;
        }
        if self.shutting_down || count > 1 {
            warn!("second signal: exiting now");
            return Some(Exit::Immediate);
        }
        self.begin_shutdown();
        None
    }

    /// SPEC §2: stop accepting, send Close 1001 to every open connection, and give the close
    /// handshakes up to `--shutdown-timeout`; the loop ends when the slab is empty.
    pub fn begin_shutdown(&mut self) {
        info!(
            "shutting down: closing {} connections (up to {:?})",
            self.conns.len(),
            self.config.shutdown_timeout
        );
        self.shutting_down = true;
        self.pause_listener();
        self.timers.arm(
            self.now + self.config.shutdown_timeout,
            TimerEvent::ShutdownDeadline,
        );
        let ids: Vec<(ConnId, State)> = self.conns.iter().map(|(_, c)| (c.id, c.state)).collect();
        for (id, state) in ids {
            match state {
                State::Open => self.start_close(id, CloseCode::GOING_AWAY, "server shutting down"),
                // Nothing promised to these yet: they go now.
                State::Handshaking => self.close_now(id),
                // Already finishing.
                State::HttpResponding | State::Closing { .. } | State::Failing => {}
            }
        }
    }

    /// The connection `id` names, if it is still the one in its slot (see `ConnId`).
    fn conn_mut(&mut self, id: ConnId) -> Option<&mut Connection> {
        live(&mut self.conns, id)
    }

    // ----- accept ------------------------------------------------------------------------

    fn accept_all(&mut self) {
        while self.listening {
            match self.listener.accept() {
                Ok((stream, peer)) => self.admit(stream, peer),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // The peer gave up while queued; nothing to do.
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => continue,
                Err(e) => {
                    // EMFILE/ENFILE (descriptors exhausted) and the like. The pending connection
                    // stays in the kernel's backlog and would make a level-triggered backend
                    // report the listener again and again: pause it instead, and retry from a
                    // timer. Existing connections keep being served meanwhile.
                    self.metrics.accept_pauses += 1;
                    let rate_limited = self
                        .last_accept_warning
                        .is_some_and(|t| self.now < t + Duration::from_secs(10));
                    if !rate_limited {
                        warn!(
                            "accept failed ({e}); pausing the listener, retrying every {ACCEPT_RETRY:?} \
                             (this warning repeats at most every 10 s)"
                        );
                        self.last_accept_warning = Some(self.now);
                    }
                    self.pause_listener();
                    self.timers
                        .arm(self.now + ACCEPT_RETRY, TimerEvent::AcceptRetry);
                    return;
                }
            }
        }
    }

    fn pause_listener(&mut self) {
        if self.listening {
            self.listening = false;
            if let Err(e) = self.poller.deregister(self.listener.as_raw_fd()) {
                warn!("could not pause the listener: {e}");
            }
        }
    }

    fn resume_accepting(&mut self) {
        if self.listening || self.shutting_down {
            return;
        }
        match self
            .poller
            .register(self.listener.as_raw_fd(), LISTENER, Interest::READABLE)
        {
            Ok(()) => {
                self.listening = true;
                // Connections may have queued while paused; an edge-triggered backend will not
                // report them as new.
                self.accept_all();
            }
            Err(e) => {
                warn!("could not resume the listener: {e}");
                self.timers
                    .arm(self.now + ACCEPT_RETRY, TimerEvent::AcceptRetry);
            }
        }
    }

    fn admit(&mut self, stream: TcpStream, peer: SocketAddr) {
        self.metrics.accepted += 1;
        let over_limit = self.conns.len() - self.rejecting >= self.config.max_connections;
        if over_limit && self.rejecting >= MAX_REJECTING {
            // Too many even to answer: close at once (the client sees a reset or EOF).
            Metrics::bump(&mut self.metrics.rejected, "max_connections");
            return;
        }
        if let Some(limit) = self.poller.fd_limit() {
            if stream.as_raw_fd() as usize >= limit {
                warn!(
                    "refusing {peer}: descriptor {} is beyond what the {} poller can watch ({limit})",
                    stream.as_raw_fd(),
                    self.poller.name()
                );
                Metrics::bump(&mut self.metrics.rejected, "fd_limit");
                return;
            }
        }
        let _ = stream.set_nodelay(true);
        let entry = self.conns.vacant_entry();
        let id = ConnId {
            slot: entry.key() as u32,
            generation: self.next_generation,
        };
        self.next_generation = self.next_generation.wrapping_add(1);
        if let Err(e) =
            self.poller
                .register(stream.as_raw_fd(), Token(id.token()), Interest::READABLE)
        {
            warn!("cannot watch connection from {peer}: {e}");
            Metrics::bump(&mut self.metrics.rejected, "register_failed");
            return;
        }
        let mut conn = Connection::new(id, stream, peer, self.config.max_message, self.now);
        conn.timer = Some(self.timers.arm(
            self.now + self.config.handshake_timeout,
            TimerEvent::Conn(id, Deadline::Handshake),
        ));
        entry.insert(conn);
        trace!("{peer} connected as {id:?}");
        if over_limit {
            // Over the limit: answer 503 (SPEC §2) through the normal response path, which
            // waits for the client to hang up so that the answer is not lost to a reset. Such
            // connections do not count toward the limit, or a stream of refused clients could
            // keep the slot of a departed one occupied.
            Metrics::bump(&mut self.metrics.rejected, "max_connections");
            self.rejecting += 1;
            if let Some(conn) = self.conn_mut(id) {
                conn.rejected = true;
            }
            self.respond(id, 503, HandshakeError::ServiceUnavailable.response());
            self.mark_dirty(id);
            return;
        }
        // Data may already be waiting; edge-triggered backends only report new arrivals.
        self.on_readable(id);
    }

    // ----- read --------------------------------------------------------------------------

    fn on_readable(&mut self, id: ConnId) {
        let mut budget = READ_BUDGET_BYTES;
        loop {
            let Some(conn) = live(&mut self.conns, id) else {
                return;
            };
            if conn.id != id {
                return;
            }
            let n = match conn.stream.read(&mut self.recv_buf) {
                Ok(0) => {
                    self.on_eof(id);
                    return;
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    debug!("{id:?} read error: {e}");
                    self.metrics.abnormal_closes += 1;
                    self.close_now(id);
                    return;
                }
            };
            self.metrics.bytes_in += n as u64;
            conn.last_activity = self.now;
            if conn.awaiting_pong && conn.state == State::Open {
                // The peer is alive: the pong deadline gives way to the next heartbeat.
                conn.awaiting_pong = false;
                set_deadline(
                    &mut self.timers,
                    conn,
                    self.now + self.config.heartbeat_interval,
                    Deadline::Heartbeat,
                );
            }
            if !self.ingest(id, n) {
                return; // closed
            }
            budget = budget.saturating_sub(n);
            if budget == 0 {
                // Fairness: let the others run. Edge-triggered backends will not tell us again
                // about the bytes still waiting, so remember the connection ourselves.
                if let Some(conn) = self.conn_mut(id) {
                    if !conn.on_ready_list {
                        conn.on_ready_list = true;
                        self.ready.push(id);
                    }
                }
                break;
            }
        }
        if self.conn_mut(id).is_some_and(|c| !c.outbound.is_empty()) {
            self.mark_dirty(id);
        }
    }

    fn on_eof(&mut self, id: ConnId) {
        let Some(conn) = self.conn_mut(id) else {
            return;
        };
        match conn.state {
            // The peer hung up after our response or our Close: the expected ending.
            State::HttpResponding | State::Closing { .. } | State::Failing => {}
            State::Handshaking | State::Open => {
                debug!("{id:?} hung up without a close handshake");
                self.metrics.abnormal_closes += 1;
            }
        }
        // The peer may only have shut its sending side: give what it was answered in this read
        // one chance to leave (best effort, never blocking) before the socket goes.
        if self.conn_mut(id).is_some_and(|c| !c.outbound.is_empty()) {
            self.flush(id);
        }
        self.close_now(id);
    }

    /// Processes the `n` bytes just read into the shared buffer. Returns false if the connection
    /// was closed.
    fn ingest(&mut self, id: ConnId, n: usize) -> bool {
        let Some(conn) = live(&mut self.conns, id) else {
            return false;
        };
        match conn.state {
            State::Handshaking => {
                conn.inbound.extend_from_slice(&self.recv_buf[..n]);
                self.on_request_bytes(id)
            }
            State::Open | State::Closing { .. } => {
                if conn.inbound.is_empty() {
                    // The common case: parse straight out of the shared buffer, and copy only an
                    // incomplete tail into the connection.
                    let mut recv_buf = std::mem::take(&mut self.recv_buf);
                    let result = self.on_frame_bytes(id, &mut recv_buf[..n]);
                    self.recv_buf = recv_buf;
                    match result {
                        Some(used) => {
                            let max_message = self.config.max_message;
                            if let Some(conn) = live(&mut self.conns, id) {
                                let budget =
                                    max_message.saturating_sub(conn.assembler.buffered_bytes());
                                keep_tail(&mut conn.inbound, &self.recv_buf[used..n], budget);
                            }
                            true
                        }
                        None => false,
                    }
                } else {
                    conn.inbound.extend_from_slice(&self.recv_buf[..n]);
                    self.on_buffered_frames(id)
                }
            }
            // The response (or our Close after a protocol error) is on its way; what the
            // client still sends is discarded.
            State::HttpResponding | State::Failing => true,
        }
    }

    /// Parses frames out of the connection's own `inbound` buffer.
    fn on_buffered_frames(&mut self, id: ConnId) -> bool {
        let Some(conn) = self.conn_mut(id) else {
            return false;
        };
        let mut inbound = std::mem::take(&mut conn.inbound);
        let max_message = self.config.max_message;
        match self.on_frame_bytes(id, &mut inbound) {
            Some(used) => {
                if let Some(conn) = self.conn_mut(id) {
                    if used == inbound.len() {
                        // Release the buffer: an idle connection holds none.
                        conn.inbound = Vec::new();
                    } else if used > 0 {
                        // A new partial frame now leads the buffer.
                        inbound.drain(..used);
                        let budget = max_message.saturating_sub(conn.assembler.buffered_bytes());
                        reserve_whole_frame(&mut inbound, budget);
                        conn.inbound = inbound;
                    } else {
                        conn.inbound = inbound;
                    }
                }
                true
            }
            None => false,
        }
    }

    /// Decodes and handles every complete frame at the start of `data` (unmasking in place).
    /// Returns how many bytes were consumed, or None if the connection was closed.
    fn on_frame_bytes(&mut self, id: ConnId, data: &mut [u8]) -> Option<usize> {
        let max_message = self.config.max_message;
        let mut used = 0;
        loop {
            let conn = self.conn_mut(id)?;
            if conn.close_after_flush {
                // Both Close frames are exchanged; nothing after them means anything.
                return Some(data.len());
            }
            // A frame may carry at most what is left of the message budget, which keeps the
            // partial-frame tail plus the open message within --max-message (SPEC §4).
            // Control frames (at most 125 bytes) may still arrive when the budget is nearly used
            // up; the assembler checks the message total for data frames itself.
            let max_payload = max_message
                .saturating_sub(conn.assembler.buffered_bytes())
                .max(frame::MAX_CONTROL_PAYLOAD);
            let rest = &mut data[used..];
            let decoded = match frame::decode_frame(rest, Role::Server, max_payload as u64) {
                Ok(Some(f)) => f,
                Ok(None) => {
                    if let Err(e) = on_partial_frame(conn, rest, max_payload) {
                        self.protocol_error(id, e);
                        return self.conn_mut(id).map(|_| data.len());
                    }
                    return Some(used);
                }
                Err(e) => {
                    self.protocol_error(id, e);
                    return self.conn_mut(id).map(|_| data.len());
                }
            };
            let start = used;
            used += decoded.len;
            let payload = &data[start + decoded.payload.start..start + decoded.payload.end];
            if !self.on_frame(id, &decoded.header, payload) {
                return self.conn_mut(id).map(|_| data.len());
            }
        }
    }

    /// Handles one decoded frame. Returns false when no further frames of this connection
    /// should be processed (it is closing or closed).
    fn on_frame(&mut self, id: ConnId, header: &frame::FrameHeader, payload: &[u8]) -> bool {
        let Some(conn) = live(&mut self.conns, id) else {
            return false;
        };
        if matches!(conn.state, State::Closing { .. }) && header.opcode != OpCode::Close {
            // After our Close, frames are read only to find the peer's Close (RFC 6455 §5.5.1);
            // data is ignored rather than assembled, so it cannot trip the message limits again.
            return true;
        }
        let event = match conn.assembler.push(header, payload) {
            Ok(Some(event)) => event,
            Ok(None) => return true,
            Err(e) => {
                self.protocol_error(id, e);
                return false;
            }
        };
        match event {
            WsEvent::Message { opcode, data } => {
                self.metrics.messages_in += 1;
                // A single-frame message borrows the frame's payload; an assembled one is owned.
                // Taking the owned buffer out ends the borrow of the assembler, so the app can
                // be given the slab (through the Outbox) while it reads the message.
                let assembled = match data {
                    Cow::Owned(bytes) => Some(bytes),
                    Cow::Borrowed(_) => None,
                };
                let message = assembled.as_deref().unwrap_or(payload);
                self.deliver(id, opcode, message);
                self.conn_mut(id)
                    .is_some_and(|c| matches!(c.state, State::Open))
            }
            WsEvent::Ping(payload) => {
                // RFC 6455 §5.5.2: a Pong carries the Ping's payload. Not after our Close.
                if matches!(conn.state, State::Open) {
                    conn.outbound.push_owned_with(
                        2 + payload.len(),
                        &mut self.outbound_pool,
                        |out| frame::encode_into(out, true, OpCode::Pong, payload, None),
                    );
                }
                self.check_outbound(id)
            }
            // Unsolicited Pongs are allowed and ignored (§5.5.3); any frame proves liveness.
            WsEvent::Pong(_) => true,
            WsEvent::Close(close) => {
                let code = close.as_ref().map(|c| c.code);
                Metrics::bump_code(
                    &mut self.metrics.closes_received,
                    code.map_or(CloseCode::NO_STATUS.0, |c| c.0),
                );
                match conn.state {
                    State::Open => {
                        // RFC 6455 §5.5.1: answer with a Close, echoing the status code.
                        let reply = match code {
                            Some(code) => frame::close_payload(code, ""),
                            None => Vec::new(),
                        };
                        if let Some(code) = code {
                            Metrics::bump_code(&mut self.metrics.closes_sent, code.0);
                        }
                        conn.outbound.push_owned_with(
                            2 + reply.len(),
                            &mut self.outbound_pool,
                            |out| frame::encode_into(out, true, OpCode::Close, &reply, None),
                        );
                        conn.state = State::Closing { received: true };
                        // The heartbeat no longer applies: the peer has until the close
                        // deadline to take our reply, or the socket is closed anyway.
                        set_deadline(
                            &mut self.timers,
                            conn,
                            self.now + self.config.close_timeout,
                            Deadline::Close,
                        );
                        debug!("{id:?} peer closed ({code:?}), answered");
                    }
                    State::Closing { .. } => {
                        conn.state = State::Closing { received: true };
                        debug!("{id:?} close handshake complete");
                    }
                    State::Handshaking | State::HttpResponding | State::Failing => {}
                }
                // The server closes TCP first once both Close frames are out (RFC 6455 §7.1.1).
                conn.close_after_flush = true;
                self.mark_dirty(id);
                self.closed_for_app(id);
                false
            }
        }
    }

    /// Calls into the app with the connection's session slot and an `Outbox`, then applies the
    /// closes the app asked for. The slot is `Some` exactly while the connection is open for
    /// the app.
    fn call_app(
        &mut self,
        id: ConnId,
        call: impl FnOnce(&mut H, &mut Option<H::Session>, &mut Outbox<'_>),
    ) {
        let slot = id.slot as usize;
        if self.sessions.len() <= slot {
            self.sessions.resize_with(slot + 1, || None);
        }
        let mut out = Outbox {
            conns: &mut self.conns,
            metrics: &mut self.metrics,
            dirty: &mut self.dirty,
            closes: &mut self.close_requests,
            pool: &mut self.outbound_pool,
            max_outbound: self.config.max_outbound,
            policy: self.config.slow_consumer,
        };
        call(&mut self.handler, &mut self.sessions[slot], &mut out);
        self.apply_close_requests();
    }

    /// Hands a data message to the app, with an `Outbox` for its replies.
    fn deliver(&mut self, id: ConnId, opcode: OpCode, message: &[u8]) {
        self.call_app(id, |app, slot, out| {
            if let Some(session) = slot.as_mut() {
                app.on_message(id, session, opcode, message, out);
            }
        });
    }

    /// The connection stops being open for the app (it is closing or gone): `on_close`, once.
    fn closed_for_app(&mut self, id: ConnId) {
        self.call_app(id, |app, slot, out| {
            if let Some(session) = slot.take() {
                app.on_close(id, session, out);
            }
        });
    }

    /// Applies the closes the app asked for. Closing one connection tells the app, which may
    /// ask for more closes (a slow member's departure announced to other slow members): those
    /// are applied by the outermost call's loop, not by recursion, so the depth stays constant.
    fn apply_close_requests(&mut self) {
        if self.applying_closes {
            return;
        }
        self.applying_closes = true;
        while let Some((id, code, reason)) = self.close_requests.pop() {
            self.start_close(id, code, reason);
        }
        self.applying_closes = false;
    }

    /// Applies the slow-consumer policy (SPEC §2). Returns false if the connection is closing.
    fn check_outbound(&mut self, id: ConnId) -> bool {
        let limit = self.config.max_outbound;
        let Some(conn) = self.conn_mut(id) else {
            return false;
        };
        if conn.outbound.queued_bytes() <= limit {
            return true;
        }
        // Control replies (pongs) are not droppable: a peer that floods pings without reading
        // is a slow consumer whatever the policy.
        self.metrics.slow_consumer_closes += 1;
        debug!("{id:?} exceeded --max-outbound; closing 1008");
        self.start_close(id, CloseCode::POLICY_VIOLATION, "slow consumer");
        false
    }

    /// Fails the connection (RFC 6455 §7.1.7): Close with the error's code, then stop parsing.
    fn protocol_error(&mut self, id: ConnId, error: ProtocolError) {
        debug!("{id:?} protocol error: {error}");
        Metrics::bump(&mut self.metrics.protocol_errors, error.reason());
        let Some(conn) = self.conn_mut(id) else {
            return;
        };
        if !matches!(conn.state, State::Open) {
            // Already closing: a broken frame now ends the wait for the peer's Close.
            self.close_now(id);
            return;
        }
        // Whatever message was being assembled is abandoned; release its buffer now.
        conn.assembler.reset();
        conn.inbound = Vec::new();
        self.start_close(id, error.close_code(), error.reason());
        if let Some(conn) = self.conn_mut(id) {
            conn.state = State::Failing;
        }
    }

    /// Sends our Close frame and waits (up to `--close-timeout`) for the peer's.
    fn start_close(&mut self, id: ConnId, code: CloseCode, reason: &str) {
        let deadline = self.now + self.config.close_timeout;
        let Some(conn) = live(&mut self.conns, id) else {
            return;
        };
        if !matches!(conn.state, State::Open) {
            return;
        }
        let payload = frame::close_payload(code, reason);
        conn.outbound
            .push_owned_with(2 + payload.len(), &mut self.outbound_pool, |out| {
                frame::encode_into(out, true, OpCode::Close, &payload, None)
            });
        conn.state = State::Closing { received: false };
        Metrics::bump_code(&mut self.metrics.closes_sent, code.0);
        set_deadline(&mut self.timers, conn, deadline, Deadline::Close);
        self.mark_dirty(id);
        self.closed_for_app(id);
    }

    // ----- handshake ---------------------------------------------------------------------

    /// Looks for a complete request head in `inbound`. Returns false if the connection was closed.
    fn on_request_bytes(&mut self, id: ConnId) -> bool {
        let Some(conn) = self.conn_mut(id) else {
            return false;
        };
        let (request, head_len) = match handshake::parse_request(&conn.inbound) {
            Ok(Some(parsed)) => parsed,
            Ok(None) => return true,
            Err(e) => {
                self.respond(id, e.status(), e.response());
                return true;
            }
        };
        let upgrade = request.is_upgrade_attempt();
        // The reactor's own endpoints: liveness and counters.
        if !upgrade && request.method == "GET" {
            match request.path.as_str() {
                "/healthz" => {
                    let ok =
                        handshake::http_response(200, "text/plain; charset=utf-8", &[], b"ok\n");
                    self.respond(id, 200, ok);
                    return true;
                }
                "/stats.json" => {
                    let body = self.render_stats();
                    let response = handshake::http_response(
                        200,
                        "application/json",
                        &[("Cache-Control", "no-store")],
                        body.as_bytes(),
                    );
                    self.respond(id, 200, response);
                    return true;
                }
                "/metrics" => {
                    let body = self.render_metrics();
                    let response = handshake::http_response(
                        200,
                        "text/plain; version=0.0.4; charset=utf-8",
                        &[],
                        body.as_bytes(),
                    );
                    self.respond(id, 200, response);
                    return true;
                }
                _ => {}
            }
        }
        let accept = if upgrade {
            match handshake::validate_upgrade(&request) {
                Ok(valid) => Some(valid.accept),
                Err(e) => {
                    self.respond(id, e.status(), e.response());
                    return true;
                }
            }
        } else {
            None
        };
        match (self.handler.route(id, &request), accept) {
            (Route::Upgrade { session, protocol }, Some(accept)) => {
                let response = handshake::upgrade_response(&accept, protocol);
                self.open(id, session, response, head_len)
            }
            (Route::Upgrade { .. }, None) => {
                let e = HandshakeError::NotWebSocket;
                self.respond(id, e.status(), e.response());
                true
            }
            (Route::Respond(status, response), _) => {
                self.respond(id, status, response);
                true
            }
        }
    }

    /// Completes the upgrade: queues the 101 response, tells the app, and processes frames that
    /// the client pipelined right behind its request (SPEC §3: they are kept, not lost).
    fn open(
        &mut self,
        id: ConnId,
        session: H::Session,
        response: Vec<u8>,
        head_len: usize,
    ) -> bool {
        let heartbeat = self.now + self.config.heartbeat_interval;
        let Some(conn) = live(&mut self.conns, id) else {
            return false;
        };
        conn.outbound
            .push_owned_with(response.len(), &mut self.outbound_pool, |out| {
                out.extend_from_slice(&response)
            });
        conn.state = State::Open;
        conn.last_activity = self.now;
        set_deadline(&mut self.timers, conn, heartbeat, Deadline::Heartbeat);
        conn.inbound.drain(..head_len);
        self.metrics.upgrades += 1;
        debug!("{id:?} upgraded");

        self.call_app(id, |app, slot, out| {
            app.on_open(id, slot.insert(session), out)
        });
        self.mark_dirty(id);

        let Some(conn) = self.conn_mut(id) else {
            return false;
        };
        if conn.inbound.is_empty() {
            conn.inbound = Vec::new();
            true
        } else {
            self.on_buffered_frames(id)
        }
    }

    /// Queues a complete HTTP response; the connection closes once it is sent and the client
    /// has hung up (or `--close-timeout` passes).
    fn respond(&mut self, id: ConnId, status: u16, response: Vec<u8>) {
        let deadline = self.now + self.config.close_timeout;
        let Some(conn) = live(&mut self.conns, id) else {
            return;
        };
        Metrics::bump_code(&mut self.metrics.http_responses, status);
        conn.outbound
            .push_owned_with(response.len(), &mut self.outbound_pool, |out| {
                out.extend_from_slice(&response)
            });
        conn.inbound = Vec::new();
        conn.state = State::HttpResponding;
        set_deadline(&mut self.timers, conn, deadline, Deadline::Close);
        self.mark_dirty(id);
        debug!("{id:?} answered HTTP {status}");
    }

    /// The live counters of the demo page (SPEC §8) as one flat JSON object of numbers (and
    /// the poller's name).
    fn render_stats(&self) -> String {
        let open = self
            .conns
            .iter()
            .filter(|(_, c)| c.state == State::Open)
            .count() as u64;
        let mut fields: Vec<(&'static str, u64)> = vec![
            ("connections", open),
            ("accepted", self.metrics.accepted),
            ("messages_in", self.metrics.messages_in),
            ("messages_out", self.metrics.messages_out),
            ("bytes_in", self.metrics.bytes_in),
            ("bytes_out", self.metrics.bytes_out),
            ("uptime_ms", self.started.elapsed().as_millis() as u64),
        ];
        self.handler.stats(&mut fields);
        let mut json = format!("{{\"poller\":\"{}\"", self.poller.name());
        for (name, value) in fields {
            json.push_str(&format!(",\"{name}\":{value}"));
        }
        json.push('}');
        json
    }

    fn render_metrics(&self) -> String {
        let mut counts = [
            ("handshaking", 0usize),
            ("open", 0),
            ("http", 0),
            ("closing", 0),
        ];
        for (_, conn) in &self.conns {
            let name = conn.state.name();
            if let Some(entry) = counts.iter_mut().find(|(n, _)| *n == name) {
                entry.1 += 1;
            }
        }
        let mut text = self.metrics.render(&Gauges {
            poller: self.poller.name(),
            connections: &counts,
        });
        self.handler.render_metrics(&mut text);
        text
    }

    // ----- write -------------------------------------------------------------------------

    /// Writes what is queued; keeps writable interest registered exactly while bytes remain.
    fn flush(&mut self, id: ConnId) {
        let Some(conn) = live(&mut self.conns, id) else {
            return;
        };
        if conn.id != id {
            return;
        }
        let before = conn.outbound.queued_bytes();
        let result = conn
            .outbound
            .flush(&mut conn.stream, &mut self.outbound_pool);
        self.metrics.bytes_out += (before - conn.outbound.queued_bytes()) as u64;
        match result {
            Ok(Flush::Done) => {
                if conn.write_interest {
                    conn.write_interest = false;
                    let fd = conn.stream.as_raw_fd();
                    if let Err(e) =
                        self.poller
                            .reregister(fd, Token(id.token()), Interest::READABLE)
                    {
                        warn!("{id:?} reregister failed: {e}");
                        self.close_now(id);
                        return;
                    }
                }
                self.after_flush(id);
            }
            Ok(Flush::Blocked) => {
                if !conn.write_interest {
                    conn.write_interest = true;
                    let fd = conn.stream.as_raw_fd();
                    if let Err(e) = self
                        .poller
                        .reregister(fd, Token(id.token()), Interest::BOTH)
                    {
                        warn!("{id:?} reregister failed: {e}");
                        self.close_now(id);
                    }
                }
            }
            Err(e) => {
                debug!("{id:?} write error: {e}");
                self.metrics.abnormal_closes += 1;
                self.close_now(id);
            }
        }
    }

    /// Everything queued is written: finish whatever was waiting for that.
    fn after_flush(&mut self, id: ConnId) {
        let Some(conn) = self.conn_mut(id) else {
            return;
        };
        if conn.close_after_flush {
            self.close_now(id);
        } else if matches!(conn.state, State::HttpResponding | State::Failing) {
            // Half-close: the client reads our response to its end and then hangs up. Closing
            // outright could reset the connection and lose the response if the client is still
            // sending (RFC 7230 §6.6).
            let _ = conn.stream.shutdown(Shutdown::Write);
        }
    }

    // ----- timers ------------------------------------------------------------------------

    fn on_deadline(&mut self, id: ConnId, deadline: Deadline) {
        let now = self.now;
        let interval = self.config.heartbeat_interval;
        let pong_timeout = self.config.heartbeat_timeout;
        let Some(conn) = live(&mut self.conns, id) else {
            return;
        };
        conn.timer = None;
        match deadline {
            Deadline::Handshake => {
                debug!("{id:?} handshake deadline passed");
                self.metrics.handshake_timeouts += 1;
                self.close_now(id);
            }
            Deadline::Close => {
                debug!("{id:?} close deadline passed");
                self.metrics.close_timeouts += 1;
                self.close_now(id);
            }
            // A stale heartbeat for a connection that is no longer open: its close deadline
            // governs now (armed when it left Open).
            Deadline::Heartbeat | Deadline::Pong if conn.state != State::Open => {}
            Deadline::Heartbeat => {
                let quiet_since = conn.last_activity;
                if now < quiet_since + interval {
                    // There was traffic: sleep for the rest of the interval (SPEC §5).
                    conn.timer = Some(self.timers.arm(
                        quiet_since + interval,
                        TimerEvent::Conn(id, Deadline::Heartbeat),
                    ));
                } else {
                    conn.outbound
                        .push_owned_with(2, &mut self.outbound_pool, |out| {
                            frame::encode_into(out, true, OpCode::Ping, b"", None)
                        });
                    conn.awaiting_pong = true;
                    conn.timer = Some(
                        self.timers
                            .arm(now + pong_timeout, TimerEvent::Conn(id, Deadline::Pong)),
                    );
                    self.metrics.pings_sent += 1;
                    self.mark_dirty(id);
                }
            }
            Deadline::Pong => {
                // Had anything arrived since the Ping, this timer would have been cancelled.
                debug!("{id:?} did not answer the heartbeat; dropping as half-open");
                self.metrics.half_open_drops += 1;
                self.close_now(id);
            }
        }
    }

    // ----- close -------------------------------------------------------------------------

    /// Closes the TCP connection and forgets it.
    fn close_now(&mut self, id: ConnId) {
        if self.conn_mut(id).is_none() {
            return;
        }
        self.closed_for_app(id);
        let conn = self.conns.remove(id.slot as usize);
        if conn.rejected {
            self.rejecting -= 1;
        }
        if let Some(timer) = conn.timer {
            self.timers.cancel(timer);
        }
        // Deregister before the descriptor is closed, so that no event for it (or for a new
        // socket that reuses its number) can follow.
        let _ = self.poller.deregister(conn.stream.as_raw_fd());
        debug!(
            "{id:?} ({}) closed in state {}",
            conn.peer,
            conn.state.name()
        );
        // Dropping the stream closes the descriptor.
    }
}

/// Replaces the connection's one pending timer (each state has exactly one deadline). A free
/// function for the same reason as `live`.
fn set_deadline(
    timers: &mut TimerWheel<TimerEvent>,
    conn: &mut Connection,
    at: Instant,
    deadline: Deadline,
) {
    if let Some(old) = conn.timer.take() {
        timers.cancel(old);
    }
    conn.timer = Some(timers.arm(at, TimerEvent::Conn(conn.id, deadline)));
}

/// The connection `id` names, if it is still the one in its slot. A free function (not a
/// method) so that callers can borrow other fields of the reactor at the same time.
fn live(conns: &mut Slab<Connection>, id: ConnId) -> Option<&mut Connection> {
    conns
        .get_mut(id.slot as usize)
        .filter(|c| c.id.generation == id.generation)
}

/// Keeps the unconsumed tail of the shared buffer in the connection (allocating only then).
fn keep_tail(inbound: &mut Vec<u8>, tail: &[u8], max_payload: usize) {
    debug_assert!(inbound.is_empty());
    if !tail.is_empty() {
        inbound.extend_from_slice(tail);
        reserve_whole_frame(inbound, max_payload);
    }
}

/// An incomplete frame waits for its tail. Once its header is known, text is validated as far
/// as it has arrived, failing fast on invalid UTF-8.
fn on_partial_frame(
    conn: &mut Connection,
    partial: &[u8],
    max_payload: usize,
) -> Result<(), ProtocolError> {
    let Ok(Some(header)) = frame::decode_header(partial, Role::Server, max_payload as u64) else {
        return Ok(());
    };
    let payload = partial.get(header.header_len..).unwrap_or_default();
    conn.assembler.check_partial(&header, payload)
}

/// `inbound` holds the start of a frame: reserve room for all of it at once (the header says
/// how much), instead of letting the buffer double its way there read by read, which could
/// reach twice the frame's size.
fn reserve_whole_frame(inbound: &mut Vec<u8>, max_payload: usize) {
    if let Ok(Some(header)) = frame::decode_header(inbound, Role::Server, max_payload as u64) {
        let total = header.header_len + header.payload_len as usize;
        inbound.reserve_exact(total.saturating_sub(inbound.len()));
    }
}
