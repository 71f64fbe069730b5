//! The hub driven without sockets: requests are parsed from text, callbacks are called by hand,
//! and a `Recorder` transport keeps what would have been sent. Time is a `ManualClock`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::envelope::{AckStatus, EnvelopeError};
use super::*;
use crate::engine::{Append, Now, Position, Publish, Since, StreamId, Ticket};
use crate::protocol::frame::{self, Role};
use crate::protocol::handshake::parse_request;
use crate::protocol::{CloseCode, Refusal};
use crate::server::{Sent, ServerEndpoint};
use serde_json::{json, Value};
use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::time::Duration;

const START_MS: u64 = 1_700_000_000_000;

/// The body of a complete HTTP response.
fn body_of(response: &[u8]) -> String {
    let text = String::from_utf8_lossy(response);
    text.split_once("\r\n\r\n")
        .map_or(String::new(), |(_, body)| body.to_string())
}

/// One queued frame: (recipient, opcode, payload, the shared frame if it was shared).
type Queued = (ConnId, OpCode, Vec<u8>, Option<Rc<[u8]>>);

/// A transport that records instead of sending.
#[derive(Default)]
struct Recorder {
    /// Every frame queued, in order.
    sent: Vec<Queued>,
    closes: Vec<(ConnId, CloseCode, &'static str)>,
    /// Answers to server API requests: (connection, status, JSON body).
    responses: Vec<(ConnId, u16, Vec<u8>)>,
    /// Connections that refuse everything as slow consumers (`Sent::Dropped`), except what is
    /// sent unbounded.
    slow: HashSet<ConnId>,
    /// Every `wake_at` the hub asked for, in order.
    wakes: Vec<std::time::Instant>,
}

impl Transport for Recorder {
    fn send(&mut self, to: ConnId, opcode: OpCode, payload: &[u8]) -> Sent {
        if self.slow.contains(&to) {
            return Sent::Dropped;
        }
        self.sent.push((to, opcode, payload.to_vec(), None));
        Sent::Queued
    }

    fn send_shared(&mut self, to: ConnId, shared: &Rc<[u8]>) -> Sent {
        if self.slow.contains(&to) {
            return Sent::Dropped;
        }
        self.send_shared_unbounded(to, shared)
    }

    /// Taken even by `slow` connections, as the outbox takes it even over --max-outbound.
    fn send_shared_unbounded(&mut self, to: ConnId, shared: &Rc<[u8]>) -> Sent {
        let mut bytes = shared.to_vec();
        let decoded = frame::decode_frame(&mut bytes, Role::Client, u64::MAX)
            .unwrap()
            .unwrap();
        let payload = bytes[decoded.payload].to_vec();
        self.sent
            .push((to, decoded.header.opcode, payload, Some(Rc::clone(shared))));
        Sent::Queued
    }

    fn close(&mut self, conn: ConnId, code: CloseCode, reason: &'static str) {
        self.closes.push((conn, code, reason));
    }

    fn wake_at(&mut self, at: std::time::Instant) {
        self.wakes.push(at);
    }

    fn respond(&mut self, conn: ConnId, status: u16, body: Vec<u8>) {
        self.responses.push((conn, status, body));
    }
}

struct Harness {
    hub: Hub,
    clock: ManualClock,
    tx: Recorder,
    sessions: HashMap<ConnId, Session>,
    next_slot: u32,
}

impl Harness {
    fn new(config: AppConfig) -> Harness {
        let clock = ManualClock::new(START_MS);
        Harness {
            hub: Hub::new(config, Box::new(clock.clone())),
            clock,
            tx: Recorder::default(),
            sessions: HashMap::new(),
            next_slot: 0,
        }
    }

    fn plain() -> Harness {
        Harness::new(AppConfig::default())
    }

    /// A hub on the memory engine behind `Deferred`: completions wait for `release`, as the
    /// file engine's wait for their fsync.
    fn deferred() -> (Harness, Rc<Cell<bool>>) {
        Harness::deferred_with(AppConfig::default())
    }

    fn deferred_with(config: AppConfig) -> (Harness, Rc<Cell<bool>>) {
        let clock = ManualClock::new(START_MS);
        let now = crate::engine::Now {
            instant: clock.now(),
            unix_ms: START_MS,
        };
        let inner = crate::engine::MemoryEngine::new(
            super::hub::limits(&config),
            super::hub::dedup(&config),
            now,
        )
        .with_room_history(super::hub::room_history_limits(&config));
        let held = Rc::new(Cell::new(false));
        let engine = Deferred {
            inner,
            held: Rc::clone(&held),
        };
        let harness = Harness {
            hub: Hub::with_engine(config, Box::new(clock.clone()), Box::new(engine)),
            clock,
            tx: Recorder::default(),
            sessions: HashMap::new(),
            next_slot: 0,
        };
        (harness, held)
    }

    /// Routes `GET target` with extra header lines; on an upgrade, opens the connection.
    fn request(
        &mut self,
        target: &str,
        headers: &str,
    ) -> Result<(ConnId, Option<&'static str>), (u16, String)> {
        let raw = format!("GET {target} HTTP/1.1\r\nHost: test\r\n{headers}\r\n");
        let (request, _) = parse_request(raw.as_bytes()).unwrap().unwrap();
        match self.hub.route(&request) {
            Route::Refuse(refusal) => Err((refusal.status(), body_of(&refusal.response()))),
            Route::Resource(response) => Err((200, body_of(&response))),
            Route::Server(endpoint) => Err((200, format!("the reactor's {endpoint:?}"))),
            Route::Api { .. } => Err((200, "the server API".to_string())),
            Route::Upgrade {
                mut session,
                protocol,
            } => {
                let conn = ConnId {
                    slot: self.next_slot,
                    generation: self.next_slot + 1000,
                };
                self.next_slot += 1;
                self.hub.open(conn, &mut session, &mut self.tx);
                self.sessions.insert(conn, session);
                Ok((conn, protocol))
            }
        }
    }

    fn connect(&mut self, target: &str) -> ConnId {
        self.request(target, "")
            .unwrap_or_else(|e| panic!("{target}: {e:?}"))
            .0
    }

    fn frame(&mut self, conn: ConnId, opcode: OpCode, payload: &[u8]) {
        let session = self.sessions.get_mut(&conn).unwrap();
        self.hub
            .message(conn, session, opcode, payload, &mut self.tx);
    }

    fn say(&mut self, conn: ConnId, value: Value) {
        self.frame(conn, OpCode::Text, value.to_string().as_bytes());
    }

    fn disconnect(&mut self, conn: ConnId) {
        let session = self.sessions.remove(&conn).unwrap();
        self.hub.close(conn, session, &mut self.tx);
    }

    /// Takes the raw payloads queued for `conn` so far.
    fn raw(&mut self, conn: ConnId) -> Vec<(OpCode, Vec<u8>)> {
        let (mine, rest) = std::mem::take(&mut self.tx.sent)
            .into_iter()
            .partition(|(to, ..)| *to == conn);
        self.tx.sent = rest;
        mine.into_iter()
            .map(|(_, op, payload, _)| (op, payload))
            .collect()
    }

    /// Takes the JSON messages queued for `conn` so far.
    fn inbox(&mut self, conn: ConnId) -> Vec<Value> {
        self.raw(conn)
            .into_iter()
            .map(|(op, payload)| {
                assert_eq!(op, OpCode::Text);
                serde_json::from_slice(&payload).unwrap()
            })
            .collect()
    }

