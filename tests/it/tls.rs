//! `wsrelay serve --tls-cert --tls-key` (SPEC §18): what the server says about the pair it is
//! given, and the relay over TLS on every poller: echo (TLS 1.3 and 1.2), bad input that closes
//! only its own connection (plain HTTP, random bytes, broken TLS, a ClientHello cut short), a
//! thousand handshakes at once, and SIGHUP with a new certificate.
//!
//! The clients are rustls (a different role of the same library) under `tungstenite`, and
//! hand-made bytes; tests/python and tests/browser meet the server with OpenSSL and Chromium.

use crate::poller_tests;
use crate::support::HttpResponse;
use crate::support::{read_until_end, Server, DEADLINE};
use crate::tls_support::{
    read_tls_to_end, tls, tls_metrics, tls_server, try_tls, wait_for_tls_metric, wss, wss_with,
    TestCa,
};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection};
use std::io::Write;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tungstenite::Message;

/// Runs `wsrelay serve ARGS` on a free port; it must exit at once. Returns its status and
/// stderr.
fn serve_refuses(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_wsrelay"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(args)
        .output()
        .expect("run wsrelay serve");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_bad_certificate_or_key_is_refused_in_words() {
    let ca = TestCa::new();
    let other = TestCa::new();
    let missing = ca.dir.join("missing.pem");
    let (cert, key) = (ca.cert.to_str().unwrap(), ca.key.to_str().unwrap());
    let cases: &[(&[&str], &str)] = &[
        (&["--tls-cert", cert], "--tls-key"),
        (&["--tls-key", key], "--tls-cert"),
        (
            &["--tls-cert", missing.to_str().unwrap(), "--tls-key", key],
            "cannot read",
        ),
        // The two files swapped.
        (
            &["--tls-cert", key, "--tls-key", cert],
            "holds no certificate",
        ),
        // A key that is not the certificate's.
        (
            &["--tls-cert", cert, "--tls-key", other.key.to_str().unwrap()],
            "cannot serve the certificate",
        ),
    ];
    for (args, message) in cases {
        let (code, stderr) = serve_refuses(args);
        assert_ne!(code, 0, "{args:?}");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

/// A client that offers TLS 1.2 only.
fn tls12_only(ca: &TestCa) -> Arc<ClientConfig> {
    let roots = wsrelay::tls::config::load_roots(&ca.ca).unwrap();
    let config = ClientConfig::builder_with_provider(wsrelay::tls::config::provider())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

poller_tests!(
    echo_over_tls_1_3_and_1_2,
    bad_input_closes_only_its_own_connection,
    a_thousand_handshakes_at_once,
    sighup_serves_a_new_certificate_to_new_connections_only,
    over_the_limit_a_tls_client_is_told_503_after_its_handshake,
    a_renegotiation_attempt_ends_only_that_session,
);

/// Text and binary echo over `wss://`, a message far larger than a TLS record (it arrives in
/// many reads, and leaves as many records), the close handshake, and then `close_notify` before
/// the TCP end. Once with TLS 1.3, once with 1.2; /metrics counts each version.
fn echo_over_tls_1_3_and_1_2(poller: &str) {
    let ca = TestCa::new();
    let server = tls_server(poller, &ca, &[]);
    for config in [ca.client_config(), tls12_only(&ca)] {
        let mut ws = wss_with(&server, config, "/echo");
        for i in 0..50 {
            ws.send(Message::text(format!("message {i}"))).unwrap();
        }
        for i in 0..50 {
            assert_eq!(ws.read().unwrap(), Message::text(format!("message {i}")));
        }
        let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        ws.send(Message::binary(big.clone())).unwrap();
        assert_eq!(ws.read().unwrap(), Message::binary(big));
        ws.close(None).unwrap();
        loop {
            match ws.read() {
                Ok(Message::Close(_)) | Ok(_) => {}
                Err(tungstenite::Error::ConnectionClosed) => break,
                Err(e) => panic!("after our Close: {e}"),
            }
        }
        let (rest, close_notify) = read_tls_to_end(ws.get_mut());
        assert!(rest.is_empty(), "{rest:?}");
        assert!(close_notify, "the server ended TLS without close_notify");
    }
    let m = tls_metrics(&server, &ca);
    assert_eq!(
        m.get("wsrelay_tls_handshakes_total{version=\"TLSv1.2\"}"),
        1.0
    );
    // The first echo and this /metrics read.
    assert_eq!(
        m.get("wsrelay_tls_handshakes_total{version=\"TLSv1.3\"}"),
        2.0
    );
    for (series, value) in m.family("wsrelay_tls_handshake_failures_total") {
        assert_eq!(value, 0.0, "{series}");
    }
    let not_after = m.get("wsrelay_tls_certificate_not_after_seconds");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        not_after > now,
        "the test certificate expires at {not_after}"
    );
}

/// The first flight of a real TLS client (its ClientHello), as bytes.
fn client_hello(ca: &TestCa) -> Vec<u8> {
    let name = ServerName::try_from("localhost").unwrap();
    let mut conn = ClientConnection::new(ca.client_config(), name).unwrap();
    let mut hello = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut hello).unwrap();
    }
    hello
}

/// Each kind of bad input ends its own connection and is counted by reason; a `wss://`
/// connection opened before them all is still served after them.
fn bad_input_closes_only_its_own_connection(poller: &str) {
    let ca = TestCa::new();
    let server = tls_server(poller, &ca, &["--handshake-timeout", "1s"]);
    let mut good = wss(&server, &ca, "/echo");

    // Plain HTTP to the TLS port: told so in HTTP, then closed in order.
    let response = server.get("/healthz");
    assert_eq!(response.status, 400);
    assert!(response.body_text().contains("TLS"), "{response:?}");

    // Random bytes that are no TLS record at all.
    let mut noise: Vec<u8> = (0..512).map(|_| fastrand::u8(..)).collect();
    noise[0] = 0x00;
    let mut s = server.tcp();
    s.write_all(&noise).unwrap();
    read_until_end(&mut s, DEADLINE);

    // A TLS handshake record whose contents are noise.
    let mut broken = vec![0x16, 0x03, 0x01, 0x01, 0x00];
    broken.extend((0..256).map(|_| fastrand::u8(..)));
    let mut s = server.tcp();
    s.write_all(&broken).unwrap();
    read_until_end(&mut s, DEADLINE);

    // Half a ClientHello, then hanging up: a handshake abandoned.
    let hello = client_hello(&ca);
    let mut s = server.tcp();
    s.write_all(&hello[..hello.len() / 2]).unwrap();
    drop(s);

    // Half a ClientHello, then silence: closed when the handshake deadline passes, not before.
    let mut s = server.tcp();
    let sent = Instant::now();
    s.write_all(&hello[..hello.len() / 2]).unwrap();
    let (answer, _) = read_until_end(&mut s, DEADLINE);
    let waited = sent.elapsed();
    assert!(answer.is_empty(), "{answer:?}");
    // --handshake-timeout 1s, less one tick of the timer wheel (100 ms).
    assert!(
        waited >= Duration::from_millis(850),
        "closed after {waited:?}"
    );

    good.send(Message::text("still here")).unwrap();
    assert_eq!(good.read().unwrap(), Message::text("still here"));

    let failures = "wsrelay_tls_handshake_failures_total";
    let eof = format!("{failures}{{reason=\"eof\"}}");
    wait_for_tls_metric(&server, &ca, &eof, 1.0);
    let m = tls_metrics(&server, &ca);
    for (reason, want) in [
        ("plain_http", 1.0),
        ("not_tls", 1.0),
        ("protocol", 1.0),
        ("timeout", 1.0),
        ("eof", 1.0),
        ("alert", 0.0),
        ("io", 0.0),
    ] {
        let series = format!("{failures}{{reason=\"{reason}\"}}");
        assert_eq!(m.get(&series), want, "{series}");
    }
    assert_eq!(m.get("wsrelay_http_responses_total{status=\"400\"}"), 1.0);
    assert_eq!(m.get("wsrelay_handshake_timeouts_total"), 1.0);
}

/// A thousand clients handshake at the same time (all connected before any completes, driven
/// by one non-blocking loop): every handshake completes, none fails, the server stays up, and
/// its counters agree.
fn a_thousand_handshakes_at_once(poller: &str) {
    const CLIENTS: usize = 1000;
    rlimit::increase_nofile_limit(u64::MAX).unwrap();
    let ca = TestCa::new();
    // The test is about a thousand handshakes in flight, not about the handshake deadline: on a
    // loaded CI machine the last of them can take longer than the default 10 s (the server
    // then rightly hangs up on it), so the deadline is set past the test's own.
    let server = tls_server(poller, &ca, &["--handshake-timeout", "90s"]);
    let config = ca.client_config();

    let mut poll = mio::Poll::new().unwrap();
    let mut events = mio::Events::with_capacity(1024);
    let mut clients = Vec::with_capacity(CLIENTS);
    for i in 0..CLIENTS {
        let mut socket = mio::net::TcpStream::connect(server.addr).unwrap();
        let both = mio::Interest::READABLE | mio::Interest::WRITABLE;
        poll.registry()
            .register(&mut socket, mio::Token(i), both)
            .unwrap();
        let name = wsrelay::tls::config::server_name("localhost").unwrap();
        let session = wsrelay::tls::TlsSession::client(config.clone(), name).unwrap();
        clients.push((socket, session, false));
    }
    let mut done = 0;
    let start = Instant::now();
    let mut buf = [0u8; 1024];
    while done < CLIENTS {
        assert!(
            start.elapsed() < 6 * DEADLINE,
            "{done} of {CLIENTS} handshakes after {:?}",
            start.elapsed()
        );
        poll.poll(&mut events, Some(Duration::from_millis(100)))
            .unwrap();
        for event in &events {
            let (socket, session, finished) = &mut clients[event.token().0];
            if *finished {
                continue;
            }
            match session.read(socket, &mut buf) {
                Ok(0) => panic!("the server hung up on client {}", event.token().0),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                // The connect has not completed yet.
                Err(e) if e.kind() == std::io::ErrorKind::NotConnected => continue,
                Err(e) => panic!("client {}: {e}", event.token().0),
            }
            match session.write_tls(socket) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotConnected => continue,
                Err(e) => panic!("client {}: {e}", event.token().0),
            }
            if session.take_handshake().is_some() {
                *finished = true;
                done += 1;
            }
        }
    }
    let m = tls_metrics(&server, &ca);
    // The thousand, and this /metrics read.
    assert_eq!(
        m.get("wsrelay_tls_handshakes_total{version=\"TLSv1.3\"}"),
        (CLIENTS + 1) as f64
    );
    assert_eq!(m.get("wsrelay_accepted_total"), (CLIENTS + 1) as f64);
    for (series, value) in m.family("wsrelay_tls_handshake_failures_total") {
        assert_eq!(value, 0.0, "{series}");
    }
    drop(clients);
    // Still serving after they all hung up at once.
    let mut ws = wss(&server, &ca, "/echo");
    ws.send(Message::text("after")).unwrap();
    assert_eq!(ws.read().unwrap(), Message::text("after"));
}

