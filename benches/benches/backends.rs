//! Every backend side by side, each beside its raw client doing the same work, in one run:
//! memory (raw: tokio mpsc), ZeroMQ embedded (raw: PUB/SUB sockets), ZeroMQ dedicated (raw:
//! PUSH → forwarder → PUB → SUB), AMQP (raw: lapin with the same confirms and acks) and
//! Kafka (raw: rdkafka `FutureProducer` / `BaseConsumer` with the layer's settings).
//!
//! Benchmark ids are `backends/<scenario>/<backend>/<layer|raw>/<size or members>`:
//!
//! - `throughput/<backend>/{layer,raw}/{64,1024,65536,1048576}`: send+receive through one
//!   process-local channel (`new_channel`) while a receiver task takes every message; raw:
//!   the one-queue / one-topic equivalent (an mpsc channel, a PUB/SUB topic, an exclusive
//!   queue without acks, a 1-partition topic read by an assigned consumer).
//! - `two_receivers/<backend>/{layer,raw}/64`: a normal channel with two receivers. Memory,
//!   AMQP and Kafka: competing consumers, each message reaches one of them (memory: two
//!   tasks of one instance; raw: one mpsc receiver behind a mutex; AMQP: two instances, two
//!   raw consumers with prefetch 100 and acks on one durable queue; Kafka: two instances in
//!   the channel's consumer group on a 2-partition topic, two raw consumers in one group).
//!   ZeroMQ normal channels are broadcast: both receiving instances get every message (two
//!   raw SUB sockets on one topic), so an iteration delivers 2 × n.
//! - `round_trip/<backend>/{layer,raw}/64`: send, receive, reply; one iteration is one
//!   round trip (p50/p90/p99/max printed).
//! - `group_send/<backend>/{layer,raw}/{1,100,1000}`: `group_send` of 64 B to a group of
//!   N process-local channels of one receiving instance, a receiver task taking every
//!   copy. Raw: the same single message through the broker, and the raw receiver pushing a
//!   copy into N local tokio mpsc queues that a task drains (what the layer's inbox does).
//!
//! Sends: one at a time for memory and ZeroMQ (a send does not wait for the broker); 64 in
//! flight for AMQP (publisher confirms) and Kafka (delivery reports), for the layer and the
//! raw client alike. Zero loss is checked in every mode: each iteration counts what arrived
//! and panics when messages are missing (after 30 s) or a layer counted a drop.
//!
//! Brokers that do not answer are skipped with a printed line, as in the `amqp` and `kafka`
//! benches (AMQP: `CHANLAYER_AMQP_URL` or `amqp://guest:guest@127.0.0.1:5672/%2f`; Kafka:
//! `KAFKA_BOOTSTRAP` or `127.0.0.1:9092`).
//!
//! ```text
//! cargo bench -p chanlayer-benches --bench backends          # full run, about 6 minutes
//! cargo test -p chanlayer-benches --bench backends           # each bench once (CI)
//! ```

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chanlayer_amqp::AmqpLayer;
use chanlayer_benches::layer_side::{self, Dyn};
use chanlayer_benches::raw_amqp::{self, Raw, RawQueue};
use chanlayer_benches::raw_kafka::{self, Counter, Echo, RawKafka};
use chanlayer_benches::raw_mpsc::{self, FanOut};
use chanlayer_benches::raw_zmq::{self, Forwarder, RawBroadcast, RawPath, Topology, HWM};
use chanlayer_benches::{bench_mode, free_port, message, report_latencies, runtime, Mode};
use chanlayer_core::config::BackendSettings;
use chanlayer_core::{ChannelLayer, LayerConfig, MemoryLayer};
use chanlayer_kafka::{KafkaConfig, KafkaLayer};
use chanlayer_zmq::{Proxy, ProxyConfig, ZmqLayer};
use criterion::measurement::WallTime;
use criterion::{
    criterion_group, criterion_main, BenchmarkGroup, BenchmarkId, Criterion, SamplingMode,
    Throughput,
};
use tokio::runtime::Runtime;

/// Body sizes of the `throughput` scenario.
const SIZES: [usize; 4] = [64, 1024, 64 * 1024, 1024 * 1024];
/// Members of the `group_send` scenario.
const GROUP_SIZES: [usize; 3] = [1, 100, 1000];
/// The normal channel of `two_receivers`.
const NORMAL: &str = "bench.two";
/// The body of `two_receivers`, `round_trip` and `group_send`.
const SMALL: usize = 64;
/// Messages per iteration of a 1 MiB throughput bench (full run).
const N_HUGE: usize = 20;
/// Messages per iteration in test mode (`cargo test`), where each bench runs once: small
/// bodies, and 64 KiB and more.
const N_TEST: usize = 20;
const N_TEST_LARGE: usize = 4;
/// Group messages per iteration in test mode.
const M_TEST: usize = 2;

/// Messages per iteration of a throughput bench: `base` up to 1 KiB, a tenth of it at
/// 64 KiB, [`N_HUGE`] at 1 MiB.
fn messages(base: usize, size: usize, full: bool) -> usize {
    match (full, size) {
        (false, s) if s >= 64 * 1024 => N_TEST_LARGE,
        (false, _) => N_TEST,
        (true, s) if s >= 1024 * 1024 => N_HUGE,
        (true, s) if s >= 64 * 1024 => base / 10,
        (true, _) => base,
    }
}

/// Group messages per iteration: about `base` copies in all, at least 10 messages.
fn group_messages(base: usize, members: usize, full: bool) -> usize {
    if full {
        (base / members).max(10)
    } else {
        M_TEST
    }
}

