//! Readiness notification behind one trait: the reactor asks "which descriptors can make
//! progress?" and does not care whether epoll, kqueue, poll(2) or select(2) answers.
//!
//! Owns: the `Poller` trait, `Token`, `Interest`, `Event`, and the backends: `mio.rs`
//! (`MioPoller`, edge-triggered), `poll.rs` (`PollPoller`) and `select.rs` (`SelectPoller`), both
//! level-triggered siblings with the same surface. `tests.rs` runs the shared behaviour on all three.
//! `waker.rs`: a descriptor other threads make readable, which every backend can watch.
//! `uring.rs` (Linux): `UringPoller`, the completion-based backend, and `completion.rs`, what it
//! reports (finished accepts, receives and sends). Its extra surface is the second half of the
//! trait, after `wait`; readiness backends keep the defaults, which the reactor never calls on
//! them (it checks `Poller::completion_based`).
//! Does not: know anything about WebSockets, HTTP or connections. It sees descriptors and tokens.
//!
//! # The contract every caller relies on (SPEC §2, §10)
//!
//! * **Readiness is a hint, not a promise.** An event says an operation *may* make progress. The
//!   caller must treat `WouldBlock` as "not ready after all" and spurious events as harmless.
//! * **Drain or remember.** The mio backend is edge-triggered: it reports a descriptor once when it
//!   *becomes* ready, not while it *stays* ready. A caller that stops reading before `WouldBlock`
//!   will never hear about the remaining bytes again. So the reactor either reads until
//!   `WouldBlock` or puts the connection on its own ready list and serves it on the next
//!   iteration with a zero timeout. poll(2) and select(2) are level-triggered and would report the
//!   descriptor again, but the reactor never relies on it, so one reactor works on all backends.
//! * **Writable interest only while there is something to write.** A level-triggered backend
//!   reports an idle socket as writable on every wait; registering write interest permanently
//!   would turn the loop into a busy spin.
//! * **Tokens are the caller's.** A backend hands back exactly the token it was given at
//!   `register`/`reregister`. It never invents or reuses tokens.

pub mod completion;
mod mio;
mod poll;
mod select;
#[cfg(test)]
mod tests;
#[cfg(target_os = "linux")]
mod uring;
pub mod waker;

pub use self::completion::{Completion, RecvBuf};
pub use self::mio::MioPoller;
pub use self::poll::PollPoller;
pub use self::select::SelectPoller;
#[cfg(target_os = "linux")]
pub use self::uring::UringPoller;

use std::io::{self, IoSlice};
use std::os::fd::{OwnedFd, RawFd};
use std::time::Duration;

/// Opaque value that identifies a registered descriptor in the events a backend returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Token(pub usize);

/// Which kinds of readiness a registration wants to hear about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Interest {
    pub readable: bool,
    pub writable: bool,
}

impl Interest {
    pub const READABLE: Interest = Interest {
        readable: true,
        writable: false,
    };
    pub const WRITABLE: Interest = Interest {
        readable: false,
        writable: true,
    };
    pub const BOTH: Interest = Interest {
        readable: true,
        writable: true,
    };
}

/// One readiness report. `hangup` and `error` are hints that the next read or write will tell
/// the caller what happened; they are never the only way the caller learns of an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    pub token: Token,
    pub readable: bool,
    pub writable: bool,
    pub hangup: bool,
    pub error: bool,
}

/// A readiness-notification backend.
///
/// Implementations are siblings with one surface (register, reregister, deregister, wait) and no
/// policy: everything about *what to do* with readiness lives in the reactor.
pub trait Poller {
    /// Short name for logs and /metrics: "epoll", "kqueue", "poll", "select".
    fn name(&self) -> &'static str;

    /// The largest descriptor number plus one this backend can watch, if it has such a limit.
    /// select(2) cannot watch descriptors at or above `FD_SETSIZE`; the reactor refuses such
    /// connections at accept time instead of corrupting memory.
    fn fd_limit(&self) -> Option<usize> {
        None
    }

