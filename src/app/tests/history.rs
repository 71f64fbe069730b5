//! Room history in the hub (SPEC §16) against a recording transport: `history` pages, `join`
//! with `since` replaying exactly what was missed, and the ordering against messages still with
//! the engine (the `Deferred` engine holds completions back, as the file engine's fsync does).

use super::*;

fn with_history(n: usize) -> AppConfig {
    AppConfig {
        room_history: n,
        ..AppConfig::default()
    }
}

fn publish(room: &str, payload: Value) -> Value {
    json!({"type": "publish", "room": room, "payload": payload})
}

fn join_since(room: &str, since: &Value) -> Value {
    json!({"type": "join", "room": room, "since": since})
}

/// The payloads of the `message`s in `inbox`, in order.
fn payloads(inbox: &[Value]) -> Vec<Value> {
    inbox
        .iter()
        .filter(|m| m["type"] == "message")
        .map(|m| m["payload"].clone())
        .collect()
}

/// The one message of `kind` in `inbox`.
fn only<'a>(inbox: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<_> = inbox.iter().filter(|m| m["type"] == kind).collect();
    assert_eq!(found.len(), 1, "one {kind} in {inbox:?}");
    found[0]
}

#[test]
fn history_returns_the_newest_in_order_and_respects_the_limit() {
    let mut h = Harness::new(with_history(20));
    let a = h.connect("/ws?id=alice");
    for i in 0..30 {
        h.say(a, publish("lobby", json!(i)));
    }
    let acks = h.inbox(a);
    let last_msg_id = acks.last().unwrap()["msg_id"].clone();
    let b = h.connect("/ws?id=bob");
    h.inbox(b);
    h.say(
        b,
        json!({"type": "history", "room": "lobby", "limit": 1000}),
    );
    let reply = h.inbox(b);
    let page = only(&reply, "history");
    assert_eq!(page["room"], "lobby");
    assert_eq!(page["last_msg_id"], last_msg_id);
    let got: Vec<Value> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["payload"].clone())
        .collect();
    assert_eq!(got, (10..30).map(|i| json!(i)).collect::<Vec<_>>());
    assert_eq!(page["messages"][19]["msg_id"], last_msg_id);

    h.say(b, json!({"type": "history", "room": "lobby", "limit": 3}));
    let page = h.inbox(b).remove(0);
    let got: Vec<Value> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["payload"].clone())
        .collect();
    assert_eq!(got, vec![json!(27), json!(28), json!(29)]);

    h.say(b, json!({"type": "history", "room": "empty"}));
    let page = h.inbox(b).remove(0);
    assert_eq!(page["messages"], json!([]));
    assert_eq!(page["last_msg_id"], Value::Null);

    assert_eq!(h.metric("wsrelay_history_requests_total"), 3.0);
    assert_eq!(h.metric("wsrelay_history_messages_total"), 23.0);
    assert_eq!(h.metric("wsrelay_room_history_messages"), 20.0);
    assert_eq!(
        h.metric(r#"wsrelay_room_history_removed_total{reason="per_room"}"#),
        10.0
    );
}

