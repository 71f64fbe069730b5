//! The Redis engine's two connection threads (SPEC §13: the reactor never blocks on the engine).
//!
//! Owns: the command thread (`spawn_commands`: takes every job waiting on its channel, sends
//! them as one pipeline, answers each in order) and the subscriber thread (`spawn_pubsub`:
//! holds the PUB/SUB connection, follows the subscriptions the engine asks for, probes an idle
//! connection with PING), reconnecting with backoff, and the `Input`s both send back.
//! Does not: know what a job means (the engine tags it) or look inside a message.
//!
//! Both threads answer through one channel and then call the `Wake` the engine was given, so the
//! engine sees replies and published messages in the order the threads received them.

use super::script::{Script, SOURCES};
use crate::engine::Wake;
use redis::{Cmd, Value};
use std::collections::HashSet;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::time::{Duration, Instant};

/// The most jobs in one pipeline: bounds one round trip's reply size.
const MAX_BATCH: usize = 512;
/// How long a command may wait for its reply before the connection is given up.
const REPLY_DEADLINE: Duration = Duration::from_secs(2);
/// Connect timeout, both threads.
const CONNECT_DEADLINE: Duration = Duration::from_secs(1);
/// Reconnect delays: doubling from the first to the last.
const BACKOFF_FIRST: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// The subscriber thread reads in slices this long, to see the engine's (un)subscribe requests.
const PUBSUB_SLICE: Duration = Duration::from_millis(10);
/// A PUB/SUB connection silent this long is probed with PING, which must answer within
/// `REPLY_DEADLINE` (SPEC §15: a dead PUB/SUB connection must be noticed).
pub const PROBE_IDLE: Duration = Duration::from_secs(1);
/// How often the subscriber thread wakes the reactor when nothing else did.
const TICK: Duration = Duration::from_secs(1);

/// One piece of work for the command thread; `tag` comes back with its reply.
pub enum Job<T> {
    Script {
        script: Script,
        keys: Vec<String>,
        args: Vec<Vec<u8>>,
        tag: T,
    },
    Plain {
        cmd: Cmd,
        tag: T,
    },
}

/// Which connection a state change is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Link {
    Commands,
    Pubsub,
}

impl Link {
    pub fn name(self) -> &'static str {
        match self {
            Link::Commands => "commands",
            Link::Pubsub => "pubsub",
        }
    }
}

/// What the threads tell the engine.
pub enum Input<T> {
    /// A job's reply: its value (a server error as `Err`), or `Err` if Redis was unreachable.
    Reply {
        tag: T,
        result: Result<Value, Failure>,
    },
    /// One pipeline went out and came back.
    Batch { jobs: usize, round_trip: Duration },
    /// A connection came up (`Ok`) or went down, saying why.
    State { link: Link, up: Result<(), String> },
    /// A subscription took effect (also each one renewed after a reconnect).
    Subscribed(String),
    /// A message published on a channel this node subscribes to.
    Message { channel: Vec<u8>, payload: Vec<u8> },
}

/// Why a job has no value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    /// Redis was not reachable (or the connection broke): the job may or may not have run.
    Unreachable(String),
    /// Redis answered with an error.
    Server(String),
}

/// What the engine asks of the subscriber thread.
pub enum Subscription {
    Subscribe(String),
    Unsubscribe(String),
}

fn connect(url: &str) -> redis::RedisResult<redis::Connection> {
    let client = redis::Client::open(url)?;
    let con = client.get_connection_with_timeout(CONNECT_DEADLINE)?;
    con.set_read_timeout(Some(REPLY_DEADLINE))?;
    con.set_write_timeout(Some(REPLY_DEADLINE))?;
    Ok(con)
}

fn load_scripts(con: &mut redis::Connection) -> redis::RedisResult<Vec<String>> {
    SOURCES
        .iter()
        .map(|source| redis::cmd("SCRIPT").arg("LOAD").arg(*source).query(con))
        .collect()
}

/// The doubling delay between reconnect attempts.
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Backoff {
        Backoff {
            next: BACKOFF_FIRST,
        }
    }

    fn take(&mut self) -> Duration {
        let now = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        now
    }
}

/// Starts the command thread. It ends when the engine drops its sender.
pub fn spawn_commands<T: Send + 'static>(
    url: String,
    jobs: Receiver<Job<T>>,
    out: Sender<Input<T>>,
    wake: Wake,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("wsrelay-redis-cmd".into())
        .spawn(move || Commands::new(url, out, wake).run(jobs))
        .map(drop)
}

struct Commands<T> {
    url: String,
    out: Sender<Input<T>>,
    wake: Wake,
    con: Option<(redis::Connection, Vec<String>)>,
    backoff: Backoff,
    retry_at: Instant,
}

