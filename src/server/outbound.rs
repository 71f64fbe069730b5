//! A connection's queue of encoded bytes waiting for the socket, flushed with vectored writes.
//!
//! Owns: the chunks not yet written, the offset into the first one, and the count of queued bytes
//! that the backpressure limit (`--max-outbound`, SPEC §2) is checked against; `OutboundPool`,
//! the storage the reactor lends to every queue (empty chunk rings, one scratch buffer).
//! Does not: encode frames itself beyond appending to its own tail, decide what to do when a limit
//! is exceeded (the reactor applies the slow-consumer policy), or register interest.
//!
//! Two kinds of chunk, for two kinds of traffic:
//! * `Owned` bytes written for this connection alone (an echo, a pong, an HTTP response). Small
//!   frames are appended to the tail chunk instead of getting an allocation each, so a read that
//!   produced sixteen echoes queues one buffer.
//! * `Shared` frames encoded once and sent to many connections (a room broadcast): a
//!   reference-counted immutable buffer; queueing it costs a pointer copy, not a payload copy.
//!
//! The simple version would be one `Vec<u8>` per connection that everything is copied into. That
//! copies every broadcast payload once per recipient; the shared chunks avoid it.
//!
//! The chunks sit in a ring (`VecDeque`). A flushed queue gives its ring up, so an idle connection
//! holds no buffer (SPEC §2), but not to the allocator: it goes to the `OutboundPool`, and the
//! next fan-out takes it back. The simple version, a fresh ring for every queue that fills,
//! allocates (and regrows) one ring per recipient per loop iteration: O(members) allocations per
//! message batch, 29% of a broadcast server's instructions under callgrind (docs/benchmarks.md,
//! "Allocations per fan-out").
//!
//! Writing: one `writev` carries many chunks, but the kernel charges for every iovec, and for a
//! 66-byte frame that charge (some 30 ns on Linux) is larger than copying the frame. So a flush
//! first copies the run of small chunks at the head of the queue (up to `GATHER_CHUNK_BYTES`
//! each) into the pool's scratch buffer, which becomes the first iovec; larger chunks keep an
//! iovec of their own, never copied. The queue itself still holds each shared frame once, by
//! reference; the copy exists only for the duration of one write. The simple version, one iovec
//! per chunk, stays in the tests as the oracle (`gathered_writes_match_one_iovec_per_chunk`).

use std::collections::VecDeque;
use std::io::{self, IoSlice, Write};
use std::rc::Rc;

/// Chunks smaller than this are coalesced into the tail `Owned` chunk.
const COALESCE_LIMIT: usize = 16 * 1024;

/// Initial capacity of a new `Owned` chunk. A read typically produces a handful of replies that
/// are appended to the same chunk; starting at 4 KiB (instead of the first reply's size) spares
/// the reallocations as it grows, which callgrind showed at 13% of an echo server's
/// instructions (docs/benchmarks.md). The chunk lives only until the next flush.
const OWNED_CHUNK_BYTES: usize = 4 * 1024;

/// At most this many chunks go into one `writev`: IOV_MAX on Linux, macOS and the BSDs. A room
/// fan-out queues one shared chunk per message, so a member of a busy room often has hundreds
/// waiting (those over `GATHER_CHUNK_BYTES` each keep an iovec); the earlier cap of 64 split them
/// into several `writev`s, and each one is a full TCP send. Raising it cut the server's CPU per delivery by 25-45% in a 1,000-member room with 256
/// messages in flight (docs/benchmarks.md, "Broadcast vs tokio-tungstenite").
const MAX_IOVECS: usize = 1024;

/// Queues of at most this many chunks (nearly all of them) gather into a small slice array:
/// the full `MAX_IOVECS` array is 16 KiB to initialise on every call.
const FEW_IOVECS: usize = 64;

/// And a write of at most this many chunks (an echo's reply, a gathered run and a large frame)
/// into a smaller one still: the 64-slice array is 1 KiB to initialise, about 190 instructions
/// per flush, which when one message is answered per flush (echo of 1 KiB messages, one in
/// flight) was 7% of the server's instructions per message (callgrind, docs/benchmarks.md).
const FEWEST_IOVECS: usize = 4;

