//! The backend's name and what it guarantees (re-exported at the crate root).

use chanlayer_core::Capabilities;

/// The backend's name in errors and capabilities.
pub const BACKEND: &str = "kafka";

/// What the Kafka backend guarantees.
///
/// Kafka has no broker-side queue length: a channel's capacity is enforced where messages
/// arrive (the instance's local inbox for process-local channels, the consumer's `prefetch`
/// buffer for normal channels), hence `broker_side_capacity: false`. Process-local channels
/// are at-most-once, as in Django Channels.
pub const CAPABILITIES: Capabilities = Capabilities::durable_broker(BACKEND);
