//! The server API with `--workers 2` (SPEC §14, §16; docs/api.md, "With several workers"):
//! every endpoint answers for the whole process whichever worker its connection lands on.
//! Clients and API connections are placed on chosen workers through the per-worker accept
//! counters (`Placement`, workers_ws.rs), so "bob on worker 0, asked on worker 1" is checked,
//! never assumed; rooms and ids are chosen by their home worker where it matters.

use crate::api::{Api, KEY};
use crate::poller_tests;
use crate::relay_support::*;
use crate::support::*;
use crate::workers_ws::{id_homed, room_homed, Placement, WORKERS};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use tungstenite::Message;

const SECRET: &str = "workers api secret";

fn start(poller: &str, extra: &[&str]) -> Server {
    let mut args = vec!["--workers", "2", "--api-key", KEY];
    args.extend_from_slice(extra);
    Server::start(poller, &args)
}

/// One API connection on each worker, by index.
fn apis(server: &Server, placement: &mut Placement) -> Vec<Api> {
    (0..WORKERS)
        .map(|w| Api::on(placement.tcp_on(server, w)))
        .collect()
}

/// The next message that is not a presence event (whether presence crosses workers is not
/// what these tests are about).
fn next_message(c: &mut Client) -> Value {
    loop {
        let m = c.recv();
        if m["type"] != "presence" {
            return m;
        }
    }
}

/// Joins `room` and waits for `joined` (after which the member is in the room on its worker).
fn join(c: &mut Client, room: &str) {
    c.send(json!({"type": "join", "room": room}));
    let joined = next_message(c);
    assert_eq!(joined["type"], "joined", "{joined}");
    assert_eq!(joined["room"], room, "{joined}");
}

/// The close code and reason the server sent.
fn closed_with(c: &mut Client) -> (u16, String) {
    loop {
        match c.ws.read() {
            Ok(Message::Close(Some(frame))) => {
                return (u16::from(frame.code), frame.reason.to_string())
            }
            Ok(Message::Close(None)) => panic!("close without a code"),
            Ok(_) => continue,
            Err(e) => panic!("connection ended without a close frame: {e}"),
        }
    }
}

/// Asks `path` until `done` holds for the answer (the server's own view of closes the test
/// caused), failing after `DEADLINE`.
fn wait_until(api: &mut Api, path: &str, done: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        let answer = api.call("GET", path, "");
        assert_eq!(answer.status, 200, "{}", answer.json);
        if done(&answer.json) {
            return answer.json;
        }
        assert!(start.elapsed() < DEADLINE, "{path}: {}", answer.json);
        std::thread::sleep(Duration::from_millis(10)); // poll interval
    }
}

fn api_metric(server: &Server, endpoint: &str, status: u16) -> f64 {
    server.metric(&format!(
        "wsrelay_api_requests_total{{endpoint=\"{endpoint}\",status=\"{status}\"}}"
    ))
}

