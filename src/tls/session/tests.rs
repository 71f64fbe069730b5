//! `TlsSession` between two in-memory pipe ends (whose capacity forces short writes and
//! `WouldBlock`) and over a real non-blocking socket pair, with a CA made up by the test.

use super::*;
use crate::tls::config;
use crate::tls::test_ca::TestCa;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::path::Path;
use std::rc::Rc;

/// One direction of an in-memory connection.
#[derive(Default)]
struct Queue {
    bytes: VecDeque<u8>,
    closed: bool,
}

/// One end of an in-memory connection: reads what the other end wrote. It holds at most
/// `capacity` unread bytes in each direction and takes at most `per_write` bytes per call, so
/// a writer meets short writes and `WouldBlock` as on a real socket.
struct End {
    incoming: Rc<RefCell<Queue>>,
    outgoing: Rc<RefCell<Queue>>,
    capacity: usize,
    per_write: usize,
}

fn pair(capacity: usize, per_write: usize) -> (End, End) {
    let a = Rc::new(RefCell::new(Queue::default()));
    let b = Rc::new(RefCell::new(Queue::default()));
    (
        End {
            incoming: a.clone(),
            outgoing: b.clone(),
            capacity,
            per_write,
        },
        End {
            incoming: b,
            outgoing: a,
            capacity,
            per_write,
        },
    )
}

impl End {
    /// Pretends the peer sent `bytes`.
    fn inject(&self, bytes: &[u8]) {
        self.incoming.borrow_mut().bytes.extend(bytes);
    }

    /// Everything the peer has not read yet, taken out of the pipe.
    fn take_outgoing(&self) -> Vec<u8> {
        self.outgoing.borrow_mut().bytes.drain(..).collect()
    }

    fn close(&self) {
        self.outgoing.borrow_mut().closed = true;
    }
}

impl Read for End {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut queue = self.incoming.borrow_mut();
        if queue.bytes.is_empty() {
            return if queue.closed {
                Ok(0)
            } else {
                Err(io::ErrorKind::WouldBlock.into())
            };
        }
        let n = buf.len().min(queue.bytes.len());
        for (slot, byte) in buf.iter_mut().zip(queue.bytes.drain(..n)) {
            *slot = byte;
        }
        Ok(n)
    }
}

impl Write for End {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut queue = self.outgoing.borrow_mut();
        let room = self.capacity.saturating_sub(queue.bytes.len());
        if room == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = buf.len().min(room).min(self.per_write);
        queue.bytes.extend(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn server_config(ca: &TestCa) -> Arc<ServerConfig> {
    let paths = (Path::new("cert.pem"), Path::new("key.pem"));
    Arc::new(config::server_config(ca.chain.clone(), ca.key(), paths).unwrap())
}

fn roots(ca: &TestCa) -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.ca_der.clone()).unwrap();
    roots
}

/// A client trusting `ca`, speaking only `versions` and offering `alpn`.
fn client_config(
    ca: &TestCa,
    versions: &[&'static rustls::SupportedProtocolVersion],
    alpn: &[&[u8]],
) -> Arc<ClientConfig> {
    let mut config = ClientConfig::builder_with_provider(config::provider())
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots(ca))
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

fn default_client(ca: &TestCa) -> TlsSession {
    let config = client_config(
        ca,
        &[&rustls::version::TLS13, &rustls::version::TLS12],
        &[b"http/1.1"],
    );
    TlsSession::client(config, config::server_name("localhost").unwrap()).unwrap()
}

/// Reads until `WouldBlock`, collecting plaintext; the error if one came instead.
fn read_all<S: Read + Write>(session: &mut TlsSession, socket: &mut S) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = [0u8; 1500];
    loop {
        match session.read(socket, &mut buf) {
            Ok(0) => return Ok(out),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(out),
            Err(e) => return Err(e),
        }
    }
}

