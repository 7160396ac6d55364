//! W3C trace context across two OS processes on a real RabbitMQ (feature `otel`): the spans
//! of `receive`, `receive_delivery` and `receive_batch` in one process are children of the
//! `send`, `group_send` and `send_batch` spans in another.
//!
//! The test starts this binary twice more, as a receiver and as a sender (the
//! `#[ignore]`d [`trace_peer`], with its role in [`ROLE_ENV`]). Each installs a `tracing`
//! subscriber with an OpenTelemetry layer whose spans end in an in-memory exporter, and
//! prints what it exported: the sender its spans' trace and span ids, the receiver its
//! spans' trace and parent span ids. The test compares them.
//!
//! ```text
//! cargo test -p chanlayer-amqp --features otel --test trace_propagation -- --nocapture
//! ```

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::Duration;

use chanlayer_core::{ChannelLayer, Codec, LayerConfig, Message};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tracing_subscriber::layer::SubscriberExt;

/// The role of a peer process and its arguments, separated by newlines.
const ROLE_ENV: &str = "CHANLAYER_TEST_TRACE_ROLE";
/// How long any one step (a line from a peer, a receive) may take.
const DEADLINE: Duration = Duration::from_secs(30);
/// The message types the sender sends, with the operation that sends each.
const SENT: [(&str, &str); 4] = [
    ("trace.send", "send"),
    ("trace.group", "group_send"),
    ("trace.batch.0", "send_batch"),
    ("trace.batch.1", "send_batch"),
];

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// The value of the `op` attribute of a chanlayer span.
fn op_of(span: &SpanData) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == "op")
        .map(|kv| kv.value.as_str().into_owned())
}

/// The ended span with `op`, the newest.
fn ended(exporter: &InMemorySpanExporter, provider: &SdkTracerProvider, op: &str) -> SpanData {
    provider.force_flush().expect("flush the tracer provider");
    let spans = exporter.get_finished_spans().expect("the exported spans");
    spans
        .iter()
        .rev()
        .find(|s| op_of(s).as_deref() == Some(op))
        .cloned()
        .unwrap_or_else(|| panic!("no ended span with op={op} in {spans:#?}"))
}

/// Not a test: the receiver or sender process of the test below (this binary, run again).
#[test]
#[ignore = "a peer process of a_receive_span_is_a_child_of_the_send_span_in_another_process (it starts it)"]
fn trace_peer() {
    let Ok(spec) = std::env::var(ROLE_ENV) else {
        return;
    };
    let args: Vec<String> = spec.split('\n').map(str::to_owned).collect();
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("trace_propagation")));
    tracing::subscriber::set_global_default(subscriber).expect("the only subscriber");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    rt.block_on(async {
        let layer = chanlayer_amqp::AmqpLayer::connect(
            &LayerConfig::from_url(&args[1]).expect("the broker URL parses"),
        )
        .await
        .expect("connect to RabbitMQ (is it running? bash scripts/brokers/rabbitmq.sh)");
        match args[0].as_str() {
            "receive" => receiver(&layer, &args[2], &exporter, &provider).await,
            "send" => sender(&layer, &args[2], &args[3], &exporter, &provider).await,
            other => panic!("unknown role {other:?}"),
        }
        layer.close().await.expect("close");
    });
    say("DONE");
    std::process::exit(0);
}

