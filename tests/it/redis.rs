//! Several nodes on one Redis (`--redis`, SPEC §15): real `wsrelay` processes sharing a real
//! `redis-server` (tests/it/redis_server.rs), driven by tungstenite clients.
//!
//! Every case runs on every poller: the engine's answers reach the reactor through the waker's
//! descriptor, which each poller watches in its own way. A case without `redis-server` skips in
//! one line, unless `WSRELAY_REQUIRE_REDIS` is set (`./scripts/test`, CI).

use crate::poller_tests;
use crate::redis_server::{redis_available, RedisServer};
use crate::relay_support::*;
use crate::support::*;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// A node on `redis` with the given extra flags.
fn node(poller: &str, redis: &RedisServer, extra: &[&str]) -> Server {
    let url = redis.url();
    // `--workers 1` explicitly: TEST_WORKERS must not turn these into the refused combination.
    let mut args = vec!["--redis", url.as_str(), "--workers", "1"];
    args.extend_from_slice(extra);
    Server::start(poller, &args)
}

/// One sample of /metrics, which must be there: a missing metric fails the test.
fn metric(server: &Server, sample: &str) -> f64 {
    server.metric(sample)
}

/// Polls /metrics until `sample` is at least `min` (bounded by `DEADLINE`).
fn wait_metric_at_least(server: &Server, sample: &str, min: f64) {
    let start = Instant::now();
    loop {
        let now = metric(server, sample);
        if now >= min {
            return;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "{sample} is {now}, expected at least {min}"
        );
        std::thread::sleep(Duration::from_millis(20)); // poll interval, not a synchronisation
    }
}

/// Until `/healthz` answers `status` (bounded); returns its body.
fn wait_health(server: &Server, status: u16) -> String {
    let start = Instant::now();
    loop {
        let r = server.get("/healthz");
        if r.status == status {
            return r.body_text();
        }
        assert!(
            start.elapsed() < DEADLINE,
            "/healthz stayed {} ({}), expected {status}",
            r.status,
            r.body_text()
        );
        std::thread::sleep(Duration::from_millis(20)); // poll interval, not a synchronisation
    }
}

/// Waits until /healthz answers 503 with a body containing `needle`; returns the body.
fn wait_health_saying(server: &Server, needle: &str) -> String {
    let start = Instant::now();
    loop {
        let r = server.get("/healthz");
        let body = r.body_text();
        if r.status == 503 && body.contains(needle) {
            return body;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "/healthz never said {needle:?}: last {} ({body})",
            r.status
        );
        std::thread::sleep(Duration::from_millis(20)); // poll interval, not a synchronisation
    }
}

/// Reads room messages until one from each of `senders` carries `{"last": true}`; returns the
/// payloads' `n` per sender, in arrival order. Presence events (members on other nodes join
/// too, tests/it/redis_presence.rs) are skipped; anything else but a room message fails the
/// test.
fn room_messages(c: &mut Client, senders: &[&str]) -> HashMap<String, Vec<u64>> {
    let mut got: HashMap<String, Vec<u64>> = HashMap::new();
    let mut done = 0;
    while done < senders.len() {
        let m = c.recv();
        if m["type"] == "presence" {
            continue;
        }
        assert_eq!(m["type"], "message", "{m}");
        let from = m["from"].as_str().unwrap().to_string();
        if m["payload"]["last"] == true {
            done += 1;
            continue;
        }
        got.entry(from)
            .or_default()
            .push(m["payload"]["n"].as_u64().unwrap());
    }
    got
}

fn a_on_node_1_and_b_on_node_2_chat_with_acks(poller: &str) {
    if !redis_available() {
        return;
    }
    let redis = RedisServer::start();
    let (n1, n2) = (node(poller, &redis, &[]), node(poller, &redis, &[]));
    let mut a = Client::as_id(&n1, "alice");
    let mut b = Client::as_id(&n2, "bob");
    for i in 0..5 {
        let ack = a.send_acked("bob", json!({"n": i}), &format!("a{i}"));
        // Stored in Redis, and bob had a live connection on node 2 (docs/protocol.md).
        assert_eq!(ack["status"], "delivered", "{ack}");
        let m = b.expect("message");
        assert_eq!(m["from"], "alice");
        assert_eq!(m["payload"]["n"], i);
        assert_eq!(msg_id(&m), msg_id(&ack));
        let back = b.send_acked("alice", json!({"re": i}), &format!("b{i}"));
        assert_eq!(back["status"], "delivered", "{back}");
        assert_eq!(a.expect("message")["payload"]["re"], i);
    }
    // Positions are contiguous per stream: bob's inbox took 5 in a row.
    assert_eq!(metric(&n2, "wsrelay_engine_info{kind=\"redis\"}"), 1.0);
    assert_eq!(metric(&n1, "wsrelay_redis_up{link=\"commands\"}"), 1.0);
    assert!(metric(&n1, "wsrelay_redis_roundtrip_seconds_count") >= 1.0);
    assert_eq!(n1.get("/healthz").status, 200);
}

