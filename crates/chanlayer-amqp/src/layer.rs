//! [`AmqpLayer`]: the [`ChannelLayer`] on an AMQP 0-9-1 broker.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chanlayer_core::{
    names, Capabilities, ChannelLayer, CloseSignal, Delivery, Destination, Envelope, Error,
    GroupRegistry, LayerConfig, LayerOptions, LocalInbox, Message, Result, Stats, StatsSnapshot,
};
use lapin::options::{BasicPublishOptions, QueueDeclareOptions, QueuePurgeOptions};
use lapin::tcp::OwnedTLSConfig;
use lapin::types::ShortString;
use lapin::{BasicProperties, Confirmation};
use tokio::sync::watch;

use crate::config::AmqpConfig;
use crate::normal::NormalConsumer;
use crate::session::{self, backend, is_connection_error, lock, Session};
use crate::topology::{self, Names};
use crate::{BACKEND, CAPABILITIES};

/// Everything one layer instance shares with its background tasks.
pub(crate) struct Inner {
    pub cfg: AmqpConfig,
    pub options: LayerOptions,
    pub id: String,
    pub names: Names,
    pub tls: OwnedTLSConfig,
    pub stats: Arc<Stats>,
    pub closed: Arc<CloseSignal>,
    /// Process-local channels of this instance.
    pub inbox: LocalInbox,
    /// Groups with process-local members of this instance.
    pub local_groups: GroupRegistry,
    /// Normal-channel group memberships this instance added (for expiry).
    pub normal_groups: GroupRegistry,
    /// (group, channel) bindings of normal-channel queues this instance made.
    pub normal_bound: Mutex<HashSet<(String, String)>>,
    /// Serialises binding changes, so a first-member bind and a last-member unbind of one
    /// group cannot cross.
    pub bindings: tokio::sync::Mutex<()>,
    /// The live session; `None` while reconnecting.
    session: watch::Sender<Option<Arc<Session>>>,
    /// Normal-channel queues declared on the session of the given generation.
    declared: Mutex<(u64, HashSet<String>)>,
    /// Serialises operations on the admin channel: a refused one (a passive declare of a
    /// missing queue) closes the channel and would fail every other one in flight on it.
    pub admin_ops: tokio::sync::Mutex<()>,
    /// Every normal-channel queue this instance has used (what `flush` purges).
    known_queues: Mutex<HashSet<String>>,
    consumers: Mutex<HashMap<String, Arc<NormalConsumer>>>,
    reconnects: AtomicU64,
    /// Message properties, computed once: transient (process-local channels).
    transient: BasicProperties,
    /// Message properties, computed once: persistent (normal channels and groups).
    persistent: BasicProperties,
}

impl Inner {
    pub fn set_session(&self, s: Option<Arc<Session>>) {
        if s.is_some() {
            lock(&self.declared).1.clear();
        }
        self.session.send_replace(s);
    }

    pub fn record_reconnect(&self) {
        self.reconnects.fetch_add(1, Ordering::Relaxed);
    }

    /// The live session, waiting up to `reconnect_timeout` while the broker is away.
    pub async fn session(&self) -> Result<Arc<Session>> {
        self.session_where(|_| true).await
    }

    /// A session newer than `generation` (after an operation saw that one fail).
    pub async fn session_after(&self, generation: u64) -> Result<Arc<Session>> {
        self.session_where(|s| s.generation > generation).await
    }

    async fn session_where(&self, ok: impl Fn(&Session) -> bool) -> Result<Arc<Session>> {
        self.closed.check()?;
        // Fast path, every operation's: the session is up; no subscription, no timer.
        if let Some(s) = self.session.borrow().as_ref() {
            if ok(s) {
                return Ok(s.clone());
            }
        }
        let mut rx = self.session.subscribe();
        let wait = async {
            loop {
                if let Some(s) = rx.borrow_and_update().as_ref() {
                    if ok(s) {
                        return Ok(s.clone());
                    }
                }
                tokio::select! {
                    _ = self.closed.closed() => return Err(Error::Closed),
                    r = rx.changed() => if r.is_err() { return Err(Error::Closed) },
                }
            }
        };
        match tokio::time::timeout(self.cfg.reconnect_timeout, wait).await {
            Ok(r) => r,
            Err(_) => Err(Error::Backend {
                backend: BACKEND,
                message: format!(
                    "the broker at {} has been unreachable for {:?} (reconnect_timeout); chanlayer keeps reconnecting in the background",
                    self.cfg.display_address(),
                    self.cfg.reconnect_timeout
                ),
                source: None,
            }),
        }
    }

