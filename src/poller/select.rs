//! The select(2) backend: two bitmaps of descriptor numbers, copied and handed to the kernel on
//! every wait.
//!
//! Owns: the master read and write `fd_set`s, the fd -> (token, interest) map and the highest
//! registered descriptor; translation of the sets select hands back into our `Event`s.
//! Does not: decide anything, and never touches an `fd_set` bit at or above `FD_SETSIZE`.
//!
//! Implements SPEC §10 (select refuses descriptors >= FD_SETSIZE).
//!
//! # Level-triggered
//!
//! select(2) reports a descriptor on *every* wait for as long as it stays ready. The reactor never
//! relies on that (the contract in `poller/mod.rs`): it reads until `WouldBlock` or keeps the
//! connection on its own ready list, exactly as it must for the edge-triggered mio backend. What
//! level-triggering does demand is write interest only while bytes are pending: an idle socket is
//! writable on every wait and would turn the loop into a busy spin.
//!
//! # Cost per wait, and why it is O(highest descriptor)
//!
//! An `fd_set` is a fixed bitmap of `FD_SETSIZE` bits (1024 bits, 128 bytes on Linux and macOS),
//! indexed by descriptor number. select(2) tells the kernel "look at bits `0..nfds`", where `nfds`
//! is the highest descriptor plus one, and it *overwrites* the sets with the answer. So each wait:
//!
//! 1. copies both master sets into working sets (the kernel is about to destroy them);
//! 2. the kernel copies `nfds` bits of each set in, walks every bit below `nfds` (an idle or
//!    unregistered descriptor number costs as much as a busy one: one connection on descriptor
//!    1000 makes every wait look at 1000 bit positions), polls each set descriptor and queues the
//!    thread on its wait queue, then copies the sets back out;
//! 3. this file walks the registered descriptors and tests their bits to find which are ready.
//!
//! Nothing is remembered between calls, which is the root of the cost; epoll and kqueue (the mio
//! backend) keep the interest set in the kernel and return only the ready descriptors.
//!
//! select(2) has no separate hangup or error report: a hung-up socket is readable (the read
//! returns the EOF) and a failed one is readable and writable (the read or write returns the
//! error), so `Event::hangup` and `Event::error` are always false here. The third set, for
//! "exceptional conditions" (TCP urgent data), is not used.
//!
//! # Invariants
//!
//! * A descriptor is in `registrations` iff it is registered; its bit is set in `read_set` iff its
//!   interest is readable, and in `write_set` iff its interest is writable.
//! * Every registered descriptor is in `0..FD_SETSIZE` (register refuses the rest).
//! * `max_fd` is at least the highest registered descriptor; when `max_fd_stale` is false it is
//!   exactly that (`None` when nothing is registered).

use super::{Event, Interest, Poller, Token};
use std::collections::HashMap;
use std::io;
use std::os::fd::RawFd;
use std::ptr;
use std::time::Duration;

/// Level-triggered select(2) backend; `name()` is "select", `fd_limit()` is `FD_SETSIZE`.
/// See the module doc for costs.
pub struct SelectPoller {
    /// Descriptors with readable interest. Never handed to the kernel itself: select overwrites
    /// the sets it is given, so each wait passes a copy.
    read_set: libc::fd_set,
    /// Descriptors with writable interest; copied per wait like `read_set`.
    write_set: libc::fd_set,
    /// fd -> the caller's token and interest; the source of truth for what is registered.
    registrations: HashMap<RawFd, (Token, Interest)>,
    /// The highest registered descriptor (select's `nfds` is this plus one). Removing it would
    /// mean searching for the new highest; instead removal marks it stale and the next wait
    /// recomputes it once, however many removals happened in between.
    max_fd: Option<RawFd>,
    /// `max_fd` may be higher than the highest registered descriptor (harmless for select: it
    /// only looks at more bits) and must be recomputed before it is used.
    max_fd_stale: bool,
}

/// select(2) cannot be told to look at a bit past the end of its fixed-size bitmap.
fn fd_setsize() -> RawFd {
    // FD_SETSIZE is 1024 on every platform we build for; the fallback is unreachable but keeps
    // this free of an unchecked cast.
    RawFd::try_from(libc::FD_SETSIZE).unwrap_or(RawFd::MAX)
}

fn empty_fd_set() -> libc::fd_set {
    // SAFETY: `fd_set` is a plain array of integers, for which all-zero bytes is a valid value.
    let mut set: libc::fd_set = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a live, initialised `fd_set`. All-zero already is the empty set on every
    // platform we know of; FD_ZERO is the portable way to say so.
    unsafe { libc::FD_ZERO(&mut set) };
    set
}

