//! The one frame reader: received bytes in, WebSocket events (or a protocol error) out.
//!
//! Owns: `FrameReader`, the sans-IO reader that the server, the client and the load generator
//! all use (frame decode, message assembly, the partial tail of a frame that has not fully
//! arrived, and what is still read after a Close); `Input`, the bytes of one read; `OwnedEvent`,
//! an event that owns its bytes (for the client's reader thread); and, in test and fuzzing
//! builds only, `fuzz::check`, the oracle of the `frame_decode` fuzz target.
//! Does not: read sockets, answer Pings, send Closes or inflate compressed messages: the caller
//! decides what each event means for its connection. Frame rules live in `frame`, message rules
//! in `message`; this module only joins them over a byte stream cut anywhere.
//!
//! SPEC §2 (the zero-copy read path), §4, §7; RFC 6455 §5, §5.5.1, §7.1.7.
//!
//! The zero-copy fast path: frames that arrive whole are parsed straight out of the caller's
//! buffer (the reactor's shared 64 KiB receive buffer), unmasked in place, and a one-frame
//! message is handed out as a slice of it. Only the start of a frame that has not fully arrived is
//! copied into the reader (`tail`), with room reserved for the whole frame once its header is
//! known; the next read completes it from the front of the new bytes and goes on parsing the rest
//! in place. After our Close, a frame that is only skipped is not copied at all.
//!
//! The fast path within it: most frames a server receives are one small message each, a whole
//! Text or Binary frame with FIN. While the reader is Open and holds nothing (no partial frame,
//! no fragmented message), `next_event` first tries `frame::decode_simple_data_frame` on the
//! next bytes, which recognises exactly that shape in a few steps and unmasks it, and hands the
//! payload out at once (after the UTF-8 check of a text message). Everything else, and every
//! error, goes through the general path (`next_frame`, the `Assembler`), which gives the same
//! events for those frames too: the tests and the fuzz target check the two against each other.
//! `next_whole_message` offers the fast path alone, for a caller that handles a run of such
//! messages at once (the server hands them to the app in one call).
//!
//! Phases, each entered by one method or event:
//!
//! ```text
//!            await_close()                       peer's Close
//!   Open ────────────────────▶ AwaitingClose ─────────────────▶ Closed
//!    │  peer's Close                                             ▲
//!    └───────────────────────────────────────────────────────────┘
//!   any phase but Closed ── protocol error ──▶ Failed(error)
//! ```
//!
//! - Open: every frame is assembled and reported.
//! - AwaitingClose: we sent our Close (RFC 6455 §5.5.1: the peer may still send until it answers).
//!   Frames are still delimited and checked, so the stream never desyncs, but only the peer's
//!   Close is reported. Every other frame is skipped: not assembled (so fragments cannot add up
//!   to a limit or break UTF-8), not validated as text, and not copied even when it arrives in
//!   pieces (the bytes still to come are counted off the next reads). Its header is still
//!   checked as in Open: a single data frame announcing more than `max_message` fails the
//!   reader, as does any framing error.
//! - Closed: the peer's Close was the last frame it may send; later bytes are consumed unread.
//! - Failed: the error is returned again by every call; input is consumed unread (RFC 6455
//!   §7.1.7: after failing, data from the peer is not processed).

use super::close::CloseCode;
use super::error::ProtocolError;
use super::frame::{self, decode_frame_with, decode_header_with, FrameHeader, OpCode, Role};
use super::message::{completes_event, Assembler, Event};
use std::borrow::Cow;
use std::ops::Range;

/// An `Event` that owns its bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OwnedEvent {
    Message { opcode: OpCode, data: Vec<u8> },
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Close(Option<(CloseCode, String)>),
}

impl From<Event<'_>> for OwnedEvent {
    fn from(event: Event<'_>) -> OwnedEvent {
        match event {
            Event::Message { opcode, data, .. } => OwnedEvent::Message {
                opcode,
                data: data.into_owned(),
            },
            Event::Ping(payload) => OwnedEvent::Ping(payload.to_vec()),
            Event::Pong(payload) => OwnedEvent::Pong(payload.to_vec()),
            Event::Close(frame) => OwnedEvent::Close(frame.map(|f| (f.code, f.reason.to_string()))),
        }
    }
}

/// The bytes of one read, and how far the reader has got through them. Mutable because frames
/// are unmasked in place.
#[derive(Debug)]
pub struct Input<'b> {
    bytes: &'b mut [u8],
    used: usize,
}

impl<'b> Input<'b> {
    pub fn new(bytes: &'b mut [u8]) -> Input<'b> {
        Input { bytes, used: 0 }
    }

    /// Has the reader consumed every byte (parsed, or kept as a partial frame)?
    pub fn is_empty(&self) -> bool {
        self.used >= self.bytes.len()
    }

    fn skip_rest(&mut self) {
        self.used = self.bytes.len();
    }

    /// Appends unread bytes to `out` until it is `len` long or the input is used up.
    fn fill(&mut self, out: &mut Vec<u8>, len: usize) {
        let rest = self.bytes.get(self.used..).unwrap_or_default();
        let n = len.saturating_sub(out.len()).min(rest.len());
        out.extend_from_slice(rest.get(..n).unwrap_or_default());
        self.used += n;
    }
}

/// Where the reader is in the life of the stream (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Open,
    AwaitingClose,
    Closed,
    Failed(ProtocolError),
}

/// Where a whole frame's (already unmasked) payload lies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    /// In the reader's `tail`: the frame began in an earlier read.
    Tail,
    /// In the caller's `Input`.
    Input,
}

/// A whole frame found by `next_frame`, by position, so that no borrow is held while the reader
/// decides what to do with it.
struct Located {
    header: FrameHeader,
    source: Source,
    payload: Range<usize>,
}

/// Reads the frames of one connection, in one direction, across reads cut anywhere.
#[derive(Debug)]
pub struct FrameReader {
    /// Which end we are: decides the masking rule (RFC 6455 §5.1).
    role: Role,
    /// `--max-message` (or the client's bound): no frame or assembled message exceeds it.
    max_message: usize,
    /// An extension giving RSV1 a meaning (permessage-deflate) was negotiated.
    rsv1_allowed: bool,
    assembler: Assembler,
    /// The start of a frame that has not fully arrived. Empty, and unallocated, otherwise.
    tail: Vec<u8>,
    /// The frame in `tail` was handed out by the last `next_event`: free it on the next call.
    tail_consumed: bool,
    /// Bytes still to come of a frame being skipped (AwaitingClose): counted off the next
    /// reads, never copied.
    skip: usize,
    phase: Phase,
    /// Tests and the fuzz target turn the fast path off, to compare it with the general path.
    #[cfg(any(test, fuzzing))]
    general_path_only: bool,
    /// Frames the fast path read, for the tests to see that it was taken.
    #[cfg(test)]
    fast_frames: usize,
}

impl FrameReader {
    /// A reader for the frames that `role` receives, with messages bounded by `max_message`,
    /// and every reserved bit refused (no extension negotiated).
    pub fn new(role: Role, max_message: usize) -> FrameReader {
        FrameReader {
            role,
            max_message,
            rsv1_allowed: false,
            assembler: Assembler::new(max_message),
            tail: Vec::new(),
            tail_consumed: false,
            skip: 0,
            phase: Phase::Open,
            #[cfg(any(test, fuzzing))]
            general_path_only: false,
            #[cfg(test)]
            fast_frames: 0,
        }
    }

    /// permessage-deflate was negotiated (RFC 7692): RSV1 is accepted on the first frame of a
    /// data message, and `Event::Message::compressed` reports it. Still refused on control and
    /// continuation frames. Inflating is the caller's (and UTF-8 checking of compressed text).
    pub fn allow_rsv1(&mut self) {
        self.rsv1_allowed = true;
    }

