//! Presence across nodes (SPEC §6, §15) through the engine seam, without Redis: two (or three)
//! hubs whose engines share one in-memory `Cluster`, the way nodes share a Redis server. Joins
//! and leaves made on one node reach the members on the others, `members` merges local and
//! remote connections, a node never hears its own changes back, and the members of a node that
//! died leave. The memory engine itself keeps no replica: the rest of the suite shows its
//! behaviour is unchanged.

use super::*;
use crate::engine::{Event, LocalMember, Member, MemberKey, MemoryEngine, PresenceChange};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// What the nodes share: every room's members by key, and the changes each node has not polled
/// yet. A node hears a change iff it holds a member of the room (as a node subscribes to a
/// room's channel only while it holds members there).
#[derive(Default)]
struct Cluster {
    rooms: BTreeMap<Rc<str>, BTreeMap<MemberKey, Member>>,
    waiting: HashMap<Rc<str>, VecDeque<PresenceChange>>,
    /// The rooms each node said it follows (`Engine::joined`, until `left`): where a shared
    /// engine subscribes.
    following: HashMap<Rc<str>, BTreeSet<String>>,
}

impl Cluster {
    fn follows(&self, node: &str, room: &str) -> bool {
        self.rooms
            .get(room)
            .is_some_and(|members| members.keys().any(|k| &*k.node == node))
    }

    /// Records a change made on `member.key.node` and queues it for every other node that
    /// holds a member of the room after it.
    fn change(&mut self, room: &str, member: Member, joined: bool) {
        let room: Rc<str> = Rc::from(room);
        let members = self.rooms.entry(Rc::clone(&room)).or_default();
        let changed = if joined {
            // A member recorded again is an update (its info), announced to nobody.
            members.insert(member.key.clone(), member.clone()).is_none()
        } else {
            members.remove(&member.key).is_some()
        };
        if members.is_empty() {
            self.rooms.remove(&room);
        }
        if !changed {
            return;
        }
        let nodes: HashSet<Rc<str>> = self
            .rooms
            .get(&room)
            .into_iter()
            .flat_map(|members| members.keys().map(|k| Rc::clone(&k.node)))
            .filter(|node| *node != member.key.node)
            .collect();
        for node in nodes {
            let change = PresenceChange {
                room: Rc::clone(&room),
                member: member.clone(),
                joined,
            };
            self.waiting.entry(node).or_default().push_back(change);
        }
    }

    /// `node` died: its entries are gone (in Redis, once they expire), and every other node
    /// that follows the room hears each of its members leave.
    fn kill(&mut self, node: &str) {
        let mut gone = Vec::new();
        for (room, members) in &self.rooms {
            for member in members.values().filter(|m| &*m.key.node == node) {
                gone.push((Rc::clone(room), member.clone()));
            }
        }
        for (room, member) in gone {
            self.change(&room, member, false);
        }
        self.waiting.remove(node);
    }
}

/// One node's engine: the memory engine for streams, the shared `Cluster` for presence.
struct Clustered {
    inner: MemoryEngine,
    node: Rc<str>,
    cluster: Rc<RefCell<Cluster>>,
}

impl Clustered {
    fn key(&self, conn: u64) -> MemberKey {
        MemberKey {
            node: Rc::clone(&self.node),
            conn,
        }
    }
}

