//! Loops of operations that never wait still yield to the runtime. A test binary of its
//! own: its busy sends register the layer's span callsites while the library's unit tests
//! (`otel`) install a subscriber, a race in `tracing` that could leave their spans disabled.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chanlayer_core::{ChannelLayer, Codec, LayerConfig, MemoryLayer, Message};

/// Runs `round` (one turn of a loop whose operations are always ready) over and over in a
/// task on a current-thread runtime, on a layer of `url`, until the runtime's other task gets
/// to run once, which it does only if the loop yields. Returns how many rounds ran before.
/// The runtime lives in its own thread: a starved runtime fails by timeout instead of
/// hanging the test binary.
fn rounds_before_a_yield<F, Fut>(url: &'static str, round: F) -> u64
where
    F: Fn(Arc<MemoryLayer>, String, u64) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a current-thread runtime builds");
        rt.block_on(async move {
            let config = LayerConfig::from_url(url).expect("the URL parses");
            let layer = Arc::new(
                MemoryLayer::connect(&config)
                    .await
                    .expect("memory connects"),
            );
            let channel = layer.new_channel("busy").await.expect("new_channel");
            let stop = Arc::new(AtomicBool::new(false));
            let busy = {
                let stop = stop.clone();
                tokio::spawn(async move {
                    let mut rounds = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        round(layer.clone(), channel.clone(), rounds).await;
                        rounds += 1;
                    }
                    rounds
                })
            };
            // On a current-thread runtime this task runs again only if `busy` yields.
            tokio::task::yield_now().await;
            stop.store(true, Ordering::Relaxed);
            let rounds = busy.await.expect("busy task");
            done_tx
                .send(rounds)
                .expect("the test thread waits for this");
        });
    });
    done_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("a busy loop must yield to the runtime within 30 s")
}

/// A task whose sends and receives always find the operation ready must still give
/// its worker thread back now and then; otherwise other tasks and timers on that
/// thread starve (the cause of a hang seen in CI when `close` raced busy tasks).
#[test]
fn ready_operations_yield_to_the_runtime() {
    let rounds = rounds_before_a_yield("memory://", |layer, channel, n| async move {
        let m = Message::encode_as("t", &n, Codec::Json).expect("a u64 encodes");
        layer.send(&channel, m).await.expect("send");
        layer.receive(&channel).await.expect("receive");
    });
    assert!(rounds > 0, "the busy task ran");
}

/// A loop of sends alone (a publish that is done when called, as the memory backend's and
/// ZeroMQ's are) still gives its worker thread back: core spends the task's tokio budget
/// every eighth send.
#[test]
fn a_loop_of_ready_sends_yields_to_the_runtime() {
    let sent = rounds_before_a_yield(
        "memory://?capacity=1000000",
        |layer, channel, _| async move {
            let m = Message::new("t", Codec::Json, b"1".to_vec());
            layer.send(&channel, m).await.expect("send");
        },
    );
    assert!(
        (1..=100_000).contains(&sent),
        "the loop yielded after {sent} sends (every eighth spends the budget of 128)"
    );
}
