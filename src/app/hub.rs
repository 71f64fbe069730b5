//! The hub: who is connected as whom, in which rooms, and where every message goes.
//!
//! Owns: routing every request path (`route`: the WebSocket endpoints, the demo page's files
//! served by `demo`, and the reactor's own endpoints, which the reactor renders), admission of
//! WebSocket requests (Origin, identity, `?since=`, subprotocol) with a `Refusal` that says why,
//! raw rooms (`/r/<room>`), the `/ws` envelope commands (send, publish, join, leave, members,
//! refresh, history), presence, acks and what each promises, the order of a room join's replay
//! against live traffic (SPEC §16), the rate limit, what each connection's token allows and
//! closing it when the token expires (SPEC §16, with `tokens.rs`), and the hub's metrics.
//! Does not: see sockets, descriptors or frames' bytes on the wire (SPEC §1). It acts on
//! connections only through `Transport` (send a message or a shared frame to a `ConnId`, close
//! one), which `App` implements with the reactor's `Outbox` and tests with a recorder. Nor does
//! it keep messages: every id's inbox, the msg_ids (stream positions), the offline queue,
//! recovery and duplicate windows live behind the `Engine` (SPEC §13, `engine/mod.rs`).
//!
//! Implements SPEC §6 (endpoints and the relay) and the hub's side of SPEC §13, as
//! docs/protocol.md tells it to clients.
//!
//! # Store, then deliver
//!
//! A `send` or `publish` is submitted to the engine with a `Ticket`; the hub remembers what the
//! ticket is for (`Work`) and acts when the engine completes it (`pump`): on `Stored` it renders
//! the message with its position as msg_id, hands it to the recipients and acks; on `Rejected`
//! it acks `rejected` with the reason. The memory engine completes inside the call, so the ack
//! leaves in the same loop iteration; the file engine completes after the fsync of the batch
//! holding the message, when the reactor's waker fires (`wake`).
//!
//! Ordering guarantees: the engine completes work in submission order, and the single-threaded
//! loop queues every frame in completion order, so messages from one sender reach each
//! recipient in the order they were sent. A connecting `/ws` client is `recovering` until its
//! `Recovered` completes: it gets no live direct message meanwhile (the recovery holds every
//! message stored before it), and what it sends meanwhile is held and handled right after. So
//! it gets its welcome, then its retained messages in msg_id order, then live traffic.
//!
//! A room join with history on works the same way for one room (see `join`): the connection
//! becomes a member when the engine's answer to the join arrives, so the room's messages stored
//! before it are in the replay and every later one arrives live, each exactly once.

use super::api::ApiState;
use super::auth::{self, AuthError, Grant, JwtVerifier};
use super::clock::Clock;
use super::config::AppConfig;
use super::dedup::Dedup;
use super::demo;
use super::envelope::{self, AckStatus, Command, EnvelopeError, Member, MsgId, PresenceEvent};
use super::metrics::{HubGauges, HubMetrics};
use super::ratelimit::{RateLimit, TokenBucket};
use super::rooms::Rooms;
use super::tokens::{Access, Tokens, TOKEN_EXPIRED, TOKEN_EXPIRED_REASON};
use crate::engine::{
    Append, Arrival, Completion, Engine, Epoch, Event, Limits, LocalMember, MemoryEngine, Now,
    Outcome, Position, PresenceChange, Publish, Recovery, Refusal as StoreRefusal, Replayed, Since,
    StreamId, Ticket,
};
use crate::protocol::frame::{self, OpCode};
use crate::protocol::handshake::Request;
use crate::protocol::{CloseCode, Refusal};
use crate::server::{ConnId, Outbox, Route, Sent, ServerEndpoint};
use log::{debug, warn};
use serde_json::value::RawValue;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// The subprotocol of the envelope protocol, confirmed when a client offers it (RFC 6455
/// §4.2.2 item 5.4, SPEC §6).
pub const SUBPROTOCOL: &str = "wsrelay.v1";

/// Rooms one `/ws` connection may be in at once: bounds the memory a client can pin.
pub const MAX_ROOMS_PER_CONNECTION: usize = 256;

/// The most messages one `history` reply holds, whatever `limit` and `--room-history` say:
/// bounds the size of one reply frame.
pub const MAX_HISTORY_PAGE: usize = 1000;

/// Messages a `/ws` connection may send before its welcome (while its recovery is with the
/// engine); they are held and handled after it. Beyond it the connection is closed (1008):
/// a client has no reason to pipeline more than a few commands before it is greeted.
pub const MAX_HELD_MESSAGES: usize = 256;

/// What the hub can do to connections. `App` implements it with the reactor's `Outbox`.
pub trait Transport {
    /// Encodes `payload` as one frame for `to` alone.
    fn send(&mut self, to: ConnId, opcode: OpCode, payload: &[u8]) -> Sent;
    /// Encodes `payload` once as a frame for `send_shared` to many recipients. (`Outbox` does
    /// the same in one allocation instead of two.)
    fn encode_shared(&mut self, opcode: OpCode, payload: &[u8]) -> Rc<[u8]> {
        Rc::from(frame::encode(true, opcode, payload, None))
    }
    /// Queues a frame encoded once (`encode_shared`) and shared by many recipients.
    fn send_shared(&mut self, to: ConnId, frame: &Rc<[u8]>) -> Sent;
    /// Like `send_shared`, but queued even over `--max-outbound`: for the welcome and the first
    /// message of a backlog, which a connection must always be able to take (see `open`).
    fn send_shared_unbounded(&mut self, to: ConnId, frame: &Rc<[u8]>) -> Sent;
    /// Closes `conn` with `code` once the current callback returns.
    fn close(&mut self, conn: ConnId, code: CloseCode, reason: &'static str);
    /// Asks to be woken (`Hub::timer`) at `at`, with no client event; the earliest request
    /// stands (`Outbox::wake_at`).
    fn wake_at(&mut self, at: Instant);
    /// Answers the server API request `conn` waits on with a JSON body (SPEC §16).
    fn respond(&mut self, conn: ConnId, status: u16, body: Vec<u8>);
}

impl Transport for Outbox<'_> {
    fn send(&mut self, to: ConnId, opcode: OpCode, payload: &[u8]) -> Sent {
        Outbox::send(self, to, opcode, payload)
    }

    fn encode_shared(&mut self, opcode: OpCode, payload: &[u8]) -> Rc<[u8]> {
        Outbox::encode_shared(self, opcode, payload)
    }

    fn send_shared(&mut self, to: ConnId, frame: &Rc<[u8]>) -> Sent {
        Outbox::send_shared(self, to, frame)
    }

    fn send_shared_unbounded(&mut self, to: ConnId, frame: &Rc<[u8]>) -> Sent {
        Outbox::send_shared_unbounded(self, to, frame)
    }

    fn close(&mut self, conn: ConnId, code: CloseCode, reason: &'static str) {
        Outbox::close(self, conn, code, reason)
    }

    fn wake_at(&mut self, at: Instant) {
        Outbox::wake_at(self, at)
    }

    fn respond(&mut self, conn: ConnId, status: u16, body: Vec<u8>) {
        Outbox::respond(self, conn, status, body)
    }
}

/// Per-connection state, kept by the reactor and handed back on every callback.
#[derive(Debug)]
///
/// The reactor keeps one per open connection, so its size counts in every idle connection's
/// memory (docs/benchmarks.md, "Idle memory"): what only some connections have is boxed.
pub struct Session {
    endpoint: Endpoint,
    /// The rate limit's bucket, when `--rate` is set.
    bucket: Option<Box<TokenBucket>>,
    /// The grant of the request's token (with `--jwt-secret`), from admission until `open`
    /// moves it into the hub's `tokens`, where refreshes replace it. Boxed: every session
    /// carries the field, and an empty one should cost a pointer, not the grant's size.
    grant: Option<Box<Grant>>,
}

impl Session {
    /// The raw room (`/r/<room>`) this connection is a member of, if it is one.
    pub fn raw_room(&self) -> Option<&Rc<str>> {
        match &self.endpoint {
            Endpoint::Raw(room) => Some(room),
            _ => None,
        }
    }
}

/// Which endpoint an open connection belongs to.
#[derive(Debug)]
enum Endpoint {
    /// `/echo`: every data message comes back to its sender, same opcode.
    Echo,
    /// `/r/<room>`: every data message goes verbatim to the room's other members.
    Raw(Rc<str>),
    /// `/ws`: the envelope protocol. Boxed: a `Peer` is several times the size of the other
    /// variants, which every `/echo` and raw-room session would otherwise pay for.
    Envelope(Box<Peer>),
}

/// A WebSocket endpoint a request asks for, before it is admitted (`Hub::admit`).
#[derive(Clone, Copy, Debug)]
enum WebSocketPath<'a> {
    /// `/echo`.
    Echo,
    /// `/ws`.
    Envelope,
    /// `/r/` and what follows it: a room name, if it is a valid one.
    Raw(&'a str),
}

/// Who a `/ws` connection is (or, for the server API, who a message is from).
#[derive(Clone, Debug)]
pub(super) struct Peer {
    id: Rc<str>,
    /// `?since=` (and `&epoch=`): replay retained messages after this one on connect.
    since: Option<Since>,
    /// The operator's backend (the server API, authenticated by its key): no token, and no
    /// token claim restricts it. Said explicitly: `Tokens` refuses a connection without a
    /// token when tokens are required (fail closed).
    backend: bool,
}

impl Peer {
    /// The sender of a server API message (SPEC §16): may publish anywhere, recovers nothing.
    pub(super) fn backend(id: Rc<str>) -> Peer {
        Peer {
            id,
            since: None,
            backend: true,
        }
    }
}

