//! Behaviour every backend shares, written once and run against each (SPEC §10: "All behaviour
//! tests run against every poller").
//!
//! mio is edge-triggered and poll/select are level-triggered, so these tests assert only what
//! holds for both: an event arrives after the descriptor becomes ready (new data, a fresh
//! registration, an interest change), and none arrives for what was not asked for. None of them
//! asserts that a descriptor which *stays* ready is reported again.

use super::{Event, Interest, MioPoller, PollPoller, Poller, SelectPoller, Token};
use std::collections::BTreeSet;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// Tests that open hundreds of descriptors take this lock, so that two of them running at once
/// cannot push descriptor numbers past select's FD_SETSIZE (1024) and fail for that reason.
static FD_HUNGRY: Mutex<()> = Mutex::new(());

pub(super) fn fd_hungry_lock() -> MutexGuard<'static, ()> {
    // A test that panicked while holding the lock leaves nothing behind to protect.
    FD_HUNGRY.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Upper bound for anything we expect to happen; a deadline, not a measurement.
const DEADLINE: Duration = Duration::from_secs(10);
/// How long one wait may block while we wait for an expected event.
const SLICE: Duration = Duration::from_millis(100);

/// Wait (repeatedly, up to `DEADLINE`) until the events collected so far satisfy `done`; return
/// them all.
fn wait_until(p: &mut dyn Poller, what: &str, done: impl Fn(&[Event]) -> bool) -> Vec<Event> {
    let start = Instant::now();
    let mut seen = Vec::new();
    let mut events = Vec::new();
    while !done(&seen) {
        assert!(
            start.elapsed() < DEADLINE,
            "{}: still waiting for {what}; saw {seen:?}",
            p.name()
        );
        p.wait(&mut events, Some(SLICE)).unwrap();
        seen.extend_from_slice(&events);
    }
    seen
}

/// One wait that just looks.
fn look(p: &mut dyn Poller) -> Vec<Event> {
    let mut events = Vec::new();
    p.wait(&mut events, Some(Duration::ZERO)).unwrap();
    events
}

fn has(events: &[Event], token: Token, check: impl Fn(&Event) -> bool) -> bool {
    events.iter().any(|e| e.token == token && check(e))
}

fn nonblocking_pair() -> (UnixStream, UnixStream) {
    let (a, b) = UnixStream::pair().unwrap();
    a.set_nonblocking(true).unwrap();
    b.set_nonblocking(true).unwrap();
    (a, b)
}

/// Read until WouldBlock, as the reactor does; returns the number of bytes read.
fn drain(stream: &mut UnixStream) -> usize {
    let mut total = 0;
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return total,
            Ok(n) => total += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return total,
            Err(e) => panic!("read: {e}"),
        }
    }
}

// ---- the shared cases -------------------------------------------------------------------------

fn name_is_known(p: &mut dyn Poller) {
    assert!(["epoll", "kqueue", "poll", "select", "uring"].contains(&p.name()));
}

fn readable_after_write(p: &mut dyn Poller) {
    let (a, mut b) = nonblocking_pair();
    p.register(a.as_raw_fd(), Token(1), Interest::READABLE)
        .unwrap();
    b.write_all(b"x").unwrap();
    wait_until(p, "readable", |ev| has(ev, Token(1), |e| e.readable));
}

fn writable_reported(p: &mut dyn Poller) {
    let (a, _b) = nonblocking_pair();
    p.register(a.as_raw_fd(), Token(2), Interest::WRITABLE)
        .unwrap();
    let seen = wait_until(p, "writable", |ev| has(ev, Token(2), |e| e.writable));
    assert!(!has(&seen, Token(2), |e| e.readable), "{seen:?}");
}

/// The reactor's "writable interest only while bytes are pending": dropping write interest
/// silences write events; adding it back (under a new token) brings them back.
fn reregister_stops_and_starts_write_events(p: &mut dyn Poller) {
    let (a, _b) = nonblocking_pair();
    let fd = a.as_raw_fd();
    p.register(fd, Token(3), Interest::BOTH).unwrap();
    wait_until(p, "writable", |ev| has(ev, Token(3), |e| e.writable));

    p.reregister(fd, Token(3), Interest::READABLE).unwrap();
    let seen = look(p);
    assert!(!has(&seen, Token(3), |e| e.writable), "{seen:?}");

    p.reregister(fd, Token(4), Interest::WRITABLE).unwrap();
    let seen = wait_until(p, "writable again", |ev| has(ev, Token(4), |e| e.writable));
    assert!(
        seen.iter().all(|e| e.token == Token(4)),
        "old token: {seen:?}"
    );
}

