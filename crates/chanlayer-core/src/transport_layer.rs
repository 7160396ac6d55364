//! [`TransportLayer`]: the one implementation of [`ChannelLayer`], over any [`Transport`].
//!
//! Everything that is the same for every backend happens here: name checks, the closed
//! state, `NotOwner`, the split between process-local channels (this instance's
//! [`LocalInbox`](crate::toolkit::LocalInbox)) and normal channels (the transport's
//! [`NormalReader`]), counters, settled or requeuing local deliveries, and group
//! bookkeeping: a group is bound at the transport on its first local member and unbound on
//! its last; normal-channel memberships are bound on every `group_add` and unbound when
//! discarded; a background task unbinds memberships the moment they expire, so an expired
//! membership receives nothing on any backend.

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tracing::Instrument;

use crate::capabilities::Capabilities;
use crate::config::{LayerConfig, LayerOptions};
use crate::delivery::{AckHandle, Delivery};
use crate::envelope::{Destination, Envelope};
use crate::error::{Error, Result};
use crate::expiry::{expiry_task, GroupState};
use crate::inbound::{requeuing_incoming, Inbound};
use crate::inbox::{Entry, LocalInbox};
use crate::layer::ChannelLayer;
use crate::message::Message;
use crate::name_cache::{self, Check, Known, Route, SERIALS};
use crate::names;
#[cfg(feature = "otel")]
use crate::otel::received_in;
use crate::stats::StatsSnapshot;
use crate::telemetry::{self, Kind};
use crate::transport::{Incoming, NormalReader, NormalSource, Outgoing, Published, Transport};

mod groups;

/// A [`ChannelLayer`] over transport `T`. Backends name it (`AmqpLayer` is
/// `TransportLayer<AmqpTransport>`); it dereferences to the transport for what only that
/// backend has.
pub struct TransportLayer<T: Transport> {
    /// This instance's number in the process (the key of its names in `name_cache`).
    serial: u64,
    inbound: Arc<Inbound>,
    transport: Arc<T>,
    caps: Capabilities,
    groups: Arc<GroupState>,
}

impl<T: Transport> std::fmt::Debug for TransportLayer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("TransportLayer");
        d.field("backend", &self.caps.backend)
            .field("instance", &self.inbound.id());
        self.transport.debug_fields(&mut d);
        d.finish()
    }
}

impl<T: Transport> std::ops::Deref for TransportLayer<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.transport
    }
}

impl<T: Transport> TransportLayer<T> {
    /// Connects a new instance: opens the transport and starts the group expiry task.
    /// Needs a tokio runtime.
    pub async fn connect(config: &LayerConfig) -> Result<Self> {
        config.options.validate()?;
        let naming = T::naming(config)?;
        let inbound = Arc::new(Inbound::new(
            config.options.clone(),
            T::NORMAL_VIA_INBOX,
            naming,
        ));
        let transport = Arc::new(T::open(config, inbound.clone()).await?);
        let caps = transport.capabilities();
        inbound.stats().export(caps.backend);
        tokio::spawn(inbound.clone().export_metrics());
        let groups = Arc::new(GroupState::default());
        tokio::spawn(expiry_task(
            Arc::downgrade(&transport),
            inbound.clone(),
            groups.clone(),
        ));
        crate::inspect::start(&transport, &inbound, &groups, caps).await;
        Ok(TransportLayer {
            serial: SERIALS.fetch_add(1, Ordering::Relaxed),
            inbound,
            transport,
            caps,
            groups,
        })
    }

    /// This instance's receiving side.
    pub fn inbound(&self) -> &Arc<Inbound> {
        &self.inbound
    }

    /// Runs operation `op` (on an address of `kind`) in its span: `Closed` if it failed
    /// because the layer closed. The per-message operations (send, group_send, the
    /// receives) do the same inline, without this extra future around theirs.
    async fn run<R>(
        &self,
        op: &'static str,
        kind: Kind,
        f: impl std::future::Future<Output = Result<R>>,
    ) -> Result<R> {
        self.wins(f.instrument(self.span(op, kind)).await)
    }

    /// `r`, or `Closed` if it failed because the layer closed ([`CloseSignal::closed_wins`](crate::toolkit::CloseSignal::closed_wins)).
    fn wins<R>(&self, r: Result<R>) -> Result<R> {
        self.inbound.closed().closed_wins(r)
    }

