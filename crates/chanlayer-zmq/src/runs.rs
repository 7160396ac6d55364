//! A publisher's runs: consecutive data messages of one topic (and one origin) that it
//! publishes as one batch frame (see [`crate::wire`]). The embedded publisher adds the
//! messages it takes from its queue, the proxy the ones it reads from its PULL socket; each
//! flushes before anything else (a mark, raw frames) and at the end of what it took, so the
//! order on the wire is the order they came in and nothing waits for a batch to fill.

use crate::hub::Hub;
use crate::wire;

/// A message body handed to the hub: owned bytes, or a frame received from the proxy's
/// PULL socket (forwarded without a copy when it is not retained).
pub(crate) enum Payload {
    Bytes(Vec<u8>),
    Frame(zmq::Message),
}

impl Payload {
    pub fn as_slice(&self) -> &[u8] {
        match self {
            Payload::Bytes(b) => b,
            Payload::Frame(m) => m,
        }
    }

    pub fn into_message(self) -> zmq::Message {
        match self {
            Payload::Bytes(b) => zmq::Message::from(b),
            Payload::Frame(m) => m,
        }
    }
}

/// Where a message comes from, as the sender gave it (dedicated mode): its origin id and
/// its number on the topic. `None` for the embedded publisher's own messages.
pub(crate) type From = Option<(u64, u64)>;

/// Consecutive data messages of one topic on their way to [`Hub::publish_batch`].
#[derive(Default)]
pub(crate) struct Batch {
    topic: Vec<u8>,
    body: Vec<u8>,
    count: u64,
    /// The origin of the first message: every message of a run has the same origin and the
    /// next number (a batch frame carries one origin stamp).
    from: From,
    /// The first message, kept whole: a batch of one is published as a plain data message.
    first: Option<Payload>,
}

impl Batch {
    /// Adds a message for `topic`, publishing what is batched first when the topic or the
    /// origin changes or the batch is full. A message over [`wire::BATCH_ITEM_MAX`] is
    /// published alone.
    pub fn add(&mut self, hub: &mut Hub, topic: &[u8], from: From, payload: Payload) {
        let len = payload.as_slice().len();
        if len > wire::BATCH_ITEM_MAX {
            self.flush(hub);
            hub.publish(topic, from, payload);
            return;
        }
        let follows = match (self.from, from) {
            (None, None) => true,
            (Some((id, first)), Some((next_id, next))) => {
                id == next_id && first.checked_add(self.count) == Some(next)
            }
            _ => false,
        };
        let batched = self.body.len() + self.first.as_ref().map_or(0, |f| 4 + f.as_slice().len());
        if self.count > 0
            && (self.topic != topic || !follows || batched + 4 + len > wire::BATCH_MAX_BYTES)
        {
            self.flush(hub);
        }
        if self.count == 0 {
            self.topic.clear();
            self.topic.extend_from_slice(topic);
            self.from = from;
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
            (_, Some(first)) => hub.publish(&self.topic, self.from, first),
            (n, None) => {
                let body = std::mem::take(&mut self.body);
                hub.publish_batch(&self.topic, n, body, self.from);
            }
        }
        self.count = 0;
        self.body.clear();
    }
}
