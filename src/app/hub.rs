//! The hub: who is connected as whom, in which rooms, and where every message goes.
//!
//! Owns: routing of requests to the demo page's files (served by `demo`) and admission of
//! WebSocket requests (paths, Origin, identity, `?since=`, subprotocol),
//! raw rooms (`/r/<room>`), the `/ws` envelope commands (send, publish, join, leave), presence,
//! acks, msg_id and timestamp stamping, the offline queue and recovery (through `Mailboxes`),
//! duplicate suppression (`Dedup`), the rate limit, and the hub's metrics.
//! Does not: see sockets, descriptors or frames' bytes on the wire (SPEC §1). It acts on
//! connections only through `Transport` (send a message or a shared frame to a `ConnId`, close
//! one), which `App` implements with the reactor's `Outbox` and tests with a recorder.
//!
//! Implements SPEC §6 (endpoints and the relay), as docs/protocol.md tells it to clients.
//!
//! Ordering guarantees, all from the single-threaded loop: messages from one sender reach each
//! recipient in the order they were sent (every recipient queue is FIFO and nothing reorders);
//! a connecting `/ws` client gets its welcome, then its retained messages in msg_id order, then
//! live traffic, because all of the first two are queued inside `open` before any other
//! callback can run.

use super::auth::{self, AuthError, Grant, JwtVerifier};
use super::clock::Clock;
use super::config::AppConfig;
use super::dedup::{Dedup, Recorded};
use super::demo;
use super::envelope::{self, AckStatus, Command, EnvelopeError, MsgId, PresenceEvent};
use super::mailbox::{Limits, Mailboxes, Refused};
use super::metrics::{HubGauges, HubMetrics};
use super::ratelimit::{RateLimit, TokenBucket};
use super::rooms::Rooms;
use crate::protocol::frame::{self, OpCode};
use crate::protocol::handshake::{self, HandshakeError, Request};
use crate::protocol::CloseCode;
use crate::server::{ConnId, Outbox, Route, Sent};
use log::debug;
use serde_json::value::RawValue;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Instant;

/// The subprotocol of the envelope protocol, confirmed when a client offers it (RFC 6455
/// §4.2.2 item 5.4, SPEC §6).
pub const SUBPROTOCOL: &str = "wsrelay.v1";

/// Rooms one `/ws` connection may be in at once: bounds the memory a client can pin.
pub const MAX_ROOMS_PER_CONNECTION: usize = 256;

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
}

/// Per-connection state, kept by the reactor and handed back on every callback.
#[derive(Debug)]
pub struct Session {
    endpoint: Endpoint,
    /// The rate limit's bucket, when `--rate` is set.
    bucket: Option<TokenBucket>,
}

/// Which endpoint an open connection belongs to.
#[derive(Debug)]
enum Endpoint {
    /// `/echo`: every data message comes back to its sender, same opcode.
    Echo,
    /// `/r/<room>`: every data message goes verbatim to the room's other members.
    Raw(Rc<str>),
    /// `/ws`: the envelope protocol.
    Envelope(Peer),
}

/// Who a `/ws` connection is.
#[derive(Debug)]
struct Peer {
    id: Rc<str>,
    /// `?since=`: replay retained messages after this one on connect.
    since: Option<MsgId>,
    /// The token's `rooms` claim, if any.
    rooms: Option<Rc<[String]>>,
}

