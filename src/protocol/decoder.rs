//! A streaming decoder that owns its buffer: bytes in, owned events out.
//!
//! Owns: `StreamDecoder` (frame decode plus message assembly over a growing buffer) and
//! `OwnedEvent`, for the client, the load generator and tests; and `fuzz_check`, the invariants
//! the `frame_decode` fuzz target asserts.
//! Does not: serve the reactor's hot path (the reactor parses frames straight out of its shared
//! receive buffer with `frame::decode_frame` and `message::Assembler`, SPEC §2), or do I/O.
//!
//! SPEC §4, §7; RFC 6455 §5 (through `frame` and `message`).
//!
//! Behaviour: an error is sticky (every later `next_event` returns it again: the connection is
//! failing); after a Close event the decoder yields nothing more (RFC 6455 §5.5.1: Close is the
//! last frame a peer sends).

use super::close::CloseCode;
use super::error::ProtocolError;
use super::frame::{self, decode_frame, OpCode, Role};
use super::message::{Assembler, Event};

/// An `Event` that owns its bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OwnedEvent {
    Message { opcode: OpCode, data: Vec<u8> },
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Close(Option<(CloseCode, String)>),
}

impl From<Event<'_>> for OwnedEvent {
    fn from(event: Event<'_>) -> OwnedEvent {
        match event {
            Event::Message { opcode, data } => OwnedEvent::Message {
                opcode,
                data: data.into_owned(),
            },
            Event::Ping(payload) => OwnedEvent::Ping(payload.to_vec()),
            Event::Pong(payload) => OwnedEvent::Pong(payload.to_vec()),
            Event::Close(frame) => OwnedEvent::Close(frame.map(|f| (f.code, f.reason.to_string()))),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Open,
    /// A Close frame was decoded; later bytes are ignored.
    Closed,
    /// The peer broke the protocol; the error is reported again on every call.
    Failed(ProtocolError),
}

/// Decodes a byte stream fed in arbitrary pieces into events.
///
/// Invariant: `buf[consumed..]` holds the bytes not yet decoded (a partial frame at most, once
/// `next_event` has returned `Ok(None)`); `buf[..consumed]` is dead and dropped on the next feed.
#[derive(Debug)]
pub struct StreamDecoder {
    role: Role,
    max_message: usize,
    buf: Vec<u8>,
    consumed: usize,
    assembler: Assembler,
    state: State,
}

impl StreamDecoder {
    /// A decoder for the frames that `role` receives, with messages bounded by `max_message`.
    pub fn new(role: Role, max_message: usize) -> Self {
        StreamDecoder {
            role,
            max_message,
            buf: Vec::new(),
            consumed: 0,
            assembler: Assembler::new(max_message),
            state: State::Open,
        }
    }

    /// Appends received bytes. Decode them with `next_event`.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.state != State::Open {
            return;
        }
        if self.consumed > 0 {
            self.buf.drain(..self.consumed);
            self.consumed = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete event, or `Ok(None)` when the bytes fed so far hold none.
    ///
    /// # Errors
    /// Any error of `frame::decode_frame` or `Assembler::push`; once returned, it is returned by
    /// every later call.
    pub fn next_event(&mut self) -> Result<Option<OwnedEvent>, ProtocolError> {
        loop {
            match self.state {
                State::Open => {}
                State::Closed => return Ok(None),
                State::Failed(e) => return Err(e),
            }
            match self.next_frame_event() {
                Ok(Step::NeedMore) => return Ok(None),
                Ok(Step::Fragment) => continue,
                Ok(Step::Event(event)) => {
                    if matches!(event, OwnedEvent::Close(_)) {
                        self.stop(State::Closed);
                    }
                    return Ok(Some(event));
                }
                Err(e) => {
                    self.stop(State::Failed(e));
                    return Err(e);
                }
            }
        }
    }

    /// Bytes held for a partial frame or a partial message (bounded by the frame and message
    /// limits once `next_event` has returned `Ok(None)`).
    pub fn buffered_bytes(&self) -> usize {
        self.buf.len().saturating_sub(self.consumed) + self.assembler.buffered_bytes()
    }

    /// Enters a final state and frees the buffers: no later byte will be decoded.
    fn stop(&mut self, state: State) {
        self.state = state;
        self.buf = Vec::new();
        self.consumed = 0;
        self.assembler.reset();
    }

    /// Decodes one frame, if whole, and passes it to the assembler.
    fn next_frame_event(&mut self) -> Result<Step, ProtocolError> {
        let pending = self.buf.get_mut(self.consumed..).unwrap_or_default();
        let Some(frame) = decode_frame(pending, self.role, self.max_message as u64)? else {
            return Ok(Step::NeedMore);
        };
        let pending = self.buf.get(self.consumed..).unwrap_or_default();
        let payload = pending.get(frame.payload).unwrap_or_default();
        // Cannot overflow: the frame lies inside `buf`, so this stays <= `buf.len()`.
        self.consumed += frame.len;
        Ok(match self.assembler.push(&frame.header, payload)? {
            None => Step::Fragment,
            Some(event) => Step::Event(event.into()),
        })
    }
}

enum Step {
    NeedMore,
    Fragment,
    Event(OwnedEvent),
}

/// The invariants the `frame_decode` fuzz target checks on arbitrary `data` (see fuzz/README.md).
/// Panics (through `assert!`) when one is broken; that is what the fuzzer looks for.
///
/// The first two bytes choose the set-up: role, a small or large message limit, and the seed of
/// the split points; the rest is the byte stream. Checked:
/// 1. nothing panics;
/// 2. the stream fed in pieces gives the same events and the same final error as fed whole;
/// 3. memory stays bounded: what the decoder buffers after draining is within its limits;
/// 4. every event, encoded again as a client would send it (masked, a data message split in
///    two fragments) and decoded by a server, comes back the same.
#[doc(hidden)]
pub fn fuzz_check(data: &[u8]) {
    let [setup, seed, stream @ ..] = data else {
        return;
    };
    let role = if setup & 1 == 0 {
        Role::Server
    } else {
        Role::Client
    };
    // A small limit reaches MessageTooBig; a large one lets long messages through.
    let max_message = if setup & 2 == 0 { 64 } else { 1 << 20 };

    let whole = decode_all(role, max_message, &[stream]);
    let pieces = split_points(stream, *seed);
    let split = decode_all(role, max_message, &pieces);
    assert_eq!(whole, split, "fed whole vs fed in {} pieces", pieces.len());

    let key = [*seed, *setup, 0x5A, seed.wrapping_mul(31)];
    for event in &whole.0 {
        let mut wire = Vec::new();
        encode_as_client(&mut wire, event, key);
        let again = decode_all(Role::Server, max_message, &[&wire]);
        assert_eq!(again, (vec![event.clone()], None), "re-encoded {event:?}");
    }
}

/// Every event a decoder gives for `pieces` fed one at a time, and the error it ended with.
fn decode_all(
    role: Role,
    max_message: usize,
    pieces: &[&[u8]],
) -> (Vec<OwnedEvent>, Option<ProtocolError>) {
    let mut decoder = StreamDecoder::new(role, max_message);
    let mut events = Vec::new();
    for piece in pieces {
        decoder.feed(piece);
        loop {
            match decoder.next_event() {
                Ok(Some(event)) => events.push(event),
                Ok(None) => break,
                Err(e) => return (events, Some(e)),
            }
        }
        // A partial frame is at most a header plus a payload within the limit, and a partial
        // message is within the limit.
        let bound = 2 * (max_message + frame::MAX_HEADER_LEN);
        assert!(decoder.buffered_bytes() <= bound, "unbounded buffering");
    }
    (events, None)
}

/// Splits `stream` into pieces of 1 to 16 bytes, lengths drawn from a small PRNG seeded with
/// `seed` (so a fuzz input is reproducible).
fn split_points(stream: &[u8], seed: u8) -> Vec<&[u8]> {
    let mut state = u32::from(seed) | 0x100;
    let mut pieces = Vec::new();
    let mut rest = stream;
    while !rest.is_empty() {
        // xorshift32
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let len = (state % 16) as usize + 1;
        let (piece, tail) = rest.split_at(len.min(rest.len()));
        pieces.push(piece);
        rest = tail;
    }
    pieces
}

/// Encodes `event` the way a client would send it: masked, data messages in two fragments.
fn encode_as_client(out: &mut Vec<u8>, event: &OwnedEvent, key: [u8; 4]) {
    let mask = Some(key);
    match event {
        OwnedEvent::Message { opcode, data } => {
            let (first, second) = data.split_at(data.len() / 2);
            frame::encode_into(out, false, *opcode, first, mask);
            frame::encode_into(out, true, OpCode::Continuation, second, mask);
        }
        OwnedEvent::Ping(p) => frame::encode_into(out, true, OpCode::Ping, p, mask),
        OwnedEvent::Pong(p) => frame::encode_into(out, true, OpCode::Pong, p, mask),
        OwnedEvent::Close(close) => {
            let payload = match close {
                Some((code, reason)) => frame::close_payload(*code, reason),
                None => Vec::new(),
            };
            frame::encode_into(out, true, OpCode::Close, &payload, mask);
        }
    }
}

#[cfg(test)]
#[allow(clippy::panic)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MAX: usize = 1 << 20;

    fn msg(opcode: OpCode, data: &[u8]) -> OwnedEvent {
        OwnedEvent::Message {
            opcode,
            data: data.to_vec(),
        }
    }

    /// A small conversation as a client sends it: a fragmented text with a ping between its
    /// fragments (and a character split across them), a one-frame binary, a pong, a close.
    fn conversation() -> (Vec<u8>, Vec<OwnedEvent>) {
        let key = Some([0x11, 0x22, 0x33, 0x44]);
        let mut wire = Vec::new();
        frame::encode_into(&mut wire, false, OpCode::Text, b"h\xC3", key);
        frame::encode_into(&mut wire, true, OpCode::Ping, b"p", key);
        frame::encode_into(&mut wire, true, OpCode::Continuation, b"\xA9!", key);
        frame::encode_into(&mut wire, true, OpCode::Binary, &[1, 2, 3], key);
        frame::encode_into(&mut wire, true, OpCode::Pong, b"", key);
        let close = frame::close_payload(CloseCode::NORMAL, "done");
        frame::encode_into(&mut wire, true, OpCode::Close, &close, key);
        let events = vec![
            OwnedEvent::Ping(b"p".to_vec()),
            msg(OpCode::Text, "hé!".as_bytes()),
            msg(OpCode::Binary, &[1, 2, 3]),
            OwnedEvent::Pong(vec![]),
            OwnedEvent::Close(Some((CloseCode::NORMAL, "done".to_string()))),
        ];
        (wire, events)
    }

    fn check(name: &str, pieces: &[&[u8]], want: &(Vec<OwnedEvent>, Option<ProtocolError>)) {
        assert_eq!(&decode_all(Role::Server, MAX, pieces), want, "{name}");
    }

    #[test]
    fn whole_conversation() {
        let (wire, events) = conversation();
        check("whole", &[&wire], &(events, None));
    }

    #[test]
    fn same_events_at_every_split_point_and_every_pair() {
        let (wire, events) = conversation();
        let want = (events, None);
        let n = wire.len();
        for i in 0..=n {
            check(&format!("split {i}"), &[&wire[..i], &wire[i..]], &want);
            for j in i..=n {
                let pieces: &[&[u8]] = &[&wire[..i], &wire[i..j], &wire[j..]];
                check(&format!("split {i},{j}"), pieces, &want);
            }
        }
        let bytes: Vec<&[u8]> = wire.chunks(1).collect();
        check("byte by byte", &bytes, &want);
    }

    #[test]
    fn errors_are_sticky_and_close_ends_the_stream() {
        let mut d = StreamDecoder::new(Role::Server, MAX);
        d.feed(&[0x81, 0x05]); // unmasked frame to a server
        assert_eq!(d.next_event(), Err(ProtocolError::UnmaskedFrame));
        d.feed(&frame::encode(true, OpCode::Ping, b"", Some([1; 4])));
        assert_eq!(d.next_event(), Err(ProtocolError::UnmaskedFrame));

        let mut d = StreamDecoder::new(Role::Client, MAX);
        d.feed(&frame::encode(true, OpCode::Close, &[], None));
        d.feed(&frame::encode(true, OpCode::Text, b"after", None));
        assert_eq!(d.next_event(), Ok(Some(OwnedEvent::Close(None))));
        assert_eq!(d.next_event(), Ok(None));
    }

    #[test]
    fn events_before_an_error_are_delivered() {
        let mut wire = frame::encode(true, OpCode::Text, b"ok", None);
        wire.extend_from_slice(&frame::encode(true, OpCode::Continuation, b"", None));
        let want = (
            vec![msg(OpCode::Text, b"ok")],
            Some(ProtocolError::StrayContinuation),
        );
        for i in 0..=wire.len() {
            let got = decode_all(Role::Client, MAX, &[&wire[..i], &wire[i..]]);
            assert_eq!(got, want, "split {i}");
        }
    }

    #[test]
    fn too_big_is_refused_from_the_header() {
        let mut d = StreamDecoder::new(Role::Client, 10);
        d.feed(&[0x82, 0x7E, 0x10, 0x00]); // announces 4096 bytes, sends none
        assert_eq!(d.next_event(), Err(ProtocolError::MessageTooBig));
    }

    #[test]
    fn fuzz_check_accepts_hand_made_inputs() {
        let (wire, _) = conversation();
        for setup in 0..4u8 {
            for seed in [0u8, 1, 7, 200] {
                let mut data = vec![setup, seed];
                data.extend_from_slice(&wire);
                fuzz_check(&data);
            }
        }
        fuzz_check(&[]);
        fuzz_check(&[0]);
        fuzz_check(&[1, 2, 0x81, 0x05, b'h', b'e', b'l', b'l', b'o']);
    }

    /// Replays the checked-in fuzz corpus (fuzz/corpus/frame_decode) so that CI checks it on
    /// stable, without cargo-fuzz.
    #[test]
    fn fuzz_corpus_replays() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/frame_decode");
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) => panic!("{}: {e}", dir.display()),
        };
        let mut replayed = 0;
        for entry in entries {
            let path = match entry {
                Ok(entry) => entry.path(),
                Err(e) => panic!("{e}"),
            };
            match std::fs::read(&path) {
                Ok(data) => fuzz_check(&data),
                Err(e) => panic!("{}: {e}", path.display()),
            }
            replayed += 1;
        }
        assert!(replayed > 0, "no corpus files in {}", dir.display());
    }

    fn random_events() -> impl Strategy<Value = Vec<(bool, OpCode, Vec<u8>)>> {
        let frame = prop_oneof![
            (
                Just(OpCode::Text),
                any::<String>().prop_map(String::into_bytes)
            ),
            (
                Just(OpCode::Binary),
                proptest::collection::vec(any::<u8>(), 0..200)
            ),
            (
                Just(OpCode::Ping),
                proptest::collection::vec(any::<u8>(), 0..10)
            ),
        ];
        proptest::collection::vec((any::<bool>(), frame), 0..6).prop_map(|frames| {
            frames
                .into_iter()
                .map(|(split, (opcode, data))| (split, opcode, data))
                .collect()
        })
    }

    proptest! {
        #[test]
        fn random_splits_give_the_same_events(
            messages in random_events(),
            cuts in proptest::collection::vec(any::<usize>(), 0..8),
            key in any::<[u8; 4]>(),
        ) {
            // Data messages go in two fragments when `fragment` is set.
            let mut wire = Vec::new();
            let mut want = Vec::new();
            for (fragment, opcode, data) in &messages {
                if *fragment && !opcode.is_control() {
                    let (a, b) = data.split_at(data.len() / 2);
                    frame::encode_into(&mut wire, false, *opcode, a, Some(key));
                    frame::encode_into(&mut wire, true, OpCode::Continuation, b, Some(key));
                } else {
                    frame::encode_into(&mut wire, true, *opcode, data, Some(key));
                }
                want.push(match opcode {
                    OpCode::Ping => OwnedEvent::Ping(data.clone()),
                    _ => msg(*opcode, data),
                });
            }
            let mut points: Vec<usize> = cuts.iter().map(|c| c % (wire.len() + 1)).collect();
            points.sort_unstable();
            let mut pieces: Vec<&[u8]> = Vec::new();
            let mut start = 0;
            for p in points {
                pieces.push(&wire[start..p]);
                start = p;
            }
            pieces.push(&wire[start..]);
            prop_assert_eq!(decode_all(Role::Server, MAX, &pieces), (want, None));
        }

        #[test]
        fn fuzz_check_holds_on_random_bytes(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            fuzz_check(&data);
        }
    }
}
