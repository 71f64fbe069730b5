//! The Redis engine (`--redis URL`, SPEC §15): streams, positions, duplicate windows and the
//! fan-out between nodes live in a Redis server that several wsrelay nodes share.
//!
//! Owns: `RedisEngine` (the `Engine` the hub talks to, on the reactor thread), which turns the
//! hub's work into script jobs for the command thread, follows the PUB/SUB channels of the ids
//! and rooms this node holds connections for, keeps completions in submission order, and
//! checks each stream's positions for continuity (`gaps.rs`) before it hands arrivals out.
//! * `keys.rs`: key and channel names (one hash tag per stream), the published message format;
//! * `script.rs`: the Lua scripts and their replies;
//! * `link.rs`: the command and subscriber threads (redis-rs, sync), reconnecting with backoff;
//! * `gaps.rs`: per-stream continuity (`Feed`): what to emit, hold or re-read.
//!
//! Does not: see connections or frames (the hub does), or block: every call returns at once,
//! and replies come back through a channel and the reactor's waker, like the file engine's.
//!
//! docs/scaling.md describes the design (keys, scripts, each fault) and why it is built this way.

mod gaps;
pub mod keys;
mod link;
pub mod presence;
pub mod script;

use self::gaps::{Feed, Step};
use self::keys::{node_text, Keys, Published};
use self::link::{Failure, Input, Job, Link, Subscription};
use self::script::{status_letter, AppendReply, ReadReply, Script};
use super::histogram::Histogram;
use super::{
    Append, Completion, Engine, Epoch, Event, LocalMember, Member, Now, Outcome, Position, Publish,
    Recovery, Refusal, Replayed, Since, Stats, StreamId, Ticket, Wake,
};
use crate::app::envelope::AckStatus;
use crate::server::metrics::Writer;
use log::{debug, info, warn};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::rc::Rc;
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::{Duration, Instant};

/// A room's stream without `--room-history`: a short buffer, so that a node that missed
/// messages (a gap, a PUB/SUB reconnect) can re-read them (SPEC §15); nothing is replayed to
/// clients from it (history is off).
pub const ROOM_BUFFER: usize = 128;
pub const ROOM_BUFFER_TTL_MS: u64 = 60_000;
/// How long a node's claim that an id is online here lasts without a refresh, and how often it
/// refreshes: a node killed with SIGKILL stops counting after the TTL.
pub const ONLINE_TTL_MS: u64 = 15_000;
const ONLINE_REFRESH: Duration = Duration::from_secs(5);
/// How often a command link that is down is given a PING to reconnect with.
const COMMANDS_PROBE: Duration = Duration::from_millis(500);
/// A failed re-read of a gap is tried again after this long.
const FILL_RETRY: Duration = Duration::from_millis(200);
/// Bound on the (sender, client id) -> stream map `acked` needs.
const RECENT_MAX: usize = 65_536;

/// What `--redis` and the relay's flags give the engine.
#[derive(Clone, Debug)]
pub struct RedisConfig {
    pub url: String,
    /// `--redis-prefix`: the start of every key and channel.
    pub prefix: String,
    /// The inboxes' bounds (`--offline-*`).
    pub limits: super::Limits,
    /// Room history's bounds (`--room-history*`; `per_stream` 0: off).
    pub room_history: super::Limits,
    /// How long a client id is remembered (ms).
    pub dedup_ttl_ms: u64,
    /// `--redis-presence-ttl`: how long a member stays listed after its node stopped
    /// refreshing it (ms; at least `presence::MIN_TTL_MS`).
    pub presence_ttl_ms: u64,
}

/// What a reply is for; it travels to the command thread and back.
enum Tag {
    /// Fire and forget (online marks, watermarks, acked statuses); failures are counted.
    Fire,
    Append {
        seq: u64,
        ticket: Ticket,
        /// A room message without history may be delivered on this node alone while Redis is
        /// away (see docs/scaling.md, "Redis down").
        local_fallback: bool,
    },
    Read {
        seq: u64,
        ticket: Ticket,
        channel: String,
        since: Option<Since>,
        /// `recover` (true) or `history` (false).
        recover: bool,
        /// An id's inbox (else a room).
        inbox: bool,
        /// The channel's subscription had taken effect when the read was sent: nothing published
        /// after the read can have been missed.
        subscribed: bool,
    },
    Fill {
        channel: String,
    },
    /// A presence script (`presence.rs`).
    Presence(presence::Reply),
}

/// A completion waiting for its turn (completions leave in submission order).
enum Ready {
    Plain(Completion),
    /// A `recover`'s answer: arrivals of its stream are held until it leaves (rule 3 of the
    /// seam), then `top` tells which of them the recovery already holds.
    Recovered {
        completion: Completion,
        channel: String,
        top: Option<Position>,
        refill: bool,
    },
}

/// One connection's state, for /healthz, the log and /metrics.
#[derive(Default)]
struct LinkState {
    /// `None` until the first attempt; then whether it is up, and why not.
    up: Option<Result<(), String>>,
    since: Option<Instant>,
    changes: u64,
    reconnects: u64,
}

#[derive(Default)]
struct Counters {
    commands: u64,
    errors: u64,
    rejected_unreachable: u64,
    local_only: u64,
    arrivals: u64,
    own_echoes: u64,
    duplicates_dropped: u64,
    gaps_detected: u64,
    gaps_recovered: u64,
    gaps_unrecoverable: u64,
    messages_recovered: u64,
    epoch_changes: u64,
    fills: u64,
    resubscribes: u64,
    interruptions: u64,
}

pub struct RedisEngine {
    config: RedisConfig,
    node: u64,
    node_text: String,
    /// The epoch `epoch()` names: this node's, for a `joined` without an engine answer (history
    /// off). Streams have their own, in `Recovery::epoch`.
    epoch: Epoch,
    jobs: Sender<Job<Tag>>,
    subscriptions: Sender<Subscription>,
    inputs: Receiver<Input<Tag>>,
    next_seq: u64,
    emit_seq: u64,
    done: BTreeMap<u64, Ready>,
    out: VecDeque<Event>,
    /// Per channel this node follows.
    feeds: HashMap<String, Feed>,
    /// Ids with a connection here, for the online marks.
    online: HashSet<Rc<str>>,
    /// Inbox watermarks to send at the next `poll`.
    delivered: HashMap<String, Position>,
    recent: HashMap<(Rc<str>, Rc<str>), String>,
    /// Jobs sent whose reply has not come back.
    outstanding: usize,
    local_next: Position,
    refreshed: Option<Instant>,
    fill_retry_at: Option<Instant>,
    /// When the next PING may go to a command link that is down.
    probed: Option<Instant>,
    commands_link: LinkState,
    pubsub_link: LinkState,
    counters: Counters,
    round_trip: Histogram,
    batch_jobs: Histogram,
    /// This node's members in Redis and its replica of the others' (`presence.rs`).
    presence: presence::Presence,
}

