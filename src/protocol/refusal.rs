//! Every HTTP refusal the server can give before a WebSocket frame is exchanged, as one type.
//!
//! Owns: `Refusal`, its one exhaustive mapping to an HTTP status (`status`), the reason in words
//! (`reason`), and the bytes of the answer (`response`), headers included: `Allow` on a 405,
//! `WWW-Authenticate` on a 401, `Upgrade` and `Sec-WebSocket-Version` on a 426.
//! Does not: decide when to refuse. The request parser and the upgrade rules
//! (`protocol::handshake`), the reactor (503 over `--max-connections`) and the app's router and
//! admission (404, 405, 400/401/403 about ids, rooms and tokens) each build the refusal that fits.
//!
//! Implements SPEC §3 ("every rejection says why in its body") and the status table of
//! docs/protocol.md, "HTTP statuses before the upgrade".
//!
//! Every refusal ends the connection (SPEC §3): the reactor sends it, shuts its write side and
//! waits for the client to hang up. A request head that never completes gets no refusal at all:
//! at `--handshake-timeout` the connection is closed without an answer (docs/protocol.md), so a
//! slowloris client holds its slot no longer than the deadline.

use super::handshake::{build_response, WEBSOCKET_VERSION};
use std::borrow::Cow;
use std::fmt;

