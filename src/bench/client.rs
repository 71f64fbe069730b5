//! One connection of the load generator: a WebSocket client over a non-blocking mio socket,
//! with TLS (`tls::TlsSession`) in between for `wss://`.
//!
//! Owns: the non-blocking connect (bound first to a chosen source address when asked), sending
//! the upgrade request and checking the 101 (`protocol::client_handshake`), encoding masked
//! frames into one outbound buffer and writing it, reading the server's frames (the server's
//! `FrameReader`, in `Role::Client`, straight out of the worker's read buffer), answering Pings, and both directions of the close
//! handshake.
//! Does not: decide what to send or when (the worker does), count or time anything, or own the
//! poller (the worker registers `stream_mut()` under its own token).
//!
//! SPEC §4 (client role), §11; RFC 6455 §4.1, §5.1 and §5.3 (a client masks every frame, with a
//! fresh unpredictable key), §5.5, §7.1.

use crate::protocol::client_handshake::{self, ClientHandshakeError};
use crate::protocol::decoder::{FrameReader, Input};
use crate::protocol::deflate::{DeflateOffer, Deflater, Inflater};
use crate::protocol::frame::{self, OpCode, Role};
use crate::protocol::message::Event;
use crate::protocol::{CloseCode, ProtocolError};
use crate::tls::{self, TlsSession};
use mio::net::TcpStream;
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

/// The largest message the decoder accepts from the server. Only a bound on memory: the bench
/// itself sends at most this much (checked when the flags are read).
pub const MAX_MESSAGE: usize = 16 << 20;

/// A worker's permessage-deflate codecs, shared by its connections: `wsrelay bench
/// --compression` offers `DeflateOffer::NO_CONTEXT_TAKEOVER`, so no connection needs its own. Each
/// is created when first used, so a run without `--compression` allocates no zlib state.
#[derive(Default)]
pub struct Codec {
    deflater: Option<Deflater>,
    inflater: Option<Inflater>,
    /// The compressed payload being built.
    compressed: Vec<u8>,
    /// The message being inflated.
    inflated: Vec<u8>,
}

impl Codec {
    pub fn new() -> Codec {
        Codec::default()
    }
}

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// The TCP connect is in progress.
    Connecting,
    /// The upgrade request is sent (or queued); waiting for the 101.
    Handshaking,
    /// Frames flow both ways.
    Open,
    /// Our Close is sent (or the server's answered); waiting for the other Close, then for the
    /// server to close TCP (RFC 6455 §7.1.1: the server closes first).
    Closing { received: bool },
}

/// Why a connection ended badly. The worker counts these; nothing here panics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    Connect,
    /// The answer was not a valid 101; `None` when the server hung up before answering.
    Handshake(Option<ClientHandshakeError>),
    Timeout,
    Protocol(ProtocolError),
    /// The server sent Close (with this code, if any) while we were using the connection.
    ServerClosed(Option<CloseCode>),
    Disconnected,
    /// The TLS session failed (`wss://`), for this reason.
    Tls(tls::Failure),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Connect => f.write_str("TCP connect failed"),
            Failure::Handshake(Some(e)) => write!(f, "handshake failed: {e}"),
            Failure::Handshake(None) => {
                f.write_str("the server hung up before answering the upgrade")
            }
            Failure::Timeout => f.write_str("deadline passed"),
            Failure::Protocol(e) => write!(f, "protocol error from the server: {e}"),
            Failure::ServerClosed(Some(code)) => {
                write!(f, "the server closed the connection ({code})")
            }
            Failure::ServerClosed(None) => f.write_str("the server closed the connection"),
            Failure::Disconnected => f.write_str("the connection was reset or hung up"),
            Failure::Tls(tls::Failure::Certificate) => f.write_str(
                "TLS: the server's certificate is not accepted (--ca FILE trusts a private CA)",
            ),
            Failure::Tls(reason) => write!(f, "TLS failed ({})", reason.reason()),
        }
    }
}

/// What one `on_ready` call ended with, when it did not fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Still going (whatever it is doing).
    Pending,
    /// The close handshake is complete and the server closed TCP: a clean end.
    Closed,
}

