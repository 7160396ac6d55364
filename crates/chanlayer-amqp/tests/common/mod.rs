//! Shared by the AMQP backend's test binaries: the broker URL, a layer factory for the
//! conformance suite, and helpers.
#![allow(dead_code)]

use std::sync::Arc;

use async_trait::async_trait;
use chanlayer_amqp::AmqpLayer;
use chanlayer_core::{LayerConfig, LayerOptions, Result};
use chanlayer_testkit::{LayerFactory, RawInjector, TestLayer};

/// The broker the tests use: `CHANLAYER_AMQP_URL`, or the local RabbitMQ that
/// `scripts/test` starts. Test queues expire 10 minutes after their last use
/// (`queue_expires`), so test runs leave nothing behind on the broker.
pub fn broker_url() -> String {
    std::env::var("CHANLAYER_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// `broker_url()` plus `extra` query options.
pub fn url_with(extra: &str) -> String {
    let base = broker_url();
    let sep = if base.contains('?') { '&' } else { '?' };
    format!(
        "{base}{sep}queue_expires=600s&reconnect_timeout=60s{}{extra}",
        if extra.is_empty() { "" } else { "&" }
    )
}

/// Connects an AMQP layer with `options` (prefix = the test's namespace).
pub async fn connect(options: LayerOptions, extra: &str) -> Result<AmqpLayer> {
    let mut config = LayerConfig::from_url(&url_with(extra))?;
    config.options = options;
    AmqpLayer::connect(&config).await
}

/// The conformance suite's factory.
pub struct AmqpFactory;

struct Inject(Arc<AmqpLayer>);

#[async_trait]
impl RawInjector for Inject {
    async fn inject(&self, channel: &str, bytes: Vec<u8>) -> Result<()> {
        self.0.publish_raw(channel, &bytes).await
    }
}

#[async_trait]
impl LayerFactory for AmqpFactory {
    async fn connect(&self, _ns: &str, options: LayerOptions) -> Result<TestLayer> {
        let layer = Arc::new(connect(options, "").await?);
        Ok(TestLayer {
            layer: layer.clone(),
            injector: Arc::new(Inject(layer)),
        })
    }
}