impl<T> Commands<T> {
    fn new(url: String, out: Sender<Input<T>>, wake: Wake) -> Self {
        Commands {
            url,
            out,
            wake,
            con: None,
            backoff: Backoff::new(),
            retry_at: Instant::now(),
        }
    }

    fn run(mut self, jobs: Receiver<Job<T>>) {
        while let Ok(first) = jobs.recv() {
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match jobs.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            self.ensure_connected();
            let results = match &mut self.con {
                Some((con, shas)) => {
                    let start = Instant::now();
                    match run_batch(con, shas, &batch) {
                        Ok(results) => {
                            let _ = self.out.send(Input::Batch {
                                jobs: batch.len(),
                                round_trip: start.elapsed(),
                            });
                            results
                        }
                        Err(e) => {
                            let why = e.to_string();
                            self.lost(why.clone());
                            vec![Err(Failure::Unreachable(why)); batch.len()]
                        }
                    }
                }
                None => vec![Err(Failure::Unreachable("not connected".into())); batch.len()],
            };
            for (job, result) in batch.into_iter().zip(results) {
                let tag = match job {
                    Job::Script { tag, .. } | Job::Plain { tag, .. } => tag,
                };
                let _ = self.out.send(Input::Reply { tag, result });
            }
            (self.wake)();
        }
    }

    /// Connects (and loads the scripts) unless connected, or still waiting out the backoff:
    /// while Redis is away, jobs fail at once instead of each waiting for a connect timeout.
    fn ensure_connected(&mut self) {
        if self.con.is_some() || Instant::now() < self.retry_at {
            return;
        }
        let attempt = connect(&self.url).and_then(|mut con| {
            let shas = load_scripts(&mut con)?;
            Ok((con, shas))
        });
        match attempt {
            Ok(con) => {
                self.con = Some(con);
                self.backoff = Backoff::new();
                let _ = self.out.send(Input::State {
                    link: Link::Commands,
                    up: Ok(()),
                });
            }
            Err(e) => self.lost(e.to_string()),
        }
    }

    fn lost(&mut self, why: String) {
        self.con = None;
        self.retry_at = Instant::now() + self.backoff.take();
        let _ = self.out.send(Input::State {
            link: Link::Commands,
            up: Err(why),
        });
    }
}

fn command<T>(job: &Job<T>, shas: &[String]) -> Cmd {
    match job {
        Job::Script {
            script, keys, args, ..
        } => {
            let mut cmd = redis::cmd("EVALSHA");
            cmd.arg(&shas[*script as usize]).arg(keys.len()).arg(keys);
            for a in args {
                cmd.arg(a.as_slice());
            }
            cmd
        }
        Job::Plain { cmd, .. } => cmd.clone(),
    }
}

/// Sends `batch` as one pipeline. A script Redis no longer knows (`NOSCRIPT`: flushed, or a
/// restart this connection did not see) did not run: the scripts are loaded again and only
/// those jobs are sent again.
fn run_batch<T>(
    con: &mut redis::Connection,
    shas: &mut Vec<String>,
    batch: &[Job<T>],
) -> redis::RedisResult<Vec<Result<Value, Failure>>> {
    let mut results = pipeline(con, batch.iter().map(|j| command(j, shas)))?;
    let again: Vec<usize> = (0..batch.len())
        .filter(|&i| matches!(&results[i], Err(Failure::Server(e)) if e.starts_with("NOSCRIPT")))
        .collect();
    if !again.is_empty() {
        *shas = load_scripts(con)?;
        let retried = pipeline(con, again.iter().map(|&i| command(&batch[i], shas)))?;
        for (i, result) in again.into_iter().zip(retried) {
            results[i] = result;
        }
    }
    Ok(results)
}

fn pipeline(
    con: &mut redis::Connection,
    cmds: impl Iterator<Item = Cmd>,
) -> redis::RedisResult<Vec<Result<Value, Failure>>> {
    let mut pipe = redis::pipe();
    for cmd in cmds {
        pipe.add_command(cmd);
    }
    let values: Vec<redis::RedisResult<Value>> = pipe.ignore_errors().query(con)?;
    Ok(values
        .into_iter()
        .map(|v| v.map_err(|e| Failure::Server(server_error(&e))))
        .collect())
}

/// "CODE detail", as Redis said it.
fn server_error(e: &redis::RedisError) -> String {
    match (e.code(), e.detail()) {
        (Some(code), Some(detail)) => format!("{code} {detail}"),
        (Some(code), None) => code.to_string(),
        _ => e.to_string(),
    }
}

/// Starts the subscriber thread. It ends when the engine drops its sender.
pub fn spawn_pubsub<T: Send + 'static>(
    url: String,
    requests: Receiver<Subscription>,
    out: Sender<Input<T>>,
    wake: Wake,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("wsrelay-redis-sub".into())
        .spawn(move || run_pubsub(&url, &requests, &out, &wake))
        .map(drop)
}

