//! The file engine: the memory engine's index, made durable by an append-only log that a
//! storage thread writes with group commit (SPEC §13, `--data-dir`).
//!
//! Owns: `FileEngine` (the front-end the hub talks to, on the reactor thread), opening a data
//! directory (the lock, reading every segment, cutting a torn tail, rebuilding the index), the
//! queue of work waiting for the storage thread, and the choice of which old segment to compact.
//! Does not: write or sync files (`storage.rs` does, on its own thread), or define the format
//! (`journal.rs`).
//!
//! # How a message becomes durable
//!
//! 1. `append` decides at once, in memory, as the memory engine would: duplicate, refused by a
//!    bound, or accepted at a new position. An accepted message enters the index (so the bounds
//!    see it) and its record goes to the storage thread. Nothing is sent to any client yet.
//! 2. The storage thread writes the batch holding it and fsyncs it (`--fsync batch`), then
//!    answers and wakes the reactor.
//! 3. `poll` turns the answer into `Stored` (or, if the write failed, takes the message out of
//!    the index again and completes `Rejected`). Only now does the hub deliver and ack it.
//!
//! Room history (SPEC §16) uses the same log: with it on, a room message is written as an
//! `Append` record to the room's stream (never pending) instead of the position-only
//! `Published` record, and start-up rebuilds the room index from those records, as it does the
//! inboxes. A room message whose write fails is then rejected like a direct message.
//!
//! Every piece of work completes in the order it was submitted, even work that needs no disk
//! (a duplicate, a refusal, a `recover`): it waits in `queue` behind what was submitted before
//! it. So a `recover` sees every message stored before it, and replays exactly those
//! (`durable_through`): a message still in flight reaches the client through its own `Stored`.
//!
//! # Reads never touch the disk
//!
//! The whole index (every retained body) lives in memory, bounded by `--offline-max-bytes` (and
//! room history by `--room-history-max-bytes`), as with the memory engine; the log is only read at start-up. The price is start-up time
//! proportional to what is retained (docs/operations.md gives the measured figure).

use super::histogram::Histogram;
use super::journal::{self, AppendRef, Record, MAGIC};
use super::memory::{Admit, MemoryEngine};
use super::storage::{Done, Marks, Op, Storage};
pub use super::storage::{FsyncPolicy, StoreFault};
use super::streams::{Entry, Gone, Limits, Streams};
use super::{
    Append, Completion, Engine, Epoch, Event, Now, Outcome, Position, Publish, Refusal, Since,
    StreamId, Ticket, Wake,
};
use crate::app::dedup::{Dedup, Recorded};
use crate::app::envelope::{AckStatus, MsgId};
use crate::server::metrics::Writer;
use log::{info, warn};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt;
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::AtomicU64;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Default size at which a segment is sealed and a new one started.
pub const SEGMENT_BYTES: u64 = 64 << 20;

/// Fsync durations (seconds) and batch sizes (ops) for the histograms.
const FSYNC_BOUNDS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];
const BATCH_BOUNDS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0, 4096.0,
];

#[derive(Clone, Debug)]
pub struct FileConfig {
    pub dir: PathBuf,
    pub fsync: FsyncPolicy,
    pub segment_bytes: u64,
    pub limits: Limits,
    /// Room history's bounds (`--room-history*`, SPEC §16; `per_stream` 0: off).
    pub room_history: Limits,
    pub dedup_window: usize,
    /// How long an idle sender's duplicate window is kept (the retention TTL).
    pub dedup_idle: Duration,
    /// The memory bound over every sender's duplicate window (`--dedup-max-bytes`).
    pub dedup_max_bytes: usize,
    pub fault: StoreFault,
}

/// Why a data directory cannot be used. Each renders as one line for the operator.
#[derive(Debug)]
pub enum OpenError {
    /// Another process holds the directory's lock.
    Locked { dir: PathBuf },
    /// The directory or a file in it cannot be created, read or written.
    Access { path: PathBuf, source: io::Error },
    /// A segment other than the newest is damaged, or belongs to another store.
    Corrupt {
        path: PathBuf,
        offset: usize,
        problem: &'static str,
    },
    /// A worker's directory holds the log of another store than its siblings (SPEC §14: every
    /// worker's log has the process's one epoch, the one `WORKERS` records).
    Epoch {
        dir: PathBuf,
        found: Epoch,
        expected: Epoch,
    },
    /// The directory was written by another number of workers (`--workers`; 1: today's
    /// single-worker layout): each stream lives in its home worker's directory, and the home
    /// depends on the number (`data_dir.rs`).
    Workers {
        dir: PathBuf,
        written: usize,
        asked: usize,
    },
}

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OpenError::Locked { dir } => write!(
                f,
                "data dir {} is in use by another process (it holds {})",
                dir.display(),
                dir.join("LOCK").display()
            ),
            OpenError::Access { path, source } => {
                write!(f, "data dir: cannot use {}: {source}", path.display())
            }
            OpenError::Corrupt {
                path,
                offset,
                problem,
            } => write!(
                f,
                "data dir: {} is damaged at byte {offset} ({problem}); move it away to start without it",
                path.display()
            ),
            OpenError::Epoch {
                dir,
                found,
                expected,
            } => write!(
                f,
                "data dir: {} belongs to another store (epoch {found}, not {expected} as the directory's WORKERS marker says); move it away to start without it",
                dir.display()
            ),
            OpenError::Workers {
                dir,
                written,
                asked,
            } => write!(
                f,
                "data dir {} was written with --workers {written}, not {asked} (each stream lives in its home worker's files); start with --workers {written}",
                dir.display()
            ),
        }
    }
}