    /// The value of one sample of the hub's metrics. A sample the hub does not print fails
    /// the test: a renamed metric must not read as 0.
    fn metric(&self, sample: &str) -> f64 {
        let mut text = String::new();
        self.hub.render_metrics(&mut text);
        let value = text
            .lines()
            .find_map(|l| l.strip_prefix(sample).and_then(|v| v.strip_prefix(' ')));
        value
            .unwrap_or_else(|| panic!("no sample {sample} in the hub's metrics:\n{text}"))
            .parse()
            .unwrap()
    }
}

/// An engine whose completions are held back while `held` is set: the memory engine made to
/// answer later, like the file engine after its fsync.
struct Deferred {
    inner: crate::engine::MemoryEngine,
    held: Rc<Cell<bool>>,
}

impl crate::engine::Engine for Deferred {
    fn kind(&self) -> &'static str {
        "deferred"
    }
    fn append(&mut self, t: Ticket, a: Append, now: Now) {
        self.inner.append(t, a, now)
    }
    fn publish(&mut self, t: Ticket, p: Publish, now: Now) {
        self.inner.publish(t, p, now)
    }
    fn recover(&mut self, t: Ticket, s: &StreamId, since: Option<Since>, now: Now) {
        self.inner.recover(t, s, since, now)
    }
    fn epoch(&self) -> crate::engine::Epoch {
        crate::engine::Engine::epoch(&self.inner)
    }
    fn history(&mut self, t: Ticket, s: &StreamId, limit: usize, now: Now) {
        self.inner.history(t, s, limit, now)
    }
    fn delivered(&mut self, s: &StreamId, p: &[Position]) {
        self.inner.delivered(s, p)
    }
    fn acked(&mut self, sender: &str, id: &str, p: Position, status: AckStatus) {
        self.inner.acked(sender, id, p, status)
    }
    fn online(&mut self, id: &str) {
        self.inner.online(id)
    }
    fn offline(&mut self, id: &Rc<str>, now: Now) {
        self.inner.offline(id, now)
    }
    fn maintain(&mut self, now: Now) {
        self.inner.maintain(now)
    }
    fn poll(&mut self, out: &mut Vec<crate::engine::Event>) {
        if !self.held.get() {
            self.inner.poll(out)
        }
    }
    fn in_flight(&self) -> usize {
        0
    }
    fn stats(&self, now_ms: u64) -> crate::engine::Stats {
        self.inner.stats(now_ms)
    }
    fn render_metrics(&self, out: &mut String) {
        self.inner.render_metrics(out)
    }
}

#[test]
fn nothing_is_acked_or_delivered_before_the_engine_completes() {
    let (mut h, held) = Harness::deferred();
    let a = h.connect("/ws?id=alice");
    assert_eq!(h.inbox(a)[0]["type"], "welcome");

    held.set(true);
    h.say(a, send("bob", json!("first"), "c1"));
    assert_eq!(h.inbox(a), Vec::<Value>::new(), "no ack before the store");
    // bob connects while alice's message is with the engine: no welcome yet, and what he
    // sends meanwhile is held until after it.
    let b = h.connect("/ws?id=bob");
    h.say(b, json!({"type": "join", "room": "lobby"}));
    h.say(a, send("bob", json!("second"), "c2"));
    assert_eq!(h.inbox(b), Vec::<Value>::new(), "not greeted yet");
    assert_eq!(h.inbox(a), Vec::<Value>::new());

    held.set(false);
    h.hub.wake(&mut h.tx);
    let acks = h.inbox(a);
    let statuses: Vec<_> = acks.iter().map(|a| a["status"].clone()).collect();
    // "first" was stored before bob's recovery (it is in it); "second" after, so it reached
    // bob live.
    assert_eq!(statuses, vec![json!("queued"), json!("delivered")]);
    let inbox = h.inbox(b);
    let kinds: Vec<_> = inbox.iter().map(|m| m["type"].clone()).collect();
    assert_eq!(
        kinds,
        vec![
            json!("welcome"),
            json!("message"),
            json!("presence"),
            json!("joined"),
            json!("message")
        ]
    );
    assert_eq!(inbox[0]["last_msg_id"], acks[0]["msg_id"]);
    assert_eq!(inbox[1]["payload"], "first");
    assert_eq!(inbox[4]["payload"], "second");
    assert_eq!(h.metric("wsrelay_offline_delivered_total"), 1.0);
}

#[test]
fn a_connection_gone_before_its_recovery_leaves_the_backlog_pending() {
    let (mut h, held) = Harness::deferred();
    let a = h.connect("/ws?id=alice");
    h.say(a, send("bob", json!("waits"), "c1"));
    held.set(true);
    let b = h.connect("/ws?id=bob");
    h.disconnect(b);
    held.set(false);
    h.hub.wake(&mut h.tx);
    assert_eq!(h.inbox(b), Vec::<Value>::new());
    let b = h.connect("/ws?id=bob");
    assert_eq!(
        messages(&h.inbox(b)),
        vec![("alice".into(), json!("waits"))]
    );
}

/// The messages of type `message` in `inbox`, as (from, payload).
fn messages(inbox: &[Value]) -> Vec<(String, Value)> {
    inbox
        .iter()
        .filter(|m| m["type"] == "message")
        .map(|m| {
            (
                m["from"].as_str().unwrap().to_string(),
                m["payload"].clone(),
            )
        })
        .collect()
}

fn send(to: &str, payload: Value, id: &str) -> Value {
    json!({"type": "send", "to": to, "payload": payload, "id": id})
}