    /// Whether a short read proves a socket drained: the backend is edge-triggered epoll, which
    /// raises a new event for every arrival after the read (new data, a hangup), and reports a
    /// hangup already pending in the event itself. The reactor then skips the read that would
    /// only return `WouldBlock` (docs/pollers.md, "When a short read is enough"). Every other
    /// backend says false (the default), and the reactor reads until `WouldBlock`: poll(2) and
    /// select(2) are level-triggered, and kqueue is left to the rule that holds everywhere.
    fn short_read_drains(&self) -> bool {
        false
    }

    /// Whether closing a watched descriptor also stops the watching, so that `deregister` just
    /// before the close is a system call that changes nothing: epoll forgets a descriptor when
    /// its file is closed, and kqueue its events (we never duplicate a socket's descriptor, so
    /// the close is the file's last). The reactor then skips it, one `epoll_ctl` fewer per
    /// connection. poll(2) and select(2) keep their own tables, and io_uring must cancel what
    /// is in flight: they say false (the default).
    fn close_stops_watching(&self) -> bool {
        false
    }

    /// Start watching `fd` for `interest`, reporting it as `token`.
    ///
    /// # Errors
    /// The OS refused (for example the descriptor is already registered, or is invalid).
    fn register(&mut self, fd: RawFd, token: Token, interest: Interest) -> io::Result<()>;

    /// Change the interest (and token) of an already registered `fd`.
    ///
    /// # Errors
    /// The descriptor is not registered, or the OS refused.
    fn reregister(&mut self, fd: RawFd, token: Token, interest: Interest) -> io::Result<()>;

    /// Stop watching `fd`. Must be called before the descriptor is closed, so that no event for
    /// it (or for a new socket that reuses its number) is reported afterwards.
    ///
    /// # Errors
    /// The descriptor is not registered, or the OS refused.
    fn deregister(&mut self, fd: RawFd) -> io::Result<()>;

    /// Wait until at least one registered descriptor is ready or `timeout` passes (`None`: wait
    /// forever; `Some(ZERO)`: just look). Clears `events` and fills it with what is ready.
    /// `EINTR` is not an error: the call returns with whatever was collected (possibly nothing).
    ///
    /// # Errors
    /// Only unexpected OS failures; the reactor treats them as fatal.
    fn wait(&mut self, events: &mut Vec<Event>, timeout: Option<Duration>) -> io::Result<()>;

    // ----- Completion-based backends (io_uring) only. A completion backend performs accepts,
    // ----- receives and sends itself and reports them as `Completion`s after `wait`; the
    // ----- reactor then never reads or writes a connection's socket directly. The defaults are
    // ----- what a readiness backend means by each (or "unsupported"); the reactor checks
    // ----- `completion_based` and does not call the completion-only ones on readiness backends.

    /// Whether this backend completes I/O itself (io_uring) instead of reporting readiness. A
    /// constant for each backend, so the reactor's branches on it are resolved at compile time.
    fn completion_based(&self) -> bool {
        false
    }

    /// Start accepting on the listening socket `fd`. Readiness: watch it for readable, and the
    /// caller accepts. Completion: accepted descriptors arrive as `Completion::Accepted`.
    ///
    /// # Errors
    /// As `register`.
    fn watch_listener(&mut self, fd: RawFd, token: Token) -> io::Result<()> {
        self.register(fd, token, Interest::READABLE)
    }

    /// Start receiving on the connection `fd`. Readiness: watch it for readable, and the caller
    /// reads. Completion: bytes arrive as `Completion::Received` (then `Eof` or
    /// `ReceiveFailed`).
    ///
    /// # Errors
    /// As `register`.
    fn watch_connection(&mut self, fd: RawFd, token: Token) -> io::Result<()> {
        self.register(fd, token, Interest::READABLE)
    }