impl Peer {
    fn allows(&self, room: &str) -> bool {
        self.rooms
            .as_ref()
            .is_none_or(|rooms| rooms.iter().any(|r| r == room))
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
    rooms: Rooms,
    /// The open `/ws` connections of each id (its devices). An id is here iff it has one.
    online: HashMap<Rc<str>, Vec<ConnId>>,
    /// The id of each open `/ws` connection (the reverse of `online`), for member lists.
    names: HashMap<ConnId, Rc<str>>,
    mailboxes: Mailboxes,
    dedup: Dedup,
    /// The next msg_id to hand out.
    next_msg_id: u64,
    metrics: HubMetrics,
}

impl Hub {
    pub fn new(config: AppConfig, clock: Box<dyn Clock>) -> Hub {
        // msg_ids start at the start time in microseconds-ish (ms x 1000): unique and increasing
        // within a run as SPEC §6 requires, and in practice above every id of an earlier run
        // (unless that run averaged over 1,000 messages per millisecond), so a client's stale
        // `?since=` from before a restart does not hide new messages.
        let next_msg_id = clock.unix_ms().saturating_mul(1000);
        Hub {
            jwt: config.jwt_secret.as_deref().map(JwtVerifier::new),
            allow_origins: config.allow_origins,
            rate_limit: config.rate_limit,
            raw_rooms: Rooms::default(),
            rooms: Rooms::default(),
            online: HashMap::new(),
            names: HashMap::new(),
            mailboxes: Mailboxes::new(Limits {
                per_id: config.offline_max,
                ttl: config.offline_ttl,
                max_bytes: config.offline_max_bytes,
            }),
            dedup: Dedup::new(
                config.dedup_window,
                config.offline_ttl,
                config.dedup_max_bytes,
            ),
            next_msg_id,
            metrics: HubMetrics::default(),
            clock,
        }
    }

    /// Is `--jwt-secret` configured (ids are verified) or are `?id=`s trusted?
    pub fn authenticates(&self) -> bool {
        self.jwt.is_some()
    }

    // ----- admission -----------------------------------------------------------------------

    /// Decides what a request becomes: an upgrade to one of the endpoints, or an HTTP answer
    /// that says why not.
    pub fn route(&mut self, request: &Request) -> Route<Session> {
        self.sweep();
        if request.method != "GET" {
            let e = HandshakeError::MethodNotAllowed;
            return Route::Respond(e.status(), e.response());
        }
        let path = request.path.as_str();
        if let Some(page) = demo::response(path) {
            return Route::Respond(200, page);
        }
        let is_endpoint = path == "/echo" || path == "/ws" || path.starts_with("/r/");
        if !is_endpoint {
            let e = HandshakeError::NotFound;
            return Route::Respond(e.status(), e.response());
        }
        if !auth::origin_allowed(&self.allow_origins, request.header("origin")) {
            self.metrics.origin_rejections += 1;
            return refuse(403, "Origin not allowed (see --allow-origin)");
        }
        let admitted = match path {
            "/echo" => Ok((Endpoint::Echo, None)),
            "/ws" => self.admit_envelope(request),
            _ => self.admit_raw(&path[3..], request),
        };
        match admitted {
            Ok((endpoint, protocol)) => Route::Upgrade {
                session: Session {
                    endpoint,
                    bucket: self
                        .rate_limit
                        .map(|limit| TokenBucket::new(limit, self.clock.now())),
                },
                protocol,
            },
            Err(route) => route,
        }
    }

    /// `/r/<room>`: a valid name, and with auth configured a token allowing the room.
    fn admit_raw(
        &mut self,
        name: &str,
        request: &Request,
    ) -> Result<(Endpoint, Option<&'static str>), Route<Session>> {
        if name.contains('/') {
            let e = HandshakeError::NotFound;
            return Err(Route::Respond(e.status(), e.response()));
        }
        if let Err(e) = envelope::validate_room(name) {
            return Err(refuse(400, e.message().as_ref()));
        }
        if self.jwt.is_some() {
            let grant = self.authenticate(request)?;
            if !grant.allows(name) {
                return Err(refuse(403, "this room is not allowed by your token"));
            }
        }
        Ok((Endpoint::Raw(Rc::from(name)), None))
    }

