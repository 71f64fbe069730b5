//! Giving the heap's free pages back to the kernel once a burst is over.
//!
//! Owns: `give_back_free_pages`, a call to the C library's `malloc_trim`.
//! Does not: decide when. The reactor calls it when the loop has been idle for
//! `SPARES_KEPT_IDLE` right after a burst, in the same step that frees the outbound pool's spare
//! buffers (`Reactor::wait`).
//!
//! Why: glibc gives freed memory back to the kernel on its own only from the top of the heap.
//! A burst of handshakes frees its short-lived buffers (request heads, 101 responses, the
//! pool's spares) in between allocations that stay (the connections' slots grow, the hub's
//! tables grow), so those free pages stay resident. `malloc_trim(0)` also releases every whole
//! free page inside the heap (`madvise(MADV_DONTNEED)`). Measured with 10,000 idle /echo
//! connections: 216 KiB given back, about 22 bytes per connection (docs/benchmarks.md, "What an
//! idle connection costs, and what RSS also counts"); the call walks the allocator's free lists
//! once, and it runs at most once per burst, when nothing else is waiting.

/// Gives the heap's whole free pages back to the kernel (glibc); elsewhere, nothing to do.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub(super) fn give_back_free_pages() {
    // SAFETY: malloc_trim takes no pointer and changes only the allocator's own state, under
    // the allocator's lock; memory in use is never released.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Gives the heap's whole free pages back to the kernel (glibc); elsewhere, nothing to do.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub(super) fn give_back_free_pages() {}
