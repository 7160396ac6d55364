//! A second OS process for cross-process tests, the same for every backend.
//!
//! A backend's test binary starts *itself* again as the peer: it runs one `#[ignore]`d test,
//! [`PEER_TEST`], with the peer's arguments in the environment variable [`PEER_ENV`]. That
//! test calls [`run_from_env`] with the backend's connect function. The parent drives the
//! peer through [`Peer`], which reads the lines the peer prints.
//!
//! ```text
//! serve URL GROUP
//!     joins GROUP with a new process-local channel, prints "READY <channel>", then answers
//!     every message: one with header reply_to gets a "pong" with the same body (and header
//!     seen_type) sent to reply_to; a "stop" ends the process.
//! hold URL CHANNEL N
//!     takes N deliveries from normal channel CHANNEL without acking them, prints
//!     "HELD <seq> <seq> ...", then waits until it is killed.
//! hold-batch URL CHANNEL N
//!     the same with one receive_batch of up to N (a batch taken and never committed).
//! drain URL CHANNEL N
//!     prints "READY drain", then receives (auto-ack) from channel CHANNEL and prints
//!     "GOT <seq>" for each message until it has seen N distinct seqs; then prints "DONE",
//!     closes the layer and exits.
//! ```
//!
//! In a backend's `tests/processes.rs`:
//!
//! ```text
//! #[test]
//! #[ignore = "the peer process of the other tests (they start it)"]
//! fn peer_process() {
//!     chanlayer_testkit::peer::run_from_env(|url| async move { connect(url).await });
//! }
//! ```

use std::future::Future;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use chanlayer_core::{ChannelLayer, Message, Result};

/// The environment variable carrying the peer's arguments, separated by newlines.
pub const PEER_ENV: &str = "CHANLAYER_TEST_PEER";
/// The name of the test function a backend's test binary runs as its peer.
pub const PEER_TEST: &str = "peer_process";
/// How long the parent waits for one line from the peer.
pub const LINE_DEADLINE: Duration = Duration::from_secs(60);

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    // The parent reads these lines; a closed pipe means it is gone and we stop anyway.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

async fn serve(layer: Arc<dyn ChannelLayer>, group: &str) -> Result<()> {
    let me = layer.new_channel("peer").await?;
    layer.group_add(group, &me).await?;
    say(&format!("READY {me}"));
    loop {
        let m = layer.receive(&me).await?;
        if m.message_type() == "stop" {
            break;
        }
        let Some(reply_to) = m.headers().get("reply_to").cloned() else {
            say(&format!("NO-REPLY-TO {}", m.message_type()));
            continue;
        };
        let reply = Message::new("pong", m.codec(), m.body().to_vec())
            .with_header("seen_type", m.message_type());
        layer.send(&reply_to, reply).await?;
    }
    layer.close().await
}

async fn hold(layer: Arc<dyn ChannelLayer>, channel: &str, n: usize, batch: bool) -> Result<()> {
    let mut held = Vec::with_capacity(n);
    if batch {
        while held.is_empty() {
            held = layer
                .receive_batch(channel, n, Duration::from_secs(30))
                .await?;
        }
    } else {
        while held.len() < n {
            held.push(layer.receive_delivery(channel).await?);
        }
    }
    let seqs: Vec<String> = held
        .iter()
        .map(|d| d.decode::<u64>().map(|s| s.to_string()))
        .collect::<Result<_>>()?;
    say(&format!("HELD {}", seqs.join(" ")));
    // Keep the deliveries unsettled until the parent kills this process.
    std::future::pending::<()>().await;
    drop(held);
    Ok(())
}

async fn drain(layer: Arc<dyn ChannelLayer>, channel: &str, n: usize) -> Result<()> {
    let mut seen = std::collections::HashSet::with_capacity(n);
    say("READY drain");
    while seen.len() < n {
        let seq = layer.receive(channel).await?.decode::<u64>()?;
        seen.insert(seq);
        say(&format!("GOT {seq}"));
    }
    say("DONE");
    layer.close().await
}