/// The most memory the pool keeps in empty rings; rings beyond it go back to the allocator.
/// A 1,000-member room with 256 messages in flight per member cycles about 6 MiB of rings; the
/// cap keeps an idle server's stock small while covering rooms of hundreds at full speed.
const MAX_SPARE_RING_BYTES: usize = 4 * 1024 * 1024;

/// The most empty `Owned` chunk buffers (of `OWNED_CHUNK_BYTES` each) the pool keeps: 4 MiB.
/// Without them every flush freed its reply buffers and the next read allocated them again,
/// and glibc, seeing the top of the heap freed and refilled, returned it to the kernel and took
/// it back a few hundred times a second (`brk`, docs/benchmarks.md, "Allocator churn"). Replies
/// are flushed at the end of the loop iteration, so an iteration holds one buffer per connection
/// it answered: 1,024 covers a thousand busy connections (with 256, echo with 1,000 connections
/// still allocated and freed a buffer for 70% of its messages). The stock is given back once the
/// loop has been idle for a moment (`release_spares`), so only a busy server holds it.
const MAX_SPARE_OWNED_CHUNKS: usize = 1024;
/// Chunks up to this size are copied into the scratch buffer at flush time instead of getting an
/// iovec each. Measured in a 1,000-member room (docs/benchmarks.md, "Broadcast vs
/// tokio-tungstenite"): with 64-byte messages, gathering cut the server's CPU per delivery by a
/// third; with 1 KiB messages it made no difference, with 4 KiB it cost more than it saved.
const GATHER_CHUNK_BYTES: usize = 512;

/// The most bytes gathered for one write, and the most the scratch buffer keeps between uses.
const GATHER_BYTES: usize = 64 * 1024;

#[derive(Debug)]
pub enum Chunk {
    Owned(Vec<u8>),
    Shared(Rc<[u8]>),
}

impl Chunk {
    fn as_slice(&self) -> &[u8] {
        match self {
            Chunk::Owned(v) => v,
            Chunk::Shared(s) => s,
        }
    }
}

/// What a flush achieved.
#[derive(Debug, PartialEq, Eq)]
pub enum Flush {
    /// Everything queued is on the wire (in the kernel's send buffer).
    Done,
    /// The socket's send buffer is full; bytes remain queued and writable interest is needed.
    Blocked,
}

#[derive(Debug, Default)]
pub struct Outbound {
    chunks: VecDeque<Chunk>,
    /// Bytes of `chunks[0]` already written.
    head_offset: usize,
    /// Bytes queued and not yet written. Invariant: the sum of chunk lengths minus `head_offset`.
    queued_bytes: usize,
    /// Completion I/O (io_uring): how many chunks at the head a send in flight points into.
    /// Their bytes must not move until the send completes, so nothing is appended to them.
    pinned: usize,
}

