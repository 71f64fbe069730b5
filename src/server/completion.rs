//! Completion I/O (`--poller uring`): what the reactor does with finished accepts, receives and
//! sends, instead of reading and writing sockets when they are ready.
//!
//! Owns: `dispatch_completions` (step 2 of the loop, after the readiness events), the receive
//! path (the kernel's buffer goes to the same request parser and frame reader as a readiness
//! read, then back to the backend), the send path (one send in flight per connection, lent the
//! outbound queue's chunks, which stay pinned until it completes), and `release_socket`, which
//! keeps a closed connection's bytes in flight alive until their send reports.
//! Does not: talk to the ring (`poller/uring.rs` does), or decide anything a readiness read or
//! write would decide differently: EOF, read errors, the request, frames and `after_flush` are
//! the same functions on both paths.
//!
//! Readiness vs completion in one sentence each (docs/pollers.md): readiness says "you may read
//! now" and the reactor reads into its own buffer; completion says "this was read, into this
//! buffer" and the reactor gives the buffer back when done. On this path `write_interest` means
//! "a send is in flight" (the completion equivalent of "waiting for the socket to take more").

use super::connection::{ConnId, Connection, Deadline};
use super::{live, Handler, Reactor, LISTENER};
use crate::poller::{Completion, Poller, RecvBuf, Token};
use log::{debug, warn};
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, OwnedFd};

/// At most this many chunks go into one send: IOV_MAX on Linux, as for `writev`.
const MAX_SEND_IOVECS: usize = 1024;

impl<P: Poller, H: Handler> Reactor<P, H> {
    /// Step 2, second half: everything the backend completed in this wait.
    pub(super) fn dispatch_completions(&mut self) {
        let mut done = std::mem::take(&mut self.completions);
        self.poller.take_completions(&mut done);
        self.metrics.poll_events += done.len() as u64;
        for completion in done.drain(..) {
            match completion {
                Completion::Accepted(fd) => self.on_accepted(fd),
                Completion::AcceptFailed(e) => self.on_accept_error(e),
                Completion::Received(token, buf) => self.on_received(conn_id(token), buf),
                Completion::Eof(token) => self.on_eof(conn_id(token)),
                Completion::ReceiveFailed(token, e) => self.on_read_error(conn_id(token), e),
                Completion::Sent(token, result) => self.on_sent(conn_id(token), result),
            }
        }
        self.completions = done;
    }

    /// Reaps and handles what has completed by now, without waiting: where a readiness reactor
    /// reads a socket to be sure nothing is waiting (a Pong deadline, SPEC §5).
    pub(super) fn collect_completions(&mut self) {
        if let Err(e) = self.poller.collect_now() {
            warn!("io_uring: reaping completions failed: {e}");
        }
        self.dispatch_completions();
    }

    fn on_accepted(&mut self, fd: OwnedFd) {
        let stream = mio::net::TcpStream::from_std(std::net::TcpStream::from(fd));
        match stream.peer_addr() {
            Ok(peer) => self.admit(stream, peer),
            // The peer is already gone (ENOTCONN): nothing to answer.
            Err(e) => debug!("accepted a connection that is already gone: {e}"),
        }
    }

    /// Bytes arrived in a buffer the kernel chose: the same steps as one readiness read
    /// (`on_readable`), then the buffer goes back.
    fn on_received(&mut self, id: ConnId, mut buf: RecvBuf) {
        let Some(conn) = live(&mut self.conns, id) else {
            self.poller.recycle(buf);
            return;
        };
        self.metrics.bytes_in += buf.len() as u64;
        // Any bytes count as activity (SPEC §5), as in `on_readable`.
        conn.last_activity = self.now_stamp;
        if conn.awaiting_pong() {
            let next = self.now + self.config.heartbeat_interval;
            conn.set_deadline(&mut self.timers, next, Deadline::Heartbeat);
        }
        if conn.tls.is_some() {
            self.on_received_tls(id, buf);
            return;
        }
        let open = self.ingest_bytes(id, buf.bytes_mut());
        self.poller.recycle(buf);
        if open {
            self.pause_reading_if_full(id);
        }
        if open && self.conn_mut(id).is_some_and(|c| !c.outbound.is_empty()) {
            self.mark_dirty(id);
        }
    }

