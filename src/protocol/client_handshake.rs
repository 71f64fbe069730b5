//! The client side of the HTTP/1.1 opening handshake, as pure code: a `ws://` URL and a nonce
//! in, request bytes out; response bytes in, an accept-or-fail decision out.
//!
//! Owns: parsing `ws://` and `wss://` URLs into scheme, host, port and resource name (`WsUrl`),
//! the bytes of the
//! upgrade request, and the client's checks of the server's answer (`parse_response`), with
//! `ClientHandshakeError` naming each way the answer can be wrong.
//! Does not: read sockets, resolve names, draw random numbers (the caller passes the 16-byte
//! nonce, so this stays a pure function), negotiate subprotocols, or speak TLS (for `wss://`,
//! `tls::TlsSession` carries these bytes). The one extension it can offer, permessage-deflate,
//! is negotiated by `deflate::negotiate`; this module only checks the server's answer with it.
//!
//! SPEC §7 and §11 (the client and the load generator); RFC 6455 §3 (ws URIs), §4.1 (the
//! client's requirements), §4.2.2 (the accept value, computed by `handshake::accept_key`).

use super::deflate::{accept_response, DeflateOffer, DeflateParams, ExtensionError};
use super::handshake::{accept_key, MAX_HEADERS, MAX_REQUEST_BYTES};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use std::fmt;

/// The largest response head we wait for. A server's 101 is a few hundred bytes; the same
/// 8 KiB bound the server puts on requests keeps a broken peer from growing our buffer.
pub const MAX_RESPONSE_BYTES: usize = MAX_REQUEST_BYTES;

/// RFC 6455 §3: the port a `ws://` URI means when it names none.
const DEFAULT_PORT: u16 = 80;

/// RFC 6455 §3: the port a `wss://` URI means when it names none.
const DEFAULT_SECURE_PORT: u16 = 443;

/// A parsed `ws[s]://host[:port][/path][?query]` URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WsUrl {
    /// `wss://`: the connection runs over TLS (RFC 6455 §3, "secure" flag).
    pub secure: bool,
    /// The host as written, without the brackets of an IPv6 literal (`::1`, not `[::1]`), so it
    /// can be handed to the resolver with `port`.
    pub host: String,
    pub port: u16,
    /// RFC 6455 §3 "resource name": the path (at least `/`) and, if present, `?` and the query.
    /// It is what goes on the request line.
    pub resource: String,
}

impl WsUrl {
    /// Parses a `ws://` or `wss://` URL.
    ///
    /// # Errors
    /// `NotWebSocket` for any other scheme; `Fragment` for a `#`
    /// anywhere (RFC 6455 §3: "Fragment identifiers are meaningless in the context of WebSocket
    /// URIs and MUST NOT be used"); `UserInfo` for `user@host`; `NoHost` for an empty host;
    /// `BadPort` for a port that is not a number from 1 to 65535.
    pub fn parse(url: &str) -> Result<WsUrl, UrlError> {
        // RFC 3986 §3.1: schemes are case-insensitive.
        let (secure, rest) = match url.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("ws") => (false, rest),
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("wss") => (true, rest),
            _ => return Err(UrlError::NotWebSocket),
        };
        if rest.contains('#') {
            return Err(UrlError::Fragment);
        }
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(authority_end);
        if authority.contains('@') {
            return Err(UrlError::UserInfo);
        }
        let default_port = if secure {
            DEFAULT_SECURE_PORT
        } else {
            DEFAULT_PORT
        };
        let (host, port) = split_host_port(authority, default_port)?;
        if host.is_empty() {
            return Err(UrlError::NoHost);
        }
        let resource = if tail.starts_with('/') {
            tail.to_string()
        } else {
            // Only a query (or nothing) follows the authority: the path is "/".
            format!("/{tail}")
        };
        Ok(WsUrl {
            secure,
            host: host.to_string(),
            port,
            resource,
        })
    }

    /// The value of the `Host` header (RFC 7230 §5.4): the host, bracketed if it is an IPv6
    /// literal, and the port unless it is the scheme's default one.
    pub fn host_header(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        let default_port = if self.secure {
            DEFAULT_SECURE_PORT
        } else {
            DEFAULT_PORT
        };
        if self.port == default_port {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }
}

