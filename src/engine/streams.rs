//! The in-memory index of retained messages: every stream's messages in position order, their
//! bounds and TTLs, and what each stream has lost (SPEC §6 retention, §13 streams).
//!
//! Owns: `Streams`, the three bounds (per stream `--offline-max`, age `--offline-ttl`, total
//! bytes `--offline-max-bytes`) and what happens at each, the pending flag of each message, and
//! the "lost through" marks that decide whether a `since` can be served completely.
//! Does not: allocate positions, write anything to disk, or read a clock (it is handed the Unix
//! time in ms, which, unlike an `Instant`, means the same after a restart).
//!
//! An engine keeps two of these: one for the id inboxes (bounded by the `--offline-*` flags) and
//! one for room history (SPEC §16, bounded by the `--room-history*` flags), so a busy room can
//! never evict a direct message still waiting for its recipient. Room messages enter with
//! `keep`: they are never pending, so their per-stream bound always evicts and never refuses.
//!
//! Both engines keep this index; the file engine also logs every change to it, and rebuilds it
//! from the log at start-up (`restore`), so reads never touch the disk.
//!
//! The bounds, and who pays (the same rules as before engines existed, see docs/protocol.md):
//! * age: a message leaves at its expiry, pending or not;
//! * per stream: at most `per_stream` messages. A new one evicts the oldest if that one was
//!   delivered; if the oldest is still pending the new one is refused (`Full`), so the per-stream
//!   bound never drops a message acked `queued`;
//! * all streams: at most `max_bytes` (bodies plus `OVERHEAD_BYTES` each). Beyond it the
//!   globally oldest go first, pending or not (counted as `dropped_global`).
//!
//! What a stream has lost. Every removal takes a stream's *oldest* message (the bounds and TTL
//! only ever remove the front), so one number per stream says what is gone: `trimmed_through`,
//! the newest position removed. A stream with no message left is forgotten, and its mark folds
//! into one global `forgotten_through`, so memory stays bounded by what is retained; a stream
//! created again starts with that global mark as its `born_through` (what its earlier lives
//! lost is at or below it). A `since` at or above a stream's marks (the global one for a stream
//! not retained) misses nothing; below, something after it may be gone.
//!
//! Invariants: each stream is non-empty and sorted by position; `order` holds exactly one entry
//! per retained message; `messages`, `pending` and `bytes` equal the sums over all streams.

use super::{Position, Replayed, StreamId};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::rc::Rc;

/// Approximate bytes of bookkeeping per retained message, added to the body's length for the
/// global byte bound.
pub const OVERHEAD_BYTES: usize = 96;

/// The retention bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Most messages kept per stream; 0 disables retention (and the offline queue).
    pub per_stream: usize,
    /// How long a message is kept after it was accepted, in ms.
    pub ttl_ms: u64,
    /// Most bytes kept over all streams (bodies plus `OVERHEAD_BYTES` each).
    pub max_bytes: usize,
}

/// One retained message.
#[derive(Clone, Debug)]
pub struct Entry {
    pub position: Position,
    /// Unix time in ms at which it expires.
    pub expires_ms: u64,
    pub body: Rc<[u8]>,
    /// Not yet delivered to any connection.
    pub pending: bool,
    /// The file engine's log segment holding it (0: none yet, or the memory engine).
    pub segment: u64,
}

impl Entry {
    pub fn cost(&self) -> usize {
        self.body.len() + OVERHEAD_BYTES
    }
}

/// Why a message was not retained.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    Disabled,
    Full,
    TooLarge,
}

/// A message the bounds or the TTL removed (the file engine logs it, and frees its segment).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gone {
    pub stream: StreamId,
    pub position: Position,
    pub segment: u64,
    pub cost: usize,
}

/// Messages past their expiry that `expire` has not removed yet (an idle server sweeps late;
/// /metrics counts them as gone already).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Expiring {
    pub pending: u64,
    pub messages: usize,
    pub bytes: usize,
}

