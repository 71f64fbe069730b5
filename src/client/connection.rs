//! One WebSocket connection of the client: TCP connect (and TLS for `wss://`), the opening
//! handshake, masked frames out, and a reader thread that turns received bytes into events.
//!
//! Owns: `connect` (resolve, connect, upgrade, check the 101), `Connection` (writes frames, each
//! masked with a fresh key), the reader thread, `LinkEvent` and `ConnectError`.
//! Does not: decide what to send, when to ping or when to reconnect (`session.rs`), speak TLS
//! (`wire.rs` does, under everything here), or parse HTTP and frames itself:
//! `protocol::client_handshake` and `protocol::decoder::FrameReader` (the server's reader, in
//! the client role) do.
//!
//! SPEC §4 (client role: "a random mask key per frame"), §7; RFC 6455 §4.1 (the client's
//! handshake), §5.3 (masking).
//!
//! Blocking I/O on purpose: the client has one connection at a time, so a thread that sleeps in
//! `read` is simpler to follow than a readiness loop. The session thread writes; the reader
//! thread owns a clone of the socket and the `FrameReader`, and reports through a callback.
//! `Connection::shutdown` (also run on drop) wakes a reader blocked in `read`, so no thread
//! outlives its connection for long.

use super::wire::{Wire, WireReader};
use crate::protocol::client_handshake::{
    key_from_nonce, parse_response_with_offer, upgrade_request_with_headers, ClientHandshakeError,
    WsUrl,
};
use crate::protocol::decoder::{FrameReader, Input, OwnedEvent};
use crate::protocol::deflate::{CompressionConfig, DeflateOffer, Deflater, Inflater};
use crate::protocol::frame::{self, OpCode, Role};
use crate::protocol::message::Event;
use crate::protocol::{CloseCode, ProtocolError};
use rustls::ClientConfig;
use std::fmt;
use std::io::{self, Read};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Time for TCP connect to one address.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Time for the TLS handshake, and then again for the server's 101 to arrive after the
/// request is sent.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A write that makes no progress this long means the server (or the path to it) is stuck:
/// the connection is treated as lost, so the session thread is never blocked for good.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest message the client accepts. Relayed messages are bounded by the server's
/// `--max-message` (1 MiB by default) plus the envelope; this leaves room for servers run with
/// a larger limit while still bounding memory.
pub const MAX_MESSAGE: usize = 16 << 20;

/// What the reader thread reports.
#[derive(Debug, PartialEq)]
pub enum LinkEvent {
    /// A message, Ping, Pong or Close from the server.
    Frame(OwnedEvent),
    /// The server broke RFC 6455; the connection must be failed with this error's close code.
    Protocol(ProtocolError),
    /// The connection ended (EOF or an I/O error); the text says how.
    Lost(String),
}

/// Why a connection attempt failed.
#[derive(Debug)]
pub enum ConnectError {
    /// The host name did not resolve.
    Resolve(io::Error),
    /// It resolved to no address at all.
    NoAddress,
    /// TCP connect failed (refused, unreachable, timed out) on every address.
    Connect(io::Error),
    /// The TLS handshake of a `wss://` URL failed (an `InvalidData` error carrying the
    /// `rustls::Error` when TLS itself refused: an untrusted certificate, say).
    Tls(io::Error),
    /// Writing the request or reading the answer failed.
    Io(io::Error),
    /// The server hung up before a complete answer.
    ClosedEarly,
    /// No complete answer within `HANDSHAKE_TIMEOUT`.
    Timeout,
    /// The answer was not an acceptable 101.
    Handshake(ClientHandshakeError),
}