fn deregister_stops_events(p: &mut dyn Poller) {
    let (mut a, mut b) = nonblocking_pair();
    let fd = a.as_raw_fd();
    p.register(fd, Token(5), Interest::BOTH).unwrap();
    p.deregister(fd).unwrap();
    b.write_all(b"x").unwrap();
    let seen = look(p);
    assert!(seen.is_empty(), "{seen:?}");

    // The same descriptor can be registered again and is then reported.
    p.register(fd, Token(6), Interest::READABLE).unwrap();
    wait_until(p, "readable after re-register", |ev| {
        has(ev, Token(6), |e| e.readable)
    });
    assert_eq!(drain(&mut a), 1);
}

fn timeout_with_no_events(p: &mut dyn Poller) {
    let mut events = vec![Event {
        token: Token(99),
        readable: true,
        writable: true,
        hangup: true,
        error: true,
    }];
    // Nothing registered at all.
    p.wait(&mut events, Some(Duration::from_millis(5))).unwrap();
    assert!(events.is_empty(), "{events:?}");
    // Registered, but idle.
    let (a, _b) = nonblocking_pair();
    p.register(a.as_raw_fd(), Token(7), Interest::READABLE)
        .unwrap();
    p.wait(&mut events, Some(Duration::from_micros(300)))
        .unwrap();
    assert!(events.is_empty(), "{events:?}");
}

/// The one "again" that holds on every backend: after a drain to WouldBlock, *new* data is
/// reported.
fn new_data_after_drain_is_reported(p: &mut dyn Poller) {
    let (mut a, mut b) = nonblocking_pair();
    p.register(a.as_raw_fd(), Token(8), Interest::READABLE)
        .unwrap();
    for round in 1..=3 {
        b.write_all(&vec![round; 1000]).unwrap();
        wait_until(p, "readable", |ev| has(ev, Token(8), |e| e.readable));
        assert_eq!(drain(&mut a), 1000);
    }
}

/// A closed peer shows up as readable, so the caller's read finds the EOF.
fn peer_close_is_readable(p: &mut dyn Poller) {
    let (mut a, b) = nonblocking_pair();
    p.register(a.as_raw_fd(), Token(9), Interest::READABLE)
        .unwrap();
    drop(b);
    wait_until(p, "readable on close", |ev| {
        has(ev, Token(9), |e| e.readable)
    });
    assert_eq!(a.read(&mut [0u8; 8]).unwrap(), 0);
}

/// What a refused call should say; the same on every backend (epoll's EEXIST, ENOENT and EBADF
/// map to the first two kinds and the raw code).
#[derive(Debug)]
enum Refusal {
    AlreadyExists,
    NotFound,
    BadDescriptor,
}

fn check_refusal(backend: &str, name: &str, result: io::Result<()>, expected: Refusal) {
    let err = match result {
        Err(err) => err,
        Ok(()) => panic!("{backend}: {name}: succeeded"),
    };
    let ok = match expected {
        Refusal::AlreadyExists => err.kind() == io::ErrorKind::AlreadyExists,
        Refusal::NotFound => err.kind() == io::ErrorKind::NotFound,
        Refusal::BadDescriptor => err.raw_os_error() == Some(libc::EBADF),
    };
    assert!(ok, "{backend}: {name}: expected {expected:?}, got {err:?}");
}

