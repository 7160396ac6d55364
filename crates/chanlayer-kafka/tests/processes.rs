//! Layer instances in separate OS processes, on a real Kafka-protocol broker: process-local
//! and group messages cross between them; a batch taken and never committed by a process
//! that dies comes back; a crashed instance's inbox topic is a listed leftover that can be
//! removed, and a closed one leaves none.

mod common;

use std::sync::Arc;
use std::time::Duration;

use chanlayer_core::{ChannelLayer, Codec, LayerConfig, LayerOptions, Message};
use chanlayer_kafka::KafkaLayer;
use chanlayer_testkit::peer::Peer;

const DEADLINE: Duration = Duration::from_secs(45);

/// Not a test: the peer process the other tests start (this binary, run again).
#[test]
#[ignore = "the peer process of the other tests (they start it)"]
fn peer_process() {
    chanlayer_testkit::peer::run_from_env(|url| async move {
        KafkaLayer::connect(&LayerConfig::from_url(&url)?).await
    });
}

fn ns() -> String {
    format!("p{:016x}", rand::random::<u64>())
}

fn url(prefix: &str) -> String {
    common::url_with(&format!("prefix={prefix}"))
}

async fn layer(prefix: &str) -> Arc<KafkaLayer> {
    let options = LayerOptions {
        prefix: prefix.to_owned(),
        ..LayerOptions::default()
    };
    Arc::new(common::connect(options, "").await.expect("connect"))
}

async fn recv(layer: &Arc<KafkaLayer>, ch: &str) -> Message {
    tokio::time::timeout(DEADLINE, layer.receive(ch))
        .await
        .unwrap_or_else(|_| panic!("nothing arrived on {ch} within {DEADLINE:?}"))
        .expect("receive")
}

async fn inboxes(prefix: &str) -> Vec<String> {
    let cfg = LayerConfig::from_url(&url(prefix)).expect("url");
    chanlayer_kafka::list_inboxes(&cfg)
        .await
        .expect("list inboxes")
        .into_iter()
        .map(|t| t.instance)
        .collect()
}

/// Polls `list_inboxes` until `pred` holds (topic deletion is asynchronous at the broker).
async fn inboxes_until(prefix: &str, what: &str, pred: impl Fn(&[String]) -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        let now = inboxes(prefix).await;
        if pred(&now) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: inbox topics are still {now:?}"
        );
        tick.tick().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_and_group_messages_cross_processes() {
    let prefix = ns();
    let layer = layer(&prefix).await;
    let group = format!("{prefix}.room");
    let mut peer = Peer::spawn("serve", &url(&prefix), &[&group]);
    let line = peer.line().await;
    let peer_ch = line
        .strip_prefix("READY ")
        .unwrap_or_else(|| panic!("expected READY, got {line:?}"))
        .to_owned();
    let peer_instance = chanlayer_core::names::owner_instance(&peer_ch)
        .expect("a process-local channel")
        .to_owned();
    assert_ne!(
        peer_instance,
        layer.instance_id(),
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

    // A peer that closes deletes its own inbox topic.
    assert!(inboxes(&prefix).await.contains(&peer_instance));
    layer
        .send(&peer_ch, Message::new("stop", Codec::Bincode, Vec::new()))
        .await
        .expect("stop the peer");
    assert!(peer.wait_success().await, "the peer exits cleanly");
    inboxes_until(&prefix, "the closed peer's inbox is deleted", |now| {
        !now.contains(&peer_instance)
    })
    .await;
    chanlayer_testkit::eventually("the peer's close notice is read", || {
        layer.knows_closed(&peer_instance)
    })
    .await;
    // Sending to it now is a counted undeliverable, not an error and not a new topic.
    let before = layer.stats().undeliverable;
    layer
        .send(
            &peer_ch,
            Message::encode_as("late", &1u64, Codec::Bincode).expect("encode"),
        )
        .await
        .expect("a send to a gone instance is not an error");
    assert_eq!(layer.stats().undeliverable, before + 1);
    assert!(
        !inboxes(&prefix).await.contains(&peer_instance),
        "no topic made by the send"
    );
    layer.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_held_by_a_killed_process_comes_back() {
    let prefix = ns();
    let layer = layer(&prefix).await;
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
    let mut peer = Peer::spawn("hold-batch", &url(&prefix), &[&ch, "3"]);
    let line = peer.line().await;
    let held: Vec<u64> = line
        .strip_prefix("HELD ")
        .unwrap_or_else(|| panic!("expected HELD, got {line:?}"))
        .split(' ')
        .map(|s| s.parse().expect("a number"))
        .collect();
    // One batch of up to three: whatever had arrived when the first one did.
    assert!(
        !held.is_empty() && held.len() <= 3 && held.iter().copied().eq(0..held.len() as u64),
        "the peer took a batch from the start: {held:?}"
    );
    peer.kill();

    // Nothing was committed: once the dead member's session ends, this instance gets the
    // partition and every message, the held batch included, from the start.
    let mut got = Vec::new();
    while got.len() < 5 {
        let d = tokio::time::timeout(DEADLINE, layer.receive_delivery(&ch))
            .await
            .expect("the batch comes back within the deadline")
            .expect("receive_delivery");
        got.push(d.decode::<u64>().expect("decode"));
        d.ack().await.expect("ack");
    }
    got.sort_unstable();
    assert_eq!(got, vec![0, 1, 2, 3, 4]);
    layer.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_instance_leaves_an_inbox_that_can_be_removed() {
    let prefix = ns();
    let mut peer = Peer::spawn("serve", &url(&prefix), &[&format!("{prefix}.g")]);
    let line = peer.line().await;
    let peer_ch = line.strip_prefix("READY ").expect("READY").to_owned();
    let instance = chanlayer_core::names::owner_instance(&peer_ch)
        .expect("a process-local channel")
        .to_owned();
    peer.kill();
    assert_eq!(
        inboxes(&prefix).await,
        vec![instance.clone()],
        "the leftover is listed"
    );
    let cfg = LayerConfig::from_url(&url(&prefix)).expect("url");
    let removed = chanlayer_kafka::remove_inboxes(&cfg, std::slice::from_ref(&instance))
        .await
        .expect("remove");
    assert_eq!(
        removed,
        vec![chanlayer_kafka::inbox_topic(&prefix, &instance)]
    );
    inboxes_until(&prefix, "the leftover is removed", |now| now.is_empty()).await;
}
