//! Message assembly: turns decoded frames into messages, pings, pongs and closes.
//!
//! Owns: `Assembler`, which joins fragments into messages (with the `--max-message` limit and
//! incremental UTF-8 validation of text), and the parsing of Close payloads.
//! Does not: decode frame headers or unmask (`frame.rs`), answer pings or send closes (the
//! reactor decides; this module only reports what arrived).
//!
//! SPEC §4; RFC 6455 §5.4 (fragmentation), §5.5 (control frames), §5.5.1 (Close), §5.6 and §8.1
//! (text is UTF-8).
//!
//! Invariants:
//! - At most one fragmented message is open at a time (`open`), and only it owns a heap buffer:
//!   an idle connection's assembler allocates nothing (SPEC §2, memory).
//! - `open.data.len() <= max_message`: the limit is checked before bytes are appended.
//! - While an open message is Text, `utf8` has seen exactly its bytes so far.

use std::borrow::Cow;

use super::close::CloseCode;
use super::error::ProtocolError;
use super::frame::{FrameHeader, OpCode, MAX_CONTROL_PAYLOAD};
use super::utf8::Utf8Validator;

/// A received Close frame with a status code (RFC 6455 §5.5.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CloseFrame<'a> {
    /// A code the peer may send (`CloseCode::is_valid_received`).
    pub code: CloseCode,
    /// The UTF-8 reason after the code, possibly empty.
    pub reason: &'a str,
}

