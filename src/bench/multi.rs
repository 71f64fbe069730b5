//! `--processes N`: one bench run shared among N processes of this executable, for more
//! connections than one process has descriptors.
//!
//! Owns: `Part` (which share of the load a process takes), the coordinator that starts the
//! child processes, lines their windows up and merges their reports, and the child's side of
//! that conversation.
//! Does not: plan or run any connection (`plan.rs`, `coordinator.rs` and `worker.rs` do, in
//! each child, as in a one-process run), or compute rates (`build_report` in `coordinator.rs`).
//!
//! SPEC §11 ("several processes when one process's descriptors are not enough").
//!
//! How it works, kept simple on purpose:
//! 1. The coordinator starts N copies of its own executable with its own arguments plus a
//!    hidden `--child I/N`. Child I takes the I-th consecutive share of the connections
//!    (broadcast: of the rooms, so a room is never split; connect: of --concurrency and of the
//!    cycle budget) and the same share of --rate. Connection numbers stay global, so the
//!    `--source-addrs` round-robin and the room names continue where the previous child's
//!    stopped, and children do not all start on the same source address.
//! 2. Each child opens its connections, prints `ready` on stdout and waits for a line `go` on
//!    stdin. The coordinator waits (bounded) for every `ready`, then writes `go` to all at
//!    once: the warm-ups and windows of all children start within a pipe write of each other.
//! 3. The coordinator samples the server itself (before the children start, and at the start
//!    and end of the common window), as a one-process run does.
//! 4. Each child ends by printing its JSON report with a hidden `child` field: its received
//!    payload bytes and its latency histogram (hdrhistogram V2, base64). The coordinator adds
//!    the counts, the errors kind by kind, and the histograms, then takes percentiles and rates
//!    over the common window.
//!
//! Every wait is bounded: a child that dies, never says `ready` or never reports is killed if
//! still running and counted in `errors.process`; its connections are missing from the counts.
//! A child whose stdin closes before `go` (its coordinator died) closes its connections and
//! reports without traffic.

use super::coordinator::{self, Run};
use super::flags::CommonArgs;
use super::report::ChildExtra;
use super::stats::{self, Errors, Tally};
use super::worker;
use serde::Deserialize;
use std::ffi::OsString;
use std::fmt;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::{Duration, Instant};

/// Time for a child to start and get ready beyond its connect deadlines, and to report beyond
/// the drain and close deadlines.
const SLACK: Duration = Duration::from_secs(10);

/// The share of a run one process takes: part `index` of `of` (`--child INDEX/OF`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Part {
    pub index: usize,
    pub of: usize,
}

impl Part {
    /// The whole run, in one process.
    pub const WHOLE: Part = Part { index: 0, of: 1 };

    /// The first unit and the number of units of this part, when `units` are dealt in
    /// consecutive runs as evenly as possible (the first `units % of` parts get one more).
    pub fn share(&self, units: usize) -> (usize, usize) {
        let (first, count) = self.share_u64(units as u64);
        // Both are at most `units`, a usize.
        (first as usize, count as usize)
    }

    /// `share` for counts that may exceed a usize (the connect mode's cycle budget).
    pub fn share_u64(&self, units: u64) -> (u64, u64) {
        let (i, of) = (self.index as u64, self.of.max(1) as u64);
        let (base, extra) = (units / of, units % of);
        let first = i.saturating_mul(base).saturating_add(i.min(extra));
        let count = if i < of {
            base + u64::from(i < extra)
        } else {
            0
        };
        (first.min(units), count)
    }
}

impl fmt::Display for Part {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.of)
    }
}

/// Parses `--child INDEX/OF`.
pub fn parse_part(text: &str) -> Result<Part, String> {
    let bad = || format!("expected INDEX/COUNT with INDEX < COUNT, got {text:?}");
    let (index, of) = text.split_once('/').ok_or_else(bad)?;
    let part = Part {
        index: index.parse().map_err(|_| bad())?,
        of: of.parse().map_err(|_| bad())?,
    };
    if part.index < part.of {
        Ok(part)
    } else {
        Err(bad())
    }
}