impl std::error::Error for OpenError {}

fn access(path: &Path) -> impl FnOnce(io::Error) -> OpenError + '_ {
    move |source| OpenError::Access {
        path: path.to_path_buf(),
        source,
    }
}

/// Work waiting in `queue`.
struct Waiting {
    ticket: Option<Ticket>,
    work: Work,
    /// An op went to the storage thread for it (else it completes when it reaches the front).
    sent: bool,
    /// Delivery and trim records that went to the disk in the same op (see `quiet`).
    carried: u64,
}

enum Work {
    Append {
        stream: StreamId,
        position: Position,
        sender: Rc<str>,
        client_id: Option<Rc<str>>,
    },
    Publish {
        position: Position,
        /// The room whose history holds it (room history on), to take it back out if the
        /// write fails.
        kept: Option<StreamId>,
        sender: Rc<str>,
        client_id: Option<Rc<str>>,
    },
    Duplicate {
        sender: Rc<str>,
        client_id: Rc<str>,
    },
    Recover {
        stream: StreamId,
        since: Option<Since>,
    },
    Refused(Refusal),
    /// A room's history page (SPEC §16).
    History {
        stream: StreamId,
        limit: usize,
    },
    /// Records nobody waits for (deliveries, trims).
    Quiet,
    Compact,
}

/// Per segment: its length, and the bytes of retained messages it holds.
#[derive(Clone, Copy, Debug, Default)]
struct Usage {
    bytes: u64,
    live: u64,
    /// A compaction was declined as not worth it (the copy would be over half the segment,
    /// e.g. with unexpired duplicate windows): not tried again before this Unix time (ms).
    retry_at_ms: u64,
}

#[derive(Debug)]
struct Stats {
    batches: u64,
    batch_ops: Histogram,
    fsync_seconds: Histogram,
    /// Ops whose write failed, and changes between working and failing.
    errors: u64,
    failing: bool,
    state_changes: u64,
    /// Delivery and trim records lost to a failed write (they only cost a re-delivery, or a
    /// message coming back after a restart until its TTL).
    lost_records: u64,
    /// Room messages delivered although their record could not be written.
    unlogged_publishes: u64,
    compactions: u64,
    reclaimed_bytes: u64,
    disk_bytes: u64,
    /// What start-up found.
    startup_records: u64,
    startup_seconds: f64,
    torn_bytes: u64,
    /// Why the last write failed, while writes fail (for /healthz).
    last_error: String,
}

pub struct FileEngine {
    mem: MemoryEngine,
    dir: PathBuf,
    fsync: FsyncPolicy,
    /// `None` once dropping: hanging up lets the thread finish what it has and exit.
    ops: Option<Sender<Op>>,
    done: Receiver<Done>,
    thread: Option<JoinHandle<()>>,
    queue: VecDeque<Waiting>,
    /// Records encoded since the last op went to the storage thread, for `entries` pieces of
    /// work in `queue`, plus `quiet_records` nobody waits for (deliveries, trims). They go as
    /// one op when the hub has polled everything (`flush`): one channel send, buffer and
    /// wake-up per loop iteration rather than per record (under load, three per message).
    outgoing: Vec<u8>,
    entries: usize,
    quiet_records: u64,
    /// Every position up to here is stored or was rejected: what `recover` may replay.
    durable_through: Position,
    usage: BTreeMap<u64, Usage>,
    /// The segment the storage thread appends to.
    head: u64,
    compacting: bool,
    stats: Stats,
    /// Held for the engine's life: the directory's lock (see `lock`).
    _lock: File,
}

impl FileEngine {
    /// Opens (or creates) the data directory, rebuilds the index from the log, and starts the
    /// storage thread, which calls `wake` whenever it has answers.
    ///
    /// # Errors
    /// See `OpenError`: another process holds the directory, it cannot be used, or an older
    /// segment is damaged. A torn tail of the newest segment is not an error: it is cut off.
    pub fn open(config: FileConfig, wake: Wake, now: Now) -> Result<FileEngine, OpenError> {
        FileEngine::open_with(config, wake, now, None)
    }

    /// `MemoryEngine::would_refuse_full`, from this engine's index (what `append` decides by).
    pub(super) fn would_refuse_full(&self, a: &Append) -> bool {
        self.mem.would_refuse_full(a)
    }

    /// One worker's engine among several (SPEC §14, `bus::BusEngine::with_file`): as `open`,
    /// but the log's epoch must be `epoch` (a fresh log takes it), and positions come from the
    /// process's `counter`, which this raises above everything the log holds.
    ///
    /// # Errors
    /// As `open`, and `OpenError::Epoch` when the log is another store's.
    pub fn open_worker(
        config: FileConfig,
        wake: Wake,
        now: Now,
        epoch: Epoch,
        counter: Arc<AtomicU64>,
    ) -> Result<FileEngine, OpenError> {
        FileEngine::open_with(config, wake, now, Some((epoch, counter)))
    }

