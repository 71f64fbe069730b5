//! The DEFLATE codec of permessage-deflate: a message in, its compressed payload out, and back,
//! with the decompressed size bounded.
//!
//! Owns: `Deflater` (one message at a time, with or without context takeover, output without
//! the trailing `00 00 ff ff` of RFC 7692 §7.2.1) and `Inflater` (the frames of one compressed
//! message in, the message out, never more than a byte limit, RFC 7692 §7.2.2), over flate2's
//! zlib-rs backend.
//! Does not: decide what to compress (`--compression-min`, control frames), set RSV1 or build
//! frames (the reactor and `frame.rs`), negotiate (`negotiate.rs`), or keep any codec that the
//! caller does not own: whether one `Deflater` serves a whole reactor or one connection is the
//! caller's choice (SPEC §17 `shared` / `dedicated`).
//!
//! Why zlib-rs: window-size negotiation (RFC 7692 §7.1.2) needs a compressor and decompressor
//! built for a given window; flate2's default backend, miniz_oxide, always uses a 32 KiB window
//! and cannot honour `server_max_window_bits`. zlib-rs is a memory-safe port of zlib-ng, fast,
//! and needs no C toolchain.
//!
//! Invariants:
//! * A `Deflater` without context takeover is reset after every message, so each compressed
//!   message stands alone and can be sent to every connection that agreed on a window at least
//!   as large.
//! * `Inflater::push` and `finish` never grow the output past `limit` bytes: what the peer sends
//!   is decompressed into room that exists, and a message that would need more is refused with
//!   `MessageTooBig` (1009) before any byte beyond the limit is written or allocated.

use super::MIN_ZLIB_WINDOW_BITS;
use crate::protocol::error::ProtocolError;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use std::fmt;

/// The tail every sync-flushed DEFLATE block list ends with: an empty stored block. RFC 7692
/// §7.2.1 removes it from each compressed message; §7.2.2 puts it back before inflating.
pub const SYNC_TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// The zlib compression level. Level 1 (zlib-rs' "quick" strategy), measured against the
/// default 6 with a reset per message: on 1 KiB of chat JSON 5.1x instead of 5.9x in 80% of
/// the time, on 16 KiB 8.1x instead of 11.9x in a fifth of the time. A relay that compresses
/// every broadcast runs out of CPU before bandwidth. See docs/protocol.md ("Sending").
pub const LEVEL: u32 = 1;

/// Output grows by at least this much at a time while inflating.
const MIN_INFLATE_CHUNK: usize = 4096;

/// Compresses messages for one direction of one or many connections.
pub struct Deflater {
    compress: Compress,
    context_takeover: bool,
}

impl Deflater {
    /// A compressor for an agreed window of `window_bits` (8 to 15; 8 is compressed with zlib's
    /// 9-bit window, which never reaches back more than 250 bytes, see `negotiate.rs`).
    /// `context_takeover`: keep the window from one message to the next (only for a compressor
    /// that serves one connection).
    pub fn new(window_bits: u8, context_takeover: bool) -> Deflater {
        Deflater {
            compress: Compress::new_with_window_bits(
                Compression::new(LEVEL),
                false,
                zlib_window_bits(window_bits),
            ),
            context_takeover,
        }
    }

    /// Appends the compressed payload of the whole message `message` to `out` (RFC 7692 §7.2.1:
    /// compress, flush to a byte boundary, drop the final `00 00 ff ff`). An empty message
    /// compresses to the single byte `00` (§7.2.3.6).
    ///
    /// # Errors
    /// `CompressFailed` if zlib reports an error, which it does not for valid input and state;
    /// `out` is then left as it was and the caller sends the message uncompressed (always
    /// allowed: RSV1 is per message). The compressor is reset, so it stays usable.
    pub fn compress(&mut self, message: &[u8], out: &mut Vec<u8>) -> Result<(), CompressFailed> {
        let start = out.len();
        let result = self.compress_into(message, out);
        if result.is_err() {
            out.truncate(start);
            self.compress.reset();
            return result;
        }
        // With context takeover, an empty message right after a flush gives zlib nothing to do
        // (it writes nothing): the message is then the empty stored block alone, which is
        // 0x00 once its tail is stripped (RFC 7692 §7.2.3.6).
        if message.is_empty() && out.len() == start {
            out.push(0x00);
            return Ok(());
        }
        // A sync flush always ends with the empty stored block; checked rather than assumed.
        if out.len() < start + SYNC_TAIL.len() || !out.ends_with(&SYNC_TAIL) {
            out.truncate(start);
            self.compress.reset();
            return Err(CompressFailed);
        }
        out.truncate(out.len() - SYNC_TAIL.len());
        if !self.context_takeover {
            self.compress.reset();
        }
        Ok(())
    }

