//! `--data-dir` with `--workers 2` (SPEC §13, §14): each worker keeps its home streams in a
//! log of its own (`DIR/worker-<i>`), and every durability promise of one worker holds.
//! Real processes killed with SIGKILL; ids and rooms are chosen by their home worker
//! (`wsrelay::engine::bus::home`), one homed at each, so that whichever worker the sender
//! lands on, one of its streams is stored across the bus (checked by the bus's counters).

use crate::poller_tests;
use crate::relay_support::*;
use crate::support::*;
use serde_json::{json, Value};
use std::path::Path;
use wsrelay::engine::bus::home;
use wsrelay::engine::StreamId;
use wsrelay::server::totals;

const WORKERS: usize = 2;

/// A name whose stream (`make(name)`) is homed at `worker`.
fn homed(worker: usize, prefix: &str, make: fn(&str) -> StreamId) -> String {
    (0..)
        .map(|i| format!("{prefix}{i}"))
        .find(|name| home(&make(name), WORKERS) == worker)
        .unwrap()
}

/// Two workers on `dir`, with room history and `extra`.
fn start(poller: &str, dir: &Path, extra: &[&str]) -> Server {
    let mut args = vec![
        "--workers",
        "2",
        "--data-dir",
        dir.to_str().unwrap(),
        "--room-history",
        "10",
    ];
    args.extend_from_slice(extra);
    Server::start(poller, &args)
}

fn kill_9(server: &mut Server) {
    server.signal("KILL");
    server.wait_exit(DEADLINE);
}

/// Notes the engine bus carried, both ways (a missing series fails the test).
fn bus_notes(server: &Server) -> f64 {
    let m = server.metrics();
    m.get("wsrelay_engine_bus_sent_total{from=\"0\",to=\"1\"}")
        + m.get("wsrelay_engine_bus_sent_total{from=\"1\",to=\"0\"}")
}

/// Copies the files of `from` (no subdirectories) into a new directory `to`.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

/// Reads `n` messages, which must be `payloads` with the acked msg_ids `acks`, in order.
fn expect_messages(b: &mut Client, acks: &[Value], payloads: std::ops::Range<usize>) {
    for i in payloads {
        let m = b.expect("message");
        assert_eq!(m["payload"], json!(i), "in order: {m}");
        assert_eq!(m["msg_id"], acks[i]["msg_id"], "the acked msg_id: {m}");
    }
}

