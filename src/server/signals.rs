//! Signals as readable bytes: the self-pipe trick, so a signal wakes the loop through the same
//! poller as everything else (SPEC §2). One pipe per meaning: SIGINT and SIGTERM share one
//! (shutdown), SIGHUP has its own (reload the TLS certificate, SPEC §18).
//!
//! Owns: one Unix socket pair per `SignalPipe`; signal-hook writes a byte into one end from the
//! signal handler, the reactor watches the other end and counts the bytes.
//! Does not: decide what a signal means (the reactor does: first shutdown signal drains, a
//! second one exits; SIGHUP reloads).

use std::ffi::c_int;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;

pub struct SignalPipe {
    reader: UnixStream,
}

impl SignalPipe {
    /// A pipe that becomes readable when any of `signals` arrives.
    ///
    /// # Errors
    /// The socket pair could not be created or the handlers could not be installed.
    pub fn new(signals: &[c_int]) -> io::Result<SignalPipe> {
        let (reader, writer) = UnixStream::pair()?;
        reader.set_nonblocking(true)?;
        // The handler writes without blocking; a full pipe just drops the extra byte.
        writer.set_nonblocking(true)?;
        for &signal in signals {
            signal_hook::low_level::pipe::register(signal, writer.try_clone()?)?;
        }
        Ok(SignalPipe { reader })
    }

    pub fn as_raw_fd(&self) -> RawFd {
        self.reader.as_raw_fd()
    }

    /// Reads every pending byte; returns how many signals arrived since the last call.
    pub fn drain(&mut self) -> usize {
        let mut count = 0;
        let mut buf = [0u8; 16];
        loop {
            match self.reader.read(&mut buf) {
                Ok(0) => return count,
                Ok(n) => count += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return count,
            }
        }
    }
}
