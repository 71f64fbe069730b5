//! The file engine's on-disk format: an append-only log of checksummed records in numbered
//! segment files (SPEC §13).
//!
//! Owns: `Record` (what the log says), its encoding, segment file names, and reading a segment
//! back, which stops at the first record that is incomplete or fails its checksum (a torn tail).
//! Does not: open, write or sync files (the storage thread in `file.rs` does), or decide what a
//! record means for the index (`FileEngine::open` replays records into `Streams`).
//!
//! # Format
//!
//! A segment is `MAGIC` followed by records. A record is
//!
//! ```text
//! len: u32 LE | crc: u32 LE | kind: u8 | fields ...
//! └ bytes after crc ┘ └ CRC-32 (IEEE) of kind and fields ┘
//! ```
//!
//! Integers are little-endian; strings and byte strings are a length (u16 for names, u32 for
//! bodies) then the bytes. The first record of every segment is a `Header`.
//!
//! Why a checksum per record: a crash (or `kill -9` with `--fsync never`, or power loss) can
//! leave the last write half done. Each batch is written with one `write` and made durable with
//! one fsync before anything in it is acknowledged, so a record that fails its length or
//! checksum can only belong to a batch nobody was told about: recovery cuts the segment there
//! and loses nothing that was acknowledged.

use super::{Epoch, Position, StreamId};
use std::path::{Path, PathBuf};

/// The first bytes of every segment file.
pub const MAGIC: &[u8; 8] = b"WSRLOG\x00\x01";

/// Bytes before a record's kind: its length and checksum.
pub const RECORD_HEADER: usize = 8;

/// A record longer than this is taken as garbage (a torn length field), not allocated.
pub const MAX_RECORD: usize = 1 << 30;

/// One fact in the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// First in every segment: the store's epoch, the highest position handed out so far, and
    /// the global "forgotten through" marks (`Streams`) of the inboxes and of room history, so
    /// that deleting older segments loses none of them. The marks are separate because room
    /// history has bounds of its own (a short room TTL, or a first start with history on): one
    /// shared mark would make an inbox's `since` read `recovered: false` for room losses.
    /// Logs written before room history had only the first mark; it then stands for both.
    Header {
        epoch: Epoch,
        high_water: Position,
        forgotten_through: Position,
        rooms_forgotten_through: Position,
    },
    /// A direct message retained in `stream`.
    Append {
        stream: StreamId,
        position: Position,
        expires_ms: u64,
        pending: bool,
        sender: String,
        client_id: Option<String>,
        body: Vec<u8>,
    },
    /// These messages of `stream` reached a connection.
    Delivered {
        stream: StreamId,
        positions: Vec<Position>,
    },
    /// Every message of `stream` up to `through` was removed by a bound or the TTL.
    Trim { stream: StreamId, through: Position },
    /// A room message took `position`; with a client id, it is in the sender's duplicate window
    /// until `expires_ms`.
    Published {
        position: Position,
        sender: String,
        client_id: Option<String>,
        expires_ms: u64,
    },
    /// A run started with room history on or off (SPEC §16); every room message from `from`
    /// on was kept (or not) as it says. Written at every start, and copied forward by
    /// compaction, so start-up can tell where room history has a gap (see `FileEngine::open`).
    RoomHistory { on: bool, from: Position },
}

/// A `Record::Append` by reference: the file engine encodes each message from what it already
/// holds, without copying the body and names into owned fields first (the hot path).
pub struct AppendRef<'a> {
    pub stream: &'a StreamId,
    pub position: Position,
    pub expires_ms: u64,
    pub pending: bool,
    pub sender: &'a str,
    pub client_id: Option<&'a str>,
    pub body: &'a [u8],
}

impl AppendRef<'_> {
    /// Appends the record, framed and checksummed, to `out` (the same bytes as
    /// `Record::Append`).
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0; RECORD_HEADER]);
        self.put_fields(out);
        seal(out, start);
    }

    fn put_fields(&self, out: &mut Vec<u8>) {
        out.push(APPEND);
        put_stream(out, self.stream);
        put_u64(out, self.position.0);
        put_u64(out, self.expires_ms);
        out.push(u8::from(self.pending));
        put_name(out, self.sender);
        put_opt_name(out, self.client_id);
        put_u32(out, self.body.len() as u32);
        out.extend_from_slice(self.body);
    }
}

