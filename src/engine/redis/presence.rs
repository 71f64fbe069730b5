//! Presence in Redis (SPEC §15): who is in each room, on every node, with a TTL so that a node
//! killed with SIGKILL leaves no ghost members.
//!
//! Owns: `Presence`, the engine's presence state (this node's members of each room, which it
//! refreshes; the `Roster` of the other nodes' members; when to refresh, prune and re-read),
//! which turns the hub's calls and Redis's answers into script `Call`s and `PresenceChange`s;
//! the presence keys of a room, the scripts' source, and the formats they write and publish (a
//! member's hash field and value, a presence record on the room's channel, a snapshot's reply).
//! Does not: send anything (`mod.rs` makes jobs of the calls, `link.rs` runs them), or order
//! records and snapshots (`engine/roster.rs` does).
//!
//! # Keys
//!
//! Per room, next to its stream's keys and under the same hash tag (Redis Cluster stays
//! possible: every script touches one room's keys only):
//!
//! * `{P:r:ROOM}:p`, a hash: `node/conn` -> `id\ninfo` for every member connection on every
//!   node (ids carry no control characters, so the newline cannot be part of one; `info` is
//!   compact JSON or empty), plus the field `~v`, the room's presence **version**, bumped by
//!   every change. A new hash starts its version at the Unix time in ms x 1000 (like the
//!   stream positions), so a hash that expired and came back never reuses a version a node
//!   holds.
//! * `{P:r:ROOM}:pe`, a sorted set: `node/conn` scored by when the entry expires (Unix ms). The
//!   owning node moves the score forward every TTL/3; nobody refreshes a dead node's members.
//!
//! Both keys expire (PEXPIRE 2 x TTL, renewed by every write) when no node writes any more.
//!
//! # Records
//!
//! Every change is PUBLISHed on the room's channel (the one its messages use) by the script that
//! made it, as `p VERSION j|l node/conn\nid\ninfo`. A message record starts with 16 hex digits
//! (`keys::Published`), never with `p `, so the two kinds cannot be confused.
//!
//! # Snapshots
//!
//! A node's first member of a room is recorded by a `JOIN` that also replies the room's
//! snapshot, read in the same atomic step: the roster starts from exactly the state that join
//! made. Records published before the node's subscription to the room's channel took effect
//! are lost to it, so another snapshot is read when the subscription is confirmed (also after
//! every PUB/SUB reconnect); the roster announces what it adds. A room whose records skipped a
//! version is read again too.
//!
//! # Expiry
//!
//! Every TTL/3, each node refreshes its own members (`REFRESH`) and prunes the rooms it follows
//! (`SNAPSHOT` without reading): entries whose score has passed are removed, with a leave
//! published for each. A script runs alone, so each expired member is removed, and its leave
//! published, exactly once, by whichever node came first. The engine's periodic duties run on
//! its link's tick (about every second), so the TTL must be at least 3 s.

use super::keys::Keys;
use super::script::{Malformed, Script};
use crate::engine::presence::{LocalMember, Member, MemberKey, PresenceChange};
use crate::engine::roster::{Record, Roster};
use crate::engine::{Event, StreamId};
use crate::server::metrics::Writer;
use log::{debug, warn};
use redis::Value;
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;
use std::time::{Duration, Instant};

/// `--redis-presence-ttl` default: how long a member stays listed after its node stopped
/// refreshing it (SPEC §15).
pub const DEFAULT_TTL_MS: u64 = 60_000;
/// The shortest TTL that works: refreshes run every TTL/3 on the link's tick (1 s).
pub const MIN_TTL_MS: u64 = 3_000;

/// The presence keys of one room and its channel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PresenceKeys {
    pub hash: String,
    pub expiry: String,
    pub channel: String,
}

impl PresenceKeys {
    pub fn new(prefix: &str, room: &str) -> PresenceKeys {
        let channel = Keys::new(prefix, &StreamId::room(room)).channel;
        PresenceKeys {
            hash: format!("{channel}:p"),
            expiry: format!("{channel}:pe"),
            channel,
        }
    }

    pub fn keys(&self) -> Vec<String> {
        vec![self.hash.clone(), self.expiry.clone()]
    }
}

