//! The `/ws` envelope protocol end to end (SPEC §6): direct messages with acks, presence,
//! multi-device, the subprotocol, and every bad-input case.

use crate::poller_tests;
use crate::relay_support::*;
use crate::support::*;
use serde_json::{json, Value};
use tungstenite::client::IntoClientRequest;
use tungstenite::Message;

fn a_and_b_talk_both_ways_with_acks_and_presence(poller: &str) {
    let server = Server::start(poller, &[]);
    let (mut a, mut welcome) = Client::connect(&server, "/ws?id=alice");
    let epoch = welcome["epoch"].take();
    assert!(epoch.as_str().is_some_and(|e| e.len() == 16), "{epoch}");
    assert_eq!(
        welcome,
        json!({"type": "welcome", "id": "alice", "last_msg_id": null, "epoch": null, "recovered": true})
    );
    let mut b = Client::as_id(&server, "bob");

    let ack = a.send_acked("bob", json!({"text": "hi bob", "n": [1, 2.50]}), "a1");
    assert_eq!(
        (ack["id"].as_str(), ack["status"].as_str()),
        (Some("a1"), Some("delivered"))
    );
    let m = b.expect("message");
    assert_eq!(m["msg_id"], ack["msg_id"]);
    assert_eq!(
        (m["from"].as_str(), m["to"].as_str()),
        (Some("alice"), Some("bob"))
    );
    assert_eq!(m["room"], Value::Null);
    assert_eq!(m["payload"], json!({"text": "hi bob", "n": [1, 2.50]}));
    assert!(m["timestamp"].as_u64().unwrap() > 1_600_000_000_000);

    let back = b.send_acked("alice", json!("hi alice"), "b1");
    assert_eq!(back["status"], "delivered");
    assert!(
        back["msg_id"].as_str().unwrap().parse::<u64>().unwrap()
            > ack["msg_id"].as_str().unwrap().parse::<u64>().unwrap()
    );
    assert_eq!(a.expect("message")["payload"], "hi alice");

    // Presence: each member hears the others come and go.
    a.join("lobby", "alice");
    b.join("lobby", "bob");
    assert_eq!(
        a.expect("presence"),
        json!({"type": "presence", "room": "lobby", "id": "bob", "event": "join"})
    );
    b.send(json!({"type": "publish", "room": "lobby", "payload": "to the room", "id": "b2"}));
    assert_eq!(b.expect("ack")["status"], "delivered");
    let m = a.expect("message");
    assert_eq!(
        (m["room"].as_str(), m["to"].clone()),
        (Some("lobby"), Value::Null)
    );
    b.send(json!({"type": "leave", "room": "lobby"}));
    assert_eq!(b.expect("presence")["event"], "leave");
    assert_eq!(a.expect("presence")["event"], "leave");
    b.join("lobby", "bob");
    assert_eq!(a.expect("presence")["event"], "join");
    b.ws.close(None).unwrap();
    assert_eq!(
        a.expect("presence"),
        json!({"type": "presence", "room": "lobby", "id": "bob", "event": "leave"})
    );
    assert_eq!(server.metric("wsrelay_direct_messages_total"), 2.0);
}

fn every_device_of_an_id_receives_direct_messages(poller: &str) {
    let server = Server::start(poller, &[]);
    let mut a = Client::as_id(&server, "alice");
    let mut phone = Client::as_id(&server, "bob");
    let mut laptop = Client::as_id(&server, "bob");
    assert_eq!(a.send_acked("bob", json!(1), "m1")["status"], "delivered");
    assert_eq!(phone.expect("message")["payload"], 1);
    assert_eq!(laptop.expect("message")["payload"], 1);
    assert_eq!(server.metric("wsrelay_ids_online"), 2.0);
}

fn subprotocol_is_confirmed_when_offered(poller: &str) {
    let server = Server::start(poller, &[]);
    let mut request = server.url("/ws?id=alice").into_client_request().unwrap();
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        "chat, wsrelay.v1".parse().unwrap(),
    );
    let (_ws, response) = tungstenite::client(request, server.tcp()).unwrap();
    assert_eq!(
        response.headers().get("Sec-WebSocket-Protocol").unwrap(),
        "wsrelay.v1"
    );
    let (_ws, response) = tungstenite::client(server.url("/ws?id=alice"), server.tcp()).unwrap();
    assert!(response.headers().get("Sec-WebSocket-Protocol").is_none());
}

