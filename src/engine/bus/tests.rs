//! Two workers' bus engines in one thread: the queues are real, the wake-ups count.

use super::*;
use crate::engine::Limits;
use std::sync::atomic::AtomicUsize;
use std::time::{Duration, Instant};

fn now() -> Now {
    Now {
        instant: Instant::now(),
        unix_ms: 1_000_000,
    }
}

struct Pair {
    engines: Vec<BusEngine>,
    wakes: Vec<Arc<AtomicUsize>>,
    next_ticket: u64,
}

fn pair() -> Pair {
    pair_with_history(10)
}

/// Two workers whose rooms keep `history` messages (0: room history off).
fn pair_with_history(history: usize) -> Pair {
    pair_with(100, history)
}

/// A wake-up for each of two workers that counts how often it was rung, and the counters.
fn counted_wakes() -> (Vec<Arc<AtomicUsize>>, Vec<Wake>) {
    let wakes: Vec<Arc<AtomicUsize>> = (0..2).map(|_| Arc::new(AtomicUsize::new(0))).collect();
    let rings = wakes
        .iter()
        .map(|n| {
            let n = Arc::clone(n);
            Arc::new(move || {
                n.fetch_add(1, Ordering::Relaxed);
            }) as Wake
        })
        .collect();
    (wakes, rings)
}

/// Two workers whose inboxes keep `per_stream` messages and rooms `history`.
fn pair_with(per_stream: usize, history: usize) -> Pair {
    let (wakes, rings) = counted_wakes();
    let limits = Limits {
        per_stream,
        ttl_ms: 60_000,
        max_bytes: 1 << 20,
    };
    let history = Limits {
        per_stream: history,
        ttl_ms: 60_000,
        max_bytes: 1 << 20,
    };
    let engines = links(rings, now())
        .into_iter()
        .map(|link| {
            let dedup = Dedup::new(16, Duration::from_secs(60), 1 << 20);
            BusEngine::new(link, limits, history, dedup, now())
        })
        .collect();
    Pair {
        engines,
        wakes,
        next_ticket: 0,
    }
}

/// A name whose stream (`make(name)`) is homed at `worker` of 2.
fn homed(worker: usize, make: fn(&str) -> StreamId) -> String {
    (0..)
        .map(|i| format!("n{i}"))
        .find(|name| home(&make(name), 2) == worker)
        .expect("some name hashes to each worker")
}

impl Pair {
    fn ticket(&mut self) -> Ticket {
        self.next_ticket += 1;
        Ticket(self.next_ticket)
    }

    fn append(&mut self, on: usize, to: &str, client_id: Option<&str>) -> Ticket {
        let ticket = self.ticket();
        let append = Append {
            stream: StreamId::inbox(to),
            sender: Rc::from("alice"),
            client_id: client_id.map(Rc::from),
            body: Rc::from(&b"{\"hi\":1}"[..]),
        };
        self.engines[on].append(ticket, append, now());
        ticket
    }

    fn publish(&mut self, on: usize, room: &str) -> Ticket {
        let ticket = self.ticket();
        let publish = Publish {
            room: Rc::from(room),
            sender: Rc::from("alice"),
            client_id: None,
            body: Rc::from(&b"{}"[..]),
            keep: true,
        };
        self.engines[on].publish(ticket, publish, now());
        ticket
    }

    /// Polls both engines until neither has anything more; what each handed out, in order.
    fn settle(&mut self) -> [Vec<Event>; 2] {
        let mut out: [Vec<Event>; 2] = [Vec::new(), Vec::new()];
        for _ in 0..4 {
            for (i, e) in self.engines.iter_mut().enumerate() {
                e.poll(&mut out[i]);
            }
        }
        out
    }
}

fn completed(events: &[Event]) -> Vec<(Ticket, &Outcome)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Completed(c) => Some((c.ticket, &c.outcome)),
            Event::Arrived(_) | Event::Interrupted(_) | Event::Presence(_) => None,
        })
        .collect()
}

fn arrived(events: &[Event]) -> Vec<(&StreamId, Position)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Arrived(a) => Some((&a.stream, a.position)),
            Event::Completed(_) | Event::Interrupted(_) | Event::Presence(_) => None,
        })
        .collect()
}

#[test]
fn a_direct_message_homed_elsewhere_completes_after_its_home_answers() {
    let mut p = pair();
    let bob = homed(1, StreamId::inbox);
    let t = p.append(0, &bob, None);
    let mut early = Vec::new();
    p.engines[0].poll(&mut early);
    assert!(early.is_empty(), "not before the home answered");
    assert_eq!(p.engines[0].in_flight(), 1);
    assert!(p.wakes[1].load(Ordering::Relaxed) >= 1, "the home was rung");
    let [zero, one] = p.settle();
    assert!(
        one.is_empty(),
        "bob is online nowhere: nothing arrives at his home"
    );
    let done = completed(&zero);
    assert_eq!(done.len(), 1);
    assert!(matches!(done[0], (ticket, Outcome::Stored { .. }) if ticket == t));
    assert_eq!(p.engines[0].in_flight(), 0);
    assert_eq!(
        p.engines[1].stats(0).pending,
        1,
        "held, pending, at its home"
    );
}

#[test]
fn a_recipient_online_on_another_worker_gets_it_as_arrived_and_the_sender_hears_so() {
    let mut p = pair();
    // Bob's inbox is homed at 0, bob is online at 1, alice sends from 0.
    let bob = homed(0, StreamId::inbox);
    p.engines[1].online(&bob);
    p.settle();
    let t = p.append(0, &bob, None);
    let [zero, one] = p.settle();
    let done = completed(&zero);
    assert!(
        matches!(done[..], [(ticket, Outcome::StoredOnlineElsewhere { .. })] if ticket == t),
        "{done:?}"
    );
    let got = arrived(&one);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0, &StreamId::inbox(&bob));
    // Worker 1's hub delivered it: the home hears and bob's inbox has nothing pending.
    p.engines[1].delivered(&StreamId::inbox(&bob), &[got[0].1]);
    p.settle();
    assert_eq!(p.engines[0].stats(0).pending, 0);
}

