//! One websocket connection: one channel of the layer (`new_channel`), its rooms (groups),
//! and three tasks that never wait on each other's work:
//! - the **receiver** takes chat lines from the channel and offers them to the bounded
//!   outbox (never waiting: a full outbox drops and counts, see `outbox.rs`);
//! - the **writer** writes replies, the outbox's lines and pings to the socket, what is
//!   waiting as one batch and one flush, each batch within `write_timeout`;
//! - the **reader** (the connection's own task) reads requests and does them (`group_add`,
//!   `group_discard`, `group_send`); its replies wait for the writer (a client that sends
//!   faster than it reads is held back, not buffered without bound).
//!
//! A client that sends a lot is thus never slowed in receiving, and a client that reads
//! slowly only loses its own lines.
//!
//! How a connection ends, and what happens then:
//! - the browser closes it, or its socket fails: its rooms are left (`group_discard` of
//!   each) and its channel is no longer read;
//! - the browser vanishes without a word (a dead network, a laptop lid): the server pings
//!   every `ping_every` and closes a connection it heard nothing from (no pong, no request)
//!   for `idle_timeout`; then as above;
//! - the browser's socket takes no frame for `write_timeout` (it stopped reading): closed,
//!   as above;
//! - the server stops: each connection is closed with 1001 "going away" after leaving its
//!   rooms.
//!
//! If the process dies without any of this (SIGKILL, a crash), its memberships end with
//! it: each layer instance keeps the memberships of its own channels, and the broker side
//! goes with its connection (see the example's README for each backend). Memberships a
//! live process never discarded end after `group_expiry`; a live connection re-adds its
//! rooms every `group_expiry / 2`.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message as Frame, WebSocket};
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::outbox::{self, Offer, Outbox, OutboxReader};
use crate::protocol::{group_of, ChatMessage, Event, Request, CHAT_MESSAGE_TYPE};
use crate::server::App;

/// How long leaving each room may take when a connection ends.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a connection ended.
#[derive(Debug)]
enum End {
    /// The browser sent a close frame.
    ClientClosed,
    /// The socket ended or failed.
    ClientGone,
    /// Nothing heard for `idle_timeout`.
    Idle,
    /// A frame was not taken within `write_timeout`.
    Stalled,
    /// The server is stopping.
    Stopping,
    /// Receiving from the connection's channel failed.
    LayerFailed(String),
}

struct Connection {
    app: Arc<App>,
    channel: String,
    rooms: BTreeSet<String>,
    /// Frames for the writer that must not be dropped (replies, the farewell close frame).
    replies: mpsc::Sender<Frame>,
}

/// Replies queued for the writer before the reader waits.
const REPLIES: usize = 16;

/// Serves one upgraded websocket until it ends (see the module docs).
pub async fn serve(app: Arc<App>, socket: WebSocket) {
    let _counted = app.enter();
    let (mut sink, mut stream) = socket.split();
    let channel = match app.layer.new_channel("chat").await {
        Ok(channel) => channel,
        Err(e) => {
            tracing::warn!("new_channel failed: {e}");
            let _ = sink.send(close(1011, "channel layer unavailable")).await;
            return;
        }
    };
    let write_timeout = app.settings.write_timeout;
    let (outbox, lines) = outbox::bounded(app.settings.buffer, app.counters.dropped_slow.clone());
    let mut receiving = tokio::spawn(receive(app.clone(), channel.clone(), outbox));
    let (replies, replies_rx) = mpsc::channel(REPLIES);
    let mut writing = tokio::spawn(write(app.clone(), sink, replies_rx, lines));
    let mut conn = Connection {
        app,
        channel,
        rooms: BTreeSet::new(),
        replies,
    };
    tracing::debug!(channel = %conn.channel, "connected");
    let end = conn.run(&mut stream, &mut receiving, &mut writing).await;
    receiving.abort();
    let left = conn.leave_all().await;
    tracing::debug!(channel = %conn.channel, ?end, rooms = left, "disconnected");
    if let End::LayerFailed(why) = &end {
        tracing::warn!(channel = %conn.channel, "receive failed, connection closed: {why}");
    }
    let farewell = match &end {
        End::Stopping => Some(close(1001, "server shutting down")),
        End::Idle => Some(close(1001, "idle")),
        End::LayerFailed(_) => Some(close(1011, "channel layer error")),
        End::ClientClosed | End::ClientGone | End::Stalled => None,
    };
    if let Some(frame) = farewell {
        let _ = conn.replies.try_send(frame);
    }
    // The writer ends after the close frame, or when its socket fails or stalls.
    drop(conn);
    // (A finished writer was already awaited by `run`: a JoinHandle is polled only once.)
    if !writing.is_finished()
        && tokio::time::timeout(write_timeout, &mut writing)
            .await
            .is_err()
    {
        writing.abort();
    }
}

