//! The reactor's side of TLS (SPEC §18): which connections get a session, what a session's
//! progress and failures mean for the connection, and the certificate reload on SIGHUP.
//!
//! Owns: `serve_tls` (the listener speaks TLS from then on), `read_socket` and `flush_socket`
//! (the one read and the one write of a connection, through its session when it has one), what a
//! completed handshake, a failed session or a session still handshaking at a deadline or EOF
//! counts, answering plain HTTP sent to the TLS port, and `on_reload_signal`.
//! Does not: drive rustls itself (`tls::TlsSession` does), decide when to read or flush
//! (`inbound.rs`, `flush.rs`), or load certificates (`tls::ServerTls` does).
//!
//! Where TLS sits: `on_readable` calls `read_socket`, which hands out plaintext as a socket read
//! would; `flush` calls `flush_socket`, which writes the outbound queue through the session
//! (one vectored batch becomes a few records) and then whatever records are waiting. Everything
//! above (the request parser, frames, the hub) sees the same bytes as on a plain socket. The
//! handshake deadline (`--handshake-timeout`) is armed at accept, so it covers the TLS handshake
//! and the HTTP upgrade together.

use super::connection::{ConnId, Connection, State};
use super::outbound::{Flush, OutboundPool};
use super::{Handler, Reactor};
use crate::poller::Poller;
use crate::protocol::handshake;
use crate::tls::{Failure, ServerTls, TlsFlush, TlsSession};
use log::{debug, info};
use std::io::{self, Read};

impl<P: Poller, H: Handler> Reactor<P, H> {
    /// From now on every accepted connection speaks TLS with `tls`'s certificate, reloaded on
    /// SIGHUP (see `handle_signals`).
    pub fn serve_tls(&mut self, tls: ServerTls) {
        self.tls = Some(tls);
    }

    /// A new session for an accepted connection, if the listener speaks TLS. `Err` only if
    /// rustls refuses the configuration it already accepted at load time.
    pub(super) fn new_session(&self) -> Result<Option<Box<TlsSession>>, rustls::Error> {
        match &self.tls {
            Some(tls) => Ok(Some(Box::new(tls.session()?))),
            None => Ok(None),
        }
    }

    /// After the reads of one `on_readable`: counts a handshake that just completed, and queues
    /// the connection for the flush if the session has records to send (handshake messages,
    /// or the plaintext it held until the handshake completed).
    pub(super) fn after_tls_read(&mut self, id: ConnId) {
        let Some(conn) = self.conn_mut(id) else {
            return;
        };
        let Some(session) = conn.tls.as_deref_mut() else {
            return;
        };
        let completed = session.take_handshake();
        let wants_write = session.wants_write();
        if let Some(done) = &completed {
            debug!("{id:?} TLS handshake done ({})", done.version);
            if let Some(tls) = &mut self.tls {
                tls.stats.handshake_completed(done);
            }
        }
        if wants_write || completed.is_some() {
            self.mark_dirty(id);
        }
    }

    /// A read failed. For a TLS connection, counts why; plain HTTP sent to the TLS port gets an
    /// HTTP answer saying so (as nginx does), everything else closes the connection.
    pub(super) fn on_read_error(&mut self, id: ConnId, error: io::Error) {
        debug!("{id:?} read error: {error}");
        let Some(conn) = super::live(&mut self.conns, id) else {
            return;
        };
        if let Some(session) = conn.tls.as_deref() {
            let handshaking = session.is_handshaking();
            let failure = Failure::of(&error);
            // A socket error after the handshake is no TLS failure, only an abnormal close.
            if handshaking || failure != Failure::Io {
                if let Some(tls) = &mut self.tls {
                    tls.stats.failed(failure, handshaking);
                }
            }
            if failure == Failure::PlainHttp && conn.state() == State::Handshaking {
                // The rest of the connection is plain: the answer, then the usual wait for the
                // client to hang up (the input it still sends is discarded).
                conn.tls = None;
                let response = handshake::http_response(
                    400,
                    "text/plain; charset=utf-8",
                    &[],
                    b"This port speaks TLS only: use https:// or wss://\n",
                );
                self.answer(id, 400, response, false);
                return;
            }
        }
        self.metrics.abnormal_closes += 1;
        self.close_now(id);
    }