/// The end of `JOIN` (when asked) and `SNAPSHOT`: removes the expired members, publishing a
/// leave for each, then replies `{version, expired}`, and with `read` every member after them:
/// `{version, expired, field, value, field, value, ...}`. Expects the locals `now` (Unix ms),
/// `channel`, `base` (the version of a room with no hash) and `read`.
macro_rules! snapshot_tail {
    () => {
        r#"
local gone = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
local expired = 0
for _, field in ipairs(gone) do
  redis.call('ZREM', KEYS[2], field)
  local value = redis.call('HGET', KEYS[1], field)
  if value then
    redis.call('HDEL', KEYS[1], field)
    local v = string.format('%.0f', redis.call('HINCRBY', KEYS[1], '~v', 1))
    redis.call('PUBLISH', channel, 'p ' .. v .. ' l ' .. field .. '\n' .. value)
    expired = expired + 1
  end
end
local version = string.format('%.0f', tonumber(redis.call('HGET', KEYS[1], '~v') or base))
if not read then return {version, expired} end
local all = redis.call('HGETALL', KEYS[1])
local out = {version, expired}
for i = 1, #all, 2 do
  if all[i] ~= '~v' then
    out[#out + 1] = all[i]
    out[#out + 1] = all[i + 1]
  end
end
return out
"#
    };
}

/// Records one member (join) or updates it (a new info): the field, the expiry, a bumped
/// version and the record. An update of a member already there is published too: the nodes'
/// rosters see the key is known and announce nothing, but take the new info. With ARGV[8] set
/// (this node's first member of the room) it replies a snapshot, read in the same step, so
/// the node's roster starts from exactly the state its join made.
///
/// KEYS: 1 hash, 2 expiry set. ARGV: 1 field, 2 value, 3 expires at (Unix ms), 4 key TTL
/// (ms), 5 channel, 6 the version a new hash starts at, 7 now (Unix ms), 8 reply a snapshot
/// (`1`). Replies the version, or a snapshot.
pub const JOIN: &str = concat!(
    r#"
local now, channel, base, read = ARGV[7], ARGV[5], ARGV[6], true
redis.call('HSETNX', KEYS[1], '~v', base)
local v = string.format('%.0f', redis.call('HINCRBY', KEYS[1], '~v', 1))
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
redis.call('PUBLISH', channel, 'p ' .. v .. ' j ' .. ARGV[1] .. '\n' .. ARGV[2])
if ARGV[8] ~= '1' then return v end
"#,
    snapshot_tail!()
);

/// Removes one member; publishes its leave (with the id and info it was listed with) only if
/// it was there (a leave after the entry expired, or after a join Redis never got, is silent).
///
/// KEYS: 1 hash, 2 expiry set. ARGV: 1 field, 2 channel. Replies the version, or 0.
pub const LEAVE: &str = r#"
local value = redis.call('HGET', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
if not value then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
local v = string.format('%.0f', redis.call('HINCRBY', KEYS[1], '~v', 1))
redis.call('PUBLISH', ARGV[2], 'p ' .. v .. ' l ' .. ARGV[1] .. '\n' .. value)
return v
"#;

/// The owning node's refresh of its members of one room: every expiry moves forward, and a
/// member missing from the hash (expired while this node could not reach Redis, or whose join
/// never arrived) is recorded again and announced as a join.
///
/// KEYS: 1 hash, 2 expiry set. ARGV: 1 expires at, 2 key TTL, 3 channel, 4 the version a new
/// hash starts at, then (field, value) pairs. Replies how many were recorded again.
pub const REFRESH: &str = r#"
local again = 0
for i = 5, #ARGV, 2 do
  redis.call('ZADD', KEYS[2], ARGV[1], ARGV[i])
  if redis.call('HEXISTS', KEYS[1], ARGV[i]) == 0 then
    redis.call('HSETNX', KEYS[1], '~v', ARGV[4])
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
    local v = string.format('%.0f', redis.call('HINCRBY', KEYS[1], '~v', 1))
    redis.call('PUBLISH', ARGV[3], 'p ' .. v .. ' j ' .. ARGV[i] .. '\n' .. ARGV[i + 1])
    again = again + 1
  end
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return again
"#;

/// Removes the expired members (publishing a leave for each), then with ARGV[4] `1` reads the
/// room whole (a snapshot), else only says how many expired (the periodic prune).
///
/// KEYS: 1 hash, 2 expiry set. ARGV: 1 now (Unix ms), 2 channel, 3 the version of a room with
/// no hash, 4 read (`1`). Replies `{version, expired[, field, value, ...]}`.
pub const SNAPSHOT: &str = concat!(
    "\nlocal now, channel, base, read = ARGV[1], ARGV[2], ARGV[3], ARGV[4] == '1'\n",
    snapshot_tail!()
);

/// A member's hash field: its key (`node/conn`, `MemberKey`'s `Display`).
pub fn field(key: &MemberKey) -> String {
    key.to_string()
}

fn parse_field(text: &str) -> Option<MemberKey> {
    let (node, conn) = text.rsplit_once('/')?;
    if node.is_empty() || text.starts_with('~') {
        return None;
    }
    Some(MemberKey {
        node: Rc::from(node),
        conn: conn.parse().ok()?,
    })
}

/// A member's hash value: `id\ninfo` (info empty without one).
pub fn value(id: &str, info: Option<&str>) -> Vec<u8> {
    let mut out = Vec::with_capacity(id.len() + 1 + info.map_or(0, str::len));
    out.extend_from_slice(id.as_bytes());
    out.push(b'\n');
    out.extend_from_slice(info.unwrap_or_default().as_bytes());
    out
}

fn member(field: &str, value: &[u8]) -> Option<Member> {
    let key = parse_field(field)?;
    let text = std::str::from_utf8(value).ok()?;
    let (id, info) = text.split_once('\n')?;
    if id.is_empty() {
        return None;
    }
    Some(Member {
        key,
        id: Rc::from(id),
        info: (!info.is_empty()).then(|| Rc::from(info)),
    })
}

/// A presence record from a room's channel, or `None` if the payload is not one (a message).
/// A payload that starts like a record but does not parse is `Some(Err)`: counted, not shown.
pub fn parse_record(payload: &[u8]) -> Option<Result<Record, Malformed>> {
    let rest = payload.strip_prefix(b"p ")?;
    let bad = || {
        Malformed(format!(
            "presence record {:?}",
            String::from_utf8_lossy(payload)
        ))
    };
    let parse = || {
        let newline = rest.iter().position(|&b| b == b'\n')?;
        let head = std::str::from_utf8(&rest[..newline]).ok()?;
        let mut words = head.split(' ');
        let version = words.next()?.parse().ok()?;
        let joined = match words.next()? {
            "j" => true,
            "l" => false,
            _ => return None,
        };
        let field = words.next()?;
        if words.next().is_some() {
            return None;
        }
        let member = member(field, &rest[newline + 1..])?;
        Some(Record {
            version,
            member,
            joined,
        })
    };
    Some(parse().ok_or_else(bad))
}

/// What `SNAPSHOT` replied: the version, how many expired members this call removed, and every
/// member listed. A field or value that does not parse is skipped and counted.
#[derive(Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub version: u64,
    pub expired: u64,
    pub members: Vec<Member>,
    pub malformed: u64,
}

impl Snapshot {
    pub fn parse(value: &Value) -> Result<Snapshot, Malformed> {
        let bad = || Malformed(format!("presence snapshot {value:?}"));
        let Value::Array(items) = value else {
            return Err(bad());
        };
        let version = match items.first() {
            Some(Value::BulkString(b)) => std::str::from_utf8(b).ok().and_then(|t| t.parse().ok()),
            Some(Value::Int(n)) => u64::try_from(*n).ok(),
            _ => None,
        }
        .ok_or_else(bad)?;
        let expired = match items.get(1) {
            Some(Value::Int(n)) => u64::try_from(*n).map_err(|_| bad())?,
            _ => return Err(bad()),
        };
        let mut members = Vec::new();
        let mut malformed = 0;
        for pair in items[2..].chunks(2) {
            let parsed = match pair {
                [Value::BulkString(f), Value::BulkString(v)] => {
                    std::str::from_utf8(f).ok().and_then(|f| member(f, v))
                }
                _ => None,
            };
            match parsed {
                Some(m) => members.push(m),
                None => malformed += 1,
            }
        }
        Ok(Snapshot {
            version,
            expired,
            members,
            malformed,
        })
    }
}

/// The version a room's new presence hash starts at (see the module doc).
pub fn base_version(unix_ms: u64) -> u64 {
    unix_ms.saturating_mul(1000)
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// One script to run: `mod.rs` makes a job of it, and hands its reply back to `replied` with
/// `reply`.
#[derive(Debug)]
pub struct Call {
    pub script: Script,
    pub keys: Vec<String>,
    pub args: Vec<Vec<u8>>,
    pub reply: Reply,
}

/// What a presence script's reply is for.
#[derive(Clone, Debug)]
pub enum Reply {
    /// A snapshot of the room, for the roster. (A `String`: the tag travels to the command
    /// thread and back.)
    Snapshot(String),
    /// A prune: how many expired members this node removed.
    Prune,
    /// A refresh: how many of this node's members had to be recorded again.
    Refresh,
    /// A join or leave: nothing to read (a failure is repaired by the next refresh, or by the
    /// TTL).
    Done,
}

#[derive(Debug, Default)]
struct Counters {
    records: u64,
    malformed: u64,
    snapshots: u64,
    failed: u64,
    expired: u64,
    recorded_again: u64,
}

/// The engine's presence state. See the module doc.
pub struct Presence {
    prefix: String,
    node: Rc<str>,
    ttl_ms: u64,
    /// This node's members of each room: connection -> hash value, for the refresh.
    mine: HashMap<Rc<str>, BTreeMap<u64, Vec<u8>>>,
    roster: Roster,
    /// Changes for the hub, handed out at the next `poll`.
    changes: Vec<PresenceChange>,
    last_round: Option<Instant>,
    counters: Counters,
}

impl Presence {
    pub fn new(prefix: &str, node: &str, ttl_ms: u64) -> Presence {
        let node: Rc<str> = Rc::from(node);
        Presence {
            prefix: prefix.to_string(),
            roster: Roster::new(Rc::clone(&node)),
            node,
            ttl_ms: ttl_ms.max(MIN_TTL_MS),
            mine: HashMap::new(),
            changes: Vec::new(),
            last_round: None,
            counters: Counters::default(),
        }
    }

    fn keys(&self, room: &str) -> PresenceKeys {
        PresenceKeys::new(&self.prefix, room)
    }

    fn key(&self, conn: u64) -> MemberKey {
        MemberKey {
            node: Rc::clone(&self.node),
            conn,
        }
    }

    /// The keys outlive the TTL, so a member's entry expires by its score (with a leave)
    /// before its keys can vanish under a node that still follows the room.
    fn key_ttl_ms(&self) -> u64 {
        self.ttl_ms * 2
    }

    /// A member of this node joined `room` (or its info changed). The node's first member of
    /// the room starts the roster from the snapshot its `JOIN` replies.
    pub fn joined(&mut self, room: &str, member: LocalMember<'_>) -> Call {
        let first = !self.roster.follows(room);
        let value = value(member.id, member.info);
        let room_rc: Rc<str> = Rc::from(room);
        self.mine
            .entry(Rc::clone(&room_rc))
            .or_default()
            .insert(member.conn, value.clone());
        if first {
            self.roster.load(room);
        }
        let k = self.keys(room);
        let now = unix_ms();
        let args = vec![
            field(&self.key(member.conn)).into_bytes(),
            value,
            (now + self.ttl_ms).to_string().into_bytes(),
            self.key_ttl_ms().to_string().into_bytes(),
            k.channel.clone().into_bytes(),
            base_version(now).to_string().into_bytes(),
            now.to_string().into_bytes(),
            if first { b"1".to_vec() } else { b"0".to_vec() },
        ];
        Call {
            script: Script::PresenceJoin,
            keys: k.keys(),
            args,
            reply: if first {
                Reply::Snapshot(room.to_string())
            } else {
                Reply::Done
            },
        }
    }

    /// A member of this node left `room` (or closed). Its last member gone, the node stops
    /// following the room's presence.
    pub fn left(&mut self, room: &str, conn: u64) -> Option<Call> {
        let members = self.mine.get_mut(room)?;
        members.remove(&conn)?;
        if members.is_empty() {
            self.mine.remove(room);
            self.roster.unfollow(room);
        }
        let k = self.keys(room);
        let args = vec![
            field(&self.key(conn)).into_bytes(),
            k.channel.clone().into_bytes(),
        ];
        Some(Call {
            script: Script::PresenceLeave,
            keys: k.keys(),
            args,
            reply: Reply::Done,
        })
    }

    /// The room's channel is subscribed (first, or again after a reconnect): what was published
    /// while it was not is read with a new snapshot.
    pub fn subscribed(&mut self, channel: &str) -> Option<Call> {
        let room = self.room_of(channel)?;
        if !self.roster.follows(&room) {
            return None;
        }
        Some(self.snapshot(&room, true))
    }

    fn room_of(&self, channel: &str) -> Option<Rc<str>> {
        match Keys::stream_of(&self.prefix, channel.as_bytes())? {
            StreamId::Room(room) => Some(room),
            StreamId::Inbox(_) => None,
        }
    }

    /// A `SNAPSHOT` call: with `read`, for the roster (which then holds records until it
    /// comes back); without, only a prune.
    fn snapshot(&mut self, room: &Rc<str>, read: bool) -> Call {
        if read {
            self.roster.load(room);
        }
        let k = self.keys(room);
        let now = unix_ms();
        let args = vec![
            now.to_string().into_bytes(),
            k.channel.clone().into_bytes(),
            base_version(now).to_string().into_bytes(),
            if read { b"1".to_vec() } else { b"0".to_vec() },
        ];
        Call {
            script: Script::PresenceSnapshot,
            keys: k.keys(),
            args,
            reply: if read {
                Reply::Snapshot(room.to_string())
            } else {
                Reply::Prune
            },
        }
    }

    /// A message on `channel`: true if it was a presence record (taken here), false if it is
    /// for the message feeds.
    pub fn heard(&mut self, channel: &str, payload: &[u8]) -> bool {
        let Some(parsed) = parse_record(payload) else {
            return false;
        };
        match (parsed, self.room_of(channel)) {
            (Ok(record), Some(room)) => {
                self.counters.records += 1;
                self.roster.record(&room, record, &mut self.changes);
            }
            (Ok(_), None) => {}
            (Err(e), _) => {
                self.counters.malformed += 1;
                warn!("redis: {} on {channel}", e.0);
            }
        }
        true
    }

    /// A presence script's reply (`Err` when Redis did not answer it).
    pub fn replied(&mut self, reply: Reply, result: Result<&Value, String>) {
        match (reply, result) {
            (Reply::Snapshot(room), Ok(value)) => match Snapshot::parse(value) {
                Ok(snapshot) => {
                    self.counters.snapshots += 1;
                    self.counters.expired += snapshot.expired;
                    self.counters.malformed += snapshot.malformed;
                    let (version, members) = (snapshot.version, snapshot.members);
                    self.roster
                        .loaded(&room, version, members, &mut self.changes);
                }
                Err(e) => {
                    warn!("redis: {}", e.0);
                    self.counters.failed += 1;
                    self.roster.load_failed(&room, &mut self.changes);
                }
            },
            (Reply::Snapshot(room), Err(why)) => {
                debug!("redis: presence of {room} not read: {why}");
                self.counters.failed += 1;
                self.roster.load_failed(&room, &mut self.changes);
            }
            (Reply::Prune, Ok(value)) => match Snapshot::parse(value) {
                Ok(snapshot) => self.counters.expired += snapshot.expired,
                Err(e) => warn!("redis: {}", e.0),
            },
            (Reply::Refresh, Ok(Value::Int(n))) => {
                self.counters.recorded_again += u64::try_from(*n).unwrap_or(0);
            }
            (Reply::Prune | Reply::Refresh | Reply::Done, _) => {}
        }
    }

    /// The periodic duties, at most every TTL/3: refresh this node's members, prune the rooms
    /// it follows. And at every call: read again the rooms whose records skipped a version (or
    /// whose last read failed).
    pub fn due(&mut self, now: Instant) -> Vec<Call> {
        let mut calls = Vec::new();
        let stale: Vec<Rc<str>> = self.roster.stale().map(Rc::from).collect();
        for room in stale {
            calls.push(self.snapshot(&room, true));
        }
        let period = Duration::from_millis(self.ttl_ms / 3);
        if self
            .last_round
            .is_some_and(|t| now.duration_since(t) < period)
        {
            return calls;
        }
        self.last_round = Some(now);
        let now_ms = unix_ms();
        let rooms: Vec<Rc<str>> = self.mine.keys().cloned().collect();
        for room in rooms {
            let k = self.keys(&room);
            let mut args = vec![
                (now_ms + self.ttl_ms).to_string().into_bytes(),
                self.key_ttl_ms().to_string().into_bytes(),
                k.channel.clone().into_bytes(),
                base_version(now_ms).to_string().into_bytes(),
            ];
            for (conn, value) in &self.mine[&room] {
                args.push(field(&self.key(*conn)).into_bytes());
                args.push(value.clone());
            }
            calls.push(Call {
                script: Script::PresenceRefresh,
                keys: k.keys(),
                args,
                reply: Reply::Refresh,
            });
            calls.push(self.snapshot(&room, false));
        }
        calls
    }

    /// The members of `room` on other nodes.
    pub fn members(&self, room: &str) -> Vec<Member> {
        self.roster.members(room)
    }

    /// Moves the changes the hub has not heard yet into `out`.
    pub fn drain(&mut self, out: &mut Vec<Event>) {
        out.extend(self.changes.drain(..).map(Event::Presence));
    }

    pub fn render_metrics(&self, out: &mut String) {
        let c = &self.counters;
        let mut w = Writer::new(out);
        let members: usize = self.mine.values().map(BTreeMap::len).sum();
        w.gauge(
            "wsrelay_redis_presence_members",
            "Room memberships of this node's connections, recorded in Redis and refreshed.",
            members,
        );
        w.gauge(
            "wsrelay_redis_presence_rooms",
            "Rooms whose members on other nodes this node follows.",
            self.mine.len(),
        );
        let counters: [(&str, &str, u64); 6] = [
            ("wsrelay_redis_presence_records_total", "Presence records (joins and leaves) heard from Redis.", c.records),
            ("wsrelay_redis_presence_malformed_total", "Presence records or entries that did not parse (ignored).", c.malformed),
            ("wsrelay_redis_presence_snapshots_total", "Rooms' presence read whole (a first member, a subscription, a lost record).", c.snapshots),
            ("wsrelay_redis_presence_snapshot_failures_total", "Reads of a room's presence that failed (tried again).", c.failed),
            ("wsrelay_redis_presence_expired_total", "Members of silent nodes this node removed after their TTL (a leave published for each).", c.expired),
            ("wsrelay_redis_presence_recorded_again_total", "This node's members missing from Redis at a refresh, recorded again.", c.recorded_again),
        ];
        for (name, help, value) in counters {
            w.counter(name, help, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    fn alice(conn: u64) -> LocalMember<'static> {
        LocalMember {
            conn,
            id: "alice",
            info: Some("{}"),
        }
    }

    #[test]
    fn the_first_member_of_a_room_asks_for_a_snapshot_and_the_last_one_stops_following() {
        let mut p = Presence::new("w", "me", 60_000);
        let first = p.joined("lobby", alice(1));
        assert_eq!(first.script, Script::PresenceJoin);
        assert_eq!(first.keys, vec!["{w:r:lobby}:p", "{w:r:lobby}:pe"]);
        assert_eq!(first.args[0], b"me/1");
        assert_eq!(first.args[1], b"alice\n{}");
        assert_eq!(first.args[7], b"1", "a snapshot with the join");
        assert!(matches!(&first.reply, Reply::Snapshot(room) if room == "lobby"));
        let second = p.joined("lobby", alice(2));
        assert_eq!(second.args[7], b"0");
        assert!(matches!(second.reply, Reply::Done));
        // The subscription is confirmed: another snapshot; not for a room not followed.
        assert!(matches!(
            p.subscribed("{w:r:lobby}").map(|c| c.reply),
            Some(Reply::Snapshot(_))
        ));
        assert!(p.subscribed("{w:r:other}").is_none());
        assert!(p.subscribed("{w:i:alice}").is_none());
        // A leave of a connection never recorded sends nothing.
        assert!(p.left("lobby", 9).is_none());
        assert_eq!(p.left("lobby", 1).unwrap().script, Script::PresenceLeave);
        assert!(p.roster.follows("lobby"));
        p.left("lobby", 2).unwrap();
        assert!(!p.roster.follows("lobby"), "the last one gone");
        assert!(p.subscribed("{w:r:lobby}").is_none());
    }

    #[test]
    fn records_are_taken_from_the_rooms_channel_and_messages_left_alone() {
        let mut p = Presence::new("w", "me", 60_000);
        p.joined("lobby", alice(1));
        let snapshot = Value::Array(vec![
            bulk("10"),
            Value::Int(0),
            bulk("me/1"),
            bulk("alice\n"),
        ]);
        p.replied(Reply::Snapshot("lobby".into()), Ok(&snapshot));
        assert!(!p.heard("{w:r:lobby}", b"00000000000000ff 0000000000000001 42\nbody"));
        assert!(p.heard("{w:r:lobby}", b"p 11 j n2/1\nbob\n"));
        assert!(p.heard("{w:r:lobby}", b"p 12 j garbage"));
        let mut out = Vec::new();
        p.drain(&mut out);
        assert_eq!(out.len(), 1);
        assert!(matches!(&out[0], Event::Presence(c) if &*c.member.id == "bob" && c.joined));
        assert_eq!(p.members("lobby").len(), 1);
        assert_eq!((p.counters.records, p.counters.malformed), (1, 1));
    }

    #[test]
    fn refresh_and_prune_run_every_third_of_the_ttl() {
        let mut p = Presence::new("w", "me", 3_000);
        p.joined("lobby", alice(1));
        p.replied(Reply::Snapshot("lobby".into()), Err("down".into()));
        let t0 = Instant::now();
        let calls = p.due(t0);
        let scripts: Vec<Script> = calls.iter().map(|c| c.script).collect();
        // The failed read is tried again, then the round: refresh and prune.
        assert_eq!(
            scripts,
            vec![
                Script::PresenceSnapshot,
                Script::PresenceRefresh,
                Script::PresenceSnapshot
            ]
        );
        assert_eq!(
            calls[1].args[4..],
            [b"me/1".to_vec(), b"alice\n{}".to_vec()]
        );
        assert!(matches!(calls[2].reply, Reply::Prune));
        assert!(p.due(t0 + Duration::from_millis(900)).is_empty());
        assert_eq!(p.due(t0 + Duration::from_millis(1000)).len(), 2);
    }

    #[test]
    fn presence_keys_share_the_rooms_hash_tag() {
        let k = PresenceKeys::new("wsrelay", "lobby");
        assert_eq!(k.channel, "{wsrelay:r:lobby}");
        assert_eq!(k.hash, "{wsrelay:r:lobby}:p");
        assert_eq!(k.expiry, "{wsrelay:r:lobby}:pe");
    }

    #[test]
    fn records_parse_and_messages_are_not_records() {
        let r = parse_record(b"p 1700000000000001 j 00000000000000ff/42\nann\n{\"n\":1}")
            .unwrap()
            .unwrap();
        assert_eq!(r.version, 1_700_000_000_000_001);
        assert!(r.joined);
        assert_eq!(&*r.member.key.node, "00000000000000ff");
        assert_eq!(r.member.key.conn, 42);
        assert_eq!(&*r.member.id, "ann");
        assert_eq!(r.member.info.as_deref(), Some("{\"n\":1}"));
        let l = parse_record(b"p 2 l n/1\nbob\n").unwrap().unwrap();
        assert!(!l.joined);
        assert_eq!(l.member.info, None);
        // A message (16 hex digits first) is not a record.
        assert!(parse_record(b"00000000000000ff 0000000000000001 42\nbody").is_none());
        for bad in [
            &b"p x j n/1\nann\n"[..],
            b"p 1 x n/1\nann\n",
            b"p 1 j n1\nann\n",
            b"p 1 j n/x\nann\n",
            b"p 1 j n/1\n\n",
            b"p 1 j n/1 extra\nann\n",
            b"p 1 j n/1",
        ] {
            assert!(parse_record(bad).unwrap().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_value_reads_back() {
        let key = MemberKey {
            node: Rc::from("abc"),
            conn: 7,
        };
        let m = member(&field(&key), &value("ann", Some("{}"))).unwrap();
        assert_eq!((m.key, &*m.id, m.info.as_deref()), (key, "ann", Some("{}")));
        assert_eq!(member("abc/7", &value("ann", None)).unwrap().info, None);
        assert_eq!(member("~v", b"1\n"), None);
    }

    #[test]
    fn snapshots_parse_and_count_what_does_not() {
        let reply = Value::Array(vec![
            bulk("1700000000000009"),
            Value::Int(1),
            bulk("n1/1"),
            bulk("ann\n"),
            bulk("garbage"),
            bulk("bob\n"),
        ]);
        let s = Snapshot::parse(&reply).unwrap();
        assert_eq!(s.version, 1_700_000_000_000_009);
        assert_eq!(s.expired, 1);
        assert_eq!(s.members.len(), 1);
        assert_eq!(s.malformed, 1);
        assert!(Snapshot::parse(&Value::Nil).is_err());
        assert!(Snapshot::parse(&Value::Array(vec![bulk("x"), Value::Int(0)])).is_err());
    }
}
