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

poller_tests!(a_close_started_mid_read_keeps_the_stream_in_step);
