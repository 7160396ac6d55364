//! The backend's OS threads (librdkafka's consumers are blocking APIs): a named thread whose
//! end an async `close` awaits with a bound, without parking a thread of tokio's blocking
//! pool on `join` (a thread stuck in librdkafka with the broker away would then hold the
//! runtime's shutdown forever).

use std::time::Duration;

/// A running thread and the signal of its end.
pub(crate) struct Worker {
    handle: std::thread::JoinHandle<()>,
    done: tokio::sync::oneshot::Receiver<()>,
}

impl Worker {
    /// Starts `f` on a thread named `name`.
    pub fn spawn(name: String, f: impl FnOnce() + Send + 'static) -> std::io::Result<Worker> {
        let (tx, done) = tokio::sync::oneshot::channel::<()>();
        let handle = std::thread::Builder::new().name(name).spawn(move || {
            // Dropped when `f` returns or unwinds: either way the thread is ending.
            let _signal = tx;
            f();
        })?;
        Ok(Worker { handle, done })
    }

    /// Waits up to `bound` for the thread to end; `false` if it still runs (it then finishes
    /// in the background, detached).
    pub async fn join_within(self, bound: Duration) -> bool {
        let Worker { handle, done } = self;
        if tokio::time::timeout(bound, done).await.is_err() {
            return false;
        }
        // It has left `f`: join returns at once.
        let _ = handle.join();
        true
    }
}
