//! permessage-deflate (RFC 7692) as pure code: what the operator allows, what the two ends
//! agree on, and the codec that compresses and decompresses messages.
//!
//! Owns: the operator's choice (`CompressionConfig`: `--compression off|shared|dedicated`,
//! `--compression-window`, `--compression-min`), negotiation (`negotiate`), the codec
//! (`codec`) and the counters compression adds to /metrics (`metrics`).
//! Does not: touch sockets, decide which connection gets which compressor, or set RSV1 on
//! frames; the reactor does, with what this module answers.
//!
//! SPEC §17; RFC 7692 §5-§7. docs/protocol.md ("Compression") explains the choices.

pub mod codec;
pub mod metrics;
pub mod negotiate;

pub use codec::{CompressFailed, Deflater, Inflater};
pub use metrics::CompressionMetrics;
pub use negotiate::{
    accept_response, negotiate, ClientWindowOffer, DeflateOffer, DeflateParams, Direction,
    ExtensionError,
};

use std::fmt;

/// RFC 7692 §7.1.2: the smallest LZ77 window a peer may ask for, 2^8 = 256 bytes.
pub const MIN_WINDOW_BITS: u8 = 8;
/// RFC 7692 §7.1.2: the largest (and default) LZ77 window, 2^15 = 32 KiB.
pub const MAX_WINDOW_BITS: u8 = 15;
/// The smallest window zlib compresses raw deflate with (it refuses 8, see `negotiate.rs`).
pub const MIN_ZLIB_WINDOW_BITS: u8 = 9;

/// `--compression`: whether and how the server compresses (SPEC §17).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompressionMode {
    /// Never negotiate permessage-deflate.
    Off,
    /// One compressor per reactor, reset after each message (no context takeover), so idle
    /// connections hold no compressor and a room message is compressed once per reactor.
    Shared,
    /// A compressor per connection with context takeover: better ratios for streams of similar
    /// messages, at the cost of zlib state for every connection.
    Dedicated,
}

impl CompressionMode {
    /// The name used on the command line and in logs.
    pub fn name(self) -> &'static str {
        match self {
            CompressionMode::Off => "off",
            CompressionMode::Shared => "shared",
            CompressionMode::Dedicated => "dedicated",
        }
    }
}

impl fmt::Display for CompressionMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What the operator allows; the server negotiates within it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompressionConfig {
    pub mode: CompressionMode,
    /// `--compression-window`: the largest LZ77 window, in bits (8 to 15), the server
    /// compresses with, and in `dedicated` mode the largest it lets a client compress with, so
    /// it bounds the zlib memory each connection keeps.
    pub window_bits: u8,
    /// `--compression-min`: messages shorter than this many bytes are sent uncompressed (RSV1
    /// clear): below it, DEFLATE's block overhead outweighs what it saves.
    pub min_bytes: usize,
}

impl CompressionConfig {
    /// A checked configuration.
    ///
    /// # Errors
    /// A `window_bits` outside 8..=15, with a sentence for the command line.
    pub fn new(
        mode: CompressionMode,
        window_bits: u8,
        min_bytes: usize,
    ) -> Result<CompressionConfig, String> {
        if !(MIN_WINDOW_BITS..=MAX_WINDOW_BITS).contains(&window_bits) {
            return Err(format!(
                "--compression-window {window_bits}: the window is 8 to 15 bits (RFC 7692 §7.1.2)"
            ));
        }
        Ok(CompressionConfig {
            mode,
            window_bits,
            min_bytes,
        })
    }
}

impl Default for CompressionConfig {
    /// `shared`, a 15-bit (32 KiB) window, and 128 bytes: SPEC §17's defaults.
    fn default() -> CompressionConfig {
        CompressionConfig {
            mode: CompressionMode::Shared,
            window_bits: MAX_WINDOW_BITS,
            min_bytes: 128,
        }
    }
}