    /// Declares the durable queue of normal channel `channel` once per session.
    pub async fn declare_channel_queue(&self, session: &Session, channel: &str) -> Result<()> {
        let queue = self.names.channel_queue(channel);
        let cached = || {
            let d = lock(&self.declared);
            d.0 == session.generation && d.1.contains(&queue)
        };
        if cached() {
            return Ok(());
        }
        // One declaration at a time: a refused passive check closes the admin channel, which
        // would fail every other declaration in flight on it.
        let _one = self.admin_ops.lock().await;
        if cached() {
            return Ok(());
        }
        let capacity = self.options.capacity_for(channel);
        let q = queue.as_str();
        let declare = |passive: bool| async move {
            session
                .admin()
                .await?
                .queue_declare(
                    ShortString::from(q),
                    QueueDeclareOptions {
                        durable: true,
                        passive,
                        ..QueueDeclareOptions::default()
                    },
                    topology::channel_arguments(capacity, self.cfg.queue_expires),
                )
                .await
                .map(|_| ())
                .map_err(|e| backend(&format!("could not declare queue {q:?}"), e))
        };
        // A queue that exists is used as it is: its capacity is the one it was created with
        // (RabbitMQ refuses to redeclare a queue with other arguments). A missing one is
        // created with this layer's capacity; if another instance created it in between, the
        // passive check then finds it. A refused declaration closes the admin channel; the
        // next admin() opens a new one.
        if declare(true).await.is_err() && declare(false).await.is_err() {
            declare(true).await?;
        }
        let mut d = lock(&self.declared);
        if d.0 != session.generation {
            *d = (session.generation, HashSet::new());
        }
        d.1.insert(queue.clone());
        drop(d);
        lock(&self.known_queues).insert(queue);
        Ok(())
    }

    fn consumer(&self, channel: &str) -> Arc<NormalConsumer> {
        lock(&self.consumers)
            .entry(channel.to_owned())
            .or_insert_with(|| {
                Arc::new(NormalConsumer::new(
                    channel,
                    self.names.channel_queue(channel),
                ))
            })
            .clone()
    }

    /// Publishes one encoded envelope and waits for the broker's confirm. Across a lost
    /// connection it publishes again on the next one (bounded by `reconnect_timeout`): an
    /// `Ok` means the broker confirmed it; a retried message may arrive twice.
    async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        payload: &[u8],
        properties: BasicProperties,
        mandatory: bool,
    ) -> Result<Confirmation> {
        let mut session = self.session().await?;
        loop {
            let attempt = async {
                session
                    .publish
                    .basic_publish(
                        ShortString::from(exchange),
                        ShortString::from(routing_key),
                        BasicPublishOptions {
                            mandatory,
                            ..BasicPublishOptions::default()
                        },
                        payload,
                        properties.clone(),
                    )
                    .await?
                    .await
            };
            let outcome = tokio::select! {
                _ = self.closed.closed() => return Err(Error::Closed),
                r = attempt => r,
            };
            match outcome {
                Ok(c) => return Ok(c),
                Err(e) if is_connection_error(&e) => {
                    tracing::debug!(error = %e, "publish interrupted by a lost connection; publishing again after reconnecting");
                    session.broken.notify_one();
                    session = self.session_after(session.generation).await?;
                }
                Err(e) => return Err(backend("publish failed", e)),
            }
        }
    }

    fn check_receiver(&self, channel: &str) -> Result<()> {
        self.closed.check()?;
        names::check_receiver(channel, &self.id)
    }

    /// Publishes to `queue` through the default exchange (mandatory, confirmed) on behalf of
    /// `channel`: a broker nack (the queue is full) is `ChannelFull`; `Ok(false)` if the
    /// queue does not exist (the message was returned); `Ok(true)` once it is stored.
    async fn publish_to_queue(
        &self,
        channel: &str,
        queue: &str,
        payload: &[u8],
        properties: BasicProperties,
        capacity: usize,
    ) -> Result<bool> {
        let c = self.publish("", queue, payload, properties, true).await?;
        if c.is_nack() {
            return Err(Error::ChannelFull {
                channel: channel.to_owned(),
                capacity,
            });
        }
        Ok(c.take_message().is_none())
    }
}

/// The AMQP channel layer. See the crate docs.
pub struct AmqpLayer {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for AmqpLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpLayer")
            .field("broker", &self.inner.cfg.display_address())
            .field("instance", &self.inner.id)
            .field("inbox", &self.inner.names.inbox)
            .finish()
    }
}

