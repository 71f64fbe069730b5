//! Who may connect: HS256 JWT verification, where the token is found, and the Origin
//! allow-list (SPEC §6 "Identity"; docs/protocol.md "Access").
//!
//! Owns: `JwtVerifier` (signature, algorithm, `exp`/`nbf`, and the claims wsrelay reads: `sub`,
//! `rooms`, `publish`, `info`; SPEC §16), `Grant` (what a valid token allows), `AuthError`,
//! `token_of` (query or `Authorization: Bearer`) and `origin_allowed`.
//! Does not: answer requests (the hub turns an `AuthError` into 401, a bad Origin into 403), or
//! read a clock (it is handed the time).
//!
//! The signature check is the `jsonwebtoken` crate's. It is asked for HS256 and nothing else, so
//! a token whose header says `none`, RS256 or any other algorithm is refused before any key is
//! used: the classic "alg confusion" attacks (an unsigned token, or an HMAC keyed with a public
//! key) have nothing to work with. A header with `crit` is refused (RFC 7515 §4.1.11: wsrelay
//! understands no extension), which the crate does not check. Time claims are checked here rather than in the crate, against
//! the hub's injectable clock, so tests can put a token exactly at its expiry.

use super::envelope::{validate_id, validate_room};
use crate::protocol::handshake::Request;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

/// Seconds a token stays acceptable after its `exp` (and before its `nbf`): clock skew between
/// the issuer and the relay. RFC 7519 §4.1.4 allows "a small leeway, usually no more than a few
/// minutes"; half a minute keeps expired tokens short-lived. `--jwt-leeway` changes it.
pub const LEEWAY_SECS: u64 = 30;

/// The largest `info` claim, as compact JSON. Presence events carry it to every member of a
/// room, so it is multiplied by the fan-out: a kilobyte is room for a name, an avatar URL and
/// a few flags, not for a profile.
pub const MAX_INFO_BYTES: usize = 1024;

/// What a valid token grants (SPEC §16; docs/protocol.md, "Access").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    /// The `sub` claim: the connection's id.
    pub id: String,
    /// The `rooms` claim, if present: the only rooms this connection may join (envelope rooms,
    /// and raw rooms it may enter). Absent: any room.
    pub rooms: Option<Vec<String>>,
    /// The rooms this connection may publish to: the `publish` claim, or, when it is absent,
    /// the same as `rooms`. `None`: any room.
    pub publish: Option<Vec<String>>,
    /// The `info` claim as compact JSON text (an object of at most `MAX_INFO_BYTES`): shown to
    /// others in presence events and `members`.
    pub info: Option<String>,
    /// The `exp` claim, in milliseconds since the epoch (the token is accepted until
    /// `exp_ms` plus the leeway).
    pub exp_ms: u64,
}

impl Grant {
    /// May this grant join `room` (or enter the raw room)?
    pub fn allows(&self, room: &str) -> bool {
        listed(self.rooms.as_deref(), room)
    }

    /// May this grant publish to `room`?
    pub fn may_publish(&self, room: &str) -> bool {
        listed(self.publish.as_deref(), room)
    }
}

/// Is `room` in a claim's list? An absent claim (`None`) allows every room.
fn listed(claim: Option<&[String]>, room: &str) -> bool {
    claim.is_none_or(|rooms| rooms.iter().any(|r| r == room))
}

/// Why a token was refused; every variant is answered with 401 before the upgrade.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthError {
    /// No `?token=` and no `Authorization: Bearer`.
    Missing,
    /// Not a JWT, bad base64 or JSON, or claims of the wrong type.
    Malformed,
    /// The header names an algorithm other than HS256 (including `none`).
    WrongAlgorithm,
    /// The header has a `crit` parameter: it names extensions the token's issuer requires the
    /// recipient to understand, and wsrelay understands none (RFC 7515 §4.1.11).
    UnsupportedCritical,
    /// The HMAC does not match the configured secret.
    BadSignature,
    /// `exp` is absent, or `exp` (plus the leeway) has passed.
    Expired,
    /// `nbf` is still in the future (beyond the leeway).
    NotYetValid,
    /// `sub` is absent or not a usable id; or `rooms` or `publish` names an invalid room; or
    /// `info` is not a JSON object of at most `MAX_INFO_BYTES`.
    BadClaims,
}

