//! The receiving thread's subscriptions: what the SUB socket is subscribed to and why,
//! the probe of each new subscription (and again after a reconnection), the connection's
//! state as the socket monitor reports it, marks that callers wait for, and the periodic
//! work (probes that time out, expired group memberships).

use hashbrown::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chanlayer_core::toolkit::Envelope;
use tokio::sync::oneshot;

use super::{Cmd, Confirm, Route, Shared};
use crate::config::{Mode, ZmqConfig};
use crate::origins::OriginTracker;
use crate::seq::{Held, Pos, SeqTracker};
use crate::wire;
use crate::wire::Origin;

/// The SUB socket's connection, as its monitor reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Link {
    Unknown,
    Up,
    Down,
}

/// A subscription waiting for the publisher's answer; messages are held back meanwhile.
#[derive(Default)]
pub(super) struct Probing {
    /// The probe topic; `None` while disconnected (sent when the connection is back).
    pub probe: Option<Vec<u8>>,
    /// Messages held back, each with its origin (dedicated mode).
    pub held: Vec<Held<(Vec<u8>, Option<Origin>)>>,
    pub deadline: Option<Instant>,
    pub waiters: Vec<oneshot::Sender<Confirm>>,
    /// A waiter that stays through disconnections (the others hear `NotConnected` when the
    /// connection drops): a dedicated-mode layer's open, waiting for a proxy that may come
    /// up a moment after it (the open gives up at `connect_timeout`).
    pub patient: Option<oneshot::Sender<Confirm>>,
    /// After a reconnection: what was delivered already (replays up to it are
    /// duplicates, and the gap after it is counted).
    pub floor: Option<Pos>,
}

/// Where one subscription stands.
pub(super) enum SubState {
    /// Waiting for the publisher's answer.
    Probing(Probing),
    /// Delivering as messages arrive, checking their sequence.
    Live(SeqTracker),
}

/// One subscribed topic.
pub(super) struct Sub {
    pub route: Route,
    pub state: SubState,
    /// Loss accounting by origin, for topics whose messages carry one (dedicated mode).
    pub origins: OriginTracker,
}

/// The probes of a receiver: probe topic -> the topic it probes.
#[derive(Default)]
pub(super) struct Probes {
    n: u64,
    pub of: HashMap<Vec<u8>, Vec<u8>>,
}

impl Probes {
    /// Subscribes a new probe of `topic` (after the topic itself, on the same connection).
    fn open(&mut self, sock: &zmq::Socket, instance: &str, topic: &[u8]) -> Vec<u8> {
        self.n += 1;
        let probe = wire::probe_topic(instance, self.n, topic);
        if let Err(e) = sock.set_subscribe(&probe) {
            tracing::warn!(error = %e, "could not send a subscription probe");
        }
        self.of.insert(probe.clone(), topic.to_vec());
        probe
    }
}

/// Everything the receiving thread keeps.
pub(super) struct State {
    pub shared: Arc<Shared>,
    pub inbox_topic: Vec<u8>,
    cfg: ZmqConfig,
    /// Messages one probing topic may hold back before they are delivered anyway.
    pub max_held: usize,
    pub subs: HashMap<Vec<u8>, Sub>,
    pub probes: Probes,
    pub marks: HashMap<u64, (oneshot::Sender<()>, Instant)>,
    /// Marks that arrived before their `AwaitMark` command was read (the command and the
    /// mark race on different paths).
    pub early_marks: HashMap<u64, Instant>,
    pub link: Link,
    last_reconcile: Instant,
    /// Probes answered (or given up): unsubscribed at the end of the loop turn.
    pub pending_unsubscribe: Vec<Vec<u8>>,
    /// Envelopes accepted from the socket, handed to the inbox in one go per loop turn.
    pub ready: Vec<Envelope>,
}

impl State {
    pub fn new(cfg: ZmqConfig, shared: Arc<Shared>) -> State {
        State {
            inbox_topic: wire::inbox_topic(&shared.options().prefix, shared.id()),
            shared,
            max_held: usize::try_from(cfg.rcvhwm)
                .unwrap_or(0)
                .max(10_000)
                .saturating_mul(4),
            cfg,
            subs: HashMap::new(),
            probes: Probes::default(),
            marks: HashMap::new(),
            early_marks: HashMap::new(),
            link: Link::Unknown,
            last_reconcile: Instant::now(),
            pending_unsubscribe: Vec::new(),
            ready: Vec::new(),
        }
    }

