//! What the client owes the server and what it has already seen: the bookkeeping that makes
//! reconnects lose nothing and duplicate nothing.
//!
//! Owns: `Outbox` (client message ids, the bounded queue of lines typed while disconnected, the
//! messages written but not yet acked, the rooms joined) and `Seen` (received msg_ids for
//! deduplication, the last one, for `?since=`, and the last one of each room, for a rejoin's
//! `since`, SPEC §16).
//! Does not: encode JSON (`envelope.rs`), write to a socket or decide when to reconnect
//! (`session.rs`).
//!
//! SPEC §6 (acks, `?since=` recovery, msg_id), §7 ("messages typed while disconnected are
//! queued (bounded) and sent after reconnect; un-acked messages are re-sent").
//!
//! Invariants:
//! - a message with a client id is in exactly one place until its ack: `queued` (never
//!   written) or `unacked` (written at least once);
//! - a re-sent message keeps its client id, so the relay can tell the copy from a new message
//!   and deliver it once;
//! - `Seen` holds at most `capacity` ids; the oldest are forgotten first.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};

/// One thing the client sends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outgoing {
    /// `{"type":"send"}`: a direct message, acked by its client id.
    Send {
        id: String,
        to: String,
        text: String,
    },
    /// `{"type":"publish"}`: a room message, acked by its client id.
    Publish {
        id: String,
        room: String,
        text: String,
    },
    /// `{"type":"join"}`: not acked; remembered and repeated on every new connection.
    Join(String),
    /// `{"type":"leave"}`: not acked.
    Leave(String),
    /// A line for a raw endpoint, sent as one text frame: no id, no ack.
    Raw(String),
}

impl Outgoing {
    /// The client message id the server's ack will carry, for the kinds that are acked.
    pub fn client_id(&self) -> Option<&str> {
        match self {
            Outgoing::Send { id, .. } | Outgoing::Publish { id, .. } => Some(id),
            _ => None,
        }
    }

    /// "bob" or "#lobby": who a send or publish is for, for messages to the user.
    pub fn recipient(&self) -> String {
        match self {
            Outgoing::Send { to, .. } => to.clone(),
            Outgoing::Publish { room, .. } => format!("#{room}"),
            Outgoing::Join(room) | Outgoing::Leave(room) => format!("#{room}"),
            Outgoing::Raw(_) => "the server".to_string(),
        }
    }
}

/// How many messages may wait for their acks at once. A window, as in TCP: a piped file is sent
/// as fast as the relay acks it, never faster. Without it a burst outran a relay whose acks wait
/// for a store (`--data-dir`, Redis): the messages on their way to an online recipient count
/// against its per-id bound (`--offline-max`) until the store has them, and the rest of the
/// burst was refused as if the recipient's queue were full. Well under the default bound (1000).
pub const WINDOW: usize = 64;

/// A line could not be queued: the queue already holds its limit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Overflow(pub Outgoing);

/// Outgoing messages from the moment they are typed to the moment they are acked.
#[derive(Debug)]
pub struct Outbox {
    /// Prefix of every client id of this run, so ids of two runs with the same `--id` never
    /// collide in the relay's de-duplication.
    run_tag: String,
    /// The number in the next client id.
    next_seq: u64,
    /// The key of the next message recorded in `unacked` (the order it was first written).
    next_order: u64,
    /// Not written yet: typed while disconnected (at most `limit`), or waiting for the welcome
    /// or for room in the window (`hold`), in the order typed.
    queued: VecDeque<Outgoing>,
    limit: usize,
    /// Written, not acked yet, by sequence number: re-sent in the order they were typed.
    unacked: BTreeMap<u64, Outgoing>,
    /// Client id -> its key in `unacked`.
    unacked_ids: HashMap<String, u64>,
    /// Rooms joined (a join written and no leave since): joined again on every new connection.
    rooms: BTreeSet<String>,
}

