//! `wsrelay bench`: a multi-threaded load generator on the project's own codec, in the client
//! role.
//!
//! Owns: the flags (`BenchArgs`) and their checks, the plan of which thread opens which
//! connection, and the coordinator: start the workers, give the go once every connection is
//! open, sample the server at the edges of the measured window, stop, collect, report.
//! Does not: speak WebSocket itself (`client.rs`, on `protocol/`), run the per-thread loops
//! (`worker.rs`), or do the arithmetic of the report (`stats.rs`).
//!
//! SPEC §11; the load policy of this machine (loopback only, bounded runs).
//!
//! Layout:
//! * `mod.rs`    flags, plan, coordinator;
//! * `multi.rs`  `--processes N`: child processes of this executable, each with its part of
//!   the plan, their windows lined up, their reports merged;
//! * `worker.rs` one thread: a mio `Poll` over its connections, stages, windows, rate limit;
//! * `client.rs` one connection: non-blocking connect, handshake, masked frames, close;
//! * `stats.rs`  payload stamps, per-thread tallies, latency summary, report math;
//! * `report.rs` the `Report`, its JSON field documentation and its text form;
//! * `procfs.rs` the server's CPU time and RSS from /proc;
//! * `target.rs` loopback check, `--source-addrs`, room names.
//!
//! A run: every thread opens its connections; when all threads are ready the coordinator
//! gives the go; traffic runs through the warm-up and the measured window; at the end of the
//! window the coordinator samples the server and says stop; threads drain what is in flight,
//! close every connection with a close handshake, and hand back their tallies. Every stage has
//! a deadline, so a run ends by itself whatever the server does. With `--processes N` the
//! same run happens in N child processes, each on its part of the plan, and this process only
//! coordinates them (`multi.rs`).

pub mod client;
pub mod multi;
pub mod procfs;
pub mod report;
pub mod stats;
pub mod target;
pub mod worker;

use crate::protocol::client_handshake::WsUrl;
use crate::tls::{self, Trust};
use client::TlsTarget;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use multi::Part;
use report::{ChildExtra, Report, ServerFigures, JSON_FIELDS};
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use worker::{ConnPlan, Plan, Shared, Traffic, Worker};

/// Runs longer than this (warm-up plus window) show a progress line on stderr.
const PROGRESS_AFTER: Duration = Duration::from_secs(3);

/// The longest any phase of a run may be (a bench is a bounded run, not a soak test).
const MAX_PHASE: Duration = Duration::from_secs(24 * 3600);

/// Descriptors a process needs besides its connections (stdio, pollers, wakers).
const SPARE_FDS: u64 = 64;

#[derive(clap::Args, Debug)]
#[command(after_long_help = long_help())]
pub struct BenchArgs {
    #[command(subcommand)]
    pub mode: Mode,
}

#[derive(clap::Subcommand, Debug)]
pub enum Mode {
    /// Connections to an echo endpoint, each keeping --window messages in flight.
    #[command(after_long_help = long_help())]
    Echo(EchoArgs),
    /// Rooms whose members relay each other's messages (/r/<room>); counts deliveries.
    #[command(after_long_help = long_help())]
    Broadcast(BroadcastArgs),
    /// Open connections and hold them quiet: server memory per connection, idle CPU.
    #[command(after_long_help = long_help())]
    Idle(IdleArgs),
    /// Connect, handshake and close again, as fast as possible: connections per second.
    #[command(after_long_help = long_help())]
    Connect(ConnectArgs),
}

/// What `--help` says after the flags: how a run is bounded, then every JSON field.
fn long_help() -> String {
    format!(
        "Every run ends by itself: connections open (each within --connect-timeout), then the \
         warm-up, the measured window, at most {} s for the messages in flight to come back, and \
         at most {} s of close handshakes. Load goes only to loopback addresses unless \
         --allow-remote. One process opens as many connections as its descriptor limit allows \
         (raised to the hard limit); for more, --processes N shares the load among N bench \
         processes whose windows line up (--processes auto picks N from the limit).\n\n\
         {JSON_FIELDS}",
        worker::DRAIN_TIMEOUT.as_secs(),
        worker::CLOSE_TIMEOUT.as_secs(),
    )
}

/// Flags every mode takes.
#[derive(clap::Args, Clone, Debug)]
pub struct CommonArgs {
    /// The server's URL, e.g. ws://127.0.0.1:8080/echo (wss:// for TLS). Broadcast: the base
    /// of the room names (ws://127.0.0.1:8080/r/bench gives rooms /r/bench-0, /r/bench-1, ...).
    pub url: String,

    /// wss://: trust only the CA certificates in this PEM file (a test CA) instead of the
    /// public roots.
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,

    /// wss://: do not check the server's certificate (encrypted, but not authenticated).
    #[arg(long, conflicts_with = "ca")]
    pub insecure: bool,

    /// Length of the measured window, after the warm-up.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub duration: Duration,

    /// Traffic before the measured window, excluded from every figure.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,

    /// Worker threads, each with its own poll loop [default: the CPUs this process may use].
    #[arg(long)]
    pub threads: Option<usize>,

