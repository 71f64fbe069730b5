//! What the app serves when it is one of several workers (`--workers` above 1, SPEC §14).
//!
//! Owns: `WorkerApp`, the `App` of one worker plus its end of the bus for raw rooms
//! (`raw_bus.rs`): it tells the bus when a raw room gains its first member here or loses its
//! last, hands it every raw-room message relayed here, and delivers what other workers relayed.
//! `/ws` is the `App`'s own, on the workers' engine bus (`engine/bus/`), which the hub reaches
//! through the engine seam like any engine: its streams' homes answer through the same waker.
//! Does not: carry anything itself (`raw_bus.rs` and `engine/bus/` do), or know room members
//! (the hub does).

use super::raw_bus::{BusEnds, RawBus};
use super::{App, Session};
use crate::protocol::frame::OpCode;
use crate::protocol::handshake::Request;
use crate::protocol::Refusal;
use crate::server::{ConnId, Handler, Outbox, Route};
use std::cell::RefCell;
use std::rc::Rc;
use std::time::Instant;

/// One worker's app: the `App` (on its `BusEngine`) and its end of the bus for raw rooms.
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

// Every method of `Handler` is forwarded, the defaulted ones included: a default left in place
// here would silently replace the `App`'s own behaviour (its clock, its wake-ups).
impl Handler for WorkerApp {
    type Session = Session;

    fn set_now(&mut self, now: Instant) {
        self.app.set_now(now);
    }

    fn route(&mut self, conn: ConnId, request: &Request) -> Route<Session> {
        self.app.route(conn, request)
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

    /// The worker's waker: the raw bus has something, or the engine bus (other workers'
    /// requests and answers, which the hub takes as it polls its engine), or both.
    fn on_wake(&mut self, out: &mut Outbox<'_>) {
        self.bus.borrow_mut().receive(&mut self.app, out);
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

    fn health(&self) -> Option<String> {
        self.app.health()
    }
}
