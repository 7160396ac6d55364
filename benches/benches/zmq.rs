//! The ZeroMQ backend beside raw zmq sockets doing the same work in the same run, all in one
//! process over TCP loopback (free ports, `127.0.0.1`).
//!
//! - `zmq_send_receive/{layer_embedded,raw_pubsub}/{64,1024,65536}`: N messages from a
//!   sender to a receiver. Layer: embedded mode (`zmq://127.0.0.1:PORT?bind=eager`: this
//!   process binds the XPUB publisher), `send` to a process-local channel (`new_channel`)
//!   while a receiver task calls `receive`. A process-local channel is the fair comparison:
//!   one topic (the instance's inbox) with one subscriber and nothing retained, as raw; a
//!   normal channel would add the publisher's copy of every message for late joiners. Raw: a
//!   PUB socket bound, a SUB socket connected and subscribed to one topic; the sender sends
//!   `[topic, payload]`, a receiver thread counts N.
//! - `zmq_send_receive/{layer_dedicated,raw_push_pull_pub}/...`: the same through a proxy.
//!   Layer: a [`Proxy`] (its own thread) and the dedicated URL ([`Proxy::url`]). Raw: PUSH →
//!   a forwarding thread (`zmq_proxy_steerable`, PULL → PUB) → SUB.
//! - `zmq_round_trip/{layer_embedded,raw_pubsub,layer_dedicated,raw_push_pull_pub}`: one 64 B
//!   message to the other side, which replies; one iteration is one round trip. Layer: two
//!   instances, each replying to the other's process-local channel. Raw: two sides with a
//!   PUB and a SUB each (embedded), or a PUSH and a SUB each through the forwarder. The bench
//!   also prints p50/p90/p99/max of the round trips it timed.
//!
//! Zero loss at steady state, checked on both sides:
//! - Every sending and receiving socket has a high-water mark of [`HWM`] (above N); the
//!   layer gets the same `sndhwm` / `rcvhwm`, and a `send_queue` and channel `capacity` of
//!   the same size, so nothing is refused or dropped for room.
//! - Raw: before measuring, the sender sends probes until one arrives (the subscription is
//!   active at the publisher). Every payload carries a sequence number; the receiver counts
//!   the gaps. Layer: `connect` waits for the instance's inbox subscription to be confirmed,
//!   and after every iteration `transport_stats().lost` (gaps in the topic's sequence) and
//!   `stats().dropped_full` must be 0.
//! - An iteration that misses messages fails with what it received, after
//!   [`raw_zmq::STALL`](chanlayer_benches::raw_zmq::STALL) (raw) or [`layer_side::STALL`]
//!   (layer). The run ends with one line per side: messages moved, messages lost.
//!
//! The layer side is [`layer_side`]'s, through `ChannelLayer` trait objects: the
//! throughput benches are its `send_receive` with one sender (sequential sends), the round
//! trips its `round_trips`.
//!
//! Both use a process-wide libzmq context of their own (one I/O thread each); the layer's
//! sockets live in its threads (publisher, receiver, PUSH sender), the raw ones in the
//! bench's threads. `CHANLAYER_ZMQ_BENCH_OPTIONS` adds URL options to the layer for
//! experiments (`retain=0`, `sndhwm=1000`, ...).
//!
//! ```text
//! cargo bench -p chanlayer-benches --bench zmq               # full run, about a minute
//! cargo test -p chanlayer-benches --bench zmq                # each bench once (CI)
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chanlayer_benches::layer_side::{self, Dyn};
use chanlayer_benches::raw_zmq::{raw_round_trips, raw_send_receive, tcp, Raw, HWM};
use chanlayer_benches::{bench_mode, free_port, report_latencies, runtime};
use chanlayer_core::{ChannelLayer, LayerConfig};
use chanlayer_zmq::{Proxy, ProxyConfig, ZmqLayer};
use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use tokio::runtime::Runtime;

/// Messages per measured iteration for 64 B and 1 KiB bodies (full run).
const N: usize = 10_000;
/// Messages per measured iteration for 64 KiB bodies (full run): 64 MiB an iteration.
const N_LARGE: usize = 1_000;
/// Messages per iteration in test mode (`cargo test`), where each bench runs once.
const N_TEST: usize = 100;
const SIZES: [usize; 3] = [64, 1024, 65536];
/// The layer's prefix (its topics are `i:{PREFIX}:{instance}\0`).
const PREFIX: &str = "chanlayer-bench";

fn messages_per_iteration(size: usize, full: bool) -> usize {
    match (full, size) {
        (false, _) => N_TEST,
        (true, s) if s >= 64 * 1024 => N_LARGE,
        (true, _) => N,
    }
}

// ---------------------------------------------------------------------------------------
// The layer.

