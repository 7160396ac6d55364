//! The receiving thread's read side: messages from the SUB socket, in order and once each,
//! into the instance's inbox.
//!
//! A live topic checks each message's sequence number ([`crate::seq::SeqTracker`]) and
//! counts gaps as lost (by the sender's numbers when the message has an origin, see
//! [`crate::origins`]); a topic whose probe is outstanding holds its messages back until
//! the answer, and then [`settle`] orders them. Envelopes are decoded here, on this thread,
//! and handed to the inbox in bursts.

use std::sync::atomic::Ordering;
use std::time::Instant;

use chanlayer_core::toolkit::{now_ms, Destination, Envelope};

use super::subs::{Link, Probing, State, Sub, SubState};
use super::{Confirm, Route, Shared, HAND_OVER_AT};
use crate::bridge::recv_message;
use crate::seq::{settle, Held, Pos};
use crate::wire::{self, Origin};

impl State {
    pub(super) fn drain_sub(&mut self, sock: &zmq::Socket, max: usize) {
        let mut frames = Vec::with_capacity(4);
        for _ in 0..max {
            let Some(extra) = recv_message(sock, 3, &mut frames) else {
                return;
            };
            if self.link != Link::Up {
                // Something arrived: there is a connection, whatever the monitor said last.
                self.set_link(sock, true);
            }
            if extra > 0 {
                let why = format!("{} frames; chanlayer messages have 2 or 3", 3 + extra);
                self.garbage(&frames[0], &why);
                continue;
            }
            self.on_message(&frames);
            if self.ready.len() >= HAND_OVER_AT {
                // The receiving tasks start on these while this thread decodes the rest.
                self.hand_over();
            }
        }
    }

    fn garbage(&self, topic: &[u8], why: &str) {
        self.shared
            .stats()
            .record_undecodable(&wire::display(topic), &why);
    }

    fn on_message(&mut self, frames: &[zmq::Message]) {
        let Some(head) = frames.first() else {
            return;
        };
        let meta = frames.get(1).and_then(|m| wire::parse_meta(m));
        let origin = frames.get(1).and_then(|m| wire::parse_origin(m));
        if self.subs.contains_key(&head[..]) {
            match (meta, frames.len()) {
                (Some((wire::META_DATA, epoch, seq)), 3) => {
                    self.on_data(head, Pos::new(epoch, seq), origin, &frames[2], false);
                }
                (Some((wire::META_BATCH, epoch, first)), 3) => {
                    match wire::batch_items(&frames[2]) {
                        Some(items) => self.on_batch(head, Pos::new(epoch, first), origin, &items),
                        None => self.garbage(head, "a malformed batch"),
                    }
                }
                (Some((wire::META_MARK, _, token)), 2) if head[..] == self.inbox_topic[..] => {
                    // What arrived before the mark is in the inbox before its waiter (a
                    // barrier, a flush that then empties the inbox) hears of it.
                    self.hand_over();
                    if let Some((done, _)) = self.marks.remove(&token) {
                        let _ = done.send(());
                    } else {
                        self.early_marks.insert(token, Instant::now());
                    }
                }
                _ => self.garbage(head, "not a chanlayer message (wrong frames or meta)"),
            }
        } else if let Some(of) = self.probes.of.get(&head[..]).cloned() {
            match (meta, frames.len()) {
                (Some((wire::META_DATA, epoch, seq)), 3) => {
                    self.on_data(&of, Pos::new(epoch, seq), origin, &frames[2], true);
                }
                (Some((wire::META_WELCOME, epoch, seq)), 2) => {
                    self.release(&of, Some(Pos::new(epoch, seq)), None);
                }
                (Some((wire::META_WELCOME, epoch, seq)), 3) => {
                    // A proxy's welcome: the table of the topic's origins.
                    match frames.get(2).and_then(|t| wire::parse_origin_table(t)) {
                        Some(table) => self.release(&of, Some(Pos::new(epoch, seq)), Some(table)),
                        None => self.garbage(head, "a welcome with a malformed origin table"),
                    }
                }
                _ => self.garbage(head, "not a chanlayer probe answer"),
            }
        } else if wire::data_topic_kind(head).is_none() && wire::parse_probe(head).is_none() {
            self.garbage(head, "not a chanlayer topic");
        }
        // Otherwise a message of a topic unsubscribed a moment ago, still on its way.
    }

    /// A batch frame: the messages `first`, `first + 1`, ... of `topic` (with origin
    /// numbers `origin.seq`, `origin.seq + 1`, ...). A live topic takes them in one go (one
    /// lookup, one sequence check); otherwise each goes through [`State::on_data`].
    fn on_batch(&mut self, topic: &[u8], first: Pos, origin: Option<Origin>, items: &[&[u8]]) {
        if self.live(topic, first, origin, items) {
            return;
        }
        for (i, item) in (0u64..).zip(items) {
            let pos = Pos::new(first.epoch, first.seq.saturating_add(i));
            self.on_data(topic, pos, origin.map(|o| o.after(i)), item, false);
        }
    }