#[test]
fn completions_leave_in_submission_order_whatever_their_homes() {
    let mut p = pair();
    let far = homed(1, StreamId::inbox);
    let near = homed(0, StreamId::inbox);
    let first = p.append(0, &far, None);
    let second = p.append(0, &near, None);
    let mut out = Vec::new();
    p.engines[0].poll(&mut out);
    assert!(
        out.is_empty(),
        "the local answer waits for the earlier remote one"
    );
    let [zero, _] = p.settle();
    let tickets: Vec<Ticket> = completed(&zero).iter().map(|(t, _)| *t).collect();
    assert_eq!(tickets, [first, second]);
}

#[test]
fn a_room_message_reaches_each_other_worker_with_members_once() {
    let mut p = pair();
    for home_worker in [0, 1] {
        let room = homed(home_worker, StreamId::room);
        p.engines[0].joined(&room);
        p.engines[1].joined(&room);
        p.settle();
        let mut positions = Vec::new();
        for sender in [0, 1, 1, 0] {
            p.publish(sender, &room);
            let out = p.settle();
            // The sender completes; the other worker gets it once, as arrived.
            let done = completed(&out[sender]);
            assert_eq!(done.len(), 1);
            let Outcome::Stored { position } = done[0].1 else {
                panic!("{done:?}")
            };
            assert!(arrived(&out[sender]).is_empty(), "never back to the sender");
            let other = arrived(&out[1 - sender]);
            assert_eq!(other, [(&StreamId::room(&room), *position)]);
            positions.push(*position);
        }
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "{positions:?}");
        // Worker 1 leaves: worker 0's messages no longer cross.
        p.engines[1].left(&room);
        p.settle();
        let sent_before = p.engines[0].sent[1];
        p.publish(0, &room);
        let [_, one] = p.settle();
        assert!(one.is_empty());
        if home_worker == 0 {
            assert_eq!(p.engines[0].sent[1], sent_before, "no note for worker 1");
        }
        p.engines[0].left(&room);
        p.settle();
    }
}

#[test]
fn a_resent_client_id_is_a_duplicate_from_any_worker() {
    let mut p = pair();
    let bob = homed(1, StreamId::inbox);
    p.append(0, &bob, Some("c1"));
    let [zero, _] = p.settle();
    let Outcome::Stored { position } = completed(&zero)[0].1 else {
        panic!()
    };
    let first = *position;
    // The same sender, reconnected to the other worker, sends it again.
    p.append(1, &bob, Some("c1"));
    let [_, one] = p.settle();
    assert!(
        matches!(
            completed(&one)[..],
            [(_, Outcome::Duplicate { position, status: AckStatus::Queued })] if *position == first
        ),
        "{one:?}"
    );
    assert_eq!(p.engines[1].stats(0).messages, 1, "stored once");
}

#[test]
fn an_ack_after_a_remote_completion_reaches_the_window_at_the_home() {
    let mut p = pair();
    let room = homed(1, StreamId::room);
    let ticket = p.ticket();
    let publish = Publish {
        room: Rc::from(&*room),
        sender: Rc::from("alice"),
        client_id: Some(Rc::from("c9")),
        body: Rc::from(&b"{}"[..]),
        keep: true,
    };
    p.engines[0].publish(ticket, publish.clone(), now());
    // As the hub does: poll, and while acting on the completion, ack it otherwise.
    let mut out = Vec::new();
    p.engines[1].poll(&mut Vec::new());
    p.engines[0].poll(&mut out);
    let Outcome::Stored { position } = completed(&out)[0].1 else {
        panic!("{out:?}")
    };
    p.engines[0].acked("alice", "c9", *position, AckStatus::Partial);
    p.settle();
    let again = p.ticket();
    p.engines[0].publish(again, publish, now());
    let [zero, _] = p.settle();
    assert!(
        matches!(
            completed(&zero)[..],
            [(
                _,
                Outcome::Duplicate {
                    status: AckStatus::Partial,
                    ..
                }
            )]
        ),
        "{zero:?}"
    );
}

#[test]
fn an_arrival_never_overtakes_the_recovery_it_follows() {
    let mut p = pair();
    // Worker 0 has one answer outstanding from worker 1's home, then asks worker 1 for bob's
    // recovery; worker 1 then stores a message for bob, online at 0.
    let slow = homed(1, StreamId::room);
    let bob = homed(1, StreamId::inbox);
    p.publish(0, &slow);
    p.engines[0].online(&bob);
    let t = p.ticket();
    p.engines[0].recover(t, &StreamId::inbox(&bob), None, now());
    p.engines[1].poll(&mut Vec::new());
    p.append(1, &bob, None);
    let [zero, _] = p.settle();
    let kinds: Vec<&str> = zero
        .iter()
        .map(|e| match e {
            Event::Completed(c) if c.ticket == t => "recovered",
            Event::Completed(_) => "published",
            Event::Arrived(_) => "arrived",
            Event::Interrupted(_) => "interrupted",
            Event::Presence(_) => "presence",
        })
        .collect();
    assert_eq!(kinds, ["published", "recovered", "arrived"]);
}

#[test]
fn a_room_without_history_recovers_no_message_and_is_heard_from_its_recovery_on() {
    // The hub's first join of a room without history waits for this recovery
    // (`Engine::shares_rooms`): it must replay nothing, and what is stored after it must
    // arrive.
    let mut p = pair_with_history(0);
    assert!(p.engines[0].shares_rooms());
    let room = homed(1, StreamId::room);
    p.publish(1, &room);
    p.settle();
    let t = p.ticket();
    p.engines[0].recover(t, &StreamId::room(&room), None, now());
    p.engines[1].poll(&mut Vec::new());
    // As the hub does: `joined` while handling the completion, in the poll that brought it.
    let mut zero = Vec::new();
    p.engines[0].poll(&mut zero);
    let done = completed(&zero);
    let [(ticket, Outcome::Recovered(recovery))] = &done[..] else {
        panic!("the recovery alone: {done:?}");
    };
    assert_eq!(*ticket, t);
    assert!(
        recovery.messages.is_empty(),
        "history off: nothing replayed"
    );
    p.engines[0].joined(&room);
    p.publish(1, &room);
    let [zero, _] = p.settle();
    assert_eq!(arrived(&zero).len(), 1, "stored after the recovery: heard");
}