/// What a `wss://` connection needs: the client configuration (`--ca`, `--insecure`) and the
/// name to ask for and check the certificate against.
#[derive(Clone, Debug)]
pub struct TlsTarget {
    pub config: Arc<ClientConfig>,
    pub name: ServerName<'static>,
}

pub struct Client {
    stream: TcpStream,
    /// `wss://`: the TLS session between the socket and everything below.
    tls: Option<TlsSession>,
    state: State,
    /// Our `Sec-WebSocket-Key`, to check the server's accept value.
    key: String,
    /// The response head received so far; freed once the handshake is done.
    head: Vec<u8>,
    /// Encoded bytes not yet written; `outbound[written..]` is what is left.
    outbound: Vec<u8>,
    written: usize,
    reader: FrameReader,
    /// When the connect started (for handshake latency and deadlines).
    pub started: Instant,
    /// True once the 101 was accepted, even if the connection failed later.
    handshake_done: bool,
    /// The permessage-deflate offer sent (`--compression`), checked against the 101.
    offer: Option<DeflateOffer>,
    /// The server accepted the offer: messages go compressed and may arrive compressed.
    compressing: bool,
}

/// What every connection of a run connects to and offers: the same for all of them, so the
/// worker builds it once from its plan.
#[derive(Clone, Copy, Debug)]
pub struct Dial<'a> {
    pub target: SocketAddr,
    /// `wss://`: how to set up TLS.
    pub tls: Option<&'a TlsTarget>,
    /// `Host` header value.
    pub host: &'a str,
    /// Offer permessage-deflate (`--compression`).
    pub compression: bool,
}