const ROUND_TRIP_BOUNDS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];
const BATCH_BOUNDS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

impl RedisEngine {
    /// Starts the connection threads. Connecting happens on them: Redis being down at start-up
    /// is a fault like any later one (sends are rejected until it is back), not a refusal to
    /// start. The URL is checked here, so a malformed one is one line at start-up.
    pub fn start(config: RedisConfig, wake: Wake) -> Result<RedisEngine, String> {
        redis::Client::open(config.url.as_str())
            .map_err(|e| format!("--redis {}: {e}", config.url))?;
        // The prefix goes inside each stream's hash tag: a brace would end the tag early (and
        // make channel names ambiguous), whitespace would not survive a log line.
        if config.prefix.is_empty()
            || config
                .prefix
                .contains(|c: char| c == '{' || c == '}' || c.is_whitespace())
        {
            return Err(format!(
                "--redis-prefix {:?}: must be non-empty, without braces or whitespace",
                config.prefix
            ));
        }
        let (jobs_tx, jobs_rx) = mpsc::channel();
        let (subs_tx, subs_rx) = mpsc::channel();
        let (in_tx, in_rx) = mpsc::channel();
        let thread = |e: std::io::Error| format!("cannot start the Redis threads: {e}");
        link::spawn_commands(config.url.clone(), jobs_rx, in_tx.clone(), wake.clone())
            .map_err(thread)?;
        link::spawn_pubsub(config.url.clone(), subs_rx, in_tx, wake).map_err(thread)?;
        Ok(RedisEngine::with_links(config, jobs_tx, subs_tx, in_rx))
    }

    /// The engine over the channels to its connection threads (or, in unit tests, to the test
    /// standing in for them).
    fn with_links(
        config: RedisConfig,
        jobs_tx: Sender<Job<Tag>>,
        subs_tx: Sender<Subscription>,
        in_rx: Receiver<Input<Tag>>,
    ) -> RedisEngine {
        let node = fastrand::u64(1..);
        let presence =
            presence::Presence::new(&config.prefix, &node_text(node), config.presence_ttl_ms);
        RedisEngine {
            node_text: node_text(node),
            node,
            epoch: Epoch::random(),
            config,
            jobs: jobs_tx,
            subscriptions: subs_tx,
            inputs: in_rx,
            next_seq: 0,
            emit_seq: 0,
            done: BTreeMap::new(),
            out: VecDeque::new(),
            feeds: HashMap::new(),
            online: HashSet::new(),
            delivered: HashMap::new(),
            recent: HashMap::new(),
            outstanding: 0,
            local_next: Position(0),
            refreshed: None,
            fill_retry_at: None,
            probed: None,
            commands_link: LinkState::default(),
            pubsub_link: LinkState::default(),
            counters: Counters::default(),
            round_trip: Histogram::new(ROUND_TRIP_BOUNDS),
            batch_jobs: Histogram::new(BATCH_BOUNDS),
            presence,
        }
    }

    /// This node's id, as written into every message it publishes.
    pub fn node(&self) -> u64 {
        self.node
    }

    fn keys(&self, stream: &StreamId) -> Keys {
        Keys::new(&self.config.prefix, stream)
    }

    fn send(&mut self, job: Job<Tag>) {
        self.outstanding += 1;
        self.counters.commands += 1;
        // The thread only stops when this engine is dropped, so a send cannot fail meanwhile.
        let _ = self.jobs.send(job);
    }

    /// Sends a presence script (`presence.rs`); its reply goes back to `Presence::replied`.
    fn presence_call(&mut self, call: presence::Call) {
        self.send(Job::Script {
            script: call.script,
            keys: call.keys,
            args: call.args,
            tag: Tag::Presence(call.reply),
        });
    }

    fn seq(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
    }

    /// A completion decided now, still behind the ones submitted before it.
    fn complete_now(&mut self, ticket: Ticket, outcome: Outcome) {
        let seq = self.seq();
        let completion = Completion { ticket, outcome };
        self.done.insert(seq, Ready::Plain(completion));
    }

    /// Remembers which stream a client id went to, for `acked`.
    fn remember(&mut self, sender: &Rc<str>, client_id: Option<&Rc<str>>, keys: &Keys) {
        if let Some(client_id) = client_id {
            if self.recent.len() >= RECENT_MAX {
                // Coarse, but bounded: `acked` follows its completion at once, so only the
                // entries of work still in flight matter, and those are the newest.
                self.recent.clear();
            }
            let key = (Rc::clone(sender), Rc::clone(client_id));
            self.recent.insert(key, keys.channel.clone());
        }
    }

    /// Sends the append script for one message.
    #[allow(clippy::too_many_arguments)]
    fn append_job(
        &mut self,
        ticket: Ticket,
        stream: &StreamId,
        sender: &Rc<str>,
        client_id: Option<&Rc<str>>,
        body: &[u8],
        shape: Shape,
        now: Now,
    ) {
        let keys = self.keys(stream);
        self.remember(sender, client_id, &keys);
        let dedup = client_id.map_or_else(|| keys.meta.clone(), |c| keys.dedup(sender, c));
        let seq = self.seq();
        let args: Vec<Vec<u8>> = vec![
            self.node_text.clone().into_bytes(),
            body.to_vec(),
            if shape.retain {
                b"1".to_vec()
            } else {
                b"0".to_vec()
            },
            shape.max_len.to_string().into_bytes(),
            shape.ttl_ms.to_string().into_bytes(),
            shape.cap.to_string().into_bytes(),
            if client_id.is_some() {
                b"1".to_vec()
            } else {
                b"0".to_vec()
            },
            self.config.dedup_ttl_ms.max(1).to_string().into_bytes(),
            status_letter(shape.status).as_bytes().to_vec(),
            Epoch::random().to_string().into_bytes(),
            base_position(now).to_string().into_bytes(),
            if shape.ask_online {
                b"1".to_vec()
            } else {
                b"0".to_vec()
            },
            keys.channel.clone().into_bytes(),
        ];
        self.send(Job::Script {
            script: Script::Append,
            keys: vec![keys.stream, keys.meta, dedup, keys.online],
            args,
            tag: Tag::Append {
                seq,
                ticket,
                local_fallback: shape.local_fallback,
            },
        });
    }

