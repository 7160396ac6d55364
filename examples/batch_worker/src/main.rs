//! A batch worker on chanlayer: what a batch library on Kafka does, whose messages carry an
//! id and their lineage ("refs"), and whose input batch is committed only when the whole
//! batch succeeded.
//!
//! ```sh
//! export BATCH_URL='kafka://127.0.0.1:9092?codec=json&partitions=2'   # or amqp://…?codec=json
//! batch_worker work --name w1 --batch 20 &
//! batch_worker work --name w2 --batch 20 &
//! batch_worker produce --count 1000
//! ```
//!
//! - `produce` sends inputs (`{"id": "in-7", "value": 7}`, message type `batch.input`) to
//!   the normal channel `inputs`, with the header `refs` = `["src-7"]`: the lineage, a JSON
//!   array of ids.
//! - `work` takes up to `--batch` inputs at a time (waiting up to `--timeout-ms` for the
//!   first) through `Layer::handle_batch`. The handler computes a result per input
//!   (`{"id": "in-7.result", "input": "in-7", "worker", "result": 49}`, type
//!   `batch.result`), its `refs` header the input's extended by the input's id
//!   (`["src-7","in-7"]`), and sends all the batch's results to the normal channel
//!   `outputs` as one `send_batch`. Only when the handler returns `Ok` does `handle_batch`
//!   ack (commit) the input batch; when it fails, the whole batch is nacked and comes back.
//!   A worker killed mid-batch has acked nothing of it: the batch comes back to another
//!   worker. Its results may then be sent twice (they are sent before the ack:
//!   at-least-once), never lost. On SIGTERM or Ctrl-C a worker finishes the batch in hand,
//!   closes the layer and prints its counts.
//! - `--fail-batch K` makes the handler fail on the worker's K-th batch (before sending
//!   anything), and `--stall-after K` makes it block forever on its K-th batch once its
//!   results are sent, before the ack: a worker to kill mid-batch.
//!
//! With `codec=json` in the URL the bodies are JSON on the wire. The URL comes from
//! `BATCH_URL` (an environment variable, not an argument: it may hold a password, and
//! arguments show in `ps`).

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chanlayer::{BatchError, Layer, LayerConfig, Message, MessageType};
use clap::{Parser, Subcommand};
use example_support::{run_main, stop_signal};
use serde::{Deserialize, Serialize};

/// The normal channel inputs come from.
const INPUTS: &str = "inputs";
/// The normal channel results go to.
const OUTPUTS: &str = "outputs";
/// The header that carries the lineage: a JSON array of ids, oldest first.
const REFS: &str = "refs";

/// An input: an id and a value to work on.
#[derive(Debug, Serialize, Deserialize)]
struct Input {
    id: String,
    value: u64,
}

impl MessageType for Input {
    fn message_type(&self) -> &str {
        "batch.input"
    }
}

/// The result of one input.
#[derive(Debug, Serialize, Deserialize)]
struct Output {
    id: String,
    input: String,
    worker: String,
    result: u64,
}

impl MessageType for Output {
    fn message_type(&self) -> &str {
        "batch.result"
    }
}

#[derive(Parser)]
#[command(about = "A batch worker on chanlayer normal channels")]
struct Cli {
    /// The layer URL (kafka://, amqp://, amqps://); add codec=json for JSON bodies.
    #[arg(long, env = "BATCH_URL", hide_env_values = true)]
    url: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Sends inputs `in-first` .. `in-(first + count - 1)` to the `inputs` channel.
    Produce {
        /// How many inputs.
        #[arg(long)]
        count: u64,
        /// The first input's number.
        #[arg(long, default_value_t = 0)]
        first: u64,
    },
    /// Handles batches of inputs until SIGTERM or Ctrl-C.
    Work {
        /// This worker's name, in its results and what it prints.
        #[arg(long)]
        name: String,
        /// The most inputs in one batch.
        #[arg(long, default_value_t = 20)]
        batch: usize,
        /// How long to wait for a batch's first input, in milliseconds.
        #[arg(long, default_value_t = 500)]
        timeout_ms: u64,
        /// Fail this worker's K-th batch (it is nacked and comes back whole).
        #[arg(long)]
        fail_batch: Option<u64>,
        /// Block forever on this worker's K-th batch after sending its results, before
        /// the ack (a worker to kill mid-batch).
        #[arg(long)]
        stall_after: Option<u64>,
    },
}

/// The lineage in a message's `refs` header (empty without one).
fn refs(msg: &Message) -> Result<Vec<String>, String> {
    match msg.headers().get(REFS) {
        None => Ok(Vec::new()),
        Some(v) => serde_json::from_str(v).map_err(|e| format!("bad {REFS} header {v:?}: {e}")),
    }
}

/// A message with its `refs` header set to `refs`.
fn with_refs(msg: Message, refs: &[String]) -> Result<Message, String> {
    let refs = serde_json::to_string(refs).map_err(|e| e.to_string())?;
    Ok(msg.with_header(REFS, refs))
}

