//! Cross-node load for the Redis engine (docs/benchmarks.md, "Several nodes through Redis").
//!
//! `wsrelay bench` drives `/echo` and raw rooms on one server; this driver measures `/ws`
//! traffic whose sender and recipients are on *different* nodes, so every delivery goes
//! through Redis. One thread per connection (blocking tungstenite); each payload carries its
//! send time, so the receiver measures send-to-delivery latency (one machine, one clock).
//!
//! * `direct SEND_ADDR RECV_ADDR`: `--pairs` senders on the first node, each sending to its own
//!   recipient on the second, keeping `--window` sends in flight (waiting for acks).
//! * `room ADDR,ADDR,...`: one room with `--members` members on each node; `--publishers`
//!   of them (spread over the nodes) publish, each keeping `--window` publishes in flight.
//!
//! Give both the same single address to measure one node (any engine) for comparison.
//! `--pids` (comma-separated) reads the servers' CPU time from /proc over the window;
//! `wsrelay_redis_commands_total` is read from each node's /metrics before and after.
//!
//! ```sh
//! cargo run --release --example redis_bench -- direct 127.0.0.1:8081 127.0.0.1:8082 --pairs 20 --seconds 5 --pids 111,222
//! ```

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tungstenite::Message;

struct Args {
    mode: String,
    addrs: Vec<String>,
    pairs: usize,
    members: usize,
    publishers: usize,
    window: usize,
    seconds: f64,
    pids: Vec<u32>,
}

fn parse() -> Args {
    let mut it = std::env::args().skip(1);
    let usage = "usage: redis_bench direct SEND RECV | room A,B,C [flags]";
    let mode = it.next().expect(usage);
    let addrs: Vec<String> = match mode.as_str() {
        "direct" => vec![it.next().expect(usage), it.next().expect(usage)],
        "room" => it
            .next()
            .expect(usage)
            .split(',')
            .map(String::from)
            .collect(),
        _ => panic!("{usage}"),
    };
    let mut args = Args {
        mode,
        addrs,
        pairs: 20,
        members: 10,
        publishers: 6,
        window: 8,
        seconds: 5.0,
        pids: Vec::new(),
    };
    while let Some(flag) = it.next() {
        let value = it.next().expect("every flag takes a value");
        match flag.as_str() {
            "--pairs" => args.pairs = value.parse().expect("--pairs N"),
            "--members" => args.members = value.parse().expect("--members N"),
            "--publishers" => args.publishers = value.parse().expect("--publishers N"),
            "--window" => args.window = value.parse().expect("--window N"),
            "--seconds" => args.seconds = value.parse().expect("--seconds S"),
            "--pids" => args.pids = value.split(',').map(|p| p.parse().unwrap()).collect(),
            other => panic!("unknown flag {other}"),
        }
    }
    args
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

type Ws = tungstenite::WebSocket<TcpStream>;

fn connect(addr: &str, id: &str) -> Ws {
    let stream = TcpStream::connect(addr).expect("connect");
    stream.set_nodelay(true).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let (mut ws, _) =
        tungstenite::client(format!("ws://{addr}/ws?id={id}"), stream).expect("handshake");
    loop {
        if let Ok(Message::Text(t)) = ws.read() {
            if t.as_str().contains("\"welcome\"") {
                return ws;
            }
        }
    }
}

/// The next text message, or None at the read timeout (so loops can see `stop`).
fn next(ws: &mut Ws) -> Option<serde_json::Value> {
    match ws.read() {
        Ok(Message::Text(t)) => serde_json::from_str(t.as_str()).ok(),
        Ok(_) => None,
        Err(tungstenite::Error::Io(e))
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            None
        }
        Err(e) => panic!("read: {e}"),
    }
}

/// Everything the receivers saw in the measured window.
#[derive(Default)]
struct Seen {
    latencies_us: Vec<u64>,
}

/// CPU seconds (user + system) of a process so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/PID/stat");
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after.split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    ticks as f64 / 100.0 // USER_HZ is 100 on Linux
}

