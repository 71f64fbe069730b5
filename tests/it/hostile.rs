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
use std::time::{SystemTime, UNIX_EPOCH};

/// One sample of /metrics; a series that is absent fails the test (it never reads as 0).
fn metric(server: &Server, sample: &str) -> f64 {
    let text = server.get("/metrics").body_text();
    text.lines()
        .find_map(|l| l.strip_prefix(sample).and_then(|v| v.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("/metrics has no sample {sample}"))
        .trim()
        .parse()
        .unwrap()
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
        metric(
            &server,
            "wsrelay_auth_failures_total{reason=\"unsupported_crit\"}"
        ),
        4.0
    );
}

poller_tests!(a_jwt_with_an_unknown_crit_header_is_refused_401);