impl crate::engine::Engine for Clustered {
    fn kind(&self) -> &'static str {
        "clustered"
    }
    fn append(&mut self, t: Ticket, a: Append, now: Now) {
        self.inner.append(t, a, now)
    }
    fn publish(&mut self, t: Ticket, p: Publish, now: Now) {
        self.inner.publish(t, p, now)
    }
    fn recover(&mut self, t: Ticket, s: &StreamId, since: Option<Since>, now: Now) {
        self.inner.recover(t, s, since, now)
    }
    fn epoch(&self) -> crate::engine::Epoch {
        crate::engine::Engine::epoch(&self.inner)
    }
    fn history(&mut self, t: Ticket, s: &StreamId, limit: usize, now: Now) {
        self.inner.history(t, s, limit, now)
    }
    fn delivered(&mut self, s: &StreamId, p: &[Position]) {
        self.inner.delivered(s, p)
    }
    fn acked(&mut self, sender: &str, id: &str, p: Position, status: AckStatus) {
        self.inner.acked(sender, id, p, status)
    }
    fn online(&mut self, id: &str) {
        self.inner.online(id)
    }
    fn offline(&mut self, id: &Rc<str>, now: Now) {
        self.inner.offline(id, now)
    }
    fn maintain(&mut self, now: Now) {
        self.inner.maintain(now)
    }
    fn poll(&mut self, out: &mut Vec<Event>) {
        self.inner.poll(out);
        let mut cluster = self.cluster.borrow_mut();
        if let Some(waiting) = cluster.waiting.get_mut(&self.node) {
            out.extend(waiting.drain(..).map(Event::Presence));
        }
    }
    fn in_flight(&self) -> usize {
        0
    }
    fn stats(&self, now_ms: u64) -> crate::engine::Stats {
        self.inner.stats(now_ms)
    }
    fn render_metrics(&self, out: &mut String) {
        self.inner.render_metrics(out)
    }
    fn member_joined(&mut self, room: &str, member: LocalMember<'_>) {
        let member = Member {
            key: self.key(member.conn),
            id: Rc::from(member.id),
            info: member.info.map(Rc::from),
        };
        self.cluster.borrow_mut().change(room, member, true);
    }
    fn joined(&mut self, room: &str) {
        let mut cluster = self.cluster.borrow_mut();
        let following = cluster.following.entry(Rc::clone(&self.node)).or_default();
        assert!(following.insert(room.to_string()), "{room} followed twice");
    }
    fn left(&mut self, room: &str) {
        let mut cluster = self.cluster.borrow_mut();
        let following = cluster.following.entry(Rc::clone(&self.node)).or_default();
        assert!(following.remove(room), "{room} left without being followed");
    }
    fn member_left(&mut self, room: &str, conn: u64) {
        let key = self.key(conn);
        let mut cluster = self.cluster.borrow_mut();
        let member = cluster.rooms.get(room).and_then(|m| m.get(&key)).cloned();
        // The hub says "left" only for a connection it said "joined" for.
        let member = member.unwrap_or_else(|| panic!("{key} left {room} without joining it"));
        cluster.change(room, member, false);
    }
    fn remote_members(&self, room: &str) -> Vec<Member> {
        let cluster = self.cluster.borrow();
        if !cluster.follows(&self.node, room) {
            return Vec::new(); // no replica of a room this node holds no member of
        }
        cluster.rooms[room]
            .values()
            .filter(|m| m.key.node != self.node)
            .cloned()
            .collect()
    }
}

impl Harness {
    /// A hub named `node` whose presence is shared through `cluster`.
    fn clustered(cluster: &Rc<RefCell<Cluster>>, node: &str, config: AppConfig) -> Harness {
        let clock = ManualClock::new(START_MS);
        let now = Now {
            instant: clock.now(),
            unix_ms: START_MS,
        };
        let inner = MemoryEngine::new(hub::limits(&config), hub::dedup(&config), now)
            .with_room_history(hub::room_history_limits(&config));
        let engine = Clustered {
            inner,
            node: Rc::from(node),
            cluster: Rc::clone(cluster),
        };
        Harness {
            hub: Hub::with_engine(config, Box::new(clock.clone()), Box::new(engine)),
            clock,
            tx: Recorder::default(),
            sessions: HashMap::new(),
            next_slot: 0,
        }
    }

    /// Connects a `/ws` client and reads its welcome.
    fn greeted(&mut self, target: &str) -> ConnId {
        let conn = self.connect(target);
        assert_eq!(self.inbox(conn)[0]["type"], "welcome");
        conn
    }

    /// Joins `room` and reads the answer: the joiner's own presence event, then `joined`.
    /// Returns what followed them: changes on other nodes the hub's `pump` found waiting.
    fn join(&mut self, conn: ConnId, room: &str) -> Vec<Value> {
        self.say(conn, json!({"type": "join", "room": room}));
        let mut answer = self.inbox(conn);
        let kinds: Vec<_> = answer.iter().take(2).map(|m| m["type"].clone()).collect();
        assert_eq!(
            kinds,
            vec![json!("presence"), json!("joined")],
            "{answer:?}"
        );
        assert_eq!(answer[0]["event"], "join", "{answer:?}");
        answer.split_off(2)
    }

    /// The reactor woke the hub (the engine has events): what `conn` got from it.
    fn woken(&mut self, conn: ConnId) -> Vec<Value> {
        self.hub.wake(&mut self.tx);
        self.inbox(conn)
    }

