//! Presence across workers (SPEC §6, §14): who is in each envelope room on the other workers.
//!
//! Owns: `Home`, what a room's home worker keeps of the room's members (every worker's) and how
//! it numbers the changes each other worker hears; `Presence`, one worker's presence state (its
//! `Home` for the rooms homed here, and its `Roster` of the other workers' members of the rooms
//! it holds); and the `BusEngine`'s presence calls that move changes between the two.
//! Does not: order snapshots against records (`engine/roster.rs` does, as for Redis), decide
//! who hears a change (the hub does), or carry room messages (`mod.rs`).
//!
//! # The home keeps the room's members
//!
//! A worker's hub tells its engine of every member change (`member_joined`, also for a new
//! `info` after a token refresh, and `member_left`); the engine sends it to the room's home as
//! `MemberJoined`/`MemberLeft` (applied at once when the room is homed here). The home keeps
//! every worker's members of the room and tells each change, as a record, to every *other*
//! worker that holds the room (the holders `Joined` named, the same that get the room's
//! messages): once per worker, never back to the worker that made it (its hub announced it).
//! A worker that becomes a holder gets a snapshot: the members on every other worker. Its
//! roster then answers `remote_members` synchronously, and its changes reach the hub as
//! `Event::Presence`. A worker that stops holding the room (`Left`) takes its remaining
//! members out, announced as leaves to the others; a closed connection's leave is one of the
//! hub's `member_left` calls.
//!
//! # Versions: one per worker's view
//!
//! The roster orders snapshots and records by a version, and takes a record whose version is
//! not the next one for a sign that records were lost. A worker is not sent its own changes, so
//! one version for the whole room would skip at each of them. So the home numbers each holder's
//! **view** of the room: the view's version moves by one for every record sent to that worker,
//! and a snapshot carries the version the view is at. A new view starts above every version
//! this home has given out (`Home::high`): a worker that stopped holding a room and holds it
//! again discards whatever record of its old view was still on its way (the roster keeps only
//! records newer than its snapshot).
//!
//! # Bounds
//!
//! A record is not sent to a holder whose engine queue holds `ARRIVED_LIMIT` notes or more
//! (the limit arrived messages have, `mod.rs`): a client joining and leaving in a loop must not
//! grow a lagging worker's queue without bound. The view still moves on, and the holder is
//! owed one snapshot of the room (at most one per room and holder, whatever the number of
//! changes), sent once its queue is down to half the limit; until then its later records are
//! not sent either. Its roster applies the snapshot as the difference to what it had, so its
//! hub hears the joins and leaves it missed, later but complete, in one batch.
//!
//! # Order
//!
//! The bus is FIFO per worker and never drops a presence note it sends, so a holder gets its snapshot
//! before the records that follow it, and every record once. The first join of a room on a
//! worker sends `Joined` and then the room's `recover` to the home (the hub waits for it), so
//! the snapshot is in the roster before the hub's first member joins, and tells the hub
//! nothing (changes reach the hub only while it has members of the room): like a member on one
//! node, a joiner hears the joins made after its own, and learns who was there before from
//! `members`. The roster's rules would keep this right in any order, and a view the roster
//! finds stale (never on this bus) is read again with a new `Joined`. Changes reach the hub
//! behind whatever their home sent earlier (`BusEngine::sources`), like the room's messages.

use super::wire::{Note, RoomMember};
use super::{BusEngine, ARRIVED_LIMIT};
use crate::engine::presence::{LocalMember, Member, MemberKey};
use crate::engine::roster::{Record, Roster};
use crate::engine::{Event, StreamId};
use crate::server::metrics::Writer;
use log::warn;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// What a room's home tells one holder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Tell {
    /// Every member on the other workers, at `version` of the holder's view.
    Snapshot {
        version: u64,
        members: Vec<RoomMember>,
    },
    /// One change made on another worker, numbered `version` in the holder's view.
    Record {
        version: u64,
        member: RoomMember,
        joined: bool,
    },
}

/// What the home keeps of one room.
#[derive(Debug, Default)]
struct HomeRoom {
    /// Every member on every worker, by (worker, connection).
    members: BTreeMap<(usize, u64), RoomMember>,
    /// The workers holding the room, each with the version its view is at.
    views: BTreeMap<usize, u64>,
}

