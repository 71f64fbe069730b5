//! The server API for backends (SPEC §16): `/api/...` on the same port, JSON in and out, off
//! unless `--api-key` or `--api-key-file` is given.
//!
//! Owns: the API's key check (constant time), its endpoints (publish, disconnect, presence,
//! rooms, ids), the validation of their JSON with a reason for every refusal, what a publish
//! answers once the engine completed it, the questions about connections (`Query`: presence,
//! rooms, ids, disconnect) with each hub's part of their answer and how the parts merge, and
//! `wsrelay_api_requests_total`.
//! Does not: read bodies, keep connections alive or order answers (the reactor's `http.rs`
//! does, for every `Route::Api` request), or deliver messages itself: a publish goes through the
//! hub's own `send`/`publish`, the path a client's message takes (engine, ticket, completion),
//! so a member cannot tell an API message from a client's but by its `from`. Nor does it ask
//! other workers for their parts (`gather.rs` does, with `--workers` above 1).
//!
//! docs/api.md tells every endpoint with its statuses; this file follows it.

use super::envelope::{self, AckStatus, MsgId};
use super::hub::{Hub, Peer, Transport};
use crate::protocol::handshake::{percent_decode, Request};
use crate::protocol::{CloseCode, Refusal};
use crate::server::metrics::Writer;
use crate::server::{ConnId, Outbox, Route};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use sha1::{Digest, Sha1};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::rc::Rc;
use subtle::ConstantTimeEq;

/// Request bodies are at most this many bytes unless `--api-max-body` says otherwise.
pub const DEFAULT_MAX_BODY: usize = 64 * 1024;

/// The sender (`from`) of an API message that names none (docs/protocol.md, "Messages from
/// the server API").
pub const DEFAULT_FROM: &str = "api";

/// The API's state in the hub.
#[derive(Debug, Default)]
pub struct ApiState {
    /// SHA-1 of the key, or `None`: the API is off and `/api/...` is 404. Keys are compared
    /// through their digests, so the comparison takes the same time whatever the length or
    /// content of the key a request sends.
    key_digest: Option<[u8; 20]>,
    max_body: usize,
    /// API connections waiting for the ack of their publish (one request at a time each: the
    /// reactor hands over the next only after the answer).
    waiting: HashSet<ConnId>,
    /// Requests answered, by endpoint and HTTP status.
    requests: BTreeMap<(&'static str, u16), u64>,
}

impl ApiState {
    /// The API with `key` (none: off) and bodies of at most `max_body` bytes.
    pub fn new(key: Option<&[u8]>, max_body: usize) -> ApiState {
        ApiState {
            key_digest: key.map(digest),
            max_body,
            ..ApiState::default()
        }
    }

    /// Is `conn` waiting for the ack of a publish through the API?
    pub(super) fn is_waiting(&self, conn: ConnId) -> bool {
        !self.waiting.is_empty() && self.waiting.contains(&conn)
    }

    /// Appends `wsrelay_api_requests_total` (Prometheus text).
    pub(super) fn render_metrics(&self, out: &mut String) {
        let mut w = Writer::new(out);
        w.family(
            "wsrelay_api_requests_total",
            "counter",
            "Server API requests answered, by endpoint and HTTP status.",
        );
        for ((endpoint, status), count) in &self.requests {
            let status = status.to_string();
            w.sample(
                "wsrelay_api_requests_total",
                &[("endpoint", endpoint), ("status", &status)],
                count,
            );
        }
    }
}

fn digest(bytes: &[u8]) -> [u8; 20] {
    Sha1::digest(bytes).into()
}

/// The endpoints, by path; `unknown` is any other path under `/api/`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Endpoint {
    Publish,
    Disconnect,
    Presence,
    Rooms,
    Ids,
    Unknown,
}

impl Endpoint {
    fn of(path: &str) -> Endpoint {
        match path {
            "/api/publish" => Endpoint::Publish,
            "/api/disconnect" => Endpoint::Disconnect,
            "/api/presence" => Endpoint::Presence,
            "/api/rooms" => Endpoint::Rooms,
            _ if path.starts_with("/api/ids/") => Endpoint::Ids,
            _ => Endpoint::Unknown,
        }
    }

