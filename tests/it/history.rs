//! Room history (SPEC §16) against the real server: `history` pages, `join` with `since`
//! replaying exactly what a member missed while it was away, `recovered` when it cannot, the
//! TTL, a restart with `--data-dir`, and the metrics that count it all.
//!
//! Every case runs on every poller, and those that do not restart run on both local engines
//! (memory, and file with `--data-dir`): the file engine answers through the reactor's waker.

use crate::client::ClientProcess;
use crate::poller_tests;
use crate::relay_support::*;
use crate::support::*;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use tempfile::TempDir;

/// The engines a case runs on: no extra flag (memory), and a fresh data directory (file).
fn engines() -> Vec<(&'static str, Option<TempDir>)> {
    vec![
        ("memory", None),
        ("file", Some(tempfile::tempdir().unwrap())),
    ]
}

/// A server with room history `n` (and `extra`), on `dir` if given.
fn start(poller: &str, n: usize, dir: Option<&TempDir>, extra: &[&str]) -> Server {
    let n = n.to_string();
    let mut args = vec!["--room-history", n.as_str()];
    if let Some(dir) = dir {
        args.extend(["--data-dir", dir.path().to_str().unwrap()]);
    }
    args.extend_from_slice(extra);
    Server::start(poller, &args)
}

/// A client id never used before in this test process: a reused one would be acked as a
/// duplicate of the first message with that id (SPEC §6), not published again.
fn fresh_id() -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!("h{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Publishes `payloads` to `room` (pipelined) and returns their acks, all `delivered`.
fn publish_all(
    a: &mut Client,
    room: &str,
    payloads: impl IntoIterator<Item = Value>,
) -> Vec<Value> {
    let mut sent = 0;
    for payload in payloads {
        a.send(json!({"type": "publish", "room": room, "payload": payload, "id": fresh_id()}));
        sent += 1;
    }
    (0..sent)
        .map(|_| {
            let ack = a.expect("ack");
            assert_eq!(ack["status"], "delivered", "{ack}");
            ack
        })
        .collect()
}

/// The payloads of a `history` reply's messages, in order.
fn page_payloads(page: &Value) -> Vec<Value> {
    page["messages"]
        .as_array()
        .unwrap_or_else(|| panic!("no messages in {page}"))
        .iter()
        .map(|m| m["payload"].clone())
        .collect()
}

/// Joins `room` with `since` and reads up to `joined`: (the replayed messages, `joined`).
/// Anything but the joiner's presence event, messages and `joined` fails the test.
fn join_since(b: &mut Client, me: &str, room: &str, since: &Value) -> (Vec<Value>, Value) {
    b.send(json!({"type": "join", "room": room, "since": since}));
    assert_eq!(
        b.expect("presence"),
        json!({"type": "presence", "room": room, "id": me, "event": "join"})
    );
    let mut replayed = Vec::new();
    loop {
        let m = b.recv();
        match m["type"].as_str() {
            Some("message") => replayed.push(m),
            Some("joined") => return (replayed, m),
            _ => panic!("unexpected during a replay: {m}"),
        }
    }
}

/// Publishes a marker and returns what `b` receives up to it: proves nothing else (no
/// duplicate of a replayed message) was on its way.
fn up_to_marker(a: &mut Client, b: &mut Client, room: &str) -> Vec<Value> {
    a.send(json!({"type": "publish", "room": room, "payload": "marker"}));
    a.expect("ack");
    let mut got = Vec::new();
    loop {
        let m = b.expect("message");
        if m["payload"] == "marker" {
            return got;
        }
        got.push(m);
    }
}

fn a_new_member_asks_history_and_gets_the_last_twenty_in_order(poller: &str) {
    for (engine, dir) in engines() {
        let server = start(poller, 20, dir.as_ref(), &[]);
        let mut a = Client::as_id(&server, "alice");
        let acks = publish_all(&mut a, "lobby", (0..30).map(|i| json!(i)));
        let mut b = Client::as_id(&server, "bob");
        b.send(json!({"type": "history", "room": "lobby", "limit": 50}));
        let page = b.expect("history");
        assert_eq!(
            page_payloads(&page),
            (10..30).map(|i| json!(i)).collect::<Vec<_>>(),
            "{engine}"
        );
        assert_eq!(page["last_msg_id"], acks[29]["msg_id"], "{engine}");
        let ids: Vec<&Value> = page["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| &m["msg_id"])
            .collect();
        let acked: Vec<&Value> = acks[10..].iter().map(|a| &a["msg_id"]).collect();
        assert_eq!(ids, acked, "{engine}: the msg_ids the publisher was acked");
        assert!(page["messages"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["from"] == "alice" && m["room"] == "lobby"));

        b.send(json!({"type": "history", "room": "lobby", "limit": 5}));
        let page = b.expect("history");
        assert_eq!(
            page_payloads(&page),
            (25..30).map(|i| json!(i)).collect::<Vec<_>>()
        );

        // Counted, and the history's own gauges and removals are there.
        let m = server.metrics();
        assert_eq!(m.get("wsrelay_history_requests_total"), 2.0, "{engine}");
        assert_eq!(m.get("wsrelay_history_messages_total"), 25.0, "{engine}");
        assert_eq!(m.get("wsrelay_room_history_messages"), 20.0, "{engine}");
        assert_eq!(m.get("wsrelay_room_history_rooms"), 1.0, "{engine}");
        assert!(
            m.get("wsrelay_room_history_bytes") > 20.0 * 96.0,
            "{engine}"
        );
        assert_eq!(
            m.get("wsrelay_room_history_removed_total{reason=\"per_room\"}"),
            10.0,
            "{engine}"
        );
        // Inbox figures are untouched: room history is an index of its own.
        assert_eq!(m.get("wsrelay_engine_messages"), 0.0, "{engine}");
    }
}

fn a_member_rejoining_with_since_gets_exactly_what_it_missed(poller: &str) {
    for (engine, dir) in engines() {
        let server = start(poller, 100, dir.as_ref(), &[]);
        let mut a = Client::as_id(&server, "alice");
        let mut b = Client::as_id(&server, "bob");
        b.join("lobby", "bob");
        publish_all(&mut a, "lobby", (0..3).map(|i| json!(i)));
        let seen: Vec<Value> = (0..3).map(|_| b.expect("message")).collect();
        let since = seen[2]["msg_id"].clone();
        drop(b);

        // While bob is away: 5 messages, one of them his own from another device.
        let acks = publish_all(&mut a, "lobby", (3..7).map(|i| json!(i)));
        let mut b2 = Client::as_id(&server, "bob");
        let own = publish_all(&mut b2, "lobby", [json!("bob's")]);
        drop(b2);

        let mut b = Client::as_id(&server, "bob");
        let (replayed, joined) = join_since(&mut b, "bob", "lobby", &since);
        let payloads: Vec<Value> = replayed.iter().map(|m| m["payload"].clone()).collect();
        assert_eq!(
            payloads,
            vec![json!(3), json!(4), json!(5), json!(6), json!("bob's")],
            "{engine}: what it missed, in order, its own included"
        );
        assert_eq!(joined["room"], "lobby");
        assert_eq!(joined["recovered"], true, "{engine}: {joined}");
        assert_eq!(joined["last_msg_id"], own[0]["msg_id"], "{engine}");
        assert!(replayed[0]["msg_id"] == acks[0]["msg_id"]);
        assert_eq!(
            up_to_marker(&mut a, &mut b, "lobby"),
            Vec::<Value>::new(),
            "{engine}: live after joined, nothing twice"
        );
        let m = server.metrics();
        assert_eq!(
            m.get("wsrelay_recoveries_total{kind=\"room\",recovered=\"true\"}"),
            1.0,
            "{engine}"
        );
        assert_eq!(m.get("wsrelay_room_replayed_total"), 5.0, "{engine}");
    }
}

fn a_since_older_than_the_history_is_not_recovered(poller: &str) {
    for (engine, dir) in engines() {
        let server = start(poller, 5, dir.as_ref(), &[]);
        let mut a = Client::as_id(&server, "alice");
        let first = publish_all(&mut a, "lobby", [json!("first")]);
        publish_all(&mut a, "lobby", (0..10).map(|i| json!(i)));
        let mut b = Client::as_id(&server, "bob");
        let (replayed, joined) = join_since(&mut b, "bob", "lobby", &first[0]["msg_id"]);
        assert_eq!(joined["recovered"], false, "{engine}: {joined}");
        let payloads: Vec<Value> = replayed.iter().map(|m| m["payload"].clone()).collect();
        assert_eq!(
            payloads,
            (5..10).map(|i| json!(i)).collect::<Vec<_>>(),
            "{engine}: what is still there"
        );
        assert_eq!(
            server
                .metrics()
                .get("wsrelay_recoveries_total{kind=\"room\",recovered=\"false\"}"),
            1.0
        );
        // Without history, a since cannot be served either.
        let off = Server::start(poller, &[]);
        let mut c = Client::as_id(&off, "carol");
        let (replayed, joined) = join_since(&mut c, "carol", "lobby", &json!("1"));
        assert!(replayed.is_empty());
        assert_eq!(joined["recovered"], false, "history off: {joined}");
        c.send(json!({"type": "history", "room": "lobby"}));
        assert_eq!(c.expect("error")["code"], "history_off");
    }
}

fn room_history_survives_a_restart_with_a_data_dir(poller: &str) {
    let dir = tempfile::tempdir().unwrap();
    let mut server = start(poller, 20, Some(&dir), &[]);
    let mut a = Client::as_id(&server, "alice");
    let mut b = Client::as_id(&server, "bob");
    b.join("lobby", "bob");
    let acks = publish_all(&mut a, "lobby", (0..25).map(|i| json!(i)));
    let seen: Vec<Value> = (0..10).map(|_| b.expect("message")).collect();
    let epoch = b_epoch(&server);
    drop((a, b));
    server.signal("KILL");
    server.wait_exit(DEADLINE);

    let server = start(poller, 20, Some(&dir), &[]);
    let mut c = Client::as_id(&server, "carol");
    c.send(json!({"type": "history", "room": "lobby"}));
    let page = c.expect("history");
    assert_eq!(
        page_payloads(&page),
        (5..25).map(|i| json!(i)).collect::<Vec<_>>()
    );
    assert_eq!(page["last_msg_id"], acks[24]["msg_id"]);
    // bob read 10 before the crash; he gets the other 15, complete (the epoch is kept).
    let mut b = Client::as_id(&server, "bob");
    b.send(json!({"type": "join", "room": "lobby", "since": seen[9]["msg_id"], "epoch": epoch}));
    b.expect("presence");
    let replayed: Vec<Value> = (0..15)
        .map(|_| b.expect("message")["payload"].clone())
        .collect();
    assert_eq!(replayed, (10..25).map(|i| json!(i)).collect::<Vec<_>>());
    let joined = b.expect("joined");
    assert_eq!(joined["recovered"], true, "{joined}");
    assert_eq!(joined["epoch"], epoch.as_str());
    // New positions are above the old ones.
    let mut a = Client::as_id(&server, "alice");
    let after = publish_all(&mut a, "lobby", [json!("after")]);
    let n = |v: &Value| v.as_str().unwrap().parse::<u64>().unwrap();
    assert!(n(&after[0]["msg_id"]) > n(&acks[24]["msg_id"]));
}

/// The epoch of the server's streams, as a welcome tells it.
fn b_epoch(server: &Server) -> String {
    let (_, welcome) = Client::connect(server, "/ws?id=epoch-probe");
    welcome["epoch"].as_str().unwrap().to_string()
}

fn the_ttl_empties_the_history_and_a_since_before_it_is_not_recovered(poller: &str) {
    for (engine, dir) in engines() {
        let server = start(poller, 10, dir.as_ref(), &["--room-history-ttl", "300ms"]);
        let mut a = Client::as_id(&server, "alice");
        let old = publish_all(&mut a, "lobby", [json!("old")]);
        // Time has to pass for a TTL to pass; the wait is on the server's own count of it
        // (the hub sweeps whenever it runs; /metrics asks it to).
        server.wait_for_metric("wsrelay_room_history_removed_total{reason=\"ttl\"}", 1.0);
        let mut b = Client::as_id(&server, "bob");
        b.send(json!({"type": "history", "room": "lobby"}));
        let page = b.expect("history");
        assert_eq!(page["messages"], json!([]), "{engine}");
        assert_eq!(page["last_msg_id"], Value::Null, "{engine}");
        let before = (old[0]["msg_id"].as_str().unwrap().parse::<u64>().unwrap() - 1).to_string();
        let (replayed, joined) = join_since(&mut b, "bob", "lobby", &json!(before));
        assert!(replayed.is_empty(), "{engine}");
        assert_eq!(joined["recovered"], false, "{engine}: {joined}");
        assert_eq!(server.metrics().get("wsrelay_room_history_messages"), 0.0);
    }
}

fn history_is_refused_for_a_room_the_token_does_not_allow(poller: &str) {
    let secret = "history-test-secret";
    let server = Server::start(poller, &["--room-history", "10", "--jwt-secret", secret]);
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": "bob", "exp": exp, "rooms": ["lobby"]}),
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap();
    let (mut b, _) = Client::connect(&server, &format!("/ws?token={token}"));
    b.send(json!({"type": "history", "room": "staff"}));
    assert_eq!(b.expect("error")["code"], "forbidden");
    b.send(json!({"type": "join", "room": "staff", "since": "1"}));
    assert_eq!(b.expect("error")["code"], "forbidden");
    b.send(json!({"type": "history", "room": "lobby"}));
    assert_eq!(b.expect("history")["room"], "lobby");
}

/// Reads `client`'s `--json` stdout until the envelope `done` accepts; returns every envelope
/// read, that one included.
fn client_until(client: &mut ClientProcess, done: impl Fn(&Value) -> bool) -> Vec<Value> {
    let mut seen = Vec::new();
    loop {
        let line = client.stdout_line();
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line}: {e}"));
        let last = done(&v);
        seen.push(v);
        if last {
            return seen;
        }
    }
}

/// `wsrelay client --room` across a server restart: it rejoins with the last room msg_id it
/// saw as `since` (and the epoch), gets what was published meanwhile exactly once, and says so
/// when the relay no longer has it (the memory engine forgets across a restart).
#[test]
fn the_client_rejoins_its_rooms_with_since_and_says_when_messages_may_be_missing() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().to_str().unwrap();
    let kept = ["--room-history", "50", "--data-dir", data_dir];
    let forgotten = ["--room-history", "50"];
    for (flags, recovered) in [(&kept[..], true), (&forgotten[..], false)] {
        let server = Server::start("epoll", flags);
        let addr = server.addr;
        let url = server.url("/ws");
        let args = ["--id", "bob", "--room", "lobby", "--json", &url];
        let mut bob = ClientProcess::start_logging(&args, "wsrelay=debug");
        client_until(&mut bob, |v| v["type"] == "joined");
        let mut a = Client::as_id(&server, "alice");
        publish_all(&mut a, "lobby", [json!("before")]);
        let got = client_until(&mut bob, |v| v["payload"] == "before");
        let seen = got.last().unwrap()["msg_id"].clone();
        drop(a);
        drop(server); // SIGKILL

        let server = Server::start_on("epoll", addr, flags);
        let mut a = Client::as_id(&server, "alice");
        publish_all(&mut a, "lobby", [json!("missed 1"), json!("missed 2")]);
        // The first join (on connect) had no since; the rejoin is the first line that has one.
        let rejoin = bob.stderr_until(r#""since":"#);
        let written: Value = serde_json::from_str(&rejoin[rejoin.find('{').unwrap()..]).unwrap();
        assert_eq!(written["room"], "lobby", "{rejoin}");
        assert_eq!(
            written["since"], seen,
            "the last room msg_id it saw: {rejoin}"
        );
        assert!(written["epoch"].is_string(), "{rejoin}");
        let got = client_until(&mut bob, |v| v["type"] == "joined");
        let joined = got.last().unwrap();
        assert_eq!(joined["recovered"], recovered, "{joined}");
        if recovered {
            // Replayed before `joined`, or live after it if bob rejoined before they were
            // published: either way each exactly once, in order.
            publish_all(&mut a, "lobby", [json!("marker")]);
            let rest = client_until(&mut bob, |v| v["payload"] == "marker");
            let payloads: Vec<&Value> = got
                .iter()
                .chain(&rest)
                .filter(|v| v["type"] == "message")
                .map(|v| &v["payload"])
                .collect();
            assert_eq!(
                payloads,
                ["missed 1", "missed 2", "marker"],
                "{got:?} {rest:?}"
            );
        } else {
            let warning = bob.stderr_until("#lobby while you were away may be missing");
            assert!(warning.starts_with("wsrelay client:"), "{warning}");
        }
    }
}

/// A history byte bound that cannot hold the largest message is refused at start, in words.
#[test]
fn a_room_history_byte_bound_below_max_message_is_refused() {
    let args = [
        "--room-history",
        "10",
        "--room-history-max-bytes",
        "1M",
        "--max-message",
        "1M",
    ];
    let (code, stderr) = refused_to_start("epoll", &args);
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains(
            "--room-history-max-bytes (1048576) must be at least the larger of --max-message"
        ),
        "{stderr}"
    );
}

