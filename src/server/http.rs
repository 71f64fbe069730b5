//! The HTTP side of a connection: the request head, the upgrade, plain answers, and the
//! reactor's own endpoints (health, stats, metrics).
//!
//! Owns: `on_request_bytes` (parse, validate an upgrade, act on the app's `Route`), `open` (the
//! 101 and the frames pipelined behind the request), `refuse`/`respond`/`answer` (a complete
//! HTTP response, then the write side is shut), rendering the reactor's endpoints, and the
//! app's own HTTP requests (`Route::Api`, SPEC §16): bodies by `Content-Length` under a bound,
//! answers that may come in a later callback (`apply_answers`), then HTTP/1.1 keep-alive with
//! pipelined requests served in order (`resume_requests`).
//! Does not: parse HTTP or word a refusal (`protocol::handshake`, `protocol::refusal`), or map
//! paths to endpoints: the app's `Handler::route` does that for every path, the reactor's own
//! included (docs/architecture.md, "Routing").

use super::compression::Negotiated;
use super::connection::{ConnId, Deadline, PendingRequest, State};
use super::handler::Answer;
use super::metrics::{Gauges, Metrics};
use super::{live, Handler, Reactor, Route, ServerEndpoint};
use crate::poller::{Interest, Poller, Token};
use crate::protocol::deflate::{self, DeflateParams};
use crate::protocol::handshake::{self, Request};
use crate::protocol::http_exchange;
use crate::protocol::Refusal;
use log::{debug, warn};
use std::os::fd::AsRawFd;

/// Bytes of further requests a connection may have buffered while the app has not answered
/// its current one; beyond it the connection is not read until the answer comes (the client's
/// writes then wait in TCP's buffers). Pipelining within it costs the server no extra reads.
pub(super) const MAX_PIPELINED_BYTES: usize = super::READ_BUDGET_BYTES;

/// Bytes of answers a kept-alive connection may have queued and unsent (capped further by
/// `--max-outbound`). At or over it, no further request is served and the connection is not
/// read: a client that pipelines and never reads its answers would otherwise make the server
/// hold every answer (docs/api.md, "Connections and limits"). Serving and reading resume from
/// the flush path once the client has read the queue down to half of it.
pub(super) const MAX_QUEUED_ANSWER_BYTES: usize = 256 << 10;

impl<P: Poller, H: Handler> Reactor<P, H> {
    /// Serves the requests in `request`, in order, as they complete: an upgrade, a refusal,
    /// whatever the app's router decides (`Handler::route`), or a request for the app
    /// (`Route::Api`, with its body). Stops at an incomplete request, or while the app has not
    /// answered the last one (answers go out in request order; `resume_requests` comes back).
    /// Returns false if the connection was closed.
    pub(super) fn on_request_bytes(&mut self, id: ConnId) -> bool {
        let open = self.serve_requests(id);
        if let Some(conn) = self.conn_mut(id) {
            conn.compact_request();
        }
        open
    }

    /// The loop of `on_request_bytes`: requests are taken from `Exchange::served` on.
    fn serve_requests(&mut self, id: ConnId) -> bool {
        let answers_bound = self.answers_bound();
        loop {
            let Some(conn) = self.conn_mut(id) else {
                return false;
            };
            if conn.state() != State::Handshaking || conn.exchange().waiting {
                return true;
            }
            if conn.outbound.queued_bytes() >= answers_bound {
                // The client is not reading its answers: serve nothing more, read nothing
                // more, until it does (`MAX_QUEUED_ANSWER_BYTES`; the flush path resumes).
                if !conn.exchange().read_paused {
                    self.metrics.http_output_pauses += 1;
                    self.pause_reading(id);
                }
                return self.conn_mut(id).is_some();
            }
            if let Some(pending) = conn.take_pending() {
                let needed = pending.head_len + pending.framing.as_ref().map_or(0, |f| f.body_len);
                if conn.unserved().len() < needed {
                    conn.exchange_mut().pending = Some(pending);
                    return true;
                }
                self.hand_to_app(id, *pending);
                continue;
            }
            if conn.unserved().is_empty() {
                return true;
            }
            let (request, head_len) = match handshake::parse_request(conn.unserved()) {
                Ok(Some(parsed)) => parsed,
                Ok(None) => return true,
                Err(refusal) => {
                    self.refuse(id, &refusal);
                    return true;
                }
            };
            if !self.on_request_head(id, request, head_len) {
                // Upgraded, answered or refused: nothing more is parsed as a request here.
                return self.conn_mut(id).is_some();
            }
        }
    }

