//! The application behind the reactor: the endpoints and the relay (SPEC §6).
//!
//! Owns: `App`, the `Handler` the server runs, which hands every callback to the `Hub` with the
//! reactor's `Outbox` as its `Transport`; the hub's parts, one concept per file:
//! * `hub.rs`: admission, raw rooms, the envelope commands, presence, acks, offline delivery
//!   and recovery through the engine (`crate::engine`, where every id's inbox lives);
//! * `envelope.rs`: the JSON wire format of `/ws` and its error codes;
//! * `rooms.rs`: room membership with O(1) join and leave;
//! * `dedup.rs`: duplicate suppression by client message id, within `--dedup-max-bytes` (the
//!   engine keeps the windows, and the file engine makes them survive a restart);
//! * `demo/`: the demo page served at `/` (SPEC §8);
//! * `api.rs`: the server API for backends (`/api/...`, SPEC §16); `gather.rs`: its questions
//!   about connections asked of every worker (`--workers`);
//! * `auth.rs`: JWT, token sources, the Origin allow-list;
//! * `tokens.rs`: what each connection's token allows now, and when it expires (refresh and
//!   expiry, SPEC §16);
//! * `ratelimit.rs`: the per-connection token bucket;
//! * `workers.rs`: the app of one of several workers (`--workers`), on the workers' engine bus
//!   (`engine/bus/`) for `/ws`; `raw_bus.rs`: the bus between workers for raw rooms;
//! * `clock.rs`: injectable time; `config.rs`: `AppConfig`; `metrics.rs`: the hub's counters.
//!
//! Does not: see sockets, descriptors or bytes of frames. It receives whole messages for
//! connection ids and answers through the `Outbox` (SPEC §1: the hub knows nothing of file
//! descriptors).

pub mod api;
pub mod auth;
pub mod clock;
pub mod config;
pub mod dedup;
pub mod demo;
pub mod envelope;
pub mod gather;
pub mod hub;
pub mod metrics;
pub mod ratelimit;
pub mod raw_bus;
pub mod rooms;
pub mod tokens;
pub mod workers;

#[cfg(test)]
mod tests;

pub use clock::{Clock, LoopClock, ManualClock, SystemClock};
pub use config::AppConfig;
pub use hub::{dedup, limits, room_history_limits, Hub, Session, Transport};
pub use ratelimit::RateLimit;

use crate::engine::Engine;
use crate::protocol::frame::OpCode;
use crate::protocol::handshake::Request;
use crate::protocol::Refusal;
use crate::server::{ConnId, Handler, Outbox, Route};
use std::time::Instant;

/// The wsrelay application.
pub struct App {
    hub: Hub,
    /// The clock the hub reads, set by the reactor once per loop iteration (`set_now`); `None`
    /// when the app runs on another clock (tests' `ManualClock`).
    loop_clock: Option<LoopClock>,
}

impl App {
    /// The application on the system clock, read once per loop iteration (`LoopClock`).
    pub fn new(config: AppConfig) -> App {
        let clock = LoopClock::new();
        App {
            hub: Hub::new(config, Box::new(clock.clone())),
            loop_clock: Some(clock),
        }
    }

    /// The application on a given clock (tests use `ManualClock`).
    pub fn with_clock(config: AppConfig, clock: Box<dyn Clock>) -> App {
        App {
            hub: Hub::new(config, clock),
            loop_clock: None,
        }
    }

    /// The application on the system clock and a given engine (`--data-dir`: the file
    /// engine, whose storage thread wakes the reactor, which then calls `on_wake`).
    pub fn with_engine(config: AppConfig, engine: Box<dyn Engine>) -> App {
        let clock = LoopClock::new();
        App {
            hub: Hub::with_engine(config, Box::new(clock.clone()), engine),
            loop_clock: Some(clock),
        }
    }

    /// `--workers` above 1: see `Hub::set_raw_outlet`.
    pub fn set_raw_outlet(&mut self, outlet: hub::RawOutlet) {
        self.hub.set_raw_outlet(outlet);
    }

    /// `--workers` above 1: see `Hub::deliver_raw`.
    pub fn deliver_raw(
        &mut self,
        room: &str,
        opcode: OpCode,
        payload: &[u8],
        out: &mut Outbox<'_>,
    ) -> usize {
        self.hub.deliver_raw(room, opcode, payload, out)
    }

    /// `--workers` above 1: see `Hub::api_take`.
    pub fn api_take(
        &mut self,
        conn: ConnId,
        request: &Request,
        body: Result<&[u8], Refusal>,
        out: &mut Outbox<'_>,
    ) -> Option<api::Query> {
        self.hub.api_take(conn, request, body, out)
    }

    /// `--workers` above 1: see `Hub::api_part`.
    pub fn api_part(&mut self, query: &api::Query, out: &mut Outbox<'_>) -> api::Part {
        self.hub.api_part(query, out)
    }

    /// `--workers` above 1: answers a gathered question (`Hub::api_answer_parts`), or refuses
    /// one that some worker did not answer in time (`Hub::api_unanswered`).
    pub fn api_settled(&mut self, settled: gather::Settled, out: &mut Outbox<'_>) {
        match settled {
            gather::Settled::Complete { conn, query, parts } => {
                self.hub.api_answer_parts(conn, &query, parts, out);
            }
            gather::Settled::Unanswered {
                conn,
                query,
                missing,
            } => {
                let waited = gather::GATHER_DEADLINE;
                self.hub.api_unanswered(conn, &query, &missing, waited, out);
            }
        }
    }

    /// Is `--jwt-secret` configured? Without it, `/ws` trusts the `?id=` each client claims.
    pub fn authenticates(&self) -> bool {
        self.hub.authenticates()
    }
}

impl Default for App {
    fn default() -> App {
        App::new(AppConfig::default())
    }
}

impl Handler for App {
    type Session = Session;

    fn set_now(&mut self, now: Instant) {
        if let Some(clock) = &self.loop_clock {
            clock.set(now);
        }
    }

    fn route(&mut self, _conn: ConnId, request: &Request) -> Route<Session> {
        if let Some(route) = self.hub.route_api(request) {
            return route;
        }
        self.hub.route(request)
    }

    fn on_request(
        &mut self,
        conn: ConnId,
        request: &Request,
        body: Result<&[u8], Refusal>,
        out: &mut Outbox<'_>,
    ) {
        self.hub.api_request(conn, request, body, out);
    }

    fn on_open(&mut self, conn: ConnId, session: &mut Session, out: &mut Outbox<'_>) {
        self.hub.open(conn, session, out);
    }

    fn on_message(
        &mut self,
        conn: ConnId,
        session: &mut Session,
        opcode: OpCode,
        payload: &[u8],
        out: &mut Outbox<'_>,
    ) {
        self.hub.message(conn, session, opcode, payload, out);
    }

    fn on_close(&mut self, conn: ConnId, session: Session, out: &mut Outbox<'_>) {
        self.hub.close(conn, session, out);
    }

    fn on_wake(&mut self, out: &mut Outbox<'_>) {
        self.hub.wake(out);
    }

    fn on_timer(&mut self, out: &mut Outbox<'_>) {
        self.hub.timer(out);
    }

    fn render_metrics(&self, out: &mut String) {
        self.hub.render_metrics(out);
    }

    fn stats(&self, out: &mut Vec<(&'static str, u64)>) {
        self.hub.stats(out);
    }

    fn health(&self) -> Option<String> {
        self.hub.health()
    }
}
