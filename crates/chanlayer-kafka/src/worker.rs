//! The backend's OS threads (librdkafka's consumers are blocking APIs): a named thread whose
//! end an async `close` awaits with a bound, without parking a thread of tokio's blocking
//! pool on `join` (a thread stuck in librdkafka with the broker away would then hold the
//! runtime's shutdown forever).

use std::sync::Mutex;
use std::time::Duration;

use chanlayer_core::toolkit::lock;

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

    /// Takes the thread out of `slot` and waits up to `bound` for it to end; if it still runs
    /// (the broker away), warns that `what` finishes in the background.
    pub async fn stop(slot: &Mutex<Option<Worker>>, bound: Duration, what: &str) {
        let Some(w) = lock(slot).take() else { return };
        if !w.join_within(bound).await {
            tracing::warn!("{what} did not stop within {bound:?} (broker away?); it finishes in the background");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn joins_a_thread_that_ends_and_gives_up_on_one_that_does_not() {
        let w = Worker::spawn("ends".into(), || {}).unwrap();
        assert!(w.join_within(Duration::from_secs(10)).await);
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let stuck = Worker::spawn("stuck".into(), move || {
            let _ = rx.recv();
        })
        .unwrap();
        assert!(!stuck.join_within(Duration::from_millis(50)).await);
        // It is detached, not joined by anything: letting it end is the test's business.
        drop(tx);
    }

    #[test]
    fn a_runtime_shuts_down_while_a_thread_it_waited_for_still_runs() {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let gave_up = rt.block_on(async move {
            // Stuck for 10 s (a consumer waiting on a broker that is away).
            let w = Worker::spawn("stuck".into(), move || {
                let _ = rx.recv_timeout(Duration::from_secs(10));
            })
            .unwrap();
            !w.join_within(Duration::from_millis(20)).await
        });
        assert!(gave_up);
        // A `spawn_blocking(join)` would make this drop wait the 10 s.
        let t = std::time::Instant::now();
        drop(rt);
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        drop(tx);
    }
}
