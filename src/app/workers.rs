//! What the app serves when it is one of several workers (`--workers` above 1, SPEC §14).
//!
//! Owns: `WorkerApp`, the `App` of one worker plus its end of the bus for raw rooms
//! (`raw_bus.rs`): it tells the bus when a raw room gains its first member here or loses its
//! last, hands it every raw-room message relayed here, and delivers what other workers relayed.
//! `/ws` is the `App`'s own, on the workers' engine bus (`engine/bus/`), which the hub reaches
//! through the engine seam like any engine: its streams' homes answer through the same waker.
//! The server API's questions about connections (presence, rooms, ids, disconnect) are asked
//! of every worker through `gather.rs` and answered for the whole process; its publishes are
//! the hub's, on the engine bus like a client's.
//! Does not: carry anything itself (`raw_bus.rs`, `gather.rs` and `engine/bus/` do), or know
//! room members (the hub does).

use super::gather::{self, Gathers};
use super::raw_bus::{BusEnds, RawBus};
use super::{App, Session};
use crate::protocol::frame::OpCode;
use crate::protocol::handshake::Request;
use crate::protocol::Refusal;
use crate::server::{ConnId, Handler, Outbox, Route};
use std::cell::RefCell;
use std::rc::Rc;
use std::time::Instant;

/// One worker's app: the `App` (on its `BusEngine`), its end of the bus for raw rooms, and
/// the server API's questions it is gathering from the other workers.
pub struct WorkerApp {
    app: App,
    /// Shared with the hub's raw outlet (a closure that publishes on it). Never borrowed across
    /// a call into the app, so the outlet can always borrow it.
    bus: Rc<RefCell<RawBus>>,
    gathers: Gathers,
    /// The loop iteration's time (`set_now`): the gathers' deadlines are counted from it.
    now: Instant,
}

impl WorkerApp {
    pub fn new(mut app: App, ends: BusEnds, api: gather::Link) -> WorkerApp {
        let bus = Rc::new(RefCell::new(RawBus::new(ends)));
        let outlet = Rc::clone(&bus);
        app.set_raw_outlet(Box::new(move |room, opcode, payload| {
            outlet.borrow_mut().publish(room, opcode, payload);
        }));
        WorkerApp {
            app,
            bus,
            gathers: Gathers::new(api),
            now: Instant::now(),
        }
    }

    /// Answers or refuses what `gathers` settled, and asks to be woken at the next deadline.
    fn settle(&mut self, settled: Vec<gather::Settled>, out: &mut Outbox<'_>) {
        for settled in settled {
            self.app.api_settled(settled, out);
        }
        if let Some(at) = self.gathers.next_deadline() {
            out.wake_at(at);
        }
    }
}

// Every method of `Handler` is forwarded, the defaulted ones included: a default left in place
// here would silently replace the `App`'s own behaviour (its clock, its wake-ups).
impl Handler for WorkerApp {
    type Session = Session;

    fn set_now(&mut self, now: Instant) {
        self.now = now;
        self.app.set_now(now);
    }

    fn route(&mut self, conn: ConnId, request: &Request) -> Route<Session> {
        self.app.route(conn, request)
    }

    /// The server API: the hub answers or refuses the request, or submits its publish; a
    /// question about connections is asked of every worker (`gather.rs`) and answered once
    /// their parts are in.
    fn on_request(
        &mut self,
        conn: ConnId,
        request: &Request,
        body: Result<&[u8], Refusal>,
        out: &mut Outbox<'_>,
    ) {
        let Some(query) = self.app.api_take(conn, request, body, out) else {
            return;
        };
        let own = self.app.api_part(&query, out);
        match self.gathers.start(conn, query, own, self.now) {
            Ok(deadline) => out.wake_at(deadline),
            Err(settled) => self.settle(vec![settled], out),
        }
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
        let app = &mut self.app;
        let settled = self.gathers.receive(|query| app.api_part(query, out));
        self.settle(settled, out);
        self.app.on_wake(out);
    }

    /// The app's own timer, or a gather's deadline: the reactor keeps one app timer, the
    /// earliest asked for, so each side checks what is due and asks again for its next time.
    fn on_timer(&mut self, out: &mut Outbox<'_>) {
        let settled = self.gathers.expire(self.now);
        self.settle(settled, out);
        self.app.on_timer(out);
    }

    fn render_metrics(&self, out: &mut String) {
        self.app.render_metrics(out);
        self.gathers.render_metrics(out);
    }

    fn stats(&self, out: &mut Vec<(&'static str, u64)>) {
        self.app.stats(out);
    }

    fn health(&self) -> Option<String> {
        self.app.health()
    }
}

/// Worker 0 of two, a real reactor on a thread of the test over loopback sockets, on every
/// poller; worker 1 is never started and stands for one that is stuck.
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::app::{raw_bus, AppConfig};
    use crate::engine::{self, Now};
    use crate::poller::{MioPoller, PollPoller, Poller, SelectPoller};
    use crate::server::workers::Shared;
    use crate::server::{Config, Reactor};
    use std::io::{self, BufRead, BufReader, Read, Write};
    use std::net::{SocketAddr, TcpStream};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{mpsc, Arc};
    use std::time::Duration;

