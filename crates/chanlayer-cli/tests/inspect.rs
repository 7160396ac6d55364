//! `chanlayer groups` and `chanlayer stats` against a running deployment: this test process
//! holds two layer instances with group members (on RabbitMQ with either wire, on Kafka)
//! and runs the binary, which asks them; and the exits for a memory:// URL and for nobody
//! answering.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use chanlayer::{Layer, Message};
use serde_json::Value;

const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// How long the test keeps asking until both instances have answered.
const DEADLINE: Duration = Duration::from_secs(30);

fn kafka() -> String {
    let bootstrap =
        std::env::var("KAFKA_BOOTSTRAP").unwrap_or_else(|_| "127.0.0.1:9092".to_owned());
    format!("kafka://{bootstrap}")
}

async fn chanlayer(args: &[&str]) -> Output {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_chanlayer"))
            .args(&args)
            .env_remove("CHANLAYER_URL")
            .output()
            .expect("run the chanlayer binary")
    })
    .await
    .expect("the blocking task")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn prefix() -> String {
    format!("cli{:x}", rand::random::<u64>())
}

/// Runs `chanlayer <args> --json` until its answer lists exactly `want` (instance ids,
/// sorted), or [`DEADLINE`] passes; returns the last JSON.
async fn ask_until(args: &[&str], want: &[String]) -> Value {
    let started = Instant::now();
    loop {
        let mut all = args.to_vec();
        all.extend(["--json", "--wait", "1s"]);
        let out = chanlayer(&all).await;
        assert!(
            out.status.success() || out.status.code() == Some(3),
            "{args:?}: {}",
            text(&out.stderr)
        );
        let v: Value = serde_json::from_str(&text(&out.stdout)).expect("one JSON object");
        let ids: Vec<&str> = (v["instances"].as_array().expect("instances").iter())
            .map(|i| i["instance"].as_str().expect("an instance id"))
            .collect();
        if ids == want || started.elapsed() > DEADLINE {
            return v;
        }
    }
}

