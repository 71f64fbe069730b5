//! The engine seam: where streams live, and how the hub hears that a message is safe (SPEC §13).
//!
//! Owns: the `Engine` trait and the values that cross it (`StreamId`, `Position`, `Epoch`,
//! `Since`, `Ticket`, `Append`, `Publish`, `Completion`, `Outcome`, `Recovery`, `Refusal`),
//! and the two engines behind it:
//! * `memory.rs`: `MemoryEngine`, everything in this process's memory (the default);
//! * `file.rs`: `FileEngine`, the memory engine's index made durable by an append-only log
//!   written by a storage thread with group commit (`--data-dir`);
//! * `bus/`: `BusEngine`, one per worker with `--workers` above 1 (SPEC §14): each stream has a
//!   home worker whose memory engine holds it (and, for a room, its members on every worker),
//!   and the others reach it over queues;
//! * `streams.rs`: `Streams`, the in-memory index of retained messages both engines share;
//! * `data_dir.rs`: the data directory's layout with several workers (a log per worker, and
//!   the marker of how many wrote it);
//! * `journal.rs`: the log's on-disk format (records, segments, recovery from a torn tail);
//! * `storage.rs`: the file engine's storage thread (group commit, rotation, compaction);
//! * `histogram.rs`: fixed-bucket histograms for /metrics;
//! * `presence.rs`: the values presence crosses the seam with (members on other nodes);
//! * `roster.rs`: `Roster`, the replica of other nodes' members an engine that shares rooms
//!   keeps, and the presence changes it reports;
//! * `redis/`: `RedisEngine`, streams and fan-out shared by several nodes through Redis
//!   (`--redis`, SPEC §15; docs/scaling.md).
//!
//! Does not: decide routing, acks or presence rules (the hub does), see connections, or know the
//! JSON envelope: a message is an opaque `body` the hub renders into frames.
//!
//! # The shape of the seam
//!
//! The hub *submits* work tagged with a `Ticket` and later *polls* `Completion`s. An engine may
//! complete at once (the memory engine: the completion is ready before `append` returns) or
//! later (the file engine: after the fsync of the batch holding the message; a Redis engine:
//! after the script's reply; the workers' bus: after the home worker answered). The hub does the
//! same thing in every case: on `Outcome::Stored` it renders the frame with the position, hands
//! it to the recipient's connections and acks the sender. So **a message reaches nobody before
//! the engine holds it**: a msg_id a client has seen is never lost by a crash, and never handed
//! out again (SPEC §13, "acks never lie").
//!
//! Two kinds of stream cross the seam: an id's inbox (`append`, pending until delivered) and a
//! room (`publish`; retained only with room history on, SPEC §16, and never pending). Both are
//! read the same way: `recover` after a `since` (an id's welcome, a room's `join`), and
//! `history` for a room's newest messages. A room's history has its own bounds (the
//! `--room-history*` flags), so rooms and inboxes never evict each other's messages.
//!
//! Engines that complete later wake the reactor through the `Wake` callback they were given
//! (see `poller/waker.rs`); the reactor then calls the app, which calls `poll`.
//!
//! docs/architecture.md ("The engine seam") argues why Redis (SPEC §15) and the workers' bus
//! (SPEC §14) fit behind this trait without changing the hub.

pub mod bus;
pub mod data_dir;
pub mod file;
pub mod histogram;
pub mod journal;
pub mod memory;
pub mod presence;
pub mod redis;
pub mod roster;
mod storage;
pub mod streams;

pub use file::{FileConfig, FileEngine, FsyncPolicy, OpenError, StoreFault};
pub use memory::MemoryEngine;
pub use presence::{LocalMember, Member, MemberKey, PresenceChange};
pub use redis::{RedisConfig, RedisEngine};
pub use streams::Limits;

use crate::app::envelope::AckStatus;
use std::fmt;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

/// A stream: an ordered, bounded sequence of messages with positions (SPEC §13). Every id's
/// inbox, and every room (whose messages are retained only with room history on, SPEC §16,
/// but always have positions, and are where a room's messages arrive from other nodes).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StreamId {
    /// The direct messages to one id.
    Inbox(Rc<str>),
    /// The messages published to one envelope room.
    Room(Rc<str>),
}

impl StreamId {
    pub fn inbox(id: &str) -> StreamId {
        StreamId::Inbox(Rc::from(id))
    }

