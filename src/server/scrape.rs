//! /metrics and /stats.json for the whole process when it runs several workers (`--workers N`,
//! SPEC §9, §14): the worker that a scrape lands on asks every other worker for its figures,
//! and answers once all have replied, or once `SCRAPE_DEADLINE` has passed.
//!
//! Owns: the scrapes a worker is gathering (`Scrapes`), the questions and answers it exchanges
//! with the other workers through their scrape queues (`workers.rs`), and the deferred HTTP
//! answer (the connection waits, as a request to the server API does, `http.rs`).
//! Does not: merge figures (`totals.rs`), or render a worker's own figures (`http.rs`).
//! With `--workers 1` none of this runs: the one reactor answers from its own figures at once.
//!
//! # One scrape, step by step
//!
//! 1. Worker A routes `GET /metrics` to `ServerEndpoint::Metrics`. The connection now waits
//!    for its answer (no further request is read); A posts one `Ask` to every other worker's
//!    queue, rings that worker's waker, and arms a timer at `SCRAPE_DEADLINE`.
//! 2. Worker B's waker fires. B drains it, takes its queue, renders its own figures (its
//!    reactor's families and its app's, without the per-worker section) and posts them back
//!    to A, ringing A's waker. B does this between two of its own loop iterations' events,
//!    never waiting for anything.
//! 3. A takes the figures as they come. When every worker has answered, A renders its own
//!    figures last (so they are the freshest), merges them all (`totals::merge_metrics`), adds
//!    the per-worker section once, and answers.
//! 4. If the timer fires first, A answers with what it has: `wsrelay_workers_missing` says how
//!    many workers are left out and `wsrelay_worker_missing{worker}` which, and a warning is
//!    logged. A scrape never hangs on a stuck worker. Figures that arrive after are dropped.
//!
//! A worker gathers at most `MAX_SCRAPES` at once; a further one is answered 503 at once, so
//! that a client asking in a loop cannot make the queues grow.

use super::connection::{ConnId, State};
use super::handler::ServerEndpoint;
use super::metrics::Writer;
use super::workers::{Figures, ScrapeMessage};
use super::{live, totals, Handler, Reactor, TimerEvent};
use crate::poller::Poller;
use crate::protocol::handshake;
use crate::timer::TimerHandle;
use log::{debug, warn};
use std::time::Duration;

/// How long a worker waits for the others' figures before it answers without them. A worker
/// answers between two of its loop iterations' events, so anything near this is a worker that
/// is stuck (or a machine that is), which the answer then says.
pub const SCRAPE_DEADLINE: Duration = Duration::from_secs(1);

/// Scrapes one worker may be gathering at once; beyond, 503.
pub const MAX_SCRAPES: usize = 16;

/// The scrapes this worker is gathering.
#[derive(Default)]
pub(super) struct Scrapes {
    /// Numbers this worker's scrapes; late figures for a finished one find no match. It wraps
    /// after 2^32 scrapes, harmlessly: an id is only compared with the at most `MAX_SCRAPES`
    /// scrapes gathered in the last `SCRAPE_DEADLINE`.
    next_id: u32,
    gathering: Vec<Scrape>,
}

/// One scrape being gathered.
struct Scrape {
    id: u32,
    /// The connection waiting for the answer.
    conn: ConnId,
    endpoint: ServerEndpoint,
    /// Each worker's figures, by index, as they arrive (this worker's own stays `None` until
    /// the answer is rendered).
    figures: Vec<Option<Figures>>,
    timer: TimerHandle,
}

impl Scrape {
    /// Whether every worker but `own` has answered.
    fn complete(&self, own: usize) -> bool {
        self.figures
            .iter()
            .enumerate()
            .all(|(i, f)| i == own || f.is_some())
    }
}

