//! Bad clients are normal clients (SPEC §2, §3, §5): slowloris, half-open peers, slow
//! consumers, floods of garbage, descriptor exhaustion, limits, and shutdown.

use crate::poller_tests;
use crate::support::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tungstenite::Message;

/// A client that never finishes its head, trickling one byte every 50 ms, is closed at the
/// handshake deadline (SPEC §3: the slowloris defence): its bytes do not extend the deadline.
fn slowloris_is_closed_at_the_handshake_deadline(poller: &str) {
    let server = Server::start(poller, &["--handshake-timeout", "500ms"]);
    // Taken before connecting, so it is no later than the server's accept: the deadline cannot
    // pass before `start + 500ms` (the timer wheel never fires early, docs/timer-wheel.md).
    let start = Instant::now();
    let mut s = server.tcp();
    // A head that never ends: a header line that goes on for as long as we keep sending.
    let head = b"GET /echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nX-Slow: ";
    let mut bytes = head.iter().copied().chain(std::iter::repeat(b'a'));
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap(); // the pace
    let mut buf = [0u8; 64];
    let ending = loop {
        // If the bytes extended the deadline, the server would never close: fail, not hang.
        assert!(
            start.elapsed() < DEADLINE,
            "still open after {DEADLINE:?} of trickling"
        );
        if s.write_all(&[bytes.next().unwrap()]).is_err() {
            break read_until_end(&mut s, DEADLINE).1; // the server is gone: see how it ended
        }
        match s.read(&mut buf) {
            Ok(0) => break Ending::Eof,
            Ok(n) => panic!("an answer to half a head: {:?}", &buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break Ending::Reset,
            Err(_) => {} // 50 ms passed: the next byte
        }
    };
    // Either ending is the server's: we keep sending, so a byte can land between its last read
    // and its close, and the kernel then resets instead of sending a FIN.
    assert!(
        start.elapsed() >= Duration::from_millis(500),
        "closed before the deadline ({ending:?})"
    );
    assert_eq!(server.metric("wsrelay_handshake_timeouts_total"), 1.0);
}

fn half_open_peer_is_dropped_and_a_live_one_is_not(poller: &str) {
    let server = Server::start(
        poller,
        &[
            "--heartbeat-interval",
            "300ms",
            "--heartbeat-timeout",
            "300ms",
        ],
    );
    // The silent peer: upgraded, then never reads or answers pings.
    let _silent = raw_upgrade(&server, "/echo");

    // The live peer: keeps reading, so tungstenite answers every ping with a pong.
    let mut live = server.ws("/echo");
    live.get_mut()
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut pings = 0;
            while !stop.load(Ordering::Relaxed) {
                match live.read() {
                    Ok(Message::Ping(_)) => pings += 1,
                    Ok(_) => {}
                    Err(tungstenite::Error::Io(e))
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(e) => panic!("live peer lost: {e}"),
                }
            }
            (live, pings)
        })
    };
    server.wait_for_metric("wsrelay_half_open_drops_total", 1.0);
    stop.store(true, Ordering::Relaxed);
    let (mut live, pings) = reader.join().unwrap();
    assert!(pings >= 1, "the live peer was pinged");
    live.get_mut().set_read_timeout(Some(DEADLINE)).unwrap();
    live.send(Message::text("still here")).unwrap();
    loop {
        match live.read().unwrap() {
            Message::Text(t) => {
                assert_eq!(t.as_str(), "still here");
                break;
            }
            _ => continue,
        }
    }
    assert_eq!(server.metric("wsrelay_half_open_drops_total"), 1.0);
}