    /// `true` while a probe is outstanding (the thread then wakes more often).
    pub fn probing(&self) -> bool {
        self.subs
            .values()
            .any(|s| matches!(s.state, SubState::Probing(_)))
    }

    pub fn command(&mut self, sock: &zmq::Socket, cmd: Cmd) {
        match cmd {
            Cmd::Channel(channel) => {
                let topic = wire::channel_topic(&self.shared.options().prefix, &channel);
                self.subscribe(sock, topic, Route::Channel(channel), None);
            }
            Cmd::Reconcile {
                group: Some(g),
                done,
            } => self.reconcile(sock, &g, done),
            Cmd::Reconcile { group: None, .. } => self.reconcile_all(sock),
            Cmd::AwaitMark { token, done } => {
                if self.early_marks.remove(&token).is_some() {
                    let _ = done.send(());
                } else {
                    self.marks.insert(token, (done, Instant::now()));
                }
            }
        }
    }

    /// Subscribes the inbox; `done` hears when the publisher confirmed it. In dedicated
    /// mode it waits through failed connection attempts: the proxy may start a moment after
    /// this layer, and the open waits for it up to `connect_timeout`. In embedded mode no
    /// publisher yet is answered at once (`NotConnected`): the first send may bind it.
    pub(super) fn subscribe_inbox(&mut self, sock: &zmq::Socket, done: oneshot::Sender<Confirm>) {
        let topic = self.inbox_topic.clone();
        if !matches!(self.cfg.mode, Mode::Dedicated { .. }) {
            return self.subscribe(sock, topic, Route::Inbox, Some(done));
        }
        self.subscribe(sock, topic.clone(), Route::Inbox, None);
        match self.subs.get_mut(&topic).map(|s| &mut s.state) {
            Some(SubState::Probing(p)) => p.patient = Some(done),
            _ => {
                let _ = done.send(Confirm::Confirmed);
            }
        }
    }

    /// Subscribes `topic` (and probes it) unless it is already; `done` hears when it is
    /// confirmed.
    pub(super) fn subscribe(
        &mut self,
        sock: &zmq::Socket,
        topic: Vec<u8>,
        route: Route,
        done: Option<oneshot::Sender<Confirm>>,
    ) {
        let link = self.link;
        if !self.subs.contains_key(&topic) {
            if let Err(e) = sock.set_subscribe(&topic) {
                tracing::warn!(error = %e, topic = %wire::display(&topic), "could not subscribe");
            }
            if route != Route::Inbox {
                // (The inbox is counted from the start: the layer sets 1 before the thread runs.)
                self.shared.transport.outstanding(true);
            }
            let state = SubState::Probing(Probing {
                probe: Some(self.probes.open(sock, self.shared.id(), &topic)),
                deadline: (link != Link::Down).then(|| Instant::now() + self.cfg.subscribe_timeout),
                ..Probing::default()
            });
            let sub = Sub {
                route,
                state,
                origins: OriginTracker::default(),
            };
            self.subs.insert(topic.clone(), sub);
        }
        let (Some(done), Some(sub)) = (done, self.subs.get_mut(&topic)) else {
            return;
        };
        let answer = match &mut sub.state {
            SubState::Live(_) => Confirm::Confirmed,
            SubState::Probing(_) if link == Link::Down => Confirm::NotConnected,
            SubState::Probing(p) => return p.waiters.push(done),
        };
        let _ = done.send(answer);
    }

