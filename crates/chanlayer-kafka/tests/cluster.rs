//! A 3-broker Apache Kafka cluster (three KRaft voters on loopback, started with
//! `scripts/brokers/kafka.sh nodes`, the script a user runs): chanlayer's topics are created
//! with replication 3 and `min.insync.replicas=2`; sends stream to a normal channel, a group
//! and a process-local channel while receivers run; the leader of the partitions in use is
//! SIGKILLed mid-stream. Every send that returned `Ok` is received (0 lost); duplicates
//! (at-least-once allows them) and the longest pause of sends and of receives around the
//! kill are reported. The node is then started again and rejoins: it is back in the
//! in-sync replicas of every partition in use.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chanlayer_core::{ChannelLayer, Codec, LayerConfig, Message};
use chanlayer_kafka::KafkaLayer;
use common::nodes::KafkaNodes;
use rdkafka::consumer::{BaseConsumer, Consumer};

const PER_STREAM: u64 = 1200;
const KILL_AT: u64 = 400;

/// What the receivers and senders saw: seqs per stream, and when things happened.
#[derive(Default)]
struct Log {
    received: HashMap<&'static str, Vec<u64>>,
    receive_times: Vec<Instant>,
    send_ok_times: Vec<Instant>,
}

use chanlayer_core::toolkit::lock;

/// Leader and in-sync replicas of partition 0 of each of `topics`.
fn partitions(bootstrap: &str, topics: &[String]) -> Vec<(String, i32, Vec<i32>)> {
    let probe: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("a probe client");
    let md = probe
        .fetch_metadata(None, Duration::from_secs(10))
        .expect("metadata");
    topics
        .iter()
        .map(|t| {
            let tm = md
                .topics()
                .iter()
                .find(|m| m.name() == t)
                .unwrap_or_else(|| panic!("topic {t} in the metadata"));
            let p = &tm.partitions()[0];
            (t.clone(), p.leader(), p.isr().to_vec())
        })
        .collect()
}