    fn open_with(
        config: FileConfig,
        wake: Wake,
        now: Now,
        shared: Option<(Epoch, Arc<AtomicU64>)>,
    ) -> Result<FileEngine, OpenError> {
        let started = Instant::now();
        let dir = config.dir.clone();
        fs::create_dir_all(&dir).map_err(access(&dir))?;
        let lock = lock(&dir)?;
        let mut loader = Loader::new(&config, now);
        let mut sizes = BTreeMap::new();
        let ids = segment_ids(&dir)?;
        for (i, &id) in ids.iter().enumerate() {
            let path = journal::segment_path(&dir, id);
            let bytes = fs::read(&path).map_err(access(&path))?;
            let tail = journal::read_segment(&bytes, |_, record| loader.apply(id, record));
            if let Some(problem) = loader.foreign.take() {
                return Err(OpenError::Corrupt {
                    path,
                    offset: 0,
                    problem,
                });
            }
            let Some(problem) = tail.problem else {
                sizes.insert(id, bytes.len() as u64);
                continue;
            };
            if i + 1 < ids.len() {
                return Err(OpenError::Corrupt {
                    path,
                    offset: tail.valid_len,
                    problem,
                });
            }
            // The newest segment ends in a write that never completed: nothing in it was
            // acknowledged (acks wait for the write), so it is cut off.
            let cut = bytes.len() - tail.valid_len;
            loader.torn_bytes += cut as u64;
            if tail.valid_len < MAGIC.len() {
                fs::remove_file(&path).map_err(access(&path))?;
            } else {
                let file = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(access(&path))?;
                file.set_len(tail.valid_len as u64)
                    .and_then(|()| file.sync_all())
                    .map_err(access(&path))?;
                sizes.insert(id, tail.valid_len as u64);
            }
            warn!(
                "file engine: {}: cut a torn tail of {cut} bytes at byte {} ({problem}); it held nothing acknowledged",
                path.display(),
                tail.valid_len
            );
        }
        let Loader {
            epoch,
            high_water,
            mut streams,
            mut rooms,
            room_history,
            dedup,
            senders,
            records,
            torn_bytes,
            ..
        } = loader;
        // No header read: no segment, or only one torn before its header was whole.
        let fresh = epoch.is_none();
        let expected = shared.as_ref().map(|(epoch, _)| *epoch);
        if let (Some(found), Some(expected)) = (epoch, expected) {
            if found != expected {
                return Err(OpenError::Epoch {
                    dir,
                    found,
                    expected,
                });
            }
        }
        let epoch = epoch.or(expected).unwrap_or_else(Epoch::random);
        if fresh {
            // A fresh store has no history: every position below its first one belongs to
            // something else (another store, an earlier one that was deleted), so a `since`
            // there gets `recovered: false`, as with the memory engine. The first segment's
            // header keeps this mark across restarts.
            let first = now.unix_ms.saturating_mul(1000);
            streams.forget_through(Position(first.saturating_sub(1)));
            rooms.forget_through(Position(first.saturating_sub(1)));
        }
        let mut gone = Vec::new();
        // This run counts too: history on now, after a run with it off, is a gap.
        let history_on = config.room_history.per_stream > 0;
        let first = Position(high_water.0.saturating_add(1));
        let mut runs = room_history;
        runs.push((first, history_on));
        if let Some(gap) = history_gap(runs) {
            rooms.forget_all_through(gap, &mut gone);
        }
        streams.enforce(now.unix_ms, &mut gone);
        // With room history off now, whatever history the log holds goes (counted).
        rooms.enforce(now.unix_ms, &mut gone);
        let mut mem = MemoryEngine::resume(epoch, high_water, streams, rooms, dedup, now);
        if let Some((_, counter)) = shared {
            mem.share_positions(counter);
        }
        for sender in &senders {
            mem.dedup.idle(sender, now.instant);
        }
        let mut usage: BTreeMap<u64, Usage> = sizes
            .iter()
            .map(|(&id, &bytes)| {
                let usage = Usage {
                    bytes,
                    ..Usage::default()
                };
                (id, usage)
            })
            .collect();
        for (_, entry) in mem.streams.iter().chain(mem.rooms.iter()) {
            if let Some(u) = usage.get_mut(&entry.segment) {
                u.live += entry.cost() as u64;
            }
        }
        let marks = Marks {
            epoch,
            high_water: mem.high_water(),
            forgotten_through: mem.streams.forgotten_through(),
            rooms_forgotten_through: mem.rooms.forgotten_through(),
        };
        let storage = Storage::new(
            dir.clone(),
            config.fsync,
            config.segment_bytes,
            config.fault,
            sizes,
            marks,
        )
        .map_err(access(&dir))?;
        let head = storage.head;
        usage.insert(head, Usage::default());
        let disk_bytes = storage.sizes.values().sum();
        let (ops_tx, ops_rx) = mpsc::channel();
        let (done_tx, done_rx) = mpsc::channel();
        let thread = storage.spawn(ops_rx, done_tx, wake).map_err(access(&dir))?;
        let mut engine = FileEngine {
            mem,
            dir,
            fsync: config.fsync,
            ops: Some(ops_tx),
            done: done_rx,
            thread: Some(thread),
            queue: VecDeque::new(),
            outgoing: Vec::new(),
            entries: 0,
            quiet_records: 0,
            durable_through: high_water,
            usage,
            head,
            compacting: false,
            stats: Stats {
                batches: 0,
                batch_ops: Histogram::new(BATCH_BOUNDS),
                fsync_seconds: Histogram::new(FSYNC_BOUNDS),
                errors: 0,
                failing: false,
                state_changes: 0,
                lost_records: 0,
                unlogged_publishes: 0,
                compactions: 0,
                reclaimed_bytes: 0,
                disk_bytes,
                startup_records: records,
                startup_seconds: started.elapsed().as_secs_f64(),
                torn_bytes,
                last_error: String::new(),
            },
            _lock: lock,
        };
        engine.log_gone(&gone);
        // This run's setting, for the next start (see `history_gap`); it goes out with the
        // first batch, ahead of any room message of this run.
        Record::RoomHistory {
            on: history_on,
            from: Position(engine.mem.high_water().0.saturating_add(1)),
        }
        .encode(&mut engine.outgoing);
        engine.quiet_records += 1;
        info!(
            "file engine: {} holds {} messages in {} streams and {} in {} rooms' history ({records} records read in {:.3}s, epoch {epoch})",
            engine.dir.display(),
            engine.mem.streams.messages(),
            engine.mem.streams.streams(),
            engine.mem.rooms.messages(),
            engine.mem.rooms.streams(),
            engine.stats.startup_seconds,
        );
        Ok(engine)
    }

