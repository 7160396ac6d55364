//! The notification service as its users run it: consumer processes and a publisher process
//! on a real broker (Kafka, RabbitMQ). Every notification is processed successfully once in
//! total, and the ones that fail come back (marked `redelivered`) until they succeed. On
//! Kafka, with `create_topics=false`, a missing topic is a clear error from the publisher.
//! Each test needs its broker running (`./scripts/test` starts them) and fails loudly when it
//! is not.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use example_support::testing::{self, unique_prefix, Line, Proc};
use serde::Deserialize;

const COUNT: u64 = 300;
/// Every 10th notification fails once (ids 9, 19, ...).
const FAIL_ONCE_EVERY: u64 = 10;

/// A notification as the consumers print it (their bodies are JSON: `codec=json`).
#[derive(Debug, Deserialize)]
struct Notification {
    id: u64,
    kind: String,
}

fn prefix() -> String {
    unique_prefix("nt")
}

/// Kafka with JSON bodies, two partitions and the broker's minimum session timeout (how
/// soon a stopped consumer's partitions move), then `extra`.
fn kafka_url(prefix: &str, extra: &str) -> String {
    testing::kafka_url(
        prefix,
        &format!("&codec=json&partitions=2&session_timeout=6s{extra}"),
    )
}

/// RabbitMQ with JSON bodies.
fn amqp_url(prefix: &str) -> String {
    format!("{}&codec=json", testing::amqp_url(prefix))
}

/// A `notifications` process with `args`, its output read line by line.
fn start(url: &str, name: &str, args: &[&str]) -> Proc {
    Proc::start(
        env!("CARGO_BIN_EXE_notifications"),
        "NOTIFICATIONS_URL",
        url,
        name,
        args,
    )
}

/// What the consumers printed: successes by id (with `redelivered`), failures by id.
#[derive(Default)]
struct Outcome {
    ok: HashMap<u64, Vec<(String, bool)>>,
    failed: HashMap<u64, u32>,
}

impl Outcome {
    /// Reads `ok NAME redelivered=B {json}` and the failure lines on stderr.
    fn take(&mut self, line: &Line) {
        match line {
            Line::Out(s) if s.starts_with("ok ") => {
                let mut parts = s.splitn(4, ' ');
                let (_, name, redelivered, body) = (
                    parts.next(),
                    parts.next().expect("name"),
                    parts.next().expect("redelivered"),
                    parts.next().expect("body"),
                );
                let n: Notification = serde_json::from_str(body)
                    .unwrap_or_else(|e| panic!("the body is not JSON ({e}): {s}"));
                let redelivered = match redelivered {
                    "redelivered=true" => true,
                    "redelivered=false" => false,
                    other => panic!("bad line {s:?}: {other}"),
                };
                assert_eq!(
                    n.kind == "fail-once",
                    n.id % FAIL_ONCE_EVERY == FAIL_ONCE_EVERY - 1
                );
                self.ok
                    .entry(n.id)
                    .or_default()
                    .push((name.to_owned(), redelivered));
            }
            Line::Err(s) if s.contains(" failed (redelivered=") => {
                let id = s
                    .split("notification ")
                    .nth(1)
                    .and_then(|rest| rest.split(' ').next())
                    .and_then(|id| id.parse::<u64>().ok())
                    .unwrap_or_else(|| panic!("bad failure line {s:?}"));
                *self.failed.entry(id).or_default() += 1;
            }
            _ => {}
        }
    }
}

