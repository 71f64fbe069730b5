//! `--workers N` (SPEC §14): several reactors in one process on SO_REUSEPORT listeners. Enough
//! connections are opened that every worker gets some, and the per-worker gauges of /metrics
//! show it before anything else is checked (a test whose connections all landed on one worker
//! would prove nothing about the others).
//!
//! What the bus between workers does not carry yet is refused, and that is tested too.
//! `/ws` across workers is tested in `workers_ws.rs`, with `--data-dir` in
//! `workers_durable.rs`.
//!
//! /metrics and /stats.json are the process's totals whichever worker answers: every scrape is
//! checked against the work the test did, on every worker (src/server/scrape.rs has the
//! deterministic cases: a chosen answering worker, a worker that never answers).

use crate::poller_tests;
use crate::support::*;
use std::io::Write;
use std::net::TcpStream;
use std::process::Command;
use std::time::Instant;
use tungstenite::Message;

/// Connections per worker, on average. The kernel spreads by a hash of the 4-tuple, so one
/// worker gets none of 10 * N with a probability around N * (1 - 1/N)^(10 N): about 2e-5 for
/// N = 4. The gauges then say so, and the test fails with the numbers rather than passing
/// vacuously.
const PER_WORKER: usize = 10;

/// Waits (bounded) until every one of `workers` reports at least one connection and the
/// process total is `expected` (the scrape itself included), and returns the gauges by worker.
fn wait_for_spread(server: &Server, workers: usize, expected: f64) -> Vec<f64> {
    let start = Instant::now();
    loop {
        let metrics = server.metrics();
        let per_worker: Vec<f64> = (0..workers)
            .map(|i| metrics.get(&format!("wsrelay_worker_connections{{worker=\"{i}\"}}")))
            .collect();
        let total = metrics.get("wsrelay_process_connections");
        if total == expected && per_worker.iter().all(|n| *n >= 1.0) {
            assert_eq!(per_worker.iter().sum::<f64>(), total);
            return per_worker;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "connections by worker {per_worker:?}, total {total}, expected {expected} on every worker"
        );
        std::thread::sleep(std::time::Duration::from_millis(20)); // poll interval for /metrics
    }
}

/// Echo on every worker: 40 clients over 4 workers, each gets back exactly what it sent, in
/// order, text and binary; the process totals count every message once.
fn echo_on_every_worker(poller: &str) {
    let workers = 4;
    let server = Server::start(poller, &["--workers", "4"]);
    let mut clients: Vec<_> = (0..workers * PER_WORKER)
        .map(|_| server.ws("/echo"))
        .collect();
    // The scrape's own connection is one of the sockets counted.
    wait_for_spread(&server, workers, (clients.len() + 1) as f64);
    for round in 0..5 {
        for (i, ws) in clients.iter_mut().enumerate() {
            ws.send(Message::text(format!("{i}:{round}"))).unwrap();
            ws.send(Message::binary(vec![i as u8, round as u8]))
                .unwrap();
        }
        for (i, ws) in clients.iter_mut().enumerate() {
            assert_eq!(ws.read().unwrap(), Message::text(format!("{i}:{round}")));
            assert_eq!(
                ws.read().unwrap(),
                Message::binary(vec![i as u8, round as u8])
            );
        }
    }
    let sent = (clients.len() * 10) as f64;
    let metrics = server.metrics();
    assert_eq!(metrics.get("wsrelay_process_messages_in_total"), sent);
    assert_eq!(metrics.get("wsrelay_process_messages_out_total"), sent);
    assert_eq!(metrics.get("wsrelay_workers"), 4.0);
    // Every worker echoed something: the messages followed the connections.
    for i in 0..workers {
        let n = metrics.get(&format!(
            "wsrelay_worker_messages_in_total{{worker=\"{i}\"}}"
        ));
        assert!(n >= 10.0, "worker {i} received {n} messages");
    }
    // The demo page's counters are the process's too.
    let stats = server.get("/stats.json").body_text();
    assert!(stats.contains("\"workers\":4"), "{stats}");
    assert!(
        stats.contains(&format!("\"messages_in\":{sent}")),
        "{stats}"
    );
}

