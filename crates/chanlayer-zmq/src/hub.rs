//! The publishing side, shared by the proxy (dedicated mode) and the embedded publisher: an
//! XPUB socket, per-topic sequence numbers, the retention that late joiners are replayed
//! from, the answers to subscription probes, and the counters.
//!
//! - Every data message gets the next sequence number of its topic and is published as
//!   `[topic, meta, envelope]` (see [`crate::wire`]). Consecutive messages of one topic that
//!   are queued together are published as one batch frame ([`Batch`]).
//! - Messages of normal channels (`c:`) are **retained** (the last `retain` per topic, at
//!   most `retain_for`, at most `retain_bytes` in all); messages of inboxes (`i:`) are
//!   retained only when no subscriber was there to get them. Group messages are never
//!   retained: a membership starts when `group_add` returns.
//! - A probe subscription `h:{id}\0{topic}` is answered with the retained messages of
//!   `topic` (the replay) and a welcome carrying the topic's current sequence number, all on
//!   the probe topic, which only the asking subscriber is subscribed to. Because a
//!   subscriber sends its topic subscription before its probe, on one connection, every
//!   message published after the welcome reaches it live.

use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use hashbrown::hash_map::EntryRef;
use hashbrown::HashMap;

use crate::retention::Retention;
use crate::retention::Store;
use crate::wire::{self, TopicKind};

/// Counters of a publisher (the proxy, or the embedded publisher of a process).
///
/// `received = forwarded + dropped + undecodable + flushed + pending`, where `pending` are
/// retained messages that no subscriber has received yet.
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
        }
    }

    pub fn count_undecodable(&self) {
        add(&self.undecodable, 1);
    }
}

struct TopicState {
    /// The map's own key, shared with the retention store.
    key: Rc<[u8]>,
    seq: u64,
    subscribed: bool,
}

/// A message body handed to [`Hub::publish`]: owned bytes, or a frame received from the
/// proxy's PULL socket (forwarded without a copy when it is not retained).
pub(crate) enum Payload {
    Bytes(Vec<u8>),
    Frame(zmq::Message),
}

impl Payload {
    fn as_slice(&self) -> &[u8] {
        match self {
            Payload::Bytes(b) => b,
            Payload::Frame(m) => m,
        }
    }
    fn into_message(self) -> zmq::Message {
        match self {
            Payload::Bytes(b) => zmq::Message::from(b),
            Payload::Frame(m) => m,
        }
    }
}

/// Consecutive data messages of one topic on their way to [`Hub::publish_batch`]: a
/// publisher adds every message it takes from its queue and flushes before anything else
/// (a mark, raw frames) and at the end of the queue, so the order on the wire is the order
/// of the queue and nothing waits for a batch to fill.
#[derive(Default)]
pub(crate) struct Batch {
    topic: Vec<u8>,
    body: Vec<u8>,
    count: u64,
    /// The first message, kept whole: a batch of one is published as a plain data message.
    first: Option<Payload>,
}

impl Batch {
    /// Adds a message for `topic`, publishing what is batched first when the topic changes
    /// or the batch is full. A message over [`wire::BATCH_ITEM_MAX`] is published alone.
    pub fn add(&mut self, hub: &mut Hub, topic: &[u8], payload: Payload) {
        let len = payload.as_slice().len();
        if len > wire::BATCH_ITEM_MAX {
            self.flush(hub);
            hub.publish(topic, payload);
            return;
        }
        let batched = self.body.len() + self.first.as_ref().map_or(0, |f| 4 + f.as_slice().len());
        if self.count > 0 && (self.topic != topic || batched + 4 + len > wire::BATCH_MAX_BYTES) {
            self.flush(hub);
        }
        if self.count == 0 {
            self.topic.clear();
            self.topic.extend_from_slice(topic);
            self.first = Some(payload);
            self.count = 1;
            return;
        }
        if let Some(first) = self.first.take() {
            self.body.reserve(8 * 1024);
            wire::batch_push(&mut self.body, first.as_slice());
        }
        wire::batch_push(&mut self.body, payload.as_slice());
        self.count += 1;
    }

    /// Publishes what is batched.
    pub fn flush(&mut self, hub: &mut Hub) {
        match (self.count, self.first.take()) {
            (0, _) => {}
            (_, Some(first)) => hub.publish(&self.topic, first),
            (n, None) => {
                let body = std::mem::take(&mut self.body);
                hub.publish_batch(&self.topic, n, body);
            }
        }
        self.count = 0;
        self.body.clear();
    }
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
}

/// The XPUB side. Owned by one thread.
pub(crate) struct Hub {
    xpub: zmq::Socket,
    epoch: u64,
    topics: HashMap<Rc<[u8]>, TopicState>,
    store: Store,
    sweep_at: usize,
    counters: std::sync::Arc<HubCounters>,
}

