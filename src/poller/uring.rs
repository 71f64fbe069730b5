//! The io_uring backend (Linux 6.0+): completion-based, not readiness-based.
//!
//! Owns: one ring (the `io-uring` crate maps it and wraps the system calls; what is submitted,
//! when, and what a completion means is decided here), the table of operations in flight, the
//! provided-buffer ring the kernel receives into, and the descriptors waiting for their last
//! operation to end before they may be closed.
//! Does not: know about WebSockets or connections. It sees descriptors, tokens and bytes.
//!
//! # What it does instead of waiting for readiness (docs/pollers.md, "Readiness and completion")
//!
//! * **Accept** is one multishot accept on the listener: every new connection is a completion
//!   carrying its descriptor; no `accept(2)` call, no readiness event.
//! * **Receive** is one multishot receive per connection, with *provided buffers*: the kernel
//!   picks a free buffer from a ring we registered, fills it, and the completion names it. The
//!   reactor parses the bytes in place and gives the buffer back (`recycle`). No buffer is tied
//!   to an idle connection, and no `recv(2)` ever returns `EAGAIN`. The receive is the one
//!   operation every connection keeps in flight, so it is not in the table of operations: its
//!   `user_data` names its descriptor (`recv_key`), and what it needs to know lives in that
//!   descriptor's `FdOps` (docs/pollers.md, "What an idle connection costs on uring").
//! * **Send** is a `sendmsg` whose iovecs point into the reactor's outbound queue; the reactor
//!   keeps those bytes alive (and unmoved) until the `Sent` completion (`send`'s contract).
//! * **Pausing a receive** (`pause_receive`) cancels the connection's receive by its key, so
//!   its sends go on; `resume_receive` arms it again, once the cancelled one has reported.
//! * **Other descriptors** (the signal pipes, the engine's waker) go through the `Poller`
//!   surface as before: `register` arms a multishot poll, which comes back as readiness events.
//! * **Idle memory**: the receive pool's pages that a burst touched go back to the kernel once
//!   the loop has been idle a moment (`release_idle_memory`), if nothing can be using them.
//! * **One system call per loop iteration**: everything queued since the last wait is submitted
//!   by the wait itself (`io_uring_enter` with both "submit" and "wait for one").
//!
//! # Closing safely
//!
//! A descriptor number is reused by the next `accept` as soon as it is closed. An operation
//! still queued for the old number would then act on the new connection. So `deregister`
//! cancels everything on the descriptor, and `close` keeps the descriptor open until the last of
//! its operations has reported; only then is it closed. Completions for a closed connection that
//! arrive meanwhile carry its old token, whose generation no longer matches (`ConnId`).
//!
//! The cancellation names the operation by its key when the connection's receive is all that
//! is in flight (the usual case), and cancels "everything on this descriptor" only otherwise (a
//! send still in flight, a poll, the accept). The kernel finds an operation by key in one hash
//! bucket, but by descriptor only by walking every operation armed on the ring, twice (once to
//! cancel, once more to find there is nothing left): with 8,000 connections closing at once
//! that was 8,000 walks over 8,000 receives, the loop fell seconds behind, and the clients gave
//! up waiting for our FIN (docs/pollers.md, "Closing thousands of connections at once").

use super::completion::{BufPool, Completion, RecvBuf};
use super::{check_open, Event, Interest, Poller, Token};
use io_uring::types::{CancelBuilder, Fd, SubmitArgs, Timespec};
use io_uring::{cqueue, opcode, squeue, IoUring};
use slab::Slab;
use std::io::{self, IoSlice};
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

/// Submission queue entries (more in one iteration are submitted early, one extra system call).
/// The completion queue is four times larger; beyond that the kernel keeps overflowing
/// completions aside (it never drops them, IORING_FEAT_NODROP). The rings are physically
/// contiguous kernel memory: 4096 entries (512 KiB) failed with ENOMEM on a busy machine with
/// many servers starting at once, so the size is modest and `build_ring` halves it on ENOMEM.
const RING_ENTRIES: u32 = 1024;

/// Receive buffers: how many, and how large each. The kernel takes one per receive, and the
/// reactor gives each back as soon as it has parsed it, so only the receives reaped in one
/// loop iteration hold buffers at once. 256 x 16 KiB is 4 MiB, shared by all connections.
const RECV_BUFFERS: u16 = 256;
const RECV_BUFFER_BYTES: usize = 16 * 1024;

/// Send headers kept for reuse: about one per connection with a send in flight at once.
const SPARE_SENDS: usize = 1024;

/// Marks a receive's `user_data` (`recv_key`); the table's keys are far below it.
const RECV_KEY: u64 = 1 << 63;

/// The id of our one group of provided buffers.
const BUFFER_GROUP: u16 = 0;

/// IORING_SETUP_DEFER_TASKRUN, from the kernel's `include/uapi/linux/io_uring.h` (the crate
/// sets it, but has no accessor to read it back).
const SETUP_DEFER_TASKRUN: u32 = 1 << 13;

/// The oldest kernel with everything used here: multishot receive (6.0); multishot accept,
/// provided-buffer rings and cancel-by-descriptor came in 5.19.
const MIN_KERNEL: (u32, u32) = (6, 0);

/// What an operation in flight is, and what it owns until its completion.
enum OpKind {
    /// A multishot poll for a descriptor registered through the `Poller` surface.
    Poll(Interest),
    /// The listener's multishot accept.
    Accept,
    /// A send. The header and iovecs live here, at a stable heap address, until the kernel
    /// reports; the bytes they point to are the caller's to keep alive (`send`). `None` for a
    /// send of one buffer, which is a plain `send` with nothing to keep but the bytes.
    Send { msg: Option<Box<SendMsg>> },
    /// A cancellation (it acts on the others; it counts toward no descriptor).
    Cancel,
}

/// `OpKind` without what it owns, to decide on while the table is changed.
#[derive(Clone, Copy)]
enum Kind {
    Poll(Interest),
    Accept,
    Send,
    Cancel,
}

struct SendMsg {
    header: libc::msghdr,
    iovecs: Vec<libc::iovec>,
}

struct Op {
    kind: OpKind,
    fd: RawFd,
    token: Token,
}

