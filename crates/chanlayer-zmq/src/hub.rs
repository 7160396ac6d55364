//! The publishing side, shared by the proxy (dedicated mode) and the embedded publisher: an
//! XPUB socket, per-topic sequence numbers, the retention that late joiners are replayed
//! from, the answers to subscription probes, and the counters.
//!
//! - Every data message gets the next sequence number of its topic and is published as
//!   `[topic, meta, envelope]` (see [`crate::wire`]). Consecutive messages of one topic that
//!   are queued together are published as one batch frame (the proxy's `Batch`).
//! - Messages of normal channels (`c:`) are **retained** (the last `retain` per topic, at
//!   most `retain_for`, at most `retain_bytes` in all); messages of inboxes (`i:`) are
//!   retained only when no subscriber was there to get them. Group messages are never
//!   retained: a membership starts when `group_add` returns.
//! - A probe subscription `h:{id}\0{topic}` is answered with the retained messages of
//!   `topic` (the replay) and a welcome carrying the topic's current sequence number, all on
//!   the probe topic, which only the asking subscriber is subscribed to. Because a
//!   subscriber sends its topic subscription before its probe, on one connection, every
//!   message published after the welcome reaches it live.
//! - A proxy's hub (`stamps`) passes on each message's origin (the sender's own numbering,
//!   see [`wire::Origin`]), follows the origins of each topic, and lists them in its
//!   welcomes, so receivers count losses end to end, across a proxy restart too.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hashbrown::hash_map::EntryRef;
use hashbrown::HashMap;

use crate::bridge::{idle_since, lock, wait_until, Control, Item, Sink};
use crate::retention::{From, Retention, Store};
use crate::wire::{self, TopicKind};

/// Counters of a publisher (the proxy, or the embedded publisher of a process).
///
/// `received = forwarded + dropped + undecodable + flushed + pending + abandoned`, where
/// `pending` are retained messages that no subscriber has received yet, and `abandoned` the
/// ones still pending when the publisher stopped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HubStats {
    /// Messages handed to the publisher (from senders, or from `send` in embedded mode).
    pub received: u64,
    /// Messages published while at least one subscriber wanted them, or replayed later to
    /// one that had missed them.
    pub forwarded: u64,
    /// Messages no subscriber ever got: group messages with no subscriber, and retained
    /// messages that aged out or were pushed out before any subscriber asked.
    pub dropped: u64,
    /// Frames that were not a chanlayer message (wrong shape or topic), skipped.
    pub undecodable: u64,
    /// Retained messages dropped by a `flush` before any subscriber got them.
    pub flushed: u64,
    /// Messages sent again to late joiners (counted once per replayed copy).
    pub replayed: u64,
    /// Batch frames published: each carried several consecutive messages of one topic
    /// (counted in `forwarded` one by one).
    pub batches: u64,
    /// Messages that travelled in batch frames (`batched / batches` is the mean batch size).
    pub batched: u64,
    /// Messages retained now.
    pub retained: u64,
    /// Bytes retained now.
    pub retained_bytes: u64,
    /// Retained messages no subscriber has received yet.
    pub pending: u64,
    /// Retained messages no subscriber had received when the publisher stopped: the
    /// embedded publisher after its `close_linger`, the proxy at [`crate::Proxy::stop`].
    pub abandoned: u64,
}

/// A publisher's live counters: its thread counts, anyone reads (a copy).
pub(crate) type Counters = Arc<Mutex<HubStats>>;

/// An origin (a sender's numbering on a topic, dedicated mode) the hub follows.
struct Followed {
    /// The first number of it the hub published (since it began to follow it).
    first: u64,
    /// The last number of it the hub published.
    last: u64,
    /// When it last published one (the hub's clock, per loop turn).
    seen: Instant,
}

#[derive(Default)]
struct TopicState {
    /// The map's own key, shared with the retention store.
    key: Arc<[u8]>,
    seq: u64,
    subscribed: bool,
    /// The origins of the topic's messages (a proxy's hub only).
    origins: HashMap<u64, Followed>,
}

