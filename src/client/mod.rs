//! `wsrelay client URL [URL...]`: a line client for the relay, over this crate's own codec in the
//! client role.
//!
//! Owns: the command's flags (`ClientArgs`), their checks, and `run`.
//! Does not: anything after the checks: `session` runs the client; `connection` speaks TCP and
//! RFC 6455; `line`, `envelope`, `outbox`, `backoff` and `target` are pure and unit-tested.
//!
//! SPEC §7 (the client), §6 (the `/ws` envelope protocol it speaks).
//!
//! Reading order: `session` (the loop and its diagram), then `connection`, then the pure parts.
//! The design is blocking: a stdin thread and a reader thread per connection feed one channel;
//! the session thread alone decides and writes. One connection at a time needs no event loop,
//! and this shape reads top to bottom (the server is where the event loop is the point).

pub mod backoff;
pub mod connection;
pub mod envelope;
pub mod line;
pub mod outbox;
pub mod session;
pub mod target;
pub mod token;
pub mod wire;

use crate::tls::{self, Trust};
use backoff::BackoffPolicy;
use line::DefaultTarget;
use session::{Mode, Settings, EXIT_REFUSED};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use target::{Endpoint, Target};

/// Flags of `wsrelay client`.
#[derive(clap::Args, Debug, Clone)]
#[command(after_help = AFTER_HELP)]
pub struct ClientArgs {
    /// Server URLs (ws://host:port/path, or wss:// for TLS). The path /ws speaks the relay's envelope protocol
    /// (ids, rooms, acks); any other path (/echo, /r/ROOM) is raw: each line is one text
    /// message, and whatever arrives is printed. With several URLs, the client fails over to
    /// the next after three failed attempts in a row.
    #[arg(required = true, value_name = "URL")]
    pub urls: Vec<String>,

    /// Your id on /ws (sent as ?id=; for a relay without token auth).
    #[arg(long, value_name = "ID")]
    pub id: Option<String>,

    /// A JWT for a relay with token auth, sent as `Authorization: Bearer JWT`.
    #[arg(long, value_name = "JWT", conflicts_with = "token_cmd")]
    pub token: Option<String>,

    /// A shell command (run with sh -c) that prints a JWT: run before every connection, and on
    /// /ws again at 80% of the token's lifetime to refresh the open connection (raw rooms and
    /// /echo have no refresh). A connection the relay closes as expired (4001) reconnects at
    /// once with a new token.
    #[arg(long, value_name = "CMD")]
    pub token_cmd: Option<String>,

    /// Send lines without an @id or #room prefix to this id.
    #[arg(long, value_name = "ID", conflicts_with = "room")]
    pub to: Option<String>,

    /// Join this room, and send lines without an @id or #room prefix to it.
    #[arg(long, value_name = "ROOM")]
    pub room: Option<String>,

    /// Print each received message as one JSON object per line (the relay's envelopes as they
    /// came; on raw URLs {"type":"text","payload":...,"timestamp":ms} or "binary" with
    /// "payload_base64").
    #[arg(long)]
    pub json: bool,

    /// After the end of input: how long to wait for outstanding acks (raw URLs: for the
    /// closing handshake) before giving up with exit status 1.
    #[arg(long, default_value = "10s", value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub timeout: Duration,

    /// Send a Ping this often (0 turns the heartbeat off).
    #[arg(long, default_value = "15s", value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub ping_interval: Duration,

    /// Reconnect when a Ping gets no Pong within this time.
    #[arg(long, default_value = "10s", value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub pong_timeout: Duration,

    /// Lines kept while disconnected; more are dropped (and reported).
    #[arg(long, default_value_t = 1000, value_name = "LINES")]
    pub max_queued: usize,

    /// wss://: trust only the CA certificates in this PEM file (a private or test CA) instead
    /// of the public roots.
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,

    /// wss://: do not check the server's certificate at all. Encrypted, but anyone on the path
    /// can pose as the server; for tests only.
    #[arg(long, conflicts_with = "ca")]
    pub insecure: bool,
}