/// SIGHUP after the certificate files were replaced by another CA's pair: new connections get
/// the new certificate (a client trusting only the old CA now refuses it), a connection opened
/// before keeps working. A reload that fails (a broken key file) keeps the new pair in service.
fn sighup_serves_a_new_certificate_to_new_connections_only(poller: &str) {
    let old = TestCa::new();
    let new = TestCa::new();
    let server = tls_server(poller, &old, &[]);
    let mut before = wss(&server, &old, "/echo");
    before.send(Message::text("one")).unwrap();
    assert_eq!(before.read().unwrap(), Message::text("one"));

    old.install_pair_of(&new);
    server.signal("HUP");
    // The reload happens when the loop reads the signal: wait for its effect.
    let start = Instant::now();
    while try_tls(server.addr, new.client_config()).is_err() {
        assert!(
            start.elapsed() < DEADLINE,
            "the new certificate is not served"
        );
        std::thread::sleep(Duration::from_millis(20)); // poll interval, not a synchronisation
    }
    let refused = try_tls(server.addr, old.client_config()).map(|_| ());
    let e = refused.expect_err("the old CA's client accepted the new certificate");
    assert!(e.to_string().contains("certificate"), "{e}");

    before.send(Message::text("two")).unwrap();
    assert_eq!(before.read().unwrap(), Message::text("two"));

    let reloads = "wsrelay_tls_reloads_total";
    let m = tls_metrics(&server, &new);
    assert_eq!(m.get(&format!("{reloads}{{result=\"ok\"}}")), 1.0);
    assert_eq!(m.get(&format!("{reloads}{{result=\"failed\"}}")), 0.0);

    // A key file cut short: the reload fails, and the pair in service stays.
    std::fs::write(&old.key, "-----BEGIN PRIVATE KEY-----\n").unwrap();
    server.signal("HUP");
    wait_for_tls_metric(
        &server,
        &new,
        &format!("{reloads}{{result=\"failed\"}}"),
        1.0,
    );
    let mut after = wss(&server, &new, "/echo");
    after.send(Message::text("three")).unwrap();
    assert_eq!(after.read().unwrap(), Message::text("three"));
    before.send(Message::text("four")).unwrap();
    assert_eq!(before.read().unwrap(), Message::text("four"));
}

