//! The server API's questions about connections, asked of every worker (`--workers` above 1,
//! SPEC §14, §16): the worker that a `GET /api/presence`, `/api/rooms`, `/api/ids/<id>` or a
//! `POST /api/disconnect` lands on asks every other worker for its part, and answers once all
//! have given it, or refuses with 503 once `GATHER_DEADLINE` has passed.
//!
//! Owns: one queue per worker for these questions and their parts (`Link`, made on the main
//! thread with the workers' wakers), and the questions a worker is gathering (`Gathers`): who
//! waits for each, which parts came, and its deadline.
//! Does not: validate a request or compute or merge a part (`api.rs` does, for each hub), or
//! send anything on a connection (the worker's app does, `workers.rs`). A publish does not come
//! here: it already reaches every worker through the engine bus (`engine/bus/`).
//!
//! # One question, step by step
//!
//! This is the /metrics scrape of the reactor (`server/scrape.rs`) again, one layer up, for
//! questions only the app can answer:
//!
//! 1. Worker A's hub validates the request (key, method, body) and hands back a `Query`. A
//!    takes its own part at once (for a disconnect it closes its own connections of the id),
//!    posts one `Ask` to every other worker's queue, rings its waker, and asks the reactor to
//!    wake the app at the deadline. The API connection waits for its answer meanwhile, as it
//!    does for a publish.
//! 2. Worker B's waker fires: B takes its part from its own hub (between two of its loop
//!    iterations' events, waiting for nothing) and posts it back to A, ringing A's waker.
//! 3. A takes the parts as they come. With every worker's part in, it answers: the parts
//!    merged (`Query::answer`), its own first.
//! 4. If the deadline comes first, the request is refused with 503 and `Retry-After: 1`, the
//!    reason naming the workers that did not answer (docs/api.md). A partial list of who is in
//!    a room would read as the whole one, so no partial answer is given. Parts that come after
//!    are dropped.
//!
//! # Bounds
//!
//! An API connection has at most one request waiting for its answer (the reactor reads the
//! next only after it), so a worker gathers at most one question per API connection it holds,
//! and each worker's queue holds at most one ask and one part per API connection of the
//! process: bounded by `--max-connections`. No question outlives `GATHER_DEADLINE`.

use super::api::{Part, Query};
use crate::poller::waker::Waker;
use crate::server::ConnId;
use log::warn;
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::{Duration, Instant};

/// How long a worker waits for the others' parts before it refuses the request. A worker
/// answers between two of its loop iterations' events, so anything near this is a worker that
/// is stuck (or a machine that is). The same as the /metrics scrape's deadline
/// (`server/scrape.rs`).
pub const GATHER_DEADLINE: Duration = Duration::from_secs(1);

/// What crosses between workers.
#[derive(Debug)]
enum Message {
    /// Worker `from` is gathering its question number `id`: this worker's part, please.
    Ask { from: usize, id: u32, query: Query },
    /// Worker `from`'s part, for question `id` of the worker it is posted to.
    Part { from: usize, id: u32, part: Part },
}

/// One worker's ends of the queues, made on the main thread and moved into the worker.
pub struct Link {
    index: usize,
    inbox: Receiver<Message>,
    /// Every worker's queue and waker, by index (this one's never used).
    doors: Vec<(Sender<Message>, Waker)>,
}

/// The links of `wakers.len()` workers, by index; `wakers[i]` rings worker i's reactor (the
/// waker the buses between workers ring too: one wake-up serves them all).
pub fn links(wakers: Vec<Waker>) -> Vec<Link> {
    let mut doors = Vec::with_capacity(wakers.len());
    let mut inboxes = Vec::with_capacity(wakers.len());
    for waker in wakers {
        let (tx, rx) = mpsc::channel();
        doors.push((tx, waker));
        inboxes.push(rx);
    }
    inboxes
        .into_iter()
        .enumerate()
        .map(|(index, inbox)| Link {
            index,
            inbox,
            doors: doors.clone(),
        })
        .collect()
}

/// A question whose answer is settled: what the app does with the waiting connection.
#[derive(Debug)]
pub enum Settled {
    /// Every worker's part is in, the answering worker's first.
    Complete {
        conn: ConnId,
        query: Query,
        parts: Vec<Part>,
    },
    /// The deadline passed; these workers did not answer.
    Unanswered {
        conn: ConnId,
        query: Query,
        missing: Vec<usize>,
    },
}

