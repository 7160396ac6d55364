//! [`Capabilities`]: what a backend guarantees, so callers (and the conformance suite) can
//! tell a weaker guarantee from a bug.

/// What a backend guarantees. The conformance suite reads these: where a flag is `false`,
/// it checks that the backend reports `Unsupported` or shows the documented weaker behaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// The backend's name (`memory`, `kafka`, `amqp`, `zmq`).
    pub backend: &'static str,
    /// Several instances receiving one normal channel compete: each message reaches exactly
    /// one of them. When `false`, every receiver gets every message (broadcast).
    pub single_reader_normal_channels: bool,
    /// `receive_delivery` / `ack` / `nack` on normal channels: unacked messages come back.
    pub at_least_once: bool,
    /// The same for process-local channels (usually at-most-once, as in Django Channels).
    pub at_least_once_local: bool,
    /// Messages survive a broker restart.
    pub persistent: bool,
    /// Capacity is enforced by the broker, across processes, not only by the local inbox.
    pub broker_side_capacity: bool,
    /// Instances in different OS processes can talk to each other.
    pub cross_process: bool,
}

impl Capabilities {
    /// Everything `false`: a starting point for backends to switch on what they do.
    pub const fn none(backend: &'static str) -> Self {
        Capabilities {
            backend,
            single_reader_normal_channels: false,
            at_least_once: false,
            at_least_once_local: false,
            persistent: false,
            broker_side_capacity: false,
            cross_process: false,
        }
    }
}
