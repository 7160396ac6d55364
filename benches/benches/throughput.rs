//! Send+receive throughput: the memory backend beside raw `tokio::sync::mpsc` doing the same
//! work (one sender task, one receiver task, the same 64 B / 1 KiB bodies), in one run.
//!
//! ```text
//! cargo bench -p chanlayer-benches --bench throughput        # full run
//! cargo test -p chanlayer-benches --benches                  # each bench once (CI)
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use chanlayer_benches::{raw_mpsc, runtime};
use chanlayer_core::{ChannelLayer, Codec, LayerConfig, MemoryLayer, Message};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

/// Messages per measured iteration.
const N: usize = 10_000;

/// N messages through a memory layer: sender task -> process-local channel -> receiver task.
async fn memory_round(layer: Arc<MemoryLayer>, channel: Arc<str>, body: Arc<Vec<u8>>) -> Duration {
    let start = Instant::now();
    let rx = {
        let (layer, channel) = (layer.clone(), channel.clone());
        tokio::spawn(async move {
            for _ in 0..N {
                let m = layer.receive(&channel).await.expect("receive");
                std::hint::black_box(m.body().len());
            }
        })
    };
    for _ in 0..N {
        let m = Message::new("bench", Codec::Bincode, body.as_ref().clone());
        layer.send(&channel, m).await.expect("send");
    }
    rx.await.expect("receiver");
    start.elapsed()
}

fn send_receive(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("send_receive");
    group.throughput(Throughput::Elements(N as u64));
    group.sample_size(20);
    for size in [64usize, 1024] {
        let body = Arc::new(vec![0xA5u8; size]);
        let cfg = LayerConfig::from_url(&format!("memory://?capacity={N}")).expect("config");
        let layer = Arc::new(rt.block_on(MemoryLayer::connect(&cfg)).expect("connect"));
        let channel: Arc<str> = rt
            .block_on(layer.new_channel("bench"))
            .expect("new_channel")
            .into();
        group.bench_with_input(BenchmarkId::new("memory", size), &size, |b, _| {
            b.iter_custom(|iters| {
                (0..iters)
                    .map(|_| {
                        rt.block_on(memory_round(layer.clone(), channel.clone(), body.clone()))
                    })
                    .sum()
            })
        });
        group.bench_with_input(BenchmarkId::new("tokio_mpsc", size), &size, |b, _| {
            b.iter_custom(|iters| {
                (0..iters)
                    .map(|_| rt.block_on(raw_mpsc::send_receive(body.clone(), N)))
                    .sum()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, send_receive);
criterion_main!(benches);