const SWEEP_MIN: usize = 4096;

impl Hub {
    pub fn new(
        xpub: zmq::Socket,
        retention: Retention,
        counters: std::sync::Arc<HubCounters>,
    ) -> Hub {
        Hub {
            xpub,
            epoch: rand::random::<u64>(),
            topics: HashMap::new(),
            store: Store::new(retention),
            sweep_at: SWEEP_MIN,
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

    fn send_two(&self, first: &[u8], second: &[u8]) {
        let r = self
            .xpub
            .send(first, zmq::SNDMORE)
            .and_then(|()| self.xpub.send(second, 0));
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
                    },
                )
            }
        }
    }

    /// Takes the next `count` sequence numbers of `topic` for messages about to be
    /// published, and says what happens to them: normal channels are retained for late
    /// joiners, an inbox only while nobody listens, groups never (retention off: nothing).
    fn claim(&mut self, topic: &[u8], kind: TopicKind, count: u64) -> Claim {
        let per_topic = self.store.limits().per_topic;
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
        Claim {
            first,
            subscribed,
            key: state.key.clone(),
            retain,
        }
    }

    /// Publishes one data message on `topic`.
    pub fn publish(&mut self, topic: &[u8], payload: Payload) {
        self.publish_inner(topic, payload);
        // Counted last: once `received` shows a message, the other counters do too.
        add(&self.counters.received, 1);
    }

    fn publish_inner(&mut self, topic: &[u8], payload: Payload) {
        let Some(kind) = wire::data_topic_kind(topic) else {
            self.counters.count_undecodable();
            return;
        };
        let epoch = self.epoch;
        let Claim {
            first: seq,
            subscribed,
            key,
            retain,
        } = self.claim(topic, kind, 1);
        let meta = wire::meta(wire::META_DATA, epoch, seq);
        let kept = retain.then(|| payload.as_slice().to_vec());
        // Counters first: whoever gets the message sees them counted.
        if subscribed {
            add(&self.counters.forwarded, 1);
            self.send_frames([topic, &meta], payload.into_message());
        } else if !retain {
            add(&self.counters.dropped, 1);
        }
        if let Some(bytes) = kept {
            self.keep(&key, seq, bytes, subscribed);
        }
    }

    /// Publishes `count` consecutive messages of `topic` as one batch frame; `body` holds
    /// them as [`wire::batch_push`] wrote them. Each gets its own sequence number, is
    /// retained on its own, and is counted on its own.
    pub fn publish_batch(&mut self, topic: &[u8], count: u64, body: Vec<u8>) {
        let Some(kind) = wire::data_topic_kind(topic) else {
            add(&self.counters.undecodable, count);
            add(&self.counters.received, count);
            return;
        };
        let epoch = self.epoch;
        let Claim {
            first,
            subscribed,
            key,
            retain,
        } = self.claim(topic, kind, count);
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
            let meta = wire::meta(wire::META_BATCH, epoch, first);
            self.send_frames([topic, &meta], zmq::Message::from(body));
        } else if !retain {
            add(&self.counters.dropped, count);
        }
        for (seq, bytes) in (first..).zip(kept) {
            self.keep(&key, seq, bytes, subscribed);
        }
        add(&self.counters.received, count);
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
    fn keep(&mut self, key: &Rc<[u8]>, seq: u64, payload: Vec<u8>, heard: bool) {
        let dropped = self.store.keep(key, seq, payload, heard, Instant::now());
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

    /// Time-based work: ages retained messages out.
    pub fn tick(&mut self) {
        if self.store.count() > 0 {
            let dropped = self.store.evict(Instant::now());
            add(&self.counters.dropped, dropped);
            self.show_store();
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
        let epoch = self.epoch;
        let xpub = &self.xpub;
        let (replayed, heard_now) = self.store.replay(topic, |k| {
            let meta = wire::meta(wire::META_DATA, epoch, k.seq);
            let sent = xpub
                .send(probe, zmq::SNDMORE)
                .and_then(|()| xpub.send(&meta[..], zmq::SNDMORE))
                .and_then(|()| xpub.send(&k.payload[..], 0));
            if let Err(e) = &sent {
                tracing::warn!(error = %e, "could not replay a retained message");
            }
            sent.is_ok()
        });
        add(&self.counters.replayed, replayed);
        add(&self.counters.forwarded, heard_now);
        self.show_store();
        let current = self.topics.get(topic).map_or(0, |s| s.seq);
        let meta = wire::meta(wire::META_WELCOME, epoch, current);
        self.send_two(probe, &meta);
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
        self.send_two(reply_topic, &meta);
    }
}
