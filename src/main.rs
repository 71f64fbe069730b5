//! The command line: flags in, a running server out (SPEC §0, §1 "cli").
//!
//! Owns: flag parsing (clap), logging set-up, choosing the poller, raising the descriptor limit.
//! Does not: anything a library user would need; all behaviour lives in the `wsrelay` crate.

use clap::{Parser, Subcommand, ValueEnum};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;
use wsrelay::app::raw_bus;
use wsrelay::app::workers::WorkerApp;
use wsrelay::app::{self, App, AppConfig, Clock, RateLimit, SystemClock};
use wsrelay::engine::{self, FileConfig, FileEngine, FsyncPolicy, Now, StoreFault};
use wsrelay::poller::waker::{self, WakeReceiver};
#[cfg(target_os = "linux")]
use wsrelay::poller::UringPoller;
use wsrelay::poller::{MioPoller, PollPoller, Poller, SelectPoller};
use wsrelay::protocol::deflate::{CompressionConfig, CompressionMode};
use wsrelay::server::{workers, Config, Exit, Reactor, SlowConsumer};
use wsrelay::tls::ServerTls;

#[derive(Parser)]
#[command(
    name = "wsrelay",
    version,
    about = "A WebSocket relay server on a hand-rolled event loop"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process: the size of the largest variant costs nothing worth boxing for.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Serve(ServeArgs),
    /// Generate load against a running server and measure it (SPEC §11).
    Bench(wsrelay::bench::BenchArgs),
    /// Connect to a relay and send lines from stdin (interactive, or a script when piped).
    Client(wsrelay::client::ClientArgs),
    /// Call a server's API (publish, disconnect, presence, rooms, ids): prints the JSON answer.
    Api(wsrelay::api_client::ApiArgs),
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum PollerKind {
    /// mio: epoll on Linux, kqueue on macOS/BSD.
    Epoll,
    /// poll(2): one pollfd array, scanned by the kernel on every wait.
    Poll,
    /// select(2): fd_set bitmaps; descriptors at or above FD_SETSIZE (1024) are refused.
    Select,
    /// io_uring (Linux 6.0+): completion-based; accepts, receives and sends done by the kernel.
    #[cfg(target_os = "linux")]
    Uring,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Address to listen on (use port 0 for any free port; the chosen one is printed).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,

    /// I/O backend: readiness (epoll, poll, select) or completion (uring, Linux).
    #[arg(long, value_enum, default_value = "epoll")]
    poller: PollerKind,

    /// Reactor threads (SPEC §14): N, or `auto` for the CPUs this process may use. Each has
    /// its own poller, listener (SO_REUSEPORT, Linux only), connections and timers; raw rooms
    /// (/r/) reach members on every worker through a bus, and /ws through the engine bus
    /// (each id and room has a home worker); the server API answers for every worker. Above 1,
    /// --data-dir keeps each worker's home streams in DIR/worker-<i>: the directory must then
    /// always be started with the same N (another N is refused, naming the one it was written
    /// with).
    #[arg(long, default_value = "1", value_parser = parse_workers)]
    workers: usize,

    /// Largest message or frame accepted (bytes; K/M/G suffixes are binary); larger closes 1009.
    #[arg(long, default_value = "1M", value_parser = parse_size)]
    max_message: usize,

    /// Bytes queued for one connection before the slow-consumer policy applies.
    #[arg(long, default_value = "4M", value_parser = parse_size)]
    max_outbound: usize,

    /// What happens to a connection over --max-outbound: `close` it with 1008, or `drop` the
    /// new message for that connection only.
    #[arg(long, value_enum, default_value = "close")]
    slow_consumer: SlowConsumerPolicy,

    /// Open connections beyond which new ones get HTTP 503.
    #[arg(long, default_value_t = 100_000)]
    max_connections: usize,

    /// Time a client has to complete its upgrade request (e.g. 10s, 500ms).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    handshake_timeout: Duration,

    /// Time the peer has to answer our Close (or hang up after an HTTP response).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    close_timeout: Duration,

    /// Silence after which the server sends a Ping.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    heartbeat_interval: Duration,

    /// Time after a heartbeat Ping within which some frame must arrive, else the connection is dropped.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    heartbeat_timeout: Duration,

    /// Granularity of the timer wheel (at least 1ms).
    #[arg(long, default_value = "100ms", value_parser = parse_tick)]
    timer_tick: Duration,

    /// On SIGINT/SIGTERM, how long to wait for close handshakes before closing what is left.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    shutdown_timeout: Duration,

    /// PEM certificate chain (the server's certificate first): the listener then speaks only
    /// TLS (wss://, https://). Reloaded with the key on SIGHUP.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,

    /// PEM private key of the --tls-cert certificate.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,

    #[command(flatten)]
    relay: RelayArgs,

    #[command(flatten)]
    compression: CompressionArgs,

    #[command(flatten)]
    storage: StorageArgs,

    #[command(flatten)]
    api: ApiArgs,
}

