//! The Kafka backend beside raw rdkafka doing the same work on the same broker, in one run.
//!
//! - `kafka_send_receive/{layer_normal,raw_rdkafka}/{seq,concurrent}/{64,1024,65536}`: N
//!   messages of that many body bytes through a normal channel. Layer: `send` from one
//!   instance to a normal channel (a topic
//!   and a consumer group) while one receiver task of another instance calls `receive`
//!   (auto-ack: the layer commits the offsets itself every `commit_interval`, 100 ms). Raw: a
//!   `FutureProducer` with the layer's own producer settings
//!   ([`KafkaConfig::producer_config`]: idempotent, `acks=all`, `linger.ms=1`), and a
//!   `BaseConsumer` with the layer's consumer settings ([`KafkaConfig::consumer_config`]),
//!   subscribed with a consumer group of its own, polled on a dedicated thread that counts
//!   the messages and commits their offsets every 100 ms.
//! - `kafka_send_receive/{layer_local,raw_rdkafka_local}/...`: the same through a
//!   process-local channel (a channel of the receiving instance, sent from the other
//!   instance, through the receiver's inbox topic). Raw: a 1-partition topic read by an
//!   *assigned* `BaseConsumer`, without group or commits.
//! - `seq`: one sender awaiting each delivery report before the next send. `concurrent`: 64
//!   sends in flight (64 tasks for the layer; a `FuturesUnordered` of 64 delivery futures for
//!   raw rdkafka).
//! - `kafka_round_trip/{layer,raw_rdkafka}`: one 64 B message to the peer, which replies on
//!   another process-local channel (raw: another 1-partition topic); one iteration is one
//!   round trip. The bench also prints p50/p90/p99/max of the round trips it timed.
//!
//! Raw rdkafka sends bodies of the same size as the layer's; the layer adds its envelope
//! (type, id, timestamps, expiry, address) on top.
//!
//! Iterations: 2,000 messages (`concurrent`), 100 (`seq`: each send waits for its
//! delivery report), 50 of each in test mode. An iteration that misses messages fails after
//! 30 s with what it received.
//!
//! `CHANLAYER_KAFKA_BENCH_OPTIONS` adds URL options for experiments, for the layer and the
//! raw clients alike (`kafka.fetch.wait.max.ms=10`, `linger=0ms`, ...).
//!
//! The broker is `KAFKA_BOOTSTRAP` (`host:port[,host:port]`) or `127.0.0.1:9092`
//! (`scripts/brokers/kafka.sh` starts Apache Kafka there); when it is unreachable the
//! benches print why and are skipped. Every topic has a random prefix, a retention of one
//! hour, and is deleted at the end of the run.
//!
//! ```text
//! cargo bench -p chanlayer-benches --bench kafka             # full run
//! cargo test -p chanlayer-benches --bench kafka              # each bench once (CI)
//! ```

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chanlayer_benches::layer_side::{self, Dyn};
use chanlayer_benches::raw_kafka::{
    bootstrap, raw_round_trips, raw_send_receive, reachable, Counter, Echo, RawKafka,
};
use chanlayer_benches::{bench_mode, report_latencies, runtime, Mode};
use chanlayer_core::config::BackendSettings;
use chanlayer_core::{ChannelLayer, LayerConfig};
use chanlayer_kafka::{KafkaConfig, KafkaLayer};
use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};

/// Messages per measured iteration of the `concurrent` throughput benches (full run).
const N: usize = 2_000;
/// Messages per measured iteration of the `seq` benches (full run). A sequential send
/// waits for its delivery report (idempotent, `acks=all`, `linger.ms=1`): a few ms each.
const N_SEQ: usize = 100;
/// Messages per iteration in test mode (`cargo test`), where each bench runs once.
const N_TEST: usize = 50;
/// Per-channel capacity of the layer (its local inbox); above N, so nothing is dropped.
const CAPACITY: usize = 10_000;
const SIZES: [usize; 3] = [64, 1024, 64 * 1024];

// ---------------------------------------------------------------------------------------
// The layer.

// ---------------------------------------------------------------------------------------
// Setup.

/// Everything one run uses on the broker.
struct Setup {
    /// Receives in the throughput benches; side `a` of the round trips.
    layer: Arc<KafkaLayer>,
    /// Sends in the throughput benches; the responder of the round trips.
    peer: Arc<KafkaLayer>,
    /// The raw clients' settings (the layer's), admin client and topic prefix.
    raw: RawKafka,
}

