//! Duplicate suppression: the last client message ids of each sender, with the ack each got.
//!
//! Owns: `Dedup`, a window per sender id, the forgetting of idle senders, the memory bound over
//! all windows (`--dedup-max-bytes`) and the count of what that bound evicted.
//! Does not: decide what a duplicate gets (the hub re-sends the recorded ack), or read a clock.
//!
//! Implements the duplicate rule of SPEC §6 as docs/protocol.md ("Duplicates") promises it: a
//! client that re-sends a message with the same `id` (typically after a reconnect, not knowing
//! whether the first try arrived) gets the same ack again and the message is not delivered a
//! second time.
//!
//! What is kept, and the bounds:
//! * per sender, its `capacity` most recent client ids (older ones are forgotten first in,
//!   first out);
//! * for as long as the sender has a connection, and `idle_ttl` after its last one closed (the
//!   same horizon as the offline queue), then its window is dropped;
//! * over all senders, at most `max_bytes` (each remembered id costs its length plus
//!   `RECORD_OVERHEAD_BYTES`, each window `WINDOW_OVERHEAD_BYTES` plus the sender's id). Beyond
//!   it the oldest remembered ids of all senders go first, whoever sent them, and are counted
//!   (`evicted`): that is the one way an id is forgotten before the two rules above say so.
//!   Without auth, ids are free, so nothing else would bound what departed senders pin.
//!
//! How eviction stays cheap (like `engine/streams.rs`): every record gets a sequence number;
//! a single FIFO (`records`) lists every record oldest first. The byte bound pops the FIFO's
//! front; the per-sender bound and the idle TTL remove records from their windows directly and
//! leave their FIFO entries behind as "stale", recognised later because a window's live
//! records are exactly those from its front's sequence number on. Stale entries are compacted
//! away once they outnumber live ones, so the FIFO stays O(records).
//!
//! Invariants: every window holds at least one record, in sequence order; `records_len` and
//! `bytes` are the sums over all windows; `records.len() == records_len + stale`; a window has
//! at most one live entry in the idle queue (one whose generation is the window's).

use super::envelope::{AckStatus, MsgId};
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Approximate bytes of memory per remembered client id besides the id's own bytes: the map
/// entry and its share of the table's spare room, the two queue entries, the reference-count
/// header of the shared id, allocator rounding. Measured, not derived: 400 senders that each
/// publish 256 messages with ids of 2-4 bytes and leave grew the server's RSS by 161 bytes per
/// remembered id, against 164 counted.
pub const RECORD_OVERHEAD_BYTES: usize = 160;

/// Approximate bytes per sender with a window, besides its id: the map entry, the window's own
/// map and queue headers, the idle-queue entry.
pub const WINDOW_OVERHEAD_BYTES: usize = 192;

/// The ack a client id got the first time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Recorded {
    pub msg_id: MsgId,
    pub status: AckStatus,
}

struct Window {
    /// The remembered client ids, oldest first, with their sequence numbers.
    order: VecDeque<(u64, Rc<str>)>,
    acks: HashMap<Rc<str>, Recorded>,
    /// Set while the sender has no connection: when that began.
    idle_since: Option<Instant>,
    /// Whether the idle queue holds a live entry for this window.
    queued: bool,
    /// Tells this window's idle-queue entries from those of an earlier window of the same
    /// sender that was dropped (the sequence number current when it was created).
    generation: u64,
}

impl Window {
    fn new(generation: u64) -> Window {
        Window {
            order: VecDeque::new(),
            acks: HashMap::new(),
            idle_since: None,
            queued: false,
            generation,
        }
    }
}

pub struct Dedup {
    capacity: usize,
    idle_ttl: Duration,
    max_bytes: usize,
    windows: HashMap<Rc<str>, Window>,
    /// Every record oldest first (sequence number, sender), plus `stale` leftovers.
    records: VecDeque<(u64, Rc<str>)>,
    stale: usize,
    /// Records held, and the bytes they and their windows count for.
    records_len: usize,
    bytes: usize,
    next_seq: u64,
    /// Senders that went idle, oldest first: (when, who, window generation). Checked against
    /// the window when due, since the sender may have come back (and left again) meanwhile.
    idle: VecDeque<(Instant, Rc<str>, u64)>,
    /// Records forgotten early to stay within `max_bytes`.
    evicted: u64,
}

impl Dedup {
    pub fn new(capacity: usize, idle_ttl: Duration, max_bytes: usize) -> Dedup {
        Dedup {
            capacity,
            idle_ttl,
            max_bytes,
            windows: HashMap::new(),
            records: VecDeque::new(),
            stale: 0,
            records_len: 0,
            bytes: 0,
            next_seq: 0,
            idle: VecDeque::new(),
            evicted: 0,
        }
    }