impl<P: Poller, H: Handler> Reactor<P, H> {
    /// Step 1: `conn` asked for `endpoint` (/metrics or /stats.json): ask every other worker
    /// for its figures, and keep the connection waiting for the answer.
    pub(super) fn start_scrape(&mut self, conn: ConnId, endpoint: ServerEndpoint) {
        let Some(worker) = &self.worker else {
            return;
        };
        let (own, workers) = (worker.index(), worker.shared().workers());
        if self.scrapes.gathering.len() >= MAX_SCRAPES {
            let response = handshake::http_response(
                503,
                "text/plain; charset=utf-8",
                &[("Retry-After", "1")],
                b"too many scrapes of this server at once; try again\n",
            );
            self.respond(conn, 503, response);
            return;
        }
        let Some(c) = live(&mut self.conns, conn) else {
            return;
        };
        // The request is served: what the client may send behind it is not (the answer says
        // `Connection: close`), and it is not read past the bound while the answer is pending.
        c.clear_request();
        c.exchange_mut().waiting = true;
        // The scrape's own deadline answers it; the request deadline must not close it first.
        c.cancel_deadline(&mut self.timers);
        let id = self.scrapes.next_id;
        self.scrapes.next_id = id.wrapping_add(1);
        for to in (0..workers).filter(|&i| i != own) {
            worker.post(
                to,
                ScrapeMessage::Ask {
                    from: own,
                    id,
                    endpoint,
                },
            );
        }
        let timer = self
            .timers
            .arm(self.now + SCRAPE_DEADLINE, TimerEvent::Scrape(id));
        let scrape = Scrape {
            id,
            conn,
            endpoint,
            figures: (0..workers).map(|_| None).collect(),
            timer,
        };
        debug!("{conn:?} scrape {id}: asked {} other workers", workers - 1);
        if scrape.complete(own) {
            self.finish_scrape(scrape, false);
        } else {
            self.scrapes.gathering.push(scrape);
        }
    }

    /// Steps 2 and 3: the waker fired; answers what other workers asked, and takes what they
    /// answered. Called right after the waker is drained.
    pub(super) fn take_scrape_messages(&mut self) {
        let Some(worker) = &self.worker else {
            return;
        };
        let own = worker.index();
        for message in worker.take_messages() {
            match message {
                ScrapeMessage::Ask { from, id, endpoint } => {
                    let figures = self.own_figures(endpoint);
                    if let Some(worker) = &self.worker {
                        worker.post(
                            from,
                            ScrapeMessage::Figures {
                                from: own,
                                id,
                                figures,
                            },
                        );
                    }
                }
                ScrapeMessage::Figures { from, id, figures } => {
                    let Some(at) = self.scrapes.gathering.iter().position(|s| s.id == id) else {
                        debug!("scrape {id}: figures of worker {from} came after the answer");
                        continue;
                    };
                    let scrape = &mut self.scrapes.gathering[at];
                    if let Some(slot) = scrape.figures.get_mut(from) {
                        *slot = Some(figures);
                    }
                    if scrape.complete(own) {
                        let scrape = self.scrapes.gathering.swap_remove(at);
                        self.finish_scrape(scrape, false);
                    }
                }
            }
        }
    }

    /// Step 4: scrape `id` has waited `SCRAPE_DEADLINE`.
    pub(super) fn scrape_deadline(&mut self, id: u32) {
        if let Some(at) = self.scrapes.gathering.iter().position(|s| s.id == id) {
            let scrape = self.scrapes.gathering.swap_remove(at);
            self.finish_scrape(scrape, true);
        }
    }

    /// This worker's own figures for `endpoint`, as another worker asks for them.
    fn own_figures(&self, endpoint: ServerEndpoint) -> Figures {
        match endpoint {
            ServerEndpoint::Stats => Figures::Stats(self.local_stats()),
            // Health is never scraped; the metrics are the only other figures.
            ServerEndpoint::Metrics | ServerEndpoint::Health => {
                Figures::Metrics(self.render_local_metrics())
            }
        }
    }

