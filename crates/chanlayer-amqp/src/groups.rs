//! Groups: a direct exchange, routing key = group name.
//!
//! - A process-local member: core binds this instance's inbox queue to the group on the
//!   group's first local member (and unbinds it on the last). A group message reaches each
//!   instance once and core fans it out there to its local members.
//! - A normal-channel member: the channel's durable queue is bound to the group (one copy per
//!   queue, read by one of its competing consumers). Core unbinds it when the membership is
//!   discarded or expires (at the instant it expires), so an expired membership receives
//!   nothing.

use chanlayer_core::Result;
use lapin::options::QueueBindOptions;
use lapin::types::FieldTable;
use lapin::Channel;

use crate::session::{backend, Session};
use crate::shared::Shared;

/// Binds (`bind = true`) or unbinds `queue` and `group` on the groups exchange.
pub(crate) async fn binding(
    shared: &Shared,
    session: &Session,
    queue: &str,
    group: &str,
    bind: bool,
) -> Result<()> {
    let _one = shared.admin_ops.lock().await;
    let admin = session.admin().await?;
    bind_on(&admin, &shared.names.groups, queue, group, bind).await
}

/// [`binding`] on the admin channel `admin`, for the groups exchange `exchange`.
pub(crate) async fn bind_on(
    admin: &Channel,
    exchange: &str,
    queue: &str,
    group: &str,
    bind: bool,
) -> Result<()> {
    let (q, x, key) = (queue.into(), exchange.into(), group.into());
    let none = FieldTable::default();
    let (r, verb) = if bind {
        let options = QueueBindOptions::default();
        (admin.queue_bind(q, x, key, options, none).await, "bind")
    } else {
        (admin.queue_unbind(q, x, key, none).await, "unbind")
    };
    let what = format!("could not {verb} {queue:?} and group {group:?}");
    r.map_err(|e| backend(&what, e))
}

/// After a reconnection: binds this instance's live normal-channel memberships again (a
/// broker that lost its definitions has none).
pub(crate) async fn rebind_normal(shared: &Shared, session: &Session) -> Result<()> {
    for (g, c) in shared.inbound.normal_groups().pairs() {
        shared.declare_channel_queue(session, &c).await?;
        binding(shared, session, &shared.names.channel(&c), &g, true).await?;
    }
    Ok(())
}