    /// Local addresses to bind the client sockets to, round-robin: one address (127.0.0.2) or
    /// a range (127.0.0.1-127.0.0.20). Each address has its own ~28k ephemeral ports.
    #[arg(long, value_parser = parse_sources)]
    pub source_addrs: Option<SourceAddrs>,

    /// The server's process id: also report its CPU time per message and its RSS growth per
    /// connection, from /proc (Linux).
    #[arg(long)]
    pub server_pid: Option<u32>,

    /// Time each connection has to connect and complete its handshake.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,

    /// Print exactly one JSON object (fields below) instead of text.
    #[arg(long)]
    pub json: bool,

    /// Allow a target outside the loopback range (127.0.0.0/8, ::1).
    #[arg(long)]
    pub allow_remote: bool,

    /// Bench processes sharing the load, for more connections than one process has
    /// descriptors: each gets its share of --connections (broadcast: of --rooms; connect: of
    /// --concurrency and of the cycles) and of --rate, and runs --threads threads of its own.
    /// `auto`: as few as the descriptor limit allows.
    #[arg(long, default_value = "1", value_parser = parse_processes)]
    pub processes: Processes,

    /// Internal: this process is part INDEX/COUNT of a --processes run (`multi.rs`).
    #[arg(long, hide = true, value_parser = multi::parse_part)]
    pub child: Option<Part>,
}

/// The parsed `--processes`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Processes {
    Count(usize),
    Auto,
}

fn parse_processes(text: &str) -> Result<Processes, String> {
    match text {
        "auto" => Ok(Processes::Auto),
        _ => match text.parse::<usize>() {
            Ok(n) if n >= 1 => Ok(Processes::Count(n)),
            _ => Err("expected a number of processes (at least 1) or `auto`".into()),
        },
    }
}

/// The parsed `--source-addrs`.
#[derive(Clone, Debug)]
pub struct SourceAddrs(pub Vec<IpAddr>);

fn parse_sources(text: &str) -> Result<SourceAddrs, String> {
    target::parse_source_addrs(text).map(SourceAddrs)
}

#[derive(clap::Args, Debug)]
pub struct EchoArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Connections to open.
    #[arg(long, default_value_t = 100)]
    pub connections: usize,
    /// Messages each connection keeps in flight: a new one leaves when one comes back.
    #[arg(long, default_value_t = 16)]
    pub window: u32,
    /// Payload bytes per message (at least 8: the send time rides in the first 8).
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Cap on messages sent per second, all connections together [default: no cap].
    #[arg(long)]
    pub rate: Option<f64>,
}

#[derive(clap::Args, Debug)]
pub struct BroadcastArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Rooms; all members of a room share one thread, so use at least as many rooms as threads.
    #[arg(long, default_value_t = 1)]
    pub rooms: usize,
    /// Members per room (at least 2).
    #[arg(long, default_value_t = 10)]
    pub members: usize,
    /// Members per room that send; every member counts what it receives.
    #[arg(long, default_value_t = 1)]
    pub senders: usize,
    /// Messages each sender keeps in flight, until the next member of its room has them.
    #[arg(long, default_value_t = 16)]
    pub window: u32,
    /// Payload bytes per message (at least 12: send time and sender ride in the first 12).
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Cap on messages sent per second, all senders together [default: no cap].
    #[arg(long)]
    pub rate: Option<f64>,
}

#[derive(clap::Args, Debug)]
pub struct IdleArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Connections to open and hold.
    #[arg(long, default_value_t = 1000)]
    pub connections: usize,
    /// Give each connection an id of its own, for /ws: `id=bench-<n>` (n = 0, 1, ...) is added
    /// to the URL's query. Without it every connection uses the URL as given (one id's devices).
    #[arg(long)]
    pub unique_ids: bool,
}

#[derive(clap::Args, Debug)]
pub struct ConnectArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Connection cycles in flight at once.
    #[arg(long, default_value_t = 10)]
    pub concurrency: usize,
    /// At most this many cycles in the whole run.
    #[arg(long, default_value_t = 100_000)]
    pub connections: u64,
}

impl Mode {
    fn common(&self) -> &CommonArgs {
        match self {
            Mode::Echo(a) => &a.common,
            Mode::Broadcast(a) => &a.common,
            Mode::Idle(a) => &a.common,
            Mode::Connect(a) => &a.common,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Mode::Echo(_) => "echo",
            Mode::Broadcast(_) => "broadcast",
            Mode::Idle(_) => "idle",
            Mode::Connect(_) => "connect",
        }
    }
}

/// Runs one bench and prints its report. Exit status: 0 if at least one connection opened,
/// 1 if none did (the report says why), 2 if the run could not start (bad flags, refused
/// target, unreadable server pid).
pub fn run(args: BenchArgs) -> ExitCode {
    // A child always speaks JSON: its coordinator reads the report.
    let json = args.mode.common().json || args.mode.common().child.is_some();
    match execute(&args.mode) {
        Ok(report) => {
            if json {
                match serde_json::to_string(&report) {
                    Ok(text) => println!("{text}"),
                    Err(e) => {
                        eprintln!("wsrelay bench: cannot encode the report: {e}");
                        return ExitCode::from(2);
                    }
                }
            } else {
                print!("{}", report.to_text());
            }
            if report.opened > 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("wsrelay bench: {e}");
            ExitCode::from(2)
        }
    }
}

