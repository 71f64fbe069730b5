//! The `/ws` envelope protocol as pure code: a client's JSON text in, a typed `Command` or an
//! `EnvelopeError` out; server messages (welcome, message, ack, presence, error) as JSON bytes.
//!
//! Owns: the wire shape of every envelope (SPEC §6), the limits on ids and room names, `MsgId`,
//! and `EnvelopeError` with its one mapping to an error `code`.
//! Does not: decide who receives what (`hub.rs`), touch connections, or read a clock.
//!
//! The client's `payload` is kept as `serde_json::value::RawValue`: a borrowed slice of the
//! client's own text, checked to be valid JSON by the parser and written back out byte for byte.
//! It is never turned into a value tree and re-serialised, so `{"b":1,"a":2}` keeps its key order,
//! spacing and number spelling, and relaying costs one scan of the text.

pub use crate::wire::AckStatus;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::fmt;

/// The longest id (`?id=`, JWT `sub`, a `to` field) and client message id, in bytes.
pub const MAX_ID_BYTES: usize = 128;

/// SPEC §6: room names are 1-64 characters of `[A-Za-z0-9._-]`.
pub const MAX_ROOM_BYTES: usize = 64;

/// A server-assigned message id: unique within a server run and increasing (SPEC §6). On the
/// wire it is a decimal string, so clients in any language can carry it without precision loss.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MsgId(pub u64);

impl fmt::Display for MsgId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl Serialize for MsgId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl MsgId {
    /// Parses the decimal form used on the wire and in `?since=`.
    pub fn parse(text: &str) -> Option<MsgId> {
        if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        text.parse().ok().map(MsgId)
    }
}

/// A valid client envelope.
#[derive(Debug)]
pub enum Command<'a> {
    /// A direct message to every connection of the id `to`.
    Send {
        to: Cow<'a, str>,
        payload: &'a RawValue,
        id: Option<Cow<'a, str>>,
    },
    /// A message to every member of `room` but the sender.
    Publish {
        room: Cow<'a, str>,
        payload: &'a RawValue,
        id: Option<Cow<'a, str>>,
    },
    /// Join `room`; with `since` (a msg_id, and optionally the `epoch` it belongs to), first
    /// replay what the room's history holds after it (SPEC §16). Answered with `joined`.
    Join {
        room: Cow<'a, str>,
        since: Option<MsgId>,
        epoch: Option<Cow<'a, str>>,
    },
    Leave {
        room: Cow<'a, str>,
    },
    /// Who is in `room` now (answered with a `members` message to the asker only).
    Members {
        room: Cow<'a, str>,
    },
    /// Replace the connection's token with `token` (SPEC §16): same `sub`, new claims, new
    /// expiry. Answered with `refreshed`, or an error (the connection keeps its old token).
    Refresh {
        token: Cow<'a, str>,
    },
    /// The newest messages of `room`'s history, at most `limit` (default: all it keeps);
    /// answered with one `history` message (SPEC §16).
    History {
        room: Cow<'a, str>,
        limit: Option<u64>,
    },
}

