//! The roster: an engine's replica of who is in the rooms it follows on other nodes (SPEC §15).
//!
//! Owns: `Roster`, the members on other nodes of each room this node follows, kept current from
//! two sources a shared store gives (a Redis engine: a room's presence hash read whole, and the
//! join/leave records published on the room's channel), and the `PresenceChange`s the hub must
//! hear when the replica changes.
//! Does not: talk to the store (the engine does), decide who hears a change (the hub does), or
//! hold this node's own members (the hub knows them; the roster ignores this node's records).
//!
//! # Snapshots, records and versions
//!
//! The store keeps a **version** per room, bumped by every change to the room's members, and
//! hands it out with both sources: a snapshot carries the version it was read at, each record
//! the version its change made. That puts the two in one order whatever order they arrive in
//! (a snapshot comes back on the command connection, records on the PUB/SUB one):
//!
//! * while snapshots of a room are being read (one or more: `load` counts them), records are
//!   held;
//! * a snapshot at least as new as the replica replaces it (an older one, overtaken by
//!   records, is dropped); held records it already contains (version at or below the
//!   snapshot's) are dropped, and once no snapshot is outstanding the newer ones are applied in
//!   version order;
//! * after that, a record whose version is not the next one means records were lost (PUB/SUB
//!   is at-most-once): it is applied, and the room is marked for a new snapshot (`stale`).
//!
//! Every snapshot announces its difference to the replica as joins and leaves: a later one
//! (after a gap, once the subscription is known to be in effect, after a PUB/SUB reconnect)
//! so that members here hear what they missed, and the first one too, as joins of everyone on
//! other nodes. The node's first member of the room had its join confirmed at once, before its
//! node could know who was there, or which of them joined before it (Redis may even record a
//! join made later elsewhere first). A client applies a `members` answer as the room's state
//! and the events after it on top (docs/protocol.md), so a join of someone it already listed
//! changes nothing for it, and one it could not list yet reaches it: no member is missed. Only
//! the first member on a node can hear such a join; later ones learn who is there from
//! `members`, as on one node.

use super::presence::{Member, MemberKey, PresenceChange};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::rc::Rc;

/// A change to a room's members as the shared store reports it (a record on the room's
/// channel).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// The room's version after this change.
    pub version: u64,
    pub member: Member,
    pub joined: bool,
}

/// What the roster holds for one room.
#[derive(Debug, Default)]
struct Room {
    /// The members on other nodes.
    members: BTreeMap<MemberKey, Member>,
    /// The version `members` is at; `None` until the first snapshot.
    version: Option<u64>,
    /// Snapshots asked for and not come back yet: while any is, records wait in `held`.
    loading: u32,
    held: Vec<Record>,
}

impl Room {
    /// Replaces the replica with a snapshot at `version` (this node's own members skipped),
    /// announcing the difference (the first: everyone in it).
    fn apply(
        &mut self,
        name: &Rc<str>,
        version: u64,
        members: Vec<Member>,
        node: &str,
        out: &mut Vec<PresenceChange>,
    ) {
        let fresh: BTreeMap<MemberKey, Member> = members
            .into_iter()
            .filter(|m| &*m.key.node != node)
            .map(|m| (m.key.clone(), m))
            .collect();
        for (key, member) in &self.members {
            if !fresh.contains_key(key) {
                out.push(change(name, member.clone(), false));
            }
        }
        for (key, member) in &fresh {
            if !self.members.contains_key(key) {
                out.push(change(name, member.clone(), true));
            }
        }
        self.members = fresh;
        self.version = Some(version);
    }
}

/// The replica of the rooms one node follows. See the module doc.
#[derive(Debug)]
pub struct Roster {
    /// This node's name: records about its own members are not kept or announced.
    node: Rc<str>,
    rooms: HashMap<Rc<str>, Room>,
    /// Rooms that lost records (or whose snapshot failed) since their last snapshot: a new one
    /// is needed. A set of its own, so that asking (at every engine `maintain`, which runs on
    /// every call into the hub) costs nothing when no room needs one.
    stale: HashSet<Rc<str>>,
}

impl Roster {
    pub fn new(node: Rc<str>) -> Roster {
        Roster {
            node,
            rooms: HashMap::new(),
            stale: HashSet::new(),
        }
    }

