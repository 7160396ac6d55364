//! [`ZmqTransport`]: the [`Transport`] over PUB/SUB; core's `TransportLayer` makes it a
//! channel layer ([`ZmqLayer`](crate::ZmqLayer)). See the crate docs.

use std::borrow::Cow;
use std::cell::Cell;
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chanlayer_core::config::BackendSettings;
use chanlayer_core::toolkit::{
    fmt_transport, Inbound, NormalReader, Outgoing, Published, Transport,
};
use chanlayer_core::{names, Capabilities, Error, LayerConfig, Result};
use tokio::sync::oneshot;

use crate::bridge::{lock, Control, Outbox, Refused};
use crate::config::{BindPolicy, Mode, ZmqConfig};
use crate::hub::{Counters, HubStats};
use crate::publisher::{self, Endpoint};
use crate::receiver::{Confirm, Receiver, Shared, TransportCounters};
use crate::sender::{self, PushSender};
use crate::wire;
use crate::{BACKEND, CAPABILITIES};

/// Counters of the ZeroMQ transport of one layer instance (beyond [`StatsSnapshot`](chanlayer_core::StatsSnapshot)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TransportStats {
    /// Messages PUB/SUB dropped on the way to this instance, seen as gaps in a topic's
    /// sequence numbers: the publisher dropped them for this subscriber at its high-water
    /// mark, or they were published while this instance's connection was down and up again.
    /// In dedicated mode the gaps are in each sender's own numbering, so this also counts
    /// what a proxy restart lost (when the same sender's next message to the topic arrives).
    pub lost: u64,
    /// Messages that reached this instance through a late-joiner replay.
    pub replayed: u64,
    /// `true` while the SUB socket is connected to a publisher.
    pub connected: bool,
    /// Dedicated mode: messages `send` accepted that never left this instance: the proxy
    /// did not take them within `close_linger` of `close`, or the PUSH socket failed on
    /// them (embedded mode counts its own in [`HubStats::abandoned`]).
    pub abandoned: u64,
}

/// The sending side: this process's endpoint of the embedded address, or the dedicated
/// sender.
enum Outbound {
    Embedded(Arc<Endpoint>),
    Dedicated(PushSender),
}

/// The ZeroMQ transport of one layer instance. See the crate docs.
pub struct ZmqTransport {
    cfg: ZmqConfig,
    /// This instance's number (see [`Scratch`]).
    serial: u64,
    shared: Arc<Shared>,
    receiver: Arc<Receiver>,
    outbound: Mutex<Option<Arc<Outbound>>>,
    /// Dedicated mode: the PUSH thread's outbox, reached by sends without the lock of
    /// `outbound` (closed, its mailbox refuses them: `Closed`).
    push: Option<Arc<Outbox>>,
    normal: Mutex<HashSet<String>>,
    /// Embedded mode: the counters of the publisher this instance used, kept at close (its
    /// close may still count messages as abandoned).
    closed_publisher: Mutex<Option<Counters>>,
}

impl std::fmt::Debug for ZmqTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        fmt_transport(self, "ZmqTransport", f)
    }
}

/// A thread's reused buffers for the per-message path (see [`with_scratch`]): the topic and
/// the encoded envelope of a small message being sent.
#[derive(Default)]
struct Scratch {
    /// The topic of the last channel message this thread sent, for the instance `serial`
    /// (0: none): a stream to one channel writes its topic once.
    topic: Vec<u8>,
    serial: u64,
    payload: Vec<u8>,
}

/// Numbers the instances of this process, for [`Scratch::serial`].
static SERIALS: AtomicU64 = AtomicU64::new(1);

thread_local! {
    static SCRATCH: Cell<Option<Box<Scratch>>> = const { Cell::new(None) };
}

/// Runs `f` with this thread's [`Scratch`] and keeps it for the next call (a fresh one if
/// the thread's storage is gone). No await happens inside `f`, so a task moving between
/// threads never shares it, and a send allocates nothing of its own.
fn with_scratch<R>(f: impl FnOnce(&mut Scratch) -> R) -> R {
    let mut scratch = SCRATCH
        .try_with(Cell::take)
        .ok()
        .flatten()
        .unwrap_or_default();
    let r = f(&mut scratch);
    let _ = SCRATCH.try_with(|c| c.set(Some(scratch)));
    r
}

