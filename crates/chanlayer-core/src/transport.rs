//! The transport contract: the narrow interface a backend implements. Core's
//! [`TransportLayer`](crate::toolkit::TransportLayer) implements [`ChannelLayer`](crate::ChannelLayer)
//! once over any [`Transport`]: names, closed handling, owner checks, the local/normal split,
//! statistics, settled local deliveries, group bookkeeping and expiry, and the ingest path
//! ([`Inbound`]).
//!
//! A transport moves bytes (or, in process, envelopes) to three kinds of address:
//!
//! - the **inbox** of a layer instance, which holds that instance's process-local
//!   (`prefix.instance!local`) channels: [`Transport::publish_local`];
//! - a **normal channel**, read by competing consumers: [`Transport::publish_normal`] and
//!   [`Transport::normal_reader`];
//! - a **group**: [`Transport::publish_group`] reaches every instance that bound the group
//!   ([`Transport::bind_group`], called by core on a group's first local member, and
//!   [`Transport::unbind_group`] on its last), and every normal channel a membership bound
//!   ([`Transport::bind_normal`] / [`Transport::unbind_normal`]).
//!
//! What arrives at an instance's inbox is handed to [`Inbound::ingest`] (or its batch and
//! bytes forms): core decodes, checks the owner, delivers to channels and local group
//! members, and counts what it drops.
//!
//! `docs/architecture.md` walks through adding a backend with this trait; the facade's
//! `tests/toy_backend.rs` is that walk-through, compiled and run against the conformance
//! suite.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::capabilities::Capabilities;
use crate::config::LayerConfig;
use crate::envelope::{Destination, Envelope};
use crate::error::{Error, Result};
use crate::inbound::Inbound;
use crate::inbox::LocalInbox;
pub use crate::incoming::{Incoming, Settler};

/// A message on its way out: validated and sealed by core (type, size, id, expiry), not yet
/// encoded. The transport encodes it into the form it sends.
#[derive(Debug)]
pub struct Outgoing<'a> {
    envelope: Envelope,
    destination: &'a str,
}

impl<'a> Outgoing<'a> {
    /// Wraps an envelope sealed for `destination` (its own `destination` field may be
    /// empty: the address travels here).
    pub fn new(envelope: Envelope, destination: &'a str) -> Self {
        Outgoing {
            envelope,
            destination,
        }
    }

    /// Channel or group.
    pub fn kind(&self) -> Destination {
        self.envelope.kind
    }

    /// The channel or group name.
    pub fn destination(&self) -> &'a str {
        self.destination
    }

    /// The size counted against `max_message_size` (body, type, headers, destination):
    /// a bound on what the body adds to the encoded envelope.
    pub fn wire_size(&self) -> usize {
        let e = &self.envelope;
        crate::message::wire_size(&e.body, &e.msg_type, self.destination, &e.headers)
    }

    /// The wire bytes (a versioned [`Envelope`]).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.envelope.body.len() + self.destination.len() + 96);
        self.encode_into(&mut out);
        out
    }

    /// Appends the wire bytes to `out` (a sender that reuses one buffer allocates nothing
    /// per message).
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        self.envelope.encode_to(self.destination, out);
    }

    /// The sealed envelope (for a transport with a wire of its own, such as
    /// [`asgi`](crate::asgi)).
    pub fn envelope(&self) -> &Envelope {
        &self.envelope
    }

    /// The envelope with an empty destination: for an in-process transport whose queue is
    /// the address (saves a copy of the name).
    pub fn into_unaddressed(self) -> Envelope {
        self.envelope
    }
}

/// What became of a published message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    /// The broker took it (or, for at-most-once transports, it was queued to be sent).
    Stored,
    /// Nobody can ever receive it (the owning instance is gone): core counts it
    /// `undeliverable` and the send still succeeds, as in Django Channels.
    Gone,
}

/// How this instance reads a normal channel.
pub enum NormalReader {
    /// From a source of ackable items (at-least-once transports).
    Source(Arc<dyn NormalSource>),
    /// From this instance's inbox: the transport subscribed the channel and its messages
    /// arrive through [`Inbound::ingest`] (at-most-once; `receive_delivery` and
    /// `receive_batch` are `Unsupported`).
    Inbox,
    /// From an in-process queue that every instance reading the channel shares (the memory
    /// backend's): core takes from it, each message for one reader, and puts back at the
    /// head of the channel what is nacked or dropped unsettled (at-least-once).
    Queue(Arc<LocalInbox>),
}

/// The consumer side of a normal channel on an at-least-once transport. Every method is
/// cancellation-safe: an item leaves the source only in the step that returns it.
#[async_trait]
pub trait NormalSource: Send + Sync {
    /// The next item, to be settled by the caller.
    async fn next(&self) -> Result<Incoming>;

    /// Up to `max` items: waits up to `timeout` for the first, then takes what is there.
    async fn next_batch(&self, max: usize, timeout: Duration) -> Result<Vec<Incoming>>;

    /// The next message, acked the way this transport acks `receive` (by default: at once,
    /// awaited).
    async fn next_auto(&self) -> Result<Envelope> {
        let item = self.next().await?;
        item.ack.ack().await?;
        Ok(item.envelope)
    }
}

