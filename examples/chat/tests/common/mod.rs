//! Helpers the chat example's integration tests share: server processes that are killed on
//! every exit path, readiness by `/healthz` with a deadline, `/stats`, the artifacts folder.

#![allow(dead_code)] // each test file uses its own subset

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a server may take to answer `/healthz` with 200.
pub const READY_WITHIN: Duration = Duration::from_secs(90);
/// How long the browser script may run in all.
pub const BROWSER_WITHIN: Duration = Duration::from_secs(240);

/// A child process killed (SIGKILL) and reaped when dropped, on every exit path.
pub struct KillOnDrop {
    pub child: Child,
}

impl KillOnDrop {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the process to exit, polling, up to `limit`.
    pub fn exit_within(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
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
pub struct Server {
    pub process: KillOnDrop,
    pub base: String,
    pub log: PathBuf,
}

pub fn artifacts() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"));
    let dir = target.join("chat-artifacts");
    std::fs::create_dir_all(&dir).expect("create the artifacts directory");
    dir
}

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("workspace root")
}

pub fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("browser")
}

/// A prefix of this run's own: no two runs share queues, topics or groups.
pub fn run_prefix(backend: &str) -> String {
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
pub fn require_browser() -> PathBuf {
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
pub fn require_broker(name: &str, port: u16, script: &str) {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    assert!(
        TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok(),
        "{name} is not listening on 127.0.0.1:{port}; start it with {script} (./scripts/test does)"
    );
}

/// `GET path` on 127.0.0.1:port: the whole response, or None when the server does not
/// answer.
fn http_get(base: &str, path: &str) -> Option<String> {
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
    Some(response)
}

/// `GET path`'s status code, or None when the server does not answer.
pub fn http_status(base: &str, path: &str) -> Option<u16> {
    http_get(base, path)?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

pub fn start_server(url: &str, label: &str, backend: &str) -> Server {
    start_server_with(url, label, backend, &[])
}

/// Starts `chat` with extra arguments, and waits until it is healthy.
pub fn start_server_with(url: &str, label: &str, backend: &str, extra: &[&str]) -> Server {
    let log = artifacts().join(format!("{backend}-server-{label}.log"));
    let stderr = std::fs::File::create(&log).expect("create the server log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_chat"))
        .args(["--port", "0", "--url", url, "--log", "debug"])
        .args(extra)
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
pub fn wait_healthy(server: &Server, label: &str) {
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

/// `GET path`'s body, or None when the server does not answer.
pub fn http_body(base: &str, path: &str) -> Option<String> {
    Some(http_get(base, path)?.split_once("\r\n\r\n")?.1.to_owned())
}

/// Runs `node SCRIPT ARGS...` in the browser folder, its output (stdout and stderr) into
/// `artifacts()/LOG`, for at most [`BROWSER_WITHIN`]; returns its exit status (None when it
/// did not finish in time: it is then killed) and its output, which is also printed.
pub fn run_node(
    script: &str,
    args: &[String],
    log: &str,
) -> (Option<std::process::ExitStatus>, String) {
    let started = Instant::now();
    let out_path = artifacts().join(log);
    let out = std::fs::File::create(&out_path).expect("create the browser log");
    let mut node = KillOnDrop {
        child: Command::new("node")
            .arg(script)
            .args(args)
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
    (status, output)
}

/// The server's `/stats` counters.
pub fn stats(server: &Server) -> serde_json::Value {
    let body = http_body(&server.base, "/stats").expect("GET /stats");
    serde_json::from_str(&body).expect("/stats is JSON")
}
