//! The receiver thread: reads this instance's inbox topic (process-local channels) and the
//! groups topic, and moves what arrives into the shared [`LocalInbox`], which demultiplexes
//! it, enforces per-channel capacity and expiry, and fans group messages out to local
//! members.
//!
//! Both are *assigned*, not subscribed: no consumer group, no commits, no rebalance. The
//! inbox is read from its start (it is created with the instance). The groups topic is read
//! from the end found when the layer connected (explicit offsets, read before `connect`
//! returns), so every group message sent after that reaches this instance; what was sent
//! before is not for it. Like Django Channels' process-local channels, this is at-most-once:
//! what the thread has read is the instance's.
//!
//! Group messages for a group with no member here are skipped by their key without being
//! decoded. A group message waits until the inbox has been read up to its end (see [`run`]),
//! so that a direct send acknowledged before a group send is not overtaken by it. Members that are normal channels (added by this instance) get a copy produced to
//! their topic by the forwarder task.
//!
//! [`LocalInbox`]: chanlayer_core::LocalInbox

use std::sync::Arc;
use std::time::Duration;

use chanlayer_core::{names, Destination, Envelope, Error, Result};
use std::sync::atomic::Ordering;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::OwnedMessage;
use rdkafka::{Message, Offset, TopicPartitionList};

use crate::layer::Inner;
use crate::topics::backend_err;

/// A group message for normal-channel members: the topics to copy it to, and its bytes.
pub(crate) type Forward = (Vec<String>, Vec<u8>);

/// Builds the consumer and assigns the inbox (from its start) and every partition of the
/// groups topic (from its current end). Blocking: run it off the async workers.
pub(crate) fn assign(inner: &Inner, groups_partitions: usize) -> Result<BaseConsumer> {
    let consumer: BaseConsumer = inner
        .cfg
        .consumer_config(&inner.client_id, None)
        .create()
        .map_err(|e| backend_err("could not create the inbox consumer", e))?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&inner.names.inbox, 0, Offset::Beginning)
        .map_err(|e| backend_err("could not assign the inbox topic", e))?;
    for p in 0..groups_partitions {
        let p = i32::try_from(p).unwrap_or(i32::MAX);
        let (_, high) = consumer
            .fetch_watermarks(&inner.names.groups, p, inner.cfg.connection_timeout)
            .map_err(|e| {
                backend_err(
                    &format!(
                        "could not read the end of the groups topic {:?}",
                        inner.names.groups
                    ),
                    e,
                )
            })?;
        tpl.add_partition_offset(&inner.names.groups, p, Offset::Offset(high))
            .map_err(|e| backend_err("could not assign the groups topic", e))?;
    }
    consumer
        .assign(&tpl)
        .map_err(|e| backend_err("could not assign the inbox and groups topics", e))?;
    Ok(consumer)
}

/// Group messages read but not fanned out yet (see [`run`]).
struct Deferred {
    messages: Vec<OwnedMessage>,
}

/// Runs until the layer closes.
///
/// Ordering between the two topics: a group message is fanned out only after this
/// instance has read its inbox up to the inbox's end *as the broker reports it after the
/// group message was read*. So a `send` to one of our channels that was acknowledged before
/// a `group_send` was made arrives first, as it would on a single queue; the price is one
/// watermark request per burst of group messages that have local members.
pub(crate) fn run(
    inner: Arc<Inner>,
    consumer: BaseConsumer,
    forward: tokio::sync::mpsc::UnboundedSender<Forward>,
) {
    let sources = Sources {
        inbox: format!("kafka topic {}", inner.names.inbox),
        groups: format!("kafka topic {}", inner.names.groups),
    };
    let mut inbox_next: i64 = 0;
    let mut deferred = Deferred {
        messages: Vec::new(),
    };
    while !inner.closed.is_closed() {
        // With group messages waiting, only take what is already there, then catch up.
        let wait = if deferred.messages.is_empty() {
            Duration::from_millis(50)
        } else {
            Duration::ZERO
        };
        match consumer.poll(wait) {
            Some(Ok(m)) => {
                if m.topic() == inner.names.groups {
                    if closed_notice(&inner, &m) {
                        continue;
                    }
                    if has_members(&inner, &m) {
                        deferred.messages.push(m.detach());
                    }
                } else {
                    inbox_next = inbox_next.max(m.offset() + 1);
                    deliver_inbox(&inner, &sources, m.payload(), m.offset());
                }
                if deferred.messages.len() < 1024 {
                    continue;
                }
            }
            Some(Err(e)) => {
                tracing::debug!(error = %e, "inbox consumer error (librdkafka retries)");
                continue;
            }
            None => {}
        }
        if deferred.messages.is_empty() {
            continue;
        }
        catch_up_inbox(&inner, &consumer, &sources, &mut inbox_next, &mut deferred);
        for m in deferred.messages.drain(..) {
            deliver_group(&inner, &sources, &forward, &m);
        }
    }
}

struct Sources {
    inbox: String,
    groups: String,
}

