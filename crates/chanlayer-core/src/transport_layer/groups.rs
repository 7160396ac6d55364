//! Group bookkeeping of [`TransportLayer`]: adding and removing memberships, bound at the
//! transport on a group's first local member and unbound on its last (expiry is
//! [`expiry`](crate::expiry)'s task).

use std::sync::atomic::Ordering;

use super::TransportLayer;
use crate::error::Result;
use crate::names;
use crate::transport::Transport;

impl<T: Transport> TransportLayer<T> {
    /// Adds `channel` to `group`: registered, then bound at the transport on the group's
    /// first local member (a failed bind takes the membership back).
    pub(super) async fn group_add_op(&self, group: &str, channel: &str) -> Result<()> {
        let i = &self.inbound;
        i.closed().check()?;
        names::validate_group(group)?;
        // Memberships live where the messages arrive: only the owner adds its channel.
        i.naming().check_receiver(channel, i.id())?;
        self.check_kind("group_add", channel)?;
        let expiry = i.options().group_expiry;
        let _one = self.groups.bindings.lock().await;
        if names::is_process_local(channel) || T::NORMAL_VIA_INBOX {
            // Registered first, then bound: what arrives once the group is bound finds its
            // member. A failed bind takes the new membership back.
            if i.groups().add(group, channel, expiry) {
                if let Err(e) = self.transport.bind_group(group).await {
                    i.groups().discard(group, channel);
                    return Err(e);
                }
            }
        } else {
            self.transport.bind_normal(group, channel).await?;
            i.normal_groups().add(group, channel, expiry);
        }
        // Memberships expire in the order they were refreshed, so only a task with nothing
        // to wait for needs waking.
        if self.groups.idle.load(Ordering::SeqCst) {
            self.groups.wake.notify_one();
        }
        Ok(())
    }

    /// Removes `channel` from `group`, unbinding at the transport on the group's last
    /// local member.
    pub(super) async fn group_discard_op(&self, group: &str, channel: &str) -> Result<()> {
        let i = &self.inbound;
        i.closed().check()?;
        names::validate_group(group)?;
        names::validate_channel(channel)?;
        self.check_kind("group_discard", channel)?;
        let _one = self.groups.bindings.lock().await;
        if names::is_process_local(channel) || T::NORMAL_VIA_INBOX {
            if i.groups().discard(group, channel) {
                self.transport.unbind_group(group).await?;
            }
        } else {
            i.normal_groups().discard(group, channel);
            // Bindings of a normal channel are shared at the broker: unbind even if another
            // instance added it.
            self.transport.unbind_normal(group, channel).await?;
        }
        Ok(())
    }
}
