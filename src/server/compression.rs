//! permessage-deflate in the reactor: which codec serves which connection, and what it costs.
//!
//! Owns: `Negotiated`, what one connection agreed on (kept in the connection: 16 bytes, and a
//! box only for `dedicated` codecs once they are first used), and `Compressor`, the reactor's
//! shared codecs, its cache of compressed shared frames, and the compression counters.
//! Does not: negotiate or implement DEFLATE (`protocol::deflate` does), decide what is sent to
//! whom (the app), or queue bytes (`Outbox`, which asks this module for the frame to queue).
//!
//! SPEC §17; docs/protocol.md ("Compression") says why each choice was made:
//! * `shared`: the server compresses without context takeover, so one `Deflater` per reactor
//!   (per agreed window, in practice one) serves every connection and is reset after each
//!   message; an idle connection holds no compressor. A frame the app encoded once for many
//!   recipients (`Outbox::send_shared`) is compressed once per callback and the compressed frame
//!   shared by every member that agreed on the same window (`cache`).
//! * Receiving: `FrameReader` assembles a compressed message whole (bounded by `--max-message`
//!   like any message), then it is inflated in one go, bounded by `--max-message` again after
//!   decompression. Without client context takeover (always so in `shared`) the reactor's one
//!   `Inflater` does it, so no connection keeps a decompressor, not even while a message
//!   arrives. With client context takeover (`dedicated`, when the client keeps its window) the
//!   connection needs its own, kept for its lifetime: the client's next message refers to it.
//! * `dedicated` with server context takeover: a `Deflater` per connection, created at its first
//!   compressed message, so the frame of a room message is compressed once per such member.

use crate::protocol::deflate::{
    CompressionConfig, CompressionMetrics, DeflateParams, Deflater, Inflater, MAX_WINDOW_BITS,
};
use crate::protocol::error::ProtocolError;
use crate::protocol::frame::{self, OpCode, Role};
use std::rc::Rc;

/// Shared frames remembered in compressed form within one app callback: a fan-out sends one
/// frame to every member, so a handful covers the callbacks that send several.
const CACHE_ENTRIES: usize = 8;

/// The most capacity the inflate buffer keeps between messages; a larger message's buffer is
/// freed after use, so an idle reactor does not hold `--max-message` bytes.
const KEEP_INFLATE_BYTES: usize = 64 * 1024;

/// A shared frame compressed for one window: (the plain frame, the window, the compressed frame
/// or `None` if compressing did not make it smaller).
type CachedFrame = (Rc<[u8]>, u8, Option<Rc<[u8]>>);

/// What one connection agreed on (RFC 7692 §7.1), and its own codecs if it needs any.
#[derive(Debug)]
pub struct Negotiated {
    /// The LZ77 window the server compresses with for this connection.
    out_window: u8,
    /// The server keeps its window between messages (`dedicated` without
    /// `server_no_context_takeover`): this connection needs its own `Deflater`.
    out_takeover: bool,
    /// The client keeps its window between messages: this connection needs its own `Inflater`.
    in_takeover: bool,
    /// The client's window, for its own `Inflater`.
    in_window: u8,
    /// The codecs of this connection alone, created when first needed (`dedicated` only).
    own: Option<Box<OwnCodecs>>,
}

/// A connection's own codecs, for the directions with context takeover.
#[derive(Debug, Default)]
struct OwnCodecs {
    deflater: Option<Deflater>,
    inflater: Option<Inflater>,
}

impl Negotiated {
    /// The connection's half of what the 101 response states.
    pub fn new(params: &DeflateParams) -> Negotiated {
        let out = params.server_to_client();
        let incoming = params.client_to_server();
        Negotiated {
            out_window: out.window_bits,
            out_takeover: out.context_takeover,
            in_takeover: incoming.context_takeover,
            in_window: incoming.window_bits,
            own: None,
        }
    }
}

/// The reactor's compression: its configuration, shared codecs, cache and counters.
#[derive(Debug)]
pub struct Compressor {
    pub config: CompressionConfig,
    /// One compressor per agreed window (index: bits - 8), created when first needed; reset
    /// after every message. Clients that agreed on the same window share one.
    deflaters: [Option<Deflater>; 8],
    /// The decompressor of every message sent without client context takeover, with the
    /// largest window (it reads any smaller one's output); reset after every message.
    inflater: Option<Inflater>,
    /// Shared frames compressed during the current app callback.
    cache: Vec<CachedFrame>,
    /// Where compressed payloads are built before they become a frame.
    scratch: Vec<u8>,
    /// Where received messages are inflated.
    inflated: Vec<u8>,
    pub metrics: CompressionMetrics,
}

