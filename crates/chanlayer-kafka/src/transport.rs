//! [`KafkaTransport`]: core's [`Transport`] over the topics of [`crate::topics`]; core's
//! `TransportLayer` makes it a `ChannelLayer` ([`crate::KafkaLayer`]).
//!
//! What is Kafka's here: opening the clients and this instance's inbox topic, producing to
//! inboxes, channel topics and the groups topic, starting the receiver thread
//! ([`crate::receiver`]) and the forwarder of group messages to normal-channel members
//! ([`crate::forward`]), one [`NormalConsumer`] per normal channel this instance reads,
//! flush (consumer groups to the end, the inbox skipped up to its end), and close (the
//! close announcement, deleting the inbox topic). Groups need no binding: every instance
//! reads the whole groups topic and its receiver keeps what has members here.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use chanlayer_core::config::BackendSettings;
use chanlayer_core::toolkit::{
    fmt_transport, lock, Inbound, NormalReader, Outgoing, Published, Transport,
};
use chanlayer_core::{Capabilities, Error, LayerConfig, Result};

use crate::config::KafkaConfig;
use crate::normal::NormalConsumer;
use crate::producer::{Refused, Sender};
use crate::state::{ClosedInstances, Instance, CLOSED_KEY};
use crate::topics::{Names, Topics};
use crate::worker::Worker;
use crate::{BACKEND, CAPABILITIES};

/// The Kafka transport: one layer instance's clients, topics, threads and tasks. Use it as
/// [`KafkaLayer`](crate::KafkaLayer); the methods here are what only Kafka has (the layer
/// dereferences to them).
pub struct KafkaTransport {
    instance: Arc<Instance>,
    consumers: Mutex<HashMap<String, Arc<NormalConsumer>>>,
    receiver: Mutex<Option<Worker>>,
}

impl std::fmt::Debug for KafkaTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        fmt_transport(self, "KafkaTransport", f)
    }
}

impl KafkaTransport {
    /// `true` once this instance has read the close notice of instance `id` (a diagnostic:
    /// from then on, sends to `id`'s process-local channels are counted undeliverable
    /// without reaching the broker).
    pub fn knows_closed(&self, id: &str) -> bool {
        self.instance.closed_instances.contains(id)
    }

    /// This instance's inbox topic.
    pub fn inbox_topic(&self) -> &str {
        &self.instance.names.inbox
    }

    /// The topic of normal channel `channel`.
    pub fn channel_topic(&self, channel: &str) -> String {
        self.instance.names.channel(channel)
    }

    /// The groups topic.
    pub fn groups_topic(&self) -> &str {
        &self.instance.names.groups
    }

    /// Produces raw bytes (not an envelope) to `topic`, creating it if needed: for tests of
    /// what receivers do with garbage, and for poking a cluster by hand.
    pub async fn produce_raw(&self, topic: &str, key: Option<&[u8]>, bytes: &[u8]) -> Result<()> {
        let instance = &self.instance;
        instance.inbound.closed().check()?;
        instance.topics.ensure(topic).await?;
        let sent = instance.sender.send(topic, key, bytes).await;
        sent.map_err(|r| r.or_gone(|| format!("no topic {topic:?}")))
    }

    fn consumer(&self, channel: &str) -> Arc<NormalConsumer> {
        if let Some(c) = lock(&self.consumers).get(channel) {
            return c.clone();
        }
        lock(&self.consumers)
            .entry(channel.to_owned())
            .or_insert_with(|| Arc::new(NormalConsumer::new(&self.instance, channel)))
            .clone()
    }

    /// Stops this instance's normal-channel consumers (committing what is settled) and
    /// forgets them.
    async fn stop_consumers(&self) {
        let consumers = std::mem::take(&mut *lock(&self.consumers));
        for c in consumers.into_values() {
            c.stop().await;
        }
    }
}