    /// The ack recorded for `client_id` from `sender`, if it is remembered.
    pub fn check(&self, sender: &str, client_id: &str) -> Option<Recorded> {
        self.windows.get(sender)?.acks.get(client_id).copied()
    }

    /// Remembers the ack of a new client id, forgetting the sender's oldest beyond `capacity`
    /// and the oldest of all beyond `max_bytes`.
    pub fn record(&mut self, sender: &str, client_id: &str, ack: Recorded) {
        if self.capacity == 0 || self.max_bytes == 0 {
            return;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let sender: Rc<str> = match self.windows.get_key_value(sender) {
            Some((key, _)) => Rc::clone(key),
            None => {
                let key: Rc<str> = Rc::from(sender);
                self.windows.insert(Rc::clone(&key), Window::new(seq));
                self.bytes += window_cost(&key);
                key
            }
        };
        let Some(window) = self.windows.get_mut(&sender) else {
            return;
        };
        if let Some(recorded) = window.acks.get_mut(client_id) {
            // Only accepted messages are recorded, and a remembered id is answered as a
            // duplicate before it is accepted again; kept right if that ever changes.
            *recorded = ack;
            return;
        }
        let key: Rc<str> = Rc::from(client_id);
        window.acks.insert(Rc::clone(&key), ack);
        window.order.push_back((seq, key));
        self.records.push_back((seq, Rc::clone(&sender)));
        self.records_len += 1;
        self.bytes += record_cost(client_id);
        while window.order.len() > self.capacity {
            let Some((_, old)) = window.order.pop_front() else {
                break;
            };
            window.acks.remove(&old);
            self.records_len -= 1;
            self.bytes -= record_cost(&old);
            self.stale += 1;
        }
        while self.bytes > self.max_bytes && self.evict_oldest() {}
        self.compact();
    }

    /// The sender has a connection again: keep its window.
    pub fn active(&mut self, sender: &str) {
        if let Some(w) = self.windows.get_mut(sender) {
            w.idle_since = None;
        }
    }

    /// The sender's last connection closed at `now`.
    pub fn idle(&mut self, sender: &Rc<str>, now: Instant) {
        let Some(w) = self.windows.get_mut(&**sender) else {
            return;
        };
        w.idle_since = Some(now);
        if !w.queued {
            w.queued = true;
            self.idle.push_back((now, Rc::clone(sender), w.generation));
            self.compact_idle();
        }
    }

    /// Drops the windows of senders idle for `idle_ttl` or more.
    pub fn sweep(&mut self, now: Instant) {
        while let Some((since, _, _)) = self.idle.front() {
            if now.saturating_duration_since(*since) < self.idle_ttl {
                break;
            }
            if let Some((_, sender, generation)) = self.idle.pop_front() {
                self.settle(sender, generation, now);
            }
        }
    }

    /// Decides the fate of a window whose idle-queue entry came up: dropped if still idle for
    /// `idle_ttl`; queued again if its sender came back and left since; kept, unqueued, if its
    /// sender is connected. An entry of a window that is gone (evicted) is ignored.
    fn settle(&mut self, sender: Rc<str>, generation: u64, now: Instant) {
        let Some(w) = self.windows.get_mut(&sender) else {
            return;
        };
        if w.generation != generation {
            return;
        }
        match w.idle_since {
            None => w.queued = false,
            Some(since) if now.saturating_duration_since(since) < self.idle_ttl => {
                // Left again after the entry was made: wait for the new idle period.
                self.idle.push_back((since, sender, generation));
            }
            Some(_) => self.drop_window(&sender),
        }
    }

    /// Forgets a whole window; its FIFO entries become stale.
    fn drop_window(&mut self, sender: &Rc<str>) {
        let Some(w) = self.windows.remove(sender) else {
            return;
        };
        for (_, client_id) in &w.order {
            self.bytes -= record_cost(client_id);
        }
        self.records_len -= w.order.len();
        self.stale += w.order.len();
        self.bytes -= window_cost(sender);
        self.compact();
    }

    /// Forgets the oldest record of all (counted), and its window if that was the last one.
    /// Returns false if there is none.
    fn evict_oldest(&mut self) -> bool {
        while let Some((seq, sender)) = self.records.pop_front() {
            let Some(w) = self.windows.get_mut(&sender) else {
                self.stale -= 1;
                continue;
            };
            if w.order.front().is_none_or(|&(front, _)| front != seq) {
                self.stale -= 1;
                continue;
            }
            if let Some((_, client_id)) = w.order.pop_front() {
                w.acks.remove(&client_id);
                self.bytes -= record_cost(&client_id);
            }
            self.records_len -= 1;
            self.evicted += 1;
            if w.order.is_empty() {
                // Its idle-queue entry, if any, is recognised as dead by its generation.
                self.windows.remove(&sender);
                self.bytes -= window_cost(&sender);
            }
            return true;
        }
        false
    }

    /// Drops stale FIFO entries once they outnumber live ones (amortised O(1) per removal).
    fn compact(&mut self) {
        if self.stale <= self.records_len.max(64) {
            return;
        }
        let windows = &self.windows;
        self.records.retain(|(seq, sender)| {
            windows
                .get(sender)
                .and_then(|w| w.order.front())
                .is_some_and(|&(front, _)| *seq >= front)
        });
        self.stale = 0;
    }

    /// Drops dead idle-queue entries (of evicted windows) once they outnumber live ones: a
    /// window has at most one live entry, so the queue stays O(windows).
    fn compact_idle(&mut self) {
        if self.idle.len() <= 2 * self.windows.len() + 64 {
            return;
        }
        let windows = &self.windows;
        self.idle.retain(|(_, sender, generation)| {
            windows
                .get(sender)
                .is_some_and(|w| w.generation == *generation)
        });
    }

    /// Client ids remembered now, over all senders.
    pub fn records(&self) -> usize {
        self.records_len
    }

    /// Bytes counted against `max_bytes` now.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Client ids forgotten early to stay within `max_bytes`, since start.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    /// Senders with a window.
    pub fn senders(&self) -> usize {
        self.windows.len()
    }

    #[cfg(test)]
    fn check_invariants(&self) {
        let mut records = 0;
        let mut bytes = 0;
        for (sender, w) in &self.windows {
            assert!(!w.order.is_empty(), "{sender} has an empty window");
            assert!(w
                .order
                .iter()
                .zip(w.order.iter().skip(1))
                .all(|(a, b)| a.0 < b.0));
            assert_eq!(w.order.len(), w.acks.len());
            records += w.order.len();
            bytes +=
                window_cost(sender) + w.order.iter().map(|(_, id)| record_cost(id)).sum::<usize>();
            let live = self
                .idle
                .iter()
                .filter(|(_, s, g)| s == sender && *g == w.generation)
                .count();
            assert!(live <= 1, "{sender} has {live} live idle entries");
        }
        assert_eq!((self.records_len, self.bytes), (records, bytes));
        assert_eq!(self.records.len(), self.records_len + self.stale);
        assert!(self.bytes <= self.max_bytes || self.records_len == 0);
    }
}

fn record_cost(client_id: &str) -> usize {
    RECORD_OVERHEAD_BYTES + client_id.len()
}

fn window_cost(sender: &str) -> usize {
    WINDOW_OVERHEAD_BYTES + sender.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    const UNBOUNDED: usize = usize::MAX;

    fn ack(n: u64) -> Recorded {
        Recorded {
            msg_id: MsgId(n),
            status: AckStatus::Delivered,
        }
    }

    #[test]
    fn window_is_per_sender_and_bounded() {
        let mut d = Dedup::new(2, Duration::from_secs(60), UNBOUNDED);
        d.record("alice", "c1", ack(1));
        d.record("bob", "c1", ack(2));
        assert_eq!(d.check("alice", "c1"), Some(ack(1)));
        assert_eq!(d.check("bob", "c1"), Some(ack(2)));
        assert_eq!(d.check("carol", "c1"), None);
        d.record("alice", "c2", ack(3));
        d.record("alice", "c3", ack(4));
        assert_eq!(
            d.check("alice", "c1"),
            None,
            "oldest forgotten beyond capacity"
        );
        assert_eq!(d.check("alice", "c3"), Some(ack(4)));
        assert_eq!(d.records(), 3);
        assert_eq!(d.evicted(), 0, "the per-sender window is not an eviction");
        d.check_invariants();
    }

    #[test]
    fn idle_senders_are_forgotten_after_the_ttl_unless_they_return() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(60);
        let mut d = Dedup::new(8, ttl, UNBOUNDED);
        let (alice, bob): (Rc<str>, Rc<str>) = (Rc::from("alice"), Rc::from("bob"));
        d.record("alice", "c1", ack(1));
        d.record("bob", "c1", ack(2));
        d.idle(&alice, t0);
        d.idle(&bob, t0);
        d.active("bob"); // bob reconnected
        d.sweep(t0 + ttl - Duration::from_millis(1));
        assert_eq!(d.senders(), 2);
        d.sweep(t0 + ttl);
        assert_eq!(d.check("alice", "c1"), None);
        assert_eq!(d.check("bob", "c1"), Some(ack(2)));

        // Leaves again later: the earlier idle entry must not cut the new idle period short.
        d.idle(&bob, t0 + ttl);
        d.sweep(t0 + ttl + Duration::from_secs(1));
        assert_eq!(d.senders(), 1);
        d.sweep(t0 + ttl + ttl);
        assert_eq!(d.senders(), 0);
        assert_eq!((d.records(), d.bytes(), d.evicted()), (0, 0, 0));
        d.check_invariants();
    }