/// Reads the inbox up to its current end (bounded: one second), deferring further group
/// messages behind the ones already waiting.
fn catch_up_inbox(
    inner: &Inner,
    consumer: &BaseConsumer,
    sources: &Sources,
    inbox_next: &mut i64,
    deferred: &mut Deferred,
) {
    let high = match consumer.fetch_watermarks(&inner.names.inbox, 0, Duration::from_secs(1)) {
        Ok((_, high)) => high,
        Err(e) => {
            tracing::debug!(error = %e, "could not read the inbox end; group messages go out unordered");
            return;
        }
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    while *inbox_next < high && std::time::Instant::now() < deadline && !inner.closed.is_closed() {
        match consumer.poll(Duration::from_millis(20)) {
            Some(Ok(m)) if m.topic() == inner.names.groups => {
                let wanted = !closed_notice(inner, &m) && has_members(inner, &m);
                if wanted {
                    deferred.messages.push(m.detach());
                }
            }
            Some(Ok(m)) => {
                *inbox_next = (*inbox_next).max(m.offset() + 1);
                deliver_inbox(inner, sources, m.payload(), m.offset());
            }
            Some(Err(e)) => {
                tracing::debug!(error = %e, "inbox consumer error (librdkafka retries)")
            }
            None => {}
        }
    }
}

/// Handles an instance's "closed" notice (key [`CLOSED_KEY`], the instance id as value):
/// sends to its process-local channels are undeliverable from now on. `true` if `m` was one.
fn closed_notice<M: Message>(inner: &Inner, m: &M) -> bool {
    if m.key() != Some(CLOSED_KEY) {
        return false;
    }
    if let Some(id) = m.payload().and_then(|p| std::str::from_utf8(p).ok()) {
        inner.closed_instances.insert(id);
    }
    true
}

/// The key of the notice a closing instance puts on the groups topic. Group names cannot
/// contain `!`, so it never collides with a group.
pub(crate) const CLOSED_KEY: &[u8] = b"!closed";

/// `true` if the group message's group (its key) has a member here, or has no key.
fn has_members<M: Message>(inner: &Inner, m: &M) -> bool {
    match m.key().and_then(|k| std::str::from_utf8(k).ok()) {
        Some(g) => inner.local_groups.has_members(g) || inner.normal_groups.has_members(g),
        None => true,
    }
}

fn deliver_inbox(inner: &Inner, sources: &Sources, payload: Option<&[u8]>, offset: i64) {
    if offset < inner.inbox_skip_below.load(Ordering::Acquire) {
        // Sent before a flush.
        return;
    }
    let Some(payload) = payload else {
        inner
            .stats
            .record_undecodable(&sources.inbox, &"an empty record");
        return;
    };
    // Only this instance's own process-local channels live here.
    let envelope = match Envelope::decode(payload) {
        Ok(e) => e,
        Err(e) => {
            inner.stats.record_undecodable(&sources.inbox, &e);
            return;
        }
    };
    if envelope.kind != Destination::Channel
        || names::owner_instance(&envelope.destination) != Some(inner.id.as_str())
    {
        inner.stats.record_undeliverable(&envelope.destination);
        return;
    }
    let channel = envelope.destination.clone();
    let capacity = inner.options.capacity_for(&channel);
    if let Err(Error::ChannelFull { channel, .. }) =
        inner.inbox.push(&channel, envelope, capacity, &inner.stats)
    {
        inner.stats.record_dropped_full(&channel);
    }
}

fn deliver_group(
    inner: &Inner,
    sources: &Sources,
    forward: &tokio::sync::mpsc::UnboundedSender<Forward>,
    m: &OwnedMessage,
) {
    let Some(payload) = m.payload() else {
        inner
            .stats
            .record_undecodable(&sources.groups, &"an empty record");
        return;
    };
    let envelope = match Envelope::decode(payload) {
        Ok(e) if e.kind == Destination::Group => e,
        Ok(e) => {
            inner.stats.record_undecodable(
                &sources.groups,
                &format!("a {:?} envelope on the groups topic", e.kind),
            );
            return;
        }
        Err(e) => {
            inner.stats.record_undecodable(&sources.groups, &e);
            return;
        }
    };
    // Route by the envelope's own group (the key is only a filter).
    let group = envelope.destination.clone();
    forward_to(inner, forward, inner.normal_groups.members(&group), payload);
    let local = inner.local_groups.members(&group);
    if !local.is_empty() {
        inner
            .inbox
            .fan_out(&group, envelope, local, &inner.options, &inner.stats);
    }
}

fn forward_to(
    inner: &Inner,
    forward: &tokio::sync::mpsc::UnboundedSender<Forward>,
    members: Vec<std::sync::Arc<str>>,
    payload: &[u8],
) {
    if members.is_empty() {
        return;
    }
    let topics = members
        .iter()
        .map(|m| inner.names.channel_topic(m))
        .collect();
    if forward.send((topics, payload.to_vec())).is_err() {
        for m in &members {
            inner.stats.record_undeliverable(m);
        }
    }
}
