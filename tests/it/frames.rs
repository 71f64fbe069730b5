//! Invalid frames: each gets the close code SPEC §4 names, and is counted.

use crate::poller_tests;
use crate::support::*;
use std::io::Write;

/// (name, bytes sent after the upgrade, expected close code)
fn cases() -> Vec<(&'static str, Vec<u8>, u16)> {
    let mut unmasked = vec![0x81, 0x02];
    unmasked.extend_from_slice(b"hi");
    let mut top_bit = vec![0x82, 0x80 | 127];
    top_bit.extend_from_slice(&(1u64 << 63).to_be_bytes());
    top_bit.extend_from_slice(&[1, 2, 3, 4]);
    let mut fragmented_twice = client_frame(0x01, b"a");
    fragmented_twice.extend(client_frame(0x01, b"b"));
    // Only the first fragment is sent: failing fast means the close comes without the rest.
    let invalid_first_fragment = client_frame(
        0x01,
        &[
            0xce, 0xba, 0xe1, 0xbd, 0xb9, 0xcf, 0x83, 0xce, 0xbc, 0xce, 0xb5, 0xf4, 0x90,
        ],
    );
    // A 200-byte text frame of which only the first 40 bytes ever arrive, invalid at byte 12:
    // the close must come without the rest of the frame (Autobahn 6.4.x, strict).
    let mut bad_text = "κόσμε".as_bytes().to_vec();
    bad_text.extend_from_slice(&[0xf4, 0x90, 0x80, 0x80]);
    bad_text.resize(200, b'a');
    let mut incomplete_invalid_frame = client_frame(0x81, &bad_text);
    incomplete_invalid_frame.truncate(2 + 2 + 4 + 40);
    vec![
        (
            "incomplete text frame, invalid so far",
            incomplete_invalid_frame,
            1007,
        ),
        ("unmasked client frame", unmasked, 1002),
        ("rsv1 without extension", client_frame(0xc1, b"x"), 1002),
        ("rsv3", client_frame(0x92, b"x"), 1002),
        ("reserved data opcode 3", client_frame(0x83, b""), 1002),
        ("reserved control opcode 0xb", client_frame(0x8b, b""), 1002),
        ("fragmented ping", client_frame(0x09, b""), 1002),
        ("ping over 125 bytes", client_frame(0x89, &[0u8; 126]), 1002),
        ("continuation without start", client_frame(0x80, b"x"), 1002),
        ("new message inside fragmented", fragmented_twice, 1002),
        ("64-bit length with top bit", top_bit, 1002),
        (
            "invalid utf-8 text",
            client_frame(0x81, &[0xff, 0xfe]),
            1007,
        ),
        (
            "invalid utf-8 in first fragment",
            invalid_first_fragment,
            1007,
        ),
        ("close with one byte", client_frame(0x88, &[0x03]), 1002),
        (
            "close code 999",
            client_frame(0x88, &999u16.to_be_bytes()),
            1002,
        ),
        (
            "close code 1005",
            client_frame(0x88, &1005u16.to_be_bytes()),
            1002,
        ),
        (
            "close code 1016",
            client_frame(0x88, &1016u16.to_be_bytes()),
            1002,
        ),
        (
            "close code 5000",
            client_frame(0x88, &5000u16.to_be_bytes()),
            1002,
        ),
        (
            "close reason invalid utf-8",
            client_frame(0x88, &[0x03, 0xe8, 0xff]),
            1007,
        ),
        (
            "message over --max-message",
            client_frame(0x82, &vec![0u8; 70_000]),
            1009,
        ),
    ]
}

fn invalid_frames_get_their_close_codes(poller: &str) {
    let server = Server::start(poller, &["--max-message", "64K"]);
    let mut expected_1002 = 0.0;
    for (name, bytes, code) in cases() {
        let mut s = raw_upgrade(&server, "/echo");
        s.write_all(&bytes).unwrap();
        assert_eq!(read_close_code(&mut s), Some(code), "{name}");
        // Complete the handshake as a well-behaved client would; the server then closes TCP.
        let _ = s.write_all(&client_frame(0x88, &code.to_be_bytes()));
        expect_eof(&mut s);
        if code == 1002 {
            expected_1002 += 1.0;
        }
    }
    assert_eq!(
        server.metric("wsrelay_closes_sent_total{code=\"1002\"}"),
        expected_1002
    );
    assert_eq!(
        server.metric("wsrelay_closes_sent_total{code=\"1009\"}"),
        1.0
    );
    assert!(
        server.metric("wsrelay_protocol_errors_total{reason=\"client frame not masked\"}") >= 1.0
    );
}

fn fragmented_message_over_limit_gets_1009(poller: &str) {
    let server = Server::start(poller, &["--max-message", "64K"]);
    let mut s = raw_upgrade(&server, "/echo");
    // A never-ending fragmented message: the server must stop it at the limit.
    let chunk = vec![b'a'; 16 * 1024];
    s.write_all(&client_frame(0x01, &chunk)).unwrap();
    for _ in 0..10 {
        // The server may already have closed; a failed write is the expected outcome then.
        if s.write_all(&client_frame(0x00, &chunk)).is_err() {
            break;
        }
    }
    assert_eq!(read_close_code(&mut s), Some(1009));
}

fn control_frames_fit_when_the_message_budget_is_nearly_used(poller: &str) {
    let server = Server::start(poller, &["--max-message", "64K"]);
    let mut s = raw_upgrade(&server, "/echo");
    // A fragment that leaves 6 bytes of the 64 KiB budget, then a 10-byte Ping, then the end.
    s.write_all(&client_frame(0x02, &vec![1u8; 65_530]))
        .unwrap();
    s.write_all(&client_frame(0x89, b"0123456789")).unwrap();
    assert_eq!(read_server_frame(&mut s), (0x8a, b"0123456789".to_vec()));
    s.write_all(&client_frame(0x80, &[2u8; 6])).unwrap();
    let (b0, payload) = read_server_frame(&mut s);
    assert_eq!(b0, 0x82);
    assert_eq!(payload.len(), 65_536);
}

poller_tests!(
    control_frames_fit_when_the_message_budget_is_nearly_used,
    invalid_frames_get_their_close_codes,
    fragmented_message_over_limit_gets_1009,
);