    /// Sends the read script (`recover`, `history`, or a gap's re-read).
    fn read_job(&mut self, stream: &StreamId, mode: ReadMode, tag: Tag) {
        let keys = self.keys(stream);
        let (mode, position, epoch, count) = match mode {
            ReadMode::Pending => ("pending", Position(0), None, 0),
            ReadMode::Since(s) => ("since", s.position, s.epoch, 0),
            ReadMode::Tail(n) => ("tail", Position(0), None, n),
            ReadMode::Top => ("top", Position(0), None, 0),
        };
        let limits = self.limits(stream);
        let now_ms = unix_ms();
        let args = vec![
            Epoch::random().to_string().into_bytes(),
            (now_ms.saturating_mul(1000)).to_string().into_bytes(),
            limits.1.to_string().into_bytes(),
            mode.as_bytes().to_vec(),
            position.0.to_string().into_bytes(),
            epoch
                .map(|e| e.to_string())
                .unwrap_or_default()
                .into_bytes(),
            count.to_string().into_bytes(),
        ];
        self.send(Job::Script {
            script: Script::Read,
            keys: vec![keys.stream, keys.meta],
            args,
            tag,
        });
    }

    /// (MAXLEN, TTL ms) of a stream.
    fn limits(&self, stream: &StreamId) -> (usize, u64) {
        match stream {
            StreamId::Inbox(_) => (self.config.limits.per_stream, self.config.limits.ttl_ms),
            StreamId::Room(_) if self.keeps_history() => (
                self.config.room_history.per_stream,
                self.config.room_history.ttl_ms,
            ),
            StreamId::Room(_) => (ROOM_BUFFER, ROOM_BUFFER_TTL_MS),
        }
    }

    fn keeps_history(&self) -> bool {
        self.config.room_history.per_stream > 0
    }

    /// Follows `stream`'s channel (subscribing if this node did not yet); returns its name.
    fn follow(&mut self, stream: &StreamId) -> String {
        let channel = self.keys(stream).channel;
        if !self.feeds.contains_key(&channel) {
            self.feeds
                .insert(channel.clone(), Feed::new(stream.clone()));
            let _ = self
                .subscriptions
                .send(Subscription::Subscribe(channel.clone()));
        }
        channel
    }

    /// Stops following channels nobody here needs any more.
    fn prune(&mut self) {
        let idle: Vec<String> = self
            .feeds
            .iter()
            .filter(|(_, f)| f.idle())
            .map(|(c, _)| c.clone())
            .collect();
        for channel in idle {
            self.feeds.remove(&channel);
            let _ = self.subscriptions.send(Subscription::Unsubscribe(channel));
        }
    }

    fn online_mark(&mut self, id: &str, present: bool) {
        let keys = self.keys(&StreamId::inbox(id));
        let mut cmd = if present {
            let mut cmd = redis::cmd("ZADD");
            cmd.arg(&keys.online)
                .arg(unix_ms() + ONLINE_TTL_MS)
                .arg(&self.node_text);
            cmd
        } else {
            let mut cmd = redis::cmd("ZREM");
            cmd.arg(&keys.online).arg(&self.node_text);
            cmd
        };
        if present {
            // The set itself goes when no node refreshes it any more.
            let mut expire = redis::cmd("PEXPIRE");
            expire.arg(&keys.online).arg(ONLINE_TTL_MS * 2);
            self.send(Job::Plain {
                cmd: std::mem::replace(&mut cmd, expire),
                tag: Tag::Fire,
            });
        }
        self.send(Job::Plain {
            cmd,
            tag: Tag::Fire,
        });
    }

    /// Re-reads what `channel` missed after its last position.
    fn fill(&mut self, channel: &str) {
        let Some(feed) = self.feeds.get_mut(channel) else {
            return;
        };
        let Some(since) = feed.fill_from() else {
            return;
        };
        let stream = feed.stream.clone();
        self.counters.fills += 1;
        let tag = Tag::Fill {
            channel: channel.to_string(),
        };
        self.read_job(&stream, ReadMode::Since(since), tag);
    }

    /// Applies a step of a feed: arrivals to hand out, a re-read to start.
    fn apply(&mut self, channel: &str, steps: Vec<Step>) {
        let mut refill = false;
        for step in steps {
            match step {
                Step::Emit(arrival) => {
                    self.counters.arrivals += 1;
                    self.out.push_back(Event::Arrived(arrival));
                }
                Step::Own => self.counters.own_echoes += 1,
                Step::Duplicate => self.counters.duplicates_dropped += 1,
                Step::Gap => {
                    self.counters.gaps_detected += 1;
                    refill = true;
                }
                Step::EpochChanged => self.counters.epoch_changes += 1,
            }
        }
        if refill {
            self.fill(channel);
        }
    }

    fn input(&mut self, input: Input<Tag>) {
        match input {
            Input::Reply { tag, result } => {
                self.outstanding = self.outstanding.saturating_sub(1);
                self.reply(tag, result);
            }
            Input::Batch { jobs, round_trip } => {
                self.round_trip.record(round_trip.as_secs_f64());
                self.batch_jobs.record(jobs as f64);
            }
            Input::State { link, up } => self.state(link, up),
            Input::Subscribed(channel) => {
                // A room's presence records published before this were lost to this node.
                if let Some(call) = self.presence.subscribed(&channel) {
                    self.presence_call(call);
                }
                let Some(feed) = self.feeds.get_mut(&channel) else {
                    return;
                };
                feed.subscribed = true;
                if std::mem::replace(&mut feed.was_subscribed, true) {
                    self.counters.resubscribes += 1;
                }
                if feed.knows_position() {
                    // A subscription renewed after a reconnect, or one that took effect after
                    // a recovery read the stream: whatever was published while there was none
                    // is re-read before anything newer goes out (SPEC §15).
                    self.fill(&channel);
                }
            }
            Input::Message { channel, payload } => {
                let Ok(channel) = String::from_utf8(channel) else {
                    return;
                };
                if self.presence.heard(&channel, &payload) {
                    return; // a presence record, not a message
                }
                let Some(published) = Published::parse(&payload) else {
                    warn!("redis: a message on {channel} that no wsrelay node published");
                    return;
                };
                let Some(feed) = self.feeds.get_mut(&channel) else {
                    return; // unsubscribed meanwhile
                };
                let steps = feed.arrived(&published, self.node);
                self.apply(&channel, steps);
            }
        }
    }

