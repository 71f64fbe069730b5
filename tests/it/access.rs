//! Identity and access (SPEC §6; docs/protocol.md "Access"): HS256 JWTs, the Origin allow-list and the
//! per-connection rate limit.

use crate::poller_tests;
use crate::relay_support::*;
use crate::support::*;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use std::time::{SystemTime, UNIX_EPOCH};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::Message;

const SECRET: &str = "integration secret";

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn hs256(claims: &Value, secret: &str) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

/// A token with any header and signature, assembled by hand.
fn forged(alg: &str, claims: &Value) -> String {
    let header = json!({"alg": alg, "typ": "JWT"}).to_string();
    format!(
        "{}.{}.{}",
        B64.encode(header),
        B64.encode(claims.to_string()),
        B64.encode(if alg == "none" {
            &b""[..]
        } else {
            b"fake signature"
        })
    )
}

fn jwt_table(poller: &str) {
    let server = Server::start(poller, &["--jwt-secret", SECRET]);
    let good = json!({"sub": "alice", "exp": now() + 3600});
    let valid = hs256(&good, SECRET);
    // (name, target, extra headers, expected status, body fragment)
    let cases: Vec<(&str, String, String, u16, &str)> = vec![
        (
            "valid in the query",
            format!("/ws?token={valid}"),
            String::new(),
            101,
            "",
        ),
        (
            "valid as a bearer header",
            "/ws".into(),
            format!("Authorization: Bearer {valid}\r\n"),
            101,
            "",
        ),
        (
            "expired",
            format!(
                "/ws?token={}",
                hs256(&json!({"sub": "alice", "exp": now() - 3600}), SECRET)
            ),
            String::new(),
            401,
            "expired",
        ),
        (
            "wrong signature",
            format!("/ws?token={}", hs256(&good, "another secret")),
            String::new(),
            401,
            "bad_signature",
        ),
        (
            "alg none",
            format!("/ws?token={}", forged("none", &good)),
            String::new(),
            401,
            "wrong_algorithm",
        ),
        (
            "RS256",
            format!("/ws?token={}", forged("RS256", &good)),
            String::new(),
            401,
            "wrong_algorithm",
        ),
        (
            "missing",
            "/ws?id=alice".into(),
            String::new(),
            401,
            "missing",
        ),
        (
            "missing on a raw room",
            "/r/lobby".into(),
            String::new(),
            401,
            "missing",
        ),
    ];
    for (name, target, headers, status, fragment) in cases {
        let (got, body) = upgrade_status(&server, &target, &headers);
        assert_eq!(got, status, "{name}: {body}");
        assert!(body.contains(fragment), "{name}: {body}");
    }
    // The token's subject is the id, whatever ?id= says.
    let (_, welcome) = Client::connect(&server, &format!("/ws?token={valid}&id=mallory"));
    assert_eq!(welcome["id"], "alice");
    assert_eq!(
        server.metric("wsrelay_auth_failures_total{reason=\"wrong_algorithm\"}"),
        2.0
    );
}

fn the_rooms_claim_restricts_joins_and_publishes(poller: &str) {
    let server = Server::start(poller, &["--jwt-secret", SECRET]);
    let token = hs256(
        &json!({"sub": "bob", "exp": now() + 3600, "rooms": ["lobby"]}),
        SECRET,
    );
    let (mut b, _) = Client::connect(&server, &format!("/ws?token={token}"));
    b.join("lobby", "bob");
    b.send(json!({"type": "join", "room": "staff"}));
    assert_eq!(b.expect("error")["code"], "forbidden");
    b.send(json!({"type": "publish", "room": "staff", "payload": 1, "id": "p1"}));
    let ack = b.expect("ack");
    assert_eq!(ack["status"], "rejected");
    b.send(json!({"type": "publish", "room": "lobby", "payload": 1, "id": "p2"}));
    assert_eq!(b.expect("ack")["status"], "delivered");
    assert_eq!(
        upgrade_status(&server, &format!("/r/lobby?token={token}"), "").0,
        101
    );
    assert_eq!(
        upgrade_status(&server, &format!("/r/staff?token={token}"), "").0,
        403
    );
}

fn jwt_secret_file_works(poller: &str) {
    let dir = std::env::temp_dir().join(format!("wsrelay-jwt-{}-{poller}", std::process::id()));
    std::fs::write(&dir, format!("{SECRET}\n")).unwrap();
    let path = dir.to_str().unwrap().to_string();
    let server = Server::start(poller, &["--jwt-secret-file", &path]);
    let token = hs256(&json!({"sub": "carol", "exp": now() + 60}), SECRET);
    assert_eq!(
        upgrade_status(&server, &format!("/ws?token={token}"), "").0,
        101
    );
    let _ = std::fs::remove_file(&dir);
}

fn origin_allow_list(poller: &str) {
    let server = Server::start(
        poller,
        &[
            "--allow-origin",
            "https://chat.example",
            "--allow-origin",
            "http://localhost:3000",
        ],
    );
    let cases = [
        ("Origin: https://chat.example\r\n", 101),
        ("Origin: http://localhost:3000\r\n", 101),
        ("Origin: https://evil.example\r\n", 403),
        ("Origin: null\r\n", 403),
        ("", 101),
    ];
    for (headers, status) in cases {
        for target in ["/ws?id=a", "/r/lobby", "/echo"] {
            let (got, body) = upgrade_status(&server, target, headers);
            assert_eq!(got, status, "{target} {headers:?}: {body}");
        }
    }
    assert_eq!(server.metric("wsrelay_origin_rejections_total"), 6.0);
}