    /// We sent our Close: from now on frames are delimited and checked but only the peer's Close
    /// is reported (see the module doc). Any message being assembled is dropped. Does nothing
    /// unless the reader is Open.
    pub fn await_close(&mut self) {
        if self.phase == Phase::Open {
            self.phase = Phase::AwaitingClose;
            self.assembler.reset();
        }
    }

    /// Is the reader where `FrameReader::new` (plus `allow_rsv1`, if called) leaves it: Open,
    /// holding no partial frame, no open message, nothing to skip? A caller with many readers
    /// (the server, one per connection) may then drop it and start the next read with a new one
    /// without changing any outcome: that is how an idle connection holds no reader at all
    /// (SPEC §2, docs/architecture.md).
    pub fn is_at_rest(&self) -> bool {
        self.phase == Phase::Open
            && self.tail.capacity() == 0
            && !self.tail_consumed
            && self.skip == 0
            && self.assembler.is_idle()
    }

    /// Has the stream ended for good: the peer's Close was read, or a protocol error? (Callers
    /// learn it from the events and errors themselves; the tests check it here.)
    #[cfg(test)]
    fn is_finished(&self) -> bool {
        matches!(self.phase, Phase::Closed | Phase::Failed(_))
    }

    /// Bytes held between calls: a partial frame and a partial message. Bounded by about twice
    /// `max_message` plus a header once `next_event` has returned `Ok(None)`.
    pub fn buffered_bytes(&self) -> usize {
        let tail = if self.tail_consumed {
            0
        } else {
            self.tail.len()
        };
        tail + self.assembler.buffered_bytes()
    }