    /// Starts following `room`, or asks for a new snapshot of a room followed already (after a
    /// PUB/SUB reconnect, or when `stale`): records wait until `loaded`. The engine then reads
    /// the snapshot.
    pub fn load(&mut self, room: &str) {
        let state = self.rooms.entry(Rc::from(room)).or_default();
        state.loading += 1;
        self.stale.remove(room);
    }

    /// A snapshot of `room` is coming that was not asked for with `load` (the workers' bus
    /// sends one in place of records it held back from a full queue): it is taken like one
    /// asked for, if `room` is followed and no snapshot is being read already (that one will
    /// do; a record the older one lacks then shows as a gap, and the room is read again).
    pub fn expect_snapshot(&mut self, room: &str) {
        if let Some(state) = self.rooms.get_mut(room) {
            if state.loading == 0 {
                state.loading = 1;
            }
        }
    }

    /// Stops following `room`: its replica is dropped, nothing is announced (nobody here is
    /// left to hear it).
    pub fn unfollow(&mut self, room: &str) {
        self.rooms.remove(room);
        self.stale.remove(room);
    }

    pub fn follows(&self, room: &str) -> bool {
        self.rooms.contains_key(room)
    }

    /// The rooms that lost records and need a new snapshot; each is reported once per `load`.
    pub fn stale(&self) -> impl Iterator<Item = &str> + '_ {
        self.stale
            .iter()
            .filter(|name| self.rooms.get(&***name).is_some_and(|r| r.loading == 0))
            .map(|name| &**name)
    }

    /// A snapshot of `room` read at `version`: every member, this node's own included (they
    /// are skipped). Ignored for a room not followed or with no snapshot outstanding
    /// (unfollowed meanwhile), and when older than the replica (records overtook it).
    pub fn loaded(
        &mut self,
        room: &str,
        version: u64,
        members: Vec<Member>,
        out: &mut Vec<PresenceChange>,
    ) {
        let node = Rc::clone(&self.node);
        let Some((name, state)) = self.room_mut(room) else {
            return;
        };
        if state.loading == 0 {
            return;
        }
        state.loading -= 1;
        if state.version.is_none_or(|v| v <= version) {
            state.apply(&name, version, members, &node, out);
        }
        let now_at = state.version.unwrap_or(0);
        let mut held: Vec<Record> = std::mem::take(&mut state.held)
            .into_iter()
            .filter(|r| r.version > now_at)
            .collect();
        if state.loading > 0 {
            state.held = held; // the next snapshot may hold them already
            return;
        }
        held.sort_by_key(|r| r.version);
        for record in held {
            self.record(room, record, out);
        }
    }

    /// A snapshot of `room` could not be read (the store was unreachable): the room is stale
    /// (`stale` names it for another try), and once no other snapshot is outstanding the held
    /// records are applied, if a replica exists to apply them to.
    pub fn load_failed(&mut self, room: &str, out: &mut Vec<PresenceChange>) {
        let Some((name, state)) = self.room_mut(room) else {
            return;
        };
        if state.loading == 0 {
            return;
        }
        state.loading -= 1;
        let more = state.loading > 0;
        self.stale.insert(name);
        if more {
            return;
        }
        let Some(state) = self.rooms.get_mut(room) else {
            return;
        };
        let mut held = std::mem::take(&mut state.held);
        held.sort_by_key(|r| r.version);
        for record in held {
            self.record(room, record, out);
        }
    }

    /// A record of a change in `room`, applied now or held until the snapshot.
    pub fn record(&mut self, room: &str, record: Record, out: &mut Vec<PresenceChange>) {
        let node = Rc::clone(&self.node);
        let Some((name, state)) = self.room_mut(room) else {
            return; // not followed (any more)
        };
        if state.loading > 0 {
            state.held.push(record);
            return;
        }
        let Some(version) = state.version else {
            return;
        };
        if record.version <= version {
            return; // already in the snapshot, or heard twice
        }
        let gap = record.version != version + 1; // records in between were lost
        state.version = Some(record.version);
        // This node's own change is not kept or announced: the hub announced it.
        if record.member.key.node != node {
            let key = record.member.key.clone();
            let changed = if record.joined {
                state.members.insert(key, record.member.clone()).is_none()
            } else {
                state.members.remove(&key).is_some()
            };
            if changed {
                out.push(change(&name, record.member, record.joined));
            }
        }
        if gap {
            self.stale.insert(name);
        }
    }

    /// A followed room's name (shared with the changes it makes) and state.
    fn room_mut(&mut self, room: &str) -> Option<(Rc<str>, &mut Room)> {
        let name = Rc::clone(self.rooms.get_key_value(room)?.0);
        self.rooms.get_mut(room).map(|state| (name, state))
    }

    /// The members of `room` on other nodes, in key order (empty if not followed).
    pub fn members(&self, room: &str) -> Vec<Member> {
        self.rooms
            .get(room)
            .map(|r| r.members.values().cloned().collect())
            .unwrap_or_default()
    }
}

