//! The WebSocket protocol as pure code: bytes in, decisions and bytes out.
//!
//! Owns: the HTTP upgrade handshake (`handshake`) and every HTTP refusal with its status and
//! answer (`refusal`), the RFC 6455 frame codec (`frame`, `mask`), message assembly with UTF-8
//! validation (`message`, `utf8`), close codes (`close`), the protocol errors with the close
//! code each one produces (`error`), and permessage-deflate negotiation and codec (`deflate`,
//! RFC 7692).
//! Does not: touch sockets, clocks or the reactor. Nothing here performs I/O, so every rule is
//! unit-tested and fuzzed without a network.
//!
//! Promise: no function in this layer panics on any input a peer can send; lengths from the wire
//! are checked against limits before anything is allocated.

#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod client_handshake;
pub mod close;
pub mod decoder;
pub mod deflate;
pub mod error;
pub mod frame;
pub mod handshake;
pub mod http_exchange;
pub mod mask;
pub mod message;
pub mod refusal;
pub mod utf8;

pub use close::CloseCode;
pub use error::ProtocolError;
pub use refusal::Refusal;