/// Joins `group` with a new channel, prints `READY <channel>`, then takes the four
/// messages with `receive`, `receive_delivery` and `receive_batch` (as many calls as it
/// takes), printing after each call `RECEIVED <op> <trace> <parent> <types,>`.
async fn receiver(
    layer: &chanlayer_amqp::AmqpLayer,
    group: &str,
    exporter: &InMemorySpanExporter,
    provider: &SdkTracerProvider,
) {
    let me = layer.new_channel("rx").await.expect("new_channel");
    layer.group_add(group, &me).await.expect("group_add");
    say(&format!("READY {me}"));
    let mut left = SENT.len();
    let mut round = 0;
    while left > 0 {
        let op = ["receive", "receive_delivery"]
            .get(round)
            .copied()
            .unwrap_or("receive_batch");
        round += 1;
        let types: Vec<String> = match op {
            "receive" => {
                let m = tokio::time::timeout(DEADLINE, layer.receive(&me))
                    .await
                    .expect("a message within the deadline")
                    .expect("receive");
                vec![m.message_type().to_owned()]
            }
            "receive_delivery" => {
                let d = tokio::time::timeout(DEADLINE, layer.receive_delivery(&me))
                    .await
                    .expect("a message within the deadline")
                    .expect("receive_delivery");
                vec![d.message().message_type().to_owned()]
            }
            _ => layer
                .receive_batch(&me, left, DEADLINE)
                .await
                .expect("receive_batch")
                .iter()
                .map(|d| d.message().message_type().to_owned())
                .collect(),
        };
        assert!(!types.is_empty(), "nothing arrived within {DEADLINE:?}");
        left = left.saturating_sub(types.len());
        // The operation's span ended when the call returned.
        let span = ended(exporter, provider, op);
        say(&format!(
            "RECEIVED {op} {} {} {}",
            span.span_context.trace_id(),
            span.parent_span_id,
            types.join(",")
        ));
        exporter.reset();
    }
}

/// In a span of its own, sends one message to `channel`, one to `group` and a batch of two
/// to `channel`, then prints `USER <trace> <span>` and `SENT <op> <trace> <span> <parent>`
/// for each chanlayer span.
async fn sender(
    layer: &chanlayer_amqp::AmqpLayer,
    channel: &str,
    group: &str,
    exporter: &InMemorySpanExporter,
    provider: &SdkTracerProvider,
) {
    let msg = |t: &'static str| Message::encode_as(t, &1u8, Codec::Bincode).expect("encode");
    let work = tracing::info_span!("sender.work");
    tracing::Instrument::instrument(
        async {
            layer.send(channel, msg(SENT[0].0)).await.expect("send");
            layer
                .group_send(group, msg(SENT[1].0))
                .await
                .expect("group_send");
            layer
                .send_batch(channel, vec![msg(SENT[2].0), msg(SENT[3].0)])
                .await
                .expect("send_batch");
        },
        work.clone(),
    )
    .await;
    drop(work);
    provider.force_flush().expect("flush the tracer provider");
    let spans = exporter.get_finished_spans().expect("the exported spans");
    let user = spans
        .iter()
        .find(|s| s.name == "sender.work")
        .expect("the sender's own span ended");
    say(&format!(
        "USER {} {}",
        user.span_context.trace_id(),
        user.span_context.span_id()
    ));
    for op in ["send", "group_send", "send_batch"] {
        let s = ended(exporter, provider, op);
        say(&format!(
            "SENT {op} {} {} {}",
            s.span_context.trace_id(),
            s.span_context.span_id(),
            s.parent_span_id
        ));
    }
}

/// A peer process: this binary running [`trace_peer`] with `role`.
struct Peer {
    child: Option<Child>,
    out: Option<BufReader<ChildStdout>>,
}

impl Peer {
    fn spawn(role: &[&str]) -> Peer {
        let exe = std::env::current_exe().expect("the test binary knows its path");
        let mut child = Command::new(exe)
            .args([
                "trace_peer",
                "--exact",
                "--ignored",
                "--nocapture",
                "--quiet",
            ])
            .env(ROLE_ENV, role.join("\n"))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the test binary starts again as a peer");
        let out = BufReader::new(child.stdout.take().expect("piped stdout"));
        Peer {
            child: Some(child),
            out: Some(out),
        }
    }