/// Splits `host[:port]` or `[v6]:port`; the port defaults to `default_port`.
fn split_host_port(authority: &str, default_port: u16) -> Result<(&str, u16), UrlError> {
    let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
        let (host, after) = bracketed.split_once(']').ok_or(UrlError::NoHost)?;
        match after {
            "" => (host, None),
            _ => match after.strip_prefix(':') {
                Some(port) => (host, Some(port)),
                None => return Err(UrlError::BadPort),
            },
        }
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    let port = match port {
        None => default_port,
        Some(text) => match text.parse::<u16>() {
            Ok(p) if p != 0 && text.bytes().all(|b| b.is_ascii_digit()) => p,
            _ => return Err(UrlError::BadPort),
        },
    };
    Ok((host, port))
}

/// Why a URL was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UrlError {
    NotWebSocket,
    Fragment,
    UserInfo,
    NoHost,
    BadPort,
}

impl fmt::Display for UrlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            UrlError::NotWebSocket => "not a ws:// or wss:// URL",
            UrlError::Fragment => "a WebSocket URL may not have a #fragment (RFC 6455 §3)",
            UrlError::UserInfo => "user@host is not supported in a WebSocket URL",
            UrlError::NoHost => "the URL names no host",
            UrlError::BadPort => "the port is not a number from 1 to 65535",
        })
    }
}

impl std::error::Error for UrlError {}

/// The `Sec-WebSocket-Key` for a 16-byte nonce: its base64 encoding (RFC 6455 §4.1: "a
/// randomly selected 16-byte value that has been base64-encoded"). The caller draws the nonce
/// afresh for every connection.
pub fn key_from_nonce(nonce: [u8; 16]) -> String {
    BASE64.encode(nonce)
}

/// The bytes of an upgrade request for `resource` on `host` (the `Host` header value, see
/// `WsUrl::host_header`), offering no extension and no subprotocol (RFC 6455 §4.1).
pub fn upgrade_request(host: &str, resource: &str, key: &str) -> Vec<u8> {
    upgrade_request_with_headers(host, resource, key, &[])
}

/// `upgrade_request` plus `extra` header fields, written in order after the required ones
/// (RFC 6455 §4.1 item 12: "The request MAY include any other header fields"). The client uses
/// it for `Authorization: Bearer <token>` (SPEC §6).
///
/// # Panics
/// In debug builds, if a name or value holds CR or LF: a caller bug (it would end the head
/// early and let the rest be read as another header), never peer input. Callers check first.
pub fn upgrade_request_with_headers(
    host: &str,
    resource: &str,
    key: &str,
    extra: &[(&str, &str)],
) -> Vec<u8> {
    let mut request = format!(
        "GET {resource} HTTP/1.1\r\n\
         Host: {host}\r\n\
         Upgrade: websocket\r\n\
         Connection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\n\
         Sec-WebSocket-Version: 13\r\n"
    );
    for (name, value) in extra {
        debug_assert!(
            !name.contains(['\r', '\n']) && !value.contains(['\r', '\n']),
            "header fields may not contain CR or LF"
        );
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request.into_bytes()
}

/// Checks the server's answer to a request sent with `key` that offered no extension.
///
/// Returns `Ok(None)` while the response head is incomplete (call again with more bytes), and
/// `Ok(Some(rest))` once a complete, valid 101 is found, where `rest` is what followed the head:
/// frames the server sent right behind it, which belong to the WebSocket stream.
///
/// # Errors
/// As `parse_response_with_offer` with no offer.
pub fn parse_response<'a>(
    buf: &'a [u8],
    key: &str,
) -> Result<Option<&'a [u8]>, ClientHandshakeError> {
    parse_response_with_offer(buf, key, None).map(|accepted| accepted.map(|a| a.rest))
}

/// What a complete, valid 101 gives the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Accepted<'a> {
    /// The bytes after the head: frames the server sent right behind it.
    pub rest: &'a [u8],
    /// The permessage-deflate agreement, when we offered it and the server accepted.
    pub deflate: Option<DeflateParams>,
}