    /// The `endpoint` label of the metric.
    fn name(self) -> &'static str {
        match self {
            Endpoint::Publish => "publish",
            Endpoint::Disconnect => "disconnect",
            Endpoint::Presence => "presence",
            Endpoint::Rooms => "rooms",
            Endpoint::Ids => "ids",
            Endpoint::Unknown => "unknown",
        }
    }

    /// The one method the endpoint takes.
    fn method(self) -> &'static str {
        match self {
            Endpoint::Publish | Endpoint::Disconnect => "POST",
            Endpoint::Presence | Endpoint::Rooms | Endpoint::Ids | Endpoint::Unknown => "GET",
        }
    }
}

/// `POST /api/publish`: to a room or to an id, never both.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishBody<'a> {
    room: Option<String>,
    to: Option<String>,
    #[serde(borrow)]
    payload: Option<&'a RawValue>,
    from: Option<String>,
    /// The client message id: a repeat of it (from the same `from`) is acked as the first
    /// one was, and not delivered again (SPEC §6 dedup).
    id: Option<String>,
}

/// `POST /api/disconnect`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DisconnectBody {
    id: String,
    code: Option<u16>,
    reason: Option<String>,
}

/// A question about the connections of the whole process (presence, rooms, ids, and the
/// disconnect, which acts on them). Each hub answers it for its own connections (`Part`);
/// with `--workers` above 1 every worker is asked (`app/gather.rs`), so the types cross
/// threads: they own their strings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Query {
    /// `GET /api/presence?room=`.
    Presence { room: String },
    /// `GET /api/rooms`.
    Rooms,
    /// `GET /api/ids/<id>`.
    Id { id: String },
    /// `POST /api/disconnect`: close the id's connections with this code and reason.
    Disconnect {
        id: String,
        code: u16,
        reason: String,
    },
}

/// One hub's answer to a `Query`: about its own connections only.
#[derive(Clone, Debug, PartialEq)]
pub enum Part {
    /// The ids in the room here, sorted.
    Presence(Vec<Member>),
    /// The rooms with members here.
    Rooms(Vec<RoomPart>),
    /// The id's connections here (for a disconnect: the ones just closed).
    Connections(usize),
}

/// One id in a room, on one hub.
#[derive(Clone, Debug, PartialEq)]
pub struct Member {
    pub id: String,
    /// Its connections in the room.
    pub connections: usize,
    /// Its presence metadata (`info`), if one of those connections' tokens has one.
    pub info: Option<Value>,
}

/// One room, on one hub: its distinct ids (a set, so that an id on two workers is counted
/// once in the process's answer) and its connections.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoomPart {
    pub room: String,
    pub ids: BTreeSet<String>,
    pub connections: usize,
}

impl Query {
    fn endpoint(&self) -> Endpoint {
        match self {
            Query::Presence { .. } => Endpoint::Presence,
            Query::Rooms => Endpoint::Rooms,
            Query::Id { .. } => Endpoint::Ids,
            Query::Disconnect { .. } => Endpoint::Disconnect,
        }
    }

    /// The answer (docs/api.md) from every hub's part, merged: an id with connections on
    /// several workers is one entry with their sum, and its `info` is the first part's that
    /// has one (the answering worker's own part comes first, then the others by index). A part
    /// of another kind than the question's is a bug and is left out.
    pub fn answer(&self, parts: Vec<Part>) -> Value {
        match self {
            Query::Presence { room } => {
                let mut members: BTreeMap<String, (usize, Option<Value>)> = BTreeMap::new();
                for part in parts {
                    let Part::Presence(part) = part else { continue };
                    for member in part {
                        let entry = members.entry(member.id).or_default();
                        entry.0 += member.connections;
                        if entry.1.is_none() {
                            entry.1 = member.info;
                        }
                    }
                }
                let members: Vec<Value> = members
                    .into_iter()
                    .map(|(id, (connections, info))| {
                        json!({ "id": id, "connections": connections, "info": info })
                    })
                    .collect();
                json!({ "room": room, "members": members })
            }
            Query::Rooms => {
                let mut rooms: BTreeMap<String, (BTreeSet<String>, usize)> = BTreeMap::new();
                for part in parts {
                    let Part::Rooms(part) = part else { continue };
                    for room in part {
                        let entry = rooms.entry(room.room).or_default();
                        entry.0.extend(room.ids);
                        entry.1 += room.connections;
                    }
                }
                let rooms: Vec<Value> = rooms
                    .into_iter()
                    .map(|(room, (ids, connections))| {
                        json!({ "room": room, "members": ids.len(), "connections": connections })
                    })
                    .collect();
                json!({ "rooms": rooms })
            }
            Query::Id { id } => {
                let connections = connections(parts);
                json!({ "id": id, "online": connections > 0, "connections": connections })
            }
            Query::Disconnect { id, .. } => {
                json!({ "id": id, "disconnected": connections(parts) })
            }
        }
    }
}

