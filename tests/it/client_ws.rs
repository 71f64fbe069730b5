//! `wsrelay client` on the relay's `/ws` envelope protocol (SPEC §6, §7): script mode delivering
//! to a second client, rooms, interactive acks and presence through a pseudo-terminal, the
//! relay's own 401, and an un-acked message re-sent across a server restart and delivered once.

use crate::client::{is_timestamped, ClientProcess};
use crate::support::*;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

/// Reads `client`'s `--json` stdout until a `message` envelope whose payload is `payload`.
/// Returns every message envelope read on the way, that one included.
fn messages_until(client: &mut ClientProcess, payload: &str) -> Vec<Value> {
    let mut seen = Vec::new();
    loop {
        let line = client.stdout_line();
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line}: {e}"));
        if v["type"] == "message" {
            let done = v["payload"] == payload;
            seen.push(v);
            if done {
                return seen;
            }
        }
    }
}

/// Script mode: every line is sent and acked, the client exits 0, the receiver (another
/// `wsrelay client`, in `--json` mode) gets each message once, from the right sender.
#[test]
fn script_mode_delivers_to_a_second_client() {
    let server = Server::start("epoll", &[]);
    let url = server.url("/ws");
    let mut bob = ClientProcess::start(&["--id", "bob", "--json", &url]);
    bob.stderr_until("connected to");
    let first = bob.stdout_line();
    assert_eq!(
        serde_json::from_str::<Value>(&first).unwrap()["type"],
        "welcome"
    );

    let mut alice = ClientProcess::start(&["--id", "alice", "--to", "bob", &url]);
    alice.send_line("plain line to --to");
    alice.send_line("@bob explicit");
    alice.send_line("/join lobby");
    alice.close_stdin();
    assert_eq!(alice.wait_exit(), 0, "{}", alice.log());

    let got = messages_until(&mut bob, "explicit");
    let got: Vec<(Value, Value, Value)> = got
        .into_iter()
        .map(|m| (m["from"].clone(), m["to"].clone(), m["payload"].clone()))
        .collect();
    assert_eq!(
        got,
        [
            (json!("alice"), json!("bob"), json!("plain line to --to")),
            (json!("alice"), json!("bob"), json!("explicit")),
        ]
    );
}

/// bob (online, `--json`) and alice, whose stdin is `lines` numbered lines to bob, written
/// before her connection is up and then closed. Returns alice once she exited 0 (all acked),
/// after checking that bob got every line once, in order.
fn pipe_lines_to_bob(server: &Server, lines: usize, alice_log: &str) -> ClientProcess {
    let url = server.url("/ws");
    let mut bob = ClientProcess::start(&["--id", "bob", "--json", &url]);
    bob.stderr_until("connected to");
    let mut alice =
        ClientProcess::start_logging(&["--id", "alice", "--to", "bob", &url], alice_log);
    for i in 0..lines {
        alice.send_line(&format!("line {i}"));
    }
    alice.close_stdin();
    assert_eq!(alice.wait_exit(), 0, "{}", alice.log());
    let got: Vec<Value> = messages_until(&mut bob, &format!("line {}", lines - 1))
        .into_iter()
        .map(|m| m["payload"].clone())
        .collect();
    let want: Vec<Value> = (0..lines).map(|i| json!(format!("line {i}"))).collect();
    assert_eq!(got, want);
    alice
}

/// Piped input that is all there before the connection is up: the client holds it until the
/// relay's welcome, then sends it. The relay keeps at most 256 messages from a connection it
/// has not greeted yet and closes it with 1008 past that (the welcome can wait for a store or
/// for Redis), so a client that wrote first would lose its connection and re-send. The debug
/// log shows every frame written; none may come before the welcome's "connected ... as".
#[test]
fn piped_input_waits_for_the_welcome() {
    let server = Server::start("epoll", &[]);
    let alice = pipe_lines_to_bob(&server, 600, "wsrelay=debug");
    let welcome = alice.log.iter().position(|l| l.contains("as alice"));
    let first_write = alice.log.iter().position(|l| l.contains("client: wrote"));
    match (welcome, first_write) {
        (Some(welcome), Some(write)) => assert!(
            welcome < write,
            "a frame was written before the welcome:\n{}",
            alice.log()
        ),
        _ => panic!("no welcome or no write in the log:\n{}", alice.log()),
    }
}