    /// `/ws`: an identity (a token's `sub`, or `?id=` without auth), an optional `?since=`.
    fn admit_envelope(
        &mut self,
        request: &Request,
    ) -> Result<(Endpoint, Option<&'static str>), Route<Session>> {
        let (id, rooms) = if self.jwt.is_some() {
            let grant = self.authenticate(request)?;
            (grant.id, grant.rooms)
        } else {
            let Some(id) = request.query_param("id") else {
                return Err(refuse(400, "?id=<your id> is required"));
            };
            if let Err(e) = envelope::validate_id(&id) {
                return Err(refuse(400, e.message().as_ref()));
            }
            (id, None)
        };
        let since = match request.query_param("since") {
            None => None,
            Some(text) => match MsgId::parse(&text) {
                Some(since) => Some(since),
                None => return Err(refuse(400, "?since= must be a msg_id (decimal digits)")),
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
            rooms: rooms.map(Rc::from),
        };
        Ok((Endpoint::Envelope(peer), offered.then_some(SUBPROTOCOL)))
    }

    /// Verifies the request's token; a refusal is a 401 that says why.
    fn authenticate(&mut self, request: &Request) -> Result<Grant, Route<Session>> {
        let Some(jwt) = &self.jwt else {
            return Err(refuse(401, "authentication is not configured"));
        };
        let result = match auth::token_of(request) {
            None => Err(AuthError::Missing),
            Some(token) => jwt.verify(&token, self.clock.unix_ms()),
        };
        result.map_err(|e| {
            HubMetrics::bump(&mut self.metrics.auth_failures, e.label());
            debug!("401 for {}: {}", request.path, e.label());
            let body = format!("a valid token is required ({})\n", e.label());
            Route::Respond(
                401,
                handshake::http_response(
                    401,
                    "text/plain; charset=utf-8",
                    // RFC 6750 §3: the challenge of a bearer-token resource.
                    &[("WWW-Authenticate", "Bearer")],
                    body.as_bytes(),
                ),
            )
        })
    }

    // ----- connection life ---------------------------------------------------------------------

    /// The connection is open: join its raw room, or greet a `/ws` client and hand it what
    /// waited for it.
    pub fn open(&mut self, conn: ConnId, session: &mut Session, tx: &mut impl Transport) {
        self.sweep();
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
                self.dedup.active(&peer.id);
                // SPEC §6: the welcome, then queued (and, with `since`, retained) messages in
                // order, before any live traffic. The welcome and the first message of the
                // backlog are queued whatever --max-outbound says (the 101 response already
                // fills part of it): otherwise one message that fits --max-message but not what
                // the limit leaves would be refused on every connection, and nothing behind it
                // would ever arrive. The rest goes while it fits; if the queue fills up, the
                // rest stays pending and the connection is closed (1008): letting live traffic
                // overtake the rest would break the order, and the client gets the rest when it
                // reconnects (with the `close` policy the outbox has already asked for that
                // close). So every connection makes progress through its backlog.
                let welcome = envelope::welcome(&peer.id, self.mailboxes.newest(&peer.id));
                let welcome = tx.encode_shared(OpCode::Text, &welcome);
                tx.send_shared_unbounded(conn, &welcome);
                let mut stalled = false;
                let mut head = true;
                let (first, again) = self.mailboxes.deliver(&peer.id, peer.since, |m| {
                    let sent = if std::mem::take(&mut head) {
                        tx.send_shared_unbounded(conn, &m.frame)
                    } else {
                        tx.send_shared(conn, &m.frame)
                    };
                    let queued = sent == Sent::Queued;
                    stalled |= !queued;
                    queued
                });
                self.metrics.offline_delivered += first;
                self.metrics.recovery_replayed += again;
                if stalled {
                    tx.close(
                        conn,
                        CloseCode::POLICY_VIOLATION,
                        "backlog exceeds --max-outbound",
                    );
                }
            }
        }
    }

