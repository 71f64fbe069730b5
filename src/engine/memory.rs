//! The memory engine: streams, positions and duplicate windows in this process's memory, the
//! default (SPEC §13). A restart forgets everything, and says so: each run has a new epoch.
//!
//! Owns: `MemoryEngine`, the position counter, the epoch, the two indexes (`Streams`: the
//! inboxes, and room history, SPEC §16), the duplicate windows (`Dedup`) and the queue of ready
//! completions. Every piece of work completes at once:
//! the completion is ready before the call returns.
//! Does not: touch the disk. The file engine (`file.rs`) wraps one of these as its index and adds
//! the log; the `pub(super)` methods below are the parts it reuses.

use super::streams::{Gone, Limits, Refused, Removed, Streams};
use super::{
    Append, Completion, Engine, Epoch, Event, Now, Outcome, Position, Publish, Recovery, Refusal,
    Since, Stats, StreamId, Ticket,
};
use crate::app::dedup::{Dedup, Recorded};
use crate::app::envelope::{AckStatus, MsgId};
use crate::server::metrics::Writer;
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Room history off: a room index that keeps nothing.
const HISTORY_OFF: Limits = Limits {
    per_stream: 0,
    ttl_ms: 0,
    max_bytes: 0,
};

pub struct MemoryEngine {
    epoch: Epoch,
    /// The next position to hand out.
    next: Position,
    /// The id inboxes.
    pub(super) streams: Streams,
    /// Room history (`--room-history`; its `per_stream` is 0 when off): the same index with
    /// bounds of its own, so rooms and inboxes never evict each other's messages.
    pub(super) rooms: Streams,
    pub(super) dedup: Dedup,
    pub(super) ready: VecDeque<Completion>,
    /// With several workers (SPEC §14, `bus/`): the one position counter of the process, which
    /// every worker's engine draws from, so that positions stay unique across all streams
    /// (clients dedup by msg_id) and a `since` from any stream is judged against one high-water
    /// mark. `next` is then unused. None: this engine's own counter (one worker).
    shared: Option<Arc<AtomicU64>>,
}

/// What admitting a piece of work decided, before any durability.
pub(super) enum Admit {
    /// Taken at this position (and, for an append, put in the index).
    Stored(Position),
    /// The client id was seen before; the outcome is decided when the work completes, because
    /// the first attempt may still be in flight (see `duplicate`).
    Duplicate {
        sender: Rc<str>,
        client_id: Rc<str>,
    },
    Refused(Refusal),
}

impl MemoryEngine {
    /// A fresh engine: new epoch; positions start at the Unix time in µs-ish (ms x 1000), so they
    /// keep increasing across restarts in practice (unless a run averaged over 1,000 messages
    /// per millisecond). The file engine does better: it resumes from what it stored.
    ///
    /// Every position below the first one belongs to an earlier run, whose history this one
    /// does not have: the index starts with everything below it marked as lost, so a `since`
    /// from before the restart gets `recovered: false` even when the client sends no epoch.
    pub fn new(limits: Limits, dedup: Dedup, now: Now) -> Self {
        let mut streams = Streams::new(limits);
        let first = first_position(now).0;
        streams.forget_through(Position(first.saturating_sub(1)));
        let mut rooms = Streams::new(HISTORY_OFF);
        rooms.forget_through(streams.forgotten_through());
        MemoryEngine::resume(Epoch::random(), Position(0), streams, rooms, dedup, now)
    }

    /// Keeps room history within `limits` (SPEC §16, `--room-history`); a fresh engine keeps
    /// none. Whatever was kept before is dropped (call it before any publish).
    pub fn with_room_history(mut self, limits: Limits) -> Self {
        let mut rooms = Streams::new(limits);
        rooms.forget_through(self.rooms.forgotten_through());
        self.rooms = rooms;
        self
    }

    /// Is room history on?
    pub fn keeps_history(&self) -> bool {
        self.rooms.limits().per_stream > 0
    }

