//! [`Shared`]: what one AMQP layer instance shares between its transport and its background
//! tasks (the live session, declared queues, message properties), and the operations they
//! all use: waiting for a session, declaring a normal channel's queue, publishing with
//! confirms across reconnections.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use chanlayer_core::asgi;
use chanlayer_core::toolkit::{lock, Inbound, Outgoing, Published};
use chanlayer_core::{Error, LayerOptions, Result};
use lapin::options::{BasicPublishOptions, QueueDeclareOptions};
use lapin::tcp::OwnedTLSConfig;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Confirmation};
use tokio::sync::watch;

use crate::config::{AmqpConfig, Wire};
use crate::session::{backend, is_connection_error, Session};
use crate::topology::{self, Names};
use crate::BACKEND;

/// Everything one layer instance shares with its background tasks.
pub(crate) struct Shared {
    pub cfg: AmqpConfig,
    /// This instance's receiving side (id, options, counters, close signal, local inbox,
    /// group registries), shared with core.
    pub inbound: Arc<Inbound>,
    pub names: Names,
    pub tls: OwnedTLSConfig,
    /// The live session; `None` while reconnecting.
    pub session: watch::Sender<Option<Arc<Session>>>,
    /// Normal-channel queues declared on the session of the given generation (what it holds
    /// for an older session counts for nothing on a newer one).
    pub declared: Mutex<(u64, HashSet<String>)>,
    /// Serialises operations on the admin channel: a refused one (a passive declare of a
    /// missing queue) closes the channel and would fail every other one in flight on it.
    pub admin_ops: tokio::sync::Mutex<()>,
    /// Every normal-channel queue this instance has used (what `flush` purges).
    pub known_queues: Mutex<HashSet<String>>,
    /// Message properties, computed once: transient (process-local channels).
    pub transient: BasicProperties,
    /// Message properties, computed once: persistent (normal channels and groups).
    pub persistent: BasicProperties,
}

impl Shared {
    /// The inbox queue of instance `owner` (the owner of a process-local channel): the
    /// instance id itself on `channels_rabbitmq`'s wire.
    pub fn inbox_of(&self, owner: &str) -> String {
        match self.cfg.wire {
            Wire::Chanlayer => self.names.inbox_of(owner),
            Wire::ChannelsRabbitmq => owner.to_owned(),
        }
    }

    /// The bytes of `out` on this instance's wire.
    pub fn encode(&self, out: &Outgoing<'_>) -> Result<Vec<u8>> {
        match self.cfg.wire {
            Wire::Chanlayer => Ok(out.encode()),
            Wire::ChannelsRabbitmq => asgi::encode(out.envelope(), out.destination()),
        }
    }

    /// Hands bytes that arrived at the inbox to core: decoded on this instance's wire; what
    /// is not a message is counted `undecodable` (with `source`) and skipped.
    pub fn ingest(&self, bytes: &[u8], source: &str) {
        let inbound = &self.inbound;
        match self.cfg.wire {
            Wire::Chanlayer => {
                inbound.ingest_bytes(bytes, source);
            }
            Wire::ChannelsRabbitmq => match asgi::decode(bytes, inbound.options().expiry) {
                Ok(env) => inbound.ingest(env),
                Err(why) => inbound.stats().record_undecodable(source, &why),
            },
        }
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
        self.inbound.closed().check()?;
        // Fast path, every operation's: the session is up; no subscription, no timer.
        if let Some(s) = self.session.borrow().as_ref().filter(|s| ok(s)) {
            return Ok(s.clone());
        }
        let mut rx = self.session.subscribe();
        let wait = async {
            tokio::select! {
                _ = self.inbound.closed().closed() => None,
                r = rx.wait_for(|s| s.as_ref().is_some_and(|s| ok(s))) => {
                    r.ok().and_then(|s| s.as_ref().cloned())
                }
            }
        };
        let (at, after) = (self.cfg.display_address(), self.cfg.reconnect_timeout);
        match tokio::time::timeout(after, wait).await {
            Ok(s) => s.ok_or(Error::Closed),
            Err(_) => Err(Error::failure(BACKEND, format!(
                "the broker at {at} has been unreachable for {after:?} (reconnect_timeout); chanlayer keeps reconnecting in the background"
            ))),
        }
    }

    /// Declares the durable queue of normal channel `channel` on the live session (once per
    /// session), and returns its name.
    pub async fn channel_queue(&self, channel: &str) -> Result<String> {
        self.declare_channel_queue(&*self.session().await?, channel)
            .await?;
        Ok(self.names.channel(channel))
    }

