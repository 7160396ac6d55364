//! The bridge between async callers and the threads that own the libzmq sockets.
//!
//! libzmq sockets are blocking and not thread-safe, so each socket belongs to one thread
//! ([`Worker`]). That thread waits in `zmq_poll` on its sockets and on a doorbell (one end
//! of a Unix datagram pair); callers push into a [`Mailbox`] and ring the doorbell only when
//! the thread may be asleep, so a burst of sends costs one wake-up, and the thread drains
//! the whole queue in one batch.
//!
//! What a mailbox holds is one type, [`Item`]: data ([`Outgoing`]), which the caller's
//! thread copies straight into the queued run of its topic when the message before it is
//! of the same topic (so the socket thread gets batches ready to send), or a command of the
//! thread's own kind, which travels alone.
//!
//! A sending thread's socket side sits behind a lock ([`Outbox`]): a send that finds the
//! thread asleep, nothing queued and the socket idle takes the lock and puts its message
//! out itself, with no hop to the thread (a round trip's messages); a stream of sends,
//! which keeps the thread awake, queues and batches.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex, TryLockError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use chanlayer_core::{Error, Result};

use crate::wire;
use crate::BACKEND;

/// The process's one libzmq context. It is never terminated (terminating blocks until every
/// socket is closed), so closing a socket never waits.
pub(crate) static CONTEXT: LazyLock<zmq::Context> = LazyLock::new(zmq::Context::new);

pub(crate) use chanlayer_core::toolkit::lock;

/// A libzmq error as a chanlayer error.
pub(crate) fn zmq_err(what: impl Into<String>, e: zmq::Error) -> Error {
    Error::backend(BACKEND, what, e)
}

/// Starts the socket thread `name`: `setup` makes its sockets on the thread and gives the
/// caller a value (or the error, after which the thread ends), then `run` runs there.
/// Returns once `setup` is done.
pub(crate) fn spawn<S, T: Send + 'static>(
    name: &'static str,
    setup: impl FnOnce() -> Result<(S, T)> + Send + 'static,
    run: impl FnOnce(S) + Send + 'static,
) -> Result<(JoinHandle<()>, T)> {
    let (tx, rx) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new()
        .name(format!("chanlayer-zmq {name}"))
        .spawn(move || match setup() {
            Ok((state, value)) => {
                let _ = tx.send(Ok(value));
                run(state);
            }
            Err(e) => {
                let _ = tx.send(Err(e));
            }
        })
        .map_err(|e| Error::backend(BACKEND, format!("could not start the {name} thread"), e))?;
    let ended = || Error::failure(BACKEND, format!("the {name} thread ended while starting"));
    match rx.recv().unwrap_or_else(|_| Err(ended())) {
        Ok(value) => Ok((thread, value)),
        Err(e) => {
            let _ = thread.join();
            Err(e)
        }
    }
}

