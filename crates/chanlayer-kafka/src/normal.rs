//! Normal channels: a topic per channel, read through a consumer group per channel, so the
//! instances receiving one channel compete for its partitions.
//!
//! Each instance that receives a normal channel runs one librdkafka consumer for it, on a
//! thread of its own (librdkafka's consumer is a blocking API), started by the first
//! receive. The thread buffers up to `prefetch` messages (pausing its partitions above
//! that) and hands them to `receive` calls through a shared state.
//!
//! Offsets: auto-commit is off. For each partition the state tracks the offsets that are
//! *outstanding* (buffered, handed out and not acked, or nacked); the commit point is the
//! lowest outstanding offset, or the next offset to fetch when none is. The thread commits
//! the commit points every `commit_interval`, synchronously when partitions are revoked
//! (a rebalance) and when the consumer stops. So:
//!
//! - `receive` settles the offset as it returns (auto-ack): committed within
//!   `commit_interval`, or at the next rebalance, before another instance takes the
//!   partition over: with two readers every message arrives exactly once in total.
//! - `receive_delivery` / `receive_batch` settle on `ack`. A `nack`, or a delivery dropped
//!   unsettled, goes back to the head of this instance's buffer in offset order, and holds
//!   the commit point back: if the instance dies or loses the partition, the new owner reads
//!   it again from the broker.
//! - Buffered messages of a revoked partition are dropped from the buffer (the new owner
//!   reads them from the committed offset); an ack that arrives after its partition was
//!   revoked is ignored (the message is redelivered to the new owner: at-least-once).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chanlayer_core::envelope::now_ms;
use chanlayer_core::toolkit::lock;
use chanlayer_core::{
    AckHandle, Acknowledger, CloseSignal, Delivery, DeliveryInfo, Envelope, Error, Result, Stats,
};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};

use crate::capabilities::BACKEND;
use crate::config::KafkaConfig;
use crate::topics::backend_err;
use crate::worker::Worker;

/// A message taken from the topic and not settled yet.
pub(crate) struct Pending {
    pub envelope: Envelope,
    partition: i32,
    offset: i64,
    /// The assignment of the partition it came from (see [`Track::epoch`]).
    epoch: u64,
    pub redelivered: bool,
}

/// One assigned partition.
struct Track {
    /// Which assignment this is: a delivery from an earlier one cannot settle here.
    epoch: u64,
    /// Offsets buffered, handed out unsettled, or nacked.
    outstanding: BTreeSet<i64>,
    /// The offset after the last one fetched (`None` before the first fetch).
    next: Option<i64>,
    /// The last commit point committed.
    committed: Option<i64>,
    /// Offsets below this may have been delivered to an earlier owner of the partition:
    /// they come marked `redelivered` (see [`Shared::assign`]).
    fetched_before: i64,
}

impl Track {
    fn commit_point(&self) -> Option<i64> {
        self.outstanding.first().copied().or(self.next)
    }
}

/// Adds `partition` at `point` to `tpl`.
fn add_commit(tpl: &mut TopicPartitionList, topic: &str, partition: i32, point: i64) {
    let _ = tpl.add_partition_offset(topic, partition, Offset::Offset(point));
}

#[derive(Default)]
struct State {
    /// Fetched, in fetch order, not handed out yet.
    ready: VecDeque<Pending>,
    /// Nacked or dropped unsettled: handed out again first, in offset order.
    requeued: BTreeMap<(i32, i64), Pending>,
    parts: HashMap<i32, Track>,
    epochs: u64,
    /// Why the consumer stopped, if it failed.
    failed: Option<String>,
}

impl State {
    fn take(&mut self) -> Option<Pending> {
        if let Some((_, p)) = self.requeued.pop_first() {
            return Some(p);
        }
        self.ready.pop_front()
    }

    fn held(&self) -> usize {
        self.ready.len() + self.requeued.len()
    }

    /// Offsets to commit now: partitions whose commit point moved.
    fn due_commits(&mut self, topic: &str) -> Option<TopicPartitionList> {
        let mut tpl = TopicPartitionList::new();
        for (p, t) in &mut self.parts {
            if let Some(point) = t.commit_point() {
                if t.committed.is_none_or(|c| point > c) {
                    add_commit(&mut tpl, topic, *p, point);
                    t.committed = Some(point);
                }
            }
        }
        (tpl.count() > 0).then_some(tpl)
    }
}

/// What the consumer thread and the receivers share.
struct Shared {
    topic: String,
    state: Mutex<State>,
    /// Wakes receivers: something was buffered or requeued, or the consumer failed.
    notify: tokio::sync::Notify,
    /// Wakes the consumer thread: a receiver made room in a full buffer.
    room: std::sync::Condvar,
    stop: AtomicBool,
}

