//! Room membership: which connections are in which rooms, with O(1) join and leave.
//!
//! Owns: `Rooms`, a two-sided index (room -> its members, connection -> its rooms), and `ConnMap`,
//! per-connection storage indexed by the reactor's slab slot.
//! Does not: send anything or know what a room is used for (raw rooms and envelope rooms are
//! two separate `Rooms` in the hub); it never sees a socket (SPEC §1).
//!
//! Implements the membership part of SPEC §6 (`/r/<room>`, `join`/`leave`).
//!
//! How join and leave stay O(1). A room keeps its members in a `Vec<Seat>`; a connection keeps
//! its rooms in a `Vec<Membership>`. Each side remembers where it sits in the other:
//!
//! ```text
//!   room.members[s] = Seat { conn, back: m }     conn's memberships[m] = Membership { room, seat: s }
//! ```
//!
//! Leaving removes both entries with `swap_remove`, which moves the last element into the hole;
//! the one moved element's partner is then told its new index. No search, no shifting. (The
//! simple version, `members.retain(|c| c != conn)`, is O(members): leaving a room of 100,000 costs
//! 100,000 steps, and everyone leaving costs O(n^2).) Order within a room is not kept: a
//! broadcast reaches every member in some order, which is all SPEC §6 asks.
//!
//! Invariants (checked by `check_invariants` in tests):
//! * `rooms[m.room].members[m.seat].conn == conn` for every membership `m` of `conn`, and
//!   `memberships(seat.conn)[seat.back].room == room` for every seat of `room`;
//! * a room exists iff it has a member (the last one out removes it);
//! * `by_name` and `rooms` name the same set of rooms.

use crate::server::ConnId;
use slab::Slab;
use std::collections::HashMap;
use std::rc::Rc;

/// Values per connection, stored at the connection's slab slot. The generation in `ConnId` is
/// kept and checked, so a value of a closed connection is never mistaken for its successor's.
pub struct ConnMap<T> {
    slots: Vec<Option<(u32, T)>>,
}

impl<T> Default for ConnMap<T> {
    fn default() -> Self {
        ConnMap { slots: Vec::new() }
    }
}

impl<T> ConnMap<T> {
    pub fn get(&self, conn: ConnId) -> Option<&T> {
        match self.slots.get(conn.slot as usize) {
            Some(Some((generation, value))) if *generation == conn.generation => Some(value),
            _ => None,
        }
    }

    pub fn get_mut(&mut self, conn: ConnId) -> Option<&mut T> {
        match self.slots.get_mut(conn.slot as usize) {
            Some(Some((generation, value))) if *generation == conn.generation => Some(value),
            _ => None,
        }
    }

    /// The value for `conn`, inserted with `make` if absent (replacing a stale one).
    pub fn entry(&mut self, conn: ConnId, make: impl FnOnce() -> T) -> &mut T {
        let slot = conn.slot as usize;
        if self.slots.len() <= slot {
            self.slots.resize_with(slot + 1, || None);
        }
        let cell = &mut self.slots[slot];
        if !matches!(cell, Some((generation, _)) if *generation == conn.generation) {
            // Empty, or left over from a connection that used the slot before.
            *cell = None;
        }
        &mut cell.get_or_insert_with(|| (conn.generation, make())).1
    }

    pub fn remove(&mut self, conn: ConnId) -> Option<T> {
        let cell = self.slots.get_mut(conn.slot as usize)?;
        match cell {
            Some((generation, _)) if *generation == conn.generation => cell.take().map(|(_, v)| v),
            _ => None,
        }
    }
}

/// Where a connection sits in a room.
#[derive(Clone, Copy, Debug)]
struct Seat {
    conn: ConnId,
    /// Index of the matching `Membership` in the connection's list.
    back: u32,
}

/// One room a connection is in.
#[derive(Clone, Copy, Debug)]
struct Membership {
    /// Key of the room in `Rooms::rooms`.
    room: usize,
    /// Index of the matching `Seat` in the room's member list.
    seat: u32,
}

struct Room {
    name: Rc<str>,
    members: Vec<Seat>,
}

/// Rooms by name, with their members; see the module doc for the index structure.
#[derive(Default)]
pub struct Rooms {
    rooms: Slab<Room>,
    by_name: HashMap<Rc<str>, usize>,
    memberships: ConnMap<Vec<Membership>>,
    /// Sum of all rooms' member counts, for /metrics.
    seats: usize,
}