/// Runs both sides until neither has anything left to say, at most `rounds` times.
fn exchange<S: Read + Write>(
    client: &mut TlsSession,
    client_end: &mut S,
    server: &mut TlsSession,
    server_end: &mut S,
    rounds: usize,
) -> (io::Result<Vec<u8>>, io::Result<Vec<u8>>) {
    let mut to_client = Vec::new();
    let mut to_server = Vec::new();
    for _ in 0..rounds {
        client.write_tls(client_end).unwrap();
        match read_all(server, server_end) {
            Ok(bytes) => to_server.extend(bytes),
            Err(e) => return (Ok(to_client), Err(e)),
        }
        server.write_tls(server_end).unwrap();
        match read_all(client, client_end) {
            Ok(bytes) => to_client.extend(bytes),
            Err(e) => return (Err(e), Ok(to_server)),
        }
        if !client.wants_write() && !server.wants_write() && !client.is_handshaking() {
            break;
        }
    }
    (Ok(to_client), Ok(to_server))
}

fn handshake(ca: &TestCa, client: &mut TlsSession) -> (TlsSession, End, End) {
    let (mut client_end, mut server_end) = pair(1 << 20, 1 << 20);
    let mut server = TlsSession::server(server_config(ca)).unwrap();
    let (c, s) = exchange(client, &mut client_end, &mut server, &mut server_end, 10);
    assert!(c.unwrap().is_empty() && s.unwrap().is_empty());
    assert!(!client.is_handshaking() && !server.is_handshaking());
    (server, client_end, server_end)
}

#[test]
fn tls13_handshake_then_plaintext_both_ways() {
    let ca = TestCa::new();
    let mut client = default_client(&ca);
    let (mut server, mut client_end, mut server_end) = handshake(&ca, &mut client);

    let done = server.take_handshake().unwrap();
    assert_eq!(done.version, "TLSv1.3");
    assert_eq!(done.alpn.as_deref(), Some(&b"http/1.1"[..]));
    assert_eq!(server.take_handshake(), None, "reported once");

    client
        .writer(&mut client_end)
        .write_all(b"GET /echo")
        .unwrap();
    assert_eq!(
        read_all(&mut server, &mut server_end).unwrap(),
        b"GET /echo"
    );
    server
        .writer(&mut server_end)
        .write_all(b"HTTP/1.1 101")
        .unwrap();
    assert_eq!(
        read_all(&mut client, &mut client_end).unwrap(),
        b"HTTP/1.1 101"
    );
    // Nothing was read from the wire: the socket's own WouldBlock comes through.
    let e = server.read(&mut server_end, &mut [0u8; 16]).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
}

#[test]
fn tls12_is_accepted_and_reported() {
    let ca = TestCa::new();
    let config = client_config(&ca, &[&rustls::version::TLS12], &[b"http/1.1"]);
    let mut client = TlsSession::client(config, config::server_name("127.0.0.1").unwrap()).unwrap();
    let (mut server, _, _) = handshake(&ca, &mut client);
    assert_eq!(server.take_handshake().unwrap().version, "TLSv1.2");
}

#[test]
fn client_without_alpn_is_served() {
    let ca = TestCa::new();
    let config = client_config(&ca, &[&rustls::version::TLS13], &[]);
    let mut client = TlsSession::client(config, config::server_name("localhost").unwrap()).unwrap();
    let (mut server, _, _) = handshake(&ca, &mut client);
    assert_eq!(server.take_handshake().unwrap().alpn, None);
}

/// Feeds `bytes` to a fresh server session, as the client's first and only input.
fn server_failure(bytes: &[u8]) -> Failure {
    let ca = TestCa::new();
    let (_client_end, mut server_end) = pair(1 << 20, 1 << 20);
    let mut server = TlsSession::server(server_config(&ca)).unwrap();
    server_end.inject(bytes);
    let e = read_all(&mut server, &mut server_end).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
    Failure::of(&e)
}

