//! The client's half of the `/ws` envelope protocol and the way received traffic is shown: JSON
//! out for what we send, typed values in for what the server sends, and text lines for people.
//!
//! Owns: `encode` (send, publish, join, leave envelopes; `encode_join` for a rejoin with
//! `since`), `parse` into `ServerEnvelope`, the
//! human renderings (`[12:00:01] alice -> bob: hi`), and the `--json` renderings.
//! Does not: read a clock (times come in as text), write anything, or track ids (`outbox.rs`).
//!
//! SPEC §6 (the envelope shapes), §7 (`[time] from -> to: payload`, `--json`).

use super::outbox::Outgoing;
use crate::wire::AckStatus;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use serde_json::{json, Value};
use std::fmt::Write as _;

/// The text frame for `out`: a JSON envelope (SPEC §6), or the line itself on a raw endpoint.
/// The typed text is the payload as a JSON string.
pub fn encode(out: &Outgoing) -> String {
    match out {
        Outgoing::Send { id, to, text } => {
            json!({"type": "send", "to": to, "payload": text, "id": id}).to_string()
        }
        Outgoing::Publish { id, room, text } => {
            json!({"type": "publish", "room": room, "payload": text, "id": id}).to_string()
        }
        Outgoing::Join(room) => json!({"type": "join", "room": room}).to_string(),
        Outgoing::Leave(room) => json!({"type": "leave", "room": room}).to_string(),
        Outgoing::Raw(text) => text.clone(),
    }
}

/// `{"type":"join","room":...,"since":...,"epoch":...}`: joining a room again after a
/// reconnect, asking for what was missed (SPEC §16); without a `since`, a plain join.
pub fn encode_join(room: &str, since: Option<(&str, Option<&str>)>) -> String {
    match since {
        None => json!({"type": "join", "room": room}).to_string(),
        Some((since, None)) => json!({"type": "join", "room": room, "since": since}).to_string(),
        Some((since, Some(epoch))) => {
            json!({"type": "join", "room": room, "since": since, "epoch": epoch}).to_string()
        }
    }
}

/// A message from the server on `/ws`.
#[derive(Clone, Debug, PartialEq)]
pub enum ServerEnvelope {
    Welcome {
        id: String,
        /// The newest msg_id the relay retains for us, if any.
        last_msg_id: Option<String>,
        /// The history our msg_ids belong to (SPEC §13); absent from older relays.
        epoch: Option<String>,
        /// False when messages after our `?since=` may be missing; absent from older relays.
        recovered: Option<bool>,
    },
    Message {
        msg_id: Option<String>,
        from: String,
        to: Option<String>,
        room: Option<String>,
        payload: Value,
        /// Milliseconds since the epoch, stamped by the relay.
        timestamp_ms: Option<i64>,
    },
    Ack {
        id: Option<String>,
        msg_id: Option<String>,
        status: String,
        reason: Option<String>,
    },
    Presence {
        room: String,
        id: String,
        event: String,
    },
    Error {
        code: String,
        message: String,
    },
    /// A `type` this client does not know (a newer server): shown as it came.
    Other(Value),
    /// The relay took our new token (`refresh`); `exp` is its expiry, seconds since the epoch.
    Refreshed {
        exp: Option<f64>,
    },
    /// The answer to a join (SPEC §16): after it, the room's traffic is live.
    Joined {
        room: String,
        /// False when messages after our `since` may be missing.
        recovered: bool,
        last_msg_id: Option<String>,
        /// The epoch of the room's history. With the Redis engine (SPEC §15) every stream has
        /// its own, so a rejoin's `since` is judged against the room's, not the welcome's.
        epoch: Option<String>,
    },
}

