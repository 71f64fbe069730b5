//! Presence across nodes on one Redis (SPEC §6, §15): real `wsrelay` processes sharing a real
//! `redis-server`, driven by tungstenite clients. Joins and leaves reach every node, `members`
//! lists every connection wherever it is, and the members of a node killed with SIGKILL leave
//! within the presence TTL while the live nodes' members stay.
//!
//! Every case runs on every poller. Presence across nodes is eventually consistent (a change
//! travels through Redis), so a test waits for a state with a deadline, never for a time.

use crate::poller_tests;
use crate::redis_server::{redis_available, RedisServer};
use crate::relay_support::*;
use crate::support::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// The presence TTL of these tests: short, so a dead node's members go quickly, and three
/// times the engine's 1 s tick, so a live node's refresh (every TTL/3) never misses one.
const TTL: &str = "3s";

fn node(poller: &str, redis: &RedisServer) -> Server {
    let url = redis.url();
    // `--workers 1` explicitly: TEST_WORKERS must not turn these into the refused combination.
    let args = [
        "--redis",
        &url,
        "--redis-presence-ttl",
        TTL,
        "--workers",
        "1",
    ];
    Server::start(poller, &args)
}

/// Polls /metrics until `sample` is at least `min` (bounded by `DEADLINE`; a missing sample
/// fails the test).
fn metric_reaches(server: &Server, sample: &str, min: f64) {
    let start = Instant::now();
    loop {
        let now = server.metric(sample);
        if now >= min {
            return;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "{sample} is {now}, expected {min}"
        );
        std::thread::sleep(Duration::from_millis(20)); // poll interval, not a synchronisation
    }
}

fn presence(room: &str, id: &str, event: &str) -> Value {
    json!({"type": "presence", "room": room, "id": id, "event": event})
}

/// Asks `members` until the ids are `want` (bounded by `DEADLINE`): a change made on another
/// node reaches this one through Redis. Presence events that arrive meanwhile are returned.
fn members_become(c: &mut Client, room: &str, want: &[&str]) -> Vec<Value> {
    let start = Instant::now();
    let mut events = Vec::new();
    loop {
        c.send(json!({"type": "members", "room": room}));
        let answer = loop {
            let m = c.recv();
            if m["type"] == "members" {
                break m;
            }
            assert_eq!(m["type"], "presence", "{m}");
            events.push(m);
        };
        let ids: Vec<&str> = answer["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        if ids == want {
            return events;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "members of {room} stayed {ids:?}, expected {want:?}"
        );
        std::thread::sleep(Duration::from_millis(20)); // poll interval, not a synchronisation
    }
}

/// Reads `want.len()` messages, which must be these presence events in any order (changes on
/// different nodes reach a node in no set order).
fn expect_presence(c: &mut Client, want: &[Value]) {
    let mut got: Vec<Value> = want.iter().map(|_| c.recv()).collect();
    let mut want = want.to_vec();
    let key = |v: &Value| v.to_string();
    got.sort_by_key(key);
    want.sort_by_key(key);
    assert_eq!(got, want);
}

fn joins_leaves_and_members_cross_three_nodes(poller: &str) {
    if !redis_available() {
        return;
    }
    let redis = RedisServer::start();
    let (n1, n2, n3) = (
        node(poller, &redis),
        node(poller, &redis),
        node(poller, &redis),
    );
    let mut a = Client::as_id(&n1, "alice");
    a.join("lobby", "alice");
    let mut b = Client::as_id(&n2, "bob");
    b.join("lobby", "bob");
    // Each hears the other once: a join made after its own, or one its node found already
    // there when it became the node's first member of the room (the engine cannot tell).
    assert_eq!(a.recv(), presence("lobby", "bob", "join"));
    assert_eq!(b.recv(), presence("lobby", "alice", "join"));
    for x in [&mut a, &mut b] {
        assert_eq!(
            members_become(x, "lobby", &["alice", "bob"]),
            Vec::<Value>::new()
        );
    }

    // Two devices of carol on node 3: two members, two joins, everywhere.
    let mut c1 = Client::as_id(&n3, "carol");
    let mut c2 = Client::as_id(&n3, "carol");
    c1.join("lobby", "carol");
    c2.join("lobby", "carol");
    let carol = presence("lobby", "carol", "join");
    let (alice, bob) = (
        presence("lobby", "alice", "join"),
        presence("lobby", "bob", "join"),
    );
    // c1, the room's first member on node 3, hears c2 and everyone its node found there.
    expect_presence(&mut c1, &[carol.clone(), alice.clone(), bob.clone()]);
    for x in [&mut a, &mut b] {
        expect_presence(x, &[carol.clone(), carol.clone()]);
    }
    let everyone = ["alice", "bob", "carol", "carol"];
    for x in [&mut a, &mut b, &mut c1] {
        assert_eq!(members_become(x, "lobby", &everyone), Vec::<Value>::new());
    }
    // c2 hears those joins too only if it was a member before its node knew them; either way
    // once, and its `members` lists everyone.
    let mut seen = members_become(&mut c2, "lobby", &everyone);
    seen.sort_by_key(|v| v.to_string());
    assert!(seen.is_empty() || seen == [alice, bob], "{seen:?}");

    // A leave, and a close, reach the other nodes once; nobody hears its own twice.
    b.send(json!({"type": "leave", "room": "lobby"}));
    assert_eq!(b.recv(), presence("lobby", "bob", "leave"));
    drop(c2);
    let left = [
        presence("lobby", "bob", "leave"),
        presence("lobby", "carol", "leave"),
    ];
    for x in [&mut a, &mut c1] {
        expect_presence(x, &left);
        assert_eq!(
            members_become(x, "lobby", &["alice", "carol"]),
            Vec::<Value>::new()
        );
    }
    // bob's node holds no member of the room any more: it follows the room no more.
    assert!(n1.metric("wsrelay_presence_remote_changes_total") >= 5.0);
    assert_eq!(n2.metric("wsrelay_redis_presence_rooms"), 0.0);
}

