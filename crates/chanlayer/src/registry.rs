//! The scheme registry: which backend a URL's scheme connects to. The built-in backends are
//! registered here (each behind its cargo feature); an application adds its own with
//! [`register_transport`] (a type implementing core's `Transport`) or [`register_scheme`]
//! (any connect function). Core lists no backend.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, LazyLock, PoisonError, RwLock, RwLockReadGuard};

use chanlayer_core::toolkit::{Transport, TransportLayer};
use chanlayer_core::{ChannelLayer, Error, LayerConfig, Result};

/// What connecting returns.
pub type Connecting = Pin<Box<dyn Future<Output = Result<Arc<dyn ChannelLayer>>> + Send>>;

/// A connect function: builds a layer from its configuration.
pub type Connector = Arc<dyn Fn(LayerConfig) -> Connecting + Send + Sync>;

/// A scheme's backend: its connector, or the cargo feature that would have compiled it in.
#[derive(Clone)]
enum Backend {
    Available(Connector),
    #[cfg_attr(
        all(feature = "kafka", feature = "amqp", feature = "zmq"),
        allow(dead_code)
    )]
    CompiledOut(&'static str),
}

fn transport_connector<T: Transport>() -> Connector {
    Arc::new(|config: LayerConfig| {
        Box::pin(async move {
            let layer = TransportLayer::<T>::connect(&config).await?;
            Ok(Arc::new(layer) as Arc<dyn ChannelLayer>)
        }) as Connecting
    })
}

/// The built-in schemes.
fn builtin() -> HashMap<String, Backend> {
    let mut m = HashMap::new();
    m.insert(
        "memory".to_owned(),
        Backend::Available(transport_connector::<chanlayer_core::memory::MemoryTransport>()),
    );
    // A backend behind its cargo feature: its transport, or the feature that would add it.
    macro_rules! backend {
        ($feature:literal, $transport:path, [$($scheme:literal),+]) => {
            #[cfg(feature = $feature)]
            let b = Backend::Available(transport_connector::<$transport>());
            #[cfg(not(feature = $feature))]
            let b = Backend::CompiledOut($feature);
            $(m.insert($scheme.to_owned(), b.clone());)+
        };
    }
    backend!("kafka", chanlayer_kafka::KafkaTransport, ["kafka"]);
    backend!("amqp", chanlayer_amqp::AmqpTransport, ["amqp", "amqps"]);
    backend!("zmq", chanlayer_zmq::ZmqTransport, ["zmq"]);
    m
}

static REGISTRY: LazyLock<RwLock<HashMap<String, Backend>>> =
    LazyLock::new(|| RwLock::new(builtin()));

fn registry() -> RwLockReadGuard<'static, HashMap<String, Backend>> {
    REGISTRY.read().unwrap_or_else(PoisonError::into_inner)
}

/// Registers `connect` for URLs with `scheme` (lowercase letters, digits, `+`, `-`, `.`,
/// starting with a letter). Fails if the scheme is taken (built-in schemes included, even
/// when their feature is off).
pub fn register_scheme(scheme: &str, connect: Connector) -> Result<()> {
    let lowercase = !scheme.bytes().any(|b| b.is_ascii_uppercase());
    if !(chanlayer_core::config::is_scheme(scheme) && lowercase) {
        return Err(Error::Config(format!(
            "{scheme:?} is not a URL scheme (lowercase letters, digits, '+', '-', '.', starting with a letter)"
        )));
    }
    let mut reg = REGISTRY.write().unwrap_or_else(PoisonError::into_inner);
    if reg.contains_key(scheme) {
        return Err(Error::Config(format!(
            "the scheme {scheme}:// is already registered"
        )));
    }
    reg.insert(scheme.to_owned(), Backend::Available(connect));
    Ok(())
}

/// Registers transport `T` for URLs with `scheme`: `connect("scheme://...")` then opens a
/// `TransportLayer<T>`. This is how a backend outside this crate plugs in (see
/// `docs/architecture.md`, "Add a backend").
///
/// ```
/// use chanlayer_core::memory::MemoryTransport;
/// // A scheme is registered once; `memory` is built in.
/// let err = chanlayer::register_transport::<MemoryTransport>("memory").unwrap_err();
/// assert!(err.to_string().contains("already registered"));
/// ```
pub fn register_transport<T: Transport>(scheme: &str) -> Result<()> {
    register_scheme(scheme, transport_connector::<T>())
}

/// The registered schemes, sorted.
pub fn schemes() -> Vec<String> {
    let mut v: Vec<String> = registry().keys().cloned().collect();
    v.sort();
    v
}

/// The connector of `scheme`, or an error that says why there is none.
pub(crate) fn connector(scheme: &str) -> Result<Connector> {
    let backend = registry().get(scheme).cloned();
    match backend {
        Some(Backend::Available(c)) => Ok(c),
        Some(Backend::CompiledOut(feature)) => Err(Error::Config(format!(
            "{scheme}:// needs the {feature} backend, which this build left out: enable the cargo feature `{feature}` of the chanlayer crate (chanlayer = {{ version = \"0.1\", features = [\"{feature}\"] }})"
        ))),
        None => Err(Error::Config(format!(
            "unknown scheme {scheme:?}; chanlayer knows {}",
            schemes().join(", ")
        ))),
    }
}
