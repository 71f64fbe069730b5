//! The RFC 6455 frame codec: frame headers from bytes and frames to bytes, for both roles.
//!
//! Owns: header decode (FIN, RSV1-3, opcode, MASK, 7/16/64-bit length, masking key) with every
//! frame-level rule and limit, whole-frame decode with in-place unmasking, frame encode into one
//! buffer, and the Close frame payload layout.
//! Does not: read sockets, reassemble fragmented messages or validate UTF-8 (`message.rs`), or
//! decide what a connection does next (the reactor).
//!
//! SPEC §4; RFC 6455 §5.2 (base framing), §5.3 (masking), §5.5 (control frames), §5.7 (examples).
//!
//! ```text
//!  0               1               2               3
//!  0 1 2 3 4 5 6 7 0 1 2 3 4 5 6 7 0 1 2 3 4 5 6 7 0 1 2 3 4 5 6 7
//! +-+-+-+-+-------+-+-------------+-------------------------------+
//! |F|R|R|R| opcode|M| Payload len |    Extended payload length    |
//! |I|S|S|S|  (4)  |A|     (7)     |             (16/64)           |
//! |N|V|V|V|       |S|             |   (if payload len==126/127)   |
//! | |1|2|3|       |K|             |                               |
//! +-+-+-+-+-------+-+-------------+ - - - - - - - - - - - - - - - +
//! |     Extended payload length continued, if payload len == 127  |
//! + - - - - - - - - - - - - - - - +-------------------------------+
//! |                               |Masking-key, if MASK set to 1  |
//! +-------------------------------+-------------------------------+
//! | Masking-key (continued)       |          Payload Data         |
//! +-------------------------------- - - - - - - - - - - - - - - - +
//! ```
//!
//! Decoding is incremental: "not enough bytes yet" is `Ok(None)`, never an error, and an error is
//! reported as soon as the bytes that show it are present (a reserved bit fails on the first
//! byte, a missing mask on the second), so a peer cannot make us wait for bytes of a frame that
//! is already known to be bad. Every length from the wire is checked against the limit before
//! the caller buffers the payload.

use super::close::CloseCode;
use super::error::ProtocolError;
use super::mask::unmask;

/// RFC 6455 §5.5: "All control frames MUST have a payload length of 125 bytes or less".
pub const MAX_CONTROL_PAYLOAD: usize = 125;

/// The longest possible header: 2 fixed bytes, an 8-byte length and a 4-byte masking key.
pub const MAX_HEADER_LEN: usize = 14;

const FIN_BIT: u8 = 0x80;
const RSV_BITS: u8 = 0x70;
const RSV1_BIT: u8 = 0x40;
/// RSV2 and RSV3: no extension wsrelay knows gives them a meaning.
const RSV23_BITS: u8 = 0x30;
const OPCODE_BITS: u8 = 0x0F;
const MASK_BIT: u8 = 0x80;
const LEN7_BITS: u8 = 0x7F;
/// 7-bit length values that announce an extended length (RFC 6455 §5.2).
const LEN7_16BIT: u8 = 126;
const LEN7_64BIT: u8 = 127;

/// Which end of the connection we are; it decides the masking rule (RFC 6455 §5.1, §5.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// We accept connections: frames we receive must be masked, frames we send are not.
    Server,
    /// We opened the connection: frames we receive must not be masked, frames we send are.
    Client,
}

/// The frame opcode (RFC 6455 §5.2, §11.8). Reserved values are rejected at decode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpCode {
    /// 0x0: a further fragment of the message that a Text or Binary frame started (§5.4).
    Continuation,
    /// 0x1: the first (or only) frame of a UTF-8 text message.
    Text,
    /// 0x2: the first (or only) frame of a binary message.
    Binary,
    /// 0x8: the closing handshake (§5.5.1).
    Close,
    /// 0x9: a keep-alive probe, answered with a Pong (§5.5.2).
    Ping,
    /// 0xA: the answer to a Ping, or an unsolicited heartbeat (§5.5.3).
    Pong,
}

impl OpCode {
    /// Control frames (Close, Ping, Pong) have opcodes with the high bit set (RFC 6455 §5.5).
    pub fn is_control(self) -> bool {
        self.as_u8() & 0x08 != 0
    }

    /// The 4-bit value on the wire.
    pub fn as_u8(self) -> u8 {
        match self {
            OpCode::Continuation => 0x0,
            OpCode::Text => 0x1,
            OpCode::Binary => 0x2,
            OpCode::Close => 0x8,
            OpCode::Ping => 0x9,
            OpCode::Pong => 0xA,
        }
    }

    /// The opcode for a wire value.
    ///
    /// # Errors
    /// `ProtocolError::UnknownOpCode` for the reserved values 0x3-0x7 and 0xB-0xF (RFC 6455 §5.2:
    /// "If an unknown opcode is received, the receiving endpoint MUST _Fail the WebSocket
    /// Connection_") and for anything above 0xF.
    pub fn from_u8(b: u8) -> Result<OpCode, ProtocolError> {
        match b {
            0x0 => Ok(OpCode::Continuation),
            0x1 => Ok(OpCode::Text),
            0x2 => Ok(OpCode::Binary),
            0x8 => Ok(OpCode::Close),
            0x9 => Ok(OpCode::Ping),
            0xA => Ok(OpCode::Pong),
            other => Err(ProtocolError::UnknownOpCode(other)),
        }
    }
}