    /// Acts on one complete request head. Returns true if the connection may hold a further
    /// request to serve now (it was handed to the app and is kept alive).
    fn on_request_head(&mut self, id: ConnId, request: Request, head_len: usize) -> bool {
        // An upgrade attempt must follow RFC 6455 §4.2.1 wherever it goes, and is checked before
        // the app sees it: the app's admission (tokens, Origin, its counters) then only ever
        // runs on well-formed upgrades.
        let accept = if request.is_upgrade_attempt() {
            match handshake::validate_upgrade(&request) {
                Ok(valid) => Some(valid.accept),
                Err(refusal) => {
                    self.refuse(id, &refusal);
                    return false;
                }
            }
        } else {
            None
        };
        let route = self.handler.route(id, &request);
        self.on_route(id, route, accept, &request, head_len)
    }

    /// Does what the router decided for a complete request head.
    fn on_route(
        &mut self,
        id: ConnId,
        route: Route<H::Session>,
        accept: Option<String>,
        request: &Request,
        head_len: usize,
    ) -> bool {
        match (route, accept) {
            (Route::Upgrade { session, protocol }, Some(accept)) => {
                // SPEC §17: the first offer we can honour, or none (the 101 then carries no
                // extension and no frame may set RSV1).
                let offers = request.headers("sec-websocket-extensions");
                let deflate = deflate::negotiate(offers, &self.config.compression);
                let extension = deflate.map(|params| params.header_value());
                let response = handshake::upgrade_response_with_extensions(
                    &accept,
                    protocol,
                    extension.as_deref(),
                );
                self.open(id, session, response, head_len, deflate);
                false
            }
            (Route::Upgrade { .. }, None) => {
                self.refuse(id, &Refusal::NotWebSocket);
                false
            }
            // RFC 7230 §6.7: a server may ignore Upgrade and answer in HTTP/1.1; a plain
            // resource answers the same whether or not the client asked to upgrade.
            (Route::Server(endpoint), _) => {
                self.serve(id, endpoint);
                false
            }
            (Route::Resource(response), _) => {
                self.respond(id, 200, response);
                false
            }
            (Route::Refuse(refusal), _) => {
                self.refuse(id, &refusal);
                false
            }
            (Route::Api { max_body }, _) => {
                // The bound and the framing are judged from the head alone: an oversized body
                // is refused before any byte of it is read (docs/api.md, "Limits").
                let framing = http_exchange::framing(request, max_body);
                let pending = PendingRequest {
                    request: request.clone(),
                    head_len,
                    framing,
                };
                let Some(conn) = self.conn_mut(id) else {
                    return false;
                };
                conn.exchange_mut().pending = Some(Box::new(pending));
                true
            }
        }
    }

    /// Hands a complete API request (head and body, or the refusal its framing earned) to the
    /// app, and takes its bytes off the connection's buffer. The connection now waits for the
    /// app's answer, without a deadline: the app answers every request (`Handler::on_request`).
    fn hand_to_app(&mut self, id: ConnId, pending: PendingRequest) {
        let shutting_down = self.shutting_down;
        let Some(conn) = live(&mut self.conns, id) else {
            return;
        };
        let PendingRequest {
            request,
            head_len,
            framing,
        } = pending;
        let body = match &framing {
            Ok(framing) => {
                let body = conn.unserved()[head_len..head_len + framing.body_len].to_vec();
                conn.exchange_mut().served += head_len + framing.body_len;
                if conn.unserved().is_empty() {
                    // SPEC §2: an idle connection holds no buffers.
                    conn.clear_request();
                }
                Ok(body)
            }
            // The bytes behind this head cannot be delimited: nothing more is read from them,
            // and the connection closes after the answer (`http_exchange`, invariant).
            Err(refusal) => {
                conn.clear_request();
                Err(refusal.clone())
            }
        };
        conn.exchange_mut().waiting = true;
        conn.exchange_mut().head_method = request.method() == "HEAD";
        conn.exchange_mut().keep_alive =
            framing.as_ref().is_ok_and(|f| f.keep_alive) && !shutting_down;
        conn.cancel_deadline(&mut self.timers);
        self.call_app(id, |app, _, out| {
            app.on_request(id, &request, body.as_deref().map_err(Clone::clone), out)
        });
    }

