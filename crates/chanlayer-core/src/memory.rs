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
//! let a = MemoryLayer::connect(&cfg).await.unwrap();
//! let b = MemoryLayer::connect(&cfg).await.unwrap();
//! let inbox_b = b.new_channel("ws").await.unwrap();
//! a.send(&inbox_b, Message::encode_as("hello", &1u8, Codec::Bincode).unwrap()).await.unwrap();
//! assert_eq!(b.receive(&inbox_b).await.unwrap().message_type(), "hello");
//! # });
//! ```

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex, Weak};

use crate::capabilities::Capabilities;
use crate::config::LayerConfig;
use crate::envelope::{Destination, Envelope};
use crate::error::{Error, Result};
use crate::groups::GroupRegistry;
use crate::inbound::Inbound;
use crate::inbox::LocalInbox;
use crate::names;
use crate::toolkit::lock;
use crate::transport::{NormalReader, Outgoing, Published, Transport};
use crate::transport_layer::TransportLayer;

const BACKEND: &str = "memory";

/// The memory backend's capabilities.
pub const CAPABILITIES: Capabilities = Capabilities {
    single_reader_normal_channels: true,
    at_least_once: true,
    at_least_once_local: true,
    broker_side_capacity: true,
    all_group_members: true,
    ..Capabilities::none(BACKEND)
};

/// The in-memory channel layer. See the module docs.
pub type MemoryLayer = TransportLayer<MemoryTransport>;

/// One in-process "broker": the instances connected to it, which of them bound which
/// groups, and the normal channels' queues.
#[derive(Debug, Default)]
struct Broker {
    instances: Mutex<HashMap<String, Weak<Inbound>>>,
    /// group → instances with a local member (pinned: core unbinds them).
    bound: GroupRegistry,
    /// group → normal channels that are members (pinned, as `bound`).
    normal_bound: GroupRegistry,
    /// The normal channels.
    normal: Arc<LocalInbox>,
}

impl Broker {
    fn instance(&self, id: &str) -> Option<Arc<Inbound>> {
        lock(&self.instances).get(id).and_then(Weak::upgrade)
    }

    /// One copy of a group message for every instance and normal channel bound to `group`.
    fn fan_out(&self, group: &str, env: Envelope, sender: &Inbound) {
        for id in self.bound.members(group) {
            match self.instance(&id) {
                Some(inbound) => inbound.offer_group(group, env.clone()),
                None => sender.stats().record_undeliverable(group),
            }
        }
        let channels = self.normal_bound.members(group);
        (self.normal).fan_out(group, env, channels, sender.options(), sender.stats());
    }
}

static NAMED: LazyLock<Mutex<HashMap<String, Weak<Broker>>>> = LazyLock::new(Default::default);

fn named_broker(name: &str) -> Arc<Broker> {
    let mut map = lock(&NAMED);
    map.retain(|_, w| w.strong_count() > 0);
    if let Some(b) = map.get(name).and_then(Weak::upgrade) {
        return b;
    }
    let b = Arc::new(Broker::default());
    map.insert(name.to_owned(), Arc::downgrade(&b));
    b
}

/// The memory transport: instances of one process on a shared in-process broker.
#[derive(Debug)]
pub struct MemoryTransport {
    broker: Arc<Broker>,
    inbound: Arc<Inbound>,
}

impl MemoryTransport {
    /// Hands raw wire bytes to this instance's broker as if they had come over a wire:
    /// decoded and routed to their channel or group, or counted and skipped (`Ok(false)`) if
    /// they are not a valid envelope. The conformance suite uses it to feed garbage; the
    /// broker backends run the same decoding on what they consume.
    pub fn inject_raw(&self, bytes: &[u8]) -> Result<bool> {
        let i = &self.inbound;
        i.closed().check()?;
        let Some(env) = i.decode(bytes, "memory inject_raw") else {
            return Ok(false);
        };
        match env.kind {
            Destination::Group => {
                let group = env.destination.clone();
                self.broker.fan_out(&group, env, i);
            }
            Destination::Channel if names::is_process_local(&env.destination) => {
                let owner = names::owner_instance(&env.destination).unwrap_or_default();
                match self.broker.instance(owner) {
                    Some(inbound) => inbound.offer(env)?,
                    None => i.stats().record_undeliverable(&env.destination),
                }
            }
            Destination::Channel => {
                let ch = env.destination.clone();
                self.push(&self.broker.normal, Outgoing::new(env, &ch))?;
            }
        }
        Ok(true)
    }