fn configure(g: &mut BenchmarkGroup<'_, WallTime>) {
    g.sample_size(10);
    g.sampling_mode(SamplingMode::Flat);
    g.warm_up_time(Duration::from_millis(500));
    g.measurement_time(Duration::from_secs(3));
}

// ---------------------------------------------------------------------------------------
// What every backend provides.

/// The layer side of one backend: which instances and channels each scenario uses.
struct Layers {
    /// `throughput`: sender, receiver, a process-local channel of the receiver.
    throughput: (Dyn, Dyn, Arc<str>),
    /// `two_receivers`: sender, the two receivers, the normal channel.
    two: (Dyn, Vec<Dyn>, Arc<str>),
    /// `round_trip`: the two sides and a process-local channel of each.
    round_trip: ((Dyn, Dyn), (Arc<str>, Arc<str>)),
    /// `group_send`: sender, and the receiving instance that owns the members.
    group: (Dyn, Dyn),
    /// Every instance, for the zero-loss checks.
    all: Vec<Dyn>,
    /// A backend's own loss counters (ZeroMQ: `transport_stats().lost`).
    extra_check: Option<Box<dyn Fn() -> Result<(), String>>>,
}

impl Layers {
    /// Panics if an instance counted a message dropped, undecodable, expired or
    /// undeliverable.
    fn check(&self, what: &str) {
        for l in &self.all {
            let s = l.stats();
            assert!(
                s.dropped_full == 0
                    && s.undecodable == 0
                    && s.expired == 0
                    && s.undeliverable == 0
                    && s.group_member_full == 0,
                "{what}: the layer lost messages: {s:?}"
            );
        }
        if let Some(check) = &self.extra_check {
            if let Err(e) = check() {
                panic!("{what}: {e}");
            }
        }
    }
}

/// The raw side of one backend.
trait Baseline {
    /// `n` copies of `body` through the one-queue / one-topic path.
    fn throughput(&mut self, rt: &Runtime, body: &Arc<Vec<u8>>, n: usize) -> Duration;
    /// `n` copies of `body` to the two receivers.
    fn two_receivers(&mut self, rt: &Runtime, body: &Arc<Vec<u8>>, n: usize) -> Duration;
    /// `iters` round trips of `body`.
    fn round_trips(
        &mut self,
        rt: &Runtime,
        body: &Arc<Vec<u8>>,
        iters: u64,
        latencies: &Mutex<Vec<Duration>>,
    ) -> Duration;
    /// Sets up `members` local queues, for `m` messages an iteration.
    fn prepare_group(&mut self, members: usize, m: usize);
    /// `m` group messages, each copied into every local queue.
    fn group_send(&mut self, rt: &Runtime, body: &Arc<Vec<u8>>, m: usize) -> Duration;
    /// Warms the two-receiver path up; `true` once both receivers got messages.
    fn warm_two_receivers(&mut self, rt: &Runtime, body: &Arc<Vec<u8>>) -> bool {
        self.two_receivers(rt, body, 10);
        true
    }
    /// Stops threads and releases broker resources.
    fn close(&mut self, _rt: &Runtime) {}
}

/// One backend under test.
struct Subject {
    name: &'static str,
    /// Messages per iteration for small bodies (see [`messages`]).
    base: usize,
    /// Sends in flight on the layer side (1: one after the other).
    depth: usize,
    /// Throughput sizes above this are skipped, with the reason.
    max_size: Option<(usize, String)>,
    /// Keep warming the two-receiver path up until both receivers got messages (a Kafka
    /// consumer group settles after the second member joined).
    settle_two_receivers: bool,
    layers: Layers,
    raw: Box<dyn Baseline>,
    /// Closes the layers and whatever they needed (a proxy, the broker's leftovers).
    teardown: Option<Teardown>,
}

/// Closes a backend's layers (and what they needed).
type Teardown = Box<dyn FnOnce(&Runtime)>;

// ---------------------------------------------------------------------------------------
// Memory.

struct RawMemory {
    fan_out: Option<FanOut>,
}

impl Baseline for RawMemory {
    fn throughput(&mut self, rt: &Runtime, body: &Arc<Vec<u8>>, n: usize) -> Duration {
        rt.block_on(raw_mpsc::send_receive(body.clone(), n))
    }

    fn two_receivers(&mut self, rt: &Runtime, body: &Arc<Vec<u8>>, n: usize) -> Duration {
        rt.block_on(raw_mpsc::two_receivers(body.clone(), n))
    }

    fn round_trips(
        &mut self,
        rt: &Runtime,
        body: &Arc<Vec<u8>>,
        iters: u64,
        latencies: &Mutex<Vec<Duration>>,
    ) -> Duration {
        rt.block_on(raw_mpsc::round_trips(body, iters, latencies))
    }

    fn prepare_group(&mut self, members: usize, m: usize) {
        self.fan_out = Some(FanOut::new(members, m + 16));
    }

    fn group_send(&mut self, rt: &Runtime, body: &Arc<Vec<u8>>, m: usize) -> Duration {
        let fan_out = self.fan_out.as_mut().expect("prepare_group first");
        rt.block_on(raw_mpsc::group_send(fan_out, body.clone(), m))
    }
}

