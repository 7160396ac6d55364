//! Kafka-only behaviour on a real Kafka-protocol broker: exactly-once in total for competing
//! readers across rebalances, garbage on the groups topic, prefixes, topic creation turned
//! off, and credentials kept out of every text.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chanlayer_core::{ChannelLayer, Codec, Error, LayerOptions, Message};
use chanlayer_kafka::KafkaLayer;
use chanlayer_testkit::eventually;

const DEADLINE: Duration = Duration::from_secs(60);

fn ns() -> String {
    format!("b{:016x}", rand::random::<u64>())
}

fn options(prefix: &str) -> LayerOptions {
    LayerOptions {
        prefix: prefix.to_owned(),
        capacity: 10_000,
        ..LayerOptions::default()
    }
}

fn seq(i: u64) -> Message {
    Message::encode_as("seq", &i, Codec::Bincode).expect("a u64 encodes")
}

async fn recv(layer: &KafkaLayer, ch: &str) -> Message {
    tokio::time::timeout(DEADLINE, layer.receive(ch))
        .await
        .unwrap_or_else(|_| panic!("nothing arrived on {ch} within {DEADLINE:?}"))
        .expect("receive")
}

/// The Python Kafka layer's failure (a message for one reader consumed and lost by
/// another) cannot happen: two readers of one normal channel, joined and left while the
/// stream runs (two rebalances), receive every message exactly once in total.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_readers_get_every_message_exactly_once_across_rebalances() {
    let prefix = ns();
    let extra = "partitions=3";
    let sender = common::connect(options(&prefix), extra)
        .await
        .expect("connect");
    let first = Arc::new(
        common::connect(options(&prefix), extra)
            .await
            .expect("connect"),
    );
    let ch = format!("{prefix}.jobs");
    let total = 600u64;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(u8, u64)>();
    let reader = |who: u8, layer: Arc<KafkaLayer>| {
        let (tx, ch) = (tx.clone(), ch.clone());
        tokio::spawn(async move {
            loop {
                match layer.receive(&ch).await {
                    Ok(m) => {
                        let _ = tx.send((who, m.decode::<u64>().expect("a seq")));
                    }
                    Err(Error::Closed) => break,
                    Err(e) => panic!("reader {who}: {e}"),
                }
            }
        })
    };
    let r1 = reader(1, first.clone());
    let mut second = None;
    let mut r2 = None;
    let mut got: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    let mut next = 0u64;
    while (got.values().map(Vec::len).sum::<usize>() as u64) < total {
        // Keep a window of sends ahead of what arrived.
        while next < total && next < got.len() as u64 + 50 {
            sender.send(&ch, seq(next)).await.expect("send");
            next += 1;
        }
        let (who, s) = tokio::time::timeout(DEADLINE, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("stalled after {} messages", got.len()))
            .expect("readers alive");
        got.entry(s).or_default().push(who);
        let n = got.len();
        if n == 200 && second.is_none() {
            // A second reader joins: the partitions are shared out again.
            let l = Arc::new(
                common::connect(options(&prefix), extra)
                    .await
                    .expect("connect"),
            );
            r2 = Some(reader(2, l.clone()));
            second = Some(l);
        }
        if n == 400 {
            // The first leaves: its partitions move to the second.
            first.close().await.expect("close the first reader");
        }
    }
    let second = second.expect("the second reader joined");
    // Nothing more comes: no duplicate is on its way.
    assert!(
        tokio::time::timeout(Duration::from_millis(500), rx.recv())
            .await
            .is_err(),
        "a duplicate arrived"
    );
    second.close().await.expect("close");
    r1.await.expect("reader 1");
    r2.expect("reader 2 ran").await.expect("reader 2");
    let dups: Vec<_> = got.iter().filter(|(_, w)| w.len() > 1).collect();
    assert!(dups.is_empty(), "received more than once: {dups:?}");
    assert_eq!(
        got.keys().copied().collect::<Vec<_>>(),
        (0..total).collect::<Vec<_>>()
    );
    let by_two = got.values().filter(|w| w[0] == 2).count();
    assert!(by_two > 0, "the second reader took part");
    sender.close().await.expect("close");
}

/// Bytes that are not envelopes, produced straight onto the groups topic (with a member's
/// group as key, and without a key), are skipped and counted; the next group message
/// arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_groups_topic_is_skipped_and_counted() {
    let prefix = ns();
    let l = common::connect(options(&prefix), "")
        .await
        .expect("connect");
    let group = format!("{prefix}.g");
    let me = l.new_channel("m").await.expect("new_channel");
    l.group_add(&group, &me).await.expect("group_add");
    let topic = l.groups_topic().to_owned();
    l.produce_raw(&topic, Some(group.as_bytes()), b"garbage")
        .await
        .expect("produce");
    l.produce_raw(&topic, None, b"\x00\x01\x02")
        .await
        .expect("produce");
    l.group_send(&group, seq(5)).await.expect("group_send");
    assert_eq!(recv(&l, &me).await.decode::<u64>().expect("seq"), 5);
    eventually("both garbage records are counted", || {
        l.stats().undecodable >= 2
    })
    .await;
    l.close().await.expect("close");
}