/// The rooms homed at this worker that have members or holders. See the module doc.
#[derive(Debug, Default)]
pub(super) struct Home {
    rooms: HashMap<Rc<str>, HomeRoom>,
    /// The highest version given to any view of any room homed here.
    high: u64,
    /// Records told to holders, for /metrics.
    records: u64,
}

impl Home {
    /// Worker `worker` holds `room` now: its view starts, and it is told a snapshot. A holder
    /// that asks again (its roster found the view stale) is told a snapshot of its view as it is.
    pub(super) fn follow(&mut self, room: &str, worker: usize, out: &mut Vec<(usize, Tell)>) {
        let high = &mut self.high;
        let state = room_entry(&mut self.rooms, room);
        let version = *state.views.entry(worker).or_insert_with(|| {
            *high += 1;
            *high
        });
        let members = state
            .members
            .values()
            .filter(|m| m.worker != worker)
            .cloned()
            .collect();
        out.push((worker, Tell::Snapshot { version, members }));
    }

    /// Worker `worker` no longer holds `room`: its view ends, and its members still listed (the
    /// hub tells their leaves first, so normally none) leave, told to the other holders.
    pub(super) fn unfollow(&mut self, room: &str, worker: usize, out: &mut Vec<(usize, Tell)>) {
        let Some(state) = self.rooms.get_mut(room) else {
            return;
        };
        state.views.remove(&worker);
        let conns: Vec<u64> = state
            .members
            .range((worker, 0)..=(worker, u64::MAX))
            .map(|(&(_, conn), _)| conn)
            .collect();
        for conn in conns {
            self.left(room, worker, conn, out);
        }
        self.forget_if_empty(room);
    }

    /// A member joined `room` on its worker, or its `info` changed (told the same way: the
    /// rosters see a member they list and only take the new info).
    pub(super) fn joined(&mut self, room: &str, member: RoomMember, out: &mut Vec<(usize, Tell)>) {
        let state = room_entry(&mut self.rooms, room);
        state
            .members
            .insert((member.worker, member.conn), member.clone());
        self.records += announce(state, &mut self.high, &member, true, out);
    }

    /// The member `conn` of worker `worker` left `room`. One not listed (a leave told twice)
    /// changes nothing and is told to nobody.
    pub(super) fn left(
        &mut self,
        room: &str,
        worker: usize,
        conn: u64,
        out: &mut Vec<(usize, Tell)>,
    ) {
        let Some(state) = self.rooms.get_mut(room) else {
            return;
        };
        let Some(member) = state.members.remove(&(worker, conn)) else {
            return;
        };
        self.records += announce(state, &mut self.high, &member, false, out);
        self.forget_if_empty(room);
    }

    fn forget_if_empty(&mut self, room: &str) {
        if self
            .rooms
            .get(room)
            .is_some_and(|r| r.members.is_empty() && r.views.is_empty())
        {
            self.rooms.remove(room);
        }
    }

    /// Whether `worker` holds `room` (has a view of it).
    fn holds(&self, room: &str, worker: usize) -> bool {
        self.rooms
            .get(room)
            .is_some_and(|r| r.views.contains_key(&worker))
    }

    /// Members of the rooms homed here, on every worker.
    pub(super) fn members(&self) -> usize {
        self.rooms.values().map(|r| r.members.len()).sum()
    }
}

fn room_entry<'a>(rooms: &'a mut HashMap<Rc<str>, HomeRoom>, room: &str) -> &'a mut HomeRoom {
    rooms.entry(Rc::from(room)).or_default()
}

/// Tells a change to every holder of the room but the member's own worker, each in its view's
/// next version; returns how many were told.
fn announce(
    state: &mut HomeRoom,
    high: &mut u64,
    member: &RoomMember,
    joined: bool,
    out: &mut Vec<(usize, Tell)>,
) -> u64 {
    let mut told = 0;
    for (&to, version) in state.views.iter_mut() {
        if to == member.worker {
            continue;
        }
        *version += 1;
        *high = (*high).max(*version);
        let member = member.clone();
        out.push((
            to,
            Tell::Record {
                version: *version,
                member,
                joined,
            },
        ));
        told += 1;
    }
    told
}

