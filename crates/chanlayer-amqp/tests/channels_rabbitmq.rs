//! `wire=channels_rabbitmq` against the real thing: Django's `channels_rabbitmq` 4.0.1 (with
//! `channels` 4.x, from PyPI) in a separate Python process on the same RabbitMQ, driven by
//! `tests/python/peer.py` over stdin/stdout.
//!
//! Needs RabbitMQ on 127.0.0.1:5672 (`scripts/brokers/rabbitmq.sh`) and the Python virtual
//! environment `scripts/python/venv.sh` makes (`$CHANLAYER_VENV`, by default
//! `~/.cache/chanlayer/venv`); without either they fail, saying which command fixes it.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use chanlayer_amqp::AmqpLayer;
use chanlayer_core::{ChannelLayer, Codec, Error, LayerConfig, Message};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// A chat line as both sides see it: a struct with named fields is a MessagePack map.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Chat {
    text: String,
    n: u32,
}

fn chat(text: &str, n: u32) -> Message {
    Message::encode_as(
        "chat.message",
        &Chat {
            text: text.into(),
            n,
        },
        Codec::Msgpack,
    )
    .expect("as expected")
}

fn python() -> PathBuf {
    let venv = std::env::var_os("CHANLAYER_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/chanlayer/venv")
        });
    let python = venv.join("bin/python");
    assert!(
        python.exists(),
        "no Python virtual environment at {} (channels_rabbitmq and channels are needed): run `bash scripts/python/venv.sh`",
        venv.display()
    );
    python
}

fn require_rabbitmq() {
    assert!(
        std::net::TcpStream::connect_timeout(
            &"127.0.0.1:5672".parse().expect("an address"),
            Duration::from_secs(2)
        )
        .is_ok(),
        "RabbitMQ is not listening on 127.0.0.1:5672: run `bash scripts/brokers/rabbitmq.sh`"
    );
}

/// A name nobody else uses: groups exchanges, groups.
fn unique(what: &str) -> String {
    format!("interop.{what}.{:08x}", rand::random::<u32>())
}

/// The Python process: one channels_rabbitmq layer.
struct Peer {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    stderr: PathBuf,
}

