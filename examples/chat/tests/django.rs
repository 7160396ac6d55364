//! The chat across Django and Rust (issue 15): the Django example (`examples/chat/django`,
//! Channels on `channels_rabbitmq` 4.0.1, served by Daphne) and the Rust `chat` in
//! `wire=channels_rabbitmq` mode, on one RabbitMQ, share rooms; a page on each, in a real
//! browser, sees the other's lines.
//!
//! The test starts Daphne from the Python venv of `scripts/python/venv.sh`, waits for its
//! `/healthz`, starts `chat` on
//! `amqp://…/%2f?wire=channels_rabbitmq&codec=msgpack&groups_exchange=EXCHANGE` (and Django
//! on the same exchange, through `CHAT_DJANGO_GROUPS_EXCHANGE`; a name of this run's own, so
//! runs never share groups), and runs `browser/django.test.mjs` (see that file for the
//! steps).
//!
//! What it needs, and what happens without it (it fails, with the command that fixes it):
//! - RabbitMQ on 127.0.0.1:5672: `scripts/brokers/rabbitmq.sh`;
//! - Chromium, node and the browser folder's `node_modules`: `scripts/browsers/chromium.sh`;
//! - the venv at `${CHANLAYER_VENV:-$HOME/.cache/chanlayer/venv}` made from
//!   `scripts/python/requirements.txt`: `bash scripts/python/venv.sh`.
//!
//! Screenshots and logs go to `$CARGO_TARGET_DIR/chat-artifacts/` (`django-*`).

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    artifacts, require_broker, require_browser, run_node, run_prefix, start_server_with,
    wait_healthy, workspace, KillOnDrop, Server, BROWSER_WITHIN, READY_WITHIN,
};

const VENV_FIX: &str = "run `bash scripts/python/venv.sh` (it installs the pinned channels_rabbitmq, channels, Django and Daphne into that venv; ./scripts/test runs it)";

/// The venv `scripts/python/venv.sh` makes.
fn venv() -> PathBuf {
    match std::env::var_os("CHANLAYER_VENV") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").expect("HOME is not set"))
            .join(".cache/chanlayer/venv"),
    }
}

/// Fails (loudly, with the fix) unless the venv exists, was made from this checkout's
/// `requirements.txt` and imports the packages; returns its python.
fn require_venv() -> PathBuf {
    let venv = venv();
    let python = venv.join("bin/python");
    assert!(
        python.exists(),
        "no Python venv at {} (set CHANLAYER_VENV to use another); {VENV_FIX}",
        venv.display()
    );
    // The stamp venv.sh writes is the sha256 of the requirements it installed.
    let requirements = workspace().join("scripts/python/requirements.txt");
    let check = Command::new(&python)
        .args([
            "-c",
            "import hashlib, sys, importlib.metadata as m, channels_rabbitmq, daphne, django\n\
             print(hashlib.sha256(open(sys.argv[1], 'rb').read()).hexdigest(), m.version('channels_rabbitmq'))",
        ])
        .arg(&requirements)
        .output()
        .expect("run the venv's python");
    assert!(
        check.status.success(),
        "the venv at {} cannot import channels_rabbitmq, daphne and django: {}; {VENV_FIX}",
        venv.display(),
        String::from_utf8_lossy(&check.stderr).trim()
    );
    let stdout = String::from_utf8_lossy(&check.stdout);
    let (want, version) = stdout.trim().split_once(' ').expect("sha256 and version");
    let stamp =
        std::fs::read_to_string(venv.join(".chanlayer-requirements.sha256")).unwrap_or_default();
    assert_eq!(
        stamp.trim(),
        want,
        "the venv at {} was not made from this checkout's {} (channels_rabbitmq {version} there); {VENV_FIX}",
        venv.display(),
        requirements.display()
    );
    python
}

/// Starts the Django example under Daphne on a free port, on `exchange`; waits for
/// `/healthz`.
fn start_django(python: &Path, exchange: &str, id: &str) -> Server {
    let log = artifacts().join("django-daphne.log");
    let out = std::fs::File::create(&log).expect("create the Daphne log");
    let child = Command::new(python)
        .args(["-m", "daphne", "-b", "127.0.0.1", "-p", "0"])
        .arg("chatsite.asgi:application")
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("django"))
        .env(
            "CHAT_DJANGO_AMQP_URL",
            "amqp://guest:guest@127.0.0.1:5672/%2f",
        )
        .env("CHAT_DJANGO_GROUPS_EXCHANGE", exchange)
        .env("CHAT_SERVER_ID", id)
        .env("PYTHONUNBUFFERED", "1")
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("log handle"))
        .stderr(out)
        .spawn()
        .expect("start Daphne");
    let mut process = KillOnDrop { child };
    // Daphne says "Listening on TCP address 127.0.0.1:PORT" once it listens.
    let deadline = Instant::now() + READY_WITHIN;
    let mut delay = Duration::from_millis(20);
    let port = loop {
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(&log) {
            let _ = f.read_to_string(&mut text);
        }
        if let Some(port) = text
            .lines()
            .find_map(|l| l.split("Listening on TCP address 127.0.0.1:").nth(1))
        {
            break port.trim().to_owned();
        }
        if let Ok(Some(status)) = process.child.try_wait() {
            panic!(
                "Daphne exited ({status}) before listening; its log ({}):\n{text}",
                log.display()
            );
        }
        assert!(
            Instant::now() < deadline,
            "Daphne did not listen within {READY_WITHIN:?}; its log ({}):\n{text}",
            log.display()
        );
        std::thread::sleep(delay);
        delay = (delay * 2).min(Duration::from_millis(250));
    };
    let server = Server {
        process,
        base: format!("http://127.0.0.1:{port}"),
        log,
    };
    wait_healthy(&server, "django (Daphne)");
    server
}

#[test]
fn browser_chat_between_django_and_rust_on_rabbitmq() {
    require_broker("RabbitMQ", 5672, "scripts/brokers/rabbitmq.sh");
    let chromium = require_browser();
    let python = require_venv();
    let started = Instant::now();
    // The groups exchange of this run: Django's and Rust's groups meet there and nowhere else.
    let exchange = run_prefix("django");
    let django = start_django(&python, &exchange, "django");
    let url = format!(
        "amqp://guest:guest@127.0.0.1:5672/%2f?wire=channels_rabbitmq&codec=msgpack&groups_exchange={exchange}"
    );
    let rust = start_server_with(&url, "rust", "django", &["--id", "rust"]);
    println!(
        "django at {} and rust at {} on exchange {exchange}, ready in {:.1} s",
        django.base,
        rust.base,
        started.elapsed().as_secs_f64()
    );

    let args: Vec<String> = [
        "--django",
        &django.base,
        "--rust",
        &rust.base,
        "--artifacts",
        &artifacts().display().to_string(),
        "--chromium",
        &chromium.display().to_string(),
    ]
    .map(String::from)
    .into();
    let (status, output) = run_node("django.test.mjs", &args, "django-browser.log");
    let logs = format!("{}, {}", django.log.display(), rust.log.display());
    match status {
        Some(s) if s.success() => assert!(
            output.contains("PASS django"),
            "the browser script exited 0 without saying PASS:\n{output}"
        ),
        Some(s) => panic!("the browser test failed ({s}); server logs: {logs}\n{output}"),
        None => panic!(
            "the browser test did not finish within {BROWSER_WITHIN:?}; server logs: {logs}\n{output}"
        ),
    }
    println!(
        "django: browser test passed in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}