fn change(room: &Rc<str>, member: Member, joined: bool) -> PresenceChange {
    PresenceChange {
        room: Rc::clone(room),
        member,
        joined,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(node: &str, conn: u64, id: &str) -> Member {
        Member {
            key: MemberKey {
                node: Rc::from(node),
                conn,
            },
            id: Rc::from(id),
            info: None,
        }
    }

    fn record(version: u64, m: &Member, joined: bool) -> Record {
        Record {
            version,
            member: m.clone(),
            joined,
        }
    }

    /// (id, joined) of each change, in order.
    fn said(out: &mut Vec<PresenceChange>) -> Vec<(String, bool)> {
        out.drain(..)
            .map(|c| (c.member.id.to_string(), c.joined))
            .collect()
    }

    fn ids(roster: &Roster, room: &str) -> Vec<String> {
        roster
            .members(room)
            .iter()
            .map(|m| m.id.to_string())
            .collect()
    }

    #[test]
    fn the_first_snapshot_announces_the_others_and_records_after_it_do() {
        let mut r = Roster::new(Rc::from("me"));
        let mut out = Vec::new();
        let (bob, own) = (member("n2", 1, "bob"), member("me", 7, "alice"));
        r.load("lobby");
        r.loaded("lobby", 4, vec![bob.clone(), own.clone()], &mut out);
        assert_eq!(said(&mut out), vec![("bob".into(), true)]);
        assert_eq!(
            ids(&r, "lobby"),
            vec!["bob"],
            "this node's own are not kept"
        );

        let carol = member("n3", 1, "carol");
        r.record("lobby", record(5, &carol, true), &mut out);
        r.record("lobby", record(6, &own, false), &mut out);
        r.record("lobby", record(7, &bob, false), &mut out);
        assert_eq!(
            said(&mut out),
            vec![("carol".into(), true), ("bob".into(), false)]
        );
        assert_eq!(ids(&r, "lobby"), vec!["carol"]);
        assert_eq!(r.stale().count(), 0);
        // Heard twice (a record at or below the version): nothing happens.
        r.record("lobby", record(5, &carol, true), &mut out);
        assert_eq!(said(&mut out), vec![]);
    }

    #[test]
    fn records_that_arrive_before_the_snapshot_are_held_and_merged_by_version() {
        let mut r = Roster::new(Rc::from("me"));
        let mut out = Vec::new();
        let (bob, carol) = (member("n2", 1, "bob"), member("n3", 1, "carol"));
        r.load("lobby");
        // PUB/SUB is faster than the snapshot: v3 (bob joins) is in it, v4 (carol) is not.
        r.record("lobby", record(4, &carol, true), &mut out);
        r.record("lobby", record(3, &bob, true), &mut out);
        assert_eq!(said(&mut out), vec![], "held");
        r.loaded("lobby", 3, vec![bob.clone()], &mut out);
        // bob from the snapshot (the first announces everyone), carol from her record.
        assert_eq!(
            said(&mut out),
            vec![("bob".into(), true), ("carol".into(), true)]
        );
        assert_eq!(ids(&r, "lobby"), vec!["bob", "carol"]);
        assert_eq!(r.stale().count(), 0);
    }

    #[test]
    fn a_lost_record_makes_the_room_stale_and_the_next_snapshot_announces_the_difference() {
        let mut r = Roster::new(Rc::from("me"));
        let mut out = Vec::new();
        let (bob, carol, dave) = (
            member("n2", 1, "bob"),
            member("n3", 1, "carol"),
            member("n3", 2, "dave"),
        );
        r.load("lobby");
        r.loaded("lobby", 1, vec![bob.clone()], &mut out);
        assert_eq!(said(&mut out), vec![("bob".into(), true)]);
        // v2 (carol joins) and v3 (bob leaves) were lost; v4 (dave joins) arrives.
        r.record("lobby", record(4, &dave, true), &mut out);
        assert_eq!(said(&mut out), vec![("dave".into(), true)]);
        assert_eq!(r.stale().collect::<Vec<_>>(), vec!["lobby"]);
        // Also when the record after the gap is this node's own.
        let mut r2 = Roster::new(Rc::from("me"));
        r2.load("news");
        r2.loaded("news", 1, vec![], &mut out);
        r2.record("news", record(3, &member("me", 1, "alice"), true), &mut out);
        assert_eq!(r2.stale().collect::<Vec<_>>(), vec!["news"]);
        assert_eq!(said(&mut out), vec![]);
        r.load("lobby");
        assert_eq!(r.stale().count(), 0, "asked for once");
        r.loaded("lobby", 4, vec![carol.clone(), dave.clone()], &mut out);
        let mut changes = said(&mut out);
        changes.sort();
        assert_eq!(changes, vec![("bob".into(), false), ("carol".into(), true)]);
        assert_eq!(ids(&r, "lobby"), vec!["carol", "dave"]);
    }

    #[test]
    fn with_two_snapshots_outstanding_records_wait_for_both_and_the_second_tells_the_gap() {
        // The first member's join brings a snapshot; another follows once the subscription is
        // in effect. Whatever was published in between is told by the second.
        let mut r = Roster::new(Rc::from("me"));
        let mut out = Vec::new();
        let (bob, carol, dave) = (
            member("n2", 1, "bob"),
            member("n3", 1, "carol"),
            member("n3", 2, "dave"),
        );
        r.load("lobby");
        r.load("lobby");
        r.record("lobby", record(7, &dave, true), &mut out);
        r.loaded("lobby", 4, vec![bob.clone()], &mut out);
        assert_eq!(said(&mut out), vec![("bob".into(), true)], "v7 still held");
        assert_eq!(ids(&r, "lobby"), vec!["bob"]);
        // v5 (carol joined) was published before the subscription took effect: lost on
        // PUB/SUB, in the second snapshot.
        r.loaded("lobby", 6, vec![bob.clone(), carol.clone()], &mut out);
        assert_eq!(
            said(&mut out),
            vec![("carol".into(), true), ("dave".into(), true)]
        );
        assert_eq!(r.stale().count(), 0, "v7 follows v6");
        assert_eq!(ids(&r, "lobby"), vec!["bob", "carol", "dave"]);
    }

    #[test]
    fn a_failed_snapshot_leaves_the_room_stale_and_lets_records_through() {
        let mut r = Roster::new(Rc::from("me"));
        let mut out = Vec::new();
        let (bob, carol) = (member("n2", 1, "bob"), member("n3", 1, "carol"));
        r.load("lobby");
        r.load_failed("lobby", &mut out);
        assert_eq!(r.stale().collect::<Vec<_>>(), vec!["lobby"]);
        // No replica yet: a record cannot be placed, so it waits for the next snapshot.
        r.load("lobby");
        r.loaded("lobby", 3, vec![bob.clone()], &mut out);
        assert_eq!(said(&mut out), vec![("bob".into(), true)]);
        // With a replica, a failed reload lets the held records through, and asks again.
        r.load("lobby");
        r.record("lobby", record(4, &carol, true), &mut out);
        r.load_failed("lobby", &mut out);
        assert_eq!(said(&mut out), vec![("carol".into(), true)]);
        assert_eq!(r.stale().collect::<Vec<_>>(), vec!["lobby"]);
        assert_eq!(ids(&r, "lobby"), vec!["bob", "carol"]);
    }

    #[test]
    fn an_unfollowed_room_forgets_and_ignores_late_answers() {
        let mut r = Roster::new(Rc::from("me"));
        let mut out = Vec::new();
        let bob = member("n2", 1, "bob");
        r.load("lobby");
        r.unfollow("lobby");
        r.loaded("lobby", 1, vec![bob.clone()], &mut out);
        r.record("lobby", record(2, &bob, false), &mut out);
        assert_eq!(said(&mut out), vec![]);
        assert!(!r.follows("lobby"));
        assert!(r.members("lobby").is_empty());
        // A snapshot nobody asked for (no `load` pending) changes nothing either.
        r.load("news");
        r.loaded("news", 1, vec![], &mut out);
        r.loaded("news", 9, vec![bob], &mut out);
        assert!(r.members("news").is_empty());
    }
}
