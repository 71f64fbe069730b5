//! Negotiation of permessage-deflate: `Sec-WebSocket-Extensions` offers in, the agreed
//! parameters and the response header value out.
//!
//! Owns: parsing the header grammar of RFC 6455 §9.1 (several elements and header lines, quoted
//! values), the meaning and validity of the four parameters of RFC 7692 §7.1
//! (`DeflateOffer`), the server's choice among offers for a `CompressionConfig` (`negotiate`),
//! the client's offer and its check of the server's answer (`accept_response`), and the agreed
//! parameters (`DeflateParams`) that the codec is built from.
//! Does not: compress or decompress (`codec.rs`), write the 101 (`handshake.rs`) or keep any
//! state per connection.
//!
//! RFC 7692 §5 (negotiation), §7.1 (parameters); SPEC §17.
//!
//! Decisions where the RFC leaves room:
//! * An offer the server cannot honour is *declined*, never refused: the next offer is tried,
//!   and when none is left the 101 simply carries no extension (RFC 7692 §5.1). A syntax error
//!   declines the one list element it is in; a quoted string that never closes swallows the rest
//!   of its header line, which is then one broken element.
//! * `server_max_window_bits=8`: zlib (and so zlib-rs) refuses an 8-bit window for raw deflate
//!   and raises it to 9. That is still honest: zlib's compressor never refers further back
//!   than the window minus 262 bytes of lookahead, 250 bytes for a 9-bit window, which fits
//!   the 256 bytes the peer asked for. So the offer is accepted with `server_max_window_bits=8`
//!   and compressed with a 9-bit window, as Node's `ws` does; a test checks the claim with an
//!   8-bit inflater. Our inflater never needs 8: a larger window reads a smaller one's output.
//! * `shared` mode always answers `server_no_context_takeover` (one compressor per reactor,
//!   reset after each message) and `client_no_context_takeover` (RFC 7692 §7.1.1.2 lets the
//!   server ask for it even when not offered), so an idle connection holds no zlib state.
//! * `dedicated` mode keeps context takeover both ways and bounds both windows by
//!   `--compression-window`: the client's window through `client_max_window_bits` when the
//!   offer allows it, else, when the bound is below 15, through `client_no_context_takeover`.

use super::{CompressionConfig, CompressionMode, MAX_WINDOW_BITS, MIN_WINDOW_BITS};
use crate::protocol::frame::Role;
use std::fmt;

/// The extension token (RFC 7692 §7; IANA WebSocket Extension Name Registry).
pub const EXTENSION_NAME: &str = "permessage-deflate";

/// `client_max_window_bits` in an offer: RFC 7692 §7.1.2.2 lets it come without a value
/// ("I can limit my window, you choose") or with one ("and I will use at most this").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientWindowOffer {
    /// Not in the offer: the server must not mention it in its response.
    Absent,
    /// Present without a value.
    Any,
    /// Present with a value from 8 to 15.
    AtMost(u8),
}

/// One valid permessage-deflate offer (RFC 7692 §7.1), as a client sends it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeflateOffer {
    /// The client asks the server to reset its compressor after every message (§7.1.1.1).
    pub server_no_context_takeover: bool,
    /// The client tells that it will reset its own compressor after every message (§7.1.1.2).
    pub client_no_context_takeover: bool,
    /// The largest window, in bits, the client lets the server compress with (§7.1.2.1).
    pub server_max_window_bits: Option<u8>,
    /// Whether and how the client lets the server limit the client's window (§7.1.2.2).
    pub client_max_window_bits: ClientWindowOffer,
}

impl DeflateOffer {
    /// The offer browsers send: `permessage-deflate; client_max_window_bits`.
    pub const BROWSER: DeflateOffer = DeflateOffer {
        server_no_context_takeover: false,
        client_no_context_takeover: false,
        server_max_window_bits: None,
        client_max_window_bits: ClientWindowOffer::Any,
    };

    /// The offer of wsrelay's own client and bench: no context takeover either way (RFC 7692
    /// §7.1.1), so one compressor and one decompressor can serve any number of connections,
    /// and each message stands alone. A server that accepts must echo
    /// `server_no_context_takeover` (§7.1.1.1; `accept_response` checks it).
    pub const NO_CONTEXT_TAKEOVER: DeflateOffer = DeflateOffer {
        server_no_context_takeover: true,
        client_no_context_takeover: true,
        server_max_window_bits: None,
        client_max_window_bits: ClientWindowOffer::Absent,
    };