    /// The ids of a `members` answer for `room`, asked by `conn`.
    fn member_ids(&mut self, conn: ConnId, room: &str) -> Vec<String> {
        self.say(conn, json!({"type": "members", "room": room}));
        let answer = self.inbox(conn);
        assert_eq!(answer.len(), 1, "{answer:?}");
        let ids: Vec<String> = serde_json::from_value(answer[0]["ids"].clone()).unwrap();
        assert_eq!(answer[0]["members"].as_array().unwrap().len(), ids.len());
        ids
    }
}

fn presence(room: &str, id: &str, event: &str) -> Value {
    json!({"type": "presence", "room": room, "id": id, "event": event})
}

fn cluster() -> Rc<RefCell<Cluster>> {
    Rc::new(RefCell::new(Cluster::default()))
}

const NOTHING: Vec<Value> = Vec::new();

#[test]
fn joins_and_leaves_reach_the_other_nodes_and_never_come_back() {
    let c = cluster();
    let (mut n1, mut n2) = (
        Harness::clustered(&c, "n1", AppConfig::default()),
        Harness::clustered(&c, "n2", AppConfig::default()),
    );
    let a = n1.greeted("/ws?id=alice");
    n1.join(a, "lobby");
    assert_eq!(n1.woken(a), NOTHING, "its own join does not come back");

    let b = n2.greeted("/ws?id=bob");
    n2.join(b, "lobby");
    assert_eq!(n1.woken(a), vec![presence("lobby", "bob", "join")]);
    // bob's node held no member of the room when alice joined: bob learns of her from
    // `members`, as a local joiner does.
    assert_eq!(n2.woken(b), NOTHING);
    assert_eq!(n1.metric("wsrelay_presence_remote_changes_total"), 1.0);

    // Joining again changes no membership: nothing crosses.
    n2.join(b, "lobby");
    assert_eq!(n1.woken(a), NOTHING);

    n2.say(b, json!({"type": "leave", "room": "lobby"}));
    assert_eq!(n2.inbox(b), vec![presence("lobby", "bob", "leave")]);
    assert_eq!(n1.woken(a), vec![presence("lobby", "bob", "leave")]);
    assert_eq!(n2.woken(b), NOTHING, "its own leave does not come back");

    // A leave of a room one is not in changes nothing anywhere.
    n2.say(b, json!({"type": "leave", "room": "lobby"}));
    assert_eq!(n2.inbox(b), vec![presence("lobby", "bob", "leave")]);
    assert_eq!(n1.woken(a), NOTHING);

    // Closing a connection leaves its rooms on every node.
    n2.join(b, "lobby");
    assert_eq!(n1.woken(a), vec![presence("lobby", "bob", "join")]);
    n1.disconnect(a);
    assert_eq!(n2.woken(b), vec![presence("lobby", "alice", "leave")]);
    assert_eq!(n2.member_ids(b, "lobby"), vec!["bob"]);
    assert_eq!(n1.metric("wsrelay_presence_remote_changes_total"), 3.0);
    assert_eq!(n2.metric("wsrelay_presence_remote_changes_total"), 1.0);
}

/// The rooms `node` follows (subscribes to, with a shared engine).
fn following(c: &Rc<RefCell<Cluster>>, node: &str) -> Vec<String> {
    let cluster = c.borrow();
    let rooms = cluster.following.get(node);
    rooms.map_or_else(Vec::new, |r| r.iter().cloned().collect())
}

#[test]
fn a_node_follows_a_room_while_it_holds_a_member_however_the_last_one_goes() {
    let c = cluster();
    let mut n1 = Harness::clustered(&c, "n1", AppConfig::default());
    let (a1, a2) = (n1.greeted("/ws?id=alice"), n1.greeted("/ws?id=alice"));
    n1.join(a1, "lobby");
    n1.join(a2, "lobby");
    assert_eq!(n1.inbox(a1), vec![presence("lobby", "alice", "join")]);
    n1.join(a1, "news");
    n1.join(a1, "games");
    assert_eq!(following(&c, "n1"), vec!["games", "lobby", "news"]);
    n1.say(a1, json!({"type": "leave", "room": "games"}));
    assert_eq!(following(&c, "n1"), vec!["lobby", "news"]);
    // a1 closes: lobby keeps a2; news had only a1, and no member is left to be told of it.
    n1.disconnect(a1);
    assert_eq!(following(&c, "n1"), vec!["lobby"]);
    n1.disconnect(a2);
    assert_eq!(following(&c, "n1"), Vec::<String>::new());
    assert!(c.borrow().rooms.is_empty(), "every member left everywhere");
}