fn heartbeat_pings_every_interval_of_silence(poller: &str) {
    // The pong deadline is long: the next Ping must follow one interval after the Pong, not
    // after the deadline.
    let server = Server::start(
        poller,
        &[
            "--heartbeat-interval",
            "200ms",
            "--heartbeat-timeout",
            "60s",
        ],
    );
    let mut ws = server.ws("/echo");
    let mut pings = 0;
    while pings < 5 {
        // tungstenite answers each Ping with a Pong as part of reading.
        match ws.read().expect("pinged within the deadline") {
            Message::Ping(_) => pings += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(server.metric("wsrelay_half_open_drops_total"), 0.0);
}

/// A client that sends echo requests as fast as it can and never reads the replies.
/// The thread hands the socket back when stopped, so the caller decides when it closes.
fn flood_without_reading(
    server: &Server,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<TcpStream> {
    let mut s = raw_upgrade(server, "/echo");
    s.set_write_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let frame = client_frame(0x82, &vec![0x5a; 16 * 1024]);
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            // Blocks (times out) once the server stops reading or the buffers fill: fine.
            let _ = s.write_all(&frame);
        }
        s
    })
}

/// The queue toward a consumer that never reads is capped: past `--max-outbound` the server
/// closes it with 1008 (SPEC §2). What that bound saves in memory is measured by
/// `cargo bench --bench bounds` (docs/benchmarks.md), not asserted here.
fn slow_consumer_is_closed_at_the_outbound_limit(poller: &str) {
    let server = Server::start(poller, &["--max-outbound", "256K"]);
    let stop = Arc::new(AtomicBool::new(false));
    let flooder = flood_without_reading(&server, Arc::clone(&stop));
    // Meanwhile a well-behaved client is served normally.
    let mut other = server.ws("/echo");
    server.wait_for_metric("wsrelay_slow_consumer_closes_total", 1.0);
    for i in 0..100 {
        other.send(Message::text(format!("m{i}"))).unwrap();
        assert_eq!(other.read().unwrap(), Message::text(format!("m{i}")));
    }
    stop.store(true, Ordering::Relaxed);
    flooder.join().unwrap();
    assert_eq!(
        server.metric("wsrelay_closes_sent_total{code=\"1008\"}"),
        1.0
    );
    assert_eq!(server.metric("wsrelay_connections{state=\"open\"}"), 1.0);
}

fn slow_consumer_drop_policy_keeps_the_connection(poller: &str) {
    let server = Server::start(
        poller,
        &["--max-outbound", "256K", "--slow-consumer", "drop"],
    );
    let stop = Arc::new(AtomicBool::new(false));
    let flooder = flood_without_reading(&server, Arc::clone(&stop));
    let start = Instant::now();
    while server.metric("wsrelay_slow_consumer_drops_total") < 1.0 {
        assert!(start.elapsed() < DEADLINE, "no drop counted");
        std::thread::sleep(Duration::from_millis(20)); // poll interval
    }
    stop.store(true, Ordering::Relaxed);
    let _flooder = flooder.join().unwrap();
    let metrics = server.metrics();
    assert_eq!(metrics.get("wsrelay_slow_consumer_closes_total"), 0.0);
    assert_eq!(metrics.get("wsrelay_connections{state=\"open\"}"), 1.0);
    assert_eq!(
        metrics.family("wsrelay_closes_sent_total"),
        vec![],
        "no Close was sent"
    );
}

fn max_connections_gets_503(poller: &str) {
    let server = Server::start(poller, &["--max-connections", "5"]);
    let mut clients: Vec<_> = (0..5).map(|_| server.ws("/echo")).collect();
    let refused = server.get("/healthz");
    assert_eq!(refused.status, 503, "{}", refused.head);
    assert!(!refused.body.is_empty());
    // The five are unaffected; after one leaves, a newcomer gets in.
    for ws in clients.iter_mut() {
        ws.send(Message::text("x")).unwrap();
        assert_eq!(ws.read().unwrap(), Message::text("x"));
    }
    drop(clients.pop());
    let start = Instant::now();
    loop {
        let r = server.get("/healthz");
        if r.status == 200 {
            break;
        }
        assert!(start.elapsed() < DEADLINE, "slot never freed");
    }
    assert!(server.metric("wsrelay_rejected_total{reason=\"max_connections\"}") >= 1.0);
}