    fn reply(&mut self, tag: Tag, result: Result<redis::Value, Failure>) {
        match &result {
            Err(Failure::Server(e)) => {
                self.counters.errors += 1;
                warn!("redis: {e}");
            }
            Err(Failure::Unreachable(_)) | Ok(_) => {}
        }
        match tag {
            Tag::Fire => {}
            Tag::Presence(reply) => {
                let result = match &result {
                    Ok(value) => Ok(value),
                    Err(Failure::Unreachable(why) | Failure::Server(why)) => Err(why.clone()),
                };
                self.presence.replied(reply, result);
            }
            Tag::Append {
                seq,
                ticket,
                local_fallback,
            } => {
                let outcome = self.appended(result, local_fallback);
                let completion = Completion { ticket, outcome };
                self.done.insert(seq, Ready::Plain(completion));
            }
            Tag::Read {
                seq,
                ticket,
                channel,
                since,
                recover,
                inbox,
                subscribed,
            } => {
                let parsed = read_reply(result);
                if let Err(e) = &parsed {
                    debug!("redis: a read for {channel} failed: {e}");
                }
                let ready = if recover {
                    let top = parsed.as_ref().ok().map(|r| r.top);
                    let recovery = match parsed {
                        Ok(reply) => recovery(&reply, since, inbox),
                        Err(_) => self.unreachable_recovery(),
                    };
                    Ready::Recovered {
                        completion: Completion {
                            ticket,
                            outcome: Outcome::Recovered(recovery),
                        },
                        channel,
                        top,
                        refill: !subscribed,
                    }
                } else {
                    let page = match parsed {
                        Ok(reply) => history_page(&reply),
                        Err(_) => self.unreachable_recovery(),
                    };
                    Ready::Plain(Completion {
                        ticket,
                        outcome: Outcome::Recovered(page),
                    })
                };
                self.done.insert(seq, ready);
            }
            Tag::Fill { channel } => {
                let Some(feed) = self.feeds.get_mut(&channel) else {
                    return;
                };
                let steps = match read_reply(result) {
                    Ok(reply) => {
                        let (steps, outcome) = feed.filled(&reply, self.node);
                        self.counters.messages_recovered += outcome.recovered;
                        // A re-read that found nothing missing (a resubscribe with nothing
                        // published meanwhile) recovered no gap.
                        if !outcome.complete {
                            self.counters.gaps_unrecoverable += 1;
                        }
                        if !outcome.complete && !outcome.epoch_changed {
                            // SPEC §15: what cannot be re-read must not be skipped silently:
                            // the connections following the stream here reconnect with
                            // `since`, and their `recovered: false` says what is missing.
                            self.counters.interruptions += 1;
                            let stream = feed.stream.clone();
                            self.out.push_back(Event::Interrupted(stream));
                        } else if outcome.recovered > 0 {
                            self.counters.gaps_recovered += 1;
                        }
                        steps
                    }
                    Err(e) => {
                        // Tried again shortly (`maintain`); what waits behind it stays held.
                        // Redis being away is logged once, by its state change.
                        debug!("redis: re-reading {channel} failed: {e}");
                        feed.fill_failed();
                        self.fill_retry_at = Some(Instant::now() + FILL_RETRY);
                        Vec::new()
                    }
                };
                self.apply(&channel, steps);
            }
        }
    }

    fn appended(&mut self, result: Result<redis::Value, Failure>, local_fallback: bool) -> Outcome {
        let value = match result {
            Ok(value) => value,
            Err(Failure::Unreachable(why)) if local_fallback => {
                // SPEC §15: local delivery goes on. A room without history keeps nothing, so
                // its message can reach this node's members with a position of this node's own
                // (docs/scaling.md, "Redis down").
                let _ = why;
                self.counters.local_only += 1;
                let floor = unix_ms().saturating_mul(1000);
                self.local_next = Position(self.local_next.0.max(floor) + 1);
                return Outcome::Stored {
                    position: self.local_next,
                };
            }
            Err(Failure::Unreachable(why)) => {
                self.counters.rejected_unreachable += 1;
                return Outcome::Rejected(Refusal::Store(format!("redis unreachable: {why}")));
            }
            Err(Failure::Server(e)) => return Outcome::Rejected(Refusal::Store(e)),
        };
        match AppendReply::parse(&value) {
            Ok(AppendReply::Stored {
                position,
                online_elsewhere,
                ..
            }) => {
                if online_elsewhere {
                    Outcome::StoredOnlineElsewhere { position }
                } else {
                    Outcome::Stored { position }
                }
            }
            Ok(AppendReply::Duplicate { position, status }) => {
                Outcome::Duplicate { position, status }
            }
            Ok(AppendReply::Full) => Outcome::Rejected(Refusal::Full),
            Err(e) => {
                self.counters.errors += 1;
                Outcome::Rejected(Refusal::Store(e.0))
            }
        }
    }

    /// SPEC §13: "engine unreachable" -> `recovered: false`, nothing replayed (what is pending
    /// stays pending in Redis for the next connection).
    fn unreachable_recovery(&self) -> Recovery {
        Recovery {
            epoch: self.epoch,
            last: None,
            recovered: false,
            messages: Vec::new(),
        }
    }

    fn state(&mut self, link: Link, up: Result<(), String>) {
        let state = match link {
            Link::Commands => &mut self.commands_link,
            Link::Pubsub => &mut self.pubsub_link,
        };
        let was_up = matches!(state.up, Some(Ok(())));
        let had = state.up.is_some();
        let changed = !matches!(
            (&state.up, &up),
            (Some(Ok(())), Ok(())) | (Some(Err(_)), Err(_))
        );
        if !changed {
            return;
        }
        state.changes += 1;
        state.since = Some(Instant::now());
        match &up {
            Ok(()) if had => {
                state.reconnects += 1;
                info!("redis: {} connection is back", link.name());
            }
            Ok(()) => info!("redis: {} connection up", link.name()),
            Err(why) if was_up || !had => {
                warn!("redis: {} connection down: {why}", link.name())
            }
            Err(_) => {}
        }
        state.up = Some(up);
        if link == Link::Pubsub && !matches!(self.pubsub_link.up, Some(Ok(()))) {
            for feed in self.feeds.values_mut() {
                feed.subscribed = false;
            }
        }
    }

