//! The reactor: one thread, one loop, every connection.
//!
//! Owns: the listening socket, the slab of connections, the shared receive buffer, the ready
//! list, the timer wheel and the counters; the loop itself (`turn`).
//! Does not: parse WebSocket or HTTP bytes itself (`protocol` does), or know which readiness
//! mechanism it runs on (`Reactor<P: Poller>` is generic, so the epoll path pays nothing for
//! the others).
//!
//! Where to look (each child module holds one `impl Reactor` block for one concern):
//! - `accept.rs`: new connections, the listener's pause and close;
//! - `inbound.rs`: what happens when bytes arrive (the one socket read, EOF, request or frames);
//! - `websocket.rs`: WebSocket events of an open connection, and the calls into the app (also
//!   `on_wake`, when the engine's waker, registered by `watch_waker`, fires; `on_timer`, when
//!   the one app timer the app asked for with `Outbox::wake_at` is due);
//! - `http.rs`: the request head, the upgrade, plain HTTP answers and the reactor's endpoints;
//! - `flush.rs`: what leaves (queueing control frames, the dirty list, the one socket write);
//! - `lifecycle.rs`: deadlines, closing a connection (gracefully or not), signals and shutdown;
//! - `compression.rs`: permessage-deflate's codecs per reactor and per connection;
//! - `tls.rs`: the TLS session inside the one read and the one write, its counters, SIGHUP;
//! - `scrape.rs`: with `--workers`, /metrics and /stats.json gathered from every worker
//!   (`totals.rs` merges them; `workers.rs` is what the workers share);
//! - `completion.rs`: the same reads and writes on a completion backend (`--poller uring`):
//!   finished receives and sends instead of readiness (`Poller::completion_based`);
//! - `connection.rs`: one connection's state machine; `outbound.rs`: its queue; `handler.rs`:
//!   the seam to the app.
//!
//! Socket reads happen in exactly one place (`Reactor::on_readable`) and writes in exactly one
//! (`Reactor::flush`), so that TLS slots in between the socket and the bytes (`tls.rs`).

mod accept;
mod completion;
pub mod compression;
pub mod config;
mod connection;
mod flush;
pub mod handler;
mod heap;
mod http;
mod inbound;
mod lifecycle;
pub mod metrics;
pub mod outbound;
mod reader_slot;
mod request_buf;
mod scrape;
mod signals;
#[cfg(test)]
mod tests;
mod tls;
pub mod totals;
mod websocket;
pub mod workers;

pub use config::Config;
pub use connection::ConnId;
pub use handler::{Answer, Handler, Outbox, Route, Sent, ServerEndpoint, SlowConsumer};

use crate::poller::waker::WakeReceiver;
use crate::poller::{Completion, Event, Interest, Poller, Token};
use crate::protocol::CloseCode;
use crate::timer::{TimerHandle, TimerWheel, DEFAULT_SLOTS};
use crate::tls::ServerTls;
use compression::Compressor;
use connection::{Connection, Deadline, Stamp};
use log::{info, trace};
use metrics::Metrics;
use mio::net::TcpListener;
use outbound::{Outbound, OutboundPool};
use slab::Slab;
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

/// Size of the one receive buffer shared by all connections. Complete frames are parsed straight
/// out of it; only a partial tail is copied into the connection.
const RECV_BUFFER_BYTES: usize = 64 * 1024;

/// Bytes read from one connection per loop iteration before the others get their turn.
const READ_BUDGET_BYTES: usize = 4 * RECV_BUFFER_BYTES;

/// How long the loop must have nothing to do before the outbound pool's spare buffers go back
/// to the allocator (`OutboundPool::release_spares`). Short enough that an idle server holds
/// nothing a moment after a burst; long enough that traffic, which wakes the loop far more
/// often, keeps reusing them.
const SPARES_KEPT_IDLE: Duration = Duration::from_millis(250);

/// Tokens outside the range of `ConnId::token` (no slab slot reaches u32::MAX - 2).
const LISTENER: Token = Token(usize::MAX);
const SIGNALS: Token = Token(usize::MAX - 1);
const WAKER: Token = Token(usize::MAX - 2);
/// SIGHUP: reload the TLS certificate.
const RELOAD: Token = Token(usize::MAX - 3);

