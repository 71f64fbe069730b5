//! The file engine against a real directory: what survives a reopen, torn tails, reclaiming
//! space, the fault switch and the lock. Each test waits for the storage thread with a bounded
//! `settle`, never a sleep.

use super::*;
use crate::engine::Recovery;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

const TTL_MS: u64 = 60_000;
const SETTLE: Duration = Duration::from_secs(10);

fn config(dir: &Path) -> FileConfig {
    FileConfig {
        dir: dir.to_path_buf(),
        fsync: FsyncPolicy::Batch,
        segment_bytes: SEGMENT_BYTES,
        limits: Limits {
            per_stream: 1000,
            ttl_ms: TTL_MS,
            max_bytes: 64 << 20,
        },
        dedup_window: 64,
        dedup_idle: Duration::from_secs(60),
        dedup_max_bytes: 64 << 20,
        fault: StoreFault::Off,
        room_history: Limits {
            per_stream: 0,
            ttl_ms: 0,
            max_bytes: 0,
        },
    }
}

fn at(unix_ms: u64) -> Now {
    Now {
        instant: Instant::now(),
        unix_ms,
    }
}

/// A wake that counts, so tests can see that the storage thread used it.
fn counter() -> (Wake, Arc<AtomicUsize>) {
    let n = Arc::new(AtomicUsize::new(0));
    let m = Arc::clone(&n);
    (Arc::new(move || _ = m.fetch_add(1, Ordering::SeqCst)), n)
}

fn open(config: FileConfig, unix_ms: u64) -> FileEngine {
    FileEngine::open(config, counter().0, at(unix_ms)).unwrap()
}

fn append(to: &str, client_id: Option<&str>, body: &str) -> Append {
    Append {
        stream: StreamId::inbox(to),
        sender: Rc::from("alice"),
        client_id: client_id.map(Rc::from),
        body: Rc::from(body.as_bytes()),
    }
}

/// Waits for everything submitted, then returns the completions.
fn settle(e: &mut FileEngine) -> Vec<Completion> {
    assert!(
        e.settle(SETTLE),
        "the storage thread did not answer in time"
    );
    completions(e)
}

/// What is ready now; the local engines produce no `Arrived` and no `Presence`.
fn completions(e: &mut FileEngine) -> Vec<Completion> {
    let mut out = Vec::new();
    e.poll(&mut out);
    out.into_iter()
        .map(|event| match event {
            Event::Completed(c) => c,
            Event::Arrived(a) => panic!("a local engine produced {a:?}"),
            Event::Presence(p) => panic!("a local engine produced {p:?}"),
            Event::Interrupted(s) => panic!("a local engine interrupted {s:?}"),
        })
        .collect()
}

fn publish(client_id: Option<&str>) -> Publish {
    Publish {
        room: Rc::from("lobby"),
        sender: Rc::from("alice"),
        client_id: client_id.map(Rc::from),
        body: Rc::from(&b"{}"[..]),
        keep: true,
    }
}

fn stored(c: &Completion) -> Position {
    match c.outcome {
        Outcome::Stored { position } => position,
        ref other => panic!("expected Stored, got {other:?}"),
    }
}

/// Appends `n` messages to bob and returns their positions, all stored.
fn send_n(e: &mut FileEngine, n: usize, now: u64) -> Vec<Position> {
    for i in 0..n {
        e.append(
            Ticket(i as u64),
            append("bob", None, &format!("m{i}")),
            at(now),
        );
    }
    let done = settle(e);
    assert_eq!(done.len(), n);
    let tickets: Vec<u64> = done.iter().map(|c| c.ticket.0).collect();
    assert_eq!(
        tickets,
        (0..n as u64).collect::<Vec<_>>(),
        "completions in order"
    );
    done.iter().map(stored).collect()
}

fn recover(e: &mut FileEngine, since: Option<Since>, now: u64) -> Recovery {
    e.recover(Ticket(999), &StreamId::inbox("bob"), since, at(now));
    let mut done = settle(e);
    match done.pop().map(|c| c.outcome) {
        Some(Outcome::Recovered(r)) => r,
        other => panic!("expected Recovered, got {other:?}"),
    }
}

fn bodies(r: &Recovery) -> Vec<String> {
    r.messages
        .iter()
        .map(|m| String::from_utf8_lossy(&m.body).into_owned())
        .collect()
}