fn a_room_across_three_nodes_gets_every_message_once_in_order_never_its_own(poller: &str) {
    if !redis_available() {
        return;
    }
    let redis = RedisServer::start();
    // With room history on, a join is answered after the room's stream was read: nothing
    // published after the `joined` can be missed, whenever the subscription takes effect.
    let flags = ["--room-history", "100"];
    let nodes: Vec<Server> = (0..3).map(|_| node(poller, &redis, &flags)).collect();
    let names = ["n0", "n1", "n2"];
    let mut clients: Vec<Client> = nodes
        .iter()
        .zip(names)
        .map(|(n, id)| {
            let mut c = Client::as_id(n, id);
            c.join("lobby", id);
            c
        })
        .collect();
    // Presence events of the later joiners reach this node's members only (presence across
    // nodes is another piece of work): drain what each got before the traffic starts.
    const N: u64 = 30;
    for (i, c) in clients.iter_mut().enumerate() {
        for n in 0..N {
            let id = format!("{}-{n}", names[i]);
            c.send(json!({"type": "publish", "room": "lobby", "payload": {"n": n}, "id": id}));
        }
        let end = format!("{}-end", names[i]);
        c.send(json!({"type": "publish", "room": "lobby", "payload": {"last": true}, "id": end}));
    }
    for (i, c) in clients.iter_mut().enumerate() {
        let mut got: HashMap<String, Vec<u64>> = HashMap::new();
        let mut acks = 0;
        let mut ends = 0;
        while acks < N + 1 || ends < 2 {
            let m = c.recv();
            match m["type"].as_str().unwrap() {
                "ack" => {
                    assert_eq!(m["status"], "delivered", "{m}");
                    acks += 1;
                }
                "message" => {
                    let from = m["from"].as_str().unwrap().to_string();
                    assert_ne!(from, names[i], "a member got its own message");
                    if m["payload"]["last"] == true {
                        ends += 1;
                    } else {
                        got.entry(from)
                            .or_default()
                            .push(m["payload"]["n"].as_u64().unwrap());
                    }
                }
                "presence" => {}
                other => panic!("unexpected {other}: {m}"),
            }
        }
        for (j, sender) in names.iter().enumerate() {
            if j == i {
                continue;
            }
            let want: Vec<u64> = (0..N).collect();
            assert_eq!(got[*sender], want, "{} from {sender}", names[i]);
        }
    }
    for n in &nodes {
        assert!(metric(n, "wsrelay_redis_arrivals_total") >= (2 * (N + 1)) as f64);
        assert_eq!(metric(n, "wsrelay_redis_gaps_unrecoverable_total"), 0.0);
    }
}

fn a_room_without_history_spans_nodes_once_subscribed(poller: &str) {
    if !redis_available() {
        return;
    }
    let redis = RedisServer::start();
    let (n1, n2) = (node(poller, &redis, &[]), node(poller, &redis, &[]));
    let mut a = Client::as_id(&n1, "alice");
    let mut b = Client::as_id(&n2, "bob");
    a.join("lobby", "alice");
    b.join("lobby", "bob");
    // Each hears the other join across the nodes (tests/it/redis_presence.rs).
    assert_eq!(a.expect("presence")["id"], "bob");
    assert_eq!(b.expect("presence")["id"], "alice");
    // Without history there is no read to order the subscription against: wait until node 2
    // follows the room (docs/scaling.md says what a message in that moment meets).
    wait_metric_at_least(&n2, "wsrelay_redis_subscribed_channels", 2.0);
    for n in 0..10 {
        let id = format!("p{n}");
        a.send(json!({"type": "publish", "room": "lobby", "payload": {"n": n}, "id": id}));
        assert_eq!(a.expect("ack")["status"], "delivered");
    }
    a.send(json!({"type": "publish", "room": "lobby", "payload": {"last": true}}));
    let got = room_messages(&mut b, &["alice"]);
    assert_eq!(got["alice"], (0..10).collect::<Vec<u64>>());
}

