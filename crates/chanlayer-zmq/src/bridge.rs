//! The bridge between async callers and the threads that own the libzmq sockets.
//!
//! libzmq sockets are blocking and not thread-safe, so each socket lives in one thread. That
//! thread waits in `zmq_poll` on its sockets and on a doorbell (one end of a Unix datagram
//! pair); callers push commands into a [`Mailbox`] and ring the doorbell only when the thread
//! may be asleep, so a burst of sends costs one wake-up, and the thread drains the whole
//! queue in one batch.

use std::collections::VecDeque;
use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};

use chanlayer_core::{Error, Result};

use crate::wire;
use crate::BACKEND;

/// The process's one libzmq context. It is never terminated (terminating blocks until every
/// socket is closed), so closing a socket never waits.
pub(crate) fn context() -> &'static zmq::Context {
    static CTX: OnceLock<zmq::Context> = OnceLock::new();
    CTX.get_or_init(zmq::Context::new)
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A libzmq error as a chanlayer error.
pub(crate) fn zmq_err(what: impl Into<String>, e: zmq::Error) -> Error {
    Error::backend(BACKEND, what, e)
}

/// What a mailbox holds: an item is one message (or command), unless it merges the ones
/// pushed after it (consecutive messages of one topic become one batch in the queue, so the
/// sender's thread does the copying and the socket thread gets a batch ready to send).
pub(crate) trait Merge: Sized {
    /// How many messages the item holds (what the mailbox's capacity counts).
    fn count(&self) -> usize {
        1
    }

    /// Takes `next` into `self` when they travel together, or gives it back.
    fn merge(&mut self, next: Self) -> std::result::Result<(), Self> {
        Err(next)
    }
}

impl Merge for () {}

/// Data messages on their way to a socket thread: one message, or a run of consecutive
/// messages of one topic that merged in the queue (see [`Merge`]).
pub(crate) enum Outgoing {
    /// `[topic, envelope]`.
    One { topic: Vec<u8>, payload: Vec<u8> },
    /// `count` envelopes of `topic`, as [`wire::batch_push`] writes them.
    Run {
        topic: Vec<u8>,
        body: Vec<u8>,
        count: usize,
    },
}

impl Outgoing {
    /// `[topic, payload]` as a new item (copies both).
    pub fn copied(topic: &[u8], payload: &[u8]) -> Outgoing {
        Outgoing::One {
            topic: topic.to_vec(),
            payload: payload.to_vec(),
        }
    }

    /// Appends a message of `topic` to this item when they travel together: the same
    /// topic, both at most [`wire::BATCH_ITEM_MAX`] bytes, and the run stays within
    /// [`wire::BATCH_MAX_BYTES`]. The caller's thread copies it into the run here, so the
    /// socket thread gets a batch ready to send. `false` (nothing changed) otherwise.
    pub fn append(&mut self, next_topic: &[u8], next_payload: &[u8]) -> bool {
        if next_payload.len() > wire::BATCH_ITEM_MAX {
            return false;
        }
        match self {
            Outgoing::One { topic, payload }
                if topic.as_slice() == next_topic
                    && payload.len() <= wire::BATCH_ITEM_MAX
                    && 8 + payload.len() + next_payload.len() <= wire::BATCH_MAX_BYTES =>
            {
                let mut body = Vec::with_capacity(
                    (16 * (next_payload.len() + 4)).clamp(4 * 1024, wire::BATCH_MAX_BYTES),
                );
                wire::batch_push(&mut body, payload);
                wire::batch_push(&mut body, next_payload);
                let topic = std::mem::take(topic);
                *self = Outgoing::Run {
                    topic,
                    body,
                    count: 2,
                };
                true
            }
            Outgoing::Run { topic, body, count }
                if topic.as_slice() == next_topic
                    && body.len() + 4 + next_payload.len() <= wire::BATCH_MAX_BYTES =>
            {
                wire::batch_push(body, next_payload);
                *count += 1;
                true
            }
            _ => false,
        }
    }
}

impl Merge for Outgoing {
    fn count(&self) -> usize {
        match self {
            Outgoing::One { .. } => 1,
            Outgoing::Run { count, .. } => *count,
        }
    }

