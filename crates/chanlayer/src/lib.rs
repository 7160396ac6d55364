//! # chanlayer
//!
//! Channel layers for Rust services: send to a named channel, receive from it, broadcast to
//! groups, over a broker picked by one URL: `memory://` (built in), `kafka://`, `amqp://`,
//! `zmq://` (each behind its cargo feature).
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let layer = chanlayer::connect("memory://").await?;
//! let me = layer.new_channel("ws").await?;
//! layer.group_add("room.42", &me).await?;
//! layer.group_send_as("room.42", "chat.message", &"hi").await?;
//! let msg = layer.receive(&me).await?;
//! assert_eq!(msg.message_type(), "chat.message");
//! assert_eq!(msg.decode::<String>()?, "hi");
//! # Ok::<(), chanlayer::Error>(())
//! # }).unwrap();
//! ```
//!
//! - [`connect`] / [`connect_config`] / [`from_env`]: one layer.
//! - [`Layers`]: named layers from a TOML file and `CHANLAYER_<ALIAS>_URL`.
//! - [`Layer`]: the cloneable handle, with typed `send` / `receive_as` / `group_send`.
//! - [`register_transport`] / [`register_scheme`]: plug in a backend of your own.
//! - The application API of [`chanlayer_core`] is re-exported here (its `toolkit`, for
//!   writing backends, is not).

mod aliases;
mod connect;
mod layer;
mod registry;

pub use aliases::Layers;
pub use connect::{connect, connect_config, from_env, ENV_URL};
pub use layer::Layer;
pub use registry::{register_scheme, register_transport, schemes, Connecting, Connector};

pub use chanlayer_core::{
    capabilities, codec, config, delivery, handle_batch, inspect, names, telemetry, AckHandle,
    BatchError, Capabilities, ChannelLayer, Codec, Delivery, DeliveryInfo, Error, Headers,
    LayerConfig, LayerOptions, MemoryLayer, Message, MessageId, MessageType, NameKind, Result,
    StatsSnapshot,
};

/// W3C trace context in message headers (feature `otel`): the layer writes and reads it
/// itself; [`otel::adopt`] puts a span of yours in the sender's trace.
#[cfg(feature = "otel")]
pub use chanlayer_core::otel;

/// The README's Rust examples, compiled and run as doc tests so they stay true.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;