/// What the bounds removed so far, for /metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Removed {
    /// Pending messages that reached their TTL undelivered.
    pub expired_pending: u64,
    /// Delivered messages that reached their TTL (recovery data aged out).
    pub expired_delivered: u64,
    /// Delivered messages evicted by the per-stream bound.
    pub evicted_per_stream: u64,
    /// Pending messages evicted by the global byte bound (lost before their TTL).
    pub dropped_global: u64,
    /// Delivered messages evicted by the global byte bound.
    pub evicted_global: u64,
    /// Messages dropped at start-up because the bounds shrank since they were stored.
    pub dropped_on_restore: u64,
}

#[derive(Debug, Default)]
struct Stream {
    entries: VecDeque<Entry>,
    /// The newest position removed from this stream by a bound or the TTL (0: none).
    trimmed_through: Position,
    /// `forgotten_through` when this stream was (re)created: whatever an earlier life of the
    /// stream lost is at or below it.
    born_through: Position,
}

pub struct Streams {
    limits: Limits,
    streams: HashMap<StreamId, Stream>,
    /// Every retained message, oldest (lowest position) first: the eviction and expiry order.
    order: BTreeMap<Position, StreamId>,
    /// The newest position of any stream that was forgotten (emptied by bounds or TTL).
    forgotten_through: Position,
    messages: usize,
    pending: usize,
    bytes: usize,
    pub removed: Removed,
}

/// How a removal is counted.
#[derive(Clone, Copy)]
enum Why {
    Expired,
    PerStream,
    Global,
    Restore,
    /// Replayed from the log: counted when it happened, before the restart.
    Logged,
}