/// The checked shape of a run (or of one process's part of it), before any socket exists.
#[derive(Debug)]
struct Setup {
    traffic: Traffic,
    /// Connections asked for (see `connections` in `JSON_FIELDS`).
    connections: u64,
    /// Connect mode: the cycle budget; 0 otherwise.
    cycles: u64,
    /// What `--processes` divides: connections (echo, idle), rooms (broadcast) or concurrent
    /// slots (connect).
    units: usize,
    plans: Vec<Plan>,
}

/// What this process is in a run: the whole bench (alone, or coordinating `--processes`), or
/// one child of a `--processes` run (`--child`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Whole,
    Child,
}

/// What the bench's own side of a run counted, from its threads or its child processes.
struct Run {
    tally: stats::Tally,
    threads: usize,
    first_error: Option<String>,
    /// The server at the start and at the end of the measured window (`--server-pid`).
    at_start: Option<procfs::Sample>,
    at_end: Option<procfs::Sample>,
}

fn execute(mode: &Mode) -> Result<Report, String> {
    let common = mode.common();
    let part = common.child.unwrap_or(Part::WHOLE);
    let setup = plan(mode, part)?;
    // A child leaves the server to its coordinator, which samples once for all processes.
    let role = match common.child {
        Some(_) => Role::Child,
        None => Role::Whole,
    };
    let pid = common.server_pid.filter(|_| role == Role::Whole);
    let processes = match role {
        Role::Child => 1,
        Role::Whole => processes_for(common.processes, setup.connections, setup.units),
    };
    let before = match pid {
        Some(pid) => Some(
            procfs::sample(pid)
                .map_err(|e| format!("cannot read /proc/{pid} (--server-pid): {e}"))?,
        ),
        None => None,
    };
    let (traffic, connections) = (setup.traffic, setup.connections);
    let run = if processes > 1 {
        multi::coordinate(common, processes, setup.units, setup.connections, pid)?
    } else {
        raise_fd_limit(setup.connections, role);
        run_threads(common, setup, pid, role)?
    };
    let child = match role {
        Role::Child => Some(ChildExtra {
            received_bytes: run.tally.received_bytes,
            latency_histogram: stats::encode_histogram(&run.tally.latency)?,
        }),
        Role::Whole => None,
    };
    let mut report = build_report(mode, traffic, connections, processes, run, pid, before);
    report.child = child;
    Ok(report)
}

/// Runs the whole load in this process: starts the threads, gives the go once all are ready
/// (a child first says `ready` and waits for its coordinator's `go`), samples the server at
/// the edges of the window, stops, collects.
fn run_threads(
    common: &CommonArgs,
    setup: Setup,
    pid: Option<u32>,
    role: Role,
) -> Result<Run, String> {
    let threads = setup.plans.len();
    let shared = Arc::new(Shared::new(threads, setup.cycles));
    let mut wakers = Vec::with_capacity(threads);
    let mut handles = Vec::with_capacity(threads);
    for (i, plan) in setup.plans.into_iter().enumerate() {
        let poll = mio::Poll::new().map_err(|e| format!("cannot create a poller: {e}"))?;
        let waker = mio::Waker::new(poll.registry(), worker::WAKER)
            .map_err(|e| format!("cannot create a waker: {e}"))?;
        wakers.push(waker);
        let shared = Arc::clone(&shared);
        let handle = std::thread::Builder::new()
            .name(format!("bench-{i}"))
            .spawn(move || Worker::new(i, plan, poll, shared).run())
            .map_err(|e| format!("cannot start a thread: {e}"))?;
        handles.push(handle);
    }
    let wake_all = || {
        for w in &wakers {
            let _ = w.wake();
        }
    };

    let bar = match role {
        Role::Child => ProgressBar::hidden(),
        Role::Whole => progress_bar(common.warmup + common.duration),
    };
    let show = |phase: &str| {
        if !bar.is_hidden() {
            bar.set_message(progress_line(
                &shared,
                phase,
                setup.traffic,
                setup.connections,
            ));
            bar.tick();
        }
    };
    while shared.ready() < threads {
        show("opening");
        std::thread::sleep(Duration::from_millis(20));
    }
    // A child whose coordinator is gone (no `go`) closes its connections without traffic.
    let go_ahead = match role {
        Role::Child => multi::ready_then_wait_for_go(),
        Role::Whole => true,
    };
    let (mut at_start, mut at_end) = (None, None);
    if go_ahead {
        let go = Instant::now();
        shared.go(go);
        wake_all();
        let window_start = go + common.warmup;
        let window_end = window_start + common.duration;
        sleep_until(window_start, || show("warm-up"));
        at_start = pid.and_then(|pid| procfs::sample(pid).ok());
        sleep_until(window_end, || show("measuring"));
        at_end = pid.and_then(|pid| procfs::sample(pid).ok());
    }
    shared.stop();
    wake_all();
    show("closing");

    let mut tally = stats::Tally::new();
    let mut first_error = None;
    for handle in handles {
        match handle.join() {
            Ok((t, err)) => {
                tally.merge(&t);
                first_error = first_error.or(err);
            }
            Err(_) => first_error = first_error.or(Some("a worker thread panicked".to_string())),
        }
    }
    bar.finish_and_clear();
    Ok(Run {
        tally,
        threads,
        first_error,
        at_start,
        at_end,
    })
}