/// A plain server (no --tls-cert) takes SIGHUP without ending: it has nothing to reload. The
/// SIGTERM after it is handled (exit 0); had SIGHUP's default action ended the process, it
/// would have died of the signal instead.
#[test]
fn sighup_without_tls_is_harmless() {
    let mut server = Server::start("epoll", &[]);
    server.signal("HUP");
    server.signal("TERM");
    assert_eq!(server.wait_exit(DEADLINE), Some(0));
}

/// Beyond --max-connections the 503 is queued at accept, before the client has said anything:
/// the session holds it until the handshake completes, then sends it, then `close_notify`.
fn over_the_limit_a_tls_client_is_told_503_after_its_handshake(poller: &str) {
    let ca = TestCa::new();
    let server = tls_server(poller, &ca, &["--max-connections", "1"]);
    let mut first = wss(&server, &ca, "/echo");
    let mut second = tls(server.addr, ca.client_config());
    write!(second, "GET /echo HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let (raw, close_notify) = read_tls_to_end(&mut second);
    let response = HttpResponse::parse(&raw);
    assert_eq!(response.status, 503, "{response:?}");
    assert!(close_notify, "the 503 ended without close_notify");
    first.send(Message::text("still served")).unwrap();
    assert_eq!(first.read().unwrap(), Message::text("still served"));
}

/// OpenSSL's `s_client` asks to renegotiate a TLS 1.2 session (its `R` command). rustls
/// answers with a `no_renegotiation` warning, the client gives up with a fatal alert, and the
/// server counts it as a session failure; its other connections go on.
fn a_renegotiation_attempt_ends_only_that_session(poller: &str) {
    use std::process::Stdio;
    let ca = TestCa::new();
    let server = tls_server(poller, &ca, &[]);
    let mut other = wss(&server, &ca, "/echo");
    let mut openssl = Command::new("openssl")
        .args(["s_client", "-connect", &server.addr.to_string(), "-tls1_2"])
        .args([
            "-servername",
            "localhost",
            "-CAfile",
            ca.ca.to_str().unwrap(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the openssl command");
    // `R` at the start of a line: renegotiate (once the handshake is done; s_client reads its
    // input only then). Its stdin stays open, so it does not hang up on its own.
    openssl.stdin.as_mut().unwrap().write_all(b"R\n").unwrap();
    let alerts = "wsrelay_tls_session_failures_total{reason=\"alert\"}";
    wait_for_tls_metric(&server, &ca, alerts, 1.0);
    let _ = openssl.kill();
    let _ = openssl.wait();
    let m = tls_metrics(&server, &ca);
    assert_eq!(
        m.get("wsrelay_tls_handshakes_total{version=\"TLSv1.2\"}"),
        1.0
    );
    other.send(Message::text("unaffected")).unwrap();
    assert_eq!(other.read().unwrap(), Message::text("unaffected"));
}
