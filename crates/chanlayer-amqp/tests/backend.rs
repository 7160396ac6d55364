//! What only the AMQP backend has, on a real RabbitMQ: garbage on the inbox queue, broker-side
//! capacity of normal channels, prefixes that keep applications apart, password redaction,
//! TTLs at the broker.

mod common;

use std::sync::Arc;
use std::time::Duration;

use chanlayer_amqp::AmqpLayer;
use chanlayer_core::{ChannelLayer, Codec, Error, LayerConfig, LayerOptions, Message};
use lapin::options::BasicPublishOptions;
use lapin::types::ShortString;
use lapin::{BasicProperties, Connection, ConnectionProperties};

const DEADLINE: Duration = Duration::from_secs(15);

fn ns(tag: &str) -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write(tag.as_bytes());
    format!("b{:016x}", h.finish())
}

async fn layer(prefix: &str, options: LayerOptions, extra: &str) -> Arc<AmqpLayer> {
    let options = LayerOptions {
        prefix: prefix.to_owned(),
        ..options
    };
    Arc::new(
        common::connect(options, extra)
            .await
            .expect("connect to RabbitMQ"),
    )
}

async fn recv(l: &AmqpLayer, ch: &str) -> Message {
    tokio::time::timeout(DEADLINE, l.receive(ch))
        .await
        .unwrap_or_else(|_| panic!("nothing on {ch} within {DEADLINE:?}"))
        .expect("receive")
}

async fn quiet(l: &AmqpLayer, ch: &str) {
    if let Ok(r) = tokio::time::timeout(Duration::from_millis(300), l.receive(ch)).await {
        panic!("expected nothing on {ch}, got {r:?}");
    }
}