    /// The next event in `input` (after any partial frame kept from earlier reads), or
    /// `Ok(None)` once every byte of `input` is consumed: parsed, or kept as the start of a frame
    /// that has not fully arrived. Call until `Ok(None)` (or an error) before the next read.
    ///
    /// The event borrows `input` (a one-frame message is a slice of it) or the reader (a frame
    /// that was completed from its tail); an assembled message is owned.
    ///
    /// # Errors
    /// Any error of `frame::decode_header_with` or `message::Assembler` (`InvalidUtf8` as soon
    /// as a partial text frame shows it). The reader is then Failed: the rest of `input` is not
    /// read, and every later call returns the same error.
    ///
    /// Inlined, and only the fast path (see the module doc) is here: the general path is a
    /// function of its own (`next_event_general`), so that a frame on the fast path does not
    /// pay for setting up the larger function (its saved registers and stack frame).
    #[inline]
    pub fn next_event<'a>(
        &'a mut self,
        input: &'a mut Input<'_>,
    ) -> Result<Option<Event<'a>>, ProtocolError> {
        match self.take_whole_message(input) {
            Some(Ok((opcode, payload))) => Ok(Some(Event::Message {
                opcode,
                data: Cow::Borrowed(input.bytes.get(payload).unwrap_or_default()),
                compressed: false,
            })),
            Some(Err(e)) => Err(e),
            None => self.next_event_general(input),
        }
    }

    /// Whether `next_whole_message` can take the next frame, by its first byte alone (a whole
    /// uncompressed Text or Binary frame, the reader at rest): a cheap look before the server
    /// sets up a run for it. `false` is certain; `true` may still end in `Ok(None)`.
    #[inline]
    pub fn may_take_whole_message(&self, input: &Input<'_>) -> bool {
        self.takes_fast_path() && matches!(input.bytes.get(input.used), Some(0x81 | 0x82))
    }

    /// The fast path alone: the next event if it is a whole one-frame message (Text or Binary,
    /// not compressed) that the fast path takes, as `(opcode, payload)`; `Ok(None)` if the next
    /// frame needs `next_event` (any other frame, or one not fully arrived), or if `input` is
    /// used up. For a caller that handles such messages in a run (the server hands them to the
    /// app in one call) and leaves everything else to `next_event`.
    ///
    /// # Errors
    /// `InvalidUtf8` for a text message that is not UTF-8; the reader is then Failed, as after
    /// the same error from `next_event`.
    #[inline]
    pub fn next_whole_message<'a>(
        &'a mut self,
        input: &'a mut Input<'_>,
    ) -> Result<Option<(OpCode, &'a [u8])>, ProtocolError> {
        match self.take_whole_message(input) {
            Some(Ok((opcode, payload))) => {
                Ok(Some((opcode, input.bytes.get(payload).unwrap_or_default())))
            }
            Some(Err(e)) => Err(e),
            None => Ok(None),
        }
    }

    /// The fast path (see the module doc): if the reader may take it and the next frame has its
    /// shape, the frame is consumed, unmasked and its text checked, and where its payload lies
    /// in `input` is returned. `None`: nothing was consumed, the general path decides. Returns
    /// a position rather than a slice, so that no borrow outlives it on the `None` path.
    #[inline]
    fn take_whole_message(
        &mut self,
        input: &mut Input<'_>,
    ) -> Option<Result<(OpCode, Range<usize>), ProtocolError>> {
        if !self.takes_fast_path() {
            return None;
        }
        let start = input.used;
        let rest = input.bytes.get_mut(start..).unwrap_or_default();
        // Within `max_message`: a longer frame is refused by the general path.
        let frame = frame::decode_simple_data_frame(rest, self.role, self.max_message)?;
        let payload = start + frame.payload.start..start + frame.payload.end;
        // RFC 6455 §8.1: text is valid UTF-8 (checked as `Assembler::single` does).
        if frame.opcode == OpCode::Text {
            let text = input.bytes.get(payload.clone()).unwrap_or_default();
            if std::str::from_utf8(text).is_err() {
                return Some(Err(self.fail(ProtocolError::InvalidUtf8, input)));
            }
        }
        input.used = payload.end;
        #[cfg(test)]
        {
            self.fast_frames += 1;
        }
        Some(Ok((frame.opcode, payload)))
    }

    /// `next_event` for any frame: the fast path's shape too (its oracle in the tests), and
    /// every other frame, partial frame, phase and error.
    fn next_event_general<'a>(
        &'a mut self,
        input: &'a mut Input<'_>,
    ) -> Result<Option<Event<'a>>, ProtocolError> {
        if self.tail_consumed {
            self.release_tail();
        }
        loop {
            match self.phase {
                Phase::Failed(e) => {
                    input.skip_rest();
                    return Err(e);
                }
                Phase::Closed => {
                    input.skip_rest();
                    return Ok(None);
                }
                Phase::Open | Phase::AwaitingClose => {}
            }
            let frame = match self.next_frame(input) {
                Ok(Some(frame)) => frame,
                Ok(None) => return Ok(None),
                Err(e) => return Err(self.fail(e, input)),
            };
            let Located {
                header,
                source,
                payload,
            } = frame;
            if self.phase == Phase::AwaitingClose && header.opcode != OpCode::Close {
                // RFC 6455 §5.5.1: after our Close, frames are read only to find the peer's.
                if source == Source::Tail {
                    self.release_tail();
                }
                continue;
            }
            if !completes_event(&header) {
                // A fragment: assembled, nothing to report yet. Borrowed and released here, so
                // that only the branch below lends the payload to the caller.
                let bytes = match source {
                    Source::Tail => self.tail.get(payload),
                    Source::Input => input.bytes.get(payload),
                };
                let pushed = self
                    .assembler
                    .push_fragment(&header, bytes.unwrap_or_default());
                if let Err(e) = pushed {
                    return Err(self.fail(e, input));
                }
                if source == Source::Tail {
                    self.release_tail();
                }
                continue;
            }
            if header.opcode == OpCode::Close {
                // RFC 6455 §5.5.1: the Close is the last frame the peer sends.
                self.phase = Phase::Closed;
            }
            // The frame in the tail stays until the caller is done with the event.
            self.tail_consumed = source == Source::Tail;
            let bytes = match source {
                Source::Tail => self.tail.get(payload),
                Source::Input => input.bytes.get(payload),
            };
            return match self
                .assembler
                .push_final(&header, bytes.unwrap_or_default())
            {
                Ok(event) => Ok(Some(event)),
                Err(e) => {
                    // `input` and `tail` are lent to the event's type here; the assembler is
                    // not. The tail is freed on the next call (`tail_consumed`); the rest of
                    // `input` is never read (see `# Errors`).
                    self.phase = Phase::Failed(e);
                    self.assembler.reset();
                    Err(e)
                }
            };
        }
    }

    /// May the next frame be tried on the fast path (see the module doc)? Only while Open with
    /// nothing held: no partial frame (nor the last event's frame in `tail`, which the general
    /// path frees), nothing to skip, no fragmented message (a data frame would then be an
    /// error). The whole budget (`max_message`) is then available.
    #[inline]
    fn takes_fast_path(&self) -> bool {
        #[cfg(any(test, fuzzing))]
        if self.general_path_only {
            return false;
        }
        matches!(self.phase, Phase::Open)
            && self.tail.is_empty()
            && self.skip == 0
            && !self.assembler.in_message()
    }

    /// What is left of the message budget: the largest payload the next data frame may carry,
    /// which keeps a partial frame plus the open message within `max_message` (SPEC §4).
    fn budget(&self) -> usize {
        match self.phase {
            Phase::Open => self
                .max_message
                .saturating_sub(self.assembler.buffered_bytes()),
            _ => self.max_message,
        }
    }

    /// The limit the header decoder applies: the budget, but at least what a control frame may
    /// carry (125 bytes), since a Ping may arrive when the budget is nearly used up.
    fn max_payload(&self) -> u64 {
        self.budget().max(frame::MAX_CONTROL_PAYLOAD) as u64
    }

    /// A data frame over the budget (which `max_payload` let through for control frames' sake)
    /// is refused as soon as its header is known, whether the frame arrived whole or not, so
    /// the error never depends on where the reads were cut.
    fn check_budget(&self, header: &FrameHeader) -> Result<(), ProtocolError> {
        if self.phase == Phase::Open
            && !header.opcode.is_control()
            && header.payload_len > self.budget() as u64
        {
            return Err(ProtocolError::MessageTooBig);
        }
        Ok(())
    }

    /// Finds the next whole frame: first the one whose start is in `tail`, then in `input`.
    /// `Ok(None)` means `input` is used up (a partial frame is kept in `tail`, or is being
    /// skipped).
    fn next_frame(&mut self, input: &mut Input<'_>) -> Result<Option<Located>, ProtocolError> {
        if self.skip > 0 {
            let rest = input.bytes.len().saturating_sub(input.used);
            let n = self.skip.min(rest);
            input.used += n;
            self.skip -= n;
            if self.skip > 0 {
                return Ok(None);
            }
        }
        let max_payload = self.max_payload();
        if !self.tail.is_empty() {
            return self.complete_tail(input, max_payload);
        }
        let start = input.used;
        let rest = input.bytes.get_mut(start..).unwrap_or_default();
        match decode_frame_with(rest, self.role, max_payload, self.rsv1_allowed)? {
            Some(frame) => {
                self.check_budget(&frame.header)?;
                input.used += frame.len;
                Ok(Some(Located {
                    header: frame.header,
                    source: Source::Input,
                    payload: start + frame.payload.start..start + frame.payload.end,
                }))
            }
            None => {
                self.keep_tail(input, max_payload)?;
                Ok(None)
            }
        }
    }

    /// Copies the incomplete frame at the end of `input` into `tail`, reserving room for all of
    /// it once its header is known (so the buffer does not double its way there, read by read,
    /// to up to twice the frame's size). A partial text frame is validated as far as it goes.
    /// A frame that will be skipped is not copied: the bytes still to come are counted.
    fn keep_tail(&mut self, input: &mut Input<'_>, max_payload: u64) -> Result<(), ProtocolError> {
        let rest = input.bytes.get(input.used..).unwrap_or_default();
        if rest.is_empty() {
            return Ok(());
        }
        if let Some(header) = decode_header_with(rest, self.role, max_payload, self.rsv1_allowed)? {
            self.check_budget(&header)?;
            if self.skips(&header) {
                self.skip = frame_len(&header)?.saturating_sub(rest.len());
                input.skip_rest();
                return Ok(());
            }
            if self.phase == Phase::Open {
                let prefix = rest.get(header.header_len..).unwrap_or_default();
                self.assembler.check_partial(&header, prefix)?;
            }
            self.tail.reserve_exact(frame_len(&header)?);
        }
        self.tail.extend_from_slice(rest);
        input.skip_rest();
        Ok(())
    }

    /// Completes the frame whose start is in `tail` from the front of `input`, copying no byte
    /// past its end.
    fn complete_tail(
        &mut self,
        input: &mut Input<'_>,
        max_payload: u64,
    ) -> Result<Option<Located>, ProtocolError> {
        let decode =
            |tail: &[u8]| decode_header_with(tail, self.role, max_payload, self.rsv1_allowed);
        let header = match decode(&self.tail)? {
            Some(header) => header,
            None => {
                // Enough for the longest header; what turns out to belong to the next frame is
                // given back below.
                input.fill(&mut self.tail, frame::MAX_HEADER_LEN);
                match decode(&self.tail)? {
                    Some(header) => {
                        let len = frame_len(&header)?;
                        if self.tail.len() > len {
                            input.used = input.used.saturating_sub(self.tail.len() - len);
                            self.tail.truncate(len);
                        }
                        header
                    }
                    // Fewer bytes arrived than the header needs: `input` is used up.
                    None => return Ok(None),
                }
            }
        };
        self.check_budget(&header)?;
        let len = frame_len(&header)?;
        if self.skips(&header) {
            // What arrived of it is dropped, the rest counted off (also for a frame kept while
            // Open, before our Close).
            self.skip = len.saturating_sub(self.tail.len());
            self.release_tail();
            return self.next_frame(input);
        }
        // Once per frame: room for all of it (a no-op if `keep_tail` reserved it).
        self.tail.reserve_exact(len.saturating_sub(self.tail.len()));
        input.fill(&mut self.tail, len);
        if self.tail.len() < len {
            if self.phase == Phase::Open {
                let prefix = self.tail.get(header.header_len..).unwrap_or_default();
                self.assembler.check_partial(&header, prefix)?;
            }
            return Ok(None);
        }
        match decode_frame_with(&mut self.tail, self.role, max_payload, self.rsv1_allowed)? {
            Some(frame) => Ok(Some(Located {
                header: frame.header,
                source: Source::Tail,
                payload: frame.payload,
            })),
            // Not reached: the tail holds the whole frame the header announced.
            None => Ok(None),
        }
    }

    /// Is `header` the start of a frame read only to be skipped: after our Close, anything but
    /// the peer's Close (RFC 6455 §5.5.1)?
    fn skips(&self, header: &FrameHeader) -> bool {
        self.phase == Phase::AwaitingClose && header.opcode != OpCode::Close
    }

    /// Frees the tail (an idle connection holds no buffer, SPEC §2).
    fn release_tail(&mut self) {
        self.tail = Vec::new();
        self.tail_consumed = false;
    }

    /// Enters Failed: frees the buffers and consumes the rest of `input`.
    fn fail(&mut self, error: ProtocolError, input: &mut Input<'_>) -> ProtocolError {
        self.phase = Phase::Failed(error);
        self.assembler.reset();
        self.release_tail();
        self.skip = 0;
        input.skip_rest();
        error
    }
}

