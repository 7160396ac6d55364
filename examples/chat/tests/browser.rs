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

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a server may take to answer `/healthz` with 200.
const READY_WITHIN: Duration = Duration::from_secs(90);
/// How long the browser script may run in all.
const BROWSER_WITHIN: Duration = Duration::from_secs(240);

/// A child process killed (SIGKILL) and reaped when dropped, on every exit path.
struct KillOnDrop {
    child: Child,
}

impl KillOnDrop {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the process to exit, polling, up to `limit`.
    fn exit_within(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// A running `chat` server.
struct Server {
    process: KillOnDrop,
    base: String,
    log: PathBuf,
}

fn artifacts() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"));
    let dir = target.join("chat-artifacts");
    std::fs::create_dir_all(&dir).expect("create the artifacts directory");
    dir
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("workspace root")
}

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("browser")
}

/// A prefix of this run's own: no two runs share queues, topics or groups.
fn run_prefix(backend: &str) -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    format!("chat{backend}{:012x}", h.finish() & 0xffff_ffff_ffff)
}

/// Fails (loudly, with the fix) when the browser side is not installed.
fn require_browser() -> PathBuf {
    let chromium = std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    let fix = "run scripts/browsers/chromium.sh (installs Debian's chromium and the browser test's node_modules)";
    assert!(
        chromium.exists(),
        "Chromium not found at {} (set CHROMIUM to use another); {fix}",
        chromium.display()
    );
    let node = Command::new("node").arg("--version").output();
    assert!(
        matches!(&node, Ok(out) if out.status.success()),
        "node not found on PATH; install Node.js 20 or later (Debian: apt-get install nodejs npm), then {fix}"
    );
    assert!(
        browser_dir()
            .join("node_modules/playwright-core/package.json")
            .exists(),
        "{}/node_modules/playwright-core is missing; {fix}",
        browser_dir().display()
    );
    chromium
}

/// Fails (loudly, with the fix) when nothing listens on `port`.
fn require_broker(name: &str, port: u16, script: &str) {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    assert!(
        TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok(),
        "{name} is not listening on 127.0.0.1:{port}; start it with {script} (./scripts/test does)"
    );
}

/// `GET path` on 127.0.0.1:port; the status code, or None when the server does not answer.
fn http_status(base: &str, path: &str) -> Option<u16> {
    let host = base.strip_prefix("http://")?;
    let mut stream = TcpStream::connect(host).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    response.split_whitespace().nth(1)?.parse().ok()
}

fn start_server(url: &str, label: &str, backend: &str) -> Server {
    let log = artifacts().join(format!("{backend}-server-{label}.log"));
    let stderr = std::fs::File::create(&log).expect("create the server log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_chat"))
        .args(["--port", "0", "--url", url, "--log", "debug"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("start chat");
    let stdout = child.stdout.take().expect("chat's stdout");
    let process = KillOnDrop { child };
    // The first stdout line says where it listens; read it on a thread, with a deadline.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        if let Some(Ok(line)) = lines.next() {
            let _ = tx.send(line);
        }
        // Keep reading so the server never blocks on a full pipe.
        for _ in lines {}
    });
    let line = rx.recv_timeout(READY_WITHIN).unwrap_or_else(|_| {
        panic!(
            "chat {label} did not say where it listens within {READY_WITHIN:?}; its log: {}\n{}",
            log.display(),
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    });
    let base = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("chat {label} said {line:?}"))
        .to_owned();
    let server = Server { process, base, log };
    wait_healthy(&server, label);
    server
}

/// Polls `/healthz` until 200, with a deadline.
fn wait_healthy(server: &Server, label: &str) {
    let deadline = Instant::now() + READY_WITHIN;
    let mut delay = Duration::from_millis(20);
    loop {
        if http_status(&server.base, "/healthz") == Some(200) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "chat {label} at {} was not healthy within {READY_WITHIN:?}; its log: {}\n{}",
            server.base,
            server.log.display(),
            std::fs::read_to_string(&server.log).unwrap_or_default()
        );
        std::thread::sleep(delay);
        delay = (delay * 2).min(Duration::from_millis(500));
    }
}

/// Runs the browser script against `a` (and `b`, which it kills); panics unless it passes.
/// The script ends by stopping `a` with SIGTERM; `a` must then exit with status 0.
fn run_browser(backend: &str, a: &mut Server, b: Option<&Server>) {
    let chromium = require_browser();
    let mut args: Vec<String> = vec![
        "chat.test.mjs".into(),
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
    let out_path = artifacts().join(format!("{backend}-browser.log"));
    let out = std::fs::File::create(&out_path).expect("create the browser log");
    let mut node = KillOnDrop {
        child: Command::new("node")
            .args(&args)
            .current_dir(browser_dir())
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log handle"))
            .stderr(out)
            .spawn()
            .expect("start node"),
    };
    let status = loop {
        if let Some(status) = node.child.try_wait().expect("wait for node") {
            break Some(status);
        }
        if started.elapsed() > BROWSER_WITHIN {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let output = std::fs::read_to_string(&out_path).unwrap_or_default();
    println!("{output}");
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