impl Shared {
    /// The rebalance took `tpl` away: forget what is buffered from it and return its final
    /// commit points.
    fn revoke(&self, tpl: &TopicPartitionList) -> TopicPartitionList {
        let mut st = lock(&self.state);
        let mut out = TopicPartitionList::new();
        for e in tpl.elements() {
            let p = e.partition();
            st.ready.retain(|m| m.partition != p);
            st.requeued.retain(|(mp, _), _| *mp != p);
            if let Some(t) = st.parts.remove(&p) {
                if let Some(point) = t.commit_point() {
                    if t.committed.is_none_or(|c| point > c) {
                        add_commit(&mut out, &self.topic, p, point);
                    }
                }
            }
        }
        out
    }

    /// New partitions. `fetched_before` maps a partition to the offset below which its
    /// messages may have been delivered before: where the group has a committed offset (an
    /// earlier owner), everything up to the end at assignment time, which includes what
    /// that owner fetched and did not settle. Conservative, like AMQP's flag ("may have
    /// been delivered before").
    fn assign(&self, tpl: &TopicPartitionList, fetched_before: &HashMap<i32, i64>) {
        let mut st = lock(&self.state);
        for e in tpl.elements() {
            st.epochs += 1;
            let epoch = st.epochs;
            let fetched_before = fetched_before.get(&e.partition()).copied().unwrap_or(0);
            st.parts.insert(
                e.partition(),
                Track {
                    epoch,
                    outstanding: BTreeSet::new(),
                    next: None,
                    committed: None,
                    fetched_before,
                },
            );
        }
    }

    /// Settles a delivery: its offset no longer holds the commit point back.
    fn settle(&self, partition: i32, offset: i64, epoch: u64) {
        let mut st = lock(&self.state);
        if let Some(t) = st.parts.get_mut(&partition) {
            if t.epoch == epoch {
                t.outstanding.remove(&offset);
            }
        }
    }

    /// Puts an unsettled delivery back at the head, unless its partition moved (then the
    /// new owner reads it from the broker).
    fn requeue(&self, mut p: Pending, stats: &Stats) {
        let mut st = lock(&self.state);
        let current = st
            .parts
            .get(&p.partition)
            .is_some_and(|t| t.epoch == p.epoch);
        if current {
            p.redelivered = true;
            stats.record_redelivered(1);
            st.requeued.insert((p.partition, p.offset), p);
            drop(st);
            self.notify.notify_waiters();
        }
    }
}

/// The consumer context: commits before partitions are taken away, tracks assignments.
struct Context {
    shared: Arc<Shared>,
}

impl ClientContext for Context {}

impl ConsumerContext for Context {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let commits = self.shared.revoke(tpl);
            // A lost assignment (this member's session expired: the broker already gave
            // the partitions to the group again) cannot commit; librdkafka would refuse or
            // hold the commit until a coordinator answers, blocking this callback.
            if consumer.assignment_lost() {
                tracing::info!(topic = %self.shared.topic, "the consumer's session expired; rejoining (what was not committed is read again)");
            } else if commits.count() > 0 {
                if let Err(e) = consumer.commit(&commits, CommitMode::Sync) {
                    tracing::warn!(topic = %self.shared.topic, error = %e, "commit before a rebalance failed; the new owner may read some messages again");
                }
            }
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let mut fetched_before = HashMap::new();
            match consumer.committed_offsets((*tpl).clone(), Duration::from_secs(5)) {
                Ok(committed) => {
                    for e in committed.elements() {
                        // A committed offset: the partition had an owner before.
                        if let Offset::Offset(c) = e.offset() {
                            if c >= 0 {
                                if let Ok((_, high)) = consumer.fetch_watermarks(
                                    &self.shared.topic,
                                    e.partition(),
                                    Duration::from_secs(5),
                                ) {
                                    fetched_before.insert(e.partition(), high);
                                }
                            }
                        }
                    }
                }
                Err(e) => {
                    tracing::debug!(topic = %self.shared.topic, error = %e, "could not read committed offsets; redelivered flags may be missing");
                }
            }
            self.shared.assign(tpl, &fetched_before);
        }
    }
}

/// The consumer of one normal channel in this instance.
pub(crate) struct NormalConsumer {
    channel: String,
    shared: Arc<Shared>,
    thread: Mutex<Option<Worker>>,
    /// Serialises starting the thread.
    starting: tokio::sync::Mutex<bool>,
}

impl NormalConsumer {
    pub fn new(channel: &str, topic: String) -> Self {
        NormalConsumer {
            channel: channel.to_owned(),
            shared: Arc::new(Shared {
                topic,
                state: Mutex::new(State::default()),
                notify: tokio::sync::Notify::new(),
                room: std::sync::Condvar::new(),
                stop: AtomicBool::new(false),
            }),
            thread: Mutex::new(None),
            starting: tokio::sync::Mutex::new(false),
        }
    }