impl Outbound {
    pub fn is_empty(&self) -> bool {
        self.queued_bytes == 0
    }

    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes
    }

    /// Appends bytes produced by `write` for this connection alone, coalescing small writes. An
    /// empty queue takes a ring from `pool`, as `push_shared` does.
    #[inline]
    pub fn push_owned_with(
        &mut self,
        len_hint: usize,
        pool: &mut OutboundPool,
        write: impl FnOnce(&mut Vec<u8>),
    ) {
        if self.chunks.capacity() == 0 {
            self.chunks = pool.take_ring();
        }
        let tail_pinned = self.chunks.len() <= self.pinned;
        let tail = match self.chunks.back_mut() {
            // The head chunk may be partly written; appending to it is still correct because
            // `head_offset` only counts from its start.
            // A pinned chunk is being read by the kernel: growing it could move its bytes.
            Some(Chunk::Owned(v)) if !tail_pinned && v.len() + len_hint <= COALESCE_LIMIT => v,
            _ => {
                self.chunks
                    .push_back(Chunk::Owned(pool.take_owned(len_hint)));
                match self.chunks.back_mut() {
                    Some(Chunk::Owned(v)) => v,
                    _ => unreachable!("an Owned chunk was just pushed"),
                }
            }
        };
        let before = tail.len();
        write(tail);
        self.queued_bytes += tail.len() - before;
    }

    /// Queues a frame shared with other connections, without copying it. An empty queue takes
    /// a ring from `pool` rather than from the allocator (see the module doc); every push does,
    /// so that the rings flushed queues give back are the ones the next pushes use.
    pub fn push_shared(&mut self, frame: Rc<[u8]>, pool: &mut OutboundPool) {
        if self.chunks.capacity() == 0 {
            self.chunks = pool.take_ring();
        }
        self.queued_bytes += frame.len();
        self.chunks.push_back(Chunk::Shared(frame));
    }

    /// Writes as much as the socket takes, many chunks per `writev`, until the queue is empty
    /// or the socket would block. `Interrupted` is retried. An emptied queue puts its ring in
    /// `pool`.
    ///
    /// # Errors
    /// Any I/O error other than `WouldBlock`/`Interrupted`; the caller closes the connection.
    pub fn flush(&mut self, sink: &mut impl Write, pool: &mut OutboundPool) -> io::Result<Flush> {
        while !self.chunks.is_empty() {
            if self.chunks.len() == 1 {
                // The usual case (a read's replies are encoded into one chunk): a plain write,
                // without building the iovec array `write_some` fills.
                match sink.write(&self.chunks[0].as_slice()[self.head_offset..]) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(n) => self.consume(n, pool),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Flush::Blocked),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
                continue;
            }
            let gathered = self.gather_head(&mut pool.scratch);
            // The gathered copy replaces the chunks it holds with one iovec.
            let iovecs = self.chunks.len() - gathered + usize::from(gathered > 0);
            let written = if iovecs <= FEWEST_IOVECS {
                self.write_some::<FEWEST_IOVECS>(sink, &pool.scratch, gathered)
            } else if iovecs <= FEW_IOVECS {
                self.write_some::<FEW_IOVECS>(sink, &pool.scratch, gathered)
            } else {
                self.write_some::<MAX_IOVECS>(sink, &pool.scratch, gathered)
            };
            match written {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.consume(n, pool),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Flush::Blocked),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        // Give up the ring too: an idle connection holds no buffers (SPEC §2).
        pool.put_ring(std::mem::take(&mut self.chunks));
        Ok(Flush::Done)
    }

    /// Completion I/O: lends the pending bytes, at most `max` chunks, to one send as `out`, and
    /// pins those chunks (nothing is appended to them, so their bytes stay where they are) until
    /// `sent` reports how much of it the socket took. Returns the bytes lent.
    ///
    /// Unlike `flush`, nothing is gathered into a scratch buffer: the pool's one buffer cannot
    /// be lent to many sends in flight at once.
    pub fn pin_for_send<'a>(&'a mut self, out: &mut Vec<IoSlice<'a>>, max: usize) -> usize {
        self.pinned = self.chunks.len().min(max);
        let mut lent = 0;
        for bytes in self.pending().take(max) {
            lent += bytes.len();
            out.push(IoSlice::new(bytes));
        }
        lent
    }

    /// Completion I/O: `pin_for_send` for the usual queue of one chunk (a read's replies are
    /// encoded into one), without a vector to collect the slices in: the bytes to lend, or
    /// `None` (nothing pinned) when the queue holds more or fewer chunks than one.
    pub fn pin_single(&mut self) -> Option<&[u8]> {
        if self.chunks.len() != 1 {
            return None;
        }
        self.pinned = 1;
        self.pending().next()
    }

    /// Completion I/O: the send that `pin_for_send` lent the queue to took `written` bytes.
    /// They leave the queue and the chunks are unpinned; an emptied queue puts its ring in
    /// `pool`, as `flush` does.
    pub fn sent(&mut self, written: usize, pool: &mut OutboundPool) {
        self.pinned = 0;
        self.consume(written, pool);
        if self.chunks.is_empty() {
            pool.put_ring(std::mem::take(&mut self.chunks));
        }
    }

    /// The bytes still to write, chunk by chunk (the first one less what is already written).
    fn pending(&self) -> impl Iterator<Item = &[u8]> {
        self.chunks.iter().enumerate().map(|(i, chunk)| {
            let bytes = chunk.as_slice();
            if i == 0 {
                &bytes[self.head_offset..]
            } else {
                bytes
            }
        })
    }

    /// Copies the run of small chunks at the head of the queue into `gather` (see the module
    /// doc) and returns how many it holds; 0, with `gather` empty, if the run is shorter than two
    /// chunks, since copying a lone chunk saves nothing.
    fn gather_head(&self, gather: &mut Vec<u8>) -> usize {
        gather.clear();
        let mut gathered = 0;
        for bytes in self.pending() {
            if bytes.len() > GATHER_CHUNK_BYTES || gather.len() + bytes.len() > GATHER_BYTES {
                break;
            }
            gather.extend_from_slice(bytes);
            gathered += 1;
        }
        if gathered < 2 {
            gather.clear();
            return 0;
        }
        gathered
    }

    /// One `writev` of at most `N` iovecs: the `gathered` head chunks as one (their copy in
    /// `gather`), then the following chunks one each.
    fn write_some<const N: usize>(
        &self,
        sink: &mut impl Write,
        gather: &[u8],
        gathered: usize,
    ) -> io::Result<usize> {
        let head = (gathered > 0).then_some(gather);
        let mut iov = [IoSlice::new(&[]); N];
        let mut count = 0;
        for bytes in head
            .into_iter()
            .chain(self.pending().skip(gathered))
            .take(N)
        {
            iov[count] = IoSlice::new(bytes);
            count += 1;
        }
        sink.write_vectored(&iov[..count])
    }

    /// Drops the `written` bytes from the front of the queue; written `Owned` buffers go back
    /// to `pool`.
    fn consume(&mut self, mut written: usize, pool: &mut OutboundPool) {
        if written == self.queued_bytes {
            // Everything went out (the usual case): drop the chunks in one sweep instead of
            // measuring each against `written`. Same result as the loop below, which handles
            // partial writes; in a 1,000-member room this sweep needs 13% fewer of the
            // server's instructions per delivery than the loop (callgrind, docs/benchmarks.md).
            for chunk in self.chunks.drain(..) {
                pool.put_chunk(chunk);
            }
            self.head_offset = 0;
            self.queued_bytes = 0;
            return;
        }
        self.queued_bytes -= written;
        while written > 0 {
            let Some(head) = self.chunks.front() else {
                break;
            };
            let left = head.as_slice().len() - self.head_offset;
            if written >= left {
                written -= left;
                self.head_offset = 0;
                if let Some(chunk) = self.chunks.pop_front() {
                    pool.put_chunk(chunk);
                }
            } else {
                self.head_offset += written;
                written = 0;
            }
        }
    }
}

