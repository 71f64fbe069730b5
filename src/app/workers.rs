//! What the app serves when it is one of several workers (`--workers` above 1, SPEC §14).
//!
//! Owns: `WorkerApp`, the `App` of one worker plus its end of the bus for raw rooms
//! (`raw_bus.rs`): it tells the bus when a raw room gains its first member here or loses its
//! last, hands it every raw-room message relayed here, and delivers what other workers relayed.
//! It refuses (HTTP 501, saying why) `/ws`, whose guarantees (ids, direct messages, presence,
//! offline queues, acks) the bus does not carry yet: a client is told plainly that `/ws` needs
//! `--workers 1`, instead of getting ids silently split in N (docs/operations.md, "Workers").
//! Everything else is the `App`'s own answer.
//! Does not: carry anything itself (`raw_bus.rs` does), or know room members (the hub does).

use super::raw_bus::{BusEnds, RawBus};
use super::{App, Session};
use crate::protocol::frame::OpCode;
use crate::protocol::handshake::Request;
use crate::protocol::Refusal;
use crate::server::{ConnId, Handler, Outbox, Route};
use std::cell::RefCell;
use std::rc::Rc;
use std::time::Instant;

/// One worker's app: the `App` and its end of the bus, minus what the bus does not carry yet.
pub struct WorkerApp {
    app: App,
    /// Shared with the hub's raw outlet (a closure that publishes on it). Never borrowed across
    /// a call into the app, so the outlet can always borrow it.
    bus: Rc<RefCell<RawBus>>,
}

impl WorkerApp {
    pub fn new(mut app: App, ends: BusEnds) -> WorkerApp {
        let bus = Rc::new(RefCell::new(RawBus::new(ends)));
        let outlet = Rc::clone(&bus);
        app.set_raw_outlet(Box::new(move |room, opcode, payload| {
            outlet.borrow_mut().publish(room, opcode, payload);
        }));
        WorkerApp { app, bus }
    }
}

/// The path's refusal, if it needs what the bus between workers does not carry yet.
fn needs_the_bus(path: &str) -> Option<Refusal> {
    (path == "/ws").then_some(Refusal::NotAcrossWorkers("/ws"))
}

// Every method of `Handler` is forwarded, the defaulted ones included: a default left in place
// here would silently replace the `App`'s own behaviour (its clock, its wake-ups).
impl Handler for WorkerApp {
    type Session = Session;

    fn set_now(&mut self, now: Instant) {
        self.app.set_now(now);
    }

    fn route(&mut self, conn: ConnId, request: &Request) -> Route<Session> {
        // Only a GET can reach an endpoint; other methods get the App's 405 as before.
        match needs_the_bus(&request.path) {
            Some(refusal) if request.method == "GET" => Route::Refuse(refusal),
            _ => self.app.route(conn, request),
        }
    }

    /// Not reached while `--api-key` is refused with several workers (the API is then off,
    /// and its paths answer 404); forwarded so that the seam stays whole.
    fn on_request(
        &mut self,
        conn: ConnId,
        request: &Request,
        body: Result<&[u8], Refusal>,
        out: &mut Outbox<'_>,
    ) {
        self.app.on_request(conn, request, body, out);
    }

    fn on_open(&mut self, conn: ConnId, session: &mut Session, out: &mut Outbox<'_>) {
        self.app.on_open(conn, session, out);
        if let Some(room) = session.raw_room() {
            self.bus.borrow_mut().member_joined(room);
        }
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
        let room = session.raw_room().cloned();
        self.app.on_close(conn, session, out);
        if let Some(room) = room {
            self.bus.borrow_mut().member_left(&room);
        }
    }

    /// The worker's waker: the bus has something (no engine wakes a worker: `--data-dir` is
    /// refused with several workers).
    fn on_wake(&mut self, out: &mut Outbox<'_>) {
        self.bus.borrow_mut().receive(&mut self.app, out);
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

    fn health(&self) -> Option<String> {
        self.app.health()
    }
}

#[cfg(test)]
mod tests {
    use super::needs_the_bus;

    #[test]
    fn only_the_envelope_endpoint_is_refused() {
        assert!(needs_the_bus("/ws").is_some());
        for path in [
            "/echo",
            "/r/lobby",
            "/",
            "/metrics",
            "/stats.json",
            "/healthz",
            "/wsx",
        ] {
            assert!(needs_the_bus(path).is_none(), "{path}");
        }
    }
}