#[test]
fn a_fresh_directory_is_created_and_stored_means_written() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("a/b");
    let (wake, woken) = counter();
    let mut e = FileEngine::open(config(&dir), wake, at(1_000)).unwrap();
    assert!(dir.join("LOCK").exists());
    e.append(Ticket(1), append("bob", None, "hi"), at(1_000));
    let out = completions(&mut e);
    assert!(out.is_empty() || matches!(out[0].outcome, Outcome::Stored { .. }));
    assert_eq!(e.in_flight() + out.len(), 1);
    let done = settle(&mut e);
    assert_eq!(out.len() + done.len(), 1);
    // The thread wakes the reactor right after it queued its answer.
    let start = Instant::now();
    while woken.load(Ordering::SeqCst) == 0 {
        assert!(start.elapsed() < SETTLE, "the reactor was never woken");
        std::thread::yield_now();
    }
    assert!(e.disk_bytes() > 0);
}

#[test]
fn reopening_keeps_everything_acked_with_pending_flags_and_increasing_positions() {
    let tmp = tempfile::tempdir().unwrap();
    let (first, epoch) = {
        let mut e = open(config(tmp.path()), 1_000);
        let p = send_n(&mut e, 5, 1_000);
        e.delivered(&StreamId::inbox("bob"), &p[..2]);
        (p, e.epoch())
    };
    let mut e = open(config(tmp.path()), 2_000);
    assert_eq!(e.epoch(), epoch, "the epoch lives with the data");
    // Without since: only the three still pending.
    let r = recover(&mut e, None, 2_000);
    assert_eq!(bodies(&r), ["m2", "m3", "m4"]);
    assert_eq!(r.last, Some(first[4]));
    // With since from before the restart, same epoch: complete.
    let since = Since {
        position: first[0],
        epoch: Some(epoch),
    };
    let r = recover(&mut e, Some(since), 2_000);
    assert!(r.recovered);
    assert_eq!(bodies(&r), ["m1", "m2", "m3", "m4"]);
    // Positions after the restart are above every one before it, even with the clock behind.
    let mut e2 = {
        drop(e);
        open(config(tmp.path()), 0)
    };
    let after = send_n(&mut e2, 1, 0);
    assert!(after[0] > first[4]);
}

#[test]
fn duplicates_survive_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let original = {
        let mut e = open(config(tmp.path()), 1_000);
        e.append(Ticket(1), append("bob", Some("c-1"), "once"), at(1_000));
        e.publish(Ticket(2), publish(Some("c-2")), at(1_000));
        let done = settle(&mut e);
        (stored(&done[0]), stored(&done[1]))
    };
    let mut e = open(config(tmp.path()), 2_000);
    e.append(Ticket(3), append("bob", Some("c-1"), "once"), at(2_000));
    e.publish(Ticket(4), publish(Some("c-2")), at(2_000));
    let done = settle(&mut e);
    assert!(matches!(
        done[0].outcome,
        Outcome::Duplicate { position, status: AckStatus::Queued } if position == original.0
    ));
    assert!(matches!(
        done[1].outcome,
        Outcome::Duplicate { position, status: AckStatus::Delivered } if position == original.1
    ));
    assert_eq!(
        bodies(&recover(&mut e, None, 2_000)),
        ["once"],
        "stored once"
    );
}

#[test]
fn a_torn_tail_is_cut_and_nothing_acked_is_lost() {
    let tmp = tempfile::tempdir().unwrap();
    let positions = {
        let mut e = open(config(tmp.path()), 1_000);
        send_n(&mut e, 3, 1_000)
    };
    // A crash in the middle of the next batch's write: half a record at the end of the newest
    // segment that holds data.
    let newest = segment_ids(tmp.path()).unwrap().into_iter().max().unwrap();
    let path = journal::segment_path(tmp.path(), newest);
    let mut half = Vec::new();
    Record::Append {
        stream: StreamId::inbox("bob"),
        position: Position(positions[2].0 + 1),
        expires_ms: u64::MAX,
        pending: true,
        sender: "alice".into(),
        client_id: None,
        body: b"never acked".to_vec(),
    }
    .encode(&mut half);
    let whole = fs::read(&path).unwrap();
    let torn = half.len() / 2;
    fs::write(&path, [&whole[..], &half[..torn]].concat()).unwrap();

    let mut e = open(config(tmp.path()), 2_000);
    assert_eq!(e.stats.torn_bytes, torn as u64);
    assert_eq!(
        fs::read(&path).unwrap(),
        whole,
        "cut back to the last whole record"
    );
    let r = recover(&mut e, None, 2_000);
    assert_eq!(bodies(&r), ["m0", "m1", "m2"]);
    // And the log goes on working: write, reopen, read.
    send_n(&mut e, 1, 2_000);
    drop(e);
    let mut e = open(config(tmp.path()), 3_000);
    assert_eq!(recover(&mut e, None, 3_000).messages.len(), 4);
}

