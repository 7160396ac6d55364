//! Group membership expiry: the background task of each layer instance that unbinds
//! memberships the moment they expire (so an expired membership receives nothing on any
//! backend), and the group state it shares with [`TransportLayer`](crate::toolkit::TransportLayer).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::Notify;

use crate::inbound::Inbound;
use crate::transport::Transport;

/// Group bookkeeping shared with the expiry task.
#[derive(Default)]
pub(crate) struct GroupState {
    /// Serialises binding changes, so a first-member bind and a last-member unbind of one
    /// group cannot cross.
    pub bindings: tokio::sync::Mutex<()>,
    /// Wakes the expiry task when a membership appears while it has none to wait for.
    pub wake: Notify,
    /// `true` while the expiry task has no membership to wait for (set by the task before
    /// it looks).
    pub idle: AtomicBool,
}

/// Unbinds memberships as they expire, until the layer closes (or is dropped). Unbinds that
/// fail (the broker is away) are tried again on the next pass.
pub(crate) async fn expiry_task<T: Transport>(
    transport: Weak<T>,
    inbound: Arc<Inbound>,
    groups: Arc<GroupState>,
) {
    /// How soon a failed unbind is tried again.
    const RETRY: Duration = Duration::from_secs(1);
    // Unbinds to try again: (group, None) for a group without local members left,
    // (group, Some(channel)) for a normal channel's membership.
    let mut failed: Vec<(String, Option<String>)> = Vec::new();
    loop {
        // Set before looking, so a membership added after the look sees it and wakes us.
        groups.idle.store(true, Ordering::SeqCst);
        let retry = (!failed.is_empty()).then(|| std::time::Instant::now() + RETRY);
        let wake_at = [
            inbound.groups().next_expiry(),
            inbound.normal_groups().next_expiry(),
            retry,
        ];
        let wake_at = wake_at.into_iter().flatten().min();
        groups.idle.store(wake_at.is_none(), Ordering::SeqCst);
        let sleep = async {
            match wake_at {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = inbound.closed().closed() => return,
            _ = groups.wake.notified() => continue,
            _ = sleep => {}
        }
        let Some(transport) = transport.upgrade() else {
            return;
        };
        let _one = groups.bindings.lock().await;
        if inbound.closed().is_closed() {
            return;
        }
        let groups = inbound.groups().prune_expired().into_iter();
        failed.extend(groups.map(|(g, _)| (g, None)));
        let pairs = inbound.normal_groups().prune_expired().into_iter();
        failed.extend(pairs.map(|(g, c)| (g, Some(c))));
        failed.sort_unstable();
        failed.dedup();
        let mut still = Vec::new();
        for (g, c) in failed.drain(..) {
            // Re-added meanwhile: bound again, nothing to undo.
            let r = match &c {
                None if inbound.groups().has_members(&g) => continue,
                Some(c) if inbound.normal_groups().is_member(&g, c) => continue,
                None => transport.unbind_group(&g).await,
                Some(c) => transport.unbind_normal(&g, c).await,
            };
            if let Err(e) = r {
                tracing::debug!(group = %g, channel = ?c, error = %e, "unbinding an expired membership failed; trying again");
                still.push((g, c));
            }
        }
        failed = still;
    }
}