/// The topic kind and name of a channel message: the owner's inbox, or the normal channel.
fn topic_of<'a>(owner: Option<&'a str>, channel: &'a str) -> (u8, &'a str) {
    match owner {
        Some(owner) => (wire::INBOX, owner),
        None => (wire::CHANNEL, channel),
    }
}

/// A refused push as an error: `ChannelFull` names the channel and, as its capacity, the
/// instance's `send_queue` (the queue that was full).
fn refused(r: Refused, channel: &str, send_queue: usize) -> Error {
    match r {
        Refused::Full => Error::ChannelFull {
            channel: channel.to_owned(),
            capacity: send_queue,
        },
        Refused::Closed => Error::Closed,
    }
}

/// The answer on `rx` within `after`: `Closed` if the receiving thread dropped the sender,
/// `Timeout` (of `operation`) if none came.
async fn answer<T>(
    rx: oneshot::Receiver<T>,
    after: Duration,
    operation: &'static str,
) -> Result<T> {
    match tokio::time::timeout(after, rx).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(_)) => Err(Error::Closed),
        Err(_) => Err(Error::Timeout { operation, after }),
    }
}

impl ZmqTransport {
    /// Takes the sending side at close, keeping the embedded publisher's counters for
    /// [`ZmqTransport::publisher_stats`].
    fn take_outbound(&self) -> Option<Arc<Outbound>> {
        let outbound = lock(&self.outbound).take()?;
        if let Outbound::Embedded(endpoint) = &*outbound {
            if let Some(p) = endpoint.started.get() {
                *lock(&self.closed_publisher) = Some(p.counters.clone());
            }
        }
        Some(outbound)
    }

    fn prefix(&self) -> &str {
        &self.shared.options().prefix
    }

    /// The topic of a channel message: the owner's inbox topic, or the normal channel's.
    fn topic_into(&self, out: &mut Vec<u8>, owner: Option<&str>, channel: &str) {
        let (kind, name) = topic_of(owner, channel);
        wire::topic_into(out, kind, self.prefix(), name);
    }

    /// Puts the topic of a channel message in `sc.topic`, unless the last one is it.
    fn cached_topic(&self, sc: &mut Scratch, owner: Option<&str>, channel: &str) {
        let (kind, name) = topic_of(owner, channel);
        let t = &sc.topic;
        // Of this instance, the prefix is the same: kind and name tell the topic.
        let same = sc.serial == self.serial
            && t.first() == Some(&kind)
            && t.len() == self.prefix().len() + name.len() + 4
            && t[t.len() - 1 - name.len()..t.len() - 1] == *name.as_bytes();
        if !same {
            sc.topic.clear();
            wire::topic_into(&mut sc.topic, kind, self.prefix(), name);
            sc.serial = self.serial;
        }
    }

    /// Runs `f` on this instance's sending side: the embedded publisher of this process
    /// (bound now if it is not yet: the first send binds it) or the dedicated sender.
    /// `Unsupported` for a receive-only instance (`bind=never`).
    fn outlet<R>(&self, f: impl FnOnce(&Outbox) -> R) -> Result<R> {
        if let Some(push) = &self.push {
            return Ok(f(push));
        }
        let outbound = lock(&self.outbound);
        match outbound.as_deref().ok_or(Error::Closed)? {
            Outbound::Embedded(_) if self.cfg.bind == BindPolicy::Never => Err(Error::unsupported(
                "send",
                BACKEND,
                "this instance was connected with bind=never (receive only); in embedded mode one process per address sends",
            )),
            Outbound::Embedded(endpoint) => match endpoint.started.get() {
                Some(p) => Ok(f(&p.worker.shared)),
                None => {
                    // The first send binds the publisher: not under the lock `close` takes.
                    let endpoint = endpoint.clone();
                    drop(outbound);
                    Ok(f(&endpoint.publisher()?.worker.shared))
                }
            },
            Outbound::Dedicated(s) => Ok(f(&*s.shared)),
        }
    }

    /// Sends the data message `[topic, payload]` for `channel` (see [`Outbox::send`]).
    fn send(&self, channel: &str, topic: &[u8], payload: Cow<'_, [u8]>) -> Result<()> {
        self.outlet(|o| o.send(topic, payload))?
            .map_err(|r| refused(r, channel, self.cfg.send_queue))
    }