    /// Reads an offer's parameters.
    ///
    /// # Errors
    /// `UnknownParameter`, `DuplicateParameter`, `UnexpectedValue` (a value on one of the two
    /// `no_context_takeover` flags), `MissingValue` (`server_max_window_bits` without one) and
    /// `BadWindowBits` (not a decimal from 8 to 15 without leading zeros): RFC 7692 §5.1 says to
    /// decline such an offer.
    pub fn from_params(params: &[Param<'_>]) -> Result<DeflateOffer, ExtensionError> {
        let seen = Seen::check(params)?;
        Ok(DeflateOffer {
            server_no_context_takeover: flag(seen.server_no_context_takeover)?,
            client_no_context_takeover: flag(seen.client_no_context_takeover)?,
            server_max_window_bits: match seen.server_max_window_bits {
                None => None,
                Some(value) => Some(window_bits(value)?),
            },
            client_max_window_bits: match seen.client_max_window_bits {
                None => ClientWindowOffer::Absent,
                Some(None) => ClientWindowOffer::Any,
                Some(Some(text)) => ClientWindowOffer::AtMost(window_bits(Some(text))?),
            },
        })
    }

    /// The `Sec-WebSocket-Extensions` value a client sends for this offer.
    pub fn header_value(&self) -> String {
        let mut out = String::from(EXTENSION_NAME);
        if self.server_no_context_takeover {
            out.push_str("; server_no_context_takeover");
        }
        if self.client_no_context_takeover {
            out.push_str("; client_no_context_takeover");
        }
        if let Some(bits) = self.server_max_window_bits {
            out.push_str(&format!("; server_max_window_bits={bits}"));
        }
        match self.client_max_window_bits {
            ClientWindowOffer::Absent => {}
            ClientWindowOffer::Any => out.push_str("; client_max_window_bits"),
            ClientWindowOffer::AtMost(bits) => {
                out.push_str(&format!("; client_max_window_bits={bits}"))
            }
        }
        out
    }
}

/// What both ends agreed on, exactly as the server's response states it (RFC 7692 §7.1). A
/// window that the response does not name is 15 bits, the RFC's default.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeflateParams {
    /// The server resets its compressor after every message.
    pub server_no_context_takeover: bool,
    /// The client resets its compressor after every message.
    pub client_no_context_takeover: bool,
    /// The server's window, if the response names one.
    pub server_max_window_bits: Option<u8>,
    /// The client's window, if the response names one (only when the offer allowed it).
    pub client_max_window_bits: Option<u8>,
}

/// How one direction of a connection compresses: what the sender's compressor and the
/// receiver's decompressor of that direction need to know.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Direction {
    /// The LZ77 window, 8 to 15 bits, as agreed (see the module doc for 8).
    pub window_bits: u8,
    /// The compressor keeps its window from one message to the next, so the decompressor
    /// must too.
    pub context_takeover: bool,
}

impl DeflateParams {
    /// The `Sec-WebSocket-Extensions` value of the server's response.
    pub fn header_value(&self) -> String {
        let mut out = String::from(EXTENSION_NAME);
        if self.server_no_context_takeover {
            out.push_str("; server_no_context_takeover");
        }
        if self.client_no_context_takeover {
            out.push_str("; client_no_context_takeover");
        }
        if let Some(bits) = self.server_max_window_bits {
            out.push_str(&format!("; server_max_window_bits={bits}"));
        }
        if let Some(bits) = self.client_max_window_bits {
            out.push_str(&format!("; client_max_window_bits={bits}"));
        }
        out
    }

    /// The messages the server sends.
    pub fn server_to_client(&self) -> Direction {
        Direction {
            window_bits: self.server_max_window_bits.unwrap_or(MAX_WINDOW_BITS),
            context_takeover: !self.server_no_context_takeover,
        }
    }

    /// The messages the client sends.
    pub fn client_to_server(&self) -> Direction {
        Direction {
            window_bits: self.client_max_window_bits.unwrap_or(MAX_WINDOW_BITS),
            context_takeover: !self.client_no_context_takeover,
        }
    }

    /// The direction we compress in, for our role.
    pub fn outgoing(&self, role: Role) -> Direction {
        match role {
            Role::Server => self.server_to_client(),
            Role::Client => self.client_to_server(),
        }
    }

    /// The direction we decompress, for our role.
    pub fn incoming(&self, role: Role) -> Direction {
        match role {
            Role::Server => self.client_to_server(),
            Role::Client => self.server_to_client(),
        }
    }
}

/// The server's choice: the first valid permessage-deflate offer among the values of every
/// `Sec-WebSocket-Extensions` header of the request, in order, turned into the parameters to
/// answer with. `None` when compression is off or no offer is valid: the 101 then carries no
/// `Sec-WebSocket-Extensions` and frames are never compressed.
pub fn negotiate<'a>(
    header_values: impl IntoIterator<Item = &'a str>,
    config: &CompressionConfig,
) -> Option<DeflateParams> {
    if config.mode == CompressionMode::Off {
        return None;
    }
    header_values
        .into_iter()
        .flat_map(elements)
        .filter_map(|element| match element {
            Ok(ext) if ext.name == EXTENSION_NAME => DeflateOffer::from_params(&ext.params).ok(),
            // Other extensions, and elements we cannot read, are declined without a word.
            _ => None,
        })
        .map(|offer| answer(&offer, config))
        .next()
}