    /// Renders the process's answer from every worker's figures (this one's taken now) and
    /// sends it on the waiting connection, if it is still there.
    fn finish_scrape(&mut self, mut scrape: Scrape, timed_out: bool) {
        let Some(worker) = &self.worker else {
            return;
        };
        let own = worker.index();
        if !timed_out {
            self.timers.cancel(scrape.timer);
        }
        let missing: Vec<usize> = (0..scrape.figures.len())
            .filter(|&i| i != own && scrape.figures[i].is_none())
            .collect();
        if !missing.is_empty() {
            warn!(
                "{} of the process: worker(s) {missing:?} did not answer within {SCRAPE_DEADLINE:?}; \
                 the totals leave them out (wsrelay_workers_missing)",
                endpoint_path(scrape.endpoint)
            );
        }
        scrape.figures[own] = Some(self.own_figures(scrape.endpoint));
        // The answering worker's figures first: their order of families and fields is kept.
        let order = std::iter::once(own).chain((0..scrape.figures.len()).filter(|&i| i != own));
        let response = match scrape.endpoint {
            ServerEndpoint::Stats => {
                let parts: Vec<Vec<(&'static str, u64)>> = order
                    .filter_map(|i| match scrape.figures[i].take() {
                        Some(Figures::Stats(fields)) => Some(fields),
                        _ => None,
                    })
                    .collect();
                let mut fields = totals::merge_stats(&parts);
                if let Some(worker) = &self.worker {
                    fields.push(("workers", worker.shared().workers() as u64));
                    fields.push(("worker", own as u64));
                }
                fields.push(("workers_missing", missing.len() as u64));
                handshake::http_response(
                    200,
                    "application/json",
                    &[("Cache-Control", "no-store")],
                    self.stats_json(&fields).as_bytes(),
                )
            }
            ServerEndpoint::Metrics | ServerEndpoint::Health => {
                let texts: Vec<String> = order
                    .filter_map(|i| match scrape.figures[i].take() {
                        Some(Figures::Metrics(text)) => Some(text),
                        _ => None,
                    })
                    .collect();
                let mut text = totals::merge_metrics(texts.iter().map(String::as_str));
                if let Some(worker) = &self.worker {
                    worker.publish(self.conns.len(), &self.metrics);
                    worker.render_metrics(&mut text);
                    render_missing(&mut text, worker.shared().workers(), &missing);
                }
                handshake::http_response(
                    200,
                    "text/plain; version=0.0.4; charset=utf-8",
                    &[],
                    text.as_bytes(),
                )
            }
        };
        let Some(conn) = live(&mut self.conns, scrape.conn) else {
            return;
        };
        if conn.state() != State::Handshaking || !conn.exchange().waiting {
            return;
        }
        conn.exchange_mut().waiting = false;
        self.respond(scrape.conn, 200, response);
    }
}

fn endpoint_path(endpoint: ServerEndpoint) -> &'static str {
    match endpoint {
        ServerEndpoint::Metrics => "/metrics",
        ServerEndpoint::Stats => "/stats.json",
        ServerEndpoint::Health => "/healthz",
    }
}

/// Which workers' figures the totals of this scrape leave out: a count to alert on, and one
/// series per worker (every worker, zeros included, so an alert finds its series).
fn render_missing(out: &mut String, workers: usize, missing: &[usize]) {
    let mut w = Writer::new(out);
    w.gauge(
        "wsrelay_workers_missing",
        "Workers that did not answer this scrape in time: the process totals leave their figures out.",
        missing.len(),
    );
    w.family(
        "wsrelay_worker_missing",
        "gauge",
        "1 for each worker that did not answer this scrape in time.",
    );
    for i in 0..workers {
        w.sample(
            "wsrelay_worker_missing",
            &[("worker", &i.to_string())],
            u8::from(missing.contains(&i)),
        );
    }
}

