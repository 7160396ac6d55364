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
//! [`TransportStats::lost`](crate::TransportStats).
//!
//! The thread decodes envelopes and hands them straight to the instance's `LocalInbox` and
//! group registry (both thread-safe): no async hop per message.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chanlayer_core::envelope::now_ms;
use chanlayer_core::stats::Stats;
use chanlayer_core::{
    names, CloseSignal, Destination, Envelope, Error, GroupRegistry, LayerOptions, LocalInbox,
    Result,
};
use tokio::sync::oneshot;

use crate::bridge::{context, lock, zmq_err, Mailbox, Merge};
use crate::config::ZmqConfig;
use crate::wire;

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
    Subscribe {
        topic: Vec<u8>,
        route: Route,
        done: Option<oneshot::Sender<Confirm>>,
    },
    Reconcile {
        group: String,
        done: Option<oneshot::Sender<Confirm>>,
    },
    ReconcileAll,
    AwaitMark {
        token: u64,
        done: oneshot::Sender<()>,
    },
}

impl Merge for Cmd {}

/// Counters of the transport itself, per instance.
#[derive(Debug, Default)]
pub(crate) struct TransportCounters {
    pub lost: AtomicU64,
    pub replayed: AtomicU64,
    pub link_up: AtomicBool,
}

/// What the embedded publisher of this process reads to know that an in-process receiver
/// is connected and has every subscription confirmed.
#[derive(Debug, Default)]
pub(crate) struct ReceiverSync {
    pub outstanding: AtomicUsize,
    pub gone: AtomicBool,
}

/// Everything the receiving thread shares with the layer.
pub(crate) struct Shared {
    pub id: String,
    pub options: LayerOptions,
    pub stats: Arc<Stats>,
    pub inbox: LocalInbox,
    pub groups: GroupRegistry,
    pub closed: Arc<CloseSignal>,
    pub transport: TransportCounters,
    pub sync: Arc<ReceiverSync>,
}

/// The handle on the receiving thread.
pub(crate) struct Receiver {
    mailbox: Arc<Mailbox<Cmd>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Receiver {
    /// Starts the thread, connects the SUB socket and subscribes the inbox topic; the
    /// returned receiver says when that subscription is confirmed.
    pub fn start(
        cfg: &ZmqConfig,
        shared: Arc<Shared>,
    ) -> Result<(Receiver, oneshot::Receiver<Confirm>)> {
        let mailbox = Arc::new(Mailbox::new(usize::MAX)?);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = {
            let cfg = cfg.clone();
            let mailbox = mailbox.clone();
            std::thread::Builder::new()
                .name("chanlayer-zmq receiver".into())
                .spawn(move || run(cfg, shared, mailbox, ready_tx))
                .map_err(|e| {
                    Error::backend(crate::BACKEND, "could not start the receiver thread", e)
                })?
        };
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e);
            }
            Err(_) => {
                let _ = thread.join();
                return Err(Error::Backend {
                    backend: crate::BACKEND,
                    message: "the receiver thread ended while starting".into(),
                    source: None,
                });
            }
        }
        let receiver = Receiver {
            mailbox,
            thread: Mutex::new(Some(thread)),
        };
        let inbox = ready_rx_inbox(&receiver)?;
        Ok((receiver, inbox))
    }

    fn send(&self, cmd: Cmd) -> Result<()> {
        self.mailbox.push(cmd, false).map_err(|_| Error::Closed)
    }

    /// Subscribes a normal channel (no wait).
    pub fn subscribe_channel(&self, prefix: &str, channel: &str) -> Result<()> {
        self.send(Cmd::Subscribe {
            topic: wire::channel_topic(prefix, channel),
            route: Route::Channel(channel.to_owned()),
            done: None,
        })
    }

    /// Subscribes or unsubscribes `group` to match the registry; `done` says when.
    pub fn reconcile(&self, group: &str, done: Option<oneshot::Sender<Confirm>>) -> Result<()> {
        self.send(Cmd::Reconcile {
            group: group.to_owned(),
            done,
        })
    }

    /// Unsubscribes every group without members.
    pub fn reconcile_all(&self) -> Result<()> {
        self.send(Cmd::ReconcileAll)
    }

    /// Waits for the MARK with `token` on the inbox topic.
    pub fn await_mark(&self, token: u64) -> Result<oneshot::Receiver<()>> {
        let (tx, rx) = oneshot::channel();
        self.send(Cmd::AwaitMark { token, done: tx })?;
        Ok(rx)
    }

    /// Stops the thread and waits for it (blocking: call from a blocking context).
    pub fn stop_and_join(&self) {
        self.mailbox.close();
        let handle = lock(&self.thread).take();
        if let Some(h) = handle {
            let _ = h.join();
        }
    }

    /// Stops the thread without waiting.
    pub fn stop(&self) {
        self.mailbox.close();
    }
}

