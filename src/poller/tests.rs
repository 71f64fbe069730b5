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
    assert!(["epoll", "kqueue", "poll", "select"].contains(&p.name()));
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
