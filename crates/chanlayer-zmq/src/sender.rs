//! Dedicated mode's sending side: one PUSH socket per layer instance, connected to the
//! proxy's PULL, owned by one thread.
//!
//! A send is queued for the thread (bounded by `send_queue`) and returns. The thread hands
//! messages to the socket without blocking; when the socket is at its high-water mark (the
//! proxy is slow or down: libzmq queues up to `sndhwm` messages for a connection that is not
//! up yet), the thread stops taking from the queue until the socket can take more, so the
//! queue fills and further sends are `ChannelFull`.
//!
//! The thread numbers its messages per topic as the socket takes them (an origin id per
//! topic and a number from 1, see [`wire::Origin`]): receivers count by these numbers what
//! never arrived, across a proxy restart too.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hashbrown::HashMap;

use chanlayer_core::{Error, Result};

use crate::bridge::{context, lock, zmq_err, Control, Item, Mailbox, Outbox, Outgoing};
use crate::config::ZmqConfig;
use crate::wire;
use crate::BACKEND;

/// The handle on the PUSH thread.
pub(crate) struct PushSender {
    mailbox: Arc<Outbox>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Drop for PushSender {
    fn drop(&mut self) {
        self.mailbox.close();
        if let Some(h) = lock(&self.thread).take() {
            let _ = h.join();
        }
    }
}

impl PushSender {
    /// Connects a PUSH socket to `pull` on a new thread. `abandoned` counts the messages
    /// the thread still holds when its close lingered `close_linger` in vain.
    pub fn start(cfg: &ZmqConfig, pull: &str, abandoned: Arc<AtomicU64>) -> Result<PushSender> {
        let mailbox = Arc::new(Mailbox::new(cfg.send_queue)?);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = {
            let (cfg, pull, mailbox) = (cfg.clone(), pull.to_owned(), mailbox.clone());
            std::thread::Builder::new()
                .name("chanlayer-zmq sender".into())
                .spawn(move || run(cfg, pull, mailbox, abandoned, ready_tx))
                .map_err(|e| Error::backend(BACKEND, "could not start the sender thread", e))?
        };
        let started = ready_rx.recv().unwrap_or_else(|_| {
            Err(Error::Backend {
                backend: BACKEND,
                message: "the sender thread ended while starting".into(),
                source: None,
            })
        });
        if let Err(e) = started {
            let _ = thread.join();
            return Err(e);
        }
        Ok(PushSender {
            mailbox,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// The queue to the thread.
    pub fn outbox(&self) -> &Outbox {
        &self.mailbox
    }
}

fn setup(cfg: &ZmqConfig, pull: &str) -> Result<zmq::Socket> {
    let push = context()
        .socket(zmq::PUSH)
        .map_err(|e| zmq_err("could not create the PUSH socket", e))?;
    cfg.apply_common(&push)?;
    push.set_sndhwm(cfg.sndhwm)
        .map_err(|e| zmq_err("could not set sndhwm", e))?;
    cfg.apply_curve_client(&push)?;
    push.connect(pull)
        .map_err(|e| zmq_err(format!("could not connect the PUSH socket to {pull}"), e))?;
    Ok(push)
}

/// This sender's numbering of its messages, per topic (see [`wire::Origin`]): each topic
/// gets a random origin id and numbers from 1. The proxy passes them on, and receivers
/// count by them what never arrived, across a proxy restart too.
struct Numbering {
    topics: HashMap<Vec<u8>, Numbered>,
    /// The time, read once per loop turn.
    clock: Instant,
    swept: Instant,
}

struct Numbered {
    id: u64,
    next: u64,
    used: Instant,
}

/// A topic this sender has not sent to for this long starts over with a new origin id (its
/// numbering is forgotten when the map has grown past [`NUMBERED_MAX`]).
const NUMBERED_FOR: Duration = Duration::from_secs(600);
const NUMBERED_MAX: usize = 4096;

impl Numbering {
    fn new() -> Numbering {
        let now = Instant::now();
        Numbering {
            topics: HashMap::new(),
            clock: now,
            swept: now,
        }
    }

    /// The numbering of `topic`, begun if new.
    fn of(&mut self, topic: &[u8]) -> &mut Numbered {
        let clock = self.clock;
        let n = self.topics.entry_ref(topic).or_insert_with(|| Numbered {
            id: rand::random::<u64>() | 1,
            next: 1,
            used: clock,
        });
        n.used = clock;
        n
    }

    /// Once per loop turn: reads the clock, and forgets topics long unused when there are
    /// many.
    fn turn(&mut self) {
        self.clock = Instant::now();
        if self.topics.len() > NUMBERED_MAX
            && self.clock.duration_since(self.swept) >= Duration::from_secs(60)
        {
            self.swept = self.clock;
            let now = self.clock;
            self.topics
                .retain(|_, n| now.saturating_duration_since(n.used) < NUMBERED_FOR);
        }
    }
}

/// Sends one queued item without blocking. `Err(item)` gives it back when the socket is at
/// its high-water mark (nothing of it was sent). Data is numbered by `numbering` once the
/// socket took it; data the socket fails on (an error other than being full) is counted
/// in `abandoned`.
fn try_send(
    push: &zmq::Socket,
    item: Item<Control>,
    numbering: &mut Numbering,
    abandoned: &AtomicU64,
) -> std::result::Result<(), Item<Control>> {
    let first = match &item {
        Item::Data(d) => push.send(d.topic(), zmq::DONTWAIT | zmq::SNDMORE),
        Item::Control(Control::Mark { .. }) => {
            push.send(wire::MARK_CONTROL, zmq::DONTWAIT | zmq::SNDMORE)
        }
        Item::Control(Control::Raw(frames)) => match frames.split_first() {
            None => return Ok(()),
            Some((f, rest)) => {
                let more = if rest.is_empty() { 0 } else { zmq::SNDMORE };
                push.send(&f[..], zmq::DONTWAIT | more)
            }
        },
    };
    match first {
        Err(zmq::Error::EAGAIN) => return Err(item),
        Err(e) => {
            let n = item.count();
            abandoned.fetch_add(n as u64, Ordering::Relaxed);
            tracing::warn!(error = %e, messages = n, "the sender could not send to the proxy; dropped, counted in TransportStats::abandoned");
            return Ok(());
        }
        Ok(()) => {}
    }
    // The first frame was taken: the rest of the message goes to the same pipe and is never
    // refused for the high-water mark (it counts whole messages).
    let rest = match item {
        Item::Data(Outgoing::One { topic, payload }) => {
            let n = numbering.of(&topic);
            let meta = wire::meta(wire::META_DATA, n.id, n.next);
            n.next += 1;
            push.send(&meta[..], zmq::SNDMORE)
                .and_then(|()| push.send(payload, 0))
        }
        Item::Data(Outgoing::Run { topic, body, count }) => {
            let n = numbering.of(&topic);
            let meta = wire::meta(wire::META_BATCH, n.id, n.next);
            n.next += count as u64;
            push.send(&meta[..], zmq::SNDMORE)
                .and_then(|()| push.send(body, 0))
        }
        Item::Control(Control::Mark {
            reply,
            token,
            flush_prefix,
        }) => push
            .send(reply, zmq::SNDMORE)
            .and_then(|()| push.send(&token.to_le_bytes()[..], zmq::SNDMORE))
            .and_then(|()| push.send(flush_prefix, 0)),
        Item::Control(Control::Raw(frames)) => {
            let n = frames.len();
            frames
                .into_iter()
                .enumerate()
                .skip(1)
                .try_for_each(|(i, f)| push.send(f, if i + 1 < n { zmq::SNDMORE } else { 0 }))
        }
    };
    if let Err(e) = rest {
        tracing::warn!(error = %e, "the sender could not finish a message to the proxy");
    }
    Ok(())
}

/// The layer is closing: hands what is queued to the socket, waiting up to `close_linger`
/// while the socket refuses (the proxy is away or slow); what it took goes out within
/// `linger`. What it never took is counted as abandoned, and said.
fn close(
    push: &zmq::Socket,
    pending: &mut VecDeque<Item<Control>>,
    numbering: &mut Numbering,
    close_linger: Duration,
    abandoned: &AtomicU64,
) {
    let until = Instant::now() + close_linger;
    loop {
        while let Some(item) = pending.pop_front() {
            if let Err(back) = try_send(push, item, numbering, abandoned) {
                pending.push_front(back);
                break;
            }
        }
        let left = until.saturating_duration_since(Instant::now());
        if pending.is_empty() || left.is_zero() {
            break;
        }
        let wait = i64::try_from(left.as_millis().min(100)).unwrap_or(100);
        if let Err(e) = push.poll(zmq::POLLOUT, wait) {
            if e != zmq::Error::EINTR {
                tracing::warn!(error = %e, "the sender could not poll while closing");
                break;
            }
        }
    }
    let left: usize = pending.iter().map(Item::count).sum();
    if left > 0 {
        abandoned.fetch_add(left as u64, Ordering::Relaxed);
        tracing::warn!(
            abandoned = left,
            "the layer closed with {left} messages the proxy did not take within close_linger ({close_linger:?}); counted in TransportStats::abandoned"
        );
    }
}

fn run(
    cfg: ZmqConfig,
    pull: String,
    mailbox: Arc<Outbox>,
    abandoned: Arc<AtomicU64>,
    ready: std::sync::mpsc::Sender<Result<()>>,
) {
    let push = match setup(&cfg, &pull) {
        Ok(s) => s,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    let mut pending: VecDeque<Item<Control>> = VecDeque::new();
    let mut numbering = Numbering::new();
    loop {
        let blocked = !pending.is_empty();
        let timeout = if blocked || mailbox.prepare_sleep() {
            1000
        } else {
            0
        };
        {
            let mut items = [
                mailbox.poll_item(),
                push.as_poll_item(if blocked {
                    zmq::POLLOUT
                } else {
                    zmq::PollEvents::empty()
                }),
            ];
            if let Err(e) = zmq::poll(&mut items, timeout) {
                if e != zmq::Error::EINTR {
                    tracing::warn!(error = %e, "the sender could not poll");
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
        mailbox.woke();
        numbering.turn();
        if mailbox.is_closed() {
            pending.extend(mailbox.take_all());
            close(
                &push,
                &mut pending,
                &mut numbering,
                cfg.close_linger,
                &abandoned,
            );
            break;
        }
        if pending.is_empty() {
            mailbox.take_some(1024, &mut pending);
        }
        let worked = !pending.is_empty();
        while let Some(out) = pending.pop_front() {
            if let Err(back) = try_send(&push, out, &mut numbering, &abandoned) {
                pending.push_front(back);
                break;
            }
        }
        if worked {
            // As the embedded publisher does: more merges in the queue, fewer doorbells.
            std::thread::yield_now();
        }
    }
}
