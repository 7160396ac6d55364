//! `chanlayer bench`: the same scenarios against each `--url` in turn, side by side.
//!
//! Every message carries a sequence number and the time it was sent (nanoseconds since the
//! run started, one clock: sender and receiver are in this process), so the receiver
//! measures latency and counts honestly: `lost` is sequence numbers that never arrived
//! (within `--idle-timeout` of the last arrival), `dup` those that arrived twice.
//!
//! Scenarios (each on one layer instance per URL; messages go through the broker):
//!
//! | scenario | what one run does |
//! |---|---|
//! | `local` | `--concurrency` senders, one receiver, on a process-local channel (`new_channel`) |
//! | `normal` | the same on a normal channel (a fresh name) |
//! | `group` | `group_send` to a group of `--members` process-local members; each receives every message |
//! | `roundtrip` | one message out, its echo back (two channels, an echo task), one at a time |
//!
//! Latency is from `send` to `receive` (for `roundtrip`: the whole round trip). Under load it
//! includes time queued behind earlier messages; `roundtrip` gives the unloaded figure.
//! Before the clock starts, one warm-up message goes through each receiving channel, so
//! consumers, subscriptions and memberships are in place.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chanlayer::{Codec, Error, Layer, Message};
use chanlayer_core::config::ConfigDuration;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::{connect, CliError};

/// A scenario of `chanlayer bench`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// Process-local channel: senders and one receiver.
    Local,
    /// Normal channel: senders and one receiver.
    Normal,
    /// group_send to `--members` members.
    Group,
    /// Send, echo, receive; one at a time.
    Roundtrip,
}

/// Arguments of `chanlayer bench`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// A layer URL to measure (repeat for a side-by-side table). Use a capacity at least
    /// `--concurrency` (e.g. `?capacity=10000`); a full channel makes senders wait.
    #[arg(long = "url", value_name = "URL", required = true)]
    pub urls: Vec<String>,
    /// Scenarios to run, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "local")]
    pub scenario: Vec<Scenario>,
    /// Messages per scenario (for `group`: per member).
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    pub messages: u64,
    /// Message body size in bytes (at least 16: sequence number and send time).
    #[arg(long, value_name = "BYTES", default_value_t = 64)]
    pub size: usize,
    /// Sends in flight at once (sender tasks).
    #[arg(long, value_name = "C", default_value_t = 1)]
    pub concurrency: usize,
    /// Members of the group in the `group` scenario.
    #[arg(long, value_name = "M", default_value_t = 10)]
    pub members: usize,
    /// Give up waiting for the rest after this long without an arrival (they count as lost).
    #[arg(long, value_name = "DURATION", default_value = "10s")]
    pub idle_timeout: ConfigDuration,
    /// Also write the figures as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Also draw throughput and latency per URL into this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
}

/// The figures of one scenario against one URL.
#[derive(Debug, Clone, Serialize)]
pub struct Figures {
    /// The URL, password redacted.
    pub url: String,
    /// The backend's name.
    pub backend: String,
    /// The scenario.
    pub scenario: Scenario,
    /// Messages sent (for `group`: group_sends).
    pub sent: u64,
    /// Deliveries that arrived (distinct).
    pub received: u64,
    /// Deliveries that never arrived.
    pub lost: u64,
    /// Deliveries that arrived more than once.
    pub duplicates: u64,
    /// Times a send was refused as `ChannelFull` and retried.
    pub full_retries: u64,
    /// Wall time from the first send to the last arrival, in seconds.
    pub seconds: f64,
    /// Deliveries per second.
    pub msgs_per_sec: f64,
    /// Body megabytes (10^6) per second.
    pub mb_per_sec: f64,
    /// Latency percentiles and maximum, in microseconds.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Maximum.
    pub max_us: f64,
}