/// Why the loop stopped.
#[derive(Debug, PartialEq, Eq)]
pub enum Exit {
    /// Shutdown completed: every connection closed, or the shutdown deadline passed.
    Graceful,
    /// A second signal arrived during shutdown: stop at once.
    Immediate,
}

/// What a timer in the wheel stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TimerEvent {
    /// A connection's deadline; ignored if the connection is gone (generation mismatch).
    Conn(ConnId, Deadline),
    /// The listener was paused on EMFILE/ENFILE; try accepting again.
    AcceptRetry,
    /// Graceful shutdown has waited `--shutdown-timeout`: close what is left.
    ShutdownDeadline,
    /// The time the app asked for with `Outbox::wake_at`: call `Handler::on_timer`.
    App,
    /// A scrape of the whole process (`--workers`) has waited `scrape::SCRAPE_DEADLINE` for
    /// the other workers: answer with what has come (`scrape.rs`). A `u32`, not a `u64`: a
    /// wider id would grow every timer node, and each idle connection has one.
    Scrape(u32),
}

pub struct Reactor<P: Poller, H: Handler> {
    /// The readiness backend (epoll/kqueue, poll or select).
    poller: P,
    /// The application: endpoints, rooms, messaging. Sees `ConnId`s, never sockets.
    handler: H,
    /// The listening socket; `None` once shutdown has begun (closed, so that new clients are
    /// refused at once instead of waiting in the kernel's backlog for an answer that never
    /// comes).
    listener: Option<TcpListener>,
    /// The address bound, kept for `local_addr` after the listener is closed.
    local_addr: SocketAddr,
    /// Whether the listener is registered with the poller (it is paused on descriptor
    /// exhaustion, see `accept_all`).
    listening: bool,
    /// Whether accepted sockets come with `TCP_NODELAY` already (`with_listener`), or `admit`
    /// must set it on each.
    nodelay_inherited: bool,
    /// Every connection, by slot; `ConnId` adds a generation so stale ids miss.
    conns: Slab<Connection>,
    /// How many connections in the slab were admitted only to be refused with 503 (they do
    /// not count toward `--max-connections`).
    rejecting: usize,
    /// The app's per-connection state, indexed by slab slot; `Some` exactly for open
    /// connections. Kept beside the slab (not inside `Connection`) so that a callback can hold a
    /// session and the `Outbox` (which borrows the slab) at the same time.
    sessions: Vec<Option<H::Session>>,
    /// Bumped for every accepted connection, so that ids of closed connections are never reused.
    next_generation: u32,
    /// The one receive buffer of SPEC §2, shared by every connection.
    recv_buf: Box<[u8]>,
    /// Connections that still had input when their read budget ran out: read again in the
    /// next iteration, after that iteration's events (see `turn`). Edge-triggered backends
    /// would not report them again.
    ready: Vec<ConnId>,
    /// The ready list being served; kept between iterations so its storage is reused.
    serving: Vec<ConnId>,
    /// Connections with bytes queued since their last flush (see `Outbox`).
    dirty: Vec<ConnId>,
    /// The dirty list being flushed; kept between iterations so its storage is reused.
    flushing: Vec<ConnId>,
    /// Storage lent to the outbound queues: spare rings, the gather buffer (`OutboundPool`).
    outbound_pool: OutboundPool,
    /// permessage-deflate: the shared codecs, the cache of compressed shared frames, and the
    /// compression counters (SPEC §17).
    compressor: Compressor,
    /// Closes the app asked for during a callback, applied right after it.
    close_requests: Vec<(ConnId, CloseCode, &'static str)>,
    /// Set while `apply_close_requests` runs (see there).
    applying_closes: bool,
    /// Answers to `Route::Api` requests and closes worded by the app, from the last callback.
    app_requests: handler::AppRequests,
    /// Kept-alive connections answered with requests buffered behind the answer (or their
    /// reading paused): served at the end of the iteration (`http::resume_requests`).
    http_resume: Vec<ConnId>,
    /// The readiness events of one wait; kept so its storage is reused.
    events: Vec<Event>,
    /// The completions of one wait (completion backends only); kept so its storage is reused.
    completions: Vec<Completion>,
    /// Completion backends: the queues of connections closed while a send was still lent
    /// their bytes, kept until that send completes (`completion.rs`). A map: a send completes
    /// per connection, and thousands may be closed with sends in flight at once.
    orphans: HashMap<ConnId, Outbound>,
    /// Completion backends, TLS: the records each send in flight was lent, and from where
    /// (`completion.rs`); at most one per connection.
    tls_sends: HashMap<ConnId, (Vec<u8>, usize)>,
    /// Every deadline: per connection, the accept retry, the shutdown deadline.
    timers: TimerWheel<TimerEvent>,
    /// The timers one `expire` handed back; kept so its storage is reused.
    expired: Vec<TimerEvent>,
    /// The app's one timer (`Outbox::wake_at`): when it is due and its handle in `timers`.
    /// `None` while the app has asked for nothing, so an app without deadlines adds no wake-up.
    app_timer: Option<(Instant, TimerHandle)>,
    /// What the app asked for during the current callback; applied right after it.
    app_wake: Option<Instant>,
    /// SIGINT/SIGTERM arrive as bytes on this socket (see `signals.rs`), which every poller can
    /// watch like any other descriptor.
    signals: Option<signals::SignalPipe>,
    /// Another thread (the file engine's storage thread) makes this readable when it has
    /// answers for the app (`poller/waker.rs`).
    waker: Option<WakeReceiver>,
    /// SIGHUP arrives on this one: the TLS certificate and key are read again (`tls.rs`).
    reload_signal: Option<signals::SignalPipe>,
    /// The listener's certificate and the TLS counters, when it speaks TLS (`serve_tls`).
    tls: Option<ServerTls>,
    /// Set once shutdown has begun: no more accepting; the loop ends when the slab is empty.
    shutting_down: bool,
    /// When the last "out of descriptors" warning was logged (they are rate-limited).
    last_accept_warning: Option<Instant>,
    /// The flags this server runs with: limits, timeouts, the slow-consumer policy.
    config: Config,
    /// The counters of /metrics and /stats.json.
    metrics: Metrics,
    /// The time read once per loop iteration; everything in one iteration uses it.
    now: Instant,
    /// When the reactor was created (uptime in /stats.json; the epoch of connections' `Stamp`s).
    started: Instant,
    /// `now` as a connection's `Stamp` (its last activity), computed once per iteration with
    /// `now`: every read stamps its connection, and the subtraction is not free.
    now_stamp: Stamp,
    /// `--workers` above 1: this reactor's handle on what the workers share (the process-wide
    /// connection count and the gauges, `workers.rs`). `None` for the one reactor of
    /// `--workers 1`, which then shares nothing.
    worker: Option<workers::WorkerSlot>,
    /// `--workers` above 1: the process-wide /metrics and /stats.json this worker is gathering
    /// from the others (`scrape.rs`).
    scrapes: scrape::Scrapes,
}

impl<P: Poller, H: Handler> Reactor<P, H> {
    /// Binds the listener and registers it with the poller.
    ///
    /// # Errors
    /// The address is taken or invalid, or the poller refuses the listener.
    pub fn bind(poller: P, handler: H, config: Config) -> io::Result<Reactor<P, H>> {
        let listener = accept::listen(config.listen, false)?;
        Reactor::with_listener(poller, handler, config, TcpListener::from_std(listener))
    }

