//! The receiving thread's read side: messages from the SUB socket, in order and once each,
//! into the instance's inbox.
//!
//! A live topic checks each message's sequence number ([`SeqTracker`]) and counts gaps as
//! lost; a topic whose probe is outstanding holds its messages back until the answer, and
//! then [`settle`] orders them. Envelopes are decoded here, on this thread, and handed to the
//! inbox in bursts.

use std::sync::atomic::Ordering;
use std::time::Instant;

use chanlayer_core::envelope::now_ms;
use chanlayer_core::{names, Destination, Envelope};

use super::subs::{Link, State, Sub, SubState};
use super::{Confirm, Route, Shared, HAND_OVER_AT};
use crate::seq::{settle, Held, Pos, Verdict};
use crate::wire;

/// One message's envelope bytes: a whole frame, or an item of a batch frame.
enum Piece<'a> {
    Frame(zmq::Message),
    Item(&'a [u8]),
}

impl Piece<'_> {
    fn as_slice(&self) -> &[u8] {
        match self {
            Piece::Frame(m) => m,
            Piece::Item(b) => b,
        }
    }

    /// Owned, to be held back while a probe is outstanding (rare: copies an item).
    fn into_message(self) -> zmq::Message {
        match self {
            Piece::Frame(m) => m,
            Piece::Item(b) => zmq::Message::from(b),
        }
    }
}

impl State {
    pub(super) fn drain_sub(&mut self, sock: &zmq::Socket, max: usize) {
        let mut frames: Vec<zmq::Message> = Vec::with_capacity(4);
        for _ in 0..max {
            frames.clear();
            let mut extra = 0usize;
            loop {
                match sock.recv_msg(zmq::DONTWAIT) {
                    Ok(m) => {
                        let more = m.get_more();
                        if frames.len() < 3 {
                            frames.push(m);
                        } else {
                            extra += 1;
                        }
                        if !more {
                            break;
                        }
                    }
                    Err(zmq::Error::EINTR) => continue,
                    Err(zmq::Error::EAGAIN) if frames.is_empty() => return,
                    Err(e) => {
                        tracing::debug!(error = %e, "receive failed mid-message");
                        break;
                    }
                }
            }
            if frames.is_empty() {
                return;
            }
            if self.link != Link::Up {
                // Something arrived: there is a connection, whatever the monitor said last.
                self.set_link(sock, true);
            }
            if extra > 0 {
                self.garbage(
                    &frames[0],
                    &format!(
                        "{} frames; chanlayer messages have 2 or 3",
                        frames.len() + extra
                    ),
                );
                continue;
            }
            let message = std::mem::take(&mut frames);
            self.on_message(message);
            if self.ready.len() >= HAND_OVER_AT {
                // The receiving tasks start on these while this thread decodes the rest.
                self.hand_over();
            }
        }
    }

    fn garbage(&self, topic: &[u8], why: &str) {
        self.shared
            .stats
            .record_undecodable(&wire::display(topic), &why);
    }

