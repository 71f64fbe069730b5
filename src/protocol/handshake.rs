//! The HTTP/1.1 opening handshake of a WebSocket connection, as pure code: request bytes in,
//! a parsed `Request`, an accept/reject decision and response bytes out.
//!
//! Owns: parsing the request head with httparse under the 8 KiB limit, the upgrade rules of
//! RFC 6455 §4.2.1, the `Sec-WebSocket-Accept` computation (§4.2.2), the bytes of the 101
//! response and of every plain HTTP/1.1 answer. A request it refuses is a `Refusal`
//! (`protocol::refusal`, which also writes the answer).
//! Does not: read sockets, run the handshake deadline, route paths or choose a subprotocol (the
//! reactor and the hub do); it does not add a `Date` header (there is no clock in this layer).
//!
//! Implements SPEC §3 (Handshaking) on RFC 6455 §4.1-§4.2 and RFC 7230 (HTTP/1.1 message syntax).
//!
//! Limits and the choices where the RFCs leave room:
//! * The request head (request line, headers and the blank line) may be at most
//!   `MAX_REQUEST_BYTES`; beyond it without a complete head the answer is 431.
//! * At most `MAX_HEADERS` header fields; more is also 431 (`TooManyHeaders`): it is the same
//!   abuse (an oversized head) counted in fields instead of bytes.
//! * httparse only knows `HTTP/1.0` and `HTTP/1.1`; any other version token is `Malformed` (400).
//!   An `HTTP/1.0` request parses fine (a plain `GET /healthz` is served), but it cannot upgrade:
//!   `NotHttp11`, also 400, because the request is wrong for this endpoint rather than for the
//!   server, which is what 505 would say.
//! * Header values that are not UTF-8 (RFC 7230 §3.2.6 obs-text) are kept with U+FFFD in place of
//!   the bad bytes: they are opaque data, and no header we act on can legitimately contain them.
//!
//! Invariant: `parse_request` is a pure function of its input, and for any `buf` a prefix of it
//! that gives a decision (`Some` or `Err`) gives the same decision as `buf` itself. So the reactor
//! may feed bytes in any chunking and re-parse the accumulated buffer; `fuzz::check` tests this.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use sha1::{Digest, Sha1};

use super::refusal::Refusal;

/// The largest request head we buffer (SPEC §3: "up to 8 KiB of headers"). A slowloris client
/// cannot make a connection hold more than this before it is answered with 431.
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;

/// The most header fields a request may carry; httparse fills a fixed array of this size, so
/// parsing allocates nothing. Browsers send about 15.
pub const MAX_HEADERS: usize = 64;

/// RFC 6455 §1.3: the fixed GUID appended to the client's key before hashing.
pub const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// The only WebSocket version this server speaks (RFC 6455 §4.1, §11.6).
pub(super) const WEBSOCKET_VERSION: &str = "13";

/// A parsed HTTP request head. Owns its text so the caller may drop the input buffer.
///
/// Every string of the request (method, path, query, then each header's name and value) is
/// stored back to back in one `String`, and the request keeps where each of them lies in it: a
/// head then costs two allocations (the text and the list of header fields), not two per header.
#[derive(Clone, PartialEq, Eq)]
pub struct Request {
    /// The request's strings one after the other, in the order above. Header values are stored
    /// without surrounding whitespace, with U+FFFD in place of bytes that are not UTF-8.
    text: String,
    /// See `method()`.
    method: Span,
    /// See `path()`.
    path: Span,
    /// See `query()`.
    query: Option<Span>,
    /// The `x` of `HTTP/1.x`: 0 or 1.
    minor_version: u8,
    /// Header fields in arrival order.
    fields: Vec<Field>,
}

/// Where one string of a `Request` lies in its `text`: the bytes `start..end`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Span {
    start: usize,
    end: usize,
}

/// One header field of a `Request`: where its name and its value lie in the text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Field {
    name: Span,
    value: Span,
}

impl Request {
    /// The method exactly as sent; RFC 7230 §3.1.1: methods are case-sensitive (`get` is not GET).
    pub fn method(&self) -> &str {
        self.str(self.method)
    }

    /// The path of the request target, not percent-decoded. For an absolute-form target
    /// (`GET http://host/chat HTTP/1.1`, RFC 7230 §5.3.2) this is the path part (`/chat`).
    pub fn path(&self) -> &str {
        self.str(self.path)
    }

    /// What followed the first `?` of the target, not percent-decoded; see `query_param`.
    pub fn query(&self) -> Option<&str> {
        self.query.map(|span| self.str(span))
    }

    /// The value of the first header called `name` (compared case-insensitively, RFC 7230 §3.2).
    pub fn header(&self, name: &str) -> Option<&str> {
        let field = self
            .fields
            .iter()
            .find(|field| self.is_named(field, name))?;
        Some(self.str(field.value))
    }

    /// The values of every header called `name`, in arrival order.
    pub fn headers<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.fields
            .iter()
            .filter(move |field| self.is_named(field, name))
            .map(|field| self.str(field.value))
    }

    /// Is `field` called `name`? Compared as bytes: names are ASCII tokens, and a lookup scans
    /// every field, so this runs several times per field of every handshake.
    fn is_named(&self, field: &Field, name: &str) -> bool {
        let text = self.text.as_bytes();
        text.get(field.name.start..field.name.end)
            .is_some_and(|field_name| field_name.eq_ignore_ascii_case(name.as_bytes()))
    }

    /// Every header field as (name as sent, value without surrounding whitespace), in arrival
    /// order.
    fn fields(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        self.fields
            .iter()
            .map(|field| (self.str(field.name), self.str(field.value)))
    }

    /// The string at `span` of the text. Every span was made by `build_request` around a whole
    /// string it appended, so it lies on character boundaries; the `""` is never reached.
    fn str(&self, span: Span) -> &str {
        self.text.get(span.start..span.end).unwrap_or_default()
    }

    /// Does any `name` header list `token` among its comma-separated elements?
    ///
    /// RFC 7230 §3.2.2: repeated headers are equivalent to one header with the values joined by
    /// commas; §7: list elements are separated by commas with optional whitespace. Tokens such as
    /// `Upgrade` and `websocket` are case-insensitive (RFC 7230 §6.1, §6.7; RFC 6455 §4.2.1).
    ///
    /// Runs on bytes (a comma and OWS are ASCII): every upgrade asks this three times.
    pub fn has_token(&self, name: &str, token: &str) -> bool {
        self.headers(name)
            .flat_map(|value| value.as_bytes().split(|&byte| byte == b','))
            .any(|element| trim_ows_bytes(element).eq_ignore_ascii_case(token.as_bytes()))
    }

    /// The percent-decoded value of the first `key=value` pair of the query whose decoded key is
    /// `key`. A key without `=` has the value `""`.
    ///
    /// Decoding follows what browsers produce (`URLSearchParams`, HTML forms): `+` is a space, a
    /// `%` not followed by two hex digits is kept as it is, and bytes that do not form UTF-8 become
    /// U+FFFD.
    pub fn query_param(&self, key: &str) -> Option<String> {
        self.query()?
            .split('&')
            .filter(|pair| !pair.is_empty())
            .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
            .find(|(k, _)| percent_decode(k) == key)
            .map(|(_, v)| percent_decode(v))
    }

    /// Does the client ask for a WebSocket? True when an `Upgrade` header names `websocket`.
    ///
    /// The reactor uses this to choose between `validate_upgrade` and a plain HTTP answer; a
    /// request that tries and gets the rest wrong is then told exactly what was wrong.
    pub fn is_upgrade_attempt(&self) -> bool {
        self.has_token("upgrade", "websocket")
    }

    /// The minor HTTP version: 1 for `HTTP/1.1`, 0 for `HTTP/1.0`.
    pub fn minor_version(&self) -> u8 {
        self.minor_version
    }
}