impl Streams {
    pub fn new(limits: Limits) -> Streams {
        Streams {
            limits,
            streams: HashMap::new(),
            order: BTreeMap::new(),
            forgotten_through: Position(0),
            messages: 0,
            pending: 0,
            bytes: 0,
            removed: Removed::default(),
        }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// What `expire(now_ms)` would remove (see `Expiring`): walks the oldest messages only.
    pub fn expiring(&self, now_ms: u64) -> Expiring {
        let mut out = Expiring::default();
        for (&position, stream) in &self.order {
            let Some(e) = self.streams.get(stream).and_then(|s| {
                s.entries
                    .binary_search_by_key(&position, |e| e.position)
                    .ok()
                    .and_then(|at| s.entries.get(at))
            }) else {
                break;
            };
            if e.expires_ms > now_ms {
                break;
            }
            out.messages += 1;
            out.bytes += e.cost();
            out.pending += u64::from(e.pending);
        }
        out
    }

    /// Keeps a new message (pending: no connection has it yet) at `position`, which must be
    /// newer than every retained one. What the bounds removed to make room goes into `gone`.
    ///
    /// # Errors
    /// `Disabled`, `Full` or `TooLarge`; nothing changes then.
    pub fn append(
        &mut self,
        stream: &StreamId,
        position: Position,
        body: Rc<[u8]>,
        now_ms: u64,
        gone: &mut Vec<Gone>,
    ) -> Result<(), Refused> {
        self.add(stream, position, body, true, now_ms, gone)
    }

    /// Keeps a room message for its room's history (SPEC §16). It is never pending (it went
    /// live to the members when it was published), so the per-stream bound always makes room
    /// by evicting the oldest and never refuses. A message that alone exceeds the byte bound
    /// cannot be kept: the room's history is cut through it instead (what it held is removed
    /// and counted, and a `Gone` at the message's own position carries the mark), so a `since`
    /// before it reads `recovered: false` rather than silently missing it. The relay's flags
    /// are checked so that this cannot happen (`--room-history-max-bytes` above
    /// `--max-message`); it is here so that the promise does not depend on that check.
    ///
    /// Does nothing when history is off (`per_stream` 0).
    pub fn keep(
        &mut self,
        stream: &StreamId,
        position: Position,
        body: Rc<[u8]>,
        now_ms: u64,
        gone: &mut Vec<Gone>,
    ) {
        match self.add(stream, position, body, false, now_ms, gone) {
            Ok(()) | Err(Refused::Disabled) => {}
            // Not pending, so never `Full`; only `TooLarge` is left.
            Err(Refused::Full | Refused::TooLarge) => {
                while self.remove_front(stream, Why::Global, gone) {}
                self.forgotten_through = self.forgotten_through.max(position);
                gone.push(Gone {
                    stream: stream.clone(),
                    position,
                    segment: 0,
                    cost: 0,
                });
            }
        }
    }

    fn add(
        &mut self,
        stream: &StreamId,
        position: Position,
        body: Rc<[u8]>,
        pending: bool,
        now_ms: u64,
        gone: &mut Vec<Gone>,
    ) -> Result<(), Refused> {
        if let Some(refused) = self.refusal(stream, body.len()) {
            return Err(refused);
        }
        let cost = body.len() + OVERHEAD_BYTES;
        while self.bytes + cost > self.limits.max_bytes {
            if !self.remove_oldest(Why::Global, gone) {
                break;
            }
        }
        if self.streams.get(stream).map_or(0, |s| s.entries.len()) >= self.limits.per_stream {
            // The oldest is delivered (checked above; the byte bound only removes fronts).
            self.remove_front(stream, Why::PerStream, gone);
        }
        debug_assert!(self.newest(stream).is_none_or(|p| p < position));
        self.insert(
            stream,
            Entry {
                position,
                expires_ms: now_ms.saturating_add(self.limits.ttl_ms),
                body,
                pending,
                segment: 0,
            },
        );
        Ok(())
    }

    /// Why a new pending message of `len` bytes would be refused in `stream` now, if it would
    /// (what `append` checks before it changes anything). The workers' bus asks before it
    /// submits a direct message (`bus` module doc, "Bursts").
    pub fn refusal(&self, stream: &StreamId, len: usize) -> Option<Refused> {
        if self.limits.per_stream == 0 {
            return Some(Refused::Disabled);
        }
        if len + OVERHEAD_BYTES > self.limits.max_bytes {
            return Some(Refused::TooLarge);
        }
        let entries = self.streams.get(stream).map(|s| &s.entries);
        let len = entries.map_or(0, VecDeque::len);
        let front_pending = entries.and_then(VecDeque::front).is_some_and(|e| e.pending);
        (len >= self.limits.per_stream && front_pending).then_some(Refused::Full)
    }

    /// Puts back a message read from the log at start-up, wherever it belongs in its stream (a
    /// compacted log holds old messages after newer ones). Bounds are applied by `enforce`.
    pub fn restore(&mut self, stream: &StreamId, entry: Entry) {
        if entry.position <= self.trimmed_through(stream)
            || self.order.contains_key(&entry.position)
        {
            return;
        }
        self.insert(stream, entry);
    }

    fn insert(&mut self, stream: &StreamId, entry: Entry) {
        self.messages += 1;
        self.pending += usize::from(entry.pending);
        self.bytes += entry.cost();
        self.order.insert(entry.position, stream.clone());
        let born_through = self.forgotten_through;
        let entries = &mut self
            .streams
            .entry(stream.clone())
            .or_insert_with(|| Stream {
                born_through,
                ..Stream::default()
            })
            .entries;
        match entries.back() {
            Some(last) if last.position > entry.position => {
                let at = entries.partition_point(|e| e.position < entry.position);
                entries.insert(at, entry);
            }
            _ => entries.push_back(entry),
        }
    }

    /// Removes every message whose expiry has passed.
    pub fn expire(&mut self, now_ms: u64, gone: &mut Vec<Gone>) {
        while let Some((&position, stream)) = self.order.first_key_value() {
            let expired = self
                .streams
                .get(stream)
                .and_then(|s| s.entries.front())
                .is_some_and(|e| e.position == position && e.expires_ms <= now_ms);
            if !expired {
                break;
            }
            let stream = stream.clone();
            self.remove_front(&stream, Why::Expired, gone);
        }
    }

    /// After a restore: expiry at `now_ms`, then the bounds as they are configured now (they may
    /// have shrunk since the messages were stored; what that drops is counted).
    pub fn enforce(&mut self, now_ms: u64, gone: &mut Vec<Gone>) {
        self.expire(now_ms, gone);
        let over: Vec<StreamId> = self
            .streams
            .iter()
            .filter(|(_, s)| s.entries.len() > self.limits.per_stream)
            .map(|(id, _)| id.clone())
            .collect();
        for stream in over {
            while self
                .streams
                .get(&stream)
                .is_some_and(|s| s.entries.len() > self.limits.per_stream)
            {
                self.remove_front(&stream, Why::Restore, gone);
            }
        }
        while self.bytes > self.limits.max_bytes {
            if !self.remove_oldest(Why::Restore, gone) {
                break;
            }
        }
    }

    /// Applies a removal read from the log: every message of `stream` up to `through` is gone.
    pub fn trim(&mut self, stream: &StreamId, through: Position) {
        while self
            .streams
            .get(stream)
            .and_then(|s| s.entries.front())
            .is_some_and(|e| e.position <= through)
        {
            self.remove_front(stream, Why::Logged, &mut Vec::new());
        }
        match self.streams.get_mut(stream) {
            Some(s) => s.trimmed_through = s.trimmed_through.max(through),
            None => self.forgotten_through = self.forgotten_through.max(through),
        }
    }

    /// After a restore: every message up to `through`, in every stream, may have gone
    /// unrecorded (room history was off for a while, see `FileEngine::open`), so none of them
    /// can serve a `since`: they are removed (counted as dropped at restore) and marked.
    pub fn forget_all_through(&mut self, through: Position, gone: &mut Vec<Gone>) {
        let streams: Vec<StreamId> = self.streams.keys().cloned().collect();
        for stream in streams {
            while self
                .streams
                .get(&stream)
                .and_then(|s| s.entries.front())
                .is_some_and(|e| e.position <= through)
            {
                self.remove_front(&stream, Why::Restore, gone);
            }
            if let Some(s) = self.streams.get_mut(&stream) {
                s.trimmed_through = s.trimmed_through.max(through);
            }
        }
        self.forgotten_through = self.forgotten_through.max(through);
    }

    /// Raises the global mark (read from the log: what deleted segments held).
    pub fn forget_through(&mut self, position: Position) {
        self.forgotten_through = self.forgotten_through.max(position);
    }

    /// Takes back a message that was never stored (the store failed): it is not counted as
    /// removed and leaves no mark, since no client ever saw it.
    pub fn unappend(&mut self, stream: &StreamId, position: Position) -> Option<Entry> {
        let s = self.streams.get_mut(stream)?;
        let at = s.entries.iter().position(|e| e.position == position)?;
        let entry = s.entries.remove(at)?;
        if s.entries.is_empty() {
            let mark = s.trimmed_through;
            self.streams.remove(stream);
            self.forgotten_through = self.forgotten_through.max(mark);
        }
        self.order.remove(&position);
        self.account_removal(&entry);
        Some(entry)
    }

    /// Marks messages delivered. Returns how many were pending.
    pub fn mark_delivered(&mut self, stream: &StreamId, positions: &[Position]) -> usize {
        let mut flipped = Vec::new();
        self.mark_delivered_into(stream, positions, &mut flipped);
        flipped.len()
    }

    /// Marks messages delivered, and puts the positions of those that were pending into
    /// `flipped` (what the file engine must log).
    pub fn mark_delivered_into(
        &mut self,
        stream: &StreamId,
        positions: &[Position],
        flipped: &mut Vec<Position>,
    ) {
        let Some(s) = self.streams.get_mut(stream) else {
            return;
        };
        let before = flipped.len();
        for &position in positions {
            if let Ok(at) = s.entries.binary_search_by_key(&position, |e| e.position) {
                if std::mem::take(&mut s.entries[at].pending) {
                    flipped.push(position);
                }
            }
        }
        self.pending -= flipped.len() - before;
    }

    /// What a client connecting with `since` gets: the pending messages and, with a `since`,
    /// every retained one after it, in order, up to `through` (newer ones are not stored yet).
    /// Also whether that is everything after `since` (see the module doc).
    pub fn replay(
        &self,
        stream: &StreamId,
        since: Option<Position>,
        through: Position,
    ) -> (Vec<Replayed>, bool) {
        let recovered = since.is_none_or(|since| since >= self.lost_through(stream));
        let Some(s) = self.streams.get(stream) else {
            return (Vec::new(), recovered);
        };
        let messages = s
            .entries
            .iter()
            .take_while(|e| e.position <= through)
            .filter(|e| e.pending || since.is_some_and(|since| e.position > since))
            .map(|e| Replayed {
                position: e.position,
                body: Rc::clone(&e.body),
                pending: e.pending,
            })
            .collect();
        (messages, recovered)
    }

    /// The newest `limit` messages of `stream` up to `through` (newer ones are not stored
    /// yet), oldest first: a room's `history` page (SPEC §16).
    pub fn tail(&self, stream: &StreamId, limit: usize, through: Position) -> Vec<Replayed> {
        let Some(s) = self.streams.get(stream) else {
            return Vec::new();
        };
        let upto = s.entries.partition_point(|e| e.position <= through);
        let from = upto.saturating_sub(limit);
        s.entries
            .range(from..upto)
            .map(|e| Replayed {
                position: e.position,
                body: Rc::clone(&e.body),
                pending: e.pending,
            })
            .collect()
    }

    /// Every message of `stream` up to this position may be gone (see the module doc).
    pub fn lost_through(&self, stream: &StreamId) -> Position {
        match self.streams.get(stream) {
            Some(s) => s.trimmed_through.max(s.born_through),
            None => self.forgotten_through,
        }
    }

    fn trimmed_through(&self, stream: &StreamId) -> Position {
        self.streams
            .get(stream)
            .map_or(Position(0), |s| s.trimmed_through)
    }

    /// The newest position retained in `stream`.
    pub fn newest(&self, stream: &StreamId) -> Option<Position> {
        self.newest_through(stream, Position(u64::MAX))
    }

    /// The newest position retained in `stream` that is at most `through`.
    pub fn newest_through(&self, stream: &StreamId, through: Position) -> Option<Position> {
        let s = self.streams.get(stream)?;
        s.entries
            .iter()
            .rev()
            .map(|e| e.position)
            .find(|&p| p <= through)
    }

    /// The retained message at `position`, in whichever stream.
    pub fn get(&self, position: Position) -> Option<&Entry> {
        let s = self.streams.get(self.order.get(&position)?)?;
        let at = s
            .entries
            .binary_search_by_key(&position, |e| e.position)
            .ok()?;
        s.entries.get(at)
    }

    /// Records which log segment holds the message at `position` (file engine). Returns the
    /// message's cost, if it is still retained.
    pub fn set_segment(&mut self, position: Position, segment: u64) -> Option<usize> {
        let stream = self.order.get(&position)?;
        let s = self.streams.get_mut(stream)?;
        let at = s
            .entries
            .binary_search_by_key(&position, |e| e.position)
            .ok()?;
        let entry = &mut s.entries[at];
        entry.segment = segment;
        Some(entry.cost())
    }

    /// Every retained message with its stream, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&StreamId, &Entry)> {
        self.streams
            .iter()
            .flat_map(|(id, s)| s.entries.iter().map(move |e| (id, e)))
    }

