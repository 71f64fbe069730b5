//! `wsrelay bench` against the real server: each mode runs for about a second with small
//! counts, and its JSON is checked against what the server counted in /metrics.
//!
//! How the numbers compare. The server counts every message and every upgrade of the whole run,
//! warm-up included, so the bench's `*_total` fields are the ones to compare, and they compare
//! exactly: a run ends with a close handshake on every connection, and the bench sends nothing
//! after its Close, so by the time the server's Close reply has arrived (the bench waits for it
//! and for the server to hang up), the server has counted every message the bench sent, and the
//! bench has received every echo the server queued before its reply. The window figures
//! (`sent`, `received`, `completed`) are a part of the totals, so they are only checked to be
//! no larger.
//!
//! With `--processes 2` the same checks hold for the merged report: each child closes its own
//! connections with a close handshake before it reports, and the coordinator adds the reports.

use crate::poller_tests;
use crate::support::*;
use serde_json::Value;
use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::mpsc;

/// Runs `wsrelay bench ARGS --json` with a short window, and returns its exit code and JSON.
fn bench(args: &[&str]) -> (i32, Value) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_wsrelay"))
        .arg("bench")
        .args(args)
        .args([
            "--json",
            "--duration",
            "1s",
            "--warmup",
            "200ms",
            "--threads",
            "1",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn wsrelay bench");
    let mut stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        let _ = tx.send(text);
    });
    // The run bounds itself (window, drain and close deadlines: a few seconds at most); this
    // deadline only keeps a broken bench from hanging the test suite.
    let text = match rx.recv_timeout(3 * DEADLINE) {
        Ok(text) => text,
        Err(_) => {
            let _ = child.kill();
            panic!("wsrelay bench {args:?} did not finish");
        }
    };
    let status = child.wait().expect("wait for wsrelay bench");
    let json = serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("not one JSON object ({e}): {text:?}"));
    (status.code().unwrap_or(-1), json)
}

fn u(json: &Value, path: &str) -> u64 {
    let mut v = json;
    for key in path.split('.') {
        v = &v[key];
    }
    v.as_u64()
        .unwrap_or_else(|| panic!("{path} is not a count in {json}"))
}

/// Every field of `json` (nested ones as `outer.inner`) is documented in `wsrelay bench MODE
/// --help`.
fn assert_documented(mode: &str, json: &Value) {
    let help = Command::new(env!("CARGO_BIN_EXE_wsrelay"))
        .args(["bench", mode, "--help"])
        .output()
        .expect("run --help");
    let help = String::from_utf8_lossy(&help.stdout);
    let mut missing = Vec::new();
    let mut stack = vec![(String::new(), json)];
    while let Some((prefix, value)) = stack.pop() {
        if let Value::Object(map) = value {
            for (k, v) in map {
                let name = format!("{prefix}{k}");
                if !help
                    .lines()
                    .any(|l| l.split_whitespace().next() == Some(name.as_str()))
                {
                    missing.push(name.clone());
                }
                stack.push((format!("{name}."), v));
            }
        }
    }
    assert!(missing.is_empty(), "undocumented in --help: {missing:?}");
}

fn bench_echo_counts_match_the_server(poller: &str) {
    echo_counts_match(poller, 1);
}