impl AmqpLayer {
    /// Connects to the broker `config` names (`amqp://` or `amqps://`), declares this
    /// instance's inbox queue and the groups exchange, and starts the background tasks
    /// (inbox consumer, reconnection, group expiry). Needs a tokio runtime.
    pub async fn connect(config: &LayerConfig) -> Result<AmqpLayer> {
        let cfg = AmqpConfig::from_layer_config(config)?;
        let tls = session::tls_config(&cfg)?;
        let id = names::new_instance_id();
        let names = Names::new(&config.options.prefix, &cfg.groups_exchange, &id);
        let inner = Arc::new(Inner {
            cfg,
            options: config.options.clone(),
            id,
            names,
            tls,
            stats: Arc::new(Stats::default()),
            closed: Arc::new(CloseSignal::default()),
            inbox: LocalInbox::new(),
            local_groups: GroupRegistry::new(),
            normal_groups: GroupRegistry::new(),
            normal_bound: Mutex::new(HashSet::new()),
            bindings: tokio::sync::Mutex::new(()),
            session: watch::channel(None).0,
            declared: Mutex::new((0, HashSet::new())),
            admin_ops: tokio::sync::Mutex::new(()),
            known_queues: Mutex::new(HashSet::new()),
            consumers: Mutex::new(HashMap::new()),
            reconnects: AtomicU64::new(0),
            transient: properties(&config.options, false),
            persistent: properties(&config.options, true),
        });
        let first = session::open(&inner, 1).await?;
        inner.set_session(Some(first.clone()));
        tokio::spawn(session::supervise(inner.clone(), first));
        tokio::spawn(crate::groups::prune_task(inner.clone()));
        Ok(AmqpLayer { inner })
    }

    /// How many times the connection was lost and restored.
    pub fn reconnects(&self) -> u64 {
        self.inner.reconnects.load(Ordering::Relaxed)
    }

    /// The name of this instance's inbox queue.
    pub fn inbox_queue(&self) -> &str {
        &self.inner.names.inbox
    }

    /// The name of the durable queue that holds normal channel `channel`.
    pub fn channel_queue(&self, channel: &str) -> String {
        self.inner.names.channel_queue(channel)
    }

    /// Publishes raw bytes, bypassing the envelope, where messages for `channel` travel: the
    /// owning instance's inbox queue for a process-local channel, the channel's queue
    /// (declared if needed) for a normal one. For tests that feed garbage to a consumer, and
    /// for tools.
    pub async fn publish_raw(&self, channel: &str, bytes: &[u8]) -> Result<()> {
        let inner = &self.inner;
        inner.closed.check()?;
        names::validate_channel(channel)?;
        let queue = if names::is_process_local(channel) {
            let owner = names::owner_instance(channel).ok_or_else(|| Error::NotOwner {
                channel: channel.to_owned(),
            })?;
            inner.names.inbox_of(owner)
        } else {
            let session = inner.session().await?;
            inner.declare_channel_queue(&session, channel).await?;
            inner.names.channel_queue(channel)
        };
        let stored = inner
            .publish_to_queue(channel, &queue, bytes, BasicProperties::default(), 0)
            .await?;
        if !stored {
            return Err(Error::Backend {
                backend: BACKEND,
                message: format!("no queue {queue:?} at the broker"),
                source: None,
            });
        }
        Ok(())
    }

    fn shut_down(&self) -> bool {
        let first = self.inner.closed.close();
        if first {
            self.inner.inbox.clear();
        }
        first
    }
}

impl Drop for AmqpLayer {
    fn drop(&mut self) {
        if self.shut_down() {
            // The supervisor sees the close signal and ends; close the connection too.
            if let Some(s) = self.inner.session.borrow().clone() {
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    rt.spawn(async move {
                        let _ = s.conn.close(200, ShortString::from("closed")).await;
                    });
                }
            }
        }
    }
}

/// Properties of every chanlayer message: its expiry as the per-message TTL; persistent on
/// normal channels.
fn properties(options: &LayerOptions, persistent: bool) -> BasicProperties {
    BasicProperties::default()
        .with_expiration(topology::expiration(options))
        .with_delivery_mode(if persistent { 2 } else { 1 })
}

