//! One client connection: its socket, where it is in its life, and its buffers.
//!
//! Owns: the per-connection state of SPEC §3 (`State`) and its transitions (each a method that
//! checks the edge it takes), the request-head buffer, the frame reader, the outbound queue,
//! the connection's one pending deadline and its activity clock.
//! Does not: read or write sockets on its own initiative, or know about other connections. The
//! reactor drives it.
//!
//! ```text
//!                upgraded()                close_sent()                 close_received()
//!  Handshaking ─────────────▶ Open ─────────────────────────▶ Closing ─────────────────▶ Closed
//!      │                       │ │        close_received()       │                         ▲
//!      │                       │ └───────────────────────────────┼─────────────────────────┘
//!      │ responding()          │ failed()                        │ protocol error
//!      ▼                       ▼                                 ▼
//!  HttpResponding           Failing                       close_now() at once
//! ```
//!
//! Every state ends in the socket being closed (`Reactor::close_now`): Closed once the queue
//! (our Close, answering or answered) is flushed; HttpResponding and Failing once the peer hangs
//! up after our response or Close (the write side is shut when the queue is flushed); Closing
//! as soon as the peer's frames break the protocol (`Reactor::protocol_error`: our Close is
//! queued, and the stream can no longer be delimited to find the peer's; what is queued gets
//! one non-blocking write first, and input still unread makes this close a TCP reset); any
//! state when its deadline passes, on EOF, or on an I/O error.
//!
//! Memory invariant (SPEC §2): an idle open connection holds no heap buffers. `request` is empty
//! (no allocation) unless a partial request head is waiting for its end; the reader holds a
//! buffer only while a frame or a fragmented message is incomplete; `outbound` releases its
//! storage when flushed.

use super::compression::Negotiated;
use super::outbound::Outbound;
use super::reader_slot::ReaderSlot;
use super::request_buf::RequestBuf;
use super::TimerEvent;
use crate::timer::{TimerHandle, TimerWheel};
use crate::tls::TlsSession;
use mio::net::TcpStream;
use std::time::{Duration, Instant};

/// Identifies a connection for as long as it lives, and never again afterwards.
///
/// The slab reuses slots, so a bare slot number could name a different connection later (an
/// event queued for a socket closed earlier in the same loop iteration, a timer that fires after
/// its connection is gone). The generation makes such stale references harmless: they no longer
/// match the connection in the slot and are ignored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnId {
    pub slot: u32,
    pub generation: u32,
}

impl ConnId {
    /// Packs the id into a poller token (64-bit targets: generation in the high half).
    pub fn token(self) -> usize {
        ((self.generation as usize) << 32) | self.slot as usize
    }

    pub fn from_token(token: usize) -> ConnId {
        ConnId {
            slot: (token & 0xffff_ffff) as u32,
            generation: (token >> 32) as u32,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Waiting for a complete HTTP request head (at most 8 KiB, within the handshake deadline).
    Handshaking,
    /// Upgraded: WebSocket frames flow both ways; data messages go to the app (`Handler`).
    Open,
    /// A plain HTTP response (or a refusal) is being written; then the write side is shut and
    /// whatever the client still sends is discarded until it hangs up. `over_limit`: the
    /// connection was admitted beyond `--max-connections` only to be told 503, and does not
    /// count toward the limit.
    HttpResponding { over_limit: bool },
    /// Our Close is queued; frames are read only to find the peer's (RFC 6455 §5.5.1).
    Closing,
    /// Both Close frames are exchanged: the socket is closed as soon as the queue is flushed
    /// (RFC 6455 §7.1.1: the server closes the TCP connection first).
    Closed,
    /// The peer broke the protocol: our Close is queued, and after it the write side is shut.
    /// Input is no longer parsed (RFC 6455 §7.1.7: after failing the connection, data from the
    /// peer must not be processed; after a framing error its bytes cannot even be delimited), only
    /// discarded until the peer hangs up or the close deadline passes. Reading on, instead of
    /// closing at once, keeps unread input from turning our close into a reset that could
    /// destroy the Close frame before the peer reads it.
    Failing,
}

impl State {
    /// The name in /metrics (`wsrelay_connections{state=...}`).
    pub fn name(self) -> &'static str {
        match self {
            State::Handshaking => "handshaking",
            State::Open => "open",
            State::HttpResponding { .. } => "http",
            State::Closing | State::Closed | State::Failing => "closing",
        }
    }
}

/// What a connection's one pending timer means (SPEC §5). A connection never needs two at
/// once: each state has exactly one deadline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Deadline {
    Handshake,
    /// Silence check: re-armed for the remaining time if there was activity, else a Ping.
    Heartbeat,
    /// A heartbeat Ping is out; some bytes must arrive before this fires.
    Pong,
    /// Our Close (or HTTP response) is out; the peer has until this fires to finish.
    Close,
    /// A kept-alive HTTP connection is idle between requests (`Config::keep_alive_timeout`).
    /// The first byte of the next request replaces it with the request deadline (`Handshake`).
    KeepAlive,
}

