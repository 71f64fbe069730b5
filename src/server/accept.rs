//! New connections: accepting them, admitting or refusing each, and the listener's pause (on
//! descriptor exhaustion) and close (at shutdown).
//!
//! Owns: `listen` (the listening socket and the options its connections inherit),
//! `accept_all`, `admit`, the listener's registration.
//! Does not: read what a new connection sends (`inbound.rs`, called at once from `admit`) or
//! answer it (`http.rs`).

use super::connection::{ConnId, Connection, Deadline};
use super::metrics::Metrics;
use super::{Handler, Reactor, TimerEvent, LISTENER};
use crate::poller::{Poller, Token};
use crate::protocol::Refusal;
use log::{trace, warn};
use mio::net::TcpStream;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::time::Duration;

/// How long the listener stays paused after accept failed for lack of descriptors.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// Connections admitted beyond `--max-connections` only to be told 503 (and then closed). Past
/// this many at once, excess sockets are closed without an answer.
const MAX_REJECTING: usize = 64;

/// A non-blocking listening socket on `addr`, with `SO_REUSEADDR` (a restarted server may rebind
/// at once, as std's `TcpListener::bind` allows) and, with `reuse_port`, `SO_REUSEPORT` (one of
/// the `--workers` listeners).
///
/// `TCP_NODELAY` is set before `listen`: every reply should leave at once, and Linux copies a
/// listener's options into each connection when its TCP handshake completes (not at `accept`),
/// so set here it reaches every connection, also those that queue while the server is still
/// starting; set after `listen` it would miss those. `Reactor::with_listener` relies on it.
/// The backlog is 1,024 (mio's and std's `bind` ask 128): clients that arrive while the
/// listener is paused (descriptors exhausted, see `on_accept_error`) wait there, within the
/// kernel's `net.core.somaxconn`.
///
/// # Errors
/// The address is taken or invalid.
pub fn listen(addr: SocketAddr, reuse_port: bool) -> io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if reuse_port {
        // Only Linux balances connections over `SO_REUSEPORT` listeners (`workers.rs`).
        #[cfg(target_os = "linux")]
        socket.set_reuse_port(true)?;
        #[cfg(not(target_os = "linux"))]
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "SO_REUSEPORT listeners need Linux",
        ));
    }
    socket.set_tcp_nodelay(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

impl<P: Poller, H: Handler> Reactor<P, H> {
    /// Accepts until `WouldBlock` (edge-triggered backends report a listener once per burst).
    pub(super) fn accept_all(&mut self) {
        while self.listening {
            let Some(listener) = &self.listener else {
                return;
            };
            match listener.accept() {
                Ok((stream, peer)) => self.admit(stream, peer),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // The peer gave up while queued; nothing to do.
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => continue,
                Err(e) => {
                    self.on_accept_error(e);
                    return;
                }
            }
        }
    }

    /// Accepting failed: EMFILE/ENFILE (descriptors exhausted) and the like. The pending
    /// connection stays in the kernel's backlog and would make a level-triggered backend report
    /// the listener again and again (and a completion backend's accept has ended): pause it
    /// instead, and retry from a timer. Existing connections keep being served meanwhile.
    pub(super) fn on_accept_error(&mut self, e: io::Error) {
        if self.listener.is_none() {
            return; // closed at shutdown
        }
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
    }

    /// Stops watching the listener (it stays open: the kernel keeps queueing connections).
    fn pause_listener(&mut self) {
        if !self.listening {
            return;
        }
        self.listening = false;
        if let Some(listener) = &self.listener {
            if let Err(e) = self.poller.deregister(listener.as_raw_fd()) {
                warn!("could not pause the listener: {e}");
            }
        }
    }

    /// Stops accepting for good (shutdown): deregisters the listener and closes it, so that the
    /// kernel refuses new connections (a client retries another node at once) instead of
    /// queueing them for a process that will never accept them.
    pub(super) fn close_listener(&mut self) {
        self.pause_listener();
        self.release_listener();
    }

    /// The accept retry timer fired: watch the listener again.
    pub(super) fn resume_accepting(&mut self) {
        if self.listening {
            return;
        }
        let Some(listener) = &self.listener else {
            return; // closed at shutdown
        };
        match self.poller.watch_listener(listener.as_raw_fd(), LISTENER) {
            Ok(()) => {
                self.listening = true;
                // Connections may have queued while paused; an edge-triggered backend will not
                // report them as new. (A completion backend's accept, armed again, takes them.)
                if !self.poller.completion_based() {
                    self.accept_all();
                }
            }
            Err(e) => {
                warn!("could not resume the listener: {e}");
                self.timers
                    .arm(self.now + ACCEPT_RETRY, TimerEvent::AcceptRetry);
            }
        }
    }

    /// Takes a new socket into the slab with its handshake deadline, or refuses it.
    pub(super) fn admit(&mut self, stream: TcpStream, peer: SocketAddr) {
        self.metrics.accepted += 1;
        // With `--workers`, the limit is the process's (SPEC §14): a place is taken in the
        // shared count here and given back by `release_place` if the socket goes.
        let over_limit = match &self.worker {
            None => self.conns.len() - self.rejecting >= self.config.max_connections,
            Some(worker) => !worker.try_admit(),
        };
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
                self.release_place(over_limit);
                return;
            }
        }
        let tls = match self.new_session() {
            Ok(tls) => tls,
            Err(e) => {
                warn!("cannot start TLS for {peer}: {e}");
                Metrics::bump(&mut self.metrics.rejected, "tls_session");
                self.release_place(over_limit);
                return;
            }
        };
        if !self.nodelay_inherited {
            let _ = stream.set_nodelay(true);
        }
        let entry = self.conns.vacant_entry();
        let id = ConnId {
            slot: entry.key() as u32,
            generation: self.next_generation,
        };
        self.next_generation = self.next_generation.wrapping_add(1);
        if let Err(e) = self
            .poller
            .watch_connection(stream.as_raw_fd(), Token(id.token()))
        {
            warn!("cannot watch connection from {peer}: {e}");
            Metrics::bump(&mut self.metrics.rejected, "register_failed");
            self.release_place(over_limit);
            return;
        }
        let mut conn = Connection::new(id, stream, self.now_stamp);
        conn.tls = tls;
        conn.set_deadline(
            &mut self.timers,
            self.now + self.config.handshake_timeout,
            Deadline::Handshake,
        );
        entry.insert(conn);
        trace!("{peer} connected as {id:?}");
        // No read here even if the request is already waiting: every backend reports it at
        // the next wait. Edge-triggered epoll and kqueue check a descriptor's readiness when it
        // is registered, poll and select are level-triggered, and a completion backend's
        // receive, armed above, delivers it. Reading at once saved a wait only when the
        // request had arrived before the accept, and cost a read that found nothing
        // (`EAGAIN`) for every client that had not sent it yet.
        if over_limit {
            // Over the limit: answer 503 (SPEC §2) through the normal response path, which
            // waits for the client to hang up so that the answer is not lost to a reset. Such
            // connections do not count toward the limit, or a stream of refused clients could
            // keep the slot of a departed one occupied.
            Metrics::bump(&mut self.metrics.rejected, "max_connections");
            self.rejecting += 1;
            let refusal = Refusal::ServiceUnavailable;
            self.answer(id, refusal.status(), refusal.response(), true);
        }
    }

    /// A connection that took a place in the process-wide count (`--workers`, not admitted
    /// over the limit) is gone: give the place back. Nothing to do with one worker, whose
    /// count is the slab itself.
    pub(super) fn release_place(&mut self, over_limit: bool) {
        if let (false, Some(worker)) = (over_limit, &self.worker) {
            worker.release();
        }
    }
}
