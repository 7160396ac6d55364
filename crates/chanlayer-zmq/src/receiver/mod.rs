//! The receiving side of one layer instance: one SUB socket, owned by one thread.
//!
//! The thread subscribes the instance's inbox topic at start, the topics of normal channels
//! it receives, and the topics of groups with a local member. Every subscription is followed
//! by a **probe** (see [`crate::wire`]): until the publisher answers it, messages of the topic
//! are held back; the answer brings the retained messages the subscriber missed (the
//! replay) and the topic's current sequence number (the welcome). The held and replayed
//! messages are then delivered in sequence order without duplicates, and `group_add` (which
//! waits for the welcome) returns: every message published after that reaches this instance.
//!
//! Afterwards each topic's sequence numbers are checked: a gap is a message PUB/SUB dropped
//! on the way (a subscriber at its high-water mark, a lost connection), counted in
//! [`TransportStats::lost`](crate::TransportStats). Through a proxy, the gaps counted are
//! those in each sender's own numbering (see [`crate::origins`]), which a proxy restart
//! does not reset.
//!
//! - `subs.rs`: what is subscribed and why, probes, the connection's state, marks, timers.
//! - `ingest.rs`: messages from the socket, in order and once each, into the inbox.
//!
//! The thread decodes envelopes and hands them straight to the instance's `LocalInbox` and
//! group registry (both thread-safe): no async hop per message.

mod ingest;
mod subs;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chanlayer_core::toolkit::Inbound;
use chanlayer_core::{Error, Result};
use tokio::sync::oneshot;

use crate::bridge::{spawn, zmq_err, Item, Mailbox, Worker, CONTEXT};
use crate::config::ZmqConfig;
use subs::State;

/// Decoded envelopes handed to the inbox at once while the receiver thread reads a backlog
/// (in one go at the end of each read otherwise).
const HAND_OVER_AT: usize = 64;

/// How a subscription request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Confirm {
    /// The publisher answered the probe: later messages reach this instance.
    Confirmed,
    /// There is no connection to a publisher now; the subscription takes effect when one
    /// comes up.
    NotConnected,
    /// Connected, but the publisher did not answer within `subscribe_timeout`.
    NoAnswer,
}

/// What a subscribed topic delivers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Route {
    Inbox,
    Channel(String),
    Group(String),
}

pub(crate) enum Cmd {
    /// Subscribes a normal channel.
    Channel(String),
    /// Subscribes or unsubscribes a group to match the registry (`None`: every group).
    Reconcile {
        group: Option<String>,
        done: Option<oneshot::Sender<Confirm>>,
    },
    AwaitMark {
        token: u64,
        done: oneshot::Sender<()>,
    },
}

/// Counters of the transport itself, per instance.
#[derive(Debug, Default)]
pub(crate) struct TransportCounters {
    pub lost: AtomicU64,
    pub replayed: AtomicU64,
    pub link_up: AtomicBool,
    /// Messages the dedicated sender still held when its close lingered in vain.
    pub abandoned: Arc<AtomicU64>,
    /// Subscriptions not confirmed yet, and whether the instance is closing: what the
    /// embedded publisher of this process reads to know that an in-process receiver is
    /// connected and has every subscription confirmed.
    pub outstanding: AtomicUsize,
    pub gone: AtomicBool,
}

