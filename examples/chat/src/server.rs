//! The HTTP side: routes (`/`, `/ws`, `/healthz`, `/stats`), the state every connection
//! shares, and the bookkeeping that lets shutdown wait for connections to leave their rooms.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use chanlayer::Layer;
use tokio::sync::{watch, Mutex, Notify};

/// The page served at `/`: plain HTML and JavaScript, no build step.
pub const PAGE: &str = include_str!("page.html");

/// Largest websocket frame a client may send (a request is small JSON).
const MAX_FRAME: usize = 16 * 1024;

/// The health check's message: a struct with a named field, so that it is a map on every
/// codec and wire (`wire=channels_rabbitmq` sends a message as a MessagePack map, which a
/// bare number is not).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct HealthToken {
    token: u64,
}

/// How the server treats its connections.
#[derive(Debug, Clone)]
pub struct Settings {
    /// This server's id, carried in every chat line it sends.
    pub server_id: String,
    /// Frames queued per connection before lines for it are dropped (see `outbox.rs`).
    pub buffer: usize,
    /// How often the server pings an idle connection.
    pub ping_every: Duration,
    /// A connection from which nothing (not even a pong) arrived for this long is closed.
    pub idle_timeout: Duration,
    /// A frame the client's socket does not take within this long closes the connection.
    pub write_timeout: Duration,
    /// Most rooms one connection may be in.
    pub max_rooms: usize,
}

/// Server-wide counters, shown at `/stats`. Atomics: no lock is shared between
/// connections on any message path.
#[derive(Debug, Default)]
pub struct Counters {
    /// Connections open now.
    pub connections: AtomicU64,
    /// Connections accepted since start.
    pub connections_total: AtomicU64,
    /// Room memberships held now (one per connection and room).
    pub memberships: AtomicU64,
    /// Chat lines taken from clients and sent to their room's group.
    pub said: AtomicU64,
    /// Chat lines queued to clients.
    pub delivered: AtomicU64,
    /// Chat lines dropped because the client's buffer was full.
    pub dropped_slow: Arc<AtomicU64>,
    /// Connections closed because they took nothing for `write_timeout` or were idle.
    pub closed_stalled: AtomicU64,
    /// Requests refused (bad JSON, bad room, not joined, layer errors).
    pub refused: AtomicU64,
    /// Layer messages on a connection's channel that were not chat lines.
    pub undecodable: AtomicU64,
}

/// What every connection shares.
#[derive(Debug)]
pub struct App {
    /// The channel layer (a cheap clone of one instance for the whole process).
    pub layer: Layer,
    /// How connections are treated.
    pub settings: Settings,
    /// The counters.
    pub counters: Counters,
    /// Flips to `true` when the server is stopping.
    pub stopping: watch::Receiver<bool>,
    /// Signals `connections` reaching zero.
    idle: Notify,
    /// The channel `/healthz` round-trips a message through, and its lock (health checks
    /// take turns; chat traffic never touches it).
    health: Mutex<Option<String>>,
    healthy_once: AtomicBool,
}

impl App {
    /// The shared state of a server on `layer`.
    pub fn new(layer: Layer, settings: Settings, stopping: watch::Receiver<bool>) -> Arc<App> {
        Arc::new(App {
            layer,
            settings,
            counters: Counters::default(),
            stopping,
            idle: Notify::new(),
            health: Mutex::new(None),
            healthy_once: AtomicBool::new(false),
        })
    }

    /// Counts a connection in; it is counted out when the returned guard drops.
    pub fn enter(self: &Arc<Self>) -> ConnectionGuard {
        self.counters.connections.fetch_add(1, Ordering::Relaxed);
        self.counters
            .connections_total
            .fetch_add(1, Ordering::Relaxed);
        ConnectionGuard { app: self.clone() }
    }

