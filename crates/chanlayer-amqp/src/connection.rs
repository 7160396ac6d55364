//! The connection's lifecycle: connect, set up the topology, notice a lost connection,
//! reconnect with backoff, and set everything up again.
//!
//! With several hosts in the URL (the nodes of one cluster), a connection goes to the first
//! that answers, trying them in the URL's order; a reconnection starts with the host after
//! the one whose connection was lost, so a node that just failed is tried last.
//!
//! The layer publishes the current [`Session`] through a watch channel (`None` while the
//! broker is away); operations wait for a session up to `reconnect_timeout`. After a
//! reconnection the inbox queue is declared again under the same name (so this instance's
//! process-local channel names stay valid), every group with a local member is bound again,
//! normal-channel memberships are bound again, and normal-channel consumers restart on their
//! next receive.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chanlayer_core::{Error, Result};
use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueDeclareOptions,
};
use lapin::types::{FieldTable, LongString, ShortString};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};
use tokio::sync::Notify;

use crate::config::Wire;
use crate::session::{backend, Session};
use crate::shared::Shared;
use crate::topology;

/// Connects to the first of the URL's hosts that answers, starting with host number `first`
/// and going round, and sets up the whole topology for `generation`. One pass: every host
/// is tried once; the error of a single host is its own, that of several lists each host's.
pub(crate) async fn open(
    inner: &Arc<Shared>,
    generation: u64,
    first: usize,
) -> Result<Arc<Session>> {
    let cfg = &inner.cfg;
    let n = cfg.hosts.len().max(1);
    let mut failures = Vec::new();
    for k in 0..n {
        let index = (first + k) % n;
        match open_host(inner, generation, index).await {
            Ok(s) => return Ok(s),
            Err(e) if n == 1 => return Err(e),
            Err(e) => {
                let address = cfg.host_address(index);
                tracing::debug!(broker = %address, error = %e, "could not connect to this AMQP host; trying the next");
                let text = e.to_string();
                // Errors of the connection itself name the host already; setup errors don't.
                failures.push(if text.contains(&address) {
                    text
                } else {
                    format!("{address}: {text}")
                });
            }
        }
    }
    let (at, failures) = (cfg.display_address(), failures.join("; "));
    let m = format!("could not connect to any of the {n} hosts of {at}: {failures}");
    Err(Error::failure(crate::BACKEND, m))
}

/// Connects to host number `index` and sets up the whole topology for `generation`.
async fn open_host(inner: &Arc<Shared>, generation: u64, index: usize) -> Result<Arc<Session>> {
    let cfg = &inner.cfg;
    let name = cfg
        .connection_name
        .clone()
        .unwrap_or_else(|| format!("chanlayer {}", inner.inbound.id()));
    let props = ConnectionProperties::default().with_connection_name(LongString::from(name));
    let runtime = lapin::runtime::default_runtime()
        .map_err(|e| backend("no tokio runtime to run the AMQP connection on", e))?;
    let (uri, tls) = (cfg.lapin_uri(index), inner.tls.clone());
    let attempt = Connection::connect_uri_with_config(uri, props, tls, runtime);
    let after = cfg.connection_timeout;
    let refused = format!("could not connect to {}", cfg.host_address(index));
    let conn = tokio::time::timeout(after, attempt)
        .await
        .map_err(|_| Error::Timeout {
            operation: "connect",
            after,
        })?
        .map_err(|e| backend(&refused, e))?;
    let (publish, admin, inbox_channel, consumer) = match setup(inner, &conn).await {
        Ok(channels) => channels,
        Err(e) => {
            let _ = conn.close(200, ShortString::from("setup failed")).await;
            return Err(e);
        }
    };
    tokio::spawn(crate::inbox::run(inner.clone(), consumer, inbox_channel));
    Ok(Arc::new(Session {
        conn,
        publish,
        admin: Mutex::new(admin),
        generation,
        host: index,
        broken: Notify::new(),
    }))
}

