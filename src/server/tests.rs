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

    fn short_read_drains(&self) -> bool {
        self.inner.short_read_drains()
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

/// A reactor on 127.0.0.1:0 over `backend`, hiding nothing yet.
fn bind<P: Poller>(backend: P, config: Config) -> TestReactor<P> {
    let config = Config {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        ..config
    };
    let poller = Hiding {
        inner: backend,
        hidden: None,
    };
    Reactor::bind(poller, Sink, config).unwrap()
}

/// One iteration of the loop, which must not end it.
fn turn<P: Poller>(r: &mut TestReactor<P>) {
    assert_eq!(r.turn().unwrap(), None);
}

/// Turns the loop until `done` holds, failing the test after `DEADLINE`.
fn turn_until<P: Poller>(
    r: &mut TestReactor<P>,
    what: &str,
    mut done: impl FnMut(&mut TestReactor<P>) -> bool,
) {
    let start = Instant::now();
    while !done(r) {
        assert!(start.elapsed() < DEADLINE, "never: {what}");
        turn(r);
    }
}

/// Connects a client, upgrades it (turning the loop until the 101 is out) and returns the
/// client's socket, positioned after the 101 response, with the connection's id.
fn open_client<P: Poller>(r: &mut TestReactor<P>) -> (StdStream, ConnId) {
    let mut client = StdStream::connect(r.local_addr()).unwrap();
    client.set_read_timeout(Some(DEADLINE)).unwrap();
    client
        .write_all(
            b"GET /x HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        .unwrap();
    turn_until(r, "the connection opens and its 101 is flushed", |r| {
        r.conns
            .iter()
            .any(|(_, c)| c.state() == connection::State::Open && c.outbound.is_empty())
    });
    assert_eq!(r.conns.len(), 1);
    let id = r.conns.iter().map(|(_, c)| c.id).next().unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        client.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"));
    (client, id)
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
    one_budget_per_iteration(MioPoller::new().unwrap());
    one_budget_per_iteration(PollPoller::new().unwrap());
    one_budget_per_iteration(SelectPoller::new().unwrap());
}

fn one_budget_per_iteration<P: Poller>(backend: P) {
    let mut r = bind(backend, Config::default());
    let poller = r.poller_name();
    // Room for several budgets in the server's receive queue, so that a second read in one
    // iteration would find bytes (the default queue holds less than one budget). Accepted
    // sockets inherit it from the listener, and their receive window is sized from it.
    let listener = r.listener.as_ref().unwrap();
    socket2::SockRef::from(listener)
        .set_recv_buffer_size(4 << 20)
        .unwrap();
    let (mut client, id) = open_client(&mut r);
    let before = r.metrics.bytes_in;

    let message = frame::encode(true, OpCode::Binary, &vec![7u8; 900 * 1024], MASK);
    client.write_all(&message).unwrap();
    // Wait (bounded, without turning the loop) until the server's queue holds the whole
    // message, seen with a peek, which consumes nothing: then every read fills the receive
    // buffer, and an iteration that reads one budget reads exactly `READ_BUDGET_BYTES`.
    let mut peek = vec![0u8; message.len()];
    let start = Instant::now();
    loop {
        let queued = r.conn_mut(id).unwrap().stream.peek(&mut peek).unwrap_or(0);
        if queued == message.len() {
            break;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "{poller}: only {queued} bytes queued"
        );
        std::thread::yield_now();
    }

    let mut most = 0;
    let mut turns = 0;
    while r.metrics.bytes_in - before < message.len() as u64 {
        let start = r.metrics.bytes_in;
        turn(&mut r);
        most = most.max(r.metrics.bytes_in - start);
        turns += 1;
        assert!(turns < 1000, "{poller}: the message was never read whole");
    }
    assert_eq!(
        most, READ_BUDGET_BYTES as u64,
        "{poller}: most bytes read from the connection in one iteration"
    );
    assert!(r.conn_mut(id).is_some(), "{poller}: the connection is open");
}

/// Replies leave at once: every accepted connection has Nagle's algorithm off, on Linux by
/// inheriting `TCP_NODELAY` from the listener (no system call per connection), elsewhere set on
/// each. Fails if the inheritance the reactor relies on does not hold.
#[test]
fn accepted_connections_have_nagle_off() {
    nagle_off(MioPoller::new().unwrap());
    nagle_off(PollPoller::new().unwrap());
    nagle_off(SelectPoller::new().unwrap());
    #[cfg(target_os = "linux")]
    match crate::poller::UringPoller::new() {
        Ok(p) => nagle_off(p),
        Err(e) => crate::poller::uring_refused(&e),
    }
}

fn nagle_off<P: Poller>(backend: P) {
    let mut r = bind(backend, Config::default());
    let poller = r.poller_name();
    // On Linux through the listener: no `setsockopt` per connection.
    assert_eq!(r.nodelay_inherited, cfg!(target_os = "linux"), "{poller}");
    let (_client, id) = open_client(&mut r);
    let conn = r.conn_mut(id).unwrap();
    assert!(conn.stream.nodelay().unwrap(), "{poller}: Nagle is on");
}

/// Also a connection whose TCP handshake completed before the reactor existed (a client that
/// reconnects while the server starts: Linux copies the listener's options at that moment, not
/// at `accept`), on a listener made by `accept::listen` and on one without `TCP_NODELAY`.
#[test]
fn a_connection_queued_before_the_reactor_runs_has_nagle_off() {
    queued_nagle_off(MioPoller::new);
    queued_nagle_off(PollPoller::new);
    queued_nagle_off(SelectPoller::new);
    #[cfg(target_os = "linux")]
    match crate::poller::UringPoller::new() {
        Ok(_) => queued_nagle_off(crate::poller::UringPoller::new),
        Err(e) => crate::poller::uring_refused(&e),
    }
}

fn queued_nagle_off<P: Poller>(make: fn() -> io::Result<P>) {
    let addr = SocketAddr::from(([127, 0, 0, 1], 0));
    let ours = accept::listen(addr, false).unwrap();
    let plain = std::net::TcpListener::bind(addr).unwrap();
    for (kind, listener) in [("accept::listen", ours), ("a plain listener", plain)] {
        let mut early = StdStream::connect(listener.local_addr().unwrap()).unwrap();
        // `connect` has returned: the handshake is complete and the connection is queued.
        let poller = Hiding {
            inner: make().unwrap(),
            hidden: None,
        };
        let mut r = Reactor::on_listener(poller, Sink, Config::default(), listener).unwrap();
        let poller = r.poller_name();
        early
            .write_all(
                b"GET /x HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                  Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            )
            .unwrap();
        turn_until(&mut r, "the early connection is admitted", |r| {
            r.conns.len() == 1
        });
        let (_, conn) = r.conns.iter().next().unwrap();
        assert!(
            conn.stream.nodelay().unwrap(),
            "{poller}, {kind}: Nagle is on"
        );
    }
}

/// SPEC §5: when the Pong deadline fires, a Pong that is waiting unread (the wait did not report
/// it, although it reported something else) is read first, and the connection is kept; a
/// connection that sent nothing is still dropped as half-open.
#[test]
fn the_pong_deadline_reads_the_connection_before_judging_it() {
    for answered in [true, false] {
        pong_deadline(MioPoller::new().unwrap(), answered);
        pong_deadline(PollPoller::new().unwrap(), answered);
        pong_deadline(SelectPoller::new().unwrap(), answered);
    }
}

fn pong_deadline<P: Poller>(backend: P, answered: bool) {
    let config = Config {
        timer_tick: Duration::from_millis(5),
        heartbeat_interval: Duration::from_millis(20),
        heartbeat_timeout: Duration::from_millis(50),
        ..Config::default()
    };
    let timeout = config.heartbeat_timeout;
    let mut r = bind(backend, config);
    let poller = r.poller_name();
    let (mut client, id) = open_client(&mut r);

    turn_until(&mut r, "the heartbeat Ping is flushed", |r| {
        r.metrics.pings_sent == 1 && r.conn_mut(id).is_some_and(|c| c.outbound.is_empty())
    });
    assert!(r.conn_mut(id).unwrap().awaiting_pong());
    let (b0, ping) = read_frame(&mut client);
    assert_eq!(b0, 0x89, "the heartbeat Ping");
    if answered {
        client
            .write_all(&frame::encode(true, OpCode::Pong, &ping, MASK))
            .unwrap();
    }
    // The loop does not run past the Pong deadline (a stall, which is the condition under
    // test, not a wait for anything), and then its wait does not report the client, only a new
    // connection at the listener.
    std::thread::sleep(timeout + Duration::from_millis(20));
    r.poller.hidden = Some(Token(id.token()));
    let _knock = StdStream::connect(r.local_addr()).unwrap();
    turn(&mut r);

    if answered {
        assert_eq!(
            r.metrics.half_open_drops, 0,
            "{poller}: dropped, yet it answered"
        );
        let conn = r.conn_mut(id).expect("still connected");
        assert!(!conn.awaiting_pong(), "{poller}: the Pong was read");
    } else {
        assert_eq!(
            r.metrics.half_open_drops, 1,
            "{poller}: a silent peer is dropped"
        );
        assert!(r.conn_mut(id).is_none());
    }
}

/// An app that asks for its timer (`Outbox::wake_at`) at the times its clients name, and
/// records when the timer fires. A message `"<ms>"` asks for now + ms.
struct Alarm {
    fired: Vec<Instant>,
}

impl Handler for Alarm {
    type Session = ();

    fn route(&mut self, _: ConnId, _: &Request) -> Route<()> {
        Route::Upgrade {
            session: (),
            protocol: None,
        }
    }

    fn on_open(&mut self, _: ConnId, _: &mut (), _: &mut Outbox<'_>) {}

    fn on_message(&mut self, _: ConnId, _: &mut (), _: OpCode, data: &[u8], out: &mut Outbox<'_>) {
        for ms in std::str::from_utf8(data).unwrap().split(',') {
            out.wake_at(Instant::now() + Duration::from_millis(ms.parse().unwrap()));
        }
    }

    fn on_close(&mut self, _: ConnId, _: (), _: &mut Outbox<'_>) {}

    fn on_timer(&mut self, _: &mut Outbox<'_>) {
        self.fired.push(Instant::now());
    }
}

/// Sends a masked text frame and turns the loop until the app has had it.
fn ask<P: Poller>(r: &mut Reactor<Hiding<P>, Alarm>, client: &mut StdStream, text: &str) {
    let before = r.metrics.messages_in;
    client
        .write_all(&frame::encode(true, OpCode::Text, text.as_bytes(), MASK))
        .unwrap();
    let start = Instant::now();
    while r.metrics.messages_in == before {
        assert!(start.elapsed() < DEADLINE, "never: the app gets {text:?}");
        assert_eq!(r.turn().unwrap(), None);
    }
}

/// The seam for app deadlines (token expiry, docs/architecture.md "The app's timer"): ONE app
/// timer in the wheel, the earliest time asked for wins, it fires once and never early, and an
/// app that asks for nothing leaves no timer (so no wake-up) behind.
#[test]
fn the_app_timer_is_one_timer_and_the_earliest_request_wins() {
    app_timer(MioPoller::new().unwrap());
    app_timer(PollPoller::new().unwrap());
    app_timer(SelectPoller::new().unwrap());
}

fn app_timer<P: Poller>(backend: P) {
    let config = Config {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        timer_tick: Duration::from_millis(5),
        ..Config::default()
    };
    let poller = Hiding {
        inner: backend,
        hidden: None,
    };
    let mut r = Reactor::bind(poller, Alarm { fired: Vec::new() }, config).unwrap();
    let name = r.poller_name();
    let mut client = StdStream::connect(r.local_addr()).unwrap();
    client.set_read_timeout(Some(DEADLINE)).unwrap();
    client
        .write_all(
            b"GET /x HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        .unwrap();
    let start = Instant::now();
    while !r
        .conns
        .iter()
        .any(|(_, c)| c.state() == connection::State::Open)
    {
        assert!(start.elapsed() < DEADLINE, "{name}: never opened");
        assert_eq!(r.turn().unwrap(), None);
    }
    // Only the connection's own deadline (its heartbeat) is in the wheel: asking for nothing
    // arms nothing.
    let baseline = r.timers.len();
    assert!(r.app_timer.is_none(), "{name}");

    // A far time, then a later one (ignored), then an earlier one (replaces the far one).
    ask(&mut r, &mut client, "60000");
    let far = r.app_timer.unwrap().0;
    assert_eq!(r.timers.len(), baseline + 1, "{name}: one app timer");
    ask(&mut r, &mut client, "120000");
    assert_eq!(
        r.app_timer.unwrap().0,
        far,
        "{name}: a later request changes nothing"
    );
    let asked = Instant::now();
    ask(&mut r, &mut client, "40,50");
    let soon = r.app_timer.unwrap().0;
    assert!(
        soon < far && soon >= asked,
        "{name}: the earlier request wins"
    );
    assert_eq!(r.timers.len(), baseline + 1, "{name}: still one app timer");

    let start = Instant::now();
    while r.handler.fired.is_empty() {
        assert!(
            start.elapsed() < DEADLINE,
            "{name}: the app timer never fired"
        );
        assert_eq!(r.turn().unwrap(), None);
    }
    assert!(r.handler.fired[0] >= soon, "{name}: fired early");
    assert!(r.app_timer.is_none(), "{name}: a fired timer is spent");
    assert_eq!(r.timers.len(), baseline, "{name}: nothing left armed");
    // The far request was replaced, not kept: nothing more fires however often the loop turns.
    for _ in 0..3 {
        ask(&mut r, &mut client, "0");
        let start = Instant::now();
        let fired = r.handler.fired.len();
        while r.handler.fired.len() == fired {
            assert!(
                start.elapsed() < DEADLINE,
                "{name}: a due request never fired"
            );
            assert_eq!(r.turn().unwrap(), None);
        }
    }
    assert_eq!(r.handler.fired.len(), 4, "{name}: one call per request");
    assert_eq!(r.timers.len(), baseline, "{name}");
}

/// docs/pollers.md, "When a short read is enough": on edge-triggered epoll a read that returns
/// less than the buffer ends the connection's read (no read to see `WouldBlock`), and nothing is
/// lost: bytes that arrive later raise a new event, and a hangup that came with the data is in
/// the event, which makes the reactor read on to the end of the stream. Other backends read
/// until `WouldBlock` as before.
#[test]
fn a_short_read_ends_the_read_only_where_nothing_can_be_missed() {
    short_read(MioPoller::new().unwrap());
    short_read(PollPoller::new().unwrap());
    short_read(SelectPoller::new().unwrap());
}

fn short_read<P: Poller>(backend: P) {
    let mut r = bind(backend, Config::default());
    let poller = r.poller_name();
    let edge = r.poller.short_read_drains();
    assert_eq!(edge, poller == "epoll", "{poller}: only epoll claims it");
    let (mut client, id) = open_client(&mut r);
    let read_all = |r: &mut TestReactor<P>, bytes: u64, what: &str| {
        let target = r.metrics.bytes_in + bytes;
        turn_until(r, what, |r| r.metrics.bytes_in >= target);
    };

    let first = frame::encode(true, OpCode::Binary, b"first", MASK);
    let stopped = r.metrics.reads_stopped_short;
    client.write_all(&first).unwrap();
    read_all(&mut r, first.len() as u64, "the first frame is read");
    let stopped_now = r.metrics.reads_stopped_short - stopped;
    if edge {
        assert!(stopped_now >= 1, "{poller}: the short read ended the read");
    } else {
        assert_eq!(stopped_now, 0, "{poller}: read until WouldBlock");
    }

    // Bytes that arrive after the short read are still read: they raise a new event.
    let second = frame::encode(true, OpCode::Binary, b"second", MASK);
    client.write_all(&second).unwrap();
    read_all(
        &mut r,
        second.len() as u64,
        "bytes sent after the short read are read",
    );

    // Data and the end of the stream in one event: the event says hangup, so the read goes
    // on past the short read to the EOF, and the connection is closed. (Stopping at the short
    // read would leave the EOF unread, and no new event would ever come for it.)
    let third = frame::encode(true, OpCode::Binary, b"third", MASK);
    client.write_all(&third).unwrap();
    client.shutdown(std::net::Shutdown::Write).unwrap();
    turn_until(&mut r, "the EOF behind the data is seen", |r| {
        r.conn_mut(id).is_none()
    });
}

/// SPEC §2, docs/architecture.md "Memory": a connection holds a frame reader only while a frame
/// or a fragmented message is incomplete; between whole frames it holds none.
#[test]
fn a_connection_holds_a_reader_only_while_a_frame_is_incomplete() {
    reader_only_while_incomplete(MioPoller::new().unwrap());
    reader_only_while_incomplete(PollPoller::new().unwrap());
    reader_only_while_incomplete(SelectPoller::new().unwrap());
}

fn reader_only_while_incomplete<P: Poller>(backend: P) {
    let mut r = bind(backend, Config::default());
    let poller = r.poller_name();
    let (mut client, id) = open_client(&mut r);
    let held = |r: &mut TestReactor<P>| r.conn_mut(id).unwrap().reader.is_held();
    assert!(
        !held(&mut r),
        "{poller}: an idle connection holds no reader"
    );

    let message = frame::encode(true, OpCode::Binary, &[9u8; 100], MASK);
    let (start, rest) = message.split_at(40);
    let before = r.metrics.bytes_in;
    client.write_all(start).unwrap();
    turn_until(&mut r, "the start of the frame is read", |r| {
        r.metrics.bytes_in >= before + start.len() as u64
    });
    assert!(held(&mut r), "{poller}: a partial frame is held");
    client.write_all(rest).unwrap();
    turn_until(&mut r, "the rest of the frame is read", |r| {
        r.metrics.bytes_in >= before + message.len() as u64
    });
    assert!(
        !held(&mut r),
        "{poller}: the reader is released with the frame"
    );
}

/// docs/benchmarks.md, "Idle memory": the reply buffers and rings the outbound pool keeps for
/// reuse go back to the allocator once the loop has been idle for `SPARES_KEPT_IDLE`, so a burst
/// (here: one 101 response) leaves nothing behind on an idle server.
#[test]
fn an_idle_reactor_gives_its_spare_buffers_back() {
    spares_released(MioPoller::new().unwrap());
    spares_released(PollPoller::new().unwrap());
    spares_released(SelectPoller::new().unwrap());
}

fn spares_released<P: Poller>(backend: P) {
    let mut r = bind(backend, Config::default());
    let (_client, _id) = open_client(&mut r);
    assert!(
        r.outbound_pool.has_spares(),
        "the 101 response's buffer and ring are kept for reuse"
    );
    let start = Instant::now();
    turn_until(&mut r, "the spares are released", |r| {
        !r.outbound_pool.has_spares()
    });
    assert!(
        start.elapsed() >= SPARES_KEPT_IDLE,
        "not before the idle spell"
    );
}

/// An API app that holds the first request until its timer fires (as the file engine holds a
/// publish until its fsync), then answers every request at once.
struct Held {
    first: Option<ConnId>,
    released: bool,
}

impl Handler for Held {
    type Session = ();

    fn route(&mut self, _: ConnId, _: &Request) -> Route<()> {
        Route::Api {
            max_body: 64 * 1024,
        }
    }

    fn on_open(&mut self, _: ConnId, _: &mut (), _: &mut Outbox<'_>) {}

    fn on_message(&mut self, _: ConnId, _: &mut (), _: OpCode, _: &[u8], _: &mut Outbox<'_>) {}

    fn on_close(&mut self, _: ConnId, _: (), _: &mut Outbox<'_>) {}

    fn on_request(
        &mut self,
        conn: ConnId,
        _: &Request,
        _: Result<&[u8], crate::protocol::Refusal>,
        out: &mut Outbox<'_>,
    ) {
        if self.released {
            out.respond(conn, 200, b"{}".to_vec());
        } else {
            self.first = Some(conn);
            out.wake_at(Instant::now() + Duration::from_millis(100));
        }
    }

    fn on_timer(&mut self, out: &mut Outbox<'_>) {
        self.released = true;
        if let Some(conn) = self.first.take() {
            out.respond(conn, 200, b"{}".to_vec());
        }
    }
}

/// A completion backend receives by itself: while an answer is pending and the pipelined
/// requests reach `MAX_PIPELINED_BYTES`, its receive is paused, so the buffer stops growing
/// although the client keeps writing (on the readiness pollers the reactor simply does not
/// read; `api::*::pipelining_beyond_the_buffer_waits_for_the_answers` covers them end to end).
/// After the answer every request is answered.
#[cfg(target_os = "linux")]
#[test]
fn a_paused_uring_receive_bounds_the_pipelined_bytes() {
    let backend = match crate::poller::UringPoller::new() {
        Ok(p) => p,
        Err(e) => {
            crate::poller::uring_refused(&e);
            return;
        }
    };
    let config = Config {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        timer_tick: Duration::from_millis(5),
        ..Config::default()
    };
    let app = Held {
        first: None,
        released: false,
    };
    let mut r = Reactor::bind(backend, app, config).unwrap();
    const N: usize = 1500;
    const CHUNK: usize = 16 * 1024;
    let body = "x".repeat(1000);
    let request = format!(
        "POST /api/x HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let bytes = request.repeat(N).into_bytes();
    let mut client = StdStream::connect(r.local_addr()).unwrap();
    client.set_nonblocking(true).unwrap();
    let mut written = 0;
    let write_some = |client: &mut StdStream, written: &mut usize| {
        let end = (*written + CHUNK).min(bytes.len());
        match client.write(&bytes[*written..end]) {
            Ok(n) => *written += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("{e}"),
        }
    };
    let paused = |r: &mut Reactor<crate::poller::UringPoller, Held>| {
        r.conns.iter().any(|(_, c)| c.exchange().read_paused)
    };
    // Small writes, each reaped without a turn (no timer fires, so the first request stays
    // unanswered), until the reactor pauses the connection.
    let start = Instant::now();
    while !paused(&mut r) {
        assert!(start.elapsed() < DEADLINE, "never paused");
        write_some(&mut client, &mut written);
        r.collect_completions();
    }
    assert_eq!(r.metrics.http_read_pauses, 1);
    // The client goes on writing; whatever the receive completed before its cancellation took
    // effect is kept, and then nothing more.
    let mut most = 0;
    for _ in 0..50 {
        write_some(&mut client, &mut written);
        r.collect_completions();
        let (_, conn) = r.conns.iter().next().expect("the connection");
        most = most.max(conn.request.len());
    }
    assert!(
        most <= http::MAX_PIPELINED_BYTES + 4 * CHUNK,
        "{most} bytes buffered while paused"
    );
    assert!(
        written > most + 8 * CHUNK,
        "the client wrote only {written}"
    );
    // The answer resumes the receive: every request is answered.
    let mut answers = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let count = |answers: &[u8]| {
        answers
            .windows(15)
            .filter(|w| w == b"HTTP/1.1 200 OK")
            .count()
    };
    let start = Instant::now();
    while count(&answers) < N {
        assert!(start.elapsed() < DEADLINE, "{} answers", count(&answers));
        write_some(&mut client, &mut written);
        assert_eq!(r.turn().unwrap(), None);
        match client.read(&mut buf) {
            Ok(0) => panic!("closed after {} answers", count(&answers)),
            Ok(n) => answers.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(r.metrics.http_read_pauses, 1);
}