/// Where a connection is in its HTTP requests to the app (`Route::Api`; SPEC §16). The
/// connection stays `Handshaking` throughout: it reads request heads, and may still upgrade.
#[derive(Debug, Default)]
pub(crate) struct Exchange {
    /// A head whose body has not fully arrived: the request, the length of its head, how its
    /// body is framed. Parsed once; the body is taken when `request` holds all of it.
    pub(super) pending: Option<Box<PendingRequest>>,
    /// A request is with the app and its answer has not come: no further request is parsed
    /// until it does (answers go out in request order).
    pub(super) waiting: bool,
    /// Whether the connection stays open after the answer being waited for.
    pub(super) keep_alive: bool,
    /// Requests answered on this connection: hanging up between two of them is the normal end
    /// of a kept-alive connection, not an abnormal close.
    pub(super) answered: u64,
    /// Reading stopped while waiting: the client pipelined more than
    /// `http::MAX_PIPELINED_BYTES`. The answer resumes it.
    pub(super) read_paused: bool,
    /// The request being answered is a HEAD: its answer goes out without a body.
    pub(super) head_method: bool,
    /// The client shut its sending side (EOF) with a request unanswered or requests buffered:
    /// nothing more is read, what it sent is answered, and then the connection closes.
    pub(super) peer_done: bool,
    /// Bytes at the front of `Connection::request` already served: pipelined requests are
    /// taken from this offset, and the buffer is compacted once per `http::on_request_bytes`
    /// rather than shifted once per request.
    pub(super) served: usize,
}

/// A request head parsed while its body is still arriving.
#[derive(Debug)]
pub(crate) struct PendingRequest {
    pub(super) request: crate::protocol::handshake::Request,
    pub(super) head_len: usize,
    pub(super) framing: Result<crate::protocol::http_exchange::Framing, crate::protocol::Refusal>,
}

pub(super) struct Connection {
    /// Who this is; also the poller token and the key of its timers.
    pub(super) id: ConnId,
    /// Read only in `Reactor::on_readable`, written only in `Reactor::flush`.
    pub(super) stream: TcpStream,
    /// The TLS session between `stream` and everything below, when the listener speaks TLS
    /// (SPEC §18). Boxed: a rustls session is large, and plain connections pay one pointer.
    pub(super) tls: Option<Box<TlsSession>>,
    /// Changed only by the transition methods below.
    state: State,
    /// The request head received so far, while handshaking. Empty, and unallocated, after
    /// (one pointer: `RequestBuf`).
    /// On a kept-alive API connection: the bytes of requests not yet served (pipelined ones).
    pub(super) request: RequestBuf,
    /// HTTP requests to the app on this connection (keep-alive, bodies, waiting for answers).
    /// Boxed, and only once the connection carries an app request: most connections upgrade
    /// and never need it, and every byte here is paid by every idle connection.
    exchange: Option<Box<Exchange>>,
    /// Frames in, events out: the reader, boxed only while it holds the tail of a frame that
    /// has not fully arrived or a message being assembled (`ReaderSlot`; nothing while idle).
    pub(super) reader: ReaderSlot,
    /// Encoded frames (and HTTP responses) waiting to be written.
    pub(super) outbound: Outbound,
    /// What permessage-deflate this connection agreed on, if any (SPEC §17). Set with the 101.
    pub(super) deflate: Option<Negotiated>,
    /// Whether writable interest is registered. Invariant: true iff `outbound` is non-empty
    /// after the last flush (poll/select would otherwise wake up for every idle socket).
    pub(super) write_interest: bool,
    /// Whether this connection sits on the reactor's ready list (read budget ran out), so it
    /// is listed once, and read once per iteration: by the ready list, not by its event.
    pub(super) on_ready_list: bool,
    /// Whether this connection sits on the reactor's dirty list (bytes queued since its last
    /// flush), so it is listed, and flushed, once per loop iteration.
    pub(super) dirty: bool,
    /// The app's `Outbox` has asked for this connection to be closed (slow consumer); nothing
    /// more is queued for it until the reactor applies the close.
    pub(super) close_requested: bool,
    /// The one pending timer and what it means (see `Deadline`).
    deadline: Option<(TimerHandle, Deadline)>,
    /// When bytes last arrived (any bytes, not only a whole frame: a large frame still
    /// arriving proves the peer alive). Traffic updates this instead of touching the timer
    /// wheel; the heartbeat deadline reads it when it fires (SPEC §5).
    pub(super) last_activity: Stamp,
}

