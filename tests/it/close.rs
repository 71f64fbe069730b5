//! The close handshake, started by either side (RFC 6455 §5.5.1, §7).

use crate::poller_tests;
use crate::support::*;
use std::io::Write;
use tungstenite::protocol::frame::coding::CloseCode as TCode;
use tungstenite::protocol::CloseFrame;
use tungstenite::{Error, Message};

fn client_initiated_close_is_echoed(poller: &str) {
    let server = Server::start(poller, &[]);
    let mut ws = server.ws("/echo");
    ws.close(Some(CloseFrame {
        code: TCode::Library(4001),
        reason: "bye".into(),
    }))
    .unwrap();
    let reply = match ws.read() {
        Ok(Message::Close(frame)) => frame,
        other => panic!("expected the close reply, got {other:?}"),
    };
    assert_eq!(
        reply.map(|f| u16::from(f.code)),
        Some(4001),
        "same code echoed"
    );
    // tungstenite reports the handshake done without reading on; the socket shows that the
    // server then closed TCP in order.
    assert!(matches!(ws.read(), Err(Error::ConnectionClosed)));
    expect_eof(ws.get_mut());
    assert_eq!(
        server.metric("wsrelay_closes_received_total{code=\"4001\"}"),
        1.0
    );
}

fn empty_close_gets_empty_close(poller: &str) {
    let server = Server::start(poller, &[]);
    let mut s = raw_upgrade(&server, "/echo");
    s.write_all(&client_frame(0x88, b"")).unwrap();
    assert_eq!(read_close_code(&mut s), None);
    expect_eof(&mut s);
}

fn protocol_error_fails_the_connection(poller: &str) {
    let server = Server::start(poller, &[]);
    let mut s = raw_upgrade(&server, "/echo");
    // A protocol error makes the server send Close 1002 and then shut its write side: it does
    // not process anything the client sends afterwards (RFC 6455 §7.1.7) ...
    s.write_all(&client_frame(0x83, b"")).unwrap();
    s.write_all(&client_frame(0x81, b"never echoed")).unwrap();
    assert_eq!(read_close_code(&mut s), Some(1002));
    // ... so the next thing the client sees is EOF, not an echo.
    expect_eof(&mut s);
}

fn close_timeout_ends_a_silent_peer(poller: &str) {
    let server = Server::start(poller, &["--close-timeout", "300ms"]);
    let mut s = raw_upgrade(&server, "/echo");
    s.write_all(&client_frame(0x83, b"")).unwrap();
    assert_eq!(read_close_code(&mut s), Some(1002));
    // We never answer nor hang up; the server gives up at its close deadline.
    server.wait_for_metric("wsrelay_close_timeouts_total", 1.0);
    assert_eq!(server.metric("wsrelay_connections{state=\"closing\"}"), 0.0);
    drop(s);
}

fn peer_close_is_bounded_by_the_close_deadline(poller: &str) {
    // The server's answer to our Close cannot leave: we never read, and its queue toward us is
    // full. The close deadline must end the connection (not the heartbeat, 30 s away).
    let server = Server::start(
        poller,
        &["--close-timeout", "500ms", "--max-outbound", "64M"],
    );
    let mut s = raw_upgrade(&server, "/echo");
    s.set_write_timeout(Some(std::time::Duration::from_millis(500)))
        .unwrap();
    let frame = client_frame(0x82, &vec![7u8; 64 * 1024]);
    // Echoes pile up on the server's side once the socket buffers are full.
    for _ in 0..256 {
        if s.write_all(&frame).is_err() {
            break;
        }
    }
    let _ = s.write_all(&client_frame(0x88, &1000u16.to_be_bytes()));
    server.wait_for_metric("wsrelay_close_timeouts_total", 1.0);
    assert_eq!(server.metric("wsrelay_connections{state=\"closing\"}"), 0.0);
}

fn half_closed_peer_still_gets_its_answers(poller: &str) {
    let server = Server::start(poller, &[]);
    let mut s = raw_upgrade(&server, "/echo");
    // The request and our end of sending arrive together: the echo must still come back.
    s.write_all(&client_frame(0x81, b"last words")).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(read_server_frame(&mut s), (0x81, b"last words".to_vec()));
}

poller_tests!(
    peer_close_is_bounded_by_the_close_deadline,
    half_closed_peer_still_gets_its_answers,
    client_initiated_close_is_echoed,
    empty_close_gets_empty_close,
    protocol_error_fails_the_connection,
    close_timeout_ends_a_silent_peer,
);