    /// Sends a MARK through the publisher (after everything this instance sent before) that
    /// comes back on the inbox topic; `flush_prefix` also drops the publisher's retention.
    /// `None` when no publisher can be reached this way (embedded mode, another process
    /// publishes).
    fn mark(&self, flush_prefix: &str) -> Result<Option<oneshot::Receiver<()>>> {
        let token = rand::random::<u64>();
        let outbound = lock(&self.outbound).clone().ok_or(Error::Closed)?;
        let outlet: &Outbox = match &*outbound {
            Outbound::Embedded(endpoint) => match endpoint.started.get() {
                Some(p) => &p.worker.shared,
                None => return Ok(None),
            },
            Outbound::Dedicated(s) => &*s.shared,
        };
        let rx = self.receiver.await_mark(token)?;
        outlet
            .mailbox
            .push_control(Control::Mark {
                reply: wire::inbox_topic(self.prefix(), self.shared.id()),
                token,
                flush_prefix: flush_prefix.as_bytes().to_vec(),
            })
            .map_err(|r| refused(r, "(mark)", self.cfg.send_queue))?;
        Ok(Some(rx))
    }

    /// Stops the receiving thread and releases the sending side (lingering up to
    /// `close_linger` for what `send` accepted; what is left is counted).
    async fn shut_down(&self) {
        self.shared.transport.gone.store(true, Ordering::SeqCst);
        let outbound = self.take_outbound();
        let receiver = self.receiver.clone();
        let _ = tokio::task::spawn_blocking(move || {
            receiver.stop();
            // The last instance on an embedded address stops the publisher (joining its
            // thread), which lingers up to close_linger for subscribers that have not had
            // its retained messages yet; a dedicated sender hands over its queue within
            // close_linger and closes. What is left is counted (abandoned).
            drop(outbound);
        })
        .await;
    }

    /// Sends a channel message, encoded into this thread's reused buffers (a small message
    /// allocates nothing of its own; a large one, which travels alone, takes the buffer).
    fn send_channel(&self, owner: Option<&str>, out: Outgoing<'_>) -> Result<Published> {
        let channel = out.destination();
        with_scratch(|sc| {
            self.cached_topic(sc, owner, channel);
            sc.payload.clear();
            out.encode_into(&mut sc.payload);
            let payload = if sc.payload.len() <= wire::BATCH_ITEM_MAX {
                Cow::Borrowed(&sc.payload[..])
            } else {
                Cow::Owned(std::mem::take(&mut sc.payload))
            };
            self.send(channel, &sc.topic, payload)
        })?;
        Ok(Published::Stored)
    }

    /// The settings this instance runs with.
    pub fn config(&self) -> &ZmqConfig {
        &self.cfg
    }

    /// Counters of the transport (messages lost on the way, replayed, connection state).
    pub fn transport_stats(&self) -> TransportStats {
        let t = &self.shared.transport;
        let o = Ordering::Relaxed;
        TransportStats {
            lost: t.lost.load(o),
            replayed: t.replayed.load(o),
            connected: t.link_up.load(o),
            abandoned: t.abandoned.load(o),
        }
    }

    /// Embedded mode: the counters of this process's publisher on this address, if this
    /// process has bound it (after `close` too: what the publisher's close lingered for and
    /// abandoned shows here). `None` in dedicated mode (see [`crate::Proxy::stats`]).
    pub fn publisher_stats(&self) -> Option<HubStats> {
        let Some(outbound) = lock(&self.outbound).clone() else {
            return lock(&self.closed_publisher).as_ref().map(|c| *lock(c));
        };
        match &*outbound {
            Outbound::Embedded(endpoint) => endpoint.started.get().map(|p| *lock(&p.counters)),
            Outbound::Dedicated(_) => None,
        }
    }

    /// Publishes `bytes` as the envelope of a message for `channel` (its topic and sequence
    /// are real; the bytes are not checked): for tests of what receivers do with garbage,
    /// and for poking a layer by hand.
    pub async fn publish_raw(&self, channel: &str, bytes: Vec<u8>) -> Result<()> {
        self.shared.closed().check()?;
        let owner = names::owner_instance(channel);
        if names::is_process_local(channel) && owner.is_none() {
            return Err(Error::InvalidMessage(format!(
                "{channel:?} names no layer instance"
            )));
        }
        let mut topic = Vec::new();
        self.topic_into(&mut topic, owner, channel);
        self.send(channel, &topic, Cow::Owned(bytes))
    }

    /// Sends frames exactly as given: in embedded mode straight out of the publisher's XPUB
    /// socket, in dedicated mode to the proxy's PULL. For tests of garbage handling.
    pub async fn publish_raw_frames(&self, frames: Vec<Vec<u8>>) -> Result<()> {
        self.shared.closed().check()?;
        self.outlet(|o| o.mailbox.push_control(Control::Raw(frames)))?
            .map_err(|r| refused(r, "(raw frames)", self.cfg.send_queue))
    }
}