/// An echo run of 10 connections in `processes` bench processes (one thread each), checked
/// against /metrics; with several processes the report is the coordinator's merge.
fn echo_counts_match(poller: &str, processes: usize) {
    let server = Server::start(poller, &[]);
    let pid = server.pid().to_string();
    let url = server.url("/echo");
    let processes_arg = processes.to_string();
    let (code, r) = bench(&[
        "echo",
        &url,
        "--connections",
        "10",
        "--window",
        "4",
        "--size",
        "32",
        "--server-pid",
        &pid,
        "--processes",
        &processes_arg,
    ]);
    assert_eq!(code, 0, "{r}");
    assert_eq!(r["mode"], "echo");
    assert_eq!(u(&r, "processes"), processes as u64);
    assert_eq!(u(&r, "threads"), processes as u64);
    assert!(
        r.get("child").is_none(),
        "the children's hidden field stays hidden"
    );
    assert_eq!(u(&r, "errors.total"), 0, "{r}");
    assert_eq!(u(&r, "opened"), 10);
    assert_eq!(u(&r, "clean_closes"), 10);

    // Every message came back before the close handshake ended, and the server saw them all.
    let sent_total = u(&r, "sent_total");
    assert!(sent_total > 0);
    assert_eq!(u(&r, "received_total"), sent_total);
    assert_eq!(
        server.metric("wsrelay_messages_in_total"),
        sent_total as f64
    );
    assert_eq!(
        server.metric("wsrelay_messages_out_total"),
        sent_total as f64
    );
    assert_eq!(server.metric("wsrelay_upgrades_total"), 10.0);
    assert_eq!(
        server.metric("wsrelay_closes_received_total{code=\"1000\"}"),
        10.0
    );

    // The window is part of the run; each message received in it has a latency.
    let received = u(&r, "received");
    assert!(received > 0 && received <= sent_total);
    assert!(u(&r, "sent") <= sent_total);
    assert_eq!(u(&r, "latency_us.count"), received);
    assert_eq!(u(&r, "server.pid"), server.pid() as u64);
    assert!(u(&r, "server.rss_before_kib") > 0);
    assert!(r["server"]["rss_per_connection_bytes"].is_number());
    assert!(r["server"]["cpu_secs"].is_number());
    assert_documented("echo", &r);
}

fn bench_idle_counts_match_the_server(poller: &str) {
    idle_counts_match(poller, 1, None);
}

/// An idle run of 10 connections in `processes` bench processes, checked against /metrics.
/// `prime`: the `--prime` flag, or `None` for its default.
fn idle_counts_match(poller: &str, processes: usize, prime: Option<u64>) {
    let server = Server::start(poller, &[]);
    let pid = server.pid().to_string();
    let url = server.url("/echo");
    let processes_arg = processes.to_string();
    let prime_arg = prime.map(|n| n.to_string());
    let mut args = vec![
        "idle",
        &url,
        "--connections",
        "10",
        "--server-pid",
        &pid,
        "--processes",
        &processes_arg,
    ];
    if let Some(n) = &prime_arg {
        args.extend(["--prime", n]);
    }
    let (code, r) = bench(&args);
    assert_eq!(code, 0, "{r}");
    assert_eq!(u(&r, "processes"), processes as u64);
    assert_eq!(u(&r, "errors.total"), 0, "{r}");
    assert_eq!(u(&r, "opened"), 10);
    assert_eq!(u(&r, "clean_closes"), 10);
    assert_eq!(u(&r, "sent_total"), 0);
    assert!(r["latency_us"].is_null());
    // Before its baseline the bench primed the server with connections of its own, each
    // upgraded and closed cleanly (16 unless --prime says otherwise); the report says how many.
    let primed = prime.unwrap_or(16);
    assert_eq!(u(&r, "server.primed"), primed, "{r}");
    let upgrades = 10.0 + primed as f64;
    assert_eq!(server.metric("wsrelay_upgrades_total"), upgrades);
    assert_eq!(server.metric("wsrelay_messages_in_total"), 0.0);
    assert_eq!(
        server.metric("wsrelay_closes_received_total{code=\"1000\"}"),
        upgrades
    );
    // The server closed each connection after the close handshake: none is left open.
    assert_eq!(server.metric("wsrelay_connections{state=\"open\"}"), 0.0);
    assert!(r["server"]["rss_per_connection_bytes"].is_number());
    // The anonymous part of the RSS is read too, and is a part of it.
    assert!(u(&r, "server.anon_before_kib") > 0, "{r}");
    assert!(
        u(&r, "server.anon_after_kib") <= u(&r, "server.rss_after_kib"),
        "{r}"
    );
    assert!(r["server"]["anon_per_connection_bytes"].is_number());
    // The sample before the priming is kept, with the per-connection figure counted from it;
    // without priming there is no such sample.
    if primed > 0 {
        assert!(u(&r, "server.rss_cold_kib") > 0, "{r}");
        assert!(
            r["server"]["rss_cold_per_connection_bytes"].is_number(),
            "{r}"
        );
    } else {
        assert!(r["server"]["rss_cold_kib"].is_null(), "{r}");
        assert!(
            r["server"]["rss_cold_per_connection_bytes"].is_null(),
            "{r}"
        );
    }
    assert!(r["server"]["cpu_us_per_message"].is_null());
    assert_documented("idle", &r);
}

