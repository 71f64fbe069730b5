//! How connections end, and how the server does: deadlines, closes, signals, shutdown.
//!
//! Owns: `on_deadline` (handshake, heartbeat, pong and close deadlines, SPEC §5), our Close
//! (`start_close`, and `protocol_error` which fails the connection, RFC 6455 §7.1.7),
//! `close_now` (the one place a connection leaves the slab), and the signal-driven graceful
//! shutdown (SPEC §2).
//! Does not: decide when the app closes a connection (it asks through the `Outbox`), or send
//! anything itself (`queue_control` in `flush.rs`).

use super::connection::{ConnId, Deadline, Stamp, State};
use super::metrics::Metrics;
use super::{live, Exit, Handler, Reactor, TimerEvent};
use crate::poller::Poller;
use crate::protocol::frame::{self, OpCode};
use crate::protocol::{CloseCode, ProtocolError};
use log::{debug, info, warn};
use std::os::fd::AsRawFd;

impl<P: Poller, H: Handler> Reactor<P, H> {
    /// A connection's deadline fired (ignored if the connection is gone).
    pub(super) fn on_deadline(&mut self, id: ConnId, deadline: Deadline) {
        match deadline {
            Deadline::Handshake => {
                if self.deadline_fired(id) {
                    debug!("{id:?} handshake deadline passed");
                    self.metrics.handshake_timeouts += 1;
                    self.count_tls_timeout(id);
                    self.close_now(id);
                }
            }
            Deadline::Close => {
                if self.deadline_fired(id) {
                    debug!("{id:?} close deadline passed");
                    self.metrics.close_timeouts += 1;
                    self.close_now(id);
                }
            }
            Deadline::KeepAlive => {
                // The normal end of an idle kept-alive HTTP connection: nothing is owed to it.
                if self.deadline_fired(id) {
                    debug!("{id:?} idle keep-alive connection closed");
                    self.close_now(id);
                }
            }
            Deadline::Heartbeat => self.on_heartbeat(id),
            Deadline::Pong => self.on_pong_deadline(id),
        }
    }

    /// Takes the fired timer off the connection. False if the connection is gone.
    fn deadline_fired(&mut self, id: ConnId) -> bool {
        let Some(conn) = self.conn_mut(id) else {
            return false;
        };
        conn.deadline_fired();
        true
    }

    /// The heartbeat interval has passed: sleep on if there was traffic, else Ping (SPEC §5).
    fn on_heartbeat(&mut self, id: ConnId) {
        let now = self.now;
        let interval = self.config.heartbeat_interval;
        let pong_timeout = self.config.heartbeat_timeout;
        let Some(conn) = live(&mut self.conns, id) else {
            return;
        };
        conn.deadline_fired();
        // Not reached: leaving Open replaces the heartbeat with the close deadline. Kept so
        // that a stale heartbeat can never Ping a closing connection.
        if conn.state() != State::Open {
            return;
        }
        let quiet_for = conn.last_activity.until(Stamp::at(self.started, now));
        if quiet_for < interval {
            // There was traffic: sleep for the rest of the interval.
            conn.set_deadline(
                &mut self.timers,
                now + (interval - quiet_for),
                Deadline::Heartbeat,
            );
        } else {
            conn.set_deadline(&mut self.timers, now + pong_timeout, Deadline::Pong);
            self.metrics.pings_sent += 1;
            self.queue_control(id, OpCode::Ping, b"");
        }
    }

    /// The heartbeat Ping has gone unanswered for `--heartbeat-timeout`, as far as the loop has
    /// read. That is not yet silence: the answer may be waiting unread, because it arrived after
    /// this iteration's wait, or during a stall of the process (a wait interrupted after
    /// SIGSTOP/SIGCONT reports nothing), or the wait reported other sockets and not this one.
    /// So the connection is read first, on every backend, and dropped as half-open only if
    /// still no byte has arrived (SPEC §5).
    fn on_pong_deadline(&mut self, id: ConnId) {
        // The connection keeps its Pong mark while it is read: `on_readable` replaces it with
        // the next heartbeat as soon as any byte arrives, as it does for every read. (The timer
        // has already left the wheel; replacing it cancels nothing.) A connection without the
        // mark left Open after this timer was collected: its deadline is another one now.
        if !self.conn_mut(id).is_some_and(|c| c.awaiting_pong()) {
            return;
        }
        if self.poller.completion_based() {
            // Nothing to read directly: what has arrived is in completions not yet reaped.
            self.collect_completions();
        } else {
            self.on_readable(id);
        }
        let Some(conn) = self.conn_mut(id) else {
            return; // the read found EOF or an error
        };
        if !conn.awaiting_pong() {
            return; // bytes arrived: alive
        }
        conn.deadline_fired();
        debug!("{id:?} did not answer the heartbeat; dropping as half-open");
        self.metrics.half_open_drops += 1;
        self.close_now(id);
    }

