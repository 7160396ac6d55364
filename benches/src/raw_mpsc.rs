//! Raw `tokio::sync::mpsc`: the in-process baseline of the memory backend, and
//! [`FanOut`], the N local queues every raw group baseline pushes into (what a layer's inbox
//! does with a group message for N local members).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

/// How long an iteration may wait for its last messages before it fails with what it knows.
pub const STALL: Duration = Duration::from_secs(30);

/// `n` copies of `body` through a bounded tokio mpsc channel of capacity `n`: this task
/// sends, a receiver task takes them.
pub async fn send_receive(body: Arc<Vec<u8>>, n: usize) -> Duration {
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(n.max(1));
    let start = Instant::now();
    let recv = tokio::spawn(async move {
        for _ in 0..n {
            let m = rx.recv().await.expect("recv");
            std::hint::black_box(m.len());
        }
    });
    for _ in 0..n {
        tx.send(body.as_ref().clone()).await.expect("send");
    }
    recv.await.expect("receiver");
    start.elapsed()
}

/// `n` copies of `body` through one bounded mpsc channel read by two competing receiver
/// tasks (the receiver behind a `tokio::sync::Mutex`: each message reaches one of them).
/// Panics unless exactly `n` arrived.
pub async fn two_receivers(body: Arc<Vec<u8>>, n: usize) -> Duration {
    let (tx, rx) = mpsc::channel::<Vec<u8>>(n.max(1));
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let start = Instant::now();
    let receivers: Vec<_> = (0..2)
        .map(|_| {
            let rx = rx.clone();
            tokio::spawn(async move {
                let mut got = 0usize;
                loop {
                    let m = rx.lock().await.recv().await;
                    match m {
                        Some(m) => {
                            std::hint::black_box(m.len());
                            got += 1;
                        }
                        None => return got,
                    }
                }
            })
        })
        .collect();
    for _ in 0..n {
        tx.send(body.as_ref().clone()).await.expect("send");
    }
    drop(tx);
    let mut got = 0;
    for r in receivers {
        got += r.await.expect("receiver task");
    }
    let elapsed = start.elapsed();
    assert_eq!(
        got, n,
        "raw mpsc, two receivers: {got} of {n} messages arrived"
    );
    elapsed
}

/// `iters` round trips over two mpsc channels: this task sends `body` and waits for the
/// reply of a responder task that sends back what it got.
pub async fn round_trips(body: &[u8], iters: u64, latencies: &Mutex<Vec<Duration>>) -> Duration {
    let (to_b, mut at_b) = mpsc::channel::<Vec<u8>>(16);
    let (to_a, mut at_a) = mpsc::channel::<Vec<u8>>(16);
    let responder = tokio::spawn(async move {
        for _ in 0..iters {
            let m = at_b.recv().await.expect("recv (responder)");
            to_a.send(m).await.expect("send (responder)");
        }
    });
    let mut each = Vec::with_capacity(usize::try_from(iters).unwrap_or(0));
    let start = Instant::now();
    for _ in 0..iters {
        let t = Instant::now();
        to_b.send(body.to_vec()).await.expect("send");
        let m = at_a.recv().await.expect("recv");
        std::hint::black_box(m.len());
        each.push(t.elapsed());
    }
    let total = start.elapsed();
    responder.await.expect("responder task");
    latencies
        .lock()
        .expect("latencies lock")
        .extend_from_slice(&each);
    total
}

/// The sending ends of N member queues.
pub struct Members(Vec<mpsc::Sender<Vec<u8>>>);

impl Members {
    /// Pushes one copy of `payload` to every member (as a layer's inbox fans a group
    /// message out). A member queue never fills up in these benches (each holds more than
    /// an iteration sends): a full one panics, as a lost copy.
    pub fn push(&self, payload: &[u8]) {
        for m in &self.0 {
            if m.try_send(payload.to_vec()).is_err() {
                panic!("a raw member queue was full or closed: a group copy would be lost");
            }
        }
    }

    /// How many members.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// No members.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// N bounded tokio mpsc queues, kept across iterations (as a layer keeps its members): a
/// raw receiver pushes each group message into [`FanOut::members`], and a drain task takes
/// `per_member` messages from each, member after member for each message, as the layer
/// side's receiving task does with `receive`.
pub struct FanOut {
    members: Arc<Members>,
    queues: Option<Vec<mpsc::Receiver<Vec<u8>>>>,
    /// Copies taken by the drain tasks so far.
    drained: Arc<AtomicU64>,
}

impl FanOut {
    /// `members` queues of `capacity` each.
    pub fn new(members: usize, capacity: usize) -> FanOut {
        let (senders, queues) = (0..members).map(|_| mpsc::channel(capacity.max(1))).unzip();
        FanOut {
            members: Arc::new(Members(senders)),
            queues: Some(queues),
            drained: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The sending ends, for the raw receiver.
    pub fn members(&self) -> Arc<Members> {
        self.members.clone()
    }

    /// Starts a task on `rt` that takes `per_member` messages from every queue.
    pub fn spawn_drain(&mut self, rt: &tokio::runtime::Handle, per_member: usize) -> Drain {
        let mut queues = self
            .queues
            .take()
            .expect("one drain at a time (the previous one was finished)");
        let drained = self.drained.clone();
        let before = drained.load(Ordering::Relaxed);
        let task = rt.spawn(async move {
            for _ in 0..per_member {
                for q in &mut queues {
                    let m = q.recv().await.expect("a member queue closed");
                    std::hint::black_box(m.len());
                    drained.fetch_add(1, Ordering::Relaxed);
                }
            }
            queues
        });
        Drain {
            task,
            expected: (per_member * self.members.len()) as u64,
            before,
        }
    }

    /// Waits (at most [`STALL`]) for a drain task to take all it should, and takes its
    /// queues back. Panics with how many copies arrived when some did not.
    pub async fn finish(&mut self, name: &str, drain: Drain) {
        match tokio::time::timeout(STALL, drain.task).await {
            Ok(r) => self.queues = Some(r.expect("the drain task")),
            Err(_) => panic!(
                "{name}: {} of {} group copies arrived within {STALL:?} after the last send",
                self.drained.load(Ordering::Relaxed) - drain.before,
                drain.expected,
            ),
        }
    }
}

/// A running drain task of a [`FanOut`].
pub struct Drain {
    task: tokio::task::JoinHandle<Vec<mpsc::Receiver<Vec<u8>>>>,
    expected: u64,
    before: u64,
}

/// The raw twin of a memory-layer `group_send` to N local members: `m` copies of `body`
/// through one mpsc channel (the "transport") to a dispatcher task that pushes each into
/// the N member queues of `fan_out`, while a drain task takes them.
pub async fn group_send(fan_out: &mut FanOut, body: Arc<Vec<u8>>, m: usize) -> Duration {
    let start = Instant::now();
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(m.max(1));
    let drain = fan_out.spawn_drain(&tokio::runtime::Handle::current(), m);
    let members = fan_out.members();
    let dispatcher = tokio::spawn(async move {
        for _ in 0..m {
            let msg = rx.recv().await.expect("recv (dispatcher)");
            members.push(&msg);
        }
    });
    for _ in 0..m {
        tx.send(body.as_ref().clone()).await.expect("send");
    }
    dispatcher.await.expect("the dispatcher task");
    fan_out.finish("raw mpsc group", drain).await;
    start.elapsed()
}
