//! The receiver thread: reads this instance's inbox topic (process-local channels) and the
//! groups topic, and hands what arrives to core's ingest path ([`Inbound`]), which decodes
//! it, checks the owner, delivers it to channels and local group members (enforcing
//! per-channel capacity and expiry), and counts what it drops.
//!
//! Both are *assigned*, not subscribed: no consumer group, no commits, no rebalance. The
//! inbox is read from its start (it is created with the instance). The groups topic is read
//! from the end found when the layer connected (explicit offsets, read before `connect`
//! returns), so every group message sent after that reaches this instance; what was sent
//! before is not for it. Like Django Channels' process-local channels, this is at-most-once:
//! what the thread has read is the instance's.
//!
//! Inbox messages are handed over in bursts (what librdkafka has ready, up to [`BURST`], in
//! one `ingest_all`). Group messages for a group with no member here are skipped by their
//! key without being decoded. A group message waits until the inbox has been read up to its
//! end (see [`run`]), so that a direct send acknowledged before a group send is not
//! overtaken by it. Members that are normal channels (added by this instance) get a copy
//! produced to their topic by the forwarder task ([`crate::forward`]).
//!
//! [`Inbound`]: chanlayer_core::toolkit::Inbound

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use chanlayer_core::toolkit::{Destination, Envelope};
use chanlayer_core::Result;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{BorrowedMessage, OwnedMessage};
use rdkafka::{Message, Offset};
use tokio::sync::mpsc::UnboundedSender;

use crate::forward::Forward;
use crate::state::{Instance, CLOSED_KEY};
use crate::topics::{backend_err, ends};

/// Inbox messages decoded and not handed over yet, at most.
const BURST: usize = 256;
/// Group messages waiting for the inbox to catch up before another poll of the broker.
const DEFERRED: usize = 1024;

/// Builds the consumer and assigns the inbox (from its start) and the `partitions`
/// partitions of the groups topic (from their current end). Blocking: run it off the async
/// workers.
pub(crate) fn assign(instance: &Instance, partitions: usize) -> Result<BaseConsumer> {
    let names = &instance.names;
    let consumer: BaseConsumer = instance
        .cfg
        .consumer_config(&instance.client_id, None)
        .create()
        .map_err(|e| backend_err("could not create the inbox consumer", e))?;
    let timeout = instance.cfg.connection_timeout;
    let mut tpl = ends(&consumer, &names.groups, partitions, timeout)?;
    tpl.add_partition_offset(&names.inbox, 0, Offset::Beginning)
        .map_err(|e| backend_err("could not assign the inbox topic", e))?;
    consumer
        .assign(&tpl)
        .map_err(|e| backend_err("could not assign the inbox and groups topics", e))?;
    Ok(consumer)
}

/// Runs until the layer closes.
///
/// Ordering between the two topics: a group message is fanned out only after this
/// instance has read its inbox up to the inbox's end *as the broker reports it after the
/// group message was read*. So a `send` to one of our channels that was acknowledged before
/// a `group_send` was made arrives first, as it would on a single queue; the price is one
/// watermark request per burst of group messages that have members here.
pub(crate) fn run(
    instance: Arc<Instance>,
    consumer: BaseConsumer,
    forward: UnboundedSender<Forward>,
) {
    let mut r = Reader {
        inbox_source: format!("kafka topic {}", instance.names.inbox),
        groups_source: format!("kafka topic {}", instance.names.groups),
        instance,
        forward,
        inbox_next: 0,
        burst: Vec::with_capacity(BURST),
        burst_offsets: Vec::with_capacity(BURST),
        deferred: Vec::new(),
        group_burst: Vec::new(),
    };
    let closed = r.instance.inbound.closed().clone();
    while !closed.is_closed() {
        // With something waiting, only take what is already there, then hand it over.
        let idle = r.deferred.is_empty() && r.burst.is_empty();
        match consumer.poll(Duration::from_millis(if idle { 50 } else { 0 })) {
            Some(Ok(m)) => {
                r.read(m);
                if r.burst.len() >= BURST {
                    r.hand_over_inbox();
                }
                if r.deferred.len() < DEFERRED {
                    continue;
                }
            }
            Some(Err(e)) => {
                tracing::debug!(error = %e, "inbox consumer error (librdkafka retries)");
                continue;
            }
            None => {}
        }
        r.hand_over_inbox();
        if r.deferred.is_empty() {
            continue;
        }
        r.catch_up_inbox(&consumer);
        r.hand_over_inbox();
        r.hand_over_groups();
    }
}