    /// The peer hung up: a TLS connection still handshaking gave up on its handshake.
    pub(super) fn count_tls_eof(&mut self, id: ConnId) {
        self.count_unfinished(id, Failure::Eof);
    }

    /// The handshake deadline passed: a TLS handshake still under way counts as timed out.
    pub(super) fn count_tls_timeout(&mut self, id: ConnId) {
        self.count_unfinished(id, Failure::Timeout);
    }

    fn count_unfinished(&mut self, id: ConnId, failure: Failure) {
        let handshaking = self
            .conn_mut(id)
            .and_then(|c| c.tls.as_deref())
            .is_some_and(TlsSession::is_handshaking);
        if let (true, Some(tls)) = (handshaking, &mut self.tls) {
            tls.stats.failed(failure, true);
        }
    }

    /// SIGHUP: the listener's certificate and key are read again. New connections get the new
    /// pair; open ones keep theirs (each session holds the configuration it started with). A
    /// failed reload keeps the current pair; `ServerTls::reload` logs why.
    pub(super) fn on_reload_signal(&mut self) {
        let count = self.reload_signal.as_mut().map_or(0, |s| s.drain());
        if count == 0 {
            return;
        }
        match &mut self.tls {
            Some(tls) => {
                let _ = tls.reload();
            }
            None => info!("SIGHUP: nothing to reload (no --tls-cert)"),
        }
    }

    /// Renders the TLS families of /metrics, if the listener speaks TLS.
    pub(super) fn render_tls_metrics(&self, text: &mut String) {
        if let Some(tls) = &self.tls {
            super::metrics::render_tls(text, tls);
        }
    }
}

/// The one read of a connection: from the socket, or through its TLS session, which has the
/// same contract (`Ok(0)` at the end, `WouldBlock` once the socket has nothing more).
#[inline]
pub(super) fn read_socket(conn: &mut Connection, buf: &mut [u8]) -> io::Result<usize> {
    match conn.tls.as_deref_mut() {
        None => conn.stream.read(buf),
        Some(session) => session.read(&mut conn.stream, buf),
    }
}

/// The one write of a connection: its queue, then (TLS) the records the session still holds.
/// `Blocked` while either still has bytes for the socket.
#[inline]
pub(super) fn flush_socket(conn: &mut Connection, pool: &mut OutboundPool) -> io::Result<Flush> {
    let Some(session) = conn.tls.as_deref_mut() else {
        return conn.outbound.flush(&mut conn.stream, pool);
    };
    // The whole queue as one vectored write into the session: small frames share records.
    let queue = conn
        .outbound
        .flush(&mut session.writer(&mut conn.stream), pool)?;
    let records = session.write_tls(&mut conn.stream)?;
    Ok(match (queue, records) {
        (Flush::Done, TlsFlush::Done) => Flush::Done,
        _ => Flush::Blocked,
    })
}

/// Is the connection done sending? Plain: always, once its queue is flushed. TLS: not while the
/// handshake is under way, since the session holds the plaintext it accepted until then.
#[inline]
pub(super) fn output_settled(conn: &Connection) -> bool {
    conn.tls.as_deref().is_none_or(|s| !s.is_handshaking())
}

/// Before the socket is closed or its write side shut: a TLS connection says `close_notify`
/// (RFC 8446 §6.1), best effort. The queue was just flushed, so the socket has room for the
/// alert; if it does not, the peer sees a TCP end without it, which WebSocket's own close
/// handshake already makes harmless.
pub(super) fn say_goodbye(conn: &mut Connection) {
    if let Some(session) = conn.tls.as_deref_mut() {
        session.send_close_notify();
        if let Err(e) = session.write_tls(&mut conn.stream) {
            debug!("{:?} close_notify not sent: {e}", conn.id);
        }
    }
}