/// One question being gathered.
struct Gather {
    id: u32,
    /// The API connection waiting for the answer.
    conn: ConnId,
    query: Query,
    /// Each worker's part, by index, as it arrives (this worker's own from the start).
    parts: Vec<Option<Part>>,
    deadline: Instant,
}

/// The questions one worker is gathering, and its end of the queues.
pub struct Gathers {
    link: Link,
    /// Numbers this worker's questions; a late part for a settled one finds no match. It
    /// wraps after 2^32 questions, harmlessly: an id is only compared with the questions
    /// gathered in the last `GATHER_DEADLINE`, at most one per API connection.
    next_id: u32,
    gathering: Vec<Gather>,
    /// Questions refused because a worker did not answer in time.
    unanswered: u64,
}

impl Gathers {
    pub fn new(link: Link) -> Gathers {
        Gathers {
            link,
            next_id: 0,
            gathering: Vec::new(),
            unanswered: 0,
        }
    }

    fn me(&self) -> usize {
        self.link.index
    }

    fn workers(&self) -> usize {
        self.link.doors.len()
    }

    /// Step 1: `conn` asked `query`; `own` is this worker's part. Asks every other worker,
    /// and returns the deadline the app must be woken at, or the settled question at once if
    /// there is no other worker.
    pub fn start(
        &mut self,
        conn: ConnId,
        query: Query,
        own: Part,
        now: Instant,
    ) -> Result<Instant, Settled> {
        let id = self.next_id;
        self.next_id = id.wrapping_add(1);
        let me = self.me();
        for to in (0..self.workers()).filter(|&w| w != me) {
            let query = query.clone();
            self.post(
                to,
                Message::Ask {
                    from: me,
                    id,
                    query,
                },
            );
        }
        let mut parts: Vec<Option<Part>> = (0..self.workers()).map(|_| None).collect();
        parts[me] = Some(own);
        let gather = Gather {
            id,
            conn,
            query,
            parts,
            deadline: now + GATHER_DEADLINE,
        };
        if gather.parts.iter().all(Option::is_some) {
            return Err(self.complete(gather));
        }
        let deadline = gather.deadline;
        self.gathering.push(gather);
        Ok(deadline)
    }

    /// Steps 2 and 3: takes what waits in this worker's queue (after its waker was drained):
    /// answers other workers' questions with `part_of` (this worker's hub), and returns the
    /// questions of its own that are now complete.
    pub fn receive(&mut self, mut part_of: impl FnMut(&Query) -> Part) -> Vec<Settled> {
        let mut settled = Vec::new();
        while let Ok(message) = self.link.inbox.try_recv() {
            match message {
                Message::Ask { from, id, query } => {
                    let part = part_of(&query);
                    let me = self.me();
                    self.post(from, Message::Part { from: me, id, part });
                }
                Message::Part { from, id, part } => {
                    let Some(at) = self.gathering.iter().position(|g| g.id == id) else {
                        log::debug!("API question {id}: the part of worker {from} came late");
                        continue;
                    };
                    let gather = &mut self.gathering[at];
                    if let Some(slot) = gather.parts.get_mut(from) {
                        *slot = Some(part);
                    }
                    if gather.parts.iter().all(Option::is_some) {
                        let gather = self.gathering.swap_remove(at);
                        settled.push(self.complete(gather));
                    }
                }
            }
        }
        settled
    }

    /// Step 4: the questions whose deadline has passed at `now`.
    pub fn expire(&mut self, now: Instant) -> Vec<Settled> {
        let mut settled = Vec::new();
        let mut i = 0;
        while i < self.gathering.len() {
            if self.gathering[i].deadline > now {
                i += 1;
                continue;
            }
            let gather = self.gathering.swap_remove(i);
            let missing: Vec<usize> = (0..gather.parts.len())
                .filter(|&w| gather.parts[w].is_none())
                .collect();
            warn!(
                "server API {:?}: worker(s) {missing:?} did not answer within \
                 {GATHER_DEADLINE:?}; refused with 503",
                gather.query
            );
            self.unanswered += 1;
            settled.push(Settled::Unanswered {
                conn: gather.conn,
                query: gather.query,
                missing,
            });
        }
        settled
    }

