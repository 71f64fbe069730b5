//! Integration tests: the real server over loopback sockets, driven by independent peers
//! (the `tungstenite` crate, and frames built by hand). One test crate, so it links once.
//! Every case runs on every poller through `poller_tests!`.

mod support;
mod tls_support;

mod bench;
mod client;
mod client_ws;
mod close;
mod deflate;
mod echo;
mod frames;
mod http;
mod reactor;
mod relay_support;
mod robustness;
mod tls;

mod access;
mod api;
mod durable;
mod envelope;
mod history;
mod hostile;
mod offline;
mod rooms;
mod tokens;
mod workers;
mod workers_api;
mod workers_durable;
mod workers_presence;
mod workers_ws;

mod redis;
mod redis_presence;
mod redis_server;