impl Outbox {
    /// An empty outbox whose client ids start with `run_tag` and whose queue holds `limit`.
    pub fn new(run_tag: String, limit: usize) -> Self {
        Outbox {
            run_tag,
            next_seq: 1,
            next_order: 0,
            queued: VecDeque::new(),
            limit,
            unacked: BTreeMap::new(),
            unacked_ids: HashMap::new(),
            rooms: BTreeSet::new(),
        }
    }

    /// A fresh client message id: `<run tag>-<n>`.
    pub fn next_id(&mut self) -> String {
        let id = format!("{}-{}", self.run_tag, self.next_seq);
        self.next_seq += 1;
        id
    }

    /// Records `out` as written now on the open connection and gives it back to be written.
    pub fn send_now(&mut self, out: Outgoing) -> Outgoing {
        self.record_written(&out);
        out
    }

    /// Keeps `out` until the next connection.
    ///
    /// # Errors
    /// `Overflow` with the message when the queue already holds `limit` lines.
    pub fn queue(&mut self, out: Outgoing) -> Result<(), Overflow> {
        if self.queued.len() >= self.limit {
            return Err(Overflow(out));
        }
        self.queued.push_back(out);
        Ok(())
    }

    /// Whether `out` may be written now on a connection that takes writes: nothing typed
    /// before it is still waiting (order), and a message finds room in the window.
    pub fn may_write(&self, out: &Outgoing) -> bool {
        self.queued.is_empty() && (out.client_id().is_none() || self.unacked.len() < WINDOW)
    }

    /// Keeps `out` until the connection is greeted or the window has room (`release`), whatever
    /// the limit: the limit bounds lines typed while disconnected; these wait on a live
    /// connection, for its welcome or its acks.
    pub fn hold(&mut self, out: Outgoing) {
        self.queued.push_back(out);
    }

    /// What to write first on a new connection, in order: a join for every room we were in,
    /// then every un-acked message (same client ids) in the order typed. The queued lines
    /// follow through `release`.
    pub fn on_connect(&mut self) -> Vec<Outgoing> {
        let mut out: Vec<Outgoing> = self.rooms.iter().cloned().map(Outgoing::Join).collect();
        out.extend(self.unacked.values().cloned());
        out
    }

    /// The next queued line that may be written now, recorded as written: the oldest, if it is
    /// not a message or the window has room for one.
    pub fn release(&mut self) -> Option<Outgoing> {
        let next = self.queued.front()?;
        if next.client_id().is_some() && self.unacked.len() >= WINDOW {
            return None;
        }
        let next = self.queued.pop_front()?;
        self.record_written(&next);
        Some(next)
    }

    /// Adds a room to join on every connection from now on (`--room`).
    pub fn remember_room(&mut self, room: &str) {
        self.rooms.insert(room.to_string());
    }

    /// Takes the message `id` out of the un-acked set. Returns it, or `None` for an id that is
    /// not (or no longer) waiting, such as the second ack of a message re-sent after a
    /// reconnect.
    pub fn ack(&mut self, id: &str) -> Option<Outgoing> {
        let seq = self.unacked_ids.remove(id)?;
        self.unacked.remove(&seq)
    }

    /// Messages waiting for an ack.
    pub fn unacked(&self) -> usize {
        self.unacked.len()
    }

    /// Lines waiting for a connection.
    pub fn queued(&self) -> usize {
        self.queued.len()
    }

    /// Nothing is queued and nothing waits for an ack.
    pub fn is_settled(&self) -> bool {
        self.queued.is_empty() && self.unacked.is_empty()
    }

    fn record_written(&mut self, out: &Outgoing) {
        match out {
            Outgoing::Send { id, .. } | Outgoing::Publish { id, .. } => {
                if !self.unacked_ids.contains_key(id) {
                    let order = self.next_order;
                    self.next_order += 1;
                    self.unacked_ids.insert(id.clone(), order);
                    self.unacked.insert(order, out.clone());
                }
            }
            Outgoing::Join(room) => {
                self.rooms.insert(room.clone());
            }
            Outgoing::Leave(room) => {
                self.rooms.remove(room);
            }
            Outgoing::Raw(_) => {}
        }
    }
}