/// Sends inputs in batches of 100.
async fn produce(layer: &Layer, first: u64, count: u64) -> Result<(), String> {
    const CHUNK: u64 = 100;
    let mut n = first;
    while n < first + count {
        let end = (n + CHUNK).min(first + count);
        let mut batch = Vec::new();
        for n in n..end {
            let input = Input {
                id: format!("in-{n}"),
                value: n,
            };
            let msg = layer.message(&input).map_err(|e| e.to_string())?;
            batch.push(with_refs(msg, &[format!("src-{n}")])?);
        }
        layer.send_batch(INPUTS, batch).await.map_err(|e| {
            format!(
                "sending inputs from in-{n}: {e} ({} sent before)",
                n - first
            )
        })?;
        n = end;
    }
    println!("produced {count} inputs from in-{first}");
    Ok(())
}

/// The worker's options for its handler.
struct Worker {
    name: String,
    fail_batch: Option<u64>,
    stall_after: Option<u64>,
}

/// The work on one input: a stand-in for a real computation.
fn compute(input: &Input) -> u64 {
    input.value.wrapping_mul(input.value)
}

/// Handles batch number `k`: a result per input, all sent to `outputs` as one batch.
/// Returns an error (the batch is nacked and comes back) if anything fails.
async fn handle(layer: &Layer, w: &Worker, k: u64, batch: Vec<Message>) -> Result<usize, String> {
    let name = &w.name;
    let mut ids = Vec::with_capacity(batch.len());
    let mut results = Vec::with_capacity(batch.len());
    for msg in &batch {
        let input: Input = match msg.decode() {
            Ok(input) => input,
            Err(e) => {
                // Not an input: logged and committed with the batch (it would otherwise
                // come back forever).
                eprintln!("batch_worker: {name}: skipping a message that is not an input: {e}");
                continue;
            }
        };
        let mut lineage = refs(msg)?;
        lineage.push(input.id.clone());
        let output = Output {
            id: format!("{}.result", input.id),
            input: input.id.clone(),
            worker: name.clone(),
            result: compute(&input),
        };
        results.push(with_refs(
            layer.message(&output).map_err(|e| e.to_string())?,
            &lineage,
        )?);
        ids.push(input.id);
    }
    println!("worker {name} batch {k} received {}", ids.join(" "));
    if w.fail_batch == Some(k) {
        return Err(format!("simulated failure of batch {k}"));
    }
    let sent = results.len();
    // One send for the whole batch. If it fails partway (`PartlySent`), the batch comes
    // back and the part that went is sent again: at-least-once.
    layer
        .send_batch(OUTPUTS, results)
        .await
        .map_err(|e| format!("sending the results: {e}"))?;
    println!("worker {name} batch {k} sent {sent} results");
    if w.stall_after == Some(k) {
        println!("worker {name} stalled in batch {k} (results sent, not acked)");
        std::future::pending::<()>().await;
    }
    Ok(sent)
}

/// Handles batches until stopped; returns how many batches were committed and how many
/// results they sent.
async fn work(
    layer: &Layer,
    w: &Worker,
    max: usize,
    timeout: Duration,
) -> chanlayer::Result<(u64, usize)> {
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        tokio::spawn(async move {
            stop_signal().await;
            stop.store(true, Ordering::Relaxed);
        });
    }
    let (mut batches, mut committed, mut results) = (0u64, 0u64, 0usize);
    println!("worker {} ready", w.name);
    // The stop flag is read between batches: a batch in hand is finished first. A batch
    // waits at most `timeout` for its first input.
    while !stop.load(Ordering::Relaxed) {
        let k = batches + 1;
        let mut sent = 0;
        let outcome = layer
            .handle_batch(INPUTS, max, timeout, |batch| async {
                sent = handle(layer, w, k, batch).await?;
                Ok::<(), String>(())
            })
            .await;
        match outcome {
            Ok(0) => {}
            Ok(n) => {
                batches = k;
                committed += 1;
                results += sent;
                println!("worker {} batch {k} committed ({n} inputs)", w.name);
            }
            Err(BatchError::Handler(e)) => {
                batches = k;
                eprintln!(
                    "batch_worker: {}: batch {k} failed: {e}; nacked, it comes back whole",
                    w.name
                );
            }
            Err(BatchError::Layer(e)) => return Err(e),
        }
    }
    Ok((committed, results))
}

async fn run(cli: Cli) -> Result<(), String> {
    let config = LayerConfig::from_url(&cli.url).map_err(|e| e.to_string())?;
    // Display redacts the password.
    eprintln!("batch_worker: connecting to {config}");
    let layer = chanlayer::connect_config(config)
        .await
        .map_err(|e| e.to_string())?;
    let outcome = match cli.command {
        Command::Produce { count, first } => produce(&layer, first, count).await,
        Command::Work {
            name,
            batch,
            timeout_ms,
            fail_batch,
            stall_after,
        } => {
            let w = Worker {
                name,
                fail_batch,
                stall_after,
            };
            match work(&layer, &w, batch, Duration::from_millis(timeout_ms)).await {
                Ok((batches, results)) => {
                    println!(
                        "worker {} stopped after {batches} batches, {results} results sent",
                        w.name
                    );
                    Ok(())
                }
                Err(e) => Err(format!("{}: {e}", w.name)),
            }
        }
    };
    let closed = layer.close().await.map_err(|e| format!("close: {e}"));
    outcome.and(closed)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    run_main("batch_worker", run(cli))
}
