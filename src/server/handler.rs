//! The seam between the reactor and the application: what the reactor tells the app, and the
//! one way the app can act on connections.
//!
//! Owns: the `Handler` trait (route a request, hear about opens, messages and closes), `Route`
//! and `ServerEndpoint` (what a request becomes), and `Outbox`, the app's handle for queueing
//! frames on connections and closing them.
//! Does not: implement any endpoint (that is `app/`), or expose sockets or descriptors to the app.
//! The app sees `ConnId`s and messages only (SPEC §1).
//!
//! Dependency direction: `app` implements `Handler`, so `app` depends on `server`, never the other
//! way round. The reactor is generic over the handler (`Reactor<P, H>`), so calls into the app
//! are static.

use super::compression::Compressor;
use super::connection::{ConnId, Connection, State};
use super::live;
use super::metrics::Metrics;
use super::outbound::OutboundPool;
use crate::protocol::frame::{self, OpCode};
use crate::protocol::handshake::Request;
use crate::protocol::{CloseCode, Refusal};
use slab::Slab;
use std::rc::Rc;
use std::time::Instant;

/// What a request head becomes. The app's `route` decides it for every request the parser
/// and the upgrade rules let through, so every path is routed in one place (docs/architecture.md,
/// "Routing").
pub enum Route<S> {
    /// Upgrade to WebSocket. `session` is the app's per-connection state, kept by the reactor in
    /// the connection and handed back on every callback; `protocol` is the subprotocol to confirm
    /// in the 101 response, if any. A request without `Upgrade: websocket` is refused with 426.
    Upgrade {
        session: S,
        protocol: Option<&'static str>,
    },
    /// Answer with one of the reactor's own endpoints.
    Server(ServerEndpoint),
    /// Answer with this complete `200 OK` response (a resource of the app's own, such as the
    /// demo page), then close.
    Resource(Vec<u8>),
    /// Refuse, saying why (`Refusal::response`), then close.
    Refuse(Refusal),
    /// A request for the app itself (the server API, SPEC §16): the reactor reads its body
    /// (`Content-Length`, at most `max_body` bytes, else 413 from the head alone) and hands both
    /// to `Handler::on_request`. The connection then waits for the app's answer
    /// (`Outbox::respond`), which may come in a later callback; HTTP/1.1 keep-alive and
    /// pipelined requests are served in order after it (docs/architecture.md, "HTTP requests").
    Api { max_body: usize },
}

/// The endpoints whose answer only the reactor can give: it holds what they report (its
/// counters, the state of its connections). The app decides where they live; the reactor
/// renders them, adding the app's own figures (`Handler::stats`, `Handler::render_metrics`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerEndpoint {
    /// Liveness: `200 ok` while the loop is turning.
    Health,
    /// The live counters of the demo page as one JSON object (docs/protocol.md, `/stats.json`).
    Stats,
    /// Every counter in the Prometheus text format (docs/operations.md).
    Metrics,
}

/// The application behind the reactor.
pub trait Handler {
    /// Per-connection state of an upgraded connection.
    type Session;

    /// A loop iteration began at `now` (read once per iteration, after the wait; SPEC §2). Called
    /// before any other call of the iteration, so an app can take its time from here instead of
    /// reading the clock per message.
    fn set_now(&mut self, _now: Instant) {}

    /// Decides what a request head becomes: an upgrade, one of the reactor's endpoints, a
    /// resource of the app's, or a refusal. Called for every complete request head the parser
    /// accepts; an upgrade attempt has passed the upgrade rules (RFC 6455 §4.2.1) first.
    fn route(&mut self, conn: ConnId, request: &Request) -> Route<Self::Session>;