/// A backend: moves messages to inboxes, normal channels and groups. See the module docs.
///
/// Methods return `Send` futures and are called through static dispatch (no boxing on the
/// send path); implement them with `async fn`.
pub trait Transport: Send + Sync + Sized + 'static {
    /// `true` for a transport whose normal channels are read from each instance's inbox
    /// ([`NormalReader::Inbox`]: subscribed, broadcast, at-most-once). Core then treats a
    /// normal channel's group membership like a process-local one: registered in
    /// [`Inbound::groups`], the group bound for this instance, copies fanned out on ingest
    /// to this instance's readers of that channel. `bind_normal` / `unbind_normal` are not
    /// called.
    const NORMAL_VIA_INBOX: bool = false;

    /// How instances on this transport name their process-local channels (read before
    /// [`open`](Self::open), which gets an [`Inbound`] whose id this naming made). By
    /// default chanlayer's own [`Naming::Layer`](crate::names::Naming::Layer).
    fn naming(_config: &LayerConfig) -> Result<crate::names::Naming> {
        Ok(crate::names::Naming::Layer)
    }

    /// Connects as `config` says. `inbound` is where this instance's inbox traffic goes
    /// (and holds its id, options, counters and close signal).
    fn open(
        config: &LayerConfig,
        inbound: Arc<Inbound>,
    ) -> impl Future<Output = Result<Self>> + Send;

    /// What this transport guarantees. Core reads `at_least_once_local` (local deliveries
    /// that come back on nack) and `backend` (error messages).
    fn capabilities(&self) -> Capabilities;

    /// Sends to the inbox of instance `owner` (a message for its process-local channel
    /// `out.destination()`). `Err(ChannelFull)` where the transport knows the channel is
    /// full; `Ok(Gone)` when that instance is gone.
    fn publish_local(
        &self,
        owner: &str,
        out: Outgoing<'_>,
    ) -> impl Future<Output = Result<Published>> + Send;

    /// Sends to normal channel `out.destination()`.
    fn publish_normal(&self, out: Outgoing<'_>) -> impl Future<Output = Result<Published>> + Send;

    /// Sends several messages to one channel, in order (`owner` is `Some` for a
    /// process-local channel). By default one by one. A failure after some were sent is
    /// [`Error::PartlySent`] with how many ([`Error::partly_sent`]); a transport that sends
    /// all or none returns the error itself. Returns how many were stored (the rest were
    /// `Gone`).
    fn publish_batch(
        &self,
        owner: Option<&str>,
        outs: Vec<Outgoing<'_>>,
    ) -> impl Future<Output = Result<usize>> + Send {
        async move {
            let (total, mut stored) = (outs.len(), 0);
            for (done, out) in outs.into_iter().enumerate() {
                let r = match owner {
                    Some(o) => self.publish_local(o, out).await,
                    None => self.publish_normal(out).await,
                };
                let r = r.map_err(|e| Error::partly_sent(done, total, e))?;
                stored += usize::from(r == Published::Stored);
            }
            Ok(stored)
        }
    }

    /// Sends to group `out.destination()`: every instance that bound it, every normal
    /// channel bound to it. Never `ChannelFull`; `Ok(Gone)` for a message the transport had
    /// to drop (counted `undeliverable` by core).
    fn publish_group(&self, out: Outgoing<'_>) -> impl Future<Output = Result<Published>> + Send;

    /// `group` has just got its first local member in this instance (registered in
    /// [`Inbound::groups`]): make group messages reach this instance's inbox, and return
    /// once they do. On an error core takes the membership back.
    fn bind_group(&self, group: &str) -> impl Future<Output = Result<()>> + Send;

    /// This instance's last local member of `group` went: group messages need not come here.
    fn unbind_group(&self, group: &str) -> impl Future<Output = Result<()>> + Send;

    /// Normal channel `channel` joins `group` (called on every `group_add`, which refreshes
    /// it): group messages must reach the channel's readers.
    fn bind_normal(&self, group: &str, channel: &str) -> impl Future<Output = Result<()>> + Send;

    /// The membership of normal channel `channel` in `group` ended (discarded or expired).
    fn unbind_normal(&self, group: &str, channel: &str) -> impl Future<Output = Result<()>> + Send;

    /// How this instance reads normal channel `channel` (starting a consumer or a
    /// subscription the first time).
    fn normal_reader(&self, channel: &str) -> impl Future<Output = Result<NormalReader>> + Send;

    /// Every member of `group` this transport can see across instances (sorted or not; core
    /// sorts), or `None` when it sees only this instance's (core then lists those). By
    /// default `None`.
    fn group_members(&self, group: &str) -> Option<Vec<String>> {
        let _ = group;
        None
    }

    /// Empties what the broker holds for this instance: queued messages of its inbox and of
    /// the normal channels it used. Core has already unbound its groups and clears the local
    /// inbox afterwards.
    fn flush(&self) -> impl Future<Output = Result<()>> + Send;

    /// Stops background work and releases broker resources. Called once, after core set
    /// the close signal.
    fn close(&self) -> impl Future<Output = Result<()>> + Send;

    /// The layer was dropped without `close`: release what can be released without
    /// waiting (called once, after core set the close signal). By default nothing.
    fn abandon(&self) {}

    /// Adds what the layer's `Debug` shows of this transport (the broker address, say;
    /// never credentials) after the backend and the instance id. By default nothing.
    fn debug_fields(&self, _f: &mut std::fmt::DebugStruct<'_, '_>) {}
}

/// A transport's own `Debug`: `name { .. }` with what its
/// [`debug_fields`](Transport::debug_fields) adds, the fields the layer's `Debug` shows.
pub fn fmt_transport<T: Transport>(
    transport: &T,
    name: &str,
    f: &mut std::fmt::Formatter<'_>,
) -> std::fmt::Result {
    let mut d = f.debug_struct(name);
    transport.debug_fields(&mut d);
    d.finish()
}