/// The access refusals reach the client byte for byte: a 401 carries its `WWW-Authenticate`
/// challenge (RFC 7235 §3.1) and names the failed check, a 403 says what was not allowed
/// (docs/protocol.md, "HTTP statuses before the upgrade").
fn access_refusals_are_exact_on_the_wire(poller: &str) {
    let server = Server::start(
        poller,
        &[
            "--jwt-secret",
            SECRET,
            "--allow-origin",
            "https://chat.example",
        ],
    );
    let upgrade = |target: &str, headers: &str| {
        format!(
            "GET {target} HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             {headers}\r\n"
        )
    };
    let unauthorized = |label: &str| {
        let body = format!("a valid token is required ({label})\n");
        format!(
            "HTTP/1.1 401 Unauthorized\r\nContent-Type: text/plain; charset=utf-8\r\n\
             Content-Length: {}\r\nConnection: close\r\nWWW-Authenticate: Bearer\r\n\r\n{body}",
            body.len()
        )
    };
    let forbidden = |body: &str| {
        format!(
            "HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain; charset=utf-8\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    };
    let expired = hs256(&json!({"sub": "alice", "exp": now() - 3600}), SECRET);
    let lobby_only = hs256(
        &json!({"sub": "alice", "exp": now() + 3600, "rooms": ["lobby"]}),
        SECRET,
    );
    let cases: Vec<(&str, String, String)> = vec![
        ("no token", upgrade("/ws", ""), unauthorized("missing")),
        (
            "expired token",
            upgrade(&format!("/ws?token={expired}"), ""),
            unauthorized("expired"),
        ),
        (
            "plain GET with an expired token (the demo page's check)",
            format!("GET /ws?token={expired} HTTP/1.1\r\nHost: test\r\n\r\n"),
            unauthorized("expired"),
        ),
        (
            "Origin off the list",
            upgrade("/echo", "Origin: https://evil.example\r\n"),
            forbidden("Origin not allowed (see --allow-origin)\n"),
        ),
        (
            "raw room outside the token's claim",
            upgrade(&format!("/r/staff?token={lobby_only}"), ""),
            forbidden("this room is not allowed by your token\n"),
        ),
    ];
    for (name, request, expected) in &cases {
        let r = server.http(request);
        let got = format!("{}\r\n\r\n{}", r.head, r.body_text());
        assert_eq!(got, *expected, "{name}");
    }
    let counted = |status: &str| {
        let sample = format!("wsrelay_http_responses_total{{status=\"{status}\"}}");
        server.metric(&sample)
    };
    assert_eq!(counted("401"), 3.0);
    assert_eq!(counted("403"), 2.0);
}

fn rate_limit_closes_with_1008(poller: &str) {
    let server = Server::start(poller, &["--rate", "1", "--burst", "3"]);
    let mut ws = server.ws("/r/chatty");
    // A burst of three is fine; ten in a row is not (it would take seven seconds to earn).
    for i in 0..10 {
        if ws.send(Message::text(format!("{i}"))).is_err() {
            break;
        }
    }
    assert_eq!(close_code(&mut ws), CloseCode::Policy);
    assert_eq!(server.metric("wsrelay_rate_limited_total"), 1.0);
}

/// The demo page's check before it opens a WebSocket (a browser cannot see why an upgrade was
/// refused): a plain GET on `/ws` is told about its id or token first, and only a good one gets
/// the 426 that every plain GET on a WebSocket path gets.
fn plain_get_on_ws_checks_identity_before_426(poller: &str) {
    let valid = hs256(&json!({"sub": "alice", "exp": now() + 3600}), SECRET);
    let bad = hs256(&json!({"sub": "alice", "exp": now() + 3600}), "other");
    let with_auth = Server::start(poller, &["--jwt-secret", SECRET]);
    let without = Server::start(poller, &[]);
    // (name, server, target, expected status, body fragment)
    let cases: Vec<(&str, &Server, String, u16, &str)> = vec![
        (
            "good token",
            &with_auth,
            format!("/ws?token={valid}"),
            426,
            "",
        ),
        (
            "bad token",
            &with_auth,
            format!("/ws?token={bad}"),
            401,
            "bad_signature",
        ),
        (
            "no token",
            &with_auth,
            "/ws?id=alice".into(),
            401,
            "missing",
        ),
        ("good id", &without, "/ws?id=alice".into(), 426, ""),
        ("empty id", &without, "/ws?id=".into(), 400, "ids"),
        ("no id", &without, "/ws".into(), 400, "?id="),
    ];
    for (name, server, target, status, fragment) in cases {
        let r = server.get(&target);
        assert_eq!(r.status, status, "{name}");
        assert!(
            r.body_text().contains(fragment),
            "{name}: {}",
            r.body_text()
        );
    }
}

poller_tests!(
    access_refusals_are_exact_on_the_wire,
    plain_get_on_ws_checks_identity_before_426,
    jwt_table,
    the_rooms_claim_restricts_joins_and_publishes,
    jwt_secret_file_works,
    origin_allow_list,
    rate_limit_closes_with_1008,
);