/// The server API's flags (SPEC §16, docs/api.md).
#[derive(clap::Args)]
#[command(next_help_heading = "Server API (/api/...)")]
struct ApiArgs {
    /// Turns the server API on: requests must carry `Authorization: Bearer <KEY>`. Visible in
    /// `ps`: prefer --api-key-file.
    #[arg(long, value_name = "KEY", conflicts_with = "api_key_file")]
    api_key: Option<String>,

    /// File holding the API key (a trailing newline is ignored).
    #[arg(long, value_name = "FILE")]
    api_key_file: Option<std::path::PathBuf>,

    /// Bytes an API request body may have; a larger one is refused with 413 before it is read.
    #[arg(long, default_value = "64K", value_parser = parse_size)]
    api_max_body: usize,

    /// How long a kept-alive API connection may stay idle between requests.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    api_idle_timeout: Duration,
}

impl ApiArgs {
    /// The key, from the flag or the file; `None`: the API is off.
    fn key(&self) -> Result<Option<Vec<u8>>, String> {
        let key = match (&self.api_key, &self.api_key_file) {
            (Some(key), _) => Some(key.clone().into_bytes()),
            (None, Some(path)) => Some(read_secret(path)?),
            (None, None) => None,
        };
        if key.as_ref().is_some_and(Vec::is_empty) {
            return Err("the API key is empty".into());
        }
        Ok(key)
    }
}

/// A secret from a file, without its trailing newline.
fn read_secret(path: &std::path::Path) -> Result<Vec<u8>, String> {
    let mut bytes =
        std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        bytes.pop();
    }
    Ok(bytes)
}

/// permessage-deflate (SPEC §17); they become a `CompressionConfig`.
#[derive(clap::Args)]
#[command(next_help_heading = "Compression (permessage-deflate, RFC 7692)")]
struct CompressionArgs {
    /// `shared`: one compressor per reactor, reset after each message, so an idle connection
    /// holds no compressor; `dedicated`: one per connection, keeping context between messages
    /// (better ratio, more memory); `off`: never negotiate it.
    #[arg(long, value_enum, default_value = "shared")]
    compression: CompressionKind,

    /// Largest LZ77 window, in bits (8-15), the server compresses with; in `dedicated` mode
    /// also the largest a client may use, bounding the zlib memory per connection.
    #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u8).range(8..=15))]
    compression_window: u8,

    /// Messages shorter than this are sent uncompressed (K/M suffixes are binary).
    #[arg(long, default_value = "128", value_parser = parse_size)]
    compression_min: usize,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum CompressionKind {
    Off,
    Shared,
    Dedicated,
}

impl CompressionArgs {
    fn config(&self) -> Result<CompressionConfig, String> {
        let mode = match self.compression {
            CompressionKind::Off => CompressionMode::Off,
            CompressionKind::Shared => CompressionMode::Shared,
            CompressionKind::Dedicated => CompressionMode::Dedicated,
        };
        CompressionConfig::new(mode, self.compression_window, self.compression_min)
    }
}

/// Where streams live (SPEC §13).
#[derive(clap::Args)]
#[command(next_help_heading = "Storage (SPEC §13)")]
struct StorageArgs {
    /// Keep offline queues, retained messages, duplicate windows and msg_ids in this directory
    /// (the file engine), so that they survive a restart and kill -9. Created if missing; one
    /// server per directory. Without it, everything is in memory and a restart forgets it.
    /// The number of --workers is part of the data: restart with the same one.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<std::path::PathBuf>,

    /// When acks wait for the disk: `batch` (one fsync per batch, acks after it), `always`
    /// (one fsync per message), `never` (no fsync: survives kill -9, not power loss).
    #[arg(long, value_enum, default_value = "batch", requires = "data_dir")]
    fsync: FsyncArg,

    /// Test-only: every write to the data directory fails (as if the disk were full) while
    /// this file exists.
    #[arg(long, value_name = "FILE", hide = true, requires = "data_dir")]
    fail_writes_while_exists: Option<std::path::PathBuf>,

    /// Share rooms, ids, inboxes and room history with every node on this Redis server
    /// (redis://HOST:PORT[/DB]; SPEC §15, docs/scaling.md): the Redis engine. Streams then live
    /// as long as Redis keeps them (its own persistence settings).
    #[arg(long, value_name = "URL", conflicts_with = "data_dir")]
    redis: Option<String>,