    fn compress_into(&mut self, message: &[u8], out: &mut Vec<u8>) -> Result<(), CompressFailed> {
        let in_start = self.compress.total_in();
        // Compressed data is rarely much larger than its input; start with room for that.
        out.reserve(message.len() / 2 + 64);
        loop {
            let consumed = (self.compress.total_in() - in_start) as usize;
            let rest = message.get(consumed..).ok_or(CompressFailed)?;
            if out.capacity() - out.len() < 64 {
                out.reserve(out.capacity().max(64));
            }
            // `compress_vec` writes into the spare capacity and no further.
            self.compress
                .compress_vec(rest, out, FlushCompress::Sync)
                .map_err(|_| CompressFailed)?;
            let all_in = self.compress.total_in() - in_start == message.len() as u64;
            // zlib's rule for a flush: done once all input is taken and the output was not
            // filled (a full output buffer may mean more is pending).
            if all_in && out.len() < out.capacity() {
                return Ok(());
            }
        }
    }
}

impl fmt::Debug for Deflater {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Deflater")
            .field("context_takeover", &self.context_takeover)
            .finish_non_exhaustive()
    }
}

/// zlib cannot compress raw deflate with an 8-bit window; its 9-bit window is used instead,
/// whose matches never reach back more than 250 bytes (window minus 262 bytes of lookahead),
/// so its output is valid for a peer that allowed 8 bits.
fn zlib_window_bits(agreed: u8) -> u8 {
    agreed.clamp(MIN_ZLIB_WINDOW_BITS, super::MAX_WINDOW_BITS)
}

/// zlib reported an error while compressing; the message goes out uncompressed instead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompressFailed;

impl fmt::Display for CompressFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("deflate failed")
    }
}

impl std::error::Error for CompressFailed {}

/// Decompresses the messages of one direction of one connection.
pub struct Inflater {
    decompress: Decompress,
    context_takeover: bool,
    /// The current message's deflate data ended with a final block (BFINAL, RFC 7692
    /// §7.2.3.4): what follows in this message is padding and is not inflated.
    ended: bool,
}

impl Inflater {
    /// A decompressor for messages compressed with a window of at most `window_bits` (8 to
    /// 15; zlib reads an 8-bit window's output with 9 bits, a larger window reads any smaller
    /// one's). `context_takeover`: the peer keeps its window between messages, so we must too.
    pub fn new(window_bits: u8, context_takeover: bool) -> Inflater {
        Inflater {
            decompress: Decompress::new_with_window_bits(false, zlib_window_bits(window_bits)),
            context_takeover,
            ended: false,
        }
    }

    /// Decompresses one frame's payload of the current message, appending to `out`.
    ///
    /// `out` holds what earlier frames of the message produced; `limit` bounds `out.len()`
    /// (`--max-message`, SPEC §17). Call `finish` after the message's last frame.
    ///
    /// # Errors
    /// * `MessageTooBig` (1009): the message decompresses to more than `limit` bytes; `out` is
    ///   then at most `limit` bytes long and was never allocated beyond that.
    /// * `InvalidCompressedData` (1007): not valid DEFLATE data.
    ///
    /// After an error the inflater must be dropped or `reset`.
    pub fn push(
        &mut self,
        compressed: &[u8],
        out: &mut Vec<u8>,
        limit: usize,
    ) -> Result<(), ProtocolError> {
        if self.ended {
            // RFC 7692 §7.2.3.4: after a block with BFINAL set, the sender adds a byte that,
            // with the `00 00 ff ff` the receiver appends, forms an empty stored block. Like
            // zlib's "unused data", whatever follows the final block is not inflated. The
            // caller bounds a message's compressed bytes as it bounds any message's.
            return Ok(());
        }
        self.inflate(compressed, out, limit)
    }

