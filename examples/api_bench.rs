//! Publish throughput through the server API vs a WebSocket client (docs/benchmarks.md,
//! "Server API").
//!
//! Against a running server started with `--api-key KEY`, the same `--messages` room messages
//! (`{"n":i}` to room `bench`, one `/ws` member reading them) are published twice:
//! * `api`: over ONE kept-alive HTTP/1.1 connection (`wsrelay::api_client::ApiConnection`),
//!   keeping `--window` requests in flight (1: request, answer, request ...; more: pipelined);
//! * `ws`: by one `/ws` client (tungstenite), keeping `--window` publishes in flight, each
//!   carrying an id so that it is acked.
//!
//! Each run is timed from the first write to the last answer (ack), and the member must have
//! received every message by then or shortly after; it prints messages per second of both and
//! their ratio.
//!
//! ```sh
//! cargo run --release -- serve --listen 127.0.0.1:8080 --api-key k &
//! cargo run --release --example api_bench -- 127.0.0.1:8080 k --messages 100000 --window 1
//! ```

use serde_json::{json, Value};
use std::collections::VecDeque;
use std::net::TcpStream;
use std::time::{Duration, Instant};
use tungstenite::{Message, WebSocket};
use wsrelay::api_client::ApiConnection;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let addr = args
        .first()
        .cloned()
        .unwrap_or_else(|| "127.0.0.1:8080".into());
    let key = args.get(1).cloned().unwrap_or_else(|| "k".into());
    let flag = |name: &str, default: usize| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .map_or(default, |v| v.parse().expect("a number"))
    };
    let messages = flag("--messages", 100_000);
    let window = flag("--window", 1).max(1);

    let api = run("api", &addr, messages, |n| {
        publish_api(&addr, &key, n, window)
    });
    let ws = run("ws", &addr, messages, |n| publish_ws(&addr, n, window));
    println!(
        "window {window}: api {api:.0} msg/s, ws {ws:.0} msg/s, api/ws = {:.2}",
        api / ws
    );
}

/// Joins a member to `bench`, runs `publish`, waits for the member to have every message, and
/// returns messages per second (first write to last ack).
fn run(name: &str, addr: &str, messages: usize, publish: impl FnOnce(usize) -> Duration) -> f64 {
    let mut member = connect(addr, &format!("member-{name}"));
    member
        .send(Message::text(
            json!({"type":"join","room":"bench"}).to_string(),
        ))
        .unwrap();
    expect(&mut member, "presence");
    let reader = std::thread::spawn(move || {
        for i in 0..messages {
            let m = expect(&mut member, "message");
            assert_eq!(m["payload"]["n"], i, "in order");
        }
    });
    let took = publish(messages);
    reader.join().expect("the member got every message");
    let rate = messages as f64 / took.as_secs_f64();
    println!("{name}: {messages} messages in {took:.2?} = {rate:.0} msg/s");
    rate
}

fn publish_api(addr: &str, key: &str, messages: usize, window: usize) -> Duration {
    let mut api = ApiConnection::connect(&format!("http://{addr}"), key).unwrap();
    let start = Instant::now();
    let mut in_flight = 0;
    for i in 0..messages {
        let body = json!({"room": "bench", "payload": {"n": i}}).to_string();
        api.send("POST", "/api/publish", Some(&body)).unwrap();
        in_flight += 1;
        if in_flight == window {
            check_api(api.read_answer().unwrap());
            in_flight -= 1;
        }
    }
    for _ in 0..in_flight {
        check_api(api.read_answer().unwrap());
    }
    start.elapsed()
}

fn check_api((status, body): (u16, Vec<u8>)) {
    let answer: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        (status, &answer["status"]),
        (200, &json!("delivered")),
        "{answer}"
    );
}

fn publish_ws(addr: &str, messages: usize, window: usize) -> Duration {
    let mut ws = connect(addr, "publisher");
    let start = Instant::now();
    let mut in_flight = VecDeque::new();
    for i in 0..messages {
        let publish =
            json!({"type":"publish","room":"bench","payload":{"n": i},"id": i.to_string()});
        ws.send(Message::text(publish.to_string())).unwrap();
        in_flight.push_back(i);
        if in_flight.len() == window {
            expect(&mut ws, "ack");
            in_flight.pop_front();
        }
    }
    for _ in in_flight {
        expect(&mut ws, "ack");
    }
    start.elapsed()
}

fn connect(addr: &str, id: &str) -> WebSocket<TcpStream> {
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_nodelay(true).unwrap();
    let url = format!("ws://{addr}/ws?id={id}");
    let (mut ws, _) = tungstenite::client(url, stream).unwrap();
    expect(&mut ws, "welcome");
    ws
}

fn expect(ws: &mut WebSocket<TcpStream>, kind: &str) -> Value {
    loop {
        match ws.read().unwrap() {
            Message::Text(text) => {
                let v: Value = serde_json::from_str(text.as_str()).unwrap();
                assert_eq!(v["type"], kind, "{v}");
                return v;
            }
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}
