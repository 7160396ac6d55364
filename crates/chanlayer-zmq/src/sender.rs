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
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hashbrown::HashMap;

use chanlayer_core::Result;

use crate::bridge::{
    lock, spawn, wait_until, zmq_err, Control, Item, Outbox, Outgoing, Sink, Worker,
};
use crate::config::ZmqConfig;
use crate::wire;

/// The handle on the PUSH thread.
pub(crate) type PushSender = Worker<Outbox>;

/// Connects a PUSH socket to `pull` on a new thread. `abandoned` counts the messages the
/// thread still holds when its close lingered `close_linger` in vain.
pub(crate) fn start(cfg: &ZmqConfig, pull: &str, abandoned: Arc<AtomicU64>) -> Result<PushSender> {
    let (cfg, pull) = (cfg.clone(), pull.to_owned());
    let (thread, outbox) = spawn(
        "sender",
        move || {
            let push = cfg.socket(zmq::PUSH)?;
            push.connect(&pull)
                .map_err(|e| zmq_err(format!("could not connect the PUSH socket to {pull}"), e))?;
            let fd = push
                .get_fd()
                .map_err(|e| zmq_err("could not read the PUSH socket's ZMQ_FD", e))?;
            let sink = Push {
                push,
                numbering: Numbering::new(),
                pending: VecDeque::new(),
                abandoned,
            };
            let outbox = Arc::new(Outbox::new(cfg.send_queue, sink)?);
            Ok(((outbox.clone(), fd, cfg.close_linger), outbox))
        },
        run,
    )?;
    Ok(Worker::new(outbox, thread, |o| o.mailbox.close()))
}

/// This sender's numbering of its messages, per topic (see [`wire::Origin`]): each topic
/// gets a random origin id and numbers from 1. The proxy passes them on, and receivers
/// count by them what never arrived, across a proxy restart too.
struct Numbering {
    /// Per topic: its origin id, the next number, and when it was last used.
    topics: HashMap<Vec<u8>, (u64, u64, Instant)>,
    /// The time, read once per loop turn.
    clock: Instant,
    swept: Instant,
}

/// A topic this sender has not sent to for this long starts over with a new origin id (its
/// numbering is forgotten when the map has grown past [`NUMBERED_MAX`]).
const NUMBERED_FOR: Duration = Duration::from_secs(600);
const NUMBERED_MAX: usize = 4096;
/// How often a long map of topics is swept.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

impl Numbering {
    fn new() -> Numbering {
        let now = Instant::now();
        Numbering {
            topics: HashMap::new(),
            clock: now,
            swept: now,
        }
    }

    /// The meta frame of the next `count` messages of `topic` (its numbering begun if
    /// new): its origin id and the number of the first.
    fn next(&mut self, topic: &[u8], kind: u8, count: u64) -> [u8; wire::META_LEN] {
        let clock = self.clock;
        let (id, next, used) = self
            .topics
            .entry_ref(topic)
            .or_insert_with(|| (rand::random::<u64>() | 1, 1, clock));
        *used = clock;
        *next += count;
        wire::meta(kind, *id, *next - count)
    }

    /// Once per loop turn: reads the clock, and forgets topics long unused when there are
    /// many.
    fn turn(&mut self) {
        let now = Instant::now();
        self.clock = now;
        if self.topics.len() > NUMBERED_MAX && now.duration_since(self.swept) >= SWEEP_EVERY {
            self.swept = now;
            self.topics
                .retain(|_, (_, _, used)| now.saturating_duration_since(*used) < NUMBERED_FOR);
        }
    }
}

/// The PUSH socket and what goes with it, behind the [`Outbox`]'s lock.
pub(crate) struct Push {
    push: zmq::Socket,
    numbering: Numbering,
    /// Taken from the queue, not yet taken by the socket (it is at its high-water mark).
    pending: VecDeque<Item<Control>>,
    abandoned: Arc<AtomicU64>,
}

impl Sink for Push {
    fn put(&mut self, item: Item<Control>) -> bool {
        self.pending.push_back(item);
        self.flush();
        !self.pending.is_empty()
    }
}

impl Push {
    /// Hands what is pending to the socket, in order, until it refuses.
    fn flush(&mut self) {
        while let Some(item) = self.pending.pop_front() {
            if let Err(back) = self.try_send(item) {
                self.pending.push_front(back);
                break;
            }
        }
    }