/// Writes the length and checksum of the record that starts at `start` into its header.
fn seal(out: &mut [u8], start: usize) {
    let body = &out[start + RECORD_HEADER..];
    let len = (body.len() as u32).to_le_bytes();
    let crc = crc32fast::hash(body).to_le_bytes();
    out[start..start + 4].copy_from_slice(&len);
    out[start + 4..start + 8].copy_from_slice(&crc);
}

const HEADER: u8 = 1;
const APPEND: u8 = 2;
const DELIVERED: u8 = 3;
const TRIM: u8 = 4;
const PUBLISHED: u8 = 5;
const ROOM_HISTORY: u8 = 6;

const INBOX: u8 = 1;
const ROOM: u8 = 2;

impl Record {
    /// Appends the record, framed and checksummed, to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0; RECORD_HEADER]);
        match self {
            Record::Header {
                epoch,
                high_water,
                forgotten_through,
                rooms_forgotten_through,
            } => {
                out.push(HEADER);
                put_u64(out, epoch.0);
                put_u64(out, high_water.0);
                put_u64(out, forgotten_through.0);
                put_u64(out, rooms_forgotten_through.0);
            }
            Record::Append {
                stream,
                position,
                expires_ms,
                pending,
                sender,
                client_id,
                body,
            } => {
                let append = AppendRef {
                    stream,
                    position: *position,
                    expires_ms: *expires_ms,
                    pending: *pending,
                    sender,
                    client_id: client_id.as_deref(),
                    body,
                };
                append.put_fields(out);
            }
            Record::Delivered { stream, positions } => {
                out.push(DELIVERED);
                put_stream(out, stream);
                put_u32(out, positions.len() as u32);
                for p in positions {
                    put_u64(out, p.0);
                }
            }
            Record::Trim { stream, through } => {
                out.push(TRIM);
                put_stream(out, stream);
                put_u64(out, through.0);
            }
            Record::Published {
                position,
                sender,
                client_id,
                expires_ms,
            } => {
                out.push(PUBLISHED);
                put_u64(out, position.0);
                put_name(out, sender);
                put_opt_name(out, client_id.as_deref());
                put_u64(out, *expires_ms);
            }
            Record::RoomHistory { on, from } => {
                out.push(ROOM_HISTORY);
                out.push(u8::from(*on));
                put_u64(out, from.0);
            }
        }
        seal(out, start);
    }

    /// Decodes one record's kind and fields (already checked against the checksum).
    fn decode(bytes: &[u8]) -> Option<Record> {
        let mut r = Reader(bytes);
        let record = match r.u8()? {
            HEADER => {
                let epoch = Epoch(r.u64()?);
                let high_water = Position(r.u64()?);
                let forgotten_through = Position(r.u64()?);
                // An older header ends here: its one mark stood for inboxes and rooms alike.
                let rooms_forgotten_through = if r.0.is_empty() {
                    forgotten_through
                } else {
                    Position(r.u64()?)
                };
                Record::Header {
                    epoch,
                    high_water,
                    forgotten_through,
                    rooms_forgotten_through,
                }
            }
            APPEND => Record::Append {
                stream: r.stream()?,
                position: Position(r.u64()?),
                expires_ms: r.u64()?,
                pending: r.u8()? != 0,
                sender: r.name()?,
                client_id: r.opt_name()?,
                body: {
                    let n = r.u32()? as usize;
                    r.take(n)?.to_vec()
                },
            },
            DELIVERED => {
                let stream = r.stream()?;
                let n = r.u32()? as usize;
                if n > r.0.len() / 8 {
                    return None;
                }
                let positions = (0..n)
                    .map(|_| r.u64().map(Position))
                    .collect::<Option<_>>()?;
                Record::Delivered { stream, positions }
            }
            TRIM => Record::Trim {
                stream: r.stream()?,
                through: Position(r.u64()?),
            },
            PUBLISHED => Record::Published {
                position: Position(r.u64()?),
                sender: r.name()?,
                client_id: r.opt_name()?,
                expires_ms: r.u64()?,
            },
            ROOM_HISTORY => Record::RoomHistory {
                on: r.u8()? != 0,
                from: Position(r.u64()?),
            },
            _ => return None,
        };
        r.0.is_empty().then_some(record)
    }
}

