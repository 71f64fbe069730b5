//! What leaves: control frames the reactor queues, the dirty list, and the one place the
//! reactor writes a socket.
//!
//! Owns: `queue_control` (Ping, Pong, Close from the reactor itself), `mark_dirty` and
//! `flush_dirty` (each connection with queued bytes is written once per iteration), `flush`
//! (the vectored write, and writable interest kept registered exactly while bytes remain), and
//! what a completed flush finishes (`after_flush`).
//! Does not: encode app messages (`Outbox` does, in `handler.rs`) or manage the queue's storage
//! (`outbound.rs`), or drive TLS: a connection's session sits inside `tls::flush_socket`.

use super::connection::{ConnId, State};
use super::outbound::Flush;
use super::tls::{flush_socket, output_settled, say_goodbye};
use super::{live, Handler, Reactor};
use crate::poller::{Interest, Poller, Token};
use crate::protocol::frame::{self, OpCode};
use log::{debug, warn};
use std::net::Shutdown;
use std::os::fd::AsRawFd;

impl<P: Poller, H: Handler> Reactor<P, H> {
    /// Queues a control frame (at most 125 bytes of payload, RFC 6455 §5.5) that the reactor
    /// itself sends, and marks the connection for the end-of-iteration flush.
    pub(super) fn queue_control(&mut self, id: ConnId, opcode: OpCode, payload: &[u8]) {
        debug_assert!(opcode.is_control());
        let Some(conn) = live(&mut self.conns, id) else {
            return;
        };
        let len = frame::header_len(payload.len(), false) + payload.len();
        conn.outbound
            .push_owned_with(len, &mut self.outbound_pool, |out| {
                frame::encode_into(out, true, opcode, payload, None)
            });
        self.mark_dirty(id);
    }

    /// Queues the connection for the end-of-iteration flush.
    pub(super) fn mark_dirty(&mut self, id: ConnId) {
        if let Some(conn) = live(&mut self.conns, id) {
            if !conn.dirty {
                conn.dirty = true;
                self.dirty.push(id);
            }
        }
    }

    /// Flushes every connection that had bytes queued in this iteration.
    ///
    /// The list is swapped with `flushing` rather than taken: `mem::take` would free its storage
    /// every iteration, and a fan-out to n members would regrow it (log n allocations each time).
    pub(super) fn flush_dirty(&mut self) {
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

    /// Writes what is queued; keeps writable interest registered exactly while bytes remain.
    pub(super) fn flush(&mut self, id: ConnId) {
        if self.poller.completion_based() {
            self.submit_send(id);
            return;
        }
        let Some(conn) = live(&mut self.conns, id) else {
            return;
        };
        let before = conn.outbound.queued_bytes();
        let result = flush_socket(conn, &mut self.outbound_pool);
        self.metrics.bytes_out += (before - conn.outbound.queued_bytes()) as u64;
        let want_write = match result {
            Ok(Flush::Done) => false,
            Ok(Flush::Blocked) => true,
            Err(e) => {
                debug!("{id:?} write error: {e}");
                self.metrics.abnormal_closes += 1;
                self.close_now(id);
                return;
            }
        };
        if conn.write_interest != want_write {
            conn.write_interest = want_write;
            // A kept-alive HTTP connection whose reading is paused stays without read interest
            // (`http::pause_reading`).
            let interest = Interest {
                readable: !conn.exchange().read_paused,
                writable: want_write,
            };
            let fd = conn.stream.as_raw_fd();
            if let Err(e) = self.poller.reregister(fd, Token(id.token()), interest) {
                warn!("{id:?} reregister failed: {e}");
                self.close_now(id);
                return;
            }
        }
        self.after_answers_flushed(id);
        if !want_write {
            self.after_flush(id);
        }
    }

    /// Everything queued is written: finish whatever was waiting for that.
    pub(super) fn after_flush(&mut self, id: ConnId) {
        let Some(conn) = self.conn_mut(id) else {
            return;
        };
        if !output_settled(conn) {
            // TLS still handshaking: the session holds our answer until it completes, and the
            // read that completes it queues the connection for another flush.
            return;
        }
        match conn.state() {
            State::Closed | State::HttpResponding { .. } | State::Failing => say_goodbye(conn),
            State::Handshaking | State::Open | State::Closing => {}
        }
        match conn.state() {
            State::Closed => self.close_now(id),
            // The client has already shut its side (`Exchange::peer_done`): no EOF is left to
            // wait for, and nothing it sent is unread.
            State::HttpResponding { .. } if conn.exchange().peer_done => self.close_now(id),
            // Half-close: the client reads our response (or our Close) to its end and then
            // hangs up. Closing outright could reset the connection and lose the response if
            // the client is still sending (RFC 7230 §6.6).
            State::HttpResponding { .. } | State::Failing => {
                let _ = conn.stream.shutdown(Shutdown::Write);
            }
            State::Handshaking | State::Open | State::Closing => {}
        }
    }
}