pub struct Hub {
    clock: Box<dyn Clock>,
    jwt: Option<JwtVerifier>,
    allow_origins: Vec<String>,
    rate_limit: Option<RateLimit>,
    /// Members of `/r/<room>` rooms. A namespace of its own: raw members get raw frames, so an
    /// envelope room of the same name is a different room.
    raw_rooms: Rooms,
    /// Rooms joined with the envelope protocol.
    pub(super) rooms: Rooms,
    /// The open `/ws` connections of each id (its devices). An id is here iff it has one.
    pub(super) online: HashMap<Rc<str>, Vec<ConnId>>,
    /// The id of each open `/ws` connection (the reverse of `online`), for member lists.
    pub(super) names: HashMap<ConnId, Rc<str>>,
    /// Where streams live (SPEC §13).
    engine: Box<dyn Engine>,
    /// What each ticket submitted to the engine is for, until it completes.
    waiting: HashMap<Ticket, Work>,
    /// Bytes of the bodies of the sends and publishes in `waiting`, and their bound.
    in_flight_bytes: usize,
    max_in_flight_bytes: usize,
    next_ticket: u64,
    /// `/ws` connections whose recovery has not completed, with what they sent meanwhile.
    recovering: HashMap<ConnId, Vec<Vec<u8>>>,
    /// Reused between `pump`s.
    events: Vec<Event>,
    /// `--offline-max` is above 0: direct messages are stored (else they only get a position).
    retains: bool,
    /// What each token-authenticated connection may do now, and when its token expires.
    pub(super) tokens: Tokens,
    /// The expiry (wall-clock ms) the reactor was last asked to wake the hub for, until that
    /// wake-up comes (`timer`). A new token that expires sooner asks again; one that expires
    /// later does not (the reactor keeps the earliest request anyway).
    wake_requested: Option<u64>,
    metrics: HubMetrics,
    /// The server API (`api.rs`): its key, the requests waiting for an ack, its counters.
    pub(super) api: ApiState,
    /// `--room-history`: messages kept per envelope room (0: history off, SPEC §16).
    room_history: usize,
    /// Bytes of messages one `history` reply may hold (`--max-message`).
    history_page_max_bytes: usize,
    /// Joins waiting for the engine's answer (room history on), by connection and room: the
    /// ticket of the latest one. A `leave`, a newer `join` of the same room or the connection's
    /// close removes or replaces it, and the answer to a ticket no longer here is dropped.
    joining: HashMap<(ConnId, Rc<str>), Ticket>,
    /// `--workers` above 1: told of every raw-room message relayed here, so that it reaches
    /// the members on other workers (`app/raw_bus.rs`). `None` with one worker.
    raw_outlet: Option<RawOutlet>,
    /// Connections over the rate limit that still had work with the engine: closed once that
    /// work has completed (`close_after_work`). Empty nearly always.
    closing: HashMap<ConnId, Closing>,
}

/// A connection to close once its work with the engine has completed.
#[derive(Debug)]
struct Closing {
    code: CloseCode,
    reason: &'static str,
    /// Its tickets still in `waiting`.
    work: usize,
}

/// Where a raw-room message relayed on this worker also goes: (room, opcode, payload).
pub type RawOutlet = Box<dyn FnMut(&str, OpCode, &[u8])>;

/// The close code for connections whose stream lost messages on the way to this node (1012,
/// "service restart" in the IANA registry: the client reconnects).
const STREAM_INTERRUPTED: CloseCode = CloseCode(1012);

/// The `reason` of a message refused because too much is waiting for the engine.
const STORE_BUSY: &str = "the server is busy storing messages; try again later";

/// What a piece of work counts against `--max-in-flight-bytes`.
fn work_bytes(work: &Work) -> usize {
    match work {
        Work::Send { body, .. } | Work::Publish { body, .. } => body.len(),
        Work::Recover { .. } | Work::Join { .. } | Work::History { .. } => 0,
    }
}

/// Work submitted to the engine, waiting for its completion.
#[derive(Debug)]
enum Work {
    /// A direct message from `conn`, stored in `to`'s inbox (`retained`), or only given a
    /// position (`--offline-max 0`).
    Send {
        conn: ConnId,
        sender: Rc<str>,
        client_id: Option<Rc<str>>,
        to: Rc<str>,
        body: Rc<[u8]>,
        retained: bool,
    },
    /// A room message from `conn`.
    Publish {
        conn: ConnId,
        client_id: Option<Rc<str>>,
        sender: Rc<str>,
        room: Rc<str>,
        body: Rc<[u8]>,
    },
    /// What `conn` gets on connect.
    Recover { conn: ConnId, peer: Peer },
    /// A `join` of `room` (room history on): what the room's history holds after `since`, and
    /// the newest position, before the connection becomes a member (see `join`).
    Join {
        conn: ConnId,
        peer: Peer,
        room: Rc<str>,
        since: Option<Since>,
    },
    /// A `history` request of `conn` for `room`.
    History { conn: ConnId, room: Rc<str> },
}

impl Work {
    /// The connection the work is for (the server API's request, for its publishes).
    fn conn(&self) -> ConnId {
        match self {
            Work::Send { conn, .. }
            | Work::Publish { conn, .. }
            | Work::Recover { conn, .. }
            | Work::Join { conn, .. }
            | Work::History { conn, .. } => *conn,
        }
    }
}

/// The engine's retention bounds from the relay's flags.
pub fn limits(config: &AppConfig) -> Limits {
    Limits {
        per_stream: config.offline_max,
        ttl_ms: u64::try_from(config.offline_ttl.as_millis()).unwrap_or(u64::MAX),
        max_bytes: config.offline_max_bytes,
    }
}

/// Room history's bounds from the relay's flags (SPEC §16; `per_stream` 0: off).
pub fn room_history_limits(config: &AppConfig) -> Limits {
    Limits {
        per_stream: config.room_history,
        ttl_ms: u64::try_from(config.room_history_ttl.as_millis()).unwrap_or(u64::MAX),
        max_bytes: config.room_history_max_bytes,
    }
}

/// The duplicate windows' bounds from the relay's flags.
pub fn dedup(config: &AppConfig) -> Dedup {
    Dedup::new(
        config.dedup_window,
        config.offline_ttl,
        config.dedup_max_bytes,
    )
}

/// Queues replayed messages (a welcome's backlog, a room join's replay) on `conn` in order,
/// each with its msg_id: the first whatever --max-outbound says, so a connection always makes
/// progress, the rest while they fit. Returns how many were queued; fewer than all means the
/// queue is full and the caller closes the connection rather than let live traffic overtake
/// the rest.
fn queue_replay(conn: ConnId, messages: &[Replayed], tx: &mut impl Transport) -> usize {
    for (i, m) in messages.iter().enumerate() {
        let text = envelope::with_msg_id(&m.body, MsgId(m.position.0));
        let frame = tx.encode_shared(OpCode::Text, &text);
        let sent = if i == 0 {
            tx.send_shared_unbounded(conn, &frame)
        } else {
            tx.send_shared(conn, &frame)
        };
        if sent != Sent::Queued {
            return i;
        }
    }
    messages.len()
}

/// How the engine names a connection of this hub in presence (`LocalMember::conn`): its
/// `ConnId` packed, unique on this node for the node's life (slot and generation).
fn member_conn(conn: ConnId) -> u64 {
    (u64::from(conn.generation) << 32) | u64::from(conn.slot)
}

/// The `info` of a member on another node as shown to clients, and whether it had to be
/// dropped: it crossed the network as text, so it is checked to be JSON (else `null`) rather
/// than trusted into a frame.
fn remote_info(info: Option<&str>) -> (Option<&RawValue>, bool) {
    match info.map(serde_json::from_str::<&RawValue>) {
        None => (None, false),
        Some(Ok(raw)) => (Some(raw), false),
        Some(Err(_)) => (None, true),
    }
}

impl Hub {
    /// A hub on the memory engine (the default, SPEC §13).
    pub fn new(config: AppConfig, clock: Box<dyn Clock>) -> Hub {
        let now = Now {
            instant: clock.now(),
            unix_ms: clock.unix_ms(),
        };
        let engine = MemoryEngine::new(limits(&config), dedup(&config), now)
            .with_room_history(room_history_limits(&config));
        Hub::with_engine(config, clock, Box::new(engine))
    }

    /// A hub on a given engine (`--data-dir`: the file engine).
    pub fn with_engine(config: AppConfig, clock: Box<dyn Clock>, engine: Box<dyn Engine>) -> Hub {
        Hub {
            jwt: config
                .jwt_secret
                .as_deref()
                .map(|secret| JwtVerifier::with_leeway(secret, config.jwt_leeway.as_secs())),
            allow_origins: config.allow_origins,
            rate_limit: config.rate_limit,
            raw_rooms: Rooms::default(),
            rooms: Rooms::default(),
            online: HashMap::new(),
            names: HashMap::new(),
            engine,
            waiting: HashMap::new(),
            in_flight_bytes: 0,
            max_in_flight_bytes: config.max_in_flight_bytes,
            next_ticket: 0,
            recovering: HashMap::new(),
            events: Vec::new(),
            retains: config.offline_max > 0,
            tokens: Tokens::new(config.jwt_secret.is_some()),
            wake_requested: None,
            metrics: HubMetrics::default(),
            api: ApiState::new(config.api_key.as_deref(), config.api_max_body),
            room_history: config.room_history,
            history_page_max_bytes: config.history_page_max_bytes,
            joining: HashMap::new(),
            clock,
            raw_outlet: None,
            closing: HashMap::new(),
        }
    }

    /// `--workers` above 1: every raw-room message relayed here is also handed to `outlet`
    /// (the bus to the other workers, `app/raw_bus.rs`).
    pub fn set_raw_outlet(&mut self, outlet: RawOutlet) {
        self.raw_outlet = Some(outlet);
    }

