//! Embedded mode's publisher: one XPUB socket per address and process, bound by the first
//! send (or at connect with `bind=eager`), owned by one thread, shared by every layer
//! instance of the process that uses that address.
//!
//! - **One process per address.** A second process that tries to bind the same address gets
//!   a clear error (for `tcp://` the kernel refuses the bind; for `ipc://`, where libzmq would
//!   silently take the socket file over, chanlayer first checks that nobody answers on it).
//! - **In-process subscribers first.** Right after binding, the publisher answers
//!   subscriptions but holds back messages until every subscriber of this process on this
//!   address is connected and has its subscriptions confirmed (bounded by
//!   `connect_timeout`): their SUB sockets were retrying to connect while nobody listened,
//!   and a group message published before they are back would be lost to them.
//! - **Close lingers.** When the last instance of the process on the address closes, the
//!   publisher publishes what is still queued, then keeps answering subscriptions for up to
//!   `close_linger` while it retains messages that no subscriber has had yet (a receiver
//!   still connecting gets them as its replay), and stops as soon as there are none. What
//!   is left then is counted in [`HubStats::abandoned`](crate::HubStats::abandoned) and logged.

use std::collections::{HashMap, VecDeque};
use std::os::fd::RawFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, LazyLock, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use chanlayer_core::{Error, Result};

use crate::bridge::{lock, spawn, zmq_err, Outbox, Sink, Worker};
use crate::config::ZmqConfig;
use crate::hub::{Counters, Hub};
use crate::receiver::Shared;
use crate::BACKEND;

type Receivers = Arc<Mutex<Vec<Weak<Shared>>>>;

/// The process's state for one embedded address.
pub(crate) struct Endpoint {
    address: String,
    cfg: ZmqConfig,
    /// The publisher, if this process runs one on this address: set once, by the first
    /// send (or `bind=eager`); read without a lock on every send.
    pub started: OnceLock<Arc<Publisher>>,
    /// Held while the publisher binds, so two first sends bind once.
    starting: Mutex<()>,
    receivers: Receivers,
}

static REGISTRY: LazyLock<Mutex<HashMap<String, Weak<Endpoint>>>> = LazyLock::new(Mutex::default);

/// Per address: how many publishers of this process are stopping (lingering at close), and
/// when one last stopped. A new publisher on the address waits for them before it binds (a
/// rebind right after a stop may find the old listener still closing).
static STOPS: LazyLock<Mutex<HashMap<String, (usize, Instant)>>> = LazyLock::new(Mutex::default);

/// The settings of the publisher that an instance's settings decide (see [`endpoint`]).
fn publisher_settings(c: &ZmqConfig) -> impl PartialEq + '_ {
    (
        c.send_queue,
        c.sndhwm,
        c.linger,
        c.retention,
        &c.curve,
        &c.socket_options,
    )
}

/// The endpoint state for `address` in this process (shared by every instance using it; the
/// first instance's settings are the publisher's).
pub(crate) fn endpoint(address: &str, cfg: &ZmqConfig) -> Arc<Endpoint> {
    let mut map = lock(&REGISTRY);
    if let Some(e) = map.get(address).and_then(Weak::upgrade) {
        // The process's publisher on this address is shared: its settings are those of the
        // first instance that connected. Say so when a later instance asks for others.
        if publisher_settings(&e.cfg) != publisher_settings(cfg) {
            tracing::warn!(
                address,
                "this process's publisher on this address was set up by an earlier instance; its send_queue, sndhwm, linger, retain*, CURVE and zmq.* settings apply, not this instance's"
            );
        }
        return e;
    }
    map.retain(|_, w| w.strong_count() > 0);
    let e = Arc::new(Endpoint {
        address: address.to_owned(),
        cfg: cfg.clone(),
        started: OnceLock::new(),
        starting: Mutex::new(()),
        receivers: Arc::default(),
    });
    map.insert(address.to_owned(), Arc::downgrade(&e));
    e
}

impl Endpoint {
    /// Registers an in-process subscriber of this address (the publisher waits for it after
    /// binding).
    pub fn register(&self, sync: &Arc<Shared>) {
        let mut r = lock(&self.receivers);
        r.retain(|w| w.strong_count() > 0);
        r.push(Arc::downgrade(sync));
    }

    /// The publisher, binding it now if this process has none yet (not on the send path:
    /// a send reads `started` itself).
    pub fn publisher(&self) -> Result<&Arc<Publisher>> {
        let _starting = lock(&self.starting);
        if let Some(p) = self.started.get() {
            return Ok(p);
        }
        let p = Arc::new(Publisher::start(
            &self.address,
            &self.cfg,
            self.receivers.clone(),
        )?);
        Ok(self.started.get_or_init(|| p))
    }
}

/// The handle on a publisher thread.
pub(crate) struct Publisher {
    /// The thread, and the way to it (`worker.shared`: data bounded by `send_queue`).
    pub worker: Worker<Outbox>,
    /// The publisher's live counters (still read after it stops).
    pub counters: Counters,
    address: String,
}

impl Drop for Publisher {
    fn drop(&mut self) {
        let now = Instant::now();
        lock(&STOPS)
            .entry(self.address.clone())
            .or_insert((0, now))
            .0 += 1;
        self.worker.stop();
        let mut s = lock(&STOPS);
        let e = s.entry(self.address.clone()).or_insert((1, now));
        *e = (e.0.saturating_sub(1), Instant::now());
    }
}