    pub fn epoch(&self) -> Epoch {
        self.mem.epoch()
    }

    /// The segment files the log has now, oldest first (for tests and operators).
    pub fn segments(&self) -> Vec<u64> {
        self.usage.keys().copied().collect()
    }

    /// Bytes of all segment files, as of the last answer from the storage thread.
    pub fn disk_bytes(&self) -> u64 {
        self.stats.disk_bytes
    }

    fn marks(&self) -> Marks {
        Marks {
            epoch: self.mem.epoch(),
            high_water: self.mem.high_water(),
            forgotten_through: self.mem.streams.forgotten_through(),
            rooms_forgotten_through: self.mem.rooms.forgotten_through(),
        }
    }

    /// Work whose records were just encoded into `outgoing`: it completes when the op that
    /// carries them is answered. `--fsync always` sends each at once (one fsync each).
    fn submit(&mut self, ticket: Option<Ticket>, work: Work) {
        self.queue.push_back(Waiting {
            ticket,
            work,
            sent: true,
            carried: 0,
        });
        self.entries += 1;
        if self.fsync == FsyncPolicy::Always {
            self.flush();
        }
    }

    /// Sends what `outgoing` holds to the storage thread, as one op.
    fn flush(&mut self) {
        if self.quiet_records > 0 {
            // One entry stands for the quiet records, to count them if the write fails.
            let carried = std::mem::take(&mut self.quiet_records);
            self.queue.push_back(Waiting {
                ticket: None,
                work: Work::Quiet,
                sent: true,
                carried,
            });
            self.entries += 1;
        }
        if self.entries == 0 {
            return;
        }
        // The next buffer starts at this one's size: a steady load then never regrows it.
        let next = Vec::with_capacity(self.outgoing.len());
        let op = Op::Write {
            bytes: std::mem::replace(&mut self.outgoing, next),
            marks: self.marks(),
            entries: std::mem::take(&mut self.entries),
        };
        if self.ops.as_ref().is_none_or(|ops| ops.send(op).is_err()) {
            self.fail_all("the storage thread is not running");
        }
    }

    /// The storage thread is gone (it can only have panicked): nothing can be stored. Every
    /// piece of work waiting for it fails, as a failed write would (messages leave the index).
    fn fail_all(&mut self, why: &str) {
        let ops = self.queue.iter().filter(|w| w.sent).count();
        let done = Done {
            ops,
            result: Err(why.to_string()),
            segment: self.head,
            segment_len: self.usage.get(&self.head).map_or(0, |u| u.bytes),
            head: self.head,
            disk_bytes: self.stats.disk_bytes,
            batch: None,
            compacted: None,
            declined: None,
        };
        self.apply(done);
    }

    /// Queues work that needs no disk; it completes once everything before it has.
    fn enqueue(&mut self, ticket: Option<Ticket>, work: Work) {
        let waiting = Waiting {
            ticket,
            work,
            sent: false,
            carried: 0,
        };
        if self.queue.is_empty() {
            self.finish(waiting, None);
        } else {
            self.queue.push_back(waiting);
        }
    }

    /// Logs what the bounds or the TTL removed, and frees it from its segment's live bytes.
    fn log_gone(&mut self, gone: &[Gone]) {
        if gone.is_empty() {
            return;
        }
        for g in gone {
            if let Some(u) = self.usage.get_mut(&g.segment) {
                u.live = u.live.saturating_sub(g.cost as u64);
            }
            Record::Trim {
                stream: g.stream.clone(),
                through: g.position,
            }
            .encode(&mut self.outgoing);
            self.quiet_records += 1;
        }
    }

