//! `chanlayer zmq-proxy`, the binary, with layer instances in other processes: two peer
//! processes that receive (group and process-local messages) and send (their replies)
//! through a proxy process; the proxy killed and restarted; signals and counters; bad
//! arguments.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use chanlayer_core::{ChannelLayer, Codec, LayerConfig, Message};
use chanlayer_testkit::peer::Peer;
use chanlayer_zmq::ZmqLayer;

const DEADLINE: Duration = Duration::from_secs(30);

/// Not a test: the peer process the other tests start (this binary, run again).
#[test]
#[ignore = "the peer process of the other tests (they start it)"]
fn peer_process() {
    chanlayer_testkit::peer::run_from_env(|url| async move {
        ZmqLayer::connect(&LayerConfig::from_url(&url)?).await
    });
}

/// A free TCP port on 127.0.0.1, picked at random below Linux's ephemeral range (32768 and
/// up), where no outgoing connection or `:*` bind can take it before the proxy binds it.
fn free_port() -> u16 {
    for _ in 0..1000 {
        let port = 20_000 + (rand_u64() % 12_000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port between 20000 and 32000");
}

/// The proxy binary, running; killed when dropped.
struct ProxyProcess {
    child: Option<Child>,
    pid: u32,
    lines: mpsc::Receiver<String>,
    exited: Option<mpsc::Receiver<ExitStatus>>,
    status: Option<ExitStatus>,
}

impl ProxyProcess {
    fn spawn(args: &[&str]) -> ProxyProcess {
        let mut child = Command::new(env!("CARGO_BIN_EXE_chanlayer"))
            .arg("zmq-proxy")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the chanlayer binary");
        let out = child.stdout.take().expect("piped stdout");
        let err = child.stderr.take().expect("piped stderr");
        let (tx, lines) = mpsc::channel();
        for stream in [
            Box::new(out) as Box<dyn std::io::Read + Send>,
            Box::new(err) as Box<dyn std::io::Read + Send>,
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        ProxyProcess {
            pid: child.id(),
            child: Some(child),
            lines,
            exited: None,
            status: None,
        }
    }

    fn start(pull: u16, publish: u16, extra: &[&str]) -> ProxyProcess {
        let pull = format!("tcp://127.0.0.1:{pull}");
        let publish = format!("tcp://127.0.0.1:{publish}");
        let mut args = vec!["--pull", &pull, "--pub", &publish];
        args.extend_from_slice(extra);
        let p = ProxyProcess::spawn(&args);
        let line = p.line_with("listening");
        assert!(line.contains(&pull) && line.contains(&publish), "{line}");
        p
    }

    /// The next output line containing `what`, within [`DEADLINE`].
    fn line_with(&self, what: &str) -> String {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(what) => return line,
                Ok(_) => continue,
                Err(_) => panic!("the proxy printed no line with {what:?} within {DEADLINE:?}"),
            }
        }
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args(["-s", name, &self.pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -s {name}");
    }

    /// SIGKILL: a crash.
    fn kill9(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
        }
    }

    /// Waits for the process to exit, within [`DEADLINE`].
    fn wait(&mut self) -> ExitStatus {
        if let Some(s) = self.status {
            return s;
        }
        if let Some(mut child) = self.child.take() {
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                if let Ok(s) = child.wait() {
                    let _ = tx.send(s);
                }
            });
            self.exited = Some(rx);
        }
        let status = self
            .exited
            .as_ref()
            .expect("the waiting thread was started above")
            .recv_timeout(DEADLINE)
            .expect("the proxy exits within the deadline");
        self.status = Some(status);
        status
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        } else if self.status.is_none() {
            // Its waiting thread owns the Child: end it by its id.
            let _ = Command::new("kill")
                .args(["-s", "KILL", &self.pid.to_string()])
                .status();
        }
    }
}

fn url(pull: u16, publish: u16, prefix: &str) -> String {
    format!("zmq://?pull=tcp://127.0.0.1:{pull}&pub=tcp://127.0.0.1:{publish}&prefix={prefix}&reconnect_interval=20ms")
}

