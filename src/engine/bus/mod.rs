//! The workers' engine bus (`--workers` above 1, SPEC §14): every worker's hub talks to a
//! `BusEngine`, and every stream has one *home* worker whose memory engine holds it.
//!
//! Owns: `BusEngine` (one per worker: its own local engine for the streams homed here, a
//! memory engine or with `--data-dir` a file engine, its end of the bus, the routing, the
//! order of completions), `Fabric` (what the workers' engines share: the epoch, the position
//! counter, the queue depths, the stores' health) and `links` (the queues, made on the main
//! thread and moved into the workers). `presence.rs` holds the rooms' members across workers,
//! `wire.rs` what crosses.
//! Does not: see connections or frames (the hub delivers `Stored` and `Arrived` itself), decide
//! acks (the hub does, from `Outcome`), carry raw rooms (`app/raw_bus.rs` does), or lay out the
//! data directory (`engine/data_dir.rs`).
//!
//! # Homes
//!
//! A stream's home is `hash(stream) % workers` (an id's inbox and a room of the same name are
//! two streams and may have two homes). The home's local engine (memory, or a file engine with
//! `--data-dir`) gives the stream's messages their positions, keeps its retained messages, its
//! pending flags and the duplicate windows of the messages sent to it, exactly as the one
//! engine of a single worker does. Work for a stream homed here goes to the local engine
//! directly; for a stream homed elsewhere it is a `Request` on the home's queue, and the answer
//! a `Reply` on ours. Every worker's engine has the same epoch and
//! draws positions from one counter of the process (an atomic add per stored message), so a
//! msg_id is unique across all streams and a `since` is judged the same wherever it lands.
//!
//! # Durable homes
//!
//! With `--data-dir`, each worker's home streams live in a file engine of its own (its own
//! directory, log and storage thread; `with_file`), which completes later, after the fsync.
//! The home then keeps what it must do with each completion (`Serving`: who asked, with which
//! ticket, and the message to fan out) and does it when the completion comes out of the local
//! engine's `poll`, in the order the local engine completes (the order of submission). So a
//! message reaches other workers as `Arrived`, and its sender's worker as a reply, only once
//! it is on disk, exactly as with one worker (SPEC §13, "acks never lie"); a recovery served
//! after it includes it, one served before does not. The storage thread rings the worker's
//! reactor through the same waker as the bus. The memory engine takes the same path; its
//! completions are there at the next `poll`. Every worker's log has the process's epoch, and
//! every log's positions are below the shared counter before any worker serves (the caller
//! opens all engines first, `with_file`).
//!
//! # Who hears a stored message
//!
//! The worker that submitted it delivers it to its own connections on `Stored`, as with one
//! worker. The home also sends it, once, as `Arrived`, to every *other* worker that holds a
//! connection of the id (for an inbox) or a member of the room: workers say so with `Online`
//! (to every worker: each keeps alive the duplicate windows it holds for the id) and `Joined`
//! (to the room's home). So a room message costs at most one bus message per other worker with
//! members, plus the request and reply when its room is homed elsewhere. A direct message to an
//! id online on another worker than the sender's is answered `StoredOnlineElsewhere`, which the
//! hub acks `delivered` (docs/protocol.md, "Acks"). `delivered` reports (not urgent) are
//! batched per home for one pass of the hub: sent at the next `poll`, or before any other note
//! to that home, so the home still sees them in the order of the calls.
//!
//! # Order
//!
//! Each worker has one queue (a multi-producer FIFO): what one worker sends to another arrives
//! in the order it was sent, and a message sent after another was received by its sender (a
//! `Joined` before the member's `joined` reply, then a publish it prompted) arrives after it.
//! A stream's events all come from its home, so each worker sees a stream's messages in
//! position order. Completions come out of `poll` in submission order (the seam's rule): a
//! completion whose earlier tickets are still out is held, and with it whatever its home sent
//! after it (an `Arrived` must not overtake the recovery it follows).
//!
//! A worker asking for a room's recovery (`join` with `since`) subscribes to the room first,
//! so that nothing stored between the recovery and the hub's `joined` is missed; if the hub
//! does not join after all, the subscription is dropped at the next `poll`.
//!
//! # Presence
//!
//! A room's home also keeps the room's members on every worker (SPEC §6): each worker sends it
//! its hub's `member_joined`/`member_left` (also a new `info` after a token refresh), and the
//! home tells each change once to every other worker holding the room (the same holders as the
//! room's messages, from `Joined`), numbered in that worker's view of the room. A worker that
//! starts holding a room gets a snapshot of the other workers' members first (its `Joined`
//! precedes the recovery its hub's join waits for), and keeps them in a `Roster`, the replica
//! the Redis engine keeps too: `remote_members` answers from it at once, and its changes reach
//! the hub as `Event::Presence`, behind whatever their home sent before. A worker that stops
//! holding a room (`Left`) takes its members still listed out, told as leaves. Presence notes
//! are never dropped: they are bounded by member changes. `presence.rs` has the details.
//!
//! Every worker knows every id online in the process (`Online`), and counts those whose inbox
//! is homed at it (`Engine::ids_online`): summed over the workers, `wsrelay_ids_online`
//! counts an id connected on two workers once.
//!
//! # Bursts
//!
//! One worker's hub marks a direct message delivered as it hands it over; across workers the
//! `delivered` report reaches the home one pass later. So a home that takes more requests for
//! an online id's inbox in one pass than its bound (`--offline-max`) would refuse the rest
//! `Full` although the recipient takes them all. The home keeps, per worker, the direct
//! messages it handed it (`Arrived`, or the `Reply` to its own request when it holds the id)
//! until that worker's `Handled` (sent at its next `poll`, carrying its `delivered` reports of
//! the pass, or after them) says its hub acted on them. A direct message its inbox would
//! refuse `Full` (the local engine says so before it is submitted, `would_refuse_full`) while
//! the id is online and a message of the inbox is being stored here or handed and not acted on
//! is held back (`parking.rs`), with every later request of the same worker (its answers keep their order, "Order") and every
//! later direct message for that inbox. Each `poll` serves what may go, oldest first: stored
//! once a report made room, or submitted to be refused `Full` once nothing is on its way (every
//! worker acted, or the id went offline everywhere), as with one worker. A hand-off held back
//! behind an earlier answer counts as acted on (`Handled` says what was received): waiting for
//! it could wait on a request parked itself. Under sustained pipelining such hand-offs are
//! common, and part of a burst still meets `Full` (docs/architecture.md, "A burst to an online
//! id", has the figures and what is left). A worker's `Offline` for the id counts too (its
//! reports came before it). This worker's own hub acts between two `poll`s, so at each `poll`
//! everything handed to it before is acted on. Cost: a `Handled` takes the place of the
//! pass's `Delivered` note to that home, so a note more only for a pass that delivered none of
//! what it was handed; only after direct messages to ids the worker holds, none for rooms.
//!
//! # Bounds
//!
//! Requests, replies and notices are never dropped: requests are bounded by each hub's
//! in-flight bytes (`--max-in-flight-bytes`), replies and notices by requests and connection
//! changes. A parked request is a request not answered yet, still counted in its hub's
//! in-flight bytes; the hand-offs kept for `Handled` are what the workers have not acted on
//! yet (one pass each). An `Arrived` for a worker whose queue holds `ARRIVED_LIMIT` notes or
//! more is dropped and counted (`wsrelay_engine_bus_dropped_total`), and that worker is told
//! once per stream (`Interrupted`, not bounded, at most one per stream until its queue is down
//! to half the limit): its hub closes the connections following the stream, which reconnect
//! with `since` and recover what they missed (a direct message is still pending at its home; a
//! room message is in the room's history if it keeps one, else `recovered: false` says it is
//! gone). Memory stays bounded, and no reader misses a message without being told. A presence
//! record for a worker whose queue is that full is not sent either: that worker is owed one
//! snapshot of the room, sent once its queue is down to half (`presence.rs`, "Bounds").