/// One worker's presence state: see the module doc.
#[derive(Debug)]
pub(super) struct Presence {
    /// The rooms homed here.
    home: Home,
    /// The other workers' members of the rooms this worker holds.
    roster: Roster,
    /// Each worker's name in a `MemberKey` (`worker0`, ...), shared by the members listed.
    names: Vec<Rc<str>>,
    /// Views of rooms homed here whose records were not sent because the holder's queue was
    /// full (module doc, "Bounds"): each owed one snapshot once that queue is down to half.
    owed: HashSet<(Rc<str>, usize)>,
    /// Records folded into such a snapshot instead of sent, for /metrics.
    pub(super) deferred: u64,
}

impl Presence {
    pub(super) fn new(me: usize, workers: usize) -> Presence {
        let names: Vec<Rc<str>> = (0..workers)
            .map(|i| Rc::from(format!("worker{i}")))
            .collect();
        Presence {
            home: Home::default(),
            roster: Roster::new(Rc::clone(&names[me])),
            names,
            owed: HashSet::new(),
            deferred: 0,
        }
    }

    fn member(&self, m: RoomMember) -> Member {
        Member {
            key: MemberKey {
                node: Rc::clone(&self.names[m.worker]),
                conn: m.conn,
            },
            id: Rc::from(&*m.id),
            info: m.info.as_deref().map(Rc::from),
        }
    }
}

impl BusEngine {
    /// This worker starts following `room` (its `Joined` goes to the home next, whose snapshot
    /// the roster then waits for), or stops.
    pub(super) fn follow_presence(&mut self, room: &str, joined: bool) {
        if joined {
            self.presence.roster.load(room);
        } else {
            self.presence.roster.unfollow(room);
        }
    }

    /// At `room`'s home: worker `from` holds the room now, or no longer does.
    pub(super) fn presence_holder(&mut self, from: usize, room: &str, joined: bool) {
        let mut out = Vec::new();
        if joined {
            self.presence.home.follow(room, from, &mut out);
        } else {
            self.presence.home.unfollow(room, from, &mut out);
        }
        self.tell(room, out);
    }

    /// At `room`'s home: a member joined on its worker, or its `info` changed.
    pub(super) fn presence_joined(&mut self, room: &str, member: RoomMember) {
        let mut out = Vec::new();
        self.presence.home.joined(room, member, &mut out);
        self.tell(room, out);
    }

    /// At `room`'s home: the member `conn` of worker `worker` left.
    pub(super) fn presence_left(&mut self, room: &str, worker: usize, conn: u64) {
        let mut out = Vec::new();
        self.presence.home.left(room, worker, conn, &mut out);
        self.tell(room, out);
    }

    /// Sends what the home tells each holder (this worker's own applied at once). A record for
    /// a holder whose queue is full, or that is owed a snapshot already, is not sent: the
    /// snapshot it is owed carries it (module doc, "Bounds").
    fn tell(&mut self, room: &str, out: Vec<(usize, Tell)>) {
        let me = self.me();
        for (to, tell) in out {
            if to == me {
                self.apply_presence(me, room, tell);
                continue;
            }
            if matches!(tell, Tell::Record { .. }) {
                let owed = self.presence.owed.contains(&(Rc::from(room), to));
                if owed || self.link.fabric.depth[to].load(Ordering::Relaxed) >= ARRIVED_LIMIT {
                    self.presence.owed.insert((Rc::from(room), to));
                    self.presence.deferred += 1;
                    continue;
                }
            }
            let room = Arc::from(room);
            let note = match tell {
                Tell::Snapshot { version, members } => Note::Snapshot {
                    from: me,
                    room,
                    version,
                    members,
                },
                Tell::Record {
                    version,
                    member,
                    joined,
                } => Note::Presence {
                    from: me,
                    room,
                    version,
                    member,
                    joined,
                },
            };
            self.send(to, note);
        }
    }

    /// What `room`'s home (`from`) told this worker: into the roster, and the changes it makes
    /// queued for the hub behind whatever the home sent before.
    pub(super) fn apply_presence(&mut self, from: usize, room: &str, tell: Tell) {
        let mut changes = Vec::new();
        match tell {
            Tell::Snapshot { version, members } => {
                // Asked for (`follow_presence`), or owed after records held back ("Bounds").
                self.presence.roster.expect_snapshot(room);
                let members = members
                    .into_iter()
                    .map(|m| self.presence.member(m))
                    .collect();
                self.presence
                    .roster
                    .loaded(room, version, members, &mut changes);
            }
            Tell::Record {
                version,
                member,
                joined,
            } => {
                let member = self.presence.member(member);
                let record = Record {
                    version,
                    member,
                    joined,
                };
                self.presence.roster.record(room, record, &mut changes);
            }
        }
        // Told to the hub only while it has members of the room here: a snapshot that comes
        // before its first member's join is confirmed (the usual order, see the module doc)
        // would be told to nobody.
        if self.subs.get(room).is_some_and(|sub| sub.hub) {
            self.sources[from].extend(changes.into_iter().map(Event::Presence));
        }
    }