    fn unsubscribe(&mut self, sock: &zmq::Socket, topic: &[u8]) {
        let Some(sub) = self.subs.remove(topic) else {
            return;
        };
        if let Err(e) = sock.set_unsubscribe(topic) {
            tracing::debug!(error = %e, "could not unsubscribe");
        }
        if let SubState::Probing(p) = sub.state {
            if let Some(probe) = p.probe {
                let _ = sock.set_unsubscribe(&probe);
                self.probes.of.remove(&probe);
            }
            self.shared.transport.outstanding(false);
            for w in p.waiters.into_iter().chain(p.patient) {
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
        let topic = wire::group_topic(&self.shared.options().prefix, group);
        if self.shared.groups().has_members(group) {
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
                Route::Group(g) if !self.shared.groups().has_members(g) => Some(t.clone()),
                _ => None,
            })
            .collect();
        for t in empty {
            self.unsubscribe(sock, &t);
        }
    }

    pub(super) fn set_link(&mut self, sock: &zmq::Socket, up: bool) {
        let new = if up { Link::Up } else { Link::Down };
        if self.link == new {
            return;
        }
        let was = std::mem::replace(&mut self.link, new);
        self.shared.transport.link_up.store(up, Ordering::Relaxed);
        let now = Instant::now();
        for (topic, sub) in self.subs.iter_mut() {
            match &mut sub.state {
                SubState::Probing(p) => {
                    if up {
                        p.deadline = Some(now + self.cfg.subscribe_timeout);
                        p.probe
                            .get_or_insert_with(|| self.probes.open(sock, self.shared.id(), topic));
                    } else {
                        p.deadline = None;
                        for w in p.waiters.drain(..) {
                            let _ = w.send(Confirm::NotConnected);
                        }
                    }
                }
                // The connection broke: what the publisher sends to channels and inboxes
                // meanwhile is retained there; hold this topic until a new probe's replay
                // has filled the gap (groups are not retained: nothing to fill).
                SubState::Live(tracker) if !up && was == Link::Up => {
                    let floor = tracker.last;
                    if floor.is_some() && matches!(sub.route, Route::Inbox | Route::Channel(_)) {
                        sub.state = SubState::Probing(Probing {
                            floor,
                            ..Probing::default()
                        });
                        self.shared.transport.outstanding(true);
                    }
                }
                SubState::Live(_) => {}
            }
        }
        tracing::debug!(endpoint = %self.cfg.subscribe_endpoint(), up, "subscriber connection changed");
    }

    pub fn drain_monitor(&mut self, monitor: &zmq::Socket, sock: &zmq::Socket) {
        use zmq::SocketEvent as E;
        loop {
            let event = match monitor.recv_multipart(zmq::DONTWAIT) {
                Ok(frames) => super::event_of(&frames),
                Err(zmq::Error::EINTR) => continue,
                Err(_) => break,
            };
            let is = |events: &[E]| events.iter().any(|e| Some(e.to_raw()) == event);
            if is(&[E::HANDSHAKE_SUCCEEDED]) {
                self.set_link(sock, true);
            } else if is(&super::DOWN_EVENTS) {
                if is(&[E::HANDSHAKE_FAILED_AUTH]) {
                    tracing::warn!(endpoint = %self.cfg.subscribe_endpoint(), "the publisher refused our CURVE keys");
                }
                if self.link == Link::Up {
                    // What the connection brought before it ended is queued on the socket
                    // (at most `rcvhwm` messages): it is live traffic, delivered now. Held
                    // for the next probe, it would wait for a publisher that may never come
                    // back (a publisher that closed right after a burst).
                    let max = self.max_held;
                    self.drain_sub(sock, max);
                }
                self.set_link(sock, false);
            }
        }
    }

    pub fn timers(&mut self, sock: &zmq::Socket) {
        let now = Instant::now();
        let overdue: Vec<Vec<u8>> = self
            .subs
            .iter()
            .filter_map(|(t, s)| match &s.state {
                SubState::Probing(Probing {
                    deadline: Some(d),
                    probe: Some(_),
                    ..
                }) if *d <= now && self.link == Link::Up => Some(t.clone()),
                _ => None,
            })
            .collect();
        for t in overdue {
            tracing::warn!(
                endpoint = %self.cfg.subscribe_endpoint(),
                topic = %wire::display(&t),
                "the publisher did not answer the subscription probe within {:?} (is it a chanlayer publisher?); the subscription stays, unconfirmed",
                self.cfg.subscribe_timeout
            );
            self.release(&t, None, None);
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
            self.reconcile_all(sock);
        }
    }
}