    const KEY: &str = "k";
    const DEADLINE: Duration = Duration::from_secs(10);

    /// One HTTP/1.1 request on `s`: (status, head, body).
    fn call(s: &mut BufReader<TcpStream>, path: &str) -> (u16, String, String) {
        write!(
            s.get_mut(),
            "GET {path} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {KEY}\r\n\r\n"
        )
        .unwrap();
        let mut head = String::new();
        loop {
            let mut line = String::new();
            assert!(s.read_line(&mut line).unwrap() > 0, "closed: {head}");
            if line == "\r\n" {
                break;
            }
            head.push_str(&line);
        }
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .expect("Content-Length")
            .parse()
            .unwrap();
        let mut body = vec![0; length];
        s.read_exact(&mut body).unwrap();
        let status = head[9..12].parse().unwrap();
        (status, head, String::from_utf8(body).unwrap())
    }

    #[test]
    fn a_question_a_worker_does_not_answer_is_refused_with_503_at_the_deadline() {
        unanswered(MioPoller::new);
        unanswered(PollPoller::new);
        unanswered(SelectPoller::new);
    }

    fn unanswered<P: Poller + 'static>(make: fn() -> io::Result<P>) {
        let shared = Shared::new(2, 100);
        let mut buses = raw_bus::build(&shared).unwrap();
        let wakers = buses[0].0.wakers();
        let wakes: Vec<engine::Wake> = wakers
            .iter()
            .map(|w| {
                let w = w.clone();
                Arc::new(move || w.wake()) as engine::Wake
            })
            .collect();
        let now = Now {
            instant: Instant::now(),
            unix_ms: 0,
        };
        let mut engine_links = engine::bus::links(wakes, now);
        let mut api_links = gather::links(wakers);
        // Worker 1's ends stay here, unread, until the test is over.
        let (ends, wake) = buses.remove(0);
        let (engine_link, api_link) = (engine_links.remove(0), api_links.remove(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (addr_tx, addr_rx) = mpsc::channel::<SocketAddr>();
        let (stopped, slot) = (Arc::clone(&stop), shared.slot(0));
        let thread = std::thread::spawn(move || {
            let config = AppConfig {
                api_key: Some(KEY.as_bytes().to_vec()),
                ..AppConfig::default()
            };
            let engine = engine::bus::BusEngine::new(
                engine_link,
                crate::app::limits(&config),
                crate::app::room_history_limits(&config),
                crate::app::dedup(&config),
                now,
            );
            let app = App::with_engine(config, Box::new(engine));
            let app = WorkerApp::new(app, ends, api_link);
            let listen = SocketAddr::from(([127, 0, 0, 1], 0));
            let config = Config {
                listen,
                ..Config::default()
            };
            let mut r = Reactor::bind(make().unwrap(), app, config).unwrap();
            r.watch_waker(wake).unwrap();
            r.join_workers(slot);
            addr_tx.send(r.local_addr()).unwrap();
            while !stopped.load(Ordering::Acquire) {
                assert!(r.turn().unwrap().is_none());
            }
        });
        let addr = addr_rx.recv_timeout(DEADLINE).unwrap();
        let tcp = TcpStream::connect(addr).unwrap();
        tcp.set_read_timeout(Some(DEADLINE)).unwrap();
        let mut api = BufReader::new(tcp);
        let began = Instant::now();
        let (status, head, body) = call(&mut api, "/api/rooms");
        let waited = began.elapsed();
        assert_eq!(status, 503, "{head}{body}");
        assert!(
            waited >= gather::GATHER_DEADLINE && waited < DEADLINE,
            "answered after {waited:?}"
        );
        assert!(head.contains("\r\nRetry-After: 1\r\n"), "{head}");
        assert!(body.contains("worker(s) [1]"), "{body}");
        // The connection is still served, and what needs no other worker is answered at once.
        let (status, _, body) = call(&mut api, "/api/presence");
        assert_eq!(status, 400, "{body}");
        // The refusal is counted (this scrape waits for worker 1 too, and says it is missing).
        let (status, _, metrics) = call(&mut api, "/metrics");
        assert_eq!(status, 200);
        for line in [
            "wsrelay_api_workers_unanswered_total 1\n",
            "wsrelay_api_requests_total{endpoint=\"rooms\",status=\"503\"} 1\n",
            "wsrelay_workers_missing 1\n",
        ] {
            assert!(metrics.contains(line), "no {line} in\n{metrics}");
        }
        stop.store(true, Ordering::Release);
        shared_wake(&buses[0].0);
        thread.join().unwrap();
    }

    /// Rings worker 0 (through any worker's ends: every one holds every door).
    fn shared_wake(ends: &raw_bus::BusEnds) {
        ends.wakers()[0].wake();
    }
}