#[test]
fn a_room_recovery_subscribes_until_the_hub_has_joined_or_not() {
    let mut p = pair();
    let room = homed(1, StreamId::room);
    let t = p.ticket();
    p.engines[0].recover(t, &StreamId::room(&room), None, now());
    p.engines[1].poll(&mut Vec::new());
    let mut out = Vec::new();
    p.engines[0].poll(&mut out);
    assert_eq!(completed(&out).len(), 1, "the recovery");
    // Stored after the recovery, before the hub's `joined`: still heard at worker 0. (The
    // home acts on its local engine's completion at its next poll: that one stores it.)
    p.publish(1, &room);
    p.engines[1].poll(&mut Vec::new());
    let [zero, _] = p.settle();
    assert_eq!(arrived(&zero).len(), 1);
    // The hub did not join: that poll dropped the subscription.
    assert!(!p.engines[1].rooms.contains_key(&*room));
    // It joins now: subscribed again.
    p.engines[0].joined(&room);
    p.settle();
    assert_eq!(p.engines[1].rooms.get(&*room).map(Vec::len), Some(1));
}

#[test]
fn arrivals_for_a_worker_that_does_not_keep_up_are_dropped_and_counted() {
    let mut p = pair();
    let room = homed(0, StreamId::room);
    p.engines[1].joined(&room);
    p.settle();
    // Worker 1 never polls: its queue fills with arrived messages, then they are dropped.
    let extra = 10;
    for _ in 0..ARRIVED_LIMIT + extra {
        p.publish(0, &room);
    }
    let mut out = Vec::new();
    p.engines[0].poll(&mut out);
    assert_eq!(
        completed(&out).len() as u64,
        ARRIVED_LIMIT + extra,
        "every sender is answered"
    );
    assert_eq!(p.engines[0].dropped[1], extra);
    // One notice for the stream, however many were dropped.
    let depth = |p: &Pair| p.engines[0].link.fabric.depth[1].load(Ordering::Relaxed);
    assert_eq!(depth(&p), ARRIVED_LIMIT + 1);
    // What did cross arrives, in order, then the notice; the queue is empty again.
    let mut one = Vec::new();
    p.engines[1].poll(&mut one);
    let got = arrived(&one);
    assert_eq!(got.len() as u64, ARRIVED_LIMIT);
    assert!(got.windows(2).all(|w| w[0].1 < w[1].1));
    assert!(
        matches!(one.last(), Some(Event::Interrupted(s)) if *s == StreamId::room(&room)),
        "the hub is told, to close the members so they recover"
    );
    assert_eq!(one.len() as u64, ARRIVED_LIMIT + 1);
    assert_eq!(depth(&p), 0);
    // Once the queue has room, messages cross again, and a new overflow is told again.
    p.publish(0, &room);
    let [_, one] = p.settle();
    assert_eq!(arrived(&one).len(), 1);
    assert!(p.engines[0].interrupted[1].is_empty());
}

// ----- bursts to an online id beyond its inbox's bound (`parking.rs`) ---------------------

/// A name other than `not` whose inbox is homed at `worker` of 2.
fn another_homed(worker: usize, not: &str) -> String {
    (0..)
        .map(|i| format!("m{i}"))
        .find(|name| name != not && home(&StreamId::inbox(name), 2) == worker)
        .expect("some name hashes to each worker")
}

/// Two workers whose inboxes hold 3 messages each, and bob, whose inbox is homed at worker 0,
/// online at each worker of `online_at` (settled: every worker knows).
fn bob_online_at(online_at: &[usize]) -> (Pair, String) {
    let mut p = pair_with(3, 10);
    let bob = homed(0, StreamId::inbox);
    for &worker in online_at {
        p.engines[worker].online(&bob);
    }
    p.settle();
    (p, bob)
}

/// Polls both engines `rounds` times, acting as their hubs do on direct messages to `id`: a
/// worker in `takes` (where `id`'s connections take what they are given) delivers what arrives
/// for it, and what it stored itself (`sent`: the tickets of its appends to `id`), and reports
/// it delivered. What each engine handed out, in order.
fn settle_delivering(
    p: &mut Pair,
    id: &str,
    takes: &[usize],
    sent: &[Ticket],
    rounds: usize,
) -> [Vec<Event>; 2] {
    let stream = StreamId::inbox(id);
    let mut out: [Vec<Event>; 2] = [Vec::new(), Vec::new()];
    for _ in 0..rounds {
        for (i, engine) in p.engines.iter_mut().enumerate() {
            let mut events = Vec::new();
            engine.poll(&mut events);
            if takes.contains(&i) {
                for event in &events {
                    let position = match event {
                        Event::Arrived(a) if a.stream == stream => a.position,
                        Event::Completed(Completion {
                            ticket,
                            outcome:
                                Outcome::Stored { position }
                                | Outcome::StoredOnlineElsewhere { position },
                        }) if sent.contains(ticket) => *position,
                        _ => continue,
                    };
                    engine.delivered(&stream, &[position]);
                }
            }
            out[i].extend(events);
        }
    }
    out
}

