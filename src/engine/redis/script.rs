//! The Lua scripts the Redis engine runs (SPEC §15), the arguments they take and their replies
//! read back into Rust values.
//!
//! Owns: the scripts' source (`SOURCES`), which script a job runs (`Script`), and the pure
//! parsing of their replies (`AppendReply`, `ReadReply`).
//! Does not: send anything (`link.rs`), or decide what a reply means for the hub (`mod.rs`).
//!
//! One script per message makes "append, bump the top, publish" atomic: Redis runs a script
//! alone, so no other node's message can take a position between this one's `HINCRBY` and its
//! `PUBLISH`, and every subscriber sees a stream's positions in order (SPEC §15: "append and
//! fan-out cannot diverge"). Positions are written with `%.0f`: Lua 5.1 numbers are doubles,
//! exact up to 2^53, and `tostring` would print a large one as `1.7e+15`.

use crate::app::envelope::AckStatus;
use crate::engine::{Epoch, Position};
use redis::Value;

/// Which script a job runs (the index into `SOURCES`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Script {
    Append = 0,
    Read = 1,
    Delivered = 2,
    /// Presence (`presence.rs`): a member recorded, removed, refreshed; a room pruned or read.
    PresenceJoin = 3,
    PresenceLeave = 4,
    PresenceRefresh = 5,
    PresenceSnapshot = 6,
}

/// Append (a direct message or a room message) to a stream.
///
/// KEYS: 1 stream, 2 meta, 3 dedup key (only read when ARGV[7] is 1), 4 online set.
/// ARGV: 1 node, 2 body, 3 retain (1: XADD), 4 MAXLEN, 5 TTL ms (0: none), 6 cap on pending
/// messages (0: none), 7 has a client id, 8 dedup TTL ms, 9 the status a duplicate gets
/// (`q` queued, `d` delivered), 10 the epoch if the stream is new, 11 its base position,
/// 12 ask whether the id is online on another node (1), 13 the channel.
/// Replies `{'ok', position, epoch, online_elsewhere}`, `{'dup', position, status,
/// delivered_watermark}` or `{'full'}`.
const APPEND: &str = r#"
local meta = KEYS[2]
if ARGV[7] == '1' then
  local seen = redis.call('GET', KEYS[3])
  if seen then
    local sep = string.find(seen, ':', 1, true)
    local status = string.sub(seen, sep + 1)
    if status ~= 'r' then
      local delivered = redis.call('HGET', meta, 'delivered') or '0'
      return {'dup', string.sub(seen, 1, sep - 1), status, delivered}
    end
  end
end
local epoch = redis.call('HGET', meta, 'epoch')
if not epoch then
  epoch = ARGV[10]
  redis.call('HSET', meta, 'epoch', epoch, 'top', ARGV[11], 'base', ARGV[11], 'delivered', ARGV[11])
end
if tonumber(ARGV[6]) > 0 then
  local top = tonumber(redis.call('HGET', meta, 'top'))
  local delivered = tonumber(redis.call('HGET', meta, 'delivered') or '0')
  if top - delivered >= tonumber(ARGV[6]) then
    return {'full'}
  end
end
local id = string.format('%.0f', redis.call('HINCRBY', meta, 'top', 1))
local ttl = tonumber(ARGV[5])
if ARGV[3] == '1' then
  redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[4], id .. '-0', 'n', ARGV[1], 'b', ARGV[2])
  if ttl > 0 then redis.call('PEXPIRE', KEYS[1], ttl) end
end
if ttl > 0 then redis.call('PEXPIRE', meta, ttl) end
if ARGV[7] == '1' then
  redis.call('SET', KEYS[3], id .. ':' .. ARGV[9], 'PX', ARGV[8])
end
redis.call('PUBLISH', ARGV[13], ARGV[1] .. ' ' .. epoch .. ' ' .. id .. '\n' .. ARGV[2])
local elsewhere = 0
if ARGV[12] == '1' then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  elsewhere = redis.call('ZCOUNT', KEYS[4], now, '+inf')
  local mine = redis.call('ZSCORE', KEYS[4], ARGV[1])
  if mine and tonumber(mine) >= now then elsewhere = elsewhere - 1 end
end
return {'ok', id, epoch, elsewhere}
"#;

/// Read a stream: what a connecting client gets, what a gap misses, or a history page.
///
/// KEYS: 1 stream, 2 meta. ARGV: 1 the epoch if the stream is new, 2 its base, 3 TTL ms,
/// 4 mode (`since`: after ARGV[5] unless ARGV[6] names another epoch, then everything;
/// `pending`: after the delivered watermark; `tail`: the newest ARGV[7]; `top`: none, only
/// the state), 5 position,
/// 6 the epoch the position belongs to ('' unknown), 7 count.
/// Replies `{epoch, top, base, delivered, first retained id or '', entries, retained count}`;
/// entries are `{id, {field, value, ...}}` oldest first, except `tail` (newest first).
const READ: &str = r#"
local meta = KEYS[2]
local epoch = redis.call('HGET', meta, 'epoch')
if not epoch then
  epoch = ARGV[1]
  redis.call('HSET', meta, 'epoch', epoch, 'top', ARGV[2], 'base', ARGV[2], 'delivered', ARGV[2])
  local ttl = tonumber(ARGV[3])
  if ttl > 0 then redis.call('PEXPIRE', meta, ttl) end