/// The parameters the server answers a valid offer with (see the module doc for the policy).
/// Every valid offer can be honoured, so this never declines.
pub fn answer(offer: &DeflateOffer, config: &CompressionConfig) -> DeflateParams {
    let bound = config.window_bits;
    // §7.1.2.1: answer an offered server_max_window_bits with the same or a smaller value; name
    // a smaller window even when not asked (allowed, and it lets the client allocate less).
    let server_bits = offer.server_max_window_bits.map_or(bound, |b| b.min(bound));
    let server_max_window_bits = (offer.server_max_window_bits.is_some()
        || server_bits < MAX_WINDOW_BITS)
        .then_some(server_bits);
    let shared = config.mode == CompressionMode::Shared;
    // §7.1.1.1: an offered server_no_context_takeover is accepted by echoing it.
    let server_no_context_takeover = shared || offer.server_no_context_takeover;
    let (client_no_context_takeover, client_max_window_bits) = if shared {
        // The decompressor lives only while a message arrives, so its window size matters
        // little and is not limited; a named value would bind nothing we keep.
        (true, None)
    } else {
        match offer.client_max_window_bits {
            // §7.1.2.2: the response may not name a client window the offer did not allow; the
            // only other bound on what an idle connection keeps is no context takeover.
            ClientWindowOffer::Absent => (
                offer.client_no_context_takeover || bound < MAX_WINDOW_BITS,
                None,
            ),
            ClientWindowOffer::Any if bound == MAX_WINDOW_BITS => {
                (offer.client_no_context_takeover, None)
            }
            ClientWindowOffer::Any => (offer.client_no_context_takeover, Some(bound)),
            ClientWindowOffer::AtMost(b) => (offer.client_no_context_takeover, Some(b.min(bound))),
        }
    };
    DeflateParams {
        server_no_context_takeover,
        client_no_context_takeover,
        server_max_window_bits,
        client_max_window_bits,
    }
}

/// The client's check of the server's `Sec-WebSocket-Extensions` answer to our single
/// permessage-deflate `offer` (RFC 6455 §4.1 item 5, RFC 7692 §5.2, §7.1). `header_values`
/// are the values of every such header in the response. `Ok(None)`: the server declined, the
/// connection goes on uncompressed.
///
/// # Errors
/// `Syntax`, `UnknownExtension` (an extension we did not offer), `SeveralResponses` (more than
/// one element), the parameter errors of `DeflateOffer::from_params` (a response may carry a
/// value on `client_max_window_bits` only), and the checks against our offer: `Unrequested`
/// (`client_max_window_bits` when we did not offer it), `MissingParameter` (an offered
/// `server_no_context_takeover` or `server_max_window_bits` not answered), `WindowTooLarge` (a
/// window above the one we offered). Each one means the client must _Fail the WebSocket
/// Connection_.
pub fn accept_response<'a>(
    header_values: impl IntoIterator<Item = &'a str>,
    offer: &DeflateOffer,
) -> Result<Option<DeflateParams>, ExtensionError> {
    let mut accepted = None;
    for element in header_values.into_iter().flat_map(elements) {
        let ext = element?;
        if ext.name != EXTENSION_NAME {
            return Err(ExtensionError::UnknownExtension);
        }
        if accepted.is_some() {
            return Err(ExtensionError::SeveralResponses);
        }
        accepted = Some(check_response(&ext.params, offer)?);
    }
    Ok(accepted)
}

fn check_response(
    params: &[Param<'_>],
    offer: &DeflateOffer,
) -> Result<DeflateParams, ExtensionError> {
    let seen = Seen::check(params)?;
    let server_max_window_bits = match seen.server_max_window_bits {
        None => None,
        Some(value) => Some(window_bits(value)?),
    };
    // §7.1.2.2: in a response client_max_window_bits always has a value.
    let client_max_window_bits = match seen.client_max_window_bits {
        None => None,
        Some(value) => Some(window_bits(value)?),
    };
    let params = DeflateParams {
        server_no_context_takeover: flag(seen.server_no_context_takeover)?,
        client_no_context_takeover: flag(seen.client_no_context_takeover)?,
        server_max_window_bits,
        client_max_window_bits,
    };
    // §7.1.1.1: the server accepts server_no_context_takeover by including it.
    if offer.server_no_context_takeover && !params.server_no_context_takeover {
        return Err(ExtensionError::MissingParameter);
    }
    // §7.1.2.1: ... and server_max_window_bits by including it, with the same or a smaller value.
    if let Some(offered) = offer.server_max_window_bits {
        match params.server_max_window_bits {
            None => return Err(ExtensionError::MissingParameter),
            Some(bits) if bits > offered => return Err(ExtensionError::WindowTooLarge),
            Some(_) => {}
        }
    }
    // §7.1.2.2: the client's window may be named only if offered, and not above an offered value.
    match (offer.client_max_window_bits, params.client_max_window_bits) {
        (ClientWindowOffer::Absent, Some(_)) => return Err(ExtensionError::Unrequested),
        (ClientWindowOffer::AtMost(offered), Some(bits)) if bits > offered => {
            return Err(ExtensionError::WindowTooLarge)
        }
        _ => {}
    }
    Ok(params)
}

/// Why an offer was declined, or why a client refuses the server's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExtensionError {
    /// The header is not `extension *(";" param)` lists of tokens and quoted strings
    /// (RFC 6455 §9.1), or a quoted value is not a token once unquoted.
    Syntax,
    /// A parameter RFC 7692 §7.1 does not define.
    UnknownParameter,
    /// The same parameter twice (RFC 7692 §7: decline / fail).
    DuplicateParameter,
    /// A value on a parameter that takes none (`*_no_context_takeover`).
    UnexpectedValue,
    /// No value on a parameter that needs one.
    MissingValue,
    /// A window size that is not a decimal from 8 to 15 without leading zeros (§7.1.2).
    BadWindowBits,
    /// Client side: the server named an extension we did not offer (RFC 6455 §4.1 item 5).
    UnknownExtension,
    /// Client side: more than one accepted permessage-deflate element.
    SeveralResponses,
    /// Client side: `client_max_window_bits` in the answer when we did not offer it.
    Unrequested,
    /// Client side: an offered `server_no_context_takeover` or `server_max_window_bits` missing
    /// from the answer, so the server did not accept the offer as made.
    MissingParameter,
    /// Client side: a window above the one we offered.
    WindowTooLarge,
}