/// Storage the reactor lends to its outbound queues, one per reactor: the empty chunk rings
/// left by flushed queues, for the next queues that fill, and a scratch buffer that a flush
/// gathers small chunks into and that shared frames are built in (see the module doc).
///
/// Invariant: every ring here is empty, and `ring_bytes` is the sum of their capacities in
/// bytes, at most `MAX_SPARE_RING_BYTES`; every `owned` buffer is empty, with a capacity of
/// `OWNED_CHUNK_BYTES`. `scratch` holds nothing between uses, and keeps at
/// most `GATHER_BYTES` of capacity.
#[derive(Debug, Default)]
pub struct OutboundPool {
    rings: Vec<VecDeque<Chunk>>,
    ring_bytes: usize,
    scratch: Vec<u8>,
    /// Empty `Owned` chunk buffers of `OWNED_CHUNK_BYTES` capacity, at most
    /// `MAX_SPARE_OWNED_CHUNKS`.
    owned: Vec<Vec<u8>>,
}

impl OutboundPool {
    /// The bytes `write` produces, in a new `Rc<[u8]>` built in the scratch buffer: one
    /// allocation, where writing a `Vec` and converting it takes two (the `Vec`, then the `Rc`
    /// it is copied into). A fan-out then allocates once per message.
    pub fn build_shared(&mut self, write: impl FnOnce(&mut Vec<u8>)) -> Rc<[u8]> {
        self.scratch.clear();
        write(&mut self.scratch);
        let shared = Rc::from(&self.scratch[..]);
        self.scratch.clear();
        if self.scratch.capacity() > GATHER_BYTES {
            // A large frame went through; do not keep its buffer.
            self.scratch = Vec::new();
        }
        shared
    }