impl Figures {
    /// A short name for the row: the backend (and ZeroMQ's mode) and the scenario.
    pub fn label(&self) -> String {
        let backend = match self.backend.as_str() {
            "zmq" if self.url.contains("pull=") || self.url.contains("mode=dedicated") => {
                "zmq dedicated"
            }
            "zmq" => "zmq embedded",
            b => b,
        };
        format!("{backend} {:?}", self.scenario).to_lowercase()
    }
}

/// `chanlayer bench`.
pub async fn run(args: Args) -> Result<(), CliError> {
    if args.size < 16 {
        return Err(CliError::usage("--size must be at least 16 bytes"));
    }
    if args.concurrency == 0 || args.messages == 0 || args.members == 0 {
        return Err(CliError::usage(
            "--messages, --concurrency and --members must be at least 1",
        ));
    }
    let mut all = Vec::new();
    for url in &args.urls {
        let redacted = chanlayer::LayerConfig::from_url(url)
            .map_err(|e| CliError::usage(e.to_string()))?
            .backend
            .redacted_url();
        let layer = connect(url).await?;
        for &scenario in &args.scenario {
            let f = run_one(&layer, &redacted, scenario, &args).await;
            match f {
                Ok(f) => all.push(f),
                Err(e) => {
                    let _ = layer.close().await;
                    return Err(e);
                }
            }
        }
        let _ = layer.close().await;
    }
    print_table(&all);
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&all)
            .map_err(|e| CliError::failure(format!("could not encode the figures: {e}")))?;
        std::fs::write(path, text).map_err(|e| CliError::io(&path.display().to_string(), e))?;
    }
    if let Some(path) = &args.plot {
        plot(&all, path)?;
    }
    if all.iter().any(|f| f.lost > 0 || f.duplicates > 0) {
        eprintln!("chanlayer: some messages were lost or duplicated (see the table)");
    }
    Ok(())
}

/// Which deliveries arrived, and their latencies.
struct Tally {
    seen: Vec<u8>,
    latencies_ns: Vec<u64>,
    duplicates: u64,
    last: Instant,
}

impl Tally {
    fn new(n: u64) -> Tally {
        Tally {
            seen: vec![0; n as usize],
            latencies_ns: Vec::with_capacity(n as usize),
            duplicates: 0,
            last: Instant::now(),
        }
    }

    /// Records a body; `false` if it is not one of this run's.
    fn record(&mut self, body: &[u8], now_ns: u64) -> bool {
        let Some((seq, sent)) = parse_body(body) else {
            return false;
        };
        let Some(slot) = self.seen.get_mut(seq as usize) else {
            return false;
        };
        if *slot > 0 {
            self.duplicates += 1;
        } else {
            *slot = 1;
            self.latencies_ns.push(now_ns.saturating_sub(sent));
        }
        self.last = Instant::now();
        true
    }

    fn received(&self) -> u64 {
        self.latencies_ns.len() as u64
    }
}

fn body(seq: u64, sent_ns: u64, size: usize) -> Vec<u8> {
    let mut b = vec![0u8; size];
    b[..8].copy_from_slice(&seq.to_le_bytes());
    b[8..16].copy_from_slice(&sent_ns.to_le_bytes());
    b
}

fn parse_body(b: &[u8]) -> Option<(u64, u64)> {
    let seq = u64::from_le_bytes(b.get(..8)?.try_into().ok()?);
    let sent = u64::from_le_bytes(b.get(8..16)?.try_into().ok()?);
    Some((seq, sent))
}

