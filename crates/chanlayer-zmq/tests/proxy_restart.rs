//! Dedicated mode, the proxy in its own OS process, killed with SIGKILL in the middle of an
//! unpaced stream and started again on the same ports: every message a `send` accepted
//! either arrives or is counted in `TransportStats::lost`, exactly, across the restart (the
//! senders' own numbering, carried end to end, shows the gap the new proxy's fresh sequence
//! would hide). The proxy process is this test binary again, running [`proxy_process`].

mod common;

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use chanlayer_core::{ChannelLayer, Codec, Error, Message};
use chanlayer_testkit::eventually;
use chanlayer_zmq::{Proxy, ProxyConfig, ZmqLayer};
use common::{connect, free_port, ns, DEADLINE, FAST};

const PROXY_ENV: &str = "CHANLAYER_ZMQ_TEST_PROXY";
const PROXY_TEST: &str = "proxy_process";

fn msg(i: u64) -> Message {
    Message::encode_as("test.seq", &i, Codec::Bincode).expect("encode")
}

/// Not a test: the proxy process of the other tests. Binds the PULL and PUB endpoints in
/// [`PROXY_ENV`] (`PULL\nPUB`), prints `READY` (or `ERROR ...`), and runs until its input
/// closes or it is killed.
#[test]
#[ignore = "the proxy process of the other tests (they start it)"]
fn proxy_process() {
    let Ok(spec) = std::env::var(PROXY_ENV) else {
        return;
    };
    let Some((pull, publish)) = spec.split_once('\n') else {
        panic!("{PROXY_ENV} is PULL\\nPUB, got {spec:?}");
    };
    match Proxy::spawn(ProxyConfig::new(pull, publish)) {
        Ok(proxy) => {
            println!("READY");
            for line in std::io::stdin().lines() {
                if line.is_err() {
                    break;
                }
            }
            proxy.stop();
        }
        Err(e) => println!("ERROR {e}"),
    }
    std::process::exit(0);
}

/// The proxy, running in a process of its own.
struct ProxyProcess {
    child: Child,
    _stdin: ChildStdin,
}

impl ProxyProcess {
    /// Starts the proxy on `pull` and `publish`, retrying while the ports are still held
    /// (a killed proxy's sockets close with its process), within [`DEADLINE`].
    fn start(pull: &str, publish: &str) -> ProxyProcess {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let exe = std::env::current_exe().expect("the test binary knows its path");
            let mut child = Command::new(exe)
                .args([PROXY_TEST, "--exact", "--ignored", "--nocapture", "--quiet"])
                .env(PROXY_ENV, format!("{pull}\n{publish}"))
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("the test binary starts again as the proxy");
            let stdin = child.stdin.take().expect("piped stdin");
            let out = child.stdout.take().expect("piped stdout");
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    if (line == "READY" || line.starts_with("ERROR")) && tx.send(line).is_err() {
                        break;
                    }
                }
            });
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line == "READY" => {
                    return ProxyProcess {
                        child,
                        _stdin: stdin,
                    }
                }
                Ok(line) if line.contains("already in use") && Instant::now() < deadline => {
                    let _ = child.wait();
                }
                other => panic!("the proxy process did not start: {other:?}"),
            }
        }
    }

    /// SIGKILL: the proxy dies with whatever it held, like a crash.
    fn kill9(mut self) {
        self.child.kill().expect("SIGKILL the proxy");
        let _ = self.child.wait();
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a receiving task has seen of one stream.
#[derive(Default)]
struct Seen {
    received: AtomicU64,
    distinct: Mutex<HashSet<u64>>,
}

impl Seen {
    fn count(&self) -> u64 {
        self.received.load(Ordering::SeqCst)
    }

    fn has(&self, seq: u64) -> bool {
        self.distinct
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&seq)
    }
}

fn receive_into(layer: Arc<ZmqLayer>, channel: String, seen: Arc<Seen>) {
    tokio::spawn(async move {
        while let Ok(m) = layer.receive(&channel).await {
            let seq = m.decode::<u64>().expect("decode");
            let fresh = seen
                .distinct
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(seq);
            assert!(fresh, "{seq} arrived twice on {channel}");
            seen.received.fetch_add(1, Ordering::SeqCst);
        }
    });
}

/// Sends `seq` (to a process-local channel, or to a group) until one arrives, each send
/// counted; returns how many were accepted. The first messages after a restart may meet a
/// proxy the receiver has not subscribed to yet: those are lost, and counted when a later
/// one arrives.
async fn send_until_one_arrives(
    sender: &ZmqLayer,
    to: Target<'_>,
    from: u64,
    seen: &Seen,
) -> (u64, u64) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut sent = 0;
    let mut next = from;
    loop {
        let ok = match to {
            Target::Channel(ch) => sender.send(ch, msg(next)).await,
            Target::Group(g) => sender.group_send(g, msg(next)).await,
        };
        match ok {
            Ok(()) => sent += 1,
            Err(Error::ChannelFull { .. }) => {}
            Err(e) => panic!("send: {e}"),
        }
        let until = tokio::time::Instant::now() + Duration::from_millis(200);
        while tokio::time::Instant::now() < until && !seen.has(next) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if seen.has(next) {
            return (sent, next);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "nothing sent to {to:?} arrived after the restart"
        );
        next += 1;
    }
}

