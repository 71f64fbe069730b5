//! The client's session: one thread that owns every decision, fed by stdin lines and by the
//! current connection's events through one channel.
//!
//! Owns: `Settings`, the session loop (connect, write, heartbeat, reconnect with backoff,
//! finishing on end of input), what is printed on stdout and stderr, and the exit status.
//! Does not: parse lines (`line.rs`), encode or decode envelopes (`envelope.rs`), keep acks and
//! msg_ids (`outbox.rs`), choose delays (`backoff.rs`) or touch the socket (`connection.rs`).
//!
//! SPEC §7; §6 for what `/ws` means.
//!
//! The design is blocking and threaded, the simplest shape for one connection at a time:
//!
//! ```text
//!   stdin thread ──Line/StdinClosed──┐
//!                                    ▼
//!   reader thread ──Link{gen,..}──▶ channel ──▶ session thread (this loop): decides, writes
//!   (one per connection)               ▲         frames, prints, sleeps in recv_timeout
//!   token thread ──Token{gen,..}───────┘
//!   (one per --token-cmd refresh)
//! ```
//!
//! The loop sleeps in `recv_timeout` until the nearest deadline: the next reconnect attempt,
//! the next Ping, the Pong deadline, the wait for the server's Close, or the `--timeout` after
//! end of input. Each connection has a generation number; events of a connection that was
//! dropped carry an old one and are ignored. Connecting is done on this thread and blocks it
//! (bounded by the connect and handshake timeouts, and by `token::FETCH_TIMEOUT` for the
//! `--token-cmd` run before it); lines typed meanwhile wait in the channel. A refresh of an open
//! connection's token runs the command on a thread of its own, so the open connection is read,
//! pinged and written to meanwhile; its result comes back through the channel.
//!
//! Output: received traffic on stdout (one line each, or one JSON object each with `--json`);
//! status, errors and reconnect attempts on stderr, each line starting `wsrelay client: `.
//! Exit status: 0 when everything sent was acked (raw: sent and closed cleanly), 1 when
//! something was not (timeout, rejection, server error, unsendable line), 2 for a final refusal
//! (HTTP 4xx on the upgrade) or bad arguments.

use super::backoff::{Backoff, BackoffPolicy};
use super::connection::{self, Connection, LinkEvent};
use super::envelope::{self, ServerEnvelope};
use super::line::{self, DefaultTarget, Line};
use super::outbox::{Outbox, Outgoing, Seen};
use super::target::{Endpoint, Target};
use super::token;
use crate::protocol::decoder::OwnedEvent;
use crate::protocol::frame::OpCode;
use crate::protocol::CloseCode;
use crate::wire::AckStatus;
use crate::wire::TOKEN_EXPIRED_CLOSE;
use chrono::{Local, TimeZone};
use std::io::{self, BufRead, Write};
use std::process::ExitCode;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long we wait for the server's answer to our Close before hanging up anyway.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// msg_ids remembered for de-duplication.
const SEEN_CAPACITY: usize = 10_000;

/// Exit status for "not everything was acked / sent".
const EXIT_FAILED: u8 = 1;
/// Exit status for a final refusal or unusable arguments.
pub const EXIT_REFUSED: u8 = 2;

/// Whether a person is typing (stdin is a terminal) or a script feeds lines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Acks and presence are printed as they come.
    Interactive,
    /// Only received messages are printed.
    Script,
}