#[test]
fn rejoin_with_since_replays_exactly_what_was_missed_then_joined() {
    let mut h = Harness::new(with_history(20));
    let a = h.connect("/ws?id=alice");
    let b = h.connect("/ws?id=bob");
    h.say(b, json!({"type": "join", "room": "lobby"}));
    h.say(a, publish("lobby", json!("seen")));
    let seen = h.inbox(b);
    let since = seen.last().unwrap()["msg_id"].clone();
    assert_eq!(payloads(&seen), vec![json!("seen")]);
    h.disconnect(b);

    for i in 0..3 {
        h.say(a, publish("lobby", json!(i)));
    }
    let b = h.connect("/ws?id=bob");
    h.inbox(b);
    h.say(b, join_since("lobby", &since));
    let got = h.inbox(b);
    let kinds: Vec<_> = got.iter().map(|m| m["type"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        ["presence", "message", "message", "message", "joined"],
        "{got:?}"
    );
    assert_eq!(payloads(&got), vec![json!(0), json!(1), json!(2)]);
    let joined = &got[4];
    assert_eq!(joined["recovered"], true);
    assert_eq!(joined["last_msg_id"], got[3]["msg_id"]);

    // Live from here on: the next publish arrives once.
    h.say(a, publish("lobby", json!("live")));
    assert_eq!(payloads(&h.inbox(b)), vec![json!("live")]);
    assert_eq!(
        h.metric(r#"wsrelay_recoveries_total{kind="room",recovered="true"}"#),
        1.0
    );
    assert_eq!(h.metric("wsrelay_room_replayed_total"), 3.0);
}

#[test]
fn a_since_older_than_the_history_is_not_recovered() {
    let mut h = Harness::new(with_history(5));
    let a = h.connect("/ws?id=alice");
    h.say(a, publish("lobby", json!("first")));
    let since = h.inbox(a);
    // No ack id asked for, but the ack still names the msg_id.
    let since = since[1]["msg_id"].clone();
    for i in 0..10 {
        h.say(a, publish("lobby", json!(i)));
    }
    let b = h.connect("/ws?id=bob");
    h.inbox(b);
    h.say(b, join_since("lobby", &since));
    let got = h.inbox(b);
    assert_eq!(
        payloads(&got),
        (5..10).map(|i| json!(i)).collect::<Vec<_>>(),
        "what is still there"
    );
    assert_eq!(only(&got, "joined")["recovered"], false);
    assert_eq!(
        h.metric(r#"wsrelay_recoveries_total{kind="room",recovered="false"}"#),
        1.0
    );
}

#[test]
fn replay_and_live_traffic_neither_overlap_nor_leave_a_gap() {
    let (mut h, held) = Harness::deferred_with(with_history(50));
    let a = h.connect("/ws?id=alice");
    let b = h.connect("/ws?id=bob");
    h.say(b, json!({"type": "join", "room": "lobby"}));
    h.say(a, publish("lobby", json!("before")));
    let since = h.inbox(b).last().unwrap()["msg_id"].clone();
    h.disconnect(b);
    h.say(a, publish("lobby", json!("missed")));
    let b = h.connect("/ws?id=bob");
    h.inbox(b);

    // With the engine: one publish before the join, one after.
    held.set(true);
    h.say(a, publish("lobby", json!("in flight before")));
    h.say(b, join_since("lobby", &since));
    h.say(a, publish("lobby", json!("in flight after")));
    assert_eq!(
        h.inbox(b),
        Vec::<Value>::new(),
        "nothing before the engine answers"
    );
    held.set(false);
    h.hub.wake(&mut h.tx);
    h.say(a, publish("lobby", json!("live")));

    let got = h.inbox(b);
    assert_eq!(
        payloads(&got),
        vec![
            json!("missed"),
            json!("in flight before"),
            json!("in flight after"),
            json!("live")
        ],
        "{got:?}"
    );
    let at = got.iter().position(|m| m["type"] == "joined").unwrap();
    assert_eq!(payloads(&got[..at]).len(), 2, "replayed, then joined");
    assert_eq!(got[at]["recovered"], true);
}

#[test]
fn a_leave_before_the_engine_answers_cancels_the_join() {
    let (mut h, held) = Harness::deferred_with(with_history(10));
    let b = h.connect("/ws?id=bob");
    h.inbox(b);
    held.set(true);
    h.say(b, json!({"type": "join", "room": "lobby"}));
    h.say(b, json!({"type": "leave", "room": "lobby"}));
    held.set(false);
    h.hub.wake(&mut h.tx);
    let got = h.inbox(b);
    assert!(got.iter().all(|m| m["type"] != "joined"), "{got:?}");
    let a = h.connect("/ws?id=alice");
    h.say(a, publish("lobby", json!("x")));
    assert_eq!(payloads(&h.inbox(b)), Vec::<Value>::new(), "not a member");
}

#[test]
fn a_member_joining_again_gets_the_replay_after_its_since() {
    // Under `--slow-consumer drop` a member may have lost live messages: a repeated join with
    // `since` replays what the history holds after it (clients dedup by msg_id).
    let mut h = Harness::new(with_history(10));
    let a = h.connect("/ws?id=alice");
    let b = h.connect("/ws?id=bob");
    h.say(b, json!({"type": "join", "room": "lobby"}));
    h.say(a, publish("lobby", json!(1)));
    let since = h.inbox(b).last().unwrap()["msg_id"].clone();
    h.tx.slow.insert(b);
    h.say(a, publish("lobby", json!(2)));
    h.tx.slow.clear();
    assert_eq!(payloads(&h.inbox(b)), Vec::<Value>::new(), "dropped live");
    h.say(b, join_since("lobby", &since));
    let got = h.inbox(b);
    assert_eq!(payloads(&got), vec![json!(2)], "{got:?}");
    assert_eq!(only(&got, "joined")["recovered"], true);
    assert_eq!(only(&got, "presence")["event"], "join");
}

#[test]
fn joined_reaches_a_slow_consumer_so_a_partial_recovery_is_never_silent() {
    // The replay's first message goes unbounded and the rest is refused by the slow
    // consumer, but `joined` (with recovered:false) must still arrive: it goes unbounded too.
    let mut h = Harness::new(with_history(1));
    let a = h.connect("/ws?id=alice");
    h.say(a, publish("lobby", json!("first")));
    let since = h.inbox(a)[1]["msg_id"].clone();
    for i in 0..3 {
        h.say(a, publish("lobby", json!(i)));
    }
    let b = h.connect("/ws?id=bob");
    h.inbox(b);
    h.tx.slow.insert(b);
    h.say(b, join_since("lobby", &since));
    let got = h.inbox(b);
    assert_eq!(payloads(&got), vec![json!(2)], "{got:?}");
    assert_eq!(only(&got, "joined")["recovered"], false);

    // History off: the immediate `joined` is unbounded as well.
    let mut h = Harness::plain();
    let c = h.connect("/ws?id=carol");
    h.inbox(c);
    h.tx.slow.insert(c);
    h.say(c, join_since("lobby", &json!("7")));
    assert_eq!(only(&h.inbox(c), "joined")["recovered"], false);
}

#[test]
fn a_refresh_while_the_engine_works_is_what_join_and_history_answer_by() {
    let secret = b"history-secret".to_vec();
    let config = AppConfig {
        room_history: 10,
        jwt_secret: Some(secret.clone()),
        ..AppConfig::default()
    };
    let (mut h, held) = Harness::deferred_with(config);
    let exp = START_MS / 1000 + 3600;
    let token = |sub: &str, rooms: Value| {
        let claims = json!({"sub": sub, "exp": exp, "rooms": rooms});
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(&secret),
        )
        .unwrap()
    };
    let b = h.connect(&format!(
        "/ws?token={}",
        token("bob", json!(["lobby", "staff"]))
    ));
    h.inbox(b);
    held.set(true);
    h.say(b, json!({"type": "join", "room": "staff"}));
    h.say(b, json!({"type": "history", "room": "staff"}));
    h.say(
        b,
        json!({"type": "refresh", "token": token("bob", json!(["lobby"]))}),
    );
    held.set(false);
    h.hub.wake(&mut h.tx);
    let got = h.inbox(b);
    assert!(got.iter().all(|m| m["type"] != "joined"), "{got:?}");
    assert!(got.iter().all(|m| m["type"] != "history"), "{got:?}");
    let refused = got.iter().filter(|m| m["code"] == "forbidden").count();
    assert_eq!(refused, 2, "{got:?}");

    let a = h.connect(&format!("/ws?token={}", token("alice", json!(["staff"]))));
    h.say(a, publish("staff", json!("secret")));
    assert_eq!(payloads(&h.inbox(b)), Vec::<Value>::new(), "not a member");
}

#[test]
fn a_history_page_is_bounded_in_bytes_and_says_when_it_was_cut() {
    let mut h = Harness::new(AppConfig {
        history_page_max_bytes: 10_000,
        ..with_history(100)
    });
    let a = h.connect("/ws?id=alice");
    for i in 0..20 {
        h.say(
            a,
            publish("lobby", json!(format!("{i:04}{}", "x".repeat(1000)))),
        );
    }
    h.inbox(a);
    h.say(a, json!({"type": "history", "room": "lobby"}));
    let reply = h.raw(a);
    assert_eq!(reply.len(), 1);
    assert!(
        reply[0].1.len() < 10_000 + 1_000,
        "{} bytes",
        reply[0].1.len()
    );
    let page: Value = serde_json::from_slice(&reply[0].1).unwrap();
    let got = page["messages"].as_array().unwrap();
    assert!(got.len() >= 8 && got.len() < 20, "{} messages", got.len());
    // The newest ones, in order, ending with the newest.
    let last = got.last().unwrap()["payload"].as_str().unwrap();
    assert!(last.starts_with("0019"), "{last}");
    assert_eq!(page["more"], true);

    // One message larger than the bound still comes: the relay accepted it.
    h.say(a, publish("big", json!("y".repeat(20_000))));
    h.inbox(a);
    h.say(a, json!({"type": "history", "room": "big"}));
    let page = only(&h.inbox(a), "history").clone();
    assert_eq!(page["messages"].as_array().unwrap().len(), 1);
    assert_eq!(page["more"], false);
}

#[test]
fn a_history_reply_a_slow_consumer_cannot_take_is_an_error_not_silence() {
    let mut h = Harness::new(with_history(10));
    let a = h.connect("/ws?id=alice");
    h.say(a, publish("lobby", json!(1)));
    h.inbox(a);
    h.tx.slow.insert(a);
    h.say(a, json!({"type": "history", "room": "lobby"}));
    assert_eq!(only(&h.inbox(a), "error")["code"], "history_dropped");
    assert_eq!(
        h.metric(r#"wsrelay_envelope_errors_total{code="history_dropped"}"#),
        1.0
    );
}

#[test]
fn history_off_says_so() {
    let mut h = Harness::plain();
    let a = h.connect("/ws?id=alice");
    h.inbox(a);
    h.say(a, json!({"type": "history", "room": "lobby"}));
    assert_eq!(only(&h.inbox(a), "error")["code"], "history_off");
    h.say(a, join_since("lobby", &json!("1")));
    let got = h.inbox(a);
    assert_eq!(only(&got, "joined")["recovered"], false);
    assert_eq!(only(&got, "joined")["last_msg_id"], Value::Null);
    h.say(a, json!({"type": "join", "room": "lobby", "since": "x1"}));
    assert_eq!(only(&h.inbox(a), "error")["code"], "invalid_since");
}

#[test]
fn history_is_refused_like_join_outside_the_tokens_rooms() {
    let secret = b"history-secret".to_vec();
    let mut h = Harness::new(AppConfig {
        room_history: 10,
        jwt_secret: Some(secret.clone()),
        ..AppConfig::default()
    });
    let exp = START_MS / 1000 + 3600;
    let claims = json!({"sub": "bob", "exp": exp, "rooms": ["lobby"]});
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(&secret),
    )
    .unwrap();
    let b = h.connect(&format!("/ws?token={token}"));
    h.inbox(b);
    h.say(b, json!({"type": "history", "room": "staff"}));
    assert_eq!(only(&h.inbox(b), "error")["code"], "forbidden");
    h.say(b, json!({"type": "history", "room": "lobby"}));
    assert_eq!(only(&h.inbox(b), "history")["room"], "lobby");
}

#[test]
fn direct_messages_never_enter_a_rooms_history() {
    // --offline-max 0: a direct message takes a position through `publish`, naming the id.
    let mut h = Harness::new(AppConfig {
        offline_max: 0,
        room_history: 10,
        ..AppConfig::default()
    });
    let a = h.connect("/ws?id=alice");
    let b = h.connect("/ws?id=bob");
    h.say(a, send("bob", json!("secret"), "c1"));
    h.inbox(b);
    h.say(a, json!({"type": "history", "room": "bob"}));
    let page = h.inbox(a).pop().unwrap();
    assert_eq!(page["messages"], json!([]));
}
