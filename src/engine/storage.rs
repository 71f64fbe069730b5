//! The file engine's storage thread: the only code that writes the log (SPEC §13, "the reactor
//! never blocks on the engine").
//!
//! Owns: `Storage` (the open head segment, segment sizes, the fsync policy, the fault switch),
//! the thread's loop, group commit, segment rotation, compaction of one old segment at a time,
//! and the one log line per change between "writes work" and "writes fail".
//! Does not: decide what to write or what is live (the front-end in `file.rs` encodes records
//! and says which messages a compaction must keep), or read the log at start-up.
//!
//! # Group commit
//!
//! The thread blocks on its channel for one `Op`, then takes every op already waiting (up to
//! `MAX_BATCH_OPS`), writes their records with one `pwrite` and makes them durable with one
//! `fdatasync`, then answers all of them with one `Done` and one wake-up of the reactor. Under
//! load the batch grows by itself: while one fsync runs, the next batch queues up. With
//! `--fsync always` each op is its own batch; with `never` there is no fsync (the page cache
//! keeps the data through a crash of the process, not through one of the machine).
//!
//! # Failures
//!
//! A failed write or fsync fails its whole batch: the front-end rejects those messages. The
//! bytes a failed write may have left past the last good length are cut off before the next
//! write, so a failure never leaves garbage in the middle of the log. Nothing is retried behind
//! the client's back; the next batch simply tries again.

use super::journal::{self, Record, MAGIC};
use super::{Epoch, Position, StreamId, Wake};
use log::{info, warn};
use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

/// Ops taken into one batch at most, so one batch's answer does not wait forever under load.
pub const MAX_BATCH_OPS: usize = 4096;

/// When acks may be sent, and what a crash can take (docs/operations.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// One fsync per message: the slowest, for measuring what batching buys.
    Always,
    /// One fsync per batch, before anything in it is acked (the default).
    Batch,
    /// No fsync: acked once written to the OS. Survives `kill -9`, not power loss.
    Never,
}

impl FsyncPolicy {
    pub fn parse(text: &str) -> Option<FsyncPolicy> {
        match text {
            "always" => Some(FsyncPolicy::Always),
            "batch" => Some(FsyncPolicy::Batch),
            "never" => Some(FsyncPolicy::Never),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            FsyncPolicy::Always => "always",
            FsyncPolicy::Batch => "batch",
            FsyncPolicy::Never => "never",
        }
    }
}

/// A test-only switch that makes every write fail as if the disk were full (SPEC §13 faults).
#[derive(Clone, Debug, Default)]
pub enum StoreFault {
    /// Writes go to the disk (production).
    #[default]
    Off,
    /// Writes fail while the flag is set (unit tests).
    Flag(Arc<AtomicBool>),
    /// Writes fail while this file exists (integration tests drive a real process with it).
    WhileFileExists(PathBuf),
}

impl StoreFault {
    fn active(&self) -> bool {
        match self {
            StoreFault::Off => false,
            StoreFault::Flag(flag) => flag.load(Ordering::Relaxed),
            StoreFault::WhileFileExists(path) => path.exists(),
        }
    }
}

/// The marks a new segment's `Header` carries.
#[derive(Clone, Copy, Debug)]
pub(super) struct Marks {
    pub epoch: Epoch,
    pub high_water: Position,
    pub forgotten_through: Position,
    /// Room history's own mark (see `Record::Header`).
    pub rooms_forgotten_through: Position,
}

/// Work for the storage thread. Every op gets exactly one answer, in order.
pub(super) enum Op {
    /// Append these encoded records, which belong to `entries` pieces of the front-end's work
    /// (it gathers everything one loop iteration submitted into one op).
    Write {
        bytes: Vec<u8>,
        marks: Marks,
        entries: usize,
    },
    /// Copy what is still live out of `segment` into the head, then delete it.
    Compact {
        segment: u64,
        /// Positions of the retained messages `segment` holds, with their pending flag now.
        live: HashMap<u64, bool>,
        /// `lost_through` of the retained streams, by name: rewritten for the streams
        /// `segment` mentions, so deleting it loses no stream's mark.
        stream_marks: HashMap<String, u64>,
        marks: Marks,
        now_ms: u64,
    },
}