fn ns() -> String {
    format!("c{:016x}", rand_u64())
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

async fn connect(url: &str) -> ZmqLayer {
    ZmqLayer::connect(&LayerConfig::from_url(url).expect("url"))
        .await
        .expect("connect")
}

fn ping(i: u64, reply_to: &str) -> Message {
    Message::encode_as("ping", &i, Codec::Bincode)
        .expect("encode")
        .with_header("reply_to", reply_to.to_owned())
}

async fn ready(peer: &mut Peer) -> String {
    let line = peer.line().await;
    line.strip_prefix("READY ")
        .unwrap_or_else(|| panic!("expected READY, got {line:?}"))
        .to_owned()
}

async fn pong(layer: &ZmqLayer, me: &str, within: Duration) -> Option<u64> {
    match tokio::time::timeout(within, layer.receive(me)).await {
        Ok(Ok(m)) => {
            assert_eq!(m.message_type(), "pong");
            Some(m.decode::<u64>().expect("decode"))
        }
        Ok(Err(e)) => panic!("receive: {e}"),
        Err(_) => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_peer_processes_send_and_receive_through_the_proxy_process() {
    let (p1, p2) = (free_port(), free_port());
    let mut proxy = ProxyProcess::start(p1, p2, &[]);
    let prefix = ns();
    let url = url(p1, p2, &prefix);
    let group = format!("{prefix}.room");
    let mut a = Peer::spawn("serve", &url, &[&group]);
    let mut b = Peer::spawn("serve", &url, &[&group]);
    let ch_a = ready(&mut a).await;
    let ch_b = ready(&mut b).await;
    assert_ne!(ch_a, ch_b);

    let layer = connect(&url).await;
    let me = layer.new_channel("main").await.expect("new_channel");
    // Group: both receiving processes get each ping, both sending processes answer it.
    let n = 50u64;
    for i in 0..n {
        layer
            .group_send(&group, ping(i, &me))
            .await
            .expect("group_send");
    }
    let mut answers: BTreeMap<u64, usize> = BTreeMap::new();
    for _ in 0..2 * n {
        let i = pong(&layer, &me, DEADLINE)
            .await
            .expect("a pong within the deadline");
        *answers.entry(i).or_default() += 1;
    }
    assert_eq!(answers.len() as u64, n, "every ping answered");
    assert!(
        answers.values().all(|c| *c == 2),
        "by both peers: {answers:?}"
    );
    // Process-local channels across processes: each peer answers its own pings.
    for (k, ch) in [(1000u64, &ch_a), (2000, &ch_b)] {
        for i in 0..20 {
            layer.send(ch, ping(k + i, &me)).await.expect("send");
        }
        for i in 0..20 {
            assert_eq!(pong(&layer, &me, DEADLINE).await, Some(k + i), "in order");
        }
    }
    for ch in [&ch_a, &ch_b] {
        layer
            .send(ch, Message::new("stop", Codec::Json, b"null".to_vec()))
            .await
            .expect("stop");
    }
    assert!(a.wait_success().await, "peer a exits cleanly");
    assert!(b.wait_success().await, "peer b exits cleanly");
    layer.close().await.expect("close");

    // A clean stop on SIGTERM, with the counters.
    proxy.signal("TERM");
    let last = proxy.line_with("stopped:");
    assert!(proxy.wait().success(), "the proxy exits 0 on SIGTERM");
    let forwarded: u64 = last
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("forwarded="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no forwarded= in {last:?}"));
    // n pings, 2n group pongs... every message the test made passed the proxy.
    assert!(forwarded >= n + 2 * n + 40 + 40, "{last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_killed_and_restarted_and_messages_flow_again() {
    let (p1, p2) = (free_port(), free_port());
    let mut proxy = ProxyProcess::start(p1, p2, &[]);
    let prefix = ns();
    let url = url(p1, p2, &prefix);
    let group = format!("{prefix}.room");
    let mut peer = Peer::spawn("serve", &url, &[&group]);
    let ch = ready(&mut peer).await;
    let layer = connect(&url).await;
    let me = layer.new_channel("main").await.expect("new_channel");
    layer.send(&ch, ping(1, &me)).await.expect("send");
    assert_eq!(pong(&layer, &me, DEADLINE).await, Some(1));

    // Crash the proxy (SIGKILL) and start a new one on the same ports.
    proxy.kill9();
    proxy.wait();
    drop(proxy);
    let proxy = ProxyProcess::start(p1, p2, &[]);

    // Both sides reconnect by themselves: ping until an answer comes back.
    let deadline = Instant::now() + DEADLINE;
    let mut k = 100u64;
    loop {
        layer
            .group_send(&group, ping(k, &me))
            .await
            .expect("group_send");
        if let Some(got) = pong(&layer, &me, Duration::from_millis(200)).await {
            assert!(
                got >= 100,
                "an answer to a ping sent after the restart: {got}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "no answer through the new proxy");
        k += 1;
    }
    // Drain answers to earlier attempts, then every later message flows.
    while pong(&layer, &me, Duration::from_millis(300))
        .await
        .is_some()
    {}
    for i in 0..30u64 {
        layer.send(&ch, ping(10_000 + i, &me)).await.expect("send");
        assert_eq!(pong(&layer, &me, DEADLINE).await, Some(10_000 + i));
        layer
            .group_send(&group, ping(20_000 + i, &me))
            .await
            .expect("group_send");
        assert_eq!(pong(&layer, &me, DEADLINE).await, Some(20_000 + i));
    }
    layer
        .send(&ch, Message::new("stop", Codec::Json, b"null".to_vec()))
        .await
        .expect("stop");
    assert!(peer.wait_success().await);
    layer.close().await.expect("close");
    drop(proxy);
}

#[test]
fn counters_on_sigusr1_periodically_and_at_a_clean_sigint_stop() {
    let (p1, p2) = (free_port(), free_port());
    let mut proxy = ProxyProcess::start(p1, p2, &["--stats-interval", "100ms"]);
    let periodic = proxy.line_with("forwarded=");
    assert!(periodic.contains("dropped="), "{periodic}");
    proxy.signal("USR1");
    let on_signal = proxy.line_with("forwarded=");
    assert!(on_signal.contains("undecodable="), "{on_signal}");
    proxy.signal("INT");
    let stopped = proxy.line_with("stopped:");
    assert!(stopped.contains("forwarded=0"), "{stopped}");
    assert!(proxy.wait().success(), "exit 0 on SIGINT");
}

#[test]
fn a_bad_endpoint_and_an_address_in_use_fail_clearly() {
    let mut bad = ProxyProcess::spawn(&["--pull", "udp://127.0.0.1:1"]);
    let line = bad.line_with("udp://127.0.0.1:1");
    assert!(line.contains("--pull"), "{line}");
    assert!(!bad.wait().success());

    let (p1, p2) = (free_port(), free_port());
    let _first = ProxyProcess::start(p1, p2, &[]);
    let mut second = ProxyProcess::spawn(&[
        "--pull",
        &format!("tcp://127.0.0.1:{p1}"),
        "--pub",
        &format!("tcp://127.0.0.1:{p2}"),
    ]);
    let line = second.line_with("already in use");
    assert!(line.contains(&p1.to_string()), "{line}");
    assert!(!second.wait().success());
}