fn memory(rt: &Runtime) -> Result<Subject, String> {
    let cfg =
        LayerConfig::from_url(&format!("memory://?capacity={HWM}")).map_err(|e| e.to_string())?;
    let layer: Dyn = Arc::new(
        rt.block_on(MemoryLayer::connect(&cfg))
            .map_err(|e| e.to_string())?,
    );
    let local: Arc<str> = rt
        .block_on(layer.new_channel("bench"))
        .map_err(|e| e.to_string())?
        .into();
    let rt_channels = (
        rt.block_on(layer.new_channel("rt"))
            .map_err(|e| e.to_string())?
            .into(),
        rt.block_on(layer.new_channel("rt"))
            .map_err(|e| e.to_string())?
            .into(),
    );
    let closing = layer.clone();
    Ok(Subject {
        name: "memory",
        base: 10_000,
        depth: 1,
        max_size: None,
        settle_two_receivers: false,
        layers: Layers {
            throughput: (layer.clone(), layer.clone(), local),
            two: (
                layer.clone(),
                vec![layer.clone(), layer.clone()],
                Arc::from(NORMAL),
            ),
            round_trip: ((layer.clone(), layer.clone()), rt_channels),
            group: (layer.clone(), layer.clone()),
            all: vec![layer],
            extra_check: None,
        },
        raw: Box::new(RawMemory { fan_out: None }),
        teardown: Some(Box::new(move |rt: &Runtime| {
            let _ = rt.block_on(closing.close());
        })),
    })
}

// ---------------------------------------------------------------------------------------
// ZeroMQ.

struct RawZmq {
    path: RawPath,
    broadcast: RawBroadcast,
    group: RawPath,
    sides: (raw_zmq::RawSide, raw_zmq::RawSide),
    forwarder: Option<Forwarder>,
    fan_out: Option<FanOut>,
    _ctx: zmq::Context,
}

impl RawZmq {
    fn setup(dedicated: bool) -> RawZmq {
        let ctx = zmq::Context::new();
        let (topology, forwarder) = if dedicated {
            let (pull, publish) = (raw_zmq::tcp(free_port()), raw_zmq::tcp(free_port()));
            let forwarder = Forwarder::start(&ctx, &pull, &publish);
            (Topology::Dedicated { pull, publish }, Some(forwarder))
        } else {
            (Topology::Embedded, None)
        };
        RawZmq {
            path: topology.path(&ctx, "raw zmq throughput", b"i:chanlayer-bench:raw.local\0"),
            broadcast: topology.broadcast(
                &ctx,
                "raw zmq two receivers",
                b"c:chanlayer-bench:raw.two\0",
                2,
            ),
            group: topology.path(&ctx, "raw zmq group", b"g:chanlayer-bench:raw.group\0"),
            sides: topology.sides(&ctx, "raw zmq"),
            forwarder,
            fan_out: None,
            _ctx: ctx,
        }
    }
}

impl Baseline for RawZmq {
    fn throughput(&mut self, _rt: &Runtime, body: &Arc<Vec<u8>>, n: usize) -> Duration {
        raw_zmq::raw_send_receive(&mut self.path, body.len(), n)
    }

    fn two_receivers(&mut self, _rt: &Runtime, body: &Arc<Vec<u8>>, n: usize) -> Duration {
        raw_zmq::raw_broadcast(&mut self.broadcast, body.len(), n)
    }

    fn round_trips(
        &mut self,
        _rt: &Runtime,
        body: &Arc<Vec<u8>>,
        iters: u64,
        latencies: &Mutex<Vec<Duration>>,
    ) -> Duration {
        raw_zmq::raw_round_trips(
            (&mut self.sides.0, &mut self.sides.1),
            body,
            iters,
            latencies,
        )
    }

    fn prepare_group(&mut self, members: usize, m: usize) {
        self.fan_out = Some(FanOut::new(members, m + 16));
    }

    fn group_send(&mut self, rt: &Runtime, body: &Arc<Vec<u8>>, m: usize) -> Duration {
        let fan_out = self.fan_out.as_mut().expect("prepare_group first");
        raw_zmq::raw_group_send(&mut self.group, fan_out, rt, body.len(), m)
    }

    fn close(&mut self, _rt: &Runtime) {
        if let Some(f) = self.forwarder.take() {
            f.stop();
        }
    }
}

fn zmq_subject(rt: &Runtime, dedicated: bool) -> Result<Subject, String> {
    let options = format!(
        "prefix=chanlayer-bench&capacity={HWM}&sndhwm={HWM}&rcvhwm={HWM}&send_queue={HWM}&connect_timeout=10s"
    );
    let (url, proxy) = if dedicated {
        let mut config = ProxyConfig::new(raw_zmq::tcp(free_port()), raw_zmq::tcp(free_port()));
        config.sndhwm = i32::try_from(HWM).expect("HWM fits an i32");
        config.rcvhwm = config.sndhwm;
        let proxy = Proxy::spawn(config).map_err(|e| e.to_string())?;
        (format!("{}&{options}", proxy.url()), Some(proxy))
    } else {
        (
            format!("zmq://127.0.0.1:{}?bind=eager&{options}", free_port()),
            None,
        )
    };
    let config = LayerConfig::from_url(&url).map_err(|e| e.to_string())?;
    let connect = || async {
        ZmqLayer::connect(&config)
            .await
            .map(Arc::new)
            .map_err(|e| e.to_string())
    };
    let (main, a, b) = rt.block_on(async {
        Ok::<_, String>((connect().await?, connect().await?, connect().await?))
    })?;
    let zmq_layers = [main.clone(), a.clone(), b.clone()];
    let (main, a, b): (Dyn, Dyn, Dyn) = (main, a, b);
    let local: Arc<str> = rt
        .block_on(main.new_channel("bench"))
        .map_err(|e| e.to_string())?
        .into();
    let rt_channels = (
        rt.block_on(a.new_channel("rt"))
            .map_err(|e| e.to_string())?
            .into(),
        rt.block_on(b.new_channel("rt"))
            .map_err(|e| e.to_string())?
            .into(),
    );
    let checked = zmq_layers.clone();
    let extra_check = Box::new(move || {
        let lost: u64 = checked.iter().map(|l| l.transport_stats().lost).sum();
        if lost == 0 {
            Ok(())
        } else {
            Err(format!("{lost} messages lost (transport_stats().lost)"))
        }
    });
    let name = if dedicated {
        "zmq_dedicated"
    } else {
        "zmq_embedded"
    };
    let teardown = Box::new(move |rt: &Runtime| {
        rt.block_on(async {
            for l in &zmq_layers {
                let _ = l.close().await;
            }
        });
        if let Some(p) = proxy {
            let stats = p.stop();
            println!(
                "backends {name}: the proxy received {}, forwarded {}, dropped {}",
                stats.received, stats.forwarded, stats.dropped
            );
        }
    });
    Ok(Subject {
        name,
        base: 10_000,
        depth: 1,
        max_size: None,
        settle_two_receivers: false,
        layers: Layers {
            throughput: (main.clone(), main.clone(), local),
            two: (main.clone(), vec![a.clone(), b.clone()], Arc::from(NORMAL)),
            round_trip: ((a.clone(), b.clone()), rt_channels),
            group: (main.clone(), a.clone()),
            all: vec![main, a, b],
            extra_check: Some(extra_check),
        },
        raw: Box::new(RawZmq::setup(dedicated)),
        teardown: Some(teardown),
    })
}

