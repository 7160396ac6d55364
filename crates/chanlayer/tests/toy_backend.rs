//! "Add a backend", verified: a toy transport written outside the backend crates, registered
//! under its own scheme, connected by URL through the facade, and run against the whole
//! conformance suite. docs/architecture.md walks through this file.
//!
//! The toy is a bus in this process: every instance connected to `toy://NAME` shares one.
//! Messages travel as wire bytes (encoded by core, decoded by core's ingest path), as they
//! would over a network; there is no broker-side capacity, normal channels are broadcast to
//! the instances reading them (at-most-once, read from each instance's inbox), and a group
//! reaches the instances that bound it.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, LazyLock, Mutex, Weak};

use chanlayer_core::toolkit::{
    async_trait, lock, Inbound, NormalReader, Outgoing, Published, Transport,
};
use chanlayer_core::{names, Capabilities, Error, LayerConfig, LayerOptions, Result};
use chanlayer_testkit::{LayerFactory, RawInjector, TestLayer};

/// One bus: the instances on it, which of them bound which groups, which read which normal
/// channels.
#[derive(Default)]
struct Bus {
    instances: Mutex<HashMap<String, Weak<Inbound>>>,
    groups: Mutex<HashMap<String, HashSet<String>>>,
    readers: Mutex<HashMap<String, HashSet<String>>>,
    /// Every normal-channel message, replayed to each instance that starts reading the
    /// channel later (a toy's late-joiner retention; `flush` empties it).
    retained: Mutex<HashMap<String, Vec<Vec<u8>>>>,
}

impl Bus {
    fn named(name: &str) -> Arc<Bus> {
        static BUSES: LazyLock<Mutex<HashMap<String, Arc<Bus>>>> = LazyLock::new(Default::default);
        lock(&BUSES).entry(name.to_owned()).or_default().clone()
    }

    fn instance(&self, id: &str) -> Option<Arc<Inbound>> {
        lock(&self.instances).get(id).and_then(Weak::upgrade)
    }

    /// Hands `bytes` to each of `ids` that is still there; `false` if none was.
    fn deliver(&self, ids: &HashSet<String>, bytes: &[u8]) -> bool {
        let mut any = false;
        for id in ids {
            if let Some(inbound) = self.instance(id) {
                inbound.ingest_bytes(bytes, "toy bus");
                any = true;
            }
        }
        any
    }

    /// Broadcasts `bytes` to the readers of normal channel `channel` and retains them for
    /// later readers.
    fn publish_normal(&self, channel: &str, bytes: Vec<u8>) {
        let mut retained = lock(&self.retained);
        self.deliver(&self.readers_of(channel), &bytes);
        retained.entry(channel.to_owned()).or_default().push(bytes);
    }

    fn readers_of(&self, channel: &str) -> HashSet<String> {
        lock(&self.readers)
            .get(channel)
            .cloned()
            .unwrap_or_default()
    }
}

/// The toy transport.
struct ToyTransport {
    bus: Arc<Bus>,
    inbound: Arc<Inbound>,
}

impl ToyTransport {
    fn leave(&self) {
        let id = self.inbound.id();
        lock(&self.bus.instances).remove(id);
        for ids in lock(&self.bus.groups).values_mut() {
            ids.remove(id);
        }
        for ids in lock(&self.bus.readers).values_mut() {
            ids.remove(id);
        }
    }
}

impl Transport for ToyTransport {
    const NORMAL_VIA_INBOX: bool = true;

    async fn open(config: &LayerConfig, inbound: Arc<Inbound>) -> Result<Self> {
        if config.backend.credentials.is_some() {
            return Err(Error::Config("toy:// URLs take no user or password".into()));
        }
        config
            .backend
            .options
            .reject_unknown("toy", "the shared options only")?;
        let bus = Bus::named(config.backend.address.trim_end_matches('/'));
        lock(&bus.instances).insert(inbound.id().to_owned(), Arc::downgrade(&inbound));
        Ok(ToyTransport { bus, inbound })
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::none("toy")
    }