    /// The index that holds `stream`.
    fn index(&self, stream: &StreamId) -> &Streams {
        match stream {
            StreamId::Inbox(_) => &self.streams,
            StreamId::Room(_) => &self.rooms,
        }
    }

    /// The index that holds `stream`, to change it.
    pub(super) fn index_mut(&mut self, stream: &StreamId) -> &mut Streams {
        match stream {
            StreamId::Inbox(_) => &mut self.streams,
            StreamId::Room(_) => &mut self.rooms,
        }
    }

    /// Records which log segment holds the message at `position`, in whichever index (file
    /// engine). Returns its cost if it is still retained.
    pub(super) fn set_segment(&mut self, position: Position, segment: u64) -> Option<usize> {
        self.streams
            .set_segment(position, segment)
            .or_else(|| self.rooms.set_segment(position, segment))
    }

    /// An engine over existing state (the file engine after reading its log): positions resume
    /// above `high_water`, and never below the clock-based start.
    pub(super) fn resume(
        epoch: Epoch,
        high_water: Position,
        streams: Streams,
        rooms: Streams,
        dedup: Dedup,
        now: Now,
    ) -> Self {
        let floor = now.unix_ms.saturating_mul(1000);
        MemoryEngine {
            epoch,
            next: Position(high_water.0.saturating_add(1).max(floor)),
            streams,
            rooms,
            dedup,
            ready: VecDeque::new(),
            shared: None,
        }
    }

    /// One worker's engine among several (SPEC §14): every worker's engine has the same
    /// `epoch` and draws positions from the same `counter`, which started at `first` (the
    /// process's `first_position`: everything below it is from an earlier run, as in `new`).
    pub(super) fn for_worker(
        limits: Limits,
        dedup: Dedup,
        epoch: Epoch,
        (counter, first): (Arc<AtomicU64>, Position),
        now: Now,
    ) -> Self {
        let mut streams = Streams::new(limits);
        streams.forget_through(Position(first.0.saturating_sub(1)));
        let mut rooms = Streams::new(HISTORY_OFF);
        rooms.forget_through(streams.forgotten_through());
        let mut engine = MemoryEngine::resume(epoch, Position(0), streams, rooms, dedup, now);
        engine.shared = Some(counter);
        engine
    }

    /// Makes this engine (the file engine's index, after reading a worker's log) draw its
    /// positions from the process's `counter` (SPEC §14), raising the counter first to this
    /// engine's next position, so that no position of its log is handed out again. The caller
    /// lets no worker allocate before every worker's engine has done this (`bus::with_file`).
    pub(super) fn share_positions(&mut self, counter: Arc<AtomicU64>) {
        counter.fetch_max(self.next.0, Ordering::Relaxed);
        self.shared = Some(counter);
    }

    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// The highest position handed out so far.
    pub(super) fn high_water(&self) -> Position {
        let next = match &self.shared {
            Some(counter) => counter.load(Ordering::Relaxed),
            None => self.next.0,
        };
        Position(next.saturating_sub(1))
    }

    fn allocate(&mut self) -> Position {
        if let Some(counter) = &self.shared {
            return Position(counter.fetch_add(1, Ordering::Relaxed));
        }
        let p = self.next;
        self.next.0 += 1;
        p
    }

    /// The position an append would take. A shared counter hands it out at once (another
    /// worker could otherwise take it): a refused append then leaves a gap, which is allowed
    /// (positions are unique and increasing, not contiguous).
    fn next_for_append(&mut self) -> Position {
        match self.shared {
            Some(_) => self.allocate(),
            None => self.next,
        }
    }

