//! What hostile and unlucky clients found in the hub, each pinned from outside over real
//! sockets (SPEC §2 backpressure, §6 the relay): a large message must not lock its recipient
//! out, duplicate suppression has a memory bound and keeps its promise within it, a publish ack
//! says when a member dropped the message, and a JWT with an unknown `crit` header is refused.

use crate::poller_tests;
use crate::relay_support::*;
use crate::support::*;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::{json, Value};
use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};
use tungstenite::protocol::frame::coding::CloseCode;

// ----- a large message must not lock its recipient out --------------------------------------

/// `--max-outbound` below `--max-message`: a direct message bigger than what the limit leaves
/// after the welcome, queued while bob is offline, must reach bob; so must what queued behind
/// it, on the next connection at the latest. Under either slow-consumer policy.
fn a_large_queued_message_does_not_lock_its_recipient_out(poller: &str) {
    for policy in ["close", "drop"] {
        a_large_queued_message_reaches_its_recipient(poller, policy);
    }
}

fn a_large_queued_message_reaches_its_recipient(poller: &str, policy: &str) {
    let server = Server::start(
        poller,
        &[
            "--max-outbound",
            "16K",
            "--max-message",
            "256K",
            "--slow-consumer",
            policy,
        ],
    );
    let mut a = Client::as_id(&server, "alice");
    let big = "x".repeat(32 * 1024);
    assert_eq!(a.send_acked("bob", json!(big), "big")["status"], "queued");
    for i in 0..3 {
        assert_eq!(
            a.send_acked("bob", json!(i), &format!("small{i}"))["status"],
            "queued"
        );
    }
    // Each connection must deliver at least one message of the backlog; the backlog comes in
    // order, over as many connections as it takes (each ended by Close 1008 while some remain).
    let mut got = Vec::new();
    for attempt in 0..4 {
        let mut b = Client::as_id(&server, "bob");
        let before = got.len();
        loop {
            match b
                .ws
                .read()
                .expect("a message or a close within the deadline")
            {
                tungstenite::Message::Text(text) => {
                    let m: Value = serde_json::from_str(text.as_str()).unwrap();
                    assert_eq!(m["type"], "message", "{m}");
                    got.push(m["payload"].clone());
                    if got.len() == 4 {
                        break;
                    }
                }
                tungstenite::Message::Close(frame) => {
                    let code = frame.expect("a close code").code;
                    assert_eq!(code, CloseCode::Policy);
                    break;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(
            got.len() > before,
            "{policy}: connection {attempt} delivered nothing of the backlog (got {} of 4)",
            got.len()
        );
        if got.len() == 4 {
            break;
        }
    }
    assert_eq!(got, vec![json!(big), json!(0), json!(1), json!(2)]);
    // And the lock-out is over: live traffic flows to bob's next connection.
    let mut b = Client::as_id(&server, "bob");
    assert_eq!(
        a.send_acked("bob", json!("live"), "live")["status"],
        "delivered"
    );
    assert_eq!(b.expect("message")["payload"], "live");
}

/// The same through recovery: a `?since=` replay that starts with a message bigger than the
/// limit leaves after the welcome must deliver it, and a client that moves its `since` forward
/// gets the rest.
fn a_since_replay_of_a_large_message_makes_progress(poller: &str) {
    let server = Server::start(poller, &["--max-outbound", "16K", "--max-message", "256K"]);
    let mut a = Client::as_id(&server, "alice");
    let mut b = Client::as_id(&server, "bob");
    let big = "y".repeat(32 * 1024);
    // Live, both fit: bob's queue is empty when each arrives.
    assert_eq!(
        a.send_acked("bob", json!(big), "big")["status"],
        "delivered"
    );
    let first = b.expect("message");
    assert_eq!(
        a.send_acked("bob", json!("after"), "after")["status"],
        "delivered"
    );
    let second = b.expect("message");
    drop(b);
    // Bob lost both (say) and asks for everything after what he had before them.
    let mut since = msg_id(&first) - 1;
    let mut got = Vec::new();
    for attempt in 0..3 {
        let (mut b, _) = Client::connect(&server, &format!("/ws?id=bob&since={since}"));
        let before = got.len();
        loop {
            match b
                .ws
                .read()
                .expect("a message or a close within the deadline")
            {
                tungstenite::Message::Text(text) => {
                    let m: Value = serde_json::from_str(text.as_str()).unwrap();
                    assert_eq!(m["type"], "message", "{m}");
                    since = msg_id(&m);
                    got.push(m["payload"].clone());
                    if got.len() == 2 {
                        break;
                    }
                }
                tungstenite::Message::Close(frame) => {
                    assert_eq!(frame.expect("a close code").code, CloseCode::Policy);
                    break;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(
            got.len() > before,
            "replay {attempt} delivered nothing (since={since})"
        );
        if got.len() == 2 {
            break;
        }
    }
    assert_eq!(
        got,
        vec![first["payload"].clone(), second["payload"].clone()]
    );
}

// ----- duplicate suppression: a memory bound, and the promise within it ---------------------

/// A raw `/ws` connection for `id` that publishes one message with client id `cid` to an empty
/// room, reads the ack and hangs up: one round trip per sender (the upgrade and the frame are
/// written together; frames pipelined behind the handshake are kept, SPEC §3).
fn publish_once(server: &Server, id: &str, cid: &str) -> Value {
    let mut s = server.tcp();
    let envelope = json!({"type": "publish", "room": "void", "payload": 1, "id": cid});
    let mut bytes = format!(
        "GET /ws?id={id} HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .into_bytes();
    bytes.extend(client_frame(0x81, envelope.to_string().as_bytes()));
    s.write_all(&bytes).unwrap();
    let head = read_http_head(&mut s);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let (_, welcome) = read_server_frame(&mut s);
    assert!(welcome.starts_with(br#"{"type":"welcome""#));
    let (_, ack) = read_server_frame(&mut s);
    serde_json::from_slice(&ack).unwrap()
}

/// docs/protocol.md promises that a retry within `--offline-ttl` of the sender's last
/// connection is recognised. 4,100 other senders that each send once and leave do not come
/// near the memory bound, so they must not make the relay forget it.
fn a_retry_is_recognised_after_4100_other_senders_went_idle(poller: &str) {
    let server = Server::start(poller, &[]);
    let first = publish_once(&server, "alice", "c1");
    assert_eq!(first["status"], "delivered", "{first}");
    for i in 0..4100 {
        let ack = publish_once(&server, &format!("s{i}"), "c1");
        assert_eq!(ack["status"], "delivered", "{ack}");
    }
    // Every one of them has gone idle on the server before alice retries.
    server.wait_for_metric("wsrelay_ids_online", 0.0);
    let retry = publish_once(&server, "alice", "c1");
    assert_eq!(retry, first, "the retry is answered with the original ack");
    assert_eq!(server.metric("wsrelay_duplicates_total"), 1.0);
    assert_eq!(server.metric("wsrelay_dedup_evicted_total"), 0.0);
}

/// `--dedup-max-bytes` bounds what the windows hold, whoever sends: beyond it the oldest
/// remembered ids of all senders go first, counted, and a retry of a forgotten one is delivered
/// again (the promise in docs/protocol.md says so), while recent ones are still recognised.
fn dedup_memory_is_bounded_by_a_flag_and_evictions_are_counted(poller: &str) {
    let bound = 64 * 1024;
    let server = Server::start(poller, &["--dedup-max-bytes", "64K"]);
    let mut senders = Vec::new();
    let mut acks = Vec::new();
    for s in 0..20 {
        let mut c = Client::as_id(&server, &format!("sender{s}"));
        for n in 0..100 {
            c.send(json!({"type": "publish", "room": "void", "payload": n,
                          "id": format!("m{n}")}));
        }
        for _ in 0..100 {
            let ack = c.expect("ack");
            assert_eq!(ack["status"], "delivered");
            acks.push(ack);
        }
        senders.push(c);
    }
    let metrics = server.metrics();
    let bytes = metrics.get("wsrelay_dedup_bytes");
    assert!(bytes > 0.0 && bytes <= bound as f64, "{bytes} bytes held");
    let evicted = metrics.get("wsrelay_dedup_evicted_total");
    let records = metrics.get("wsrelay_dedup_records");
    assert_eq!(
        evicted + records,
        2000.0,
        "every id is held or counted as evicted"
    );
    // The oldest were forgotten: sender0's first id is new again. The newest are remembered.
    let first = &mut senders[0];
    first.send(json!({"type": "publish", "room": "void", "payload": 0, "id": "m0"}));
    let again = first.expect("ack");
    assert_eq!(again["status"], "delivered");
    assert!(
        msg_id(&again) > msg_id(&acks[1999]),
        "a new message: {again}"
    );
    let last = &mut senders[19];
    last.send(json!({"type": "publish", "room": "void", "payload": 99, "id": "m99"}));
    assert_eq!(
        last.expect("ack"),
        acks[1999],
        "recognised: the original ack"
    );
    assert_eq!(server.metric("wsrelay_duplicates_total"), 1.0);
}

// ----- a publish ack says what happened ------------------------------------------------------

/// With `--slow-consumer drop`, a member over `--max-outbound` drops a publish: the ack must not
/// say `delivered`. Partly delivered is `partial`; dropped by every member is `rejected`.
fn a_publish_ack_says_when_a_member_dropped_it(poller: &str) {
    // One worker, whatever TEST_WORKERS says: a member dropping a message on another worker
    // than the sender's is not reported to the sender's ack (docs/operations.md, "Workers").
    let server = Server::start(
        poller,
        &[
            "--max-outbound",
            "64K",
            "--slow-consumer",
            "drop",
            "--workers",
            "1",
        ],
    );
    let mut sender = Client::as_id(&server, "sender");
    let mut reader = Client::as_id(&server, "reader");
    reader.join("room", "reader");
    let mut slow = Client::as_id(&server, "slow");
    slow.join("room", "slow");
    // reader hears slow join; slow never reads again, so its buffers and then its queue fill.
    assert_eq!(reader.expect("presence")["id"], "slow");
    let payload = "z".repeat(32 * 1024);
    let mut partial = None;
    for n in 0..2000 {
        sender.send(
            json!({"type": "publish", "room": "room", "payload": payload,
                           "id": format!("p{n}")}),
        );
        let ack = sender.expect("ack");
        assert_eq!(
            reader.expect("message")["payload"],
            json!(payload),
            "the reader gets all"
        );
        if ack["status"] != "delivered" {
            partial = Some(ack);
            break;
        }
    }
    let ack = partial.expect("the slow member dropped a publish, yet every ack said delivered");
    assert_eq!(ack["status"], "partial", "{ack}");
    assert!(ack["msg_id"].is_string(), "it exists: {ack}");
    assert_eq!(
        ack["reason"],
        "dropped for 1 of 2 members (over --max-outbound)"
    );
    assert!(server.metric("wsrelay_slow_consumer_drops_total") >= 1.0);
    assert_eq!(server.metric("wsrelay_acks_total{status=\"partial\"}"), 1.0);
    // The reader leaves: now the slow member is the whole audience, and drops it too. The
    // kernel may still take some of the slow member's queue (its receive window grows), so
    // publish until its queue is full again: the first publish it drops must be `rejected`.
    reader.send(json!({"type": "leave", "room": "room"}));
    assert_eq!(reader.expect("presence")["event"], "leave");
    let mut ack = Value::Null;
    for n in 0..2000 {
        sender.send(
            json!({"type": "publish", "room": "room", "payload": payload, "id": format!("last{n}")}),
        );
        ack = sender.expect("ack");
        if ack["status"] != "delivered" {
            break;
        }
    }
    assert_eq!(ack["status"], "rejected", "{ack}");
    assert_eq!(ack["msg_id"], Value::Null);
    assert_eq!(ack["reason"], "every member is too far behind to take it");
}

// ----- JWT: RFC 7515 §4.1.11 ------------------------------------------------------------------

/// A correctly signed HS256 token with the given header fields added.
fn signed_with_header(extra: Value) -> String {
    let mut header = json!({"alg": "HS256", "typ": "JWT"});
    for (k, v) in extra.as_object().unwrap() {
        header[k] = v.clone();
    }
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let claims = json!({"sub": "alice", "exp": exp});
    let input = format!(
        "{}.{}",
        B64.encode(header.to_string()),
        B64.encode(claims.to_string())
    );
    let key = EncodingKey::from_secret(b"crit secret");
    let signature = jsonwebtoken::crypto::sign(input.as_bytes(), &key, Algorithm::HS256).unwrap();
    format!("{input}.{signature}")
}

/// "If any of the listed extension Header Parameters are not understood and supported by the
/// recipient, then the JWS is invalid" (RFC 7515 §4.1.11). wsrelay supports no extension.
fn a_jwt_with_an_unknown_crit_header_is_refused_401(poller: &str) {
    let server = Server::start(poller, &["--jwt-secret", "crit secret"]);
    let plain = signed_with_header(json!({}));
    assert_eq!(
        upgrade_status(&server, &format!("/ws?token={plain}"), "").0,
        101,
        "the same token without crit is valid"
    );
    for crit in [
        json!({"crit": ["x-wsrelay-ext"], "x-wsrelay-ext": true}),
        json!({"crit": ["exp"]}),
        json!({"crit": []}),
        json!({"crit": "x-wsrelay-ext"}),
    ] {
        let token = signed_with_header(crit.clone());
        let (status, body) = upgrade_status(&server, &format!("/ws?token={token}"), "");
        assert_eq!(status, 401, "{crit}: {body}");
        assert!(body.contains("unsupported_crit"), "{crit}: {body}");
    }
    assert_eq!(
        server.metric("wsrelay_auth_failures_total{reason=\"unsupported_crit\"}"),
        4.0
    );
}

poller_tests!(
    a_large_queued_message_does_not_lock_its_recipient_out,
    a_since_replay_of_a_large_message_makes_progress,
    a_retry_is_recognised_after_4100_other_senders_went_idle,
    dedup_memory_is_bounded_by_a_flag_and_evictions_are_counted,
    a_publish_ack_says_when_a_member_dropped_it,
    a_jwt_with_an_unknown_crit_header_is_refused_401,
);