fn seq(i: u64) -> Message {
    Message::encode_as("test.seq", &i, Codec::Bincode).expect("encode")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_published_by_another_client_onto_the_inbox_is_skipped_and_counted() {
    let prefix = ns("garbage");
    let l = layer(&prefix, LayerOptions::default(), "").await;
    let me = l.new_channel("g").await.expect("new_channel");
    // A plain lapin client, not the layer, writes straight onto the inbox queue.
    let conn = Connection::connect(&common::broker_url(), ConnectionProperties::default())
        .await
        .expect("raw lapin connects");
    let ch = conn.create_channel().await.expect("channel");
    let garbage: [&[u8]; 4] = [
        b"",
        b"hello, not an envelope",
        b"CL\x01\xff\xff\xff",
        b"CL\x09rest",
    ];
    for g in garbage {
        ch.basic_publish(
            ShortString::from(""),
            ShortString::from(l.inbox_queue()),
            BasicPublishOptions::default(),
            g,
            BasicProperties::default(),
        )
        .await
        .expect("publish garbage");
    }
    l.send(&me, seq(7)).await.expect("send after the garbage");
    assert_eq!(recv(&l, &me).await.decode::<u64>().expect("decode"), 7);
    chanlayer_testkit::eventually("the garbage is counted", || {
        l.stats().undecodable >= garbage.len() as u64
    })
    .await;
    assert_eq!(l.stats().undecodable, garbage.len() as u64);
    l.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_normal_channel_is_channel_full_at_the_broker_across_instances() {
    let prefix = ns("full");
    let opts = LayerOptions {
        capacity: 2,
        ..LayerOptions::default()
    };
    let a = layer(&prefix, opts.clone(), "").await;
    let b = layer(&prefix, opts, "").await;
    let ch = format!("{prefix}.jobs");
    a.send(&ch, seq(0)).await.expect("send 0");
    b.send(&ch, seq(1))
        .await
        .expect("send 1 from another instance");
    let err = a.send(&ch, seq(2)).await.expect_err("the queue holds 2");
    assert!(matches!(err, Error::ChannelFull { .. }), "{err:?}");
    assert!(err.to_string().contains(&ch), "{err}");
    let err = b
        .send(&ch, seq(2))
        .await
        .expect_err("full for every sender");
    assert!(matches!(err, Error::ChannelFull { .. }), "{err:?}");
    assert_eq!(recv(&b, &ch).await.decode::<u64>().expect("decode"), 0);
    a.send(&ch, seq(3))
        .await
        .expect("room again after a receive");
    a.close().await.expect("close");
    b.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_send_to_a_full_member_queue_is_a_counted_skip() {
    let prefix = ns("gfull");
    let l = layer(
        &prefix,
        LayerOptions {
            capacity: 1,
            ..LayerOptions::default()
        },
        "",
    )
    .await;
    let group = format!("{prefix}.g");
    let full = format!("{prefix}.full");
    let free = format!("{prefix}.free");
    l.group_add(&group, &full).await.expect("group_add");
    l.group_add(&group, &free).await.expect("group_add");
    l.send(&full, seq(0)).await.expect("fill the member");
    l.group_send(&group, seq(1))
        .await
        .expect("group_send never fails for capacity");
    assert_eq!(
        l.stats().group_member_full,
        1,
        "the skipped copy is counted"
    );
    assert_eq!(recv(&l, &free).await.decode::<u64>().expect("decode"), 1);
    assert_eq!(recv(&l, &full).await.decode::<u64>().expect("decode"), 0);
    quiet(&l, &full).await;
    l.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_prefixes_on_one_vhost_do_not_share_queues_or_groups() {
    let base = ns("prefixes");
    let (pa, pb) = (format!("{base}a"), format!("{base}b"));
    let a = layer(&pa, LayerOptions::default(), "").await;
    let b = layer(&pb, LayerOptions::default(), "").await;
    assert_ne!(a.channel_queue("jobs"), b.channel_queue("jobs"));
    let (ma, mb) = (
        a.new_channel("m").await.expect("new_channel"),
        b.new_channel("m").await.expect("new_channel"),
    );
    a.group_add("room", &ma).await.expect("group_add");
    b.group_add("room", &mb).await.expect("group_add");
    a.send("jobs", seq(1)).await.expect("send");
    b.send("jobs", seq(2)).await.expect("send");
    a.group_send("room", seq(10)).await.expect("group_send");
    b.group_send("room", seq(20)).await.expect("group_send");
    assert_eq!(recv(&a, "jobs").await.decode::<u64>().expect("decode"), 1);
    assert_eq!(recv(&b, "jobs").await.decode::<u64>().expect("decode"), 2);
    assert_eq!(recv(&a, &ma).await.decode::<u64>().expect("decode"), 10);
    assert_eq!(recv(&b, &mb).await.decode::<u64>().expect("decode"), 20);
    quiet(&a, "jobs").await;
    quiet(&a, &ma).await;
    quiet(&b, &mb).await;
    a.close().await.expect("close");
    b.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_never_show() {
    let secret = "n0t-the-Passw0rd";
    let url = format!("amqp://guest:{secret}@127.0.0.1:5672/%2f?connection_timeout=5s");
    let config = LayerConfig::from_url(&url).expect("parse");
    let err = AmqpLayer::connect(&config)
        .await
        .expect_err("a wrong password is refused");
    let text = format!("{err} {err:?} {:?}", std::error::Error::source(&err));
    assert!(!text.contains(secret), "{text}");
    assert!(
        text.contains("127.0.0.1:5672"),
        "the error names the broker: {text}"
    );
    // A working layer's Debug and its config's Display/Debug hide the password too.
    let l = layer(&ns("creds"), LayerOptions::default(), "").await;
    let config = LayerConfig::from_url(&common::broker_url()).expect("parse");
    for text in [format!("{l:?}"), format!("{config}"), format!("{config:?}")] {
        assert!(!text.contains(":guest@"), "{text}");
    }
    l.close().await.expect("close");
}

/// Hostile passwords (every URL-reserved character, percent-encoded so they parse) never
/// show in the error of a refused login at the broker, nor of a broker that is not there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_passwords_never_show_in_connect_errors() {
    use chanlayer_testkit::secrets::{assert_hidden, encode, HOSTILE_PASSWORDS};
    for password in HOSTILE_PASSWORDS {
        // One broker that refuses the login, one that is not there, and several hosts: a
        // dead one and one that refuses the login.
        for address in [
            "127.0.0.1:5672",
            "127.0.0.1:1",
            "127.0.0.1:1,127.0.0.1:5672",
        ] {
            let url = format!(
                "amqp://guest:{}@{address}/%2f?connection_timeout=5s",
                encode(password)
            );
            let config = LayerConfig::from_url(&url).expect("an encoded password parses");
            let err = AmqpLayer::connect(&config)
                .await
                .expect_err("a wrong password, or no broker");
            let text = format!("{err} {err:?} {:?}", std::error::Error::source(&err));
            assert_hidden(&text, password, &url);
            assert!(text.contains(address), "the error names the broker: {text}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_broker_is_a_clear_error() {
    let config = LayerConfig::from_url("amqp://guest:guest@127.0.0.1:1/%2f?connection_timeout=3s")
        .expect("parse");
    let err = AmqpLayer::connect(&config)
        .await
        .expect_err("nothing listens on port 1");
    assert!(
        matches!(err, Error::Backend { .. } | Error::Timeout { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("127.0.0.1:1"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_instances_local_channel_cannot_join_a_group_here() {
    let prefix = ns("notowner");
    let a = layer(&prefix, LayerOptions::default(), "").await;
    let b = layer(&prefix, LayerOptions::default(), "").await;
    let theirs = b.new_channel("x").await.expect("new_channel");
    let err = a
        .group_add(&format!("{prefix}.g"), &theirs)
        .await
        .expect_err("only the owner adds its local channels");
    assert!(matches!(err, Error::NotOwner { .. }), "{err:?}");
    a.close().await.expect("close");
    b.close().await.expect("close");
}

/// Several hosts in the URL: a dead host is skipped and the layer connects to the next; when
/// none answers, the error names every host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_hosts_are_tried_in_turn() {
    let url = "amqp://guest:guest@127.0.0.1:1,127.0.0.1:5672/%2f?connection_timeout=5s";
    let l = AmqpLayer::connect(&LayerConfig::from_url(url).expect("parse"))
        .await
        .expect("the second host answers");
    assert_eq!(
        l.connected_broker().as_deref(),
        Some("amqp://127.0.0.1:5672/%2F")
    );
    let me = l.new_channel("x").await.expect("new_channel");
    l.send(&me, seq(1)).await.expect("send");
    assert_eq!(recv(&l, &me).await.decode::<u64>().expect("decode"), 1);
    l.close().await.expect("close");

    let url = "amqp://guest:guest@127.0.0.1:1,127.0.0.1:2/%2f?connection_timeout=3s";
    let err = AmqpLayer::connect(&LayerConfig::from_url(url).expect("parse"))
        .await
        .expect_err("nothing listens on ports 1 and 2");
    let text = err.to_string();
    assert!(
        text.contains("any of the 2 hosts")
            && text.contains("amqp://127.0.0.1:1/")
            && text.contains("amqp://127.0.0.1:2/"),
        "{text}"
    );
}

/// `queue_type=quorum`: a normal channel is a quorum queue (a single node has them too). A
/// layer of the other type that finds the queue refuses it clearly, whichever way round and
/// whatever capacity it has; one of the same type with another capacity uses it as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_queues_and_a_queue_of_another_type_is_a_clear_error() {
    let prefix = ns("quorum");
    let options = |capacity| LayerOptions {
        capacity,
        ..LayerOptions::default()
    };
    let quorum = layer(&prefix, options(50), "queue_type=quorum").await;
    let classic = layer(&prefix, options(50), "").await;
    let jobs = format!("{prefix}.jobs");
    for i in 0..3 {
        quorum
            .send(&jobs, seq(i))
            .await
            .expect("send to a quorum queue");
    }
    for i in 0..3 {
        let d = tokio::time::timeout(DEADLINE, quorum.receive_delivery(&jobs))
            .await
            .expect("arrives")
            .expect("receive_delivery");
        assert_eq!(d.message().decode::<u64>().expect("decode"), i);
        d.ack().await.expect("ack");
    }
    // The same type with another capacity: the queue is used as it was created.
    let quorum7 = layer(&prefix, options(7), "queue_type=quorum").await;
    quorum7.send(&jobs, seq(3)).await.expect("send");
    assert_eq!(
        recv(&quorum, &jobs).await.decode::<u64>().expect("decode"),
        3
    );

    let check = |err: Error, theirs: &str, ours: &str| {
        let text = err.to_string();
        assert!(matches!(err, Error::Config(_)), "{err:?}");
        for want in [
            format!("as a {theirs} queue"),
            format!("queue_type={ours}"),
            "same queue_type".to_owned(),
            "delete".to_owned(),
            "406 PRECONDITION_FAILED".to_owned(),
        ] {
            assert!(text.contains(&want), "{want:?} in {text}");
        }
    };
    // A classic layer finds the quorum queue: whatever its capacity.
    check(
        classic.send(&jobs, seq(9)).await.expect_err("another type"),
        "quorum",
        "classic",
    );
    let classic7 = layer(&prefix, options(7), "").await;
    check(
        classic7
            .send(&jobs, seq(9))
            .await
            .expect_err("another type"),
        "quorum",
        "classic",
    );
    // A quorum layer finds a classic queue: on send and on receive.
    let plain = format!("{prefix}.plain");
    classic
        .send(&plain, seq(1))
        .await
        .expect("send to a classic queue");
    check(
        quorum.send(&plain, seq(2)).await.expect_err("another type"),
        "classic",
        "quorum",
    );
    check(
        tokio::time::timeout(DEADLINE, quorum.receive(&plain))
            .await
            .expect("fails at once")
            .expect_err("another type"),
        "classic",
        "quorum",
    );
    assert_eq!(
        recv(&classic, &plain)
            .await
            .decode::<u64>()
            .expect("decode"),
        1
    );
    for l in [quorum, quorum7, classic, classic7] {
        l.close().await.expect("close");
    }
}