mod parking;
mod presence;
mod wire;

use super::memory::MemoryEngine;
use super::{
    Append, Completion, Engine, Epoch, Event, LocalMember, Member, Now, Outcome, Position, Publish,
    Since, Stats, StreamId, Ticket, Wake,
};
use super::{FileConfig, FileEngine, OpenError};
use crate::app::dedup::Dedup;
use crate::app::envelope::AckStatus;
use crate::server::metrics::Writer;
use log::warn;
use presence::Tell;
use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use wire::{Answer, Job, Note, Stream, Work};

/// Notes waiting in a worker's queue beyond which `Arrived` notes for it are dropped.
pub const ARRIVED_LIMIT: u64 = 64 * 1024;

/// What the workers' engines share.
#[derive(Debug)]
pub struct Fabric {
    epoch: Epoch,
    /// The next position, for every worker's engine (`MemoryEngine::for_worker`), and the
    /// first one (what each engine's index counts as from an earlier run is below it).
    positions: Arc<AtomicU64>,
    first: Position,
    /// Notes waiting in each worker's queue: raised by the sender before it sends, lowered by
    /// the receiver as it takes them.
    depth: Box<[AtomicU64]>,
    /// Why each worker's local store is degraded (a file engine whose writes fail), so that
    /// /healthz of every worker says so (`Engine::health`). Written only on a change.
    faults: Box<[Mutex<Option<String>>]>,
}

/// One worker's ends of the bus, made on the main thread and moved into the worker.
pub struct Link {
    index: usize,
    inbox: Receiver<Note>,
    /// Every worker's queue and wake-up, by index (this one's never used).
    doors: Vec<(Sender<Note>, Wake)>,
    fabric: Arc<Fabric>,
}

/// The links of `wakes.len()` workers, by index; `wakes[i]` rings worker i's reactor.
pub fn links(wakes: Vec<Wake>, now: Now) -> Vec<Link> {
    links_with_epoch(wakes, now, Epoch::random())
}

/// As `links`, for workers whose streams have `epoch` (their logs', `data_dir::WorkersDir`).
pub fn links_with_epoch(wakes: Vec<Wake>, now: Now, epoch: Epoch) -> Vec<Link> {
    let workers = wakes.len();
    let first = super::memory::first_position(now);
    let fabric = Arc::new(Fabric {
        epoch,
        positions: Arc::new(AtomicU64::new(first.0)),
        first,
        depth: (0..workers).map(|_| AtomicU64::new(0)).collect(),
        faults: (0..workers).map(|_| Mutex::new(None)).collect(),
    });
    let mut doors = Vec::with_capacity(workers);
    let mut inboxes = Vec::with_capacity(workers);
    for wake in wakes {
        let (tx, rx) = mpsc::channel();
        doors.push((tx, wake));
        inboxes.push(rx);
    }
    inboxes
        .into_iter()
        .enumerate()
        .map(|(index, inbox)| Link {
            index,
            inbox,
            doors: doors.clone(),
            fabric: Arc::clone(&fabric),
        })
        .collect()
}

/// The home of `stream` among `workers`. `DefaultHasher::new()` has fixed keys, so every
/// worker computes the same home.
pub fn home(stream: &StreamId, workers: usize) -> usize {
    let mut h = DefaultHasher::new();
    stream.hash(&mut h);
    (h.finish() % workers as u64) as usize
}

/// A room this worker holds members of, or is recovering for a join.
#[derive(Debug, Default)]
struct RoomSub {
    /// The hub said `joined` (and not `left` since).
    hub: bool,
    /// Recoveries asked for and not yet settled.
    recovering: u32,
}

