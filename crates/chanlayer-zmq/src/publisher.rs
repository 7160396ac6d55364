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
//!   is left then is counted in [`HubStats::abandoned`] and logged.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use chanlayer_core::{Error, Result};

use crate::bridge::{context, lock, zmq_err, Control, Item, Mailbox, Outbox, Outgoing};
use crate::config::ZmqConfig;
use crate::hub::{Hub, HubCounters, HubStats};
use crate::receiver::ReceiverSync;
use crate::runs::{Batch, Payload};
use crate::BACKEND;

type Receivers = Arc<Mutex<Vec<Weak<ReceiverSync>>>>;

/// The process's state for one embedded address.
pub(crate) struct Endpoint {
    address: String,
    cfg: ZmqConfig,
    /// Set once, by the first send (or `bind=eager`); read without a lock on every send.
    publisher: OnceLock<Arc<Publisher>>,
    /// Held while the publisher binds, so two first sends bind once.
    starting: Mutex<()>,
    receivers: Receivers,
}

fn registry() -> &'static Mutex<HashMap<String, Weak<Endpoint>>> {
    static R: OnceLock<Mutex<HashMap<String, Weak<Endpoint>>>> = OnceLock::new();
    R.get_or_init(Mutex::default)
}

/// When this process last stopped a publisher on an address (a rebind right after may find
/// the old listener still closing).
fn recently_stopped() -> &'static Mutex<HashMap<String, Instant>> {
    static R: OnceLock<Mutex<HashMap<String, Instant>>> = OnceLock::new();
    R.get_or_init(Mutex::default)
}

/// Publishers of this process that are stopping (lingering at close), per address: a new
/// publisher on the address waits for them before it binds.
fn stopping() -> &'static Mutex<HashMap<String, usize>> {
    static R: OnceLock<Mutex<HashMap<String, usize>>> = OnceLock::new();
    R.get_or_init(Mutex::default)
}

/// The endpoint state for `address` in this process (shared by every instance using it; the
/// first instance's settings are the publisher's).
pub(crate) fn endpoint(address: &str, cfg: &ZmqConfig) -> Arc<Endpoint> {
    let mut map = lock(registry());
    if let Some(e) = map.get(address).and_then(Weak::upgrade) {
        // The process's publisher on this address is shared: its settings are those of the
        // first instance that connected. Say so when a later instance asks for others.
        let (a, b) = (&e.cfg, cfg);
        if (
            a.send_queue,
            a.sndhwm,
            a.linger,
            a.retention,
            &a.curve,
            &a.socket_options,
        ) != (
            b.send_queue,
            b.sndhwm,
            b.linger,
            b.retention,
            &b.curve,
            &b.socket_options,
        ) {
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
        publisher: OnceLock::new(),
        starting: Mutex::new(()),
        receivers: Arc::default(),
    });
    map.insert(address.to_owned(), Arc::downgrade(&e));
    e
}

impl Endpoint {
    /// Registers an in-process subscriber of this address (the publisher waits for it after
    /// binding).
    pub fn register(&self, sync: &Arc<ReceiverSync>) {
        let mut r = lock(&self.receivers);
        r.retain(|w| w.strong_count() > 0);
        r.push(Arc::downgrade(sync));
    }

    /// The publisher, if this process runs one on this address.
    pub fn running(&self) -> Option<Arc<Publisher>> {
        self.publisher.get().cloned()
    }

    /// The publisher, if it is bound already (no lock, no clone: the send path).
    pub fn started(&self) -> Option<&Arc<Publisher>> {
        self.publisher.get()
    }

    /// The publisher, binding it now if this process has none yet.
    pub fn publisher(&self) -> Result<&Arc<Publisher>> {
        if let Some(p) = self.publisher.get() {
            return Ok(p);
        }
        let _starting = lock(&self.starting);
        if let Some(p) = self.publisher.get() {
            return Ok(p);
        }
        let p = Arc::new(Publisher::start(
            &self.address,
            &self.cfg,
            self.receivers.clone(),
        )?);
        Ok(self.publisher.get_or_init(|| p))
    }
}

