//! Broker-side names and declarations: the instance's inbox queue, a durable queue per normal
//! channel, and the groups exchange.
//!
//! ```text
//!                      default exchange ("")                 {prefix}.inbox.{instance}
//! send("ws.ID!r") ──── routing key {prefix}.inbox.ID ───────▶ [exclusive, x-max-length,
//!                                                              x-message-ttl, reject-publish]
//! send("jobs") ─────── routing key {prefix}.channel.jobs ───▶ {prefix}.channel.jobs
//!                                                             [durable, x-max-length,
//!                                                              reject-publish]
//! group_send("room") ─ {groups exchange} (direct) ─ key "room" ─▶ every inbox with a local
//!                                                                member, every normal-channel
//!                                                                queue that is a member
//! ```
//!
//! Every name starts with the layer's `prefix`, so two applications on one vhost with
//! different prefixes never share a queue.

use std::time::Duration;

use chanlayer_core::LayerOptions;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

/// Queue and exchange names for one layer instance.
#[derive(Debug, Clone)]
pub struct Names {
    prefix: String,
    /// The groups exchange.
    pub groups_exchange: String,
    /// This instance's inbox queue.
    pub inbox: String,
}

impl Names {
    /// Names for the instance `instance` with layer prefix `prefix`.
    pub fn new(prefix: &str, groups_exchange: &str, instance: &str) -> Self {
        Names {
            prefix: prefix.to_owned(),
            groups_exchange: groups_exchange.to_owned(),
            inbox: inbox_queue(prefix, instance),
        }
    }

    /// The inbox queue of the instance owning process-local channels with id `instance`.
    pub fn inbox_of(&self, instance: &str) -> String {
        inbox_queue(&self.prefix, instance)
    }

    /// The durable queue of normal channel `channel`.
    pub fn channel_queue(&self, channel: &str) -> String {
        format!("{}.channel.{channel}", self.prefix)
    }
}

fn inbox_queue(prefix: &str, instance: &str) -> String {
    format!("{prefix}.inbox.{instance}")
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn long(n: i64) -> AMQPValue {
    AMQPValue::LongLongInt(n)
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

/// Arguments of an inbox queue: length limit with reject-publish, and the message TTL
/// ([`broker_ttl`]).
pub fn inbox_arguments(inbox_capacity: u32, options: &LayerOptions) -> FieldTable {
    let mut t = FieldTable::default();
    t.insert(
        ShortString::from("x-max-length"),
        long(i64::from(inbox_capacity)),
    );
    t.insert(ShortString::from("x-overflow"), text("reject-publish"));
    t.insert(
        ShortString::from("x-message-ttl"),
        long(millis(broker_ttl(options))),
    );
    t
}

/// Arguments of a normal channel's queue: its capacity with reject-publish, and the optional
/// queue expiry. The message TTL travels per message, so instances with other `expiry`
/// settings can share the queue.
pub fn channel_arguments(capacity: usize, queue_expires: Option<Duration>) -> FieldTable {
    let mut t = FieldTable::default();
    t.insert(
        ShortString::from("x-max-length"),
        long(i64::try_from(capacity).unwrap_or(i64::MAX)),
    );
    t.insert(ShortString::from("x-overflow"), text("reject-publish"));
    if let Some(e) = queue_expires {
        t.insert(ShortString::from("x-expires"), long(millis(e).max(1)));
    }
    t
}

/// How long the broker keeps a message: `expiry` plus a grace of `expiry` (at least 10 s, at
/// most one hour). chanlayer itself drops and counts messages past `expiry` when they are
/// received; the broker's TTL only removes, later and uncounted, what nobody received.
pub fn broker_ttl(options: &LayerOptions) -> Duration {
    let grace = options
        .expiry
        .clamp(Duration::from_secs(10), Duration::from_secs(3600));
    options.expiry.saturating_add(grace)
}

/// The per-message TTL (`expiration` property, milliseconds as text): [`broker_ttl`].
pub fn expiration(options: &LayerOptions) -> ShortString {
    ShortString::from(millis(broker_ttl(options)).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_keep_names_apart() {
        let a = Names::new("app1", "app1.groups", "abc");
        let b = Names::new("app2", "app2.groups", "abc");
        assert_ne!(a.inbox, b.inbox);
        assert_ne!(a.channel_queue("jobs"), b.channel_queue("jobs"));
        assert_eq!(a.channel_queue("jobs"), "app1.channel.jobs");
        assert_eq!(a.inbox_of("xyz"), "app1.inbox.xyz");
        // A channel can't be named like an inbox: channel queues have their own segment.
        assert_ne!(a.channel_queue("inbox.abc"), a.inbox);
    }
}