    /// The channel's topic.
    pub fn topic(&self) -> &str {
        &self.shared.topic
    }

    /// Starts the consumer thread once (the topic must exist).
    pub async fn ensure_started(
        &self,
        cfg: &KafkaConfig,
        client_id: &str,
        stats: &Arc<Stats>,
    ) -> Result<()> {
        let mut started = self.starting.lock().await;
        if *started {
            return Ok(());
        }
        let context = Context {
            shared: self.shared.clone(),
        };
        let consumer: BaseConsumer<Context> = cfg
            .consumer_config(client_id, Some(&self.shared.topic))
            .create_with_context(context)
            .map_err(|e| backend_err("could not create a consumer", e))?;
        consumer.subscribe(&[&self.shared.topic]).map_err(|e| {
            backend_err(
                &format!("could not subscribe to {:?}", self.shared.topic),
                e,
            )
        })?;
        let shared = self.shared.clone();
        let stats = stats.clone();
        let prefetch = cfg.prefetch;
        let interval = cfg.commit_interval;
        let handle = Worker::spawn(format!("chanlayer-kafka {}", self.channel), move || {
            run(consumer, shared, stats, prefetch, interval)
        })
        .map_err(|e| Error::backend(BACKEND, "could not start a consumer thread", e))?;
        *lock(&self.thread) = Some(handle);
        *started = true;
        Ok(())
    }

    /// Stops the thread (committing what is settled) and waits for it. What is buffered
    /// stays uncommitted at the broker.
    ///
    /// Waits at most `bound`: with the broker away, librdkafka's final commit and group
    /// leave can take long; the thread then finishes in the background.
    pub async fn stop(&self, bound: Duration) {
        self.shared.stop.store(true, Ordering::Relaxed);
        let handle = lock(&self.thread).take();
        if let Some(h) = handle {
            if !h.join_within(bound).await {
                tracing::warn!(topic = %self.shared.topic, "the consumer did not stop within {bound:?} (broker away?); it finishes in the background");
            }
        }
    }

    /// Stops without waiting (from `Drop`).
    pub fn signal_stop(&self) {
        self.shared.stop.store(true, Ordering::Relaxed);
    }

    fn take_now(&self) -> Result<Option<Pending>> {
        let mut st = lock(&self.shared.state);
        if let Some(p) = st.take() {
            self.shared.room.notify_one();
            return Ok(Some(p));
        }
        if let Some(why) = &st.failed {
            return Err(Error::Backend {
                backend: BACKEND,
                message: format!("the consumer of {:?} stopped: {why}", self.shared.topic),
                source: None,
            });
        }
        Ok(None)
    }

    /// Waits for the next message. Cancellation-safe: a message leaves the buffer only in
    /// the step that returns it.
    pub async fn take(&self, closed: &CloseSignal) -> Result<Pending> {
        loop {
            let notified = self.shared.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            closed.check()?;
            if let Some(p) = self.take_now()? {
                return Ok(p);
            }
            tokio::select! {
                _ = closed.closed() => return Err(Error::Closed),
                _ = &mut notified => {}
            }
        }
    }

    /// Up to `max` messages: waits up to `timeout` for the first, then takes what is there.
    pub async fn take_batch(
        &self,
        closed: &CloseSignal,
        max: usize,
        timeout: Duration,
    ) -> Result<Vec<Pending>> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let first = match tokio::time::timeout(timeout, self.take(closed)).await {
            Ok(r) => r?,
            Err(_) => return Ok(Vec::new()),
        };
        let mut out = vec![first];
        let mut st = lock(&self.shared.state);
        while out.len() < max {
            match st.take() {
                Some(p) => out.push(p),
                None => break,
            }
        }
        self.shared.room.notify_one();
        Ok(out)
    }

    /// Settles `p` now and returns its envelope (`receive`'s auto-ack).
    pub fn auto_ack(&self, p: Pending) -> Envelope {
        self.shared.settle(p.partition, p.offset, p.epoch);
        p.envelope
    }

    /// A [`Delivery`] whose ack settles the offset and whose nack requeues locally.
    pub fn delivery(&self, p: Pending, stats: Arc<Stats>, closed: Arc<CloseSignal>) -> Delivery {
        let info = DeliveryInfo {
            id: p.envelope.id,
            channel: self.channel.clone(),
            redelivered: p.redelivered,
            sent_at_ms: p.envelope.sent_at_ms,
        };
        let message = p.envelope.clone().into_message();
        let acker = KafkaAcker {
            shared: self.shared.clone(),
            pending: Some(p),
            stats,
            closed,
        };
        Delivery::new(message, info, AckHandle::new(Box::new(acker)))
    }
}