async fn two_instances_are_inspected(url: &str, backend: &str) {
    let connect = || async { chanlayer::connect(url).await.expect("connect") };
    let (a, b): (Layer, Layer) = (connect().await, connect().await);
    let group = "room.cli";
    let (a1, a2, b1) = (
        a.new_channel("ws").await.expect("new_channel"),
        a.new_channel("ws").await.expect("new_channel"),
        b.new_channel("ws").await.expect("new_channel"),
    );
    for (l, ch) in [(&a, &a1), (&a, &a2), (&b, &b1)] {
        l.group_add(group, ch).await.expect("group_add");
    }
    a.send_message(
        &a1,
        // A map: what Django's wire (channels_rabbitmq) takes as well.
        Message::encode_as(
            "hello",
            &serde_json::json!({"n": 1}),
            chanlayer::Codec::Json,
        )
        .expect("json"),
    )
    .await
    .expect("send");
    a.receive(&a1).await.expect("receive");
    let mut want = vec![a.instance_id().to_owned(), b.instance_id().to_owned()];
    want.sort();

    // groups, JSON: each instance's own members, and the total.
    let v = ask_until(&["groups", "--url", url, group], &want).await;
    let mut a_members = vec![a1.clone(), a2.clone()];
    a_members.sort();
    for i in v["instances"].as_array().expect("instances") {
        assert_eq!(i["backend"], backend);
        let expected = if i["instance"] == a.instance_id() {
            &a_members
        } else {
            std::slice::from_ref(&b1)
        };
        assert_eq!(i["members"], serde_json::json!(expected), "{v}");
    }
    assert_eq!(v["group"], group);
    assert_eq!(
        v["total"],
        serde_json::json!({"instances": 2, "members": 3}),
        "{v}"
    );
    let ids: Vec<&str> = (v["instances"].as_array().expect("instances").iter())
        .map(|i| i["instance"].as_str().expect("id"))
        .collect();
    assert_eq!(ids, want, "exactly the two instances: {v}");

    // groups, text.
    let out = chanlayer(&["groups", "--url", url, group, "--wait", "2s"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let printed = text(&out.stdout);
    println!("{printed}");
    assert!(
        printed.contains(&format!(
            "instance {} ({backend}): 2 members\n  {}\n  {}\n",
            a.instance_id(),
            a_members[0],
            a_members[1]
        )),
        "{printed}"
    );
    assert!(
        printed.contains(&format!(
            "instance {} ({backend}): 1 member\n  {b1}\n",
            b.instance_id()
        )),
        "{printed}"
    );
    assert!(
        printed.ends_with("total: 3 members of room.cli in 2 instances\n"),
        "{printed}"
    );

    // stats, JSON: each instance's own counters (the asking does not change them).
    let v = ask_until(&["stats", "--url", url], &want).await;
    for i in v["instances"].as_array().expect("instances") {
        let own = if i["instance"] == a.instance_id() {
            &a
        } else {
            &b
        };
        assert_eq!(
            i["stats"],
            serde_json::to_value(own.stats()).expect("json"),
            "{v}"
        );
    }
    let sum = a.stats().sum(b.stats());
    assert_eq!((sum.sent, sum.received), (1, 1));
    assert_eq!(
        v["total"],
        serde_json::json!({"instances": 2, "stats": sum}),
        "{v}"
    );

    // stats, text: a header, a row per instance, the total.
    let out = chanlayer(&["stats", "--url", url, "--wait", "2s"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let printed = text(&out.stdout);
    println!("{printed}");
    let lines: Vec<Vec<&str>> = printed
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(lines.len(), 4, "{printed}");
    assert_eq!(
        lines[0][..4],
        ["instance", "backend", "sent", "received"],
        "{printed}"
    );
    let a_row = [a.instance_id(), backend, "1", "1", "0"];
    let b_row = [b.instance_id(), backend, "0", "0", "0"];
    assert!(lines.iter().any(|l| l[..5] == a_row), "{printed}");
    assert!(lines.iter().any(|l| l[..5] == b_row), "{printed}");
    assert_eq!(
        lines[3][..6],
        ["total", "(2", "instances)", "1", "1", "0"],
        "{printed}"
    );

    // A closed instance no longer answers.
    b.close().await.expect("close");
    let only_a = vec![a.instance_id().to_owned()];
    let v = ask_until(&["groups", "--url", url, group], &only_a).await;
    assert_eq!(
        v["total"],
        serde_json::json!({"instances": 1, "members": 2}),
        "{v}"
    );
    a.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_and_stats_over_amqp() {
    let url = format!("{AMQP}?prefix={}&queue_expires=60s", prefix());
    two_instances_are_inspected(&url, "amqp").await;
}

/// Django's wire: the requests and replies travel as channels_rabbitmq message dicts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_and_stats_over_amqp_with_the_channels_rabbitmq_wire() {
    let url = format!(
        "{AMQP}?wire=channels_rabbitmq&codec=msgpack&groups_exchange={}.groups",
        prefix()
    );
    two_instances_are_inspected(&url, "amqp").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_and_stats_over_kafka() {
    let url = format!("{}?prefix={}&retention=1h", kafka(), prefix());
    two_instances_are_inspected(&url, "kafka").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_is_a_usage_error_and_nobody_answering_exits_3() {
    let out = chanlayer(&["stats", "--url", "memory://"]).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("process-local"),
        "{}",
        text(&out.stderr)
    );
    let out = chanlayer(&["groups", "--url", "memory://", "room"]).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let out = chanlayer(&["groups", "--url", AMQP, "bad!group"]).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));

    // Nobody under this prefix: exit 3, and the (empty) answer is still printed.
    let url = format!("{AMQP}?prefix={}&queue_expires=60s", prefix());
    let out = chanlayer(&["groups", "--url", &url, "room", "--wait", "300ms"]).await;
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "total: 0 members of room in 0 instances\n"
    );
    assert!(
        text(&out.stderr).contains("no instance answered within 300ms"),
        "{}",
        text(&out.stderr)
    );
    // An instance with inspect=false does not answer.
    let quiet = chanlayer::connect(&format!("{url}&inspect=false"))
        .await
        .expect("connect");
    let out = chanlayer(&["stats", "--url", &url, "--wait", "500ms", "--json"]).await;
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    let v: Value = serde_json::from_str(&text(&out.stdout)).expect("JSON");
    assert_eq!(v["total"]["instances"], 0, "{v}");
    quiet.close().await.expect("close");
}

/// ZeroMQ dedicated mode: the binary's request goes through the proxy like any send.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_and_stats_over_zmq_dedicated() {
    let proxy = chanlayer_zmq::Proxy::spawn(chanlayer_zmq::ProxyConfig::new(
        "tcp://127.0.0.1:*",
        "tcp://127.0.0.1:*",
    ))
    .expect("proxy");
    let url = format!(
        "zmq://?pull={}&pub={}&prefix={}",
        proxy.pull_endpoint(),
        proxy.pub_endpoint(),
        prefix()
    );
    two_instances_are_inspected(&url, "zmq").await;
}

/// ZeroMQ embedded mode: one process per address sends, so another process cannot ask;
/// the binary says why and exits 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zmq_embedded_cannot_be_asked_from_another_process() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let url = format!("zmq://127.0.0.1:{port}?prefix={}", prefix());
    let publisher = chanlayer::connect(&format!("{url}&bind=eager"))
        .await
        .expect("connect");
    let out = chanlayer(&["stats", "--url", &url, "--wait", "500ms"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("already bound by another process"),
        "{}",
        text(&out.stderr)
    );
    publisher.close().await.expect("close");
}
