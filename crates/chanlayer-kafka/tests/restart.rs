//! The broker killed (SIGKILL) under a stream of sends and started again on the same log
//! directory: no `Ok`-acknowledged message is lost, and the receive loop carries on by
//! itself. Also: with the broker gone, a send waits up to `delivery_timeout` and then fails
//! with a clear error, and `close` still returns.
//!
//! The test runs its own Apache Kafka node (`scripts/brokers/kafka.sh nodes`, see
//! `common::nodes`) in a temporary directory on free ports, so no other test sees the
//! broker go away.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chanlayer_core::{ChannelLayer, Codec, Error, LayerConfig, LayerOptions, Message};
use chanlayer_kafka::KafkaLayer;
use common::nodes::KafkaNodes;

fn seq(i: u64) -> Message {
    Message::encode_as("test.seq", &i, Codec::Bincode).expect("encode")
}

async fn connect(bootstrap: &str, prefix: &str, extra: &str) -> KafkaLayer {
    let mut config = LayerConfig::from_url(&format!(
        "kafka://{bootstrap}?session_timeout=6s&connection_timeout=5s{extra}"
    ))
    .expect("url");
    config.options = LayerOptions {
        prefix: prefix.to_owned(),
        capacity: 100_000,
        ..LayerOptions::default()
    };
    KafkaLayer::connect(&config).await.expect("connect")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_killed_and_restarted_mid_stream_loses_no_acknowledged_message() {
    let broker = Arc::new(
        tokio::task::spawn_blocking(|| KafkaNodes::start(1))
            .await
            .expect("start"),
    );
    let at = broker.bootstrap();
    let prefix = "restart";
    let sender = Arc::new(connect(&at, prefix, "&delivery_timeout=60s").await);
    let receiver = Arc::new(connect(&at, prefix, "").await);
    let ch = "restart.stream";

    // One receive loop for the whole test: it must carry on across the restart by itself.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
    let reader = {
        let receiver = receiver.clone();
        tokio::spawn(async move {
            loop {
                match receiver.receive(ch).await {
                    Ok(m) => {
                        if tx.send(m.decode::<u64>().expect("decode")).is_err() {
                            return;
                        }
                    }
                    Err(Error::Closed) => return,
                    Err(e) => panic!("the receive loop failed across the restart: {e}"),
                }
            }
        })
    };

    // Sends in flight while the broker is killed and started again: each one either is
    // acknowledged (then it must arrive) or fails (then it may or may not arrive).
    let mut acked = BTreeSet::new();
    let mut tasks = Vec::new();
    let mut restart = None;
    let mut killed_at = None;
    for i in 0..600u64 {
        if i == 300 {
            broker.kill(1);
            killed_at = Some(Instant::now());
            let b = broker.clone();
            restart = Some(tokio::task::spawn_blocking(move || {
                b.restart(1);
                Instant::now()
            }));
        }
        let sender = sender.clone();
        tasks.push(tokio::spawn(
            async move { (i, sender.send(ch, seq(i)).await) },
        ));
        if i % 50 == 49 {
            // Keep at most ~50 in flight.
            for t in tasks.drain(..) {
                let (i, r) = t.await.expect("send task");
                if r.is_ok() {
                    acked.insert(i);
                }
            }
        }
    }
    for t in tasks.drain(..) {
        let (i, r) = t.await.expect("send task");
        if r.is_ok() {
            acked.insert(i);
        }
    }
    let up_at = restart
        .expect("the broker was killed")
        .await
        .expect("restart");
    let killed_at = killed_at.expect("killed");
    eprintln!(
        "broker back {:.1} s after the kill; {} of 600 sends acknowledged",
        (up_at - killed_at).as_secs_f64(),
        acked.len()
    );
    assert!(
        acked.len() >= 500,
        "most sends are acknowledged: {}",
        acked.len()
    );
    let mut got = BTreeSet::new();
    while !acked.is_subset(&got) {
        match tokio::time::timeout(Duration::from_secs(60), rx.recv()).await {
            Ok(Some(s)) => {
                got.insert(s);
            }
            _ => {
                let missing: Vec<_> = acked.difference(&got).take(20).collect();
                panic!(
                    "acknowledged messages lost across the restart: {} missing, first {missing:?}",
                    acked.difference(&got).count()
                );
            }
        }
    }

    // With the broker down, a send fails clearly within delivery_timeout.
    eprintln!(
        "every acknowledged message received {:.1} s after the kill",
        killed_at.elapsed().as_secs_f64()
    );
    let quick = connect(&at, prefix, "&delivery_timeout=2s&connection_timeout=2s").await;
    quick
        .send(ch, seq(9998))
        .await
        .expect("send while the broker is up");
    broker.kill(1);
    let err = tokio::time::timeout(Duration::from_secs(30), quick.send(ch, seq(9999)))
        .await
        .expect("the send gives up within its delivery_timeout")
        .expect_err("the broker is down");
    let text = err.to_string();
    assert!(
        text.contains("delivery_timeout") && text.contains(&broker.port(1).to_string()),
        "{text}"
    );

    // Closing with the broker down ends too (the inbox topics are left to retention).
    let closing = tokio::time::timeout(Duration::from_secs(30), async {
        tokio::join!(quick.close(), sender.close(), receiver.close())
    })
    .await;
    assert!(
        matches!(closing, Ok((Ok(()), Ok(()), Ok(())))),
        "close returns Ok while the broker is down: {closing:?}"
    );
    reader.await.expect("the receive loop ends with Closed");
}