    /// The 101 response is queued; the connection is open. Messages sent now follow it.
    fn on_open(&mut self, conn: ConnId, session: &mut Self::Session, out: &mut Outbox<'_>);

    /// A complete data message (text already validated as UTF-8).
    fn on_message(
        &mut self,
        conn: ConnId,
        session: &mut Self::Session,
        opcode: OpCode,
        payload: &[u8],
        out: &mut Outbox<'_>,
    );

    /// The connection is gone (whatever the reason). Called once for every opened connection.
    fn on_close(&mut self, conn: ConnId, session: Self::Session, out: &mut Outbox<'_>);

    /// The descriptor given to `Reactor::watch_waker` became readable: another thread (the
    /// file engine's storage thread) has answers for the app. Not tied to a connection.
    fn on_wake(&mut self, _out: &mut Outbox<'_>) {}

    /// The time the app asked for with `Outbox::wake_at` has come. Not tied to a connection;
    /// the app checks what is due and asks again for its next time, if it has one.
    fn on_timer(&mut self, _out: &mut Outbox<'_>) {}

    /// A `Route::Api` request with its complete body, or the refusal its framing earned (bad or
    /// oversized `Content-Length`, a `Transfer-Encoding`: then the connection closes after the
    /// answer). The app must answer every request exactly once, now or in a later callback,
    /// with `Outbox::respond` or `Outbox::refuse`; until then the connection reads no further
    /// request. The default refuses everything with 404 (an app without such requests).
    fn on_request(
        &mut self,
        conn: ConnId,
        _request: &Request,
        body: Result<&[u8], Refusal>,
        out: &mut Outbox<'_>,
    ) {
        out.refuse(conn, body.err().unwrap_or(Refusal::NotFound));
    }

    /// Appends the app's own metrics (Prometheus text) to /metrics.
    fn render_metrics(&self, _out: &mut String) {}

    /// Adds the app's live figures (rooms, ids online, ...) to /stats.json.
    fn stats(&self, _out: &mut Vec<(&'static str, u64)>) {}

    /// Why the app is degraded (its engine cannot reach its store), for /healthz: None is
    /// healthy (200 `ok`); otherwise 503 with the reason (docs/operations.md).
    fn health(&self) -> Option<String> {
        None
    }
}

/// What the slow-consumer policy does when a connection's queue is over `--max-outbound`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlowConsumer {
    /// Close the connection with 1008 (the default).
    Close,
    /// Drop the new message for that connection only.
    Drop,
}

/// The outcome of one send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sent {
    /// Queued on the connection; it leaves with the connection's next flush.
    Queued,
    /// Not queued: the connection is over `--max-outbound` and the policy is `drop`.
    Dropped,
    /// Not queued: the connection is over `--max-outbound` and is being closed (1008).
    Closed,
    /// Not queued: no such open connection (it closed, or is closing).
    Gone,
}

/// Whether a send is subject to `--max-outbound`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Limit {
    /// Over the limit, the slow-consumer policy applies (every ordinary send).
    Apply,
    /// Queued whatever the queue holds (`Outbox::send_shared_unbounded`).
    Exempt,
}

/// The app's handle on connections during a callback. It queues bytes and marks connections
/// dirty; the reactor flushes every dirty connection once at the end of the loop iteration, so
/// everything queued for one connection in one iteration leaves in one vectored write.
pub struct Outbox<'a> {
    pub(super) conns: &'a mut Slab<Connection>,
    pub(super) metrics: &'a mut Metrics,
    pub(super) dirty: &'a mut Vec<ConnId>,
    /// Closes requested during the callback; applied by the reactor right after it.
    pub(super) closes: &'a mut Vec<(ConnId, CloseCode, &'static str)>,
    /// The reactor's storage for outbound queues: a fan-out reuses its rings instead of
    /// allocating one per recipient (see `outbound`).
    pub(super) pool: &'a mut OutboundPool,
    pub(super) max_outbound: usize,
    pub(super) policy: SlowConsumer,
    /// permessage-deflate: a connection that negotiated it gets its data messages compressed
    /// (SPEC §17), transparently to the app, which encodes and sends frames as it always does.
    pub(super) compressor: &'a mut Compressor,
    /// The earliest time the app asked to be woken at during this callback (`wake_at`);
    /// the reactor turns it into its one app timer after the callback.
    pub(super) wake: &'a mut Option<Instant>,
    /// Answers to `Route::Api` requests and closes with reasons of the app's own wording,
    /// applied by the reactor right after the callback.
    pub(super) requests: &'a mut AppRequests,
}

/// What the app asked of HTTP requests and connections during a callback, beyond frames.
#[derive(Debug, Default)]
pub struct AppRequests {
    /// Answers to `Route::Api` requests, in the order the app gave them.
    pub(super) answers: Vec<(ConnId, Answer)>,
    /// Closes whose reason the app words at run time (`Outbox::close_with_reason`).
    pub(super) closes: Vec<(ConnId, CloseCode, String)>,
}

impl AppRequests {
    pub(super) fn is_empty(&self) -> bool {
        self.answers.is_empty() && self.closes.is_empty()
    }
}

/// The app's answer to one `Route::Api` request.
#[derive(Debug)]
pub enum Answer {
    /// A JSON body with this status.
    Json { status: u16, body: Vec<u8> },
    /// A refusal (`Refusal::api_response`: its status, headers and reason as JSON).
    Refused(Refusal),
}

impl Outbox<'_> {
    /// Queues a frame encoded once and shared by many recipients (no copy per recipient). To
    /// a connection that negotiated permessage-deflate, the frame goes compressed: compressed
    /// once per callback for all such connections (see `compression`).
    pub fn send_shared(&mut self, to: ConnId, frame: &Rc<[u8]>) -> Sent {
        let (frame, compressed) = self.for_recipient(to, frame);
        let sent = self.queue(to, frame.len(), Limit::Apply, |conn, pool| {
            conn.outbound.push_shared(frame, pool)
        });
        self.count_compressed(compressed, sent)
    }