/// A moment on the reactor's clock as milliseconds since the reactor started, in 4 bytes
/// where an `Instant` takes 16: every connection slot holds one, so it counts in every idle
/// connection's memory. It wraps after about 49 days, which is harmless: only the time since
/// a stamp is ever asked, and the heartbeat asks at least once per `--heartbeat-interval`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Stamp(u32);

impl Stamp {
    /// `now` on the clock that started at `start` (truncated to 32 bits: wrapping).
    #[inline]
    pub(super) fn at(start: Instant, now: Instant) -> Stamp {
        Stamp(now.saturating_duration_since(start).as_millis() as u32)
    }

    /// The time from this stamp to `later` (the wrap-around is undone by wrapping arithmetic).
    #[inline]
    pub(super) fn until(self, later: Stamp) -> Duration {
        Duration::from_millis(u64::from(later.0.wrapping_sub(self.0)))
    }
}

impl Connection {
    pub(super) fn new(id: ConnId, stream: TcpStream, now: Stamp) -> Connection {
        Connection {
            id,
            stream,
            tls: None,
            state: State::Handshaking,
            request: RequestBuf::default(),
            exchange: None,
            reader: ReaderSlot::default(),
            outbound: Outbound::default(),
            deflate: None,
            write_interest: false,
            on_ready_list: false,
            dirty: false,
            close_requested: false,
            deadline: None,
            last_activity: now,
        }
    }

    /// The connection's HTTP requests to the app; a connection that never made one reads as
    /// the empty exchange (nothing pending, nothing waited for).
    #[inline]
    pub(super) fn exchange(&self) -> &Exchange {
        static NONE: Exchange = Exchange {
            pending: None,
            waiting: false,
            keep_alive: false,
            answered: 0,
            read_paused: false,
            head_method: false,
            peer_done: false,
            served: 0,
        };
        self.exchange.as_deref().unwrap_or(&NONE)
    }

    /// The bytes of `request` not yet served (see `Exchange::served`).
    pub(super) fn unserved(&self) -> &[u8] {
        &self.request[self.exchange().served..]
    }

    /// Drops every buffered request byte, served or not; the buffer is freed (SPEC §2).
    pub(super) fn clear_request(&mut self) {
        self.request.free();
        if let Some(exchange) = self.exchange.as_deref_mut() {
            exchange.served = 0;
        }
    }

    /// Removes the served bytes from the front of `request`, once for all the requests served
    /// since the last time; an emptied buffer is freed (SPEC §2: an idle connection holds no
    /// buffers).
    pub(super) fn compact_request(&mut self) {
        let Some(exchange) = self.exchange.as_deref_mut() else {
            return;
        };
        if exchange.served > 0 {
            // An emptied buffer is freed (`drain_front`).
            self.request.drain_front(exchange.served);
            exchange.served = 0;
        }
    }

    /// The request head waiting for its body, if any. Reads without making the exchange: every
    /// request head passes here, and a connection that upgrades must not pay for one.
    pub(super) fn take_pending(&mut self) -> Option<Box<PendingRequest>> {
        self.exchange.as_mut().and_then(|e| e.pending.take())
    }

