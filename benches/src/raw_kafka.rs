//! Raw rdkafka, doing what the Kafka layer does on the wire: a `FutureProducer` with the
//! layer's own producer settings ([`KafkaConfig::producer_config`]: idempotent, `acks=all`,
//! `linger.ms=1`), every send awaiting its delivery report, and `BaseConsumer`s with the
//! layer's consumer settings ([`KafkaConfig::consumer_config`]) polled on threads of their
//! own, committing every `commit_interval` when they are in a consumer group.

use std::collections::{HashMap, VecDeque};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use chanlayer_kafka::KafkaConfig;
use futures::stream::{FuturesUnordered, StreamExt};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::{Message as _, Offset, TopicPartitionList};
use tokio::sync::oneshot;

use crate::raw_mpsc::{FanOut, Members};
use crate::{Mode, DEPTH};

/// How long an iteration may wait for its last messages after its last send was
/// acknowledged before the bench gives up with what it knows (instead of hanging).
pub const STALL: Duration = Duration::from_secs(30);
/// How long a consumer thread's `poll` waits, as the layer's consumer threads do.
pub const POLL: Duration = Duration::from_millis(50);
/// Room the layer adds to `max_message_size` for the topics' `max.message.bytes`
/// (chanlayer-kafka's `RECORD_OVERHEAD`).
pub const RECORD_OVERHEAD: usize = 64 * 1024;

/// The brokers: `KAFKA_BOOTSTRAP` (`host:port[,host:port]`) or `127.0.0.1:9092`.
pub fn bootstrap() -> String {
    std::env::var("KAFKA_BOOTSTRAP").unwrap_or_else(|_| "127.0.0.1:9092".to_owned())
}

/// Fails fast, with a clear reason, when nothing listens at the first bootstrap address.
pub fn reachable(bootstrap: &str) -> Result<(), String> {
    let first = bootstrap.split(',').next().unwrap_or(bootstrap).trim();
    let address = if first.rsplit_once(':').is_some() {
        first.to_owned()
    } else {
        format!("{first}:9092")
    };
    let addrs = address
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {address}: {e}"))?;
    for a in addrs {
        if TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok() {
            return Ok(());
        }
    }
    Err(format!(
        "no Kafka broker answers at {address} (set KAFKA_BOOTSTRAP, or start one with scripts/brokers/kafka.sh)"
    ))
}

/// Enqueues one record (no key, as the layer's channel sends) and returns its delivery
/// report future.
pub fn enqueue(producer: &FutureProducer, topic: &str, body: &[u8]) -> DeliveryFuture {
    enqueue_keyed(producer, topic, None, body)
}

/// Enqueues one record with an optional key (a layer's `group_send` keys by group) and
/// returns its delivery report future.
pub fn enqueue_keyed(
    producer: &FutureProducer,
    topic: &str,
    key: Option<&[u8]>,
    body: &[u8],
) -> DeliveryFuture {
    let mut record = FutureRecord::<[u8], [u8]>::to(topic).payload(body);
    if let Some(k) = key {
        record = record.key(k);
    }
    producer
        .send_result(record)
        .map_err(|(e, _)| e)
        .expect("enqueue a record (librdkafka's queue holds far more than DEPTH)")
}

/// Waits for a delivery report and checks that the broker stored the record.
pub async fn delivered(f: DeliveryFuture) {
    f.await
        .expect("the producer is alive")
        .map_err(|(e, _)| e)
        .expect("the broker stored the record");
}

/// Produces `n` copies of `body` to `topic` (with `key`): `seq` awaits each delivery
/// report; `concurrent` keeps DEPTH delivery futures in flight on this task.
pub async fn produce_n(
    producer: &FutureProducer,
    topic: &str,
    key: Option<&[u8]>,
    body: &[u8],
    n: usize,
    mode: Mode,
) {
    match mode {
        Mode::Seq => {
            for _ in 0..n {
                delivered(enqueue_keyed(producer, topic, key, body)).await;
            }
        }
        Mode::Concurrent => {
            let mut window = FuturesUnordered::new();
            for _ in 0..n {
                if window.len() == DEPTH {
                    window.next().await;
                }
                window.push(delivered(enqueue_keyed(producer, topic, key, body)));
            }
            while window.next().await.is_some() {}
        }
    }
}