impl ExtensionError {
    /// Why, in words, for logs and the client's error message.
    pub fn reason(self) -> &'static str {
        match self {
            ExtensionError::Syntax => "malformed Sec-WebSocket-Extensions",
            ExtensionError::UnknownParameter => "unknown permessage-deflate parameter",
            ExtensionError::DuplicateParameter => "permessage-deflate parameter given twice",
            ExtensionError::UnexpectedValue => "value on a no_context_takeover parameter",
            ExtensionError::MissingValue => "window bits parameter without a value",
            ExtensionError::BadWindowBits => "window bits not a number from 8 to 15",
            ExtensionError::UnknownExtension => "an extension we did not offer",
            ExtensionError::SeveralResponses => "permessage-deflate accepted more than once",
            ExtensionError::Unrequested => "client_max_window_bits we did not offer",
            ExtensionError::MissingParameter => "an offered parameter was not accepted",
            ExtensionError::WindowTooLarge => "a window above the one offered",
        }
    }
}

impl fmt::Display for ExtensionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.reason())
    }
}

impl std::error::Error for ExtensionError {}

/// One `name[=value]` of an extension element, the value unquoted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Param<'a> {
    pub name: &'a str,
    pub value: Option<String>,
}

/// One element of an extension list: a name and its parameters, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Extension<'a> {
    pub name: &'a str,
    pub params: Vec<Param<'a>>,
}

/// The elements of one header value, each parsed or refused on its own.
///
/// RFC 6455 §9.1: `1#extension`, `extension = token *( ";" extension-param )`,
/// `extension-param = token [ "=" (token | quoted-string) ]`, and a quoted value must be a
/// token once unescaped. RFC 7230 §7: empty list elements are ignored and optional whitespace
/// surrounds the separators.
pub fn elements(value: &str) -> impl Iterator<Item = Result<Extension<'_>, ExtensionError>> {
    split_outside_quotes(value, b',')
        .into_iter()
        .map(trim_ows)
        .filter(|element| !element.is_empty())
        .map(parse_element)
}

fn parse_element(element: &str) -> Result<Extension<'_>, ExtensionError> {
    let mut parts = split_outside_quotes(element, b';')
        .into_iter()
        .map(trim_ows);
    let name = parts.next().unwrap_or_default();
    if !is_token(name) {
        return Err(ExtensionError::Syntax);
    }
    let params = parts.map(parse_param).collect::<Result<Vec<_>, _>>()?;
    Ok(Extension { name, params })
}

fn parse_param(param: &str) -> Result<Param<'_>, ExtensionError> {
    let (name, value) = match param.split_once('=') {
        None => (param, None),
        Some((name, value)) => (trim_ows(name), Some(trim_ows(value))),
    };
    if !is_token(name) {
        return Err(ExtensionError::Syntax);
    }
    let value = match value {
        None => None,
        Some(raw) => {
            let unquoted = match raw.strip_prefix('"') {
                Some(quoted) => unquote(quoted)?,
                None => raw.to_string(),
            };
            if !is_token(&unquoted) {
                return Err(ExtensionError::Syntax);
            }
            Some(unquoted)
        }
    };
    Ok(Param { name, value })
}

/// The content of a quoted string whose opening quote is already stripped: backslash escapes
/// resolved (RFC 7230 §3.2.6), and nothing allowed after the closing quote.
fn unquote(rest: &str) -> Result<String, ExtensionError> {
    let mut out = String::new();
    let mut chars = rest.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.push(chars.next().ok_or(ExtensionError::Syntax)?),
            '"' if chars.as_str().is_empty() => return Ok(out),
            '"' => return Err(ExtensionError::Syntax),
            c => out.push(c),
        }
    }
    // No closing quote.
    Err(ExtensionError::Syntax)
}

/// Splits at `separator` where it is not inside a quoted string (a backslash escapes the next
/// character inside quotes).
fn split_outside_quotes(text: &str, separator: u8) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut in_quotes = false;
    let mut escaped = false;
    for (i, b) in text.bytes().enumerate() {
        if escaped {
            escaped = false;
        } else if in_quotes && b == b'\\' {
            escaped = true;
        } else if b == b'"' {
            in_quotes = !in_quotes;
        } else if b == separator && !in_quotes {
            // `i` is at an ASCII byte, so both slices fall on character boundaries.
            parts.push(text.get(start..i).unwrap_or_default());
            start = i + 1;
        }
    }
    parts.push(text.get(start..).unwrap_or_default());
    parts
}

/// The four parameters of RFC 7692 §7.1, each seen at most once: `None` when absent, else the
/// value it came with.
#[derive(Default)]
struct Seen {
    server_no_context_takeover: Option<Option<String>>,
    client_no_context_takeover: Option<Option<String>>,
    server_max_window_bits: Option<Option<String>>,
    client_max_window_bits: Option<Option<String>>,
}