    /// Queues a shared frame even over `--max-outbound`, for a frame the connection must be able
    /// to take whatever its queue holds. The app uses it on connect, for the welcome and the
    /// first message of a backlog: the 101 response is already queued then, so without it a
    /// message that fits `--max-message` but not what the limit leaves could never be delivered
    /// (SPEC §6: the backlog must make progress). The queue stays bounded by `--max-outbound`
    /// plus those frames.
    pub fn send_shared_unbounded(&mut self, to: ConnId, frame: &Rc<[u8]>) -> Sent {
        let (frame, compressed) = self.for_recipient(to, frame);
        let sent = self.queue(to, frame.len(), Limit::Exempt, |conn, pool| {
            conn.outbound.push_shared(frame, pool)
        });
        self.count_compressed(compressed, sent)
    }

    /// The form of a shared frame that `to` gets, and whether it is compressed: compressed if
    /// `to` negotiated permessage-deflate and compressing is worth it, else the frame itself.
    fn for_recipient(&mut self, to: ConnId, frame: &Rc<[u8]>) -> (Rc<[u8]>, bool) {
        let negotiated = self
            .conns
            .get_mut(to.slot as usize)
            .filter(|c| c.id == to && c.state() == State::Open)
            .and_then(|c| c.deflate.as_mut());
        match negotiated.and_then(|n| self.compressor.compress_shared(n, frame)) {
            Some(compressed) => (compressed, true),
            None => (Rc::clone(frame), false),
        }
    }

    /// Counts a compressed frame once it is queued (not when the slow-consumer policy dropped it).
    fn count_compressed(&mut self, compressed: bool, sent: Sent) -> Sent {
        if compressed && sent == Sent::Queued {
            self.compressor.metrics.messages_out += 1;
        }
        sent
    }

    /// Encodes a message for one connection, straight into its outbound queue (compressed if
    /// the connection negotiated permessage-deflate and compressing is worth it).
    pub fn send(&mut self, to: ConnId, opcode: OpCode, payload: &[u8]) -> Sent {
        let negotiated = self
            .conns
            .get_mut(to.slot as usize)
            .filter(|c| c.id == to && c.state() == State::Open)
            .and_then(|c| c.deflate.as_mut());
        if let Some(compressed) =
            negotiated.and_then(|n| self.compressor.compress_for(n, opcode, payload))
        {
            let sent = self.queue(to, compressed.len(), Limit::Apply, |conn, pool| {
                conn.outbound
                    .push_owned_with(compressed.len(), pool, |out| {
                        out.extend_from_slice(&compressed)
                    })
            });
            return self.count_compressed(true, sent);
        }
        let len = frame::header_len(payload.len(), false) + payload.len();
        self.queue(to, len, Limit::Apply, |conn, pool| {
            conn.outbound.push_owned_with(len, pool, |out| {
                frame::encode_into(out, true, opcode, payload, None)
            })
        })
    }