    /// The start of every Redis key and channel, so that several deployments can share one
    /// Redis server.
    #[arg(
        long,
        value_name = "PREFIX",
        default_value = "wsrelay",
        requires = "redis"
    )]
    redis_prefix: String,

    /// How long a room member stays listed after its node stopped refreshing it (a node killed
    /// with SIGKILL: its members leave within this; SPEC §15). Each node refreshes its members
    /// every third of it. At least 3s.
    #[arg(
        long,
        value_name = "DURATION",
        default_value = "60s",
        value_parser = presence_ttl,
        requires = "redis"
    )]
    redis_presence_ttl: Duration,
}

/// `--redis-presence-ttl`: a duration of at least 3 s (refreshes run every third of it, on the
/// Redis engine's 1 s tick).
fn presence_ttl(text: &str) -> Result<Duration, String> {
    let ttl = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    let min = Duration::from_millis(engine::redis::presence::MIN_TTL_MS);
    if ttl < min {
        return Err(format!("must be at least {}s", min.as_secs()));
    }
    Ok(ttl)
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum FsyncArg {
    Always,
    Batch,
    Never,
}

impl FsyncArg {
    fn policy(self) -> FsyncPolicy {
        match self {
            FsyncArg::Always => FsyncPolicy::Always,
            FsyncArg::Batch => FsyncPolicy::Batch,
            FsyncArg::Never => FsyncPolicy::Never,
        }
    }
}

/// The app on the engine the flags ask for, and the waker's receiving end when the engine
/// answers from another thread (the reactor watches it).
fn build_app(
    config: AppConfig,
    storage: StorageArgs,
) -> Result<(App, Option<WakeReceiver>), String> {
    if let Some(url) = storage.redis {
        let ttl = storage.redis_presence_ttl;
        return build_redis_app(config, url, storage.redis_prefix, ttl);
    }
    let Some(dir) = storage.data_dir.clone() else {
        return Ok((App::new(config), None));
    };
    // A directory written by several workers holds its streams in their directories.
    engine::data_dir::check_single(&dir).map_err(|e| e.to_string())?;
    let (receiver, waker) =
        waker::pair().map_err(|e| format!("cannot create the engine's waker: {e}"))?;
    let file = file_config(&config, &storage, dir);
    let now = Now {
        instant: SystemClock.now(),
        unix_ms: SystemClock.unix_ms(),
    };
    let engine = FileEngine::open(file, std::sync::Arc::new(move || waker.wake()), now)
        .map_err(|e| e.to_string())?;
    Ok((App::with_engine(config, Box::new(engine)), Some(receiver)))
}

/// The file engine's settings for `dir` from the flags (one worker's, or each worker's own
/// directory with `--workers`).
fn file_config(config: &AppConfig, storage: &StorageArgs, dir: std::path::PathBuf) -> FileConfig {
    FileConfig {
        dir,
        fsync: storage.fsync.policy(),
        segment_bytes: engine::file::SEGMENT_BYTES,
        limits: app::limits(config),
        room_history: app::room_history_limits(config),
        dedup_window: config.dedup_window,
        dedup_idle: config.offline_ttl,
        dedup_max_bytes: config.dedup_max_bytes,
        fault: storage
            .fail_writes_while_exists
            .clone()
            .map_or(StoreFault::Off, StoreFault::WhileFileExists),
    }
}

/// The app on the Redis engine (`--redis`, SPEC §15): its threads answer through the waker.
fn build_redis_app(
    config: AppConfig,
    url: String,
    prefix: String,
    presence_ttl: Duration,
) -> Result<(App, Option<WakeReceiver>), String> {
    let (receiver, waker) =
        waker::pair().map_err(|e| format!("cannot create the engine's waker: {e}"))?;
    let redis = engine::RedisConfig {
        url,
        prefix,
        limits: app::limits(&config),
        room_history: app::room_history_limits(&config),
        dedup_ttl_ms: u64::try_from(config.offline_ttl.as_millis()).unwrap_or(u64::MAX),
        presence_ttl_ms: u64::try_from(presence_ttl.as_millis()).unwrap_or(u64::MAX),
    };
    let engine = engine::RedisEngine::start(redis, std::sync::Arc::new(move || waker.wake()))?;
    Ok((App::with_engine(config, Box::new(engine)), Some(receiver)))
}

/// The relay's flags (SPEC §6); they become an `AppConfig`.
#[derive(clap::Args)]
#[command(next_help_heading = "Relay (/ws and /r/<room>)")]
struct RelayArgs {
    /// Direct messages retained per id, for offline delivery and ?since= recovery (0: none).
    #[arg(long, default_value_t = 1000)]
    offline_max: usize,

    /// How long a retained direct message is kept.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    offline_ttl: Duration,

    /// Bytes retained over all ids; beyond it the oldest messages are dropped first.
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    offline_max_bytes: usize,

    /// Bytes the duplicate-suppression windows of all senders may take; beyond it the oldest
    /// remembered client ids are forgotten first (counted).
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    dedup_max_bytes: usize,

    /// Bytes of messages that may wait for the store (with --data-dir: for the disk) at once;
    /// beyond it sends are acked rejected ("store busy", counted).
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    max_in_flight_bytes: usize,

    /// Messages kept per envelope room, for `join` with `since` and `history` (0: room history
    /// off).
    #[arg(long, default_value_t = 0)]
    room_history: usize,

    /// How long a message stays in its room's history.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    room_history_ttl: Duration,

    /// Bytes of room history over all rooms; beyond it the oldest messages go first. At least
    /// the larger of --max-message and --api-max-body, plus 64K, so that every message fits.
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    room_history_max_bytes: usize,

    /// HS256 secret: /ws and /r/ then require a JWT (?token= or Authorization: Bearer) whose
    /// `sub` is the id. Visible in `ps`: prefer --jwt-secret-file.
    #[arg(long, conflicts_with = "jwt_secret_file")]
    jwt_secret: Option<String>,

    /// File holding the HS256 secret (a trailing newline is ignored).
    #[arg(long)]
    jwt_secret_file: Option<std::path::PathBuf>,

    /// Clock skew allowed on a token's exp and nbf (whole seconds). A connection whose token
    /// is not refreshed is closed with 4001 this long after the token's exp.
    #[arg(long, default_value = "30s", value_name = "DURATION", value_parser = parse_whole_seconds)]
    jwt_leeway: Duration,

    /// An allowed Origin (repeatable), e.g. https://chat.example.com; others get 403.
    /// Requests without Origin (not from a browser) are allowed.
    #[arg(long = "allow-origin", value_name = "ORIGIN")]
    allow_origins: Vec<String>,

    /// Messages per second a connection may send (e.g. 50 or 50/s); beyond it, close 1008.
    #[arg(long, value_parser = parse_rate)]
    rate: Option<f64>,

    /// Messages a connection may send at once under --rate [default: the rate, at least 1].
    #[arg(long, requires = "rate")]
    burst: Option<u32>,
}

impl RelayArgs {
    fn app_config(self) -> Result<AppConfig, String> {
        let jwt_secret = match (self.jwt_secret, self.jwt_secret_file) {
            (Some(secret), _) => Some(secret.into_bytes()),
            (None, Some(path)) => {
                let mut bytes = std::fs::read(&path)
                    .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                    bytes.pop();
                }
                Some(bytes)
            }
            (None, None) => None,
        };
        if jwt_secret.as_ref().is_some_and(Vec::is_empty) {
            return Err("the JWT secret is empty".into());
        }
        let rate_limit = self.rate.map(|per_second| RateLimit {
            per_second,
            burst: self
                .burst
                .map_or(per_second.ceil().max(1.0), f64::from)
                .max(1.0),
        });
        Ok(AppConfig {
            offline_max: self.offline_max,
            offline_ttl: self.offline_ttl,
            offline_max_bytes: self.offline_max_bytes,
            dedup_max_bytes: self.dedup_max_bytes,
            max_in_flight_bytes: self.max_in_flight_bytes,
            room_history: self.room_history,
            room_history_ttl: self.room_history_ttl,
            room_history_max_bytes: self.room_history_max_bytes,
            jwt_secret,
            jwt_leeway: self.jwt_leeway,
            allow_origins: self.allow_origins,
            rate_limit,
            ..AppConfig::default()
        })
    }
}