/// The operations; the trait impl maps their errors with `CloseSignal::closed_wins`.
impl AmqpLayer {
    async fn send_op(&self, channel: &str, message: Message) -> Result<()> {
        let inner = &self.inner;
        inner.closed.check()?;
        names::validate_channel(channel)?;
        let payload =
            Envelope::seal_encoded(Destination::Channel, channel, message, &inner.options)?;
        if names::is_process_local(channel) {
            let Some(owner) = names::owner_instance(channel) else {
                inner.stats.record_undeliverable(channel);
                return Ok(());
            };
            let queue = inner.names.inbox_of(owner);
            // capacity 0: the limit that refused it is the owner's inbox_capacity.
            let stored = inner
                .publish_to_queue(channel, &queue, &payload, inner.transient.clone(), 0)
                .await?;
            if !stored {
                // The owner's inbox is gone: the instance closed or died.
                inner.stats.record_undeliverable(channel);
                return Ok(());
            }
            inner.stats.record_sent(1);
            return Ok(());
        }
        let queue = inner.names.channel_queue(channel);
        for attempt in 0..2 {
            let session = inner.session().await?;
            inner.declare_channel_queue(&session, channel).await?;
            let stored = inner
                .publish_to_queue(
                    channel,
                    &queue,
                    &payload,
                    inner.persistent.clone(),
                    inner.options.capacity_for(channel),
                )
                .await?;
            if stored {
                inner.stats.record_sent(1);
                return Ok(());
            }
            // The queue vanished (deleted, or expired by queue_expires): declare it again.
            if attempt == 0 {
                lock(&inner.declared).1.remove(&queue);
            }
        }
        inner.stats.record_undeliverable(channel);
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
            let p = inner.consumer(channel).take(inner).await?;
            NormalConsumer::auto_ack(p)
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
            let c = inner.consumer(channel);
            let p = c.take(inner).await?;
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
            let c = inner.consumer(channel);
            c.take_batch(inner, max, timeout)
                .await?
                .into_iter()
                .map(|p| c.delivery(p, inner.stats.clone(), inner.closed.clone()))
                .collect()
        };
        inner.stats.record_received(out.len() as u64);
        Ok(out)
    }

    async fn group_add_op(&self, group: &str, channel: &str) -> Result<()> {
        self.inner.closed.check()?;
        names::validate_group(group)?;
        names::validate_channel(channel)?;
        crate::groups::add(&self.inner, group, channel).await
    }

    async fn group_discard_op(&self, group: &str, channel: &str) -> Result<()> {
        self.inner.closed.check()?;
        names::validate_group(group)?;
        names::validate_channel(channel)?;
        crate::groups::discard(&self.inner, group, channel).await
    }

    async fn group_send_op(&self, group: &str, message: Message) -> Result<()> {
        let inner = &self.inner;
        inner.closed.check()?;
        names::validate_group(group)?;
        let payload = Envelope::seal_encoded(Destination::Group, group, message, &inner.options)?;
        let c = inner
            .publish(
                &inner.names.groups_exchange,
                group,
                &payload,
                inner.persistent.clone(),
                false,
            )
            .await?;
        if c.is_nack() {
            // At least one member's queue is full; the others got their copy.
            inner
                .stats
                .record_group_member_full(group, "(a member queue at the broker)");
        }
        inner.stats.record_sent(1);
        Ok(())
    }

    async fn flush_op(&self) -> Result<()> {
        let inner = &self.inner;
        inner.closed.check()?;
        crate::groups::clear(inner).await?;
        let consumers: Vec<Arc<NormalConsumer>> =
            lock(&inner.consumers).values().cloned().collect();
        for c in &consumers {
            c.reset().await;
        }
        let session = inner.session().await?;
        let mut queues: Vec<String> = lock(&inner.known_queues).iter().cloned().collect();
        queues.push(inner.names.inbox.clone());
        for q in queues {
            // A refused purge closes the admin channel; admin() opens a new one.
            let _one = inner.admin_ops.lock().await;
            match session
                .admin()
                .await?
                .queue_purge(ShortString::from(q.as_str()), QueuePurgeOptions::default())
                .await
            {
                Ok(_) => {}
                // A queue that is gone (expired) holds nothing to purge.
                Err(e) if e.is_amqp_soft_error() => {}
                Err(e) => return Err(backend(&format!("could not purge {q:?}"), e)),
            }
        }
        inner.inbox.clear();
        Ok(())
    }
}

#[async_trait]
impl ChannelLayer for AmqpLayer {
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
        if !self.shut_down() {
            return Ok(());
        }
        let s = self.inner.session.borrow().clone();
        if let Some(s) = s {
            // Bounded: a broker (or a connection) that never answers Connection.Close must
            // not hold `close` forever; dropping the connection ends it from our side.
            let bound = self.inner.cfg.connection_timeout;
            match tokio::time::timeout(bound, s.conn.close(200, ShortString::from("closed"))).await
            {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(error = %e, "closing the AMQP connection"),
                Err(_) => tracing::warn!(
                    "the broker did not confirm closing the AMQP connection within {bound:?}; dropped it"
                ),
            }
        }
        Ok(())
    }
}