/// Why a client's input was refused; each maps to the `code` of an `error` message (or, for
/// `Forbidden` on a send or publish, to a `rejected` ack). The connection stays open (SPEC §6:
/// only protocol violations close it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EnvelopeError {
    /// Not JSON at all, or truncated.
    MalformedJson,
    /// JSON, but not an object, or a field of the wrong type (`"to": 5`), or a field twice.
    InvalidField,
    /// A field the `type` requires is absent (or null).
    MissingField(&'static str),
    /// `type` names no command.
    UnknownType,
    /// An id (`to`, client `id`) longer than `MAX_ID_BYTES`.
    IdTooLong,
    /// An empty id, or one with control characters.
    InvalidId,
    /// A room name longer than `MAX_ROOM_BYTES`.
    RoomTooLong,
    /// An empty room name or one with characters outside `[A-Za-z0-9._-]`.
    InvalidRoom,
    /// A binary frame on `/ws`, which speaks JSON text only.
    BinaryFrame,
    /// The room is outside the `rooms` claim of the connection's token.
    Forbidden,
    /// The connection is already in `MAX_ROOMS_PER_CONNECTION` rooms.
    TooManyRooms,
    /// A `publish` to a room outside the `publish` claim (by default the `rooms` claim) of the
    /// connection's token. Answered as the `reason` of a `rejected` ack, not as an error.
    PublishForbidden,
    /// A `refresh` whose token was refused; the label says why (`auth::AuthError::label`).
    TokenRefused(&'static str),
    /// A `refresh` whose token is valid but names another `sub` than the connection's id.
    TokenSubjectMismatch,
    /// A `refresh` on a server without `--jwt-secret`: there is no token to replace.
    TokensNotInUse,
    /// A `since` that is not a msg_id (a string of decimal digits), or an `epoch` that is not
    /// one (16 hex digits).
    InvalidSince,
    /// `history` on a server that keeps no room history (`--room-history 0`).
    HistoryOff,
    /// A `history` reply that the connection's outbound queue could not take (over
    /// `--max-outbound` under `--slow-consumer drop`): said instead of dropped silently.
    HistoryDropped,
}

impl EnvelopeError {
    /// The `code` field of the `error` message.
    pub fn code(self) -> &'static str {
        match self {
            EnvelopeError::MalformedJson => "malformed_json",
            EnvelopeError::InvalidField => "invalid_field",
            EnvelopeError::MissingField(_) => "missing_field",
            EnvelopeError::UnknownType => "unknown_type",
            EnvelopeError::IdTooLong => "id_too_long",
            EnvelopeError::InvalidId => "invalid_id",
            EnvelopeError::RoomTooLong => "room_too_long",
            EnvelopeError::InvalidRoom => "invalid_room",
            EnvelopeError::BinaryFrame => "binary_not_supported",
            EnvelopeError::Forbidden => "forbidden",
            EnvelopeError::TooManyRooms => "too_many_rooms",
            EnvelopeError::PublishForbidden => "publish_forbidden",
            EnvelopeError::TokenRefused(_) => "token_refused",
            EnvelopeError::TokenSubjectMismatch => "token_sub_mismatch",
            EnvelopeError::TokensNotInUse => "tokens_not_in_use",
            EnvelopeError::InvalidSince => "invalid_since",
            EnvelopeError::HistoryOff => "history_off",
            EnvelopeError::HistoryDropped => "history_dropped",
        }
    }

    /// The `message` field: what was wrong, in words.
    pub fn message(self) -> Cow<'static, str> {
        Cow::Borrowed(match self {
            EnvelopeError::MalformedJson => "the message is not valid JSON",
            EnvelopeError::InvalidField => {
                "expected a JSON object whose fields have the documented types"
            }
            EnvelopeError::MissingField(field) => {
                return Cow::Owned(format!("missing field \"{field}\""))
            }
            EnvelopeError::UnknownType => {
                "type must be one of \"send\", \"publish\", \"join\", \"leave\""
            }
            EnvelopeError::IdTooLong => "ids are at most 128 bytes",
            EnvelopeError::InvalidId => "ids are non-empty and contain no control characters",
            EnvelopeError::RoomTooLong => "room names are at most 64 characters",
            EnvelopeError::InvalidRoom => "room names are 1-64 characters of A-Z a-z 0-9 . _ -",
            EnvelopeError::BinaryFrame => "/ws accepts JSON in text frames only",
            EnvelopeError::Forbidden => "this room is not allowed by your token",
            EnvelopeError::TooManyRooms => "this connection is in too many rooms",
            EnvelopeError::PublishForbidden => "your token does not allow publishing to this room",
            EnvelopeError::TokenRefused(why) => {
                return Cow::Owned(format!(
                    "the new token was refused ({why}); the connection keeps its current token"
                ))
            }
            EnvelopeError::TokenSubjectMismatch => {
                "the new token is for another sub; the connection keeps its current token"
            }
            EnvelopeError::TokensNotInUse => "this server does not use tokens (no --jwt-secret)",
            EnvelopeError::InvalidSince => {
                "since must be a msg_id (a string of decimal digits), epoch the welcome's epoch"
            }
            EnvelopeError::HistoryOff => "this server keeps no room history (--room-history 0)",
            EnvelopeError::HistoryDropped => {
                "the history reply did not fit this connection's outbound queue; ask again later"
            }
        })
    }
}