/// Where a worker's home streams live. One per worker, made once: the size difference of the
/// variants costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
enum Local {
    /// In memory (the default): gone at a restart.
    Memory(MemoryEngine),
    /// In the worker's own log (`--data-dir`).
    File(FileEngine),
}

impl Local {
    fn engine(&mut self) -> &mut dyn Engine {
        match self {
            Local::Memory(e) => e,
            Local::File(e) => e,
        }
    }

    fn get(&self) -> &dyn Engine {
        match self {
            Local::Memory(e) => e,
            Local::File(e) => e,
        }
    }

    /// Whether appending `a` now would be refused `Full` (module doc, "Bursts").
    fn would_refuse_full(&self, a: &Append) -> bool {
        match self {
            Local::Memory(e) => e.would_refuse_full(a),
            Local::File(e) => e.would_refuse_full(a),
        }
    }
}

/// Work the local engine is doing for a worker (this one included): what to do with its
/// completion (module doc, "Durable homes").
#[derive(Debug)]
struct Serving {
    /// The ticket the local engine knows it by (the requesters' tickets may collide).
    local: Ticket,
    from: usize,
    ticket: Ticket,
    /// A message's readers and body, to fan out once it is stored.
    delivery: Option<(StreamId, Rc<[u8]>)>,
}

/// One submitted piece of work, until its completion leaves `poll`.
#[derive(Debug)]
struct Submitted {
    ticket: Ticket,
    home: usize,
    /// Its client id's duplicate window is at `home` (where `acked` must go).
    has_client_id: bool,
    /// A room recovery: settle its subscription once the hub acted on it.
    room: Option<Rc<str>>,
}

/// One worker's engine: see the module doc.
pub struct BusEngine {
    link: Link,
    /// The streams homed here.
    local: Local,
    /// Work on `local`, oldest first, and the last local ticket handed out.
    serving: VecDeque<Serving>,
    next_local: u64,
    /// What this worker last published in `Fabric::faults`.
    fault: Option<String>,
    /// Ids with a connection on some worker, and which workers (kept by every worker).
    ids: HashMap<Rc<str>, Vec<usize>>,
    /// Rooms homed here with members on some worker, and which workers.
    rooms: HashMap<Rc<str>, Vec<usize>>,
    /// This worker's own room subscriptions (sent to each room's home).
    subs: HashMap<Rc<str>, RoomSub>,
    /// Room recoveries whose completion left `poll`: settled at the next `poll`.
    settle: Vec<Rc<str>>,
    /// Events by the worker they came from (this one's own included), in arrival order.
    sources: Vec<VecDeque<Event>>,
    /// Work submitted whose completion has not left `poll` yet, oldest first.
    order: VecDeque<Submitted>,
    /// Homes of the duplicate windows of the completions the last `poll` handed out, by
    /// position: `acked` follows them (the hub calls it while acting on that completion).
    acked_homes: HashMap<Position, usize>,
    /// `delivered` reports for streams homed at each worker, not sent yet.
    delivered: Vec<Vec<(Stream, Vec<Position>)>>,
    /// Streams homed here whose messages for each worker were dropped and that worker told
    /// (`Interrupted`), until its queue is down to half `ARRIVED_LIMIT` again.
    interrupted: Vec<HashSet<StreamId>>,
    /// Notes this worker sent to each worker, and `Arrived` notes it dropped for each.
    sent: Vec<u64>,
    dropped: Vec<u64>,
    received: u64,
    /// Members of the rooms homed here, and the replica of the other workers' members of the
    /// rooms this worker holds (`presence.rs`).
    presence: presence::Presence,
    /// Ids online on some worker whose inbox is homed here: this worker's share of the
    /// process's `wsrelay_ids_online` (`Engine::ids_online`).
    ids_homed_here: usize,
    /// Direct messages held back while deliveries to their recipient are being reported, and
    /// the hand-offs those reports may still come for (module doc, "Bursts").
    parking: parking::Parking,
    /// The newest direct message each home handed this worker (`Arrived`, or a `Reply` saying
    /// stored), and the newest it was told this worker acted on (`Handled`).
    handed_here: Vec<Position>,
    handled_told: Vec<Position>,
    /// This worker's direct messages homed elsewhere, not answered yet, with their recipient:
    /// a `Reply` saying one is stored is a hand-off to this worker when it holds the recipient
    /// (its hub delivers it there; a room message's reply is never one).
    appends_away: HashMap<Ticket, Rc<str>>,
}

impl BusEngine {
    /// Worker `link.index`'s engine, with the memory engine's bounds.
    pub fn new(
        link: Link,
        limits: super::Limits,
        room_history: super::Limits,
        dedup: Dedup,
        now: Now,
    ) -> BusEngine {
        let fabric = &link.fabric;
        let local = MemoryEngine::for_worker(
            limits,
            dedup,
            fabric.epoch,
            (Arc::clone(&fabric.positions), fabric.first),
            now,
        )
        .with_room_history(room_history);
        BusEngine::on(link, Local::Memory(local))
    }

    /// Worker `link.index`'s engine with its home streams in a file engine over
    /// `config.dir` (`data_dir::WorkersDir::worker`): reads that log, which must have the
    /// link's epoch (or none yet), raises the shared position counter above it, and rings this
    /// worker's reactor from the storage thread.
    ///
    /// Every worker's engine must be open before any worker submits work: only then is the
    /// counter above every log's positions (the caller waits for all, e.g. on a barrier).
    ///
    /// # Errors
    /// `FileEngine::open_worker`'s: the log cannot be used, or is another store's.
    pub fn with_file(link: Link, config: FileConfig, now: Now) -> Result<BusEngine, OpenError> {
        let wake = Arc::clone(&link.doors[link.index].1);
        let fabric = &link.fabric;
        let file = FileEngine::open_worker(
            config,
            wake,
            now,
            fabric.epoch,
            Arc::clone(&fabric.positions),
        )?;
        Ok(BusEngine::on(link, Local::File(file)))
    }