fn sigterm_closes_every_client_with_1001(poller: &str) {
    // A deadline far beyond the test's: the server must exit because the last client closed,
    // not because the shutdown deadline passed.
    let mut server = Server::start(poller, &["--shutdown-timeout", "60s"]);
    let mut clients: Vec<_> = (0..100).map(|_| raw_upgrade(&server, "/echo")).collect();
    // Make sure all 100 are open before the signal.
    for s in clients.iter_mut() {
        s.write_all(&client_frame(0x81, b"hi")).unwrap();
        assert_eq!(read_server_frame(s), (0x81, b"hi".to_vec()));
    }
    server.signal("TERM");
    for s in clients.iter_mut() {
        assert_eq!(read_close_code(s), Some(1001));
        s.write_all(&client_frame(0x88, &1001u16.to_be_bytes()))
            .unwrap();
        expect_eof(s);
    }
    assert_eq!(server.wait_exit(DEADLINE), Some(0));
}

fn shutdown_deadline_ends_unresponsive_clients(poller: &str) {
    let mut server = Server::start(poller, &["--shutdown-timeout", "300ms"]);
    // This client never answers the Close.
    let mut s = raw_upgrade(&server, "/echo");
    server.signal("INT");
    assert_eq!(read_close_code(&mut s), Some(1001));
    assert_eq!(server.wait_exit(DEADLINE), Some(0));
}

fn second_signal_exits_at_once(poller: &str) {
    let mut server = Server::start(poller, &["--shutdown-timeout", "60s"]);
    let mut s = raw_upgrade(&server, "/echo");
    server.signal("TERM");
    assert_eq!(read_close_code(&mut s), Some(1001));
    server.signal("TERM");
    assert_eq!(server.wait_exit(DEADLINE), Some(130));
}

fn descriptor_exhaustion_pauses_accept_and_recovers(poller: &str) {
    // 64 descriptors: stdio, the poller, the listener, the signal pipe, the rest connections.
    let server = Server::start_with_fd_limit(poller, 64, &[]);
    let mut open = Vec::new();
    // Fill the server up: raw connections that complete the upgrade.
    loop {
        let mut s = server.tcp();
        s.write_all(
            b"GET /echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        .unwrap();
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut byte = [0u8; 1];
        match s.read(&mut byte) {
            Ok(1) => {
                s.set_read_timeout(Some(DEADLINE)).unwrap();
                let mut head = vec![byte[0]];
                while !head.ends_with(b"\r\n\r\n") {
                    s.read_exact(&mut byte).unwrap();
                    head.push(byte[0]);
                }
                open.push(s);
            }
            // No answer: the server is out of descriptors and has paused accepting. This
            // connection waits in the kernel's backlog.
            _ => {
                open.push(s);
                break;
            }
        }
        assert!(open.len() < 100, "the descriptor limit never bit");
    }
    let waiting = open.pop().unwrap();
    let served = open.len();
    assert!(served > 40, "only {served} connections before exhaustion");

    // While paused, the waiting client is not answered (that the server does not spin
    // meanwhile is measured by `cargo bench --bench bounds`, docs/benchmarks.md) ...
    let mut probe = waiting;
    probe
        .set_read_timeout(Some(Duration::from_millis(1000)))
        .unwrap();
    let mut byte = [0u8; 1];
    match probe.read(&mut byte) {
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) => {}
        other => panic!("the waiting client was answered while exhausted: {other:?}"),
    }

    // ... and the existing connections keep working.
    for s in open.iter_mut().take(10) {
        s.write_all(&client_frame(0x81, b"alive")).unwrap();
        assert_eq!(read_server_frame(s), (0x81, b"alive".to_vec()));
    }

    // Clients leave: the waiting one is accepted and upgraded.
    open.truncate(served - 10);
    probe.set_read_timeout(Some(DEADLINE)).unwrap();
    let head = read_http_head(&mut probe);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    probe.write_all(&client_frame(0x81, b"in")).unwrap();
    assert_eq!(read_server_frame(&mut probe), (0x81, b"in".to_vec()));
    assert!(server.metric("wsrelay_accept_pauses_total") >= 1.0);
}