/// Per descriptor that is watched, or still has operations in flight. One per connection, so
/// kept at 16 bytes (`what_an_idle_connection_holds`).
#[derive(Default)]
struct FdOps {
    /// The token the receive reports as (`Token.0`; the receive has no entry in `ops`).
    recv_token: usize,
    /// Operations in flight on the descriptor: a receive, a send, a poll or an accept, and
    /// those being cancelled. A handful, never thousands.
    in_flight: u16,
    /// Counts the receives armed on this descriptor; part of a receive's key, so that the
    /// completions of one cancelled by `deregister` are told from those of the next one if
    /// the descriptor is watched again before the cancelled one has ended.
    recv_seq: u16,
    /// Between `register`/`watch_*` and `deregister`: multishot operations that end are armed
    /// again only while this holds.
    watched: bool,
    /// `close` was called while operations were in flight: the descriptor (this entry's
    /// index; its `OwnedFd` was turned into the number) is closed when the last one reports.
    closing: bool,
    /// A multishot receive is in flight (the one `pause_receive` cancels).
    recv: bool,
    /// Between `pause_receive` and `resume_receive`: a receive that ends is not armed again.
    recv_paused: bool,
}

/// `FdOps` by descriptor number: descriptors are small dense integers, so a vector indexed by
/// them is the cheapest map (it grows to the highest descriptor seen; 16 bytes each).
#[derive(Default)]
struct FdTable {
    slots: Vec<FdOps>,
}

impl Drop for FdTable {
    /// Closes the descriptors still waiting for their operations (the poller is dropped; its
    /// ring, dropped first, has ended them all).
    fn drop(&mut self) {
        for fd in 0..self.slots.len() {
            self.remove(fd as RawFd);
        }
    }
}

impl FdTable {
    fn entry(&mut self, fd: RawFd) -> &mut FdOps {
        let i = usize::try_from(fd).expect("a descriptor is never negative here");
        if i >= self.slots.len() {
            self.slots.resize_with(i + 1, FdOps::default);
        }
        &mut self.slots[i]
    }

    fn watched(&self, fd: RawFd) -> bool {
        usize::try_from(fd)
            .ok()
            .and_then(|i| self.slots.get(i))
            .is_some_and(|ops| ops.watched)
    }

    fn get_mut(&mut self, fd: RawFd) -> Option<&mut FdOps> {
        self.slots.get_mut(usize::try_from(fd).ok()?)
    }

    /// Forgets `fd`; a descriptor waiting in `closing` is closed. The count of receives goes
    /// on, so that a receive's key is not used again for the next socket with this number.
    fn remove(&mut self, fd: RawFd) {
        let Some(ops) = self.get_mut(fd) else {
            return;
        };
        let closing = ops.closing;
        *ops = FdOps {
            recv_seq: ops.recv_seq,
            ..FdOps::default()
        };
        if closing {
            // SAFETY: `close` turned this descriptor's `OwnedFd` into the number and set
            // `closing`; nothing else owns it, and `closing` is now clear, so it is closed once.
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
        }
    }
}

/// The ring of buffer descriptors the kernel takes receive buffers from (shared memory: we add
/// at the tail, the kernel takes from the head).
struct BufRing {
    entries: *mut io_uring::types::BufRingEntry,
    bytes: usize,
    tail: u16,
    mask: u16,
}

impl BufRing {
    fn new(count: u16) -> io::Result<BufRing> {
        let bytes = usize::from(count) * std::mem::size_of::<io_uring::types::BufRingEntry>();
        // SAFETY: an anonymous private mapping; no pointer of ours is passed in. The kernel
        // requires the ring to be page-aligned, which mmap guarantees.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(BufRing {
            entries: addr.cast(),
            bytes,
            tail: 0,
            mask: count - 1,
        })
    }

    /// Hands buffer `id` (at `addr`, `len` bytes) to the kernel.
    fn push(&mut self, addr: *mut u8, len: usize, id: u16) {
        // SAFETY: `tail & mask` is below the entry count the mapping holds; the kernel reads
        // only entries between its head and the tail we publish below, and this one is past
        // the published tail until the store.
        unsafe {
            let entry = &mut *self.entries.add(usize::from(self.tail & self.mask));
            entry.set_addr(addr as u64);
            entry.set_len(len as u32);
            entry.set_bid(id);
        }
        self.tail = self.tail.wrapping_add(1);
        // SAFETY: the shared tail lives inside the mapping (it overlays the first entry's
        // reserved field) and is aligned for u16; the kernel reads it concurrently, hence the
        // atomic release store, which also publishes the entry written above.
        unsafe {
            let tail = io_uring::types::BufRingEntry::tail(self.entries) as *mut u16;
            AtomicU16::from_ptr(tail).store(self.tail, Ordering::Release);
        }
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once; the ring that used it is gone
        // (`UringPoller` drops its ring first).
        unsafe {
            libc::munmap(self.entries.cast(), self.bytes);
        }
    }
}

pub struct UringPoller {
    // Field order is drop order: the ring goes first, so the kernel is done with the buffer
    // ring and the receive buffers before they are freed.
    ring: IoUring,
    buf_ring: BufRing,
    pool: Rc<BufPool>,
    ops: Slab<Op>,
    fds: FdTable,
    /// Completions reaped by `wait` and not yet taken by the reactor.
    completions: Vec<Completion>,
    /// The completion queue entries of one reap, kept so its storage is reused.
    reaped: Vec<cqueue::Entry>,
    /// Readiness events reaped by `collect_now`, reported by the next `wait`.
    pending_events: Vec<Event>,
    /// Send headers of finished sends, for the next ones (at most `SPARE_SENDS`). Boxed: a
    /// header lent to the kernel must not move when this vector grows.
    #[allow(clippy::vec_box)]
    spare_sends: Vec<Box<SendMsg>>,
    /// Receive buffers lent to the reactor (`Completion::Received`) and not yet recycled.
    lent: usize,
    /// A receive has filled a buffer since the pool's pages were last given back: some of its
    /// pages are resident (`holds_idle_memory`).
    pool_touched: bool,
    /// The ring was set up with DEFER_TASKRUN: the kernel fills receive buffers only inside
    /// our `io_uring_enter` calls, which is what makes giving the pool's pages back safe.
    defers_task_work: bool,
    /// Completions the last reap took (none: the last wait saw nothing happen).
    last_reaped: usize,
    /// Cancellations of everything on a descriptor submitted so far (the costly kind, see
    /// "Closing safely"): the tests check that a plain close does not use one.
    #[cfg(test)]
    descriptor_cancels: usize,
}

impl UringPoller {
    /// Sets up the ring and the receive buffers.
    ///
    /// # Errors
    /// io_uring is unavailable: the kernel is older than 6.0, or it refuses (`io_uring_disabled`
    /// set, a seccomp filter, a container runtime). The message says which, in one line.
    pub fn new() -> io::Result<UringPoller> {
        UringPoller::with_ring_entries(RING_ENTRIES)
    }

