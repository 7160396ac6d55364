//! [`KafkaLayer`]: the `ChannelLayer` over the topics of [`crate::topics`].

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chanlayer_core::stats::{Stats, StatsSnapshot};
use chanlayer_core::toolkit::lock;
use chanlayer_core::{
    names, Capabilities, ChannelLayer, CloseSignal, Delivery, Destination, Envelope, Error,
    GroupRegistry, LayerConfig, LayerOptions, LocalInbox, Message, Result,
};
use futures::stream::{FuturesUnordered, StreamExt};

use crate::capabilities::{BACKEND, CAPABILITIES};
use crate::config::KafkaConfig;
use crate::normal::NormalConsumer;
use crate::producer::{Refused, Sender};
use crate::receiver::Forward;
use crate::topics::{Kind, Names, Topics};
use crate::worker::Worker;

/// Everything one layer instance shares with its threads and tasks.
pub(crate) struct Inner {
    pub cfg: KafkaConfig,
    pub options: LayerOptions,
    pub id: String,
    /// `client.id` of this instance's librdkafka clients.
    pub client_id: String,
    pub names: Names,
    pub stats: Arc<Stats>,
    pub closed: Arc<CloseSignal>,
    /// Process-local channels of this instance.
    pub inbox: LocalInbox,
    /// Groups with process-local members of this instance.
    pub local_groups: GroupRegistry,
    /// Normal-channel members this instance added (it forwards their group messages).
    pub normal_groups: GroupRegistry,
    topics: Topics,
    sender: Sender,
    consumers: Mutex<HashMap<String, Arc<NormalConsumer>>>,
    receiver: Mutex<Option<Worker>>,
    /// Inbox offsets below this were sent before a `flush`: the receiver drops them.
    pub inbox_skip_below: AtomicI64,
    /// Instances that announced their close: their process-local channels are gone.
    pub closed_instances: ClosedInstances,
}

/// The instances known to have closed (at most [`ClosedInstances::CAP`], oldest forgotten
/// first).
#[derive(Default)]
pub(crate) struct ClosedInstances(Mutex<(HashSet<String>, VecDeque<String>)>);

impl ClosedInstances {
    const CAP: usize = 65_536;

    pub fn insert(&self, id: &str) {
        let mut g = lock(&self.0);
        if g.0.insert(id.to_owned()) {
            g.1.push_back(id.to_owned());
            if g.1.len() > Self::CAP {
                if let Some(old) = g.1.pop_front() {
                    g.0.remove(&old);
                }
            }
        }
    }

    pub fn contains(&self, id: &str) -> bool {
        lock(&self.0).0.contains(id)
    }
}

impl Inner {
    fn consumer(&self, channel: &str) -> Arc<NormalConsumer> {
        if let Some(c) = lock(&self.consumers).get(channel) {
            return c.clone();
        }
        lock(&self.consumers)
            .entry(channel.to_owned())
            .or_insert_with(|| {
                Arc::new(NormalConsumer::new(
                    channel,
                    self.names.channel_topic(channel),
                ))
            })
            .clone()
    }

    /// The started consumer of normal channel `channel` (creating its topic if needed).
    async fn started_consumer(&self, channel: &str) -> Result<Arc<NormalConsumer>> {
        let c = self.consumer(channel);
        self.topics.ensure(c.topic(), Kind::Shared).await?;
        c.ensure_started(&self.cfg, &self.client_id, &self.stats)
            .await?;
        Ok(c)
    }

    fn check_receiver(&self, channel: &str) -> Result<()> {
        self.closed.check()?;
        names::check_receiver(channel, &self.id)
    }

    /// Sends `payload` to the inbox of the instance owning process-local `channel`.
    /// `Ok(false)`: that instance is gone (no inbox topic).
    async fn send_local(&self, channel: &str, payload: &[u8]) -> Result<bool> {
        let Some(owner) = names::owner_instance(channel) else {
            return Ok(false);
        };
        if self.closed_instances.contains(owner) {
            return Ok(false);
        }
        let topic = self.names.inbox_of(owner);
        if !self.topics.is_known(&topic) {
            if !self.topics.exists(&topic).await? {
                return Ok(false);
            }
            self.topics.remember(&topic);
        }
        match self.sender.send(&topic, None, payload).await {
            Ok(()) => Ok(true),
            Err(Refused::UnknownTopic) => {
                self.topics.forget(&topic);
                Ok(false)
            }
            // librdkafka holds a message for a topic that vanished until delivery_timeout;
            // if the inbox is gone, the owner closed: undeliverable, not an error.
            Err(Refused::Failed(e)) => match self.topics.exists(&topic).await {
                Ok(false) => {
                    self.topics.forget(&topic);
                    Ok(false)
                }
                _ => Err(e),
            },
        }
    }