/// Options every layer URL of the bench gets: room for everything in flight, and the
/// experiments of `CHANLAYER_ZMQ_BENCH_OPTIONS`.
fn layer_options() -> String {
    let mut o = format!(
        "prefix={PREFIX}&capacity={HWM}&sndhwm={HWM}&rcvhwm={HWM}&send_queue={HWM}&connect_timeout=10s"
    );
    if let Ok(extra) = std::env::var("CHANLAYER_ZMQ_BENCH_OPTIONS") {
        if !extra.is_empty() {
            o = format!("{o}&{extra}");
        }
    }
    o
}

async fn connect_layer(url: &str) -> Arc<ZmqLayer> {
    let config = LayerConfig::from_url(url).expect("a valid zmq:// URL");
    Arc::new(
        ZmqLayer::connect(&config)
            .await
            .unwrap_or_else(|e| panic!("connect {url}: {e}")),
    )
}

/// Panics unless the layer has lost and dropped nothing so far.
fn assert_no_loss(name: &str, layer: &ZmqLayer) {
    let t = layer.transport_stats();
    let s = layer.stats();
    assert!(
        t.lost == 0 && s.dropped_full == 0 && s.undecodable == 0 && s.expired == 0,
        "{name}: the layer lost messages: {t:?}, {s:?}"
    );
}

/// The layer's side of one mode: an instance for the throughput benches (sending to its own
/// process-local channel) and two for the round trips.
struct LayerMode {
    name: &'static str,
    layer: Arc<ZmqLayer>,
    channel: Arc<str>,
    pair: (Arc<ZmqLayer>, Arc<ZmqLayer>),
    pair_channels: (Arc<str>, Arc<str>),
    /// `layer` and `pair` as trait objects, for [`layer_side`].
    dyn_layer: Dyn,
    dyn_pair: (Dyn, Dyn),
    /// Messages moved by the throughput benches.
    moved: AtomicU64,
}

impl LayerMode {
    async fn connect(name: &'static str, url: &str) -> LayerMode {
        let layer = connect_layer(url).await;
        let a = connect_layer(url).await;
        let b = connect_layer(url).await;
        let channel = layer
            .new_channel("bench")
            .await
            .expect("new_channel")
            .into();
        let pair_channels = (
            a.new_channel("rt").await.expect("new_channel").into(),
            b.new_channel("rt").await.expect("new_channel").into(),
        );
        LayerMode {
            name,
            dyn_layer: layer.clone(),
            dyn_pair: (a.clone(), b.clone()),
            layer,
            channel,
            pair: (a, b),
            pair_channels,
            moved: AtomicU64::new(0),
        }
    }

    /// `n` messages to the process-local channel, sent one after the other, while a
    /// receiver task takes them; then the layer must have lost and dropped nothing (checked
    /// outside the measured time).
    fn send_receive(&self, rt: &Runtime, body: &Arc<Vec<u8>>, n: usize) -> Duration {
        let elapsed = rt.block_on(layer_side::send_receive(
            (&self.dyn_layer, &self.dyn_layer),
            &self.channel,
            body,
            n,
            1,
        ));
        assert_no_loss(self.name, &self.layer);
        elapsed
    }

    /// `iters` round trips between the two instances of the pair.
    fn round_trips(
        &self,
        rt: &Runtime,
        body: &[u8],
        iters: u64,
        latencies: &Mutex<Vec<Duration>>,
    ) -> Duration {
        let (a, b) = &self.dyn_pair;
        let (to_a, to_b) = &self.pair_channels;
        rt.block_on(layer_side::round_trips(
            (a, b),
            (to_a, to_b),
            body,
            iters,
            latencies,
        ))
    }

    fn report(&self) {
        let lost: u64 = [&self.layer, &self.pair.0, &self.pair.1]
            .iter()
            .map(|l| l.transport_stats().lost)
            .sum();
        let dropped: u64 = [&self.layer, &self.pair.0, &self.pair.1]
            .iter()
            .map(|l| l.stats().dropped_full)
            .sum();
        let batching = match self.layer.publisher_stats() {
            Some(h) => format!(
                "; the publisher forwarded {} messages, {} of them in {} batch frames",
                h.forwarded, h.batched, h.batches
            ),
            None => String::new(),
        };
        println!(
            "zmq {}: {} messages sent and received, {lost} lost (transport_stats().lost), {dropped} dropped for capacity{batching}",
            self.name,
            self.moved.load(Ordering::Relaxed),
        );
    }

    async fn close(&self) {
        for l in [&self.layer, &self.pair.0, &self.pair.1] {
            let _ = l.close().await;
        }
    }
}

// ---------------------------------------------------------------------------------------
// The benches.