#[derive(Debug, Clone, Copy)]
enum Target<'a> {
    Channel(&'a str),
    Group(&'a str),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_killed_mid_stream_loses_only_what_is_counted() {
    let pull = format!("tcp://127.0.0.1:{}", free_port());
    let publish = format!("tcp://127.0.0.1:{}", free_port());
    let proxy = ProxyProcess::start(&pull, &publish);
    let url = format!("zmq://?pull={pull}&pub={publish}&{FAST}");
    let prefix = ns();
    // Room for the whole stream in the receiving channels: nothing is dropped for capacity.
    let receiver = Arc::new(
        connect(&format!("{url}&capacity=100000"), &prefix)
            .await
            .expect("receiver"),
    );
    let sender = connect(&url, &prefix).await.expect("sender");
    let inbox = receiver.new_channel("r").await.expect("new_channel");
    let member = receiver.new_channel("m").await.expect("new_channel");
    let group = format!("{prefix}.room");
    receiver
        .group_add(&group, &member)
        .await
        .expect("group_add");
    let (to_inbox, to_group) = (Arc::new(Seen::default()), Arc::new(Seen::default()));
    receive_into(receiver.clone(), inbox.clone(), to_inbox.clone());
    receive_into(receiver.clone(), member.clone(), to_group.clone());

    // An unpaced stream of 20,000 sends, alternately to the process-local channel and to
    // the group; the proxy is killed after the first 5,000 and started again at once, on
    // another thread, while the stream goes on.
    let n = 20_000u64;
    let (mut ok_inbox, mut ok_group, mut full) = (0u64, 0u64, 0u64);
    let mut restart = None;
    let mut proxy = Some(proxy);
    for i in 0..n {
        if i == 5_000 {
            if let Some(p) = proxy.take() {
                p.kill9();
            }
            let (pull, publish) = (pull.clone(), publish.clone());
            restart = Some(std::thread::spawn(move || {
                ProxyProcess::start(&pull, &publish)
            }));
        }
        let r = if i % 2 == 0 {
            sender.send(&inbox, msg(i)).await.map(|()| ok_inbox += 1)
        } else {
            sender
                .group_send(&group, msg(i))
                .await
                .map(|()| ok_group += 1)
        };
        match r {
            Ok(()) => {}
            Err(Error::ChannelFull { .. }) => full += 1,
            Err(e) => panic!("send {i}: {e}"),
        }
    }
    let _proxy = tokio::task::spawn_blocking(move || restart.map(|t| t.join()))
        .await
        .expect("join")
        .expect("the restart ran")
        .expect("the proxy restarted");
    eventually("the receiver is connected to the new proxy", || {
        receiver.transport_stats().connected
    })
    .await;
    // The stream's end: one more message each way that arrives (and the ones before it
    // that met a proxy the receiver was not subscribed to yet).
    let (more, last_inbox) =
        send_until_one_arrives(&sender, Target::Channel(&inbox), n, &to_inbox).await;
    ok_inbox += more;
    let (more, last_group) =
        send_until_one_arrives(&sender, Target::Group(&group), last_inbox + 1, &to_group).await;
    ok_group += more;
    // group_send never refuses for room: it drops (counted) what it could not queue.
    let undeliverable = sender.stats().undeliverable;
    let sent = ok_inbox + ok_group - undeliverable;
    // Settled: the last message of each stream arrived (so everything before it arrived or
    // was counted when a later one came), and arrivals and losses add up to the sends.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    loop {
        let (received, lost) = (
            to_inbox.count() + to_group.count(),
            receiver.transport_stats().lost,
        );
        if to_inbox.has(last_inbox) && to_group.has(last_group) && received + lost >= sent {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not settled within {DEADLINE:?}: sent {sent}, received {received}, lost {lost}"
        );
        tick.tick().await;
    }
    let t = receiver.transport_stats();
    let s = receiver.stats();
    let received = to_inbox.count() + to_group.count();
    eprintln!(
        "sent {sent} (inbox {ok_inbox}, group {ok_group}, undeliverable {undeliverable}, refused as full {full}), received {received}, lost {}, {t:?}, {s:?}",
        t.lost
    );
    assert_eq!(s.dropped_full + s.group_member_full, 0, "{s:?}");
    assert_eq!(
        sent - received,
        t.lost,
        "every accepted message arrived or is counted as lost, exactly"
    );
    assert_eq!(
        s.lost, t.lost,
        "the layer's stats (what `chanlayer stats` shows) count the same losses"
    );
}