/// A socket thread and what feeds it (`T`: its mailbox, or an [`Outbox`]);
/// [`Worker::stop`] (or a drop) closes that (`close`) and joins the thread.
pub(crate) struct Worker<T: ?Sized> {
    pub shared: Arc<T>,
    close: fn(&T),
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl<T: ?Sized> Worker<T> {
    pub fn new(shared: Arc<T>, thread: JoinHandle<()>, close: fn(&T)) -> Self {
        let thread = Mutex::new(Some(thread));
        Worker {
            shared,
            close,
            thread,
        }
    }

    /// Stops the thread and waits for it (blocking).
    pub fn stop(&self) {
        (self.close)(&self.shared);
        if let Some(h) = lock(&self.thread).take() {
            let _ = h.join();
        }
    }

    /// Stops the thread without waiting for it.
    pub fn detach(&self) {
        (self.close)(&self.shared);
        lock(&self.thread).take();
    }
}

impl<T: ?Sized> Drop for Worker<T> {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Reads one message without waiting: its first `keep` frames into `frames` (emptied
/// first). Returns how many frames past those it had, `None` when nothing is waiting.
pub(crate) fn recv_message(
    sock: &zmq::Socket,
    keep: usize,
    frames: &mut Vec<zmq::Message>,
) -> Option<usize> {
    frames.clear();
    let mut extra = 0;
    loop {
        match sock.recv_msg(zmq::DONTWAIT) {
            Ok(m) => {
                let more = m.get_more();
                if frames.len() < keep {
                    frames.push(m);
                } else {
                    extra += 1;
                }
                if !more {
                    return Some(extra);
                }
            }
            Err(zmq::Error::EINTR) => continue,
            Err(_) if frames.is_empty() => return None,
            Err(e) => {
                tracing::debug!(error = %e, "the rest of a message was lost");
                return Some(extra);
            }
        }
    }
}

/// Closing: waits on `sock` for `events`, at most 100 ms and not past `until`. `false` once
/// `until` has passed, or when the poll failed (logged as the `who`'s).
pub(crate) fn wait_until(
    sock: &zmq::Socket,
    events: zmq::PollEvents,
    until: Instant,
    who: &str,
) -> bool {
    let left = until.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return false;
    }
    let wait = i64::try_from(left.as_millis().min(100)).unwrap_or(100);
    match sock.poll(events, wait) {
        Err(e) if e != zmq::Error::EINTR => {
            tracing::warn!(error = %e, "the {who} could not poll while closing");
            false
        }
        _ => true,
    }
}

/// How long a sending socket must have been idle before a send skips the queue. Shorter
/// than a round trip's turn, longer than the gap between the sends of a stream (which then
/// queue and batch).
pub(crate) const DIRECT_AFTER: Duration = Duration::from_micros(20);

/// The socket side of a sending thread (the embedded publisher's hub, the dedicated PUSH
/// socket), behind the lock of its [`Outbox`].
pub(crate) trait Sink: Send {
    /// Puts `item` out after everything before it. `true` if some of it is left for the
    /// thread (the socket refused it for now).
    fn put(&mut self, item: Item<Control>) -> bool;
    /// A direct send is done: leave the socket as the thread expects it (read until
    /// `EAGAIN`).
    fn settle(&mut self) {}
    /// `true` if sends may go straight to this socket at all (read once, by
    /// [`Outbox::new`]): the embedded publisher's. The dedicated PUSH socket's may not:
    /// sends straight to it cost a dedicated stream of 64 B messages a tenth of its
    /// throughput (docs/benchmarks.md, "The send path at parity").
    fn direct(&self) -> bool {
        false
    }
    /// `true` if the side serves sends now and its socket was idle for [`DIRECT_AFTER`]
    /// (`last` is when it last put something out; a direct send moves it). Asked only of
    /// a [`direct`](Sink::direct) sink.
    fn idle(&mut self) -> bool {
        false
    }
}

/// `true` if `last` is [`DIRECT_AFTER`] ago or more; moves it to now.
pub(crate) fn idle_since(last: &mut Instant) -> bool {
    let now = Instant::now();
    let idle = now.saturating_duration_since(*last) >= DIRECT_AFTER;
    *last = now;
    idle
}

/// The way into a sending thread: its mailbox, and its [`Sink`] behind a lock that the
/// thread holds while it works. A send takes the lock only when it is free and nothing is
/// queued, so the order of what was sent holds. The thread has its own `S`; a layer
/// instance has an `Outbox` of `dyn Sink`, whichever thread is behind it.
pub(crate) struct Outbox<S: ?Sized = dyn Sink> {
    pub mailbox: Mailbox<Control>,
    /// The sink's [`Sink::direct`]: `false`, every send queues.
    direct: bool,
    pub sink: Mutex<S>,
}

impl<S: Sink> Outbox<S> {
    pub fn new(capacity: usize, sink: S) -> Result<Self> {
        Ok(Outbox {
            mailbox: Mailbox::new(capacity)?,
            direct: sink.direct(),
            sink: Mutex::new(sink),
        })
    }
}

impl Outbox {
    /// Sends the data message `[topic, payload]`: straight out when the thread is asleep,
    /// nothing is queued and the socket is idle, else queued (bounded by the capacity) for
    /// the thread.
    pub fn send(&self, topic: &[u8], payload: Cow<'_, [u8]>) -> std::result::Result<(), Refused> {
        // Only a thread asleep in its poll is worth passing by (a send would have to wake
        // it). One that is awake, as in a stream, takes the queue on its next turn: queue
        // for it without touching the socket's lock (the thread's) or reading the clock.
        if !self.direct || self.mailbox.queued() || !self.mailbox.asleep() {
            return self.mailbox.push(topic.into(), payload);
        }
        let sink = match self.sink.try_lock() {
            Ok(s) => Some(s),
            Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        };
        if let Some(mut sink) = sink {
            if self.mailbox.is_empty()? && sink.idle() {
                let item = Item::Data(Outgoing::one(topic.to_vec(), payload.into_owned()));
                if sink.put(item) {
                    self.mailbox.wake();
                }
                sink.settle();
                return Ok(());
            }
        }
        self.mailbox.push(topic.into(), payload)
    }
}

/// Data messages on their way to a socket thread: one message (`count` 1, `body` its
/// envelope), or a run of `count` consecutive messages of one topic that merged in the
/// queue (`body` as [`wire::batch_push`] writes them; see [`Outgoing::append`]).
#[derive(Debug)]
pub(crate) struct Outgoing {
    pub topic: Vec<u8>,
    pub body: Vec<u8>,
    /// How many messages this holds (what the mailbox's capacity counts).
    pub count: usize,
}

impl Outgoing {
    /// One message.
    pub fn one(topic: Vec<u8>, body: Vec<u8>) -> Outgoing {
        Outgoing {
            topic,
            body,
            count: 1,
        }
    }