fn metric(addr: &str, name: &str) -> Option<f64> {
    let mut s = TcpStream::connect(addr).ok()?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

fn main() {
    let args = parse();
    let stop = Arc::new(AtomicBool::new(false));
    let measuring = Arc::new(AtomicBool::new(false));
    let received = Arc::new(AtomicU64::new(0));
    let seen = Arc::new(Mutex::new(Seen::default()));
    let mut threads = Vec::new();
    // (connection, its sending target, whether it sends)
    let mut plan: Vec<(String, String, Option<String>)> = Vec::new();
    if args.mode == "direct" {
        for i in 0..args.pairs {
            plan.push((args.addrs[1].clone(), format!("r{i}"), None));
            plan.push((
                args.addrs[0].clone(),
                format!("s{i}"),
                Some(format!("r{i}")),
            ));
        }
    } else {
        let nodes = args.addrs.len();
        for m in 0..args.members * nodes {
            let publishes = m < args.publishers;
            let target = publishes.then(|| "bench".to_string());
            plan.push((args.addrs[m % nodes].clone(), format!("m{m}"), target));
        }
    }
    let ready = Arc::new(std::sync::Barrier::new(plan.len() + 1));
    for (addr, id, target) in plan {
        let (stop, measuring, received, seen, ready) = (
            Arc::clone(&stop),
            Arc::clone(&measuring),
            Arc::clone(&received),
            Arc::clone(&seen),
            Arc::clone(&ready),
        );
        let room = args.mode == "room";
        let window = args.window;
        threads.push(std::thread::spawn(move || {
            let mut ws = connect(&addr, &id);
            if room {
                ws.send(Message::text(r#"{"type":"join","room":"bench"}"#))
                    .unwrap();
                while next(&mut ws).is_none_or(|m| m["type"] != "joined") {}
            }
            ready.wait();
            let mut in_flight = 0usize;
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if let Some(to) = &target {
                    while in_flight < window {
                        let payload = format!(r#"{{"t":{}}}"#, now_us());
                        let text = if room {
                            format!(r#"{{"type":"publish","room":"{to}","payload":{payload},"id":"{n}"}}"#)
                        } else {
                            format!(r#"{{"type":"send","to":"{to}","payload":{payload},"id":"{n}"}}"#)
                        };
                        n += 1;
                        ws.send(Message::text(text)).unwrap();
                        in_flight += 1;
                    }
                }
                let Some(m) = next(&mut ws) else { continue };
                match m["type"].as_str() {
                    Some("ack") => in_flight = in_flight.saturating_sub(1),
                    Some("message") if measuring.load(Ordering::Relaxed) => {
                        received.fetch_add(1, Ordering::Relaxed);
                        let t = m["payload"]["t"].as_u64().unwrap_or(0);
                        let lat = now_us().saturating_sub(t);
                        seen.lock().unwrap().latencies_us.push(lat);
                    }
                    _ => {}
                }
            }
        }));
    }
    ready.wait();
    std::thread::sleep(Duration::from_secs(1)); // warm-up
    let commands = |addrs: &[String]| -> f64 {
        addrs
            .iter()
            .filter_map(|a| metric(a, "wsrelay_redis_commands_total"))
            .sum()
    };
    let cmd0 = commands(&args.addrs);
    let cpu0: f64 = args.pids.iter().map(|&p| cpu_seconds(p)).sum();
    let start = Instant::now();
    measuring.store(true, Ordering::Relaxed);
    std::thread::sleep(Duration::from_secs_f64(args.seconds)); // the measured window
    measuring.store(false, Ordering::Relaxed);
    let elapsed = start.elapsed().as_secs_f64();
    let cpu1: f64 = args.pids.iter().map(|&p| cpu_seconds(p)).sum();
    let cmd1 = commands(&args.addrs);
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let delivered = received.load(Ordering::Relaxed);
    let mut lat = std::mem::take(&mut seen.lock().unwrap().latencies_us);
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    let rate = delivered as f64 / elapsed;
    let cpu = cpu1 - cpu0;
    println!(
        "mode={} nodes={} deliveries/s={:.0} p50_us={} p99_us={} server_cpu_s={:.2} cpu_us_per_delivery={:.1} redis_commands_per_delivery={:.3}",
        args.mode,
        args.addrs.len(),
        rate,
        pct(0.50),
        pct(0.99),
        cpu,
        if delivered > 0 { cpu * 1e6 / delivered as f64 } else { 0.0 },
        if delivered > 0 { (cmd1 - cmd0) / delivered as f64 } else { 0.0 },
    );
}
