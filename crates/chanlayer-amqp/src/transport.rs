//! [`AmqpTransport`]: the [`Transport`] on an AMQP 0-9-1 broker; core's `TransportLayer`
//! makes it a channel layer ([`AmqpLayer`](crate::AmqpLayer)).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use chanlayer_core::config::BackendSettings;
use chanlayer_core::names::{self, Naming};
use chanlayer_core::toolkit::{
    fmt_transport, lock, Inbound, NormalReader, Outgoing, Published, Transport,
};
use chanlayer_core::{Capabilities, Error, LayerConfig, Result};
use lapin::options::QueuePurgeOptions;
use lapin::types::ShortString;
use lapin::BasicProperties;
use tokio::sync::watch;

use crate::config::{AmqpConfig, Wire};
use crate::groups::binding;
use crate::normal::{NormalConsumer, Source};
use crate::session::{self, backend};
use crate::shared::{properties, Shared};
use crate::topology::Names;
use crate::{BACKEND, CAPABILITIES, CHANNELS_RABBITMQ_CAPABILITIES};

/// The AMQP transport of one layer instance. See the crate docs.
pub struct AmqpTransport {
    shared: Arc<Shared>,
    consumers: Mutex<HashMap<String, Arc<Source>>>,
}

impl std::fmt::Debug for AmqpTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        fmt_transport(self, "AmqpTransport", f)
    }
}

impl AmqpTransport {
    /// How many times the connection was lost and restored (`stats().reconnects`).
    pub fn reconnects(&self) -> u64 {
        self.shared.inbound.stats().snapshot().reconnects
    }

    /// The broker this instance is connected to now, without credentials
    /// (`amqp://host:port/vhost`: one of the URL's hosts), or `None` while it reconnects.
    pub fn connected_broker(&self) -> Option<String> {
        let session = self.shared.session.borrow();
        session
            .as_ref()
            .map(|s| self.shared.cfg.host_address(s.host))
    }

    /// The name of this instance's inbox queue.
    pub fn inbox_queue(&self) -> &str {
        &self.shared.names.inbox
    }

    /// The name of the durable queue that holds normal channel `channel`.
    pub fn channel_queue(&self, channel: &str) -> String {
        self.shared.names.channel(channel)
    }

    /// Publishes raw bytes, bypassing the envelope, where messages for `channel` travel: the
    /// owning instance's inbox queue for a process-local channel, the channel's queue
    /// (declared if needed) for a normal one. For tests that feed garbage to a consumer, and
    /// for tools.
    pub async fn publish_raw(&self, channel: &str, bytes: &[u8]) -> Result<()> {
        let shared = &self.shared;
        shared.inbound.closed().check()?;
        names::validate_channel(channel)?;
        let queue = if names::is_process_local(channel) {
            let not_owner = || Error::NotOwner {
                channel: channel.to_owned(),
            };
            let owner = shared.inbound.naming().owner(channel);
            shared.inbox_of(owner.ok_or_else(not_owner)?)
        } else {
            shared.channel_queue(channel).await?
        };
        let published = shared
            .publish_to_queue(channel, &queue, bytes, &BasicProperties::default(), 0)
            .await?;
        if published == Published::Gone {
            let message = format!("no queue {queue:?} at the broker");
            return Err(Error::failure(BACKEND, message));
        }
        Ok(())
    }

    /// Binds (`bind`) or unbinds `queue` and `group` on the live session.
    async fn bind_queue(&self, queue: &str, group: &str, bind: bool) -> Result<()> {
        let session = self.shared.session().await?;
        binding(&self.shared, &session, queue, group, bind).await
    }
}

impl Transport for AmqpTransport {
    /// Connects to the broker `config` names (`amqp://` or `amqps://`), declares this
    /// instance's inbox queue and the groups exchange, and starts the inbox consumer and the
    /// connection supervisor.
    async fn open(config: &LayerConfig, inbound: Arc<Inbound>) -> Result<Self> {
        let cfg = AmqpConfig::from_layer_config(config)?;
        let tls = session::tls_config(&cfg)?;
        let mut names = Names::new(&config.options.prefix, &cfg.groups_exchange, inbound.id());
        if cfg.wire == Wire::ChannelsRabbitmq {
            // Its queue is its id (`channels_` and 12 letters), as channels_rabbitmq's.
            names.inbox = inbound.id().to_owned();
        }
        let wire = cfg.wire;
        let shared = Arc::new(Shared {
            cfg,
            names,
            tls,
            session: watch::channel(None).0,
            declared: Mutex::new((0, HashSet::new())),
            admin_ops: tokio::sync::Mutex::new(()),
            known_queues: Mutex::new(HashSet::new()),
            transient: properties(inbound.options(), false, wire),
            persistent: properties(inbound.options(), true, wire),
            inbound,
        });
        let first = crate::connection::open(&shared, 1, 0).await?;
        shared.session.send_replace(Some(first.clone()));
        tokio::spawn(crate::connection::supervise(shared.clone(), first));
        Ok(AmqpTransport {
            shared,
            consumers: Mutex::new(HashMap::new()),
        })
    }