fn bad_input_gets_an_error_and_the_connection_stays_open(poller: &str) {
    let server = Server::start(poller, &[]);
    let mut a = Client::as_id(&server, "alice");
    let mut b = Client::as_id(&server, "bob");
    let long = "x".repeat(129);
    let long_room = "r".repeat(65);
    let cases: Vec<(&str, Message, &str)> = vec![
        (
            "malformed JSON",
            Message::text("{\"type\": "),
            "malformed_json",
        ),
        ("not an object", Message::text("[1,2]"), "invalid_field"),
        (
            "unknown type",
            Message::text(r#"{"type":"shout"}"#),
            "unknown_type",
        ),
        ("no type", Message::text(r#"{"to":"bob"}"#), "missing_field"),
        (
            "send without payload",
            Message::text(r#"{"type":"send","to":"bob"}"#),
            "missing_field",
        ),
        (
            "join without room",
            Message::text(r#"{"type":"join"}"#),
            "missing_field",
        ),
        (
            "recipient id too long",
            Message::text(format!(r#"{{"type":"send","to":"{long}","payload":1}}"#)),
            "id_too_long",
        ),
        (
            "client id too long",
            Message::text(format!(
                r#"{{"type":"send","to":"bob","payload":1,"id":"{long}"}}"#
            )),
            "id_too_long",
        ),
        (
            "room too long",
            Message::text(format!(r#"{{"type":"join","room":"{long_room}"}}"#)),
            "room_too_long",
        ),
        (
            "bad room name",
            Message::text(r#"{"type":"publish","room":"no spaces","payload":1}"#),
            "invalid_room",
        ),
        (
            "binary frame",
            Message::binary(b"{}".to_vec()),
            "binary_not_supported",
        ),
    ];
    for (i, (name, message, code)) in cases.into_iter().enumerate() {
        a.ws.send(message).unwrap();
        let error = a.expect("error");
        assert_eq!(error["code"], code, "{name}: {error}");
        assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));
        // The connection is still open and usable.
        let ack = a.send_acked("bob", json!(name), &format!("ok{i}"));
        assert_eq!(ack["status"], "delivered", "{name}");
        assert_eq!(b.expect("message")["payload"], name);
    }
    assert_eq!(
        server.metric("wsrelay_envelope_errors_total{code=\"missing_field\"}"),
        3.0
    );
}

fn refusals_before_the_upgrade_say_why(poller: &str) {
    let server = Server::start(poller, &[]);
    let long_id = "i".repeat(129);
    let cases: Vec<(String, u16, &str)> = vec![
        ("/ws".into(), 400, "?id="),
        (format!("/ws?id={long_id}"), 400, "128"),
        ("/ws?id=a&since=yesterday".into(), 400, "since"),
        ("/r/".into(), 400, "room names"),
        (format!("/r/{}", "r".repeat(65)), 400, "64"),
        ("/r/a%2Fb".into(), 400, "room names"),
        ("/r/a/b".into(), 404, "no such endpoint"),
        ("/chat".into(), 404, "no such endpoint"),
    ];
    for (target, status, fragment) in cases {
        let (got, body) = upgrade_status(&server, &target, "");
        assert_eq!(got, status, "{target}: {body}");
        assert!(body.contains(fragment), "{target}: {body}");
    }
    // A plain GET on a relay endpoint: 426, it speaks WebSocket.
    assert_eq!(server.get("/r/lobby").status, 426);
    assert_eq!(server.get("/ws?id=a").status, 426);
}

poller_tests!(
    a_and_b_talk_both_ways_with_acks_and_presence,
    every_device_of_an_id_receives_direct_messages,
    subprotocol_is_confirmed_when_offered,
    bad_input_gets_an_error_and_the_connection_stays_open,
    refusals_before_the_upgrade_say_why,
);
