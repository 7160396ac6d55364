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
use chanlayer_benches::raw_amqp::{
    self, raw_round_trips, raw_send_receive, Raw, CAPACITY, PREFETCH, QUEUE_EXPIRES,
};
use chanlayer_benches::{bench_mode, message, report_latencies, runtime, Mode, DEPTH};
use chanlayer_core::{ChannelLayer, LayerConfig};
use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use lapin::options::QueueDeleteOptions;
use lapin::types::ShortString;

/// Messages per measured iteration of the throughput benches (full run).
const N: usize = 2_000;
/// Messages per iteration in test mode (`cargo test`), where each bench runs once.
const N_TEST: usize = 50;
const SIZES: [usize; 2] = [64, 1024];

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
    let base = raw_amqp::broker_url();
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
    Ok(Setup {
        layer,
        peer,
        raw: raw_amqp::connect(&base, "sender").await?,
        raw_peer: raw_amqp::connect(&base, "peer").await?,
        prefix,
    })
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
    report_latencies("amqp_round_trip/layer", &layer_latencies, 100);
    report_latencies("amqp_round_trip/raw_lapin", &raw_latencies, 100);

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
