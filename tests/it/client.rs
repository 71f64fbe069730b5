//! `wsrelay client` against the real server (and, for refusals and silent peers, against
//! one-shot listeners written here): script mode, interactive mode through a pseudo-terminal,
//! final refusals, error lines, heartbeat, and reconnecting with backoff across a restart.
//!
//! The client's poller is irrelevant (it has none), so these run against the default epoll
//! server only. Every wait is bounded by `DEADLINE` on a line the client prints.

use crate::support::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A running `wsrelay client` with its stdin, stdout and stderr in the test's hands.
pub struct ClientProcess {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Receiver<String>,
    stderr: Receiver<String>,
    /// Every stderr line read so far, for failure messages and log assertions.
    pub log: Vec<String>,
}

/// Forwards each line of `pipe` to a channel, until EOF.
fn line_channel(pipe: impl Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

impl ClientProcess {
    /// Starts `wsrelay client ARGS...` with piped stdio (so: script mode).
    pub fn start(args: &[&str]) -> ClientProcess {
        let log = std::env::var("TEST_CLIENT_LOG").unwrap_or_else(|_| "wsrelay=info".into());
        ClientProcess::start_logging(args, &log)
    }

    /// Like `start`, with `RUST_LOG` set to `filter` (`wsrelay=debug` logs every frame written).
    pub fn start_logging(args: &[&str], filter: &str) -> ClientProcess {
        let mut child = Command::new(env!("CARGO_BIN_EXE_wsrelay"))
            .arg("client")
            .args(args)
            .env("RUST_LOG", filter)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn wsrelay client");
        let stdout = line_channel(child.stdout.take().expect("stdout"));
        let stderr = line_channel(child.stderr.take().expect("stderr"));
        ClientProcess {
            stdin: child.stdin.take(),
            child,
            stdout,
            stderr,
            log: Vec::new(),
        }
    }

    pub fn send_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin already closed");
        writeln!(stdin, "{line}").expect("write to the client's stdin");
        stdin.flush().unwrap();
    }

    /// End of input: the client finishes what it owes and exits.
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// The next line on stdout.
    pub fn stdout_line(&mut self) -> String {
        match self.stdout.recv_timeout(DEADLINE) {
            Ok(line) => line,
            Err(e) => panic!("no stdout line ({e:?}); stderr so far:\n{}", self.log()),
        }
    }

    /// Reads stderr up to the first line containing `needle` and returns it.
    pub fn stderr_until(&mut self, needle: &str) -> String {
        let start = Instant::now();
        loop {
            let left = DEADLINE.saturating_sub(start.elapsed());
            match self.stderr.recv_timeout(left) {
                Ok(line) => {
                    self.log.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(e) => panic!(
                    "no stderr line with {needle:?} ({e:?}); got:\n{}",
                    self.log()
                ),
            }
        }
    }

    /// Waits (bounded) for the client to exit, then reads the rest of stderr into `log`.
    pub fn wait_exit(&mut self) -> i32 {
        let start = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "client did not exit; stderr:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10)); // poll interval for try_wait
        };
        // The pipe is at EOF once the process is gone: this ends.
        loop {
            match self.stderr.recv_timeout(DEADLINE) {
                Ok(line) => self.log.push(line),
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => panic!("stderr did not end"),
            }
        }
        status.code().expect("exit code (not a signal)")
    }

    /// The rest of stdout once the client has exited.
    pub fn remaining_stdout(&mut self) -> Vec<String> {
        let mut lines = Vec::new();
        loop {
            match self.stdout.recv_timeout(DEADLINE) {
                Ok(line) => lines.push(line),
                Err(RecvTimeoutError::Disconnected) => return lines,
                Err(RecvTimeoutError::Timeout) => panic!("stdout did not end"),
            }
        }
    }

    pub fn log(&self) -> String {
        self.log.join("\n")
    }
}

impl Drop for ClientProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `[HH:MM:SS] text`, the human form of a received raw message.
pub fn is_timestamped(line: &str, text: &str) -> bool {
    let Some(rest) = line.strip_prefix('[') else {
        return false;
    };
    let (time, body) = rest.split_at(rest.find(']').unwrap_or(0));
    time.len() == 8
        && time.bytes().enumerate().all(|(i, b)| match i {
            2 | 5 => b == b':',
            _ => b.is_ascii_digit(),
        })
        && body == format!("] {text}")
}

/// The delay and attempt number of a `reconnecting to URL in 1.8s (attempt 2)` line.
fn reconnect_delay(line: &str) -> (f64, u32) {
    let after_in = line.rsplit_once(" in ").expect("` in ` in the line").1;
    let (delay, attempt) = after_in.split_once("s (attempt ").expect("the delay");
    let attempt = attempt.strip_suffix(')').expect("closing paren");
    (delay.parse().unwrap(), attempt.parse().unwrap())
}