    /// Received ciphertext goes through the session, exactly as a readiness read does
    /// (`tls::read_socket`), except that the session reads it from the buffer instead of the
    /// socket; the plaintext lands in the shared receive buffer and takes the usual path.
    fn on_received_tls(&mut self, id: ConnId, mut buf: RecvBuf) {
        let mut offset = 0;
        while let Some(conn) = live(&mut self.conns, id) {
            let Some(session) = conn.tls.as_deref_mut() else {
                // The session was dropped (plain HTTP on the TLS port was answered in plain).
                break;
            };
            let mut source = Received {
                bytes: &buf.bytes_mut()[offset..],
                taken: 0,
                socket: &conn.stream,
            };
            let read = session.read(&mut source, &mut self.recv_buf);
            offset += source.taken;
            match read {
                Ok(0) => {
                    self.poller.recycle(buf);
                    self.on_eof(id);
                    return;
                }
                Ok(n) => {
                    self.after_tls_read(id);
                    if !self.ingest(id, n) {
                        break; // closed
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.poller.recycle(buf);
                    self.on_read_error(id, e);
                    return;
                }
            }
        }
        self.poller.recycle(buf);
        self.after_tls_read(id);
        self.pause_reading_if_full(id);
        if self.conn_mut(id).is_some_and(|c| !c.outbound.is_empty()) {
            self.mark_dirty(id);
        }
    }

    /// `flush` on the completion path: lends the queue to a send, unless one is in flight (its
    /// completion sends the rest). An empty queue finishes what waited for it, as a readiness
    /// flush that found nothing to write does.
    pub(super) fn submit_send(&mut self, id: ConnId) {
        let Some(conn) = live(&mut self.conns, id) else {
            return;
        };
        if conn.write_interest {
            return;
        }
        if conn.tls.is_some() {
            self.submit_tls_send(id);
            return;
        }
        if conn.outbound.is_empty() {
            self.after_flush(id);
            return;
        }
        let fd = conn.stream.as_raw_fd();
        let token = Token(id.token());
        // SAFETY (both sends): the slices point into the chunks `pin_single`/`pin_for_send`
        // pinned: nothing is appended to them and they stay in the queue until
        // `Outbound::sent`, called when this send completes (`on_sent`). If the connection
        // closes first, `release_socket` keeps its queue in `orphans` until that same
        // completion.
        let submitted = match conn.outbound.pin_single() {
            // The usual case, one chunk: no vector allocated per send.
            Some(bytes) => unsafe { self.poller.send(fd, token, &[IoSlice::new(bytes)]) },
            None => {
                let mut slices: Vec<IoSlice<'_>> = Vec::new();
                conn.outbound.pin_for_send(&mut slices, MAX_SEND_IOVECS);
                unsafe { self.poller.send(fd, token, &slices) }
            }
        };
        match submitted {
            Ok(()) => conn.write_interest = true,
            Err(e) => {
                // Nothing was submitted: the chunks are not in use.
                conn.outbound.sent(0, &mut self.outbound_pool);
                warn!("{id:?} send not submitted: {e}");
                self.metrics.abnormal_closes += 1;
                self.close_now(id);
            }
        }
    }

    /// TLS: the plaintext queue is encrypted into a buffer of records, which one send is lent
    /// (`tls_sends`, kept until it completes, even if the connection closes). The queue is
    /// emptied by the encryption, so the bytes in flight no longer count toward
    /// `--max-outbound`; that is at most one send's worth, and what is queued meanwhile counts
    /// as usual.
    fn submit_tls_send(&mut self, id: ConnId) {
        let Some(conn) = live(&mut self.conns, id) else {
            return;
        };
        let Some(session) = conn.tls.as_deref_mut() else {
            return;
        };
        let mut records = Vec::new();
        // Writing into a `Vec` never blocks, so the whole queue goes into the session.
        let encrypted = conn
            .outbound
            .flush(&mut session.writer(&mut records), &mut self.outbound_pool)
            .and_then(|_| session.write_tls(&mut records));
        if let Err(e) = encrypted {
            debug!("{id:?} TLS write error: {e}");
            self.metrics.abnormal_closes += 1;
            self.close_now(id);
            return;
        }
        if records.is_empty() {
            self.after_flush(id);
            return;
        }
        self.send_records(id, records, 0);
    }

    /// Lends `records[offset..]` to a send.
    fn send_records(&mut self, id: ConnId, records: Vec<u8>, offset: usize) {
        let Some(conn) = live(&mut self.conns, id) else {
            return;
        };
        let fd = conn.stream.as_raw_fd();
        // SAFETY: a `Vec`'s bytes live on the heap and stay where they are when the `Vec` is
        // moved into `tls_sends` below, where it stays, unchanged, until this send completes
        // (`on_sent` takes it out), whether or not the connection is still open.
        let submitted = unsafe {
            self.poller
                .send(fd, Token(id.token()), &[IoSlice::new(&records[offset..])])
        };
        match submitted {
            Ok(()) => {
                conn.write_interest = true;
                self.tls_sends.insert(id, (records, offset));
            }
            Err(e) => {
                warn!("{id:?} send not submitted: {e}");
                self.metrics.abnormal_closes += 1;
                self.close_now(id);
            }
        }
    }

    /// A send finished: its bytes leave the queue; the rest (and whatever was queued meanwhile)
    /// goes in the next send, or, once all is out, what waited for the flush happens.
    fn on_sent(&mut self, id: ConnId, result: io::Result<usize>) {
        let tls_send = self.tls_sends.remove(&id);
        let Some(conn) = live(&mut self.conns, id) else {
            // Closed while the send was in flight: its bytes may be freed now.
            self.orphans.remove(&id);
            return;
        };
        if let Some((records, offset)) = tls_send {
            conn.write_interest = false;
            match result {
                Ok(n) if n > 0 => {
                    self.metrics.bytes_out += n as u64;
                    self.after_answers_flushed(id);
                    if offset + n < records.len() {
                        self.send_records(id, records, offset + n);
                    } else {
                        self.submit_send(id);
                    }
                }
                Ok(_) | Err(_) => {
                    debug!("{id:?} TLS send failed: {result:?}");
                    self.metrics.abnormal_closes += 1;
                    self.close_now(id);
                }
            }
            return;
        }
        conn.write_interest = false;
        let written = match result {
            Ok(0) => Err(io::ErrorKind::WriteZero.into()),
            other => other,
        };
        match written {
            Ok(n) => {
                conn.outbound.sent(n, &mut self.outbound_pool);
                self.metrics.bytes_out += n as u64;
                // The client read answers: a connection paused on its unsent answers may go
                // on (`MAX_QUEUED_ANSWER_BYTES`), as after a readiness flush.
                self.after_answers_flushed(id);
                // More queued, or all out: `submit_send` handles both.
                self.submit_send(id);
            }
            Err(e) => {
                conn.outbound.sent(0, &mut self.outbound_pool);
                debug!("{id:?} write error: {e}");
                self.metrics.abnormal_closes += 1;
                self.close_now(id);
            }
        }
    }

    /// A connection has left the slab: its socket is closed through the poller (a completion
    /// backend still has operations on it until its cancellation reports), and a send still in
    /// flight keeps the bytes it points into until it completes.
    pub(super) fn release_socket(&mut self, mut conn: Connection) {
        if self.poller.completion_based() && conn.write_interest {
            self.orphans
                .insert(conn.id, std::mem::take(&mut conn.outbound));
        }
        self.poller.close(OwnedFd::from(conn.stream));
    }

    /// The listener's socket, closed at shutdown: through the poller, for the same reason.
    pub(super) fn release_listener(&mut self) {
        let Some(listener) = self.listener.take() else {
            return;
        };
        if self.poller.completion_based() {
            // The descriptor stays open until the accept's cancellation reports, one wait
            // later, and a listening socket queues new clients until it is closed. Shutting it
            // down stops the listening now (Linux), so they are refused at once (SPEC §2).
            // SAFETY: shutdown(2) on a descriptor this function owns; no pointers.
            unsafe {
                libc::shutdown(listener.as_raw_fd(), libc::SHUT_RDWR);
            }
        }
        self.poller.close(OwnedFd::from(listener));
    }
}

/// What a TLS session reads ciphertext from on the completion path: the received buffer, then
/// `WouldBlock` (the next receive brings more). Writes (a session's alert when it fails) go to
/// the socket directly, best effort, as on the readiness path.
struct Received<'a> {
    bytes: &'a [u8],
    taken: usize,
    socket: &'a mio::net::TcpStream,
}

impl io::Read for Received<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let rest = &self.bytes[self.taken..];
        if rest.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = rest.len().min(buf.len());
        buf[..n].copy_from_slice(&rest[..n]);
        self.taken += n;
        Ok(n)
    }
}

impl io::Write for Received<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        io::Write::write(&mut &*self.socket, buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn conn_id(token: Token) -> ConnId {
    debug_assert_ne!(token, LISTENER);
    ConnId::from_token(token.0)
}
