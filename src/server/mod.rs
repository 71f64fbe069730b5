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
//! 4. Fire expired timers (handshake, heartbeat, pong and close deadlines).
//!
//! Each connection is flushed right after its input has been processed, so all the replies one
//! read produced leave in one vectored write.

pub mod config;
pub mod connection;
pub mod metrics;
pub mod outbound;

pub use config::Config;

use crate::poller::{Event, Interest, Poller, Token};
use crate::protocol::frame::{self, OpCode, Role};
use crate::protocol::handshake::{self, HandshakeError, Request};
use crate::protocol::message::Event as WsEvent;
use crate::protocol::{CloseCode, ProtocolError};
use crate::timer::TimerWheel;
use connection::{ConnId, Connection, Deadline, Endpoint, State};
use log::{debug, info, trace, warn};
use metrics::{Gauges, Metrics};
use mio::net::{TcpListener, TcpStream};
use outbound::Flush;
use slab::Slab;
use std::io::{self, Read, Write};
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

const LISTENER: Token = Token(usize::MAX);

/// Why the loop stopped.
#[derive(Debug, PartialEq, Eq)]
pub enum Exit {
    /// Shutdown completed (all connections closed or the shutdown deadline passed).
    Graceful,
}

pub struct Reactor<P: Poller> {
    /// The readiness backend (epoll/kqueue, poll or select).
    poller: P,
    listener: TcpListener,
    local_addr: SocketAddr,
    conns: Slab<Connection>,
    /// Bumped for every accepted connection, so that ids of closed connections are never reused.
    next_generation: u32,
    /// The one receive buffer of SPEC §2, shared by every connection.
    recv_buf: Box<[u8]>,
    /// Connections that still had input when their read budget ran out. Served first thing in
    /// the next iteration, with a zero poll timeout: edge-triggered backends would not report
    /// them again.
    ready: Vec<ConnId>,
    events: Vec<Event>,
    timers: TimerWheel<(ConnId, Deadline)>,
    expired: Vec<(ConnId, Deadline)>,
    config: Config,
    metrics: Metrics,
    /// The time read once per loop iteration; everything in one iteration uses it.
    now: Instant,
}