    /// Decides an append: duplicate, refused, or stored in the index (pending) at a new position.
    /// What the bounds removed to make room goes into `gone`.
    pub(super) fn admit_append(&mut self, a: &Append, now: Now, gone: &mut Vec<Gone>) -> Admit {
        if let Some(admit) = self.seen(&a.sender, a.client_id.as_ref()) {
            return admit;
        }
        let position = self.next_for_append();
        match self
            .streams
            .append(&a.stream, position, Rc::clone(&a.body), now.unix_ms, gone)
        {
            Ok(()) => {
                if self.shared.is_none() {
                    self.allocate();
                }
                self.remember(
                    &a.sender,
                    a.client_id.as_deref(),
                    position,
                    AckStatus::Queued,
                );
                Admit::Stored(position)
            }
            Err(Refused::Disabled) => Admit::Refused(Refusal::Disabled),
            Err(Refused::Full) => Admit::Refused(Refusal::Full),
            Err(Refused::TooLarge) => Admit::Refused(Refusal::TooLarge),
        }
    }

    /// Decides a publish: duplicate, or a new position; with room history on (and `keep`),
    /// the message also enters its room's history, and what the bounds removed to make room
    /// goes into `gone`.
    pub(super) fn admit_publish(&mut self, p: &Publish, now: Now, gone: &mut Vec<Gone>) -> Admit {
        if let Some(admit) = self.seen(&p.sender, p.client_id.as_ref()) {
            return admit;
        }
        let position = self.allocate();
        if p.keep && self.keeps_history() {
            let room = StreamId::Room(Rc::clone(&p.room));
            self.rooms
                .keep(&room, position, Rc::clone(&p.body), now.unix_ms, gone);
        }
        self.remember(
            &p.sender,
            p.client_id.as_deref(),
            position,
            AckStatus::Delivered,
        );
        Admit::Stored(position)
    }

    /// Whether `admit_append` would refuse `a` now because its stream's oldest messages are
    /// still pending (`Refusal::Full`): not a duplicate, and the stream's bound says so. The
    /// workers' bus asks before it submits a direct message (`bus` module doc, "Bursts").
    pub(super) fn would_refuse_full(&self, a: &Append) -> bool {
        self.seen(&a.sender, a.client_id.as_ref()).is_none()
            && self.streams.refusal(&a.stream, a.body.len()) == Some(Refused::Full)
    }

    fn seen(&self, sender: &Rc<str>, client_id: Option<&Rc<str>>) -> Option<Admit> {
        let client_id = client_id?;
        let recorded = self.dedup.check(sender, client_id)?;
        // A first attempt whose store failed was rejected: a retry is a new message.
        (recorded.status != AckStatus::Rejected).then(|| Admit::Duplicate {
            sender: Rc::clone(sender),
            client_id: Rc::clone(client_id),
        })
    }

    pub(super) fn remember(
        &mut self,
        sender: &str,
        client_id: Option<&str>,
        position: Position,
        status: AckStatus,
    ) {
        if let Some(client_id) = client_id {
            let msg_id = MsgId(position.0);
            self.dedup
                .record(sender, client_id, Recorded { msg_id, status });
        }
    }

    /// The outcome of a duplicate, decided now that the first attempt has completed: the same
    /// position, and the status the message has now (a queued message may have been delivered
    /// since). If the first attempt failed, the duplicate fails too (the client may retry).
    pub(super) fn duplicate(&self, sender: &str, client_id: &str) -> Outcome {
        match self.dedup.check(sender, client_id) {
            Some(r) if r.status != AckStatus::Rejected => {
                let position = Position(r.msg_id.0);
                let status = match self.streams.get(position) {
                    Some(e) if e.pending => AckStatus::Queued,
                    Some(_) => AckStatus::Delivered,
                    None => r.status,
                };
                Outcome::Duplicate { position, status }
            }
            _ => Outcome::Rejected(Refusal::Store("the first attempt was not stored".into())),
        }
    }

    /// The answer to `recover`, with only positions up to `through` (what is stored).
    pub(super) fn recovery(
        &self,
        stream: &StreamId,
        since: Option<Since>,
        through: Position,
    ) -> Recovery {
        let other_epoch = since.is_some_and(|s| s.epoch.is_some_and(|e| e != self.epoch));
        // SPEC §13: a since from another epoch gets what is still there, and `false`.
        let from = since.map(|s| if other_epoch { Position(0) } else { s.position });
        let index = self.index(stream);
        let (messages, recovered) = index.replay(stream, from, through);
        // A position never handed out here comes from somewhere else: what followed it there
        // is not here.
        let unknown = since.is_some_and(|s| s.position > self.high_water());
        // SPEC §13: with room history off, nothing after a `since` was kept.
        let unkept =
            since.is_some() && matches!(stream, StreamId::Room(_)) && !self.keeps_history();
        Recovery {
            epoch: self.epoch,
            last: index.newest_through(stream, through),
            recovered: recovered && !other_epoch && !unknown && !unkept,
            messages,
        }
    }