    #[test]
    fn many_idle_senders_are_all_kept_within_the_byte_bound() {
        // The promise of docs/protocol.md: however many senders went idle, a window is kept for
        // the TTL as long as the byte bound allows.
        let t0 = Instant::now();
        let mut d = Dedup::new(256, Duration::from_secs(3600), 64 << 20);
        for i in 0..10_000 {
            let id: Rc<str> = Rc::from(format!("id{i}"));
            d.record(&id, "c1", ack(i));
            d.idle(&id, t0);
        }
        assert_eq!(d.senders(), 10_000);
        assert_eq!(d.check("id0", "c1"), Some(ack(0)));
        assert_eq!(d.evicted(), 0);
        d.check_invariants();
    }

    #[test]
    fn the_byte_bound_evicts_the_oldest_records_of_all_and_counts_them() {
        let each = |id: &str| record_cost("c00") + window_cost(id);
        // Room for three senders with one record each.
        let bound = each("a") + each("b") + each("c");
        let mut d = Dedup::new(8, Duration::from_secs(60), bound);
        d.record("a", "c00", ack(1));
        d.record("b", "c00", ack(2));
        d.record("c", "c00", ack(3));
        assert_eq!((d.bytes(), d.evicted()), (bound, 0));
        d.record("d", "c00", ack(4));
        assert_eq!(d.check("a", "c00"), None, "the oldest of all went first");
        assert_eq!(d.senders(), 3, "with its window, now empty");
        assert_eq!(d.evicted(), 1);
        assert!(d.bytes() <= bound);
        // A second record of b costs one record more: the oldest (b's first) goes.
        d.record("b", "c01", ack(5));
        assert_eq!(d.check("b", "c00"), None);
        assert_eq!(d.check("b", "c01"), Some(ack(5)));
        assert_eq!(d.evicted(), 2);
        d.check_invariants();
        // A bound smaller than one record keeps nothing, and counts it.
        let mut tiny = Dedup::new(8, Duration::from_secs(60), 10);
        tiny.record("a", "c1", ack(1));
        assert_eq!((tiny.records(), tiny.bytes(), tiny.senders()), (0, 0, 0));
        assert_eq!(tiny.evicted(), 1);
        tiny.check_invariants();
    }