/// B offline (one id homed at each worker); A sends 20 acked `queued` to each; SIGKILL;
/// restarted with the same N: each B gets its 20 in order wherever it lands, new positions are
/// above every old one, a duplicate is recognised; SIGKILL again: a `since` is served exactly,
/// and room history homed at each worker is there.
fn offline_messages_history_and_since_survive_kill_9_with_workers(poller: &str) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut server = start(poller, &data, &[]);
    let bobs = [
        homed(0, "bob", StreamId::inbox),
        homed(1, "bob", StreamId::inbox),
    ];
    let rooms = [
        homed(0, "room", StreamId::room),
        homed(1, "room", StreamId::room),
    ];
    let (mut a, welcome) = Client::connect(&server, "/ws?id=alice");
    let epoch = welcome["epoch"].as_str().unwrap().to_string();
    let before = bus_notes(&server);
    let mut acks: Vec<Vec<Value>> = Vec::new();
    for bob in &bobs {
        // Pipelined, so each home's storage thread batches them.
        for i in 0..20 {
            a.send_to(bob, json!(i), &format!("{bob}-{i}"));
        }
        let got: Vec<Value> = (0..20).map(|_| a.expect("ack")).collect();
        for (i, ack) in got.iter().enumerate() {
            assert_eq!(ack["status"], "queued", "{ack}");
            assert_eq!(ack["id"], format!("{bob}-{i}"));
        }
        acks.push(got);
    }
    let mut room_acks: Vec<Vec<Value>> = Vec::new();
    for room in &rooms {
        let got: Vec<Value> = (0..3)
            .map(|i| {
                a.send(json!({"type": "publish", "room": room, "payload": i, "id": format!("{room}-{i}")}));
                let ack = a.expect("ack");
                assert_eq!(ack["status"], "delivered", "{ack}");
                ack
            })
            .collect();
        room_acks.push(got);
    }
    // Half the streams are homed away from alice's worker: at least 20 requests and their
    // replies crossed.
    assert!(bus_notes(&server) - before >= 40.0, "the bus was used");
    let old_max = acks
        .iter()
        .chain(&room_acks)
        .flatten()
        .map(msg_id)
        .max()
        .unwrap();
    drop(a);
    kill_9(&mut server);
    assert!(data.join("worker-0").is_dir() && data.join("worker-1").is_dir());

    let mut server = start(poller, &data, &[]);
    // Each bob comes back without a since, on whichever worker: his 20, pending, in order.
    let mut a = Client::as_id(&server, "alice");
    for (bob, sent) in bobs.iter().zip(&acks) {
        let (mut b, welcome) = Client::connect(&server, &format!("/ws?id={bob}"));
        assert_eq!(
            welcome["epoch"],
            epoch.as_str(),
            "one epoch, kept: {welcome}"
        );
        assert_eq!(welcome["recovered"], true, "{welcome}");
        assert_eq!(welcome["last_msg_id"], sent[19]["msg_id"], "{welcome}");
        expect_messages(&mut b, sent, 0..20);
        // Nothing else was on its way: the marker arrives next, and its position is above
        // every position of the first run.
        let ack = a.send_acked(bob, json!("marker"), &format!("{bob}-marker"));
        assert_eq!(ack["status"], "delivered", "{ack}");
        assert!(msg_id(&ack) > old_max, "positions never go back: {ack}");
        assert_eq!(b.expect("message")["payload"], "marker", "once");
    }
    // A re-sent client id from before the restart is a duplicate, at its home's window.
    let again = a.send_acked(&bobs[1], json!(3), &format!("{}-3", bobs[1]));
    assert_eq!(again["msg_id"], acks[1][3]["msg_id"], "{again}");
    // Delivered everywhere; one more stored message at each home after that makes the
    // delivery records durable (each log is written in order).
    server.wait_for_metric("wsrelay_engine_pending_messages", 0.0);
    for worker in 0..WORKERS {
        let carol = homed(worker, "carol", StreamId::inbox);
        assert_eq!(a.send_acked(&carol, json!("sync"), "s")["status"], "queued");
    }
    drop(a);
    kill_9(&mut server);

    // Bob homed at 1 processed the 5th before the second crash: `since` with the first run's
    // epoch gets exactly what followed, and nothing comes back as pending.
    let server = start(poller, &data, &[]);
    let since = msg_id(&acks[1][4]);
    let path = format!("/ws?id={}&since={since}&epoch={epoch}", bobs[1]);
    let (mut b1, welcome) = Client::connect(&server, &path);
    assert_eq!(welcome["recovered"], true, "{welcome}");
    expect_messages(&mut b1, &acks[1], 5..20);
    assert_eq!(b1.expect("message")["payload"], "marker");
    let mut a = Client::as_id(&server, "alice");
    let ack = a.send_acked(&bobs[1], json!("next"), "next");
    assert_eq!(ack["status"], "delivered", "{ack}");
    assert_eq!(b1.expect("message")["payload"], "next", "exactly once");
    // Room history homed at each worker, across both restarts.
    let mut c = Client::as_id(&server, "carol");
    for (room, sent) in rooms.iter().zip(&room_acks) {
        c.send(json!({"type": "history", "room": room}));
        let page = c.expect("history");
        let payloads: Vec<Value> = page["messages"]
            .as_array()
            .unwrap_or_else(|| panic!("no messages in {page}"))
            .iter()
            .map(|m| m["payload"].clone())
            .collect();
        assert_eq!(payloads, [json!(0), json!(1), json!(2)], "{room}: {page}");
        assert_eq!(page["last_msg_id"], sent[2]["msg_id"], "{page}");
    }
}