/// Checks the server's answer to a request sent with `key` and, if `offer` is given, a
/// `Sec-WebSocket-Extensions` header with `offer.header_value()`.
///
/// Returns `Ok(None)` while the response head is incomplete (call again with more bytes), and
/// `Ok(Some(accepted))` once a complete, valid 101 is found.
///
/// # Errors
/// In the order of the checks of RFC 6455 §4.1 ("the client MUST _Fail the WebSocket
/// Connection_" if any fails): `TooLarge` beyond `MAX_RESPONSE_BYTES` without a complete head,
/// `Malformed` for bytes that are not an HTTP/1.x response, `NotHttp11`, `Status(code)` for
/// anything but 101, `NoUpgrade`, `NoConnectionUpgrade`, `WrongAccept`, then
/// `UnrequestedExtension` (an extension when we offered none) or `BadExtension` (an answer to
/// our offer that RFC 7692 does not allow, see `deflate::accept_response`), and
/// `UnrequestedProtocol`.
pub fn parse_response_with_offer<'a>(
    buf: &'a [u8],
    key: &str,
    offer: Option<&DeflateOffer>,
) -> Result<Option<Accepted<'a>>, ClientHandshakeError> {
    let window = buf.get(..MAX_RESPONSE_BYTES).unwrap_or(buf);
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let head_len = match response.parse(window) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_RESPONSE_BYTES => {
            return Err(ClientHandshakeError::TooLarge)
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(ClientHandshakeError::TooLarge),
        Err(_) => return Err(ClientHandshakeError::Malformed),
    };
    if response.version != Some(1) {
        return Err(ClientHandshakeError::NotHttp11);
    }
    let code = response.code.unwrap_or(0);
    // §4.1 item 1: "If the status code received from the server is not 101, the client handles
    // the response per HTTP procedures"; for us that ends the attempt.
    if code != 101 {
        return Err(ClientHandshakeError::Status(code));
    }
    let header = |name: &str| {
        response
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value))
    };
    // §4.1 item 2: an |Upgrade| header whose value is a case-insensitive match for "websocket".
    match header("upgrade") {
        Some(v) if v.trim().eq_ignore_ascii_case("websocket") => {}
        _ => return Err(ClientHandshakeError::NoUpgrade),
    }
    // §4.1 item 3: a |Connection| header with a token that is a case-insensitive match for
    // "Upgrade" (a comma-separated list, possibly over several header lines, RFC 7230 §7).
    let connection_upgrade = response
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("connection"))
        .flat_map(|h| h.value.split(|&b| b == b','))
        .any(|token| token.trim_ascii().eq_ignore_ascii_case(b"upgrade"));
    if !connection_upgrade {
        return Err(ClientHandshakeError::NoConnectionUpgrade);
    }
    // §4.1 item 4: |Sec-WebSocket-Accept| must be base64(SHA-1(key + GUID)), compared exactly
    // (base64 is case-sensitive) after trimming whitespace.
    match header("sec-websocket-accept") {
        Some(v) if v.trim() == accept_key(key) => {}
        _ => return Err(ClientHandshakeError::WrongAccept),
    }
    // §4.1 item 5: only an extension we offered may be in use.
    let extensions: Vec<String> = response
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("sec-websocket-extensions"))
        .map(|h| String::from_utf8_lossy(h.value).into_owned())
        .collect();
    let deflate = match offer {
        None if extensions.iter().any(|v| !v.trim().is_empty()) => {
            return Err(ClientHandshakeError::UnrequestedExtension)
        }
        None => None,
        Some(offer) => accept_response(extensions.iter().map(String::as_str), offer)
            .map_err(ClientHandshakeError::BadExtension)?,
    };
    // §4.1 item 6: we offered no subprotocol, so the server may not pick one.
    if header("sec-websocket-protocol").is_some_and(|v| !v.trim().is_empty()) {
        return Err(ClientHandshakeError::UnrequestedProtocol);
    }
    Ok(Some(Accepted {
        rest: buf.get(head_len..).unwrap_or_default(),
        deflate,
    }))
}