async fn connect_layer(config: &LayerConfig) -> Result<Arc<KafkaLayer>, String> {
    match tokio::time::timeout(Duration::from_secs(30), KafkaLayer::connect(config)).await {
        Ok(Ok(l)) => Ok(Arc::new(l)),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("connecting the layer timed out after 30s".to_owned()),
    }
}

async fn setup() -> Result<Setup, String> {
    let bootstrap = bootstrap();
    reachable(&bootstrap)?;
    let prefix = format!(
        "chanlayer-bench-{}",
        chanlayer_core::names::new_instance_id()
    );
    // The layer's defaults (prefetch 500, linger 1 ms, fetch wait 100 ms) unless
    // CHANLAYER_KAFKA_BENCH_OPTIONS says otherwise.
    let mut url = format!(
        "kafka://{bootstrap}?prefix={prefix}&retention=1h&capacity={CAPACITY}&connection_timeout=5s"
    );
    // Extra URL options for experiments (the raw clients get them too), e.g.
    // `kafka.fetch.wait.max.ms=10`.
    if let Ok(extra) = std::env::var("CHANLAYER_KAFKA_BENCH_OPTIONS") {
        if !extra.is_empty() {
            url = format!("{url}&{extra}");
        }
    }
    let config = LayerConfig::from_url(&url).map_err(|e| e.to_string())?;
    let cfg = KafkaConfig::from_layer_config(&config).map_err(|e| e.to_string())?;
    let layer = connect_layer(&config).await?;
    let peer = connect_layer(&config).await?;
    let raw = RawKafka::new(cfg, config.options.max_message_size, prefix)?;
    Ok(Setup { layer, peer, raw })
}

// ---------------------------------------------------------------------------------------
// The benches.

