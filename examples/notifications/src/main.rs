//! A notification service on chanlayer: what a Kafka service does that ensures its topic,
//! publishes JSON notifications and commits each one only after processing it.
//!
//! ```sh
//! export NOTIFICATIONS_URL='kafka://127.0.0.1:9092?codec=json&partitions=2'   # or amqp://…?codec=json
//! notifications consume --name c1 &
//! notifications consume --name c2 &
//! notifications publish --count 100 --fail-once-every 10
//! ```
//!
//! - `publish` sends notifications (`{"id", "user", "kind", "text"}`, message type
//!   `notification`) to the normal channel `notifications`, one by one, as a service
//!   publishes events when they happen. The first send ensures the channel's topic: on
//!   Kafka the layer creates it when it is missing (`create_topics=true`, the default), and
//!   with `create_topics=false` a missing topic is an error, which `publish` prints before
//!   exiting with status 1. Every failure is logged on stderr. A full channel (RabbitMQ
//!   keeps `capacity` at the broker) is waited out, not a failure.
//! - `consume` takes one notification at a time with `receive_delivery`, processes it (here:
//!   prints it), and only then acks it. A processing failure is logged on stderr and the
//!   notification is nacked, so it comes back (`redelivered` is set on the retry; the
//!   line printed for it says so). A notification of kind `fail-once` stands in for a
//!   failure: it fails the first time a consumer process sees it. On SIGTERM or Ctrl-C a
//!   consumer stops taking notifications, closes the layer and prints its counts.
//!
//! With `codec=json` in the URL the bodies are JSON on the wire, readable by any consumer.
//! The URL comes from `NOTIFICATIONS_URL` (an environment variable, not an argument: it may
//! hold a password, and arguments show in `ps`).

use std::collections::HashSet;
use std::process::ExitCode;
use std::time::Duration;

use chanlayer::{Delivery, Layer, LayerConfig, MessageType};
use clap::{Parser, Subcommand};
use example_support::{run_main, stop_signal, with_backpressure};
use serde::{Deserialize, Serialize};

/// The normal channel notifications go through (on Kafka, the topic
/// `{prefix}.channel.notifications`).
const CHANNEL: &str = "notifications";

/// The kind of notification that fails the first time a consumer process sees it.
const FAIL_ONCE: &str = "fail-once";

/// A notification for a user.
#[derive(Debug, Serialize, Deserialize)]
struct Notification {
    id: u64,
    user: String,
    kind: String,
    text: String,
}

impl MessageType for Notification {
    fn message_type(&self) -> &str {
        "notification"
    }
}

#[derive(Parser)]
#[command(about = "A notification service on a chanlayer normal channel")]
struct Cli {
    /// The layer URL (kafka://, amqp://, amqps://); add codec=json for JSON bodies.
    #[arg(long, env = "NOTIFICATIONS_URL", hide_env_values = true)]
    url: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Publishes notifications `first` .. `first + count`.
    Publish {
        /// How many notifications.
        #[arg(long)]
        count: u64,
        /// The first id.
        #[arg(long, default_value_t = 0)]
        first: u64,
        /// Makes every K-th notification (ids K-1, 2K-1, ...) of kind `fail-once`; 0: none.
        #[arg(long, default_value_t = 0)]
        fail_once_every: u64,
    },
    /// Processes notifications until SIGTERM or Ctrl-C.
    Consume {
        /// This consumer's name, in what it prints.
        #[arg(long)]
        name: String,
        /// How long processing one notification takes (a stand-in for real work).
        #[arg(long, default_value_t = 0)]
        work_ms: u64,
    },
}

/// Notification `id`: every `fail_once_every`-th is of kind `fail-once`.
fn notification(id: u64, fail_once_every: u64) -> Notification {
    const KINDS: [&str; 3] = ["welcome", "reminder", "digest"];
    let kind = if fail_once_every > 0 && id % fail_once_every == fail_once_every - 1 {
        FAIL_ONCE
    } else {
        KINDS[(id % 3) as usize]
    };
    Notification {
        id,
        user: format!("user-{}", id % 50),
        kind: kind.to_owned(),
        text: format!("notification {id} for user-{}", id % 50),
    }
}

