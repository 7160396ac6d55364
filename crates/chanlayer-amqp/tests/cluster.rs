//! RabbitMQ high availability: a 3-node cluster on loopback (`scripts/cluster/rabbitmq.sh
//! start`, which the tests run themselves), layers given all three hosts and
//! `queue_type=quorum`, a stream of confirmed sends to a quorum normal channel with two
//! receivers running (one with `receive_delivery` + `ack`, one with `receive`), and, in the
//! middle of the stream, one node taken away:
//!
//! - `stopping_the_connected_node...`: `rabbitmqctl stop_app` (as in a rolling restart) on
//!   the node the sender and one receiver are connected to, while the queue's leader is
//!   elsewhere: they reconnect to the next host;
//! - `killing_the_queue_leader...`: `kill -9` of the node that leads the quorum queue (a
//!   crash), while every layer is connected elsewhere: the queue elects a new leader.
//!
//! Every send that returned `Ok` must be received (lost = 0); duplicates are allowed
//! (at-least-once) and counted. Each test prints one line of figures (sent Ok, received,
//! lost, duplicates, seconds to resume) and starts the node again
//! (`scripts/cluster/rabbitmq.sh start`), so the cluster is whole for the next run. The two
//! tests take turns (a lock): they share the cluster.
//!
//! `cargo test -p chanlayer-amqp --test cluster -- --nocapture` shows the figures.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chanlayer_amqp::AmqpLayer;
use chanlayer_core::{ChannelLayer, Codec, Error, LayerConfig, LayerOptions, Message};
use tokio::sync::mpsc;

/// The cluster's nodes: name and AMQP port (scripts/cluster/rabbitmq.sh).
const NODES: [(&str, u16); 3] = [
    ("chanlayer-a@localhost", 5681),
    ("chanlayer-b@localhost", 5682),
    ("chanlayer-c@localhost", 5683),
];

/// Confirmed sends before the node is stopped, and after it is stopped (and, for the node
/// the sender is on, after the sender reconnected).
const BEFORE: u64 = 500;
const AFTER: u64 = 500;
/// The longest either phase of a test may take.
const DEADLINE: Duration = Duration::from_secs(180);

