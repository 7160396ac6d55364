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

impl<T> Mailbox<T> {
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

    /// Queues `item`. `bounded` pushes fail with `Full` at capacity; control commands pass
    /// `false` so they are never refused for capacity.
    pub fn push(&self, item: T, bounded: bool) -> std::result::Result<(), Refused> {
        {
            let mut q = lock(&self.queue);
            if q.closed {
                return Err(Refused::Closed);
            }
            if bounded && q.items.len() >= self.capacity {
                return Err(Refused::Full);
            }
            q.items.push_back(item);
        }
        self.ring();
        Ok(())
    }

    /// Queues several items at once (all or none), as one bounded push.
    pub fn push_all(&self, items: Vec<T>) -> std::result::Result<(), Refused> {
        {
            let mut q = lock(&self.queue);
            if q.closed {
                return Err(Refused::Closed);
            }
            if q.items.len() + items.len() > self.capacity.max(items.len()) {
                return Err(Refused::Full);
            }
            q.items.extend(items);
        }
        self.ring();
        Ok(())
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
        std::mem::take(&mut lock(&self.queue).items)
    }

    /// Takes up to `max` queued items into `out`.
    pub fn take_some(&self, max: usize, out: &mut VecDeque<T>) {
        let mut q = lock(&self.queue);
        let n = q.items.len().min(max);
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