    /// Applies the answers the app gave to `Route::Api` requests during a callback: each goes
    /// out on its connection, which then waits for its next request (kept alive) or closes.
    /// Connections with requests already buffered behind the answered one go on the resume
    /// list, served at the end of the loop iteration (`resume_requests`), not from in here:
    /// an answer given inside `on_request_bytes` is followed by its own loop.
    pub(super) fn apply_answers(&mut self, answers: &mut Vec<(ConnId, Answer)>) {
        for (id, answer) in answers.drain(..) {
            let idle_deadline = self.now + self.config.keep_alive_timeout;
            let shutting_down = self.shutting_down;
            let Some(conn) = live(&mut self.conns, id) else {
                continue;
            };
            if conn.state() != State::Handshaking || !conn.exchange().waiting {
                debug!("{id:?}: an answer for no request, ignored");
                continue;
            }
            conn.exchange_mut().waiting = false;
            conn.exchange_mut().answered += 1;
            let keep_alive = conn.exchange().keep_alive && !shutting_down;
            let (status, response) = match answer {
                Answer::Json { status, body } => (
                    status,
                    http_exchange::json_response(status, &body, keep_alive, &[]),
                ),
                Answer::Refused(refusal) => (refusal.status(), refusal.api_response(keep_alive)),
            };
            let response = if conn.exchange().head_method {
                http_exchange::without_body(response)
            } else {
                response
            };
            if !keep_alive {
                self.respond(id, status, response);
                continue;
            }
            Metrics::bump_code(&mut self.metrics.http_responses, status);
            conn.outbound
                .push_owned_with(response.len(), &mut self.outbound_pool, |out| {
                    out.extend_from_slice(&response)
                });
            if conn.unserved().is_empty() {
                conn.set_deadline(&mut self.timers, idle_deadline, Deadline::KeepAlive);
            } else {
                // The next request has begun (or several are pipelined): it has the request
                // deadline to complete, as any request head has.
                let deadline = self.now + self.config.handshake_timeout;
                conn.set_deadline(&mut self.timers, deadline, Deadline::Handshake);
            }
            if !conn.unserved().is_empty() || conn.exchange().read_paused {
                self.http_resume.push(id);
            }
            self.mark_dirty(id);
        }
    }

    /// Serves the requests that waited behind an answer (see `apply_answers`) or behind unsent
    /// answers (see `after_answers_flushed`), and reads again a connection whose reading was
    /// paused meanwhile.
    pub(super) fn resume_requests(&mut self) {
        let answers_bound = self.answers_bound();
        while let Some(id) = self.http_resume.pop() {
            if !self.on_request_bytes(id) {
                continue;
            }
            let Some(conn) = self.conn_mut(id) else {
                continue;
            };
            let exchange = conn.exchange();
            if exchange.peer_done {
                if !exchange.waiting && conn.outbound.queued_bytes() < answers_bound {
                    // Everything the half-closed client sent is answered.
                    self.finish_half_closed(id);
                }
                continue;
            }
            if exchange.read_paused
                && !exchange.waiting
                && conn.outbound.queued_bytes() < answers_bound
            {
                conn.exchange_mut().read_paused = false;
                // A readiness reactor reads now (an edge-triggered poller would not report
                // the bytes that waited); a completion backend's resumed receive brings them.
                if self.set_read_interest(id, true) && !self.poller.completion_based() {
                    self.on_readable(id);
                }
            }
        }
    }

    /// A half-closed client (`Exchange::peer_done`) has all its answers queued: they are
    /// flushed, then the connection closes (`flush::after_flush`), like after a
    /// `Connection: close` answer. Bytes of an incomplete request left behind are dropped.
    fn finish_half_closed(&mut self, id: ConnId) {
        let deadline = self.now + self.config.close_timeout;
        let Some(conn) = live(&mut self.conns, id) else {
            return;
        };
        if !conn.responding(false) {
            return;
        }
        conn.clear_request();
        conn.set_deadline(&mut self.timers, deadline, Deadline::Close);
        self.mark_dirty(id);
    }

    /// The bound on a connection's unsent answers (`MAX_QUEUED_ANSWER_BYTES`).
    pub(super) fn answers_bound(&self) -> usize {
        MAX_QUEUED_ANSWER_BYTES.min(self.config.max_outbound)
    }

    /// Stops reading a kept-alive connection (`Exchange::read_paused`) until `resume_requests`.
    /// Its read interest goes too: a level-triggered poller would otherwise report the socket
    /// readable on every loop iteration while it waits, a busy loop (docs/pollers.md).
    pub(super) fn pause_reading(&mut self, id: ConnId) {
        let Some(conn) = live(&mut self.conns, id) else {
            return;
        };
        conn.exchange_mut().read_paused = true;
        self.set_read_interest(id, false);
    }