/// Presence, rooms and ids with members on both workers, asked on each: the same
/// process-wide answer, an id on two workers merged into one entry with its connections
/// summed and its token's `info` kept.
fn queries_answer_for_the_whole_process_from_either_worker(poller: &str) {
    let server = start(poller, &["--jwt-secret", SECRET]);
    let token = |claims: Value| {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    };
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let info = json!({"name": "Ann"});
    let ann = token(json!({"sub": "ann", "exp": exp, "info": info}));
    let bob = token(json!({"sub": "bob", "exp": exp}));
    let carol = token(json!({"sub": "carol", "exp": exp}));
    let dave = token(json!({"sub": "dave", "exp": exp}));
    let mut placement = Placement::new();
    let mut clients = Vec::new();
    for (worker, token, room) in [
        (0, &bob, "lobby"),
        (1, &ann, "lobby"),
        (1, &bob, "lobby"),
        (1, &carol, "games"),
        (0, &dave, "games"),
    ] {
        let (mut c, _) = placement.client(&server, worker, &format!("/ws?token={token}"));
        join(&mut c, room);
        clients.push(c);
    }
    let mut apis = apis(&server, &mut placement);
    for (worker, api) in apis.iter_mut().enumerate() {
        let presence = api.call("GET", "/api/presence?room=lobby", "");
        assert_eq!(presence.status, 200, "worker {worker}: {}", presence.json);
        assert_eq!(
            presence.json,
            json!({"room": "lobby", "members": [
                {"id": "ann", "connections": 1, "info": info},
                {"id": "bob", "connections": 2, "info": null},
            ]}),
            "asked on worker {worker}"
        );
        assert_eq!(
            api.call("GET", "/api/rooms", "").json,
            json!({"rooms": [
                {"room": "games", "members": 2, "connections": 2},
                {"room": "lobby", "members": 2, "connections": 3},
            ]}),
            "asked on worker {worker}"
        );
        for (id, connections) in [("bob", 2), ("ann", 1), ("dave", 1), ("nobody", 0)] {
            assert_eq!(
                api.call("GET", &format!("/api/ids/{id}"), "").json,
                json!({"id": id, "online": connections > 0, "connections": connections}),
                "asked on worker {worker}"
            );
        }
        assert_eq!(
            api.call("GET", "/api/presence?room=empty", "").json,
            json!({"room": "empty", "members": []})
        );
        // The checks before the question are the answering worker's own, as with one worker.
        assert_eq!(api.call("GET", "/api/presence", "").status, 400);
        assert_eq!(api.call("POST", "/api/rooms", "").status, 405);
    }
    // The API's metrics are the process's: each worker counted what it answered.
    assert_eq!(api_metric(&server, "presence", 200), 4.0);
    assert_eq!(api_metric(&server, "rooms", 200), 2.0);
    assert_eq!(api_metric(&server, "ids", 200), 8.0);
    assert_eq!(api_metric(&server, "presence", 400), 2.0);
    assert_eq!(api_metric(&server, "rooms", 405), 2.0);
    assert_eq!(server.metric("wsrelay_api_workers_unanswered_total"), 0.0);
    // A member that leaves is gone from the answer of either worker.
    let bob_on_1 = &mut clients[2];
    bob_on_1.send(json!({"type": "leave", "room": "lobby"}));
    let presence = wait_until(&mut apis[0], "/api/presence?room=lobby", |v| {
        v["members"][1]["connections"] == 1
    });
    assert_eq!(
        presence["members"][1],
        json!({"id": "bob", "connections": 1, "info": null})
    );
}

