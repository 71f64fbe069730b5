//! Close codes of RFC 6455 §7.4: which exist, which may be sent, which a peer may send us.
//!
//! Owns: the `CloseCode` newtype, its named constants and the validity rule for codes received
//! in a Close frame (SPEC §4).
//! Does not: parse Close frames (see `message.rs`) or decide when to close (the reactor does).

use std::fmt;

/// A close status code as carried in the first two bytes of a Close frame payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CloseCode(pub u16);

impl CloseCode {
    /// 1000: the purpose of the connection has been fulfilled.
    pub const NORMAL: CloseCode = CloseCode(1000);
    /// 1001: the endpoint is going away (server shutdown, page navigation).
    pub const GOING_AWAY: CloseCode = CloseCode(1001);
    /// 1002: the peer broke the protocol (bad framing, bad masking, reserved bits ...).
    pub const PROTOCOL_ERROR: CloseCode = CloseCode(1002);
    /// 1003: the endpoint received a data type it cannot accept.
    pub const UNSUPPORTED_DATA: CloseCode = CloseCode(1003);
    /// 1005: reserved; means "no status code was present". Never sent on the wire.
    pub const NO_STATUS: CloseCode = CloseCode(1005);
    /// 1006: reserved; means "closed without a Close frame". Never sent on the wire.
    pub const ABNORMAL: CloseCode = CloseCode(1006);
    /// 1007: a message's payload was not consistent with its type (invalid UTF-8 in text).
    pub const INVALID_PAYLOAD: CloseCode = CloseCode(1007);
    /// 1008: a message violated the endpoint's policy (rate limit, slow consumer).
    pub const POLICY_VIOLATION: CloseCode = CloseCode(1008);
    /// 1009: a message was too big to process (`--max-message`).
    pub const MESSAGE_TOO_BIG: CloseCode = CloseCode(1009);
    /// 1011: the server met an unexpected condition.
    pub const INTERNAL_ERROR: CloseCode = CloseCode(1011);

    /// May a peer send this code in a Close frame?
    ///
    /// RFC 6455 §7.4.1/§7.4.2: 1000-1003 and 1007-1011 are defined; 1004 is reserved; 1005, 1006
    /// and 1015 must never appear on the wire; 1012-1014 are registered with IANA since the RFC;
    /// the rest of 1000-2999 is unassigned; 3000-4999 belong to libraries and applications;
    /// anything below 1000 or from 5000 up is invalid.
    pub fn is_valid_received(self) -> bool {
        matches!(self.0, 1000..=1003 | 1007..=1014 | 3000..=4999)
    }
}

impl fmt::Display for CloseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validity_table() {
        let cases: &[(u16, bool)] = &[
            (0, false),
            (999, false),
            (1000, true),
            (1001, true),
            (1002, true),
            (1003, true),
            (1004, false),
            (1005, false),
            (1006, false),
            (1007, true),
            (1011, true),
            (1012, true),
            (1014, true),
            (1015, false),
            (1016, false),
            (2999, false),
            (3000, true),
            (4999, true),
            (5000, false),
            (65535, false),
        ];
        for &(code, valid) in cases {
            assert_eq!(CloseCode(code).is_valid_received(), valid, "code {code}");
        }
    }
}
