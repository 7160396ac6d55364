//! The proxy of dedicated mode: a PULL socket that senders PUSH to, and an XPUB socket that
//! subscribers connect to, on one thread. Run it inside a process with [`Proxy::spawn`], or
//! as a daemon with `chanlayer zmq-proxy --pull ... --pub ...`.
//!
//! It is more than `zmq_proxy()`: it numbers each topic's messages, keeps the recent
//! messages of normal channels (and the inbox messages nobody was subscribed for) to replay
//! to late joiners, answers subscription probes, and executes marks (flush barriers). See
//! [`crate::wire`] for the frames.

use std::sync::Arc;

use chanlayer_core::{Error, Result};

use crate::bridge::{lock, recv_message, spawn, zmq_err, Mailbox, Outgoing, Worker, CONTEXT};
use crate::config::{check_endpoint, curve_available, curve_missing};
use crate::hub::{Counters, Hub, HubStats};
use crate::retention::From;
use crate::retention::Retention;
use crate::wire;

/// Settings of a [`Proxy`].
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyConfig {
    /// Where the PULL socket binds (senders connect their PUSH here). `tcp://HOST:*` or
    /// `tcp://HOST:0` binds a free port; see [`Proxy::pull_endpoint`].
    pub pull: String,
    /// Where the XPUB socket binds (subscribers connect their SUB here).
    pub publish: String,
    /// What is kept for late joiners.
    pub retention: Retention,
    /// ZMQ_SNDHWM of the XPUB socket (per subscriber).
    pub sndhwm: i32,
    /// ZMQ_RCVHWM of the PULL socket.
    pub rcvhwm: i32,
    /// CURVE: the proxy's secret key (32 bytes). When set, both sockets are CURVE servers and
    /// clients need the matching public key (`curve_serverkey`).
    pub curve_secret_key: Option<[u8; 32]>,
}

impl std::fmt::Debug for ProxyConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let key = self.curve_secret_key.map_or("<unset>", |_| "***");
        f.debug_struct("ProxyConfig")
            .field("pull", &self.pull)
            .field("publish", &self.publish)
            .field("retention", &self.retention)
            .field("sndhwm", &self.sndhwm)
            .field("rcvhwm", &self.rcvhwm)
            .field("curve_secret_key", &key)
            .finish()
    }
}

impl ProxyConfig {
    /// A proxy binding `pull` and `publish`, with default retention and high-water marks.
    pub fn new(pull: impl Into<String>, publish: impl Into<String>) -> Self {
        ProxyConfig {
            pull: pull.into(),
            publish: publish.into(),
            retention: Retention::default(),
            sndhwm: 10_000,
            rcvhwm: 10_000,
            curve_secret_key: None,
        }
    }
}

/// A running proxy: its endpoints, its counters, and [`Proxy::stop`].
///
/// ```
/// use chanlayer_zmq::{Proxy, ProxyConfig};
/// let proxy = Proxy::spawn(ProxyConfig::new("tcp://127.0.0.1:*", "tcp://127.0.0.1:*")).unwrap();
/// let url = proxy.url(); // zmq://?pull=tcp://127.0.0.1:PORT&pub=tcp://127.0.0.1:PORT
/// assert!(url.starts_with("zmq://?pull=tcp://127.0.0.1:"));
/// let stats = proxy.stop();
/// assert_eq!(stats.forwarded, 0);
/// ```
pub struct Proxy {
    worker: Worker<Mailbox<()>>,
    counters: Counters,
    pull: String,
    publish: String,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("pull", &self.pull)
            .field("publish", &self.publish)
            .field("stats", &self.stats())
            .finish()
    }
}

impl Proxy {
    /// Binds both sockets and starts the proxy's thread. Returns once bound (an address in
    /// use is an error here).
    pub fn spawn(config: ProxyConfig) -> Result<Proxy> {
        check_endpoint(&config.pull, true)?;
        check_endpoint(&config.publish, true)?;
        if config.curve_secret_key.is_some() && !curve_available() {
            return Err(curve_missing());
        }
        let counters = Counters::default();
        let c = counters.clone();
        let (thread, (mailbox, pull, publish)) = spawn(
            "proxy",
            move || {
                let (pull, xpub, p, x) = setup(&config)?;
                let mailbox = Arc::new(Mailbox::new(1)?);
                let hub = Hub::new(xpub, config.retention, true, c);
                Ok(((pull, hub, mailbox.clone()), (mailbox, p, x)))
            },
            run,
        )?;
        Ok(Proxy {
            worker: Worker::new(mailbox, thread, Mailbox::close),
            counters,
            pull,
            publish,
        })
    }