    /// Sends one item without blocking. `Err(item)` gives it back when the socket is at its
    /// high-water mark (nothing of it was sent). Data is numbered once the socket took it;
    /// data the socket fails on (an error other than being full) is counted as abandoned.
    fn try_send(&mut self, item: Item<Control>) -> std::result::Result<(), Item<Control>> {
        let (first, more): (&[u8], bool) = match &item {
            Item::Data(d) => (&d.topic[..], true),
            Item::Control(Control::Mark { .. }) => (wire::MARK_CONTROL, true),
            Item::Control(Control::Raw(frames)) => match frames.first() {
                None => return Ok(()),
                Some(f) => (f, frames.len() > 1),
            },
        };
        let more = if more { zmq::SNDMORE } else { 0 };
        match self.push.send(first, zmq::DONTWAIT | more) {
            Err(zmq::Error::EAGAIN) => return Err(item),
            Err(e) => {
                let n = item.count();
                self.abandoned.fetch_add(n as u64, Ordering::Relaxed);
                tracing::warn!(error = %e, messages = n, "the sender could not send to the proxy; dropped, counted in TransportStats::abandoned");
                return Ok(());
            }
            Ok(()) => {}
        }
        // The first frame was taken: the rest of the message goes to the same pipe and is
        // never refused for the high-water mark (it counts whole messages).
        let rest = match item {
            Item::Data(Outgoing { topic, body, count }) => {
                let kind = if count > 1 {
                    wire::META_BATCH
                } else {
                    wire::META_DATA
                };
                let meta = self.numbering.next(&topic, kind, count as u64);
                self.push
                    .send_multipart([zmq::Message::from(&meta[..]), body.into()], 0)
            }
            Item::Control(Control::Mark {
                reply,
                token,
                flush_prefix,
            }) => self
                .push
                .send_multipart([reply, token.to_le_bytes().to_vec(), flush_prefix], 0),
            Item::Control(Control::Raw(frames)) => {
                self.push.send_multipart(frames.into_iter().skip(1), 0)
            }
        };
        if let Err(e) = rest {
            tracing::warn!(error = %e, "the sender could not finish a message to the proxy");
        }
        Ok(())
    }

    /// The layer is closing: hands what is pending to the socket, waiting up to
    /// `close_linger` while the socket refuses (the proxy is away or slow); what it took
    /// goes out within `linger`. What it never took is counted as abandoned, and said.
    fn close(&mut self, close_linger: Duration) {
        let until = Instant::now() + close_linger;
        self.flush();
        while !self.pending.is_empty() && wait_until(&self.push, zmq::POLLOUT, until, "sender") {
            self.flush();
        }
        let left: usize = self.pending.iter().map(Item::count).sum();
        if left > 0 {
            self.abandoned.fetch_add(left as u64, Ordering::Relaxed);
            tracing::warn!(
                abandoned = left,
                "the layer closed with {left} messages the proxy did not take within close_linger ({close_linger:?}); counted in TransportStats::abandoned"
            );
        }
    }
}

fn run((outbox, fd, close_linger): (Arc<Outbox<Push>>, RawFd, Duration)) {
    let mailbox = &outbox.mailbox;
    loop {
        let blocked = !lock(&outbox.sink).pending.is_empty();
        // Blocked: wait for the socket to take more (its fd; a direct send may be using it).
        let mut items = [mailbox.poll_item(), zmq::PollItem::from_fd(fd, zmq::POLLIN)];
        let n = if blocked { 2 } else { 1 };
        mailbox.wait(&mut items[..n], blocked.then_some(100), 1000, "sender");
        let mut push = lock(&outbox.sink);
        push.numbering.turn();
        if mailbox.is_closed() {
            push.pending.extend(mailbox.take_all());
            push.close(close_linger);
            break;
        }
        // Taken under the lock: a direct send never passes what is queued.
        let mut worked = false;
        if push.pending.is_empty() {
            mailbox.take_some(1024, &mut push.pending);
            worked = !push.pending.is_empty();
        }
        push.flush();
        drop(push);
        if worked {
            // As the embedded publisher does: more merges in the queue, fewer doorbells.
            std::thread::yield_now();
        }
    }
}