/// What one frame completed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// A whole data message. `opcode` is `Text` or `Binary`. `data` borrows the frame's payload
    /// when the message was a single frame, and owns the assembled bytes when it came in
    /// fragments. `compressed` is the RSV1 bit of its first frame (RFC 7692 §6): then `data` is
    /// still deflated, and a Text message's UTF-8 is checked by whoever inflates it; otherwise
    /// Text `data` is valid UTF-8.
    Message {
        opcode: OpCode,
        data: Cow<'a, [u8]>,
        compressed: bool,
    },
    /// A Ping; RFC 6455 §5.5.2 says to answer with a Pong carrying the same payload.
    Ping(&'a [u8]),
    /// A Pong (an answer, or an unsolicited heartbeat to ignore; RFC 6455 §5.5.3).
    Pong(&'a [u8]),
    /// A Close; `None` when its payload was empty (no status code).
    Close(Option<CloseFrame<'a>>),
}

/// A fragmented message that has started and not yet finished.
#[derive(Debug)]
struct OpenMessage {
    opcode: OpCode,
    data: Vec<u8>,
    /// RSV1 of the first frame: the bytes are deflated, so UTF-8 cannot be checked here.
    compressed: bool,
}

impl OpenMessage {
    /// Text whose bytes are the message itself (not deflated), so UTF-8 is checked as it comes.
    fn checks_utf8(&self) -> bool {
        self.opcode == OpCode::Text && !self.compressed
    }
}

/// How far the payload of a text frame that has not fully arrived has been validated.
#[derive(Debug)]
struct PartialText {
    /// Validator state after the checked bytes (continuing the open message's, for a
    /// continuation frame).
    utf8: Utf8Validator,
    /// Payload bytes of the incomplete frame validated so far.
    checked: usize,
}

/// Assembles messages from the frames of one connection, in order.
#[derive(Debug)]
pub struct Assembler {
    max_message: usize,
    open: Option<OpenMessage>,
    utf8: Utf8Validator,
    /// Validation of a text frame still arriving (see `check_partial`); cleared by `push`.
    partial: Option<PartialText>,
}

impl Assembler {
    /// An assembler that refuses messages above `max_message` bytes (SPEC §4 `--max-message`).
    pub fn new(max_message: usize) -> Assembler {
        Assembler {
            max_message,
            open: None,
            utf8: Utf8Validator::default(),
            partial: None,
        }
    }

    /// Feeds one decoded, already unmasked frame; `payload` is its whole payload.
    ///
    /// Returns `Ok(None)` for a fragment that does not end its message, otherwise the event the
    /// frame completes. Control frames may arrive between the fragments of a message (RFC 6455
    /// §5.4) and are reported at once. The same as `push_fragment` for a frame that
    /// `completes_event` says does not complete one, and `push_final` for the others.
    ///
    /// # Errors
    /// - `StrayContinuation`: a continuation frame with no fragmented message open;
    /// - `InterleavedMessage`: a Text or Binary frame while a fragmented message is open;
    /// - `InvalidUtf8`: text that is not UTF-8, reported at the first fragment that shows it;
    ///   or a Close reason that is not UTF-8;
    /// - `MessageTooBig`: the message grows above `max_message`;
    /// - `CloseTooShort`: a Close payload of one byte;
    /// - `InvalidCloseCode`: a Close code a peer may not send;
    /// - `FragmentedControl`, `ControlTooLong`: a control frame that `decode_header` would have
    ///   refused (checked again because headers may be built by other code).
    ///
    /// After an error the connection is failing: the open message is dropped, and the assembler
    /// should not be fed again (or `reset` first).
    pub fn push<'p>(
        &mut self,
        header: &FrameHeader,
        payload: &'p [u8],
    ) -> Result<Option<Event<'p>>, ProtocolError> {
        if completes_event(header) {
            self.push_final(header, payload).map(Some)
        } else {
            self.push_fragment(header, payload).map(|()| None)
        }
    }

    /// Feeds a data frame without FIN: it starts or continues a fragmented message, and never
    /// completes an event. Split from `push_final` so that a caller returning the event of a
    /// final frame (the frame reader) does not keep the assembler borrowed for a fragment.
    ///
    /// # Errors
    /// As `push`.
    pub fn push_fragment(
        &mut self,
        header: &FrameHeader,
        payload: &[u8],
    ) -> Result<(), ProtocolError> {
        debug_assert!(!completes_event(header));
        debug_assert_eq!(header.payload_len, payload.len() as u64);
        // The frame is whole now; `start_fragmented`/`continue_message` validate all of it.
        self.partial = None;
        match header.opcode {
            OpCode::Continuation => self.continue_message(false, payload),
            _ => self.start_fragmented(header, payload),
        }
    }

    /// Feeds a frame that completes an event (see `completes_event`): a control frame, a
    /// one-frame message, or the last fragment of one.
    ///
    /// # Errors
    /// As `push`.
    /// The event borrows only `payload` (an assembled message is moved out, owned), so the
    /// assembler is free again as soon as this returns.
    #[inline]
    pub fn push_final<'p>(
        &mut self,
        header: &FrameHeader,
        payload: &'p [u8],
    ) -> Result<Event<'p>, ProtocolError> {
        debug_assert!(completes_event(header));
        debug_assert_eq!(header.payload_len, payload.len() as u64);
        self.partial = None;
        match header.opcode {
            OpCode::Text | OpCode::Binary => self.single(header, payload),
            OpCode::Continuation => {
                self.continue_message(true, payload)?;
                // `continue_message` refused a continuation with no open message.
                let open = self.open.take().ok_or(ProtocolError::StrayContinuation)?;
                Ok(Event::Message {
                    opcode: open.opcode,
                    data: Cow::Owned(open.data),
                    compressed: open.compressed,
                })
            }
            OpCode::Close | OpCode::Ping | OpCode::Pong => control_event(header, payload),
        }
    }

    /// Bytes of the open fragmented message held so far (0 when none is open).
    pub fn buffered_bytes(&self) -> usize {
        self.open.as_ref().map_or(0, |open| open.data.len())
    }

    /// Is a fragmented message open (started, not yet finished)?
    pub fn in_message(&self) -> bool {
        self.open.is_some()
    }

    /// Is the assembler where `new` leaves it: no open message, no partial text frame being
    /// validated, nothing carried in the UTF-8 check?
    pub fn is_idle(&self) -> bool {
        self.open.is_none() && self.partial.is_none() && self.utf8.is_at_start()
    }

    /// Drops any open message and its buffer: back to the state of `new`.
    pub fn reset(&mut self) {
        self.open = None;
        self.utf8.reset();
        self.partial = None;
    }

    /// Validates the part of a text frame's payload that has arrived so far, before the whole
    /// frame is there, so that invalid UTF-8 fails the connection at once rather than when the
    /// frame completes (RFC 6455 §8.1; Autobahn cases 6.4.x). `masked_prefix` is the payload
    /// received so far, as it is on the wire (still masked); only the bytes beyond those checked
    /// by earlier calls are unmasked (in a copy) and fed to the validator. Frames that are not
    /// text (nor the continuation of a text message) are ignored.
    ///
    /// The simple alternative, validating only complete frames, is what `push` does anyway; this
    /// costs one copy of the newly arrived bytes of incomplete text frames, which in practice
    /// means frames larger than one read.
    ///
    /// # Errors
    /// `InvalidUtf8` when the bytes so far can never become valid UTF-8.
    pub fn check_partial(
        &mut self,
        header: &FrameHeader,
        masked_prefix: &[u8],
    ) -> Result<(), ProtocolError> {
        let continues_text = self.open.as_ref().is_some_and(OpenMessage::checks_utf8);
        let fresh = match header.opcode {
            OpCode::Text if self.open.is_none() && !header.rsv1 => Utf8Validator::default(),
            OpCode::Continuation if continues_text => self.utf8.clone(),
            // Anything else is validated (or refused) by `push` when it completes.
            _ => return Ok(()),
        };
        let partial = self.partial.get_or_insert(PartialText {
            utf8: fresh,
            checked: 0,
        });
        let Some(new) = masked_prefix.get(partial.checked..) else {
            return Ok(());
        };
        if new.is_empty() {
            return Ok(());
        }
        let mut bytes = new.to_vec();
        if let Some(key) = header.mask {
            super::mask::unmask_from(&mut bytes, key, partial.checked);
        }
        partial.checked += bytes.len();
        let result = partial.utf8.feed(&bytes);
        if result.is_err() {
            self.reset();
        }
        result
    }

    /// A Text or Binary frame with FIN: a whole message, handed out without a copy.
    fn single<'a>(
        &mut self,
        header: &FrameHeader,
        payload: &'a [u8],
    ) -> Result<Event<'a>, ProtocolError> {
        self.refuse_interleaved()?;
        if payload.len() > self.max_message {
            return Err(ProtocolError::MessageTooBig);
        }
        if header.opcode == OpCode::Text && !header.rsv1 && std::str::from_utf8(payload).is_err() {
            return Err(ProtocolError::InvalidUtf8);
        }
        Ok(Event::Message {
            opcode: header.opcode,
            data: Cow::Borrowed(payload),
            compressed: header.rsv1,
        })
    }

    /// A Text or Binary frame without FIN: the first fragment of a message.
    fn start_fragmented(
        &mut self,
        header: &FrameHeader,
        payload: &[u8],
    ) -> Result<(), ProtocolError> {
        self.refuse_interleaved()?;
        if payload.len() > self.max_message {
            return Err(ProtocolError::MessageTooBig);
        }
        let open = OpenMessage {
            opcode: header.opcode,
            data: payload.to_vec(),
            compressed: header.rsv1,
        };
        if open.checks_utf8() {
            // RFC 6455 §8.1 with SPEC §4: fail at the first fragment that cannot be UTF-8.
            self.utf8.reset();
            self.utf8.feed(payload)?;
        }
        self.open = Some(open);
        Ok(())
    }

    /// RFC 6455 §5.4: "the fragments of one message MUST NOT be interleaved between the
    /// fragments of another message".
    fn refuse_interleaved(&mut self) -> Result<(), ProtocolError> {
        if self.open.is_some() {
            self.reset();
            return Err(ProtocolError::InterleavedMessage);
        }
        Ok(())
    }

    /// A continuation frame: the next fragment of the open message, appended to it. With `fin`
    /// the message is complete, and the caller takes it out of `open`.
    fn continue_message(&mut self, fin: bool, payload: &[u8]) -> Result<(), ProtocolError> {
        // RFC 6455 §5.4: a continuation frame only continues a message that a Text or Binary
        // frame without FIN started.
        let Some(open) = self.open.as_mut() else {
            return Err(ProtocolError::StrayContinuation);
        };
        if open.data.len().saturating_add(payload.len()) > self.max_message {
            self.reset();
            return Err(ProtocolError::MessageTooBig);
        }
        if open.checks_utf8() {
            let mut checked = self.utf8.feed(payload);
            if fin && checked.is_ok() {
                checked = self.utf8.finish();
            }
            if let Err(e) = checked {
                self.reset();
                return Err(e);
            }
        }
        open.data.extend_from_slice(payload);
        Ok(())
    }
}

