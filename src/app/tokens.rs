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
//! Fail closed: with `--jwt-secret` every WebSocket connection was admitted with a token, so a
//! connection without an entry here (or whose token has expired and is being closed) may do
//! nothing (`Tokens::new(true)`). Senders that have no token by design (the server API's
//! backend) are allowed by the hub explicitly, never by their absence from this map.
//!
//! An expired connection keeps its entry, marked expired, until it is closed (`remove`): its
//! `info` is still shown in the `leave` events its close sends (SPEC §16: every presence event
//! about a connection carries its info), but it is allowed nothing any more.
//!
//! Invariant: a connection is in `by_time` iff it is in `access` and not expired, under its
//! `expires_ms`.

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

/// One connection's entry: its access, and whether its token has expired (it is being closed).
struct Entry {
    access: Access,
    expired: bool,
}

/// The `Access` of every connection that was admitted with a token, and their expiries in order.
#[derive(Default)]
pub struct Tokens {
    access: ConnMap<Entry>,
    /// (expires_ms, connection) of every connection whose token has not expired, earliest first.
    by_time: BTreeSet<(u64, ConnId)>,
    /// How many connections have a token that has not expired (`ConnMap` does not count).
    len: usize,
    /// Tokens are required (`--jwt-secret`): a connection without a live token may do nothing.
    required: bool,
}

impl Tokens {
    /// `required`: a verifier is configured, so every connection must have a token, and one
    /// without an entry is refused everything (fail closed).
    pub fn new(required: bool) -> Tokens {
        Tokens {
            required,
            ..Tokens::default()
        }
    }

    /// Gives `conn` its access, replacing what it had (a refresh) and its place in time. A
    /// connection whose token has expired stays expired: it is being closed, and a token
    /// arriving now is too late.
    pub fn insert(&mut self, conn: ConnId, access: Access) {
        match self.access.get_mut(conn) {
            Some(old) if old.expired => {}
            Some(old) => {
                self.by_time.remove(&(old.access.expires_ms, conn));
                self.by_time.insert((access.expires_ms, conn));
                old.access = access;
            }
            None => {
                self.by_time.insert((access.expires_ms, conn));
                let entry = Entry {
                    access,
                    expired: false,
                };
                self.access.entry(conn, move || entry);
                self.len += 1;
            }
        }
    }

    /// Forgets `conn` (it closed). Returns what it had, if it had a token (expired or not).
    pub fn remove(&mut self, conn: ConnId) -> Option<Access> {
        let entry = self.access.remove(conn)?;
        if !entry.expired {
            self.by_time.remove(&(entry.access.expires_ms, conn));
            self.len -= 1;
        }
        Some(entry.access)
    }

    /// What `conn`'s token allowed, also after it expired (until the connection is closed).
    pub fn get(&self, conn: ConnId) -> Option<&Access> {
        self.access.get(conn).map(|entry| &entry.access)
    }

    /// Has `conn`'s token expired (the connection is being closed with `TOKEN_EXPIRED`)?
    pub fn is_expired(&self, conn: ConnId) -> bool {
        self.access.get(conn).is_some_and(|entry| entry.expired)
    }

    /// The access `conn` has now: `Ok(None)` for no token on a server that requires none,
    /// `Err(())` when it may do nothing (no live token where one is required).
    fn live(&self, conn: ConnId) -> Result<Option<&Access>, ()> {
        match self.access.get(conn) {
            Some(entry) if entry.expired => Err(()),
            Some(entry) => Ok(Some(&entry.access)),
            None if self.required => Err(()),
            None => Ok(None),
        }
    }

    /// May `conn` join `room`? Without `--jwt-secret` (no token required) it may; with it,
    /// only within a live token's `rooms` claim.
    pub fn may_join(&self, conn: ConnId, room: &str) -> bool {
        self.live(conn)
            .is_ok_and(|access| access.is_none_or(|a| a.may_join(room)))
    }

    /// May `conn` publish to `room`? As `may_join`, with the `publish` claim.
    pub fn may_publish(&self, conn: ConnId, room: &str) -> bool {
        self.live(conn)
            .is_ok_and(|access| access.is_none_or(|a| a.may_publish(room)))
    }

    /// The `info` claim of `conn`'s token, if any.
    pub fn info(&self, conn: ConnId) -> Option<Rc<RawValue>> {
        self.get(conn).and_then(|a| a.info.clone())
    }

    /// Marks every connection whose token has expired at `now_ms` as expired, earliest first,
    /// and lists it in `out`: the caller closes them. From now on they may do nothing; their
    /// entry (and `info`) stays until `remove`.
    pub fn expire(&mut self, now_ms: u64, out: &mut Vec<ConnId>) {
        while let Some(&(at, conn)) = self.by_time.first() {
            if at > now_ms {
                break;
            }
            self.by_time.remove(&(at, conn));
            self.len -= 1;
            if let Some(entry) = self.access.get_mut(conn) {
                entry.expired = true;
            }
            out.push(conn);
        }
    }

    /// When the next token expires (wall-clock ms), if any connection has one.
    pub fn next_expiry(&self) -> Option<u64> {
        self.by_time.first().map(|&(at, _)| at)
    }

    /// Connections with a token that has not expired.
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
        // The expired ones are still known (for their close) until they are removed.
        assert!(t.is_expired(conn(2)) && t.remove(conn(2)).is_some());
        assert!(!t.is_expired(conn(2)) && t.remove(conn(2)).is_none());
        assert_eq!(t.len(), 0);
    }

    /// Fail closed: with tokens required, no entry and an expired entry both allow nothing,
    /// while the expired entry still tells its info; a refresh cannot revive it.
    #[test]
    fn with_tokens_required_a_connection_without_a_live_token_may_do_nothing() {
        let mut t = Tokens::new(true);
        assert!(!t.may_join(conn(1), "x") && !t.may_publish(conn(1), "x"));
        let mut open = access(100);
        open.publish = None;
        open.info = RawValue::from_string(r#"{"n":1}"#.into())
            .ok()
            .map(Rc::from);
        t.insert(conn(1), open.clone());
        assert!(t.may_join(conn(1), "x") && t.may_publish(conn(1), "x"));
        t.expire(100, &mut Vec::new());
        assert!(!t.may_join(conn(1), "x") && !t.may_publish(conn(1), "x"));
        assert_eq!(
            t.info(conn(1)).map(|i| i.get().to_string()),
            Some(r#"{"n":1}"#.into())
        );
        t.insert(conn(1), access(500));
        assert!(t.is_expired(conn(1)) && !t.may_join(conn(1), "x"));
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
