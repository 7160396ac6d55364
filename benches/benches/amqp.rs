//! The AMQP backend beside raw lapin doing the same work on the same broker, in one run.
//!
//! - `amqp_send_receive/{layer_normal,raw_lapin}/{seq,concurrent}/{64,1024}`: N messages
//!   through a normal channel (a durable queue, persistent messages, publisher confirms,
//!   manual acks, prefetch 100), one receiver task beside the sender(s). `seq`: one sender
//!   that awaits each confirm before the next publish; `concurrent`: 64 sends in flight.
//! - `amqp_send_receive/{layer_local,raw_lapin_local}/...`: the same through a process-local
//!   channel (an exclusive queue consumed without acks, transient messages).
//! - `amqp_round_trip/{layer,raw_lapin}`: one message to the other side, which replies; the
//!   time of one iteration is one round trip.
//!
//! The broker is `CHANLAYER_AMQP_URL` or `amqp://guest:guest@127.0.0.1:5672/%2f`; when it is
//! unreachable the benches print why and are skipped. Every queue has a random name and
//! expires a minute after its last use.
//!
//! ```text
//! cargo bench -p chanlayer-benches --bench amqp              # full run, about 2 minutes
//! cargo test -p chanlayer-benches --bench amqp               # each bench once (CI)
//! ```

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chanlayer_amqp::AmqpLayer;
use chanlayer_core::{ChannelLayer, Codec, LayerConfig, Message};
use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use futures::stream::{FuturesUnordered, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Consumer};

/// Messages per measured iteration of the throughput benches (full run).
const N: usize = 2_000;
/// Messages per iteration in test mode (`cargo test`), where each bench runs once.
const N_TEST: usize = 50;
/// Sends in flight in the `concurrent` mode, for the layer and for raw lapin alike.
const DEPTH: usize = 64;
/// The layer's `prefetch`, and raw lapin's `basic_qos`.
const PREFETCH: u16 = 100;
/// Channel capacity (the queues' `x-max-length`); above N, so no send is refused.
const CAPACITY: usize = 10_000;
/// The layer's default `inbox_capacity`: the `x-max-length` of its inbox queue.
const INBOX_CAPACITY: i64 = 10_000;
/// `queue_expires` of the layer, `x-expires` of the raw queues.
const QUEUE_EXPIRES: Duration = Duration::from_secs(60);
const SIZES: [usize; 2] = [64, 1024];

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime builds")
}

fn broker_url() -> String {
    std::env::var("CHANLAYER_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// `cargo bench` passes `--bench`; `cargo test` runs each bench once without it.
fn bench_mode() -> bool {
    std::env::args().any(|a| a == "--bench")
}

#[derive(Clone, Copy)]
enum Mode {
    /// One sender awaiting each confirm before the next publish.
    Seq,
    /// DEPTH sends in flight.
    Concurrent,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Seq => "seq",
            Mode::Concurrent => "concurrent",
        }
    }
}

fn message(body: &[u8]) -> Message {
    Message::new("bench", Codec::Bincode, body.to_vec())
}

// ---------------------------------------------------------------------------------------
// The layer.

async fn connect_layer(base: &str, prefix: &str) -> chanlayer_core::Result<Arc<AmqpLayer>> {
    let sep = if base.contains('?') { '&' } else { '?' };
    // One shared groups exchange for every run (the default, `{prefix}.groups`, is durable
    // and would stay behind once per random prefix).
    let url = format!(
        "{base}{sep}prefix={prefix}&groups_exchange=chanlayer-bench.groups&queue_expires={}s&capacity={CAPACITY}&prefetch={PREFETCH}&connection_timeout=5s",
        QUEUE_EXPIRES.as_secs()
    );
    let config = LayerConfig::from_url(&url)?;
    Ok(Arc::new(AmqpLayer::connect(&config).await?))
}