fn metric(engine: &BusEngine, sample: &str) -> f64 {
    let mut text = String::new();
    engine.render_metrics(&mut text);
    text.lines()
        .find_map(|line| line.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no sample {sample} in:\n{text}"))
}

#[test]
fn a_burst_beyond_the_bound_to_an_id_online_elsewhere_is_all_stored_in_order() {
    // Bob's inbox is homed at 0 and keeps 3; bob is online at 1. Alice sends 6 to him in one
    // pass, then one to carol (offline, also homed at 0), from the home and from bob's worker.
    for sender in [0, 1] {
        let mut p = pair_with(3, 10);
        let bob = homed(0, StreamId::inbox);
        let carol = another_homed(0, &bob);
        p.engines[1].online(&bob);
        p.settle();
        let to_bob: Vec<Ticket> = (0..6).map(|_| p.append(sender, &bob, None)).collect();
        let to_carol = p.append(sender, &carol, None);
        let out = settle_delivering(&mut p, &bob, &[1], &to_bob, 12);

        let done = completed(&out[sender]);
        let tickets: Vec<Ticket> = done.iter().map(|(t, _)| *t).collect();
        let mut expected = to_bob.clone();
        expected.push(to_carol);
        assert_eq!(tickets, expected, "sender {sender}: every answer, in order");
        let positions: Vec<Position> = done
            .iter()
            .map(|(_, outcome)| match outcome {
                Outcome::Stored { position } | Outcome::StoredOnlineElsewhere { position } => {
                    *position
                }
                other => panic!("sender {sender}: not stored: {other:?}"),
            })
            .collect();
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "{positions:?}");
        if sender == 0 {
            // Each reached bob's worker once, in order.
            let got: Vec<Position> = arrived(&out[1]).iter().map(|(_, p)| *p).collect();
            assert_eq!(got, positions[..6]);
        } else {
            assert!(
                arrived(&out[1]).is_empty(),
                "bob's worker stored them itself"
            );
        }
        assert!(arrived(&out[0]).is_empty());
        assert_eq!(
            metric(
                &p.engines[0],
                "wsrelay_engine_bus_parked_total{worker=\"0\"}"
            ),
            4.0,
            "the last 3 for bob, and carol's behind them"
        );
        assert_eq!(
            metric(&p.engines[0], "wsrelay_engine_bus_parked{worker=\"0\"}"),
            0.0
        );
        // Bob's inbox holds the last 3, delivered; carol's message waits for her.
        assert_eq!(p.engines[0].stats(0).messages, 4);
        assert_eq!(p.engines[0].stats(0).pending, 1);
    }
}

#[test]
fn a_burst_to_an_id_that_goes_offline_meanwhile_is_refused_full_as_with_one_worker() {
    let (mut p, bob) = bob_online_at(&[1]);
    let to_bob: Vec<Ticket> = (0..6).map(|_| p.append(0, &bob, None)).collect();
    let mut zero = Vec::new();
    p.engines[0].poll(&mut zero);
    assert_eq!(completed(&zero).len(), 3, "the rest wait for bob's worker");
    // Bob leaves before his worker took anything: his inbox really is full.
    p.engines[1].offline(&Rc::from(bob.as_str()), now());
    let [more, _] = p.settle();
    zero.extend(more);
    let done = completed(&zero);
    let tickets: Vec<Ticket> = done.iter().map(|(t, _)| *t).collect();
    assert_eq!(tickets, to_bob);
    for (_, outcome) in &done[..3] {
        assert!(
            matches!(outcome, Outcome::StoredOnlineElsewhere { .. }),
            "{outcome:?}"
        );
    }
    for (_, outcome) in &done[3..] {
        assert!(
            matches!(outcome, Outcome::Rejected(crate::engine::Refusal::Full)),
            "{outcome:?}"
        );
    }
    assert_eq!(p.engines[0].stats(0).pending, 3);
}

#[test]
fn a_burst_to_an_online_id_whose_worker_takes_none_is_refused_full_once_it_has_acted() {
    // Bob is online at 1, but his connection there takes nothing (still recovering, say): no
    // report comes, and once worker 1 has acted on what it was handed the rest is refused,
    // rather than waiting for ever.
    let (mut p, bob) = bob_online_at(&[1]);
    let to_bob: Vec<Ticket> = (0..5).map(|_| p.append(0, &bob, None)).collect();
    let out = settle_delivering(&mut p, &bob, &[], &to_bob, 6);
    let done = completed(&out[0]);
    assert_eq!(done.len(), 5);
    assert!(
        done[3..]
            .iter()
            .all(|(_, o)| matches!(o, Outcome::Rejected(crate::engine::Refusal::Full))),
        "{done:?}"
    );
    assert_eq!(arrived(&out[1]).len(), 3);
    assert_eq!(
        metric(&p.engines[0], "wsrelay_engine_bus_parked{worker=\"0\"}"),
        0.0
    );
}

#[test]
fn a_worker_that_lets_the_id_go_reports_nothing_more_and_is_not_waited_for() {
    // Bob is online at the home (0, whose connection takes nothing: still recovering, say)
    // and at 1, which leaves before it polled: its `Offline` follows any report it had, so
    // the rest is refused at once, without waiting for worker 1 to act on what it was handed.
    let (mut p, bob) = bob_online_at(&[0, 1]);
    let to_bob: Vec<Ticket> = (0..5).map(|_| p.append(0, &bob, None)).collect();
    let mut zero = Vec::new();
    p.engines[0].poll(&mut zero);
    assert_eq!(completed(&zero).len(), 3);
    p.engines[1].offline(&Rc::from(bob.as_str()), now());
    for _ in 0..3 {
        p.engines[0].poll(&mut zero);
    }
    let done = completed(&zero);
    let tickets: Vec<Ticket> = done.iter().map(|(t, _)| *t).collect();
    assert_eq!(tickets, to_bob);
    assert!(
        done[3..]
            .iter()
            .all(|(_, o)| matches!(o, Outcome::Rejected(crate::engine::Refusal::Full))),
        "{done:?}"
    );
}

// ----- presence across workers (`presence.rs`) ----------------------------------------------

use super::presence::{Home, Tell};
use super::wire::RoomMember;
use crate::engine::{LocalMember, PresenceChange};

fn seat(worker: usize, conn: u64, id: &str, info: Option<&str>) -> RoomMember {
    RoomMember {
        worker,
        conn,
        id: Arc::from(id),
        info: info.map(Arc::from),
    }
}