    /// Appends a message of `topic` to this item when they travel together: the same
    /// topic, both at most [`wire::BATCH_ITEM_MAX`] bytes, and the run stays within
    /// [`wire::BATCH_MAX_BYTES`]. The caller's thread copies it into the run here, so the
    /// socket thread gets a batch ready to send. `false` (nothing changed) otherwise.
    pub fn append(&mut self, topic: &[u8], payload: &[u8]) -> bool {
        // One message becomes a run: its envelope gets a length prefix too.
        let one = self.count == 1;
        let size = self.body.len() + if one { 4 } else { 0 };
        if payload.len() > wire::BATCH_ITEM_MAX
            || (one && self.body.len() > wire::BATCH_ITEM_MAX)
            || size + 4 + payload.len() > wire::BATCH_MAX_BYTES
            || self.topic.as_slice() != topic
        {
            return false;
        }
        if one {
            let mut body = Vec::with_capacity(
                (16 * (payload.len() + 4)).clamp(4 * 1024, wire::BATCH_MAX_BYTES),
            );
            wire::batch_push(&mut body, &self.body);
            self.body = body;
        }
        wire::batch_push(&mut self.body, payload);
        self.count += 1;
        true
    }
}

/// What a socket thread's mailbox holds: data, which merges with the data queued just
/// before it into a run of its topic, or a command of the thread's own kind `C`, which
/// travels alone and counts as one.
#[derive(Debug)]
pub(crate) enum Item<C> {
    /// Data messages.
    Data(Outgoing),
    /// A command.
    Control(C),
}

impl<C> Item<C> {
    /// How many data messages the item holds (what the mailbox's capacity counts; a
    /// command counts for nothing).
    pub fn count(&self) -> usize {
        match self {
            Item::Data(d) => d.count,
            Item::Control(_) => 0,
        }
    }
}

/// A command for a sending thread: the embedded publisher or the dedicated sender. Both
/// take the same commands and the same data, so a layer instance talks to either through
/// one [`Outbox`], whichever mode it runs in.
#[derive(Debug)]
pub(crate) enum Control {
    /// A barrier: after everything queued before it, drop the retention of `flush_prefix`
    /// (when not empty) and publish a MARK with `token` on `reply` (to the proxy: the
    /// `x:mark` control frames, see [`crate::wire`]).
    Mark {
        reply: Vec<u8>,
        token: u64,
        flush_prefix: Vec<u8>,
    },
    /// Frames sent as they are (tests of what receivers and the proxy do with garbage).
    Raw(Vec<Vec<u8>>),
}

/// Why a push was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The queue holds its capacity already.
    Full,
    /// The thread is gone (the layer closed).
    Closed,
}

struct Queue<T> {
    items: VecDeque<T>,
    /// Data messages in `items` (an item may hold several).
    count: usize,
    closed: bool,
}

/// The queue to one socket thread ([`Item`]s: data and commands of kind `C`), with its
/// doorbell.
pub(crate) struct Mailbox<C> {
    queue: Mutex<Queue<Item<C>>>,
    /// `queue.items` is not empty, as of the last change under the lock (read without it).
    queued: AtomicBool,
    capacity: usize,
    sleeping: AtomicBool,
    bell_tx: UnixDatagram,
    bell_rx: UnixDatagram,
}

impl<C> Mailbox<C> {
    /// A mailbox that holds at most `capacity` data messages (commands are not counted
    /// against it).
    pub fn new(capacity: usize) -> Result<Self> {
        let (bell_tx, bell_rx) = UnixDatagram::pair()
            .map_err(|e| Error::backend(BACKEND, "could not create a doorbell socket pair", e))?;
        for s in [&bell_tx, &bell_rx] {
            s.set_nonblocking(true)
                .map_err(|e| Error::backend(BACKEND, "could not set up the doorbell", e))?;
        }
        Ok(Mailbox {
            queue: Mutex::new(Queue {
                items: VecDeque::new(),
                count: 0,
                closed: false,
            }),
            queued: AtomicBool::new(false),
            capacity: capacity.max(1),
            sleeping: AtomicBool::new(false),
            bell_tx,
            bell_rx,
        })
    }

