//! Connecting by URL or configuration: the one place that maps a scheme to a backend.

use std::sync::Arc;

use chanlayer_core::{config::SCHEMES, Error, LayerConfig, MemoryLayer, Result};

use crate::Layer;

/// The environment variable [`from_env`] reads.
pub const ENV_URL: &str = "CHANLAYER_URL";

/// Connects to the layer a URL describes: `memory://`, `memory://NAME`, `kafka://...`,
/// `amqp://...`, `amqps://...`, `zmq://...` (see `docs/configuration.md`).
///
/// A scheme whose backend was compiled out is a [`Error::Config`] naming the cargo feature
/// to enable. Errors never contain the password.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let layer = chanlayer::connect("memory://?capacity=10").await.unwrap();
/// assert_eq!(layer.options().capacity, 10);
/// # });
/// ```
pub async fn connect(url: &str) -> Result<Layer> {
    connect_config(LayerConfig::from_url(url)?).await
}

/// Connects to the layer `config` describes.
pub async fn connect_config(config: LayerConfig) -> Result<Layer> {
    let scheme = config.backend.scheme.as_str();
    match scheme {
        "memory" => Ok(Layer::new(Arc::new(MemoryLayer::connect(&config).await?))),
        #[cfg(feature = "kafka")]
        "kafka" => Ok(Layer::new(Arc::new(
            chanlayer_kafka::KafkaLayer::connect(&config).await?,
        ))),
        #[cfg(feature = "amqp")]
        "amqp" | "amqps" => Ok(Layer::new(Arc::new(
            chanlayer_amqp::AmqpLayer::connect(&config).await?,
        ))),
        #[cfg(feature = "zmq")]
        "zmq" => Ok(Layer::new(Arc::new(
            chanlayer_zmq::ZmqLayer::connect(&config).await?,
        ))),
        other => {
            // Every backend whose feature is on was matched above: this one was left out.
            let feature = SCHEMES
                .iter()
                .find(|(s, _)| *s == other)
                .and_then(|(_, f)| *f)
                .ok_or_else(|| Error::Config(format!("unknown scheme {other:?}")))?;
            Err(Error::Config(format!(
                "{other}:// needs the {feature} backend, which this build left out: enable the cargo feature `{feature}` of the chanlayer crate (chanlayer = {{ version = \"0.1\", features = [\"{feature}\"] }})"
            )))
        }
    }
}

/// Connects to the URL in `CHANLAYER_URL`.
pub async fn from_env() -> Result<Layer> {
    match std::env::var(ENV_URL) {
        Ok(url) => connect(&url).await,
        Err(_) => Err(Error::Config(format!(
            "{ENV_URL} is not set; set it to a layer URL such as memory:// or amqp://guest:guest@127.0.0.1:5672/%2f"
        ))),
    }
}