/// Bytes the whole frame occupies on the wire.
fn frame_len(header: &FrameHeader) -> Result<usize, ProtocolError> {
    usize::try_from(header.payload_len)
        .ok()
        .and_then(|payload| payload.checked_add(header.header_len))
        .ok_or(ProtocolError::MessageTooBig)
}

/// The invariants the `frame_decode` fuzz target checks (see fuzz/README.md). Compiled only for
/// tests and fuzzing builds (`cargo fuzz` passes `--cfg fuzzing`), never into the shipped library.
#[cfg(any(test, fuzzing))]
#[allow(clippy::panic)] // panicking on a broken invariant is what the fuzzer looks for
pub mod fuzz {
    use super::*;

    /// What a reader reported: each event with its `compressed` flag, and the final error.
    pub type Outcome = (Vec<(OwnedEvent, bool)>, Option<ProtocolError>);

    /// How a reader is set up, from the first input byte.
    #[derive(Clone, Copy, Debug)]
    pub struct Setup {
        pub role: Role,
        pub max_message: usize,
        pub rsv1_allowed: bool,
        /// Call `await_close` after the first event (as the server does after its own Close).
        pub await_close_after_first: bool,
    }

    impl Setup {
        /// Bit 0: role (0 server, 1 client); bit 1: message limit (0: 64 bytes, 1: 1 MiB);
        /// bit 2: RSV1 allowed; bit 3: `await_close` after the first event.
        pub fn from_byte(b: u8) -> Setup {
            Setup {
                role: if b & 1 == 0 {
                    Role::Server
                } else {
                    Role::Client
                },
                // A small limit reaches MessageTooBig; a large one lets long messages through.
                max_message: if b & 2 == 0 { 64 } else { 1 << 20 },
                rsv1_allowed: b & 4 != 0,
                await_close_after_first: b & 8 != 0,
            }
        }
    }

    /// Checks on arbitrary `data`; panics (through `assert!`) when an invariant is broken.
    ///
    /// The first two bytes choose the set-up (`Setup::from_byte`) and the seed of the split
    /// points; the rest is the byte stream. Checked:
    /// 1. nothing panics;
    /// 2. the stream fed in pieces gives the same events and the same final error as fed whole,
    ///    and so does the stream fed whole to a reader without the fast path, and fed in pieces
    ///    to a reader asked for whole messages first (`next_whole_message`, as the server does);
    /// 3. memory stays bounded: what the reader holds between reads is within its limits;
    /// 4. every event, encoded again as a client would send it (masked, a data message split in
    ///    two fragments) and read by a server, comes back the same.
    pub fn check(data: &[u8]) {
        let [setup, seed, stream @ ..] = data else {
            return;
        };
        let setup = Setup::from_byte(*setup);
        let whole = read_all(setup, &[stream]);
        let pieces = split_points(stream, *seed);
        let split = read_all(setup, &pieces);
        assert_eq!(whole, split, "fed whole vs fed in {} pieces", pieces.len());
        let general = read_all_general(setup, &[stream]);
        assert_eq!(whole, general, "with the fast path vs without");
        let runs = read_in_runs(setup, &pieces);
        assert_eq!(whole, runs, "next_event alone vs whole messages first");

        let key = [*seed, 0xA5, 0x5A, seed.wrapping_mul(31)];
        let server = Setup {
            role: Role::Server,
            await_close_after_first: false,
            ..setup
        };
        for event in &whole.0 {
            let mut wire = Vec::new();
            encode_as_client(&mut wire, event, key);
            let again = read_all(server, &[&wire]);
            assert_eq!(again, (vec![event.clone()], None), "re-encoded {event:?}");
        }
    }

    /// Every event a reader gives for `pieces` fed one read at a time, and the error it ended
    /// with.
    pub fn read_all(setup: Setup, pieces: &[&[u8]]) -> Outcome {
        read_with(
            FrameReader::new(setup.role, setup.max_message),
            setup,
            pieces,
            false,
        )
    }

    /// `read_all` with the fast path turned off: the general path alone, the fast path's oracle.
    pub fn read_all_general(setup: Setup, pieces: &[&[u8]]) -> Outcome {
        let mut reader = FrameReader::new(setup.role, setup.max_message);
        reader.general_path_only = true;
        read_with(reader, setup, pieces, false)
    }

    /// `read_all` as the server reads: in each read, the whole one-frame messages in a row
    /// with `next_whole_message`, then one event with `next_event`, and again.
    pub fn read_in_runs(setup: Setup, pieces: &[&[u8]]) -> Outcome {
        let reader = FrameReader::new(setup.role, setup.max_message);
        read_with(reader, setup, pieces, true)
    }

    /// An event read, kept, and whether it was a compressed message.
    fn owned(event: Event<'_>) -> (OwnedEvent, bool) {
        let compressed = matches!(
            event,
            Event::Message {
                compressed: true,
                ..
            }
        );
        (OwnedEvent::from(event), compressed)
    }

    /// The readers above: each piece is one read; with `runs`, the whole one-frame messages
    /// in a row are taken with `next_whole_message` before each `next_event`, as the server
    /// does.
    fn read_with(mut reader: FrameReader, setup: Setup, pieces: &[&[u8]], runs: bool) -> Outcome {
        if setup.rsv1_allowed {
            reader.allow_rsv1();
        }
        let mut events = Vec::new();
        for piece in pieces {
            let mut bytes = piece.to_vec();
            let mut input = Input::new(&mut bytes);
            loop {
                if runs {
                    loop {
                        match reader.next_whole_message(&mut input) {
                            Ok(Some((opcode, data))) => {
                                let data = data.to_vec();
                                events.push((OwnedEvent::Message { opcode, data }, false));
                                if setup.await_close_after_first {
                                    reader.await_close();
                                }
                            }
                            Ok(None) => break,
                            Err(e) => return (events, Some(e)),
                        }
                    }
                }
                match reader.next_event(&mut input) {
                    Ok(Some(event)) => {
                        events.push(owned(event));
                        if setup.await_close_after_first {
                            reader.await_close();
                        }
                    }
                    Ok(None) => break,
                    Err(e) => return (events, Some(e)),
                }
            }
            assert!(input.is_empty(), "Ok(None) with input left");
            // A partial frame is at most a header plus a payload within the limit, and a partial
            // message is within the limit.
            let bound = 2 * (setup.max_message + frame::MAX_HEADER_LEN);
            assert!(reader.buffered_bytes() <= bound, "unbounded buffering");
        }
        (events, None)
    }

    /// Splits `stream` into pieces of 1 to 16 bytes, lengths drawn from a small PRNG seeded with
    /// `seed` (so a fuzz input is reproducible).
    pub fn split_points(stream: &[u8], seed: u8) -> Vec<&[u8]> {
        let mut state = u32::from(seed) | 0x100;
        let mut pieces = Vec::new();
        let mut rest = stream;
        while !rest.is_empty() {
            // xorshift32
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            let len = (state % 16) as usize + 1;
            let (piece, tail) = rest.split_at(len.min(rest.len()));
            pieces.push(piece);
            rest = tail;
        }
        pieces
    }