// ---------------------------------------------------------------------------------------
// AMQP.

struct RawAmqp {
    raw: Arc<Raw>,
    raw_peer: Arc<Raw>,
    local: Arc<RawQueue>,
    competing: Vec<Arc<RawQueue>>,
    rt_queues: (Arc<RawQueue>, Arc<RawQueue>),
    group: Arc<RawQueue>,
    fan_out: Option<FanOut>,
    /// Messages each competing consumer took.
    shares: Vec<u64>,
}

impl Baseline for RawAmqp {
    fn throughput(&mut self, rt: &Runtime, body: &Arc<Vec<u8>>, n: usize) -> Duration {
        rt.block_on(raw_amqp::raw_send_receive(
            self.raw.publish.clone(),
            self.local.clone(),
            body.clone(),
            n,
            Mode::Concurrent,
        ))
    }

    fn two_receivers(&mut self, rt: &Runtime, body: &Arc<Vec<u8>>, n: usize) -> Duration {
        let (d, each) = rt.block_on(raw_amqp::raw_competing(
            self.raw.publish.clone(),
            &self.competing,
            body.clone(),
            n,
            Mode::Concurrent,
            layer_side::STALL,
        ));
        for (s, e) in self.shares.iter_mut().zip(each) {
            *s += e;
        }
        d
    }

    fn round_trips(
        &mut self,
        rt: &Runtime,
        body: &Arc<Vec<u8>>,
        iters: u64,
        latencies: &Mutex<Vec<Duration>>,
    ) -> Duration {
        rt.block_on(raw_amqp::raw_round_trips(
            (self.raw.clone(), self.raw_peer.clone()),
            self.rt_queues.clone(),
            body.clone(),
            iters,
            latencies,
        ))
    }

    fn prepare_group(&mut self, members: usize, m: usize) {
        self.fan_out = Some(FanOut::new(members, m + 16));
    }

    fn group_send(&mut self, rt: &Runtime, body: &Arc<Vec<u8>>, m: usize) -> Duration {
        let fan_out = self.fan_out.as_mut().expect("prepare_group first");
        rt.block_on(raw_amqp::raw_group_send(
            self.raw.publish.clone(),
            self.group.clone(),
            fan_out,
            body.clone(),
            m,
            Mode::Concurrent,
        ))
    }

    fn close(&mut self, rt: &Runtime) {
        println!(
            "backends/two_receivers/amqp/raw: messages taken by each consumer: {:?}",
            self.shares
        );
        rt.block_on(async {
            let _ = self
                .raw
                .publish
                .queue_delete(
                    lapin::types::ShortString::from(self.competing[0].name.as_str()),
                    lapin::options::QueueDeleteOptions::default(),
                )
                .await;
            for r in [&self.raw, &self.raw_peer] {
                let _ = r
                    .conn
                    .close(200, lapin::types::ShortString::from("bye"))
                    .await;
            }
        });
    }
}