impl ConnectError {
    /// A refusal that trying again will not change: a 4xx answer to the upgrade (401 and 403
    /// above all: a missing or bad token, a forbidden origin; SPEC §7 "A 401/403 is final").
    /// 408 and 429 say "later" and are retried, like 5xx (503: the server is full).
    /// A certificate the client does not accept is final too: trying again meets the same
    /// certificate.
    pub fn is_final(&self) -> bool {
        match self {
            ConnectError::Handshake(ClientHandshakeError::Status(code)) => {
                (400..500).contains(code) && *code != 408 && *code != 429
            }
            ConnectError::Tls(e) => {
                matches!(rustls_error(e), Some(rustls::Error::InvalidCertificate(_)))
            }
            _ => false,
        }
    }
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectError::Resolve(e) => write!(f, "cannot resolve the host name: {e}"),
            ConnectError::NoAddress => f.write_str("the host name has no address"),
            ConnectError::Connect(e) => f.write_str(&describe(e)),
            ConnectError::Tls(e) => match rustls_error(e) {
                Some(rustls::Error::InvalidCertificate(reason)) => write!(
                    f,
                    "TLS: the server's certificate is not accepted ({reason:?}); \
                     --ca FILE trusts a private CA"
                ),
                Some(tls) => write!(f, "TLS handshake failed: {tls}"),
                None => write!(f, "during the TLS handshake: {}", describe(e)),
            },
            ConnectError::Io(e) => write!(f, "during the handshake: {}", describe(e)),
            ConnectError::ClosedEarly => {
                f.write_str("the server closed the connection during the handshake")
            }
            ConnectError::Timeout => write!(
                f,
                "no answer to the upgrade request within {}s",
                HANDSHAKE_TIMEOUT.as_secs()
            ),
            ConnectError::Handshake(ClientHandshakeError::Status(401)) => {
                f.write_str("HTTP 401 Unauthorized: the relay needs a valid token (--token)")
            }
            ConnectError::Handshake(ClientHandshakeError::Status(403)) => f.write_str(
                "HTTP 403 Forbidden: the relay refuses this client (token, origin or room)",
            ),
            ConnectError::Handshake(e) => f.write_str(&e.to_string()),
        }
    }
}

impl std::error::Error for ConnectError {}

/// The TLS error inside an I/O error, if that is what it carries.
fn rustls_error(e: &io::Error) -> Option<&rustls::Error> {
    e.get_ref().and_then(|inner| inner.downcast_ref())
}

/// An I/O error in a few words, without the "(os error 111)" noise.
fn describe(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "connection refused".to_string(),
        io::ErrorKind::ConnectionReset => "connection reset by the server".to_string(),
        io::ErrorKind::ConnectionAborted => "connection aborted".to_string(),
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => "timed out".to_string(),
        io::ErrorKind::BrokenPipe => "the server closed the connection".to_string(),
        io::ErrorKind::UnexpectedEof => "the server closed the connection".to_string(),
        _ => e.to_string(),
    }
}

/// An open WebSocket connection; its reader thread runs until the socket is shut down.
#[derive(Debug)]
pub struct Connection {
    wire: Wire,
    /// When the handshake completed.
    pub opened_at: Instant,
    /// The compressor, when the server accepted permessage-deflate.
    deflater: Option<Deflater>,
}

/// Connects to `url`, requests `resource` with the `extra` header fields, and checks the 101.
/// A `wss://` URL needs `tls`, the client's TLS configuration (ignored for `ws://`). On success
/// the reader thread is running and reports every event through `on_event`, which returns
/// `false` once nobody listens any more (then the thread ends).
///
/// # Errors
/// A `ConnectError` naming the step that failed.
pub fn connect(
    url: &WsUrl,
    tls: Option<&Arc<ClientConfig>>,
    resource: &str,
    extra: &[(&str, &str)],
    on_event: impl FnMut(LinkEvent) -> bool + Send + 'static,
) -> Result<Connection, ConnectError> {
    let stream = open_tcp(url)?;
    // The client sends small frames (typed lines); Nagle's algorithm would only delay them.
    stream.set_nodelay(true).map_err(ConnectError::Io)?;
    stream
        .set_write_timeout(Some(WRITE_TIMEOUT))
        .map_err(ConnectError::Io)?;
    let tls = match (url.secure, tls) {
        (false, _) => None,
        (true, Some(config)) => Some(config),
        (true, None) => {
            let missing = io::Error::other("no TLS configuration for a wss:// URL");
            return Err(ConnectError::Tls(missing));
        }
    };
    let mut wire =
        Wire::open(stream, tls, &url.host, HANDSHAKE_TIMEOUT).map_err(ConnectError::Tls)?;

    // RFC 6455 §4.1: "a randomly selected 16-byte value", new for every connection.
    let key = key_from_nonce(fastrand::u128(..).to_ne_bytes());
    // permessage-deflate (SPEC §17), offered as browsers do, without context takeover so that
    // each message stands alone and the codecs keep nothing between messages. Over `wss://`
    // it sits above TLS, exactly as over `ws://`.
    let offer = DeflateOffer::NO_CONTEXT_TAKEOVER;
    let offer_value = offer.header_value();
    let mut headers = extra.to_vec();
    headers.push(("Sec-WebSocket-Extensions", offer_value.as_str()));
    let request = upgrade_request_with_headers(&url.host_header(), resource, &key, &headers);
    wire.write_all(&request).map_err(ConnectError::Io)?;
    let mut reader = wire.reader().map_err(ConnectError::Io)?;
    let (rest, compressed) = read_response(&mut reader, &key, &offer)?;

    // From here on the reader blocks in `read` without a timeout: silence is normal on an idle
    // connection, and the heartbeat (SPEC §7) is what detects a dead one.
    reader.set_read_timeout(None).map_err(ConnectError::Io)?;
    std::thread::Builder::new()
        .name("wsrelay-client-reader".into())
        .spawn(move || read_loop(reader, &rest, compressed, on_event))
        .map_err(ConnectError::Io)?;
    Ok(Connection {
        wire,
        opened_at: Instant::now(),
        deflater: compressed.then(|| Deflater::new(15, false)),
    })
}

