//! One TLS session over a non-blocking socket: ciphertext on one side, plaintext on the other.
//!
//! Owns: a rustls connection (server or client role), the first bytes a peer sent (to tell plain
//! HTTP and other non-TLS input from a broken TLS handshake), handshake-completion reporting,
//! and `Failure`, the reason a session failed, for metrics.
//! Does not: own the socket (every call borrows it), register interest, keep deadlines, or count
//! anything. The reactor (or the load generator) decides when to call what.
//!
//! SPEC §18. How it is driven, as in rustls's mio example:
//!
//! * Readable: `read` until it returns `WouldBlock`, exactly as one reads a plain socket. Inside,
//!   it hands out plaintext rustls has already decrypted, else reads ciphertext (`read_tls`),
//!   decrypts it and advances the handshake (`process_new_packets`), and repeats. It returns
//!   `WouldBlock` only when the socket did, so an edge-triggered poller stays correct.
//! * Writing plaintext: `writer(socket)` is an `io::Write` whose `write_vectored` encrypts a whole
//!   batch of frames into as few TLS records as fit (so the outbound queue's one vectored write
//!   per loop iteration stays one write), then pushes the records to the socket.
//! * After either: if `wants_write()`, records are waiting (handshake messages after a read, or
//!   what the socket would not take). `write_tls` sends them; writable readiness drives it while
//!   it returns `TlsFlush::Blocked`.
//!
//! Errors keep the socket's shape: a TLS failure is an `io::Error` of kind `InvalidData` that
//! carries a `TlsError`; `Failure::of` classifies any error for the counters.

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, Connection, ServerConfig, ServerConnection};
use std::fmt;
use std::io::{self, IoSlice, Read, Write};
use std::sync::Arc;

/// The first byte of a TLS record carrying a handshake message (RFC 8446 §5.1,
/// `ContentType.handshake`): what every TLS client sends first.
const HANDSHAKE_RECORD: u8 = 0x16;

/// How many leading bytes are kept for classifying a failed handshake.
const FIRST_BYTES: usize = 8;

/// Why a TLS session ended badly, one counter each (SPEC §18: "counted by reason").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Failure {
    /// The client spoke plain HTTP to the TLS port (an `http://` or `ws://` URL).
    PlainHttp,
    /// The first bytes were not a TLS handshake record at all: some other protocol, or noise.
    NotTls,
    /// A TLS protocol violation: a malformed or unexpected message, a record that does not
    /// decrypt, an oversized handshake.
    Protocol,
    /// No protocol version, cipher suite, key-exchange group or ALPN protocol in common.
    Incompatible,
    /// The peer aborted with a fatal alert; during the handshake usually because it does not
    /// trust our certificate.
    Alert,
    /// We refused the peer's certificate (a client: not signed by a CA it trusts, expired, or
    /// for another name). The server asks for no certificates, so it never counts this.
    Certificate,
    /// The client asked to renegotiate (a ClientHello after the handshake). rustls answers the
    /// first such TLS 1.2 request with a `no_renegotiation` warning (RFC 5246 §7.2.2) and the
    /// client then usually gives up with a fatal alert (counted as `Alert`); a second request,
    /// or any in TLS 1.3, where renegotiation does not exist, fails the session here.
    Renegotiation,
    /// The peer hung up before the handshake completed.
    Eof,
    /// The handshake deadline passed (the reactor's verdict; `--handshake-timeout`).
    Timeout,
    /// The socket failed (reset, broken pipe).
    Io,
}

impl Failure {
    pub const ALL: [Failure; 10] = [
        Failure::PlainHttp,
        Failure::NotTls,
        Failure::Protocol,
        Failure::Incompatible,
        Failure::Alert,
        Failure::Certificate,
        Failure::Renegotiation,
        Failure::Eof,
        Failure::Timeout,
        Failure::Io,
    ];

    /// The label value in /metrics.
    pub fn reason(self) -> &'static str {
        match self {
            Failure::PlainHttp => "plain_http",
            Failure::NotTls => "not_tls",
            Failure::Protocol => "protocol",
            Failure::Incompatible => "incompatible",
            Failure::Alert => "alert",
            Failure::Certificate => "certificate",
            Failure::Renegotiation => "renegotiation",
            Failure::Eof => "eof",
            Failure::Timeout => "timeout",
            Failure::Io => "io",
        }
    }

    /// Classifies a rustls error, given the first bytes the peer sent (kept only while
    /// handshaking) and whether the handshake was still in progress.
    pub fn classify(error: &rustls::Error, first_bytes: &[u8], handshaking: bool) -> Failure {
        use rustls::{Error, HandshakeType, PeerMisbehaved};
        if handshaking && looks_like_http(first_bytes) {
            return Failure::PlainHttp;
        }
        if handshaking && first_bytes.first().is_some_and(|&b| b != HANDSHAKE_RECORD) {
            return Failure::NotTls;
        }
        match error {
            Error::PeerMisbehaved(PeerMisbehaved::TooManyRenegotiationRequests) => {
                Failure::Renegotiation
            }
            Error::InappropriateHandshakeMessage {
                got_type: HandshakeType::ClientHello,
                ..
            } if !handshaking => Failure::Renegotiation,
            Error::PeerIncompatible(_) | Error::NoApplicationProtocol => Failure::Incompatible,
            Error::AlertReceived(_) => Failure::Alert,
            Error::InvalidCertificate(_) => Failure::Certificate,
            _ => Failure::Protocol,
        }
    }

    /// The reason behind any error a `TlsSession` call returned: the classified TLS failure,
    /// or `Io` for the socket's own errors.
    pub fn of(error: &io::Error) -> Failure {
        match error.get_ref().and_then(|e| e.downcast_ref::<TlsError>()) {
            Some(tls) => tls.failure,
            None => Failure::Io,
        }
    }
}