/// Why the server's answer did not open a WebSocket connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientHandshakeError {
    /// The bytes are not an HTTP/1.x response head.
    Malformed,
    /// No complete head within `MAX_RESPONSE_BYTES` (or more than `MAX_HEADERS` fields).
    TooLarge,
    /// An HTTP/1.0 response: the upgrade needs HTTP/1.1 (RFC 6455 §4.1).
    NotHttp11,
    /// The server answered with this status instead of 101 (404 for an unknown path, 503 at its
    /// connection limit, 426 for a version it does not speak, ...).
    Status(u16),
    /// No `Upgrade: websocket` header.
    NoUpgrade,
    /// No `Upgrade` token in the `Connection` header.
    NoConnectionUpgrade,
    /// `Sec-WebSocket-Accept` missing or not the value our key asks for.
    WrongAccept,
    /// The server chose an extension when we offered none.
    UnrequestedExtension,
    /// The server's answer to our permessage-deflate offer breaks RFC 7692 (§5.2, §7.1).
    BadExtension(ExtensionError),
    /// The server chose a subprotocol we did not offer.
    UnrequestedProtocol,
}

impl fmt::Display for ClientHandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientHandshakeError::Malformed => f.write_str("the answer is not an HTTP response"),
            ClientHandshakeError::TooLarge => f.write_str("the response head is too large"),
            ClientHandshakeError::NotHttp11 => f.write_str("the response is not HTTP/1.1"),
            ClientHandshakeError::Status(code) => {
                write!(f, "the server answered HTTP {code} instead of 101")
            }
            ClientHandshakeError::NoUpgrade => f.write_str("no `Upgrade: websocket` header"),
            ClientHandshakeError::NoConnectionUpgrade => {
                f.write_str("no `Connection: Upgrade` header")
            }
            ClientHandshakeError::WrongAccept => {
                f.write_str("Sec-WebSocket-Accept does not match our key")
            }
            ClientHandshakeError::UnrequestedExtension => {
                f.write_str("the server chose an extension we did not offer")
            }
            ClientHandshakeError::BadExtension(e) => {
                write!(f, "invalid answer to our permessage-deflate offer: {e}")
            }
            ClientHandshakeError::UnrequestedProtocol => {
                f.write_str("the server chose a subprotocol we did not offer")
            }
        }
    }
}