/// The handle on a publisher thread.
pub(crate) struct Publisher {
    mailbox: Arc<Outbox>,
    counters: Arc<HubCounters>,
    address: String,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Drop for Publisher {
    fn drop(&mut self) {
        *lock(stopping()).entry(self.address.clone()).or_default() += 1;
        self.mailbox.close();
        if let Some(h) = lock(&self.thread).take() {
            let _ = h.join();
        }
        lock(recently_stopped()).insert(self.address.clone(), Instant::now());
        let mut s = lock(stopping());
        if let Some(n) = s.get_mut(&self.address) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                s.remove(&self.address);
            }
        }
    }
}

impl Publisher {
    fn start(address: &str, cfg: &ZmqConfig, receivers: Receivers) -> Result<Publisher> {
        let mailbox = Arc::new(Mailbox::new(cfg.send_queue)?);
        let counters = Arc::new(HubCounters::default());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = {
            let (cfg, address) = (cfg.clone(), address.to_owned());
            let (mailbox, counters) = (mailbox.clone(), counters.clone());
            std::thread::Builder::new()
                .name("chanlayer-zmq publisher".into())
                .spawn(move || run(address, cfg, mailbox, counters, receivers, ready_tx))
                .map_err(|e| Error::backend(BACKEND, "could not start the publisher thread", e))?
        };
        let bound = ready_rx.recv().unwrap_or_else(|_| {
            Err(Error::Backend {
                backend: BACKEND,
                message: "the publisher thread ended while binding".into(),
                source: None,
            })
        });
        if let Err(e) = bound {
            let _ = thread.join();
            return Err(e);
        }
        Ok(Publisher {
            mailbox,
            counters,
            address: address.to_owned(),
            thread: Mutex::new(Some(thread)),
        })
    }

    /// The queue to the thread (data bounded by `send_queue`).
    pub fn outbox(&self) -> &Outbox {
        &self.mailbox
    }

    /// The publisher's counters.
    pub fn stats(&self) -> HubStats {
        self.counters.snapshot()
    }

