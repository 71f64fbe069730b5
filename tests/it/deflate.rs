//! permessage-deflate over real sockets (SPEC §17, RFC 7692): negotiation in the 101, compressed
//! echo both ways, the size threshold, a room message compressed once for 100 members, a zip
//! bomb, invalid data, and RSV1 where it is not allowed.
//!
//! The peer is built by hand on raw sockets, compressing and inflating with flate2's raw
//! DEFLATE streams directly (not wsrelay's codec), as RFC 7692 §7.2 describes: sync flush, the
//! trailing `00 00 ff ff` removed by the sender and appended by the receiver.

use crate::poller_tests;
use crate::support::*;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
use std::io::Write;
use std::net::TcpStream;
use std::time::Instant;

const BROWSER_OFFER: &str = "permessage-deflate; client_max_window_bits";
const SHARED_ANSWER: &str =
    "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

/// Upgrades a raw socket offering `offer`; returns it after the 101 and the 101's
/// `Sec-WebSocket-Extensions`, if any.
fn upgrade(server: &Server, path: &str, offer: Option<&str>) -> (TcpStream, Option<String>) {
    let mut s = server.tcp();
    let extension = offer.map_or(String::new(), |o| {
        format!("Sec-WebSocket-Extensions: {o}\r\n")
    });
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         {extension}\r\n"
    )
    .unwrap();
    let head = read_http_head(&mut s);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let answered = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.eq_ignore_ascii_case("sec-websocket-extensions"))
        .map(|(_, v)| v.trim().to_string());
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    (s, answered)
}

/// A message compressed as a permessage-deflate sender does (no context takeover).
fn deflate(message: &[u8]) -> Vec<u8> {
    let mut c = Compress::new(Compression::default(), false);
    let mut out = Vec::with_capacity(message.len() + 64);
    loop {
        let consumed = c.total_in() as usize;
        c.compress_vec(&message[consumed..], &mut out, FlushCompress::Sync)
            .unwrap();
        if c.total_in() as usize == message.len() && out.len() < out.capacity() {
            break;
        }
        out.reserve(out.capacity());
    }
    assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
    out.truncate(out.len() - 4);
    out
}

/// The message a compressed payload stands for (RFC 7692 §7.2.2).
fn inflate(payload: &[u8]) -> Vec<u8> {
    let mut d = Decompress::new(false);
    let mut input = payload.to_vec();
    input.extend_from_slice(&[0, 0, 0xff, 0xff]);
    let mut out = Vec::with_capacity(input.len() * 8 + 64);
    loop {
        let consumed = d.total_in() as usize;
        d.decompress_vec(&input[consumed..], &mut out, FlushDecompress::Sync)
            .unwrap();
        if d.total_in() as usize == input.len() && out.len() < out.capacity() {
            return out;
        }
        out.reserve(out.capacity());
    }
}

/// About `n` bytes of chat JSON: what permessage-deflate is for.
fn chat_json(n: usize) -> String {
    let mut s = String::from("[");
    let mut i = 0;
    while s.len() < n {
        s.push_str(&format!(
            r#"{{"type":"message","room":"lobby","from":"user{}","text":"hello number {i}"}},"#,
            i % 7
        ));
        i += 1;
    }
    s.truncate(n - 1);
    s.push(']');
    s
}

const TEXT: u8 = 0x1;
const FIN: u8 = 0x80;
const RSV1: u8 = 0x40;

fn browser_offer_is_answered_and_echo_is_compressed_both_ways(poller: &str) {
    let server = Server::start(poller, &[]);
    let (mut s, answered) = upgrade(&server, "/echo", Some(BROWSER_OFFER));
    assert_eq!(answered.as_deref(), Some(SHARED_ANSWER));

    let message = chat_json(1024);
    let compressed = deflate(message.as_bytes());
    s.write_all(&client_frame(FIN | RSV1 | TEXT, &compressed))
        .unwrap();
    let (b0, payload) = read_server_frame(&mut s);
    assert_eq!(b0, FIN | RSV1 | TEXT, "the echo comes back compressed");
    assert!(payload.len() * 3 < message.len(), "{} bytes", payload.len());
    assert_eq!(inflate(&payload), message.as_bytes());

    // A plain message is fine too (RSV1 is per message); a short echo goes back plain.
    s.write_all(&client_frame(FIN | TEXT, b"short")).unwrap();
    assert_eq!(read_server_frame(&mut s), (FIN | TEXT, b"short".to_vec()));
    // A compressed message split over fragments: RSV1 on the first only (RFC 7692 §6.1).
    let (a, b) = compressed.split_at(compressed.len() / 2);
    s.write_all(&client_frame(RSV1 | TEXT, a)).unwrap();
    s.write_all(&client_frame(FIN, b)).unwrap();
    let (b0, payload) = read_server_frame(&mut s);
    assert_eq!(b0, FIN | RSV1 | TEXT);
    assert_eq!(inflate(&payload), message.as_bytes());

    let m = server.metrics();
    assert_eq!(m.get("wsrelay_compressed_messages_in_total"), 2.0);
    assert_eq!(m.get("wsrelay_compressed_messages_out_total"), 2.0);
    assert_eq!(m.get("wsrelay_compressions_total"), 2.0);
    assert_eq!(m.get("wsrelay_compression_small_messages_out_total"), 1.0);
    assert_eq!(m.get("wsrelay_inflated_bytes_in_total"), 2048.0);
    assert!(m.get("wsrelay_compression_ratio") > 3.0);
    assert_eq!(m.get("wsrelay_inflate_errors_total"), 0.0);
}