/// Shows the strings, not the spans: what a test failure or a log line needs.
impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("method", &self.method())
            .field("path", &self.path())
            .field("query", &self.query())
            .field("minor_version", &self.minor_version)
            .field("headers", &self.fields().collect::<Vec<_>>())
            .finish()
    }
}

/// How `build_request` turns header values into text.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Values {
    /// As they are: the whole text is checked to be UTF-8 once, at the end.
    AsSent,
    /// Bytes that are not UTF-8 (RFC 7230 §3.2.6 obs-text) become U+FFFD, as
    /// `String::from_utf8_lossy` decides.
    Lossy,
}

/// Builds a `Request` from httparse's parts: each string is appended to the text and its span
/// kept. With `Values::AsSent`, `None` if a value is not UTF-8.
///
/// One UTF-8 check of the whole text costs less than one per value; heads with obs-text are
/// rare, and only they are built a second time, `Lossy`.
fn build_request(
    (method, path, query): (&str, &str, Option<&str>),
    minor_version: u8,
    headers: &[httparse::Header<'_>],
    values: Values,
) -> Option<Request> {
    let total = method.len()
        + path.len()
        + query.map_or(0, str::len)
        + headers
            .iter()
            .map(|h| h.name.len() + h.value.len())
            .sum::<usize>();
    let mut text = Vec::with_capacity(total);
    let mut push = |bytes: &[u8]| {
        let start = text.len();
        text.extend_from_slice(bytes);
        Span {
            start,
            end: text.len(),
        }
    };
    let method = push(method.as_bytes());
    let path = push(path.as_bytes());
    let query = query.map(|query| push(query.as_bytes()));
    let fields = headers
        .iter()
        .map(|h| {
            // Trimming the bytes before a lossy conversion gives what trimming after it would:
            // spaces and tabs are ASCII, and U+FFFD never replaces an ASCII byte.
            let value = trim_ows_bytes(h.value);
            Field {
                name: push(h.name.as_bytes()),
                value: match values {
                    Values::AsSent => push(value),
                    Values::Lossy => push(String::from_utf8_lossy(value).as_bytes()),
                },
            }
        })
        .collect();
    Some(Request {
        text: String::from_utf8(text).ok()?,
        method,
        path,
        query,
        minor_version,
        fields,
    })
}

/// Parses the request head at the start of `buf`.
///
/// Returns `Ok(None)` while the head is incomplete and `buf` is still within `MAX_REQUEST_BYTES`;
/// the caller reads more and calls again with the whole accumulated buffer. Returns
/// `Ok(Some((request, n)))` when the first `n` bytes are a complete head (`n <= buf.len()` and
/// `n <= MAX_REQUEST_BYTES`). Bytes after `n` are not part of the request: they are frames the
/// client pipelined behind its handshake, and the caller keeps them (SPEC §3).
///
/// # Errors
///
/// * `TooLarge` (431) as soon as `buf` holds more than `MAX_REQUEST_BYTES` without a complete head.
/// * `TooManyHeaders` (431) for more than `MAX_HEADERS` header fields.
/// * `Malformed` (400) for anything that is not an HTTP/1.0 or HTTP/1.1 request head.
///
/// # Panics
///
/// Never.
pub fn parse_request(buf: &[u8]) -> Result<Option<(Request, usize)>, Refusal> {
    // Only the first MAX_REQUEST_BYTES can hold an acceptable head, so only they are parsed: a
    // huge buffer costs no more than a full one, and the result does not depend on how the bytes
    // were chunked (see the module invariant).
    let window = buf.get(..MAX_REQUEST_BYTES).unwrap_or(buf);
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut slots);
    let head_len = match parsed.parse(window) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_REQUEST_BYTES => {
            return Err(Refusal::TooLarge)
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Refusal::TooManyHeaders),
        Err(_) => return Err(Refusal::Malformed),
    };
    // httparse fills method, path and version whenever it reports Complete; a None here would be
    // an httparse bug, answered as a malformed request rather than a panic.
    let (Some(method), Some(target), Some(minor_version)) =
        (parsed.method, parsed.path, parsed.version)
    else {
        return Err(Refusal::Malformed);
    };
    let (path, query) = split_target(target);
    let parts = (method, path, query);
    // A lossy build is always UTF-8; the Malformed is never reached, as with the None above.
    let request = build_request(parts, minor_version, parsed.headers, Values::AsSent)
        .or_else(|| build_request(parts, minor_version, parsed.headers, Values::Lossy))
        .ok_or(Refusal::Malformed)?;
    Ok(Some((request, head_len)))
}

/// What a successful upgrade needs to answer the client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upgrade {
    /// The `Sec-WebSocket-Accept` value (RFC 6455 §4.2.2 item 5.4).
    pub accept: String,
    /// The `Sec-WebSocket-Protocol` offers, in the client's order of preference (RFC 6455
    /// §4.1, §11.3.4), across repeated headers. Offers that are not tokens are left out: the
    /// server could never echo them back in a valid header.
    pub protocols: Vec<String>,
}

/// Checks that `req` is a valid WebSocket opening handshake (RFC 6455 §4.2.1, SPEC §3).
///
/// The checks run in this order, so a request with several faults hears about the first:
/// method, HTTP version, Host, Upgrade, Connection, no body, Sec-WebSocket-Version,
/// Sec-WebSocket-Key.
///
/// # Errors
///
/// * `MethodNotAllowed` (405): the method is not GET.
/// * `NotHttp11` (400): the request is HTTP/1.0.
/// * `MissingHost` (400), `DuplicateHeader` (400): no Host, or Host/Sec-WebSocket-Key/
///   Sec-WebSocket-Version more than once.
/// * `NotWebSocket` (426): no `Upgrade` header naming `websocket`.
/// * `MissingConnectionUpgrade` (400): no `Connection` header with the `upgrade` token.
/// * `UnexpectedBody` (400): a `Content-Length` other than 0, or a `Transfer-Encoding`.
/// * `BadVersion` (426): `Sec-WebSocket-Version` missing or not 13.
/// * `BadKey` (400): `Sec-WebSocket-Key` missing or not the base64 of exactly 16 bytes.
pub fn validate_upgrade(req: &Request) -> Result<Upgrade, Refusal> {
    // RFC 6455 §4.1 item 2: "The method of the request MUST be GET, and the HTTP version MUST be
    // at least 1.1."
    if req.method() != "GET" {
        return Err(Refusal::MethodNotAllowed);
    }
    if req.minor_version < 1 {
        return Err(Refusal::NotHttp11);
    }
    // RFC 6455 §4.2.1 item 2; RFC 7230 §5.4: a request with no Host or more than one gets 400.
    if single_header(req, "host")?.is_none() {
        return Err(Refusal::MissingHost);
    }
    // RFC 6455 §4.2.1 item 3: an Upgrade header containing "websocket", case-insensitively.
    if !req.is_upgrade_attempt() {
        return Err(Refusal::NotWebSocket);
    }
    // RFC 6455 §4.2.1 item 4: a Connection header including the "Upgrade" token.
    if !req.has_token("connection", "upgrade") {
        return Err(Refusal::MissingConnectionUpgrade);
    }
    // Not in RFC 6455, but every byte after the head is read as a WebSocket frame. A declared
    // body would make those bytes mean two things at once (RFC 7230 §3.3.3), so refuse it.
    let declares_body = req.headers("content-length").any(|v| v != "0")
        || req.header("transfer-encoding").is_some();
    if declares_body {
        return Err(Refusal::UnexpectedBody);
    }
    // RFC 6455 §4.2.1 item 6 and §4.2.2 item 4: version 13, else 426 naming the versions we
    // speak; §11.3.5: the header must not appear more than once in a request.
    if single_header(req, "sec-websocket-version")? != Some(WEBSOCKET_VERSION) {
        return Err(Refusal::BadVersion);
    }
    // RFC 6455 §4.2.1 item 5: a key that base64-decodes to 16 bytes; §11.3.1: at most once.
    let key = single_header(req, "sec-websocket-key")?.ok_or(Refusal::BadKey)?;
    if !is_valid_key(key) {
        return Err(Refusal::BadKey);
    }
    let protocols = req
        .headers("sec-websocket-protocol")
        .flat_map(|value| value.split(','))
        .map(trim_ows)
        .filter(|offer| is_token(offer))
        .map(str::to_string)
        .collect();
    Ok(Upgrade {
        accept: accept_key(key),
        protocols,
    })
}

