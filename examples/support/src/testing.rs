//! What the examples' integration tests share: settings from the environment, broker URLs
//! with a unique prefix, and [`Proc`], the example's binary run as a child process whose
//! output the test reads line by line.
//!
//! These helpers panic (with what the process printed) rather than return errors: they are
//! for tests.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The environment variable `key`, or `default` when it is not set.
pub fn env_or(key: &str, default: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| default.to_owned())
}

/// Percent-encodes a query value (everything but RFC 3986's unreserved characters).
pub fn enc(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A prefix no other test run uses: `tag` and 12 random hex digits.
pub fn unique_prefix(tag: &str) -> String {
    format!("{tag}{:012x}", rand::random::<u64>() >> 16)
}

/// The RabbitMQ URL for `prefix` (`CHANLAYER_AMQP_URL`, by default the local broker);
/// its test queues expire ten minutes after their last use. Append more options with `&`.
pub fn amqp_url(prefix: &str) -> String {
    format!(
        "{}?queue_expires=600s&prefix={prefix}",
        env_or(
            "CHANLAYER_AMQP_URL",
            "amqp://guest:guest@127.0.0.1:5672/%2f"
        )
    )
}

/// The plain Kafka URL for `prefix` (`CHANLAYER_KAFKA_BOOTSTRAP`, by default
/// `127.0.0.1:9092`), followed by `extra` (options, each starting with `&`).
pub fn kafka_url(prefix: &str, extra: &str) -> String {
    format!(
        "kafka://{}?prefix={prefix}{extra}",
        env_or("CHANLAYER_KAFKA_BOOTSTRAP", "127.0.0.1:9092")
    )
}

/// The Kafka URL on SASL_SSL with SCRAM-SHA-512 for `prefix`, as a kombu deployment
/// configures it, followed by `extra` (options, each starting with `&`). The broker,
/// user, password and CA come from `KAFKA_SASL_BOOTSTRAP` (`127.0.0.1:9094`),
/// `KAFKA_SASL_USERNAME`, `KAFKA_SASL_PASSWORD` and `KAFKA_CA_FILE` (by default
/// `ca_certificate.pem` in `CHANLAYER_TLS_DIR`): the test user and CA of
/// `scripts/brokers/kafka.sh`.
pub fn kafka_sasl_url(prefix: &str, extra: &str) -> String {
    let ca = env_or(
        "KAFKA_CA_FILE",
        &format!(
            "{}/ca_certificate.pem",
            env_or("CHANLAYER_TLS_DIR", "/var/lib/chanlayer-tests/tls")
        ),
    );
    format!(
        "kafka://{}?security.protocol=SASL_SSL&sasl.mechanism=SCRAM-SHA-512&username={}&password={}&ca_file={}&prefix={prefix}{extra}",
        env_or("KAFKA_SASL_BOOTSTRAP", "127.0.0.1:9094"),
        enc(&env_or("KAFKA_SASL_USERNAME", "chanlayer")),
        enc(&env_or("KAFKA_SASL_PASSWORD", "chanlayer-test-secret")),
        enc(&ca),
    )
}

/// A line a process printed, on stdout or stderr.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    /// A line on stdout.
    Out(String),
    /// A line on stderr.
    Err(String),
}

impl Line {
    /// The line's text, whichever stream it came on.
    pub fn text(&self) -> &str {
        match self {
            Line::Out(s) | Line::Err(s) => s,
        }
    }

    /// The line's text if it came on stdout.
    pub fn out(&self) -> Option<&str> {
        match self {
            Line::Out(s) => Some(s),
            Line::Err(_) => None,
        }
    }

    /// The line's text if it came on stderr.
    pub fn err(&self) -> Option<&str> {
        match self {
            Line::Err(s) => Some(s),
            Line::Out(_) => None,
        }
    }
}

/// Sends each line `from` gives to `tx`, from a thread of its own.
fn forward<R: Read + Send + 'static>(from: R, tx: mpsc::Sender<Line>, wrap: fn(String) -> Line) {
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines().map_while(Result::ok) {
            if tx.send(wrap(line)).is_err() {
                break;
            }
        }
    });
}

/// An example's process, its stdout and stderr read line by line into [`Proc::seen`];
/// killed (SIGKILL) if the test drops it without stopping it.
pub struct Proc {
    /// What the test calls it, in panic messages.
    pub name: String,
    /// The lines read so far, stdout and stderr in the order they were read.
    pub seen: Vec<Line>,
    child: Child,
    lines: mpsc::Receiver<Line>,
}