    /// Sends `payload` to the topic of normal channel `channel`, creating it if needed.
    async fn send_normal(&self, channel: &str, payload: &[u8]) -> Result<()> {
        let topic = self.names.channel_topic(channel);
        for attempt in 0..2 {
            self.topics.ensure(&topic, Kind::Shared).await?;
            match self.sender.send(&topic, None, payload).await {
                Ok(()) => return Ok(()),
                // Deleted behind our back: create it again, once.
                Err(Refused::UnknownTopic) if attempt == 0 => self.topics.forget(&topic),
                Err(Refused::UnknownTopic) => {
                    return Err(Error::Backend {
                        backend: BACKEND,
                        message: format!("topic {topic:?} vanished right after it was created"),
                        source: None,
                    })
                }
                Err(Refused::Failed(e)) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Copies group messages to the topics of normal-channel members, in arrival order, with
/// up to 256 copies in flight.
async fn forwarder(inner: Arc<Inner>, mut rx: tokio::sync::mpsc::UnboundedReceiver<Forward>) {
    let mut in_flight = FuturesUnordered::new();
    loop {
        tokio::select! {
            next = rx.recv(), if in_flight.len() < 256 => {
                let Some((topics, payload)) = next else { break };
                for topic in topics {
                    if inner.topics.ensure(&topic, Kind::Shared).await.is_err() {
                        inner.stats.record_undeliverable(&topic);
                        continue;
                    }
                    match inner.sender.enqueue(&topic, None, &payload).await {
                        Ok(f) => {
                            let inner = inner.clone();
                            in_flight.push(async move {
                                if inner.sender.delivered(&topic, f).await.is_err() {
                                    inner.stats.record_undeliverable(&topic);
                                }
                            });
                        }
                        Err(_) => inner.stats.record_undeliverable(&topic),
                    }
                }
            }
            Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
            _ = inner.closed.closed() => break,
        }
    }
}

/// The Kafka channel layer. See the crate docs.
pub struct KafkaLayer {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for KafkaLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaLayer")
            .field("brokers", &self.inner.cfg.display_address())
            .field("instance", &self.inner.id)
            .field("inbox", &self.inner.names.inbox)
            .finish()
    }
}

impl KafkaLayer {
    /// Connects to the cluster `config` names (`kafka://`), creates this instance's inbox
    /// topic (and the groups topic if missing), positions the groups reader at the current
    /// end, and starts the receiver thread. Needs a tokio runtime.
    pub async fn connect(config: &LayerConfig) -> Result<KafkaLayer> {
        let cfg = KafkaConfig::from_layer_config(config)?;
        let id = names::new_instance_id();
        let client_id = format!("chanlayer-{id}");
        let names = Names::new(&config.options.prefix, &cfg.groups_topic, &id);
        let max = config.options.max_message_size;
        let topics = Topics::new(&cfg, &client_id, max)?;
        let sender = Sender::new(&cfg, &client_id, max, topics.cause.clone())?;
        let inner = Arc::new(Inner {
            cfg,
            options: config.options.clone(),
            id,
            client_id,
            names,
            stats: Arc::new(Stats::default()),
            closed: Arc::new(CloseSignal::default()),
            inbox: LocalInbox::new(),
            local_groups: GroupRegistry::new(),
            normal_groups: GroupRegistry::new(),
            topics,
            sender,
            consumers: Mutex::new(HashMap::new()),
            receiver: Mutex::new(None),
            inbox_skip_below: AtomicI64::new(0),
            closed_instances: ClosedInstances::default(),
        });
        // A broker that is not there, or one that refuses our credentials or certificate:
        // the error names what the clients reported (authentication, TLS, no connection).
        let reach = |e: Error| match e {
            Error::Backend {
                message, source, ..
            } => Error::Backend {
                backend: BACKEND,
                message: match inner.topics.cause.last() {
                    Some(cause) => format!("{message} on {}: {cause}", inner.cfg.display_address()),
                    None => format!(
                        "{message} (is a Kafka broker running at {}?)",
                        inner.cfg.display_address()
                    ),
                },
                source,
            },
            e => e,
        };
        let refused = |cause: String| Error::Backend {
            backend: BACKEND,
            message: format!(
                "could not connect to {}: {cause}",
                inner.cfg.display_address()
            ),
            source: None,
        };
        // The first request fails at once when authentication or TLS does.
        tokio::select! {
            r = inner.topics.ensure(&inner.names.groups, Kind::Shared) => r.map_err(reach)?,
            cause = inner.topics.cause.fatal() => return Err(refused(cause)),
        }
        inner
            .topics
            .ensure(&inner.names.inbox, Kind::Inbox)
            .await
            .map_err(reach)?;
        let partitions = inner
            .topics
            .partition_count(&inner.names.groups)
            .await
            .map_err(reach)?
            .ok_or_else(|| Error::Backend {
                backend: BACKEND,
                message: format!(
                    "the groups topic {:?} is not in the cluster's metadata",
                    inner.names.groups
                ),
                source: None,
            })?;
        let consumer = {
            let inner = inner.clone();
            tokio::task::spawn_blocking(move || crate::receiver::assign(&inner, partitions))
                .await
                .map_err(|e| Error::backend(BACKEND, "the connect task failed", e))??
        };
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let thread = {
            let inner = inner.clone();
            Worker::spawn("chanlayer-kafka receiver".into(), move || {
                crate::receiver::run(inner, consumer, tx)
            })
            .map_err(|e| Error::backend(BACKEND, "could not start the receiver thread", e))?
        };
        *lock(&inner.receiver) = Some(thread);
        tokio::spawn(forwarder(inner.clone(), rx));
        Ok(KafkaLayer { inner })
    }

    /// `true` once this instance has read the close notice of instance `id` (a diagnostic:
    /// from then on, sends to `id`'s process-local channels are counted undeliverable
    /// without reaching the broker).
    pub fn knows_closed(&self, id: &str) -> bool {
        self.inner.closed_instances.contains(id)
    }

    /// This instance's inbox topic.
    pub fn inbox_topic(&self) -> &str {
        &self.inner.names.inbox
    }

    /// The topic of normal channel `channel`.
    pub fn channel_topic(&self, channel: &str) -> String {
        self.inner.names.channel_topic(channel)
    }

    /// The groups topic.
    pub fn groups_topic(&self) -> &str {
        &self.inner.names.groups
    }

    /// Produces raw bytes (not an envelope) to `topic`, creating it if needed: for tests of
    /// what receivers do with garbage, and for poking a cluster by hand.
    pub async fn produce_raw(&self, topic: &str, key: Option<&[u8]>, bytes: &[u8]) -> Result<()> {
        let inner = &self.inner;
        inner.closed.check()?;
        let kind = if topic == inner.names.inbox {
            Kind::Inbox
        } else {
            Kind::Shared
        };
        inner.topics.ensure(topic, kind).await?;
        inner
            .sender
            .send(topic, key, bytes)
            .await
            .map_err(|r| match r {
                Refused::UnknownTopic => Error::Backend {
                    backend: BACKEND,
                    message: format!("no topic {topic:?}"),
                    source: None,
                },
                Refused::Failed(e) => e,
            })
    }

    /// Closes once: stops the threads, commits, deletes the inbox topic.
    async fn shut_down(&self) -> Result<()> {
        let inner = &self.inner;
        if !inner.closed.close() {
            return Ok(());
        }
        let consumers: Vec<Arc<NormalConsumer>> =
            lock(&inner.consumers).drain().map(|(_, c)| c).collect();
        for c in consumers {
            c.stop(inner.cfg.connection_timeout).await;
        }
        let bound = inner.cfg.connection_timeout;
        let receiver = lock(&inner.receiver).take();
        if let Some(h) = receiver {
            if !h.join_within(bound).await {
                tracing::warn!("the receiver thread did not stop within {bound:?}; it finishes in the background");
            }
        }
        inner.inbox.clear();
        // Tell the other instances (they read the groups topic) that our process-local
        // channels are gone, so their sends stop at once instead of reaching a dead topic.
        // Bounded: with the broker away, nobody would read it anyway.
        let announce = inner.sender.send(
            &inner.names.groups,
            Some(crate::receiver::CLOSED_KEY),
            inner.id.as_bytes(),
        );
        match tokio::time::timeout(bound, announce).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(error = ?e, "could not announce the close"),
            Err(_) => tracing::debug!("the close announcement timed out (broker away?)"),
        }
        // Copies the forwarder has in flight get their chance to land.
        let flushing = inner.clone();
        let _ = tokio::task::spawn_blocking(move || flushing.sender.flush(bound)).await;
        // Best effort: a broker that is away keeps the topic until it expires by retention
        // (or `remove_inboxes` removes it); `close` still succeeds.
        let inbox = inner.names.inbox.clone();
        match tokio::time::timeout(bound, inner.topics.delete(&[inbox.as_str()])).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(topic = %inbox, error = %e, "could not delete the inbox topic on close")
            }
            Err(_) => {
                tracing::warn!(topic = %inbox, "deleting the inbox topic timed out (broker away?)")
            }
        }
        Ok(())
    }
}

