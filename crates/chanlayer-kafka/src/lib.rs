//! # chanlayer-kafka
//!
//! The Kafka backend of chanlayer, on [rdkafka] (librdkafka). Most applications use it
//! through the `chanlayer` facade with the `kafka` feature and a `kafka://` URL.
//!
//! ```no_run
//! # async fn run() -> chanlayer_core::Result<()> {
//! use chanlayer_core::{ChannelLayer, Codec, LayerConfig, Message};
//! let config = LayerConfig::from_url("kafka://127.0.0.1:9092?prefix=app")?;
//! let layer = chanlayer_kafka::KafkaLayer::connect(&config).await?;
//! let me = layer.new_channel("ws").await?;
//! layer.group_add("room.42", &me).await?;
//! layer.group_send("room.42", Message::encode_as("chat", &"hi", Codec::Json)?).await?;
//! assert_eq!(layer.receive(&me).await?.decode::<String>()?, "hi");
//! # Ok(()) }
//! ```
//!
//! ## Topics
//!
//! - Each layer instance creates an **inbox topic** `{prefix}.inbox.{instance}` (one
//!   partition) for its process-local channels, reads it alone (assigned, no consumer group),
//!   and deletes it on close. No instance reads another's inbox.
//! - **Normal channels** are topics `{prefix}.channel.{name}`, read through the consumer
//!   group of the same name: instances receiving one channel compete for its partitions.
//!   Offsets are committed after `receive` returns, after `ack`, or after a batch handler
//!   succeeds; never before.
//! - **Groups** go through one topic, `{prefix}.groups` (key: the group), that every
//!   instance reads from the end it found at connect, fanning out to its own members.
//! - The producer is idempotent with `acks=all`; `send` waits for the delivery report.
//!
//! ## Structure
//!
//! [`KafkaLayer`] is core's `TransportLayer` over [`KafkaTransport`]: core implements the
//! `ChannelLayer` operations (names, closed state, owner checks, the split between
//! process-local and normal channels, statistics, group bookkeeping and expiry, and the
//! ingest path that decodes and delivers what arrives); this crate moves the bytes. The
//! layer dereferences to the transport, so Kafka's own methods (`inbox_topic`,
//! `channel_topic`, `groups_topic`, `knows_closed`, `produce_raw`) are called on the layer.
//!
//! See `docs/backends/kafka.md` for the diagram, every option and the guarantees.
//!
//! [rdkafka]: https://docs.rs/rdkafka

mod cause;
mod config;
mod forward;
mod normal;
mod offsets;
mod producer;
mod receiver;
mod state;
mod topics;
mod transport;
mod worker;

pub use config::KafkaConfig;
pub use topics::{inbox_topic, list_inboxes, remove_inboxes, InboxTopic};
pub use transport::KafkaTransport;

/// The Kafka channel layer: core's `TransportLayer` over [`KafkaTransport`]. See the crate
/// docs; `KafkaLayer::connect(&config)` connects an instance.
pub type KafkaLayer = chanlayer_core::toolkit::TransportLayer<KafkaTransport>;

/// The backend's name in errors and capabilities.
pub const BACKEND: &str = "kafka";

/// What the Kafka backend guarantees.
///
/// Kafka has no broker-side queue length: a channel's capacity is enforced where messages
/// arrive (the instance's local inbox for process-local channels, the consumer's `prefetch`
/// buffer for normal channels), hence `broker_side_capacity: false`. Process-local channels
/// are at-most-once, as in Django Channels.
pub const CAPABILITIES: chanlayer_core::Capabilities =
    chanlayer_core::Capabilities::durable_broker(BACKEND);