    /// A data message from `conn`.
    pub fn message(
        &mut self,
        conn: ConnId,
        session: &mut Session,
        opcode: OpCode,
        payload: &[u8],
        tx: &mut impl Transport,
    ) {
        let now = self.clock.now();
        self.sweep_at(now);
        if let Some(bucket) = &mut session.bucket {
            if !bucket.take(now) {
                self.metrics.rate_limited += 1;
                debug!("{conn:?} exceeded the rate limit; closing 1008");
                tx.close(conn, CloseCode::POLICY_VIOLATION, "rate limit exceeded");
                return;
            }
        }
        match &session.endpoint {
            Endpoint::Echo => {
                tx.send(conn, opcode, payload);
            }
            Endpoint::Raw(room) => self.relay_raw(conn, room, opcode, payload, tx),
            Endpoint::Envelope(peer) => self.on_envelope(conn, peer, opcode, payload, tx),
        }
    }

    /// The connection is gone: leave its rooms (telling the others) and its id's devices.
    pub fn close(&mut self, conn: ConnId, session: Session, tx: &mut impl Transport) {
        let now = self.clock.now();
        self.sweep_at(now);
        match session.endpoint {
            Endpoint::Echo => {}
            Endpoint::Raw(room) => {
                self.raw_rooms.leave(conn, &room);
            }
            Endpoint::Envelope(peer) => {
                self.names.remove(&conn);
                for room in self.rooms.leave_all(conn) {
                    self.presence(&room, &peer.id, PresenceEvent::Leave, None, tx);
                }
                if let Some(devices) = self.online.get_mut(&peer.id) {
                    devices.retain(|&d| d != conn);
                    if devices.is_empty() {
                        self.online.remove(&peer.id);
                        self.dedup.idle(&peer.id, now);
                    }
                }
            }
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
            Ok(Command::Join { room }) => self.join(conn, peer, &room, tx),
            Ok(Command::Leave { room }) => self.leave(conn, peer, &room, tx),
            Ok(Command::Members { room }) => self.members(conn, peer, &room, tx),
        }
    }

    /// A direct message: to every connection of `to`; retained for offline delivery and
    /// recovery (see `mailbox.rs` for exactly what is kept).
    fn send(
        &mut self,
        conn: ConnId,
        peer: &Peer,
        to: &str,
        payload: &RawValue,
        client_id: Option<&str>,
        tx: &mut impl Transport,
    ) {
        if self.duplicate(conn, &peer.id, client_id, tx) {
            return;
        }
        let now = self.clock.now();
        let msg_id = self.next_msg_id();
        let text = envelope::message(
            msg_id,
            &peer.id,
            Some(to),
            None,
            payload,
            self.clock.unix_ms(),
        );
        let frame = tx.encode_shared(OpCode::Text, &text);
        self.metrics.direct_messages += 1;
        let mut delivered = false;
        let mut dropped = false;
        for &device in self.online.get(to).into_iter().flatten() {
            match tx.send_shared(device, &frame) {
                Sent::Queued => {
                    delivered = true;
                    self.metrics.direct_deliveries += 1;
                }
                Sent::Dropped => dropped = true,
                Sent::Closed | Sent::Gone => {}
            }
        }
        if dropped && !delivered {
            // The recipient is online but over --max-outbound with the `drop` policy. Queueing
            // it as pending would leave it waiting while live traffic overtakes it (pending
            // messages are delivered on connect): say plainly that it was not delivered.
            let reason = Some("recipient is online but too far behind to take it");
            self.ack(
                conn,
                &peer.id,
                client_id,
                msg_id,
                AckStatus::Rejected,
                reason,
                tx,
            );
            return;
        }
        let (status, reason) = match self.mailboxes.retain(to, msg_id, frame, !delivered, now) {
            // Delivered live; retained for recovery if the bounds allowed.
            _ if delivered => (AckStatus::Delivered, None),
            Ok(()) => {
                self.metrics.offline_queued += 1;
                (AckStatus::Queued, None)
            }
            Err(refused) => {
                if refused == Refused::Full {
                    self.metrics.offline_refused_full += 1;
                }
                (AckStatus::Rejected, Some(refused.reason()))
            }
        };
        self.ack(conn, &peer.id, client_id, msg_id, status, reason, tx);
    }

