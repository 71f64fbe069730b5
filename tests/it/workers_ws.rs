//! `/ws` with `--workers 2` (SPEC §14): the envelope relay over the workers' engine bus
//! (src/engine/bus/). Each client is placed on a chosen worker: a connection is opened, the
//! per-worker accept counters of /metrics say which worker took it, and one on the wrong
//! worker is closed and another opened (the kernel spreads by a hash of the ports). So "A on worker 0,
//! B on worker 1" is checked, never assumed. Rooms are chosen by their home worker
//! (`wsrelay::engine::bus::home`), so both a room homed with its sender and one homed away
//! are exercised.

use crate::poller_tests;
use crate::relay_support::*;
use crate::support::*;
use serde_json::{json, Value};
use std::net::TcpStream;
use std::time::{Duration, Instant};
use wsrelay::engine::bus::home;
use wsrelay::engine::StreamId;

pub(crate) const WORKERS: usize = 2;

/// The connections this test holds on each worker, to wait until the server has let one go.
/// Where a new connection lands is read from the accept counters (`locate`).
pub(crate) struct Placement {
    held: Vec<f64>,
}

/// One reading of every worker's `wsrelay_worker_accepted_total`, and the worker that answered
/// it: that worker accepted the scrape's own connection, and published its figures just before
/// rendering them, so its count includes that connection.
struct Accepts {
    counts: Vec<f64>,
    answering: usize,
}

impl Placement {
    pub(crate) fn new() -> Placement {
        Placement::for_workers(WORKERS)
    }

    /// For a server with `workers` workers.
    pub(crate) fn for_workers(workers: usize) -> Placement {
        Placement {
            held: vec![0.0; workers],
        }
    }

    /// Waits until the process holds `total` connections (a scrape counts itself): the ones
    /// closed are gone. A worker's gauge may lag by one loop iteration, but only for what it
    /// opened or closed in it, and this test opens nothing meanwhile: a total never reads low.
    fn connections_become(&self, server: &Server, total: f64) {
        let start = Instant::now();
        loop {
            let now = server.metric("wsrelay_process_connections");
            if now == total {
                return;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "process connections {now}, never {total}"
            );
            std::thread::sleep(Duration::from_millis(10)); // poll interval for /metrics
        }
    }

    fn held(&self) -> f64 {
        self.held.iter().sum()
    }

    fn accepts(&self, server: &Server) -> Accepts {
        let m = server.metrics();
        let counts = (0..self.held.len())
            .map(|i| m.get(&format!("wsrelay_worker_accepted_total{{worker=\"{i}\"}}")))
            .collect();
        let answering = m.get("wsrelay_worker_answering") as usize;
        Accepts { counts, answering }
    }

    /// The worker that accepted the one connection opened after `before` was read.
    ///
    /// Accept counters only rise, so each worker's rise since `before` is the scrapes it
    /// answered since (each reading names its answering worker) plus, on exactly one worker,
    /// the connection. A worker that is not answering shows what it published at the end of
    /// its last loop iteration, so the connection may not show yet: read until it does.
    ///
    /// The connection gauges cannot tell this: a worker that is not answering may still count
    /// the previous scrape's connection, closed in the iteration that is answering, while the
    /// new connection, accepted in it too, does not show yet. The process total then reads as
    /// expected with the connection seemingly on another worker.
    fn locate(&self, server: &Server, before: &Accepts) -> usize {
        let start = Instant::now();
        let mut scrapes = vec![0.0; self.held.len()];
        let mut seen = Vec::new();
        loop {
            let now = self.accepts(server);
            scrapes[now.answering] += 1.0;
            let rise: Vec<f64> = (0..self.held.len())
                .map(|w| now.counts[w] - before.counts[w] - scrapes[w])
                .collect();
            let total: f64 = rise.iter().sum();
            if total == 1.0 {
                if let Some(w) = rise.iter().position(|&r| r == 1.0) {
                    return w;
                }
            }
            seen.push(rise);
            assert!(
                total == 0.0,
                "accepts rose by {seen:?} beyond this test's scrapes: a connection it did not open"
            );
            assert!(
                start.elapsed() < DEADLINE,
                "the new connection was never accepted: {seen:?}"
            );
            std::thread::sleep(Duration::from_millis(10)); // poll interval for /metrics
        }
    }