/// Runs the peer if [`PEER_ENV`] is set (the process was started by [`Peer::spawn`]);
/// returns at once otherwise. `connect` makes the backend's layer from a URL. Exits the
/// process with status 1 and the error on stderr if anything fails.
pub fn run_from_env<F, Fut, L>(connect: F)
where
    F: FnOnce(String) -> Fut,
    Fut: Future<Output = Result<L>>,
    L: ChannelLayer,
{
    let Ok(spec) = std::env::var(PEER_ENV) else {
        return;
    };
    let args: Vec<&str> = spec.split('\n').collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime builds for the peer");
    let result = rt.block_on(async {
        let (cmd, url, rest) = match args.as_slice() {
            [cmd, url, rest @ ..] => (*cmd, url.to_string(), rest),
            _ => panic!("{PEER_ENV} needs a command and a URL, got {spec:?}"),
        };
        let layer: Arc<dyn ChannelLayer> = Arc::new(connect(url).await?);
        match (cmd, rest) {
            ("serve", [group]) => serve(layer, group).await,
            ("hold", [channel, n]) => hold(layer, channel, parse(n), false).await,
            ("hold-batch", [channel, n]) => hold(layer, channel, parse(n), true).await,
            ("drain", [channel, n]) => drain(layer, channel, parse(n)).await,
            _ => panic!("unknown peer command {spec:?}"),
        }
    });
    if let Err(e) = result {
        eprintln!("peer: {e}");
        std::process::exit(1);
    }
    std::process::exit(0);
}

fn parse(n: &str) -> usize {
    n.parse()
        .unwrap_or_else(|_| panic!("peer: {n:?} is not a count"))
}

/// The parent's handle on a peer process.
pub struct Peer {
    child: Option<Child>,
    out: Option<BufReader<ChildStdout>>,
}

impl Peer {
    /// Starts this test binary again as a peer running `command` with `url` and `args`.
    pub fn spawn(command: &str, url: &str, args: &[&str]) -> Peer {
        let mut spec = vec![command, url];
        spec.extend_from_slice(args);
        let exe = std::env::current_exe().expect("the test binary knows its path");
        let mut child = Command::new(exe)
            .args([PEER_TEST, "--exact", "--ignored", "--nocapture", "--quiet"])
            .env(PEER_ENV, spec.join("\n"))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the test binary starts again as the peer");
        let out = BufReader::new(child.stdout.take().expect("piped stdout"));
        Peer {
            child: Some(child),
            out: Some(out),
        }
    }

    /// The peer's next line that is one of its own (libtest's lines are skipped), within
    /// [`LINE_DEADLINE`].
    pub async fn line(&mut self) -> String {
        let out = self.out.take().expect("one line() at a time");
        let read = tokio::task::spawn_blocking(move || {
            let mut out = out;
            loop {
                let mut line = String::new();
                let n = out.read_line(&mut line).expect("read the peer's stdout");
                assert!(n > 0, "the peer exited without a word");
                let line = line.trim_end().to_owned();
                if line.starts_with("READY ")
                    || line.starts_with("HELD ")
                    || line.starts_with("NO-REPLY-TO ")
                    || line.starts_with("GOT ")
                    || line == "DONE"
                {
                    return (line, out);
                }
            }
        });
        let (line, out) = tokio::time::timeout(LINE_DEADLINE, read)
            .await
            .expect("the peer answers within the deadline")
            .expect("reader thread");
        self.out = Some(out);
        line
    }

    /// Kills the peer (SIGKILL: no cleanup, like a crash) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits for the peer to exit; `true` if it exited with status 0.
    pub async fn wait_success(mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return false;
        };
        let status = tokio::time::timeout(
            LINE_DEADLINE,
            tokio::task::spawn_blocking(move || child.wait()),
        )
        .await
        .expect("the peer exits within the deadline")
        .expect("wait thread")
        .expect("wait");
        status.success()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        // A failing test must not leave its peer running.
        self.kill();
    }
}
