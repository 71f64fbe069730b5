//! TLS for the reactor, the client and the load generator: rustls sessions driven by
//! non-blocking sockets, and the certificates and trust settings they are built from.
//!
//! Owns: turning PEM files into rustls configurations (`config`); `TlsSession`, the layer that
//! sits between a socket and the code that handles its plaintext (`session`); a listener's
//! reloadable certificate and its counters (`listener`).
//! Does not: know about WebSockets, HTTP or connections (the reactor decides when to read, write
//! and close), register interest with a poller, or format /metrics (`server::metrics` does).
//! Like `poller/`, it sits below `server/`, `client/` and `bench/`, which all use it.
//!
//! SPEC §18. The shape follows rustls's own mio example: readiness drives `read_tls` /
//! `process_new_packets` on the way in and `write_tls` on the way out, on the same thread as
//! everything else; there is no thread per connection.

pub mod config;
pub mod listener;
pub mod session;

#[cfg(test)]
pub(crate) mod test_ca;

pub use config::{CertError, Trust};
pub use listener::{ServerTls, TlsStats};
pub use session::{Failure, Handshake, TlsError, TlsFlush, TlsSession, TlsWriter};