/// A wait for a [`Counter`]: the running total of messages read to wait for, and what to
/// tell when it is reached.
type Job = (u64, oneshot::Sender<()>);

/// What a [`Counter`]'s threads share.
struct Shared {
    /// Messages read by all the threads.
    received: AtomicU64,
    /// Messages read by each thread.
    per_consumer: Vec<AtomicU64>,
    /// Waits, in the order of their targets.
    waiting: Mutex<VecDeque<Job>>,
    /// Where each message read is copied to (group benches), if anywhere.
    fan_out: Mutex<Option<Arc<Members>>>,
    stop: AtomicBool,
}

impl Shared {
    /// Tells every wait whose target is reached.
    fn wake(&self) {
        let received = self.received.load(Ordering::Acquire);
        let mut waiting = self.waiting.lock().expect("counter lock");
        while waiting
            .front()
            .is_some_and(|(target, _)| *target <= received)
        {
            if let Some((_, done)) = waiting.pop_front() {
                let _ = done.send(());
            }
        }
    }
}

/// Consumers polled on threads of their own (one each) that count what they read
/// together and, in a consumer group, commit the offsets every `commit_interval`
/// (asynchronously, only those that moved), as the layer's normal-channel consumer threads
/// do. Optionally each message read is also copied into N local queues
/// ([`Counter::fan_out_to`]).
pub struct Counter {
    shared: Arc<Shared>,
    /// The running total to wait for next.
    target: Mutex<u64>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

/// A consumer for a [`Counter`], and for a consumer group the topic and the interval of
/// its offset commits.
pub type CounterConsumer = (BaseConsumer, Option<(String, Duration)>);

impl Counter {
    /// One consumer. `commit`: the topic and the interval of the offset commits (a
    /// consumer group).
    pub fn start(
        name: &str,
        consumer: BaseConsumer,
        commit: Option<(String, Duration)>,
    ) -> Counter {
        Counter::start_many(name, vec![(consumer, commit)])
    }

    /// Several consumers (competing readers of one consumer group), counted together.
    pub fn start_many(name: &str, consumers: Vec<CounterConsumer>) -> Counter {
        let shared = Arc::new(Shared {
            received: AtomicU64::new(0),
            per_consumer: consumers.iter().map(|_| AtomicU64::new(0)).collect(),
            waiting: Mutex::new(VecDeque::new()),
            fan_out: Mutex::new(None),
            stop: AtomicBool::new(false),
        });
        let threads = consumers
            .into_iter()
            .enumerate()
            .map(|(i, (consumer, commit))| {
                let shared = shared.clone();
                std::thread::Builder::new()
                    .name(format!("{name} {i}"))
                    .spawn(move || count(i, &consumer, commit.as_ref(), &shared))
                    .expect("start a consumer thread")
            })
            .collect();
        Counter {
            shared,
            target: Mutex::new(0),
            threads: Mutex::new(threads),
        }
    }

    /// Resolves once `n` more messages have been read. Call it before sending them.
    pub fn expect(&self, n: u64) -> oneshot::Receiver<()> {
        let (done, wait) = oneshot::channel();
        {
            let mut target = self.target.lock().expect("counter lock");
            *target += n;
            self.shared
                .waiting
                .lock()
                .expect("counter lock")
                .push_back((*target, done));
        }
        self.shared.wake();
        wait
    }

    /// Messages read so far, by all the consumers.
    pub fn received(&self) -> u64 {
        self.shared.received.load(Ordering::Acquire)
    }

    /// Messages read so far by each consumer.
    pub fn per_consumer(&self) -> Vec<u64> {
        self.shared
            .per_consumer
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }

    /// From now on, a copy of each message read goes to every one of `members` (`None`:
    /// nowhere).
    pub fn fan_out_to(&self, members: Option<Arc<Members>>) {
        *self.shared.fan_out.lock().expect("counter lock") = members;
    }

