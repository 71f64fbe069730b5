//! Helpers for the relay tests: a JSON client over tungstenite, and raw upgrade requests that
//! report the HTTP status. Every read is bounded by the socket's read timeout (`DEADLINE`).

use crate::support::*;
use serde_json::{json, Value};
use std::io::Write;
use std::net::TcpStream;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Message, WebSocket};

/// A `/ws` client speaking the envelope protocol.
pub struct Client {
    pub ws: WebSocket<TcpStream>,
}

impl Client {
    /// Connects to `path` and returns the client with its welcome message already read.
    pub fn connect(server: &Server, path: &str) -> (Client, Value) {
        let mut client = Client {
            ws: server.ws(path),
        };
        let welcome = client.recv();
        assert_eq!(welcome["type"], "welcome", "{welcome}");
        (client, welcome)
    }

    /// Connects as `id` without auth.
    pub fn as_id(server: &Server, id: &str) -> Client {
        Client::connect(server, &format!("/ws?id={id}")).0
    }

    pub fn send(&mut self, value: Value) {
        self.ws.send(Message::text(value.to_string())).unwrap();
    }

    /// A direct message with a client id.
    pub fn send_to(&mut self, to: &str, payload: Value, id: &str) {
        self.send(json!({"type": "send", "to": to, "payload": payload, "id": id}));
    }

    /// The next JSON message (pings are answered by tungstenite on the way).
    pub fn recv(&mut self) -> Value {
        loop {
            match self.ws.read().expect("read within the deadline") {
                Message::Text(text) => return serde_json::from_str(text.as_str()).unwrap(),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("expected a JSON text message, got {other:?}"),
            }
        }
    }

    /// The next message, which must be of `kind`.
    pub fn expect(&mut self, kind: &str) -> Value {
        let m = self.recv();
        assert_eq!(m["type"], kind, "{m}");
        m
    }

    /// Sends a direct message and returns its ack.
    pub fn send_acked(&mut self, to: &str, payload: Value, id: &str) -> Value {
        self.send_to(to, payload, id);
        self.expect("ack")
    }

    /// Joins `room` and waits for the confirmation (the joiner's own presence event, then
    /// `joined`, after which everything is live).
    pub fn join(&mut self, room: &str, me: &str) {
        self.send(json!({"type": "join", "room": room}));
        assert_eq!(
            self.expect("presence"),
            json!({"type": "presence", "room": room, "id": me, "event": "join"})
        );
        let joined = self.expect("joined");
        assert_eq!(joined["room"], room, "{joined}");
    }
}

/// Reads until a Close frame and returns its code.
pub fn close_code(ws: &mut WebSocket<TcpStream>) -> CloseCode {
    loop {
        match ws.read() {
            Ok(Message::Close(Some(frame))) => return frame.code,
            Ok(Message::Close(None)) => panic!("close without a code"),
            Ok(_) => continue,
            Err(e) => panic!("connection ended without a close frame: {e}"),
        }
    }
}

/// Sends an upgrade request for `target` with extra header lines and returns the status and
/// body of the answer (the socket is dropped after the head for a 101).
pub fn upgrade_status(server: &Server, target: &str, headers: &str) -> (u16, String) {
    let mut s = server.tcp();
    write!(
        s,
        "GET {target} HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{headers}\r\n"
    )
    .unwrap();
    let head = read_http_head(&mut s);
    let status = head[9..12].parse().unwrap();
    if status == 101 {
        return (101, head);
    }
    // A refusal is answered and then closed in order: a reset could cut the body short.
    let (body, ending) = read_until_end(&mut s, DEADLINE);
    assert_eq!(ending, Ending::Eof, "{target}: reset after the {status}");
    (status, String::from_utf8_lossy(&body).into_owned())
}
