//! The publishing side, shared by the proxy (dedicated mode) and the embedded publisher: an
//! XPUB socket, per-topic sequence numbers, the retention that late joiners are replayed
//! from, the answers to subscription probes, and the counters.
//!
//! - Every data message gets the next sequence number of its topic and is published as
//!   `[topic, meta, envelope]` (see [`crate::wire`]). Consecutive messages of one topic that
//!   are queued together are published as one batch frame ([`crate::runs::Batch`]).
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

use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hashbrown::hash_map::EntryRef;
use hashbrown::HashMap;

use crate::retention::{Retention, Store};
use crate::runs::{From, Payload};
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

/// Live counters, updated by the publisher's thread, read from anywhere.
#[derive(Debug, Default)]
pub(crate) struct HubCounters {
    received: AtomicU64,
    forwarded: AtomicU64,
    dropped: AtomicU64,
    undecodable: AtomicU64,
    flushed: AtomicU64,
    replayed: AtomicU64,
    batches: AtomicU64,
    batched: AtomicU64,
    retained: AtomicU64,
    retained_bytes: AtomicU64,
    pending: AtomicU64,
    abandoned: AtomicU64,
}

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

impl HubCounters {
    pub fn snapshot(&self) -> HubStats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        HubStats {
            received: g(&self.received),
            forwarded: g(&self.forwarded),
            dropped: g(&self.dropped),
            undecodable: g(&self.undecodable),
            flushed: g(&self.flushed),
            replayed: g(&self.replayed),
            batches: g(&self.batches),
            batched: g(&self.batched),
            retained: g(&self.retained),
            retained_bytes: g(&self.retained_bytes),
            pending: g(&self.pending),
            abandoned: g(&self.abandoned),
        }
    }

    pub fn count_undecodable(&self) {
        add(&self.undecodable, 1);
    }
}

/// An origin (a sender's numbering on a topic, dedicated mode) the hub follows.
struct Followed {
    /// The first number of it the hub published (since it began to follow it).
    first: u64,
    /// The last number of it the hub published.
    last: u64,
    /// When it last published one (the hub's clock, per loop turn).
    seen: Instant,
}

struct TopicState {
    /// The map's own key, shared with the retention store.
    key: Rc<[u8]>,
    seq: u64,
    subscribed: bool,
    /// The origins of the topic's messages (a proxy's hub only).
    origins: std::collections::HashMap<u64, Followed>,
}

/// What [`Hub::claim`] hands out for messages about to be published on a topic.
struct Claim {
    /// The first sequence number claimed.
    first: u64,
    /// Whether a subscriber confirmed the topic (the messages go out now).
    subscribed: bool,
    /// The topic's key in the retention store.
    key: Rc<[u8]>,
    /// Whether the messages are kept for late joiners.
    retain: bool,
    /// The origin stamp of the first message (a proxy's hub).
    origin: Option<wire::Origin>,
}

/// The XPUB side. Owned by one thread.
pub(crate) struct Hub {
    xpub: zmq::Socket,
    epoch: u64,
    /// A proxy's hub: every data message carries an origin stamp, and welcomes the table of
    /// the topic's origins (see [`crate::wire::Origin`]).
    stamps: bool,
    topics: HashMap<Rc<[u8]>, TopicState>,
    store: Store,
    sweep_at: usize,
    /// The time, read once per loop turn ([`Hub::tick`]).
    clock: Instant,
    /// When origins idle for long were last forgotten.
    forgot_at: Instant,
    counters: std::sync::Arc<HubCounters>,
}

const SWEEP_MIN: usize = 4096;

/// An origin that published nothing on a topic for this long (or for the retention's
/// `max_age`, if longer) is forgotten.
const FOLLOW_FOR: Duration = Duration::from_secs(600);