/// SPEC §2, §14: SIGTERM with 200 connections over 4 workers: every connection is told 1001,
/// and the process exits 0 once all of them have finished their close handshake.
fn sigterm_closes_every_connection_on_every_worker_with_1001(poller: &str) {
    let workers = 4;
    let mut server = Server::start(poller, &["--workers", "4", "--shutdown-timeout", "8s"]);
    let mut conns: Vec<TcpStream> = (0..200).map(|_| raw_upgrade(&server, "/echo")).collect();
    wait_for_spread(&server, workers, 201.0);
    server.signal("TERM");
    for (i, s) in conns.iter_mut().enumerate() {
        assert_eq!(read_close_code(s), Some(1001), "connection {i}");
        s.write_all(&client_frame(0x88, &1001u16.to_be_bytes()))
            .unwrap();
    }
    for s in &mut conns {
        expect_eof(s);
    }
    assert_eq!(server.wait_exit(DEADLINE), Some(0));
}

/// SPEC §2: a second signal during the graceful shutdown ends the process at once (130), on
/// every worker, even while connections still owe their close handshake.
fn a_second_signal_ends_every_worker_at_once(poller: &str) {
    let workers = 3;
    let mut server = Server::start(poller, &["--workers", "3", "--shutdown-timeout", "60s"]);
    let mut conns: Vec<TcpStream> = (0..workers * PER_WORKER)
        .map(|_| raw_upgrade(&server, "/echo"))
        .collect();
    wait_for_spread(&server, workers, (conns.len() + 1) as f64);
    server.signal("TERM");
    // Every worker has begun its shutdown once its connections are told 1001; none answers.
    for s in &mut conns {
        assert_eq!(read_close_code(s), Some(1001));
    }
    server.signal("TERM");
    assert_eq!(server.wait_exit(DEADLINE), Some(130));
}

/// SPEC §18 with §14: every worker serves TLS (each loads the pair); a raw room over wss://
/// spans the workers like one over ws://.
fn tls_on_every_worker(poller: &str) {
    use crate::tls_support::{tls_server, wss, TestCa};
    let workers = 2;
    let ca = TestCa::new();
    let server = tls_server(poller, &ca, &["--workers", "2"]);
    let mut members: Vec<_> = (0..workers * PER_WORKER)
        .map(|_| wss(&server, &ca, "/r/secure"))
        .collect();
    let start = Instant::now();
    loop {
        let m = crate::tls_support::tls_metrics(&server, &ca);
        let per_worker: Vec<f64> = (0..workers)
            .map(|i| {
                m.get(&format!(
                    "wsrelay_worker_bus_remote_rooms{{worker=\"{i}\"}}"
                ))
            })
            .collect();
        if per_worker.iter().all(|n| *n == 1.0) {
            break;
        }
        assert!(start.elapsed() < DEADLINE, "remote rooms {per_worker:?}");
        std::thread::sleep(std::time::Duration::from_millis(20)); // poll interval for /metrics
    }
    let (first, rest) = members.split_first_mut().unwrap();
    first.send(Message::text("over tls")).unwrap();
    for ws in rest {
        assert_eq!(ws.read().unwrap(), Message::text("over tls"));
    }
}

/// SPEC §14: `--max-connections` is the process's, whichever worker a client lands on.
fn max_connections_counts_every_worker(poller: &str) {
    let server = Server::start(poller, &["--workers", "3", "--max-connections", "6"]);
    let mut open: Vec<_> = (0..6).map(|_| server.ws("/echo")).collect();
    // Every further client is refused, on whichever worker it lands (several tries, so that
    // more than one worker is asked).
    for _ in 0..9 {
        let r = server.http("GET /echo HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n");
        assert_eq!(r.status, 503, "{}", r.body_text());
    }
    // One closes: a place is free again, for a client of any worker. (The close is seen by
    // the server a little later: retried until the deadline.)
    open.pop().unwrap().close(None).unwrap();
    let start = Instant::now();
    loop {
        match tungstenite::client(server.url("/echo"), server.tcp()) {
            Ok((mut ws, _)) => {
                ws.send(Message::text("in")).unwrap();
                assert_eq!(ws.read().unwrap(), Message::text("in"));
                break;
            }
            Err(e) => assert!(start.elapsed() < DEADLINE, "no place freed: {e}"),
        }
        std::thread::sleep(std::time::Duration::from_millis(20)); // retry interval
    }
}