/// A validated frame header: what the first 2 to 14 bytes of a frame say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// This is the last frame of its message (always true for control frames).
    pub fin: bool,
    /// RSV1: with permessage-deflate negotiated (RFC 7692 §6), the message this frame starts is
    /// compressed. Only ever true when the decoder was told RSV1 is allowed, and then only on the
    /// first frame of a data message.
    pub rsv1: bool,
    pub opcode: OpCode,
    /// The masking key, present exactly on frames sent by a client.
    pub mask: Option<[u8; 4]>,
    /// Payload bytes that follow the header; never above the `max_payload` it was decoded with.
    pub payload_len: u64,
    /// Bytes the header occupies on the wire, so the payload starts at `header_len`.
    pub header_len: usize,
}

impl FrameHeader {
    /// The header `encode` writes for these fields, with the shortest length encoding.
    pub fn new(fin: bool, opcode: OpCode, mask: Option<[u8; 4]>, payload_len: u64) -> FrameHeader {
        FrameHeader {
            fin,
            rsv1: false,
            opcode,
            mask,
            payload_len,
            header_len: header_len_u64(payload_len, mask.is_some()),
        }
    }

    /// Appends the header's wire bytes to `out`, always in the shortest length encoding (so a
    /// header decoded from a non-minimal encoding is emitted shorter than it arrived).
    #[inline]
    pub fn emit(&self, out: &mut Vec<u8>) {
        let fin_bit = if self.fin { FIN_BIT } else { 0 };
        let rsv1_bit = if self.rsv1 { RSV1_BIT } else { 0 };
        let mask_bit = if self.mask.is_some() { MASK_BIT } else { 0 };
        let first = fin_bit | rsv1_bit | self.opcode.as_u8();
        // RFC 6455 §5.2: lengths up to 125 fit in 7 bits; 126 announces a 16-bit length and 127
        // a 64-bit one, both in network byte order.
        // Each length appends its bytes in one slice of a fixed size, which compiles to one
        // capacity check and a store or two: a `push` per byte checked the capacity for each,
        // and this runs once per message sent (docs/benchmarks.md, "A fast path for whole small
        // frames").
        if let Ok(len7 @ 0..=125) = u8::try_from(self.payload_len) {
            out.extend_from_slice(&[first, mask_bit | len7]);
        } else if let Ok(len16) = u16::try_from(self.payload_len) {
            let [high, low] = len16.to_be_bytes();
            out.extend_from_slice(&[first, mask_bit | LEN7_16BIT, high, low]);
        } else {
            out.extend_from_slice(&[first, mask_bit | LEN7_64BIT]);
            out.extend_from_slice(&self.payload_len.to_be_bytes());
        }
        if let Some(key) = self.mask {
            out.extend_from_slice(&key);
        }
    }
}

/// Decodes and validates the frame header at the start of `buf`, with no extension negotiated
/// (every reserved bit is an error). See `decode_header_with`.
///
/// # Errors
/// Those of `decode_header_with`.
#[inline]
pub fn decode_header(
    buf: &[u8],
    role: Role,
    max_payload: u64,
) -> Result<Option<FrameHeader>, ProtocolError> {
    decode_header_with(buf, role, max_payload, false)
}

/// Decodes and validates the frame header at the start of `buf`. `rsv1_allowed` says that an
/// extension giving RSV1 a meaning was negotiated (permessage-deflate, RFC 7692): RSV1 is then
/// accepted on the first frame of a data message (Text or Binary), and still refused on
/// continuation and control frames (RFC 7692 §6, §6.1).
///
/// Returns `Ok(None)` while `buf` holds too few bytes to finish the header (the payload is not
/// needed). Non-minimal length encodings (a 16-bit length below 126, a 64-bit length below
/// 65536) are accepted: RFC 6455 §5.2 says "the minimal number of bytes MUST be used", but SPEC §4
/// tolerates them, as browsers and most servers do.
///
/// # Errors
/// Checked in wire order, each as soon as its bytes are in `buf`:
/// - `ReservedBits`: RSV2 or RSV3 set, or RSV1 where it is not allowed;
/// - `UnknownOpCode`: a reserved opcode;
/// - `FragmentedControl`: a control frame without FIN;
/// - `UnmaskedFrame` (role `Server`) / `MaskedFrame` (role `Client`): wrong masking for the role;
/// - `LengthTopBit`: a 64-bit length with its most significant bit set (seen on its first byte);
/// - `ControlTooLong`: a control frame with a payload above 125 bytes;
/// - `MessageTooBig`: `payload_len > max_payload`.
#[inline]
pub fn decode_header_with(
    buf: &[u8],
    role: Role,
    max_payload: u64,
    rsv1_allowed: bool,
) -> Result<Option<FrameHeader>, ProtocolError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    // RFC 6455 §5.2: RSV1-3 "MUST be 0 unless an extension is negotiated that defines meanings
    // for non-zero values". Only permessage-deflate is ever negotiated, and it defines RSV1.
    let forbidden = if rsv1_allowed { RSV23_BITS } else { RSV_BITS };
    if first & forbidden != 0 {
        return Err(ProtocolError::ReservedBits);
    }
    let opcode = OpCode::from_u8(first & OPCODE_BITS)?;
    let rsv1 = first & RSV1_BIT != 0;
    // RFC 7692 §6: RSV1 marks the first frame of a compressed message; continuation and control
    // frames never carry it.
    if rsv1 && !matches!(opcode, OpCode::Text | OpCode::Binary) {
        return Err(ProtocolError::ReservedBits);
    }
    let fin = first & FIN_BIT != 0;
    // RFC 6455 §5.5: "Control frames ... MUST NOT be fragmented."
    if opcode.is_control() && !fin {
        return Err(ProtocolError::FragmentedControl);
    }

    let Some(&second) = buf.get(1) else {
        return Ok(None);
    };
    let masked = second & MASK_BIT != 0;
    match (role, masked) {
        // RFC 6455 §5.1: "a client MUST mask all frames that it sends to the server", and "The
        // server MUST close the connection upon receiving a frame that is not masked."
        (Role::Server, false) => return Err(ProtocolError::UnmaskedFrame),
        // RFC 6455 §5.1: "A client MUST close a connection if it detects a masked frame."
        (Role::Client, true) => return Err(ProtocolError::MaskedFrame),
        _ => {}
    }

    let (payload_len, len_end) = match second & LEN7_BITS {
        LEN7_16BIT => match read_array::<2>(buf, 2) {
            Some(bytes) => (u64::from(u16::from_be_bytes(bytes)), 4),
            None => return Ok(None),
        },
        LEN7_64BIT => {
            // RFC 6455 §5.2: "the most significant bit MUST be 0". It sits in the first length
            // byte, so it is reported without waiting for the other seven.
            if buf.get(2).is_some_and(|&b| b & 0x80 != 0) {
                return Err(ProtocolError::LengthTopBit);
            }
            match read_array::<8>(buf, 2) {
                Some(bytes) => (u64::from_be_bytes(bytes), 10),
                None => return Ok(None),
            }
        }
        len7 => (u64::from(len7), 2),
    };
    // RFC 6455 §5.5: control payloads are at most 125 bytes (checked on the real length, so a
    // non-minimal encoding of a short length is tolerated like for data frames).
    if opcode.is_control() && payload_len > MAX_CONTROL_PAYLOAD as u64 {
        return Err(ProtocolError::ControlTooLong);
    }
    // SPEC §4: a frame above the limit is refused from its header, before its payload is
    // buffered, so a peer cannot make us allocate what it announces.
    if payload_len > max_payload {
        return Err(ProtocolError::MessageTooBig);
    }

    let (mask, header_len) = if masked {
        match read_array::<4>(buf, len_end) {
            Some(key) => (Some(key), len_end + 4),
            None => return Ok(None),
        }
    } else {
        (None, len_end)
    };
    Ok(Some(FrameHeader {
        fin,
        rsv1,
        opcode,
        mask,
        payload_len,
        header_len,
    }))
}