#[test]
fn damage_before_the_newest_segment_refuses_to_start() {
    let tmp = tempfile::tempdir().unwrap();
    drop(open(config(tmp.path()), 1_000));
    drop(open(config(tmp.path()), 1_000)); // a second segment
    let oldest = segment_ids(tmp.path()).unwrap()[0];
    let path = journal::segment_path(tmp.path(), oldest);
    let mut bytes = fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    fs::write(&path, bytes).unwrap();
    let err = FileEngine::open(config(tmp.path()), counter().0, at(1_000))
        .err()
        .unwrap();
    assert!(matches!(err, OpenError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("damaged"), "{err}");
}

#[test]
fn ttl_and_bounds_reclaim_disk_space() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = config(tmp.path());
    c.segment_bytes = 4096;
    let mut e = open(c.clone(), 1_000);
    let body = "x".repeat(200);
    for i in 0..200 {
        e.append(
            Ticket(i),
            append(&format!("id{}", i % 7), None, &body),
            at(1_000),
        );
        settle(&mut e);
    }
    let full = e.disk_bytes();
    assert!(e.segments().len() > 5, "rotated: {:?}", e.segments());
    // Everything expires; maintenance compacts the sealed segments away one at a time.
    let later = 1_000 + TTL_MS;
    for _ in 0..100 {
        e.maintain(at(later));
        settle(&mut e);
    }
    assert_eq!(e.mem.streams.messages(), 0);
    assert_eq!(e.mem.streams.removed.expired_pending, 200);
    assert!(e.stats.compactions > 0);
    assert!(e.segments().len() <= 2, "left: {:?}", e.segments());
    assert!(
        e.disk_bytes() < full / 10,
        "{} of {full} bytes left",
        e.disk_bytes()
    );
    drop(e);
    // Nothing comes back, and what was lost is known to be lost.
    let mut e = open(c, later);
    assert_eq!(e.mem.streams.messages(), 0);
    let r = recover(
        &mut e,
        Some(Since {
            position: Position(1),
            epoch: None,
        }),
        later,
    );
    assert!(!r.recovered);
}

#[test]
fn compaction_keeps_live_messages_and_their_flags() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = config(tmp.path());
    c.segment_bytes = 2048;
    c.limits.per_stream = 3;
    let mut e = open(c.clone(), 1_000);
    let body = "y".repeat(100);
    // carol's three stay (one delivered); bob's stream churns through the per-stream bound,
    // so the old segments are mostly dead.
    for i in 0..3 {
        e.append(
            Ticket(i),
            append("carol", None, &format!("c{i}")),
            at(1_000),
        );
    }
    let carol = settle(&mut e);
    e.delivered(&StreamId::inbox("carol"), &[stored(&carol[0])]);
    for i in 0..60 {
        e.append(Ticket(i), append("bob", None, &body), at(1_000));
        let done = settle(&mut e);
        e.delivered(&StreamId::inbox("bob"), &[stored(&done[0])]);
    }
    let before = e.segments();
    for _ in 0..50 {
        e.maintain(at(1_000));
        settle(&mut e);
    }
    assert!(e.stats.compactions > 0);
    assert!(e.segments()[0] > before[0], "the oldest segments are gone");
    drop(e);
    let mut e = open(c, 1_000);
    let carol = StreamId::inbox("carol");
    e.recover(Ticket(1), &carol, None, at(1_000));
    let Some(Outcome::Recovered(r)) = settle(&mut e).pop().map(|c| c.outcome) else {
        panic!()
    };
    assert_eq!(
        bodies(&r),
        ["c1", "c2"],
        "pending ones only: c0 was delivered"
    );
    assert_eq!(e.mem.streams.messages(), 3 + 3);
    // bob lost messages to the bound: a since from the start is not complete.
    let r = recover(
        &mut e,
        Some(Since {
            position: Position(1),
            epoch: None,
        }),
        1_000,
    );
    assert!(!r.recovered);
    assert_eq!(r.messages.len(), 3);
}

