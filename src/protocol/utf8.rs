//! An incremental UTF-8 validator for text messages that arrive in fragments.
//!
//! Owns: `Utf8Validator`, which checks a byte stream fed in arbitrary pieces and fails on the
//! first piece that makes the stream impossible to complete into valid UTF-8.
//! Does not: decode characters, keep the text (the assembler does), or validate close reasons
//! (those arrive whole; `message.rs` uses `std::str::from_utf8` for them).
//!
//! SPEC §4, RFC 6455 §8.1: an endpoint that receives invalid UTF-8 in a text message fails the
//! connection (close 1007). The check runs per fragment so that a bad message is rejected at its
//! first bad fragment, not after the whole message was buffered (Autobahn case 6.4 tests this).
//!
//! How: `std::str::from_utf8` does the work. Its error says how far the input was valid and,
//! through `Utf8Error::error_len`, whether the rest is *invalid* (`Some`: no continuation can fix
//! it, fail now) or merely *incomplete* (`None`: a character was cut at the end of the piece).
//! The incomplete tail (at most 3 bytes) is carried into the next `feed`. Because std rejects a
//! lead byte followed by an impossible second byte (`F4 90`, `ED A0`, `E0 80`) and lone invalid
//! bytes (`C0`, `F5`..`FF`) as soon as it sees them, the carried tail is always a prefix of some
//! valid character, and the validator fails fast.

use super::error::ProtocolError;

/// Validates UTF-8 fed in pieces. `Default` is the state at the start of a message.
///
/// Invariant: `carry[..carry_len]` is an incomplete but valid prefix of one UTF-8 character
/// (1 to 3 bytes), or `carry_len == 0`.
#[derive(Clone, Debug, Default)]
pub struct Utf8Validator {
    carry: [u8; 4],
    carry_len: usize,
}

impl Utf8Validator {
    /// A validator at the start of a message.
    pub fn new() -> Utf8Validator {
        Utf8Validator::default()
    }

    /// Checks the next piece of the stream.
    ///
    /// # Errors
    /// `ProtocolError::InvalidUtf8` as soon as the bytes fed so far cannot be the start of valid
    /// UTF-8. After an error the validator's state is unspecified; call `reset` to reuse it.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<(), ProtocolError> {
        // If the piece ended before a carried character did, `rest` is empty and all is carried.
        let rest = self.complete_carried_char(bytes)?;
        match std::str::from_utf8(rest) {
            Ok(_) => Ok(()),
            Err(e) if e.error_len().is_some() => Err(ProtocolError::InvalidUtf8),
            Err(e) => {
                // Incomplete character at the end: keep it for the next piece.
                let tail = rest.get(e.valid_up_to()..).unwrap_or_default();
                self.carry_tail(tail)
            }
        }
    }

    /// Ends the stream: the message is valid only if no character was left incomplete.
    /// Resets the validator for the next message, whatever the result.
    ///
    /// # Errors
    /// `ProtocolError::InvalidUtf8` if the stream ended in the middle of a character.
    pub fn finish(&mut self) -> Result<(), ProtocolError> {
        let complete = self.carry_len == 0;
        self.reset();
        if complete {
            Ok(())
        } else {
            Err(ProtocolError::InvalidUtf8)
        }
    }

    /// Forgets any carried bytes: back to the start of a message.
    pub fn reset(&mut self) {
        self.carry_len = 0;
    }

    /// Is the validator where `new` leaves it (no character carried over)?
    pub fn is_at_start(&self) -> bool {
        self.carry_len == 0
    }

    /// If a character was cut at the end of the previous piece, completes it with the first
    /// bytes of `bytes` and returns the bytes after it. If `bytes` is too short to complete it,
    /// carries them too and returns an empty slice.
    fn complete_carried_char<'b>(&mut self, bytes: &'b [u8]) -> Result<&'b [u8], ProtocolError> {
        if self.carry_len == 0 {
            return Ok(bytes);
        }
        let carried = self.carry_len;
        let missing = sequence_len(self.carry[0]).saturating_sub(carried);
        let (head, rest) = bytes.split_at(missing.min(bytes.len()));

        let mut char_bytes = self.carry;
        let end = carried + head.len(); // <= sequence_len <= 4, by the invariant
        for (slot, &b) in char_bytes.iter_mut().skip(carried).zip(head) {
            *slot = b;
        }
        let candidate = char_bytes.get(..end).unwrap_or_default();
        match std::str::from_utf8(candidate) {
            Ok(_) => {
                self.carry_len = 0;
                Ok(rest)
            }
            Err(e) if e.error_len().is_some() => Err(ProtocolError::InvalidUtf8),
            Err(_) => {
                // Still incomplete: `bytes` was shorter than what the character needs.
                self.carry = char_bytes;
                self.carry_len = end;
                Ok(&[])
            }
        }
    }

    fn carry_tail(&mut self, tail: &[u8]) -> Result<(), ProtocolError> {
        // std reports an incomplete tail only when it is shorter than a character (<= 3 bytes).
        debug_assert!(
            tail.len() <= 3,
            "incomplete UTF-8 tail of {} bytes",
            tail.len()
        );
        if tail.len() > 3 {
            return Err(ProtocolError::InvalidUtf8);
        }
        self.carry[..tail.len()].copy_from_slice(tail);
        self.carry_len = tail.len();
        Ok(())
    }
}

