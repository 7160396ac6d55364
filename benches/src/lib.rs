//! What the bench targets in `benches/` share: the raw clients doing a layer's work on the
//! wire (one module per backend), the generic layer side of the `backends` scenarios, and
//! the runtime, free-port, test-mode and latency helpers.
//!
//! - [`raw_mpsc`]: tokio mpsc, the in-process baseline, and [`raw_mpsc::FanOut`], the N
//!   local queues every raw group baseline pushes into.
//! - [`raw_amqp`]: raw lapin with the layer's confirms, acks and queue arguments.
//! - [`raw_kafka`]: raw rdkafka (`FutureProducer`, `BaseConsumer` threads) with the layer's
//!   settings.
//! - [`raw_zmq`]: raw zmq PUB/SUB sockets, and PUSH → forwarder → PUB for dedicated mode.
//! - [`layer_side`]: the same scenarios through `ChannelLayer`, for any backend.

use std::net::TcpListener;
use std::sync::Mutex;
use std::time::Duration;

use chanlayer_core::{Codec, Message};

pub mod layer_side;
pub mod raw_amqp;
pub mod raw_kafka;
pub mod raw_mpsc;
pub mod raw_zmq;

/// Sends in flight in the `concurrent` mode of the broker benches, for the layer and for
/// the raw client alike.
pub const DEPTH: usize = 64;

/// A two-worker tokio runtime (the machines these run on have two cores).
/// With `CHANLAYER_BENCH_RECORDER=prometheus` in the environment, installs the Prometheus
/// metrics recorder (once, before any layer connects), so a run measures the layer with its
/// metrics recorded; without it, no recorder: the two runs side by side are the recorder's
/// cost.
pub fn install_recorder_if_asked() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if std::env::var("CHANLAYER_BENCH_RECORDER").as_deref() == Ok("prometheus") {
            match metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder() {
                Ok(handle) => {
                    eprintln!("bench: Prometheus metrics recorder installed");
                    std::mem::forget(handle);
                }
                Err(e) => eprintln!("bench: could not install the metrics recorder: {e}"),
            }
        }
    });
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime builds")
}

/// `cargo bench` passes `--bench`; `cargo test` runs each bench once without it.
pub fn bench_mode() -> bool {
    std::env::args().any(|a| a == "--bench")
}

/// A free TCP port on the loopback interface (bound, read, released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free loopback port")
        .port()
}

/// A bench message: type `bench`, bincode codec, a copy of `body`.
pub fn message(body: &[u8]) -> Message {
    Message::new("bench", Codec::Bincode, body.to_vec())
}

/// How a throughput bench sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// One sender awaiting each confirm (delivery report) before the next send.
    Seq,
    /// [`DEPTH`] sends in flight.
    Concurrent,
}

impl Mode {
    /// `seq` or `concurrent`, as in the benchmark ids.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Seq => "seq",
            Mode::Concurrent => "concurrent",
        }
    }

    /// Sends in flight: 1 (`seq`) or [`DEPTH`], the `depth` of the [`layer_side`]
    /// functions.
    pub fn depth(self) -> usize {
        match self {
            Mode::Seq => 1,
            Mode::Concurrent => DEPTH,
        }
    }
}

/// The `p` quantile (0.0 ..= 1.0) of sorted durations.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Prints p50/p90/p99/max of the round trips in `latencies` (and empties it), if there are
/// at least `min` of them.
pub fn report_latencies(name: &str, latencies: &Mutex<Vec<Duration>>, min: usize) {
    let mut v = std::mem::take(&mut *latencies.lock().expect("latencies lock"));
    if v.len() < min.max(1) {
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