    fn on_message(&mut self, frames: Vec<zmq::Message>) {
        enum Dest {
            Sub,
            Probe(Vec<u8>),
            Stale,
            Garbage,
        }
        let Some(head) = frames.first() else {
            return;
        };
        let dest = if self.subs.contains_key(&head[..]) {
            Dest::Sub
        } else if let Some(of) = self.probes.get(&head[..]) {
            Dest::Probe(of.clone())
        } else if wire::data_topic_kind(head).is_some() || wire::parse_probe(head).is_some() {
            Dest::Stale
        } else {
            Dest::Garbage
        };
        let meta = frames.get(1).and_then(|m| wire::parse_meta(m));
        match (dest, meta, frames.len()) {
            (Dest::Sub, Some((wire::META_DATA, epoch, seq)), 3) => {
                if let Some((topic, payload)) = ends(frames) {
                    self.on_data(&topic, Pos::new(epoch, seq), Piece::Frame(payload), false);
                }
            }
            (Dest::Sub, Some((wire::META_BATCH, epoch, first)), 3) => {
                if let Some((topic, body)) = ends(frames) {
                    match wire::batch_items(&body) {
                        Some(items) => self.on_batch(&topic, epoch, first, &items),
                        None => self.garbage(&topic, "a malformed batch"),
                    }
                }
            }
            (Dest::Sub, Some((wire::META_MARK, _, token)), 2)
                if head[..] == self.inbox_topic[..] =>
            {
                // What arrived before the mark is in the inbox before its waiter (a
                // barrier, a flush that then empties the inbox) hears of it.
                self.hand_over();
                match self.marks.remove(&token) {
                    Some((done, _)) => {
                        let _ = done.send(());
                    }
                    None => {
                        self.early_marks.insert(token, Instant::now());
                    }
                }
            }
            (Dest::Sub, ..) => {
                self.garbage(head, "not a chanlayer message (wrong frames or meta)");
            }
            (Dest::Probe(of), Some((wire::META_DATA, epoch, seq)), 3) => {
                if let Some((_, payload)) = ends(frames) {
                    self.on_data(&of, Pos::new(epoch, seq), Piece::Frame(payload), true);
                }
            }
            (Dest::Probe(of), Some((wire::META_WELCOME, epoch, seq)), 2) => {
                self.release(&of, Some(Pos::new(epoch, seq)));
            }
            (Dest::Probe(_), ..) => self.garbage(head, "not a chanlayer probe answer"),
            // A message of a topic unsubscribed a moment ago, still on its way.
            (Dest::Stale, ..) => {}
            (Dest::Garbage, ..) => self.garbage(head, "not a chanlayer topic"),
        }
    }

    /// A batch frame: the messages `first`, `first + 1`, ... of `topic`. A live topic takes
    /// them in one go (one lookup, one sequence check); otherwise each goes through
    /// [`State::on_data`].
    fn on_batch(&mut self, topic: &[u8], epoch: u64, first: u64, items: &[&[u8]]) {
        if let Some(Sub {
            route,
            state: SubState::Live(tracker),
        }) = self.subs.get_mut(topic)
        {
            let Some(run) = tracker.check_run(epoch, first, items.len() as u64) else {
                return; // seen already
            };
            if run.gap > 0 {
                self.shared
                    .transport
                    .lost
                    .fetch_add(run.gap, Ordering::Relaxed);
                tracing::debug!(topic = %wire::display(topic), gap = run.gap, "messages lost on the way (a gap in the topic's sequence)");
            }
            let skip = usize::try_from(run.skip).map_or(items.len(), |s| s.min(items.len()));
            let now = now_ms();
            for item in &items[skip..] {
                if let Some(env) = accept(&self.shared, route, topic, item, now) {
                    self.ready.push(env);
                }
            }
            return;
        }
        for (i, item) in items.iter().enumerate() {
            let seq = first.saturating_add(i as u64);
            self.on_data(topic, Pos::new(epoch, seq), Piece::Item(item), false);
        }
    }

    fn on_data(&mut self, topic: &[u8], pos: Pos, payload: Piece<'_>, replayed: bool) {
        let max_held = self.max_held;
        let Some(Sub { route, state }) = self.subs.get_mut(topic) else {
            return;
        };
        match state {
            SubState::Probing { held, .. } => {
                held.push(Held {
                    pos,
                    replayed,
                    payload: payload.into_message(),
                });
                if held.len() > max_held {
                    tracing::warn!(topic = %wire::display(topic), "no answer to the subscription probe while {max_held} messages waited; delivering them");
                    self.release(topic, None);
                }
            }
            SubState::Live(tracker) => {
                if replayed {
                    return; // a replay answering a probe we gave up on
                }
                match tracker.check(pos.epoch, pos.seq) {
                    Verdict::Duplicate => return,
                    Verdict::Deliver { gap } if gap > 0 => {
                        self.shared.transport.lost.fetch_add(gap, Ordering::Relaxed);
                        tracing::debug!(topic = %wire::display(topic), gap, "messages lost on the way (a gap in the topic's sequence)");
                    }
                    // In order, or a new publisher (a restart): a new sequence starts.
                    Verdict::Deliver { .. } | Verdict::Restart => {}
                }
                if let Some(env) = accept(&self.shared, route, topic, payload.as_slice(), now_ms())
                {
                    self.ready.push(env);
                }
            }
        }
    }