impl Client {
    /// Starts a non-blocking connect to `dial.target`, bound to `source` when given, with the
    /// upgrade request for `resource` queued behind it (behind the TLS handshake, with
    /// `dial.tls`).
    ///
    /// # Errors
    /// Creating, binding or connecting the socket failed at once (e.g. refused on loopback, or
    /// no free ephemeral port on the source address).
    pub fn connect(
        dial: Dial<'_>,
        source: Option<IpAddr>,
        resource: &str,
        rng: &mut fastrand::Rng,
        now: Instant,
    ) -> io::Result<Client> {
        let Dial {
            target,
            tls,
            host,
            compression,
        } = dial;
        let socket = Socket::new(
            Domain::for_address(target),
            Type::STREAM,
            Some(Protocol::TCP),
        )?;
        socket.set_nonblocking(true)?;
        socket.set_tcp_nodelay(true)?;
        if let Some(ip) = source {
            // Port 0: the kernel picks a free ephemeral port of this address, so each source
            // address brings its own ~28k ports.
            socket.bind(&SockAddr::from(SocketAddr::new(ip, 0)))?;
        }
        match socket.connect(&SockAddr::from(target)) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(e),
        }
        let stream = TcpStream::from_std(std::net::TcpStream::from(socket));
        let mut nonce = [0u8; 16];
        rng.fill(&mut nonce);
        let key = client_handshake::key_from_nonce(nonce);
        let offer = compression.then_some(DeflateOffer::NO_CONTEXT_TAKEOVER);
        let value = offer.map(|o| o.header_value());
        let extra: Vec<(&str, &str)> = value
            .as_deref()
            .map(|v| ("Sec-WebSocket-Extensions", v))
            .into_iter()
            .collect();
        let outbound = client_handshake::upgrade_request_with_headers(host, resource, &key, &extra);
        let tls = match tls {
            Some(t) => Some(
                TlsSession::client(t.config.clone(), t.name.clone()).map_err(io::Error::other)?,
            ),
            None => None,
        };
        Ok(Client {
            stream,
            tls,
            state: State::Connecting,
            key,
            head: Vec::new(),
            outbound,
            written: 0,
            reader: FrameReader::new(Role::Client, MAX_MESSAGE),
            started: now,
            handshake_done: false,
            offer,
            compressing: false,
        })
    }

    /// The socket, for registering with the worker's poller.
    pub fn stream_mut(&mut self) -> &mut TcpStream {
        &mut self.stream
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// Did the server accept the upgrade (at some point)?
    pub fn handshake_done(&self) -> bool {
        self.handshake_done
    }

    /// Queues one binary message, masked with a fresh key (RFC 6455 §5.3: the key must not be
    /// predictable, so every frame draws a new one), compressed with `codec` if the server
    /// accepted permessage-deflate. Call `flush` to write it.
    pub fn send_binary(&mut self, payload: &[u8], codec: &mut Codec, rng: &mut fastrand::Rng) {
        debug_assert_eq!(self.state, State::Open);
        if self.compressing {
            codec.compressed.clear();
            let deflater = codec
                .deflater
                .get_or_insert_with(|| Deflater::new(15, false));
            if deflater.compress(payload, &mut codec.compressed).is_ok() {
                frame::encode_compressed_into(
                    &mut self.outbound,
                    OpCode::Binary,
                    &codec.compressed,
                    Some(mask(rng)),
                );
                return;
            }
        }
        frame::encode_into(
            &mut self.outbound,
            true,
            OpCode::Binary,
            payload,
            Some(mask(rng)),
        );
    }

    /// Starts the close handshake with 1000 (normal closure). Nothing is sent after it.
    pub fn close(&mut self, rng: &mut fastrand::Rng) {
        if self.state != State::Open {
            return;
        }
        let payload = frame::close_payload(CloseCode::NORMAL, "");
        frame::encode_into(
            &mut self.outbound,
            true,
            OpCode::Close,
            &payload,
            Some(mask(rng)),
        );
        self.state = State::Closing { received: false };
    }

    /// Writes queued bytes until done or the socket is full.
    ///
    /// # Errors
    /// `Disconnected` if the write fails (the server reset the connection).
    pub fn flush(&mut self) -> Result<(), Failure> {
        if self.state == State::Connecting {
            return Ok(()); // the request goes out once the connect completes
        }
        while let Some(pending) = self.outbound.get(self.written..).filter(|p| !p.is_empty()) {
            let written = match &mut self.tls {
                // Encrypted, and before the TLS handshake completes, held by rustls until then.
                Some(tls) => tls.writer(&mut self.stream).write(pending),
                None => self.stream.write(pending),
            };
            match written {
                Ok(0) => return Err(Failure::Disconnected),
                Ok(n) => self.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(failure_of(&e)),
            }
        }
        self.outbound.clear();
        self.written = 0;
        // TLS records still waiting: handshake messages, or what the socket did not take. The
        // next writable event brings us back here.
        if let Some(tls) = &mut self.tls {
            tls.write_tls(&mut self.stream)
                .map_err(|e| failure_of(&e))?;
        }
        Ok(())
    }

    /// Does whatever the socket's readiness allows: completes the connect, writes, reads until
    /// `WouldBlock`, checks the 101, decodes frames. Every data message's payload is handed to
    /// `on_message`.
    ///
    /// # Errors
    /// The connection failed (see `Failure`); the caller drops it.
    pub fn on_ready(
        &mut self,
        buf: &mut [u8],
        codec: &mut Codec,
        rng: &mut fastrand::Rng,
        mut on_message: impl FnMut(&[u8]),
    ) -> Result<Step, Failure> {
        if self.state == State::Connecting {
            if !self.connected()? {
                return Ok(Step::Pending);
            }
            self.state = State::Handshaking;
        }
        self.flush()?;
        loop {
            let read = match &mut self.tls {
                Some(tls) => tls.read(&mut self.stream, buf),
                None => self.stream.read(buf),
            };
            let n = match read {
                Ok(0) => return self.on_eof(),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(failure_of(&e)),
            };
            let data = buf.get_mut(..n).unwrap_or_default();
            if self.state == State::Handshaking {
                self.head.extend_from_slice(data);
                let offer = self.offer.as_ref();
                match client_handshake::parse_response_with_offer(&self.head, &self.key, offer) {
                    Ok(None) => continue,
                    Ok(Some(accepted)) => {
                        // Frames the server sent right behind its 101 belong to the stream.
                        let mut rest = accepted.rest.to_vec();
                        if accepted.deflate.is_some() {
                            self.compressing = true;
                            self.reader.allow_rsv1();
                        }
                        self.head = Vec::new();
                        self.state = State::Open;
                        self.handshake_done = true;
                        self.drain_events(&mut rest, codec, rng, &mut on_message)?;
                    }
                    Err(e) => return Err(Failure::Handshake(Some(e))),
                }
            } else {
                self.drain_events(data, codec, rng, &mut on_message)?;
            }
        }
        // Pongs and a Close reply queued while reading (and TLS handshake answers).
        self.flush()?;
        Ok(Step::Pending)
    }

    /// Has the non-blocking connect completed? (mio: on a writable event, check the pending
    /// error, then whether there is a peer; "not connected" means a spurious wake-up.)
    fn connected(&mut self) -> Result<bool, Failure> {
        match self.stream.take_error() {
            Ok(None) => {}
            Ok(Some(_)) | Err(_) => return Err(Failure::Connect),
        }
        match self.stream.peer_addr() {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(false),
            Err(_) => Err(Failure::Connect),
        }
    }

    fn on_eof(&mut self) -> Result<Step, Failure> {
        match self.state {
            // RFC 6455 §7.1.1: after both Close frames, the server closes TCP first.
            State::Closing { received: true } => Ok(Step::Closed),
            State::Connecting | State::Handshaking => Err(Failure::Handshake(None)),
            State::Open | State::Closing { received: false } => Err(Failure::Disconnected),
        }
    }

    /// Handles every event in `bytes` (one read), parsed in place.
    fn drain_events(
        &mut self,
        bytes: &mut [u8],
        codec: &mut Codec,
        rng: &mut fastrand::Rng,
        on_message: &mut impl FnMut(&[u8]),
    ) -> Result<(), Failure> {
        let mut input = Input::new(bytes);
        loop {
            let event = match self.reader.next_event(&mut input) {
                Ok(Some(event)) => event,
                Ok(None) => return Ok(()),
                Err(e) => return Err(Failure::Protocol(e)),
            };
            match event {
                Event::Message {
                    data,
                    compressed: true,
                    ..
                } => {
                    codec.inflated.clear();
                    let inflater = codec
                        .inflater
                        .get_or_insert_with(|| Inflater::new(15, false));
                    let inflated =
                        inflater.inflate_message(&data, &mut codec.inflated, MAX_MESSAGE);
                    if let Err(e) = inflated {
                        // The worker's other connections share the inflater.
                        inflater.reset();
                        return Err(Failure::Protocol(e));
                    }
                    on_message(&codec.inflated);
                }
                Event::Message { data, .. } => on_message(&data),
                Event::Ping(payload) => {
                    // RFC 6455 §5.5.2: answer with a Pong carrying the same payload (not after
                    // our Close, §5.5.1).
                    if self.state == State::Open {
                        frame::encode_into(
                            &mut self.outbound,
                            true,
                            OpCode::Pong,
                            payload,
                            Some(mask(rng)),
                        );
                    }
                }
                // §5.5.3: an unsolicited Pong needs no answer.
                Event::Pong(_) => {}
                Event::Close(close) => {
                    let code = close.map(|close| close.code);
                    match self.state {
                        State::Open => {
                            // The server closes on us: answer with the same code (§5.5.1),
                            // write it, and report the connection as lost.
                            let reply = code
                                .map(|c| frame::close_payload(c, ""))
                                .unwrap_or_default();
                            frame::encode_into(
                                &mut self.outbound,
                                true,
                                OpCode::Close,
                                &reply,
                                Some(mask(rng)),
                            );
                            self.state = State::Closing { received: true };
                            let _ = self.flush();
                            return Err(Failure::ServerClosed(code));
                        }
                        _ => self.state = State::Closing { received: true },
                    }
                }
            }
        }
    }
}

/// A failed read or write: a TLS failure by its reason, anything else a lost connection.
fn failure_of(e: &io::Error) -> Failure {
    match tls::Failure::of(e) {
        tls::Failure::Io => Failure::Disconnected,
        reason => Failure::Tls(reason),
    }
}

/// A fresh masking key.
fn mask(rng: &mut fastrand::Rng) -> [u8; 4] {
    rng.u32(..).to_ne_bytes()
}