    /// The earliest deadline of the questions being gathered.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.gathering.iter().map(|g| g.deadline).min()
    }

    /// Appends this worker's `wsrelay_api_workers_unanswered_total` (Prometheus text).
    pub fn render_metrics(&self, out: &mut String) {
        crate::server::metrics::Writer::new(out).counter(
            "wsrelay_api_workers_unanswered_total",
            "Server API questions (presence, rooms, ids, disconnect) refused with 503 because a worker did not give its part in time.",
            self.unanswered,
        );
    }

    /// The parts of a complete question, this worker's first, then the others by index.
    fn complete(&self, gather: Gather) -> Settled {
        let me = self.me();
        let mut parts = gather.parts;
        let own = parts[me].take();
        let parts = own.into_iter().chain(parts.into_iter().flatten()).collect();
        Settled::Complete {
            conn: gather.conn,
            query: gather.query,
            parts,
        }
    }

    /// Queues `message` for worker `to` and wakes it. A worker that has ended (shutdown) is
    /// not told: its part is then missing at the deadline.
    fn post(&self, to: usize, message: Message) {
        let (door, waker) = &self.link.doors[to];
        if door.send(message).is_ok() {
            waker.wake();
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::poller::waker;

    fn conn(slot: u32) -> ConnId {
        ConnId {
            slot,
            generation: 0,
        }
    }

    fn three() -> (Vec<Gathers>, Vec<waker::WakeReceiver>) {
        let (receivers, wakers): (Vec<_>, Vec<_>) = (0..3).map(|_| waker::pair().unwrap()).unzip();
        (
            links(wakers).into_iter().map(Gathers::new).collect(),
            receivers,
        )
    }

    #[test]
    fn every_worker_gives_its_part_and_the_asker_gets_them_all_in_order() {
        let (mut workers, _wakes) = three();
        let now = Instant::now();
        let query = Query::Id {
            id: "bob".to_string(),
        };
        let deadline = workers[1]
            .start(conn(7), query.clone(), Part::Connections(1), now)
            .unwrap();
        assert_eq!(deadline, now + GATHER_DEADLINE);
        assert_eq!(workers[1].next_deadline(), Some(deadline));
        // Worker 2 answers first, then worker 0; each is asked the question itself.
        for (w, n) in [(2, 5), (0, 3)] {
            let settled = workers[w].receive(|q| {
                assert_eq!(q, &query);
                Part::Connections(n)
            });
            assert!(settled.is_empty());
        }
        let mut settled = workers[1].receive(|_| panic!("nobody asked worker 1"));
        let Some(Settled::Complete { conn: c, parts, .. }) = settled.pop() else {
            panic!("complete: {settled:?}");
        };
        assert_eq!(c, conn(7));
        // Its own part first, then the others by index.
        assert_eq!(
            parts,
            vec![
                Part::Connections(1),
                Part::Connections(3),
                Part::Connections(5)
            ]
        );
        assert_eq!(workers[1].next_deadline(), None);
    }

    #[test]
    fn a_worker_that_does_not_answer_is_named_at_the_deadline_and_its_late_part_dropped() {
        let (mut workers, _wakes) = three();
        let now = Instant::now();
        workers[0]
            .start(conn(1), Query::Rooms, Part::Rooms(Vec::new()), now)
            .unwrap();
        assert!(workers[1].receive(|_| Part::Rooms(Vec::new())).is_empty());
        assert!(workers[0].receive(|_| panic!("no question")).is_empty());
        assert!(workers[0].expire(now + GATHER_DEADLINE / 2).is_empty());
        let settled = workers[0].expire(now + GATHER_DEADLINE);
        let [Settled::Unanswered {
            conn: c, missing, ..
        }] = &settled[..]
        else {
            panic!("unanswered: {settled:?}");
        };
        assert_eq!((*c, missing.clone()), (conn(1), vec![2]));
        let mut text = String::new();
        workers[0].render_metrics(&mut text);
        assert!(
            text.contains("wsrelay_api_workers_unanswered_total 1\n"),
            "{text}"
        );
        // Worker 2 answers after all: nothing is settled twice.
        assert!(workers[2].receive(|_| Part::Rooms(Vec::new())).is_empty());
        assert!(workers[0].receive(|_| panic!("no question")).is_empty());
    }

    #[test]
    fn one_worker_alone_settles_at_once() {
        let (rx, waker) = waker::pair().unwrap();
        let mut alone = Gathers::new(links(vec![waker]).pop().unwrap());
        let settled = alone.start(
            conn(1),
            Query::Rooms,
            Part::Rooms(Vec::new()),
            Instant::now(),
        );
        assert!(matches!(settled, Err(Settled::Complete { .. })));
        drop(rx);
    }
}