/// Room history must be able to keep any message the relay accepts (SPEC §16): its byte
/// bound must hold the largest message with its envelope (from, room, timestamp: well under
/// 64 KiB more). A room message comes from a client (at most --max-message) or from the
/// server API (at most --api-max-body), so the larger of the two counts.
fn check_room_history(config: AppConfig, max_message: usize) -> Result<AppConfig, String> {
    let largest = max_message.max(config.api_max_body);
    let needed = largest.saturating_add(64 << 10);
    if config.room_history > 0 && config.room_history_max_bytes < needed {
        return Err(format!(
            "--room-history-max-bytes ({}) must be at least the larger of --max-message and \
             --api-max-body, plus 64K ({needed})",
            config.room_history_max_bytes
        ));
    }
    Ok(config)
}

/// Parses "50" or "50/s" (messages per second, more than 0).
fn parse_rate(text: &str) -> Result<f64, String> {
    let number = text.trim().trim_end_matches("/s");
    match number.parse::<f64>() {
        Ok(n) if n > 0.0 && n.is_finite() => Ok(n),
        _ => Err(format!("{text:?} is not a rate (examples: 50, 50/s, 0.5)")),
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum SlowConsumerPolicy {
    Close,
    Drop,
}

/// A timer tick: a duration of at least a millisecond (a zero tick would never advance).
fn parse_tick(text: &str) -> Result<Duration, String> {
    let tick = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if tick < Duration::from_millis(1) {
        return Err(format!(
            "{text:?} is too small: the tick must be at least 1ms"
        ));
    }
    Ok(tick)
}

/// Parses a worker count: a number from 1 up, or `auto` (the CPUs this process may use).
fn parse_workers(text: &str) -> Result<usize, String> {
    if text == "auto" {
        return Ok(std::thread::available_parallelism().map_or(1, |n| n.get()));
    }
    match text.parse::<usize>() {
        Ok(n) if (1..=1024).contains(&n) => Ok(n),
        _ => Err(format!(
            "{text:?} is not a worker count (1 to 1024, or auto)"
        )),
    }
}

/// A duration of whole seconds, such as `--jwt-leeway` (a token's exp and nbf are in whole
/// seconds, RFC 7519 §2, and the verifier counts the leeway in seconds): "500ms" or "1.5s" is
/// refused rather than silently cut to the second below.
fn parse_whole_seconds(text: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if duration.subsec_nanos() != 0 {
        return Err(format!(
            "{text:?} is not a whole number of seconds (examples: 0s, 30s, 2m)"
        ));
    }
    Ok(duration)
}

/// Parses "4096", "64K", "1M", "16MiB", "1G" (binary multiples).
fn parse_size(text: &str) -> Result<usize, String> {
    let t = text.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(digits);
    let n: usize = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size (examples: 4096, 64K, 1M)"))?;
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        _ => return Err(format!("{text:?}: unknown unit {unit:?} (use K, M or G)")),
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("wsrelay=info"))
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(args),
        Command::Bench(args) => wsrelay::bench::run(args),
        Command::Client(args) => wsrelay::client::run(args),
        Command::Api(args) => wsrelay::api_client::run(args),
    }
}