/// `n` messages to `channel` (seq or DEPTH in flight) while a receiver task takes them.
async fn layer_send_receive(
    layer: Arc<AmqpLayer>,
    channel: Arc<str>,
    body: Arc<Vec<u8>>,
    n: usize,
    mode: Mode,
) -> Duration {
    let start = Instant::now();
    let receiver = {
        let (layer, channel) = (layer.clone(), channel.clone());
        tokio::spawn(async move {
            for _ in 0..n {
                let m = layer.receive(&channel).await.expect("receive");
                std::hint::black_box(m.body().len());
            }
        })
    };
    match mode {
        Mode::Seq => {
            for _ in 0..n {
                layer.send(&channel, message(&body)).await.expect("send");
            }
        }
        Mode::Concurrent => {
            let senders = (0..DEPTH).map(|i| {
                let (layer, channel, body) = (layer.clone(), channel.clone(), body.clone());
                let share = n / DEPTH + usize::from(i < n % DEPTH);
                tokio::spawn(async move {
                    for _ in 0..share {
                        layer.send(&channel, message(&body)).await.expect("send");
                    }
                })
            });
            for r in futures::future::join_all(senders).await {
                r.expect("sender task");
            }
        }
    }
    receiver.await.expect("receiver task");
    start.elapsed()
}

