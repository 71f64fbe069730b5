//! What the server's bounds cost and save, measured on the real binary: resident memory under
//! a consumer that never reads and under a flood of garbage, and CPU time while accepting is
//! paused at the descriptor limit (SPEC §2, §5). The integration tests assert the behaviour
//! (the slow consumer is closed with 1008, garbage gets its close codes, the paused listener
//! recovers); the figures here are measurements, read by a person against docs/benchmarks.md.
//!
//! Run: `cargo bench --bench bounds` (every poller, release build). Under `cargo test
//! --all-targets` it runs once on epoll, to keep the measurement working.

#[allow(dead_code)] // the harness is shared with the integration tests; this uses part of it
#[path = "../tests/it/support.rs"]
mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use support::*;

/// Resident memory of a process, from /proc/PID/status.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

/// Time a process has spent on a CPU, in nanoseconds: the first field of /proc/PID/schedstat
/// (finer than /proc/PID/stat, whose utime and stime count 10 ms ticks).
fn cpu_ns(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/schedstat")).expect("/proc schedstat");
    stat.split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .expect("run time in /proc/PID/schedstat")
}

/// A consumer that sends 16 KiB echo requests as fast as it can and never reads, against
/// `--max-outbound 256K`, until the server closes it. Returns the RSS growth in KiB.
fn slow_consumer(poller: &str) -> u64 {
    let server = Server::start(poller, &["--max-outbound", "256K"]);
    let before = rss_kib(server.pid());
    let stop = Arc::new(AtomicBool::new(false));
    let mut s = raw_upgrade(&server, "/echo");
    s.set_write_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let frame = client_frame(0x82, &vec![0x5a; 16 * 1024]);
    let flooder = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                // Times out once the server stops reading or the buffers fill: fine.
                let _ = s.write_all(&frame);
            }
            s
        })
    };
    server.wait_for_metric("wsrelay_slow_consumer_closes_total", 1.0);
    let growth = rss_kib(server.pid()).saturating_sub(before);
    stop.store(true, Ordering::Relaxed);
    drop(flooder.join().unwrap());
    growth
}

/// 50 rounds of random bytes before and after the handshake (as the integration test sends),
/// then an oversized head and a never-ending fragmented message. Returns the RSS growth in KiB.
fn garbage_flood(poller: &str) -> u64 {
    let server = Server::start(poller, &["--max-message", "64K"]);
    let before = rss_kib(server.pid());
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for _ in 0..50 {
        let mut s = server.tcp();
        let junk: Vec<u8> = (0..1 + next() % 2000).map(|_| next() as u8).collect();
        let _ = s.write_all(&junk);
        let _ = s.write_all(b"\r\n\r\n");
        read_until_end(&mut s, DEADLINE);
        let mut s = raw_upgrade(&server, "/echo");
        let junk: Vec<u8> = (0..2 + next() % 4000).map(|_| next() as u8).collect();
        let _ = s.write_all(&junk);
        let _ = s.shutdown(std::net::Shutdown::Write);
        read_until_end(&mut s, DEADLINE);
    }
    let mut s = server.tcp();
    let _ = s.write_all(&vec![b'a'; 20_000]);
    read_http_head(&mut s);
    let mut s = raw_upgrade(&server, "/echo");
    s.write_all(&client_frame(0x02, &[1; 1000])).unwrap();
    for _ in 0..100 {
        if s.write_all(&client_frame(0x00, &[1; 1000])).is_err() {
            break;
        }
    }
    assert_eq!(read_close_code(&mut s), Some(1009));
    rss_kib(server.pid()).saturating_sub(before)
}

/// Fills a server limited to 64 descriptors with upgraded connections until it pauses
/// accepting, then measures its CPU time over one second of waiting. Returns (connections
/// served, CPU microseconds).
fn accept_paused(poller: &str) -> (usize, u64) {
    let server = Server::start_with_fd_limit(poller, 64, &[]);
    let mut open: Vec<TcpStream> = Vec::new();
    loop {
        assert!(open.len() < 100, "the descriptor limit never bit");
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
            Ok(1) => open.push(s),
            _ => break, // not answered: the server has paused accepting
        }
    }
    let before = cpu_ns(server.pid());
    std::thread::sleep(Duration::from_secs(1)); // the measurement window, not a synchronisation
    (open.len(), (cpu_ns(server.pid()) - before) / 1000)
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this without it.
    let full = std::env::args().any(|a| a == "--bench");
    if std::env::var_os("TEST_RUST_LOG").is_none() {
        // The servers' expected warnings (no --jwt-secret, accept paused) would bury the table.
        std::env::set_var("TEST_RUST_LOG", "wsrelay=error");
    }
    let pollers: &[&str] = if full {
        &["epoll", "poll", "select"]
    } else {
        &["epoll"]
    };
    println!("| poller | slow consumer: RSS growth | garbage flood: RSS growth | accept paused: CPU in 1 s |");
    println!("| --- | ---: | ---: | ---: |");
    for poller in pollers {
        let slow = slow_consumer(poller);
        let garbage = garbage_flood(poller);
        let (served, cpu_us) = accept_paused(poller);
        println!(
            "| {poller} | {slow} KiB | {garbage} KiB | {cpu_us} µs ({served} connections open) |"
        );
    }
}
