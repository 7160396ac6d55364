//! Raw lapin, doing what the AMQP layer does on the wire: publisher confirms on every
//! publish (each awaited), manual acks on normal-channel queues, no acks on inbox-like
//! exclusive queues, the layer's queue arguments and message properties.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Consumer,
    ExchangeKind,
};

use crate::raw_mpsc::FanOut;
use crate::{Mode, DEPTH};

/// The layer's `prefetch`, and raw lapin's `basic_qos`.
pub const PREFETCH: u16 = 100;
/// Channel capacity (the queues' `x-max-length`); above the messages of an iteration, so
/// no send is refused.
pub const CAPACITY: usize = 10_000;
/// The layer's default `inbox_capacity`: the `x-max-length` of its inbox queue.
pub const INBOX_CAPACITY: i64 = 10_000;
/// `queue_expires` of the layer, `x-expires` of the raw queues.
pub const QUEUE_EXPIRES: Duration = Duration::from_secs(60);

/// The broker: `CHANLAYER_AMQP_URL` or `amqp://guest:guest@127.0.0.1:5672/%2f`.
pub fn broker_url() -> String {
    std::env::var("CHANLAYER_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// One connection with a publish channel in confirm mode (as the layer has).
pub struct Raw {
    /// The connection.
    pub conn: Connection,
    /// The channel every publish goes through, in confirm mode.
    pub publish: Channel,
}

/// A queue and its consumer, kept across iterations (as the layer keeps its consumers),
/// and how messages are published to it.
pub struct RawQueue {
    /// The queue's name.
    pub name: String,
    /// The exchange publishes go to (`""`: the default exchange).
    pub exchange: String,
    /// The routing key of publishes (the queue's name through the default exchange).
    pub routing_key: String,
    /// Publish `mandatory` (a message no queue takes comes back).
    pub mandatory: bool,
    /// Manual acks (normal channel) or none (process-local, group inbox).
    pub manual_ack: bool,
    /// The properties every publish carries (TTL, delivery mode).
    pub properties: BasicProperties,
    /// The consumer (behind a lock: one reader at a time).
    pub consumer: tokio::sync::Mutex<Consumer>,
    _channel: Channel,
}

fn long(n: i64) -> AMQPValue {
    AMQPValue::LongLongInt(n)
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The broker-side message TTL the layer sets: `expiry` plus a grace of `expiry` clamped to
/// 10 s ..= 1 h (chanlayer-amqp's `topology::broker_ttl`).
pub fn broker_ttl(expiry: Duration) -> Duration {
    expiry.saturating_add(expiry.clamp(Duration::from_secs(10), Duration::from_secs(3600)))
}

/// Connects raw lapin to `base` (its query, the layer's options, left out), within 5 s.
/// `what` names the connection in the error.
pub async fn connect(base: &str, what: &str) -> Result<Arc<Raw>, String> {
    let uri = base.split('?').next().unwrap_or(base);
    match tokio::time::timeout(Duration::from_secs(5), Raw::connect(uri)).await {
        Ok(Ok(r)) => Ok(Arc::new(r)),
        Ok(Err(e)) => Err(format!("raw lapin ({what}): {e}")),
        Err(_) => Err(format!("raw lapin ({what}): connect timed out after 5s")),
    }
}

impl Raw {
    /// A connection and its publish channel in confirm mode.
    pub async fn connect(uri: &str) -> lapin::Result<Raw> {
        let conn = Connection::connect(uri, ConnectionProperties::default()).await?;
        let publish = conn.create_channel().await?;
        publish
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Raw { conn, publish })
    }

    /// `normal`: a durable queue with the arguments of a layer's normal-channel queue,
    /// persistent messages, a consumer with manual acks and the layer's prefetch. Otherwise an
    /// exclusive queue with the arguments of a layer's inbox, transient messages, a consumer
    /// without acks.
    pub async fn queue(
        &self,
        name: String,
        normal: bool,
        expiry: Duration,
    ) -> lapin::Result<RawQueue> {
        let ttl = broker_ttl(expiry);
        let mut args = FieldTable::default();
        args.insert(
            ShortString::from("x-overflow"),
            AMQPValue::LongString(LongString::from("reject-publish")),
        );
        args.insert(ShortString::from("x-expires"), long(millis(QUEUE_EXPIRES)));
        if normal {
            args.insert(ShortString::from("x-max-length"), long(CAPACITY as i64));
        } else {
            args.insert(ShortString::from("x-max-length"), long(INBOX_CAPACITY));
            args.insert(ShortString::from("x-message-ttl"), long(millis(ttl)));
        }
        let channel = self.conn.create_channel().await?;
        channel
            .queue_declare(
                ShortString::from(name.as_str()),
                QueueDeclareOptions {
                    durable: normal,
                    exclusive: !normal,
                    ..QueueDeclareOptions::default()
                },
                args,
            )
            .await?;
        if normal {
            channel
                .basic_qos(PREFETCH, BasicQosOptions::default())
                .await?;
        }
        let consumer = channel
            .basic_consume(
                ShortString::from(name.as_str()),
                ShortString::from(format!("{name}-consumer")),
                BasicConsumeOptions {
                    no_ack: !normal,
                    exclusive: !normal,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        let properties = BasicProperties::default()
            .with_expiration(ShortString::from(millis(ttl).to_string()))
            .with_delivery_mode(if normal { 2 } else { 1 });
        Ok(RawQueue {
            routing_key: name.clone(),
            name,
            exchange: String::new(),
            mandatory: true,
            manual_ack: normal,
            properties,
            consumer: tokio::sync::Mutex::new(consumer),
            _channel: channel,
        })
    }

    /// One more consumer of the normal-channel queue `q` (its own channel, the layer's
    /// prefetch, manual acks): a competing reader, as a second layer instance has.
    pub async fn competing_consumer(&self, q: &RawQueue, tag: &str) -> lapin::Result<RawQueue> {
        let channel = self.conn.create_channel().await?;
        channel
            .basic_qos(PREFETCH, BasicQosOptions::default())
            .await?;
        let consumer = channel
            .basic_consume(
                ShortString::from(q.name.as_str()),
                ShortString::from(format!("{}-{tag}", q.name)),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(RawQueue {
            name: q.name.clone(),
            exchange: q.exchange.clone(),
            routing_key: q.routing_key.clone(),
            mandatory: q.mandatory,
            manual_ack: true,
            properties: q.properties.clone(),
            consumer: tokio::sync::Mutex::new(consumer),
            _channel: channel,
        })
    }

    /// What a layer's `group_send` to a process-local member goes through: an exclusive
    /// inbox-like queue `name` (consumed without acks) bound to the direct `exchange`
    /// (declared durable, as the layer's groups exchange) with `routing_key`; publishes go
    /// to the exchange, not mandatory, persistent, as the layer's `group_send`.
    pub async fn group_queue(
        &self,
        name: String,
        exchange: &str,
        routing_key: &str,
        expiry: Duration,
    ) -> lapin::Result<RawQueue> {
        let mut q = self.queue(name, false, expiry).await?;
        let admin = self.conn.create_channel().await?;
        admin
            .exchange_declare(
                ShortString::from(exchange),
                ExchangeKind::Direct,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        admin
            .queue_bind(
                ShortString::from(q.name.as_str()),
                ShortString::from(exchange),
                ShortString::from(routing_key),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let _ = admin.close(200, ShortString::from("bound")).await;
        q.exchange = exchange.to_owned();
        q.routing_key = routing_key.to_owned();
        q.mandatory = false;
        q.properties = q.properties.with_delivery_mode(2);
        Ok(q)
    }
}

/// Publishes to `q` (its exchange and routing key) and returns the confirm to await.
pub async fn raw_publish(publish: &Channel, q: &RawQueue, body: &[u8]) -> lapin::PublisherConfirm {
    publish
        .basic_publish(
            ShortString::from(q.exchange.as_str()),
            ShortString::from(q.routing_key.as_str()),
            BasicPublishOptions {
                mandatory: q.mandatory,
                ..BasicPublishOptions::default()
            },
            body,
            q.properties.clone(),
        )
        .await
        .expect("publish")
}

/// What the layer checks on every confirm: not nacked (queue full), not returned (no queue).
pub fn assert_stored(c: lapin::Result<Confirmation>) {
    let c = c.expect("confirm");
    let stored = !c.is_nack() && c.take_message().is_none();
    assert!(stored, "the broker refused or returned a message");
}

/// Takes one delivery, acking it if the queue is consumed with manual acks; returns the
/// size of its body.
pub async fn raw_take(q: &RawQueue, consumer: &mut Consumer) -> usize {
    raw_take_body(q, consumer).await.len()
}

async fn raw_take_body(q: &RawQueue, consumer: &mut Consumer) -> Vec<u8> {
    let d = consumer
        .next()
        .await
        .expect("the consumer ended")
        .expect("delivery");
    if q.manual_ack {
        d.acker.ack(BasicAckOptions::default()).await.expect("ack");
    }
    d.data
}

/// Publishes `n` copies of `body` to `q`: `seq` awaits each confirm; `concurrent` keeps
/// DEPTH publish-and-confirm futures in flight on this task. (Awaiting each
/// `basic_publish`, which resolves once lapin has written the frames, before queueing its
/// confirm would serialise the writes: measured at about half the throughput.)
pub async fn publish_n(publish: &Channel, q: &RawQueue, body: &[u8], n: usize, mode: Mode) {
    match mode {
        Mode::Seq => {
            for _ in 0..n {
                assert_stored(raw_publish(publish, q, body).await.await);
            }
        }
        Mode::Concurrent => {
            let mut window = FuturesUnordered::new();
            for _ in 0..n {
                if window.len() == DEPTH {
                    window.next().await;
                }
                window.push(async { assert_stored(raw_publish(publish, q, body).await.await) });
            }
            while window.next().await.is_some() {}
        }
    }
}

/// The raw twin of a layer's send+receive bench: [`publish_n`] while one receiver task
/// takes the `n` messages.
pub async fn raw_send_receive(
    publish: Channel,
    q: Arc<RawQueue>,
    body: Arc<Vec<u8>>,
    n: usize,
    mode: Mode,
) -> Duration {
    let start = Instant::now();
    let receiver = {
        let q = q.clone();
        tokio::spawn(async move {
            let mut consumer = q.consumer.lock().await;
            for _ in 0..n {
                std::hint::black_box(raw_take(&q, &mut consumer).await);
            }
        })
    };
    publish_n(&publish, &q, &body, n, mode).await;
    receiver.await.expect("receiver task");
    start.elapsed()
}

/// `n` messages to the normal-channel queue that `consumers` (one queue, several
/// consumers) compete for: [`publish_n`] while one task per consumer takes and acks what
/// it gets, until `n` arrived in all. Panics when they have not within `stall` after the
/// last confirm; returns the time and how many each consumer took.
pub async fn raw_competing(
    publish: Channel,
    consumers: &[Arc<RawQueue>],
    body: Arc<Vec<u8>>,
    n: usize,
    mode: Mode,
    stall: Duration,
) -> (Duration, Vec<u64>) {
    use std::sync::atomic::{AtomicU64, Ordering};
    let start = Instant::now();
    let total = Arc::new(AtomicU64::new(0));
    let done = Arc::new(tokio::sync::Notify::new());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let tasks: Vec<_> = consumers
        .iter()
        .map(|q| {
            let (q, total, done, mut stop) =
                (q.clone(), total.clone(), done.clone(), stop_rx.clone());
            tokio::spawn(async move {
                let mut consumer = q.consumer.lock().await;
                let mut got = 0u64;
                loop {
                    tokio::select! {
                        biased;
                        _ = stop.changed() => return got,
                        d = consumer.next() => {
                            let d = d.expect("the consumer ended").expect("delivery");
                            d.acker.ack(BasicAckOptions::default()).await.expect("ack");
                            std::hint::black_box(d.data.len());
                            got += 1;
                            if total.fetch_add(1, Ordering::Relaxed) + 1 == n as u64 {
                                done.notify_one();
                            }
                        }
                    }
                }
            })
        })
        .collect();
    publish_n(&publish, &consumers[0], &body, n, mode).await;
    if tokio::time::timeout(stall, done.notified()).await.is_err() {
        panic!(
            "raw lapin, competing consumers: {} of {n} messages arrived {stall:?} after the last confirm",
            total.load(Ordering::Relaxed)
        );
    }
    let elapsed = start.elapsed();
    let _ = stop_tx.send(true);
    let mut each = Vec::new();
    for t in tasks {
        each.push(t.await.expect("a consumer task"));
    }
    (elapsed, each)
}

/// The raw twin of a layer's `group_send` to N local members: [`publish_n`] of `m`
/// messages to `q`'s exchange, while a task takes each delivery from `q` and pushes a copy
/// into every member queue of `fan_out`, and a drain task takes them.
pub async fn raw_group_send(
    publish: Channel,
    q: Arc<RawQueue>,
    fan_out: &mut FanOut,
    body: Arc<Vec<u8>>,
    m: usize,
    mode: Mode,
) -> Duration {
    let start = Instant::now();
    let drain = fan_out.spawn_drain(&tokio::runtime::Handle::current(), m);
    let dispatcher = {
        let (q, members) = (q.clone(), fan_out.members());
        tokio::spawn(async move {
            let mut consumer = q.consumer.lock().await;
            for _ in 0..m {
                members.push(&raw_take_body(&q, &mut consumer).await);
            }
        })
    };
    publish_n(&publish, &q, &body, m, mode).await;
    fan_out.finish("raw lapin group", drain).await;
    dispatcher.await.expect("the dispatcher task");
    start.elapsed()
}

/// `iters` round trips over two connections and two exclusive queues: `a` publishes to
/// `to_b`; a responder takes it and publishes it back to `to_a` through `b`.
pub async fn raw_round_trips(
    (a, b): (Arc<Raw>, Arc<Raw>),
    (to_a, to_b): (Arc<RawQueue>, Arc<RawQueue>),
    body: Arc<Vec<u8>>,
    iters: u64,
    latencies: &Mutex<Vec<Duration>>,
) -> Duration {
    let responder = {
        let (to_a, to_b) = (to_a.clone(), to_b.clone());
        tokio::spawn(async move {
            let mut consumer = to_b.consumer.lock().await;
            for _ in 0..iters {
                let d = consumer
                    .next()
                    .await
                    .expect("the consumer ended")
                    .expect("delivery");
                assert_stored(raw_publish(&b.publish, &to_a, &d.data).await.await);
            }
        })
    };
    let mut consumer = to_a.consumer.lock().await;
    let mut each = Vec::with_capacity(iters as usize);
    let start = Instant::now();
    for _ in 0..iters {
        let t = Instant::now();
        assert_stored(raw_publish(&a.publish, &to_b, &body).await.await);
        std::hint::black_box(raw_take(&to_a, &mut consumer).await);
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