/// A piped file to an online recipient through `--data-dir`, whose acks wait for the disk: the
/// client keeps at most a window of messages un-acked, so it never has more on their way than
/// the recipient's bound (`--offline-max`, here 100) and none is refused as if the recipient's
/// queue were full: all arrive, once, in order, and the client exits 0 (a rejection would make
/// it exit 1).
#[test]
fn a_piped_file_is_paced_by_the_acks() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().to_str().unwrap();
    let server = Server::start("epoll", &["--data-dir", data_dir, "--offline-max", "100"]);
    let alice = pipe_lines_to_bob(&server, 3000, "wsrelay=info");
    assert!(!alice.log().contains("rejected"), "{}", alice.log());
}

/// `--room` joins the room; `#room text` publishes; members see `from -> #room: text`.
#[test]
fn rooms_by_flag_and_by_prefix() {
    let server = Server::start("epoll", &[]);
    let url = server.url("/ws");
    // carol joins through --room and confirms it with a message to herself: the relay handles
    // her frames in order, so once it comes back, the join before it is done.
    let mut carol = ClientProcess::start(&["--id", "carol", "--room", "lobby", &url]);
    carol.stderr_until("connected to");
    carol.send_line("@carol synced");
    assert!(carol.stdout_line().ends_with("carol -> carol: synced"));

    let mut dave = ClientProcess::start(&["--id", "dave", "--room", "lobby", &url]);
    dave.send_line("to the room by default");
    dave.send_line("#lobby by prefix");
    dave.close_stdin();
    assert_eq!(dave.wait_exit(), 0, "{}", dave.log());

    for text in ["to the room by default", "by prefix"] {
        let line = carol.stdout_line();
        assert!(
            line.ends_with(&format!("] dave -> #lobby: {text}")),
            "{line}"
        );
    }
}

/// Interactive mode on /ws: acks and presence are printed, bad lines get an error line and
/// the session goes on, Ctrl-D waits for the acks and exits 0.
#[test]
fn interactive_ws_prints_acks_presence_and_errors() {
    let server = Server::start("epoll", &[]);
    let url = server.url("/ws");
    let mut bob = ClientProcess::start(&["--id", "bob", &url]);
    bob.stderr_until("connected to");

    let mut command = Command::new(env!("CARGO_BIN_EXE_wsrelay"));
    command.args(["client", "--id", "alice", &url]);
    let timeout_ms = DEADLINE.as_millis() as u64;
    let mut p = rexpect::session::spawn_command(command, Some(timeout_ms)).unwrap();
    p.exp_string("type /help").unwrap();
    p.exp_string("connected to").unwrap();
    p.exp_string("as alice").unwrap();
    p.send_line("@bob hi bob").unwrap();
    p.exp_regex(r"\[\d\d:\d\d:\d\d\] \* delivered to bob")
        .unwrap();
    p.send_line("@nobody-online hello?").unwrap();
    p.exp_string("* queued for nobody-online, who is offline")
        .unwrap();
    p.send_line("/join lobby").unwrap();
    p.exp_string("* alice joined #lobby").unwrap();
    p.send_line("no recipient").unwrap();
    p.exp_string("no recipient: start the line with @id or #room")
        .unwrap();
    p.send_line("/frobnicate").unwrap();
    p.exp_string("unknown command /frobnicate").unwrap();
    p.send_control('d').unwrap();
    p.exp_eof().unwrap();
    match p.process().wait().unwrap() {
        // 1: the two bad lines count as failures.
        rexpect::process::WaitStatus::Exited(_, code) => assert_eq!(code, 1),
        other => panic!("client ended with {other:?}"),
    }
    let line = bob.stdout_line();
    assert!(is_timestamped(&line, "alice -> bob: hi bob"), "{line}");
}

fn hs256(claims: &Value, secret: &str) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

/// With `--jwt-secret`, a missing or bad token is the relay's HTTP 401: final, exit 2, one
/// line, no retry; a good one (`--token`, sent as `Authorization: Bearer`) connects as `sub`.
#[test]
fn relay_token_auth() {
    const SECRET: &str = "client test secret";
    let server = Server::start("epoll", &["--jwt-secret", SECRET]);
    let url = server.url("/ws");
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 60;
    let good = hs256(&json!({"sub": "erin", "exp": exp}), SECRET);
    let bad = hs256(&json!({"sub": "erin", "exp": exp}), "another secret");
    for args in [vec![url.as_str()], vec!["--token", &bad, &url]] {
        let mut client = ClientProcess::start(&args);
        assert_eq!(client.wait_exit(), 2, "{args:?}: {}", client.log());
        assert!(client.log().contains("HTTP 401"), "{}", client.log());
        assert!(!client.log().contains("reconnecting"), "{}", client.log());
    }
    let mut erin = ClientProcess::start(&["--token", &good, "--to", "erin", &url]);
    erin.stderr_until("as erin");
    erin.send_line("note to self");
    erin.close_stdin();
    assert_eq!(erin.wait_exit(), 0, "{}", erin.log());
}