fn metrics_parse_and_match_what_happened(poller: &str) {
    let server = Server::start(poller, &[]);
    let mut clients: Vec<_> = (0..3).map(|_| server.ws("/echo")).collect();
    for ws in clients.iter_mut() {
        for i in 0..7 {
            ws.send(Message::binary(vec![i; 10])).unwrap();
            assert_eq!(ws.read().unwrap(), Message::binary(vec![i; 10]));
        }
    }
    let mut bad = raw_upgrade(&server, "/echo");
    bad.write_all(&client_frame(0xc1, b"x")).unwrap();
    assert_eq!(read_close_code(&mut bad), Some(1002));
    let _ = server.get("/nope");

    // Parsing checks the text format line by line (support::Metrics).
    let metrics = server.metrics();
    let get = |series: &str| metrics.get(series);
    assert_eq!(get("wsrelay_messages_in_total"), 21.0);
    assert_eq!(get("wsrelay_messages_out_total"), 21.0);
    assert_eq!(get("wsrelay_upgrades_total"), 4.0);
    // 3 + 1 upgrades, the 404, and this /metrics request itself.
    assert_eq!(get("wsrelay_accepted_total"), 6.0);
    assert_eq!(get("wsrelay_http_responses_total{status=\"404\"}"), 1.0);
    assert_eq!(get("wsrelay_closes_sent_total{code=\"1002\"}"), 1.0);
    assert_eq!(
        get("wsrelay_protocol_errors_total{reason=\"reserved bits set\"}"),
        1.0
    );
    assert_eq!(get("wsrelay_connections{state=\"open\"}"), 3.0);
    assert_eq!(
        get(&format!("wsrelay_poller_info{{poller=\"{poller}\"}}")),
        1.0
    );
    assert!(get("wsrelay_bytes_in_total") > 21.0 * 16.0);
    assert!(get("wsrelay_poll_wakeups_total") >= 1.0);
}

/// What RFC 6455 (§5.2, §5.5) and SPEC §4 make of a frame that starts with `junk`, from its
/// header alone: `Some(code)` when the header already fails the connection, `None` when the
/// outcome depends on what follows (the payload, or bytes that never come).
fn verdict_on_first_header(junk: &[u8], max_message: u64) -> Option<u16> {
    let (b0, b1) = (junk[0], *junk.get(1)?);
    let (fin, opcode, masked) = (b0 & 0x80 != 0, b0 & 0x0f, b1 & 0x80 != 0);
    let reserved_bits = b0 & 0x70 != 0; // no extension was agreed
                                        // Opcode 0 continues nothing at the start of a connection; 3-7 and 0xb-0xf are reserved.
    let known_opcode = matches!(opcode, 0x1 | 0x2 | 0x8 | 0x9 | 0xa);
    let bad_control = opcode & 0x08 != 0 && (!fin || b1 & 0x7f > 125);
    if reserved_bits || !known_opcode || !masked || bad_control {
        return Some(1002);
    }
    let len = match b1 & 0x7f {
        126 => u64::from(u16::from_be_bytes(junk.get(2..4)?.try_into().unwrap())),
        127 => u64::from_be_bytes(junk.get(2..10)?.try_into().unwrap()),
        n => u64::from(n),
    };
    if len >> 63 != 0 {
        Some(1002)
    } else if len > max_message {
        Some(1009)
    } else {
        None
    }
}