/// The XPUB side. Owned by one thread.
pub(crate) struct Hub {
    /// The XPUB socket (the proxy polls it).
    pub xpub: zmq::Socket,
    epoch: u64,
    /// A proxy's hub: every data message carries an origin stamp, and welcomes the table of
    /// the topic's origins (see [`crate::wire::Origin`]).
    stamps: bool,
    topics: HashMap<Arc<[u8]>, TopicState>,
    store: Store,
    sweep_at: usize,
    /// The time, read once per loop turn ([`Hub::tick`]).
    clock: Instant,
    /// When origins idle for long were last forgotten.
    forgot_at: Instant,
    counters: Counters,
    /// The embedded publisher serves sends (its in-process subscribers are back after the
    /// bind); see [`Sink::idle`].
    pub warm: bool,
    /// When it last published something (see [`Sink::idle`]).
    pub last: Instant,
}

const SWEEP_MIN: usize = 4096;

/// An origin that published nothing on a topic for this long (or for the retention's
/// `max_age`, if longer) is forgotten.
const FOLLOW_FOR: Duration = Duration::from_secs(600);

impl Hub {
    /// A hub on `xpub`; `stamps` for a proxy (its messages carry their origin).
    pub fn new(xpub: zmq::Socket, retention: Retention, stamps: bool, counters: Counters) -> Hub {
        let now = Instant::now();
        Hub {
            xpub,
            epoch: rand::random::<u64>(),
            stamps,
            topics: HashMap::new(),
            store: Store::new(retention),
            sweep_at: SWEEP_MIN,
            clock: now,
            forgot_at: now,
            counters,
            warm: false,
            last: now,
        }
    }

    /// Updates the counters (and the store's gauges with them).
    fn count(&self, f: impl FnOnce(&mut HubStats)) {
        let mut c = lock(&self.counters);
        f(&mut c);
        c.retained = self.store.count as u64;
        c.retained_bytes = self.store.bytes as u64;
        c.pending = self.store.pending as u64;
    }

    /// Sends one message (a failure is logged: PUB/SUB has no one to tell).
    fn send<T: Into<zmq::Message>>(&self, frames: impl IntoIterator<Item = T>) {
        if let Err(e) = self.xpub.send_multipart(frames, 0) {
            tracing::warn!(error = %e, "the publisher could not publish a message");
        }
    }

    /// The state of `topic`, made if new (and the map swept of dead topics first when it
    /// has grown).
    fn state_mut(&mut self, topic: &[u8]) -> &mut TopicState {
        if !self.topics.contains_key(topic) {
            self.sweep();
        }
        match self.topics.entry_ref(topic) {
            EntryRef::Occupied(o) => o.into_mut(),
            EntryRef::Vacant(v) => {
                let key: Arc<[u8]> = Arc::from(topic);
                v.insert_with_key(
                    key.clone(),
                    TopicState {
                        key,
                        ..TopicState::default()
                    },
                )
            }
        }
    }

