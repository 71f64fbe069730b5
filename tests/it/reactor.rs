//! The reactor under conditions that are hard to meet by accident: a close the server starts in
//! the middle of a read, a graceful shutdown with a new client knocking, and a process stalled
//! longer than the heartbeat timeout. Raw sockets with hand-built frames, so the bytes on the
//! wire are exactly the ones the test means.

use crate::poller_tests;
use crate::support::*;
use std::io::{ErrorKind, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

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
    expect_eof(&mut s);
    let metrics = server.metrics();
    // The server found the client's Close behind the frames it skipped: the handshake ended
    // there, not at the close deadline (which would also end in a FIN).
    assert_eq!(
        metrics.get("wsrelay_closes_received_total{code=\"1008\"}"),
        1.0
    );
    assert_eq!(metrics.get("wsrelay_close_timeouts_total"), 0.0);
    // The frames after the limit were delimited, not misread as a broken frame.
    let errors = metrics.family("wsrelay_protocol_errors_total");
    assert!(errors.is_empty(), "a phantom protocol error: {errors:?}");
    assert_eq!(metrics.get("wsrelay_abnormal_closes_total"), 0.0);
}

/// SPEC §2, §3: after the server's own Close (here: the rate limit), a broken frame from the
/// client ends the wait for its Close at once; what was queued before, the acks of the messages
/// within the burst and our Close 1008, still reaches the client before the connection ends.
fn a_broken_frame_after_our_close_still_lets_the_queue_out(poller: &str) {
    // One worker, whatever TEST_WORKERS says: the subject is what follows our Close, which goes
    // out at once only when the acks before it are (the memory engine of one worker); across
    // workers the Close waits for them (docs/protocol.md, "Rate limit"), and a broken frame
    // read meanwhile fails the connection (1002) before it.
    let server = Server::start(poller, &["--rate", "5", "--burst", "5", "--workers", "1"]);
    let mut s = raw_upgrade(&server, "/ws?id=alice");
    let (first, _welcome) = read_server_frame(&mut s);
    assert_eq!(first, 0x81);

    // Six sends (the sixth is over the limit: Close 1008), then a frame with RSV2 set, which no
    // extension allows (1002), all in one write, so one read holds them all.
    let mut burst = Vec::new();
    for i in 0..6 {
        let envelope = format!(r#"{{"type":"send","to":"bob","payload":"hi","id":"m{i}"}}"#);
        burst.extend_from_slice(&client_frame(0x81, envelope.as_bytes()));
    }
    burst.extend_from_slice(&client_frame(0xA1, b"broken"));
    s.write_all(&burst).unwrap();

    let mut acked = Vec::new();
    let code = loop {
        let (b0, payload) = read_server_frame(&mut s);
        match b0 {
            0x81 => {
                let ack: serde_json::Value = serde_json::from_slice(&payload).unwrap();
                acked.push(ack["id"].as_str().unwrap().to_string());
            }
            0x88 => break u16::from_be_bytes([payload[0], payload[1]]),
            other => panic!("unexpected frame {other:#x}"),
        }
    };
    assert_eq!(acked, ["m0", "m1", "m2", "m3", "m4"]);
    assert_eq!(code, 1008);
    // Everything the client sent was read, so the end is a FIN, not a reset.
    expect_eof(&mut s);
    let errors = server.metrics().family("wsrelay_protocol_errors_total");
    assert_eq!(
        errors.len(),
        1,
        "the broken frame is counted once: {errors:?}"
    );
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
    // One worker, whatever TEST_WORKERS says: each worker closes its own listener when it
    // hears the signal, so with several a connection may still reach one that has not yet
    // (docs/operations.md, "Workers": it is closed with the others).
    let mut server = Server::start(poller, &["--shutdown-timeout", "5s", "--workers", "1"]);
    let mut open = raw_upgrade(&server, "/echo");
    server.signal("TERM");
    // Shutdown has begun once the open connection is told 1001.
    assert_eq!(read_close_code(&mut open), Some(1001));
    // Refused (a RST to the SYN), not left waiting in a backlog: the kernel's answer itself
    // says the listener is closed.
    match TcpStream::connect_timeout(&server.addr, DEADLINE) {
        Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{e}"),
        Ok(_) => panic!("a new connection was accepted during shutdown"),
    }
    // The open connection still completes its close handshake, and then the server exits.
    open.write_all(&client_frame(0x88, &1001u16.to_be_bytes()))
        .unwrap();
    expect_eof(&mut open);
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
    assert_eq!(server.metric("wsrelay_half_open_drops_total"), 0.0);
}

poller_tests!(
    a_close_started_mid_read_keeps_the_stream_in_step,
    a_broken_frame_after_our_close_still_lets_the_queue_out,
    graceful_shutdown_refuses_new_clients_at_once,
    a_stall_longer_than_the_heartbeat_timeout_keeps_clients_that_answered,
);