impl AuthError {
    /// A short label, for /metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Malformed => "malformed",
            AuthError::WrongAlgorithm => "wrong_algorithm",
            AuthError::UnsupportedCritical => "unsupported_crit",
            AuthError::BadSignature => "bad_signature",
            AuthError::Expired => "expired",
            AuthError::NotYetValid => "not_yet_valid",
            AuthError::BadClaims => "bad_claims",
        }
    }
}

#[derive(Deserialize)]
struct Claims {
    sub: Option<String>,
    exp: Option<f64>,
    nbf: Option<f64>,
    rooms: Option<Vec<String>>,
    publish: Option<Vec<String>>,
    info: Option<serde_json::Value>,
}

pub struct JwtVerifier {
    key: DecodingKey,
    validation: Validation,
    /// Seconds of clock skew allowed on `exp` and `nbf` (`LEEWAY_SECS` unless configured).
    leeway_secs: u64,
}

impl JwtVerifier {
    /// A verifier for `secret` with the default leeway (`LEEWAY_SECS`).
    pub fn new(secret: &[u8]) -> JwtVerifier {
        JwtVerifier::with_leeway(secret, LEEWAY_SECS)
    }

    /// A verifier for `secret` allowing `leeway_secs` of clock skew (`--jwt-leeway`).
    pub fn with_leeway(secret: &[u8], leeway_secs: u64) -> JwtVerifier {
        let mut validation = Validation::new(Algorithm::HS256);
        // Time claims are ours to check (see the module doc); audience is not configured.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        validation.required_spec_claims.clear();
        JwtVerifier {
            key: DecodingKey::from_secret(secret),
            validation,
            leeway_secs,
        }
    }

    /// Seconds of clock skew allowed: a connection's token expires `leeway_secs` after `exp`.
    pub fn leeway_secs(&self) -> u64 {
        self.leeway_secs
    }

    /// Verifies `token` at wall-clock time `now_ms` (milliseconds since the epoch).
    ///
    /// # Errors
    /// Any `AuthError` but `Missing`.
    pub fn verify(&self, token: &str, now_ms: u64) -> Result<Grant, AuthError> {
        // The crate refuses other algorithms too, but cannot even parse a header saying
        // `none` (it has no such algorithm). Reading `alg` first names that refusal for what
        // it is, and keeps the rule visible here: HS256 only (RFC 8725 §3.1).
        let header = Header::of(token)?;
        if header.alg != "HS256" {
            return Err(AuthError::WrongAlgorithm);
        }
        // RFC 7515 §4.1.11: "If any of the listed extension Header Parameters are not
        // understood and supported by the recipient, then the JWS is invalid." wsrelay supports
        // no extension, so any `crit` (and a malformed one, which is invalid anyway) refuses the
        // token. The crate parses `crit` but does not enforce it.
        if header.crit {
            return Err(AuthError::UnsupportedCritical);
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(
            |e| match e.kind() {
                ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
                    AuthError::WrongAlgorithm
                }
                ErrorKind::InvalidSignature => AuthError::BadSignature,
                _ => AuthError::Malformed,
            },
        )?;
        let claims = data.claims;
        let now = now_ms as f64 / 1000.0;
        let leeway = self.leeway_secs as f64;
        // RFC 7519 §4.1.4: not accepted "on or after" exp. Tokens without exp never expire,
        // which SPEC §6 does not intend: require it.
        let exp = match claims.exp {
            Some(exp) if now < exp + leeway => exp,
            _ => return Err(AuthError::Expired),
        };
        // RFC 7519 §4.1.5: not accepted before nbf.
        if claims.nbf.is_some_and(|nbf| now + leeway < nbf) {
            return Err(AuthError::NotYetValid);
        }
        let id = claims.sub.ok_or(AuthError::BadClaims)?;
        validate_id(&id).map_err(|_| AuthError::BadClaims)?;
        for list in [&claims.rooms, &claims.publish].into_iter().flatten() {
            if list.iter().any(|r| validate_room(r).is_err()) {
                return Err(AuthError::BadClaims);
            }
        }
        let info = match claims.info {
            None => None,
            Some(value @ serde_json::Value::Object(_)) => {
                let text = value.to_string();
                if text.len() > MAX_INFO_BYTES {
                    return Err(AuthError::BadClaims);
                }
                Some(text)
            }
            Some(_) => return Err(AuthError::BadClaims),
        };
        // SPEC §16: without a `publish` claim, a token may publish where it may join.
        let publish = claims.publish.or_else(|| claims.rooms.clone());
        Ok(Grant {
            id,
            rooms: claims.rooms,
            publish,
            info,
            // `as` saturates: an absurd exp is "far in the future", never a panic.
            exp_ms: (exp * 1000.0) as u64,
        })
    }
}

