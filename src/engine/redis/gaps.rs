//! Continuity per stream (SPEC §15: PUB/SUB is at-most-once, made whole by positions).
//!
//! Owns: `Feed`, what this node knows of one followed stream: the last position it handed out
//! (or knows is covered), the stream's epoch, and the published messages it holds back while a
//! gap is being re-read or a recovery is outstanding. Pure: messages and replies in, `Step`s out.
//! Does not: send the re-read (the engine does, when a step says `Gap`), or talk to Redis.
//!
//! The rules:
//! * positions of one stream are contiguous (the append script's `HINCRBY`), and Redis delivers
//!   a channel's messages in publication order, so the next message is `last + 1`;
//! * an older or equal position was handed out already: dropped;
//! * a newer one means messages were lost on the way (a dropped PUB/SUB connection, a slow
//!   subscriber cut off): it is held, with everything after it, until the missing range has been
//!   re-read from the stream and handed out first;
//! * while a `recover` of the stream is outstanding, its messages are held too: those the
//!   recovery covers go out before it (to the connections already live), the rest after it,
//!   so a recovering connection gets each message exactly once (rule 3 of the seam);
//! * this node's own messages are not handed out again (the hub delivered them on `Stored`),
//!   but they advance `last`.

use super::keys::Published;
use super::script::ReadReply;
use crate::engine::{Arrival, Epoch, Position, Since, StreamId};
use std::collections::VecDeque;
use std::rc::Rc;

/// What the engine must do after a feed took a message or a reply.
#[derive(Debug)]
pub enum Step {
    /// Hand this to the hub.
    Emit(Arrival),
    /// This node's own message: already delivered here.
    Own,
    /// Already handed out (or covered by a recovery).
    Duplicate,
    /// Messages are missing before the one just held: re-read the stream after `last`.
    Gap,
    /// The stream has a new epoch: what came before it is gone (counted, not recoverable).
    EpochChanged,
}

/// What a re-read found.
#[derive(Debug, PartialEq, Eq)]
pub struct FillOutcome {
    /// Messages of other nodes handed out from the re-read.
    pub recovered: u64,
    /// Every missing message was still in the stream.
    pub complete: bool,
    /// The stream has a new epoch (what the old one held after `last` is gone with it).
    pub epoch_changed: bool,
}

struct Held {
    position: Position,
    epoch: Epoch,
    node: u64,
    body: Rc<[u8]>,
}

pub struct Feed {
    pub stream: StreamId,
    /// An id online here or a room with members here (else the feed goes once idle).
    pub wanted: bool,
    /// The subscription has taken effect on the current PUB/SUB connection.
    pub subscribed: bool,
    /// It took effect on some connection before (a new confirmation is a resubscription).
    pub was_subscribed: bool,
    /// `recover`s of this stream whose answer has not gone to the hub yet.
    pub recovering: usize,
    last: Option<Position>,
    epoch: Option<Epoch>,
    filling: bool,
    fill_failed: bool,
    held: VecDeque<Held>,
}

impl Feed {
    pub fn new(stream: StreamId) -> Feed {
        Feed {
            stream,
            wanted: false,
            subscribed: false,
            was_subscribed: false,
            recovering: 0,
            last: None,
            epoch: None,
            filling: false,
            fill_failed: false,
            held: VecDeque::new(),
        }
    }

    /// Nothing here needs this stream any more.
    pub fn idle(&self) -> bool {
        !self.wanted && self.recovering == 0 && !self.filling
    }

    pub fn knows_position(&self) -> bool {
        self.last.is_some()
    }

    /// A re-read that failed waits to be tried again.
    pub fn needs_fill(&self) -> bool {
        self.fill_failed
    }

    /// Starts a re-read: where it starts from (None: nothing known yet, nothing to re-read).
    pub fn fill_from(&mut self) -> Option<Since> {
        let position = self.last?;
        self.filling = true;
        self.fill_failed = false;
        Some(Since {
            position,
            epoch: self.epoch,
        })
    }

    pub fn fill_failed(&mut self) {
        self.filling = false;
        self.fill_failed = true;
    }

    fn holding(&self) -> bool {
        self.filling || self.fill_failed || self.recovering > 0
    }

    /// A message heard on the stream's channel.
    pub fn arrived(&mut self, p: &Published<'_>, me: u64) -> Vec<Step> {
        self.held.push_back(Held {
            position: p.position,
            epoch: p.epoch,
            node: p.node,
            body: Rc::from(p.body),
        });
        let mut steps = Vec::new();
        self.drain(me, &mut steps);
        steps
    }