/// The consumer thread: polls, buffers, pauses above `prefetch`, commits.
fn run(
    consumer: BaseConsumer<Context>,
    shared: Arc<Shared>,
    stats: Arc<Stats>,
    prefetch: usize,
    interval: Duration,
) {
    let source = format!("kafka topic {}", shared.topic);
    let mut last_commit = Instant::now();
    while !shared.stop.load(Ordering::Relaxed) {
        // Flow control: with `prefetch` messages held, take no more from librdkafka (its
        // own fetch queue fills and it stops fetching; heartbeats go on in its background
        // thread) until a receiver makes room, or a second has passed: then one poll, so
        // a rebalance waiting on this member is served (at most one more message held per
        // second while nobody receives). Not pause/resume: resuming fetches from the
        // middle of a record batch, which some Kafka-compatible brokers (tansu 0.6) answer
        // from the next batch, skipping the rest of that one; Apache Kafka does not, but
        // this way needs no broker to be exact, and librdkafka's own queue is bounded
        // (`queued.max.messages.kbytes`, settable with `kafka.`).
        let full = {
            let st = lock(&shared.state);
            if st.held() >= prefetch {
                let (st, _) = shared
                    .room
                    .wait_timeout(st, Duration::from_secs(1))
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                st.held() >= prefetch
            } else {
                false
            }
        };
        let polled = consumer.poll(if full {
            Duration::ZERO
        } else {
            Duration::from_millis(50)
        });
        let mut woke = false;
        if let Some(r) = polled {
            match r {
                Ok(m) => {
                    let (p, offset) = (m.partition(), m.offset());
                    let decoded = match m.payload().map(Envelope::decode) {
                        Some(Ok(env)) if env.is_expired_at(now_ms()) => {
                            stats.record_expired(1);
                            None
                        }
                        Some(Ok(env)) => Some(env),
                        Some(Err(e)) => {
                            stats.record_undecodable(&source, &e);
                            None
                        }
                        None => {
                            stats.record_undecodable(&source, &"an empty record");
                            None
                        }
                    };
                    let mut st = lock(&shared.state);
                    let (epoch, redelivered) = match st.parts.get_mut(&p) {
                        Some(t) => {
                            t.next = Some(offset + 1);
                            if decoded.is_some() {
                                t.outstanding.insert(offset);
                            }
                            (t.epoch, offset < t.fetched_before)
                        }
                        // Not (or no longer) ours: the owner reads it.
                        None => continue,
                    };
                    if let Some(envelope) = decoded {
                        st.ready.push_back(Pending {
                            envelope,
                            partition: p,
                            offset,
                            epoch,
                            redelivered,
                        });
                        woke = true;
                    }
                }
                Err(e) if crate::topics::is_fatal(&e) => {
                    tracing::warn!(topic = %shared.topic, error = %e, "consumer refused");
                    lock(&shared.state).failed = Some(e.to_string());
                    shared.notify.notify_waiters();
                }
                Err(e) => {
                    tracing::debug!(topic = %shared.topic, error = %e, "consumer error (librdkafka retries)");
                }
            }
        }
        if woke {
            shared.notify.notify_waiters();
        }
        if last_commit.elapsed() >= interval {
            last_commit = Instant::now();
            let due = lock(&shared.state).due_commits(&shared.topic);
            if let Some(tpl) = due {
                if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
                    tracing::debug!(topic = %shared.topic, error = %e, "offset commit failed; a later one covers it");
                }
            }
        }
    }
    // Stopping: commit what is settled, leave the group (the revoke callback commits too).
    let due = lock(&shared.state).due_commits(&shared.topic);
    if let Some(tpl) = due {
        if let Err(e) = consumer.commit(&tpl, CommitMode::Sync) {
            tracing::debug!(topic = %shared.topic, error = %e, "final offset commit failed");
        }
    }
    consumer.unsubscribe();
    drop(consumer);
    let mut st = lock(&shared.state);
    st.ready.clear();
    st.requeued.clear();
    st.parts.clear();
}

/// Settles a normal-channel delivery.
struct KafkaAcker {
    shared: Arc<Shared>,
    pending: Option<Pending>,
    stats: Arc<Stats>,
    closed: Arc<CloseSignal>,
}

#[async_trait]
impl Acknowledger for KafkaAcker {
    async fn ack(&mut self) -> Result<()> {
        self.closed.check()?;
        if let Some(p) = self.pending.take() {
            self.shared.settle(p.partition, p.offset, p.epoch);
        }
        Ok(())
    }

    async fn nack(&mut self) -> Result<()> {
        if let Some(p) = self.pending.take() {
            self.shared.requeue(p, &self.stats);
        }
        Ok(())
    }
}

impl Drop for KafkaAcker {
    fn drop(&mut self) {
        if let Some(p) = self.pending.take() {
            self.shared.requeue(p, &self.stats);
        }
    }
}