    #[test]
    fn an_evicted_window_that_comes_back_has_one_live_idle_entry() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(60);
        let bound = record_cost("c1") + window_cost("alice");
        let mut d = Dedup::new(8, ttl, bound);
        let (alice, bob): (Rc<str>, Rc<str>) = (Rc::from("alice"), Rc::from("bob"));
        d.record("alice", "c1", ack(1));
        d.idle(&alice, t0);
        d.record("bob", "c1", ack(2)); // evicts alice's window, idle entry and all
        assert_eq!(d.check("alice", "c1"), None);
        d.active("bob");
        d.idle(&bob, t0);
        // alice is back with a new window, then leaves again later.
        d.record("alice", "c2", ack(3));
        d.idle(&alice, t0 + Duration::from_secs(30));
        d.check_invariants();
        // At t0 + ttl the dead entry comes up first: it must not drop the new window early.
        d.sweep(t0 + ttl);
        assert_eq!(d.check("alice", "c2"), Some(ack(3)));
        d.sweep(t0 + ttl + Duration::from_secs(30));
        assert_eq!(d.check("alice", "c2"), None, "dropped at its own TTL");
        d.check_invariants();
    }

    #[test]
    fn reconnect_loops_queue_once_and_stale_entries_are_compacted() {
        let t0 = Instant::now();
        let mut d = Dedup::new(4, Duration::from_secs(3600), UNBOUNDED);
        let alice: Rc<str> = Rc::from("alice");
        d.record("alice", "c0", ack(0));
        for i in 0..1000 {
            d.active("alice");
            d.idle(&alice, t0 + Duration::from_millis(i));
        }
        assert_eq!(d.idle.len(), 1, "one queue entry, not one per disconnect");
        for n in 1..10_000 {
            d.record("alice", &format!("c{n}"), ack(n));
        }
        assert_eq!(d.records(), 4);
        assert!(d.records.len() <= 4 + 65, "FIFO holds {}", d.records.len());
        d.check_invariants();
    }
}