/// Returns once the server is stopping (the borrowed value is not held across an await).
async fn stopped(stopping: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stopping.wait_for(|stop| *stop).await.map(|_| ());
}

fn close(code: u16, reason: &'static str) -> Frame {
    Frame::Close(Some(CloseFrame {
        code,
        reason: reason.into(),
    }))
}

/// Receives this connection's chat lines from its channel and offers them to its outbox
/// (never waiting on the browser). Returns when receiving fails (the layer closed).
async fn receive(app: Arc<App>, channel: String, outbox: Outbox<Frame>) -> chanlayer::Error {
    loop {
        let msg = match app.layer.receive(&channel).await {
            Ok(msg) => msg,
            Err(e) => return e,
        };
        let line = match msg.message_type() {
            CHAT_MESSAGE_TYPE => msg.decode::<ChatMessage>(),
            other => Err(chanlayer::Error::InvalidMessage(format!(
                "unexpected type {other:?}"
            ))),
        };
        let line = match line {
            Ok(line) => line,
            Err(e) => {
                app.counters.undecodable.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%channel, "skipped a message: {e}");
                continue;
            }
        };
        match outbox.offer(Frame::Text(Event::Message(&line).to_json().into())) {
            Offer::Queued => {
                app.counters.delivered.fetch_add(1, Ordering::Relaxed);
            }
            Offer::Dropped => {}
            // The connection is ending; it aborts this task.
            Offer::Closed => std::future::pending::<()>().await,
        }
    }
}

/// Frames written before one flush.
const WRITE_BATCH: usize = 64;

/// Writes the connection's frames: replies first, then chat lines (and, after lines, a
/// notice of how many were dropped since the last), and a ping every `ping_every`. What is
/// waiting is written as one batch (up to [`WRITE_BATCH`] frames, one flush), which must be
/// taken within `write_timeout`. Ends after a close frame, when the reader is gone and
/// nothing is left to say, or when the socket fails or stalls.
async fn write(
    app: Arc<App>,
    mut sink: SplitSink<WebSocket, Frame>,
    mut replies: mpsc::Receiver<Frame>,
    mut lines: OutboxReader<Frame>,
) -> End {
    let settings = &app.settings;
    let mut ping =
        tokio::time::interval_at(Instant::now() + settings.ping_every, settings.ping_every);
    let mut lines_open = true;
    let mut batch = Vec::with_capacity(WRITE_BATCH + 1);
    loop {
        let first = tokio::select! {
            biased;
            reply = replies.recv() => match reply {
                Some(frame) => frame,
                None => return End::ClientClosed,
            },
            line = lines.recv(), if lines_open => match line {
                Some(frame) => frame,
                // The receiver is gone (the connection is ending): the reader's farewell
                // comes through `replies`.
                None => {
                    lines_open = false;
                    continue;
                }
            },
            _ = ping.tick() => Frame::Ping(Default::default()),
        };
        batch.push(first);
        while batch.len() < WRITE_BATCH && !matches!(batch.last(), Some(Frame::Close(_))) {
            if let Ok(reply) = replies.try_recv() {
                batch.push(reply);
            } else if let Some(line) = lines.try_recv() {
                batch.push(line);
            } else {
                break;
            }
        }
        let dropped = lines.take_dropped();
        if dropped > 0 {
            let notice = Event::Dropped { count: dropped }.to_json();
            batch.push(Frame::Text(notice.into()));
        }
        let last = batch.iter().any(|f| matches!(f, Frame::Close(_)));
        if let Err(end) = put(&app, &mut sink, &mut batch).await {
            return end;
        }
        if last {
            return End::ClientClosed;
        }
    }
}

