//! The factory that runs the suite on the in-memory backend.

use std::sync::Arc;

use async_trait::async_trait;
use chanlayer_core::{BackendConfig, LayerConfig, LayerOptions, MemoryLayer, Result};

use crate::{LayerFactory, RawInjector, TestLayer};

/// Connects [`MemoryLayer`]s on the named in-memory broker `memory://{ns}`.
#[derive(Debug, Clone, Copy, Default)]
pub struct MemoryFactory;

struct Inject(Arc<MemoryLayer>);

#[async_trait]
impl RawInjector for Inject {
    async fn inject(&self, _channel: &str, bytes: Vec<u8>) -> Result<()> {
        self.0.inject_raw(&bytes).map(|_| ())
    }
}

#[async_trait]
impl LayerFactory for MemoryFactory {
    async fn connect(&self, ns: &str, options: LayerOptions) -> Result<TestLayer> {
        let config = LayerConfig {
            options,
            backend: BackendConfig {
                scheme: "memory".into(),
                address: ns.to_owned(),
                ..BackendConfig::default()
            },
        };
        let layer = Arc::new(MemoryLayer::connect(&config).await?);
        Ok(TestLayer {
            layer: layer.clone(),
            injector: Arc::new(Inject(layer)),
        })
    }
}
