//! Apache Kafka nodes of a test's own, started through `scripts/brokers/kafka.sh nodes` (the
//! same script and settings a user runs), in a temporary directory on free loopback ports:
//! for the tests that kill, freeze and restart brokers, which must not disturb the shared
//! broker of the other tests.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// `scripts/brokers/kafka.sh` of this checkout.
fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/brokers/kafka.sh")
}

/// Runs `kafka.sh ARGS...`; panics with its output if it fails.
fn run_script(args: &[&str]) {
    let out = Command::new("bash")
        .arg(script())
        .args(args)
        .output()
        .expect("bash runs scripts/brokers/kafka.sh");
    assert!(
        out.status.success(),
        "kafka.sh {} failed: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn port_free(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// `count` KRaft nodes (all voters) in a temporary directory; stopped and removed when
/// dropped.
pub struct KafkaNodes {
    dir: PathBuf,
    base: u16,
    count: u16,
}

impl KafkaNodes {
    /// Formats and starts `count` nodes and waits until every one answers. Panics with the
    /// script's output if they do not start (Java and the broker's jars come from
    /// `scripts/brokers/kafka.sh`, which fetches them when missing).
    pub fn start(count: u16) -> KafkaNodes {
        let base = loop {
            let base = 20_000 + (rand::random::<u16>() % 20_000);
            if (0..count).all(|i| port_free(base + i) && port_free(base + 100 + i)) {
                break base;
            }
        };
        let dir = std::env::temp_dir().join(format!("chanlayer-kafka-{}", rand::random::<u64>()));
        let nodes = KafkaNodes { dir, base, count };
        run_script(&[
            "nodes",
            &nodes.dir.to_string_lossy(),
            &base.to_string(),
            &count.to_string(),
        ]);
        nodes
    }

    /// `127.0.0.1:P1,127.0.0.1:P2,...`
    pub fn bootstrap(&self) -> String {
        (0..self.count)
            .map(|i| format!("127.0.0.1:{}", self.base + i))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The PLAINTEXT port of node `id` (1-based, as Kafka's `node.id`).
    pub fn port(&self, id: u16) -> u16 {
        self.base + id - 1
    }

    /// The pid of node `id`'s JVM.
    pub fn pid(&self, id: u16) -> u32 {
        let f = self.dir.join(format!("n{id}/pid"));
        std::fs::read_to_string(&f)
            .unwrap_or_else(|e| panic!("{}: {e}", f.display()))
            .trim()
            .parse()
            .expect("a pid")
    }

    /// Sends `sig` (`KILL`, `STOP`, `CONT`) to node `id`.
    pub fn signal(&self, id: u16, sig: &str) {
        signal(self.pid(id), sig);
    }

    /// SIGKILLs node `id` (no shutdown, like a crash) and waits until the process is gone.
    pub fn kill(&self, id: u16) {
        let pid = self.pid(id);
        signal(pid, "KILL");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while Path::new(&format!("/proc/{pid}")).exists() && !is_zombie(pid) {
            assert!(
                std::time::Instant::now() < deadline,
                "node {id} ({pid}) still runs"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts node `id` again on its log directory and waits until it answers.
    pub fn restart(&self, id: u16) {
        run_script(&["start", &self.dir.to_string_lossy(), &id.to_string()]);
    }

    /// Node `id`'s log file.
    pub fn log(&self, id: u16) -> PathBuf {
        self.dir.join(format!("n{id}/server.log"))
    }
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|r| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

/// `kill -SIG pid`.
pub fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .expect("kill runs")
        .success();
    assert!(ok, "kill -{sig} {pid}");
}

impl Drop for KafkaNodes {
    fn drop(&mut self) {
        // The directory goes with them: no clean shutdown needed (SIGKILL also ends a
        // frozen node).
        for id in 1..=self.count {
            if let Ok(p) = std::fs::read_to_string(self.dir.join(format!("n{id}/pid"))) {
                let _ = Command::new("kill")
                    .args(["-KILL", p.trim()])
                    .stderr(std::process::Stdio::null())
                    .status();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