/// The msg_ids received, for de-duplication, and the one to ask `?since=` for.
#[derive(Debug)]
pub struct Seen {
    order: VecDeque<String>,
    set: HashSet<String>,
    capacity: usize,
    last: Option<String>,
    /// Per room joined: the newest room msg_id received (or the `joined`'s `last_msg_id`),
    /// sent as `since` when the room is joined again after a reconnect (SPEC §16).
    rooms: HashMap<String, String>,
    /// Per room joined: the epoch its `joined` named.
    room_epochs: HashMap<String, String>,
    /// The epoch of the relay's history `last` belongs to (the welcome's `epoch`), passed
    /// back with `?since=` so the relay can tell a position from another history (SPEC §13).
    epoch: Option<String>,
}

impl Seen {
    /// Remembers up to `capacity` msg_ids (at least one).
    pub fn new(capacity: usize) -> Self {
        Seen {
            order: VecDeque::new(),
            set: HashSet::new(),
            capacity: capacity.max(1),
            last: None,
            rooms: HashMap::new(),
            room_epochs: HashMap::new(),
            epoch: None,
        }
    }

    /// Records a received msg_id. Returns `false` for one already seen: a copy replayed by
    /// `?since=` recovery or re-sent after a reconnect, which must not be shown twice.
    pub fn first_time(&mut self, msg_id: &str) -> bool {
        if self.set.contains(msg_id) {
            return false;
        }
        if self.order.len() >= self.capacity {
            if let Some(oldest) = self.order.pop_front() {
                self.set.remove(&oldest);
            }
        }
        self.order.push_back(msg_id.to_string());
        self.set.insert(msg_id.to_string());
        // Messages arrive in msg_id order on one connection (SPEC §6: "in order, before live
        // traffic"), so the newest arrival is the highest seen; except a room's replay after a
        // rejoin (SPEC §16), whose older msg_ids must not pull `?since=` back.
        if self.last.as_deref().is_none_or(|last| !older(msg_id, last)) {
            self.last = Some(msg_id.to_string());
        }
        true
    }

    /// `first_time` for a message of a stream: an id's inbox (`room` None) or a room. msg_ids
    /// are ordered within one stream, and with the Redis engine (SPEC §15) they are positions
    /// per stream: a room's msg_id may equal one of the inbox, so the two are told apart, and
    /// only the inbox's move the `?since=` (which names a position in the inbox).
    pub fn first_time_in(&mut self, room: Option<&str>, msg_id: &str) -> bool {
        match room {
            None => self.first_time(msg_id),
            Some(room) => {
                let last = self.last.take();
                let first = self.first_time(&format!("{room}\n{msg_id}"));
                self.last = last;
                first
            }
        }
    }

    /// A message of `room` arrived (after `first_time` said it is new): the room's `since`.
    pub fn room_message(&mut self, room: &str, msg_id: &str) {
        match self.rooms.get_mut(room) {
            Some(last) if older(msg_id, last) => {}
            Some(last) => *last = msg_id.to_string(),
            None => {
                self.rooms.insert(room.to_string(), msg_id.to_string());
            }
        }
    }

    /// A `joined` answer: `last_msg_id` is the newest message in the room's history. Before we
    /// have received a message of the room ourselves, it is where a rejoin's replay starts (as
    /// the welcome's is for `?since=`).
    pub fn joined(&mut self, room: &str, last_msg_id: Option<&str>) {
        if let Some(last) = last_msg_id {
            if !self.rooms.contains_key(room) {
                self.rooms.insert(room.to_string(), last.to_string());
            }
        }
    }

    /// A `joined` answer's epoch: the history the room's `since` belongs to (with the Redis
    /// engine, each room has its own; the local engines answer the welcome's).
    pub fn room_epoch(&mut self, room: &str, epoch: Option<String>) {
        match epoch {
            Some(epoch) => {
                self.room_epochs.insert(room.to_string(), epoch);
            }
            None => {
                self.room_epochs.remove(room);
            }
        }
    }

