//! # chanlayer-core
//!
//! The contract every chanlayer backend implements and the pieces they all share:
//!
//! - [`ChannelLayer`]: the object-safe trait (send, receive, groups, deliveries, batches).
//! - [`Message`] / [`MessageType`] / [`Codec`]: typed bodies in bincode, msgpack or json.
//! - [`Envelope`](toolkit::Envelope): the versioned wire format (bincode 2).
//! - [`names`]: channel and group name rules, process-local channel names.
//! - [`Error`]: the one error enum.
//! - [`LayerConfig`] / [`LayerOptions`]: configuration and URL parsing.
//! - [`MemoryLayer`]: the in-memory backend (`memory://`).
//! - [`inspect`]: ask every instance of a deployment for its group members and counters.
//!
//! That is what applications use (the `chanlayer` facade re-exports it). Backends use the
//! [`toolkit`]: the [`Transport`](toolkit::Transport) contract they implement, and
//! [`TransportLayer`](toolkit::TransportLayer), the one `ChannelLayer` implementation over
//! any transport, with the pieces it is built from (the per-instance
//! [`LocalInbox`](toolkit::LocalInbox) with capacity and expiry, the
//! [`GroupRegistry`](toolkit::GroupRegistry), the ingest path
//! [`Inbound`](toolkit::Inbound)).
//!
//! Most applications use the `chanlayer` facade crate instead of this one.

pub mod asgi;
pub mod batch;
pub mod capabilities;
pub mod clock;
pub mod codec;
pub mod config;
pub mod delivery;
pub mod envelope;
pub mod error;
mod expiry;
pub mod groups;
pub mod inbound;
pub mod inbox;
pub mod incoming;
pub mod inspect;
pub mod layer;
pub mod memory;
pub mod message;
mod name_cache;
pub mod names;
#[cfg(feature = "otel")]
pub mod otel;
pub mod poison;
pub mod signal;
pub mod stats;
pub mod telemetry;
pub mod transport;
pub mod transport_layer;

pub use batch::{handle_batch, BatchError};
pub use capabilities::Capabilities;
pub use codec::Codec;
pub use config::{BackendConfig, LayerConfig, LayerOptions, PartialOptions, Secret};
pub use delivery::{AckHandle, Delivery, DeliveryInfo};
pub use envelope::MessageId;
pub use error::{Error, NameKind, Result};
pub use layer::ChannelLayer;
pub use memory::MemoryLayer;
pub use message::{Headers, Message, MessageType};
pub use stats::StatsSnapshot;

/// What backends are built from: the [`Transport`](transport::Transport) contract,
/// [`TransportLayer`](transport_layer::TransportLayer) (the one `ChannelLayer`
/// implementation), and the shared pieces it uses. Applications do not need this module.
pub mod toolkit {
    pub use crate::clock::now_ms;
    pub use crate::delivery::Acknowledger;
    pub use crate::envelope::{Destination, Envelope, EnvelopeError};
    pub use crate::groups::GroupRegistry;
    pub use crate::inbound::{requeuing_incoming, Inbound};
    pub use crate::inbox::{CloseSignal, Entry, LocalInbox};
    pub use crate::stats::Stats;
    pub use crate::transport::{
        fmt_transport, Incoming, NormalReader, NormalSource, Outgoing, Published, Settler,
        Transport,
    };
    pub use crate::transport_layer::TransportLayer;
    pub use async_trait::async_trait;

    /// Locks a mutex, taking the data of a poisoned one (every critical section in
    /// chanlayer leaves its data consistent before anything that can panic).
    pub fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
