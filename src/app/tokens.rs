//! Tokens of open connections: what each connection's token allows now, and when it stops
//! being valid (SPEC §16; docs/protocol.md, "Access" and "Token refresh and expiry").
//!
//! Owns: `Access` (the claims in force for one connection: `rooms`, `publish`, `info`, and the
//! moment the token expires), `Tokens` (every token-authenticated connection's `Access`, and
//! the connections ordered by expiry), and the close code of an expired token.
//! Does not: verify tokens (`auth.rs`), read a clock (it is handed the time), close connections
//! or send anything (the hub does, through its `Transport`), or arm timers (the hub asks the
//! reactor for one wake-up at the earliest expiry, `Outbox::wake_at`).
//!
//! Why a map of its own and not a field per connection: expiries are needed in time order
//! ("which tokens have run out by now, and when does the next one?"), which a `BTreeSet` keyed
//! by (expiry, connection) answers in O(log n) per change and O(expired) per check, and the
//! reactor keeps one timer for the lot instead of one per connection.
//!
//! Invariant: a connection is in `by_time` iff it is in `access`, under its `expires_ms`.

use super::auth::Grant;
use super::rooms::ConnMap;
use crate::protocol::CloseCode;
use crate::server::ConnId;
use serde_json::value::RawValue;
use std::collections::BTreeSet;
use std::rc::Rc;

/// The close code of a connection whose token expired without a refresh: "get a new token and
/// connect again" (`wire::TOKEN_EXPIRED_CLOSE`, which the client reads). wsrelay itself uses no
/// other 4xxx code (a backend may send any through `POST /api/disconnect`, docs/api.md), so a
/// client acts on the code without reading the reason.
pub const TOKEN_EXPIRED: CloseCode = CloseCode(crate::wire::TOKEN_EXPIRED_CLOSE);

/// The close reason sent with `TOKEN_EXPIRED`.
pub const TOKEN_EXPIRED_REASON: &str = "token expired";

/// What one connection's token allows now. Replaced whole by a refresh.
#[derive(Clone, Debug)]
pub struct Access {
    /// Rooms it may join (and raw rooms it may be in); `None`: any.
    pub rooms: Option<Rc<[String]>>,
    /// Rooms it may publish to (the `publish` claim, defaulting to `rooms`); `None`: any.
    pub publish: Option<Rc<[String]>>,
    /// The `info` claim, shown to others in presence events and `members`.
    pub info: Option<Rc<RawValue>>,
    /// Wall-clock milliseconds at which the token stops being valid: `exp` plus the leeway,
    /// the same moment a new connection with this token would start being refused.
    pub expires_ms: u64,
}

impl Access {
    /// The access a verified grant gives, with `leeway_ms` of clock skew after its `exp`.
    pub fn new(grant: Grant, leeway_ms: u64) -> Access {
        Access {
            rooms: grant.rooms.map(Rc::from),
            publish: grant.publish.map(Rc::from),
            // `auth` wrote this text from a JSON value: it is valid JSON.
            info: grant
                .info
                .and_then(|text| RawValue::from_string(text).ok())
                .map(Rc::from),
            expires_ms: grant.exp_ms.saturating_add(leeway_ms),
        }
    }

    pub fn may_join(&self, room: &str) -> bool {
        listed(self.rooms.as_deref(), room)
    }

    pub fn may_publish(&self, room: &str) -> bool {
        listed(self.publish.as_deref(), room)
    }
}

/// Is `room` in a claim's list? An absent claim allows every room.
fn listed(claim: Option<&[String]>, room: &str) -> bool {
    claim.is_none_or(|rooms| rooms.iter().any(|r| r == room))
}

/// The `Access` of every connection that was admitted with a token, and their expiries in order.
#[derive(Default)]
pub struct Tokens {
    access: ConnMap<Access>,
    /// (expires_ms, connection), earliest first.
    by_time: BTreeSet<(u64, ConnId)>,
    /// How many connections are in `access` (`ConnMap` does not count).
    len: usize,
}

impl Tokens {
    /// Gives `conn` its access, replacing what it had (a refresh) and its place in time.
    pub fn insert(&mut self, conn: ConnId, access: Access) {
        match self.access.get_mut(conn) {
            Some(old) => {
                self.by_time.remove(&(old.expires_ms, conn));
                self.by_time.insert((access.expires_ms, conn));
                *old = access;
            }
            None => {
                self.by_time.insert((access.expires_ms, conn));
                self.access.entry(conn, move || access);
                self.len += 1;
            }
        }
    }