/// Why a request was refused. Each variant maps to one HTTP status and a body saying why.
///
/// The variants without data come from the request itself (its syntax, its size, the upgrade
/// rules of RFC 6455 §4.2.1) or from the server's state; the variants with data carry the app's
/// reason, which only the app can word (which id, which room, which token check failed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Not an HTTP/1.x request head (bad request line, header syntax, line endings ...).
    Malformed,
    /// More than `handshake::MAX_REQUEST_BYTES` without a complete head (SPEC §3).
    TooLarge,
    /// More than `handshake::MAX_HEADERS` header fields.
    TooManyHeaders,
    /// A method other than GET: every resource of this server is read with GET, and an upgrade
    /// must be a GET (RFC 6455 §4.1).
    MethodNotAllowed,
    /// An HTTP/1.0 request asked to upgrade (RFC 6455 §4.1: at least HTTP/1.1).
    NotHttp11,
    /// No Host header (RFC 7230 §5.4, RFC 6455 §4.2.1 item 2).
    MissingHost,
    /// Host, Sec-WebSocket-Key or Sec-WebSocket-Version appeared more than once
    /// (RFC 7230 §5.4, RFC 6455 §11.3.1, §11.3.5).
    DuplicateHeader,
    /// A WebSocket endpoint was asked without `Upgrade: websocket` (RFC 6455 §4.2.1 item 3).
    NotWebSocket,
    /// No `upgrade` token in Connection (RFC 6455 §4.2.1 item 4).
    MissingConnectionUpgrade,
    /// The upgrade request declares a body, whose bytes would be mistaken for frames.
    UnexpectedBody,
    /// Sec-WebSocket-Version missing or not 13 (RFC 6455 §4.2.1 item 6, §4.2.2 item 4).
    BadVersion,
    /// Sec-WebSocket-Key missing or not base64 of 16 bytes (RFC 6455 §4.2.1 item 5).
    BadKey,
    /// The request's target names something invalid or leaves out what the endpoint needs: a
    /// room name, an id, a `?since=` (SPEC §6). The text says which.
    InvalidTarget(Cow<'static, str>),
    /// Authentication is configured and the token is missing, invalid or expired (SPEC §6).
    /// The label names the check that failed (`missing`, `expired`, ...).
    Unauthorized(&'static str),
    /// The request is well-formed and authenticated but not allowed: an Origin off the
    /// allow-list, or a room outside the token's claims (SPEC §6). The text says which.
    Forbidden(&'static str),
    /// No resource at this path.
    NotFound,
    /// The server is at `--max-connections` (SPEC §2).
    ServiceUnavailable,
    /// A request body framed other than by `Content-Length` (`http_exchange`: 411, not 501).
    LengthRequired,
    /// A declared body over the bound (`--api-max-body`), refused from the head alone.
    PayloadTooLarge { limit: usize },
    /// A request the server cannot act on, with the reason: a body that is not the JSON the
    /// endpoint expects, a bad query parameter, a bad `Content-Length` (SPEC §16).
    BadRequest(Cow<'static, str>),
    /// The server API's key is missing or wrong (SPEC §16). The label says which.
    BadApiKey(&'static str),
    /// The path exists but not with this method; `allow` lists the methods it takes.
    MethodNotAllowedFor { allow: &'static str },
    /// `--workers` above 1: the answer needs every worker's part and some did not give it in
    /// time (the server API's process-wide questions, `app/gather.rs`). The text names them.
    /// Answered with `Retry-After: 1`: a worker late by a second is busy or stuck, and the
    /// question can simply be asked again.
    WorkersUnanswered(Cow<'static, str>),
}

impl Refusal {
    /// The HTTP status this refusal is answered with.
    pub fn status(&self) -> u16 {
        match self {
            Refusal::Malformed
            | Refusal::NotHttp11
            | Refusal::MissingHost
            | Refusal::DuplicateHeader
            | Refusal::MissingConnectionUpgrade
            | Refusal::UnexpectedBody
            | Refusal::BadKey
            | Refusal::InvalidTarget(_)
            | Refusal::BadRequest(_) => 400,
            Refusal::Unauthorized(_) | Refusal::BadApiKey(_) => 401,
            Refusal::Forbidden(_) => 403,
            Refusal::NotFound => 404,
            Refusal::MethodNotAllowed | Refusal::MethodNotAllowedFor { .. } => 405,
            Refusal::LengthRequired => 411,
            Refusal::PayloadTooLarge { .. } => 413,
            // RFC 7231 §6.5.15: 426 says "switch protocol"; RFC 6455 §4.2.2 item 4 uses it for
            // a wrong version, and it is equally the answer to a plain GET on a WebSocket path.
            Refusal::NotWebSocket | Refusal::BadVersion => 426,
            Refusal::TooLarge | Refusal::TooManyHeaders => 431,
            Refusal::ServiceUnavailable => 503,
            // RFC 7231 §6.6.4: a worker is too busy (or stuck) to give its part now; the same
            // question asked again (`Retry-After: 1`) normally succeeds.
            Refusal::WorkersUnanswered(_) => 503,
        }
    }

    /// Why, in words: the response body (without its final newline) and the logs.
    pub fn reason(&self) -> Cow<'_, str> {
        Cow::Borrowed(match self {
            Refusal::Malformed => "malformed HTTP/1.1 request",
            Refusal::TooLarge => "request head larger than 8192 bytes",
            Refusal::TooManyHeaders => "more than 64 header fields",
            Refusal::MethodNotAllowed => "only GET is allowed",
            Refusal::NotHttp11 => "a WebSocket upgrade requires HTTP/1.1",
            Refusal::MissingHost => "Host header is required",
            Refusal::DuplicateHeader => {
                "Host, Sec-WebSocket-Key and Sec-WebSocket-Version may each appear only once"
            }
            Refusal::NotWebSocket => "this endpoint requires Upgrade: websocket",
            Refusal::MissingConnectionUpgrade => "Connection header must contain the upgrade token",
            Refusal::UnexpectedBody => "a WebSocket upgrade request must not have a body",
            Refusal::BadVersion => "Sec-WebSocket-Version must be 13",
            Refusal::BadKey => "Sec-WebSocket-Key must be the base64 encoding of 16 bytes",
            Refusal::InvalidTarget(why) => why,
            Refusal::Unauthorized(label) => {
                return Cow::Owned(format!("a valid token is required ({label})"))
            }
            Refusal::Forbidden(why) => why,
            Refusal::NotFound => "no such endpoint",
            Refusal::ServiceUnavailable => "server is at its connection limit",
            Refusal::LengthRequired => "send the body with Content-Length (no Transfer-Encoding)",
            Refusal::PayloadTooLarge { limit } => {
                return Cow::Owned(format!("request body larger than {limit} bytes"))
            }
            Refusal::BadRequest(why) => why,
            Refusal::BadApiKey(label) => {
                return Cow::Owned(format!(
                    "Authorization: Bearer <api key> is required ({label})"
                ))
            }
            Refusal::MethodNotAllowedFor { allow } => {
                return Cow::Owned(format!("this endpoint takes {allow}"))
            }
            Refusal::WorkersUnanswered(why) => why,
        })
    }

    /// The complete response: status line, headers, and `reason()` plus a newline as a
    /// `text/plain` body. Every one says `Connection: close`: the connection ends after it.
    pub fn response(&self) -> Vec<u8> {
        let status = self.status();
        let body = format!("{}\n", self.reason());
        let allow;
        let (connection, headers): (&str, &[(&str, &str)]) = match self {
            Refusal::MethodNotAllowedFor { allow: methods } => {
                allow = [("Allow", *methods)];
                ("close", &allow)
            }
            Refusal::BadApiKey(_) => ("close", &[("WWW-Authenticate", "Bearer")]),
            // RFC 7231 §6.5.5: a 405 must list the allowed methods.
            Refusal::MethodNotAllowed => ("close", &[("Allow", "GET")]),
            // RFC 7235 §3.1: a 401 must carry a challenge; tokens are bearer JWTs (RFC 6750 §3).
            Refusal::Unauthorized(_) => ("close", &[("WWW-Authenticate", "Bearer")]),
            // RFC 7231 §6.5.15 and RFC 7230 §6.7: a 426 must name the protocol in Upgrade, and a
            // sender of Upgrade must list "upgrade" in Connection; RFC 6455 §4.2.2 item 4 adds
            // the versions we understand.
            Refusal::NotWebSocket | Refusal::BadVersion => (
                "Upgrade, close",
                &[
                    ("Upgrade", "websocket"),
                    ("Sec-WebSocket-Version", WEBSOCKET_VERSION),
                ],
            ),
            // RFC 7231 §7.1.3: when to ask again.
            Refusal::WorkersUnanswered(_) => ("close", &[("Retry-After", "1")]),
            _ => ("close", &[]),
        };
        let content_type = "text/plain; charset=utf-8";
        build_response(status, connection, content_type, headers, body.as_bytes())
    }

    /// The refusal as the server API answers it (SPEC §16, docs/api.md): the same status and
    /// headers as `response`, a JSON body `{"status":<status>,"error":"<reason>"}`, and
    /// `Connection: keep-alive` when the connection stays open after it (the caller knows
    /// whether the request's bytes were all consumed).
    pub fn api_response(&self, keep_alive: bool) -> Vec<u8> {
        let body = serde_json::json!({"status": self.status(), "error": self.reason()});
        let allow;
        let headers: &[(&str, &str)] = match self {
            Refusal::MethodNotAllowed => &[("Allow", "GET")],
            Refusal::MethodNotAllowedFor { allow: methods } => {
                allow = [("Allow", *methods)];
                &allow
            }
            Refusal::Unauthorized(_) | Refusal::BadApiKey(_) => &[("WWW-Authenticate", "Bearer")],
            Refusal::WorkersUnanswered(_) => &[("Retry-After", "1")],
            _ => &[],
        };
        super::http_exchange::json_response(
            self.status(),
            body.to_string().as_bytes(),
            keep_alive,
            headers,
        )
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.reason(), self.status())
    }
}

impl std::error::Error for Refusal {}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    /// Every refusal, byte for byte: status line, headers in order, body.
    #[test]
    fn responses_are_exact() {
        fn check(refusal: Refusal, expected: &str) {
            let got = String::from_utf8(refusal.response()).unwrap();
            assert_eq!(got, expected, "{refusal:?}");
            // The status line carries the same number as `status()`.
            let line = format!("HTTP/1.1 {} ", refusal.status());
            assert!(got.starts_with(&line), "{refusal:?}");
        }
        /// A response with nothing but the common headers.
        fn plain(status: &str, body: &str) -> String {
            format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
        }
        use Refusal::*;
        let bad = "400 Bad Request";
        check(Malformed, &plain(bad, "malformed HTTP/1.1 request\n"));
        check(
            NotHttp11,
            &plain(bad, "a WebSocket upgrade requires HTTP/1.1\n"),
        );
        check(MissingHost, &plain(bad, "Host header is required\n"));
        check(
            DuplicateHeader,
            &plain(
                bad,
                "Host, Sec-WebSocket-Key and Sec-WebSocket-Version may each appear only once\n",
            ),
        );
        check(
            MissingConnectionUpgrade,
            &plain(bad, "Connection header must contain the upgrade token\n"),
        );
        check(
            UnexpectedBody,
            &plain(bad, "a WebSocket upgrade request must not have a body\n"),
        );
        check(
            BadKey,
            &plain(
                bad,
                "Sec-WebSocket-Key must be the base64 encoding of 16 bytes\n",
            ),
        );
        check(
            InvalidTarget(Cow::Borrowed("?id=<your id> is required")),
            &plain(bad, "?id=<your id> is required\n"),
        );
        check(
            InvalidTarget(Cow::Owned("missing field \"room\"".to_string())),
            &plain(bad, "missing field \"room\"\n"),
        );
        check(
            Unauthorized("expired"),
            "HTTP/1.1 401 Unauthorized\r\nContent-Type: text/plain; charset=utf-8\r\n\
             Content-Length: 36\r\nConnection: close\r\nWWW-Authenticate: Bearer\r\n\r\n\
             a valid token is required (expired)\n",
        );
        check(
            Forbidden("Origin not allowed (see --allow-origin)"),
            &plain("403 Forbidden", "Origin not allowed (see --allow-origin)\n"),
        );
        check(NotFound, &plain("404 Not Found", "no such endpoint\n"));
        check(
            MethodNotAllowed,
            "HTTP/1.1 405 Method Not Allowed\r\nContent-Type: text/plain; charset=utf-8\r\n\
             Content-Length: 20\r\nConnection: close\r\nAllow: GET\r\n\r\nonly GET is allowed\n",
        );
        for (refusal, body) in [
            (NotWebSocket, "this endpoint requires Upgrade: websocket\n"),
            (BadVersion, "Sec-WebSocket-Version must be 13\n"),
        ] {
            let expected = format!(
                "HTTP/1.1 426 Upgrade Required\r\nContent-Type: text/plain; charset=utf-8\r\n\
                 Content-Length: {}\r\nConnection: Upgrade, close\r\nUpgrade: websocket\r\n\
                 Sec-WebSocket-Version: 13\r\n\r\n{body}",
                body.len()
            );
            check(refusal, &expected);
        }
        let too_large = "431 Request Header Fields Too Large";
        check(
            TooLarge,
            &plain(too_large, "request head larger than 8192 bytes\n"),
        );
        check(
            TooManyHeaders,
            &plain(too_large, "more than 64 header fields\n"),
        );
        check(
            ServiceUnavailable,
            &plain(
                "503 Service Unavailable",
                "server is at its connection limit\n",
            ),
        );
    }

    /// The limits named in the reasons are the limits the parser applies.
    #[test]
    fn reasons_name_the_real_limits() {
        use super::super::handshake::{MAX_HEADERS, MAX_REQUEST_BYTES};
        let too_large = Refusal::TooLarge.reason();
        assert!(too_large.contains(&MAX_REQUEST_BYTES.to_string()));
        let too_many = Refusal::TooManyHeaders.reason();
        assert!(too_many.contains(&MAX_HEADERS.to_string()));
    }

    /// The API's refusals: statuses, the headers RFC 7231/7235 require, a JSON body.
    #[test]
    fn api_refusals_are_json_with_their_headers() {
        let text = |r: Refusal, keep: bool| String::from_utf8(r.api_response(keep)).unwrap();
        let got = text(Refusal::BadApiKey("wrong key"), true);
        assert!(got.starts_with("HTTP/1.1 401 Unauthorized\r\n"), "{got}");
        assert!(got.contains("\r\nWWW-Authenticate: Bearer\r\n"), "{got}");
        assert!(got.contains("\r\nConnection: keep-alive\r\n"), "{got}");
        assert!(got.ends_with(
            "{\"error\":\"Authorization: Bearer <api key> is required (wrong key)\",\"status\":401}"
        ), "{got}");
        let got = text(Refusal::MethodNotAllowedFor { allow: "POST" }, true);
        assert!(
            got.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
            "{got}"
        );
        assert!(got.contains("\r\nAllow: POST\r\n"), "{got}");
        let got = text(Refusal::PayloadTooLarge { limit: 10 }, false);
        assert!(
            got.starts_with("HTTP/1.1 413 Payload Too Large\r\n"),
            "{got}"
        );
        assert!(got.contains("\r\nConnection: close\r\n"), "{got}");
        assert!(got.contains("request body larger than 10 bytes"), "{got}");
        let got = text(Refusal::LengthRequired, false);
        assert!(got.starts_with("HTTP/1.1 411 Length Required\r\n"), "{got}");
        let got = text(Refusal::BadRequest("missing field `room`".into()), true);
        assert!(got.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{got}");
        assert!(got.contains("missing field `room`"), "{got}");
        let got = text(
            Refusal::WorkersUnanswered("worker 1 did not answer".into()),
            true,
        );
        assert!(
            got.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
            "{got}"
        );
        assert!(got.contains("\r\nRetry-After: 1\r\n"), "{got}");
        assert!(got.contains("\r\nConnection: keep-alive\r\n"), "{got}");
        assert!(got.contains("worker 1 did not answer"), "{got}");
        // The plain form carries the same challenge and Allow headers.
        let plain = String::from_utf8(Refusal::MethodNotAllowedFor { allow: "GET" }.response());
        assert!(plain.unwrap().contains("\r\nAllow: GET\r\n"));
    }

    #[test]
    fn display_names_reason_and_status() {
        assert_eq!(
            Refusal::Unauthorized("missing").to_string(),
            "a valid token is required (missing) (401)"
        );
        assert_eq!(Refusal::NotFound.to_string(), "no such endpoint (404)");
    }
}