/// The answer to the next `ops` pieces of work (a write op counts its `entries`, a
/// compaction one).
#[derive(Debug)]
pub(super) struct Done {
    pub ops: usize,
    pub result: Result<(), String>,
    /// The segment the ops' records went to, and its length now.
    pub segment: u64,
    pub segment_len: u64,
    /// The segment the next records will go to.
    pub head: u64,
    /// Bytes of all segments after this batch.
    pub disk_bytes: u64,
    /// For a write batch: its size in pieces of work and how long its fsync took.
    pub batch: Option<(usize, Option<f64>)>,
    pub compacted: Option<Compacted>,
    /// A compaction that was not worth it: the segment, and the Unix time (ms) from which its
    /// copy will be small enough (see `Storage::compact`).
    pub declined: Option<(u64, u64)>,
}

#[derive(Debug)]
pub(super) struct Compacted {
    pub segment: u64,
    /// The size of the deleted segment minus what was copied out of it.
    pub reclaimed: u64,
    /// Positions copied into `Done::segment`.
    pub moved: Vec<u64>,
}

pub(super) struct Storage {
    pub dir: PathBuf,
    pub fsync: FsyncPolicy,
    /// A segment at least this long is sealed and a new one started.
    pub segment_bytes: u64,
    pub fault: StoreFault,
    /// The head segment: its id, file, and length of its valid part.
    pub head: u64,
    pub file: File,
    pub len: u64,
    /// Sizes of every segment, the head included.
    pub sizes: BTreeMap<u64, u64>,
    pub marks: Marks,
    /// A failed write may have left bytes past `len`: cut them before the next write.
    dirty: bool,
    failing: bool,
    /// Starting the next segment failed last time (logged once, until it works again).
    rotate_failing: bool,
}

impl Storage {
    pub fn new(
        dir: PathBuf,
        fsync: FsyncPolicy,
        segment_bytes: u64,
        fault: StoreFault,
        sizes: BTreeMap<u64, u64>,
        marks: Marks,
    ) -> io::Result<Storage> {
        let head = sizes.keys().next_back().map_or(1, |last| last + 1);
        // Opening is not subject to the fault switch: it simulates a disk that fills up while
        // the server runs.
        let (file, len) = create_segment(&dir, head, marks, &StoreFault::Off)?;
        let mut sizes = sizes;
        sizes.insert(head, len);
        Ok(Storage {
            dir,
            fsync,
            segment_bytes,
            fault,
            head,
            file,
            len,
            sizes,
            marks,
            dirty: false,
            failing: false,
            rotate_failing: false,
        })
    }

