//! The bus between workers, for raw rooms (`/r/<room>` with `--workers` above 1, SPEC §14).
//!
//! Owns: each worker's two queues (room messages: bounded; membership changes: see below), the
//! wake-up that tells the worker something is waiting (`poller/waker.rs`), and what each
//! worker knows of the others: which rooms have members where (`remote`), and how many
//! members each room has here (`local`).
//! Does not: know who the members are (the hub's `Rooms` does, on each worker), route
//! anything for `/ws` (not carried yet: refused with 501, `app/workers.rs`), or see sockets.
//!
//! # What crosses, and how often
//!
//! A worker that relays a raw-room message to its own members (`Hub::relay_raw`) also puts it,
//! once, on the queue of every *other* worker that has members in that room, and no other:
//! the payload is copied once into an `Arc` shared by every queue. The receiving worker encodes
//! the frame once and shares it among its members (`Hub::deliver_raw`). Messages from one
//! worker to another travel one FIFO queue, so each sender's order is kept.
//!
//! # Membership, and when a member starts hearing other workers
//!
//! When a room gets its first member on a worker, or loses its last, that worker tells every
//! other worker (`Joined`, `Left`). A member therefore hears messages relayed on other workers
//! from the moment its worker's `Joined` reached them (microseconds after its upgrade, but not
//! at once; the gauge `wsrelay_worker_bus_remote_rooms` shows what each worker knows). These
//! notices travel a queue of their own that is not bounded by count: each is one room's edge
//! (first member in, last member out) on one worker, so their number is bounded by the
//! membership changes, themselves bounded by `--max-connections` and connection churn; dropping
//! one would silently cut a worker's members off a room, which no counter could excuse.
//!
//! # A full queue
//!
//! A worker's message queue holds `BUS_CAPACITY` messages. A sender that finds it full drops
//! the message for that worker only and counts it (`wsrelay_worker_bus_drops_total`): raw
//! rooms have no acks, and this is what `--slow-consumer drop` does for one slow member, applied
//! to a worker that cannot keep up. Memory stays bounded, and the sending worker never blocks.

use super::App;
use crate::poller::waker::{self, WakeReceiver, Waker};
use crate::protocol::frame::OpCode;
use crate::server::workers::Shared;
use crate::server::Outbox;
use std::collections::HashMap;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, Sender, SyncSender, TrySendError};
use std::sync::Arc;

/// Room messages that may wait in one worker's queue.
pub const BUS_CAPACITY: usize = 16 * 1024;

/// A room message relayed on another worker.
#[derive(Debug)]
struct Relay {
    room: Arc<str>,
    opcode: OpCode,
    payload: Arc<[u8]>,
}

/// Worker `from` got its first member in `room` (`joined`), or lost its last.
#[derive(Debug)]
struct Membership {
    from: usize,
    room: Arc<str>,
    joined: bool,
}

/// The way into one worker.
#[derive(Clone)]
struct Door {
    relay: SyncSender<Relay>,
    membership: Sender<Membership>,
    waker: Waker,
}

/// One worker's ends of the bus, made on the main thread and moved into the worker.
pub struct BusEnds {
    index: usize,
    relay: Receiver<Relay>,
    membership: Receiver<Membership>,
    /// Every worker's door, this one's included (never used: a worker does not post to itself).
    doors: Vec<Door>,
    shared: Arc<Shared>,
}

/// The bus ends of every worker, by index, with the `WakeReceiver` each reactor must watch.
///
/// # Errors
/// A waker's socket pair could not be created.
pub fn build(shared: &Arc<Shared>) -> io::Result<Vec<(BusEnds, WakeReceiver)>> {
    let workers = shared.workers();
    let mut doors = Vec::with_capacity(workers);
    let mut inboxes = Vec::with_capacity(workers);
    for _ in 0..workers {
        let (relay_tx, relay_rx) = mpsc::sync_channel(BUS_CAPACITY);
        let (membership_tx, membership_rx) = mpsc::channel();
        let (wake_rx, waker) = waker::pair()?;
        // The same waker brings the worker the scrapes of /metrics (`server/scrape.rs`).
        shared.set_waker(doors.len(), waker.clone());
        doors.push(Door {
            relay: relay_tx,
            membership: membership_tx,
            waker,
        });
        inboxes.push((relay_rx, membership_rx, wake_rx));
    }
    Ok(inboxes
        .into_iter()
        .enumerate()
        .map(|(index, (relay, membership, wake_rx))| {
            let ends = BusEnds {
                index,
                relay,
                membership,
                doors: doors.clone(),
                shared: Arc::clone(shared),
            };
            (ends, wake_rx)
        })
        .collect())
}

/// One worker's side of the bus, on its thread.
pub struct RawBus {
    ends: BusEnds,
    /// Rooms with members on other workers, and which workers.
    remote: HashMap<Arc<str>, Vec<usize>>,
    /// Members of each room on this worker.
    local: HashMap<Arc<str>, usize>,
}

impl RawBus {
    pub fn new(ends: BusEnds) -> RawBus {
        RawBus {
            ends,
            remote: HashMap::new(),
            local: HashMap::new(),
        }
    }

    /// A member of `room` opened on this worker.
    pub fn member_joined(&mut self, room: &str) {
        if let Some(n) = self.local.get_mut(room) {
            *n += 1;
            return;
        }
        let room: Arc<str> = Arc::from(room);
        self.local.insert(Arc::clone(&room), 1);
        self.announce(&room, true);
    }