    /// A raw-room message relayed by another worker: to every member here, verbatim, the frame
    /// encoded once for all of them (SPEC §14). Returns how many members it was queued for.
    pub fn deliver_raw(
        &mut self,
        room: &str,
        opcode: OpCode,
        payload: &[u8],
        tx: &mut impl Transport,
    ) -> usize {
        let frame = tx.encode_shared(opcode, payload);
        let mut queued = 0;
        for member in self.raw_rooms.members(room) {
            if tx.send_shared(member, &frame) == Sent::Queued {
                self.metrics.raw_deliveries += 1;
                queued += 1;
            }
        }
        queued
    }

    /// Is `--jwt-secret` configured (ids are verified) or are `?id=`s trusted?
    pub fn authenticates(&self) -> bool {
        self.jwt.is_some()
    }

    // ----- routing and admission -----------------------------------------------------------

    /// Decides what a request becomes (SPEC §3, §6). This is the server's one table of paths:
    /// the reactor's own endpoints are here too (it renders them, since it holds their
    /// figures), so every path is found, and refused with the same rules, in one place.
    pub fn route(&mut self, request: &Request) -> Route<Session> {
        self.sweep();
        // Every resource of this server is read with GET; a WebSocket upgrade is a GET too
        // (RFC 6455 §4.1).
        if request.method() != "GET" {
            return Route::Refuse(Refusal::MethodNotAllowed);
        }
        let path = request.path();
        let wanted = match path {
            "/healthz" => return Route::Server(ServerEndpoint::Health),
            "/stats.json" => return Route::Server(ServerEndpoint::Stats),
            "/metrics" => return Route::Server(ServerEndpoint::Metrics),
            "/echo" => WebSocketPath::Echo,
            "/ws" => WebSocketPath::Envelope,
            _ => match path.strip_prefix("/r/") {
                Some(room) => WebSocketPath::Raw(room),
                // The demo page's files (`/`, `/demo.css`, `/demo.js`), or nothing.
                None => {
                    return match demo::response(path) {
                        Some(page) => Route::Resource(page),
                        None => Route::Refuse(Refusal::NotFound),
                    }
                }
            },
        };
        match self.admit(wanted, request) {
            Ok((endpoint, protocol, grant)) => Route::Upgrade {
                session: Session {
                    endpoint,
                    bucket: self
                        .rate_limit
                        .map(|limit| Box::new(TokenBucket::new(limit, self.clock.now()))),
                    grant: grant.map(Box::new),
                },
                protocol,
            },
            Err(refusal) => Route::Refuse(refusal),
        }
    }

    /// Admits a request to a WebSocket endpoint: an allowed Origin first (SPEC §6), then what
    /// the endpoint itself asks of the request. Returns the endpoint, the subprotocol to
    /// confirm, and the token's grant (with `--jwt-secret`).
    fn admit(
        &mut self,
        wanted: WebSocketPath<'_>,
        request: &Request,
    ) -> Result<(Endpoint, Option<&'static str>, Option<Grant>), Refusal> {
        if !auth::origin_allowed(&self.allow_origins, request.header("origin")) {
            self.metrics.origin_rejections += 1;
            return Err(Refusal::Forbidden(
                "Origin not allowed (see --allow-origin)",
            ));
        }
        match wanted {
            WebSocketPath::Echo => Ok((Endpoint::Echo, None, None)),
            WebSocketPath::Envelope => self.admit_envelope(request),
            WebSocketPath::Raw(room) => self.admit_raw(room, request),
        }
    }

    /// `/r/<room>`: a valid name, and with auth configured a token allowing the room.
    fn admit_raw(
        &mut self,
        name: &str,
        request: &Request,
    ) -> Result<(Endpoint, Option<&'static str>, Option<Grant>), Refusal> {
        if name.contains('/') {
            return Err(Refusal::NotFound);
        }
        envelope::validate_room(name).map_err(|e| Refusal::InvalidTarget(e.message()))?;
        let grant = self.authenticate(request)?;
        if grant.as_ref().is_some_and(|g| !g.allows(name)) {
            return Err(Refusal::Forbidden("this room is not allowed by your token"));
        }
        Ok((Endpoint::Raw(Rc::from(name)), None, grant))
    }

    /// `/ws`: an identity (a token's `sub`, or `?id=` without auth), an optional `?since=`.
    fn admit_envelope(
        &mut self,
        request: &Request,
    ) -> Result<(Endpoint, Option<&'static str>, Option<Grant>), Refusal> {
        let grant = self.authenticate(request)?;
        let id = match &grant {
            Some(grant) => grant.id.clone(),
            // Without --jwt-secret the id is claimed, not proven (docs/protocol.md, "Access").
            None => {
                let Some(id) = request.query_param("id") else {
                    return Err(Refusal::InvalidTarget("?id=<your id> is required".into()));
                };
                envelope::validate_id(&id).map_err(|e| Refusal::InvalidTarget(e.message()))?;
                id
            }
        };
        let epoch = match request.query_param("epoch") {
            None => None,
            Some(text) => match Epoch::parse(&text) {
                Some(epoch) => Some(epoch),
                None => {
                    return Err(Refusal::InvalidTarget(
                        "?epoch= must be the welcome's epoch (16 hex digits)".into(),
                    ))
                }
            },
        };
        let since = match request.query_param("since") {
            None => None,
            Some(text) => match MsgId::parse(&text) {
                // SPEC §13: without an epoch, the engine judges the position by its marks.
                Some(since) => Some(Since {
                    position: Position(since.0),
                    epoch,
                }),
                None => {
                    return Err(Refusal::InvalidTarget(
                        "?since= must be a msg_id (decimal digits)".into(),
                    ))
                }
            },
        };
        // RFC 6455 §4.2.2 item 5.4: confirm one of the client's offers, or none. Subprotocol
        // names are compared exactly (RFC 6455 §11.5: registered names are case-sensitive).
        let offered = request
            .headers("sec-websocket-protocol")
            .flat_map(|v| v.split(','))
            .any(|offer| offer.trim() == SUBPROTOCOL);
        let peer = Peer {
            id: Rc::from(id),
            since,
            backend: false,
        };
        let protocol = offered.then_some(SUBPROTOCOL);
        Ok((Endpoint::Envelope(Box::new(peer)), protocol, grant))
    }

    /// With `--jwt-secret`, the grant of the request's token; without it, `None` (ids are
    /// trusted). A missing or refused token is a 401 naming why, counted by reason.
    fn authenticate(&mut self, request: &Request) -> Result<Option<Grant>, Refusal> {
        let Some(jwt) = &self.jwt else {
            return Ok(None);
        };
        let verified = match auth::token_of(request) {
            None => Err(AuthError::Missing),
            Some(token) => jwt.verify(&token, self.clock.unix_ms()),
        };
        verified.map(Some).map_err(|e| {
            HubMetrics::bump(&mut self.metrics.auth_failures, e.label());
            debug!("401 for {}: {}", request.path(), e.label());
            Refusal::Unauthorized(e.label())
        })
    }

    // ----- connection life ---------------------------------------------------------------------

    /// The connection is open: join its raw room, or ask the engine what waited for a `/ws`
    /// client (its welcome follows when the recovery completes, see `recovered`).
    pub fn open(&mut self, conn: ConnId, session: &mut Session, tx: &mut impl Transport) {
        let now = self.sweep();
        if let Some(grant) = session.grant.take() {
            self.tokens
                .insert(conn, Access::new(*grant, self.leeway_ms()));
            self.schedule_expiry(tx);
        }
        match &session.endpoint {
            Endpoint::Echo => {}
            Endpoint::Raw(room) => {
                self.raw_rooms.join(conn, room);
            }
            Endpoint::Envelope(peer) => {
                debug!("{conn:?} is {} on /ws", peer.id);
                self.online
                    .entry(Rc::clone(&peer.id))
                    .or_default()
                    .push(conn);
                self.names.insert(conn, Rc::clone(&peer.id));
                self.engine.online(&peer.id);
                self.recovering.insert(conn, Vec::new());
                let ticket = self.ticket();
                let stream = StreamId::Inbox(Rc::clone(&peer.id));
                self.engine.recover(ticket, &stream, peer.since, now);
                let peer = Peer::clone(peer);
                self.wait_for(ticket, Work::Recover { conn, peer });
            }
        }
        self.pump(tx);
    }

    /// A data message from `conn`.
    #[inline]
    pub fn message(
        &mut self,
        conn: ConnId,
        session: &mut Session,
        opcode: OpCode,
        payload: &[u8],
        tx: &mut impl Transport,
    ) {
        // /echo without a rate limit does nothing but echo (SPEC §6), so it is decided first, in
        // a function small enough to be inlined into the reactor's call: the echo of the hottest
        // path then pays neither the checks below nor the setting up of the larger function
        // (about 40 instructions per message, docs/benchmarks.md). An echo connection is never
        // in `closing`: it submits no work to the engine, so an over-limit echo is closed at
        // once (`close_after_work`), and without a bucket it is never over a limit.
        if matches!(session.endpoint, Endpoint::Echo) && session.bucket.is_none() {
            tx.send(conn, opcode, payload);
            return;
        }
        self.any_message(conn, session, opcode, payload, tx);
    }