impl TransportCounters {
    /// One more subscription (`more`) or one fewer waits for its confirmation.
    pub fn outstanding(&self, more: bool) {
        if more {
            self.outstanding.fetch_add(1, Ordering::SeqCst);
        } else {
            self.outstanding.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Everything the receiving thread shares with the layer.
/// Dereferences to the instance's [`Inbound`] (id, options, counters, close signal, local
/// inbox, group registry, ingest path).
pub(crate) struct Shared {
    pub inbound: Arc<Inbound>,
    pub transport: TransportCounters,
}

impl std::ops::Deref for Shared {
    type Target = Inbound;
    fn deref(&self) -> &Inbound {
        &self.inbound
    }
}

/// The handle on the receiving thread.
pub(crate) type Receiver = Worker<Mailbox<Cmd>>;

impl Receiver {
    /// Starts the thread, connects the SUB socket and subscribes the inbox topic; the
    /// returned receiver says when that subscription is confirmed.
    pub fn start(
        cfg: &ZmqConfig,
        shared: Arc<Shared>,
    ) -> Result<(Receiver, oneshot::Receiver<Confirm>)> {
        let cfg = cfg.clone();
        let (tx, rx) = oneshot::channel();
        let (thread, mailbox) = spawn(
            "receiver",
            move || {
                let sockets = setup(&cfg, &shared)?;
                let mailbox = Arc::new(Mailbox::new(usize::MAX)?);
                Ok(((cfg, shared, mailbox.clone(), sockets, tx), mailbox))
            },
            run,
        )?;
        Ok((Worker::new(mailbox, thread, Mailbox::close), rx))
    }

    fn send(&self, cmd: Cmd) -> Result<()> {
        self.shared.push_control(cmd).map_err(|_| Error::Closed)
    }

    /// Subscribes a normal channel (no wait).
    pub fn subscribe_channel(&self, channel: &str) -> Result<()> {
        self.send(Cmd::Channel(channel.to_owned()))
    }

    /// Subscribes or unsubscribes `group` to match the registry (`None`: unsubscribes every
    /// group without members); `done` says when.
    pub fn reconcile(
        &self,
        group: Option<&str>,
        done: Option<oneshot::Sender<Confirm>>,
    ) -> Result<()> {
        let group = group.map(str::to_owned);
        self.send(Cmd::Reconcile { group, done })
    }

    /// Waits for the MARK with `token` on the inbox topic.
    pub fn await_mark(&self, token: u64) -> Result<oneshot::Receiver<()>> {
        let (tx, rx) = oneshot::channel();
        self.send(Cmd::AwaitMark { token, done: tx })?;
        Ok(rx)
    }
}

static MONITOR_N: AtomicU64 = AtomicU64::new(0);

/// The monitor events that mean the SUB socket has no connection now.
const DOWN_EVENTS: [zmq::SocketEvent; 5] = [
    zmq::SocketEvent::HANDSHAKE_FAILED_NO_DETAIL,
    zmq::SocketEvent::HANDSHAKE_FAILED_PROTOCOL,
    zmq::SocketEvent::HANDSHAKE_FAILED_AUTH,
    zmq::SocketEvent::DISCONNECTED,
    zmq::SocketEvent::CONNECT_RETRIED,
];

/// The event of a monitor message (its first frame starts with the event number).
fn event_of(frames: &[Vec<u8>]) -> Option<u16> {
    let f = frames.first().filter(|f| f.len() >= 2)?;
    Some(u16::from_ne_bytes([f[0], f[1]]))
}

fn setup(cfg: &ZmqConfig, shared: &Shared) -> Result<(zmq::Socket, zmq::Socket)> {
    let sub = cfg.socket(zmq::SUB)?;
    let monitor_endpoint = format!(
        "inproc://chanlayer-zmq-monitor-{}-{}",
        shared.id(),
        MONITOR_N.fetch_add(1, Ordering::Relaxed)
    );
    use zmq::SocketEvent::{CONNECTED, HANDSHAKE_SUCCEEDED, MONITOR_STOPPED};
    let events = [MONITOR_STOPPED, HANDSHAKE_SUCCEEDED, CONNECTED]
        .iter()
        .chain(&DOWN_EVENTS)
        .fold(0i32, |acc, e| acc | i32::from(e.to_raw()));
    sub.monitor(&monitor_endpoint, events)
        .map_err(|e| zmq_err("could not monitor the SUB socket", e))?;
    let monitor = CONTEXT
        .socket(zmq::PAIR)
        .map_err(|e| zmq_err("could not create the monitor socket", e))?;
    monitor
        .connect(&monitor_endpoint)
        .map_err(|e| zmq_err("could not connect the monitor socket", e))?;
    let endpoint = cfg.subscribe_endpoint();
    sub.connect(endpoint)
        .map_err(|e| zmq_err(format!("could not connect the SUB socket to {endpoint}"), e))?;
    Ok((sub, monitor))
}

type Thread = (
    ZmqConfig,
    Arc<Shared>,
    Arc<Mailbox<Cmd>>,
    (zmq::Socket, zmq::Socket),
    oneshot::Sender<Confirm>,
);

fn run((cfg, shared, mailbox, (sub, monitor), inbox): Thread) {
    let mut st = State::new(cfg, shared);
    st.subscribe_inbox(&sub, inbox);
    loop {
        let idle = if st.probing() { 100 } else { 1000 };
        let mut items = [
            sub.as_poll_item(zmq::POLLIN),
            monitor.as_poll_item(zmq::POLLIN),
            mailbox.poll_item(),
        ];
        mailbox.wait(&mut items, None, idle, "receiver");
        if mailbox.is_closed() {
            break;
        }
        for item in mailbox.take_all() {
            // Nothing sends data to a receiver: its mailbox carries commands only.
            if let Item::Control(cmd) = item {
                st.command(&sub, cmd);
            }
        }
        st.drain_monitor(&monitor, &sub);
        st.drain_sub(&sub, 4096);
        st.timers(&sub);
        st.hand_over();
    }
    st.shared.transport.outstanding.store(0, Ordering::SeqCst);
    st.shared.transport.gone.store(true, Ordering::SeqCst);
    st.shared.transport.link_up.store(false, Ordering::Relaxed);
    drop(sub);
    drain_until_stopped(&monitor);
}

/// libzmq sends monitor events with a *blocking* send from its own threads, up to the
/// moment the monitored socket is destroyed (which happens after `zmq_close` returns). If
/// the monitor's reading end closed first, that send would block libzmq's I/O thread for
/// good, and with it every socket of the process. So after closing the SUB socket the
/// monitor is read until libzmq says it stopped (bounded, in case it never does).
fn drain_until_stopped(monitor: &zmq::Socket) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let stopped = zmq::SocketEvent::MONITOR_STOPPED.to_raw();
    while Instant::now() < deadline {
        match monitor.poll(zmq::POLLIN, 100) {
            Ok(n) if n > 0 => {}
            Ok(_) | Err(zmq::Error::EINTR) => continue,
            Err(_) => return,
        }
        let frames = monitor.recv_multipart(zmq::DONTWAIT).unwrap_or_default();
        if event_of(&frames) == Some(stopped) {
            return;
        }
    }
    tracing::warn!("libzmq did not report the end of a socket monitor within 10s");
}