    fn on(link: Link, local: Local) -> BusEngine {
        let workers = link.doors.len();
        BusEngine {
            local,
            serving: VecDeque::new(),
            next_local: 0,
            fault: None,
            ids: HashMap::new(),
            rooms: HashMap::new(),
            subs: HashMap::new(),
            settle: Vec::new(),
            sources: (0..workers).map(|_| VecDeque::new()).collect(),
            order: VecDeque::new(),
            acked_homes: HashMap::new(),
            delivered: (0..workers).map(|_| Vec::new()).collect(),
            interrupted: (0..workers).map(|_| HashSet::new()).collect(),
            sent: vec![0; workers],
            dropped: vec![0; workers],
            received: 0,
            presence: presence::Presence::new(link.index, workers),
            ids_homed_here: 0,
            parking: parking::Parking::new(workers),
            handed_here: vec![Position(0); workers],
            handled_told: vec![Position(0); workers],
            appends_away: HashMap::new(),
            link,
        }
    }

    fn me(&self) -> usize {
        self.link.index
    }

    fn workers(&self) -> usize {
        self.link.doors.len()
    }

    fn home_of(&self, stream: &StreamId) -> usize {
        home(stream, self.workers())
    }

    /// Puts `note` on worker `to`'s queue (after the `delivered` reports waiting for it) and
    /// rings it.
    fn send(&mut self, to: usize, note: Note) {
        if !self.delivered[to].is_empty() {
            let reports = std::mem::take(&mut self.delivered[to]);
            self.push(to, Note::Delivered(reports));
        }
        self.push(to, note);
    }