/// Length of the UTF-8 sequence a lead byte announces (RFC 3629 §4). Only called on the first
/// byte of a carried prefix, which std has already accepted as a valid lead byte.
fn sequence_len(lead: u8) -> usize {
    match lead {
        0xC2..=0xDF => 2,
        0xE0..=0xEF => 3,
        0xF0..=0xF4 => 4,
        _ => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Feeds `pieces` one by one; returns the index of the piece that failed, `pieces.len()` if
    /// `finish` failed, or `None` if the whole stream was valid.
    fn first_failure(pieces: &[&[u8]]) -> Option<usize> {
        let mut v = Utf8Validator::default();
        for (i, piece) in pieces.iter().enumerate() {
            if v.feed(piece).is_err() {
                return Some(i);
            }
        }
        v.finish().err().map(|_| pieces.len())
    }

    /// What a fail-fast validator must answer, computed with std on the concatenated prefixes:
    /// the first piece after which std calls the prefix *invalid* (not just incomplete).
    fn expected_failure(pieces: &[&[u8]]) -> Option<usize> {
        let mut prefix = Vec::new();
        for (i, piece) in pieces.iter().enumerate() {
            prefix.extend_from_slice(piece);
            if let Err(e) = std::str::from_utf8(&prefix) {
                if e.error_len().is_some() {
                    return Some(i);
                }
            }
        }
        std::str::from_utf8(&prefix).err().map(|_| pieces.len())
    }

    /// (name, pieces fed in order, index of the piece that must fail)
    type Case<'a> = (&'a str, &'a [&'a [u8]], Option<usize>);

    fn check(name: &str, pieces: &[&[u8]], expected: Option<usize>) {
        assert_eq!(first_failure(pieces), expected, "{name}");
        assert_eq!(expected_failure(pieces), expected, "{name} (oracle)");
    }

    #[test]
    fn table() {
        let cases: &[Case] = &[
            ("empty", &[], None),
            ("empty pieces", &[b"", b""], None),
            ("ascii", &[b"hello"], None),
            ("euro whole", &["€".as_bytes()], None),
            ("euro split 1+2", &[&[0xE2], &[0x82, 0xAC]], None),
            ("euro split 1+1+1", &[&[0xE2], &[0x82], &[0xAC]], None),
            (
                "euro with empty pieces",
                &[&[0xE2], &[], &[0x82], &[], &[0xAC]],
                None,
            ),
            ("four-byte split 3+1", &[&[0xF0, 0x9F, 0x98], &[0x80]], None),
            (
                "char then more text",
                &[&[b'a', 0xC3], &[0xA9, b'b', 0xE2], &[0x82, 0xAC]],
                None,
            ),
            ("truncated at end", &[&[b'a', 0xE2, 0x82]], Some(1)),
            ("truncated after pieces", &[&[0xF0], &[0x9F]], Some(2)),
            // Fail fast: prefixes that no continuation can make valid fail on that feed.
            ("F4 90: above U+10FFFF", &[&[0xF4, 0x90]], Some(0)),
            ("F4 then 90", &[&[0xF4], &[0x90]], Some(1)),
            ("ED A0: surrogate", &[&[0xED, 0xA0]], Some(0)),
            ("ED then A0", &[&[0xED], &[0xA0, 0x80]], Some(1)),
            ("C0: overlong lead", &[&[0xC0]], Some(0)),
            ("C1", &[b"ok", &[0xC1]], Some(1)),
            ("E0 80: overlong", &[&[0xE0], &[0x80]], Some(1)),
            ("F0 80: overlong", &[&[0xF0, 0x80]], Some(0)),
            ("F5", &[&[0xF5]], Some(0)),
            ("FF", &[b"abc", b"def", &[0xFF]], Some(2)),
            ("lone continuation", &[&[0x80]], Some(0)),
            ("lead then ascii", &[&[0xC3], b"a"], Some(1)),
            ("3-byte cut by ascii", &[&[0xE2, 0x82], b"a"], Some(1)),
        ];
        for &(name, pieces, expected) in cases {
            check(name, pieces, expected);
        }
    }

    #[test]
    fn every_two_byte_string_split_every_way() {
        for a in 0..=255u8 {
            for b in 0..=255u8 {
                let s = [a, b];
                for split in 0..=2 {
                    let (x, y) = s.split_at(split);
                    let pieces: &[&[u8]] = &[x, y];
                    assert_eq!(first_failure(pieces), expected_failure(pieces), "{s:02X?}");
                }
            }
        }
    }

    #[test]
    fn reset_forgets_carried_bytes() {
        let mut v = Utf8Validator::default();
        assert_eq!(v.feed(&[0xE2, 0x82]), Ok(()));
        v.reset();
        assert_eq!(v.feed(b"plain"), Ok(()));
        assert_eq!(v.finish(), Ok(()));
        // `finish` resets too, even after a failure.
        assert_eq!(v.feed(&[0xE2]), Ok(()));
        assert_eq!(v.finish(), Err(ProtocolError::InvalidUtf8));
        assert_eq!(v.finish(), Ok(()));
    }

    /// Random bytes are almost always invalid early; valid strings with one corrupted byte reach
    /// the interesting cases (a bad byte deep inside a multi-byte character).
    fn byte_strings() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..40),
            any::<String>().prop_map(String::into_bytes),
            (any::<String>(), any::<usize>(), any::<u8>()).prop_map(|(s, at, byte)| {
                let mut b = s.into_bytes();
                if !b.is_empty() {
                    let i = at % b.len();
                    b[i] = byte;
                }
                b
            }),
        ]
    }

    proptest! {
        #[test]
        fn same_verdict_as_std_at_random_splits(
            bytes in byte_strings(),
            cuts in proptest::collection::vec(any::<usize>(), 0..6),
        ) {
            let mut points: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
            points.sort_unstable();
            let mut pieces: Vec<&[u8]> = Vec::new();
            let mut start = 0;
            for p in points {
                pieces.push(&bytes[start..p]);
                start = p;
            }
            pieces.push(&bytes[start..]);

            let verdict = first_failure(&pieces).is_none();
            prop_assert_eq!(verdict, std::str::from_utf8(&bytes).is_ok());
            // Fail fast: the failing piece is exactly the first one std calls invalid.
            prop_assert_eq!(first_failure(&pieces), expected_failure(&pieces));
        }
    }
}