/// Where reading a segment stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tail {
    /// Bytes from the start of the file that hold whole, valid records (the magic included).
    pub valid_len: usize,
    /// Why reading stopped before the end of the file, if it did.
    pub problem: Option<&'static str>,
}

/// Reads a whole segment, handing each valid record (and its offset) to `each`, and says where
/// the valid part ends. Never panics, whatever the bytes.
pub fn read_segment(bytes: &[u8], mut each: impl FnMut(usize, Record)) -> Tail {
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        return Tail {
            valid_len: 0,
            problem: Some("not a wsrelay log segment (bad magic)"),
        };
    }
    let mut at = MAGIC.len();
    loop {
        let rest = &bytes[at..];
        if rest.is_empty() {
            return Tail {
                valid_len: at,
                problem: None,
            };
        }
        let stop = |problem| Tail {
            valid_len: at,
            problem: Some(problem),
        };
        if rest.len() < RECORD_HEADER {
            return stop("incomplete record header");
        }
        let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let crc = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
        if len == 0 || len > MAX_RECORD || len > rest.len() - RECORD_HEADER {
            return stop("incomplete record");
        }
        let body = &rest[RECORD_HEADER..RECORD_HEADER + len];
        if crc32fast::hash(body) != crc {
            return stop("record checksum mismatch");
        }
        let Some(record) = Record::decode(body) else {
            return stop("record does not decode");
        };
        each(at, record);
        at += RECORD_HEADER + len;
    }
}

/// A stream's name as one string (kind and name), for maps that cross threads.
pub fn stream_key(stream: &StreamId) -> String {
    match stream {
        StreamId::Inbox(id) => format!("inbox:{id}"),
        StreamId::Room(name) => format!("room:{name}"),
    }
}

/// The file name of segment `id` (zero-padded so names sort in number order).
pub fn segment_name(id: u64) -> String {
    format!("{id:020}.log")
}

/// The segment id a file name stands for, if it is one.
pub fn segment_id(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".log")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

pub fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(segment_name(id))
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// Ids and client ids are at most 128 bytes (envelope rules), so a u16 length is plenty; a
/// longer one is cut rather than corrupting the record.
fn put_name(out: &mut Vec<u8>, name: &str) {
    let bytes = &name.as_bytes()[..name.len().min(u16::MAX as usize)];
    out.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
    out.extend_from_slice(bytes);
}

fn put_opt_name(out: &mut Vec<u8>, name: Option<&str>) {
    match name {
        None => out.push(0),
        Some(name) => {
            out.push(1);
            put_name(out, name);
        }
    }
}

fn put_stream(out: &mut Vec<u8>, stream: &StreamId) {
    match stream {
        StreamId::Inbox(id) => {
            out.push(INBOX);
            put_name(out, id);
        }
        StreamId::Room(name) => {
            out.push(ROOM);
            put_name(out, name);
        }
    }
}

