//! Connecting by URL or configuration (the scheme's backend comes from the registry).

use chanlayer_core::{Error, LayerConfig, Result};

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

/// Connects to the layer `config` describes, through the backend registered for its scheme
/// (see [`register_transport`](crate::register_transport)).
pub async fn connect_config(config: LayerConfig) -> Result<Layer> {
    let connect = crate::registry::connector(&config.backend.scheme)?;
    Ok(Layer::new(connect(config).await?))
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