fn misuse_is_refused(p: &mut dyn Poller) {
    let (a, _b) = nonblocking_pair();
    let (other, _other_peer) = nonblocking_pair();
    let (fd, other) = (a.as_raw_fd(), other.as_raw_fd());
    p.register(fd, Token(10), Interest::READABLE).unwrap();
    let backend = p.name();
    let table = [
        (
            "register twice",
            p.register(fd, Token(11), Interest::READABLE),
            Refusal::AlreadyExists,
        ),
        (
            "reregister unknown",
            p.reregister(other, Token(12), Interest::READABLE),
            Refusal::NotFound,
        ),
        ("deregister unknown", p.deregister(other), Refusal::NotFound),
        (
            "register -1",
            p.register(-1, Token(13), Interest::READABLE),
            Refusal::BadDescriptor,
        ),
    ];
    for (name, result, expected) in table {
        check_refusal(backend, name, result, expected);
    }
    // The refusals left the existing registration alone.
    p.deregister(fd).unwrap();
}

/// 200 socket pairs, a pseudo-random sequence of registers and deregisters, then one byte to
/// every pair: exactly the registered descriptors are reported, under their own tokens.
fn many_descriptors(p: &mut dyn Poller) {
    const PAIRS: usize = 200;
    let _guard = fd_hungry_lock();
    let pairs: Vec<(UnixStream, UnixStream)> = (0..PAIRS).map(|_| nonblocking_pair()).collect();
    let mut registered = BTreeSet::new();
    // xorshift64 with a fixed seed: "random" order, same every run.
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    for _ in 0..2_000 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let i = usize::try_from(state % PAIRS as u64).unwrap();
        let fd = pairs[i].0.as_raw_fd();
        if registered.remove(&i) {
            p.deregister(fd).unwrap();
        } else {
            p.register(fd, Token(i), Interest::READABLE).unwrap();
            registered.insert(i);
        }
    }
    assert!(!registered.is_empty() && registered.len() < PAIRS);
    for (_, peer) in &pairs {
        (&*peer).write_all(b"x").unwrap();
    }
    let tokens = |ev: &[Event]| ev.iter().map(|e| e.token.0).collect::<BTreeSet<usize>>();
    let seen = wait_until(p, "every registered descriptor", |ev| {
        tokens(ev) == registered
    });
    assert!(seen.iter().all(|e| e.readable), "{seen:?}");
    // Nothing unregistered turns up late either.
    let late = look(p);
    assert!(tokens(&late).is_subset(&registered), "{late:?}");
}

// ---- run every case on every backend ----------------------------------------------------------

macro_rules! cases_on {
    ($module:ident, $new:expr, $($case:ident),* $(,)?) => {
        mod $module {
            use super::*;
            $(
                #[test]
                fn $case() {
                    let mut poller = $new.unwrap();
                    super::$case(&mut poller);
                }
            )*
        }
    };
}

macro_rules! on_every_backend {
    ($($case:ident),* $(,)?) => {
        cases_on!(on_mio, MioPoller::new(), $($case),*);
        cases_on!(on_poll, PollPoller::new(), $($case),*);
        cases_on!(on_select, SelectPoller::new(), $($case),*);
        #[cfg(target_os = "linux")]
        mod on_uring {
            $(
                #[test]
                fn $case() {
                    if let Some(mut poller) = super::completion::uring() {
                        super::$case(&mut poller);
                    }
                }
            )*
        }
    };
}

on_every_backend!(
    name_is_known,
    readable_after_write,
    writable_reported,
    reregister_stops_and_starts_write_events,
    deregister_stops_events,
    timeout_with_no_events,
    new_data_after_drain_is_reported,
    peer_close_is_readable,
    misuse_is_refused,
    many_descriptors,
);

/// The completion half of the trait, on the one backend that has it: accepts, receives into
/// lent buffers, sends, and closing only after the operations on a descriptor have reported.
#[cfg(target_os = "linux")]
mod completion {
    use super::super::{Completion, UringPoller};
    use super::*;
    use std::io::IoSlice;
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::{AsRawFd, OwnedFd};

    /// The backend, or `None` (and one line saying why) where the kernel refuses io_uring.
    pub(super) fn uring() -> Option<UringPoller> {
        match UringPoller::new() {
            Ok(p) => Some(p),
            Err(e) => {
                crate::poller::uring_refused(&e);
                None
            }
        }
    }

