//! The reactor driven one iteration (`turn`) at a time, over real loopback sockets, on every
//! poller: what happens *within* one iteration (how much one connection is read, what a deadline
//! sees) is observable here and not from outside the process.
//!
//! The poller is wrapped so that a test can hide one connection's events, as if its input had
//! arrived just after the wait returned.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::*;
use crate::poller::{MioPoller, PollPoller, SelectPoller};
use crate::protocol::frame::{self, OpCode};
use crate::protocol::handshake::Request;
use std::io::{Read, Write};
use std::net::TcpStream as StdStream;
use std::os::fd::RawFd;

/// How long any wait in these tests may take before the test fails instead of hanging.
const DEADLINE: Duration = Duration::from_secs(10);

const MASK: Option<[u8; 4]> = Some([1, 2, 3, 4]);

/// An app that upgrades every request and ignores every message.
struct Sink;

impl Handler for Sink {
    type Session = ();

    fn route(&mut self, _: ConnId, _: &Request) -> Route<()> {
        Route::Upgrade {
            session: (),
            protocol: None,
        }
    }

    fn on_open(&mut self, _: ConnId, _: &mut (), _: &mut Outbox<'_>) {}

    fn on_message(&mut self, _: ConnId, _: &mut (), _: OpCode, _: &[u8], _: &mut Outbox<'_>) {}

    fn on_close(&mut self, _: ConnId, _: (), _: &mut Outbox<'_>) {}
}

/// A real backend whose `wait` leaves out the events of `hidden`: input that is ready but that
/// this wait does not report (it arrived after the wait returned, or the wait was interrupted).
struct Hiding<P> {
    inner: P,
    hidden: Option<Token>,
}

impl<P: Poller> Poller for Hiding<P> {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn fd_limit(&self) -> Option<usize> {
        self.inner.fd_limit()
    }

    fn register(&mut self, fd: RawFd, token: Token, interest: Interest) -> io::Result<()> {
        self.inner.register(fd, token, interest)
    }

    fn reregister(&mut self, fd: RawFd, token: Token, interest: Interest) -> io::Result<()> {
        self.inner.reregister(fd, token, interest)
    }

    fn deregister(&mut self, fd: RawFd) -> io::Result<()> {
        self.inner.deregister(fd)
    }

    fn wait(&mut self, events: &mut Vec<Event>, timeout: Option<Duration>) -> io::Result<()> {
        self.inner.wait(events, timeout)?;
        if let Some(hidden) = self.hidden {
            events.retain(|e| e.token != hidden);
        }
        Ok(())
    }
}

type TestReactor<P> = Reactor<Hiding<P>, Sink>;

/// Runs `test` once on every backend, by name.
fn on_every_poller(test: impl Fn(&str)) {
    for poller in ["epoll", "poll", "select"] {
        test(poller);
    }
}

/// A reactor on 127.0.0.1:0 with the named backend.
fn reactor_on(poller: &str, config: Config) -> Box<dyn AnyReactor> {
    match poller {
        "epoll" => Box::new(bind(MioPoller::new().unwrap(), config)),
        "poll" => Box::new(bind(PollPoller::new().unwrap(), config)),
        "select" => Box::new(bind(SelectPoller::new().unwrap(), config)),
        other => panic!("no poller {other}"),
    }
}

fn bind<P: Poller>(inner: P, mut config: Config) -> TestReactor<P> {
    config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    let poller = Hiding {
        inner,
        hidden: None,
    };
    Reactor::bind(poller, Sink, config).unwrap()
}

/// What the tests need of a reactor, whatever its backend (one test body for all three).
trait AnyReactor {
    fn reactor_turn(&mut self);
    fn addr(&self) -> SocketAddr;
    fn set_listener_recv_buffer(&mut self, bytes: usize);
    fn hide(&mut self, id: Option<ConnId>);
    fn bytes_in(&self) -> u64;
    fn half_open_drops(&self) -> u64;
    fn pings_sent(&self) -> u64;
    /// The one connection in the slab, if any.
    fn only_conn(&mut self) -> Option<&mut Connection>;
    fn conn(&mut self, id: ConnId) -> Option<&mut Connection>;
}

impl<P: Poller> AnyReactor for TestReactor<P> {
    fn reactor_turn(&mut self) {
        assert_eq!(self.turn().unwrap(), None);
    }
    fn addr(&self) -> SocketAddr {
        self.local_addr()
    }
    fn set_listener_recv_buffer(&mut self, bytes: usize) {
        // Accepted sockets inherit it, and their receive window is sized from it.
        let listener = self.listener.as_ref().unwrap();
        socket2::SockRef::from(listener)
            .set_recv_buffer_size(bytes)
            .unwrap();
    }
    fn hide(&mut self, id: Option<ConnId>) {
        self.poller.hidden = id.map(|id| Token(id.token()));
    }
    fn bytes_in(&self) -> u64 {
        self.metrics.bytes_in
    }
    fn half_open_drops(&self) -> u64 {
        self.metrics.half_open_drops
    }
    fn pings_sent(&self) -> u64 {
        self.metrics.pings_sent
    }
    fn only_conn(&mut self) -> Option<&mut Connection> {
        assert!(self.conns.len() <= 1, "more than one connection");
        self.conns.iter_mut().next().map(|(_, c)| c)
    }
    fn conn(&mut self, id: ConnId) -> Option<&mut Connection> {
        self.conn_mut(id)
    }
}

/// Turns the loop until `done` holds, failing the test after `DEADLINE`.
fn turn_until(
    r: &mut dyn AnyReactor,
    what: &str,
    mut done: impl FnMut(&mut dyn AnyReactor) -> bool,
) {
    let start = Instant::now();
    while !done(r) {
        assert!(start.elapsed() < DEADLINE, "never: {what}");
        r.reactor_turn();
    }
}

/// Connects a client, upgrades it (turning the loop until the 101 is out) and returns the
/// client's socket, positioned after the 101 response, with the connection's id.
fn open_client(r: &mut dyn AnyReactor) -> (StdStream, ConnId) {
    let mut client = StdStream::connect(r.addr()).unwrap();
    client.set_read_timeout(Some(DEADLINE)).unwrap();
    client
        .write_all(
            b"GET /x HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        .unwrap();
    let mut id = None;
    turn_until(r, "the connection opens and its 101 is flushed", |r| {
        let conn = r.only_conn();
        id = conn.map(|c| c.id);
        r.only_conn()
            .is_some_and(|c| c.state() == connection::State::Open && c.outbound.is_empty())
    });
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        client.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"));
    (client, id.unwrap())
}

/// Reads one unmasked server frame: (first byte, payload). Short payloads only.
fn read_frame(client: &mut StdStream) -> (u8, Vec<u8>) {
    let mut h = [0u8; 2];
    client.read_exact(&mut h).unwrap();
    let mut payload = vec![0u8; usize::from(h[1] & 0x7f)];
    assert!(payload.len() < 126);
    client.read_exact(&mut payload).unwrap();
    (h[0], payload)
}

/// SPEC §2 fairness: a connection is read for at most one budget per iteration, also when it
/// is on the ready list and the wait reports it again (a level-triggered backend does, for the
/// bytes its last budget left unread).
#[test]
fn no_connection_is_read_for_more_than_one_budget_per_iteration() {
    on_every_poller(|poller| {
        let mut r = reactor_on(poller, Config::default());
        // Room for several budgets in the server's receive queue, so that a second read in one
        // iteration would find bytes (the default queue holds less than one budget).
        r.set_listener_recv_buffer(4 << 20);
        let (mut client, id) = open_client(&mut *r);
        let before = r.bytes_in();

        let message = frame::encode(true, OpCode::Binary, &vec![7u8; 900 * 1024], MASK);
        client.write_all(&message).unwrap();
        // Wait until the server's queue holds the whole message (observed with a peek, which
        // consumes nothing): then every read fills the receive buffer, and an iteration that
        // reads one budget reads exactly `READ_BUDGET_BYTES`.
        let mut peek = vec![0u8; message.len()];
        wait_until_queued(&mut *r, id, &mut peek);

        let mut most = 0;
        let mut turns = 0;
        while r.bytes_in() - before < message.len() as u64 {
            let start = r.bytes_in();
            r.reactor_turn();
            most = most.max(r.bytes_in() - start);
            turns += 1;
            assert!(turns < 1000, "{poller}: the message was never read whole");
        }
        assert_eq!(
            most, READ_BUDGET_BYTES as u64,
            "{poller}: most bytes read from the connection in one iteration"
        );
        assert!(
            r.conn(id).is_some(),
            "{poller}: the connection is still open"
        );
    });
}

/// Waits (bounded) until the server side of `id` has `peek.len()` bytes queued, without
/// turning the loop (nothing is read meanwhile).
fn wait_until_queued(r: &mut dyn AnyReactor, id: ConnId, peek: &mut [u8]) {
    let start = Instant::now();
    loop {
        let conn = r.conn(id).unwrap();
        let queued = conn.stream.peek(peek).unwrap_or(0);
        if queued == peek.len() {
            return;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "only {queued} bytes ever queued at the server"
        );
        std::thread::yield_now();
    }
}

/// SPEC §5: when the Pong deadline fires, a Pong that is waiting unread (the wait did not report
/// it, although it reported something else) is read first, and the connection is kept; a
/// connection that sent nothing is still dropped as half-open.
#[test]
fn the_pong_deadline_reads_the_connection_before_judging_it() {
    on_every_poller(|poller| {
        for answered in [true, false] {
            let config = Config {
                timer_tick: Duration::from_millis(5),
                heartbeat_interval: Duration::from_millis(20),
                heartbeat_timeout: Duration::from_millis(50),
                ..Config::default()
            };
            let timeout = config.heartbeat_timeout;
            let mut r = reactor_on(poller, config);
            let (mut client, id) = open_client(&mut *r);

            turn_until(&mut *r, "the heartbeat Ping is flushed", |r| {
                r.pings_sent() == 1 && r.conn(id).is_some_and(|c| c.outbound.is_empty())
            });
            assert!(r.conn(id).unwrap().awaiting_pong());
            let (b0, ping) = read_frame(&mut client);
            assert_eq!(b0, 0x89, "the heartbeat Ping");
            if answered {
                client
                    .write_all(&frame::encode(true, OpCode::Pong, &ping, MASK))
                    .unwrap();
            }
            // The loop does not run past the Pong deadline (a stall, which is the condition
            // under test, not a wait for anything), and then its wait does not report the
            // client, only a new connection at the listener.
            std::thread::sleep(timeout + Duration::from_millis(20));
            r.hide(Some(id));
            let _knock = StdStream::connect(r.addr()).unwrap();
            r.reactor_turn();

            if answered {
                assert_eq!(
                    r.half_open_drops(),
                    0,
                    "{poller}: dropped although it answered"
                );
                let conn = r.conn(id).expect("still connected");
                assert!(!conn.awaiting_pong(), "{poller}: the Pong was read");
            } else {
                assert_eq!(r.half_open_drops(), 1, "{poller}: a silent peer is dropped");
                assert!(r.conn(id).is_none());
            }
        }
    });
}