    fn push(&mut self, to: usize, note: Note) {
        let depth = &self.link.fabric.depth[to];
        depth.fetch_add(1, Ordering::Relaxed);
        let (door, wake) = &self.link.doors[to];
        if door.send(note).is_ok() {
            self.sent[to] += 1;
            wake();
        } else {
            // That worker has ended (shutdown): nothing left to tell it.
            depth.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Where a message's readers are: a room, or (a direct message, also under
    /// `--offline-max 0`, where the hub publishes it with `keep: false`) an inbox.
    fn delivery_stream(job: &Job) -> Option<StreamId> {
        match job {
            Job::Append(_) | Job::Publish(_) => Some(Self::stream_of(job)),
            Job::Recover(..) | Job::History(..) => None,
        }
    }

    /// The stream `job` is for, whose home does it.
    fn stream_of(job: &Job) -> StreamId {
        match job {
            Job::Append(a) => a.stream.clone(),
            Job::Publish(p) if p.keep => StreamId::Room(Rc::clone(&p.room)),
            Job::Publish(p) => StreamId::Inbox(Rc::clone(&p.room)),
            Job::Recover(stream, _) | Job::History(stream, _) => stream.clone(),
        }
    }

    /// Takes `job` for the stream's home, here or over the bus.
    fn submit(&mut self, ticket: Ticket, job: Job, now: Now) {
        let home = self.home_of(&Self::stream_of(&job));
        let has_client_id = match &job {
            Job::Append(a) => a.client_id.is_some(),
            Job::Publish(p) => p.client_id.is_some(),
            _ => false,
        };
        let room = match &job {
            Job::Recover(StreamId::Room(room), _) => Some(Rc::clone(room)),
            _ => None,
        };
        if let Some(room) = &room {
            // Hear the room from before its recovery (module doc, "Order").
            let sub = self.subs.entry(Rc::clone(room)).or_default();
            sub.recovering += 1;
            if sub.recovering == 1 && !sub.hub {
                self.subscribe(room, true);
            }
        }
        self.order.push_back(Submitted {
            ticket,
            home,
            has_client_id,
            room,
        });
        if home == self.me() {
            let me = self.me();
            self.serve(me, ticket, job, now);
        } else {
            if let Job::Append(Append {
                stream: StreamId::Inbox(id),
                ..
            }) = &job
            {
                self.appends_away.insert(ticket, Rc::clone(id));
            }
            let from = self.me();
            let work = Work::of(&job);
            self.send(
                home,
                Note::Request {
                    from,
                    ticket,
                    work,
                    now,
                },
            );
        }
    }

    /// Takes `job` (for a stream homed here) for worker `from`: submits it (`serve_now`), or
    /// holds it back (module doc, "Bursts").
    fn serve(&mut self, from: usize, ticket: Ticket, job: Job, now: Now) {
        if self.parking.behind(from, &job) || self.must_wait(&job) {
            self.parking.park(from, ticket, job, now);
        } else {
            self.serve_now(from, ticket, job, now);
        }
    }

    /// Whether `job` is a direct message its stream would refuse `Full` now, while its
    /// recipient is online and some of the stream's messages are still on their way to it:
    /// being stored here, or handed to a worker that has not acted on them yet. That worker's
    /// `delivered` reports may still make room (module doc, "Bursts").
    fn must_wait(&self, job: &Job) -> bool {
        let Job::Append(a) = job else {
            return false;
        };
        let StreamId::Inbox(id) = &a.stream else {
            return false;
        };
        self.ids.contains_key(id)
            && self.local.would_refuse_full(a)
            && (self.parking.awaiting(&a.stream) || self.storing(&a.stream))
    }

    /// Whether a message of `stream` is with the local engine, not answered yet (a scan: only
    /// asked of a stream that is full).
    fn storing(&self, stream: &StreamId) -> bool {
        self.serving
            .iter()
            .any(|s| s.delivery.as_ref().is_some_and(|(d, _)| d == stream))
    }

    /// Serves the held-back requests that may go now, oldest first: those no report can make
    /// room for any more are submitted too, and refused `Full` by the local engine. Returns
    /// whether it served any.
    fn unpark(&mut self) -> bool {
        let mut served = false;
        loop {
            let next = self
                .parking
                .fronts()
                .filter(|(_, parked)| !self.must_wait(&parked.job))
                .min_by_key(|(_, parked)| parked.seq)
                .map(|(from, _)| from);
            let Some((from, parked)) = next.and_then(|from| Some((from, self.parking.take(from)?)))
            else {
                return served;
            };
            self.serve_now(from, parked.ticket, parked.job, parked.now);
            served = true;
        }
    }

    /// Rings this worker's reactor when something held back may go now (this hub reported a
    /// delivery, or an id went offline here, outside a `poll`): its next `poll` serves it.
    fn nudge(&self) {
        if !self.parking.is_empty() {
            (self.link.doors[self.me()].1)();
        }
    }

    /// Sends the `delivered` reports waiting for every worker, and tells each home which of
    /// the direct messages it handed this worker the hub has acted on: everything received
    /// before this `poll`. Both in one note where there are both (`Handled` after the reports
    /// it carries). This worker's own hand-offs were all made in earlier `poll`s, so all are
    /// acted on.
    fn report(&mut self) {
        let me = self.me();
        self.parking.acknowledged(me, Position(u64::MAX));
        for home in (0..self.workers()).filter(|&w| w != me) {
            let reports = std::mem::take(&mut self.delivered[home]);
            let through = self.handed_here[home];
            if through > self.handled_told[home] {
                self.handled_told[home] = through;
                let note = Note::Handled {
                    from: me,
                    through,
                    reports,
                };
                self.push(home, note);
            } else if !reports.is_empty() {
                self.push(home, Note::Delivered(reports));
            }
        }
    }

    /// Whether the next `poll` has a `Handled` to tell (`report`).
    fn owes_handled(&self) -> bool {
        let me = self.me();
        self.parking.handed_to(me)
            || (0..self.workers()).any(|h| h != me && self.handed_here[h] > self.handled_told[h])
    }

    /// Submits `job` (for a stream homed here) for worker `from` to the local engine; its
    /// completion is acted on (`answer`) when the local engine hands it out (`drain_local`).
    fn serve_now(&mut self, from: usize, ticket: Ticket, job: Job, now: Now) {
        let body = match &job {
            Job::Append(a) => Some(Rc::clone(&a.body)),
            Job::Publish(p) => Some(Rc::clone(&p.body)),
            _ => None,
        };
        let delivery = Self::delivery_stream(&job).zip(body);
        self.next_local += 1;
        let local = Ticket(self.next_local);
        self.serving.push_back(Serving {
            local,
            from,
            ticket,
            delivery,
        });
        let engine = self.local.engine();
        match job {
            Job::Append(a) => engine.append(local, a, now),
            Job::Publish(p) => engine.publish(local, p, now),
            Job::Recover(stream, since) => engine.recover(local, &stream, since, now),
            Job::History(stream, limit) => engine.history(local, &stream, limit, now),
        }
    }

    /// Acts on every completion the local engine has, in its order (that of submission).
    fn drain_local(&mut self) {
        let mut done = Vec::new();
        self.local.engine().poll(&mut done);
        // Before any answer leaves: a worker that hears of a rejected message finds the
        // store degraded on /healthz.
        self.publish_fault();
        for event in done {
            let Event::Completed(Completion { ticket, outcome }) = event else {
                // The local engines share nothing, so they never produce anything else.
                warn!("the local engine produced an event that is not a completion: dropped");
                continue;
            };
            // In order, so this is the oldest; searched anyway, so that a mismatch costs one
            // warning rather than every later answer.
            let Some(at) = self.serving.iter().position(|s| s.local == ticket) else {
                warn!("the local engine completed {ticket:?}, which nobody is waiting for");
                continue;
            };
            if at != 0 {
                warn!("the local engine completed {ticket:?} out of submission order");
            }
            if let Some(serving) = self.serving.remove(at) {
                self.answer(serving, outcome);
            }
        }
    }

    /// A message stored here goes to every other worker holding the stream's readers; then the
    /// worker that asked gets its answer.
    fn answer(&mut self, serving: Serving, mut outcome: Outcome) {
        let Serving {
            from,
            ticket,
            delivery,
            ..
        } = serving;
        if let (Some((stream, body)), Outcome::Stored { position }) = (delivery, &outcome) {
            let position = *position;
            if let StreamId::Inbox(id) = &stream {
                // The answer is a hand-off too: the asking worker's hub delivers the message
                // to the recipient's connections there (module doc, "Bursts").
                if self.ids.get(id).is_some_and(|w| w.contains(&from)) {
                    self.parking.handed(from, &stream, position);
                }
            }
            let elsewhere = self.fan_out(from, &stream, position, &body);
            if elsewhere && matches!(stream, StreamId::Inbox(_)) {
                outcome = Outcome::StoredOnlineElsewhere { position };
            }
        }
        if from == self.me() {
            let me = self.me();
            self.sources[me].push_back(Event::Completed(Completion { ticket, outcome }));
        } else {
            let me = self.me();
            let answer = Answer::of(outcome);
            self.send(
                from,
                Note::Reply {
                    from: me,
                    ticket,
                    answer,
                },
            );
        }
    }

    /// Sends a message stored here to every worker but `from` that holds its readers; returns
    /// whether there was any.
    fn fan_out(
        &mut self,
        from: usize,
        stream: &StreamId,
        position: Position,
        body: &Rc<[u8]>,
    ) -> bool {
        let holders = match stream {
            StreamId::Inbox(id) => self.ids.get(id),
            StreamId::Room(room) => self.rooms.get(room),
        };
        let targets: Vec<usize> = holders
            .into_iter()
            .flatten()
            .copied()
            .filter(|&w| w != from)
            .collect();
        if targets.is_empty() {
            return false;
        }
        let me = self.me();
        let shared: Arc<[u8]> = Arc::from(&**body);
        let wire_stream = Stream::of(stream);
        let inbox = matches!(stream, StreamId::Inbox(_));
        for to in targets {
            if to == me {
                let event = Note::arrival(&wire_stream, position, &shared);
                self.sources[me].push_back(event);
                if inbox {
                    self.parking.handed(me, stream, position);
                }
                continue;
            }
            let depth = self.link.fabric.depth[to].load(Ordering::Relaxed);
            if depth >= ARRIVED_LIMIT {
                self.dropped[to] += 1;
                if self.interrupted[to].insert(stream.clone()) {
                    let stream = wire_stream.clone();
                    self.send(to, Note::Interrupted { from: me, stream });
                }
                continue;
            }
            if depth <= ARRIVED_LIMIT / 2 && !self.interrupted[to].is_empty() {
                self.interrupted[to].clear();
            }
            let note = Note::Arrived {
                from: me,
                stream: wire_stream.clone(),
                position,
                body: Arc::clone(&shared),
            };
            self.send(to, note);
            if inbox {
                self.parking.handed(to, stream, position);
            }
        }
        true
    }

    /// Tells `room`'s home that this worker holds members of it (or no longer does).
    fn subscribe(&mut self, room: &Rc<str>, joined: bool) {
        // The roster follows the room while this worker holds it (`presence.rs`).
        self.follow_presence(room, joined);
        let home = self.home_of(&StreamId::Room(Rc::clone(room)));
        let me = self.me();
        if home == me {
            self.holder(me, room, joined);
            return;
        }
        let room = Arc::from(&**room);
        let note = if joined {
            Note::Joined { from: me, room }
        } else {
            Note::Left { from: me, room }
        };
        self.send(home, note);
    }

    /// Worker `from` holds members of `room` (homed here), or no longer does.
    fn holder(&mut self, from: usize, room: &str, joined: bool) {
        if joined {
            let workers = self.rooms.entry(Rc::from(room)).or_default();
            if !workers.contains(&from) {
                workers.push(from);
            }
        } else if let Some(workers) = self.rooms.get_mut(room) {
            workers.retain(|&w| w != from);
            if workers.is_empty() {
                self.rooms.remove(room);
            }
        }
        self.presence_holder(from, room, joined);
    }

    /// Worker `from` holds a connection of `id`.
    fn id_online(&mut self, from: usize, id: &str) {
        let homed_here = self.home_of(&StreamId::inbox(id)) == self.me();
        let workers = self.ids.entry(Rc::from(id)).or_default();
        if workers.is_empty() {
            self.local.engine().online(id);
            self.ids_homed_here += usize::from(homed_here);
        }
        if !workers.contains(&from) {
            workers.push(from);
        }
    }

    /// Worker `from` no longer holds any connection of `id`.
    fn id_offline(&mut self, from: usize, id: &str, now: Now) {
        // It reported what it delivered before it said so: no report of the id's messages
        // handed to it can come any more (module doc, "Bursts").
        self.parking.forget(from, &StreamId::inbox(id));
        let Some(workers) = self.ids.get_mut(id) else {
            return;
        };
        workers.retain(|&w| w != from);
        if workers.is_empty() {
            if let Some((id, _)) = self.ids.remove_entry(id) {
                self.local.engine().offline(&id, now);
                if self.home_of(&StreamId::Inbox(Rc::clone(&id))) == self.me() {
                    self.ids_homed_here -= 1;
                }
            }
        }
    }

    /// Takes every note waiting in this worker's queue.
    fn receive(&mut self) {
        while let Ok(note) = self.link.inbox.try_recv() {
            self.link.fabric.depth[self.me()].fetch_sub(1, Ordering::Relaxed);
            self.received += 1;
            match note {
                Note::Request {
                    from,
                    ticket,
                    work,
                    now,
                } => self.serve(from, ticket, work.into_job(), now),
                Note::Reply {
                    from,
                    ticket,
                    answer,
                } => {
                    // A home that thought this worker held the id when it did not any more
                    // forgets the hand-off at this worker's `Offline`.
                    let me = self.me();
                    let handed = self
                        .appends_away
                        .remove(&ticket)
                        .is_some_and(|id| self.ids.get(&id).is_some_and(|w| w.contains(&me)));
                    if let (true, Answer::Stored(p) | Answer::StoredOnlineElsewhere(p)) =
                        (handed, &answer)
                    {
                        self.handed_here[from] = self.handed_here[from].max(*p);
                    }
                    self.sources[from].push_back(Note::completion(ticket, answer));
                }
                Note::Arrived {
                    from,
                    stream,
                    position,
                    body,
                } => {
                    if let Stream::Inbox(_) = &stream {
                        self.handed_here[from] = self.handed_here[from].max(position);
                    }
                    self.sources[from].push_back(Note::arrival(&stream, position, &body));
                }
                Note::Interrupted { from, stream } => {
                    self.sources[from].push_back(Event::Interrupted(stream.local()));
                }
                Note::Delivered(reports) => {
                    for (stream, positions) in reports {
                        self.local.engine().delivered(&stream.local(), &positions);
                    }
                }
                Note::Acked {
                    sender,
                    client_id,
                    position,
                    status,
                } => self
                    .local
                    .engine()
                    .acked(&sender, &client_id, position, status),
                Note::Online { from, id } => self.id_online(from, &id),
                Note::Offline { from, id, now } => self.id_offline(from, &id, now),
                Note::Joined { from, room } => self.holder(from, &room, true),
                Note::Left { from, room } => self.holder(from, &room, false),
                Note::MemberJoined { room, member } => self.presence_joined(&room, member),
                Note::MemberLeft { from, room, conn } => self.presence_left(&room, from, conn),
                Note::Snapshot {
                    from,
                    room,
                    version,
                    members,
                } => self.apply_presence(from, &room, Tell::Snapshot { version, members }),
                Note::Presence {
                    from,
                    room,
                    version,
                    member,
                    joined,
                } => {
                    let record = Tell::Record {
                        version,
                        member,
                        joined,
                    };
                    self.apply_presence(from, &room, record);
                }
                Note::Handled {
                    from,
                    through,
                    reports,
                } => {
                    for (stream, positions) in reports {
                        self.local.engine().delivered(&stream.local(), &positions);
                    }
                    self.parking.acknowledged(from, through);
                }
            }
        }
    }

    /// Moves what may leave into `out`: from each source, everything up to its first
    /// completion that is not the oldest outstanding one (module doc, "Order").
    fn release(&mut self, out: &mut Vec<Event>) {
        loop {
            for source in &mut self.sources {
                while matches!(
                    source.front(),
                    Some(Event::Arrived(_) | Event::Interrupted(_) | Event::Presence(_))
                ) {
                    out.extend(source.pop_front());
                }
            }
            let Some(next) = self.order.front() else {
                return;
            };
            let source = &mut self.sources[next.home];
            match source.front() {
                Some(Event::Completed(c)) if c.ticket == next.ticket => {}
                _ => return,
            }
            let (Some(Event::Completed(completion)), Some(next)) =
                (source.pop_front(), self.order.pop_front())
            else {
                return;
            };
            if next.has_client_id {
                if let Outcome::Stored { position }
                | Outcome::StoredOnlineElsewhere { position }
                | Outcome::Duplicate { position, .. } = &completion.outcome
                {
                    self.acked_homes.insert(*position, next.home);
                }
            }
            if let Some(room) = next.room {
                self.settle.push(room);
            }
            out.push(Event::Completed(completion));
        }
    }

    /// Room recoveries the hub has acted on: a room it did not join after all is dropped.
    fn settle_rooms(&mut self) {
        for room in std::mem::take(&mut self.settle) {
            let Some(sub) = self.subs.get_mut(&room) else {
                continue;
            };
            sub.recovering = sub.recovering.saturating_sub(1);
            if sub.recovering == 0 && !sub.hub {
                self.subs.remove(&room);
                self.subscribe(&room, false);
            }
        }
    }

    /// Tells the other workers (`Fabric::faults`) when this worker's store became degraded or
    /// healthy again.
    fn publish_fault(&mut self) {
        let fault = self.local.get().health();
        if fault != self.fault {
            let slot = &self.link.fabric.faults[self.me()];
            *slot.lock().unwrap_or_else(PoisonError::into_inner) = fault.clone();
            self.fault = fault;
        }
    }

    /// The bus's own figures (Prometheus text).
    fn render_bus(&self, out: &mut String) {
        let me = self.me().to_string();
        let mut w = Writer::new(out);
        w.family(
            "wsrelay_engine_bus_sent_total",
            "counter",
            "Notes this worker's engine put on another worker's queue (requests, replies, arrived messages, notices), by pair of workers (SPEC §14).",
        );
        for (to, n) in self.sent.iter().enumerate() {
            if to != self.me() {
                let to = to.to_string();
                w.sample(
                    "wsrelay_engine_bus_sent_total",
                    &[("from", &me), ("to", &to)],
                    n,
                );
            }
        }
        w.family(
            "wsrelay_engine_bus_dropped_total",
            "counter",
            "Arrived messages not sent to a worker whose engine queue was full (its connections following the stream are closed to recover), by pair of workers.",
        );
        for (to, n) in self.dropped.iter().enumerate() {
            if to != self.me() {
                let to = to.to_string();
                w.sample(
                    "wsrelay_engine_bus_dropped_total",
                    &[("from", &me), ("to", &to)],
                    n,
                );
            }
        }
        w.family(
            "wsrelay_engine_bus_received_total",
            "counter",
            "Notes this worker's engine took off its queue.",
        );
        w.sample(
            "wsrelay_engine_bus_received_total",
            &[("worker", &me)],
            self.received,
        );
        w.family(
            "wsrelay_engine_bus_depth",
            "gauge",
            "Notes waiting in this worker's engine queue.",
        );
        let depth = self.link.fabric.depth[self.me()].load(Ordering::Relaxed);
        w.sample("wsrelay_engine_bus_depth", &[("worker", &me)], depth);
        w.family(
            "wsrelay_engine_bus_held",
            "gauge",
            "Events this worker's engine holds back until earlier completions are in.",
        );
        let held: usize = self.sources.iter().map(VecDeque::len).sum();
        w.sample("wsrelay_engine_bus_held", &[("worker", &me)], held);
        w.family(
            "wsrelay_engine_bus_parked",
            "gauge",
            "Direct messages (and the requests of the same worker behind them) this worker, as their inbox's home, holds back while deliveries to the online recipient are still being reported.",
        );
        let parked = self.parking.parked();
        w.sample("wsrelay_engine_bus_parked", &[("worker", &me)], parked);
        w.family(
            "wsrelay_engine_bus_parked_total",
            "counter",
            "Requests this worker, as a home, held back until deliveries to an online recipient were reported (a burst beyond --offline-max within one pass).",
        );
        w.sample(
            "wsrelay_engine_bus_parked_total",
            &[("worker", &me)],
            self.parking.parked_total,
        );
    }
}

impl Engine for BusEngine {
    fn kind(&self) -> &'static str {
        "bus"
    }

    fn epoch(&self) -> Epoch {
        self.link.fabric.epoch
    }

    fn append(&mut self, ticket: Ticket, append: Append, now: Now) {
        self.submit(ticket, Job::Append(append), now);
    }

    fn publish(&mut self, ticket: Ticket, publish: Publish, now: Now) {
        self.submit(ticket, Job::Publish(publish), now);
    }

    fn recover(&mut self, ticket: Ticket, stream: &StreamId, since: Option<Since>, now: Now) {
        self.submit(ticket, Job::Recover(stream.clone(), since), now);
    }

    fn history(&mut self, ticket: Ticket, stream: &StreamId, limit: usize, now: Now) {
        self.submit(ticket, Job::History(stream.clone(), limit), now);
    }

    fn delivered(&mut self, stream: &StreamId, positions: &[Position]) {
        let home = self.home_of(stream);
        if home == self.me() {
            self.local.engine().delivered(stream, positions);
            self.nudge();
        } else {
            // Not urgent: batched per home, sent before anything else goes there (so the
            // home's order is the one of the calls) or at the next `poll`.
            self.delivered[home].push((Stream::of(stream), positions.to_vec()));
        }
    }

    fn acked(&mut self, sender: &str, client_id: &str, position: Position, status: AckStatus) {
        let Some(&home) = self.acked_homes.get(&position) else {
            warn!("acked {position} without a completion just before it: not recorded");
            return;
        };
        if home == self.me() {
            self.local
                .engine()
                .acked(sender, client_id, position, status);
        } else {
            let note = Note::Acked {
                sender: Arc::from(sender),
                client_id: Arc::from(client_id),
                position,
                status,
            };
            self.send(home, note);
        }
    }

    /// The hub calls it for every connection of `id`; the other workers hear of the first.
    fn online(&mut self, id: &str) {
        let me = self.me();
        if self.ids.get(id).is_some_and(|w| w.contains(&me)) {
            return;
        }
        self.id_online(me, id);
        for to in (0..self.workers()).filter(|&w| w != me) {
            self.send(
                to,
                Note::Online {
                    from: me,
                    id: Arc::from(id),
                },
            );
        }
    }

    fn offline(&mut self, id: &Rc<str>, now: Now) {
        let me = self.me();
        self.id_offline(me, id, now);
        self.nudge();
        for to in (0..self.workers()).filter(|&w| w != me) {
            self.send(
                to,
                Note::Offline {
                    from: me,
                    id: Arc::from(&**id),
                    now,
                },
            );
        }
    }

    /// A room's home worker keeps no history when it is off, so its `recover` answers no
    /// messages; the subscription starts with the recovery (`submit`).
    fn shares_rooms(&self) -> bool {
        true
    }

    fn joined(&mut self, room: &str) {
        let sub = self.subs.entry(Rc::from(room)).or_default();
        let new = !sub.hub && sub.recovering == 0;
        sub.hub = true;
        if new {
            self.subscribe(&Rc::from(room), true);
        }
    }

    fn left(&mut self, room: &str) {
        let Some(sub) = self.subs.get_mut(room) else {
            return;
        };
        sub.hub = false;
        if sub.recovering == 0 {
            self.subs.remove(room);
            self.subscribe(&Rc::from(room), false);
        }
    }

    fn maintain(&mut self, now: Now) {
        self.local.engine().maintain(now);
    }

    fn poll(&mut self, out: &mut Vec<Event>) {
        self.acked_homes.clear();
        self.report();
        self.settle_rooms();
        self.receive();
        self.reload_stale_rooms();
        self.pay_owed_snapshots();
        // After the reports just received (and this hub's own, made since the last `poll`).
        self.unpark();
        // Last, so that what the requests just received submitted goes to the disk together
        // (the file engine's `poll` sends it as one op). A held-back message may go once the
        // messages of its stream being stored are answered: until none goes any more.
        loop {
            self.drain_local();
            if !self.unpark() {
                break;
            }
        }
        let before = out.len();
        self.release(out);
        if out.len() == before && self.owes_handled() {
            // Nothing for the hub, so it may not poll again soon: the homes waiting for this
            // worker's `Handled` (held-back messages may) hear at the next `poll`, now.
            (self.link.doors[self.me()].1)();
        }
    }

    fn in_flight(&self) -> usize {
        self.order.len()
    }

    /// The streams homed here: summed over the workers, the process's.
    fn stats(&self, now_ms: u64) -> Stats {
        self.local.get().stats(now_ms)
    }

    fn render_metrics(&self, out: &mut String) {
        match &self.local {
            Local::Memory(local) => local.render_index(self.kind(), self.in_flight(), out),
            // The file engine's own families (its kind "file", its disk, its fsyncs): summed
            // over the workers like the rest (`server/totals.rs`).
            Local::File(local) => local.render_metrics(out),
        }
        self.render_bus(out);
        self.render_presence(out);
    }

    /// Tells the room's home (`presence.rs`).
    fn member_joined(&mut self, room: &str, member: LocalMember<'_>) {
        self.local_member_joined(room, member);
    }

    fn member_left(&mut self, room: &str, conn: u64) {
        self.local_member_left(room, conn);
    }

    /// From this worker's roster of the rooms it holds (`presence.rs`).
    fn remote_members(&self, room: &str) -> Vec<Member> {
        self.members_elsewhere(room)
    }

    /// The ids online on any worker whose inbox is homed here: every worker knows every id
    /// online in the process (`Online`), and each counts its share, so the workers' figures
    /// add up to the process's with each id once.
    fn ids_online(&self) -> Option<usize> {
        Some(self.ids_homed_here)
    }

    /// Degraded when any worker's store is: a client may land on any worker, and its messages
    /// may be homed at the failing one.
    fn health(&self) -> Option<String> {
        if let Some(why) = self.local.get().health() {
            return Some(format!("worker {}: {why}", self.me()));
        }
        self.link
            .fabric
            .faults
            .iter()
            .enumerate()
            .filter(|&(i, _)| i != self.me())
            .find_map(|(i, fault)| {
                let fault = fault.lock().unwrap_or_else(PoisonError::into_inner);
                fault.as_ref().map(|why| format!("worker {i}: {why}"))
            })
    }
}

#[cfg(test)]
mod tests;