fn snapshot(version: u64, members: &[&RoomMember]) -> Tell {
    Tell::Snapshot {
        version,
        members: members.iter().map(|&m| m.clone()).collect(),
    }
}

fn record(version: u64, member: &RoomMember, joined: bool) -> Tell {
    Tell::Record {
        version,
        member: member.clone(),
        joined,
    }
}

#[test]
fn the_home_numbers_each_holders_view_and_never_tells_a_worker_its_own_change() {
    let mut home = Home::default();
    let mut out = Vec::new();
    for worker in 0..3 {
        home.follow("lobby", worker, &mut out);
    }
    // Each view starts above every version given out before it.
    assert_eq!(
        std::mem::take(&mut out),
        [
            (0, snapshot(1, &[])),
            (1, snapshot(2, &[])),
            (2, snapshot(3, &[]))
        ]
    );
    let bob = seat(1, 7, "bob", None);
    home.joined("lobby", bob.clone(), &mut out);
    // Once to each other holder, each in its own view's next version; none to worker 1.
    assert_eq!(
        std::mem::take(&mut out),
        [(0, record(2, &bob, true)), (2, record(4, &bob, true))]
    );
    let alice = seat(0, 3, "alice", None);
    home.joined("lobby", alice.clone(), &mut out);
    assert_eq!(
        std::mem::take(&mut out),
        [(1, record(3, &alice, true)), (2, record(5, &alice, true))]
    );
    // A new info (a token refresh) is told like a join; the rosters only take the info.
    let bob_named = seat(1, 7, "bob", Some(r#"{"name":"Bob"}"#));
    home.joined("lobby", bob_named.clone(), &mut out);
    assert_eq!(
        std::mem::take(&mut out),
        [
            (0, record(3, &bob_named, true)),
            (2, record(6, &bob_named, true))
        ]
    );
    // A new holder's snapshot lists every other worker's members, as they are now, at a
    // version above every one given out (6).
    home.follow("lobby", 3, &mut out);
    assert_eq!(
        std::mem::take(&mut out),
        [(3, snapshot(7, &[&alice, &bob_named]))]
    );
    assert_eq!(home.members(), 2);
    home.left("lobby", 1, 7, &mut out);
    assert_eq!(
        std::mem::take(&mut out),
        [
            (0, record(4, &bob_named, false)),
            (2, record(7, &bob_named, false)),
            (3, record(8, &bob_named, false))
        ]
    );
    // A leave told twice changes nothing and is told to nobody.
    home.left("lobby", 1, 7, &mut out);
    assert!(out.is_empty());
    assert_eq!(home.members(), 1);
}

#[test]
fn a_holder_that_stops_takes_its_members_out_and_its_next_view_starts_above_the_old() {
    let mut home = Home::default();
    let mut out = Vec::new();
    home.follow("lobby", 0, &mut out);
    home.follow("lobby", 1, &mut out);
    let (b1, b2) = (seat(1, 1, "bob", None), seat(1, 2, "bob", None));
    home.joined("lobby", b1.clone(), &mut out);
    home.joined("lobby", b2.clone(), &mut out);
    out.clear();
    // Worker 1 stops holding the room with two members still listed: both leave, told to 0.
    home.unfollow("lobby", 1, &mut out);
    assert_eq!(
        std::mem::take(&mut out),
        [(0, record(4, &b1, false)), (0, record(5, &b2, false))]
    );
    assert_eq!(home.members(), 0);
    // Its next view starts above every version it could still have on its way (5).
    home.follow("lobby", 1, &mut out);
    assert_eq!(std::mem::take(&mut out), [(1, snapshot(6, &[]))]);
    // A room with neither members nor holders is forgotten; its next view still starts higher.
    home.unfollow("lobby", 0, &mut out);
    home.unfollow("lobby", 1, &mut out);
    home.follow("lobby", 0, &mut out);
    assert_eq!(std::mem::take(&mut out), [(0, snapshot(7, &[]))]);
}

/// `n` workers' engines, rooms without history.
fn cluster(n: usize) -> Vec<BusEngine> {
    let rings = (0..n).map(|_| Arc::new(|| {}) as Wake).collect();
    let limits = Limits {
        per_stream: 100,
        ttl_ms: 60_000,
        max_bytes: 1 << 20,
    };
    let history = Limits {
        per_stream: 0,
        ..limits
    };
    links(rings, now())
        .into_iter()
        .map(|link| {
            let dedup = Dedup::new(16, Duration::from_secs(60), 1 << 20);
            BusEngine::new(link, limits, history, dedup, now())
        })
        .collect()
}

/// Polls every engine until none has anything more: the presence changes each handed out.
fn settle_presence(engines: &mut [BusEngine]) -> Vec<Vec<PresenceChange>> {
    let mut out: Vec<Vec<PresenceChange>> = engines.iter().map(|_| Vec::new()).collect();
    for _ in 0..4 {
        for (i, e) in engines.iter_mut().enumerate() {
            let mut events = Vec::new();
            e.poll(&mut events);
            out[i].extend(events.into_iter().filter_map(|e| match e {
                Event::Presence(change) => Some(change),
                _ => None,
            }));
        }
    }
    out
}

/// (id, joined) of each change.
fn heard(changes: &[PresenceChange]) -> Vec<(String, bool)> {
    changes
        .iter()
        .map(|c| (c.member.id.to_string(), c.joined))
        .collect()
}

fn listed(engine: &BusEngine, room: &str) -> Vec<(String, u64)> {
    let mut ids: Vec<(String, u64)> = engine
        .remote_members(room)
        .iter()
        .map(|m| (m.id.to_string(), m.key.conn))
        .collect();
    ids.sort();
    ids
}

/// As the hub does for its first member of a room: `joined`, then `member_joined`.
fn member_joins(engine: &mut BusEngine, room: &str, conn: u64, id: &str) {
    engine.joined(room);
    engine.member_joined(
        room,
        LocalMember {
            conn,
            id,
            info: None,
        },
    );
}

/// As the hub joins its first member of a room: the room's recovery, and in the poll that
/// hands out its answer, `joined` and `member_joined`. Then every engine is settled; returns
/// the presence changes each handed out meanwhile.
fn first_join(
    engines: &mut [BusEngine],
    on: usize,
    room: &str,
    conn: u64,
    id: &str,
) -> Vec<Vec<PresenceChange>> {
    let ticket = Ticket(1_000 + conn + 100 * on as u64);
    engines[on].recover(ticket, &StreamId::room(room), None, now());
    let mut heard: Vec<Vec<PresenceChange>> = engines.iter().map(|_| Vec::new()).collect();
    let mut answered = false;
    for _ in 0..4 {
        for (i, e) in engines.iter_mut().enumerate() {
            let mut events = Vec::new();
            e.poll(&mut events);
            for event in events {
                match event {
                    Event::Presence(change) => heard[i].push(change),
                    Event::Completed(c) if i == on && c.ticket == ticket => {
                        answered = true;
                        e.joined(room);
                        let member = LocalMember {
                            conn,
                            id,
                            info: None,
                        };
                        e.member_joined(room, member);
                    }
                    _ => {}
                }
            }
        }
    }
    assert!(answered, "the recovery was answered");
    for (i, more) in settle_presence(engines).into_iter().enumerate() {
        heard[i].extend(more);
    }
    heard
}

#[test]
fn a_change_on_one_worker_reaches_every_other_holder_once_wherever_the_room_is_homed() {
    for room_home in 0..3 {
        let mut engines = cluster(3);
        let room = (0..)
            .map(|i| format!("r{i}"))
            .find(|r| home(&StreamId::room(r), 3) == room_home)
            .unwrap();
        // Alice on worker 0 first: nobody else holds the room, nobody hears it.
        let heard_now = first_join(&mut engines, 0, &room, 1, "alice");
        assert!(heard_now.iter().all(Vec::is_empty), "{heard_now:?}");
        // Bob joins on worker 1: worker 0 hears it once. Worker 1's hub told its own, and its
        // snapshot (alice) came before its member's join was confirmed: it hears nothing, as a
        // joiner on one worker hears no earlier join, but it lists alice.
        let heard_now = first_join(&mut engines, 1, &room, 1, "bob");
        assert_eq!(heard(&heard_now[0]), [("bob".into(), true)]);
        assert!(heard_now[1].is_empty() && heard_now[2].is_empty());
        assert_eq!(listed(&engines[1], &room), [("alice".into(), 1)]);
        // Bob's second device, on worker 2: two connections of one id, two members.
        let heard_now = first_join(&mut engines, 2, &room, 1, "bob");
        assert_eq!(heard(&heard_now[0]), [("bob".into(), true)]);
        assert_eq!(heard(&heard_now[1]), [("bob".into(), true)]);
        assert!(heard_now[2].is_empty());
        assert_eq!(
            listed(&engines[0], &room),
            [("bob".into(), 1), ("bob".into(), 1)]
        );
        assert_eq!(
            listed(&engines[1], &room),
            [("alice".into(), 1), ("bob".into(), 1)]
        );
        assert_eq!(
            listed(&engines[2], &room),
            [("alice".into(), 1), ("bob".into(), 1)]
        );
        // Bob's device on worker 1 closes (as the hub does: `member_left`, then `left`).
        engines[1].member_left(&room, 1);
        engines[1].left(&room);
        let heard_now = settle_presence(&mut engines);
        assert_eq!(heard(&heard_now[0]), [("bob".into(), false)]);
        assert_eq!(heard(&heard_now[2]), [("bob".into(), false)]);
        assert!(heard_now[1].is_empty(), "it holds the room no more");
        assert!(listed(&engines[1], &room).is_empty());
        assert_eq!(listed(&engines[0], &room), [("bob".into(), 1)]);
        // Told once per other holder and change: alice's join (to nobody), bob's (to 0), bob's
        // second device (to 0 and 1), bob's leave (to 0 and 2).
        let records: u64 = engines.iter().map(|e| e.presence_records()).sum();
        assert_eq!(records, 5, "room homed at {room_home}");
        assert_eq!(engines[room_home].presence_members(), 2);
    }
}

#[test]
fn a_worker_that_holds_a_room_again_ignores_what_was_told_to_its_old_view() {
    let mut engines = cluster(3);
    let room = (0..)
        .map(|i| format!("r{i}"))
        .find(|r| home(&StreamId::room(r), 3) == 2)
        .unwrap();
    engines[1].joined(&room);
    settle_presence(&mut engines);
    // Alice joins on worker 0 and leaves again; the home tells worker 1 both, but worker 1
    // does not read its queue before its hub leaves the room and joins it again.
    member_joins(&mut engines[0], &room, 1, "alice");
    engines[0].member_left(&room, 1);
    engines[0].left(&room);
    engines[2].poll(&mut Vec::new());
    engines[1].left(&room);
    engines[1].joined(&room);
    let heard_now = settle_presence(&mut engines);
    // Both records were for the old view: the new one starts from a snapshot that is newer.
    assert!(heard_now[1].is_empty(), "{:?}", heard(&heard_now[1]));
    assert!(listed(&engines[1], &room).is_empty());
}

/// A holder whose queue is full is not sent records (a client joining and leaving in a loop must
/// not grow it without bound): it is owed one snapshot, sent once its queue is down to half,
/// and its hub then hears what changed, complete.
#[test]
fn records_for_a_holder_whose_queue_is_full_are_folded_into_one_snapshot() {
    let mut engines = cluster(2);
    let room = (0..)
        .map(|i| format!("r{i}"))
        .find(|r| home(&StreamId::room(r), 2) == 0)
        .unwrap();
    first_join(&mut engines, 1, &room, 1, "bob");
    let depth = |e: &BusEngine| e.link.fabric.depth[1].load(Ordering::Relaxed);
    let full = |e: &BusEngine| e.link.fabric.depth[1].store(ARRIVED_LIMIT, Ordering::Relaxed);
    // Worker 1's queue is full (as if it lagged): alice joins and leaves ten times, then carol
    // joins, on the home worker. Nothing is sent to worker 1.
    full(&engines[0]);
    for _ in 0..10 {
        member_joins(&mut engines[0], &room, 1, "alice");
        engines[0].member_left(&room, 1);
    }
    member_joins(&mut engines[0], &room, 2, "carol");
    engines[0].poll(&mut Vec::new());
    assert_eq!(
        depth(&engines[0]),
        ARRIVED_LIMIT,
        "no presence note was queued"
    );
    assert_eq!(engines[0].presence.deferred, 21);
    // Still full at the home's next poll: still nothing.
    engines[0].poll(&mut Vec::new());
    assert_eq!(depth(&engines[0]), ARRIVED_LIMIT);
    // Down to half: one snapshot, and worker 1's hub hears the net change (carol joined).
    engines[0].link.fabric.depth[1].store(ARRIVED_LIMIT / 2, Ordering::Relaxed);
    engines[0].poll(&mut Vec::new());
    assert_eq!(depth(&engines[0]), ARRIVED_LIMIT / 2 + 1, "one snapshot");
    engines[0].link.fabric.depth[1].store(1, Ordering::Relaxed);
    let heard_now = settle_presence(&mut engines);
    assert_eq!(heard(&heard_now[1]), [("carol".into(), true)]);
    assert_eq!(listed(&engines[1], &room), [("carol".into(), 2)]);
    // Records flow again afterwards, in the view's next versions.
    engines[0].member_left(&room, 2);
    let heard_now = settle_presence(&mut engines);
    assert_eq!(heard(&heard_now[1]), [("carol".into(), false)]);
    assert!(listed(&engines[1], &room).is_empty());
}

#[test]
fn each_id_online_counts_once_at_its_inboxs_home() {
    let mut engines = cluster(3);
    for (on, id) in [(0, "x"), (1, "x"), (2, "x"), (1, "y"), (2, "z")] {
        engines[on].online(id);
    }
    settle_presence(&mut engines);
    let total =
        |engines: &[BusEngine]| -> usize { engines.iter().map(|e| e.ids_online().unwrap()).sum() };
    assert_eq!(total(&engines), 3);
    for engine in &mut engines {
        engine.offline(&Rc::from("x"), now());
    }
    settle_presence(&mut engines);
    assert_eq!(total(&engines), 2);
}

// ----- homes with a file engine (`--data-dir`): the local engine completes later -----------

mod durable {
    use super::*;
    use crate::engine::{FsyncPolicy, Refusal, StoreFault};
    use std::path::Path;
    use std::sync::atomic::AtomicBool;

    /// Two workers whose homes keep their streams in `dir/worker-<i>`, with `epoch`.
    fn file_pair(dir: &Path, epoch: Epoch, fault: &StoreFault) -> Pair {
        let (wakes, rings) = counted_wakes();
        let engines = links_with_epoch(rings, now(), epoch)
            .into_iter()
            .enumerate()
            .map(|(i, link)| {
                let config = FileConfig {
                    dir: dir.join(format!("worker-{i}")),
                    fsync: FsyncPolicy::Batch,
                    segment_bytes: crate::engine::file::SEGMENT_BYTES,
                    limits: Limits {
                        per_stream: 100,
                        ttl_ms: 60_000,
                        max_bytes: 1 << 20,
                    },
                    room_history: Limits {
                        per_stream: 10,
                        ttl_ms: 60_000,
                        max_bytes: 1 << 20,
                    },
                    dedup_window: 16,
                    dedup_idle: Duration::from_secs(60),
                    dedup_max_bytes: 1 << 20,
                    fault: fault.clone(),
                };
                BusEngine::with_file(link, config, now()).expect("open the worker's log")
            })
            .collect();
        Pair {
            engines,
            wakes,
            next_ticket: 0,
        }
    }

    impl Pair {
        /// Polls both engines until `done` holds of what each handed out so far, waiting for
        /// the storage threads' wake-ups in between; fails the test after a deadline.
        fn until(&mut self, done: impl Fn(&[Vec<Event>; 2]) -> bool) -> [Vec<Event>; 2] {
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut out: [Vec<Event>; 2] = [Vec::new(), Vec::new()];
            loop {
                let rung: usize = self.wakes.iter().map(|w| w.load(Ordering::Relaxed)).sum();
                for (i, e) in self.engines.iter_mut().enumerate() {
                    e.poll(&mut out[i]);
                }
                if done(&out) {
                    return out;
                }
                // Nothing more until a storage thread (or the other worker) rings.
                while rung
                    == self
                        .wakes
                        .iter()
                        .map(|w| w.load(Ordering::Relaxed))
                        .sum::<usize>()
                {
                    assert!(Instant::now() < deadline, "never done: {out:?}");
                    std::thread::yield_now();
                }
            }
        }
    }

    fn stored(outcome: &Outcome) -> Position {
        match outcome {
            Outcome::Stored { position } | Outcome::StoredOnlineElsewhere { position } => *position,
            other => panic!("not stored: {other:?}"),
        }
    }

    #[test]
    fn a_file_home_answers_and_fans_out_in_submission_order_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let epoch = Epoch(0x1234);
        let mut p = file_pair(dir.path(), epoch, &StoreFault::Off);
        let bob = homed(1, StreamId::inbox);
        p.engines[0].online(&bob);
        p.settle();
        // From the other worker, and (once the home took that request) from the home itself.
        let t1 = p.append(0, &bob, Some("c1"));
        let mut one = Vec::new();
        p.engines[1].poll(&mut one);
        let t2 = p.append(1, &bob, Some("c2"));
        // How soon the storage thread has written cannot be held from here, so nothing is
        // asserted about the moment in between: the home fans out and answers from its local
        // engine's completions only, which a failing store turns into refusals with nothing
        // fanned out (`a_failing_store_on_one_worker_degrades_the_health_of_both`), and the
        // integration tests kill the process after the acks.
        let [zero, one] = p.until(|[zero, one]| {
            completed(zero).len() == 1 && !completed(one).is_empty() && !arrived(zero).is_empty()
        });
        let first = completed(&zero);
        assert_eq!(first[0].0, t1);
        assert!(
            matches!(first[0].1, Outcome::Stored { .. }),
            "bob's connection is on the sender's worker, which delivers it itself"
        );
        let p1 = stored(first[0].1);
        let second = completed(&one);
        assert_eq!(second.len(), 1);
        assert_eq!(second[0].0, t2);
        assert!(
            matches!(second[0].1, Outcome::StoredOnlineElsewhere { .. }),
            "{second:?}"
        );
        let p2 = stored(second[0].1);
        assert!(p1 < p2, "positions in the order of submission");
        assert_eq!(
            arrived(&zero),
            [(&StreamId::inbox(&bob), p2)],
            "the home's own message reaches bob's worker, once on disk"
        );
        assert!(p.engines[1].serving.is_empty());
        drop(p);

        // A restart with the same number of workers: both messages are in the home's log,
        // pending, and new positions come after them whichever worker's log hands them out.
        let mut p = file_pair(dir.path(), epoch, &StoreFault::Off);
        let t = p.ticket();
        p.engines[0].recover(t, &StreamId::inbox(&bob), None, now());
        let [zero, _] = p.until(|[zero, _]| !zero.is_empty());
        let done = completed(&zero);
        let [(ticket, Outcome::Recovered(recovery))] = &done[..] else {
            panic!("the recovery alone: {done:?}");
        };
        assert_eq!(*ticket, t);
        assert_eq!(recovery.epoch, epoch);
        let positions: Vec<Position> = recovery.messages.iter().map(|m| m.position).collect();
        assert_eq!(positions, [p1, p2]);
        assert!(recovery.messages.iter().all(|m| m.pending));
        let near = homed(0, StreamId::inbox);
        let t3 = p.append(0, &near, None);
        let [zero, _] = p.until(|[zero, _]| !zero.is_empty());
        let done = completed(&zero);
        assert_eq!(done[0].0, t3);
        assert!(
            stored(done[0].1) > p2,
            "worker 0's counter starts above worker 1's log"
        );
        // The duplicate window of a message sent to bob is in his home's log.
        let again = p.append(1, &bob, Some("c2"));
        let [_, one] = p.until(|[_, one]| !one.is_empty());
        let done = completed(&one);
        assert!(
            matches!(done[..], [(t, Outcome::Duplicate { position, .. })] if t == again && *position == p2),
            "{done:?}"
        );
    }

    #[test]
    fn a_worker_log_of_another_epoch_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = file_pair(dir.path(), Epoch(1), &StoreFault::Off);
        let bob = homed(0, StreamId::inbox);
        p.append(0, &bob, None);
        p.until(|[zero, _]| !zero.is_empty());
        drop(p);
        let link = links_with_epoch(vec![Arc::new(|| ()) as Wake], now(), Epoch(2))
            .pop()
            .unwrap();
        let config = FileConfig {
            dir: dir.path().join("worker-0"),
            fsync: FsyncPolicy::Batch,
            segment_bytes: crate::engine::file::SEGMENT_BYTES,
            limits: Limits {
                per_stream: 100,
                ttl_ms: 60_000,
                max_bytes: 1 << 20,
            },
            room_history: Limits {
                per_stream: 0,
                ttl_ms: 0,
                max_bytes: 0,
            },
            dedup_window: 16,
            dedup_idle: Duration::from_secs(60),
            dedup_max_bytes: 1 << 20,
            fault: StoreFault::Off,
        };
        let Err(err) = BusEngine::with_file(link, config, now()) else {
            panic!("opened a log of another epoch");
        };
        assert!(matches!(err, OpenError::Epoch { .. }), "{err}");
    }

    #[test]
    fn a_failing_store_on_one_worker_degrades_the_health_of_both() {
        let dir = tempfile::tempdir().unwrap();
        let flag = Arc::new(AtomicBool::new(false));
        let mut p = file_pair(dir.path(), Epoch(7), &StoreFault::Flag(Arc::clone(&flag)));
        let bob = homed(1, StreamId::inbox);
        // Each log's first batch is written (worker 0's log then has nothing to write below).
        p.append(0, &homed(0, StreamId::inbox), None);
        p.append(1, &bob, None);
        p.until(|[zero, one]| !zero.is_empty() && !one.is_empty());
        assert!(p.engines[0].health().is_none() && p.engines[1].health().is_none());
        flag.store(true, Ordering::Relaxed);
        p.append(0, &bob, None);
        let [zero, _] = p.until(|[zero, _]| !zero.is_empty());
        assert!(matches!(
            completed(&zero)[..],
            [(_, Outcome::Rejected(Refusal::Store(_)))]
        ));
        for e in &p.engines {
            let why = e.health().expect("degraded");
            assert!(why.starts_with("worker 1: writes to the data dir"), "{why}");
        }
        // A message the home's log refused reaches nobody: bob is online on worker 0, and the
        // home (which fans out before it hands out its own completion) sent it no arrival.
        p.engines[0].online(&bob);
        p.settle();
        p.append(1, &bob, None);
        let [_, one] = p.until(|[_, one]| !one.is_empty());
        assert!(matches!(
            completed(&one)[..],
            [(_, Outcome::Rejected(Refusal::Store(_)))]
        ));
        let [zero, _] = p.settle();
        assert!(arrived(&zero).is_empty(), "{zero:?}");
        flag.store(false, Ordering::Relaxed);
        p.append(0, &bob, None);
        let [zero, _] = p.until(|[zero, _]| !zero.is_empty());
        assert!(matches!(
            completed(&zero)[..],
            [(_, Outcome::Stored { .. })]
        ));
        assert!(p.engines[0].health().is_none() && p.engines[1].health().is_none());
    }
}