    /// Like `bind`, on a listening socket bound already (`--workers`: one of the
    /// `SO_REUSEPORT` listeners, `workers.rs`). `config.listen` is not used. A listener with
    /// `TCP_NODELAY` is taken to have had it before `listen`, as `accept::listen` sets it.
    ///
    /// # Errors
    /// The socket cannot be made non-blocking, or the poller refuses it.
    pub fn on_listener(
        poller: P,
        handler: H,
        config: Config,
        listener: std::net::TcpListener,
    ) -> io::Result<Reactor<P, H>> {
        listener.set_nonblocking(true)?;
        Reactor::with_listener(poller, handler, config, TcpListener::from_std(listener))
    }

    fn with_listener(
        mut poller: P,
        handler: H,
        mut config: Config,
        listener: TcpListener,
    ) -> io::Result<Reactor<P, H>> {
        if let Some(limit) = poller.fd_limit() {
            // Descriptors below the listener's are taken by stdio, the poller and the listener
            // itself; every connection needs one more, below the backend's limit.
            // A few more are opened after this point (the signal pipe): keep a margin.
            let cap = limit.saturating_sub(listener.as_raw_fd() as usize + 1 + 8);
            if config.max_connections > cap {
                info!(
                    "the {} poller cannot watch descriptors >= {limit}: capping --max-connections from {} to {cap}",
                    poller.name(),
                    config.max_connections
                );
                config.max_connections = cap;
            }
        }
        let local_addr = listener.local_addr()?;
        // Every reply should leave at once (Nagle off). A listener that has `TCP_NODELAY`
        // already had it set before `listen` (`accept::listen`, which made every listener the
        // server uses): on Linux its connections inherit it, which saves a system call per
        // connection. Otherwise `admit` sets it on each connection.
        let nodelay_inherited = cfg!(target_os = "linux")
            && socket2::SockRef::from(&listener)
                .tcp_nodelay()
                .unwrap_or(false);
        poller.watch_listener(listener.as_raw_fd(), LISTENER)?;
        let now = Instant::now();
        Ok(Reactor {
            poller,
            handler,
            listener: Some(listener),
            local_addr,
            listening: true,
            nodelay_inherited,
            conns: Slab::new(),
            rejecting: 0,
            sessions: Vec::new(),
            next_generation: 0,
            recv_buf: vec![0u8; RECV_BUFFER_BYTES].into_boxed_slice(),
            ready: Vec::new(),
            serving: Vec::new(),
            dirty: Vec::new(),
            flushing: Vec::new(),
            outbound_pool: OutboundPool::default(),
            compressor: Compressor::new(config.compression),
            close_requests: Vec::new(),
            applying_closes: false,
            app_requests: handler::AppRequests::default(),
            http_resume: Vec::new(),
            events: Vec::with_capacity(1024),
            completions: Vec::new(),
            orphans: HashMap::new(),
            tls_sends: HashMap::new(),
            timers: TimerWheel::new(config.timer_tick, DEFAULT_SLOTS, now),
            expired: Vec::new(),
            app_timer: None,
            app_wake: None,
            signals: None,
            waker: None,
            reload_signal: None,
            tls: None,
            shutting_down: false,
            last_accept_warning: None,
            config,
            metrics: Metrics::default(),
            now,
            started: now,
            now_stamp: Stamp::at(now, now),
            worker: None,
            scrapes: scrape::Scrapes::default(),
        })
    }