/// The connections counted in every part.
fn connections(parts: Vec<Part>) -> usize {
    parts
        .into_iter()
        .map(|part| match part {
            Part::Connections(n) => n,
            Part::Presence(_) | Part::Rooms(_) => 0,
        })
        .sum()
}

impl Hub {
    /// The route of an `/api/...` request, or `None` for any other path.
    pub fn route_api<S>(&self, request: &Request) -> Option<Route<S>> {
        let path = request.path();
        if path != "/api" && !path.starts_with("/api/") {
            return None;
        }
        Some(match self.api.key_digest {
            // Off: as if the paths did not exist.
            None => Route::Refuse(Refusal::NotFound),
            Some(_) => Route::Api {
                max_body: self.api.max_body,
            },
        })
    }

    /// Handles one API request (`Handler::on_request`): every request is answered, now or,
    /// for a publish, when the engine completes it (`api_acked`). A question about the
    /// connections (`Query`) is answered from this hub's own: the process's, with one worker.
    pub fn api_request(
        &mut self,
        conn: ConnId,
        request: &Request,
        body: Result<&[u8], Refusal>,
        out: &mut Outbox<'_>,
    ) {
        if let Some(query) = self.api_take(conn, request, body, out) {
            let part = self.api_part(&query, out);
            self.api_answer_parts(conn, &query, vec![part], out);
        }
    }

    /// `api_request` for one of several workers (`--workers`, `app/gather.rs`): answers or
    /// refuses the request, or submits its publish, like `api_request`; but a valid question
    /// about the connections is handed back unanswered, for the caller to ask every worker
    /// (`api_part` on each) and answer with all their parts (`api_answer_parts`).
    pub fn api_take(
        &mut self,
        conn: ConnId,
        request: &Request,
        body: Result<&[u8], Refusal>,
        out: &mut Outbox<'_>,
    ) -> Option<Query> {
        self.sweep();
        let endpoint = Endpoint::of(request.path());
        let query = match self.api_checked(conn, endpoint, request, body, out) {
            Ok(query) => query,
            Err(refusal) => {
                self.api_count(endpoint, refusal.status());
                out.refuse(conn, refusal);
                None
            }
        };
        self.pump(out);
        query
    }

    /// This hub's part of the answer to `query`: its own connections. For a disconnect, it
    /// also closes them.
    pub fn api_part(&mut self, query: &Query, out: &mut Outbox<'_>) -> Part {
        match query {
            Query::Presence { room } => Part::Presence(self.presence_part(room)),
            Query::Rooms => Part::Rooms(self.rooms_part()),
            Query::Id { id } => Part::Connections(self.online.get(id.as_str()).map_or(0, Vec::len)),
            Query::Disconnect { id, code, reason } => {
                let devices = self.online.get(id.as_str()).cloned().unwrap_or_default();
                for &device in &devices {
                    out.close_with_reason(device, CloseCode(*code), reason.clone());
                }
                Part::Connections(devices.len())
            }
        }
    }

    /// Answers `query` on `conn` with every worker's part merged (`Query::answer`); the
    /// answering worker's own part comes first.
    pub fn api_answer_parts(
        &mut self,
        conn: ConnId,
        query: &Query,
        parts: Vec<Part>,
        out: &mut Outbox<'_>,
    ) {
        let json = query.answer(parts);
        self.api_answer(conn, query.endpoint(), 200, &json, out);
    }