impl Hub {
    /// A hub on `xpub`; `stamps` for a proxy (its messages carry their origin).
    pub fn new(
        xpub: zmq::Socket,
        retention: Retention,
        stamps: bool,
        counters: std::sync::Arc<HubCounters>,
    ) -> Hub {
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
        }
    }

    /// The XPUB socket (for polling).
    pub fn socket(&self) -> &zmq::Socket {
        &self.xpub
    }

    fn send_frames(&self, frames: [&[u8]; 2], last: zmq::Message) {
        let r = self
            .xpub
            .send(frames[0], zmq::SNDMORE)
            .and_then(|()| self.xpub.send(frames[1], zmq::SNDMORE))
            .and_then(|()| self.xpub.send(last, 0));
        if let Err(e) = r {
            tracing::warn!(error = %e, "the publisher could not publish a message");
        }
    }

    fn send_control(&self, frames: &[&[u8]]) {
        let n = frames.len();
        let r = frames
            .iter()
            .enumerate()
            .try_for_each(|(i, f)| self.xpub.send(*f, if i + 1 < n { zmq::SNDMORE } else { 0 }));
        if let Err(e) = r {
            tracing::warn!(error = %e, "the publisher could not publish a control message");
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
                let key: Rc<[u8]> = Rc::from(topic);
                v.insert_with_key(
                    key.clone(),
                    TopicState {
                        key,
                        seq: 0,
                        subscribed: false,
                        origins: std::collections::HashMap::new(),
                    },
                )
            }
        }
    }

    /// Takes the next `count` sequence numbers of `topic` for messages about to be
    /// published (from origin `from`, numbered on), and says what happens to them: normal
    /// channels are retained for late joiners, an inbox only while nobody listens, groups
    /// never (retention off: nothing).
    fn claim(&mut self, topic: &[u8], kind: TopicKind, count: u64, from: From) -> Claim {
        let per_topic = self.store.limits().per_topic;
        let (stamps, clock) = (self.stamps, self.clock);
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
        let origin = stamps.then(|| match from {
            Some((id, seq)) if id != 0 => {
                let f = state.origins.entry(id).or_insert(Followed {
                    first: seq,
                    last: 0,
                    seen: clock,
                });
                f.last = seq.saturating_add(count - 1);
                f.seen = clock;
                wire::Origin {
                    id,
                    seq,
                    first: f.first.min(seq),
                }
            }
            _ => wire::Origin::default(),
        });
        Claim {
            first,
            subscribed,
            key: state.key.clone(),
            retain,
            origin,
        }
    }

    /// The meta frame of a message (a stamped one from a proxy's hub).
    fn meta(&self, kind: u8, seq: u64, origin: Option<wire::Origin>) -> Meta {
        match origin {
            Some(o) => Meta::Stamped(wire::meta_stamped(kind, self.epoch, seq, o)),
            None => Meta::Plain(wire::meta(kind, self.epoch, seq)),
        }
    }

    /// Publishes one data message on `topic`.
    pub fn publish(&mut self, topic: &[u8], from: From, payload: Payload) {
        self.publish_inner(topic, from, payload);
        // Counted last: once `received` shows a message, the other counters do too.
        add(&self.counters.received, 1);
    }

    fn publish_inner(&mut self, topic: &[u8], from: From, payload: Payload) {
        let Some(kind) = wire::data_topic_kind(topic) else {
            self.counters.count_undecodable();
            return;
        };
        let Claim {
            first: seq,
            subscribed,
            key,
            retain,
            origin,
        } = self.claim(topic, kind, 1, from);
        let meta = self.meta(wire::META_DATA, seq, origin);
        let kept = retain.then(|| payload.as_slice().to_vec());
        // Counters first: whoever gets the message sees them counted.
        if subscribed {
            add(&self.counters.forwarded, 1);
            self.send_frames([topic, meta.bytes()], payload.into_message());
        } else if !retain {
            add(&self.counters.dropped, 1);
        }
        if let Some(bytes) = kept {
            self.keep(&key, seq, from, bytes, subscribed);
        }
    }

    /// Publishes `count` consecutive messages of `topic` as one batch frame; `body` holds
    /// them as [`wire::batch_push`] wrote them, `from` is the origin of the first (the
    /// others follow). Each gets its own sequence number, is retained on its own, and is
    /// counted on its own.
    pub fn publish_batch(&mut self, topic: &[u8], count: u64, body: Vec<u8>, from: From) {
        let Some(kind) = wire::data_topic_kind(topic) else {
            add(&self.counters.undecodable, count);
            add(&self.counters.received, count);
            return;
        };
        let Claim {
            first,
            subscribed,
            key,
            retain,
            origin,
        } = self.claim(topic, kind, count, from);
        let kept: Vec<Vec<u8>> = if retain {
            wire::batch_items(&body)
                .unwrap_or_default()
                .into_iter()
                .map(<[u8]>::to_vec)
                .collect()
        } else {
            Vec::new()
        };
        if subscribed {
            add(&self.counters.forwarded, count);
            add(&self.counters.batches, 1);
            add(&self.counters.batched, count);
            let meta = self.meta(wire::META_BATCH, first, origin);
            self.send_frames([topic, meta.bytes()], zmq::Message::from(body));
        } else if !retain {
            add(&self.counters.dropped, count);
        }
        for (i, bytes) in (0u64..).zip(kept) {
            let from = from.map(|(id, seq)| (id, seq.saturating_add(i)));
            self.keep(&key, first + i, from, bytes, subscribed);
        }
        add(&self.counters.received, count);
    }

    /// Retained messages no subscriber has had yet.
    pub fn pending(&self) -> usize {
        self.store.pending()
    }

    /// The publisher stops: lets go of everything retained, and counts the messages no
    /// subscriber had as abandoned. Returns how many.
    pub fn abandon(&mut self) -> u64 {
        let abandoned = self.store.clear();
        add(&self.counters.abandoned, abandoned);
        self.show_store();
        abandoned
    }

    /// Counts a message that is not chanlayer's (skipped).
    pub fn reject(&mut self) {
        self.counters.count_undecodable();
        add(&self.counters.received, 1);
    }

    /// Publishes frames as they are (tests of what receivers do with garbage).
    pub fn publish_raw(&mut self, frames: &[Vec<u8>]) {
        let n = frames.len();
        for (i, f) in frames.iter().enumerate() {
            let flags = if i + 1 < n { zmq::SNDMORE } else { 0 };
            if let Err(e) = self.xpub.send(&f[..], flags) {
                tracing::warn!(error = %e, "could not publish raw frames");
                return;
            }
        }
    }

    /// Keeps a message for late joiners, and counts what the limits pushed out unheard.
    fn keep(&mut self, key: &Rc<[u8]>, seq: u64, from: From, payload: Vec<u8>, heard: bool) {
        let dropped = self.store.keep(key, seq, from, payload, heard, self.clock);
        add(&self.counters.dropped, dropped);
        self.show_store();
    }

    /// Copies the store's gauges to the counters.
    fn show_store(&self) {
        let c = &self.counters;
        c.retained
            .store(self.store.count() as u64, Ordering::Relaxed);
        c.retained_bytes
            .store(self.store.bytes() as u64, Ordering::Relaxed);
        c.pending
            .store(self.store.pending() as u64, Ordering::Relaxed);
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
        self.clock = Instant::now();
        if self.store.count() > 0 {
            let dropped = self.store.evict(self.clock);
            add(&self.counters.dropped, dropped);
            self.show_store();
        }
        if self.stamps && self.clock.duration_since(self.forgot_at) >= Duration::from_secs(60) {
            self.forgot_at = self.clock;
            let idle = FOLLOW_FOR.max(self.store.limits().max_age);
            let now = self.clock;
            for state in self.topics.values_mut() {
                state
                    .origins
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
        let first_of = |id: u64, seq: u64| {
            state
                .and_then(|s| s.origins.get(&id))
                .map_or(seq, |f| f.first.min(seq))
        };
        let xpub = &self.xpub;
        let (replayed, heard_now) = self.store.replay(topic, |k| {
            let meta = match (stamps, k.from) {
                (false, _) => Meta::Plain(wire::meta(wire::META_DATA, epoch, k.seq)),
                (true, from) => {
                    let (id, seq) = from.unwrap_or((0, 0));
                    let origin = wire::Origin {
                        id,
                        seq,
                        first: first_of(id, seq),
                    };
                    Meta::Stamped(wire::meta_stamped(wire::META_DATA, epoch, k.seq, origin))
                }
            };
            let sent = xpub
                .send(probe, zmq::SNDMORE)
                .and_then(|()| xpub.send(meta.bytes(), zmq::SNDMORE))
                .and_then(|()| xpub.send(&k.payload[..], 0));
            if let Err(e) = &sent {
                tracing::warn!(error = %e, "could not replay a retained message");
            }
            sent.is_ok()
        });
        add(&self.counters.replayed, replayed);
        add(&self.counters.forwarded, heard_now);
        self.show_store();
        let current = state.map_or(0, |s| s.seq);
        let meta = wire::meta(wire::META_WELCOME, epoch, current);
        if stamps {
            let table: Vec<(u64, u64)> = state
                .map(|s| s.origins.iter().map(|(id, f)| (*id, f.last)).collect())
                .unwrap_or_default();
            self.send_control(&[probe, &meta, &wire::origin_table(&table)]);
        } else {
            self.send_control(&[probe, &meta]);
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
            add(&self.counters.flushed, flushed);
            self.show_store();
        }
        let meta = wire::meta(wire::META_MARK, self.epoch, token);
        self.send_control(&[reply_topic, &meta]);
    }
}

/// A meta frame, plain or stamped, without an allocation.
enum Meta {
    Plain([u8; wire::META_LEN]),
    Stamped([u8; wire::STAMPED_META_LEN]),
}

impl Meta {
    fn bytes(&self) -> &[u8] {
        match self {
            Meta::Plain(m) => m,
            Meta::Stamped(m) => m,
        }
    }
}