/// A whole frame found at the start of a buffer by `decode_frame`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodedFrame {
    pub header: FrameHeader,
    /// Where the (now unmasked) payload lies in the buffer.
    pub payload: std::ops::Range<usize>,
    /// Bytes the whole frame occupies: the next frame starts at `len`.
    pub len: usize,
}

/// Decodes the whole frame at the start of `buf` and unmasks its payload in place.
///
/// Returns `Ok(None)` while `buf` does not hold the whole frame yet; nothing is modified then, so
/// the caller may call again with more bytes. Bytes after the frame are left untouched.
///
/// # Errors
/// Those of `decode_header`; also `MessageTooBig` if the length does not fit in `usize` (only
/// possible on targets narrower than 64 bits).
#[inline]
pub fn decode_frame(
    buf: &mut [u8],
    role: Role,
    max_payload: u64,
) -> Result<Option<DecodedFrame>, ProtocolError> {
    decode_frame_with(buf, role, max_payload, false)
}

/// `decode_frame` with RSV1 allowed or not, as in `decode_header_with`.
///
/// # Errors
/// Those of `decode_frame`.
#[inline]
pub fn decode_frame_with(
    buf: &mut [u8],
    role: Role,
    max_payload: u64,
    rsv1_allowed: bool,
) -> Result<Option<DecodedFrame>, ProtocolError> {
    let Some(header) = decode_header_with(buf, role, max_payload, rsv1_allowed)? else {
        return Ok(None);
    };
    let len = usize::try_from(header.payload_len)
        .ok()
        .and_then(|payload_len| payload_len.checked_add(header.header_len))
        .ok_or(ProtocolError::MessageTooBig)?;
    let payload = header.header_len..len;
    let Some(payload_bytes) = buf.get_mut(payload.clone()) else {
        return Ok(None);
    };
    if let Some(key) = header.mask {
        unmask(payload_bytes, key);
    }
    Ok(Some(DecodedFrame {
        header,
        payload,
        len,
    }))
}

/// A frame found by `decode_simple_data_frame`: a whole one-frame Text or Binary message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimpleFrame {
    /// `Text` or `Binary`.
    pub opcode: OpCode,
    /// Where the (now unmasked) payload lies in the buffer; the frame ends where it ends.
    pub payload: std::ops::Range<usize>,
}

/// The common case of `decode_frame_with`, decided in a few steps: a whole Text or Binary frame
/// with FIN, no reserved bit, masked as `role` requires, a 7- or 16-bit length of at most
/// `max_payload`, all of it in `buf`. Its payload is unmasked in place, as `decode_frame_with`
/// does.
///
/// Why it exists: nearly every frame a server receives is such a frame, one small message that
/// arrived whole in one read, and the general decoder spends most of its steps on what such a
/// frame never needs (control frames, fragments, 64-bit lengths, a frame cut by the end of a
/// read). `None` means only "not this shape": nothing is modified, and the caller decodes the
/// frame the general way, which accepts it, waits for more bytes or refuses it with its close
/// code. So this function decides no rule of its own: for every `buf` it accepts,
/// `decode_frame_with` gives the same frame (tested on random bytes).
#[inline]
pub fn decode_simple_data_frame(
    buf: &mut [u8],
    role: Role,
    max_payload: usize,
) -> Option<SimpleFrame> {
    let (&first, &second) = (buf.first()?, buf.get(1)?);
    // FIN set, RSV1-3 clear, a data opcode: anything else goes the general way.
    let opcode = match first {
        0x81 => OpCode::Text,
        0x82 => OpCode::Binary,
        _ => return None,
    };
    let masked = second & MASK_BIT != 0;
    if masked != (role == Role::Server) {
        return None; // RFC 6455 §5.1: refused by the general decode
    }
    let (payload_len, len_end) = match second & LEN7_BITS {
        LEN7_16BIT => (usize::from(u16::from_be_bytes(read_array(buf, 2)?)), 4),
        LEN7_64BIT => return None,
        len7 => (usize::from(len7), 2),
    };
    if payload_len > max_payload {
        return None;
    }
    let start = if masked { len_end + 4 } else { len_end };
    let end = start + payload_len;
    if end > buf.len() {
        return None;
    }
    if masked {
        let key = read_array::<4>(buf, len_end)?;
        unmask(buf.get_mut(start..end)?, key);
    }
    Some(SimpleFrame {
        opcode,
        payload: start..end,
    })
}

