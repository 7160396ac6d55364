//! Two layer instances in separate OS processes, on a real RabbitMQ: process-local and group
//! messages cross between them, and deliveries held unacked by a killed process come back.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use chanlayer_core::{ChannelLayer, Codec, LayerOptions, Message};

const DEADLINE: Duration = Duration::from_secs(30);

fn ns() -> String {
    format!("p{:016x}", rand_u64())
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(std::process::id().into());
    h.finish()
}

/// Starts the peer binary with `args` after the URL.
fn peer(prefix: &str, args: &[&str]) -> (Child, BufReader<ChildStdout>) {
    let url = common::url_with(&format!("prefix={prefix}"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_chanlayer-amqp-peer"))
        .arg(url)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the peer binary starts");
    let out = BufReader::new(child.stdout.take().expect("piped stdout"));
    (child, out)
}

/// Reads the peer's next line (on a blocking thread, with a deadline).
async fn next_line(out: BufReader<ChildStdout>) -> (String, BufReader<ChildStdout>) {
    let read = tokio::task::spawn_blocking(move || {
        let mut out = out;
        let mut line = String::new();
        let n = out.read_line(&mut line).expect("read the peer's stdout");
        assert!(n > 0, "the peer exited without a word");
        (line.trim_end().to_owned(), out)
    });
    tokio::time::timeout(DEADLINE, read)
        .await
        .expect("the peer answers within the deadline")
        .expect("reader thread")
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
    let (mut child, out) = peer(&prefix, &["serve", &group]);
    let (line, _out) = next_line(out).await;
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
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .expect("wait thread")
        .expect("wait");
    assert!(status.success(), "the peer exits cleanly: {status}");
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
    let (mut child, out) = peer(&prefix, &["hold", &ch, "3"]);
    let (line, _out) = next_line(out).await;
    let held: Vec<u64> = line
        .strip_prefix("HELD ")
        .unwrap_or_else(|| panic!("expected HELD, got {line:?}"))
        .split(' ')
        .map(|s| s.parse().expect("a number"))
        .collect();
    assert_eq!(held, vec![0, 1, 2]);
    child.kill().expect("kill the peer (SIGKILL)");
    let _ = child.wait();

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
