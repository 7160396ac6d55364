//! The consumer thread of one normal channel and its offset bookkeeping (the rules are in
//! the docs of the `normal` module): what is buffered, handed out and settled per
//! partition, the commit points, the rebalance callbacks, and the thread that polls,
//! buffers up to `prefetch`, and commits.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chanlayer_core::toolkit::{async_trait, lock, now_ms, Envelope, Settler, Stats};
use chanlayer_core::{Error, Result};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};

use crate::state::Instance;
use crate::BACKEND;

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
#[derive(Default)]
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
    /// Set while a rebalance takes the partition away: deliveries given back now are not
    /// requeued here (the new owner reads them).
    revoking: bool,
    /// While revoking: outstanding offsets that are not in a receiver's hands (dropped from
    /// the buffer, or given back), so nothing waits for them.
    not_in_hand: BTreeSet<i64>,
}

impl Track {
    /// Whether a receiver still holds a delivery of this partition, unsettled.
    fn in_hand(&self) -> bool {
        self.outstanding
            .iter()
            .any(|o| !self.not_in_hand.contains(o))
    }

    /// The commit point (the lowest outstanding offset, else the next to fetch) if it moved
    /// past the last one committed.
    fn due(&self) -> Option<i64> {
        let point = self.outstanding.first().copied().or(self.next)?;
        self.committed.is_none_or(|c| point > c).then_some(point)
    }
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
        let requeued = self.requeued.pop_first().map(|(_, p)| p);
        requeued.or_else(|| self.ready.pop_front())
    }

    /// The partition `p` came from, while it is still in the assignment `p` came from.
    fn track_of(&mut self, p: &Pending) -> Option<&mut Track> {
        self.parts
            .get_mut(&p.partition)
            .filter(|t| t.epoch == p.epoch)
    }

    fn held(&self) -> usize {
        self.ready.len() + self.requeued.len()
    }

    /// Offsets to commit now: partitions whose commit point moved.
    fn due_commits(&mut self, topic: &str) -> Option<TopicPartitionList> {
        let mut tpl = TopicPartitionList::new();
        for (p, t) in &mut self.parts {
            if let Some(point) = t.due() {
                let _ = tpl.add_partition_offset(topic, *p, Offset::Offset(point));
                t.committed = Some(point);
            }
        }
        (tpl.count() > 0).then_some(tpl)
    }
}

/// What the consumer thread and the receivers share.
#[derive(Default)]
pub(crate) struct Shared {
    /// The channel's topic.
    pub topic: String,
    state: Mutex<State>,
    /// Wakes receivers: something was buffered or requeued, or the consumer failed.
    pub notify: tokio::sync::Notify,
    /// Wakes the consumer thread: a receiver made room in a full buffer.
    room: std::sync::Condvar,
    /// Wakes a rebalance waiting for deliveries in hand: one was settled or given back.
    settled: std::sync::Condvar,
    /// How long a rebalance waits for them.
    revoke_wait: Duration,
    stop: AtomicBool,
}

impl Shared {
    /// An empty buffer for `topic`. When a rebalance takes partitions away, it waits up to
    /// `revoke_wait` for the deliveries receivers hold from them to be acked or nacked, and
    /// commits what was acked: a worker that finishes its message during a rebalance does
    /// not see it done again by the partition's next owner.
    pub fn new(topic: String, revoke_wait: Duration) -> Self {
        Shared {
            topic,
            revoke_wait,
            ..Shared::default()
        }
    }

    /// Tells the consumer thread to stop.
    pub fn signal_stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// The next buffered message, if any; `Err` once the consumer failed (with nothing left).
    pub fn take_now(&self) -> Result<Option<Pending>> {
        let mut st = lock(&self.state);
        if let Some(p) = st.take() {
            self.room.notify_one();
            return Ok(Some(p));
        }
        if let Some(why) = &st.failed {
            let m = format!("the consumer of {:?} stopped: {why}", self.topic);
            return Err(Error::failure(BACKEND, m));
        }
        Ok(None)
    }