    /// Makes this reactor one of several workers (SPEC §14): `--max-connections` is then
    /// checked against every worker's connections, and /metrics and /stats.json report the
    /// whole process. Call before `run`.
    pub fn join_workers(&mut self, slot: workers::WorkerSlot) {
        slot.cap(self.config.max_connections);
        slot.publish(self.conns.len(), &self.metrics);
        self.worker = Some(slot);
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn poller_name(&self) -> &'static str {
        self.poller.name()
    }

    /// Routes SIGINT and SIGTERM into the loop: the first starts a graceful shutdown, a second
    /// one ends the loop at once. SIGHUP reloads the TLS certificate (and is only logged without
    /// TLS, rather than ending the server).
    ///
    /// # Errors
    /// A signal pipe could not be created or registered.
    pub fn handle_signals(&mut self) -> io::Result<()> {
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
        let pipe = signals::SignalPipe::new(&[SIGINT, SIGTERM])?;
        self.poller
            .register(pipe.as_raw_fd(), SIGNALS, Interest::READABLE)?;
        self.signals = Some(pipe);
        let reload = signals::SignalPipe::new(&[SIGHUP])?;
        self.poller
            .register(reload.as_raw_fd(), RELOAD, Interest::READABLE)?;
        self.reload_signal = Some(reload);
        Ok(())
    }