impl Rooms {
    /// Puts `conn` in `name`, creating the room if needed. Returns false (and changes nothing)
    /// if it was already a member.
    pub fn join(&mut self, conn: ConnId, name: &str) -> bool {
        if self.is_member(conn, name) {
            return false;
        }
        let key = match self.by_name.get(name) {
            Some(&key) => key,
            None => {
                let name: Rc<str> = Rc::from(name);
                let key = self.rooms.insert(Room {
                    name: Rc::clone(&name),
                    members: Vec::new(),
                });
                self.by_name.insert(name, key);
                key
            }
        };
        let list = self.memberships.entry(conn, Vec::new);
        let room = &mut self.rooms[key];
        // Indexes fit in u32: a room cannot hold more members than the reactor has slots.
        let seat = room.members.len() as u32;
        let back = list.len() as u32;
        room.members.push(Seat { conn, back });
        list.push(Membership { room: key, seat });
        self.seats += 1;
        true
    }

    /// Takes `conn` out of `name`. Returns false if it was not a member.
    pub fn leave(&mut self, conn: ConnId, name: &str) -> bool {
        let Some(&key) = self.by_name.get(name) else {
            return false;
        };
        let Some(index) = self
            .memberships
            .get(conn)
            .and_then(|list| list.iter().position(|m| m.room == key))
        else {
            return false;
        };
        self.remove_membership(conn, index);
        true
    }

    /// Takes `conn` out of every room; returns the names of the rooms that still exist (those
    /// with members left to tell).
    pub fn leave_all(&mut self, conn: ConnId) -> Vec<Rc<str>> {
        let mut remaining = Vec::new();
        while let Some(last) = self
            .memberships
            .get(conn)
            .and_then(|l| l.len().checked_sub(1))
        {
            if let Some(name) = self.remove_membership(conn, last) {
                remaining.push(name);
            }
        }
        self.memberships.remove(conn);
        remaining
    }

    /// Removes membership `index` of `conn` and its seat, fixing up the two moved partners.
    /// Returns the room's name if the room still exists afterwards.
    fn remove_membership(&mut self, conn: ConnId, index: usize) -> Option<Rc<str>> {
        let list = self.memberships.get_mut(conn)?;
        let gone = list.swap_remove(index);
        if let Some(moved) = list.get(index).copied() {
            // The connection's last membership now sits at `index`: its seat must point here.
            self.rooms[moved.room].members[moved.seat as usize].back = index as u32;
        }
        let room = &mut self.rooms[gone.room];
        let seat = gone.seat as usize;
        debug_assert_eq!(room.members[seat].conn, conn);
        room.members.swap_remove(seat);
        self.seats -= 1;
        if let Some(moved) = room.members.get(seat).copied() {
            // The room's last member now sits at `seat`: its membership must point here.
            if let Some(list) = self.memberships.get_mut(moved.conn) {
                list[moved.back as usize].seat = seat as u32;
            }
        }
        if room.members.is_empty() {
            let room = self.rooms.remove(gone.room);
            self.by_name.remove(&room.name);
            None
        } else {
            Some(Rc::clone(&room.name))
        }
    }

    pub fn is_member(&self, conn: ConnId, name: &str) -> bool {
        let Some(&key) = self.by_name.get(name) else {
            return false;
        };
        self.memberships
            .get(conn)
            .is_some_and(|list| list.iter().any(|m| m.room == key))
    }