    /// The PULL endpoint as bound (a `*` or `0` port resolved).
    pub fn pull_endpoint(&self) -> &str {
        &self.pull
    }

    /// The PUB endpoint as bound (a `*` or `0` port resolved).
    pub fn pub_endpoint(&self) -> &str {
        &self.publish
    }

    /// The `zmq://` URL of a layer that uses this proxy (dedicated mode).
    pub fn url(&self) -> String {
        let enc = |s: &str| percent_encoding::utf8_percent_encode(s, QUERY_VALUE).to_string();
        format!("zmq://?pull={}&pub={}", enc(&self.pull), enc(&self.publish))
    }

    /// The proxy's counters now.
    pub fn stats(&self) -> HubStats {
        *lock(&self.counters)
    }

    /// Stops the proxy (closing both sockets) and returns its final counters (what it
    /// retained for subscribers that never came is counted in `abandoned`).
    pub fn stop(self) -> HubStats {
        self.worker.stop();
        self.stats()
    }
}

/// Makes and binds the PULL and XPUB sockets; returns them with their endpoints as bound
/// (a `*` or `0` port resolved).
fn setup(config: &ProxyConfig) -> Result<(zmq::Socket, zmq::Socket, String, String)> {
    let ipv6 = config.pull.starts_with("tcp://[") || config.publish.starts_with("tcp://[");
    let open = |kind: zmq::SocketType, what: &str, addr: &str| {
        let s = CONTEXT
            .socket(kind)
            .map_err(|e| zmq_err(format!("could not create the {kind:?} socket"), e))?;
        s.set_linger(0).map_err(|e| zmq_err("linger", e))?;
        if let Some(key) = &config.curve_secret_key {
            s.set_curve_server(true)
                .and_then(|()| s.set_curve_secretkey(key))
                .map_err(|e| Error::Config(format!("CURVE server key: {e}")))?;
        }
        s.set_ipv6(ipv6).map_err(|e| zmq_err("ipv6", e))?;
        let (hwm, set) = match kind {
            zmq::PULL => ("rcvhwm", s.set_rcvhwm(config.rcvhwm)),
            _ => ("sndhwm", s.set_sndhwm(config.sndhwm)),
        };
        set.map_err(|e| zmq_err(hwm, e))?;
        s.bind(addr).map_err(|e| {
            let why = match e {
                zmq::Error::EADDRINUSE => format!(
                    "the proxy's {what} address {addr} is already in use (another proxy running?)"
                ),
                _ => format!("could not bind the proxy's {what} socket to {addr}"),
            };
            zmq_err(why, e)
        })?;
        let bound = match s.get_last_endpoint() {
            Ok(Ok(e)) if !e.is_empty() => e,
            _ => addr.to_owned(),
        };
        Ok::<_, Error>((s, bound))
    };
    let (pull, p) = open(zmq::PULL, "pull", &config.pull)?;
    let (xpub, x) = open(zmq::XPUB, "pub", &config.publish)?;
    Ok((pull, xpub, p, x))
}

/// Characters escaped in a URL query value.
const QUERY_VALUE: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS
    .add(b' ')
    .add(b'#')
    .add(b'%')
    .add(b'&')
    .add(b'?')
    .add(b'+');

fn run((pull, mut hub, mailbox): (zmq::Socket, Hub, Arc<Mailbox<()>>)) {
    let mut frames = Vec::with_capacity(4);
    let mut run = Batch::default();
    loop {
        let mut items = [
            hub.xpub.as_poll_item(zmq::POLLIN),
            pull.as_poll_item(zmq::POLLIN),
            mailbox.poll_item(),
        ];
        mailbox.wait(&mut items, Some(500), 500, "proxy");
        if mailbox.is_closed() {
            // What is retained for subscribers that never came goes with the proxy.
            let abandoned = hub.linger(std::time::Duration::ZERO);
            if abandoned > 0 {
                tracing::warn!(
                    abandoned,
                    "the proxy stopped with {abandoned} retained messages that no subscriber had received; counted in HubStats::abandoned"
                );
            }
            break;
        }
        hub.drain_subscriptions();
        let mut worked = false;
        for _ in 0..1024 {
            let Some(extra) = recv_message(&pull, 5, &mut frames) else {
                break;
            };
            worked = true;
            dispatch(&mut hub, &mut run, &mut frames, extra);
        }
        run.flush(&mut hub);
        hub.tick();
        if worked {
            // As the embedded publisher does: let the senders' messages pile up a little
            // (larger batches, fewer wake-ups under load; no wait when idle).
            std::thread::yield_now();
        }
    }
}

