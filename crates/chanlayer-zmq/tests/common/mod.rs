//! Shared by the ZeroMQ backend's test binaries: layer factories for the conformance suite
//! (embedded mode on a Unix socket per test, dedicated mode through a proxy thread per
//! test), URLs, and helpers.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chanlayer_core::{ChannelLayer, LayerConfig, LayerOptions, Message, Result};
use chanlayer_testkit::{LayerFactory, RawInjector, TestLayer};
use chanlayer_zmq::{Proxy, ProxyConfig, ZmqLayer};

/// Options every test URL carries: quick reconnection on loopback.
pub const FAST: &str = "reconnect_interval=20ms";

/// How long a test waits for something that should happen.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// A directory for this test process's Unix sockets.
pub fn ipc_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("chanlayer-zmq-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create the socket directory");
    dir
}

/// A fresh `ipc://` endpoint.
pub fn ipc_endpoint(name: &str) -> String {
    format!("ipc://{}/{name}.sock", ipc_dir().display())
}

/// A free TCP port on 127.0.0.1, picked at random below Linux's ephemeral range (32768 and
/// up): the kernel hands ephemeral ports to `tcp://127.0.0.1:*` binds and to outgoing
/// connections, so a port from there could be taken again before the test binds it.
pub fn free_port() -> u16 {
    for _ in 0..1000 {
        let port = 20_000 + (rand::random::<u16>() % 12_000);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port between 20000 and 32000");
}

/// A random namespace for a test.
pub fn ns() -> String {
    format!("z{:016x}", rand::random::<u64>())
}

/// Connects a layer from `url` with `options` (the URL's own options are replaced).
pub async fn connect_with(url: &str, options: LayerOptions) -> Result<ZmqLayer> {
    let mut config = LayerConfig::from_url(url)?;
    config.options = options;
    ZmqLayer::connect(&config).await
}

/// Connects a layer from `url` (its options kept) with the prefix `prefix`.
pub async fn connect(url: &str, prefix: &str) -> Result<ZmqLayer> {
    let mut config = LayerConfig::from_url(url)?;
    config.options.prefix = prefix.to_owned();
    ZmqLayer::connect(&config).await
}

/// A proxy thread on free loopback ports.
pub fn proxy() -> Proxy {
    Proxy::spawn(ProxyConfig::new("tcp://127.0.0.1:*", "tcp://127.0.0.1:*")).expect("proxy")
}

/// Receives within [`DEADLINE`].
pub async fn recv(layer: &impl ChannelLayer, ch: &str) -> Message {
    tokio::time::timeout(DEADLINE, layer.receive(ch))
        .await
        .unwrap_or_else(|_| panic!("nothing arrived on {ch} within {DEADLINE:?}"))
        .expect("receive")
}

struct Inject(Arc<ZmqLayer>);

#[async_trait]
impl RawInjector for Inject {
    async fn inject(&self, channel: &str, bytes: Vec<u8>) -> Result<()> {
        self.0.publish_raw(channel, bytes).await
    }
}

fn test_layer(layer: ZmqLayer) -> TestLayer {
    let layer = Arc::new(layer);
    TestLayer {
        layer: layer.clone(),
        injector: Arc::new(Inject(layer)),
    }
}

/// Embedded mode: one Unix-socket address per test namespace; the instances of a test share
/// this process's publisher on it.
#[derive(Default)]
pub struct EmbeddedFactory;

#[async_trait]
impl LayerFactory for EmbeddedFactory {
    async fn connect(&self, ns: &str, options: LayerOptions) -> Result<TestLayer> {
        let url = format!("zmq://{}?{FAST}", ipc_endpoint(ns));
        Ok(test_layer(connect_with(&url, options).await?))
    }
}

/// Dedicated mode: one proxy thread per test namespace, on free loopback ports.
#[derive(Default)]
pub struct DedicatedFactory {
    proxies: Mutex<HashMap<String, Proxy>>,
}

#[async_trait]
impl LayerFactory for DedicatedFactory {
    async fn connect(&self, ns: &str, options: LayerOptions) -> Result<TestLayer> {
        let url = {
            let mut proxies = self.proxies.lock().unwrap_or_else(|p| p.into_inner());
            let proxy = match proxies.get(ns) {
                Some(p) => p,
                None => {
                    let p =
                        Proxy::spawn(ProxyConfig::new("tcp://127.0.0.1:*", "tcp://127.0.0.1:*"))?;
                    proxies.entry(ns.to_owned()).or_insert(p)
                }
            };
            format!("{}&{FAST}", proxy.url())
        };
        Ok(test_layer(connect_with(&url, options).await?))
    }
}

/// A stand-in publisher: a raw XPUB socket on its own thread, bound at an endpoint, that
/// records subscriptions, answers subscription probes (when asked to) with a welcome, and
/// publishes whatever frames the test gives it. For tests of what a layer does with a
/// publisher that misbehaves.
pub struct FakePublisher {
    tx: std::sync::mpsc::Sender<Vec<Vec<u8>>>,
    subscribed: Arc<Mutex<std::collections::HashSet<Vec<u8>>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    /// At the stop: send everything queued and wait for it to leave (linger), instead of
    /// dropping it.
    flush: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The epoch the fake publisher announces.
pub const FAKE_EPOCH: u64 = 7;

impl FakePublisher {
    pub fn start(endpoint: &str, answer_probes: bool) -> FakePublisher {
        let (tx, rx) = std::sync::mpsc::channel::<Vec<Vec<u8>>>();
        let subscribed = Arc::new(Mutex::new(std::collections::HashSet::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flush = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = {
            let (subscribed, stop, flush, endpoint) = (
                subscribed.clone(),
                stop.clone(),
                flush.clone(),
                endpoint.to_owned(),
            );
            std::thread::spawn(move || {
                let ctx = zmq::Context::new();
                let xpub = ctx.socket(zmq::XPUB).expect("xpub");
                xpub.set_linger(0).expect("linger");
                // No high-water mark: a test's burst is not dropped on the way.
                xpub.set_sndhwm(0).expect("sndhwm");
                xpub.bind(&endpoint).expect("bind the fake publisher");
                ready_tx.send(()).expect("ready");
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    // A short poll: the loop also checks the test's frames and the stop flag.
                    if xpub.poll(zmq::POLLIN, 5).unwrap_or(0) > 0 {
                        while let Ok(sub) = xpub.recv_bytes(zmq::DONTWAIT) {
                            let Some((&flag, topic)) = sub.split_first() else {
                                continue;
                            };
                            if flag == 1 && topic.starts_with(b"h:") {
                                if answer_probes {
                                    let meta = chanlayer_zmq::wire::meta(
                                        chanlayer_zmq::wire::META_WELCOME,
                                        FAKE_EPOCH,
                                        0,
                                    );
                                    xpub.send(topic, zmq::SNDMORE).expect("send");
                                    xpub.send(&meta[..], 0).expect("send");
                                }
                            } else if flag == 1 {
                                subscribed.lock().expect("lock").insert(topic.to_vec());
                            } else {
                                subscribed.lock().expect("lock").remove(topic);
                            }
                        }
                    }
                    while let Ok(frames) = rx.try_recv() {
                        xpub.send_multipart(frames, 0).expect("send frames");
                    }
                }
                if flush.load(std::sync::atomic::Ordering::SeqCst) {
                    while let Ok(frames) = rx.try_recv() {
                        xpub.send_multipart(frames, 0).expect("send frames");
                    }
                    // Closing the socket and the context waits until it all left.
                    xpub.set_linger(30_000).expect("linger");
                }
            })
        };
        ready_rx.recv().expect("the fake publisher binds");
        FakePublisher {
            tx,
            subscribed,
            stop,
            flush,
            thread: Some(thread),
        }
    }

    /// Sends everything published so far, then closes the socket as soon as it all left
    /// (the connection ends right behind the last message).
    pub fn close_flushed(self) {
        self.flush.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn publish(&self, frames: Vec<Vec<u8>>) {
        self.tx.send(frames).expect("the fake publisher runs");
    }

    /// A data message `[topic, meta(DATA, FAKE_EPOCH, seq), payload]`.
    pub fn data(&self, topic: &[u8], seq: u64, payload: Vec<u8>) {
        let meta = chanlayer_zmq::wire::meta(chanlayer_zmq::wire::META_DATA, FAKE_EPOCH, seq);
        self.publish(vec![topic.to_vec(), meta.to_vec(), payload]);
    }

    pub fn is_subscribed(&self, topic: &[u8]) -> bool {
        self.subscribed.lock().expect("lock").contains(topic)
    }
}

impl Drop for FakePublisher {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