    /// Applies one answer of the storage thread to the work it answers, in order.
    fn apply(&mut self, done: Done) {
        self.head = done.head;
        self.usage.entry(done.segment).or_default().bytes = done.segment_len;
        self.usage.entry(done.head).or_default();
        self.stats.disk_bytes = done.disk_bytes;
        if let Some((ops, fsync)) = done.batch {
            self.stats.batches += 1;
            self.stats.batch_ops.record(ops as f64);
            if let Some(secs) = fsync {
                self.stats.fsync_seconds.record(secs);
            }
        }
        let failing = done.result.is_err();
        if failing != self.stats.failing {
            self.stats.failing = failing;
            self.stats.state_changes += 1;
        }
        if failing {
            self.stats.errors += done.ops as u64;
        }
        match &done.result {
            Err(e) => self.stats.last_error.clone_from(e),
            Ok(()) => self.stats.last_error.clear(),
        }
        if let Some((segment, retry_at_ms)) = done.declined {
            if let Some(u) = self.usage.get_mut(&segment) {
                u.retry_at_ms = retry_at_ms;
            }
        }
        if let Some(c) = &done.compacted {
            self.usage.remove(&c.segment);
            self.stats.compactions += 1;
            self.stats.reclaimed_bytes += c.reclaimed;
            for &p in &c.moved {
                if let Some(cost) = self.mem.set_segment(Position(p), done.segment) {
                    self.usage.entry(done.segment).or_default().live += cost as u64;
                }
            }
        }
        let mut left = done.ops;
        while left > 0 {
            let Some(waiting) = self.queue.pop_front() else {
                break;
            };
            if waiting.sent {
                left -= 1;
                self.finish(waiting, Some((&done.result, done.segment)));
            } else {
                self.finish(waiting, None);
            }
        }
        // Work that needed no disk and waited only for what came before it.
        while self.queue.front().is_some_and(|w| !w.sent) {
            if let Some(waiting) = self.queue.pop_front() {
                self.finish(waiting, None);
            }
        }
    }

    /// The outcome of a message the log promised to keep (a direct message, or a room message
    /// with history on): stored once its write succeeded (and counted against its segment), or
    /// rejected (SPEC §13: acks never lie) and taken back out of the index (`unappend`) it was
    /// never written to, with its client id remembered as rejected.
    #[allow(clippy::too_many_arguments)]
    fn settle_kept(
        &mut self,
        ok: bool,
        position: Position,
        written: Option<(&Result<(), String>, u64)>,
        sender: &str,
        client_id: Option<&str>,
        error: impl FnOnce() -> String,
        unappend: impl FnOnce(&mut MemoryEngine),
    ) -> Outcome {
        self.durable_through = self.durable_through.max(position);
        if ok {
            let segment = written.map_or(0, |(_, s)| s);
            if let Some(cost) = self.mem.set_segment(position, segment) {
                self.usage.entry(segment).or_default().live += cost as u64;
            }
            Outcome::Stored { position }
        } else {
            unappend(&mut self.mem);
            self.mem
                .remember(sender, client_id, position, AckStatus::Rejected);
            Outcome::Rejected(Refusal::Store(error()))
        }
    }

    /// Completes one piece of work. `written` is the storage thread's answer for work that went
    /// to it (the result, and the segment its records are in).
    fn finish(&mut self, waiting: Waiting, written: Option<(&Result<(), String>, u64)>) {
        let ok = written.is_none_or(|(result, _)| result.is_ok());
        if !ok {
            // Delivery and trim records lost with the op: they cost a re-delivery, or a
            // message coming back after a restart until its TTL.
            self.stats.lost_records += waiting.carried;
        }
        let error = || match written {
            Some((Err(e), _)) => e.clone(),
            _ => String::new(),
        };
        let outcome = match waiting.work {
            Work::Append {
                stream,
                position,
                sender,
                client_id,
            } => self.settle_kept(
                ok,
                position,
                written,
                &sender,
                client_id.as_deref(),
                error,
                |mem| {
                    mem.streams.unappend(&stream, position);
                },
            ),
            // Room history is on: the message is content the log promised to keep, settled as a
            // direct message is.
            Work::Publish {
                position,
                kept: Some(stream),
                sender,
                client_id,
            } => self.settle_kept(
                ok,
                position,
                written,
                &sender,
                client_id.as_deref(),
                error,
                |mem| {
                    mem.rooms.unappend(&stream, position);
                },
            ),
            Work::Publish { position, .. } => {
                self.durable_through = self.durable_through.max(position);
                if !ok {
                    // A room message is not retained: the record only carries the position's
                    // high-water mark and the client id. Rejecting the message for that would
                    // stop live room traffic whenever the disk fails, for no promise kept: the
                    // next start still resumes above the Unix time in µs-ish, so the position
                    // is not handed out again unless the clock also went back. Counted.
                    self.stats.unlogged_publishes += 1;
                }
                Outcome::Stored { position }
            }
            Work::Duplicate { sender, client_id } => self.mem.duplicate(&sender, &client_id),
            Work::Recover { stream, since } => {
                Outcome::Recovered(self.mem.recovery(&stream, since, self.durable_through))
            }
            Work::History { stream, limit } => {
                Outcome::Recovered(self.mem.history_page(&stream, limit, self.durable_through))
            }
            Work::Refused(refusal) => Outcome::Rejected(refusal),
            Work::Quiet => return,
            Work::Compact => {
                self.compacting = false;
                if !ok {
                    warn!("file engine: compaction failed: {}", error());
                }
                return;
            }
        };
        if let Some(ticket) = waiting.ticket {
            self.mem.ready.push_back(Completion { ticket, outcome });
        }
    }