impl Transport for ZmqTransport {
    /// Normal channels are subscribed topics: their messages arrive in the inbox, each
    /// reader instance gets every one (at-most-once).
    const NORMAL_VIA_INBOX: bool = true;

    /// Connects as `config` (a `zmq://` URL) says: starts the receiving thread and SUB
    /// socket, subscribes the inbox and waits for the publisher to confirm it (up to
    /// `connect_timeout`).
    ///
    /// - Dedicated mode: connects the PUSH socket too, and checks the whole path (a mark
    ///   sent to the proxy's PULL comes back on the PUB). No proxy within
    ///   `connect_timeout` is an error that names the endpoints.
    /// - Embedded mode: with `bind=eager`, binds the publisher now (an address taken by
    ///   another process is an error); otherwise the first send binds it. No publisher yet
    ///   is fine: the subscriptions take effect when one binds.
    async fn open(config: &LayerConfig, inbound: Arc<Inbound>) -> Result<Self> {
        let cfg = ZmqConfig::from_layer_config(config)?;
        let shared = Arc::new(Shared {
            inbound,
            // The inbox subscription is outstanding from the start.
            transport: TransportCounters {
                outstanding: 1.into(),
                ..Default::default()
            },
        });
        let outbound = match &cfg.mode {
            Mode::Embedded { endpoint } => {
                let ep = publisher::endpoint(endpoint, &cfg);
                ep.register(&shared);
                if cfg.bind == BindPolicy::Eager {
                    ep.publisher()?;
                }
                Outbound::Embedded(ep)
            }
            Mode::Dedicated { pull, .. } => Outbound::Dedicated(sender::start(
                &cfg,
                pull,
                shared.transport.abandoned.clone(),
            )?),
        };
        let (receiver, inbox_confirmed) = Receiver::start(&cfg, shared.clone())?;
        let t = ZmqTransport {
            cfg,
            serial: SERIALS.fetch_add(1, Ordering::Relaxed),
            shared,
            receiver: Arc::new(receiver),
            push: match &outbound {
                Outbound::Dedicated(sender) => Some(sender.shared.clone()),
                Outbound::Embedded(_) => None,
            },
            outbound: Mutex::new(Some(Arc::new(outbound))),
            normal: Mutex::new(HashSet::new()),
            closed_publisher: Mutex::new(None),
        };
        let timeout = t.cfg.connect_timeout;
        let confirmed = matches!(
            tokio::time::timeout(timeout, inbox_confirmed).await,
            Ok(Ok(Confirm::Confirmed))
        );
        let failed = match &t.cfg.mode {
            Mode::Embedded { endpoint } => {
                if !confirmed {
                    tracing::debug!(%endpoint, "no publisher is up yet; subscriptions take effect when one binds");
                }
                None
            }
            Mode::Dedicated { pull, publish } if !confirmed => Some(format!(
                "no chanlayer zmq proxy answered on {publish} within {timeout:?} (is `chanlayer zmq-proxy --pull {pull} --pub {publish}` running?)"
            )),
            Mode::Dedicated { pull, publish } => {
                let came_back = match t.mark("")? {
                    Some(rx) => matches!(tokio::time::timeout(timeout, rx).await, Ok(Ok(()))),
                    None => true,
                };
                (!came_back).then(|| format!(
                    "the proxy answers on {publish}, but a message sent to {pull} did not come back within {timeout:?}: is {pull} the PULL address of the same proxy?"
                ))
            }
        };
        if let Some(message) = failed {
            t.shut_down().await;
            return Err(Error::failure(BACKEND, message));
        }
        Ok(t)
    }

    fn capabilities(&self) -> Capabilities {
        CAPABILITIES
    }

    fn debug_fields(&self, f: &mut std::fmt::DebugStruct<'_, '_>) {
        f.field("mode", &self.cfg.mode);
    }

    // A channel send never waits (a full queue is `ChannelFull`): it is done when called, and
    // its future carries only the result, not the message (a smaller future on every send).
    fn publish_local(
        &self,
        owner: &str,
        out: Outgoing<'_>,
    ) -> impl std::future::Future<Output = Result<Published>> + Send {
        std::future::ready(self.send_channel(Some(owner), out))
    }