    /// A room message: to every member but the sender. Membership is not required to publish
    /// (a bot may announce into a room it does not listen to); the token's `rooms` claim is.
    fn publish(
        &mut self,
        conn: ConnId,
        peer: &Peer,
        room: &str,
        payload: &RawValue,
        client_id: Option<&str>,
        tx: &mut impl Transport,
    ) {
        if !peer.allows(room) {
            let reason = EnvelopeError::Forbidden.message();
            HubMetrics::bump(&mut self.metrics.acks, AckStatus::Rejected.name());
            let ack = envelope::ack(client_id, None, AckStatus::Rejected, Some(&reason));
            tx.send(conn, OpCode::Text, &ack);
            return;
        }
        if self.duplicate(conn, &peer.id, client_id, tx) {
            return;
        }
        let msg_id = self.next_msg_id();
        let text = envelope::message(
            msg_id,
            &peer.id,
            None,
            Some(room),
            payload,
            self.clock.unix_ms(),
        );
        let frame = tx.encode_shared(OpCode::Text, &text);
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
        // The ack says what happened to the members (docs/protocol.md, "Acks"): the sender
        // must not read `delivered` when a current member dropped the message.
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
        let reason = reason.as_deref();
        self.ack(conn, &peer.id, client_id, msg_id, status, reason, tx);
    }

    /// Joins a room and tells every member, the joiner included (its confirmation). Joining a
    /// room twice changes nothing, and only the joiner hears about it again.
    fn join(&mut self, conn: ConnId, peer: &Peer, room: &str, tx: &mut impl Transport) {
        if !peer.allows(room) {
            return self.error(conn, EnvelopeError::Forbidden, tx);
        }
        if self.rooms.is_member(conn, room) {
            return self.presence(room, &peer.id, PresenceEvent::Join, Some(conn), tx);
        }
        if self.rooms.rooms_of(conn) >= MAX_ROOMS_PER_CONNECTION {
            return self.error(conn, EnvelopeError::TooManyRooms, tx);
        }
        self.rooms.join(conn, room);
        self.presence(room, &peer.id, PresenceEvent::Join, None, tx);
    }

    /// Leaves a room, telling every member, the leaver included. Leaving a room one is not in
    /// changes nothing, and only the leaver hears about it.
    fn leave(&mut self, conn: ConnId, peer: &Peer, room: &str, tx: &mut impl Transport) {
        if self.rooms.is_member(conn, room) {
            self.presence(room, &peer.id, PresenceEvent::Leave, None, tx);
            self.rooms.leave(conn, room);
        } else {
            self.presence(room, &peer.id, PresenceEvent::Leave, Some(conn), tx);
        }
    }

    /// Tells the asker who is in `room` now: presence events only announce changes, so a joiner
    /// asks this once to learn who was there before it.
    fn members(&mut self, conn: ConnId, peer: &Peer, room: &str, tx: &mut impl Transport) {
        if !peer.allows(room) {
            return self.error(conn, EnvelopeError::Forbidden, tx);
        }
        let mut ids: Vec<&str> = self
            .rooms
            .members(room)
            .filter_map(|member| self.names.get(&member).map(|id| &**id))
            .collect();
        ids.sort_unstable();
        tx.send(conn, OpCode::Text, &envelope::members(room, &ids));
    }

