//! Shared by the Kafka backend's test binaries: the broker address, a layer factory for the
//! conformance suite, and helpers.
#![allow(dead_code)]

pub mod nodes;

use std::sync::Arc;

use async_trait::async_trait;
use chanlayer_core::{names, ChannelLayer, LayerConfig, LayerOptions, Result};
use chanlayer_kafka::KafkaLayer;
use chanlayer_testkit::{LayerFactory, RawInjector, TestLayer};

/// The broker the tests use: `KAFKA_BOOTSTRAP` (`host:port[,host:port]`), or the local
/// Apache Kafka broker that `scripts/brokers/kafka.sh` starts on 127.0.0.1:9092.
pub fn bootstrap() -> String {
    std::env::var("KAFKA_BOOTSTRAP").unwrap_or_else(|_| "127.0.0.1:9092".to_owned())
}

/// The `kafka://` URL of [`bootstrap`] plus `extra` query options. Test topics are kept an
/// hour (`retention`), and group sessions are short so a closed reader's partitions move
/// quickly.
pub fn url_with(extra: &str) -> String {
    format!(
        "kafka://{}?retention=1h&session_timeout=6s{}{extra}",
        bootstrap(),
        if extra.is_empty() { "" } else { "&" }
    )
}

/// Connects a Kafka layer with `options` (prefix = the test's namespace).
pub async fn connect(options: LayerOptions, extra: &str) -> Result<KafkaLayer> {
    let mut config = LayerConfig::from_url(&url_with(extra))?;
    config.options = options;
    KafkaLayer::connect(&config).await
}

/// The conformance suite's factory.
pub struct KafkaFactory;

struct Inject(Arc<KafkaLayer>);

#[async_trait]
impl RawInjector for Inject {
    async fn inject(&self, channel: &str, bytes: Vec<u8>) -> Result<()> {
        let topic = match names::owner_instance(channel) {
            Some(owner) => chanlayer_kafka::inbox_topic(&self.0.options().prefix, owner),
            None => self.0.channel_topic(channel),
        };
        self.0.produce_raw(&topic, None, &bytes).await
    }
}

#[async_trait]
impl LayerFactory for KafkaFactory {
    async fn connect(&self, _ns: &str, options: LayerOptions) -> Result<TestLayer> {
        let layer = Arc::new(connect(options, "").await?);
        Ok(TestLayer {
            layer: layer.clone(),
            injector: Arc::new(Inject(layer)),
        })
    }
}