    /// Ends the current message: inflates the `00 00 ff ff` the sender removed (RFC 7692
    /// §7.2.2), then resets the state unless context takeover carries it to the next message.
    ///
    /// # Errors
    /// As `push`.
    pub fn finish(&mut self, out: &mut Vec<u8>, limit: usize) -> Result<(), ProtocolError> {
        if !self.ended {
            self.inflate(&SYNC_TAIL, out, limit)?;
        }
        // After a final block the stream is over and zlib must start afresh; the window goes
        // with it, so a peer that ends messages with BFINAL cannot also take over context
        // (RFC 7692 §7.2.3.4 offers BFINAL to senders that cannot sync-flush; such a sender's
        // next message cannot refer back either, since its own compressor ended the stream).
        if !self.context_takeover || self.ended {
            self.reset();
        }
        Ok(())
    }

    /// A whole message compressed in one piece: `push` then `finish`.
    ///
    /// # Errors
    /// As `push`.
    pub fn inflate_message(
        &mut self,
        compressed: &[u8],
        out: &mut Vec<u8>,
        limit: usize,
    ) -> Result<(), ProtocolError> {
        self.push(compressed, out, limit)?;
        self.finish(out, limit)
    }

    /// Forgets the current message and any window: the state of `new`.
    pub fn reset(&mut self) {
        self.decompress.reset(false);
        self.ended = false;
    }

    fn inflate(
        &mut self,
        mut input: &[u8],
        out: &mut Vec<u8>,
        limit: usize,
    ) -> Result<(), ProtocolError> {
        loop {
            let room = limit.saturating_sub(out.len());
            let (consumed, produced, status, chunk) = if room == 0 {
                // At the limit: one more byte of output means the message is too big. A byte
                // on the stack tells without growing `out`.
                let mut probe = [0u8; 1];
                let (consumed, produced, status) = self.run(input, &mut probe)?;
                if produced > 0 {
                    return Err(ProtocolError::MessageTooBig);
                }
                (consumed, produced, status, 1)
            } else {
                let len = out.len();
                // How much to offer zlib in this call: about what this input may inflate to,
                // at least a few KiB (a bomb then takes many calls, each bounded).
                let step = MIN_INFLATE_CHUNK
                    .max(input.len().saturating_mul(4))
                    .min(room);
                if out.capacity() - len < step {
                    // Grow geometrically, so a message in many small frames is not copied
                    // once per frame, but never past `limit`: `reserve_exact`, because
                    // `reserve` may round the allocation up beyond it.
                    let target = (len + step).max(out.capacity().saturating_mul(2));
                    out.reserve_exact(target.min(limit) - len);
                }
                let chunk = step;
                out.resize(len + chunk, 0);
                let result = match out.get_mut(len..) {
                    Some(space) => self.run(input, space),
                    None => Err(ProtocolError::InvalidCompressedData),
                };
                let (consumed, produced, status) = match result {
                    Ok(r) => r,
                    Err(e) => {
                        out.truncate(len);
                        return Err(e);
                    }
                };
                out.truncate(len + produced);
                (consumed, produced, status, chunk)
            };
            input = input.get(consumed..).unwrap_or_default();
            if status == Status::StreamEnd {
                // The rest of `input` is padding after a final block (see `push`).
                self.ended = true;
                return Ok(());
            }
            let filled = produced == chunk;
            if input.is_empty() && !filled {
                return Ok(());
            }
            if consumed == 0 && produced == 0 {
                // zlib can neither take input nor give output although there is room for
                // both: the data leads nowhere.
                return Err(ProtocolError::InvalidCompressedData);
            }
        }
    }

