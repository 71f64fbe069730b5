//! Settings of one server instance, as parsed from the command line.
//!
//! Owns: the knobs and their defaults (the CLI in `main.rs` shows the same defaults in `--help`).
//! Does not: parse flags (clap does, in `main.rs`) or validate addresses (bind does).

use super::handler::SlowConsumer;
use crate::protocol::deflate::CompressionConfig;
use std::net::SocketAddr;
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct Config {
    /// Address the listener binds.
    pub listen: SocketAddr,
    /// Largest message (and frame) accepted, in bytes; larger ones close with 1009 (SPEC §4).
    pub max_message: usize,
    /// Bytes that may wait in one connection's outbound queue before the slow-consumer policy
    /// applies (SPEC §2).
    pub max_outbound: usize,
    /// What happens to a connection over `max_outbound`: close 1008, or drop the message.
    pub slow_consumer: SlowConsumer,
    /// Open connections beyond which new ones get HTTP 503 (SPEC §2).
    pub max_connections: usize,
    /// How long a client may take to send its complete upgrade request (slowloris defence).
    pub handshake_timeout: Duration,
    /// How long to wait for the peer's Close after ours, or for the peer to hang up after an
    /// HTTP response, before the TCP connection is closed anyway.
    pub close_timeout: Duration,
    /// Silence after which the server sends a Ping (SPEC §5).
    pub heartbeat_interval: Duration,
    /// How long after that Ping some frame must arrive, or the connection is dropped as half-open.
    pub heartbeat_timeout: Duration,
    /// Granularity of the timer wheel.
    pub timer_tick: Duration,
    /// How long a graceful shutdown waits for close handshakes before closing what is left.
    pub shutdown_timeout: Duration,
    /// permessage-deflate: off, shared or dedicated, the window and the size threshold
    /// (SPEC §17).
    pub compression: CompressionConfig,
    /// How long a kept-alive HTTP connection (the server API, SPEC §16) may sit idle between
    /// two requests before it is closed.
    pub keep_alive_timeout: Duration,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_message: 1 << 20,
            max_outbound: 4 << 20,
            slow_consumer: SlowConsumer::Close,
            max_connections: 100_000,
            handshake_timeout: Duration::from_secs(10),
            close_timeout: Duration::from_secs(5),
            heartbeat_interval: Duration::from_secs(30),
            heartbeat_timeout: Duration::from_secs(10),
            timer_tick: Duration::from_millis(100),
            shutdown_timeout: Duration::from_secs(5),
            compression: CompressionConfig::default(),
            keep_alive_timeout: Duration::from_secs(30),
        }
    }
}