impl Drop for KafkaLayer {
    fn drop(&mut self) {
        let inner = &self.inner;
        if !inner.closed.close() {
            return;
        }
        // The threads see the close signal and end; the inbox topic goes in the background
        // if a runtime is there (otherwise it expires by retention).
        for c in lock(&inner.consumers).values() {
            c.signal_stop();
        }
        inner.inbox.clear();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let inner = inner.clone();
            rt.spawn(async move {
                let inbox = inner.names.inbox.clone();
                if let Err(e) = inner.topics.delete(&[inbox.as_str()]).await {
                    tracing::debug!(error = %e, "could not delete the inbox topic on drop");
                }
            });
        }
    }
}

/// The operations; the trait impl maps their errors with `CloseSignal::closed_wins`.
impl KafkaLayer {
    async fn send_op(&self, channel: &str, message: Message) -> Result<()> {
        let inner = &self.inner;
        inner.closed.check()?;
        names::validate_channel(channel)?;
        let payload =
            Envelope::seal_encoded(Destination::Channel, channel, message, &inner.options)?;
        if names::is_process_local(channel) {
            if !inner.send_local(channel, &payload).await? {
                inner.stats.record_undeliverable(channel);
                return Ok(());
            }
        } else {
            inner.send_normal(channel, &payload).await?;
        }
        inner.stats.record_sent(1);
        Ok(())
    }