    /// One call into zlib: (input bytes consumed, output bytes produced, status).
    fn run(
        &mut self,
        input: &[u8],
        output: &mut [u8],
    ) -> Result<(usize, usize, Status), ProtocolError> {
        let (in_before, out_before) = (self.decompress.total_in(), self.decompress.total_out());
        let status = self
            .decompress
            .decompress(input, output, FlushDecompress::Sync)
            .map_err(|_| ProtocolError::InvalidCompressedData)?;
        let consumed = (self.decompress.total_in() - in_before) as usize;
        let produced = (self.decompress.total_out() - out_before) as usize;
        Ok((consumed, produced, status))
    }
}

impl fmt::Debug for Inflater {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Inflater")
            .field("context_takeover", &self.context_takeover)
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LIMIT: usize = 1 << 20;

    /// A chat-like JSON message of about `n` bytes: compressible, like real traffic.
    fn json(n: usize) -> Vec<u8> {
        let mut s = String::from("[");
        let mut i = 0;
        while s.len() < n {
            s.push_str(&format!(
                r#"{{"type":"message","room":"lobby","from":"user-{i}","text":"hello number {i}"}},"#
            ));
            i += 1;
        }
        s.truncate(n);
        s.into_bytes()
    }

    /// Bytes that do not compress: a seeded xorshift stream.
    fn noise(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn compress(deflater: &mut Deflater, message: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        deflater.compress(message, &mut out).unwrap();
        out
    }

    fn inflate(inflater: &mut Inflater, payload: &[u8]) -> Result<Vec<u8>, ProtocolError> {
        let mut out = Vec::new();
        inflater.inflate_message(payload, &mut out, LIMIT)?;
        Ok(out)
    }

    /// RFC 7692 §7.2.3: the sample payloads, each of which is "Hello".
    #[test]
    fn rfc_7692_examples_inflate_to_hello() {
        let cases: &[(&str, &[u8])] = &[
            (
                "§7.2.3.1 one compressed block",
                &[0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00],
            ),
            (
                "§7.2.3.3 a stored block",
                &[
                    0x00, 0x05, 0x00, 0xfa, 0xff, 0x48, 0x65, 0x6c, 0x6c, 0x6f, 0x00,
                ],
            ),
            (
                "§7.2.3.4 BFINAL set, then the padding byte",
                &[0xf3, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00, 0x00],
            ),
            (
                "§7.2.3.5 two blocks",
                &[
                    0xf2, 0x48, 0x05, 0x00, 0x00, 0x00, 0xff, 0xff, 0xca, 0xc9, 0xc9, 0x07, 0x00,
                ],
            ),
        ];
        for (name, payload) in cases {
            for takeover in [false, true] {
                let mut inflater = Inflater::new(15, takeover);
                assert_eq!(inflate(&mut inflater, payload).unwrap(), b"Hello", "{name}");
                // The inflater is ready for the next message, whatever the last one did.
                let again = inflate(&mut inflater, &[0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00]);
                assert_eq!(again.unwrap(), b"Hello", "{name}, next message");
            }
        }
    }

    /// RFC 7692 §7.2.3.2: with context takeover the second "Hello" refers to the first.
    #[test]
    fn rfc_7692_shared_window_example() {
        let second = [0xf2, 0x00, 0x11, 0x00, 0x00];
        let mut keeps = Inflater::new(15, true);
        inflate(&mut keeps, &[0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00]).unwrap();
        assert_eq!(inflate(&mut keeps, &second).unwrap(), b"Hello");
        // Without takeover the reference points before the start of the stream.
        let mut resets = Inflater::new(15, false);
        inflate(&mut resets, &[0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00]).unwrap();
        assert_eq!(
            inflate(&mut resets, &second),
            Err(ProtocolError::InvalidCompressedData)
        );
    }

    #[test]
    fn our_hello_is_the_rfc_payload() {
        // Level 1 and level 6 agree on a payload this small (fixed Huffman codes).
        let mut deflater = Deflater::new(15, false);
        assert_eq!(
            compress(&mut deflater, b"Hello"),
            [0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00]
        );
        // §7.2.3.6: an empty message may be sent as the single byte 0x00.
        assert_eq!(compress(&mut deflater, b""), [0x00]);
        assert_eq!(
            inflate(&mut Inflater::new(15, false), &[0x00]).unwrap(),
            b""
        );
    }

    #[test]
    fn round_trips_for_every_window_and_takeover() {
        let messages = [
            Vec::new(),
            b"a".to_vec(),
            json(128),
            json(1024),
            json(70_000),
            noise(5000, 7),
            vec![b'x'; 100_000],
        ];
        for bits in 8..=15 {
            for takeover in [false, true] {
                let mut deflater = Deflater::new(bits, takeover);
                let mut inflater = Inflater::new(bits, takeover);
                for message in &messages {
                    let payload = compress(&mut deflater, message);
                    assert!(!payload.ends_with(&SYNC_TAIL) || payload.len() < 4);
                    let back = inflate(&mut inflater, &payload).unwrap();
                    assert_eq!(&back, message, "bits {bits} takeover {takeover}");
                }
            }
        }
    }

    #[test]
    fn json_compresses_several_times() {
        let message = json(1024);
        let payload = compress(&mut Deflater::new(15, false), &message);
        assert!(
            payload.len() * 3 < message.len(),
            "{} -> {}",
            message.len(),
            payload.len()
        );
    }

    /// Without context takeover every message compresses as a fresh compressor would: so the
    /// payload can be shared by every connection (SPEC §17 `shared`).
    #[test]
    fn no_takeover_output_does_not_depend_on_earlier_messages() {
        let mut shared = Deflater::new(15, false);
        let first = json(2000);
        let second = json(1500);
        compress(&mut shared, &first);
        let after = compress(&mut shared, &second);
        assert_eq!(after, compress(&mut Deflater::new(15, false), &second));
        // And with takeover it does (the second message refers back into the first).
        let mut dedicated = Deflater::new(15, true);
        compress(&mut dedicated, &first);
        let taken = compress(&mut dedicated, &second);
        assert!(
            taken.len() < after.len(),
            "{} vs {}",
            taken.len(),
            after.len()
        );
    }

    /// A message split into frames anywhere inflates the same (RFC 7692 §6.1: only the first
    /// frame has RSV1, the compressed bytes run on through the continuations).
    #[test]
    fn split_at_every_boundary() {
        let message = json(300);
        let payload = compress(&mut Deflater::new(15, false), &message);
        for at in 0..=payload.len() {
            let mut inflater = Inflater::new(15, false);
            let mut out = Vec::new();
            inflater.push(&payload[..at], &mut out, LIMIT).unwrap();
            inflater.push(&payload[at..], &mut out, LIMIT).unwrap();
            inflater.finish(&mut out, LIMIT).unwrap();
            assert_eq!(out, message, "split at {at}");
        }
        // One byte per frame, for a larger message: the output grows geometrically, not
        // once per frame.
        let message = json(200_000);
        let payload = compress(&mut Deflater::new(15, false), &message);
        let mut inflater = Inflater::new(15, false);
        let mut out = Vec::new();
        let mut growths = 0;
        for byte in &payload {
            let capacity = out.capacity();
            inflater.push(&[*byte], &mut out, LIMIT).unwrap();
            growths += usize::from(out.capacity() != capacity);
        }
        inflater.finish(&mut out, LIMIT).unwrap();
        assert_eq!(out, message);
        assert!(growths <= 12, "{growths} reallocations");
    }

    /// A zip bomb: a few KB that inflate to 4 MiB are refused at the limit, and the output
    /// never grew (nor was allocated) past it.
    #[test]
    fn zip_bomb_stops_at_the_limit() {
        // Compressed as an attacker would, at the best ratio: about 1000 to 1.
        let mut squeeze = Compress::new(Compression::best(), false);
        let mut bomb = Vec::with_capacity(64 << 10);
        squeeze
            .compress_vec(&vec![0u8; 4 << 20], &mut bomb, FlushCompress::Sync)
            .unwrap();
        assert!(bomb.ends_with(&SYNC_TAIL));
        bomb.truncate(bomb.len() - 4);
        assert!(bomb.len() < 8_000, "{}", bomb.len());
        for limit in [0, 1, 1000, 4096, 65_536, LIMIT] {
            let mut out = Vec::new();
            let result = Inflater::new(15, false).inflate_message(&bomb, &mut out, limit);
            assert_eq!(result, Err(ProtocolError::MessageTooBig), "limit {limit}");
            assert!(out.len() <= limit, "limit {limit}: {}", out.len());
            assert!(
                out.capacity() <= limit,
                "limit {limit}: cap {}",
                out.capacity()
            );
        }
    }

    /// The limit is exact: a message of `limit` bytes passes, one byte more does not.
    #[test]
    fn limit_is_exact() {
        for len in [0, 1, 4095, 4096, 4097, 10_000, 100_000] {
            let message = json(len);
            let payload = compress(&mut Deflater::new(15, false), &message);
            let mut out = Vec::new();
            Inflater::new(15, false)
                .inflate_message(&payload, &mut out, len)
                .unwrap();
            assert_eq!(out, message);
            if len > 0 {
                let mut out = Vec::new();
                let result = Inflater::new(15, false).inflate_message(&payload, &mut out, len - 1);
                assert_eq!(result, Err(ProtocolError::MessageTooBig), "len {len}");
            }
        }
    }

    /// The limit counts the whole message, across frames: earlier frames' output is in `out`.
    #[test]
    fn limit_spans_frames() {
        let message = json(10_000);
        let payload = compress(&mut Deflater::new(15, false), &message);
        let (a, b) = payload.split_at(payload.len() / 2);
        let mut inflater = Inflater::new(15, false);
        let mut out = Vec::new();
        let first = inflater.push(a, &mut out, 9_999);
        let result = first
            .and_then(|()| inflater.push(b, &mut out, 9_999))
            .and_then(|()| inflater.finish(&mut out, 9_999));
        assert_eq!(result, Err(ProtocolError::MessageTooBig));
        assert!(out.len() <= 9_999);
    }

    #[test]
    fn invalid_data_is_1007() {
        let cases: &[(&str, &[u8])] = &[
            // BTYPE 11 is reserved (RFC 1951 §3.2.3).
            ("reserved block type", &[0xff, 0xff, 0xff]),
            // A stored block whose NLEN is not the complement of LEN.
            (
                "stored block, bad NLEN",
                &[0x00, 0x05, 0x00, 0x00, 0x00, 1, 2, 3, 4, 5],
            ),
            // A distance that reaches before the first byte.
            ("distance too far back", &[0xf2, 0x00, 0x11, 0x00, 0x00]),
        ];
        for (name, payload) in cases {
            let result = inflate(&mut Inflater::new(15, false), payload);
            assert_eq!(result, Err(ProtocolError::InvalidCompressedData), "{name}");
            assert_eq!(
                ProtocolError::InvalidCompressedData.close_code().0,
                1007,
                "{name}"
            );
        }
    }

    #[test]
    fn truncated_data_inflates_what_it_can() {
        // Cut inside a block: zlib waits for more; the appended tail is then read as block
        // data, so the message fails or comes out short. It must never come out whole.
        let message = json(2000);
        let payload = compress(&mut Deflater::new(15, false), &message);
        let cut = &payload[..payload.len() / 2];
        match inflate(&mut Inflater::new(15, false), cut) {
            Ok(out) => assert_ne!(out, message),
            Err(e) => assert_eq!(e, ProtocolError::InvalidCompressedData),
        }
    }

    /// RFC 7692 §7.1.2.1 with 8 bits: our compressor for an 8-bit agreement (zlib's 9-bit
    /// window) never refers back more than 256 bytes. zlib-rs cannot check this for us (its
    /// inflater keeps a 32 KiB window whatever the bits), so `oracle::decode` reads the DEFLATE
    /// stream itself and reports the longest distance. The control case shows the check can
    /// fail: a 10-bit compressor does reach further on the same data.
    #[test]
    fn eight_bit_agreement_never_reaches_past_256_bytes() {
        // Repeats at distances from 100 to 400 bytes.
        let mut message = Vec::new();
        for i in 0..300 {
            let unit = noise(100 + i, i as u64 + 1);
            message.extend_from_slice(&unit);
            message.extend_from_slice(&unit);
        }
        for takeover in [false, true] {
            let mut deflater = Deflater::new(8, takeover);
            let mut history = Vec::new();
            for _ in 0..2 {
                let mut payload = compress(&mut deflater, &message);
                payload.extend_from_slice(&SYNC_TAIL);
                let (out, max_distance) = oracle::decode(&payload, &history).unwrap();
                assert_eq!(out, message);
                assert!(max_distance <= 256, "distance {max_distance}");
                assert!(max_distance > 200, "matches were used: {max_distance}");
                if takeover {
                    history.extend_from_slice(&out);
                }
            }
        }
        let mut wider = compress(&mut Deflater::new(10, false), &message);
        wider.extend_from_slice(&SYNC_TAIL);
        let (out, max_distance) = oracle::decode(&wider, &[]).unwrap();
        assert_eq!(out, message);
        assert!(max_distance > 256, "distance {max_distance}");
    }

    /// A plain DEFLATE decoder (RFC 1951), written for clarity, not speed: the test oracle
    /// that reports how far back the stream's matches reach.
    mod oracle {
        /// Reads bits least significant first (RFC 1951 §3.1.1).
        struct Bits<'a> {
            data: &'a [u8],
            pos: usize,
        }

        impl Bits<'_> {
            fn bit(&mut self) -> Option<u32> {
                let byte = *self.data.get(self.pos / 8)?;
                let bit = (byte >> (self.pos % 8)) & 1;
                self.pos += 1;
                Some(u32::from(bit))
            }

            fn bits(&mut self, n: u32) -> Option<u32> {
                (0..n).try_fold(0, |acc, i| Some(acc | self.bit()? << i))
            }

            fn align(&mut self) {
                self.pos = self.pos.div_ceil(8) * 8;
            }

            fn at_end(&self) -> bool {
                self.pos.div_ceil(8) >= self.data.len()
            }
        }