    /// Hands out held messages in order while nothing holds them back.
    fn drain(&mut self, me: u64, steps: &mut Vec<Step>) {
        while !self.holding() {
            let Some(h) = self.held.pop_front() else {
                return;
            };
            if self.epoch.is_some_and(|e| e != h.epoch) {
                steps.push(Step::EpochChanged);
                self.last = None;
            }
            self.epoch = Some(h.epoch);
            match self.last {
                Some(last) if h.position <= last => steps.push(Step::Duplicate),
                Some(last) if h.position.0 > last.0 + 1 => {
                    self.held.push_front(h);
                    self.filling = true;
                    steps.push(Step::Gap);
                    return;
                }
                _ => {
                    self.last = Some(h.position);
                    steps.push(self.emit(h, me));
                }
            }
        }
    }

    fn emit(&self, h: Held, me: u64) -> Step {
        if h.node == me {
            return Step::Own;
        }
        Step::Emit(Arrival {
            stream: self.stream.clone(),
            position: h.position,
            body: h.body,
        })
    }

    /// The re-read's answer: the missing messages go out, then what was held behind them.
    pub fn filled(&mut self, reply: &ReadReply, me: u64) -> (Vec<Step>, FillOutcome) {
        self.filling = false;
        let mut steps = Vec::new();
        let mut outcome = FillOutcome {
            recovered: 0,
            complete: true,
            epoch_changed: false,
        };
        let from = if self.epoch.is_some_and(|e| e != reply.epoch) {
            // The script returned everything the new epoch holds; what the old one had after
            // `last` is gone.
            steps.push(Step::EpochChanged);
            outcome.complete = false;
            outcome.epoch_changed = true;
            None
        } else {
            self.last
        };
        if let Some(from) = from {
            // Positions are contiguous: every one up to the top must be in the reply (one
            // trimmed away, or never kept, is missing for good).
            let missing = reply.top.0.saturating_sub(from.0);
            let there = reply.entries.iter().filter(|e| e.position > from).count() as u64;
            outcome.complete = there >= missing;
        }
        for e in &reply.entries {
            if from.is_some_and(|f| e.position <= f) {
                continue;
            }
            if e.node != me {
                outcome.recovered += 1;
            }
            let held = Held {
                position: e.position,
                epoch: reply.epoch,
                node: e.node,
                body: Rc::from(e.body.as_slice()),
            };
            steps.push(self.emit(held, me));
        }
        self.epoch = Some(reply.epoch);
        self.last = Some(match from {
            Some(f) => f.max(reply.top),
            None => reply.top,
        });
        self.drain(me, &mut steps);
        (steps, outcome)
    }

