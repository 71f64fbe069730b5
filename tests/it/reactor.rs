//! The reactor under conditions that are hard to meet by accident: a close the server starts in
//! the middle of a read, a graceful shutdown with a new client knocking, and a process stalled
//! longer than the heartbeat timeout. Raw sockets with hand-built frames, so the bytes on the
//! wire are exactly the ones the test means.

use crate::poller_tests;
use crate::support::*;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// The server closed TCP cleanly: EOF with nothing left, never a reset (which would mean unread
/// input made the server's close destroy what it had sent).
fn expect_clean_eof(s: &mut TcpStream) {
    let mut rest = Vec::new();
    match s.read_to_end(&mut rest) {
        Ok(_) => assert!(rest.is_empty(), "bytes after the close: {rest:?}"),
        Err(e) => panic!("expected EOF, got {e}"),
    }
}

/// The value of one sample in /metrics; a sample that is not there fails the test (a renamed
/// series must not read as 0).
fn metric(server: &Server, sample: &str) -> f64 {
    let text = server.get("/metrics").body_text();
    text.lines()
        .find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name == sample).then(|| value.parse().ok()).flatten()
        })
        .unwrap_or_else(|| panic!("no sample {sample} in /metrics:\n{text}"))
}

/// SPEC §2, §6: the rate limit closes a connection in the middle of a read that holds many more
/// frames. The rest of that read (and the next, which starts inside a frame) must still be read
/// frame by frame until the client's Close: the client gets the acks of the messages sent within
/// its burst, then Close 1008, and a clean end of the connection after its own Close.
fn a_close_started_mid_read_keeps_the_stream_in_step(poller: &str) {
    let server = Server::start(poller, &["--rate", "5", "--burst", "5"]);
    let mut s = raw_upgrade(&server, "/ws?id=alice");
    let (first, welcome) = read_server_frame(&mut s);
    assert_eq!(first, 0x81);
    assert!(String::from_utf8_lossy(&welcome).contains("\"welcome\""));

    // 100 envelopes of about 1 KiB in one write: more than the 64 KiB one read takes, so a read
    // boundary falls inside a frame after the server has started its close.
    let padding = "x".repeat(1000);
    let mut burst = Vec::new();
    for i in 0..100 {
        let envelope = format!(r#"{{"type":"send","to":"bob","payload":"{padding}","id":"m{i}"}}"#);
        burst.extend_from_slice(&client_frame(0x81, envelope.as_bytes()));
    }
    assert!(burst.len() > 64 * 1024);
    s.write_all(&burst)
        .expect("the server reads the whole burst");

    let mut acked = Vec::new();
    let code = loop {
        let (b0, payload) = read_server_frame(&mut s);
        match b0 {
            0x81 => {
                let ack: serde_json::Value = serde_json::from_slice(&payload).unwrap();
                assert_eq!(ack["type"], "ack", "{ack}");
                acked.push(ack["id"].as_str().unwrap().to_string());
            }
            0x88 => break u16::from_be_bytes([payload[0], payload[1]]),
            other => panic!("unexpected frame {other:#x}"),
        }
    };
    assert_eq!(acked, ["m0", "m1", "m2", "m3", "m4"]);
    assert_eq!(code, 1008);
    s.write_all(&client_frame(0x88, &1008u16.to_be_bytes()))
        .unwrap();
    expect_clean_eof(&mut s);
    // The frames after the limit were delimited, not misread as a broken frame: the family is
    // there, with no sample for any reason.
    let text = server.get("/metrics").body_text();
    assert!(text.contains("# TYPE wsrelay_protocol_errors_total counter"));
    assert!(
        !text.contains("wsrelay_protocol_errors_total{"),
        "a phantom protocol error was counted:\n{text}"
    );
    assert_eq!(metric(&server, "wsrelay_abnormal_closes_total"), 0.0);
}

/// Waits (bounded) until the process is in `state` in /proc/<pid>/stat: 'S' (asleep, for the
/// single-threaded server: in its poller's wait), 'T' (stopped; a signal is delivered
/// asynchronously, after `kill` has returned).
fn wait_for_state(pid: u32, state: char) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        // The state follows the command name, which is in parentheses.
        let now = stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.chars().next());
        if now == Some(state) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "process {pid} never in state {state}: {stat}"
        );
        std::thread::yield_now();
    }
}

/// SPEC §2: a graceful shutdown closes the listening socket as it starts, so a new client is
/// refused by the kernel at once (and can retry another node) instead of waiting in the backlog
/// of a process that will never accept it, while open connections finish their close handshake.
fn graceful_shutdown_refuses_new_clients_at_once(poller: &str) {
    let mut server = Server::start(poller, &["--shutdown-timeout", "5s"]);
    let mut open = raw_upgrade(&server, "/echo");
    server.signal("TERM");
    // Shutdown has begun once the open connection is told 1001.
    assert_eq!(read_close_code(&mut open), Some(1001));
    let started = Instant::now();
    match TcpStream::connect_timeout(&server.addr, DEADLINE) {
        Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{e}"),
        Ok(_) => panic!("a new connection was accepted during shutdown"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "refusal was not immediate"
    );
    // The open connection still completes its close handshake, and then the server exits.
    open.write_all(&client_frame(0x88, &1001u16.to_be_bytes()))
        .unwrap();
    expect_clean_eof(&mut open);
    assert_eq!(server.wait_exit(DEADLINE), Some(0));
}

/// SPEC §5: a process stalled longer than --heartbeat-timeout (SIGSTOP, a paused VM) must not
/// drop a client whose Pong arrived during the stall: input that is ready is read before
/// deadlines are judged. (With epoll, the wait fails with EINTR after SIGCONT; read as "no
/// events", the Pong deadline used to fire first.)
fn a_stall_longer_than_the_heartbeat_timeout_keeps_clients_that_answered(poller: &str) {
    let server = Server::start(
        poller,
        &[
            "--heartbeat-interval",
            "300ms",
            "--heartbeat-timeout",
            "500ms",
        ],
    );
    let mut s = raw_upgrade(&server, "/echo");
    let (b0, ping) = read_server_frame(&mut s);
    assert_eq!(b0, 0x89, "the heartbeat Ping");
    // Stopped while it waits for the Pong: that wait is what the stall interrupts.
    wait_for_state(server.pid(), 'S');
    server.signal("STOP");
    wait_for_state(server.pid(), 'T');
    s.write_all(&client_frame(0x8A, &ping)).unwrap();
    // The stall itself is what is tested: it must outlast the Pong deadline (500 ms after the
    // Ping). It is not a wait for the server, which is stopped.
    std::thread::sleep(Duration::from_millis(1500));
    server.signal("CONT");

    s.write_all(&client_frame(0x81, b"still here")).unwrap();
    loop {
        let (b0, payload) = read_server_frame(&mut s);
        match b0 {
            // The next heartbeat may come first.
            0x89 => s.write_all(&client_frame(0x8A, &payload)).unwrap(),
            0x81 => {
                assert_eq!(payload, b"still here");
                break;
            }
            other => panic!("expected the echo, got frame {other:#x} {payload:?}"),
        }
    }
    assert_eq!(metric(&server, "wsrelay_half_open_drops_total"), 0.0);
}

poller_tests!(
    a_close_started_mid_read_keeps_the_stream_in_step,
    graceful_shutdown_refuses_new_clients_at_once,
    a_stall_longer_than_the_heartbeat_timeout_keeps_clients_that_answered,
);