    /// Stops the threads and waits for them.
    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for t in self.threads.lock().expect("counter lock").drain(..) {
            let _ = t.join();
        }
    }
}

fn count(
    index: usize,
    consumer: &BaseConsumer,
    commit: Option<&(String, Duration)>,
    shared: &Shared,
) {
    // Per partition: the next offset to read, and the last one committed.
    let mut next: HashMap<i32, i64> = HashMap::new();
    let mut committed: HashMap<i32, i64> = HashMap::new();
    let mut last_commit = Instant::now();
    while !shared.stop.load(Ordering::Relaxed) {
        // Errors are transient (librdkafka retries), as in the layer's threads.
        if let Some(Ok(m)) = consumer.poll(POLL) {
            let payload = m.payload().unwrap_or_default();
            std::hint::black_box(payload.len());
            if let Some(members) = shared.fan_out.lock().expect("counter lock").as_ref() {
                members.push(payload);
            }
            if commit.is_some() {
                next.insert(m.partition(), m.offset() + 1);
            }
            shared.per_consumer[index].fetch_add(1, Ordering::Relaxed);
            shared.received.fetch_add(1, Ordering::Release);
        }
        shared.wake();
        if let Some((topic, interval)) = commit {
            if last_commit.elapsed() >= *interval {
                last_commit = Instant::now();
                let mut tpl = TopicPartitionList::new();
                for (p, o) in &next {
                    if committed.get(p) != Some(o) {
                        let _ = tpl.add_partition_offset(topic, *p, Offset::Offset(*o));
                        committed.insert(*p, *o);
                    }
                }
                if tpl.count() > 0 {
                    let _ = consumer.commit(&tpl, CommitMode::Async);
                }
            }
        }
    }
}

