//! Token claims, refresh and expiry (SPEC §16; docs/protocol.md, "Access" and "Token refresh
//! and expiry") over real sockets, on every poller: the expiry is the reactor's app timer.
//!
//! Short lives are fractional `exp` claims (RFC 7519 §2 NumericDate allows them) with
//! `--jwt-leeway 0s`; a test waits for a close with the socket's read deadline, never a sleep.

use crate::client::ClientProcess;
use crate::poller_tests;
use crate::relay_support::*;
use crate::support::*;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::Message;

const SECRET: &str = "token tests secret";

/// Now plus `secs`, as a JWT NumericDate with millisecond precision.
fn exp_in(secs: f64) -> f64 {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    (now.as_millis() as f64 / 1000.0) + secs
}

fn token(claims: Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn server(poller: &str) -> Server {
    Server::start(poller, &["--jwt-secret", SECRET, "--jwt-leeway", "0s"])
}

fn connect(server: &Server, claims: Value) -> Client {
    Client::connect(server, &format!("/ws?token={}", token(claims))).0
}

/// `publish` is enforced apart from `rooms`: a member may listen where it may not speak.
fn the_publish_claim_is_enforced_apart_from_rooms(poller: &str) {
    let server = server(poller);
    let claims = json!({"sub": "ann", "exp": exp_in(3600.0), "rooms": ["lobby", "news"],
        "publish": ["lobby"]});
    let mut ann = connect(&server, claims.clone());
    ann.join("news", "ann");
    // Bob is in both rooms: he must get the allowed lobby message and nothing from news.
    let bob_token = token(json!({"sub": "bob", "exp": exp_in(3600.0)}));
    let mut bob = Client::connect(&server, &format!("/ws?token={bob_token}")).0;
    bob.join("news", "bob");
    bob.join("lobby", "bob");
    assert_eq!(ann.expect("presence")["id"], "bob");
    ann.send(json!({"type": "publish", "room": "news", "payload": 1, "id": "n1"}));
    let ack = ann.expect("ack");
    assert_eq!(ack["status"], "rejected", "{ack}");
    assert_eq!(
        ack["reason"],
        "your token does not allow publishing to this room"
    );
    ann.send(json!({"type": "publish", "room": "lobby", "payload": 2, "id": "l1"}));
    assert_eq!(ann.expect("ack")["status"], "delivered");
    // In order: had the news message been relayed, it would come first.
    let first = bob.expect("message");
    assert_eq!(
        (&first["room"], &first["payload"]),
        (&json!("lobby"), &json!(2))
    );

    // A raw room it may enter but not publish to: it listens, and speaking closes it (1008).
    let t = token(claims);
    let mut other = server.ws(&format!("/r/news?token={bob_token}"));
    let mut listener = server.ws(&format!("/r/news?token={t}"));
    listener.send(Message::text("hello")).unwrap();
    assert_eq!(close_code(&mut listener), CloseCode::Policy);
    assert_eq!(server.metric("wsrelay_token_publish_refusals_total"), 2.0);
    // The other member got nothing of it: the next thing it reads is a later message.
    let mut speaker = server.ws(&format!("/r/news?token={bob_token}"));
    speaker.send(Message::text("later")).unwrap();
    other.get_ref().set_read_timeout(Some(DEADLINE)).unwrap();
    assert_eq!(other.read().unwrap(), Message::text("later"));
}

/// `info` is shown to the others in presence events, `members`, and the server API's presence.
fn info_appears_in_presence_and_members(poller: &str) {
    let server = Server::start(
        poller,
        &[
            "--jwt-secret",
            SECRET,
            "--jwt-leeway",
            "0s",
            "--api-key",
            crate::api::KEY,
        ],
    );
    let info = json!({"name": "Ann", "color": "teal"});
    let mut bob = connect(&server, json!({"sub": "bob", "exp": exp_in(3600.0)}));
    bob.join("lobby", "bob");
    let mut ann = connect(
        &server,
        json!({"sub": "ann", "exp": exp_in(3600.0), "info": info}),
    );
    ann.send(json!({"type": "join", "room": "lobby"}));
    let join = json!({"type": "presence", "room": "lobby", "id": "ann", "event": "join",
        "info": info});
    assert_eq!(ann.expect("presence"), join);
    ann.expect("joined");
    assert_eq!(bob.expect("presence"), join);
    bob.send(json!({"type": "members", "room": "lobby"}));
    assert_eq!(
        bob.expect("members"),
        json!({"type": "members", "room": "lobby", "ids": ["ann", "bob"],
            "members": [{"id": "ann", "info": info}, {"id": "bob", "info": null}]})
    );
    let mut api = crate::api::Api::connect(&server);
    assert_eq!(
        api.call("GET", "/api/presence?room=lobby", "").json["members"],
        json!([{"id": "ann", "connections": 1, "info": info},
            {"id": "bob", "connections": 1, "info": null}])
    );
    // The backend has no token and needs none, also with --jwt-secret (tokens fail closed
    // for connections, not for the API's key holder).
    let published = api.call("POST", "/api/publish", r#"{"room":"lobby","payload":"hi"}"#);
    assert_eq!(published.json["status"], "delivered", "{}", published.json);
    assert_eq!(bob.expect("message")["payload"], "hi");
    assert_eq!(ann.expect("message")["payload"], "hi");
    drop(ann);
    assert_eq!(
        bob.expect("presence")["info"],
        info,
        "the leave carries it too"
    );
}

/// A refresh for another `sub` is refused with an error and changes nothing: the connection
/// stays open with its own token.
fn a_refresh_with_another_sub_is_refused(poller: &str) {
    let server = server(poller);
    let mut ann = connect(&server, json!({"sub": "ann", "exp": exp_in(3600.0)}));
    let mut bob = connect(&server, json!({"sub": "bob", "exp": exp_in(3600.0)}));
    bob.join("lobby", "bob");
    // Eve's token would narrow ann's rooms and publishing, and expire her early: refused, it
    // must change none of it. The witness, expiring with eve's token, tells when that is.
    let eve_exp = exp_in(3.0);
    let mut witness = connect(&server, json!({"sub": "wit", "exp": eve_exp}));
    let eve = token(json!({"sub": "eve", "exp": eve_exp, "rooms": ["elsewhere"],
        "publish": []}));
    ann.send(json!({"type": "refresh", "token": eve}));
    let error = ann.expect("error");
    assert_eq!(error["code"], "token_sub_mismatch", "{error}");
    assert_eq!(close_code(&mut witness.ws), CloseCode::from(4001));
    // Past eve's exp, ann keeps her own claims: she may join and publish to the lobby.
    ann.join("lobby", "ann");
    assert_eq!(bob.expect("presence")["id"], "ann");
    ann.send(json!({"type": "publish", "room": "lobby", "payload": "still", "id": "s"}));
    assert_eq!(ann.expect("ack")["status"], "delivered");
    assert_eq!(bob.expect("message")["payload"], "still");
    assert_eq!(server.metric("wsrelay_token_expiries_total"), 1.0);
    assert_eq!(
        server.metric("wsrelay_token_refresh_refusals_total{reason=\"token_sub_mismatch\"}"),
        1.0
    );
    assert_eq!(
        server.metric("wsrelay_token_refreshes_total{result=\"refused\"}"),
        1.0
    );
}

/// Without a refresh a connection is closed with 4001 when its token expires; with one it
/// lives on past the old expiry. The unrefreshed witness, whose token expires with the first
/// token of the refreshed one, is how the test knows that moment has passed.
fn a_refresh_extends_life_and_expiry_closes_with_4001(poller: &str) {
    let server = server(poller);
    // Long enough for two connections and a refresh on a loaded machine.
    let exp = exp_in(3.0);
    let mut ann = connect(&server, json!({"sub": "ann", "exp": exp}));
    let mut witness = connect(&server, json!({"sub": "wit", "exp": exp}));
    let later = exp_in(3600.0);
    ann.send(json!({"type": "refresh", "token": token(json!({"sub": "ann", "exp": later}))}));
    assert_eq!(
        ann.expect("refreshed"),
        json!({"type": "refreshed", "exp": later as u64})
    );

    witness
        .ws
        .get_ref()
        .set_read_timeout(Some(DEADLINE))
        .unwrap();
    match witness.ws.read() {
        Ok(Message::Close(Some(frame))) => {
            assert_eq!(u16::from(frame.code), 4001);
            assert_eq!(frame.reason.as_str(), "token expired");
        }
        other => panic!("expected Close 4001, got {other:?}"),
    }
    // Never early (with --jwt-leeway 0s): by the wall clock, the close comes at exp or after.
    // A lower bound only: how late depends on the machine's load.
    let closed_at = exp_in(0.0);
    assert!(closed_at >= exp, "closed at {closed_at}, before exp {exp}");

    // Past the old expiry, the refreshed connection is open and served.
    ann.join("lobby", "ann");
    assert_eq!(server.metric("wsrelay_token_expiries_total"), 1.0);
    assert_eq!(
        server.metric("wsrelay_token_refreshes_total{result=\"ok\"}"),
        1.0
    );
    assert_eq!(
        server.metric("wsrelay_closes_sent_total{code=\"4001\"}"),
        1.0
    );
    assert_eq!(server.metric("wsrelay_token_connections"), 1.0);
}

/// A raw room connection cannot refresh (raw rooms have no envelope): it is closed with 4001
/// too, and reconnects with a new token.
fn a_raw_room_connection_expires_with_4001(poller: &str) {
    let server = server(poller);
    let t = token(json!({"sub": "ann", "exp": exp_in(2.0)}));
    let mut ws = server.ws(&format!("/r/lobby?token={t}"));
    assert_eq!(close_code(&mut ws), CloseCode::from(4001));
    assert_eq!(server.metric("wsrelay_token_expiries_total"), 1.0);
}

/// Every token metric is printed from the start, so a scrape (and an alert) sees them at 0.
fn token_metrics_are_present_from_the_start(poller: &str) {
    let server = server(poller);
    for sample in [
        "wsrelay_token_connections",
        "wsrelay_token_refreshes_total{result=\"ok\"}",
        "wsrelay_token_refreshes_total{result=\"refused\"}",
        "wsrelay_token_expiries_total",
        "wsrelay_token_publish_refusals_total",
    ] {
        assert_eq!(server.metric(sample), 0.0, "{sample}");
    }
}

/// A `--token-cmd` that prints the given tokens in turn, one per run: the test signs them, so
/// the command needs no JWT tooling. Returns the command and the directory (removed on drop).
struct TokenCommand {
    dir: std::path::PathBuf,
}

impl TokenCommand {
    fn new(name: &str, tokens: &[String]) -> TokenCommand {
        let dir = std::env::temp_dir().join(format!("wsrelay-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for (i, t) in tokens.iter().enumerate() {
            std::fs::write(dir.join(format!("t{i}")), format!("{t}\n")).unwrap();
        }
        TokenCommand { dir }
    }

    fn command(&self) -> String {
        let d = self.dir.display();
        format!("n=$(cat {d}/n 2>/dev/null || echo 0); echo $((n+1)) > {d}/n; cat {d}/t$n")
    }

    /// As `command`, but its second run waits until `open_gate` before it prints its token:
    /// a token issuer that is slow to answer.
    fn gated_command(&self) -> String {
        let d = self.dir.display();
        format!(
            "n=$(cat {d}/n 2>/dev/null || echo 0); echo $((n+1)) > {d}/n; \
             if [ $n -eq 1 ]; then while [ ! -e {d}/gate ]; do sleep 0.02; done; fi; cat {d}/t$n"
        )
    }

    fn open_gate(&self) {
        std::fs::write(self.dir.join("gate"), "").unwrap();
    }

    /// Waits (bounded) until the command has started `n` times.
    fn wait_runs(&self, n: u32) {
        let start = Instant::now();
        while self.runs() < n {
            assert!(
                start.elapsed() < DEADLINE,
                "{} runs, expected {n}",
                self.runs()
            );
            std::thread::sleep(Duration::from_millis(10)); // poll interval for a file
        }
    }

    /// How many times the command ran.
    fn runs(&self) -> u32 {
        std::fs::read_to_string(self.dir.join("n")).map_or(0, |n| n.trim().parse().unwrap())
    }
}

impl Drop for TokenCommand {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `wsrelay client --token-cmd` refreshes its token before it expires (at 80% of its life) and
/// stays on the same connection past the first token's expiry.
fn the_client_refreshes_its_token_and_stays_connected(poller: &str) {
    let server = server(poller);
    let first_exp = exp_in(3.0);
    let tokens = [
        token(json!({"sub": "alice", "exp": first_exp})),
        token(json!({"sub": "alice", "exp": exp_in(3600.0)})),
    ];
    let cmd = TokenCommand::new(&format!("refresh-{poller}"), &tokens);
    let mut client = ClientProcess::start(&["--token-cmd", &cmd.command(), &server.url("/ws")]);
    client.stderr_until("connected to");
    let mut bob = connect(&server, json!({"sub": "bob", "exp": exp_in(3600.0)}));
    let mut witness = connect(&server, json!({"sub": "wit", "exp": first_exp}));
    client.stderr_until("token refreshed");
    assert_eq!(close_code(&mut witness.ws), CloseCode::from(4001));

    // The first token has expired: the client is still on its first connection, and works.
    client.send_line("@bob after the first expiry");
    let message = bob.expect("message");
    assert_eq!(message["from"], "alice");
    assert_eq!(message["payload"], "after the first expiry");
    client.close_stdin();
    assert_eq!(client.wait_exit(), 0, "{}", client.log());
    let connects = client
        .log
        .iter()
        .filter(|l| l.contains("connected to"))
        .count();
    assert_eq!(connects, 1, "{}", client.log());
    assert_eq!(cmd.runs(), 2, "one token to connect, one to refresh");
    assert_eq!(
        server.metric("wsrelay_token_refreshes_total{result=\"ok\"}"),
        1.0
    );
    assert_eq!(server.metric("wsrelay_token_expiries_total"), 1.0);
}

/// While the token command of a refresh runs (an issuer slow to answer), the client keeps
/// reading: a message arriving meanwhile is printed before the command has printed its token,
/// and the refresh is sent when it has.
fn the_client_reads_while_its_token_command_runs(poller: &str) {
    let server = server(poller);
    // Refreshed at 80% of 10 s: the 2 s left are for the test's steps on a loaded machine.
    let tokens = [
        token(json!({"sub": "alice", "exp": exp_in(10.0)})),
        token(json!({"sub": "alice", "exp": exp_in(3600.0)})),
    ];
    let cmd = TokenCommand::new(&format!("slow-{poller}"), &tokens);
    let mut client =
        ClientProcess::start(&["--token-cmd", &cmd.gated_command(), &server.url("/ws")]);
    client.stderr_until("connected to");
    let mut bob = connect(&server, json!({"sub": "bob", "exp": exp_in(3600.0)}));
    cmd.wait_runs(2);
    bob.send(json!({"type": "send", "to": "alice", "payload": "meanwhile", "id": "b1"}));
    assert_eq!(bob.expect("ack")["status"], "delivered");
    let line = client.stdout_line();
    assert!(line.contains("meanwhile"), "{line}");
    // The command is still waiting for its gate: nothing else can have ended it but a kill.
    cmd.open_gate();
    client.stderr_until("token refreshed");
    assert!(!client.log().contains("did not finish"), "{}", client.log());
    assert_eq!(cmd.runs(), 2);
    assert_eq!(
        server.metric("wsrelay_token_refreshes_total{result=\"ok\"}"),
        1.0
    );
}

/// `--token-cmd` on a raw room: no `refresh` is sent there (a raw room has no envelope: it
/// would be an ordinary message, relayed to every member with the fresh token in it). The
/// relay closes with 4001 at the expiry, and the client reconnects with a new token.
fn a_raw_room_client_never_sends_its_token_to_the_room(poller: &str) {
    let server = server(poller);
    let tokens = [
        token(json!({"sub": "alice", "exp": exp_in(3.0)})),
        token(json!({"sub": "alice", "exp": exp_in(3600.0)})),
        token(json!({"sub": "alice", "exp": exp_in(3600.0)})),
    ];
    let cmd = TokenCommand::new(&format!("raw-{poller}"), &tokens);
    let peer_token = token(json!({"sub": "bob", "exp": exp_in(3600.0)}));
    let mut peer = server.ws(&format!("/r/lobby?token={peer_token}"));
    let mut client =
        ClientProcess::start(&["--token-cmd", &cmd.command(), &server.url("/r/lobby")]);
    client.stderr_until("connected to");
    client.stderr_until("token expired (close 4001)");
    client.stderr_until("connected to");
    client.send_line("after the reconnect");
    peer.get_ref().set_read_timeout(Some(DEADLINE)).unwrap();
    loop {
        match peer.read().expect("read within the deadline") {
            Message::Text(text) => {
                for t in &tokens {
                    assert!(!text.contains(t.as_str()), "the room got a token: {text}");
                }
                if text.as_str() == "after the reconnect" {
                    break;
                }
                panic!("unexpected message in the room: {text}");
            }
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("expected text, got {other:?}"),
        }
    }
    assert_eq!(
        cmd.runs(),
        2,
        "one token per connection, none for a refresh"
    );
}

/// When its token expires anyway (here the refresh is refused: the command printed a token for
/// another sub), the relay closes with 4001 and the client reconnects at once with a new token.
fn the_client_reconnects_with_a_new_token_after_4001(poller: &str) {
    let server = server(poller);
    let tokens = [
        token(json!({"sub": "alice", "exp": exp_in(3.0)})),
        token(json!({"sub": "mallory", "exp": exp_in(3600.0)})),
        token(json!({"sub": "alice", "exp": exp_in(3600.0)})),
    ];
    let cmd = TokenCommand::new(&format!("expiry-{poller}"), &tokens);
    let mut client = ClientProcess::start(&["--token-cmd", &cmd.command(), &server.url("/ws")]);
    client.stderr_until("connected to");
    client.stderr_until("token_sub_mismatch");
    client.stderr_until("token expired (close 4001)");
    client.stderr_until("connected to");
    assert_eq!(cmd.runs(), 3);
    let mut bob = connect(&server, json!({"sub": "bob", "exp": exp_in(3600.0)}));
    bob.send(json!({"type": "send", "to": "alice", "payload": "welcome back", "id": "b1"}));
    assert_eq!(bob.expect("ack")["status"], "delivered");
    let line = client.stdout_line();
    assert!(line.contains("welcome back"), "{line}");
    assert_eq!(server.metric("wsrelay_token_expiries_total"), 1.0);
}

/// With a fixed `--token` there is nothing to refresh with: 4001 ends the run (exit 2), saying
/// what to do.
fn a_fixed_token_that_expires_ends_the_client(poller: &str) {
    let server = server(poller);
    let t = token(json!({"sub": "alice", "exp": exp_in(2.0)}));
    let mut client = ClientProcess::start(&["--token", &t, &server.url("/ws")]);
    client.stderr_until("connected to");
    assert_eq!(client.wait_exit(), 2, "{}", client.log());
    assert!(client.log().contains("--token-cmd"), "{}", client.log());
}

poller_tests!(
    the_client_refreshes_its_token_and_stays_connected,
    the_client_reads_while_its_token_command_runs,
    a_raw_room_client_never_sends_its_token_to_the_room,
    the_client_reconnects_with_a_new_token_after_4001,
    a_fixed_token_that_expires_ends_the_client,
    the_publish_claim_is_enforced_apart_from_rooms,
    info_appears_in_presence_and_members,
    a_refresh_with_another_sub_is_refused,
    a_refresh_extends_life_and_expiry_closes_with_4001,
    a_raw_room_connection_expires_with_4001,
    token_metrics_are_present_from_the_start,
);
