//! The in-memory backend (`memory://`): the embedded default, for tests and single-process
//! use.
//!
//! `memory://` gives each connected layer its own private broker. `memory://NAME` shares one
//! broker among every layer connected with the same NAME in this process, so cross-instance
//! behaviour (groups across instances, competing readers, process-local channels of other
//! instances) can be exercised in-process. A named broker lives as long as a layer uses it.
//!
//! Guarantees: exact capacity (checked at send), expiry, competing readers on normal
//! channels, at-least-once `receive_delivery` on every channel (a nacked or unacked-and-dropped
//! delivery goes back to the head of its channel). Nothing persists past the process.
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! use chanlayer_core::{ChannelLayer, Codec, LayerConfig, Message, MemoryLayer};
//! let cfg = LayerConfig::from_url("memory://docs-example").unwrap();
//! let a = MemoryLayer::connect(&cfg).unwrap();
//! let b = MemoryLayer::connect(&cfg).unwrap();
//! let inbox_b = b.new_channel("ws").await.unwrap();
//! a.send(&inbox_b, Message::encode_as("hello", &1u8, Codec::Bincode).unwrap()).await.unwrap();
//! assert_eq!(b.receive(&inbox_b).await.unwrap().message_type(), "hello");
//! # });
//! ```

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, Weak};
use std::time::Duration;

use async_trait::async_trait;

use crate::capabilities::Capabilities;
use crate::config::{LayerConfig, LayerOptions};
use crate::delivery::{AckHandle, Acknowledger, Delivery, DeliveryInfo};
use crate::envelope::{Destination, Envelope};
use crate::error::{Error, Result};
use crate::groups::GroupRegistry;
use crate::inbox::{CloseSignal, Entry, LocalInbox};
use crate::layer::ChannelLayer;
use crate::message::Message;
use crate::names;
use crate::stats::{Stats, StatsSnapshot};

const BACKEND: &str = "memory";

/// The memory backend's capabilities.
pub const CAPABILITIES: Capabilities = Capabilities {
    backend: BACKEND,
    single_reader_normal_channels: true,
    at_least_once: true,
    at_least_once_local: true,
    persistent: false,
    broker_side_capacity: true,
    cross_process: false,
};

/// One in-process "broker": every queue and group of the layers connected to it.
#[derive(Debug, Default)]
struct Broker {
    inbox: LocalInbox,
    groups: GroupRegistry,
    instances: Mutex<HashSet<String>>,
}

impl Broker {
    fn instances(&self) -> MutexGuard<'_, HashSet<String>> {
        match self.instances.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// `false` for a process-local channel whose owner is not connected (nobody could ever
    /// receive it).
    fn deliverable(&self, channel: &str, own_id: &str) -> bool {
        if !names::is_process_local(channel) {
            return true;
        }
        match names::owner_instance(channel) {
            Some(id) if id == own_id => true,
            Some(id) => self.instances().contains(id),
            None => false,
        }
    }
}

static NAMED: LazyLock<Mutex<HashMap<String, Weak<Broker>>>> = LazyLock::new(Default::default);

fn named_broker(name: &str) -> Arc<Broker> {
    let mut map = match NAMED.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    };
    map.retain(|_, w| w.strong_count() > 0);
    if let Some(b) = map.get(name).and_then(Weak::upgrade) {
        return b;
    }
    let b = Arc::new(Broker::default());
    map.insert(name.to_owned(), Arc::downgrade(&b));
    b
}

/// The in-memory channel layer. See the module docs.
#[derive(Debug)]
pub struct MemoryLayer {
    broker: Arc<Broker>,
    id: String,
    options: LayerOptions,
    stats: Arc<Stats>,
    closed: Arc<CloseSignal>,
}

impl MemoryLayer {
    /// Connects to the broker the config names (`memory://` private, `memory://NAME`
    /// shared). Fails for unknown options or credentials.
    pub fn connect(config: &LayerConfig) -> Result<MemoryLayer> {
        if config.backend.scheme != BACKEND {
            return Err(Error::Config(format!(
                "the memory backend takes memory:// URLs, not {}://",
                config.backend.scheme
            )));
        }
        if config.backend.credentials.is_some() {
            return Err(Error::Config(
                "memory:// URLs take no user or password".into(),
            ));
        }
        config.options.validate()?;
        config.backend.options.reject_unknown(
            BACKEND,
            "prefix, capacity, channel_capacity.<glob>, expiry, group_expiry, codec, max_message_size",
        )?;
        let name = config.backend.address.trim_end_matches('/');
        if name.contains('/') {
            return Err(Error::Config(format!(
                "memory://{name}: a memory broker name is one word (memory://NAME), without '/'"
            )));
        }
        let broker = if name.is_empty() {
            Arc::new(Broker::default())
        } else {
            named_broker(name)
        };
        Ok(Self::with_broker(broker, config.options.clone()))
    }