#[test]
fn direct_messages_both_ways_with_acks() {
    let mut h = Harness::plain();
    let a = h.connect("/ws?id=alice");
    let b = h.connect("/ws?id=bob");
    let mut inbox = h.inbox(a);
    let epoch = inbox[0]["epoch"].take();
    assert!(epoch.as_str().is_some_and(|e| e.len() == 16), "{epoch}");
    assert_eq!(
        inbox,
        vec![
            json!({"type": "welcome", "id": "alice", "last_msg_id": null, "epoch": null, "recovered": true})
        ]
    );
    h.inbox(b);

    // The payload is relayed as the exact text the sender wrote.
    let text = r#"{"type":"send","to":"bob","payload":{"z":1,  "a":[1.50]},"id":"c1"}"#;
    h.frame(a, OpCode::Text, text.as_bytes());
    let (_, payload) = h.raw(b).pop().unwrap();
    let payload = String::from_utf8(payload).unwrap();
    assert!(
        payload.contains(r#""payload":{"z":1,  "a":[1.50]}"#),
        "{payload}"
    );
    let got: Value = serde_json::from_str(&payload).unwrap();
    assert_eq!(
        (got["from"].as_str(), got["to"].as_str()),
        (Some("alice"), Some("bob"))
    );
    assert_eq!(got["room"], Value::Null);
    assert_eq!(got["timestamp"], json!(START_MS));
    let ack = h.inbox(a).pop().unwrap();
    assert_eq!(
        ack,
        json!({"type": "ack", "id": "c1", "msg_id": got["msg_id"], "status": "delivered", "reason": null})
    );

    h.say(b, send("alice", json!("pong"), "r1"));
    assert_eq!(
        messages(&h.inbox(a)),
        vec![("bob".to_string(), json!("pong"))]
    );
    assert_eq!(h.inbox(b)[0]["status"], "delivered");
    assert_eq!(h.metric("wsrelay_direct_messages_total"), 2.0);
    assert_eq!(h.metric("wsrelay_acks_total{status=\"delivered\"}"), 2.0);
    assert_eq!(h.metric("wsrelay_ids_online"), 2.0);
}

#[test]
fn msg_ids_start_at_the_clock_and_increase() {
    let mut h = Harness::plain();
    let a = h.connect("/ws?id=a");
    for i in 0..3 {
        h.say(a, send("nobody", json!(i), &format!("c{i}")));
    }
    let ids: Vec<u64> = h
        .inbox(a)
        .iter()
        .filter(|m| m["type"] == "ack")
        .map(|m| m["msg_id"].as_str().unwrap().parse().unwrap())
        .collect();
    assert_eq!(
        ids,
        vec![START_MS * 1000, START_MS * 1000 + 1, START_MS * 1000 + 2]
    );
}

#[test]
fn offline_messages_arrive_in_order_before_live_ones() {
    let mut h = Harness::plain();
    let a = h.connect("/ws?id=alice");
    for i in 0..10 {
        h.say(a, send("bob", json!(i), &format!("c{i}")));
    }
    let acks = h.inbox(a);
    assert!(
        acks[1..].iter().all(|m| m["status"] == "queued"),
        "{acks:?}"
    );
    let last = acks.last().unwrap()["msg_id"].clone();

    let b = h.connect("/ws?id=bob");
    h.say(a, send("bob", json!("live"), "c10"));
    let mut inbox = h.inbox(b);
    inbox[0]["epoch"].take();
    assert_eq!(
        inbox[0],
        json!({"type": "welcome", "id": "bob", "last_msg_id": last, "epoch": null, "recovered": true})
    );
    let payloads: Vec<Value> = messages(&inbox).into_iter().map(|(_, p)| p).collect();
    let mut expected: Vec<Value> = (0..10).map(|i| json!(i)).collect();
    expected.push(json!("live"));
    assert_eq!(payloads, expected);
    assert_eq!(h.metric("wsrelay_offline_queued_total"), 10.0);
    assert_eq!(h.metric("wsrelay_offline_delivered_total"), 10.0);

    // Delivered once: a second device gets nothing old without ?since.
    let b2 = h.connect("/ws?id=bob");
    assert!(messages(&h.inbox(b2)).is_empty());
}

#[test]
fn since_replays_what_a_dead_connection_may_have_lost() {
    let mut h = Harness::plain();
    let a = h.connect("/ws?id=alice");
    let b = h.connect("/ws?id=bob");
    for i in 0..5 {
        h.say(a, send("bob", json!(i), &format!("c{i}")));
    }
    let seen = h.inbox(b);
    let third = seen[3]["msg_id"].as_str().unwrap().to_string(); // payload 2
    h.disconnect(b);
    h.say(a, send("bob", json!(5), "c5"));
    let b = h.connect(&format!("/ws?id=bob&since={third}"));
    let payloads: Vec<Value> = messages(&h.inbox(b)).into_iter().map(|(_, p)| p).collect();
    assert_eq!(payloads, vec![json!(3), json!(4), json!(5)]);
    assert_eq!(h.metric("wsrelay_recovery_replayed_total"), 2.0);
    assert_eq!(h.metric("wsrelay_offline_delivered_total"), 1.0);
}

#[test]
fn ttl_expires_queued_messages() {
    let mut h = Harness::new(AppConfig {
        offline_ttl: Duration::from_secs(10),
        ..AppConfig::default()
    });
    let a = h.connect("/ws?id=alice");
    h.say(a, send("bob", json!("old"), "c1"));
    h.clock.advance(Duration::from_secs(5));
    h.say(a, send("bob", json!("new"), "c2"));
    h.clock.advance(Duration::from_secs(5));
    // The hub has not run since: /metrics still counts the expiry at scrape time.
    assert_eq!(h.metric("wsrelay_offline_expired_total"), 1.0);
    assert_eq!(h.metric("wsrelay_offline_pending"), 1.0);
    let b = h.connect("/ws?id=bob");
    assert_eq!(
        messages(&h.inbox(b)),
        vec![("alice".to_string(), json!("new"))]
    );
    assert_eq!(h.metric("wsrelay_offline_expired_total"), 1.0);
}

#[test]
fn per_id_bound_rejects_beyond_the_pending_limit() {
    let mut h = Harness::new(AppConfig {
        offline_max: 3,
        ..AppConfig::default()
    });
    let a = h.connect("/ws?id=alice");
    h.inbox(a);
    for i in 0..5 {
        h.say(a, send("bob", json!(i), &format!("c{i}")));
    }
    let statuses: Vec<Value> = h.inbox(a).iter().map(|m| m["status"].clone()).collect();
    assert_eq!(
        statuses,
        vec!["queued", "queued", "queued", "rejected", "rejected"]
    );
    assert_eq!(
        h.metric("wsrelay_offline_dropped_total{reason=\"queue_full\"}"),
        2.0
    );
    // A rejected id may be retried (it was not remembered) and is rejected again while full.
    h.say(a, send("bob", json!(3), "c3"));
    assert_eq!(h.inbox(a)[0]["status"], "rejected");
    let b = h.connect("/ws?id=bob");
    let payloads: Vec<Value> = messages(&h.inbox(b)).into_iter().map(|(_, p)| p).collect();
    assert_eq!(payloads, vec![json!(0), json!(1), json!(2)]);
}

#[test]
fn duplicate_client_ids_are_acked_again_not_delivered() {
    let mut h = Harness::plain();
    let a = h.connect("/ws?id=alice");
    let b = h.connect("/ws?id=bob");
    h.inbox(a);
    h.say(a, send("bob", json!("once"), "same"));
    let first = h.inbox(a).pop().unwrap();
    // The sender reconnects and retries.
    h.disconnect(a);
    let a = h.connect("/ws?id=alice");
    h.inbox(a);
    h.say(a, send("bob", json!("once"), "same"));
    assert_eq!(h.inbox(a).pop().unwrap(), first);
    assert_eq!(messages(&h.inbox(b)).len(), 1);
    assert_eq!(h.metric("wsrelay_duplicates_total"), 1.0);
    // Another sender may use the same client id.
    let c = h.connect("/ws?id=carol");
    h.say(c, send("bob", json!("mine"), "same"));
    assert_eq!(messages(&h.inbox(b)).len(), 1);
}

#[test]
fn every_device_of_an_id_gets_direct_messages() {
    let mut h = Harness::plain();
    let a = h.connect("/ws?id=alice");
    let phone = h.connect("/ws?id=bob");
    let laptop = h.connect("/ws?id=bob");
    h.say(a, send("bob", json!("hi"), "c1"));
    assert_eq!(messages(&h.inbox(phone)).len(), 1);
    assert_eq!(messages(&h.inbox(laptop)).len(), 1);
    assert_eq!(h.metric("wsrelay_ids_online"), 2.0);
    h.disconnect(phone);
    h.say(a, send("bob", json!("again"), "c2"));
    assert_eq!(messages(&h.inbox(laptop)).len(), 1);
    h.disconnect(laptop);
    assert_eq!(h.metric("wsrelay_ids_online"), 1.0);
}

#[test]
fn a_recipient_online_but_dropping_everything_gets_it_rejected() {
    // With `--slow-consumer drop`, a connected recipient over its outbound limit drops the
    // message. Acking it `queued` would promise a delivery that only a reconnect would make
    // (and the TTL could expire first while the recipient stays connected): it is rejected.
    let mut h = Harness::plain();
    let a = h.connect("/ws?id=alice");
    let b = h.connect("/ws?id=bob");
    h.inbox(b);
    h.tx.slow.insert(b);
    h.say(a, send("bob", json!("later"), "c1"));
    let ack = h.inbox(a).pop().unwrap();
    assert_eq!(ack["status"], "rejected");
    assert_eq!(
        ack["reason"],
        "recipient is online but too far behind to take it"
    );
    h.tx.slow.clear();
    h.disconnect(b);
    let b = h.connect("/ws?id=bob");
    assert_eq!(messages(&h.inbox(b)), vec![], "nothing was kept as pending");
}

#[test]
fn a_backlog_that_does_not_fit_is_delivered_over_several_connections() {
    let mut h = Harness::plain();
    let a = h.connect("/ws?id=alice");
    h.inbox(a);
    for i in 0..3 {
        h.say(a, send("bob", json!(i), &format!("c{i}")));
    }
    // bob connects, but his connection takes nothing beyond what it must always take (the
    // welcome and the head of the backlog): closed 1008 after those, the rest stays pending.
    let b_slot = ConnId {
        slot: h.next_slot,
        generation: h.next_slot + 1000,
    };
    h.tx.slow.insert(b_slot);
    let b = h.connect("/ws?id=bob");
    assert_eq!(b, b_slot);
    assert!(h
        .tx
        .closes
        .iter()
        .any(|&(conn, code, _)| conn == b && code == CloseCode::POLICY_VIOLATION));
    let inbox = h.inbox(b);
    assert_eq!(inbox[0]["type"], "welcome");
    assert_eq!(
        messages(&inbox),
        vec![("alice".to_string(), json!(0))],
        "progress: the head of the backlog"
    );
    h.tx.slow.clear();
    h.disconnect(b);
    let b = h.connect("/ws?id=bob");
    assert_eq!(
        messages(&h.inbox(b)),
        vec![
            ("alice".to_string(), json!(1)),
            ("alice".to_string(), json!(2)),
        ]
    );
}

#[test]
fn members_lists_who_is_in_the_room_for_the_asker_only() {
    let mut h = Harness::plain();
    let a = h.connect("/ws?id=alice");
    let b1 = h.connect("/ws?id=bob");
    let b2 = h.connect("/ws?id=bob"); // a second device
    let c = h.connect("/ws?id=carol");
    for conn in [a, b1, b2, c] {
        h.say(conn, json!({"type": "join", "room": "lobby"}));
    }
    h.say(c, json!({"type": "leave", "room": "lobby"}));
    for conn in [a, b1, b2, c] {
        h.inbox(conn);
    }
    h.say(b1, json!({"type": "members", "room": "lobby"}));
    assert_eq!(
        h.inbox(b1),
        vec![
            json!({"type": "members", "room": "lobby", "ids": ["alice", "bob", "bob"],
            "members": [{"id": "alice", "info": null}, {"id": "bob", "info": null},
                {"id": "bob", "info": null}]})
        ]
    );
    assert_eq!(h.inbox(a), Vec::<Value>::new(), "only the asker hears it");
    h.say(a, json!({"type": "members", "room": "empty"}));
    assert_eq!(
        h.inbox(a),
        vec![json!({"type": "members", "room": "empty", "ids": [], "members": []})]
    );
    h.disconnect(b2);
    h.inbox(a);
    h.say(a, json!({"type": "members", "room": "lobby"}));
    assert_eq!(h.inbox(a)[0]["ids"], json!(["alice", "bob"]));
}

#[test]
fn rooms_publish_presence_and_leave() {
    let mut h = Harness::plain();
    let a = h.connect("/ws?id=alice");
    let b = h.connect("/ws?id=bob");
    let c = h.connect("/ws?id=carol");
    let epoch = h.inbox(a)[0]["epoch"].clone();
    for conn in [b, c] {
        h.inbox(conn);
    }
    let presence = |id: &str, event: &str| json!({"type": "presence", "room": "lobby", "id": id, "event": event});

    // History off: `joined` names no message, and with nothing asked, misses nothing.
    let joined = json!({"type": "joined", "room": "lobby", "recovered": true,
                        "last_msg_id": null, "epoch": epoch});
    h.say(a, json!({"type": "join", "room": "lobby"}));
    assert_eq!(
        h.inbox(a),
        vec![presence("alice", "join"), joined.clone()],
        "the joiner's confirmation"
    );
    h.say(b, json!({"type": "join", "room": "lobby"}));
    assert_eq!(h.inbox(a), vec![presence("bob", "join")]);
    assert_eq!(h.inbox(b), vec![presence("bob", "join"), joined.clone()]);
    h.say(b, json!({"type": "join", "room": "lobby"}));
    assert_eq!(h.inbox(a), Vec::<Value>::new(), "a second join is not news");
    assert_eq!(h.inbox(b), vec![presence("bob", "join"), joined.clone()]);

    h.say(
        a,
        json!({"type": "publish", "room": "lobby", "payload": {"t": "hi"}, "id": "p1"}),
    );
    let ack = h.inbox(a);
    assert_eq!(ack.len(), 1, "never its own message: {ack:?}");
    assert_eq!(ack[0]["status"], "delivered");
    let got = h.inbox(b);
    assert_eq!(got[0]["room"], "lobby");
    assert_eq!(got[0]["to"], Value::Null);
    assert_eq!(
        messages(&got),
        vec![("alice".to_string(), json!({"t": "hi"}))]
    );
    assert_eq!(h.inbox(c), Vec::<Value>::new(), "not a member");

    // Publishing without joining is allowed; the publisher is not a member, so all hear it.
    h.say(c, json!({"type": "publish", "room": "lobby", "payload": 1}));
    assert_eq!(messages(&h.inbox(a)).len(), 1);
    assert_eq!(messages(&h.inbox(b)).len(), 1);
    assert_eq!(h.inbox(c)[0]["id"], Value::Null);

    h.say(b, json!({"type": "leave", "room": "lobby"}));
    assert_eq!(h.inbox(a), vec![presence("bob", "leave")]);
    assert_eq!(h.inbox(b), vec![presence("bob", "leave")]);
    h.say(b, json!({"type": "join", "room": "lobby"}));
    h.inbox(a);
    h.disconnect(b);
    assert_eq!(h.inbox(a), vec![presence("bob", "leave")]);
    assert_eq!(h.metric("wsrelay_rooms{kind=\"envelope\"}"), 1.0);
    h.disconnect(a);
    assert_eq!(h.metric("wsrelay_rooms{kind=\"envelope\"}"), 0.0);
}

#[test]
fn a_publish_ack_says_what_the_members_did_with_it() {
    // (members that take it, members that drop it) -> (status, reason, msg_id present).
    let cases: [(usize, usize, &str, Value, bool); 4] = [
        (0, 0, "delivered", Value::Null, true),
        (2, 0, "delivered", Value::Null, true),
        (
            2,
            1,
            "partial",
            json!("dropped for 1 of 3 members (over --max-outbound)"),
            true,
        ),
        (
            0,
            2,
            "rejected",
            json!("every member is too far behind to take it"),
            false,
        ),
    ];
    for (taking, dropping, status, reason, has_msg_id) in cases {
        let mut h = Harness::plain();
        let sender = h.connect("/ws?id=sender");
        let mut members = Vec::new();
        for i in 0..taking + dropping {
            let id = format!("m{i}");
            let m = h.connect(&format!("/ws?id={id}"));
            h.say(m, json!({"type": "join", "room": "r"}));
            if i >= taking {
                h.tx.slow.insert(m);
            }
            members.push(m);
        }
        h.inbox(sender);
        h.say(
            sender,
            json!({"type": "publish", "room": "r", "payload": 1, "id": "p1"}),
        );
        let ack = h.inbox(sender).pop().unwrap();
        let case = format!("{taking} taking, {dropping} dropping: {ack}");
        assert_eq!(ack["status"], status, "{case}");
        assert_eq!(ack["reason"], reason, "{case}");
        assert_eq!(ack["msg_id"].is_string(), has_msg_id, "{case}");
        for &m in &members[..taking] {
            assert_eq!(messages(&h.inbox(m)).len(), 1, "{case}");
        }
        // A retry is answered from the dedup window unless the publish was rejected.
        h.say(
            sender,
            json!({"type": "publish", "room": "r", "payload": 1, "id": "p1"}),
        );
        let again = h.inbox(sender).pop().unwrap();
        for field in ["id", "msg_id", "status"] {
            assert_eq!(again[field], ack[field], "{case}: {again}");
        }
        assert_eq!(
            h.metric("wsrelay_duplicates_total"),
            if has_msg_id { 1.0 } else { 0.0 },
            "{case}"
        );
        assert_eq!(
            h.metric(&format!("wsrelay_acks_total{{status=\"{status}\"}}")),
            2.0,
            "{case}"
        );
    }
}

#[test]
fn raw_rooms_share_one_frame_and_skip_the_sender() {
    let mut h = Harness::plain();
    let members: Vec<ConnId> = (0..5).map(|_| h.connect("/r/lobby")).collect();
    let other = h.connect("/r/other");
    h.frame(members[0], OpCode::Binary, &[1, 2, 3]);
    let frames: Vec<_> = std::mem::take(&mut h.tx.sent);
    assert_eq!(frames.len(), 4, "every other member, once");
    assert!(frames.iter().all(|(to, op, payload, _)| *to != members[0]
        && *to != other
        && *op == OpCode::Binary
        && payload == &[1, 2, 3]));
    let first = frames[0].3.as_ref().unwrap();
    assert!(
        frames
            .iter()
            .all(|f| Rc::ptr_eq(f.3.as_ref().unwrap(), first)),
        "one encoded frame shared by all recipients"
    );
    assert_eq!(h.metric("wsrelay_room_members{kind=\"raw\"}"), 6.0);
    for m in members {
        h.disconnect(m);
    }
    assert_eq!(h.metric("wsrelay_rooms{kind=\"raw\"}"), 1.0);
}

#[test]
fn rate_limit_closes_with_1008() {
    let mut h = Harness::new(AppConfig {
        rate_limit: Some(RateLimit {
            per_second: 1.0,
            burst: 2.0,
        }),
        ..AppConfig::default()
    });
    let a = h.connect("/echo");
    h.frame(a, OpCode::Text, b"1");
    h.frame(a, OpCode::Text, b"2");
    assert!(h.tx.closes.is_empty());
    h.frame(a, OpCode::Text, b"3");
    assert_eq!(
        h.tx.closes,
        vec![(a, CloseCode::POLICY_VIOLATION, "rate limit exceeded")]
    );
    assert_eq!(h.raw(a).len(), 2, "the third message was not handled");
    assert_eq!(h.metric("wsrelay_rate_limited_total"), 1.0);
}

/// With an engine that completes later, the messages sent within the limit are acked before
/// the Close (docs/protocol.md, "Rate limit"), and what comes after the limit is not handled.
#[test]
fn a_rate_limit_close_waits_for_the_acks_of_what_was_within_it() {
    let (mut h, held) = Harness::deferred_with(AppConfig {
        rate_limit: Some(RateLimit {
            per_second: 1.0,
            burst: 2.0,
        }),
        ..AppConfig::default()
    });
    let a = h.connect("/ws?id=alice");
    h.inbox(a);
    held.set(true);
    h.say(a, send("bob", json!(1), "c1"));
    h.say(a, send("bob", json!(2), "c2"));
    h.say(a, send("bob", json!(3), "c3"));
    assert!(
        h.tx.closes.is_empty(),
        "not before the acks: {:?}",
        h.tx.closes
    );
    h.say(a, send("bob", json!(4), "c4"));
    held.set(false);
    h.hub.wake(&mut h.tx);
    let ids: Vec<Value> = h.inbox(a).iter().map(|m| m["id"].clone()).collect();
    assert_eq!(ids, vec![json!("c1"), json!("c2")]);
    assert_eq!(
        h.tx.closes,
        vec![(a, CloseCode::POLICY_VIOLATION, "rate limit exceeded")]
    );
    assert_eq!(h.metric("wsrelay_rate_limited_total"), 1.0);
    // Once closed, the connection is gone like any other.
    h.disconnect(a);
    h.hub.wake(&mut h.tx);
    assert_eq!(h.tx.closes.len(), 1);
}

#[test]
fn bad_input_gets_an_error_and_the_connection_stays_usable() {
    let mut h = Harness::plain();
    let a = h.connect("/ws?id=alice");
    let b = h.connect("/ws?id=bob");
    h.inbox(a);
    let long = "x".repeat(200);
    let cases: Vec<(&str, OpCode, String, &str)> = vec![
        (
            "malformed JSON",
            OpCode::Text,
            "{nope".into(),
            "malformed_json",
        ),
        (
            "unknown type",
            OpCode::Text,
            r#"{"type":"yell"}"#.into(),
            "unknown_type",
        ),
        (
            "missing field",
            OpCode::Text,
            r#"{"type":"send","payload":1}"#.into(),
            "missing_field",
        ),
        (
            "wrong type",
            OpCode::Text,
            r#"{"type":"send","to":[],"payload":1}"#.into(),
            "invalid_field",
        ),
        (
            "id too long",
            OpCode::Text,
            format!(r#"{{"type":"send","to":"{long}","payload":1}}"#),
            "id_too_long",
        ),
        (
            "room too long",
            OpCode::Text,
            format!(r#"{{"type":"join","room":"{long}"}}"#),
            "room_too_long",
        ),
        (
            "bad room",
            OpCode::Text,
            r#"{"type":"join","room":"a b"}"#.into(),
            "invalid_room",
        ),
        (
            "binary",
            OpCode::Binary,
            "{}".into(),
            "binary_not_supported",
        ),
    ];
    for (name, opcode, input, code) in cases {
        h.frame(a, opcode, input.as_bytes());
        let got = h.inbox(a);
        assert_eq!(got.len(), 1, "{name}: {got:?}");
        assert_eq!(
            (got[0]["type"].as_str(), got[0]["code"].as_str()),
            (Some("error"), Some(code)),
            "{name}"
        );
        assert!(
            got[0]["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{name}"
        );
        // Still usable.
        h.say(a, send("bob", json!(name), &format!("id {name}")));
        assert_eq!(h.inbox(a)[0]["status"], "delivered", "{name}");
        assert_eq!(messages(&h.inbox(b)).len(), 1, "{name}");
    }
    assert!(h.tx.closes.is_empty());
    assert_eq!(
        h.metric("wsrelay_envelope_errors_total{code=\"malformed_json\"}"),
        1.0
    );
}

#[test]
fn too_many_rooms_is_an_error() {
    let mut h = Harness::plain();
    let a = h.connect("/ws?id=alice");
    for i in 0..hub::MAX_ROOMS_PER_CONNECTION {
        h.say(a, json!({"type": "join", "room": format!("r{i}")}));
    }
    h.inbox(a);
    h.say(a, json!({"type": "join", "room": "one-more"}));
    assert_eq!(h.inbox(a)[0]["code"], "too_many_rooms");
}

#[test]
fn admission_table() {
    let mut h = Harness::plain();
    // (target, extra headers, expected status or "upgrade" as 101, body fragment)
    let cases: Vec<(&str, &str, u16, &str)> = vec![
        ("/echo", "", 101, ""),
        ("/r/lobby", "", 101, ""),
        ("/r/a.b_c-D9", "", 101, ""),
        ("/r/", "", 400, "room names"),
        ("/r/a%20b", "", 400, "room names"),
        ("/r/a/b", "", 404, ""),
        ("/nope", "", 404, ""),
        ("/ws?id=alice", "", 101, ""),
        ("/ws", "", 400, "?id="),
        ("/ws?id=", "", 400, "ids"),
        ("/ws?id=alice&since=12", "", 101, ""),
        ("/ws?id=alice&since=-1", "", 400, "since"),
        ("/", "", 200, "<script src=\"/demo.js\""),
        ("/demo.js", "", 200, "wsrelay.v1"),
        ("/healthz", "", 200, "the reactor's Health"),
        ("/stats.json", "", 200, "the reactor's Stats"),
        ("/metrics?x=1", "", 200, "the reactor's Metrics"),
        ("/healthz/", "", 404, ""),
    ];
    for (target, headers, status, fragment) in cases {
        match h.request(target, headers) {
            Ok(_) => assert_eq!(status, 101, "{target}"),
            Err((got, body)) => {
                assert_eq!(got, status, "{target}: {body}");
                assert!(body.contains(fragment), "{target}: {body}");
            }
        }
    }
    let too_long = format!("/ws?id={}", "x".repeat(129));
    assert_eq!(h.request(&too_long, "").unwrap_err().0, 400);
}

/// The hub's router is the server's one table of paths: the reactor's own endpoints are routed
/// here too, and the same method rule applies to every path.
#[test]
fn every_path_is_routed_here() {
    let mut h = Harness::new(AppConfig {
        allow_origins: vec!["https://chat.example".into()],
        ..AppConfig::default()
    });
    let mut route = |head: &str| {
        let raw = format!("{head}\r\nHost: test\r\n\r\n");
        let (request, _) = parse_request(raw.as_bytes()).unwrap().unwrap();
        h.hub.route(&request)
    };
    let refused = |route: Route<Session>| match route {
        Route::Refuse(refusal) => Some(refusal),
        _ => None,
    };
    let served = |route: Route<Session>| match route {
        Route::Server(endpoint) => Some(endpoint),
        _ => None,
    };
    assert_eq!(
        served(route("GET /healthz HTTP/1.1")),
        Some(ServerEndpoint::Health)
    );
    assert_eq!(
        served(route("GET /stats.json HTTP/1.0")),
        Some(ServerEndpoint::Stats)
    );
    assert_eq!(
        served(route("GET /metrics HTTP/1.1")),
        Some(ServerEndpoint::Metrics)
    );
    for head in [
        "POST /healthz HTTP/1.1",
        "HEAD /metrics HTTP/1.1",
        "PUT /echo HTTP/1.1",
        "DELETE / HTTP/1.1",
        "OPTIONS /nope HTTP/1.1",
        "get /healthz HTTP/1.1",
    ] {
        assert_eq!(
            refused(route(head)),
            Some(Refusal::MethodNotAllowed),
            "{head}"
        );
    }
    assert!(matches!(
        route("GET /demo.css HTTP/1.1"),
        Route::Resource(_)
    ));
    for (head, refusal) in [
        ("GET /nope HTTP/1.1", Refusal::NotFound),
        ("GET /r/a/b HTTP/1.1", Refusal::NotFound),
        (
            "GET /ws HTTP/1.1",
            Refusal::InvalidTarget("?id=<your id> is required".into()),
        ),
        (
            "GET /ws?id=a&since=x HTTP/1.1",
            Refusal::InvalidTarget("?since= must be a msg_id (decimal digits)".into()),
        ),
        (
            "GET /r/a%20b HTTP/1.1",
            Refusal::InvalidTarget(EnvelopeError::InvalidRoom.message()),
        ),
        (
            "GET /echo HTTP/1.1\r\nOrigin: https://evil.example",
            Refusal::Forbidden("Origin not allowed (see --allow-origin)"),
        ),
    ] {
        assert_eq!(refused(route(head)), Some(refusal), "{head}");
    }
}

#[test]
fn subprotocol_is_confirmed_only_when_offered() {
    let mut h = Harness::plain();
    let offered = h
        .request("/ws?id=a", "Sec-WebSocket-Protocol: chat, wsrelay.v1\r\n")
        .unwrap();
    assert_eq!(offered.1, Some("wsrelay.v1"));
    let other = h
        .request("/ws?id=a", "Sec-WebSocket-Protocol: chat\r\n")
        .unwrap();
    assert_eq!(other.1, None);
    let none = h.request("/ws?id=a", "").unwrap();
    assert_eq!(none.1, None);
}

#[test]
fn origin_allow_list() {
    let mut h = Harness::new(AppConfig {
        allow_origins: vec!["https://chat.example".into()],
        ..AppConfig::default()
    });
    assert!(h
        .request("/ws?id=a", "Origin: https://chat.example\r\n")
        .is_ok());
    assert!(
        h.request("/ws?id=a", "").is_ok(),
        "no Origin: not a browser"
    );
    assert_eq!(
        h.request("/ws?id=a", "Origin: https://evil.example\r\n")
            .unwrap_err()
            .0,
        403
    );
    assert_eq!(
        h.request("/r/x", "Origin: https://evil.example\r\n")
            .unwrap_err()
            .0,
        403
    );
    assert_eq!(
        h.request("/echo", "Origin: https://evil.example\r\n")
            .unwrap_err()
            .0,
        403
    );
    assert_eq!(h.metric("wsrelay_origin_rejections_total"), 3.0);
}

mod jwt {
    use super::*;
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};

    const SECRET: &[u8] = b"s3cret";

    fn token(claims: Value) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap()
    }

    fn harness() -> Harness {
        Harness::new(AppConfig {
            jwt_secret: Some(SECRET.to_vec()),
            ..AppConfig::default()
        })
    }

    fn exp(h: &Harness, secs: i64) -> i64 {
        (h.clock.unix_ms() / 1000) as i64 + secs
    }

    #[test]
    fn stats_say_whether_a_token_is_required() {
        let auth_required = |h: &Harness| {
            let mut figures = Vec::new();
            h.hub.stats(&mut figures);
            figures
                .into_iter()
                .find(|(name, _)| *name == "auth_required")
                .map(|(_, value)| value)
        };
        assert_eq!(auth_required(&Harness::plain()), Some(0));
        assert_eq!(auth_required(&harness()), Some(1));
    }

    #[test]
    fn the_token_is_the_identity() {
        let mut h = harness();
        let t = token(json!({"sub": "alice", "exp": exp(&h, 60)}));
        let a = h.connect(&format!("/ws?token={t}&id=mallory"));
        assert_eq!(h.inbox(a)[0]["id"], "alice", "?id= is ignored under auth");
        let b = h
            .request("/ws", &format!("Authorization: Bearer {t}\r\n"))
            .unwrap()
            .0;
        assert_eq!(h.inbox(b)[0]["id"], "alice");
    }

    #[test]
    fn refusals_are_401_with_the_reason() {
        let mut h = harness();
        let expired = token(json!({"sub": "alice", "exp": exp(&h, -3600)}));
        for (target, reason) in [
            ("/ws".to_string(), "missing"),
            ("/ws?id=alice".to_string(), "missing"),
            (format!("/ws?token={expired}"), "expired"),
            ("/ws?token=garbage".to_string(), "malformed"),
            ("/r/lobby".to_string(), "missing"),
        ] {
            let (status, body) = h.request(&target, "").unwrap_err();
            assert_eq!(status, 401, "{target}");
            assert!(body.contains(reason), "{target}: {body}");
        }
        assert_eq!(
            h.metric("wsrelay_auth_failures_total{reason=\"missing\"}"),
            3.0
        );
        assert!(h.request("/echo", "").is_ok(), "/echo needs no token");
    }

    #[test]
    fn a_token_expires_on_the_hub_clock() {
        let mut h = harness();
        let t = token(json!({"sub": "alice", "exp": exp(&h, 10)}));
        assert!(h.request(&format!("/ws?token={t}"), "").is_ok());
        h.clock.advance(Duration::from_secs(10 + auth::LEEWAY_SECS));
        assert_eq!(h.request(&format!("/ws?token={t}"), "").unwrap_err().0, 401);
    }

    #[test]
    fn the_rooms_claim_restricts_joins_publishes_and_raw_rooms() {
        let mut h = harness();
        let t = token(json!({"sub": "alice", "exp": exp(&h, 60), "rooms": ["lobby"]}));
        let a = h.connect(&format!("/ws?token={t}"));
        h.inbox(a);
        h.say(a, json!({"type": "join", "room": "lobby"}));
        assert_eq!(h.inbox(a)[0]["type"], "presence");
        h.say(a, json!({"type": "join", "room": "secret"}));
        assert_eq!(h.inbox(a)[0]["code"], "forbidden");
        h.say(
            a,
            json!({"type": "publish", "room": "secret", "payload": 1, "id": "p"}),
        );
        let ack = h.inbox(a).pop().unwrap();
        assert_eq!(
            (ack["status"].as_str(), ack["msg_id"].as_str()),
            (Some("rejected"), None)
        );
        h.say(
            a,
            json!({"type": "publish", "room": "lobby", "payload": 1, "id": "q"}),
        );
        assert_eq!(h.inbox(a)[0]["status"], "delivered");
        assert!(h.request(&format!("/r/lobby?token={t}"), "").is_ok());
        assert_eq!(
            h.request(&format!("/r/secret?token={t}"), "")
                .unwrap_err()
                .0,
            403
        );
    }
}

/// Tokens of open connections (SPEC §16): the `publish` claim, `info` in presence and
/// `members`, `refresh`, and expiry, on the hub's clock with the reactor's timer played by hand
/// (`Recorder::wakes` is what the hub asked for, `Hub::timer` is the timer firing).
mod tokens {
    use super::*;
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};

    const SECRET: &[u8] = b"s3cret";

    fn token(claims: Value) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap()
    }

    fn harness() -> Harness {
        Harness::new(AppConfig {
            jwt_secret: Some(SECRET.to_vec()),
            ..AppConfig::default()
        })
    }

    /// `secs` from now on `clock` (the harness's, shared), as a JWT `exp`.
    fn exp(clock: &ManualClock, secs: u64) -> u64 {
        clock.unix_ms() / 1000 + secs
    }

    /// Connects with a token of `claims` and reads the welcome.
    fn connect(h: &mut Harness, claims: Value) -> ConnId {
        let conn = h.connect(&format!("/ws?token={}", token(claims)));
        assert_eq!(h.inbox(conn)[0]["type"], "welcome");
        conn
    }

    fn refresh(h: &mut Harness, conn: ConnId, claims: Value) -> Value {
        h.say(conn, json!({"type": "refresh", "token": token(claims)}));
        let mut answer = h.inbox(conn);
        assert_eq!(answer.len(), 1, "{answer:?}");
        answer.remove(0)
    }

    #[test]
    fn the_publish_claim_is_enforced_apart_from_rooms() {
        let mut h = harness();
        let clock = h.clock.clone();
        let claims = json!({"sub": "ann", "exp": exp(&clock, 60), "rooms": ["lobby", "news"],
            "publish": ["lobby"]});
        let a = connect(&mut h, claims.clone());
        h.say(a, json!({"type": "join", "room": "news"}));
        assert_eq!(h.inbox(a)[0]["event"], "join", "may join news");
        // Another member, who must not get what ann may not publish.
        let b = connect(&mut h, json!({"sub": "bob", "exp": exp(&clock, 60)}));
        h.say(b, json!({"type": "join", "room": "news"}));
        h.inbox(a);
        h.inbox(b);
        h.say(
            a,
            json!({"type": "publish", "room": "news", "payload": 1, "id": "n"}),
        );
        assert_eq!(
            h.inbox(a),
            vec![
                json!({"type": "ack", "id": "n", "msg_id": null, "status": "rejected",
                "reason": "your token does not allow publishing to this room"})
            ]
        );
        assert_eq!(h.inbox(b), Vec::<Value>::new(), "bob got nothing");
        h.say(
            a,
            json!({"type": "publish", "room": "lobby", "payload": 1, "id": "l"}),
        );
        assert_eq!(h.inbox(a)[0]["status"], "delivered");
        assert_eq!(h.metric("wsrelay_token_publish_refusals_total"), 1.0);

        // A raw room: the listener may enter news, and is closed (1008) when it speaks there.
        let t = token(claims);
        let listener = h.connect(&format!("/r/news?token={t}"));
        let speaker = h.connect(&format!("/r/lobby?token={t}"));
        let other = h.connect(&format!("/r/lobby?token={t}"));
        h.frame(speaker, OpCode::Text, b"hi");
        assert_eq!(h.raw(other), vec![(OpCode::Text, b"hi".to_vec())]);
        h.frame(listener, OpCode::Text, b"hi");
        assert_eq!(
            h.tx.closes,
            vec![(
                listener,
                CloseCode::POLICY_VIOLATION,
                "your token does not allow publishing to this room"
            )]
        );
        assert_eq!(h.metric("wsrelay_token_publish_refusals_total"), 2.0);
    }

    #[test]
    fn info_is_shown_in_presence_and_members() {
        let mut h = harness();
        let clock = h.clock.clone();
        let b = connect(&mut h, json!({"sub": "bob", "exp": exp(&clock, 60)}));
        h.say(b, json!({"type": "join", "room": "lobby"}));
        h.inbox(b);
        let info = json!({"name": "Ann", "avatar": "/a.png"});
        let a = connect(
            &mut h,
            json!({"sub": "ann", "exp": exp(&clock, 60), "info": info}),
        );
        h.say(a, json!({"type": "join", "room": "lobby"}));
        let join = json!({"type": "presence", "room": "lobby", "id": "ann", "event": "join",
            "info": info});
        assert_eq!(h.inbox(b), vec![join.clone()]);
        let to_ann = h.inbox(a);
        assert_eq!(to_ann.len(), 2, "{to_ann:?}");
        assert_eq!(to_ann[0], join);
        assert_eq!(
            to_ann[1]["type"], "joined",
            "a join is confirmed after its presence"
        );
        h.say(b, json!({"type": "members", "room": "lobby"}));
        assert_eq!(
            h.inbox(b),
            vec![
                json!({"type": "members", "room": "lobby", "ids": ["ann", "bob"],
                "members": [{"id": "ann", "info": info}, {"id": "bob", "info": null}]})
            ]
        );
        h.disconnect(a);
        assert_eq!(
            h.inbox(b),
            vec![
                json!({"type": "presence", "room": "lobby", "id": "ann", "event": "leave",
                "info": info})
            ]
        );
    }

    #[test]
    fn a_refresh_needs_a_valid_token_for_the_same_sub() {
        let mut h = harness();
        let clock = h.clock.clone();
        let a = connect(&mut h, json!({"sub": "ann", "exp": exp(&clock, 60)}));
        let e = refresh(&mut h, a, json!({"sub": "eve", "exp": exp(&clock, 600)}));
        assert_eq!(e["code"], "token_sub_mismatch", "{e}");
        let e = refresh(
            &mut h,
            a,
            json!({"sub": "ann", "exp": exp(&clock, 0) - 3600}),
        );
        assert_eq!(e["code"], "token_refused", "{e}");
        assert!(e["message"].as_str().unwrap().contains("expired"), "{e}");
        h.say(a, json!({"type": "refresh", "token": "not a token"}));
        assert_eq!(h.inbox(a)[0]["code"], "token_refused");
        assert!(
            h.tx.closes.is_empty(),
            "a refused refresh keeps the connection"
        );

        let until = exp(&clock, 600);
        let ok = refresh(&mut h, a, json!({"sub": "ann", "exp": until}));
        assert_eq!(ok, json!({"type": "refreshed", "exp": until}));
        assert_eq!(
            h.metric("wsrelay_token_refreshes_total{result=\"ok\"}"),
            1.0
        );
        assert_eq!(
            h.metric("wsrelay_token_refreshes_total{result=\"refused\"}"),
            3.0
        );
        let reasons = [
            ("token_sub_mismatch", 1.0),
            ("expired", 1.0),
            ("malformed", 1.0),
        ];
        for (reason, n) in reasons {
            let sample = format!("wsrelay_token_refresh_refusals_total{{reason=\"{reason}\"}}");
            assert_eq!(h.metric(&sample), n, "{reason}");
        }

        let mut plain = Harness::plain();
        let p = plain.connect("/ws?id=ann");
        plain.inbox(p);
        plain.say(
            p,
            json!({"type": "refresh", "token": token(json!({"sub": "ann"}))}),
        );
        assert_eq!(plain.inbox(p)[0]["code"], "tokens_not_in_use");
    }

    /// New claims replace the old at once: rooms the new token does not allow are left (with
    /// the usual `leave`), publishing follows the new `publish` claim, and `info` is the new one.
    #[test]
    fn a_refresh_replaces_the_claims() {
        let mut h = harness();
        let clock = h.clock.clone();
        let a = connect(
            &mut h,
            json!({"sub": "ann", "exp": exp(&clock, 60), "rooms": ["lobby", "news"]}),
        );
        let b = connect(&mut h, json!({"sub": "bob", "exp": exp(&clock, 60)}));
        for room in ["lobby", "news"] {
            h.say(b, json!({"type": "join", "room": room}));
            h.say(a, json!({"type": "join", "room": room}));
        }
        h.inbox(a);
        h.inbox(b);
        let info = json!({"name": "Ann"});
        h.say(
            a,
            json!({"type": "refresh", "token": token(json!({"sub": "ann", "exp": exp(&clock, 60),
                "rooms": ["lobby"], "publish": [], "info": info}))}),
        );
        let leave = json!({"type": "presence", "room": "news", "id": "ann", "event": "leave",
            "info": info});
        let got = h.inbox(a);
        assert_eq!(got[0], leave);
        assert_eq!(got[1]["type"], "refreshed");
        assert_eq!(h.inbox(b), vec![leave]);
        h.say(
            a,
            json!({"type": "publish", "room": "lobby", "payload": 1, "id": "x"}),
        );
        assert_eq!(h.inbox(a)[0]["status"], "rejected");
        h.say(b, json!({"type": "members", "room": "lobby"}));
        assert_eq!(
            h.inbox(b)[0]["members"][0],
            json!({"id": "ann", "info": info})
        );
    }

    /// The hub asks the reactor for one wake-up at the earliest expiry (exp plus the leeway),
    /// closes with 4001 what has expired when it comes, and asks for the next. A refreshed
    /// connection outlives its old token.
    #[test]
    fn expired_tokens_close_with_4001_at_exp_plus_the_leeway() {
        let mut h = harness();
        let clock = h.clock.clone();
        let start = h.clock.now();
        let leeway = auth::LEEWAY_SECS;
        let a = connect(&mut h, json!({"sub": "ann", "exp": exp(&clock, 10)}));
        assert_eq!(h.tx.wakes, vec![start + Duration::from_secs(10 + leeway)]);
        let b = connect(&mut h, json!({"sub": "bob", "exp": exp(&clock, 10)}));
        let c = connect(&mut h, json!({"sub": "cid", "exp": exp(&clock, 100)}));
        assert_eq!(h.tx.wakes.len(), 1, "a later expiry asks for nothing more");

        // Refreshed before its expiry: b lives on.
        refresh(&mut h, b, json!({"sub": "bob", "exp": exp(&clock, 50)}));
        h.clock.advance(Duration::from_secs(10 + leeway - 1));
        h.hub.timer(&mut h.tx);
        assert!(h.tx.closes.is_empty(), "woken early: nothing is due yet");
        assert_eq!(h.tx.wakes.len(), 2, "and it asks again");
        assert_eq!(h.tx.wakes[1], start + Duration::from_secs(10 + leeway));
        h.clock.advance(Duration::from_secs(1));
        h.hub.timer(&mut h.tx);
        assert_eq!(h.tx.closes, vec![(a, CloseCode(4001), "token expired")]);
        assert_eq!(h.metric("wsrelay_token_expiries_total"), 1.0);
        assert_eq!(h.tx.wakes[2], start + Duration::from_secs(50 + leeway));
        h.disconnect(a);
        assert_eq!(h.metric("wsrelay_token_connections"), 2.0);

        h.clock.advance(Duration::from_secs(50));
        h.hub.timer(&mut h.tx);
        assert_eq!(h.tx.closes[1], (b, CloseCode(4001), "token expired"));
        assert_eq!(h.tx.wakes[3], start + Duration::from_secs(100 + leeway));
        // c closes on its own first: nothing is due any more, and nothing is asked for.
        h.disconnect(c);
        h.clock.advance(Duration::from_secs(100));
        h.hub.timer(&mut h.tx);
        assert_eq!(h.tx.closes.len(), 2);
        assert_eq!(h.tx.wakes.len(), 4);
        assert_eq!(h.metric("wsrelay_token_expiries_total"), 2.0);
    }

    #[test]
    fn without_tokens_the_hub_never_asks_to_be_woken() {
        let mut h = Harness::plain();
        let a = h.connect("/ws?id=ann");
        h.say(a, json!({"type": "join", "room": "lobby"}));
        let r = h.connect("/r/lobby");
        h.frame(r, OpCode::Text, b"x");
        h.disconnect(a);
        assert!(h.tx.wakes.is_empty());
        assert_eq!(h.metric("wsrelay_token_connections"), 0.0);
    }

    #[test]
    fn a_raw_room_connection_expires_too() {
        let mut h = harness();
        let clock = h.clock.clone();
        let t = token(json!({"sub": "ann", "exp": exp(&clock, 5)}));
        let r = h.connect(&format!("/r/lobby?token={t}"));
        assert_eq!(h.tx.wakes.len(), 1);
        h.clock.advance(Duration::from_secs(5 + auth::LEEWAY_SECS));
        h.hub.timer(&mut h.tx);
        assert_eq!(h.tx.closes, vec![(r, CloseCode(4001), "token expired")]);
    }

    /// Fail closed: when a token expires while the connection's recovery is still with the
    /// engine, what it sent before its welcome is dropped, not handled unchecked once the
    /// recovery completes in the same wake-up (it would join and publish to a room its token
    /// never allowed).
    #[test]
    fn what_an_expired_connection_sent_before_its_welcome_is_dropped() {
        let (mut h, held) = Harness::deferred_with(AppConfig {
            jwt_secret: Some(SECRET.to_vec()),
            ..AppConfig::default()
        });
        let clock = h.clock.clone();
        let b = connect(&mut h, json!({"sub": "bob", "exp": exp(&clock, 600)}));
        h.say(b, json!({"type": "join", "room": "vault"}));
        h.inbox(b);
        held.set(true);
        let t = token(json!({"sub": "ann", "exp": exp(&clock, 5), "rooms": ["lobby"]}));
        let a = h.connect(&format!("/ws?token={t}"));
        h.say(a, json!({"type": "join", "room": "vault"}));
        h.say(
            a,
            json!({"type": "publish", "room": "vault", "payload": "psst", "id": "p"}),
        );
        assert!(h.inbox(a).is_empty(), "not greeted yet: {:?}", h.tx.sent);
        h.clock.advance(Duration::from_secs(5 + auth::LEEWAY_SECS));
        held.set(false);
        h.hub.timer(&mut h.tx);
        assert_eq!(h.tx.closes, vec![(a, CloseCode(4001), "token expired")]);
        assert_eq!(
            h.inbox(b),
            Vec::<Value>::new(),
            "bob heard nothing from ann"
        );
        assert!(!h.hub.rooms.is_member(a, "vault"));
        let to_ann = h.inbox(a);
        assert!(
            to_ann
                .iter()
                .all(|m| m["type"] != "joined" && m["type"] != "presence"),
            "{to_ann:?}"
        );
        h.disconnect(a);
        assert_eq!(h.metric("wsrelay_token_connections"), 1.0);
    }

    /// With `--jwt-secret`, a connection the hub holds no token for may do nothing (only the
    /// server API's backend, which has no token by design, is exempt, and says so).
    #[test]
    fn with_tokens_required_a_connection_without_one_is_refused() {
        let mut h = harness();
        let clock = h.clock.clone();
        let a = connect(&mut h, json!({"sub": "ann", "exp": exp(&clock, 60)}));
        // As after an expiry: the token is gone, the connection not closed yet.
        h.hub.tokens.remove(a);
        h.say(a, json!({"type": "join", "room": "lobby"}));
        assert_eq!(h.inbox(a)[0]["code"], "forbidden");
        h.say(
            a,
            json!({"type": "publish", "room": "lobby", "payload": 1, "id": "p"}),
        );
        assert_eq!(h.inbox(a)[0]["status"], "rejected");
    }

    /// The `leave` sent when a 4001 close ends the connection carries its `info`, as every
    /// presence event about it does.
    #[test]
    fn the_leave_after_an_expiry_carries_the_info() {
        let mut h = harness();
        let clock = h.clock.clone();
        let b = connect(&mut h, json!({"sub": "bob", "exp": exp(&clock, 600)}));
        h.say(b, json!({"type": "join", "room": "lobby"}));
        let info = json!({"name": "Ann"});
        let a = connect(
            &mut h,
            json!({"sub": "ann", "exp": exp(&clock, 5), "info": info}),
        );
        h.say(a, json!({"type": "join", "room": "lobby"}));
        h.inbox(a);
        h.inbox(b);
        h.clock.advance(Duration::from_secs(5 + auth::LEEWAY_SECS));
        h.hub.timer(&mut h.tx);
        assert_eq!(h.tx.closes, vec![(a, CloseCode(4001), "token expired")]);
        h.disconnect(a);
        assert_eq!(
            h.inbox(b),
            vec![
                json!({"type": "presence", "room": "lobby", "id": "ann", "event": "leave",
                "info": info})
            ]
        );
        assert_eq!(h.metric("wsrelay_token_connections"), 1.0);
    }
}