/// Parses one text message from `/ws`.
///
/// # Errors
/// A one-line description when the text is not a JSON object with a string `type`.
pub fn parse(text: &str) -> Result<ServerEnvelope, String> {
    let value: Value =
        serde_json::from_str(text).map_err(|e| format!("the server sent invalid JSON: {e}"))?;
    let kind = value
        .get("type")
        .and_then(Value::as_str)
        .ok_or("the server sent JSON without a \"type\"")?;
    // msg_id is a decimal string on the wire (SPEC §6); a number is accepted too.
    let id_field = |name: &str| match value.get(name) {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    let text_field = |name: &str| value.get(name).and_then(Value::as_str).map(str::to_string);
    Ok(match kind {
        "welcome" => ServerEnvelope::Welcome {
            id: text_field("id").unwrap_or_default(),
            last_msg_id: id_field("last_msg_id"),
            epoch: text_field("epoch"),
            recovered: value.get("recovered").and_then(Value::as_bool),
        },
        "message" => ServerEnvelope::Message {
            msg_id: id_field("msg_id"),
            from: text_field("from").unwrap_or_else(|| "?".to_string()),
            to: text_field("to"),
            room: text_field("room"),
            payload: value.get("payload").cloned().unwrap_or(Value::Null),
            timestamp_ms: value.get("timestamp").and_then(Value::as_i64),
        },
        "ack" => ServerEnvelope::Ack {
            id: id_field("id"),
            msg_id: id_field("msg_id"),
            status: text_field("status").unwrap_or_default(),
            reason: text_field("reason"),
        },
        "presence" => ServerEnvelope::Presence {
            room: text_field("room").unwrap_or_default(),
            id: text_field("id").unwrap_or_default(),
            event: text_field("event").unwrap_or_default(),
        },
        "refreshed" => ServerEnvelope::Refreshed {
            exp: value.get("exp").and_then(Value::as_f64),
        },
        "error" => ServerEnvelope::Error {
            code: text_field("code").unwrap_or_default(),
            message: text_field("message").unwrap_or_default(),
        },
        "joined" => ServerEnvelope::Joined {
            room: text_field("room").unwrap_or_default(),
            recovered: value.get("recovered").and_then(Value::as_bool) != Some(false),
            last_msg_id: id_field("last_msg_id"),
            epoch: text_field("epoch"),
        },
        _ => ServerEnvelope::Other(value),
    })
}

/// `[12:00:01] alice -> bob: hi` or `[12:00:01] alice -> #lobby: hi` (SPEC §7). A string
/// payload is shown as its text; any other JSON as JSON.
pub fn render_message(
    time: &str,
    from: &str,
    to: Option<&str>,
    room: Option<&str>,
    payload: &Value,
) -> String {
    let target = match (room, to) {
        (Some(room), _) => format!("#{room}"),
        (None, Some(to)) => to.to_string(),
        (None, None) => "?".to_string(),
    };
    let body = match payload {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    format!(
        "[{time}] {} -> {}: {}",
        printable(from),
        printable(&target),
        printable(&body)
    )
}

/// `[12:00:01] * delivered to bob (msg 1700000000000042)` and the like: what an ack says about
/// one of our messages.
pub fn render_ack(time: &str, sent: &Outgoing, status: &str, reason: Option<&str>) -> String {
    let who = printable(&sent.recipient());
    let text = match AckStatus::parse(status) {
        Some(AckStatus::Delivered) => format!("delivered to {who}"),
        Some(AckStatus::Partial) => format!(
            "partly delivered to {who}: {}",
            printable(reason.unwrap_or("no reason given"))
        ),
        Some(AckStatus::Queued) => format!("queued for {who}, who is offline"),
        Some(AckStatus::Rejected) => format!(
            "rejected (to {who}): {}",
            printable(reason.unwrap_or("no reason given"))
        ),
        None => format!("{} (to {who})", printable(status)),
    };
    format!("[{time}] * {text}")
}

/// `[12:00:01] * bob joined #lobby`.
pub fn render_presence(time: &str, room: &str, id: &str, event: &str) -> String {
    let verb = match event {
        "join" => "joined",
        "leave" => "left",
        other => other,
    };
    format!(
        "[{time}] * {} {} #{}",
        printable(id),
        printable(verb),
        printable(room)
    )
}

/// A message from a raw endpoint: `[12:00:01] hello`, or a hex preview of binary data.
pub fn render_raw(time: &str, text: Option<&str>, data: &[u8]) -> String {
    match text {
        Some(text) => format!("[{time}] {}", printable(text)),
        None => {
            const PREVIEW: usize = 32;
            let mut hex = String::new();
            for byte in data.iter().take(PREVIEW) {
                let _ = write!(hex, " {byte:02x}");
            }
            let more = if data.len() > PREVIEW { " ..." } else { "" };
            format!("[{time}] (binary, {} bytes){hex}{more}", data.len())
        }
    }
}

/// A raw-endpoint message as one JSON line for `--json`.
pub fn raw_json(text: Option<&str>, data: &[u8], timestamp_ms: i64) -> String {
    match text {
        Some(text) => json!({"type": "text", "payload": text, "timestamp": timestamp_ms}),
        None => json!({
            "type": "binary",
            "payload_base64": BASE64.encode(data),
            "timestamp": timestamp_ms,
        }),
    }
    .to_string()
}

/// A server envelope as one line for `--json`: the server's own text, so the payload keeps its
/// exact spelling. A line break in valid JSON can only be insignificant whitespace (inside a
/// string it must be escaped, RFC 8259 §7), so replacing it by a space keeps the JSON valid.
pub fn json_line(text: &str) -> String {
    text.replace(['\r', '\n'], " ")
}

/// Text from the network made safe for a terminal: control characters (an escape sequence
/// could move the cursor or retitle the window) are shown escaped; tabs stay.
pub fn printable(text: &str) -> String {
    if !text.chars().any(|c| c.is_control() && c != '\t') {
        return text.to_string();
    }
    text.chars()
        .map(|c| {
            if c.is_control() && c != '\t' {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn encodings() {
        let send = Outgoing::Send {
            id: "t-1".into(),
            to: "bob".into(),
            text: "hi \"there\"".into(),
        };
        let publish = Outgoing::Publish {
            id: "t-2".into(),
            room: "lobby".into(),
            text: "hello".into(),
        };
        let cases: Vec<(Outgoing, Value)> = vec![
            (
                send,
                json!({"type":"send","to":"bob","payload":"hi \"there\"","id":"t-1"}),
            ),
            (
                publish,
                json!({"type":"publish","room":"lobby","payload":"hello","id":"t-2"}),
            ),
            (
                Outgoing::Join("lobby".into()),
                json!({"type":"join","room":"lobby"}),
            ),
            (
                Outgoing::Leave("lobby".into()),
                json!({"type":"leave","room":"lobby"}),
            ),
        ];
        for (out, want) in cases {
            let text = encode(&out);
            let got: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(got, want, "{text}");
        }
        assert_eq!(encode(&Outgoing::Raw("{not json".into())), "{not json");
        for (since, want) in [
            (None, json!({"type":"join","room":"lobby"})),
            (
                Some(("42", None)),
                json!({"type":"join","room":"lobby","since":"42"}),
            ),
            (
                Some(("42", Some("00000000000000ff"))),
                json!({"type":"join","room":"lobby","since":"42","epoch":"00000000000000ff"}),
            ),
        ] {
            let got: Value = serde_json::from_str(&encode_join("lobby", since)).unwrap();
            assert_eq!(got, want);
        }
    }

    fn check(name: &str, text: &str, expected: Result<ServerEnvelope, ()>) {
        assert_eq!(parse(text).map_err(|_| ()), expected, "{name}");
    }

    #[test]
    fn server_envelopes() {
        use ServerEnvelope::*;
        #[rustfmt::skip]
        let cases: Vec<(&str, &str, Result<ServerEnvelope, ()>)> = vec![
            ("welcome", r#"{"type":"welcome","id":"alice","last_msg_id":"42"}"#,
                Ok(Welcome { id: "alice".into(), last_msg_id: Some("42".into()), epoch: None, recovered: None })),
            ("welcome with epoch", r#"{"type":"welcome","id":"alice","last_msg_id":"42","epoch":"00000000000000ff","recovered":false}"#,
                Ok(Welcome { id: "alice".into(), last_msg_id: Some("42".into()), epoch: Some("00000000000000ff".into()), recovered: Some(false) })),
            ("welcome, nothing retained", r#"{"type":"welcome","id":"alice","last_msg_id":null}"#,
                Ok(Welcome { id: "alice".into(), last_msg_id: None, epoch: None, recovered: None })),
            ("welcome, no field", r#"{"type":"welcome","id":"a"}"#,
                Ok(Welcome { id: "a".into(), last_msg_id: None, epoch: None, recovered: None })),
            ("direct", r#"{"type":"message","msg_id":"7","from":"alice","to":"bob","room":null,"payload":"hi","timestamp":1700000000000}"#,
                Ok(Message { msg_id: Some("7".into()), from: "alice".into(), to: Some("bob".into()), room: None, payload: json!("hi"), timestamp_ms: Some(1_700_000_000_000) })),
            ("room, object payload, numeric msg_id", r#"{"type":"message","msg_id":8,"from":"a","to":null,"room":"lobby","payload":{"x":1}}"#,
                Ok(Message { msg_id: Some("8".into()), from: "a".into(), to: None, room: Some("lobby".into()), payload: json!({"x":1}), timestamp_ms: None })),
            ("ack", r#"{"type":"ack","id":"t-1","msg_id":"9","status":"queued","reason":null}"#,
                Ok(Ack { id: Some("t-1".into()), msg_id: Some("9".into()), status: "queued".into(), reason: None })),
            ("rejected", r#"{"type":"ack","id":"t-2","msg_id":null,"status":"rejected","reason":"forbidden"}"#,
                Ok(Ack { id: Some("t-2".into()), msg_id: None, status: "rejected".into(), reason: Some("forbidden".into()) })),
            ("presence", r#"{"type":"presence","room":"lobby","id":"bob","event":"join"}"#,
                Ok(Presence { room: "lobby".into(), id: "bob".into(), event: "join".into() })),
            ("joined", r#"{"type":"joined","room":"lobby","recovered":false,"last_msg_id":"12","epoch":"00000000000000ff"}"#,
                Ok(Joined { room: "lobby".into(), recovered: false, last_msg_id: Some("12".into()), epoch: Some("00000000000000ff".into()) })),
            ("joined, nothing kept", r#"{"type":"joined","room":"lobby","recovered":true,"last_msg_id":null}"#,
                Ok(Joined { room: "lobby".into(), recovered: true, last_msg_id: None, epoch: None })),
            ("error", r#"{"type":"error","code":"invalid_room","message":"no"}"#,
                Ok(Error { code: "invalid_room".into(), message: "no".into() })),
            ("unknown type", r#"{"type":"stats","n":1}"#, Ok(Other(json!({"type":"stats","n":1})))),
            ("no type", r#"{"id":"x"}"#, Err(())),
            ("type not a string", r#"{"type":5}"#, Err(())),
            ("not JSON", "hello", Err(())),
            ("array", "[1]", Err(())),
        ];
        for (name, text, expected) in cases {
            check(name, text, expected);
        }
    }

    #[test]
    fn human_renderings() {
        let send = Outgoing::Send {
            id: "t-1".into(),
            to: "bob".into(),
            text: "x".into(),
        };
        let publish = Outgoing::Publish {
            id: "t-2".into(),
            room: "lobby".into(),
            text: "x".into(),
        };
        let t = "12:00:01";
        #[rustfmt::skip]
        let cases: Vec<(&str, String, &str)> = vec![
            ("direct", render_message(t, "alice", Some("bob"), None, &json!("hi")), "[12:00:01] alice -> bob: hi"),
            ("room", render_message(t, "alice", None, Some("lobby"), &json!("hi all")), "[12:00:01] alice -> #lobby: hi all"),
            ("json payload", render_message(t, "a", Some("b"), None, &json!({"n":1})), "[12:00:01] a -> b: {\"n\":1}"),
            ("escape sequence", render_message(t, "a\u{1b}[2J", Some("b"), None, &json!("x\ny")), "[12:00:01] a\\u{1b}[2J -> b: x\\ny"),
            ("delivered", render_ack(t, &send, "delivered", None), "[12:00:01] * delivered to bob"),
            ("queued", render_ack(t, &send, "queued", None), "[12:00:01] * queued for bob, who is offline"),
            ("partial", render_ack(t, &publish, "partial", Some("dropped for 1 of 3 members (over --max-outbound)")),
             "[12:00:01] * partly delivered to #lobby: dropped for 1 of 3 members (over --max-outbound)"),
            ("rejected", render_ack(t, &publish, "rejected", Some("forbidden")), "[12:00:01] * rejected (to #lobby): forbidden"),
            ("joined", render_presence(t, "lobby", "bob", "join"), "[12:00:01] * bob joined #lobby"),
            ("left", render_presence(t, "lobby", "bob", "leave"), "[12:00:01] * bob left #lobby"),
            ("raw text", render_raw(t, Some("hello"), b"hello"), "[12:00:01] hello"),
            ("raw binary", render_raw(t, None, &[1, 2, 255]), "[12:00:01] (binary, 3 bytes) 01 02 ff"),
        ];
        for (name, got, want) in cases {
            assert_eq!(got, want, "{name}");
        }
        let long = render_raw(t, None, &[0u8; 40]);
        assert!(long.ends_with("00 ..."), "{long}");
    }

    #[test]
    fn json_renderings() {
        let text: Value = serde_json::from_str(&raw_json(Some("hi"), b"hi", 5)).unwrap();
        assert_eq!(text, json!({"type":"text","payload":"hi","timestamp":5}));
        let binary: Value = serde_json::from_str(&raw_json(None, &[0, 255], 5)).unwrap();
        assert_eq!(
            binary,
            json!({"type":"binary","payload_base64":"AP8=","timestamp":5})
        );
        let pretty = "{\n  \"type\": \"message\",\r\n  \"payload\": \"a\\nb\"\n}";
        let line = json_line(pretty);
        assert!(!line.contains('\n'));
        let a: Value = serde_json::from_str(pretty).unwrap();
        let b: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(a, b);
    }
}
