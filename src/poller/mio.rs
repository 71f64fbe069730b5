//! The default backend: mio, which is epoll on Linux and kqueue on macOS and the BSDs.
//!
//! Owns: one `mio::Poll` and its event buffer; translation between our `Token`/`Interest`/`Event`
//! and mio's.
//! Does not: anything beyond that translation. Registration is edge-triggered (mio always is);
//! see the contract in `poller/mod.rs` for what that asks of the caller.
//!
//! Cost per wait: O(ready descriptors). The kernel keeps the interest set between calls, so an
//! idle connection costs nothing per wait, unlike poll(2) and select(2).

use super::{Event, Interest, Poller, Token};
use mio::unix::SourceFd;
use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

/// Events fetched per `epoll_wait`/`kevent` call. More ready descriptors than this are simply
/// reported by the next call (which the reactor makes with a zero timeout when it has work).
const EVENT_CAPACITY: usize = 1024;

pub struct MioPoller {
    poll: mio::Poll,
    events: mio::Events,
}

impl MioPoller {
    /// # Errors
    /// The OS refused to create the epoll/kqueue instance (descriptor limit reached).
    pub fn new() -> io::Result<MioPoller> {
        Ok(MioPoller {
            poll: mio::Poll::new()?,
            events: mio::Events::with_capacity(EVENT_CAPACITY),
        })
    }
}

fn to_mio(interest: Interest) -> mio::Interest {
    match (interest.readable, interest.writable) {
        (true, true) => mio::Interest::READABLE | mio::Interest::WRITABLE,
        (false, true) => mio::Interest::WRITABLE,
        // mio has no "no interest"; readable is the harmless default for a registered socket.
        _ => mio::Interest::READABLE,
    }
}

impl Poller for MioPoller {
    fn name(&self) -> &'static str {
        if cfg!(any(target_os = "linux", target_os = "android")) {
            "epoll"
        } else {
            "kqueue"
        }
    }

    /// On Linux mio registers every socket with EPOLLET | EPOLLRDHUP: after a read shorter
    /// than asked for, any later arrival raises a new event, and a hangup that came with the
    /// data shows in the event (docs/pollers.md). Not claimed for kqueue.
    fn short_read_drains(&self) -> bool {
        cfg!(any(target_os = "linux", target_os = "android"))
    }

    fn close_stops_watching(&self) -> bool {
        true
    }

    fn register(&mut self, fd: RawFd, token: Token, interest: Interest) -> io::Result<()> {
        self.poll
            .registry()
            .register(&mut SourceFd(&fd), mio::Token(token.0), to_mio(interest))
    }

    fn reregister(&mut self, fd: RawFd, token: Token, interest: Interest) -> io::Result<()> {
        self.poll
            .registry()
            .reregister(&mut SourceFd(&fd), mio::Token(token.0), to_mio(interest))
    }

    fn deregister(&mut self, fd: RawFd) -> io::Result<()> {
        self.poll.registry().deregister(&mut SourceFd(&fd))
    }

    fn wait(&mut self, events: &mut Vec<Event>, timeout: Option<Duration>) -> io::Result<()> {
        events.clear();
        match self.poll.poll(&mut self.events, timeout) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(()),
            Err(e) => return Err(e),
        }
        for ev in self.events.iter() {
            events.push(Event {
                token: Token(ev.token().0),
                readable: ev.is_readable() || ev.is_read_closed(),
                writable: ev.is_writable() || ev.is_write_closed(),
                hangup: ev.is_read_closed() || ev.is_write_closed(),
                error: ev.is_error(),
            });
        }
        Ok(())
    }
}