#[test]
fn the_fault_switch_rejects_sends_and_the_engine_recovers() {
    let tmp = tempfile::tempdir().unwrap();
    let flag = Arc::new(AtomicBool::new(false));
    let mut c = config(tmp.path());
    c.fault = StoreFault::Flag(Arc::clone(&flag));
    let mut e = open(c.clone(), 1_000);
    send_n(&mut e, 1, 1_000);

    flag.store(true, Ordering::SeqCst);
    e.append(Ticket(1), append("bob", Some("c-9"), "lost"), at(1_000));
    let done = settle(&mut e);
    assert!(
        matches!(&done[0].outcome, Outcome::Rejected(Refusal::Store(e)) if e.contains("space")),
        "{:?}",
        done[0].outcome
    );
    assert_eq!(e.mem.streams.messages(), 1, "taken back out of the index");
    let mut metrics = String::new();
    e.render_metrics(&mut metrics);
    assert!(metrics.contains("wsrelay_engine_store_ok 0\n"), "{metrics}");
    assert!(metrics.contains("wsrelay_engine_store_errors_total 1\n"));

    flag.store(false, Ordering::SeqCst);
    // A retry with the same client id is a new message, not a duplicate of the failed one.
    e.append(Ticket(2), append("bob", Some("c-9"), "kept"), at(1_000));
    let done = settle(&mut e);
    stored(&done[0]);
    let mut metrics = String::new();
    e.render_metrics(&mut metrics);
    assert!(metrics.contains("wsrelay_engine_store_ok 1\n"));
    assert!(metrics.contains("wsrelay_engine_store_state_changes_total 2\n"));
    drop(e);
    let mut e = open(c, 1_000);
    assert_eq!(bodies(&recover(&mut e, None, 1_000)), ["m0", "kept"]);
}

#[test]
fn a_directory_held_by_another_engine_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let _first = open(config(tmp.path()), 1_000);
    let err = FileEngine::open(config(tmp.path()), counter().0, at(1_000))
        .err()
        .unwrap();
    assert!(matches!(err, OpenError::Locked { .. }));
    assert!(
        err.to_string().contains("in use by another process"),
        "{err}"
    );
}

#[test]
fn a_path_that_cannot_be_a_directory_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("plain");
    fs::write(&file, "not a directory").unwrap();
    let err = FileEngine::open(config(&file.join("data")), counter().0, at(1_000))
        .err()
        .unwrap();
    assert!(matches!(err, OpenError::Access { .. }), "{err}");
    assert!(err.to_string().starts_with("data dir: cannot use"), "{err}");
}

#[test]
fn fsync_always_writes_one_batch_per_op() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = config(tmp.path());
    c.fsync = FsyncPolicy::Always;
    let mut e = open(c, 1_000);
    send_n(&mut e, 20, 1_000);
    assert_eq!(e.stats.batches, 20);
    assert_eq!(e.stats.fsync_seconds.count(), 20);
}

#[test]
fn work_that_needs_no_disk_waits_its_turn() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = config(tmp.path());
    c.limits.per_stream = 1;
    let mut e = open(c, 1_000);
    e.append(Ticket(1), append("bob", None, "first"), at(1_000));
    e.append(
        Ticket(2),
        append("bob", None, "refused: full of pending"),
        at(1_000),
    );
    e.recover(Ticket(3), &StreamId::inbox("bob"), None, at(1_000));
    let done = settle(&mut e);
    let tickets: Vec<u64> = done.iter().map(|c| c.ticket.0).collect();
    assert_eq!(tickets, [1, 2, 3]);
    assert!(matches!(done[1].outcome, Outcome::Rejected(Refusal::Full)));
    let Outcome::Recovered(r) = &done[2].outcome else {
        panic!()
    };
    assert_eq!(
        bodies(r),
        ["first"],
        "the recover saw what was stored before it"
    );
}

#[test]
fn recovery_leaves_out_what_is_not_stored_yet() {
    let tmp = tempfile::tempdir().unwrap();
    let mut e = open(config(tmp.path()), 1_000);
    let first = send_n(&mut e, 1, 1_000);
    // Computed with nothing in flight, then a message in flight: the recovery does not include
    // it, and it completes after.
    e.recover(Ticket(1), &StreamId::inbox("bob"), None, at(1_000));
    e.append(Ticket(2), append("bob", None, "later"), at(1_000));
    let mut out = completions(&mut e);
    out.extend(settle(&mut e));
    let Outcome::Recovered(r) = &out[0].outcome else {
        panic!()
    };
    assert_eq!(bodies(r), ["m0"]);
    assert_eq!(r.last, Some(first[0]));
    assert_eq!(out[1].ticket, Ticket(2));
}