    /// Runs the thread until the front-end hangs up its end of `ops` (the engine was dropped),
    /// after answering everything it sent.
    pub fn spawn(
        mut self,
        ops: Receiver<Op>,
        done: Sender<Done>,
        wake: Wake,
    ) -> io::Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name("wsrelay-storage".into())
            .spawn(move || {
                let max = match self.fsync {
                    FsyncPolicy::Always => 1,
                    _ => MAX_BATCH_OPS,
                };
                while let Ok(first) = ops.recv() {
                    let mut batch = vec![first];
                    while batch.len() < max {
                        match ops.try_recv() {
                            Ok(op) => batch.push(op),
                            Err(_) => break,
                        }
                    }
                    for answer in self.run(batch) {
                        if done.send(answer).is_err() {
                            return;
                        }
                    }
                    wake();
                }
            })
    }

    /// Runs one batch: consecutive writes are committed together; a compaction goes alone.
    fn run(&mut self, batch: Vec<Op>) -> Vec<Done> {
        let mut answers = Vec::new();
        let mut bytes = Vec::new();
        let mut writes = 0;
        for op in batch {
            match op {
                Op::Write {
                    bytes: b,
                    marks,
                    entries,
                } => {
                    if bytes.is_empty() {
                        bytes = b; // the common case, one op: no copy
                    } else {
                        bytes.extend_from_slice(&b);
                    }
                    self.marks = marks;
                    writes += entries;
                }
                Op::Compact {
                    segment,
                    live,
                    stream_marks,
                    marks,
                    now_ms,
                } => {
                    if writes > 0 {
                        answers.push(self.commit(&bytes, writes));
                        bytes.clear();
                        writes = 0;
                    }
                    self.marks = marks;
                    answers.push(self.compact(segment, &live, &stream_marks, now_ms));
                }
            }
        }
        if writes > 0 {
            answers.push(self.commit(&bytes, writes));
        }
        answers
    }

    /// Writes and syncs one batch, then starts a new segment if the head is full.
    fn commit(&mut self, bytes: &[u8], ops: usize) -> Done {
        let segment = self.head;
        let result = self.append(bytes, false);
        let fsync_secs = result.as_ref().ok().copied().flatten();
        let result = self.note(result.map(|_| ()));
        if result.is_ok() && self.len >= self.segment_bytes {
            self.rotate();
        }
        Done {
            ops,
            result,
            segment,
            segment_len: self.sizes.get(&segment).copied().unwrap_or(0),
            head: self.head,
            disk_bytes: self.sizes.values().sum(),
            batch: Some((ops, fsync_secs)),
            compacted: None,
            declined: None,
        }
    }

    /// Appends `bytes` to the head and syncs per the policy, or whatever the policy if
    /// `always_sync`. Returns the fsync's duration.
    fn append(&mut self, bytes: &[u8], always_sync: bool) -> io::Result<Option<f64>> {
        if self.fault.active() {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        if self.dirty {
            self.file.set_len(self.len)?;
            self.dirty = false;
        }
        self.dirty = true;
        self.file.write_all_at(bytes, self.len)?;
        let fsync_secs = match self.fsync {
            FsyncPolicy::Never if !always_sync => None,
            _ => {
                let started = Instant::now();
                self.file.sync_data()?;
                Some(started.elapsed().as_secs_f64())
            }
        };
        self.dirty = false;
        self.len += bytes.len() as u64;
        self.sizes.insert(self.head, self.len);
        Ok(fsync_secs)
    }

    /// Logs a change between working and failing once, and turns the error into text.
    fn note(&mut self, result: io::Result<()>) -> Result<(), String> {
        match result {
            Ok(()) => {
                if std::mem::take(&mut self.failing) {
                    info!("file engine: writes to {} work again", self.dir.display());
                }
                Ok(())
            }
            Err(e) => {
                if !std::mem::replace(&mut self.failing, true) {
                    warn!(
                        "file engine: writes to {} fail ({e}); sends are rejected until they work",
                        self.dir.display()
                    );
                }
                Err(e.to_string())
            }
        }
    }

    /// Seals the head (synced whatever the policy, so sealed segments are whole) and starts the
    /// next one. On failure the head just keeps growing; the next commit tries again.
    fn rotate(&mut self) {
        let next = self.head + 1;
        let result = self
            .file
            .sync_data()
            .and_then(|()| create_segment(&self.dir, next, self.marks, &self.fault));
        match result {
            Ok((file, len)) => {
                self.file = file;
                self.head = next;
                self.len = len;
                self.sizes.insert(next, len);
                if std::mem::take(&mut self.rotate_failing) {
                    info!("file engine: started segment {next}; segments rotate again");
                }
            }
            Err(e) => {
                if !std::mem::replace(&mut self.rotate_failing, true) {
                    warn!(
                        "file engine: cannot start segment {next} ({e}); the head segment keeps growing until it can"
                    );
                }
            }
        }
    }

    /// Copies what is live in `segment` to the head and deletes it (see `Op::Compact`).
    fn compact(
        &mut self,
        segment: u64,
        live: &HashMap<u64, bool>,
        stream_marks: &HashMap<String, u64>,
        now_ms: u64,
    ) -> Done {
        if segment >= self.head || !self.sizes.contains_key(&segment) {
            return self.skipped(Ok(()));
        }
        let path = journal::segment_path(&self.dir, segment);
        let old = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) => return self.skipped(Err(format!("{}: {e}", path.display()))),
        };
        let mut out = Vec::new();
        let mut moved = Vec::new();
        // One mark for the inboxes and one for room history (see `Record::Header`).
        let mut forgotten = self.marks.forgotten_through;
        let mut rooms_forgotten = self.marks.rooms_forgotten_through;
        let mut mentioned: HashMap<String, StreamId> = HashMap::new();
        // What each copied record costs and when it stops being worth keeping, to decide
        // whether the copy is worth making (see `worth_it`).
        let mut expiring: Vec<(u64, u64)> = Vec::new();
        journal::read_segment(&old, |_, record| {
            let before = out.len();
            let expires = match record {
                Record::Append {
                    stream,
                    position,
                    expires_ms,
                    sender,
                    client_id,
                    body,
                    ..
                } => {
                    mentioned.insert(journal::stream_key(&stream), stream.clone());
                    match live.get(&position.0) {
                        Some(&pending) => {
                            moved.push(position.0);
                            Record::Append {
                                stream,
                                position,
                                expires_ms,
                                pending,
                                sender,
                                client_id,
                                body,
                            }
                            .encode(&mut out);
                        }
                        None => {
                            let mark = match stream {
                                StreamId::Inbox(_) => &mut forgotten,
                                StreamId::Room(_) => &mut rooms_forgotten,
                            };
                            *mark = (*mark).max(position);
                            // The message is gone but its client id's duplicate window is
                            // not (SPEC §7: it outlives the message, up to the TTL): keep it
                            // in the record that carries only that.
                            if client_id.is_some() && expires_ms > now_ms {
                                Record::Published {
                                    position,
                                    sender,
                                    client_id,
                                    expires_ms,
                                }
                                .encode(&mut out);
                            }
                        }
                    }
                    expires_ms
                }
                Record::Trim { stream, through } => {
                    let mark = match stream {
                        StreamId::Inbox(_) => &mut forgotten,
                        StreamId::Room(_) => &mut rooms_forgotten,
                    };
                    *mark = (*mark).max(through);
                    mentioned.insert(journal::stream_key(&stream), stream);
                    0
                }
                Record::Delivered { stream, .. } => {
                    mentioned.insert(journal::stream_key(&stream), stream);
                    0
                }
                r @ Record::Published { .. } => {
                    if let Record::Published {
                        client_id: Some(_),
                        expires_ms,
                        ..
                    } = &r
                    {
                        if *expires_ms > now_ms {
                            let expires = *expires_ms;
                            r.encode(&mut out);
                            expires
                        } else {
                            0
                        }
                    } else {
                        0
                    }
                }
                Record::Header { .. } => 0,
                // Tiny, one per start: kept, so start-up always sees every run's setting.
                r @ Record::RoomHistory { .. } => {
                    r.encode(&mut out);
                    0
                }
            };
            if out.len() > before {
                expiring.push((expires, (out.len() - before) as u64));
            }
        });
        // Streams still retained keep their own mark; for the rest, the global one covers what
        // this segment held.
        for (key, stream) in mentioned {
            if let Some(&through) = stream_marks.get(&key) {
                Record::Trim {
                    stream,
                    through: Position(through),
                }
                .encode(&mut out);
            }
        }
        self.marks.forgotten_through = forgotten;
        self.marks.rooms_forgotten_through = rooms_forgotten;
        Record::Header {
            epoch: self.marks.epoch,
            high_water: self.marks.high_water,
            forgotten_through: forgotten,
            rooms_forgotten_through: rooms_forgotten,
        }
        .encode(&mut out);
        let copied = out.len() as u64;
        if let Some(retry_at_ms) = worth_it(old.len() as u64, copied, &mut expiring, now_ms) {
            let mut done = self.skipped(Ok(()));
            done.declined = Some((segment, retry_at_ms));
            return done;
        }
        let written_to = self.head;
        // Synced whatever the policy: the old segment is deleted next, and with `never` an
        // unsynced copy could be lost with the machine while the deletion survives.
        let result = self.append(&out, true).map(|_| ());
        let result = self.note(result);
        if let Err(e) = result {
            return self.skipped(Err(e));
        }
        // The copies are durable (or, with `never`, written): the old segment can go. If it
        // cannot, the copies are harmless duplicates (`Streams::restore` skips them).
        if let Err(e) = fs::remove_file(&path).and_then(|()| sync_dir(&self.dir)) {
            warn!("file engine: cannot delete {}: {e}", path.display());
            return self.skipped(Ok(()));
        }
        let size = self.sizes.remove(&segment).unwrap_or(0);
        if self.len >= self.segment_bytes {
            self.rotate();
        }
        let reclaimed = size.saturating_sub(copied);
        Done {
            ops: 1,
            result: Ok(()),
            segment: written_to,
            segment_len: self.sizes.get(&written_to).copied().unwrap_or(0),
            head: self.head,
            disk_bytes: self.sizes.values().sum(),
            batch: None,
            declined: None,
            compacted: Some(Compacted {
                segment,
                reclaimed,
                moved,
            }),
        }
    }
}