    /// We left `room`: a later join starts afresh.
    pub fn left(&mut self, room: &str) {
        self.rooms.remove(room);
        self.room_epochs.remove(room);
    }

    /// The `since` for joining `room` again, and the epoch it belongs to (the room's own when
    /// its `joined` named one, else the welcome's).
    pub fn room_since(&self, room: &str) -> Option<(&str, Option<&str>)> {
        let since = self.rooms.get(room)?;
        let epoch = self.room_epochs.get(room).or(self.epoch.as_ref());
        Some((since.as_str(), epoch.map(String::as_str)))
    }

    /// The welcome's `last_msg_id`: the newest message the relay retains for us. Before we have
    /// received anything ourselves, it is where recovery starts: a later `?since=` then covers
    /// every message that arrives after this welcome, even one lost with its connection.
    /// (Without it, a reconnect would ask for nothing and such a message would be lost. What
    /// this cannot recover is a message queued while we were offline, handed to this very
    /// first connection and lost with it: its msg_id is not above the welcome's.)
    ///
    /// `epoch` is the welcome's: the history every msg_id after this welcome belongs to.
    pub fn welcome(&mut self, last_msg_id: Option<&str>, epoch: Option<&str>) {
        if self.last.is_none() {
            self.last = last_msg_id.map(str::to_string);
        }
        if epoch.is_some() {
            self.epoch = epoch.map(str::to_string);
        }
    }

    /// The value for `?since=` on the next connection.
    pub fn since(&self) -> Option<&str> {
        self.last.as_deref()
    }

    /// The value for `?epoch=` on the next connection (only with a `since`).
    pub fn epoch(&self) -> Option<&str> {
        self.last.as_ref().and(self.epoch.as_deref())
    }
}