    /// Refuses `query` on `conn`: workers `missing` did not give their parts in time, and a
    /// partial answer would read as a whole one (docs/api.md, "With several workers").
    pub fn api_unanswered(
        &mut self,
        conn: ConnId,
        query: &Query,
        missing: &[usize],
        waited: std::time::Duration,
        out: &mut Outbox<'_>,
    ) {
        let mut why = format!(
            "worker(s) {missing:?} of this server did not answer within {waited:?}; \
             the answer would leave out their connections; try again"
        );
        if let Query::Disconnect { .. } = query {
            why.push_str(
                " (the other workers closed the id's connections they held, and a late one \
                 still closes its own when it gets to the question)",
            );
        }
        let refusal = Refusal::WorkersUnanswered(why.into());
        self.api_count(query.endpoint(), refusal.status());
        out.refuse(conn, refusal);
    }

    /// The checks every request passes, in order: its framing, the key, the path, the method;
    /// then the endpoint. `Ok(None)`: a publish went to the engine; `Ok(Some)`: a valid
    /// question about the connections, to be answered.
    fn api_checked(
        &mut self,
        conn: ConnId,
        endpoint: Endpoint,
        request: &Request,
        body: Result<&[u8], Refusal>,
        out: &mut Outbox<'_>,
    ) -> Result<Option<Query>, Refusal> {
        let body = body?;
        self.api_authorized(request)?;
        if endpoint == Endpoint::Unknown {
            return Err(Refusal::NotFound);
        }
        if request.method() != endpoint.method() {
            let allow = endpoint.method();
            return Err(Refusal::MethodNotAllowedFor { allow });
        }
        match endpoint {
            Endpoint::Publish => self.api_publish(conn, body, out).map(|()| None),
            Endpoint::Disconnect => disconnect_query(body).map(Some),
            Endpoint::Presence => presence_query(request).map(Some),
            Endpoint::Rooms => Ok(Some(Query::Rooms)),
            Endpoint::Ids => id_query(request).map(Some),
            Endpoint::Unknown => Err(Refusal::NotFound),
        }
    }

    /// `Authorization: Bearer <key>`, compared in constant time (SPEC §16).
    fn api_authorized(&self, request: &Request) -> Result<(), Refusal> {
        let Some(expected) = &self.api.key_digest else {
            return Err(Refusal::NotFound);
        };
        let Some(value) = request.header("authorization") else {
            return Err(Refusal::BadApiKey("missing"));
        };
        let given = match value.split_once(' ') {
            Some((scheme, key)) if scheme.eq_ignore_ascii_case("bearer") => key.trim(),
            _ => return Err(Refusal::BadApiKey("not a Bearer credential")),
        };
        if bool::from(digest(given.as_bytes()).ct_eq(expected)) {
            Ok(())
        } else {
            Err(Refusal::BadApiKey("wrong key"))
        }
    }

    /// Submits the message through the path a client's takes; the answer is the ack.
    fn api_publish(
        &mut self,
        conn: ConnId,
        body: &[u8],
        out: &mut Outbox<'_>,
    ) -> Result<(), Refusal> {
        let parsed: PublishBody<'_> = serde_json::from_slice(body).map_err(bad_json)?;
        let payload = parsed
            .payload
            .ok_or_else(|| bad("missing field `payload`"))?;
        let from = parsed.from.as_deref().unwrap_or(DEFAULT_FROM);
        envelope::validate_id(from).map_err(|e| bad(format!("from: {}", e.message())))?;
        if let Some(id) = &parsed.id {
            envelope::validate_id(id).map_err(|e| bad(format!("id: {}", e.message())))?;
        }
        let peer = Peer::backend(Rc::from(from));
        let client_id = parsed.id.as_deref();
        self.api.waiting.insert(conn);
        match (parsed.room.as_deref(), parsed.to.as_deref()) {
            (Some(room), None) => {
                if let Err(e) = envelope::validate_room(room) {
                    self.api.waiting.remove(&conn);
                    return Err(bad(format!("room: {}", e.message())));
                }
                self.publish(conn, &peer, room, payload, client_id, out);
            }
            (None, Some(to)) => {
                if let Err(e) = envelope::validate_id(to) {
                    self.api.waiting.remove(&conn);
                    return Err(bad(format!("to: {}", e.message())));
                }
                self.send(conn, &peer, to, payload, client_id, out);
            }
            _ => {
                self.api.waiting.remove(&conn);
                return Err(bad("exactly one of `room` and `to` is required"));
            }
        }
        Ok(())
    }

