//! The poll(2) backend: one dense array of `pollfd`s handed to the kernel on every wait.
//!
//! Owns: the `pollfd` array, the parallel token array and the fd -> position index; translation
//! of `revents` into our `Event`s.
//! Does not: decide anything. It keeps no policy and no buffers beyond those three collections.
//!
//! Implements SPEC §10 (dense pollfd array with O(1) removal).
//!
//! # Level-triggered
//!
//! poll(2) reports a descriptor on *every* wait for as long as it stays ready, not just once when
//! it becomes ready. The reactor never relies on that (the contract in `poller/mod.rs`): it reads
//! until `WouldBlock` or keeps the connection on its own ready list, exactly as it must for the
//! edge-triggered mio backend. What level-triggering does demand of the reactor is the other
//! half of the contract: write interest only while bytes are pending, because an idle socket is
//! writable on every wait and would turn the loop into a busy spin.
//!
//! # Cost per wait
//!
//! O(registered descriptors), idle or not: the whole array is copied into the kernel, the kernel
//! checks every entry (and puts the thread on every entry's wait queue), copies `revents` back,
//! and this file scans the array for non-zero `revents`. Compare mio (epoll/kqueue), where the
//! kernel keeps the interest set between calls and a wait costs O(ready descriptors).
//!
//! # Invariants
//!
//! * `pollfds`, `tokens` and `index` have the same length.
//! * For every registered `fd`: `pollfds[index[fd]].fd == fd`, and `tokens[index[fd]]` is the
//!   token it was last (re)registered with.
//! * No descriptor appears twice (register refuses a registered descriptor).
//!
//! Because all state lives in these user-space collections and the kernel sees it only for the
//! duration of one `poll` call, the awkward orderings of a kernel-side interest set (deregister,
//! close, reuse of the number, register again, all before the next wait) need no special care
//! here: the next wait simply sees the array as it is then.

use super::{Event, Interest, Poller, Token};
use std::collections::HashMap;
use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

/// Level-triggered poll(2) backend; `name()` is "poll". See the module doc for costs.
pub struct PollPoller {
    /// What the kernel reads (`fd`, `events`) and writes (`revents`). Dense: no holes, so a wait
    /// never makes the kernel look at a slot that is not in use.
    pollfds: Vec<libc::pollfd>,
    /// `tokens[i]` is the caller's token for `pollfds[i]`. Kept apart from `pollfds` because the
    /// kernel needs the `pollfd` array to be exactly an array of `pollfd`s.
    tokens: Vec<Token>,
    /// fd -> position in `pollfds`/`tokens`, so that reregister and deregister do not search.
    index: HashMap<RawFd, usize>,
}

impl PollPoller {
    /// # Errors
    /// None today; the signature matches the other backends, whose creation can fail.
    pub fn new() -> io::Result<PollPoller> {
        Ok(PollPoller {
            pollfds: Vec::new(),
            tokens: Vec::new(),
            index: HashMap::new(),
        })
    }
}

/// The `events` mask for an interest. Empty interest gives 0: the descriptor stays registered
/// and `revents` can still carry the conditions the kernel always reports (POLLHUP, POLLERR,
/// POLLNVAL), just as epoll always reports EPOLLHUP and EPOLLERR.
fn to_poll_events(interest: Interest) -> libc::c_short {
    let mut events = 0;
    if interest.readable {
        // POLLPRI (urgent data) is asked for with readable: the caller's answer to both is "read".
        events |= libc::POLLIN | libc::POLLPRI;
    }
    if interest.writable {
        events |= libc::POLLOUT;
    }
    events
}

/// Translate `revents`. Hangup and error are only hints (the contract in `poller/mod.rs`), so
/// they also set the flags that make the caller perform the operation that reports them: a read
/// after POLLHUP returns the EOF, a read or write after POLLERR returns the error.
fn to_event(token: Token, revents: libc::c_short) -> Event {
    let hangup = revents & libc::POLLHUP != 0;
    let error = revents & (libc::POLLERR | libc::POLLNVAL) != 0;
    Event {
        token,
        readable: revents & (libc::POLLIN | libc::POLLPRI) != 0 || hangup || error,
        writable: revents & libc::POLLOUT != 0 || error,
        hangup,
        error,
    }
}

/// poll(2) takes whole milliseconds. Round *up*: rounding a 0.3 ms timer down to 0 would make the
/// reactor spin with zero-timeout waits until the timer is due. Waking up to 1 ms late is fine;
/// the timer wheel fires anything due when the wait returns. Timeouts beyond `c_int::MAX` ms
/// (about 24 days) are clamped; the caller just sees an early wake-up with no events.
fn timeout_ms(timeout: Option<Duration>) -> libc::c_int {
    match timeout {
        None => -1, // poll(2): a negative timeout means wait forever.
        Some(d) => {
            let ms = d.as_nanos().div_ceil(1_000_000);
            libc::c_int::try_from(ms).unwrap_or(libc::c_int::MAX)
        }
    }
}