    /// Sends our Close frame and waits (up to `--close-timeout`) for the peer's. Only from Open.
    pub(super) fn start_close(&mut self, id: ConnId, code: CloseCode, reason: &str) {
        if self.send_close(id, code, reason) {
            if let Some(conn) = self.conn_mut(id) {
                conn.close_sent();
            }
            self.closed_for_app(id);
        }
    }

    /// Fails the connection (RFC 6455 §7.1.7): Close with the error's code, then stop parsing.
    pub(super) fn protocol_error(&mut self, id: ConnId, error: ProtocolError) {
        debug!("{id:?} protocol error: {error}");
        Metrics::bump(&mut self.metrics.protocol_errors, error.reason());
        if self.conn_mut(id).is_some_and(|c| c.state() != State::Open) {
            // Already closing: a broken frame now ends the wait for the peer's Close. What was
            // queued before our Close (acks, echoes, the Close itself) gets one best-effort,
            // non-blocking write first, as on EOF, so that a reset does not destroy it when the
            // socket has room for it.
            if self.conn_mut(id).is_some_and(|c| !c.outbound.is_empty()) {
                self.flush(id);
            }
            self.close_now(id);
            return;
        }
        if self.send_close(id, error.close_code(), error.reason()) {
            if let Some(conn) = self.conn_mut(id) {
                conn.failed();
            }
            self.closed_for_app(id);
        }
    }

    /// Queues our Close on an open connection and gives the peer until the close deadline to
    /// answer. Returns false (nothing done) unless the connection is open. The caller takes the
    /// state's edge (Closing, or Failing) and tells the app.
    fn send_close(&mut self, id: ConnId, code: CloseCode, reason: &str) -> bool {
        let deadline = self.now + self.config.close_timeout;
        let Some(conn) = live(&mut self.conns, id) else {
            return false;
        };
        if conn.state() != State::Open {
            return false;
        }
        conn.set_deadline(&mut self.timers, deadline, Deadline::Close);
        Metrics::bump_code(&mut self.metrics.closes_sent, code.0);
        self.queue_control(id, OpCode::Close, &frame::close_payload(code, reason));
        true
    }

    /// Closes the TCP connection and forgets it.
    pub(super) fn close_now(&mut self, id: ConnId) {
        if self.conn_mut(id).is_none() {
            return;
        }
        self.closed_for_app(id);
        let mut conn = self.conns.remove(id.slot as usize);
        if conn.state() == (State::HttpResponding { over_limit: true }) {
            self.rejecting -= 1;
        } else {
            self.release_place(false);
        }
        conn.cancel_deadline(&mut self.timers);
        // Deregister before the descriptor is closed, so that no event for it (or for a new
        // socket that reuses its number) can follow; epoll and kqueue do that themselves at
        // the close (`Poller::close_stops_watching`). Events of this iteration already
        // collected for it carry its `ConnId`, which no longer matches the slot.
        if !self.poller.close_stops_watching() {
            let _ = self.poller.deregister(conn.stream.as_raw_fd());
        }
        // The peer's address is asked of the socket only here (a connection does not keep it:
        // 32 bytes per connection for a log line), and only when the line is logged.
        if log::log_enabled!(log::Level::Debug) {
            let peer = conn.stream.peer_addr();
            let peer = peer.as_ref().map_or("?".to_string(), ToString::to_string);
            debug!("{id:?} ({peer}) closed in state {}", conn.state().name());
        }
        self.release_socket(conn);
    }

    // ----- signals and shutdown

    pub(super) fn on_signal(&mut self) -> Option<Exit> {
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

    /// SPEC §2: stop accepting (the listener is closed, so new clients are refused at once),
    /// send Close 1001 to every open connection, and give the close handshakes up to
    /// `--shutdown-timeout`; the loop ends when the slab is empty.
    pub fn begin_shutdown(&mut self) {
        info!(
            "shutting down: closing {} connections (up to {:?})",
            self.conns.len(),
            self.config.shutdown_timeout
        );
        self.shutting_down = true;
        self.close_listener();
        self.timers.arm(
            self.now + self.config.shutdown_timeout,
            TimerEvent::ShutdownDeadline,
        );
        let ids: Vec<(ConnId, State)> = self.conns.iter().map(|(_, c)| (c.id, c.state())).collect();
        for (id, state) in ids {
            match state {
                State::Open => self.start_close(id, CloseCode::GOING_AWAY, "server shutting down"),
                // Nothing promised to these yet: they go now.
                State::Handshaking => self.close_now(id),
                // Already finishing.
                State::HttpResponding { .. } | State::Closing | State::Closed | State::Failing => {}
            }
        }
    }

    /// Graceful shutdown has waited `--shutdown-timeout`: close whatever is left.
    pub(super) fn shutdown_deadline_passed(&mut self) {
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
