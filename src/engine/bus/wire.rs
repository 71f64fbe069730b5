//! What crosses between workers on the engine bus (SPEC §14): `Note`, and the conversions
//! between the engine seam's values (`Rc`, one thread) and their `Send` forms (`Arc`).
//!
//! Owns: `Note` (every kind of message one worker's `BusEngine` puts on another's queue), the
//! `Send` forms of streams, work and outcomes, and their conversions both ways.
//! Does not: route, order or count anything (`mod.rs` does), or hold state.
//!
//! Why copies: the hub hands the engine `Rc`s, which cannot leave their thread. A body that
//! crosses is copied once into an `Arc` by its sender, and once back into an `Rc` by the
//! receiving worker; a message fanned out to several workers shares one `Arc`.

use super::super::{
    Append, Arrival, Completion, Epoch, Event, Now, Outcome, Position, Publish, Recovery, Refusal,
    Replayed, Since, StreamId, Ticket,
};
use crate::app::envelope::AckStatus;
use std::rc::Rc;
use std::sync::Arc;

/// A stream, as it crosses.
#[derive(Clone, Debug)]
pub(super) enum Stream {
    Inbox(Arc<str>),
    Room(Arc<str>),
}

impl Stream {
    pub(super) fn of(stream: &StreamId) -> Stream {
        match stream {
            StreamId::Inbox(id) => Stream::Inbox(Arc::from(&**id)),
            StreamId::Room(room) => Stream::Room(Arc::from(&**room)),
        }
    }

    pub(super) fn local(&self) -> StreamId {
        match self {
            Stream::Inbox(id) => StreamId::Inbox(Rc::from(&**id)),
            Stream::Room(room) => StreamId::Room(Rc::from(&**room)),
        }
    }
}

/// Work for a stream's home worker: what the seam's submitting methods carry.
#[derive(Debug)]
pub(super) enum Work {
    Append {
        stream: Stream,
        sender: Arc<str>,
        client_id: Option<Arc<str>>,
        body: Arc<[u8]>,
    },
    Publish {
        room: Arc<str>,
        sender: Arc<str>,
        client_id: Option<Arc<str>>,
        body: Arc<[u8]>,
        keep: bool,
    },
    Recover {
        stream: Stream,
        since: Option<Since>,
    },
    History {
        stream: Stream,
        limit: usize,
    },
}

/// The same work on the home worker's thread, as its memory engine takes it.
#[derive(Debug)]
pub(super) enum Job {
    Append(Append),
    Publish(Publish),
    Recover(StreamId, Option<Since>),
    History(StreamId, usize),
}

fn rc_str(s: &Arc<str>) -> Rc<str> {
    Rc::from(&**s)
}

fn arc_str(s: &Rc<str>) -> Arc<str> {
    Arc::from(&**s)
}

impl Work {
    pub(super) fn of(job: &Job) -> Work {
        match job {
            Job::Append(a) => Work::Append {
                stream: Stream::of(&a.stream),
                sender: arc_str(&a.sender),
                client_id: a.client_id.as_ref().map(arc_str),
                body: Arc::from(&*a.body),
            },
            Job::Publish(p) => Work::Publish {
                room: arc_str(&p.room),
                sender: arc_str(&p.sender),
                client_id: p.client_id.as_ref().map(arc_str),
                body: Arc::from(&*p.body),
                keep: p.keep,
            },
            Job::Recover(stream, since) => Work::Recover {
                stream: Stream::of(stream),
                since: *since,
            },
            Job::History(stream, limit) => Work::History {
                stream: Stream::of(stream),
                limit: *limit,
            },
        }
    }

    pub(super) fn into_job(self) -> Job {
        match self {
            Work::Append {
                stream,
                sender,
                client_id,
                body,
            } => Job::Append(Append {
                stream: stream.local(),
                sender: rc_str(&sender),
                client_id: client_id.as_ref().map(rc_str),
                body: Rc::from(&*body),
            }),
            Work::Publish {
                room,
                sender,
                client_id,
                body,
                keep,
            } => Job::Publish(Publish {
                room: rc_str(&room),
                sender: rc_str(&sender),
                client_id: client_id.as_ref().map(rc_str),
                body: Rc::from(&*body),
                keep,
            }),
            Work::Recover { stream, since } => Job::Recover(stream.local(), since),
            Work::History { stream, limit } => Job::History(stream.local(), limit),
        }
    }
}

/// One replayed message, as it crosses.
#[derive(Debug)]
pub(super) struct Message {
    position: Position,
    body: Arc<[u8]>,
    pending: bool,
}

/// An engine's answer, as it crosses (see `Outcome`).
#[derive(Debug)]
pub(super) enum Answer {
    Stored(Position),
    StoredOnlineElsewhere(Position),
    Duplicate(Position, AckStatus),
    Rejected(Refusal),
    Recovered {
        epoch: Epoch,
        last: Option<Position>,
        recovered: bool,
        messages: Vec<Message>,
    },
}

impl Answer {
    pub(super) fn of(outcome: Outcome) -> Answer {
        match outcome {
            Outcome::Stored { position } => Answer::Stored(position),
            Outcome::StoredOnlineElsewhere { position } => Answer::StoredOnlineElsewhere(position),
            Outcome::Duplicate { position, status } => Answer::Duplicate(position, status),
            Outcome::Rejected(refusal) => Answer::Rejected(refusal),
            Outcome::Recovered(r) => Answer::Recovered {
                epoch: r.epoch,
                last: r.last,
                recovered: r.recovered,
                messages: r
                    .messages
                    .into_iter()
                    .map(|m| Message {
                        position: m.position,
                        body: Arc::from(&*m.body),
                        pending: m.pending,
                    })
                    .collect(),
            },
        }
    }

