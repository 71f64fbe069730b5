//! The flags of `wsrelay bench`: one subcommand per mode, the flags every mode takes, and the
//! `--help` text that documents every JSON field of the report.
//!
//! Owns: `BenchArgs`, `Mode` and each mode's arguments (clap derive), and the parsing of
//! `--processes` and `--source-addrs` into their types.
//! Does not: check how the flags combine (`plan.rs` does that, before any socket), or run
//! anything (`coordinator.rs`).
//!
//! SPEC §11 (the flags of `wsrelay bench`).

use super::multi::{self, Part};
use super::report::JSON_FIELDS;
use super::{target, worker};
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

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

    /// Offer permessage-deflate (RFC 7692, no context takeover either way) and send chat-like
    /// JSON; messages are compressed and inflated when the server accepts.
    #[arg(long)]
    pub compression: bool,

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
    /// With --server-pid: connections opened, upgraded and closed one at a time before the
    /// server's memory is sampled, so the code pages and first pool blocks that the first
    /// connections bring in are not counted per held connection (0: measure from cold; the
    /// report has both figures).
    #[arg(long, default_value_t = super::prime::DEFAULT_PRIME)]
    pub prime: usize,
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
    pub(super) fn common(&self) -> &CommonArgs {
        match self {
            Mode::Echo(a) => &a.common,
            Mode::Broadcast(a) => &a.common,
            Mode::Idle(a) => &a.common,
            Mode::Connect(a) => &a.common,
        }
    }

    pub(super) fn name(&self) -> &'static str {
        match self {
            Mode::Echo(_) => "echo",
            Mode::Broadcast(_) => "broadcast",
            Mode::Idle(_) => "idle",
            Mode::Connect(_) => "connect",
        }
    }
}
