//! The batch worker as its users run it: processes on a real broker (Kafka, RabbitMQ).
//! Inputs are produced; worker A fails one batch (it comes back whole) and stalls on a later
//! one after sending its results, before the ack; A is SIGKILLed there and worker B takes
//! over. Every input's result arrives with its `refs` lineage; the only duplicates are
//! results A sent and did not commit; nothing is lost. Each test needs its broker running
//! (`./scripts/test` starts them) and fails loudly when it is not.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use example_support::testing::{amqp_url, kafka_url, unique_prefix, Proc};
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

fn prefix() -> String {
    unique_prefix("bw")
}

/// A `batch_worker` process with `args`, its output (stderr included) read line by line;
/// killed if the test ends without stopping it.
fn start(url: &str, name: &str, args: &[&str]) -> Proc {
    Proc::start(
        env!("CARGO_BIN_EXE_batch_worker"),
        "BATCH_URL",
        url,
        name,
        args,
    )
}

/// The ids worker `p` printed for its batch `k` (the last time it printed one).
fn batch(p: &Proc, k: u64) -> BTreeSet<String> {
    let head = format!("worker {} batch {k} received ", p.name);
    p.seen
        .iter()
        .rev()
        .find_map(|l| l.text().strip_prefix(&head))
        .map(|ids| ids.split(' ').map(str::to_owned).collect())
        .unwrap_or_default()
}

/// How many results worker `p` printed it sent, over all its batches.
fn results_sent(p: &Proc) -> usize {
    let head = format!("worker {} batch ", p.name);
    p.lines()
        .filter_map(|l| l.strip_prefix(&head))
        .filter_map(|rest| rest.split_once(" sent "))
        .filter_map(|(_, n)| n.strip_suffix(" results"))
        .map(|n| n.parse::<usize>().expect("a count"))
        .sum()
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

    let mut producer = start(
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
        start(url, name, &args)
    };
    let mut a = worker("A", &["--fail-batch", &fail, "--stall-after", &stall]);
    a.wait_for(
        &format!("worker A stalled in batch {STALL_BATCH} (results sent, not acked)"),
        deadline,
    );
    let killed_at = Instant::now();
    a.kill();
    let failed = batch(&a, FAIL_BATCH);
    let killed = batch(&a, STALL_BATCH);
    assert!(!failed.is_empty() && !killed.is_empty(), "{:?}", a.seen);
    assert!(
        a.lines().any(|l| l.contains(&format!(
            "batch {FAIL_BATCH} failed: simulated failure of batch {FAIL_BATCH}; nacked"
        ))),
        "{:?}",
        a.seen
    );
    // The failed batch came back whole: A received each of its inputs again.
    let again: BTreeSet<String> = (FAIL_BATCH + 1..=STALL_BATCH)
        .flat_map(|k| batch(&a, k))
        .collect();
    let a_done: BTreeSet<String> = (1..=STALL_BATCH).flat_map(|k| batch(&a, k)).collect();
    let sent_by_a = results_sent(&a);

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
        b.poll();
        if let Some(o) = receive(Duration::from_millis(200)) {
            received += 1;
            take(o, &mut seen);
        }
    }
    let status = b.stop(deadline);
    assert!(status.success(), "worker B: {status}: {:?}", b.seen);
    let sent = sent_by_a + results_sent(&b);
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
        .map(|k| (k, batch(&a, k)))
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
    let url = kafka_url(&prefix(), "&codec=json&partitions=2&session_timeout=6s");
    nothing_lost(&url, false);
}

#[test]
fn amqp_a_worker_killed_mid_batch_loses_nothing() {
    // Room for every input at once.
    let url = format!("{}&codec=json&capacity=1000", amqp_url(&prefix()));
    nothing_lost(&url, true);
}