    /// The peer's next line of its own (libtest's are skipped), within [`DEADLINE`].
    async fn line(&mut self) -> Vec<String> {
        let mut out = self.out.take().expect("one line() at a time");
        let read = tokio::task::spawn_blocking(move || loop {
            let mut line = String::new();
            let n = out.read_line(&mut line).expect("read the peer's stdout");
            assert!(n > 0, "the peer exited without a word");
            let words: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
            let ours = ["READY", "USER", "SENT", "RECEIVED", "DONE"];
            if words.first().is_some_and(|w| ours.contains(&w.as_str())) {
                return (words, out);
            }
        });
        let (words, out) = tokio::time::timeout(DEADLINE, read)
            .await
            .expect("the peer answers within the deadline")
            .expect("reader thread");
        self.out = Some(out);
        println!("peer: {}", words.join(" "));
        words
    }

    /// Lines up to `DONE`, then the exit status (must be 0).
    async fn rest(mut self) -> Vec<Vec<String>> {
        let mut lines = Vec::new();
        loop {
            let l = self.line().await;
            if l[0] == "DONE" {
                break;
            }
            lines.push(l);
        }
        let mut child = self.child.take().expect("not waited for yet");
        let status =
            tokio::time::timeout(DEADLINE, tokio::task::spawn_blocking(move || child.wait()))
                .await
                .expect("the peer exits within the deadline")
                .expect("wait thread")
                .expect("wait");
        assert!(status.success(), "the peer exits cleanly: {status}");
        lines
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        // A failing test must not leave its peer running.
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receive_span_is_a_child_of_the_send_span_in_another_process() {
    let ns = format!("tr{:016x}", rand::random::<u64>());
    let url = common::url_with(&format!("prefix={ns}"));
    let group = format!("{ns}.room");

    let mut receiver = Peer::spawn(&["receive", &url, &group]);
    let ready = receiver.line().await;
    assert_eq!(ready[0], "READY", "{ready:?}");
    let channel = ready[1].clone();
    let sender = Peer::spawn(&["send", &url, &channel, &group]);

    let sent = sender.rest().await;
    let user = sent
        .iter()
        .find(|l| l[0] == "USER")
        .expect("the sender's span");
    // op -> (trace id, span id), each checked to be a child of the sender's own span.
    let mut sent_spans: HashMap<String, (String, String)> = HashMap::new();
    for l in sent.iter().filter(|l| l[0] == "SENT") {
        let [_, op, trace, span, parent] = l.as_slice() else {
            panic!("a SENT line: {l:?}");
        };
        assert_eq!(trace, &user[1], "{op} is in the sender's trace");
        assert_eq!(parent, &user[2], "{op} is a child of the sender's span");
        sent_spans.insert(op.clone(), (trace.clone(), span.clone()));
    }
    assert_eq!(
        sent_spans.len(),
        3,
        "send, group_send, send_batch: {sent:?}"
    );

    let received = receiver.rest().await;
    let mut seen = Vec::new();
    for l in &received {
        let [_, op, trace, parent, types] = l.as_slice() else {
            panic!("a RECEIVED line: {l:?}");
        };
        let first = types.split(',').next().unwrap_or_default();
        let (_, by) = SENT
            .iter()
            .find(|(t, _)| *t == first)
            .unwrap_or_else(|| panic!("a message we sent: {l:?}"));
        let (sent_trace, sent_span) = &sent_spans[*by];
        assert_eq!(trace, sent_trace, "{op} is in the sender's trace: {l:?}");
        assert_eq!(
            parent, sent_span,
            "{op} of {first} is a child of the sender's {by} span"
        );
        seen.extend(types.split(',').map(str::to_owned));
    }
    seen.sort();
    let mut all: Vec<String> = SENT.iter().map(|(t, _)| (*t).to_owned()).collect();
    all.sort();
    assert_eq!(seen, all, "every message arrived once");
    println!(
        "trace {}: sender span {}; send {}, group_send {}, send_batch {}",
        user[1],
        user[2],
        sent_spans["send"].1,
        sent_spans["group_send"].1,
        sent_spans["send_batch"].1
    );
}