        /// A canonical Huffman code (RFC 1951 §3.2.2) as (length, code) -> symbol.
        struct Huffman(std::collections::HashMap<(u32, u32), u32>);

        impl Huffman {
            fn new(lengths: &[u32]) -> Huffman {
                let mut map = std::collections::HashMap::new();
                let mut code = 0;
                for len in 1..=15 {
                    for (symbol, _) in lengths.iter().enumerate().filter(|(_, l)| **l == len) {
                        map.insert((len, code), symbol as u32);
                        code += 1;
                    }
                    code <<= 1;
                }
                Huffman(map)
            }

            /// Huffman codes are sent most significant bit first.
            fn decode(&self, bits: &mut Bits<'_>) -> Option<u32> {
                let mut code = 0;
                for len in 1..=15 {
                    code = code << 1 | bits.bit()?;
                    if let Some(symbol) = self.0.get(&(len, code)) {
                        return Some(*symbol);
                    }
                }
                None
            }
        }

        const LENGTH_BASE: [u32; 29] = [
            3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99,
            115, 131, 163, 195, 227, 258,
        ];
        const LENGTH_EXTRA: [u32; 29] = [
            0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0,
        ];
        const DIST_BASE: [u32; 30] = [
            1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129, 193, 257, 385, 513, 769, 1025,
            1537, 2049, 3073, 4097, 6145, 8193, 12289, 16385, 24577,
        ];
        const DIST_EXTRA: [u32; 30] = [
            0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12,
            12, 13, 13,
        ];
        /// RFC 1951 §3.2.7: the order code length code lengths are sent in.
        const CL_ORDER: [usize; 19] = [
            16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15,
        ];