/// The relay is frozen (SIGSTOP) while alice sends, so her message is written but never acked;
/// then it is killed and restarted on the same port. Alice reconnects with backoff, re-sends
/// the message with the same client id, and exits 0 once it is acked; bob, reconnecting too,
/// gets it exactly once: a later marker message from another sender arrives after it with no
/// copy in between.
#[test]
fn unacked_message_is_resent_and_delivered_once_after_a_restart() {
    let server = Server::start("epoll", &[]);
    let addr = server.addr;
    let url = server.url("/ws");
    let mut bob = ClientProcess::start(&["--id", "bob", "--json", &url]);
    bob.stderr_until("connected to");
    let mut alice = ClientProcess::start_logging(&["--id", "alice", &url], "wsrelay=debug");
    alice.stderr_until("connected to");

    server.signal("STOP");
    alice.send_line("@bob exactly once");
    // The debug log shows the envelope written on the (frozen) connection.
    let wrote = alice.stderr_until("wrote");
    assert!(wrote.contains("exactly once"), "{wrote}");
    drop(server); // SIGKILL: the message dies unread with it

    let attempt = alice.stderr_until("reconnecting to");
    assert!(attempt.ends_with("(attempt 1)"), "{attempt}");
    let _server = Server::start_on("epoll", addr, &[]);
    alice.stderr_until("re-sending 1 un-acked message(s)");
    let resent = alice.stderr_until("wrote");
    assert_eq!(
        id_of(&wrote),
        id_of(&resent),
        "re-sent with the same client id"
    );
    alice.close_stdin();
    assert_eq!(alice.wait_exit(), 0, "{}", alice.log());

    let mut marker = ClientProcess::start(&["--id", "frank", "--to", "bob", &url]);
    marker.send_line("marker");
    marker.close_stdin();
    assert_eq!(marker.wait_exit(), 0, "{}", marker.log());

    let got = messages_until(&mut bob, "marker");
    let copies = got
        .iter()
        .filter(|m| m["payload"] == "exactly once")
        .count();
    assert_eq!(copies, 1, "{got:?}");
}

/// The client message id inside a `wrote {...}` debug line.
fn id_of(log_line: &str) -> String {
    let json = &log_line[log_line.find('{').expect("an envelope")..];
    let v: Value = serde_json::from_str(json).expect("the envelope is JSON");
    v["id"].as_str().expect("a client id").to_string()
}

/// Reads `client`'s `--json` stdout until the next `welcome`.
fn next_welcome(client: &mut ClientProcess) -> Value {
    loop {
        let line = client.stdout_line();
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line}: {e}"));
        if v["type"] == "welcome" {
            return v;
        }
    }
}

/// SPEC §13: after a restart the client reconnects with `since` and the epoch it was given.
/// With `--data-dir` the history is still there (`recovered: true`); with the memory engine it
/// is not, and the client says that messages may be missing.
#[test]
fn the_client_passes_its_epoch_back_and_says_when_messages_may_be_missing() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = ["--data-dir", dir.path().to_str().unwrap()];
    for (flags, recovered) in [(&data_dir[..], true), (&[][..], false)] {
        let server = Server::start("epoll", flags);
        let addr = server.addr;
        let url = server.url("/ws");
        let mut bob = ClientProcess::start(&["--id", "bob", "--json", &url]);
        bob.stderr_until("connected to");
        let first = next_welcome(&mut bob);
        let mut alice = ClientProcess::start(&["--id", "alice", "--to", "bob", &url]);
        alice.send_line("before the restart");
        alice.close_stdin();
        assert_eq!(alice.wait_exit(), 0, "{}", alice.log());
        messages_until(&mut bob, "before the restart");

        drop(server); // SIGKILL
        let _server = Server::start_on("epoll", addr, flags);
        bob.stderr_until("connected to");
        let again = next_welcome(&mut bob);
        assert_eq!(again["recovered"], recovered, "{flags:?}: {again}");
        assert_eq!(again["epoch"] == first["epoch"], recovered, "{again}");
        if !recovered {
            let warning = bob.stderr_until("may be missing");
            assert!(warning.contains("wsrelay client:"), "{warning}");
        }
    }
}