/// Workers on threads of the test, each on its own listener (so a test picks the worker that
/// answers), over real loopback sockets, on every poller; a worker the test does not start
/// stands for one that is stuck.
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::poller::{waker, MioPoller, PollPoller, SelectPoller};
    use crate::protocol::frame::{self, OpCode};
    use crate::protocol::handshake::Request;
    use crate::server::workers::Shared;
    use crate::server::{Config, Outbox, Route};
    use std::io::{self, Read, Write};
    use std::net::{SocketAddr, TcpStream};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{mpsc, Arc};
    use std::thread::JoinHandle;
    use std::time::Instant;

    const DEADLINE: Duration = Duration::from_secs(10);

    /// The reactor's two scraped endpoints; every other path upgrades and echoes.
    struct Endpoints;

    impl Handler for Endpoints {
        type Session = ();

        fn route(&mut self, _: ConnId, request: &Request) -> crate::server::Route<()> {
            match request.path() {
                "/metrics" => Route::Server(ServerEndpoint::Metrics),
                "/stats.json" => Route::Server(ServerEndpoint::Stats),
                _ => Route::Upgrade {
                    session: (),
                    protocol: None,
                },
            }
        }

        fn on_open(&mut self, _: ConnId, _: &mut (), _: &mut Outbox<'_>) {}

        fn on_message(
            &mut self,
            conn: ConnId,
            _: &mut (),
            opcode: OpCode,
            payload: &[u8],
            out: &mut Outbox<'_>,
        ) {
            out.send(conn, opcode, payload);
        }

        fn on_close(&mut self, _: ConnId, _: (), _: &mut Outbox<'_>) {}
    }

    /// A running worker: its address, and how to stop it.
    struct Worker {
        addr: SocketAddr,
        stop: Arc<AtomicBool>,
        waker: waker::Waker,
        thread: Option<JoinHandle<()>>,
    }

    impl Drop for Worker {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Release);
            self.waker.wake();
            if let Some(thread) = self.thread.take() {
                let _ = thread.join();
            }
        }
    }

    /// Starts worker `index` of `shared` on its own thread (the reactor is built there: it
    /// holds `Rc`s), turning its loop until the `Worker` is dropped.
    fn start<P: Poller + 'static>(
        make: fn() -> io::Result<P>,
        shared: &Arc<Shared>,
        index: usize,
    ) -> Worker {
        let (rx, waker) = waker::pair().unwrap();
        shared.set_waker(index, waker.clone());
        let slot = shared.slot(index);
        let stop = Arc::new(AtomicBool::new(false));
        let (addr_tx, addr_rx) = mpsc::channel();
        let stopped = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let config = Config {
                listen: SocketAddr::from(([127, 0, 0, 1], 0)),
                ..Config::default()
            };
            let mut r = Reactor::bind(make().unwrap(), Endpoints, config).unwrap();
            r.watch_waker(rx).unwrap();
            r.join_workers(slot);
            addr_tx.send(r.local_addr()).unwrap();
            while !stopped.load(Ordering::Acquire) {
                assert_eq!(r.turn().unwrap(), None);
            }
        });
        Worker {
            addr: addr_rx.recv_timeout(DEADLINE).unwrap(),
            stop,
            waker,
            thread: Some(thread),
        }
    }

    fn connect(addr: SocketAddr) -> TcpStream {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        s
    }

    /// `GET path` on a new connection: (status, body), read to the server's close.
    fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        let mut s = connect(addr);
        write!(s, "GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
        let mut raw = String::new();
        s.read_to_string(&mut raw).unwrap();
        let status = raw[9..12].parse().unwrap();
        let body = raw.split_once("\r\n\r\n").unwrap().1.to_string();
        (status, body)
    }

    /// The value of `series` in a Prometheus text; a series that is not there fails the test.
    fn sample(text: &str, series: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no {series} in\n{text}"))
            .parse()
            .unwrap()
    }

    /// The value of `field` in /stats.json; a field that is not there fails the test.
    fn field(json: &str, name: &str) -> u64 {
        let key = format!("\"{name}\":");
        let at = json
            .find(&key)
            .unwrap_or_else(|| panic!("no {name} in {json}"))
            + key.len();
        let digits: String = json[at..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().unwrap()
    }

    /// Upgrades on `addr`, sends `count` messages and reads their echoes (so the worker has
    /// counted them before the test scrapes).
    fn echo(addr: SocketAddr, count: usize) -> TcpStream {
        let mut s = connect(addr);
        s.write_all(
            b"GET /echo HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        .unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut byte).unwrap();
            head.push(byte[0]);
        }
        assert!(head.starts_with(b"HTTP/1.1 101"));
        for i in 0..count {
            let payload = format!("m{i}");
            let mut out = Vec::new();
            frame::encode_into(
                &mut out,
                true,
                OpCode::Text,
                payload.as_bytes(),
                Some([1, 2, 3, 4]),
            );
            s.write_all(&out).unwrap();
            let mut h = [0u8; 2];
            s.read_exact(&mut h).unwrap();
            let mut echoed = vec![0u8; usize::from(h[1] & 0x7f)];
            s.read_exact(&mut echoed).unwrap();
            assert_eq!(echoed, payload.as_bytes());
        }
        s
    }

    #[test]
    fn a_scrape_is_the_process_totals_whichever_worker_answers() {
        totals_on_every_worker(MioPoller::new);
        totals_on_every_worker(PollPoller::new);
        totals_on_every_worker(SelectPoller::new);
    }

    fn totals_on_every_worker<P: Poller + 'static>(make: fn() -> io::Result<P>) {
        let shared = Shared::new(2, 100);
        let workers = [start(make, &shared, 0), start(make, &shared, 1)];
        let _a = echo(workers[0].addr, 2);
        let _b = echo(workers[1].addr, 3);
        for (answering, worker) in workers.iter().enumerate() {
            let (status, text) = get(worker.addr, "/metrics");
            assert_eq!(status, 200);
            assert_eq!(sample(&text, "wsrelay_worker_answering"), answering as f64);
            assert_eq!(sample(&text, "wsrelay_messages_in_total"), 5.0, "{text}");
            assert_eq!(sample(&text, "wsrelay_messages_out_total"), 5.0);
            assert_eq!(sample(&text, "wsrelay_upgrades_total"), 2.0);
            assert_eq!(sample(&text, "wsrelay_connections{state=\"open\"}"), 2.0);
            // A fact of the process is not doubled.
            let poller: Vec<&str> = text
                .lines()
                .filter(|l| l.starts_with("wsrelay_poller_info{"))
                .collect();
            assert!(
                poller.len() == 1 && poller[0].ends_with("} 1"),
                "{poller:?}"
            );
            assert_eq!(sample(&text, "wsrelay_workers_missing"), 0.0);
            assert_eq!(text.matches("# TYPE wsrelay_messages_in_total ").count(), 1);
            let (status, json) = get(worker.addr, "/stats.json");
            assert_eq!(status, 200);
            assert_eq!(field(&json, "messages_in"), 5, "{json}");
            assert_eq!(field(&json, "connections"), 2);
            assert_eq!(field(&json, "worker"), answering as u64);
            assert_eq!(field(&json, "workers_missing"), 0);
        }
    }

    #[test]
    fn a_worker_that_does_not_answer_is_named_not_waited_for() {
        // Worker 1 is never started: asked, it never answers.
        let shared = Shared::new(2, 100);
        let worker = start(MioPoller::new, &shared, 0);
        let _a = echo(worker.addr, 2);
        let began = Instant::now();
        let (status, text) = get(worker.addr, "/metrics");
        let waited = began.elapsed();
        assert_eq!(status, 200);
        assert!(
            waited >= SCRAPE_DEADLINE && waited < DEADLINE,
            "answered after {waited:?}"
        );
        assert_eq!(sample(&text, "wsrelay_workers_missing"), 1.0);
        assert_eq!(sample(&text, "wsrelay_worker_missing{worker=\"1\"}"), 1.0);
        assert_eq!(sample(&text, "wsrelay_worker_missing{worker=\"0\"}"), 0.0);
        // What did answer is there: the answering worker's own figures.
        assert_eq!(sample(&text, "wsrelay_messages_in_total"), 2.0);
        let (status, json) = get(worker.addr, "/stats.json");
        assert_eq!(status, 200);
        assert_eq!(field(&json, "workers_missing"), 1, "{json}");
        assert_eq!(field(&json, "messages_in"), 2);
    }

    #[test]
    fn scrapes_beyond_the_bound_are_refused_at_once() {
        let shared = Shared::new(2, 1000);
        let worker = start(MioPoller::new, &shared, 0);
        // Worker 1 never answers: these wait for the deadline, all at once.
        let mut waiting: Vec<TcpStream> = (0..MAX_SCRAPES)
            .map(|_| {
                let mut s = connect(worker.addr);
                s.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n")
                    .unwrap();
                s
            })
            .collect();
        // Their requests were in the kernel before this one connects: the worker accepts in
        // order and each socket is ready from its registration on, so it reads them first.
        let began = Instant::now();
        let (status, body) = get(worker.addr, "/metrics");
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("too many scrapes"), "{body}");
        assert!(
            began.elapsed() < SCRAPE_DEADLINE,
            "refused only after {:?}",
            began.elapsed()
        );
        for s in &mut waiting {
            let mut raw = String::new();
            s.read_to_string(&mut raw).unwrap();
            assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
        }
    }
}
