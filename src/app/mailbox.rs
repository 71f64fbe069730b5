//! Retained direct messages per id: the offline queue and the recovery log of SPEC §6.
//!
//! Owns: `Mailboxes`, every id's retained messages in msg_id order, the three bounds (per-id
//! count `--offline-max`, age `--offline-ttl`, total bytes `--offline-max-bytes`) and what
//! happens at each; the counters of what the bounds removed.
//! Does not: send anything (the hub hands each message to a callback), know connections, or
//! read a clock (it is handed `now`).
//!
//! What "retained" means. Every direct message the hub accepts for an id is kept here, as the
//! exact frame that was (or will be) sent, whether it was delivered live or not:
//! * `pending` messages reached no connection of the id (it was offline, or every connection
//!   refused it as a slow consumer). They are delivered, in order, when the id next connects,
//!   and then stop being pending.
//! * delivered messages stay for recovery: a client reconnecting with `?since=<msg_id>` gets
//!   every retained message with a larger msg_id again, so a connection that died with unread
//!   messages loses nothing. Clients dedup by msg_id.
//!
//! The bounds, and who pays:
//! * age: a message leaves at `--offline-ttl` after it was accepted, pending or not
//!   (`expired`);
//! * per id: an id holds at most `--offline-max` messages. A new message evicts the oldest one if
//!   that one was delivered (recovery data); if the oldest is still pending, the new message is
//!   refused (`Full`) instead, so that the per-id bound never drops a message acked `queued`;
//! * all ids together: at most `--offline-max-bytes` (frame bytes plus `OVERHEAD_BYTES` per
//!   message). Beyond it the globally oldest messages are evicted, pending or not: this is the
//!   memory safety valve, and the one way a message acked `queued` can be lost before its TTL.
//!   Such losses are counted (`dropped_global`).
//!
//! How eviction stays cheap. Every removal takes the *oldest* message of some mailbox, and a
//! single global FIFO (`order`) lists all messages oldest first, which is also expiry order
//! (one TTL for all, a monotonic clock). Expiry and the byte bound pop the FIFO's front; the
//! per-id bound removes a mailbox's front directly and leaves its FIFO entry behind as "stale",
//! recognised later because its msg_id is below its mailbox's front. Stale entries are counted
//! and compacted away once they outnumber live ones, so the FIFO stays O(retained messages).
//!
//! Invariants: each mailbox is non-empty and sorted by msg_id; `messages`, `pending` and
//! `bytes` equal the sums over all mailboxes; `order.len() == messages + stale`.

use super::envelope::MsgId;
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Approximate bytes of bookkeeping per retained message (the entry, its FIFO entry, the
/// reference-count header), added to the frame's length for the global byte bound.
pub const OVERHEAD_BYTES: usize = 96;

/// The retention bounds.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Most messages kept per id; 0 disables the offline queue and recovery.
    pub per_id: usize,
    /// How long a message is kept after it was accepted.
    pub ttl: Duration,
    /// Most bytes kept over all ids (frames plus `OVERHEAD_BYTES` each).
    pub max_bytes: usize,
}

/// One retained message.
#[derive(Debug)]
pub struct Retained {
    pub msg_id: MsgId,
    /// The encoded frame, shared with the live deliveries of the same message.
    pub frame: Rc<[u8]>,
    /// Not yet queued on any connection of the id.
    pub pending: bool,
}

/// Why a message was not retained.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// `--offline-max 0`: nothing is retained.
    Disabled,
    /// The id's mailbox is full of messages still pending.
    Full,
    /// The message alone exceeds the global byte bound.
    TooLarge,
}

impl Refused {
    /// The `reason` of a rejected ack.
    pub fn reason(self) -> &'static str {
        match self {
            Refused::Disabled => "recipient offline and the offline queue is disabled",
            Refused::Full => "recipient's offline queue is full",
            Refused::TooLarge => "message too large for the offline queue",
        }
    }
}