impl Peer {
    fn start(exchange: &str, settings: &[(&str, &str)]) -> Peer {
        require_rabbitmq();
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python");
        let stderr = std::env::temp_dir().join(format!(
            "chanlayer-peer-{}-{:08x}.log",
            std::process::id(),
            rand::random::<u32>()
        ));
        let mut cmd = Command::new(python());
        cmd.arg(dir.join("peer.py"))
            .env("PEER_AMQP_URL", common::broker_url())
            .env("PEER_GROUPS_EXCHANGE", exchange)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).expect("peer log"));
        for (k, v) in settings {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start the Python peer");
        let stdin = child.stdin.take().expect("piped");
        let stdout = BufReader::new(child.stdout.take().expect("piped"));
        let mut peer = Peer {
            child,
            stdin,
            stdout,
            stderr,
        };
        assert_eq!(peer.read(), json!({"ready": true}));
        // channels_rabbitmq connects (and declares its queue) on first use, not on
        // new_channel: until then, sends to its channels go nowhere.
        peer.call(json!({"op": "queue"}));
        peer
    }

    fn read(&mut self) -> Value {
        let mut line = String::new();
        let n = self.stdout.read_line(&mut line).expect("read the peer");
        let log = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        assert!(n > 0, "the Python peer ended; its stderr:\n{log}");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("peer said {line:?} ({e})"))
    }

    /// Runs one command; panics with the peer's log on a Python exception.
    fn call(&mut self, cmd: Value) -> Value {
        writeln!(self.stdin, "{cmd}").expect("write to the peer");
        self.stdin.flush().expect("as expected");
        let answer = self.read();
        if let Some(e) = answer.get("exception") {
            let log = std::fs::read_to_string(&self.stderr).unwrap_or_default();
            panic!("the peer failed {cmd}: {e}\nits stderr:\n{log}");
        }
        answer
    }

    fn new_channel(&mut self) -> String {
        self.call(json!({"op": "new_channel"}))["channel"]
            .as_str()
            .expect("as expected")
            .to_owned()
    }

    fn receive(&mut self, channel: &str, timeout_s: f64) -> Option<Value> {
        let a = self.call(json!({"op": "receive", "channel": channel, "timeout": timeout_s}));
        a.get("message").cloned()
    }

    /// Field `key` of the next message on `channel` (within 10 s; panics if none came).
    fn field(&mut self, channel: &str, key: &str) -> Value {
        let message = self.receive(channel, 10.0);
        message.unwrap_or_else(|| panic!("nothing arrived at {channel} within 10 s"))[key].clone()
    }

    fn send(&mut self, channel: &str, message: Value) -> Value {
        self.call(json!({"op": "send", "channel": channel, "message": message}))
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A chanlayer instance on channels_rabbitmq's wire, with groups exchange `exchange`.
async fn rust(exchange: &str, extra: &str) -> AmqpLayer {
    let url = format!(
        "{}?wire=channels_rabbitmq&codec=msgpack&groups_exchange={exchange}{extra}",
        common::broker_url()
    );
    AmqpLayer::connect(&LayerConfig::from_url(&url).expect("the chanlayer call succeeds"))
        .await
        .expect("as expected")
}

/// A fresh groups exchange of its own (named after `what`), a chanlayer instance on it with
/// `extra` URL options, and a Python peer on it with `settings`.
async fn pair(what: &str, extra: &str, settings: &[(&str, &str)]) -> (AmqpLayer, Peer) {
    let ex = unique(what);
    let layer = rust(&ex, extra).await;
    let peer = Peer::start(&ex, settings);
    (layer, peer)
}

/// A new process-local channel of `layer`.
async fn channel(layer: &AmqpLayer) -> String {
    layer
        .new_channel("ws")
        .await
        .expect("the chanlayer call succeeds")
}

async fn receive_within(layer: &AmqpLayer, channel: &str) -> Message {
    tokio::time::timeout(Duration::from_secs(10), layer.receive(channel))
        .await
        .unwrap_or_else(|_| panic!("nothing arrived at {channel} within 10 s"))
        .expect("as expected")
}

/// The next message on `channel` (within 10 s), decoded as a [`Chat`].
async fn receive_chat(layer: &AmqpLayer, channel: &str) -> Chat {
    receive_within(layer, channel)
        .await
        .decode::<Chat>()
        .expect("a Chat map")
}

fn is_channels_rabbitmq_name(name: &str) -> bool {
    let letters = |s: &str| s.len() == 12 && s.bytes().all(|b| b.is_ascii_alphabetic());
    match name.split_once('!') {
        Some((queue, tail)) => {
            queue.strip_prefix("channels_").is_some_and(letters) && letters(tail)
        }
        None => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_and_queue_look_like_channels_rabbitmq() {
    let (layer, mut peer) = pair("names", "", &[]).await;
    let mine = channel(&layer).await;
    let theirs = peer.new_channel();
    assert!(is_channels_rabbitmq_name(&mine), "{mine}");
    assert!(is_channels_rabbitmq_name(&theirs), "{theirs}");
    assert_eq!(mine.split('!').next(), Some(layer.inbox_queue()));
    // Normal channels do not exist on this wire, as in channels_rabbitmq.
    assert!(!layer.capabilities().normal_channels);
    for r in [
        layer.send("jobs", chat("x", 0)).await,
        layer.receive("jobs").await.map(|_| ()),
        layer.group_add(&unique("g"), "jobs").await,
    ] {
        assert!(matches!(r, Err(Error::Unsupported { .. })), "{r:?}");
    }
    layer.close().await.expect("the chanlayer call succeeds");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sends_to_a_rust_channel_and_rust_to_a_python_channel() {
    // The default groups exchange, `groups`, as a Django deployment has it.
    let layer = rust("groups", "").await;
    let mut peer = Peer::start("groups", &[]);
    let mine = channel(&layer).await;
    let theirs = peer.new_channel();

    let a = peer.send(
        &mine,
        json!({"type": "chat.message", "text": "from python", "n": 1}),
    );
    assert_eq!(a, json!({"ok": true}));
    let m = receive_within(&layer, &mine).await;
    assert_eq!(m.message_type(), "chat.message");
    assert_eq!(m.codec(), Codec::Msgpack);
    assert_eq!(
        m.decode::<Chat>().expect("as expected"),
        Chat {
            text: "from python".into(),
            n: 1
        }
    );

    layer
        .send(&theirs, chat("from rust", 2))
        .await
        .expect("the chanlayer call succeeds");
    assert_eq!(
        peer.receive(&theirs, 10.0),
        Some(json!({"type": "chat.message", "text": "from rust", "n": 2}))
    );
    // A body in JSON maps too; a unit body is a dict with only its type.
    let json_body = Message::encode_as(
        "chat.message",
        &Chat {
            text: "json".into(),
            n: 3,
        },
        Codec::Json,
    )
    .expect("as expected");
    layer
        .send(&theirs, json_body)
        .await
        .expect("the chanlayer call succeeds");
    layer
        .send(
            &theirs,
            Message::encode_as("chat.ping", &(), Codec::Msgpack).expect("encodes"),
        )
        .await
        .expect("as expected");
    assert_eq!(
        peer.receive(&theirs, 10.0),
        Some(json!({"type": "chat.message", "text": "json", "n": 3}))
    );
    assert_eq!(
        peer.receive(&theirs, 10.0),
        Some(json!({"type": "chat.ping"}))
    );
    let s = layer.stats();
    assert_eq!((s.sent, s.received, s.undecodable), (3, 1, 0));
    layer.close().await.expect("the chanlayer call succeeds");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_with_members_on_both_sides() {
    let ex = unique("groups");
    let group = unique("room");
    let layer = rust(&ex, "").await;
    let mut peer = Peer::start(&ex, &[]);
    let mine = channel(&layer).await;
    let (p1, p2) = (peer.new_channel(), peer.new_channel());
    layer
        .group_add(&group, &mine)
        .await
        .expect("the chanlayer call succeeds");
    for p in [&p1, &p2] {
        peer.call(json!({"op": "group_add", "group": group, "channel": p}));
    }

    // Rust → every member, Python's two included.
    layer
        .group_send(&group, chat("rust to all", 1))
        .await
        .expect("as expected");
    assert_eq!(receive_chat(&layer, &mine).await.text, "rust to all");
    for p in [&p1, &p2] {
        assert_eq!(peer.field(p, "text"), "rust to all");
    }
    // Python → every member, Rust's included.
    peer.call(json!({"op": "group_send", "group": group, "message": {"type": "chat.message", "text": "python to all", "n": 2}}));
    assert_eq!(
        receive_chat(&layer, &mine).await,
        Chat {
            text: "python to all".into(),
            n: 2
        }
    );
    for p in [&p1, &p2] {
        assert_eq!(peer.field(p, "text"), "python to all");
    }

    // Python discards p1: a later group message reaches p2, and p1 gets only what is sent to
    // it directly afterwards (one publisher, one queue: in order).
    peer.call(json!({"op": "group_discard", "group": group, "channel": p1}));
    layer
        .group_send(&group, chat("after p1 left", 3))
        .await
        .expect("as expected");
    layer
        .send(&p1, chat("direct to p1", 4))
        .await
        .expect("the chanlayer call succeeds");
    assert_eq!(peer.field(&p2, "text"), "after p1 left");
    assert_eq!(peer.field(&p1, "text"), "direct to p1");
    assert_eq!(receive_chat(&layer, &mine).await.n, 3);

    // Rust discards its member: the same from the other side.
    layer
        .group_discard(&group, &mine)
        .await
        .expect("the chanlayer call succeeds");
    peer.call(json!({"op": "group_send", "group": group, "message": {"type": "chat.message", "text": "after rust left", "n": 5}}));
    peer.send(
        &mine,
        json!({"type": "chat.message", "text": "direct to rust", "n": 6}),
    );
    assert_eq!(peer.field(&p2, "text"), "after rust left");
    assert_eq!(receive_chat(&layer, &mine).await.n, 6);
    layer.close().await.expect("the chanlayer call succeeds");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_python_queue_is_channel_full_in_rust() {
    // remote_capacity 5 (x-max-length), local_capacity 1 (its consumer's prefetch): the
    // Python process never receives, so its queue fills.
    let settings = [("PEER_REMOTE_CAPACITY", "5"), ("PEER_LOCAL_CAPACITY", "1")];
    let (layer, mut peer) = pair("full", "", &settings).await;
    let theirs = peer.new_channel();
    let mut sent = 0;
    let err = loop {
        match layer.send(&theirs, chat("fill", sent)).await {
            Ok(()) => sent += 1,
            Err(e) => break e,
        }
        assert!(sent <= 20, "20 sends to a queue of 5 were all accepted");
    };
    assert!(
        matches!(&err, Error::ChannelFull { channel, .. } if channel == &theirs),
        "{err:?}"
    );
    println!("{sent} sends accepted, then {err}");
    // 5 wait in the queue, at most one more in the consumer's prefetch window.
    assert!((5..=6).contains(&sent), "sent {sent} before ChannelFull");
    assert_eq!(peer.field(&theirs, "n"), 0);
    layer.close().await.expect("the chanlayer call succeeds");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rust_channel_over_capacity_drops_and_counts() {
    // chanlayer consumes its queue without acks (as it does on its own wire) and keeps each
    // channel's capacity where messages arrive: what does not fit is dropped and counted
    // (`dropped_full`), not pushed back to the Python sender.
    let (layer, mut peer) = pair("cap", "&capacity=3", &[]).await;
    let mine = channel(&layer).await;
    let a = peer.call(json!({"op": "send_until_full", "channel": mine, "message": {"type": "chat.message", "text": "x"}, "max": 8}));
    assert_eq!(a, json!({"sent": 8, "full": false}));
    let deadline = Instant::now() + Duration::from_secs(10);
    while layer.stats().dropped_full < 5 {
        assert!(Instant::now() < deadline, "{:?}", layer.stats());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for n in 0..3 {
        assert_eq!(
            receive_within(&layer, &mine)
                .await
                .decode::<serde_json::Map<String, Value>>()
                .expect("as expected")["n"],
            n
        );
    }
    assert_eq!(layer.stats().dropped_full, 5);
    layer.close().await.expect("the chanlayer call succeeds");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_on_both_sides() {
    // Rust: expiry=1s: what arrives is dropped once older than that, and counted. Python:
    // expiry=1 (its queue's x-message-ttl), prefetch 1.
    let settings = [("PEER_EXPIRY", "1"), ("PEER_LOCAL_CAPACITY", "1")];
    let (layer, mut peer) = pair("expiry", "&expiry=1s", &settings).await;
    let mine = channel(&layer).await;
    let theirs = peer.new_channel();

    peer.send(
        &mine,
        json!({"type": "chat.message", "text": "old", "n": 1}),
    );
    layer
        .send(&theirs, chat("in the prefetch window", 1))
        .await
        .expect("as expected");
    layer
        .send(&theirs, chat("waits in the queue", 2))
        .await
        .expect("as expected");
    // The behaviour under test is time passing: both sides' expiry is 1 s.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    peer.send(
        &mine,
        json!({"type": "chat.message", "text": "new", "n": 2}),
    );
    layer
        .send(&theirs, chat("new", 3))
        .await
        .expect("the chanlayer call succeeds");

    assert_eq!(receive_chat(&layer, &mine).await.text, "new");
    assert_eq!(layer.stats().expired, 1);
    // Python holds the first (already delivered to its consumer); RabbitMQ dropped the
    // second after its x-message-ttl; the third arrives.
    assert_eq!(peer.field(&theirs, "n"), 1);
    assert_eq!(peer.field(&theirs, "n"), 3);
    layer.close().await.expect("the chanlayer call succeeds");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_from_python_is_counted_in_rust() {
    let (layer, mut peer) = pair("garbage", "", &[]).await;
    let mine = channel(&layer).await;
    let queue = layer.inbox_queue().to_owned();
    // Not MessagePack; a map without "type"; a map with neither address key; then a message.
    for hex in ["c1ffff", "81a474657874a26869", "81a474797065a3612e62"] {
        assert_eq!(
            peer.call(json!({"op": "publish_raw", "routing_key": queue, "hex": hex})),
            json!({"ok": true})
        );
    }
    peer.send(
        &mine,
        json!({"type": "chat.message", "text": "after", "n": 9}),
    );
    assert_eq!(receive_chat(&layer, &mine).await.n, 9);
    assert_eq!(layer.stats().undecodable, 3);
    layer.close().await.expect("the chanlayer call succeeds");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_does_not_map_to_a_dict_is_refused_before_sending() {
    let (layer, mut peer) = pair("refuse", "", &[]).await;
    let theirs = peer.new_channel();
    // The dict has no place for headers, and the capabilities say so.
    assert!(!layer.capabilities().headers);
    let refused = [
        Message::encode_as(
            "t.a",
            &Chat {
                text: "b".into(),
                n: 1,
            },
            Codec::Bincode,
        )
        .expect("as expected"),
        Message::encode_as("t.a", &7u32, Codec::Msgpack).expect("encodes"),
        Message::encode_as("t.a", &("tuple", 1), Codec::Msgpack).expect("encodes"),
        chat("with a header", 1).with_header("k", "v"),
        Message::encode_as("t.a", &serde_json::json!({"type": "again"}), Codec::Json)
            .expect("encodes"),
    ];
    for m in refused {
        let r = layer.send(&theirs, m).await;
        assert!(
            matches!(&r, Err(Error::Codec { message, .. }) if message.contains("Django Channels message dict")),
            "{r:?}"
        );
    }
    layer
        .send(&theirs, chat("fine", 2))
        .await
        .expect("the chanlayer call succeeds");
    assert_eq!(peer.field(&theirs, "text"), "fine");
    assert_eq!(layer.stats().sent, 1);
    layer.close().await.expect("the chanlayer call succeeds");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_from_rust_ends_the_python_reader_uncounted() {
    // Where the two disagree: channels_rabbitmq 4.0.1 decodes in its reader task without a
    // guard, so bytes that are not MessagePack end that task (msgpack's FormatError in its
    // log) and the process receives nothing more until it restarts. chanlayer never sends
    // such bytes (every send is a dict, or refused: see the test above); only `publish_raw`,
    // a tool for exactly this kind of test, can.
    let (layer, mut peer) = pair("garbage-py", "", &[]).await;
    let theirs = peer.new_channel();
    layer
        .send(&theirs, chat("before", 1))
        .await
        .expect("the chanlayer call succeeds");
    assert_eq!(peer.field(&theirs, "n"), 1);
    layer
        .publish_raw(&theirs, &[0xc1, 0xff, 0xff])
        .await
        .expect("as expected");
    layer
        .send(&theirs, chat("after", 2))
        .await
        .expect("the chanlayer call succeeds");
    assert_eq!(peer.receive(&theirs, 3.0), None);
    let log = std::fs::read_to_string(&peer.stderr).expect("the peer answered with a message");
    assert!(log.contains("FormatError"), "the peer's log:\n{log}");
    layer.close().await.expect("the chanlayer call succeeds");
}
