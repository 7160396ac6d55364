//! # chanlayer-zmq
//!
//! The ZeroMQ backend of chanlayer, on the [zmq] crate (libzmq 4.3, built from source). Most
//! applications use it through the `chanlayer` facade with the `zmq` feature and a `zmq://`
//! URL.
//!
//! ```no_run
//! # async fn run() -> chanlayer_core::Result<()> {
//! use chanlayer_core::{ChannelLayer, Codec, LayerConfig, Message};
//! // Embedded mode: this process publishes on 127.0.0.1:5556, every instance subscribes.
//! let config = LayerConfig::from_url("zmq://127.0.0.1:5556?prefix=app")?;
//! let layer = chanlayer_zmq::ZmqLayer::connect(&config).await?;
//! let me = layer.new_channel("ws").await?;
//! layer.group_add("room.42", &me).await?;
//! layer.group_send("room.42", Message::encode_as("chat", &"hi", Codec::Json)?).await?;
//! assert_eq!(layer.receive(&me).await?.decode::<String>()?, "hi");
//! # Ok(()) }
//! ```
//!
//! ## Two topologies
//!
//! - **Embedded** (`zmq://HOST:PORT`, `zmq://ipc:///path`): the process that sends binds an
//!   XPUB socket at the address (on its first send, or at connect with `bind=eager`); every
//!   layer instance, in any process, connects one SUB socket to it. One process per address
//!   sends; a second process that tries to bind gets a clear error. The instances of one
//!   process share its publisher.
//! - **Dedicated** (`zmq://?pull=tcp://H:5557&pub=tcp://H:5558`): every instance connects a
//!   PUSH socket to a proxy's PULL and a SUB socket to its PUB; any number of processes
//!   send. The proxy is [`Proxy`] (in a process) or `chanlayer zmq-proxy` (a daemon).
//!
//! ## Topics
//!
//! One SUB socket per instance, subscribed to NUL-terminated topics that never prefix-collide
//! (see [`wire`]): `i:{prefix}:{instance}\0` carries the instance's process-local channels
//! (`new_channel()` names route to their owner through the instance id they contain),
//! `c:{prefix}:{channel}\0` a normal channel the instance receives, `g:{prefix}:{group}\0` a
//! group with a member in the instance. The envelope travels as the last frame; under load,
//! consecutive messages of one topic travel together as one batch frame (fewer, larger
//! ZeroMQ messages; a message with nothing queued behind it goes out alone, at once).
//!
//! ## Guarantees
//!
//! PUB/SUB is at-most-once, and a subscription made after a message was published does not
//! see it. chanlayer narrows what that loses:
//!
//! - **Subscription handshake.** Every subscription is followed by a probe that the
//!   publisher (XPUB) answers; `group_add` returns once the answer came, so every message
//!   published after `group_add` returns reaches the member (while connected).
//! - **Late-joiner replay.** The publisher keeps the recent messages of normal channels (and
//!   inbox messages no subscriber was there for) and replays them to a new subscriber: a
//!   message sent to a normal channel before anyone received it arrives when the first
//!   `receive` subscribes (within `retain` / `retain_for`).
//! - **Counted losses.** Each topic's messages are numbered; a gap is a message PUB/SUB
//!   dropped (a subscriber at its high-water mark, a broken connection) and is counted in
//!   [`TransportStats::lost`]. In dedicated mode each sender's own numbering travels end to
//!   end (see [`wire::Origin`]), so what a proxy restart loses is counted too. The
//!   publisher counts what reached nobody ([`HubStats`]).
//!
//! Normal channels are **broadcast**: every instance receiving a channel gets every message
//! (`single_reader_normal_channels: false`), and there is no ack (`at_least_once: false`:
//! `receive_delivery` / `receive_batch` on normal channels are `Unsupported`).
//!
//! See `docs/backends/zmq.md` for the diagrams, every option, and exactly when messages
//! can be lost.
//!
//! [zmq]: https://docs.rs/zmq

mod bridge;
mod config;
mod hub;
mod origins;
mod proxy;
mod publisher;
mod receiver;
mod retention;
mod sender;
mod seq;
mod transport;
pub mod wire;

pub use config::{
    check_endpoint, curve_available, decode_z85_key, BindPolicy, CurveKeys, Mode, SocketOption,
    ZmqConfig, DEFAULT_PORT, DEFAULT_PUB_PORT, DEFAULT_PULL_PORT,
};
pub use hub::HubStats;
pub use transport::{TransportStats, ZmqTransport};

/// The ZeroMQ channel layer: core's `TransportLayer` over [`ZmqTransport`].
/// `ZmqLayer::connect(&config)` connects; the transport's own methods
/// ([`ZmqTransport::transport_stats`], [`ZmqTransport::publisher_stats`], ...) are reachable
/// on the layer directly.
pub type ZmqLayer = chanlayer_core::toolkit::TransportLayer<ZmqTransport>;
pub use proxy::{Proxy, ProxyConfig};
pub use retention::Retention;

use chanlayer_core::Capabilities;

/// The backend's name in errors and capabilities.
pub const BACKEND: &str = "zmq";

/// What the ZeroMQ backend guarantees.
///
/// Normal channels are PUB/SUB topics: every instance that receives one gets every message
/// (broadcast, not competing consumers), and nothing is acked or redelivered. Messages live
/// in memory only (the publisher's retention and the receivers' inboxes), and capacity is
/// enforced where messages arrive (each instance's `LocalInbox`), so a full channel drops
/// (counted in `stats().dropped_full`) rather than refusing the send.
pub const CAPABILITIES: Capabilities = Capabilities {
    cross_process: true,
    ..Capabilities::none(BACKEND)
};