/// The `Sec-WebSocket-Accept` value for a client key: base64(SHA-1(key + GUID)), RFC 6455 §4.2.2
/// item 5.4. The key is used exactly as sent (as a string, not decoded).
pub fn accept_key(key: &str) -> String {
    let mut sha1 = Sha1::new();
    sha1.update(key.as_bytes());
    sha1.update(GUID.as_bytes());
    BASE64.encode(sha1.finalize())
}

/// The bytes of the `101 Switching Protocols` response that completes the handshake
/// (RFC 6455 §4.2.2 item 5), with `Sec-WebSocket-Protocol` when a protocol was chosen.
///
/// `protocol` should be one of `Upgrade::protocols`. A value that is not an RFC 7230 token is
/// left out rather than written, so no caller can inject a header through it.
pub fn upgrade_response(accept: &str, protocol: Option<&str>) -> Vec<u8> {
    upgrade_response_with_extensions(accept, protocol, None)
}

/// `upgrade_response` plus `Sec-WebSocket-Extensions: <extensions>` when extensions were
/// accepted (RFC 6455 §4.2.2 item 5.6), e.g. `DeflateParams::header_value()` after
/// `deflate::negotiate` on the request's `Sec-WebSocket-Extensions` values.
///
/// The value is written only if it is a well-formed extension list (RFC 6455 §9.1) without
/// control characters; anything else is left out, so the 101 is never malformed and the
/// connection then simply runs without extensions.
pub fn upgrade_response_with_extensions(
    accept: &str,
    protocol: Option<&str>,
    extensions: Option<&str>,
) -> Vec<u8> {
    let mut head = String::with_capacity(200);
    // The lines that never change are one constant; the values that come from elsewhere go
    // through push_header's checks.
    head.push_str(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n",
    );
    push_header(&mut head, "Sec-WebSocket-Accept", accept);
    if let Some(protocol) = protocol.filter(|p| is_token(p)) {
        push_header(&mut head, "Sec-WebSocket-Protocol", protocol);
    }
    let well_formed = |value: &&str| {
        let mut elements = super::deflate::negotiate::elements(value).peekable();
        elements.peek().is_some() && elements.all(|element| element.is_ok())
    };
    if let Some(extensions) = extensions.filter(well_formed) {
        push_header(&mut head, "Sec-WebSocket-Extensions", extensions);
    }
    head.push_str("\r\n");
    head.into_bytes()
}

/// A complete HTTP/1.1 response: status line, `Content-Type`, `Content-Length`,
/// `Connection: close`, then `extra_headers` in order, a blank line and `body`.
///
/// Every such answer ends the connection (SPEC §3), so it always says `Connection: close`.
/// `status` should be a three-digit code with a body (not 1xx, 204 or 304). A header whose name
/// is not a token or whose value holds a control character (CR, LF ...) is left out, so a value
/// taken from a request can never inject a header.
pub fn http_response(
    status: u16,
    content_type: &str,
    extra_headers: &[(&str, &str)],
    body: &[u8],
) -> Vec<u8> {
    build_response(status, "close", content_type, extra_headers, body)
}

/// The standard reason phrase of a status code (RFC 7231 §6.1, RFC 6585), or `""` for one we
/// never send; RFC 7230 §3.1.2 allows an empty reason phrase, clients must not rely on it.
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        204 => "No Content",
        301 => "Moved Permanently",
        302 => "Found",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Payload Too Large",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "",
    }
}

/// The value of a header that may appear at most once: `Ok(None)` if absent.
fn single_header<'a>(req: &'a Request, name: &'a str) -> Result<Option<&'a str>, Refusal> {
    let mut values = req.headers(name);
    let first = values.next();
    if values.next().is_some() {
        return Err(Refusal::DuplicateHeader);
    }
    Ok(first)
}

/// RFC 6455 §4.1 item 7: the key is a random 16-byte value, base64-encoded (so 24 characters
/// with `==` padding). Checking the length first bounds the decode.
fn is_valid_key(key: &str) -> bool {
    // 24 characters decode to at most 18 bytes: a buffer on the stack, no allocation.
    let mut decoded = [0; 18];
    key.len() == 24 && BASE64.decode_slice(key, &mut decoded) == Ok(16)
}