    /// Moves the completions whose turn has come into `out`.
    fn release(&mut self) {
        while let Some(ready) = self.done.remove(&self.emit_seq) {
            self.emit_seq += 1;
            match ready {
                Ready::Plain(c) => self.out.push_back(Event::Completed(c)),
                Ready::Recovered {
                    completion,
                    channel,
                    top,
                    refill,
                } => {
                    let Some(feed) = self.feeds.get_mut(&channel) else {
                        self.out.push_back(Event::Completed(completion));
                        continue;
                    };
                    let (before, after) = feed.recovered(top, self.node);
                    self.apply(&channel, before);
                    self.out.push_back(Event::Completed(completion));
                    self.apply(&channel, after);
                    let subscribed = self.feeds.get(&channel).is_some_and(|f| f.subscribed);
                    if refill && subscribed && top.is_some() {
                        // The read may have run before the subscription took effect: what was
                        // published in between is re-read now.
                        self.fill(&channel);
                    }
                }
            }
        }
    }

    fn flush_delivered(&mut self) {
        if self.delivered.is_empty() {
            return;
        }
        let delivered = std::mem::take(&mut self.delivered);
        for (meta, position) in delivered {
            self.send(Job::Script {
                script: Script::Delivered,
                keys: vec![meta],
                args: vec![position.0.to_string().into_bytes()],
                tag: Tag::Fire,
            });
        }
    }

    fn down(&self) -> Vec<(Link, &str, Duration)> {
        [
            (Link::Commands, &self.commands_link),
            (Link::Pubsub, &self.pubsub_link),
        ]
        .into_iter()
        .filter_map(|(link, s)| match &s.up {
            Some(Err(why)) => Some((
                link,
                why.as_str(),
                s.since.map_or(Duration::ZERO, |t| t.elapsed()),
            )),
            _ => None,
        })
        .collect()
    }
}

/// How one message is appended.
struct Shape {
    retain: bool,
    max_len: usize,
    ttl_ms: u64,
    cap: usize,
    status: AckStatus,
    ask_online: bool,
    local_fallback: bool,
}

enum ReadMode {
    Pending,
    Since(Since),
    Tail(usize),
    /// No entries, only the stream's state: where a room without history stands when a node's
    /// first member joins it (its feed re-reads from there once subscribed).
    Top,
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Where a new stream's positions start: like the local engines, above the Unix time in ms x
/// 1000, so a stream whose keys expired and came back under a new epoch still never hands out
/// a msg_id a client already holds (SPEC §13).
fn base_position(now: Now) -> u64 {
    now.unix_ms.saturating_mul(1000)
}

fn read_reply(result: Result<redis::Value, Failure>) -> Result<ReadReply, String> {
    match result {
        Ok(value) => ReadReply::parse(&value).map_err(|e| e.0),
        Err(Failure::Unreachable(why)) => Err(format!("redis unreachable: {why}")),
        Err(Failure::Server(e)) => Err(e),
    }
}

/// The answer to `recover` from what the read script returned (SPEC §13: `recovered` only when
/// every message after `since` is in it).
fn recovery(reply: &ReadReply, since: Option<Since>, inbox: bool) -> Recovery {
    let messages = reply
        .entries
        .iter()
        .map(|e| Replayed {
            position: e.position,
            body: Rc::from(e.body.as_slice()),
            // Only an inbox has pending messages (a room's went live when published).
            pending: inbox && e.position > reply.delivered,
        })
        .collect();
    let recovered = match since {
        None => true,
        Some(s) => {
            let same_epoch = s.epoch.is_none_or(|e| e == reply.epoch);
            let in_history = s.position >= reply.base && s.position <= reply.top;
            // Positions are contiguous: every one after `since` up to the top is in the answer
            // (a position trimmed away, or never kept, is missing).
            let after = reply.entries.iter().filter(|e| e.position > s.position);
            let complete =
                s.position <= reply.top && after.count() as u64 == reply.top.0 - s.position.0;
            same_epoch && in_history && complete
        }
    };
    Recovery {
        epoch: reply.epoch,
        last: (reply.top > reply.base).then_some(reply.top),
        recovered,
        messages,
    }
}

/// A history page (the read script's `tail`: newest first) oldest first.
fn history_page(reply: &ReadReply) -> Recovery {
    let messages: Vec<Replayed> = reply
        .entries
        .iter()
        .rev()
        .map(|e| Replayed {
            position: e.position,
            body: Rc::from(e.body.as_slice()),
            pending: false,
        })
        .collect();
    // Every message of this epoch is still there, and all of them fit the page.
    let nothing_lost = reply.retained == reply.top.0.saturating_sub(reply.base.0);
    let recovered = nothing_lost && messages.len() as u64 == reply.retained;
    Recovery {
        epoch: reply.epoch,
        last: (reply.top > reply.base).then_some(reply.top),
        recovered,
        messages,
    }
}

impl Engine for RedisEngine {
    fn kind(&self) -> &'static str {
        "redis"
    }

    fn epoch(&self) -> Epoch {
        self.epoch
    }

    fn append(&mut self, ticket: Ticket, append: Append, now: Now) {
        let limits = self.config.limits;
        if append.body.len() > limits.max_bytes {
            return self.complete_now(ticket, Outcome::Rejected(Refusal::TooLarge));
        }
        let shape = Shape {
            retain: true,
            max_len: limits.per_stream,
            ttl_ms: limits.ttl_ms,
            cap: limits.per_stream,
            status: AckStatus::Queued,
            ask_online: true,
            local_fallback: false,
        };
        let (sender, client_id) = (append.sender, append.client_id);
        let stream = append.stream;
        self.append_job(
            ticket,
            &stream,
            &sender,
            client_id.as_ref(),
            &append.body,
            shape,
            now,
        );
    }

    fn publish(&mut self, ticket: Ticket, publish: Publish, now: Now) {
        let (stream, shape) = if publish.keep {
            let (max_len, ttl_ms) = self.limits(&StreamId::room(&publish.room));
            let shape = Shape {
                retain: true,
                max_len,
                ttl_ms,
                cap: 0,
                status: AckStatus::Delivered,
                ask_online: false,
                local_fallback: !self.keeps_history(),
            };
            (StreamId::Room(Rc::clone(&publish.room)), shape)
        } else {
            // `--offline-max 0`: a direct message that is never retained; `room` names the
            // recipient (see `Publish::keep`). It still goes through the recipient's channel,
            // so the nodes holding its connections deliver it.
            let shape = Shape {
                retain: false,
                max_len: 0,
                ttl_ms: self.config.limits.ttl_ms,
                cap: 0,
                status: AckStatus::Delivered,
                ask_online: true,
                local_fallback: false,
            };
            (StreamId::Inbox(Rc::clone(&publish.room)), shape)
        };
        let (sender, client_id) = (publish.sender, publish.client_id);
        self.append_job(
            ticket,
            &stream,
            &sender,
            client_id.as_ref(),
            &publish.body,
            shape,
            now,
        );
    }

