//! The task queue as its users run it: worker processes on one normal channel of a real
//! broker, a third worker joining and the first leaving mid-stream, and every task done
//! exactly once in total. Kafka runs over SASL_SSL with SCRAM-SHA-512, as a kombu deployment
//! configures it (the test user and CA of `scripts/brokers/kafka.sh`); RabbitMQ over plain
//! AMQP. Each test needs its broker running (`./scripts/test` starts them) and fails loudly
//! when it is not.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use example_support::testing::{amqp_url, kafka_sasl_url, unique_prefix, Line, Proc};
use serde::Deserialize;

const TASKS: u64 = 2000;

/// The worker's result, field for field (the default codec, bincode, is not
/// self-describing).
#[derive(Debug, Deserialize)]
struct Done {
    id: u64,
    worker: String,
    #[allow(dead_code)]
    checksum: u64,
}

/// How long each task takes in the tests: long enough that joining and leaving happen
/// while tasks are left.
const TASK_MS: &str = "10";

/// A worker process (`worker NAME`), killed if the test ends without stopping it.
fn start_worker(url: &str, name: &str) -> Proc {
    Proc::start(
        env!("CARGO_BIN_EXE_task_queue"),
        "TASKS_URL",
        url,
        name,
        &["worker", "--name", name, "--task-ms", TASK_MS],
    )
}

/// Whether worker `w` said `worker NAME what` yet (without waiting); panics if it exited.
fn said(w: &mut Proc, what: &str) -> bool {
    let line = format!("worker {} {what}", w.name);
    w.said(&line)
}

/// SIGTERM, then waits (in a thread of its own) for the worker to finish its task, close
/// and exit; the thread returns how many tasks the worker says it did.
fn stop(mut w: Proc) -> std::thread::JoinHandle<u64> {
    w.terminate();
    std::thread::spawn(move || {
        let status = w.wait_exit(Instant::now() + Duration::from_secs(60));
        assert!(status.success(), "worker {} exited with {status}", w.name);
        let prefix = format!("worker {} stopped after ", w.name);
        w.seen
            .iter()
            .filter_map(Line::out)
            .find_map(|l| {
                l.strip_prefix(&prefix)
                    .and_then(|rest| rest.strip_suffix(" tasks"))
                    .and_then(|n| n.parse::<u64>().ok())
            })
            .unwrap_or_else(|| panic!("worker {} did not report its count: {:?}", w.name, w.seen))
    })
}

/// The submitter, as a process of its own: it waits for room when RabbitMQ's channel is
/// full, while the test reads results.
fn submit(url: &str, count: u64) -> Child {
    Command::new(env!("CARGO_BIN_EXE_task_queue"))
        .args(["submit", "--count", &count.to_string()])
        .env("TASKS_URL", url)
        .stdout(Stdio::null())
        .spawn()
        .expect("run submit")
}

/// The stages of [`every_task_once`].
#[derive(Debug, PartialEq)]
enum Stage {
    /// w1 and w2 run; waiting for both to take a task.
    Two,
    /// w3 started; waiting for it to take a task.
    Joining,
    /// w1 was told to stop; the rest run to the end.
    Left,
}

/// Workers w1 and w2 start and each takes tasks; then w3 joins, and once it has taken a
/// task w1 leaves (SIGTERM: it finishes its task and closes). Every task's result arrives,
/// no task's twice, and the workers' own counts add up to the number of tasks.
fn every_task_once(url: &str) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let layer = chanlayer::connect(url)
            .await
            .unwrap_or_else(|e| panic!("is the broker running? ./scripts/test starts it: {e}"));
        let mut running = vec![start_worker(url, "w1"), start_worker(url, "w2")];
        let mut submitter = submit(url, TASKS);
        let mut stopping = Vec::new();
        let mut stage = Stage::Two;
        let mut seen: HashMap<u64, u32> = HashMap::new();
        let mut by_worker: HashMap<String, u64> = HashMap::new();
        let mut received = 0u64;
        let deadline = Instant::now() + Duration::from_secs(240);
        while (seen.len() as u64) < TASKS {
            assert!(
                Instant::now() < deadline,
                "only {} of {TASKS} tasks done in time (stage {stage:?})",
                seen.len()
            );
            match stage {
                Stage::Two if running.iter_mut().all(|w| said(w, "took its first task")) => {
                    running.push(start_worker(url, "w3"));
                    stage = Stage::Joining;
                }
                Stage::Joining if said(&mut running[2], "took its first task") => {
                    stopping.push(stop(running.remove(0)));
                    stage = Stage::Left;
                }
                _ => {
                    for w in &mut running {
                        w.poll();
                    }
                }
            }
            if let Some(status) = submitter.try_wait().expect("submitter") {
                assert!(status.success(), "submit failed: {status}");
            }
            let Ok(done) = tokio::time::timeout(
                Duration::from_millis(200),
                layer.receive_as::<Done>("results"),
            )
            .await
            else {
                continue;
            };
            let done = done.expect("receive a result");
            received += 1;
            *seen.entry(done.id).or_default() += 1;
            *by_worker.entry(done.worker).or_default() += 1;
        }
        assert_eq!(stage, Stage::Left, "all tasks were done before w1 left");
        assert!(submitter.wait().expect("submitter").success());
        stopping.extend(running.drain(..).map(stop));
        let counts: Vec<u64> = stopping
            .into_iter()
            .map(|h| h.join().expect("a worker stopped"))
            .collect();
        let reported: u64 = counts.iter().sum();
        // Results of tasks done twice would still be on their way: wait for as many
        // results as the workers say they did.
        while received < reported {
            let left = deadline.saturating_duration_since(Instant::now());
            let done: Done = tokio::time::timeout(left, layer.receive_as("results"))
                .await
                .expect("a result the workers reported")
                .expect("receive a result");
            received += 1;
            *seen.entry(done.id).or_default() += 1;
        }
        let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
        assert!(twice.is_empty(), "tasks done more than once: {twice:?}");
        assert_eq!(reported, TASKS, "the workers' counts: {counts:?}");
        assert_eq!(seen.len() as u64, TASKS);
        println!("tasks per worker: {by_worker:?}");
        layer.close().await.expect("close");
    });
}

#[test]
fn kafka_sasl_ssl_workers_join_and_leave_and_every_task_is_done_once() {
    every_task_once(&kafka_sasl_url(&unique_prefix("tq"), "&partitions=4"));
}

#[test]
fn amqp_workers_join_and_leave_and_every_task_is_done_once() {
    every_task_once(&amqp_url(&unique_prefix("tq")));
}