/// A store slower than the traffic: past `--max-in-flight-bytes` waiting for the engine, sends
/// and publishes are refused at once ("store busy", counted), and accepted again once the
/// engine has caught up.
#[test]
fn past_the_in_flight_bound_messages_are_refused_as_store_busy() {
    let (mut h, held) = Harness::deferred_with(AppConfig {
        max_in_flight_bytes: 400,
        ..AppConfig::default()
    });
    let a = h.connect("/ws?id=alice");
    assert_eq!(h.inbox(a)[0]["type"], "welcome");
    held.set(true);
    let text = "x".repeat(100);
    // Each body is the rendered message (some 180 bytes): two fit, the third does not.
    for i in 0..2 {
        h.say(a, send("bob", json!(text), &format!("c{i}")));
    }
    assert_eq!(h.inbox(a), Vec::<Value>::new(), "waiting for the store");
    let waiting = h.metric("wsrelay_store_in_flight_bytes");
    assert!(waiting > 200.0 && waiting <= 400.0, "in flight: {waiting}");
    h.say(a, send("bob", json!(text), "c2"));
    h.say(
        a,
        json!({"type": "publish", "room": "lobby", "payload": text, "id": "c3"}),
    );
    let refused = h.inbox(a);
    assert_eq!(refused.len(), 2, "{refused:?}");
    for (ack, id) in refused.iter().zip(["c2", "c3"]) {
        assert_eq!(ack["type"], "ack");
        assert_eq!(ack["id"], id);
        assert_eq!(ack["status"], "rejected");
        assert_eq!(ack["reason"], STORE_BUSY_REASON);
    }
    assert_eq!(h.metric("wsrelay_store_busy_total"), 2.0);

    held.set(false);
    h.hub.wake(&mut h.tx);
    let acks = h.inbox(a);
    let statuses: Vec<_> = acks.iter().map(|a| a["status"].clone()).collect();
    assert_eq!(statuses, vec![json!("queued"), json!("queued")]);
    assert_eq!(h.metric("wsrelay_store_in_flight_bytes"), 0.0);
    // Caught up: the refused one, sent again, is taken (it was never stored, so no duplicate).
    h.say(a, send("bob", json!(text), "c2"));
    let acks = h.inbox(a);
    assert_eq!(acks.len(), 1);
    assert_eq!(acks[0]["status"], "queued");
    assert_eq!(h.metric("wsrelay_store_busy_total"), 2.0);
}

const STORE_BUSY_REASON: &str = "the server is busy storing messages; try again later";

/// The reactor keeps one `Option<Session>` per open connection, so it counts in every idle
/// connection's memory (docs/benchmarks.md, "Idle memory": at most 256 bytes each, with the
/// reactor's connection slot and the heartbeat timer). What only some sessions have (an
/// envelope peer, a rate-limit bucket, a token's grant) is boxed. The bound is today's size:
/// growing it is a decision to take on purpose, with the idle memory re-measured. It was 32
/// until token grants (SPEC §16) took one more pointer: the grant waits in the session from
/// admission to `open`.
#[test]
fn a_session_stays_small() {
    let size = std::mem::size_of::<Option<Session>>();
    println!("size_of::<Option<Session>>() = {size}");
    assert!(
        size <= 40,
        "size_of::<Option<Session>>() grew to {size} bytes (bound: 40)"
    );
}

mod history;
mod presence;
