//! Promises that survive a restart (SPEC §13): the file engine (`--data-dir`) against real
//! processes killed with real signals, `recovered` and epochs in both engines, and the store
//! failing under a running server.
//!
//! Every case runs on every poller: the file engine's answers reach the reactor through the
//! waker's descriptor, which each poller watches in its own way.

use crate::poller_tests;
use crate::relay_support::*;
use crate::support::*;
use serde_json::{json, Value};
use std::path::Path;
use tungstenite::Message;

/// A server on `dir` with the file engine.
fn start_file(poller: &str, dir: &Path, extra: &[&str]) -> Server {
    let mut args = vec!["--data-dir", dir.to_str().unwrap()];
    args.extend_from_slice(extra);
    Server::start(poller, &args)
}

/// SIGKILL, and wait until the process is gone (its lock on the data dir with it).
fn kill_9(server: &mut Server) {
    server.signal("KILL");
    server.wait_exit(DEADLINE);
}

/// One sample of /metrics, which must be there: a missing metric fails the test.
fn required_metric(server: &Server, sample: &str) -> f64 {
    let text = server.get("/metrics").body_text();
    text.lines()
        .find_map(|l| l.strip_prefix(sample).and_then(|v| v.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("{sample} is missing from /metrics"))
        .trim()
        .parse()
        .unwrap()
}

/// Sends `n` direct messages without waiting (pipelined, so the storage thread batches them),
/// then reads their `n` acks in order.
fn send_pipelined(a: &mut Client, to: &str, ids: std::ops::Range<usize>) -> Vec<Value> {
    for i in ids.clone() {
        a.send_to(to, json!({"n": i}), &format!("m{i}"));
    }
    ids.map(|_| a.expect("ack")).collect()
}

/// Reads `n` messages (skipping nothing: anything else fails the test).
fn messages(b: &mut Client, n: usize) -> Vec<Value> {
    (0..n).map(|_| b.expect("message")).collect()
}

/// Sends a marker from `a` to the live `b` and returns what `b` receives up to it: proves that
/// nothing else (no duplicate) was on its way.
fn up_to_marker(a: &mut Client, b: &mut Client) -> Vec<Value> {
    a.send_to("bob", json!("marker"), "marker");
    let mut got = Vec::new();
    loop {
        let m = b.expect("message");
        if m["payload"] == "marker" {
            return got;
        }
        got.push(m);
    }
}

fn two_hundred_queued_messages_survive_kill_9(poller: &str) {
    let dir = tempfile::tempdir().unwrap();
    let mut server = start_file(poller, dir.path(), &[]);
    let mut a = Client::as_id(&server, "alice");
    let acks = send_pipelined(&mut a, "bob", 0..200);
    for (i, ack) in acks.iter().enumerate() {
        assert_eq!(ack["status"], "queued", "{i}: {ack}");
        assert_eq!(ack["id"], format!("m{i}"));
    }
    // What /metrics says about the engine (SPEC §13): its kind, what it holds, its batches
    // and fsyncs, and no ack still waiting for the disk.
    assert_eq!(
        required_metric(&server, "wsrelay_engine_info{kind=\"file\"}"),
        1.0
    );
    assert_eq!(required_metric(&server, "wsrelay_engine_streams"), 1.0);
    assert_eq!(required_metric(&server, "wsrelay_engine_messages"), 200.0);
    assert_eq!(
        required_metric(&server, "wsrelay_engine_pending_messages"),
        200.0
    );
    assert!(required_metric(&server, "wsrelay_engine_bytes") > 200.0 * 96.0);
    assert_eq!(required_metric(&server, "wsrelay_engine_in_flight"), 0.0);
    let batches = required_metric(&server, "wsrelay_engine_batches_total");
    assert!(batches >= 1.0);
    assert_eq!(
        required_metric(&server, "wsrelay_engine_batch_ops_count"),
        batches
    );
    assert!(required_metric(&server, "wsrelay_engine_batch_ops_sum") >= 200.0);
    assert_eq!(
        required_metric(&server, "wsrelay_engine_fsync_seconds_count"),
        batches,
        "--fsync batch: one fsync per batch"
    );
    assert_eq!(
        required_metric(&server, "wsrelay_engine_store_errors_total"),
        0.0
    );
    kill_9(&mut server);

    let server = start_file(poller, dir.path(), &[]);
    let (mut b, welcome) = Client::connect(&server, "/ws?id=bob");
    assert_eq!(welcome["recovered"], true, "{welcome}");
    assert_eq!(welcome["last_msg_id"], acks[199]["msg_id"]);
    let got = messages(&mut b, 200);
    for (i, m) in got.iter().enumerate() {
        assert_eq!(m["payload"], json!({"n": i}), "in order");
        assert_eq!(m["msg_id"], acks[i]["msg_id"], "the acked msg_id");
    }
    let mut a = Client::as_id(&server, "alice");
    assert_eq!(up_to_marker(&mut a, &mut b), Vec::<Value>::new(), "once");
    assert_eq!(
        required_metric(&server, "wsrelay_offline_delivered_total"),
        200.0
    );
}

fn recovery_with_since_across_a_restart_is_exact(poller: &str) {
    let dir = tempfile::tempdir().unwrap();
    let mut server = start_file(poller, dir.path(), &[]);
    let mut a = Client::as_id(&server, "alice");
    let (mut b, welcome) = Client::connect(&server, "/ws?id=bob");
    let epoch = welcome["epoch"].as_str().unwrap().to_string();
    for ack in send_pipelined(&mut a, "bob", 0..10) {
        assert_eq!(ack["status"], "delivered", "{ack}");
    }
    // Their delivery records are written behind the acks: one more acked message makes them
    // durable (the log is written in order), so none of the 10 comes back as pending.
    assert_eq!(
        a.send_acked("carol", json!("sync"), "s")["status"],
        "queued"
    );
    // B processes 4 of them; then its connection is reset with the rest unread.
    let read = messages(&mut b, 4);
    let since = msg_id(&read[3]);
    drop(b);
    kill_9(&mut server);

    let server = start_file(poller, dir.path(), &[]);
    let mut a = Client::as_id(&server, "alice");
    for ack in send_pipelined(&mut a, "bob", 10..15) {
        assert_eq!(ack["status"], "queued", "{ack}");
    }
    let path = format!("/ws?id=bob&since={since}&epoch={epoch}");
    let (mut b, welcome) = Client::connect(&server, &path);
    assert_eq!(welcome["recovered"], true, "{welcome}");
    assert_eq!(
        welcome["epoch"],
        epoch.as_str(),
        "the data dir keeps its epoch"
    );
    let mut all: Vec<Value> = read.iter().map(|m| m["payload"].clone()).collect();
    all.extend(messages(&mut b, 11).iter().map(|m| m["payload"].clone()));
    assert_eq!(all, (0..15).map(|i| json!({"n": i})).collect::<Vec<_>>());
    assert_eq!(
        up_to_marker(&mut a, &mut b),
        Vec::<Value>::new(),
        "exactly once"
    );
}

fn a_since_beyond_retention_or_from_another_epoch_is_not_recovered(poller: &str) {
    // The per-id bound: 3 kept, 6 sent; B asks from the first.
    let mut server = Server::start(poller, &["--offline-max", "3"]);
    let mut a = Client::as_id(&server, "alice");
    let (mut b, welcome) = Client::connect(&server, "/ws?id=bob");
    let epoch = welcome["epoch"].as_str().unwrap().to_string();
    send_pipelined(&mut a, "bob", 0..6);
    let got = messages(&mut b, 6);
    drop(b);
    let (first, third) = (msg_id(&got[0]), msg_id(&got[2]));
    let (mut b, welcome) =
        Client::connect(&server, &format!("/ws?id=bob&since={first}&epoch={epoch}"));
    assert_eq!(
        welcome["recovered"], false,
        "2 and 3 were evicted: {welcome}"
    );
    assert_eq!(messages(&mut b, 3)[0]["payload"], json!({"n": 3}));
    drop(b);
    // From the newest evicted one, nothing is missing.
    let (mut b, welcome) =
        Client::connect(&server, &format!("/ws?id=bob&since={third}&epoch={epoch}"));
    assert_eq!(welcome["recovered"], true, "{welcome}");
    assert_eq!(messages(&mut b, 3)[0]["payload"], json!({"n": 3}));
    drop(b);
    assert_eq!(
        required_metric(&server, "wsrelay_recoveries_incomplete_total"),
        1.0
    );

    // The memory engine (with TEST_WORKERS, the engine bus over a memory engine per worker).
    let kind = match std::env::var("TEST_WORKERS").as_deref() {
        Ok(n) if n != "1" => "bus",
        _ => "memory",
    };
    assert_eq!(
        required_metric(&server, &format!("wsrelay_engine_info{{kind=\"{kind}\"}}")),
        1.0
    );
    // Another epoch: the memory engine after a restart has a new one.
    kill_9(&mut server);
    let server = Server::start(poller, &["--offline-max", "3"]);
    let last = msg_id(&got[5]);
    for path in [
        format!("/ws?id=bob&since={last}&epoch={epoch}"),
        // Without the epoch, the position alone shows it is from before this run.
        format!("/ws?id=bob&since={last}"),
    ] {
        let (_, welcome) = Client::connect(&server, &path);
        assert_eq!(welcome["recovered"], false, "{path}: {welcome}");
        assert_ne!(welcome["epoch"], epoch.as_str());
    }
}

fn a_since_older_than_the_ttl_is_not_recovered(poller: &str) {
    let server = Server::start(poller, &["--offline-ttl", "300ms"]);
    let mut a = Client::as_id(&server, "alice");
    let (mut b, welcome) = Client::connect(&server, "/ws?id=bob");
    let epoch = welcome["epoch"].as_str().unwrap().to_string();
    a.send_acked("bob", json!("old"), "m1");
    let old = msg_id(&b.expect("message"));
    drop(b);
    // Time has to pass for a TTL to pass; the wait is on the server's own count of it.
    server.wait_for_metric("wsrelay_retained_evicted_total{reason=\"ttl\"}", 1.0);
    let since = old - 1;
    let (_, welcome) = Client::connect(&server, &format!("/ws?id=bob&since={since}&epoch={epoch}"));
    assert_eq!(welcome["recovered"], false, "{welcome}");
}

fn msg_ids_after_a_restart_are_larger_in_both_engines(poller: &str) {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = ["--data-dir", dir.path().to_str().unwrap()];
    for flags in [&[][..], &data_dir[..]] {
        let mut server = Server::start(poller, flags);
        let mut a = Client::as_id(&server, "alice");
        let before = msg_id(&a.send_acked("bob", json!(1), "x1"));
        a.join("lobby", "alice");
        a.send(json!({"type": "publish", "room": "lobby", "payload": 2, "id": "x2"}));
        let before = before.max(msg_id(&a.expect("ack")));
        kill_9(&mut server);
        let server = Server::start(poller, flags);
        let mut a = Client::as_id(&server, "alice");
        let after = msg_id(&a.send_acked("bob", json!(3), "y1"));
        assert!(after > before, "{flags:?}: {after} after {before}");
    }
}

fn duplicates_are_recognised_after_a_restart(poller: &str) {
    let dir = tempfile::tempdir().unwrap();
    let mut server = start_file(poller, dir.path(), &[]);
    let mut a = Client::as_id(&server, "alice");
    let first = a.send_acked("bob", json!("once"), "same-id");
    assert_eq!(first["status"], "queued");
    kill_9(&mut server);

    let server = start_file(poller, dir.path(), &[]);
    let mut a = Client::as_id(&server, "alice");
    let again = a.send_acked("bob", json!("once"), "same-id");
    assert_eq!(again["msg_id"], first["msg_id"], "the original msg_id");
    assert_eq!(again["status"], "queued");
    assert_eq!(required_metric(&server, "wsrelay_duplicates_total"), 1.0);
    let mut b = Client::as_id(&server, "bob");
    assert_eq!(b.expect("message")["payload"], "once");
    assert_eq!(
        up_to_marker(&mut a, &mut b),
        Vec::<Value>::new(),
        "delivered once"
    );
}

fn a_failing_store_rejects_sends_and_live_traffic_goes_on(poller: &str) {
    let dir = tempfile::tempdir().unwrap();
    let switch = dir.path().join("disk-full");
    let data = dir.path().join("data");
    let server = Server::start(
        poller,
        &[
            "--data-dir",
            data.to_str().unwrap(),
            "--fail-writes-while-exists",
            switch.to_str().unwrap(),
        ],
    );
    let mut a = Client::as_id(&server, "alice");
    let mut b = Client::as_id(&server, "bob");
    a.join("lobby", "alice");
    b.join("lobby", "bob");
    assert_eq!(a.expect("presence")["id"], "bob");
    assert_eq!(required_metric(&server, "wsrelay_engine_store_ok"), 1.0);

    std::fs::write(&switch, "").unwrap();
    let ack = a.send_acked("bob", json!("lost"), "d1");
    assert_eq!(ack["status"], "rejected", "{ack}");
    assert_eq!(
        ack["reason"],
        "the server could not store the message; try again later"
    );
    assert!(ack["msg_id"].is_null());
    assert_eq!(required_metric(&server, "wsrelay_engine_store_ok"), 0.0);
    assert_eq!(
        required_metric(&server, "wsrelay_store_rejections_total"),
        1.0
    );
    // Live traffic that needs no storage goes on: room messages, echo, HTTP.
    a.send(json!({"type": "publish", "room": "lobby", "payload": "live", "id": "r1"}));
    assert_eq!(a.expect("ack")["status"], "delivered");
    assert_eq!(
        b.expect("message")["payload"],
        "live",
        "not the rejected one"
    );
    let mut echo = server.ws("/echo");
    echo.send(Message::text("ping")).unwrap();
    assert_eq!(echo.read().unwrap(), Message::text("ping"));
    // A load balancer should send clients elsewhere while sends are rejected here.
    let health = server.get("/healthz");
    assert_eq!(health.status, 503);
    assert!(
        // With workers, the line names the worker first ("degraded: worker 1: writes ...").
        health.body_text().starts_with("degraded: ")
            && health.body_text().contains("writes to the data dir"),
        "{}",
        health.body_text()
    );

    std::fs::remove_file(&switch).unwrap();
    // The same client id again: a retry of a rejected message is a new message.
    let ack = a.send_acked("bob", json!("kept"), "d1");
    assert_eq!(ack["status"], "delivered", "{ack}");
    assert_eq!(b.expect("message")["payload"], "kept");
    assert_eq!(required_metric(&server, "wsrelay_engine_store_ok"), 1.0);
    assert_eq!(server.get("/healthz").status, 200, "healthy again");
    assert_eq!(
        required_metric(&server, "wsrelay_engine_store_state_changes_total"),
        2.0
    );
}

fn a_data_dir_in_use_or_unusable_is_refused_and_a_new_one_created(poller: &str) {
    let dir = tempfile::tempdir().unwrap();
    let fresh = dir.path().join("new/data");
    let first = start_file(poller, &fresh, &[]);
    assert!(fresh.join("LOCK").exists(), "created");
    let (code, stderr) = refused_to_start(poller, &["--data-dir", fresh.to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert_eq!(stderr.lines().count(), 1, "one clear line: {stderr}");
    assert!(stderr.contains("in use by another process"), "{stderr}");
    drop(first);

    let plain = dir.path().join("plain");
    std::fs::write(&plain, "not a directory").unwrap();
    let (code, stderr) = refused_to_start(poller, &["--data-dir", plain.to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert_eq!(stderr.lines().count(), 1, "one clear line: {stderr}");
    assert!(stderr.contains("data dir: cannot use"), "{stderr}");
}

poller_tests!(
    two_hundred_queued_messages_survive_kill_9,
    recovery_with_since_across_a_restart_is_exact,
    a_since_beyond_retention_or_from_another_epoch_is_not_recovered,
    a_since_older_than_the_ttl_is_not_recovered,
    msg_ids_after_a_restart_are_larger_in_both_engines,
    duplicates_are_recognised_after_a_restart,
    a_failing_store_rejects_sends_and_live_traffic_goes_on,
    a_data_dir_in_use_or_unusable_is_refused_and_a_new_one_created,
);