    /// The answer to `history`, with only positions up to `through` (what is stored).
    /// `recovered` says whether the page holds every message after what the stream lost.
    pub(super) fn history_page(
        &self,
        stream: &StreamId,
        limit: usize,
        through: Position,
    ) -> Recovery {
        let index = self.index(stream);
        let messages = index.tail(stream, limit, through);
        let (all, complete) = index.replay(stream, Some(Position(0)), through);
        let recovered = complete && all.len() == messages.len();
        Recovery {
            epoch: self.epoch,
            last: index.newest_through(stream, through),
            recovered,
            messages,
        }
    }

    /// The snapshot of `Engine::stats`.
    pub(super) fn index_stats(&self, now_ms: u64) -> Stats {
        let s = &self.streams;
        Stats {
            streams: s.streams(),
            messages: s.messages(),
            bytes: s.bytes(),
            pending: s.pending(),
            removed: s.removed,
            expiring: s.expiring(now_ms),
            dedup_records: self.dedup.records(),
            dedup_bytes: self.dedup.bytes(),
            dedup_evicted: self.dedup.evicted(),
        }
    }

    /// Appends what every engine with this index reports: retained messages and what the bounds
    /// removed.
    pub(super) fn render_index(&self, kind: &str, in_flight: usize, out: &mut String) {
        let s = &self.streams;
        let mut w = Writer::new(out);
        w.family(
            "wsrelay_engine_info",
            "gauge",
            "The engine in use (SPEC §13).",
        );
        w.sample("wsrelay_engine_info", &[("kind", kind)], 1);
        w.gauge(
            "wsrelay_engine_streams",
            "Streams with at least one retained message.",
            s.streams(),
        );
        w.gauge(
            "wsrelay_engine_messages",
            "Messages retained in all streams.",
            s.messages(),
        );
        w.gauge(
            "wsrelay_engine_bytes",
            "Bytes retained in all streams (bodies plus bookkeeping).",
            s.bytes(),
        );
        w.gauge(
            "wsrelay_engine_pending_messages",
            "Retained messages not yet delivered to any connection.",
            s.pending(),
        );
        w.gauge(
            "wsrelay_engine_in_flight",
            "Work submitted to the engine and not yet completed (acks waiting for durability).",
            in_flight,
        );
        let Removed {
            expired_pending,
            expired_delivered,
            evicted_per_stream,
            dropped_global,
            evicted_global,
            dropped_on_restore,
        } = s.removed;
        w.family(
            "wsrelay_engine_removed_total",
            "counter",
            "Retained messages removed by a bound or the TTL, by reason and by whether they were still pending.",
        );
        for (reason, pending, n) in [
            ("ttl", "true", expired_pending),
            ("ttl", "false", expired_delivered),
            ("per_stream", "false", evicted_per_stream),
            ("global_bytes", "true", dropped_global),
            ("global_bytes", "false", evicted_global),
            ("restore", "unknown", dropped_on_restore),
        ] {
            w.sample(
                "wsrelay_engine_removed_total",
                &[("reason", reason), ("pending", pending)],
                n,
            );
        }
        self.render_history(&mut w);
    }
}