/// TCP connect to the first address of `url` that answers.
fn open_tcp(url: &WsUrl) -> Result<TcpStream, ConnectError> {
    let addrs: Vec<SocketAddr> = (url.host.as_str(), url.port)
        .to_socket_addrs()
        .map_err(ConnectError::Resolve)?
        .collect();
    let mut last_error = None;
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
            Ok(stream) => return Ok(stream),
            Err(e) => last_error = Some(e),
        }
    }
    Err(last_error.map_or(ConnectError::NoAddress, ConnectError::Connect))
}

/// Reads until `parse_response_with_offer` decides; returns the bytes that followed the head
/// (frames the server sent right behind its 101, which belong to the WebSocket stream) and
/// whether the server accepted permessage-deflate.
fn read_response(
    stream: &mut WireReader,
    key: &str,
    offer: &DeflateOffer,
) -> Result<(Vec<u8>, bool), ConnectError> {
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match parse_response_with_offer(&buf, key, Some(offer)) {
            Ok(Some(accepted)) => return Ok((accepted.rest.to_vec(), accepted.deflate.is_some())),
            Ok(None) => {}
            Err(e) => return Err(ConnectError::Handshake(e)),
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ConnectError::Timeout);
        }
        stream
            .set_read_timeout(Some(left))
            .map_err(ConnectError::Io)?;
        match stream.read(&mut chunk) {
            Ok(0) => return Err(ConnectError::ClosedEarly),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(ConnectError::Timeout)
            }
            Err(e) => return Err(ConnectError::Io(e)),
        }
    }
}

/// The reader thread: bytes from the socket into the client-role reader, events out, until
/// EOF, an error, or nobody listening.
fn read_loop(
    mut stream: WireReader,
    rest: &[u8],
    compressed: bool,
    mut on_event: impl FnMut(LinkEvent) -> bool,
) {
    // RFC 6455 §5.1: in the client role, a masked frame from the server is an error.
    let mut reader = FrameReader::new(Role::Client, MAX_MESSAGE);
    // With permessage-deflate agreed, RSV1 marks a compressed message (RFC 7692 §6); the
    // decompressor exists from the first one on, and is reset after each (no context takeover).
    let mut inflater = None;
    if compressed {
        reader.allow_rsv1();
    }
    let mut link = Link {
        reader: &mut reader,
        inflater: &mut inflater,
    };
    // Frames the server sent right behind its 101 come first.
    if !link.report_events(&mut rest.to_vec(), &mut on_event) {
        return;
    }
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => {
                on_event(LinkEvent::Lost("the server closed the connection".into()));
                return;
            }
            Ok(n) => {
                if !link.report_events(&mut buf[..n], &mut on_event) {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                on_event(LinkEvent::Lost(describe(&e)));
                return;
            }
        }
    }
}

/// What the reader thread reads with: the frame reader, and the decompressor once needed.
struct Link<'a> {
    reader: &'a mut FrameReader,
    inflater: &'a mut Option<Inflater>,
}

impl Link<'_> {
    /// Reports every event in `bytes`, compressed messages inflated (bounded by the same
    /// `MAX_MESSAGE`, RFC 7692 §7.2.2). Returns false when the reader thread should end: nobody
    /// listens any more, or the server broke the protocol.
    fn report_events(
        &mut self,
        bytes: &mut [u8],
        on_event: &mut impl FnMut(LinkEvent) -> bool,
    ) -> bool {
        let mut input = Input::new(bytes);
        loop {
            let event = match self.reader.next_event(&mut input) {
                Ok(Some(Event::Message {
                    opcode,
                    data,
                    compressed: true,
                })) => inflate(self.inflater, opcode, &data),
                Ok(Some(event)) => Ok(event.into()),
                Ok(None) => return true,
                Err(e) => Err(e),
            };
            match event {
                Ok(event) => {
                    if !on_event(LinkEvent::Frame(event)) {
                        return false;
                    }
                }
                Err(e) => {
                    on_event(LinkEvent::Protocol(e));
                    return false;
                }
            }
        }
    }
}