    /// Starts compacting the oldest segment if it is sealed and at most half live, and none is
    /// being compacted: its live messages are copied forward and the file deleted.
    ///
    /// Only ever the oldest: a segment's delivery and trim records may concern messages in
    /// older segments, and deleting them would bring those messages back at the next start
    /// (delivered ones as pending). Records in the oldest segment concern only messages in it,
    /// or copies of them further on that already say the same. The price: while the oldest
    /// segment is mostly live, newer ones wait (at most until its messages' TTL).
    fn maybe_compact(&mut self, now: Now) {
        if self.compacting {
            return;
        }
        let Some(segment) = self
            .usage
            .iter()
            .next()
            .filter(|(&id, u)| {
                id < self.head && u.live * 2 <= u.bytes && u.retry_at_ms <= now.unix_ms
            })
            .map(|(&id, _)| id)
        else {
            return;
        };
        let live: HashMap<u64, bool> = self
            .mem
            .streams
            .iter()
            .chain(self.mem.rooms.iter())
            .filter(|(_, e)| e.segment == segment)
            .map(|(_, e)| (e.position.0, e.pending))
            .collect();
        let stream_marks = self
            .mem
            .streams
            .marks()
            .chain(self.mem.rooms.marks())
            .map(|(s, mark)| (journal::stream_key(s), mark.0))
            .collect();
        let op = Op::Compact {
            segment,
            live,
            stream_marks,
            marks: self.marks(),
            now_ms: now.unix_ms,
        };
        // The storage thread must see the records submitted before it first: ops and queue
        // entries are answered in the same order.
        self.flush();
        if self.ops.as_ref().is_some_and(|ops| ops.send(op).is_ok()) {
            self.compacting = true;
            self.queue.push_back(Waiting {
                ticket: None,
                work: Work::Compact,
                sent: true,
                carried: 0,
            });
        }
    }

    /// Waits (bounded) until every submitted piece of work has completed. For tests and for
    /// shutdown; the reactor never calls it.
    pub fn settle(&mut self, deadline: Duration) -> bool {
        self.flush();
        let until = Instant::now() + deadline;
        while self.queue.iter().any(|w| w.sent) {
            let left = until.saturating_duration_since(Instant::now());
            match self.done.recv_timeout(left) {
                Ok(done) => self.apply(done),
                Err(_) => return false,
            }
        }
        true
    }
}

