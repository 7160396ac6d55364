//! The batch worker as its users run it: processes on a real broker (Kafka, RabbitMQ).
//! Inputs are produced; worker A fails one batch (it comes back whole) and stalls on a later
//! one after sending its results, before the ack; A is SIGKILLed there and worker B takes
//! over. Every input's result arrives with its `refs` lineage; the only duplicates are
//! results A sent and did not commit; nothing is lost. Each test needs its broker running
//! (`./scripts/test` starts them) and fails loudly when it is not.

use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::Deserialize;

/// Inputs produced.
const INPUTS: u64 = 200;
/// Inputs per batch.
const BATCH: &str = "20";
/// Worker A's batch that fails (and comes back).
const FAIL_BATCH: u64 = 2;
/// Worker A's batch it stalls on, results sent and not acked, until it is killed.
const STALL_BATCH: u64 = 4;

/// A result as the worker sends it (JSON: `codec=json`).
#[derive(Debug, Deserialize)]
struct Output {
    id: String,
    input: String,
    worker: String,
}

fn env_or(key: &str, default: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| default.to_owned())
}

fn prefix() -> String {
    format!("bw{:012x}", rand::random::<u64>() >> 16)
}

/// A `batch_worker` process whose output is read line by line (stderr included); killed if
/// the test ends without stopping it.
struct Proc {
    name: String,
    child: Child,
    lines: mpsc::Receiver<String>,
    /// The lines read so far.
    seen: Vec<String>,
}

fn forward<R: Read + Send + 'static>(from: R, tx: mpsc::Sender<String>) {
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
}

impl Proc {
    fn start(url: &str, name: &str, args: &[&str]) -> Proc {
        let mut child = Command::new(env!("CARGO_BIN_EXE_batch_worker"))
            .args(args)
            .env("BATCH_URL", url)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start batch_worker");
        let (tx, lines) = mpsc::channel();
        forward(child.stdout.take().expect("stdout"), tx.clone());
        forward(child.stderr.take().expect("stderr"), tx);
        Proc {
            name: name.to_owned(),
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Reads what the process printed so far, without waiting; panics if it exited.
    fn read(&mut self) {
        while let Ok(line) = self.lines.try_recv() {
            self.seen.push(line);
        }
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("{} exited early ({status}): {:?}", self.name, self.seen);
        }
    }

    /// Polls until the process printed `line`; panics at the deadline or if it exited.
    fn wait_for(&mut self, line: &str, deadline: Instant) {
        loop {
            self.read();
            if self.seen.iter().any(|l| l == line) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not say {line:?} in time: {:?}",
                self.name,
                self.seen
            );
            if let Ok(line) = self.lines.recv_timeout(Duration::from_millis(100)) {
                self.seen.push(line);
            }
        }
    }