fn bench_idle_without_priming_reads_the_server_cold(poller: &str) {
    idle_counts_match(poller, 1, Some(0));
}

/// A server that refuses the priming connections gets no idle run measured against a
/// baseline that means nothing: the bench stops at once (exit 2, no report) and says which
/// priming connection failed and why.
#[test]
fn a_refused_priming_stops_the_idle_run_with_the_reason() {
    let server = Server::start("epoll", &[]);
    let output = Command::new(env!("CARGO_BIN_EXE_wsrelay"))
        .args(["bench", "idle", &server.url("/no-such-endpoint")])
        .args(["--connections", "2", "--duration", "1s", "--warmup", "0s"])
        .args(["--server-pid", &server.pid().to_string(), "--json"])
        .output()
        .expect("run wsrelay bench");
    assert_eq!(output.status.code(), Some(2));
    assert!(output.stdout.is_empty(), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("priming connection 1 of 16") && stderr.contains("HTTP 404 instead of 101"),
        "{stderr}"
    );
    // Nothing of the run itself was opened.
    assert_eq!(server.metric("wsrelay_upgrades_total"), 0.0);
}

fn bench_connect_counts_match_the_server(poller: &str) {
    let server = Server::start(poller, &[]);
    let pid = server.pid().to_string();
    let url = server.url("/echo");
    let (code, r) = bench(&[
        "connect",
        &url,
        "--concurrency",
        "2",
        "--connections",
        "300",
        "--server-pid",
        &pid,
    ]);
    assert_eq!(code, 0, "{r}");
    assert_eq!(u(&r, "errors.total"), 0, "{r}");
    let opened = u(&r, "opened");
    assert!(opened > 0 && opened <= 300, "{r}");
    // Every cycle that opened also closed cleanly, and the server agrees on both counts.
    assert_eq!(u(&r, "clean_closes"), opened);
    assert_eq!(server.metric("wsrelay_upgrades_total"), opened as f64);
    assert_eq!(
        server.metric("wsrelay_closes_received_total{code=\"1000\"}"),
        opened as f64
    );
    assert!(u(&r, "completed") <= opened);
    if !r["latency_us"].is_null() {
        assert!(u(&r, "latency_us.count") <= opened);
    }
    assert!(r["server"]["rss_per_connection_bytes"].is_null());
    assert!(r["server"]["anon_per_connection_bytes"].is_null());
    assert_documented("connect", &r);
}

#[test]
fn bench_echo_in_two_processes_counts_match_the_server() {
    echo_counts_match("epoll", 2);
}

#[test]
fn bench_idle_in_two_processes_counts_match_the_server() {
    idle_counts_match("epoll", 2, Some(3));
}

poller_tests!(
    bench_broadcast_counts_match_the_server,
    bench_echo_counts_match_the_server,
    bench_idle_counts_match_the_server,
    bench_idle_without_priming_reads_the_server_cold,
    bench_connect_counts_match_the_server,
);

