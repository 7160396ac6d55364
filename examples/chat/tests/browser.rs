//! The chat example in a real browser, on every backend.
//!
//! Each test starts `chat` server processes on one layer URL (a prefix of its own, so runs
//! never share queues or topics), waits for their `/healthz`, and runs
//! `browser/chat.test.mjs` (headless Chromium through playwright-core; see that file for the
//! steps). Two processes for amqp, kafka and zmq (dedicated mode, through a proxy run in
//! this test process), one process for memory.
//!
//! What they need, and what happens without it (they fail, with the command that fixes it;
//! they never pass having done nothing):
//! - Debian's Chromium at /usr/bin/chromium (or `CHROMIUM=path`), node, and
//!   `examples/chat/browser/node_modules`: `scripts/browsers/chromium.sh` installs them;
//! - RabbitMQ on 127.0.0.1:5672 and Kafka on 127.0.0.1:9092: `scripts/brokers/*.sh`.
//!
//! Screenshots and server logs go to `$CARGO_TARGET_DIR/chat-artifacts/` (or
//! `target/chat-artifacts/`).

mod common;

use std::time::{Duration, Instant};

use common::{
    artifacts, require_broker, require_browser, run_node, run_prefix, start_server, Server,
    BROWSER_WITHIN,
};

/// Runs the browser script against `a` (and `b`, which it kills); panics unless it passes.
/// The script ends by stopping `a` with SIGTERM; `a` must then exit with status 0.
fn run_browser(backend: &str, a: &mut Server, b: Option<&Server>) {
    let chromium = require_browser();
    let mut args: Vec<String> = vec![
        "--backend".into(),
        backend.into(),
        "--a".into(),
        a.base.clone(),
        "--artifacts".into(),
        artifacts().display().to_string(),
        "--chromium".into(),
        chromium.display().to_string(),
        "--term-pid".into(),
        a.process.pid().to_string(),
    ];
    if let Some(b) = b {
        args.extend([
            "--b".into(),
            b.base.clone(),
            "--kill-pid".into(),
            b.process.pid().to_string(),
        ]);
    }
    let started = Instant::now();
    let (status, output) = run_node("chat.test.mjs", &args, &format!("{backend}-browser.log"));
    let servers = match b {
        Some(b) => format!("{}, {}", a.log.display(), b.log.display()),
        None => a.log.display().to_string(),
    };
    match status {
        Some(s) if s.success() => {
            assert!(
                output.contains(&format!("PASS {backend}")),
                "the browser script exited 0 without saying PASS:\n{output}"
            );
            let exit = a.process.exit_within(Duration::from_secs(30));
            assert!(
                matches!(exit, Some(s) if s.success()),
                "server A did not exit cleanly after SIGTERM ({exit:?}); its log: {}",
                a.log.display()
            );
            println!(
                "{backend}: browser test passed in {:.1} s",
                started.elapsed().as_secs_f64()
            );
        }
        Some(s) => panic!("the browser test failed ({s}); server logs: {servers}\n{output}"),
        None => panic!(
            "the browser test did not finish within {BROWSER_WITHIN:?}; server logs: {servers}\n{output}"
        ),
    }
}

/// Two server processes on `url`; the browser script kills B.
fn two_servers(backend: &str, url: &str) {
    require_browser();
    let mut a = start_server(url, "A", backend);
    let b = start_server(url, "B", backend);
    run_browser(backend, &mut a, Some(&b));
}

#[test]
fn browser_chat_on_memory_in_one_process() {
    require_browser();
    let mut a = start_server("memory://", "A", "memory");
    run_browser("memory", &mut a, None);
}

#[test]
fn browser_chat_across_processes_on_amqp() {
    require_broker("RabbitMQ", 5672, "scripts/brokers/rabbitmq.sh");
    let url = format!(
        "amqp://guest:guest@127.0.0.1:5672/%2f?prefix={}",
        run_prefix("amqp")
    );
    two_servers("amqp", &url);
}

#[test]
fn browser_chat_across_processes_on_kafka() {
    require_broker("Kafka", 9092, "scripts/brokers/kafka.sh");
    // retention: the run's topics (its groups topic, a killed server's inbox) age out.
    let url = format!(
        "kafka://127.0.0.1:9092?prefix={}&retention=1h",
        run_prefix("kafka")
    );
    two_servers("kafka", &url);
}

#[test]
fn browser_chat_across_processes_on_zmq_dedicated() {
    // The dedicated mode's proxy, in this test process, on free ports.
    let proxy = chanlayer_zmq::Proxy::spawn(chanlayer_zmq::ProxyConfig::new(
        "tcp://127.0.0.1:*",
        "tcp://127.0.0.1:*",
    ))
    .expect("start the zmq proxy");
    let url = format!("{}&prefix={}", proxy.url(), run_prefix("zmq"));
    two_servers("zmq", &url);
    drop(proxy);
}