    /// The connections in `name` (none if the room does not exist), in no particular order.
    pub fn members<'a>(&'a self, name: &str) -> impl Iterator<Item = ConnId> + 'a {
        let room = self.by_name.get(name).map(|&key| &self.rooms[key]);
        room.into_iter()
            .flat_map(|room| room.members.iter().map(|seat| seat.conn))
    }

    /// The names of the rooms `conn` is in, in no particular order.
    pub fn names_of(&self, conn: ConnId) -> Vec<Rc<str>> {
        let list = self.memberships.get(conn).map_or(&[][..], Vec::as_slice);
        list.iter()
            .map(|m| Rc::clone(&self.rooms[m.room].name))
            .collect()
    }

    /// The name of every room, in no particular order.
    pub fn names(&self) -> impl Iterator<Item = &str> + '_ {
        self.rooms.iter().map(|(_, room)| &*room.name)
    }

    /// How many rooms `conn` is in.
    pub fn rooms_of(&self, conn: ConnId) -> usize {
        self.memberships.get(conn).map_or(0, Vec::len)
    }

    /// Number of rooms (each has at least one member).
    pub fn room_count(&self) -> usize {
        self.rooms.len()
    }

    /// Number of (room, member) pairs.
    pub fn member_count(&self) -> usize {
        self.seats
    }

    /// Asserts the invariants of the module doc (tests only: it is O(everything)).
    #[cfg(test)]
    pub fn check_invariants(&self) {
        let mut seats = 0;
        assert_eq!(self.rooms.len(), self.by_name.len());
        for (key, room) in &self.rooms {
            assert!(!room.members.is_empty(), "empty room {} kept", room.name);
            assert_eq!(self.by_name.get(&room.name), Some(&key));
            for (s, seat) in room.members.iter().enumerate() {
                let m =
                    self.memberships.get(seat.conn).expect("member has a list")[seat.back as usize];
                assert_eq!((m.room, m.seat as usize), (key, s));
            }
            seats += room.members.len();
        }
        assert_eq!(seats, self.seats);
        for slot in self.memberships.slots.iter().flatten() {
            for (i, m) in slot.1.iter().enumerate() {
                assert_eq!(self.rooms[m.room].members[m.seat as usize].back as usize, i);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, BTreeSet};

    fn conn(slot: u32) -> ConnId {
        ConnId {
            slot,
            generation: slot * 10,
        }
    }

    fn members(rooms: &Rooms, name: &str) -> BTreeSet<u32> {
        rooms.members(name).map(|c| c.slot).collect()
    }

    #[test]
    fn join_leave_and_the_last_one_out() {
        let mut r = Rooms::default();
        assert!(r.join(conn(1), "lobby"));
        assert!(r.join(conn(2), "lobby"));
        assert!(r.join(conn(3), "lobby"));
        assert!(!r.join(conn(2), "lobby"), "second join is a no-op");
        assert!(r.join(conn(2), "other"));
        r.check_invariants();
        assert_eq!(members(&r, "lobby"), BTreeSet::from([1, 2, 3]));
        assert_eq!(
            (r.room_count(), r.member_count(), r.rooms_of(conn(2))),
            (2, 4, 2)
        );

        // Leaving from the middle moves the last member into the hole.
        assert!(r.leave(conn(1), "lobby"));
        assert!(!r.leave(conn(1), "lobby"));
        r.check_invariants();
        assert_eq!(members(&r, "lobby"), BTreeSet::from([2, 3]));

        assert_eq!(
            r.leave_all(conn(2)),
            vec![Rc::from("lobby")],
            "other died with conn 2"
        );
        r.check_invariants();
        assert_eq!((r.room_count(), r.member_count()), (1, 1));
        assert!(r.leave(conn(3), "lobby"));
        assert_eq!((r.room_count(), r.member_count()), (0, 0));
        assert_eq!(members(&r, "lobby"), BTreeSet::new());
        r.check_invariants();
    }

    #[test]
    fn a_stale_conn_id_is_not_a_member() {
        let mut r = Rooms::default();
        r.join(conn(1), "a");
        let successor = ConnId {
            slot: 1,
            generation: 99,
        };
        assert!(!r.is_member(successor, "a"));
        assert!(!r.leave(successor, "a"));
        r.check_invariants();
    }

    proptest! {
        /// Random joins and leaves against a simple model (a map of sets): same members, and
        /// the index invariants hold after every step.
        #[test]
        fn matches_a_model(ops in proptest::collection::vec((0u8..3, 0u32..8, 0u8..4), 0..300)) {
            let mut r = Rooms::default();
            let mut model: BTreeMap<String, BTreeSet<u32>> = BTreeMap::new();
            for (op, c, room) in ops {
                let name = format!("r{room}");
                match op {
                    0 => {
                        let fresh = model.entry(name.clone()).or_default().insert(c);
                        prop_assert_eq!(r.join(conn(c), &name), fresh);
                    }
                    1 => {
                        let was = model.get_mut(&name).is_some_and(|s| s.remove(&c));
                        prop_assert_eq!(r.leave(conn(c), &name), was);
                    }
                    _ => {
                        r.leave_all(conn(c));
                        for set in model.values_mut() {
                            set.remove(&c);
                        }
                    }
                }
                model.retain(|_, s| !s.is_empty());
                r.check_invariants();
                prop_assert_eq!(r.room_count(), model.len());
                for (name, set) in &model {
                    prop_assert_eq!(&members(&r, name), set);
                }
            }
        }
    }
}