fn progress(total: u64, label: String) -> ProgressBar {
    let bar = ProgressBar::new(total);
    if let Ok(style) =
        ProgressStyle::with_template("{prefix:>28} [{bar:30}] {pos}/{len} {per_sec} {eta}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(label);
    bar
}

/// Sends with retries while the channel is full (backpressure, counted).
async fn send_retrying(
    layer: &Layer,
    channel: &str,
    group: bool,
    message: Message,
    retries: &AtomicU64,
) -> Result<(), CliError> {
    loop {
        let r = if group {
            layer.group_send_message(channel, message.clone()).await
        } else {
            layer.send_message(channel, message.clone()).await
        };
        match r {
            Ok(()) => return Ok(()),
            Err(Error::ChannelFull { .. }) => {
                retries.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
            Err(e) => return Err(CliError::layer(format!("send to {channel}"), e)),
        }
    }
}

async fn run_one(
    layer: &Layer,
    url: &str,
    scenario: Scenario,
    args: &Args,
) -> Result<Figures, CliError> {
    let base = Instant::now();
    let now_ns = move || base.elapsed().as_nanos() as u64;
    let n = args.messages;
    let size = args.size;
    let idle = args.idle_timeout.0;
    let retries = Arc::new(AtomicU64::new(0));
    let label = format!("{} {:?}", layer.capabilities().backend, scenario).to_lowercase();
    let fail = |what: &str, e: Error| CliError::layer(what.to_owned(), e);

    // Where senders send, and the channels receivers read (one per member for groups).
    let (target, group, receivers): (String, bool, Vec<String>) = match scenario {
        Scenario::Local | Scenario::Roundtrip => {
            let ch = layer
                .new_channel("bench")
                .await
                .map_err(|e| fail("new_channel", e))?;
            (ch.clone(), false, vec![ch])
        }
        Scenario::Normal => {
            let ch = format!("bench.{:x}", rand_u64());
            (ch.clone(), false, vec![ch])
        }
        Scenario::Group => {
            let g = format!("bench.{:x}", rand_u64());
            let mut members = Vec::new();
            for _ in 0..args.members {
                let ch = layer
                    .new_channel("member")
                    .await
                    .map_err(|e| fail("new_channel", e))?;
                layer
                    .group_add(&g, &ch)
                    .await
                    .map_err(|e| fail("group_add", e))?;
                members.push(ch);
            }
            (g, true, members)
        }
    };
    // Warm-up: one message through each receiving channel before the clock starts, so
    // consumers, subscriptions and group memberships are in place (a ZeroMQ normal channel
    // subscribes on its first receive, a Kafka consumer joins its group). It carries a
    // sequence number outside the run, which the tallies ignore.
    if scenario != Scenario::Roundtrip {
        let warm = Message::new("bench", Codec::Bincode, body(u64::MAX, 0, size));
        send_retrying(layer, &target, group, warm, &retries).await?;
        for ch in &receivers {
            match tokio::time::timeout(idle, layer.receive(ch)).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(fail("receive (warm-up)", e)),
                Err(_) => {
                    return Err(CliError::failure(format!(
                        "the warm-up message did not arrive on {ch} within {idle:?}"
                    )))
                }
            }
        }
    }
    let deliveries = n * receivers.len() as u64;
    let bar = progress(deliveries, label);
    let started = Instant::now();

    let (tallies, seconds) = if scenario == Scenario::Roundtrip {
        // An echo task sends each message back on a second channel.
        let back = layer
            .new_channel("echo")
            .await
            .map_err(|e| fail("new_channel", e))?;
        let echo = {
            let (layer, from, to) = (layer.clone(), target.clone(), back.clone());
            tokio::spawn(async move {
                for _ in 0..n {
                    let m = layer.receive(&from).await?;
                    layer.send_message(&to, m).await?;
                }
                Ok::<(), Error>(())
            })
        };
        let mut tally = Tally::new(n);
        for seq in 0..n {
            let m = Message::new("bench", Codec::Bincode, body(seq, now_ns(), size));
            send_retrying(layer, &target, false, m, &retries).await?;
            match tokio::time::timeout(idle, layer.receive(&back)).await {
                Ok(Ok(m)) => {
                    tally.record(m.body(), now_ns());
                    bar.inc(1);
                }
                Ok(Err(e)) => return Err(fail("receive", e)),
                Err(_) => break,
            }
        }
        echo.abort();
        (vec![tally], started.elapsed().as_secs_f64())
    } else {
        let mut readers = Vec::new();
        for ch in &receivers {
            let (layer, ch, bar) = (layer.clone(), ch.clone(), bar.clone());
            readers.push(tokio::spawn(async move {
                let mut tally = Tally::new(n);
                while tally.received() < n {
                    match tokio::time::timeout(idle, layer.receive(&ch)).await {
                        Ok(Ok(m)) => {
                            if tally.record(m.body(), now_ns()) {
                                bar.inc(1);
                            }
                        }
                        Ok(Err(e)) => return Err(e),
                        Err(_) => break,
                    }
                }
                Ok(tally)
            }));
        }
        let next = Arc::new(AtomicU64::new(0));
        let mut senders = Vec::new();
        for _ in 0..args.concurrency {
            let (layer, target, next, retries) =
                (layer.clone(), target.clone(), next.clone(), retries.clone());
            senders.push(tokio::spawn(async move {
                loop {
                    let seq = next.fetch_add(1, Ordering::Relaxed);
                    if seq >= n {
                        return Ok(());
                    }
                    let m = Message::new("bench", Codec::Bincode, body(seq, now_ns(), size));
                    send_retrying(&layer, &target, group, m, &retries).await?;
                }
            }));
        }
        for s in senders {
            s.await
                .map_err(|e| CliError::failure(format!("a sender task failed: {e}")))??;
        }
        let mut tallies = Vec::new();
        for r in readers {
            tallies.push(
                r.await
                    .map_err(|e| CliError::failure(format!("a receiver task failed: {e}")))?
                    .map_err(|e| fail("receive", e))?,
            );
        }
        let end = tallies.iter().map(|t| t.last).max().unwrap_or(started);
        (tallies, end.duration_since(started).as_secs_f64())
    };
    bar.finish_and_clear();
    if scenario == Scenario::Group {
        for ch in &receivers {
            let _ = layer.group_discard(&target, ch).await;
        }
    }

    let received: u64 = tallies.iter().map(Tally::received).sum();
    let duplicates: u64 = tallies.iter().map(|t| t.duplicates).sum();
    let mut lat: Vec<u64> = tallies.into_iter().flat_map(|t| t.latencies_ns).collect();
    lat.sort_unstable();
    let pct = |p: f64| -> f64 {
        if lat.is_empty() {
            return 0.0;
        }
        let i = ((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len()) - 1;
        lat[i] as f64 / 1000.0
    };
    let seconds = seconds.max(1e-9);
    Ok(Figures {
        url: url.to_owned(),
        backend: layer.capabilities().backend.to_owned(),
        scenario,
        sent: n,
        received,
        lost: deliveries - received,
        duplicates,
        full_retries: retries.load(Ordering::Relaxed),
        seconds,
        msgs_per_sec: received as f64 / seconds,
        mb_per_sec: received as f64 * size as f64 / seconds / 1e6,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        p999_us: pct(0.999),
        max_us: lat.last().map_or(0.0, |&v| v as f64 / 1000.0),
    })
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

/// Prints the figures, one row per URL and scenario (URLs with the password redacted).
pub fn print_table(all: &[Figures]) {
    let w = all.iter().map(|f| f.url.len()).max().unwrap_or(3).max(3);
    println!(
        "{:<w$} {:<9} {:>11} {:>8} {:>10} {:>10} {:>10} {:>10} {:>7} {:>5}",
        "url",
        "scenario",
        "msgs/s",
        "MB/s",
        "p50 µs",
        "p99 µs",
        "p99.9 µs",
        "max µs",
        "lost",
        "dup"
    );
    for f in all {
        println!(
            "{:<w$} {:<9} {:>11.0} {:>8.2} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>7} {:>5}",
            f.url,
            format!("{:?}", f.scenario).to_lowercase(),
            f.msgs_per_sec,
            f.mb_per_sec,
            f.p50_us,
            f.p99_us,
            f.p999_us,
            f.max_us,
            f.lost,
            f.duplicates
        );
    }
}

/// Draws msgs/s and p50/p99 latency per URL and scenario as two bar charts in one SVG.
fn plot(all: &[Figures], path: &std::path::Path) -> Result<(), CliError> {
    use plotters::prelude::*;
    let draw = || -> Result<(), Box<dyn std::error::Error>> {
        let labels: Vec<String> = all.iter().map(Figures::label).collect();
        let n = all.len().max(1);
        let root = SVGBackend::new(path, (300 + 90 * n as u32, 720)).into_drawing_area();
        root.fill(&WHITE)?;
        let (top, bottom) = root.split_vertically(360);
        let colors = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK];
        let bars = |area: &DrawingArea<SVGBackend, plotters::coord::Shift>,
                    title: &str,
                    series: &[(&str, Vec<f64>)]|
         -> Result<(), Box<dyn std::error::Error>> {
            // A log scale: backends differ by orders of magnitude (memory against Kafka).
            let values = series.iter().flat_map(|(_, v)| v.iter().copied());
            let positive: Vec<f64> = values.filter(|v| *v > 0.0).collect();
            let max = positive.iter().copied().fold(1.0f64, f64::max) * 2.0;
            let min = positive.iter().copied().fold(max, f64::min) / 2.0;
            let mut chart = ChartBuilder::on(area)
                .caption(title, ("sans-serif", 18))
                .margin(10)
                .x_label_area_size(40)
                .y_label_area_size(70)
                .build_cartesian_2d(0f64..n as f64, (min..max).log_scale())?;
            let labels = labels.clone();
            chart
                .configure_mesh()
                .disable_x_mesh()
                // Ticks every half bar; the label sits under the middle of each bar.
                .x_labels(2 * n + 1)
                .x_label_formatter(&move |x| {
                    let halves = (x * 2.0).round() as i64;
                    if halves % 2 == 1 {
                        labels
                            .get((halves / 2) as usize)
                            .cloned()
                            .unwrap_or_default()
                    } else {
                        String::new()
                    }
                })
                .draw()?;
            let k = series.len() as f64;
            for (s, (name, values)) in series.iter().enumerate() {
                let color = colors[s % colors.len()];
                chart
                    .draw_series(values.iter().enumerate().map(|(i, v)| {
                        let x0 = i as f64 + 0.1 + 0.8 * s as f64 / k;
                        let x1 = x0 + 0.8 / k;
                        Rectangle::new([(x0, min), (x1, v.max(min))], color.filled())
                    }))?
                    .label(*name)
                    .legend(move |(x, y)| {
                        Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled())
                    });
            }
            chart
                .configure_series_labels()
                .border_style(BLACK)
                .background_style(WHITE)
                .draw()?;
            Ok(())
        };
        bars(
            &top,
            "throughput (deliveries/s, log scale)",
            &[("msgs/s", all.iter().map(|f| f.msgs_per_sec).collect())],
        )?;
        bars(
            &bottom,
            "latency (µs, log scale)",
            &[
                ("p50", all.iter().map(|f| f.p50_us).collect()),
                ("p99", all.iter().map(|f| f.p99_us).collect()),
            ],
        )?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| CliError::failure(format!("could not draw {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tallies_count_lost_and_duplicate_sequence_numbers() {
        let mut t = Tally::new(4);
        assert!(t.record(&body(0, 10, 16), 30));
        assert!(t.record(&body(2, 10, 64), 50));
        assert!(t.record(&body(2, 10, 64), 60));
        assert!(!t.record(&body(9, 10, 16), 60), "not of this run");
        assert!(!t.record(b"short", 60));
        assert_eq!(t.received(), 2);
        assert_eq!(t.duplicates, 1);
        assert_eq!(t.latencies_ns, vec![20, 40]);
    }
}
