//! One run, start to end, in this process: the coordinator of the worker threads.
//!
//! Owns: `execute` (plan, sample the server, run, report), starting the worker threads and
//! giving them the go once every connection is open, sampling the server (`--server-pid`) at
//! the edges of the measured window, stopping, collecting the threads' tallies, and turning
//! them into the `Report`; also the progress line and the descriptor limit.
//! Does not: check flags (`plan.rs`), drive connections (`worker.rs`, one mio loop per thread),
//! or run child processes: with `--processes N`, `multi.rs` plays this role over N processes,
//! each of which runs this coordinator over its own threads.
//!
//! SPEC §11.

use super::flags::{CommonArgs, Mode};
use super::multi::{self, Part};
use super::plan::{self, auto_processes, processes_for, Setup, SPARE_FDS};
use super::report::{ChildExtra, Report, ServerFigures};
use super::worker::{self, Shared, Traffic, Worker};
use super::{prime, procfs, stats};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Runs longer than this (warm-up plus window) show a progress line on stderr.
const PROGRESS_AFTER: Duration = Duration::from_secs(3);

/// What this process is in a run: the whole bench (alone, or coordinating `--processes`), or
/// one child of a `--processes` run (`--child`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Role {
    Whole,
    Child,
}

/// What the bench's own side of a run counted, from its threads or its child processes.
pub(super) struct Run {
    pub(super) tally: stats::Tally,
    pub(super) threads: usize,
    pub(super) first_error: Option<String>,
    /// The server at the start and at the end of the measured window (`--server-pid`).
    pub(super) at_start: Option<procfs::Sample>,
    pub(super) at_end: Option<procfs::Sample>,
}

/// The server before the first connection of the run (`--server-pid`).
struct Baseline {
    before: procfs::Sample,
    /// Idle mode: the server before the priming connections, and how many there were.
    cold: Option<procfs::Sample>,
    primed: u64,
}

pub(super) fn execute(mode: &Mode) -> Result<Report, String> {
    let common = mode.common();
    let part = common.child.unwrap_or(Part::WHOLE);
    let setup = plan::plan(mode, part)?;
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
    // Idle mode measures memory per held connection: the server is primed first (`prime.rs`),
    // and sampled before and after the priming.
    let prime_count = match mode {
        Mode::Idle(a) => a.prime,
        _ => 0,
    };
    let baseline = match pid {
        Some(pid) => {
            let sample = || {
                procfs::sample(pid)
                    .map_err(|e| format!("cannot read /proc/{pid} (--server-pid): {e}"))
            };
            let (cold, before) = match (prime_count, setup.plans.first()) {
                (1.., Some(first)) => {
                    let cold = sample()?;
                    prime::prime(first, prime_count)?;
                    (Some(cold), prime::settled(sample)?)
                }
                _ => (None, sample()?),
            };
            Some(Baseline {
                before,
                cold,
                primed: if cold.is_some() {
                    prime_count as u64
                } else {
                    0
                },
            })
        }
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
    let mut report = build_report(mode, traffic, connections, processes, run, pid, baseline);
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
    baseline: Option<Baseline>,
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
    let server = match (pid, baseline, at_start, at_end) {
        (Some(pid), Some(baseline), Some(start), Some(end)) => {
            let before = baseline.before;
            let cpu_secs = end.cpu_secs_since(&start);
            let user_secs = end.user_secs_since(&start);
            let messages = match traffic {
                Traffic::Echo | Traffic::Broadcast => Some(tally.received),
                Traffic::Idle | Traffic::Connect => None,
            };
            Some(ServerFigures {
                pid,
                cpu_secs,
                user_secs,
                sys_secs: (cpu_secs - user_secs).max(0.0),
                rss_before_kib: before.rss_kib,
                rss_after_kib: start.rss_kib,
                rss_per_connection_bytes: match traffic {
                    Traffic::Connect => None,
                    _ => stats::rss_per_connection(before.rss_kib, start.rss_kib, tally.opened),
                },
                anon_before_kib: before.anon_kib,
                anon_after_kib: start.anon_kib,
                anon_per_connection_bytes: match traffic {
                    Traffic::Connect => None,
                    _ => stats::rss_per_connection(before.anon_kib, start.anon_kib, tally.opened),
                },
                primed: baseline.primed,
                rss_cold_kib: baseline.cold.map(|c| c.rss_kib),
                rss_cold_per_connection_bytes: baseline.cold.and_then(|c| {
                    stats::rss_per_connection(c.rss_kib, start.rss_kib, tally.opened)
                }),
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

pub(super) fn progress_bar(length: Duration) -> ProgressBar {
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
pub(super) fn sleep_until(deadline: Instant, mut tick: impl FnMut()) {
    loop {
        let now = Instant::now();
        if now >= deadline {
            return;
        }
        std::thread::sleep((deadline - now).min(Duration::from_millis(200)));
        tick();
    }
}