    /// `message`, for every endpoint (/echo with a rate limit, the rooms, `/ws`).
    fn any_message(
        &mut self,
        conn: ConnId,
        session: &mut Session,
        opcode: OpCode,
        payload: &[u8],
        tx: &mut impl Transport,
    ) {
        // The raw endpoints never touch the engine: they skip its maintenance (`sweep`) and
        // its completions (`pump`), which would otherwise run per message on the hottest path
        // (docs/benchmarks.md, "User-space cost per message"). The engine is swept by every
        // other call into the hub, and nothing it holds can be due to a raw message.
        let raw = !matches!(session.endpoint, Endpoint::Envelope(_));
        if !self.closing.is_empty() && self.closing.contains_key(&conn) {
            // Over the rate limit, waiting for its acks before the Close: what it sends now
            // would have come after the Close had there been nothing to wait for.
            return;
        }
        let swept = (!raw).then(|| self.sweep().instant);
        if let Some(bucket) = &mut session.bucket {
            // The clock only when a rate limit needs it.
            let now = swept.unwrap_or_else(|| self.clock.now());
            if !bucket.take(now) {
                self.metrics.rate_limited += 1;
                debug!("{conn:?} exceeded the rate limit; closing 1008");
                let reason = "rate limit exceeded";
                self.close_after_work(conn, CloseCode::POLICY_VIOLATION, reason, tx);
                return;
            }
        }
        match &session.endpoint {
            Endpoint::Echo => {
                tx.send(conn, opcode, payload);
                return;
            }
            Endpoint::Raw(room) => {
                // A raw room has no acks or errors to refuse with: a member whose token may
                // join but not publish is a listener, and its first message closes it (1008),
                // saying why (docs/protocol.md, "Access").
                if !self.tokens.may_publish(conn, room) {
                    self.metrics.token_publish_refusals += 1;
                    let reason = "your token does not allow publishing to this room";
                    tx.close(conn, CloseCode::POLICY_VIOLATION, reason);
                    return;
                }
                self.relay_raw(conn, room, opcode, payload, tx);
                return;
            }
            Endpoint::Envelope(peer) => {
                if let Some(held) = self.recovering.get_mut(&conn) {
                    // Not greeted yet: handled after the welcome (see the module doc). Only
                    // text can be an envelope; anything else gets its error then too.
                    if held.len() >= MAX_HELD_MESSAGES {
                        tx.close(
                            conn,
                            CloseCode::POLICY_VIOLATION,
                            "too many messages before the welcome",
                        );
                    } else if opcode == OpCode::Text {
                        held.push(payload.to_vec());
                    } else {
                        self.error(conn, EnvelopeError::BinaryFrame, tx);
                    }
                    return;
                }
                self.on_envelope(conn, peer, opcode, payload, tx)
            }
        }
        self.pump(tx);
    }

    /// The connection is gone: leave its rooms (telling the others) and its id's devices.
    pub fn close(&mut self, conn: ConnId, session: Session, tx: &mut impl Transport) {
        let now = self.sweep();
        // Its token stops mattering; its info (also that of an expired token, which `Tokens`
        // keeps until now) is still shown in the leave events below.
        let info = self.tokens.remove(conn).and_then(|access| access.info);
        match session.endpoint {
            Endpoint::Echo => {}
            Endpoint::Raw(room) => {
                self.raw_rooms.leave(conn, &room);
            }
            Endpoint::Envelope(peer) => {
                self.names.remove(&conn);
                self.recovering.remove(&conn);
                self.closing.remove(&conn);
                if !self.joining.is_empty() {
                    self.joining.retain(|(c, _), _| *c != conn);
                }
                // Every room it was in, also those it was the last member of here (which
                // `leave_all` does not name: nobody here is left to tell), is left on the other
                // nodes, and one with no member here any more is no longer followed.
                let rooms = self.rooms.names_of(conn);
                for room in &rooms {
                    self.engine.member_left(room, member_conn(conn));
                }
                for room in self.rooms.leave_all(conn) {
                    let (id, info) = (&peer.id, info.as_deref());
                    self.presence(&room, id, info, PresenceEvent::Leave, None, tx);
                }
                for room in &rooms {
                    self.room_left(room);
                }
                if let Some(devices) = self.online.get_mut(&peer.id) {
                    devices.retain(|&d| d != conn);
                    if devices.is_empty() {
                        self.online.remove(&peer.id);
                        self.engine.offline(&peer.id, now);
                    }
                }
            }
        }
        self.pump(tx);
    }

    /// The engine woke the reactor (its answers are waiting): act on them.
    pub fn wake(&mut self, tx: &mut impl Transport) {
        self.sweep();
        self.pump(tx);
    }

    // ----- completions -------------------------------------------------------------------------

    /// Acts on everything the engine has finished, in order, until it has nothing more (acting
    /// may submit more work: the messages a recovering connection sent meanwhile).
    pub(super) fn pump(&mut self, tx: &mut impl Transport) {
        loop {
            let mut events = std::mem::take(&mut self.events);
            self.engine.poll(&mut events);
            if events.is_empty() {
                self.events = events;
                return;
            }
            for event in events.drain(..) {
                match event {
                    Event::Completed(c) => self.completed(c, tx),
                    Event::Arrived(a) => self.arrived(a, tx),
                    Event::Presence(change) => self.remote_presence(change, tx),
                    Event::Interrupted(stream) => self.interrupted(&stream, tx),
                }
            }
            self.events = events;
        }
    }

    /// Closes `conn` once the engine has completed everything it submitted, at once if
    /// nothing is out. A client over the rate limit gets the acks of the messages it sent
    /// within it, then the Close (docs/protocol.md, "Rate limit"): with an engine that
    /// completes later (the file engine, the workers' bus, Redis) the acks would otherwise be
    /// lost behind a Close sent first, and the client would resend messages already stored.
    fn close_after_work(
        &mut self,
        conn: ConnId,
        code: CloseCode,
        reason: &'static str,
        tx: &mut impl Transport,
    ) {
        // One scan per connection that goes over its limit (it is closed then): from here on
        // `wait_for` and `completed` keep the count.
        let work = self.waiting.values().filter(|w| w.conn() == conn).count();
        if work == 0 {
            tx.close(conn, code, reason);
        } else {
            let closing = Closing { code, reason, work };
            self.closing.insert(conn, closing);
        }
    }

    /// Remembers what `ticket` is for until the engine completes it.
    fn wait_for(&mut self, ticket: Ticket, work: Work) {
        if !self.closing.is_empty() {
            // Held messages of a closing connection submitted after its welcome.
            if let Some(closing) = self.closing.get_mut(&work.conn()) {
                closing.work += 1;
            }
        }
        self.waiting.insert(ticket, work);
    }

    /// `conn`'s work with `ticket` has completed and been acted on: a closing connection with
    /// nothing more out is closed now, after its ack.
    fn settle_closing(&mut self, conn: ConnId, tx: &mut impl Transport) {
        let Some(closing) = self.closing.get_mut(&conn) else {
            return;
        };
        closing.work = closing.work.saturating_sub(1);
        if closing.work == 0 {
            if let Some(closing) = self.closing.remove(&conn) {
                tx.close(conn, closing.code, closing.reason);
            }
        }
    }

    fn completed(&mut self, completion: Completion, tx: &mut impl Transport) {
        let Some(work) = self.waiting.remove(&completion.ticket) else {
            warn!(
                "engine completed {:?}, which the hub never submitted",
                completion.ticket
            );
            return;
        };
        let conn = work.conn();
        self.act_on(work, completion, tx);
        if !self.closing.is_empty() {
            self.settle_closing(conn, tx);
        }
    }

    /// What a completion means for the work it completes: deliveries, acks, a welcome.
    fn act_on(&mut self, work: Work, completion: Completion, tx: &mut impl Transport) {
        if let Work::Send { body, .. } | Work::Publish { body, .. } = &work {
            self.in_flight_bytes = self.in_flight_bytes.saturating_sub(body.len());
        }
        // The recipient had a live connection on another node (SPEC §15): the ack may say
        // `delivered` although no connection here took the message.
        let elsewhere = matches!(completion.outcome, Outcome::StoredOnlineElsewhere { .. });
        match (work, completion.outcome) {
            (Work::Recover { conn, peer }, Outcome::Recovered(recovery)) => {
                self.recovered(conn, &peer, recovery, tx)
            }
            (
                Work::Join {
                    conn,
                    peer,
                    room,
                    since,
                },
                Outcome::Recovered(recovery),
            ) => self.joined(completion.ticket, conn, &peer, room, since, recovery, tx),
            (Work::History { conn, room }, Outcome::Recovered(page)) => {
                self.history_page(conn, &room, page, tx)
            }
            (work, Outcome::Stored { position } | Outcome::StoredOnlineElsewhere { position }) => {
                match work {
                    Work::Send {
                        conn,
                        sender,
                        client_id,
                        to,
                        body,
                        retained,
                    } => self.stored_send(
                        conn, &sender, client_id, to, &body, retained, position, elsewhere, tx,
                    ),
                    Work::Publish {
                        conn,
                        client_id,
                        sender,
                        room,
                        body,
                    } => self.stored_publish(conn, &sender, client_id, &room, &body, position, tx),
                    Work::Recover { .. } | Work::Join { .. } | Work::History { .. } => {}
                }
            }
            (work, Outcome::Duplicate { position, status }) => {
                if let Work::Send {
                    conn, client_id, ..
                }
                | Work::Publish {
                    conn, client_id, ..
                } = work
                {
                    self.metrics.duplicates += 1;
                    let msg_id = Some(MsgId(position.0));
                    self.ack(conn, client_id.as_deref(), msg_id, status, None, tx);
                }
            }
            (work, Outcome::Rejected(refusal)) => {
                if let Work::Send {
                    conn, client_id, ..
                }
                | Work::Publish {
                    conn, client_id, ..
                } = work
                {
                    match &refusal {
                        StoreRefusal::Full => self.metrics.offline_refused_full += 1,
                        StoreRefusal::Store(_) => self.metrics.store_rejections += 1,
                        StoreRefusal::Disabled | StoreRefusal::TooLarge => {}
                    }
                    let reason = Some(refusal.reason());
                    let rejected = AckStatus::Rejected;
                    self.ack(conn, client_id.as_deref(), None, rejected, reason, tx);
                }
            }
            (work, outcome) => warn!("engine answered {work:?} with {outcome:?}"),
        }
    }

