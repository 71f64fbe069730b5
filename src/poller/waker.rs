//! Wake-ups from other threads as readable bytes: how the file engine's storage thread (and,
//! later, another worker's bus, SPEC §14) tells the reactor that answers are waiting, through the
//! same poller as every socket (SPEC §13, "results come back through a channel and the
//! reactor's waker").
//!
//! Owns: `Waker` (cloneable, `Send`: other threads call `wake`) and `WakeReceiver` (the
//! reactor's end: a descriptor to register with the poller, and `drain`), over one Unix socket
//! pair, plus a flag that coalesces wake-ups.
//! Does not: carry the answers (they travel through their own channel, e.g. the file engine's),
//! or decide what a wake-up means (the reactor hands it to the app, which polls its engine).
//!
//! Why here, in `poller/`: like `mio::Waker`, it is a readiness primitive, a descriptor and
//! nothing about WebSockets. Why not `mio::Waker` itself: it is tied to mio's registry, so it
//! only works with the mio poller; a socket pair is a plain descriptor that epoll, kqueue,
//! poll(2) and select(2) all watch, like the signal pipe (`server/signals.rs`). On Linux an
//! eventfd would save one descriptor, at the price of a second code path for macOS and the BSDs.
//!
//! The reactor registers `WakeReceiver::as_raw_fd` once, for readable interest, under a token of
//! its own; when it is reported, it calls `drain` and then lets the app poll its engine.
//!
//! # Coalescing, and why no wake-up is lost
//!
//! A busy storage thread may finish thousands of batches between two loop iterations; one byte
//! per batch would be wasted syscalls. So `wake` writes a byte only if the shared `pending` flag
//! was clear, and sets it; `drain` clears it. The order inside `drain` is what makes this safe:
//!
//! 1. read every byte, 2. clear `pending`, then (the caller) 3. take every answer off the
//!    channel.
//!
//! A sender always queues its answer *before* calling `wake`. If its `wake` saw the flag set
//! (before step 2), step 3 runs after its answer was queued, so the answer is taken. If it saw
//! the flag clear (after step 2), it writes a byte that no running drain can consume any more
//! (step 1 is over), so the descriptor stays readable and the poller reports it. Either way the
//! answer is picked up; at worst a wake-up finds the channel already empty, which is harmless.
//!
//! The other order (clear, then read) loses wake-ups: a `wake` between the two writes a byte
//! that the same drain then reads, and leaves the flag set with nothing to read. An
//! edge-triggered poller (epoll with `EPOLLET`, which mio uses) checks readiness again when it
//! reports, so it does not report the now empty descriptor, and every later `wake` sees the
//! flag set and writes nothing: the reactor sleeps with answers waiting. The test
//! `a_wake_during_a_drain_is_not_lost` replays that interleaving step by step.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The waking end, for other threads.
#[derive(Clone, Debug)]
pub struct Waker {
    writer: Arc<UnixStream>,
    pending: Arc<AtomicBool>,
}

/// The reactor's end.
#[derive(Debug)]
pub struct WakeReceiver {
    reader: UnixStream,
    pending: Arc<AtomicBool>,
}

/// A connected `WakeReceiver` and `Waker`, both non-blocking.
///
/// # Errors
/// The socket pair could not be created or made non-blocking.
pub fn pair() -> io::Result<(WakeReceiver, Waker)> {
    let (reader, writer) = UnixStream::pair()?;
    reader.set_nonblocking(true)?;
    // `wake` must never block its thread; at most two bytes are ever in flight anyway.
    writer.set_nonblocking(true)?;
    let pending = Arc::new(AtomicBool::new(false));
    Ok((
        WakeReceiver {
            reader,
            pending: Arc::clone(&pending),
        },
        Waker {
            writer: Arc::new(writer),
            pending,
        },
    ))
}

impl Waker {
    /// Makes the receiver readable, unless a wake-up is already pending. Never blocks. Call it
    /// after queueing what the reactor should pick up.
    pub fn wake(&self) {
        if self.pending.swap(true, Ordering::AcqRel) {
            return;
        }
        loop {
            match (&*self.writer).write(&[1]) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // WouldBlock cannot happen with at most two bytes in flight; any other error
                // means the reactor's end is gone, and there is nobody left to wake.
                _ => return,
            }
        }
    }
}