#[test]
fn plain_http_to_the_tls_port() {
    let failure = server_failure(b"GET /echo HTTP/1.1\r\nHost: localhost\r\n\r\n");
    assert_eq!(failure, Failure::PlainHttp);
    let failure = server_failure(b"OPTIONS * HTTP/1.1\r\n\r\n");
    assert_eq!(failure, Failure::PlainHttp);
}

#[test]
fn random_bytes_are_not_tls() {
    let mut rng = fastrand::Rng::with_seed(15);
    for _ in 0..20 {
        let mut bytes: Vec<u8> = (0..200).map(|_| rng.u8(..)).collect();
        if bytes[0] == HANDSHAKE_RECORD || bytes[0].is_ascii_uppercase() {
            bytes[0] = 0;
        }
        assert_eq!(server_failure(&bytes), Failure::NotTls, "{:?}", &bytes[..8]);
    }
    // A handshake record header followed by nonsense is broken TLS, not another protocol.
    let mut bytes = vec![HANDSHAKE_RECORD, 3, 1, 0, 40];
    bytes.extend((0..40).map(|_| rng.u8(..)));
    assert_eq!(server_failure(&bytes), Failure::Protocol);
}

#[test]
fn half_a_client_hello_waits_then_ends_as_eof() {
    let ca = TestCa::new();
    let mut client = default_client(&ca);
    let (mut client_end, mut server_end) = pair(1 << 20, 1 << 20);
    client.write_tls(&mut client_end).unwrap();
    let hello = client_end.take_outgoing();
    assert!(hello.len() > 100, "a ClientHello: {} bytes", hello.len());

    let mut server = TlsSession::server(server_config(&ca)).unwrap();
    server_end.inject(&hello[..hello.len() / 2]);
    let e = server.read(&mut server_end, &mut [0u8; 64]).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::WouldBlock, "waits for the rest");
    assert!(server.is_handshaking() && !server.wants_write());
    assert_eq!(server.take_handshake(), None);

    client_end.close();
    assert_eq!(server.read(&mut server_end, &mut [0u8; 64]).unwrap(), 0);
    assert!(
        server.is_handshaking(),
        "EOF before the handshake completed"
    );
}

#[test]
fn a_client_that_does_not_trust_us_aborts_with_an_alert() {
    let ca = TestCa::new();
    let stranger = TestCa::new();
    let mut client = default_client(&stranger);
    let (mut client_end, mut server_end) = pair(1 << 20, 1 << 20);
    let mut server = TlsSession::server(server_config(&ca)).unwrap();
    let (c, s) = exchange(
        &mut client,
        &mut client_end,
        &mut server,
        &mut server_end,
        10,
    );
    let client_error = c.unwrap_err();
    let tls = client_error
        .get_ref()
        .unwrap()
        .downcast_ref::<TlsError>()
        .unwrap();
    assert!(
        matches!(tls.error, rustls::Error::InvalidCertificate(_)),
        "{:?}",
        tls.error
    );
    assert_eq!(Failure::of(&client_error), Failure::Certificate);
    // The client's alert reaches the server on the next read.
    let server_error = s
        .and_then(|_| read_all(&mut server, &mut server_end))
        .unwrap_err();
    assert_eq!(Failure::of(&server_error), Failure::Alert, "{server_error}");
}

#[test]
fn no_common_alpn_is_incompatible() {
    let ca = TestCa::new();
    let config = client_config(&ca, &[&rustls::version::TLS13], &[b"h2"]);
    let mut client = TlsSession::client(config, config::server_name("localhost").unwrap()).unwrap();
    let (mut client_end, mut server_end) = pair(1 << 20, 1 << 20);
    let mut server = TlsSession::server(server_config(&ca)).unwrap();
    let (_, s) = exchange(
        &mut client,
        &mut client_end,
        &mut server,
        &mut server_end,
        10,
    );
    assert_eq!(Failure::of(&s.unwrap_err()), Failure::Incompatible);
}

