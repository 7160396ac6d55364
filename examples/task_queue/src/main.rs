//! A task queue on one chanlayer normal channel: what a Celery/kombu deployment routes to a
//! Kafka topic, with as many workers as the topic has partitions (kombu's Kafka transport
//! runs one), or on RabbitMQ with as many as you like.
//!
//! ```sh
//! export TASKS_URL='kafka://127.0.0.1:9092?partitions=4'      # or amqp://127.0.0.1:5672/%2f
//! task_queue worker --name w1 &                                # as many as partitions
//! task_queue worker --name w2 &
//! task_queue submit --count 1000
//! ```
//!
//! - `submit` sends `count` tasks (`{"id", "payload"}`, message type `task`) to the normal
//!   channel `tasks`.
//! - `worker` takes one task at a time with `receive_delivery`, does it, sends the result
//!   (`{"id", "worker", "checksum"}`, type `task.done`) to the normal channel `results`, and
//!   only then acks the task: a worker that dies mid-task leaves it to another. On SIGTERM
//!   or Ctrl-C it stops taking tasks, finishes the one in hand, closes the layer (handing
//!   its partitions or unacked prefetch back) and prints how many tasks it did.
//!
//! The URL comes from `TASKS_URL` (an environment variable, not an argument: it may hold a
//! password, and arguments show in `ps`). For a Kafka cluster on SASL_SSL with
//! SCRAM-SHA-512, as a kombu deployment configures it:
//!
//! ```text
//! kafka://broker:9094?security.protocol=SASL_SSL&sasl.mechanism=SCRAM-SHA-512
//!     &username=app&password=...&ca_file=/etc/ssl/kafka-ca.pem&partitions=4
//! ```

use std::process::ExitCode;
use std::time::Duration;

use chanlayer::{Layer, LayerConfig, MessageType};
use clap::{Parser, Subcommand};
use example_support::{run_main, stop_signal, with_backpressure};
use serde::{Deserialize, Serialize};

/// The normal channel tasks go through.
const TASKS: &str = "tasks";
/// The normal channel results go to.
const RESULTS: &str = "results";

/// A task: an id and some work to do on `payload`.
#[derive(Debug, Serialize, Deserialize)]
struct Task {
    id: u64,
    payload: String,
}

impl MessageType for Task {
    fn message_type(&self) -> &str {
        "task"
    }
}

/// What a worker reports for a task it did.
#[derive(Debug, Serialize, Deserialize)]
struct Done {
    id: u64,
    worker: String,
    checksum: u64,
}

impl MessageType for Done {
    fn message_type(&self) -> &str {
        "task.done"
    }
}

#[derive(Parser)]
#[command(about = "A task queue on a chanlayer normal channel")]
struct Cli {
    /// The layer URL (kafka://, amqp://, amqps://).
    #[arg(long, env = "TASKS_URL", hide_env_values = true)]
    url: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Sends tasks `first` .. `first + count` to the `tasks` channel.
    Submit {
        /// How many tasks.
        #[arg(long)]
        count: u64,
        /// The first task id.
        #[arg(long, default_value_t = 0)]
        first: u64,
    },
    /// Does tasks until SIGTERM or Ctrl-C.
    Worker {
        /// This worker's name, in its results.
        #[arg(long)]
        name: String,
        /// How long each task takes (a stand-in for real work).
        #[arg(long, default_value_t = 0)]
        task_ms: u64,
    },
}

/// The work: a checksum of the payload (FNV-1a), standing in for a real job.
fn work(task: &Task) -> u64 {
    task.payload.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Sends the tasks in batches of 100. A batch that meets a full channel partway was sent
/// up to `sent` (`PartlySent`): the rest is sent again once there is room, never the part
/// that went.
async fn submit(layer: &Layer, first: u64, count: u64) -> chanlayer::Result<()> {
    const BATCH: u64 = 100;
    let mut id = first;
    while id < first + count {
        let end = (id + BATCH).min(first + count);
        let batch = (id..end)
            .map(|id| {
                layer.message(&Task {
                    id,
                    payload: format!("task {id}"),
                })
            })
            .collect::<chanlayer::Result<Vec<_>>>()?;
        let from = std::cell::Cell::new(0);
        with_backpressure(
            "task_queue",
            || layer.send_batch(TASKS, batch[from.get()..].to_vec()),
            |sent| from.set(from.get() + sent),
        )
        .await?;
        id = end;
    }
    println!("submitted {count} tasks from id {first}");
    Ok(())
}

async fn worker(layer: &Layer, name: &str, task_ms: u64) -> chanlayer::Result<u64> {
    let mut done = 0u64;
    let stop = stop_signal();
    tokio::pin!(stop);
    let mut next = Box::pin(layer.receive_delivery(TASKS));
    println!("worker {name} ready");
    loop {
        let delivery = tokio::select! {
            biased;
            _ = &mut stop => break,
            d = &mut next => d?,
        };
        // Taking the next task waits until this one is done and acked.
        let task: Task = match delivery.decode() {
            Ok(t) => t,
            Err(e) => {
                // Not a task: logged and acked (it would otherwise come back forever).
                eprintln!("task_queue: skipping a message that is not a task: {e}");
                delivery.ack().await?;
                next = Box::pin(layer.receive_delivery(TASKS));
                continue;
            }
        };
        if done == 0 {
            println!("worker {name} took its first task");
        }
        let result = Done {
            id: task.id,
            worker: name.to_owned(),
            checksum: work(&task),
        };
        if task_ms > 0 {
            tokio::time::sleep(Duration::from_millis(task_ms)).await;
        }
        // The result is sent before the task is acked: a worker that dies in between
        // leaves the task to another (at-least-once), never a task without its result.
        let result = layer.message(&result)?;
        with_backpressure(
            "task_queue",
            || layer.send_message(RESULTS, result.clone()),
            |_| {},
        )
        .await?;
        delivery.ack().await?;
        done += 1;
        next = Box::pin(layer.receive_delivery(TASKS));
    }
    // The receive in flight is dropped unfinished: what it had taken goes back.
    drop(next);
    Ok(done)
}

async fn run(cli: Cli) -> chanlayer::Result<()> {
    let config = LayerConfig::from_url(&cli.url)?;
    // Display redacts the password.
    eprintln!("task_queue: connecting to {config}");
    let layer = chanlayer::connect_config(config).await?;
    let outcome = match &cli.command {
        Command::Submit { count, first } => submit(&layer, *first, *count).await,
        Command::Worker { name, task_ms } => match worker(&layer, name, *task_ms).await {
            Ok(done) => {
                println!("worker {name} stopped after {done} tasks");
                Ok(())
            }
            Err(e) => Err(e),
        },
    };
    let closed = layer.close().await;
    outcome.and(closed)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    run_main("task_queue", run(cli))
}
