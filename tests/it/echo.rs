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

/// Many messages in one read are handed to the app in runs (docs/benchmarks.md, "A fast path
/// for whole small frames"); a run ends at anything that is not a whole one-frame message. In
/// one write: binary and text messages, a Ping between them, a fragmented message, more
/// messages, then text that is not UTF-8 and a message behind it. Everything before the bad
/// frame comes back in order, the Pong in its place, then Close 1007, and the message after
/// the bad frame is never echoed.
fn a_run_of_messages_in_one_read_keeps_its_order_and_stops_at_a_bad_frame(poller: &str) {
    let server = Server::start(poller, &[]);
    let mut s = raw_upgrade(&server, "/echo");
    let mut bytes = Vec::new();
    let mut want = Vec::new();
    for i in 0..20 {
        let payload = format!("binary {i}").into_bytes();
        bytes.extend(client_frame(0x82, &payload));
        want.push((0x82, payload));
    }
    bytes.extend(client_frame(0x89, b"between"));
    want.push((0x8a, b"between".to_vec()));
    for i in 0..20 {
        let payload = format!("text {i} \u{20ac}").into_bytes();
        bytes.extend(client_frame(0x81, &payload));
        want.push((0x81, payload));
    }
    bytes.extend(client_frame(0x01, b"frag"));
    bytes.extend(client_frame(0x80, b"ment"));
    want.push((0x81, b"fragment".to_vec()));
    for size in [125, 126, 1000] {
        let payload = vec![b'z'; size];
        bytes.extend(client_frame(0x82, &payload));
        want.push((0x82, payload));
    }
    bytes.extend(client_frame(0x81, &[b'o', b'k', 0xC3, b'(']));
    bytes.extend(client_frame(0x82, b"after the bad frame"));
    s.write_all(&bytes).unwrap();
    for (i, expected) in want.iter().enumerate() {
        assert_eq!(&read_server_frame(&mut s), expected, "frame {i}");
    }
    let (b0, payload) = read_server_frame(&mut s);
    assert_eq!(b0, 0x88, "Close, not the message after the bad frame");
    assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), 1007);
    assert_eq!(server.metric("wsrelay_messages_in_total"), 44.0);
}

/// SPEC §6: `--rate` applies to /echo too. A burst in one read goes to the app as a run; the
/// limit's close ends the run, so the messages behind it are not handed to the app at all:
/// five echoes, Close 1008, and the limit counted once (the app would count every message it
/// was handed past the limit).
fn the_rate_limit_ends_a_run_of_echoes(poller: &str) {
    let server = Server::start(poller, &["--rate", "1", "--burst", "5"]);
    let mut s = raw_upgrade(&server, "/echo");
    let mut bytes = Vec::new();
    for i in 0..12 {
        bytes.extend(client_frame(0x82, format!("m{i}").as_bytes()));
    }
    s.write_all(&bytes).unwrap();
    for i in 0..5 {
        assert_eq!(
            read_server_frame(&mut s),
            (0x82, format!("m{i}").into_bytes())
        );
    }
    let (b0, payload) = read_server_frame(&mut s);
    assert_eq!(b0, 0x88);
    assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), 1008);
    assert_eq!(server.metric("wsrelay_rate_limited_total"), 1.0);
    assert_eq!(server.metric("wsrelay_messages_in_total"), 6.0);
}

poller_tests!(
    a_run_of_messages_in_one_read_keeps_its_order_and_stops_at_a_bad_frame,
    the_rate_limit_ends_a_run_of_echoes,
    echo_text_and_binary_of_every_size,
    utf8_text_round_trips,
    fragmented_message_with_ping_between,
    ping_gets_pong_with_same_payload,
    thousand_concurrent_connections,
);