    /// A ring with room for chunks, or a new empty one if there is none in stock.
    fn take_ring(&mut self) -> VecDeque<Chunk> {
        match self.rings.pop() {
            Some(ring) => {
                self.ring_bytes -= ring_bytes(&ring);
                ring
            }
            None => VecDeque::new(),
        }
    }

    /// An empty buffer for an `Owned` chunk that will hold at least `len_hint` bytes: a spare
    /// one if the hint fits the usual size and there is one, else a new one.
    fn take_owned(&mut self, len_hint: usize) -> Vec<u8> {
        if len_hint <= OWNED_CHUNK_BYTES {
            if let Some(buffer) = self.owned.pop() {
                return buffer;
            }
        }
        Vec::with_capacity(len_hint.max(OWNED_CHUNK_BYTES))
    }

    /// Takes back a written chunk: an `Owned` buffer of the usual size is kept for reuse (if
    /// the stock is not full); anything else is dropped (a shared frame loses one reference).
    fn put_chunk(&mut self, chunk: Chunk) {
        if let Chunk::Owned(mut buffer) = chunk {
            if buffer.capacity() == OWNED_CHUNK_BYTES && self.owned.len() < MAX_SPARE_OWNED_CHUNKS {
                buffer.clear();
                self.owned.push(buffer);
            }
        }
    }

    /// Does the pool hold spare rings or reply buffers (memory an idle server need not keep)?
    pub fn has_spares(&self) -> bool {
        !self.owned.is_empty() || !self.rings.is_empty()
    }

    /// Gives every spare ring and reply buffer back to the allocator: the reactor does so once
    /// it has been idle for `SPARES_KEPT_IDLE` (`Reactor::wait`), so that a burst (10,000
    /// handshakes, each with its 101 response in a reply buffer) leaves nothing behind, while
    /// steady traffic, which never lets the loop idle that long, keeps reusing them.
    pub fn release_spares(&mut self) {
        self.owned = Vec::new();
        self.rings = Vec::new();
        self.ring_bytes = 0;
    }

    /// Keeps an emptied ring for reuse, or frees it if the stock is full.
    fn put_ring(&mut self, ring: VecDeque<Chunk>) {
        debug_assert!(ring.is_empty());
        let bytes = ring_bytes(&ring);
        if bytes > 0 && self.ring_bytes + bytes <= MAX_SPARE_RING_BYTES {
            self.ring_bytes += bytes;
            self.rings.push(ring);
        }
    }
}