impl Transport for KafkaTransport {
    /// Connects the clients, makes sure the groups topic exists and creates this instance's
    /// inbox topic, then starts the receiver thread (groups topic read from its current end)
    /// and the forwarder task.
    async fn open(config: &LayerConfig, inbound: Arc<Inbound>) -> Result<Self> {
        let cfg = KafkaConfig::from_layer_config(config)?;
        let client_id = format!("chanlayer-{}", inbound.id());
        let names = Names::new(&config.options.prefix, &cfg.groups_topic, inbound.id());
        let max = config.options.max_message_size;
        let topics = Topics::new(&cfg, &client_id, max, &names.inbox)?;
        let sender = Sender::new(&cfg, &client_id, max, topics.cause.clone())?;
        let instance = Arc::new(Instance {
            cfg,
            client_id,
            names,
            inbound,
            topics,
            sender,
            inbox_skip_below: AtomicI64::new(0),
            closed_instances: ClosedInstances::default(),
        });
        // A broker that is not there, or one that refuses our credentials or certificate:
        // the error names what the clients reported (authentication, TLS, no connection).
        let at = instance.cfg.display_address();
        let reach = |mut e: Error| {
            if let Error::Backend { message, .. } = &mut e {
                *message = match instance.topics.cause.last() {
                    Some(cause) => format!("{message} on {at}: {cause}"),
                    None => format!("{message} (is a Kafka broker running at {at}?)"),
                };
            }
            e
        };
        let (topics, names) = (&instance.topics, &instance.names);
        // The first request fails at once when authentication or TLS does.
        tokio::select! {
            r = topics.ensure(&names.groups) => r.map_err(reach)?,
            cause = topics.cause.fatal() => {
                let m = format!("could not connect to {at}: {cause}");
                return Err(Error::failure(BACKEND, m));
            }
        }
        topics.ensure(&names.inbox).await.map_err(reach)?;
        let groups = &names.groups;
        // A topic just created can take a moment to show in the metadata a broker answers
        // with: poll, up to connection_timeout.
        let waited = instance.cfg.connection_timeout;
        let deadline = std::time::Instant::now() + waited;
        let partitions = loop {
            match topics.partition_count(groups).await.map_err(reach)? {
                Some(n) => break n,
                None if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                None => {
                    let m = format!("the groups topic {groups:?} is not in the cluster's metadata (waited {waited:?})");
                    return Err(Error::failure(BACKEND, m));
                }
            }
        };
        let consumer = {
            let instance = instance.clone();
            tokio::task::spawn_blocking(move || crate::receiver::assign(&instance, partitions))
                .await
                .map_err(|e| Error::backend(BACKEND, "the connect task failed", e))??
        };
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let thread = {
            let instance = instance.clone();
            let run = move || crate::receiver::run(instance, consumer, tx);
            Worker::spawn("chanlayer-kafka receiver".into(), run)
                .map_err(|e| Error::backend(BACKEND, "could not start the receiver thread", e))?
        };
        tokio::spawn(crate::forward::run(instance.clone(), rx));
        Ok(KafkaTransport {
            instance,
            consumers: Mutex::new(HashMap::new()),
            receiver: Mutex::new(Some(thread)),
        })
    }

    fn capabilities(&self) -> Capabilities {
        CAPABILITIES
    }

    /// Sends to the inbox of instance `owner`. `Gone`: that instance is gone (it announced
    /// its close, or it has no inbox topic).
    async fn publish_local(&self, owner: &str, out: Outgoing<'_>) -> Result<Published> {
        let instance = &self.instance;
        if instance.closed_instances.contains(owner) {
            return Ok(Published::Gone);
        }
        let topic = instance.names.inbox_of(owner);
        if !instance.topics.is_known(&topic) {
            if !instance.topics.exists(&topic).await? {
                return Ok(Published::Gone);
            }
            instance.topics.remember(&topic);
        }
        match instance.sender.send(&topic, None, &out.encode()).await {
            Ok(()) => return Ok(Published::Stored),
            Err(Refused::UnknownTopic) => {}
            // librdkafka holds a message for a topic that vanished until delivery_timeout;
            // if the inbox is gone, the owner closed: undeliverable, not an error.
            Err(Refused::Failed(e)) => {
                if !matches!(instance.topics.exists(&topic).await, Ok(false)) {
                    return Err(e);
                }
            }
        }
        instance.topics.forget(&topic);
        Ok(Published::Gone)
    }

    /// Sends to the topic of normal channel `out.destination()`, creating it if needed.
    async fn publish_normal(&self, out: Outgoing<'_>) -> Result<Published> {
        let instance = &self.instance;
        let (topic, payload) = (instance.names.channel(out.destination()), out.encode());
        for attempt in 0..2 {
            instance.topics.ensure(&topic).await?;
            match instance.sender.send(&topic, None, &payload).await {
                Ok(()) => break,
                // Deleted behind our back: create it again, once.
                Err(Refused::UnknownTopic) if attempt == 0 => instance.topics.forget(&topic),
                Err(r) => {
                    return Err(r.or_gone(|| {
                        format!("topic {topic:?} vanished right after it was created")
                    }))
                }
            }
        }
        Ok(Published::Stored)
    }

    async fn publish_group(&self, out: Outgoing<'_>) -> Result<Published> {
        let groups = &self.instance.names.groups;
        let gone =
            || format!("the groups topic {groups:?} is gone (deleted while the layer runs?)");
        let key = Some(out.destination().as_bytes());
        let sent = self.instance.sender.send(groups, key, &out.encode()).await;
        sent.map_err(|r| r.or_gone(gone))?;
        Ok(Published::Stored)
    }