/// Every field any command may have; which are required depends on `type`. Unknown fields are
/// ignored, so clients may add their own.
#[derive(Deserialize)]
struct Wire<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    to: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    room: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    token: Option<Cow<'a, str>>,
    /// `Some` whenever the field is present, even as `null` (a valid payload).
    #[serde(borrow, default, deserialize_with = "present")]
    payload: Option<&'a RawValue>,
    /// `join`: replay the room's history after this msg_id.
    #[serde(borrow, default)]
    since: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    epoch: Option<Cow<'a, str>>,
    /// `history`: how many of the newest messages.
    #[serde(default)]
    limit: Option<u64>,
}

fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

/// Parses one text message from a client.
///
/// # Errors
/// Any `EnvelopeError` but `BinaryFrame`, `Forbidden` and `TooManyRooms` (the hub's own).
pub fn parse(text: &str) -> Result<Command<'_>, EnvelopeError> {
    let wire: Wire<'_> = serde_json::from_str(text).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => EnvelopeError::InvalidField,
        _ => EnvelopeError::MalformedJson,
    })?;
    let kind = wire.kind.ok_or(EnvelopeError::MissingField("type"))?;
    let command = match kind.as_ref() {
        "send" => Command::Send {
            to: wire.to.ok_or(EnvelopeError::MissingField("to"))?,
            payload: wire.payload.ok_or(EnvelopeError::MissingField("payload"))?,
            id: wire.id,
        },
        "publish" => Command::Publish {
            room: wire.room.ok_or(EnvelopeError::MissingField("room"))?,
            payload: wire.payload.ok_or(EnvelopeError::MissingField("payload"))?,
            id: wire.id,
        },
        "join" => Command::Join {
            room: wire.room.ok_or(EnvelopeError::MissingField("room"))?,
            since: match wire.since {
                None => None,
                Some(text) => Some(MsgId::parse(&text).ok_or(EnvelopeError::InvalidSince)?),
            },
            epoch: wire.epoch,
        },
        "leave" => Command::Leave {
            room: wire.room.ok_or(EnvelopeError::MissingField("room"))?,
        },
        "members" => Command::Members {
            room: wire.room.ok_or(EnvelopeError::MissingField("room"))?,
        },
        "refresh" => Command::Refresh {
            token: wire.token.ok_or(EnvelopeError::MissingField("token"))?,
        },
        "history" => Command::History {
            room: wire.room.ok_or(EnvelopeError::MissingField("room"))?,
            limit: wire.limit,
        },
        _ => return Err(EnvelopeError::UnknownType),
    };
    match &command {
        Command::Send { to, id, .. } => {
            validate_id(to)?;
            if let Some(id) = id {
                validate_id(id)?;
            }
        }
        Command::Publish { room, id, .. } => {
            validate_room(room)?;
            if let Some(id) = id {
                validate_id(id)?;
            }
        }
        Command::Join { room, epoch, .. } => {
            validate_room(room)?;
            // The epoch is 16 hex digits (`Epoch`'s form); checked here so a typo is an error,
            // not a silent `recovered: false`.
            let hex = |e: &str| e.len() == 16 && e.bytes().all(|b| b.is_ascii_hexdigit());
            if epoch.as_deref().is_some_and(|e| !hex(e)) {
                return Err(EnvelopeError::InvalidSince);
            }
        }
        Command::Leave { room } | Command::Members { room } | Command::History { room, .. } => {
            validate_room(room)?
        }
        // The token is checked by the hub's verifier, which refuses anything that is not one.
        Command::Refresh { .. } => {}
    }
    Ok(command)
}

/// Checks an id (a connection's identity, a recipient, a client message id).
///
/// # Errors
/// `IdTooLong` over `MAX_ID_BYTES`; `InvalidId` if empty or with control characters.
pub fn validate_id(id: &str) -> Result<(), EnvelopeError> {
    if id.len() > MAX_ID_BYTES {
        return Err(EnvelopeError::IdTooLong);
    }
    if id.is_empty() || id.chars().any(char::is_control) {
        return Err(EnvelopeError::InvalidId);
    }
    Ok(())
}