    /// Declares the durable queue of normal channel `channel` once per session.
    pub async fn declare_channel_queue(&self, session: &Session, channel: &str) -> Result<()> {
        let queue = self.names.channel(channel);
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
        let capacity = self.inbound.options().capacity_for(channel);
        let q = queue.as_str();
        let declare = |passive, args| async move {
            let options = QueueDeclareOptions {
                durable: true,
                passive,
                ..QueueDeclareOptions::default()
            };
            let admin = session.admin().await?;
            Ok(admin.queue_declare(q.into(), options, args).await.map(drop))
        };
        // Declared with this layer's arguments: a missing queue is created (atomically, if
        // other instances declare it at the same time). A queue that exists with other
        // arguments is used as it is (RabbitMQ refuses to redeclare a queue with other
        // arguments): its capacity and expiry are the ones it was created with, taken from
        // the broker's 406 answer one argument at a time, so the type is still checked; a
        // queue of another type is an error. What cannot be declared (no configure
        // permission, an argument chanlayer does not set) is checked passively and used as
        // it is. A refused declaration closes the admin channel; the next admin() opens a
        // new one.
        let mut args =
            topology::channel_arguments(capacity, self.cfg.queue_expires, self.cfg.queue_type);
        for attempt in 1.. {
            let Err(err) = declare(false, args.clone()).await? else {
                break;
            };
            match precondition_failed(&err).and_then(topology::inequivalent) {
                Some(f) if f.arg == topology::QUEUE_TYPE => {
                    return Err(self.other_queue_type(channel, q, f.current.as_deref()))
                }
                Some(f) if attempt < 4 && topology::adopt(&mut args, &f) => {}
                _ => {
                    let checked = declare(true, FieldTable::default()).await?;
                    checked.map_err(|e| backend(&format!("could not declare queue {q:?}"), e))?;
                    break;
                }
            }
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

    /// The error for a normal channel whose queue exists with another type than this layer's
    /// `queue_type` (`current`: the queue's `x-queue-type`, none for a classic queue).
    fn other_queue_type(&self, channel: &str, queue: &str, current: Option<&str>) -> Error {
        let theirs = current.unwrap_or("classic");
        let ours = self.cfg.queue_type.as_str();
        Error::Config(format!(
            "the queue {queue:?} of normal channel {channel:?} exists at the broker as a {theirs} queue, and this layer has queue_type={ours} (RabbitMQ: 406 PRECONDITION_FAILED, inequivalent arg 'x-queue-type'). Use the same queue_type in every instance that uses the channel, or delete the queue (rabbitmqctl delete_queue {queue}; its messages go with it) so that it is declared again as a {ours} queue"
        ))
    }

    /// Publishes one encoded envelope and waits for the broker's confirm. Across a lost
    /// connection it publishes again on the next one (bounded by `reconnect_timeout`): an
    /// `Ok` means the broker confirmed it; a retried message may arrive twice.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        payload: &[u8],
        properties: &BasicProperties,
        mandatory: bool,
    ) -> Result<Confirmation> {
        let options = BasicPublishOptions {
            mandatory,
            ..BasicPublishOptions::default()
        };
        let mut session = self.session().await?;
        loop {
            let (channel, x, key) = (&session.publish, exchange.into(), routing_key.into());
            let published = channel.basic_publish(x, key, options, payload, properties.clone());
            let attempt = async { published.await?.await };
            let outcome = tokio::select! {
                _ = self.inbound.closed().closed() => return Err(Error::Closed),
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

    /// Publishes to `queue` through the default exchange (mandatory, confirmed) on behalf of
    /// `channel`: a broker nack (the queue is full) is `ChannelFull`; `Ok(Gone)` if the queue
    /// does not exist (the message was returned); `Ok(Stored)` once it is stored.
    pub async fn publish_to_queue(
        &self,
        channel: &str,
        queue: &str,
        payload: &[u8],
        properties: &BasicProperties,
        capacity: usize,
    ) -> Result<Published> {
        let c = self.publish("", queue, payload, properties, true).await?;
        if c.is_nack() {
            return Err(Error::ChannelFull {
                channel: channel.to_owned(),
                capacity,
            });
        }
        Ok(match c.take_message() {
            None => Published::Stored,
            Some(_) => Published::Gone,
        })
    }
}

/// The reply text of a 406 PRECONDITION_FAILED.
fn precondition_failed(e: &lapin::Error) -> Option<&str> {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp) if amqp.get_id() == 406 => {
            Some(amqp.get_message().as_str())
        }
        _ => None,
    }
}

/// Properties of every chanlayer message: its expiry as the per-message TTL; persistent on
/// normal channels. None on `channels_rabbitmq`'s wire (it sets none).
pub(crate) fn properties(options: &LayerOptions, persistent: bool, wire: Wire) -> BasicProperties {
    if wire == Wire::ChannelsRabbitmq {
        return BasicProperties::default();
    }
    BasicProperties::default()
        .with_expiration(topology::expiration(options))
        .with_delivery_mode(if persistent { 2 } else { 1 })
}