fn an_api_publish_to_a_room_is_kept_and_replayed(poller: &str) {
    for (engine, dir) in engines() {
        let key = ["--api-key", crate::api::KEY];
        let server = start(poller, 10, dir.as_ref(), &key);
        let mut a = Client::as_id(&server, "alice");
        let mut b = Client::as_id(&server, "bob");
        b.join("lobby", "bob");
        publish_all(&mut a, "lobby", [json!("seen")]);
        let since = b.expect("message")["msg_id"].clone();
        drop(b);

        let mut api = crate::api::Api::connect(&server);
        let body = json!({"room": "lobby", "payload": {"from": "backend"}}).to_string();
        let answer = api.call("POST", "/api/publish", &body);
        assert_eq!(answer.status, 200, "{engine}: {}", answer.json);
        let msg_id = answer.json["msg_id"].clone();
        assert!(msg_id.is_string(), "{engine}: {}", answer.json);

        let mut b = Client::as_id(&server, "bob");
        let (replayed, joined) = join_since(&mut b, "bob", "lobby", &since);
        assert_eq!(replayed.len(), 1, "{engine}: {replayed:?}");
        assert_eq!(replayed[0]["msg_id"], msg_id, "{engine}");
        assert_eq!(replayed[0]["from"], "api", "{engine}");
        assert_eq!(replayed[0]["payload"], json!({"from": "backend"}));
        assert_eq!(joined["recovered"], true, "{engine}: {joined}");
        b.send(json!({"type": "history", "room": "lobby"}));
        let page = b.expect("history");
        assert_eq!(
            page_payloads(&page),
            vec![json!("seen"), json!({"from": "backend"})],
            "{engine}"
        );
        assert_eq!(page["more"], false, "{engine}");
    }
}

