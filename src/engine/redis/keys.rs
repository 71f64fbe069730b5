//! Redis key and channel names for a stream (SPEC §15), and the message format on a channel.
//!
//! Owns: how a `StreamId` becomes keys and a channel, and how a published message is framed
//! (`Published`) and read back.
//! Does not: talk to Redis (`link.rs`) or decide anything about continuity (`gaps.rs`).
//!
//! Every key of one stream shares the hash tag `{PREFIX:i:NAME}` (`r:` for a room), so a Redis
//! Cluster would put them in one slot and the per-message script, which touches only that
//! stream's keys, stays legal there (SPEC §15: Cluster is roadmap, but must stay possible).

use crate::engine::{Epoch, Position, StreamId};

/// The names of one stream's keys and channel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keys {
    /// `{P:i:alice}`: the hash tag, also the PUB/SUB channel.
    pub channel: String,
    /// The Redis stream (XADD), entry ids `<position>-0`.
    pub stream: String,
    /// The meta hash: `epoch`, `top` (last position), `base` (the top when the epoch began:
    /// every position up to it belongs to an earlier history), `delivered` (inboxes: the
    /// watermark below which nothing is pending).
    pub meta: String,
    /// The sorted set of nodes holding a connection of this id, scored by when that claim
    /// expires (ms since the epoch); inboxes only.
    pub online: String,
}

impl Keys {
    pub fn new(prefix: &str, stream: &StreamId) -> Keys {
        let kind = match stream {
            StreamId::Inbox(_) => "i",
            StreamId::Room(_) => "r",
        };
        let channel = format!("{{{prefix}:{kind}:{}}}", stream.name());
        Keys {
            stream: format!("{channel}:s"),
            meta: format!("{channel}:m"),
            online: format!("{channel}:o"),
            channel,
        }
    }

    /// The duplicate-window key of `sender`'s `client_id` in this stream. The sender's length
    /// comes first, so that `a:b` + `c` and `a` + `b:c` cannot name the same key.
    pub fn dedup(&self, sender: &str, client_id: &str) -> String {
        format!("{}:d:{}:{sender}:{client_id}", self.channel, sender.len())
    }

    /// The stream a channel name belongs to (the inverse of `new`'s `channel`).
    pub fn stream_of(prefix: &str, channel: &[u8]) -> Option<StreamId> {
        let text = std::str::from_utf8(channel).ok()?;
        let inner = text.strip_prefix('{')?.strip_suffix('}')?;
        let rest = inner.strip_prefix(prefix)?.strip_prefix(':')?;
        if let Some(name) = rest.strip_prefix("i:") {
            Some(StreamId::inbox(name))
        } else {
            rest.strip_prefix("r:").map(StreamId::room)
        }
    }
}

/// A message as the script PUBLISHes it: `<node> <epoch> <position>\n<body>` (node and epoch as
/// 16 hex digits, the position in decimal). The body is opaque bytes.
#[derive(Debug, PartialEq, Eq)]
pub struct Published<'a> {
    pub node: u64,
    pub epoch: Epoch,
    pub position: Position,
    pub body: &'a [u8],
}

impl<'a> Published<'a> {
    pub fn parse(payload: &'a [u8]) -> Option<Published<'a>> {
        let newline = payload.iter().position(|&b| b == b'\n')?;
        let head = std::str::from_utf8(&payload[..newline]).ok()?;
        let mut words = head.split(' ');
        let node = u64::from_str_radix(words.next()?, 16).ok()?;
        let epoch = Epoch::parse(words.next()?)?;
        let position = Position(words.next()?.parse().ok()?);
        if words.next().is_some() {
            return None;
        }
        Some(Published {
            node,
            epoch,
            position,
            body: &payload[newline + 1..],
        })
    }
}

/// A node's id as the scripts write it (the same 16 hex digits as an epoch).
pub fn node_text(node: u64) -> String {
    format!("{node:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_of_a_stream_shares_its_hash_tag() {
        let k = Keys::new("wsrelay", &StreamId::inbox("alice"));
        assert_eq!(k.channel, "{wsrelay:i:alice}");
        for key in [&k.stream, &k.meta, &k.online, &k.dedup("bob", "m1")] {
            assert!(key.starts_with("{wsrelay:i:alice}:"), "{key}");
        }
        let r = Keys::new("p", &StreamId::room("lobby"));
        assert_eq!(r.stream, "{p:r:lobby}:s");
    }

    #[test]
    fn dedup_keys_cannot_collide_across_the_separator() {
        let k = Keys::new("p", &StreamId::inbox("x"));
        assert_ne!(k.dedup("a:b", "c"), k.dedup("a", "b:c"));
    }

    #[test]
    fn a_channel_names_its_stream_back() {
        for s in [StreamId::inbox("al:ice"), StreamId::room("lobby")] {
            let k = Keys::new("wsrelay", &s);
            assert_eq!(
                Keys::stream_of("wsrelay", k.channel.as_bytes()),
                Some(s.clone())
            );
            assert_eq!(Keys::stream_of("other", k.channel.as_bytes()), None);
        }
    }

    #[test]
    fn a_published_message_parses_and_bad_ones_do_not() {
        let text = b"00000000000000ff 0000000000000001 42\n{\"a\":1}\nx";
        let p = Published::parse(text).unwrap();
        assert_eq!(p.node, 255);
        assert_eq!(p.epoch, Epoch(1));
        assert_eq!(p.position, Position(42));
        assert_eq!(p.body, b"{\"a\":1}\nx");
        for bad in [
            &b"ff 0000000000000001 42"[..],
            b"zz 0000000000000001 42\n",
            b"ff 01 42\n",
            b"ff 0000000000000001 x\n",
            b"ff 0000000000000001 4 5\n",
        ] {
            assert_eq!(Published::parse(bad), None, "{bad:?}");
        }
    }
}