impl Proc {
    /// Starts `bin` (`env!("CARGO_BIN_EXE_...")`) with `args`, the URL in the environment
    /// variable `url_var` (not an argument: it may hold a password); panics if it cannot.
    pub fn start(bin: &str, url_var: &str, url: &str, name: &str, args: &[&str]) -> Proc {
        let mut child = Command::new(bin)
            .args(args)
            .env(url_var, url)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start {name} ({bin}): {e}"));
        let (tx, lines) = mpsc::channel();
        forward(child.stdout.take().expect("stdout"), tx.clone(), Line::Out);
        forward(child.stderr.take().expect("stderr"), tx, Line::Err);
        Proc {
            name: name.to_owned(),
            seen: Vec::new(),
            child,
            lines,
        }
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The exit status if the process has exited (without waiting).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Reads what the process printed, waiting up to `wait` for a first line.
    pub fn read(&mut self, wait: Duration) {
        if let Ok(line) = self.lines.recv_timeout(wait) {
            self.seen.push(line);
        }
        while let Ok(line) = self.lines.try_recv() {
            self.seen.push(line);
        }
    }

    /// Reads what the process printed so far, without waiting; panics if it exited.
    pub fn poll(&mut self) {
        while let Ok(line) = self.lines.try_recv() {
            self.seen.push(line);
        }
        if let Some(status) = self.exited() {
            panic!("{} exited early ({status}): {:?}", self.name, self.seen);
        }
    }

    /// Whether the process printed `line` on stdout yet ([`Proc::poll`]: without waiting,
    /// and panics if it exited).
    pub fn said(&mut self, line: &str) -> bool {
        self.poll();
        self.printed(line)
    }

    /// Whether `line` is among the stdout lines read so far.
    fn printed(&self, line: &str) -> bool {
        self.seen.iter().any(|l| l.out() == Some(line))
    }

    /// Polls until the process printed `line` on stdout; panics at the deadline or if it
    /// exited.
    pub fn wait_for(&mut self, line: &str, deadline: Instant) {
        while !self.said(line) {
            assert!(
                Instant::now() < deadline,
                "{} did not say {line:?} in time: {:?}",
                self.name,
                self.seen
            );
            self.read(Duration::from_millis(100));
        }
    }

    /// Waits for the process to exit, its output read to the end; panics at the deadline.
    pub fn wait_exit(&mut self, deadline: Instant) -> ExitStatus {
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                self.drain(deadline);
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit in time: {:?}",
                self.name,
                self.seen
            );
            self.read(Duration::from_millis(100));
        }
    }

    /// Reads what is left once the process exited (its pipes close), until `deadline`.
    fn drain(&mut self, deadline: Instant) {
        while let Ok(line) = self
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            self.seen.push(line);
        }
    }

    /// Sends SIGTERM (an example stops taking work, closes and prints its counts); panics
    /// if `kill` fails.
    pub fn terminate(&self) {
        let pid = self.child.id().to_string();
        let status = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM {pid} ({})", self.name);
    }

    /// SIGTERM, then [`Proc::wait_exit`]: the exit status, the output read to the end.
    pub fn stop(&mut self, deadline: Instant) -> ExitStatus {
        self.terminate();
        self.wait_exit(deadline)
    }

    /// SIGKILL, then waits for the process; what it printed is read to the end (or for at
    /// most 5 seconds).
    pub fn kill(&mut self) -> ExitStatus {
        self.child
            .kill()
            .unwrap_or_else(|e| panic!("SIGKILL {}: {e}", self.name));
        let status = self
            .child
            .wait()
            .unwrap_or_else(|e| panic!("wait for {}: {e}", self.name));
        self.drain(Instant::now() + Duration::from_secs(5));
        status
    }

    /// The text of every line read so far, stdout and stderr.
    pub fn lines(&self) -> impl Iterator<Item = &str> {
        self.seen.iter().map(Line::text)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enc_keeps_unreserved_characters_only() {
        assert_eq!(enc("a-Z_0.~"), "a-Z_0.~");
        assert_eq!(enc("p@ss/w rd"), "p%40ss%2Fw%20rd");
    }

    #[test]
    fn unique_prefix_is_tagged_and_unique() {
        let (a, b) = (unique_prefix("tq"), unique_prefix("tq"));
        assert!(a.starts_with("tq") && a.len() == 14, "{a}");
        assert_ne!(a, b);
    }

    #[test]
    fn urls_end_with_prefix_and_extra() {
        assert!(kafka_url("p", "&partitions=2").ends_with("?prefix=p&partitions=2"));
        assert!(kafka_sasl_url("p", "&partitions=4").ends_with("&prefix=p&partitions=4"));
        assert!(amqp_url("p").ends_with("?queue_expires=600s&prefix=p"));
    }

    #[cfg(unix)]
    #[test]
    fn proc_reads_both_streams_and_stops() {
        let deadline = Instant::now() + Duration::from_secs(10);
        // The trap first: a SIGTERM right after "ready" must find it set. The stderr line
        // before "ready": a SIGTERM right after "ready" runs the trap before any later line.
        let script =
            "trap 'echo bye; exit 3' TERM; echo oops >&2; echo ready; while :; do sleep 0.05; done";
        let mut p = Proc::start("sh", "URL", "x", "sh", &["-c", script]);
        p.wait_for("ready", deadline);
        assert!(p.said("ready"));
        assert!(!p.said("oops"), "stderr lines are not stdout's");
        let status = p.stop(deadline);
        assert_eq!(status.code(), Some(3));
        assert!(p.seen.contains(&Line::Err("oops".into())), "{:?}", p.seen);
        assert!(p.lines().any(|l| l == "bye"), "{:?}", p.seen);
    }

    #[cfg(unix)]
    #[test]
    fn proc_kill() {
        let mut p = Proc::start("sleep", "URL", "x", "sleep", &["30"]);
        assert!(p.exited().is_none());
        assert!(!p.kill().success());
    }
}