/// What the bounds removed, for /metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Removed {
    /// Pending messages that reached their TTL undelivered.
    pub expired_pending: u64,
    /// Delivered messages that reached their TTL (recovery data aged out).
    pub expired_delivered: u64,
    /// Delivered messages evicted by the per-id bound.
    pub evicted_per_id: u64,
    /// Pending messages evicted by the global byte bound (lost before their TTL).
    pub dropped_global: u64,
    /// Delivered messages evicted by the global byte bound.
    pub evicted_global: u64,
}

/// Messages and bytes that have reached their TTL but are still held until the next `expire`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Expiring {
    pub pending: u64,
    pub messages: usize,
    pub bytes: usize,
}

pub struct Mailboxes {
    limits: Limits,
    boxes: HashMap<Rc<str>, VecDeque<Retained>>,
    /// Every retained message oldest first (msg_id, expiry, id), plus `stale` leftovers.
    order: VecDeque<(MsgId, Instant, Rc<str>)>,
    stale: usize,
    messages: usize,
    pending: usize,
    bytes: usize,
    pub removed: Removed,
}

impl Mailboxes {
    pub fn new(limits: Limits) -> Mailboxes {
        Mailboxes {
            limits,
            boxes: HashMap::new(),
            order: VecDeque::new(),
            stale: 0,
            messages: 0,
            pending: 0,
            bytes: 0,
            removed: Removed::default(),
        }
    }

    /// Keeps `frame` (message `msg_id`, newer than any retained so far) for the id `to`.
    ///
    /// # Errors
    /// `Disabled`, `Full` or `TooLarge` (see `Refused`); nothing changes then.
    pub fn retain(
        &mut self,
        to: &str,
        msg_id: MsgId,
        frame: Rc<[u8]>,
        pending: bool,
        now: Instant,
    ) -> Result<(), Refused> {
        if self.limits.per_id == 0 {
            return Err(Refused::Disabled);
        }
        let cost = frame.len() + OVERHEAD_BYTES;
        if cost > self.limits.max_bytes {
            return Err(Refused::TooLarge);
        }
        let full = |boxes: &HashMap<Rc<str>, VecDeque<Retained>>, per_id: usize| {
            boxes.get(to).map_or(0, VecDeque::len) >= per_id
        };
        if full(&self.boxes, self.limits.per_id)
            && self
                .boxes
                .get(to)
                .and_then(VecDeque::front)
                .is_some_and(|m| m.pending)
        {
            return Err(Refused::Full);
        }
        while self.bytes + cost > self.limits.max_bytes {
            if !self.evict_oldest() {
                break;
            }
        }
        if full(&self.boxes, self.limits.per_id) {
            // The oldest is delivered (checked above, and the byte bound only ever removes
            // a mailbox's oldest): it gives way.
            if let Some(gone) = self.pop_front(to) {
                self.removed.evicted_per_id += 1;
                debug_assert!(!gone.pending);
                self.stale += 1;
                self.compact();
            }
        }
        let key = match self.boxes.get_key_value(to) {
            Some((key, _)) => Rc::clone(key),
            None => Rc::from(to),
        };
        let expires = now
            .checked_add(self.limits.ttl)
            .unwrap_or(now + Duration::from_secs(1 << 40));
        let mailbox = self.boxes.entry(Rc::clone(&key)).or_default();
        debug_assert!(mailbox.back().is_none_or(|m| m.msg_id < msg_id));
        mailbox.push_back(Retained {
            msg_id,
            frame,
            pending,
        });
        self.order.push_back((msg_id, expires, key));
        self.messages += 1;
        self.pending += usize::from(pending);
        self.bytes += cost;
        Ok(())
    }

    /// Removes every message whose TTL has passed.
    pub fn expire(&mut self, now: Instant) {
        while let Some((msg_id, expires, key)) = self.order.front() {
            if *expires > now {
                break;
            }
            let (msg_id, key) = (*msg_id, Rc::clone(key));
            self.order.pop_front();
            match self.front_if(&key, msg_id) {
                Some(gone) if gone.pending => self.removed.expired_pending += 1,
                Some(_) => self.removed.expired_delivered += 1,
                None => self.stale -= 1,
            }
        }
    }

