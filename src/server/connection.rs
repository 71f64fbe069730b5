//! One client connection: its socket, where it is in its life, and its buffers.
//!
//! Owns: the per-connection state of SPEC §3 (`State`), the partial-input buffer, the message
//! assembler, the outbound queue, the connection's one pending timer and its activity clock.
//! Does not: read or write sockets on its own initiative, or know about other connections. The
//! reactor drives it.
//!
//! ```text
//!                 complete upgrade           peer Close / our Close
//!  Handshaking ────────────────────▶ Open ───────────────────────────▶ Closing ──▶ closed
//!       │                             │  protocol error                  ▲ (Failing: input
//!       │                             └─────────────────────────────────▶│  discarded)
//!       │ plain HTTP request or rejection                                │ response flushed,
//!       └─────────────────────────▶ HttpResponding ──────────────────────┘ peer hung up / timeout
//! ```
//!
//! Memory invariant (SPEC §2): an idle open connection holds no heap buffers. `request` is empty
//! (no allocation) unless a partial request head is waiting for its end; the reader holds a
//! buffer only while a frame or a fragmented message is incomplete; `outbound` releases its
//! storage when flushed.

use super::outbound::Outbound;
use crate::protocol::decoder::FrameReader;
use crate::protocol::frame::Role;
use crate::timer::TimerHandle;
use mio::net::TcpStream;
use std::net::SocketAddr;
use std::time::Instant;

/// Identifies a connection for as long as it lives, and never again afterwards.
///
/// The slab reuses slots, so a bare slot number could name a different connection later (an
/// event queued for a socket closed earlier in the same loop iteration, a timer that fires after
/// its connection is gone). The generation makes such stale references harmless: they no longer
/// match the connection in the slot and are ignored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
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
    /// A plain HTTP response (or a rejection) is being written; then the write side is shut and
    /// whatever the client still sends is discarded until it hangs up.
    HttpResponding,
    /// A Close frame has been sent. `received` tells whether the peer's Close has arrived too;
    /// once it has, the socket is closed as soon as the queue is flushed.
    Closing { received: bool },
    /// The peer broke the protocol: our Close is queued, and after it the write side is shut.
    /// Input is no longer parsed (RFC 6455 §7.1.7: after failing the connection, data from the
    /// peer must not be processed; after a framing error its bytes cannot even be delimited), only
    /// discarded until the peer hangs up or the close deadline passes. Reading on, instead of
    /// closing at once, keeps unread input from turning our close into a reset that could
    /// destroy the Close frame before the peer reads it.
    Failing,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Handshaking => "handshaking",
            State::Open => "open",
            State::HttpResponding => "http",
            State::Closing { .. } | State::Failing => "closing",
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
    /// A Ping is out; some frame must arrive before this fires.
    Pong,
    /// Our Close (or HTTP response) is out; the peer has until this fires to finish.
    Close,
}

pub struct Connection {
    pub id: ConnId,
    pub stream: TcpStream,
    pub peer: SocketAddr,
    pub state: State,
    /// The request head received so far, while handshaking. Empty, and unallocated, after.
    pub request: Vec<u8>,
    /// Frames in, events out: holds the tail of a frame that has not fully arrived and the
    /// message being assembled (and nothing while idle).
    pub reader: FrameReader,
    pub outbound: Outbound,
    /// Whether writable interest is registered. Invariant: true iff `outbound` is non-empty
    /// after the last flush (poll/select would otherwise wake up for every idle socket).
    pub write_interest: bool,
    /// Set when the connection should be closed as soon as `outbound` is flushed.
    pub close_after_flush: bool,
    /// Whether this connection sits on the reactor's ready list (read budget ran out).
    pub on_ready_list: bool,
    /// The app's `Outbox` has asked for this connection to be closed (slow consumer); nothing
    /// more is queued for it until the reactor applies the close.
    pub close_requested: bool,
    /// Admitted over `--max-connections` only to be told 503; does not count toward the limit.
    pub rejected: bool,
    /// Whether this connection sits on the reactor's dirty list (bytes queued since its last
    /// flush); every dirty connection is flushed once at the end of the loop iteration.
    pub dirty: bool,
    pub timer: Option<TimerHandle>,
    /// When a frame last arrived. Traffic updates this instead of touching the timer wheel.
    pub last_activity: Instant,
    /// A heartbeat Ping is out and nothing has arrived since. The first bytes that arrive
    /// clear it and re-arm the heartbeat: one timer operation per heartbeat cycle, none per
    /// message (SPEC §5).
    pub awaiting_pong: bool,
}

impl Connection {
    pub fn new(
        id: ConnId,
        stream: TcpStream,
        peer: SocketAddr,
        max_message: usize,
        now: Instant,
    ) -> Connection {
        Connection {
            id,
            stream,
            peer,
            state: State::Handshaking,
            request: Vec::new(),
            reader: FrameReader::new(Role::Server, max_message),
            outbound: Outbound::default(),
            write_interest: false,
            close_after_flush: false,
            on_ready_list: false,
            dirty: false,
            rejected: false,
            close_requested: false,
            timer: None,
            last_activity: now,
            awaiting_pong: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
