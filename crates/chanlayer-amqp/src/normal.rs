//! Normal channels: a durable queue per channel, read by competing consumers with manual
//! acks and a prefetch window.
//!
//! Each instance that receives a normal channel runs one AMQP consumer for it, on its own
//! AMQP channel (started by the first receive, restarted after a reconnection or a flush).
//! `receive` acks as it returns; `receive_delivery` hands the ack to the caller. A `nack`, or
//! a delivery dropped unsettled, goes back to the head of this instance's queue for the
//! channel, in its original order, and stays unacked at the broker: if the instance dies, the
//! broker delivers it again to another consumer.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chanlayer_core::toolkit::{
    async_trait, lock, now_ms, Envelope, Incoming, NormalSource, Settler, Stats,
};
use chanlayer_core::{Error, Result};
use futures::{FutureExt, StreamExt};
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{Acker, Channel, Consumer};

use crate::session::{backend, is_connection_error, Session};
use crate::shared::Shared;

/// A delivery taken from the broker and not settled yet.
pub(crate) struct Pending {
    pub envelope: Envelope,
    acker: Acker,
    /// Which consumer start it came from, and its delivery tag there: the order to requeue in.
    key: (u64, u64),
    pub redelivered: bool,
}

/// The consumer of one normal channel in this instance.
pub(crate) struct NormalConsumer {
    shared: Arc<Shared>,
    channel: String,
    queue: String,
    state: tokio::sync::Mutex<Slot>,
    /// The AMQP channel the consumer runs on (closed by `reset` to hand everything back).
    amqp_channel: Mutex<Option<Channel>>,
    requeued: Mutex<BTreeMap<(u64, u64), Pending>>,
    requeue_notify: tokio::sync::Notify,
    epoch: AtomicU64,
}

fn ack_in_background(acker: Acker) {
    tokio::spawn(async move {
        if let Err(e) = acker.ack(BasicAckOptions::default()).await {
            // The channel is gone: the broker hands the message out again.
            tracing::debug!(error = %e, "ack not sent; the broker will deliver the message again");
        }
    });
}

impl NormalConsumer {
    /// The consumer of normal channel `channel` (not started), as core reads it.
    pub fn source(shared: &Arc<Shared>, channel: &str) -> Arc<Source> {
        Arc::new(Source(Arc::new(NormalConsumer {
            shared: shared.clone(),
            channel: channel.to_owned(),
            queue: shared.names.channel(channel),
            state: tokio::sync::Mutex::new(Slot::Idle),
            amqp_channel: Mutex::new(None),
            requeued: Mutex::new(BTreeMap::new()),
            requeue_notify: tokio::sync::Notify::new(),
            epoch: AtomicU64::new(0),
        })))
    }

    /// The first requeued delivery whose AMQP channel is still open (the others come back
    /// from the broker).
    fn pop_requeued(&self) -> Option<Pending> {
        let mut q = lock(&self.requeued);
        std::iter::from_fn(|| q.pop_first().map(|(_, p)| p)).find(|p| p.acker.usable())
    }

    /// Hands everything back to the broker: closes the AMQP channel (unacked deliveries
    /// return to the queue) and forgets the local requeue. The next receive starts again.
    pub async fn reset(&self) {
        lock(&self.requeued).clear();
        let ch = lock(&self.amqp_channel).take();
        if let Some(ch) = ch {
            let _ = ch.close(200, ShortString::from("chanlayer flush")).await;
        }
    }

    async fn start(self: Arc<Self>) -> Result<Consumer> {
        let inner = &self.shared;
        let mut session = inner.session().await?;
        loop {
            inner.declare_channel_queue(&session, &self.channel).await?;
            match self.try_start(inner, &session).await {
                Ok(c) => return Ok(c),
                Err(e) if is_connection_error(&e) => {
                    session.broken.notify_one();
                    session = inner.session_after(session.generation).await?;
                }
                Err(e) => {
                    let what = format!("could not consume queue {:?}", self.queue);
                    return Err(backend(&what, e));
                }
            }
        }
    }

    async fn try_start(&self, inner: &Shared, session: &Session) -> lapin::Result<Consumer> {
        let ch = session.conn.create_channel().await?;
        ch.basic_qos(inner.cfg.prefetch, BasicQosOptions::default())
            .await?;
        let epoch = self.epoch.fetch_add(1, Ordering::Relaxed) + 1;
        let tag = format!("chanlayer-{}-{epoch}", inner.inbound.id()).into();
        let (queue, options) = (self.queue.as_str().into(), BasicConsumeOptions::default());
        let consuming = ch.basic_consume(queue, tag, options, FieldTable::default());
        let consumer = consuming.await?;
        *lock(&self.amqp_channel) = Some(ch);
        Ok(consumer)
    }

    /// Turns a broker delivery into a [`Pending`], or skips it (undecodable or expired: acked
    /// and counted).
    fn accept(&self, d: lapin::message::Delivery) -> Option<Pending> {
        let inbound = &self.shared.inbound;
        match inbound.decode(&d.data, format_args!("amqp queue {}", self.queue)) {
            Some(env) if !env.is_expired_at(now_ms()) => {
                let epoch = self.epoch.load(Ordering::Relaxed);
                return Some(Pending {
                    envelope: env,
                    acker: d.acker,
                    key: (epoch, d.delivery_tag),
                    redelivered: d.redelivered,
                });
            }
            Some(_) => inbound.stats().record_expired(1),
            None => {}
        }
        ack_in_background(d.acker);
        None
    }