fn ring_bytes(ring: &VecDeque<Chunk>) -> usize {
    ring.capacity() * std::mem::size_of::<Chunk>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A sink that accepts at most `limit` bytes per call and blocks once `calls_left` is spent;
    /// it records how many iovecs each call was given.
    struct Trickle {
        out: Vec<u8>,
        limit: usize,
        calls_left: usize,
        iovecs: Vec<usize>,
    }

    impl Trickle {
        fn new(limit: usize, calls_left: usize) -> Trickle {
            Trickle {
                out: Vec::new(),
                limit,
                calls_left,
                iovecs: Vec::new(),
            }
        }
    }

    impl Write for Trickle {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.write_vectored(&[IoSlice::new(buf)])
        }
        fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            if self.calls_left == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            self.calls_left -= 1;
            self.iovecs.push(bufs.len());
            let mut n = 0;
            for b in bufs {
                let take = (self.limit - n).min(b.len());
                self.out.extend_from_slice(&b[..take]);
                n += take;
                if n == self.limit {
                    break;
                }
            }
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A queue of shared frames of these sizes, each filled with its own index (mod 251), and
    /// the bytes they make together (what the simple version, one iovec per chunk, writes).
    fn frames(sizes: &[usize], pool: &mut OutboundPool) -> (Outbound, Vec<u8>) {
        let mut q = Outbound::default();
        let mut expected = Vec::new();
        for (i, &size) in sizes.iter().enumerate() {
            let frame = vec![(i % 251) as u8; size];
            expected.extend_from_slice(&frame);
            q.push_shared(Rc::from(frame), pool);
        }
        (q, expected)
    }

    #[test]
    fn partial_writes_keep_order_and_count() {
        let mut pool = OutboundPool::default();
        let mut q = Outbound::default();
        q.push_owned_with(3, &mut pool, |v| v.extend_from_slice(b"abc"));
        q.push_shared(Rc::from(&b"defgh"[..]), &mut pool);
        q.push_owned_with(2, &mut pool, |v| v.extend_from_slice(b"ij"));
        assert_eq!(q.queued_bytes(), 10);

        let mut sink = Trickle::new(4, 2);
        assert_eq!(q.flush(&mut sink, &mut pool).unwrap(), Flush::Blocked);
        assert_eq!(sink.out, b"abcdefgh");
        assert_eq!(q.queued_bytes(), 2);

        sink.calls_left = 10;
        assert_eq!(q.flush(&mut sink, &mut pool).unwrap(), Flush::Done);
        assert_eq!(sink.out, b"abcdefghij");
        assert!(q.is_empty());
    }

    /// Steady traffic reuses its reply buffers instead of freeing and allocating them at every
    /// flush (see `MAX_SPARE_OWNED_CHUNKS`); a grown buffer is not kept, nor more than the cap.
    #[test]
    fn written_owned_buffers_are_reused() {
        let mut pool = OutboundPool::default();
        let mut q = Outbound::default();
        let mut sink = Trickle::new(usize::MAX, 100);
        q.push_owned_with(3, &mut pool, |v| v.extend_from_slice(b"abc"));
        let first = match q.chunks.back() {
            Some(Chunk::Owned(v)) => v.as_ptr(),
            other => panic!("expected an owned chunk, got {other:?}"),
        };
        assert_eq!(q.flush(&mut sink, &mut pool).unwrap(), Flush::Done);
        assert_eq!(pool.owned.len(), 1, "the written buffer is kept");
        q.push_owned_with(2, &mut pool, |v| v.extend_from_slice(b"de"));
        assert!(pool.owned.is_empty());
        match q.chunks.back() {
            Some(Chunk::Owned(v)) => assert_eq!(v.as_ptr(), first, "the same buffer again"),
            other => panic!("expected an owned chunk, got {other:?}"),
        }
        // A buffer that grew past the usual size goes back to the allocator.
        q.push_owned_with(1, &mut pool, |v| {
            v.extend_from_slice(&[0u8; OWNED_CHUNK_BYTES])
        });
        assert_eq!(q.flush(&mut sink, &mut pool).unwrap(), Flush::Done);
        assert!(pool.owned.is_empty(), "a grown buffer is not kept");
        assert_eq!(sink.out.len(), 5 + OWNED_CHUNK_BYTES);
        // The stock is capped.
        for _ in 0..MAX_SPARE_OWNED_CHUNKS + 10 {
            pool.put_chunk(Chunk::Owned(Vec::with_capacity(OWNED_CHUNK_BYTES)));
        }
        assert_eq!(pool.owned.len(), MAX_SPARE_OWNED_CHUNKS);
    }

    #[test]
    fn small_chunks_are_gathered_and_large_ones_keep_their_iovec() {
        fn check(name: &str, sizes: &[usize], iovecs_per_call: &[usize]) {
            let mut pool = OutboundPool::default();
            let (mut q, expected) = frames(sizes, &mut pool);
            let mut sink = Trickle::new(usize::MAX, 100);
            assert_eq!(
                q.flush(&mut sink, &mut pool).unwrap(),
                Flush::Done,
                "{name}"
            );
            assert_eq!(sink.out, expected, "{name}");
            assert_eq!(sink.iovecs, iovecs_per_call, "{name}");
            assert!(pool.scratch.len() <= GATHER_BYTES, "{name}");
        }
        let small = GATHER_CHUNK_BYTES;
        let large = GATHER_CHUNK_BYTES + 1;
        check("small frames leave as one iovec", &[66; 300], &[1]);
        check("a lone small frame is not copied", &[66], &[1]);
        check("large frames keep one iovec each", &[large; 3], &[3]);
        check(
            "a small run, then a large frame and what follows it",
            &[66, small, 66, 4096, 66, 66],
            &[4],
        );
        check("a large head: nothing gathered", &[4096, 66, 66], &[3]);
        // 128 chunks of 512 bytes fill 64 KiB of scratch; the other 72 follow it.
        check("the gathered copy is bounded", &[small; 200], &[73]);
        check(
            "at most MAX_IOVECS per writev",
            &vec![large; 2 * MAX_IOVECS + 3],
            &[MAX_IOVECS, MAX_IOVECS, 3],
        );
        check(
            "just over FEW_IOVECS",
            &vec![large; FEW_IOVECS + 1],
            &[FEW_IOVECS + 1],
        );
        check("FEWEST_IOVECS", &[large; FEWEST_IOVECS], &[FEWEST_IOVECS]);
        check(
            "just over FEWEST_IOVECS",
            &[large; FEWEST_IOVECS + 1],
            &[FEWEST_IOVECS + 1],
        );
    }

    proptest! {
        /// Whatever the chunk sizes and however little the socket takes per call, the bytes
        /// arrive as the simple version (one iovec per chunk) would send them.
        #[test]
        fn gathered_writes_match_one_iovec_per_chunk(
            sizes in proptest::collection::vec(
                prop_oneof![1usize..=GATHER_CHUNK_BYTES, GATHER_CHUNK_BYTES + 1..3000],
                0..60,
            ),
            limit in 1usize..5000,
        ) {
            let mut pool = OutboundPool::default();
            let (mut q, expected) = frames(&sizes, &mut pool);
            let mut sink = Trickle::new(limit, 0);
            loop {
                sink.calls_left = 3;
                if q.flush(&mut sink, &mut pool).unwrap() == Flush::Done {
                    break;
                }
                prop_assert_eq!(q.queued_bytes(), expected.len() - sink.out.len());
            }
            prop_assert_eq!(sink.out, expected);
            prop_assert!(q.is_empty());
        }
    }

    #[test]
    fn flushed_rings_are_reused_up_to_the_cap() {
        let mut pool = OutboundPool::default();
        let mut sink = Trickle::new(usize::MAX, 100);
        let frame: Rc<[u8]> = Rc::from(&b"x"[..]);
        let mut a = Outbound::default();
        for _ in 0..100 {
            a.push_shared(Rc::clone(&frame), &mut pool);
        }
        let grown = a.chunks.capacity();
        assert_eq!(a.flush(&mut sink, &mut pool).unwrap(), Flush::Done);
        assert_eq!(a.chunks.capacity(), 0, "an idle queue holds no ring");
        assert_eq!(pool.rings.len(), 1);

        // The next queue to fill gets that ring, already grown.
        let mut b = Outbound::default();
        b.push_shared(Rc::clone(&frame), &mut pool);
        assert_eq!(b.chunks.capacity(), grown);
        assert_eq!((pool.rings.len(), pool.ring_bytes), (0, 0));

        // Owned pushes take from the stock too: queues that only ever get their own bytes (a
        // /ws welcome) cycle one ring instead of leaving one each in the stock.
        assert_eq!(b.flush(&mut sink, &mut pool).unwrap(), Flush::Done);
        for _ in 0..10 {
            let mut c = Outbound::default();
            c.push_owned_with(2, &mut pool, |v| v.extend_from_slice(b"hi"));
            assert_eq!(c.chunks.capacity(), grown);
            assert_eq!(c.flush(&mut sink, &mut pool).unwrap(), Flush::Done);
        }
        assert_eq!(pool.rings.len(), 1);
        pool.take_ring();

        // The stock never holds more than its cap.
        let slots = MAX_SPARE_RING_BYTES / std::mem::size_of::<Chunk>();
        pool.put_ring(VecDeque::with_capacity(slots));
        pool.put_ring(VecDeque::with_capacity(4));
        assert_eq!(
            pool.rings.len(),
            1,
            "the second ring is over the cap and freed"
        );
        assert!(pool.ring_bytes <= MAX_SPARE_RING_BYTES);
        // A ring that never allocated is not worth keeping.
        pool.take_ring();
        pool.put_ring(VecDeque::new());
        assert_eq!((pool.rings.len(), pool.ring_bytes), (0, 0));
    }

    #[test]
    fn shared_frames_are_built_in_scratch_that_stays_small() {
        let mut pool = OutboundPool::default();
        let small = pool.build_shared(|out| out.extend_from_slice(b"hello"));
        assert_eq!(&small[..], b"hello");
        assert!(pool.scratch.is_empty());
        let big = vec![9u8; 3 * GATHER_BYTES];
        let shared = pool.build_shared(|out| out.extend_from_slice(&big));
        assert_eq!(&shared[..], &big[..]);
        assert_eq!(
            pool.scratch.capacity(),
            0,
            "a large frame's buffer is not kept"
        );
    }

    #[test]
    fn small_owned_writes_coalesce_into_one_chunk() {
        let mut q = Outbound::default();
        let mut pool = OutboundPool::default();
        for _ in 0..16 {
            q.push_owned_with(66, &mut pool, |v| v.extend_from_slice(&[7u8; 66]));
        }
        assert_eq!(q.chunks.len(), 1);
        assert_eq!(q.queued_bytes(), 16 * 66);
    }

    /// Completion I/O: chunks lent to a send in flight keep their bytes where they were (the
    /// kernel reads them later); what is queued meanwhile goes into a new chunk and leaves,
    /// after the lent bytes, in the next send; a partial send leaves the rest first in line.
    #[test]
    fn pinned_chunks_do_not_move_until_sent() {
        let mut pool = OutboundPool::default();
        let mut q = Outbound::default();
        q.push_owned_with(3, &mut pool, |v| v.extend_from_slice(b"abc"));
        let mut lent = Vec::new();
        assert_eq!(q.pin_for_send(&mut lent, 1024), 3);
        let (addr, len) = (lent[0].as_ptr(), lent[0].len());
        drop(lent);
        // Enough to make the pinned chunk reallocate, were it appended to.
        q.push_owned_with(8000, &mut pool, |v| v.extend_from_slice(&[b'x'; 8000]));
        let mut again = Vec::new();
        q.pin_for_send(&mut again, 1024);
        assert_eq!(again.len(), 2, "the new bytes went into the pinned chunk");
        assert_eq!((again[0].as_ptr(), again[0].len()), (addr, len));
        drop(again);
        // The socket took two bytes: the rest of the first chunk, then the second, follow.
        q.sent(2, &mut pool);
        assert_eq!(q.queued_bytes(), 1 + 8000);
        q.push_owned_with(1, &mut pool, |v| v.push(b'!'));
        let mut rest = Vec::new();
        q.pin_for_send(&mut rest, 1024);
        let bytes: Vec<u8> = rest.iter().flat_map(|s| s.iter().copied()).collect();
        assert_eq!(bytes.len(), 8002);
        assert_eq!(&bytes[..1], b"c");
        assert_eq!(&bytes[8001..], b"!");
        drop(rest);
        q.sent(8002, &mut pool);
        assert!(q.is_empty());
    }

    /// The one-chunk send pins as `pin_for_send` does: later replies go into a new chunk, and
    /// a queue of two chunks is not taken by it.
    #[test]
    fn a_single_pinned_chunk_is_not_appended_to() {
        let mut pool = OutboundPool::default();
        let mut q = Outbound::default();
        assert_eq!(q.pin_single(), None, "an empty queue lends nothing");
        q.push_owned_with(3, &mut pool, |v| v.extend_from_slice(b"abc"));
        let lent = q.pin_single().map(|b| (b.as_ptr(), b.len()));
        assert_eq!(lent.map(|(_, len)| len), Some(3));
        q.push_owned_with(1, &mut pool, |v| v.push(b'!'));
        assert_eq!(
            q.pin_single(),
            None,
            "two chunks: the reply did not join the pinned one"
        );
        let mut again = Vec::new();
        q.pin_for_send(&mut again, 1024);
        assert_eq!(again.len(), 2);
        assert_eq!(Some((again[0].as_ptr(), again[0].len())), lent);
        drop(again);
        q.sent(4, &mut pool);
        assert!(q.is_empty());
    }
}
