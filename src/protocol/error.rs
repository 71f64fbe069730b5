//! Errors of the WebSocket protocol layer, each with the close code it produces.
//!
//! Owns: `ProtocolError` and its one exhaustive mapping to a `CloseCode` (SPEC §4).
//! Does not: handshake errors (those map to HTTP statuses, see `handshake.rs`).

use super::close::CloseCode;
use std::fmt;

/// Something the peer sent that ends the connection. "Not enough bytes yet" is not an error:
/// decoders return `Ok(None)` for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProtocolError {
    /// RFC 6455 §5.2: RSV1-3 must be 0 unless an extension defining them was negotiated.
    ReservedBits,
    /// RFC 6455 §5.2: opcodes 0x3-0x7 and 0xB-0xF are reserved.
    UnknownOpCode(u8),
    /// RFC 6455 §5.3: a client must mask every frame it sends to a server.
    UnmaskedFrame,
    /// RFC 6455 §5.1: a server must not mask frames it sends to a client.
    MaskedFrame,
    /// RFC 6455 §5.5: control frames must not be fragmented.
    FragmentedControl,
    /// RFC 6455 §5.5: control frames carry at most 125 bytes of payload.
    ControlTooLong,
    /// RFC 6455 §5.4: a continuation frame arrived with no fragmented message open.
    StrayContinuation,
    /// RFC 6455 §5.4: a new data frame arrived while a fragmented message was still open.
    InterleavedMessage,
    /// RFC 6455 §5.2: the most significant bit of a 64-bit payload length must be 0.
    LengthTopBit,
    /// RFC 6455 §5.5.1: a Close payload is empty or at least the two-byte code.
    CloseTooShort,
    /// RFC 6455 §7.4: the peer sent a close code that may not appear on the wire.
    InvalidCloseCode(u16),
    /// RFC 6455 §8.1: a text message (or a close reason) is not valid UTF-8.
    InvalidUtf8,
    /// SPEC §4: a frame or message exceeds `--max-message` (for a compressed message, once
    /// inflated: SPEC §17).
    MessageTooBig,
    /// RFC 7692 §6.2: the payload of a compressed message is not valid DEFLATE data. RFC 7692
    /// names no close code; 1007 is RFC 6455 §7.4.1's "data within a message that was not
    /// consistent with the type of the message": the framing was valid and RSV1 was allowed,
    /// it is the message's data that cannot be what RSV1 says it is (as Node's `ws` answers).
    InvalidCompressedData,
}

impl ProtocolError {
    /// The close code we send when this error ends a connection.
    pub fn close_code(self) -> CloseCode {
        match self {
            ProtocolError::ReservedBits
            | ProtocolError::UnknownOpCode(_)
            | ProtocolError::UnmaskedFrame
            | ProtocolError::MaskedFrame
            | ProtocolError::FragmentedControl
            | ProtocolError::ControlTooLong
            | ProtocolError::StrayContinuation
            | ProtocolError::InterleavedMessage
            | ProtocolError::LengthTopBit
            | ProtocolError::CloseTooShort
            | ProtocolError::InvalidCloseCode(_) => CloseCode::PROTOCOL_ERROR,
            ProtocolError::InvalidUtf8 | ProtocolError::InvalidCompressedData => {
                CloseCode::INVALID_PAYLOAD
            }
            ProtocolError::MessageTooBig => CloseCode::MESSAGE_TOO_BIG,
        }
    }

    /// A short reason for the Close frame and the logs (ASCII, well under 123 bytes).
    pub fn reason(self) -> &'static str {
        match self {
            ProtocolError::ReservedBits => "reserved bits set",
            ProtocolError::UnknownOpCode(_) => "unknown opcode",
            ProtocolError::UnmaskedFrame => "client frame not masked",
            ProtocolError::MaskedFrame => "server frame masked",
            ProtocolError::FragmentedControl => "fragmented control frame",
            ProtocolError::ControlTooLong => "control frame payload over 125 bytes",
            ProtocolError::StrayContinuation => "continuation without a message",
            ProtocolError::InterleavedMessage => "new message inside a fragmented one",
            ProtocolError::LengthTopBit => "64-bit length with top bit set",
            ProtocolError::CloseTooShort => "close payload of one byte",
            ProtocolError::InvalidCloseCode(_) => "invalid close code",
            ProtocolError::InvalidUtf8 => "invalid UTF-8",
            ProtocolError::MessageTooBig => "message too big",
            ProtocolError::InvalidCompressedData => "invalid compressed data",
        }
    }
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (close {})", self.reason(), self.close_code())
    }
}

impl std::error::Error for ProtocolError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_maps_to_its_close_code() {
        use ProtocolError::*;
        let table: &[(ProtocolError, u16)] = &[
            (ReservedBits, 1002),
            (UnknownOpCode(3), 1002),
            (UnmaskedFrame, 1002),
            (MaskedFrame, 1002),
            (FragmentedControl, 1002),
            (ControlTooLong, 1002),
            (StrayContinuation, 1002),
            (InterleavedMessage, 1002),
            (LengthTopBit, 1002),
            (CloseTooShort, 1002),
            (InvalidCloseCode(1005), 1002),
            (InvalidUtf8, 1007),
            (MessageTooBig, 1009),
            (InvalidCompressedData, 1007),
        ];
        for &(err, code) in table {
            assert_eq!(err.close_code().0, code, "{err:?}");
            assert!(err.reason().len() <= 123);
        }
    }
}
