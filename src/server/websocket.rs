//! WebSocket events of an open connection, and the calls into the app.
//!
//! Owns: running a connection's `FrameReader` over one read (`on_frames`), what each event
//! means (`on_event`: messages to the app, Pongs for Pings, the close handshake), and every call
//! into the `Handler` with its `Outbox` (`call_app`; `on_wake` when the engine's waker fires),
//! including the closes the app asks for.
//! Does not: decode frames (`protocol::decoder`), or write (`flush.rs`).

use super::connection::{ConnId, Deadline, State};
use super::handler::Outbox;
use super::metrics::Metrics;
use super::{live, Handler, Reactor, TimerEvent};
use crate::poller::Poller;
use crate::protocol::decoder::{FrameReader, Input};
use crate::protocol::error::ProtocolError;
use crate::protocol::frame::{self, OpCode};
use crate::protocol::message::Event;
use crate::protocol::CloseCode;
use log::debug;
use std::time::Instant;

impl<P: Poller, H: Handler> Reactor<P, H> {
    /// Reads the WebSocket frames in `bytes` (one read, or what the client pipelined behind its
    /// request) with the connection's `FrameReader`, and handles every event.
    ///
    /// After our Close (the app closed the connection, or it became a slow consumer) the rest of
    /// `bytes` is still read, frame by frame, to find the peer's Close (RFC 6455 §5.5.1): the
    /// next read then starts on a frame boundary, never in the middle of a frame.
    pub(super) fn on_frames(&mut self, id: ConnId, bytes: &mut [u8]) {
        let max_message = self.config.max_message;
        let Some(conn) = self.conn_mut(id) else {
            return;
        };
        // The reader is lent out of the connection while its events are handled: an event may
        // borrow it, and handling one needs the whole reactor (the app, other connections). A
        // connection at rest holds none: it gets a fresh one (`reader_slot.rs`).
        let rsv1_allowed = conn.deflate.is_some();
        let mut reader = conn.reader.take(max_message, rsv1_allowed);
        let mut input = Input::new(bytes);
        loop {
            let Some(conn) = self.conn_mut(id) else {
                return; // closed: the reader goes with it
            };
            match conn.state() {
                // A run only where the next frame can start one: a compressed message, a
                // control frame or a fragment would otherwise pay a call into the app that
                // hands it nothing, before `next_event` takes it.
                State::Open if reader.may_take_whole_message(&input) => {
                    match self.deliver_whole_messages(id, &mut reader, &mut input) {
                        // The read ended with the run (the usual case): nothing is left to look at.
                        // A reader handed nothing more has nothing to change (nor would our Close:
                        // the next read finds the state and tells the reader, as below).
                        Ok(true) if input.is_empty() => break,
                        // The app may have closed the connection: its state is looked at again.
                        Ok(true) => continue,
                        // The next frame (if any) is not a whole one-frame message.
                        Ok(false) => {}
                        Err(e) => {
                            self.protocol_error(id, e);
                            break;
                        }
                    }
                }
                State::Open => {}
                State::Closing => reader.await_close(),
                State::Handshaking | State::HttpResponding { .. } | State::Closed => break,
                State::Failing => break,
            }
            match reader.next_event(&mut input) {
                Ok(Some(event)) => self.on_event(id, event),
                Ok(None) => break,
                Err(e) => {
                    self.protocol_error(id, e);
                    break;
                }
            }
        }
        if let Some(conn) = self.conn_mut(id) {
            conn.reader.put(reader);
        }
    }