    /// `new` with a submission queue of `entries` (tests use a small one, so that a burst
    /// overflows it).
    fn with_ring_entries(entries: u32) -> io::Result<UringPoller> {
        check_kernel()?;
        let ring = build_ring(entries).map_err(|e| unavailable(&e))?;
        let defers_task_work = defers_task_work(&ring);
        let pool = Rc::new(BufPool::new(usize::from(RECV_BUFFERS), RECV_BUFFER_BYTES));
        let mut buf_ring = BufRing::new(RECV_BUFFERS)?;
        // SAFETY: the ring memory is a mapping that lives in `buf_ring`, which this poller
        // owns and drops after the io_uring instance (field order).
        unsafe {
            ring.submitter().register_buf_ring_with_flags(
                buf_ring.entries as u64,
                RECV_BUFFERS,
                BUFFER_GROUP,
                0,
            )
        }
        .map_err(|e| unavailable(&e))?;
        for id in 0..RECV_BUFFERS {
            buf_ring.push(pool.addr(id), pool.size(), id);
        }
        Ok(UringPoller {
            ring,
            buf_ring,
            pool,
            ops: Slab::with_capacity(1024),
            fds: FdTable::default(),
            completions: Vec::with_capacity(1024),
            reaped: Vec::with_capacity(1024),
            pending_events: Vec::new(),
            spare_sends: Vec::new(),
            lent: 0,
            pool_touched: false,
            defers_task_work,
            last_reaped: 0,
            #[cfg(test)]
            descriptor_cancels: 0,
        })
    }

    /// Queues `entry` for the next submission, as operation `op`. A full submission queue is
    /// submitted first (one extra system call, only when more than `RING_ENTRIES` operations
    /// are queued in one iteration).
    fn push(&mut self, entry: squeue::Entry, op: Op) -> io::Result<()> {
        let counts = !matches!(op.kind, OpKind::Cancel);
        let fd = op.fd;
        let key = self.ops.insert(op);
        // SAFETY: what the entry points to (a send's header and iovecs) lives in
        // `self.ops[key]` until its completion is reaped.
        if let Err(e) = unsafe { self.submit_entry(&entry.user_data(key as u64)) } {
            self.ops.remove(key);
            return Err(e);
        }
        if counts {
            self.fds.entry(fd).in_flight += 1;
        }
        Ok(())
    }