static TURNS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn cluster_script(arg: &str) {
    let script: PathBuf = [
        env!("CARGO_MANIFEST_DIR"),
        "..",
        "..",
        "scripts",
        "cluster",
        "rabbitmq.sh",
    ]
    .iter()
    .collect();
    let out = Command::new("bash")
        .arg(&script)
        .arg(arg)
        .output()
        .unwrap_or_else(|e| panic!("could not run {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "{} {arg} failed (the cluster test needs the 3-node RabbitMQ cluster it starts):\n{}{}",
        script.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn rabbitmqctl(tool: &str, node: &str, args: &[&str]) -> String {
    let out = Command::new(tool)
        .args(["-q", "-n", node])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("could not run {tool}: {e}"));
    assert!(
        out.status.success(),
        "{tool} -n {node} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The URL of the cluster with its hosts in the order `order` (indexes into `NODES`).
fn url(order: [usize; 3]) -> String {
    let hosts: Vec<String> = order
        .iter()
        .map(|&i| format!("127.0.0.1:{}", NODES[i].1))
        .collect();
    format!(
        "amqp://guest:guest@{}/%2f?queue_type=quorum&queue_expires=600s&reconnect_timeout=60s&connection_timeout=5s&heartbeat=5",
        hosts.join(",")
    )
}

async fn connect(prefix: &str, order: [usize; 3]) -> Arc<AmqpLayer> {
    let mut config = LayerConfig::from_url(&url(order)).expect("parse");
    config.options = LayerOptions {
        prefix: prefix.to_owned(),
        capacity: 1_000_000,
        // Longer than any outage, so nothing expires on the way.
        expiry: Duration::from_secs(600),
        ..LayerOptions::default()
    };
    Arc::new(
        AmqpLayer::connect(&config)
            .await
            .expect("connect to the cluster"),
    )
}

/// The node a layer is connected to now.
fn node_of(layer: &AmqpLayer) -> &'static str {
    let address = layer.connected_broker().expect("connected");
    NODES
        .iter()
        .find(|(_, port)| address.contains(&format!(":{port}/")))
        .map(|(name, _)| *name)
        .unwrap_or_else(|| panic!("{address} is not a node of the cluster"))
}

/// The node that leads quorum queue `queue`, as a running node of the cluster says.
fn leader(queue: &str, except: Option<&str>) -> String {
    for (node, _) in NODES.iter().filter(|(n, _)| Some(*n) != except) {
        let Ok(out) = Command::new("rabbitmqctl")
            .args(["-q", "-n", node, "list_queues", "name", "leader"])
            .args(["--formatter", "json"])
            .output()
        else {
            continue;
        };
        if !out.status.success() {
            continue;
        }
        let rows: Vec<serde_json::Value> =
            serde_json::from_slice(&out.stdout).expect("list_queues --formatter json");
        for row in rows {
            if row["name"] == queue {
                return row["leader"].as_str().expect("a leader").to_owned();
            }
        }
    }
    panic!("no node of the cluster knows quorum queue {queue}")
}

fn seq(i: u64) -> Message {
    Message::encode_as("test.seq", &i, Codec::Bincode).expect("encode")
}

/// Makes the cluster whole again when dropped (also when the test panics): starts the node
/// it stopped or killed, so the next run finds three nodes.
struct Restart(bool);

impl Drop for Restart {
    fn drop(&mut self) {
        if std::mem::take(&mut self.0) {
            cluster_script("start");
        }
    }
}

/// Takes `node` away: `stop_app` (RabbitMQ stops, closing its connections; the Erlang node
/// stays) or, for a crash, `kill -9` of its Erlang VM.
fn take_down(node: &str, victim: Victim) {
    match victim {
        Victim::ConnectedNode => {
            rabbitmqctl("rabbitmqctl", node, &["stop_app"]);
        }
        Victim::QueueLeader => {
            let pid = rabbitmqctl("rabbitmqctl", node, &["eval", "os:getpid()."]);
            let pid = pid.trim().trim_matches('"');
            let out = Command::new("kill")
                .args(["-9", pid])
                .output()
                .expect("kill runs");
            assert!(out.status.success(), "kill -9 {pid} ({node}) failed");
        }
    }
}

/// A receiver loop: `ack` says whether it settles with `receive_delivery` + `ack` (else
/// `receive`, which acks as it returns). Sends each sequence number it gets, with the time.
fn receiver(
    layer: Arc<AmqpLayer>,
    channel: String,
    ack: bool,
    tx: mpsc::UnboundedSender<(u64, Instant)>,
    errors: Arc<std::sync::atomic::AtomicU64>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let got = if ack {
                match layer.receive_delivery(&channel).await {
                    Ok(d) => {
                        let s = d.decode::<u64>().expect("decode");
                        if d.ack().await.is_err() {
                            // The connection went before the ack: it comes again.
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(s)
                    }
                    Err(e) => Err(e),
                }
            } else {
                layer
                    .receive(&channel)
                    .await
                    .map(|m| m.decode::<u64>().expect("decode"))
            };
            match got {
                Ok(s) => {
                    if tx.send((s, Instant::now())).is_err() {
                        return;
                    }
                }
                Err(Error::Closed) => return,
                Err(e) => {
                    eprintln!("receive failed (carrying on): {e}");
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    })
}

/// The longest time between two consecutive instants at or after `from`.
fn longest_gap(mut times: Vec<Instant>, from: Instant) -> Duration {
    times.retain(|t| *t >= from);
    times.sort();
    let mut gap = Duration::ZERO;
    let mut last = from;
    for t in times {
        gap = gap.max(t - last);
        last = t;
    }
    gap
}

/// Which node to take away: the sender's (stop_app), or the queue's leader (kill -9).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Victim {
    ConnectedNode,
    QueueLeader,
}

/// One run: the queue is created from node c (index 2), so c leads it; the sender and
/// receiver 1 are on a, receiver 2 on b. Stops a (ConnectedNode) or kills the leader (c) after
/// BEFORE confirmed sends, keeps sending until AFTER more are confirmed (after the sender
/// reconnected, when it was on the stopped node), then checks that every confirmed message
/// arrived.
async fn run(victim: Victim) {
    let _turn = TURNS.lock().await;
    let started = Instant::now();
    tokio::task::spawn_blocking(|| cluster_script("start"))
        .await
        .expect("cluster start");
    let prefix = format!(
        "ha{}x{}",
        std::process::id(),
        if victim == Victim::ConnectedNode {
            1
        } else {
            2
        }
    );
    let channel = format!("{prefix}.stream");

    // Message 0 creates the queue from node c: its leader is c (client-local placement).
    let creator = connect(&prefix, [2, 0, 1]).await;
    assert_eq!(node_of(&creator), NODES[2].0);
    creator.send(&channel, seq(0)).await.expect("send 0");
    creator.close().await.expect("close");
    let queue = creator.channel_queue(&channel);
    let first_leader = leader(&queue, None);

    let sender = connect(&prefix, [0, 1, 2]).await;
    let r1 = connect(&prefix, [0, 1, 2]).await;
    let r2 = connect(&prefix, [1, 2, 0]).await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let readers = [
        receiver(
            r1.clone(),
            channel.clone(),
            true,
            tx.clone(),
            errors.clone(),
        ),
        receiver(r2.clone(), channel.clone(), false, tx, errors.clone()),
    ];
    let sender_node = node_of(&sender);
    let stopped: &'static str = match victim {
        Victim::ConnectedNode => sender_node,
        Victim::QueueLeader => NODES
            .iter()
            .map(|(n, _)| *n)
            .find(|n| *n == first_leader)
            .expect("the leader is a node of the cluster"),
    };

    // The stream.
    let mut ok = BTreeSet::from([0u64]);
    let mut ok_times = Vec::new();
    let mut send_errors = 0u64;
    let mut after = 0u64;
    let mut stop_issued = None;
    let mut restart = Restart(false);
    let is_down = Arc::new(AtomicBool::new(false));
    let mut stop_task = None;
    let reconnects_before = sender.reconnects();
    let mut i = 1u64;
    while after < AFTER {
        assert!(
            started.elapsed() < DEADLINE,
            "{victim:?}: the stream did not finish within {DEADLINE:?}: {} sent Ok, {after} after the stop, {send_errors} send errors",
            ok.len()
        );
        if i == BEFORE + 1 {
            stop_issued = Some(Instant::now());
            restart.0 = true;
            let is_down = is_down.clone();
            stop_task = Some(tokio::task::spawn_blocking(move || {
                take_down(stopped, victim);
                is_down.store(true, Ordering::SeqCst);
            }));
        }
        match sender.send(&channel, seq(i)).await {
            Ok(()) => {
                ok.insert(i);
                ok_times.push(Instant::now());
                let counted = is_down.load(Ordering::SeqCst)
                    && (victim == Victim::QueueLeader || sender.reconnects() > reconnects_before);
                if counted {
                    after += 1;
                }
            }
            Err(e) => {
                send_errors += 1;
                eprintln!("{victim:?}: send {i} failed (not counted as sent): {e}");
            }
        }
        i += 1;
    }
    stop_task
        .expect("the stop ran")
        .await
        .expect("stop_app thread");
    let stop_issued = stop_issued.expect("stopped");
    let sender_after = node_of(&sender);
    let new_leader = leader(&queue, Some(stopped));

    // Everything confirmed must arrive.
    let mut got: BTreeMap<u64, u32> = BTreeMap::new();
    let mut got_times = Vec::new();
    let drain_deadline = Instant::now() + Duration::from_secs(60);
    while !ok.iter().all(|s| got.contains_key(s)) {
        let left = drain_deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Some((s, at))) => {
                *got.entry(s).or_default() += 1;
                got_times.push(at);
            }
            _ => break,
        }
    }
    let received: u64 = got.values().map(|&n| u64::from(n)).sum();
    let lost: Vec<u64> = ok
        .iter()
        .filter(|s| !got.contains_key(s))
        .copied()
        .collect();
    let duplicates = received - got.len() as u64;
    let unconfirmed_received = got.keys().filter(|s| !ok.contains(s)).count();
    let resume = longest_gap(ok_times, stop_issued);
    let receive_stall = longest_gap(got_times, stop_issued);

    for l in [&sender, &r1, &r2] {
        l.close().await.expect("close");
    }
    for r in readers {
        r.await.expect("a receiver ends on close");
    }
    // The cluster whole again for the next run.
    let restarting = Instant::now();
    tokio::task::spawn_blocking(|| cluster_script("start"))
        .await
        .expect("restart thread");
    restart.0 = false;
    let restarted_in = restarting.elapsed();

    // On a line of its own: the test harness may have started one ("test ... ").
    println!(
        "\ncluster {victim:?}: took down {stopped} with {} (sender on {sender_node}, then {sender_after}; queue leader {first_leader}, then {new_leader}); sent Ok {}, send errors {send_errors}, received {received} ({} distinct), lost {}, duplicates {duplicates}, received unconfirmed {unconfirmed_received}, ack/receive errors {}, seconds to resume: sends {:.2}, receives {:.2}; node back in {:.1}s; test took {:.1}s",
        match victim {
            Victim::ConnectedNode => "stop_app",
            Victim::QueueLeader => "kill -9",
        },
        ok.len(),
        got.len(),
        lost.len(),
        errors.load(Ordering::Relaxed),
        resume.as_secs_f64(),
        receive_stall.as_secs_f64(),
        restarted_in.as_secs_f64(),
        started.elapsed().as_secs_f64(),
    );
    assert!(
        lost.is_empty(),
        "{victim:?}: {} of {} confirmed messages never arrived, e.g. {:?}",
        lost.len(),
        ok.len(),
        &lost[..lost.len().min(10)]
    );
    match victim {
        Victim::ConnectedNode => {
            assert_ne!(first_leader, stopped, "the leader was elsewhere");
            assert_ne!(sender_after, stopped, "the sender moved to another node");
            assert!(
                sender.reconnects() > reconnects_before,
                "the sender reconnected"
            );
        }
        Victim::QueueLeader => {
            assert_ne!(sender_node, stopped, "the sender was elsewhere");
            assert_ne!(new_leader, stopped, "the queue elected another leader");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_the_connected_node_loses_no_confirmed_message() {
    run(Victim::ConnectedNode).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_queue_leader_loses_no_confirmed_message() {
    run(Victim::QueueLeader).await;
}