    /// Channel `name` for an operation of check `which`: its kind, and what this thread
    /// found when it last passed that check for it on this instance.
    fn target<'a>(&self, name: &'a str, which: Check) -> Target<'a> {
        let known = name_cache::known(self.serial, name, which);
        Target {
            name,
            kind: known.map_or_else(|| Kind::of_channel(name), |k| k.kind),
            known,
        }
    }

    /// `message` [traced](Self::traced), checked and sealed for `name`.
    fn seal(&self, kind: Destination, name: &str, message: Message) -> Result<Envelope> {
        Envelope::seal_unaddressed(kind, name, self.traced(message), self.inbound.options())
    }

    /// Where `channel` is read: this instance's inbox (a process-local channel, or a normal
    /// one of a transport that reads normal channels from the inbox), else the transport's
    /// source or queue. `acking` names an operation that settles what it takes: on an
    /// inbox-read normal channel there is nothing to settle, and it is `Unsupported`.
    async fn source(&self, target: Target<'_>, acking: Option<&'static str>) -> Result<Take<'_>> {
        let (i, channel, kind) = (&self.inbound, target.name, target.kind);
        i.closed().check()?;
        if target.known.is_none() {
            i.naming().check_receiver(channel, i.id())?;
            self.check_kind(acking.unwrap_or("receive"), channel)?;
            let known = Known {
                kind,
                route: Route::Normal,
            };
            name_cache::remember(self.serial, channel, Check::Receive, known);
        }
        let inbox = Take::Queue(Cow::Borrowed(i.inbox()));
        if kind == Kind::Local {
            return Ok(inbox);
        }
        match (self.transport.normal_reader(channel).await?, acking) {
            (NormalReader::Source(s), _) => Ok(Take::Source(s)),
            (NormalReader::Queue(q), _) => Ok(Take::Queue(Cow::Owned(q))),
            (NormalReader::Inbox, None) => Ok(inbox),
            (NormalReader::Inbox, Some(operation)) => Err(Error::unsupported(
                operation,
                self.caps.backend,
                format!(
                    "normal channels on {} are at-most-once (there is nothing to ack or redeliver); use receive, or a backend with at-least-once normal channels (kafka, amqp)",
                    self.caps.backend
                ),
            )),
        }
    }

    /// `Unsupported` for a normal channel where this layer has none
    /// ([`Capabilities::normal_channels`]).
    fn check_kind(&self, operation: &'static str, channel: &str) -> Result<()> {
        if self.caps.normal_channels || names::is_process_local(channel) {
            return Ok(());
        }
        Err(Error::unsupported(
            operation,
            self.caps.backend,
            format!(
                "{channel:?} is a normal channel (no '!'), and this layer has none (its capabilities say normal_channels: false; AMQP's wire=channels_rabbitmq has only process-local channels and groups, as Django's channels_rabbitmq); use a channel from new_channel, or a group"
            ),
        ))
    }

    /// The `tracing` span of one operation (level debug: free when nobody listens), with
    /// the backend and the address's kind (never its name: see `telemetry`).
    fn span(&self, op: &'static str, kind: Kind) -> tracing::Span {
        tracing::debug_span!(
            "chanlayer",
            op,
            backend = self.caps.backend,
            kind = kind.label()
        )
    }

    /// A delivery of a normal channel's item; with `max_deliveries`, one whose nack moves
    /// it (see [`poison`](crate::poison)).
    fn delivery(&self, item: Incoming, channel: &str) -> Delivery {
        let i = &self.inbound;
        crate::poison::guard(item, channel, i.options(), &self.transport, i.stats())
            .into_delivery(channel)
    }

    /// `message` with the current span's trace context in its headers (feature `otel`,
    /// where the transport carries headers; see [`otel`](crate::otel)).
    fn traced(&self, message: Message) -> Message {
        #[cfg(feature = "otel")]
        if self.caps.headers {
            let mut message = message;
            crate::otel::inject(message.headers_mut());
            return message;
        }
        message
    }

    fn record(&self, kind: Kind, name: &str, r: Published, n: u64) {
        match r {
            Published::Stored => self.inbound.stats().record_sent(kind, n),
            Published::Gone => {
                for _ in 0..n {
                    self.inbound.stats().record_undeliverable_to(kind, name);
                }
            }
        }
    }

    /// What a send to a channel does before the transport: the checks (on the first send
    /// of this thread to it), the route, the sealed message. Not a future of its own: a
    /// send is one future, so the message is not carried and copied through a second
    /// (a copy per message). Groups have their own ([`group_send_op`](Self::group_send_op)).
    fn prepare_send<'a>(
        &self,
        target: Target<'a>,
        message: Message,
    ) -> Result<(Route, Outgoing<'a>)> {
        let (name, kind) = (target.name, target.kind);
        self.inbound.closed().check()?;
        let route = match target.known {
            Some(known) => known.route,
            None => {
                names::validate_channel(name)?;
                self.check_kind("send", name)?;
                let route = Route::of(self.inbound.naming(), name, kind);
                let known = Known { kind, route };
                name_cache::remember(self.serial, name, Check::Send, known);
                route
            }
        };
        let out = Outgoing::new(self.seal(Destination::Channel, name, message)?, name);
        Ok((route, out))
    }

    /// A send to a group.
    async fn group_send_op(&self, group: &str, message: Message) -> Result<()> {
        tokio::task::consume_budget().await;
        self.inbound.closed().check()?;
        names::validate_group(group)?;
        let out = Outgoing::new(self.seal(Destination::Group, group, message)?, group);
        let timer = telemetry::sampled(telemetry::next_send()).then(Instant::now);
        let r = self.transport.publish_group(out).await?;
        self.sent(Kind::Group, group, r, timer);
        Ok(())
    }

    /// Counts a send to `name` that ended as `r`, with its time when it was sampled.
    fn sent(&self, kind: Kind, name: &str, r: Published, timer: Option<Instant>) {
        if let Some(t) = timer {
            self.inbound.stats().export_send_latency(kind, t.elapsed());
        }
        self.record(kind, name, r, 1);
    }

    async fn send_batch_op(&self, channel: &str, messages: Vec<Message>) -> Result<()> {
        self.inbound.closed().check()?;
        names::validate_channel(channel)?;
        self.check_kind("send_batch", channel)?;
        let n = messages.len();
        let outs = messages
            .into_iter()
            .map(|m| {
                let env = self.seal(Destination::Channel, channel, m)?;
                Ok(Outgoing::new(env, channel))
            })
            .collect::<Result<Vec<_>>>()?;
        if n == 0 {
            return Ok(());
        }
        let kind = Kind::of_channel(channel);
        let Some(owner) = Route::of(self.inbound.naming(), channel, kind).owner(channel) else {
            self.record(kind, channel, Published::Gone, n as u64);
            return Ok(());
        };
        let stored = self
            .transport
            .publish_batch(owner, outs)
            .await
            .inspect_err(|e| {
                if let Error::PartlySent { sent, .. } = e {
                    self.record(kind, channel, Published::Stored, *sent as u64);
                }
            })?;
        self.record(kind, channel, Published::Stored, stored as u64);
        self.record(kind, channel, Published::Gone, (n - stored) as u64);
        Ok(())
    }

    async fn receive_op(&self, channel: Target<'_>) -> Result<Message> {
        let i = &self.inbound;
        let env = match self.source(channel, None).await? {
            Take::Source(s) => s.next_auto().await?,
            Take::Queue(q) => q.take(channel.name, i.stats(), i.closed()).await?.envelope,
        };
        i.stats().record_received(channel.kind, 1);
        Ok(env.into_message())
    }

    /// A delivery of an entry taken from `queue`. From the transport's queue (a normal
    /// channel's, at-least-once) one that requeues; from this instance's inbox, requeuing
    /// where the transport promises at-least-once local channels, settled otherwise (it has
    /// already left its queue: `ack` does nothing, `nack` is an error).
    fn local_delivery(&self, channel: &str, queue: &Queue<'_>, entry: Entry) -> Delivery {
        let i = &self.inbound;
        if let Cow::Owned(q) = queue {
            return self.delivery(requeuing_incoming(q.clone(), channel, entry, i), channel);
        }
        let item = if self.caps.at_least_once_local {
            requeuing_incoming(i.inbox().clone(), channel, entry, i)
        } else {
            Incoming {
                envelope: entry.envelope,
                redelivered: entry.redelivered,
                ack: AckHandle::settled(),
            }
        };
        item.into_delivery(channel)
    }

    async fn receive_delivery_op(&self, target: Target<'_>) -> Result<Delivery> {
        let (i, channel, kind) = (&self.inbound, target.name, target.kind);
        let d = match self.source(target, Some("receive_delivery")).await? {
            Take::Source(s) => self.delivery(s.next().await?, channel),
            Take::Queue(q) => {
                let entry = q.take(channel, i.stats(), i.closed()).await?;
                self.local_delivery(channel, &q, entry)
            }
        };
        i.stats().record_received(kind, 1);
        Ok(d)
    }

    async fn receive_batch_op(
        &self,
        target: Target<'_>,
        max: usize,
        timeout: Duration,
    ) -> Result<Vec<Delivery>> {
        let (i, channel, kind) = (&self.inbound, target.name, target.kind);
        let out: Vec<Delivery> = match self.source(target, Some("receive_batch")).await? {
            Take::Source(s) => s
                .next_batch(max, timeout)
                .await?
                .into_iter()
                .map(|item| self.delivery(item, channel))
                .collect(),
            Take::Queue(q) => q
                .take_batch(channel, max, timeout, i.stats(), i.closed())
                .await?
                .into_iter()
                .map(|e| self.local_delivery(channel, &q, e))
                .collect(),
        };
        i.stats().record_received(kind, out.len() as u64);
        Ok(out)
    }

    async fn flush_op(&self) -> Result<()> {
        let i = &self.inbound;
        i.closed().check()?;
        {
            let _one = self.groups.bindings.lock().await;
            let groups: BTreeSet<String> = i.groups().clear().into_iter().map(|(g, _)| g).collect();
            // A group left with a pinned member (the `inspect` responder's) stays bound.
            for g in groups.into_iter().filter(|g| !i.groups().has_members(g)) {
                self.transport.unbind_group(&g).await?;
            }
            for (g, c) in i.normal_groups().clear() {
                self.transport.unbind_normal(&g, &c).await?;
            }
        }
        self.transport.flush().await?;
        i.inbox().clear();
        Ok(())
    }
}