    /// Puts `entry` in the submission queue, submitting the queue first if it is full.
    ///
    /// # Safety
    /// What the entry points to stays valid until its completion is reaped.
    unsafe fn submit_entry(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: passed on to the caller.
            if unsafe { self.ring.submission().push(entry) }.is_ok() {
                return Ok(());
            }
            self.ring.submit()?;
        }
    }

    fn arm_poll(&mut self, fd: RawFd, token: Token, interest: Interest) -> io::Result<()> {
        let mut flags = 0;
        if interest.readable {
            flags |= libc::POLLIN as u32;
        }
        if interest.writable {
            flags |= libc::POLLOUT as u32;
        }
        let entry = opcode::PollAdd::new(Fd(fd), flags).multi(true).build();
        let kind = OpKind::Poll(interest);
        self.push(entry, Op { kind, fd, token })
    }

    fn arm_accept(&mut self, fd: RawFd, token: Token) -> io::Result<()> {
        let entry = opcode::AcceptMulti::new(Fd(fd))
            .flags(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)
            .build();
        let kind = OpKind::Accept;
        self.push(entry, Op { kind, fd, token })
    }

    /// Arms the connection's multishot receive. It takes no entry in `ops`: 10,000 idle
    /// connections are 10,000 receives in flight, and their key (`recv_key`) and `FdOps`
    /// already say all a completion needs.
    fn arm_recv(&mut self, fd: RawFd, token: Token) -> io::Result<()> {
        let ops = self.fds.entry(fd);
        let seq = ops.recv_seq.wrapping_add(1);
        let entry = opcode::RecvMulti::new(Fd(fd), BUFFER_GROUP)
            .build()
            .user_data(recv_key(fd, seq));
        // SAFETY: a receive points to nothing of ours (the kernel picks a provided buffer).
        unsafe { self.submit_entry(&entry) }?;
        let ops = self.fds.entry(fd);
        ops.recv_seq = seq;
        ops.recv = true;
        ops.recv_token = token.0;
        ops.in_flight += 1;
        Ok(())
    }

    /// Whether multishot operations on `fd` that end should be armed again.
    fn rearm(&self, fd: RawFd) -> bool {
        self.fds.watched(fd)
    }

    /// Starts watching `fd` one way (poll, accept or receive).
    fn watch(&mut self, fd: RawFd) -> io::Result<()> {
        check_open(fd)?;
        let ops = self.fds.entry(fd);
        if ops.watched {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("descriptor {fd} is already watched"),
            ));
        }
        ops.watched = true;
        Ok(())
    }

    /// The one system call of the iteration: submits what was queued, waits for the first
    /// completion (or the timeout), and reaps what the kernel posted, readiness into `events`
    /// (appended to what it holds).
    fn enter(&mut self, events: &mut Vec<Event>, timeout: Option<Duration>) -> io::Result<()> {
        let submitter = self.ring.submitter();
        let result = match timeout {
            None => submitter.submit_and_wait(1),
            Some(timeout) => {
                let timespec = Timespec::from(timeout);
                submitter.submit_with_args(1, &SubmitArgs::new().timespec(&timespec))
            }
        };
        match result {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ETIME) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // The completion queue overflowed: reaping below makes room.
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
            // The kernel could not allocate for a request just now (EAGAIN; ENOMEM on older
            // kernels): what it did not take stays queued for the next iteration's enter,
            // and what completed is reaped below. Not a reason to stop the server.
            // Logged at debug: it can repeat every iteration while memory is short.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::ENOMEM)) => {
                log::debug!("io_uring: the kernel is short of memory for requests ({e})");
            }
            Err(e) => return Err(e),
        }
        self.reap(events);
        Ok(())
    }

    /// After `watch`: if arming failed, the descriptor is not watched after all. Left marked,
    /// its number (which the caller now closes, and `accept` hands out again first) would be
    /// refused as "already watched" for every connection that gets it.
    fn unwatch_if_failed(&mut self, fd: RawFd, armed: io::Result<()>) -> io::Result<()> {
        if armed.is_err() {
            if let Some(ops) = self.fds.get_mut(fd) {
                ops.watched = false;
                if ops.in_flight == 0 {
                    self.fds.remove(fd);
                }
            }
        }
        armed
    }

    /// Takes every completion the kernel has posted: readiness of polled descriptors into
    /// `events`, the rest into `self.completions`.
    fn reap(&mut self, events: &mut Vec<Event>) {
        let mut reaped = std::mem::take(&mut self.reaped);
        reaped.extend(self.ring.completion());
        self.last_reaped = reaped.len();
        for cqe in reaped.drain(..) {
            self.complete(&cqe, events);
        }
        self.reaped = reaped;
    }

    /// What one completion means.
    fn complete(&mut self, cqe: &cqueue::Entry, events: &mut Vec<Event>) {
        if cqe.user_data() & RECV_KEY != 0 {
            self.complete_recv(cqe);
            return;
        }
        let key = cqe.user_data() as usize;
        let res = cqe.result();
        let more = cqueue::more(cqe.flags());
        let Some(op) = self.ops.get(key) else {
            return;
        };
        let (fd, token) = (op.fd, op.token);
        let kind = match &op.kind {
            OpKind::Poll(interest) => Kind::Poll(*interest),
            OpKind::Accept => Kind::Accept,
            OpKind::Send { .. } => Kind::Send,
            OpKind::Cancel => Kind::Cancel,
        };
        let cancelled = res == -libc::ECANCELED;
        // Whether a multishot operation that ended here is armed again.
        let mut again = false;
        match kind {
            Kind::Poll(interest) => {
                if res >= 0 {
                    let revents = res as i16;
                    let hangup = revents & libc::POLLHUP != 0;
                    let error = revents & libc::POLLERR != 0;
                    events.push(Event {
                        token,
                        readable: revents & libc::POLLIN != 0 || hangup || error,
                        writable: revents & libc::POLLOUT != 0 || error,
                        hangup,
                        error,
                    });
                }
                again = !cancelled;
                if !more {
                    self.finish(key);
                    if again && self.rearm(fd) {
                        self.rearm_or_log(fd, |p| p.arm_poll(fd, token, interest));
                    }
                }
                return;
            }
            Kind::Accept => {
                if res >= 0 {
                    // SAFETY: a successful accept completion carries a new descriptor that
                    // nothing else owns.
                    let stream = unsafe { OwnedFd::from_raw_fd(res) };
                    self.completions.push(Completion::Accepted(stream));
                    again = true;
                } else if !cancelled {
                    // The accept ends with this error; the reactor decides when to re-arm.
                    self.completions
                        .push(Completion::AcceptFailed(io::Error::from_raw_os_error(-res)));
                }
                if !more {
                    self.finish(key);
                    if again && self.rearm(fd) {
                        self.rearm_or_log(fd, |p| p.arm_accept(fd, token));
                    }
                }
                return;
            }
            Kind::Send => {
                let result = if res >= 0 {
                    Ok(res as usize)
                } else {
                    Err(io::Error::from_raw_os_error(-res))
                };
                self.completions.push(Completion::Sent(token, result));
            }
            Kind::Cancel => {}
        }
        self.finish(key);
    }

    /// What a receive's completion means. A receive has no entry in `ops`: its key names its
    /// descriptor, whose `FdOps` holds the rest.
    fn complete_recv(&mut self, cqe: &cqueue::Entry) {
        let (fd, seq) = recv_key_parts(cqe.user_data());
        let res = cqe.result();
        let more = cqueue::more(cqe.flags());
        let Some(ops) = self.fds.get_mut(fd) else {
            log::error!("a receive completed on descriptor {fd}, which has none in flight");
            return;
        };
        // The descriptor's receive, or one that `deregister` cancelled before the descriptor
        // was watched again: what that one received is not reported (it was asked for by a
        // watch that has ended), its buffer goes straight back.
        let current = ops.recv && ops.recv_seq == seq;
        let (token, paused) = (Token(ops.recv_token), ops.recv_paused);
        let cancelled = res == -libc::ECANCELED;
        // Whether the receive, if it ended here, is armed again.
        let mut again = false;
        if res > 0 {
            match cqueue::buffer_select(cqe.flags()) {
                Some(id) if current => {
                    let buf = RecvBuf::new(Rc::clone(&self.pool), id, res as usize);
                    self.completions.push(Completion::Received(token, buf));
                    self.lent += 1;
                    self.pool_touched = true;
                }
                Some(id) => self.buf_ring.push(self.pool.addr(id), self.pool.size(), id),
                None => log::error!("a receive completed without naming its buffer"),
            }
            again = true;
        } else if res == 0 {
            if current {
                self.completions.push(Completion::Eof(token));
            }
        } else if res == -libc::ENOBUFS {
            // Every buffer was out at once: the receive stopped, with nothing lost (the bytes
            // wait in the socket). The reactor returns the buffers it holds before the next
            // submission, so re-arming now is enough.
            again = true;
        } else if !cancelled && current {
            let error = io::Error::from_raw_os_error(-res);
            self.completions
                .push(Completion::ReceiveFailed(token, error));
        }
        if more {
            return;
        }
        if current {
            ops.recv = false;
        }
        self.op_ended(fd);
        // A cancelled receive that was the descriptor's receive, on a descriptor still watched,
        // was cancelled by `pause_receive` (`deregister` stops the watching first): it is armed
        // again if the receiving was resumed meanwhile.
        if current && (again || cancelled) && self.rearm(fd) && !paused {
            self.rearm_or_log(fd, |p| p.arm_recv(fd, token));
        }
    }

    /// Re-arms a multishot operation; if even that fails (the ring is broken), the descriptor
    /// hears nothing more, which its deadline (heartbeat, handshake) then ends.
    fn rearm_or_log(&mut self, fd: RawFd, arm: impl FnOnce(&mut Self) -> io::Result<()>) {
        if let Err(e) = arm(self) {
            log::warn!("io_uring: could not re-arm descriptor {fd}: {e}");
        }
    }

    /// An operation is over: forget it, and close its descriptor if that was the last one
    /// holding a `close` back.
    fn finish(&mut self, key: usize) {
        let op = self.ops.remove(key);
        match op.kind {
            OpKind::Cancel => return,
            OpKind::Send { msg: Some(msg) } if self.spare_sends.len() < SPARE_SENDS => {
                self.spare_sends.push(msg);
            }
            _ => {}
        }
        self.op_ended(op.fd);
    }

    /// One of the operations counted on `fd` is over; if it was the last, on a descriptor no
    /// longer watched, the descriptor is forgotten (and closed, if `close` waited for it).
    fn op_ended(&mut self, fd: RawFd) {
        let Some(ops) = self.fds.get_mut(fd) else {
            return;
        };
        ops.in_flight -= 1;
        if ops.in_flight == 0 && !ops.watched {
            // Dropping the entry drops (closes) a descriptor waiting in `closing`.
            self.fds.remove(fd);
        }
    }
}

impl Poller for UringPoller {
    fn completion_based(&self) -> bool {
        true
    }

