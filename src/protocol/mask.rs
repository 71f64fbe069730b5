//! Payload masking of RFC 6455 §5.3: XOR with a 4-byte key, the hot loop of the server.
//!
//! Owns: `unmask` (word-at-a-time), `unmask_from` (for a payload that arrives in pieces) and
//! `unmask_naive` (the byte-at-a-time oracle the fast one is tested against).
//! Does not: decide whether a frame must be masked (`frame.rs` does) or pick mask keys (the
//! client does).
//!
//! RFC 6455 §5.3: byte `i` of the payload is XORed with byte `i % 4` of the masking key. Masking
//! and unmasking are the same operation, so these functions also mask outgoing client frames.
//!
//! Nothing here panics: every function accepts any buffer, key and offset.

/// The oracle: byte `i` of `buf` is payload byte `offset + i`, XORed with key byte
/// `(offset + i) % 4` (RFC 6455 §5.3).
///
/// This is the obviously correct version. `unmask` must always agree with it; the tests and the
/// fuzz target check that.
pub fn unmask_naive(buf: &mut [u8], key: [u8; 4], offset: usize) {
    // `offset % 4 + i % 4` instead of `offset + i`: the sum cannot overflow for any offset.
    for (i, byte) in buf.iter_mut().enumerate() {
        *byte ^= key[(offset % 4 + i % 4) % 4];
    }
}

/// Unmasks a buffer that starts at payload position `offset` (a payload received in pieces, or
/// unmasked in several calls).
///
/// Position `offset + i` uses key byte `(offset + i) % 4`, which is byte `i % 4` of the key
/// rotated left by `offset % 4`; so this is `unmask` with a rotated key.
pub fn unmask_from(buf: &mut [u8], key: [u8; 4], offset: usize) {
    unmask(buf, rotate_key(key, offset));
}

/// Unmasks (or masks) a whole payload in place, starting at payload position 0.
///
/// Why not the byte loop of `unmask_naive`: the server runs this over every byte it receives.
/// XORing eight bytes at a time with the key repeated twice (`u64`) does the same work in an
/// eighth of the steps and lets the compiler vectorise the loop. `benches/frame.rs` measures it
/// against `unmask_naive` and a plain `memcpy` of the same buffer (group `unmask_64KiB`), and on
/// the small unaligned payloads a server mostly sees (group `unmask_small`). On the 2-core
/// development machine: word loop ~54 GiB/s, memcpy ~47 GiB/s, byte loop ~2.7 GiB/s (64 KiB,
/// cache-resident); a 64-byte payload at an odd address in ~6 ns.
///
/// Shape: the whole payload in `u64` words, then a tail of fewer than 8 bytes. The words are
/// loaded wherever they fall: unaligned loads cost the same as aligned ones on x86-64 and
/// AArch64 for cached data, and an earlier version that first walked a byte-wise head up to an
/// 8-byte boundary spent more on that head than on the words for payloads under ~128 bytes
/// (15.1 ns vs 6 ns for 64 bytes, `unmask_small`). All in safe code: `chunks_exact_mut` plus
/// `from_ne_bytes`/`to_ne_bytes` compile to plain word loads and stores.
pub fn unmask(buf: &mut [u8], key: [u8; 4]) {
    // The key twice over, as a word read from memory would hold it. Built from the key as one
    // `u32` (the same bytes in the same order in either half, so right in either byte order):
    // written as `u64::from_ne_bytes` of eight key bytes, it compiled to some 25 shifts and ORs,
    // a third of the whole call for a 64-byte payload (callgrind, docs/benchmarks.md).
    let half = u64::from(u32::from_ne_bytes(key));
    let word_key = half << 32 | half;
    let mut words = buf.chunks_exact_mut(8);
    for chunk in &mut words {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let unmasked = u64::from_ne_bytes(word) ^ word_key;
        chunk.copy_from_slice(&unmasked.to_ne_bytes());
    }
    // The whole words cover a multiple of 8 (hence of 4) bytes, so the tail starts with key
    // byte 0.
    for (i, byte) in words.into_remainder().iter_mut().enumerate() {
        *byte ^= key[i % 4];
    }
}