    async fn receive_op(&self, channel: &str) -> Result<Message> {
        let inner = &self.inner;
        inner.check_receiver(channel)?;
        let env = if names::is_process_local(channel) {
            inner
                .inbox
                .take(channel, &inner.stats, &inner.closed)
                .await?
                .envelope
        } else {
            let c = inner.started_consumer(channel).await?;
            let p = c.take(&inner.closed).await?;
            c.auto_ack(p)
        };
        inner.stats.record_received(1);
        Ok(env.into_message())
    }

    async fn receive_delivery_op(&self, channel: &str) -> Result<Delivery> {
        let inner = &self.inner;
        inner.check_receiver(channel)?;
        let d = if names::is_process_local(channel) {
            inner
                .inbox
                .take_settled(channel, &inner.stats, &inner.closed)
                .await?
        } else {
            let c = inner.started_consumer(channel).await?;
            let p = c.take(&inner.closed).await?;
            c.delivery(p, inner.stats.clone(), inner.closed.clone())
        };
        inner.stats.record_received(1);
        Ok(d)
    }

    async fn receive_batch_op(
        &self,
        channel: &str,
        max: usize,
        timeout: Duration,
    ) -> Result<Vec<Delivery>> {
        let inner = &self.inner;
        inner.check_receiver(channel)?;
        let out: Vec<Delivery> = if names::is_process_local(channel) {
            inner
                .inbox
                .take_batch_settled(channel, max, timeout, &inner.stats, &inner.closed)
                .await?
        } else {
            let c = inner.started_consumer(channel).await?;
            c.take_batch(&inner.closed, max, timeout)
                .await?
                .into_iter()
                .map(|p| c.delivery(p, inner.stats.clone(), inner.closed.clone()))
                .collect()
        };
        inner.stats.record_received(out.len() as u64);
        Ok(out)
    }

    async fn group_add_op(&self, group: &str, channel: &str) -> Result<()> {
        let inner = &self.inner;
        inner.closed.check()?;
        names::validate_group(group)?;
        names::validate_channel(channel)?;
        let expiry = inner.options.group_expiry;
        if names::is_process_local(channel) {
            // Memberships live where the messages arrive: only the owner can add its channel.
            if names::owner_instance(channel) != Some(inner.id.as_str()) {
                return Err(Error::NotOwner {
                    channel: channel.to_owned(),
                });
            }
            inner.local_groups.add(group, channel, expiry);
        } else {
            inner
                .topics
                .ensure(&inner.names.channel_topic(channel), Kind::Shared)
                .await?;
            inner.normal_groups.add(group, channel, expiry);
        }
        Ok(())
    }