impl MemoryEngine {
    /// Room history's own figures (SPEC §16): what it holds and what its bounds removed.
    fn render_history(&self, w: &mut Writer<'_>) {
        let r = &self.rooms;
        let limits = r.limits();
        w.gauge(
            "wsrelay_room_history_limit",
            "Messages kept per room (--room-history; 0: history off).",
            limits.per_stream,
        );
        w.gauge(
            "wsrelay_room_history_rooms",
            "Rooms with at least one message in their history.",
            r.streams(),
        );
        w.gauge(
            "wsrelay_room_history_messages",
            "Messages kept in all rooms' history.",
            r.messages(),
        );
        w.gauge(
            "wsrelay_room_history_bytes",
            "Bytes kept in all rooms' history (bodies plus bookkeeping; bound: --room-history-max-bytes).",
            r.bytes(),
        );
        let removed = r.removed;
        w.family(
            "wsrelay_room_history_removed_total",
            "counter",
            "Messages removed from room history, by reason (ttl: --room-history-ttl; per_room: --room-history; global_bytes: --room-history-max-bytes; restore: bounds shrank across a restart).",
        );
        for (reason, n) in [
            ("ttl", removed.expired_delivered + removed.expired_pending),
            ("per_room", removed.evicted_per_stream),
            (
                "global_bytes",
                removed.evicted_global + removed.dropped_global,
            ),
            ("restore", removed.dropped_on_restore),
        ] {
            w.sample(
                "wsrelay_room_history_removed_total",
                &[("reason", reason)],
                n,
            );
        }
    }
}

/// Where a fresh run's positions start: the Unix time in ms x 1000 (see `MemoryEngine::new`).
pub(super) fn first_position(now: Now) -> Position {
    Position(now.unix_ms.saturating_mul(1000))
}