    fn name(&self) -> &'static str {
        "uring"
    }

    fn register(&mut self, fd: RawFd, token: Token, interest: Interest) -> io::Result<()> {
        self.watch(fd)?;
        let armed = self.arm_poll(fd, token, interest);
        self.unwatch_if_failed(fd, armed)
    }

    fn reregister(&mut self, fd: RawFd, token: Token, interest: Interest) -> io::Result<()> {
        // A cancellation and a new poll: the poll's old completions, if any come, are
        // `ECANCELED` and dropped.
        self.deregister(fd)?;
        self.register(fd, token, interest)
    }

    fn deregister(&mut self, fd: RawFd) -> io::Result<()> {
        let Some(ops) = self.fds.get_mut(fd).filter(|ops| ops.watched) else {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("descriptor {fd} is not watched"),
            ));
        };
        ops.watched = false;
        ops.recv_paused = false;
        if ops.in_flight == 0 {
            // Its operations have all ended (an EOF, a failed accept): nothing to cancel.
            self.fds.remove(fd);
            return Ok(());
        }
        // By key when the receive is the only operation left (module doc, "Closing safely":
        // cancelling by descriptor costs the kernel a walk over every armed operation).
        let entry = if ops.recv && ops.in_flight == 1 {
            opcode::AsyncCancel::new(recv_key(fd, ops.recv_seq)).build()
        } else {
            #[cfg(test)]
            {
                self.descriptor_cancels += 1;
            }
            opcode::AsyncCancel2::new(CancelBuilder::fd(Fd(fd)).all()).build()
        };
        let kind = OpKind::Cancel;
        self.push(
            entry,
            Op {
                kind,
                fd,
                token: Token(0),
            },
        )
    }

    fn wait(&mut self, events: &mut Vec<Event>, timeout: Option<Duration>) -> io::Result<()> {
        events.clear();
        events.append(&mut self.pending_events);
        // Events `collect_now` reaped earlier in the iteration are due now: the wait only
        // looks for more, it does not sleep on top of them.
        let timeout = if events.is_empty() {
            timeout
        } else {
            Some(Duration::ZERO)
        };
        self.enter(events, timeout)
    }
    fn watch_listener(&mut self, fd: RawFd, token: Token) -> io::Result<()> {
        self.watch(fd)?;
        let armed = self.arm_accept(fd, token);
        self.unwatch_if_failed(fd, armed)
    }

    fn watch_connection(&mut self, fd: RawFd, token: Token) -> io::Result<()> {
        self.watch(fd)?;
        let armed = self.arm_recv(fd, token);
        self.unwatch_if_failed(fd, armed)
    }

    unsafe fn send(&mut self, fd: RawFd, token: Token, bufs: &[IoSlice<'_>]) -> io::Result<()> {
        // One buffer (the usual case: a batch of replies encoded into one chunk) goes as a plain
        // `send`: the kernel then has no header and iovec array to copy in and check.
        if let [buf] = bufs {
            let len = u32::try_from(buf.len()).unwrap_or(u32::MAX);
            let entry = opcode::Send::new(Fd(fd), buf.as_ptr(), len)
                .flags(libc::MSG_NOSIGNAL)
                .build();
            let kind = OpKind::Send { msg: None };
            return self.push(entry, Op { kind, fd, token });
        }
        // A header from a finished send when there is one: two allocations fewer per send.
        let mut msg = self.spare_sends.pop().unwrap_or_else(|| {
            Box::new(SendMsg {
                // SAFETY: an all-zero msghdr is valid (no name, no control data).
                header: unsafe { std::mem::zeroed() },
                iovecs: Vec::new(),
            })
        });
        msg.iovecs.clear();
        msg.iovecs.extend(bufs.iter().map(|b| libc::iovec {
            iov_base: b.as_ptr() as *mut libc::c_void,
            iov_len: b.len(),
        }));
        msg.header.msg_iov = msg.iovecs.as_mut_ptr();
        msg.header.msg_iovlen = msg.iovecs.len() as _;
        let entry = opcode::SendMsg::new(Fd(fd), &msg.header)
            .flags(libc::MSG_NOSIGNAL as u32)
            .build();
        let kind = OpKind::Send { msg: Some(msg) };
        self.push(entry, Op { kind, fd, token })
    }

    fn take_completions(&mut self, out: &mut Vec<Completion>) {
        out.append(&mut self.completions);
    }

    fn recycle(&mut self, buf: RecvBuf) {
        self.lent -= 1;
        let id = buf.id();
        self.buf_ring.push(self.pool.addr(id), self.pool.size(), id);
    }

    fn close(&mut self, fd: OwnedFd) {
        use std::os::fd::AsRawFd;
        match self.fds.get_mut(fd.as_raw_fd()) {
            Some(ops) if ops.in_flight > 0 => {
                ops.closing = true;
                // Closed by `FdTable::remove` when the last operation reports.
                let _ = fd.into_raw_fd();
            }
            _ => {
                self.fds.remove(fd.as_raw_fd());
                drop(fd);
            }
        }
    }

    /// Cancels the multishot receive by its key, so sends on the descriptor go on. Bytes the
    /// receive completed before the cancellation takes effect are still reported, as usual.
    fn pause_receive(&mut self, fd: RawFd) -> io::Result<()> {
        let Some(ops) = self.fds.get_mut(fd).filter(|ops| ops.watched) else {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("descriptor {fd} is not watched"),
            ));
        };
        if ops.recv_paused {
            return Ok(());
        }
        ops.recv_paused = true;
        // No receive in flight (it ended with an EOF or an error): nothing to cancel. If it has
        // ended but its last completion is not reaped yet, the cancellation finds nothing; its
        // key names no other operation (the next receive has the next `recv_seq`).
        if !ops.recv {
            return Ok(());
        }
        let entry = opcode::AsyncCancel::new(recv_key(fd, ops.recv_seq)).build();
        let kind = OpKind::Cancel;
        self.push(
            entry,
            Op {
                kind,
                fd,
                token: Token(0),
            },
        )
    }

    fn resume_receive(&mut self, fd: RawFd, token: Token) -> io::Result<()> {
        let Some(ops) = self.fds.get_mut(fd).filter(|ops| ops.watched) else {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("descriptor {fd} is not watched"),
            ));
        };
        if !ops.recv_paused {
            return Ok(());
        }
        ops.recv_paused = false;
        if ops.recv {
            // The cancelled receive has not reported its end yet; it is armed again then.
            return Ok(());
        }
        self.arm_recv(fd, token)
    }

    fn collect_now(&mut self) -> io::Result<()> {
        // Added to what earlier calls in this iteration collected: the next `wait` reports
        // them all (a second call must not drop the first one's events).
        let mut events = std::mem::take(&mut self.pending_events);
        let result = self.enter(&mut events, Some(Duration::ZERO));
        self.pending_events = events;
        result
    }

    /// The receive pool's pages that receives have touched since they were last given back.
    /// The kernel takes buffers in ring order, so after a few hundred receives every buffer
    /// has at least its first page resident (1 MiB with 256 buffers, up to the whole pool
    /// after large messages), however few connections remain: a cost of the burst, not of
    /// the connections (docs/pollers.md, "What an idle connection costs on uring").
    fn holds_idle_memory(&self) -> bool {
        self.pool_touched && self.defers_task_work
    }

    /// Gives the pool's pages back, if it is certain that no buffer is in use: none is lent to
    /// the reactor, and the kernel is filling none. The second needs DEFER_TASKRUN: then the
    /// kernel receives into a buffer only inside our `io_uring_enter`, and reports it in the
    /// same call; so after a wait that reported nothing, with nothing left in the completion
    /// queue, no buffer holds bytes we have not seen. (Without DEFER_TASKRUN, receives complete
    /// at any interrupt of this thread, and the pages are kept.)
    fn release_idle_memory(&mut self) {
        let quiet = self.last_reaped == 0 && self.ring.completion().is_empty();
        if !(self.holds_idle_memory() && quiet && self.lent == 0) {
            return;
        }
        // SAFETY: no buffer is in use, as established above; the next receive is filled
        // inside the next `io_uring_enter`, after this call.
        match unsafe { self.pool.release_pages() } {
            Ok(()) => self.pool_touched = false,
            Err(e) => log::warn!("io_uring: giving the receive buffers' pages back failed: {e}"),
        }
    }
}