fn zmq_benches(c: &mut Criterion) {
    let rt = runtime();
    let full = bench_mode();

    let proxy = {
        let mut config = ProxyConfig::new(tcp(free_port()), tcp(free_port()));
        config.sndhwm = i32::try_from(HWM).expect("HWM fits an i32");
        config.rcvhwm = config.sndhwm;
        Proxy::spawn(config).expect("start the proxy")
    };
    let options = layer_options();
    let embedded_url = format!("zmq://127.0.0.1:{}?bind=eager&{options}", free_port());
    let dedicated_url = format!("{}&{options}", proxy.url());
    let embedded = rt.block_on(LayerMode::connect("layer_embedded", &embedded_url));
    let dedicated = rt.block_on(LayerMode::connect("layer_dedicated", &dedicated_url));
    let mut raw = Raw::setup();

    // Before measuring: every path once (connections up, first allocations made).
    let body = Arc::new(vec![0xA5u8; 64]);
    let warm = Mutex::new(Vec::new());
    for mode in [&embedded, &dedicated] {
        mode.send_receive(&rt, &body, 100);
        mode.round_trips(&rt, &body, 10, &warm);
    }
    for path in [&mut raw.pubsub, &mut raw.push_pull_pub] {
        raw_send_receive(path, 64, 100);
        path.moved = 0;
    }
    for sides in [&mut raw.pubsub_sides, &mut raw.dedicated_sides] {
        raw_round_trips((&mut sides.0, &mut sides.1), &body, 10, &warm);
    }

    let mut group = c.benchmark_group("zmq_send_receive");
    group.sample_size(10);
    group.sampling_mode(SamplingMode::Flat);
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(3));
    for size in SIZES {
        let n = messages_per_iteration(size, full);
        group.throughput(Throughput::Elements(n as u64));
        let body = Arc::new(vec![0xA5u8; size]);
        for (mode, path) in [
            (&embedded, &mut raw.pubsub),
            (&dedicated, &mut raw.push_pull_pub),
        ] {
            group.bench_with_input(BenchmarkId::new(mode.name, size), &size, |b, _| {
                b.iter_custom(|iters| {
                    (0..iters)
                        .map(|_| {
                            let d = mode.send_receive(&rt, &body, n);
                            mode.moved.fetch_add(n as u64, Ordering::Relaxed);
                            d
                        })
                        .sum()
                })
            });
            group.bench_with_input(BenchmarkId::new(path.name, size), &size, |b, _| {
                b.iter_custom(|iters| (0..iters).map(|_| raw_send_receive(path, size, n)).sum())
            });
        }
    }
    group.finish();

    // Round trips: 64 B, one at a time; one iteration is one round trip.
    let body = Arc::new(vec![0xA5u8; 64]);
    let mut group = c.benchmark_group("zmq_round_trip");
    group.sample_size(10);
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(3));
    let mut printed = Vec::new();
    for (mode, raw_name, sides) in [
        (&embedded, "raw_pubsub", &mut raw.pubsub_sides),
        (&dedicated, "raw_push_pull_pub", &mut raw.dedicated_sides),
    ] {
        let layer_latencies = Mutex::new(Vec::new());
        let raw_latencies = Mutex::new(Vec::new());
        group.bench_function(mode.name, |b| {
            b.iter_custom(|iters| mode.round_trips(&rt, &body, iters, &layer_latencies))
        });
        group.bench_function(raw_name, |b| {
            b.iter_custom(|iters| {
                raw_round_trips((&mut sides.0, &mut sides.1), &body, iters, &raw_latencies)
            })
        });
        printed.push((format!("zmq_round_trip/{}", mode.name), layer_latencies));
        printed.push((format!("zmq_round_trip/{raw_name}"), raw_latencies));
    }
    group.finish();
    for (name, latencies) in &printed {
        report_latencies(name, latencies, 100);
    }

    // Zero loss, said once more for the whole run.
    for mode in [&embedded, &dedicated] {
        assert_no_loss(mode.name, &mode.layer);
        assert_no_loss(mode.name, &mode.pair.0);
        assert_no_loss(mode.name, &mode.pair.1);
        mode.report();
    }
    for path in [&raw.pubsub, &raw.push_pull_pub] {
        println!(
            "zmq {}: {} messages sent and received, 0 lost (sequence gaps)",
            path.name, path.moved
        );
    }
    rt.block_on(async {
        embedded.close().await;
        dedicated.close().await;
    });
    let stats = proxy.stop();
    println!(
        "zmq proxy: {} received, {} forwarded, {} dropped",
        stats.received, stats.forwarded, stats.dropped
    );
    raw.forwarder.stop();
}

criterion_group!(benches, zmq_benches);
criterion_main!(benches);