    fn with_broker(broker: Arc<Broker>, options: LayerOptions) -> MemoryLayer {
        let id = names::new_instance_id();
        broker.instances().insert(id.clone());
        MemoryLayer {
            broker,
            id,
            options,
            stats: Arc::new(Stats::default()),
            closed: Arc::new(CloseSignal::default()),
        }
    }

    /// Hands raw wire bytes to this instance as if its broker had delivered them: decoded,
    /// routed to their channel or group, or counted and skipped if they are not a valid
    /// envelope. The conformance suite uses it to feed garbage; the broker backends run the
    /// same decoding on what they consume.
    pub fn inject_raw(&self, bytes: &[u8]) -> Result<bool> {
        self.closed.check()?;
        let b = &self.broker;
        match Envelope::decode(bytes) {
            Err(e) => {
                self.stats.record_undecodable("memory inject_raw", &e);
                Ok(false)
            }
            Ok(env) => match env.kind {
                Destination::Channel => {
                    let ch = env.destination.clone();
                    b.inbox
                        .push(&ch, env, self.options.capacity_for(&ch), &self.stats)
                        .map(|()| true)
                }
                Destination::Group => b
                    .inbox
                    .deliver(env, &b.groups, &self.options, &self.stats)
                    .map(|()| true),
            },
        }
    }

    fn check_receiver(&self, channel: &str) -> Result<()> {
        self.closed.check()?;
        names::check_receiver(channel, &self.id)
    }

    /// Checks the receiver, waits for the next entry of `channel`, counts it.
    async fn take(&self, channel: &str) -> Result<Entry> {
        self.check_receiver(channel)?;
        let entry = self
            .broker
            .inbox
            .take(channel, &self.stats, &self.closed)
            .await?;
        self.stats.record_received(1);
        Ok(entry)
    }

    fn delivery(&self, channel: &str, entry: Entry) -> Delivery {
        let info = DeliveryInfo {
            id: entry.envelope.id,
            channel: channel.to_owned(),
            redelivered: entry.redelivered,
            sent_at_ms: entry.envelope.sent_at_ms,
        };
        let message = entry.envelope.clone().into_message();
        let acker = MemoryAcker {
            broker: self.broker.clone(),
            channel: channel.to_owned(),
            entry: Some(entry),
            closed: self.closed.clone(),
            stats: self.stats.clone(),
        };
        Delivery::new(message, info, AckHandle::new(Box::new(acker)))
    }
}

/// Settles a memory delivery: ack forgets it; nack, or a drop without either, puts it back at
/// the head of its channel.
struct MemoryAcker {
    broker: Arc<Broker>,
    channel: String,
    entry: Option<Entry>,
    closed: Arc<CloseSignal>,
    stats: Arc<Stats>,
}

impl MemoryAcker {
    fn requeue(&mut self) {
        if let Some(entry) = self.entry.take() {
            // A process-local channel whose owner has gone cannot be received any more.
            if !self.broker.deliverable(&self.channel, "") {
                self.stats.record_undeliverable(&self.channel);
                return;
            }
            self.stats.record_redelivered(1);
            self.broker.inbox.requeue_front(&self.channel, entry);
        }
    }
}

#[async_trait]
impl Acknowledger for MemoryAcker {
    async fn ack(&mut self) -> Result<()> {
        // After close the ack cannot count; the message comes back when this is dropped.
        self.closed.check()?;
        self.entry = None;
        Ok(())
    }

    async fn nack(&mut self) -> Result<()> {
        self.requeue();
        Ok(())
    }
}

impl Drop for MemoryAcker {
    fn drop(&mut self) {
        self.requeue();
    }
}

#[async_trait]
impl ChannelLayer for MemoryLayer {
    fn capabilities(&self) -> Capabilities {
        CAPABILITIES
    }

    fn options(&self) -> &LayerOptions {
        &self.options
    }

    fn instance_id(&self) -> &str {
        &self.id
    }

    fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    async fn send(&self, channel: &str, message: Message) -> Result<()> {
        // A send never waits here; spending budget makes a tight send loop yield now and
        // then (see `LocalInbox::take`).
        tokio::task::consume_budget().await;
        self.closed.check()?;
        names::validate_channel(channel)?;
        // In-process: the queue is the address, so the envelope need not carry it.
        let env =
            Envelope::seal_unaddressed(Destination::Channel, channel, message, &self.options)?;
        if !self.broker.deliverable(channel, &self.id) {
            self.stats.record_undeliverable(channel);
            return Ok(());
        }
        self.broker.inbox.push(
            channel,
            env,
            self.options.capacity_for(channel),
            &self.stats,
        )?;
        self.stats.record_sent(1);
        Ok(())
    }