/// Carol's three big messages fill segment 1 and are delivered; their delivery record and bob's
/// traffic (each message delivered) fill newer segments, which are mostly dead. Compacting one
/// of those would drop carol's delivery record while her messages still say pending in
/// segment 1: only the oldest segment is ever compacted.
#[test]
fn compaction_never_drops_a_delivery_record_of_an_older_segment() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = config(tmp.path());
    c.segment_bytes = 2048;
    c.limits.per_stream = 3;
    let mut e = open(c.clone(), 1_000);
    let carol = StreamId::inbox("carol");
    let big = "c".repeat(700);
    let mut sent = Vec::new();
    for i in 0..3 {
        e.append(Ticket(i), append("carol", None, &big), at(1_000));
        sent.push(stored(&settle(&mut e)[0]));
    }
    e.delivered(&carol, &sent);
    let body = "y".repeat(100);
    for i in 0..60 {
        e.append(Ticket(i), append("bob", None, &body), at(1_000));
        let done = settle(&mut e);
        e.delivered(&StreamId::inbox("bob"), &[stored(&done[0])]);
    }
    for _ in 0..50 {
        e.maintain(at(1_000));
        settle(&mut e);
    }
    assert_eq!(e.segments()[0], 1, "segment 1 is mostly live and stays");
    assert_eq!(e.mem.streams.pending(), 0);
    drop(e);
    let mut e = open(c.clone(), 1_000);
    assert_eq!(
        e.mem.streams.pending(),
        0,
        "delivered messages came back as pending after a restart"
    );
    // Three small messages evict carol's big ones (bound 3): now segment 1 is dead, and
    // compaction works its way forward.
    let mut small = Vec::new();
    for i in 0..3 {
        e.append(Ticket(i), append("carol", None, "s"), at(1_000));
        small.push(stored(&settle(&mut e)[0]));
    }
    e.delivered(&carol, &small);
    for _ in 0..50 {
        e.maintain(at(1_000));
        settle(&mut e);
    }
    assert!(e.stats.compactions > 0, "nothing was compacted");
    assert!(!e.segments().contains(&1), "segment 1 was not reclaimed");
    drop(e);

    let mut e = open(c, 1_000);
    let r = recover(&mut e, None, 1_000);
    assert!(r.messages.is_empty(), "bob's delivered messages came back");
    e.recover(Ticket(1), &carol, None, at(1_000));
    let Some(Outcome::Recovered(r)) = settle(&mut e).pop().map(|c| c.outcome) else {
        panic!("no recovery")
    };
    assert!(
        r.messages.is_empty(),
        "carol's delivered messages came back as pending: {}",
        r.messages.len()
    );
    // With a since before the big ones: only the small ones, and not recovered (evicted).
    let since = Since {
        position: Position(sent[0].0 - 1),
        epoch: None,
    };
    e.recover(Ticket(2), &carol, Some(since), at(1_000));
    let Some(Outcome::Recovered(r)) = settle(&mut e).pop().map(|c| c.outcome) else {
        panic!("no recovery")
    };
    assert_eq!(
        bodies(&r),
        ["s", "s", "s"],
        "the evicted messages came back"
    );
    assert!(!r.recovered);
}

/// A new data directory has no history: a `since` from before it existed (another store, a
/// deleted one) is not recovered, now or after a restart; neither is one it never handed out.
#[test]
fn a_fresh_store_does_not_claim_a_since_it_never_saw() {
    let tmp = tempfile::tempdir().unwrap();
    let before = Since {
        position: Position(999_999_000),
        epoch: None,
    };
    let mut e = open(config(tmp.path()), 1_000_000);
    let r = recover(&mut e, Some(before), 1_000_000);
    assert!(!r.recovered, "fresh data dir, since from before it");
    let first = send_n(&mut e, 1, 1_000_000)[0];
    let ahead = Since {
        position: Position(first.0 + 1_000),
        epoch: None,
    };
    assert!(
        !recover(&mut e, Some(ahead), 1_000_000).recovered,
        "since never handed out"
    );
    let own = Since {
        position: first,
        epoch: None,
    };
    assert!(
        recover(&mut e, Some(own), 1_000_000).recovered,
        "its own since is served"
    );
    drop(e);
    let mut e = open(config(tmp.path()), 1_000_000);
    assert!(
        !recover(&mut e, Some(before), 1_000_000).recovered,
        "after a restart, the mark came back from the first segment's header"
    );
    assert!(recover(&mut e, Some(own), 1_000_000).recovered);
}

/// Room messages with a client id keep a record for the duplicate window until their TTL,
/// though nothing retains them: a segment of those is not worth compacting (the copy is the
/// whole segment) until they expire, and must not be copied forward over and over meanwhile.
#[test]
fn unexpired_duplicate_windows_do_not_make_compaction_spin() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = config(tmp.path());
    c.segment_bytes = 2048;
    let mut e = open(c.clone(), 1_000);
    for i in 0..200 {
        let id = format!("room-msg-{i}");
        e.publish(Ticket(i), publish(Some(&id)), at(1_000));
        settle(&mut e);
    }
    let segments = e.segments();
    assert!(segments.len() > 3, "rotated: {segments:?}");
    for _ in 0..200 {
        e.maintain(at(1_000));
        settle(&mut e);
    }
    assert_eq!(e.stats.compactions, 0, "copied forward for nothing");
    assert_eq!(e.segments(), segments);
    // Once the TTL has passed, the records are dead and the space comes back.
    for _ in 0..200 {
        e.maintain(at(1_000 + TTL_MS));
        settle(&mut e);
    }
    assert!(e.stats.compactions > 0);
    assert!(e.segments().len() <= 2, "left: {:?}", e.segments());
}