/// A compressed message, inflated and (for text) checked as UTF-8.
fn inflate(
    inflater: &mut Option<Inflater>,
    opcode: OpCode,
    compressed: &[u8],
) -> Result<OwnedEvent, ProtocolError> {
    let inflater = inflater.get_or_insert_with(|| Inflater::new(15, false));
    let mut data = Vec::new();
    inflater.inflate_message(compressed, &mut data, MAX_MESSAGE)?;
    if opcode == OpCode::Text && std::str::from_utf8(&data).is_err() {
        return Err(ProtocolError::InvalidUtf8);
    }
    Ok(OwnedEvent::Message { opcode, data })
}

impl Connection {
    /// Writes one unfragmented frame, masked with a fresh key.
    ///
    /// # Errors
    /// The write's I/O error (including a timeout after `WRITE_TIMEOUT`): the connection is
    /// then unusable.
    pub fn send(&mut self, opcode: OpCode, payload: &[u8]) -> io::Result<()> {
        // RFC 6455 §5.3: each frame gets a new masking key the server cannot predict. It exists
        // so that script-chosen bytes cannot pose as another protocol to a proxy on the path.
        // fastrand (wyrand, seeded from the OS per thread) is not a cryptographic generator;
        // the RFC asks for "a strong source of entropy", which matters against hostile scripts
        // in a browser, not for a command-line user who chooses every byte anyway.
        let key = fastrand::u32(..).to_ne_bytes();
        // permessage-deflate, when agreed: data messages from `--compression-min`'s default
        // size up go compressed (SPEC §17), the rest as they are (RSV1 is per message).
        let data = matches!(opcode, OpCode::Text | OpCode::Binary);
        let worth_it = payload.len() >= CompressionConfig::default().min_bytes;
        if let Some(deflater) = self.deflater.as_mut().filter(|_| data && worth_it) {
            let mut compressed = Vec::new();
            if deflater.compress(payload, &mut compressed).is_ok() {
                let mut out = Vec::with_capacity(compressed.len() + 14);
                frame::encode_compressed_into(&mut out, opcode, &compressed, Some(key));
                return self.wire.write_all(&out);
            }
        }
        self.wire
            .write_all(&frame::encode(true, opcode, payload, Some(key)))
    }

    /// Sends a Close frame with `code` (RFC 6455 §5.5.1), or an empty one for `None`.
    ///
    /// # Errors
    /// As `send`.
    pub fn send_close(&mut self, code: Option<CloseCode>) -> io::Result<()> {
        let payload = code.map_or_else(Vec::new, |code| frame::close_payload(code, ""));
        self.send(OpCode::Close, &payload)
    }

    /// Shuts both directions: the reader thread's `read` returns and the thread ends.
    pub fn shutdown(&self) {
        self.wire.shutdown();
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn final_refusals() {
        use ClientHandshakeError::*;
        let cases: Vec<(&str, ConnectError, bool)> = vec![
            ("401", ConnectError::Handshake(Status(401)), true),
            ("403", ConnectError::Handshake(Status(403)), true),
            ("404", ConnectError::Handshake(Status(404)), true),
            ("408", ConnectError::Handshake(Status(408)), false),
            ("429", ConnectError::Handshake(Status(429)), false),
            ("503", ConnectError::Handshake(Status(503)), false),
            ("bad accept", ConnectError::Handshake(WrongAccept), false),
            (
                "refused",
                ConnectError::Connect(io::ErrorKind::ConnectionRefused.into()),
                false,
            ),
            ("timeout", ConnectError::Timeout, false),
            ("closed", ConnectError::ClosedEarly, false),
        ];
        for (name, error, want) in cases {
            assert_eq!(error.is_final(), want, "{name}");
        }
    }

    #[test]
    fn messages_are_one_line() {
        let errors = [
            ConnectError::Connect(io::ErrorKind::ConnectionRefused.into()),
            ConnectError::Handshake(ClientHandshakeError::Status(401)),
            ConnectError::Handshake(ClientHandshakeError::Status(404)),
            ConnectError::Timeout,
            ConnectError::NoAddress,
        ];
        for e in errors {
            let text = e.to_string();
            assert!(!text.is_empty() && !text.contains('\n'), "{text:?}");
        }
        assert_eq!(
            ConnectError::Connect(io::ErrorKind::ConnectionRefused.into()).to_string(),
            "connection refused"
        );
    }
}