/// Layers with different prefixes share nothing: not a channel, not a group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_prefixes_do_not_collide() {
    let (pa, pb) = (ns(), ns());
    let a = common::connect(options(&pa), "").await.expect("connect");
    let b = common::connect(options(&pb), "").await.expect("connect");
    assert_ne!(a.channel_topic("jobs"), b.channel_topic("jobs"));
    assert_ne!(a.groups_topic(), b.groups_topic());
    let (ma, mb) = (
        a.new_channel("m").await.expect("new_channel"),
        b.new_channel("m").await.expect("new_channel"),
    );
    a.group_add("room", &ma).await.expect("group_add");
    b.group_add("room", &mb).await.expect("group_add");
    a.send("jobs", seq(1)).await.expect("send");
    a.group_send("room", seq(2)).await.expect("group_send");
    assert_eq!(recv(&a, "jobs").await.decode::<u64>().expect("seq"), 1);
    assert_eq!(recv(&a, &ma).await.decode::<u64>().expect("seq"), 2);
    for ch in ["jobs", mb.as_str()] {
        assert!(
            tokio::time::timeout(Duration::from_millis(500), b.receive(ch))
                .await
                .is_err(),
            "{ch} of the other prefix got a message"
        );
    }
    a.close().await.expect("close");
    b.close().await.expect("close");
}

/// With `create_topics=false`, a missing topic is a clear error, and existing ones work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_topic_creation_a_missing_topic_is_a_clear_error() {
    let prefix = ns();
    let err = common::connect(options(&prefix), "create_topics=false")
        .await
        .expect_err("no groups topic yet");
    let text = err.to_string();
    assert!(matches!(err, Error::Config(_)), "{err:?}");
    assert!(
        text.contains(&format!("{prefix}.groups")) && text.contains("create_topics=false"),
        "{text}"
    );
    // Once the groups topic exists (made by a layer that may create topics), it connects.
    let maker = common::connect(options(&prefix), "")
        .await
        .expect("connect");
    maker.send("made", seq(1)).await.expect("send");
    let l = common::connect(options(&prefix), "create_topics=false")
        .await
        .expect("connect with existing topics");
    let err = l.send("missing", seq(2)).await.expect_err("no such topic");
    assert!(
        err.to_string()
            .contains(&format!("{prefix}.channel.missing")),
        "{err}"
    );
    l.send("made", seq(3))
        .await
        .expect("an existing topic works");
    assert_eq!(recv(&l, "made").await.decode::<u64>().expect("seq"), 1);
    assert_eq!(recv(&l, "made").await.decode::<u64>().expect("seq"), 3);
    maker.close().await.expect("close");
    l.close().await.expect("close");
}

/// A password given in the URL or as an option never appears in `Debug`, `Display` or
/// error text, even when connecting fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_never_appear_in_text() {
    let secret = "s3cr3t-Pa55";
    let url = format!(
        "kafka://app:{secret}@127.0.0.1:1?connection_timeout=1s&delivery_timeout=1s&kafka.sasl.password={secret}"
    );
    let config = chanlayer_core::LayerConfig::from_url(&url).expect("parse");
    for text in [config.to_string(), format!("{config:?}")] {
        assert!(!text.contains(secret), "{text}");
    }
    let err = KafkaLayer::connect(&config)
        .await
        .expect_err("nothing listens on port 1");
    let text = format!("{err} / {err:?}");
    assert!(!text.contains(secret), "{text}");
    assert!(
        text.contains("127.0.0.1:1"),
        "the error names the broker: {text}"
    );
    // A working layer's Debug names the brokers, not the credentials.
    let l = common::connect(options(&ns()), "").await.expect("connect");
    let shown = format!("{l:?}");
    assert!(shown.contains(&common::bootstrap()), "{shown}");
    l.close().await.expect("close");
}

/// Hostile passwords (every URL-reserved character, percent-encoded so they parse), in the
/// user-info and as `kafka.sasl.password`, never show in the error of a failed connect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_passwords_never_show_in_connect_errors() {
    use chanlayer_testkit::secrets::{assert_hidden, encode, HOSTILE_PASSWORDS};
    let mut attempts = Vec::new();
    for password in HOSTILE_PASSWORDS {
        let enc = encode(password);
        let url = format!(
            "kafka://app:{enc}@127.0.0.1:1?connection_timeout=1s&delivery_timeout=1s&kafka.ssl.key.password={enc}"
        );
        attempts.push(tokio::spawn(async move {
            let config = chanlayer_core::LayerConfig::from_url(&url).expect("parse");
            let err = KafkaLayer::connect(&config)
                .await
                .expect_err("nothing listens on port 1");
            let text = format!("{err} / {err:?}");
            assert_hidden(&text, password, &url);
            assert!(
                text.contains("127.0.0.1:1"),
                "the error names the broker: {text}"
            );
        }));
    }
    for a in attempts {
        a.await.expect("the attempt");
    }
}

/// A reader whose buffer is full (`prefetch`) stops taking messages and starts again when
/// it receives, losing none, with record batches of many records (linger 20 ms) that the
/// small buffer takes a few at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_prefetch_buffer_loses_nothing() {
    let prefix = ns();
    let mut config = chanlayer_core::LayerConfig::from_url(&format!(
        "kafka://{}?retention=1h&prefetch=3&linger=20ms",
        common::bootstrap()
    ))
    .expect("url");
    config.options = options(&prefix);
    let l = KafkaLayer::connect(&config).await.expect("connect");
    let ch = format!("{prefix}.work");
    // Start the reader, then let many messages pile up in few batches.
    l.send(&ch, seq(0)).await.expect("send");
    assert_eq!(recv(&l, &ch).await.decode::<u64>().expect("seq"), 0);
    let sends = (1..=300u64).map(|i| l.send(&ch, seq(i)));
    for r in futures::future::join_all(sends).await {
        r.expect("send");
    }
    let mut got = Vec::new();
    while got.len() < 300 {
        got.push(recv(&l, &ch).await.decode::<u64>().expect("seq"));
    }
    got.sort_unstable();
    assert_eq!(got, (1..=300).collect::<Vec<_>>());
    l.close().await.expect("close");
}