    /// Waits until every connection has ended, or `limit` has passed; returns how many are
    /// still open.
    pub async fn drained(&self, limit: Duration) -> u64 {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.idle.notified();
            let open = self.counters.connections.load(Ordering::Relaxed);
            if open == 0 {
                return 0;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.counters.connections.load(Ordering::Relaxed);
            }
        }
    }

    /// Sends a message to this server's own health channel and receives it back, within
    /// `limit`: the broker path works end to end.
    async fn check_health(&self, limit: Duration) -> Result<(), String> {
        if *self.stopping.borrow() {
            return Err("stopping".into());
        }
        let mut channel = self.health.lock().await;
        let work = async {
            let ch = match channel.as_ref() {
                Some(ch) => ch.clone(),
                None => {
                    let ch = self.layer.new_channel("health").await?;
                    *channel = Some(ch.clone());
                    ch
                }
            };
            let token = crate::now_ms();
            self.layer
                .send_as(&ch, "chat.health", &HealthToken { token })
                .await?;
            // Earlier checks that timed out may have left their token behind: skip them.
            loop {
                let msg = self.layer.receive(&ch).await?;
                if msg.decode::<HealthToken>().ok().map(|h| h.token) == Some(token) {
                    return Ok::<(), chanlayer::Error>(());
                }
            }
        };
        match tokio::time::timeout(limit, work).await {
            Ok(Ok(())) => {
                self.healthy_once.store(true, Ordering::Relaxed);
                Ok(())
            }
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no round trip through the layer within {limit:?}")),
        }
    }
}

/// Counts a connection out when dropped.
#[derive(Debug)]
pub struct ConnectionGuard {
    app: Arc<App>,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        if self
            .app
            .counters
            .connections
            .fetch_sub(1, Ordering::Relaxed)
            == 1
        {
            self.app.idle.notify_waiters();
        }
    }
}

/// The routes.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/ws", get(websocket))
        .route("/healthz", get(healthz))
        .route("/stats", get(stats))
        .with_state(app)
}

async fn page() -> Html<&'static str> {
    Html(PAGE)
}

async fn websocket(State(app): State<Arc<App>>, upgrade: WebSocketUpgrade) -> Response {
    if *app.stopping.borrow() {
        return (StatusCode::SERVICE_UNAVAILABLE, "stopping\n").into_response();
    }
    upgrade
        .max_message_size(MAX_FRAME)
        .max_frame_size(MAX_FRAME)
        .on_upgrade(move |socket| crate::connection::serve(app, socket))
}

/// 200 when a message makes a round trip through the layer (to this server's own channel)
/// within 5 s; 503 with the reason otherwise (or while stopping).
async fn healthz(State(app): State<Arc<App>>) -> Response {
    match app.check_health(Duration::from_secs(5)).await {
        Ok(()) => (StatusCode::OK, "ok\n").into_response(),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")).into_response(),
    }
}

async fn stats(State(app): State<Arc<App>>) -> Response {
    let c = &app.counters;
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let layer = app.layer.stats();
    let body = serde_json::json!({
        "server": app.settings.server_id,
        "backend": app.layer.capabilities().backend,
        "connections": get(&c.connections),
        "connections_total": get(&c.connections_total),
        "memberships": get(&c.memberships),
        "said": get(&c.said),
        "delivered": get(&c.delivered),
        "dropped_slow": get(&c.dropped_slow),
        "closed_stalled": get(&c.closed_stalled),
        "refused": get(&c.refused),
        "undecodable": get(&c.undecodable),
        "healthy_once": app.healthy_once.load(Ordering::Relaxed),
        "layer": {
            "sent": layer.sent,
            "received": layer.received,
            "expired": layer.expired,
            "undecodable": layer.undecodable,
            "group_member_full": layer.group_member_full,
            "undeliverable": layer.undeliverable,
            "dropped_full": layer.dropped_full,
        },
    });
    (
        [(header::CONTENT_TYPE, "application/json")],
        format!("{body}\n"),
    )
        .into_response()
}