#[test]
fn members_lists_every_connection_on_every_node_in_one_order() {
    let c = cluster();
    let (mut n1, mut n2) = (
        Harness::clustered(&c, "n1", AppConfig::default()),
        Harness::clustered(&c, "n2", AppConfig::default()),
    );
    let a = n1.greeted("/ws?id=alice");
    let z = n1.greeted("/ws?id=zoe");
    let b1 = n2.greeted("/ws?id=bob");
    let b2 = n2.greeted("/ws?id=bob");
    assert_eq!(n1.join(z, "lobby"), NOTHING);
    assert_eq!(n2.join(b1, "lobby"), NOTHING);
    // Whatever the hub is called for, it acts on what the engine has waiting: alice's join
    // brings bob's join with it.
    assert_eq!(n1.join(a, "lobby"), vec![presence("lobby", "bob", "join")]);
    let b2_join = n2.join(b2, "lobby");
    assert_eq!(b2_join, vec![presence("lobby", "alice", "join")]);
    assert_eq!(
        n2.inbox(b1),
        vec![presence("lobby", "bob", "join"), b2_join[0].clone()]
    );
    // Each device of bob joins on its own (and leaves on its own, below).
    assert_eq!(n1.woken(a), vec![presence("lobby", "bob", "join")]);
    // Presence is per connection: bob's two devices are two members, whichever node asks.
    let everyone = vec!["alice", "bob", "bob", "zoe"];
    assert_eq!(n1.member_ids(a, "lobby"), everyone);
    assert_eq!(n2.member_ids(b1, "lobby"), everyone);
    assert_eq!(
        n1.inbox(z),
        vec![
            presence("lobby", "alice", "join"),
            presence("lobby", "bob", "join"),
            presence("lobby", "bob", "join")
        ]
    );
    n2.disconnect(b2);
    assert_eq!(n2.inbox(b1), vec![presence("lobby", "bob", "leave")]);
    assert_eq!(n1.woken(z), vec![presence("lobby", "bob", "leave")]);
    assert_eq!(n1.inbox(a), vec![presence("lobby", "bob", "leave")]);
    assert_eq!(n1.member_ids(z, "lobby"), vec!["alice", "bob", "zoe"]);
    assert_eq!(n2.member_ids(b1, "lobby"), vec!["alice", "bob", "zoe"]);
    // Another room is another list.
    assert_eq!(n1.member_ids(a, "other"), Vec::<String>::new());
}

#[test]
fn the_members_of_a_node_that_died_leave() {
    let c = cluster();
    let mut n1 = Harness::clustered(&c, "n1", AppConfig::default());
    let mut n2 = Harness::clustered(&c, "n2", AppConfig::default());
    let mut n3 = Harness::clustered(&c, "n3", AppConfig::default());
    let a = n1.greeted("/ws?id=alice");
    n1.join(a, "lobby");
    let b1 = n2.greeted("/ws?id=bob");
    let b2 = n2.greeted("/ws?id=bob");
    n2.join(b1, "lobby");
    n2.join(b2, "lobby");
    n2.join(b2, "news");
    let c1 = n3.greeted("/ws?id=carol");
    n3.join(c1, "lobby");
    n1.inbox(a);
    n1.hub.wake(&mut n1.tx);
    n1.inbox(a);
    n3.hub.wake(&mut n3.tx);
    assert_eq!(
        n1.member_ids(a, "lobby"),
        vec!["alice", "bob", "bob", "carol"]
    );

    // n2 is killed: its hub says nothing; the shared state lets its entries go, and the
    // others hear every one of its members leave.
    c.borrow_mut().kill("n2");
    let leave = presence("lobby", "bob", "leave");
    assert_eq!(n1.woken(a), vec![leave.clone(), leave.clone()]);
    assert_eq!(n3.woken(c1), vec![leave.clone(), leave]);
    assert_eq!(n1.member_ids(a, "lobby"), vec!["alice", "carol"]);
    assert_eq!(n3.member_ids(c1, "lobby"), vec!["alice", "carol"]);
}