/// Why a subscribed session ended.
enum Ended {
    /// The engine is gone: the thread ends.
    Closed,
    /// The connection failed: reconnect.
    Lost(String),
}

fn run_pubsub<T>(
    url: &str,
    requests: &Receiver<Subscription>,
    out: &Sender<Input<T>>,
    wake: &Wake,
) {
    let mut channels: HashSet<String> = HashSet::new();
    let mut backoff = Backoff::new();
    loop {
        // A frozen server still accepts TCP connections (the kernel does): only an answer
        // proves the connection up.
        let answered = connect(url).and_then(|mut con| {
            redis::cmd("PING").query::<String>(&mut con)?;
            Ok(con)
        });
        let ended = match answered {
            Ok(mut con) => {
                backoff = Backoff::new();
                let _ = out.send(Input::State {
                    link: Link::Pubsub,
                    up: Ok(()),
                });
                wake();
                subscribed(&mut con, &mut channels, requests, out, wake)
            }
            Err(e) => Ended::Lost(e.to_string()),
        };
        let why = match ended {
            Ended::Closed => return,
            Ended::Lost(why) => why,
        };
        let _ = out.send(Input::State {
            link: Link::Pubsub,
            up: Err(why),
        });
        wake();
        // Wait out the backoff, still following what the engine asks for.
        let until = Instant::now() + backoff.take();
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            match requests.recv_timeout(left) {
                Ok(request) => follow(&mut channels, request),
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
    }
}

fn follow(channels: &mut HashSet<String>, request: Subscription) {
    match request {
        Subscription::Subscribe(c) => {
            channels.insert(c);
        }
        Subscription::Unsubscribe(c) => {
            channels.remove(&c);
        }
    }
}

/// One PUB/SUB session: subscribe to everything wanted, then read messages in short slices,
/// applying the engine's requests between them, and PING when the connection has been quiet.
fn subscribed<T>(
    con: &mut redis::Connection,
    channels: &mut HashSet<String>,
    requests: &Receiver<Subscription>,
    out: &Sender<Input<T>>,
    wake: &Wake,
) -> Ended {
    let mut pubsub = con.as_pubsub();
    let lost = |e: redis::RedisError| Ended::Lost(e.to_string());
    let confirm = |pubsub: &mut redis::PubSub<'_>, channel: &str| {
        pubsub.set_read_timeout(Some(REPLY_DEADLINE))?;
        pubsub.subscribe(channel)?;
        let _ = out.send(Input::Subscribed(channel.to_string()));
        wake();
        Ok::<(), redis::RedisError>(())
    };
    for channel in channels.iter() {
        if let Err(e) = confirm(&mut pubsub, channel) {
            return lost(e);
        }
    }
    let mut heard = Instant::now();
    let mut ticked = Instant::now();
    loop {
        loop {
            match requests.try_recv() {
                Ok(Subscription::Subscribe(c)) => {
                    if channels.insert(c.clone()) {
                        if let Err(e) = confirm(&mut pubsub, &c) {
                            return lost(e);
                        }
                    }
                }
                Ok(Subscription::Unsubscribe(c)) => {
                    if channels.remove(&c) {
                        let done = pubsub
                            .set_read_timeout(Some(REPLY_DEADLINE))
                            .and_then(|()| pubsub.unsubscribe(&c));
                        if let Err(e) = done {
                            return lost(e);
                        }
                    }
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return Ended::Closed,
            }
        }
        if heard.elapsed() >= PROBE_IDLE {
            let probe = pubsub
                .set_read_timeout(Some(REPLY_DEADLINE))
                .and_then(|()| pubsub.ping::<Value>());
            if let Err(e) = probe {
                return Ended::Lost(format!("PING unanswered on the PUB/SUB connection: {e}"));
            }
            heard = Instant::now();
        }
        if let Err(e) = pubsub.set_read_timeout(Some(PUBSUB_SLICE)) {
            return lost(e);
        }
        let mut got = false;
        // At most a slice's worth of messages before the requests and the waker get their turn.
        for _ in 0..MAX_BATCH {
            match pubsub.get_message() {
                Ok(msg) => {
                    got = true;
                    let _ = out.send(Input::Message {
                        channel: msg.get_channel_name().as_bytes().to_vec(),
                        payload: msg.get_payload_bytes().to_vec(),
                    });
                }
                Err(e) if e.is_timeout() => break,
                Err(e) => {
                    if got {
                        wake();
                    }
                    return lost(e);
                }
            }
        }
        if got {
            heard = Instant::now();
            wake();
        } else if ticked.elapsed() >= TICK {
            // The engine has periodic duties (online marks, retrying a failed re-read) and the
            // hub no timer of its own: a wake-up now and then runs them (`Engine::maintain`).
            ticked = Instant::now();
            wake();
        }
    }
}