/// Whether a frame completes an event when pushed: control frames and frames with FIN do; a
/// data frame without FIN only adds to a fragmented message.
#[inline]
pub fn completes_event(header: &FrameHeader) -> bool {
    header.fin || header.opcode.is_control()
}

/// The event of a Close, Ping or Pong frame.
fn control_event<'a>(header: &FrameHeader, payload: &'a [u8]) -> Result<Event<'a>, ProtocolError> {
    // RFC 6455 §5.5: control frames are never fragmented and carry at most 125 bytes.
    if !header.fin {
        return Err(ProtocolError::FragmentedControl);
    }
    if payload.len() > MAX_CONTROL_PAYLOAD {
        return Err(ProtocolError::ControlTooLong);
    }
    match header.opcode {
        OpCode::Ping => Ok(Event::Ping(payload)),
        OpCode::Pong => Ok(Event::Pong(payload)),
        _ => parse_close(payload).map(Event::Close),
    }
}

/// Parses a Close payload (RFC 6455 §5.5.1): empty, or a 2-byte code then a UTF-8 reason.
///
/// # Errors
/// `CloseTooShort` for a single byte, `InvalidCloseCode` for a code a peer may not send (§7.4),
/// `InvalidUtf8` for a reason that is not UTF-8 (§5.5.1: "the data ... MAY be UTF-8-encoded",
/// and §8.1 makes invalid UTF-8 a failure).
pub fn parse_close(payload: &[u8]) -> Result<Option<CloseFrame<'_>>, ProtocolError> {
    match payload {
        [] => Ok(None),
        [_] => Err(ProtocolError::CloseTooShort),
        [high, low, reason @ ..] => {
            let code = CloseCode(u16::from_be_bytes([*high, *low]));
            if !code.is_valid_received() {
                return Err(ProtocolError::InvalidCloseCode(code.0));
            }
            let reason = std::str::from_utf8(reason).map_err(|_| ProtocolError::InvalidUtf8)?;
            Ok(Some(CloseFrame { code, reason }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use OpCode::*;

    /// What one `push` should give, in a form a table can hold.
    #[derive(Debug, PartialEq)]
    enum Want {
        /// `Ok(None)`: a fragment that does not end its message.
        Pending,
        /// A message borrowed from the frame (single frame).
        Single(OpCode, &'static [u8]),
        /// A message assembled from fragments (owned).
        Assembled(OpCode, &'static [u8]),
        Ping(&'static [u8]),
        Pong(&'static [u8]),
        Close(Option<(u16, &'static str)>),
        /// An error and the close code it must produce.
        Fail(ProtocolError, u16),
    }

    fn observe(result: Result<Option<Event<'_>>, ProtocolError>) -> String {
        match result {
            Ok(None) => format!("{:?}", Want::Pending),
            Ok(Some(Event::Message { opcode, data, .. })) => match data {
                Cow::Borrowed(d) => format!("Single({opcode:?}, {d:?})"),
                Cow::Owned(d) => format!("Assembled({opcode:?}, {d:?})"),
            },
            Ok(Some(Event::Ping(p))) => format!("Ping({p:?})"),
            Ok(Some(Event::Pong(p))) => format!("Pong({p:?})"),
            Ok(Some(Event::Close(None))) => "Close(None)".to_string(),
            Ok(Some(Event::Close(Some(c)))) => {
                format!("Close(Some(({}, {:?})))", c.code.0, c.reason)
            }
            Err(e) => format!("Fail({e:?}, {})", e.close_code().0),
        }
    }

    /// (fin, opcode, payload) of each frame pushed.
    type Frames<'a> = &'a [(bool, OpCode, &'a [u8])];
    /// (name, frames, what each push gives)
    type Case<'a> = (&'a str, Frames<'a>, &'a [Want]);
    /// (name, max_message, frames, what each push gives)
    type LimitCase<'a> = (&'a str, usize, Frames<'a>, &'a [Want]);

    fn frame(fin: bool, opcode: OpCode, payload: &[u8]) -> FrameHeader {
        FrameHeader::new(fin, opcode, None, payload.len() as u64)
    }

    /// Pushes `frames` in order; each result must match `want` (same length). Stops at the
    /// first error, which must be the last expectation.
    fn check(name: &str, max: usize, frames: Frames, want: &[Want]) {
        assert_eq!(frames.len(), want.len(), "{name}: table row is malformed");
        let mut assembler = Assembler::new(max);
        for (i, (&(fin, opcode, payload), want)) in frames.iter().zip(want).enumerate() {
            let got = observe(assembler.push(&frame(fin, opcode, payload), payload));
            assert_eq!(got, format!("{want:?}"), "{name}: frame {i}");
            assert!(assembler.buffered_bytes() <= max, "{name}: over the limit");
            if matches!(want, Want::Fail(..)) {
                assert_eq!(i, frames.len() - 1, "{name}: frames after an error");
                assert!(!assembler.in_message(), "{name}: error keeps the buffer");
            }
        }
    }

    #[test]
    fn unfragmented_messages() {
        #[rustfmt::skip]
        let cases: &[Case] = &[
            ("text", &[(true, Text, b"hi")], &[Want::Single(Text, b"hi")]),
            ("binary", &[(true, Binary, &[0, 0xFF])], &[Want::Single(Binary, &[0, 0xFF])]),
            ("empty text", &[(true, Text, b"")], &[Want::Single(Text, b"")]),
            ("binary need not be UTF-8", &[(true, Binary, &[0xC0])], &[Want::Single(Binary, &[0xC0])]),
            ("two in a row", &[(true, Text, b"a"), (true, Binary, b"b")], &[Want::Single(Text, b"a"), Want::Single(Binary, b"b")]),
            ("multi-byte text", &[(true, Text, "κόσμε".as_bytes())], &[Want::Single(Text, "κόσμε".as_bytes())]),
        ];
        for &(name, frames, want) in cases {
            check(name, 1 << 20, frames, want);
        }
    }

    #[test]
    fn fragmented_messages_and_control_frames_between_fragments() {
        #[rustfmt::skip]
        let cases: &[Case] = &[
            ("RFC 5.7 Hel+lo", &[(false, Text, b"Hel"), (true, Continuation, b"lo")],
                &[Want::Pending, Want::Assembled(Text, b"Hello")]),
            ("three binary fragments, empty middle", &[(false, Binary, b"ab"), (false, Continuation, b""), (true, Continuation, b"c")],
                &[Want::Pending, Want::Pending, Want::Assembled(Binary, b"abc")]),
            ("all fragments empty", &[(false, Text, b""), (true, Continuation, b"")],
                &[Want::Pending, Want::Assembled(Text, b"")]),
            ("ping between fragments", &[(false, Text, b"a"), (true, Ping, b"p"), (true, Continuation, b"b")],
                &[Want::Pending, Want::Ping(b"p"), Want::Assembled(Text, b"ab")]),
            ("pong between fragments", &[(false, Binary, b"a"), (true, Pong, b""), (false, Continuation, b"b"), (true, Pong, b"q"), (true, Continuation, b"c")],
                &[Want::Pending, Want::Pong(b""), Want::Pending, Want::Pong(b"q"), Want::Assembled(Binary, b"abc")]),
            ("close between fragments", &[(false, Text, b"a"), (true, Close, &[0x03, 0xE8])],
                &[Want::Pending, Want::Close(Some((1000, "")))]),
            ("euro split over three fragments", &[(false, Text, &[0xE2]), (false, Continuation, &[0x82]), (true, Continuation, &[0xAC])],
                &[Want::Pending, Want::Pending, Want::Assembled(Text, "€".as_bytes())]),
            ("message after a fragmented one", &[(false, Text, b"a"), (true, Continuation, b"b"), (true, Text, b"c")],
                &[Want::Pending, Want::Assembled(Text, b"ab"), Want::Single(Text, b"c")]),
            ("binary fragments need not be UTF-8", &[(false, Binary, &[0xF4]), (true, Continuation, &[0x90])],
                &[Want::Pending, Want::Assembled(Binary, &[0xF4, 0x90])]),
        ];
        for &(name, frames, want) in cases {
            check(name, 1 << 20, frames, want);
        }
    }

    #[test]
    fn control_frames() {
        #[rustfmt::skip]
        let cases: &[Case] = &[
            ("ping", &[(true, Ping, b"hello")], &[Want::Ping(b"hello")]),
            ("empty ping", &[(true, Ping, b"")], &[Want::Ping(b"")]),
            ("pong", &[(true, Pong, b"x")], &[Want::Pong(b"x")]),
            ("empty close", &[(true, Close, b"")], &[Want::Close(None)]),
            ("close 1000", &[(true, Close, &[0x03, 0xE8])], &[Want::Close(Some((1000, "")))]),
            ("close 1001 with reason", &[(true, Close, b"\x03\xE9bye")], &[Want::Close(Some((1001, "bye")))]),
            ("close 3000", &[(true, Close, &[0x0B, 0xB8])], &[Want::Close(Some((3000, "")))]),
            ("close 4999", &[(true, Close, &[0x13, 0x87])], &[Want::Close(Some((4999, "")))]),
            ("close UTF-8 reason", &[(true, Close, b"\x03\xE8\xC3\xA9")], &[Want::Close(Some((1000, "é")))]),
        ];
        for &(name, frames, want) in cases {
            check(name, 1 << 20, frames, want);
        }
    }

    #[test]
    fn every_assembly_error_with_its_close_code() {
        use ProtocolError::*;
        let long_ping = [0u8; 126];
        #[rustfmt::skip]
        let cases: &[LimitCase] = &[
            ("stray final continuation", 100, &[(true, Continuation, b"x")], &[Want::Fail(StrayContinuation, 1002)]),
            ("stray continuation", 100, &[(false, Continuation, b"")], &[Want::Fail(StrayContinuation, 1002)]),
            ("stray after a finished message", 100, &[(false, Text, b"a"), (true, Continuation, b"b"), (true, Continuation, b"c")],
                &[Want::Pending, Want::Assembled(Text, b"ab"), Want::Fail(StrayContinuation, 1002)]),
            ("text inside a message", 100, &[(false, Text, b"a"), (true, Text, b"b")], &[Want::Pending, Want::Fail(InterleavedMessage, 1002)]),
            ("binary inside a message", 100, &[(false, Text, b"a"), (false, Binary, b"b")], &[Want::Pending, Want::Fail(InterleavedMessage, 1002)]),
            ("invalid UTF-8, one frame", 100, &[(true, Text, &[b'a', 0xFF])], &[Want::Fail(InvalidUtf8, 1007)]),
            ("invalid UTF-8, first fragment fails fast", 100, &[(false, Text, &[0xF4, 0x90])], &[Want::Fail(InvalidUtf8, 1007)]),
            ("invalid UTF-8 at the second of many", 100, &[(false, Text, b"ok"), (false, Continuation, &[0xED, 0xA0])],
                &[Want::Pending, Want::Fail(InvalidUtf8, 1007)]),
            ("bad continuation of a split char", 100, &[(false, Text, &[0xE2]), (false, Continuation, b"a")],
                &[Want::Pending, Want::Fail(InvalidUtf8, 1007)]),
            ("text ends inside a char", 100, &[(false, Text, b"a"), (true, Continuation, &[0xE2, 0x82])],
                &[Want::Pending, Want::Fail(InvalidUtf8, 1007)]),
            ("single frame over the limit", 4, &[(true, Text, b"hello")], &[Want::Fail(MessageTooBig, 1009)]),
            ("first fragment over the limit", 4, &[(false, Binary, b"hello")], &[Want::Fail(MessageTooBig, 1009)]),
            ("fragments add up over the limit", 4, &[(false, Binary, b"abc"), (true, Continuation, b"de")],
                &[Want::Pending, Want::Fail(MessageTooBig, 1009)]),
            ("close of one byte", 100, &[(true, Close, &[0x03])], &[Want::Fail(CloseTooShort, 1002)]),
            ("close code 0", 100, &[(true, Close, &[0, 0])], &[Want::Fail(InvalidCloseCode(0), 1002)]),
            ("close code 999", 100, &[(true, Close, &[0x03, 0xE7])], &[Want::Fail(InvalidCloseCode(999), 1002)]),
            ("close code 1004", 100, &[(true, Close, &[0x03, 0xEC])], &[Want::Fail(InvalidCloseCode(1004), 1002)]),
            ("close code 1005", 100, &[(true, Close, &[0x03, 0xED])], &[Want::Fail(InvalidCloseCode(1005), 1002)]),
            ("close code 1006", 100, &[(true, Close, &[0x03, 0xEE])], &[Want::Fail(InvalidCloseCode(1006), 1002)]),
            ("close code 1015", 100, &[(true, Close, &[0x03, 0xF7])], &[Want::Fail(InvalidCloseCode(1015), 1002)]),
            ("close code 1016", 100, &[(true, Close, &[0x03, 0xF8])], &[Want::Fail(InvalidCloseCode(1016), 1002)]),
            ("close code 2999", 100, &[(true, Close, &[0x0B, 0xB7])], &[Want::Fail(InvalidCloseCode(2999), 1002)]),
            ("close code 5000", 100, &[(true, Close, &[0x13, 0x88])], &[Want::Fail(InvalidCloseCode(5000), 1002)]),
            ("close reason not UTF-8", 100, &[(true, Close, &[0x03, 0xE8, 0xC0])], &[Want::Fail(InvalidUtf8, 1007)]),
            ("ping not final", 100, &[(false, Ping, b"")], &[Want::Fail(FragmentedControl, 1002)]),
            ("ping over 125", 1000, &[(true, Ping, &long_ping)], &[Want::Fail(ControlTooLong, 1002)]),
        ];
        for &(name, max, frames, want) in cases {
            check(name, max, frames, want);
        }
    }

    #[test]
    fn at_the_limit_is_accepted() {
        check(
            "single",
            4,
            &[(true, Binary, b"abcd")],
            &[Want::Single(Binary, b"abcd")],
        );
        check(
            "fragments",
            4,
            &[(false, Text, b"ab"), (true, Continuation, b"cd")],
            &[Want::Pending, Want::Assembled(Text, b"abcd")],
        );
    }

    #[test]
    fn buffer_exists_only_while_a_message_is_open() {
        let mut a = Assembler::new(100);
        assert!(!a.in_message());
        assert_eq!(a.buffered_bytes(), 0);
        assert_eq!(a.push(&frame(false, Text, b"abc"), b"abc"), Ok(None));
        assert!(a.in_message());
        assert_eq!(a.buffered_bytes(), 3);
        assert!(a.push(&frame(true, Ping, b""), b"").is_ok());
        assert_eq!(a.buffered_bytes(), 3);
        assert_eq!(a.push(&frame(false, Continuation, b"de"), b"de"), Ok(None));
        assert_eq!(a.buffered_bytes(), 5);
        assert!(a.push(&frame(true, Continuation, b""), b"").is_ok());
        assert!(!a.in_message());
        assert_eq!(a.buffered_bytes(), 0);
        assert!(a.open.is_none(), "no heap buffer held between messages");
    }

    #[test]
    #[allow(clippy::unwrap_used)] // test inputs are built here, not received
    fn partial_text_frame_fails_before_it_completes() {
        use crate::protocol::frame::{decode_header, encode, Role};
        let key = [1, 2, 3, 4];
        // "κόσμε" then an invalid sequence, in a frame of 100 bytes of which 20 have arrived.
        let mut payload = "κόσμε".as_bytes().to_vec();
        payload.extend_from_slice(&[0xf4, 0x90, 0x80, 0x80]);
        payload.resize(100, b'a');
        let wire = encode(true, OpCode::Text, &payload, Some(key));
        let header = decode_header(&wire, Role::Server, 1 << 20)
            .unwrap()
            .unwrap();
        let body = &wire[header.header_len..];

        let mut a = Assembler::new(1 << 20);
        assert_eq!(a.check_partial(&header, &body[..5]), Ok(()), "valid so far");
        assert_eq!(a.check_partial(&header, &body[..5]), Ok(()), "nothing new");
        assert_eq!(
            a.check_partial(&header, &body[..12]),
            Err(ProtocolError::InvalidUtf8)
        );

        // A valid frame arriving in pieces passes every check and then assembles.
        let good = "é".repeat(40);
        let wire = encode(true, OpCode::Text, good.as_bytes(), Some(key));
        let header = decode_header(&wire, Role::Server, 1 << 20)
            .unwrap()
            .unwrap();
        let mut a = Assembler::new(1 << 20);
        for end in header.header_len..wire.len() {
            assert_eq!(
                a.check_partial(&header, &wire[header.header_len..end]),
                Ok(())
            );
        }
        let mut whole = wire.clone();
        let decoded = crate::protocol::frame::decode_frame(&mut whole, Role::Server, 1 << 20)
            .unwrap()
            .unwrap();
        let event = a.push(&decoded.header, &whole[decoded.payload]).unwrap();
        assert!(matches!(event, Some(Event::Message { .. })));
    }
}