fn ready_rx_inbox(receiver: &Receiver) -> Result<oneshot::Receiver<Confirm>> {
    let (tx, rx) = oneshot::channel();
    receiver.send(Cmd::Subscribe {
        topic: Vec::new(), // replaced by the inbox topic in the thread
        route: Route::Inbox,
        done: Some(tx),
    })?;
    Ok(rx)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    Unknown,
    Up,
    Down,
}

struct Buffered {
    epoch: u64,
    seq: u64,
    replayed: bool,
    payload: zmq::Message,
}

/// One message's envelope bytes: a whole frame, or an item of a batch frame.
enum Piece<'a> {
    Frame(zmq::Message),
    Item(&'a [u8]),
}

impl Piece<'_> {
    fn as_slice(&self) -> &[u8] {
        match self {
            Piece::Frame(m) => m,
            Piece::Item(b) => b,
        }
    }

    /// Owned, to be held back while a probe is outstanding (rare: copies an item).
    fn into_message(self) -> zmq::Message {
        match self {
            Piece::Frame(m) => m,
            Piece::Item(b) => zmq::Message::from(b),
        }
    }
}

enum SubState {
    /// Waiting for the publisher's answer; messages are held back meanwhile.
    Probing {
        /// The probe topic; `None` while disconnected (sent when the connection is back).
        probe: Option<Vec<u8>>,
        buffered: Vec<Buffered>,
        deadline: Option<Instant>,
        waiters: Vec<oneshot::Sender<Confirm>>,
        /// After a reconnection: the `(epoch, seq)` delivered already (replays up to it
        /// are duplicates).
        floor: Option<(u64, u64)>,
    },
    Live {
        epoch: Option<u64>,
        last: u64,
    },
}

struct Sub {
    route: Route,
    state: SubState,
}

struct State {
    shared: Arc<Shared>,
    inbox_topic: Vec<u8>,
    prefix: String,
    endpoint: String,
    subscribe_timeout: Duration,
    max_buffered: usize,
    subs: HashMap<Vec<u8>, Sub>,
    probes: HashMap<Vec<u8>, Vec<u8>>,
    marks: HashMap<u64, (oneshot::Sender<()>, Instant)>,
    /// Marks that arrived before their `AwaitMark` command was read (the command and the
    /// mark race on different paths).
    early_marks: HashMap<u64, Instant>,
    link: Link,
    probe_n: u64,
    last_reconcile: Instant,
    /// Probes answered (or given up): unsubscribed at the end of the loop turn.
    pending_unsubscribe: Vec<Vec<u8>>,
    /// Envelopes accepted from the socket, handed to the inbox in one go per loop turn.
    ready: Vec<Envelope>,
}

static MONITOR_N: AtomicU64 = AtomicU64::new(0);

const MONITOR_EVENTS: [zmq::SocketEvent; 8] = [
    zmq::SocketEvent::MONITOR_STOPPED,
    zmq::SocketEvent::HANDSHAKE_SUCCEEDED,
    zmq::SocketEvent::HANDSHAKE_FAILED_NO_DETAIL,
    zmq::SocketEvent::HANDSHAKE_FAILED_PROTOCOL,
    zmq::SocketEvent::HANDSHAKE_FAILED_AUTH,
    zmq::SocketEvent::DISCONNECTED,
    zmq::SocketEvent::CONNECT_RETRIED,
    zmq::SocketEvent::CONNECTED,
];