fn no_extension_when_off_or_not_offered(poller: &str) {
    let off = Server::start(poller, &["--compression", "off"]);
    let (mut s, answered) = upgrade(&off, "/echo", Some(BROWSER_OFFER));
    assert_eq!(answered, None);
    // Then RSV1 is a protocol error (RFC 6455 §5.2).
    let compressed = deflate(chat_json(200).as_bytes());
    s.write_all(&client_frame(FIN | RSV1 | TEXT, &compressed))
        .unwrap();
    assert_eq!(read_close_code(&mut s), Some(1002));

    let on = Server::start(poller, &[]);
    let (mut s, answered) = upgrade(&on, "/echo", None);
    assert_eq!(answered, None);
    let message = chat_json(1024);
    s.write_all(&client_frame(FIN | TEXT, message.as_bytes()))
        .unwrap();
    assert_eq!(
        read_server_frame(&mut s),
        (FIN | TEXT, message.into_bytes()),
        "a client that did not offer gets plain frames"
    );
    s.write_all(&client_frame(FIN | RSV1 | TEXT, &compressed))
        .unwrap();
    assert_eq!(read_close_code(&mut s), Some(1002));
}

fn rsv1_on_control_or_continuation_is_a_protocol_error(poller: &str) {
    let server = Server::start(poller, &[]);
    let (mut s, _) = upgrade(&server, "/echo", Some(BROWSER_OFFER));
    s.write_all(&client_frame(FIN | RSV1 | 0x9, b"ping"))
        .unwrap();
    assert_eq!(read_close_code(&mut s), Some(1002), "RSV1 on a Ping");

    let (mut s, _) = upgrade(&server, "/echo", Some(BROWSER_OFFER));
    let compressed = deflate(chat_json(300).as_bytes());
    let (a, b) = compressed.split_at(10);
    s.write_all(&client_frame(RSV1 | TEXT, a)).unwrap();
    s.write_all(&client_frame(FIN | RSV1, b)).unwrap();
    assert_eq!(
        read_close_code(&mut s),
        Some(1002),
        "RSV1 on a continuation"
    );
    assert_eq!(server.metric("wsrelay_compressed_messages_in_total"), 0.0);
}

fn invalid_deflate_data_closes_1007(poller: &str) {
    let server = Server::start(poller, &[]);
    let (mut s, _) = upgrade(&server, "/echo", Some(BROWSER_OFFER));
    // Block type 3 is reserved in DEFLATE (RFC 1951 §3.2.3).
    s.write_all(&client_frame(FIN | RSV1 | TEXT, &[0xff, 0xff, 0xff]))
        .unwrap();
    assert_eq!(read_close_code(&mut s), Some(1007));
    // Valid DEFLATE whose text is not UTF-8: checked after inflating.
    let (mut s, _) = upgrade(&server, "/echo", Some(BROWSER_OFFER));
    s.write_all(&client_frame(
        FIN | RSV1 | TEXT,
        &deflate(b"caf\xe9 au lait"),
    ))
    .unwrap();
    assert_eq!(read_close_code(&mut s), Some(1007));
    assert_eq!(server.metric("wsrelay_inflate_errors_total"), 2.0);
}

/// The server's resident set high-water mark, in KiB (Linux).
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn zip_bomb_closes_1009_with_memory_bounded(poller: &str) {
    let server = Server::start(poller, &["--max-message", "1M"]);
    // Warm up: one ordinary compressed echo, so the codecs exist before the baseline.
    let (mut s, _) = upgrade(&server, "/echo", Some(BROWSER_OFFER));
    let message = chat_json(2000);
    s.write_all(&client_frame(
        FIN | RSV1 | TEXT,
        &deflate(message.as_bytes()),
    ))
    .unwrap();
    read_server_frame(&mut s);
    let baseline = peak_rss_kib(server.pid());

    // 512 MiB of zeros compress to about 500 KiB; 16 MiB to about 16 KiB, far under the
    // 1 MiB --max-message the compressed frame itself is held to.
    let bomb = deflate(&vec![0u8; 16 << 20]);
    assert!(bomb.len() < 20 * 1024, "{} bytes", bomb.len());
    let (mut s, _) = upgrade(&server, "/echo", Some(BROWSER_OFFER));
    s.write_all(&client_frame(FIN | RSV1 | 0x2, &bomb)).unwrap();
    assert_eq!(read_close_code(&mut s), Some(1009));
    let grown = peak_rss_kib(server.pid()).saturating_sub(baseline);
    // At most --max-message of output, and the frame: a few MiB, never the 16 MiB.
    assert!(grown < 4 * 1024, "peak RSS grew by {grown} KiB");
    assert_eq!(server.metric("wsrelay_inflate_errors_total"), 1.0);
}