/// Writes `batch` (emptying it) and flushes, within `write_timeout`.
async fn put(
    app: &App,
    sink: &mut SplitSink<WebSocket, Frame>,
    batch: &mut Vec<Frame>,
) -> Result<(), End> {
    let write = async {
        for frame in batch.drain(..) {
            sink.feed(frame).await?;
        }
        sink.flush().await
    };
    match tokio::time::timeout(app.settings.write_timeout, write).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(End::ClientGone),
        Err(_) => {
            app.counters.closed_stalled.fetch_add(1, Ordering::Relaxed);
            Err(End::Stalled)
        }
    }
}

impl Connection {
    async fn run(
        &mut self,
        stream: &mut SplitStream<WebSocket>,
        receiving: &mut JoinHandle<chanlayer::Error>,
        writing: &mut JoinHandle<End>,
    ) -> End {
        let settings = self.app.settings.clone();
        let hello = Event::Hello {
            server: &settings.server_id,
            backend: self.app.layer.capabilities().backend,
        }
        .to_json();
        if self.reply(hello).await.is_err() {
            return End::ClientGone;
        }
        let mut stopping = self.app.stopping.clone();
        let mut idle_check =
            tokio::time::interval_at(Instant::now() + settings.ping_every, settings.ping_every);
        // Memberships expire after group_expiry unless refreshed by group_add.
        let refresh_every = (self.app.layer.options().group_expiry / 2).max(Duration::from_secs(1));
        let mut refresh = tokio::time::interval_at(Instant::now() + refresh_every, refresh_every);
        let mut last_heard = Instant::now();
        loop {
            tokio::select! {
                () = stopped(&mut stopping) => return End::Stopping,
                failed = &mut *receiving => {
                    return End::LayerFailed(match failed {
                        Ok(e) => e.to_string(),
                        Err(e) => format!("receiver task: {e}"),
                    });
                }
                ended = &mut *writing => {
                    return ended.unwrap_or_else(|e| End::LayerFailed(format!("writer task: {e}")));
                }
                incoming = stream.next() => match incoming {
                    None | Some(Err(_)) => return End::ClientGone,
                    Some(Ok(Frame::Close(_))) => return End::ClientClosed,
                    Some(Ok(Frame::Text(text))) => {
                        last_heard = Instant::now();
                        if let Some(reply) = self.handle(text.as_str()).await {
                            if self.reply(reply).await.is_err() {
                                return End::ClientGone;
                            }
                        }
                        // A client that pipelines many requests would otherwise keep this
                        // task running (a local group_send is ready at once) while the
                        // receivers it feeds wait: let them run between requests.
                        tokio::task::yield_now().await;
                    }
                    Some(Ok(Frame::Binary(_))) => {
                        last_heard = Instant::now();
                        let reply = self.refuse("send requests as JSON text frames");
                        if self.reply(reply).await.is_err() {
                            return End::ClientGone;
                        }
                    }
                    Some(Ok(Frame::Ping(_) | Frame::Pong(_))) => last_heard = Instant::now(),
                },
                _ = idle_check.tick() => {
                    if last_heard.elapsed() >= settings.idle_timeout {
                        self.app.counters.closed_stalled.fetch_add(1, Ordering::Relaxed);
                        return End::Idle;
                    }
                }
                _ = refresh.tick() => self.refresh().await,
            }
        }
    }