    fn recover(&mut self, ticket: Ticket, stream: &StreamId, since: Option<Since>, _now: Now) {
        let channel = self.follow(stream);
        let feed = self.feeds.get_mut(&channel).expect("followed above");
        feed.recovering += 1;
        let subscribed = feed.subscribed;
        let seq = self.seq();
        let mode = match stream {
            // A room without history replays nothing (SPEC §13), not even the recovery
            // buffer kept for the nodes' re-reads; the read only fixes the feed's position, so
            // what is published before the subscription takes effect is re-read then
            // (`Input::Subscribed`) and reaches the joiner after its `joined`.
            StreamId::Room(_) if !self.keeps_history() => ReadMode::Top,
            _ => since.map_or(ReadMode::Pending, ReadMode::Since),
        };
        let tag = Tag::Read {
            seq,
            ticket,
            channel,
            since,
            recover: true,
            inbox: matches!(stream, StreamId::Inbox(_)),
            subscribed,
        };
        self.read_job(stream, mode, tag);
    }

    fn history(&mut self, ticket: Ticket, stream: &StreamId, limit: usize, _now: Now) {
        let seq = self.seq();
        let tag = Tag::Read {
            seq,
            ticket,
            channel: self.keys(stream).channel,
            since: None,
            recover: false,
            inbox: false,
            subscribed: true,
        };
        self.read_job(stream, ReadMode::Tail(limit.max(1)), tag);
    }

    fn delivered(&mut self, stream: &StreamId, positions: &[Position]) {
        if !matches!(stream, StreamId::Inbox(_)) {
            return;
        }
        let Some(&newest) = positions.iter().max() else {
            return;
        };
        let meta = self.keys(stream).meta;
        let entry = self.delivered.entry(meta).or_default();
        *entry = (*entry).max(newest);
    }

    fn acked(&mut self, sender: &str, client_id: &str, position: Position, status: AckStatus) {
        let key = (Rc::from(sender), Rc::from(client_id));
        let Some(channel) = self.recent.get(&key) else {
            return;
        };
        let dedup = format!("{channel}:d:{}:{sender}:{client_id}", sender.len());
        let mut cmd = redis::cmd("SET");
        cmd.arg(dedup)
            .arg(format!("{}:{}", position.0, status_letter(status)))
            .arg("XX")
            .arg("KEEPTTL");
        self.send(Job::Plain {
            cmd,
            tag: Tag::Fire,
        });
    }

    fn online(&mut self, id: &str) {
        let id: Rc<str> = Rc::from(id);
        if !self.online.insert(Rc::clone(&id)) {
            return;
        }
        let stream = StreamId::Inbox(Rc::clone(&id));
        let channel = self.follow(&stream);
        if let Some(feed) = self.feeds.get_mut(&channel) {
            feed.wanted = true;
        }
        self.online_mark(&id, true);
    }

    fn offline(&mut self, id: &Rc<str>, _now: Now) {
        if !self.online.remove(id) {
            return;
        }
        let channel = self.keys(&StreamId::Inbox(Rc::clone(id))).channel;
        if let Some(feed) = self.feeds.get_mut(&channel) {
            feed.wanted = false;
        }
        self.prune();
        self.online_mark(id, false);
    }

    fn shares_rooms(&self) -> bool {
        true
    }

    fn joined(&mut self, room: &str) {
        let channel = self.follow(&StreamId::room(room));
        if let Some(feed) = self.feeds.get_mut(&channel) {
            feed.wanted = true;
        }
    }

    fn left(&mut self, room: &str) {
        let channel = self.keys(&StreamId::room(room)).channel;
        if let Some(feed) = self.feeds.get_mut(&channel) {
            feed.wanted = false;
        }
        self.prune();
    }

    fn member_joined(&mut self, room: &str, member: LocalMember<'_>) {
        let call = self.presence.joined(room, member);
        self.presence_call(call);
    }

    fn member_left(&mut self, room: &str, conn: u64) {
        if let Some(call) = self.presence.left(room, conn) {
            self.presence_call(call);
        }
    }

    fn remote_members(&self, room: &str) -> Vec<Member> {
        self.presence.members(room)
    }

    fn maintain(&mut self, _now: Now) {
        let now = Instant::now();
        for call in self.presence.due(now) {
            self.presence_call(call);
        }
        let commands_down = matches!(self.commands_link.up, Some(Err(_)));
        if commands_down && self.outstanding == 0 && self.probed.is_none_or(|t| now >= t) {
            // The command thread reconnects when it has work; with none (no traffic), a PING
            // gives it some, so the link (and /healthz) comes back without waiting for a send.
            self.probed = Some(now + COMMANDS_PROBE);
            self.send(Job::Plain {
                cmd: redis::cmd("PING"),
                tag: Tag::Fire,
            });
        }
        if self
            .refreshed
            .is_none_or(|t| now.duration_since(t) >= ONLINE_REFRESH)
        {
            self.refreshed = Some(now);
            let ids: Vec<Rc<str>> = self.online.iter().cloned().collect();
            for id in ids {
                self.online_mark(&id, true);
            }
            self.prune();
        }
        if self.fill_retry_at.is_some_and(|t| now >= t) {
            self.fill_retry_at = None;
            let waiting: Vec<String> = self
                .feeds
                .iter()
                .filter(|(_, f)| f.needs_fill())
                .map(|(c, _)| c.clone())
                .collect();
            for channel in waiting {
                self.fill(&channel);
            }
        }
    }

    fn poll(&mut self, out: &mut Vec<Event>) {
        while let Ok(input) = self.inputs.try_recv() {
            self.input(input);
        }
        self.release();
        self.flush_delivered();
        out.extend(self.out.drain(..));
        self.presence.drain(out);
    }

    fn in_flight(&self) -> usize {
        (self.next_seq - self.emit_seq) as usize
    }