/// Publishes one by one. A full channel is back-pressure: wait and try again. Any other
/// failure is logged and ends the run (the caller exits non-zero).
async fn publish(
    layer: &Layer,
    first: u64,
    count: u64,
    fail_once_every: u64,
) -> Result<(), String> {
    let mut published = 0u64;
    for id in first..first + count {
        let n = notification(id, fail_once_every);
        if let Err(e) = with_backpressure("notifications", || layer.send(CHANNEL, &n), |_| {}).await
        {
            if published == 0 {
                // The first send is the one that ensures the topic (Kafka) or the queue
                // (AMQP): say so.
                eprintln!("notifications: cannot publish to channel {CHANNEL:?}: {e}");
            } else {
                eprintln!("notifications: publishing notification {id} failed: {e}");
            }
            return Err(format!("published {published} of {count}"));
        }
        published += 1;
    }
    println!("published {published} notifications from id {first}");
    Ok(())
}

/// What the consumer does with a notification: here, prints it for its user. A `fail-once`
/// notification fails the first time this process sees it.
async fn process(
    name: &str,
    delivery: &Delivery,
    n: &Notification,
    failed_before: &mut HashSet<u64>,
    work_ms: u64,
) -> Result<(), String> {
    if work_ms > 0 {
        tokio::time::sleep(Duration::from_millis(work_ms)).await;
    }
    if n.kind == FAIL_ONCE && failed_before.insert(n.id) {
        return Err("simulated failure (kind fail-once, first time here)".to_owned());
    }
    // The body as it came over the wire (JSON with codec=json).
    let body = String::from_utf8_lossy(delivery.message().body());
    println!(
        "ok {name} redelivered={} {body}",
        delivery.info().redelivered
    );
    Ok(())
}

async fn consume(layer: &Layer, name: &str, work_ms: u64) -> chanlayer::Result<(u64, u64)> {
    let (mut ok, mut failed) = (0u64, 0u64);
    let mut failed_before = HashSet::new();
    let stop = stop_signal();
    tokio::pin!(stop);
    let mut next = Box::pin(layer.receive_delivery(CHANNEL));
    println!("consumer {name} ready");
    loop {
        let delivery = tokio::select! {
            biased;
            _ = &mut stop => break,
            d = &mut next => d?,
        };
        match delivery.decode::<Notification>() {
            Err(e) => {
                // Not a notification: logged and acked (it would otherwise come back forever).
                eprintln!(
                    "notifications: {name}: skipping a message that is not a notification: {e}"
                );
                delivery.ack().await?;
            }
            Ok(n) => match process(name, &delivery, &n, &mut failed_before, work_ms).await {
                // Acked only now that it is processed: a consumer that dies before this
                // leaves it to another (at-least-once).
                Ok(()) => {
                    delivery.ack().await?;
                    ok += 1;
                }
                Err(why) => {
                    eprintln!(
                        "notifications: {name}: notification {} failed (redelivered={}): {why}; nacked, it will come back",
                        n.id,
                        delivery.info().redelivered
                    );
                    delivery.nack().await?;
                    failed += 1;
                }
            },
        }
        next = Box::pin(layer.receive_delivery(CHANNEL));
    }
    // The receive in flight is dropped unfinished: what it had taken goes back.
    drop(next);
    Ok((ok, failed))
}

async fn run(cli: Cli) -> Result<(), String> {
    let config = LayerConfig::from_url(&cli.url).map_err(|e| e.to_string())?;
    // Display redacts the password.
    eprintln!("notifications: connecting to {config}");
    let layer = chanlayer::connect_config(config)
        .await
        .map_err(|e| e.to_string())?;
    let outcome = match &cli.command {
        Command::Publish {
            count,
            first,
            fail_once_every,
        } => publish(&layer, *first, *count, *fail_once_every).await,
        Command::Consume { name, work_ms } => match consume(&layer, name, *work_ms).await {
            Ok((ok, failed)) => {
                println!("consumer {name} stopped: {ok} processed, {failed} failed");
                Ok(())
            }
            Err(e) => Err(format!("{name}: {e}")),
        },
    };
    let closed = layer.close().await.map_err(|e| format!("close: {e}"));
    outcome.and(closed)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    run_main("notifications", run(cli))
}