/// Does the peer's first input look like an HTTP request line (`GET /`, `POST /`, ...)? Methods
/// are upper-case letters (RFC 9110 §9, by convention), and no TLS record starts with a letter.
fn looks_like_http(first_bytes: &[u8]) -> bool {
    let method_len = first_bytes
        .iter()
        .take_while(|b| b.is_ascii_uppercase())
        .count();
    method_len >= 3 && first_bytes.get(method_len) == Some(&b' ')
}

/// A TLS failure, carried inside the `io::Error` that `read` returns.
#[derive(Debug)]
pub struct TlsError {
    pub failure: Failure,
    pub error: rustls::Error,
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TLS {}: {}", self.failure.reason(), self.error)
    }
}

impl std::error::Error for TlsError {}

/// What `write_tls` achieved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsFlush {
    /// No encrypted bytes wait any more.
    Done,
    /// The socket is full; writable interest is needed.
    Blocked,
}

/// A completed handshake, reported once by `take_handshake`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Handshake {
    /// "TLSv1.2" or "TLSv1.3" (the label value in /metrics).
    pub version: &'static str,
    /// The ALPN protocol agreed, if the client offered any.
    pub alpn: Option<Vec<u8>>,
}

pub struct TlsSession {
    conn: Connection,
    /// The peer's first bytes (up to `FIRST_BYTES`), recorded until the handshake completes so
    /// that a failed handshake can be told apart: plain HTTP, not TLS at all, or broken TLS.
    first: [u8; FIRST_BYTES],
    first_len: usize,
    /// Set once `take_handshake` has reported the completed handshake.
    handshake_reported: bool,
}

impl TlsSession {
    /// The server side of a new connection.
    ///
    /// # Errors
    /// Only if the configuration cannot produce a session (rustls's own checks).
    pub fn server(config: Arc<ServerConfig>) -> Result<TlsSession, rustls::Error> {
        Ok(TlsSession::new(Connection::Server(ServerConnection::new(
            config,
        )?)))
    }

    /// The client side, asking for (and checking the certificate against) `name`. The
    /// ClientHello is queued at once: `wants_write()` is true until it is sent.
    ///
    /// # Errors
    /// As `server`.
    pub fn client(
        config: Arc<ClientConfig>,
        name: ServerName<'static>,
    ) -> Result<TlsSession, rustls::Error> {
        Ok(TlsSession::new(Connection::Client(ClientConnection::new(
            config, name,
        )?)))
    }

    fn new(conn: Connection) -> TlsSession {
        TlsSession {
            conn,
            first: [0; FIRST_BYTES],
            first_len: 0,
            handshake_reported: false,
        }
    }

