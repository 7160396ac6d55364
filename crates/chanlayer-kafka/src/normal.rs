//! Normal channels: a topic per channel, read through a consumer group per channel, so the
//! instances receiving one channel compete for its partitions.
//!
//! Each instance that receives a normal channel runs one librdkafka consumer for it, on a
//! thread of its own (librdkafka's consumer is a blocking API), started by the first
//! receive. The thread buffers up to `prefetch` messages (above that it takes no more from
//! librdkafka until a receiver makes room) and hands them out through a shared state
//! ([`crate::offsets`]). [`NormalConsumer`] is the channel's [`NormalSource`] in core's
//! contract.
//!
//! Offsets: auto-commit is off. For each partition the state tracks the offsets that are
//! *outstanding* (buffered, handed out and not acked, or nacked); the commit point is the
//! lowest outstanding offset, or the next offset to fetch when none is. The thread commits
//! the commit points every `commit_interval`, synchronously when partitions are revoked
//! (a rebalance) and when the consumer stops. So:
//!
//! - `receive` settles the offset as it returns (auto-ack): committed within
//!   `commit_interval`, or at the next rebalance, before another instance takes the
//!   partition over: with two readers every message arrives exactly once in total.
//! - `receive_delivery` / `receive_batch` settle on `ack`. A `nack`, or a delivery dropped
//!   unsettled, goes back to the head of this instance's buffer in offset order, and holds
//!   the commit point back: if the instance dies or loses the partition, the new owner reads
//!   it again from the broker.
//! - Buffered messages of a revoked partition are dropped from the buffer (the new owner
//!   reads them from the committed offset); an ack that arrives after its partition was
//!   revoked is ignored (the message is redelivered to the new owner: at-least-once).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chanlayer_core::toolkit::{async_trait, lock, Envelope, Incoming, NormalSource};
use chanlayer_core::{Error, Result};
use rdkafka::consumer::{BaseConsumer, Consumer};

use crate::offsets::{Context, Pending, Shared};
use crate::state::Instance;
use crate::topics::backend_err;
use crate::worker::Worker;
use crate::BACKEND;

/// The consumer of one normal channel in this instance.
pub(crate) struct NormalConsumer {
    channel: String,
    /// What its thread and its receivers share (the topic, the buffer, the stop signal).
    pub shared: Arc<Shared>,
    instance: Arc<Instance>,
    thread: Mutex<Option<Worker>>,
    /// Serialises starting the thread.
    starting: tokio::sync::Mutex<bool>,
}

impl NormalConsumer {
    /// The consumer of normal channel `channel` in `instance` (not started). A rebalance
    /// waits up to `session_timeout` for the deliveries in hand from the partitions it takes
    /// away (see [`Shared::new`]).
    pub fn new(instance: &Arc<Instance>, channel: &str) -> Self {
        let topic = instance.names.channel(channel);
        NormalConsumer {
            channel: channel.to_owned(),
            shared: Arc::new(Shared::new(topic, instance.cfg.session_timeout)),
            instance: instance.clone(),
            thread: Mutex::new(None),
            starting: tokio::sync::Mutex::new(false),
        }
    }

    /// Starts the consumer thread once (the topic must exist).
    pub async fn ensure_started(&self) -> Result<()> {
        let mut started = self.starting.lock().await;
        if *started {
            return Ok(());
        }
        let topic = &self.shared.topic;
        let consumer: BaseConsumer<Context> = (self.instance.cfg)
            .consumer_config(&self.instance.client_id, Some(topic))
            .create_with_context(Context(self.shared.clone()))
            .map_err(|e| backend_err("could not create a consumer", e))?;
        consumer
            .subscribe(&[topic])
            .map_err(|e| backend_err(&format!("could not subscribe to {topic:?}"), e))?;
        let (shared, instance) = (self.shared.clone(), self.instance.clone());
        let run = move || crate::offsets::run(consumer, shared, instance);
        let handle = Worker::spawn(format!("chanlayer-kafka {}", self.channel), run)
            .map_err(|e| Error::backend(BACKEND, "could not start a consumer thread", e))?;
        *lock(&self.thread) = Some(handle);
        *started = true;
        Ok(())
    }

    /// Stops the thread (committing what is settled) and waits for it. What is buffered
    /// stays uncommitted at the broker.
    ///
    /// Waits at most `connection_timeout`: with the broker away, librdkafka's final commit
    /// and group leave can take long; the thread then finishes in the background.
    pub async fn stop(&self) {
        self.shared.signal_stop();
        let what = format!("the consumer of {:?}", self.shared.topic);
        let bound = self.instance.cfg.connection_timeout;
        Worker::stop(&self.thread, bound, &what).await;
    }

    /// Waits for the next message. Cancellation-safe: a message leaves the buffer only in
    /// the step that returns it.
    async fn take(&self) -> Result<Pending> {
        let closed = self.instance.inbound.closed();
        loop {
            let notified = self.shared.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            closed.check()?;
            if let Some(p) = self.shared.take_now()? {
                return Ok(p);
            }
            tokio::select! {
                _ = closed.closed() => return Err(Error::Closed),
                _ = &mut notified => {}
            }
        }
    }

    /// `p` as an item whose ack settles the offset and whose nack requeues locally.
    fn incoming(&self, p: Pending) -> Incoming {
        let (envelope, redelivered) = (p.envelope.clone(), p.redelivered);
        let (shared, inbound) = (self.shared.clone(), &self.instance.inbound);
        Incoming::unsettled(envelope, redelivered, shared, p, inbound)
    }
}

#[async_trait]
impl NormalSource for NormalConsumer {
    async fn next(&self) -> Result<Incoming> {
        let p = self.take().await?;
        Ok(self.incoming(p))
    }

    async fn next_batch(&self, max: usize, timeout: Duration) -> Result<Vec<Incoming>> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let Ok(first) = tokio::time::timeout(timeout, self.take()).await else {
            return Ok(Vec::new());
        };
        let mut taken = vec![first?];
        self.shared.take_more(&mut taken, max);
        Ok(taken.into_iter().map(|p| self.incoming(p)).collect())
    }

    /// `receive`'s auto-ack: the offset is settled as the message is taken (committed
    /// within `commit_interval`, or at the next rebalance or stop).
    async fn next_auto(&self) -> Result<Envelope> {
        let p = self.take().await?;
        self.shared.mark_settled(&p);
        Ok(p.envelope)
    }
}