/// The channels of a new connection: publish (with confirms), admin, inbox consumer.
async fn setup(
    inner: &Arc<Shared>,
    conn: &Connection,
) -> Result<(Channel, Channel, Channel, lapin::Consumer)> {
    let (cfg, groups, inbox) = (&inner.cfg, &inner.names.groups, &inner.names.inbox);
    let open = |what: &'static str| async move {
        conn.create_channel()
            .await
            .map_err(|e| backend(&format!("could not open the {what} channel"), e))
    };
    let publish = open("publish").await?;
    publish
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| backend("could not enable publisher confirms", e))?;
    let admin = open("admin").await?;
    let (x, q, no_args) = (groups.as_str(), inbox.as_str(), FieldTable::default);
    let options = ExchangeDeclareOptions {
        // channels_rabbitmq declares `groups` non-durable; a peer must declare it with the
        // same arguments or the broker refuses (406).
        durable: cfg.wire == Wire::Chanlayer,
        ..ExchangeDeclareOptions::default()
    };
    let declared = admin.exchange_declare(x.into(), ExchangeKind::Direct, options, no_args());
    let what = format!(
        "could not declare the groups exchange {groups:?} (does it exist with another type?)"
    );
    declared.await.map_err(|e| backend(&what, e))?;
    let options = QueueDeclareOptions {
        exclusive: true,
        ..QueueDeclareOptions::default()
    };
    let args = topology::inbox_arguments(cfg.inbox_capacity, inner.inbound.options(), cfg.wire);
    let declared = admin.queue_declare(q.into(), options, args).await;
    declared.map_err(|e| backend("could not declare this instance's inbox queue", e))?;
    // Groups with local members: bind the inbox again (a new broker has no bindings).
    for group in inner.inbound.groups().groups() {
        crate::groups::bind_on(&admin, groups, inbox, &group, true).await?;
    }
    let inbox_channel = open("inbox").await?;
    let options = BasicConsumeOptions {
        no_ack: true,
        exclusive: true,
        ..BasicConsumeOptions::default()
    };
    let tag = format!("chanlayer-inbox-{}", inner.inbound.id());
    let consuming = inbox_channel.basic_consume(q.into(), tag.into(), options, no_args());
    let what = "could not consume this instance's inbox queue";
    let consumer = consuming.await.map_err(|e| backend(what, e))?;
    Ok((publish, admin, inbox_channel, consumer))
}

/// Watches the session: when its connection is lost, reconnects with backoff (100 ms doubling
/// to 5 s between passes over the hosts, starting with the host after the lost one) until it
/// succeeds or the layer closes; then binds this instance's live
/// normal-channel memberships again (`groups::rebind_normal`: a broker that lost its
/// definitions has none).
pub(crate) async fn supervise(inner: Arc<Shared>, mut session: Arc<Session>) {
    loop {
        let mut events = session.conn.events_listener();
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        while session.alive() {
            tokio::select! {
                _ = inner.inbound.closed().closed() => {
                    let _ = session.close(200, "closed", Duration::from_secs(2)).await;
                    return;
                }
                _ = session.broken.notified() => {}
                ev = events.next() => {
                    if ev.is_none() {
                        // The listener ended: the connection is gone for good.
                        break;
                    }
                }
                _ = tick.tick() => {}
            }
        }
        if inner.inbound.closed().is_closed() {
            return;
        }
        inner.session.send_replace(None);
        // Release what the old connection holds (its exclusive inbox) before declaring anew.
        let _ = (session.close(320, "chanlayer reconnecting", Duration::from_secs(2))).await;
        let broker = inner.cfg.host_address(session.host);
        tracing::warn!(%broker, "AMQP connection lost; reconnecting");
        let mut delay = Duration::from_millis(100);
        let generation = session.generation + 1;
        let first = session.host + 1;
        session = loop {
            match open(&inner, generation, first).await {
                Ok(s) => break s,
                Err(e) => {
                    tracing::debug!(error = %e, "AMQP reconnect attempt failed; retrying in {delay:?}");
                }
            }
            tokio::select! {
                _ = inner.inbound.closed().closed() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(5));
        };
        if let Err(e) = crate::groups::rebind_normal(&inner, &session).await {
            tracing::warn!(error = %e, "could not bind normal-channel group members again");
        }
        inner.inbound.stats().record_reconnect();
        let broker = inner.cfg.host_address(session.host);
        tracing::info!(%broker, generation, "AMQP connection restored");
        inner.session.send_replace(Some(session.clone()));
    }
}