impl Storage {
    /// The answer to a compaction that deleted nothing.
    fn skipped(&self, result: Result<(), String>) -> Done {
        Done {
            ops: 1,
            result,
            segment: self.head,
            segment_len: self.len,
            head: self.head,
            disk_bytes: self.sizes.values().sum(),
            batch: None,
            compacted: None,
            declined: None,
        }
    }
}

/// Whether copying `copied` bytes out of a segment of `size` bytes is worth it: `None` if the
/// copy is at most half the segment, else the Unix time (ms) from which it will be, as the
/// copied records (`expiring`: expiry, bytes) expire, and at least a minute from now. Without
/// this, a segment of unexpired duplicate windows would be copied forward again and again.
fn worth_it(size: u64, copied: u64, expiring: &mut [(u64, u64)], now_ms: u64) -> Option<u64> {
    let half = size / 2;
    if copied <= half {
        return None;
    }
    // Records with no expiry (marks) stay; the rest are kept while their expiry is ahead.
    let lasting: u64 = copied - expiring.iter().map(|&(_, b)| b).sum::<u64>();
    expiring.sort_unstable_by_key(|&(expires, _)| std::cmp::Reverse(expires));
    let mut kept = lasting;
    let mut from = now_ms;
    for &(expires, bytes) in expiring.iter() {
        if kept + bytes > half {
            from = expires;
            break;
        }
        kept += bytes;
    }
    Some(from.max(now_ms.saturating_add(RETRY_COMPACTION_MS)))
}

