//! [`Capabilities`]: what a backend guarantees, so callers (and the conformance suite) can
//! tell a weaker guarantee from a bug.

/// What a backend guarantees. The conformance suite checks each flag both ways: what a
/// backend claims, it does; where a flag is `false`, the backend reports `Unsupported` or
/// shows the documented weaker behaviour (and does not quietly do what it does not claim,
/// where that can be seen in one process).
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
    /// The capacity of **normal channels** is kept where their messages wait (the broker),
    /// for every sender: a `send` to a normal channel that holds its capacity of messages
    /// fails with `ChannelFull` and stores nothing, whichever layer instance or process
    /// sends it.
    ///
    /// When `false`, a `send` to a normal channel is not refused because the channel is at
    /// capacity (it returns `Ok`), and the backend documents what bounds the channel
    /// instead: the receiving instance drops what does not fit where it arrives (counted in
    /// `dropped_full`), or nothing is dropped and the broker keeps what its retention allows.
    ///
    /// Process-local channels are outside this flag. A `send` to a full one is either
    /// `ChannelFull` (where the sender can see the owner's inbox, as in the memory backend)
    /// or accepted and dropped where it arrives, counted in `dropped_full` (where each
    /// instance has one inbox queue or topic for all its process-local channels).
    pub broker_side_capacity: bool,
    /// Instances in different OS processes can talk to each other.
    pub cross_process: bool,
    /// Normal channels (names without `!`) exist. When `false` (AMQP with
    /// `wire=channels_rabbitmq`, as in Django's `channels_rabbitmq`), sending to, receiving
    /// from or adding to a group a normal channel is [`Unsupported`](crate::Error::Unsupported);
    /// process-local channels and groups work as usual.
    pub normal_channels: bool,
    /// `group_members` lists every instance's members (the memory backend, whose instances
    /// share one process). When `false`, it lists this instance's own: a broker does not
    /// tell who else is a member.
    pub all_group_members: bool,
    /// Message headers travel with the message. When `false` (AMQP with
    /// `wire=channels_rabbitmq`, whose wire format has no place for them), a message with
    /// headers is refused (a `Codec` error naming the dict), and the `otel` feature writes
    /// no trace context into sent messages.
    pub headers: bool,
}

impl Capabilities {
    /// The least a backend does: normal channels exist (`normal_channels`) and headers
    /// travel (`headers`), every guarantee `false`; a starting point for backends to switch
    /// on what they do.
    pub const fn none(backend: &'static str) -> Self {
        Capabilities {
            backend,
            single_reader_normal_channels: false,
            at_least_once: false,
            at_least_once_local: false,
            persistent: false,
            broker_side_capacity: false,
            cross_process: false,
            normal_channels: true,
            all_group_members: false,
            headers: true,
        }
    }

    /// A broker that keeps each normal channel as a durable queue read by competing,
    /// acknowledging consumers (an AMQP queue, a Kafka topic with its consumer group): single
    /// reader, at-least-once and persistent normal channels, across processes. Process-local
    /// channels stay at-most-once and `broker_side_capacity` stays `false`; a backend that
    /// does more says so with struct update syntax.
    pub const fn durable_broker(backend: &'static str) -> Self {
        Capabilities {
            single_reader_normal_channels: true,
            at_least_once: true,
            persistent: true,
            cross_process: true,
            ..Capabilities::none(backend)
        }
    }
}