/// Checks a room name (SPEC §6: 1-64 characters of `[A-Za-z0-9._-]`).
///
/// # Errors
/// `RoomTooLong` over `MAX_ROOM_BYTES`; `InvalidRoom` if empty or with another character.
pub fn validate_room(room: &str) -> Result<(), EnvelopeError> {
    if room.len() > MAX_ROOM_BYTES {
        return Err(EnvelopeError::RoomTooLong);
    }
    let allowed = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-');
    if room.is_empty() || !room.bytes().all(allowed) {
        return Err(EnvelopeError::InvalidRoom);
    }
    Ok(())
}

// ----- server -> client ----------------------------------------------------------------------

/// What happened in a room, for `presence` messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PresenceEvent {
    Join,
    Leave,
}

#[derive(Serialize)]
struct Welcome<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    id: &'a str,
    last_msg_id: Option<MsgId>,
    epoch: &'a str,
    recovered: bool,
}

/// A message without its msg_id: what the hub hands the engine to store (`message_body`). The
/// msg_id is the position the engine gives it, spliced in by `with_msg_id`.
#[derive(Serialize)]
struct Message<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    from: &'a str,
    to: Option<&'a str>,
    room: Option<&'a str>,
    /// Written verbatim: serde_json emits a `RawValue` as its text.
    payload: &'a RawValue,
    timestamp: u64,
}

#[derive(Serialize)]
struct Ack<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    id: Option<&'a str>,
    msg_id: Option<MsgId>,
    status: AckStatus,
    reason: Option<&'a str>,
}

#[derive(Serialize)]
struct Presence<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    room: &'a str,
    id: &'a str,
    event: PresenceEvent,
    /// The `info` claim of the connection's token; absent without one.
    #[serde(skip_serializing_if = "Option::is_none")]
    info: Option<&'a RawValue>,
}

#[derive(Serialize)]
struct Error<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    code: &'a str,
    message: &'a str,
}

/// Serialises one of the structs above. They hold only strings, integers and raw JSON, which
/// serde_json cannot fail to write into a `Vec`; an empty object stands in if it ever did.
fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec())
}

/// `{"type":"welcome","id":...,"last_msg_id":...,"epoch":...,"recovered":...}`: the first
/// message of every `/ws` connection. `epoch` names the history of the id's inbox (a client
/// passes it back with `?since=`); `recovered` is false when messages after the client's
/// `since` may be missing (SPEC §13).
pub fn welcome(id: &str, last_msg_id: Option<MsgId>, epoch: &str, recovered: bool) -> Vec<u8> {
    to_json(&Welcome {
        kind: "welcome",
        id,
        last_msg_id,
        epoch,
        recovered,
    })
}

/// The start every `message_body` has, after which `with_msg_id` puts the msg_id.
const MESSAGE_HEAD: &[u8] = br#"{"type":"message","#;

/// A relayed message, direct (`to`) or published (`room`), without its msg_id: the body the
/// engine stores (it is opaque to the engine). `with_msg_id` turns it into the wire message.
pub fn message_body(
    from: &str,
    to: Option<&str>,
    room: Option<&str>,
    payload: &RawValue,
    timestamp_ms: u64,
) -> Vec<u8> {
    to_json(&Message {
        kind: "message",
        from,
        to,
        room,
        payload,
        timestamp: timestamp_ms,
    })
}

/// The wire message: `body` (from `message_body`) with `"msg_id":"<msg_id>"` as its second
/// field. A body that does not start as `message_body` writes (it cannot, unless a data
/// directory was edited by hand) is returned unchanged rather than mangled.
pub fn with_msg_id(body: &[u8], msg_id: MsgId) -> Vec<u8> {
    let Some(rest) = body.strip_prefix(MESSAGE_HEAD) else {
        return body.to_vec();
    };
    let mut out = Vec::with_capacity(body.len() + 32);
    out.extend_from_slice(MESSAGE_HEAD);
    out.extend_from_slice(br#""msg_id":""#);
    out.extend_from_slice(msg_id.to_string().as_bytes());
    out.extend_from_slice(b"\",");
    out.extend_from_slice(rest);
    out
}

/// A relayed message, direct (`to`) or published (`room`), with its msg_id.
pub fn message(
    msg_id: MsgId,
    from: &str,
    to: Option<&str>,
    room: Option<&str>,
    payload: &RawValue,
    timestamp_ms: u64,
) -> Vec<u8> {
    with_msg_id(&message_body(from, to, room, payload, timestamp_ms), msg_id)
}

/// The answer to a `send` or `publish`.
pub fn ack(
    id: Option<&str>,
    msg_id: Option<MsgId>,
    status: AckStatus,
    reason: Option<&str>,
) -> Vec<u8> {
    to_json(&Ack {
        kind: "ack",
        id,
        msg_id,
        status,
        reason,
    })
}

/// Someone joined or left a room; `info` is the `info` claim of that connection's token.
pub fn presence(room: &str, id: &str, info: Option<&RawValue>, event: PresenceEvent) -> Vec<u8> {
    to_json(&Presence {
        kind: "presence",
        room,
        id,
        event,
        info,
    })
}

#[derive(Serialize)]
struct Members<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    room: &'a str,
    ids: Vec<&'a str>,
    members: &'a [Member<'a>],
}