fn a_killed_nodes_members_leave_within_the_ttl_and_live_ones_stay(poller: &str) {
    if !redis_available() {
        return;
    }
    let redis = RedisServer::start();
    let (n1, n2, n3) = (
        node(poller, &redis),
        node(poller, &redis),
        node(poller, &redis),
    );
    let mut a = Client::as_id(&n1, "alice");
    a.join("lobby", "alice");
    let mut c = Client::as_id(&n3, "carol");
    c.join("lobby", "carol");
    let mut b1 = Client::as_id(&n2, "bob");
    let mut b2 = Client::as_id(&n2, "bob");
    b1.join("lobby", "bob");
    b2.join("lobby", "bob");
    let everyone = ["alice", "bob", "bob", "carol"];
    members_become(&mut a, "lobby", &everyone);
    members_become(&mut c, "lobby", &everyone);

    // SIGKILL: node 2 says nothing. Its entries expire (TTL 3 s) and some node's prune (every
    // TTL/3) removes them, once each: every other node hears each leave exactly once.
    let killed = Instant::now();
    n2.signal("KILL");
    let leave = presence("lobby", "bob", "leave");
    for x in [&mut a, &mut c] {
        assert_eq!(x.recv(), leave);
        assert_eq!(x.recv(), leave);
    }
    let took = killed.elapsed();
    eprintln!("the killed node's members left after {took:?} (TTL {TTL})");
    // The TTL plus one prune period and the engine's tick, with room for a loaded machine.
    assert!(took < Duration::from_secs(8), "the leaves took {took:?}");
    // The live nodes' members outlived a whole TTL without any change: their nodes refresh.
    for x in [&mut a, &mut c] {
        assert_eq!(
            members_become(x, "lobby", &["alice", "carol"]),
            Vec::<Value>::new()
        );
    }
    // The pruning node counts when its script's reply comes back, which may be after the
    // leaves it published reached the clients.
    let expired = || {
        n1.metric("wsrelay_redis_presence_expired_total")
            + n3.metric("wsrelay_redis_presence_expired_total")
    };
    let start = Instant::now();
    while expired() < 2.0 {
        assert!(
            start.elapsed() < DEADLINE,
            "expired members counted: {}",
            expired()
        );
        std::thread::sleep(Duration::from_millis(20)); // poll interval, not a synchronisation
    }
    assert_eq!(expired(), 2.0, "each dead member removed once, by one node");
}

fn a_change_missed_while_pubsub_was_down_is_told_after_the_resubscribe(poller: &str) {
    if !redis_available() {
        return;
    }
    let redis = RedisServer::start();
    let (n1, n2) = (node(poller, &redis), node(poller, &redis));
    let mut a = Client::as_id(&n1, "alice");
    a.join("lobby", "alice");
    let mut b = Client::as_id(&n2, "bob");
    b.join("lobby", "bob");
    assert_eq!(a.recv(), presence("lobby", "bob", "join"));
    assert_eq!(b.recv(), presence("lobby", "alice", "join"));
    let snapshots = n1.metric("wsrelay_redis_presence_snapshots_total");
    // Both nodes lose their PUB/SUB connection; carol joins on node 2 meanwhile. Her record
    // may be lost to node 1: its snapshot after the resubscribe tells her join, once.
    // Each node's subscriptions (its id's inbox and the room) are in effect: the kill below
    // then surely cuts a subscription.
    for n in [&n1, &n2] {
        metric_reaches(n, "wsrelay_redis_subscribed_channels", 2.0);
    }
    assert!(
        redis.kill_pubsub() >= 2,
        "both nodes hold a PUB/SUB connection"
    );
    let mut c = Client::as_id(&n2, "carol");
    c.join("lobby", "carol");
    assert_eq!(a.recv(), presence("lobby", "carol", "join"));
    assert_eq!(
        members_become(&mut a, "lobby", &["alice", "bob", "carol"]),
        Vec::<Value>::new()
    );
    metric_reaches(&n1, "wsrelay_redis_reconnects_total{link=\"pubsub\"}", 1.0);
    metric_reaches(
        &n1,
        "wsrelay_redis_presence_snapshots_total",
        snapshots + 1.0,
    );
    assert_eq!(n1.metric("wsrelay_redis_presence_malformed_total"), 0.0);
}

poller_tests!(
    a_change_missed_while_pubsub_was_down_is_told_after_the_resubscribe,
    joins_leaves_and_members_cross_three_nodes,
    a_killed_nodes_members_leave_within_the_ttl_and_live_ones_stay,
);