    /// Registers the connection for readable readiness or not, keeping its writable interest.
    /// Returns false if the poller refused and the connection was closed.
    fn set_read_interest(&mut self, id: ConnId, readable: bool) -> bool {
        let Some(conn) = live(&mut self.conns, id) else {
            return false;
        };
        if self.poller.completion_based() {
            return self.set_receiving(id, readable);
        }
        let interest = Interest {
            readable,
            writable: conn.write_interest,
        };
        let fd = conn.stream.as_raw_fd();
        if let Err(e) = self.poller.reregister(fd, Token(id.token()), interest) {
            warn!("{id:?} reregister failed: {e}");
            self.close_now(id);
            return false;
        }
        true
    }

    /// `set_read_interest` on a completion backend: there is no read interest to drop, since
    /// the backend receives by itself; its receive is paused or resumed instead
    /// (docs/pollers.md, "Pausing a receive"). Returns false if the poller refused and the
    /// connection was closed.
    fn set_receiving(&mut self, id: ConnId, receiving: bool) -> bool {
        let Some(conn) = live(&mut self.conns, id) else {
            return false;
        };
        let fd = conn.stream.as_raw_fd();
        let result = if receiving {
            self.poller.resume_receive(fd, Token(id.token()))
        } else {
            self.poller.pause_receive(fd)
        };
        if let Err(e) = result {
            // Left as it is, the connection would hear nothing more (or too much).
            warn!("{id:?} pausing or resuming the receive failed: {e}");
            self.close_now(id);
            return false;
        }
        true
    }

    /// The flush path's part in `MAX_QUEUED_ANSWER_BYTES`: once a paused connection's client
    /// has read its answers down to half the bound, serving and reading resume (in
    /// `resume_requests`; half, so that one answer read does not flip it back and forth).
    pub(super) fn after_answers_flushed(&mut self, id: ConnId) {
        let answers_bound = self.answers_bound();
        let Some(conn) = live(&mut self.conns, id) else {
            return;
        };
        let exchange = conn.exchange();
        if exchange.read_paused
            && !exchange.waiting
            && conn.outbound.queued_bytes() <= answers_bound / 2
        {
            self.http_resume.push(id);
        }
    }

    /// Answers one of the reactor's own endpoints; only the reactor holds what they report.
    /// With `--workers` above 1, /metrics and /stats.json report the whole process: the answer
    /// waits for the other workers' figures (`scrape.rs`).
    fn serve(&mut self, id: ConnId, endpoint: ServerEndpoint) {
        if self.worker.is_some() && endpoint != ServerEndpoint::Health {
            self.start_scrape(id, endpoint);
            return;
        }
        // A degraded app (an engine that cannot reach its store, SPEC §15) answers 503, so a
        // load balancer's health check sends new clients to healthy nodes.
        let health = match endpoint {
            ServerEndpoint::Health => self.handler.health(),
            _ => None,
        };
        let status = if health.is_some() { 503 } else { 200 };
        let response = match endpoint {
            ServerEndpoint::Health => match health {
                None => handshake::http_response(200, "text/plain; charset=utf-8", &[], b"ok\n"),
                Some(why) => handshake::http_response(
                    503,
                    "text/plain; charset=utf-8",
                    &[("Cache-Control", "no-store")],
                    format!("degraded: {why}\n").as_bytes(),
                ),
            },
            ServerEndpoint::Stats => handshake::http_response(
                200,
                "application/json",
                &[("Cache-Control", "no-store")],
                self.render_stats().as_bytes(),
            ),
            ServerEndpoint::Metrics => handshake::http_response(
                200,
                "text/plain; version=0.0.4; charset=utf-8",
                &[],
                self.render_metrics().as_bytes(),
            ),
        };
        self.respond(id, status, response);
    }

    /// Completes the upgrade: queues the 101 response, tells the app, and processes frames that
    /// the client pipelined right behind its request (SPEC §3: they are kept, not lost).
    /// `deflate`: the permessage-deflate parameters the 101 states, if any.
    fn open(
        &mut self,
        id: ConnId,
        session: H::Session,
        response: Vec<u8>,
        head_len: usize,
        deflate: Option<DeflateParams>,
    ) -> bool {
        let heartbeat = self.now + self.config.heartbeat_interval;
        let Some(conn) = live(&mut self.conns, id) else {
            return false;
        };
        if !conn.upgraded() {
            return true;
        }
        conn.outbound
            .push_owned_with(response.len(), &mut self.outbound_pool, |out| {
                out.extend_from_slice(&response)
            });
        if let Some(params) = deflate {
            conn.deflate = Some(Negotiated::new(&params));
            conn.reader.allow_rsv1();
        }
        conn.last_activity = self.now_stamp;
        conn.set_deadline(&mut self.timers, heartbeat, Deadline::Heartbeat);
        let mut pipelined = conn.request.split_off(conn.exchange().served + head_len);
        conn.clear_request();
        self.metrics.upgrades += 1;
        debug!("{id:?} upgraded");

        self.call_app(id, |app, slot, out| {
            app.on_open(id, slot.insert(session), out)
        });
        self.mark_dirty(id);

        if !pipelined.is_empty() {
            self.on_frames(id, &mut pipelined);
        }
        self.conn_mut(id).is_some()
    }