    /// The hub acks a message that came through the API: the answer to its request.
    pub(super) fn api_acked(
        &mut self,
        conn: ConnId,
        msg_id: Option<MsgId>,
        status: AckStatus,
        reason: Option<&str>,
        tx: &mut impl Transport,
    ) {
        self.api.waiting.remove(&conn);
        let mut json = json!({ "status": status.name() });
        if let Some(msg_id) = msg_id {
            json["msg_id"] = Value::String(msg_id.to_string());
        }
        if let Some(reason) = reason {
            json["reason"] = Value::String(reason.to_string());
        }
        self.api_count(Endpoint::Publish, 200);
        tx.respond(conn, 200, json.to_string().into_bytes());
    }

    /// Who is in a room on this hub: each id once, with how many of its connections are in
    /// it and the presence metadata of its token (`info`, SPEC §16; null without one: the
    /// first of its connections in the room that has one speaks for the id, as in `members`).
    fn presence_part(&self, room: &str) -> Vec<Member> {
        let mut members: BTreeMap<&str, (usize, Option<Value>)> = BTreeMap::new();
        for conn in self.rooms.members(room) {
            if let Some(id) = self.names.get(&conn) {
                let entry = members.entry(id).or_default();
                entry.0 += 1;
                if entry.1.is_none() {
                    entry.1 = self
                        .tokens
                        .info(conn)
                        .and_then(|raw| serde_json::from_str(raw.get()).ok());
                }
            }
        }
        members
            .into_iter()
            .map(|(id, (connections, info))| Member {
                id: id.to_string(),
                connections,
                info,
            })
            .collect()
    }

    /// Every room of `/ws` clients on this hub (raw `/r/` rooms are another namespace and
    /// have no ids), with its distinct ids and its connections.
    fn rooms_part(&self) -> Vec<RoomPart> {
        self.rooms
            .names()
            .map(|name| {
                let mut ids = BTreeSet::new();
                let mut connections = 0usize;
                for conn in self.rooms.members(name) {
                    connections += 1;
                    if let Some(id) = self.names.get(&conn) {
                        ids.insert(id.to_string());
                    }
                }
                RoomPart {
                    room: name.to_string(),
                    ids,
                    connections,
                }
            })
            .collect()
    }

    fn api_answer(
        &mut self,
        conn: ConnId,
        endpoint: Endpoint,
        status: u16,
        json: &Value,
        out: &mut Outbox<'_>,
    ) {
        self.api_count(endpoint, status);
        out.respond(conn, status, json.to_string().into_bytes());
    }

    fn api_count(&mut self, endpoint: Endpoint, status: u16) {
        *self
            .api
            .requests
            .entry((endpoint.name(), status))
            .or_default() += 1;
    }
}

/// `POST /api/disconnect`: closes every `/ws` connection of an id with the code asked for
/// (SPEC §16).
fn disconnect_query(body: &[u8]) -> Result<Query, Refusal> {
    let parsed: DisconnectBody = serde_json::from_slice(body).map_err(bad_json)?;
    envelope::validate_id(&parsed.id).map_err(|e| bad(format!("id: {}", e.message())))?;
    let code = parsed.code.unwrap_or(CloseCode::NORMAL.0);
    // RFC 6455 §7.4: 1000 is a normal close; 3000-4999 are for libraries and applications.
    // The other codes say things about the protocol that the server's own closes say.
    if !(code == 1000 || (3000..=4999).contains(&code)) {
        return Err(bad("code must be 1000 or in 3000-4999"));
    }
    let reason = parsed.reason.unwrap_or_default();
    if reason.len() > 123 {
        return Err(bad("reason must be at most 123 bytes (RFC 6455 §5.5)"));
    }
    Ok(Query::Disconnect {
        id: parsed.id,
        code,
        reason,
    })
}

/// `GET /api/presence?room=<room>`.
fn presence_query(request: &Request) -> Result<Query, Refusal> {
    let room = request
        .query_param("room")
        .ok_or_else(|| bad("?room=<room> is required"))?;
    envelope::validate_room(&room).map_err(|e| bad(format!("room: {}", e.message())))?;
    Ok(Query::Presence { room })
}

/// `GET /api/ids/<id>` (the id percent-encoded as a path segment).
fn id_query(request: &Request) -> Result<Query, Refusal> {
    let raw = request.path().strip_prefix("/api/ids/").unwrap_or_default();
    // `+` is a literal plus in a path (only a query turns it into a space).
    let id = percent_decode(&raw.replace('+', "%2B"));
    envelope::validate_id(&id).map_err(|e| bad(format!("id: {}", e.message())))?;
    Ok(Query::Id { id })
}