    /// A TCP connection (before any request) held by `worker`. One accepted by another worker
    /// is closed and another opened: the kernel spreads them by a hash of the ports.
    pub(crate) fn tcp_on(&mut self, server: &Server, worker: usize) -> TcpStream {
        let mut landed = Vec::new();
        for _ in 0..64 {
            let before = self.accepts(server);
            let tcp = server.tcp();
            let w = self.locate(server, &before);
            if w == worker {
                self.held[w] += 1.0;
                return tcp;
            }
            landed.push(w);
        }
        panic!("64 connections and none on worker {worker}: they landed on {landed:?}");
    }

    /// A `/ws` client on `worker` (its welcome read).
    pub(crate) fn client(&mut self, server: &Server, worker: usize, path: &str) -> (Client, Value) {
        let tcp = self.tcp_on(server, worker);
        let (ws, response) = tungstenite::client(server.url(path), tcp).expect("handshake");
        assert_eq!(response.status(), 101);
        let mut client = Client { ws };
        let welcome = client.expect("welcome");
        (client, welcome)
    }

    pub(crate) fn id(&mut self, server: &Server, worker: usize, id: &str) -> Client {
        self.client(server, worker, &format!("/ws?id={id}")).0
    }

    /// A client on `worker` closed: waits until the server has let it go.
    pub(crate) fn close(&mut self, server: &Server, worker: usize, mut client: Client) {
        client.ws.close(None).unwrap();
        while client.ws.read().is_ok() {}
        self.held[worker] -= 1.0;
        self.connections_become(server, self.held() + 1.0);
    }

    /// A client on `worker` vanished: its socket is shut without a close frame (a crashed
    /// client), and this waits until the server has let it go.
    pub(crate) fn vanish(&mut self, server: &Server, worker: usize, client: Client) {
        client
            .ws
            .get_ref()
            .shutdown(std::net::Shutdown::Both)
            .unwrap();
        drop(client);
        self.held[worker] -= 1.0;
        self.connections_become(server, self.held() + 1.0);
    }
}

/// A room name homed at `worker`.
pub(crate) fn room_homed(worker: usize, prefix: &str) -> String {
    (0..)
        .map(|i| format!("{prefix}{i}"))
        .find(|name| home(&StreamId::room(name), WORKERS) == worker)
        .unwrap()
}

/// An id whose inbox is homed at `worker`.
pub(crate) fn id_homed(worker: usize, prefix: &str) -> String {
    (0..)
        .map(|i| format!("{prefix}{i}"))
        .find(|name| home(&StreamId::inbox(name), WORKERS) == worker)
        .unwrap()
}

/// Notes the engine bus carried, over both directions.
fn bus_notes(server: &Server) -> f64 {
    let m = server.metrics();
    m.get("wsrelay_engine_bus_sent_total{from=\"0\",to=\"1\"}")
        + m.get("wsrelay_engine_bus_sent_total{from=\"1\",to=\"0\"}")
}

/// The next message that is not a presence event.
fn next_message(c: &mut Client) -> Value {
    loop {
        let m = c.recv();
        if m["type"] != "presence" {
            return m;
        }
    }
}

/// A on worker 0 and B on worker 1 (and B's second device on worker 0) chat: every direct
/// message reaches every device of its recipient once, and is acked `delivered`, both ways,
/// with inboxes homed on either worker.
fn direct_messages_and_acks_between_workers(poller: &str) {
    let server = Server::start(poller, &["--workers", "2"]);
    let mut placement = Placement::new();
    for (a_home, b_home) in [(0, 1), (1, 0), (0, 0)] {
        let (a_id, b_id) = (id_homed(a_home, "alice"), id_homed(b_home, "bob"));
        let mut a = placement.id(&server, 0, &a_id);
        let mut b = placement.id(&server, 1, &b_id);
        for i in 0..5 {
            let ack = a.send_acked(&b_id, json!({"n": i}), &format!("ab{i}"));
            assert_eq!(ack["status"], "delivered", "{ack}");
            let m = b.expect("message");
            assert_eq!(m["from"], a_id.as_str(), "{m}");
            assert_eq!(m["payload"], json!({"n": i}));
            assert_eq!(m["msg_id"], ack["msg_id"]);
            let ack = b.send_acked(&a_id, json!({"re": i}), &format!("ba{i}"));
            assert_eq!(ack["status"], "delivered", "{ack}");
            assert_eq!(a.expect("message")["payload"], json!({"re": i}));
        }
        // B's second device, on A's worker: each message reaches both devices, once each.
        let mut b2 = placement.id(&server, 0, &b_id);
        for i in 0..3 {
            let ack = a.send_acked(&b_id, json!({"both": i}), &format!("both{i}"));
            assert_eq!(ack["status"], "delivered", "{ack}");
            for device in [&mut b, &mut b2] {
                let m = device.expect("message");
                assert_eq!(m["payload"], json!({"both": i}), "{m}");
                assert_eq!(m["msg_id"], ack["msg_id"]);
            }
        }
        placement.close(&server, 0, b2);
        placement.close(&server, 1, b);
        placement.close(&server, 0, a);
    }
    // Nothing is left pending: every message was delivered where it was homed.
    assert_eq!(server.metric("wsrelay_engine_pending_messages"), 0.0);
    let sent: f64 = (0..WORKERS)
        .flat_map(|from| {
            (0..WORKERS)
                .filter(move |&to| to != from)
                .map(move |to| (from, to))
        })
        .map(|(from, to)| {
            server.metric(&format!(
                "wsrelay_engine_bus_sent_total{{from=\"{from}\",to=\"{to}\"}}"
            ))
        })
        .sum();
    assert!(sent > 0.0, "the bus carried it");
}

