//! `chat`: a websocket chat server on axum over chanlayer.
//!
//! Rooms are groups of the channel layer; each websocket connection is one channel
//! (`new_channel`). Run several processes on one `CHANLAYER_URL` and a line said on one
//! reaches every browser in the room, whichever process it is connected to:
//!
//! ```text
//! chat --port 8001 --url 'amqp://guest:guest@127.0.0.1:5672/%2f?prefix=chat'
//! chat --port 8002 --url 'amqp://guest:guest@127.0.0.1:5672/%2f?prefix=chat'
//! ```
//!
//! Routes: `/` the page, `/ws` the websocket, `/healthz` (200 once a message makes a round
//! trip through the layer), `/stats` (counters as JSON). SIGINT or SIGTERM stops it
//! cleanly: connections leave their rooms and are closed with 1001, then the layer is
//! closed. See `examples/chat/README.md`.

mod connection;
mod outbox;
mod protocol;
mod server;

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use chanlayer::config::ConfigDuration;
use clap::Parser;
use tokio::sync::watch;

/// A websocket chat server over a chanlayer channel layer.
#[derive(Debug, Parser)]
#[command(name = "chat", version)]
struct Args {
    /// Port to listen on (0 picks a free one; the line on stdout says which).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: std::net::IpAddr,
    /// The channel layer (memory://, amqp://..., kafka://..., zmq://...). Every process of
    /// one chat uses the same URL.
    // hide_env_values: the URL may hold a password; --help must not print it.
    #[arg(
        long,
        env = "CHANLAYER_URL",
        hide_env_values = true,
        default_value = "memory://"
    )]
    url: String,
    /// This server's id, shown with every line it relays (default: HOST:PORT).
    #[arg(long)]
    id: Option<String>,
    /// Frames queued per connection; when full, lines for that connection are dropped and
    /// counted (the browser is told how many).
    #[arg(long, default_value_t = 256)]
    buffer: usize,
    /// How often an idle connection is pinged.
    #[arg(long, default_value = "20s")]
    ping_every: ConfigDuration,
    /// A connection that sent nothing (not even a pong) for this long is closed.
    #[arg(long, default_value = "60s")]
    idle_timeout: ConfigDuration,
    /// A connection whose socket takes no frame for this long is closed.
    #[arg(long, default_value = "10s")]
    write_timeout: ConfigDuration,
    /// Most rooms one connection may be in.
    #[arg(long, default_value_t = 32)]
    max_rooms: usize,
    /// Log level: error, warn, info, debug or trace.
    #[arg(long, default_value = "info")]
    log: tracing::Level,
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_max_level(args.log)
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("chat: could not start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chat: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    // Installed before the layer connects: a layer takes its metric handles when it
    // connects. `/metrics` renders them.
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .map_err(|e| format!("could not install the metrics recorder: {e}"))?;
    // Errors from connect never contain the password (chanlayer redacts them).
    let layer = chanlayer::connect(&args.url)
        .await
        .map_err(|e| format!("could not connect the channel layer: {e}"))?;
    let backend = layer.capabilities().backend;
    let listener = tokio::net::TcpListener::bind(SocketAddr::new(args.host, args.port))
        .await
        .map_err(|e| format!("could not listen on {}:{}: {e}", args.host, args.port))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("listening socket: {e}"))?;
    let settings = server::Settings {
        server_id: args.id.unwrap_or_else(|| addr.to_string()),
        buffer: args.buffer,
        ping_every: args.ping_every.0,
        idle_timeout: args.idle_timeout.0,
        write_timeout: args.write_timeout.0,
        max_rooms: args.max_rooms,
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let app = server::App::new(layer.clone(), settings, stop_rx.clone(), Some(metrics));
    let mut stopped = stop_rx.clone();
    let serving = axum::serve(listener, server::router(app.clone()))
        .with_graceful_shutdown(async move {
            let _ = stopped.wait_for(|stop| *stop).await.map(|_| ());
        })
        .into_future();
    let mut serving = tokio::spawn(serving);
    println!(
        "chat: listening on http://{addr} (server {}, backend {backend}, prefix {})",
        app.settings.server_id,
        layer.options().prefix
    );
    tracing::info!(%addr, backend, "listening");

    let why = tokio::select! {
        why = stop_signal() => why,
        ended = &mut serving => format!("the server ended: {ended:?}"),
    };
    tracing::info!("stopping ({why})");
    let _ = stop_tx.send(true);
    // Connections leave their rooms and close; then the listener; then the layer.
    let open = app.drained(Duration::from_secs(10)).await;
    if open > 0 {
        tracing::warn!(open, "connections still open after 10 s; closing anyway");
    }
    if !serving.is_finished() {
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut serving).await;
    }
    layer
        .close()
        .await
        .map_err(|e| format!("closing the channel layer: {e}"))?;
    println!("chat: stopped ({why})");
    Ok(())
}

/// Waits for SIGINT (ctrl-c) or SIGTERM; says which.
async fn stop_signal() -> String {
    let ctrl_c = async {
        match tokio::signal::ctrl_c().await {
            Ok(()) => "SIGINT".to_owned(),
            Err(e) => {
                tracing::warn!("cannot listen for ctrl-c: {e}");
                std::future::pending().await
            }
        }
    };
    #[cfg(unix)]
    let term = async {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
                "SIGTERM".to_owned()
            }
            Err(e) => {
                tracing::warn!("cannot listen for SIGTERM: {e}");
                std::future::pending().await
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<String>();
    tokio::select! {
        why = ctrl_c => why,
        why = term => why,
    }
}