    /// Publishes `count` messages of `topic` as one frame: one envelope, or (`count` more
    /// than 1) a batch body as [`wire::batch_push`] wrote it; `from` is the origin of the
    /// first (the others follow). A frame received from the proxy's PULL socket is
    /// forwarded without a copy. Each message gets its own sequence number, and is
    /// retained and counted on its own: normal channels are retained for late joiners, an
    /// inbox only while nobody listens, groups never (retention off: nothing).
    pub fn publish(&mut self, topic: &[u8], from: From, count: u64, payload: zmq::Message) {
        let batch = count > 1;
        let Some(kind) = wire::data_topic_kind(topic) else {
            return self.reject(count);
        };
        let (per_topic, stamps, clock) = (self.store.limits.per_topic, self.stamps, self.clock);
        let state = self.state_mut(topic);
        let first = state.seq + 1;
        state.seq += count;
        let subscribed = state.subscribed;
        let retain = per_topic > 0
            && match kind {
                TopicKind::Channel => true,
                TopicKind::Inbox => !subscribed,
                TopicKind::Group => false,
            };
        // A proxy's hub follows the origin, and stamps the frame with it.
        let origin = stamps.then(|| match from {
            Some((id, seq)) if id != 0 => {
                let f = state.origins.entry(id).or_insert(Followed {
                    first: seq,
                    last: 0,
                    seen: clock,
                });
                f.last = seq.saturating_add(count - 1);
                f.seen = clock;
                let first = f.first.min(seq);
                wire::Origin { id, seq, first }
            }
            _ => wire::Origin::default(),
        });
        let key = state.key.clone();
        let kept: Vec<Vec<u8>> = match (retain, batch) {
            (false, _) => Vec::new(),
            (true, false) => vec![payload.to_vec()],
            (true, true) => wire::batch_items(&payload)
                .unwrap_or_default()
                .into_iter()
                .map(<[u8]>::to_vec)
                .collect(),
        };
        // Counters first: whoever gets the message sees them counted.
        self.count(|c| match (subscribed, retain) {
            (true, _) => {
                c.forwarded += count;
                if batch {
                    c.batches += 1;
                    c.batched += count;
                }
            }
            (false, false) => c.dropped += count,
            (false, true) => {}
        });
        if subscribed {
            let meta_kind = if batch {
                wire::META_BATCH
            } else {
                wire::META_DATA
            };
            let meta = meta(meta_kind, self.epoch, first, origin);
            self.send([topic.into(), meta, payload]);
        }
        let mut dropped = 0;
        for (i, bytes) in (0u64..).zip(kept) {
            let from = from.map(|(id, seq)| (id, seq.saturating_add(i)));
            dropped += self
                .store
                .keep(&key, first + i, from, bytes, subscribed, self.clock);
        }
        // Counted last: once `received` shows a message, the other counters do too.
        self.count(|c| {
            c.dropped += dropped;
            c.received += count;
        });
    }

    /// The publisher stops: keeps answering subscriptions (late joiners get their replay)
    /// while it retains messages no subscriber has had, up to `close_linger`; then lets go
    /// of everything retained and counts what no subscriber had as abandoned. Returns how
    /// many.
    pub fn linger(&mut self, close_linger: Duration) -> u64 {
        let until = Instant::now() + close_linger;
        while self.store.pending > 0 && wait_until(&self.xpub, zmq::POLLIN, until, "publisher") {
            self.drain_subscriptions();
            self.tick();
        }
        let abandoned = self.store.clear();
        self.count(|c| c.abandoned += abandoned);
        abandoned
    }

    /// Counts `count` messages that are not chanlayer's (skipped).
    pub fn reject(&mut self, count: u64) {
        self.count(|c| {
            c.undecodable += count;
            c.received += count;
        });
    }

    /// Forgets the sequence numbers of topics nobody subscribes and nothing is retained for,
    /// when the map has doubled since the last sweep.
    fn sweep(&mut self) {
        if self.topics.len() < self.sweep_at {
            return;
        }
        let store = &self.store;
        self.topics.retain(|k, s| s.subscribed || store.holds(k));
        self.sweep_at = (self.topics.len() * 2).max(SWEEP_MIN);
    }

    /// Time-based work, once per loop turn: ages retained messages out, and now and then
    /// forgets origins that went quiet.
    pub fn tick(&mut self) {
        let now = Instant::now();
        self.clock = now;
        if self.store.count > 0 {
            let dropped = self.store.evict(now);
            self.count(|c| c.dropped += dropped);
        }
        if self.stamps && now.duration_since(self.forgot_at) >= Duration::from_secs(60) {
            self.forgot_at = now;
            let idle = FOLLOW_FOR.max(self.store.limits.max_age);
            for s in self.topics.values_mut() {
                s.origins
                    .retain(|_, f| now.saturating_duration_since(f.seen) < idle);
            }
        }
    }