/// A local queue: this instance's inbox (borrowed), or a transport's in-process queue
/// ([`NormalReader::Queue`]).
type Queue<'a> = Cow<'a, Arc<LocalInbox>>;

/// Where a receive takes from.
enum Take<'a> {
    /// The transport's source of ackable items.
    Source(Arc<dyn NormalSource>),
    /// A local queue.
    Queue(Queue<'a>),
}

/// The channel (or group) an operation works on.
#[derive(Clone, Copy)]
struct Target<'a> {
    name: &'a str,
    kind: Kind,
    /// What this thread found when it last passed this operation's checks for the channel
    /// on this instance (`None`: check now).
    known: Option<Known>,
}

/// A channel send's publish, started: to the owner's inbox, to a normal channel, or nowhere
/// (the owner is gone).
enum Publish<L, N> {
    Local(L),
    Normal(N),
    Gone,
}

/// Runs receive operation `op` in `span` (with feature `otel`, `otel::received_in`,
/// which makes it a child of the sender's span).
#[cfg(not(feature = "otel"))]
fn received_in<F: std::future::Future>(
    span: tracing::Span,
    op: F,
) -> tracing::instrument::Instrumented<F> {
    op.instrument(span)
}

impl<T: Transport> Drop for TransportLayer<T> {
    fn drop(&mut self) {
        if self.inbound.closed().close() {
            self.transport.abandon();
            self.inbound.inbox().clear();
        }
    }
}

