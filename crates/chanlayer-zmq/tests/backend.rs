//! What only the ZeroMQ backend has: the subscription handshake (the first message after
//! `group_add` is never lost), late-joiner replay, garbage from a publisher or through the
//! proxy, sequence gaps counted as lost, the proxy's counters, a full send queue, clear
//! errors for a missing proxy or a taken address, shared publishers, prefixes.

mod common;

use std::time::Duration;

use chanlayer_core::toolkit::{Destination, Envelope};
use chanlayer_core::{ChannelLayer, Codec, Error, LayerOptions, Message};
use chanlayer_testkit::eventually;
use chanlayer_zmq::{wire, Proxy, ProxyConfig, ZmqLayer};
use common::{connect, free_port, ipc_endpoint, ns, recv, FakePublisher, FAST};

fn msg(i: u64) -> Message {
    Message::encode_as("test.seq", &i, Codec::Bincode).expect("encode")
}

fn seq(m: &Message) -> u64 {
    m.decode::<u64>().expect("decode")
}

async fn quiet(layer: &ZmqLayer, ch: &str) {
    if let Ok(r) = tokio::time::timeout(Duration::from_millis(300), layer.receive(ch)).await {
        panic!("expected nothing on {ch}, got {r:?}");
    }
}

fn envelope(kind: Destination, dest: &str, i: u64) -> Vec<u8> {
    Envelope::seal(kind, dest, msg(i), &LayerOptions::default())
        .expect("seal")
        .encode()
}

/// A fake publisher on a fresh endpoint, and a receive-only layer on it (`options` added to
/// its URL) with one process-local channel.
struct OnFake {
    fake: FakePublisher,
    layer: ZmqLayer,
    prefix: String,
    /// The layer's process-local channel.
    me: String,
    /// The layer's inbox topic (where the channel's messages travel).
    inbox: Vec<u8>,
}

async fn on_a_fake_publisher(answer_probes: bool, options: &str) -> OnFake {
    let endpoint = ipc_endpoint(&ns());
    let fake = FakePublisher::start(&endpoint, answer_probes);
    let prefix = ns();
    let layer = connect(
        &format!("zmq://{endpoint}?bind=never&{options}{FAST}"),
        &prefix,
    )
    .await
    .expect("connect (embedded mode does not need the publisher)");
    let me = layer.new_channel("me").await.expect("new_channel");
    let inbox = wire::inbox_topic(&prefix, layer.instance_id());
    OnFake {
        fake,
        layer,
        prefix,
        me,
        inbox,
    }
}