/// Everything the session needs, checked by `mod.rs`.
#[derive(Clone, Debug)]
pub struct Settings {
    /// At least one; all of the same `Endpoint`.
    pub targets: Vec<Target>,
    pub endpoint: Endpoint,
    pub id: Option<String>,
    pub token: Option<String>,
    /// `--token-cmd`: a command printing a fresh token, run before every connection and to
    /// refresh the open one (`token.rs`).
    pub token_cmd: Option<String>,
    pub default_target: DefaultTarget,
    pub json: bool,
    pub mode: Mode,
    pub timeout: Duration,
    /// Zero disables the heartbeat.
    pub ping_interval: Duration,
    pub pong_timeout: Duration,
    pub queue_limit: usize,
    pub policy: BackoffPolicy,
    /// The TLS configuration for `wss://` targets (`None` when every target is `ws://`).
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

/// What arrives on the session's channel.
enum Input {
    Line(String),
    StdinClosed,
    Link {
        generation: u64,
        event: LinkEvent,
    },
    /// What the `--token-cmd` run for a refresh of connection `generation` printed.
    Token {
        generation: u64,
        fetched: Result<String, String>,
    },
}

/// The open connection and its timers.
struct Up {
    conn: Connection,
    /// Index into `Settings::targets`.
    target: usize,
    next_ping: Option<Instant>,
    /// Set while a Ping is unanswered.
    pong_due: Option<Instant>,
    ping_count: u64,
    /// Set once we sent Close to finish: the server's Close (or this deadline) ends the run.
    close_due: Option<Instant>,
    /// With `--token-cmd` on `/ws`: when to fetch a new token and send it as a `refresh`.
    /// `None` while a fetch is running (its result arrives as `Input::Token`).
    refresh_due: Option<Instant>,
    /// On `/ws`: the relay's welcome has arrived. Until then nothing is written (lines are
    /// queued): the relay holds only a few hundred messages from a connection it has not
    /// greeted yet (SPEC §13, the welcome waits for the recovery). Raw endpoints have no
    /// welcome and start greeted.
    greeted: bool,
    /// Lines queued while no connection was up, when this one came up (for the message
    /// that says they are sent now; lines read while waiting for the welcome are not those).
    typed_while_down: usize,
}

enum Link {
    Down { retry_at: Instant },
    Up(Box<Up>),
}

struct Session {
    settings: Settings,
    inbox: Receiver<Input>,
    sender: Sender<Input>,
    link: Link,
    /// Generation of the newest connection; events of older ones are stale.
    generation: u64,
    /// The token the next connection sends: `--token`, or the last one `--token-cmd` printed.
    token: Option<String>,
    backoff: Backoff,
    outbox: Outbox,
    seen: Seen,
    stdin_closed_at: Option<Instant>,
    /// Lines or messages that failed: rejected, refused by the server, unsendable, dropped.
    failures: usize,
    /// Raw mode: lines were written that no clean close has confirmed yet.
    raw_unconfirmed: bool,
    /// Some connection of this run completed its handshake.
    ever_connected: bool,
    exit: Option<ExitCode>,
}

/// Runs the client until input ends and everything is settled, or a final error.
pub fn run(settings: Settings) -> ExitCode {
    let (sender, inbox) = mpsc::channel();
    spawn_stdin_reader(sender.clone());
    let run_tag = format!("{:08x}", fastrand::u32(..));
    let mut outbox = Outbox::new(run_tag, settings.queue_limit);
    if let (Endpoint::Envelope, DefaultTarget::Room(room)) =
        (settings.endpoint, &settings.default_target)
    {
        // `--room` means "be in this room": its messages and presence are shown too.
        outbox.remember_room(room);
    }
    if settings.mode == Mode::Interactive && settings.endpoint == Endpoint::Envelope {
        eprintln!("wsrelay client: type /help for the line syntax, Ctrl-D to quit");
    }
    let url_count = settings.targets.len();
    let token = settings.token.clone();
    let session = Session {
        backoff: Backoff::new(settings.policy, url_count),
        settings,
        inbox,
        sender,
        link: Link::Down {
            retry_at: Instant::now(),
        },
        generation: 0,
        token,
        outbox,
        seen: Seen::new(SEEN_CAPACITY),
        stdin_closed_at: None,
        failures: 0,
        raw_unconfirmed: false,
        ever_connected: false,
        exit: None,
    };
    session.run()
}

/// Reads stdin line by line into the channel. Bytes that are not UTF-8 are replaced (text
/// frames must be UTF-8, RFC 6455 §5.6); the line ending (LF or CRLF) is removed.
fn spawn_stdin_reader(sender: Sender<Input>) {
    let spawned = std::thread::Builder::new()
        .name("wsrelay-client-stdin".into())
        .spawn(move || {
            let mut stdin = io::stdin().lock();
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match stdin.read_until(b'\n', &mut buf) {
                    Ok(0) => break,
                    Ok(_) => {
                        let text = String::from_utf8_lossy(&buf);
                        let line = text.trim_end_matches('\n').trim_end_matches('\r');
                        if sender.send(Input::Line(line.to_string())).is_err() {
                            return;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        eprintln!("wsrelay client: cannot read stdin: {e}");
                        break;
                    }
                }
            }
            let _ = sender.send(Input::StdinClosed);
        });
    if let Err(e) = spawned {
        eprintln!("wsrelay client: cannot start the stdin reader: {e}");
    }
}

impl Session {
    fn run(mut self) -> ExitCode {
        self.connect_now();
        loop {
            if let Some(code) = self.exit {
                return code;
            }
            // Finishing first: a run that owes nothing need not reconnect just to say goodbye.
            self.check_finished(Instant::now());
            if self.exit.is_none() {
                self.on_time(Instant::now());
            }
            if let Some(code) = self.exit {
                return code;
            }
            let input = match self.next_deadline() {
                Some(at) => self
                    .inbox
                    .recv_timeout(at.saturating_duration_since(Instant::now())),
                None => self
                    .inbox
                    .recv()
                    .map_err(|_| RecvTimeoutError::Disconnected),
            };
            match input {
                Ok(Input::Line(line)) => self.on_line(&line),
                Ok(Input::StdinClosed) => self.stdin_closed_at = Some(Instant::now()),
                Ok(Input::Link { generation, event }) => {
                    if generation == self.generation && matches!(self.link, Link::Up(_)) {
                        self.on_link_event(event);
                    }
                }
                Ok(Input::Token {
                    generation,
                    fetched,
                }) => {
                    // For a connection since dropped: the next one fetches its own token.
                    if generation == self.generation && matches!(self.link, Link::Up(_)) {
                        self.token_fetched(fetched);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                // Cannot happen: `self.sender` keeps the channel open.
                Err(RecvTimeoutError::Disconnected) => return ExitCode::from(EXIT_FAILED),
            }
        }
    }

    /// The nearest moment something must happen without any input.
    fn next_deadline(&self) -> Option<Instant> {
        let link = match &self.link {
            Link::Down { retry_at } => Some(*retry_at),
            Link::Up(up) => [up.next_ping, up.pong_due, up.close_due, up.refresh_due]
                .into_iter()
                .flatten()
                .min(),
        };
        let finish = self.stdin_closed_at.map(|at| at + self.settings.timeout);
        [link, finish].into_iter().flatten().min()
    }

    // ---- connecting ----------------------------------------------------------------------

    fn connect_now(&mut self) {
        let index = self.backoff.url_index();
        let Some(target) = self.settings.targets.get(index).cloned() else {
            return;
        };
        let resource = target.resource(
            self.settings.id.as_deref(),
            self.seen.since(),
            self.seen.epoch(),
        );
        if let Some(command) = &self.settings.token_cmd {
            // A fresh token for every connection: the last one may be the one that expired.
            match token::fetch(command, token::FETCH_TIMEOUT) {
                Ok(fresh) => self.token = Some(fresh),
                Err(e) => {
                    eprintln!("wsrelay client: --token-cmd: {e}");
                    self.schedule_reconnect();
                    return;
                }
            }
        }
        let authorization = self.token.as_ref().map(|token| format!("Bearer {token}"));
        let headers: Vec<(&str, &str)> = authorization
            .as_deref()
            .map(|value| ("Authorization", value))
            .into_iter()
            .collect();
        self.generation += 1;
        let generation = self.generation;
        let sender = self.sender.clone();
        let on_event = move |event| sender.send(Input::Link { generation, event }).is_ok();
        match connection::connect(
            &target.url,
            self.settings.tls.as_ref(),
            &resource,
            &headers,
            on_event,
        ) {
            Ok(conn) => {
                self.backoff.connected();
                self.ever_connected = true;
                if self.settings.endpoint == Endpoint::Raw {
                    eprintln!("wsrelay client: connected to {}", target.text);
                }
                let now = Instant::now();
                let ping = self.settings.ping_interval;
                self.link = Link::Up(Box::new(Up {
                    conn,
                    target: index,
                    next_ping: (!ping.is_zero()).then(|| now + ping),
                    pong_due: None,
                    ping_count: 0,
                    close_due: None,
                    refresh_due: self.refresh_due(now),
                    greeted: self.settings.endpoint == Endpoint::Raw,
                    typed_while_down: self.outbox.queued(),
                }));
                if self.settings.endpoint == Endpoint::Raw {
                    self.send_what_waited();
                }
            }
            Err(e) if e.is_final() => {
                eprintln!("wsrelay client: {}: {e}", target.text);
                self.exit = Some(ExitCode::from(EXIT_REFUSED));
            }
            Err(e) => {
                eprintln!("wsrelay client: cannot connect to {}: {e}", target.text);
                if self.backoff.connect_failed() {
                    let next = self.target_text(self.backoff.url_index());
                    eprintln!(
                        "wsrelay client: {} failed {} times in a row; failing over to {next}",
                        target.text, self.settings.policy.attempts_per_url
                    );
                }
                self.schedule_reconnect();
            }
        }
    }

    /// Writes what the new connection owes: the rooms to join again, the un-acked messages
    /// and the lines queued meanwhile (`Outbox::on_connect`). Once the connection may take
    /// them: at once on a raw endpoint, after the welcome on `/ws`.
    fn send_what_waited(&mut self) {
        let unacked = self.outbox.unacked();
        let queued = match &self.link {
            Link::Up(up) => up.typed_while_down,
            Link::Down { .. } => 0,
        };
        if unacked > 0 {
            eprintln!("wsrelay client: re-sending {unacked} un-acked message(s)");
        }
        if queued > 0 {
            eprintln!("wsrelay client: sending {queued} line(s) typed while disconnected");
        }
        for out in self.outbox.on_connect() {
            if !matches!(self.link, Link::Up(_)) {
                return;
            }
            self.write(&out);
        }
        self.release();
    }

    /// Writes the queued lines the window lets go (all of them on a raw endpoint, which has
    /// no acks), while the connection stays up.
    fn release(&mut self) {
        while matches!(&self.link, Link::Up(up) if up.greeted && up.close_due.is_none()) {
            let Some(out) = self.outbox.release() else {
                return;
            };
            self.write(&out);
        }
    }

    fn schedule_reconnect(&mut self) {
        let (delay, attempt) = self.backoff.next_delay(fastrand::f64());
        // A stable format: tests read the delays back from these lines.
        eprintln!(
            "wsrelay client: reconnecting to {} in {:.1}s (attempt {attempt})",
            self.target_text(self.backoff.url_index()),
            delay.as_secs_f64()
        );
        self.link = Link::Down {
            retry_at: Instant::now() + delay,
        };
    }

    /// Ends the current connection and plans the next one.
    fn drop_link(&mut self, reason: &str) {
        let previous = std::mem::replace(
            &mut self.link,
            Link::Down {
                retry_at: Instant::now(),
            },
        );
        let Link::Up(up) = previous else {
            return;
        };
        up.conn.shutdown();
        self.backoff.disconnected(up.conn.opened_at.elapsed());
        if up.close_due.is_some() {
            // We were closing to finish; the run ends here either way.
            self.finish(false);
            return;
        }
        eprintln!(
            "wsrelay client: connection to {} lost: {reason}",
            self.target_text(up.target)
        );
        self.schedule_reconnect();
    }

    /// With `--token-cmd` on `/ws`, when to refresh the current token (80% of its lifetime
    /// left). Never on a raw endpoint (`/r/<room>`, `/echo`): it has no envelope, so a
    /// `refresh` would be an ordinary message, relayed to every member with the token in it.
    /// There the relay closes with 4001 when the token expires and the client reconnects with
    /// a new one (docs/protocol.md, "Token refresh and expiry").
    fn refresh_due(&self, now: Instant) -> Option<Instant> {
        self.settings.token_cmd.as_ref()?;
        if self.settings.endpoint != Endpoint::Envelope {
            return None;
        }
        let exp = self.token.as_deref().and_then(token::exp_of);
        token::refresh_delay(exp, now_ms() as f64 / 1000.0).map(|delay| now + delay)
    }

    /// Starts fetching a new token for the open connection, on a thread of its own (the
    /// command may take up to `token::FETCH_TIMEOUT`, and this loop must keep reading and
    /// pinging meanwhile). `token_fetched` acts on the result.
    fn refresh_token(&mut self) {
        let Some(command) = self.settings.token_cmd.clone() else {
            return;
        };
        let (generation, sender) = (self.generation, self.sender.clone());
        let Link::Up(up) = &mut self.link else {
            return;
        };
        up.refresh_due = None;
        let spawned = std::thread::Builder::new()
            .name("wsrelay-client-token".into())
            .spawn(move || {
                let fetched = token::fetch(&command, token::FETCH_TIMEOUT);
                let _ = sender.send(Input::Token {
                    generation,
                    fetched,
                });
            });
        if let Err(e) = spawned {
            self.token_fetched(Err(format!("cannot start the token command's thread: {e}")));
        }
    }

    /// Sends a fetched token as a `refresh` on the open connection (SPEC §16). If the command
    /// failed, it is tried again halfway to the next refresh point; if the token runs out
    /// first, the relay closes with 4001 and the client reconnects with a new one.
    fn token_fetched(&mut self, fetched: Result<String, String>) {
        let now = Instant::now();
        let retry = self.refresh_due(now).map(|due| now + (due - now) / 2);
        let Link::Up(up) = &mut self.link else {
            return;
        };
        let fresh = match fetched {
            Ok(fresh) => fresh,
            Err(e) => {
                eprintln!("wsrelay client: --token-cmd: {e}; the token is not refreshed");
                up.refresh_due = retry.map(|at| at.max(now + token::MIN_REFRESH_DELAY));
                return;
            }
        };
        let text = serde_json::json!({"type": "refresh", "token": fresh}).to_string();
        self.token = Some(fresh);
        up.refresh_due = None;
        match up.conn.send(OpCode::Text, text.as_bytes()) {
            Ok(()) => log::debug!("client: sent a refresh"),
            Err(e) => return self.drop_link(&format!("write failed: {e}")),
        }
        let next = self.refresh_due(now);
        if let Link::Up(up) = &mut self.link {
            up.refresh_due = next;
        }
    }

    fn target_text(&self, index: usize) -> String {
        self.settings
            .targets
            .get(index)
            .map(|t| t.text.clone())
            .unwrap_or_default()
    }

    // ---- time ----------------------------------------------------------------------------

    fn on_time(&mut self, now: Instant) {
        enum Due {
            Nothing,
            Reconnect,
            CloseWaitOver,
            NoPong,
            Ping,
            Refresh,
        }
        let due = match &self.link {
            Link::Down { retry_at } if now >= *retry_at => Due::Reconnect,
            Link::Down { .. } => Due::Nothing,
            Link::Up(up) if up.close_due.is_some_and(|at| now >= at) => Due::CloseWaitOver,
            Link::Up(up) if up.pong_due.is_some_and(|at| now >= at) => Due::NoPong,
            Link::Up(up) if up.next_ping.is_some_and(|at| now >= at) => Due::Ping,
            Link::Up(up) if up.refresh_due.is_some_and(|at| now >= at) => Due::Refresh,
            Link::Up(_) => Due::Nothing,
        };
        match due {
            Due::Nothing => {}
            Due::Reconnect => self.connect_now(),
            Due::CloseWaitOver => self.finish(false),
            Due::NoPong => {
                let waited = self.settings.pong_timeout.as_secs_f64();
                self.drop_link(&format!("no pong within {waited}s"));
            }
            Due::Ping => self.send_ping(now),
            Due::Refresh => self.refresh_token(),
        }
    }

    /// SPEC §7: a Ping every `--ping-interval`; a Pong must follow within `--pong-timeout`.
    fn send_ping(&mut self, now: Instant) {
        let (interval, timeout) = (self.settings.ping_interval, self.settings.pong_timeout);
        let Link::Up(up) = &mut self.link else {
            return;
        };
        up.ping_count += 1;
        let payload = up.ping_count.to_be_bytes();
        up.next_ping = Some(now + interval);
        if up.pong_due.is_none() {
            up.pong_due = Some(now + timeout);
        }
        if let Err(e) = up.conn.send(OpCode::Ping, &payload) {
            self.drop_link(&format!("cannot send a ping: {e}"));
        }
    }

    // ---- finishing -----------------------------------------------------------------------

    /// Once input has ended: close when nothing is owed any more, or give up at `--timeout`.
    fn check_finished(&mut self, now: Instant) {
        let Some(closed_at) = self.stdin_closed_at else {
            return;
        };
        if self.exit.is_some() {
            return;
        }
        let settled = match self.settings.endpoint {
            Endpoint::Envelope => self.outbox.is_settled(),
            Endpoint::Raw => self.outbox.queued() == 0,
        };
        if settled {
            match &mut self.link {
                // Already closing: the server's Close or the close deadline ends the run.
                Link::Up(up) if up.close_due.is_some() => {}
                Link::Up(up) => {
                    up.close_due = Some(now + CLOSE_WAIT);
                    if up.conn.send_close(Some(CloseCode::NORMAL)).is_err() {
                        self.finish(false);
                    }
                    return;
                }
                Link::Down { .. } if self.ever_connected => {
                    self.finish(false);
                    return;
                }
                // Never reached the server: keep trying until --timeout, so that a run that
                // could not connect does not pass for one that had nothing to say.
                Link::Down { .. } => {}
            }
        }
        if now >= closed_at + self.settings.timeout {
            if settled && self.ever_connected {
                self.finish(false);
            } else {
                self.report_timeout();
                self.exit = Some(ExitCode::from(EXIT_FAILED));
            }
        }
    }

    fn report_timeout(&self) {
        let waited = self.settings.timeout.as_secs_f64();
        let queued = self.outbox.queued();
        if !self.ever_connected {
            eprintln!("wsrelay client: gave up after {waited}s without reaching the server");
            return;
        }
        match self.settings.endpoint {
            Endpoint::Envelope => eprintln!(
                "wsrelay client: gave up after {waited}s: {} message(s) not acknowledged, \
                 {queued} not sent",
                self.outbox.unacked()
            ),
            Endpoint::Raw => {
                eprintln!("wsrelay client: gave up after {waited}s: {queued} line(s) not sent")
            }
        }
    }

    /// Ends the run after input ended and nothing is owed; `clean` when the close handshake
    /// completed.
    fn finish(&mut self, clean: bool) {
        if let Link::Up(up) = &self.link {
            up.conn.shutdown();
        }
        if clean {
            // The server answered our Close after reading everything before it (TCP keeps
            // order), so every raw line written on this connection arrived.
            self.raw_unconfirmed = false;
        }
        let code = if self.raw_unconfirmed {
            eprintln!(
                "wsrelay client: the connection ended before the closing handshake; \
                 lines sent on it may not have arrived"
            );
            EXIT_FAILED
        } else if self.failures > 0 {
            EXIT_FAILED
        } else {
            0
        };
        self.exit = Some(ExitCode::from(code));
    }

    // ---- input lines ---------------------------------------------------------------------

    fn on_line(&mut self, text: &str) {
        let out = match self.settings.endpoint {
            Endpoint::Raw if text.is_empty() => return,
            Endpoint::Raw => Outgoing::Raw(text.to_string()),
            Endpoint::Envelope => {
                let parsed = line::parse_line(text).and_then(|parsed| {
                    parsed
                        .map(|l| line::resolve(l, &self.settings.default_target))
                        .transpose()
                });
                match parsed {
                    Ok(None) => return,
                    Ok(Some(Line::Help)) => {
                        eprintln!("{}", line::HELP);
                        return;
                    }
                    Ok(Some(Line::Send { to, text })) => Outgoing::Send {
                        id: self.outbox.next_id(),
                        to,
                        text,
                    },
                    Ok(Some(Line::Publish { room, text })) => Outgoing::Publish {
                        id: self.outbox.next_id(),
                        room,
                        text,
                    },
                    Ok(Some(Line::Join(room))) => Outgoing::Join(room),
                    Ok(Some(Line::Leave(room))) => Outgoing::Leave(room),
                    // `resolve` turned every plain line into a send or publish, or refused it.
                    Ok(Some(Line::Plain(_))) => return,
                    Err(e) => {
                        eprintln!("wsrelay client: {e}");
                        self.failures += 1;
                        return;
                    }
                }
            }
        };
        self.submit(out);
    }

    /// Writes `out` now, or queues it until the connection is up and greeted.
    fn submit(&mut self, out: Outgoing) {
        match &self.link {
            Link::Up(up) if up.close_due.is_none() && up.greeted && self.outbox.may_write(&out) => {
                let out = self.outbox.send_now(out);
                self.write(&out);
                return;
            }
            // Connected, and the welcome or room in the window still to come: a wait, not a
            // disconnection, so the line is kept whatever the queue's limit (that bounds lines
            // typed while disconnected; these were read already).
            Link::Up(up) if up.close_due.is_none() => {
                self.outbox.hold(out);
                return;
            }
            _ => {}
        }
        if let Err(overflow) = self.outbox.queue(out) {
            eprintln!(
                "wsrelay client: not connected and {} lines are already queued; \
                 dropped a line for {}",
                self.settings.queue_limit,
                overflow.0.recipient()
            );
            self.failures += 1;
        }
    }

    /// Writes one outgoing message as a text frame on the open connection.
    fn write(&mut self, out: &Outgoing) {
        let Link::Up(up) = &mut self.link else {
            return;
        };
        let text = match out {
            // A room we were in before a reconnect: ask for what we missed (SPEC §16).
            Outgoing::Join(room) => envelope::encode_join(room, self.seen.room_since(room)),
            Outgoing::Leave(room) => {
                self.seen.left(room);
                envelope::encode(out)
            }
            _ => envelope::encode(out),
        };
        match up.conn.send(OpCode::Text, text.as_bytes()) {
            Ok(()) => {
                log::debug!("client: wrote {text}");
                if matches!(out, Outgoing::Raw(_)) {
                    self.raw_unconfirmed = true;
                }
            }
            Err(e) => self.drop_link(&format!("write failed: {e}")),
        }
    }

    // ---- connection events ---------------------------------------------------------------

    fn on_link_event(&mut self, event: LinkEvent) {
        match event {
            LinkEvent::Frame(OwnedEvent::Message { opcode, data }) => self.on_message(opcode, data),
            LinkEvent::Frame(OwnedEvent::Ping(payload)) => {
                // RFC 6455 §5.5.2: answer with a Pong carrying the same payload.
                if let Link::Up(up) = &mut self.link {
                    if let Err(e) = up.conn.send(OpCode::Pong, &payload) {
                        self.drop_link(&format!("cannot answer a ping: {e}"));
                    }
                }
            }
            LinkEvent::Frame(OwnedEvent::Pong(_)) => {
                if let Link::Up(up) = &mut self.link {
                    up.pong_due = None;
                }
            }
            LinkEvent::Frame(OwnedEvent::Close(frame)) => self.on_close(frame),
            LinkEvent::Protocol(e) => {
                // RFC 6455 §7.1.7: fail the connection, with the code the error calls for.
                if let Link::Up(up) = &mut self.link {
                    let _ = up.conn.send_close(Some(e.close_code()));
                }
                self.drop_link(&format!("protocol error from the server: {e}"));
            }
            LinkEvent::Lost(reason) => self.drop_link(&reason),
        }
    }

    fn on_close(&mut self, frame: Option<(CloseCode, String)>) {
        let Link::Up(up) = &mut self.link else {
            return;
        };
        if up.close_due.is_some() {
            // The answer to our Close: the closing handshake is complete (RFC 6455 §7.1.2).
            self.finish(true);
            return;
        }
        // RFC 6455 §5.5.1: answer a Close with a Close, echoing the status code.
        let _ = up.conn.send_close(frame.as_ref().map(|(code, _)| *code));
        if frame
            .as_ref()
            .is_some_and(|(code, _)| code.0 == TOKEN_EXPIRED_CLOSE)
        {
            return self.token_expired();
        }
        let why = match &frame {
            Some((code, reason)) if reason.is_empty() => format!("close {code}"),
            Some((code, reason)) => format!("close {code}: {}", envelope::printable(reason)),
            None => "close without a code".to_string(),
        };
        self.drop_link(&format!("the server closed the connection ({why})"));
    }

    /// The relay closed the connection because its token expired (4001, docs/protocol.md). With
    /// `--token-cmd`, reconnect at once (the connection fetches a new token); with a fixed
    /// `--token` there is no new one to get, so the run ends as a final refusal.
    fn token_expired(&mut self) {
        if self.settings.token_cmd.is_none() {
            if let Link::Up(up) = &self.link {
                up.conn.shutdown();
            }
            eprintln!(
                "wsrelay client: the token expired (close 4001); give a new --token, or \
                 --token-cmd to have the client fetch and refresh tokens itself"
            );
            self.exit = Some(ExitCode::from(EXIT_REFUSED));
            return;
        }
        let previous = std::mem::replace(
            &mut self.link,
            Link::Down {
                retry_at: Instant::now(),
            },
        );
        if let Link::Up(up) = previous {
            up.conn.shutdown();
            self.backoff.disconnected(up.conn.opened_at.elapsed());
            eprintln!(
                "wsrelay client: the token expired (close 4001); reconnecting to {} with a new one",
                self.target_text(up.target)
            );
        }
    }

    fn on_message(&mut self, opcode: OpCode, data: Vec<u8>) {
        // The decoder has checked that text messages are UTF-8 (RFC 6455 §8.1).
        let text = match opcode {
            OpCode::Text => std::str::from_utf8(&data).ok(),
            _ => None,
        };
        match self.settings.endpoint {
            Endpoint::Raw => {
                let line = if self.settings.json {
                    envelope::raw_json(text, &data, now_ms())
                } else {
                    envelope::render_raw(&clock(None), text, &data)
                };
                self.print(&line);
            }
            Endpoint::Envelope => match text {
                Some(text) => self.on_envelope(text),
                None => eprintln!(
                    "wsrelay client: ignored a binary message of {} bytes (/ws speaks JSON text)",
                    data.len()
                ),
            },
        }
    }

    fn on_envelope(&mut self, text: &str) {
        let parsed = match envelope::parse(text) {
            Ok(parsed) => parsed,
            Err(e) => {
                eprintln!("wsrelay client: {e}");
                return;
            }
        };
        let interactive = self.settings.mode == Mode::Interactive;
        let human = match parsed {
            ServerEnvelope::Welcome {
                id,
                last_msg_id,
                epoch,
                recovered,
            } => {
                self.seen.welcome(last_msg_id.as_deref(), epoch.as_deref());
                let first = match &mut self.link {
                    Link::Up(up) => !std::mem::replace(&mut up.greeted, true),
                    Link::Down { .. } => false,
                };
                let url = match &self.link {
                    Link::Up(up) => self.target_text(up.target),
                    Link::Down { .. } => String::new(),
                };
                eprintln!(
                    "wsrelay client: connected to {url} as {}",
                    envelope::printable(&id)
                );
                if recovered == Some(false) {
                    // SPEC §13: never a silent partial recovery. The relay sends what it still
                    // has; the user must know the rest may be gone.
                    eprintln!(
                        "wsrelay client: some messages sent to you while you were away may be missing (the relay restarted without its history, or they outlived its retention)"
                    );
                }
                if first {
                    self.send_what_waited();
                }
                None
            }
            ServerEnvelope::Message {
                msg_id,
                from,
                to,
                room,
                payload,
                timestamp_ms,
            } => {
                if let Some(msg_id) = msg_id {
                    if !self.seen.first_time_in(room.as_deref(), &msg_id) {
                        return; // a copy we already showed (recovery or re-send)
                    }
                    if let Some(room) = &room {
                        self.seen.room_message(room, &msg_id);
                    }
                }
                Some(envelope::render_message(
                    &clock(timestamp_ms),
                    &from,
                    to.as_deref(),
                    room.as_deref(),
                    &payload,
                ))
            }
            ServerEnvelope::Ack {
                id, status, reason, ..
            } => {
                let Some(sent) = id.as_deref().and_then(|id| self.outbox.ack(id)) else {
                    return; // the second ack of a message re-sent after a reconnect
                };
                if AckStatus::parse(&status) == Some(AckStatus::Rejected) {
                    self.failures += 1;
                    eprintln!(
                        "wsrelay client: message to {} rejected: {}",
                        sent.recipient(),
                        envelope::printable(reason.as_deref().unwrap_or("no reason given"))
                    );
                }
                // A place in the window is free.
                self.release();
                interactive
                    .then(|| envelope::render_ack(&clock(None), &sent, &status, reason.as_deref()))
            }
            ServerEnvelope::Presence { room, id, event } => {
                interactive.then(|| envelope::render_presence(&clock(None), &room, &id, &event))
            }
            ServerEnvelope::Error { code, message } => {
                self.failures += 1;
                eprintln!(
                    "wsrelay client: server error {}: {}",
                    envelope::printable(&code),
                    envelope::printable(&message)
                );
                None
            }
            ServerEnvelope::Other(_) => None,
            ServerEnvelope::Refreshed { exp } => {
                let left = exp.map(|exp| exp - now_ms() as f64 / 1000.0);
                match left {
                    Some(left) => eprintln!(
                        "wsrelay client: token refreshed (expires in {:.0}s)",
                        left.max(0.0)
                    ),
                    None => eprintln!("wsrelay client: token refreshed"),
                }
                None
            }
            ServerEnvelope::Joined {
                room,
                recovered,
                last_msg_id,
                epoch,
            } => {
                self.seen.joined(&room, last_msg_id.as_deref());
                self.seen.room_epoch(&room, epoch);
                if !recovered {
                    // SPEC §13: never a silent partial recovery (the relay replayed what it
                    // still had, before this answer).
                    eprintln!(
                        "wsrelay client: some messages in #{} while you were away may be missing (the relay keeps no history that far back)",
                        envelope::printable(&room)
                    );
                }
                None
            }
        };
        if self.settings.json {
            self.print(&envelope::json_line(text));
        } else if let Some(line) = human {
            self.print(&line);
        }
    }

    /// One line on stdout. If stdout is gone (the reader of a pipe quit), so is our purpose.
    fn print(&mut self, line: &str) {
        let mut out = io::stdout().lock();
        if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
            self.exit = Some(ExitCode::from(EXIT_FAILED));
        }
    }
}

/// `HH:MM:SS` in local time, of a relay timestamp (ms since the epoch) or of now.
fn clock(timestamp_ms: Option<i64>) -> String {
    let when = timestamp_ms
        .and_then(|ms| Local.timestamp_millis_opt(ms).single())
        .unwrap_or_else(Local::now);
    when.format("%H:%M:%S").to_string()
}

/// Now in milliseconds since the epoch, for `--json` lines of raw endpoints.
fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