    /// Watches `waker`: when another thread makes it readable, the app's `on_wake` runs (SPEC
    /// §13: an engine's answers come back through a channel and the reactor's waker).
    ///
    /// # Errors
    /// The descriptor could not be registered.
    pub fn watch_waker(&mut self, waker: WakeReceiver) -> io::Result<()> {
        self.poller
            .register(waker.as_raw_fd(), WAKER, Interest::READABLE)?;
        self.waker = Some(waker);
        Ok(())
    }

    /// Runs the loop until shutdown.
    ///
    /// # Errors
    /// Only a failure of the poller itself; errors on one connection close that connection.
    pub fn run(&mut self) -> io::Result<Exit> {
        loop {
            if let Some(exit) = self.turn()? {
                return Ok(exit);
            }
        }
    }

    /// One iteration of the loop (SPEC §2; docs/architecture.md tells the same steps). Returns
    /// `Some` when the loop is over. Visible in the crate so that the app's tests can drive a
    /// reactor on a thread of their own and stop it (`app/workers.rs`).
    pub(crate) fn turn(&mut self) -> io::Result<Option<Exit>> {
        self.metrics.loop_iterations += 1;

        // 1. Wait for readiness: no longer than until the next timer is due, and not at all if
        //    connections are waiting on the ready list.
        let mut events = std::mem::take(&mut self.events);
        self.wait(&mut events)?;
        // The ready list as it stood before this iteration: served in step 3. Connections that
        // spend their budget in this iteration go on the (now empty) list for the next one.
        std::mem::swap(&mut self.ready, &mut self.serving);

        // 2. Dispatch every event: accept, read, write, signals.
        let exit = self.dispatch(&events);
        self.events = events;
        if exit.is_some() {
            return Ok(exit);
        }
        if self.poller.completion_based() {
            // A completion backend has done the accepts, reads and writes already.
            self.dispatch_completions();
        }

        // 3. Serve the ready list carried over from the previous iteration.
        self.serve_ready_list();

        // 4. Fire expired timers.
        self.fire_timers();

        // 4b. Serve HTTP requests that waited behind an answer the app gave in this iteration.
        self.resume_requests();

        // With `--workers`: what the other workers read for /metrics (a few relaxed stores
        // into this worker's own cache line, never per message). Before the flush, so that a
        // client that has seen a reply finds its message counted in the process totals, and
        // after it, for the bytes it wrote.
        if let Some(worker) = &self.worker {
            worker.publish(self.conns.len(), &self.metrics);
        }

        // 5. Flush every connection that had bytes queued in this iteration.
        self.flush_dirty();

        if let Some(worker) = &self.worker {
            worker.publish(self.conns.len(), &self.metrics);
        }

        if self.shutting_down && self.conns.is_empty() {
            info!("all connections closed; exiting");
            return Ok(Some(Exit::Graceful));
        }
        Ok(None)
    }