#[test]
fn close_notify_reads_as_end_of_stream() {
    let ca = TestCa::new();
    let mut client = default_client(&ca);
    let (mut server, mut client_end, mut server_end) = handshake(&ca, &mut client);
    client.writer(&mut client_end).write_all(b"bye").unwrap();
    client.send_close_notify();
    client.write_tls(&mut client_end).unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(server.read(&mut server_end, &mut buf).unwrap(), 3);
    assert_eq!(server.read(&mut server_end, &mut buf).unwrap(), 0);
}

/// Splits a byte stream into TLS records: (content type, length) of each.
fn records(mut wire: &[u8]) -> Vec<(u8, usize)> {
    let mut out = Vec::new();
    while wire.len() >= 5 {
        let len = usize::from(u16::from_be_bytes([wire[3], wire[4]]));
        out.push((wire[0], len));
        wire = &wire[(5 + len).min(wire.len())..];
    }
    assert!(wire.is_empty(), "a partial record");
    out
}

#[test]
fn a_vectored_batch_of_frames_leaves_as_one_record() {
    let ca = TestCa::new();
    let mut client = default_client(&ca);
    let (mut server, client_end, mut server_end) = handshake(&ca, &mut client);
    assert!(client_end.incoming.borrow().bytes.is_empty());

    let frames: Vec<Vec<u8>> = (0..16u8).map(|i| vec![i; 64]).collect();
    let slices: Vec<IoSlice<'_>> = frames.iter().map(|f| IoSlice::new(f)).collect();
    let n = server
        .writer(&mut server_end)
        .write_vectored(&slices)
        .unwrap();
    assert_eq!(n, 16 * 64);
    assert!(!server.wants_write());
    let wire = server_end.take_outgoing();
    // One application-data record: 1,024 bytes, the inner content type and a 16-byte tag.
    assert_eq!(records(&wire), vec![(0x17, 16 * 64 + 1 + 16)]);
}

/// Sends `total` bytes from server to client through `writer`, against a socket that fills
/// up; returns how often the writer reported `WouldBlock`.
fn bulk_transfer<S: Read + Write>(
    client: &mut TlsSession,
    client_end: &mut S,
    server: &mut TlsSession,
    server_end: &mut S,
    total: usize,
) -> usize {
    let sent: Vec<u8> = (0..total).map(|i| (i % 251) as u8).collect();
    let mut received = Vec::new();
    let mut offset = 0;
    let mut blocked = 0;
    let mut rounds = 0;
    while received.len() < total {
        rounds += 1;
        assert!(rounds < 100_000, "no progress");
        // Write until the socket is full, then let the client read.
        while offset < total {
            let chunk = &sent[offset..(offset + 10_000).min(total)];
            match server
                .writer(server_end)
                .write_vectored(&[IoSlice::new(chunk)])
            {
                Ok(n) => offset += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    blocked += 1;
                    break;
                }
                Err(e) => panic!("{e}"),
            }
        }
        if offset == total && server.write_tls(server_end).unwrap() == TlsFlush::Blocked {
            blocked += 1;
        }
        received.extend(read_all(client, client_end).unwrap());
    }
    assert_eq!(server.write_tls(server_end).unwrap(), TlsFlush::Done);
    assert!(received == sent, "the bytes arrive intact and in order");
    blocked
}

#[test]
fn backpressure_through_a_small_pipe() {
    let ca = TestCa::new();
    let mut client = default_client(&ca);
    let (mut client_end, mut server_end) = pair(3000, 1000);
    let mut server = TlsSession::server(server_config(&ca)).unwrap();
    let (c, s) = exchange(
        &mut client,
        &mut client_end,
        &mut server,
        &mut server_end,
        50,
    );
    c.unwrap();
    s.unwrap();
    assert!(!server.is_handshaking());
    let blocked = bulk_transfer(
        &mut client,
        &mut client_end,
        &mut server,
        &mut server_end,
        300_000,
    );
    assert!(blocked > 0, "the pipe never filled");
}

