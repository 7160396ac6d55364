//! The `chanlayer` binary's message commands, run as a user runs them: `send` and `receive`
//! between two processes over RabbitMQ, `tail` and `group-send` through a ZeroMQ proxy,
//! `check`, and the exit statuses and messages a script relies on.

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const DEADLINE: Duration = Duration::from_secs(30);

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

fn ns() -> String {
    format!("cli{:x}", rand_u64())
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

#[test]
fn send_then_receive_in_another_process_over_amqp() {
    let url = format!("{AMQP}?prefix={}&queue_expires=60s", ns());
    for i in 0..3 {
        let body = format!(r#"{{"n":{i},"who":"cli"}}"#);
        let out = chanlayer(&[
            "send", "--url", &url, "jobs", "--type", "job.new", "--json", &body, "--header", "k=v",
        ]);
        assert!(out.status.success(), "send: {}", text(&out.stderr));
    }
    let out = chanlayer(&[
        "receive",
        "--url",
        &url,
        "jobs",
        "--count",
        "3",
        "--timeout",
        "20s",
    ]);
    assert!(out.status.success(), "receive: {}", text(&out.stderr));
    let lines: Vec<Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect();
    assert_eq!(lines.len(), 3, "{lines:?}");
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["channel"], "jobs");
        assert_eq!(l["type"], "job.new");
        assert_eq!(l["codec"], "json");
        assert_eq!(l["body"]["n"], i as u64, "in order: {l}");
        assert_eq!(l["headers"]["k"], "v");
    }
    // Nothing left: a further receive times out with status 3.
    let out = chanlayer(&["receive", "--url", &url, "jobs", "--timeout", "300ms"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("timed out"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn tail_prints_what_group_send_sends_through_a_zmq_proxy() {
    let proxy = chanlayer_zmq::Proxy::spawn(chanlayer_zmq::ProxyConfig::new(
        "tcp://127.0.0.1:0",
        "tcp://127.0.0.1:0",
    ))
    .expect("proxy");
    let url = format!("{}&prefix={}", proxy.url(), ns());
    let group = "room.cli";
    let mut tail = Command::new(env!("CARGO_BIN_EXE_chanlayer"))
        .args([
            "tail",
            "--url",
            &url,
            group,
            "--count",
            "2",
            "--timeout",
            "30s",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tail");
    // `tail` says on stderr when it has joined; sends after that reach it.
    let err = tail.stderr.take().expect("piped stderr");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let joined = rx.recv_timeout(DEADLINE).expect("tail says it joined");
    assert!(joined.contains(&format!("joined {group}")), "{joined}");
    for (t, body) in [
        ("chat.message", r#""hi""#),
        ("chat.message", r#"{"x":[1,2]}"#),
    ] {
        let out = chanlayer(&[
            "group-send",
            "--url",
            &url,
            group,
            "--type",
            t,
            "--json",
            body,
            "--codec",
            "msgpack",
        ]);
        assert!(out.status.success(), "group-send: {}", text(&out.stderr));
    }
    let out = tail.wait_with_output().expect("tail ends after --count 2");
    assert!(out.status.success(), "tail: {:?}", out.status);
    let lines: Vec<Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[0]["channel"], group);
    assert_eq!(lines[0]["codec"], "msgpack");
    assert_eq!(lines[0]["body"], "hi");
    assert_eq!(lines[1]["body"]["x"][1], 2);
    drop(proxy);
}

#[test]
fn check_reports_a_working_layer_and_its_capabilities() {
    let out = chanlayer(&["check", "--url", "memory://?capacity=50"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    for want in [
        "connect:      ok",
        "round trip:   ok",
        "group:        ok",
        "backend:      memory",
        "capacity=50",
        "check:        ok",
    ] {
        assert!(stdout.contains(want), "{want:?} in {stdout}");
    }
    let out = chanlayer(&["check", "--url", &format!("{AMQP}?prefix={}", ns())]);
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(
        text(&out.stdout).contains("at_least_once=true"),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn check_says_what_to_do_and_never_shows_the_password() {
    let secret = "s3cr3t-pw";
    let out = chanlayer(&[
        "check",
        "--url",
        &format!("amqp://guest:{secret}@127.0.0.1:5672/%2f?connection_timeout=5s"),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let all = text(&out.stdout) + &text(&out.stderr);
    assert!(!all.contains(secret), "{all}");
    assert!(all.contains("connect:      FAILED"), "{all}");
    assert!(all.contains("user, password and vhost"), "{all}");

    // Dedicated ZeroMQ mode with no proxy: the hint names the proxy command.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let url = format!(
        "zmq://?pull=tcp://127.0.0.1:{port}&pub=tcp://127.0.0.1:{}&connect_timeout=300ms",
        port + 1
    );
    let out = chanlayer(&["check", "--url", &url]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("chanlayer zmq-proxy"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn bad_input_exits_2_with_a_message() {
    for (args, want) in [
        (
            vec![
                "send",
                "--url",
                "memory://",
                "c",
                "--type",
                "t",
                "--json",
                "{nope",
            ],
            "not valid JSON",
        ),
        (
            vec!["send", "--url", "memory://", "c", "--type", ""],
            "type",
        ),
        (
            vec!["send", "--url", "memory://", "bad name", "--type", "t"],
            "bad name",
        ),
        (vec!["receive", "--url", "nope://x", "c"], "scheme"),
        (
            vec!["check", "--url", "memory://?capacity=lots"],
            "capacity",
        ),
        (vec!["kafka-inboxes", "--url", "memory://"], "kafka://"),
        (vec!["send", "c", "--type", "t"], "--url"),
    ] {
        let out = chanlayer(&args);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            text(&out.stderr)
        );
        assert!(
            text(&out.stderr).contains(want),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
}

#[test]
fn bench_prints_a_side_by_side_table_and_writes_json_and_svg() {
    let dir = std::env::temp_dir().join(format!("chanlayer-bench-{}", ns()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (json, svg) = (dir.join("b.json"), dir.join("b.svg"));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let zmq = format!("zmq://127.0.0.1:{port}?bind=eager&capacity=10000");
    let out = chanlayer(&[
        "bench",
        "--url",
        "memory://?capacity=10000",
        "--url",
        &zmq,
        "--scenario",
        "local,group,roundtrip",
        "--messages",
        "300",
        "--concurrency",
        "4",
        "--members",
        "3",
        "--json",
        json.to_str().expect("utf-8 path"),
        "--plot",
        svg.to_str().expect("utf-8 path"),
    ]);
    let table = text(&out.stdout);
    assert!(out.status.success(), "{table}{}", text(&out.stderr));
    assert!(table.starts_with("url "), "{table}");
    assert_eq!(table.lines().count(), 1 + 2 * 3, "{table}");
    let figures: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("json written"))
            .expect("JSON figures");
    assert_eq!(figures.len(), 6);
    for f in &figures {
        let deliveries = if f["scenario"] == "group" { 900 } else { 300 };
        assert_eq!(f["received"], deliveries, "{f}");
        assert_eq!(f["lost"], 0, "{f}");
        assert_eq!(f["duplicates"], 0, "{f}");
        assert!(f["msgs_per_sec"].as_f64().expect("number") > 0.0, "{f}");
        assert!(f["p99_us"].as_f64() >= f["p50_us"].as_f64(), "{f}");
    }
    assert_eq!(figures[3]["backend"], "zmq");
    let drawn = std::fs::read_to_string(&svg).expect("svg written");
    assert!(
        drawn.starts_with("<svg"),
        "{}",
        &drawn[..drawn.len().min(200)]
    );
    assert!(drawn.contains("throughput") && drawn.contains("latency"));
    let _ = std::fs::remove_dir_all(&dir);
}
