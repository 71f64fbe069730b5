//! Presence and `members` across workers (SPEC §6, §14; src/engine/bus/presence.rs): joins and
//! leaves made on one worker reach the members on every other worker once, `members` lists
//! every connection in the process with its token's `info`, and `wsrelay_ids_online` counts an
//! id connected on two workers once. Clients are placed on chosen workers as in
//! `workers_ws.rs` (`Placement`), and rooms chosen by their home worker, so a room homed with
//! its members and one homed away are both exercised.
//!
//! A change crosses the bus a moment after it is made: a test waits for the event that tells
//! it (bounded by the sockets' read deadline), never for a time. That nothing is told twice is
//! checked with a room message sent after the change: it crosses from the same home behind
//! any record of it, so it must be the next thing read.

use crate::poller_tests;
use crate::relay_support::*;
use crate::support::*;
use crate::workers_ws::Placement;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use wsrelay::engine::bus::home;
use wsrelay::engine::StreamId;

const SECRET: &str = "presence across workers";

fn presence(room: &str, id: &str, event: &str) -> Value {
    json!({"type": "presence", "room": room, "id": id, "event": event})
}

/// A room name homed at `worker` of `workers`.
fn room_homed(worker: usize, workers: usize, prefix: &str) -> String {
    (0..)
        .map(|i| format!("{prefix}{i}"))
        .find(|name| home(&StreamId::room(name), workers) == worker)
        .unwrap()
}

/// Asks `members`, which must be the next thing `c` reads (no presence event before it).
fn members(c: &mut Client, room: &str) -> Value {
    c.send(json!({"type": "members", "room": room}));
    let answer = c.expect("members");
    assert_eq!(answer["room"], room, "{answer}");
    answer
}