    pub fn room(name: &str) -> StreamId {
        StreamId::Room(Rc::from(name))
    }

    /// The id or room name, without the kind.
    pub fn name(&self) -> &str {
        match self {
            StreamId::Inbox(name) | StreamId::Room(name) => name,
        }
    }
}

/// A message's place in its stream; on the wire it is the `msg_id`. Ordered within a stream,
/// never reused, and increasing across restarts (SPEC §13). The local engines draw positions from
/// one counter per node, so they are also unique across streams (clients dedup by msg_id).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position(pub u64);

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A stream's history generation: random, made when the history was. A `since` from another
/// epoch names a position in a history this server no longer has (SPEC §13).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Epoch(pub u64);

impl Epoch {
    /// A fresh random epoch (never 0, so 0 can mean "none" on disk).
    pub fn random() -> Epoch {
        Epoch(fastrand::u64(1..))
    }
}

impl fmt::Display for Epoch {
    /// 16 hex digits: short, and obviously not a position.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl Epoch {
    /// Parses the `Display` form.
    pub fn parse(text: &str) -> Option<Epoch> {
        if text.len() != 16 {
            return None;
        }
        u64::from_str_radix(text, 16).ok().map(Epoch)
    }
}

/// What a reconnecting client says it has: the last position it processed, and the epoch that
/// position belongs to, if it knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Since {
    pub position: Position,
    pub epoch: Option<Epoch>,
}

/// The hub's name for one piece of submitted work; completions carry it back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ticket(pub u64);

/// The time, both ways: `instant` for in-process deadlines, `unix_ms` for what must mean the same
/// after a restart (TTLs on disk).
#[derive(Clone, Copy, Debug)]
pub struct Now {
    pub instant: Instant,
    pub unix_ms: u64,
}

/// How an engine that completes later wakes the reactor: called from the engine's own thread
/// after it queued completions. It must be cheap and must not block.
pub type Wake = Arc<dyn Fn() + Send + Sync>;

/// A direct message to store in `stream`.
#[derive(Clone, Debug)]
pub struct Append {
    pub stream: StreamId,
    /// Who sent it, and the client's id for the message, for duplicate suppression.
    pub sender: Rc<str>,
    pub client_id: Option<Rc<str>>,
    /// The message as the hub will render it, without its position (opaque to the engine).
    pub body: Rc<[u8]>,
}

/// A room message: it takes a position and, with a client id, a place in the sender's
/// duplicate window; with `keep` and room history on (`--room-history`, SPEC §16) it is also
/// retained in the room's stream (`StreamId::Room`). An engine that shares rooms with other
/// nodes publishes the room and the body.
#[derive(Clone, Debug)]
pub struct Publish {
    pub room: Rc<str>,
    pub sender: Rc<str>,
    pub client_id: Option<Rc<str>>,
    pub body: Rc<[u8]>,
    /// Retain it in the room's history when the engine keeps one. False for what only needs a
    /// position: the hub's direct messages under `--offline-max 0`, whose `room` names an id.
    pub keep: bool,
}

/// What `poll` hands the hub, in the order the hub must act on it.
#[derive(Debug)]
pub enum Event {
    /// Work this hub submitted has finished.
    Completed(Completion),
    /// A message stored by someone else (another node through Redis, SPEC §15; another worker
    /// through the bus, SPEC §14) for an id or room this hub holds connections for (`online`,
    /// `joined`). The hub delivers it to those connections. The local engines never produce one:
    /// in a single process the hub that submitted a message delivers it itself.
    Arrived(Arrival),
    /// A connection on another node (SPEC §15) or worker (SPEC §14) joined or left a room this
    /// hub holds members of: the hub tells its members of the room. Never this hub's own
    /// changes (it announced them itself), and never from the local engines, where every
    /// member is this hub's. When this hub's first member of a room joins, the members already
    /// on other nodes come as joins too, once the engine knows them (`engine/roster.rs` says
    /// why). The workers' bus knows them before the join is confirmed, and tells none of
    /// them: it reports changes only for rooms this hub has members of.
    Presence(PresenceChange),
    /// Messages of this stream were lost on their way to this node and could not be read back
    /// (trimmed from the stream before a re-read, SPEC §15): the hub closes its connections
    /// that follow the stream (an id's, a room's members) so they reconnect with `since` and
    /// learn from `recovered: false` what is missing. The local engines never produce one.
    Interrupted(StreamId),
}