/// `wss://`: the bench's TLS client (trusting the test CA through `--ca`) against the relay
/// speaking TLS. The bench is what is tested here, so epoll only (tests/it/tls.rs runs the
/// server's TLS on every poller). Counts match as in plain echo, and the server counts one
/// TLS handshake per connection (and one for each /metrics read).
#[test]
fn bench_echo_over_wss_counts_match_the_server() {
    use crate::tls_support::{tls_metrics, tls_server, wait_for_tls_metric, TestCa};
    let ca = TestCa::new();
    let server = tls_server("epoll", &ca, &[]);
    let url = format!("wss://localhost:{}/echo", server.addr.port());
    let (code, r) = bench(&[
        "echo",
        &url,
        "--ca",
        ca.ca.to_str().unwrap(),
        "--connections",
        "10",
        "--window",
        "4",
        "--size",
        "32",
    ]);
    assert_eq!(code, 0, "{r}");
    assert_eq!(u(&r, "errors.total"), 0, "{r}");
    assert_eq!(u(&r, "opened"), 10);
    assert_eq!(u(&r, "clean_closes"), 10);
    let sent_total = u(&r, "sent_total");
    assert!(sent_total > 0);
    assert_eq!(u(&r, "received_total"), sent_total);
    wait_for_tls_metric(&server, &ca, "wsrelay_messages_in_total", sent_total as f64);
    let m = tls_metrics(&server, &ca);
    assert_eq!(m.get("wsrelay_upgrades_total"), 10.0);
    // The bench's 10, and every /metrics read so far (this one included).
    let handshakes = m.get("wsrelay_tls_handshakes_total{version=\"TLSv1.3\"}");
    assert!(handshakes > 10.0, "{handshakes}");
    assert_eq!(
        m.get("wsrelay_tls_handshake_failures_total{reason=\"certificate\"}"),
        0.0
    );
}

/// Idle over `wss://`: the priming connections go through TLS as the held ones do, and the
/// server counts both.
#[test]
fn bench_idle_over_wss_primes_the_server() {
    use crate::tls_support::{tls_metrics, tls_server, TestCa};
    let ca = TestCa::new();
    let server = tls_server("epoll", &ca, &[]);
    let url = format!("wss://localhost:{}/echo", server.addr.port());
    let pid = server.pid().to_string();
    let ca_path = ca.ca.to_str().unwrap();
    let (code, r) = bench(
        &["idle", &url, "--ca", ca_path, "--connections", "5"]
            .into_iter()
            .chain(["--server-pid", &pid, "--prime", "4"])
            .collect::<Vec<_>>(),
    );
    assert_eq!(code, 0, "{r}");
    assert_eq!(u(&r, "errors.total"), 0, "{r}");
    assert_eq!(u(&r, "opened"), 5);
    assert_eq!(u(&r, "server.primed"), 4, "{r}");
    assert!(
        r["server"]["rss_cold_per_connection_bytes"].is_number(),
        "{r}"
    );
    let m = tls_metrics(&server, &ca);
    assert_eq!(m.get("wsrelay_upgrades_total"), 9.0);
    assert_eq!(m.get("wsrelay_closes_received_total{code=\"1000\"}"), 9.0);
}

/// `wsrelay bench --compression` over `wss://`: permessage-deflate sits above TLS (SPEC §17,
/// §18). Every message goes compressed (1 KiB of chat-like JSON, above `--compression-min`),
/// every echo comes back compressed and is inflated by the bench, and the counts still match.
#[test]
fn bench_echo_compressed_over_wss_counts_match_the_server() {
    use crate::tls_support::{tls_metrics, tls_server, wait_for_tls_metric, TestCa};
    let ca = TestCa::new();
    let server = tls_server("epoll", &ca, &[]);
    let url = format!("wss://localhost:{}/echo", server.addr.port());
    let (code, r) = bench(&[
        "echo",
        &url,
        "--ca",
        ca.ca.to_str().unwrap(),
        "--connections",
        "4",
        "--window",
        "4",
        "--size",
        "1024",
        "--compression",
    ]);
    assert_eq!(code, 0, "{r}");
    assert_eq!(u(&r, "errors.total"), 0, "{r}");
    assert_eq!(u(&r, "clean_closes"), 4);
    let sent_total = u(&r, "sent_total");
    assert!(sent_total > 0);
    assert_eq!(u(&r, "received_total"), sent_total);
    wait_for_tls_metric(&server, &ca, "wsrelay_messages_in_total", sent_total as f64);
    let m = tls_metrics(&server, &ca);
    assert_eq!(
        m.get("wsrelay_compressed_messages_in_total"),
        sent_total as f64
    );
    assert_eq!(
        m.get("wsrelay_compressed_messages_out_total"),
        sent_total as f64
    );
    assert_eq!(m.get("wsrelay_inflate_errors_total"), 0.0);
}