#[async_trait]
impl<T: Transport> ChannelLayer for TransportLayer<T> {
    fn capabilities(&self) -> Capabilities {
        self.caps
    }

    fn options(&self) -> &LayerOptions {
        self.inbound.options()
    }

    fn instance_id(&self) -> &str {
        self.inbound.id()
    }

    fn stats(&self) -> StatsSnapshot {
        self.inbound.stats().snapshot()
    }

    async fn send(&self, channel: &str, message: Message) -> Result<()> {
        // A send that never waits still yields now and then (see `LocalInbox::take`): every
        // eighth send of a thread spends a unit of the task's tokio budget, so a loop of sends
        // yields after a thousand (spending it on each cost a twentieth of a ZeroMQ send).
        let n = telemetry::next_send();
        if n % 8 == 0 {
            tokio::task::consume_budget().await;
        }
        let target = self.target(channel, Check::Send);
        let (kind, span) = (target.kind, self.span("send", target.kind));
        // The message, its envelope and its route end in this block: across its await, the
        // send's future holds only the publish (560 -> 360 bytes to box on every send).
        let (publish, timer) = {
            // Entering a span no subscriber wants still costs (a tenth of the core's work
            // on a ZeroMQ send, callgrind): only an enabled one is entered.
            let prepared = if span.is_disabled() {
                self.prepare_send(target, message)
            } else {
                span.in_scope(|| self.prepare_send(target, message))
            };
            let (route, out) = match prepared {
                Ok(prepared) => prepared,
                Err(e) => return self.wins(Err(e)),
            };
            let timer = telemetry::sampled(n).then(Instant::now);
            let publish = match route.owner(channel) {
                Some(Some(owner)) => Publish::Local(self.transport.publish_local(owner, out)),
                Some(None) => Publish::Normal(self.transport.publish_normal(out)),
                None => Publish::Gone,
            };
            (publish, timer)
        };
        // Nor is a disabled span wrapped around the publish (about 50 instructions).
        let published = match publish {
            Publish::Local(p) if span.is_disabled() => p.await,
            Publish::Local(p) => p.instrument(span).await,
            Publish::Normal(p) if span.is_disabled() => p.await,
            Publish::Normal(p) => p.instrument(span).await,
            Publish::Gone => Ok(Published::Gone),
        };
        let r = published.map(|r| self.sent(kind, channel, r, timer));
        self.wins(r)
    }