fn amqp(rt: &Runtime) -> Result<Subject, String> {
    let base = raw_amqp::broker_url();
    let prefix = format!(
        "chanlayer-bench-{}",
        chanlayer_core::names::new_instance_id()
    );
    let sep = if base.contains('?') { '&' } else { '?' };
    // One shared groups exchange for every run (the default, `{prefix}.groups`, is durable
    // and would stay behind once per random prefix); the raw group queue is bound to it too.
    let exchange = "chanlayer-bench.groups";
    let url = format!(
        "{base}{sep}prefix={prefix}&groups_exchange={exchange}&queue_expires={}s&capacity={}&prefetch={}&connection_timeout=5s",
        raw_amqp::QUEUE_EXPIRES.as_secs(),
        raw_amqp::CAPACITY,
        raw_amqp::PREFETCH,
    );
    let config = LayerConfig::from_url(&url).map_err(|e| e.to_string())?;
    let (layer, peer, raw, raw_peer) = rt.block_on(async {
        let layer = AmqpLayer::connect(&config)
            .await
            .map_err(|e| e.to_string())?;
        let peer = AmqpLayer::connect(&config)
            .await
            .map_err(|e| e.to_string())?;
        let raw = raw_amqp::connect(&base, "sender").await?;
        let raw_peer = raw_amqp::connect(&base, "peer").await?;
        Ok::<_, String>((Arc::new(layer), Arc::new(peer), raw, raw_peer))
    })?;
    let expiry = layer.options().expiry;
    let normal = NORMAL;
    let normal_queue = layer.channel_queue(normal);
    let raw_side = rt.block_on(async {
        let q = |r: &Arc<Raw>, name: &str, normal: bool| {
            let (r, name) = (r.clone(), format!("{prefix}.raw.{name}"));
            async move { r.queue(name, normal, expiry).await.map(Arc::new) }
        };
        let first = q(&raw, "two", true).await?;
        let second = Arc::new(raw_peer.competing_consumer(&first, "second").await?);
        let group = Arc::new(
            raw.group_queue(
                format!("{prefix}.raw.group"),
                exchange,
                &format!("{prefix}.raw.group"),
                expiry,
            )
            .await?,
        );
        Ok::<_, lapin::Error>(RawAmqp {
            local: q(&raw, "local", false).await?,
            competing: vec![first, second],
            rt_queues: (
                q(&raw, "rt.a", false).await?,
                q(&raw_peer, "rt.b", false).await?,
            ),
            group,
            raw: raw.clone(),
            raw_peer: raw_peer.clone(),
            fan_out: None,
            shares: vec![0, 0],
        })
    });
    let raw_side = raw_side.map_err(|e| format!("raw lapin: {e}"))?;
    let (l, p): (Dyn, Dyn) = (layer.clone(), peer.clone());
    let local: Arc<str> = rt
        .block_on(l.new_channel("bench"))
        .map_err(|e| e.to_string())?
        .into();
    let rt_channels = (
        rt.block_on(l.new_channel("rt"))
            .map_err(|e| e.to_string())?
            .into(),
        rt.block_on(p.new_channel("rt"))
            .map_err(|e| e.to_string())?
            .into(),
    );
    let teardown = {
        let (layer, peer) = (layer.clone(), peer.clone());
        Box::new(move |rt: &Runtime| {
            rt.block_on(async {
                let _ = raw
                    .publish
                    .queue_delete(
                        lapin::types::ShortString::from(normal_queue.as_str()),
                        lapin::options::QueueDeleteOptions::default(),
                    )
                    .await;
                let _ = layer.close().await;
                let _ = peer.close().await;
            });
        })
    };
    Ok(Subject {
        name: "amqp",
        base: 2_000,
        depth: chanlayer_benches::DEPTH,
        max_size: None,
        settle_two_receivers: false,
        layers: Layers {
            throughput: (l.clone(), l.clone(), local),
            two: (l.clone(), vec![l.clone(), p.clone()], Arc::from(normal)),
            round_trip: ((l.clone(), p.clone()), rt_channels),
            group: (p.clone(), l.clone()),
            all: vec![l, p],
            extra_check: None,
        },
        raw: Box::new(raw_side),
        teardown: Some(teardown),
    })
}

// ---------------------------------------------------------------------------------------
// Kafka.

struct RawKafkaSide {
    raw: RawKafka,
    producer: rdkafka::producer::FutureProducer,
    local: (String, Counter),
    normal: (String, Counter),
    round_trip: (String, String, Counter, Option<Echo>),
    group: (String, Counter),
    fan_out: Option<FanOut>,
    /// Topics the layers created and leave behind (their inboxes go on close).
    layer_topics: Vec<String>,
}

impl Baseline for RawKafkaSide {
    fn throughput(&mut self, rt: &Runtime, body: &Arc<Vec<u8>>, n: usize) -> Duration {
        rt.block_on(raw_kafka::raw_send_receive(
            &self.producer,
            (&self.local.0, &self.local.1),
            body,
            n,
            Mode::Concurrent,
        ))
    }

    fn two_receivers(&mut self, rt: &Runtime, body: &Arc<Vec<u8>>, n: usize) -> Duration {
        rt.block_on(raw_kafka::raw_send_receive(
            &self.producer,
            (&self.normal.0, &self.normal.1),
            body,
            n,
            Mode::Concurrent,
        ))
    }

    fn warm_two_receivers(&mut self, rt: &Runtime, body: &Arc<Vec<u8>>) -> bool {
        let before = self.normal.1.per_consumer();
        rt.block_on(raw_kafka::raw_send_receive(
            &self.producer,
            (&self.normal.0, &self.normal.1),
            body,
            20,
            Mode::Seq,
        ));
        let after = self.normal.1.per_consumer();
        before.iter().zip(&after).all(|(b, a)| a > b)
    }

    fn round_trips(
        &mut self,
        rt: &Runtime,
        body: &Arc<Vec<u8>>,
        iters: u64,
        latencies: &Mutex<Vec<Duration>>,
    ) -> Duration {
        rt.block_on(raw_kafka::raw_round_trips(
            &self.producer,
            (&self.round_trip.1, &self.round_trip.2),
            body,
            iters,
            latencies,
        ))
    }

    fn prepare_group(&mut self, members: usize, m: usize) {
        let fan_out = FanOut::new(members, m + 16);
        self.group.1.fan_out_to(Some(fan_out.members()));
        self.fan_out = Some(fan_out);
    }

    fn group_send(&mut self, rt: &Runtime, body: &Arc<Vec<u8>>, m: usize) -> Duration {
        let fan_out = self.fan_out.as_mut().expect("prepare_group first");
        rt.block_on(raw_kafka::raw_group_send(
            &self.producer,
            (&self.group.0, b"bench.group"),
            fan_out,
            body,
            m,
            Mode::Concurrent,
        ))
    }

