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
use std::time::Duration;

use chanlayer_amqp::AmqpLayer;
use chanlayer_benches::layer_side::{self, Dyn};
use chanlayer_benches::raw_amqp::{
    self, raw_round_trips, raw_send_receive, Raw, CAPACITY, PREFETCH, QUEUE_EXPIRES,
};
use chanlayer_benches::{bench_mode, report_latencies, runtime, Mode};
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
    // The layer side of every bench: `layer_side`, through the trait object.
    let (layer, peer): (Dyn, Dyn) = (s.layer.clone(), s.peer.clone());
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
                                rt.block_on(layer_side::send_receive(
                                    (&layer, &layer),
                                    channel,
                                    &body,
                                    n,
                                    mode.depth(),
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
            rt.block_on(layer_side::round_trips(
                (&layer, &peer),
                (&layer_channels.0, &layer_channels.1),
                &body,
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