end
local state = redis.call('HMGET', meta, 'top', 'base', 'delivered')
local entries
if ARGV[4] == 'tail' then
  entries = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', ARGV[7])
elseif ARGV[4] == 'top' then
  entries = {}
elseif ARGV[4] == 'pending' then
  entries = redis.call('XRANGE', KEYS[1], '(' .. state[3] .. '-0', '+')
elseif ARGV[6] ~= '' and ARGV[6] ~= epoch then
  entries = redis.call('XRANGE', KEYS[1], '-', '+')
else
  entries = redis.call('XRANGE', KEYS[1], '(' .. ARGV[5] .. '-0', '+')
end
local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
local first_id = ''
if first[1] then first_id = first[1][1] end
return {epoch, state[1], state[2], state[3], first_id, entries, redis.call('XLEN', KEYS[1])}
"#;

/// Moves an inbox's delivered watermark up (never down). KEYS: 1 meta. ARGV: 1 position.
const DELIVERED: &str = r#"
local d = redis.call('HGET', KEYS[1], 'delivered')
if d and tonumber(ARGV[1]) > tonumber(d) then
  redis.call('HSET', KEYS[1], 'delivered', ARGV[1])
end
return 1
"#;

/// The scripts, indexed by `Script`.
pub const SOURCES: [&str; 7] = [
    APPEND,
    READ,
    DELIVERED,
    super::presence::JOIN,
    super::presence::LEAVE,
    super::presence::REFRESH,
    super::presence::SNAPSHOT,
];

/// A reply that does not have the shape the script returns: a bug, or not our script.
#[derive(Debug, PartialEq, Eq)]
pub struct Malformed(pub String);

fn malformed(what: &str, value: &Value) -> Malformed {
    Malformed(format!("{what}: unexpected reply {value:?}"))
}

/// The answer of `APPEND`.
#[derive(Debug, PartialEq, Eq)]
pub enum AppendReply {
    Stored {
        position: Position,
        epoch: Epoch,
        online_elsewhere: bool,
    },
    Duplicate {
        position: Position,
        status: AckStatus,
    },
    Full,
}

/// The letter a duplicate's status is kept as in its dedup key.
pub fn status_letter(status: AckStatus) -> &'static str {
    match status {
        AckStatus::Queued => "q",
        AckStatus::Delivered => "d",
        AckStatus::Partial => "p",
        AckStatus::Rejected => "r",
    }
}

impl AppendReply {
    pub fn parse(value: &Value) -> Result<AppendReply, Malformed> {
        let bad = || malformed("append", value);
        let Value::Array(items) = value else {
            return Err(bad());
        };
        match (text(items.first()).as_deref(), items.len()) {
            (Some("ok"), 4) => Ok(AppendReply::Stored {
                position: position(items.get(1)).ok_or_else(bad)?,
                epoch: text(items.get(2))
                    .and_then(|e| Epoch::parse(&e))
                    .ok_or_else(bad)?,
                online_elsewhere: int(items.get(3)).ok_or_else(bad)? > 0,
            }),
            (Some("dup"), 4) => {
                let position = position(items.get(1)).ok_or_else(bad)?;
                let delivered = position_text(items.get(3)).ok_or_else(bad)?;
                let status = match text(items.get(2)).as_deref() {
                    // A queued message the recipient has taken since is delivered now.
                    Some("q") if position <= delivered => AckStatus::Delivered,
                    Some("q") => AckStatus::Queued,
                    Some("d") => AckStatus::Delivered,
                    Some("p") => AckStatus::Partial,
                    _ => return Err(bad()),
                };
                Ok(AppendReply::Duplicate { position, status })
            }
            (Some("full"), 1) => Ok(AppendReply::Full),
            _ => Err(bad()),
        }
    }
}

/// One message read back from a stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub position: Position,
    /// The node that stored it (its own echoes are not delivered twice).
    pub node: u64,
    pub body: Vec<u8>,
}

/// The answer of `READ`.
#[derive(Debug, PartialEq, Eq)]
pub struct ReadReply {
    pub epoch: Epoch,
    pub top: Position,
    /// Every position up to `base` belongs to an earlier history of the stream.
    pub base: Position,
    pub delivered: Position,
    /// The oldest position still in the stream, if any.
    pub first: Option<Position>,
    pub entries: Vec<Entry>,
    /// How many messages the stream retains.
    pub retained: u64,
}

