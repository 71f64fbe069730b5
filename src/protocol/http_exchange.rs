//! HTTP/1.1 request bodies and persistent connections, as pure code: a parsed request head in,
//! how long its body is and whether the connection stays open after the answer out; and the
//! bytes of a JSON answer.
//!
//! Owns: the body framing rules the server accepts (RFC 7230 §3.3.3: `Content-Length` only),
//! the body size bound (refused with 413 from the head alone, before any byte of the body is
//! read), the keep-alive decision (RFC 7230 §6.3), and `json_response`.
//! Does not: read sockets, buffer bytes or run deadlines (the reactor's `http.rs` does), or
//! decide which paths take bodies (the app's router does, with `Route::Api`).
//!
//! Choices where the RFCs leave room (docs/api.md, "Limits"):
//! * `Transfer-Encoding` (chunked or any other) is refused with 411 Length Required: a backend
//!   always knows the length of the JSON it sends, and one framing rule means one way to get it
//!   wrong. 411 rather than 501 because the fix is on the client's side and the status says
//!   which header to send (RFC 7231 §6.5.10).
//! * Several `Content-Length` values (repeated headers or a list) must all be equal, else 400
//!   (RFC 7230 §3.3.2); a value that is not decimal digits is 400.
//! * HTTP/1.0 requests are answered and then the connection closes (no `keep-alive` extension);
//!   HTTP/1.1 stays open unless the request says `Connection: close`.
//!
//! Invariant: after a request whose framing is refused, the connection must close: the bytes
//! behind the head can no longer be delimited (`Framing` is only returned when they can).

use super::handshake::{build_response, Request};
use super::refusal::Refusal;

/// How the bytes after a request head are delimited, and what happens after the answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Framing {
    /// Bytes of body right after the head (0 without `Content-Length`).
    pub body_len: usize,
    /// Whether the connection stays open for another request after this one is answered.
    pub keep_alive: bool,
}

/// The framing of `req`'s body under a bound of `max_body` bytes.
///
/// # Errors
/// * `LengthRequired` (411): the request has a `Transfer-Encoding`.
/// * `BadRequest` (400): `Content-Length` is not decimal digits, or its values differ.
/// * `PayloadTooLarge` (413): the declared length is over `max_body`.
pub fn framing(req: &Request, max_body: usize) -> Result<Framing, Refusal> {
    if req.header("transfer-encoding").is_some() {
        return Err(Refusal::LengthRequired);
    }
    let mut declared: Option<u64> = None;
    for element in req.headers("content-length").flat_map(|v| v.split(',')) {
        let element = element.trim_matches([' ', '\t']);
        let digits = !element.is_empty() && element.bytes().all(|b| b.is_ascii_digit());
        // More than 19 digits cannot fit a u64; a length that long is over any bound anyway.
        let value = match (digits, element.parse::<u64>()) {
            (true, Ok(value)) => value,
            (true, Err(_)) => u64::MAX,
            (false, _) => {
                return Err(Refusal::BadRequest(
                    "Content-Length must be decimal digits".into(),
                ))
            }
        };
        match declared {
            Some(previous) if previous != value => {
                return Err(Refusal::BadRequest("Content-Length values disagree".into()))
            }
            _ => declared = Some(value),
        }
    }
    let length = declared.unwrap_or(0);
    if length > max_body as u64 {
        return Err(Refusal::PayloadTooLarge { limit: max_body });
    }
    Ok(Framing {
        // Fits: it is at most `max_body`, a usize.
        body_len: usize::try_from(length).unwrap_or(max_body),
        keep_alive: keep_alive(req),
    })
}

/// RFC 7230 §6.3: an HTTP/1.1 connection persists unless `Connection: close` is sent; this
/// server closes every HTTP/1.0 connection after its answer.
pub fn keep_alive(req: &Request) -> bool {
    req.minor_version() >= 1 && !req.has_token("connection", "close")
}

/// A complete JSON answer: `Content-Type: application/json`, `Content-Length`, and
/// `Connection: keep-alive` or `close` as `keep_alive` says, then `extra_headers` (values with
/// control characters are left out, see `handshake::http_response`).
pub fn json_response(
    status: u16,
    body: &[u8],
    keep_alive: bool,
    extra_headers: &[(&str, &str)],
) -> Vec<u8> {
    let connection = if keep_alive { "keep-alive" } else { "close" };
    build_response(status, connection, "application/json", extra_headers, body)
}