#[test]
fn raw_script_mode_echoes_every_line_and_exits_0() {
    let server = Server::start("epoll", &[]);
    let mut client = ClientProcess::start(&[&server.url("/echo")]);
    let lines = [
        "one",
        "two words",
        "@not-a-command #nor-a-room /nor-this",
        "€ and 𝄞",
    ];
    for line in lines {
        client.send_line(line);
    }
    client.close_stdin();
    assert_eq!(client.wait_exit(), 0, "{}", client.log());
    let out = client.remaining_stdout();
    assert_eq!(out.len(), lines.len(), "{out:?}");
    for (got, want) in out.iter().zip(lines) {
        assert!(
            is_timestamped(got, want),
            "{got:?} is not [HH:MM:SS] {want}"
        );
    }
    assert!(client.log().contains("connected to"), "{}", client.log());
}

/// The client offers permessage-deflate (SPEC §17): a long line goes compressed, its echo comes
/// back compressed and is printed as sent; a short one goes plain.
#[test]
fn long_lines_travel_compressed_both_ways() {
    let server = Server::start("epoll", &[]);
    let mut client = ClientProcess::start(&[&server.url("/echo")]);
    let long = format!("{{\"text\":\"{}\"}}", "chat chat chat ".repeat(40));
    client.send_line(&long);
    client.send_line("short");
    client.close_stdin();
    assert_eq!(client.wait_exit(), 0, "{}", client.log());
    let out = client.remaining_stdout();
    assert_eq!(out.len(), 2, "{out:?}");
    assert!(is_timestamped(&out[0], &long), "{:?}", out[0]);
    assert!(is_timestamped(&out[1], "short"), "{:?}", out[1]);
    let m = server.metrics();
    assert_eq!(m.get("wsrelay_compressed_messages_in_total"), 1.0);
    assert_eq!(m.get("wsrelay_compressed_messages_out_total"), 1.0);
    assert_eq!(m.get("wsrelay_compression_small_messages_out_total"), 1.0);
}

/// The same over `wss://`, trusting the test CA: the client's TLS (a handshake, then one
/// session shared by its writing and reading threads) against the relay speaking TLS. The
/// client is what is tested here, so epoll only; tests/it/tls.rs runs the server's TLS on
/// every poller.
#[test]
fn raw_script_mode_over_wss() {
    use crate::tls_support::{tls_server, TestCa};
    let ca = TestCa::new();
    let server = tls_server("epoll", &ca, &[]);
    let url = format!("wss://localhost:{}/echo", server.addr.port());
    let mut client = ClientProcess::start(&["--ca", ca.ca.to_str().unwrap(), &url]);
    let long = "x".repeat(40_000);
    let lines = ["one", "two words", long.as_str()];
    for line in lines {
        client.send_line(line);
    }
    client.close_stdin();
    assert_eq!(client.wait_exit(), 0, "{}", client.log());
    let out = client.remaining_stdout();
    assert_eq!(out.len(), lines.len(), "{}", client.log());
    for (got, want) in out.iter().zip(lines) {
        assert!(
            is_timestamped(got, want),
            "{got:.80} is not [HH:MM:SS] {want:.20}..."
        );
    }
    assert!(
        client.log().contains("connected to wss://"),
        "{}",
        client.log()
    );
    // permessage-deflate sits above TLS (SPEC §17, §18): the long line went compressed, and
    // its echo came back compressed and was printed as sent (checked above).
    let m = crate::tls_support::tls_metrics(&server, &ca);
    assert_eq!(m.get("wsrelay_compressed_messages_in_total"), 1.0);
    assert_eq!(m.get("wsrelay_compressed_messages_out_total"), 1.0);
}

#[test]
fn raw_json_mode_prints_one_object_per_message() {
    let server = Server::start("epoll", &[]);
    let mut client = ClientProcess::start(&["--json", &server.url("/echo")]);
    client.send_line("{\"a\": 1}");
    client.send_line("plain");
    client.close_stdin();
    assert_eq!(client.wait_exit(), 0, "{}", client.log());
    let out = client.remaining_stdout();
    let payloads: Vec<serde_json::Value> = out
        .iter()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
            assert_eq!(v["type"], "text", "{line}");
            assert!(v["timestamp"].as_i64().is_some(), "{line}");
            v["payload"].clone()
        })
        .collect();
    assert_eq!(payloads, ["{\"a\": 1}", "plain"]);
}

/// A listener that answers the first request with `status` and returns the request head.
fn one_shot_http(status: &'static str) -> (SocketAddr, JoinHandle<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let handle = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        let head = read_http_head(&mut s);
        write!(
            s,
            "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        head
    });
    (addr, handle)
}