/// A node's first join of a room without history, while another node publishes to it in a
/// tight loop: every message published after the joiner read its `joined` reaches it, with no
/// hole (the join waits for the engine's read of the stream's top, and the subscription re-reads
/// from there once it takes effect; docs/scaling.md).
fn a_first_join_without_history_misses_nothing_published_after_joined(poller: &str) {
    if !redis_available() {
        return;
    }
    let redis = RedisServer::start();
    let (n1, n2) = (node(poller, &redis, &[]), node(poller, &redis, &[]));
    let mut publisher = Client::as_id(&n2, "pub");
    publisher.join("lobby", "pub");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopping = std::sync::Arc::clone(&stop);
    let published = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counting = std::sync::Arc::clone(&published);
    // Each publish paced by its ack; `sent[n]` is when publish n left the client.
    let publishing = std::thread::spawn(move || {
        let mut sent = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !stopping.load(std::sync::atomic::Ordering::Acquire) {
            assert!(Instant::now() < deadline, "the joiner never finished");
            let n = sent.len() as u64;
            sent.push(Instant::now());
            publisher.send(json!({"type": "publish", "room": "lobby", "payload": {"n": n}, "id": format!("p{n}")}));
            loop {
                let m = publisher.recv();
                if m["type"] == "ack" {
                    assert_eq!(m["id"], format!("p{n}"), "{m}");
                    break;
                }
                assert_eq!(m["type"], "presence", "{m}");
            }
            counting.store(n + 1, std::sync::atomic::Ordering::Release);
        }
        publisher.send(json!({"type": "publish", "room": "lobby", "payload": {"last": true}}));
        sent
    });
    // Let the publisher get going, so the join lands in the middle of the stream.
    let deadline = Instant::now() + Duration::from_secs(10);
    while published.load(std::sync::atomic::Ordering::Acquire) < 20 {
        assert!(Instant::now() < deadline, "the publisher did not start");
        std::thread::yield_now();
    }
    let mut joiner = Client::as_id(&n1, "joiner");
    joiner.send(json!({"type": "join", "room": "lobby"}));
    let mut got = Vec::new();
    let joined_at = loop {
        let m = joiner.recv();
        match m["type"].as_str() {
            Some("joined") => break Instant::now(),
            Some("presence") => continue,
            Some("message") => got.push(m["payload"]["n"].as_u64().unwrap()),
            _ => panic!("{m}"),
        }
    };
    assert!(got.is_empty(), "a message before `joined`: {got:?}");
    // Receive a good run of messages after `joined`, then stop the publisher.
    while got.len() < 200 {
        let m = joiner.recv();
        if m["type"] == "message" {
            got.push(m["payload"]["n"].as_u64().unwrap());
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Release);
    let rest = room_messages(&mut joiner, &["pub"]);
    got.extend(rest.get("pub").into_iter().flatten());
    let sent = publishing.join().expect("the publisher");
    // The first publish that left after `joined` was read must have reached the joiner, and
    // everything after it, in order, once.
    let first_after = sent
        .iter()
        .position(|&t| t > joined_at)
        .expect("publishes after joined") as u64;
    let start = got
        .iter()
        .position(|&n| n >= first_after)
        .expect("some arrived");
    assert!(
        got[0] <= first_after && got[start] == first_after,
        "a hole after joined: first received {}, first published after joined {first_after}",
        got[0]
    );
    let want: Vec<u64> = (got[0]..sent.len() as u64).collect();
    assert_eq!(
        got, want,
        "every message after the first one received, once, in order"
    );
}

fn a_member_rejoins_a_room_on_another_node_with_since_and_misses_nothing(poller: &str) {
    if !redis_available() {
        return;
    }
    let redis = RedisServer::start();
    let flags = ["--room-history", "50"];
    let (n1, n2) = (node(poller, &redis, &flags), node(poller, &redis, &flags));
    let mut a = Client::as_id(&n1, "alice");
    a.join("lobby", "alice");
    let mut b = Client::as_id(&n1, "bob");
    b.send(json!({"type": "join", "room": "lobby"}));
    assert_eq!(b.expect("presence")["id"], "bob");
    let joined = b.expect("joined");
    // The room's own epoch (with --redis every stream has one).
    let epoch = joined["epoch"].as_str().unwrap().to_string();
    assert_eq!(a.expect("presence")["id"], "bob");
    a.send(json!({"type": "publish", "room": "lobby", "payload": "seen", "id": "p0"}));
    assert_eq!(a.expect("ack")["status"], "delivered");
    let seen = msg_id(&b.expect("message"));
    drop(b);
    assert_eq!(a.expect("presence")["event"], "leave");
    for n in 1..=3 {
        let id = format!("p{n}");
        a.send(json!({"type": "publish", "room": "lobby", "payload": n, "id": id}));
        assert_eq!(a.expect("ack")["status"], "delivered");
    }
    // bob comes back through the other node and asks for what followed `seen`.
    let mut b = Client::as_id(&n2, "bob");
    let since = seen.to_string();
    b.send(json!({"type": "join", "room": "lobby", "since": since, "epoch": epoch}));
    assert_eq!(b.expect("presence")["id"], "bob");
    let replay: Vec<Value> = (0..3)
        .map(|_| b.expect("message")["payload"].clone())
        .collect();
    assert_eq!(replay, [json!(1), json!(2), json!(3)]);
    let joined = b.expect("joined");
    assert_eq!(joined["recovered"], true, "{joined}");
    assert_eq!(joined["epoch"], epoch.as_str());
    // Live from here on, once. (bob, the room's first member on node 2, also hears alice, who
    // was already there, join: tests/it/redis_presence.rs.)
    a.send(json!({"type": "publish", "room": "lobby", "payload": "live", "id": "p4"}));
    let live = loop {
        let m = b.recv();
        if m["type"] != "presence" {
            break m;
        }
    };
    assert_eq!(live["type"], "message", "{live}");
    assert_eq!(live["payload"], "live");
}

fn fifty_messages_for_an_offline_id_reach_it_on_another_node_before_live_traffic(poller: &str) {
    if !redis_available() {
        return;
    }
    let redis = RedisServer::start();
    let nodes: Vec<Server> = (0..3).map(|_| node(poller, &redis, &[])).collect();
    let mut a = Client::as_id(&nodes[0], "alice");
    for i in 0..50 {
        a.send_to("bob", json!({"n": i}), &format!("m{i}"));
    }
    let mut ids = Vec::new();
    for _ in 0..50 {
        let ack = a.expect("ack");
        assert_eq!(ack["status"], "queued", "{ack}");
        ids.push(msg_id(&ack));
    }
    assert!(
        ids.windows(2).all(|w| w[1] == w[0] + 1),
        "contiguous: {ids:?}"
    );
    let (mut b, welcome) = Client::connect(&nodes[2], "/ws?id=bob");
    assert_eq!(welcome["recovered"], true);
    assert_eq!(welcome["last_msg_id"], ids[49].to_string());
    for (i, id) in ids.iter().enumerate() {
        let m = b.expect("message");
        assert_eq!(m["payload"]["n"], i as u64);
        assert_eq!(msg_id(&m), *id);
    }
    let live = a.send_acked("bob", json!("live"), "live");
    assert_eq!(live["status"], "delivered", "{live}");
    let m = b.expect("message");
    assert_eq!(m["payload"], "live");
    // Delivered from the recovery and live: nothing is pending any more, whichever node bob
    // uses next, once node 3 has recorded it (asynchronously: a connection opening elsewhere
    // in that moment may get a message again, which clients drop by msg_id).
    let start = Instant::now();
    loop {
        let delivered: u64 = match redis.cli(&["HGET", "{wsrelay:i:bob}:m", "delivered"]) {
            redis::Value::BulkString(b) => String::from_utf8(b).unwrap().parse().unwrap(),
            other => panic!("{other:?}"),
        };
        if delivered >= msg_id(&live) {
            break;
        }
        assert!(start.elapsed() < DEADLINE, "delivery never recorded");
        std::thread::sleep(Duration::from_millis(10)); // poll interval, not a synchronisation
    }
    drop(b);
    let (mut b2, welcome) = Client::connect(&nodes[1], "/ws?id=bob");
    assert_eq!(welcome["recovered"], true);
    let marker = a.send_acked("bob", json!("marker"), "marker");
    assert_eq!(marker["status"], "delivered", "{marker}");
    assert_eq!(b2.expect("message")["payload"], "marker", "no replay twice");
}

fn a_client_id_resent_through_another_node_is_not_delivered_twice(poller: &str) {
    if !redis_available() {
        return;
    }
    let redis = RedisServer::start();
    let (n1, n2) = (node(poller, &redis, &[]), node(poller, &redis, &[]));
    let mut b = Client::as_id(&n2, "bob");
    let mut a = Client::as_id(&n1, "alice");
    let first = a.send_acked("bob", json!("once"), "same-id");
    assert_eq!(first["status"], "delivered", "{first}");
    assert_eq!(b.expect("message")["payload"], "once");
    // alice reconnects elsewhere and sends the same client id again (she missed the ack).
    drop(a);
    let mut a = Client::as_id(&n2, "alice");
    let again = a.send_acked("bob", json!("once"), "same-id");
    assert_eq!(again["status"], "delivered", "{again}");
    assert_eq!(msg_id(&again), msg_id(&first));
    let marker = a.send_acked("bob", json!("marker"), "marker");
    assert_eq!(marker["status"], "delivered");
    assert_eq!(
        b.expect("message")["payload"],
        "marker",
        "the duplicate went out"
    );
}

fn redis_down_rejects_sends_keeps_local_rooms_and_loses_nothing_acked(poller: &str) {
    if !redis_available() {
        return;
    }
    let mut redis = RedisServer::start();
    let (n1, n2) = (node(poller, &redis, &[]), node(poller, &redis, &[]));
    let mut a = Client::as_id(&n1, "alice");
    let mut c = Client::as_id(&n1, "carol");
    a.join("local", "alice");
    c.join("local", "carol");
    assert_eq!(a.expect("presence")["event"], "join");
    // Queued before the outage: must survive the Redis restart (appendfsync always).
    let mut queued = Vec::new();
    for i in 0..5 {
        let ack = a.send_acked("bob", json!({"n": i}), &format!("q{i}"));
        assert_eq!(ack["status"], "queued", "{ack}");
        queued.push(msg_id(&ack));
    }
    redis.stop();
    let ack = a.send_acked("bob", json!("lost?"), "down-1");
    assert_eq!(ack["status"], "rejected", "{ack}");
    assert!(ack["reason"].as_str().unwrap().contains("try again later"));
    // A room without history: this node's members still hear each other.
    a.send(json!({"type": "publish", "room": "local", "payload": "still here", "id": "r1"}));
    assert_eq!(a.expect("ack")["status"], "delivered");
    assert_eq!(c.expect("message")["payload"], "still here");
    let health = wait_health(&n1, 503);
    assert!(health.starts_with("degraded: redis"), "{health}");
    assert!(metric(&n1, "wsrelay_redis_rejected_unreachable_total") >= 1.0);
    assert!(metric(&n1, "wsrelay_redis_local_only_total") >= 1.0);
    redis.restart();
    // Healthy again by itself, before anyone sends (the engine probes a link that is down).
    wait_health(&n1, 200);
    // The retry of the rejected message is a new message once Redis is back.
    let start = Instant::now();
    let retried = loop {
        let ack = a.send_acked("bob", json!("lost?"), "down-1");
        if ack["status"] == "queued" {
            break ack;
        }
        assert!(start.elapsed() < DEADLINE, "still {ack}");
        std::thread::sleep(Duration::from_millis(50)); // a client's retry delay
    };
    let (mut b, welcome) = Client::connect(&n2, "/ws?id=bob");
    assert_eq!(welcome["recovered"], true);
    for id in &queued {
        assert_eq!(msg_id(&b.expect("message")), *id, "acked queued, then lost");
    }
    assert_eq!(msg_id(&b.expect("message")), msg_id(&retried));
    assert!(metric(&n1, "wsrelay_redis_reconnects_total{link=\"commands\"}") >= 1.0);
    wait_metric_at_least(&n1, "wsrelay_redis_reconnects_total{link=\"pubsub\"}", 1.0);
}

fn redis_restarted_mid_conversation_recovers_the_gap(poller: &str) {
    if !redis_available() {
        return;
    }
    let mut redis = RedisServer::start();
    let (n1, n2) = (node(poller, &redis, &[]), node(poller, &redis, &[]));
    let mut b = Client::as_id(&n2, "bob");
    let mut a = Client::as_id(&n1, "alice");
    assert_eq!(a.send_acked("bob", json!(0), "m0")["status"], "delivered");
    assert_eq!(b.expect("message")["payload"], 0);
    redis.restart();
    // Sends while node 2's subscription may still be down: each acked one reaches bob once.
    let mut sent = Vec::new();
    let start = Instant::now();
    while sent.len() < 10 {
        let n = sent.len() + 1;
        let ack = a.send_acked("bob", json!(n), &format!("m{n}"));
        if ack["status"] != "rejected" {
            sent.push(msg_id(&ack));
        }
        assert!(start.elapsed() < DEADLINE, "Redis never came back: {ack}");
    }
    for id in &sent {
        assert_eq!(msg_id(&b.expect("message")), *id);
    }
    wait_metric_at_least(&n2, "wsrelay_redis_reconnects_total{link=\"pubsub\"}", 1.0);
    wait_metric_at_least(&n2, "wsrelay_redis_resubscribes_total", 1.0);
    assert_eq!(metric(&n2, "wsrelay_redis_gaps_unrecoverable_total"), 0.0);
}

fn a_killed_pubsub_connection_is_noticed_resubscribed_and_its_gap_recovered(poller: &str) {
    if !redis_available() {
        return;
    }
    let redis = RedisServer::start();
    let (n1, n2) = (node(poller, &redis, &[]), node(poller, &redis, &[]));
    let mut b = Client::as_id(&n2, "bob");
    let mut a = Client::as_id(&n1, "alice");
    assert_eq!(a.send_acked("bob", json!(0), "m0")["status"], "delivered");
    assert_eq!(b.expect("message")["payload"], 0);
    // CLIENT KILL TYPE pubsub matches connections with a subscription in effect.
    wait_metric_at_least(&n1, "wsrelay_redis_subscribed_channels", 1.0);
    wait_metric_at_least(&n2, "wsrelay_redis_subscribed_channels", 1.0);
    let fills = metric(&n2, "wsrelay_redis_fills_total");
    assert!(
        redis.kill_pubsub() >= 2,
        "both nodes hold a PUB/SUB connection"
    );
    // Published while node 2 has no subscription (until it notices and reconnects).
    let mut sent = Vec::new();
    for n in 1..=20 {
        let ack = a.send_acked("bob", json!(n), &format!("m{n}"));
        assert_ne!(ack["status"], "rejected", "{ack}");
        sent.push(msg_id(&ack));
    }
    for id in &sent {
        assert_eq!(msg_id(&b.expect("message")), *id, "lost or out of order");
    }
    let marker = a.send_acked("bob", json!("marker"), "marker");
    assert_eq!(
        b.expect("message")["payload"],
        "marker",
        "{marker}: a duplicate"
    );
    wait_metric_at_least(&n2, "wsrelay_redis_reconnects_total{link=\"pubsub\"}", 1.0);
    wait_metric_at_least(&n2, "wsrelay_redis_resubscribes_total", 1.0);
    // The resubscription re-read bob's inbox after the last position node 2 had seen.
    assert!(metric(&n2, "wsrelay_redis_fills_total") > fills);
}

fn a_message_lost_on_pubsub_is_re_read_before_the_next_one(poller: &str) {
    if !redis_available() {
        return;
    }
    let redis = RedisServer::start();
    let (n1, n2) = (node(poller, &redis, &[]), node(poller, &redis, &[]));
    let mut b = Client::as_id(&n2, "bob");
    let mut a = Client::as_id(&n1, "alice");
    let first = a.send_acked("bob", json!("first"), "m0");
    assert_eq!(b.expect("message")["payload"], "first");
    // A message stored as a node's script would store it, whose PUBLISH never reached node 2
    // (what a dropped PUB/SUB connection or a failover loses): the next position, in the
    // stream, with no publication.
    let lost = msg_id(&first) + 1;
    let stream = "{wsrelay:i:bob}:s";
    let body = match redis.cli(&["XRANGE", stream, "-", "+"]) {
        redis::Value::Array(entries) => match &entries[0] {
            redis::Value::Array(entry) => match &entry[1] {
                redis::Value::Array(fields) => match &fields[3] {
                    redis::Value::BulkString(b) => String::from_utf8(b.clone()).unwrap(),
                    other => panic!("{other:?}"),
                },
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    };
    let body = body.replace(r#""payload":"first""#, r#""payload":"lost""#);
    assert!(body.contains("lost"), "{body}");
    let id = format!("{lost}-0");
    // (Counted from here: the first message may itself have come from a re-read, when bob's
    // recovery ran before node 2's subscription took effect.)
    let detected = metric(&n2, "wsrelay_redis_gaps_detected_total");
    let recovered = metric(&n2, "wsrelay_redis_gaps_recovered_total");
    redis.cli(&["XADD", stream, &id, "n", "00000000000000aa", "b", &body]);
    redis.cli(&["HSET", "{wsrelay:i:bob}:m", "top", &lost.to_string()]);
    // The next message shows the gap: node 2 re-reads it and hands it out first.
    let next = a.send_acked("bob", json!("next"), "m2");
    assert_eq!(msg_id(&next), lost + 1);
    let m = b.expect("message");
    assert_eq!((m["payload"].as_str(), msg_id(&m)), (Some("lost"), lost));
    let m = b.expect("message");
    assert_eq!(
        (m["payload"].as_str(), msg_id(&m)),
        (Some("next"), lost + 1)
    );
    assert_eq!(
        metric(&n2, "wsrelay_redis_gaps_detected_total"),
        detected + 1.0
    );
    assert_eq!(
        metric(&n2, "wsrelay_redis_gaps_recovered_total"),
        recovered + 1.0
    );
    assert!(metric(&n2, "wsrelay_redis_messages_recovered_total") >= 1.0);
    let marker = a.send_acked("bob", json!("marker"), "marker");
    assert_eq!(
        b.expect("message")["payload"],
        "marker",
        "{marker}: a duplicate"
    );
}

fn a_message_lost_for_good_closes_its_followers_to_reconnect_with_since(poller: &str) {
    if !redis_available() {
        return;
    }
    let redis = RedisServer::start();
    let (n1, n2) = (node(poller, &redis, &[]), node(poller, &redis, &[]));
    let (mut b, welcome) = Client::connect(&n2, "/ws?id=bob");
    let epoch = welcome["epoch"].as_str().unwrap().to_string();
    let mut a = Client::as_id(&n1, "alice");
    let first = a.send_acked("bob", json!("first"), "m0");
    assert_eq!(b.expect("message")["payload"], "first");
    // A position taken, its message neither published to node 2 nor in the stream any more
    // (trimmed before node 2 could re-read it): lost for good.
    let lost = msg_id(&first) + 1;
    redis.cli(&["HSET", "{wsrelay:i:bob}:m", "top", &lost.to_string()]);
    let next = a.send_acked("bob", json!("next"), "m2");
    // Node 2 must not skip it silently: bob is told to reconnect (1012) ...
    assert_eq!(u16::from(close_code(&mut b.ws)), 1012);
    wait_metric_at_least(&n2, "wsrelay_redis_interruptions_total", 1.0);
    // ... and his `since` recovery says that something is missing, with what is there.
    let path = format!("/ws?id=bob&since={}&epoch={epoch}", msg_id(&first));
    let (mut b, welcome) = Client::connect(&n2, &path);
    assert_eq!(welcome["recovered"], false, "{welcome}");
    let m = b.expect("message");
    assert_eq!(
        (m["payload"].as_str(), msg_id(&m)),
        (Some("next"), msg_id(&next))
    );
}

fn a_silent_pubsub_connection_is_probed_and_reported(poller: &str) {
    if !redis_available() {
        return;
    }
    let redis = RedisServer::start();
    let n1 = node(poller, &redis, &[]);
    let _b = Client::as_id(&n1, "bob");
    // Subscribed, then idle: nothing is waiting for an answer when Redis freezes.
    wait_metric_at_least(&n1, "wsrelay_redis_subscribed_channels", 1.0);
    assert_eq!(n1.get("/healthz").status, 200);
    // Frozen, Redis keeps every socket open and answers nothing: only the idle probe (a PING
    // that must be answered in time) can notice.
    redis.pause();
    // The commands link may be reported first (its online-claim refresh can reach the frozen
    // Redis before the probe does): wait for the PUB/SUB link's own line.
    let health = wait_health_saying(&n1, "redis pubsub connection down");
    redis.resume();
    assert!(health.contains("PING"), "{health}");
    wait_health(&n1, 200);
    wait_metric_at_least(&n1, "wsrelay_redis_reconnects_total{link=\"pubsub\"}", 1.0);
    assert_eq!(metric(&n1, "wsrelay_redis_up{link=\"pubsub\"}"), 1.0);
}

fn a_node_killed_with_sigkill_its_clients_resume_elsewhere_with_since(poller: &str) {
    if !redis_available() {
        return;
    }
    let redis = RedisServer::start();
    let mut doomed = node(poller, &redis, &[]);
    let (n2, n3) = (node(poller, &redis, &[]), node(poller, &redis, &[]));
    let mut a = Client::as_id(&n2, "alice");
    let (mut b, welcome) = Client::connect(&doomed, "/ws?id=bob");
    let epoch = welcome["epoch"].as_str().unwrap().to_string();
    let mut received = Vec::new();
    for n in 0..5 {
        a.send_acked("bob", json!(n), &format!("m{n}"));
        let m = b.expect("message");
        received.push(msg_id(&m));
    }
    doomed.signal("KILL");
    doomed.wait_exit(DEADLINE);
    // alice goes on while bob is away; every message is stored before it is acked.
    let mut sent = Vec::new();
    for n in 5..15 {
        let ack = a.send_acked("bob", json!(n), &format!("m{n}"));
        assert_ne!(ack["status"], "rejected", "{ack}");
        sent.push(msg_id(&ack));
    }
    let since = received.last().unwrap();
    let path = format!("/ws?id=bob&since={since}&epoch={epoch}");
    let (mut b, welcome) = Client::connect(&n3, &path);
    assert_eq!(welcome["recovered"], true, "{welcome}");
    for id in &sent {
        assert_eq!(msg_id(&b.expect("message")), *id);
    }
    let marker = a.send_acked("bob", json!("marker"), "marker");
    assert_eq!(marker["status"], "delivered");
    assert_eq!(b.expect("message")["payload"], "marker", "nothing twice");
}

/// Refused before anything listens, in one line, exit 2 (no reactor involved: one run).
#[test]
fn redis_with_data_dir_or_workers_is_refused() {
    let poller = "poll";
    for extra in [&["--data-dir", "/tmp/x"][..], &["--workers", "2"][..]] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_wsrelay"))
            .args(["serve", "--listen", "127.0.0.1:0", "--poller", poller])
            .args(["--redis", "redis://127.0.0.1:1"])
            .args(extra)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{extra:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--redis"), "{err}");
    }
    // A prefix that would break the hash tag, and a URL that is not one, are refused at start.
    for extra in [
        &["--redis", "redis://127.0.0.1:1", "--redis-prefix", "a}b"][..],
        &["--redis", "not a url"][..],
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_wsrelay"))
            .args(["serve", "--listen", "127.0.0.1:0", "--poller", poller])
            .args(extra)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{extra:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--redis"), "{err}");
    }
}

poller_tests!(
    a_on_node_1_and_b_on_node_2_chat_with_acks,
    a_room_across_three_nodes_gets_every_message_once_in_order_never_its_own,
    a_room_without_history_spans_nodes_once_subscribed,
    a_first_join_without_history_misses_nothing_published_after_joined,
    fifty_messages_for_an_offline_id_reach_it_on_another_node_before_live_traffic,
    a_client_id_resent_through_another_node_is_not_delivered_twice,
    redis_down_rejects_sends_keeps_local_rooms_and_loses_nothing_acked,
    redis_restarted_mid_conversation_recovers_the_gap,
    a_killed_pubsub_connection_is_noticed_resubscribed_and_its_gap_recovered,
    a_node_killed_with_sigkill_its_clients_resume_elsewhere_with_since,
    a_silent_pubsub_connection_is_probed_and_reported,
    a_message_lost_on_pubsub_is_re_read_before_the_next_one,
    a_message_lost_for_good_closes_its_followers_to_reconnect_with_since,
    a_member_rejoins_a_room_on_another_node_with_since_and_misses_nothing,
);