impl Seen {
    fn check(params: &[Param<'_>]) -> Result<Seen, ExtensionError> {
        let mut seen = Seen::default();
        for param in params {
            // Parameter names are compared exactly, as the RFC spells them.
            let slot = match param.name {
                "server_no_context_takeover" => &mut seen.server_no_context_takeover,
                "client_no_context_takeover" => &mut seen.client_no_context_takeover,
                "server_max_window_bits" => &mut seen.server_max_window_bits,
                "client_max_window_bits" => &mut seen.client_max_window_bits,
                _ => return Err(ExtensionError::UnknownParameter),
            };
            if slot.is_some() {
                return Err(ExtensionError::DuplicateParameter);
            }
            *slot = Some(param.value.clone());
        }
        Ok(seen)
    }
}

/// A flag parameter: present without a value.
fn flag(seen: Option<Option<String>>) -> Result<bool, ExtensionError> {
    match seen {
        None => Ok(false),
        Some(None) => Ok(true),
        Some(Some(_)) => Err(ExtensionError::UnexpectedValue),
    }
}

/// A window size value: RFC 7692 §7.1.2.1, "a decimal integer value without leading zeroes
/// between 8 and 15, inclusive".
fn window_bits(value: Option<String>) -> Result<u8, ExtensionError> {
    let text = value.ok_or(ExtensionError::MissingValue)?;
    let well_formed = !text.is_empty()
        && text.len() <= 2
        && text.bytes().all(|b| b.is_ascii_digit())
        && !text.starts_with('0');
    match text.parse::<u8>() {
        Ok(bits) if well_formed && (MIN_WINDOW_BITS..=MAX_WINDOW_BITS).contains(&bits) => Ok(bits),
        _ => Err(ExtensionError::BadWindowBits),
    }
}

/// RFC 7230 §3.2.6: token = 1*tchar.
fn is_token(s: &str) -> bool {
    let is_tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    !s.is_empty() && s.bytes().all(is_tchar)
}

/// RFC 7230 §3.2.3: optional whitespace is spaces and horizontal tabs.
fn trim_ows(s: &str) -> &str {
    s.trim_matches([' ', '\t'])
}

/// The fuzzing oracle, compiled only for tests and fuzzing builds (`cargo fuzz` passes
/// `--cfg fuzzing`), never into the shipped library.
#[cfg(any(test, fuzzing))]
pub mod fuzz {
    use super::*;