/// One connection in a `members` answer.
#[derive(Serialize)]
pub struct Member<'a> {
    pub id: &'a str,
    /// The `info` claim of its token (`null` without one).
    pub info: Option<&'a RawValue>,
}

/// The members of a room: one entry per connection in it (an id with two devices there appears
/// twice), in the order given. `ids` lists the ids alone; `members` the same connections with
/// their `info`.
pub fn members(room: &str, members: &[Member<'_>]) -> Vec<u8> {
    to_json(&Members {
        kind: "members",
        room,
        ids: members.iter().map(|m| m.id).collect(),
        members,
    })
}

#[derive(Serialize)]
struct Refreshed {
    #[serde(rename = "type")]
    kind: &'static str,
    exp: u64,
}

/// The answer to a `refresh`: the new token is in force until `exp` (its claim, seconds since
/// the epoch).
pub fn refreshed(exp: u64) -> Vec<u8> {
    to_json(&Refreshed {
        kind: "refreshed",
        exp,
    })
}

#[derive(Serialize)]
struct Joined<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    room: &'a str,
    recovered: bool,
    last_msg_id: Option<MsgId>,
    epoch: &'a str,
}

/// `{"type":"joined","room":...,"recovered":...,"last_msg_id":...,"epoch":...}`: the answer
/// to every `join`, after the replay a `since` asked for (SPEC §16). `recovered` is false when
/// messages after the client's `since` may be missing (SPEC §13); `last_msg_id` is the newest
/// message in the room's history (null: none, or history off); everything after `joined` is
/// live.
pub fn joined(room: &str, recovered: bool, last_msg_id: Option<MsgId>, epoch: &str) -> Vec<u8> {
    to_json(&Joined {
        kind: "joined",
        room,
        recovered,
        last_msg_id,
        epoch,
    })
}