/// Consumers c1 and c2 start; the publisher publishes [`COUNT`] notifications, every
/// [`FAIL_ONCE_EVERY`]-th of kind `fail-once`. Every notification is processed successfully
/// exactly once in total; each `fail-once` one failed first, came back marked
/// `redelivered`, and succeeded.
fn every_notification_once(url: &str) {
    let started = Instant::now();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let layer = rt
        .block_on(chanlayer::connect(url))
        .unwrap_or_else(|e| panic!("is the broker running? ./scripts/test starts it: {e}"));
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut consumers: Vec<Proc> = ["c1", "c2"]
        .iter()
        .map(|name| start(url, name, &["consume", "--name", name, "--work-ms", "10"]))
        .collect();
    for c in &mut consumers {
        let ready = format!("consumer {} ready", c.name);
        c.wait_for(&ready, deadline);
    }
    let mut publisher = start(
        url,
        "publisher",
        &[
            "publish",
            "--count",
            &COUNT.to_string(),
            "--fail-once-every",
            &FAIL_ONCE_EVERY.to_string(),
        ],
    );
    let status = publisher.wait_exit(deadline);
    assert!(
        status.success(),
        "publish failed ({status}): {:?}",
        publisher.seen
    );

    // Poll the consumers until every notification was processed.
    let mut outcome = Outcome::default();
    let mut taken = vec![0; consumers.len()];
    while (outcome.ok.len() as u64) < COUNT {
        assert!(
            Instant::now() < deadline,
            "only {} of {COUNT} notifications processed in time",
            outcome.ok.len()
        );
        for (c, taken) in consumers.iter_mut().zip(&mut taken) {
            c.read(Duration::from_millis(50));
            c.poll();
            for line in &c.seen[*taken..] {
                outcome.take(line);
            }
            *taken = c.seen.len();
        }
    }
    // Stop them; anything processed twice would show in what they print until they exit.
    for c in &consumers {
        c.terminate();
    }
    let mut per_consumer = Vec::new();
    for (c, taken) in consumers.iter_mut().zip(&mut taken) {
        let status = c.wait_exit(deadline);
        assert!(
            status.success(),
            "{} exited with {status}: {:?}",
            c.name,
            c.seen
        );
        for line in &c.seen[*taken..] {
            outcome.take(line);
        }
        let stopped = format!("consumer {} stopped: ", c.name);
        let counts = c
            .seen
            .iter()
            .find_map(|l| match l {
                Line::Out(s) => s.strip_prefix(&stopped).map(str::to_owned),
                Line::Err(_) => None,
            })
            .unwrap_or_else(|| panic!("{} did not print its counts: {:?}", c.name, c.seen));
        per_consumer.push(format!("{}: {counts}", c.name));
    }

    let twice: Vec<_> = outcome.ok.iter().filter(|(_, v)| v.len() > 1).collect();
    assert!(twice.is_empty(), "processed more than once: {twice:?}");
    assert_eq!(outcome.ok.len() as u64, COUNT);
    let mut came_back = 0;
    for (id, oks) in &outcome.ok {
        let failures = outcome.failed.get(id).copied().unwrap_or(0);
        if id % FAIL_ONCE_EVERY == FAIL_ONCE_EVERY - 1 {
            // It fails the first time each consumer sees it: once or twice.
            assert!(
                (1..=2).contains(&failures),
                "fail-once notification {id} failed {failures} times"
            );
            assert!(
                oks[0].1,
                "fail-once notification {id} succeeded without redelivered set"
            );
            came_back += 1;
        } else {
            assert_eq!(failures, 0, "notification {id} failed");
        }
    }
    assert_eq!(came_back, COUNT / FAIL_ONCE_EVERY);
    let redelivered = outcome.ok.values().filter(|v| v[0].1).count();
    let failures: u32 = outcome.failed.values().sum();
    println!(
        "{COUNT} processed once each; {failures} failures, all came back; {redelivered} successes marked redelivered; {}; {:.1} s",
        per_consumer.join(", "),
        started.elapsed().as_secs_f64()
    );
    rt.block_on(layer.close()).expect("close");
}

#[test]
fn kafka_every_notification_is_processed_once_and_failures_come_back() {
    every_notification_once(&kafka_url(&prefix(), ""));
}

#[test]
fn amqp_every_notification_is_processed_once_and_failures_come_back() {
    every_notification_once(&amqp_url(&prefix()));
}

/// With `create_topics=false`, publishing to a channel whose topic is missing is a clear
/// error naming the topic, and the publisher exits non-zero; once the topic exists (here a
/// publisher with `create_topics=true` ensured it), the same publisher goes through.
#[test]
fn kafka_missing_topic_is_a_clear_error_with_create_topics_false() {
    let prefix = prefix();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    // Connecting with create_topics=true creates the groups topic, which a layer with
    // create_topics=false needs too: the missing topic is then the channel's alone.
    let layer = rt
        .block_on(chanlayer::connect(&kafka_url(&prefix, "")))
        .unwrap_or_else(|e| panic!("is the broker running? ./scripts/test starts it: {e}"));
    let deadline = Instant::now() + Duration::from_secs(60);
    let strict = kafka_url(&prefix, "&create_topics=false");
    let publish = ["publish", "--count", "5"];

    let mut refused = start(&strict, "publisher (create_topics=false)", &publish);
    let status = refused.wait_exit(deadline);
    assert!(!status.success(), "publish succeeded: {:?}", refused.seen);
    let stderr: Vec<&str> = refused
        .seen
        .iter()
        .filter_map(|l| match l {
            Line::Err(s) => Some(s.as_str()),
            Line::Out(_) => None,
        })
        .collect();
    let topic = format!("{prefix}.channel.notifications");
    assert!(
        stderr.iter().any(
            |l| l.contains("cannot publish to channel \"notifications\"")
                && l.contains(&format!("topic \"{topic}\" does not exist"))
                && l.contains("create_topics=false")
        ),
        "no clear error naming {topic}: {stderr:?}"
    );
    assert!(
        stderr.contains(&"notifications: published 0 of 5"),
        "{stderr:?}"
    );
    println!("create_topics=false: {}", stderr.join(" | "));

    let mut ensuring = start(&kafka_url(&prefix, ""), "publisher", &publish);
    let status = ensuring.wait_exit(deadline);
    assert!(status.success(), "{:?}", ensuring.seen);
    let mut strict_again = start(&strict, "publisher (create_topics=false)", &publish);
    let status = strict_again.wait_exit(deadline);
    assert!(
        status.success(),
        "publish with the topic there: {:?}",
        strict_again.seen
    );
    rt.block_on(layer.close()).expect("close");
}