    /// Retained messages live in Redis; counting them would cost a scan per scrape, so the
    /// snapshot is empty and /metrics carries the engine's own figures instead.
    fn stats(&self, _now_ms: u64) -> Stats {
        Stats::default()
    }

    fn render_metrics(&self, out: &mut String) {
        let c = &self.counters;
        let mut w = Writer::new(out);
        w.family(
            "wsrelay_engine_info",
            "gauge",
            "The engine in use (SPEC §13).",
        );
        w.sample("wsrelay_engine_info", &[("kind", "redis")], 1);
        w.family(
            "wsrelay_redis_up",
            "gauge",
            "Whether each Redis connection is up (1) or not (0) (SPEC §15).",
        );
        w.family(
            "wsrelay_redis_state_changes_total",
            "counter",
            "Times each Redis connection went up or down.",
        );
        w.family(
            "wsrelay_redis_reconnects_total",
            "counter",
            "Times each Redis connection came back after being down.",
        );
        for (link, s) in [
            (Link::Commands, &self.commands_link),
            (Link::Pubsub, &self.pubsub_link),
        ] {
            let labels = [("link", link.name())];
            let up = u64::from(matches!(s.up, Some(Ok(()))));
            w.sample("wsrelay_redis_up", &labels, up);
            w.sample("wsrelay_redis_state_changes_total", &labels, s.changes);
            w.sample("wsrelay_redis_reconnects_total", &labels, s.reconnects);
        }
        let counters: [(&str, &str, u64); 15] = [
            ("wsrelay_redis_commands_total", "Commands sent to Redis (scripts included).", c.commands),
            ("wsrelay_redis_errors_total", "Commands Redis answered with an error.", c.errors),
            ("wsrelay_redis_rejected_unreachable_total", "Sends and publishes acked rejected because Redis was unreachable.", c.rejected_unreachable),
            ("wsrelay_redis_local_only_total", "Room messages (history off) delivered on this node only because Redis was unreachable.", c.local_only),
            ("wsrelay_redis_arrivals_total", "Messages from other nodes handed to this node's connections.", c.arrivals),
            ("wsrelay_redis_own_echoes_total", "This node's own publications heard back on PUB/SUB (not delivered twice).", c.own_echoes),
            ("wsrelay_redis_duplicates_dropped_total", "Published messages dropped because their position was already handed out.", c.duplicates_dropped),
            ("wsrelay_redis_gaps_detected_total", "Positions missing on PUB/SUB (a message lost between Redis and this node).", c.gaps_detected),
            ("wsrelay_redis_gaps_recovered_total", "Re-reads of a stream that found missing messages, all of them still there.", c.gaps_recovered),
            ("wsrelay_redis_gaps_unrecoverable_total", "Re-reads that found messages already trimmed or a new epoch.", c.gaps_unrecoverable),
            ("wsrelay_redis_messages_recovered_total", "Messages re-read from a stream after a gap or a reconnect.", c.messages_recovered),
            ("wsrelay_redis_epoch_changes_total", "Streams found under a new epoch (their keys expired or Redis lost them).", c.epoch_changes),
            ("wsrelay_redis_fills_total", "Re-reads of a stream (after a gap, a resubscribe, or a recovery that raced its subscription).", c.fills),
            ("wsrelay_redis_resubscribes_total", "Subscriptions renewed after a PUB/SUB reconnect.", c.resubscribes),
            (
                "wsrelay_redis_interruptions_total",
                "Streams whose missing messages could not be re-read: their connections here were closed (1012) to reconnect with since.",
                c.interruptions,
            ),
        ];
        for (name, help, value) in counters {
            w.counter(name, help, value);
        }
        w.gauge(
            "wsrelay_redis_subscriptions",
            "Channels this node follows (ids and rooms it holds connections for).",
            self.feeds.len(),
        );
        w.gauge(
            "wsrelay_redis_subscribed_channels",
            "Channels whose subscription has taken effect on the current PUB/SUB connection.",
            self.feeds.values().filter(|f| f.subscribed).count(),
        );
        w.gauge(
            "wsrelay_redis_outstanding_commands",
            "Commands sent to the command thread and not answered yet (queue depth).",
            self.outstanding,
        );
        self.round_trip.render(
            out,
            "wsrelay_redis_roundtrip_seconds",
            "Time from sending a pipeline to Redis to its last reply.",
        );
        self.batch_jobs.render(
            out,
            "wsrelay_redis_pipeline_commands",
            "Commands per pipeline sent to Redis.",
        );
        self.presence.render_metrics(out);
    }