    /// The exchange to change, made on first use.
    pub(super) fn exchange_mut(&mut self) -> &mut Exchange {
        self.exchange.get_or_insert_with(Box::default)
    }

    #[inline]
    pub(super) fn state(&self) -> State {
        self.state
    }

    // ----- transitions: each takes one edge of the diagram, and refuses (false) from any
    // ----- other state, so a caller cannot move a connection somewhere it cannot go.

    /// Handshaking -> Open: the 101 response is queued.
    pub(super) fn upgraded(&mut self) -> bool {
        self.take_edge(|s| s == State::Handshaking, State::Open)
    }

    /// Handshaking -> HttpResponding: an HTTP response (or a refusal) is queued.
    pub(super) fn responding(&mut self, over_limit: bool) -> bool {
        self.take_edge(
            |s| s == State::Handshaking,
            State::HttpResponding { over_limit },
        )
    }

    /// Open -> Closing: our Close is queued.
    pub(super) fn close_sent(&mut self) -> bool {
        self.take_edge(|s| s == State::Open, State::Closing)
    }

    /// Open or Closing -> Closed: the peer's Close arrived (from Open, our answer is queued).
    pub(super) fn close_received(&mut self) -> bool {
        self.take_edge(|s| matches!(s, State::Open | State::Closing), State::Closed)
    }

    /// Open -> Failing: the peer broke the protocol; our Close with the error's code is queued.
    pub(super) fn failed(&mut self) -> bool {
        self.take_edge(|s| s == State::Open, State::Failing)
    }

    fn take_edge(&mut self, from: impl Fn(State) -> bool, to: State) -> bool {
        if !from(self.state) {
            return false;
        }
        log::trace!("{:?} {} -> {}", self.id, self.state.name(), to.name());
        self.state = to;
        true
    }

    // ----- the one deadline

    /// Replaces the connection's pending timer with `kind` at `at`.
    pub(super) fn set_deadline(
        &mut self,
        timers: &mut TimerWheel<TimerEvent>,
        at: Instant,
        kind: Deadline,
    ) {
        self.cancel_deadline(timers);
        let handle = timers.arm(at, TimerEvent::Conn(self.id, kind));
        self.deadline = Some((handle, kind));
    }

    /// Removes the pending timer, if any (the connection is going away).
    pub(super) fn cancel_deadline(&mut self, timers: &mut TimerWheel<TimerEvent>) {
        if let Some((handle, _)) = self.deadline.take() {
            timers.cancel(handle);
        }
    }

    /// The pending timer has fired and left the wheel.
    pub(super) fn deadline_fired(&mut self) {
        self.deadline = None;
    }

    /// What the pending deadline means, if one is pending.
    pub(super) fn deadline_kind(&self) -> Option<Deadline> {
        self.deadline.map(|(_, kind)| kind)
    }

