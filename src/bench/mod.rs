//! `wsrelay bench`: a multi-threaded load generator on the project's own codec, in the client
//! role.
//!
//! Owns: the entry point (`run`: one run, its report printed, its exit status).
//! Does not: anything else itself; each part of a run has its own module, below.
//!
//! SPEC §11; the load policy of this machine (loopback only, bounded runs).
//!
//! Layout, in the order a run meets them:
//! * `flags.rs`       the flags (`BenchArgs`, one subcommand per mode) and `--help`;
//! * `plan.rs`        flags checked and combined into per-thread plans, before any socket;
//! * `coordinator.rs` one process's run: threads, the go, the server sampled at the window's
//!   edges, the tallies collected and turned into the report;
//! * `multi.rs`       `--processes N`: child processes of this executable, each with its part of
//!   the plan, their windows lined up, their reports merged;
//! * `worker.rs`      one thread: a mio `Poll` over its connections, stages, windows, rate limit;
//! * `client.rs`      one connection: non-blocking connect, handshake, masked frames, close;
//! * `stats.rs`       payload stamps, per-thread tallies, latency summary, report math;
//! * `report.rs`      the `Report`, its JSON field documentation and its text form;
//! * `procfs.rs`      the server's CPU time and RSS from /proc;
//! * `prime.rs`       idle mode: a few connections through the server before its baseline;
//! * `target.rs`      loopback check, `--source-addrs`, room names.
//!
//! A run: every thread opens its connections; when all threads are ready the coordinator
//! gives the go; traffic runs through the warm-up and the measured window; at the end of the
//! window the coordinator samples the server and says stop; threads drain what is in flight,
//! close every connection with a close handshake, and hand back their tallies. Every stage has
//! a deadline, so a run ends by itself whatever the server does. With `--processes N` the
//! same run happens in N child processes, each on its part of the plan, and this process only
//! coordinates them (`multi.rs`).

pub mod client;
pub mod coordinator;
pub mod flags;
pub mod multi;
pub mod plan;
pub mod prime;
pub mod procfs;
pub mod report;
pub mod stats;
pub mod target;
pub mod worker;

pub use flags::BenchArgs;
use std::process::ExitCode;

/// Runs one bench and prints its report. Exit status: 0 if at least one connection opened,
/// 1 if none did (the report says why), 2 if the run could not start (bad flags, refused
/// target, unreadable server pid).
pub fn run(args: BenchArgs) -> ExitCode {
    // A child always speaks JSON: its coordinator reads the report.
    let json = args.mode.common().json || args.mode.common().child.is_some();
    match coordinator::execute(&args.mode) {
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