/// The report of a run: the bench's counts turned into rates over the window, and the
/// server's figures from the samples.
fn build_report(
    mode: &Mode,
    traffic: Traffic,
    connections: u64,
    processes: usize,
    run: Run,
    pid: Option<u32>,
    before: Option<procfs::Sample>,
) -> Report {
    let common = mode.common();
    let window = common.duration;
    let Run {
        tally,
        threads,
        mut first_error,
        at_start,
        at_end,
    } = run;
    let server = match (pid, before, at_start, at_end) {
        (Some(pid), Some(before), Some(start), Some(end)) => {
            let cpu_secs = end.cpu_secs_since(&start);
            let messages = match traffic {
                Traffic::Echo | Traffic::Broadcast => Some(tally.received),
                Traffic::Idle | Traffic::Connect => None,
            };
            Some(ServerFigures {
                pid,
                cpu_secs,
                rss_before_kib: before.rss_kib,
                rss_after_kib: start.rss_kib,
                rss_per_connection_bytes: match traffic {
                    Traffic::Connect => None,
                    _ => stats::rss_per_connection(before.rss_kib, start.rss_kib, tally.opened),
                },
                cpu_us_per_message: messages.and_then(|m| stats::cpu_us_per(cpu_secs, m)),
                messages_per_cpu_sec: messages.and_then(|m| stats::per_cpu_sec(m, cpu_secs)),
                cpu_us_per_connection: match traffic {
                    Traffic::Connect => stats::cpu_us_per(cpu_secs, tally.completed),
                    _ => None,
                },
            })
        }
        (Some(pid), ..) => {
            first_error = first_error.or(Some(format!("process {pid} vanished during the run")));
            None
        }
        _ => None,
    };
    let rate_per_sec = match traffic {
        Traffic::Echo | Traffic::Broadcast => stats::per_sec(tally.received, window),
        Traffic::Connect => stats::per_sec(tally.completed, window),
        Traffic::Idle => 0.0,
    };
    Report {
        mode: mode.name(),
        url: common.url.clone(),
        processes,
        threads,
        connections,
        opened: tally.opened,
        warmup_secs: common.warmup.as_secs_f64(),
        duration_secs: window.as_secs_f64(),
        sent_total: tally.sent_total,
        received_total: tally.received_total,
        sent: tally.sent,
        received: tally.received,
        completed: tally.completed,
        rate_per_sec,
        bytes_per_sec: stats::per_sec(tally.received_bytes, window),
        clean_closes: tally.clean_closes,
        errors: tally.errors,
        first_error,
        latency_us: stats::summarize(&tally.latency),
        server,
        child: None,
    }
}