/// Publishes one message from a sender (`extra` frames past those read make it garbage):
/// data (alone or a batch) joins the run of its topic; anything else first publishes the
/// run, so the order of what a sender sent is kept.
fn dispatch(hub: &mut Hub, run: &mut Batch, frames: &mut Vec<zmq::Message>, extra: usize) {
    let n = frames.len() + extra;
    let first: &[u8] = frames.first().map_or(&[], |f| &f[..]);
    let data_topic = wire::data_topic_kind(first).is_some();
    // The sender's meta: its origin id for the topic and its number (of the first item).
    let meta = frames.get(1).and_then(|m| wire::parse_meta(m));
    let from = |id: u64, seq: u64| (id != 0).then_some((id, seq));
    let from = match (n, data_topic, meta) {
        (2, true, _) => Some(None), // [topic, envelope]: a message without an origin
        (3, true, Some((wire::META_DATA, id, seq))) => Some(from(id, seq)),
        (3, true, Some((wire::META_BATCH, id, seq))) => {
            match frames.get(2).and_then(|body| wire::batch_items(body)) {
                Some(items) => {
                    for (i, item) in (0u64..).zip(items) {
                        let origin = from(id, seq.saturating_add(i));
                        run.add(hub, first, origin, item);
                    }
                }
                None => {
                    tracing::debug!(topic = %wire::display(first), "the proxy skipped a malformed batch");
                    run.flush(hub);
                    hub.reject(1); // one message: its items cannot be told apart
                }
            }
            return;
        }
        _ => None,
    };
    if let Some(from) = from {
        match frames.pop() {
            // Too large for a batch: published alone, without a copy.
            Some(payload) if payload.len() > wire::BATCH_ITEM_MAX => {
                run.flush(hub);
                hub.publish(&frames[0], from, 1, payload);
            }
            Some(payload) => run.add(hub, &frames[0], from, &payload),
            None => {}
        }
        return;
    }
    run.flush(hub);
    if n == 4 && frames[0][..] == *wire::MARK_CONTROL {
        let rest: Vec<&[u8]> = frames.iter().skip(1).map(|f| &f[..]).collect();
        if let Some((reply, token, prefix)) = wire::parse_mark_control(&rest) {
            hub.mark(reply, token, prefix);
            return;
        }
    }
    tracing::debug!(frames = n, first = %wire::display(first), "the proxy skipped a message that is not chanlayer's");
    hub.reject(1);
}

/// A run: consecutive data messages of one topic (and one origin) that the proxy
/// publishes as one batch frame, merged as a sending thread's queue merges them
/// ([`Outgoing::append`]). It flushes before anything else (a mark) and at the end of what
/// it read, so the order on the wire is the order they came in and nothing waits for a
/// batch to fill.
#[derive(Default)]
pub(crate) struct Batch {
    run: Option<Outgoing>,
    /// The origin of the first message: every message of a run has the same origin and the
    /// next number (a batch frame carries one origin stamp).
    from: From,
}

impl Batch {
    /// Adds a message for `topic` (copied once, into the run), publishing what is batched
    /// first when it cannot join the run (another topic or origin, a full batch). A message
    /// over [`wire::BATCH_ITEM_MAX`] stays alone: nothing joins it ([`Outgoing::append`]).
    pub fn add(&mut self, hub: &mut Hub, topic: &[u8], from: From, payload: &[u8]) {
        let follows = match (&self.run, self.from, from) {
            (Some(_), None, None) => true,
            (Some(run), Some((id, first)), Some((next_id, next))) => {
                id == next_id && first.checked_add(run.count as u64) == Some(next)
            }
            _ => false,
        };
        if let Some(run) = self.run.as_mut().filter(|_| follows) {
            if run.append(topic, payload) {
                return;
            }
        }
        self.flush(hub);
        self.from = from;
        self.run = Some(Outgoing::one(topic.to_vec(), payload.to_vec()));
    }

    /// Publishes what is batched.
    pub fn flush(&mut self, hub: &mut Hub) {
        if let Some(run) = self.run.take() {
            hub.publish(&run.topic, self.from, run.count as u64, run.body.into());
        }
    }
}