/// What wsrelay checks in a token's header itself, before the crate verifies the signature.
struct Header {
    /// `alg` (RFC 7515 §4.1.1).
    alg: String,
    /// Whether a `crit` parameter (RFC 7515 §4.1.11) is present, whatever its value.
    crit: bool,
}

impl Header {
    /// Reads the header of `token` without trusting anything else in it.
    fn of(token: &str) -> Result<Header, AuthError> {
        let encoded = token.split('.').next().ok_or(AuthError::Malformed)?;
        let json = URL_SAFE_NO_PAD
            .decode(encoded)
            .map_err(|_| AuthError::Malformed)?;
        let fields: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&json).map_err(|_| AuthError::Malformed)?;
        let Some(serde_json::Value::String(alg)) = fields.get("alg") else {
            return Err(AuthError::Malformed);
        };
        Ok(Header {
            alg: alg.clone(),
            crit: fields.contains_key("crit"),
        })
    }
}

/// The bearer token of a request: `?token=` first (browsers cannot set headers on a WebSocket),
/// then `Authorization: Bearer <token>` (RFC 6750 §2.1; the scheme is case-insensitive).
pub fn token_of(request: &Request) -> Option<String> {
    if let Some(token) = request.query_param("token") {
        return Some(token);
    }
    let value = request.header("authorization")?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_string())
}