    /// A message merges into the message or run before it as [`Outgoing::append`] says.
    fn merge(&mut self, next: Outgoing) -> std::result::Result<(), Outgoing> {
        match next {
            Outgoing::One { topic, payload } if self.append(&topic, &payload) => Ok(()),
            other => Err(other),
        }
    }
}

/// A mailbox item that can carry a data message given as borrowed bytes: a sender that
/// encodes into a reused buffer pushes with [`Mailbox::push_data`], which copies the bytes
/// straight into the queued run of their topic (no owned buffer per message).
pub(crate) trait Carries: Merge {
    /// The data message `[topic, payload]` as a new item.
    fn data(topic: &[u8], payload: &[u8]) -> Self;
    /// Appends the data message to this item if they travel together (see
    /// [`Outgoing::append`]); `false` otherwise.
    fn append_data(&mut self, topic: &[u8], payload: &[u8]) -> bool;
}

/// A socket thread's command, of which one kind carries data messages. [`Merge`] and
/// [`Carries`] come with it: data merges with the data queued before it as [`Outgoing`]
/// says, any other command travels alone and counts as one.
pub(crate) trait Command: Sized {
    /// The command that carries `data`.
    fn from_data(data: Outgoing) -> Self;
    /// The data this command carries, if it is a data command.
    fn data(&self) -> Option<&Outgoing>;
    /// [`Command::data`], mutable.
    fn data_mut(&mut self) -> Option<&mut Outgoing>;
    /// The data of a data command, or the command back.
    fn into_data(self) -> std::result::Result<Outgoing, Self>;
}

impl<T: Command> Merge for T {
    fn count(&self) -> usize {
        self.data().map_or(1, Merge::count)
    }

    fn merge(&mut self, next: T) -> std::result::Result<(), T> {
        let Some(data) = self.data_mut() else {
            return Err(next);
        };
        match next.into_data() {
            Ok(n) => data.merge(n).map_err(T::from_data),
            Err(other) => Err(other),
        }
    }
}

impl<T: Command> Carries for T {
    fn data(topic: &[u8], payload: &[u8]) -> Self {
        T::from_data(Outgoing::copied(topic, payload))
    }

    fn append_data(&mut self, topic: &[u8], payload: &[u8]) -> bool {
        self.data_mut().is_some_and(|d| d.append(topic, payload))
    }
}

impl Carries for Outgoing {
    fn data(topic: &[u8], payload: &[u8]) -> Self {
        Outgoing::copied(topic, payload)
    }

    fn append_data(&mut self, topic: &[u8], payload: &[u8]) -> bool {
        self.append(topic, payload)
    }
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
    /// Messages in `items` (an item may hold several).
    count: usize,
    closed: bool,
}

/// A command queue to one socket thread, with its doorbell.
pub(crate) struct Mailbox<T> {
    queue: Mutex<Queue<T>>,
    capacity: usize,
    sleeping: AtomicBool,
    bell_tx: UnixDatagram,
    bell_rx: UnixDatagram,
}