    /// The welcome, then what waited for the connection (SPEC §6, §13), then what it sent
    /// before it was greeted.
    fn recovered(
        &mut self,
        conn: ConnId,
        peer: &Peer,
        recovery: Recovery,
        tx: &mut impl Transport,
    ) {
        let Some(held) = self.recovering.remove(&conn) else {
            return; // closed meanwhile: nothing was delivered, everything stays pending
        };
        if peer.since.is_some() && !recovery.recovered {
            self.metrics.recoveries_incomplete += 1;
        } else if peer.since.is_some() {
            self.metrics.recoveries_complete += 1;
        }
        // The welcome and the first message of the backlog are queued whatever --max-outbound
        // says (the 101 response already fills part of it): otherwise one message that fits
        // --max-message but not what the limit leaves would be refused on every connection, and
        // nothing behind it would ever arrive. The rest goes while it fits; if the queue fills
        // up, the rest stays pending and the connection is closed (1008): letting live traffic
        // overtake the rest would break the order, and the client gets the rest when it
        // reconnects (with the `close` policy the outbox has already asked for that close). So
        // every connection makes progress through its backlog.
        let welcome = envelope::welcome(
            &peer.id,
            recovery.last.map(|p| MsgId(p.0)),
            &recovery.epoch.to_string(),
            recovery.recovered,
        );
        let welcome = tx.encode_shared(OpCode::Text, &welcome);
        tx.send_shared_unbounded(conn, &welcome);
        let queued = queue_replay(conn, &recovery.messages, tx);
        let stalled = queued < recovery.messages.len();
        let mut delivered = Vec::new();
        for m in &recovery.messages[..queued] {
            if m.pending {
                delivered.push(m.position);
            } else {
                self.metrics.recovery_replayed += 1;
            }
        }
        self.metrics.offline_delivered += delivered.len() as u64;
        if !delivered.is_empty() {
            let stream = StreamId::Inbox(Rc::clone(&peer.id));
            self.engine.delivered(&stream, &delivered);
        }
        if stalled {
            tx.close(
                conn,
                CloseCode::POLICY_VIOLATION,
                "backlog exceeds --max-outbound",
            );
            return;
        }
        for text in held {
            self.on_envelope(conn, peer, OpCode::Text, &text, tx);
        }
    }

    /// A direct message is stored (or, with `--offline-max 0`, has its position): deliver it
    /// to the recipient's greeted connections, and ack what happened. `elsewhere`: the
    /// recipient had a live connection on another node (SPEC §15), which delivers it there and
    /// reports it delivered itself: the ack says `delivered` (docs/protocol.md).
    #[allow(clippy::too_many_arguments)]
    fn stored_send(
        &mut self,
        conn: ConnId,
        sender: &str,
        client_id: Option<Rc<str>>,
        to: Rc<str>,
        body: &[u8],
        retained: bool,
        position: Position,
        elsewhere: bool,
        tx: &mut impl Transport,
    ) {
        let msg_id = MsgId(position.0);
        let frame = tx.encode_shared(OpCode::Text, &envelope::with_msg_id(body, msg_id));
        self.metrics.direct_messages += 1;
        let (delivered, dropped) = self.deliver_live(&to, &frame, tx);
        let stream = StreamId::Inbox(to);
        let remote_only = elsewhere && !delivered && !dropped;
        let (status, reason) = if delivered || remote_only {
            (AckStatus::Delivered, None)
        } else if dropped || !retained {
            // Not delivered, and it must not wait as pending. Dropped: the recipient is online
            // but over --max-outbound with the `drop` policy; pending messages are delivered on
            // connect, so live traffic would overtake it (and its TTL could pass while the
            // recipient stays connected). Not retained: nothing can wait.
            let reason = if dropped {
                "recipient is online but too far behind to take it"
            } else {
                StoreRefusal::Disabled.reason()
            };
            (AckStatus::Rejected, Some(reason))
        } else {
            self.metrics.offline_queued += 1;
            (AckStatus::Queued, None)
        };
        if retained && status != AckStatus::Queued && !remote_only {
            self.engine.delivered(&stream, &[position]);
        }
        if status == AckStatus::Rejected {
            if let Some(client_id) = &client_id {
                self.engine.acked(sender, client_id, position, status);
            }
        }
        let msg_id = (status != AckStatus::Rejected).then_some(msg_id);
        self.ack(conn, client_id.as_deref(), msg_id, status, reason, tx);
    }

    /// Queues `frame` on every greeted connection of `id`. Returns whether one took it and
    /// whether one dropped it.
    fn deliver_live(
        &mut self,
        id: &str,
        frame: &Rc<[u8]>,
        tx: &mut impl Transport,
    ) -> (bool, bool) {
        let mut delivered = false;
        let mut dropped = false;
        for &device in self.online.get(id).into_iter().flatten() {
            if self.recovering.contains_key(&device) {
                // Its recovery, still to come, holds this message (rule 3 of the seam).
                continue;
            }
            match tx.send_shared(device, frame) {
                Sent::Queued => {
                    delivered = true;
                    self.metrics.direct_deliveries += 1;
                }
                Sent::Dropped => dropped = true,
                Sent::Closed | Sent::Gone => {}
            }
        }
        (delivered, dropped)
    }

    /// A room message has its position: to every member but the sender, and the ack says what
    /// the members did with it (docs/protocol.md, "Acks").
    #[allow(clippy::too_many_arguments)]
    fn stored_publish(
        &mut self,
        conn: ConnId,
        sender: &str,
        client_id: Option<Rc<str>>,
        room: &str,
        body: &[u8],
        position: Position,
        tx: &mut impl Transport,
    ) {
        let msg_id = MsgId(position.0);
        let frame = tx.encode_shared(OpCode::Text, &envelope::with_msg_id(body, msg_id));
        self.metrics.publish_messages += 1;
        let (mut queued, mut dropped) = (0usize, 0usize);
        for member in self.rooms.members(room) {
            if member == conn {
                continue;
            }
            match tx.send_shared(member, &frame) {
                Sent::Queued => queued += 1,
                Sent::Dropped => dropped += 1,
                // Being closed as a slow consumer (or already gone): it is leaving the room,
                // and its departure is announced to the others.
                Sent::Closed | Sent::Gone => {}
            }
        }
        self.metrics.publish_deliveries += queued as u64;
        // The sender must not read `delivered` when a current member dropped the message.
        let (status, reason) = match (queued, dropped) {
            (_, 0) => (AckStatus::Delivered, None),
            (0, _) => (
                AckStatus::Rejected,
                Some("every member is too far behind to take it".to_string()),
            ),
            (queued, dropped) => (
                AckStatus::Partial,
                Some(format!(
                    "dropped for {dropped} of {} members (over --max-outbound)",
                    queued + dropped
                )),
            ),
        };
        if status != AckStatus::Delivered {
            if let Some(client_id) = &client_id {
                self.engine.acked(sender, client_id, position, status);
            }
        }
        let msg_id = (status != AckStatus::Rejected).then_some(msg_id);
        let reason = reason.as_deref();
        self.ack(conn, client_id.as_deref(), msg_id, status, reason, tx);
    }

    /// A message someone else stored (another node or worker): to this hub's connections.
    fn arrived(&mut self, arrival: Arrival, tx: &mut impl Transport) {
        let msg_id = MsgId(arrival.position.0);
        let frame = tx.encode_shared(OpCode::Text, &envelope::with_msg_id(&arrival.body, msg_id));
        match &arrival.stream {
            StreamId::Inbox(id) => {
                if self.deliver_live(id, &frame, tx).0 {
                    self.engine.delivered(&arrival.stream, &[arrival.position]);
                }
            }
            StreamId::Room(room) => {
                for member in self.rooms.members(room) {
                    if tx.send_shared(member, &frame) == Sent::Queued {
                        self.metrics.publish_deliveries += 1;
                    }
                }
            }
        }
    }

    /// Messages of `stream` were lost before they reached this node and cannot be read back
    /// (SPEC §15): rather than skip them silently, close the connections that follow it with
    /// 1012 ("service restart": reconnect), so they come back with `since` and learn from
    /// `recovered: false` what is missing (docs/scaling.md, "Faults").
    fn interrupted(&mut self, stream: &StreamId, tx: &mut impl Transport) {
        let conns: Vec<ConnId> = match stream {
            StreamId::Inbox(id) => self.online.get(id).cloned().unwrap_or_default(),
            StreamId::Room(room) => self.rooms.members(room).collect(),
        };
        let reason = "messages were lost between nodes; reconnect with since";
        for conn in conns {
            tx.close(conn, STREAM_INTERRUPTED, reason);
        }
    }

    // ----- raw rooms -----------------------------------------------------------------------

    /// SPEC §6 `/r/<room>`: verbatim, same opcode, to every other member. The frame is encoded
    /// once and shared: a fan-out to n members allocates once, not n times (the simple version,
    /// `tx.send(member, opcode, payload)` per member, encodes and copies the payload n times).
    fn relay_raw(
        &mut self,
        conn: ConnId,
        room: &str,
        opcode: OpCode,
        payload: &[u8],
        tx: &mut impl Transport,
    ) {
        self.metrics.raw_messages += 1;
        let frame = tx.encode_shared(opcode, payload);
        for member in self.raw_rooms.members(room) {
            if member != conn && tx.send_shared(member, &frame) == Sent::Queued {
                self.metrics.raw_deliveries += 1;
            }
        }
        if let Some(outlet) = &mut self.raw_outlet {
            outlet(room, opcode, payload);
        }
    }

    // ----- the envelope protocol -------------------------------------------------------------