/// A publish landing on either worker reaches room members on both workers once each, in
/// order; a direct message to an id online only on the other worker is `delivered`; one to
/// an id online nowhere is `queued` and delivered when it connects, on either worker.
fn publishes_reach_every_worker(poller: &str) {
    let server = start(poller, &[]);
    let mut placement = Placement::new();
    let mut apis = apis(&server, &mut placement);
    // A room homed on each worker: the message crosses before or after it is stored.
    for home in 0..WORKERS {
        let room = room_homed(home, "hall");
        let mut members: Vec<Client> = (0..WORKERS)
            .map(|w| {
                let mut c = placement.id(&server, w, &format!("m{w}"));
                join(&mut c, &room);
                c
            })
            .collect();
        for round in 0..3 {
            for (worker, api) in apis.iter_mut().enumerate() {
                let payload = json!({"round": round, "via": worker});
                let answer = api.publish(json!({"room": room, "payload": payload}));
                assert_eq!(answer.status, 200);
                assert_eq!(answer.json["status"], "delivered", "{}", answer.json);
                for (w, member) in members.iter_mut().enumerate() {
                    let m = next_message(member);
                    assert_eq!(m["type"], "message", "member on worker {w}: {m}");
                    assert_eq!(m["payload"], payload, "member on worker {w}");
                    assert_eq!(m["room"], room.as_str());
                    assert_eq!(m["from"], "api");
                    assert_eq!(m["msg_id"], answer.json["msg_id"]);
                }
            }
        }
        // Once each: a last message is the next thing every member reads.
        let end = apis[0].publish(json!({"room": room, "payload": "end"}));
        for member in &mut members {
            assert_eq!(next_message(member)["msg_id"], end.json["msg_id"]);
        }
        for (w, member) in members.into_iter().enumerate() {
            placement.close(&server, w, member);
        }
    }
    // An id online on the other worker only, its inbox homed on either worker.
    for (worker, api) in apis.iter_mut().enumerate() {
        let other = 1 - worker;
        for home in 0..WORKERS {
            let id = id_homed(home, &format!("to{worker}-"));
            let mut client = placement.id(&server, other, &id);
            let answer = api.publish(json!({"to": id, "payload": {"hi": worker}, "from": "ops"}));
            assert_eq!(
                answer.json["status"], "delivered",
                "asked on worker {worker}, {id} on worker {other}: {}",
                answer.json
            );
            let m = next_message(&mut client);
            assert_eq!(m["payload"], json!({"hi": worker}), "{m}");
            assert_eq!(m["from"], "ops");
            assert_eq!(m["msg_id"], answer.json["msg_id"]);
            placement.close(&server, other, client);
        }
    }
    // An id online nowhere: queued, then delivered when it connects (on the other worker).
    for (worker, api) in apis.iter_mut().enumerate() {
        let id = format!("later{worker}");
        let mut ids = Vec::new();
        for n in 0..3 {
            let answer = api.publish(json!({"to": id, "payload": n}));
            assert_eq!(answer.json["status"], "queued", "{}", answer.json);
            ids.push(answer.json["msg_id"].clone());
        }
        let other = 1 - worker;
        let mut client = placement.id(&server, other, &id);
        for (n, msg_id) in ids.iter().enumerate() {
            let m = next_message(&mut client);
            assert_eq!(m["payload"], json!(n), "{m}");
            assert_eq!(&m["msg_id"], msg_id);
        }
        placement.close(&server, other, client);
    }
    assert_eq!(api_metric(&server, "publish", 200), 24.0);
}

/// A disconnect landing on one worker closes the id's connections on every worker, with the
/// code and reason asked for; the answer counts them all.
fn disconnect_closes_the_id_on_every_worker(poller: &str) {
    let server = start(poller, &[]);
    let mut placement = Placement::new();
    let mut apis = apis(&server, &mut placement);
    let mut eve: Vec<Client> = [0, 1, 1]
        .iter()
        .map(|&w| placement.id(&server, w, "eve"))
        .collect();
    let mut frank = placement.id(&server, 0, "frank");
    let answer = apis[0].call(
        "POST",
        "/api/disconnect",
        r#"{"id":"eve","code":4003,"reason":"kicked"}"#,
    );
    assert_eq!(answer.status, 200);
    assert_eq!(answer.json, json!({"id": "eve", "disconnected": 3}));
    for (i, device) in eve.iter_mut().enumerate() {
        assert_eq!(
            closed_with(device),
            (4003, "kicked".to_string()),
            "device {i}"
        );
    }
    drop(eve);
    // Gone everywhere, as either worker sees it; frank is untouched.
    for api in &mut apis {
        wait_until(api, "/api/ids/eve", |v| v["online"] == false);
        assert_eq!(api.call("GET", "/api/ids/frank", "").json["connections"], 1);
    }
    // From the other worker, for an id held only where the request did not land.
    let answer = apis[1].call("POST", "/api/disconnect", r#"{"id":"frank"}"#);
    assert_eq!(answer.json, json!({"id": "frank", "disconnected": 1}));
    assert_eq!(closed_with(&mut frank).0, 1000);
    let answer = apis[0].call("POST", "/api/disconnect", r#"{"id":"eve"}"#);
    assert_eq!(answer.json, json!({"id": "eve", "disconnected": 0}));
    assert_eq!(api_metric(&server, "disconnect", 200), 3.0);
}

poller_tests!(
    queries_answer_for_the_whole_process_from_either_worker,
    publishes_reach_every_worker,
    disconnect_closes_the_id_on_every_worker,
);
