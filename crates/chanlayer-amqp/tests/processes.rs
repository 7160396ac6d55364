//! Two layer instances in separate OS processes (the test binary started again as a peer,
//! see `chanlayer_testkit::peer`), on a real RabbitMQ: process-local and group
//! messages cross between them, and deliveries held unacked by a killed process come back.

mod common;

use std::sync::Arc;
use std::time::Duration;

use chanlayer_core::{ChannelLayer, Codec, LayerOptions, Message};
use chanlayer_testkit::peer::Peer;

const DEADLINE: Duration = Duration::from_secs(30);

/// Not a test: the peer process the other tests start (this binary, run again).
#[test]
#[ignore = "the peer process of the other tests (they start it)"]
fn peer_process() {
    chanlayer_testkit::peer::run_from_env(|url| async move {
        chanlayer_amqp::AmqpLayer::connect(&chanlayer_core::LayerConfig::from_url(&url)?).await
    });
}

fn ns() -> String {
    format!("p{:016x}", rand_u64())
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(std::process::id().into());
    h.finish()
}

/// Starts this test binary again as a peer running `command`.
fn peer(prefix: &str, command: &str, args: &[&str]) -> Peer {
    Peer::spawn(
        command,
        &common::url_with(&format!("prefix={prefix}")),
        args,
    )
}

async fn recv(layer: &Arc<chanlayer_amqp::AmqpLayer>, ch: &str) -> Message {
    tokio::time::timeout(DEADLINE, layer.receive(ch))
        .await
        .unwrap_or_else(|_| panic!("nothing arrived on {ch} within {DEADLINE:?}"))
        .expect("receive")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_and_group_messages_cross_processes() {
    let prefix = ns();
    let options = LayerOptions {
        prefix: prefix.clone(),
        ..LayerOptions::default()
    };
    let layer = Arc::new(common::connect(options, "").await.expect("connect"));
    let group = format!("{prefix}.room");
    let mut child = peer(&prefix, "serve", &[&group]);
    let line = child.line().await;
    let peer_ch = line
        .strip_prefix("READY ")
        .unwrap_or_else(|| panic!("expected READY, got {line:?}"))
        .to_owned();
    assert_ne!(
        chanlayer_core::names::owner_instance(&peer_ch),
        Some(layer.instance_id()),
        "the peer is another instance"
    );

    // Process-local: we send to the peer's channel, it replies to ours.
    let me = layer.new_channel("parent").await.expect("new_channel");
    layer.group_add(&group, &me).await.expect("group_add");
    for i in 0..20u64 {
        let ping = Message::encode_as("ping", &i, Codec::Bincode)
            .expect("encode")
            .with_header("reply_to", me.clone());
        layer.send(&peer_ch, ping).await.expect("send to the peer");
        let pong = recv(&layer, &me).await;
        assert_eq!(pong.message_type(), "pong");
        assert_eq!(
            pong.decode::<u64>().expect("decode"),
            i,
            "the reply to ping {i}"
        );
    }

    // Group: both members, in two processes, get one copy each.
    let hello = Message::encode_as("room.hello", &999u64, Codec::Bincode)
        .expect("encode")
        .with_header("reply_to", me.clone());
    layer.group_send(&group, hello).await.expect("group_send");
    let mut seen = Vec::new();
    for _ in 0..2 {
        let m = recv(&layer, &me).await;
        seen.push((
            m.message_type().to_owned(),
            m.headers().get("seen_type").cloned(),
        ));
    }
    seen.sort();
    assert_eq!(
        seen,
        vec![
            ("pong".to_owned(), Some("room.hello".to_owned())),
            ("room.hello".to_owned(), None),
        ],
        "our own copy, and the peer's answer to its copy"
    );

    layer
        .send(&peer_ch, Message::new("stop", Codec::Bincode, Vec::new()))
        .await
        .expect("stop the peer");
    assert!(child.wait_success().await, "the peer exits cleanly");
    layer.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_held_by_a_killed_process_come_back() {
    let prefix = ns();
    let options = LayerOptions {
        prefix: prefix.clone(),
        ..LayerOptions::default()
    };
    let layer = Arc::new(common::connect(options, "").await.expect("connect"));
    let ch = format!("{prefix}.work");
    for i in 0..5u64 {
        layer
            .send(
                &ch,
                Message::encode_as("job", &i, Codec::Bincode).expect("encode"),
            )
            .await
            .expect("send");
    }
    let mut child = peer(&prefix, "hold", &[&ch, "3"]);
    let line = child.line().await;
    let held: Vec<u64> = line
        .strip_prefix("HELD ")
        .unwrap_or_else(|| panic!("expected HELD, got {line:?}"))
        .split(' ')
        .map(|s| s.parse().expect("a number"))
        .collect();
    assert_eq!(held, vec![0, 1, 2]);
    child.kill();

    // Every message arrives here: the three the dead process held come back marked
    // redelivered, the two it never took arrive too.
    let mut got = Vec::new();
    while got.len() < 5 {
        let d = tokio::time::timeout(DEADLINE, layer.receive_delivery(&ch))
            .await
            .expect("deliveries come back within the deadline")
            .expect("receive_delivery");
        let seq: u64 = d.decode().expect("decode");
        if held.contains(&seq) {
            assert!(
                d.info().redelivered,
                "{seq} was held by the killed peer: redelivered"
            );
        }
        got.push(seq);
        d.ack().await.expect("ack");
    }
    got.sort_unstable();
    assert_eq!(got, vec![0, 1, 2, 3, 4]);
    layer.close().await.expect("close");
}