    fn ring(&self) {
        if self.sleeping.swap(false, Ordering::SeqCst) {
            // A full doorbell buffer means the thread is being woken already.
            let _ = self.bell_tx.send(&[1]);
        }
    }

    /// Admits `n` messages: refused if the mailbox is closed, or (when `bounded`) if they
    /// do not fit in `capacity` (a batch larger than the capacity fits an empty queue).
    /// Otherwise `place` queues them under the lock, and the thread's doorbell rings.
    fn admit(
        &self,
        n: usize,
        bounded: bool,
        place: impl FnOnce(&mut VecDeque<Item<C>>),
    ) -> std::result::Result<(), Refused> {
        {
            let mut q = lock(&self.queue);
            if q.closed {
                return Err(Refused::Closed);
            }
            if bounded && q.count + n > self.capacity.max(n) {
                return Err(Refused::Full);
            }
            q.count += n;
            place(&mut q.items);
            self.queued.store(true, Ordering::Release);
        }
        self.ring();
        Ok(())
    }

    /// Appends the data message `[topic, payload]` to `items`: copied into the last item
    /// when they travel together, else a new item (owned bytes are not copied then: a large
    /// message is handed to the socket as it is).
    fn enqueue(items: &mut VecDeque<Item<C>>, topic: Cow<'_, [u8]>, payload: Cow<'_, [u8]>) {
        if let Some(Item::Data(last)) = items.back_mut() {
            if last.append(&topic, &payload) {
                return;
            }
        }
        items.push_back(Item::Data(Outgoing::one(
            topic.into_owned(),
            payload.into_owned(),
        )));
    }

    /// Queues the data message `[topic, payload]` (bounded by the capacity), copied into
    /// the queued run of its topic when there is one: the path of small messages, which
    /// then allocate nothing of their own. Owned bytes that travel alone (a large message)
    /// are handed to the socket without a copy.
    pub fn push(
        &self,
        topic: Cow<'_, [u8]>,
        payload: Cow<'_, [u8]>,
    ) -> std::result::Result<(), Refused> {
        self.admit(1, true, |items| Self::enqueue(items, topic, payload))
    }

    /// Queues several data messages at once (all or none), as one bounded push.
    pub fn push_all(&self, msgs: Vec<(Vec<u8>, Vec<u8>)>) -> std::result::Result<(), Refused> {
        self.admit(msgs.len(), true, |items| {
            for (topic, payload) in msgs {
                Self::enqueue(items, topic.into(), payload.into());
            }
        })
    }