    /// Forgets `conn` (it closed). Returns what it had, if it had a token.
    pub fn remove(&mut self, conn: ConnId) -> Option<Access> {
        let access = self.access.remove(conn)?;
        self.by_time.remove(&(access.expires_ms, conn));
        self.len -= 1;
        Some(access)
    }

    pub fn get(&self, conn: ConnId) -> Option<&Access> {
        self.access.get(conn)
    }

    /// May `conn` join `room`? A connection without a token (no `--jwt-secret`) may.
    pub fn may_join(&self, conn: ConnId, room: &str) -> bool {
        self.get(conn).is_none_or(|a| a.may_join(room))
    }

    /// May `conn` publish to `room`? A connection without a token may.
    pub fn may_publish(&self, conn: ConnId, room: &str) -> bool {
        self.get(conn).is_none_or(|a| a.may_publish(room))
    }

    /// The `info` claim of `conn`'s token, if any.
    pub fn info(&self, conn: ConnId) -> Option<Rc<RawValue>> {
        self.get(conn).and_then(|a| a.info.clone())
    }

    /// Takes out every connection whose token has expired at `now_ms`, earliest first, into
    /// `out`. They are forgotten here: the caller closes them.
    pub fn expire(&mut self, now_ms: u64, out: &mut Vec<ConnId>) {
        while let Some(&(at, conn)) = self.by_time.first() {
            if at > now_ms {
                break;
            }
            self.remove(conn);
            out.push(conn);
        }
    }

    /// When the next token expires (wall-clock ms), if any connection has one.
    pub fn next_expiry(&self) -> Option<u64> {
        self.by_time.first().map(|&(at, _)| at)
    }

    /// Connections with a token.
    pub fn len(&self) -> usize {
        debug_assert_eq!(self.len, self.by_time.len());
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(slot: u32) -> ConnId {
        ConnId {
            slot,
            generation: 1,
        }
    }

    fn access(expires_ms: u64) -> Access {
        Access {
            rooms: None,
            publish: Some(Rc::from(vec!["news".to_string()])),
            info: None,
            expires_ms,
        }
    }

    #[test]
    fn expiries_come_out_in_time_order_and_only_when_due() {
        let mut t = Tokens::default();
        t.insert(conn(1), access(300));
        t.insert(conn(2), access(100));
        t.insert(conn(3), access(200));
        assert_eq!((t.len(), t.next_expiry()), (3, Some(100)));
        let mut due = Vec::new();
        t.expire(99, &mut due);
        assert!(due.is_empty());
        t.expire(200, &mut due);
        assert_eq!(due, [conn(2), conn(3)]);
        assert_eq!((t.len(), t.next_expiry()), (1, Some(300)));
        t.remove(conn(1));
        assert_eq!((t.len(), t.next_expiry()), (0, None));
    }

    #[test]
    fn a_refresh_moves_the_connection_in_time_and_replaces_its_claims() {
        let mut t = Tokens::default();
        t.insert(conn(1), access(100));
        t.insert(conn(2), access(150));
        let mut refreshed = access(500);
        refreshed.publish = None;
        t.insert(conn(1), refreshed);
        assert_eq!((t.len(), t.next_expiry()), (2, Some(150)));
        assert!(t.may_publish(conn(1), "anything"));
        assert!(!t.may_publish(conn(2), "anything"));
        let mut due = Vec::new();
        t.expire(400, &mut due);
        assert_eq!(due, [conn(2)], "the old expiry of conn 1 is gone");
        t.expire(500, &mut due);
        assert_eq!(due, [conn(2), conn(1)]);
    }

    #[test]
    fn a_connection_without_a_token_is_not_restricted() {
        let mut t = Tokens::default();
        assert!(t.may_join(conn(1), "x") && t.may_publish(conn(1), "x"));
        t.insert(conn(1), access(100));
        assert!(t.may_join(conn(1), "x"));
        assert!(!t.may_publish(conn(1), "x"));
        // A successor in the same slot (another generation) is not the old connection.
        let successor = ConnId {
            slot: 1,
            generation: 2,
        };
        assert!(t.may_publish(successor, "x"));
        assert!(t.remove(successor).is_none());
        assert_eq!(t.len(), 1);
    }
}