    /// Sends a presence event to `only`, or else to every member of `room`.
    fn presence(
        &mut self,
        room: &str,
        id: &str,
        event: PresenceEvent,
        only: Option<ConnId>,
        tx: &mut impl Transport,
    ) {
        let frame = tx.encode_shared(OpCode::Text, &envelope::presence(room, id, event));
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

    /// If `client_id` was seen from `sender` before, acks it again as it was acked then and
    /// returns true: the message is not delivered a second time.
    fn duplicate(
        &mut self,
        conn: ConnId,
        sender: &str,
        client_id: Option<&str>,
        tx: &mut impl Transport,
    ) -> bool {
        let Some(client_id) = client_id else {
            return false;
        };
        let Some(recorded) = self.dedup.check(sender, client_id) else {
            return false;
        };
        self.metrics.duplicates += 1;
        HubMetrics::bump(&mut self.metrics.acks, recorded.status.name());
        let ack = envelope::ack(
            Some(client_id),
            Some(recorded.msg_id),
            recorded.status,
            None,
        );
        tx.send(conn, OpCode::Text, &ack);
        true
    }

    /// Acks a send or publish, and remembers the ack of an accepted one for `duplicate`.
    #[allow(clippy::too_many_arguments)]
    fn ack(
        &mut self,
        conn: ConnId,
        sender: &str,
        client_id: Option<&str>,
        msg_id: MsgId,
        status: AckStatus,
        reason: Option<&str>,
        tx: &mut impl Transport,
    ) {
        HubMetrics::bump(&mut self.metrics.acks, status.name());
        // A rejected message exists nowhere, so its ack names no msg_id, and it is not
        // remembered: retrying it may succeed.
        let msg_id = (status != AckStatus::Rejected).then_some(msg_id);
        if let (Some(client_id), Some(msg_id)) = (client_id, msg_id) {
            self.dedup
                .record(sender, client_id, Recorded { msg_id, status });
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

    fn next_msg_id(&mut self) -> MsgId {
        let id = MsgId(self.next_msg_id);
        self.next_msg_id += 1;
        id
    }

    // ----- time and metrics ------------------------------------------------------------------

    /// Drops what has expired. The hub has no timer of its own: it sweeps whenever it runs, at
    /// the cost of one comparison when nothing is due. An idle hub therefore holds expired
    /// messages a little longer, but nothing grows while it is idle, and /metrics counts them
    /// as expired at the moment of the scrape (`Mailboxes::expiring`).
    fn sweep(&mut self) {
        let now = self.clock.now();
        self.sweep_at(now);
    }

    fn sweep_at(&mut self, now: Instant) {
        self.mailboxes.expire(now);
        self.dedup.sweep(now);
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
            ("ids_online", self.online.len() as u64),
            ("direct_messages", m.direct_messages),
            ("publish_messages", m.publish_messages + m.raw_messages),
            ("offline_pending", self.mailboxes.pending() as u64),
            // 1 with --jwt-secret: the demo page then asks for a token instead of an id.
            ("auth_required", u64::from(self.authenticates())),
        ]);
    }

    /// Appends the hub's metrics (Prometheus text).
    pub fn render_metrics(&self, out: &mut String) {
        let gauges = HubGauges {
            raw_rooms: self.raw_rooms.room_count(),
            raw_members: self.raw_rooms.member_count(),
            rooms: self.rooms.room_count(),
            room_members: self.rooms.member_count(),
            ids_online: self.online.len(),
            retained_messages: self.mailboxes.messages(),
            retained_bytes: self.mailboxes.bytes(),
            offline_pending: self.mailboxes.pending(),
            removed: self.mailboxes.removed,
            expiring: self.mailboxes.expiring(self.clock.now()),
            dedup_records: self.dedup.records(),
            dedup_bytes: self.dedup.bytes(),
            dedup_evicted: self.dedup.evicted(),
        };
        self.metrics.render(&gauges, out);
    }
}

/// A refusal before the upgrade, with the reason in the body (SPEC §3).
fn refuse(status: u16, reason: &str) -> Route<Session> {
    let body = format!("{reason}\n");
    Route::Respond(
        status,
        handshake::http_response(status, "text/plain; charset=utf-8", &[], body.as_bytes()),
    )
}
