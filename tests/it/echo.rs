//! /echo with the independent tungstenite client: every data message comes back unchanged.

use crate::poller_tests;
use crate::support::*;
use std::io::Write;
use tungstenite::Message;

fn echo_text_and_binary_of_every_size(poller: &str) {
    let server = Server::start(poller, &[]);
    let mut ws = server.ws("/echo");
    for size in [0usize, 1, 125, 126, 127, 65_535, 65_536, 200_000, 1 << 20] {
        let text: String = (0..size).map(|i| (b'a' + (i % 26) as u8) as char).collect();
        ws.send(Message::text(text.clone())).unwrap();
        assert_eq!(
            ws.read().unwrap(),
            Message::text(text),
            "text of {size} bytes"
        );

        let binary: Vec<u8> = (0..size).map(|i| (i * 7 % 256) as u8).collect();
        ws.send(Message::binary(binary.clone())).unwrap();
        assert_eq!(
            ws.read().unwrap(),
            Message::binary(binary),
            "binary of {size} bytes"
        );
    }
    ws.close(None).unwrap();
}

fn utf8_text_round_trips(poller: &str) {
    let server = Server::start(poller, &[]);
    let mut ws = server.ws("/echo");
    for text in ["κόσμε", "€ and 𝄞", "日本語のテキスト"] {
        ws.send(Message::text(text)).unwrap();
        assert_eq!(ws.read().unwrap(), Message::text(text));
    }
}

fn fragmented_message_with_ping_between(poller: &str) {
    let server = Server::start(poller, &[]);
    let mut s = raw_upgrade(&server, "/echo");
    let mut bytes = client_frame(0x01, "Hel".as_bytes()); // text, not final
    bytes.extend(client_frame(0x89, b"mid")); // ping between fragments
    bytes.extend(client_frame(0x00, "lo, ".as_bytes()));
    // A multi-byte character split across fragments ("€" = e2 82 ac).
    bytes.extend(client_frame(0x00, &[b'x', 0xe2, 0x82]));
    bytes.extend(client_frame(0x80, &[0xac]));
    s.write_all(&bytes).unwrap();
    assert_eq!(
        read_server_frame(&mut s),
        (0x8a, b"mid".to_vec()),
        "pong first"
    );
    assert_eq!(
        read_server_frame(&mut s),
        (0x81, "Hello, x€".as_bytes().to_vec())
    );
}

fn ping_gets_pong_with_same_payload(poller: &str) {
    let server = Server::start(poller, &[]);
    let mut ws = server.ws("/echo");
    ws.send(Message::Ping(b"are you there".to_vec().into()))
        .unwrap();
    match ws.read().unwrap() {
        Message::Pong(p) => assert_eq!(&p[..], b"are you there"),
        other => panic!("expected pong, got {other:?}"),
    }
    // An unsolicited pong is ignored; the connection still echoes.
    ws.send(Message::Pong(b"x".to_vec().into())).unwrap();
    ws.send(Message::text("still here")).unwrap();
    assert_eq!(ws.read().unwrap(), Message::text("still here"));
}

fn thousand_concurrent_connections(poller: &str) {
    let server = Server::start(poller, &[]);
    let mut clients: Vec<_> = (0..1000).map(|_| server.ws("/echo")).collect();
    for (i, ws) in clients.iter_mut().enumerate() {
        ws.send(Message::text(format!("hello from {i}"))).unwrap();
    }
    for (i, ws) in clients.iter_mut().enumerate() {
        assert_eq!(ws.read().unwrap(), Message::text(format!("hello from {i}")));
    }
    assert_eq!(server.metric("wsrelay_connections{state=\"open\"}"), 1000.0);
    assert_eq!(server.metric("wsrelay_messages_in_total"), 1000.0);
}

poller_tests!(
    echo_text_and_binary_of_every_size,
    utf8_text_round_trips,
    fragmented_message_with_ping_between,
    ping_gets_pong_with_same_payload,
    thousand_concurrent_connections,
);