    /// Moves buffered messages to `out` until it holds `max`.
    pub fn take_more(&self, out: &mut Vec<Pending>, max: usize) {
        let mut st = lock(&self.state);
        let room = max.saturating_sub(out.len());
        out.extend(std::iter::from_fn(|| st.take()).take(room));
        self.room.notify_one();
    }

    /// The rebalance takes `tpl` away: forget what is buffered from it, wait (up to
    /// `revoke_wait`, not when stopping) for the deliveries receivers hold from it to be
    /// acked or given back, and return its final commit points. What is still in hand then,
    /// or was given back, is read again by the new owner.
    fn revoke(&self, tpl: &TopicPartitionList) -> TopicPartitionList {
        let mut st = lock(&self.state);
        let revoked: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
        let State {
            ready,
            requeued,
            parts,
            ..
        } = &mut *st;
        for p in &revoked {
            let Some(t) = parts.get_mut(p) else { continue };
            t.revoking = true;
            let held = ready.iter().map(|m| (m.partition, m.offset));
            let held = held
                .chain(requeued.keys().copied())
                .filter(|(mp, _)| mp == p);
            t.not_in_hand.extend(held.map(|(_, o)| o));
        }
        ready.retain(|m| !revoked.contains(&m.partition));
        requeued.retain(|(mp, _), _| !revoked.contains(mp));
        let in_hand = |st: &mut State| {
            let held = |p| st.parts.get(p).is_some_and(Track::in_hand);
            revoked.iter().any(held) && !self.stop.load(Ordering::Relaxed)
        };
        let (mut st, waited) = self
            .settled
            .wait_timeout_while(st, self.revoke_wait, in_hand)
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if waited.timed_out() {
            tracing::warn!(topic = %self.topic, "a rebalance took partitions while deliveries from them were still unacked after {:?}; the new owner delivers those again", self.revoke_wait);
        }
        let mut out = TopicPartitionList::new();
        for p in revoked {
            if let Some(point) = st.parts.remove(&p).and_then(|t| t.due()) {
                let _ = out.add_partition_offset(&self.topic, p, Offset::Offset(point));
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
            let track = Track {
                epoch: st.epochs,
                fetched_before: fetched_before.get(&e.partition()).copied().unwrap_or(0),
                ..Track::default()
            };
            st.parts.insert(e.partition(), track);
        }
    }

    /// Settles a delivery: its offset no longer holds the commit point back.
    pub fn mark_settled(&self, p: &Pending) {
        let mut st = lock(&self.state);
        if let Some(t) = st.track_of(p) {
            t.outstanding.remove(&p.offset);
            if t.revoking {
                self.settled.notify_all();
            }
        }
    }
}

#[async_trait]
impl Settler for Shared {
    type Pending = Pending;

    async fn settle(&self, p: Pending) -> Result<()> {
        self.mark_settled(&p);
        Ok(())
    }

    /// Puts an unsettled delivery back at the head, unless its partition moved (then the
    /// new owner reads it from the broker).
    fn requeue(&self, mut p: Pending, stats: &Stats) {
        let mut st = lock(&self.state);
        let Some(t) = st.track_of(&p) else { return };
        if t.revoking {
            // The partition is going: its next owner delivers it again.
            t.not_in_hand.insert(p.offset);
            self.settled.notify_all();
            return;
        }
        p.redelivered = true;
        stats.record_redelivered(1);
        st.requeued.insert((p.partition, p.offset), p);
        drop(st);
        self.notify.notify_waiters();
    }
}

/// The consumer context of the consumer that fills its [`Shared`]: commits before
/// partitions are taken away, tracks assignments.
pub(crate) struct Context(pub Arc<Shared>);

impl ClientContext for Context {}

impl ConsumerContext for Context {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let commits = self.0.revoke(tpl);
            // A lost assignment (this member's session expired: the broker already gave
            // the partitions to the group again) cannot commit; librdkafka would refuse or
            // hold the commit until a coordinator answers, blocking this callback.
            if consumer.assignment_lost() {
                tracing::info!(topic = %self.0.topic, "the consumer's session expired; rejoining (what was not committed is read again)");
            } else if commits.count() > 0 {
                if let Err(e) = consumer.commit(&commits, CommitMode::Sync) {
                    tracing::warn!(topic = %self.0.topic, error = %e, "commit before a rebalance failed; the new owner may read some messages again");
                }
            }
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let wait = Duration::from_secs(5);
            let committed = consumer.committed_offsets((*tpl).clone(), wait);
            if let Err(e) = &committed {
                tracing::debug!(topic = %self.0.topic, error = %e, "could not read committed offsets; redelivered flags may be missing");
            }
            let fetched_before = (committed.iter().flat_map(|c| c.elements()))
                // A committed offset: the partition had an owner before.
                .filter(|e| matches!(e.offset(), Offset::Offset(c) if c >= 0))
                .filter_map(|e| {
                    let p = e.partition();
                    let (_, high) = consumer.fetch_watermarks(&self.0.topic, p, wait).ok()?;
                    Some((p, high))
                })
                .collect();
            self.0.assign(tpl, &fetched_before);
        }
    }
}

