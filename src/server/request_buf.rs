//! `RequestBuf`: the bytes of an HTTP request head (or of pipelined API requests) a connection
//! has received but not yet served, in one pointer while it holds nothing.
//!
//! Owns: the buffer and its "nothing buffered" form.
//! Does not: parse anything (`http.rs`, `inbound.rs` do), or decide when bytes are served.
//!
//! Every connection has one, but only a connection that is handshaking or speaking the HTTP API
//! uses it; an upgraded, idle connection holds it empty (SPEC §2: an idle connection holds no
//! buffers). A `Vec<u8>` would cost every connection slot 24 bytes for that; boxing the vector
//! costs 8, and the one extra allocation is paid per handshake, not per message
//! (docs/benchmarks.md, "What an idle connection costs").

use std::ops::Deref;

// The box is the point (one pointer in the slot instead of a vector's three words).
#[allow(clippy::box_collection)]
#[derive(Default)]
pub(crate) struct RequestBuf(Option<Box<Vec<u8>>>);

impl RequestBuf {
    /// Appends received bytes (allocating the buffer on the first ones).
    pub(crate) fn extend_from_slice(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        self.0
            .get_or_insert_with(Box::default)
            .extend_from_slice(bytes);
    }

    /// Removes the first `n` bytes; a buffer left empty is freed.
    ///
    /// # Panics
    /// If `n` is more than the bytes held (the caller counts what it served from them).
    pub(crate) fn drain_front(&mut self, n: usize) {
        if let Some(buf) = self.0.as_deref_mut() {
            buf.drain(..n);
            if buf.is_empty() {
                self.0 = None;
            }
        } else {
            assert_eq!(n, 0, "drained {n} bytes from an empty request buffer");
        }
    }

    /// Splits off the bytes from `at` on, as `Vec::split_off` does.
    ///
    /// # Panics
    /// If `at` is past the bytes held.
    pub(crate) fn split_off(&mut self, at: usize) -> Vec<u8> {
        match self.0.as_deref_mut() {
            Some(buf) => buf.split_off(at),
            None => {
                assert_eq!(at, 0, "split at {at} of an empty request buffer");
                Vec::new()
            }
        }
    }

    /// Drops every byte and frees the buffer.
    pub(crate) fn free(&mut self) {
        self.0 = None;
    }
}

impl Deref for RequestBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        self.0.as_deref().map_or(&[], Vec::as_slice)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_one_pointer_and_nothing_while_empty() {
        assert_eq!(
            std::mem::size_of::<RequestBuf>(),
            std::mem::size_of::<usize>()
        );
        let mut buf = RequestBuf::default();
        buf.extend_from_slice(b"");
        assert!(buf.0.is_none(), "no bytes, no allocation");
        assert!(buf.is_empty());
        assert_eq!(buf.split_off(0), Vec::<u8>::new());
        buf.drain_front(0);
    }

    #[test]
    fn appends_drains_and_splits_like_a_vec() {
        let mut buf = RequestBuf::default();
        buf.extend_from_slice(b"GET / HTTP/1.1\r\n");
        buf.extend_from_slice(b"\r\nnext");
        assert_eq!(&buf[..], b"GET / HTTP/1.1\r\n\r\nnext");
        assert_eq!(buf.split_off(18), b"next".to_vec());
        assert_eq!(&buf[..], b"GET / HTTP/1.1\r\n\r\n");
        buf.drain_front(4);
        assert_eq!(&buf[..], b"/ HTTP/1.1\r\n\r\n");
        buf.drain_front(buf.len());
        assert!(buf.0.is_none(), "an emptied buffer is freed");
        buf.extend_from_slice(b"x");
        buf.free();
        assert!(buf.0.is_none() && buf.is_empty());
    }
}