/// Checks the flags and decides which thread opens which connection, for the whole run or
/// for one process's part of it (`Part::share`: a consecutive run of connections, rooms or
/// slots, so global connection numbers, room names and source addresses stay what one process
/// would have used).
fn plan(mode: &Mode, part: Part) -> Result<Setup, String> {
    let common = mode.common();
    let url = WsUrl::parse(&common.url).map_err(|e| format!("{}: {e}", common.url))?;
    let target = target::resolve(&url.host, url.port, common.allow_remote)?;
    let tls = tls_target(&url, common)?;
    if common.duration.is_zero() {
        return Err("--duration must be above zero".into());
    }
    for (flag, value) in [
        ("--duration", common.duration),
        ("--warmup", common.warmup),
        ("--connect-timeout", common.connect_timeout),
    ] {
        if value > MAX_PHASE {
            return Err(format!(
                "{flag} may be at most {}",
                humantime::format_duration(MAX_PHASE)
            ));
        }
    }
    let max_threads = match common.threads {
        Some(0) => return Err("--threads must be at least 1".into()),
        Some(n) => n,
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    let sources = common.source_addrs.clone().map(|s| s.0).unwrap_or_default();
    let source_of = |g: usize| (!sources.is_empty()).then(|| sources[g % sources.len()]);
    let check_rate = |rate: Option<f64>| match rate {
        Some(r) if !(r > 0.0 && r.is_finite()) => {
            Err("--rate must be a positive number".to_string())
        }
        _ => Ok(()),
    };
    let check_size = |size: usize, min: usize| {
        if size < min {
            Err(format!(
                "--size must be at least {min} (the send time rides in the payload)"
            ))
        } else if size > client::MAX_MESSAGE {
            Err(format!("--size must be at most {}", client::MAX_MESSAGE))
        } else {
            Ok(())
        }
    };

    // This process's consecutive share of `units`, and of `rate` in proportion.
    let share = |units: usize, rate: Option<f64>| {
        let (first, count) = part.share(units);
        if count == 0 {
            return Err(format!("part {part} of {units} is empty"));
        }
        Ok((first, count, rate.map(|r| r * count as f64 / units as f64)))
    };

    let shape = match mode {
        Mode::Echo(a) => {
            if a.connections == 0 || a.window == 0 {
                return Err("--connections and --window must be at least 1".into());
            }
            check_size(a.size, stats::STAMP_BYTES)?;
            check_rate(a.rate)?;
            let (first, count, rate) = share(a.connections, a.rate)?;
            let threads = max_threads.min(count);
            let per_thread = spread(count, threads, |k| ConnPlan {
                resource: url.resource.clone(),
                source: source_of(first + k),
                witness: None,
            });
            Shape {
                traffic: Traffic::Echo,
                connections: count as u64,
                cycles: 0,
                first,
                units: count,
                size: a.size,
                window: a.window,
                rate,
                per_thread,
            }
        }
        Mode::Idle(a) => {
            if a.connections == 0 {
                return Err("--connections must be at least 1".into());
            }
            let (first, count, _) = share(a.connections, None)?;
            let threads = max_threads.min(count);
            let per_thread = spread(count, threads, |k| ConnPlan {
                resource: if a.unique_ids {
                    target::unique_id_resource(&url.resource, first + k)
                } else {
                    url.resource.clone()
                },
                source: source_of(first + k),
                witness: None,
            });
            Shape {
                traffic: Traffic::Idle,
                connections: count as u64,
                cycles: 0,
                first,
                units: count,
                size: 0,
                window: 0,
                rate: None,
                per_thread,
            }
        }
        Mode::Broadcast(a) => {
            if a.rooms == 0 || a.members < 2 || a.senders == 0 || a.senders > a.members {
                return Err(
                    "need --rooms >= 1, --members >= 2 and 1 <= --senders <= --members".into(),
                );
            }
            if a.window == 0 {
                return Err("--window must be at least 1".into());
            }
            check_size(a.size, stats::STAMP_BYTES + stats::SENDER_BYTES)?;
            check_rate(a.rate)?;
            // Rooms are never split: all members of a room share one thread of one process.
            let (first, count, rate) = share(a.rooms, a.rate)?;
            let threads = max_threads.min(count);
            let rooms = first..first + count;
            let per_thread = broadcast_layout(rooms, a.members, a.senders, threads)
                .into_iter()
                .map(|members| {
                    let senders = members.iter().filter(|m| m.witness.is_some()).count();
                    let conns = members
                        .into_iter()
                        .map(|m| ConnPlan {
                            resource: target::room_resource(&url.resource, m.room),
                            source: source_of(m.global),
                            witness: m.witness,
                        })
                        .collect();
                    ThreadShare {
                        conns,
                        weight: senders as f64,
                    }
                })
                .collect();
            Shape {
                traffic: Traffic::Broadcast,
                connections: (count * a.members) as u64,
                cycles: 0,
                first,
                units: count,
                size: a.size,
                window: a.window,
                rate,
                per_thread,
            }
        }
        Mode::Connect(a) => {
            if a.concurrency == 0 || a.connections == 0 {
                return Err("--concurrency and --connections must be at least 1".into());
            }
            let (first, count, _) = share(a.concurrency, None)?;
            let threads = max_threads.min(count);
            let per_thread = spread(count, threads, |_| ConnPlan {
                resource: url.resource.clone(),
                source: None,
                witness: None,
            });
            Shape {
                traffic: Traffic::Connect,
                connections: count as u64,
                cycles: part.share_u64(a.connections).1,
                first,
                units: count,
                size: 0,
                window: 0,
                rate: None,
                per_thread,
            }
        }
    };

    // Each thread's share of --rate follows its share of the senders.
    let weight_total: f64 = shape.per_thread.iter().map(|t| t.weight).sum();
    let threads = shape.per_thread.len();
    let host = url.host_header();
    let plans = shape
        .per_thread
        .into_iter()
        .enumerate()
        .map(|(i, share)| Plan {
            traffic: shape.traffic,
            target,
            host: host.clone(),
            tls: tls.clone(),
            conns: share.conns,
            sources: sources.clone(),
            source_offset: shape.first + i,
            source_step: threads,
            connect_timeout: common.connect_timeout,
            warmup: common.warmup,
            duration: common.duration,
            window: shape.window,
            size: shape.size,
            rate: shape.rate.map(|r| r * share.weight / weight_total.max(1.0)),
            seed: fastrand::u64(..),
        })
        .collect();
    Ok(Setup {
        traffic: shape.traffic,
        connections: shape.connections,
        cycles: shape.cycles,
        units: shape.units,
        plans,
    })
}

/// What `wss://` needs on every connection: the client configuration from `--ca` or
/// `--insecure` (or the public roots), and the name the certificate must carry.
///
/// # Errors
/// `--ca`/`--insecure` with a `ws://` URL; a CA file that cannot be used; a host that is no
/// DNS name or IP address.
fn tls_target(url: &WsUrl, common: &CommonArgs) -> Result<Option<TlsTarget>, String> {
    if !url.secure {
        if common.ca.is_some() || common.insecure {
            return Err("--ca and --insecure apply to wss:// URLs only".into());
        }
        return Ok(None);
    }
    let trust = match (&common.ca, common.insecure) {
        (Some(path), _) => Trust::CaFile(path.clone()),
        (None, true) => {
            // Once, not once per --processes child.
            if common.child.is_none() {
                eprintln!(
                    "wsrelay bench: warning: --insecure: the server's certificate is not checked"
                );
            }
            Trust::Insecure
        }
        (None, false) => Trust::PublicRoots,
    };
    let config = tls::config::client_config(&trust).map_err(|e| format!("--ca: {e}"))?;
    Ok(Some(TlsTarget {
        config: Arc::new(config),
        name: tls::config::server_name(&url.host)?,
    }))
}

/// What the flags of one mode come to, before it is cut into `Plan`s.
struct Shape {
    traffic: Traffic,
    /// Connections asked for (see `connections` in `JSON_FIELDS`).
    connections: u64,
    /// Connect mode: the cycle budget; 0 otherwise.
    cycles: u64,
    /// The first connection, room or slot of this process's part, and how many it has.
    first: usize,
    units: usize,
    size: usize,
    window: u32,
    rate: Option<f64>,
    per_thread: Vec<ThreadShare>,
}

/// The connections of one thread, and its weight in sharing `--rate` (its senders).
struct ThreadShare {
    conns: Vec<ConnPlan>,
    weight: f64,
}

/// Deals `n` connections round-robin to `threads` threads (connection `g` to thread
/// `g % threads`); each thread's weight for the rate share is its connection count.
fn spread(n: usize, threads: usize, conn: impl Fn(usize) -> ConnPlan) -> Vec<ThreadShare> {
    let mut out: Vec<ThreadShare> = (0..threads)
        .map(|_| ThreadShare {
            conns: Vec::new(),
            weight: 0.0,
        })
        .collect();
    for g in 0..n {
        if let Some(share) = out.get_mut(g % threads) {
            share.conns.push(conn(g));
            share.weight += 1.0;
        }
    }
    out
}

/// One member of a broadcast run, as its thread sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Member {
    room: usize,
    /// Index over all members of the run (for the source address).
    global: usize,
    /// For a sender: the slot of its witness in the same thread.
    witness: Option<usize>,
}

