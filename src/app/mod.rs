//! The application behind the reactor: which paths exist and what their messages do (SPEC §6).
//!
//! Owns: `App`, the `Handler` the server runs; routing of request paths to endpoints; each
//! endpoint's behaviour. Today: `/echo`.
//! Does not: see sockets, descriptors or bytes of frames. It receives whole messages for
//! connection ids and answers through the `Outbox` (SPEC §1: the hub knows nothing of file
//! descriptors).

use crate::protocol::frame::OpCode;
use crate::protocol::handshake::{self, HandshakeError, Request};
use crate::server::{ConnId, Handler, Outbox, Route};

/// Which endpoint an open connection belongs to.
#[derive(Debug)]
pub enum Session {
    /// `/echo`: every data message comes back to its sender, same opcode.
    Echo,
}

/// The wsrelay application.
#[derive(Default)]
pub struct App {}

impl App {
    pub fn new() -> App {
        App {}
    }
}

impl Handler for App {
    type Session = Session;

    fn route(&mut self, _conn: ConnId, request: &Request) -> Route<Session> {
        if request.method != "GET" {
            let e = HandshakeError::MethodNotAllowed;
            return Route::Respond(e.status(), e.response());
        }
        match request.path.as_str() {
            "/echo" => Route::Upgrade {
                session: Session::Echo,
                protocol: None,
            },
            "/" => Route::Respond(
                200,
                handshake::http_response(
                    200,
                    "text/plain; charset=utf-8",
                    &[],
                    b"wsrelay\n\nendpoints: /echo (WebSocket echo), /healthz, /metrics\n",
                ),
            ),
            _ => {
                let e = HandshakeError::NotFound;
                Route::Respond(e.status(), e.response())
            }
        }
    }

    fn on_open(&mut self, _conn: ConnId, _session: &mut Session, _out: &mut Outbox<'_>) {}

    fn on_message(
        &mut self,
        conn: ConnId,
        session: &mut Session,
        opcode: OpCode,
        payload: &[u8],
        out: &mut Outbox<'_>,
    ) {
        match session {
            Session::Echo => {
                out.send(conn, opcode, payload);
            }
        }
    }

    fn on_close(&mut self, _conn: ConnId, _session: Session, _out: &mut Outbox<'_>) {}
}