    /// Pushes `out` onto its channel's queue in `inbox`. Capacity is the sender's setting for
    /// the channel, checked at once (the broker is in this process): `ChannelFull` reaches
    /// the sender.
    fn push(&self, inbox: &LocalInbox, out: Outgoing<'_>) -> Result<Published> {
        let channel = out.destination();
        let capacity = self.inbound.options().capacity_for(channel);
        inbox.push(
            channel,
            out.into_unaddressed(),
            capacity,
            self.inbound.stats(),
        )?;
        Ok(Published::Stored)
    }

    /// Forgets this instance at the broker: its process-local channels become undeliverable.
    fn leave(&self) {
        let id = self.inbound.id();
        lock(&self.broker.instances).remove(id);
        for group in self.broker.bound.groups() {
            self.broker.bound.discard(&group, id);
        }
    }
}

impl Transport for MemoryTransport {
    async fn open(config: &LayerConfig, inbound: Arc<Inbound>) -> Result<Self> {
        config.backend.scheme_of(BACKEND, &[BACKEND])?;
        if config.backend.credentials.is_some() {
            return Err(Error::Config(
                "memory:// URLs take no user or password".into(),
            ));
        }
        (config.backend.options).reject_unknown(BACKEND, crate::config::SHARED_OPTIONS)?;
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
        lock(&broker.instances).insert(inbound.id().to_owned(), Arc::downgrade(&inbound));
        Ok(MemoryTransport { broker, inbound })
    }

    fn capabilities(&self) -> Capabilities {
        CAPABILITIES
    }

    // Sends never wait here: done when called, so the future carries only the result, not
    // the message (a smaller future on every send).
    fn publish_local(
        &self,
        owner: &str,
        out: Outgoing<'_>,
    ) -> impl std::future::Future<Output = Result<Published>> + Send {
        // Its own channel: no lookup, no reference count touched.
        std::future::ready(if owner == self.inbound.id() {
            self.push(self.inbound.inbox(), out)
        } else {
            match self.broker.instance(owner) {
                Some(target) => self.push(target.inbox(), out),
                None => Ok(Published::Gone),
            }
        })
    }

    fn publish_normal(
        &self,
        out: Outgoing<'_>,
    ) -> impl std::future::Future<Output = Result<Published>> + Send {
        std::future::ready(self.push(&self.broker.normal, out))
    }

    async fn publish_group(&self, out: Outgoing<'_>) -> Result<Published> {
        let group = out.destination();
        self.broker
            .fan_out(group, out.into_unaddressed(), &self.inbound);
        Ok(Published::Stored)
    }

    async fn bind_group(&self, group: &str) -> Result<()> {
        self.broker.bound.pin(group, self.inbound.id());
        Ok(())
    }

    async fn unbind_group(&self, group: &str) -> Result<()> {
        self.broker.bound.discard(group, self.inbound.id());
        Ok(())
    }

    async fn bind_normal(&self, group: &str, channel: &str) -> Result<()> {
        self.broker.normal_bound.pin(group, channel);
        Ok(())
    }

    async fn unbind_normal(&self, group: &str, channel: &str) -> Result<()> {
        self.broker.normal_bound.discard(group, channel);
        Ok(())
    }

    async fn normal_reader(&self, _channel: &str) -> Result<NormalReader> {
        // Competing readers, at-least-once: core takes from the broker's queue and requeues.
        Ok(NormalReader::Queue(self.broker.normal.clone()))
    }

    fn group_members(&self, group: &str) -> Option<Vec<String>> {
        let broker = &self.broker;
        let instances = broker.bound.members(group).into_iter();
        let all = (instances.filter_map(|id| broker.instance(&id)))
            .flat_map(|inbound| inbound.groups().members(group))
            .chain(broker.normal_bound.members(group));
        Some(all.map(|m| m.to_string()).collect())
    }

    async fn flush(&self) -> Result<()> {
        // Everything this layer can see: the broker's normal channels too.
        self.broker.normal.clear();
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        self.leave();
        Ok(())
    }

    fn abandon(&self) {
        self.leave();
    }
}