/// `iters` round trips: `a` sends to `to_b`, `b` receives and sends it back to `to_a`.
async fn layer_round_trips(
    (a, b): (Arc<AmqpLayer>, Arc<AmqpLayer>),
    (to_a, to_b): (Arc<str>, Arc<str>),
    body: Arc<Vec<u8>>,
    iters: u64,
    latencies: &Mutex<Vec<Duration>>,
) -> Duration {
    let responder = {
        let (to_a, to_b) = (to_a.clone(), to_b.clone());
        tokio::spawn(async move {
            for _ in 0..iters {
                let m = b.receive(&to_b).await.expect("receive (responder)");
                b.send(&to_a, m).await.expect("send (responder)");
            }
        })
    };
    let mut each = Vec::with_capacity(iters as usize);
    let start = Instant::now();
    for _ in 0..iters {
        let t = Instant::now();
        a.send(&to_b, message(&body)).await.expect("send");
        let m = a.receive(&to_a).await.expect("receive");
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

// ---------------------------------------------------------------------------------------
// Raw lapin, doing what the layer does on the wire.

/// One connection with a publish channel in confirm mode (as the layer has).
struct Raw {
    conn: Connection,
    publish: Channel,
}

/// A queue and its consumer, kept across iterations (as the layer keeps its consumers).
struct RawQueue {
    name: String,
    /// Manual acks (normal channel) or none (process-local).
    manual_ack: bool,
    properties: BasicProperties,
    consumer: tokio::sync::Mutex<Consumer>,
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
fn broker_ttl(expiry: Duration) -> Duration {
    expiry.saturating_add(expiry.clamp(Duration::from_secs(10), Duration::from_secs(3600)))
}

impl Raw {
    async fn connect(uri: &str) -> lapin::Result<Raw> {
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
    async fn queue(&self, name: String, normal: bool, expiry: Duration) -> lapin::Result<RawQueue> {
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
            name,
            manual_ack: normal,
            properties,
            consumer: tokio::sync::Mutex::new(consumer),
            _channel: channel,
        })
    }
}

/// Publishes through the default exchange, mandatory, and returns the confirm to await.
async fn raw_publish(publish: &Channel, q: &RawQueue, body: &[u8]) -> lapin::PublisherConfirm {
    publish
        .basic_publish(
            ShortString::from(""),
            ShortString::from(q.name.as_str()),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            body,
            q.properties.clone(),
        )
        .await
        .expect("publish")
}

/// What the layer checks on every confirm: not nacked (queue full), not returned (no queue).
fn assert_stored(c: lapin::Result<Confirmation>) {
    let c = c.expect("confirm");
    let stored = !c.is_nack() && c.take_message().is_none();
    assert!(stored, "the broker refused or returned a message");
}

/// Takes one delivery, acking it if the queue is consumed with manual acks.
async fn raw_take(q: &RawQueue, consumer: &mut Consumer) -> usize {
    let d = consumer
        .next()
        .await
        .expect("the consumer ended")
        .expect("delivery");
    if q.manual_ack {
        d.acker.ack(BasicAckOptions::default()).await.expect("ack");
    }
    d.data.len()
}

/// The raw twin of [`layer_send_receive`]: `seq` awaits each confirm; `concurrent` keeps
/// DEPTH publish-and-confirm futures in flight on one task. (Awaiting each `basic_publish`,
/// which resolves once lapin has written the frames, before queueing its confirm would
/// serialise the writes: measured at about half the throughput.)
async fn raw_send_receive(
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
    match mode {
        Mode::Seq => {
            for _ in 0..n {
                assert_stored(raw_publish(&publish, &q, &body).await.await);
            }
        }
        Mode::Concurrent => {
            let mut window = FuturesUnordered::new();
            for _ in 0..n {
                if window.len() == DEPTH {
                    window.next().await;
                }
                window.push(async { assert_stored(raw_publish(&publish, &q, &body).await.await) });
            }
            while window.next().await.is_some() {}
        }
    }
    receiver.await.expect("receiver task");
    start.elapsed()
}

/// The raw twin of [`layer_round_trips`], over two connections and two exclusive queues.
async fn raw_round_trips(
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

// ---------------------------------------------------------------------------------------
// The benches.

/// Everything one run uses on the broker.
struct Setup {
    /// Sender and receiver of the throughput benches.
    layer: Arc<AmqpLayer>,
    /// The other side of the layer's round trips.
    peer: Arc<AmqpLayer>,
    raw: Arc<Raw>,
    raw_peer: Arc<Raw>,
    prefix: String,
}

async fn setup() -> Result<Setup, String> {
    let base = broker_url();
    let prefix = format!(
        "chanlayer-bench-{}",
        chanlayer_core::names::new_instance_id()
    );
    let layer = connect_layer(&base, &prefix)
        .await
        .map_err(|e| e.to_string())?;
    let peer = connect_layer(&base, &prefix)
        .await
        .map_err(|e| e.to_string())?;
    let raw_uri = base.split('?').next().unwrap_or(&base);
    let raw = |what: &'static str| async move {
        match tokio::time::timeout(Duration::from_secs(5), Raw::connect(raw_uri)).await {
            Ok(Ok(r)) => Ok(Arc::new(r)),
            Ok(Err(e)) => Err(format!("raw lapin ({what}): {e}")),
            Err(_) => Err(format!("raw lapin ({what}): connect timed out after 5s")),
        }
    };
    Ok(Setup {
        layer,
        peer,
        raw: raw("sender").await?,
        raw_peer: raw("peer").await?,
        prefix,
    })
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn report_latencies(name: &str, latencies: &Mutex<Vec<Duration>>) {
    let mut v = std::mem::take(&mut *latencies.lock().expect("latencies lock"));
    if v.len() < 100 {
        return;
    }
    v.sort_unstable();
    println!(
        "{name}: {} round trips, p50 {:.0} µs, p90 {:.0} µs, p99 {:.0} µs, max {:.0} µs",
        v.len(),
        percentile(&v, 0.50).as_secs_f64() * 1e6,
        percentile(&v, 0.90).as_secs_f64() * 1e6,
        percentile(&v, 0.99).as_secs_f64() * 1e6,
        percentile(&v, 1.0).as_secs_f64() * 1e6,
    );
}

fn amqp(c: &mut Criterion) {
    let rt = runtime();
    let s = match rt.block_on(setup()) {
        Ok(s) => s,
        Err(why) => {
            // `why` names the broker without the password.
            println!("AMQP benches skipped: {why}");
            return;
        }
    };
    let n = if bench_mode() { N } else { N_TEST };
    let expiry = s.layer.options().expiry;
    let normal_channel: Arc<str> = Arc::from("bench.normal");
    let local_channel: Arc<str> = rt
        .block_on(s.layer.new_channel("bench"))
        .expect("new_channel")
        .into();
    let raw_normal = Arc::new(
        rt.block_on(
            s.raw
                .queue(format!("{}.raw.normal", s.prefix), true, expiry),
        )
        .expect("declare the raw normal queue"),
    );
    let raw_local = Arc::new(
        rt.block_on(
            s.raw
                .queue(format!("{}.raw.local", s.prefix), false, expiry),
        )
        .expect("declare the raw local queue"),
    );

    let mut group = c.benchmark_group("amqp_send_receive");
    group.throughput(Throughput::Elements(n as u64));
    group.sample_size(10);
    group.sampling_mode(SamplingMode::Flat);
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(3));
    for mode in [Mode::Seq, Mode::Concurrent] {
        for size in SIZES {
            let body = Arc::new(vec![0xA5u8; size]);
            for (name, channel) in [
                ("layer_normal", &normal_channel),
                ("layer_local", &local_channel),
            ] {
                let id = BenchmarkId::new(format!("{name}/{}", mode.name()), size);
                group.bench_with_input(id, &size, |b, _| {
                    b.iter_custom(|iters| {
                        (0..iters)
                            .map(|_| {
                                rt.block_on(layer_send_receive(
                                    s.layer.clone(),
                                    channel.clone(),
                                    body.clone(),
                                    n,
                                    mode,
                                ))
                            })
                            .sum()
                    })
                });
            }
            for (name, queue) in [("raw_lapin", &raw_normal), ("raw_lapin_local", &raw_local)] {
                let id = BenchmarkId::new(format!("{name}/{}", mode.name()), size);
                group.bench_with_input(id, &size, |b, _| {
                    b.iter_custom(|iters| {
                        (0..iters)
                            .map(|_| {
                                rt.block_on(raw_send_receive(
                                    s.raw.publish.clone(),
                                    queue.clone(),
                                    body.clone(),
                                    n,
                                    mode,
                                ))
                            })
                            .sum()
                    })
                });
            }
        }
    }
    group.finish();

    // Round trips: 64 B, one at a time; one iteration is one round trip.
    let body = Arc::new(vec![0xA5u8; 64]);
    let layers = (s.layer.clone(), s.peer.clone());
    let layer_channels: (Arc<str>, Arc<str>) = (
        rt.block_on(s.layer.new_channel("rt"))
            .expect("new_channel")
            .into(),
        rt.block_on(s.peer.new_channel("rt"))
            .expect("new_channel")
            .into(),
    );
    let raw_queues = (
        Arc::new(
            rt.block_on(s.raw.queue(format!("{}.raw.rt.a", s.prefix), false, expiry))
                .expect("declare a raw round-trip queue"),
        ),
        Arc::new(
            rt.block_on(
                s.raw_peer
                    .queue(format!("{}.raw.rt.b", s.prefix), false, expiry),
            )
            .expect("declare a raw round-trip queue"),
        ),
    );
    let layer_latencies = Mutex::new(Vec::new());
    let raw_latencies = Mutex::new(Vec::new());
    let mut group = c.benchmark_group("amqp_round_trip");
    group.sample_size(10);
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(3));
    group.bench_function("layer", |b| {
        b.iter_custom(|iters| {
            rt.block_on(layer_round_trips(
                layers.clone(),
                layer_channels.clone(),
                body.clone(),
                iters,
                &layer_latencies,
            ))
        })
    });
    group.bench_function("raw_lapin", |b| {
        b.iter_custom(|iters| {
            rt.block_on(raw_round_trips(
                (s.raw.clone(), s.raw_peer.clone()),
                raw_queues.clone(),
                body.clone(),
                iters,
                &raw_latencies,
            ))
        })
    });
    group.finish();
    report_latencies("amqp_round_trip/layer", &layer_latencies);
    report_latencies("amqp_round_trip/raw_lapin", &raw_latencies);

    // Leave nothing behind (the queues would expire anyway).
    rt.block_on(async {
        let _ = s
            .raw
            .publish
            .queue_delete(
                ShortString::from(s.layer.channel_queue(&normal_channel).as_str()),
                QueueDeleteOptions::default(),
            )
            .await;
        let _ = s
            .raw
            .publish
            .queue_delete(
                ShortString::from(raw_normal.name.as_str()),
                QueueDeleteOptions::default(),
            )
            .await;
        let _ = s.layer.close().await;
        let _ = s.peer.close().await;
        let _ = s.raw.conn.close(200, ShortString::from("bye")).await;
        let _ = s.raw_peer.conn.close(200, ShortString::from("bye")).await;
    });
}

criterion_group!(benches, amqp);
criterion_main!(benches);
