//! Groups: a direct exchange, routing key = group name.
//!
//! - A process-local member: the instance records it in its local [`GroupRegistry`] and binds
//!   its inbox queue to the group on the first local member (unbinds on the last). A group
//!   message reaches each instance once and is fanned out there to its local members.
//! - A normal-channel member: the channel's durable queue is bound to the group (one copy per
//!   queue, read by one of its competing consumers). The instance that added it keeps the
//!   membership's expiry and unbinds it when it expires or is discarded.
//!
//! Memberships expire after `group_expiry` unless refreshed by `group_add`; a background task
//! unbinds groups whose last membership expired.
//!
//! [`GroupRegistry`]: chanlayer_core::GroupRegistry

use std::sync::Arc;
use std::time::Duration;

use chanlayer_core::{names, Error, Result};
use lapin::options::QueueBindOptions;
use lapin::types::{FieldTable, ShortString};

use crate::layer::Inner;
use crate::session::{backend, lock, Session};

/// Binds (`bind = true`) or unbinds `queue` and `group` on the groups exchange.
async fn binding(
    inner: &Inner,
    session: &Session,
    queue: &str,
    group: &str,
    bind: bool,
) -> Result<()> {
    let _one = inner.admin_ops.lock().await;
    let admin = session.admin().await?;
    let (q, x, key) = (
        ShortString::from(queue),
        ShortString::from(inner.names.groups_exchange.as_str()),
        ShortString::from(group),
    );
    let r = if bind {
        admin
            .queue_bind(
                q,
                x,
                key,
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
    } else {
        admin.queue_unbind(q, x, key, FieldTable::default()).await
    };
    let verb = if bind { "bind" } else { "unbind" };
    r.map_err(|e| {
        backend(
            &format!("could not {verb} {queue:?} and group {group:?}"),
            e,
        )
    })
}

/// `group_add`.
pub(crate) async fn add(inner: &Arc<Inner>, group: &str, channel: &str) -> Result<()> {
    let _guard = inner.bindings.lock().await;
    let session = inner.session().await?;
    if names::is_process_local(channel) {
        if names::owner_instance(channel) != Some(inner.id.as_str()) {
            return Err(Error::NotOwner {
                channel: channel.to_owned(),
            });
        }
        if inner
            .local_groups
            .add(group, channel, inner.options.group_expiry)
        {
            if let Err(e) = binding(inner, &session, &inner.names.inbox, group, true).await {
                inner.local_groups.discard(group, channel);
                return Err(e);
            }
        }
        return Ok(());
    }
    inner.declare_channel_queue(&session, channel).await?;
    binding(
        inner,
        &session,
        &inner.names.channel_queue(channel),
        group,
        true,
    )
    .await?;
    inner
        .normal_groups
        .add(group, channel, inner.options.group_expiry);
    lock(&inner.normal_bound).insert((group.to_owned(), channel.to_owned()));
    Ok(())
}

/// `group_discard`.
pub(crate) async fn discard(inner: &Arc<Inner>, group: &str, channel: &str) -> Result<()> {
    let _guard = inner.bindings.lock().await;
    if names::is_process_local(channel) {
        if inner.local_groups.discard(group, channel) {
            let session = inner.session().await?;
            binding(inner, &session, &inner.names.inbox, group, false).await?;
        }
        return Ok(());
    }
    inner.normal_groups.discard(group, channel);
    lock(&inner.normal_bound).remove(&(group.to_owned(), channel.to_owned()));
    // Bindings are shared at the broker: unbind even if another instance added it.
    let session = inner.session().await?;
    binding(
        inner,
        &session,
        &inner.names.channel_queue(channel),
        group,
        false,
    )
    .await
}

/// Unbinds what expired: groups left without local members, normal-channel memberships not
/// refreshed in time.
pub(crate) async fn prune(inner: &Arc<Inner>) -> Result<()> {
    let _guard = inner.bindings.lock().await;
    let emptied = inner.local_groups.prune_expired();
    let stale: Vec<(String, String)> = lock(&inner.normal_bound)
        .iter()
        .filter(|(g, c)| !inner.normal_groups.members(g).iter().any(|m| **m == **c))
        .cloned()
        .collect();
    if emptied.is_empty() && stale.is_empty() {
        return Ok(());
    }
    let session = inner.session().await?;
    for g in emptied {
        binding(inner, &session, &inner.names.inbox, &g, false).await?;
    }
    for (g, c) in stale {
        binding(inner, &session, &inner.names.channel_queue(&c), &g, false).await?;
        lock(&inner.normal_bound).remove(&(g, c));
    }
    Ok(())
}

/// Removes every membership this instance knows and its bindings (`flush`).
pub(crate) async fn clear(inner: &Arc<Inner>) -> Result<()> {
    let _guard = inner.bindings.lock().await;
    let session = inner.session().await?;
    for g in inner.local_groups.clear() {
        binding(inner, &session, &inner.names.inbox, &g, false).await?;
    }
    inner.normal_groups.clear();
    let bound: Vec<(String, String)> = lock(&inner.normal_bound).drain().collect();
    for (g, c) in bound {
        binding(inner, &session, &inner.names.channel_queue(&c), &g, false).await?;
    }
    Ok(())
}

/// After a reconnection: binds this instance's normal-channel memberships again (a broker that
/// lost its definitions has none).
pub(crate) async fn rebind_normal(inner: &Arc<Inner>, session: &Session) -> Result<()> {
    let bound: Vec<(String, String)> = lock(&inner.normal_bound).iter().cloned().collect();
    for (g, c) in bound {
        inner.declare_channel_queue(session, &c).await?;
        binding(inner, session, &inner.names.channel_queue(&c), &g, true).await?;
    }
    Ok(())
}

/// Runs [`prune`] every `min(group_expiry, 60 s)` until the layer closes.
pub(crate) async fn prune_task(inner: Arc<Inner>) {
    let every = inner
        .options
        .group_expiry
        .clamp(Duration::from_millis(100), Duration::from_secs(60));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = inner.closed.closed() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = prune(&inner).await {
            tracing::debug!(error = %e, "group expiry sweep failed; retrying on the next tick");
        }
    }
}