    fn close(&mut self, rt: &Runtime) {
        if let Some(echo) = self.round_trip.3.take() {
            echo.stop();
        }
        for c in [
            &self.local.1,
            &self.normal.1,
            &self.round_trip.2,
            &self.group.1,
        ] {
            c.stop();
        }
        let (received, sent) = (self.normal.1.received(), self.normal.1.per_consumer());
        println!(
            "backends kafka raw two_receivers: {received} messages read, per consumer {sent:?}"
        );
        let mut topics = vec![
            self.local.0.as_str(),
            self.normal.0.as_str(),
            self.round_trip.0.as_str(),
            self.round_trip.1.as_str(),
            self.group.0.as_str(),
        ];
        topics.extend(self.layer_topics.iter().map(String::as_str));
        rt.block_on(self.raw.delete_topics(&topics));
    }
}

/// Whether a 1 MiB message goes through the broker (raw and through the layer); `Err`
/// with the reason when it does not.
fn kafka_huge_ok(
    rt: &Runtime,
    raw: &RawKafka,
    (sender, receiver): (&Dyn, &Dyn),
) -> Result<(), String> {
    let body = vec![0xA5u8; 1024 * 1024];
    rt.block_on(async {
        let topic = format!("{}.raw.probe", raw.prefix);
        raw.create_topic(&topic, 1).await;
        let producer = raw.producer("probe");
        let r = tokio::time::timeout(
            Duration::from_secs(30),
            raw_kafka::enqueue(&producer, &topic, &body),
        )
        .await;
        raw.delete_topics(&[topic.as_str()]).await;
        match r {
            Err(_) => {
                return Err(
                    "a 1 MiB record to a raw topic: no delivery report within 30s".to_owned(),
                )
            }
            Ok(Err(_)) => {
                return Err("a 1 MiB record to a raw topic: the producer went away".to_owned())
            }
            Ok(Ok(Err((e, _)))) => return Err(format!("the broker refused a 1 MiB record: {e}")),
            Ok(Ok(Ok(_))) => {}
        }
        let channel = receiver
            .new_channel("probe")
            .await
            .map_err(|e| e.to_string())?;
        sender
            .send(&channel, message(&body))
            .await
            .map_err(|e| format!("the layer could not send 1 MiB: {e}"))?;
        match tokio::time::timeout(Duration::from_secs(30), receiver.receive(&channel)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("the layer could not receive 1 MiB: {e}")),
            Err(_) => Err("a 1 MiB message through the layer did not arrive within 30s".to_owned()),
        }
    })
}

fn kafka(rt: &Runtime) -> Result<Subject, String> {
    let bootstrap = raw_kafka::bootstrap();
    raw_kafka::reachable(&bootstrap)?;
    let prefix = format!(
        "chanlayer-bench-{}",
        chanlayer_core::names::new_instance_id()
    );
    // Two partitions for the normal channel (and the groups topic), so that both
    // competing receivers get some. Otherwise the layer's defaults (prefetch 500, linger
    // 1 ms, fetch wait 100 ms); CHANLAYER_KAFKA_BENCH_OPTIONS adds options to both sides.
    let mut url = format!(
        "kafka://{bootstrap}?prefix={prefix}&retention=1h&capacity=10000&partitions=2&connection_timeout=5s"
    );
    if let Ok(extra) = std::env::var("CHANLAYER_KAFKA_BENCH_OPTIONS") {
        if !extra.is_empty() {
            url = format!("{url}&{extra}");
        }
    }
    let config = LayerConfig::from_url(&url).map_err(|e| e.to_string())?;
    let cfg = KafkaConfig::from_layer_config(&config).map_err(|e| e.to_string())?;
    let connect = || async {
        match tokio::time::timeout(Duration::from_secs(30), KafkaLayer::connect(&config)).await {
            Ok(Ok(l)) => Ok(Arc::new(l)),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("connecting the layer timed out after 30s".to_owned()),
        }
    };
    let (layer, peer) =
        rt.block_on(async { Ok::<_, String>((connect().await?, connect().await?)) })?;
    let raw = RawKafka::new(cfg, config.options.max_message_size, prefix.clone())?;
    let (l, p): (Dyn, Dyn) = (layer.clone(), peer.clone());

    let max_size = kafka_huge_ok(rt, &raw, (&p, &l))
        .err()
        .map(|why| (64 * 1024, why));

    let topic = |name: &str| format!("{prefix}.raw.{name}");
    let (local, normal, to_a, to_b, group) = (
        topic("local"),
        topic("two"),
        topic("rt.a"),
        topic("rt.b"),
        topic("group"),
    );
    rt.block_on(async {
        raw.create_topic(&local, 1).await;
        raw.create_topic(&normal, raw.cfg.partitions).await;
        raw.create_topic(&to_a, 1).await;
        raw.create_topic(&to_b, 1).await;
        raw.create_topic(&group, 1).await;
    });
    let commit = Some((normal.clone(), raw.cfg.commit_interval));
    let raw_side = RawKafkaSide {
        producer: raw.producer("raw-producer"),
        local: (
            local.clone(),
            Counter::start("raw local", raw.consumer(&local, false), None),
        ),
        normal: (
            normal.clone(),
            Counter::start_many(
                "raw two",
                vec![
                    (raw.consumer(&normal, true), commit.clone()),
                    (raw.consumer(&normal, true), commit),
                ],
            ),
        ),
        round_trip: (
            to_a.clone(),
            to_b.clone(),
            Counter::start("raw replies", raw.consumer(&to_a, false), None),
            Some(Echo::start(
                raw.consumer(&to_b, false),
                raw.producer("raw-echo"),
                to_a.clone(),
                rt.handle().clone(),
            )),
        ),
        group: (
            group.clone(),
            Counter::start("raw group", raw.consumer(&group, false), None),
        ),
        fan_out: None,
        layer_topics: vec![layer.channel_topic(NORMAL), layer.groups_topic().to_owned()],
        raw,
    };

    let local_channel: Arc<str> = rt
        .block_on(l.new_channel("bench"))
        .map_err(|e| e.to_string())?
        .into();
    let rt_channels = (
        rt.block_on(l.new_channel("rt"))
            .map_err(|e| e.to_string())?
            .into(),
        rt.block_on(p.new_channel("rt"))
            .map_err(|e| e.to_string())?
            .into(),
    );
    let teardown = Box::new(move |rt: &Runtime| {
        rt.block_on(async {
            let _ = layer.close().await;
            let _ = peer.close().await;
        });
    });
    Ok(Subject {
        name: "kafka",
        base: 2_000,
        depth: chanlayer_benches::DEPTH,
        max_size,
        settle_two_receivers: true,
        layers: Layers {
            throughput: (p.clone(), l.clone(), local_channel),
            two: (p.clone(), vec![l.clone(), p.clone()], Arc::from(NORMAL)),
            round_trip: ((l.clone(), p.clone()), rt_channels),
            group: (p.clone(), l.clone()),
            all: vec![l, p],
            extra_check: None,
        },
        raw: Box::new(raw_side),
        teardown: Some(teardown),
    })
}