/// May a request with this `Origin` header upgrade? With no allow-list, yes. With one, a request
/// that names an Origin must name a listed one (compared ASCII case-insensitively, RFC 6454 §6.2
/// serialises scheme and host in lowercase). A request without Origin is not from a browser
/// (browsers always send it on a WebSocket, RFC 6455 §4.1 item 8), and the allow-list exists to
/// stop other sites' pages from using a browser's credentials: so it is let through.
pub fn origin_allowed(allow: &[String], origin: Option<&str>) -> bool {
    match origin {
        _ if allow.is_empty() => true,
        None => true,
        Some(origin) => allow.iter().any(|a| a.eq_ignore_ascii_case(origin)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    use jsonwebtoken::{encode, EncodingKey, Header};

    const SECRET: &[u8] = b"test secret";
    const NOW_MS: u64 = 1_700_000_000_000;
    const NOW: u64 = NOW_MS / 1000;

    fn hs256(claims: &serde_json::Value, secret: &[u8]) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            claims,
            &EncodingKey::from_secret(secret),
        )
        .unwrap()
    }

    /// A token with an arbitrary header and signature, built by hand.
    fn forged(header: &str, claims: &serde_json::Value, signature: &[u8]) -> String {
        format!(
            "{}.{}.{}",
            B64.encode(header),
            B64.encode(claims.to_string()),
            B64.encode(signature)
        )
    }

    /// A token with a header written by hand, correctly signed with `SECRET`.
    fn signed(header: &str, claims: &serde_json::Value) -> String {
        let input = format!("{}.{}", B64.encode(header), B64.encode(claims.to_string()));
        let key = EncodingKey::from_secret(SECRET);
        let signature =
            jsonwebtoken::crypto::sign(input.as_bytes(), &key, Algorithm::HS256).unwrap();
        format!("{input}.{signature}")
    }

    /// The expected outcome: the id and rooms granted, or the refusal.
    type Expected = Result<(&'static str, Option<Vec<&'static str>>), AuthError>;

    fn check(name: &str, token: &str, expected: Expected) {
        let got = JwtVerifier::new(SECRET).verify(token, NOW_MS);
        let got = got.map(|g| (g.id, g.rooms));
        let expected = expected.map(|(id, rooms)| {
            let rooms = rooms.map(|r| r.into_iter().map(String::from).collect());
            (id.to_string(), rooms)
        });
        assert_eq!(got, expected, "{name}");
    }

    #[test]
    fn jwt_table() {
        use serde_json::json;
        let good = json!({"sub": "alice", "exp": NOW + 3600});
        let cases: Vec<(&str, String, Expected)> = vec![
            ("valid", hs256(&good, SECRET), Ok(("alice", None))),
            (
                "rooms claim",
                hs256(
                    &json!({"sub": "bob", "exp": NOW + 1, "rooms": ["lobby", "x"]}),
                    SECRET,
                ),
                Ok(("bob", Some(vec!["lobby", "x"]))),
            ),
            (
                "expired",
                hs256(&json!({"sub": "alice", "exp": NOW - 3600}), SECRET),
                Err(AuthError::Expired),
            ),
            (
                "within the leeway",
                hs256(
                    &json!({"sub": "alice", "exp": NOW - LEEWAY_SECS + 1}),
                    SECRET,
                ),
                Ok(("alice", None)),
            ),
            (
                "just past the leeway",
                hs256(&json!({"sub": "alice", "exp": NOW - LEEWAY_SECS}), SECRET),
                Err(AuthError::Expired),
            ),
            (
                "no exp",
                hs256(&json!({"sub": "alice"}), SECRET),
                Err(AuthError::Expired),
            ),
            (
                "not yet valid",
                hs256(
                    &json!({"sub": "alice", "exp": NOW + 7200, "nbf": NOW + 3600}),
                    SECRET,
                ),
                Err(AuthError::NotYetValid),
            ),
            (
                "wrong signature",
                hs256(&good, b"another secret"),
                Err(AuthError::BadSignature),
            ),
            (
                "alg none",
                forged(r#"{"alg":"none","typ":"JWT"}"#, &good, b""),
                Err(AuthError::WrongAlgorithm),
            ),
            (
                "RS256",
                forged(
                    r#"{"alg":"RS256","typ":"JWT"}"#,
                    &good,
                    b"not really a signature",
                ),
                Err(AuthError::WrongAlgorithm),
            ),
            (
                "HS512 with the right secret",
                encode(
                    &Header::new(Algorithm::HS512),
                    &good,
                    &EncodingKey::from_secret(SECRET),
                )
                .unwrap(),
                Err(AuthError::WrongAlgorithm),
            ),
            (
                "crit naming an extension",
                signed(
                    r#"{"alg":"HS256","typ":"JWT","crit":["x-ext"],"x-ext":1}"#,
                    &good,
                ),
                Err(AuthError::UnsupportedCritical),
            ),
            (
                "crit naming a registered claim",
                signed(r#"{"alg":"HS256","crit":["exp"]}"#, &good),
                Err(AuthError::UnsupportedCritical),
            ),
            (
                "crit empty",
                signed(r#"{"alg":"HS256","crit":[]}"#, &good),
                Err(AuthError::UnsupportedCritical),
            ),
            (
                "crit not a list",
                signed(r#"{"alg":"HS256","crit":"x-ext"}"#, &good),
                Err(AuthError::UnsupportedCritical),
            ),
            (
                "crit null",
                signed(r#"{"alg":"HS256","crit":null}"#, &good),
                Err(AuthError::UnsupportedCritical),
            ),
            (
                "unknown non-critical header parameter",
                signed(r#"{"alg":"HS256","kid":"k1","x-ext":1}"#, &good),
                Ok(("alice", None)),
            ),
            (
                "alg not a string",
                forged(r#"{"alg":5}"#, &good, b"sig"),
                Err(AuthError::Malformed),
            ),
            ("not a jwt", "hello".into(), Err(AuthError::Malformed)),
            ("empty", String::new(), Err(AuthError::Malformed)),
            (
                "no sub",
                hs256(&json!({"exp": NOW + 60}), SECRET),
                Err(AuthError::BadClaims),
            ),
            (
                "sub too long",
                hs256(&json!({"sub": "x".repeat(129), "exp": NOW + 60}), SECRET),
                Err(AuthError::BadClaims),
            ),
            (
                "sub of the wrong type",
                hs256(&json!({"sub": 5, "exp": NOW + 60}), SECRET),
                Err(AuthError::Malformed),
            ),
            (
                "invalid room in the claim",
                hs256(
                    &json!({"sub": "a", "exp": NOW + 60, "rooms": ["a b"]}),
                    SECRET,
                ),
                Err(AuthError::BadClaims),
            ),
        ];
        for (name, token, expected) in cases {
            check(name, &token, expected);
        }
    }

    fn grant(claims: serde_json::Value) -> Result<Grant, AuthError> {
        JwtVerifier::new(SECRET).verify(&hs256(&claims, SECRET), NOW_MS)
    }

    #[test]
    fn grants_restrict_rooms_only_when_the_claim_is_present() {
        use serde_json::json;
        let open = grant(json!({"sub": "a", "exp": NOW + 60})).unwrap();
        let narrow = grant(json!({"sub": "a", "exp": NOW + 60, "rooms": ["lobby"]})).unwrap();
        assert!(open.allows("anything"));
        assert!(open.may_publish("anything"));
        assert!(narrow.allows("lobby"));
        assert!(!narrow.allows("Lobby"));
    }

    /// SPEC §16: `publish` is enforced apart from `rooms`, and defaults to it.
    #[test]
    fn the_publish_claim_defaults_to_rooms_and_is_separate_from_it() {
        use serde_json::json;
        let exp = NOW + 60;
        // (claims, room, may join, may publish)
        let cases = [
            (json!({"sub": "a", "exp": exp}), "x", true, true),
            (
                json!({"sub": "a", "exp": exp, "rooms": ["x"]}),
                "x",
                true,
                true,
            ),
            (
                json!({"sub": "a", "exp": exp, "rooms": ["x"]}),
                "y",
                false,
                false,
            ),
            (
                json!({"sub": "a", "exp": exp, "rooms": ["x"], "publish": []}),
                "x",
                true,
                false,
            ),
            (
                json!({"sub": "a", "exp": exp, "rooms": ["x"], "publish": ["y"]}),
                "y",
                false,
                true,
            ),
            (
                json!({"sub": "a", "exp": exp, "publish": ["y"]}),
                "x",
                true,
                false,
            ),
        ];
        for (claims, room, join, publish) in cases {
            let g = grant(claims.clone()).unwrap();
            assert_eq!(
                (g.allows(room), g.may_publish(room)),
                (join, publish),
                "{claims} {room}"
            );
        }
    }

    #[test]
    fn info_and_exp_claims() {
        use serde_json::json;
        let g = grant(json!({"sub": "a", "exp": NOW + 60, "info": {"name": "Ann", "n": [1, 2]}}));
        let g = g.unwrap();
        assert_eq!(g.info.as_deref(), Some(r#"{"n":[1,2],"name":"Ann"}"#));
        assert_eq!(g.exp_ms, (NOW + 60) * 1000);
        let fractional = grant(json!({"sub": "a", "exp": NOW as f64 + 1.5})).unwrap();
        assert_eq!(fractional.exp_ms, NOW * 1000 + 1500);
        assert_eq!(
            grant(json!({"sub": "a", "exp": NOW + 60})).unwrap().info,
            None
        );
        let big = "x".repeat(MAX_INFO_BYTES);
        // (claims, why it is refused)
        let refused = [
            (
                json!({"sub": "a", "exp": NOW + 60, "info": "Ann"}),
                "not an object",
            ),
            (
                json!({"sub": "a", "exp": NOW + 60, "info": [1]}),
                "an array",
            ),
            (
                json!({"sub": "a", "exp": NOW + 60, "info": {"n": big}}),
                "too large",
            ),
            (
                json!({"sub": "a", "exp": NOW + 60, "publish": ["a b"]}),
                "bad room",
            ),
        ];
        for (claims, why) in refused {
            assert_eq!(grant(claims).unwrap_err(), AuthError::BadClaims, "{why}");
        }
        let fits = "x".repeat(MAX_INFO_BYTES - r#"{"n":""}"#.len());
        assert!(grant(json!({"sub": "a", "exp": NOW + 60, "info": {"n": fits}})).is_ok());
    }

    #[test]
    fn the_leeway_is_configurable() {
        use serde_json::json;
        let token = hs256(&json!({"sub": "a", "exp": NOW - 1}), SECRET);
        assert!(JwtVerifier::new(SECRET).verify(&token, NOW_MS).is_ok());
        let strict = JwtVerifier::with_leeway(SECRET, 0);
        assert_eq!(strict.verify(&token, NOW_MS), Err(AuthError::Expired));
        let token = hs256(&json!({"sub": "a", "exp": NOW + 1}), SECRET);
        assert!(strict.verify(&token, NOW_MS).is_ok());
    }

    fn request(head: &str) -> Request {
        let raw = format!("{head}\r\n\r\n");
        crate::protocol::handshake::parse_request(raw.as_bytes())
            .unwrap()
            .unwrap()
            .0
    }

    #[test]
    fn token_sources() {
        let cases = [
            ("GET /ws?token=abc HTTP/1.1\r\nHost: x", Some("abc")),
            (
                "GET /ws HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer  xyz",
                Some("xyz"),
            ),
            (
                "GET /ws HTTP/1.1\r\nHost: x\r\nAuthorization: bearer xyz",
                Some("xyz"),
            ),
            (
                "GET /ws HTTP/1.1\r\nHost: x\r\nAuthorization: Basic xyz",
                None,
            ),
            (
                "GET /ws?token=q HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer h",
                Some("q"),
            ),
            ("GET /ws HTTP/1.1\r\nHost: x", None),
        ];
        for (head, expected) in cases {
            assert_eq!(token_of(&request(head)).as_deref(), expected, "{head}");
        }
    }

    #[test]
    fn origins() {
        let allow = vec!["https://chat.example".to_string()];
        let cases: [(&[String], Option<&str>, bool); 6] = [
            (&[], Some("https://evil.example"), true),
            (&allow, Some("https://chat.example"), true),
            (&allow, Some("HTTPS://Chat.Example"), true),
            (&allow, Some("https://evil.example"), false),
            (&allow, Some("null"), false),
            (&allow, None, true),
        ];
        for (list, origin, expected) in cases {
            assert_eq!(
                origin_allowed(list, origin),
                expected,
                "{list:?} {origin:?}"
            );
        }
    }
}