    fn on_envelope(
        &mut self,
        conn: ConnId,
        peer: &Peer,
        opcode: OpCode,
        payload: &[u8],
        tx: &mut impl Transport,
    ) {
        if opcode != OpCode::Text {
            return self.error(conn, EnvelopeError::BinaryFrame, tx);
        }
        // The reactor has validated text as UTF-8 (RFC 6455 §8.1); checked again rather than
        // trusted, since it costs one scan and cannot panic.
        let Ok(text) = std::str::from_utf8(payload) else {
            return self.error(conn, EnvelopeError::MalformedJson, tx);
        };
        match envelope::parse(text) {
            Err(e) => self.error(conn, e, tx),
            Ok(Command::Send { to, payload, id }) => {
                self.send(conn, peer, &to, payload, id.as_deref(), tx)
            }
            Ok(Command::Publish { room, payload, id }) => {
                self.publish(conn, peer, &room, payload, id.as_deref(), tx)
            }
            Ok(Command::Join { room, since, epoch }) => {
                let since = since.map(|msg_id| Since {
                    position: Position(msg_id.0),
                    // Checked by the parser: 16 hex digits.
                    epoch: epoch.as_deref().and_then(Epoch::parse),
                });
                self.join(conn, peer, &room, since, tx)
            }
            Ok(Command::Leave { room }) => self.leave(conn, peer, &room, tx),
            Ok(Command::Members { room }) => self.members(conn, &room, tx),
            Ok(Command::Refresh { token }) => self.refresh(conn, peer, &token, tx),
            Ok(Command::History { room, limit }) => self.history(conn, &room, limit, tx),
        }
    }

    /// A direct message: to every connection of `to`, once the engine has stored it in `to`'s
    /// inbox (for offline delivery and recovery; see `engine/streams.rs` for what is kept).
    pub(super) fn send(
        &mut self,
        conn: ConnId,
        peer: &Peer,
        to: &str,
        payload: &RawValue,
        client_id: Option<&str>,
        tx: &mut impl Transport,
    ) {
        let now = self.now();
        let body: Rc<[u8]> = Rc::from(envelope::message_body(
            &peer.id,
            Some(to),
            None,
            payload,
            now.unix_ms,
        ));
        if self.busy(conn, client_id, body.len(), tx) {
            return;
        }
        let to: Rc<str> = Rc::from(to);
        let client_id: Option<Rc<str>> = client_id.map(Rc::from);
        let ticket = self.ticket();
        let sender = Rc::clone(&peer.id);
        if self.retains {
            let append = Append {
                stream: StreamId::Inbox(Rc::clone(&to)),
                sender: Rc::clone(&sender),
                client_id: client_id.clone(),
                body: Rc::clone(&body),
            };
            self.engine.append(ticket, append, now);
        } else {
            // `--offline-max 0`: nothing is retained, so the message needs only a position
            // (and its client id a place in the duplicate window), which is what a room
            // message gets: the local engines ignore the "room", which names the inbox here.
            let publish = Publish {
                room: Rc::clone(&to),
                sender: Rc::clone(&sender),
                client_id: client_id.clone(),
                body: Rc::clone(&body),
                keep: false,
            };
            self.engine.publish(ticket, publish, now);
        }
        let work = Work::Send {
            conn,
            sender,
            client_id,
            to,
            body,
            retained: self.retains,
        };
        self.in_flight_bytes += work_bytes(&work);
        self.wait_for(ticket, work);
    }

    /// Refuses a message when `--max-in-flight-bytes` are already waiting for the engine (a
    /// disk slower than the traffic): memory stays bounded and the sender hears at once,
    /// rather than waiting behind a queue that only grows. One message is always let through,
    /// so a message larger than the bound is not refused for ever.
    fn busy(
        &mut self,
        conn: ConnId,
        client_id: Option<&str>,
        len: usize,
        tx: &mut impl Transport,
    ) -> bool {
        if self.in_flight_bytes == 0
            || self.in_flight_bytes.saturating_add(len) <= self.max_in_flight_bytes
        {
            return false;
        }
        self.metrics.store_busy += 1;
        let rejected = AckStatus::Rejected;
        self.ack(conn, client_id, None, rejected, Some(STORE_BUSY), tx);
        true
    }

    /// A room message: to every member but the sender, once it has its position. Membership is
    /// not required to publish (a bot may announce into a room it does not listen to); the
    /// token's `publish` claim (by default its `rooms` claim) is, and a publish outside it is
    /// acked `rejected` (SPEC §16: every publish gets exactly one ack).
    pub(super) fn publish(
        &mut self,
        conn: ConnId,
        peer: &Peer,
        room: &str,
        payload: &RawValue,
        client_id: Option<&str>,
        tx: &mut impl Transport,
    ) {
        if !peer.backend && !self.tokens.may_publish(conn, room) {
            self.metrics.token_publish_refusals += 1;
            let reason = EnvelopeError::PublishForbidden.message();
            let rejected = AckStatus::Rejected;
            self.ack(conn, client_id, None, rejected, Some(&reason), tx);
            return;
        }
        let now = self.now();
        let body: Rc<[u8]> = Rc::from(envelope::message_body(
            &peer.id,
            None,
            Some(room),
            payload,
            now.unix_ms,
        ));
        if self.busy(conn, client_id, body.len(), tx) {
            return;
        }
        let room: Rc<str> = Rc::from(room);
        let client_id: Option<Rc<str>> = client_id.map(Rc::from);
        let ticket = self.ticket();
        let publish = Publish {
            room: Rc::clone(&room),
            sender: Rc::clone(&peer.id),
            client_id: client_id.clone(),
            body: Rc::clone(&body),
            keep: true,
        };
        self.engine.publish(ticket, publish, now);
        let work = Work::Publish {
            conn,
            client_id,
            sender: Rc::clone(&peer.id),
            room,
            body,
        };
        self.in_flight_bytes += work_bytes(&work);
        self.wait_for(ticket, work);
    }

    /// Joins a room and tells every member, the joiner included (its presence event), then
    /// answers `joined` (docs/protocol.md, "Room history"). Joining a room twice changes
    /// no membership: only the joiner hears its presence event again. With history on it still
    /// gets the replay after its `since`: under `--slow-consumer drop` a member may have lost
    /// live messages, so the hub cannot promise it has them (clients dedup by msg_id).
    ///
    /// With room history on, the join first asks the engine for what the room's history holds
    /// after `since` (and its newest position), and the connection becomes a member only when
    /// that answer comes: the engine answers in submission order, so every message stored
    /// before the answer is in the replay and every later one reaches the new member live,
    /// none twice and none missed. Replayed messages include the joiner's own (after a
    /// reconnect, a client wants its side of the conversation too; clients dedup by msg_id).
    ///
    /// With history off the join takes the same path when the engine shares rooms with other
    /// nodes or workers (`Engine::shares_rooms`): their messages reach this node through a
    /// subscription, and the engine's answer is what orders the first join against it, so the
    /// joiner misses nothing published after its `joined` (docs/scaling.md). It replays
    /// nothing. A local engine has no such window: that join is immediate.
    fn join(
        &mut self,
        conn: ConnId,
        peer: &Peer,
        room: &str,
        since: Option<Since>,
        tx: &mut impl Transport,
    ) {
        if !self.tokens.may_join(conn, room) {
            return self.error(conn, EnvelopeError::Forbidden, tx);
        }
        let info = self.tokens.info(conn);
        let info = info.as_deref();
        let member = self.rooms.is_member(conn, room);
        if !member && self.rooms.rooms_of(conn) >= MAX_ROOMS_PER_CONNECTION {
            return self.error(conn, EnvelopeError::TooManyRooms, tx);
        }
        if self.room_history > 0 || self.engine.shares_rooms() {
            let room: Rc<str> = Rc::from(room);
            let stream = StreamId::Room(Rc::clone(&room));
            let ticket = self.ticket();
            // A member gets the replay too: under `--slow-consumer drop` it may have lost live
            // messages, so "it got everything live" cannot be promised (clients dedup by
            // msg_id what it did get).
            self.engine.recover(ticket, &stream, since, self.now());
            self.joining.insert((conn, Rc::clone(&room)), ticket);
            let peer = peer.clone();
            let work = Work::Join {
                conn,
                peer,
                room,
                since,
            };
            self.wait_for(ticket, work);
            return;
        }
        // History off: nothing to replay, so the join is immediate; a `since` cannot be
        // served (SPEC §13: history off -> recovered false).
        if member {
            self.presence(room, &peer.id, info, PresenceEvent::Join, Some(conn), tx);
        } else {
            self.rooms.join(conn, room);
            self.room_joined(room);
            self.presence(room, &peer.id, info, PresenceEvent::Join, None, tx);
            self.member_joined(conn, room, &peer.id, info);
            self.count_room_recovery(since.is_some(), false);
        }
        let recovered = member || since.is_none();
        let epoch = self.engine_epoch();
        self.send_joined(conn, &envelope::joined(room, recovered, None, &epoch), tx);
    }

    /// Queues a `joined` whatever --max-outbound says, like the welcome: it is small, one per
    /// join, and the only way the client learns whether its recovery was complete. Under
    /// `--slow-consumer drop` a lost `recovered:false` would make a partial recovery look
    /// complete (docs/protocol.md, "Room history").
    fn send_joined(&mut self, conn: ConnId, joined: &[u8], tx: &mut impl Transport) {
        let frame = tx.encode_shared(OpCode::Text, joined);
        tx.send_shared_unbounded(conn, &frame);
    }