    /// Waits for the next delivery. Cancellation-safe: a delivery leaves the consumer only in
    /// the step that returns it, and a consumer being started is kept in the slot (started
    /// by a task of its own) so a cancelled receive never strands one.
    async fn take_locked(self: &Arc<Self>, slot: &mut Slot) -> Result<Pending> {
        let inner = &self.shared;
        let closed = inner.inbound.closed();
        loop {
            closed.check()?;
            if let Some(p) = self.pop_requeued() {
                return Ok(p);
            }
            match slot {
                Slot::Idle => {
                    *slot = Slot::Starting(tokio::spawn(self.clone().start()));
                }
                Slot::Starting(handle) => {
                    let started = tokio::select! {
                        _ = closed.closed() => return Err(Error::Closed),
                        r = handle => r,
                    };
                    // Idle again if the start failed: the next receive tries anew.
                    *slot = Slot::Idle;
                    let failed =
                        |e| Error::backend(crate::BACKEND, "the consumer start task failed", e);
                    *slot = Slot::Running(started.map_err(failed)??);
                }
                Slot::Running(consumer) => {
                    let next = tokio::select! {
                        _ = closed.closed() => return Err(Error::Closed),
                        _ = self.requeue_notify.notified() => continue,
                        n = consumer.next() => n,
                    };
                    match next {
                        Some(Ok(d)) => {
                            if let Some(p) = self.accept(d) {
                                return Ok(p);
                            }
                        }
                        Some(Err(e)) => {
                            tracing::debug!(queue = %self.queue, error = %e, "consumer stopped; restarting");
                            *slot = Slot::Idle;
                            if let Ok(s) = inner.session().await {
                                s.broken.notify_one();
                            }
                        }
                        None => *slot = Slot::Idle,
                    }
                }
            }
        }
    }

    /// The consumer's slot, once no other receive holds it (or `Closed`).
    async fn slot(&self) -> Result<tokio::sync::MutexGuard<'_, Slot>> {
        tokio::select! {
            _ = self.shared.inbound.closed().closed() => Err(Error::Closed),
            g = self.state.lock() => Ok(g),
        }
    }

    /// The next delivery of this channel.
    pub async fn take(self: &Arc<Self>) -> Result<Pending> {
        self.take_locked(&mut *self.slot().await?).await
    }

    /// Up to `max` deliveries: waits up to `timeout` for the first, then takes what is there.
    pub async fn take_batch(
        self: &Arc<Self>,
        max: usize,
        timeout: Duration,
    ) -> Result<Vec<Pending>> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let started = tokio::time::Instant::now();
        let mut slot = self.slot().await?;
        let left = timeout.saturating_sub(started.elapsed());
        let Ok(first) = tokio::time::timeout(left, self.take_locked(&mut slot)).await else {
            return Ok(Vec::new());
        };
        let mut out = vec![first?];
        while out.len() < max {
            if let Some(p) = self.pop_requeued() {
                out.push(p);
                continue;
            }
            let Slot::Running(consumer) = &mut *slot else {
                break;
            };
            // Only what is already there: an error or the end is the next receive's business.
            let Some(Some(Ok(d))) = consumer.next().now_or_never() else {
                break;
            };
            out.extend(self.accept(d));
        }
        Ok(out)
    }

    /// An [`Incoming`] whose ack/nack settle with the broker / the local requeue.
    pub fn incoming(self: &Arc<Self>, p: Pending) -> Incoming {
        let (envelope, redelivered) = (p.envelope.clone(), p.redelivered);
        Incoming::unsettled(envelope, redelivered, self.clone(), p, &self.shared.inbound)
    }
}

/// The [`NormalSource`] core reads a normal channel from.
pub(crate) struct Source(pub Arc<NormalConsumer>);

#[async_trait]
impl NormalSource for Source {
    async fn next(&self) -> Result<Incoming> {
        let p = self.0.take().await?;
        Ok(self.0.incoming(p))
    }

    async fn next_batch(&self, max: usize, timeout: Duration) -> Result<Vec<Incoming>> {
        let batch = self.0.take_batch(max, timeout).await?;
        Ok(batch.into_iter().map(|p| self.0.incoming(p)).collect())
    }

    /// Acks in the background and returns the envelope (`receive`'s auto-ack).
    async fn next_auto(&self) -> Result<Envelope> {
        let p = self.0.take().await?;
        ack_in_background(p.acker);
        Ok(p.envelope)
    }
}

/// Where a normal channel's consumer is.
enum Slot {
    /// Not started (first receive, or after a reconnection or flush).
    Idle,
    /// Being started by a task of its own.
    Starting(tokio::task::JoinHandle<Result<Consumer>>),
    /// Consuming.
    Running(Consumer),
}

#[async_trait]
impl Settler for NormalConsumer {
    type Pending = Pending;

    async fn settle(&self, p: Pending) -> Result<()> {
        let lost = "the ack did not reach the broker (the connection was lost); the message will be delivered again";
        let acked = p.acker.ack(BasicAckOptions::default()).await;
        acked.map(|_| ()).map_err(|e| backend(lost, e))
    }

    /// Puts an unsettled delivery back at the head, in delivery order.
    fn requeue(&self, mut p: Pending, stats: &Stats) {
        p.redelivered = true;
        stats.record_redelivered(1);
        lock(&self.requeued).insert(p.key, p);
        self.requeue_notify.notify_one();
    }
}
