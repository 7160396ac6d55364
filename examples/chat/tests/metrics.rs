//! `/metrics`: the chat's Prometheus endpoint shows chanlayer's counters, gauges and send
//! latency moving with the traffic (memory, and AMQP on RabbitMQ at 127.0.0.1:5672).
//!
//! Traffic: `/healthz` round-trips one message through the layer to the server's own
//! process-local channel, so each call is one `send` (kind `local`) and one `receive`.
//! A layer exports its counts once a second, so the test polls the endpoint (with a
//! deadline) until they show.

mod common;

use common::{http_body, require_broker, run_prefix, start_server};

/// The value of the sample of `name` whose labels contain every one of `labels`
/// (`key="value"`), or 0 when there is none yet.
fn sample(body: &str, name: &str, labels: &[&str]) -> f64 {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(series, _)| {
            let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
            metric == name && labels.iter().all(|want| rest.contains(want))
        })
        .map(|(_, value)| value.parse::<f64>().expect("a sample value"))
        .sum()
}

fn scrape(base: &str) -> String {
    http_body(base, "/metrics").expect("GET /metrics answers")
}

fn figures_move(url: &str, backend: &str) {
    let server = start_server(url, "metrics", backend);
    let b = format!("backend=\"{backend}\"");
    let before = scrape(&server.base);
    let sent = |body: &str| sample(body, "chanlayer_sent_total", &[&b, "kind=\"local\""]);
    let received = |body: &str| sample(body, "chanlayer_received_total", &[&b, "kind=\"local\""]);
    // One in 64 sends per thread is timed: 200 round trips time at least one.
    let rounds = 200;
    for _ in 0..rounds {
        assert_eq!(
            http_body(&server.base, "/healthz").as_deref(),
            Some("ok\n"),
            "a health round trip"
        );
    }
    // The layer exports its counts once a second: poll until they show the round trips.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let after = loop {
        let body = scrape(&server.base);
        if received(&body) >= received(&before) + f64::from(rounds)
            || std::time::Instant::now() > deadline
        {
            break body;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    println!("{backend}: /metrics after {rounds} round trips:\n{after}");
    assert!(
        sent(&after) >= sent(&before) + f64::from(rounds),
        "sent: {} then {}",
        sent(&before),
        sent(&after)
    );
    assert!(
        received(&after) >= received(&before) + f64::from(rounds),
        "received: {} then {}",
        received(&before),
        received(&after)
    );
    let timed = sample(
        &after,
        "chanlayer_send_seconds_count",
        &[&b, "kind=\"local\""],
    );
    assert!(timed >= 1.0, "send latency samples: {timed}");
    // Every round trip was received: nothing waits in the inbox.
    assert_eq!(sample(&after, "chanlayer_inbox_messages", &[&b]), 0.0);
    // Nothing was lost or skipped.
    for quiet in [
        "chanlayer_undecodable_total",
        "chanlayer_dropped_full_total",
        "chanlayer_expired_total",
    ] {
        assert_eq!(sample(&after, quiet, &[&b]), 0.0, "{quiet}");
    }
}

#[test]
fn metrics_move_on_memory() {
    figures_move("memory://", "memory");
}

#[test]
fn metrics_move_on_amqp() {
    require_broker("RabbitMQ", 5672, "scripts/brokers/rabbitmq.sh");
    let url = format!(
        "amqp://guest:guest@127.0.0.1:5672/%2f?prefix={}",
        run_prefix("metrics")
    );
    figures_move(&url, "amqp");
}