    /// The engine answered a `join`: membership starts now, then the replay (history on),
    /// then `joined` (see `join`).
    #[allow(clippy::too_many_arguments)]
    fn joined(
        &mut self,
        ticket: Ticket,
        conn: ConnId,
        peer: &Peer,
        room: Rc<str>,
        since: Option<Since>,
        recovery: Recovery,
        tx: &mut impl Transport,
    ) {
        let key = (conn, room);
        if self.joining.get(&key) != Some(&ticket) {
            return; // left, closed or joined again meanwhile: that one answers
        }
        self.joining.remove(&key);
        let (_, room) = key;
        // A `refresh` may have replaced the token while the engine worked: the join is judged
        // by the token the connection holds now (SPEC §16).
        if !self.tokens.may_join(conn, &room) {
            return self.error(conn, EnvelopeError::Forbidden, tx);
        }
        let info = self.tokens.info(conn);
        let info = info.as_deref();
        let epoch = recovery.epoch.to_string();
        let last = recovery.last.map(|p| MsgId(p.0));
        let member = self.rooms.is_member(conn, &room);
        if member {
            // Joining again: only the joiner hears its presence event; the replay below still
            // runs (see `join`).
            self.presence(&room, &peer.id, info, PresenceEvent::Join, Some(conn), tx);
        } else {
            if self.rooms.rooms_of(conn) >= MAX_ROOMS_PER_CONNECTION {
                return self.error(conn, EnvelopeError::TooManyRooms, tx);
            }
            self.rooms.join(conn, &room);
            self.room_joined(&room);
            self.presence(&room, &peer.id, info, PresenceEvent::Join, None, tx);
            self.member_joined(conn, &room, &peer.id, info);
        }
        if self.room_history == 0 {
            // History off (an engine that shares rooms, see `join`): the answer only ordered
            // the join; nothing is replayed, and the `joined` is the one of an immediate join:
            // a `since` cannot be served (SPEC §13: history off -> recovered false).
            if !member {
                self.count_room_recovery(since.is_some(), false);
            }
            let recovered = member || since.is_none();
            let epoch = self.engine_epoch();
            self.send_joined(conn, &envelope::joined(&room, recovered, None, &epoch), tx);
            return;
        }
        // As for a welcome's backlog (`recovered`): the first replayed message is queued
        // whatever --max-outbound says, so a connection always makes progress; if the rest
        // does not fit, the connection is closed (1008) rather than let live traffic overtake
        // the replay, and it rejoins with `since` where it got to.
        let queued = queue_replay(conn, &recovery.messages, tx);
        self.metrics.room_replayed += queued as u64;
        if queued < recovery.messages.len() {
            tx.close(
                conn,
                CloseCode::POLICY_VIOLATION,
                "room history replay exceeds --max-outbound",
            );
            return;
        }
        self.count_room_recovery(since.is_some(), recovery.recovered);
        let joined = envelope::joined(&room, recovery.recovered, last, &epoch);
        self.send_joined(conn, &joined, tx);
    }

    /// Counts a room join that asked for a replay (`since`), by whether it was complete.
    fn count_room_recovery(&mut self, asked: bool, recovered: bool) {
        if asked {
            let counter = if recovered {
                &mut self.metrics.room_recoveries_complete
            } else {
                &mut self.metrics.room_recoveries_incomplete
            };
            *counter += 1;
        }
    }

    /// Tells the engine when this hub holds its first member of `room` (an engine shared with
    /// other nodes subscribes to it, SPEC §15).
    fn room_joined(&mut self, room: &str) {
        if self.rooms.members(room).nth(1).is_none() {
            self.engine.joined(room);
        }
    }

    /// Tells the engine when this hub holds no member of `room` any more.
    fn room_left(&mut self, room: &str) {
        if self.rooms.members(room).next().is_none() {
            self.engine.left(room);
        }
    }

    /// The epoch the engine's streams belong to, for `joined` without an engine answer.
    fn engine_epoch(&self) -> String {
        self.engine.epoch().to_string()
    }

    /// `history`: the newest messages of a room's history, in one `history` reply (SPEC §16).
    /// Refused like `join` for a room the token does not allow; `limit` is capped at what the
    /// room keeps and at `MAX_HISTORY_PAGE`.
    fn history(&mut self, conn: ConnId, room: &str, limit: Option<u64>, tx: &mut impl Transport) {
        if !self.tokens.may_join(conn, room) {
            return self.error(conn, EnvelopeError::Forbidden, tx);
        }
        if self.room_history == 0 {
            return self.error(conn, EnvelopeError::HistoryOff, tx);
        }
        let most = self.room_history.min(MAX_HISTORY_PAGE);
        let limit = limit.map_or(most, |l| usize::try_from(l).unwrap_or(most).min(most));
        let room: Rc<str> = Rc::from(room);
        let ticket = self.ticket();
        let stream = StreamId::Room(Rc::clone(&room));
        self.engine.history(ticket, &stream, limit, self.now());
        self.wait_for(ticket, Work::History { conn, room });
    }

    /// The engine's page for a `history` request: one reply, oldest first.
    fn history_page(&mut self, conn: ConnId, room: &str, page: Recovery, tx: &mut impl Transport) {
        if !self.names.contains_key(&conn) {
            return; // closed meanwhile
        }
        // As for `joined`: a `refresh` meanwhile may have taken the room away.
        if !self.tokens.may_join(conn, room) {
            return self.error(conn, EnvelopeError::Forbidden, tx);
        }
        // The newest messages that fit `history_page_max_bytes` (at least the newest one, which
        // the relay accepted, so it fits a frame a client takes): without a byte bound a page
        // of 1,000 large messages would be one frame of many MiB, beyond what clients accept.
        let mut messages: Vec<Vec<u8>> = Vec::new();
        let mut bytes = 0usize;
        for m in page.messages.iter().rev() {
            let text = envelope::with_msg_id(&m.body, MsgId(m.position.0));
            bytes = bytes.saturating_add(text.len() + 1);
            if !messages.is_empty() && bytes > self.history_page_max_bytes {
                break;
            }
            messages.push(text);
        }
        let more = messages.len() < page.messages.len();
        messages.reverse();
        let last = page.last.map(|p| MsgId(p.0));
        self.metrics.history_requests += 1;
        let reply = envelope::history(room, &messages, last, more);
        let frame = tx.encode_shared(OpCode::Text, &reply);
        if tx.send_shared(conn, &frame) == Sent::Dropped {
            // Over --max-outbound under `drop`: say so (unbounded, it is small) rather than
            // let the reply vanish; under `close` the connection is closing anyway.
            HubMetrics::bump(
                &mut self.metrics.errors,
                EnvelopeError::HistoryDropped.code(),
            );
            let error = tx.encode_shared(
                OpCode::Text,
                &envelope::error(EnvelopeError::HistoryDropped),
            );
            tx.send_shared_unbounded(conn, &error);
            return;
        }
        self.metrics.history_messages += messages.len() as u64;
    }

    /// Leaves a room, telling every member, the leaver included. Leaving a room one is not in
    /// changes nothing, and only the leaver hears about it.
    fn leave(&mut self, conn: ConnId, peer: &Peer, room: &str, tx: &mut impl Transport) {
        let info = self.tokens.info(conn);
        let (id, info) = (&peer.id, info.as_deref());
        if !self.joining.is_empty() {
            // A join still waiting for the engine is cancelled: its answer finds no entry.
            self.joining.remove(&(conn, Rc::from(room)));
        }
        if self.rooms.is_member(conn, room) {
            self.presence(room, id, info, PresenceEvent::Leave, None, tx);
            self.rooms.leave(conn, room);
            self.engine.member_left(room, member_conn(conn));
            self.room_left(room);
        } else {
            self.presence(room, id, info, PresenceEvent::Leave, Some(conn), tx);
        }
    }

    /// Tells the asker who is in `room` now: presence events only announce changes, so a joiner
    /// asks this once to learn who was there before it.
    /// Each member comes with the `info` claim of its token (SPEC §16).
    fn members(&mut self, conn: ConnId, room: &str, tx: &mut impl Transport) {
        if !self.tokens.may_join(conn, room) {
            return self.error(conn, EnvelopeError::Forbidden, tx);
        }
        // Members on other nodes come from the engine's replica (SPEC §15; none with a local
        // engine), listed like local ones.
        let remote = self.engine.remote_members(room);
        let mut bad_info = 0;
        let mut members: Vec<Member<'_>> = self
            .rooms
            .members(room)
            .filter_map(|member| {
                let id = self.names.get(&member)?;
                let info = self.tokens.get(member).and_then(|a| a.info.as_deref());
                Some(Member { id, info })
            })
            .chain(remote.iter().map(|member| {
                let (info, bad) = remote_info(member.info.as_deref());
                bad_info += u64::from(bad);
                Member {
                    id: &member.id,
                    info,
                }
            }))
            .collect();
        // Sorted by id; devices of one id by their info, so the answer does not depend on the
        // order the room keeps.
        members.sort_unstable_by(|a, b| {
            let (ai, bi) = (a.info.map(RawValue::get), b.info.map(RawValue::get));
            (a.id, ai).cmp(&(b.id, bi))
        });
        tx.send(conn, OpCode::Text, &envelope::members(room, &members));
        self.metrics.presence_remote_bad_info += bad_info;
    }

    /// This hub's connection became a member of `room`: the engine shares it with other nodes
    /// (a no-op for the local engines).
    fn member_joined(&mut self, conn: ConnId, room: &str, id: &str, info: Option<&RawValue>) {
        let member = LocalMember {
            conn: member_conn(conn),
            id,
            info: info.map(RawValue::get),
        };
        self.engine.member_joined(room, member);
    }

    /// A connection on another node joined or left `room` (SPEC §15): this hub's members of
    /// the room hear it as they hear a local one. The engine never reports this hub's own
    /// changes, so nothing is announced twice.
    fn remote_presence(&mut self, change: PresenceChange, tx: &mut impl Transport) {
        self.metrics.presence_remote_changes += 1;
        let member = &change.member;
        let (info, bad) = remote_info(member.info.as_deref());
        self.metrics.presence_remote_bad_info += u64::from(bad);
        if bad {
            debug!(
                "presence of {} from {}: info is not JSON",
                member.id, member.key
            );
        }
        let event = if change.joined {
            PresenceEvent::Join
        } else {
            PresenceEvent::Leave
        };
        self.presence(&change.room, &member.id, info, event, None, tx);
    }