    /// Delivers the messages `first`, `first + 1`, ... of a live topic (one, or the items of
    /// a batch), skipping what was delivered already and counting the gap before them.
    /// `false` if the topic is not live.
    fn live(&mut self, topic: &[u8], first: Pos, origin: Option<Origin>, items: &[&[u8]]) -> bool {
        let Some(Sub {
            route,
            state: SubState::Live(tracker),
            origins,
        }) = self.subs.get_mut(topic)
        else {
            return false;
        };
        let count = items.len() as u64;
        let Some(run) = tracker.check_run(first.epoch, first.seq, count) else {
            return true; // seen already
        };
        // With an origin, losses are counted by the sender's numbers (which a restart does
        // not reset), else by the publisher's (a new publisher starts a new sequence: no
        // gap).
        let lost = match origin {
            Some(o) => origins.deliver(o.after(run.skip), count.saturating_sub(run.skip), true),
            None => run.gap,
        };
        count_lost(&self.shared, topic, lost);
        let skip = usize::try_from(run.skip).map_or(items.len(), |s| s.min(items.len()));
        let now = now_ms();
        for item in &items[skip..] {
            if let Some(env) = accept(&self.shared, route, topic, item, now) {
                self.ready.push(env);
            }
        }
        true
    }

    fn on_data(
        &mut self,
        topic: &[u8],
        pos: Pos,
        origin: Option<Origin>,
        payload: &[u8],
        replayed: bool,
    ) {
        if !replayed && self.live(topic, pos, origin, &[payload]) {
            return;
        }
        let max_held = self.max_held;
        // Live and replayed: a replay answering a probe we gave up on.
        let Some(Sub {
            state: SubState::Probing(Probing { held, .. }),
            ..
        }) = self.subs.get_mut(topic)
        else {
            return;
        };
        held.push(Held {
            pos,
            replayed,
            // Owned while held back (rare: only while a probe is outstanding).
            payload: (payload.to_vec(), origin),
        });
        if held.len() > max_held {
            tracing::warn!(topic = %wire::display(topic), "no answer to the subscription probe while {max_held} messages waited; delivering them");
            self.release(topic, None, None);
        }
    }

    /// Ends the probe of `topic`: delivers what waited, in sequence order, once each, and
    /// makes the topic live. `welcome` is the publisher's answer (`None`: gave up waiting),
    /// `table` the origins a proxy listed with it.
    pub(super) fn release(
        &mut self,
        topic: &[u8],
        welcome: Option<Pos>,
        table: Option<Vec<(u64, u64)>>,
    ) {
        let Some(sub) = self.subs.get_mut(topic) else {
            return;
        };
        let SubState::Probing(probing) = &mut sub.state else {
            return;
        };
        let Probing {
            probe,
            mut held,
            waiters,
            patient,
            floor,
            ..
        } = std::mem::take(probing);
        let settled = settle(&mut held, welcome, floor);
        sub.state = SubState::Live(settled.tracker);
        // Losses by origin (a proxy's messages) or by the publisher's sequence.
        let by_origin = table.is_some() || held.iter().any(|h| h.payload.1.is_some());
        if let Some(table) = &table {
            sub.origins.welcome(table);
        }
        let mut lost = if by_origin { 0 } else { settled.lost };
        for h in &held {
            if let Some(o) = h.payload.1 {
                // Published after the welcome: an origin new to this topic began after the
                // subscription (before it, it only sets where counting starts).
                let fresh = welcome.is_none_or(|w| h.pos.epoch != w.epoch || h.pos.seq > w.seq);
                lost += sub.origins.deliver(o, 1, fresh);
            }
        }
        // Counted before the messages are handed out: a receiver that has them sees the
        // counts.
        self.shared
            .transport
            .replayed
            .fetch_add(settled.replayed, Ordering::Relaxed);
        count_lost(&self.shared, topic, lost);
        let now = now_ms();
        for h in &held {
            if let Some(env) = accept(&self.shared, &sub.route, topic, &h.payload.0, now) {
                self.ready.push(env);
            }
        }
        // In the inbox before anyone waiting for this subscription hears of it.
        self.hand_over();
        if let Some(probe) = probe {
            self.probes.of.remove(&probe);
            self.pending_unsubscribe.push(probe);
        }
        self.shared.transport.outstanding(false);
        let answer = welcome.map_or(Confirm::NoAnswer, |_| Confirm::Confirmed);
        for w in waiters.into_iter().chain(patient) {
            let _ = w.send(answer);
        }
    }

    /// Hands the accepted envelopes to the inbox (one lock per burst).
    pub(super) fn hand_over(&mut self) {
        // Core's ingest path: owner check, delivery, counted drops.
        self.shared.ingest_all(&mut self.ready);
    }
}

/// Counts `lost` messages of `topic` in [`crate::TransportStats::lost`].
fn count_lost(shared: &Shared, topic: &[u8], lost: u64) {
    if lost > 0 {
        shared.transport.lost.fetch_add(lost, Ordering::Relaxed);
        shared.stats().record_lost(lost);
        tracing::debug!(topic = %wire::display(topic), lost, "messages lost on the way");
    }
}

/// Decodes one envelope from the wire and checks that it belongs on `topic`, has not
/// expired, and is for this instance; `None` (counted) if not.
fn accept(
    shared: &Shared,
    route: &Route,
    topic: &[u8],
    payload: &[u8],
    now: u64,
) -> Option<Envelope> {
    let env = shared.decode(payload, wire::Shown(topic))?;
    let fits = match route {
        // Whose channel it is, core's ingest path checks.
        Route::Inbox => env.kind == Destination::Channel,
        Route::Channel(name) => env.kind == Destination::Channel && env.destination == *name,
        Route::Group(name) => env.kind == Destination::Group && env.destination == *name,
    };
    if !fits {
        shared.stats().record_undecodable(
            &wire::display(topic),
            &format!(
                "an envelope for {:?} {:?} does not belong on this topic",
                env.kind, env.destination
            ),
        );
        return None;
    }
    if env.is_expired_at(now) {
        shared.stats().record_expired(1);
        return None;
    }
    Some(env)
}