/// Waits (bounded) until `wsrelay_worker_bus_remote_rooms` is `expected` on every worker.
fn wait_for_remote_rooms(server: &Server, workers: usize, expected: f64) {
    let start = Instant::now();
    loop {
        let metrics = server.metrics();
        let known: Vec<f64> = (0..workers)
            .map(|i| {
                metrics.get(&format!(
                    "wsrelay_worker_bus_remote_rooms{{worker=\"{i}\"}}"
                ))
            })
            .collect();
        if known.iter().all(|n| *n == expected) {
            return;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "remote rooms by worker {known:?}, expected {expected} each"
        );
        std::thread::sleep(std::time::Duration::from_millis(20)); // poll interval for /metrics
    }
}

/// SPEC §6, §14: a raw room with members on every worker, every member sending: each member
/// receives every other member's messages exactly once, in each sender's order, never its own;
/// each message crossed the bus exactly once per other worker (all of them have members here),
/// and a room whose only member is on one worker sends nothing over the bus.
fn raw_room_across_every_worker(poller: &str) {
    let workers = 4;
    let server = Server::start(poller, &["--workers", "4"]);
    let mut members: Vec<_> = (0..workers * PER_WORKER)
        .map(|_| server.ws("/r/lobby"))
        .collect();
    wait_for_spread(&server, workers, (members.len() + 1) as f64);
    // Every worker has heard that the other three have members.
    wait_for_remote_rooms(&server, workers, (workers - 1) as f64);
    let per_sender = 10;
    for seq in 0..per_sender {
        for (i, ws) in members.iter_mut().enumerate() {
            ws.send(Message::text(format!("{i}:{seq}"))).unwrap();
        }
    }
    let n = members.len();
    for (me, ws) in members.iter_mut().enumerate() {
        let mut next = vec![0usize; n];
        for _ in 0..(n - 1) * per_sender {
            let text = ws.read().unwrap().into_text().unwrap();
            let (from, seq) = text.split_once(':').unwrap();
            let (from, seq): (usize, usize) = (from.parse().unwrap(), seq.parse().unwrap());
            assert_ne!(from, me, "member {me} got its own message back");
            assert_eq!(
                seq, next[from],
                "member {me}: sender {from} out of order or twice"
            );
            next[from] += 1;
        }
        assert!(
            next.iter()
                .enumerate()
                .all(|(i, k)| *k == if i == me { 0 } else { per_sender }),
            "member {me} got {next:?}"
        );
    }
    let messages = (n * per_sender) as f64;
    let metrics = server.metrics();
    // The hub's counters are the process's: every message relayed once, by its sender's
    // worker; every copy queued once, by its member's worker.
    assert_eq!(metrics.get("wsrelay_raw_messages_total"), messages);
    assert_eq!(
        metrics.get("wsrelay_raw_deliveries_total"),
        messages * (n - 1) as f64
    );
    assert_eq!(metrics.get("wsrelay_room_members{kind=\"raw\"}"), n as f64);
    let bus_sent: f64 = (0..workers)
        .map(|i| metrics.get(&format!("wsrelay_worker_bus_sent_total{{worker=\"{i}\"}}")))
        .sum();
    assert_eq!(
        bus_sent,
        messages * (workers - 1) as f64,
        "one bus message per other worker"
    );
    for i in 0..workers {
        assert_eq!(
            metrics.get(&format!("wsrelay_worker_bus_drops_total{{worker=\"{i}\"}}")),
            0.0
        );
    }
    // A room with one member: its messages have nowhere else to go.
    let mut solo = server.ws("/r/solo");
    for i in 0..5 {
        solo.send(Message::text(format!("alone {i}"))).unwrap();
    }
    // The solo member's messages are in once the process has counted them.
    let start = Instant::now();
    while server.metric("wsrelay_process_messages_in_total") < messages + 5.0 {
        assert!(start.elapsed() < DEADLINE, "solo messages not counted");
        std::thread::sleep(std::time::Duration::from_millis(20)); // poll interval for /metrics
    }
    let metrics = server.metrics();
    let after: f64 = (0..workers)
        .map(|i| metrics.get(&format!("wsrelay_worker_bus_sent_total{{worker=\"{i}\"}}")))
        .sum();
    assert_eq!(after, bus_sent, "a room on one worker used the bus");
    // Everyone leaves: every worker forgets the others' members.
    solo.close(None).unwrap();
    for mut ws in members {
        ws.close(None).unwrap();
    }
    wait_for_remote_rooms(&server, workers, 0.0);
}