    /// `Engine::member_joined`: the member goes to the room's home.
    pub(super) fn local_member_joined(&mut self, room: &str, member: LocalMember<'_>) {
        let me = self.me();
        let member = RoomMember {
            worker: me,
            conn: member.conn,
            id: Arc::from(member.id),
            info: member.info.map(Arc::from),
        };
        let home = self.home_of(&StreamId::room(room));
        if home == me {
            return self.presence_joined(room, member);
        }
        let room = Arc::from(room);
        self.send(home, Note::MemberJoined { room, member });
    }

    /// `Engine::member_left`: the leave goes to the room's home.
    pub(super) fn local_member_left(&mut self, room: &str, conn: u64) {
        let me = self.me();
        let home = self.home_of(&StreamId::room(room));
        if home == me {
            return self.presence_left(room, me, conn);
        }
        let room = Arc::from(room);
        self.send(
            home,
            Note::MemberLeft {
                from: me,
                room,
                conn,
            },
        );
    }

    /// Sends the snapshots owed to holders whose queue is down to half `ARRIVED_LIMIT` again: a
    /// snapshot of the view as it is now, at its version, which the holder's roster applies as
    /// the difference to what it had (the joins and leaves it missed reach its hub).
    pub(super) fn pay_owed_snapshots(&mut self) {
        if self.presence.owed.is_empty() {
            return;
        }
        let depth = &self.link.fabric.depth;
        let due: Vec<(Rc<str>, usize)> = self
            .presence
            .owed
            .iter()
            .filter(|(_, to)| depth[*to].load(Ordering::Relaxed) <= ARRIVED_LIMIT / 2)
            .cloned()
            .collect();
        for (room, to) in due {
            self.presence.owed.remove(&(Rc::clone(&room), to));
            let mut out = Vec::new();
            if self.presence.home.holds(&room, to) {
                self.presence.home.follow(&room, to, &mut out);
            }
            self.tell(&room, out);
        }
    }

    /// Rooms whose view the roster found stale are read again: a new snapshot of the view, asked
    /// for like the first (see the module doc, "Order").
    pub(super) fn reload_stale_rooms(&mut self) {
        let stale: Vec<Rc<str>> = self.presence.roster.stale().map(Rc::from).collect();
        for room in stale {
            warn!("presence of {room} skipped a version on the bus: read again");
            self.subscribe(&room, true);
        }
    }

    /// The other workers' members of `room` (`Engine::remote_members`).
    pub(super) fn members_elsewhere(&self, room: &str) -> Vec<Member> {
        self.presence.roster.members(room)
    }

    /// Members (connections) of the rooms homed here, on every worker.
    pub(super) fn presence_members(&self) -> usize {
        self.presence.home.members()
    }

    /// Records this worker told as the home of rooms (one per other holder and change).
    pub(super) fn presence_records(&self) -> u64 {
        self.presence.home.records
    }

    /// Presence's own figures (Prometheus text).
    pub(super) fn render_presence(&self, out: &mut String) {
        let me = self.me().to_string();
        let mut w = Writer::new(out);
        w.family(
            "wsrelay_engine_bus_presence_members",
            "gauge",
            "Members (connections) of the envelope rooms homed at this worker, on every worker.",
        );
        w.sample(
            "wsrelay_engine_bus_presence_members",
            &[("worker", &me)],
            self.presence_members(),
        );
        w.family(
            "wsrelay_engine_bus_presence_records_total",
            "counter",
            "Member changes this worker told the other workers holding the room (one per worker and change).",
        );
        w.sample(
            "wsrelay_engine_bus_presence_records_total",
            &[("worker", &me)],
            self.presence_records(),
        );
        w.family(
            "wsrelay_engine_bus_presence_deferred_total",
            "counter",
            "Of those, records not sent because the holder's engine queue was full: folded into one snapshot of the room sent once the queue is down to half.",
        );
        w.sample(
            "wsrelay_engine_bus_presence_deferred_total",
            &[("worker", &me)],
            self.presence.deferred,
        );
    }
}
