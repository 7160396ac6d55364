//! The layer side of the `backends` scenarios, through `ChannelLayer` trait objects, the
//! same code for every backend. Every function counts what arrived and panics when
//! messages are missing [`STALL`] after the last send.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chanlayer_core::ChannelLayer;

use crate::message;

/// A layer handle of any backend.
pub type Dyn = Arc<dyn ChannelLayer>;

/// How long an iteration may wait for its last messages after its last send before it
/// fails with what it knows.
pub const STALL: Duration = Duration::from_secs(30);

/// Where [`send_n`] sends.
#[derive(Clone, Copy)]
pub enum Target<'a> {
    /// `send` to a channel.
    Channel(&'a str),
    /// `group_send` to a group.
    Group(&'a str),
}

async fn send_one(layer: &Dyn, target: Target<'_>, body: &[u8]) {
    match target {
        Target::Channel(c) => layer.send(c, message(body)).await.expect("send"),
        Target::Group(g) => layer
            .group_send(g, message(body))
            .await
            .expect("group_send"),
    }
}

/// `n` copies of `body` to `target`: one after the other on this task (`depth` 1), or
/// from `depth` tasks at once.
pub async fn send_n(layer: &Dyn, target: Target<'_>, body: &Arc<Vec<u8>>, n: usize, depth: usize) {
    if depth <= 1 {
        for _ in 0..n {
            send_one(layer, target, body).await;
        }
        return;
    }
    let (is_group, name): (bool, Arc<str>) = match target {
        Target::Channel(c) => (false, c.into()),
        Target::Group(g) => (true, g.into()),
    };
    let senders = (0..depth).map(|i| {
        let (layer, name, body) = (layer.clone(), name.clone(), body.clone());
        let share = n / depth + usize::from(i < n % depth);
        tokio::spawn(async move {
            let target = if is_group {
                Target::Group(&name)
            } else {
                Target::Channel(&name)
            };
            for _ in 0..share {
                send_one(&layer, target, &body).await;
            }
        })
    });
    for r in futures::future::join_all(senders).await {
        r.expect("sender task");
    }
}

/// Waits (at most [`STALL`]) for `task`; panics with `what` and the count so far if it
/// does not end.
async fn finish<T>(task: tokio::task::JoinHandle<T>, what: impl FnOnce() -> String) -> T {
    match tokio::time::timeout(STALL, task).await {
        Ok(r) => r.expect("a receiver task"),
        Err(_) => panic!("{}", what()),
    }
}

/// `n` messages from `sender` to `channel` (a process-local channel of `receiver`) while a
/// receiver task takes them.
pub async fn send_receive(
    (sender, receiver): (&Dyn, &Dyn),
    channel: &Arc<str>,
    body: &Arc<Vec<u8>>,
    n: usize,
    depth: usize,
) -> Duration {
    let received = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let receiving = {
        let (receiver, channel, received) = (receiver.clone(), channel.clone(), received.clone());
        tokio::spawn(async move {
            for _ in 0..n {
                let m = receiver.receive(&channel).await.expect("receive");
                std::hint::black_box(m.body().len());
                received.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    send_n(sender, Target::Channel(channel), body, n, depth).await;
    finish(receiving, || {
        format!(
            "{channel}: {} of {n} messages received {STALL:?} after the last send (receiver: {:?})",
            received.load(Ordering::Relaxed),
            receiver.stats()
        )
    })
    .await;
    start.elapsed()
}

/// `n` messages from `sender` to the normal channel `channel` while one task per receiver
/// calls `receive` on it.
///
/// - `broadcast` (ZeroMQ: every receiving instance gets every message): each receiver
///   takes `n`.
/// - Otherwise (competing consumers: each message reaches one receiver): the receivers
///   take what they get until `n` arrived in all; then their pending `receive`s are
///   dropped (`receive` is cancellation-safe).
///
/// Returns the time and how many each receiver took.
pub async fn two_receivers(
    sender: &Dyn,
    receivers: &[Dyn],
    channel: &Arc<str>,
    body: &Arc<Vec<u8>>,
    (n, depth): (usize, usize),
    broadcast: bool,
) -> (Duration, Vec<u64>) {
    let total = Arc::new(AtomicU64::new(0));
    let done = Arc::new(tokio::sync::Notify::new());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let start = Instant::now();
    let tasks: Vec<_> = receivers
        .iter()
        .map(|r| {
            let (r, channel, total, done, mut stop) = (
                r.clone(),
                channel.clone(),
                total.clone(),
                done.clone(),
                stop_rx.clone(),
            );
            tokio::spawn(async move {
                let mut got = 0u64;
                loop {
                    if broadcast && got == n as u64 {
                        return got;
                    }
                    tokio::select! {
                        biased;
                        _ = stop.changed(), if !broadcast => return got,
                        m = r.receive(&channel) => {
                            std::hint::black_box(m.expect("receive").body().len());
                            got += 1;
                            if !broadcast && total.fetch_add(1, Ordering::Relaxed) + 1 == n as u64 {
                                done.notify_one();
                            } else if broadcast {
                                total.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                }
            })
        })
        .collect();
    send_n(sender, Target::Channel(channel), body, n, depth).await;
    let each = if broadcast {
        let mut each = Vec::new();
        for t in tasks {
            each.push(
                finish(t, || {
                    format!(
                        "{channel}: {} of {} messages received in all {STALL:?} after the last send",
                        total.load(Ordering::Relaxed),
                        n * receivers.len(),
                    )
                })
                .await,
            );
        }
        each
    } else {
        if tokio::time::timeout(STALL, done.notified()).await.is_err() {
            panic!(
                "{channel}: {} of {n} messages received {STALL:?} after the last send",
                total.load(Ordering::Relaxed)
            );
        }
        let _ = stop_tx.send(true);
        let mut each = Vec::new();
        for t in tasks {
            each.push(t.await.expect("a receiver task"));
        }
        each
    };
    (start.elapsed(), each)
}

/// `iters` round trips: `a` sends to `to_b`; a responder task of `b` receives it and sends
/// it back to `to_a`.
pub async fn round_trips(
    (a, b): (&Dyn, &Dyn),
    (to_a, to_b): (&Arc<str>, &Arc<str>),
    body: &[u8],
    iters: u64,
    latencies: &Mutex<Vec<Duration>>,
) -> Duration {
    let responder = {
        let (b, to_a, to_b) = (b.clone(), to_a.clone(), to_b.clone());
        tokio::spawn(async move {
            for _ in 0..iters {
                let m = tokio::time::timeout(STALL, b.receive(&to_b))
                    .await
                    .expect("the responder got no message within STALL")
                    .expect("receive (responder)");
                b.send(&to_a, m).await.expect("send (responder)");
            }
        })
    };
    let mut each = Vec::with_capacity(usize::try_from(iters).unwrap_or(0));
    let start = Instant::now();
    for _ in 0..iters {
        let t = Instant::now();
        a.send(to_b, message(body)).await.expect("send");
        let m = tokio::time::timeout(STALL, a.receive(to_a))
            .await
            .expect("no reply within STALL")
            .expect("receive");
        std::hint::black_box(m.body().len());
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

/// `m` `group_send`s from `sender` to `group`, whose members are the process-local
/// channels `members` of `receiver`, while a receiver task takes the `m` copies of every
/// member: for each message, member after member.
pub async fn group_send(
    (sender, receiver): (&Dyn, &Dyn),
    group: &str,
    members: &Arc<Vec<String>>,
    body: &Arc<Vec<u8>>,
    m: usize,
    depth: usize,
) -> Duration {
    let received = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let receiving = {
        let (receiver, members, received) = (receiver.clone(), members.clone(), received.clone());
        tokio::spawn(async move {
            for _ in 0..m {
                for ch in members.iter() {
                    let msg = receiver.receive(ch).await.expect("receive");
                    std::hint::black_box(msg.body().len());
                    received.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    send_n(sender, Target::Group(group), body, m, depth).await;
    finish(receiving, || {
        format!(
            "{group}: {} of {} group copies received {STALL:?} after the last send (receiver: {:?})",
            received.load(Ordering::Relaxed),
            m * members.len(),
            receiver.stats()
        )
    })
    .await;
    start.elapsed()
}