#[test]
fn a_join_answered_by_the_engine_is_shared_when_membership_starts() {
    // Room history on: the connection becomes a member when the engine's answer comes.
    let config = || AppConfig {
        room_history: 10,
        ..AppConfig::default()
    };
    let c = cluster();
    let (mut n1, mut n2) = (
        Harness::clustered(&c, "n1", config()),
        Harness::clustered(&c, "n2", config()),
    );
    let a = n1.greeted("/ws?id=alice");
    n1.join(a, "lobby");
    let b = n2.greeted("/ws?id=bob");
    n2.join(b, "lobby");
    assert_eq!(n1.woken(a), vec![presence("lobby", "bob", "join")]);
    assert_eq!(n2.member_ids(b, "lobby"), vec!["alice", "bob"]);
}

#[test]
fn info_crosses_nodes_and_what_is_not_json_shows_as_null() {
    let c = cluster();
    let mut n1 = Harness::clustered(&c, "n1", AppConfig::default());
    let a = n1.greeted("/ws?id=alice");
    n1.join(a, "lobby");
    // Entries written by other nodes: one with an info claim, one whose info is damaged.
    let member = |conn, id: &str, info: &str| Member {
        key: MemberKey {
            node: Rc::from("n9"),
            conn,
        },
        id: Rc::from(id),
        info: Some(Rc::from(info)),
    };
    let mut cluster = c.borrow_mut();
    cluster.change("lobby", member(1, "ann", r#"{"name":"Ann"}"#), true);
    cluster.change("lobby", member(2, "eve", r#"{"name":"#), true);
    drop(cluster);
    let mut ann = presence("lobby", "ann", "join");
    ann["info"] = json!({"name": "Ann"});
    assert_eq!(n1.woken(a), vec![ann, presence("lobby", "eve", "join")]);
    n1.say(a, json!({"type": "members", "room": "lobby"}));
    assert_eq!(
        n1.inbox(a),
        vec![
            json!({"type": "members", "room": "lobby", "ids": ["alice", "ann", "eve"],
            "members": [{"id": "alice", "info": null}, {"id": "ann", "info": {"name": "Ann"}},
            {"id": "eve", "info": null}]})
        ]
    );
    assert_eq!(n1.metric("wsrelay_presence_remote_bad_info_total"), 2.0);
}

/// A token's `info` is shared with the join, and a refresh whose `rooms` claim drops a room
/// leaves it on every node.
#[test]
fn token_info_and_a_refresh_that_leaves_a_room_cross_nodes() {
    const SECRET: &[u8] = b"s3cret";
    let token = |claims: Value| {
        let key = EncodingKey::from_secret(SECRET);
        encode(&Header::new(Algorithm::HS256), &claims, &key).unwrap()
    };
    let config = || AppConfig {
        jwt_secret: Some(SECRET.to_vec()),
        ..AppConfig::default()
    };
    let c = cluster();
    let (mut n1, mut n2) = (
        Harness::clustered(&c, "n1", config()),
        Harness::clustered(&c, "n2", config()),
    );
    let exp = START_MS / 1000 + 600;
    let info = json!({"name": "Ann"});
    let ann = json!({"sub": "ann", "exp": exp, "rooms": ["lobby", "news"], "info": info});
    let a = n1.greeted(&format!("/ws?token={}", token(ann)));
    let b = n2.greeted(&format!(
        "/ws?token={}",
        token(json!({"sub": "bob", "exp": exp}))
    ));
    n2.join(b, "lobby");
    n1.join(a, "lobby");
    let mut joined = presence("lobby", "ann", "join");
    joined["info"] = info.clone();
    assert_eq!(n2.woken(b), vec![joined]);

    // A refresh with a new info: shown in `members` on the other node, announced nowhere.
    let renamed = json!({"name": "Ann B."});
    let same_rooms = json!({"sub": "ann", "exp": exp, "rooms": ["lobby", "news"],
        "info": renamed});
    n1.say(a, json!({"type": "refresh", "token": token(same_rooms)}));
    assert_eq!(n1.inbox(a)[0]["type"], "refreshed");
    assert_eq!(n2.woken(b), NOTHING);
    n2.say(b, json!({"type": "members", "room": "lobby"}));
    assert_eq!(
        n2.inbox(b)[0]["members"][0],
        json!({"id": "ann", "info": renamed})
    );

    let narrower = json!({"sub": "ann", "exp": exp, "rooms": ["news"], "info": info});
    n1.say(a, json!({"type": "refresh", "token": token(narrower)}));
    let mut left = presence("lobby", "ann", "leave");
    left["info"] = info;
    assert_eq!(n1.inbox(a)[0], left);
    assert_eq!(n2.woken(b), vec![left]);
    assert_eq!(n2.member_ids(b, "lobby"), vec!["bob"]);
}