    /// Reads every subscription message waiting on the XPUB socket and acts on it.
    pub fn drain_subscriptions(&mut self) {
        loop {
            match self.xpub.recv_bytes(zmq::DONTWAIT) {
                Ok(msg) => self.on_subscription(&msg),
                Err(zmq::Error::EAGAIN) => break,
                Err(zmq::Error::EINTR) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "the publisher could not read subscriptions");
                    break;
                }
            }
        }
    }

    fn on_subscription(&mut self, msg: &[u8]) {
        let Some((&flag, topic)) = msg.split_first() else {
            return;
        };
        match flag {
            1 if topic.first() == Some(&wire::PROBE) => self.answer_probe(topic),
            1 if wire::data_topic_kind(topic).is_some() => {
                self.state_mut(topic).subscribed = true;
            }
            0 if wire::data_topic_kind(topic).is_some() => {
                if let Some(s) = self.topics.get_mut(topic) {
                    s.subscribed = false;
                }
            }
            _ => {}
        }
    }

    fn answer_probe(&mut self, probe: &[u8]) {
        let Some(topic) = wire::parse_probe(probe) else {
            tracing::debug!(probe = %wire::display(probe), "ignored a malformed probe");
            return;
        };
        let (epoch, stamps) = (self.epoch, self.stamps);
        let state = self.topics.get(topic);
        let xpub = &self.xpub;
        let (replayed, heard_now) = self.store.replay(topic, |k| {
            let origin = stamps.then(|| {
                let (id, seq) = k.from.unwrap_or((0, 0));
                let followed = state.and_then(|s| s.origins.get(&id));
                let first = followed.map_or(seq, |f| f.first.min(seq));
                wire::Origin { id, seq, first }
            });
            let meta = meta(wire::META_DATA, epoch, k.seq, origin);
            let sent = xpub.send_multipart([probe.into(), meta, k.payload[..].into()], 0);
            if let Err(e) = &sent {
                tracing::warn!(error = %e, "could not replay a retained message");
            }
            sent.is_ok()
        });
        self.count(|c| {
            c.replayed += replayed;
            c.forwarded += heard_now;
        });
        // The welcome: the topic's current number.
        let meta = wire::meta(wire::META_WELCOME, epoch, state.map_or(0, |s| s.seq));
        if stamps {
            let table: Vec<(u64, u64)> = state
                .map(|s| s.origins.iter().map(|(id, f)| (*id, f.last)).collect())
                .unwrap_or_default();
            self.send([probe, &meta[..], &wire::origin_table(&table)]);
        } else {
            self.send([probe, &meta[..]]);
        }
    }

    /// Drops the retained messages of `prefix` (when not empty), then publishes a MARK with
    /// `token` on `reply_topic`: a barrier that reaches the subscriber after everything
    /// published before it.
    pub fn mark(&mut self, reply_topic: &[u8], token: u64, flush_prefix: &[u8]) {
        if !flush_prefix.is_empty() {
            let flushed = self
                .store
                .flush(|topic| wire::flushable_under(topic, flush_prefix));
            self.count(|c| c.flushed += flushed);
        }
        let meta = wire::meta(wire::META_MARK, self.epoch, token);
        self.send([reply_topic, &meta[..]]);
    }
}

/// The embedded publisher's hub takes what its queue holds, and a direct send.
impl Sink for Hub {
    fn put(&mut self, item: Item<Control>) -> bool {
        match item {
            Item::Data(d) => self.publish(&d.topic, None, d.count as u64, d.body.into()),
            Item::Control(Control::Mark {
                reply,
                token,
                flush_prefix,
            }) => self.mark(&reply, token, &flush_prefix),
            // Frames as they are (tests of what receivers do with garbage).
            Item::Control(Control::Raw(frames)) => self.send(frames),
        }
        false
    }

    fn settle(&mut self) {
        self.drain_subscriptions();
    }

    fn direct(&self) -> bool {
        true
    }

    fn idle(&mut self) -> bool {
        self.warm && idle_since(&mut self.last)
    }
}

/// A meta frame: stamped with the message's origin (a proxy's hub) or plain.
fn meta(kind: u8, epoch: u64, seq: u64, origin: Option<wire::Origin>) -> zmq::Message {
    match origin {
        Some(o) => wire::meta_stamped(kind, epoch, seq, o)[..].into(),
        None => wire::meta(kind, epoch, seq)[..].into(),
    }
}