/// SPEC §7: "A 401/403 is final (exit non-zero, clear message), not retried." The relay's own
/// token check is exercised by the /ws tests; here a one-shot listener plays the relay.
#[test]
fn refused_upgrades_are_final() {
    let cases: &[(&str, &str)] = &[
        ("401 Unauthorized", "HTTP 401 Unauthorized"),
        ("403 Forbidden", "HTTP 403 Forbidden"),
        ("404 Not Found", "HTTP 404"),
    ];
    for &(status, message) in cases {
        let (addr, listener) = one_shot_http(status);
        let url = format!("ws://{addr}/ws");
        let mut client = ClientProcess::start(&["--id", "alice", "--token", "abc.def.ghi", &url]);
        // stdin stays open: the exit comes from the refusal alone.
        assert_eq!(client.wait_exit(), 2, "{status}: {}", client.log());
        let log = client.log();
        assert_eq!(client.log.len(), 1, "{status}: one line:\n{log}");
        assert!(
            log.contains(message) && log.contains(&url),
            "{status}: {log}"
        );
        assert!(!log.contains("reconnecting"), "{status}: retried:\n{log}");
        let head = listener.join().unwrap();
        assert!(head.starts_with("GET /ws?id=alice HTTP/1.1\r\n"), "{head}");
        assert!(
            head.contains("\r\nAuthorization: Bearer abc.def.ghi\r\n"),
            "{head}"
        );
    }
}

/// Bad URLs, refused connections and unknown hosts: one clear line each, never a panic.
#[test]
fn errors_are_one_line_each() {
    // A port that was free a moment ago: connecting is refused.
    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let refused = format!("ws://{closed}/echo");
    #[rustfmt::skip]
    let cases: &[(&[&str], i32, &str)] = &[
        (&["http://127.0.0.1/echo"], 2, "not a ws:// or wss:// URL"),
        (&["--insecure", "ws://127.0.0.1/echo"], 2, "wss:// URLs only"),
        (&["--ca", "/nonexistent/ca.pem", "wss://127.0.0.1/echo"], 2, "cannot read"),
        (&["ws://127.0.0.1:0/echo"], 2, "port"),
        (&["ws://127.0.0.1/ws", "ws://127.0.0.1/echo"], 2, "mixing"),
        (&["--timeout", "1s", &refused], 1, "connection refused"),
        (&["--timeout", "1s", "ws://no-such-host.invalid/echo"], 1, "cannot resolve"),
    ];
    for &(args, code, message) in cases {
        let mut client = ClientProcess::start(args);
        client.close_stdin();
        assert_eq!(client.wait_exit(), code, "{args:?}: {}", client.log());
        let log = client.log();
        assert!(log.contains(message), "{args:?}: {log}");
        assert!(
            !log.contains("panicked") && !log.contains("RUST_BACKTRACE"),
            "{args:?}: {log}"
        );
        for line in &client.log {
            assert!(line.starts_with("wsrelay client: "), "{args:?}: {line}");
        }
    }
}

/// A `wss://` server whose certificate the client does not trust: a final refusal (exit 2,
/// no retries), with a hint at `--ca`. The server sees exactly one handshake end in an alert.
#[test]
fn an_untrusted_certificate_is_final() {
    use crate::tls_support::{tls_server, wait_for_tls_metric, TestCa};
    let ca = TestCa::new();
    let server = tls_server("epoll", &ca, &[]);
    let url = format!("wss://localhost:{}/echo", server.addr.port());
    let mut client = ClientProcess::start(&[&url]);
    client.close_stdin();
    assert_eq!(client.wait_exit(), 2, "{}", client.log());
    let log = client.log();
    assert!(log.contains("certificate is not accepted"), "{log}");
    assert!(log.contains("--ca FILE"), "{log}");
    let alerts = "wsrelay_tls_handshake_failures_total{reason=\"alert\"}";
    wait_for_tls_metric(&server, &ca, alerts, 1.0);
}

#[test]
fn interactive_mode_through_a_terminal() {
    let server = Server::start("epoll", &[]);
    let mut command = Command::new(env!("CARGO_BIN_EXE_wsrelay"));
    command.args(["client", &server.url("/echo")]);
    let timeout_ms = DEADLINE.as_millis() as u64;
    let mut p = rexpect::session::spawn_command(command, Some(timeout_ms)).expect("spawn in a pty");
    p.exp_string("connected to").unwrap();
    p.send_line("hello from a terminal").unwrap();
    p.exp_regex(r"\[\d\d:\d\d:\d\d\] hello from a terminal")
        .unwrap();
    p.send_line("second").unwrap();
    p.exp_regex(r"\[\d\d:\d\d:\d\d\] second").unwrap();
    // Ctrl-D: end of input; the client closes cleanly and exits 0.
    p.send_control('d').unwrap();
    p.exp_eof().unwrap();
    match p.process().wait().unwrap() {
        rexpect::process::WaitStatus::Exited(_, code) => assert_eq!(code, 0),
        other => panic!("client ended with {other:?}"),
    }
}