    /// Completion only: sends `bufs` on `fd`; the result arrives as `Completion::Sent`.
    ///
    /// # Safety
    /// The bytes `bufs` point to must stay valid and unmoved until the `Sent` completion for
    /// this send has been taken (the kernel reads them after this call returns), even if the
    /// connection is closed meanwhile.
    ///
    /// # Errors
    /// The backend is not completion-based, or the submission failed.
    unsafe fn send(&mut self, fd: RawFd, token: Token, bufs: &[IoSlice<'_>]) -> io::Result<()> {
        let _ = (fd, token, bufs);
        Err(io::ErrorKind::Unsupported.into())
    }

    /// Completion only: moves the completions reaped by the last `wait` into `out`.
    fn take_completions(&mut self, out: &mut Vec<Completion>) {
        let _ = out;
    }

    /// Completion only: gives back a receive buffer once its bytes are used.
    fn recycle(&mut self, buf: RecvBuf) {
        drop(buf);
    }

    /// Closes a descriptor the caller has deregistered. Readiness: at once. Completion: once
    /// the operations still in flight on it have reported, so that none of them can act on a
    /// new socket that reuses the number.
    fn close(&mut self, fd: OwnedFd) {
        drop(fd);
    }

    /// Stops receiving on the connection `fd` (watched with `watch_connection`) until
    /// `resume_receive`: the reactor holds enough of its input (docs/pollers.md, "Pausing a
    /// receive"). Readiness: nothing to do, the reactor honours a pause by not reading.
    /// Completion: the standing receive is cancelled; bytes it received before the
    /// cancellation took effect are still reported, and must be kept. Pausing twice is one
    /// pause.
    ///
    /// # Errors
    /// The descriptor is not watched, or the submission failed.
    fn pause_receive(&mut self, fd: RawFd) -> io::Result<()> {
        let _ = fd;
        Ok(())
    }

    /// Receives again on a connection paused with `pause_receive`, reporting as `token`.
    /// Readiness: nothing to do (the reactor reads again itself). Completion: the receive is
    /// armed again (once the cancelled one has reported its end). Resuming a connection that is
    /// not paused does nothing.
    ///
    /// # Errors
    /// As `pause_receive`.
    fn resume_receive(&mut self, fd: RawFd, token: Token) -> io::Result<()> {
        let _ = (fd, token);
        Ok(())
    }

    /// Completion only: reaps what has completed by now, without waiting: completions for
    /// `take_completions`, and readiness events kept for the next `wait` to report. Used where a
    /// readiness caller would read a socket directly to be sure it has nothing (a Pong
    /// deadline). Readiness: nothing to do.
    ///
    /// # Errors
    /// As `wait`.
    fn collect_now(&mut self) -> io::Result<()> {
        Ok(())
    }

    /// Whether the backend holds memory that a burst made resident and that it can give back
    /// once the loop is idle (`release_idle_memory`). The reactor then wakes after a short idle
    /// spell to call it. Readiness: nothing (it reads into the reactor's own buffer).
    fn holds_idle_memory(&self) -> bool {
        false
    }

    /// Gives back what `holds_idle_memory` reports, if it can be done safely now; called when
    /// the last `wait` has found nothing to do for a while. Readiness: nothing to do.
    fn release_idle_memory(&mut self) {}
}

/// Tests: the kernel refused io_uring (`e`). A uring test then says so in one line and passes
/// without running, since the other pollers still cover the behaviour; unless
/// `WSRELAY_REQUIRE_URING=1` (CI, on a machine known to have it), where a refusal fails the
/// test, so that a run cannot go green with no uring coverage at all.
#[cfg(test)]
pub(crate) fn uring_refused(e: &io::Error) {
    assert!(
        std::env::var("WSRELAY_REQUIRE_URING").as_deref() != Ok("1"),
        "io_uring is required (WSRELAY_REQUIRE_URING=1) but: {e}"
    );
    eprintln!("skipped on uring: {e}");
}

/// Fails with the OS error (EBADF) if `fd` is not an open descriptor. poll(2) would accept a bad
/// one and report POLLNVAL on every wait, and for select(2) one bad descriptor in the sets makes
/// the *whole* call fail with EBADF; checking at `register` gives the caller the answer epoll
/// gives, and keeps bad descriptors out of the backends' tables.
fn check_open(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFD only reads the descriptor flags of `fd`; it takes no pointer and has no
    // effect on the descriptor. Any `fd` value, valid or not, is safe to pass.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