        /// Decodes blocks until the input runs out (a sync-flushed stream has no final
        /// block). `history` is what earlier messages left in the window. Returns the output
        /// and the longest match distance used.
        pub fn decode(data: &[u8], history: &[u8]) -> Option<(Vec<u8>, usize)> {
            let mut bits = Bits { data, pos: 0 };
            let mut window = history.to_vec();
            let start = window.len();
            let mut max_distance = 0;
            while !bits.at_end() {
                let last = bits.bit()? == 1;
                match bits.bits(2)? {
                    0 => {
                        bits.align();
                        let len = bits.bits(16)?;
                        let nlen = bits.bits(16)?;
                        if len != !nlen & 0xffff {
                            return None;
                        }
                        for _ in 0..len {
                            window.push(bits.bits(8)? as u8);
                        }
                    }
                    kind @ (1 | 2) => {
                        let (litlen, dist) = if kind == 1 {
                            let mut lengths = vec![8; 144];
                            lengths.extend([9; 112]);
                            lengths.extend([7; 24]);
                            lengths.extend([8; 8]);
                            (Huffman::new(&lengths), Huffman::new(&[5; 30]))
                        } else {
                            dynamic_codes(&mut bits)?
                        };
                        loop {
                            let symbol = litlen.decode(&mut bits)?;
                            match symbol {
                                0..=255 => window.push(symbol as u8),
                                256 => break,
                                _ => {
                                    let i = (symbol - 257) as usize;
                                    let len = LENGTH_BASE.get(i)? + bits.bits(LENGTH_EXTRA[i])?;
                                    let d = dist.decode(&mut bits)? as usize;
                                    let distance =
                                        (DIST_BASE.get(d)? + bits.bits(DIST_EXTRA[d])?) as usize;
                                    if distance > window.len() {
                                        return None;
                                    }
                                    max_distance = max_distance.max(distance);
                                    for _ in 0..len {
                                        window.push(window[window.len() - distance]);
                                    }
                                }
                            }
                        }
                    }
                    _ => return None,
                }
                if last {
                    break;
                }
            }
            Some((window.split_off(start), max_distance))
        }