/// The child's side: says `ready` and waits for the coordinator's `go`. False when the
/// coordinator said something else or is gone (stdin closed): then the child stops at once.
pub fn ready_then_wait_for_go() -> bool {
    let mut out = std::io::stdout().lock();
    if writeln!(out, "ready").and_then(|()| out.flush()).is_err() {
        return false;
    }
    drop(out);
    let mut line = String::new();
    match std::io::stdin().lock().read_line(&mut line) {
        Ok(_) => line.trim() == "go",
        Err(_) => false,
    }
}

/// A line a child printed, or the end of its output.
enum Line {
    Text(String),
    End,
}

/// One child process as the coordinator tracks it.
struct Kid {
    part: Part,
    process: Option<Child>,
    stdin: Option<ChildStdin>,
    ready: bool,
    report: Option<String>,
    ended: bool,
    /// Why this child counts as lost, if it does.
    failure: Option<String>,
}

impl Kid {
    fn waiting_for_ready(&self) -> bool {
        self.failure.is_none() && !self.ready
    }

    fn waiting_for_report(&self) -> bool {
        self.failure.is_none() && !self.ended
    }

    fn fail(&mut self, why: String) {
        if self.failure.is_none() {
            self.failure = Some(why);
        }
    }

    fn on_line(&mut self, line: Line) {
        match line {
            Line::Text(t) if !self.ready && t.trim() == "ready" => self.ready = true,
            Line::Text(t) if self.ready && self.report.is_none() => self.report = Some(t),
            Line::Text(t) => self.fail(format!(
                "bench process {} printed an unexpected line: {t:?}",
                self.part
            )),
            Line::End => {
                self.ended = true;
                if self.report.is_none() {
                    let when = if self.ready {
                        "without a report"
                    } else {
                        "before it was ready"
                    };
                    self.fail(format!("bench process {} exited {when}", self.part));
                }
            }
        }
    }

    /// Kills the child if it is still running (by its own handle), then reaps it.
    fn finish(&mut self) {
        self.stdin = None;
        if let Some(mut process) = self.process.take() {
            if !self.ended {
                let _ = process.kill();
            }
            let _ = process.wait();
        }
    }
}

/// Runs the load in `processes` children and merges what they counted. `connections` and
/// `units` are the whole run's (see `Setup`).
pub(super) fn coordinate(
    common: &CommonArgs,
    processes: usize,
    units: usize,
    connections: u64,
    pid: Option<u32>,
) -> Result<Run, String> {
    let exe =
        std::env::current_exe().map_err(|e| format!("cannot find the bench executable: {e}"))?;
    // The same mode and flags: each child plans the same run and takes its part of it.
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let (tx, rx) = mpsc::channel();
    let mut kids: Vec<Kid> = (0..processes)
        .map(|index| {
            spawn(
                &exe,
                &args,
                Part {
                    index,
                    of: processes,
                },
                &tx,
            )
        })
        .collect();
    drop(tx);

    let bar = coordinator::progress_bar(common.warmup + common.duration);
    let show = |phase: &str| {
        bar.set_message(format!("{processes} processes: {phase}"));
        bar.tick();
    };

    // Ready: bounded by the connect deadlines of the largest part.
    show("opening");
    let budget = ready_budget(common.connect_timeout, processes, units, connections);
    let ready_by = Instant::now() + budget;
    while kids.iter().any(Kid::waiting_for_ready) {
        let Some((i, line)) = recv_until(&rx, ready_by) else {
            break;
        };
        if let Some(kid) = kids.get_mut(i) {
            kid.on_line(line);
        }
    }
    for kid in kids.iter_mut().filter(|k| k.waiting_for_ready()) {
        kid.fail(format!(
            "bench process {} was not ready within {}",
            kid.part,
            humantime::format_duration(budget)
        ));
    }
    for kid in kids.iter_mut().filter(|k| k.failure.is_some()) {
        kid.finish();
    }

    // Go: every ready child at once; then the window, sampled here as in one process.
    let go = Instant::now();
    for kid in kids.iter_mut().filter(|k| k.failure.is_none()) {
        let sent = match kid.stdin.as_mut() {
            Some(stdin) => writeln!(stdin, "go").and_then(|()| stdin.flush()),
            None => Err(std::io::ErrorKind::BrokenPipe.into()),
        };
        if let Err(e) = sent {
            kid.fail(format!("cannot start bench process {}: {e}", kid.part));
            kid.finish();
        }
    }
    let window_start = go + common.warmup;
    let window_end = window_start + common.duration;
    coordinator::sleep_until(window_start, || show("warm-up"));
    let at_start = pid.and_then(|pid| super::procfs::sample(pid).ok());
    coordinator::sleep_until(window_end, || show("measuring"));
    let at_end = pid.and_then(|pid| super::procfs::sample(pid).ok());

    // Reports: bounded by the drain and close deadlines every child keeps.
    show("closing");
    let report_by = window_end + worker::DRAIN_TIMEOUT + worker::CLOSE_TIMEOUT + SLACK;
    while kids.iter().any(Kid::waiting_for_report) {
        let Some((i, line)) = recv_until(&rx, report_by) else {
            break;
        };
        if let Some(kid) = kids.get_mut(i) {
            kid.on_line(line);
        }
    }
    let mut outcomes = Vec::with_capacity(kids.len());
    for kid in &mut kids {
        kid.finish();
        outcomes.push(match (kid.failure.take(), kid.report.take()) {
            (Some(why), _) => Err(why),
            (None, Some(report)) => Ok(report),
            (None, None) => Err(format!("bench process {} did not report in time", kid.part)),
        });
    }
    bar.finish_and_clear();
    let merged = merge(&outcomes);
    Ok(Run {
        tally: merged.tally,
        threads: merged.threads,
        first_error: merged.first_error,
        at_start,
        at_end,
    })
}