fn setup(cfg: &ZmqConfig, shared: &Shared) -> Result<(zmq::Socket, zmq::Socket)> {
    let ctx = context();
    let sub = ctx
        .socket(zmq::SUB)
        .map_err(|e| zmq_err("could not create the SUB socket", e))?;
    cfg.apply_common(&sub)?;
    // Nothing of a SUB socket's is worth waiting for at close (only subscriptions).
    sub.set_linger(0)
        .map_err(|e| zmq_err("could not set linger", e))?;
    sub.set_rcvhwm(cfg.rcvhwm)
        .map_err(|e| zmq_err("could not set rcvhwm", e))?;
    cfg.apply_curve_client(&sub)?;
    let monitor_endpoint = format!(
        "inproc://chanlayer-zmq-monitor-{}-{}",
        shared.id,
        MONITOR_N.fetch_add(1, Ordering::Relaxed)
    );
    let events = MONITOR_EVENTS
        .iter()
        .fold(0i32, |acc, e| acc | i32::from(e.to_raw()));
    sub.monitor(&monitor_endpoint, events)
        .map_err(|e| zmq_err("could not monitor the SUB socket", e))?;
    let monitor = ctx
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

fn run(
    cfg: ZmqConfig,
    shared: Arc<Shared>,
    mailbox: Arc<Mailbox<Cmd>>,
    ready: std::sync::mpsc::Sender<Result<()>>,
) {
    let (sub, monitor) = match setup(&cfg, &shared) {
        Ok(s) => s,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    let mut st = State {
        inbox_topic: wire::inbox_topic(&shared.options.prefix, &shared.id),
        prefix: shared.options.prefix.clone(),
        endpoint: cfg.subscribe_endpoint().to_owned(),
        shared,
        subscribe_timeout: cfg.subscribe_timeout,
        max_buffered: usize::try_from(cfg.rcvhwm)
            .unwrap_or(0)
            .max(10_000)
            .saturating_mul(4),
        subs: HashMap::new(),
        probes: HashMap::new(),
        marks: HashMap::new(),
        early_marks: HashMap::new(),
        link: Link::Unknown,
        probe_n: 0,
        last_reconcile: Instant::now(),
        pending_unsubscribe: Vec::new(),
        ready: Vec::new(),
    };
    loop {
        let probing = st
            .subs
            .values()
            .any(|s| matches!(s.state, SubState::Probing { .. }));
        let timeout = if mailbox.prepare_sleep() {
            if probing {
                100
            } else {
                1000
            }
        } else {
            0
        };
        {
            let mut items = [
                sub.as_poll_item(zmq::POLLIN),
                monitor.as_poll_item(zmq::POLLIN),
                mailbox.poll_item(),
            ];
            if let Err(e) = zmq::poll(&mut items, timeout) {
                if e != zmq::Error::EINTR {
                    tracing::warn!(error = %e, "the receiver could not poll its sockets");
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
        mailbox.woke();
        if mailbox.is_closed() {
            break;
        }
        for cmd in mailbox.take_all() {
            st.command(&sub, cmd);
        }
        st.drain_monitor(&monitor, &sub);
        st.drain_sub(&sub, 4096);
        st.timers(&sub);
        st.hand_over();
    }
    st.shared.sync.outstanding.store(0, Ordering::SeqCst);
    st.shared.sync.gone.store(true, Ordering::SeqCst);
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
        let Ok(frames) = monitor.recv_multipart(zmq::DONTWAIT) else {
            continue;
        };
        let is_stop = frames
            .first()
            .filter(|f| f.len() >= 2)
            .is_some_and(|f| u16::from_ne_bytes([f[0], f[1]]) == stopped);
        if is_stop {
            return;
        }
    }
    tracing::warn!("libzmq did not report the end of a socket monitor within 10s");
}

impl State {
    fn command(&mut self, sock: &zmq::Socket, cmd: Cmd) {
        match cmd {
            Cmd::Subscribe { topic, route, done } => {
                let topic = if route == Route::Inbox {
                    self.inbox_topic.clone()
                } else {
                    topic
                };
                self.subscribe(sock, topic, route, done);
            }
            Cmd::Reconcile { group, done } => self.reconcile(sock, &group, done),
            Cmd::ReconcileAll => self.reconcile_all(sock),
            Cmd::AwaitMark { token, done } => {
                if self.early_marks.remove(&token).is_some() {
                    let _ = done.send(());
                } else {
                    self.marks.insert(token, (done, Instant::now()));
                }
            }
        }
    }

    fn subscribe(
        &mut self,
        sock: &zmq::Socket,
        topic: Vec<u8>,
        route: Route,
        done: Option<oneshot::Sender<Confirm>>,
    ) {
        let link = self.link;
        if let Some(sub) = self.subs.get_mut(&topic) {
            if let Some(done) = done {
                match &mut sub.state {
                    SubState::Live { .. } => {
                        let _ = done.send(Confirm::Confirmed);
                    }
                    SubState::Probing { .. } if link == Link::Down => {
                        let _ = done.send(Confirm::NotConnected);
                    }
                    SubState::Probing { waiters, .. } => waiters.push(done),
                }
            }
            return;
        }
        self.probe_n += 1;
        let probe = wire::probe_topic(&self.shared.id, self.probe_n, &topic);
        if let Err(e) = sock
            .set_subscribe(&topic)
            .and_then(|()| sock.set_subscribe(&probe))
        {
            tracing::warn!(error = %e, topic = %wire::display(&topic), "could not subscribe");
        }
        let mut waiters = Vec::new();
        if let Some(done) = done {
            if link == Link::Down {
                let _ = done.send(Confirm::NotConnected);
            } else {
                waiters.push(done);
            }
        }
        let deadline = (link != Link::Down).then(|| Instant::now() + self.subscribe_timeout);
        let route_is_inbox = route == Route::Inbox;
        self.probes.insert(probe.clone(), topic.clone());
        self.subs.insert(
            topic,
            Sub {
                route,
                state: SubState::Probing {
                    probe: Some(probe),
                    buffered: Vec::new(),
                    deadline,
                    waiters,
                    floor: None,
                },
            },
        );
        if route_is_inbox {
            // Counted from the start (the layer sets 1 before the thread runs).
        } else {
            self.shared.sync.outstanding.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn unsubscribe(&mut self, sock: &zmq::Socket, topic: &[u8]) {
        let Some(sub) = self.subs.remove(topic) else {
            return;
        };
        if let Err(e) = sock.set_unsubscribe(topic) {
            tracing::debug!(error = %e, "could not unsubscribe");
        }
        if let SubState::Probing { probe, waiters, .. } = sub.state {
            if let Some(probe) = probe {
                let _ = sock.set_unsubscribe(&probe);
                self.probes.remove(&probe);
            }
            self.shared.sync.outstanding.fetch_sub(1, Ordering::SeqCst);
            for w in waiters {
                let _ = w.send(Confirm::Confirmed);
            }
        }
    }

    fn reconcile(
        &mut self,
        sock: &zmq::Socket,
        group: &str,
        done: Option<oneshot::Sender<Confirm>>,
    ) {
        let topic = wire::group_topic(&self.prefix, group);
        if self.shared.groups.has_members(group) {
            self.subscribe(sock, topic, Route::Group(group.to_owned()), done);
        } else {
            self.unsubscribe(sock, &topic);
            if let Some(done) = done {
                let _ = done.send(Confirm::Confirmed);
            }
        }
    }

    fn reconcile_all(&mut self, sock: &zmq::Socket) {
        let empty: Vec<Vec<u8>> = self
            .subs
            .iter()
            .filter_map(|(t, s)| match &s.route {
                Route::Group(g) if !self.shared.groups.has_members(g) => Some(t.clone()),
                _ => None,
            })
            .collect();
        for t in empty {
            self.unsubscribe(sock, &t);
        }
    }

    fn set_link(&mut self, sock: &zmq::Socket, up: bool) {
        let new = if up { Link::Up } else { Link::Down };
        if self.link == new {
            return;
        }
        let was = self.link;
        self.link = new;
        self.shared.transport.link_up.store(up, Ordering::Relaxed);
        let now = Instant::now();
        let mut reprobe = Vec::new();
        for (topic, sub) in self.subs.iter_mut() {
            match &mut sub.state {
                SubState::Probing {
                    deadline,
                    waiters,
                    probe,
                    ..
                } => {
                    if up {
                        *deadline = Some(now + self.subscribe_timeout);
                        if probe.is_none() {
                            reprobe.push(topic.clone());
                        }
                    } else {
                        *deadline = None;
                        for w in waiters.drain(..) {
                            let _ = w.send(Confirm::NotConnected);
                        }
                    }
                }
                // The connection broke: what the publisher sends to channels and inboxes
                // meanwhile is retained there; hold this topic until a new probe's replay
                // has filled the gap (groups are not retained: nothing to fill).
                SubState::Live {
                    epoch: Some(epoch),
                    last,
                } if !up && was == Link::Up => {
                    if matches!(sub.route, Route::Inbox | Route::Channel(_)) {
                        sub.state = SubState::Probing {
                            probe: None,
                            buffered: Vec::new(),
                            deadline: None,
                            waiters: Vec::new(),
                            floor: Some((*epoch, *last)),
                        };
                        self.shared.sync.outstanding.fetch_add(1, Ordering::SeqCst);
                    }
                }
                SubState::Live { .. } => {}
            }
        }
        for topic in reprobe {
            self.probe_n += 1;
            let probe = wire::probe_topic(&self.shared.id, self.probe_n, &topic);
            if let Err(e) = sock.set_subscribe(&probe) {
                tracing::warn!(error = %e, "could not send a subscription probe");
            }
            self.probes.insert(probe.clone(), topic.clone());
            if let Some(Sub {
                state: SubState::Probing { probe: p, .. },
                ..
            }) = self.subs.get_mut(&topic)
            {
                *p = Some(probe);
            }
        }
        tracing::debug!(endpoint = %self.endpoint, up, "subscriber connection changed");
    }

    fn drain_monitor(&mut self, monitor: &zmq::Socket, sock: &zmq::Socket) {
        loop {
            let frames = match monitor.recv_multipart(zmq::DONTWAIT) {
                Ok(f) => f,
                Err(zmq::Error::EINTR) => continue,
                Err(_) => break,
            };
            let Some(first) = frames.first() else {
                continue;
            };
            if first.len() < 2 {
                continue;
            }
            let event = u16::from_ne_bytes([first[0], first[1]]);
            let is = |e: zmq::SocketEvent| event == e.to_raw();
            if is(zmq::SocketEvent::HANDSHAKE_SUCCEEDED) {
                self.set_link(sock, true);
            } else if is(zmq::SocketEvent::DISCONNECTED)
                || is(zmq::SocketEvent::CONNECT_RETRIED)
                || is(zmq::SocketEvent::HANDSHAKE_FAILED_NO_DETAIL)
                || is(zmq::SocketEvent::HANDSHAKE_FAILED_PROTOCOL)
                || is(zmq::SocketEvent::HANDSHAKE_FAILED_AUTH)
            {
                if is(zmq::SocketEvent::HANDSHAKE_FAILED_AUTH) {
                    tracing::warn!(endpoint = %self.endpoint, "the publisher refused our CURVE keys");
                }
                self.set_link(sock, false);
            }
        }
    }

    fn drain_sub(&mut self, sock: &zmq::Socket, max: usize) {
        let mut frames: Vec<zmq::Message> = Vec::with_capacity(4);
        for _ in 0..max {
            frames.clear();
            let mut extra = 0usize;
            loop {
                match sock.recv_msg(zmq::DONTWAIT) {
                    Ok(m) => {
                        let more = m.get_more();
                        if frames.len() < 3 {
                            frames.push(m);
                        } else {
                            extra += 1;
                        }
                        if !more {
                            break;
                        }
                    }
                    Err(zmq::Error::EINTR) => continue,
                    Err(zmq::Error::EAGAIN) if frames.is_empty() => return,
                    Err(e) => {
                        tracing::debug!(error = %e, "receive failed mid-message");
                        break;
                    }
                }
            }
            if frames.is_empty() {
                return;
            }
            if self.link != Link::Up {
                // Something arrived: there is a connection, whatever the monitor said last.
                self.set_link(sock, true);
            }
            if extra > 0 {
                self.garbage(
                    &frames[0],
                    &format!(
                        "{} frames; chanlayer messages have 2 or 3",
                        frames.len() + extra
                    ),
                );
                continue;
            }
            let message = std::mem::take(&mut frames);
            self.on_message(message);
            if self.ready.len() >= HAND_OVER_AT {
                // The receiving tasks start on these while this thread decodes the rest.
                self.hand_over();
            }
        }
    }

    fn garbage(&self, topic: &[u8], why: &str) {
        self.shared
            .stats
            .record_undecodable(&wire::display(topic), &why);
    }

    fn on_message(&mut self, mut frames: Vec<zmq::Message>) {
        enum Dest {
            Sub,
            Probe(Vec<u8>),
            Stale,
            Garbage,
        }
        let n = frames.len();
        let meta = frames.get(1).and_then(|m| wire::parse_meta(m));
        let dest = {
            let topic: &[u8] = &frames[0];
            if self.subs.contains_key(topic) {
                Dest::Sub
            } else if let Some(of) = self.probes.get(topic) {
                Dest::Probe(of.clone())
            } else if wire::data_topic_kind(topic).is_some() || wire::parse_probe(topic).is_some() {
                Dest::Stale
            } else {
                Dest::Garbage
            }
        };
        match dest {
            Dest::Sub => match (n, meta) {
                (3, Some((wire::META_DATA, epoch, seq))) => {
                    let payload = frames.pop().expect("the message has three frames");
                    let topic = frames.swap_remove(0);
                    self.on_data(&topic, epoch, seq, Piece::Frame(payload), false);
                }
                (3, Some((wire::META_BATCH, epoch, first))) => {
                    let body = frames.pop().expect("the message has three frames");
                    let topic = frames.swap_remove(0);
                    match wire::batch_items(&body) {
                        Some(items) => self.on_batch(&topic, epoch, first, &items),
                        None => self.garbage(&topic, "a malformed batch"),
                    }
                }
                (2, Some((wire::META_MARK, _, token))) if frames[0][..] == self.inbox_topic[..] => {
                    // What arrived before the mark is in the inbox before its waiter (a
                    // barrier, a flush that then empties the inbox) hears of it.
                    self.hand_over();
                    match self.marks.remove(&token) {
                        Some((done, _)) => {
                            let _ = done.send(());
                        }
                        None => {
                            self.early_marks.insert(token, Instant::now());
                        }
                    }
                }
                _ => self.garbage(&frames[0], "not a chanlayer message (wrong frames or meta)"),
            },
            Dest::Probe(of) => match (n, meta) {
                (3, Some((wire::META_DATA, epoch, seq))) => {
                    let payload = frames.pop().expect("the message has three frames");
                    self.on_data(&of, epoch, seq, Piece::Frame(payload), true);
                }
                (2, Some((wire::META_WELCOME, epoch, seq))) => {
                    self.release(&of, Some((epoch, seq)));
                }
                _ => self.garbage(&frames[0], "not a chanlayer probe answer"),
            },
            // A message of a topic unsubscribed a moment ago, still on its way.
            Dest::Stale => {}
            Dest::Garbage => self.garbage(&frames[0], "not a chanlayer topic"),
        }
    }

    /// A batch frame: the messages `first`, `first + 1`, ... of `topic`. A live topic takes
    /// them in one go (one lookup, one sequence check); otherwise each goes through
    /// [`State::on_data`].
    fn on_batch(&mut self, topic: &[u8], epoch: u64, first: u64, items: &[&[u8]]) {
        if let Some(Sub {
            route,
            state: SubState::Live { epoch: e, last },
        }) = self.subs.get_mut(topic)
        {
            let end = first + items.len() as u64 - 1;
            let mut skip = 0usize;
            if *e == Some(epoch) {
                if end <= *last {
                    return; // seen already
                }
                if first > *last + 1 {
                    let gap = first - *last - 1;
                    self.shared.transport.lost.fetch_add(gap, Ordering::Relaxed);
                    tracing::debug!(topic = %wire::display(topic), gap, "messages lost on the way (a gap in the topic's sequence)");
                } else {
                    skip = usize::try_from(*last + 1 - first).unwrap_or(items.len());
                }
            }
            *e = Some(epoch);
            *last = end;
            let now = now_ms();
            for item in &items[skip.min(items.len())..] {
                if let Some(env) = accept(&self.shared, route, topic, item, now) {
                    self.ready.push(env);
                }
            }
            return;
        }
        for (seq, item) in (first..).zip(items) {
            self.on_data(topic, epoch, seq, Piece::Item(item), false);
        }
    }

    fn on_data(&mut self, topic: &[u8], epoch: u64, seq: u64, payload: Piece<'_>, replayed: bool) {
        let max_buffered = self.max_buffered;
        let Some(Sub { route, state }) = self.subs.get_mut(topic) else {
            return;
        };
        let overflow = match state {
            SubState::Probing { buffered, .. } => {
                buffered.push(Buffered {
                    epoch,
                    seq,
                    replayed,
                    payload: payload.into_message(),
                });
                buffered.len() > max_buffered
            }
            SubState::Live { epoch: e, last } => {
                if replayed {
                    return; // a replay answering a probe we gave up on
                }
                if *e == Some(epoch) {
                    if seq <= *last {
                        return; // seen already
                    }
                    if seq > *last + 1 {
                        let gap = seq - *last - 1;
                        self.shared.transport.lost.fetch_add(gap, Ordering::Relaxed);
                        tracing::debug!(topic = %wire::display(topic), gap, "messages lost on the way (a gap in the topic's sequence)");
                    }
                }
                // Otherwise a new publisher (a restart): a new sequence starts.
                *e = Some(epoch);
                *last = seq;
                if let Some(env) = accept(&self.shared, route, topic, payload.as_slice(), now_ms())
                {
                    self.ready.push(env);
                }
                false
            }
        };
        if overflow {
            tracing::warn!(topic = %wire::display(topic), "no answer to the subscription probe while {max_buffered} messages waited; delivering them");
            self.release(topic, None);
        }
    }

    /// Ends the probe of `topic`: delivers what waited, in sequence order, once each, and
    /// makes the topic live. `welcome` is the publisher's answer (`None`: gave up waiting).
    fn release(&mut self, topic: &[u8], welcome: Option<(u64, u64)>) {
        let Some(sub) = self.subs.get_mut(topic) else {
            return;
        };
        let SubState::Probing { .. } = sub.state else {
            return;
        };
        let state = std::mem::replace(
            &mut sub.state,
            SubState::Live {
                epoch: None,
                last: 0,
            },
        );
        let SubState::Probing {
            probe,
            mut buffered,
            waiters,
            floor,
            ..
        } = state
        else {
            return;
        };
        let route = sub.route.clone();
        buffered.sort_by_key(|b| b.seq);
        buffered.dedup_by_key(|b| b.seq);
        if let Some((fe, fl)) = floor {
            // Delivered before the connection broke.
            buffered.retain(|b| b.epoch != fe || b.seq > fl);
        }
        let mut epoch = welcome
            .map(|(e, _)| e)
            .or_else(|| buffered.last().map(|b| b.epoch))
            .or(floor.map(|(e, _)| e));
        let mut last = match (welcome, floor) {
            (Some((we, ws)), Some((fe, fl))) if we == fe => ws.max(fl),
            (Some((_, ws)), _) => ws,
            (None, Some((fe, fl))) if Some(fe) == epoch => fl,
            _ => 0,
        };
        // Counted before they are handed out: a receiver that has them sees the count.
        let replays = buffered.iter().filter(|b| b.replayed).count() as u64;
        self.shared
            .transport
            .replayed
            .fetch_add(replays, Ordering::Relaxed);
        // After a reconnection to the same publisher, what the replay could not fill is
        // lost: count the holes between what was delivered before and the welcome (before
        // handing anything out, so a receiver that has the messages sees the count).
        let mut expected = match floor {
            Some((fe, fl)) if Some(fe) == epoch => Some(fl + 1),
            _ => None,
        };
        let mut lost = 0u64;
        for b in &buffered {
            if epoch.is_none() {
                epoch = Some(b.epoch);
            }
            if Some(b.epoch) == epoch {
                last = last.max(b.seq);
                if let Some(x) = expected.as_mut() {
                    lost += b.seq.saturating_sub(*x);
                    *x = b.seq + 1;
                }
            }
        }
        if let (Some(x), Some((we, ws))) = (expected, welcome) {
            if Some(we) == epoch && ws >= x {
                lost += ws + 1 - x;
            }
        }
        if lost > 0 {
            self.shared
                .transport
                .lost
                .fetch_add(lost, Ordering::Relaxed);
            tracing::debug!(topic = %wire::display(topic), lost, "messages lost while the connection was down");
        }
        let now = now_ms();
        for b in &buffered {
            if let Some(env) = accept(&self.shared, &route, topic, &b.payload, now) {
                self.ready.push(env);
            }
        }
        // In the inbox before anyone waiting for this subscription hears of it.
        self.hand_over();
        if let Some(sub) = self.subs.get_mut(topic) {
            sub.state = SubState::Live { epoch, last };
        }
        if let Some(probe) = probe {
            self.probes.remove(&probe);
            self.pending_unsubscribe.push(probe);
        }
        self.shared.sync.outstanding.fetch_sub(1, Ordering::SeqCst);
        let answer = if welcome.is_some() {
            Confirm::Confirmed
        } else {
            Confirm::NoAnswer
        };
        for w in waiters {
            let _ = w.send(answer);
        }
    }

    /// Hands the accepted envelopes to the inbox (one lock per burst).
    fn hand_over(&mut self) {
        if self.ready.is_empty() {
            return;
        }
        let s = &self.shared;
        s.inbox
            .deliver_all(&mut self.ready, &s.groups, &s.options, &s.stats);
    }

    fn timers(&mut self, sock: &zmq::Socket) {
        for probe in self.pending_unsubscribe.drain(..) {
            let _ = sock.set_unsubscribe(&probe);
        }
        let now = Instant::now();
        let overdue: Vec<Vec<u8>> = self
            .subs
            .iter()
            .filter_map(|(t, s)| match &s.state {
                SubState::Probing {
                    deadline: Some(d),
                    probe: Some(_),
                    ..
                } if *d <= now && self.link == Link::Up => Some(t.clone()),
                _ => None,
            })
            .collect();
        for t in overdue {
            tracing::warn!(
                endpoint = %self.endpoint,
                topic = %wire::display(&t),
                "the publisher did not answer the subscription probe within {:?} (is it a chanlayer publisher?); the subscription stays, unconfirmed",
                self.subscribe_timeout
            );
            self.release(&t, None);
        }
        for probe in self.pending_unsubscribe.drain(..) {
            let _ = sock.set_unsubscribe(&probe);
        }
        if now.duration_since(self.last_reconcile) >= Duration::from_secs(1) {
            self.last_reconcile = now;
            // Marks whose caller gave up long ago.
            self.marks
                .retain(|_, (_, since)| now.duration_since(*since) < Duration::from_secs(600));
            self.early_marks
                .retain(|_, since| now.duration_since(*since) < Duration::from_secs(60));
            self.shared.groups.prune_expired();
            self.reconcile_all(sock);
        }
    }
}

/// Decodes one envelope from the wire and checks that it belongs on `topic`, has not
/// expired, and is for this instance; `None` (counted) if not.
fn accept(
    shared: &Shared,
    route: &Route,
    topic: &[u8],
    payload: &[u8],
    now: u64,
) -> Option<Envelope> {
    let env = match Envelope::decode(payload) {
        Ok(e) => e,
        Err(e) => {
            shared.stats.record_undecodable(&wire::display(topic), &e);
            return None;
        }
    };
    let fits = match route {
        Route::Inbox => {
            env.kind == Destination::Channel
                && names::owner_instance(&env.destination) == Some(shared.id.as_str())
        }
        Route::Channel(name) => env.kind == Destination::Channel && env.destination == *name,
        Route::Group(name) => env.kind == Destination::Group && env.destination == *name,
    };
    if !fits {
        shared.stats.record_undecodable(
            &wire::display(topic),
            &format!(
                "an envelope for {:?} {:?} does not belong on this topic",
                env.kind, env.destination
            ),
        );
        return None;
    }
    if env.is_expired_at(now) {
        shared.stats.record_expired(1);
        return None;
    }
    Some(env)
}