/// A message that bounds removed keeps its client id's duplicate window after compaction
/// deleted its segment (up to its TTL).
#[test]
fn compaction_keeps_the_duplicate_window_of_removed_messages() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = config(tmp.path());
    c.segment_bytes = 2048;
    c.limits.per_stream = 1;
    let mut e = open(c.clone(), 1_000);
    let big = "d".repeat(700);
    e.append(Ticket(0), append("dave", Some("first"), &big), at(1_000));
    let first = stored(&settle(&mut e)[0]);
    e.delivered(&StreamId::inbox("dave"), &[first]);
    // Each evicts the one before it: segment 1 goes dead.
    for i in 1..8 {
        e.append(Ticket(i), append("dave", None, &big), at(1_000));
        let p = stored(&settle(&mut e)[0]);
        e.delivered(&StreamId::inbox("dave"), &[p]);
    }
    for _ in 0..50 {
        e.maintain(at(1_000));
        settle(&mut e);
    }
    assert!(!e.segments().contains(&1), "segment 1 was compacted away");
    drop(e);
    let mut e = open(c, 1_000);
    e.append(Ticket(9), append("dave", Some("first"), &big), at(1_000));
    match &settle(&mut e)[0].outcome {
        Outcome::Duplicate { position, .. } => assert_eq!(*position, first),
        other => panic!("a re-send after compaction and restart: {other:?}"),
    }
}

// ----- room history (SPEC §16) -----------------------------------------------------------------

fn with_history(dir: &Path, per_room: usize) -> FileConfig {
    let mut c = config(dir);
    c.room_history = Limits {
        per_stream: per_room,
        ttl_ms: TTL_MS,
        max_bytes: 64 << 20,
    };
    c
}

fn room_message(room: &str, body: &str) -> Publish {
    Publish {
        room: Rc::from(room),
        sender: Rc::from("alice"),
        client_id: None,
        body: Rc::from(body.as_bytes()),
        keep: true,
    }
}

/// Publishes `bodies` to `room`, all stored, and returns their positions.
fn publish_all(e: &mut FileEngine, room: &str, bodies: &[String], now: u64) -> Vec<Position> {
    for (i, body) in bodies.iter().enumerate() {
        e.publish(Ticket(i as u64), room_message(room, body), at(now));
    }
    settle(e).iter().map(stored).collect()
}

fn room_since(e: &mut FileEngine, room: &str, since: Since, now: u64) -> Recovery {
    e.recover(Ticket(998), &StreamId::room(room), Some(since), at(now));
    match settle(e).pop().map(|c| c.outcome) {
        Some(Outcome::Recovered(r)) => r,
        other => panic!("expected Recovered, got {other:?}"),
    }
}

fn page(e: &mut FileEngine, room: &str, limit: usize, now: u64) -> Recovery {
    e.history(Ticket(997), &StreamId::room(room), limit, at(now));
    match settle(e).pop().map(|c| c.outcome) {
        Some(Outcome::Recovered(r)) => r,
        other => panic!("expected Recovered, got {other:?}"),
    }
}

fn numbered(range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("r{i}")).collect()
}

#[test]
fn room_history_survives_a_restart_within_its_bounds() {
    let tmp = tempfile::tempdir().unwrap();
    let c = with_history(tmp.path(), 20);
    let (positions, epoch) = {
        let mut e = open(c.clone(), 1_000);
        (
            publish_all(&mut e, "lobby", &numbered(0..30), 1_000),
            e.epoch(),
        )
    };
    let mut e = open(c.clone(), 2_000);
    assert_eq!(bodies(&page(&mut e, "lobby", 100, 2_000)), numbered(10..30));
    assert_eq!(bodies(&page(&mut e, "lobby", 2, 2_000)), numbered(28..30));
    // A since inside what is kept: complete; before it: what is there, and false.
    let since = |i: usize| Since {
        position: positions[i],
        epoch: Some(epoch),
    };
    let r = room_since(&mut e, "lobby", since(24), 2_000);
    assert!(r.recovered);
    assert_eq!(bodies(&r), numbered(25..30));
    assert_eq!(r.last, Some(positions[29]));
    let r = room_since(&mut e, "lobby", since(5), 2_000);
    assert!(!r.recovered);
    assert_eq!(bodies(&r), numbered(10..30));
    // Room history never shows up as an inbox, and new positions are above the old ones.
    assert_eq!(e.mem.streams.messages(), 0);
    let after = publish_all(&mut e, "lobby", &numbered(30..31), 0);
    assert!(after[0] > positions[29]);
}