impl Compressor {
    pub fn new(config: CompressionConfig) -> Compressor {
        Compressor {
            config,
            deflaters: Default::default(),
            inflater: None,
            cache: Vec::new(),
            scratch: Vec::new(),
            inflated: Vec::new(),
            metrics: CompressionMetrics::default(),
        }
    }

    /// Whether a data message of `len` bytes is worth compressing (`--compression-min`).
    fn worth_it(&mut self, len: usize) -> bool {
        if len < self.config.min_bytes {
            self.metrics.messages_out_small += 1;
            return false;
        }
        true
    }

    /// The frame to queue for a connection that negotiated compression, for a message of
    /// `opcode` with `payload` that the app sends to it alone. (The `Outbox` counts it in
    /// `messages_out` once it is queued.) `None`: send it uncompressed
    /// (a control frame, below `--compression-min`, or compressing did not make it smaller).
    pub fn compress_for(
        &mut self,
        conn: &mut Negotiated,
        opcode: OpCode,
        payload: &[u8],
    ) -> Option<Vec<u8>> {
        if opcode.is_control() || !self.worth_it(payload.len()) {
            return None;
        }
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        let compressed = self.compress(conn, payload, &mut scratch);
        let frame = compressed.then(|| compressed_frame(opcode, &scratch));
        self.keep_scratch(scratch);
        frame
    }

    /// The frame to queue for a connection that negotiated compression, for a frame the app
    /// encoded once for many recipients. Compressed once per window for all the connections
    /// that share a compressor (within one app callback), or once per connection with its own.
    /// `None`: send `plain` itself.
    pub fn compress_shared(&mut self, conn: &mut Negotiated, plain: &Rc<[u8]>) -> Option<Rc<[u8]>> {
        let (opcode, payload) = data_payload(plain)?;
        let shares_compressor = !conn.out_takeover;
        if shares_compressor {
            let hit = self
                .cache
                .iter()
                .find(|(p, w, _)| Rc::ptr_eq(p, plain) && *w == conn.out_window);
            if let Some((_, _, compressed)) = hit {
                let compressed = compressed.clone();
                if compressed.is_none() && payload.len() < self.config.min_bytes {
                    self.metrics.messages_out_small += 1;
                }
                return compressed;
            }
        }
        let frame = if self.worth_it(payload.len()) {
            let mut scratch = std::mem::take(&mut self.scratch);
            scratch.clear();
            let frame = self
                .compress(conn, payload, &mut scratch)
                .then(|| Rc::from(compressed_frame(opcode, &scratch)));
            self.keep_scratch(scratch);
            frame
        } else {
            None
        };
        if shares_compressor {
            if self.cache.len() == CACHE_ENTRIES {
                self.cache.remove(0);
            }
            self.cache
                .push((Rc::clone(plain), conn.out_window, frame.clone()));
        }
        frame
    }

    /// Forgets the shared frames compressed so far (after each app callback): the cache only
    /// has to span one fan-out, and it must not keep frames alive. Inlined: it runs after every app callback, once per message, and is nearly always a
    /// no-op (nothing compressed). Checked for emptiness first: `clear` on an empty vector
    /// still called the loop that drops its elements, 12 instructions per message on /echo.
    #[inline]
    pub fn end_of_callback(&mut self) {
        if !self.cache.is_empty() {
            self.cache.clear();
        }
    }

    /// Compresses `payload` into `out` with the connection's compressor (its own, or the shared
    /// one of its window). False if zlib failed or the result is not smaller than the payload:
    /// then the message goes out uncompressed, which is always allowed (RSV1 is per message).
    fn compress(&mut self, conn: &mut Negotiated, payload: &[u8], out: &mut Vec<u8>) -> bool {
        let deflater = if conn.out_takeover {
            let own = conn.own.get_or_insert_with(Box::default);
            own.deflater
                .get_or_insert_with(|| Deflater::new(conn.out_window, true))
        } else {
            let slot = usize::from(conn.out_window.saturating_sub(8)).min(7);
            self.deflaters[slot].get_or_insert_with(|| Deflater::new(conn.out_window, false))
        };
        self.metrics.compressions += 1;
        self.metrics.bytes_before_compression += payload.len() as u64;
        if deflater.compress(payload, out).is_err() {
            self.metrics.compress_failures += 1;
            return false;
        }
        self.metrics.bytes_after_compression += out.len() as u64;
        // With context takeover the peer's window now holds this message either way, so the
        // compressed form must be sent even when it is not smaller.
        out.len() < payload.len() || conn.out_takeover
    }