    fn naming(config: &LayerConfig) -> Result<Naming> {
        Ok(AmqpConfig::from_layer_config(config)?.wire.naming())
    }

    fn capabilities(&self) -> Capabilities {
        match self.shared.cfg.wire {
            Wire::Chanlayer => CAPABILITIES,
            Wire::ChannelsRabbitmq => CHANNELS_RABBITMQ_CAPABILITIES,
        }
    }

    fn debug_fields(&self, f: &mut std::fmt::DebugStruct<'_, '_>) {
        f.field("broker", &self.shared.cfg.display_address())
            .field("inbox", &self.shared.names.inbox);
    }

    async fn publish_local(&self, owner: &str, out: Outgoing<'_>) -> Result<Published> {
        let shared = &self.shared;
        let (queue, payload) = (shared.inbox_of(owner), shared.encode(&out)?);
        // capacity 0: the limit that refused it is the owner's inbox_capacity. `Gone`: the
        // owner's inbox is gone (the instance closed or died).
        shared
            .publish_to_queue(out.destination(), &queue, &payload, &shared.transient, 0)
            .await
    }

    async fn publish_normal(&self, out: Outgoing<'_>) -> Result<Published> {
        let shared = &self.shared;
        let channel = out.destination();
        let payload = shared.encode(&out)?;
        for _ in 0..2 {
            let queue = shared.channel_queue(channel).await?;
            let capacity = shared.inbound.options().capacity_for(channel);
            let published = shared
                .publish_to_queue(channel, &queue, &payload, &shared.persistent, capacity)
                .await?;
            if published == Published::Stored {
                return Ok(published);
            }
            // The queue vanished (deleted, or expired by queue_expires): declare it again.
            lock(&shared.declared).1.remove(&queue);
        }
        Ok(Published::Gone)
    }

    async fn publish_group(&self, out: Outgoing<'_>) -> Result<Published> {
        let shared = &self.shared;
        let (groups, group) = (&shared.names.groups, out.destination());
        let payload = shared.encode(&out)?;
        let c = shared
            .publish(groups, group, &payload, &shared.persistent, false)
            .await?;
        if c.is_nack() {
            // At least one member's queue is full; the others got their copy.
            shared
                .inbound
                .stats()
                .record_group_member_full(group, "(a member queue at the broker)");
        }
        Ok(Published::Stored)
    }

    async fn bind_group(&self, group: &str) -> Result<()> {
        self.bind_queue(&self.shared.names.inbox, group, true).await
    }

    async fn unbind_group(&self, group: &str) -> Result<()> {
        self.bind_queue(&self.shared.names.inbox, group, false)
            .await
    }

    async fn bind_normal(&self, group: &str, channel: &str) -> Result<()> {
        let queue = self.shared.channel_queue(channel).await?;
        self.bind_queue(&queue, group, true).await
    }

    async fn unbind_normal(&self, group: &str, channel: &str) -> Result<()> {
        let queue = self.shared.names.channel(channel);
        self.bind_queue(&queue, group, false).await
    }

    async fn normal_reader(&self, channel: &str) -> Result<NormalReader> {
        let source = lock(&self.consumers)
            .entry(channel.to_owned())
            .or_insert_with(|| NormalConsumer::source(&self.shared, channel))
            .clone();
        Ok(NormalReader::Source(source))
    }

    async fn flush(&self) -> Result<()> {
        let shared = &self.shared;
        let consumers: Vec<Arc<Source>> = lock(&self.consumers).values().cloned().collect();
        for c in &consumers {
            c.0.reset().await;
        }
        let session = shared.session().await?;
        let mut queues: Vec<String> = lock(&shared.known_queues).iter().cloned().collect();
        queues.push(shared.names.inbox.clone());
        for q in queues {
            // A refused purge closes the admin channel; admin() opens a new one.
            let _one = shared.admin_ops.lock().await;
            let admin = session.admin().await?;
            let purge = admin.queue_purge(q.as_str().into(), QueuePurgeOptions::default());
            match purge.await {
                Ok(_) => {}
                // A queue that is gone (expired) holds nothing to purge.
                Err(e) if e.is_amqp_soft_error() => {}
                Err(e) => return Err(backend(&format!("could not purge {q:?}"), e)),
            }
        }
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        let s = self.shared.session.borrow().clone();
        if let Some(s) = s {
            // Bounded: a broker (or a connection) that never answers Connection.Close must
            // not hold `close` forever; dropping the connection ends it from our side.
            let bound = self.shared.cfg.connection_timeout;
            match s.close(200, "closed", bound).await {
                Some(Ok(())) => {}
                Some(Err(e)) => tracing::debug!(error = %e, "closing the AMQP connection"),
                None => tracing::warn!(
                    "the broker did not confirm closing the AMQP connection within {bound:?}; dropped it"
                ),
            }
        }
        Ok(())
    }

    fn abandon(&self) {
        // The supervisor sees the close signal and ends; close the connection too.
        if let Some(s) = self.shared.session.borrow().clone() {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    let _ = s.conn.close(200, ShortString::from("closed")).await;
                });
            }
        }
    }
}