/// Bytes of the header `encode` writes for a payload of `payload_len` bytes: 2, plus 2 or 8 for an
/// extended length, plus 4 for a masking key.
#[inline]
pub fn header_len(payload_len: usize, masked: bool) -> usize {
    header_len_u64(payload_len as u64, masked)
}

fn header_len_u64(payload_len: u64, masked: bool) -> usize {
    let extended_len = match payload_len {
        0..=125 => 0,
        126..=0xFFFF => 2,
        _ => 8,
    };
    2 + extended_len + if masked { 4 } else { 0 }
}

/// Appends one frame, header then payload, to `out`. With `Some(mask)` the payload is masked on
/// the way in (the caller's `payload` is not modified).
///
/// Header and payload go into one buffer so that the frame leaves in one write (SPEC §4); the
/// reserve is done once, for both.
///
/// # Panics
/// In debug builds, on a fragmented or over-long control frame: a caller bug, never peer input.
#[inline]
pub fn encode_into(
    out: &mut Vec<u8>,
    fin: bool,
    opcode: OpCode,
    payload: &[u8],
    mask: Option<[u8; 4]>,
) {
    debug_assert!(
        !opcode.is_control() || (fin && payload.len() <= MAX_CONTROL_PAYLOAD),
        "RFC 6455 §5.5: control frames are unfragmented and at most 125 bytes"
    );
    let header = FrameHeader::new(fin, opcode, mask, payload.len() as u64);
    out.reserve(header.header_len + payload.len());
    header.emit(out);
    let payload_start = out.len();
    out.extend_from_slice(payload);
    if let Some(key) = mask {
        unmask(&mut out[payload_start..], key);
    }
}

/// Appends one unfragmented frame of a compressed message (permessage-deflate, RFC 7692 §6:
/// RSV1 set on the message's first frame), `payload` being the compressed bytes. Otherwise as
/// `encode_into`.
pub fn encode_compressed_into(
    out: &mut Vec<u8>,
    opcode: OpCode,
    payload: &[u8],
    mask: Option<[u8; 4]>,
) {
    debug_assert!(
        matches!(opcode, OpCode::Text | OpCode::Binary),
        "RFC 7692 §6.1: only data messages are compressed"
    );
    let mut header = FrameHeader::new(true, opcode, mask, payload.len() as u64);
    header.rsv1 = true;
    out.reserve(header.header_len + payload.len());
    header.emit(out);
    let payload_start = out.len();
    out.extend_from_slice(payload);
    if let Some(key) = mask {
        unmask(&mut out[payload_start..], key);
    }
}

/// One frame as a new buffer of exactly its length. See `encode_into`.
pub fn encode(fin: bool, opcode: OpCode, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut out = Vec::with_capacity(header_len(payload.len(), mask.is_some()) + payload.len());
    encode_into(&mut out, fin, opcode, payload, mask);
    out
}

/// The payload of a Close frame: the code in network byte order, then the UTF-8 reason,
/// truncated on a character boundary so the payload fits in 125 bytes (RFC 6455 §5.5, §5.5.1).
pub fn close_payload(code: CloseCode, reason: &str) -> Vec<u8> {
    let mut reason_len = reason.len().min(MAX_CONTROL_PAYLOAD - 2);
    // Index 0 is always a boundary, so this stops.
    while !reason.is_char_boundary(reason_len) {
        reason_len = reason_len.saturating_sub(1);
    }
    let reason = reason.as_bytes().get(..reason_len).unwrap_or_default();
    let mut out = Vec::with_capacity(2 + reason.len());
    out.extend_from_slice(&code.0.to_be_bytes());
    out.extend_from_slice(reason);
    out
}

/// `N` bytes of `buf` starting at `at`, or `None` if they have not all arrived.
fn read_array<const N: usize>(buf: &[u8], at: usize) -> Option<[u8; N]> {
    buf.get(at..at.checked_add(N)?)?.try_into().ok()
}

#[cfg(test)]
#[allow(clippy::panic)] // a failing test may panic
mod tests {
    use super::*;
    use proptest::prelude::*;
    use ProtocolError::*;

