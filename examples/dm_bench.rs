//! Direct-message load for the engine benchmarks (docs/benchmarks.md, "Durable messages").
//!
//! `wsrelay bench` drives `/echo` and rooms with binary payloads; `/ws` direct messages are JSON
//! envelopes whose acks are what a sender waits for, so this small driver measures them:
//! `--conns` connections (one thread each, blocking tungstenite), each keeping `--window`
//! sends in flight and timing each one from its write to its ack (acks of one connection come
//! back in order, SPEC §13).
//!
//! * `live`: connection i is `b<i>` and sends to itself: every message is stored, delivered
//!   live to the same connection, and acked `delivered` (the direct-message echo).
//! * `queued`: connection i sends to `off<i>`, which never connects: every message is stored
//!   as pending and acked `queued` (raise `--offline-max`/`--offline-max-bytes` on the server).
//!
//! It runs for `--seconds`, or until each connection has sent `--messages` (to fill a data
//! directory), then prints one line of figures, and the server's engine batch figures from
//! /metrics.
//!
//! ```sh
//! cargo run --release --example dm_bench -- 127.0.0.1:8080 live --conns 100 --window 16 --seconds 10
//! ```

use std::collections::{BTreeMap, VecDeque};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tungstenite::Message;

struct Args {
    addr: String,
    mode: String,
    conns: usize,
    window: usize,
    seconds: f64,
    messages: u64,
    payload: usize,
}

fn parse() -> Args {
    let mut it = std::env::args().skip(1);
    let addr = it.next().expect("usage: dm_bench ADDR live|queued [flags]");
    let mode = it.next().expect("usage: dm_bench ADDR live|queued [flags]");
    assert!(mode == "live" || mode == "queued", "mode is live or queued");
    let mut args = Args {
        addr,
        mode,
        conns: 100,
        window: 16,
        seconds: 10.0,
        messages: u64::MAX,
        payload: 64,
    };
    while let Some(flag) = it.next() {
        let value = it.next().expect("every flag takes a value");
        match flag.as_str() {
            "--conns" => args.conns = value.parse().expect("--conns N"),
            "--window" => args.window = value.parse().expect("--window N"),
            "--seconds" => args.seconds = value.parse().expect("--seconds S"),
            "--messages" => args.messages = value.parse().expect("--messages N"),
            "--payload" => args.payload = value.parse().expect("--payload BYTES"),
            other => panic!("unknown flag {other}"),
        }
    }
    args
}

#[derive(Default)]
struct Tally {
    acks: BTreeMap<String, u64>,
    latencies: Vec<Duration>,
    delivered_messages: u64,
}

fn run_connection(args: &Args, i: usize, stop: &AtomicBool) -> Tally {
    let me = format!("b{i}");
    let to = if args.mode == "live" {
        me.clone()
    } else {
        format!("off{i}")
    };
    let stream = TcpStream::connect(&args.addr).expect("connect");
    stream.set_nodelay(true).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let url = format!("ws://{}/ws?id={me}", args.addr);
    let (mut ws, _) = tungstenite::client(url, stream).expect("handshake");
    let welcome = ws.read().expect("welcome");
    assert!(welcome.to_text().unwrap().contains("welcome"));
    let filler = "x".repeat(args.payload);
    let mut tally = Tally::default();
    let mut in_flight: VecDeque<Instant> = VecDeque::new();
    let mut sent = 0u64;
    loop {
        while in_flight.len() < args.window && sent < args.messages && !stop.load(Ordering::Relaxed)
        {
            let text =
                format!(r#"{{"type":"send","to":"{to}","payload":"{filler}","id":"{sent}"}}"#);
            ws.write(Message::text(text)).expect("write");
            in_flight.push_back(Instant::now());
            sent += 1;
        }
        ws.flush().expect("flush");
        if in_flight.is_empty() {
            break;
        }
        let text = match ws.read().expect("read within 30 s") {
            Message::Text(t) => t,
            _ => continue,
        };
        let v: serde_json::Value = serde_json::from_str(text.as_str()).unwrap();
        match v["type"].as_str() {
            Some("ack") => {
                let at = in_flight.pop_front().expect("an ack for a send");
                tally.latencies.push(at.elapsed());
                let status = v["status"].as_str().unwrap_or("?").to_string();
                *tally.acks.entry(status).or_default() += 1;
            }
            Some("message") => tally.delivered_messages += 1,
            _ => {}
        }
    }
    let _ = ws.close(None);
    let _ = ws.flush();
    tally
}

/// The value of `name` (a whole sample line) in the server's /metrics, if there.
fn metric(addr: &str, name: &str) -> Option<f64> {
    let mut s = TcpStream::connect(addr).ok()?;
    write!(s, "GET /metrics HTTP/1.1\r\nHost: b\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
}

fn main() {
    let args = Arc::new(parse());
    let stop = Arc::new(AtomicBool::new(false));
    let batches_before = metric(&args.addr, "wsrelay_engine_batches_total");
    let ops_before = metric(&args.addr, "wsrelay_engine_batch_ops_sum");
    let start = Instant::now();
    let threads: Vec<_> = (0..args.conns)
        .map(|i| {
            let (args, stop) = (Arc::clone(&args), Arc::clone(&stop));
            std::thread::spawn(move || run_connection(&args, i, &stop))
        })
        .collect();
    if args.messages == u64::MAX {
        std::thread::sleep(Duration::from_secs_f64(args.seconds)); // the measured window
        stop.store(true, Ordering::Relaxed);
    }
    let mut all = Tally::default();
    for t in threads {
        let t = t.join().expect("connection thread");
        for (k, n) in t.acks {
            *all.acks.entry(k).or_default() += n;
        }
        all.latencies.extend(t.latencies);
        all.delivered_messages += t.delivered_messages;
    }
    let elapsed = start.elapsed().as_secs_f64();
    all.latencies.sort_unstable();
    let pct = |p: f64| {
        let n = all.latencies.len();
        if n == 0 {
            return 0.0;
        }
        let at = ((n as f64 * p).ceil() as usize).clamp(1, n) - 1;
        all.latencies[at].as_secs_f64() * 1e3
    };
    let acked: u64 = all.acks.values().sum();
    println!(
        "mode={} conns={} window={} acks={} acks_per_s={:.0} p50_ms={:.3} p99_ms={:.3} max_ms={:.3} statuses={:?} messages_received={}",
        args.mode,
        args.conns,
        args.window,
        acked,
        acked as f64 / elapsed,
        pct(0.50),
        pct(0.99),
        pct(1.0),
        all.acks,
        all.delivered_messages
    );
    let batches = metric(&args.addr, "wsrelay_engine_batches_total");
    let ops = metric(&args.addr, "wsrelay_engine_batch_ops_sum");
    if let (Some(b0), Some(b1), Some(o0), Some(o1)) = (batches_before, batches, ops_before, ops) {
        let batches = b1 - b0;
        println!(
            "engine batches={batches:.0} ops={:.0} mean_ops_per_batch={:.1}",
            o1 - o0,
            (o1 - o0) / batches.max(1.0)
        );
    }
}