fn ids(answer: &Value) -> Vec<&str> {
    answer["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect()
}

/// `from` publishes `payload` to `room`, and it is the next thing each of `to` reads: nothing
/// was told twice before it.
fn next_is_message(from: &mut Client, room: &str, payload: &str, to: &mut [&mut Client]) {
    from.send(json!({"type": "publish", "room": room, "payload": payload}));
    assert_eq!(from.expect("ack")["status"], "delivered");
    for c in to {
        let m = c.recv();
        assert_eq!(m["type"], "message", "{m}");
        assert_eq!(m["payload"], payload, "{m}");
    }
}

/// The process total of a family labelled by worker (`wsrelay_engine_bus_presence_*`).
fn per_worker_sum(server: &Server, family: &str) -> f64 {
    let values = server.metrics().family(family);
    assert!(!values.is_empty(), "{family} has no samples");
    values.iter().map(|(_, v)| v).sum()
}

/// Polls until the per-worker family sums to `want` (bounded by `DEADLINE`).
fn per_worker_sum_becomes(server: &Server, family: &str, want: f64) {
    let start = Instant::now();
    loop {
        let now = per_worker_sum(server, family);
        if now == want {
            return;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "{family} sums to {now}, expected {want}"
        );
        std::thread::sleep(Duration::from_millis(20)); // poll interval, not a synchronisation
    }
}

/// Alice on worker 0, bob on worker 1: bob's join, his leave, his join again and his vanished
/// connection's leave each reach alice once; bob, whose worker knew alice before his join was
/// confirmed, hears no join of hers (as on one node) and `members` lists both on both workers.
fn joins_and_leaves_cross_workers_once(poller: &str) {
    let server = Server::start(poller, &["--workers", "2"]);
    let mut placement = Placement::for_workers(2);
    for room_home in [0, 1] {
        let room = room_homed(room_home, 2, "lobby");
        let mut a = placement.id(&server, 0, "alice");
        a.join(&room, "alice");
        let mut b = placement.id(&server, 1, "bob");
        b.join(&room, "bob");
        assert_eq!(a.recv(), presence(&room, "bob", "join"));
        assert_eq!(ids(&members(&mut b, &room)), ["alice", "bob"]);
        assert_eq!(ids(&members(&mut a, &room)), ["alice", "bob"]);
        next_is_message(&mut b, &room, "after bob's join", &mut [&mut a]);
        next_is_message(&mut a, &room, "after alice's", &mut [&mut b]);

        b.send(json!({"type": "leave", "room": room}));
        assert_eq!(b.recv(), presence(&room, "bob", "leave"));
        assert_eq!(a.recv(), presence(&room, "bob", "leave"));
        assert_eq!(ids(&members(&mut a, &room)), ["alice"]);
        next_is_message(&mut b, &room, "after bob's leave", &mut [&mut a]);

        b.join(&room, "bob");
        assert_eq!(a.recv(), presence(&room, "bob", "join"));
        assert_eq!(ids(&members(&mut b, &room)), ["alice", "bob"]);
        // Bob's connection vanishes without a close frame: the server's close of it is the
        // leave alice hears.
        placement.vanish(&server, 1, b);
        assert_eq!(a.recv(), presence(&room, "bob", "leave"));
        assert_eq!(ids(&members(&mut a, &room)), ["alice"]);
        let mut c = placement.id(&server, 1, "carol");
        next_is_message(&mut c, &room, "after bob vanished", &mut [&mut a]);
        placement.close(&server, 1, c);
        placement.close(&server, 0, a);
        // Nobody is left: the home lists no member of the room.
        per_worker_sum_becomes(&server, "wsrelay_engine_bus_presence_members", 0.0);
    }
}

fn token(id: &str, info: Value) -> String {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let claims = json!({"sub": id, "exp": exp, "info": info});
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// Asks `members` until its `members` entries are `want` (bounded by `DEADLINE`): a change made
/// on another worker is listed once it has crossed.
fn members_become(c: &mut Client, room: &str, want: &Value) {
    let start = Instant::now();
    loop {
        let answer = members(c, room);
        if answer["members"] == *want {
            return;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "members of {room}: {answer}, expected {want}"
        );
        std::thread::sleep(Duration::from_millis(20)); // poll interval, not a synchronisation
    }
}

/// Alice on worker 0, bob with a device on each worker, carol on worker 1, each token with an
/// `info`: `members` asked on either worker lists the four connections with their infos (bob
/// twice, one entry per device); bob's refresh to a new `info` on worker 1 is shown on worker 0
/// without an event; `wsrelay_ids_online` counts bob once.
fn members_lists_every_device_on_every_worker_with_its_info(poller: &str) {
    let server = Server::start(
        poller,
        &[
            "--workers",
            "2",
            "--jwt-secret",
            SECRET,
            "--jwt-leeway",
            "0s",
        ],
    );
    let mut placement = Placement::for_workers(2);
    let room = room_homed(1, 2, "team");
    let mut connect = |worker: usize, id: &str, info: Value| {
        let path = format!("/ws?token={}", token(id, info.clone()));
        let (mut c, _) = placement.client(&server, worker, &path);
        c.send(json!({"type": "join", "room": room}));
        let own = c.expect("presence");
        assert_eq!((&own["id"], &own["info"]), (&json!(id), &info), "{own}");
        c.expect("joined");
        c
    };
    let mut alice = connect(0, "alice", json!({"name": "Ann"}));
    let mut phone = connect(0, "bob", json!({"device": "phone"}));
    let mut laptop = connect(1, "bob", json!({"device": "laptop"}));
    let mut carol = connect(1, "carol", json!({"name": "Cat"}));
    // Each hears the joins made after its own, once, wherever they were made.
    let join = |id: &str| presence(&room, id, "join");
    for (c, later) in [
        (&mut alice, vec!["bob", "bob", "carol"]),
        (&mut phone, vec!["bob", "carol"]),
        (&mut laptop, vec!["carol"]),
    ] {
        for id in later {
            let mut event = c.expect("presence");
            event.as_object_mut().unwrap().remove("info");
            assert_eq!(event, join(id));
        }
    }
    let everyone = json!([
        {"id": "alice", "info": {"name": "Ann"}},
        {"id": "bob", "info": {"device": "laptop"}},
        {"id": "bob", "info": {"device": "phone"}},
        {"id": "carol", "info": {"name": "Cat"}},
    ]);
    for c in [&mut alice, &mut phone, &mut laptop, &mut carol] {
        let answer = members(c, &room);
        assert_eq!(answer["members"], everyone, "{answer}");
        assert_eq!(ids(&answer), ["alice", "bob", "bob", "carol"]);
    }
    // Bob online on two workers is one id online: 3, not 4, in /metrics and /stats.json.
    server.wait_for_metric("wsrelay_ids_online", 3.0);
    let stats: Value = serde_json::from_str(&server.get("/stats.json").body_text()).unwrap();
    assert_eq!(stats["ids_online"], 3, "{stats}");

    // The laptop's token is refreshed with a new info: worker 0 lists it, nobody hears it.
    laptop.send(json!({"type": "refresh", "token": token("bob", json!({"device": "tablet"}))}));
    laptop.expect("refreshed");
    let mut renamed = everyone.clone();
    renamed[1]["info"] = json!({"device": "tablet"});
    renamed.as_array_mut().unwrap().swap(1, 2); // sorted by id, then info
    members_become(&mut alice, &room, &renamed);
    next_is_message(
        &mut carol,
        &room,
        "after the refresh",
        &mut [&mut alice, &mut phone],
    );

    // The phone goes: bob is still online (on worker 1), still one id.
    placement.close(&server, 0, phone);
    let mut event = alice.expect("presence");
    assert_eq!(
        event.as_object_mut().unwrap().remove("info"),
        Some(json!({"device": "phone"}))
    );
    assert_eq!(event, presence(&room, "bob", "leave"));
    assert_eq!(server.metric("wsrelay_ids_online"), 3.0);
    placement.close(&server, 1, laptop);
    server.wait_for_metric("wsrelay_ids_online", 2.0);
    placement.close(&server, 1, carol);
    placement.close(&server, 0, alice);
    server.wait_for_metric("wsrelay_ids_online", 0.0);
}

/// `--workers 4`, a member of one room on each worker: each hears the joins made after its
/// own in the order they were made, `members` anywhere lists all four, and a leave reaches the
/// three others. The room's home tells each change to each other worker holding the room
/// exactly once (`wsrelay_engine_bus_presence_records_total`).
fn a_member_on_each_of_four_workers_hears_the_others(poller: &str) {
    const WORKERS: usize = 4;
    let server = Server::start(poller, &["--workers", "4"]);
    let mut placement = Placement::for_workers(WORKERS);
    let room = room_homed(2, WORKERS, "four");
    let names: Vec<String> = (0..WORKERS).map(|w| format!("m{w}")).collect();
    let mut members_of: Vec<Client> = (0..WORKERS)
        .map(|w| {
            let mut c = placement.id(&server, w, &names[w]);
            c.join(&room, &names[w]);
            c
        })
        .collect();
    for (w, c) in members_of.iter_mut().enumerate() {
        for later in &names[w + 1..] {
            assert_eq!(
                c.recv(),
                presence(&room, later, "join"),
                "member on worker {w}"
            );
        }
    }
    for c in members_of.iter_mut() {
        assert_eq!(ids(&members(c, &room)), ["m0", "m1", "m2", "m3"]);
    }
    // m_w's join was told to the w workers holding the room before it: 0 + 1 + 2 + 3.
    per_worker_sum_becomes(&server, "wsrelay_engine_bus_presence_records_total", 6.0);
    assert_eq!(
        per_worker_sum(&server, "wsrelay_engine_bus_presence_members"),
        4.0
    );

    let gone = members_of.remove(1);
    placement.close(&server, 1, gone);
    for c in members_of.iter_mut() {
        assert_eq!(c.recv(), presence(&room, "m1", "leave"));
    }
    per_worker_sum_becomes(&server, "wsrelay_engine_bus_presence_records_total", 9.0);
    let (first, rest) = members_of.split_first_mut().unwrap();
    let mut rest: Vec<&mut Client> = rest.iter_mut().collect();
    next_is_message(first, &room, "after m1 left", &mut rest);
    for c in members_of.iter_mut() {
        assert_eq!(ids(&members(c, &room)), ["m0", "m2", "m3"]);
    }
    for (c, w) in members_of.into_iter().zip([0, 2, 3]) {
        placement.close(&server, w, c);
    }
    per_worker_sum_becomes(&server, "wsrelay_engine_bus_presence_members", 0.0);
}

poller_tests!(
    joins_and_leaves_cross_workers_once,
    members_lists_every_device_on_every_worker_with_its_info,
    a_member_on_each_of_four_workers_hears_the_others,
);