    /// Hands a reply to the writer (waits while it is behind; fails once it has ended).
    async fn reply(&self, json: String) -> Result<(), ()> {
        self.replies
            .send(Frame::Text(json.into()))
            .await
            .map_err(|_| ())
    }

    /// Does what a request asks; returns the event to answer with (JSON), if any.
    async fn handle(&mut self, frame: &str) -> Option<String> {
        let request = match Request::parse(frame) {
            Ok(request) => request,
            Err(why) => return Some(self.refuse(&why)),
        };
        let layer = &self.app.layer;
        match request {
            Request::Join(room) => {
                if !self.rooms.contains(&room) && self.rooms.len() >= self.app.settings.max_rooms {
                    return Some(self.refuse(&format!(
                        "at most {} rooms per connection",
                        self.app.settings.max_rooms
                    )));
                }
                // group_add is idempotent: joining again refreshes the membership.
                if let Err(e) = layer.group_add(&group_of(&room), &self.channel).await {
                    return Some(self.refuse(&format!("could not join {room}: {e}")));
                }
                if self.rooms.insert(room.clone()) {
                    self.app
                        .counters
                        .memberships
                        .fetch_add(1, Ordering::Relaxed);
                }
                Some(Event::Joined { room: &room }.to_json())
            }
            Request::Leave(room) => {
                if let Err(e) = layer.group_discard(&group_of(&room), &self.channel).await {
                    return Some(self.refuse(&format!("could not leave {room}: {e}")));
                }
                if self.rooms.remove(&room) {
                    self.app
                        .counters
                        .memberships
                        .fetch_sub(1, Ordering::Relaxed);
                }
                Some(Event::Left { room: &room }.to_json())
            }
            Request::Say { room, text, name } => {
                if !self.rooms.contains(&room) {
                    return Some(
                        self.refuse(&format!("join {room} before saying something in it")),
                    );
                }
                let line = ChatMessage {
                    room,
                    text,
                    name,
                    server: self.app.settings.server_id.clone(),
                    sent_ms: crate::now_ms(),
                };
                if let Err(e) = layer.group_send(&group_of(&line.room), &line).await {
                    return Some(self.refuse(&format!("could not send to {}: {e}", line.room)));
                }
                self.app.counters.said.fetch_add(1, Ordering::Relaxed);
                // The sender sees its own line when it comes back through the layer.
                None
            }
        }
    }

    fn refuse(&self, why: &str) -> String {
        self.app.counters.refused.fetch_add(1, Ordering::Relaxed);
        Event::Error { error: why }.to_json()
    }

    /// Re-adds every room, so memberships outlive `group_expiry` while the connection lives.
    async fn refresh(&mut self) {
        for room in &self.rooms {
            if let Err(e) = self
                .app
                .layer
                .group_add(&group_of(room), &self.channel)
                .await
            {
                tracing::warn!(channel = %self.channel, %room, "refreshing a membership failed: {e}");
            }
        }
    }

    /// Leaves every room (each within [`LEAVE_TIMEOUT`]); returns how many were left.
    async fn leave_all(&mut self) -> usize {
        let rooms = std::mem::take(&mut self.rooms);
        let n = rooms.len();
        for room in rooms {
            let group = group_of(&room);
            let discard = self.app.layer.group_discard(&group, &self.channel);
            match tokio::time::timeout(LEAVE_TIMEOUT, discard).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(channel = %self.channel, %room, "group_discard failed: {e}")
                }
                Err(_) => tracing::warn!(channel = %self.channel, %room, "group_discard timed out"),
            }
            self.app
                .counters
                .memberships
                .fetch_sub(1, Ordering::Relaxed);
        }
        n
    }
}