    /// Reads plaintext into `plain`, with the contract of a non-blocking socket read: `Ok(n)`
    /// bytes, `Ok(0)` at the end of the stream (a `close_notify`, or the peer closing TCP), or
    /// an error, `WouldBlock` once the socket has nothing more. Handshake messages are processed
    /// on the way; afterwards `wants_write()` says whether answers wait to be sent. An end of
    /// stream while `is_handshaking()` is a peer that gave up mid-handshake (`Failure::Eof`).
    ///
    /// # Errors
    /// The socket's errors, including `WouldBlock`; a TLS failure as `InvalidData` carrying a
    /// `TlsError` (after which a fatal alert has been offered to the socket, best effort).
    pub fn read<S: Read + Write>(&mut self, socket: &mut S, plain: &mut [u8]) -> io::Result<usize> {
        loop {
            // Plaintext decrypted earlier comes first.
            match self.conn.reader().read(plain) {
                Ok(n) => return Ok(n), // 0: the peer sent close_notify
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // TCP closed without close_notify. A truncation is no attack here: WebSocket
                // has its own close handshake to tell a complete conversation.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) => return Err(e),
            }
            let read = if self.conn.is_handshaking() {
                let mut recorder = Recorder {
                    inner: &mut *socket,
                    first: &mut self.first,
                    first_len: &mut self.first_len,
                };
                self.conn.read_tls(&mut recorder)
            } else {
                self.conn.read_tls(socket)
            };
            match read {
                Ok(0) => return Ok(0),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // `InvalidData` here is rustls refusing to buffer more (a handshake message
                // over its 64 KiB bound): a protocol violation like any other.
                Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                    let error = rustls::Error::General(e.to_string());
                    return Err(self.fail(socket, error));
                }
                Err(e) => return Err(e),
            }
            if let Err(error) = self.conn.process_new_packets() {
                return Err(self.fail(socket, error));
            }
        }
    }

    /// Classifies `error`, sends the alert rustls queued for it if the socket takes it, and
    /// wraps both into the `io::Error` that `read` returns.
    fn fail<S: Write>(&mut self, socket: &mut S, error: rustls::Error) -> io::Error {
        let failure = Failure::classify(&error, self.first_bytes(), self.conn.is_handshaking());
        // A last write, so the peer learns why (rustls's example does the same). If the socket
        // is full the alert is lost, which costs the peer a reason, nothing more. Not to an
        // HTTP client: an alert means nothing to it, and the caller may answer it in HTTP.
        if failure != Failure::PlainHttp {
            let _ = self.write_tls(socket);
        }
        io::Error::new(io::ErrorKind::InvalidData, TlsError { failure, error })
    }

    /// An `io::Write` that encrypts into this session and writes the records to `socket`.
    pub fn writer<'a, S: Write>(&'a mut self, socket: &'a mut S) -> TlsWriter<'a, S> {
        TlsWriter {
            session: self,
            socket,
        }
    }

    /// Writes encrypted bytes waiting in the session until there are none or the socket is full.
    ///
    /// # Errors
    /// The socket's errors other than `WouldBlock` (which is `TlsFlush::Blocked`) and
    /// `Interrupted` (retried).
    pub fn write_tls<S: Write>(&mut self, socket: &mut S) -> io::Result<TlsFlush> {
        while self.conn.wants_write() {
            match self.conn.write_tls(socket) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(TlsFlush::Blocked),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(TlsFlush::Done)
    }

    /// Are encrypted bytes waiting for the socket?
    pub fn wants_write(&self) -> bool {
        self.conn.wants_write()
    }

    pub fn is_handshaking(&self) -> bool {
        self.conn.is_handshaking()
    }

    /// The completed handshake, the first time this is called after it completed; `None`
    /// before, and every time after.
    pub fn take_handshake(&mut self) -> Option<Handshake> {
        if self.handshake_reported || self.conn.is_handshaking() {
            return None;
        }
        self.handshake_reported = true;
        let version = match self.conn.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
            Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
            _ => "other",
        };
        Some(Handshake {
            version,
            alpn: self.conn.alpn_protocol().map(<[u8]>::to_vec),
        })
    }

    /// Queues a `close_notify` alert (RFC 8446 §6.1): nothing more will be written. Send it with
    /// `write_tls`.
    pub fn send_close_notify(&mut self) {
        self.conn.send_close_notify();
    }

    /// The first bytes the peer sent (recorded only while handshaking).
    fn first_bytes(&self) -> &[u8] {
        &self.first[..self.first_len]
    }
}

impl fmt::Debug for TlsSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsSession")
            .field("handshaking", &self.conn.is_handshaking())
            .field("wants_write", &self.conn.wants_write())
            .finish()
    }
}

/// Plaintext in, encrypted records out to the socket; see `TlsSession::writer`.
///
/// Its `write_vectored` accepts what rustls will buffer, encrypts it, and writes the records;
/// the bytes it reports as written are plaintext accepted, which may still wait in the session
/// (check `wants_write` after the last write). When rustls's buffer is full and the socket will
/// take nothing, it returns `WouldBlock`, as a full socket would.
pub struct TlsWriter<'a, S: Write> {
    session: &'a mut TlsSession,
    socket: &'a mut S,
}

impl<S: Write> Write for TlsWriter<'_, S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        // First make room: rustls accepts plaintext only while its record buffer is under its
        // limit (64 KiB by default).
        self.session.write_tls(self.socket)?;
        let accepted = self.session.conn.writer().write_vectored(bufs)?;
        self.session.write_tls(self.socket)?;
        if accepted == 0 && bufs.iter().any(|b| !b.is_empty()) {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(accepted)
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.session.write_tls(self.socket)? {
            TlsFlush::Done => Ok(()),
            TlsFlush::Blocked => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

/// Reads from the socket and keeps a copy of the first `FIRST_BYTES` bytes read.
struct Recorder<'a, R> {
    inner: &'a mut R,
    first: &'a mut [u8; FIRST_BYTES],
    first_len: &'a mut usize,
}

impl<R: Read> Read for Recorder<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let room = FIRST_BYTES - *self.first_len;
        let keep = room.min(n);
        if keep > 0 {
            self.first[*self.first_len..*self.first_len + keep].copy_from_slice(&buf[..keep]);
            *self.first_len += keep;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests;