// ---------------------------------------------------------------------------------------
// The scenarios.

/// Before measuring: every path once, both receivers of `two_receivers` at work (a Kafka
/// consumer group settled), round trips warm.
fn warm_up(rt: &Runtime, s: &mut Subject, full: bool) {
    let body = Arc::new(vec![0xA5u8; SMALL]);
    let (sender, receiver, channel) = &s.layers.throughput;
    rt.block_on(layer_side::send_receive(
        (sender, receiver),
        channel,
        &body,
        10,
        s.depth,
    ));
    s.raw.throughput(rt, &body, 10);
    let warm = Mutex::new(Vec::new());
    let ((a, b), (to_a, to_b)) = &s.layers.round_trip;
    rt.block_on(layer_side::round_trips(
        (a, b),
        (to_a, to_b),
        &body,
        3,
        &warm,
    ));
    s.raw.round_trips(rt, &body, 3, &warm);

    let (sender, receivers, channel) = &s.layers.two;
    let broadcast = !receivers[0].capabilities().single_reader_normal_channels;
    let deadline = Instant::now() + Duration::from_secs(if full { 30 } else { 15 });
    let (mut layer_ready, mut raw_ready) = (false, false);
    loop {
        if !layer_ready {
            // One at a time: with the producer's sticky partitioner, a burst goes to one
            // partition, and one receiver.
            let (_, each) = rt.block_on(layer_side::two_receivers(
                sender,
                receivers,
                channel,
                &body,
                (20, 1),
                broadcast,
            ));
            layer_ready = !s.settle_two_receivers || each.iter().all(|n| *n > 0);
        }
        if !raw_ready {
            raw_ready = s.raw.warm_two_receivers(rt, &body) || !s.settle_two_receivers;
        }
        if layer_ready && raw_ready {
            break;
        }
        if Instant::now() > deadline {
            println!(
                "backends {}: two_receivers: not every receiver got messages while warming up (layer: {layer_ready}, raw: {raw_ready}); measuring anyway",
                s.name
            );
            break;
        }
    }
    s.layers.check(s.name);
}