    async fn receive(&self, channel: &str) -> Result<Message> {
        Ok(self.take(channel).await?.envelope.into_message())
    }

    async fn receive_delivery(&self, channel: &str) -> Result<Delivery> {
        let entry = self.take(channel).await?;
        Ok(self.delivery(channel, entry))
    }

    async fn receive_batch(
        &self,
        channel: &str,
        max: usize,
        timeout: Duration,
    ) -> Result<Vec<Delivery>> {
        self.check_receiver(channel)?;
        let entries = self
            .broker
            .inbox
            .take_batch(channel, max, timeout, &self.stats, &self.closed)
            .await?;
        self.stats.record_received(entries.len() as u64);
        Ok(entries
            .into_iter()
            .map(|e| self.delivery(channel, e))
            .collect())
    }

    async fn new_channel(&self, prefix: &str) -> Result<String> {
        self.closed.check()?;
        names::new_channel_name(prefix, &self.id)
    }

    async fn group_add(&self, group: &str, channel: &str) -> Result<()> {
        self.closed.check()?;
        names::validate_group(group)?;
        names::validate_channel(channel)?;
        self.broker
            .groups
            .add(group, channel, self.options.group_expiry);
        Ok(())
    }

    async fn group_discard(&self, group: &str, channel: &str) -> Result<()> {
        self.closed.check()?;
        names::validate_group(group)?;
        names::validate_channel(channel)?;
        self.broker.groups.discard(group, channel);
        Ok(())
    }

    async fn group_send(&self, group: &str, message: Message) -> Result<()> {
        tokio::task::consume_budget().await;
        self.closed.check()?;
        names::validate_group(group)?;
        let env = Envelope::seal_unaddressed(Destination::Group, group, message, &self.options)?;
        let b = &self.broker;
        let members: Vec<std::sync::Arc<str>> = b
            .groups
            .members(group)
            .into_iter()
            .filter(|m| {
                let ok = b.deliverable(m, &self.id);
                if !ok {
                    self.stats.record_undeliverable(m);
                }
                ok
            })
            .collect();
        b.inbox
            .fan_out(group, env, members, &self.options, &self.stats);
        self.stats.record_sent(1);
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        self.closed.check()?;
        self.broker.inbox.clear();
        self.broker.groups.clear();
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        self.shut_down();
        Ok(())
    }
}

impl MemoryLayer {
    /// Closes once: wakes pending receives with `Closed`, and removes this instance's
    /// process-local queues and their group memberships from the broker.
    fn shut_down(&self) {
        if !self.closed.close() {
            return;
        }
        let b = &self.broker;
        b.instances().remove(&self.id);
        let mine = |ch: &str| names::owner_instance(ch) == Some(self.id.as_str());
        b.inbox.remove_where(mine);
        b.groups.remove_channels(mine);
    }
}

impl Drop for MemoryLayer {
    fn drop(&mut self) {
        self.shut_down();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Message;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// A task whose sends and receives always find the operation ready must still give
    /// its worker thread back now and then; otherwise other tasks and timers on that
    /// thread starve (the cause of a hang seen in CI when `close` raced busy tasks).
    #[test]
    fn ready_operations_yield_to_the_runtime() {
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        // The runtime lives in its own thread so that a starved runtime fails this test
        // by timeout instead of hanging the test binary.
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a current-thread runtime builds");
            rt.block_on(async move {
                let config = LayerConfig::from_url("memory://").expect("memory:// parses");
                let layer = Arc::new(MemoryLayer::connect(&config).expect("memory connects"));
                let channel = layer.new_channel("busy").await.expect("new_channel");
                let stop = Arc::new(AtomicBool::new(false));
                let busy = {
                    let (layer, channel, stop) = (layer.clone(), channel.clone(), stop.clone());
                    tokio::spawn(async move {
                        let mut rounds = 0u64;
                        while !stop.load(Ordering::Relaxed) {
                            let m = Message::encode_as("t", &rounds, crate::codec::Codec::Json)
                                .expect("a u64 encodes");
                            layer.send(&channel, m).await.expect("send");
                            layer.receive(&channel).await.expect("receive");
                            rounds += 1;
                        }
                        rounds
                    })
                };
                // On a current-thread runtime this task runs again only if `busy` yields.
                tokio::task::yield_now().await;
                stop.store(true, Ordering::Relaxed);
                let rounds = busy.await.expect("busy task");
                done_tx
                    .send(rounds)
                    .expect("the test thread waits for this");
            });
        });
        let rounds = done_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("a busy send/receive loop must yield to the runtime within 30 s");
        assert!(rounds > 0, "the busy task ran");
    }
}
