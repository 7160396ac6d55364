//! `chanlayer kafka-inboxes`: the inbox topic a crashed instance leaves behind is listed and
//! removed. Needs the Kafka broker the test script starts (or `KAFKA_BOOTSTRAP`).

use std::process::{Command, Output};

use chanlayer_core::LayerConfig;
use chanlayer_kafka::KafkaLayer;
use chanlayer_testkit::peer::Peer;

/// Not a test: the peer process the other tests start (this binary, run again).
#[test]
#[ignore = "the peer process of the other tests (they start it)"]
fn peer_process() {
    chanlayer_testkit::peer::run_from_env(|url| async move {
        KafkaLayer::connect(&LayerConfig::from_url(&url)?).await
    });
}

fn chanlayer(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_chanlayer"))
        .args(args)
        .env_remove("CHANLAYER_URL")
        .output()
        .expect("run the chanlayer binary")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_instances_inbox_is_listed_and_removed() {
    let bootstrap =
        std::env::var("KAFKA_BOOTSTRAP").unwrap_or_else(|_| "127.0.0.1:9092".to_owned());
    let prefix = format!("cli{:x}", rand::random::<u64>());
    let url = format!("kafka://{bootstrap}?prefix={prefix}&retention=1h");
    // A peer process makes its inbox topic, says which channel is its own, and is killed:
    // what a crashed service leaves behind.
    let mut peer = Peer::spawn("serve", &url, &[&format!("{prefix}.g")]);
    let line = peer.line().await;
    let channel = line
        .strip_prefix("READY ")
        .unwrap_or_else(|| panic!("expected READY, got {line:?}"));
    let instance = chanlayer_core::names::owner_instance(channel)
        .expect("a process-local channel names its instance")
        .to_owned();
    peer.kill();

    let out = chanlayer(&["kafka-inboxes", "--url", &url]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let listed = text(&out.stdout);
    assert_eq!(
        listed,
        format!(
            "{instance}\t{}\n",
            chanlayer_kafka::inbox_topic(&prefix, &instance)
        ),
        "exactly the crashed instance's inbox under this prefix"
    );

    let out = chanlayer(&["kafka-inboxes", "--url", &url, "--remove", &instance]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).starts_with("removed\t"),
        "{}",
        text(&out.stdout)
    );
    let out = chanlayer(&["kafka-inboxes", "--url", &url]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "", "the inbox is gone");
}