fn kafka(c: &mut Criterion) {
    let rt = runtime();
    let s = match rt.block_on(setup()) {
        Ok(s) => s,
        Err(why) => {
            // `why` names the broker without credentials (the layer's errors never show them).
            println!("Kafka benches skipped: {why}");
            return;
        }
    };
    let full = bench_mode();
    // The layer side of every bench: `layer_side`, through the trait objects. Throughput:
    // `peer` sends, `layer` receives.
    let (layer, peer): (Dyn, Dyn) = (s.layer.clone(), s.peer.clone());
    let normal_channel: Arc<str> = Arc::from("bench.normal");
    let local_channel: Arc<str> = rt
        .block_on(s.layer.new_channel("bench"))
        .expect("new_channel")
        .into();

    let raw_normal = format!("{}.raw.normal", s.raw.prefix);
    let raw_local = format!("{}.raw.local", s.raw.prefix);
    rt.block_on(s.raw.create_topic(&raw_normal, s.raw.cfg.partitions));
    rt.block_on(s.raw.create_topic(&raw_local, 1));
    let producer = s.raw.producer("raw-producer");
    let normal_counter = Counter::start(
        "raw normal",
        s.raw.consumer(&raw_normal, true),
        Some((raw_normal.clone(), s.raw.cfg.commit_interval)),
    );
    let local_counter = Counter::start("raw local", s.raw.consumer(&raw_local, false), None);

    // Before measuring: topics created and known, consumers started and in their groups,
    // producers' metadata fetched (a group join takes seconds, a bench iteration less).
    let body = Arc::new(vec![0xA5u8; 64]);
    for channel in [&normal_channel, &local_channel] {
        rt.block_on(layer_side::send_receive(
            (&peer, &layer),
            channel,
            &body,
            10,
            Mode::Seq.depth(),
        ));
    }
    for topic_counter in [
        (raw_normal.as_str(), &normal_counter),
        (raw_local.as_str(), &local_counter),
    ] {
        rt.block_on(raw_send_receive(
            &producer,
            topic_counter,
            &body,
            10,
            Mode::Seq,
        ));
    }

    let mut group = c.benchmark_group("kafka_send_receive");
    group.sample_size(10);
    group.sampling_mode(SamplingMode::Flat);
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(3));
    for mode in [Mode::Seq, Mode::Concurrent] {
        let n = match (full, mode) {
            (false, _) => N_TEST,
            (true, Mode::Seq) => N_SEQ,
            (true, Mode::Concurrent) => N,
        };
        group.throughput(Throughput::Elements(n as u64));
        for size in SIZES {
            let body = Arc::new(vec![0xA5u8; size]);
            let runs = [
                (
                    "layer_normal",
                    &normal_channel,
                    "raw_rdkafka",
                    raw_normal.as_str(),
                    &normal_counter,
                ),
                (
                    "layer_local",
                    &local_channel,
                    "raw_rdkafka_local",
                    raw_local.as_str(),
                    &local_counter,
                ),
            ];
            for (name, channel, raw_name, topic, counter) in runs {
                let id = BenchmarkId::new(format!("{name}/{}", mode.name()), size);
                group.bench_with_input(id, &size, |b, _| {
                    b.iter_custom(|iters| {
                        (0..iters)
                            .map(|_| {
                                rt.block_on(layer_side::send_receive(
                                    (&peer, &layer),
                                    channel,
                                    &body,
                                    n,
                                    mode.depth(),
                                ))
                            })
                            .sum()
                    })
                });
                let id = BenchmarkId::new(format!("{raw_name}/{}", mode.name()), size);
                group.bench_with_input(id, &size, |b, _| {
                    b.iter_custom(|iters| {
                        (0..iters)
                            .map(|_| {
                                rt.block_on(raw_send_receive(
                                    &producer,
                                    (topic, counter),
                                    &body,
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
    let rt_channels: (Arc<str>, Arc<str>) = (
        rt.block_on(s.layer.new_channel("rt"))
            .expect("new_channel")
            .into(),
        rt.block_on(s.peer.new_channel("rt"))
            .expect("new_channel")
            .into(),
    );
    let (raw_to_a, raw_to_b) = (
        format!("{}.raw.rt.a", s.raw.prefix),
        format!("{}.raw.rt.b", s.raw.prefix),
    );
    rt.block_on(s.raw.create_topic(&raw_to_a, 1));
    rt.block_on(s.raw.create_topic(&raw_to_b, 1));
    let replies = Counter::start("raw replies", s.raw.consumer(&raw_to_a, false), None);
    let echo = Echo::start(
        s.raw.consumer(&raw_to_b, false),
        s.raw.producer("raw-echo"),
        raw_to_a.clone(),
        rt.handle().clone(),
    );
    // Warm both up (topic metadata, first fetches) outside the measurement.
    let warm = Mutex::new(Vec::new());
    rt.block_on(layer_side::round_trips(
        (&layer, &peer),
        (&rt_channels.0, &rt_channels.1),
        &body,
        5,
        &warm,
    ));
    rt.block_on(raw_round_trips(
        &producer,
        (&raw_to_b, &replies),
        &body,
        5,
        &warm,
    ));
    let layer_latencies = Mutex::new(Vec::new());
    let raw_latencies = Mutex::new(Vec::new());
    let mut group = c.benchmark_group("kafka_round_trip");
    group.sample_size(10);
    // Linear: 55 round trips or more for the percentiles (criterion would pick flat
    // sampling, 20, for round trips this slow).
    group.sampling_mode(SamplingMode::Linear);
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(3));
    group.bench_function("layer", |b| {
        b.iter_custom(|iters| {
            rt.block_on(layer_side::round_trips(
                (&layer, &peer),
                (&rt_channels.0, &rt_channels.1),
                &body,
                iters,
                &layer_latencies,
            ))
        })
    });
    group.bench_function("raw_rdkafka", |b| {
        b.iter_custom(|iters| {
            rt.block_on(raw_round_trips(
                &producer,
                (&raw_to_b, &replies),
                &body,
                iters,
                &raw_latencies,
            ))
        })
    });
    group.finish();
    // Print the percentiles once at least 50 round trips were timed.
    report_latencies("kafka_round_trip/layer", &layer_latencies, 50);
    report_latencies("kafka_round_trip/raw_rdkafka", &raw_latencies, 50);

    // Leave nothing behind (the topics would go by retention anyway; the layers delete
    // their inboxes on close).
    echo.stop();
    for counter in [&normal_counter, &local_counter, &replies] {
        counter.stop();
    }
    drop(producer);
    rt.block_on(async {
        let _ = s.layer.close().await;
        let _ = s.peer.close().await;
        let channel_topic = s.layer.channel_topic(&normal_channel);
        s.raw
            .delete_topics(&[
                channel_topic.as_str(),
                s.layer.groups_topic(),
                raw_normal.as_str(),
                raw_local.as_str(),
                raw_to_a.as_str(),
                raw_to_b.as_str(),
            ])
            .await;
    });
}

criterion_group!(benches, kafka);
criterion_main!(benches);