impl Publisher {
    fn start(address: &str, cfg: &ZmqConfig, receivers: Receivers) -> Result<Publisher> {
        let counters = Counters::default();
        let (addr, cfg, c) = (address.to_owned(), cfg.clone(), counters.clone());
        let (thread, outbox) = spawn(
            "publisher",
            move || {
                let xpub = cfg.socket(zmq::XPUB)?;
                bind(&xpub, &addr, &cfg)?;
                let fd = xpub
                    .get_fd()
                    .map_err(|e| zmq_err("could not read the publisher's ZMQ_FD", e))?;
                let hub = Hub::new(xpub, cfg.retention, false, c);
                let outbox = Arc::new(Outbox::new(cfg.send_queue, hub)?);
                Ok(((outbox.clone(), fd, addr, cfg, receivers), outbox))
            },
            run,
        )?;
        Ok(Publisher {
            worker: Worker::new(outbox, thread, |o| o.mailbox.close()),
            counters,
            address: address.to_owned(),
        })
    }
}
/// `true` if a process answers on the Unix socket at `path` (libzmq would take the file over
/// without a word, so this is checked before binding an `ipc://` address).
fn ipc_in_use(path: &str) -> bool {
    #[cfg(target_os = "linux")]
    if let Some(name) = path.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        return std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
            .and_then(|a| std::os::unix::net::UnixStream::connect_addr(&a))
            .is_ok();
    }
    std::os::unix::net::UnixStream::connect(path).is_ok()
}

fn taken(address: &str) -> Error {
    Error::failure(BACKEND, format!(
        "embedded mode: {address} is already bound by another process. In embedded mode one process per address sends (it binds the publisher) and any number receive; run several senders in dedicated mode through a proxy (`chanlayer zmq-proxy`, URL zmq://?pull=...&pub=...), give this process its own address, or connect it with bind=never to only receive"
    ))
}

fn bind(xpub: &zmq::Socket, address: &str, cfg: &ZmqConfig) -> Result<()> {
    // Our own publisher on this address may be stopping (lingering at its close): wait for
    // it, within its close_linger and linger and a margin.
    let started = Instant::now();
    let patience = cfg.close_linger + cfg.linger + Duration::from_secs(2);
    let stop = || lock(&STOPS).get(address).copied();
    while stop().is_some_and(|(n, _)| n > 0) && started.elapsed() < patience {
        std::thread::sleep(Duration::from_millis(20));
    }
    // Or it stopped a moment ago, its listener still closing: then wait for it, briefly.
    let recent = stop().is_some_and(|(_, t)| t.elapsed() < Duration::from_secs(2));
    let deadline = Instant::now() + Duration::from_secs(if recent { 2 } else { 0 });
    loop {
        let attempt = match address.strip_prefix("ipc://") {
            Some(path) if ipc_in_use(path) => Err(taken(address)),
            _ => xpub.bind(address).map_err(|e| match e {
                zmq::Error::EADDRINUSE => taken(address),
                e => zmq_err(format!("could not bind the publisher to {address}"), e),
            }),
        };
        match attempt {
            Err(_) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            r => return r,
        }
    }
}

/// `true` once every live in-process subscriber of the address is connected with every
/// subscription confirmed, or closing (`register` prunes the ones gone).
fn synced(receivers: &Receivers) -> bool {
    lock(receivers).iter().filter_map(Weak::upgrade).all(|s| {
        let t = &s.transport;
        t.gone.load(Ordering::SeqCst) || t.outstanding.load(Ordering::SeqCst) == 0
    })
}

type Thread = (Arc<Outbox<Hub>>, RawFd, String, ZmqConfig, Receivers);

fn run((outbox, fd, address, cfg, receivers): Thread) {
    tracing::debug!(%address, "embedded publisher bound");
    let mailbox = &outbox.mailbox;
    let warm_until = Instant::now() + cfg.connect_timeout;
    let mut warm = false;
    let mut batch = VecDeque::new();
    loop {
        // The socket's fd, not the socket: a direct send may be using it.
        let mut items = [zmq::PollItem::from_fd(fd, zmq::POLLIN), mailbox.poll_item()];
        mailbox.wait(&mut items, (!warm).then_some(5), 500, "publisher");
        let mut hub = lock(&outbox.sink);
        hub.drain_subscriptions();
        if mailbox.is_closed() {
            // Hand what was sent before the close to the socket: it goes out within
            // `linger` to the subscribers that are there; what is retained for those not
            // there yet waits for them, within `close_linger`.
            for item in mailbox.take_all() {
                hub.put(item);
            }
            let abandoned = hub.linger(cfg.close_linger);
            if abandoned > 0 {
                tracing::warn!(
                    %address,
                    abandoned,
                    "the embedded publisher stopped with {abandoned} messages that no subscriber had received (close_linger {:?} ended); counted in HubStats::abandoned", cfg.close_linger
                );
            }
            break;
        }
        if !warm {
            warm = synced(&receivers) || Instant::now() >= warm_until;
            hub.warm = warm;
            if !warm {
                continue;
            }
        }
        // Taken under the hub's lock: a direct send never passes what is queued.
        mailbox.take_some(1024, &mut batch);
        let worked = !batch.is_empty();
        for item in batch.drain(..) {
            hub.put(item);
        }
        hub.tick();
        if worked {
            hub.last = Instant::now();
        }
        hub.settle();
        drop(hub);
        if worked {
            // Let the senders queue more before this thread looks again: fewer, larger
            // batches and fewer doorbells under load; nothing waits when the queue is idle.
            std::thread::yield_now();
        }
    }
    tracing::debug!(%address, "embedded publisher stopped");
}