/// A cursor over a record's fields; every read is checked.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.0.len() {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }

    fn u16(&mut self) -> Option<u16> {
        let b = self.take(2)?;
        Some(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Option<u32> {
        let b = self.take(4)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Option<u64> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Some(u64::from_le_bytes(a))
    }

    fn name(&mut self) -> Option<String> {
        let n = self.u16()? as usize;
        String::from_utf8(self.take(n)?.to_vec()).ok()
    }

    fn opt_name(&mut self) -> Option<Option<String>> {
        match self.u8()? {
            0 => Some(None),
            1 => Some(Some(self.name()?)),
            _ => None,
        }
    }

    fn stream(&mut self) -> Option<StreamId> {
        match self.u8()? {
            INBOX => Some(StreamId::inbox(&self.name()?)),
            ROOM => Some(StreamId::room(&self.name()?)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Record> {
        vec![
            Record::Header {
                epoch: Epoch(7),
                high_water: Position(100),
                forgotten_through: Position(3),
                rooms_forgotten_through: Position(7),
            },
            Record::Append {
                stream: StreamId::inbox("bob"),
                position: Position(101),
                expires_ms: 5_000,
                pending: true,
                sender: "alice".into(),
                client_id: Some("c-1".into()),
                body: b"{\"x\":1}".to_vec(),
            },
            Record::Delivered {
                stream: StreamId::inbox("bob"),
                positions: vec![Position(101), Position(102)],
            },
            Record::Trim {
                stream: StreamId::room("lobby"),
                through: Position(101),
            },
            Record::Published {
                position: Position(103),
                sender: "alice".into(),
                client_id: None,
                expires_ms: 9,
            },
        ]
    }

    fn segment(records: &[Record]) -> Vec<u8> {
        let mut bytes = MAGIC.to_vec();
        for r in records {
            r.encode(&mut bytes);
        }
        bytes
    }

    fn read(bytes: &[u8]) -> (Vec<Record>, Tail) {
        let mut got = Vec::new();
        let tail = read_segment(bytes, |_, r| got.push(r));
        (got, tail)
    }

    #[test]
    fn every_record_round_trips() {
        let bytes = segment(&samples());
        let (got, tail) = read(&bytes);
        assert_eq!(got, samples());
        assert_eq!(
            tail,
            Tail {
                valid_len: bytes.len(),
                problem: None
            }
        );
    }

    #[test]
    fn a_header_written_before_room_history_had_its_own_mark_still_reads() {
        // The old header: epoch, high water, one mark for everything.
        let mut bytes = MAGIC.to_vec();
        let start = bytes.len();
        bytes.extend_from_slice(&[0; RECORD_HEADER]);
        bytes.push(HEADER);
        for v in [7, 100, 3] {
            put_u64(&mut bytes, v);
        }
        seal(&mut bytes, start);
        let (got, tail) = read(&bytes);
        assert_eq!(tail.problem, None);
        assert_eq!(
            got,
            [Record::Header {
                epoch: Epoch(7),
                high_water: Position(100),
                forgotten_through: Position(3),
                rooms_forgotten_through: Position(3),
            }]
        );
    }

    #[test]
    fn the_room_history_marker_round_trips() {
        for on in [true, false] {
            let record = Record::RoomHistory {
                on,
                from: Position(42),
            };
            let (got, tail) = read(&segment(std::slice::from_ref(&record)));
            assert_eq!(got, [record]);
            assert_eq!(tail.problem, None);
        }
    }

    #[test]
    fn a_torn_tail_is_cut_at_every_length() {
        let whole = segment(&samples());
        let before_last = segment(&samples()[..4]).len();
        for cut in before_last..whole.len() {
            let (got, tail) = read(&whole[..cut]);
            assert_eq!(got, samples()[..4], "cut at {cut}");
            assert_eq!(tail.valid_len, before_last);
            assert_eq!(tail.problem.is_some(), cut > before_last);
        }
    }

    #[test]
    fn a_flipped_bit_stops_reading_at_that_record() {
        let whole = segment(&samples());
        let first_two = segment(&samples()[..2]).len();
        let mut bad = whole.clone();
        bad[first_two + RECORD_HEADER + 3] ^= 0x10;
        let (got, tail) = read(&bad);
        assert_eq!(got, samples()[..2]);
        assert_eq!(
            tail,
            Tail {
                valid_len: first_two,
                problem: Some("record checksum mismatch")
            }
        );
    }

    #[test]
    fn garbage_never_panics() {
        let mut bytes = MAGIC.to_vec();
        for n in 0..2000u32 {
            bytes.push((n.wrapping_mul(2654435761) >> 13) as u8);
            read(&bytes);
        }
        assert_eq!(read(b"nope").1.valid_len, 0);
    }

    #[test]
    fn segment_names_sort_and_parse() {
        assert_eq!(segment_id(&segment_name(42)), Some(42));
        assert!(segment_name(9) < segment_name(10));
        assert_eq!(segment_id("LOCK"), None);
        assert_eq!(segment_id("0042.log"), None);
    }
}