/// Is msg_id `a` older than `b`? msg_ids are decimal strings compared as numbers (SPEC §6);
/// one that is not a number is never older (it is taken as news).
fn older(a: &str, b: &str) -> bool {
    match (a.parse::<u64>(), b.parse::<u64>()) {
        (Ok(a), Ok(b)) => a < b,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_room_remembers_its_newest_msg_id_and_replays_do_not_pull_since_back() {
        let mut seen = Seen::new(100);
        seen.welcome(Some("50"), Some("00000000000000ff"));
        assert_eq!(seen.room_since("lobby"), None, "never joined");
        seen.joined("lobby", Some("40"));
        assert_eq!(
            seen.room_since("lobby"),
            Some(("40", Some("00000000000000ff")))
        );
        seen.joined("lobby", Some("45"));
        assert_eq!(seen.room_since("lobby").unwrap().0, "40", "kept until news");
        for id in ["60", "70"] {
            assert!(seen.first_time(id));
            seen.room_message("lobby", id);
        }
        assert_eq!(seen.room_since("lobby").unwrap().0, "70");
        // A rejoin of another room replays older messages: neither since goes back.
        assert!(seen.first_time("55"));
        seen.room_message("dev", "55");
        seen.room_message("lobby", "65");
        assert_eq!(seen.room_since("lobby").unwrap().0, "70");
        assert_eq!(seen.room_since("dev").unwrap().0, "55");
        assert_eq!(seen.since(), Some("70"));
        seen.left("lobby");
        assert_eq!(seen.room_since("lobby"), None);
    }

    fn send(outbox: &mut Outbox, to: &str, text: &str) -> Outgoing {
        Outgoing::Send {
            id: outbox.next_id(),
            to: to.into(),
            text: text.into(),
        }
    }

    fn ids(messages: &[Outgoing]) -> Vec<String> {
        messages
            .iter()
            .map(|m| match m {
                Outgoing::Join(room) => format!("join {room}"),
                Outgoing::Leave(room) => format!("leave {room}"),
                Outgoing::Raw(text) => format!("raw {text}"),
                other => other.client_id().unwrap_or_default().to_string(),
            })
            .collect()
    }

    #[test]
    fn client_ids_carry_the_run_tag_and_count_up() {
        let mut a = Outbox::new("1f2e".into(), 10);
        assert_eq!(a.next_id(), "1f2e-1");
        assert_eq!(a.next_id(), "1f2e-2");
    }

    #[test]
    fn acks_settle_messages_once() {
        let mut o = Outbox::new("t".into(), 10);
        let m = send(&mut o, "bob", "hi");
        let id = m.client_id().unwrap_or_default().to_string();
        o.send_now(m.clone());
        assert_eq!(o.unacked(), 1);
        assert!(!o.is_settled());
        let cases: &[(&str, &str, Option<&Outgoing>)] = &[
            ("unknown id", "t-99", None),
            ("the ack", &id, Some(&m)),
            ("a second ack of a re-sent copy", &id, None),
        ];
        for &(name, ack, want) in cases {
            assert_eq!(o.ack(ack).as_ref(), want, "{name}");
        }
        assert!(o.is_settled());
    }

    /// What a new connection writes while nothing is acked: `on_connect`, then what
    /// `release` lets go.
    fn connect(o: &mut Outbox) -> Vec<Outgoing> {
        let mut out = o.on_connect();
        out.extend(std::iter::from_fn(|| o.release()));
        out
    }

    /// After a reconnect: rooms first, then un-acked messages with their original ids in the
    /// order typed, then what was typed while disconnected.
    #[test]
    fn reconnect_resends_in_order() {
        let mut o = Outbox::new("t".into(), 10);
        o.remember_room("lobby");
        let a = send(&mut o, "bob", "a"); // t-1
        let b = send(&mut o, "bob", "b"); // t-2
        let c = send(&mut o, "bob", "c"); // t-3
        o.send_now(Outgoing::Join("dev".into()));
        for m in [&a, &b, &c] {
            o.send_now(m.clone());
        }
        o.ack("t-2");
        // Connection lost; two more lines typed.
        let d = send(&mut o, "carol", "d"); // t-4
        assert_eq!(o.queue(d), Ok(()));
        assert_eq!(o.queue(Outgoing::Leave("lobby".into())), Ok(()));
        assert_eq!(
            ids(&connect(&mut o)),
            ["join dev", "join lobby", "t-1", "t-3", "t-4", "leave lobby"]
        );
        assert_eq!(o.queued(), 0);
        // Still not acked: the next connection sends them again, with the same ids, and the
        // room left is not joined again.
        assert_eq!(ids(&connect(&mut o)), ["join dev", "t-1", "t-3", "t-4"]);
        for id in ["t-1", "t-3", "t-4"] {
            assert!(o.ack(id).is_some(), "{id}");
        }
        assert_eq!(ids(&connect(&mut o)), ["join dev"]);
        assert!(o.is_settled());
    }

    #[test]
    fn the_queue_is_bounded() {
        let mut o = Outbox::new("t".into(), 2);
        assert_eq!(o.queue(Outgoing::Raw("1".into())), Ok(()));
        assert_eq!(o.queue(Outgoing::Raw("2".into())), Ok(()));
        assert_eq!(
            o.queue(Outgoing::Raw("3".into())),
            Err(Overflow(Outgoing::Raw("3".into())))
        );
        assert_eq!(ids(&connect(&mut o)), ["raw 1", "raw 2"]);
        assert_eq!(o.queue(Outgoing::Raw("4".into())), Ok(()));
    }

    /// At most `WINDOW` messages un-acked: the next waits for an ack, and so does everything
    /// typed after it (a join behind a held message is not written before it); lines that
    /// are not messages pass when nothing waits ahead of them.
    #[test]
    fn the_window_holds_messages_until_acks_make_room() {
        let mut o = Outbox::new("t".into(), 10);
        for i in 0..WINDOW {
            let m = send(&mut o, "bob", &i.to_string());
            assert!(o.may_write(&m), "message {i}");
            o.send_now(m);
        }
        let join = Outgoing::Join("lobby".into());
        assert!(o.may_write(&join), "not a message, nothing held");
        let over = send(&mut o, "bob", "over");
        assert!(!o.may_write(&over));
        o.hold(over.clone());
        assert!(!o.may_write(&join), "behind a held message");
        o.hold(join.clone());
        assert_eq!(o.release(), None, "the window is full");
        assert!(o.ack("t-1").is_some());
        assert_eq!(o.release(), Some(over));
        assert_eq!(o.release(), Some(join));
        assert_eq!(o.release(), None);
        assert_eq!(o.unacked(), WINDOW);
    }

    #[test]
    fn raw_lines_are_never_resent() {
        let mut o = Outbox::new("t".into(), 10);
        o.send_now(Outgoing::Raw("x".into()));
        assert!(o.is_settled());
        assert!(o.on_connect().is_empty());
    }

    #[test]
    fn duplicates_are_dropped_and_since_follows_the_last() {
        let mut seen = Seen::new(100);
        let cases: &[(&str, bool, &str)] = &[
            ("41", true, "41"),
            ("42", true, "42"),
            ("42", false, "42"),
            ("41", false, "42"),
            ("43", true, "43"),
        ];
        for &(msg_id, first, since) in cases {
            assert_eq!(seen.first_time(msg_id), first, "{msg_id}");
            assert_eq!(seen.since(), Some(since), "after {msg_id}");
        }
    }

    #[test]
    fn welcome_sets_where_recovery_starts_until_something_arrives() {
        let mut seen = Seen::new(10);
        assert_eq!(seen.since(), None);
        seen.welcome(None, Some("00000000000000aa"));
        assert_eq!(seen.since(), None);
        assert_eq!(seen.epoch(), None, "no epoch without a since");
        seen.welcome(Some("10"), Some("00000000000000aa"));
        assert_eq!(seen.since(), Some("10"));
        assert_eq!(seen.epoch(), Some("00000000000000aa"));
        // A later welcome (on a reconnect) must not skip what recovery is about to replay.
        seen.welcome(Some("15"), Some("00000000000000bb"));
        assert_eq!(seen.since(), Some("10"));
        assert_eq!(seen.epoch(), Some("00000000000000bb"), "the newest history");
        seen.first_time("11");
        seen.welcome(Some("20"), None);
        assert_eq!(seen.since(), Some("11"));
        assert_eq!(seen.epoch(), Some("00000000000000bb"));
    }

    #[test]
    fn a_room_rejoins_with_its_own_epoch_when_it_has_one() {
        let mut seen = Seen::new(10);
        seen.welcome(Some("5"), Some("00000000000000aa"));
        seen.joined("lobby", Some("40"));
        assert_eq!(
            seen.room_since("lobby"),
            Some(("40", Some("00000000000000aa")))
        );
        seen.room_epoch("lobby", Some("00000000000000bb".into()));
        assert_eq!(
            seen.room_since("lobby"),
            Some(("40", Some("00000000000000bb")))
        );
        seen.left("lobby");
        seen.joined("lobby", Some("41"));
        assert_eq!(
            seen.room_since("lobby"),
            Some(("41", Some("00000000000000aa")))
        );
    }

    #[test]
    fn room_msg_ids_are_their_own_and_do_not_move_since() {
        let mut seen = Seen::new(10);
        assert!(seen.first_time_in(None, "7"));
        assert!(seen.first_time_in(Some("lobby"), "7"), "another stream's 7");
        assert!(!seen.first_time_in(Some("lobby"), "7"));
        assert!(seen.first_time_in(Some("lobby"), "90"));
        assert_eq!(seen.since(), Some("7"), "since names the inbox");
        assert!(!seen.first_time_in(None, "7"));
    }

    #[test]
    fn dedup_memory_is_bounded() {
        let mut seen = Seen::new(3);
        for id in ["1", "2", "3", "4"] {
            assert!(seen.first_time(id));
        }
        assert_eq!(seen.order.len(), 3);
        assert!(!seen.first_time("4"));
        assert!(!seen.first_time("2"));
        // "1" was forgotten first.
        assert!(seen.first_time("1"));
    }
}