    async fn publish_local(&self, owner: &str, out: Outgoing<'_>) -> Result<Published> {
        Ok(match self.bus.instance(owner) {
            Some(inbound) => {
                inbound.ingest_bytes(&out.encode(), "toy bus");
                Published::Stored
            }
            None => Published::Gone,
        })
    }

    async fn publish_normal(&self, out: Outgoing<'_>) -> Result<Published> {
        self.bus.publish_normal(out.destination(), out.encode());
        Ok(Published::Stored)
    }

    async fn publish_group(&self, out: Outgoing<'_>) -> Result<Published> {
        let ids = lock(&self.bus.groups)
            .get(out.destination())
            .cloned()
            .unwrap_or_default();
        self.bus.deliver(&ids, &out.encode());
        Ok(Published::Stored)
    }

    async fn bind_group(&self, group: &str) -> Result<()> {
        lock(&self.bus.groups)
            .entry(group.to_owned())
            .or_default()
            .insert(self.inbound.id().to_owned());
        Ok(())
    }

    async fn unbind_group(&self, group: &str) -> Result<()> {
        if let Some(ids) = lock(&self.bus.groups).get_mut(group) {
            ids.remove(self.inbound.id());
        }
        Ok(())
    }

    async fn bind_normal(&self, _group: &str, _channel: &str) -> Result<()> {
        unreachable!("NORMAL_VIA_INBOX: core binds the group instead")
    }

    async fn unbind_normal(&self, _group: &str, _channel: &str) -> Result<()> {
        unreachable!("NORMAL_VIA_INBOX: core unbinds the group instead")
    }

    async fn normal_reader(&self, channel: &str) -> Result<NormalReader> {
        let retained = lock(&self.bus.retained);
        let new = lock(&self.bus.readers)
            .entry(channel.to_owned())
            .or_default()
            .insert(self.inbound.id().to_owned());
        if new {
            for bytes in retained.get(channel).into_iter().flatten() {
                self.inbound.ingest_bytes(bytes, "toy bus");
            }
        }
        Ok(NormalReader::Inbox)
    }

    async fn flush(&self) -> Result<()> {
        lock(&self.bus.retained).clear();
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

/// Registers `toy://` once per test binary.
fn register() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        chanlayer::register_transport::<ToyTransport>("toy").expect("toy:// is free");
    });
}

/// The suite's raw-bytes hook: bytes go where the channel's messages travel.
struct Inject {
    bus: Arc<Bus>,
}

#[async_trait]
impl RawInjector for Inject {
    async fn inject(&self, channel: &str, bytes: Vec<u8>) -> Result<()> {
        if names::is_process_local(channel) {
            let owner = names::owner_instance(channel).unwrap_or_default();
            self.bus.deliver(&HashSet::from([owner.to_owned()]), &bytes);
        } else {
            self.bus.publish_normal(channel, bytes);
        }
        Ok(())
    }
}

/// Connects toy layers through the facade, by URL config.
struct ToyFactory;

#[async_trait]
impl LayerFactory for ToyFactory {
    async fn connect(&self, ns: &str, options: LayerOptions) -> Result<TestLayer> {
        register();
        let mut config = LayerConfig::from_url(&format!("toy://{ns}"))?;
        config.options = options;
        let layer = chanlayer::connect_config(config).await?;
        Ok(TestLayer {
            layer: layer.inner().clone(),
            injector: Arc::new(Inject {
                bus: Bus::named(ns),
            }),
        })
    }
}

chanlayer_testkit::conformance_tests!(ToyFactory);

#[tokio::test]
async fn the_toy_scheme_connects_by_url() {
    register();
    let layer = chanlayer::connect("toy://by-url")
        .await
        .expect("toy:// connects");
    assert_eq!(layer.capabilities().backend, "toy");
    assert!(chanlayer::schemes().contains(&"toy".to_owned()));
    let err = chanlayer::register_transport::<ToyTransport>("toy").expect_err("taken");
    assert!(err.to_string().contains("already registered"), "{err}");
}