    /// Hands `id`'s messages that are pending, or newer than `since`, to `send` in msg_id order,
    /// until `send` returns false (the connection took no more). Returns how many pending ones
    /// were sent (now delivered) and how many delivered ones were sent again (replayed).
    pub fn deliver(
        &mut self,
        id: &str,
        since: Option<MsgId>,
        mut send: impl FnMut(&Retained) -> bool,
    ) -> (u64, u64) {
        let (mut first, mut again) = (0, 0);
        let Some(mailbox) = self.boxes.get_mut(id) else {
            return (0, 0);
        };
        for message in mailbox.iter_mut() {
            if !(message.pending || since.is_some_and(|s| message.msg_id > s)) {
                continue;
            }
            if !send(message) {
                break;
            }
            if message.pending {
                message.pending = false;
                self.pending -= 1;
                first += 1;
            } else {
                again += 1;
            }
        }
        (first, again)
    }

    /// The newest msg_id retained for `id` (for the welcome message).
    pub fn newest(&self, id: &str) -> Option<MsgId> {
        self.boxes.get(id)?.back().map(|m| m.msg_id)
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

    /// What `expire(now)` would remove, without removing it: /metrics reads this so that its
    /// figures are right at the moment of the scrape even if the hub has been idle.
    pub fn expiring(&self, now: Instant) -> Expiring {
        let mut out = Expiring::default();
        // Live FIFO entries of one mailbox appear in its order, so a per-mailbox cursor tells
        // live entries (at the cursor) from stale ones (below it).
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for (msg_id, expires, key) in &self.order {
            if *expires > now {
                break;
            }
            let Some(mailbox) = self.boxes.get(key) else {
                continue;
            };
            let cursor = seen.entry(key).or_insert(0);
            if let Some(m) = mailbox.get(*cursor).filter(|m| m.msg_id == *msg_id) {
                *cursor += 1;
                out.messages += 1;
                out.bytes += m.frame.len() + OVERHEAD_BYTES;
                out.pending += u64::from(m.pending);
            }
        }
        out
    }

    /// Removes the globally oldest message. Returns false if there is none.
    fn evict_oldest(&mut self) -> bool {
        while let Some((msg_id, _, key)) = self.order.pop_front() {
            match self.front_if(&key, msg_id) {
                Some(gone) if gone.pending => {
                    self.removed.dropped_global += 1;
                    return true;
                }
                Some(_) => {
                    self.removed.evicted_global += 1;
                    return true;
                }
                None => self.stale -= 1,
            }
        }
        false
    }

    /// Removes `key`'s oldest message if it is `msg_id` (else that FIFO entry was stale).
    fn front_if(&mut self, key: &str, msg_id: MsgId) -> Option<Retained> {
        let is_front = self
            .boxes
            .get(key)
            .and_then(VecDeque::front)
            .is_some_and(|m| m.msg_id == msg_id);
        if is_front {
            self.pop_front(key)
        } else {
            None
        }
    }

    /// Removes `key`'s oldest message and keeps the totals right.
    fn pop_front(&mut self, key: &str) -> Option<Retained> {
        let mailbox = self.boxes.get_mut(key)?;
        let gone = mailbox.pop_front()?;
        if mailbox.is_empty() {
            self.boxes.remove(key);
        }
        self.messages -= 1;
        self.pending -= usize::from(gone.pending);
        self.bytes -= gone.frame.len() + OVERHEAD_BYTES;
        Some(gone)
    }

    /// Drops stale FIFO entries once they outnumber live ones (amortised O(1) per removal).
    fn compact(&mut self) {
        if self.stale <= self.messages.max(64) {
            return;
        }
        let boxes = &self.boxes;
        self.order.retain(|(msg_id, _, key)| {
            boxes
                .get(key)
                .and_then(VecDeque::front)
                .is_some_and(|front| *msg_id >= front.msg_id)
        });
        self.stale = 0;
    }

    #[cfg(test)]
    fn check_invariants(&self) {
        let mut messages = 0;
        let mut pending = 0;
        let mut bytes = 0;
        for mailbox in self.boxes.values() {
            assert!(!mailbox.is_empty());
            assert!(mailbox
                .iter()
                .zip(mailbox.iter().skip(1))
                .all(|(a, b)| a.msg_id < b.msg_id));
            messages += mailbox.len();
            pending += mailbox.iter().filter(|m| m.pending).count();
            bytes += mailbox
                .iter()
                .map(|m| m.frame.len() + OVERHEAD_BYTES)
                .sum::<usize>();
        }
        assert_eq!(
            (self.messages, self.pending, self.bytes),
            (messages, pending, bytes)
        );
        assert_eq!(self.order.len(), self.messages + self.stale);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(60);

    fn limits(per_id: usize, max_bytes: usize) -> Limits {
        Limits {
            per_id,
            ttl: TTL,
            max_bytes,
        }
    }

    fn frame(n: u64) -> Rc<[u8]> {
        Rc::from(format!("m{n}").into_bytes())
    }

    /// Takes everything deliverable for `id` (pending, or newer than `since`).
    fn take(m: &mut Mailboxes, id: &str, since: Option<u64>) -> Vec<u64> {
        let mut got = Vec::new();
        m.deliver(id, since.map(MsgId), |r| {
            got.push(r.msg_id.0);
            true
        });
        m.check_invariants();
        got
    }

    #[test]
    fn pending_messages_are_delivered_once_in_order() {
        let now = Instant::now();
        let mut m = Mailboxes::new(limits(10, 1 << 20));
        for n in 1..=3 {
            m.retain("bob", MsgId(n), frame(n), true, now).unwrap();
        }
        m.retain("carol", MsgId(4), frame(4), true, now).unwrap();
        assert_eq!((m.messages(), m.pending()), (4, 4));
        assert_eq!(take(&mut m, "bob", None), vec![1, 2, 3]);
        assert_eq!(
            take(&mut m, "bob", None),
            Vec::<u64>::new(),
            "delivered once"
        );
        assert_eq!(m.pending(), 1);
        assert_eq!(m.newest("bob"), Some(MsgId(3)));
        assert_eq!(m.newest("nobody"), None);
    }

    #[test]
    fn since_replays_retained_messages_after_it() {
        let now = Instant::now();
        let mut m = Mailboxes::new(limits(10, 1 << 20));
        for n in [2, 5, 9] {
            m.retain("bob", MsgId(n), frame(n), false, now).unwrap();
        }
        m.retain("bob", MsgId(11), frame(11), true, now).unwrap();
        assert_eq!(take(&mut m, "bob", Some(5)), vec![9, 11]);
        assert_eq!(take(&mut m, "bob", Some(0)), vec![2, 5, 9, 11]);
        assert_eq!(take(&mut m, "bob", Some(11)), Vec::<u64>::new());
    }

    #[test]
    fn delivery_stops_where_the_connection_refuses() {
        let now = Instant::now();
        let mut m = Mailboxes::new(limits(10, 1 << 20));
        for n in 1..=4 {
            m.retain("bob", MsgId(n), frame(n), true, now).unwrap();
        }
        let mut budget = 2;
        let (first, again) = m.deliver("bob", None, |_| {
            budget -= 1;
            budget >= 0
        });
        assert_eq!((first, again), (2, 0));
        assert_eq!(
            take(&mut m, "bob", None),
            vec![3, 4],
            "the rest stays pending"
        );
    }

    #[test]
    fn ttl_expires_pending_and_delivered_alike() {
        let start = Instant::now();
        let mut m = Mailboxes::new(limits(10, 1 << 20));
        m.retain("bob", MsgId(1), frame(1), true, start).unwrap();
        m.retain(
            "bob",
            MsgId(2),
            frame(2),
            false,
            start + Duration::from_secs(10),
        )
        .unwrap();
        m.retain(
            "bob",
            MsgId(3),
            frame(3),
            true,
            start + Duration::from_secs(20),
        )
        .unwrap();

        assert_eq!(m.expiring(start + TTL).messages, 1);
        m.expire(start + TTL - Duration::from_millis(1));
        assert_eq!(m.messages(), 3, "not a moment early");
        m.expire(start + TTL + Duration::from_secs(10));
        assert_eq!(
            (m.removed.expired_pending, m.removed.expired_delivered),
            (1, 1)
        );
        assert_eq!(take(&mut m, "bob", Some(0)), vec![3]);
        let later = start + TTL + Duration::from_secs(20);
        assert_eq!(
            m.expiring(later),
            Expiring {
                pending: 0,
                messages: 1,
                bytes: 2 + OVERHEAD_BYTES
            }
        );
        m.expire(later);
        assert_eq!((m.messages(), m.bytes()), (0, 0));
        m.check_invariants();
    }

    #[test]
    fn per_id_bound_evicts_delivered_but_refuses_over_pending() {
        let now = Instant::now();
        let mut m = Mailboxes::new(limits(3, 1 << 20));
        for n in 1..=3 {
            m.retain("bob", MsgId(n), frame(n), false, now).unwrap();
        }
        // Full of delivered messages: the oldest gives way.
        m.retain("bob", MsgId(4), frame(4), true, now).unwrap();
        assert_eq!(m.removed.evicted_per_id, 1);
        assert_eq!(take(&mut m, "bob", Some(0)), vec![2, 3, 4]);
        // Now full of pending ones: a new message is refused, nothing is lost.
        let mut m = Mailboxes::new(limits(3, 1 << 20));
        for n in 1..=3 {
            m.retain("bob", MsgId(n), frame(n), true, now).unwrap();
        }
        assert_eq!(
            m.retain("bob", MsgId(4), frame(4), true, now),
            Err(Refused::Full)
        );
        assert_eq!(take(&mut m, "bob", None), vec![1, 2, 3]);
        m.check_invariants();
    }

    #[test]
    fn global_byte_bound_evicts_the_oldest_of_all() {
        let now = Instant::now();
        let each = 2 + OVERHEAD_BYTES;
        let mut m = Mailboxes::new(limits(100, 3 * each));
        m.retain("a", MsgId(1), frame(1), true, now).unwrap();
        m.retain("b", MsgId(2), frame(2), false, now).unwrap();
        m.retain("a", MsgId(3), frame(3), true, now).unwrap();
        m.retain("b", MsgId(4), frame(4), true, now).unwrap();
        assert_eq!(
            m.removed.dropped_global, 1,
            "message 1 was pending: lost, counted"
        );
        m.retain("c", MsgId(5), frame(5), true, now).unwrap();
        assert_eq!(m.removed.evicted_global, 1, "message 2 was delivered");
        assert_eq!(m.bytes(), 3 * each);
        assert_eq!(take(&mut m, "a", None), vec![3]);
        assert_eq!(take(&mut m, "b", None), vec![4]);
        let too_big: Rc<[u8]> = Rc::from(vec![0u8; 3 * each]);
        assert_eq!(
            m.retain("a", MsgId(6), too_big, true, now),
            Err(Refused::TooLarge)
        );
    }

    #[test]
    fn disabled_when_per_id_is_zero() {
        let mut m = Mailboxes::new(limits(0, 1 << 20));
        assert_eq!(
            m.retain("a", MsgId(1), frame(1), true, Instant::now()),
            Err(Refused::Disabled)
        );
        assert_eq!(m.messages(), 0);
    }

    #[test]
    fn stale_fifo_entries_are_compacted() {
        let now = Instant::now();
        let mut m = Mailboxes::new(limits(2, 1 << 30));
        for n in 1..=10_000 {
            m.retain("hot", MsgId(n), frame(n), false, now).unwrap();
        }
        m.check_invariants();
        assert!(m.order.len() <= 2 + 65, "FIFO holds {}", m.order.len());
        m.expire(now + TTL);
        assert_eq!((m.messages(), m.removed.expired_delivered), (0, 2));
        m.check_invariants();
    }
}
