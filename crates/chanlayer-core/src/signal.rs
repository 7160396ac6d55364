//! [`CloseSignal`]: the closed state of a layer instance, checked on every hot path and
//! awaited by everything that waits.

use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::watch;

use crate::error::{Error, Result};

/// A one-way "closed" flag that async code can wait on. Checking it is one atomic load
/// (it sits on every hot path); waiting uses a watch channel.
#[derive(Debug, Default)]
pub struct CloseSignal {
    flag: AtomicBool,
    tx: watch::Sender<bool>,
}

impl CloseSignal {
    /// Sets the flag (idempotent) and wakes every waiter. Returns `true` the first time.
    pub fn close(&self) -> bool {
        let first = !self.flag.swap(true, Ordering::SeqCst);
        self.tx.send_replace(true);
        first
    }

    /// `true` once closed.
    #[inline]
    pub fn is_closed(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }

    /// `Err(Closed)` once closed.
    #[inline]
    pub fn check(&self) -> Result<()> {
        if self.is_closed() {
            Err(Error::Closed)
        } else {
            Ok(())
        }
    }

    /// `r`, except that once closed every failure is `Closed`: an operation that failed
    /// because the layer was closing under it reports the close, not what broke on the way.
    pub fn closed_wins<T>(&self, r: Result<T>) -> Result<T> {
        match r {
            Err(_) if self.is_closed() => Err(Error::Closed),
            r => r,
        }
    }

    /// Resolves once closed.
    pub async fn closed(&self) {
        let mut rx = self.tx.subscribe();
        // The sender lives in `self`, so wait_for cannot see it dropped.
        let _ = rx.wait_for(|c| *c).await;
    }
}
