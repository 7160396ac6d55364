//! `chat-swarm`: a websocket client swarm for the chat server, the load a chat app's users
//! make. It opens `--clients` connections spread over the `--servers` (round robin), each
//! joining one of `--rooms` rooms, then for `--rounds` rounds (`--interval` apart) one
//! member of every room says a line. Every member of the room should get it: the swarm
//! measures, per delivery, the time from the send to the member's receive (one clock: all
//! clients are in this process), and counts what never arrived.
//!
//! ```sh
//! chat-swarm --servers ws://127.0.0.1:8001/ws,ws://127.0.0.1:8002/ws --clients 500 --rooms 25
//! ```
//!
//! It prints one line of results (`deliveries`, `lost`, `p50`, `p99`, `max`) and exits 1 if
//! anything was lost.

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use futures::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message as Frame;

#[derive(Parser)]
#[command(about = "A websocket client swarm for the chat example: delivery latency and loss")]
struct Args {
    /// Websocket URLs of the chat servers, comma-separated (clients go round robin).
    #[arg(long, value_delimiter = ',')]
    servers: Vec<String>,
    /// How many websocket connections.
    #[arg(long, default_value_t = 500)]
    clients: usize,
    /// How many rooms (client i joins room i % rooms).
    #[arg(long, default_value_t = 25)]
    rooms: usize,
    /// How many rounds; each round, one member of every room says a line.
    #[arg(long, default_value_t = 40)]
    rounds: usize,
    /// Time between rounds, in milliseconds.
    #[arg(long, default_value_t = 100)]
    interval_ms: u64,
    /// How long to wait for the last deliveries after the last round, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    drain_ms: u64,
    /// A label for the results line (the backend, say).
    #[arg(long, default_value = "")]
    label: String,
}

/// What the readers report: one delivery's latency in microseconds.
type Latencies = Arc<Mutex<Vec<u64>>>;

struct Client {
    room: usize,
    /// Frames to send.
    out: mpsc::UnboundedSender<String>,
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn connect(
    url: &str,
    room: usize,
    start: Instant,
    latencies: Latencies,
    joined: Arc<AtomicU64>,
) -> Result<Client, String> {
    let (ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .map_err(|e| format!("connect {url}: {e}"))?;
    let (mut sink, mut stream) = ws.split();
    let (out, mut rx) = mpsc::unbounded_channel::<String>();
    let room_name = format!("r{room}");
    out.send(format!("{{\"join\":\"{room_name}\"}}"))
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        while let Some(text) = rx.recv().await {
            if sink.send(Frame::text(text)).await.is_err() {
                break;
            }
        }
        let _ = sink.close().await;
    });
    tokio::spawn(async move {
        while let Some(Ok(frame)) = stream.next().await {
            let Frame::Text(text) = frame else { continue };
            let Ok(event) = serde_json::from_str::<serde_json::Value>(&text) else {
                continue;
            };
            match event.get("type").and_then(|t| t.as_str()) {
                Some("joined") => {
                    joined.fetch_add(1, Ordering::Relaxed);
                }
                Some("message") => {
                    // The text is "<sent, µs since the swarm started> ...".
                    let sent = event
                        .get("text")
                        .and_then(|t| t.as_str())
                        .and_then(|t| t.split(' ').next())
                        .and_then(|t| t.parse::<u64>().ok());
                    if let Some(sent) = sent {
                        let now = start.elapsed().as_micros() as u64;
                        if let Ok(mut l) = latencies.lock() {
                            l.push(now.saturating_sub(sent));
                        }
                    }
                }
                Some("dropped") => {
                    eprintln!("chat-swarm: the server dropped lines for a slow client: {event}")
                }
                _ => {}
            }
        }
    });
    Ok(Client { room, out })
}

async fn run(args: Args) -> Result<bool, String> {
    if args.servers.is_empty() || args.rooms == 0 || args.clients < args.rooms {
        return Err("give --servers, and --clients at least --rooms".into());
    }
    let start = Instant::now();
    let latencies: Latencies = Arc::new(Mutex::new(Vec::new()));
    let joined = Arc::new(AtomicU64::new(0));
    let mut connecting = Vec::new();
    for i in 0..args.clients {
        let url = args.servers[i % args.servers.len()].clone();
        connecting.push(tokio::spawn(connect_owned(
            url,
            i % args.rooms,
            start,
            latencies.clone(),
            joined.clone(),
        )));
    }
    let mut clients = Vec::new();
    for c in connecting {
        clients.push(c.await.map_err(|e| e.to_string())??);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while joined.load(Ordering::Relaxed) < args.clients as u64 {
        if Instant::now() > deadline {
            return Err(format!(
                "only {} of {} clients joined their room within 60 s",
                joined.load(Ordering::Relaxed),
                args.clients
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let connected_in = start.elapsed();
    let mut members: HashMap<usize, Vec<usize>> = HashMap::new();
    for (i, c) in clients.iter().enumerate() {
        members.entry(c.room).or_default().push(i);
    }
    let mut expected = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(args.interval_ms));
    for round in 0..args.rounds {
        tick.tick().await;
        for (room, list) in &members {
            let sender = &clients[list[round % list.len()]];
            let sent = start.elapsed().as_micros();
            let frame = serde_json::json!({"room": format!("r{room}"), "text": format!("{sent} round {round}"), "name": "swarm"});
            sender
                .out
                .send(frame.to_string())
                .map_err(|e| e.to_string())?;
            expected += list.len() as u64;
        }
    }
    let drain = Instant::now() + Duration::from_millis(args.drain_ms);
    loop {
        let got = latencies.lock().map(|l| l.len() as u64).unwrap_or(0);
        if got >= expected || Instant::now() > drain {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut l = latencies.lock().map(|l| l.clone()).unwrap_or_default();
    l.sort_unstable();
    let got = l.len() as u64;
    let lost = expected.saturating_sub(got);
    println!(
        "{} clients={} servers={} rooms={} rounds={} interval={}ms connected_in={:.1}s deliveries={} lost={} p50={:.1}ms p99={:.1}ms max={:.1}ms",
        args.label,
        args.clients,
        args.servers.len(),
        args.rooms,
        args.rounds,
        args.interval_ms,
        connected_in.as_secs_f64(),
        got,
        lost,
        percentile(&l, 0.50) as f64 / 1000.0,
        percentile(&l, 0.99) as f64 / 1000.0,
        l.last().copied().unwrap_or(0) as f64 / 1000.0,
    );
    drop(clients);
    Ok(lost == 0 && got == expected)
}

async fn connect_owned(
    url: String,
    room: usize,
    start: Instant,
    latencies: Latencies,
    joined: Arc<AtomicU64>,
) -> Result<Client, String> {
    connect(&url, room, start, latencies, joined).await
}

fn main() -> ExitCode {
    let args = Args::parse();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("chat-swarm: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("chat-swarm: {e}");
            ExitCode::FAILURE
        }
    }
}