async fn first_message_after_group_add(url: &str) {
    let prefix = ns();
    let receiver = connect(url, &prefix).await.expect("receiver");
    let sender = connect(url, &prefix).await.expect("sender");
    let me = receiver.new_channel("r").await.expect("new_channel");
    for round in 0..50u64 {
        // A new group each round: a new subscription each time, sent the moment
        // group_add returns, by another instance.
        let group = format!("{prefix}.g{round}");
        receiver.group_add(&group, &me).await.expect("group_add");
        sender
            .group_send(&group, msg(round))
            .await
            .expect("group_send");
        assert_eq!(seq(&recv(&receiver, &me).await), round, "round {round}");
    }
    quiet(&receiver, &me).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_message_after_group_add_is_never_lost_dedicated() {
    let proxy = common::proxy();
    first_message_after_group_add(&format!("{}&{FAST}", proxy.url())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_message_after_group_add_is_never_lost_embedded() {
    let url = format!("zmq://tcp://127.0.0.1:{}?bind=lazy&{FAST}", free_port());
    first_message_after_group_add(&url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_from_a_publisher_is_skipped_and_counted() {
    let OnFake {
        fake,
        layer,
        prefix,
        me,
        inbox,
    } = on_a_fake_publisher(true, "").await;
    let group = format!("{prefix}.room");
    layer.group_add(&group, &me).await.expect("group_add");
    let gtopic = wire::group_topic(&prefix, &group);
    eventually("the fake publisher sees the subscriptions", || {
        fake.is_subscribed(&inbox) && fake.is_subscribed(&gtopic)
    })
    .await;
    let data = |seq: u64| wire::meta(wire::META_DATA, common::FAKE_EPOCH, seq).to_vec();
    let other = "x.zzzzzzzzzzzzz!abc";
    let mut junk_topic = inbox.clone();
    junk_topic.extend_from_slice(b"junk");
    let garbage: Vec<Vec<Vec<u8>>> = vec![
        vec![inbox.clone()],                                        // one frame
        vec![inbox.clone(), b"short".to_vec()],                     // two frames, no meta
        vec![inbox.clone(), vec![9; 17], b"x".to_vec()],            // an unknown meta kind
        vec![inbox.clone(), data(1), b"x".to_vec(), b"y".to_vec()], // four frames
        vec![inbox.clone(), data(2), b"not an envelope".to_vec()],
        vec![inbox.clone(), data(3), Vec::new()],
        // Not ours: it decodes, and core's ingest path counts it undeliverable instead.
        vec![
            inbox.clone(),
            data(4),
            envelope(Destination::Channel, other, 0),
        ],
        vec![
            gtopic.clone(),
            data(1),
            envelope(Destination::Channel, &me, 0),
        ], // kind mismatch
        vec![
            gtopic.clone(),
            data(2),
            envelope(Destination::Group, "another.group", 0),
        ],
        vec![junk_topic, data(5), envelope(Destination::Channel, &me, 0)], // a topic with a tail
    ];
    // Every piece but the one for another instance is undecodable.
    let n = garbage.len() as u64 - 1;
    let before = layer.stats();
    for g in garbage {
        fake.publish(g);
    }
    fake.data(&inbox, 6, envelope(Destination::Channel, &me, 77));
    fake.data(&gtopic, 3, envelope(Destination::Group, &group, 78));
    let mut got = vec![seq(&recv(&layer, &me).await), seq(&recv(&layer, &me).await)];
    got.sort_unstable();
    assert_eq!(
        got,
        vec![77, 78],
        "the valid messages after the garbage arrive"
    );
    eventually("the envelope for another instance is counted", || {
        layer.stats().undeliverable > before.undeliverable
    })
    .await;
    eventually("every piece of garbage is counted", || {
        layer.stats().undecodable >= before.undecodable + n
    })
    .await;
    assert_eq!(
        layer.stats().undecodable,
        before.undecodable + n,
        "and nothing else"
    );
    quiet(&layer, &me).await;
    // The layer still works.
    fake.data(&inbox, 7, envelope(Destination::Channel, &me, 79));
    assert_eq!(seq(&recv(&layer, &me).await), 79);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gaps_in_a_topic_sequence_are_counted_as_lost() {
    let OnFake {
        fake,
        layer,
        me,
        inbox,
        ..
    } = on_a_fake_publisher(true, "").await;
    assert_eq!(layer.transport_stats().lost, 0);
    for (s, body) in [(1, 1), (2, 2), (5, 5), (5, 5), (4, 4), (6, 6)] {
        fake.data(&inbox, s, envelope(Destination::Channel, &me, body));
    }
    for want in [1, 2, 5, 6] {
        assert_eq!(
            seq(&recv(&layer, &me).await),
            want,
            "duplicates and late ones skipped"
        );
    }
    assert_eq!(
        layer.transport_stats().lost,
        2,
        "3 and 4 never came in order"
    );
    quiet(&layer, &me).await;
}

/// What reached this process before its publisher went away is delivered: the connection's
/// end does not hold back the messages still queued behind it for a probe that no publisher
/// will answer (seen as an embedded publisher that closed right after a burst).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_that_arrived_before_the_publisher_left_is_delivered() {
    let OnFake {
        fake,
        layer,
        me,
        inbox,
        ..
    } = on_a_fake_publisher(true, "capacity=100000&").await;
    eventually("the fake publisher sees the subscription", || {
        fake.is_subscribed(&inbox)
    })
    .await;
    // More than the receiving thread reads in one turn, one message a frame, and the
    // connection closed right behind the last one.
    let n = 20_000;
    for i in 1..=n {
        fake.data(&inbox, i, envelope(Destination::Channel, &me, i));
    }
    fake.close_flushed();
    for want in 1..=n {
        assert_eq!(seq(&recv(&layer, &me).await), want, "in order, none held");
    }
    assert_eq!(layer.transport_stats().lost, 0);
}

fn batch(items: &[Vec<u8>]) -> Vec<u8> {
    let mut body = Vec::new();
    for i in items {
        wire::batch_push(&mut body, i);
    }
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_frames_deliver_in_order_skip_seen_and_count_gaps_and_garbage() {
    let OnFake {
        fake,
        layer,
        me,
        inbox,
        ..
    } = on_a_fake_publisher(true, "").await;
    let env = |i: u64| envelope(Destination::Channel, &me, i);
    let frame = |first: u64, body: Vec<u8>| {
        vec![
            inbox.clone(),
            wire::meta(wire::META_BATCH, common::FAKE_EPOCH, first).to_vec(),
            body,
        ]
    };
    let undecodable = layer.stats().undecodable;
    // seq 1-3; then 3-5 (3 seen already); then 8-9 (6 and 7 lost); then a batch whose
    // second item is garbage (seq 10-12); then a body that is not a batch; then 13 alone.
    fake.publish(frame(1, batch(&[env(1), env(2), env(3)])));
    fake.publish(frame(3, batch(&[env(3), env(4), env(5)])));
    fake.publish(frame(8, batch(&[env(8), env(9)])));
    fake.publish(frame(10, batch(&[env(10), b"garbage".to_vec(), env(12)])));
    fake.publish(frame(13, vec![200, 0, 0, 0, 1, 2]));
    fake.data(&inbox, 14, env(14));
    for want in [1, 2, 3, 4, 5, 8, 9, 10, 12, 14] {
        assert_eq!(seq(&recv(&layer, &me).await), want, "in order, each once");
    }
    // 6 and 7 never came; nor did 13, as far as the receiver can tell: a malformed batch
    // says where it starts, not how many messages it held.
    assert_eq!(layer.transport_stats().lost, 3, "6, 7 and 13");
    assert_eq!(
        layer.stats().undecodable,
        undecodable + 2,
        "the garbage item and the malformed batch"
    );
    quiet(&layer, &me).await;
}

/// Sends `n` numbered messages in one `send_batch` (queued together, so the publisher finds
/// them one after the other) and receives them in order (the channel's capacity must hold
/// `n`).
async fn burst(sender: &ZmqLayer, receiver: &ZmqLayer, ch: &str, n: u64) {
    sender
        .send_batch(ch, (0..n).map(msg).collect())
        .await
        .expect("send_batch");
    for i in 0..n {
        let got = tokio::time::timeout(common::DEADLINE, receiver.receive(ch)).await;
        let Ok(got) = got else {
            panic!(
                "message {i} did not arrive: {:?} {:?}",
                receiver.stats(),
                receiver.transport_stats()
            );
        };
        assert_eq!(seq(&got.expect("receive")), i, "in order");
    }
    assert_eq!(receiver.transport_stats().lost, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_travels_in_batches_embedded() {
    let url = format!(
        "zmq://tcp://127.0.0.1:{}?bind=eager&capacity=1000&{FAST}",
        free_port()
    );
    let prefix = ns();
    let layer = connect(&url, &prefix).await.expect("connect");
    let me = layer.new_channel("me").await.expect("new_channel");
    burst(&layer, &layer, &me, 500).await;
    // `received` is counted last (HubStats' order): poll until it shows the burst.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let stats = loop {
        let stats = layer
            .publisher_stats()
            .expect("this process binds the publisher");
        if stats.received >= 500 || std::time::Instant::now() > deadline {
            break stats;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert!(
        stats.batches >= 1,
        "no batch frame was published: {stats:?}"
    );
    assert_eq!(
        stats.batched, 500,
        "queued together, all 500 travel in batches: {stats:?}"
    );
    assert_eq!(stats.forwarded, stats.received, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_travels_in_batches_through_the_proxy() {
    let proxy = common::proxy();
    let url = format!("{}&capacity=1000&{FAST}", proxy.url());
    let prefix = ns();
    let sender = connect(&url, &prefix).await.expect("sender");
    let receiver = connect(&url, &prefix).await.expect("receiver");
    let ch = receiver.new_channel("me").await.expect("new_channel");
    burst(&sender, &receiver, &ch, 500).await;
    // Large messages travel alone, in order with the small ones around them.
    let big = Message::new(
        "test.big",
        Codec::Bincode,
        vec![7u8; wire::BATCH_ITEM_MAX + 1],
    );
    let batch_of_mixed = vec![msg(1), big.clone(), msg(2)];
    sender
        .send_batch(&ch, batch_of_mixed)
        .await
        .expect("send_batch");
    assert_eq!(seq(&recv(&receiver, &ch).await), 1);
    assert_eq!(recv(&receiver, &ch).await.body(), big.body());
    assert_eq!(seq(&recv(&receiver, &ch).await), 2);
    // The proxy counts `received` last (HubStats' order): a message can reach the receiver
    // a moment before it shows there.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let stats = loop {
        let stats = proxy.stats();
        if stats.received >= 503 || std::time::Instant::now() > deadline {
            break stats;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert!(
        stats.batches >= 1,
        "no batch frame was published: {stats:?}"
    );
    assert_eq!(stats.received, 503, "{stats:?}");
    assert_eq!(
        stats.batched, 500,
        "the burst in batches, the last three alone: {stats:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_that_never_answers_makes_group_add_time_out() {
    let OnFake {
        fake: _fake,
        layer,
        prefix,
        me,
        ..
    } = on_a_fake_publisher(false, "subscribe_timeout=300ms&").await;
    let e = layer
        .group_add(&format!("{prefix}.g"), &me)
        .await
        .expect_err("no answer");
    assert!(matches!(e, Error::Timeout { .. }), "{e:?}");
    assert!(e.to_string().contains("membership was not added"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_joiners_get_the_retained_messages_once_and_in_order() {
    let proxy = common::proxy();
    let url = format!("{}&capacity=1000&{FAST}", proxy.url());
    let prefix = ns();
    let sender = connect(&url, &prefix).await.expect("sender");
    let ch = format!("{prefix}.news");
    for i in 0..20 {
        sender.send(&ch, msg(i)).await.expect("send");
    }
    let early = connect(&url, &prefix).await.expect("early");
    for i in 0..20 {
        assert_eq!(seq(&recv(&early, &ch).await), i);
    }
    let late = connect(&url, &prefix).await.expect("late");
    for i in 0..20 {
        assert_eq!(
            seq(&recv(&late, &ch).await),
            i,
            "the late joiner gets the same, in order"
        );
    }
    sender.send(&ch, msg(20)).await.expect("send");
    for r in [&early, &late] {
        assert_eq!(seq(&recv(r, &ch).await), 20, "one copy each");
        quiet(r, &ch).await;
    }
    assert_eq!(late.transport_stats().replayed, 20);
    let s = proxy.stats();
    assert_eq!(s.replayed, 40, "{s:?}");
    assert_eq!(s.forwarded, 21, "{s:?}");
    assert_eq!(s.pending, 0, "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_retention_a_message_sent_before_anyone_receives_is_dropped_and_counted() {
    let url = format!("zmq://{}?retain=0&{FAST}", ipc_endpoint(&ns()));
    let prefix = ns();
    let layer = connect(&url, &prefix).await.expect("connect");
    let ch = format!("{prefix}.c");
    layer.send(&ch, msg(1)).await.expect("send");
    eventually("the publisher published it", || {
        layer.publisher_stats().is_some_and(|s| s.received == 1)
    })
    .await;
    quiet(&layer, &ch).await;
    let s = layer.publisher_stats().expect("this process publishes");
    assert_eq!((s.dropped, s.forwarded, s.retained), (1, 0, 0), "{s:?}");
    layer.send(&ch, msg(2)).await.expect("send");
    assert_eq!(
        seq(&recv(&layer, &ch).await),
        2,
        "a subscribed channel gets it live"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_counts_forwarded_dropped_pending_and_flushed() {
    let proxy = common::proxy();
    let url = format!("{}&{FAST}", proxy.url());
    let prefix = ns();
    let layer = connect(&url, &prefix).await.expect("connect");
    let base = proxy.stats();
    layer
        .group_send(&format!("{prefix}.nobody"), msg(1))
        .await
        .expect("group_send");
    let ch = format!("{prefix}.later");
    layer.send(&ch, msg(2)).await.expect("send");
    eventually("both reached the proxy", || {
        proxy.stats().received >= base.received + 2
    })
    .await;
    let s = proxy.stats();
    assert_eq!(
        s.dropped,
        base.dropped + 1,
        "a group nobody subscribes: {s:?}"
    );
    assert_eq!(s.pending, 1, "a channel nobody receives yet: {s:?}");
    assert_eq!(seq(&recv(&layer, &ch).await), 2);
    let s = proxy.stats();
    assert_eq!((s.pending, s.replayed), (0, 1), "{s:?}");
    assert_eq!(s.forwarded, base.forwarded + 1, "{s:?}");
    // A flush drops what is retained for the prefix and nobody got.
    layer
        .send(&format!("{prefix}.never"), msg(3))
        .await
        .expect("send");
    eventually("retained", || proxy.stats().pending == 1).await;
    layer.flush().await.expect("flush");
    let s = proxy.stats();
    assert_eq!((s.pending, s.flushed), (0, 1), "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_sent_to_the_proxy_is_counted_there_and_at_the_receivers() {
    let proxy = common::proxy();
    let url = format!("{}&{FAST}", proxy.url());
    let prefix = ns();
    let layer = connect(&url, &prefix).await.expect("connect");
    let me = layer.new_channel("me").await.expect("new_channel");
    let before = proxy.stats().undecodable;
    let frames: Vec<Vec<Vec<u8>>> = vec![
        vec![b"only one frame".to_vec()],
        vec![b"z:bad:topic\0".to_vec(), b"x".to_vec()],
        vec![b"c:no-terminator".to_vec(), b"x".to_vec()],
        vec![
            wire::channel_topic(&prefix, "a"),
            b"x".to_vec(),
            b"y".to_vec(),
        ],
        vec![b"x:mark\0".to_vec(), b"short".to_vec()],
        (0..10).map(|i| vec![i]).collect(),
        vec![
            wire::channel_topic(&prefix, "a"),
            wire::meta(wire::META_BATCH, 0, 1).to_vec(),
            vec![9, 0, 0, 0, 1],
        ], // a batch whose item runs past the end
    ];
    let n = frames.len() as u64;
    for f in frames {
        layer.publish_raw_frames(f).await.expect("raw frames");
    }
    eventually("the proxy counts what is not chanlayer's", || {
        proxy.stats().undecodable >= before + n
    })
    .await;
    // A well-formed topic with a garbage envelope passes the proxy (it does not decode
    // bodies) and is counted where it arrives.
    let at_receiver = layer.stats().undecodable;
    layer
        .publish_raw(&me, b"garbage body".to_vec())
        .await
        .expect("raw");
    layer.send(&me, msg(5)).await.expect("send");
    assert_eq!(seq(&recv(&layer, &me).await), 5);
    assert_eq!(layer.stats().undecodable, at_receiver + 1);
    assert_eq!(proxy.stats().undecodable, before + n);
}

/// Sends, retrying while the send queue is full (a burst into a tiny queue is ChannelFull
/// by design), within [`common::DEADLINE`].
async fn send_when_room(layer: &ZmqLayer, ch: &str, m: Message) {
    let deadline = tokio::time::Instant::now() + common::DEADLINE;
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    loop {
        match layer.send(ch, m.clone()).await {
            Ok(()) => return,
            Err(Error::ChannelFull { .. }) if tokio::time::Instant::now() < deadline => {
                tick.tick().await;
            }
            Err(e) => panic!("send: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_send_queue_is_channel_full_and_sends_resume_when_the_proxy_is_back() {
    let (pull, publish) = (
        format!("tcp://127.0.0.1:{}", free_port()),
        format!("tcp://127.0.0.1:{}", free_port()),
    );
    let proxy = Proxy::spawn(ProxyConfig::new(&pull, &publish)).expect("proxy");
    let url = format!("zmq://?pull={pull}&pub={publish}&sndhwm=5&send_queue=5&{FAST}");
    let prefix = ns();
    let layer = connect(&url, &prefix).await.expect("connect");
    let ch = format!("{prefix}.c");
    layer
        .send(&ch, msg(0))
        .await
        .expect("send while the proxy runs");
    proxy.stop();
    eventually("the layer sees the proxy gone", || {
        !layer.transport_stats().connected
    })
    .await;
    let mut full = None;
    for i in 1..10_000u64 {
        match layer.send(&ch, msg(i)).await {
            Ok(()) => {}
            Err(e @ Error::ChannelFull { .. }) => {
                full = Some((i, e));
                break;
            }
            Err(e) => panic!("unexpected {e}"),
        }
    }
    let (at, e) = full.expect("sends become ChannelFull while the proxy is away");
    assert!(at <= 1000, "once the queue and the socket are full ({at})");
    assert!(e.to_string().contains(&ch), "{e}");
    assert!(
        matches!(e, Error::ChannelFull { capacity: 5, .. }),
        "the capacity is the send queue's: {e:?}"
    );
    // The proxy comes back on the same addresses, both sockets reconnect by themselves,
    // and sends are taken and delivered again.
    let proxy = respawn(&pull, &publish).await;
    let receiver = connect(&url, &prefix)
        .await
        .expect("a receiver on the new proxy");
    let after = format!("{prefix}.after");
    for i in 0..10 {
        send_when_room(&layer, &after, msg(i)).await;
    }
    for i in 0..10 {
        assert_eq!(
            seq(&recv(&receiver, &after).await),
            i,
            "in order, none lost"
        );
    }
    eventually("the layer's subscriber is back too", || {
        layer.transport_stats().connected
    })
    .await;
    // The hub counts a message just after it republishes it: the receiver can have it first.
    eventually("the proxy counts the 10 messages it took", || {
        proxy.stats().received >= 10
    })
    .await;
}

/// A proxy on the same addresses as one just stopped (its listeners close asynchronously:
/// the bind is retried for a moment).
async fn respawn(pull: &str, publish: &str) -> Proxy {
    let deadline = tokio::time::Instant::now() + common::DEADLINE;
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    loop {
        match Proxy::spawn(ProxyConfig::new(pull, publish)) {
            Ok(p) => return p,
            Err(e) if tokio::time::Instant::now() < deadline => {
                assert!(e.to_string().contains("already in use"), "{e}");
                tick.tick().await;
            }
            Err(e) => panic!("the proxy could not bind again: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_sent_while_a_receiver_reconnects_are_replayed() {
    let (pull, publish) = (
        format!("tcp://127.0.0.1:{}", free_port()),
        format!("tcp://127.0.0.1:{}", free_port()),
    );
    let proxy = Proxy::spawn(ProxyConfig::new(&pull, &publish)).expect("proxy");
    let base = format!("zmq://?pull={pull}&pub={publish}");
    let prefix = ns();
    let sender = connect(&format!("{base}&{FAST}"), &prefix)
        .await
        .expect("sender");
    // The receiver comes back to a new proxy only after 2 to 4 s: long after the sender.
    let receiver = connect(&format!("{base}&reconnect_interval=2s"), &prefix)
        .await
        .expect("receiver");
    let me = receiver.new_channel("r").await.expect("new_channel");
    let ch = format!("{prefix}.news");
    sender.send(&me, msg(0)).await.expect("send");
    sender.send(&ch, msg(0)).await.expect("send");
    assert_eq!(seq(&recv(&receiver, &me).await), 0);
    assert_eq!(seq(&recv(&receiver, &ch).await), 0);
    proxy.stop();
    eventually("the receiver sees the proxy gone", || {
        !receiver.transport_stats().connected
    })
    .await;
    let proxy = respawn(&pull, &publish).await;
    for i in 1..=20 {
        send_when_room(&sender, &me, msg(i)).await;
        send_when_room(&sender, &ch, msg(i)).await;
    }
    eventually("the sender's messages reached the new proxy", || {
        proxy.stats().received >= 40
    })
    .await;
    assert!(
        !receiver.transport_stats().connected,
        "the receiver is still away (it retries every 2 s)"
    );
    // PUB/SUB alone would have dropped all 40 for this receiver: the new proxy kept them
    // (nobody was subscribed) and replays them when the receiver's probes arrive.
    for i in 1..=20 {
        assert_eq!(
            seq(&recv(&receiver, &me).await),
            i,
            "process-local, in order"
        );
        assert_eq!(
            seq(&recv(&receiver, &ch).await),
            i,
            "normal channel, in order"
        );
    }
    assert!(receiver.transport_stats().replayed >= 40);
    quiet(&receiver, &me).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_proxy_or_a_wrong_pull_address_is_a_clear_error() {
    // Unix sockets: nobody else can be listening there by chance.
    let (a, b) = (ipc_endpoint(&ns()), ipc_endpoint(&ns()));
    let url = format!("zmq://?pull={a}&pub={b}&connect_timeout=300ms&{FAST}");
    let e = connect(&url, &ns()).await.expect_err("no proxy");
    let text = e.to_string();
    assert!(text.contains("no chanlayer zmq proxy answered"), "{text}");
    assert!(text.contains("zmq-proxy --pull"), "{text}");

    let proxy = Proxy::spawn(ProxyConfig::new(ipc_endpoint(&ns()), b.clone())).expect("proxy");
    let url = format!(
        "zmq://?pull={a}&pub={}&connect_timeout=300ms&{FAST}",
        proxy.pub_endpoint()
    );
    let e = connect(&url, &ns())
        .await
        .expect_err("a pull address nobody serves");
    assert!(
        e.to_string().contains("the PULL address of the same proxy"),
        "{e}"
    );
}

/// A layer started a moment before its proxy waits for it, up to `connect_timeout`, instead
/// of failing at the first refused connection (a script that starts the proxy and its
/// servers together).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layer_started_before_its_proxy_waits_for_it() {
    let (pull, publish) = (
        format!("tcp://127.0.0.1:{}", free_port()),
        format!("tcp://127.0.0.1:{}", free_port()),
    );
    let url = format!("zmq://?pull={pull}&pub={publish}&connect_timeout=30s&{FAST}");
    let early = tokio::spawn(async move { connect(&url, &ns()).await });
    // The proxy comes up after the layer's first connection attempts were refused (one
    // every 20 ms): this wait is the scenario, not a wait for an event.
    chanlayer_testkit::let_time_pass(Duration::from_millis(300)).await;
    assert!(
        !early.is_finished(),
        "the open still waits for its proxy: {:?}",
        early.await.expect("task").err()
    );
    let _proxy = Proxy::spawn(ProxyConfig::new(&pull, &publish)).expect("proxy");
    let layer = early
        .await
        .expect("task")
        .expect("the layer connects once its proxy is up");
    let me = layer.new_channel("r").await.expect("new_channel");
    layer.send(&me, msg(1)).await.expect("send");
    assert_eq!(seq(&recv(&layer, &me).await), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_bound_by_someone_else_is_a_clear_error() {
    // TCP: the kernel refuses the second bind.
    let port = free_port();
    let ctx = zmq::Context::new();
    let other = ctx.socket(zmq::XPUB).expect("socket");
    other
        .bind(&format!("tcp://127.0.0.1:{port}"))
        .expect("bind");
    let e = connect(&format!("zmq://127.0.0.1:{port}?bind=eager&{FAST}"), &ns())
        .await
        .expect_err("taken");
    assert!(
        e.to_string().contains("already bound by another process"),
        "{e}"
    );
    let lazy = connect(
        &format!("zmq://127.0.0.1:{port}?connect_timeout=300ms&{FAST}"),
        &ns(),
    )
    .await
    .expect("a lazy instance connects (it only subscribes so far)");
    let e = lazy
        .send("x", msg(1))
        .await
        .expect_err("the first send binds");
    assert!(
        e.to_string().contains("one process per address sends"),
        "{e}"
    );
    // ipc: libzmq would silently take the socket over; chanlayer checks first.
    let endpoint = ipc_endpoint(&ns());
    let other_ipc = ctx.socket(zmq::XPUB).expect("socket");
    other_ipc.bind(&endpoint).expect("bind");
    let e = connect(&format!("zmq://{endpoint}?bind=eager&{FAST}"), &ns())
        .await
        .expect_err("taken");
    assert!(
        e.to_string().contains("already bound by another process"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receive_only_instances_cannot_send() {
    let url = format!("zmq://{}?bind=never&{FAST}", ipc_endpoint(&ns()));
    let layer = connect(&url, &ns()).await.expect("connect");
    for r in [
        layer.send("x", msg(1)).await,
        layer.group_send("g", msg(1)).await,
    ] {
        let e = r.expect_err("receive only");
        assert!(matches!(e, Error::Unsupported { .. }), "{e:?}");
        assert!(e.to_string().contains("bind=never"), "{e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_instances_of_a_process_share_its_publisher() {
    let url = format!("zmq://{}?{FAST}", ipc_endpoint(&ns()));
    let prefix = ns();
    let a = connect(&url, &prefix).await.expect("a");
    let b = connect(&url, &prefix).await.expect("b");
    assert!(
        a.publisher_stats().is_none(),
        "nothing bound before the first send"
    );
    let group = format!("{prefix}.room");
    let (ma, mb) = (
        a.new_channel("a").await.expect("new_channel"),
        b.new_channel("b").await.expect("new_channel"),
    );
    a.group_add(&group, &ma).await.expect("group_add");
    b.group_add(&group, &mb).await.expect("group_add");
    a.group_send(&group, msg(1)).await.expect("a sends");
    b.group_send(&group, msg(2))
        .await
        .expect("b sends too (same process)");
    for (l, m) in [(&a, &ma), (&b, &mb)] {
        let mut got = vec![seq(&recv(l, m).await), seq(&recv(l, m).await)];
        got.sort_unstable();
        assert_eq!(got, vec![1, 2]);
    }
    assert_eq!(a.publisher_stats(), b.publisher_stats(), "one publisher");
    assert_eq!(a.publisher_stats().map(|s| s.received), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefixes_keep_applications_apart() {
    let proxy = common::proxy();
    let url = format!("{}&{FAST}", proxy.url());
    let (p1, p2) = (ns(), ns());
    let one = connect(&url, &p1).await.expect("one");
    let two = connect(&url, &p2).await.expect("two");
    let (m1, m2) = (
        one.new_channel("m").await.expect("new_channel"),
        two.new_channel("m").await.expect("new_channel"),
    );
    one.group_add("room", &m1).await.expect("group_add");
    two.group_add("room", &m2).await.expect("group_add");
    one.group_send("room", msg(1)).await.expect("group_send");
    one.send("work", msg(2)).await.expect("send");
    two.send("work", msg(3)).await.expect("send");
    assert_eq!(seq(&recv(&one, &m1).await), 1);
    assert_eq!(seq(&recv(&one, "work").await), 2);
    assert_eq!(
        seq(&recv(&two, "work").await),
        3,
        "its own application's only"
    );
    quiet(&two, &m2).await;
    quiet(&two, "work").await;
    quiet(&one, "work").await;
}