/// The raw peer of the round trips: reads `from` (assigned) and produces each message to
/// `to`, waiting for its delivery report, as the layer's responder does.
pub struct Echo {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Echo {
    /// Starts the echo thread; `rt` runs the delivery-report waits.
    pub fn start(
        consumer: BaseConsumer,
        producer: FutureProducer,
        to: String,
        rt: tokio::runtime::Handle,
    ) -> Echo {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("raw echo".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        if let Some(Ok(m)) = consumer.poll(POLL) {
                            let body = m.payload().unwrap_or_default();
                            rt.block_on(delivered(enqueue(&producer, &to, body)));
                        }
                    }
                })
                .expect("start the echo thread")
        };
        Echo {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops the thread and waits for it.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The raw twin of a layer's send+receive bench: [`produce_n`] while the counter's
/// consumer thread(s) count the `n` messages.
pub async fn raw_send_receive(
    producer: &FutureProducer,
    (topic, counter): (&str, &Counter),
    body: &[u8],
    n: usize,
    mode: Mode,
) -> Duration {
    let start = Instant::now();
    let done = counter.expect(n as u64);
    produce_n(producer, topic, None, body, n, mode).await;
    match tokio::time::timeout(STALL, done).await {
        Ok(r) => r.expect("the consumer thread runs"),
        Err(_) => panic!(
            "{topic}: the raw consumer did not read {n} messages {STALL:?} after the last send was acknowledged"
        ),
    }
    start.elapsed()
}

/// The raw twin of a layer's `group_send` to N local members: [`produce_n`] of `m`
/// records keyed `key` to `topic`, whose counter copies each one into the member queues
/// of `fan_out` (see [`Counter::fan_out_to`]), while a drain task takes them.
pub async fn raw_group_send(
    producer: &FutureProducer,
    (topic, key): (&str, &[u8]),
    fan_out: &mut FanOut,
    body: &[u8],
    m: usize,
    mode: Mode,
) -> Duration {
    let start = Instant::now();
    let drain = fan_out.spawn_drain(&tokio::runtime::Handle::current(), m);
    produce_n(producer, topic, Some(key), body, m, mode).await;
    fan_out.finish("raw rdkafka group", drain).await;
    start.elapsed()
}

/// `iters` round trips: one record to `to_b`, whose [`Echo`] thread answers on `replies`'
/// topic.
pub async fn raw_round_trips(
    producer: &FutureProducer,
    (to_b, replies): (&str, &Counter),
    body: &[u8],
    iters: u64,
    latencies: &Mutex<Vec<Duration>>,
) -> Duration {
    let mut each = Vec::with_capacity(usize::try_from(iters).unwrap_or(0));
    let start = Instant::now();
    for _ in 0..iters {
        let t = Instant::now();
        let reply = replies.expect(1);
        delivered(enqueue(producer, to_b, body)).await;
        match tokio::time::timeout(STALL, reply).await {
            Ok(r) => r.expect("the consumer thread runs"),
            Err(_) => panic!("{to_b}: no raw reply within {STALL:?}"),
        }
        each.push(t.elapsed());
    }
    let total = start.elapsed();
    latencies
        .lock()
        .expect("latencies lock")
        .extend_from_slice(&each);
    total
}

/// The raw clients' side of a run: the layer's settings, an admin client, and a random
/// topic prefix.
pub struct RawKafka {
    /// The layer's settings, for the raw clients.
    pub cfg: KafkaConfig,
    /// The layer's `max_message_size`.
    pub max_message_size: usize,
    /// Creates and deletes the raw topics.
    pub admin: AdminClient<DefaultClientContext>,
    /// The run's topic prefix.
    pub prefix: String,
}

impl RawKafka {
    /// An admin client with the layer's settings.
    pub fn new(cfg: KafkaConfig, max_message_size: usize, prefix: String) -> Result<Self, String> {
        let admin = cfg
            .client_config(&format!("{prefix}-admin"))
            .create()
            .map_err(|e| format!("raw rdkafka admin client: {e}"))?;
        Ok(RawKafka {
            cfg,
            max_message_size,
            admin,
            prefix,
        })
    }

    fn admin_options(&self) -> AdminOptions {
        AdminOptions::new()
            .operation_timeout(Some(self.cfg.connection_timeout))
            .request_timeout(Some(self.cfg.connection_timeout))
    }

    /// Creates `topic` as the layer creates its topics (same retention and size limit).
    pub async fn create_topic(&self, topic: &str, partitions: i32) {
        let retention = self.cfg.retention.as_millis().to_string();
        let max_bytes = (self.max_message_size + RECORD_OVERHEAD).to_string();
        let new = NewTopic::new(
            topic,
            partitions,
            TopicReplication::Fixed(self.cfg.replication),
        )
        .set("retention.ms", &retention)
        .set("max.message.bytes", &max_bytes);
        for r in self
            .admin
            .create_topics([&new], &self.admin_options())
            .await
            .expect("create a raw topic")
        {
            r.map_err(|(t, code)| format!("{t}: {code}"))
                .expect("the broker created the raw topic");
        }
    }

    /// A producer with the layer's producer settings.
    pub fn producer(&self, name: &str) -> FutureProducer {
        self.cfg
            .producer_config(&format!("{}-{name}", self.prefix), self.max_message_size)
            .create()
            .expect("create a raw producer")
    }

    /// A consumer of `topic` with the layer's consumer settings: subscribed through consumer
    /// group `topic` (like a normal channel's), or assigned its partition 0 from the start
    /// (like an inbox).
    pub fn consumer(&self, topic: &str, group: bool) -> BaseConsumer {
        let client_id = format!("{}-{topic}", self.prefix);
        let consumer: BaseConsumer = self
            .cfg
            .consumer_config(&client_id, group.then_some(topic))
            .create()
            .expect("create a raw consumer");
        if group {
            consumer.subscribe(&[topic]).expect("subscribe");
        } else {
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(topic, 0, Offset::Beginning)
                .expect("a partition list");
            consumer.assign(&tpl).expect("assign");
        }
        consumer
    }

    /// Deletes `topics` (errors ignored: they go by retention anyway).
    pub async fn delete_topics(&self, topics: &[&str]) {
        let _ = self
            .admin
            .delete_topics(topics, &self.admin_options())
            .await;
    }
}