impl Engine for MemoryEngine {
    fn kind(&self) -> &'static str {
        "memory"
    }

    fn epoch(&self) -> Epoch {
        self.epoch
    }

    fn append(&mut self, ticket: Ticket, append: Append, now: Now) {
        let outcome = match self.admit_append(&append, now, &mut Vec::new()) {
            Admit::Stored(position) => Outcome::Stored { position },
            Admit::Duplicate { sender, client_id } => self.duplicate(&sender, &client_id),
            Admit::Refused(r) => Outcome::Rejected(r),
        };
        self.ready.push_back(Completion { ticket, outcome });
    }

    fn publish(&mut self, ticket: Ticket, publish: Publish, now: Now) {
        let outcome = match self.admit_publish(&publish, now, &mut Vec::new()) {
            Admit::Stored(position) => Outcome::Stored { position },
            Admit::Duplicate { sender, client_id } => self.duplicate(&sender, &client_id),
            Admit::Refused(r) => Outcome::Rejected(r),
        };
        self.ready.push_back(Completion { ticket, outcome });
    }

    fn recover(&mut self, ticket: Ticket, stream: &StreamId, since: Option<Since>, _now: Now) {
        let recovery = self.recovery(stream, since, Position(u64::MAX));
        self.ready.push_back(Completion {
            ticket,
            outcome: Outcome::Recovered(recovery),
        });
    }

    fn history(&mut self, ticket: Ticket, stream: &StreamId, limit: usize, _now: Now) {
        let page = self.history_page(stream, limit, Position(u64::MAX));
        self.ready.push_back(Completion {
            ticket,
            outcome: Outcome::Recovered(page),
        });
    }

    fn delivered(&mut self, stream: &StreamId, positions: &[Position]) {
        self.index_mut(stream).mark_delivered(stream, positions);
    }

    fn acked(&mut self, sender: &str, client_id: &str, position: Position, status: AckStatus) {
        self.remember(sender, Some(client_id), position, status);
    }

    fn online(&mut self, sender: &str) {
        self.dedup.active(sender);
    }

    fn offline(&mut self, sender: &Rc<str>, now: Now) {
        self.dedup.idle(sender, now.instant);
    }

    fn stats(&self, now_ms: u64) -> Stats {
        self.index_stats(now_ms)
    }

    fn maintain(&mut self, now: Now) {
        self.streams.expire(now.unix_ms, &mut Vec::new());
        self.rooms.expire(now.unix_ms, &mut Vec::new());
        self.dedup.sweep(now.instant);
    }

    fn poll(&mut self, out: &mut Vec<Event>) {
        out.extend(self.ready.drain(..).map(Event::Completed));
    }

    fn in_flight(&self) -> usize {
        0
    }

    fn render_metrics(&self, out: &mut String) {
        self.render_index(self.kind(), self.in_flight(), out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    pub(crate) fn now(unix_ms: u64) -> Now {
        Now {
            instant: Instant::now(),
            unix_ms,
        }
    }

    fn engine() -> MemoryEngine {
        engine_at(1_000)
    }

    fn engine_at(unix_ms: u64) -> MemoryEngine {
        let limits = Limits {
            per_stream: 3,
            ttl_ms: 60_000,
            max_bytes: 1 << 20,
        };
        MemoryEngine::new(
            limits,
            Dedup::new(16, std::time::Duration::from_secs(60), 64 << 20),
            now(unix_ms),
        )
    }

    fn append(to: &str, client_id: Option<&str>) -> Append {
        Append {
            stream: StreamId::inbox(to),
            sender: Rc::from("alice"),
            client_id: client_id.map(Rc::from),
            body: Rc::from(&b"{}"[..]),
        }
    }

    fn one(e: &mut MemoryEngine) -> Outcome {
        let mut out = Vec::new();
        e.poll(&mut out);
        assert_eq!(out.len(), 1);
        match out.pop() {
            Some(Event::Completed(c)) => c.outcome,
            other => panic!("expected one completion, got {other:?}"),
        }
    }

    fn stored(e: &mut MemoryEngine) -> Position {
        match one(e) {
            Outcome::Stored { position } => position,
            other => panic!("expected Stored, got {other:?}"),
        }
    }

    #[test]
    fn completes_at_once_with_increasing_positions_above_the_clock() {
        let mut e = engine();
        e.append(Ticket(1), append("bob", None), now(1_000));
        let a = stored(&mut e);
        e.publish(
            Ticket(2),
            Publish {
                room: Rc::from("lobby"),
                sender: Rc::from("alice"),
                client_id: None,
                body: Rc::from(&b"{}"[..]),
                keep: true,
            },
            now(1_000),
        );
        let b = stored(&mut e);
        assert!(a >= Position(1_000_000) && b > a);
        assert_eq!(e.in_flight(), 0);
    }

    #[test]
    fn duplicates_get_the_first_position_and_the_current_status() {
        let mut e = engine();
        e.append(Ticket(1), append("bob", Some("c1")), now(1_000));
        let first = stored(&mut e);
        e.append(Ticket(2), append("bob", Some("c1")), now(1_000));
        assert!(matches!(
            one(&mut e),
            Outcome::Duplicate { position, status: AckStatus::Queued } if position == first
        ));
        e.delivered(&StreamId::inbox("bob"), &[first]);
        e.append(Ticket(3), append("bob", Some("c1")), now(1_000));
        assert!(matches!(
            one(&mut e),
            Outcome::Duplicate {
                status: AckStatus::Delivered,
                ..
            }
        ));
        assert_eq!(e.streams.messages(), 1, "not stored twice");
    }

    #[test]
    fn recovery_says_whether_it_is_complete() {
        let mut e = engine();
        let bob = StreamId::inbox("bob");
        let mut positions = Vec::new();
        for _ in 0..3 {
            e.append(Ticket(0), append("bob", None), now(1_000));
            positions.push(stored(&mut e));
        }
        e.delivered(&bob, &positions);
        let since = |position, epoch| Some(Since { position, epoch });

        e.recover(
            Ticket(1),
            &bob,
            since(positions[0], Some(e.epoch())),
            now(1_000),
        );
        let Outcome::Recovered(r) = one(&mut e) else {
            panic!()
        };
        assert!(r.recovered);
        assert_eq!(r.messages.len(), 2);
        assert_eq!(r.last, Some(positions[2]));

        // Another epoch: whatever is there, and `false`.
        e.recover(
            Ticket(2),
            &bob,
            since(positions[2], Some(Epoch(1))),
            now(1_000),
        );
        let Outcome::Recovered(r) = one(&mut e) else {
            panic!()
        };
        assert!(!r.recovered);
        assert_eq!(r.messages.len(), 3);

        // Older than what is retained: the per-stream bound evicted the first.
        e.append(Ticket(0), append("bob", None), now(1_000));
        stored(&mut e);
        e.recover(Ticket(3), &bob, since(Position(0), None), now(1_000));
        let Outcome::Recovered(r) = one(&mut e) else {
            panic!()
        };
        assert!(!r.recovered);
        assert_eq!(r.messages.len(), 3);
    }

    fn room(keep: bool) -> Publish {
        Publish {
            room: Rc::from("lobby"),
            sender: Rc::from("alice"),
            client_id: None,
            body: Rc::from(&b"{}"[..]),
            keep,
        }
    }

    #[test]
    fn room_history_has_bounds_of_its_own() {
        let history = Limits {
            per_stream: 2,
            ttl_ms: 60_000,
            max_bytes: 1 << 20,
        };
        let mut e = engine().with_room_history(history);
        let lobby = StreamId::room("lobby");
        // Three pending direct messages fill bob's inbox (per_stream 3); a busy room beside
        // it evicts only its own history.
        for _ in 0..3 {
            e.append(Ticket(0), append("bob", None), now(1_000));
            stored(&mut e);
        }
        let mut rooms = Vec::new();
        for _ in 0..5 {
            e.publish(Ticket(0), room(true), now(1_000));
            rooms.push(stored(&mut e));
        }
        assert_eq!(e.streams.pending(), 3);
        assert_eq!(e.rooms.messages(), 2);
        // Not kept: what only needs a position.
        e.publish(Ticket(0), room(false), now(1_000));
        stored(&mut e);
        assert_eq!(e.rooms.messages(), 2);

        e.history(Ticket(1), &lobby, 10, now(1_000));
        let Outcome::Recovered(page) = one(&mut e) else {
            panic!()
        };
        let got: Vec<Position> = page.messages.iter().map(|m| m.position).collect();
        assert_eq!(got, rooms[3..]);
        assert_eq!(page.last, Some(rooms[4]));
        assert!(!page.recovered, "older ones were evicted");

        let epoch = e.epoch();
        let since = |position| {
            Some(Since {
                position,
                epoch: Some(epoch),
            })
        };
        e.recover(Ticket(2), &lobby, since(rooms[3]), now(1_000));
        let Outcome::Recovered(r) = one(&mut e) else {
            panic!()
        };
        assert!(r.recovered);
        assert_eq!(r.messages.len(), 1);
        e.recover(Ticket(3), &lobby, since(rooms[1]), now(1_000));
        let Outcome::Recovered(r) = one(&mut e) else {
            panic!()
        };
        assert!(!r.recovered);

        // The history's TTL.
        e.maintain(now(1_000 + 60_000));
        assert_eq!(e.rooms.messages(), 0);
        assert_eq!(e.rooms.removed.expired_delivered, 2);
    }

    #[test]
    fn with_history_off_a_room_since_is_never_recovered() {
        let mut e = engine();
        e.publish(Ticket(0), room(true), now(1_000));
        let p = stored(&mut e);
        let since = Some(Since {
            position: p,
            epoch: Some(e.epoch()),
        });
        e.recover(Ticket(1), &StreamId::room("lobby"), since, now(1_000));
        let Outcome::Recovered(r) = one(&mut e) else {
            panic!()
        };
        assert!(!r.recovered);
        assert!(r.messages.is_empty());
        assert_eq!(r.last, None);
    }

    #[test]
    fn a_restart_is_a_new_epoch_and_positions_keep_increasing() {
        let mut first = engine();
        first.append(Ticket(1), append("bob", None), now(1_000));
        let before = stored(&mut first);
        // One second later: the clock-based start is above everything the first run handed
        // out at under 1,000 messages per millisecond.
        let mut second = engine_at(2_000);
        assert_ne!(first.epoch(), second.epoch());
        second.append(Ticket(1), append("bob", None), now(2_000));
        assert!(stored(&mut second) > before);
    }
}