    /// The fuzzing oracle (fuzz/fuzz_targets/extensions.rs, and the corpus replay test).
    ///
    /// `data` is read as header lines (split at `\n`, invalid UTF-8 replaced). Asserts, for every
    /// mode and window: no panic; the answer is the one `answer` gives for the first valid offer;
    /// and a client that sent that offer accepts the answer unchanged. The client's checks of the
    /// same lines as a response never panic either. Unlike the rest of this layer it panics by
    /// design: a failed assertion is the finding.
    pub fn check(data: &[u8]) {
        let text = String::from_utf8_lossy(data);
        let lines: Vec<&str> = text.split('\n').collect();
        let first_offer = lines
            .iter()
            .flat_map(|line| elements(line))
            .filter_map(|element| match element {
                Ok(ext) if ext.name == EXTENSION_NAME => {
                    DeflateOffer::from_params(&ext.params).ok()
                }
                _ => None,
            })
            .next();
        for mode in [
            CompressionMode::Off,
            CompressionMode::Shared,
            CompressionMode::Dedicated,
        ] {
            for window_bits in [MIN_WINDOW_BITS, 12, MAX_WINDOW_BITS] {
                let config = CompressionConfig {
                    mode,
                    window_bits,
                    min_bytes: 0,
                };
                let params = negotiate(lines.iter().copied(), &config);
                let expected = first_offer
                    .filter(|_| mode != CompressionMode::Off)
                    .map(|offer| answer(&offer, &config));
                assert_eq!(params, expected, "{mode} {window_bits}");
                if let (Some(params), Some(offer)) = (params, first_offer) {
                    let value = params.header_value();
                    assert_eq!(accept_response([value.as_str()], &offer), Ok(Some(params)));
                }
            }
        }
        let _ = accept_response(lines.iter().copied(), &DeflateOffer::BROWSER);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::fuzz::check as fuzz_check;
    use super::*;

    const SNCT: &str = "server_no_context_takeover";
    const CNCT: &str = "client_no_context_takeover";

    fn config(mode: CompressionMode, window_bits: u8) -> CompressionConfig {
        CompressionConfig::new(mode, window_bits, 128).unwrap()
    }

    /// The response value the server answers `headers` with, or `None` for no extension.
    fn check(config: &CompressionConfig, headers: &[&str], expected: Option<&str>) {
        let got = negotiate(headers.iter().copied(), config).map(|p| p.header_value());
        assert_eq!(got.as_deref(), expected, "{headers:?} with {config:?}");
    }

    #[test]
    fn shared_mode_answers() {
        let shared = CompressionConfig::default();
        let both = format!("permessage-deflate; {SNCT}; {CNCT}");
        let both = both.as_str();
        #[rustfmt::skip]
        let cases: &[(&[&str], Option<&str>)] = &[
            (&["permessage-deflate"], Some(both)),
            (&["permessage-deflate; client_max_window_bits"], Some(both)),
            (&["permessage-deflate; client_max_window_bits=10"], Some(both)),
            (&["permessage-deflate; server_no_context_takeover; client_no_context_takeover"], Some(both)),
            (&["permessage-deflate; server_max_window_bits=10"],
                Some("permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=10")),
            (&["permessage-deflate; server_max_window_bits=8"],
                Some("permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=8")),
            (&["permessage-deflate; server_max_window_bits=15"],
                Some("permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=15")),
            // Quoted values, unescaped, are tokens (RFC 6455 §9.1).
            (&["permessage-deflate; server_max_window_bits=\"12\""],
                Some("permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=12")),
            (&["permessage-deflate; server_max_window_bits=\"1\\2\""],
                Some("permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=12")),
            // Whitespace around separators, empty list elements.
            (&[" , permessage-deflate ;\tserver_max_window_bits = 9 , "],
                Some("permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=9")),
            // The browser offer; other extensions around it are declined.
            (&["x-webkit-deflate-frame, permessage-deflate; client_max_window_bits"], Some(both)),
            (&["x-webkit-deflate-frame", "permessage-deflate"], Some(both)),
            // A quoted comma or semicolon does not split an element.
            (&["foo; a=\"x,y;z\", permessage-deflate"], Some(both)),
            // The first acceptable offer wins; invalid ones before it are declined.
            (&["permessage-deflate; server_max_window_bits=7, permessage-deflate; server_max_window_bits=11, permessage-deflate"],
                Some("permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=11")),
            (&["permessage-deflate; foo", "permessage-deflate; server_max_window_bits=9"],
                Some("permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=9")),
            // Nothing to accept.
            (&[], None),
            (&[""], None),
            (&["x-webkit-deflate-frame"], None),
            (&["PerMessage-Deflate"], None),
            (&["permessage-deflate; foo"], None),
            (&["permessage-deflate; server_no_context_takeover; server_no_context_takeover"], None),
            (&["permessage-deflate; client_max_window_bits; client_max_window_bits=10"], None),
            (&["permessage-deflate; server_no_context_takeover=1"], None),
            (&["permessage-deflate; client_no_context_takeover=\"\""], None),
            (&["permessage-deflate; server_max_window_bits"], None),
            (&["permessage-deflate; server_max_window_bits="], None),
            (&["permessage-deflate; server_max_window_bits=16"], None),
            (&["permessage-deflate; server_max_window_bits=7"], None),
            (&["permessage-deflate; server_max_window_bits=08"], None),
            (&["permessage-deflate; server_max_window_bits=+9"], None),
            (&["permessage-deflate; server_max_window_bits=abc"], None),
            (&["permessage-deflate; server_max_window_bits=\" 9\""], None),
            (&["permessage-deflate; client_max_window_bits=0"], None),
            (&["permessage-deflate; client_max_window_bits=100"], None),
            (&["permessage-deflate; client_max_window_bits=\"10"], None),
            (&["permessage-deflate; server_max_window_bits=\"10\"x"], None),
            (&["permessage-deflate; Server_No_Context_Takeover"], None),
            (&["permessage-deflate;"], None),
            (&["permessage-deflate; =10"], None),
            (&["permessage deflate"], None),
            // An unterminated quote swallows the rest of its line: one broken element.
            (&["permessage-deflate; client_max_window_bits=\"10, permessage-deflate"], None),
        ];
        for (headers, expected) in cases {
            check(&shared, headers, *expected);
        }
    }

    #[test]
    fn shared_mode_with_a_smaller_window() {
        let shared = config(CompressionMode::Shared, 10);
        let w10 = "permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=10";
        check(&shared, &["permessage-deflate"], Some(w10));
        check(
            &shared,
            &["permessage-deflate; server_max_window_bits=12"],
            Some(w10),
        );
        check(
            &shared,
            &["permessage-deflate; server_max_window_bits=9"],
            Some("permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=9"),
        );
    }

    #[test]
    fn dedicated_mode_answers() {
        let full = config(CompressionMode::Dedicated, 15);
        #[rustfmt::skip]
        let cases: &[(&str, &str)] = &[
            ("permessage-deflate", "permessage-deflate"),
            ("permessage-deflate; client_max_window_bits", "permessage-deflate"),
            ("permessage-deflate; client_max_window_bits=10", "permessage-deflate; client_max_window_bits=10"),
            ("permessage-deflate; server_no_context_takeover", "permessage-deflate; server_no_context_takeover"),
            ("permessage-deflate; client_no_context_takeover", "permessage-deflate; client_no_context_takeover"),
            ("permessage-deflate; server_max_window_bits=9", "permessage-deflate; server_max_window_bits=9"),
        ];
        for (offer, answer) in cases {
            check(&full, &[offer], Some(answer));
        }
        let small = config(CompressionMode::Dedicated, 10);
        #[rustfmt::skip]
        let cases: &[(&str, &str)] = &[
            // The client's window cannot be bounded: it is asked not to take over context.
            ("permessage-deflate", "permessage-deflate; client_no_context_takeover; server_max_window_bits=10"),
            ("permessage-deflate; client_max_window_bits", "permessage-deflate; server_max_window_bits=10; client_max_window_bits=10"),
            ("permessage-deflate; client_max_window_bits=12; server_max_window_bits=9", "permessage-deflate; server_max_window_bits=9; client_max_window_bits=10"),
            ("permessage-deflate; client_max_window_bits=8", "permessage-deflate; server_max_window_bits=10; client_max_window_bits=8"),
        ];
        for (offer, answer) in cases {
            check(&small, &[offer], Some(answer));
        }
    }

    #[test]
    fn off_mode_never_negotiates() {
        let off = config(CompressionMode::Off, 15);
        check(&off, &["permessage-deflate"], None);
        check(&off, &["permessage-deflate; client_max_window_bits"], None);
    }

    #[test]
    fn element_parsing() {
        let parsed: Vec<_> = elements("a, b; x=1; y=\"q\\\"\"; z , ,c;d=\"e,f\"").collect();
        assert_eq!(parsed.len(), 3);
        assert_eq!(
            parsed[0],
            Ok(Extension {
                name: "a",
                params: vec![]
            })
        );
        // `q"` is not a token once unquoted.
        assert_eq!(parsed[1], Err(ExtensionError::Syntax));
        assert_eq!(parsed[2], Err(ExtensionError::Syntax));
        let ok: Vec<_> = elements("b; x=1; y=\"q\"; z").collect();
        assert_eq!(
            ok,
            [Ok(Extension {
                name: "b",
                params: vec![
                    Param {
                        name: "x",
                        value: Some("1".into())
                    },
                    Param {
                        name: "y",
                        value: Some("q".into())
                    },
                    Param {
                        name: "z",
                        value: None
                    },
                ]
            })]
        );
    }

    #[test]
    fn offer_errors_say_why() {
        fn check_offer(params: &str, expected: Result<DeflateOffer, ExtensionError>) {
            let value = format!("permessage-deflate{params}");
            let ext = elements(&value).next().unwrap();
            let got = ext.and_then(|e| DeflateOffer::from_params(&e.params));
            assert_eq!(got, expected, "{params}");
        }
        use ExtensionError::*;
        check_offer("; foo", Err(UnknownParameter));
        check_offer(
            "; server_no_context_takeover; server_no_context_takeover",
            Err(DuplicateParameter),
        );
        check_offer("; client_no_context_takeover=x", Err(UnexpectedValue));
        check_offer("; server_max_window_bits", Err(MissingValue));
        check_offer("; server_max_window_bits=16", Err(BadWindowBits));
        check_offer(
            "; client_no_context_takeover; server_max_window_bits=8; client_max_window_bits=15",
            Ok(DeflateOffer {
                server_no_context_takeover: false,
                client_no_context_takeover: true,
                server_max_window_bits: Some(8),
                client_max_window_bits: ClientWindowOffer::AtMost(15),
            }),
        );
    }

    #[test]
    fn client_offer_values() {
        assert_eq!(
            DeflateOffer::BROWSER.header_value(),
            "permessage-deflate; client_max_window_bits"
        );
        let all = DeflateOffer {
            server_no_context_takeover: true,
            client_no_context_takeover: true,
            server_max_window_bits: Some(10),
            client_max_window_bits: ClientWindowOffer::AtMost(9),
        };
        let value = all.header_value();
        assert_eq!(
            value,
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover; \
             server_max_window_bits=10; client_max_window_bits=9"
        );
        // What we offer, we parse back.
        let ext = elements(&value).next().unwrap().unwrap();
        assert_eq!(DeflateOffer::from_params(&ext.params), Ok(all));
    }

    #[test]
    fn client_checks_the_answer() {
        fn check(
            offer: &DeflateOffer,
            headers: &[&str],
            expected: Result<Option<&str>, ExtensionError>,
        ) {
            let got = accept_response(headers.iter().copied(), offer)
                .map(|p| p.map(|p| p.header_value()));
            assert_eq!(got, expected.map(|o| o.map(str::to_string)), "{headers:?}");
        }
        use ExtensionError::*;
        let browser = DeflateOffer::BROWSER;
        check(&browser, &[], Ok(None));
        check(&browser, &[""], Ok(None));
        check(
            &browser,
            &["permessage-deflate"],
            Ok(Some("permessage-deflate")),
        );
        check(
            &browser,
            &["permessage-deflate; client_max_window_bits=10; server_no_context_takeover"],
            Ok(Some(
                "permessage-deflate; server_no_context_takeover; client_max_window_bits=10",
            )),
        );
        check(
            &browser,
            &["permessage-deflate; server_max_window_bits=8; client_no_context_takeover"],
            Ok(Some(
                "permessage-deflate; client_no_context_takeover; server_max_window_bits=8",
            )),
        );
        check(
            &browser,
            &["permessage-deflate; client_max_window_bits"],
            Err(MissingValue),
        );
        check(
            &browser,
            &["permessage-deflate", "permessage-deflate"],
            Err(SeveralResponses),
        );
        check(
            &browser,
            &["permessage-deflate, x-foo"],
            Err(UnknownExtension),
        );
        check(&browser, &["x-foo"], Err(UnknownExtension));
        check(
            &browser,
            &["permessage-deflate; server_max_window_bits=16"],
            Err(BadWindowBits),
        );
        check(
            &browser,
            &["permessage-deflate; foo=1"],
            Err(UnknownParameter),
        );
        check(&browser, &["permessage-deflate; \"x\""], Err(Syntax));
        let strict = DeflateOffer {
            server_no_context_takeover: true,
            client_no_context_takeover: false,
            server_max_window_bits: Some(10),
            client_max_window_bits: ClientWindowOffer::Absent,
        };
        check(
            &strict,
            &["permessage-deflate; server_no_context_takeover; server_max_window_bits=10"],
            Ok(Some(
                "permessage-deflate; server_no_context_takeover; server_max_window_bits=10",
            )),
        );
        check(
            &strict,
            &["permessage-deflate; server_max_window_bits=10"],
            Err(MissingParameter),
        );
        check(
            &strict,
            &["permessage-deflate; server_no_context_takeover"],
            Err(MissingParameter),
        );
        check(
            &strict,
            &["permessage-deflate; server_no_context_takeover; server_max_window_bits=11"],
            Err(WindowTooLarge),
        );
        check(&strict, &["permessage-deflate; server_no_context_takeover; server_max_window_bits=10; client_max_window_bits=9"], Err(Unrequested));
        let capped = DeflateOffer {
            client_max_window_bits: ClientWindowOffer::AtMost(10),
            ..DeflateOffer::BROWSER
        };
        check(
            &capped,
            &["permessage-deflate; client_max_window_bits=11"],
            Err(WindowTooLarge),
        );
        check(
            &capped,
            &["permessage-deflate; client_max_window_bits=9"],
            Ok(Some("permessage-deflate; client_max_window_bits=9")),
        );
    }

    /// Every valid offer (all 360 of them) against every configuration: the server's answer
    /// passes the client's checks for that offer, stays within the configured window, and in
    /// `shared` mode leaves no zlib state on an idle connection.
    #[test]
    fn every_answer_is_valid_for_its_offer() {
        let windows = || (MIN_WINDOW_BITS..=MAX_WINDOW_BITS).map(Some).chain([None]);
        let client_windows = || {
            (MIN_WINDOW_BITS..=MAX_WINDOW_BITS)
                .map(ClientWindowOffer::AtMost)
                .chain([ClientWindowOffer::Absent, ClientWindowOffer::Any])
        };
        let mut offers = Vec::new();
        for snct in [false, true] {
            for cnct in [false, true] {
                for server in windows() {
                    for client in client_windows() {
                        offers.push(DeflateOffer {
                            server_no_context_takeover: snct,
                            client_no_context_takeover: cnct,
                            server_max_window_bits: server,
                            client_max_window_bits: client,
                        });
                    }
                }
            }
        }
        assert_eq!(offers.len(), 360);
        for mode in [CompressionMode::Shared, CompressionMode::Dedicated] {
            for bound in MIN_WINDOW_BITS..=MAX_WINDOW_BITS {
                let config = config(mode, bound);
                for offer in &offers {
                    let params = negotiate([offer.header_value().as_str()], &config)
                        .unwrap_or_else(|| panic!("{offer:?} declined"));
                    let value = params.header_value();
                    assert_eq!(
                        accept_response([value.as_str()], offer),
                        Ok(Some(params)),
                        "{offer:?} {config:?}: {value}"
                    );
                    assert!(params.server_to_client().window_bits <= bound);
                    let client = params.client_to_server();
                    match mode {
                        CompressionMode::Shared => {
                            assert!(!params.server_to_client().context_takeover);
                            assert!(!client.context_takeover);
                        }
                        _ => assert!(!client.context_takeover || client.window_bits <= bound),
                    }
                }
            }
        }
    }

    /// Replays the checked-in fuzz corpus so stable CI keeps every finding fixed.
    #[test]
    fn fuzz_corpus_replays() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/extensions");
        let mut replayed = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            fuzz_check(&std::fs::read(entry.unwrap().path()).unwrap());
            replayed += 1;
        }
        assert!(replayed > 0, "no corpus in {}", dir.display());
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_headers_hold_the_invariants(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            fuzz_check(&data);
        }

