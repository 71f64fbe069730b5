//! What a completion-based backend (io_uring) hands the reactor: finished operations, not
//! readiness.
//!
//! Owns: `Completion` (one finished accept, receive or send) and `RecvBuf` (a receive buffer the
//! kernel chose and filled, lent to the reactor until it gives it back).
//! Does not: submit anything (the backend does, `uring.rs`) or know what the bytes mean.
//!
//! A readiness backend says "descriptor 7 can be read now", and the reactor then reads into its
//! own buffer. A completion backend has already done the read when it reports: the bytes sit in
//! one of the backend's buffers, and the report names which (docs/pollers.md, "Readiness and
//! completion"). These types are defined on every platform so that the `Poller` trait has one
//! surface; only the io_uring backend (Linux) ever builds them.

use super::Token;
use std::cell::UnsafeCell;
use std::io;
use std::os::fd::OwnedFd;
use std::rc::Rc;

/// One finished operation.
#[derive(Debug)]
pub enum Completion {
    /// The listener accepted a connection; the new descriptor (non-blocking, close-on-exec) is
    /// the caller's.
    Accepted(OwnedFd),
    /// Accepting failed. The backend's standing accept has ended: the caller re-arms it with
    /// `watch_listener` (at once, or after a pause on descriptor exhaustion).
    AcceptFailed(io::Error),
    /// Bytes arrived on the connection `Token`, in `RecvBuf`. Give the buffer back with
    /// `Poller::recycle` once they are used, or the backend runs short of buffers.
    Received(Token, RecvBuf),
    /// The peer ended its stream (a receive of 0 bytes). No more receives follow.
    Eof(Token),
    /// A receive failed (for example a reset). No more receives follow.
    ReceiveFailed(Token, io::Error),
    /// A send finished: how many bytes the socket took (possibly fewer than offered), or why
    /// it failed. The memory the send was given may be reused or freed from now on.
    Sent(Token, io::Result<usize>),
}

/// Memory the kernel receives into: `count` buffers of `size` bytes, one allocation.
///
/// Shared (`Rc`) between the backend and every `RecvBuf` it lends, so that the memory outlives
/// all of them. Interior mutability through `UnsafeCell`: the kernel writes into buffers that
/// sit in its ring while the program reads and writes buffers it was handed; the two never
/// touch the same buffer at the same time (a buffer is the kernel's from `recycle` until the
/// completion that names it, and the program's from then until the next `recycle`).
pub struct BufPool {
    memory: Box<[UnsafeCell<u8>]>,
    size: usize,
}

impl BufPool {
    pub(super) fn new(count: usize, size: usize) -> BufPool {
        BufPool {
            memory: (0..count * size).map(|_| UnsafeCell::new(0)).collect(),
            size,
        }
    }

    pub(super) fn size(&self) -> usize {
        self.size
    }

    /// Gives the pool's whole pages back to the kernel (`madvise(MADV_DONTNEED)`): they stop
    /// counting in the process's memory, and read as zeros when next touched, which the kernel
    /// does as it receives into them. The pages at either end, shared with whatever the
    /// allocator put beside the pool, are kept.
    ///
    /// # Safety
    /// No buffer may be in use while this runs, neither being filled by the kernel nor lent to
    /// the program as a `RecvBuf`: what they hold would be lost.
    #[cfg(target_os = "linux")]
    pub(super) unsafe fn release_pages(&self) -> io::Result<()> {
        let (first, end) = self.whole_pages()?;
        if end <= first {
            return Ok(());
        }
        // SAFETY: [first, end) lies inside the pool's allocation, which lives as long as
        // `self`; the caller promises nothing reads or writes it meanwhile. MADV_DONTNEED on
        // private anonymous memory only replaces its pages with zero-filled ones.
        let done =
            unsafe { libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_DONTNEED) };
        if done != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The addresses of the first and past the last whole page inside the pool.
    #[cfg(target_os = "linux")]
    fn whole_pages(&self) -> io::Result<(usize, usize)> {
        // SAFETY: sysconf takes no pointer.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
            .map_err(|_| io::Error::last_os_error())?;
        let start = self.memory.as_ptr() as usize;
        Ok((
            start.next_multiple_of(page),
            (start + self.memory.len()) / page * page,
        ))
    }

    /// How many of the pool's whole pages are resident (`mincore`), for the tests.
    #[cfg(all(test, target_os = "linux"))]
    pub(super) fn resident_pages(&self) -> usize {
        let (first, end) = self.whole_pages().unwrap();
        // SAFETY: sysconf takes no pointer.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let mut map = vec![0u8; (end - first) / page];
        // SAFETY: [first, end) is mapped (it lies inside the pool), and `map` has one byte per
        // page of it, which is what mincore fills.
        let done =
            unsafe { libc::mincore(first as *mut libc::c_void, end - first, map.as_mut_ptr()) };
        assert_eq!(done, 0, "mincore: {}", io::Error::last_os_error());
        map.iter().filter(|page| *page & 1 != 0).count()
    }

    /// Where buffer `id` starts.
    pub(super) fn addr(&self, id: u16) -> *mut u8 {
        let offset = usize::from(id) * self.size;
        assert!(offset < self.memory.len(), "no buffer #{id} in the pool");
        // A pointer derived from the whole slice (not from one element), so that it may cover
        // the whole buffer. `UnsafeCell<u8>` has the layout of `u8`.
        UnsafeCell::raw_get(self.memory.as_ptr().wrapping_add(offset))
    }
}

/// A receive buffer the backend lent the reactor: `len` bytes filled by the kernel.
pub struct RecvBuf {
    pool: Rc<BufPool>,
    id: u16,
    len: usize,
}

impl std::fmt::Debug for RecvBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RecvBuf(#{}, {} bytes)", self.id, self.len)
    }
}

impl RecvBuf {
    /// `len` must not exceed the pool's buffer size; only the backend builds these, from a
    /// completion that named buffer `id`.
    pub(super) fn new(pool: Rc<BufPool>, id: u16, len: usize) -> RecvBuf {
        assert!(len <= pool.size(), "a receive longer than its buffer");
        RecvBuf { pool, id, len }
    }

    pub(super) fn id(&self) -> u16 {
        self.id
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes received, writable: the frame reader unmasks payloads in place.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: the buffer lies inside the pool (`len <= size`, checked in `new`), the pool
        // lives as long as this `RecvBuf` (it holds an `Rc`), and the kernel does not touch
        // the buffer until it is recycled, which consumes this `RecvBuf` (see `BufPool`). The
        // borrow is tied to `&mut self`, so no two slices of one buffer exist at once.
        unsafe { std::slice::from_raw_parts_mut(self.pool.addr(self.id), self.len) }
    }
}
