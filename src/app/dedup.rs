//! Duplicate suppression: the last client message ids of each sender, with the ack each got.
//!
//! Owns: `Dedup`, a bounded window per sender id, and the forgetting of idle senders.
//! Does not: decide what a duplicate gets (the hub re-sends the recorded ack), or read a clock.
//!
//! Implements the duplicate rule of SPEC §6 (docs/protocol.md "Duplicates"): a client that re-sends a message
//! with the same `id` (typically after a reconnect, not knowing whether the first try arrived)
//! gets the same ack again and the message is not delivered a second time.
//!
//! Bounds: each sender keeps its `capacity` most recent client ids (older ones are forgotten
//! first in, first out). A sender's window is kept while it has connections and for `idle_ttl`
//! after its last one closed (the same horizon as the offline queue), then dropped. Senders
//! with connections are bounded by the connection limit; idle ones are not (without auth, ids
//! are free), so at most `MAX_IDLE_WINDOWS` idle windows are kept: beyond that the one idle the
//! longest is forgotten early. Each window has at most one entry in the idle queue. Memory is
//! therefore bounded by (connected senders + `MAX_IDLE_WINDOWS`) times `capacity`.

use super::envelope::{AckStatus, MsgId};
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Idle senders whose windows are kept at most. A sender that reconnects within minutes (the
/// case duplicate suppression exists for) is almost always among the most recent ones.
pub const MAX_IDLE_WINDOWS: usize = 4096;

/// The ack a client id got the first time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Recorded {
    pub msg_id: MsgId,
    pub status: AckStatus,
}

#[derive(Default)]
struct Window {
    order: VecDeque<Rc<str>>,
    acks: HashMap<Rc<str>, Recorded>,
    /// Set while the sender has no connection: when that began.
    idle_since: Option<Instant>,
    /// Whether the idle queue holds an entry for this sender (at most one).
    queued: bool,
}

pub struct Dedup {
    capacity: usize,
    idle_ttl: Duration,
    windows: HashMap<Rc<str>, Window>,
    /// Senders that went idle, oldest first: (when, who). Checked against `idle_since` when
    /// due, since the sender may have come back (and left again) meanwhile.
    idle: VecDeque<(Instant, Rc<str>)>,
    /// Windows whose sender has no connection now.
    idle_windows: usize,
}

impl Dedup {
    pub fn new(capacity: usize, idle_ttl: Duration) -> Dedup {
        Dedup {
            capacity,
            idle_ttl,
            windows: HashMap::new(),
            idle: VecDeque::new(),
            idle_windows: 0,
        }
    }

    /// The ack recorded for `client_id` from `sender`, if it is in the window.
    pub fn check(&self, sender: &str, client_id: &str) -> Option<Recorded> {
        self.windows.get(sender)?.acks.get(client_id).copied()
    }

    /// Remembers the ack of a new client id, forgetting the sender's oldest beyond `capacity`.
    pub fn record(&mut self, sender: &str, client_id: &str, ack: Recorded) {
        if self.capacity == 0 {
            return;
        }
        let window = match self.windows.get_mut(sender) {
            Some(w) => w,
            None => self.windows.entry(Rc::from(sender)).or_default(),
        };
        let key: Rc<str> = Rc::from(client_id);
        if window.acks.insert(Rc::clone(&key), ack).is_none() {
            window.order.push_back(key);
        }
        while window.order.len() > self.capacity {
            if let Some(old) = window.order.pop_front() {
                window.acks.remove(&old);
            }
        }
    }

    /// The sender has a connection again: keep its window.
    pub fn active(&mut self, sender: &str) {
        if let Some(w) = self.windows.get_mut(sender) {
            if w.idle_since.take().is_some() {
                self.idle_windows -= 1;
            }
        }
    }

    /// The sender's last connection closed at `now`.
    pub fn idle(&mut self, sender: &Rc<str>, now: Instant) {
        let Some(w) = self.windows.get_mut(&**sender) else {
            return;
        };
        if w.idle_since.is_none() {
            self.idle_windows += 1;
        }
        w.idle_since = Some(now);
        if !w.queued {
            w.queued = true;
            self.idle.push_back((now, Rc::clone(sender)));
        }
        // Too many idle windows: forget the ones idle the longest, before their time.
        while self.idle_windows > MAX_IDLE_WINDOWS {
            let Some((_, oldest)) = self.idle.pop_front() else {
                break;
            };
            self.settle(oldest, None);
        }
    }

    /// Drops the windows of senders idle for `idle_ttl` or more.
    pub fn sweep(&mut self, now: Instant) {
        while let Some((since, _)) = self.idle.front() {
            if now.saturating_duration_since(*since) < self.idle_ttl {
                break;
            }
            if let Some((_, sender)) = self.idle.pop_front() {
                self.settle(sender, Some(now));
            }
        }
    }

    /// Decides the fate of a sender whose idle-queue entry came up: forgotten if still idle (and,
    /// when `now` is given, idle for `idle_ttl`); queued again if it came back and left since;
    /// kept, unqueued, if it is connected.
    fn settle(&mut self, sender: Rc<str>, now: Option<Instant>) {
        let Some(w) = self.windows.get_mut(&sender) else {
            return;
        };
        match (w.idle_since, now) {
            (None, _) => w.queued = false,
            (Some(since), Some(now)) if now.saturating_duration_since(since) < self.idle_ttl => {
                // Left again after the entry was made: wait for the new idle period.
                self.idle.push_back((since, sender));
            }
            (Some(_), _) => {
                self.windows.remove(&sender);
                self.idle_windows -= 1;
            }
        }
    }

    /// Windows of senders that have no connection now, for tests.
    pub fn idle_senders(&self) -> usize {
        self.idle_windows
    }

    /// Senders with a window, for tests and /metrics.
    pub fn senders(&self) -> usize {
        self.windows.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack(n: u64) -> Recorded {
        Recorded {
            msg_id: MsgId(n),
            status: AckStatus::Delivered,
        }
    }

    #[test]
    fn window_is_per_sender_and_bounded() {
        let mut d = Dedup::new(2, Duration::from_secs(60));
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
    }

    #[test]
    fn idle_senders_are_forgotten_after_the_ttl_unless_they_return() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(60);
        let mut d = Dedup::new(8, ttl);
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
    }

    #[test]
    fn idle_windows_are_bounded_and_queued_once() {
        let t0 = Instant::now();
        let mut d = Dedup::new(4, Duration::from_secs(3600));
        // A reconnect loop of one id: one queue entry, not one per disconnect.
        let alice: Rc<str> = Rc::from("alice");
        d.record("alice", "c1", ack(1));
        for i in 0..1000 {
            d.active("alice");
            d.idle(&alice, t0 + Duration::from_millis(i));
        }
        assert_eq!(d.idle.len(), 1);
        assert_eq!(d.idle_senders(), 1);
        // Fresh ids, each used once: the idle windows stop at the bound, oldest forgotten.
        for i in 0..(MAX_IDLE_WINDOWS + 100) {
            let id: Rc<str> = Rc::from(format!("id{i}"));
            d.record(&id, "c1", ack(i as u64));
            d.idle(&id, t0 + Duration::from_secs(1));
        }
        assert_eq!(d.idle_senders(), MAX_IDLE_WINDOWS);
        assert_eq!(d.senders(), MAX_IDLE_WINDOWS);
        assert!(d.idle.len() <= MAX_IDLE_WINDOWS);
        assert_eq!(d.check("alice", "c1"), None, "the oldest idle went first");
        assert!(d
            .check(&format!("id{}", MAX_IDLE_WINDOWS + 99), "c1")
            .is_some());
    }
}