    fn health(&self) -> Option<String> {
        let down = self.down();
        if down.is_empty() {
            return None;
        }
        let parts: Vec<String> = down
            .into_iter()
            .map(|(link, why, for_)| {
                format!(
                    "redis {} connection down for {:.1}s ({why})",
                    link.name(),
                    for_.as_secs_f64()
                )
            })
            .collect();
        Some(parts.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::script::Entry;
    use super::*;

    fn reply(top: u64, base: u64, delivered: u64, first: Option<u64>, ids: &[u64]) -> ReadReply {
        ReadReply {
            epoch: Epoch(9),
            top: Position(top),
            base: Position(base),
            delivered: Position(delivered),
            first: first.map(Position),
            entries: ids
                .iter()
                .map(|&p| Entry {
                    position: Position(p),
                    node: 1,
                    body: b"m".to_vec(),
                })
                .collect(),
            retained: ids.len() as u64,
        }
    }

    fn since(position: u64, epoch: Option<u64>) -> Option<Since> {
        Some(Since {
            position: Position(position),
            epoch: epoch.map(Epoch),
        })
    }

    #[test]
    fn a_recovery_is_complete_only_when_nothing_after_since_is_missing() {
        // Retained 101..=105 of an epoch that began at 100.
        let r = reply(105, 100, 103, Some(101), &[104, 105]);
        let complete = recovery(&r, since(103, Some(9)), true);
        assert!(complete.recovered);
        assert_eq!(complete.last, Some(Position(105)));
        assert!(complete.messages.iter().all(|m| m.pending));
        assert!(
            recovery(&r, since(105, None), true).recovered,
            "nothing newer"
        );
        assert!(
            !recovery(&r, since(103, Some(8)), true).recovered,
            "other epoch"
        );
        assert!(
            !recovery(&r, since(99, None), true).recovered,
            "before the epoch"
        );
        assert!(
            !recovery(&r, since(106, None), true).recovered,
            "never handed out"
        );
        let trimmed = reply(105, 100, 100, Some(104), &[104, 105]);
        assert!(!recovery(&trimmed, since(101, None), true).recovered);
        assert!(
            recovery(&trimmed, None, true).recovered,
            "no since: pending only"
        );
        let room = recovery(&r, since(103, None), false);
        assert!(room.messages.iter().all(|m| !m.pending), "rooms never pend");
        let fresh = reply(100, 100, 100, None, &[]);
        assert_eq!(recovery(&fresh, None, true).last, None);
    }

    /// An engine whose connection threads are this test: it sees the jobs and subscriptions
    /// the engine sends and answers with inputs of its own.
    struct Detached {
        engine: RedisEngine,
        jobs: Receiver<Job<Tag>>,
        subscriptions: Receiver<Subscription>,
        inputs: Sender<Input<Tag>>,
    }

    fn detached(room_history: usize) -> Detached {
        let limits = super::super::Limits {
            per_stream: 100,
            ttl_ms: 60_000,
            max_bytes: 1 << 20,
        };
        let config = RedisConfig {
            url: "redis://127.0.0.1:1".into(),
            prefix: "t".into(),
            limits,
            room_history: super::super::Limits {
                per_stream: room_history,
                ..limits
            },
            dedup_ttl_ms: 60_000,
            presence_ttl_ms: 60_000,
        };
        let (jobs_tx, jobs) = mpsc::channel();
        let (subs_tx, subscriptions) = mpsc::channel();
        let (inputs, in_rx) = mpsc::channel();
        Detached {
            engine: RedisEngine::with_links(config, jobs_tx, subs_tx, in_rx),
            jobs,
            subscriptions,
            inputs,
        }
    }

    fn bulk(s: &str) -> redis::Value {
        redis::Value::BulkString(s.as_bytes().to_vec())
    }

    /// What the read script answers: `top`, and `entries` (position, body) from `node`.
    fn read_value(epoch: Epoch, top: u64, node: u64, entries: &[(u64, &str)]) -> redis::Value {
        let entries = entries
            .iter()
            .map(|&(p, body)| {
                redis::Value::Array(vec![
                    bulk(&format!("{p}-0")),
                    redis::Value::Array(vec![
                        bulk("n"),
                        bulk(&node_text(node)),
                        bulk("b"),
                        bulk(body),
                    ]),
                ])
            })
            .collect();
        redis::Value::Array(vec![
            bulk(&epoch.to_string()),
            bulk(&top.to_string()),
            bulk("100"),
            bulk("100"),
            bulk(""),
            redis::Value::Array(entries),
            redis::Value::Int(0),
        ])
    }

    /// The next job the engine sent: a read script's mode and position, and its tag.
    fn next_read(d: &Detached) -> (String, String, Tag) {
        loop {
            match d.jobs.try_recv().expect("a read was sent") {
                Job::Script {
                    script: Script::Read,
                    args,
                    tag,
                    ..
                } => {
                    let text = |i: usize| String::from_utf8(args[i].clone()).unwrap();
                    return (text(3), text(4), tag);
                }
                _ => continue, // presence and other scripts
            }
        }
    }

    fn polled(d: &mut Detached) -> Vec<Event> {
        let mut out = Vec::new();
        d.engine.poll(&mut out);
        out
    }

    #[test]
    fn a_room_without_history_recovers_no_message_and_re_reads_what_its_subscription_missed() {
        let mut d = detached(0);
        let room = StreamId::room("lobby");
        let now = Now {
            instant: Instant::now(),
            unix_ms: unix_ms(),
        };
        // A node's first join of the room: the recovery follows the channel (subscribes)...
        d.engine.recover(Ticket(1), &room, None, now);
        let Ok(Subscription::Subscribe(channel)) = d.subscriptions.try_recv() else {
            panic!("the room's channel is subscribed with the recovery");
        };
        // ...and reads only the stream's top: the recovery buffer (101..=103) is not replayed.
        let (mode, _, tag) = next_read(&d);
        assert_eq!(mode, "top");
        let epoch = Epoch(7);
        let result = Ok(read_value(epoch, 103, 2, &[]));
        d.inputs.send(Input::Reply { tag, result }).unwrap();
        let events = polled(&mut d);
        let [Event::Completed(Completion {
            ticket: Ticket(1),
            outcome: Outcome::Recovered(recovery),
        })] = &events[..]
        else {
            panic!("the recovery completes alone: {events:?}");
        };
        assert!(recovery.messages.is_empty(), "nothing replayed");
        d.engine.joined("lobby");
        // 104 was stored after the read and published before the subscription took effect:
        // this node never hears it. When the subscription is confirmed, the feed re-reads
        // after the top the recovery saw, and 104 goes out, then what is heard live.
        d.inputs.send(Input::Subscribed(channel.clone())).unwrap();
        assert!(polled(&mut d).is_empty());
        let (mode, position, tag) = next_read(&d);
        assert_eq!((mode.as_str(), position.as_str()), ("since", "103"));
        let result = Ok(read_value(epoch, 104, 2, &[(104, "missed")]));
        d.inputs.send(Input::Reply { tag, result }).unwrap();
        let live = format!("{} {epoch} 105\nlive", node_text(2));
        d.inputs
            .send(Input::Message {
                channel: channel.into_bytes(),
                payload: live.into_bytes(),
            })
            .unwrap();
        let arrived: Vec<(u64, Vec<u8>)> = polled(&mut d)
            .into_iter()
            .map(|e| match e {
                Event::Arrived(a) => (a.position.0, a.body.to_vec()),
                other => panic!("only arrivals: {other:?}"),
            })
            .collect();
        assert_eq!(
            arrived,
            [(104, b"missed".to_vec()), (105, b"live".to_vec())]
        );
    }

    #[test]
    fn a_history_page_is_oldest_first_and_says_when_it_is_all() {
        let all = reply(103, 100, 100, Some(101), &[103, 102, 101]);
        let page = history_page(&all);
        let positions: Vec<u64> = page.messages.iter().map(|m| m.position.0).collect();
        assert_eq!(positions, [101, 102, 103]);
        assert!(page.recovered);
        let mut part = reply(103, 100, 100, Some(101), &[103, 102]);
        part.retained = 3;
        assert!(!history_page(&part).recovered, "the page holds 2 of 3");
        let trimmed = reply(103, 100, 100, Some(102), &[103, 102]);
        assert!(!history_page(&trimmed).recovered, "101 is gone");
    }
}