/// Set or clear `fd`'s bit. Callers have checked `0 <= fd < FD_SETSIZE` (it is registered).
fn set_bit(set: &mut libc::fd_set, fd: RawFd, on: bool) {
    debug_assert!((0..fd_setsize()).contains(&fd));
    if on {
        // SAFETY: `set` is a live `fd_set` and `fd` is in `0..FD_SETSIZE`, so the bit is inside
        // the bitmap (pinned by the `fd_set_holds_exactly_fd_setsize_bits` test).
        unsafe { libc::FD_SET(fd, set) };
    } else {
        // SAFETY: as for FD_SET above.
        unsafe { libc::FD_CLR(fd, set) };
    }
}

fn is_set(set: &libc::fd_set, fd: RawFd) -> bool {
    debug_assert!((0..fd_setsize()).contains(&fd));
    // SAFETY: `set` is a live `fd_set` and `fd` is in `0..FD_SETSIZE` (it is registered), so
    // FD_ISSET reads a bit inside the bitmap.
    unsafe { libc::FD_ISSET(fd, set) }
}

/// select(2) takes seconds and microseconds. Round *up* to the next microsecond so a short timer
/// never becomes a zero-timeout busy loop. Seconds are capped at 10^8 (about three years): macOS
/// rejects larger values with EINVAL, and the caller just sees an early wake-up with no events.
fn to_timeval(timeout: Duration) -> libc::timeval {
    const MAX_SECS: u128 = 100_000_000;
    let micros = timeout.as_nanos().div_ceil(1_000);
    let (secs, usecs) = (micros / 1_000_000, micros % 1_000_000);
    let (secs, usecs) = if secs >= MAX_SECS {
        (MAX_SECS, 0)
    } else {
        (secs, usecs)
    };
    libc::timeval {
        // Both fit: secs <= 10^8 and usecs < 10^6, well inside time_t and suseconds_t.
        tv_sec: libc::time_t::try_from(secs).unwrap_or(libc::time_t::MAX),
        tv_usec: libc::suseconds_t::try_from(usecs).unwrap_or(0),
    }
}

fn not_registered(fd: RawFd) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("descriptor {fd} is not registered with the select backend"),
    )
}

impl SelectPoller {
    /// # Errors
    /// None today; the signature matches the other backends, whose creation can fail.
    pub fn new() -> io::Result<SelectPoller> {
        Ok(SelectPoller {
            read_set: empty_fd_set(),
            write_set: empty_fd_set(),
            registrations: HashMap::new(),
            max_fd: None,
            max_fd_stale: false,
        })
    }

    fn apply_interest(&mut self, fd: RawFd, interest: Interest) {
        set_bit(&mut self.read_set, fd, interest.readable);
        set_bit(&mut self.write_set, fd, interest.writable);
    }

    /// select's `nfds`: one past the highest registered descriptor (0 when none).
    fn nfds(&mut self) -> libc::c_int {
        if self.max_fd_stale {
            self.max_fd = self.registrations.keys().copied().max();
            self.max_fd_stale = false;
        }
        // max_fd < FD_SETSIZE, so adding one cannot overflow.
        self.max_fd.map_or(0, |fd| fd + 1)
    }
}