fn not_registered(fd: RawFd) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("descriptor {fd} is not registered with the poll backend"),
    )
}

impl Poller for PollPoller {
    fn name(&self) -> &'static str {
        "poll"
    }

    /// O(1) (amortised): push onto the end of the dense arrays.
    fn register(&mut self, fd: RawFd, token: Token, interest: Interest) -> io::Result<()> {
        if self.index.contains_key(&fd) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("descriptor {fd} is already registered with the poll backend"),
            ));
        }
        super::check_open(fd)?;
        self.index.insert(fd, self.pollfds.len());
        self.pollfds.push(libc::pollfd {
            fd,
            events: to_poll_events(interest),
            revents: 0,
        });
        self.tokens.push(token);
        Ok(())
    }

    /// O(1): change `events` and the token in place; nothing moves.
    fn reregister(&mut self, fd: RawFd, token: Token, interest: Interest) -> io::Result<()> {
        let i = *self.index.get(&fd).ok_or_else(|| not_registered(fd))?;
        self.pollfds[i].events = to_poll_events(interest);
        self.tokens[i] = token;
        Ok(())
    }

    /// O(1): swap-remove. The last entry moves into the hole, so its index entry is fixed up.
    /// (The simple version, `Vec::remove`, shifts every later entry and would make closing one
    /// connection O(n).)
    fn deregister(&mut self, fd: RawFd) -> io::Result<()> {
        let i = self.index.remove(&fd).ok_or_else(|| not_registered(fd))?;
        self.pollfds.swap_remove(i);
        self.tokens.swap_remove(i);
        // If `i` was not the last slot, the former last entry now lives at `i`.
        if let Some(moved) = self.pollfds.get(i) {
            self.index.insert(moved.fd, i);
        }
        debug_assert_eq!(self.pollfds.len(), self.index.len());
        Ok(())
    }

    fn wait(&mut self, events: &mut Vec<Event>, timeout: Option<Duration>) -> io::Result<()> {
        events.clear();
        let nfds = libc::nfds_t::try_from(self.pollfds.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "too many descriptors"))?;
        // SAFETY: the pointer and length describe `self.pollfds`, a live, initialised Vec of
        // `pollfd` that nothing else borrows during the call. poll(2) reads `fd` and `events` of
        // each of those `nfds` entries and writes only their `revents`. For an empty Vec the
        // pointer is dangling but non-null, and the kernel reads nothing through it.
        let ready = unsafe { libc::poll(self.pollfds.as_mut_ptr(), nfds, timeout_ms(timeout)) };
        if ready < 0 {
            let err = io::Error::last_os_error();
            // A signal arrived (e.g. SIGTERM, which reaches the reactor through its self-pipe).
            return match err.kind() {
                io::ErrorKind::Interrupted => Ok(()),
                _ => Err(err),
            };
        }
        // `ready` entries have non-zero `revents`; finding them means scanning the whole array.
        let mut remaining = usize::try_from(ready).unwrap_or(0);
        for (pollfd, &token) in self.pollfds.iter().zip(&self.tokens) {
            if remaining == 0 {
                break;
            }
            if pollfd.revents != 0 {
                events.push(to_event(token, pollfd.revents));
                remaining -= 1;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    fn check_timeout(name: &str, timeout: Option<Duration>, expected_ms: libc::c_int) {
        assert_eq!(timeout_ms(timeout), expected_ms, "{name}");
    }

    #[test]
    fn timeout_rounds_up_to_whole_milliseconds() {
        let table = [
            ("forever", None, -1),
            ("zero just looks", Some(Duration::ZERO), 0),
            ("one nanosecond", Some(Duration::from_nanos(1)), 1),
            (
                "0.3 ms is not a busy loop",
                Some(Duration::from_micros(300)),
                1,
            ),
            ("exactly 1 ms", Some(Duration::from_millis(1)), 1),
            ("just over 1 ms", Some(Duration::from_nanos(1_000_001)), 2),
            ("1.5 s", Some(Duration::from_millis(1_500)), 1_500),
            (
                "beyond c_int is clamped",
                Some(Duration::from_secs(u64::MAX)),
                libc::c_int::MAX,
            ),
        ];
        for (name, timeout, expected) in table {
            check_timeout(name, timeout, expected);
        }
    }

    fn check_event(name: &str, revents: libc::c_short, expected: Event) {
        assert_eq!(to_event(Token(7), revents), expected, "{name}");
    }

    #[test]
    fn revents_translate_to_events() {
        let ev = |readable, writable, hangup, error| Event {
            token: Token(7),
            readable,
            writable,
            hangup,
            error,
        };
        let table = [
            ("POLLIN", libc::POLLIN, ev(true, false, false, false)),
            ("POLLPRI", libc::POLLPRI, ev(true, false, false, false)),
            ("POLLOUT", libc::POLLOUT, ev(false, true, false, false)),
            (
                "POLLHUP reads the EOF",
                libc::POLLHUP,
                ev(true, false, true, false),
            ),
            ("POLLERR", libc::POLLERR, ev(true, true, false, true)),
            ("POLLNVAL", libc::POLLNVAL, ev(true, true, false, true)),
            (
                "POLLIN|POLLOUT",
                libc::POLLIN | libc::POLLOUT,
                ev(true, true, false, false),
            ),
        ];
        for (name, revents, expected) in table {
            check_event(name, revents, expected);
        }
    }

    /// Pins the platform values the translation above was checked against (Linux and the BSDs
    /// share them), so a port to a platform that differs is noticed rather than mistranslated.
    #[cfg(any(target_os = "linux", target_os = "macos", target_os = "freebsd"))]
    #[test]
    fn poll_flag_values_are_the_traditional_ones() {
        assert_eq!(
            [
                libc::POLLIN,
                libc::POLLPRI,
                libc::POLLOUT,
                libc::POLLERR,
                libc::POLLHUP,
                libc::POLLNVAL
            ],
            [0x1, 0x2, 0x4, 0x8, 0x10, 0x20]
        );
    }

    #[test]
    fn empty_interest_registers_with_no_events() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut poller = PollPoller::new().unwrap();
        let none = Interest {
            readable: false,
            writable: false,
        };
        poller.register(a.as_raw_fd(), Token(1), none).unwrap();
        assert_eq!(poller.pollfds[0].events, 0);
        assert_eq!(poller.index.get(&a.as_raw_fd()), Some(&0));
    }

    /// The invariants listed in the module doc, checked against a model of what should be
    /// registered (fd -> (token, interest)).
    fn check_invariants(poller: &PollPoller, model: &HashMap<RawFd, (Token, Interest)>) {
        assert_eq!(poller.pollfds.len(), model.len());
        assert_eq!(poller.tokens.len(), model.len());
        assert_eq!(poller.index.len(), model.len());
        for (&fd, &(token, interest)) in model {
            let i = poller.index[&fd];
            assert_eq!(poller.pollfds[i].fd, fd);
            assert_eq!(poller.pollfds[i].events, to_poll_events(interest));
            assert_eq!(poller.tokens[i], token);
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        Register(usize, Interest),
        Reregister(usize, Interest),
        Deregister(usize),
    }

    /// Enough pairs to make swap-remove move entries around a lot.
    const PAIRS: usize = 200;

    fn op() -> impl Strategy<Value = Op> {
        let interest = (any::<bool>(), any::<bool>())
            .prop_map(|(readable, writable)| Interest { readable, writable });
        let slot = 0..PAIRS * 2;
        prop_oneof![
            (slot.clone(), interest.clone()).prop_map(|(s, i)| Op::Register(s, i)),
            (slot.clone(), interest).prop_map(|(s, i)| Op::Reregister(s, i)),
            slot.prop_map(Op::Deregister),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Random register / reregister / deregister sequences over 200 socket pairs keep the
        /// index map consistent, and the poller accepts and refuses exactly what the model says.
        #[test]
        fn index_map_stays_consistent(ops in prop::collection::vec(op(), 1..400)) {
            let _guard = super::super::tests::fd_hungry_lock();
            let pairs: Vec<(UnixStream, UnixStream)> =
                (0..PAIRS).map(|_| UnixStream::pair().unwrap()).collect();
            let fds: Vec<RawFd> = pairs
                .iter()
                .flat_map(|(a, b)| [a.as_raw_fd(), b.as_raw_fd()])
                .collect();
            let mut poller = PollPoller::new().unwrap();
            let mut model: HashMap<RawFd, (Token, Interest)> = HashMap::new();
            for (n, op) in ops.into_iter().enumerate() {
                let token = Token(n);
                match op {
                    Op::Register(s, interest) => {
                        let fd = fds[s];
                        let result = poller.register(fd, token, interest);
                        prop_assert_eq!(result.is_ok(), !model.contains_key(&fd));
                        model.entry(fd).or_insert((token, interest));
                    }
                    Op::Reregister(s, interest) => {
                        let fd = fds[s];
                        let result = poller.reregister(fd, token, interest);
                        prop_assert_eq!(result.is_ok(), model.contains_key(&fd));
                        if let Some(entry) = model.get_mut(&fd) {
                            *entry = (token, interest);
                        }
                    }
                    Op::Deregister(s) => {
                        let fd = fds[s];
                        let result = poller.deregister(fd);
                        prop_assert_eq!(result.is_ok(), model.remove(&fd).is_some());
                    }
                }
                check_invariants(&poller, &model);
            }
        }
    }
}