const AFTER_HELP: &str = "\
Lines on /ws:
  @ID TEXT      send TEXT to ID            #ROOM TEXT    send TEXT to ROOM
  /join ROOM    join ROOM                  /leave ROOM   leave ROOM
  TEXT          send to --to or --room     //TEXT        send /TEXT
  Received: [HH:MM:SS] from -> to: payload (room messages: from -> #room).

Modes: with a terminal on stdin, the client is interactive and also prints acks and presence.
Otherwise (a pipe or file) it sends every line, waits for every ack (or --timeout) and exits.

Reconnects: exponential backoff with jitter (1 s doubling to 30 s, +-20 %), reset after a
connection stayed up 10 s; each attempt is logged on stderr as
  wsrelay client: reconnecting to URL in 1.8s (attempt 2)
Lines typed while disconnected are queued; un-acked messages are re-sent with the same id, and
/ws reconnects ask for ?since=<last msg_id> so nothing is missed or shown twice, and rejoin
each room with the last msg_id seen in it as since (a relay with --room-history replays what
was published meanwhile; when it cannot, the client says messages may be missing).

Tokens: --token sends one JWT; when the relay closes the connection because it expired (close
4001), the client stops (exit 2). --token-cmd CMD runs CMD for a token before each connection.
On /ws it runs CMD again at 80% of the token's lifetime and sends the new token as a refresh:
the connection stays up. Raw rooms and /echo have no refresh (a refresh there would be a
message to the room): they are closed with 4001 at the expiry and reconnect with a new token.

Exit status: 0 all sent and acked (raw URLs: sent and closed cleanly); 1 something was not
(timeout, rejected, server error, a line that could not be sent); 2 bad arguments, or the
server refused the upgrade with a 4xx such as 401/403 (never retried).

Examples:
  wsrelay client ws://127.0.0.1:8080/echo
  wsrelay client --id alice ws://127.0.0.1:8080/ws
  wsrelay client --ca test-ca.pem wss://localhost:8443/echo
  echo 'hi bob' | wsrelay client --id alice --to bob ws://127.0.0.1:8080/ws
  wsrelay client --id bob --json ws://relay1.example:8080/ws ws://relay2.example:8080/ws";

/// Runs `wsrelay client`; returns the process exit status.
pub fn run(args: ClientArgs) -> ExitCode {
    match settings(args, std::io::stdin().is_terminal()) {
        Ok(settings) => session::run(settings),
        Err(message) => {
            eprintln!("wsrelay client: {message}");
            ExitCode::from(EXIT_REFUSED)
        }
    }
}

/// Checks the flags and turns them into `Settings`.
///
/// # Errors
/// One line saying which argument is wrong.
fn settings(args: ClientArgs, stdin_is_terminal: bool) -> Result<Settings, String> {
    let mut targets = Vec::new();
    for url in &args.urls {
        targets.push(Target::parse(url).map_err(|e| format!("{url}: {e}"))?);
    }
    let endpoint = match targets.first() {
        Some(first) => first.endpoint,
        None => return Err("no URL given".to_string()),
    };
    if targets.iter().any(|t| t.endpoint != endpoint) {
        return Err("mixing /ws with raw URLs: give either /ws URLs or raw ones".to_string());
    }
    if endpoint == Endpoint::Raw && (args.to.is_some() || args.room.is_some()) {
        return Err("--to and --room need a /ws URL (raw URLs send lines as they are)".into());
    }
    if let Some(token) = &args.token {
        // It goes into a header line: CR or LF would end it early (header injection).
        if token.is_empty() || token.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err("--token must be one word (a JWT has no spaces)".to_string());
        }
    }
    if args
        .token_cmd
        .as_deref()
        .is_some_and(|c| c.trim().is_empty())
    {
        return Err("--token-cmd must not be empty".to_string());
    }
    if args.id.as_deref().is_some_and(str::is_empty) {
        return Err("--id must not be empty".to_string());
    }
    let tls = tls_config(&targets, args.ca, args.insecure)?;
    let default_target = match (args.to, args.room) {
        (Some(to), _) => DefaultTarget::To(to),
        (None, Some(room)) => {
            line::check_room(&room).map_err(|e| format!("--room: {e}"))?;
            DefaultTarget::Room(room)
        }
        (None, None) => DefaultTarget::None,
    };
    Ok(Settings {
        targets,
        endpoint,
        id: args.id,
        token: args.token,
        token_cmd: args.token_cmd,
        default_target,
        json: args.json,
        mode: if stdin_is_terminal {
            Mode::Interactive
        } else {
            Mode::Script
        },
        timeout: args.timeout,
        ping_interval: args.ping_interval,
        pong_timeout: args.pong_timeout,
        queue_limit: args.max_queued,
        policy: BackoffPolicy::default(),
        tls,
    })
}