/// The number of workers is part of the data: another N is refused in one line naming the
/// one it was written with, and so is a single worker's directory started with two.
fn another_number_of_workers_is_refused(poller: &str) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut server = start(poller, &data, &[]);
    let mut a = Client::as_id(&server, "alice");
    assert_eq!(a.send_acked("bob", json!(1), "x")["status"], "queued");
    let (code, stderr) = refused_to_start(
        poller,
        &["--workers", "2", "--data-dir", data.to_str().unwrap()],
    );
    assert_eq!(code, Some(1));
    assert!(stderr.contains("in use by another process"), "{stderr}");
    drop(a);
    kill_9(&mut server);
    for other in ["3", "1"] {
        let args = ["--workers", other, "--data-dir", data.to_str().unwrap()];
        let (code, stderr) = refused_to_start(poller, &args);
        assert_eq!(code, Some(1), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "one clear line: {stderr}");
        assert!(
            stderr.contains(&format!("was written with --workers 2, not {other}")),
            "{stderr}"
        );
    }
    // Refused, not changed: the same N still finds the message.
    let server = start(poller, &data, &[]);
    let (mut b, _) = Client::connect(&server, "/ws?id=bob");
    assert_eq!(b.expect("message")["payload"], 1);
    drop(server);

    // A worker's log from another store (another epoch) is refused, naming its directory.
    let other = dir.path().join("other");
    drop(start(poller, &other, &[]));
    std::fs::remove_dir_all(data.join("worker-1")).unwrap();
    copy_dir(&other.join("worker-1"), &data.join("worker-1"));
    let args = ["--workers", "2", "--data-dir", data.to_str().unwrap()];
    let (code, stderr) = refused_to_start(poller, &args);
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one clear line: {stderr}");
    assert!(
        stderr.contains("worker-1 belongs to another store"),
        "{stderr}"
    );

    let single = dir.path().join("single");
    let args = ["--workers", "1", "--data-dir", single.to_str().unwrap()];
    let mut one = Server::start(poller, &args);
    let mut a = Client::as_id(&one, "alice");
    assert_eq!(a.send_acked("bob", json!(1), "x")["status"], "queued");
    drop(a);
    kill_9(&mut one);
    let args = ["--workers", "2", "--data-dir", single.to_str().unwrap()];
    let (code, stderr) = refused_to_start(poller, &args);
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one clear line: {stderr}");
    assert!(
        stderr.contains("was written with --workers 1, not 2"),
        "{stderr}"
    );
}

/// A store that fails (the disk full) on the workers: sends homed there are rejected, and
/// /healthz of every worker says degraded until a write works again.
fn a_failing_store_degrades_every_worker(poller: &str) {
    let dir = tempfile::tempdir().unwrap();
    let switch = dir.path().join("disk-full");
    let data = dir.path().join("data");
    let server = start(
        poller,
        &data,
        &["--fail-writes-while-exists", switch.to_str().unwrap()],
    );
    let bobs = [
        homed(0, "bob", StreamId::inbox),
        homed(1, "bob", StreamId::inbox),
    ];
    let mut a = Client::as_id(&server, "alice");
    // Several scrapes, so that both workers answer some (the kernel spreads them).
    let health = |server: &Server| -> Vec<(u16, String)> {
        (0..8)
            .map(|_| {
                let r = server.get("/healthz");
                (r.status, r.body_text())
            })
            .collect()
    };
    assert!(health(&server).iter().all(|(status, _)| *status == 200));
    // Both logs have written their first batch (so worker 0's stays healthy below).
    for bob in &bobs {
        let ack = a.send_acked(bob, json!("first"), &format!("{bob}-f"));
        assert_eq!(ack["status"], "queued", "{ack}");
    }
    // Every gauge the file engine adds has a rule for the process's figure (a sum would
    // make `store_ok` read 2). The per-worker and process sections are added after the merge.
    let text = server.get("/metrics").body_text();
    let gauges: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" gauge"))
        .filter(|name| !name.starts_with("wsrelay_worker") && !name.starts_with("wsrelay_process_"))
        .collect();
    assert!(gauges.contains(&"wsrelay_engine_disk_bytes"), "{text}");
    for name in gauges {
        assert!(totals::listed(name), "{name} has no rule in totals::RULES");
    }
    assert_eq!(server.metric("wsrelay_engine_store_ok"), 1.0);

    std::fs::write(&switch, "").unwrap();
    // Only the store homed at worker 1 is written to: its fault must show on both workers.
    let ack = a.send_acked(&bobs[1], json!("lost"), "d1");
    assert_eq!(ack["status"], "rejected", "{ack}");
    for (status, body) in health(&server) {
        assert_eq!(status, 503, "{body}");
        assert!(
            body.starts_with("degraded: worker 1: writes to the data dir"),
            "{body}"
        );
    }
    std::fs::remove_file(&switch).unwrap();
    for bob in &bobs {
        let ack = a.send_acked(bob, json!("kept"), &format!("{bob}-k"));
        assert_eq!(ack["status"], "queued", "{ack}");
    }
    assert!(
        health(&server).iter().all(|(status, _)| *status == 200),
        "healthy again once a write works"
    );
    // The process's figures: writes work on every worker again (a minimum, not a sum).
    assert_eq!(server.metric("wsrelay_engine_store_ok"), 1.0);
    assert_eq!(server.metric("wsrelay_engine_store_errors_total"), 1.0);
}

poller_tests!(
    offline_messages_history_and_since_survive_kill_9_with_workers,
    another_number_of_workers_is_refused,
    a_failing_store_degrades_every_worker,
);