    /// Waits for the process to exit, its output read to the end; panics at the deadline.
    fn wait_exit(&mut self, deadline: Instant) -> std::process::ExitStatus {
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                while let Ok(line) = self
                    .lines
                    .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                {
                    self.seen.push(line);
                }
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit in time: {:?}",
                self.name,
                self.seen
            );
            if let Ok(line) = self.lines.recv_timeout(Duration::from_millis(100)) {
                self.seen.push(line);
            }
        }
    }

    /// The ids the worker printed for its batch `k` (the last time it printed one).
    fn batch(&self, k: u64) -> BTreeSet<String> {
        let head = format!("worker {} batch {k} received ", self.name);
        self.seen
            .iter()
            .rev()
            .find_map(|l| l.strip_prefix(&head))
            .map(|ids| ids.split(' ').map(str::to_owned).collect())
            .unwrap_or_default()
    }

    /// How many results the worker printed it sent, over all its batches.
    fn results_sent(&self) -> usize {
        let head = format!("worker {} batch ", self.name);
        self.seen
            .iter()
            .filter_map(|l| l.strip_prefix(&head))
            .filter_map(|rest| rest.split_once(" sent "))
            .filter_map(|(_, n)| n.strip_suffix(" results"))
            .map(|n| n.parse::<usize>().expect("a count"))
            .sum()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Produces [`INPUTS`]; worker A fails its batch [`FAIL_BATCH`] and stalls on its batch
/// [`STALL_BATCH`] after sending its results; A is SIGKILLed, B starts, and every input's
/// result arrives. `duplicates_are_exactly_the_killed_batch`: whether only the killed
/// batch's results may come twice (RabbitMQ acks at once); on Kafka, acks are committed
/// every `commit_interval`, so a batch acked just before the kill may come back too.
fn nothing_lost(url: &str, duplicates_are_exactly_the_killed_batch: bool) {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(90);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let layer = rt
        .block_on(chanlayer::connect(url))
        .unwrap_or_else(|e| panic!("is the broker running? ./scripts/test starts it: {e}"));

    let mut producer = Proc::start(
        url,
        "producer",
        &["produce", "--count", &INPUTS.to_string()],
    );
    let status = producer.wait_exit(deadline);
    assert!(status.success(), "produce: {status}: {:?}", producer.seen);

    let (fail, stall) = (FAIL_BATCH.to_string(), STALL_BATCH.to_string());
    let worker = |name: &str, extra: &[&str]| {
        let mut args = vec![
            "work",
            "--name",
            name,
            "--batch",
            BATCH,
            "--timeout-ms",
            "200",
        ];
        args.extend_from_slice(extra);
        Proc::start(url, name, &args)
    };
    let mut a = worker("A", &["--fail-batch", &fail, "--stall-after", &stall]);
    a.wait_for(
        &format!("worker A stalled in batch {STALL_BATCH} (results sent, not acked)"),
        deadline,
    );
    let killed_at = Instant::now();
    a.child.kill().expect("SIGKILL worker A");
    a.child.wait().expect("wait for worker A");
    while let Ok(line) = a.lines.recv_timeout(Duration::from_secs(5)) {
        a.seen.push(line);
    }
    let failed = a.batch(FAIL_BATCH);
    let killed = a.batch(STALL_BATCH);
    assert!(!failed.is_empty() && !killed.is_empty(), "{:?}", a.seen);
    assert!(
        a.seen.iter().any(|l| l.contains(&format!(
            "batch {FAIL_BATCH} failed: simulated failure of batch {FAIL_BATCH}; nacked"
        ))),
        "{:?}",
        a.seen
    );
    // The failed batch came back whole: A received each of its inputs again.
    let again: BTreeSet<String> = (FAIL_BATCH + 1..=STALL_BATCH)
        .flat_map(|k| a.batch(k))
        .collect();
    let a_done: BTreeSet<String> = (1..=STALL_BATCH).flat_map(|k| a.batch(k)).collect();
    let sent_by_a = a.results_sent();

    let mut b = worker("B", &[]);
    let mut seen: HashMap<String, u32> = HashMap::new();
    let mut received = 0usize;
    let mut first_from_b = None;
    let mut take = |o: chanlayer::Message, seen: &mut HashMap<String, u32>| {
        let refs = o.headers().get("refs").cloned();
        let out: Output = o.decode().expect("a result");
        let n = out.input.strip_prefix("in-").expect("an input id");
        assert_eq!(out.id, format!("{}.result", out.input));
        assert_eq!(
            refs.as_deref(),
            Some(format!(r#"["src-{n}","in-{n}"]"#).as_str()),
            "refs of {}",
            out.id
        );
        if out.worker == "B" && first_from_b.is_none() {
            first_from_b = Some(killed_at.elapsed());
        }
        *seen.entry(out.input).or_default() += 1;
    };
    let receive = |wait: Duration| {
        rt.block_on(async {
            tokio::time::timeout(wait, layer.receive("outputs"))
                .await
                .ok()
                .map(|r| r.expect("receive a result"))
        })
    };
    while (seen.len() as u64) < INPUTS {
        assert!(
            Instant::now() < deadline,
            "only {} of {INPUTS} inputs have a result in time",
            seen.len()
        );
        b.read();
        if let Some(o) = receive(Duration::from_millis(200)) {
            received += 1;
            take(o, &mut seen);
        }
    }
    let status = Command::new("kill")
        .args(["-TERM", &b.child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let status = b.wait_exit(deadline);
    assert!(status.success(), "worker B: {status}: {:?}", b.seen);
    let sent = sent_by_a + b.results_sent();
    // Results sent and not yet read: wait for as many as the workers say they sent.
    while received < sent {
        let left = deadline.saturating_duration_since(Instant::now());
        let o = receive(left).expect("a result the workers sent");
        received += 1;
        take(o, &mut seen);
    }
    rt.block_on(layer.close()).expect("close");

    assert_eq!(seen.len() as u64, INPUTS, "lost inputs");
    assert!(
        failed.is_subset(&again),
        "the failed batch did not come back whole: {failed:?} vs {again:?}"
    );
    let twice: BTreeSet<String> = seen
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(id, _)| id.clone())
        .collect();
    assert!(
        seen.values().all(|n| *n <= 2),
        "a result came more than twice: {seen:?}"
    );
    assert!(
        killed.is_subset(&twice),
        "the killed batch's results were sent by A and must come again from B: {killed:?} vs {twice:?}"
    );
    assert!(
        twice.is_subset(&a_done),
        "duplicates of inputs A never handled: {twice:?}"
    );
    let extra: BTreeSet<_> = twice.difference(&killed).collect();
    // Which of A's committed batches the other duplicates were in.
    let extra_by_batch: Vec<String> = (1..STALL_BATCH)
        .filter(|k| *k != FAIL_BATCH)
        .map(|k| (k, a.batch(k)))
        .filter(|(_, ids)| extra.iter().any(|id| ids.contains(*id)))
        .map(|(k, ids)| {
            let n = extra.iter().filter(|id| ids.contains(**id)).count();
            format!("{n} of batch {k} ({} inputs)", ids.len())
        })
        .collect();
    if duplicates_are_exactly_the_killed_batch {
        assert!(
            extra.is_empty(),
            "duplicates beyond the killed batch: {extra:?}"
        );
    }
    println!(
        "{INPUTS} inputs, 0 lost; failed batch of {} came back whole; killed batch of {} resent by B ({} duplicates in all, {} beyond the killed batch: {extra_by_batch:?}); first result from B {:.1} s after the kill; {:.1} s in all",
        failed.len(),
        killed.len(),
        twice.len(),
        extra.len(),
        first_from_b.map_or(f64::NAN, |d| d.as_secs_f64()),
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn kafka_a_worker_killed_mid_batch_loses_nothing() {
    // session_timeout=6s (the broker's minimum): how soon the killed worker's partitions
    // move to B. Two partitions: one per worker.
    let url = format!(
        "kafka://{}?codec=json&partitions=2&session_timeout=6s&prefix={}",
        env_or("CHANLAYER_KAFKA_BOOTSTRAP", "127.0.0.1:9092"),
        prefix()
    );
    nothing_lost(&url, false);
}

#[test]
fn amqp_a_worker_killed_mid_batch_loses_nothing() {
    // Test queues expire ten minutes after their last use; room for every input at once.
    let url = format!(
        "{}?codec=json&capacity=1000&queue_expires=600s&prefix={}",
        env_or(
            "CHANLAYER_AMQP_URL",
            "amqp://guest:guest@127.0.0.1:5672/%2f"
        ),
        prefix()
    );
    nothing_lost(&url, true);
}