/// The key as seen from payload position `offset`: rotated left by `offset % 4`.
fn rotate_key(mut key: [u8; 4], offset: usize) -> [u8; 4] {
    key.rotate_left(offset % 4);
    key
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const FIXED_KEYS: [[u8; 4]; 4] = [
        [0, 0, 0, 0],
        [0xFF, 0xFF, 0xFF, 0xFF],
        [0x37, 0xFA, 0x21, 0x3D], // RFC 6455 §5.7
        [0x01, 0x02, 0x04, 0x80],
    ];

    /// `unmask_from` agrees with the oracle on `data` placed at `slice_start` inside a larger
    /// buffer (so the fast path sees every alignment).
    fn check(data: &[u8], key: [u8; 4], offset: usize, slice_start: usize) {
        let mut expected = data.to_vec();
        unmask_naive(&mut expected, key, offset);

        let mut backing = vec![0xAAu8; slice_start + data.len()];
        backing[slice_start..].copy_from_slice(data);
        unmask_from(&mut backing[slice_start..], key, offset);
        assert_eq!(
            &backing[slice_start..],
            &expected[..],
            "len {} key {key:?} offset {offset} start {slice_start}",
            data.len()
        );
        assert!(backing[..slice_start].iter().all(|&b| b == 0xAA));
        if offset == 0 {
            let mut direct = data.to_vec();
            unmask(&mut direct, key);
            assert_eq!(direct, expected);
        }
    }

    #[test]
    fn fast_agrees_with_naive_for_lengths_0_to_70_and_all_offsets() {
        for len in 0..=70usize {
            let data: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            for key in FIXED_KEYS {
                for offset in 0..8 {
                    for slice_start in 0..8 {
                        check(&data, key, offset, slice_start);
                    }
                }
            }
        }
    }

    #[test]
    fn rfc_6455_5_7_masked_hello() {
        let mut payload = [0x7f, 0x9f, 0x4d, 0x51, 0x58];
        unmask(&mut payload, [0x37, 0xfa, 0x21, 0x3d]);
        assert_eq!(&payload, b"Hello");
    }

    #[test]
    fn unmasking_in_pieces_equals_unmasking_whole() {
        let key = [0x12, 0x34, 0x56, 0x78];
        let data: Vec<u8> = (0..100u8).collect();
        let mut whole = data.clone();
        unmask(&mut whole, key);
        for split in 0..=data.len() {
            let mut pieces = data.clone();
            let (a, b) = pieces.split_at_mut(split);
            unmask_from(a, key, 0);
            unmask_from(b, key, split);
            assert_eq!(pieces, whole, "split at {split}");
        }
    }

    #[test]
    fn huge_offsets_do_not_overflow() {
        let mut a = [1u8, 2, 3, 4, 5];
        let mut b = a;
        unmask_naive(&mut a, [9, 8, 7, 6], usize::MAX);
        unmask_from(&mut b, [9, 8, 7, 6], usize::MAX);
        assert_eq!(a, b);
        // usize::MAX % 4 == 3, so the first byte uses key byte 3.
        assert_eq!(a[0], 1 ^ 6);
    }

    proptest! {
        #[test]
        fn fast_agrees_with_naive_random(
            data in proptest::collection::vec(any::<u8>(), 0..=70),
            key in any::<[u8; 4]>(),
            offset in 0usize..8,
            slice_start in 0usize..8,
        ) {
            check(&data, key, offset, slice_start);
        }

        #[test]
        fn fast_agrees_with_naive_long(
            data in proptest::collection::vec(any::<u8>(), 0..2000),
            key in any::<[u8; 4]>(),
            offset in any::<usize>(),
        ) {
            check(&data, key, offset, 3);
        }
    }
}
