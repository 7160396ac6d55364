//! # chanlayer-amqp
//!
//! The AMQP 0-9-1 backend of chanlayer (RabbitMQ first), on [lapin]. Most applications use it
//! through the `chanlayer` facade with the `amqp` feature and an `amqp://` or `amqps://` URL.
//!
//! ```no_run
//! # async fn run() -> chanlayer_core::Result<()> {
//! use chanlayer_core::{ChannelLayer, Codec, LayerConfig, Message};
//! let config = LayerConfig::from_url("amqp://guest:guest@127.0.0.1:5672/%2f?prefix=app")?;
//! let layer = chanlayer_amqp::AmqpLayer::connect(&config).await?;
//! let me = layer.new_channel("ws").await?;
//! layer.group_add("room.42", &me).await?;
//! layer.group_send("room.42", Message::encode_as("chat", &"hi", Codec::Json)?).await?;
//! assert_eq!(layer.receive(&me).await?.decode::<String>()?, "hi");
//! # Ok(()) }
//! ```
//!
//! ## Topology
//!
//! - Each layer instance declares one **exclusive inbox queue** `{prefix}.inbox.{instance}`
//!   (`x-max-length` = `inbox_capacity`, `x-overflow = reject-publish`, `x-message-ttl` =
//!   `expiry`) for its process-local channels, consumed without acks (at-most-once, as in
//!   Django Channels).
//! - **Normal channels** are durable queues `{prefix}.channel.{name}` (`x-max-length` = the
//!   channel's capacity, `reject-publish`), read by competing consumers with manual acks and a
//!   prefetch window: at-least-once with `receive_delivery` / `ack` / `nack`. Classic queues,
//!   or with `queue_type=quorum` quorum queues, replicated across a RabbitMQ cluster.
//! - **Groups** go through a durable direct exchange `{prefix}.groups`; an instance binds its
//!   inbox with the group as routing key on the first local member and unbinds on the last.
//! - Every publish waits for the broker's **publisher confirm**: a broker nack (a full queue)
//!   is `ChannelFull` for `send` and a counted skip for `group_send`.
//! - A lost connection is restored in the background with backoff: the inbox is declared
//!   again under the same name, groups are bound again, consumers resume. Operations wait up to
//!   `reconnect_timeout` for it. With several hosts in the URL
//!   (`amqp://u:p@h1:5672,h2:5672,h3:5672/%2f`), the nodes of a cluster, the layer tries them
//!   in turn, starting with the one after the node it lost.
//!
//! See `docs/backends/amqp.md` for the diagram, every option and the guarantees.
//!
//! [lapin]: https://docs.rs/lapin

mod config;
mod connection;
mod groups;
mod inbox;
mod normal;
mod session;
mod shared;
mod topology;
mod transport;

pub use config::{AmqpConfig, QueueType, Wire};
pub use transport::AmqpTransport;

/// The AMQP channel layer: core's `TransportLayer` over [`AmqpTransport`].
/// `AmqpLayer::connect(&config)` connects; the transport's own methods
/// ([`AmqpTransport::reconnects`], [`AmqpTransport::inbox_queue`], ...) are reachable on the
/// layer directly.
pub type AmqpLayer = chanlayer_core::toolkit::TransportLayer<AmqpTransport>;

use chanlayer_core::Capabilities;

/// The backend's name in errors and capabilities.
pub const BACKEND: &str = "amqp";

/// What the AMQP backend guarantees.
///
/// `broker_side_capacity: true`: a normal channel's capacity is kept by the broker
/// (`x-max-length` with reject-publish and publisher confirms), so a `send` to a full one
/// is `ChannelFull` whichever instance or process sends. Process-local channels, which the
/// flag does not cover, share their instance's inbox queue: their per-channel capacity is
/// enforced where they arrive (a message for a full local channel is dropped there and
/// counted in `dropped_full`).
pub const CAPABILITIES: Capabilities = Capabilities {
    broker_side_capacity: true,
    ..Capabilities::durable_broker(BACKEND)
};

/// What the AMQP backend guarantees with `wire=channels_rabbitmq`: process-local channels
/// and groups across processes, at-most-once, no normal channels (as in Django's
/// `channels_rabbitmq`), and no headers (the ASGI message dict has no place for them).
pub const CHANNELS_RABBITMQ_CAPABILITIES: Capabilities = Capabilities {
    cross_process: true,
    normal_channels: false,
    headers: false,
    ..Capabilities::none(BACKEND)
};
