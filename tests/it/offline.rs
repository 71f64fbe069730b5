//! Offline delivery, its bounds, duplicate suppression and recovery with `?since=` (SPEC §6;
//! docs/protocol.md "Offline delivery and retention", "Recovery", "Duplicates").

use crate::poller_tests;
use crate::relay_support::*;
use crate::support::*;
use serde_json::{json, Value};

fn ten_queued_then_one_live_arrive_in_order(poller: &str) {
    let server = Server::start(poller, &[]);
    let mut a = Client::as_id(&server, "alice");
    let mut last = Value::Null;
    for i in 0..10 {
        let ack = a.send_acked("bob", json!({"n": i}), &format!("m{i}"));
        assert_eq!(ack["status"], "queued", "{ack}");
        last = ack["msg_id"].clone();
    }
    let (mut b, welcome) = Client::connect(&server, "/ws?id=bob");
    assert_eq!(
        welcome["last_msg_id"], last,
        "the welcome names the newest retained msg_id"
    );
    assert_eq!(
        a.send_acked("bob", json!({"n": 10}), "m10")["status"],
        "delivered"
    );
    let mut previous = 0;
    for i in 0..=10 {
        let m = b.expect("message");
        assert_eq!(m["payload"], json!({"n": i}));
        assert!(msg_id(&m) > previous);
        previous = msg_id(&m);
    }
    assert_eq!(server.metric("wsrelay_offline_queued_total"), 10.0);
    assert_eq!(server.metric("wsrelay_offline_delivered_total"), 10.0);
}

fn queued_messages_expire_after_the_ttl(poller: &str) {
    let server = Server::start(poller, &["--offline-ttl", "200ms"]);
    let mut a = Client::as_id(&server, "alice");
    assert_eq!(
        a.send_acked("bob", json!("stale"), "m1")["status"],
        "queued"
    );
    // Time has to pass for a TTL to pass; the wait is on the server's own count of it.
    server.wait_for_metric("wsrelay_offline_expired_total", 1.0);
    let mut b = Client::as_id(&server, "bob");
    a.send_acked("bob", json!("fresh"), "m2");
    assert_eq!(
        b.expect("message")["payload"],
        "fresh",
        "the expired one is gone"
    );
}

fn the_per_id_bound_refuses_beyond_it(poller: &str) {
    let server = Server::start(poller, &["--offline-max", "3"]);
    let mut a = Client::as_id(&server, "alice");
    let statuses: Vec<Value> = (0..5)
        .map(|i| a.send_acked("bob", json!(i), &format!("m{i}"))["status"].clone())
        .collect();
    assert_eq!(
        statuses,
        vec!["queued", "queued", "queued", "rejected", "rejected"]
    );
    let mut b = Client::as_id(&server, "bob");
    a.send_acked("bob", json!("live"), "m5");
    let got: Vec<Value> = (0..4)
        .map(|_| b.expect("message")["payload"].clone())
        .collect();
    assert_eq!(got, vec![json!(0), json!(1), json!(2), json!("live")]);
    assert_eq!(
        server.metric("wsrelay_offline_dropped_total{reason=\"queue_full\"}"),
        2.0
    );
}

fn a_duplicate_client_id_is_not_delivered_twice(poller: &str) {
    let server = Server::start(poller, &[]);
    let mut a = Client::as_id(&server, "alice");
    let first = a.send_acked("bob", json!("once"), "same-id");
    assert_eq!(first["status"], "queued");
    // The sender loses its connection and retries after reconnecting.
    drop(a);
    let mut a = Client::as_id(&server, "alice");
    assert_eq!(a.send_acked("bob", json!("once"), "same-id"), first);
    let mut b = Client::as_id(&server, "bob");
    assert_eq!(b.expect("message")["payload"], "once");
    a.send_acked("bob", json!("next"), "other-id");
    assert_eq!(
        b.expect("message")["payload"],
        "next",
        "no second copy in between"
    );
    assert_eq!(server.metric("wsrelay_duplicates_total"), 1.0);
}

fn recovery_after_a_reset_connection_with_since(poller: &str) {
    let server = Server::start(poller, &[]);
    let mut a = Client::as_id(&server, "alice");
    let mut b = Client::as_id(&server, "bob");
    for i in 0..5 {
        a.send_acked("bob", json!(i), &format!("m{i}"));
    }
    // B reads two, then its connection dies without a close frame, unread messages and all
    // (closing a socket with unread input makes the kernel send a reset).
    let mut last_seen = 0;
    for i in 0..2 {
        let m = b.expect("message");
        assert_eq!(m["payload"], i);
        last_seen = msg_id(&m);
    }
    drop(b);
    // A keeps sending while the server may or may not have noticed yet.
    for i in 5..10 {
        let status = a.send_acked("bob", json!(i), &format!("m{i}"))["status"].clone();
        assert!(status == "delivered" || status == "queued", "{status}");
    }
    let (mut b, _) = Client::connect(&server, &format!("/ws?id=bob&since={last_seen}"));
    a.send_acked("bob", json!("live"), "m10");
    let got: Vec<Value> = (0..9)
        .map(|_| b.expect("message")["payload"].clone())
        .collect();
    let mut expected: Vec<Value> = (2..10).map(|i| json!(i)).collect();
    expected.push(json!("live"));
    assert_eq!(got, expected, "every message exactly once, in order");
}

poller_tests!(
    ten_queued_then_one_live_arrive_in_order,
    queued_messages_expire_after_the_ttl,
    the_per_id_bound_refuses_beyond_it,
    a_duplicate_client_id_is_not_delivered_twice,
    recovery_after_a_reset_connection_with_since,
);