    async fn group_discard_op(&self, group: &str, channel: &str) -> Result<()> {
        let inner = &self.inner;
        inner.closed.check()?;
        names::validate_group(group)?;
        names::validate_channel(channel)?;
        if names::is_process_local(channel) {
            inner.local_groups.discard(group, channel);
        } else {
            inner.normal_groups.discard(group, channel);
        }
        Ok(())
    }

    async fn group_send_op(&self, group: &str, message: Message) -> Result<()> {
        let inner = &self.inner;
        inner.closed.check()?;
        names::validate_group(group)?;
        let payload = Envelope::seal_encoded(Destination::Group, group, message, &inner.options)?;
        inner
            .sender
            .send(&inner.names.groups, Some(group.as_bytes()), &payload)
            .await
            .map_err(|r| match r {
                Refused::UnknownTopic => Error::Backend {
                    backend: BACKEND,
                    message: format!(
                        "the groups topic {:?} is gone (deleted while the layer runs?)",
                        inner.names.groups
                    ),
                    source: None,
                },
                Refused::Failed(e) => e,
            })?;
        inner.stats.record_sent(1);
        Ok(())
    }

    async fn flush_op(&self) -> Result<()> {
        let inner = &self.inner;
        inner.closed.check()?;
        inner.local_groups.clear();
        inner.normal_groups.clear();
        // Normal channels: stop this instance's consumers and move each channel's consumer
        // group to the end of its topic.
        let consumers: Vec<Arc<NormalConsumer>> =
            lock(&inner.consumers).drain().map(|(_, c)| c).collect();
        for c in &consumers {
            c.stop(inner.cfg.connection_timeout).await;
        }
        let topics: Vec<String> = inner
            .topics
            .known_with(&format!("{}.channel.", inner.options.prefix));
        for topic in topics {
            let cfg = inner.cfg.clone();
            let client_id = inner.client_id.clone();
            tokio::task::spawn_blocking(move || {
                crate::topics::skip_to_end(&cfg, &client_id, &topic)
            })
            .await
            .map_err(|e| Error::backend(BACKEND, "the flush task failed", e))??;
        }
        // Process-local channels: what is still on the way in the inbox topic goes too.
        let end = inner.topics.high_watermark(&inner.names.inbox, 0).await?;
        inner.inbox_skip_below.fetch_max(end, Ordering::AcqRel);
        inner.inbox.clear();
        Ok(())
    }
}

#[async_trait]
impl ChannelLayer for KafkaLayer {
    fn capabilities(&self) -> Capabilities {
        CAPABILITIES
    }

    fn options(&self) -> &LayerOptions {
        &self.inner.options
    }

    fn instance_id(&self) -> &str {
        &self.inner.id
    }

    fn stats(&self) -> StatsSnapshot {
        self.inner.stats.snapshot()
    }

    async fn send(&self, channel: &str, message: Message) -> Result<()> {
        self.inner
            .closed
            .closed_wins(self.send_op(channel, message).await)
    }

    async fn receive(&self, channel: &str) -> Result<Message> {
        self.inner
            .closed
            .closed_wins(self.receive_op(channel).await)
    }

    async fn receive_delivery(&self, channel: &str) -> Result<Delivery> {
        self.inner
            .closed
            .closed_wins(self.receive_delivery_op(channel).await)
    }

    async fn receive_batch(
        &self,
        channel: &str,
        max: usize,
        timeout: Duration,
    ) -> Result<Vec<Delivery>> {
        self.inner
            .closed
            .closed_wins(self.receive_batch_op(channel, max, timeout).await)
    }

    async fn new_channel(&self, prefix: &str) -> Result<String> {
        self.inner.closed.check()?;
        names::new_channel_name(prefix, &self.inner.id)
    }

    async fn group_add(&self, group: &str, channel: &str) -> Result<()> {
        self.inner
            .closed
            .closed_wins(self.group_add_op(group, channel).await)
    }

    async fn group_discard(&self, group: &str, channel: &str) -> Result<()> {
        self.inner
            .closed
            .closed_wins(self.group_discard_op(group, channel).await)
    }

    async fn group_send(&self, group: &str, message: Message) -> Result<()> {
        self.inner
            .closed
            .closed_wins(self.group_send_op(group, message).await)
    }

    async fn flush(&self) -> Result<()> {
        self.inner.closed.closed_wins(self.flush_op().await)
    }

    async fn close(&self) -> Result<()> {
        self.shut_down().await
    }
}