    async fn send_batch(&self, channel: &str, messages: Vec<Message>) -> Result<()> {
        let op = self.send_batch_op(channel, messages);
        self.run("send_batch", Kind::of_channel(channel), op).await
    }

    async fn receive(&self, channel: &str) -> Result<Message> {
        let target = self.target(channel, Check::Receive);
        let span = self.span("receive", target.kind);
        self.wins(received_in(span, self.receive_op(target)).await)
    }

    async fn receive_delivery(&self, channel: &str) -> Result<Delivery> {
        let target = self.target(channel, Check::Receive);
        let span = self.span("receive_delivery", target.kind);
        self.wins(received_in(span, self.receive_delivery_op(target)).await)
    }

    async fn receive_batch(
        &self,
        channel: &str,
        max: usize,
        timeout: Duration,
    ) -> Result<Vec<Delivery>> {
        let target = self.target(channel, Check::Receive);
        let span = self.span("receive_batch", target.kind);
        let op = self.receive_batch_op(target, max, timeout);
        self.wins(received_in(span, op).await)
    }

    async fn new_channel(&self, prefix: &str) -> Result<String> {
        self.inbound.closed().check()?;
        self.inbound.naming().new_channel(prefix, self.inbound.id())
    }

    async fn group_add(&self, group: &str, channel: &str) -> Result<()> {
        let op = self.group_add_op(group, channel);
        self.run("group_add", Kind::of_channel(channel), op).await
    }

    async fn group_discard(&self, group: &str, channel: &str) -> Result<()> {
        let op = self.group_discard_op(group, channel);
        self.run("group_discard", Kind::of_channel(channel), op)
            .await
    }

    async fn group_send(&self, group: &str, message: Message) -> Result<()> {
        let span = self.span("group_send", Kind::Group);
        self.wins(self.group_send_op(group, message).instrument(span).await)
    }

    async fn group_members(&self, group: &str) -> Result<Vec<String>> {
        let i = &self.inbound;
        i.closed().check()?;
        names::validate_group(group)?;
        Ok(crate::inspect::members_of(&*self.transport, i, group))
    }

    async fn flush(&self) -> Result<()> {
        self.inbound.closed().closed_wins(self.flush_op().await)
    }

    async fn close(&self) -> Result<()> {
        if !self.inbound.closed().close() {
            return Ok(());
        }
        let r = self.transport.close().await;
        self.inbound.inbox().clear();
        r
    }
}