    /// A recovery of this stream leaves for the hub: `top` is the newest position it covers
    /// (None if it failed). Returns what goes out before it and what after it.
    pub fn recovered(&mut self, top: Option<Position>, me: u64) -> (Vec<Step>, Vec<Step>) {
        self.recovering = self.recovering.saturating_sub(1);
        let mut before = Vec::new();
        if let Some(top) = top {
            // Held messages the recovery covers reach the connections already live before the
            // recovery does; the recovering connection skips them (it is not greeted yet).
            while self.held.front().is_some_and(|h| h.position <= top) {
                let h = self.held.pop_front().expect("checked");
                if self.last.is_some_and(|l| h.position <= l) {
                    before.push(Step::Duplicate);
                    continue;
                }
                self.epoch = Some(h.epoch);
                before.push(self.emit(h, me));
            }
            self.last = Some(self.last.map_or(top, |l| l.max(top)));
        }
        let mut after = Vec::new();
        self.drain(me, &mut after);
        (before, after)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::redis::script::Entry;

    const ME: u64 = 1;
    const OTHER: u64 = 2;

    fn msg(position: u64, node: u64) -> Vec<u8> {
        format!("{node:016x} {:016x} {position}\nbody{position}", 7).into_bytes()
    }

    fn arrive(feed: &mut Feed, position: u64, node: u64) -> Vec<Step> {
        let bytes = msg(position, node);
        feed.arrived(&Published::parse(&bytes).unwrap(), ME)
    }

    fn emitted(steps: &[Step]) -> Vec<u64> {
        steps
            .iter()
            .filter_map(|s| match s {
                Step::Emit(a) => Some(a.position.0),
                _ => None,
            })
            .collect()
    }

    fn reply(top: u64, first: Option<u64>, entries: &[(u64, u64)]) -> ReadReply {
        ReadReply {
            epoch: Epoch(7),
            top: Position(top),
            base: Position(0),
            delivered: Position(0),
            first: first.map(Position),
            entries: entries
                .iter()
                .map(|&(p, node)| Entry {
                    position: Position(p),
                    node,
                    body: b"x".to_vec(),
                })
                .collect(),
            retained: entries.len() as u64,
        }
    }

    #[test]
    fn in_order_messages_go_out_and_repeats_and_own_do_not() {
        let mut f = Feed::new(StreamId::room("r"));
        assert_eq!(emitted(&arrive(&mut f, 10, OTHER)), [10]);
        assert_eq!(emitted(&arrive(&mut f, 11, OTHER)), [11]);
        assert!(matches!(arrive(&mut f, 11, OTHER)[..], [Step::Duplicate]));
        assert!(matches!(arrive(&mut f, 12, ME)[..], [Step::Own]));
        assert_eq!(emitted(&arrive(&mut f, 13, OTHER)), [13]);
    }

    #[test]
    fn a_gap_holds_everything_until_the_re_read_fills_it() {
        let mut f = Feed::new(StreamId::room("r"));
        arrive(&mut f, 10, OTHER);
        assert!(matches!(arrive(&mut f, 13, OTHER)[..], [Step::Gap]));
        assert_eq!(f.fill_from().unwrap().position, Position(10));
        assert!(arrive(&mut f, 14, OTHER).is_empty(), "held behind the gap");
        // The re-read returns 11..=14 (12 is this node's own); 13 and 14 were held.
        let r = reply(
            14,
            Some(5),
            &[(11, OTHER), (12, ME), (13, OTHER), (14, OTHER)],
        );
        let (steps, outcome) = f.filled(&r, ME);
        assert_eq!(emitted(&steps), [11, 13, 14]);
        assert_eq!(
            outcome,
            FillOutcome {
                recovered: 3,
                complete: true,
                epoch_changed: false,
            }
        );
        assert_eq!(emitted(&arrive(&mut f, 15, OTHER)), [15]);
    }

    #[test]
    fn a_re_read_that_finds_the_range_trimmed_says_so() {
        let mut f = Feed::new(StreamId::room("r"));
        arrive(&mut f, 10, OTHER);
        arrive(&mut f, 20, OTHER);
        f.fill_from();
        let (steps, outcome) = f.filled(&reply(20, Some(15), &[(15, OTHER), (20, OTHER)]), ME);
        assert_eq!(emitted(&steps), [15, 20]);
        assert!(!outcome.complete);
    }

    #[test]
    fn a_failed_re_read_keeps_holding_until_one_succeeds() {
        let mut f = Feed::new(StreamId::room("r"));
        arrive(&mut f, 1, OTHER);
        arrive(&mut f, 3, OTHER);
        f.fill_from();
        f.fill_failed();
        assert!(f.needs_fill());
        assert!(arrive(&mut f, 4, OTHER).is_empty());
        f.fill_from();
        let (steps, _) = f.filled(
            &reply(4, Some(1), &[(2, OTHER), (3, OTHER), (4, OTHER)]),
            ME,
        );
        assert_eq!(emitted(&steps), [2, 3, 4]);
    }

    #[test]
    fn a_recovery_splits_held_messages_around_itself() {
        let mut f = Feed::new(StreamId::inbox("bob"));
        f.recovering = 1;
        assert!(arrive(&mut f, 5, OTHER).is_empty());
        assert!(arrive(&mut f, 6, OTHER).is_empty());
        assert!(arrive(&mut f, 7, OTHER).is_empty());
        // The recovery read up to 6: 5 and 6 go before it, 7 after it.
        let (before, after) = f.recovered(Some(Position(6)), ME);
        assert_eq!(emitted(&before), [5, 6]);
        assert_eq!(emitted(&after), [7]);
        assert!(matches!(arrive(&mut f, 6, OTHER)[..], [Step::Duplicate]));
    }

    #[test]
    fn a_new_epoch_resets_the_count_and_is_reported() {
        let mut f = Feed::new(StreamId::room("r"));
        arrive(&mut f, 10, OTHER);
        let other_epoch = format!("{OTHER:016x} {:016x} 3\nx", 8).into_bytes();
        let steps = f.arrived(&Published::parse(&other_epoch).unwrap(), ME);
        assert!(matches!(steps[0], Step::EpochChanged));
        assert_eq!(emitted(&steps), [3]);
    }
}