/// Lays out the members of the rooms of this process: its `k`-th room goes to thread
/// `k % threads`, its members in consecutive slots there; the first `senders` members of each
/// room send, each witnessed by the next member of its room (`worker::witness`).
fn broadcast_layout(
    rooms: std::ops::Range<usize>,
    members: usize,
    senders: usize,
    threads: usize,
) -> Vec<Vec<Member>> {
    let mut out: Vec<Vec<Member>> = (0..threads).map(|_| Vec::new()).collect();
    for (k, room) in rooms.enumerate() {
        let Some(slots) = out.get_mut(k % threads) else {
            continue;
        };
        let room_start = slots.len();
        for m in 0..members {
            let slot = room_start + m;
            slots.push(Member {
                room,
                global: room * members + m,
                witness: (m < senders).then(|| worker::witness(slot, room_start, members)),
            });
        }
    }
    out
}

/// How many processes `--processes` comes to: never more than there are units to share;
/// `auto` divides the connections by what one process may open under the hard descriptor
/// limit.
fn processes_for(asked: Processes, connections: u64, units: usize) -> usize {
    let n = match asked {
        Processes::Count(n) => n,
        Processes::Auto => {
            let hard = rlimit::Resource::NOFILE
                .get()
                .map_or(u64::MAX, |(_soft, hard)| hard);
            auto_processes(connections, hard)
        }
    };
    n.clamp(1, units.max(1))
}

/// Processes needed for `connections` when each may hold `hard_limit` descriptors, of which
/// `SPARE_FDS` are not for connections.
fn auto_processes(connections: u64, hard_limit: u64) -> usize {
    let per_process = hard_limit.saturating_sub(SPARE_FDS).max(1);
    usize::try_from(connections.div_ceil(per_process)).unwrap_or(usize::MAX)
}

/// Raises the soft descriptor limit to the hard one, and says so if that is still too few.
fn raise_fd_limit(connections: u64, role: Role) {
    let need = connections + SPARE_FDS;
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) if limit < need => eprintln!(
            "wsrelay bench: the descriptor limit is {limit}, below the {need} this {} needs; \
             the rest will fail to connect (share the load: --processes {}, or --processes auto)",
            match role {
                Role::Child => "process",
                Role::Whole => "run",
            },
            auto_processes(connections, limit),
        ),
        Ok(_) => {}
        Err(e) => eprintln!("wsrelay bench: cannot raise the descriptor limit: {e}"),
    }
}

fn progress_bar(length: Duration) -> ProgressBar {
    if length <= PROGRESS_AFTER {
        return ProgressBar::hidden();
    }
    // Hidden by indicatif itself when stderr is not a terminal.
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template("{spinner} {elapsed} {msg}") {
        bar.set_style(style);
    }
    bar
}

fn progress_line(shared: &Shared, phase: &str, traffic: Traffic, connections: u64) -> String {
    let sum = |f: fn(&worker::Progress) -> u64| shared.progress.iter().map(f).sum::<u64>();
    let opened = sum(|p| p.opened.load(Ordering::Relaxed));
    let errors = sum(|p| p.errors.load(Ordering::Relaxed));
    match traffic {
        Traffic::Echo | Traffic::Broadcast => {
            let received = sum(|p| p.received_total.load(Ordering::Relaxed));
            format!("{phase}: {opened}/{connections} open, {received} messages received, {errors} errors")
        }
        Traffic::Idle => format!("{phase}: {opened}/{connections} open, {errors} errors"),
        Traffic::Connect => {
            let completed = sum(|p| p.completed.load(Ordering::Relaxed));
            format!(
                "{phase}: {opened} handshakes, {completed} cycles in the window, {errors} errors"
            )
        }
    }
}