    /// Refuses the request: its status and reason go to the client and the logs.
    fn refuse(&mut self, id: ConnId, refusal: &Refusal) {
        debug!("{id:?} refused: {refusal}");
        self.respond(id, refusal.status(), refusal.response());
    }

    /// Queues a complete HTTP response; the connection closes once it is sent and the client
    /// has hung up (or `--close-timeout` passes).
    pub(super) fn respond(&mut self, id: ConnId, status: u16, response: Vec<u8>) {
        self.answer(id, status, response, false);
    }

    /// `respond`, for a connection admitted over `--max-connections` (`over_limit`, counted in
    /// `rejecting` until it closes) or not.
    pub(super) fn answer(&mut self, id: ConnId, status: u16, response: Vec<u8>, over_limit: bool) {
        let deadline = self.now + self.config.close_timeout;
        let Some(conn) = live(&mut self.conns, id) else {
            return;
        };
        if !conn.responding(over_limit) {
            return;
        }
        Metrics::bump_code(&mut self.metrics.http_responses, status);
        conn.outbound
            .push_owned_with(response.len(), &mut self.outbound_pool, |out| {
                out.extend_from_slice(&response)
            });
        conn.clear_request();
        conn.set_deadline(&mut self.timers, deadline, Deadline::Close);
        self.mark_dirty(id);
        debug!("{id:?} answered HTTP {status}");
    }

    /// The live counters of the demo page (SPEC §8) as one flat JSON object of numbers (and
    /// the poller's name).
    fn render_stats(&self) -> String {
        self.stats_json(&self.local_stats())
    }

    /// This reactor's fields of /stats.json: its counters and the app's figures. With
    /// `--workers`, each worker's become the process's (`scrape.rs`, `totals::merge_stats`).
    pub(super) fn local_stats(&self) -> Vec<(&'static str, u64)> {
        let open = self
            .conns
            .iter()
            .filter(|(_, c)| c.state() == State::Open)
            .count() as u64;
        let mut fields: Vec<(&'static str, u64)> = vec![
            ("connections", open),
            ("accepted", self.metrics.accepted),
            ("messages_in", self.metrics.messages_in),
            ("messages_out", self.metrics.messages_out),
            ("bytes_in", self.metrics.bytes_in),
            ("bytes_out", self.metrics.bytes_out),
            ("uptime_ms", self.started.elapsed().as_millis() as u64),
        ];
        self.handler.stats(&mut fields);
        fields
    }

    /// `fields` as the JSON object of /stats.json, after the poller's name.
    pub(super) fn stats_json(&self, fields: &[(&'static str, u64)]) -> String {
        let mut json = format!("{{\"poller\":\"{}\"", self.poller.name());
        for (name, value) in fields {
            json.push_str(&format!(",\"{name}\":{value}"));
        }
        json.push('}');
        json
    }

    fn render_metrics(&self) -> String {
        self.render_local_metrics()
    }

    /// Every family of this reactor (its counters, compression, TLS) and of its app, in the
    /// Prometheus text format. With `--workers`, each worker's become the process's
    /// (`scrape.rs`, `totals::merge_metrics`), and the per-worker section is added once.
    pub(super) fn render_local_metrics(&self) -> String {
        let mut counts = [
            ("handshaking", 0usize),
            ("open", 0),
            ("http", 0),
            ("closing", 0),
        ];
        let mut http_queued_bytes = 0;
        for (_, conn) in &self.conns {
            if conn.state() == State::Handshaking {
                http_queued_bytes += conn.outbound.queued_bytes();
            }
            let name = conn.state().name();
            if let Some(entry) = counts.iter_mut().find(|(n, _)| *n == name) {
                entry.1 += 1;
            }
        }
        let mut text = self.metrics.render(&Gauges {
            poller: self.poller.name(),
            connections: &counts,
            http_queued_bytes,
        });
        self.compressor.metrics.render(&mut text);
        self.render_tls_metrics(&mut text);
        self.handler.render_metrics(&mut text);
        text
    }
}