/// The shortest wait before a segment whose compaction was declined is tried again.
const RETRY_COMPACTION_MS: u64 = 60_000;

/// Creates segment `id` holding only its magic and a `Header`, durably (file and directory).
/// The fault switch fails the header's write, as a full disk would after the file exists.
pub(super) fn create_segment(
    dir: &Path,
    id: u64,
    marks: Marks,
    fault: &StoreFault,
) -> io::Result<(File, u64)> {
    let path = journal::segment_path(dir, id);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)?;
    let mut bytes = MAGIC.to_vec();
    Record::Header {
        epoch: marks.epoch,
        high_water: marks.high_water,
        forgotten_through: marks.forgotten_through,
        rooms_forgotten_through: marks.rooms_forgotten_through,
    }
    .encode(&mut bytes);
    let written = if fault.active() {
        Err(io::Error::from_raw_os_error(libc::ENOSPC))
    } else {
        Ok(())
    };
    let written = written
        .and_then(|()| file.write_all_at(&bytes, 0))
        .and_then(|()| file.sync_all())
        .and_then(|()| sync_dir(dir));
    if let Err(e) = written {
        // A file left behind would make every later attempt fail with "file exists" (and a
        // headerless segment is not a valid one): take it away, the next attempt starts over.
        let _ = fs::remove_file(&path);
        return Err(e);
    }
    Ok((file, bytes.len() as u64))
}

/// Makes a directory's entries (created or deleted files) durable.
pub(super) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn storage(dir: &Path, flag: &Arc<AtomicBool>) -> Storage {
        let marks = Marks {
            epoch: Epoch::random(),
            high_water: Position(0),
            forgotten_through: Position(0),
            rooms_forgotten_through: Position(0),
        };
        let fault = StoreFault::Flag(Arc::clone(flag));
        Storage::new(
            dir.to_path_buf(),
            FsyncPolicy::Batch,
            1 << 20,
            fault,
            BTreeMap::new(),
            marks,
        )
        .unwrap()
    }

    #[test]
    fn a_segment_that_could_not_be_started_leaves_no_file_and_the_next_rotation_works() {
        let tmp = tempfile::tempdir().unwrap();
        let flag = Arc::new(AtomicBool::new(false));
        let mut s = storage(tmp.path(), &flag);
        assert_eq!(s.head, 1);
        flag.store(true, Ordering::Relaxed);
        s.rotate();
        assert_eq!(s.head, 1, "rotation failed, the head stays");
        assert!(s.rotate_failing);
        assert!(
            !journal::segment_path(tmp.path(), 2).exists(),
            "a failed start left segment 2 behind"
        );
        s.rotate(); // failing again: still no file, and no second log line (state unchanged)
        assert!(!journal::segment_path(tmp.path(), 2).exists());
        flag.store(false, Ordering::Relaxed);
        s.rotate();
        assert_eq!(s.head, 2, "the disk has room again: rotation works");
        assert!(!s.rotate_failing);
        let bytes = fs::read(journal::segment_path(tmp.path(), 2)).unwrap();
        assert!(bytes.starts_with(MAGIC), "segment 2 has its header");
    }

    #[test]
    fn a_compaction_copying_more_than_half_waits_for_its_records_to_expire() {
        // 100 bytes copied out of 120: declined until enough has expired to fit in 60.
        let mut expiring = vec![(5_000, 30), (9_000, 30), (7_000, 30)];
        let from = worth_it(120, 100, &mut expiring, 1_000);
        // 10 bytes last; keeping 9_000 (30) fits 40 <= 60, adding 7_000 would not.
        assert_eq!(from, Some(61_000), "at least a minute from now");
        let mut expiring = vec![(500_000, 30), (900_000, 30), (700_000, 30)];
        assert_eq!(worth_it(120, 100, &mut expiring, 1_000), Some(700_000));
        assert_eq!(worth_it(120, 60, &mut [], 1_000), None, "half is worth it");
    }
}
