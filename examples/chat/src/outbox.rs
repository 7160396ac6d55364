//! The per-connection outgoing buffer and its slow-client policy.
//!
//! Each websocket connection has one bounded queue of frames waiting to be written to it
//! (`--buffer`, 256 by default). The task that receives from the connection's channel
//! offers every chat line to it and never waits: when the queue is full the line is
//! **dropped for that connection only** and counted, both for the connection (the writer
//! tells the browser `{"type":"dropped","count":N}` once it catches up) and for the server
//! (`/stats`: `dropped_slow`). Memory per connection is therefore bounded by
//! `buffer × largest frame`, whatever the client does. A client that takes nothing at all
//! is closed by the writer's timeout (see `connection.rs`), not by this queue.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc;

/// The receiving task's end: offers frames, drops and counts when full.
#[derive(Debug)]
pub struct Outbox<T> {
    tx: mpsc::Sender<T>,
    dropped: Arc<AtomicU64>,
    dropped_total: Arc<AtomicU64>,
}

/// The writer's end: frames in order, and how many were dropped since it last asked.
#[derive(Debug)]
pub struct OutboxReader<T> {
    rx: mpsc::Receiver<T>,
    dropped: Arc<AtomicU64>,
}

/// A queue of at most `capacity` frames. `dropped_total` is the server-wide counter that
/// every connection's drops are added to.
pub fn bounded<T>(capacity: usize, dropped_total: Arc<AtomicU64>) -> (Outbox<T>, OutboxReader<T>) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let dropped = Arc::new(AtomicU64::new(0));
    (
        Outbox {
            tx,
            dropped: dropped.clone(),
            dropped_total,
        },
        OutboxReader { rx, dropped },
    )
}

/// What became of an offered frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    /// Queued for the writer.
    Queued,
    /// The queue was full: dropped and counted.
    Dropped,
    /// The writer is gone (the connection is closing).
    Closed,
}

impl<T> Outbox<T> {
    /// Queues `frame` without waiting, or drops and counts it when the queue is full.
    pub fn offer(&self, frame: T) -> Offer {
        match self.tx.try_send(frame) {
            Ok(()) => Offer::Queued,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                self.dropped_total.fetch_add(1, Ordering::Relaxed);
                Offer::Dropped
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Offer::Closed,
        }
    }
}

impl<T> OutboxReader<T> {
    /// The next frame; `None` once every [`Outbox`] is gone and the queue is empty.
    pub async fn recv(&mut self) -> Option<T> {
        self.rx.recv().await
    }

    /// The next frame if one is waiting.
    pub fn try_recv(&mut self) -> Option<T> {
        self.rx.try_recv().ok()
    }

    /// Frames dropped since the last call (and resets the count).
    pub fn take_dropped(&self) -> u64 {
        self.dropped.swap(0, Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_outbox_drops_and_counts_and_never_grows() {
        let total = Arc::new(AtomicU64::new(0));
        let (outbox, mut reader) = bounded::<u32>(4, total.clone());
        let offers: Vec<Offer> = (0..10).map(|i| outbox.offer(i)).collect();
        assert_eq!(offers.iter().filter(|o| **o == Offer::Queued).count(), 4);
        assert_eq!(offers.iter().filter(|o| **o == Offer::Dropped).count(), 6);
        assert_eq!(total.load(Ordering::Relaxed), 6);
        // The writer gets the first four in order, and the count once.
        for i in 0..4 {
            assert_eq!(reader.recv().await, Some(i));
        }
        assert_eq!(reader.take_dropped(), 6);
        assert_eq!(reader.take_dropped(), 0);
        // Room again: new frames queue.
        assert_eq!(outbox.offer(10), Offer::Queued);
        assert_eq!(reader.recv().await, Some(10));
        drop(outbox);
        assert_eq!(reader.recv().await, None);
    }

    #[tokio::test]
    async fn offering_to_a_closed_writer_says_so() {
        let (outbox, reader) = bounded::<u32>(4, Arc::new(AtomicU64::new(0)));
        drop(reader);
        assert_eq!(outbox.offer(1), Offer::Closed);
    }
}