    /// Queues a command. Commands are never refused for capacity (only when closed).
    pub fn push_control(&self, command: C) -> std::result::Result<(), Refused> {
        self.admit(0, false, |items| items.push_back(Item::Control(command)))
    }

    /// Marks the mailbox closed (later pushes are refused) and wakes the thread.
    pub fn close(&self) {
        lock(&self.queue).closed = true;
        self.wake();
    }

    /// Wakes the thread (asleep or not).
    pub fn wake(&self) {
        self.sleeping.store(true, Ordering::SeqCst);
        self.ring();
    }

    /// `true` if nothing is queued; `Closed` once closed.
    pub fn is_empty(&self) -> std::result::Result<bool, Refused> {
        let q = lock(&self.queue);
        if q.closed {
            return Err(Refused::Closed);
        }
        Ok(q.items.is_empty())
    }

    /// `true` if something was queued at the last look (no lock: a hint, which
    /// [`Mailbox::is_empty`] confirms under the lock).
    pub fn queued(&self) -> bool {
        self.queued.load(Ordering::Acquire)
    }

    /// `true` if the thread is asleep in its poll, or about to be, until the doorbell rings
    /// (no lock: a hint).
    pub fn asleep(&self) -> bool {
        self.sleeping.load(Ordering::Acquire)
    }

    /// `true` once [`Mailbox::close`] was called.
    pub fn is_closed(&self) -> bool {
        lock(&self.queue).closed
    }

    /// Takes every queued item.
    pub fn take_all(&self) -> VecDeque<Item<C>> {
        let mut q = lock(&self.queue);
        q.count = 0;
        self.queued.store(false, Ordering::Release);
        std::mem::take(&mut q.items)
    }

    /// Takes up to `max` queued items into `out`.
    pub fn take_some(&self, max: usize, out: &mut VecDeque<Item<C>>) {
        let mut q = lock(&self.queue);
        let n = q.items.len().min(max);
        let taken: usize = q.items.iter().take(n).map(Item::count).sum();
        q.count -= taken;
        out.extend(q.items.drain(..n));
        self.queued.store(!q.items.is_empty(), Ordering::Release);
    }

    /// Called by the thread before it sleeps in `zmq_poll`: `false` if something is queued
    /// (do not sleep), `true` if a later push will ring the doorbell.
    pub fn prepare_sleep(&self) -> bool {
        self.sleeping.store(true, Ordering::SeqCst);
        let q = lock(&self.queue);
        if !q.items.is_empty() || q.closed {
            drop(q);
            self.sleeping.store(false, Ordering::SeqCst);
            return false;
        }
        true
    }

    /// Called by the thread after `zmq_poll` returns: empties the doorbell.
    pub fn woke(&self) {
        self.sleeping.store(false, Ordering::SeqCst);
        let mut buf = [0u8; 64];
        // Reads until it is empty (an error other than an interruption).
        while !matches!(self.bell_rx.recv(&mut buf), Err(e) if e.kind() != ErrorKind::Interrupted) {
        }
    }

    /// The thread (`who`) waits for work on `items` (its sockets, and this doorbell's
    /// [`Mailbox::poll_item`]): `busy` ms when it has work of its own in sight, else until
    /// the doorbell rings (at most `idle` ms); then empties the doorbell. A failed poll is
    /// logged (and a short pause follows, so a broken poll cannot spin).
    pub fn wait(&self, items: &mut [zmq::PollItem<'_>], busy: Option<i64>, idle: i64, who: &str) {
        let timeout = match busy {
            Some(ms) => ms,
            None if self.prepare_sleep() => idle,
            None => 0,
        };
        if let Err(e) = zmq::poll(items, timeout) {
            if e != zmq::Error::EINTR {
                tracing::warn!(error = %e, "the {who} could not poll");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        self.woke();
    }

    /// The doorbell as a poll item for `zmq::poll`.
    pub fn poll_item(&self) -> zmq::PollItem<'static> {
        zmq::PollItem::from_fd(self.bell_rx.as_raw_fd(), zmq::POLLIN)
    }
}

#[cfg(test)]
#[path = "bridge_tests.rs"]
mod tests;