impl Poller for SelectPoller {
    fn name(&self) -> &'static str {
        "select"
    }

    fn fd_limit(&self) -> Option<usize> {
        Some(libc::FD_SETSIZE)
    }

    fn register(&mut self, fd: RawFd, token: Token, interest: Interest) -> io::Result<()> {
        // Checked before anything else: FD_SET on such a descriptor would write past the end of
        // the bitmap. The reactor refuses these at accept time (`fd_limit`); this is the backstop.
        if fd >= fd_setsize() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "descriptor {fd} is at or above FD_SETSIZE ({}); select(2) cannot watch it",
                    libc::FD_SETSIZE
                ),
            ));
        }
        if self.registrations.contains_key(&fd) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("descriptor {fd} is already registered with the select backend"),
            ));
        }
        // Also refuses negative numbers (EBADF), so every registered fd is in 0..FD_SETSIZE.
        super::check_open(fd)?;
        self.registrations.insert(fd, (token, interest));
        self.apply_interest(fd, interest);
        self.max_fd = Some(self.max_fd.map_or(fd, |max| max.max(fd)));
        Ok(())
    }

    fn reregister(&mut self, fd: RawFd, token: Token, interest: Interest) -> io::Result<()> {
        let entry = self
            .registrations
            .get_mut(&fd)
            .ok_or_else(|| not_registered(fd))?;
        *entry = (token, interest);
        self.apply_interest(fd, interest);
        Ok(())
    }

    fn deregister(&mut self, fd: RawFd) -> io::Result<()> {
        self.registrations
            .remove(&fd)
            .ok_or_else(|| not_registered(fd))?;
        self.apply_interest(
            fd,
            Interest {
                readable: false,
                writable: false,
            },
        );
        if self.max_fd == Some(fd) {
            self.max_fd_stale = true;
        }
        Ok(())
    }

    fn wait(&mut self, events: &mut Vec<Event>, timeout: Option<Duration>) -> io::Result<()> {
        events.clear();
        let nfds = self.nfds();
        // Step 1 of the cost above: select overwrites the sets it is given, so it gets copies.
        let mut read_ready = self.read_set;
        let mut write_ready = self.write_set;
        let mut tv = timeout.map(to_timeval);
        let tv_ptr = tv
            .as_mut()
            .map_or(ptr::null_mut(), |tv| tv as *mut libc::timeval);
        // SAFETY: `read_ready` and `write_ready` are live, initialised `fd_set`s owned by this
        // frame, and `nfds <= FD_SETSIZE`, so the kernel reads and writes only bits inside them.
        // The except set is null (not used). `tv_ptr` is null (wait forever) or points to `tv`,
        // which lives until the call returns; the kernel may write the time left into it.
        let ready = unsafe {
            libc::select(
                nfds,
                &mut read_ready,
                &mut write_ready,
                ptr::null_mut(),
                tv_ptr,
            )
        };
        if ready < 0 {
            let err = io::Error::last_os_error();
            // A signal arrived (e.g. SIGTERM, which reaches the reactor through its self-pipe).
            // The sets are unspecified after a failed call; nothing is read from them.
            return match err.kind() {
                io::ErrorKind::Interrupted => Ok(()),
                _ => Err(err),
            };
        }
        if ready == 0 {
            return Ok(());
        }
        // Step 3: find the set bits. Walking the registrations (not 0..nfds) costs O(registered);
        // the kernel has already paid O(nfds). `ready` counts set bits, so a descriptor ready
        // both ways counts twice; once all are found the rest of the walk is skipped.
        let mut remaining = usize::try_from(ready).unwrap_or(0);
        for (&fd, &(token, _)) in &self.registrations {
            if remaining == 0 {
                break;
            }
            let readable = is_set(&read_ready, fd);
            let writable = is_set(&write_ready, fd);
            remaining = remaining.saturating_sub(usize::from(readable) + usize::from(writable));
            if readable || writable {
                events.push(Event {
                    token,
                    readable,
                    writable,
                    hangup: false,
                    error: false,
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::net::UnixStream;

    /// The bounds check in `register` protects memory only if an `fd_set` holds exactly
    /// `FD_SETSIZE` bits; pin that, on every platform.
    #[test]
    fn fd_set_holds_exactly_fd_setsize_bits() {
        assert_eq!(std::mem::size_of::<libc::fd_set>() * 8, libc::FD_SETSIZE);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn fd_setsize_is_1024_on_linux() {
        assert_eq!(libc::FD_SETSIZE, 1024);
    }

    fn check_timeval(name: &str, timeout: Duration, expected: (libc::time_t, libc::suseconds_t)) {
        let tv = to_timeval(timeout);
        assert_eq!((tv.tv_sec, tv.tv_usec), expected, "{name}");
    }

    #[test]
    fn timeval_rounds_up_to_whole_microseconds() {
        let table = [
            ("zero just looks", Duration::ZERO, (0, 0)),
            ("one nanosecond", Duration::from_nanos(1), (0, 1)),
            ("0.3 ms", Duration::from_micros(300), (0, 300)),
            (
                "just under a second",
                Duration::from_nanos(999_999_001),
                (1, 0),
            ),
            ("2.5 s", Duration::from_millis(2_500), (2, 500_000)),
            (
                "huge is capped",
                Duration::from_secs(u64::MAX),
                (100_000_000, 0),
            ),
        ];
        for (name, timeout, expected) in table {
            check_timeval(name, timeout, expected);
        }
    }

    fn check_refused(name: &str, fd: RawFd) {
        let mut poller = SelectPoller::new().unwrap();
        let err = poller
            .register(fd, Token(1), Interest::READABLE)
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{name}");
        assert!(err.to_string().contains("FD_SETSIZE"), "{name}: {err}");
        assert!(poller.registrations.is_empty(), "{name}");
    }

    /// The bounds check comes before anything else, so it needs no open descriptor to test.
    #[test]
    fn numbers_at_or_above_fd_setsize_are_refused() {
        let limit = fd_setsize();
        let table = [
            ("FD_SETSIZE", limit),
            ("FD_SETSIZE + 1", limit + 1),
            ("largest RawFd", RawFd::MAX),
        ];
        for (name, fd) in table {
            check_refused(name, fd);
        }
    }

    /// Raises the soft descriptor limit (if needed) so the process may hold a descriptor numbered
    /// `at_least`. Process-wide, but raising it cannot hurt the other tests.
    fn allow_descriptor(at_least: usize) {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: `limit` is a live rlimit the call fills in.
        let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
        assert_eq!(rc, 0, "getrlimit: {}", io::Error::last_os_error());
        let wanted = libc::rlim_t::try_from(at_least + 16).unwrap();
        if limit.rlim_cur >= wanted {
            return;
        }
        assert!(
            limit.rlim_max >= wanted,
            "this test needs a descriptor numbered {at_least}; the hard limit is {}",
            limit.rlim_max
        );
        limit.rlim_cur = wanted;
        // SAFETY: `limit` is a live, initialised rlimit the call only reads.
        let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
        assert_eq!(rc, 0, "setrlimit: {}", io::Error::last_os_error());
    }

    /// A real, open descriptor numbered >= FD_SETSIZE is refused with InvalidInput, while the
    /// same socket under a small number is accepted.
    #[test]
    fn open_descriptor_at_or_above_fd_setsize_is_refused() {
        allow_descriptor(libc::FD_SETSIZE);
        let (a, _b) = UnixStream::pair().unwrap();
        // F_DUPFD picks the lowest *free* number >= the argument, so unlike dup2 it cannot close
        // a descriptor another test thread is using.
        // SAFETY: F_DUPFD_CLOEXEC duplicates the open descriptor `a`; it takes no pointer.
        let high = unsafe { libc::fcntl(a.as_raw_fd(), libc::F_DUPFD_CLOEXEC, fd_setsize()) };
        assert!(
            high >= fd_setsize(),
            "F_DUPFD: {}",
            io::Error::last_os_error()
        );
        // SAFETY: `high` was just returned by F_DUPFD, is open, and nothing else owns it.
        let high = unsafe { OwnedFd::from_raw_fd(high) };

        let mut poller = SelectPoller::new().unwrap();
        let err = poller
            .register(high.as_raw_fd(), Token(1), Interest::READABLE)
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(err.to_string().contains("FD_SETSIZE"), "{err}");
        assert_eq!(poller.nfds(), 0);
        // Never registered, so the other calls say so instead of touching the sets.
        let err = poller
            .reregister(high.as_raw_fd(), Token(1), Interest::BOTH)
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        let err = poller.deregister(high.as_raw_fd()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);

        poller
            .register(a.as_raw_fd(), Token(2), Interest::READABLE)
            .unwrap();
    }

    #[test]
    fn fd_limit_is_fd_setsize() {
        assert_eq!(
            SelectPoller::new().unwrap().fd_limit(),
            Some(libc::FD_SETSIZE)
        );
    }

    /// nfds follows the highest registered descriptor, including after that one is removed.
    #[test]
    fn nfds_tracks_highest_descriptor_lazily() {
        let (a, b) = UnixStream::pair().unwrap();
        let (low, high) = if a.as_raw_fd() < b.as_raw_fd() {
            (a.as_raw_fd(), b.as_raw_fd())
        } else {
            (b.as_raw_fd(), a.as_raw_fd())
        };
        let mut poller = SelectPoller::new().unwrap();
        assert_eq!(poller.nfds(), 0);
        poller.register(low, Token(1), Interest::READABLE).unwrap();
        poller.register(high, Token(2), Interest::READABLE).unwrap();
        assert_eq!(poller.nfds(), high + 1);
        poller.deregister(high).unwrap();
        assert!(poller.max_fd_stale);
        assert_eq!(poller.nfds(), low + 1);
        poller.deregister(low).unwrap();
        assert_eq!(poller.nfds(), 0);
    }

    #[test]
    fn interest_sets_and_clears_bits() {
        let (a, _b) = UnixStream::pair().unwrap();
        let fd = a.as_raw_fd();
        let mut poller = SelectPoller::new().unwrap();
        let bits = |p: &SelectPoller| (is_set(&p.read_set, fd), is_set(&p.write_set, fd));
        poller.register(fd, Token(1), Interest::READABLE).unwrap();
        assert_eq!(bits(&poller), (true, false));
        poller.reregister(fd, Token(1), Interest::WRITABLE).unwrap();
        assert_eq!(bits(&poller), (false, true));
        poller.reregister(fd, Token(1), Interest::BOTH).unwrap();
        assert_eq!(bits(&poller), (true, true));
        poller.deregister(fd).unwrap();
        assert_eq!(bits(&poller), (false, false));
    }
}