/// The longest gap between consecutive instants.
fn longest_pause(times: &mut [Instant]) -> Duration {
    times.sort();
    times
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_mid_stream_in_a_three_broker_cluster_loses_nothing() {
    let nodes = Arc::new(
        tokio::task::spawn_blocking(|| KafkaNodes::start(3))
            .await
            .expect("start three nodes"),
    );
    let bootstrap = nodes.bootstrap();
    let prefix = format!("cl{:012x}", rand::random::<u64>() >> 16);
    let url = format!(
        "kafka://{bootstrap}?prefix={prefix}&replication=3&topic.min.insync.replicas=2&capacity=100000&delivery_timeout=120s&session_timeout=6s"
    );
    let config = LayerConfig::from_url(&url).expect("url");
    let sender = Arc::new(KafkaLayer::connect(&config).await.expect("sender connects"));
    let receiver = Arc::new(
        KafkaLayer::connect(&config)
            .await
            .expect("receiver connects"),
    );

    let normal = format!("{prefix}.jobs");
    let direct = receiver.new_channel("direct").await.expect("new_channel");
    let member = receiver.new_channel("member").await.expect("new_channel");
    let group = format!("{prefix}.room");
    receiver
        .group_add(&group, &member)
        .await
        .expect("group_add");
    // The normal channel's topic exists before the stream (the first send would create it).
    sender
        .send(
            &normal,
            Message::encode_as("warm", &u64::MAX, Codec::Bincode).expect("encode"),
        )
        .await
        .expect("first send");

    let log = Arc::new(Mutex::new(Log::default()));
    let mut readers = Vec::new();
    for (stream, channel) in [
        ("normal", normal.clone()),
        ("direct", direct.clone()),
        ("group", member.clone()),
    ] {
        let (receiver, log) = (receiver.clone(), log.clone());
        readers.push(tokio::spawn(async move {
            loop {
                match receiver.receive(&channel).await {
                    Ok(m) => {
                        let seq = m.decode::<u64>().expect("decode");
                        let mut l = lock(&log);
                        l.receive_times.push(Instant::now());
                        if seq != u64::MAX {
                            l.received.entry(stream).or_default().push(seq);
                        }
                    }
                    Err(chanlayer_core::Error::Closed) => return,
                    Err(e) => panic!("the {stream} receive loop failed: {e}"),
                }
            }
        }));
    }

    // The topics in use, with replication 3 and min.insync.replicas=2.
    let topics = vec![
        sender.channel_topic(&normal),
        sender.groups_topic().to_owned(),
        receiver.inbox_topic().to_owned(),
    ];
    for (t, _, isr) in partitions(&bootstrap, &topics) {
        assert_eq!(isr.len(), 3, "{t} has three in-sync replicas: {isr:?}");
    }
    let min_isr = {
        use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
        let admin: AdminClient<rdkafka::client::DefaultClientContext> =
            rdkafka::ClientConfig::new()
                .set("bootstrap.servers", &bootstrap)
                .create()
                .expect("admin");
        let r = admin
            .describe_configs(
                [&ResourceSpecifier::Topic(&topics[0])],
                &AdminOptions::new(),
            )
            .await
            .expect("describe_configs");
        let res = r
            .into_iter()
            .next()
            .expect("one")
            .expect("the topic's configs");
        res.get("min.insync.replicas").and_then(|e| e.value.clone())
    };
    assert_eq!(
        min_isr.as_deref(),
        Some("2"),
        "min.insync.replicas of {}",
        topics[0]
    );

    // Stream: every seq to the three destinations, at most ~60 sends in flight.
    let mut acked: HashMap<&'static str, BTreeSet<u64>> = HashMap::new();
    let mut failed = 0usize;
    let mut tasks = Vec::new();
    let mut victim = None;
    let mut killed_at = None;
    for i in 0..PER_STREAM {
        if i == KILL_AT {
            // The node that leads most of the partitions in use.
            let mut count: HashMap<i32, usize> = HashMap::new();
            for (_, leader, _) in partitions(&bootstrap, &topics) {
                *count.entry(leader).or_default() += 1;
            }
            let (leader, _) = count.into_iter().max_by_key(|(_, n)| *n).expect("a leader");
            let id = u16::try_from(leader).expect("a node id");
            nodes.kill(id);
            killed_at = Some(Instant::now());
            victim = Some(id);
        }
        for (stream, dest) in [("normal", &normal), ("direct", &direct), ("group", &group)] {
            let (sender, dest, log) = (sender.clone(), dest.clone(), log.clone());
            tasks.push(tokio::spawn(async move {
                let m = Message::encode_as("seq", &i, Codec::Bincode).expect("encode");
                let r = if stream == "group" {
                    sender.group_send(&dest, m).await
                } else {
                    sender.send(&dest, m).await
                };
                if r.is_ok() {
                    lock(&log).send_ok_times.push(Instant::now());
                }
                (stream, i, r)
            }));
        }
        if tasks.len() >= 60 {
            for t in tasks.drain(..) {
                match t.await.expect("send task") {
                    (s, i, Ok(())) => {
                        acked.entry(s).or_default().insert(i);
                    }
                    (s, i, Err(e)) => {
                        failed += 1;
                        eprintln!("send {s} {i} failed: {e}");
                    }
                }
            }
        }
    }
    for t in tasks.drain(..) {
        match t.await.expect("send task") {
            (s, i, Ok(())) => {
                acked.entry(s).or_default().insert(i);
            }
            (_, _, Err(_)) => failed += 1,
        }
    }
    let killed_at = killed_at.expect("killed");
    let victim = victim.expect("a victim");

    // Every acknowledged message arrives.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        let missing: usize = {
            let l = lock(&log);
            acked
                .iter()
                .map(|(s, seqs)| {
                    let got: BTreeSet<u64> =
                        l.received.get(s).into_iter().flatten().copied().collect();
                    seqs.difference(&got).count()
                })
                .sum()
        };
        if missing == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{missing} acknowledged messages lost"
        );
        tick.tick().await;
    }
    let all_received = killed_at.elapsed();
    let (dups, sent_ok, received) = {
        let l = lock(&log);
        let mut dups = 0;
        let mut received = 0;
        for seqs in l.received.values() {
            let distinct: BTreeSet<u64> = seqs.iter().copied().collect();
            dups += seqs.len() - distinct.len();
            received += distinct.len();
        }
        (
            dups,
            acked.values().map(BTreeSet::len).sum::<usize>(),
            received,
        )
    };
    let (send_pause, receive_pause) = {
        let mut l = lock(&log);
        let mut s = std::mem::take(&mut l.send_ok_times);
        let mut r = std::mem::take(&mut l.receive_times);
        (longest_pause(&mut s), longest_pause(&mut r))
    };
    eprintln!(
        "cluster: node {victim} killed after {KILL_AT} of {PER_STREAM} seqs per stream; sends Ok {sent_ok}, failed {failed}; received {received} (lost 0), duplicates {dups}; longest pause of sends {:.1} s, of receives {:.1} s; all received {:.1} s after the kill",
        send_pause.as_secs_f64(),
        receive_pause.as_secs_f64(),
        all_received.as_secs_f64()
    );
    assert_eq!(
        failed, 0,
        "with delivery_timeout=120s no send fails across the failover"
    );

    // The node comes back and rejoins: in sync again for every partition in use.
    let restarted = Instant::now();
    {
        let nodes = nodes.clone();
        tokio::task::spawn_blocking(move || nodes.restart(victim))
            .await
            .expect("restart");
    }
    let victim_id = i32::from(victim);
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let (b, t) = (bootstrap.clone(), topics.clone());
        let now = tokio::task::spawn_blocking(move || partitions(&b, &t))
            .await
            .expect("metadata task");
        if now.iter().all(|(_, _, isr)| isr.contains(&victim_id)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node {victim} is not back in sync within 90 s: {now:?}"
        );
        tick.tick().await;
    }
    eprintln!(
        "cluster: node {victim} back in sync {:.1} s after its restart",
        restarted.elapsed().as_secs_f64()
    );
    // And the cluster still works end to end.
    sender
        .send(
            &direct,
            Message::encode_as("seq", &PER_STREAM, Codec::Bincode).expect("encode"),
        )
        .await
        .expect("a send after the rejoin");
    chanlayer_testkit::eventually("the send after the rejoin arrives", || {
        lock(&log)
            .received
            .get("direct")
            .is_some_and(|v| v.contains(&PER_STREAM))
    })
    .await;

    let _ = tokio::join!(sender.close(), receiver.close());
    for r in readers {
        r.await.expect("reader ends with Closed");
    }
}