    /// Waits (bounded) until a completion satisfies `want`; returns it, dropping the others
    /// but giving their buffers back.
    fn wait_for(p: &mut UringPoller, what: &str, want: impl Fn(&Completion) -> bool) -> Completion {
        let start = Instant::now();
        let mut events = Vec::new();
        let mut done = Vec::new();
        loop {
            assert!(start.elapsed() < DEADLINE, "still waiting for {what}");
            p.wait(&mut events, Some(SLICE)).unwrap();
            p.take_completions(&mut done);
            let mut found = None;
            for c in done.drain(..) {
                if found.is_none() && want(&c) {
                    found = Some(c);
                } else if let Completion::Received(_, buf) = c {
                    p.recycle(buf);
                }
            }
            if let Some(c) = found {
                return c;
            }
        }
    }

    /// A connected pair: the client, and the server's side as accepted by the backend's
    /// multishot accept and then watched for receiving as `Token(5)`.
    fn accepted_pair(p: &mut UringPoller) -> (TcpStream, OwnedFd) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        p.watch_listener(listener.as_raw_fd(), Token(1)).unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        client.set_read_timeout(Some(DEADLINE)).unwrap();
        let Completion::Accepted(fd) =
            wait_for(p, "the accept", |c| matches!(c, Completion::Accepted(_)))
        else {
            unreachable!()
        };
        p.watch_connection(fd.as_raw_fd(), Token(5)).unwrap();
        (client, fd)
    }

    fn received(p: &mut UringPoller, what: &str) -> Vec<u8> {
        match wait_for(p, what, |c| matches!(c, Completion::Received(Token(5), _))) {
            Completion::Received(_, mut buf) => {
                let bytes = buf.bytes_mut().to_vec();
                p.recycle(buf);
                bytes
            }
            _ => unreachable!(),
        }
    }

    #[test]
    fn accept_receive_send_and_eof() {
        let Some(mut p) = uring() else { return };
        let (mut client, fd) = accepted_pair(&mut p);
        client.write_all(b"hello").unwrap();
        assert_eq!(received(&mut p, "hello"), b"hello");

        // The bytes lent to the send live in `reply` until its completion is taken.
        let reply = b"world, in two slices".to_vec();
        let (head, tail) = reply.split_at(6);
        // SAFETY: `reply` outlives the wait for the `Sent` completion below.
        unsafe {
            p.send(
                fd.as_raw_fd(),
                Token(5),
                &[IoSlice::new(head), IoSlice::new(tail)],
            )
            .unwrap();
        }
        let sent = wait_for(&mut p, "the send", |c| matches!(c, Completion::Sent(..)));
        assert!(
            matches!(sent, Completion::Sent(Token(5), Ok(n)) if n == reply.len()),
            "{sent:?}"
        );
        let mut got = vec![0u8; reply.len()];
        client.read_exact(&mut got).unwrap();
        assert_eq!(got, reply);

        drop(client);
        wait_for(&mut p, "the end of stream", |c| {
            matches!(c, Completion::Eof(Token(5)))
        });
    }

    /// More receives than the backend has buffers: each is given back after use, so the
    /// receive never runs dry (without `recycle` it would stop after the 256th).
    #[test]
    fn buffers_go_back_and_are_used_again() {
        let Some(mut p) = uring() else { return };
        let (mut client, _fd) = accepted_pair(&mut p);
        for i in 0..600u32 {
            client.write_all(&i.to_be_bytes()).unwrap();
            let mut got = Vec::new();
            while got.len() < 4 {
                got.extend(received(&mut p, "the next message"));
            }
            assert_eq!(got, i.to_be_bytes(), "message {i}");
        }
    }

    /// A descriptor closed while its receive is armed stays open until the cancellation has
    /// reported, so no operation can reach a new socket that reuses its number; then it closes
    /// (the peer sees the end of the stream).
    #[test]
    fn close_waits_for_the_operations_in_flight() {
        let Some(mut p) = uring() else { return };
        let (mut client, fd) = accepted_pair(&mut p);
        let raw = fd.as_raw_fd();
        p.deregister(raw).unwrap();
        p.close(fd);
        // SAFETY: F_GETFD only reads descriptor flags.
        assert_ne!(
            unsafe { libc::fcntl(raw, libc::F_GETFD) },
            -1,
            "closed while its receive was still armed"
        );
        client.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 1];
        let start = Instant::now();
        let mut events = Vec::new();
        loop {
            assert!(
                start.elapsed() < DEADLINE,
                "the descriptor was never closed"
            );
            p.wait(&mut events, Some(SLICE)).unwrap();
            match client.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => panic!("unexpected bytes"),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
        }
        // The receive's end was a cancellation: nothing is reported for it.
        let mut done = Vec::new();
        p.take_completions(&mut done);
        assert!(done.is_empty(), "{done:?}");
    }

    /// Bytes waiting unread in the socket `fd`'s receive queue.
    fn unread(fd: &OwnedFd) -> usize {
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int through the pointer, which points to `n`.
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n) };
        assert_eq!(rc, 0, "{}", io::Error::last_os_error());
        usize::try_from(n).unwrap()
    }

    /// Waits (bounded) until `fd` has `want` bytes unread, failing on any receive meanwhile.
    fn wait_unread(p: &mut UringPoller, fd: &OwnedFd, want: usize) {
        let start = Instant::now();
        let (mut events, mut done) = (Vec::new(), Vec::new());
        while unread(fd) != want {
            assert!(start.elapsed() < DEADLINE, "{} bytes unread", unread(fd));
            p.wait(&mut events, Some(SLICE)).unwrap();
            p.take_completions(&mut done);
            assert!(done.is_empty(), "reported while paused: {done:?}");
        }
    }

    /// A paused receive leaves what arrives in the socket (sends go on), and resuming it
    /// brings those bytes, once; a pause undone before its cancellation reported loses
    /// nothing either; a paused connection closes as any other.
    #[test]
    fn pause_and_resume_receive() {
        let Some(mut p) = uring() else { return };
        let (mut client, fd) = accepted_pair(&mut p);
        let raw = fd.as_raw_fd();
        client.write_all(b"before").unwrap();
        assert_eq!(received(&mut p, "before"), b"before");

        p.pause_receive(raw).unwrap();
        p.pause_receive(raw).unwrap(); // twice is one pause
                                       // The cancellation is submitted by the next wait; then nothing is received: the
                                       // bytes stay in the socket.
        let mut events = Vec::new();
        p.wait(&mut events, Some(Duration::ZERO)).unwrap();
        let mut done = Vec::new();
        p.take_completions(&mut done);
        assert!(done.is_empty(), "{done:?}");
        client.write_all(b"while paused").unwrap();
        wait_unread(&mut p, &fd, 12);
        // A send is not a receive: it still goes out.
        // SAFETY: the slice is a static, alive until the `Sent` completion and after.
        unsafe {
            p.send(raw, Token(5), &[IoSlice::new(b"pong")]).unwrap();
        }
        let sent = wait_for(&mut p, "the send", |c| matches!(c, Completion::Sent(..)));
        assert!(
            matches!(sent, Completion::Sent(Token(5), Ok(4))),
            "{sent:?}"
        );
        let mut got = [0u8; 4];
        client.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"pong");
        assert_eq!(unread(&fd), 12, "received while paused");

        p.resume_receive(raw, Token(5)).unwrap();
        p.resume_receive(raw, Token(5)).unwrap(); // not paused: nothing to do
        assert_eq!(received(&mut p, "the bytes that waited"), b"while paused");

        // Paused and resumed before the wait that submits the cancellation: the receive is
        // armed again when the cancelled one reports, and nothing is lost or doubled.
        p.pause_receive(raw).unwrap();
        p.resume_receive(raw, Token(5)).unwrap();
        client.write_all(b"after").unwrap();
        assert_eq!(received(&mut p, "after"), b"after");

        // Closed while paused: the descriptor is closed (the peer sees the end of its stream).
        p.pause_receive(raw).unwrap();
        p.wait(&mut events, Some(Duration::ZERO)).unwrap();
        p.deregister(raw).unwrap();
        assert!(
            p.resume_receive(raw, Token(5)).is_err(),
            "resumed after deregister"
        );
        p.close(fd);
        client.set_nonblocking(true).unwrap();
        let start = Instant::now();
        let mut buf = [0u8; 1];
        loop {
            assert!(
                start.elapsed() < DEADLINE,
                "the descriptor was never closed"
            );
            p.wait(&mut events, Some(SLICE)).unwrap();
            p.take_completions(&mut done);
            assert!(done.is_empty(), "{done:?}");
            match client.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => panic!("unexpected bytes"),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
        }
    }
}
