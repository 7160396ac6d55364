//! # chanlayer-core
//!
//! The contract every chanlayer backend implements and the pieces they all share:
//!
//! - [`ChannelLayer`]: the object-safe trait (send, receive, groups, deliveries, batches).
//! - [`Message`] / [`MessageType`] / [`Codec`]: typed bodies in bincode, msgpack or json.
//! - [`Envelope`]: the versioned wire format (bincode 2).
//! - [`names`]: channel and group name rules, process-local channel names.
//! - [`Error`]: the one error enum.
//! - [`LayerConfig`] / [`LayerOptions`]: configuration and URL parsing.
//! - [`LocalInbox`] and [`GroupRegistry`]: per-instance demultiplexing with capacity and
//!   expiry, and group membership with expiry. Backends are transports around these.
//! - [`MemoryLayer`]: the in-memory backend (`memory://`).
//!
//! Most applications use the `chanlayer` facade crate instead of this one.

pub mod capabilities;
pub mod clock;
pub mod codec;
pub mod config;
pub mod delivery;
pub mod envelope;
pub mod error;
pub mod groups;
pub mod inbox;
pub mod layer;
pub mod memory;
pub mod message;
pub mod names;
pub mod stats;

pub use capabilities::Capabilities;
pub use codec::Codec;
pub use config::{BackendConfig, LayerConfig, LayerOptions, PartialOptions, Secret};
pub use delivery::{handle_batch, AckHandle, Acknowledger, BatchError, Delivery, DeliveryInfo};
pub use envelope::{Destination, Envelope, EnvelopeError, MessageId};
pub use error::{Error, NameKind, Result};
pub use groups::GroupRegistry;
pub use inbox::{CloseSignal, Entry, LocalInbox};
pub use layer::ChannelLayer;
pub use memory::MemoryLayer;
pub use message::{Headers, Message, MessageType};
pub use stats::{Stats, StatsSnapshot};

pub use async_trait::async_trait;