        fn dynamic_codes(bits: &mut Bits<'_>) -> Option<(Huffman, Huffman)> {
            let hlit = bits.bits(5)? as usize + 257;
            let hdist = bits.bits(5)? as usize + 1;
            let hclen = bits.bits(4)? as usize + 4;
            let mut cl_lengths = [0; 19];
            for &i in &CL_ORDER[..hclen] {
                cl_lengths[i] = bits.bits(3)?;
            }
            let cl = Huffman::new(&cl_lengths);
            let mut lengths = Vec::new();
            while lengths.len() < hlit + hdist {
                match cl.decode(bits)? {
                    len @ 0..=15 => lengths.push(len),
                    16 => {
                        let previous = *lengths.last()?;
                        let n = 3 + bits.bits(2)?;
                        lengths.extend((0..n).map(|_| previous));
                    }
                    17 => {
                        let n = 3 + bits.bits(3)?;
                        lengths.extend((0..n).map(|_| 0));
                    }
                    _ => {
                        let n = 11 + bits.bits(7)?;
                        lengths.extend((0..n).map(|_| 0));
                    }
                }
            }
            let (litlen, dist) = lengths.split_at(hlit);
            Some((Huffman::new(litlen), Huffman::new(dist)))
        }
    }

    #[test]
    fn reused_output_buffer_is_appended_to() {
        let mut out = b"prefix".to_vec();
        Deflater::new(15, false)
            .compress(b"Hello", &mut out)
            .unwrap();
        assert_eq!(out, b"prefix\xf2\x48\xcd\xc9\xc9\x07\x00");
        let mut back = b">".to_vec();
        Inflater::new(15, false)
            .inflate_message(&out[6..], &mut back, LIMIT)
            .unwrap();
        assert_eq!(back, b">Hello");
    }

    proptest! {
        #[test]
        fn any_message_round_trips(
            message in proptest::collection::vec(any::<u8>(), 0..3000),
            bits in 8u8..=15,
            takeover in any::<bool>(),
        ) {
            let mut deflater = Deflater::new(bits, takeover);
            let mut inflater = Inflater::new(bits, takeover);
            for _ in 0..2 {
                let payload = compress(&mut deflater, &message);
                prop_assert_eq!(inflate(&mut inflater, &payload).unwrap(), message.clone());
            }
        }

        /// Whatever a peer sends, inflating returns (no panic, no hang) within the limit.
        #[test]
        fn arbitrary_payloads_are_bounded(
            payload in proptest::collection::vec(any::<u8>(), 0..2000),
            limit in 0usize..100_000,
        ) {
            let mut out = Vec::new();
            let result = Inflater::new(15, true).inflate_message(&payload, &mut out, limit);
            prop_assert!(out.len() <= limit);
            if let Err(e) = result {
                prop_assert!(matches!(
                    e,
                    ProtocolError::InvalidCompressedData | ProtocolError::MessageTooBig
                ));
            }
        }
    }
}