/// The receiver thread's state between polls.
struct Reader {
    instance: Arc<Instance>,
    forward: UnboundedSender<Forward>,
    inbox_source: String,
    groups_source: String,
    /// The offset after the last inbox message read.
    inbox_next: i64,
    /// Inbox messages decoded, not handed over yet, and their offsets.
    burst: Vec<Envelope>,
    burst_offsets: Vec<i64>,
    /// Group messages with members here, read but not fanned out yet.
    deferred: Vec<OwnedMessage>,
    /// Decoded group messages for one `ingest_all` (reused).
    group_burst: Vec<Envelope>,
}

impl Reader {
    /// Takes one record: a close notice is noted, a group message with members here waits,
    /// an inbox message joins the burst.
    fn read(&mut self, m: BorrowedMessage<'_>) {
        if m.topic() == self.instance.names.groups {
            if !self.closed_notice(&m) && self.has_members(&m) {
                self.deferred.push(m.detach());
            }
            return;
        }
        let offset = m.offset();
        self.inbox_next = self.inbox_next.max(offset + 1);
        if offset < self.instance.inbox_skip_below.load(Ordering::Acquire) {
            // Sent before a flush.
            return;
        }
        let inbound = &self.instance.inbound;
        if let Some(env) = inbound.decode(m.payload().unwrap_or_default(), &self.inbox_source) {
            self.burst.push(env);
            self.burst_offsets.push(offset);
        }
    }

    /// Hands the inbox burst to core, without what a `flush` made while it was gathered
    /// skips.
    fn hand_over_inbox(&mut self) {
        if self.burst.is_empty() {
            return;
        }
        let skip = self.instance.inbox_skip_below.load(Ordering::Acquire);
        let n = self.burst_offsets.partition_point(|&o| o < skip);
        self.burst.drain(..n);
        self.burst_offsets.clear();
        self.instance.inbound.ingest_all(&mut self.burst);
    }

    /// Fans the deferred group messages out: copies for normal-channel members go to the
    /// forwarder, the rest to core (local members).
    fn hand_over_groups(&mut self) {
        let (inbound, names) = (&self.instance.inbound, &self.instance.names);
        for m in self.deferred.drain(..) {
            let payload = m.payload().unwrap_or_default();
            let Some(env) = inbound.decode_as(payload, Destination::Group, &self.groups_source)
            else {
                continue;
            };
            // Route by the envelope's own group (the key is only a filter).
            let normal = inbound.normal_groups().members(&env.destination);
            if !normal.is_empty() {
                let topics = normal.iter().map(|c| names.channel(c)).collect();
                if self.forward.send((topics, payload.to_vec())).is_err() {
                    for c in &normal {
                        inbound.stats().record_undeliverable(c);
                    }
                }
            }
            self.group_burst.push(env);
        }
        inbound.ingest_all(&mut self.group_burst);
    }

    /// Reads the inbox up to its current end (bounded: one second), deferring further group
    /// messages behind the ones already waiting.
    fn catch_up_inbox(&mut self, consumer: &BaseConsumer) {
        let inbox = &self.instance.names.inbox;
        let high = match consumer.fetch_watermarks(inbox, 0, Duration::from_secs(1)) {
            Ok((_, high)) => high,
            Err(e) => {
                tracing::debug!(error = %e, "could not read the inbox end; group messages go out unordered");
                return;
            }
        };
        let closed = self.instance.inbound.closed().clone();
        let deadline = std::time::Instant::now() + Duration::from_secs(1);
        while self.inbox_next < high && std::time::Instant::now() < deadline && !closed.is_closed()
        {
            match consumer.poll(Duration::from_millis(20)) {
                Some(Ok(m)) => self.read(m),
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "inbox consumer error (librdkafka retries)")
                }
                None => {}
            }
        }
    }

    /// Handles an instance's "closed" notice (key [`CLOSED_KEY`], the instance id as value):
    /// sends to its process-local channels are undeliverable from now on. `true` if `m` was
    /// one.
    fn closed_notice(&self, m: &BorrowedMessage<'_>) -> bool {
        if m.key() != Some(CLOSED_KEY) {
            return false;
        }
        if let Some(id) = m.payload().and_then(|p| std::str::from_utf8(p).ok()) {
            self.instance.closed_instances.insert(id);
        }
        true
    }

    /// `true` if the group message's group (its key) has a member here, or has no key.
    fn has_members(&self, m: &BorrowedMessage<'_>) -> bool {
        let inbound = &self.instance.inbound;
        match m.key().and_then(|k| std::str::from_utf8(k).ok()) {
            Some(g) => inbound.groups().has_members(g) || inbound.normal_groups().has_members(g),
            None => true,
        }
    }
}