    /// Step 1: fills `events` with what is ready.
    fn wait(&mut self, events: &mut Vec<Event>) -> io::Result<()> {
        self.now = Instant::now();
        // Connections a flush in the last iteration resumed (`http::after_answers_flushed`)
        // are served in this one, without waiting.
        let mut timeout = if self.ready.is_empty() && self.http_resume.is_empty() {
            self.timers.next_timeout(self.now)
        } else {
            Some(Duration::ZERO)
        };
        let spares = self.outbound_pool.has_spares();
        // The io_uring backend's receive buffers that the burst touched (`Poller::holds_idle_memory`).
        let poller_memory = self.poller.holds_idle_memory();
        if spares || poller_memory {
            // Wake up after a short idle spell to release them (see `SPARES_KEPT_IDLE`).
            timeout = Some(timeout.map_or(SPARES_KEPT_IDLE, |t| t.min(SPARES_KEPT_IDLE)));
        }
        let before = self.now;
        self.poller.wait(events, timeout)?;
        // The wait may have ended long after input arrived (the process stalled; after
        // SIGSTOP/SIGCONT epoll_wait fails with EINTR, reported as no events), and it reports
        // only what was ready when it returned. Deadlines judged in step 4 therefore never
        // trust it alone: the Pong deadline reads its connection before dropping it
        // (`on_pong_deadline`, SPEC §5).
        self.now = Instant::now();
        self.now_stamp = Stamp::at(self.started, self.now);
        // The app reads this same instant for the whole iteration (`Handler::set_now`).
        self.handler.set_now(self.now);
        self.metrics.poll_wait += self.now - before;
        if spares && events.is_empty() && self.now - before >= SPARES_KEPT_IDLE {
            self.outbound_pool.release_spares();
            // What the burst freed in the middle of the heap goes back too (`heap.rs`).
            heap::give_back_free_pages();
        }
        if poller_memory && events.is_empty() && self.now - before >= SPARES_KEPT_IDLE {
            self.poller.release_idle_memory();
        }
        self.metrics.poll_wakeups += 1;
        self.metrics.poll_events += events.len() as u64;
        Ok(())
    }

    /// Step 2: accepts, reads and writes what the events say is ready. Returns `Some` if a
    /// second signal ends the loop at once.
    fn dispatch(&mut self, events: &[Event]) -> Option<Exit> {
        let mut exit = None;
        for event in events {
            trace!("event {event:?}");
            match event.token {
                LISTENER => self.accept_all(),
                SIGNALS => exit = exit.or(self.on_signal()),
                WAKER => self.on_wake(),
                RELOAD => self.on_reload_signal(),
                token => {
                    let id = ConnId::from_token(token.0);
                    // A connection on the ready list is read in step 3, once: reading it here
                    // too would give it a second budget in this iteration (a level-triggered
                    // backend reports it again because its budget left bytes unread).
                    let queued = self.conn_mut(id).is_some_and(|c| c.on_ready_list);
                    if event.readable && !queued {
                        self.on_readable_event(id, event.hangup || event.error);
                    }
                    if event.writable {
                        self.flush(id);
                    }
                }
            }
        }
        exit
    }

    /// Step 3: reads the connections whose budget ran out in the previous iteration, one budget
    /// each (step 2 skipped their events).
    ///
    /// Not in the same iteration: between two budgets of one connection, every other ready
    /// connection is read, timers fire and queued replies are flushed, so one client sending
    /// as fast as it can delays the others by at most one budget (SPEC §2).
    fn serve_ready_list(&mut self) {
        let mut serving = std::mem::take(&mut self.serving);
        for id in serving.drain(..) {
            if let Some(conn) = self.conn_mut(id) {
                conn.on_ready_list = false;
                self.on_readable(id);
            }
        }
        self.serving = serving;
    }

    /// Step 4: fires every timer that is due.
    fn fire_timers(&mut self) {
        self.timers.expire(self.now, &mut self.expired);
        let mut expired = std::mem::take(&mut self.expired);
        for timer in expired.drain(..) {
            self.metrics.timer_expiries += 1;
            match timer {
                TimerEvent::Conn(id, deadline) => self.on_deadline(id, deadline),
                TimerEvent::AcceptRetry => self.resume_accepting(),
                TimerEvent::ShutdownDeadline => self.shutdown_deadline_passed(),
                TimerEvent::App => self.on_app_timer(),
                TimerEvent::Scrape(id) => self.scrape_deadline(id),
            }
        }
        self.expired = expired;
    }

    /// The connection `id` names, if it is still the one in its slot (see `ConnId`).
    #[inline]
    fn conn_mut(&mut self, id: ConnId) -> Option<&mut Connection> {
        live(&mut self.conns, id)
    }
}

/// The connection `id` names, if it is still the one in its slot. A free function (not a
/// method) so that callers can borrow other fields of the reactor at the same time.
#[inline]
fn live(conns: &mut Slab<Connection>, id: ConnId) -> Option<&mut Connection> {
    conns
        .get_mut(id.slot as usize)
        .filter(|c| c.id.generation == id.generation)
}