/// `--offline-max 0`: nothing is retained, a direct message only takes a position at the
/// recipient's home; one to an id online on the other worker is delivered there and acked
/// `delivered`, one to an id online nowhere is `rejected`.
fn without_an_offline_queue_direct_messages_still_cross(poller: &str) {
    let server = Server::start(poller, &["--workers", "2", "--offline-max", "0"]);
    let mut placement = Placement::new();
    for b_home in [0, 1] {
        let b_id = id_homed(b_home, "bob");
        let mut a = placement.id(&server, 0, "alice");
        let ack = a.send_acked(&b_id, json!("nobody"), &format!("{b_id}-0"));
        assert_eq!(ack["status"], "rejected", "{ack}");
        let mut b = placement.id(&server, 1, &b_id);
        for i in 1..4 {
            let ack = a.send_acked(&b_id, json!(i), &format!("{b_id}-{i}"));
            assert_eq!(ack["status"], "delivered", "{ack}");
            let m = b.expect("message");
            assert_eq!(m["payload"], json!(i));
            assert_eq!(m["msg_id"], ack["msg_id"]);
        }
        placement.close(&server, 1, b);
        placement.close(&server, 0, a);
    }
}

/// B is offline; A, on the other worker, sends 20: queued. B connects (on either worker) and
/// gets all 20 in order before anything live; then `since` recovers after a reset.
fn offline_delivery_and_since_across_workers(poller: &str) {
    let server = Server::start(poller, &["--workers", "2"]);
    let mut placement = Placement::new();
    for b_worker in [1, 0] {
        let b_id = format!("bob-on-{b_worker}");
        let mut a = placement.id(&server, 1 - b_worker, "alice");
        let mut ids = Vec::new();
        for i in 0..20 {
            let ack = a.send_acked(&b_id, json!(i), &format!("{b_id}-{i}"));
            assert_eq!(ack["status"], "queued", "{ack}");
            ids.push(ack["msg_id"].clone());
        }
        let (mut b, welcome) = placement.client(&server, b_worker, &format!("/ws?id={b_id}"));
        assert_eq!(welcome["last_msg_id"], ids[19], "{welcome}");
        let live = a.send_acked(&b_id, json!("live"), &format!("{b_id}-live"));
        assert_eq!(live["status"], "delivered", "{live}");
        for (i, id) in ids.iter().enumerate() {
            let m = b.expect("message");
            assert_eq!(m["payload"], json!(i), "in order, before live traffic");
            assert_eq!(&m["msg_id"], id);
        }
        assert_eq!(b.expect("message")["payload"], "live");
        // B's connection dies after it processed the 5th; it comes back on the other worker
        // with `since`, and gets exactly what followed, `recovered`.
        let since = msg_id(&json!({"msg_id": ids[4]}));
        placement.close(&server, b_worker, b);
        let (mut b, welcome) = placement.client(
            &server,
            1 - b_worker,
            &format!(
                "/ws?id={b_id}&since={since}&epoch={}",
                welcome["epoch"].as_str().unwrap()
            ),
        );
        assert_eq!(welcome["recovered"], true, "{welcome}");
        for i in 5..20 {
            assert_eq!(b.expect("message")["payload"], json!(i));
        }
        assert_eq!(b.expect("message")["payload"], "live");
        placement.close(&server, 1 - b_worker, b);
        placement.close(&server, 1 - b_worker, a);
    }
}