    fn keep_scratch(&mut self, scratch: Vec<u8>) {
        if scratch.capacity() <= KEEP_INFLATE_BYTES {
            self.scratch = scratch;
        }
    }

    /// Inflates a compressed message the connection received, bounded by `limit` bytes
    /// (`--max-message`) after decompression, and checks a text message's UTF-8 (which could
    /// not be checked on the compressed bytes). The message is returned in the compressor's
    /// buffer, lent out while the app reads it: hand it back with `give_back`.
    ///
    /// # Errors
    /// `MessageTooBig` (1009), `InvalidCompressedData` (1007), `InvalidUtf8` (1007).
    pub fn inflate(
        &mut self,
        conn: &mut Negotiated,
        opcode: OpCode,
        compressed: &[u8],
        limit: usize,
    ) -> Result<Vec<u8>, ProtocolError> {
        let mut out = std::mem::take(&mut self.inflated);
        out.clear();
        let inflater = if conn.in_takeover {
            let own = conn.own.get_or_insert_with(Box::default);
            own.inflater
                .get_or_insert_with(|| Inflater::new(conn.in_window, true))
        } else {
            self.inflater
                .get_or_insert_with(|| Inflater::new(MAX_WINDOW_BITS, false))
        };
        let mut result = inflater.inflate_message(compressed, &mut out, limit);
        if result.is_err() {
            // The shared inflater serves the next connection; a connection's own is dropped
            // with the connection the error closes.
            inflater.reset();
        }
        if result.is_ok() && opcode == OpCode::Text && std::str::from_utf8(&out).is_err() {
            result = Err(ProtocolError::InvalidUtf8);
        }
        match result {
            Ok(()) => {
                self.metrics.messages_in += 1;
                self.metrics.bytes_in_compressed += compressed.len() as u64;
                self.metrics.bytes_in_inflated += out.len() as u64;
                Ok(out)
            }
            Err(e) => {
                self.metrics.inflate_errors += 1;
                self.give_back(out);
                Err(e)
            }
        }
    }

    /// Takes back the buffer `inflate` lent out, unless it grew large (a big message's buffer
    /// is freed rather than kept by an idle reactor).
    pub fn give_back(&mut self, mut buffer: Vec<u8>) {
        buffer.clear();
        if buffer.capacity() <= KEEP_INFLATE_BYTES {
            self.inflated = buffer;
        }
    }
}

/// The opcode and payload of an unmasked data frame the app encoded (`Outbox::encode_shared`);
/// `None` for a control frame or anything else, which is never compressed.
fn data_payload(plain: &[u8]) -> Option<(OpCode, &[u8])> {
    // A server frame is read as a client reads it (unmasked); its length is what it holds.
    let header = frame::decode_header(plain, Role::Client, plain.len() as u64)
        .ok()
        .flatten()?;
    if !header.fin || !matches!(header.opcode, OpCode::Text | OpCode::Binary) {
        return None;
    }
    Some((header.opcode, plain.get(header.header_len..)?))
}