    const BIG: u64 = 1 << 20;
    const KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d]; // RFC 6455 §5.7

    #[test]
    fn opcodes() {
        let known: &[(u8, OpCode, bool)] = &[
            (0x0, OpCode::Continuation, false),
            (0x1, OpCode::Text, false),
            (0x2, OpCode::Binary, false),
            (0x8, OpCode::Close, true),
            (0x9, OpCode::Ping, true),
            (0xA, OpCode::Pong, true),
        ];
        for &(byte, opcode, control) in known {
            assert_eq!(OpCode::from_u8(byte), Ok(opcode));
            assert_eq!(opcode.as_u8(), byte);
            assert_eq!(opcode.is_control(), control, "{opcode:?}");
        }
        for byte in (0x3..=0x7).chain(0xB..=0xFF) {
            assert_eq!(OpCode::from_u8(byte), Err(UnknownOpCode(byte)));
        }
    }

    /// (name, bytes, role, max_payload, error, close code)
    type ErrorCase<'a> = (&'a str, &'a [u8], Role, u64, ProtocolError, u16);

    /// `bytes` is the shortest input that shows the error: every shorter prefix must be
    /// "need more", `bytes` itself the error, with its close code.
    fn check_error(name: &str, bytes: &[u8], role: Role, max: u64, err: ProtocolError, code: u16) {
        for n in 0..bytes.len() {
            assert_eq!(
                decode_header(&bytes[..n], role, max),
                Ok(None),
                "{name}: prefix of {n}"
            );
        }
        assert_eq!(decode_header(bytes, role, max), Err(err), "{name}");
        assert_eq!(err.close_code().0, code, "{name}");
        // decode_frame reports the same, and so does a buffer with more bytes after.
        let mut longer = bytes.to_vec();
        longer.extend_from_slice(&[0u8; 20]);
        assert_eq!(decode_frame(&mut longer, role, max), Err(err), "{name}");
    }

    #[test]
    fn every_frame_level_error_with_its_close_code() {
        let s = Role::Server;
        let c = Role::Client;
        #[rustfmt::skip]
        let cases: &[ErrorCase] = &[
            ("RSV1", &[0xC1], s, BIG, ReservedBits, 1002),
            ("RSV2", &[0xA2], s, BIG, ReservedBits, 1002),
            ("RSV3", &[0x91], c, BIG, ReservedBits, 1002),
            ("RSV before opcode", &[0xF3], s, BIG, ReservedBits, 1002),
            ("opcode 3", &[0x83], s, BIG, UnknownOpCode(3), 1002),
            ("opcode 7", &[0x87], s, BIG, UnknownOpCode(7), 1002),
            ("opcode B", &[0x8B], c, BIG, UnknownOpCode(0xB), 1002),
            ("opcode F", &[0x0F], s, BIG, UnknownOpCode(0xF), 1002),
            ("close without FIN", &[0x08], s, BIG, FragmentedControl, 1002),
            ("ping without FIN", &[0x09], s, BIG, FragmentedControl, 1002),
            ("pong without FIN", &[0x0A], c, BIG, FragmentedControl, 1002),
            ("unmasked to server", &[0x81, 0x05], s, BIG, UnmaskedFrame, 1002),
            ("unmasked empty to server", &[0x88, 0x00], s, BIG, UnmaskedFrame, 1002),
            ("masked to client", &[0x81, 0x85], c, BIG, MaskedFrame, 1002),
            ("ping 126 (16-bit)", &[0x89, 0xFE, 0x00, 0x7E], s, BIG, ControlTooLong, 1002),
            ("close 126 (16-bit)", &[0x88, 0x7E, 0x00, 0x7E], c, BIG, ControlTooLong, 1002),
            ("pong 64-bit length", &[0x8A, 0xFF, 0, 0, 0, 0, 0, 0, 0x01, 0x00], s, BIG, ControlTooLong, 1002),
            ("64-bit top bit", &[0x82, 0xFF, 0x80], s, BIG, LengthTopBit, 1002),
            ("64-bit top bit, client", &[0x02, 0x7F, 0xFF], c, u64::MAX, LengthTopBit, 1002),
            ("7-bit over limit", &[0x82, 0x8B], s, 10, MessageTooBig, 1009),
            ("16-bit over limit", &[0x82, 0xFE, 0x03, 0xE9], s, 1000, MessageTooBig, 1009),
            ("64-bit over limit", &[0x82, 0xFF, 0, 0, 0, 0, 0, 0x10, 0, 0x01], s, BIG, MessageTooBig, 1009),
            ("64-bit max value", &[0x02, 0x7F, 0x7F, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF], c, BIG, MessageTooBig, 1009),
            ("continuation over limit", &[0x00, 0x7E, 0x01, 0x00], c, 255, MessageTooBig, 1009),
            ("control over a small limit", &[0x89, 0x85], s, 4, MessageTooBig, 1009),
        ];
        for &(name, bytes, role, max, err, code) in cases {
            check_error(name, bytes, role, max, err, code);
        }
    }

    /// `bytes` is a complete header: every shorter prefix is "need more", then `expected`.
    fn check_header(name: &str, bytes: &[u8], role: Role, max: u64, expected: FrameHeader) {
        for n in 0..bytes.len() {
            assert_eq!(
                decode_header(&bytes[..n], role, max),
                Ok(None),
                "{name}: {n}"
            );
        }
        assert_eq!(
            decode_header(bytes, role, max),
            Ok(Some(expected)),
            "{name}"
        );
    }

    #[test]
    fn headers_at_the_edges_of_the_rules() {
        let h = |fin, opcode, mask, payload_len, header_len| FrameHeader {
            fin,
            rsv1: false,
            opcode,
            mask,
            payload_len,
            header_len,
        };
        let s = Role::Server;
        let c = Role::Client;
        #[rustfmt::skip]
        let cases: &[(&str, &[u8], Role, u64, FrameHeader)] = &[
            ("empty text", &[0x81, 0x00], c, BIG, h(true, OpCode::Text, None, 0, 2)),
            ("non-final binary", &[0x02, 0x05], c, BIG, h(false, OpCode::Binary, None, 5, 2)),
            ("continuation", &[0x80, 0x80, 1, 2, 3, 4], s, BIG, h(true, OpCode::Continuation, Some([1, 2, 3, 4]), 0, 6)),
            ("ping of 125", &[0x89, 0xFD, 1, 2, 3, 4], s, BIG, h(true, OpCode::Ping, Some([1, 2, 3, 4]), 125, 6)),
            ("at the limit", &[0x82, 0x7E, 0x03, 0xE8], c, 1000, h(true, OpCode::Binary, None, 1000, 4)),
            ("limit 0, empty", &[0x82, 0x00], c, 0, h(true, OpCode::Binary, None, 0, 2)),
            ("non-minimal 16-bit", &[0x82, 0x7E, 0x00, 0x05], c, BIG, h(true, OpCode::Binary, None, 5, 4)),
            ("non-minimal 64-bit", &[0x82, 0xFF, 0, 0, 0, 0, 0, 0, 0, 0x05, 9, 9, 9, 9], s, BIG, h(true, OpCode::Binary, Some([9; 4]), 5, 14)),
            ("non-minimal control", &[0x89, 0x7E, 0x00, 0x7D], c, BIG, h(true, OpCode::Ping, None, 125, 4)),
            ("largest 64-bit", &[0x82, 0x7F, 0x7F, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF], c, u64::MAX, h(true, OpCode::Binary, None, (1 << 63) - 1, 10)),
        ];
        for &(name, bytes, role, max, expected) in cases {
            check_header(name, bytes, role, max, expected);
        }
    }

    struct Canonical {
        name: &'static str,
        bytes: Vec<u8>,
        fin: bool,
        opcode: OpCode,
        mask: Option<[u8; 4]>,
        payload: Vec<u8>,
    }

    /// One canonical byte string, tested four ways: decode (bytes -> frame and payload), header
    /// value (decode_header gives `FrameHeader::new`), encode (fields -> bytes), emit (header
    /// value -> header bytes).
    fn check_canonical(c: &Canonical) {
        let name = c.name;
        let role = if c.mask.is_some() {
            Role::Server
        } else {
            Role::Client
        };
        let expected = FrameHeader::new(c.fin, c.opcode, c.mask, c.payload.len() as u64);

        // Decode, with trailing bytes that must not be touched.
        let mut buf = c.bytes.clone();
        buf.extend_from_slice(b"next");
        let frame = decode_frame(&mut buf, role, BIG);
        let frame = match frame {
            Ok(Some(frame)) => frame,
            other => panic!("{name}: {other:?}"),
        };
        assert_eq!(frame.header, expected, "{name}");
        assert_eq!(frame.len, c.bytes.len(), "{name}");
        assert_eq!(&buf[frame.payload.clone()], &c.payload[..], "{name}");
        assert_eq!(&buf[frame.len..], b"next", "{name}");

        // Header value.
        assert_eq!(
            decode_header(&c.bytes, role, BIG),
            Ok(Some(expected)),
            "{name}"
        );
        assert_eq!(
            expected.header_len,
            header_len(c.payload.len(), c.mask.is_some())
        );

        // Encode, alone and appended.
        let encoded = encode(c.fin, c.opcode, &c.payload, c.mask);
        assert_eq!(encoded, c.bytes, "{name}");
        assert_eq!(encoded.capacity(), encoded.len(), "{name}: exact capacity");
        let mut out = b"prev".to_vec();
        encode_into(&mut out, c.fin, c.opcode, &c.payload, c.mask);
        assert_eq!(&out[..4], b"prev");
        assert_eq!(&out[4..], &c.bytes[..], "{name}");

        // Emit.
        let mut header = Vec::new();
        expected.emit(&mut header);
        assert_eq!(header, &c.bytes[..expected.header_len], "{name}");

        // Every proper prefix is "need more" and leaves the buffer as it was.
        for n in [0, 1, expected.header_len - 1, c.bytes.len() - 1] {
            let mut prefix = c.bytes[..n].to_vec();
            assert_eq!(
                decode_frame(&mut prefix, role, BIG),
                Ok(None),
                "{name}: {n}"
            );
            assert_eq!(prefix, &c.bytes[..n]);
        }
    }

    fn canonical_frames() -> Vec<Canonical> {
        let with = |head: &[u8], payload: &[u8]| [head, payload].concat();
        let hello_masked = [0x7f, 0x9f, 0x4d, 0x51, 0x58];
        let big256: Vec<u8> = (0..256).map(|i| i as u8).collect();
        let big64k: Vec<u8> = (0..65536).map(|i| (i % 251) as u8).collect();
        vec![
            // RFC 6455 §5.7 examples.
            Canonical {
                name: "5.7 single-frame unmasked text",
                bytes: vec![0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f],
                fin: true,
                opcode: OpCode::Text,
                mask: None,
                payload: b"Hello".to_vec(),
            },
            Canonical {
                name: "5.7 single-frame masked text",
                bytes: with(&[0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d], &hello_masked),
                fin: true,
                opcode: OpCode::Text,
                mask: Some(KEY),
                payload: b"Hello".to_vec(),
            },
            Canonical {
                name: "5.7 fragmented text, first",
                bytes: vec![0x01, 0x03, 0x48, 0x65, 0x6c],
                fin: false,
                opcode: OpCode::Text,
                mask: None,
                payload: b"Hel".to_vec(),
            },
            Canonical {
                name: "5.7 fragmented text, last",
                bytes: vec![0x80, 0x02, 0x6c, 0x6f],
                fin: true,
                opcode: OpCode::Continuation,
                mask: None,
                payload: b"lo".to_vec(),
            },
            Canonical {
                name: "5.7 unmasked ping",
                bytes: vec![0x89, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f],
                fin: true,
                opcode: OpCode::Ping,
                mask: None,
                payload: b"Hello".to_vec(),
            },
            Canonical {
                name: "5.7 masked pong",
                bytes: with(&[0x8a, 0x85, 0x37, 0xfa, 0x21, 0x3d], &hello_masked),
                fin: true,
                opcode: OpCode::Pong,
                mask: Some(KEY),
                payload: b"Hello".to_vec(),
            },
            Canonical {
                name: "5.7 256 bytes binary, 16-bit length",
                bytes: with(&[0x82, 0x7E, 0x01, 0x00], &big256),
                fin: true,
                opcode: OpCode::Binary,
                mask: None,
                payload: big256.clone(),
            },
            Canonical {
                name: "5.7 64 KiB binary, 64-bit length",
                bytes: with(&[0x82, 0x7F, 0, 0, 0, 0, 0, 0x01, 0x00, 0x00], &big64k),
                fin: true,
                opcode: OpCode::Binary,
                mask: None,
                payload: big64k.clone(),
            },
            // Ours.
            Canonical {
                name: "close 1000 masked",
                bytes: vec![0x88, 0x82, 1, 2, 3, 4, 0x03 ^ 1, 0xE8 ^ 2],
                fin: true,
                opcode: OpCode::Close,
                mask: Some([1, 2, 3, 4]),
                payload: vec![0x03, 0xE8],
            },
            Canonical {
                name: "empty unmasked close",
                bytes: vec![0x88, 0x00],
                fin: true,
                opcode: OpCode::Close,
                mask: None,
                payload: vec![],
            },
        ]
    }

    #[test]
    fn canonical_frames_four_ways() {
        for c in canonical_frames() {
            check_canonical(&c);
        }
    }

    /// Payload lengths around the 7/16/64-bit switch points, both roles.
    #[test]
    fn length_encodings_at_their_boundaries() {
        #[rustfmt::skip]
        let cases: &[(usize, u8, usize)] = &[
            // (payload length, 7-bit length field, header length unmasked)
            (0, 0, 2),
            (1, 1, 2),
            (125, 125, 2),
            (126, 126, 4),
            (127, 126, 4),
            (65535, 126, 4),
            (65536, 127, 10),
            (70000, 127, 10),
        ];
        for &(len, len7, unmasked_header) in cases {
            let payload: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
            for mask in [None, Some([0xA0, 0x0B, 0xC0, 0x0D])] {
                let bytes = encode(true, OpCode::Binary, &payload, mask);
                let expected_header = unmasked_header + if mask.is_some() { 4 } else { 0 };
                assert_eq!(header_len(len, mask.is_some()), expected_header, "{len}");
                assert_eq!(bytes.len(), expected_header + len, "{len}");
                assert_eq!(bytes[1] & 0x7F, len7, "{len}");
                assert_eq!(bytes[1] & 0x80 != 0, mask.is_some());

                let role = if mask.is_some() {
                    Role::Server
                } else {
                    Role::Client
                };
                let mut buf = bytes.clone();
                let frame = decode_frame(&mut buf, role, BIG);
                let Ok(Some(frame)) = frame else {
                    panic!("{len}: {frame:?}")
                };
                assert_eq!(frame.header.payload_len, len as u64);
                assert_eq!(frame.header.header_len, expected_header);
                assert_eq!(&buf[frame.payload], &payload[..], "{len}");
                // One byte short of the whole frame is "need more".
                assert_eq!(
                    decode_frame(&mut bytes[..bytes.len() - 1].to_vec(), role, BIG),
                    Ok(None)
                );
                // The same length one below the limit is too big.
                if len > 0 {
                    assert_eq!(
                        decode_header(&bytes, role, len as u64 - 1),
                        Err(MessageTooBig)
                    );
                }
            }
        }
    }

    #[test]
    fn close_payloads() {
        let e_acute_200 = "é".repeat(100); // 200 bytes of 2-byte characters
        let euro_150 = "€".repeat(50); // 150 bytes of 3-byte characters
        let ascii_200 = "x".repeat(200);
        #[rustfmt::skip]
        let cases: &[(&str, CloseCode, &str, usize)] = &[
            // (name, code, reason, expected reason bytes kept)
            ("no reason", CloseCode::NORMAL, "", 0),
            ("short", CloseCode::GOING_AWAY, "bye", 3),
            ("exactly 123", CloseCode::NORMAL, &ascii_200[..123], 123),
            ("ascii cut at 123", CloseCode::NORMAL, &ascii_200, 123),
            ("2-byte chars cut at 122", CloseCode::NORMAL, &e_acute_200, 122),
            ("3-byte chars fit at 123", CloseCode::NORMAL, &euro_150, 123),
        ];
        for &(name, code, reason, kept) in cases {
            let payload = close_payload(code, reason);
            assert_eq!(&payload[..2], &code.0.to_be_bytes(), "{name}");
            assert_eq!(&payload[2..], &reason.as_bytes()[..kept], "{name}");
            assert!(payload.len() <= MAX_CONTROL_PAYLOAD, "{name}");
            assert!(std::str::from_utf8(&payload[2..]).is_ok(), "{name}");
        }
    }

    /// The fast decode takes exactly the frames of its shape, and leaves every other one (and a
    /// frame one byte short) to the general decode, modifying nothing.
    #[test]
    fn simple_data_frames_and_what_is_left_to_the_general_decode() {
        for len in [0usize, 1, 125, 126, 127, 1024, 65535, 65536] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            for (mask, role) in [(Some(KEY), Role::Server), (None, Role::Client)] {
                for opcode in [OpCode::Text, OpCode::Binary] {
                    let bytes = encode(true, opcode, &payload, mask);
                    let mut buf = bytes.clone();
                    buf.push(0xEE); // the next frame's first byte is not touched
                    let simple = decode_simple_data_frame(&mut buf, role, 1 << 20);
                    if len > 65535 {
                        assert_eq!(simple, None, "64-bit length {len}");
                        assert_eq!(&buf[..bytes.len()], &bytes[..]);
                        continue;
                    }
                    let start = bytes.len() - len;
                    let want = SimpleFrame {
                        opcode,
                        payload: start..bytes.len(),
                    };
                    assert_eq!(simple, Some(want), "{len}");
                    assert_eq!(&buf[start..bytes.len()], &payload[..], "{len} unmasked");
                    assert_eq!(buf[bytes.len()], 0xEE);
                    let mut short = bytes[..bytes.len() - 1].to_vec();
                    assert_eq!(decode_simple_data_frame(&mut short, role, 1 << 20), None);
                    assert_eq!(short, &bytes[..bytes.len() - 1], "nothing modified");
                    if len > 0 {
                        let mut over = bytes.clone();
                        assert_eq!(decode_simple_data_frame(&mut over, role, len - 1), None);
                    }
                }
            }
        }
        let mut rsv1 = encode(true, OpCode::Text, b"x", Some(KEY));
        rsv1[0] |= RSV1_BIT;
        #[rustfmt::skip]
        let others: Vec<(&str, Vec<u8>, Role)> = vec![
            ("not final", encode(false, OpCode::Text, b"x", Some(KEY)), Role::Server),
            ("continuation", encode(true, OpCode::Continuation, b"x", Some(KEY)), Role::Server),
            ("ping", encode(true, OpCode::Ping, b"x", Some(KEY)), Role::Server),
            ("close", encode(true, OpCode::Close, b"", Some(KEY)), Role::Server),
            ("rsv1", rsv1, Role::Server),
            ("unmasked to a server", encode(true, OpCode::Text, b"x", None), Role::Server),
            ("masked to a client", encode(true, OpCode::Text, b"x", Some(KEY)), Role::Client),
            ("one byte", vec![0x81], Role::Client),
            ("empty", vec![], Role::Client),
        ];
        for (name, bytes, role) in others {
            let mut buf = bytes.clone();
            assert_eq!(
                decode_simple_data_frame(&mut buf, role, 1 << 20),
                None,
                "{name}"
            );
            assert_eq!(buf, bytes, "{name}: nothing modified");
        }
    }

    fn frame_fields() -> impl Strategy<Value = (bool, OpCode, Vec<u8>)> {
        let data = (
            any::<bool>(),
            prop_oneof![
                Just(OpCode::Continuation),
                Just(OpCode::Text),
                Just(OpCode::Binary)
            ],
            prop_oneof![
                proptest::collection::vec(any::<u8>(), 0..300),
                proptest::collection::vec(any::<u8>(), 65530..65540),
            ],
        );
        let control = (
            Just(true),
            prop_oneof![Just(OpCode::Close), Just(OpCode::Ping), Just(OpCode::Pong)],
            proptest::collection::vec(any::<u8>(), 0..=125),
        );
        prop_oneof![data, control]
    }

    proptest! {
        #[test]
        fn decode_of_encode_is_identity_for_both_roles(
            (fin, opcode, payload) in frame_fields(),
            key in any::<[u8; 4]>(),
            client_sends in any::<bool>(),
            trailing in proptest::collection::vec(any::<u8>(), 0..4),
        ) {
            // A client sends masked frames, which a server decodes; and the reverse.
            let (mask, receiver) = if client_sends {
                (Some(key), Role::Server)
            } else {
                (None, Role::Client)
            };
            let mut buf = encode(fin, opcode, &payload, mask);
            let frame_len = buf.len();
            buf.extend_from_slice(&trailing);
            let frame = decode_frame(&mut buf, receiver, BIG);
            let Ok(Some(frame)) = frame else {
                panic!("{frame:?}")
            };
            prop_assert_eq!(frame.header, FrameHeader::new(fin, opcode, mask, payload.len() as u64));
            prop_assert_eq!(frame.len, frame_len);
            prop_assert_eq!(&buf[frame.payload], &payload[..]);
            prop_assert_eq!(&buf[frame_len..], &trailing[..]);
        }

        /// On any bytes (random ones, and random ones behind a header of the simple shape),
        /// whatever the fast decode accepts the general decode decodes the same way: same
        /// opcode, FIN, no RSV1, same payload, same bytes after unmasking.
        #[test]
        fn the_simple_decode_agrees_with_the_general_one(
            head in prop_oneof![
                Just(vec![]),
                (prop_oneof![Just(0x81u8), Just(0x82)], any::<u8>())
                    .prop_map(|(first, second)| vec![first, second]),
            ],
            rest in proptest::collection::vec(any::<u8>(), 0..200),
            server in any::<bool>(),
            max in prop_oneof![Just(1usize << 20), 0usize..200],
            rsv1_allowed in any::<bool>(),
        ) {
            let role = if server { Role::Server } else { Role::Client };
            let original = [head, rest].concat();
            let mut fast = original.clone();
            let mut general = original.clone();
            match decode_simple_data_frame(&mut fast, role, max) {
                None => prop_assert_eq!(&fast, &original),
                Some(simple) => {
                    let frame = decode_frame_with(&mut general, role, max as u64, rsv1_allowed);
                    let Ok(Some(frame)) = frame else {
                        panic!("{frame:?}")
                    };
                    prop_assert!(frame.header.fin && !frame.header.rsv1);
                    prop_assert_eq!(frame.header.opcode, simple.opcode);
                    prop_assert_eq!(frame.payload, simple.payload);
                    prop_assert_eq!(&fast, &general);
                }
            }
        }
    }
}
