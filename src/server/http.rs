//! The HTTP side of a connection: the request head, the upgrade, plain answers, and the
//! reactor's own endpoints (health, stats, metrics).
//!
//! Owns: `on_request_bytes` (parse, validate an upgrade, act on the app's `Route`), `open` (the
//! 101 and the frames pipelined behind the request), `refuse`/`respond`/`answer` (a complete
//! HTTP response, then the write side is shut), and rendering the reactor's endpoints.
//! Does not: parse HTTP or word a refusal (`protocol::handshake`, `protocol::refusal`), or map
//! paths to endpoints: the app's `Handler::route` does that for every path, the reactor's own
//! included (docs/architecture.md, "Routing").

use super::compression::Negotiated;
use super::connection::{ConnId, Deadline, State};
use super::metrics::{Gauges, Metrics};
use super::{live, Handler, Reactor, Route, ServerEndpoint};
use crate::poller::Poller;
use crate::protocol::deflate::{self, DeflateParams};
use crate::protocol::handshake;
use crate::protocol::Refusal;
use log::debug;

impl<P: Poller, H: Handler> Reactor<P, H> {
    /// Looks for a complete request head in `request`, and answers it once it is complete: an
    /// upgrade, a refusal, or whatever the app's router decides (`Handler::route`). Returns
    /// false if the connection was closed.
    pub(super) fn on_request_bytes(&mut self, id: ConnId) -> bool {
        let Some(conn) = self.conn_mut(id) else {
            return false;
        };
        let (request, head_len) = match handshake::parse_request(&conn.request) {
            Ok(Some(parsed)) => parsed,
            Ok(None) => return true,
            Err(refusal) => {
                self.refuse(id, &refusal);
                return true;
            }
        };
        // An upgrade attempt must follow RFC 6455 §4.2.1 wherever it goes, and is checked before
        // the app sees it: the app's admission (tokens, Origin, its counters) then only ever
        // runs on well-formed upgrades.
        let accept = if request.is_upgrade_attempt() {
            match handshake::validate_upgrade(&request) {
                Ok(valid) => Some(valid.accept),
                Err(refusal) => {
                    self.refuse(id, &refusal);
                    return true;
                }
            }
        } else {
            None
        };
        match (self.handler.route(id, &request), accept) {
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
                self.open(id, session, response, head_len, deflate)
            }
            (Route::Upgrade { .. }, None) => {
                self.refuse(id, &Refusal::NotWebSocket);
                true
            }
            // RFC 7230 §6.7: a server may ignore Upgrade and answer in HTTP/1.1; a plain
            // resource answers the same whether or not the client asked to upgrade.
            (Route::Server(endpoint), _) => {
                self.serve(id, endpoint);
                true
            }
            (Route::Resource(response), _) => {
                self.respond(id, 200, response);
                true
            }
            (Route::Refuse(refusal), _) => {
                self.refuse(id, &refusal);
                true
            }
        }
    }

    /// Answers one of the reactor's own endpoints; only the reactor holds what they report.
    fn serve(&mut self, id: ConnId, endpoint: ServerEndpoint) {
        let response = match endpoint {
            ServerEndpoint::Health => {
                handshake::http_response(200, "text/plain; charset=utf-8", &[], b"ok\n")
            }
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
        self.respond(id, 200, response);
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
        conn.last_activity = self.now;
        conn.set_deadline(&mut self.timers, heartbeat, Deadline::Heartbeat);
        let mut pipelined = conn.request.split_off(head_len);
        conn.request = Vec::new();
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
    fn respond(&mut self, id: ConnId, status: u16, response: Vec<u8>) {
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
        conn.request = Vec::new();
        conn.set_deadline(&mut self.timers, deadline, Deadline::Close);
        self.mark_dirty(id);
        debug!("{id:?} answered HTTP {status}");
    }

    /// The live counters of the demo page (SPEC §8) as one flat JSON object of numbers (and
    /// the poller's name).
    fn render_stats(&self) -> String {
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
        // With `--workers`, the reactor's counters become the whole process's (SPEC §14: the
        // demo page shows the server, not the worker that happened to answer); the app's
        // figures stay this worker's (docs/operations.md, "Workers").
        if let Some(worker) = &self.worker {
            worker.publish(self.conns.len(), &self.metrics);
            let total = worker.totals();
            for (name, value) in fields.iter_mut() {
                match *name {
                    "connections" => *value = total.connections,
                    "accepted" => *value = total.accepted,
                    "messages_in" => *value = total.messages_in,
                    "messages_out" => *value = total.messages_out,
                    "bytes_in" => *value = total.bytes_in,
                    "bytes_out" => *value = total.bytes_out,
                    _ => {}
                }
            }
            fields.push(("workers", worker.shared().workers() as u64));
            fields.push(("worker", worker.index() as u64));
        }
        let mut json = format!("{{\"poller\":\"{}\"", self.poller.name());
        for (name, value) in fields {
            json.push_str(&format!(",\"{name}\":{value}"));
        }
        json.push('}');
        json
    }

    fn render_metrics(&self) -> String {
        let mut counts = [
            ("handshaking", 0usize),
            ("open", 0),
            ("http", 0),
            ("closing", 0),
        ];
        for (_, conn) in &self.conns {
            let name = conn.state().name();
            if let Some(entry) = counts.iter_mut().find(|(n, _)| *n == name) {
                entry.1 += 1;
            }
        }
        let mut text = self.metrics.render(&Gauges {
            poller: self.poller.name(),
            connections: &counts,
        });
        self.compressor.metrics.render(&mut text);
        self.render_tls_metrics(&mut text);
        self.handler.render_metrics(&mut text);
        if let Some(worker) = &self.worker {
            worker.publish(self.conns.len(), &self.metrics);
            worker.render_metrics(&mut text);
        }
        text
    }
}