    /// Ends the probe of `topic`: delivers what waited, in sequence order, once each, and
    /// makes the topic live. `welcome` is the publisher's answer (`None`: gave up waiting).
    pub(super) fn release(&mut self, topic: &[u8], welcome: Option<Pos>) {
        let Some(sub) = self.subs.get_mut(topic) else {
            return;
        };
        if !matches!(sub.state, SubState::Probing { .. }) {
            return;
        }
        let SubState::Probing {
            probe,
            mut held,
            waiters,
            floor,
            ..
        } = std::mem::replace(&mut sub.state, SubState::Live(Default::default()))
        else {
            return;
        };
        let settled = settle(&mut held, welcome, floor);
        sub.state = SubState::Live(settled.tracker);
        let route = sub.route.clone();
        // Counted before the messages are handed out: a receiver that has them sees the
        // counts.
        let t = &self.shared.transport;
        t.replayed.fetch_add(settled.replayed, Ordering::Relaxed);
        if settled.lost > 0 {
            t.lost.fetch_add(settled.lost, Ordering::Relaxed);
            tracing::debug!(topic = %wire::display(topic), lost = settled.lost, "messages lost while the connection was down");
        }
        let now = now_ms();
        for h in &held {
            if let Some(env) = accept(&self.shared, &route, topic, &h.payload, now) {
                self.ready.push(env);
            }
        }
        // In the inbox before anyone waiting for this subscription hears of it.
        self.hand_over();
        if let Some(probe) = probe {
            self.probes.remove(&probe);
            self.pending_unsubscribe.push(probe);
        }
        self.shared.sync.outstanding.fetch_sub(1, Ordering::SeqCst);
        let answer = if welcome.is_some() {
            Confirm::Confirmed
        } else {
            Confirm::NoAnswer
        };
        for w in waiters {
            let _ = w.send(answer);
        }
    }

    /// Hands the accepted envelopes to the inbox (one lock per burst).
    pub(super) fn hand_over(&mut self) {
        if self.ready.is_empty() {
            return;
        }
        let s = &self.shared;
        s.inbox
            .deliver_all(&mut self.ready, &s.groups, &s.options, &s.stats);
    }
}

/// The first and last frames of a three-frame message.
fn ends(frames: Vec<zmq::Message>) -> Option<(zmq::Message, zmq::Message)> {
    let [first, _, last] = <[zmq::Message; 3]>::try_from(frames).ok()?;
    Some((first, last))
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
    let env = match Envelope::decode(payload) {
        Ok(e) => e,
        Err(e) => {
            shared.stats.record_undecodable(&wire::display(topic), &e);
            return None;
        }
    };
    let fits = match route {
        Route::Inbox => {
            env.kind == Destination::Channel
                && names::owner_instance(&env.destination) == Some(shared.id.as_str())
        }
        Route::Channel(name) => env.kind == Destination::Channel && env.destination == *name,
        Route::Group(name) => env.kind == Destination::Group && env.destination == *name,
    };
    if !fits {
        shared.stats.record_undecodable(
            &wire::display(topic),
            &format!(
                "an envelope for {:?} {:?} does not belong on this topic",
                env.kind, env.destination
            ),
        );
        return None;
    }
    if env.is_expired_at(now) {
        shared.stats.record_expired(1);
        return None;
    }
    Some(env)
}