    /// Each retained stream's `lost_through`, where it is above 0: what a compaction must
    /// carry forward when it deletes the records these marks came from.
    pub fn marks(&self) -> impl Iterator<Item = (&StreamId, Position)> {
        self.streams
            .iter()
            .map(|(id, s)| (id, s.trimmed_through.max(s.born_through)))
            .filter(|(_, mark)| *mark > Position(0))
    }

    pub fn forgotten_through(&self) -> Position {
        self.forgotten_through
    }

    pub fn streams(&self) -> usize {
        self.streams.len()
    }

    pub fn messages(&self) -> usize {
        self.messages
    }

    pub fn pending(&self) -> usize {
        self.pending
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Removes the globally oldest message. Returns false if there is none.
    fn remove_oldest(&mut self, why: Why, gone: &mut Vec<Gone>) -> bool {
        let Some((_, stream)) = self.order.first_key_value() else {
            return false;
        };
        let stream = stream.clone();
        self.remove_front(&stream, why, gone)
    }

    /// Removes `stream`'s oldest message, counts it, and forgets the stream if it is empty.
    fn remove_front(&mut self, stream: &StreamId, why: Why, gone: &mut Vec<Gone>) -> bool {
        let Some(s) = self.streams.get_mut(stream) else {
            return false;
        };
        let Some(entry) = s.entries.pop_front() else {
            return false;
        };
        s.trimmed_through = s.trimmed_through.max(entry.position);
        if s.entries.is_empty() {
            let mark = s.trimmed_through;
            self.streams.remove(stream);
            self.forgotten_through = self.forgotten_through.max(mark);
        }
        self.order.remove(&entry.position);
        self.account_removal(&entry);
        let r = &mut self.removed;
        match (why, entry.pending) {
            (Why::Expired, true) => r.expired_pending += 1,
            (Why::Expired, false) => r.expired_delivered += 1,
            (Why::PerStream, _) => r.evicted_per_stream += 1,
            (Why::Global, true) => r.dropped_global += 1,
            (Why::Global, false) => r.evicted_global += 1,
            (Why::Restore, _) => r.dropped_on_restore += 1,
            (Why::Logged, _) => {}
        }
        gone.push(Gone {
            stream: stream.clone(),
            position: entry.position,
            segment: entry.segment,
            cost: entry.cost(),
        });
        true
    }

    fn account_removal(&mut self, entry: &Entry) {
        self.messages -= 1;
        self.pending -= usize::from(entry.pending);
        self.bytes -= entry.cost();
    }

    #[cfg(test)]
    pub fn check_invariants(&self) {
        let (mut messages, mut pending, mut bytes) = (0, 0, 0);
        for (id, s) in &self.streams {
            assert!(!s.entries.is_empty(), "{id:?} is empty but kept");
            assert!(s
                .entries
                .iter()
                .zip(s.entries.iter().skip(1))
                .all(|(a, b)| a.position < b.position));
            for e in &s.entries {
                assert_eq!(self.order.get(&e.position), Some(id));
                assert!(e.position > s.trimmed_through);
            }
            messages += s.entries.len();
            pending += s.entries.iter().filter(|e| e.pending).count();
            bytes += s.entries.iter().map(Entry::cost).sum::<usize>();
        }
        assert_eq!(
            (self.messages, self.pending, self.bytes, self.order.len()),
            (messages, pending, bytes, messages)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: u64 = 60_000;

    fn limits(per_stream: usize, max_bytes: usize) -> Limits {
        Limits {
            per_stream,
            ttl_ms: TTL,
            max_bytes,
        }
    }

    fn body(n: u64) -> Rc<[u8]> {
        Rc::from(format!("m{n}").into_bytes())
    }

    fn bob() -> StreamId {
        StreamId::inbox("bob")
    }

    fn add(s: &mut Streams, stream: &StreamId, n: u64, now: u64) -> Result<Vec<Gone>, Refused> {
        let mut gone = Vec::new();
        s.append(stream, Position(n), body(n), now, &mut gone)?;
        s.check_invariants();
        Ok(gone)
    }

    fn positions(s: &Streams, stream: &StreamId, since: Option<u64>) -> (Vec<u64>, bool) {
        let (m, ok) = s.replay(stream, since.map(Position), Position(u64::MAX));
        (m.iter().map(|r| r.position.0).collect(), ok)
    }

    #[test]
    fn pending_until_delivered_then_only_with_since() {
        let mut s = Streams::new(limits(10, 1 << 20));
        for n in 1..=3 {
            add(&mut s, &bob(), n, 0).unwrap();
        }
        assert_eq!(positions(&s, &bob(), None), (vec![1, 2, 3], true));
        assert_eq!(s.mark_delivered(&bob(), &[Position(1), Position(2)]), 2);
        assert_eq!(s.pending(), 1);
        assert_eq!(positions(&s, &bob(), None), (vec![3], true));
        assert_eq!(positions(&s, &bob(), Some(1)), (vec![2, 3], true));
        assert_eq!(s.newest(&bob()), Some(Position(3)));
    }

    #[test]
    fn replay_stops_at_what_is_stored() {
        let mut s = Streams::new(limits(10, 1 << 20));
        for n in 1..=3 {
            add(&mut s, &bob(), n, 0).unwrap();
        }
        let (m, _) = s.replay(&bob(), Some(Position(0)), Position(2));
        assert_eq!(m.len(), 2);
    }

    #[test]
    fn ttl_removes_and_marks_what_is_lost() {
        let mut s = Streams::new(limits(10, 1 << 20));
        add(&mut s, &bob(), 1, 0).unwrap();
        add(&mut s, &bob(), 2, 10_000).unwrap();
        let mut gone = Vec::new();
        s.expire(TTL - 1, &mut gone);
        assert!(gone.is_empty(), "not a moment early");
        s.expire(TTL, &mut gone);
        assert_eq!(gone.len(), 1);
        assert_eq!(s.removed.expired_pending, 1);
        // A since before the expired message cannot be served completely; one after it can.
        assert_eq!(positions(&s, &bob(), Some(0)), (vec![2], false));
        assert_eq!(positions(&s, &bob(), Some(1)), (vec![2], true));
        // The stream empties and is forgotten: the global mark remembers what it lost.
        s.expire(TTL + 10_000, &mut gone);
        assert_eq!(s.streams(), 0);
        assert_eq!(positions(&s, &bob(), Some(1)), (vec![], false));
        assert_eq!(positions(&s, &bob(), Some(2)), (vec![], true));
        s.check_invariants();
    }

    #[test]
    fn per_stream_bound_evicts_delivered_but_refuses_over_pending() {
        let mut s = Streams::new(limits(3, 1 << 20));
        for n in 1..=3 {
            add(&mut s, &bob(), n, 0).unwrap();
        }
        assert_eq!(add(&mut s, &bob(), 4, 0), Err(Refused::Full));
        s.mark_delivered(&bob(), &[Position(1), Position(2), Position(3)]);
        let gone = add(&mut s, &bob(), 4, 0).unwrap();
        assert_eq!(gone.iter().map(|g| g.position.0).collect::<Vec<_>>(), [1]);
        assert_eq!(s.removed.evicted_per_stream, 1);
        assert_eq!(positions(&s, &bob(), Some(0)), (vec![2, 3, 4], false));
    }

    #[test]
    fn global_byte_bound_evicts_the_oldest_of_all() {
        let each = 2 + OVERHEAD_BYTES;
        let mut s = Streams::new(limits(100, 3 * each));
        let (a, b) = (StreamId::inbox("a"), StreamId::inbox("b"));
        add(&mut s, &a, 1, 0).unwrap();
        add(&mut s, &b, 2, 0).unwrap();
        add(&mut s, &a, 3, 0).unwrap();
        add(&mut s, &b, 4, 0).unwrap();
        assert_eq!(s.removed.dropped_global, 1);
        assert_eq!(s.bytes(), 3 * each);
        let too_big: Rc<[u8]> = Rc::from(vec![0u8; 3 * each]);
        assert_eq!(
            s.append(&a, Position(5), too_big, 0, &mut Vec::new()),
            Err(Refused::TooLarge)
        );
        let none =
            Streams::new(limits(0, 1 << 20)).append(&a, Position(1), body(1), 0, &mut Vec::new());
        assert_eq!(none, Err(Refused::Disabled));
    }

    #[test]
    fn restore_puts_messages_in_order_and_trim_replays_removals() {
        let mut s = Streams::new(limits(10, 1 << 20));
        let entry = |n: u64| Entry {
            position: Position(n),
            expires_ms: TTL,
            body: body(n),
            pending: true,
            segment: 1,
        };
        // A compacted log: 5 first, then the older 2 and 3 copied after it.
        for n in [5, 2, 3, 3] {
            s.restore(&bob(), entry(n));
        }
        s.check_invariants();
        assert_eq!(positions(&s, &bob(), None).0, vec![2, 3, 5]);
        s.trim(&bob(), Position(2));
        assert_eq!(s.removed, Removed::default(), "counted before the restart");
        assert_eq!(positions(&s, &bob(), Some(0)), (vec![3, 5], false));
        s.restore(&bob(), entry(1));
        assert_eq!(
            positions(&s, &bob(), None).0,
            vec![3, 5],
            "trimmed stays gone"
        );
        s.check_invariants();
    }

    #[test]
    fn enforce_applies_shrunk_bounds_and_expiry_after_restore() {
        let mut s = Streams::new(limits(2, 1 << 20));
        for n in 1..=4 {
            s.restore(
                &bob(),
                Entry {
                    position: Position(n),
                    expires_ms: if n == 1 { 5 } else { TTL },
                    body: body(n),
                    pending: true,
                    segment: 1,
                },
            );
        }
        let mut gone = Vec::new();
        s.enforce(10, &mut gone);
        assert_eq!(positions(&s, &bob(), None).0, vec![3, 4]);
        assert_eq!(s.removed.expired_pending, 1);
        assert_eq!(s.removed.dropped_on_restore, 1);
        s.check_invariants();
    }

    fn lobby() -> StreamId {
        StreamId::room("lobby")
    }

    fn keep(s: &mut Streams, stream: &StreamId, n: u64, now: u64) -> Vec<Gone> {
        let mut gone = Vec::new();
        s.keep(stream, Position(n), body(n), now, &mut gone);
        s.check_invariants();
        gone
    }

    fn tail(s: &Streams, stream: &StreamId, limit: usize) -> Vec<u64> {
        s.tail(stream, limit, Position(u64::MAX))
            .iter()
            .map(|r| r.position.0)
            .collect()
    }

    #[test]
    fn kept_room_messages_are_never_pending_and_the_bound_always_evicts() {
        let mut s = Streams::new(limits(3, 1 << 20));
        for n in 1..=5 {
            keep(&mut s, &lobby(), n, 0);
        }
        assert_eq!(s.pending(), 0);
        assert_eq!(s.removed.evicted_per_stream, 2);
        assert_eq!(tail(&s, &lobby(), 10), [3, 4, 5]);
        assert_eq!(tail(&s, &lobby(), 2), [4, 5]);
        assert_eq!(tail(&s, &lobby(), 0), Vec::<u64>::new());
        // Only what is stored: a page stops at `through`.
        let page = s.tail(&lobby(), 10, Position(4));
        assert_eq!(page.len(), 2);
        // Since inside what is kept: complete; before it: not.
        assert_eq!(positions(&s, &lobby(), Some(3)), (vec![4, 5], true));
        assert_eq!(positions(&s, &lobby(), Some(1)), (vec![3, 4, 5], false));
    }

    #[test]
    fn a_room_message_over_the_byte_bound_cuts_the_history_through_it() {
        let each = 2 + OVERHEAD_BYTES;
        let mut s = Streams::new(limits(10, 3 * each));
        keep(&mut s, &lobby(), 1, 0);
        keep(&mut s, &lobby(), 2, 0);
        let mut gone = Vec::new();
        let huge: Rc<[u8]> = Rc::from(vec![b'x'; 4 * each]);
        s.keep(&lobby(), Position(3), huge, 0, &mut gone);
        s.check_invariants();
        assert_eq!(
            gone.iter().map(|g| g.position.0).collect::<Vec<_>>(),
            [1, 2, 3],
            "the kept ones, then the mark at the message itself"
        );
        keep(&mut s, &lobby(), 4, 0);
        // Nothing after 2 can be complete: 3 was never kept.
        assert_eq!(positions(&s, &lobby(), Some(2)), (vec![4], false));
        assert_eq!(positions(&s, &lobby(), Some(3)), (vec![4], true));
    }

    #[test]
    fn keep_does_nothing_with_history_off() {
        let mut s = Streams::new(limits(0, 1 << 20));
        assert!(keep(&mut s, &lobby(), 1, 0).is_empty());
        assert_eq!(s.messages(), 0);
    }

    #[test]
    fn unappend_takes_back_without_a_mark() {
        let mut s = Streams::new(limits(10, 1 << 20));
        add(&mut s, &bob(), 1, 0).unwrap();
        add(&mut s, &bob(), 2, 0).unwrap();
        assert!(s.unappend(&bob(), Position(2)).is_some());
        assert!(s.unappend(&bob(), Position(1)).is_some());
        assert_eq!((s.messages(), s.streams()), (0, 0));
        assert_eq!(positions(&s, &bob(), Some(0)), (vec![], true));
        s.check_invariants();
    }
}