impl ReadReply {
    pub fn parse(value: &Value) -> Result<ReadReply, Malformed> {
        let bad = || malformed("read", value);
        let Value::Array(items) = value else {
            return Err(bad());
        };
        if items.len() != 7 {
            return Err(bad());
        }
        let first = match text(items.get(4)).as_deref() {
            Some("") => None,
            Some(id) => Some(entry_id(id).ok_or_else(bad)?),
            None => return Err(bad()),
        };
        let Some(Value::Array(raw)) = items.get(5) else {
            return Err(bad());
        };
        let entries = raw
            .iter()
            .map(|e| parse_entry(e).ok_or_else(bad))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ReadReply {
            epoch: text(items.first())
                .and_then(|e| Epoch::parse(&e))
                .ok_or_else(bad)?,
            top: position_text(items.get(1)).ok_or_else(bad)?,
            base: position_text(items.get(2)).ok_or_else(bad)?,
            delivered: position_text(items.get(3)).ok_or_else(bad)?,
            first,
            entries,
            retained: u64::try_from(int(items.get(6)).ok_or_else(bad)?).map_err(|_| bad())?,
        })
    }
}

fn parse_entry(value: &Value) -> Option<Entry> {
    let Value::Array(pair) = value else {
        return None;
    };
    let position = entry_id(&text(pair.first())?)?;
    let Some(Value::Array(fields)) = pair.get(1) else {
        return None;
    };
    let mut node = None;
    let mut body = None;
    for kv in fields.chunks(2) {
        match (text(kv.first()).as_deref(), kv.get(1)) {
            (Some("n"), v) => node = text(v).and_then(|n| u64::from_str_radix(&n, 16).ok()),
            (Some("b"), Some(Value::BulkString(b))) => body = Some(b.clone()),
            _ => {}
        }
    }
    Some(Entry {
        position,
        node: node?,
        body: body?,
    })
}

/// `<position>-0` back to the position.
fn entry_id(id: &str) -> Option<Position> {
    let (ms, seq) = id.split_once('-')?;
    (seq == "0").then_some(())?;
    ms.parse().ok().map(Position)
}

fn text(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Okay => Some("OK".into()),
        Value::Int(n) => Some(n.to_string()),
        _ => None,
    }
}

fn int(value: Option<&Value>) -> Option<i64> {
    match value? {
        Value::Int(n) => Some(*n),
        other => text(Some(other))?.parse().ok(),
    }
}

fn position(value: Option<&Value>) -> Option<Position> {
    position_text(value)
}

fn position_text(value: Option<&Value>) -> Option<Position> {
    text(value)?.parse().ok().map(Position)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn append_replies_parse() {
        let ok = Value::Array(vec![
            bulk("ok"),
            bulk("17"),
            bulk("00000000000000aa"),
            Value::Int(1),
        ]);
        assert_eq!(
            AppendReply::parse(&ok),
            Ok(AppendReply::Stored {
                position: Position(17),
                epoch: Epoch(0xaa),
                online_elsewhere: true
            })
        );
        let dup = |status: &str, delivered: &str| {
            AppendReply::parse(&Value::Array(vec![
                bulk("dup"),
                bulk("17"),
                bulk(status),
                bulk(delivered),
            ]))
        };
        let status = |r: Result<AppendReply, Malformed>| match r {
            Ok(AppendReply::Duplicate { status, .. }) => status,
            other => panic!("{other:?}"),
        };
        assert_eq!(status(dup("q", "16")), AckStatus::Queued);
        assert_eq!(status(dup("q", "17")), AckStatus::Delivered);
        assert_eq!(status(dup("p", "0")), AckStatus::Partial);
        assert!(dup("x", "0").is_err());
        assert_eq!(
            AppendReply::parse(&Value::Array(vec![bulk("full")])),
            Ok(AppendReply::Full)
        );
        assert!(AppendReply::parse(&Value::Nil).is_err());
    }

    #[test]
    fn read_replies_parse_entries_in_order() {
        let entry = |id: &str, node: &str, body: &str| {
            Value::Array(vec![
                bulk(id),
                Value::Array(vec![bulk("n"), bulk(node), bulk("b"), bulk(body)]),
            ])
        };
        let reply = Value::Array(vec![
            bulk("0000000000000001"),
            bulk("12"),
            bulk("10"),
            bulk("11"),
            bulk("11-0"),
            Value::Array(vec![
                entry("11-0", "00000000000000ff", "a"),
                entry("12-0", "0000000000000001", "b"),
            ]),
            Value::Int(2),
        ]);
        let r = ReadReply::parse(&reply).unwrap();
        assert_eq!(r.top, Position(12));
        assert_eq!(r.base, Position(10));
        assert_eq!(r.first, Some(Position(11)));
        assert_eq!(r.entries.len(), 2);
        assert_eq!(r.entries[0].node, 255);
        assert_eq!(r.entries[1].body, b"b");
        assert_eq!(r.retained, 2);
        let mut broken = reply.clone();
        if let Value::Array(items) = &mut broken {
            items[4] = bulk("11-1");
        }
        assert!(ReadReply::parse(&broken).is_err());
    }
}
