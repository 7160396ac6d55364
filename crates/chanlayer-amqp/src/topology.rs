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

use crate::config::Wire;

pub use chanlayer_core::names::BrokerNames as Names;

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
/// ([`broker_ttl`]; exactly `expiry` on `channels_rabbitmq`'s wire, as it declares).
pub fn inbox_arguments(inbox_capacity: u32, options: &LayerOptions, wire: Wire) -> FieldTable {
    let mut t = FieldTable::default();
    t.insert(
        ShortString::from("x-max-length"),
        long(i64::from(inbox_capacity)),
    );
    t.insert(ShortString::from("x-overflow"), text("reject-publish"));
    t.insert(
        ShortString::from("x-message-ttl"),
        long(millis(match wire {
            Wire::Chanlayer => broker_ttl(options),
            Wire::ChannelsRabbitmq => options.expiry,
        })),
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
