//! Duplicate suppression: the last client message ids of each sender, with the ack each got.
//!
//! Owns: `Dedup`, a bounded window per sender id, and the forgetting of idle senders.
//! Does not: decide what a duplicate gets (the hub re-sends the recorded ack), or read a clock.
//!
//! Implements the duplicate rule of issue 6 item 4 on SPEC §6: a client that re-sends a message
//! with the same `id` (typically after a reconnect, not knowing whether the first try arrived)
//! gets the same ack again and the message is not delivered a second time.
//!
//! Bounds: each sender keeps its `capacity` most recent client ids (older ones are forgotten
//! first in, first out). A sender's window is kept while it has connections and for `idle_ttl`
//! after its last one closed (the same horizon as the offline queue), then dropped; memory is
//! therefore bounded by the number of recently active senders times `capacity`.

use super::envelope::{AckStatus, MsgId};
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::time::{Duration, Instant};

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
}

pub struct Dedup {
    capacity: usize,
    idle_ttl: Duration,
    windows: HashMap<Rc<str>, Window>,
    /// Senders that went idle, oldest first: (when, who). Checked against `idle_since` when
    /// due, since the sender may have come back (and left again) meanwhile.
    idle: VecDeque<(Instant, Rc<str>)>,
}

impl Dedup {
    pub fn new(capacity: usize, idle_ttl: Duration) -> Dedup {
        Dedup {
            capacity,
            idle_ttl,
            windows: HashMap::new(),
            idle: VecDeque::new(),
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
            w.idle_since = None;
        }
    }

    /// The sender's last connection closed at `now`.
    pub fn idle(&mut self, sender: &Rc<str>, now: Instant) {
        if let Some(w) = self.windows.get_mut(&**sender) {
            w.idle_since = Some(now);
            self.idle.push_back((now, Rc::clone(sender)));
        }
    }

    /// Drops the windows of senders idle for `idle_ttl` or more.
    pub fn sweep(&mut self, now: Instant) {
        while let Some((since, _)) = self.idle.front() {
            if now.saturating_duration_since(*since) < self.idle_ttl {
                break;
            }
            if let Some((since, sender)) = self.idle.pop_front() {
                let expired = self
                    .windows
                    .get(&sender)
                    .and_then(|w| w.idle_since)
                    .is_some_and(|idle| idle <= since);
                if expired {
                    self.windows.remove(&sender);
                }
            }
        }
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
}