impl Engine for FileEngine {
    fn kind(&self) -> &'static str {
        "file"
    }

    fn epoch(&self) -> Epoch {
        self.mem.epoch()
    }

    fn append(&mut self, ticket: Ticket, append: Append, now: Now) {
        let mut gone = Vec::new();
        let admit = self.mem.admit_append(&append, now, &mut gone);
        self.log_gone(&gone);
        match admit {
            Admit::Stored(position) => {
                // As `Streams::append` computed it (cheaper than looking the entry up).
                let expires_ms = now.unix_ms.saturating_add(self.mem.streams.limits().ttl_ms);
                AppendRef {
                    stream: &append.stream,
                    position,
                    expires_ms,
                    pending: true,
                    sender: &append.sender,
                    client_id: append.client_id.as_deref(),
                    body: &append.body,
                }
                .encode(&mut self.outgoing);
                let work = Work::Append {
                    stream: append.stream,
                    position,
                    sender: append.sender,
                    client_id: append.client_id,
                };
                self.submit(Some(ticket), work);
            }
            Admit::Duplicate { sender, client_id } => {
                self.enqueue(Some(ticket), Work::Duplicate { sender, client_id })
            }
            Admit::Refused(r) => self.enqueue(Some(ticket), Work::Refused(r)),
        }
    }

    fn publish(&mut self, ticket: Ticket, publish: Publish, now: Now) {
        let mut gone = Vec::new();
        let admit = self.mem.admit_publish(&publish, now, &mut gone);
        self.log_gone(&gone);
        match admit {
            Admit::Stored(position) => {
                let room = StreamId::Room(Rc::clone(&publish.room));
                let kept = self.mem.rooms.get(position).is_some().then_some(room);
                if let Some(stream) = &kept {
                    // Room history (SPEC §16): the whole message, as a direct message's is, in
                    // the room's stream; never pending (it goes live to the members now).
                    AppendRef {
                        stream,
                        position,
                        expires_ms: now.unix_ms.saturating_add(self.mem.rooms.limits().ttl_ms),
                        pending: false,
                        sender: &publish.sender,
                        client_id: publish.client_id.as_deref(),
                        body: &publish.body,
                    }
                    .encode(&mut self.outgoing);
                } else {
                    // Written even without a client id: the record keeps the position's
                    // high-water mark, so no msg_id a client has seen is handed out again after
                    // a restart.
                    Record::Published {
                        position,
                        sender: publish.sender.to_string(),
                        client_id: publish.client_id.as_deref().map(str::to_owned),
                        expires_ms: now.unix_ms.saturating_add(self.mem.streams.limits().ttl_ms),
                    }
                    .encode(&mut self.outgoing);
                }
                let work = Work::Publish {
                    position,
                    kept,
                    sender: publish.sender,
                    client_id: publish.client_id,
                };
                self.submit(Some(ticket), work);
            }
            Admit::Duplicate { sender, client_id } => {
                self.enqueue(Some(ticket), Work::Duplicate { sender, client_id })
            }
            Admit::Refused(r) => self.enqueue(Some(ticket), Work::Refused(r)),
        }
    }

    fn recover(&mut self, ticket: Ticket, stream: &StreamId, since: Option<Since>, _now: Now) {
        let work = Work::Recover {
            stream: stream.clone(),
            since,
        };
        self.enqueue(Some(ticket), work);
    }

    fn history(&mut self, ticket: Ticket, stream: &StreamId, limit: usize, _now: Now) {
        let work = Work::History {
            stream: stream.clone(),
            limit,
        };
        self.enqueue(Some(ticket), work);
    }

    fn delivered(&mut self, stream: &StreamId, positions: &[Position]) {
        // Only the ones that were pending change anything worth a record.
        let mut pending = Vec::new();
        self.mem
            .index_mut(stream)
            .mark_delivered_into(stream, positions, &mut pending);
        if pending.is_empty() {
            return;
        }
        Record::Delivered {
            stream: stream.clone(),
            positions: pending,
        }
        .encode(&mut self.outgoing);
        self.quiet_records += 1;
    }

    fn acked(&mut self, sender: &str, client_id: &str, position: Position, status: AckStatus) {
        self.mem.remember(sender, Some(client_id), position, status);
    }

    fn stats(&self, now_ms: u64) -> super::Stats {
        self.mem.index_stats(now_ms)
    }

    fn online(&mut self, sender: &str) {
        self.mem.dedup.active(sender);
    }

    fn offline(&mut self, sender: &Rc<str>, now: Now) {
        self.mem.dedup.idle(sender, now.instant);
    }

    fn maintain(&mut self, now: Now) {
        let mut gone = Vec::new();
        self.mem.streams.expire(now.unix_ms, &mut gone);
        self.mem.rooms.expire(now.unix_ms, &mut gone);
        self.log_gone(&gone);
        self.mem.dedup.sweep(now.instant);
        self.maybe_compact(now);
    }

    fn poll(&mut self, out: &mut Vec<Event>) {
        while let Ok(done) = self.done.try_recv() {
            self.apply(done);
        }
        out.extend(self.mem.ready.drain(..).map(Event::Completed));
        // The hub polls until nothing is left, after acting on every event: whatever it
        // submitted meanwhile (and the delivery records it produced) goes out now, in one op.
        self.flush();
    }

    fn in_flight(&self) -> usize {
        self.queue.iter().filter(|w| w.ticket.is_some()).count()
    }

    /// Degraded while writes fail (disk full, I/O error): sends are rejected then, so a load
    /// balancer should send clients elsewhere. It clears with the first write that works
    /// again (an idle server finds out at its next write).
    fn health(&self) -> Option<String> {
        self.stats.failing.then(|| {
            format!(
                "writes to the data dir {} fail ({})",
                self.dir.display(),
                self.stats.last_error
            )
        })
    }

    fn render_metrics(&self, out: &mut String) {
        self.mem.render_index(self.kind(), self.in_flight(), out);
        let s = &self.stats;
        let mut w = Writer::new(out);
        w.family(
            "wsrelay_engine_fsync_policy",
            "gauge",
            "The file engine's --fsync policy.",
        );
        w.sample(
            "wsrelay_engine_fsync_policy",
            &[("policy", self.fsync.name())],
            1,
        );
        w.gauge(
            "wsrelay_engine_store_ok",
            "1 while the file engine's writes work, 0 while they fail (sends are rejected).",
            u64::from(!s.failing),
        );
        w.counter(
            "wsrelay_engine_store_state_changes_total",
            "Changes between writes working and failing.",
            s.state_changes,
        );
        w.counter(
            "wsrelay_engine_store_errors_total",
            "Writes (ops) that failed; their messages were rejected.",
            s.errors,
        );
        w.counter(
            "wsrelay_engine_lost_records_total",
            "Delivery and trim records lost to failed writes.",
            s.lost_records,
        );
        w.counter(
            "wsrelay_engine_unlogged_publishes_total",
            "Room messages delivered although their record could not be written (writes failing).",
            s.unlogged_publishes,
        );
        w.counter(
            "wsrelay_engine_batches_total",
            "Batches written (each with one fsync under --fsync batch).",
            s.batches,
        );
        w.gauge(
            "wsrelay_engine_disk_bytes",
            "Bytes of all log segments.",
            s.disk_bytes,
        );
        w.gauge(
            "wsrelay_engine_segments",
            "Log segment files.",
            self.usage.len(),
        );
        w.counter(
            "wsrelay_engine_compactions_total",
            "Old segments compacted (live messages copied forward, file deleted).",
            s.compactions,
        );
        w.counter(
            "wsrelay_engine_reclaimed_bytes_total",
            "Disk bytes freed by compaction.",
            s.reclaimed_bytes,
        );
        w.gauge(
            "wsrelay_engine_startup_records",
            "Log records read at start-up.",
            s.startup_records,
        );
        w.gauge(
            "wsrelay_engine_startup_seconds",
            "Time to read the log and rebuild the index at start-up.",
            s.startup_seconds,
        );
        w.gauge(
            "wsrelay_engine_torn_tail_bytes",
            "Bytes cut from the end of the log at start-up (a write that never completed).",
            s.torn_bytes,
        );
        s.batch_ops.render(
            out,
            "wsrelay_engine_batch_ops",
            "Pieces of work per batch written: messages, plus one for the delivery and trim records of each loop iteration.",
        );
        s.fsync_seconds.render(
            out,
            "wsrelay_engine_fsync_seconds",
            "Time of each fsync of a batch.",
        );
    }
}

