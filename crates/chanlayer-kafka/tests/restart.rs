//! The broker stopped and restarted under a stream of sends: no `Ok`-acknowledged message is
//! lost, and the receive loop carries on by itself. Also: while the broker is down, a send
//! waits up to `delivery_timeout` and then fails with a clear error.
//!
//! This test runs its own tansu broker (the binary `scripts/test` builds, or
//! `CHANLAYER_TANSU`) with SQLite storage in a temporary directory, on a free port, so the
//! data survives the restart and no other test sees the broker go away.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use chanlayer_core::{ChannelLayer, Codec, Error, LayerConfig, LayerOptions, Message};
use chanlayer_kafka::KafkaLayer;

fn tansu_binary() -> PathBuf {
    if let Ok(p) = std::env::var("CHANLAYER_TANSU") {
        return p.into();
    }
    let home = std::env::var("HOME").expect("HOME is set");
    let p = PathBuf::from(home).join(".cargo/bin/tansu");
    assert!(
        p.exists(),
        "the tansu broker is not at {} (scripts/test builds it; or set CHANLAYER_TANSU)",
        p.display()
    );
    p
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind an ephemeral port")
        .local_addr()
        .expect("local addr")
        .port()
}

/// A tansu broker process with SQLite storage in `dir`; killed when dropped.
struct Broker {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
}

impl Broker {
    fn start(port: u16, dir: PathBuf) -> Broker {
        let url = format!("tcp://127.0.0.1:{port}");
        let log = std::fs::File::create(dir.join("tansu.log")).expect("log file");
        let child = Command::new(tansu_binary())
            .current_dir(&dir)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "sqlite://tansu.db"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("tansu starts");
        Broker {
            child: Some(child),
            port,
            dir,
        }
    }

    async fn wait_listening(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "tansu did not listen on {} (log: {})",
                self.port,
                self.dir.join("tansu.log").display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the broker (SIGKILL: the harshest stop; what it acknowledged is on disk).
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}

fn seq(i: u64) -> Message {
    Message::encode_as("test.seq", &i, Codec::Bincode).expect("encode")
}

async fn connect(port: u16, prefix: &str, extra: &str) -> KafkaLayer {
    let mut config = LayerConfig::from_url(&format!(
        "kafka://127.0.0.1:{port}?session_timeout=6s&connection_timeout=5s{extra}"
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
async fn broker_restart_mid_stream_loses_no_acknowledged_message() {
    let dir = std::env::temp_dir().join(format!("chanlayer-tansu-{}", rand::random::<u64>()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let port = free_port();
    let mut broker = Broker::start(port, dir.clone());
    broker.wait_listening().await;
    let prefix = "restart";
    let sender = Arc::new(connect(port, prefix, "&delivery_timeout=60s").await);
    let receiver = Arc::new(connect(port, prefix, "").await);
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

    // Sends in flight while the broker goes away and comes back: each one either is
    // acknowledged (then it must arrive) or fails (then it may or may not arrive).
    let mut acked = BTreeSet::new();
    let mut tasks = Vec::new();
    for i in 0..600u64 {
        if i == 300 {
            broker.stop();
            broker = Broker::start(port, dir.clone());
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

    sender.close().await.expect("close");
    receiver.close().await.expect("close");
    reader.await.expect("the receive loop ends with Closed");

    // With the broker down, a send fails clearly within delivery_timeout.
    let quick = connect(port, prefix, "&delivery_timeout=2s&connection_timeout=2s").await;
    broker.stop();
    let err = tokio::time::timeout(Duration::from_secs(30), quick.send(ch, seq(9999)))
        .await
        .expect("the send gives up within its delivery_timeout")
        .expect_err("the broker is down");
    let text = err.to_string();
    assert!(
        text.contains("delivery_timeout") && text.contains(&port.to_string()),
        "{text}"
    );

    // Closing with the broker down ends too (the inbox topic is left to retention).
    let closing = tokio::time::timeout(Duration::from_secs(30), quick.close()).await;
    assert!(closing.is_ok(), "close returns while the broker is down");
    let _ = std::fs::remove_dir_all(&dir);
}