    fn publish_normal(
        &self,
        out: Outgoing<'_>,
    ) -> impl std::future::Future<Output = Result<Published>> + Send {
        std::future::ready(self.send_channel(None, out))
    }

    async fn publish_batch(&self, owner: Option<&str>, outs: Vec<Outgoing<'_>>) -> Result<usize> {
        let Some(first) = outs.first() else {
            return Ok(0);
        };
        let channel = first.destination();
        let mut topic = Vec::new();
        self.topic_into(&mut topic, owner, channel);
        let n = outs.len();
        let msgs = outs.iter().map(|o| (topic.clone(), o.encode())).collect();
        self.outlet(|o| o.mailbox.push_all(msgs))?
            .map_err(|r| refused(r, channel, self.cfg.send_queue))?;
        Ok(n)
    }

    async fn publish_group(&self, out: Outgoing<'_>) -> Result<Published> {
        let group = out.destination();
        let payload = out.encode();
        let topic = wire::group_topic(self.prefix(), group);
        // group_send never fails for capacity: wait a little for room in the queue, then
        // drop the message and count it.
        for attempt in 0..200u32 {
            match self.outlet(|o| o.send(&topic, Cow::Borrowed(&payload)))? {
                Ok(()) => return Ok(Published::Stored),
                Err(Refused::Closed) => return Err(Error::Closed),
                Err(Refused::Full) => {
                    let pause = Duration::from_millis(u64::from(attempt.min(10)) + 1);
                    tokio::time::sleep(pause).await;
                    self.shared.closed().check()?;
                }
            }
        }
        tracing::warn!(
            group,
            "group_send dropped a message: the send queue stayed full"
        );
        Ok(Published::Gone)
    }

    async fn bind_group(&self, group: &str) -> Result<()> {
        // The group's topic is about to be subscribed: let what this instance sent before
        // (a group_send racing ahead on the send path) pass the publisher first, so a
        // membership never receives a message sent before it began. (Not when disconnected,
        // nor when no publisher of this process is involved.)
        let wait = self.cfg.subscribe_timeout;
        if self.shared.transport.link_up.load(Ordering::Relaxed) {
            if let Ok(Some(rx)) = self.mark("") {
                let _ = tokio::time::timeout(wait, rx).await;
            }
        }
        let (tx, rx) = oneshot::channel();
        self.receiver.reconcile(Some(group), Some(tx))?;
        let operation = "group_add (waiting for the publisher to confirm the subscription; the membership was not added)";
        match answer(rx, wait, operation).await? {
            Confirm::Confirmed | Confirm::NotConnected => Ok(()),
            Confirm::NoAnswer => Err(Error::Timeout {
                operation,
                after: wait,
            }),
        }
    }

    async fn unbind_group(&self, group: &str) -> Result<()> {
        self.receiver.reconcile(Some(group), None)
    }

    async fn bind_normal(&self, group: &str, _channel: &str) -> Result<()> {
        // Not called (NORMAL_VIA_INBOX): a normal channel's membership is a local one.
        self.bind_group(group).await
    }

    async fn unbind_normal(&self, group: &str, _channel: &str) -> Result<()> {
        self.unbind_group(group).await
    }

    async fn normal_reader(&self, channel: &str) -> Result<NormalReader> {
        if lock(&self.normal).insert(channel.to_owned()) {
            self.receiver.subscribe_channel(channel)?;
        }
        Ok(NormalReader::Inbox)
    }

    async fn flush(&self) -> Result<()> {
        self.receiver.reconcile(None, None)?;
        // A barrier through the publisher: what this instance sent before the flush is in
        // the retention (dropped now) or on its way to us (ahead of the mark).
        match self.mark(self.prefix())? {
            None => Ok(()),
            Some(rx) => {
                let operation = "flush (waiting for the publisher's barrier)";
                answer(rx, self.cfg.connect_timeout, operation).await
            }
        }
    }

    async fn close(&self) -> Result<()> {
        self.shut_down().await;
        Ok(())
    }

    fn abandon(&self) {
        self.shared.transport.gone.store(true, Ordering::SeqCst);
        self.receiver.detach();
        if let Some(outbound) = self.take_outbound() {
            // Releasing the sending side may linger (close_linger): not on the dropping
            // thread, which may be an async runtime's. If no thread starts, the closure
            // (and the sending side with it) is dropped here.
            let _ = std::thread::Builder::new()
                .name("chanlayer-zmq close".into())
                .spawn(move || drop(outbound));
        }
    }
}