/// Writes a response head and body; `http_response` is this with `Connection: close`, and
/// `Refusal::response` uses it for the 426, whose Connection header also says `Upgrade`.
pub(super) fn build_response(
    status: u16,
    connection: &str,
    content_type: &str,
    extra_headers: &[(&str, &str)],
    body: &[u8],
) -> Vec<u8> {
    let mut head = String::with_capacity(128);
    head.push_str(&format!("HTTP/1.1 {status} {}\r\n", reason_phrase(status)));
    push_header(&mut head, "Content-Type", content_type);
    push_header(&mut head, "Content-Length", &body.len().to_string());
    push_header(&mut head, "Connection", connection);
    for (name, value) in extra_headers {
        push_header(&mut head, name, value);
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    out.extend_from_slice(body);
    out
}

/// Appends `name: value\r\n`, or nothing when the pair is not a valid header field
/// (RFC 7230 §3.2: the name is a token, the value has no control characters but tab).
fn push_header(head: &mut String, name: &str, value: &str) {
    if is_token(name) && !has_control(value) {
        head.push_str(name);
        head.push_str(": ");
        head.push_str(value);
        head.push_str("\r\n");
    }
}

/// Does `value` hold a control character other than tab (`char::is_control`: U+0000-U+001F,
/// U+007F-U+009F)? Checked on the bytes, without decoding UTF-8.
fn has_control(value: &str) -> bool {
    let bytes = value.as_bytes();
    // C0 controls and DEL are single bytes. `fold` rather than `any`: without an early exit the
    // compiler checks many bytes per instruction, and the values we write are short and clean.
    let c0_or_del = bytes.iter().fold(false, |found, &byte| {
        found | ((byte < 0x20) & (byte != b'\t')) | (byte == 0x7f)
    });
    // A C1 control is the two bytes 0xC2 0x80-0x9F (0xC2 only ever starts a character, so the
    // pair cannot straddle two), which only text that is not ASCII can hold.
    let c1 = !value.is_ascii()
        && bytes
            .windows(2)
            .any(|pair| matches!(pair, [0xc2, 0x80..=0x9f]));
    c0_or_del || c1
}

/// RFC 7230 §3.2.6: token = 1*tchar, the visible ASCII characters except the delimiters.
fn is_token(s: &str) -> bool {
    let is_tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    !s.is_empty() && s.bytes().all(is_tchar)
}

/// RFC 7230 §3.2.3: optional whitespace is spaces and horizontal tabs.
fn trim_ows(s: &str) -> &str {
    s.trim_matches([' ', '\t'])
}

/// `trim_ows` on bytes.
fn trim_ows_bytes(mut bytes: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = bytes {
        bytes = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = bytes {
        bytes = rest;
    }
    bytes
}

/// Splits a request target into path and query.
///
/// Origin-form (`/chat?x=1`) is what clients send; RFC 7230 §5.3.2 also requires servers to accept
/// absolute-form (`http://host/chat?x=1`), whose scheme and authority are dropped here.
/// Asterisk-form (`*`) and anything else stay as they are and simply match no route.
fn split_target(target: &str) -> (&str, Option<&str>) {
    let origin_form = match target.split_once("://") {
        Some((_scheme, rest)) if !target.starts_with('/') => {
            let path_start = rest.find(['/', '?']).unwrap_or(rest.len());
            rest.get(path_start..).unwrap_or("")
        }
        _ => target,
    };
    let (path, query) = match origin_form.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (origin_form, None),
    };
    // RFC 7230 §5.3.1: an empty path in absolute-form means "/".
    let path = if path.is_empty() { "/" } else { path };
    (path, query)
}

/// Decodes `%XX` escapes and `+` (application/x-www-form-urlencoded, as browsers send queries).
pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        let escaped = match (b, bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&hi), Some(&lo)) => hex_value(hi).zip(hex_value(lo)),
            _ => None,
        };
        match (b, escaped) {
            (_, Some((hi, lo))) => {
                out.push(hi << 4 | lo);
                i += 3;
            }
            (b'+', None) => {
                out.push(b' ');
                i += 1;
            }
            _ => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// The fuzzing oracle, compiled only for tests and fuzzing builds (`cargo fuzz` passes
/// `--cfg fuzzing`), never into the shipped library.
#[cfg(any(test, fuzzing))]
pub mod fuzz {
    use super::*;

    /// The fuzzing oracle (fuzz/fuzz_targets/handshake.rs, and the corpus replay test).
    ///
    /// Asserts, for any input: no panic; a consumed length within the input and the limit; feeding
    /// the input in chunks (re-parsing the accumulated prefix, as the reactor does) reaches the same
    /// decision as parsing it whole; every response we would send starts with `HTTP/1.1 `; and
    /// the 101 is well-formed whatever `Sec-WebSocket-Extensions` offered.
    /// Unlike the rest of this layer it panics by design: a failed assertion is the finding.
    pub fn check(data: &[u8]) {
        let whole = parse_request(data);

        // The chunk size comes from the input so the fuzzer explores chunkings too; at most ~32
        // re-parses keep each run cheap.
        let hint = data.first().map_or(1, |&b| usize::from(b % 32) + 1);
        let chunk = (data.len() / hint).max(1);
        let mut fed = 0;
        let chunked = loop {
            fed = (fed + chunk).min(data.len());
            let prefix = data.get(..fed).unwrap_or(data);
            match parse_request(prefix) {
                Ok(None) if fed < data.len() => continue,
                decision => break decision,
            }
        };
        assert_eq!(chunked, whole, "chunked feeding (chunk {chunk}) disagrees");

        match whole {
            Ok(None) => assert!(
                data.len() <= MAX_REQUEST_BYTES,
                "incomplete beyond the limit"
            ),
            Ok(Some((request, n))) => {
                assert!(
                    n > 0 && n <= data.len() && n <= MAX_REQUEST_BYTES,
                    "consumed {n}"
                );
                // One byte short of the head is never a head; the head alone is the same request.
                let short = data.get(..n - 1).unwrap_or(data);
                assert_eq!(parse_request(short), Ok(None), "head minus one byte");
                let exact = data.get(..n).unwrap_or(data);
                assert_eq!(
                    parse_request(exact),
                    Ok(Some((request.clone(), n))),
                    "head alone"
                );
                // Exercise the accessors on whatever arrived.
                let _ = request.query_param("id");
                let _ = request.has_token("connection", "upgrade");
                match validate_upgrade(&request) {
                    Ok(upgrade) => {
                        assert_eq!(upgrade.accept.len(), 28, "accept is base64 of 20 bytes");
                        let protocol = upgrade.protocols.first().map(String::as_str);
                        check_extensions_answer(&request, &upgrade.accept, protocol);
                    }
                    Err(e) => assert!(e.response().starts_with(b"HTTP/1.1 ")),
                }
                // Header values taken from the request must not break a response we build.
                let echoed = request.header("origin").unwrap_or("");
                let response = http_response(200, "text/plain", &[("X-Echo", echoed)], data);
                assert!(response.starts_with(b"HTTP/1.1 200 OK\r\n"));
            }
            Err(e) => {
                if e == Refusal::TooLarge {
                    assert!(data.len() > MAX_REQUEST_BYTES, "TooLarge within the limit");
                }
                assert!(e.response().starts_with(b"HTTP/1.1 "));
            }
        }
    }

    /// Whatever the client offered, the answer is one well-formed 101 whose extension (if any)
    /// passes a client's checks.
    fn check_extensions_answer(request: &Request, accept: &str, protocol: Option<&str>) {
        let offers = request.headers("sec-websocket-extensions");
        let config = crate::protocol::deflate::CompressionConfig::default();
        let params = crate::protocol::deflate::negotiate(offers, &config);
        let extensions = params.map(|p| p.header_value());
        let response = upgrade_response_with_extensions(accept, protocol, extensions.as_deref());
        assert!(response.starts_with(b"HTTP/1.1 101 "));
        assert!(response.ends_with(b"\r\n\r\n"));
        let mut headers = [httparse::EMPTY_HEADER; 8];
        let mut parsed = httparse::Response::new(&mut headers);
        let n = parsed.parse(&response);
        assert_eq!(n, Ok(httparse::Status::Complete(response.len())));
        let answered: Vec<&str> = parsed
            .headers
            .iter()
            .filter(|h| h.name == "Sec-WebSocket-Extensions")
            .filter_map(|h| std::str::from_utf8(h.value).ok())
            .collect();
        assert_eq!(answered.len(), usize::from(params.is_some()));
        if let Some(params) = params {
            let browser = crate::protocol::deflate::DeflateOffer::BROWSER;
            let check = crate::protocol::deflate::accept_response(answered, &browser);
            // The browser's offer is answered validly; other offers may have asked for things
            // the browser's did not, which the check then refuses.
            if request.header("sec-websocket-extensions")
                == Some("permessage-deflate; client_max_window_bits")
            {
                assert_eq!(check, Ok(Some(params)));
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::fuzz::check as fuzz_check;
    use super::*;
    use crate::protocol::deflate::{self, CompressionConfig};
    use proptest::prelude::*;

    /// A typical browser opening handshake (Chrome's header set), with the RFC 6455 sample key.
    const BROWSER: &str = "GET /ws?id=alice HTTP/1.1\r\n\
        Host: localhost:8080\r\n\
        Connection: Upgrade\r\n\
        Pragma: no-cache\r\n\
        Cache-Control: no-cache\r\n\
        User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/120.0 Safari/537.36\r\n\
        Upgrade: websocket\r\n\
        Origin: http://localhost:8080\r\n\
        Sec-WebSocket-Version: 13\r\n\
        Accept-Encoding: gzip, deflate, br\r\n\
        Accept-Language: en-US,en;q=0.9\r\n\
        Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
        Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\
        Sec-WebSocket-Protocol: wsrelay.v1, chat\r\n\
        \r\n";

    const SAMPLE_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

    /// A minimal valid upgrade with `extra` header lines inserted before the blank line.
    fn upgrade_with(request_line: &str, extra: &str) -> String {
        format!(
            "{request_line}\r\nHost: example.com\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
        )
    }

    /// A request head built from header lines, without defaults.
    fn head(request_line: &str, header_lines: &[&str]) -> String {
        let mut s = format!("{request_line}\r\n");
        for line in header_lines {
            s.push_str(line);
            s.push_str("\r\n");
        }
        s.push_str("\r\n");
        s
    }

    fn parse_complete(bytes: &[u8]) -> (Request, usize) {
        match parse_request(bytes) {
            Ok(Some(parsed)) => parsed,
            other => panic!("expected a complete head, got {other:?}"),
        }
    }

    #[test]
    fn accept_key_vectors() {
        fn check(name: &str, key: &str, expected: &str) {
            assert_eq!(accept_key(key), expected, "{name}");
        }
        // RFC 6455 §1.3 and §4.2.2.
        check("rfc sample", "dGhlIHNhbXBsZSBub25jZQ==", SAMPLE_ACCEPT);
        // RFC 6455 §1.2 (the client example's key and the server example's accept).
        check(
            "rfc 1.2 example",
            "x3JJHMbDL1EzLkh9GBhXDw==",
            "HSmrc0sMlYUkAGmm5OPpG2HaGWk=",
        );
    }

    #[test]
    fn upgrade_response_bytes() {
        fn check(name: &str, protocol: Option<&str>, expected: &str) {
            let got = upgrade_response(SAMPLE_ACCEPT, protocol);
            assert_eq!(String::from_utf8_lossy(&got), expected, "{name}");
        }
        check(
            "no protocol",
            None,
            "HTTP/1.1 101 Switching Protocols\r\n\
             Upgrade: websocket\r\n\
             Connection: Upgrade\r\n\
             Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\
             \r\n",
        );
        check(
            "chosen protocol",
            Some("wsrelay.v1"),
            "HTTP/1.1 101 Switching Protocols\r\n\
             Upgrade: websocket\r\n\
             Connection: Upgrade\r\n\
             Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\
             Sec-WebSocket-Protocol: wsrelay.v1\r\n\
             \r\n",
        );
        check(
            "protocol with CRLF is left out",
            Some("x\r\nSet-Cookie: a=b"),
            "HTTP/1.1 101 Switching Protocols\r\n\
             Upgrade: websocket\r\n\
             Connection: Upgrade\r\n\
             Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\
             \r\n",
        );
    }

    #[test]
    fn upgrade_response_with_extension_bytes() {
        fn check(name: &str, extensions: Option<&str>, expected_line: Option<&str>) {
            let got = upgrade_response_with_extensions(SAMPLE_ACCEPT, None, extensions);
            let line = expected_line.map_or(String::new(), |l| format!("{l}\r\n"));
            let expected = format!(
                "HTTP/1.1 101 Switching Protocols\r\n\
                 Upgrade: websocket\r\n\
                 Connection: Upgrade\r\n\
                 Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\
                 {line}\r\n"
            );
            assert_eq!(String::from_utf8_lossy(&got), expected, "{name}");
        }
        let pmd = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";
        check(
            "deflate",
            Some(pmd),
            Some(&format!("Sec-WebSocket-Extensions: {pmd}")),
        );
        check("none", None, None);
        check("empty is left out", Some(""), None);
        check("CRLF is left out", Some("permessage-deflate\r\nX: y"), None);
        check(
            "not a list is left out",
            Some("permessage-deflate; ;"),
            None,
        );
        assert_eq!(
            upgrade_response_with_extensions(SAMPLE_ACCEPT, Some("chat"), None),
            upgrade_response(SAMPLE_ACCEPT, Some("chat"))
        );
    }

    /// The whole server side on a browser's request: the offer is negotiated under the default
    /// configuration and answered in the 101.
    #[test]
    fn browser_offer_is_answered_in_the_101() {
        let (req, _) = parse_complete(BROWSER.as_bytes());
        let upgrade = validate_upgrade(&req).unwrap();
        let params = deflate::negotiate(
            req.headers("sec-websocket-extensions"),
            &CompressionConfig::default(),
        )
        .unwrap();
        let response =
            upgrade_response_with_extensions(&upgrade.accept, None, Some(&params.header_value()));
        let text = String::from_utf8(response).unwrap();
        assert!(text.contains(
            "\r\nSec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; \
             client_no_context_takeover\r\n"
        ));
    }

    #[test]
    fn browser_request_upgrades() {
        let (req, n) = parse_complete(BROWSER.as_bytes());
        assert_eq!(n, BROWSER.len());
        assert_eq!(req.method(), "GET");
        assert_eq!(req.path(), "/ws");
        assert_eq!(req.query(), Some("id=alice"));
        assert_eq!(req.header("ORIGIN"), Some("http://localhost:8080"));
        let upgrade = validate_upgrade(&req).unwrap();
        assert_eq!(upgrade.accept, SAMPLE_ACCEPT);
        assert_eq!(upgrade.protocols, ["wsrelay.v1", "chat"]);
    }

    /// (name, request bytes, expected outcome of validate_upgrade: protocols or the error).
    #[test]
    fn validate_table() {
        fn check(name: &str, request: &str, expected: Result<&[&str], Refusal>) {
            let (req, _) = parse_complete(request.as_bytes());
            let got = validate_upgrade(&req);
            match (got, expected) {
                (Ok(upgrade), Ok(protocols)) => {
                    assert_eq!(upgrade.accept, SAMPLE_ACCEPT, "{name}");
                    assert_eq!(upgrade.protocols, protocols, "{name}");
                }
                (got, expected) => {
                    assert_eq!(got.map(|u| u.protocols), expected.map(|_| vec![]), "{name}")
                }
            }
        }
        use Refusal::*;
        // Valid, with no subprotocol offered.
        const OK: Result<&[&str], Refusal> = Ok(&[]);
        check("minimal", &upgrade_with("GET / HTTP/1.1", ""), OK);
        check(
            "lower-case names and mixed-case tokens",
            &head(
                "GET /chat HTTP/1.1",
                &[
                    "host: example.com",
                    "upgrade: WebSocket",
                    "connection: keep-alive, Upgrade",
                    "sec-websocket-version: 13",
                    "sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==",
                ],
            ),
            OK,
        );
        check(
            "Upgrade as a comma list",
            &head(
                "GET / HTTP/1.1",
                &[
                    "Host: h",
                    "Upgrade: h2c,  websocket ",
                    "Connection: UPGRADE",
                    "Sec-WebSocket-Version: 13",
                    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                ],
            ),
            OK,
        );
        check(
            "repeated Connection headers",
            &head(
                "GET / HTTP/1.1",
                &[
                    "Host: h",
                    "Upgrade: websocket",
                    "Connection: keep-alive",
                    "Connection: upgrade",
                    "Sec-WebSocket-Version: 13",
                    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                ],
            ),
            OK,
        );
        check(
            "protocol offers across headers, non-tokens dropped",
            &upgrade_with(
                "GET / HTTP/1.1",
                "Sec-WebSocket-Protocol: a, b\r\nSec-WebSocket-Protocol: \"q\", c\r\n",
            ),
            Ok(&["a", "b", "c"]),
        );
        check(
            "absolute-form target",
            &upgrade_with("GET http://example.com/ws HTTP/1.1", ""),
            OK,
        );
        check(
            "Content-Length: 0 is no body",
            &upgrade_with("GET / HTTP/1.1", "Content-Length: 0\r\n"),
            OK,
        );
        check(
            "POST",
            &upgrade_with("POST / HTTP/1.1", ""),
            Err(MethodNotAllowed),
        );
        check(
            "lower-case get (methods are case-sensitive)",
            &upgrade_with("get / HTTP/1.1", ""),
            Err(MethodNotAllowed),
        );
        check(
            "HTTP/1.0",
            &upgrade_with("GET / HTTP/1.0", ""),
            Err(NotHttp11),
        );
        check(
            "no Host",
            &head(
                "GET / HTTP/1.1",
                &[
                    "Upgrade: websocket",
                    "Connection: Upgrade",
                    "Sec-WebSocket-Version: 13",
                    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                ],
            ),
            Err(MissingHost),
        );
        check(
            "two Hosts",
            &upgrade_with("GET / HTTP/1.1", "Host: other\r\n"),
            Err(DuplicateHeader),
        );
        check(
            "no Upgrade",
            &head(
                "GET / HTTP/1.1",
                &[
                    "Host: h",
                    "Connection: Upgrade",
                    "Sec-WebSocket-Version: 13",
                    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                ],
            ),
            Err(NotWebSocket),
        );
        check(
            "Upgrade names another protocol",
            &head(
                "GET / HTTP/1.1",
                &[
                    "Host: h",
                    "Upgrade: websockets",
                    "Connection: Upgrade",
                    "Sec-WebSocket-Version: 13",
                    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                ],
            ),
            Err(NotWebSocket),
        );
        check(
            "Connection without upgrade",
            &head(
                "GET / HTTP/1.1",
                &[
                    "Host: h",
                    "Upgrade: websocket",
                    "Connection: keep-alive, upgrade-insecure",
                    "Sec-WebSocket-Version: 13",
                    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                ],
            ),
            Err(MissingConnectionUpgrade),
        );
        check(
            "body declared",
            &upgrade_with("GET / HTTP/1.1", "Content-Length: 5\r\n"),
            Err(UnexpectedBody),
        );
        check(
            "chunked body declared",
            &upgrade_with("GET / HTTP/1.1", "Transfer-Encoding: chunked\r\n"),
            Err(UnexpectedBody),
        );
        check(
            "version 8",
            &head(
                "GET / HTTP/1.1",
                &[
                    "Host: h",
                    "Upgrade: websocket",
                    "Connection: Upgrade",
                    "Sec-WebSocket-Version: 8",
                    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                ],
            ),
            Err(BadVersion),
        );
        check(
            "no version",
            &head(
                "GET / HTTP/1.1",
                &[
                    "Host: h",
                    "Upgrade: websocket",
                    "Connection: Upgrade",
                    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                ],
            ),
            Err(BadVersion),
        );
        check(
            "version twice",
            &upgrade_with("GET / HTTP/1.1", "Sec-WebSocket-Version: 13\r\n"),
            Err(DuplicateHeader),
        );
        check(
            "key twice",
            &upgrade_with(
                "GET / HTTP/1.1",
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
            ),
            Err(DuplicateHeader),
        );
        for (name, key_line) in [
            ("no key", ""),
            ("empty key", "Sec-WebSocket-Key: \r\n"),
            (
                "key of 15 bytes",
                "Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAA\r\n",
            ),
            (
                "key of 17 bytes",
                "Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAAA=\r\n",
            ),
            (
                "key not base64",
                "Sec-WebSocket-Key: !!!!!!!!!!!!!!!!!!!!!!==\r\n",
            ),
            (
                "key without padding",
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ\r\n",
            ),
            (
                "key with stray bits",
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZR==\r\n",
            ),
        ] {
            let request = head(
                "GET / HTTP/1.1",
                &[
                    "Host: h",
                    "Upgrade: websocket",
                    "Connection: Upgrade",
                    "Sec-WebSocket-Version: 13",
                ],
            );
            let request = request.replacen("\r\n\r\n", &format!("\r\n{key_line}\r\n"), 1);
            check(name, &request, Err(BadKey));
        }
    }

    #[test]
    fn http_response_bytes() {
        fn check(name: &str, got: Vec<u8>, expected: &str) {
            assert_eq!(String::from_utf8_lossy(&got), expected, "{name}");
        }
        check(
            "healthz",
            http_response(200, "text/plain", &[], b"ok\n"),
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\
             Connection: close\r\n\r\nok\n",
        );
        check(
            "extra headers in order",
            http_response(404, "text/html", &[("A", "1"), ("B", "2")], b""),
            "HTTP/1.1 404 Not Found\r\nContent-Type: text/html\r\nContent-Length: 0\r\n\
             Connection: close\r\nA: 1\r\nB: 2\r\n\r\n",
        );
        check(
            "injected header dropped",
            http_response(
                200,
                "text/plain",
                &[("X", "a\r\nB: c"), ("Bad Name", "v")],
                b"",
            ),
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 0\r\n\
             Connection: close\r\n\r\n",
        );
        check(
            "unknown status has an empty reason phrase",
            http_response(299, "text/plain", &[], b""),
            "HTTP/1.1 299 \r\nContent-Type: text/plain\r\nContent-Length: 0\r\n\
             Connection: close\r\n\r\n",
        );
    }

    /// A header value is written unless it holds a control character other than tab, exactly
    /// as `char::is_control` defines them, C1 controls (two bytes in UTF-8) included.
    #[test]
    fn header_values_with_control_characters_are_left_out() {
        fn check(name: &str, value: &str, written: bool) {
            let mut head = String::new();
            push_header(&mut head, "X", value);
            let expected = if written {
                format!("X: {value}\r\n")
            } else {
                String::new()
            };
            assert_eq!(head, expected, "{name}");
        }
        check("plain", "abc", true);
        check("tab", "a\tb", true);
        check("empty", "", true);
        check("CR", "a\rb", false);
        check("NUL", "\0", false);
        check("DEL", "a\u{7f}", false);
        check("C1 NEL", "a\u{85}b", false);
        check("C1 first", "\u{80}", false);
        check("C1 last", "\u{9f}", false);
        check("no-break space (0xC2 0xA0)", "a\u{a0}b", true);
        check("Latin letter (0xC3 0xA9)", "caf\u{e9}", true);
        check("CJK", "\u{65e5}\u{672c}", true);
        check("U+FFFD", "\u{fffd}", true);
        // Every character, between two letters, against the definition itself.
        for c in (0..=0x10_ffff).filter_map(char::from_u32) {
            let value = format!("a{c}b");
            let expected = c == '\t' || !c.is_control();
            assert_eq!(!has_control(&value), expected, "U+{:04X}", u32::from(c));
        }
    }

    /// What `parse_request` should say about a buffer.
    #[derive(Debug, PartialEq)]
    enum Parsed {
        Incomplete,
        Complete(usize),
        Error(Refusal),
    }

    fn outcome(buf: &[u8]) -> Parsed {
        match parse_request(buf) {
            Ok(None) => Parsed::Incomplete,
            Ok(Some((_, n))) => Parsed::Complete(n),
            Err(e) => Parsed::Error(e),
        }
    }

    #[test]
    fn parse_table() {
        fn check(name: &str, input: &[u8], expected: Parsed) {
            assert_eq!(outcome(input), expected, "{name}");
        }
        let valid = upgrade_with("GET / HTTP/1.1", "");
        let filler = |len: usize| format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(len));
        // A head of exactly MAX_REQUEST_BYTES: "GET / HTTP/1.1\r\nX: " + value + "\r\n\r\n".
        let exact_value = MAX_REQUEST_BYTES - "GET / HTTP/1.1\r\nX: \r\n\r\n".len();
        let exact = format!("{}\r\n\r\n", filler(exact_value));
        assert_eq!(exact.len(), MAX_REQUEST_BYTES);
        let incomplete_at_limit = filler(MAX_REQUEST_BYTES - 19);
        assert_eq!(incomplete_at_limit.len(), MAX_REQUEST_BYTES);
        let mut pipelined_exact = exact.clone().into_bytes();
        pipelined_exact.extend_from_slice(&[0x81, 0x80, 1, 2, 3, 4]);
        let many_headers = head("GET / HTTP/1.1", &["X: y"; MAX_HEADERS + 1]);
        let max_headers = head("GET / HTTP/1.1", &["X: y"; MAX_HEADERS]);

        check("empty", b"", Parsed::Incomplete);
        check(
            "request line only",
            b"GET / HTTP/1.1\r\n",
            Parsed::Incomplete,
        );
        check("valid", valid.as_bytes(), Parsed::Complete(valid.len()));
        check(
            "leading blank line is skipped (RFC 7230 §3.5)",
            b"\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n",
            Parsed::Complete(29),
        );
        check(
            "HTTP/1.0 parses",
            b"GET / HTTP/1.0\r\n\r\n",
            Parsed::Complete(18),
        );
        check(
            "HTTP/2.0 is malformed",
            b"GET / HTTP/2.0\r\n\r\n",
            Parsed::Error(Refusal::Malformed),
        );
        check(
            "not HTTP",
            b"\x16\x03\x01\x02\x00\x01\x00",
            Parsed::Error(Refusal::Malformed),
        );
        check(
            "space in header name",
            b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
            Parsed::Error(Refusal::Malformed),
        );
        check(
            "obs-fold is refused (RFC 7230 §3.2.4)",
            b"GET / HTTP/1.1\r\nX: a\r\n b\r\n\r\n",
            Parsed::Error(Refusal::Malformed),
        );
        check(
            "complete head of exactly 8 KiB",
            exact.as_bytes(),
            Parsed::Complete(MAX_REQUEST_BYTES),
        );
        check(
            "8 KiB head followed by frame bytes",
            &pipelined_exact,
            Parsed::Complete(MAX_REQUEST_BYTES),
        );
        check(
            "8 KiB without a complete head",
            incomplete_at_limit.as_bytes(),
            Parsed::Incomplete,
        );
        check(
            "8 KiB + 1 without a complete head",
            format!("{incomplete_at_limit}a").as_bytes(),
            Parsed::Error(Refusal::TooLarge),
        );
        check(
            "head completing one byte past the limit",
            format!("{}\r\n\r\n", filler(exact_value + 1)).as_bytes(),
            Parsed::Error(Refusal::TooLarge),
        );
        check(
            "64 headers",
            max_headers.as_bytes(),
            Parsed::Complete(max_headers.len()),
        );
        check(
            "65 headers",
            many_headers.as_bytes(),
            Parsed::Error(Refusal::TooManyHeaders),
        );
    }

    #[test]
    fn pipelined_frames_are_not_consumed() {
        // A masked text frame "Hi" right behind the handshake, in the same read.
        let frame = [0x81, 0x82, 0x01, 0x02, 0x03, 0x04, b'H' ^ 1, b'i' ^ 2];
        let mut buf = BROWSER.as_bytes().to_vec();
        buf.extend_from_slice(&frame);
        let (req, n) = parse_complete(&buf);
        assert_eq!(n, BROWSER.len());
        assert_eq!(&buf[n..], frame);
        assert_eq!(req, parse_complete(BROWSER.as_bytes()).0);
    }

    #[test]
    fn split_at_every_boundary() {
        fn check(name: &str, input: &[u8]) {
            let whole = parse_request(input);
            let whole_n = match &whole {
                Ok(Some((_, n))) => *n,
                other => panic!("{name}: not complete: {other:?}"),
            };
            for k in 0..=input.len() {
                let got = parse_request(&input[..k]);
                if k < whole_n {
                    assert_eq!(got, Ok(None), "{name}: prefix {k}");
                } else {
                    assert_eq!(got, whole, "{name}: prefix {k}");
                }
            }
        }
        check("browser", BROWSER.as_bytes());
        check("minimal", upgrade_with("GET / HTTP/1.1", "").as_bytes());
        check("bare LF lines", b"GET /x HTTP/1.1\nHost: h\n\n");
        let mut with_frame = BROWSER.as_bytes().to_vec();
        with_frame.extend_from_slice(&[0x81, 0x80, b'a', b'b', b'c', b'd']);
        check("with frame behind", &with_frame);
    }

    #[test]
    fn header_lookup() {
        fn check(name: &str, lookup: &str, expected: &[&str]) {
            let request = upgrade_with(
                "GET / HTTP/1.1",
                "X-Multi: one\r\nx-multi: two \r\nX-Empty:\r\n",
            );
            let (req, _) = parse_complete(request.as_bytes());
            let all: Vec<&str> = req.headers(lookup).collect();
            assert_eq!(all, expected, "{name}");
            assert_eq!(req.header(lookup), expected.first().copied(), "{name}");
        }
        check("exact case", "Host", &["example.com"]);
        check("other case", "hOST", &["example.com"]);
        check("repeated, in order, trimmed", "X-MULTI", &["one", "two"]);
        check("empty value", "x-empty", &[""]);
        check("absent", "Cookie", &[]);
    }

    /// RFC 7230 §3.2.6 obs-text: bytes that are not UTF-8 become U+FFFD, one per bad sequence
    /// as `String::from_utf8_lossy` decides, and the value is still trimmed of spaces and tabs.
    #[test]
    fn header_values_that_are_not_utf8() {
        fn check(name: &str, line: &[u8], expected: &str) {
            let mut request = b"GET / HTTP/1.1\r\nHost: h\r\n".to_vec();
            request.extend_from_slice(line);
            request.extend_from_slice(b"\r\n\r\n");
            let (req, _) = parse_complete(&request);
            assert_eq!(req.header("x"), Some(expected), "{name}");
            assert_eq!(
                req.header("host"),
                Some("h"),
                "{name}: the next field is intact"
            );
        }
        check("Latin-1 byte", b"X: caf\xe9", "caf\u{FFFD}");
        check("UTF-8 kept", "X: caf\u{e9}".as_bytes(), "caf\u{e9}");
        check("trimmed around", b"X: \t\xff\xfe \t", "\u{FFFD}\u{FFFD}");
        check("truncated sequence", b"X: a\xe2\x82 b", "a\u{FFFD} b");
        check("truncated at the end", b"X: a\xe2\x82  ", "a\u{FFFD}");
    }

    #[test]
    fn token_lists() {
        fn check(name: &str, header_lines: &[&str], token: &str, expected: bool) {
            let request = head("GET / HTTP/1.1", header_lines);
            let (req, _) = parse_complete(request.as_bytes());
            assert_eq!(req.has_token("connection", token), expected, "{name}");
        }
        check("single", &["Connection: Upgrade"], "upgrade", true);
        check(
            "in a list",
            &["Connection: keep-alive, Upgrade"],
            "upgrade",
            true,
        );
        check(
            "no spaces",
            &["Connection: keep-alive,upgrade"],
            "upgrade",
            true,
        );
        check("tabs", &["Connection: close,\tUPGRADE\t"], "upgrade", true);
        check(
            "across repeated headers",
            &["Connection: keep-alive", "connection: upgrade"],
            "upgrade",
            true,
        );
        check(
            "substring is not a token",
            &["Connection: upgrades"],
            "upgrade",
            false,
        );
        check("empty elements", &["Connection: , ,"], "upgrade", false);
        check("absent", &["Upgrade: websocket"], "upgrade", false);
    }

    #[test]
    fn targets_and_query_params() {
        fn check(name: &str, target: &str, path: &str, key: &str, expected: Option<&str>) {
            let request = head(&format!("GET {target} HTTP/1.1"), &["Host: h"]);
            let (req, _) = parse_complete(request.as_bytes());
            assert_eq!(req.path(), path, "{name}");
            assert_eq!(req.query_param(key).as_deref(), expected, "{name}");
        }
        check("no query", "/ws", "/ws", "id", None);
        check("plain", "/ws?id=alice", "/ws", "id", Some("alice"));
        check("second pair", "/ws?a=1&id=bob", "/ws", "id", Some("bob"));
        check(
            "first occurrence wins",
            "/ws?id=a&id=b",
            "/ws",
            "id",
            Some("a"),
        );
        check(
            "percent-encoded",
            "/ws?id=al%69ce%20%C3%A9",
            "/ws",
            "id",
            Some("alice é"),
        );
        check("plus is space", "/ws?id=a+b", "/ws", "id", Some("a b"));
        check("encoded plus", "/ws?id=a%2Bb", "/ws", "id", Some("a+b"));
        check("encoded key", "/ws?%69d=x", "/ws", "id", Some("x"));
        check("no equals", "/ws?id", "/ws", "id", Some(""));
        check("empty value", "/ws?id=&x=1", "/ws", "id", Some(""));
        check(
            "equals in value",
            "/ws?token=a.b=c",
            "/ws",
            "token",
            Some("a.b=c"),
        );
        check(
            "bad escape kept",
            "/ws?id=100%&x=%zz",
            "/ws",
            "id",
            Some("100%"),
        );
        check(
            "bad escape kept 2",
            "/ws?x=%zz%4",
            "/ws",
            "x",
            Some("%zz%4"),
        );
        check("not UTF-8", "/ws?id=%FF", "/ws", "id", Some("\u{FFFD}"));
        check(
            "key prefix does not match",
            "/ws?identity=x",
            "/ws",
            "id",
            None,
        );
        check(
            "absolute-form",
            "http://h:80/r/lobby?id=z",
            "/r/lobby",
            "id",
            Some("z"),
        );
        check(
            "absolute-form, no path",
            "http://h?id=z",
            "/",
            "id",
            Some("z"),
        );
        check("asterisk-form", "*", "*", "id", None);
    }

    #[test]
    fn upgrade_attempt_detection() {
        fn check(name: &str, header_lines: &[&str], expected: bool) {
            let (req, _) = parse_complete(head("GET / HTTP/1.1", header_lines).as_bytes());
            assert_eq!(req.is_upgrade_attempt(), expected, "{name}");
        }
        check("plain GET", &["Host: h"], false);
        check("websocket", &["Upgrade: websocket"], true);
        check("mixed case", &["upgrade: WebSocket"], true);
        check("in a list", &["Upgrade: h2c, websocket"], true);
        check("other protocol", &["Upgrade: h2c"], false);
    }

    #[test]
    fn fuzz_check_accepts_known_inputs() {
        for input in [
            BROWSER.as_bytes(),
            b"",
            b"GET / HTTP/1.0\r\n\r\n",
            b"\x00\xff",
            upgrade_with("GET / HTTP/1.1", "Content-Length: 3\r\n").as_bytes(),
        ] {
            fuzz_check(input);
        }
        fuzz_check(&vec![b'a'; MAX_REQUEST_BYTES + 10]);
    }

    /// Replays the checked-in fuzz corpus so stable CI keeps every finding fixed.
    #[test]
    fn fuzz_corpus_replays() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/handshake");
        let mut replayed = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            fuzz_check(&std::fs::read(&path).unwrap());
            replayed += 1;
        }
        assert!(replayed > 0, "no corpus in {}", dir.display());
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..600)) {
            if let Ok(Some((_, n))) = parse_request(&data) {
                prop_assert!(n <= data.len());
            }
            fuzz_check(&data);
        }

        /// The request keeps exactly the strings a plain owned parse gives (httparse's fields,
        /// values lossily decoded and then trimmed), whatever bytes two mutations put in.
        #[test]
        fn strings_match_an_owned_parse(
            mutations in proptest::collection::vec((0..BROWSER.len(), any::<u8>()), 2),
        ) {
            let mut data = BROWSER.as_bytes().to_vec();
            for (at, byte) in mutations {
                data[at] = byte;
            }
            let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut parsed = httparse::Request::new(&mut slots);
            if let (Ok(httparse::Status::Complete(_)), Ok(Some((req, _)))) =
                (parsed.parse(&data), parse_request(&data))
            {
                let (path, query) = split_target(parsed.path.unwrap());
                prop_assert_eq!(req.method(), parsed.method.unwrap());
                prop_assert_eq!(req.path(), path);
                prop_assert_eq!(req.query(), query);
                let owned: Vec<(String, String)> = parsed
                    .headers
                    .iter()
                    .map(|h| {
                        let value = String::from_utf8_lossy(h.value);
                        (h.name.to_string(), trim_ows(&value).to_string())
                    })
                    .collect();
                let kept: Vec<(String, String)> = req
                    .fields()
                    .map(|(n, v)| (n.to_string(), v.to_string()))
                    .collect();
                prop_assert_eq!(kept, owned);
            }
        }

        /// The key check decodes into a buffer on the stack; it accepts exactly the keys a
        /// decode into a `Vec` of 16 bytes accepts: the base64 of 15 to 18 bytes (20 or 24
        /// characters, padded or not), maybe with one character replaced by one from the
        /// alphabet, padding or a stray.
        #[test]
        fn key_check_matches_a_plain_decode(
            nonce in proptest::collection::vec(any::<u8>(), 15..=18),
            replace in proptest::option::of((0..24_usize, "[A-Za-z0-9+/=_ -]")),
        ) {
            let mut key = BASE64.encode(nonce);
            if let Some((at, with)) = replace {
                let at = at % key.len();
                key.replace_range(at..=at, &with);
            }
            let plain = key.len() == 24 && BASE64.decode(&key).is_ok_and(|bytes| bytes.len() == 16);
            prop_assert_eq!(is_valid_key(&key), plain);
        }

        /// Near-valid requests reach deeper than random bytes: mutate one byte of a real one.
        #[test]
        fn mutated_requests_hold_the_invariants(at in 0..BROWSER.len(), byte in any::<u8>()) {
            let mut data = BROWSER.as_bytes().to_vec();
            data[at] = byte;
            fuzz_check(&data);
        }
    }
}
