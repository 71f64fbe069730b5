//! Words of the `/ws` envelope protocol that both ends spell: the relay writes them
//! (`app::envelope`) and `wsrelay client` reads them (`client::session`, `client::envelope`).
//!
//! Owns: `AckStatus`, the `status` of an ack (SPEC §6; docs/protocol.md "Acks"), with its one
//! spelling on the wire; `TOKEN_EXPIRED_CLOSE`, the close code of an expired token (SPEC §16).
//! Does not: shape whole envelopes (each side has its own: the relay borrows the client's
//! payload, the client keeps every field as text) or decide which status a message gets.
//!
//! Why a module of its own: the client may not depend on the hub's modules, and the WebSocket
//! layer (`protocol`) knows nothing of envelopes (SPEC §1); both may depend on this one, which
//! depends on nothing.

use serde::{Serialize, Serializer};

/// The close code the relay sends when a connection's token expired without a refresh: the
/// client should get a new token and connect again (docs/protocol.md, "Close codes"). In the
/// 4000-4999 range RFC 6455 §7.4.2 leaves to applications.
pub const TOKEN_EXPIRED_CLOSE: u16 = 4001;

/// The outcome of a `send` or `publish`, as told in its ack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AckStatus {
    /// Queued on at least one connection of the recipient (send) or handed to every current
    /// member of the room (publish).
    Delivered,
    /// Publish only: queued for some current members and dropped for others (over
    /// `--max-outbound` with `--slow-consumer drop`); `reason` says for how many.
    Partial,
    /// The recipient has no connection that took it; it waits in the offline queue.
    Queued,
    /// Not accepted; the ack's `reason` says why (for instance, a room outside the token's
    /// `rooms` claim).
    Rejected,
}

impl AckStatus {
    /// Every status, for tests and listings.
    pub const ALL: [AckStatus; 4] = [
        AckStatus::Delivered,
        AckStatus::Partial,
        AckStatus::Queued,
        AckStatus::Rejected,
    ];

    /// The spelling on the wire (and in the `status` label of `wsrelay_acks_total`).
    pub fn name(self) -> &'static str {
        match self {
            AckStatus::Delivered => "delivered",
            AckStatus::Partial => "partial",
            AckStatus::Queued => "queued",
            AckStatus::Rejected => "rejected",
        }
    }

    /// The status for its wire spelling; unknown spellings (a newer server's) are `None`.
    pub fn parse(text: &str) -> Option<AckStatus> {
        AckStatus::ALL.into_iter().find(|s| s.name() == text)
    }
}

impl Serialize for AckStatus {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings_round_trip_and_unknown_ones_are_none() {
        for status in AckStatus::ALL {
            assert_eq!(AckStatus::parse(status.name()), Some(status));
            assert_eq!(
                serde_json::to_string(&status).unwrap(),
                format!("\"{}\"", status.name())
            );
        }
        assert_eq!(AckStatus::parse("delivered"), Some(AckStatus::Delivered));
        assert_eq!(AckStatus::parse("partial"), Some(AckStatus::Partial));
        assert_eq!(AckStatus::parse("queued"), Some(AckStatus::Queued));
        assert_eq!(AckStatus::parse("rejected"), Some(AckStatus::Rejected));
        for unknown in ["Delivered", "", "accepted"] {
            assert_eq!(AckStatus::parse(unknown), None, "{unknown:?}");
        }
    }
}