#[test]
fn over_a_real_nonblocking_socket_pair() {
    use std::os::unix::net::UnixStream;
    let ca = TestCa::new();
    let (mut client_end, mut server_end) = UnixStream::pair().unwrap();
    client_end.set_nonblocking(true).unwrap();
    server_end.set_nonblocking(true).unwrap();
    let mut client = default_client(&ca);
    let mut server = TlsSession::server(server_config(&ca)).unwrap();
    let (c, s) = exchange(
        &mut client,
        &mut client_end,
        &mut server,
        &mut server_end,
        10,
    );
    c.unwrap();
    s.unwrap();
    assert_eq!(server.take_handshake().unwrap().version, "TLSv1.3");
    // More than the kernel buffers of a socket pair, so writes meet a full socket.
    let blocked = bulk_transfer(
        &mut client,
        &mut client_end,
        &mut server,
        &mut server_end,
        4 << 20,
    );
    assert!(blocked > 0, "the socket never filled");
}

#[test]
fn classification_table() {
    use rustls::{AlertDescription, Error, HandshakeType, PeerIncompatible, PeerMisbehaved};
    let hello: &[u8] = &[HANDSHAKE_RECORD, 3, 1, 2, 0];
    let cases: Vec<(&str, Error, &[u8], bool, Failure)> = vec![
        (
            "http",
            Error::General("x".into()),
            b"GET / HT",
            true,
            Failure::PlainHttp,
        ),
        (
            "http, method only",
            Error::General("x".into()),
            b"PUT /",
            true,
            Failure::PlainHttp,
        ),
        (
            "not http: lower case",
            Error::General("x".into()),
            b"get / ",
            true,
            Failure::NotTls,
        ),
        (
            "ssh",
            Error::General("x".into()),
            b"SSH-2.0-",
            true,
            Failure::NotTls,
        ),
        (
            "noise",
            Error::General("x".into()),
            &[0, 1, 2],
            true,
            Failure::NotTls,
        ),
        (
            "alert",
            Error::AlertReceived(AlertDescription::UnknownCA),
            hello,
            true,
            Failure::Alert,
        ),
        (
            "no alpn",
            Error::NoApplicationProtocol,
            hello,
            true,
            Failure::Incompatible,
        ),
        (
            "no version",
            Error::PeerIncompatible(PeerIncompatible::Tls12NotOffered),
            hello,
            true,
            Failure::Incompatible,
        ),
        (
            "tls 1.2 renegotiation, twice",
            Error::PeerMisbehaved(PeerMisbehaved::TooManyRenegotiationRequests),
            &[],
            false,
            Failure::Renegotiation,
        ),
        (
            "tls 1.3 client hello after the handshake",
            Error::InappropriateHandshakeMessage {
                expect_types: vec![HandshakeType::KeyUpdate],
                got_type: HandshakeType::ClientHello,
            },
            &[],
            false,
            Failure::Renegotiation,
        ),
        (
            "untrusted certificate",
            Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
            hello,
            true,
            Failure::Certificate,
        ),
        (
            "decrypt",
            Error::DecryptError,
            &[],
            false,
            Failure::Protocol,
        ),
        (
            "broken hello",
            Error::DecryptError,
            hello,
            true,
            Failure::Protocol,
        ),
        // Once the handshake is over, the first bytes no longer matter.
        (
            "late",
            Error::DecryptError,
            b"GET / HT",
            false,
            Failure::Protocol,
        ),
    ];
    for (name, error, first, handshaking, want) in cases {
        assert_eq!(
            Failure::classify(&error, first, handshaking),
            want,
            "{name}"
        );
    }
    let reasons: std::collections::BTreeSet<_> = Failure::ALL.iter().map(|f| f.reason()).collect();
    assert_eq!(reasons.len(), Failure::ALL.len(), "reasons are distinct");
    assert_eq!(
        Failure::of(&io::ErrorKind::ConnectionReset.into()),
        Failure::Io
    );
}
