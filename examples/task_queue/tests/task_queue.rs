//! The task queue as its users run it: worker processes on one normal channel of a real
//! broker, a third worker joining and the first leaving mid-stream, and every task done
//! exactly once in total. Kafka runs over SASL_SSL with SCRAM-SHA-512, as a kombu deployment
//! configures it (the test user and CA of `scripts/brokers/kafka.sh`); RabbitMQ over plain
//! AMQP. Each test needs its broker running (`./scripts/test` starts them) and fails loudly
//! when it is not.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

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

fn env_or(key: &str, default: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| default.to_owned())
}

/// Percent-encodes a query value.
fn enc(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn prefix() -> String {
    format!("tq{:012x}", rand::random::<u64>() >> 16)
}

/// How long each task takes in the tests: long enough that joining and leaving happen
/// while tasks are left.
const TASK_MS: &str = "10";

/// A worker process, killed if the test ends without stopping it.
struct Worker {
    name: String,
    child: Child,
    lines: mpsc::Receiver<String>,
    /// The lines read so far.
    seen: Vec<String>,
}

impl Worker {
    fn start(url: &str, name: &str) -> Worker {
        let mut child = Command::new(env!("CARGO_BIN_EXE_task_queue"))
            .args(["worker", "--name", name, "--task-ms", TASK_MS])
            .env("TASKS_URL", url)
            .stdout(Stdio::piped())
            .spawn()
            .expect("start a worker");
        let stdout = child.stdout.take().expect("worker stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Worker {
            name: name.to_owned(),
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Whether the worker said `what` yet (reads what it printed without waiting); panics
    /// if it exited.
    fn said(&mut self, what: &str) -> bool {
        while let Ok(line) = self.lines.try_recv() {
            self.seen.push(line);
        }
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "worker {} exited early ({status}): {:?}",
                self.name, self.seen
            );
        }
        let line = format!("worker {} {what}", self.name);
        self.seen.contains(&line)
    }

    /// SIGTERM, then waits (in a thread of its own) for the worker to finish its task, close
    /// and exit; the thread returns how many tasks the worker says it did.
    fn stop(mut self) -> std::thread::JoinHandle<u64> {
        let pid = self.child.id().to_string();
        let status = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill");
        assert!(status.success(), "kill -TERM {pid}");
        std::thread::spawn(move || {
            let prefix = format!("worker {} stopped after ", self.name);
            let count = |l: &String| {
                l.strip_prefix(&prefix)
                    .and_then(|rest| rest.strip_suffix(" tasks"))
                    .and_then(|n| n.parse::<u64>().ok())
            };
            let mut done = self.seen.iter().find_map(count);
            let deadline = Instant::now() + Duration::from_secs(60);
            while done.is_none() && Instant::now() < deadline {
                match self.lines.recv_timeout(Duration::from_millis(200)) {
                    Ok(line) => done = count(&line),
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            }
            let status = self.child.wait().expect("wait for the worker");
            assert!(
                status.success(),
                "worker {} exited with {status}",
                self.name
            );
            done.unwrap_or_else(|| panic!("worker {} did not report its count", self.name))
        })
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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
        let mut running = vec![Worker::start(url, "w1"), Worker::start(url, "w2")];
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
                Stage::Two if running.iter_mut().all(|w| w.said("took its first task")) => {
                    running.push(Worker::start(url, "w3"));
                    stage = Stage::Joining;
                }
                Stage::Joining if running[2].said("took its first task") => {
                    stopping.push(running.remove(0).stop());
                    stage = Stage::Left;
                }
                _ => {
                    for w in &mut running {
                        w.said("");
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
        stopping.extend(running.drain(..).map(Worker::stop));
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
    let ca = env_or(
        "KAFKA_CA_FILE",
        &format!(
            "{}/ca_certificate.pem",
            env_or("CHANLAYER_TLS_DIR", "/var/lib/chanlayer-tests/tls")
        ),
    );
    let url = format!(
        "kafka://{}?security.protocol=SASL_SSL&sasl.mechanism=SCRAM-SHA-512&username={}&password={}&ca_file={}&partitions=4&prefix={}",
        env_or("KAFKA_SASL_BOOTSTRAP", "127.0.0.1:9094"),
        enc(&env_or("KAFKA_SASL_USERNAME", "chanlayer")),
        enc(&env_or("KAFKA_SASL_PASSWORD", "chanlayer-test-secret")),
        enc(&ca),
        prefix()
    );
    every_task_once(&url);
}

#[test]
fn amqp_workers_join_and_leave_and_every_task_is_done_once() {
    // Test queues expire ten minutes after their last use.
    let url = format!(
        "{}?queue_expires=600s&prefix={}",
        env_or(
            "CHANLAYER_AMQP_URL",
            "amqp://guest:guest@127.0.0.1:5672/%2f"
        ),
        prefix()
    );
    every_task_once(&url);
}