fn bad(reason: impl Into<String>) -> Refusal {
    Refusal::BadRequest(reason.into().into())
}

/// serde_json says what is wrong and where (`missing field `room` at line 1 column 20`).
fn bad_json(e: serde_json::Error) -> Refusal {
    bad(format!("malformed JSON body: {e}"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_by_path() {
        assert_eq!(Endpoint::of("/api/publish"), Endpoint::Publish);
        assert_eq!(Endpoint::of("/api/ids/bob"), Endpoint::Ids);
        assert_eq!(Endpoint::of("/api/ids"), Endpoint::Unknown);
        assert_eq!(Endpoint::of("/api/publish/"), Endpoint::Unknown);
        assert_eq!(Endpoint::Publish.method(), "POST");
        assert_eq!(Endpoint::Rooms.method(), "GET");
    }

    #[test]
    fn bad_json_names_what_is_wrong() {
        let e = serde_json::from_slice::<PublishBody<'_>>(br#"{"room":"a","payload":"#);
        let reason = bad_json(e.err().unwrap()).reason().into_owned();
        assert!(reason.starts_with("malformed JSON body: "), "{reason}");
        let e = serde_json::from_slice::<PublishBody<'_>>(br#"{"room":"a","payload":1,"x":2}"#);
        let reason = bad_json(e.err().unwrap()).reason().into_owned();
        assert!(reason.contains("unknown field `x`"), "{reason}");
    }

    fn member(id: &str, connections: usize, info: Option<Value>) -> Member {
        Member {
            id: id.to_string(),
            connections,
            info,
        }
    }

    /// An id on two workers is one member with the sum of its connections; its info is the
    /// first part's that has one.
    #[test]
    fn presence_parts_merge_by_id() {
        let query = Query::Presence {
            room: "lobby".to_string(),
        };
        let answer = query.answer(vec![
            Part::Presence(vec![member("bob", 1, None), member("carol", 2, None)]),
            Part::Presence(vec![
                member("alice", 1, Some(json!({"name": "Alice"}))),
                member("bob", 2, Some(json!({"name": "Bob"}))),
            ]),
            Part::Presence(vec![member("bob", 1, Some(json!({"name": "Bobby"})))]),
        ]);
        assert_eq!(
            answer,
            json!({"room": "lobby", "members": [
                {"id": "alice", "connections": 1, "info": {"name": "Alice"}},
                {"id": "bob", "connections": 4, "info": {"name": "Bob"}},
                {"id": "carol", "connections": 2, "info": null},
            ]})
        );
    }

    /// A room on two workers is one room: its ids counted once, its connections summed.
    #[test]
    fn room_parts_merge_by_name() {
        let room = |name: &str, ids: &[&str], connections| RoomPart {
            room: name.to_string(),
            ids: ids.iter().map(|s| s.to_string()).collect(),
            connections,
        };
        let answer = Query::Rooms.answer(vec![
            Part::Rooms(vec![
                room("lobby", &["a", "b"], 3),
                room("games", &["a"], 1),
            ]),
            Part::Rooms(vec![room("lobby", &["b", "c"], 2)]),
            Part::Rooms(Vec::new()),
        ]);
        assert_eq!(
            answer,
            json!({"rooms": [
                {"room": "games", "members": 1, "connections": 1},
                {"room": "lobby", "members": 3, "connections": 5},
            ]})
        );
    }

    #[test]
    fn connection_parts_sum() {
        let id = Query::Id {
            id: "bob".to_string(),
        };
        let parts = || {
            vec![
                Part::Connections(2),
                Part::Connections(0),
                Part::Connections(1),
            ]
        };
        assert_eq!(
            id.answer(parts()),
            json!({"id": "bob", "online": true, "connections": 3})
        );
        assert_eq!(
            id.answer(vec![Part::Connections(0)]),
            json!({"id": "bob", "online": false, "connections": 0})
        );
        let disconnect = Query::Disconnect {
            id: "bob".to_string(),
            code: 1000,
            reason: String::new(),
        };
        assert_eq!(
            disconnect.answer(parts()),
            json!({"id": "bob", "disconnected": 3})
        );
    }
}