    pub(super) fn into_outcome(self) -> Outcome {
        match self {
            Answer::Stored(position) => Outcome::Stored { position },
            Answer::StoredOnlineElsewhere(position) => Outcome::StoredOnlineElsewhere { position },
            Answer::Duplicate(position, status) => Outcome::Duplicate { position, status },
            Answer::Rejected(refusal) => Outcome::Rejected(refusal),
            Answer::Recovered {
                epoch,
                last,
                recovered,
                messages,
            } => Outcome::Recovered(Recovery {
                epoch,
                last,
                recovered,
                messages: messages
                    .into_iter()
                    .map(|m| Replayed {
                        position: m.position,
                        body: Rc::from(&*m.body),
                        pending: m.pending,
                    })
                    .collect(),
            }),
        }
    }
}

/// Everything one worker's engine puts on another's queue. `from` is always the sender.
#[derive(Debug)]
pub(super) enum Note {
    /// Work for a stream homed at the receiver; answered with `Reply`.
    Request {
        from: usize,
        ticket: Ticket,
        work: Work,
        now: Now,
    },
    /// The home's answer to the receiver's `Request`.
    Reply {
        from: usize,
        ticket: Ticket,
        answer: Answer,
    },
    /// A message stored at its home (`from`) for an id or room the receiver holds.
    Arrived {
        from: usize,
        stream: Stream,
        position: Position,
        body: Arc<[u8]>,
    },
    /// Messages of `stream` for the receiver were dropped at their home (`from`), whose queue
    /// to it was full: the receiver's hub closes the connections that follow the stream, so
    /// they reconnect with `since` (`Event::Interrupted`).
    Interrupted { from: usize, stream: Stream },
    /// `Engine::delivered`, for streams homed at the receiver: the reports of one pass of the
    /// sender's hub, batched (see `BusEngine::delivered`).
    Delivered(Vec<(Stream, Vec<Position>)>),
    /// `Engine::acked`, for a duplicate window kept at the receiver.
    Acked {
        sender: Arc<str>,
        client_id: Arc<str>,
        position: Position,
        status: AckStatus,
    },
    /// Worker `from` now holds a connection of `id` (sent to every worker: each keeps the id's
    /// duplicate windows it holds alive, and the id's home routes its inbox by it).
    Online { from: usize, id: Arc<str> },
    /// Worker `from` no longer holds any connection of `id`.
    Offline { from: usize, id: Arc<str>, now: Now },
    /// Worker `from` now holds a member of `room` (sent to the room's home only), or is about
    /// to (it asked for the room's recovery, see `BusEngine::recover`).
    Joined { from: usize, room: Arc<str> },
    /// Worker `from` no longer holds any member of `room`.
    Left { from: usize, room: Arc<str> },
    /// A connection on the sender (`member.worker`) became a member of `room` (homed at the
    /// receiver), or its `info` changed (a token refresh): `Engine::member_joined`
    /// (`presence.rs`).
    MemberJoined { room: Arc<str>, member: RoomMember },
    /// The connection `conn` on worker `from` is no longer a member of `room` (homed at the
    /// receiver): `Engine::member_left`.
    MemberLeft {
        from: usize,
        room: Arc<str>,
        conn: u64,
    },
    /// The members of `room` on every worker but the receiver, at `version` of the receiver's
    /// view of the room: the home's (`from`) answer to the receiver's `Joined`.
    Snapshot {
        from: usize,
        room: Arc<str>,
        version: u64,
        members: Vec<RoomMember>,
    },
    /// A change to `room`'s members made on another worker than the receiver, numbered
    /// `version` in the receiver's view by the room's home (`from`).
    Presence {
        from: usize,
        room: Arc<str>,
        version: u64,
        member: RoomMember,
        joined: bool,
    },
    /// Worker `from`'s hub has acted on every direct message the receiver (their inbox's
    /// home) handed it up to `through`, as `Arrived` or as a `Reply` (or holds it back behind
    /// an earlier answer): its `delivered` reports for them came before, or are `reports`
    /// (those of its last pass, as `Delivered` carries them: one note rather than two).
    Handled {
        from: usize,
        through: Position,
        reports: Vec<(Stream, Vec<Position>)>,
    },
}

/// A member of a room (one connection) as it crosses: the worker it is connected to, its
/// number there (`LocalMember::conn`), its id and its token's `info` (JSON text).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct RoomMember {
    pub(super) worker: usize,
    pub(super) conn: u64,
    pub(super) id: Arc<str>,
    pub(super) info: Option<Arc<str>>,
}

impl Note {
    /// The event the receiver's hub gets for an `Arrived` note.
    pub(super) fn arrival(stream: &Stream, position: Position, body: &Arc<[u8]>) -> Event {
        Event::Arrived(Arrival {
            stream: stream.local(),
            position,
            body: Rc::from(&**body),
        })
    }

    /// The event the receiver's hub gets for a `Reply` note.
    pub(super) fn completion(ticket: Ticket, answer: Answer) -> Event {
        Event::Completed(Completion {
            ticket,
            outcome: answer.into_outcome(),
        })
    }
}