impl std::error::Error for ClientHandshakeError {}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::protocol::handshake::{self, parse_request, validate_upgrade};

    /// RFC 6455 §1.3: the sample nonce and the accept value it produces.
    const SAMPLE_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
    const SAMPLE_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

    /// (secure, host, port, resource) of a parsed URL, or why it was refused.
    type UrlOutcome = Result<(bool, &'static str, u16, &'static str), UrlError>;

    /// What `parse_response` gives: the bytes after the head, "need more", or a refusal.
    type ResponseOutcome<'a> = Result<Option<&'a [u8]>, ClientHandshakeError>;

    fn check_url(input: &str, expected: UrlOutcome) {
        let got = WsUrl::parse(input);
        let want = expected.map(|(secure, host, port, resource)| WsUrl {
            secure,
            host: host.to_string(),
            port,
            resource: resource.to_string(),
        });
        assert_eq!(got, want, "{input}");
    }

    #[test]
    fn urls() {
        use UrlError::*;
        #[rustfmt::skip]
        let cases: &[(&str, UrlOutcome)] = &[
            ("ws://127.0.0.1:8080/echo", Ok((false, "127.0.0.1", 8080, "/echo"))),
            ("ws://localhost/echo", Ok((false, "localhost", 80, "/echo"))),
            ("WS://Example.org", Ok((false, "Example.org", 80, "/"))),
            ("ws://h:1/r/bench?x=1&y", Ok((false, "h", 1, "/r/bench?x=1&y"))),
            ("ws://h?id=alice", Ok((false, "h", 80, "/?id=alice"))),
            ("ws://[::1]:9000/echo", Ok((false, "::1", 9000, "/echo"))),
            ("ws://[::1]/", Ok((false, "::1", 80, "/"))),
            ("wss://h/echo", Ok((true, "h", 443, "/echo"))),
            ("WSS://h:8443", Ok((true, "h", 8443, "/"))),
            ("http://h/echo", Err(NotWebSocket)),
            ("h:80/echo", Err(NotWebSocket)),
            ("ws://h/echo#top", Err(Fragment)),
            ("ws://user@h/", Err(UserInfo)),
            ("ws:///echo", Err(NoHost)),
            ("ws://:80/echo", Err(NoHost)),
            ("ws://[::1/", Err(NoHost)),
            ("ws://h:0/", Err(BadPort)),
            ("ws://h:65536/", Err(BadPort)),
            ("ws://h:+80/", Err(BadPort)),
            ("ws://h:/", Err(BadPort)),
            ("ws://[::1]x/", Err(BadPort)),
        ];
        for &(input, expected) in cases {
            check_url(input, expected);
        }
    }

    #[test]
    fn host_headers() {
        let cases: &[(&str, &str)] = &[
            ("ws://127.0.0.1:8080/", "127.0.0.1:8080"),
            ("ws://localhost/", "localhost"),
            ("ws://[::1]:9000/", "[::1]:9000"),
            ("ws://[::1]/", "[::1]"),
            ("wss://h/", "h"),
            ("wss://h:80/", "h:80"),
            ("ws://h:443/", "h:443"),
        ];
        for &(url, want) in cases {
            assert_eq!(WsUrl::parse(url).unwrap().host_header(), want, "{url}");
        }
    }

    #[test]
    fn key_is_base64_of_the_nonce() {
        // RFC 6455 §1.3's sample key is the base64 of "the sample nonce".
        assert_eq!(key_from_nonce(*b"the sample nonce"), SAMPLE_KEY);
    }

    /// Our request passes our own server's checks, and the response it builds passes ours:
    /// the two halves of the handshake agree.
    #[test]
    fn request_is_accepted_by_the_server_side() {
        let key = key_from_nonce([7; 16]);
        let request = upgrade_request("127.0.0.1:8080", "/r/bench-3?x=1", &key);
        let (parsed, len) = parse_request(&request).unwrap().unwrap();
        assert_eq!(len, request.len());
        assert_eq!(parsed.path(), "/r/bench-3");
        assert_eq!(parsed.query(), Some("x=1"));
        assert_eq!(parsed.header("host"), Some("127.0.0.1:8080"));
        let upgrade = validate_upgrade(&parsed).unwrap();
        let mut response = handshake::upgrade_response(&upgrade.accept, None);
        response.extend_from_slice(&[0x81, 0x00]);
        assert_eq!(
            parse_response(&response, &key),
            Ok(Some(&[0x81u8, 0x00][..]))
        );
    }

    /// Our offer, the server's negotiation and our check of its answer agree, for every mode.
    #[test]
    fn deflate_offer_round_trip() {
        use crate::protocol::deflate::{self, CompressionConfig, CompressionMode};
        let key = key_from_nonce([3; 16]);
        let offer = DeflateOffer::BROWSER;
        let value = offer.header_value();
        let request = upgrade_request_with_headers(
            "h",
            "/echo",
            &key,
            &[("Sec-WebSocket-Extensions", &value)],
        );
        let (parsed, _) = parse_request(&request).unwrap().unwrap();
        let upgrade = validate_upgrade(&parsed).unwrap();
        for mode in [
            CompressionMode::Off,
            CompressionMode::Shared,
            CompressionMode::Dedicated,
        ] {
            let config = CompressionConfig::new(mode, 12, 128).unwrap();
            let params = deflate::negotiate(parsed.headers("sec-websocket-extensions"), &config);
            assert_eq!(params.is_some(), mode != CompressionMode::Off);
            let answer = params.map(|p| p.header_value());
            let mut response = handshake::upgrade_response_with_extensions(
                &upgrade.accept,
                None,
                answer.as_deref(),
            );
            response.extend_from_slice(&[0xc1, 0x01, 0x00]);
            let accepted = parse_response_with_offer(&response, &key, Some(&offer));
            assert_eq!(
                accepted,
                Ok(Some(Accepted {
                    rest: &[0xc1, 0x01, 0x00],
                    deflate: params
                })),
                "{mode}"
            );
            // Without our offer, the same answer is an extension we did not ask for.
            let plain = parse_response(&response, &key);
            if params.is_some() {
                assert_eq!(plain, Err(ClientHandshakeError::UnrequestedExtension));
            } else {
                assert!(plain.is_ok());
            }
        }
    }

    #[test]
    fn answers_to_a_deflate_offer() {
        use crate::protocol::deflate::ExtensionError;
        let s101 = "HTTP/1.1 101 Switching Protocols";
        let accept = format!("Sec-WebSocket-Accept: {SAMPLE_ACCEPT}");
        let with = |extra: &[&str]| -> Vec<u8> {
            let mut h = vec!["Upgrade: websocket", "Connection: Upgrade", accept.as_str()];
            h.extend_from_slice(extra);
            response(s101, &h)
        };
        let check = |name: &str,
                     bytes: Vec<u8>,
                     expected: Result<Option<&str>, ClientHandshakeError>| {
            let got = parse_response_with_offer(&bytes, SAMPLE_KEY, Some(&DeflateOffer::BROWSER))
                .map(|a| a.and_then(|a| a.deflate).map(|p| p.header_value()));
            assert_eq!(got, expected.map(|o| o.map(str::to_string)), "{name}");
        };
        let bad = ClientHandshakeError::BadExtension;
        check("declined", with(&[]), Ok(None));
        check(
            "accepted",
            with(&["Sec-WebSocket-Extensions: permessage-deflate"]),
            Ok(Some("permessage-deflate")),
        );
        check(
            "over two lines is two answers",
            with(&[
                "Sec-WebSocket-Extensions: permessage-deflate",
                "Sec-WebSocket-Extensions: permessage-deflate",
            ]),
            Err(bad(ExtensionError::SeveralResponses)),
        );
        check(
            "window out of range",
            with(&["Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits=16"]),
            Err(bad(ExtensionError::BadWindowBits)),
        );
        check(
            "another extension",
            with(&["Sec-WebSocket-Extensions: x-foo"]),
            Err(bad(ExtensionError::UnknownExtension)),
        );
    }

    /// Extra fields follow the required ones and reach the server's parser intact.
    #[test]
    fn extra_headers_are_sent() {
        let key = key_from_nonce([9; 16]);
        let request = upgrade_request_with_headers(
            "h",
            "/ws?id=a",
            &key,
            &[("Authorization", "Bearer abc.def.ghi")],
        );
        let (parsed, len) = parse_request(&request).unwrap().unwrap();
        assert_eq!(len, request.len());
        assert_eq!(parsed.header("authorization"), Some("Bearer abc.def.ghi"));
        assert!(validate_upgrade(&parsed).is_ok());
        assert_eq!(
            upgrade_request_with_headers("h", "/", &key, &[]),
            upgrade_request("h", "/", &key)
        );
    }

    fn response(status_line: &str, headers: &[&str]) -> Vec<u8> {
        let mut r = format!("{status_line}\r\n");
        for h in headers {
            r.push_str(h);
            r.push_str("\r\n");
        }
        r.push_str("\r\n");
        r.into_bytes()
    }

    fn check_response(name: &str, bytes: &[u8], expected: ResponseOutcome) {
        assert_eq!(parse_response(bytes, SAMPLE_KEY), expected, "{name}");
    }

    #[test]
    fn responses() {
        use ClientHandshakeError::*;
        let ok = ["Upgrade: websocket", "Connection: Upgrade"];
        let accept = format!("Sec-WebSocket-Accept: {SAMPLE_ACCEPT}");
        let accept = accept.as_str();
        let s101 = "HTTP/1.1 101 Switching Protocols";
        let with = |extra: &[&str]| -> Vec<u8> {
            let mut h: Vec<&str> = ok.to_vec();
            h.push(accept);
            h.extend_from_slice(extra);
            response(s101, &h)
        };
        let mut pipelined = with(&[]);
        pipelined.extend_from_slice(b"\x81\x02hi");
        let valid = with(&[]);
        #[rustfmt::skip]
        let cases: Vec<(&str, Vec<u8>, ResponseOutcome)> = vec![
            ("valid", valid.clone(), Ok(Some(&[][..]))),
            ("frames after the head", pipelined, Ok(Some(&b"\x81\x02hi"[..]))),
            ("partial head", valid[..valid.len() - 1].to_vec(), Ok(None)),
            ("empty", vec![], Ok(None)),
            ("tokens in any case, lists", response(s101, &["UPGRADE: WebSocket", "connection: keep-alive, upgrade", accept]), Ok(Some(&[][..]))),
            ("connection token on a second line", response(s101, &["Upgrade: websocket", "Connection: keep-alive", "Connection: Upgrade", accept]), Ok(Some(&[][..]))),
            ("empty extensions header", with(&["Sec-WebSocket-Extensions: "]), Ok(Some(&[][..]))),
            ("404", response("HTTP/1.1 404 Not Found", &["Content-Length: 0"]), Err(Status(404))),
            ("503", response("HTTP/1.1 503 Service Unavailable", &[]), Err(Status(503))),
            ("200", response("HTTP/1.1 200 OK", &ok), Err(Status(200))),
            ("HTTP/1.0", response("HTTP/1.0 101 Switching Protocols", &ok), Err(NotHttp11)),
            ("not HTTP", b"SSH-2.0-OpenSSH\r\n\r\n".to_vec(), Err(Malformed)),
            ("no upgrade", response(s101, &["Connection: Upgrade", accept]), Err(NoUpgrade)),
            ("wrong upgrade", response(s101, &["Upgrade: h2c", "Connection: Upgrade", accept]), Err(NoUpgrade)),
            ("no connection", response(s101, &["Upgrade: websocket", accept]), Err(NoConnectionUpgrade)),
            ("connection close", response(s101, &["Upgrade: websocket", "Connection: close", accept]), Err(NoConnectionUpgrade)),
            ("no accept", response(s101, &ok), Err(WrongAccept)),
            ("wrong accept", response(s101, &["Upgrade: websocket", "Connection: Upgrade", "Sec-WebSocket-Accept: S3pPLMBiTxaQ9kYGzzhZRbK+xOo="]), Err(WrongAccept)),
            ("extension", with(&["Sec-WebSocket-Extensions: permessage-deflate"]), Err(UnrequestedExtension)),
            ("protocol", with(&["Sec-WebSocket-Protocol: chat"]), Err(UnrequestedProtocol)),
        ];
        for (name, bytes, expected) in cases {
            check_response(name, &bytes, expected);
        }
    }

    #[test]
    fn oversized_heads_are_refused() {
        let mut head = b"HTTP/1.1 101 Switching Protocols\r\n".to_vec();
        while head.len() <= MAX_RESPONSE_BYTES {
            head.extend_from_slice(b"X-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        }
        assert_eq!(
            parse_response(&head, SAMPLE_KEY),
            Err(ClientHandshakeError::TooLarge)
        );
        let mut many = b"HTTP/1.1 101 Switching Protocols\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("X-{i}: 1\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(
            parse_response(&many, SAMPLE_KEY),
            Err(ClientHandshakeError::TooLarge)
        );
    }

    /// Every prefix of a valid response is "need more"; the whole gives the same decision
    /// however it was accumulated.
    #[test]
    fn every_prefix_of_a_valid_response_needs_more() {
        let mut bytes = response(
            "HTTP/1.1 101 Switching Protocols",
            &[
                "Upgrade: websocket",
                "Connection: Upgrade",
                &format!("Sec-WebSocket-Accept: {SAMPLE_ACCEPT}"),
            ],
        );
        let head_len = bytes.len();
        bytes.extend_from_slice(b"\x89\x00");
        for n in 0..head_len {
            assert_eq!(parse_response(&bytes[..n], SAMPLE_KEY), Ok(None), "{n}");
        }
        for n in head_len..=bytes.len() {
            assert_eq!(
                parse_response(&bytes[..n], SAMPLE_KEY),
                Ok(Some(&bytes[head_len..n])),
                "{n}"
            );
        }
    }
}