/// One finished piece of work.
#[derive(Debug)]
pub struct Completion {
    pub ticket: Ticket,
    pub outcome: Outcome,
}

/// A message from elsewhere, already stored by whoever sent it.
#[derive(Debug)]
pub struct Arrival {
    pub stream: StreamId,
    pub position: Position,
    pub body: Rc<[u8]>,
}

#[derive(Debug)]
pub enum Outcome {
    /// The engine holds the message at `position` (file engine: on disk, per `--fsync`).
    /// The hub may now deliver it and ack it.
    Stored { position: Position },
    /// The sender's client id was seen before: ack it again as `status`, deliver nothing.
    Duplicate {
        position: Position,
        status: AckStatus,
    },
    /// Not stored; the ack is `rejected` with `Refusal::reason`.
    Rejected(Refusal),
    /// The answer to `recover`.
    Recovered(Recovery),
    /// `Stored`, and the recipient (an id) had a live connection on another node when it was
    /// stored (the Redis engine, SPEC §15): a direct message is acked `delivered` even when no
    /// connection on this node took it (docs/protocol.md, "Acks across nodes"). The local
    /// engines never answer it.
    StoredOnlineElsewhere { position: Position },
}

/// What a connecting client gets before live traffic (`recover`: an id's welcome, a room's
/// `join` with `since`), or a page of a room's history (`history`).
#[derive(Debug)]
pub struct Recovery {
    pub epoch: Epoch,
    /// The newest position retained in the stream (the welcome's `last_msg_id`).
    pub last: Option<Position>,
    /// True only when every message after `since` is in `messages` (SPEC §13). Without a
    /// `since`, true: the client asked only for what is pending.
    pub recovered: bool,
    /// In position order: the pending messages, and with a `since` every retained one after it.
    pub messages: Vec<Replayed>,
}

/// One message handed back by `recover`.
#[derive(Clone, Debug)]
pub struct Replayed {
    pub position: Position,
    pub body: Rc<[u8]>,
    /// Not yet delivered to any connection: the hub reports it with `delivered` once it is.
    pub pending: bool,
}

/// Why a message was not stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// `--offline-max 0`: nothing is retained.
    Disabled,
    /// The stream is full of messages still pending.
    Full,
    /// The message alone exceeds the byte bound.
    TooLarge,
    /// The store failed (disk full, I/O error); the text is for the log, not the client.
    Store(String),
}

impl Refusal {
    /// The `reason` of a rejected ack.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Disabled => "recipient offline and the offline queue is disabled",
            Refusal::Full => "recipient's offline queue is full",
            Refusal::TooLarge => "message too large for the offline queue",
            Refusal::Store(_) => "the server could not store the message; try again later",
        }
    }
}

/// Where streams live. See the module doc for the submit/poll shape.
///
/// Every method returns at once; none blocks on I/O. Work that needs a completion takes a
/// `Ticket`; each ticket gets exactly one `Completion`. Completions of one engine come out in
/// the order the work was submitted.
pub trait Engine {
    /// "memory", "file" or "redis", for logs and /metrics.
    fn kind(&self) -> &'static str;

    /// The epoch of this engine's streams (what a `since` is judged against, SPEC §13).
    fn epoch(&self) -> Epoch;

    /// Stores a direct message in its stream. Completes with `Stored`, `Duplicate` or
    /// `Rejected`.
    fn append(&mut self, ticket: Ticket, append: Append, now: Now);

    /// Gives a room message its position (and remembers its client id). Completes with
    /// `Stored`, `Duplicate` or `Rejected`.
    fn publish(&mut self, ticket: Ticket, publish: Publish, now: Now);

    /// What a client connecting to `stream` gets before live traffic: completes with
    /// `Recovered`. Only messages already `Stored` are included; newer ones reach the client
    /// through their own completion.
    fn recover(&mut self, ticket: Ticket, stream: &StreamId, since: Option<Since>, now: Now);

    /// The newest `limit` messages retained in `stream` (a room's history page, SPEC §16):
    /// completes with `Recovered`, whose `messages` are oldest first and `last` the newest
    /// retained position. Like `recover`, only messages already `Stored` are included.
    fn history(&mut self, ticket: Ticket, stream: &StreamId, limit: usize, now: Now);