/// Publishes in flight (with the file engine: waiting for their fsync) on both sides of a
/// `join` with `since`, over real sockets: the joiner gets every one exactly once, in order,
/// part replayed and part live.
fn publishes_racing_a_join_are_each_delivered_once_in_order(poller: &str) {
    let dir = tempfile::tempdir().unwrap();
    // One fsync per message: the publishes complete one by one, so the join has many still
    // in flight ahead of it and behind it.
    let server = start(poller, 1000, Some(&dir), &["--fsync", "always"]);
    let mut a = Client::as_id(&server, "alice");
    let mut b = Client::as_id(&server, "bob");
    b.join("lobby", "bob");
    publish_all(&mut a, "lobby", [json!("seen")]);
    let since = b.expect("message")["msg_id"].clone();
    drop(b);
    let mut b = Client::as_id(&server, "bob");

    // Pipelined; the first ack shows the server is working through them when the join comes.
    for i in 0..150 {
        a.send(json!({"type": "publish", "room": "lobby", "payload": i}));
    }
    assert_eq!(a.expect("ack")["status"], "delivered");
    b.send(json!({"type": "join", "room": "lobby", "since": since}));
    for i in 150..300 {
        a.send(json!({"type": "publish", "room": "lobby", "payload": i}));
    }
    for _ in 1..300 {
        assert_eq!(a.expect("ack")["status"], "delivered");
    }
    assert_eq!(b.expect("presence")["event"], "join");
    let mut got = Vec::new();
    let mut joined = None;
    while joined.is_none() {
        let m = b.recv();
        match m["type"].as_str() {
            Some("message") => got.push(m["payload"].clone()),
            Some("joined") => joined = Some(m),
            _ => panic!("unexpected during a replay: {m}"),
        }
    }
    let joined = joined.unwrap();
    assert_eq!(joined["recovered"], true, "{joined}");
    let replayed = got.len();
    got.extend(
        up_to_marker(&mut a, &mut b, "lobby")
            .into_iter()
            .map(|m| m["payload"].clone()),
    );
    assert_eq!(
        got,
        (0..300).map(|i| json!(i)).collect::<Vec<_>>(),
        "{replayed} replayed, the rest live"
    );
}

poller_tests!(
    a_new_member_asks_history_and_gets_the_last_twenty_in_order,
    a_member_rejoining_with_since_gets_exactly_what_it_missed,
    a_since_older_than_the_history_is_not_recovered,
    room_history_survives_a_restart_with_a_data_dir,
    the_ttl_empties_the_history_and_a_since_before_it_is_not_recovered,
    history_is_refused_for_a_room_the_token_does_not_allow,
    an_api_publish_to_a_room_is_kept_and_replayed,
    publishes_racing_a_join_are_each_delivered_once_in_order,
);
