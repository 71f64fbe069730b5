//! Where a connection's frame reader lives between reads: nowhere, while it holds nothing.
//!
//! Owns: `ReaderSlot`, which keeps a `FrameReader` boxed only while it holds state between
//! reads (a partial frame, a fragmented message, the phases after a Close), and otherwise
//! nothing.
//! Does not: decode anything (`protocol::decoder`), or decide when to read (`inbound.rs`).
//!
//! Why: a `FrameReader` is about 140 bytes, and on a server with 10,000 idle connections almost
//! all of them are at rest (`FrameReader::is_at_rest`). A fresh reader allocates nothing and is
//! equivalent to one at rest (the decoder's tests check it for every cut of a conversation), so
//! an idle connection keeps 8 bytes here instead (SPEC §2: an idle open connection holds no
//! buffers; docs/architecture.md, "Memory").

use crate::protocol::decoder::FrameReader;
use crate::protocol::frame::Role;

#[derive(Default)]
pub(super) struct ReaderSlot {
    /// The reader, while it holds something between two reads. 8 bytes: the one setting a
    /// fresh reader needs, RSV1, follows from the connection's `deflate` and is passed to
    /// `take`.
    held: Option<Box<FrameReader>>,
}

impl ReaderSlot {
    /// permessage-deflate was negotiated: the held reader, if any, accepts RSV1 from now on;
    /// fresh ones get it from `take`'s `rsv1_allowed` (the connection's `deflate` is set).
    pub(super) fn allow_rsv1(&mut self) {
        if let Some(reader) = self.held.as_mut() {
            reader.allow_rsv1();
        }
    }

    /// The reader to run over the next read: the one held, or a fresh one (which allocates
    /// nothing) accepting RSV1 if `rsv1_allowed` (permessage-deflate was negotiated, RFC 7692).
    /// Give it back with `put`.
    pub(super) fn take(&mut self, max_message: usize, rsv1_allowed: bool) -> FrameReader {
        match self.held.take() {
            Some(reader) => *reader,
            None => {
                let mut reader = FrameReader::new(Role::Server, max_message);
                if rsv1_allowed {
                    reader.allow_rsv1();
                }
                reader
            }
        }
    }

    /// Takes the reader back after a read: kept (boxed) only if it holds something.
    pub(super) fn put(&mut self, reader: FrameReader) {
        self.held = (!reader.is_at_rest()).then(|| Box::new(reader));
    }

    /// Does the connection hold a reader (state between reads)?
    #[cfg(test)]
    pub(super) fn is_held(&self) -> bool {
        self.held.is_some()
    }
}
