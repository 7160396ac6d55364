//! The broker restarted under a stream of confirmed sends (`rabbitmqctl stop_app` /
//! `start_app` on the local RabbitMQ): no confirmed message is lost, the same receive loop
//! carries on, and process-local channels and groups work again after the reconnection.
//! While the broker is down, sends wait up to `reconnect_timeout` and then fail clearly.
//!
//! This is the only test in its binary: cargo runs test binaries one at a time, so no other
//! test sees the broker go away.

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chanlayer_core::{ChannelLayer, Codec, Error, LayerOptions, Message};

fn rabbitmqctl(args: &[&str]) {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl runs (scripts/test installs RabbitMQ)");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn seq(i: u64) -> Message {
    Message::encode_as("test.seq", &i, Codec::Bincode).expect("encode")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_mid_stream_loses_no_confirmed_message() {
    let prefix = format!("r{}", std::process::id());
    let options = LayerOptions {
        prefix: prefix.clone(),
        capacity: 100_000,
        ..LayerOptions::default()
    };
    let sender = Arc::new(common::connect(options.clone(), "").await.expect("connect"));
    let receiver = Arc::new(common::connect(options, "").await.expect("connect"));
    let ch = format!("{prefix}.stream");
    // A process-local channel and a group membership made before the restart.
    let me = receiver.new_channel("before").await.expect("new_channel");
    let group = format!("{prefix}.room");
    receiver.group_add(&group, &me).await.expect("group_add");

    // One receive loop for the whole test: it must carry on across the restart by itself.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
    let reader = {
        let (receiver, ch) = (receiver.clone(), ch.clone());
        tokio::spawn(async move {
            loop {
                match receiver.receive(&ch).await {
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

    // Send before, during and after the restart: keep going until the broker is back and
    // 200 more sends have been confirmed on the new connection.
    let restarted = Arc::new(AtomicBool::new(false));
    let mut sent = 0u64;
    let mut after = 0u64;
    let mut restart = None;
    while after < 200 {
        if sent == 200 {
            let restarted = restarted.clone();
            restart = Some(tokio::task::spawn_blocking(move || {
                rabbitmqctl(&["stop_app"]);
                rabbitmqctl(&["start_app"]);
                restarted.store(true, Ordering::SeqCst);
            }));
        }
        sender
            .send(&ch, seq(sent))
            .await
            .unwrap_or_else(|e| panic!("send {sent} was not confirmed: {e}"));
        sent += 1;
        if restarted.load(Ordering::SeqCst) {
            after += 1;
        }
    }
    restart
        .expect("the restart ran")
        .await
        .expect("restart thread");
    assert!(sender.reconnects() >= 1, "the sender reconnected");
    eprintln!(
        "sent {sent} confirmed messages, {after} of them after the broker came back; sender reconnects: {}",
        sender.reconnects()
    );

    let mut got = BTreeSet::new();
    while (got.len() as u64) < sent {
        match tokio::time::timeout(Duration::from_secs(60), rx.recv()).await {
            Ok(Some(s)) => {
                got.insert(s);
            }
            _ => panic!(
                "{} of {sent} confirmed messages arrived; missing e.g. {:?}",
                got.len(),
                (0..sent).find(|s| !got.contains(s))
            ),
        }
    }
    assert_eq!(got, (0..sent).collect(), "every confirmed message arrived");
    assert!(receiver.reconnects() >= 1, "the receiver reconnected");

    // After the reconnection, the channel made before it and its group work again: the
    // inbox was declared again under the same name and the group bound again.
    sender
        .send(&me, seq(1))
        .await
        .expect("send to a local channel");
    sender.group_send(&group, seq(2)).await.expect("group_send");
    for want in [1, 2] {
        let m = tokio::time::timeout(Duration::from_secs(15), receiver.receive(&me))
            .await
            .expect("arrives")
            .expect("receive");
        assert_eq!(m.decode::<u64>().expect("decode"), want);
    }

    // While the broker is down: a layer with a short reconnect_timeout fails a send with a
    // clear error; one with a long timeout waits and delivers once the broker is back.
    let impatient = common::connect(
        LayerOptions {
            prefix: prefix.clone(),
            ..LayerOptions::default()
        },
        "reconnect_timeout=1s",
    )
    .await
    .expect("connect");
    tokio::task::spawn_blocking(|| rabbitmqctl(&["stop_app"]))
        .await
        .expect("stop_app thread");
    let err = impatient
        .send(&ch, seq(u64::MAX))
        .await
        .expect_err("no broker for longer than reconnect_timeout");
    assert!(matches!(err, Error::Backend { .. }), "{err:?}");
    assert!(err.to_string().contains("unreachable"), "{err}");
    let patient = {
        let (sender, ch) = (sender.clone(), ch.clone());
        tokio::spawn(async move { sender.send(&ch, seq(sent)).await })
    };
    tokio::task::spawn_blocking(|| rabbitmqctl(&["start_app"]))
        .await
        .expect("start_app thread");
    patient
        .await
        .expect("send task")
        .expect("the send made during the outage is confirmed after it");
    // (Earlier messages whose acks the outage cut off may come again first: at-least-once.)
    loop {
        let s = tokio::time::timeout(Duration::from_secs(60), rx.recv())
            .await
            .expect("the message sent during the outage arrives")
            .expect("reader alive");
        assert!(s <= sent, "unexpected message {s}");
        if s == sent {
            break;
        }
    }

    impatient.close().await.expect("close");
    sender.close().await.expect("close");
    receiver.close().await.expect("close");
    reader.await.expect("the reader ends on close");
}