fn serve(args: ServeArgs) -> ExitCode {
    raise_fd_limit();
    let compression = match args.compression.config() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("wsrelay: {e}");
            return ExitCode::FAILURE;
        }
    };
    if args.workers > 1 {
        return serve_workers(args, compression);
    }
    let config = reactor_config(&args, compression);
    let built = app_config(args.relay, &args.api, args.max_message)
        .and_then(|config| build_app(config, args.storage));
    let (app, waker) = match built {
        Ok(built) => built,
        Err(e) => {
            eprintln!("wsrelay: {e}");
            return ExitCode::FAILURE;
        }
    };
    if !app.authenticates() {
        log::warn!(
            "no --jwt-secret: /ws trusts the ?id= each client claims (anyone can be anyone)"
        );
    }
    // Loaded before anything listens, so a bad pair is reported in words at once.
    let tls = match args.tls_cert.zip(args.tls_key) {
        Some((cert, key)) => match ServerTls::load(&cert, &key) {
            Ok(tls) => Some(tls),
            Err(e) => {
                eprintln!("wsrelay: {e}");
                return ExitCode::FAILURE;
            }
        },
        None => None,
    };
    let result = match args.poller {
        PollerKind::Epoll => MioPoller::new().and_then(|p| run(p, app, waker, config, tls)),
        PollerKind::Poll => PollPoller::new().and_then(|p| run(p, app, waker, config, tls)),
        PollerKind::Select => SelectPoller::new().and_then(|p| run(p, app, waker, config, tls)),
        #[cfg(target_os = "linux")]
        PollerKind::Uring => UringPoller::new().and_then(|p| run(p, app, waker, config, tls)),
    };
    match result {
        Ok(Exit::Graceful) => ExitCode::SUCCESS,
        // A second signal cut the graceful shutdown short.
        Ok(Exit::Immediate) => ExitCode::from(130),
        Err(e) => {
            eprintln!("wsrelay: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The app's settings from the command line, the server API's included: the same for one
/// reactor and for each worker (two copies once left the workers without the API key).
fn app_config(relay: RelayArgs, api: &ApiArgs, max_message: usize) -> Result<AppConfig, String> {
    let api_key = api.key()?;
    let api_max_body = api.api_max_body;
    let config = relay.app_config()?;
    let config = AppConfig {
        api_key,
        api_max_body,
        history_page_max_bytes: max_message,
        ..config
    };
    check_room_history(config, max_message)
}

/// The reactor's settings from the command line: the same for one reactor and for each worker.
fn reactor_config(args: &ServeArgs, compression: CompressionConfig) -> Config {
    Config {
        listen: args.listen,
        max_message: args.max_message,
        max_outbound: args.max_outbound,
        slow_consumer: match args.slow_consumer {
            SlowConsumerPolicy::Close => SlowConsumer::Close,
            SlowConsumerPolicy::Drop => SlowConsumer::Drop,
        },
        max_connections: args.max_connections,
        handshake_timeout: args.handshake_timeout,
        close_timeout: args.close_timeout,
        heartbeat_interval: args.heartbeat_interval,
        heartbeat_timeout: args.heartbeat_timeout,
        timer_tick: args.timer_tick,
        shutdown_timeout: args.shutdown_timeout,
        compression,
        keep_alive_timeout: args.api.api_idle_timeout,
    }
}

fn run<P: Poller>(
    poller: P,
    app: App,
    waker: Option<WakeReceiver>,
    config: Config,
    tls: Option<ServerTls>,
) -> std::io::Result<Exit> {
    let listen = config.listen;
    let mut reactor = Reactor::bind(poller, app, config)
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {listen}: {e}")))?;
    if let Some(tls) = tls {
        reactor.serve_tls(tls);
    }
    reactor.handle_signals()?;
    if let Some(waker) = waker {
        reactor.watch_waker(waker)?;
    }
    // One fixed line on stdout, so scripts and tests learn the port when `--listen` used port 0.
    println!(
        "wsrelay listening on {} (poller: {})",
        reactor.local_addr(),
        reactor.poller_name()
    );
    reactor.run()
}

/// `--workers` above 1 (SPEC §14): one reactor per thread, each on its own `SO_REUSEPORT`
/// listener, sharing only the process-wide connection count and the gauges
/// (`server::workers`). Every worker hears SIGINT/SIGTERM through its own signal pipe and
/// shuts down on its own; the process exits 0 once every worker has.
fn serve_workers(args: ServeArgs, compression: CompressionConfig) -> ExitCode {
    let workers = args.workers;
    // What the bus does not carry yet is refused before anything listens, in one line.
    if args.storage.redis.is_some() {
        // Exit 2 like clap's own refusals (`--redis` with `--data-dir`).
        eprintln!(
            "wsrelay: --redis is not supported with --workers above 1 yet (each worker would be \
             a node of its own); run one process per core, each with --redis, behind the load \
             balancer"
        );
        return ExitCode::from(2);
    }
    let config = reactor_config(&args, compression);
    let app_config = match app_config(args.relay, &args.api, args.max_message) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("wsrelay: {e}");
            return ExitCode::FAILURE;
        }
    };
    // `--data-dir`: a log per worker, under one lock held until the process ends, and the
    // marker that ties the directory to this number of workers (`engine/data_dir.rs`).
    let store = match &args.storage.data_dir {
        Some(dir) => match engine::data_dir::WorkersDir::open(dir, workers) {
            Ok(layout) => {
                let file = file_config(&app_config, &args.storage, dir.clone());
                Some((layout, file))
            }
            Err(e) => {
                eprintln!("wsrelay: {e}");
                return ExitCode::FAILURE;
            }
        },
        None => None,
    };
    let tls_files = args.tls_cert.zip(args.tls_key);
    if let Some((cert, key)) = &tls_files {
        // Checked once here, so a bad pair is one line, not one per worker.
        if let Err(e) = ServerTls::load(cert, key) {
            eprintln!("wsrelay: {e}");
            return ExitCode::FAILURE;
        }
    }
    let listeners = match workers::reuseport_listeners(config.listen, workers) {
        Ok(listeners) => listeners,
        Err(e) => {
            eprintln!("wsrelay: cannot listen on {}: {e}", config.listen);
            return ExitCode::FAILURE;
        }
    };
    let addr = listeners
        .first()
        .and_then(|l| l.local_addr().ok())
        .unwrap_or(config.listen);
    let shared = workers::Shared::new(workers, config.max_connections);
    let buses = match raw_bus::build(&shared) {
        Ok(buses) => buses,
        Err(e) => {
            eprintln!("wsrelay: cannot create the bus between workers: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The workers' engine bus (`/ws`, SPEC §14) rings the same wakers as the raw bus.
    let wakes: Vec<engine::Wake> = buses
        .first()
        .map(|(ends, _)| ends.wakers())
        .unwrap_or_default()
        .into_iter()
        .map(|w| std::sync::Arc::new(move || w.wake()) as engine::Wake)
        .collect();
    let now = Now {
        instant: SystemClock.now(),
        unix_ms: SystemClock.unix_ms(),
    };
    let engine_links = match &store {
        Some((layout, _)) => engine::bus::links_with_epoch(wakes, now, layout.epoch()),
        None => engine::bus::links(wakes, now),
    };
    // With logs, no worker serves before every worker has read its own: only then is the
    // shared position counter above every position they hold.
    let gate = store
        .as_ref()
        .map(|_| std::sync::Arc::new(std::sync::Barrier::new(workers)));
    // The server API's questions about connections (presence, rooms, ids, disconnect) are
    // asked of every worker, on the same wakers (`app/gather.rs`).
    let mut api_links = app::gather::links(
        buses
            .first()
            .map(|(ends, _)| ends.wakers())
            .unwrap_or_default(),
    )
    .into_iter();
    // Each worker reports once when it is ready (or could not start), and once when it ends.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<&'static str, String>>();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<(usize, std::io::Result<Exit>)>();
    let ends = buses.into_iter().zip(engine_links);
    for (index, (listener, ((bus, wake), engine_link))) in
        listeners.into_iter().zip(ends).enumerate()
    {
        let start = WorkerStart {
            index,
            listener,
            bus,
            wake,
            engine_link,
            api_link: api_links.next(),
            store: store.as_ref().map(|(layout, file)| FileConfig {
                dir: layout.worker(index),
                ..file.clone()
            }),
            gate: gate.clone(),
            app: app_config.clone(),
            config: config.clone(),
            tls: tls_files.clone(),
            slot: shared.slot(index),
        };
        let (ready, done) = (ready_tx.clone(), done_tx.clone());
        let poller = args.poller;
        let spawned = std::thread::Builder::new()
            .name(format!("worker-{index}"))
            .spawn(move || {
                let result = match poller {
                    PollerKind::Epoll => {
                        MioPoller::new().and_then(|p| run_worker(p, start, &ready))
                    }
                    PollerKind::Poll => {
                        PollPoller::new().and_then(|p| run_worker(p, start, &ready))
                    }
                    PollerKind::Select => {
                        SelectPoller::new().and_then(|p| run_worker(p, start, &ready))
                    }
                    PollerKind::Uring => {
                        UringPoller::new().and_then(|p| run_worker(p, start, &ready))
                    }
                };
                if let Err(e) = &result {
                    // Tells the main thread if the worker failed before it was ready.
                    let _ = ready.send(Err(e.to_string()));
                }
                let _ = done.send((index, result));
            });
        if let Err(e) = spawned {
            eprintln!("wsrelay: cannot start worker {index}: {e}");
            return ExitCode::FAILURE;
        }
    }
    drop((ready_tx, done_tx));
    let mut poller_name = "";
    for _ in 0..workers {
        match ready_rx.recv() {
            Ok(Ok(name)) => poller_name = name,
            Ok(Err(e)) => {
                eprintln!("wsrelay: {e}");
                return ExitCode::FAILURE;
            }
            Err(_) => return ExitCode::FAILURE,
        }
    }
    // The same first line as with one worker (scripts and tests read the address from it).
    println!("wsrelay listening on {addr} (poller: {poller_name}, workers: {workers})");
    let mut immediate = false;
    for (index, result) in done_rx.iter() {
        match result {
            Ok(Exit::Graceful) => log::debug!("worker {index} finished"),
            Ok(Exit::Immediate) => immediate = true,
            // One worker's poller failed: the process cannot keep its promises; stop it all.
            Err(e) => {
                eprintln!("wsrelay: worker {index}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    if immediate {
        ExitCode::from(130)
    } else {
        ExitCode::SUCCESS
    }
}

/// What one worker thread is started with.
struct WorkerStart {
    index: usize,
    listener: std::net::TcpListener,
    /// This worker's end of the bus for raw rooms, and the waker other workers ring.
    bus: raw_bus::BusEnds,
    wake: WakeReceiver,
    /// This worker's end of the engine bus (`/ws`: its streams' homes, SPEC §14).
    engine_link: engine::bus::Link,
    /// This worker's end of the server API's queues (`app/gather.rs`).
    api_link: Option<app::gather::Link>,
    /// `--data-dir`: this worker's log, and the gate every worker passes once its log is read.
    store: Option<FileConfig>,
    gate: Option<std::sync::Arc<std::sync::Barrier>>,
    /// The app is built on the worker's thread: it holds `Rc`s, and never leaves that thread.
    app: AppConfig,
    config: Config,
    tls: Option<(std::path::PathBuf, std::path::PathBuf)>,
    slot: workers::WorkerSlot,
}

/// One worker: its reactor on its listener, until shutdown. Says on `ready` when it accepts.
fn run_worker<P: Poller>(
    poller: P,
    start: WorkerStart,
    ready: &std::sync::mpsc::Sender<Result<&'static str, String>>,
) -> std::io::Result<Exit> {
    let now = Now {
        instant: SystemClock.now(),
        unix_ms: SystemClock.unix_ms(),
    };
    let engine = match start.store {
        Some(file) => engine::bus::BusEngine::with_file(start.engine_link, file, now)
            .map_err(|e| std::io::Error::other(format!("worker {}: {e}", start.index)))?,
        None => engine::bus::BusEngine::new(
            start.engine_link,
            app::limits(&start.app),
            app::room_history_limits(&start.app),
            app::dedup(&start.app),
            now,
        ),
    };
    if let Some(gate) = &start.gate {
        // A worker that cannot read its log never comes: the main thread then reports it and
        // ends the process, these waiting ones with it.
        gate.wait();
    }
    let api_link = start
        .api_link
        .ok_or_else(|| std::io::Error::other("no server API link for this worker"))?;
    let app = WorkerApp::new(
        App::with_engine(start.app, Box::new(engine)),
        start.bus,
        api_link,
    );
    let mut reactor = Reactor::on_listener(poller, app, start.config, start.listener)?;
    if let Some((cert, key)) = start.tls {
        let tls = ServerTls::load(&cert, &key)
            .map_err(|e| std::io::Error::other(format!("worker {}: {e}", start.index)))?;
        reactor.serve_tls(tls);
    }
    reactor.handle_signals()?;
    reactor.watch_waker(start.wake)?;
    reactor.join_workers(start.slot);
    let _ = ready.send(Ok(reactor.poller_name()));
    reactor.run()
}

/// Raises the soft descriptor limit to the hard one: every connection costs a descriptor.
fn raise_fd_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => log::debug!("descriptor limit {n}"),
        Err(e) => log::warn!("could not raise the descriptor limit: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;
    use std::time::Duration;

    #[test]
    fn room_history_bytes_must_hold_the_largest_client_or_api_message() {
        let config = |api_max_body| wsrelay::app::AppConfig {
            room_history: 10,
            room_history_max_bytes: 2 << 20,
            api_max_body,
            ..wsrelay::app::AppConfig::default()
        };
        assert!(super::check_room_history(config(64 << 10), 1 << 20).is_ok());
        // A 4 MiB API body could never be kept in 2 MiB of history.
        let refused = super::check_room_history(config(4 << 20), 1 << 20);
        assert!(refused.unwrap_err().contains("--api-max-body"));
    }

    #[test]
    fn rates() {
        assert_eq!(super::parse_rate("50"), Ok(50.0));
        assert_eq!(super::parse_rate("0.5/s"), Ok(0.5));
        assert!(super::parse_rate("0").is_err());
        assert!(super::parse_rate("fast").is_err());
    }

    #[test]
    fn ticks() {
        assert_eq!(super::parse_tick("100ms"), Ok(Duration::from_millis(100)));
        assert!(super::parse_tick("0s").is_err());
        assert!(super::parse_tick("500us").is_err());
        assert!(super::parse_tick("soon").is_err());
    }

    #[test]
    fn compression_flags() {
        use super::{Cli, Command};
        use clap::Parser;
        use wsrelay::protocol::deflate::{CompressionConfig, CompressionMode};
        let config = |args: &[&str]| -> Result<CompressionConfig, String> {
            let cli = Cli::try_parse_from([&["wsrelay", "serve"], args].concat())
                .map_err(|e| e.kind().to_string())?;
            match cli.command {
                Command::Serve(serve) => serve.compression.config(),
                _ => unreachable!("parsed serve"),
            }
        };
        assert_eq!(config(&[]), Ok(CompressionConfig::default()));
        assert_eq!(
            config(&[
                "--compression",
                "dedicated",
                "--compression-window",
                "10",
                "--compression-min",
                "1K"
            ]),
            CompressionConfig::new(CompressionMode::Dedicated, 10, 1024)
        );
        assert_eq!(
            config(&["--compression", "off"]).map(|c| c.mode),
            Ok(CompressionMode::Off)
        );
        assert_eq!(
            config(&["--compression-window", "8"]).map(|c| c.window_bits),
            Ok(8)
        );
        assert!(config(&["--compression-window", "7"]).is_err());
        assert!(config(&["--compression-window", "16"]).is_err());
        assert!(config(&["--compression", "fast"]).is_err());
    }

    /// `--jwt-leeway` takes whole seconds: a fraction is refused, not dropped.
    #[test]
    fn jwt_leeway_is_whole_seconds() {
        use super::{Cli, Command};
        use clap::Parser;
        let leeway = |value: &str| -> Result<Duration, String> {
            let args = ["wsrelay", "serve", "--jwt-leeway", value];
            let cli = Cli::try_parse_from(args).map_err(|e| e.to_string())?;
            match cli.command {
                Command::Serve(serve) => Ok(serve.relay.jwt_leeway),
                _ => unreachable!("parsed serve"),
            }
        };
        assert_eq!(leeway("0s"), Ok(Duration::ZERO));
        assert_eq!(leeway("2m"), Ok(Duration::from_secs(120)));
        let refused = leeway("500ms").unwrap_err();
        assert!(refused.contains("whole number of seconds"), "{refused}");
        assert!(leeway("1.5s").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("16MiB"), Ok(16 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert!(parse_size("12X").is_err());
        assert!(parse_size("").is_err());
    }
}