/// A re-sent client id is acked as the first one whichever worker the sender reconnects to,
/// and the message is delivered once.
fn a_resent_client_id_is_one_message_across_workers(poller: &str) {
    let server = Server::start(poller, &["--workers", "2"]);
    let mut placement = Placement::new();
    let b_id = id_homed(1, "bob");
    let a = placement.id(&server, 0, "alice");
    let mut a = {
        let mut a = a;
        let first = a.send_acked(&b_id, json!("once"), "same-id");
        assert_eq!(first["status"], "queued");
        placement.close(&server, 0, a);
        let mut a = placement.id(&server, 1, "alice");
        assert_eq!(a.send_acked(&b_id, json!("once"), "same-id"), first);
        a
    };
    let mut b = placement.id(&server, 0, &b_id);
    assert_eq!(b.expect("message")["payload"], "once");
    a.send_acked(&b_id, json!("next"), "other-id");
    assert_eq!(b.expect("message")["payload"], "next", "no second copy");
    assert_eq!(server.metric("wsrelay_duplicates_total"), 1.0);
}

/// A room with members on both workers and senders on both: every member gets every message
/// exactly once, in each sender's order, never its own; for a room homed on each worker.
fn a_room_across_workers_gets_each_message_once_in_order(poller: &str) {
    let server = Server::start(poller, &["--workers", "2"]);
    let mut placement = Placement::new();
    const PER_SENDER: u64 = 30;
    for room_home in [0, 1] {
        let room = room_homed(room_home, "hall");
        // Members 0 and 1 send, from worker 0 and worker 1; 2 and 3 only listen.
        let workers = [0, 1, 0, 1];
        let mut members: Vec<Client> = workers
            .iter()
            .enumerate()
            .map(|(i, &w)| {
                let me = format!("m{i}");
                let mut c = placement.id(&server, w, &me);
                c.join(&room, &me);
                c
            })
            .collect();
        // Presence crosses too: once each member has heard the joins made after its own, the
        // bus carries nothing more for them, and what it carries from here is the messages.
        for (i, c) in members.iter_mut().enumerate() {
            let mut joins: Vec<String> = (0..workers.len() - 1 - i)
                .map(|_| {
                    let m = c.expect("presence");
                    assert_eq!(m["event"], "join", "{m}");
                    m["id"].as_str().unwrap().to_string()
                })
                .collect();
            joins.sort();
            let later: Vec<String> = (i + 1..workers.len()).map(|j| format!("m{j}")).collect();
            assert_eq!(joins, later, "member {i}");
        }
        let notes_before = bus_notes(&server);
        for seq in 0..PER_SENDER {
            for (p, c) in members.iter_mut().enumerate().take(2) {
                c.send(json!({"type": "publish", "room": room, "payload": {"p": p, "seq": seq}, "id": format!("{p}-{seq}")}));
            }
        }
        for (i, c) in members.iter_mut().enumerate() {
            let mut next = [0u64; 2];
            let expected = if i < 2 { PER_SENDER } else { 2 * PER_SENDER };
            let (mut got, mut acks) = (0, 0);
            while got < expected || (i < 2 && acks < PER_SENDER) {
                let m = next_message(c);
                if m["type"] == "ack" {
                    assert_eq!(m["status"], "delivered", "{m}");
                    acks += 1;
                    continue;
                }
                assert_eq!(m["type"], "message", "{m}");
                let p = m["payload"]["p"].as_u64().unwrap() as usize;
                assert_ne!(p, i, "never its own");
                assert_eq!(m["payload"]["seq"], next[p], "in order, once: {m}");
                next[p] += 1;
                got += 1;
            }
        }
        // What crossed: a message sent on the room's home worker is one note (to the other
        // worker, which has members); one sent on the other worker is a request and a reply
        // (the home's own members hear it without a note). Never one per member.
        assert_eq!(
            bus_notes(&server) - notes_before,
            (PER_SENDER * 3) as f64,
            "room homed at worker {room_home}"
        );
        // Nothing more: a last message from member 2 is the next thing everyone else reads.
        members[2].send(json!({"type": "publish", "room": room, "payload": "end"}));
        for (i, c) in members.iter_mut().enumerate() {
            if i != 2 {
                assert_eq!(next_message(c)["payload"], "end", "no extra copy before it");
            }
        }
        for (c, w) in members.into_iter().zip(workers) {
            placement.close(&server, w, c);
        }
    }
}