/// The `user_data` of the receive number `seq` on `fd`: `RECV_KEY`, `seq` in bits 32-47, the
/// descriptor in bits 0-31.
fn recv_key(fd: RawFd, seq: u16) -> u64 {
    RECV_KEY | u64::from(seq) << 32 | u64::from(fd as u32)
}

/// The descriptor and the `seq` of a receive's `user_data` (`recv_key`).
fn recv_key_parts(key: u64) -> (RawFd, u16) {
    (key as u32 as RawFd, (key >> 32) as u16)
}

/// Whether `ring` was set up with DEFER_TASKRUN (`build_ring` asks for it where the kernel has
/// it, 6.1+).
fn defers_task_work(ring: &IoUring) -> bool {
    let params: *const io_uring::Parameters = ring.params();
    // SAFETY: `Parameters` is a transparent wrapper over the kernel's `io_uring_params` (the
    // crate documents it), a `repr(C)` struct whose third `u32` is `flags`.
    let flags = unsafe { *params.cast::<u32>().add(2) };
    flags & SETUP_DEFER_TASKRUN != 0
}

/// Refuses kernels older than `MIN_KERNEL` with a line that says so.
fn check_kernel() -> io::Result<()> {
    // SAFETY: uname fills the zeroed struct it is given; nothing else is passed.
    let mut name: libc::utsname = unsafe { std::mem::zeroed() };
    if unsafe { libc::uname(&mut name) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: uname NUL-terminates `release`.
    let release = unsafe { std::ffi::CStr::from_ptr(name.release.as_ptr()) }.to_string_lossy();
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse::<u32>().ok());
    let version = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if version < MIN_KERNEL {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!(
                "io_uring unavailable: kernel {release} is older than {}.{} (multishot receive)",
                MIN_KERNEL.0, MIN_KERNEL.1
            ),
        ));
    }
    Ok(())
}

/// The ring, with the flags that make one `io_uring_enter` per iteration do all the work:
/// completions are produced only when we wait (`DEFER_TASKRUN`, 6.1+, for one thread:
/// `SINGLE_ISSUER`). A kernel without them gets a plain ring.
fn build_ring(mut entries: u32) -> io::Result<IoUring> {
    loop {
        let tuned = IoUring::builder()
            .setup_cqsize(entries * 4)
            .setup_single_issuer()
            .setup_defer_taskrun()
            .build(entries);
        let result = match tuned {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                IoUring::builder().setup_cqsize(entries * 4).build(entries)
            }
            other => other,
        };
        match result {
            Err(e) if e.raw_os_error() == Some(libc::ENOMEM) && entries > 64 => entries /= 2,
            other => return other,
        }
    }
}

/// One line that says why io_uring cannot be used here.
fn unavailable(error: &io::Error) -> io::Error {
    let why = match error.raw_os_error() {
        Some(libc::ENOSYS) => "the kernel has no io_uring (ENOSYS)",
        Some(libc::EPERM) => {
            "the kernel forbids it (EPERM: sysctl kernel.io_uring_disabled, or a seccomp filter)"
        }
        Some(libc::EACCES) => "the kernel forbids it (EACCES: a security module)",
        Some(libc::EINVAL) => "the kernel lacks a feature this backend needs (EINVAL)",
        _ => "setting up the ring failed",
    };
    io::Error::new(
        io::ErrorKind::Unsupported,
        format!("io_uring unavailable: {why}: {error}"),
    )
}

