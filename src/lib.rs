//! wsrelay: a WebSocket relay server on a hand-rolled, single-threaded event loop.
//!
//! Layers, each depending only on the ones below it (SPEC §1):
//!
//! * `app`      — the application: /echo, raw rooms and the /ws relay (the hub), behind the
//!   `server::Handler` seam.
//! * `engine`   — where streams live (each id's inbox): in memory, or durably in a data
//!   directory; the hub submits work and polls completions (SPEC §13).
//! * `server`   — the reactor: event loop, connection slab, accept, dispatch, timers, shutdown;
//!   and (`server::workers`) what N reactors of `--workers N` share (SPEC §14).
//! * `protocol` — pure code: HTTP upgrade handshake, RFC 6455 frame codec, close codes.
//! * `poller`   — readiness notification (epoll/kqueue through mio; poll(2); select(2)).
//! * `tls`      — rustls sessions over non-blocking sockets, and the certificates they use
//!   (the reactor, the client and the load generator all speak `wss://` through it).
//! * `timer`    — a hashed timing wheel: heartbeats and deadlines, driven by the reactor's clock.
//!
//! Beside them, `client` and `bench` (programs on top of `protocol`), `api_client` (`wsrelay api`,
//! a blocking HTTP/1.1 client of the server API) and `wire`, the few words
//! of the `/ws` envelope protocol that the relay and the client both spell.
//!
//! Start reading at `server::Reactor::run`, then `protocol::frame`. docs/architecture.md draws
//! the whole picture.

pub mod api_client;
pub mod app;
pub mod bench;
pub mod client;
pub mod engine;
pub mod poller;
pub mod protocol;
pub mod server;
pub mod timer;
pub mod tls;
pub mod wire;
