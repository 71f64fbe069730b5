//! The application's settings: offline queue, room history and duplicate-window bounds,
//! identity and access (SPEC §6, §16).
//!
//! Owns: `AppConfig` and its defaults (which are the CLI's defaults too).
//! Does not: parse flags (main.rs does) or read files (the JWT secret arrives as bytes).

use super::ratelimit::RateLimit;
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct AppConfig {
    /// Messages retained per id (offline queue and recovery log); 0 disables both.
    pub offline_max: usize,
    /// How long a retained message is kept.
    pub offline_ttl: Duration,
    /// Bytes retained over all ids; beyond it the oldest go first (see `engine/streams.rs`).
    pub offline_max_bytes: usize,
    /// Client message ids remembered per sender for duplicate suppression.
    pub dedup_window: usize,
    /// Bytes the duplicate windows of all senders may take; beyond it the oldest remembered ids
    /// go first (see `dedup.rs`).
    pub dedup_max_bytes: usize,
    /// HS256 secret; when set, `/ws` and `/r/` require a token.
    pub jwt_secret: Option<Vec<u8>>,
    /// Clock skew allowed on a token's `exp` and `nbf`: a token is accepted, and a connection
    /// kept, until `exp` plus this (whole seconds; `auth::LEEWAY_SECS` by default).
    pub jwt_leeway: Duration,
    /// Allowed `Origin` values; empty allows any.
    pub allow_origins: Vec<String>,
    /// Per-connection message rate limit; beyond it the connection is closed with 1008.
    pub rate_limit: Option<RateLimit>,
    /// Bytes of messages waiting for the engine (the file engine: for the disk) at most;
    /// beyond it sends and publishes are acked `rejected` as "store busy" (SPEC §13).
    pub max_in_flight_bytes: usize,
    /// The server API's key (`--api-key`); without one, `/api/...` is 404 (SPEC §16).
    pub api_key: Option<Vec<u8>>,
    /// Bytes a server API request body may have (`--api-max-body`); beyond it, 413.
    pub api_max_body: usize,
    /// Messages kept per envelope room for `join` with `since` and `history` (SPEC §16); 0
    /// keeps none (history off).
    pub room_history: usize,
    /// How long a room message stays in its room's history.
    pub room_history_ttl: Duration,
    /// Bytes of room history over all rooms; beyond it the oldest go first.
    pub room_history_max_bytes: usize,
    /// Bytes of messages one `history` reply may hold (the server sets `--max-message`): a
    /// page is cut there and says `"more":true` (SPEC §16).
    pub history_page_max_bytes: usize,
}

impl Default for AppConfig {
    fn default() -> AppConfig {
        AppConfig {
            offline_max: 1000,
            offline_ttl: Duration::from_secs(3600),
            offline_max_bytes: 64 << 20,
            dedup_window: 256,
            dedup_max_bytes: 64 << 20,
            jwt_secret: None,
            jwt_leeway: Duration::from_secs(super::auth::LEEWAY_SECS),
            allow_origins: Vec::new(),
            rate_limit: None,
            max_in_flight_bytes: 64 << 20,
            api_key: None,
            api_max_body: super::api::DEFAULT_MAX_BODY,
            room_history: 0,
            room_history_ttl: Duration::from_secs(3600),
            room_history_max_bytes: 64 << 20,
            history_page_max_bytes: 1 << 20,
        }
    }
}