fn room_message_is_compressed_once_for_100_members(poller: &str) {
    // One worker, whatever TEST_WORKERS says: with several, each worker with members
    // compresses the message once for its own (SPEC §14), so the count below is per worker.
    let server = Server::start(poller, &["--workers", "1"]);
    let mut members: Vec<TcpStream> = (0..100)
        .map(|_| {
            let (s, answered) = upgrade(&server, "/r/deflated", Some(BROWSER_OFFER));
            assert_eq!(answered.as_deref(), Some(SHARED_ANSWER));
            s
        })
        .collect();
    // The room is complete before anyone speaks.
    let deadline = Instant::now() + DEADLINE;
    while server.metric("wsrelay_room_members{kind=\"raw\"}") < 100.0 {
        assert!(Instant::now() < deadline, "members did not all join");
        std::thread::yield_now();
    }
    const MESSAGES: usize = 10;
    let sent: Vec<String> = (0..MESSAGES)
        .map(|i| format!("{}#{i}", chat_json(1000)))
        .collect();
    for m in &sent {
        members[0]
            .write_all(&client_frame(FIN | RSV1 | TEXT, &deflate(m.as_bytes())))
            .unwrap();
    }
    for member in &mut members[1..] {
        for m in &sent {
            let (b0, payload) = read_server_frame(member);
            assert_eq!(b0, FIN | RSV1 | TEXT);
            assert_eq!(inflate(&payload), m.as_bytes());
        }
    }
    let m = server.metrics();
    assert_eq!(
        m.get("wsrelay_compressions_total"),
        MESSAGES as f64,
        "one compression per message, not per member"
    );
    assert_eq!(
        m.get("wsrelay_compressed_messages_out_total"),
        (MESSAGES * 99) as f64
    );
    assert_eq!(
        m.get("wsrelay_compressed_messages_in_total"),
        MESSAGES as f64
    );
}

fn dedicated_mode_keeps_context_between_messages(poller: &str) {
    let server = Server::start(poller, &["--compression", "dedicated"]);
    let (mut s, answered) = upgrade(
        &server,
        "/echo",
        Some("permessage-deflate; client_no_context_takeover"),
    );
    assert_eq!(
        answered.as_deref(),
        Some("permessage-deflate; client_no_context_takeover")
    );
    // The server keeps its window: the second echo of the same message refers to the first.
    let message = chat_json(600);
    let mut d = Decompress::new(false);
    let mut sizes = Vec::new();
    for _ in 0..2 {
        s.write_all(&client_frame(
            FIN | RSV1 | TEXT,
            &deflate(message.as_bytes()),
        ))
        .unwrap();
        let (b0, mut payload) = read_server_frame(&mut s);
        assert_eq!(b0, FIN | RSV1 | TEXT);
        sizes.push(payload.len());
        payload.extend_from_slice(&[0, 0, 0xff, 0xff]);
        let mut out = Vec::with_capacity(message.len() + 16);
        d.decompress_vec(&payload, &mut out, FlushDecompress::Sync)
            .unwrap();
        assert_eq!(out, message.as_bytes());
    }
    assert!(sizes[1] * 4 < sizes[0], "{sizes:?}");
}

fn pipelined_compressed_frame_behind_the_request_is_read(poller: &str) {
    let server = Server::start(poller, &[]);
    let mut s = server.tcp();
    let message = chat_json(500);
    let mut bytes = format!(
        "GET /echo HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Extensions: {BROWSER_OFFER}\r\n\r\n"
    )
    .into_bytes();
    bytes.extend(client_frame(
        FIN | RSV1 | TEXT,
        &deflate(message.as_bytes()),
    ));
    s.write_all(&bytes).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    let head = read_http_head(&mut s);
    assert!(head.contains(SHARED_ANSWER), "{head}");
    let (b0, payload) = read_server_frame(&mut s);
    assert_eq!(b0, FIN | RSV1 | TEXT);
    assert_eq!(inflate(&payload), message.as_bytes());
}

poller_tests!(
    browser_offer_is_answered_and_echo_is_compressed_both_ways,
    no_extension_when_off_or_not_offered,
    rsv1_on_control_or_continuation_is_a_protocol_error,
    invalid_deflate_data_closes_1007,
    zip_bomb_closes_1009_with_memory_bounded,
    room_message_is_compressed_once_for_100_members,
    dedicated_mode_keeps_context_between_messages,
    pipelined_compressed_frame_behind_the_request_is_read,
);