/// `{"type":"history","room":...,"messages":[...],"last_msg_id":...,"more":...}`: a page of a
/// room's history, oldest first, each entry a `message` exactly as it was delivered live
/// (`messages` holds `with_msg_id` bodies, spliced in verbatim). `more` is true when older
/// messages within the asked `limit` were left out to keep the reply within its byte bound.
pub fn history(
    room: &str,
    messages: &[Vec<u8>],
    last_msg_id: Option<MsgId>,
    more: bool,
) -> Vec<u8> {
    let room = serde_json::to_string(room).unwrap_or_else(|_| "null".into());
    let last = last_msg_id.map_or_else(|| "null".to_string(), |m| format!("\"{m}\""));
    let size: usize = messages.iter().map(|m| m.len() + 1).sum();
    let mut out = Vec::with_capacity(size + room.len() + last.len() + 64);
    out.extend_from_slice(br#"{"type":"history","room":"#);
    out.extend_from_slice(room.as_bytes());
    out.extend_from_slice(br#","messages":["#);
    for (i, m) in messages.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(m);
    }
    out.extend_from_slice(br#"],"last_msg_id":"#);
    out.extend_from_slice(last.as_bytes());
    out.extend_from_slice(if more {
        br#","more":true}"#
    } else {
        br#","more":false}"#
    });
    out
}

/// Bad input; the connection stays open.
pub fn error(e: EnvelopeError) -> Vec<u8> {
    to_json(&Error {
        kind: "error",
        code: e.code(),
        message: &e.message(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shape a parse produced, without borrowed lifetimes, for table comparisons.
    fn check(input: &str, expected: Result<&str, EnvelopeError>) {
        let got = parse(input).map(|c| match c {
            Command::Send { to, payload, id } => {
                format!("send to={to} payload={} id={id:?}", payload.get())
            }
            Command::Publish { room, payload, id } => {
                format!("publish room={room} payload={} id={id:?}", payload.get())
            }
            Command::Join { room, since, epoch } => {
                format!("join room={room} since={since:?} epoch={epoch:?}")
            }
            Command::History { room, limit } => format!("history room={room} limit={limit:?}"),
            Command::Leave { room } => format!("leave room={room}"),
            Command::Members { room } => format!("members room={room}"),
            Command::Refresh { token } => format!("refresh token={token}"),
        });
        assert_eq!(got.as_deref().map_err(|e| *e), expected, "input: {input}");
    }

    #[test]
    fn parse_table() {
        use EnvelopeError::*;
        let long_id = "x".repeat(129);
        let long_room = "r".repeat(65);
        let cases: Vec<(&str, String, Result<&str, EnvelopeError>)> = vec![
            (
                "send",
                r#"{"type":"send","to":"bob","payload":{"b":1, "a":[1.50,2]},"id":"c1"}"#.into(),
                Ok(r#"send to=bob payload={"b":1, "a":[1.50,2]} id=Some("c1")"#),
            ),
            (
                "members",
                r#"{"type":"members","room":"lobby"}"#.into(),
                Ok("members room=lobby"),
            ),
            (
                "refresh",
                r#"{"type":"refresh","token":"a.b.c"}"#.into(),
                Ok("refresh token=a.b.c"),
            ),
            (
                "refresh without a token",
                r#"{"type":"refresh"}"#.into(),
                Err(MissingField("token")),
            ),
            (
                "refresh with a token of the wrong type",
                r#"{"type":"refresh","token":5}"#.into(),
                Err(InvalidField),
            ),
            (
                "members without a room",
                r#"{"type":"members"}"#.into(),
                Err(MissingField("room")),
            ),
            (
                "send without id",
                r#"{"type":"send","to":"bob","payload":"hi"}"#.into(),
                Ok(r#"send to=bob payload="hi" id=None"#),
            ),
            (
                "null payload is a payload",
                r#"{"type":"send","to":"bob","payload":null}"#.into(),
                Ok("send to=bob payload=null id=None"),
            ),
            (
                "escaped strings",
                r#"{"type":"send","to":"b\u00f6b","payload":1}"#.into(),
                Ok("send to=böb payload=1 id=None"),
            ),
            (
                "unknown fields ignored",
                r#"{"type":"join","room":"lobby","x":{"y":[]}}"#.into(),
                Ok("join room=lobby since=None epoch=None"),
            ),
            (
                "join with since and epoch",
                r#"{"type":"join","room":"lobby","since":"42","epoch":"00000000000000ff"}"#.into(),
                Ok(r#"join room=lobby since=Some(MsgId(42)) epoch=Some("00000000000000ff")"#),
            ),
            (
                "join with a since that is not a msg_id",
                r#"{"type":"join","room":"lobby","since":"4x"}"#.into(),
                Err(InvalidSince),
            ),
            (
                "join with a numeric since (msg_ids are strings)",
                r#"{"type":"join","room":"lobby","since":42}"#.into(),
                Err(InvalidField),
            ),
            (
                "join with a bad epoch",
                r#"{"type":"join","room":"lobby","since":"1","epoch":"xyz"}"#.into(),
                Err(InvalidSince),
            ),
            (
                "history",
                r#"{"type":"history","room":"lobby","limit":20}"#.into(),
                Ok("history room=lobby limit=Some(20)"),
            ),
            (
                "history without a limit",
                r#"{"type":"history","room":"lobby"}"#.into(),
                Ok("history room=lobby limit=None"),
            ),
            (
                "history with a negative limit",
                r#"{"type":"history","room":"lobby","limit":-1}"#.into(),
                Err(InvalidField),
            ),
            (
                "history needs a room",
                r#"{"type":"history","limit":1}"#.into(),
                Err(MissingField("room")),
            ),
            (
                "publish",
                r#"{"type":"publish","room":"a.b_c-9","payload":[],"id":"7"}"#.into(),
                Ok(r#"publish room=a.b_c-9 payload=[] id=Some("7")"#),
            ),
            (
                "leave",
                r#"{"type":"leave","room":"lobby"}"#.into(),
                Ok("leave room=lobby"),
            ),
            ("not json", "hello".into(), Err(MalformedJson)),
            ("truncated", r#"{"type":"send""#.into(), Err(MalformedJson)),
            ("empty", "".into(), Err(MalformedJson)),
            (
                "trailing garbage",
                r#"{"type":"join","room":"a"} x"#.into(),
                Err(MalformedJson),
            ),
            ("array", "[1,2]".into(), Err(InvalidField)),
            ("string", r#""send""#.into(), Err(InvalidField)),
            (
                "wrong field type",
                r#"{"type":"send","to":5,"payload":1}"#.into(),
                Err(InvalidField),
            ),
            (
                "duplicate field",
                r#"{"type":"join","room":"a","room":"b"}"#.into(),
                Err(InvalidField),
            ),
            (
                "no type",
                r#"{"to":"bob"}"#.into(),
                Err(MissingField("type")),
            ),
            (
                "unknown type",
                r#"{"type":"shout"}"#.into(),
                Err(UnknownType),
            ),
            (
                "send without to",
                r#"{"type":"send","payload":1}"#.into(),
                Err(MissingField("to")),
            ),
            (
                "null to",
                r#"{"type":"send","to":null,"payload":1}"#.into(),
                Err(MissingField("to")),
            ),
            (
                "send without payload",
                r#"{"type":"send","to":"bob"}"#.into(),
                Err(MissingField("payload")),
            ),
            (
                "publish without room",
                r#"{"type":"publish","payload":1}"#.into(),
                Err(MissingField("room")),
            ),
            (
                "join without room",
                r#"{"type":"join"}"#.into(),
                Err(MissingField("room")),
            ),
            (
                "recipient too long",
                format!(r#"{{"type":"send","to":"{long_id}","payload":1}}"#),
                Err(IdTooLong),
            ),
            (
                "client id too long",
                format!(r#"{{"type":"send","to":"bob","payload":1,"id":"{long_id}"}}"#),
                Err(IdTooLong),
            ),
            (
                "empty recipient",
                r#"{"type":"send","to":"","payload":1}"#.into(),
                Err(InvalidId),
            ),
            (
                "control character in id",
                r#"{"type":"send","to":"a\nb","payload":1}"#.into(),
                Err(InvalidId),
            ),
            (
                "room too long",
                format!(r#"{{"type":"join","room":"{long_room}"}}"#),
                Err(RoomTooLong),
            ),
            (
                "bad room",
                r#"{"type":"join","room":"a b"}"#.into(),
                Err(InvalidRoom),
            ),
            (
                "empty room",
                r#"{"type":"leave","room":""}"#.into(),
                Err(InvalidRoom),
            ),
            (
                "bad room on publish",
                r#"{"type":"publish","room":"é","payload":1}"#.into(),
                Err(InvalidRoom),
            ),
        ];
        for (name, input, expected) in &cases {
            let _ = name;
            check(input, *expected);
        }
    }

    #[test]
    fn room_names() {
        let longest = "a".repeat(64);
        for (room, ok) in [
            ("lobby", true),
            ("A.z_0-9", true),
            (longest.as_str(), true),
            ("", false),
            ("a/b", false),
            ("a%20b", false),
            ("ü", false),
        ] {
            assert_eq!(validate_room(room).is_ok(), ok, "{room:?}");
        }
        assert_eq!(
            validate_room(&"a".repeat(65)),
            Err(EnvelopeError::RoomTooLong)
        );
    }

    #[test]
    fn error_codes_are_distinct() {
        use EnvelopeError::*;
        let all = [
            MalformedJson,
            InvalidField,
            MissingField("x"),
            UnknownType,
            IdTooLong,
            InvalidId,
            RoomTooLong,
            InvalidRoom,
            BinaryFrame,
            Forbidden,
            TooManyRooms,
            PublishForbidden,
            TokenRefused("expired"),
            TokenSubjectMismatch,
            TokensNotInUse,
            InvalidSince,
            HistoryOff,
        ];
        let mut codes: Vec<_> = all.iter().map(|e| e.code()).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), all.len());
    }

    #[test]
    fn server_messages() {
        let payload = RawValue::from_string(r#"{"z": 1,  "a":"\u00e9"}"#.to_string()).unwrap();
        let info = RawValue::from_string(r#"{"name":"Bob"}"#.to_string()).unwrap();
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            (
                "welcome",
                welcome("alice", Some(MsgId(42)), "00000000000000ff", true),
                r#"{"type":"welcome","id":"alice","last_msg_id":"42","epoch":"00000000000000ff","recovered":true}"#,
            ),
            (
                "welcome, nothing retained",
                welcome("a\"b", None, "00000000000000ff", false),
                r#"{"type":"welcome","id":"a\"b","last_msg_id":null,"epoch":"00000000000000ff","recovered":false}"#,
            ),
            (
                "direct message keeps the payload byte for byte",
                message(
                    MsgId(7),
                    "alice",
                    Some("bob"),
                    None,
                    &payload,
                    1700000000000,
                ),
                r#"{"type":"message","msg_id":"7","from":"alice","to":"bob","room":null,"payload":{"z": 1,  "a":"\u00e9"},"timestamp":1700000000000}"#,
            ),
            (
                "ack",
                ack(Some("c1"), Some(MsgId(9)), AckStatus::Queued, None),
                r#"{"type":"ack","id":"c1","msg_id":"9","status":"queued","reason":null}"#,
            ),
            (
                "rejected ack",
                ack(None, None, AckStatus::Rejected, Some("offline queue full")),
                r#"{"type":"ack","id":null,"msg_id":null,"status":"rejected","reason":"offline queue full"}"#,
            ),
            (
                "presence",
                presence("lobby", "bob", None, PresenceEvent::Leave),
                r#"{"type":"presence","room":"lobby","id":"bob","event":"leave"}"#,
            ),
            (
                "presence with the token's info",
                presence("lobby", "bob", Some(&info), PresenceEvent::Join),
                r#"{"type":"presence","room":"lobby","id":"bob","event":"join","info":{"name":"Bob"}}"#,
            ),
            (
                "members",
                members(
                    "lobby",
                    &[
                        Member {
                            id: "alice",
                            info: None,
                        },
                        Member {
                            id: "bob",
                            info: Some(&info),
                        },
                    ],
                ),
                r#"{"type":"members","room":"lobby","ids":["alice","bob"],"members":[{"id":"alice","info":null},{"id":"bob","info":{"name":"Bob"}}]}"#,
            ),
            (
                "refreshed",
                refreshed(1700000000),
                r#"{"type":"refreshed","exp":1700000000}"#,
            ),
            (
                "joined",
                joined("lobby", true, Some(MsgId(5)), "00000000000000ff"),
                r#"{"type":"joined","room":"lobby","recovered":true,"last_msg_id":"5","epoch":"00000000000000ff"}"#,
            ),
            (
                "history splices the messages verbatim",
                history(
                    "lobby",
                    &[br#"{"a":1}"#.to_vec(), br#"{"b":2}"#.to_vec()],
                    Some(MsgId(9)),
                    true,
                ),
                r#"{"type":"history","room":"lobby","messages":[{"a":1},{"b":2}],"last_msg_id":"9","more":true}"#,
            ),
            (
                "empty history",
                history("lobby", &[], None, false),
                r#"{"type":"history","room":"lobby","messages":[],"last_msg_id":null,"more":false}"#,
            ),
            (
                "error",
                error(EnvelopeError::MissingField("to")),
                r#"{"type":"error","code":"missing_field","message":"missing field \"to\""}"#,
            ),
        ];
        for (name, got, want) in cases {
            assert_eq!(String::from_utf8(got).unwrap(), want, "{name}");
        }
    }

    #[test]
    fn msg_ids_parse_as_decimal_only() {
        assert_eq!(MsgId::parse("0"), Some(MsgId(0)));
        assert_eq!(MsgId::parse("18446744073709551615"), Some(MsgId(u64::MAX)));
        for bad in ["", "-1", "+1", "1.0", "0x10", "18446744073709551616", " 1"] {
            assert_eq!(MsgId::parse(bad), None, "{bad:?}");
        }
    }
}