    /// These messages reached a connection: they are no longer pending.
    fn delivered(&mut self, stream: &StreamId, positions: &[Position]);

    /// The hub acked a stored message otherwise than the engine assumed (`queued`/`delivered`
    /// from the pending flag for a direct message, `delivered` for a room message): a publish
    /// some members dropped (`partial`), or one every recipient dropped (`rejected`). A
    /// duplicate of `client_id` is then acked the same way; after `rejected` a retry is a new
    /// message. Kept in memory only: after a restart a duplicate gets the engine's own status.
    fn acked(&mut self, sender: &str, client_id: &str, position: Position, status: AckStatus);

    /// This hub now holds a connection of `id` / no longer holds any. The id's duplicate window
    /// is kept while it is connected and for the retention TTL after; an engine shared with
    /// other nodes or workers subscribes to the id's inbox while it is online here.
    fn online(&mut self, id: &str);
    fn offline(&mut self, id: &Rc<str>, now: Now);

    /// This hub now holds a member of `room` / no longer holds any. Only engines that share
    /// rooms with other nodes or workers care (they subscribe); the local ones ignore it.
    fn joined(&mut self, _room: &str) {}
    fn left(&mut self, _room: &str) {}

    /// Whether rooms are shared with other nodes or workers, which reach this hub through a
    /// subscription: then even a room without history has a first join that must be ordered
    /// against the stream (the hub waits for `recover`, docs/scaling.md), and `recover` of a
    /// room without history answers no messages, only the stream's position.
    fn shares_rooms(&self) -> bool {
        false
    }

    /// Applies TTLs and bounds, and (file engine) reclaims disk space. Cheap when nothing is due.
    fn maintain(&mut self, now: Now);

    /// Moves every event that is ready into `out`, in order.
    fn poll(&mut self, out: &mut Vec<Event>);

    /// Work submitted and not yet completed: acks waiting for durability.
    fn in_flight(&self) -> usize;

    /// What the engine holds now, for the hub's /metrics and /stats.json. `now_ms` lets it
    /// count what has expired but is not swept yet as gone already.
    fn stats(&self, now_ms: u64) -> Stats;

    /// Appends the engine's metrics (Prometheus text).
    fn render_metrics(&self, out: &mut String);

    /// A connection of this hub became a member of `room` (presence is per connection, SPEC
    /// §6). An engine that shares rooms with other nodes records it where they see it and
    /// tells them (`Event::Presence` there); the local engines ignore it. Called again for a
    /// member already recorded when its `info` changed (a token refresh): an update, which
    /// the other nodes show in `members` but do not announce.
    fn member_joined(&mut self, _room: &str, _member: LocalMember<'_>) {}

    /// The connection `conn` (as in `LocalMember::conn`) of this hub is no longer a member of
    /// `room`: it left, its token stopped allowing the room, or it closed.
    fn member_left(&mut self, _room: &str, _conn: u64) {}

    /// The members of `room` connected to other nodes, answered at once from the engine's own
    /// replica (the hub's `members` answer is synchronous), in no particular order. Empty for
    /// the local engines, and for a room this hub holds no member of (an engine need keep no
    /// replica of rooms it does not follow).
    fn remote_members(&self, _room: &str) -> Vec<Member> {
        Vec::new()
    }

    /// What this hub reports as `wsrelay_ids_online`, when the engine shares ids with other
    /// workers of this process (the workers' bus): its share of the ids online anywhere in the
    /// process, so that the workers' figures add up to the process's with each id once
    /// (`server/totals.rs`). None: the hub counts its own ids (one worker, or nodes, which are
    /// processes of their own).
    fn ids_online(&self) -> Option<usize> {
        None
    }

    /// Why the engine is degraded (a store it cannot reach), for /healthz; None when healthy.
    fn health(&self) -> Option<String> {
        None
    }
}

/// A snapshot of an engine's retained messages and duplicate windows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub streams: usize,
    pub messages: usize,
    pub bytes: usize,
    pub pending: usize,
    /// What the bounds and the TTL removed so far.
    pub removed: streams::Removed,
    /// Retained messages past their TTL that the next `maintain` removes.
    pub expiring: streams::Expiring,
    pub dedup_records: usize,
    pub dedup_bytes: usize,
    pub dedup_evicted: u64,
}