    /// A heartbeat Ping is out and no bytes have arrived since: the pending deadline is the
    /// Pong deadline. The first bytes that arrive replace it with the next heartbeat: one timer
    /// operation per heartbeat cycle, none per message (SPEC §5).
    pub(super) fn awaiting_pong(&self) -> bool {
        matches!(self.deadline, Some((_, Deadline::Pong)))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A connection over a real loopback socket (the state machine never touches it).
    fn connection() -> Connection {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let id = ConnId {
            slot: 0,
            generation: 0,
        };
        let stream = TcpStream::from_std(client);
        Connection::new(id, stream, Stamp(0))
    }

    type Edge = fn(&mut Connection) -> bool;
    /// (name, edge, the (from, to) pairs where it is taken)
    type EdgeCase<'a> = (&'a str, Edge, &'a [(State, State)]);

    /// Every edge from every state: taken exactly where the diagram in the module doc has it,
    /// refused (state unchanged) everywhere else.
    #[test]
    fn transitions_take_only_the_edges_of_the_diagram() {
        use State::*;
        let http = HttpResponding { over_limit: false };
        // How to reach each state from Handshaking.
        let paths: &[(State, &[Edge])] = &[
            (Handshaking, &[]),
            (Open, &[Connection::upgraded]),
            (http, &[|c| c.responding(false)]),
            (Closing, &[Connection::upgraded, Connection::close_sent]),
            (Closed, &[Connection::upgraded, Connection::close_received]),
            (Failing, &[Connection::upgraded, Connection::failed]),
        ];
        let edges: &[EdgeCase] = &[
            ("upgraded", Connection::upgraded, &[(Handshaking, Open)]),
            (
                "responding",
                |c| c.responding(false),
                &[(Handshaking, http)],
            ),
            ("close_sent", Connection::close_sent, &[(Open, Closing)]),
            (
                "close_received",
                Connection::close_received,
                &[(Open, Closed), (Closing, Closed)],
            ),
            ("failed", Connection::failed, &[(Open, Failing)]),
        ];
        for &(from, path) in paths {
            for &(name, edge, allowed) in edges {
                let mut conn = connection();
                for step in path {
                    assert!(step(&mut conn), "reaching {from:?}");
                }
                assert_eq!(conn.state(), from);
                let want = allowed.iter().find(|(f, _)| *f == from).map(|(_, to)| *to);
                assert_eq!(edge(&mut conn), want.is_some(), "{name} from {from:?}");
                assert_eq!(conn.state(), want.unwrap_or(from), "{name} from {from:?}");
            }
        }
    }

    /// What one connection's slot in the slab costs. The server holds one per connection, idle
    /// or not, so this is most of an idle connection's memory (docs/benchmarks.md, "Idle
    /// memory": at most 256 bytes of RSS each, with the app's session and the heartbeat timer
    /// node). The bound is today's size: a field that makes it grow is a decision to take on
    /// purpose (move rare state behind a pointer, as `tls` and `reader` are, or raise the bound
    /// here and re-measure idle memory), not something that slips in. The server API's
    /// keep-alive state (`exchange`, boxed: 8 bytes) and the io_uring send pin in `Outbound`
    /// (8) were paid for by the heartbeat's `last_activity` going from an `Instant` (16 bytes)
    /// to a `Stamp` (4).
    /// A stamp measures the time since it was taken across the 32-bit wrap (about 49 days).
    #[test]
    fn a_stamp_survives_the_wrap() {
        let start = Instant::now();
        let a = Stamp::at(start, start + Duration::from_millis(1500));
        let b = Stamp::at(start, start + Duration::from_millis(4000));
        assert_eq!(a.until(b), Duration::from_millis(2500));
        let before_wrap = Stamp(u32::MAX - 999);
        let after_wrap = Stamp(1000);
        assert_eq!(before_wrap.until(after_wrap), Duration::from_millis(2000));
        // Earlier than the start (not possible for the reactor's own clock) reads as the start.
        assert_eq!(Stamp::at(start + Duration::from_secs(1), start), Stamp(0));
    }

    #[test]
    fn a_connection_slot_stays_small() {
        use std::mem::size_of;
        let size = size_of::<Connection>();
        println!(
            "size_of::<Connection>() = {size} (outbound {}, reader {}, deadline {}, request {})",
            size_of::<Outbound>(),
            size_of::<ReaderSlot>(),
            size_of::<Option<(TimerHandle, Deadline)>>(),
            size_of::<RequestBuf>(),
        );
        assert!(
            size <= 152,
            "size_of::<Connection>() grew to {size} bytes (bound: 152)"
        );
        // An idle connection holds its reader as one pointer (`reader_slot.rs`).
        assert_eq!(size_of::<ReaderSlot>(), size_of::<usize>());
        // Its heartbeat's node in the timer wheel, the other part of an idle connection.
        let node = TimerWheel::<TimerEvent>::node_bytes();
        println!("timer node = {node}");
        assert!(node <= 32, "a timer node grew to {node} bytes (bound: 32)");
    }

    #[test]
    fn token_round_trip() {
        for id in [
            ConnId {
                slot: 0,
                generation: 0,
            },
            ConnId {
                slot: 7,
                generation: 1,
            },
            ConnId {
                slot: u32::MAX - 1,
                generation: u32::MAX,
            },
        ] {
            assert_eq!(ConnId::from_token(id.token()), id);
        }
    }
}