    /// Nothing to do: every instance reads the whole groups topic, and the receiver keeps
    /// the messages of groups with members here (`Inbound::groups`).
    async fn bind_group(&self, _group: &str) -> Result<()> {
        Ok(())
    }

    /// Nothing to do (see [`bind_group`](Self::bind_group)).
    async fn unbind_group(&self, _group: &str) -> Result<()> {
        Ok(())
    }

    /// Makes sure the channel's topic exists; the receiver forwards the group's messages to
    /// it while the membership lasts (`Inbound::normal_groups`).
    async fn bind_normal(&self, _group: &str, channel: &str) -> Result<()> {
        let topic = self.instance.names.channel(channel);
        self.instance.topics.ensure(&topic).await
    }

    /// Nothing to do: the forwarder stops with the membership.
    async fn unbind_normal(&self, _group: &str, _channel: &str) -> Result<()> {
        Ok(())
    }

    /// The channel's consumer, started (and its topic created) the first time.
    async fn normal_reader(&self, channel: &str) -> Result<NormalReader> {
        let c = self.consumer(channel);
        self.instance.topics.ensure(&c.shared.topic).await?;
        c.ensure_started().await?;
        Ok(NormalReader::Source(c))
    }

    /// Normal channels: stops this instance's consumers and moves each channel's consumer
    /// group to the end of its topic. Process-local channels: what is still on the way in
    /// the inbox topic is skipped by the receiver.
    async fn flush(&self) -> Result<()> {
        let (instance, topics) = (&self.instance, &self.instance.topics);
        self.stop_consumers().await;
        let head = instance.names.channel("");
        for topic in topics.known_with(&head) {
            let partitions = topics.partition_count(&topic).await?.unwrap_or(0);
            let (cfg, client_id) = (instance.cfg.clone(), instance.client_id.clone());
            let skip = move || crate::topics::skip_to_end(&cfg, &client_id, &topic, partitions);
            tokio::task::spawn_blocking(skip)
                .await
                .map_err(|e| Error::backend(BACKEND, "the flush task failed", e))??;
        }
        let end = topics.high_watermark(&instance.names.inbox, 0).await?;
        instance.inbox_skip_below.fetch_max(end, Ordering::AcqRel);
        Ok(())
    }

    /// Stops the threads, announces the close on the groups topic, lets the copies in
    /// flight land, and deletes the inbox topic. Each step is bounded by
    /// `connection_timeout`; with the broker away, `close` still succeeds.
    async fn close(&self) -> Result<()> {
        let instance = &self.instance;
        let bound = instance.cfg.connection_timeout;
        self.stop_consumers().await;
        Worker::stop(&self.receiver, bound, "the receiver thread").await;
        // Tell the other instances (they read the groups topic) that our process-local
        // channels are gone, so their sends stop at once instead of reaching a dead topic.
        // Bounded: with the broker away, nobody would read it anyway.
        let id = instance.inbound.id().as_bytes();
        let announce = instance
            .sender
            .send(&instance.names.groups, Some(CLOSED_KEY), id);
        match tokio::time::timeout(bound, announce).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(error = ?e, "could not announce the close"),
            Err(_) => tracing::debug!("the close announcement timed out (broker away?)"),
        }
        // Copies the forwarder has in flight get their chance to land.
        let flushing = instance.clone();
        let _ = tokio::task::spawn_blocking(move || flushing.sender.flush(bound)).await;
        // Best effort: a broker that is away keeps the topic until it expires by retention
        // (or `remove_inboxes` removes it); `close` still succeeds.
        let inbox = instance.names.inbox.as_str();
        match tokio::time::timeout(bound, instance.topics.delete(&[inbox])).await {
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

    /// The brokers and the inbox topic.
    fn debug_fields(&self, f: &mut std::fmt::DebugStruct<'_, '_>) {
        f.field("brokers", &self.instance.cfg.display_address())
            .field("inbox", &self.instance.names.inbox);
    }

    /// The threads see the close signal and end; the inbox topic goes in the background if
    /// a runtime is there (otherwise it expires by retention).
    fn abandon(&self) {
        for c in lock(&self.consumers).values() {
            // Stops without waiting (a layer dropped without `close`).
            c.shared.signal_stop();
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let instance = self.instance.clone();
            rt.spawn(async move {
                let inbox = instance.names.inbox.as_str();
                if let Err(e) = instance.topics.delete(&[inbox]).await {
                    tracing::debug!(error = %e, "could not delete the inbox topic on drop");
                }
            });
        }
    }
}