    /// Hands the whole one-frame messages at the front of `input` (the reader's fast path,
    /// `FrameReader::next_whole_message`) to the app in one callback, however many arrived in
    /// a row: the set-up of a call into the app (`call_app`, its `Outbox`) is paid once per
    /// run instead of once per message, which on a batched echo was a tenth of the server's
    /// instructions (docs/benchmarks.md, "A fast path for whole small frames").
    ///
    /// The run stops before the next message as soon as the app asked for something the
    /// reactor applies after a callback (a close, an answer to a request): the next message
    /// then sees its effect (the connection closing) exactly as when every message had a
    /// callback of its own. Whatever is not such a message is left to `next_event`. Returns
    /// whether a message was delivered.
    fn deliver_whole_messages(
        &mut self,
        id: ConnId,
        reader: &mut FrameReader,
        input: &mut Input<'_>,
    ) -> Result<bool, ProtocolError> {
        let mut delivered = false;
        let mut failed = None;
        self.call_app(id, |app, slot, out| {
            // No session: the connection is not open for the app, and `next_event` consumes
            // the messages (handing them to nobody).
            let Some(session) = slot.as_mut() else {
                return;
            };
            loop {
                match reader.next_whole_message(input) {
                    Ok(Some((opcode, message))) => {
                        out.metrics.messages_in += 1;
                        delivered = true;
                        app.on_message(id, session, opcode, message, out);
                        if out.asked_for_more_than_frames() {
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
        });
        match failed {
            Some(e) => Err(e),
            None => Ok(delivered),
        }
    }

    /// Handles one event of an open or closing connection.
    fn on_event(&mut self, id: ConnId, event: Event<'_>) {
        let Some(conn) = live(&mut self.conns, id) else {
            return;
        };
        let open = conn.state() == State::Open;
        match event {
            Event::Message {
                opcode,
                data,
                compressed,
            } => {
                self.metrics.messages_in += 1;
                if compressed {
                    self.deliver_compressed(id, opcode, &data);
                } else {
                    self.deliver(id, opcode, &data);
                }
            }
            Event::Ping(payload) => {
                // RFC 6455 §5.5.2: a Pong carries the Ping's payload. Not after our Close.
                if open {
                    self.queue_control(id, OpCode::Pong, payload);
                }
                self.check_outbound(id);
            }
            // Unsolicited Pongs are allowed and ignored (§5.5.3); any bytes prove liveness.
            Event::Pong(_) => {}
            Event::Close(close) => {
                let code = close.as_ref().map(|c| c.code);
                Metrics::bump_code(
                    &mut self.metrics.closes_received,
                    code.map_or(CloseCode::NO_STATUS.0, |c| c.0),
                );
                if open {
                    // RFC 6455 §5.5.1: answer with a Close, echoing the status code.
                    let reply = code.map_or_else(Vec::new, |code| frame::close_payload(code, ""));
                    if let Some(code) = code {
                        Metrics::bump_code(&mut self.metrics.closes_sent, code.0);
                    }
                    self.queue_control(id, OpCode::Close, &reply);
                    debug!("{id:?} peer closed ({code:?}), answered");
                } else {
                    debug!("{id:?} close handshake complete");
                }
                let close_deadline = self.now + self.config.close_timeout;
                if let Some(conn) = live(&mut self.conns, id) {
                    conn.close_received();
                    if open {
                        // The heartbeat no longer applies: the peer has until the close
                        // deadline to take our reply, or the socket is closed anyway.
                        conn.set_deadline(&mut self.timers, close_deadline, Deadline::Close);
                    }
                }
                // The server closes TCP first once both Close frames are out (RFC 6455
                // §7.1.1): `after_flush` does, at the end of this iteration.
                self.mark_dirty(id);
                self.closed_for_app(id);
            }
        }
    }

    /// Calls into the app with the connection's session slot and an `Outbox`, then applies the
    /// closes the app asked for. The slot is `Some` exactly while the connection is open for
    /// the app.
    pub(super) fn call_app(
        &mut self,
        id: ConnId,
        call: impl FnOnce(&mut H, &mut Option<H::Session>, &mut Outbox<'_>),
    ) {
        let slot = id.slot as usize;
        if self.sessions.len() <= slot {
            self.sessions.resize_with(slot + 1, || None);
        }
        self.with_outbox(|app, sessions, out| call(app, &mut sessions[slot], out));
    }

    /// The engine's waker fired (SPEC §13: an engine's answers come back through a channel and
    /// the reactor's waker): empty it first (`poller/waker.rs` says why in that order), then
    /// let the app act on what the other thread left for it, with an `Outbox` for its sends.
    pub(super) fn on_wake(&mut self) {
        if let Some(waker) = self.waker.as_mut() {
            waker.drain();
        }
        // With `--workers`, the same waker brings other workers' scrape messages (`scrape.rs`).
        self.take_scrape_messages();
        self.with_outbox(|app, _, out| app.on_wake(out));
    }

    /// The app's timer fired (`Outbox::wake_at`): it is spent, and the app decides what is due
    /// and asks again for its next time.
    pub(super) fn on_app_timer(&mut self) {
        self.app_timer = None;
        self.with_outbox(|app, _, out| app.on_timer(out));
    }

    /// Keeps the earliest time the app asked for as the reactor's one app timer: an earlier
    /// request replaces the armed timer, a later one is dropped (the app asks again when the
    /// earlier one fires and it still has something due later).
    fn set_app_timer(&mut self, at: Instant) {
        if let Some((armed, handle)) = self.app_timer {
            if armed <= at {
                return;
            }
            self.timers.cancel(handle);
        }
        let handle = self.timers.arm(at, TimerEvent::App);
        self.app_timer = Some((at, handle));
    }

    /// The one way into the app: builds the `Outbox` (every callback gets the same limits and
    /// the same compressor), runs `call`, then ends the callback's compressed-frame cache and
    /// applies the closes the app asked for.
    #[inline]
    fn with_outbox(
        &mut self,
        call: impl FnOnce(&mut H, &mut [Option<H::Session>], &mut Outbox<'_>),
    ) {
        let mut out = Outbox {
            conns: &mut self.conns,
            metrics: &mut self.metrics,
            dirty: &mut self.dirty,
            closes: &mut self.close_requests,
            pool: &mut self.outbound_pool,
            max_outbound: self.config.max_outbound,
            policy: self.config.slow_consumer,
            compressor: &mut self.compressor,
            wake: &mut self.app_wake,
            requests: &mut self.app_requests,
        };
        call(&mut self.handler, &mut self.sessions, &mut out);
        self.compressor.end_of_callback();
        if let Some(at) = self.app_wake.take() {
            self.set_app_timer(at);
        }
        if !self.app_requests.is_empty() {
            self.apply_app_requests();
        }
        if !self.close_requests.is_empty() {
            self.apply_close_requests();
        }
    }

    /// Hands a data message to the app, with an `Outbox` for its replies.
    fn deliver(&mut self, id: ConnId, opcode: OpCode, message: &[u8]) {
        self.call_app(id, |app, slot, out| {
            if let Some(session) = slot.as_mut() {
                app.on_message(id, session, opcode, message, out);
            }
        });
    }

    /// Inflates a compressed message (RSV1, RFC 7692 §6.2) and hands it to the app. Bounded by
    /// `--max-message` after decompression (1009), its data checked (1007) (SPEC §17).
    fn deliver_compressed(&mut self, id: ConnId, opcode: OpCode, compressed: &[u8]) {
        let limit = self.config.max_message;
        let Some(mut negotiated) = self.conn_mut(id).and_then(|c| c.deflate.take()) else {
            // The reader allows RSV1 only once the extension is negotiated.
            self.protocol_error(id, ProtocolError::ReservedBits);
            return;
        };
        let result = self
            .compressor
            .inflate(&mut negotiated, opcode, compressed, limit);
        if let Some(conn) = self.conn_mut(id) {
            conn.deflate = Some(negotiated);
        }
        match result {
            // The app gets a plain slice, as for any message; the buffer goes back after.
            Ok(message) => {
                self.deliver(id, opcode, &message);
                self.compressor.give_back(message);
            }
            Err(e) => self.protocol_error(id, e),
        }
    }

    /// The connection stops being open for the app (it is closing or gone): `on_close`, once.
    pub(super) fn closed_for_app(&mut self, id: ConnId) {
        self.call_app(id, |app, slot, out| {
            if let Some(session) = slot.take() {
                app.on_close(id, session, out);
            }
        });
    }

    /// Applies the closes the app asked for. Closing one connection tells the app, which may
    /// ask for more closes (a slow member's departure announced to other slow members): those
    /// are applied by the outermost call's loop, not by recursion, so the depth stays constant.
    fn apply_close_requests(&mut self) {
        if self.applying_closes {
            return;
        }
        self.applying_closes = true;
        while let Some((id, code, reason)) = self.close_requests.pop() {
            self.start_close(id, code, reason);
        }
        self.applying_closes = false;
    }

    /// Applies what the app asked beyond frames: answers to its HTTP requests
    /// (`http::apply_answers`) and closes with reasons of its own wording.
    fn apply_app_requests(&mut self) {
        let mut requests = std::mem::take(&mut self.app_requests);
        self.apply_answers(&mut requests.answers);
        for (id, code, reason) in requests.closes.drain(..) {
            self.start_close(id, code, &reason);
        }
        // Keep the storage; anything added meanwhile (closing tells the app, which may act)
        // goes through the next callback's application.
        if self.app_requests.is_empty() {
            self.app_requests = requests;
        }
    }

    /// Applies the slow-consumer policy to what the reactor itself queued (Pongs, SPEC §2).
    fn check_outbound(&mut self, id: ConnId) {
        let limit = self.config.max_outbound;
        let Some(conn) = self.conn_mut(id) else {
            return;
        };
        if conn.outbound.queued_bytes() <= limit {
            return;
        }
        // Control replies (pongs) are not droppable: a peer that floods pings without reading
        // is a slow consumer whatever the policy.
        self.metrics.slow_consumer_closes += 1;
        debug!("{id:?} exceeded --max-outbound; closing 1008");
        self.start_close(id, CloseCode::POLICY_VIOLATION, "slow consumer");
    }
}