impl<P: Poller> Reactor<P> {
    /// Binds the listener and registers it with the poller.
    ///
    /// # Errors
    /// The address is taken or invalid, or the poller refuses the listener.
    pub fn bind(mut poller: P, mut config: Config) -> io::Result<Reactor<P>> {
        let listener = TcpListener::bind(config.listen)?;
        if let Some(limit) = poller.fd_limit() {
            // Descriptors below the listener's are taken by stdio, the poller and the listener
            // itself; every connection needs one more, below the backend's limit.
            let cap = limit.saturating_sub(listener.as_raw_fd() as usize + 1);
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
            listener,
            local_addr,
            conns: Slab::new(),
            next_generation: 0,
            recv_buf: vec![0u8; RECV_BUFFER_BYTES].into_boxed_slice(),
            ready: Vec::new(),
            events: Vec::with_capacity(1024),
            timers: TimerWheel::new(config.timer_tick, TIMER_SLOTS, now),
            expired: Vec::new(),
            config,
            metrics: Metrics::default(),
            now,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn poller_name(&self) -> &'static str {
        self.poller.name()
    }

    /// Runs the loop until shutdown.
    ///
    /// # Errors
    /// Only a failure of the poller itself; errors on one connection close that connection.
    pub fn run(&mut self) -> io::Result<Exit> {
        loop {
            self.turn()?;
        }
    }

    /// One iteration of the loop (see the module doc).
    fn turn(&mut self) -> io::Result<()> {
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

        for event in &events {
            trace!("event {event:?}");
            if event.token == LISTENER {
                self.accept_all();
            } else {
                let id = ConnId::from_token(event.token.0);
                if event.readable {
                    self.on_readable(id);
                }
                if event.writable {
                    self.flush(id);
                }
            }
        }
        self.events = events;

        for id in std::mem::take(&mut self.ready) {
            if let Some(conn) = self.conn_mut(id) {
                conn.on_ready_list = false;
                self.on_readable(id);
            }
        }

        self.timers.expire(self.now, &mut self.expired);
        for (id, deadline) in std::mem::take(&mut self.expired) {
            self.metrics.timer_expiries += 1;
            self.on_deadline(id, deadline);
        }
        Ok(())
    }

    /// The connection `id` names, if it is still the one in its slot (see `ConnId`).
    fn conn_mut(&mut self, id: ConnId) -> Option<&mut Connection> {
        live(&mut self.conns, id)
    }

    // ----- accept ------------------------------------------------------------------------

    fn accept_all(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, peer)) => self.admit(stream, peer),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => continue,
                Err(e) => {
                    // EMFILE/ENFILE and friends: stop for this iteration; the listener stays
                    // registered, and edge-triggered backends report it again on the next
                    // connection attempt.
                    warn!("accept failed: {e}");
                    self.metrics.accept_pauses += 1;
                    return;
                }
            }
        }
    }

    fn admit(&mut self, stream: TcpStream, peer: SocketAddr) {
        self.metrics.accepted += 1;
        if self.conns.len() >= self.config.max_connections {
            Metrics::bump(&mut self.metrics.rejected, "max_connections");
            Metrics::bump_code(&mut self.metrics.http_responses, 503);
            // Best effort: a fresh socket's send buffer is empty, so this small write fits.
            let _ = (&stream).write(&HandshakeError::ServiceUnavailable.response());
            let _ = stream.shutdown(Shutdown::Write);
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
            (id, Deadline::Handshake),
        ));
        entry.insert(conn);
        debug!("{peer} connected as {id:?}");
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
        self.flush(id);
    }

    fn on_eof(&mut self, id: ConnId) {
        let Some(conn) = self.conn_mut(id) else {
            return;
        };
        match conn.state {
            // The peer hung up after our response or our Close: the expected ending.
            State::HttpResponding | State::Closing { .. } | State::Failing => {}
            State::Handshaking | State::Open(_) => {
                debug!("{id:?} hung up without a close handshake");
                self.metrics.abnormal_closes += 1;
            }
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
            State::Open(_) | State::Closing { .. } => {
                if conn.inbound.is_empty() {
                    // The common case: parse straight out of the shared buffer, and copy only an
                    // incomplete tail into the connection.
                    let mut recv_buf = std::mem::take(&mut self.recv_buf);
                    let result = self.on_frame_bytes(id, &mut recv_buf[..n]);
                    self.recv_buf = recv_buf;
                    match result {
                        Some(used) => {
                            if let Some(conn) = live(&mut self.conns, id) {
                                keep_tail(&mut conn.inbound, &self.recv_buf[used..n]);
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
        match self.on_frame_bytes(id, &mut inbound) {
            Some(used) => {
                if let Some(conn) = self.conn_mut(id) {
                    if used == inbound.len() {
                        // Release the buffer: an idle connection holds none.
                        conn.inbound = Vec::new();
                    } else {
                        inbound.drain(..used);
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
            let max_payload = max_message.saturating_sub(conn.assembler.buffered_bytes());
            let rest = &mut data[used..];
            let decoded = match frame::decode_frame(rest, Role::Server, max_payload as u64) {
                Ok(Some(f)) => f,
                Ok(None) => {
                    reserve_for_frame(&mut conn.inbound, rest, max_payload);
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
                // Only Open connections get here: frames after our Close skip the assembler.
                let State::Open(endpoint) = conn.state else {
                    return true;
                };
                match endpoint {
                    Endpoint::Echo => {
                        conn.outbound.push_owned_with(
                            frame::header_len(data.len(), false) + data.len(),
                            |out| frame::encode_into(out, true, opcode, &data, None),
                        );
                        self.metrics.messages_out += 1;
                    }
                }
                drop(data);
                self.check_outbound(id)
            }
            WsEvent::Ping(payload) => {
                // RFC 6455 §5.5.2: a Pong carries the Ping's payload. Not after our Close.
                if matches!(conn.state, State::Open(_)) {
                    conn.outbound.push_owned_with(2 + payload.len(), |out| {
                        frame::encode_into(out, true, OpCode::Pong, payload, None)
                    });
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
                    State::Open(_) => {
                        // RFC 6455 §5.5.1: answer with a Close, echoing the status code.
                        let reply = match code {
                            Some(code) => frame::close_payload(code, ""),
                            None => Vec::new(),
                        };
                        if let Some(code) = code {
                            Metrics::bump_code(&mut self.metrics.closes_sent, code.0);
                        }
                        conn.outbound.push_owned_with(2 + reply.len(), |out| {
                            frame::encode_into(out, true, OpCode::Close, &reply, None)
                        });
                        conn.state = State::Closing { received: true };
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
                false
            }
        }
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
        if !matches!(conn.state, State::Open(_)) {
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
        if !matches!(conn.state, State::Open(_)) {
            return;
        }
        let payload = frame::close_payload(code, reason);
        conn.outbound.push_owned_with(2 + payload.len(), |out| {
            frame::encode_into(out, true, OpCode::Close, &payload, None)
        });
        conn.state = State::Closing { received: false };
        Metrics::bump_code(&mut self.metrics.closes_sent, code.0);
        if let Some(old) = conn.timer.take() {
            self.timers.cancel(old);
        }
        conn.timer = Some(self.timers.arm(deadline, (id, Deadline::Close)));
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
        match route(&request) {
            Route::Upgrade(endpoint) => match handshake::validate_upgrade(&request) {
                Ok(upgrade) => {
                    let response = handshake::upgrade_response(&upgrade.accept, None);
                    self.open(id, endpoint, response, head_len)
                }
                Err(e) => {
                    self.respond(id, e.status(), e.response());
                    true
                }
            },
            Route::Respond(status, response) => {
                self.respond(id, status, response);
                true
            }
            Route::Metrics => {
                let body = self.render_metrics();
                let response = handshake::http_response(
                    200,
                    "text/plain; version=0.0.4; charset=utf-8",
                    &[],
                    body.as_bytes(),
                );
                self.respond(id, 200, response);
                true
            }
        }
    }

    /// Completes the upgrade: queues the 101 response and processes frames that the client
    /// pipelined right behind its request (SPEC §3: they are kept, not lost).
    fn open(&mut self, id: ConnId, endpoint: Endpoint, response: Vec<u8>, head_len: usize) -> bool {
        let heartbeat = self.now + self.config.heartbeat_interval;
        let Some(conn) = live(&mut self.conns, id) else {
            return false;
        };
        conn.outbound
            .push_owned_with(response.len(), |out| out.extend_from_slice(&response));
        conn.state = State::Open(endpoint);
        conn.last_activity = self.now;
        if let Some(old) = conn.timer.take() {
            self.timers.cancel(old);
        }
        conn.timer = Some(self.timers.arm(heartbeat, (id, Deadline::Heartbeat)));
        self.metrics.upgrades += 1;
        debug!("{id:?} upgraded to {endpoint:?}");

        conn.inbound.drain(..head_len);
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
            .push_owned_with(response.len(), |out| out.extend_from_slice(&response));
        conn.inbound = Vec::new();
        conn.state = State::HttpResponding;
        if let Some(old) = conn.timer.take() {
            self.timers.cancel(old);
        }
        conn.timer = Some(self.timers.arm(deadline, (id, Deadline::Close)));
        debug!("{id:?} answered HTTP {status}");
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
        self.metrics.render(&Gauges {
            poller: self.poller.name(),
            connections: &counts,
        })
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
        let result = conn.outbound.flush(&mut conn.stream);
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
            Deadline::Heartbeat => {
                let quiet_since = conn.last_activity;
                if now < quiet_since + interval {
                    // There was traffic: sleep for the rest of the interval (SPEC §5).
                    conn.timer = Some(
                        self.timers
                            .arm(quiet_since + interval, (id, Deadline::Heartbeat)),
                    );
                } else {
                    conn.outbound.push_owned_with(2, |out| {
                        frame::encode_into(out, true, OpCode::Ping, b"", None)
                    });
                    conn.pinged_at = now;
                    conn.timer = Some(self.timers.arm(now + pong_timeout, (id, Deadline::Pong)));
                    self.metrics.pings_sent += 1;
                    self.flush(id);
                }
            }
            Deadline::Pong => {
                if conn.last_activity > conn.pinged_at {
                    conn.timer = Some(
                        self.timers
                            .arm(conn.last_activity + interval, (id, Deadline::Heartbeat)),
                    );
                } else {
                    debug!("{id:?} did not answer the heartbeat; dropping as half-open");
                    self.metrics.half_open_drops += 1;
                    self.close_now(id);
                }
            }
        }
    }

    // ----- close -------------------------------------------------------------------------

    /// Closes the TCP connection and forgets it.
    fn close_now(&mut self, id: ConnId) {
        if self.conn_mut(id).is_none() {
            return;
        }
        let conn = self.conns.remove(id.slot as usize);
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

/// The connection `id` names, if it is still the one in its slot. A free function (not a
/// method) so that callers can borrow other fields of the reactor at the same time.
fn live(conns: &mut Slab<Connection>, id: ConnId) -> Option<&mut Connection> {
    conns
        .get_mut(id.slot as usize)
        .filter(|c| c.id.generation == id.generation)
}

/// Keeps the unconsumed tail of the shared buffer in the connection (allocating only then).
fn keep_tail(inbound: &mut Vec<u8>, tail: &[u8]) {
    debug_assert!(inbound.is_empty());
    if !tail.is_empty() {
        inbound.extend_from_slice(tail);
    }
}

/// When the header of a large partial frame is known, reserve room for all of it at once
/// instead of growing the buffer read by read.
fn reserve_for_frame(inbound: &mut Vec<u8>, partial: &[u8], max_payload: usize) {
    if let Ok(Some(header)) = frame::decode_header(partial, Role::Server, max_payload as u64) {
        let total = header.header_len + header.payload_len as usize;
        if total > RECV_BUFFER_BYTES {
            inbound.reserve_exact(total.saturating_sub(inbound.len()));
        }
    }
}

/// Where a request goes, decided by method and path alone.
enum Route {
    Upgrade(Endpoint),
    Respond(u16, Vec<u8>),
    Metrics,
}

fn route(request: &Request) -> Route {
    let websocket_endpoint = match request.path.as_str() {
        "/echo" => Some(Endpoint::Echo),
        _ => None,
    };
    if request.method != "GET" {
        return Route::Respond(405, HandshakeError::MethodNotAllowed.response());
    }
    if let Some(endpoint) = websocket_endpoint {
        if request.is_upgrade_attempt() {
            return Route::Upgrade(endpoint);
        }
        return Route::Respond(
            426,
            handshake::http_response(
                426,
                "text/plain; charset=utf-8",
                &[("Upgrade", "websocket"), ("Sec-WebSocket-Version", "13")],
                b"this endpoint speaks WebSocket: send an upgrade request\n",
            ),
        );
    }
    if request.is_upgrade_attempt() {
        return Route::Respond(404, HandshakeError::NotFound.response());
    }
    match request.path.as_str() {
        "/healthz" => Route::Respond(
            200,
            handshake::http_response(200, "text/plain; charset=utf-8", &[], b"ok\n"),
        ),
        "/metrics" => Route::Metrics,
        "/" => Route::Respond(
            200,
            handshake::http_response(
                200,
                "text/plain; charset=utf-8",
                &[],
                b"wsrelay\n\nendpoints: /echo (WebSocket echo), /healthz, /metrics\n",
            ),
        ),
        _ => Route::Respond(404, HandshakeError::NotFound.response()),
    }
}