/// The close path under load, with the ring's internals in view (the behaviour on every
/// backend is in `poller/tests.rs`).
#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;
    use std::time::Instant;

    /// Upper bound for anything we expect to happen; a deadline, not a measurement.
    const DEADLINE: Duration = Duration::from_secs(10);
    const SLICE: Duration = Duration::from_millis(100);

    /// A ring with a 16-entry submission queue, or `None` (and one line saying why) where the
    /// kernel refuses io_uring.
    fn small_ring() -> Option<UringPoller> {
        match UringPoller::with_ring_entries(16) {
            Ok(p) => Some(p),
            Err(e) => {
                crate::poller::uring_refused(&e);
                None
            }
        }
    }

    /// `count` clients of a listener the ring accepts on, and the ring's side of each, watched
    /// for receiving as `Token(100 + i)`.
    fn connected(p: &mut UringPoller, count: usize) -> (TcpListener, Vec<(TcpStream, OwnedFd)>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        p.watch_listener(listener.as_raw_fd(), Token(1)).unwrap();
        let addr = listener.local_addr().unwrap();
        let clients: Vec<TcpStream> = (0..count)
            .map(|_| TcpStream::connect(addr).unwrap())
            .collect();
        let start = Instant::now();
        let (mut events, mut done, mut accepted) = (Vec::new(), Vec::new(), Vec::new());
        while accepted.len() < count {
            assert!(start.elapsed() < DEADLINE, "{} accepted", accepted.len());
            p.wait(&mut events, Some(SLICE)).unwrap();
            p.take_completions(&mut done);
            for c in done.drain(..) {
                match c {
                    Completion::Accepted(fd) => accepted.push(fd),
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
        for (i, fd) in accepted.iter().enumerate() {
            p.watch_connection(fd.as_raw_fd(), Token(100 + i)).unwrap();
        }
        for client in &clients {
            client.set_nonblocking(true).unwrap();
        }
        (listener, clients.into_iter().zip(accepted).collect())
    }

    /// Waits (bounded) until every client has read the end of its stream, reading and
    /// dropping whatever comes before it; completions that arrive meanwhile are dropped.
    fn wait_for_every_end(p: &mut UringPoller, clients: &mut [TcpStream]) {
        let mut ended = vec![false; clients.len()];
        let (mut events, mut done) = (Vec::new(), Vec::new());
        let mut buf = vec![0u8; 64 * 1024];
        let start = Instant::now();
        while ended.contains(&false) {
            let left = ended.iter().filter(|e| !**e).count();
            assert!(
                start.elapsed() < DEADLINE,
                "{left} clients never saw the end"
            );
            p.wait(&mut events, Some(SLICE)).unwrap();
            p.take_completions(&mut done);
            done.clear();
            for (client, ended) in clients.iter_mut().zip(ended.iter_mut()) {
                while !*ended {
                    match client.read(&mut buf) {
                        Ok(0) => *ended = true,
                        Ok(_) => {}
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => panic!("{e}"),
                    }
                }
            }
        }
    }

    /// A readable socket pair end registered as `token`, made readable at once.
    fn readable_pair(p: &mut UringPoller, token: Token) -> std::os::unix::net::UnixStream {
        let (ours, mut theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let interest = Interest {
            readable: true,
            writable: false,
        };
        p.register(ours.as_raw_fd(), token, interest).unwrap();
        std::io::Write::write_all(&mut theirs, b"x").unwrap();
        // Kept open: the read end's events are what the test looks at.
        std::mem::forget(theirs);
        ours
    }

    /// The Pong deadline collects completions once per connection it judges, so several
    /// `collect_now`s can run in one iteration: what the first reaped (here the readiness of a
    /// waker-like descriptor) must still reach the next `wait`, and that wait must not sleep
    /// while it has events to report.
    #[test]
    fn events_collected_early_survive_a_second_collect_and_do_not_wait() {
        let Some(mut p) = small_ring() else { return };
        let _ours = readable_pair(&mut p, Token(7));
        let start = Instant::now();
        while p.pending_events.is_empty() {
            assert!(start.elapsed() < DEADLINE, "the readiness never came");
            p.collect_now().unwrap();
        }
        p.collect_now().unwrap();
        let mut events = Vec::new();
        let waited = Instant::now();
        p.wait(&mut events, Some(DEADLINE)).unwrap();
        assert!(
            events.iter().any(|e| e.token == Token(7) && e.readable),
            "{events:?}"
        );
        assert!(
            waited.elapsed() < DEADLINE / 2,
            "wait slept with events to report"
        );
    }

    /// A descriptor whose arming failed is not left marked as watched (its number comes back
    /// with the next accept).
    #[test]
    fn a_failed_arm_leaves_the_descriptor_unwatched() {
        let Some(mut p) = small_ring() else { return };
        let (ours, _theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let fd = ours.as_raw_fd();
        p.watch(fd).unwrap();
        let failed = Err(io::Error::from_raw_os_error(libc::EBUSY));
        assert!(p.unwatch_if_failed(fd, failed).is_err());
        p.watch(fd).expect("watched again after the failed arm");
    }

    /// Four times more connections close in one loop iteration than the submission queue
    /// holds (the queue is submitted early when full). Each one's receive is cancelled by its
    /// key, never by descriptor (a walk over every armed operation in the kernel, per close),
    /// every client sees the end of its stream, and nothing is left in flight but the accept.
    #[test]
    fn a_burst_of_closes_cancels_each_receive_by_key() {
        let Some(mut p) = small_ring() else { return };
        let _guard = super::super::tests::fd_hungry_lock();
        let (_listener, pairs) = connected(&mut p, 64);
        assert_eq!(
            p.ops.len(),
            1,
            "the standing receives hold entries in the table"
        );
        let mut clients = Vec::new();
        for (client, fd) in pairs {
            p.deregister(fd.as_raw_fd()).unwrap();
            p.close(fd);
            clients.push(client);
        }
        assert_eq!(p.descriptor_cancels, 0, "cancelled by descriptor");
        wait_for_every_end(&mut p, &mut clients);
        assert_eq!(p.ops.len(), 1, "operations left besides the accept");
    }

    /// What the backend keeps per connection while it is idle: its descriptor's `FdOps` (in a
    /// vector indexed by descriptor) and nothing in the table of operations (the standing
    /// receive has its key, `recv_key`). Printed, and bounded so that growth is a decision
    /// (docs/pollers.md, "What an idle connection costs on uring").
    #[test]
    fn what_an_idle_connection_holds() {
        let fd_ops = std::mem::size_of::<FdOps>();
        let op = std::mem::size_of::<Op>();
        println!("FdOps {fd_ops} bytes; an operation in the table {op} bytes (not per connection)");
        assert!(fd_ops <= 16, "FdOps grew to {fd_ops} bytes");
        for (fd, seq) in [(0, 0), (7, u16::MAX), (i32::MAX, 12345)] {
            let key = recv_key(fd, seq);
            assert!(key & RECV_KEY != 0, "not marked as a receive");
            assert_eq!(recv_key_parts(key), (fd, seq));
        }
    }

    /// A descriptor watched again right after `deregister`, before its cancelled receive has
    /// ended: the two receives have the same descriptor, and their keys differ by `recv_seq`.
    /// Bytes the old receive takes before its cancellation are dropped (the watch that asked
    /// for them has ended); the new one reports under the new token, and the old one's end
    /// leaves it in flight.
    #[test]
    fn a_receive_cancelled_by_deregister_is_told_from_the_next_one() {
        let Some(mut p) = small_ring() else { return };
        let (_listener, mut pairs) = connected(&mut p, 1);
        let (mut client, fd) = pairs.pop().unwrap();
        let raw = fd.as_raw_fd();
        p.deregister(raw).unwrap();
        p.watch_connection(raw, Token(200)).unwrap();
        assert_eq!(
            p.fds.get_mut(raw).unwrap().in_flight,
            2,
            "both receives in flight"
        );
        // Either receive may take these, depending on the order the kernel runs things in.
        client.write_all(b"early").unwrap();
        let mut got = Vec::new();
        let (mut events, mut done) = (Vec::new(), Vec::new());
        let start = Instant::now();
        let mut wrote_late = false;
        while !got.ends_with(b"hello") {
            assert!(start.elapsed() < DEADLINE, "got {got:?}");
            p.wait(&mut events, Some(SLICE)).unwrap();
            p.take_completions(&mut done);
            for c in done.drain(..) {
                match c {
                    Completion::Received(Token(200), mut buf) => {
                        got.extend_from_slice(buf.bytes_mut());
                        p.recycle(buf);
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
            let ops = p.fds.get_mut(raw).unwrap();
            if ops.in_flight == 1 && !wrote_late {
                // The old receive has ended; the new one goes on.
                assert!(ops.recv && ops.watched, "the new receive is not in flight");
                client.write_all(b"hello").unwrap();
                wrote_late = true;
            }
        }
        assert!(got == b"hello" || got == b"earlyhello", "got {got:?}");
        drop(fd);
    }

    /// Bytes written by `client` until they all have arrived, each receive buffer recycled.
    fn round_trip(p: &mut UringPoller, client: &mut TcpStream, message: &[u8]) {
        client.write_all(message).unwrap();
        let mut got = Vec::new();
        let (mut events, mut done) = (Vec::new(), Vec::new());
        let start = Instant::now();
        while got.len() < message.len() {
            assert!(
                start.elapsed() < DEADLINE,
                "{} bytes of {}",
                got.len(),
                message.len()
            );
            p.wait(&mut events, Some(SLICE)).unwrap();
            p.take_completions(&mut done);
            for c in done.drain(..) {
                match c {
                    Completion::Received(_, mut buf) => {
                        got.extend_from_slice(buf.bytes_mut());
                        p.recycle(buf);
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
        assert_eq!(got, message);
    }

    /// A wait that finds nothing to do (the idle spell before `release_idle_memory`).
    fn quiet_wait(p: &mut UringPoller) {
        let mut events = Vec::new();
        p.wait(&mut events, Some(Duration::from_millis(20)))
            .unwrap();
        assert!(events.is_empty() && p.completions.is_empty(), "not quiet");
    }

    /// After more receives than there are buffers, the kernel has touched a page of every
    /// buffer. Once the loop is quiet, those pages go back to the kernel, and not before: not
    /// while a buffer is lent to the reactor, not right after a wait that reported something.
    /// Receiving then works as before, into fresh pages.
    #[test]
    fn the_receive_buffers_pages_go_back_once_idle() {
        let Some(mut p) = small_ring() else { return };
        if !p.defers_task_work {
            eprintln!("skipped on uring: the ring has no DEFER_TASKRUN (kernel before 6.1)");
            return;
        }
        let (_listener, mut pairs) = connected(&mut p, 1);
        let (mut client, _fd) = pairs.pop().unwrap();
        client.set_nonblocking(false).unwrap();
        let message: Vec<u8> = (0..200u8).collect();
        assert!(!p.holds_idle_memory(), "nothing received yet");
        for _ in 0..usize::from(RECV_BUFFERS) + 8 {
            round_trip(&mut p, &mut client, &message);
        }
        let touched = p.pool.resident_pages();
        assert!(
            touched >= usize::from(RECV_BUFFERS) - 1,
            "{touched} pages resident after going round {RECV_BUFFERS} buffers"
        );
        assert!(p.holds_idle_memory());

        // Right after a wait that reported a receive (its buffer already back): kept.
        client.write_all(&message).unwrap();
        let (mut events, mut done) = (Vec::new(), Vec::new());
        let start = Instant::now();
        while p.completions.is_empty() {
            assert!(start.elapsed() < DEADLINE, "nothing received");
            p.wait(&mut events, Some(SLICE)).unwrap();
        }
        p.take_completions(&mut done);
        for c in done.drain(..) {
            let Completion::Received(_, buf) = c else {
                panic!("unexpected {c:?}")
            };
            p.recycle(buf);
        }
        p.release_idle_memory();
        assert_eq!(
            p.pool.resident_pages(),
            touched,
            "released after a busy wait"
        );
        // A buffer lent to the reactor, even after a quiet wait: kept, bytes intact.
        client.write_all(&message).unwrap();
        let start = Instant::now();
        while p.completions.is_empty() {
            assert!(start.elapsed() < DEADLINE, "nothing received");
            p.wait(&mut events, Some(SLICE)).unwrap();
        }
        p.take_completions(&mut done);
        let Some(Completion::Received(_, mut lent)) = done.pop() else {
            panic!("no receive")
        };
        assert!(done.is_empty(), "the message came in two receives");
        quiet_wait(&mut p);
        p.release_idle_memory();
        assert_eq!(
            p.pool.resident_pages(),
            touched,
            "released with a buffer lent"
        );
        assert_eq!(lent.bytes_mut(), &message[..]);
        p.recycle(lent);
        // Quiet, nothing lent: given back.
        quiet_wait(&mut p);
        p.release_idle_memory();
        assert_eq!(p.pool.resident_pages(), 0, "pages left after the release");
        assert!(!p.holds_idle_memory());

        for _ in 0..8 {
            round_trip(&mut p, &mut client, &message);
        }
        assert!(p.holds_idle_memory());
    }

    /// A connection closed while a send waits for room in its socket (the client reads
    /// nothing): the send is cancelled too, so the descriptor closes and the client, once it
    /// has read what did go out, sees the end of its stream.
    #[test]
    fn a_close_with_a_send_in_flight_cancels_the_send_too() {
        let Some(mut p) = small_ring() else { return };
        let (_listener, mut pairs) = connected(&mut p, 1);
        let (client, fd) = pairs.pop().unwrap();
        let raw = fd.as_raw_fd();
        // More than the socket buffers on both sides hold, so a send stays in flight.
        let payload = vec![7u8; 32 << 20];
        let mut offset = 0;
        let (mut events, mut done) = (Vec::new(), Vec::new());
        let start = Instant::now();
        loop {
            assert!(start.elapsed() < DEADLINE, "every send completed at once");
            assert!(offset < payload.len(), "the sockets took the whole payload");
            // SAFETY: `payload` outlives the send: it lives until the end of the test, after
            // the descriptor is closed, which happens only once the send has reported.
            unsafe {
                p.send(raw, Token(100), &[IoSlice::new(&payload[offset..])])
                    .unwrap();
            }
            p.wait(&mut events, Some(Duration::ZERO)).unwrap();
            p.take_completions(&mut done);
            match done.pop() {
                Some(Completion::Sent(Token(100), Ok(n))) => offset += n,
                None => break, // waiting for room
                other => panic!("unexpected {other:?}"),
            }
        }
        p.deregister(raw).unwrap();
        p.close(fd);
        assert_eq!(
            p.descriptor_cancels, 1,
            "the send was not cancelled with the receive"
        );
        wait_for_every_end(&mut p, &mut [client]);
        assert_eq!(p.ops.len(), 1, "operations left besides the accept");
        drop(payload);
    }
}