impl WakeReceiver {
    /// The descriptor to register for readable interest.
    pub fn as_raw_fd(&self) -> RawFd {
        self.reader.as_raw_fd()
    }

    /// Reads every byte, then clears the pending flag (see the module doc for why in this
    /// order). Returns whether there was a wake-up. The caller then takes its answers off its
    /// channel.
    pub fn drain(&mut self) -> bool {
        let woken = self.read_all();
        self.clear();
        woken
    }

    fn read_all(&mut self) -> bool {
        let mut woken = false;
        let mut buf = [0u8; 64];
        loop {
            match self.reader.read(&mut buf) {
                Ok(0) => return woken,
                Ok(_) => woken = true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return woken,
            }
        }
    }

    fn clear(&self) {
        self.pending.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::poller::{Event, Interest, MioPoller, PollPoller, Poller, SelectPoller, Token};
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    const DEADLINE: Duration = Duration::from_secs(10);
    const WAKER: Token = Token(7);

    fn pollers() -> Vec<Box<dyn Poller>> {
        vec![
            Box::new(MioPoller::new().unwrap()),
            Box::new(PollPoller::new().unwrap()),
            Box::new(SelectPoller::new().unwrap()),
        ]
    }

    /// Waits (bounded) for the waker's descriptor to be reported readable.
    fn wait_readable(p: &mut dyn Poller) {
        let start = Instant::now();
        let mut events: Vec<Event> = Vec::new();
        loop {
            assert!(start.elapsed() < DEADLINE, "{}: no wake-up", p.name());
            p.wait(&mut events, Some(Duration::from_millis(100)))
                .unwrap();
            if events.iter().any(|e| e.token == WAKER && e.readable) {
                return;
            }
        }
    }

    #[test]
    fn wake_ups_coalesce_into_one_byte() {
        let (mut rx, waker) = pair().unwrap();
        assert!(!rx.drain(), "nothing yet");
        for _ in 0..1000 {
            waker.wake();
        }
        let mut buf = [0u8; 16];
        assert_eq!(
            (&rx.reader).read(&mut buf).unwrap(),
            1,
            "one byte for 1000 wakes"
        );
        // The flag is still set (that byte was not drained properly): no second byte.
        waker.wake();
        assert!(!rx.drain(), "nothing left to read");
        waker.wake();
        assert!(rx.drain(), "after a drain, a wake writes again");
    }

    /// The interleaving that lost wake-ups when `drain` cleared the flag before reading: a
    /// `wake` from another thread lands in the middle of a drain. After it, the next `wake`
    /// must still make the descriptor readable.
    #[test]
    fn a_wake_during_a_drain_is_not_lost() {
        let (mut rx, waker) = pair().unwrap();
        waker.wake(); // the wake-up the reactor is handling
        assert!(rx.read_all(), "drain, step 1");
        waker.wake(); // mid-drain: the flag is still set, so no byte (its answer is taken in step 3)
        rx.clear(); // drain, step 2
        assert!(!rx.read_all(), "nothing was written mid-drain");
        waker.wake(); // a later answer
        assert!(
            rx.drain(),
            "the later wake wrote a byte: the descriptor is readable"
        );
    }

    #[test]
    fn every_poller_sees_a_wake_from_another_thread_and_no_answer_is_lost() {
        for mut p in pollers() {
            let (mut rx, waker) = pair().unwrap();
            p.register(rx.as_raw_fd(), WAKER, Interest::READABLE)
                .unwrap();
            let (answers, inbox) = mpsc::channel::<u32>();
            let total = 20_000;
            let sender = std::thread::spawn(move || {
                for n in 0..total {
                    answers.send(n).unwrap();
                    waker.wake();
                }
            });
            // The reactor's side: wait for a wake-up, drain, take the answers; until all came.
            let mut got = 0;
            while got < total {
                wait_readable(p.as_mut());
                rx.drain();
                got += inbox.try_iter().count() as u32;
            }
            sender.join().unwrap();
            assert_eq!(got, total, "{}", p.name());
            p.deregister(rx.as_raw_fd()).unwrap();
        }
    }
}