    /// Sends a presence event to `only`, or else to every member of `room`. `info` is the
    /// `info` claim of the token of the connection that joined or left.
    fn presence(
        &mut self,
        room: &str,
        id: &str,
        info: Option<&RawValue>,
        event: PresenceEvent,
        only: Option<ConnId>,
        tx: &mut impl Transport,
    ) {
        let frame = tx.encode_shared(OpCode::Text, &envelope::presence(room, id, info, event));
        if let Some(conn) = only {
            tx.send_shared(conn, &frame);
            return;
        }
        for member in self.rooms.members(room) {
            if tx.send_shared(member, &frame) == Sent::Queued {
                self.metrics.presence_deliveries += 1;
            }
        }
    }

    /// Acks a send or publish. A rejected message exists nowhere, so its ack names no msg_id.
    fn ack(
        &mut self,
        conn: ConnId,
        client_id: Option<&str>,
        msg_id: Option<MsgId>,
        status: AckStatus,
        reason: Option<&str>,
        tx: &mut impl Transport,
    ) {
        HubMetrics::bump(&mut self.metrics.acks, status.name());
        if self.api.is_waiting(conn) {
            // A message from the server API: its ack is the answer to the HTTP request.
            return self.api_acked(conn, msg_id, status, reason, tx);
        }
        tx.send(
            conn,
            OpCode::Text,
            &envelope::ack(client_id, msg_id, status, reason),
        );
    }

    /// Tells the client what was wrong with its input; the connection stays open (SPEC §6).
    fn error(&mut self, conn: ConnId, e: EnvelopeError, tx: &mut impl Transport) {
        HubMetrics::bump(&mut self.metrics.errors, e.code());
        tx.send(conn, OpCode::Text, &envelope::error(e));
    }

    fn ticket(&mut self) -> Ticket {
        self.next_ticket += 1;
        Ticket(self.next_ticket)
    }

    // ----- tokens: refresh and expiry (SPEC §16) -----------------------------------------------

    /// `{"type":"refresh","token":...}`: the new token must verify and name the same `sub`.
    /// Then its claims replace the old ones at once: rooms the connection is in that the new
    /// `rooms` claim no longer allows are left (the members, the connection included, hear
    /// `leave`), and its expiry moves. A refused refresh changes nothing: the connection keeps
    /// its current token until that one expires (docs/protocol.md, "Token refresh and expiry").
    fn refresh(&mut self, conn: ConnId, peer: &Peer, token: &str, tx: &mut impl Transport) {
        let Some(jwt) = &self.jwt else {
            return self.refresh_refused(conn, EnvelopeError::TokensNotInUse, tx);
        };
        let grant = match jwt.verify(token, self.clock.unix_ms()) {
            Ok(grant) => grant,
            Err(e) => {
                return self.refresh_refused(conn, EnvelopeError::TokenRefused(e.label()), tx)
            }
        };
        if *grant.id != *peer.id {
            return self.refresh_refused(conn, EnvelopeError::TokenSubjectMismatch, tx);
        }
        if self.tokens.is_expired(conn) {
            // Too late: the connection is being closed with 4001 (`timer`).
            return self.refresh_refused(conn, EnvelopeError::TokenRefused("expired"), tx);
        }
        let exp_secs = grant.exp_ms / 1000;
        let access = Access::new(grant, self.leeway_ms());
        let info = access.info.clone();
        // A new `info` changes what `members` shows, here and (through the engine) on other
        // nodes, without a presence event: every room is told to the engine again, also a
        // room the new token leaves, whose leave elsewhere then shows the info it shows here.
        let old_info = self.tokens.info(conn);
        let info_changed =
            old_info.as_deref().map(RawValue::get) != info.as_deref().map(RawValue::get);
        for room in self.rooms.names_of(conn) {
            if info_changed {
                self.member_joined(conn, &room, &peer.id, info.as_deref());
            }
            if !access.may_join(&room) {
                self.presence(
                    &room,
                    &peer.id,
                    info.as_deref(),
                    PresenceEvent::Leave,
                    None,
                    tx,
                );
                self.rooms.leave(conn, &room);
                self.engine.member_left(&room, member_conn(conn));
                self.room_left(&room);
            }
        }
        // Joins and `history` requests still with the engine are judged by the new token
        // when their answer comes (`joined`, `history_page`): refused with `forbidden` then.
        self.tokens.insert(conn, access);
        self.schedule_expiry(tx);
        self.metrics.token_refreshes_ok += 1;
        debug!(
            "{conn:?} ({}) refreshed its token until {exp_secs}",
            peer.id
        );
        tx.send(conn, OpCode::Text, &envelope::refreshed(exp_secs));
    }

    fn refresh_refused(&mut self, conn: ConnId, e: EnvelopeError, tx: &mut impl Transport) {
        let reason = match e {
            EnvelopeError::TokenRefused(label) => label,
            other => other.code(),
        };
        HubMetrics::bump(&mut self.metrics.token_refresh_refusals, reason);
        self.error(conn, e, tx);
    }

    /// The reactor woke the hub (`Handler::on_timer`): close every connection whose token has
    /// expired, with `TOKEN_EXPIRED` (4001), then ask for the next expiry, if any.
    pub fn timer(&mut self, tx: &mut impl Transport) {
        self.wake_requested = None;
        let mut due = Vec::new();
        self.tokens.expire(self.clock.unix_ms(), &mut due);
        for conn in due {
            debug!("{conn:?}: token expired; closing {}", TOKEN_EXPIRED.0);
            self.metrics.token_expiries += 1;
            // What it sent before its welcome, and joins still waiting for the engine, are
            // dropped with it: handled now (by the `pump` below) they would act for a token
            // that no longer holds. Its recovery's answer then finds it gone and delivers
            // nothing, so its backlog stays pending for its next connection.
            self.recovering.remove(&conn);
            if !self.joining.is_empty() {
                self.joining.retain(|(c, _), _| *c != conn);
            }
            tx.close(conn, TOKEN_EXPIRED, TOKEN_EXPIRED_REASON);
        }
        self.schedule_expiry(tx);
        self.sweep();
        self.pump(tx);
    }

    /// Asks the reactor to wake the hub at the earliest token expiry, unless it is already
    /// asked for that time or an earlier one. Nothing is asked when no connection has a token,
    /// so an idle server without tokens never wakes for them.
    fn schedule_expiry(&mut self, tx: &mut impl Transport) {
        let Some(next) = self.tokens.next_expiry() else {
            return;
        };
        if self.wake_requested.is_some_and(|asked| asked <= next) {
            return;
        }
        self.wake_requested = Some(next);
        // Expiries are wall-clock dates; the reactor's timers are monotonic. The wait is
        // converted once: if the wall clock is stepped meanwhile, the wake-up comes early (and
        // asks again for the rest) or late (by the step), never skipping an expiry.
        let wait = Duration::from_millis(next.saturating_sub(self.clock.unix_ms()));
        tx.wake_at(self.clock.now() + wait);
    }

    /// The leeway allowed after a token's `exp` (`--jwt-leeway`), in milliseconds.
    fn leeway_ms(&self) -> u64 {
        self.jwt
            .as_ref()
            .map_or(0, |jwt| jwt.leeway_secs().saturating_mul(1000))
    }

    // ----- time and metrics ------------------------------------------------------------------

    fn now(&self) -> Now {
        Now {
            instant: self.clock.now(),
            unix_ms: self.clock.unix_ms(),
        }
    }

    /// Lets the engine drop what has expired. The hub has no timer of its own: it sweeps
    /// whenever it runs, at the cost of one comparison when nothing is due. An idle hub
    /// therefore holds expired messages a little longer, but nothing grows while it is idle,
    /// and /metrics counts them as expired at the moment of the scrape (`Stats::expiring`).
    pub(super) fn sweep(&mut self) -> Now {
        let now = self.now();
        self.engine.maintain(now);
        now
    }

    /// The live figures of /stats.json (the demo page's counters).
    pub fn stats(&self, out: &mut Vec<(&'static str, u64)>) {
        let m = &self.metrics;
        out.extend([
            (
                "rooms",
                (self.rooms.room_count() + self.raw_rooms.room_count()) as u64,
            ),
            (
                "room_members",
                (self.rooms.member_count() + self.raw_rooms.member_count()) as u64,
            ),
            ("ids_online", self.ids_online() as u64),
            ("direct_messages", m.direct_messages),
            ("publish_messages", m.publish_messages + m.raw_messages),
            (
                "offline_pending",
                self.engine.stats(self.clock.unix_ms()).pending as u64,
            ),
            // 1 with --jwt-secret: the demo page then asks for a token instead of an id.
            ("auth_required", u64::from(self.authenticates())),
            ("token_connections", self.tokens.len() as u64),
        ]);
    }

    /// The ids this hub reports online: its own, or its share of the process's when the engine
    /// shares ids with other workers (`Engine::ids_online`), so that /metrics and /stats.json
    /// count each id once over the workers.
    fn ids_online(&self) -> usize {
        self.engine.ids_online().unwrap_or(self.online.len())
    }

    /// Why the relay is degraded (the engine cannot reach its store), for /healthz.
    pub fn health(&self) -> Option<String> {
        self.engine.health()
    }

    /// Appends the hub's metrics (Prometheus text).
    pub fn render_metrics(&self, out: &mut String) {
        let e = self.engine.stats(self.clock.unix_ms());
        let gauges = HubGauges {
            raw_rooms: self.raw_rooms.room_count(),
            raw_members: self.raw_rooms.member_count(),
            rooms: self.rooms.room_count(),
            room_members: self.rooms.member_count(),
            ids_online: self.ids_online(),
            retained_messages: e.messages,
            retained_bytes: e.bytes,
            offline_pending: e.pending,
            removed: e.removed,
            expiring: e.expiring,
            dedup_records: e.dedup_records,
            dedup_bytes: e.dedup_bytes,
            dedup_evicted: e.dedup_evicted,
            in_flight_bytes: self.in_flight_bytes,
            token_connections: self.tokens.len(),
        };
        self.metrics.render(&gauges, out);
        self.api.render_metrics(out);
        self.engine.render_metrics(out);
    }
}
