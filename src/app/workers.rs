//! What the app serves when it is one of several workers (`--workers` above 1, SPEC §14).
//!
//! Owns: `WorkerApp`, the `App` of one worker, which refuses (HTTP 501, saying why) the
//! endpoints whose guarantees would need the bus between workers: `/ws` (ids, direct messages,
//! presence, offline queues) and `/r/<room>` (room members on other workers would never hear
//! each other). Everything else (`/echo`, `/healthz`, `/metrics`, `/stats.json`, the demo page)
//! is the `App`'s own answer.
//! Does not: carry anything between workers. This is the honest step before the bus: a client
//! is told plainly that the endpoint needs `--workers 1`, instead of getting a room that is
//! silently split in N (docs/operations.md, "Workers").

use super::{App, Session};
use crate::protocol::frame::OpCode;
use crate::protocol::handshake::Request;
use crate::protocol::Refusal;
use crate::server::{ConnId, Handler, Outbox, Route};

/// One worker's app: the `App`, minus what the bus does not carry yet.
pub struct WorkerApp {
    app: App,
}

impl WorkerApp {
    pub fn new(app: App) -> WorkerApp {
        WorkerApp { app }
    }
}

/// The path's refusal, if it needs the bus between workers.
fn needs_the_bus(path: &str) -> Option<Refusal> {
    if path == "/ws" {
        Some(Refusal::NotAcrossWorkers("/ws"))
    } else if path.starts_with("/r/") {
        Some(Refusal::NotAcrossWorkers("/r/<room>"))
    } else {
        None
    }
}

impl Handler for WorkerApp {
    type Session = Session;

    fn route(&mut self, conn: ConnId, request: &Request) -> Route<Session> {
        // Only a GET can reach an endpoint; other methods get the App's 405 as before.
        match needs_the_bus(&request.path) {
            Some(refusal) if request.method == "GET" => Route::Refuse(refusal),
            _ => self.app.route(conn, request),
        }
    }

    fn on_open(&mut self, conn: ConnId, session: &mut Session, out: &mut Outbox<'_>) {
        self.app.on_open(conn, session, out);
    }

    fn on_message(
        &mut self,
        conn: ConnId,
        session: &mut Session,
        opcode: OpCode,
        payload: &[u8],
        out: &mut Outbox<'_>,
    ) {
        self.app.on_message(conn, session, opcode, payload, out);
    }

    fn on_close(&mut self, conn: ConnId, session: Session, out: &mut Outbox<'_>) {
        self.app.on_close(conn, session, out);
    }

    fn on_wake(&mut self, out: &mut Outbox<'_>) {
        self.app.on_wake(out);
    }

    fn on_timer(&mut self, out: &mut Outbox<'_>) {
        self.app.on_timer(out);
    }

    fn render_metrics(&self, out: &mut String) {
        self.app.render_metrics(out);
    }

    fn stats(&self, out: &mut Vec<(&'static str, u64)>) {
        self.app.stats(out);
    }
}

#[cfg(test)]
mod tests {
    use super::needs_the_bus;

    #[test]
    fn only_the_relay_endpoints_need_the_bus() {
        assert!(needs_the_bus("/ws").is_some());
        assert!(needs_the_bus("/r/lobby").is_some());
        for path in ["/echo", "/", "/metrics", "/stats.json", "/healthz", "/wsx"] {
            assert!(needs_the_bus(path).is_none(), "{path}");
        }
    }
}