    /// Encodes `event` the way a client would send it: masked, data messages in two fragments,
    /// RSV1 on the first fragment of a compressed one.
    pub fn encode_as_client(
        out: &mut Vec<u8>,
        (event, compressed): &(OwnedEvent, bool),
        key: [u8; 4],
    ) {
        let mask = Some(key);
        match event {
            OwnedEvent::Message { opcode, data } => {
                let (first, second) = data.split_at(data.len() / 2);
                let start = out.len();
                frame::encode_into(out, false, *opcode, first, mask);
                if *compressed {
                    if let Some(b) = out.get_mut(start) {
                        *b |= 0x40; // RSV1
                    }
                }
                frame::encode_into(out, true, OpCode::Continuation, second, mask);
            }
            OwnedEvent::Ping(p) => frame::encode_into(out, true, OpCode::Ping, p, mask),
            OwnedEvent::Pong(p) => frame::encode_into(out, true, OpCode::Pong, p, mask),
            OwnedEvent::Close(close) => {
                let payload = match close {
                    Some((code, reason)) => frame::close_payload(*code, reason),
                    None => Vec::new(),
                };
                frame::encode_into(out, true, OpCode::Close, &payload, mask);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::panic)]
mod tests {
    use super::fuzz::{
        check as fuzz_check, read_all, read_all_general, read_in_runs, Outcome, Setup,
    };
    use super::*;
    use proptest::prelude::*;
    use std::borrow::Cow;

    const MAX: usize = 1 << 20;
    const KEY: Option<[u8; 4]> = Some([0x11, 0x22, 0x33, 0x44]);

    fn server() -> Setup {
        Setup {
            role: Role::Server,
            max_message: MAX,
            rsv1_allowed: false,
            await_close_after_first: false,
        }
    }

    fn client() -> Setup {
        Setup {
            role: Role::Client,
            ..server()
        }
    }

    fn msg(opcode: OpCode, data: &[u8]) -> (OwnedEvent, bool) {
        let data = data.to_vec();
        (OwnedEvent::Message { opcode, data }, false)
    }

    fn plain(event: OwnedEvent) -> (OwnedEvent, bool) {
        (event, false)
    }

    /// A small conversation as a client sends it: a fragmented text with a ping between its
    /// fragments (and a character split across them), a one-frame binary, a pong, a close.
    fn conversation() -> (Vec<u8>, Vec<(OwnedEvent, bool)>) {
        let mut wire = Vec::new();
        frame::encode_into(&mut wire, false, OpCode::Text, b"h\xC3", KEY);
        frame::encode_into(&mut wire, true, OpCode::Ping, b"p", KEY);
        frame::encode_into(&mut wire, true, OpCode::Continuation, b"\xA9!", KEY);
        frame::encode_into(&mut wire, true, OpCode::Binary, &[1, 2, 3], KEY);
        frame::encode_into(&mut wire, true, OpCode::Pong, b"", KEY);
        let close = frame::close_payload(CloseCode::NORMAL, "done");
        frame::encode_into(&mut wire, true, OpCode::Close, &close, KEY);
        let events = vec![
            plain(OwnedEvent::Ping(b"p".to_vec())),
            msg(OpCode::Text, "hé!".as_bytes()),
            msg(OpCode::Binary, &[1, 2, 3]),
            plain(OwnedEvent::Pong(vec![])),
            plain(OwnedEvent::Close(Some((
                CloseCode::NORMAL,
                "done".to_string(),
            )))),
        ];
        (wire, events)
    }

    /// Reads `pieces` in turn, with one reader for the whole stream or (`renew`) with a new
    /// reader for every read that starts while the previous one is at rest, as the server does
    /// (`server::reader_slot`). Returns the events, the error if any, and how many reads
    /// started with a new reader.
    fn read_renewing(
        pieces: &[&[u8]],
        renew: bool,
    ) -> (Vec<OwnedEvent>, Option<ProtocolError>, usize) {
        let mut reader = FrameReader::new(Role::Server, MAX);
        let (mut events, mut renewed) = (Vec::new(), 0);
        for piece in pieces {
            if renew && reader.is_at_rest() {
                reader = FrameReader::new(Role::Server, MAX);
                renewed += 1;
            }
            let mut bytes = piece.to_vec();
            let mut input = Input::new(&mut bytes);
            loop {
                match reader.next_event(&mut input) {
                    Ok(Some(event)) => events.push(OwnedEvent::from(event)),
                    Ok(None) => break,
                    Err(e) => return (events, Some(e), renewed),
                }
            }
        }
        (events, None, renewed)
    }

    #[test]
    fn a_reader_at_rest_can_be_replaced_by_a_new_one() {
        let (wire, _) = conversation();
        assert!(FrameReader::new(Role::Server, MAX).is_at_rest());
        let one_byte: Vec<&[u8]> = wire.chunks(1).collect();
        let mut cuts: Vec<Vec<&[u8]>> = vec![one_byte];
        for i in 0..=wire.len() {
            for j in i..=wire.len() {
                cuts.push(vec![&wire[..i], &wire[i..j], &wire[j..]]);
            }
        }
        let mut renewed_somewhere = false;
        for pieces in &cuts {
            let (events, error, _) = read_renewing(pieces, false);
            let (renewed_events, renewed_error, renewed) = read_renewing(pieces, true);
            assert_eq!(
                renewed_events,
                events,
                "cut {:?}",
                pieces.iter().map(|p| p.len()).collect::<Vec<_>>()
            );
            assert_eq!(renewed_error, error);
            renewed_somewhere |= renewed > 1;
        }
        assert!(renewed_somewhere, "some cut must fall between frames");
        // Mid-frame, mid-message and after our Close the reader holds state: never at rest.
        let mut reader = FrameReader::new(Role::Server, MAX);
        let mut first = wire[..3].to_vec();
        assert_eq!(reader.next_event(&mut Input::new(&mut first)), Ok(None));
        assert!(!reader.is_at_rest(), "a partial frame is held");
        let mut fragment = Vec::new();
        frame::encode_into(&mut fragment, false, OpCode::Binary, b"ab", KEY);
        let mut reader = FrameReader::new(Role::Server, MAX);
        assert_eq!(reader.next_event(&mut Input::new(&mut fragment)), Ok(None));
        assert!(!reader.is_at_rest(), "a fragmented message is open");
        let mut reader = FrameReader::new(Role::Server, MAX);
        reader.await_close();
        assert!(!reader.is_at_rest(), "awaiting the peer's Close");
    }

    /// `pieces` read one by one give `want`, with the fast path and without it, and read as
    /// the server does (whole messages in runs, then `next_event`).
    fn check(name: &str, setup: Setup, pieces: &[&[u8]], want: &Outcome) {
        assert_eq!(&read_all(setup, pieces), want, "{name}");
        let general = read_all_general(setup, pieces);
        assert_eq!(&general, want, "{name}, general path");
        assert_eq!(&read_in_runs(setup, pieces), want, "{name}, in runs");
    }

    /// Reads `wire` in one read; returns the outcome and how many frames the fast path took.
    fn read_counting(setup: Setup, wire: &[u8]) -> (Outcome, usize) {
        let mut reader = FrameReader::new(setup.role, setup.max_message);
        let mut bytes = wire.to_vec();
        let mut input = Input::new(&mut bytes);
        let mut events = Vec::new();
        loop {
            match reader.next_event(&mut input) {
                Ok(Some(event)) => events.push((OwnedEvent::from(event), false)),
                Ok(None) => return ((events, None), reader.fast_frames),
                Err(e) => return ((events, Some(e)), reader.fast_frames),
            }
        }
    }

    /// The fast path takes whole one-frame Text and Binary messages of every length with a 7-
    /// or 16-bit length field (125, 126 and 65,535 bytes at the edges), in both roles, with
    /// control frames and a fragmented message between them (which it leaves to the general
    /// path, as it does a 64-bit length, 65,536 bytes); the events are the same either way
    /// and at every cut of the stream into two reads (a frame split across reads is completed
    /// by the general path, and the next whole one is fast again).
    #[test]
    fn the_fast_path_takes_whole_simple_frames_and_agrees_with_the_general_path() {
        for len in [0usize, 1, 125, 126, 127, 1000, 65535, 65536] {
            for (setup, mask) in [(server(), KEY), (client(), None)] {
                let data: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
                let mut wire = Vec::new();
                frame::encode_into(&mut wire, true, OpCode::Text, &data, mask);
                frame::encode_into(&mut wire, true, OpCode::Ping, b"p", mask);
                frame::encode_into(&mut wire, true, OpCode::Binary, &data, mask);
                frame::encode_into(&mut wire, false, OpCode::Binary, b"fr", mask);
                frame::encode_into(&mut wire, true, OpCode::Pong, b"", mask);
                frame::encode_into(&mut wire, true, OpCode::Continuation, b"ag", mask);
                frame::encode_into(&mut wire, true, OpCode::Text, &data, mask);
                let events = vec![
                    msg(OpCode::Text, &data),
                    plain(OwnedEvent::Ping(b"p".to_vec())),
                    msg(OpCode::Binary, &data),
                    plain(OwnedEvent::Pong(vec![])),
                    msg(OpCode::Binary, b"frag"),
                    msg(OpCode::Text, &data),
                ];
                let want = (events, None);
                let (outcome, fast) = read_counting(setup, &wire);
                assert_eq!(outcome, want, "{len}");
                let expected_fast = if len < 65536 { 3 } else { 0 };
                assert_eq!(fast, expected_fast, "frames on the fast path, {len}");
                let step = if len > 200 { 997 } else { 1 };
                for cut in (0..=wire.len()).step_by(step) {
                    let pieces: &[&[u8]] = &[&wire[..cut], &wire[cut..]];
                    check(&format!("{len} cut at {cut}"), setup, pieces, &want);
                }
            }
        }
    }

    /// What the fast path must not accept is refused as the general path refuses it, with
    /// the same error (and so close code), after the same events.
    #[test]
    fn the_fast_path_refuses_nothing_the_general_path_would_take() {
        let small = Setup {
            max_message: 64,
            ..server()
        };
        let mut fragment = frame::encode(false, OpCode::Text, b"a", KEY);
        fragment.extend(frame::encode(true, OpCode::Binary, b"b", KEY));
        #[rustfmt::skip]
        let cases: Vec<(&str, Setup, Vec<u8>, ProtocolError, u16)> = vec![
            ("invalid UTF-8", server(), frame::encode(true, OpCode::Text, b"\xC3(", KEY), ProtocolError::InvalidUtf8, 1007),
            ("unmasked client frame", server(), frame::encode(true, OpCode::Binary, b"x", None), ProtocolError::UnmaskedFrame, 1002),
            ("masked server frame", client(), frame::encode(true, OpCode::Binary, b"x", KEY), ProtocolError::MaskedFrame, 1002),
            ("over max_message", small, frame::encode(true, OpCode::Binary, &[7; 65], KEY), ProtocolError::MessageTooBig, 1009),
            ("RSV1 not negotiated", server(), with_rsv1(frame::encode(true, OpCode::Text, b"x", KEY)), ProtocolError::ReservedBits, 1002),
            ("data frame inside a fragmented message", server(), fragment, ProtocolError::InterleavedMessage, 1002),
        ];
        for (name, setup, bad, error, code) in cases {
            // A good frame before the bad one and after it, as the role receives them.
            let mask = if setup.role == Role::Server {
                KEY
            } else {
                None
            };
            let ok = frame::encode(true, OpCode::Binary, b"ok", mask);
            let wire = [ok.clone(), bad, ok].concat();
            let want = (vec![msg(OpCode::Binary, b"ok")], Some(error));
            let (outcome, _) = read_counting(setup, &wire);
            assert_eq!(outcome, want, "{name}");
            assert_eq!(error.close_code().0, code, "{name}");
            check(name, setup, &[&wire], &want);
        }
        // The edge of the limit: exactly `max_message` is taken, on the fast path.
        let at_limit = frame::encode(true, OpCode::Binary, &[7; 64], KEY);
        let (outcome, fast) = read_counting(small, &at_limit);
        assert_eq!(outcome, (vec![msg(OpCode::Binary, &[7; 64])], None));
        assert_eq!(fast, 1);
    }

    /// Every way of cutting `wire` into two or three reads gives `want`; so does one byte per
    /// read.
    fn check_every_split(setup: Setup, wire: &[u8], want: &Outcome) {
        let n = wire.len();
        for i in 0..=n {
            check(
                &format!("split {i}"),
                setup,
                &[&wire[..i], &wire[i..]],
                want,
            );
            for j in i..=n {
                let pieces: &[&[u8]] = &[&wire[..i], &wire[i..j], &wire[j..]];
                check(&format!("split {i},{j}"), setup, pieces, want);
            }
        }
        let bytes: Vec<&[u8]> = wire.chunks(1).collect();
        check("byte by byte", setup, &bytes, want);
    }

    #[test]
    fn whole_conversation() {
        let (wire, events) = conversation();
        check("whole", server(), &[&wire], &(events, None));
    }

    #[test]
    fn same_events_at_every_split_point_and_every_pair() {
        let (wire, events) = conversation();
        check_every_split(server(), &wire, &(events, None));
    }

    #[test]
    fn a_frame_that_arrived_whole_is_read_in_place() {
        let mut wire = frame::encode(true, OpCode::Binary, b"zero-copy", KEY);
        let range = wire.as_ptr_range();
        let mut reader = FrameReader::new(Role::Server, MAX);
        let mut input = Input::new(&mut wire);
        match reader.next_event(&mut input) {
            Ok(Some(Event::Message {
                data: Cow::Borrowed(data),
                ..
            })) => {
                assert_eq!(data, b"zero-copy");
                assert!(range.contains(&data.as_ptr()), "not a slice of the input");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(reader.next_event(&mut input), Ok(None));
        assert_eq!(reader.tail.capacity(), 0, "nothing copied");
    }

    #[test]
    fn only_the_partial_tail_is_copied_and_it_is_released_after_use() {
        let first = frame::encode(true, OpCode::Text, b"one", KEY);
        let second = frame::encode(true, OpCode::Text, &[b'x'; 300], KEY);
        let mut read1 = first.clone();
        read1.extend_from_slice(&second[..10]);
        let mut read2 = second[10..].to_vec();
        read2.extend_from_slice(&first);

        let mut reader = FrameReader::new(Role::Server, MAX);
        let mut input = Input::new(&mut read1);
        assert!(matches!(reader.next_event(&mut input), Ok(Some(_))));
        assert_eq!(reader.next_event(&mut input), Ok(None));
        assert_eq!(reader.buffered_bytes(), 10, "the tail and nothing else");
        assert!(
            reader.tail.capacity() >= second.len(),
            "room for the whole frame reserved once"
        );

        let mut input = Input::new(&mut read2);
        match reader.next_event(&mut input) {
            Ok(Some(Event::Message { data, .. })) => assert_eq!(&data[..], &[b'x'; 300][..]),
            other => panic!("{other:?}"),
        }
        match reader.next_event(&mut input) {
            Ok(Some(Event::Message { data, .. })) => assert_eq!(&data[..], b"one"),
            other => panic!("{other:?}"),
        }
        assert_eq!(reader.next_event(&mut input), Ok(None));
        assert_eq!(reader.buffered_bytes(), 0);
        assert_eq!(reader.tail.capacity(), 0, "an idle reader holds no buffer");
    }

    #[test]
    fn a_header_completed_from_the_next_read_takes_no_byte_of_the_frame_after() {
        // A 6-byte empty Ping cut after its first byte, then a Text right behind it: copying
        // "the longest header" (14 bytes) into the tail must give back the Text's bytes.
        let ping = frame::encode(true, OpCode::Ping, b"", KEY);
        let text = frame::encode(true, OpCode::Text, b"after", KEY);
        let mut second = ping[1..].to_vec();
        second.extend_from_slice(&text);
        let want = (
            vec![plain(OwnedEvent::Ping(vec![])), msg(OpCode::Text, b"after")],
            None,
        );
        check("give back", server(), &[&ping[..1], &second], &want);
    }

    #[test]
    fn errors_are_sticky_and_close_ends_the_stream() {
        let mut reader = FrameReader::new(Role::Server, MAX);
        let mut bytes = vec![0x81, 0x05]; // unmasked frame to a server
        let mut input = Input::new(&mut bytes);
        assert_eq!(
            reader.next_event(&mut input),
            Err(ProtocolError::UnmaskedFrame)
        );
        assert!(input.is_empty(), "a failed reader consumes the rest");
        let mut ping = frame::encode(true, OpCode::Ping, b"", KEY);
        let mut input = Input::new(&mut ping);
        assert_eq!(
            reader.next_event(&mut input),
            Err(ProtocolError::UnmaskedFrame)
        );
        assert!(reader.is_finished());

        let mut wire = frame::encode(true, OpCode::Close, &[], None);
        wire.extend_from_slice(&frame::encode(true, OpCode::Text, b"after", None));
        let want = (vec![plain(OwnedEvent::Close(None))], None);
        check_every_split(client(), &wire, &want);
    }

    #[test]
    fn events_before_an_error_are_delivered() {
        let mut wire = frame::encode(true, OpCode::Text, b"ok", None);
        wire.extend_from_slice(&frame::encode(true, OpCode::Continuation, b"", None));
        let want = (
            vec![msg(OpCode::Text, b"ok")],
            Some(ProtocolError::StrayContinuation),
        );
        check_every_split(client(), &wire, &want);
    }

    #[test]
    fn too_big_is_refused_from_the_header() {
        let setup = Setup {
            max_message: 10,
            ..client()
        };
        // Announces 4096 bytes, sends none.
        let want = (vec![], Some(ProtocolError::MessageTooBig));
        check("too big", setup, &[&[0x82, 0x7E, 0x10, 0x00]], &want);

        // Below the 125 bytes the header decoder lets through for control frames, but over a
        // 64-byte limit, and not UTF-8: too big however the reads are cut (found by proptest;
        // fed in pieces, the partial UTF-8 check used to answer first).
        let setup = Setup {
            max_message: 64,
            ..server()
        };
        let wire = frame::encode(true, OpCode::Text, &[0xFF; 100], KEY);
        check_every_split(setup, &wire, &want);
        // The same for a continuation that takes an open message over the limit.
        let mut wire = frame::encode(false, OpCode::Text, &[b'a'; 40], KEY);
        frame::encode_into(&mut wire, true, OpCode::Continuation, &[0xFF; 30], KEY);
        check_every_split(setup, &wire, &want);
    }

    #[test]
    fn invalid_text_fails_before_the_frame_completes() {
        let mut payload = b"ok".to_vec();
        payload.push(0xFF);
        payload.resize(1000, b'a');
        let wire = frame::encode(true, OpCode::Text, &payload, KEY);
        // Only the header (8 bytes) and the first three payload bytes arrive.
        let want = (vec![], Some(ProtocolError::InvalidUtf8));
        check("partial", server(), &[&wire[..11]], &want);
        check(
            "partial, in two",
            server(),
            &[&wire[..4], &wire[4..11]],
            &want,
        );
        check("valid so far", server(), &[&wire[..10]], &(vec![], None));
    }

    /// SPEC §2 with RFC 6455 §5.5.1: after our Close, the peer's frames are still delimited
    /// (so a Close behind them is found wherever the reads are cut) but not reported; data is
    /// not assembled, so a message that would now be too big or not UTF-8 is no error.
    #[test]
    fn after_our_close_frames_are_skipped_until_the_peers_close() {
        let mut wire = frame::encode(true, OpCode::Text, b"first", KEY);
        frame::encode_into(&mut wire, false, OpCode::Text, b"\xFF not utf-8", KEY);
        frame::encode_into(&mut wire, true, OpCode::Ping, b"p", KEY);
        frame::encode_into(&mut wire, true, OpCode::Continuation, &[b'x'; 100], KEY);
        frame::encode_into(&mut wire, true, OpCode::Binary, &[b'y'; 60], KEY);
        let close = frame::close_payload(CloseCode::NORMAL, "");
        frame::encode_into(&mut wire, true, OpCode::Close, &close, KEY);
        frame::encode_into(&mut wire, true, OpCode::Text, b"after the close", KEY);
        let setup = Setup {
            max_message: 64,
            await_close_after_first: true,
            ..server()
        };
        let want = (
            vec![
                msg(OpCode::Text, b"first"),
                plain(OwnedEvent::Close(Some((CloseCode::NORMAL, String::new())))),
            ],
            None,
        );
        check_every_split(setup, &wire, &want);

        // A frame that breaks the framing rules still fails the reader.
        let mut broken = frame::encode(true, OpCode::Text, b"first", KEY);
        broken.extend_from_slice(&[0x81, 0x05]); // unmasked
        let want = (
            vec![msg(OpCode::Text, b"first")],
            Some(ProtocolError::UnmaskedFrame),
        );
        check_every_split(setup, &broken, &want);
    }

    /// After our Close, a frame to skip is counted off the reads, never copied: wherever the
    /// reads are cut inside it (its header included), the reader holds no buffer afterwards, and
    /// the frames behind it are found. Also for a frame whose start was kept while Open.
    #[test]
    fn a_skipped_frame_is_counted_not_copied_at_every_split_point() {
        let big = frame::encode(true, OpCode::Binary, &[b'z'; 3000], KEY);
        let header_len = big.len() - 3000;
        let mut after = frame::encode(true, OpCode::Ping, b"p", KEY);
        let close = frame::close_payload(CloseCode::NORMAL, "bye");
        frame::encode_into(&mut after, true, OpCode::Close, &close, KEY);
        let closed = plain(OwnedEvent::Close(Some((CloseCode::NORMAL, "bye".into()))));

        for start_open in [false, true] {
            // Every cut of the big frame: `start_open` keeps its start while Open (our Close is
            // decided between the two reads), else our Close comes before any of it.
            for cut in 0..big.len() {
                let mut reader = FrameReader::new(Role::Server, MAX);
                if !start_open {
                    reader.await_close();
                }
                let mut first = big[..cut].to_vec();
                let mut input = Input::new(&mut first);
                assert_eq!(reader.next_event(&mut input), Ok(None), "cut {cut}");
                if start_open {
                    reader.await_close();
                } else if cut < header_len {
                    // A header cut short is kept: it is needed to know the frame's length.
                    assert!(reader.tail.capacity() <= frame::MAX_HEADER_LEN, "cut {cut}");
                } else {
                    assert_eq!(reader.tail.capacity(), 0, "cut {cut}: nothing copied");
                }
                let mut second = big[cut..].to_vec();
                second.extend_from_slice(&after);
                let mut input = Input::new(&mut second);
                let event = reader
                    .next_event(&mut input)
                    .map(|e| e.map(OwnedEvent::from));
                assert_eq!(event, Ok(Some(closed.0.clone())), "cut {cut}");
                assert_eq!(reader.next_event(&mut input), Ok(None));
                assert_eq!(reader.tail.capacity(), 0, "cut {cut}: no buffer left");
                assert_eq!(reader.skip, 0);
            }
        }

        // Cut into three reads anywhere in a small one, the same: only the Close is reported.
        let mut wire = frame::encode(true, OpCode::Text, &[b'a'; 200], KEY);
        wire.extend_from_slice(&after);
        let setup = Setup {
            await_close_after_first: true,
            ..server()
        };
        let mut with_first = frame::encode(true, OpCode::Text, b"first", KEY);
        with_first.extend_from_slice(&wire);
        let want = (vec![msg(OpCode::Text, b"first"), closed], None);
        check_every_split(setup, &with_first, &want);
    }

    fn with_rsv1(mut frame: Vec<u8>) -> Vec<u8> {
        frame[0] |= 0x40;
        frame
    }

    /// The seam for permessage-deflate (RFC 7692 §6): RSV1 is refused unless allowed, and then
    /// only accepted on the first frame of a data message, which is reported compressed (and not
    /// UTF-8 checked: its bytes are deflated).
    #[test]
    fn rsv1_only_when_allowed_and_only_on_a_first_data_frame() {
        let compressed_text = with_rsv1(frame::encode(true, OpCode::Text, b"\xFF\x00", KEY));
        let off = (vec![], Some(ProtocolError::ReservedBits));
        check("default off", server(), &[&compressed_text], &off);

        let on = Setup {
            rsv1_allowed: true,
            ..server()
        };
        let text = (
            OwnedEvent::Message {
                opcode: OpCode::Text,
                data: vec![0xFF, 0x00],
            },
            true,
        );
        check_every_split(on, &compressed_text, &(vec![text], None));

        let mut fragmented = with_rsv1(frame::encode(false, OpCode::Binary, b"ab", KEY));
        frame::encode_into(&mut fragmented, true, OpCode::Continuation, b"c", KEY);
        frame::encode_into(&mut fragmented, true, OpCode::Binary, b"plain", KEY);
        let want = (
            vec![
                (
                    OwnedEvent::Message {
                        opcode: OpCode::Binary,
                        data: b"abc".to_vec(),
                    },
                    true,
                ),
                msg(OpCode::Binary, b"plain"),
            ],
            None,
        );
        check_every_split(on, &fragmented, &want);

        let mut on_continuation = frame::encode(false, OpCode::Text, b"a", KEY);
        on_continuation.extend(with_rsv1(frame::encode(
            true,
            OpCode::Continuation,
            b"b",
            KEY,
        )));
        let on_ping = with_rsv1(frame::encode(true, OpCode::Ping, b"", KEY));
        let refused = (vec![], Some(ProtocolError::ReservedBits));
        check("continuation", on, &[&on_continuation], &refused);
        check("ping", on, &[&on_ping], &refused);
        let rsv2 = {
            let mut f = frame::encode(true, OpCode::Text, b"", KEY);
            f[0] |= 0x20;
            f
        };
        check("RSV2", on, &[&rsv2], &refused);
    }

    #[test]
    fn fuzz_check_accepts_hand_made_inputs() {
        let (wire, _) = conversation();
        for setup in 0..16u8 {
            for seed in [0u8, 1, 7, 200] {
                let mut data = vec![setup, seed];
                data.extend_from_slice(&wire);
                fuzz_check(&data);
            }
        }
        fuzz_check(&[]);
        fuzz_check(&[0]);
        fuzz_check(&[1, 2, 0x81, 0x05, b'h', b'e', b'l', b'l', b'o']);
        fuzz_check(&[5, 2, 0xC1, 0x02, 0xFF, 0xFE]);
    }

    /// Replays the checked-in fuzz corpus (fuzz/corpus/frame_decode) so that CI checks it on
    /// stable, without cargo-fuzz.
    #[test]
    fn fuzz_corpus_replays() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/frame_decode");
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) => panic!("{}: {e}", dir.display()),
        };
        let mut replayed = 0;
        for entry in entries {
            let path = match entry {
                Ok(entry) => entry.path(),
                Err(e) => panic!("{e}"),
            };
            match std::fs::read(&path) {
                Ok(data) => fuzz_check(&data),
                Err(e) => panic!("{}: {e}", path.display()),
            }
            replayed += 1;
        }
        assert!(replayed > 0, "no corpus files in {}", dir.display());
    }

    fn random_events() -> impl Strategy<Value = Vec<(bool, OpCode, Vec<u8>)>> {
        let frame = prop_oneof![
            (
                Just(OpCode::Text),
                any::<String>().prop_map(String::into_bytes)
            ),
            (
                Just(OpCode::Binary),
                proptest::collection::vec(any::<u8>(), 0..200)
            ),
            (
                Just(OpCode::Ping),
                proptest::collection::vec(any::<u8>(), 0..10)
            ),
        ];
        proptest::collection::vec((any::<bool>(), frame), 0..6).prop_map(|frames| {
            frames
                .into_iter()
                .map(|(split, (opcode, data))| (split, opcode, data))
                .collect()
        })
    }

    proptest! {
        #[test]
        fn random_splits_give_the_same_events(
            messages in random_events(),
            cuts in proptest::collection::vec(any::<usize>(), 0..8),
            key in any::<[u8; 4]>(),
        ) {
            // Data messages go in two fragments when `fragment` is set.
            let mut wire = Vec::new();
            let mut want = Vec::new();
            for (fragment, opcode, data) in &messages {
                if *fragment && !opcode.is_control() {
                    let (a, b) = data.split_at(data.len() / 2);
                    frame::encode_into(&mut wire, false, *opcode, a, Some(key));
                    frame::encode_into(&mut wire, true, OpCode::Continuation, b, Some(key));
                } else {
                    frame::encode_into(&mut wire, true, *opcode, data, Some(key));
                }
                want.push(match opcode {
                    OpCode::Ping => plain(OwnedEvent::Ping(data.clone())),
                    _ => msg(*opcode, data),
                });
            }
            let mut points: Vec<usize> = cuts.iter().map(|c| c % (wire.len() + 1)).collect();
            points.sort_unstable();
            let mut pieces: Vec<&[u8]> = Vec::new();
            let mut start = 0;
            for p in points {
                pieces.push(&wire[start..p]);
                start = p;
            }
            pieces.push(&wire[start..]);
            prop_assert_eq!(read_all(server(), &pieces), (want, None));
        }

        /// Random bytes rarely get past the first header; streams of well-formed frames with
        /// random first bytes (any opcode, FIN and RSV bits), masks and payloads reach the
        /// assembler, the limits, the phases and the partial UTF-8 check.
        #[test]
        fn fuzz_check_holds_on_frame_like_streams(
            setup in any::<u8>(),
            seed in any::<u8>(),
            frames in proptest::collection::vec(
                (any::<u8>(), any::<bool>(), proptest::collection::vec(any::<u8>(), 0..140)),
                0..8,
            ),
        ) {
            let mut data = vec![setup, seed];
            for (first, masked, payload) in &frames {
                let header = FrameHeader::new(true, OpCode::Binary, None, payload.len() as u64);
                let start = data.len();
                header.emit(&mut data);
                data[start] = *first;
                if *masked {
                    data[start + 1] |= 0x80;
                    data.extend_from_slice(&[seed, 1, 2, 3]);
                }
                data.extend_from_slice(payload);
            }
            fuzz_check(&data);
        }

        #[test]
        fn fuzz_check_holds_on_random_bytes(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            fuzz_check(&data);
        }
    }
}