fn run(c: &mut Criterion, rt: &Runtime, s: &mut Subject, full: bool) {
    warm_up(rt, s, full);
    let name = s.name;
    let depth = s.depth;

    // Throughput through one process-local channel.
    let mut g = c.benchmark_group("backends/throughput");
    configure(&mut g);
    for size in SIZES {
        if let Some((max, why)) = &s.max_size {
            if size > *max {
                println!("backends/throughput/{name}/*/{size} skipped: {why}");
                continue;
            }
        }
        let n = messages(s.base, size, full);
        g.throughput(Throughput::Elements(n as u64));
        let body = Arc::new(vec![0xA5u8; size]);
        let layers = &s.layers;
        let (sender, receiver, channel) = &layers.throughput;
        g.bench_with_input(
            BenchmarkId::new(format!("{name}/layer"), size),
            &size,
            |b, _| {
                b.iter_custom(|iters| {
                    (0..iters)
                        .map(|_| {
                            let d = rt.block_on(layer_side::send_receive(
                                (sender, receiver),
                                channel,
                                &body,
                                n,
                                depth,
                            ));
                            layers.check(name);
                            d
                        })
                        .sum()
                })
            },
        );
        let raw = &mut s.raw;
        g.bench_with_input(
            BenchmarkId::new(format!("{name}/raw"), size),
            &size,
            |b, _| b.iter_custom(|iters| (0..iters).map(|_| raw.throughput(rt, &body, n)).sum()),
        );
    }
    g.finish();

    // A normal channel with two receivers.
    let body = Arc::new(vec![0xA5u8; SMALL]);
    let mut g = c.benchmark_group("backends/two_receivers");
    configure(&mut g);
    let n = if full { s.base } else { N_TEST };
    let (sender, receivers, channel) = &s.layers.two;
    let broadcast = !receivers[0].capabilities().single_reader_normal_channels;
    // Broadcast: every receiver gets every message.
    let deliveries = if broadcast { 2 * n } else { n };
    g.throughput(Throughput::Elements(deliveries as u64));
    let layers = &s.layers;
    let shares = Mutex::new(vec![0u64; receivers.len()]);
    g.bench_with_input(
        BenchmarkId::new(format!("{name}/layer"), SMALL),
        &SMALL,
        |b, _| {
            b.iter_custom(|iters| {
                (0..iters)
                    .map(|_| {
                        let (d, each) = rt.block_on(layer_side::two_receivers(
                            sender,
                            receivers,
                            channel,
                            &body,
                            (n, depth),
                            broadcast,
                        ));
                        let mut shares = shares.lock().expect("shares lock");
                        for (s, e) in shares.iter_mut().zip(each) {
                            *s += e;
                        }
                        layers.check(name);
                        d
                    })
                    .sum()
            })
        },
    );
    let raw = &mut s.raw;
    g.bench_with_input(
        BenchmarkId::new(format!("{name}/raw"), SMALL),
        &SMALL,
        |b, _| b.iter_custom(|iters| (0..iters).map(|_| raw.two_receivers(rt, &body, n)).sum()),
    );
    g.finish();
    println!(
        "backends/two_receivers/{name}/layer: messages taken by each receiver: {:?} ({})",
        shares.lock().expect("shares lock"),
        if broadcast {
            "broadcast: each gets every message"
        } else {
            "competing: each message reaches one"
        }
    );

    // Round trips.
    let mut g = c.benchmark_group("backends/round_trip");
    configure(&mut g);
    let layer_latencies = Mutex::new(Vec::new());
    let raw_latencies = Mutex::new(Vec::new());
    let ((a, b_), (to_a, to_b)) = &s.layers.round_trip;
    let layers = &s.layers;
    g.bench_with_input(
        BenchmarkId::new(format!("{name}/layer"), SMALL),
        &SMALL,
        |b, _| {
            b.iter_custom(|iters| {
                let d = rt.block_on(layer_side::round_trips(
                    (a, b_),
                    (to_a, to_b),
                    &body,
                    iters,
                    &layer_latencies,
                ));
                layers.check(name);
                d
            })
        },
    );
    let raw = &mut s.raw;
    g.bench_with_input(
        BenchmarkId::new(format!("{name}/raw"), SMALL),
        &SMALL,
        |b, _| b.iter_custom(|iters| raw.round_trips(rt, &body, iters, &raw_latencies)),
    );
    g.finish();
    report_latencies(
        &format!("backends/round_trip/{name}/layer"),
        &layer_latencies,
        10,
    );
    report_latencies(
        &format!("backends/round_trip/{name}/raw"),
        &raw_latencies,
        10,
    );

    // group_send to N process-local members of one receiving instance.
    let mut g = c.benchmark_group("backends/group_send");
    configure(&mut g);
    for members in GROUP_SIZES {
        let m = group_messages(s.base, members, full);
        let group = format!("bench.g{members}");
        let (sender, receiver) = &s.layers.group;
        let channels: Arc<Vec<String>> = Arc::new(rt.block_on(async {
            let mut v = Vec::with_capacity(members);
            for _ in 0..members {
                let ch = receiver.new_channel("member").await.expect("new_channel");
                receiver.group_add(&group, &ch).await.expect("group_add");
                v.push(ch);
            }
            v
        }));
        s.raw.prepare_group(members, m);
        // Once, unmeasured: the first message of a group finds every path set up.
        rt.block_on(layer_side::group_send(
            (sender, receiver),
            &group,
            &channels,
            &body,
            1,
            depth,
        ));
        s.raw.group_send(rt, &body, 1);
        g.throughput(Throughput::Elements((m * members) as u64));
        let layers = &s.layers;
        g.bench_with_input(
            BenchmarkId::new(format!("{name}/layer"), members),
            &members,
            |b, _| {
                b.iter_custom(|iters| {
                    (0..iters)
                        .map(|_| {
                            let d = rt.block_on(layer_side::group_send(
                                (sender, receiver),
                                &group,
                                &channels,
                                &body,
                                m,
                                depth,
                            ));
                            layers.check(name);
                            d
                        })
                        .sum()
                })
            },
        );
        let raw = &mut s.raw;
        g.bench_with_input(
            BenchmarkId::new(format!("{name}/raw"), members),
            &members,
            |b, _| b.iter_custom(|iters| (0..iters).map(|_| raw.group_send(rt, &body, m)).sum()),
        );
    }
    g.finish();
    s.layers.check(name);
    println!("backends {name}: every iteration got all its messages; the layers counted 0 dropped, 0 expired, 0 undecodable");
}

fn backends(c: &mut Criterion) {
    chanlayer_benches::install_recorder_if_asked();
    let rt = runtime();
    let full = bench_mode();
    type Setup = fn(&Runtime) -> Result<Subject, String>;
    let subjects: [(&str, Setup); 5] = [
        ("memory", memory),
        ("zmq_embedded", |rt| zmq_subject(rt, false)),
        ("zmq_dedicated", |rt| zmq_subject(rt, true)),
        ("amqp", amqp),
        ("kafka", kafka),
    ];
    for (name, setup) in subjects {
        let start = Instant::now();
        let mut s = match setup(&rt) {
            Ok(s) => s,
            Err(why) => {
                // `why` names the broker without credentials (the layers' errors never
                // show them).
                println!("backends: {name} skipped: {why}");
                continue;
            }
        };
        run(c, &rt, &mut s, full);
        if let Some(teardown) = s.teardown.take() {
            teardown(&rt);
        }
        s.raw.close(&rt);
        println!("backends {name}: {:.1} s", start.elapsed().as_secs_f64());
    }
}

criterion_group!(benches, backends);
criterion_main!(benches);