    /// The publisher's live counters (still read after it stops).
    pub fn counters(&self) -> Arc<HubCounters> {
        self.counters.clone()
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
    Error::Backend {
        backend: BACKEND,
        message: format!(
            "embedded mode: {address} is already bound by another process. In embedded mode one process per address sends (it binds the publisher) and any number receive; run several senders in dedicated mode through a proxy (`chanlayer zmq-proxy`, URL zmq://?pull=...&pub=...), give this process its own address, or connect it with bind=never to only receive"
        ),
        source: None,
    }
}

fn bind(xpub: &zmq::Socket, address: &str, cfg: &ZmqConfig) -> Result<()> {
    // Our own publisher on this address may be stopping (lingering at its close): wait for
    // it, within its close_linger and linger and a margin.
    let started = Instant::now();
    let patience = cfg.close_linger + cfg.linger + Duration::from_secs(2);
    while lock(stopping()).contains_key(address) && started.elapsed() < patience {
        std::thread::sleep(Duration::from_millis(20));
    }
    // Or it stopped a moment ago, its listener still closing: then wait for it, briefly.
    let recent = lock(recently_stopped())
        .get(address)
        .is_some_and(|t| t.elapsed() < Duration::from_secs(2));
    let deadline = Instant::now() + Duration::from_secs(if recent { 2 } else { 0 });
    loop {
        let attempt = match address.strip_prefix("ipc://") {
            Some(path) if ipc_in_use(path) => Err(taken(address)),
            _ => match xpub.bind(address) {
                Ok(()) => Ok(()),
                Err(zmq::Error::EADDRINUSE) => Err(taken(address)),
                Err(e) => Err(zmq_err(
                    format!("could not bind the publisher to {address}"),
                    e,
                )),
            },
        };
        match attempt {
            Err(_) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            r => return r,
        }
    }
}

fn setup(address: &str, cfg: &ZmqConfig) -> Result<zmq::Socket> {
    let xpub = context()
        .socket(zmq::XPUB)
        .map_err(|e| zmq_err("could not create the XPUB socket", e))?;
    cfg.apply_common(&xpub)?;
    xpub.set_sndhwm(cfg.sndhwm)
        .map_err(|e| zmq_err("could not set sndhwm", e))?;
    cfg.apply_curve_server(&xpub)?;
    bind(&xpub, address, cfg)?;
    Ok(xpub)
}

fn synced(receivers: &Receivers) -> bool {
    let mut r = lock(receivers);
    r.retain(|w| w.strong_count() > 0);
    r.iter()
        .filter_map(Weak::upgrade)
        .all(|s| s.gone.load(Ordering::SeqCst) || s.outstanding.load(Ordering::SeqCst) == 0)
}

fn run(
    address: String,
    cfg: ZmqConfig,
    mailbox: Arc<Outbox>,
    counters: Arc<HubCounters>,
    receivers: Receivers,
    ready: std::sync::mpsc::Sender<Result<()>>,
) {
    let xpub = match setup(&address, &cfg) {
        Ok(s) => s,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    tracing::debug!(%address, "embedded publisher bound");
    let mut hub = Hub::new(xpub, cfg.retention, false, counters);
    let warm_until = Instant::now() + cfg.connect_timeout;
    let mut warm = false;
    let mut batch = VecDeque::new();
    let mut run = Batch::default();
    loop {
        let timeout = if !warm {
            5
        } else if mailbox.prepare_sleep() {
            500
        } else {
            0
        };
        {
            let mut items = [hub.socket().as_poll_item(zmq::POLLIN), mailbox.poll_item()];
            if let Err(e) = zmq::poll(&mut items, timeout) {
                if e != zmq::Error::EINTR {
                    tracing::warn!(error = %e, "the publisher could not poll");
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
        mailbox.woke();
        if mailbox.is_closed() {
            // Hand what was sent before the close to the socket: it goes out within
            // `linger` to the subscribers that are there; what is retained for those not
            // there yet waits for them, within `close_linger`.
            hub.drain_subscriptions();
            batch.extend(mailbox.take_all());
            execute_all(&mut hub, &mut batch, &mut run);
            linger(&mut hub, cfg.close_linger, &address);
            break;
        }
        hub.drain_subscriptions();
        if !warm {
            warm = synced(&receivers) || Instant::now() >= warm_until;
            if !warm {
                continue;
            }
        }
        mailbox.take_some(1024, &mut batch);
        let worked = !batch.is_empty();
        execute_all(&mut hub, &mut batch, &mut run);
        hub.tick();
        if worked {
            // Let the senders queue more before this thread looks again: fewer, larger
            // batches and fewer doorbells under load; nothing waits when the queue is idle.
            std::thread::yield_now();
        }
    }
    tracing::debug!(%address, "embedded publisher stopped");
}

/// The publisher is closing: keeps answering subscriptions (late joiners get their replay)
/// while it retains messages no subscriber has had, up to `close_linger`; then counts what is
/// left as abandoned, and says so.
fn linger(hub: &mut Hub, close_linger: Duration, address: &str) {
    let until = Instant::now() + close_linger;
    while hub.pending() > 0 {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let wait = i64::try_from(left.as_millis().min(100)).unwrap_or(100);
        if let Err(e) = hub.socket().poll(zmq::POLLIN, wait) {
            if e != zmq::Error::EINTR {
                tracing::warn!(error = %e, "the publisher could not poll while closing");
                break;
            }
        }
        hub.drain_subscriptions();
        hub.tick();
    }
    let abandoned = hub.abandon();
    if abandoned > 0 {
        tracing::warn!(
            %address,
            abandoned,
            "the embedded publisher stopped with {abandoned} messages that no subscriber had received (close_linger {close_linger:?} ended); counted in HubStats::abandoned"
        );
    }
}

/// Executes the queued items in order, consecutive messages of a topic as batches.
fn execute_all(hub: &mut Hub, items: &mut VecDeque<Item<Control>>, run: &mut Batch) {
    for item in items.drain(..) {
        match item {
            Item::Data(Outgoing::One { topic, payload }) => {
                run.add(hub, &topic, None, Payload::Bytes(payload));
            }
            Item::Data(Outgoing::Run { topic, body, count }) => {
                run.flush(hub);
                hub.publish_batch(&topic, count as u64, body, None);
            }
            Item::Control(Control::Mark {
                reply,
                token,
                flush_prefix,
            }) => {
                run.flush(hub);
                hub.mark(&reply, token, &flush_prefix);
            }
            Item::Control(Control::Raw(frames)) => {
                run.flush(hub);
                hub.publish_raw(&frames);
            }
        }
    }
    run.flush(hub);
}
