//! What happens when bytes arrive: the one place the reactor reads a socket.
//!
//! Owns: `on_readable` (read into the shared receive buffer until `WouldBlock` or the read
//! budget is spent; the activity clock; the ready list), end of stream, and handing each read to
//! the request parser (`http.rs`) or the frame reader (`websocket.rs`) by state.
//! Does not: parse anything itself, or drive TLS: a connection's TLS session sits inside
//! `tls::read_socket`, which reads like a socket.

use super::connection::{ConnId, Deadline, State};
use super::http::MAX_PIPELINED_BYTES;
use super::tls::read_socket;
use super::{live, Handler, Reactor, READ_BUDGET_BYTES};
use crate::poller::Poller;
use log::debug;
use std::io;

impl<P: Poller, H: Handler> Reactor<P, H> {
    /// Reads the connection until `WouldBlock` or until its read budget is spent; then it goes
    /// on the ready list, to be read again in the next iteration (see `turn`).
    pub(super) fn on_readable(&mut self, id: ConnId) {
        self.read_input(id, false);
    }

    /// `on_readable` for a readiness event of the poller. On a backend where a short read proves
    /// the socket drained (edge-triggered epoll, `Poller::short_read_drains`), an event without
    /// a hangup or an error is read until a short read instead of until `WouldBlock`: the read
    /// that would only say `WouldBlock` was a third of the server's syscalls (docs/pollers.md,
    /// "When a short read is enough", says why nothing can be missed).
    pub(super) fn on_readable_event(&mut self, id: ConnId, hangup_or_error: bool) {
        let stop_short = !hangup_or_error && self.poller.short_read_drains();
        self.read_input(id, stop_short);
    }

    /// The read loop of `on_readable`; `stop_short`: a short read ends it (see
    /// `on_readable_event`).
    fn read_input(&mut self, id: ConnId, stop_short: bool) {
        let mut budget = READ_BUDGET_BYTES;
        loop {
            let Some(conn) = live(&mut self.conns, id) else {
                return;
            };
            if conn.exchange().read_paused {
                // Paused (see below, and `http::MAX_QUEUED_ANSWER_BYTES`): an event that came
                // before the pause, or the ready list, finds nothing to do.
                break;
            }
            if conn.exchange().waiting && conn.request.len() >= MAX_PIPELINED_BYTES {
                // Enough requests wait behind the one the app is answering: leave the rest in
                // TCP's buffers until the answer (`resume_requests` reads again).
                self.metrics.http_read_pauses += 1;
                self.pause_reading(id);
                break;
            }
            let n = match read_socket(conn, &mut self.recv_buf) {
                Ok(0) => {
                    self.on_eof(id);
                    return;
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.on_read_error(id, e);
                    return;
                }
            };
            // Short: the kernel had fewer bytes than the buffer holds, so its queue is empty
            // now. Only a plain socket's read says so; a TLS session's plaintext count does not.
            let short = n < self.recv_buf.len() && conn.tls.is_none();
            self.metrics.bytes_in += n as u64;
            // Any bytes count as activity, not only whole frames: a large frame still arriving
            // proves the peer alive (SPEC §5).
            conn.last_activity = self.now_stamp;
            if conn.awaiting_pong() {
                // The peer is alive: the pong deadline gives way to the next heartbeat.
                let next = self.now + self.config.heartbeat_interval;
                conn.set_deadline(&mut self.timers, next, Deadline::Heartbeat);
            }
            if conn.tls.is_some() {
                // A handshake that completed in this read is counted before its first request
                // is served (a /metrics read sees its own handshake).
                self.after_tls_read(id);
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
            if short && stop_short {
                self.metrics.reads_stopped_short += 1;
                break;
            }
        }
        if self.conn_mut(id).is_some_and(|c| c.tls.is_some()) {
            self.after_tls_read(id);
        }
        if self.conn_mut(id).is_some_and(|c| !c.outbound.is_empty()) {
            self.mark_dirty(id);
        }
    }

    /// The completion path's pause point for `MAX_PIPELINED_BYTES` (`read_input` is the
    /// readiness one): a completion backend has already received the bytes, which are kept
    /// even past the bound; pausing (through `Poller::pause_receive`, see
    /// `http::pause_reading`) stops the next ones.
    pub(super) fn pause_reading_if_full(&mut self, id: ConnId) {
        let Some(conn) = self.conn_mut(id) else {
            return;
        };
        let exchange = conn.exchange();
        if !exchange.read_paused && exchange.waiting && conn.request.len() >= MAX_PIPELINED_BYTES {
            self.metrics.http_read_pauses += 1;
            self.pause_reading(id);
        }
    }

    /// The peer hung up (or shut its sending side).
    pub(super) fn on_eof(&mut self, id: ConnId) {
        // A TLS client that gave up on its handshake counts in the TLS stats as well.
        self.count_tls_eof(id);
        let Some(conn) = self.conn_mut(id) else {
            return;
        };
        let exchange = conn.exchange();
        if conn.state() == State::Handshaking
            && (exchange.waiting || (exchange.read_paused && !conn.request.is_empty()))
        {
            // A client may send its last request and shut its sending side (RFC 7230 §6.6):
            // what it asked is answered first, even when the answer comes in a later callback
            // (the file engine's fsync). Not read again: the stream is at its end, and a
            // level-triggered poller would report it on every iteration.
            conn.exchange_mut().peer_done = true;
            self.pause_reading(id);
            return;
        }
        match conn.state() {
            // The peer hung up after our response or our Close: the expected ending.
            State::HttpResponding { .. } | State::Closing | State::Closed | State::Failing => {}
            // A kept-alive HTTP connection between two requests: its normal end.
            State::Handshaking
                if conn.exchange().answered > 0
                    && conn.request.is_empty()
                    && !conn.exchange().waiting => {}
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

    /// Hands the `n` bytes just read into the shared buffer to whatever the connection's state
    /// expects. Returns false if the connection was closed.
    pub(super) fn ingest(&mut self, id: ConnId, n: usize) -> bool {
        let mut recv_buf = std::mem::take(&mut self.recv_buf);
        let open = self.ingest_bytes(id, &mut recv_buf[..n]);
        self.recv_buf = recv_buf;
        open
    }

    /// Hands bytes received for `id` (in the shared buffer, or in a completion backend's
    /// receive buffer) to whatever the connection's state expects. Returns false if the
    /// connection was closed.
    pub(super) fn ingest_bytes(&mut self, id: ConnId, bytes: &mut [u8]) -> bool {
        let Some(conn) = live(&mut self.conns, id) else {
            return false;
        };
        match conn.state() {
            State::Handshaking => {
                if conn.deadline_kind() == Some(Deadline::KeepAlive) {
                    // The next request on a kept-alive connection has begun: it has the same
                    // deadline to complete as any request.
                    let deadline = self.now + self.config.handshake_timeout;
                    conn.set_deadline(&mut self.timers, deadline, Deadline::Handshake);
                }
                conn.request.extend_from_slice(bytes);
                self.on_request_bytes(id)
            }
            State::Open | State::Closing => {
                // Frames are parsed straight out of the receive buffer (SPEC §2); the reader
                // copies only an incomplete tail into the connection.
                self.on_frames(id, bytes);
                self.conn_mut(id).is_some()
            }
            // Our response or our last Close is on its way (after a completed close handshake,
            // or a protocol error); what the client still sends is discarded.
            State::HttpResponding { .. } | State::Closed | State::Failing => true,
        }
    }
}