impl<T: Merge> Mailbox<T> {
    /// A mailbox that holds at most `capacity` bounded pushes.
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
        place: impl FnOnce(&mut VecDeque<T>),
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
        }
        self.ring();
        Ok(())
    }

    /// Appends `item` to `items`, merged into the last one when they travel together.
    fn enqueue(items: &mut VecDeque<T>, item: T) {
        let unmerged = match items.back_mut() {
            Some(last) => last.merge(item).err(),
            None => Some(item),
        };
        if let Some(item) = unmerged {
            items.push_back(item);
        }
    }

    /// Queues `item`, merged into the last queued item when they travel together.
    /// `bounded` pushes fail with `Full` when the queue holds `capacity` messages; control
    /// commands pass `false` so they are never refused for capacity.
    pub fn push(&self, item: T, bounded: bool) -> std::result::Result<(), Refused> {
        self.admit(item.count(), bounded, |items| Self::enqueue(items, item))
    }

    /// Queues the data message `[topic, payload]` (a bounded push), copied into the last
    /// queued item when they travel together, else into a new item.
    pub fn push_data(&self, topic: &[u8], payload: &[u8]) -> std::result::Result<(), Refused>
    where
        T: Carries,
    {
        self.admit(1, true, |items| {
            let merged = items
                .back_mut()
                .is_some_and(|last| last.append_data(topic, payload));
            if !merged {
                items.push_back(T::data(topic, payload));
            }
        })
    }

    /// Queues several items at once (all or none), as one bounded push.
    pub fn push_all(&self, items: Vec<T>) -> std::result::Result<(), Refused> {
        let n: usize = items.iter().map(Merge::count).sum();
        self.admit(n, true, |queue| {
            for item in items {
                Self::enqueue(queue, item);
            }
        })
    }

    /// Marks the mailbox closed (later pushes are refused) and wakes the thread.
    pub fn close(&self) {
        lock(&self.queue).closed = true;
        self.sleeping.store(true, Ordering::SeqCst);
        self.ring();
    }

    /// `true` once [`Mailbox::close`] was called.
    pub fn is_closed(&self) -> bool {
        lock(&self.queue).closed
    }

    /// Takes every queued item.
    pub fn take_all(&self) -> VecDeque<T> {
        let mut q = lock(&self.queue);
        q.count = 0;
        std::mem::take(&mut q.items)
    }

    /// Takes up to `max` queued items into `out`.
    pub fn take_some(&self, max: usize, out: &mut VecDeque<T>) {
        let mut q = lock(&self.queue);
        let n = q.items.len().min(max);
        let taken: usize = q.items.iter().take(n).map(Merge::count).sum();
        q.count -= taken;
        out.extend(q.items.drain(..n));
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
        loop {
            match self.bell_rx.recv(&mut buf) {
                Ok(_) => continue,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
    }

    /// The doorbell as a poll item for `zmq::poll`.
    pub fn poll_item(&self) -> zmq::PollItem<'static> {
        zmq::PollItem::from_fd(self.bell_rx.as_raw_fd(), zmq::POLLIN)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Merge for u32 {}

    /// Pairs of the same value merge (the count is what the capacity counts).
    #[derive(Debug, PartialEq)]
    struct Run(u32, usize);

    impl Merge for Run {
        fn count(&self) -> usize {
            self.1
        }
        fn merge(&mut self, next: Run) -> std::result::Result<(), Run> {
            if next.0 == self.0 {
                self.1 += next.1;
                Ok(())
            } else {
                Err(next)
            }
        }
    }

    #[test]
    fn merged_items_count_every_message_against_the_capacity() {
        let m: Mailbox<Run> = Mailbox::new(3).expect("mailbox");
        m.push(Run(1, 1), true).expect("room");
        m.push(Run(1, 1), true).expect("room");
        m.push(Run(2, 1), true).expect("room");
        assert_eq!(
            m.push(Run(2, 1), true),
            Err(Refused::Full),
            "3 messages queued"
        );
        let mut out = VecDeque::new();
        m.take_some(1, &mut out);
        assert_eq!(out.pop_front(), Some(Run(1, 2)), "the first two merged");
        m.push(Run(2, 1), true).expect("room again");
        m.push(Run(2, 1), true).expect("room again");
        assert_eq!(m.push(Run(3, 1), true), Err(Refused::Full));
        assert_eq!(
            m.take_all().into_iter().collect::<Vec<_>>(),
            vec![Run(2, 3)]
        );
        m.push(Run(3, 1), true).expect("empty again");
    }

    fn one(topic: &[u8], len: usize) -> Outgoing {
        Outgoing::One {
            topic: topic.to_vec(),
            payload: vec![7; len],
        }
    }

    #[test]
    fn consecutive_messages_of_a_topic_merge_into_a_run() {
        let m: Mailbox<Outgoing> = Mailbox::new(100).expect("mailbox");
        for (topic, len) in [
            (&b"a"[..], 10),
            (b"a", 20),
            (b"a", 30),
            (b"b", 5),
            (b"b", wire::BATCH_ITEM_MAX + 1),
            (b"b", 5),
        ] {
            m.push(one(topic, len), true).expect("room");
        }
        let items: Vec<Outgoing> = m.take_all().into_iter().collect();
        assert_eq!(items.len(), 4, "a a a | b | big b | b");
        match &items[0] {
            Outgoing::Run { topic, body, count } => {
                assert_eq!((&topic[..], *count), (&b"a"[..], 3));
                let lens: Vec<usize> = wire::batch_items(body)
                    .expect("a batch")
                    .iter()
                    .map(|i| i.len())
                    .collect();
                assert_eq!(lens, vec![10, 20, 30], "in order");
            }
            Outgoing::One { .. } => panic!("the three of topic a did not merge"),
        }
        assert!(matches!(&items[1], Outgoing::One { payload, .. } if payload.len() == 5));
        assert!(
            matches!(&items[2], Outgoing::One { payload, .. } if payload.len() > wire::BATCH_ITEM_MAX),
            "too large to merge, and nothing merges into it"
        );
        assert!(matches!(&items[3], Outgoing::One { payload, .. } if payload.len() == 5));
        // A run stops at BATCH_MAX_BYTES.
        let per = wire::BATCH_ITEM_MAX;
        let fit = wire::BATCH_MAX_BYTES / (per + 4);
        for _ in 0..=fit {
            m.push(one(b"c", per), true).expect("room");
        }
        let counts: Vec<usize> = m.take_all().iter().map(Merge::count).collect();
        assert_eq!(counts, vec![fit, 1]);
    }

    /// What `push_data` queues, in the order pushed, as (topic, item lengths).
    fn shape(items: VecDeque<Outgoing>) -> Vec<(Vec<u8>, Vec<usize>)> {
        items
            .into_iter()
            .map(|i| match i {
                Outgoing::One { topic, payload } => (topic, vec![payload.len()]),
                Outgoing::Run { topic, body, count } => {
                    let lens: Vec<usize> = wire::batch_items(&body)
                        .expect("a batch")
                        .iter()
                        .map(|i| i.len())
                        .collect();
                    assert_eq!(lens.len(), count, "count matches the items");
                    (topic, lens)
                }
            })
            .collect()
    }

    #[test]
    fn push_data_merges_like_push_and_counts_against_the_capacity() {
        let pushes = [
            (&b"a"[..], 10),
            (b"a", 20),
            (b"b", 5),
            (b"b", wire::BATCH_ITEM_MAX + 1),
            (b"b", 5),
            (b"b", 6),
        ];
        let owned: Mailbox<Outgoing> = Mailbox::new(100).expect("mailbox");
        let borrowed: Mailbox<Outgoing> = Mailbox::new(100).expect("mailbox");
        for (topic, len) in pushes {
            owned.push(one(topic, len), true).expect("room");
            borrowed.push_data(topic, &vec![7; len]).expect("room");
        }
        let a = shape(borrowed.take_all());
        assert_eq!(a, shape(owned.take_all()), "the same items as push");
        assert_eq!(
            a,
            vec![
                (b"a".to_vec(), vec![10, 20]),
                (b"b".to_vec(), vec![5]),
                (b"b".to_vec(), vec![wire::BATCH_ITEM_MAX + 1]),
                (b"b".to_vec(), vec![5, 6]),
            ]
        );
        let m: Mailbox<Outgoing> = Mailbox::new(2).expect("mailbox");
        m.push_data(b"a", b"1").expect("room");
        m.push_data(b"a", b"2").expect("room");
        assert_eq!(
            m.push_data(b"a", b"3"),
            Err(Refused::Full),
            "2 messages queued"
        );
        m.close();
        assert_eq!(m.push_data(b"a", b"4"), Err(Refused::Closed));
    }

    #[test]
    fn bounded_and_control_pushes() {
        let m: Mailbox<u32> = Mailbox::new(2).expect("mailbox");
        assert_eq!(m.push(1, true), Ok(()));
        assert_eq!(m.push(2, true), Ok(()));
        assert_eq!(m.push(3, true), Err(Refused::Full));
        assert_eq!(m.push(4, false), Ok(()));
        assert_eq!(m.take_all().into_iter().collect::<Vec<_>>(), vec![1, 2, 4]);
        m.close();
        assert_eq!(m.push(5, false), Err(Refused::Closed));
    }

    #[test]
    fn a_push_rings_a_sleeping_thread() {
        let m: Mailbox<u32> = Mailbox::new(8).expect("mailbox");
        assert!(m.prepare_sleep());
        m.push(1, true).expect("push");
        let mut items = [m.poll_item()];
        assert_eq!(zmq::poll(&mut items, 1000).expect("poll"), 1);
        m.woke();
        assert!(!m.prepare_sleep(), "an item is queued: no sleep");
        m.take_all();
        assert!(m.prepare_sleep());
        let mut items = [m.poll_item()];
        assert_eq!(
            zmq::poll(&mut items, 0).expect("poll"),
            0,
            "the bell was emptied"
        );
    }
}