/// A bench that does not trust the server's certificate counts every connection as a TLS
/// error, and says why.
/// The server sees each refusal as an alert from the client during the handshake.
#[test]
fn bench_over_wss_without_the_ca_counts_tls_errors() {
    use crate::tls_support::{tls_metrics, tls_server, wait_for_tls_metric, TestCa};
    let ca = TestCa::new();
    let server = tls_server("epoll", &ca, &[]);
    let url = format!("wss://localhost:{}/echo", server.addr.port());
    let (_, r) = bench(&["echo", &url, "--connections", "3"]);
    assert_eq!(u(&r, "opened"), 0, "{r}");
    let refused = u(&r, "errors.tls");
    assert!(refused >= 3, "{r}");
    let first = r["first_error"].as_str().unwrap_or_default();
    assert!(first.contains("certificate is not accepted"), "{r}");
    let alerts = "wsrelay_tls_handshake_failures_total{reason=\"alert\"}";
    wait_for_tls_metric(&server, &ca, alerts, refused as f64);
    assert_eq!(tls_metrics(&server, &ca).get("wsrelay_upgrades_total"), 0.0);
}

#[test]
fn bench_refuses_a_target_outside_loopback_before_sending_anything() {
    // 192.0.2.0/24 is reserved for documentation; the address is refused before any socket.
    let out = Command::new(env!("CARGO_BIN_EXE_wsrelay"))
        .args([
            "bench",
            "idle",
            "ws://192.0.2.1:9/echo",
            "--connections",
            "1",
        ])
        .output()
        .expect("run wsrelay bench");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not a loopback address"), "{stderr}");
    assert!(out.stdout.is_empty());
}

fn bench_broadcast_counts_match_the_server(poller: &str) {
    let server = Server::start(poller, &[]);
    let (rooms, members) = (2u64, 3u64);
    let url = server.url("/r/bench");
    let (code, r) = bench(&[
        "broadcast",
        &url,
        "--rooms",
        "2",
        "--members",
        "3",
        "--senders",
        "2",
        "--window",
        "4",
    ]);
    assert_eq!(code, 0, "{r}");
    assert_eq!(u(&r, "errors.total"), 0, "{r}");
    assert_eq!(u(&r, "opened"), rooms * members);
    assert_eq!(u(&r, "clean_closes"), rooms * members);
    let sent = u(&r, "sent_total");
    let delivered = u(&r, "received_total");
    assert!(sent > 0, "{r}");
    // The server saw every message, and relayed each to the other members of its room (all
    // present until the drain ended: the bench closes only after it).
    assert_eq!(server.metric("wsrelay_raw_messages_total"), sent as f64);
    assert_eq!(
        server.metric("wsrelay_raw_deliveries_total"),
        (sent * (members - 1)) as f64
    );
    // The bench counted at least each message's witness, and never more than was relayed.
    assert!(
        delivered >= sent && delivered <= sent * (members - 1),
        "{r}"
    );
    assert!(u(&r, "received") <= delivered);
    assert_eq!(u(&r, "latency_us.count"), u(&r, "received"));
    assert_eq!(
        server.metric("wsrelay_rooms{kind=\"raw\"}"),
        0.0,
        "rooms vanish with their last member"
    );
    assert_documented("broadcast", &r);
}