#[test]
fn room_history_off_writes_no_room_records_and_forgets_old_ones() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let mut e = open(with_history(tmp.path(), 5), 1_000);
        publish_all(&mut e, "lobby", &numbered(0..3), 1_000);
    }
    // Restarted with history off: what the log held is dropped, and counted.
    let mut e = open(config(tmp.path()), 2_000);
    assert_eq!(e.mem.rooms.messages(), 0);
    assert_eq!(e.mem.rooms.removed.dropped_on_restore, 3);
    assert!(bodies(&page(&mut e, "lobby", 10, 2_000)).is_empty());
    publish_all(&mut e, "lobby", &numbered(3..4), 2_000);
    assert_eq!(e.mem.rooms.messages(), 0);
}

#[test]
fn room_history_expires_and_the_expiry_survives_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let c = with_history(tmp.path(), 100);
    let mut e = open(c.clone(), 1_000);
    let first = publish_all(&mut e, "lobby", &numbered(0..2), 1_000);
    publish_all(&mut e, "lobby", &numbered(2..3), 1_000 + TTL_MS / 2);
    e.maintain(at(1_000 + TTL_MS));
    settle(&mut e);
    assert_eq!(bodies(&page(&mut e, "lobby", 10, 1_000 + TTL_MS)), ["r2"]);
    assert_eq!(e.mem.rooms.removed.expired_delivered, 2);
    let mut metrics = String::new();
    e.render_metrics(&mut metrics);
    assert!(
        metrics.contains("wsrelay_room_history_removed_total{reason=\"ttl\"} 2\n"),
        "{metrics}"
    );
    drop(e);
    let mut e = open(c, 1_000 + TTL_MS);
    assert_eq!(bodies(&page(&mut e, "lobby", 10, 1_000 + TTL_MS)), ["r2"]);
    let since = Since {
        position: first[0],
        epoch: None,
    };
    assert!(!room_since(&mut e, "lobby", since, 1_000 + TTL_MS).recovered);
}

#[test]
fn compaction_keeps_live_room_history() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = with_history(tmp.path(), 3);
    c.segment_bytes = 2048;
    let mut e = open(c.clone(), 1_000);
    let body = "z".repeat(100);
    for i in 0..60 {
        e.publish(Ticket(i), room_message("churn", &body), at(1_000));
        settle(&mut e);
    }
    publish_all(&mut e, "quiet", &numbered(0..2), 1_000);
    for i in 0..60 {
        e.publish(Ticket(i), room_message("churn", &body), at(1_000));
        settle(&mut e);
    }
    for _ in 0..50 {
        e.maintain(at(1_000));
        settle(&mut e);
    }
    assert!(e.stats.compactions > 0);
    drop(e);
    let mut e = open(c, 1_000);
    assert_eq!(bodies(&page(&mut e, "quiet", 10, 1_000)), numbered(0..2));
    assert_eq!(page(&mut e, "churn", 10, 1_000).messages.len(), 3);
}

#[test]
fn a_room_message_that_cannot_be_written_is_rejected_and_leaves_the_history() {
    let tmp = tempfile::tempdir().unwrap();
    let flag = Arc::new(AtomicBool::new(false));
    let mut c = with_history(tmp.path(), 10);
    c.fault = StoreFault::Flag(Arc::clone(&flag));
    let mut e = open(c.clone(), 1_000);
    publish_all(&mut e, "lobby", &numbered(0..1), 1_000);
    flag.store(true, Ordering::SeqCst);
    e.publish(Ticket(1), room_message("lobby", "lost"), at(1_000));
    let done = settle(&mut e);
    assert!(
        matches!(done[0].outcome, Outcome::Rejected(Refusal::Store(_))),
        "{:?}",
        done[0].outcome
    );
    assert_eq!(bodies(&page(&mut e, "lobby", 10, 1_000)), ["r0"]);
    flag.store(false, Ordering::SeqCst);
    drop(e);
    let mut e = open(c, 1_000);
    assert_eq!(bodies(&page(&mut e, "lobby", 10, 1_000)), ["r0"]);
}

