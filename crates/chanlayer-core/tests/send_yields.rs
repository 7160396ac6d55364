//! Loops of operations that never wait still yield to the runtime. A test binary of its
//! own: its busy sends register the layer's span callsites while the library's unit tests
//! (`otel`) install a subscriber, a race in `tracing` that could leave their spans disabled.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chanlayer_core::{ChannelLayer, LayerConfig, MemoryLayer, Message};

/// A task whose sends and receives always find the operation ready must still give
/// its worker thread back now and then; otherwise other tasks and timers on that
/// thread starve (the cause of a hang seen in CI when `close` raced busy tasks).
#[test]
fn ready_operations_yield_to_the_runtime() {
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    // The runtime lives in its own thread so that a starved runtime fails this test
    // by timeout instead of hanging the test binary.
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a current-thread runtime builds");
        rt.block_on(async move {
            let config = LayerConfig::from_url("memory://").expect("memory:// parses");
            let layer = Arc::new(
                MemoryLayer::connect(&config)
                    .await
                    .expect("memory connects"),
            );
            let channel = layer.new_channel("busy").await.expect("new_channel");
            let stop = Arc::new(AtomicBool::new(false));
            let busy = {
                let (layer, channel, stop) = (layer.clone(), channel.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut rounds = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let m = Message::encode_as("t", &rounds, chanlayer_core::Codec::Json)
                            .expect("a u64 encodes");
                        layer.send(&channel, m).await.expect("send");
                        layer.receive(&channel).await.expect("receive");
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
    let rounds = done_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("a busy send/receive loop must yield to the runtime within 30 s");
    assert!(rounds > 0, "the busy task ran");
}

/// A loop of sends alone (a publish that is done when called, as the memory backend's and
/// ZeroMQ's are) still gives its worker thread back: core spends the task's tokio budget
/// every eighth send.
#[test]
fn a_loop_of_ready_sends_yields_to_the_runtime() {
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    // The runtime lives in its own thread: a starved runtime fails by timeout.
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a current-thread runtime builds");
        rt.block_on(async move {
            let config = chanlayer_core::LayerConfig::from_url("memory://?capacity=1000000")
                .expect("the URL parses");
            let layer = Arc::new(
                chanlayer_core::MemoryLayer::connect(&config)
                    .await
                    .expect("memory connects"),
            );
            let channel = layer.new_channel("busy").await.expect("new_channel");
            let stop = Arc::new(AtomicBool::new(false));
            let busy = {
                let (layer, stop) = (layer.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut sent = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let m = chanlayer_core::Message::new(
                            "t",
                            chanlayer_core::Codec::Json,
                            b"1".to_vec(),
                        );
                        layer.send(&channel, m).await.expect("send");
                        sent += 1;
                    }
                    sent
                })
            };
            // On a current-thread runtime this task runs again only if `busy` yields.
            tokio::task::yield_now().await;
            stop.store(true, Ordering::Relaxed);
            let sent = busy.await.expect("busy task");
            done_tx.send(sent).expect("the test thread waits for this");
        });
    });
    let sent = done_rx
        .recv_timeout(std::time::Duration::from_secs(30))
        .expect("a loop of sends must yield to the runtime within 30 s");
    assert!(
        (1..=100_000).contains(&sent),
        "the loop yielded after {sent} sends (every eighth spends the budget of 128)"
    );
}