/// The consumer thread: polls, buffers up to `prefetch`, commits. Decoding goes through
/// core's [`Inbound`] (bytes that are not an envelope are counted there); expired messages
/// are dropped (and counted) before they are buffered. `instance` gives the settings
/// (`prefetch`, `commit_interval`) and the ingest path.
///
/// [`Inbound`]: chanlayer_core::toolkit::Inbound
pub(crate) fn run(consumer: BaseConsumer<Context>, shared: Arc<Shared>, instance: Arc<Instance>) {
    let (inbound, prefetch) = (&instance.inbound, instance.cfg.prefetch);
    let stats = inbound.stats();
    let source = format!("kafka topic {}", shared.topic);
    let commit = |mode| {
        let due = lock(&shared.state).due_commits(&shared.topic);
        if let Some(tpl) = due {
            if let Err(e) = consumer.commit(&tpl, mode) {
                tracing::debug!(topic = %shared.topic, error = %e, "offset commit failed; a later one covers it");
            }
        }
    };
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
        let held = lock(&shared.state);
        let full = shared
            .room
            .wait_timeout_while(held, Duration::from_secs(1), |st| st.held() >= prefetch)
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .1
            .timed_out();
        match consumer.poll(Duration::from_millis(if full { 0 } else { 50 })) {
            Some(Ok(m)) => {
                let (p, offset) = (m.partition(), m.offset());
                let decoded = match inbound.decode(m.payload().unwrap_or_default(), &source) {
                    Some(env) if env.is_expired_at(now_ms()) => {
                        stats.record_expired(1);
                        None
                    }
                    decoded => decoded,
                };
                let mut st = lock(&shared.state);
                // Not (or no longer) ours: the owner reads it.
                let Some(t) = st.parts.get_mut(&p) else {
                    continue;
                };
                t.next = Some(offset + 1);
                if let Some(envelope) = decoded {
                    t.outstanding.insert(offset);
                    let (epoch, redelivered) = (t.epoch, offset < t.fetched_before);
                    st.ready.push_back(Pending {
                        envelope,
                        partition: p,
                        offset,
                        epoch,
                        redelivered,
                    });
                    drop(st);
                    shared.notify.notify_waiters();
                }
            }
            Some(Err(e)) if crate::topics::is_fatal(&e) => {
                tracing::warn!(topic = %shared.topic, error = %e, "consumer refused");
                lock(&shared.state).failed = Some(e.to_string());
                shared.notify.notify_waiters();
            }
            Some(Err(e)) => {
                tracing::debug!(topic = %shared.topic, error = %e, "consumer error (librdkafka retries)");
            }
            None => {}
        }
        if last_commit.elapsed() >= instance.cfg.commit_interval {
            last_commit = Instant::now();
            commit(CommitMode::Async);
        }
    }
    // Stopping: commit what is settled, leave the group (the revoke callback commits too).
    commit(CommitMode::Sync);
    consumer.unsubscribe();
    drop(consumer);
    let mut st = lock(&shared.state);
    st.ready.clear();
    st.requeued.clear();
    st.parts.clear();
}