impl Drop for FileEngine {
    /// Hangs up on the storage thread and waits for it: it answers (writes) everything it was
    /// sent before it exits, so a clean shutdown loses no delivery or trim record.
    fn drop(&mut self) {
        self.flush();
        self.ops = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Takes the directory's lock file (`flock`, released by the OS when the process dies, so a
/// crashed server never leaves a stale lock behind).
pub(super) fn lock(dir: &Path) -> Result<File, OpenError> {
    let path = dir.join("LOCK");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(access(&path))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(TryLockError::WouldBlock) => Err(OpenError::Locked {
            dir: dir.to_path_buf(),
        }),
        Err(TryLockError::Error(e)) => Err(access(&path)(e)),
    }
}

/// Where room history has a gap, from every run's setting (`Record::RoomHistory`): the
/// position before the latest run with history on that did not follow a run with it on (a run
/// with it off, or none recorded: logs older than room history kept no room message). Every
/// room message up to there may have gone unkept, so no `since` there can be served. Runs are
/// ordered by their first position, not by where their record sits (compaction moves records).
fn history_gap(mut runs: Vec<(Position, bool)>) -> Option<Position> {
    runs.sort_by_key(|&(from, _)| from);
    let mut gap = None;
    let mut before = false;
    for (from, on) in runs {
        if on && !before {
            gap = Some(Position(from.0.saturating_sub(1)));
        }
        before = on;
    }
    gap
}

/// The ids of the segment files in `dir`, oldest first.
fn segment_ids(dir: &Path) -> Result<Vec<u64>, OpenError> {
    let mut ids = Vec::new();
    for entry in fs::read_dir(dir).map_err(access(dir))? {
        let entry = entry.map_err(access(dir))?;
        if let Some(id) = entry.file_name().to_str().and_then(journal::segment_id) {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    Ok(ids)
}

/// Rebuilds the index from records, in log order.
struct Loader {
    now: Now,
    epoch: Option<Epoch>,
    /// Set when a segment's epoch differs from the first one's.
    foreign: Option<&'static str>,
    high_water: Position,
    streams: Streams,
    /// Room history (SPEC §16), rebuilt from the room streams' records.
    rooms: Streams,
    /// Every run's room history setting, as (first position of the run, on).
    room_history: Vec<(Position, bool)>,
    dedup: Dedup,
    senders: HashSet<Rc<str>>,
    records: u64,
    torn_bytes: u64,
}

impl Loader {
    fn new(config: &FileConfig, now: Now) -> Loader {
        Loader {
            now,
            epoch: None,
            foreign: None,
            high_water: Position(0),
            streams: Streams::new(config.limits),
            rooms: Streams::new(config.room_history),
            room_history: Vec::new(),
            dedup: Dedup::new(
                config.dedup_window,
                config.dedup_idle,
                config.dedup_max_bytes,
            ),
            senders: HashSet::new(),
            records: 0,
            torn_bytes: 0,
        }
    }

    fn sender(&mut self, sender: &str) -> Rc<str> {
        match self.senders.get(sender) {
            Some(s) => Rc::clone(s),
            None => {
                let s: Rc<str> = Rc::from(sender);
                self.senders.insert(Rc::clone(&s));
                s
            }
        }
    }

    /// The index a stream's records rebuild: inboxes, or room history.
    fn index(&mut self, stream: &StreamId) -> &mut Streams {
        match stream {
            StreamId::Inbox(_) => &mut self.streams,
            StreamId::Room(_) => &mut self.rooms,
        }
    }

    fn apply(&mut self, segment: u64, record: Record) {
        self.records += 1;
        match record {
            Record::Header {
                epoch,
                high_water,
                forgotten_through,
                rooms_forgotten_through,
            } => {
                match self.epoch {
                    None => self.epoch = Some(epoch),
                    Some(e) if e != epoch => {
                        self.foreign = Some("segment belongs to another store (epoch differs)")
                    }
                    Some(_) => {}
                }
                self.high_water = self.high_water.max(high_water);
                self.streams.forget_through(forgotten_through);
                self.rooms.forget_through(rooms_forgotten_through);
            }
            Record::Append {
                stream,
                position,
                expires_ms,
                pending,
                sender,
                client_id,
                body,
            } => {
                self.high_water = self.high_water.max(position);
                let sender = self.sender(&sender);
                if let Some(client_id) = client_id {
                    let status = if pending {
                        AckStatus::Queued
                    } else {
                        AckStatus::Delivered
                    };
                    let msg_id = MsgId(position.0);
                    self.dedup
                        .record(&sender, &client_id, Recorded { msg_id, status });
                }
                self.index(&stream).restore(
                    &stream,
                    Entry {
                        position,
                        expires_ms,
                        body: Rc::from(body),
                        pending,
                        segment,
                    },
                );
            }
            Record::Delivered { stream, positions } => {
                self.index(&stream).mark_delivered(&stream, &positions);
            }
            Record::Trim { stream, through } => self.index(&stream).trim(&stream, through),
            Record::RoomHistory { on, from } => self.room_history.push((from, on)),
            Record::Published {
                position,
                sender,
                client_id,
                expires_ms,
            } => {
                self.high_water = self.high_water.max(position);
                if let Some(client_id) = client_id.filter(|_| expires_ms > self.now.unix_ms) {
                    let sender = self.sender(&sender);
                    let msg_id = MsgId(position.0);
                    let status = AckStatus::Delivered;
                    self.dedup
                        .record(&sender, &client_id, Recorded { msg_id, status });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