#[test]
fn a_history_page_waits_for_the_messages_submitted_before_it() {
    let tmp = tempfile::tempdir().unwrap();
    let mut e = open(with_history(tmp.path(), 10), 1_000);
    publish_all(&mut e, "lobby", &numbered(0..1), 1_000);
    e.publish(Ticket(1), room_message("lobby", "in flight"), at(1_000));
    e.history(Ticket(2), &StreamId::room("lobby"), 10, at(1_000));
    let done = settle(&mut e);
    assert_eq!(done.len(), 2);
    stored(&done[0]);
    let Outcome::Recovered(r) = &done[1].outcome else {
        panic!("{:?}", done[1].outcome)
    };
    // Completed in order: the page comes after the publish it followed, so it holds it.
    assert_eq!(bodies(r), ["r0", "in flight"]);
}

#[test]
fn a_run_without_room_history_is_a_gap_the_next_run_knows_about() {
    let tmp = tempfile::tempdir().unwrap();
    let on = with_history(tmp.path(), 10);
    let off = config(tmp.path());
    let epoch;
    let kept = {
        let mut e = open(on.clone(), 1_000);
        epoch = e.epoch();
        publish_all(&mut e, "lobby", &numbered(0..2), 1_000)
    };
    // A run with history off: its room messages are published but not kept.
    let unkept = {
        let mut e = open(off, 1_000);
        publish_all(&mut e, "lobby", &numbered(2..4), 1_000)
    };
    let mut e = open(on.clone(), 1_000);
    let since = |p: Position| Since {
        position: p,
        epoch: Some(epoch),
    };
    // Before the gap or inside it: cannot be served, whatever the room still shows.
    for p in [kept[0], kept[1], unkept[0]] {
        let r = room_since(&mut e, "lobby", since(p), 1_000);
        assert!(!r.recovered, "since {p:?}");
    }
    // From the gap's end on, the history is continuous again, across restarts too.
    let after = publish_all(&mut e, "lobby", &numbered(4..6), 1_000);
    drop(e);
    let mut e = open(on, 1_000);
    let r = room_since(&mut e, "lobby", since(unkept[1]), 1_000);
    assert!(r.recovered);
    assert_eq!(bodies(&r), numbered(4..6));
    assert_eq!(r.last, Some(after[1]));
}

#[test]
fn room_history_gaps_follow_the_runs_in_position_order() {
    let p = Position;
    assert_eq!(history_gap(vec![]), None);
    assert_eq!(history_gap(vec![(p(10), false)]), None);
    assert_eq!(
        history_gap(vec![(p(10), true)]),
        Some(p(9)),
        "nothing kept before"
    );
    assert_eq!(history_gap(vec![(p(10), true), (p(20), true)]), Some(p(9)));
    assert_eq!(
        history_gap(vec![(p(30), true), (p(10), true), (p(20), false)]),
        Some(p(29)),
        "ordered by position, not by where compaction left the records"
    );
}

#[test]
fn room_history_never_raises_the_inboxes_forgotten_mark_across_restarts() {
    // The first start with history on over a data dir written with it off marks room history
    // as lost up to there; that mark is the rooms' alone. Were it shared with the inboxes (one
    // number in the log header), a `since` of an inbox would read recovered:false after the
    // next restart although nothing of it was lost.
    let tmp = tempfile::tempdir().unwrap();
    let (since, epoch) = {
        let mut e = open(config(tmp.path()), 1_000);
        e.append(Ticket(1), append("bob", None, "hello"), at(1_000));
        (stored(&settle(&mut e)[0]), e.epoch())
    };
    let c = with_history(tmp.path(), 2);
    let roll = |e: &mut FileEngine, now: u64| {
        // Enough inbox traffic for a new segment, whose header carries the marks.
        let big = "x".repeat(SEGMENT_BYTES as usize / 4);
        for i in 0..8 {
            e.append(Ticket(10 + i), append("dave", None, &big), at(now));
        }
        settle(e);
    };
    {
        // Room history trimmed past `since` by its own bound (as a short room TTL would).
        let mut e = open(c.clone(), 2_000);
        publish_all(&mut e, "lobby", &numbered(0..5), 2_000);
        roll(&mut e, 2_000);
    }
    roll(&mut open(c.clone(), 3_000), 3_000);
    let mut e = open(c.clone(), 4_000);
    assert_eq!(e.epoch(), epoch);
    let since = Since {
        position: since,
        epoch: Some(epoch),
    };
    e.recover(Ticket(2), &StreamId::inbox("carol"), Some(since), at(4_000));
    match settle(&mut e).pop().map(|c| c.outcome) {
        Some(Outcome::Recovered(r)) => assert!(r.recovered, "an inbox lost nothing: {r:?}"),
        other => panic!("expected Recovered, got {other:?}"),
    }
    // The rooms' own mark still covers the run without history.
    let r = room_since(&mut e, "lobby", since, 4_000);
    assert!(!r.recovered);
}
