//! Presence across the seam: which connections are in which rooms on other nodes (SPEC §6, §15).
//!
//! Owns: the values presence crosses the engine seam with: `LocalMember` (a connection of this
//! hub that joined a room, as the hub tells the engine), `MemberKey` (one connection named
//! across every node), `Member` (a connection on another node, as the engine's replica holds
//! it) and `PresenceChange` (a join or leave made on another node).
//! Does not: decide who hears a change or render presence frames (the hub does), keep the
//! replica (an engine that shares rooms does), or parse `info` (opaque JSON text to the engine).
//!
//! Presence is per connection, as it is on one node: two devices of one id in a room are two
//! members, so a member is named by its connection (`MemberKey`), not by its id. The local
//! engines keep no replica: with one node every member is local, and the hub already knows them.

use std::fmt;
use std::rc::Rc;

/// A connection of this hub that joined a room: what `Engine::member_joined` is told. Borrowed,
/// so a local engine, which ignores it, costs the hub no allocation.
#[derive(Clone, Copy, Debug)]
pub struct LocalMember<'a> {
    /// The connection, unique within this node for the node's life (the hub's `ConnId`
    /// packed: slot and generation). The engine adds its node's name to make a `MemberKey`.
    pub conn: u64,
    /// The id the connection is connected as.
    pub id: &'a str,
    /// The `info` claim of its token, as JSON text (SPEC §16), shown with it to others.
    pub info: Option<&'a str>,
}

/// One connection named across every node: the node's name and the connection's number there.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MemberKey {
    pub node: Rc<str>,
    pub conn: u64,
}

impl fmt::Display for MemberKey {
    /// `node/conn`: how logs (and a shared store's hash fields) spell it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.node, self.conn)
    }
}

/// A member of a room connected to another node, as the engine's replica holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub key: MemberKey,
    pub id: Rc<str>,
    /// The `info` claim of its token, as JSON text. It crossed a network: the hub checks it is
    /// JSON before showing it, and shows `null` if not.
    pub info: Option<Rc<str>>,
}

/// A connection on another node joined or left a room this hub holds members of
/// (`Event::Presence`). A member whose node stopped refreshing it (a crash) arrives as a leave
/// once its entry expires. An engine never reports this node's own changes back: the hub
/// announced those itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PresenceChange {
    pub room: Rc<str>,
    pub member: Member,
    /// True for a join, false for a leave.
    pub joined: bool,
}
