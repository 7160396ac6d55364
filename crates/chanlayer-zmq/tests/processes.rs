//! Embedded mode across OS processes: a publisher in one process and a receiver in another
//! (both ways round), the first message after `group_add` returns, messages sent before the
//! receiver's connection was up (replayed), and a second process on the same address
//! (a clear error). The peer is this test binary, run again with [`PEER_ENV`] set.

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;

use chanlayer_core::{ChannelLayer, Codec, Message};
use chanlayer_testkit::eventually;
use common::{connect, free_port, ipc_endpoint, ns, recv, DEADLINE, FAST};

const PEER_ENV: &str = "CHANLAYER_ZMQ_TEST_PEER";
const PEER_TEST: &str = "zmq_peer_process";

fn msg(i: u64) -> Message {
    Message::encode_as("test.seq", &i, Codec::Bincode).expect("encode")
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Not a test: the peer process of the other tests (they start it).
///
/// ```text
/// publish URL PREFIX            binds (URL has bind=eager), prints READY, then runs stdin
///                               lines "SEND CHANNEL FROM N" / "GROUP GROUP FROM N" (N
///                               messages numbered FROM..), printing DONE after each;
///                               closes at end of input
/// publish-now URL PREFIX CHANNEL N
///                               binds and sends N messages to CHANNEL at once, prints
///                               SENT, closes at end of input
/// subscribe URL PREFIX GROUP N  receive only: a new channel in GROUP, prints READY CHANNEL,
///                               takes N messages on it, prints GOT n,n,... LOST lost
/// bind URL PREFIX               connects with the URL (bind=eager), prints READY or
///                               ERROR message, waits for end of input
/// ```
#[test]
#[ignore = "the peer process of the other tests (they start it)"]
fn zmq_peer_process() {
    let Ok(spec) = std::env::var(PEER_ENV) else {
        return;
    };
    let args: Vec<String> = spec.split('\n').map(str::to_owned).collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let stdin_lines = || {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<String>();
            std::thread::spawn(move || {
                for line in std::io::stdin().lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
            rx
        };
        match args
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .as_slice()
        {
            ["publish", url, prefix] => {
                let layer = connect(url, prefix).await.expect("connect");
                say("READY");
                let mut lines = stdin_lines();
                while let Some(line) = lines.recv().await {
                    let parts: Vec<&str> = line.split_whitespace().collect();
                    let [cmd, target, from, n] = parts.as_slice() else {
                        panic!("bad command {line:?}")
                    };
                    let (from, n): (u64, u64) =
                        (from.parse().expect("from"), n.parse().expect("n"));
                    for i in from..from + n {
                        match *cmd {
                            "SEND" => layer.send(target, msg(i)).await.expect("send"),
                            "GROUP" => layer.group_send(target, msg(i)).await.expect("group_send"),
                            _ => panic!("bad command {line:?}"),
                        }
                    }
                    say("DONE");
                }
                layer.close().await.expect("close");
            }
            ["publish-now", url, prefix, channel, n] => {
                let layer = connect(url, prefix).await.expect("connect");
                for i in 0..n.parse::<u64>().expect("n") {
                    layer.send(channel, msg(i)).await.expect("send");
                }
                say("SENT");
                let mut lines = stdin_lines();
                while lines.recv().await.is_some() {}
                layer.close().await.expect("close");
            }
            ["subscribe", url, prefix, group, n] => {
                let layer = connect(url, prefix).await.expect("connect");
                let me = layer.new_channel("peer").await.expect("new_channel");
                layer.group_add(group, &me).await.expect("group_add");
                say(&format!("READY {me}"));
                // What arrived within the deadline (the parent compares).
                let mut got = Vec::new();
                let until = tokio::time::Instant::now() + DEADLINE;
                while got.len() < n.parse::<usize>().expect("n") {
                    match tokio::time::timeout_at(until, layer.receive(&me)).await {
                        Ok(m) => got.push(
                            m.expect("receive")
                                .decode::<u64>()
                                .expect("decode")
                                .to_string(),
                        ),
                        Err(_) => break,
                    }
                }
                eprintln!(
                    "peer stats {:?} {:?}",
                    layer.stats(),
                    layer.transport_stats()
                );
                say(&format!(
                    "GOT {} LOST {}",
                    got.join(","),
                    layer.transport_stats().lost
                ));
                layer.close().await.expect("close");
            }
            ["bind", url, prefix] => match connect(url, prefix).await {
                Ok(layer) => {
                    say("READY");
                    let mut lines = stdin_lines();
                    while lines.recv().await.is_some() {}
                    layer.close().await.expect("close");
                }
                Err(e) => say(&format!("ERROR {e}")),
            },
            _ => panic!("unknown peer command {spec:?}"),
        }
    });
    std::process::exit(0);
}

/// A peer process: this test binary again.
struct Peer {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
}

impl Peer {
    fn spawn(args: &[&str]) -> Peer {
        let exe = std::env::current_exe().expect("the test binary knows its path");
        let mut child = Command::new(exe)
            .args([PEER_TEST, "--exact", "--ignored", "--nocapture", "--quiet"])
            .env(PEER_ENV, args.join("\n"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the test binary starts again as the peer");
        let out = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Peer {
            stdin: child.stdin.take(),
            child,
            lines,
        }
    }

    /// The peer's next line that starts with one of `words` (libtest's lines are skipped).
    async fn line(&self, words: &[&str]) -> String {
        let deadline = std::time::Instant::now() + DEADLINE + DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            // Blocking recv with a timeout, off the runtime's workers.
            let got = tokio::task::block_in_place(|| self.lines.recv_timeout(left));
            match got {
                Ok(l) if words.iter().any(|w| l.starts_with(w)) => return l,
                Ok(_) => continue,
                Err(_) => panic!("the peer printed no {words:?} line within {DEADLINE:?}"),
            }
        }
    }

    fn tell(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("the peer's input is open");
        writeln!(stdin, "{line}").expect("write to the peer");
        stdin.flush().expect("flush");
    }

    /// Closes the peer's input (it closes its layer and exits) and waits for it.
    fn finish(mut self) {
        drop(self.stdin.take());
        let status = tokio::task::block_in_place(|| self.child.wait()).expect("wait");
        assert!(status.success(), "the peer exits cleanly");
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        if self.stdin.is_some() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn got_set(line: &str) -> (BTreeSet<u64>, u64) {
    let rest = line.strip_prefix("GOT ").expect("a GOT line");
    let (nums, lost) = rest.split_once(" LOST ").expect("GOT ... LOST n");
    let set = nums
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().expect("a number"))
        .collect();
    (set, lost.parse().expect("lost"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_process_gets_local_and_group_messages_from_this_process() {
    let prefix = ns();
    let url = format!("zmq://127.0.0.1:{}?{FAST}", free_port());
    let layer = connect(&format!("{url}&bind=eager"), &prefix)
        .await
        .expect("bind");
    let group = format!("{prefix}.room");
    let n = 100u64;
    let peer = Peer::spawn(&[
        "subscribe",
        // Room for all of them: a burst beyond a channel's capacity is dropped (counted).
        &format!("{url}&bind=never&capacity=1000"),
        &prefix,
        &group,
        &(2 * n).to_string(),
    ]);
    let ready = peer.line(&["READY"]).await;
    let ch = ready
        .strip_prefix("READY ")
        .expect("READY channel")
        .to_owned();
    // The peer's group_add returned: its subscriptions are confirmed by our publisher.
    for i in 0..n {
        layer
            .send(&ch, msg(i))
            .await
            .expect("send to the other process");
        layer
            .group_send(&group, msg(1000 + i))
            .await
            .expect("group_send");
    }
    let (got, lost) = got_set(&peer.line(&["GOT"]).await);
    let want: BTreeSet<u64> = (0..n).chain(1000..1000 + n).collect();
    let missing: Vec<&u64> = want.difference(&got).collect();
    assert!(
        missing.is_empty(),
        "every message, once; missing {missing:?}"
    );
    assert_eq!(lost, 0);
    peer.finish();
    layer.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_process_reaches_this_process_and_nothing_after_group_add_is_lost() {
    let prefix = ns();
    let url = format!("zmq://127.0.0.1:{}?{FAST}", free_port());
    // This process only receives, and is connected before the publisher exists.
    let layer = connect(&format!("{url}&bind=never"), &prefix)
        .await
        .expect("connect");
    assert!(!layer.transport_stats().connected);
    let me = layer.new_channel("main").await.expect("new_channel");
    let mut peer = Peer::spawn(&["publish", &format!("{url}&bind=eager"), &prefix]);
    peer.line(&["READY"]).await;
    eventually("our subscriber connects to the new publisher", || {
        layer.transport_stats().connected
    })
    .await;
    for round in 0..20u64 {
        // Each group_add returns once the other process's publisher confirmed it; the
        // first message sent after that must arrive.
        let group = format!("{prefix}.g{round}");
        layer.group_add(&group, &me).await.expect("group_add");
        peer.tell(&format!("GROUP {group} {round} 1"));
        peer.line(&["DONE"]).await;
        assert_eq!(
            recv(&layer, &me).await.decode::<u64>().expect("decode"),
            round
        );
    }
    peer.tell(&format!("SEND {me} 100 50"));
    peer.line(&["DONE"]).await;
    for i in 100..150u64 {
        assert_eq!(
            recv(&layer, &me).await.decode::<u64>().expect("decode"),
            i,
            "in order"
        );
    }
    assert_eq!(layer.transport_stats().lost, 0);
    peer.finish();
    layer.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_sent_before_the_receivers_connection_was_up_are_replayed() {
    let prefix = ns();
    let url = format!("zmq://{}?{FAST}", ipc_endpoint(&ns()));
    // Our subscriber retries its connection only every 3 s (+ up to 3 s of jitter), so the
    // publisher started below is sure to send before it is connected.
    let layer = connect(&format!("{url}&bind=never&reconnect_interval=3s"), &prefix)
        .await
        .expect("connect");
    assert!(!layer.transport_stats().connected);
    let me = layer.new_channel("main").await.expect("new_channel");
    // The publisher binds and sends at once, before our subscriber has reconnected to it:
    // PUB/SUB alone would drop all of it; the publisher keeps inbox messages that had no
    // subscriber and replays them when our pending probe arrives.
    let n = 50u64;
    let peer = Peer::spawn(&[
        "publish-now",
        &format!("{url}&bind=eager"),
        &prefix,
        &me,
        &n.to_string(),
    ]);
    peer.line(&["SENT"]).await;
    for i in 0..n {
        assert_eq!(recv(&layer, &me).await.decode::<u64>().expect("decode"), i);
    }
    assert!(
        layer.transport_stats().replayed > 0,
        "{:?}",
        layer.transport_stats()
    );
    peer.finish();
    layer.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_on_the_same_address_gets_a_clear_error() {
    // Another process binds first; this one is refused, eagerly or at its first send.
    let prefix = ns();
    let url = format!("zmq://127.0.0.1:{}?{FAST}", free_port());
    let peer = Peer::spawn(&["bind", &format!("{url}&bind=eager"), &prefix]);
    peer.line(&["READY"]).await;
    let e = connect(&format!("{url}&bind=eager"), &prefix)
        .await
        .expect_err("the address is taken");
    assert!(
        e.to_string().contains("already bound by another process"),
        "{e}"
    );
    let lazy = connect(&url, &prefix)
        .await
        .expect("a lazy instance connects");
    let e = lazy
        .send("x", msg(1))
        .await
        .expect_err("its first send binds");
    assert!(
        e.to_string().contains("one process per address sends"),
        "{e}"
    );
    peer.finish();

    // This process binds first (ipc); the other one is refused.
    let url = format!("zmq://{}?{FAST}", ipc_endpoint(&ns()));
    let layer = connect(&format!("{url}&bind=eager"), &prefix)
        .await
        .expect("bind");
    let peer = Peer::spawn(&["bind", &format!("{url}&bind=eager"), &prefix]);
    let line = peer.line(&["READY", "ERROR"]).await;
    assert!(line.starts_with("ERROR"), "{line}");
    assert!(line.contains("already bound by another process"), "{line}");
    // And this process's publisher still works.
    let me = layer.new_channel("m").await.expect("new_channel");
    layer.send(&me, msg(7)).await.expect("send");
    assert_eq!(recv(&layer, &me).await.decode::<u64>().expect("decode"), 7);
    drop(peer);
    layer.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_that_closes_right_after_sending_still_delivers_what_it_sent() {
    let prefix = ns();
    let url = format!("zmq://127.0.0.1:{}?{FAST}", free_port());
    let layer = connect(&format!("{url}&bind=never&capacity=10000"), &prefix)
        .await
        .expect("connect");
    let me = layer.new_channel("main").await.expect("new_channel");
    let mut peer = Peer::spawn(&["publish", &format!("{url}&bind=eager"), &prefix]);
    peer.line(&["READY"]).await;
    eventually("our subscriber connects to the new publisher", || {
        layer.transport_stats().connected
    })
    .await;
    // The sends return once queued for the publisher thread; the peer closes its layer
    // straight after the last one, with most of them still queued.
    let n = 5000u64;
    peer.tell(&format!("SEND {me} 0 {n}"));
    peer.line(&["DONE"]).await;
    peer.finish();
    for i in 0..n {
        assert_eq!(
            recv(&layer, &me).await.decode::<u64>().expect("decode"),
            i,
            "in order, none lost at the publisher's close"
        );
    }
    layer.close().await.expect("close");
}