/// `response` as the answer to a HEAD request: its status line and headers only. The
/// `Content-Length` stays (it tells what a GET would have got, RFC 7231 §4.3.2) while the body
/// goes: RFC 7230 §3.3 says a HEAD answer ends at its head, so body bytes sent anyway would be
/// read as the start of the next answer on a kept-alive connection.
pub fn without_body(mut response: Vec<u8>) -> Vec<u8> {
    if let Some(end) = response.windows(4).position(|w| w == b"\r\n\r\n") {
        response.truncate(end + 4);
    }
    response
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::protocol::handshake::parse_request;

    fn request(head: &str) -> Request {
        parse_request(head.as_bytes()).unwrap().unwrap().0
    }

    #[test]
    fn a_head_answer_keeps_its_length_and_loses_its_body() {
        let full = json_response(405, b"{\"status\":405}", true, &[]);
        let head = without_body(full.clone());
        assert!(head.ends_with(b"\r\n\r\n"));
        assert_eq!(head.len(), full.len() - b"{\"status\":405}".len());
        let text = String::from_utf8(head).unwrap();
        assert!(text.contains("Content-Length: 14\r\n"), "{text}");
    }

    fn framing_of(head: &str, max: usize) -> Result<Framing, Refusal> {
        framing(&request(head), max)
    }

    #[test]
    fn content_length_frames_the_body() {
        let head = "POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Length: 12\r\n\r\n";
        assert_eq!(
            framing_of(head, 64),
            Ok(Framing {
                body_len: 12,
                keep_alive: true
            })
        );
        let no_body = "GET /api/rooms HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(framing_of(no_body, 64).unwrap().body_len, 0);
        // Equal repeated values are one value (RFC 7230 §3.3.2).
        let repeated = "POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5, 5\r\n\r\n";
        assert_eq!(framing_of(repeated, 64).unwrap().body_len, 5);
    }

    #[test]
    fn the_bound_is_judged_from_the_head() {
        let at = "POST / HTTP/1.1\r\nContent-Length: 64\r\n\r\n";
        assert_eq!(framing_of(at, 64).unwrap().body_len, 64);
        let over = "POST / HTTP/1.1\r\nContent-Length: 65\r\n\r\n";
        assert_eq!(
            framing_of(over, 64),
            Err(Refusal::PayloadTooLarge { limit: 64 })
        );
        let huge = "POST / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n";
        assert_eq!(
            framing_of(huge, 64),
            Err(Refusal::PayloadTooLarge { limit: 64 })
        );
    }

    #[test]
    fn other_framings_are_refused() {
        let chunked = "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(framing_of(chunked, 64), Err(Refusal::LengthRequired));
        // Both headers: RFC 7230 §3.3.3 item 3 calls this a possible smuggling attempt.
        let both = "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n";
        assert_eq!(framing_of(both, 64), Err(Refusal::LengthRequired));
        for bad in ["-1", "1e3", "0x10", "", "3 4"] {
            let head = format!("POST / HTTP/1.1\r\nContent-Length: {bad}\r\n\r\n");
            let got = framing_of(&head, 64);
            assert!(
                matches!(got, Err(Refusal::BadRequest(_))),
                "{bad:?}: {got:?}"
            );
        }
        let disagree = "POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n";
        assert_eq!(
            framing_of(disagree, 64),
            Err(Refusal::BadRequest("Content-Length values disagree".into()))
        );
    }

    #[test]
    fn keep_alive_follows_version_and_connection() {
        let cases = [
            ("GET / HTTP/1.1\r\n\r\n", true),
            ("GET / HTTP/1.1\r\nConnection: close\r\n\r\n", false),
            (
                "GET / HTTP/1.1\r\nConnection: keep-alive, Close\r\n\r\n",
                false,
            ),
            ("GET / HTTP/1.1\r\nConnection: keep-alive\r\n\r\n", true),
            ("GET / HTTP/1.0\r\n\r\n", false),
            ("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", false),
        ];
        for (head, want) in cases {
            assert_eq!(keep_alive(&request(head)), want, "{head:?}");
        }
    }

    /// Two requests back to back in one buffer: the first head, its body, then the next head,
    /// exactly where the framing says.
    #[test]
    fn pipelined_requests_are_delimited_by_their_framing() {
        let first = "POST /api/publish HTTP/1.1\r\nContent-Length: 7\r\n\r\n{\"a\":1}";
        let second = "GET /api/rooms HTTP/1.1\r\n\r\n";
        let buf = format!("{first}{second}");
        let (req, head_len) = parse_request(buf.as_bytes()).unwrap().unwrap();
        let f = framing(&req, 64).unwrap();
        assert_eq!(&buf[head_len..head_len + f.body_len], "{\"a\":1}");
        let rest = &buf.as_bytes()[head_len + f.body_len..];
        let (next, next_len) = parse_request(rest).unwrap().unwrap();
        assert_eq!(next.path(), "/api/rooms");
        assert_eq!(next_len, rest.len());
    }

    #[test]
    fn json_answers_say_whether_the_connection_stays() {
        let open = String::from_utf8(json_response(200, b"{}", true, &[])).unwrap();
        assert_eq!(
            open,
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\
             Connection: keep-alive\r\n\r\n{}"
        );
        let closing = String::from_utf8(json_response(404, b"{}", false, &[])).unwrap();
        assert!(closing.contains("\r\nConnection: close\r\n"), "{closing}");
    }
}