/// The server is killed while the client runs and comes back on the same port: the client
/// logs each attempt with a delay from the backoff schedule (1 s, then 2 s, each +-20 %),
/// reconnects, and sends the line typed while it was disconnected.
#[test]
fn reconnects_with_backoff_after_the_server_restarts() {
    let server = Server::start("epoll", &[]);
    let addr = server.addr;
    let mut client = ClientProcess::start(&[&server.url("/echo")]);
    client.stderr_until("connected to");
    client.send_line("before");
    assert!(is_timestamped(&client.stdout_line(), "before"));

    drop(server); // SIGKILL
    client.stderr_until("lost");
    let first = client.stderr_until("reconnecting to");
    client.stderr_until("cannot connect");
    client.send_line("typed while down");
    let second = client.stderr_until("reconnecting to");

    let _server = Server::start_on("epoll", addr, &[]);
    client.stderr_until("connected to");
    assert!(is_timestamped(&client.stdout_line(), "typed while down"));
    client.close_stdin();
    assert_eq!(client.wait_exit(), 0, "{}", client.log());

    // Delays are printed with one decimal: allow for the rounding.
    let cases = [(first, 1, 0.8, 1.2), (second, 2, 1.6, 2.4)];
    for (line, attempt, low, high) in cases {
        assert!(line.contains(&format!("ws://{addr}/echo")), "{line}");
        let (delay, n) = reconnect_delay(&line);
        assert_eq!(n, attempt, "{line}");
        assert!(
            (low - 0.05..=high + 0.05).contains(&delay),
            "{line}: not in {low}..{high}"
        );
    }
    assert!(
        client
            .log()
            .contains("sending 1 line(s) typed while disconnected"),
        "{}",
        client.log()
    );
}

/// SPEC §7: "after three failed attempts the client fails over to the next" URL.
#[test]
fn fails_over_to_the_next_url_after_three_failures() {
    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let down = format!("ws://{closed}/echo");
    let server = Server::start("epoll", &[]);
    let up = server.url("/echo");
    let mut client = ClientProcess::start(&[&down, &up]);
    let failover = client.stderr_until("failing over");
    assert!(
        failover.contains(&format!(
            "{down} failed 3 times in a row; failing over to {up}"
        )),
        "{failover}"
    );
    let next = client.stderr_until("reconnecting to");
    assert!(next.contains(&up), "{next}");
    client.stderr_until(&format!("connected to {up}"));
    let refused = format!("wsrelay client: cannot connect to {down}: connection refused");
    let failures = client.log.iter().filter(|l| **l == refused).count();
    assert_eq!(failures, 3, "{}", client.log());
    client.send_line("via the second URL");
    assert!(is_timestamped(&client.stdout_line(), "via the second URL"));
    client.close_stdin();
    assert_eq!(client.wait_exit(), 0, "{}", client.log());
}

/// A peer that completes the handshake and then never reads: our Pings get no Pong, so the
/// client gives up on the connection after `--pong-timeout` and reconnects.
#[test]
fn missing_pongs_make_it_reconnect() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let peer = std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        let ws = tungstenite::accept(s).expect("handshake");
        // Hold the connection open, unread, until the test is over.
        let _ = done_rx.recv_timeout(DEADLINE);
        drop(ws);
    });
    let url = format!("ws://{addr}/echo");
    let mut client =
        ClientProcess::start(&["--ping-interval", "100ms", "--pong-timeout", "200ms", &url]);
    client.stderr_until("connected to");
    let lost = client.stderr_until("lost");
    assert!(lost.ends_with("lost: no pong within 0.2s"), "{lost}");
    client.stderr_until("reconnecting to");
    done_tx.send(()).unwrap();
    peer.join().unwrap();
}

#[test]
fn help_documents_the_line_syntax_and_the_log_format() {
    let out = Command::new(env!("CARGO_BIN_EXE_wsrelay"))
        .args(["client", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for needle in [
        "@ID TEXT",
        "#ROOM TEXT",
        "/join ROOM",
        "--ping-interval",
        "--pong-timeout",
        "--timeout",
        "--json",
        "reconnecting to URL in 1.8s (attempt 2)",
        "Exit status",
    ] {
        assert!(help.contains(needle), "--help lacks {needle:?}:\n{help}");
    }
}