/// Starts child `part`, with a thread that forwards its stdout lines to `tx`.
fn spawn(exe: &std::path::Path, args: &[OsString], part: Part, tx: &Sender<(usize, Line)>) -> Kid {
    let started = Command::new(exe)
        .args(args)
        .arg("--child")
        .arg(part.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn();
    let mut kid = Kid {
        part,
        process: None,
        stdin: None,
        ready: false,
        report: None,
        ended: false,
        failure: None,
    };
    match started {
        Ok(mut process) => {
            kid.stdin = process.stdin.take();
            match process.stdout.take() {
                Some(stdout) => {
                    let tx = tx.clone();
                    let forward = move || forward_lines(part.index, stdout, &tx);
                    if let Err(e) = std::thread::Builder::new().spawn(forward) {
                        kid.fail(format!("cannot read bench process {part}: {e}"));
                    }
                }
                None => kid.fail(format!("bench process {part} has no stdout")),
            }
            kid.process = Some(process);
            if kid.failure.is_some() {
                kid.finish();
            }
        }
        Err(e) => kid.fail(format!("cannot start bench process {part}: {e}")),
    }
    kid
}

fn forward_lines(index: usize, stdout: ChildStdout, tx: &Sender<(usize, Line)>) {
    for line in BufReader::new(stdout).lines() {
        match line {
            Ok(text) => {
                if tx.send((index, Line::Text(text))).is_err() {
                    return;
                }
            }
            Err(_) => break,
        }
    }
    let _ = tx.send((index, Line::End));
}

fn recv_until<T>(rx: &Receiver<T>, deadline: Instant) -> Option<T> {
    let left = deadline.checked_duration_since(Instant::now())?;
    rx.recv_timeout(left).ok()
}

/// How long the largest part may take to open: each thread opens `worker::OPEN_BATCH`
/// connections at a time, each within `connect_timeout`; counted as if one thread opened them
/// all, plus time to start.
fn ready_budget(
    connect_timeout: Duration,
    processes: usize,
    units: usize,
    connections: u64,
) -> Duration {
    let largest_units = Part {
        index: 0,
        of: processes,
    }
    .share(units)
    .1 as u64;
    let per_unit = connections / units.max(1) as u64;
    let batches = (largest_units * per_unit).div_ceil(worker::OPEN_BATCH as u64) + 1;
    connect_timeout.saturating_mul(u32::try_from(batches).unwrap_or(u32::MAX)) + SLACK
}

/// The fields of a child's report the merge needs (the rest are recomputed over the whole).
#[derive(Deserialize)]
struct ChildReport {
    threads: usize,
    opened: u64,
    sent_total: u64,
    received_total: u64,
    sent: u64,
    received: u64,
    completed: u64,
    clean_closes: u64,
    errors: Errors,
    first_error: Option<String>,
    child: ChildExtra,
}

/// The children's reports added up.
#[derive(Debug)]
struct Merged {
    tally: Tally,
    threads: usize,
    first_error: Option<String>,
}

/// Adds up the children's reports (`Ok`: a report line) and counts each lost child (`Err`: why)
/// in `errors.process`; a report that does not parse counts as a lost child too.
fn merge(outcomes: &[Result<String, String>]) -> Merged {
    let mut merged = Merged {
        tally: Tally::new(),
        threads: 0,
        first_error: None,
    };
    for outcome in outcomes {
        let absorbed = outcome.clone().and_then(|line| absorb(&mut merged, &line));
        if let Err(why) = absorbed {
            merged.tally.errors.count_process();
            merged.first_error = merged.first_error.or(Some(why));
        }
    }
    merged
}

fn absorb(merged: &mut Merged, line: &str) -> Result<(), String> {
    let r: ChildReport =
        serde_json::from_str(line).map_err(|e| format!("a bench process's report: {e}"))?;
    let part = Tally {
        opened: r.opened,
        sent_total: r.sent_total,
        received_total: r.received_total,
        sent: r.sent,
        received: r.received,
        received_bytes: r.child.received_bytes,
        completed: r.completed,
        clean_closes: r.clean_closes,
        errors: r.errors,
        latency: stats::decode_histogram(&r.child.latency_histogram)?,
    };
    merged.tally.merge(&part);
    merged.threads += r.threads;
    merged.first_error = merged.first_error.take().or(r.first_error);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::report::Report;

    /// (units, parts, the (first, count) of each part)
    type ShareCase = (usize, usize, &'static [(usize, usize)]);

    #[test]
    fn parts_are_consecutive_and_cover_every_unit() {
        let cases: &[ShareCase] = &[
            (10, 1, &[(0, 10)]),
            (10, 2, &[(0, 5), (5, 5)]),
            (10, 3, &[(0, 4), (4, 3), (7, 3)]),
            (2, 3, &[(0, 1), (1, 1), (2, 0)]),
            (0, 2, &[(0, 0), (0, 0)]),
        ];
        for &(units, of, want) in cases {
            let got: Vec<(usize, usize)> = (0..of)
                .map(|index| Part { index, of }.share(units))
                .collect();
            assert_eq!(got, want, "{units} units in {of} parts");
        }
        // Past the last part (never planned) there is nothing, and huge counts do not overflow.
        assert_eq!(Part { index: 3, of: 3 }.share(10).1, 0);
        let (first, count) = Part { index: 1, of: 2 }.share_u64(u64::MAX);
        assert_eq!((first, count), (u64::MAX / 2 + 1, u64::MAX / 2));
    }

    #[test]
    fn child_flag() {
        let cases: &[(&str, Option<Part>)] = &[
            ("0/2", Some(Part { index: 0, of: 2 })),
            ("1/2", Some(Part { index: 1, of: 2 })),
            ("2/2", None),
            ("0/0", None),
            ("1", None),
            ("a/2", None),
            ("-1/2", None),
        ];
        for &(text, want) in cases {
            assert_eq!(parse_part(text).ok(), want, "{text}");
        }
        assert_eq!(Part { index: 1, of: 4 }.to_string(), "1/4");
    }

    /// A child's report line: `n` messages received in the window, each taking `latency_us`.
    fn child_line(n: u64, latency_us: u64, errors: Errors, first_error: Option<&str>) -> String {
        let mut latency = Tally::new();
        for _ in 0..n {
            latency.record_latency(latency_us * 1000);
        }
        let report = Report {
            mode: "echo",
            url: "ws://127.0.0.1:1/echo".into(),
            processes: 1,
            threads: 2,
            connections: 5,
            opened: 5,
            warmup_secs: 1.0,
            duration_secs: 1.0,
            sent_total: n + 10,
            received_total: n + 10,
            sent: n,
            received: n,
            completed: 0,
            rate_per_sec: n as f64,
            bytes_per_sec: (n * 64) as f64,
            clean_closes: 5,
            errors,
            first_error: first_error.map(str::to_string),
            latency_us: stats::summarize(&latency.latency),
            server: None,
            child: Some(ChildExtra {
                received_bytes: n * 64,
                latency_histogram: stats::encode_histogram(&latency.latency).unwrap(),
            }),
        };
        serde_json::to_string(&report).unwrap()
    }

    #[test]
    fn reports_merge_counts_errors_and_histograms() {
        let timeouts = Errors {
            timeout: 2,
            total: 2,
            ..Errors::default()
        };
        let outcomes = [
            Ok(child_line(100, 10, Errors::default(), None)),
            Ok(child_line(300, 1000, timeouts, Some("timed out"))),
        ];
        let m = merge(&outcomes);
        let t = &m.tally;
        assert_eq!((m.threads, t.opened, t.clean_closes), (4, 10, 10));
        assert_eq!((t.sent, t.received, t.sent_total), (400, 400, 420));
        assert_eq!((t.received_total, t.received_bytes), (420, 400 * 64));
        assert_eq!((t.errors.timeout, t.errors.total), (2, 2));
        assert_eq!(m.first_error.as_deref(), Some("timed out"));
        // The merged histogram holds both children's samples: a quarter at 10 µs, the rest at
        // 1 ms, so the median is 1 ms and the minimum 10 µs (within hdrhistogram's 0.1%).
        let l = stats::summarize(&t.latency).unwrap();
        let close = |got: f64, want: f64| (got - want).abs() <= want * 0.001;
        assert_eq!(l.count, 400);
        assert!(
            close(l.min, 10.0) && close(l.p50, 1000.0) && close(l.max, 1000.0),
            "{l:?}"
        );
        assert!(
            close(l.mean, (100.0 * 10.0 + 300.0 * 1000.0) / 400.0),
            "{l:?}"
        );
    }

    #[test]
    fn lost_children_count_as_process_errors() {
        let outcomes = [
            Ok(child_line(10, 10, Errors::default(), None)),
            Err("bench process 1/3 exited before it was ready".to_string()),
            Ok("{not json".to_string()),
        ];
        let m = merge(&outcomes);
        assert_eq!((m.tally.errors.process, m.tally.errors.total), (2, 2));
        assert_eq!((m.tally.received, m.threads), (10, 2));
        assert_eq!(
            m.first_error.as_deref(),
            Some("bench process 1/3 exited before it was ready")
        );
    }

    /// What the coordinator knows of a child: (ready, has a report, why it is lost).
    type KidState = (bool, bool, Option<String>);

    /// Feeds `lines` to a fresh child and returns its state.
    fn check(lines: Vec<Line>) -> KidState {
        let mut kid = Kid {
            part: Part { index: 1, of: 2 },
            process: None,
            stdin: None,
            ready: false,
            report: None,
            ended: false,
            failure: None,
        };
        for line in lines {
            kid.on_line(line);
        }
        (kid.ready, kid.report.is_some(), kid.failure)
    }

    #[test]
    fn a_child_is_ready_then_reports_or_counts_as_lost() {
        let text = |t: &str| Line::Text(t.to_string());
        let lost = |why: &str| Some(format!("bench process 1/2 {why}"));
        let cases: Vec<(&str, Vec<Line>, KidState)> = vec![
            ("nothing yet", vec![], (false, false, None)),
            ("ready", vec![text("ready")], (true, false, None)),
            (
                "ready, report, exit",
                vec![text("ready"), text("{}"), Line::End],
                (true, true, None),
            ),
            (
                "died before ready",
                vec![Line::End],
                (false, false, lost("exited before it was ready")),
            ),
            (
                "died after go",
                vec![text("ready"), Line::End],
                (true, false, lost("exited without a report")),
            ),
            (
                "chatter before ready",
                vec![text("hello")],
                (false, false, lost("printed an unexpected line: \"hello\"")),
            ),
        ];
        for (name, lines, want) in cases {
            assert_eq!(check(lines), want, "{name}");
        }
    }

    #[test]
    fn ready_budget_grows_with_the_largest_part() {
        let s = Duration::from_secs;
        // 1000 connections in 2 parts: 500 each, 4 batches of 128 (+1), 1 s each, plus slack.
        assert_eq!(ready_budget(s(1), 2, 1000, 1000), s(5) + SLACK);
        // Broadcast: 3 rooms of 100 in 2 parts: the largest holds 2 rooms, 200 connections.
        assert_eq!(ready_budget(s(1), 2, 3, 300), s(3) + SLACK);
    }
}