/// The families every worker renders for itself (the per-worker section, rendered once by the
/// answering worker from the shared gauges, is not merged).
fn merged_families(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .filter(|(name, _)| {
            !name.starts_with("wsrelay_worker") && !name.starts_with("wsrelay_process_")
        })
        .map(|(name, kind)| (name.to_string(), kind.to_string()))
        .collect()
}

/// SPEC §9, §14: /metrics and /stats.json are the process's totals, whichever worker answers.
/// Connections on both workers do a known amount of work (client i echoes i + 1 messages);
/// then every scrape, on whichever worker the kernel hands it, counts all of it, and states
/// the facts of the process once. Scraped until each worker has answered several times.
fn every_scrape_is_the_process_totals(poller: &str) {
    let workers = 2;
    let server = Server::start(poller, &["--workers", "2"]);
    let mut clients: Vec<_> = (0..workers * PER_WORKER)
        .map(|_| server.ws("/echo"))
        .collect();
    wait_for_spread(&server, workers, (clients.len() + 1) as f64);
    let mut sent = 0;
    for (i, ws) in clients.iter_mut().enumerate() {
        for k in 0..=i {
            ws.send(Message::text(format!("{i}:{k}"))).unwrap();
            sent += 1;
        }
        for k in 0..=i {
            assert_eq!(ws.read().unwrap(), Message::text(format!("{i}:{k}")));
        }
    }
    let (sent, conns) = (sent as f64, clients.len() as f64);
    let mut answered = [0usize; 2];
    let start = Instant::now();
    while answered.iter().any(|n| *n < 3) {
        assert!(
            start.elapsed() < DEADLINE,
            "scrapes answered by worker {answered:?}: the kernel kept one worker out"
        );
        let m = server.metrics();
        let by = m.get("wsrelay_worker_answering") as usize;
        answered[by] += 1;
        let from = format!("(answered by worker {by})");
        assert_eq!(m.get("wsrelay_messages_in_total"), sent, "{from}");
        assert_eq!(m.get("wsrelay_messages_out_total"), sent, "{from}");
        assert_eq!(m.get("wsrelay_upgrades_total"), conns, "{from}");
        assert_eq!(
            m.get("wsrelay_connections{state=\"open\"}"),
            conns,
            "{from}"
        );
        // The totals agree with the per-worker figures (published by each worker itself).
        let per_worker: f64 = (0..workers)
            .map(|i| {
                m.get(&format!(
                    "wsrelay_worker_messages_in_total{{worker=\"{i}\"}}"
                ))
            })
            .sum();
        assert_eq!(per_worker, sent, "{from}");
        // Facts of the process are stated once, not once per worker.
        assert_eq!(
            m.get(&format!("wsrelay_poller_info{{poller=\"{poller}\"}}")),
            1.0
        );
        assert_eq!(m.get("wsrelay_engine_info{kind=\"bus\"}"), 1.0);
        assert_eq!(m.get("wsrelay_workers_missing"), 0.0, "{from}");
    }
    // The same for the demo page's counters, on both workers.
    let mut answered = [0usize; 2];
    let start = Instant::now();
    while answered.iter().any(|n| *n < 2) {
        assert!(start.elapsed() < DEADLINE, "stats answered by {answered:?}");
        let stats = server.get("/stats.json").body_text();
        let field = |name: &str| -> u64 {
            let key = format!("\"{name}\":");
            let at = stats
                .find(&key)
                .unwrap_or_else(|| panic!("no {name} in {stats}"));
            let digits: String = stats[at + key.len()..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            digits.parse().unwrap()
        };
        answered[field("worker") as usize] += 1;
        assert_eq!(field("messages_in") as f64, sent, "{stats}");
        assert_eq!(field("connections") as f64, conns, "{stats}");
        assert_eq!(field("workers"), 2, "{stats}");
        assert_eq!(field("workers_missing"), 0, "{stats}");
    }
}

poller_tests!(
    every_scrape_is_the_process_totals,
    echo_on_every_worker,
    sigterm_closes_every_connection_on_every_worker_with_1001,
    max_connections_counts_every_worker,
    raw_room_across_every_worker,
    a_second_signal_ends_every_worker_at_once,
    tls_on_every_worker,
);

/// `--workers 1` (the default) is the single reactor: no worker families at all.
#[test]
fn one_worker_is_the_single_reactor() {
    let server = Server::start("epoll", &["--workers", "1"]);
    let text = server.get("/metrics").body_text();
    assert!(text.contains("wsrelay_messages_in_total"));
    assert!(!text.contains("wsrelay_worker"), "{text}");
    assert!(!text.contains("wsrelay_process_"), "{text}");
}

/// `--workers 0` and nonsense are refused by the flag parser; `auto` starts.
#[test]
fn worker_counts() {
    for bad in ["0", "many"] {
        let out = Command::new(env!("CARGO_BIN_EXE_wsrelay"))
            .args(["serve", "--listen", "127.0.0.1:0", "--workers", bad])
            .output()
            .unwrap();
        assert!(!out.status.success(), "--workers {bad}");
    }
    let server = Server::start("epoll", &["--workers", "auto"]);
    let workers = server.metrics();
    let expected = std::thread::available_parallelism().map_or(1, |n| n.get());
    if expected > 1 {
        assert_eq!(workers.get("wsrelay_workers"), expected as f64);
    } else {
        // One CPU: `auto` is one worker, the single-threaded server (no worker families).
        assert_eq!(workers.family("wsrelay_connections").len(), 4);
    }
}

/// Every gauge a worker renders has a merge decision (`totals::RULES`): summed as a share of
/// the process, or stated once as a fact of it. A new gauge without one fails here, instead of
/// being summed by accident. TLS adds its families.
#[test]
fn every_gauge_has_a_merge_rule() {
    use crate::tls_support::{tls_get, tls_server, TestCa};
    use wsrelay::server::totals;
    let server = Server::start("epoll", &["--workers", "2"]);
    let plain = server.get("/metrics").body_text();
    let ca = TestCa::new();
    let secure = tls_server("epoll", &ca, &["--workers", "2"]);
    let tls = tls_get(&secure, &ca, "/metrics").body_text();
    assert!(tls.contains("# TYPE wsrelay_tls_certificate_not_after_seconds gauge"));
    let mut gauges = 0;
    for text in [&plain, &tls] {
        for (name, kind) in merged_families(text) {
            if kind == "gauge" {
                gauges += 1;
                assert!(totals::listed(&name), "{name} has no rule in totals::RULES");
            }
        }
    }
    assert!(gauges > 20, "only {gauges} gauges found");
    // Each family once in the merged text, whatever the number of workers.
    for (name, _) in merged_families(&tls) {
        assert_eq!(
            tls.matches(&format!("# TYPE {name} ")).count(),
            1,
            "{name} printed twice"
        );
    }
}