fn garbage_floods_get_their_answers(poller: &str) {
    let server = Server::start(poller, &["--max-message", "64K"]);
    // Deterministic pseudo-random garbage (xorshift), so a failure can be replayed.
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut failed_by_header = 0;
    for round in 0..50 {
        // Random bytes before any handshake: a 400 (or 431) and a close.
        let mut s = server.tcp();
        let junk: Vec<u8> = (0..1 + next() % 2000).map(|_| next() as u8).collect();
        let _ = s.write_all(&junk);
        let _ = s.write_all(b"\r\n\r\n");
        let (answer, ending) = read_until_end(&mut s, DEADLINE);
        let head = String::from_utf8_lossy(&answer);
        assert_eq!(ending, Ending::Eof, "round {round}: reset after {head}");
        assert!(
            head.starts_with("HTTP/1.1 400") || head.starts_with("HTTP/1.1 431"),
            "round {round}: {head}"
        );

        // Random bytes after the handshake, then our end of sending. The server answers in
        // frames only, fails the connection with the code the first header calls for (if the
        // header is a valid start, what follows decides), and then ends it in order when it
        // sees our EOF.
        let mut s = raw_upgrade(&server, "/echo");
        let junk: Vec<u8> = (0..2 + next() % 4000).map(|_| next() as u8).collect();
        let _ = s.write_all(&junk);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let (answer, ending) = read_until_end(&mut s, DEADLINE);
        assert_eq!(
            ending,
            Ending::Eof,
            "round {round}: reset, not closed in order"
        );
        let frames = parse_server_frames(&answer);
        let close = frames
            .iter()
            .find(|(b0, _)| b0 & 0x0f == 0x8)
            .map(|(_, payload)| u16::from_be_bytes([payload[0], payload[1]]));
        match verdict_on_first_header(&junk, 64 * 1024) {
            Some(code) => {
                failed_by_header += 1;
                assert_eq!(close, Some(code), "round {round}: {:02x?}", &junk[..2]);
                assert_eq!(frames.len(), 1, "round {round}: only the Close");
            }
            // The junk may hold whole valid frames, a Close among them (whose code the server
            // echoes): any code a Close may carry on the wire (RFC 6455 §7.4), or none.
            None => assert!(
                matches!(close, None | Some(1000..=1003 | 1007..=1011 | 3000..=4999)),
                "round {round}: close {close:?}"
            ),
        }
    }
    // Most random first bytes have a reserved bit set: the oracle decides most rounds.
    assert!(failed_by_header >= 25, "{failed_by_header} of 50 decided");

    // An oversized head, a 2^63 length, a never-ending fragmented message.
    let mut s = server.tcp();
    let _ = s.write_all(&vec![b'a'; 20_000]);
    assert!(read_http_head(&mut s).starts_with("HTTP/1.1 431"));
    let mut s = raw_upgrade(&server, "/echo");
    let mut huge = vec![0x82, 0xff];
    huge.extend_from_slice(&u64::MAX.to_be_bytes());
    s.write_all(&huge).unwrap();
    assert_eq!(read_close_code(&mut s), Some(1002));
    let mut s = raw_upgrade(&server, "/echo");
    s.write_all(&client_frame(0x02, &[1; 1000])).unwrap();
    for _ in 0..100 {
        if s.write_all(&client_frame(0x00, &[1; 1000])).is_err() {
            break;
        }
    }
    assert_eq!(read_close_code(&mut s), Some(1009));

    // Still serving. (What the flood costs in memory: `cargo bench --bench bounds`.)
    let mut ws = server.ws("/echo");
    ws.send(Message::text("after the flood")).unwrap();
    assert_eq!(ws.read().unwrap(), Message::text("after the flood"));
    let metrics = server.metrics();
    assert!(metrics.get("wsrelay_http_responses_total{status=\"400\"}") >= 1.0);
    assert!(metrics.get("wsrelay_closes_sent_total{code=\"1002\"}") >= failed_by_header as f64);
    assert!(metrics.get("wsrelay_closes_sent_total{code=\"1009\"}") >= 1.0);
}

poller_tests!(
    slowloris_is_closed_at_the_handshake_deadline,
    heartbeat_pings_every_interval_of_silence,
    half_open_peer_is_dropped_and_a_live_one_is_not,
    slow_consumer_is_closed_at_the_outbound_limit,
    slow_consumer_drop_policy_keeps_the_connection,
    max_connections_gets_503,
    sigterm_closes_every_client_with_1001,
    shutdown_deadline_ends_unresponsive_clients,
    second_signal_exits_at_once,
    descriptor_exhaustion_pauses_accept_and_recovers,
    metrics_parse_and_match_what_happened,
    garbage_floods_get_their_answers,
);
