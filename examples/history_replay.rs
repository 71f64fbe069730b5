//! What a room history replay costs the server, per replayed message (docs/benchmarks.md,
//! "Room history").
//!
//! Against a running `wsrelay serve --room-history N` (its pid given, so its CPU time can be
//! read from /proc), it publishes `--messages` room messages of `--payload` bytes, then runs
//! `--rounds` joins of that room on fresh connections three ways:
//!
//! * `plain`: a join without `since` (nothing replayed): the cost of a connection and a join;
//! * `since`: a join with `since` before the first message: every message is replayed, then
//!   `joined`;
//! * `history`: a plain join, then one `history` request for every message.
//!
//! The server's CPU time (user + system, all threads, from /proc/<pid>/stat) is read around
//! each run; `(since - plain) / (rounds x messages)` is the CPU per replayed message, and the
//! same for `history`. Linux only (/proc).
//!
//! ```sh
//! wsrelay serve --room-history 1000 &
//! cargo run --release --example history_replay -- 127.0.0.1:8080 $! --messages 1000 --rounds 300
//! ```

use serde_json::{json, Value};
use std::net::TcpStream;
use std::time::{Duration, Instant};
use tungstenite::{Message, WebSocket};

struct Args {
    addr: String,
    pid: u32,
    messages: usize,
    rounds: usize,
    payload: usize,
}

fn parse() -> Args {
    let mut it = std::env::args().skip(1);
    let usage = "usage: history_replay ADDR PID [--messages N] [--rounds N] [--payload BYTES]";
    let addr = it.next().expect(usage);
    let pid = it.next().and_then(|p| p.parse().ok()).expect(usage);
    let mut args = Args {
        addr,
        pid,
        messages: 1000,
        rounds: 300,
        payload: 100,
    };
    while let Some(flag) = it.next() {
        let value: usize = it.next().and_then(|v| v.parse().ok()).expect(usage);
        match flag.as_str() {
            "--messages" => args.messages = value,
            "--rounds" => args.rounds = value,
            "--payload" => args.payload = value,
            _ => panic!("{usage}"),
        }
    }
    args
}

/// The server's CPU time so far (user + system, all threads), from /proc/<pid>/stat.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/PID/stat");
    // The command name is in parentheses and may hold spaces: fields count from after it.
    let after = &stat[stat.rfind(')').expect("(comm)") + 2..];
    let fields: Vec<&str> = after.split(' ').collect();
    // Fields 14 and 15 of stat(5) (utime, stime) are 11 and 12 after the state field.
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // In USER_HZ, which Linux fixes at 100 for what it reports to user space (proc(5)).
    ticks / 100.0
}

fn connect(addr: &str, id: &str) -> WebSocket<TcpStream> {
    let stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.set_nodelay(true).unwrap();
    let (mut ws, _) =
        tungstenite::client(format!("ws://{addr}/ws?id={id}"), stream).expect("upgrade");
    let welcome = recv(&mut ws);
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    ws
}

fn recv(ws: &mut WebSocket<TcpStream>) -> Value {
    loop {
        match ws.read().expect("read") {
            Message::Text(t) => return serde_json::from_str(t.as_str()).unwrap(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}

fn send(ws: &mut WebSocket<TcpStream>, v: Value) {
    ws.send(Message::text(v.to_string())).unwrap();
}

/// One join on a fresh connection, with `since` if given, and a `history` request after it
/// if asked; returns the messages received (replayed, or in the history reply).
fn one_round(a: &Args, round: usize, since: Option<&str>, history: bool) -> usize {
    let mut ws = connect(&a.addr, &format!("r{round}"));
    let mut join = json!({"type": "join", "room": "bench"});
    if let Some(since) = since {
        join["since"] = json!(since);
    }
    send(&mut ws, join);
    let mut got = 0;
    loop {
        let m = recv(&mut ws);
        match m["type"].as_str() {
            Some("message") => got += 1,
            Some("joined") => break,
            _ => {}
        }
    }
    if history {
        send(
            &mut ws,
            json!({"type": "history", "room": "bench", "limit": a.messages}),
        );
        let page = loop {
            let m = recv(&mut ws);
            if m["type"] == "history" {
                break m;
            }
        };
        got += page["messages"].as_array().map_or(0, Vec::len);
    }
    let _ = ws.close(None);
    // Read until the close handshake ends, so the server's work for it falls in this run.
    while ws.read().is_ok() {}
    got
}

/// Runs every round one way; returns (server CPU seconds, wall seconds, messages received).
fn run(a: &Args, since: Option<&str>, history: bool) -> (f64, f64, usize) {
    let cpu = cpu_seconds(a.pid);
    let start = Instant::now();
    let mut got = 0;
    for round in 0..a.rounds {
        got += one_round(a, round, since, history);
    }
    (cpu_seconds(a.pid) - cpu, start.elapsed().as_secs_f64(), got)
}

fn main() {
    let a = parse();
    let mut publisher = connect(&a.addr, "publisher");
    let text = "x".repeat(a.payload);
    for i in 0..a.messages {
        send(
            &mut publisher,
            json!({"type": "publish", "room": "bench", "payload": text, "id": format!("m{i}")}),
        );
    }
    let mut first = None;
    for _ in 0..a.messages {
        let ack = recv(&mut publisher);
        assert_eq!(ack["status"], "delivered", "{ack}");
        first.get_or_insert_with(|| ack["msg_id"].as_str().unwrap().to_string());
    }
    let first: u64 = first.expect("at least one message").parse().unwrap();
    let since = (first - 1).to_string();

    let (plain_cpu, plain_wall, none) = run(&a, None, false);
    assert_eq!(none, 0);
    let (since_cpu, since_wall, replayed) = run(&a, Some(&since), false);
    assert_eq!(
        replayed,
        a.rounds * a.messages,
        "every message replayed every round"
    );
    let (history_cpu, history_wall, paged) = run(&a, None, true);
    assert_eq!(
        paged,
        a.rounds * a.messages.min(1000),
        "a full page every round"
    );

    let per = |cpu: f64, n: usize| (cpu - plain_cpu) / n as f64 * 1e9;
    println!(
        "{} rounds x {} messages of {} B payload: server CPU plain joins {plain_cpu:.2}s \
         ({plain_wall:.2}s wall), joins with since {since_cpu:.2}s ({since_wall:.2}s wall), \
         history {history_cpu:.2}s ({history_wall:.2}s wall)",
        a.rounds, a.messages, a.payload
    );
    println!(
        "per replayed message: join with since {:.0} ns of server CPU, history {:.0} ns",
        per(since_cpu, replayed),
        per(history_cpu, paged)
    );
}