        /// Near-valid headers reach deeper: pieces of real offers, shuffled together.
        #[test]
        fn assembled_headers_hold_the_invariants(
            pieces in proptest::collection::vec(0usize..PIECES.len(), 0..12)
        ) {
            let text: String = pieces.iter().map(|&i| PIECES[i]).collect();
            fuzz_check(text.as_bytes());
        }
    }

    const PIECES: &[&str] = &[
        "permessage-deflate",
        "x-webkit-deflate-frame",
        "; ",
        ";",
        ", ",
        ",",
        "\n",
        " ",
        "\"",
        "=",
        "server_no_context_takeover",
        "client_no_context_takeover",
        "server_max_window_bits",
        "client_max_window_bits",
        "8",
        "9",
        "10",
        "15",
        "16",
        "07",
        "\"12\"",
        "\\",
    ];

    #[test]
    fn directions_follow_the_role() {
        let params = DeflateParams {
            server_no_context_takeover: true,
            client_no_context_takeover: false,
            server_max_window_bits: Some(9),
            client_max_window_bits: None,
        };
        let server = Direction {
            window_bits: 9,
            context_takeover: false,
        };
        let client = Direction {
            window_bits: 15,
            context_takeover: true,
        };
        assert_eq!(params.outgoing(Role::Server), server);
        assert_eq!(params.incoming(Role::Client), server);
        assert_eq!(params.outgoing(Role::Client), client);
        assert_eq!(params.incoming(Role::Server), client);
    }
}