/// One unfragmented frame of a compressed message: RSV1 set (RFC 7692 §6), the payload as
/// compressed.
fn compressed_frame(opcode: OpCode, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(frame::header_len(payload.len(), false) + payload.len());
    frame::encode_compressed_into(&mut out, opcode, payload, None);
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::protocol::deflate::CompressionMode;

    fn params() -> DeflateParams {
        DeflateParams {
            server_no_context_takeover: true,
            client_no_context_takeover: true,
            server_max_window_bits: None,
            client_max_window_bits: None,
        }
    }

    fn text(n: usize) -> Vec<u8> {
        let unit = br#"{"type":"msg","room":"lobby","from":"alice","data":"hello"}"#;
        unit.iter().cycle().take(n).copied().collect()
    }

    /// Inflates a server frame as a client would (its payload plus the removed tail).
    fn client_reads(frame: &[u8]) -> Vec<u8> {
        let header = frame::decode_header_with(frame, Role::Client, u64::MAX, true)
            .unwrap()
            .unwrap();
        assert!(header.rsv1);
        let mut out = Vec::new();
        Inflater::new(15, false)
            .inflate_message(&frame[header.header_len..], &mut out, 1 << 20)
            .unwrap();
        out
    }

    /// SPEC §17: `shared` adds at most 64 bytes per idle connection. The connection's whole
    /// share is this field (the codecs are the reactor's), with no heap behind it.
    #[test]
    fn an_idle_connection_pays_16_bytes() {
        assert!(std::mem::size_of::<Option<Negotiated>>() <= 16);
        assert!(Negotiated::new(&params()).own.is_none());
    }

    #[test]
    fn a_shared_frame_is_compressed_once_for_every_connection() {
        let mut c = Compressor::new(CompressionConfig::default());
        let payload = text(1024);
        let plain: Rc<[u8]> = frame::encode(true, OpCode::Text, &payload, None).into();
        let mut conns: Vec<Negotiated> = (0..100).map(|_| Negotiated::new(&params())).collect();
        let frames: Vec<Rc<[u8]>> = conns
            .iter_mut()
            .map(|n| c.compress_shared(n, &plain).unwrap())
            .collect();
        assert_eq!(c.metrics.compressions, 1);
        assert!(frames.iter().all(|f| Rc::ptr_eq(f, &frames[0])));
        assert!(frames[0].len() < plain.len() / 3);
        assert_eq!(client_reads(&frames[0]), payload);
        // A new callback compresses again (the cache does not outlive it).
        c.end_of_callback();
        c.compress_shared(&mut conns[0], &plain).unwrap();
        assert_eq!(c.metrics.compressions, 2);
    }

    #[test]
    fn small_and_control_frames_stay_plain() {
        let mut c = Compressor::new(CompressionConfig::default());
        let mut n = Negotiated::new(&params());
        let small: Rc<[u8]> = frame::encode(true, OpCode::Text, &text(127), None).into();
        assert!(c.compress_shared(&mut n, &small).is_none());
        assert!(c.compress_for(&mut n, OpCode::Text, &text(127)).is_none());
        assert!(c.compress_for(&mut n, OpCode::Ping, b"x").is_none());
        assert_eq!(c.metrics.compressions, 0);
        assert_eq!(c.metrics.messages_out_small, 2);
        // Incompressible bytes are sent as they are.
        let mut x = 0x2545_f491_4f6c_dd1d_u64;
        let noise: Vec<u8> = (0..512)
            .map(|_| {
                // xorshift64: bytes with no repetition for LZ77 to find.
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 32) as u8
            })
            .collect();
        assert!(c.compress_for(&mut n, OpCode::Binary, &noise).is_none());
        assert_eq!(c.metrics.compressions, 1);
    }

    #[test]
    fn dedicated_takeover_compresses_per_connection_and_keeps_the_window() {
        let config = CompressionConfig::new(CompressionMode::Dedicated, 15, 0).unwrap();
        let mut c = Compressor::new(config);
        let takeover = DeflateParams {
            server_no_context_takeover: false,
            client_no_context_takeover: false,
            ..params()
        };
        let mut n = Negotiated::new(&takeover);
        let payload = text(300);
        let first = c.compress_for(&mut n, OpCode::Text, &payload).unwrap();
        let second = c.compress_for(&mut n, OpCode::Text, &payload).unwrap();
        // The second refers back to the first: much shorter.
        assert!(second.len() < first.len() / 2, "{second:?}");
        let mut inflater = Inflater::new(15, true);
        for frame in [&first, &second] {
            let mut out = Vec::new();
            inflater
                .inflate_message(&frame[2..], &mut out, 1 << 20)
                .unwrap();
            assert_eq!(out, payload);
        }
    }

    #[test]
    fn inflate_bounds_checks_utf8_and_recovers() {
        let mut c = Compressor::new(CompressionConfig::default());
        let mut n = Negotiated::new(&params());
        let mut deflater = Deflater::new(15, false);
        let mut bomb = Vec::new();
        deflater.compress(&vec![b'a'; 1 << 20], &mut bomb).unwrap();
        let r = c.inflate(&mut n, OpCode::Binary, &bomb, 1000);
        assert_eq!(r, Err(ProtocolError::MessageTooBig));
        let mut bad_utf8 = Vec::new();
        deflater.compress(b"\xff\xfe", &mut bad_utf8).unwrap();
        let r = c.inflate(&mut n, OpCode::Text, &bad_utf8, 1000);
        assert_eq!(r, Err(ProtocolError::InvalidUtf8));
        let r = c.inflate(&mut n, OpCode::Text, b"\xff\xff\xff", 1000);
        assert_eq!(r, Err(ProtocolError::InvalidCompressedData));
        assert_eq!(c.metrics.inflate_errors, 3);
        let mut ok = Vec::new();
        deflater.compress(b"hello", &mut ok).unwrap();
        let r = c.inflate(&mut n, OpCode::Text, &ok, 1000);
        assert_eq!(r, Ok(b"hello".to_vec()));
        assert_eq!(c.metrics.messages_in, 1);
    }
}
