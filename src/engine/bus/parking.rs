//! Direct messages a home holds back while deliveries to their recipient are still being
//! reported (module doc of `bus`, "Bursts").
//!
//! Owns: `Parking`, one per worker as a home: the inbox messages it handed to each worker
//! (as `Arrived`, or as the answer to that worker's own request) that the worker has not
//! acknowledged yet (`Handled`), counted per stream; and the requests it holds back, per
//! requesting worker in arrival order.
//! Does not: decide whether a message fits its stream (the local engine does), know who holds
//! an id, or send or serve anything (`mod.rs` does all three).
//!
//! Why per requesting worker: a worker takes its answers in the order it asked (module doc of
//! `bus`, "Order"), so once one of its requests is held back, every later one from it waits
//! behind it, whatever its stream. Other workers' requests are not held by it.

use super::wire::Job;
use super::{Now, Position, StreamId, Ticket};
use std::collections::{HashMap, VecDeque};

/// A request held back, with what serving it needs.
#[derive(Debug)]
pub(super) struct Parked {
    /// Arrival order over every requesting worker: the oldest that may go goes first.
    pub(super) seq: u64,
    pub(super) ticket: Ticket,
    pub(super) job: Job,
    /// As the request came: a message's TTL counts from when it was sent.
    pub(super) now: Now,
}

#[derive(Debug)]
pub(super) struct Parking {
    /// Inbox messages handed to each worker and not yet acknowledged, oldest first (a home
    /// hands a worker its messages in position order, so an acknowledgement is a prefix).
    handed: Vec<VecDeque<(Position, StreamId)>>,
    /// How many of those each inbox has: a delivery report for it may still come.
    awaiting: HashMap<StreamId, usize>,
    /// The requests held back, by requesting worker.
    queues: Vec<VecDeque<Parked>>,
    /// Held-back direct messages per inbox: a later one for it waits behind them.
    parked_for: HashMap<StreamId, usize>,
    next_seq: u64,
    /// Requests held back so far (`wsrelay_engine_bus_parked_total`).
    pub(super) parked_total: u64,
}

impl Parking {
    pub(super) fn new(workers: usize) -> Parking {
        Parking {
            handed: (0..workers).map(|_| VecDeque::new()).collect(),
            awaiting: HashMap::new(),
            queues: (0..workers).map(|_| VecDeque::new()).collect(),
            parked_for: HashMap::new(),
            next_seq: 0,
            parked_total: 0,
        }
    }

    /// `worker` was handed the message at `position` of the inbox `stream`: its hub may
    /// deliver it and report so.
    pub(super) fn handed(&mut self, worker: usize, stream: &StreamId, position: Position) {
        self.handed[worker].push_back((position, stream.clone()));
        *self.awaiting.entry(stream.clone()).or_default() += 1;
    }

    /// `worker` has acted on (or holds back) every message handed to it up to `through`: what
    /// it delivered of them it has reported before.
    pub(super) fn acknowledged(&mut self, worker: usize, through: Position) {
        let handed = &mut self.handed[worker];
        while handed.front().is_some_and(|(p, _)| *p <= through) {
            let Some((_, stream)) = handed.pop_front() else {
                break;
            };
            lower(&mut self.awaiting, &stream, 1);
        }
    }

    /// `worker` will report no delivery of `stream` any more (it no longer holds the id): its
    /// hand-offs of it are acknowledged.
    pub(super) fn forget(&mut self, worker: usize, stream: &StreamId) {
        let before = self.handed[worker].len();
        self.handed[worker].retain(|(_, s)| s != stream);
        let gone = before - self.handed[worker].len();
        lower(&mut self.awaiting, stream, gone);
    }

    /// Whether `worker` has messages handed to it and not acknowledged.
    pub(super) fn handed_to(&self, worker: usize) -> bool {
        !self.handed[worker].is_empty()
    }

    /// Whether a delivery report for `stream` may still come from some worker.
    pub(super) fn awaiting(&self, stream: &StreamId) -> bool {
        self.awaiting.contains_key(stream)
    }

    /// Whether `job` from worker `from` must wait behind requests already held back: any of
    /// `from`'s (its answers keep their order), or a direct message for the same inbox.
    pub(super) fn behind(&self, from: usize, job: &Job) -> bool {
        if !self.queues[from].is_empty() {
            return true;
        }
        matches!(job, Job::Append(a) if self.parked_for.contains_key(&a.stream))
    }

    /// Holds `job` back until `take` hands it out.
    pub(super) fn park(&mut self, from: usize, ticket: Ticket, job: Job, now: Now) {
        if let Job::Append(a) = &job {
            *self.parked_for.entry(a.stream.clone()).or_default() += 1;
        }
        self.next_seq += 1;
        self.parked_total += 1;
        self.queues[from].push_back(Parked {
            seq: self.next_seq,
            ticket,
            job,
            now,
        });
    }

    /// Whether nothing is held back.
    pub(super) fn is_empty(&self) -> bool {
        self.queues.iter().all(VecDeque::is_empty)
    }

    /// Requests held back now (`wsrelay_engine_bus_parked`).
    pub(super) fn parked(&self) -> usize {
        self.queues.iter().map(VecDeque::len).sum()
    }

    /// The oldest request of each requesting worker, with the worker: only these may go next.
    pub(super) fn fronts(&self) -> impl Iterator<Item = (usize, &Parked)> {
        self.queues
            .iter()
            .enumerate()
            .filter_map(|(from, q)| q.front().map(|p| (from, p)))
    }

    /// Takes worker `from`'s oldest held-back request out.
    pub(super) fn take(&mut self, from: usize) -> Option<Parked> {
        let parked = self.queues[from].pop_front()?;
        if let Job::Append(a) = &parked.job {
            lower(&mut self.parked_for, &a.stream, 1);
        }
        Some(parked)
    }
}

/// Lowers `stream`'s count by `by`, and forgets a count that reaches 0 (the maps hold only
/// streams with something counted).
fn lower(counts: &mut HashMap<StreamId, usize>, stream: &StreamId, by: usize) {
    if let Some(n) = counts.get_mut(stream) {
        *n = n.saturating_sub(by);
        if *n == 0 {
            counts.remove(stream);
        }
    }
}