/// Room history across workers: a member that comes back on a worker where the room has no
/// other member, and joins with `since` while the room keeps getting messages from a sender on
/// the other worker, sees every
/// message after its `since` exactly once, in order, replayed then live: nothing stored between
/// its recovery at the room's home and its `joined` is lost or doubled. (That window is a few
/// microseconds here and rarely hit; `engine::bus::tests::a_room_recovery_subscribes_*` puts a
/// message in it deterministically.)
fn a_join_with_since_across_workers_misses_nothing_while_the_room_is_busy(poller: &str) {
    let server = Server::start(poller, &["--workers", "2", "--room-history", "1000"]);
    let mut placement = Placement::new();
    const BUSY: u64 = 300;
    for room_home in [0, 1] {
        let room = room_homed(room_home, "busy");
        let mut a = placement.id(&server, 0, "alice");
        a.join(&room, "alice");
        let mut b = placement.id(&server, 1, "bob");
        b.join(&room, "bob");
        for i in 0..3 {
            a.send(json!({"type": "publish", "room": room, "payload": i}));
        }
        let seen: Vec<Value> = (0..3).map(|_| next_message(&mut b)).collect();
        let since = seen[2]["msg_id"].clone();
        placement.close(&server, 1, b);
        for i in 3..10 {
            a.send(json!({"type": "publish", "room": room, "payload": i}));
        }
        // Bob comes back (worker 1 holds no member now) while alice keeps publishing from her
        // own thread on worker 0.
        let mut b = placement.id(&server, 1, "bob");
        let sender = {
            let room = room.clone();
            std::thread::spawn(move || {
                for i in 10..BUSY {
                    a.send(json!({"type": "publish", "room": room, "payload": i}));
                }
                let mut acks = 0;
                while acks < BUSY {
                    if next_message(&mut a)["type"] == "ack" {
                        acks += 1;
                    }
                }
                a
            })
        };
        b.send(json!({"type": "join", "room": room, "since": since}));
        let mut next = 3;
        let mut joined = None;
        while next < BUSY {
            let m = next_message(&mut b);
            match m["type"].as_str() {
                Some("joined") => joined = Some(m),
                Some("message") => {
                    assert_eq!(m["payload"], next, "once each, in order: {m}");
                    next += 1;
                }
                _ => panic!("unexpected: {m}"),
            }
        }
        // `joined` follows the replay: when the recovery held every message, it comes last.
        let joined = joined.unwrap_or_else(|| next_message(&mut b));
        assert_eq!(joined["type"], "joined", "{joined}");
        assert_eq!(joined["recovered"], true, "{joined}");
        let a = sender.join().unwrap();
        placement.close(&server, 1, b);
        placement.close(&server, 0, a);
    }
}

/// SPEC §2, §14: SIGTERM with `/ws` clients on both workers, in a room together and messages
/// crossing between them: every connection is told 1001, and the process exits 0 (no worker
/// waits on another that has already ended).
fn sigterm_with_ws_clients_on_both_workers(poller: &str) {
    let mut server = Server::start(poller, &["--workers", "2", "--shutdown-timeout", "8s"]);
    let mut placement = Placement::new();
    let room = room_homed(1, "all");
    let mut clients: Vec<Client> = (0..6)
        .map(|i| {
            let me = format!("u{i}");
            let mut c = placement.id(&server, i % 2, &me);
            c.join(&room, &me);
            c
        })
        .collect();
    for (i, c) in clients.iter_mut().enumerate() {
        c.send(json!({"type": "publish", "room": room, "payload": i}));
        let to = format!("u{}", (i + 1) % 6);
        c.send(json!({"type": "send", "to": to, "payload": i}));
    }
    server.signal("TERM");
    for (i, c) in clients.iter_mut().enumerate() {
        let code = close_code(&mut c.ws);
        assert_eq!(u16::from(code), 1001, "client {i}");
    }
    drop(clients);
    assert_eq!(server.wait_exit(DEADLINE), Some(0));
}

poller_tests!(
    sigterm_with_ws_clients_on_both_workers,
    a_join_with_since_across_workers_misses_nothing_while_the_room_is_busy,
    direct_messages_and_acks_between_workers,
    without_an_offline_queue_direct_messages_still_cross,
    offline_delivery_and_since_across_workers,
    a_resent_client_id_is_one_message_across_workers,
    a_room_across_workers_gets_each_message_once_in_order,
);