/// Sleeps until `deadline`, calling `tick` about every 200 ms (the progress line).
fn sleep_until(deadline: Instant, mut tick: impl FnMut()) {
    loop {
        let now = Instant::now();
        if now >= deadline {
            return;
        }
        std::thread::sleep((deadline - now).min(Duration::from_millis(200)));
        tick();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        mode: Mode,
    }

    fn setup(args: &str) -> Result<Setup, String> {
        let argv = std::iter::once("bench").chain(args.split_whitespace());
        let cli = Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
        plan(&cli.mode, cli.mode.common().child.unwrap_or(Part::WHOLE))
    }

    #[test]
    fn flags_are_checked_before_any_socket() {
        let bad: &[(&str, &str)] = &[
            ("echo ws://192.0.2.1/echo", "loopback"),
            ("echo --insecure ws://127.0.0.1/echo", "wss:// URLs only"),
            (
                "echo --ca /nonexistent/ca.pem wss://127.0.0.1/echo",
                "cannot read",
            ),
            ("echo ws://127.0.0.1:1/echo --size 7", "--size"),
            ("echo ws://127.0.0.1:1/echo --rate 0", "--rate"),
            ("echo ws://127.0.0.1:1/echo --threads 0", "--threads"),
            ("echo ws://127.0.0.1:1/echo --duration 0s", "--duration"),
            (
                "echo ws://127.0.0.1:1/echo --duration 1000years",
                "--duration",
            ),
            ("idle ws://127.0.0.1:1/echo --warmup 25h", "--warmup"),
            (
                "echo ws://127.0.0.1:1/echo --connections 0",
                "--connections",
            ),
            ("broadcast ws://127.0.0.1:1/r/b --members 1", "--members"),
            ("broadcast ws://127.0.0.1:1/r/b --senders 11", "--senders"),
            ("broadcast ws://127.0.0.1:1/r/b --size 11", "--size"),
            (
                "connect ws://127.0.0.1:1/echo --concurrency 0",
                "--concurrency",
            ),
            (
                "idle ws://127.0.0.1:1/echo --source-addrs 127.0.0.9-127.0.0.1",
                "range",
            ),
            ("idle ws://127.0.0.1:1/echo --processes 0", "--processes"),
            ("idle ws://127.0.0.1:1/echo --processes x", "--processes"),
            ("idle ws://127.0.0.1:1/echo --child 2/2", "--child"),
            (
                "idle ws://127.0.0.1:1/echo --connections 1 --child 1/2",
                "empty",
            ),
        ];
        for (args, needle) in bad {
            match setup(args) {
                Ok(_) => panic!("{args}: accepted"),
                Err(e) => assert!(e.contains(needle), "{args}: {e}"),
            }
        }
    }

    #[test]
    fn echo_connections_are_dealt_round_robin_with_their_source_addresses() {
        let s = setup("echo ws://127.0.0.1:9/echo --connections 5 --threads 2 --rate 100 --source-addrs 127.0.0.1-127.0.0.3")
            .unwrap();
        assert_eq!(
            (s.traffic, s.plans.len(), s.connections),
            (Traffic::Echo, 2, 5)
        );
        let sources: Vec<Vec<String>> = s
            .plans
            .iter()
            .map(|p| {
                p.conns
                    .iter()
                    .map(|c| c.source.unwrap().to_string())
                    .collect()
            })
            .collect();
        // Connection g goes to thread g % 2 and binds address g % 3.
        assert_eq!(sources[0], ["127.0.0.1", "127.0.0.3", "127.0.0.2"]);
        assert_eq!(sources[1], ["127.0.0.2", "127.0.0.1"]);
        // The rate is shared by connection count: 3/5 and 2/5 of 100.
        assert_eq!(s.plans[0].rate, Some(60.0));
        assert_eq!(s.plans[1].rate, Some(40.0));
        assert_eq!(s.plans[0].host, "127.0.0.1:9");
        assert!(s.plans[0].conns.iter().all(|c| c.resource == "/echo"));
    }

    #[test]
    fn threads_never_outnumber_the_work() {
        let s = setup("idle ws://127.0.0.1:9/ --connections 1 --threads 8").unwrap();
        assert_eq!(s.plans.len(), 1);
        let s = setup("broadcast ws://127.0.0.1:9/r/b --rooms 3 --threads 8").unwrap();
        assert_eq!(s.plans.len(), 3);
        let s = setup("connect ws://127.0.0.1:9/echo --concurrency 5 --threads 2 --connections 40")
            .unwrap();
        assert_eq!((s.plans.len(), s.connections, s.cycles), (2, 5, 40));
        assert_eq!(s.plans[0].conns.len() + s.plans[1].conns.len(), 5);
    }

    #[test]
    fn broadcast_rooms_stay_on_one_thread_with_witnesses_inside_the_room() {
        let layout = broadcast_layout(0..3, 4, 2, 2);
        // Rooms 0 and 2 on thread 0, room 1 on thread 1.
        let rooms: Vec<Vec<usize>> = layout
            .iter()
            .map(|t| t.iter().map(|m| m.room).collect())
            .collect();
        assert_eq!(rooms[0], [0, 0, 0, 0, 2, 2, 2, 2]);
        assert_eq!(rooms[1], [1, 1, 1, 1]);
        let witnesses: Vec<Option<usize>> = layout[0].iter().map(|m| m.witness).collect();
        assert_eq!(
            witnesses,
            [Some(1), Some(2), None, None, Some(5), Some(6), None, None]
        );
        for thread in &layout {
            for m in thread {
                if let Some(w) = m.witness {
                    assert_eq!(thread[w].room, m.room);
                }
            }
        }
        let globals: Vec<usize> = layout[1].iter().map(|m| m.global).collect();
        assert_eq!(globals, [4, 5, 6, 7]);
    }

    #[test]
    fn idle_connections_share_the_url_unless_each_gets_its_own_id() {
        let resources = |args: &str| -> Vec<Vec<String>> {
            setup(args)
                .unwrap()
                .plans
                .iter()
                .map(|p| p.conns.iter().map(|c| c.resource.clone()).collect())
                .collect()
        };
        assert_eq!(
            resources("idle ws://127.0.0.1:9/ws?id=a --connections 3 --threads 2"),
            [vec!["/ws?id=a", "/ws?id=a"], vec!["/ws?id=a"]]
        );
        // Connection g (dealt to thread g % 2) is bench-g.
        assert_eq!(
            resources("idle ws://127.0.0.1:9/ws --connections 3 --threads 2 --unique-ids"),
            [
                vec!["/ws?id=bench-0", "/ws?id=bench-2"],
                vec!["/ws?id=bench-1"]
            ]
        );
    }

    #[test]
    fn broadcast_rooms_are_named_from_the_base_url() {
        let s =
            setup("broadcast ws://127.0.0.1:9/r/bench --rooms 2 --members 2 --threads 1 --rate 10")
                .unwrap();
        let resources: Vec<&str> = s.plans[0]
            .conns
            .iter()
            .map(|c| c.resource.as_str())
            .collect();
        assert_eq!(
            resources,
            ["/r/bench-0", "/r/bench-0", "/r/bench-1", "/r/bench-1"]
        );
        assert_eq!(s.plans[0].rate, Some(10.0));
        assert!(s.plans[0].target.ip().is_loopback());
    }

    #[test]
    fn a_child_plans_its_consecutive_part_with_global_numbers() {
        // Connections 3 and 4 of 0..5 (part 1 of 2 takes the last two) bind addresses 3 % 3
        // and 4 % 3, as one process would have; the rate follows the share: 2/5 of 100.
        let s = setup("echo ws://127.0.0.1:9/echo --connections 5 --threads 1 --rate 100 --source-addrs 127.0.0.1-127.0.0.3 --child 1/2")
            .unwrap();
        assert_eq!((s.connections, s.units), (2, 2));
        let sources: Vec<String> = s.plans[0]
            .conns
            .iter()
            .map(|c| c.source.unwrap().to_string())
            .collect();
        assert_eq!(sources, ["127.0.0.1", "127.0.0.2"]);
        assert_eq!(s.plans[0].rate, Some(40.0));

        // Broadcast: whole rooms; part 1 of 2 of 3 rooms is room 2 alone, named as usual.
        let s =
            setup("broadcast ws://127.0.0.1:9/r/b --rooms 3 --members 2 --threads 4 --child 1/2")
                .unwrap();
        assert_eq!((s.connections, s.units, s.plans.len()), (2, 1, 1));
        assert!(s.plans[0].conns.iter().all(|c| c.resource == "/r/b-2"));

        // Connect: a share of the slots and of the cycle budget, sources from the part's first
        // slot on.
        let s = setup("connect ws://127.0.0.1:9/echo --concurrency 4 --connections 11 --threads 2 --child 1/2")
            .unwrap();
        assert_eq!((s.connections, s.cycles), (2, 5));
        let offsets: Vec<usize> = s.plans.iter().map(|p| p.source_offset).collect();
        assert_eq!(offsets, [2, 3]);
    }

    #[test]
    fn process_counts() {
        // (asked, connections, units, hard descriptor limit for auto, expected)
        let cases: &[(Processes, u64, usize, usize)] = &[
            (Processes::Count(1), 100, 100, 1),
            (Processes::Count(4), 100, 100, 4),
            (Processes::Count(4), 2, 2, 2),
            (Processes::Count(4), 30, 3, 3),
        ];
        for &(asked, connections, units, want) in cases {
            assert_eq!(processes_for(asked, connections, units), want, "{asked:?}");
        }
        // auto: 20,000 descriptors per process, 64 spare.
        let cases: &[(u64, usize)] = &[(1, 1), (19_936, 1), (19_937, 2), (50_000, 3)];
        for &(connections, want) in cases {
            assert_eq!(auto_processes(connections, 20_000), want, "{connections}");
        }
        assert_eq!(
            auto_processes(10, 0),
            10,
            "a limit below the spare: one each"
        );
        assert_eq!(
            processes_for(Processes::Auto, 10, 10),
            1,
            "10 connections fit any limit"
        );
    }
}