/// The TLS configuration for the `wss://` targets, if any: trusting the public roots, the CAs
/// of `--ca`, or (`--insecure`) nothing, with a warning.
///
/// # Errors
/// `--ca`/`--insecure` without a `wss://` URL, or a CA file that cannot be used.
fn tls_config(
    targets: &[Target],
    ca: Option<PathBuf>,
    insecure: bool,
) -> Result<Option<Arc<rustls::ClientConfig>>, String> {
    if !targets.iter().any(|t| t.url.secure) {
        if ca.is_some() || insecure {
            return Err("--ca and --insecure apply to wss:// URLs only".to_string());
        }
        return Ok(None);
    }
    let trust = match (ca, insecure) {
        (Some(path), _) => Trust::CaFile(path),
        (None, true) => {
            eprintln!(
                "wsrelay client: warning: --insecure: the server's certificate is not checked; \
                 anyone on the path can pose as the server and read this connection"
            );
            Trust::Insecure
        }
        (None, false) => Trust::PublicRoots,
    };
    let config = tls::config::client_config(&trust).map_err(|e| format!("--ca: {e}"))?;
    Ok(Some(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: ClientArgs,
    }

    /// What `settings` gives: the endpoint and default target, or a part of the error message.
    type Outcome = Result<(Endpoint, DefaultTarget), &'static str>;

    fn check(argv: &[&str], expected: Outcome) {
        let mut full = vec!["client"];
        full.extend_from_slice(argv);
        let args = match Cli::try_parse_from(&full) {
            Ok(cli) => cli.args,
            Err(e) => panic!("{argv:?}: {e}"),
        };
        let got = settings(args, false).map(|s| (s.endpoint, s.default_target));
        match (got, expected) {
            (Ok(got), Ok(want)) => assert_eq!(got, want, "{argv:?}"),
            (Err(got), Err(want)) => assert!(got.contains(want), "{argv:?}: {got}"),
            (got, want) => panic!("{argv:?}: got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn argument_checks() {
        use DefaultTarget as D;
        use Endpoint::*;
        #[rustfmt::skip]
        let cases: Vec<(Vec<&str>, Outcome)> = vec![
            (vec!["ws://h/echo"], Ok((Raw, D::None))),
            (vec!["ws://h/r/a", "ws://g/r/a"], Ok((Raw, D::None))),
            (vec!["--id", "a", "ws://h/ws"], Ok((Envelope, D::None))),
            (vec!["--to", "bob", "ws://h/ws"], Ok((Envelope, D::To("bob".into())))),
            (vec!["--room", "lobby", "ws://h/ws"], Ok((Envelope, D::Room("lobby".into())))),
            (vec!["--room", "bad room", "ws://h/ws"], Err("--room")),
            (vec!["--to", "bob", "ws://h/echo"], Err("need a /ws URL")),
            (vec!["ws://h/ws", "ws://h/echo"], Err("mixing")),
            (vec!["http://h/ws"], Err("http://h/ws: not a ws:// or wss:// URL")),
            (vec!["wss://h/ws"], Ok((Envelope, D::None))),
            (vec!["--insecure", "wss://h/echo"], Ok((Raw, D::None))),
            (vec!["--ca", "/nonexistent.pem", "wss://h/ws"], Err("--ca: cannot read")),
            (vec!["--insecure", "ws://h/ws"], Err("wss:// URLs only")),
            (vec!["ws://h:99999/ws"], Err("port")),
            (vec!["--token", "a b", "ws://h/ws"], Err("--token")),
            (vec!["--token", "a\r\nX: y", "ws://h/ws"], Err("--token")),
            (vec!["--id", "", "ws://h/ws"], Err("--id")),
            (vec!["--token-cmd", " ", "ws://h/ws"], Err("--token-cmd")),
            (vec!["--token-cmd", "echo t", "ws://h/ws"], Ok((Envelope, D::None))),
        ];
        for (argv, expected) in cases {
            check(&argv, expected);
        }
    }

    #[test]
    fn defaults_match_spec() {
        let cli = Cli::try_parse_from(["client", "ws://h/ws"]).map(|c| c.args);
        let Ok(args) = cli else {
            panic!("defaults do not parse");
        };
        assert_eq!(args.timeout, Duration::from_secs(10));
        assert_eq!(args.ping_interval, Duration::from_secs(15));
        assert_eq!(args.pong_timeout, Duration::from_secs(10));
        assert_eq!(args.max_queued, 1000);
        assert!(
            Cli::try_parse_from(["client"]).is_err(),
            "a URL is required"
        );
        assert!(
            Cli::try_parse_from(["client", "--to", "a", "--room", "b", "ws://h/ws"]).is_err(),
            "--to and --room exclude each other"
        );
    }
}