    /// A member of `room` on this worker closed.
    pub fn member_left(&mut self, room: &str) {
        let Some(n) = self.local.get_mut(room) else {
            return;
        };
        *n -= 1;
        if *n == 0 {
            let (room, _) = self.local.remove_entry(room).expect("present above");
            self.announce(&room, false);
        }
    }

    fn announce(&self, room: &Arc<str>, joined: bool) {
        for (i, door) in self.ends.doors.iter().enumerate() {
            if i == self.ends.index {
                continue;
            }
            let notice = Membership {
                from: self.ends.index,
                room: Arc::clone(room),
                joined,
            };
            // Fails only once that worker has ended (shutdown): nothing left to tell.
            if door.membership.send(notice).is_ok() {
                door.waker.wake();
            }
        }
    }

    /// A message was relayed to `room`'s members here: put it on the queue of every other
    /// worker with members, once each.
    pub fn publish(&mut self, room: &str, opcode: OpCode, payload: &[u8]) {
        let Some(workers) = self.remote.get(room).filter(|w| !w.is_empty()) else {
            return;
        };
        let room: Arc<str> = Arc::from(room);
        let payload: Arc<[u8]> = Arc::from(payload);
        let own = self.ends.shared.gauges(self.ends.index);
        for &worker in workers {
            let door = &self.ends.doors[worker];
            let relay = Relay {
                room: Arc::clone(&room),
                opcode,
                payload: Arc::clone(&payload),
            };
            // Raised before the send, so the receiver (which lowers it) never takes it below 0.
            let depth = &self.ends.shared.gauges(worker).bus_depth;
            depth.fetch_add(1, Ordering::Relaxed);
            match door.relay.try_send(relay) {
                Ok(()) => {
                    own.bus_sent.fetch_add(1, Ordering::Relaxed);
                    door.waker.wake();
                }
                Err(TrySendError::Full(_)) => {
                    depth.fetch_sub(1, Ordering::Relaxed);
                    own.bus_drops.fetch_add(1, Ordering::Relaxed);
                }
                // That worker has ended (shutdown).
                Err(TrySendError::Disconnected(_)) => {
                    depth.fetch_sub(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// The worker's waker fired: applies membership notices, then delivers every waiting room
    /// message to this worker's members through `app`.
    pub fn receive(&mut self, app: &mut App, out: &mut Outbox<'_>) {
        self.take_notices();
        let own = self.ends.shared.gauges(self.ends.index);
        while let Ok(relay) = self.ends.relay.try_recv() {
            own.bus_depth.fetch_sub(1, Ordering::Relaxed);
            own.bus_received.fetch_add(1, Ordering::Relaxed);
            app.deliver_raw(&relay.room, relay.opcode, &relay.payload, out);
        }
    }

    /// Applies the membership notices waiting in the queue, before any room message (a
    /// message relayed after a `Joined` must find it applied).
    fn take_notices(&mut self) {
        while let Ok(notice) = self.ends.membership.try_recv() {
            let workers = self.remote.entry(notice.room).or_default();
            workers.retain(|&w| w != notice.from);
            if notice.joined {
                workers.push(notice.from);
            }
        }
        self.remote.retain(|_, workers| !workers.is_empty());
        let known: usize = self.remote.values().map(Vec::len).sum();
        self.ends
            .shared
            .gauges(self.ends.index)
            .bus_remote_rooms
            .store(known as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn buses(workers: usize) -> (Arc<Shared>, Vec<RawBus>) {
        let shared = Shared::new(workers, 100);
        let buses = build(&shared)
            .unwrap()
            .into_iter()
            .map(|(ends, _wake)| RawBus::new(ends))
            .collect();
        (shared, buses)
    }

    #[test]
    fn a_message_goes_only_to_workers_with_members_once_each() {
        let (shared, mut bus) = buses(3);
        bus[1].member_joined("lobby");
        bus[1].member_joined("lobby"); // a second member: no second notice
        bus[0].take_notices();
        bus[0].publish("lobby", OpCode::Text, b"hi");
        bus[0].publish("elsewhere", OpCode::Text, b"nobody");
        let g = shared.snapshots();
        assert_eq!(g[0].bus_sent, 1, "to worker 1 only");
        assert_eq!(g[1].bus_depth, 1);
        assert_eq!(g[2].bus_depth, 0, "worker 2 has no members");
        assert_eq!(g[0].bus_remote_rooms, 1);
        // The last member leaves: worker 0 stops sending.
        bus[1].member_left("lobby");
        bus[1].member_left("lobby");
        bus[0].take_notices();
        bus[0].publish("lobby", OpCode::Text, b"gone");
        assert_eq!(shared.snapshots()[0].bus_sent, 1);
        assert_eq!(shared.snapshots()[0].bus_remote_rooms, 0);
    }

    #[test]
    fn a_full_queue_drops_and_counts_never_grows() {
        let (shared, mut bus) = buses(2);
        bus[1].member_joined("lobby");
        bus[0].take_notices();
        for _ in 0..BUS_CAPACITY + 3 {
            bus[0].publish("lobby", OpCode::Binary, b"x");
        }
        let g = shared.snapshots();
        assert_eq!(g[0].bus_sent, BUS_CAPACITY as u64);
        assert_eq!(g[0].bus_drops, 3);
        assert_eq!(g[1].bus_depth, BUS_CAPACITY as u64);
    }
}