    /// Has the app asked, during this callback, for something the reactor applies only after
    /// it (a close, an answer to a request)? Then the reactor ends the callback before handing
    /// the app another message (`websocket::deliver_whole_messages`).
    pub(super) fn asked_for_more_than_frames(&self) -> bool {
        !self.closes.is_empty() || !self.requests.is_empty()
    }

    /// Asks the reactor to close `conn` with `code` once the callback returns.
    pub fn close(&mut self, conn: ConnId, code: CloseCode, reason: &'static str) {
        self.closes.push((conn, code, reason));
    }

    /// Asks the reactor to call `Handler::on_timer` at `at` (or up to one timer tick after it;
    /// at once if it has passed), without any client event. The reactor keeps ONE app timer:
    /// the earliest time asked for wins, and asking for a later one than is already set changes
    /// nothing. The timer is spent when it fires, so the app asks again for its next time. An
    /// app that never asks costs the loop nothing (no wake-ups).
    pub fn wake_at(&mut self, at: Instant) {
        if self.wake.is_none_or(|earlier| at < earlier) {
            *self.wake = Some(at);
        }
    }

    /// `close`, with a reason worded at run time (at most 123 bytes go on the wire, RFC 6455
    /// §5.5: a longer one is cut at a character boundary).
    pub fn close_with_reason(&mut self, conn: ConnId, code: CloseCode, reason: String) {
        self.requests.closes.push((conn, code, reason));
    }

    /// Answers the `Route::Api` request `conn` is waiting on with a JSON body (SPEC §16). The
    /// reactor writes it once the callback returns, then serves the next request of the
    /// connection, or closes it (`Connection: close`, HTTP/1.0). Ignored if `conn` is gone or
    /// waits for no answer.
    pub fn respond(&mut self, conn: ConnId, status: u16, body: Vec<u8>) {
        self.requests
            .answers
            .push((conn, Answer::Json { status, body }));
    }

    /// Answers the `Route::Api` request `conn` is waiting on with a refusal.
    pub fn refuse(&mut self, conn: ConnId, refusal: Refusal) {
        self.requests.answers.push((conn, Answer::Refused(refusal)));
    }

    /// Encodes an unmasked server frame once, for `send_shared` to many recipients, in one
    /// allocation (`OutboundPool::build_shared`; the simple version is `Transport`'s default).
    pub fn encode_shared(&mut self, opcode: OpCode, payload: &[u8]) -> Rc<[u8]> {
        self.pool
            .build_shared(|out| frame::encode_into(out, true, opcode, payload, None))
    }

    fn queue(
        &mut self,
        to: ConnId,
        len: usize,
        limit: Limit,
        push: impl FnOnce(&mut Connection, &mut OutboundPool),
    ) -> Sent {
        let Some(conn) = live(self.conns, to).filter(|c| c.state() == State::Open) else {
            return Sent::Gone;
        };
        if conn.close_requested {
            return Sent::Closed;
        }
        // SPEC §2 backpressure: the limit applies before queueing, so memory stays bounded by
        // --max-outbound plus one message whatever the consumer does.
        if limit == Limit::Apply
            && conn.outbound.queued_bytes() + len > self.max_outbound
            && !conn.outbound.is_empty()
        {
            return match self.policy {
                SlowConsumer::Drop => {
                    self.metrics.slow_consumer_drops += 1;
                    Sent::Dropped
                }
                SlowConsumer::Close => {
                    // Once per connection: later sends in the same callback find it marked
                    // (the check above).
                    conn.close_requested = true;
                    self.metrics.slow_consumer_closes += 1;
                    self.closes
                        .push((to, CloseCode::POLICY_VIOLATION, "slow consumer"));
                    Sent::Closed
                }
            };
        }
        push(conn, self.pool);
        self.metrics.messages_out += 1;
        if !conn.dirty {
            conn.dirty = true;
            self.dirty.push(to);
        }
        Sent::Queued
    }
}
