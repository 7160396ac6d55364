//! Broker-side names and declarations: the instance's inbox queue, a durable queue per normal
//! channel, and the groups exchange.
//!
//! ```text
//!                      default exchange ("")                 {prefix}.inbox.{instance}
//! send("ws.ID!r") ──── routing key {prefix}.inbox.ID ───────▶ [exclusive, x-max-length,
//!                                                              x-message-ttl, reject-publish]
//! send("jobs") ─────── routing key {prefix}.channel.jobs ───▶ {prefix}.channel.jobs
//!                                                             [durable, x-max-length,
//!                                                              reject-publish; with
//!                                                              queue_type=quorum
//!                                                              x-queue-type=quorum]
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

use crate::config::{QueueType, Wire};

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

/// A queue's arguments: a length limit of `max_length` messages, with reject-publish.
fn limited(max_length: i64) -> FieldTable {
    let mut t = FieldTable::default();
    t.insert("x-max-length".into(), long(max_length));
    t.insert("x-overflow".into(), text("reject-publish"));
    t
}

/// Arguments of an inbox queue: length limit with reject-publish, and the message TTL
/// ([`broker_ttl`]; exactly `expiry` on `channels_rabbitmq`'s wire, as it declares).
pub fn inbox_arguments(inbox_capacity: u32, options: &LayerOptions, wire: Wire) -> FieldTable {
    let ttl = match wire {
        Wire::Chanlayer => broker_ttl(options),
        Wire::ChannelsRabbitmq => options.expiry,
    };
    let mut t = limited(i64::from(inbox_capacity));
    t.insert("x-message-ttl".into(), long(millis(ttl)));
    t
}

/// Arguments of a normal channel's queue: its capacity with reject-publish, the optional
/// queue expiry, and `x-queue-type=quorum` for a quorum queue (a classic queue is declared
/// without `x-queue-type`, as before the option existed, so existing queues still match).
/// The message TTL travels per message (the `expiration` property, which quorum queues
/// honour since RabbitMQ 3.10), so instances with other `expiry` settings can share the
/// queue.
pub fn channel_arguments(
    capacity: usize,
    queue_expires: Option<Duration>,
    queue_type: QueueType,
) -> FieldTable {
    let mut t = limited(i64::try_from(capacity).unwrap_or(i64::MAX));
    if queue_type == QueueType::Quorum {
        t.insert(QUEUE_TYPE.into(), text("quorum"));
    }
    if let Some(e) = queue_expires {
        t.insert("x-expires".into(), long(millis(e).max(1)));
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

/// The queue argument that says a queue's type.
pub const QUEUE_TYPE: &str = "x-queue-type";

/// What RabbitMQ says when a declaration finds the queue with other arguments (406
/// PRECONDITION_FAILED, "inequivalent arg 'KEY' for queue 'Q' in vhost 'V': received X but
/// current is Y"): the argument, and its value on the existing queue (`None`: it has none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inequivalent {
    /// The argument, for example `x-max-length`.
    pub arg: String,
    /// Its value on the existing queue, or `None` if the queue was declared without it.
    pub current: Option<String>,
}

/// Reads a 406 reply text; `None` if it is not an "inequivalent arg" one.
pub fn inequivalent(reply: &str) -> Option<Inequivalent> {
    let after = reply.split_once("inequivalent arg '")?.1;
    let arg = after.split_once('\'')?.0.to_owned();
    let current = after.rsplit_once("but current is ")?.1;
    let current = if current.starts_with("none") {
        None
    } else {
        // "'3'" or "the value '60000' of type 'long'": the first quoted text.
        let (_, quoted) = current.split_once('\'')?;
        Some(quoted.split_once('\'')?.0.to_owned())
    };
    Some(Inequivalent { arg, current })
}

/// Takes the existing queue's value of `found.arg` into `args` (or drops the argument if the
/// queue has none), so the next declaration matches the queue as it is. Only the arguments
/// that instances may legitimately disagree on: `x-max-length` (each instance's `capacity`)
/// and `x-expires` (`queue_expires`). `false` for anything else.
pub fn adopt(args: &mut FieldTable, found: &Inequivalent) -> bool {
    let key = found.arg.as_str();
    if !matches!(key, "x-max-length" | "x-expires") {
        return false;
    }
    match found.current.as_deref().map(str::parse) {
        None => {
            let mut inner = args.inner().clone();
            inner.remove(key);
            *args = FieldTable::from(inner);
        }
        Some(Ok(n)) => {
            args.insert(key.into(), long(n));
        }
        Some(Err(_)) => return false,
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_rabbitmq_precondition_failures() {
        // The texts RabbitMQ 3.10 answers (seen on the test broker).
        let cases = [
            ("PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'p.channel.q' in vhost '/': received the value 'quorum' of type 'longstr' but current is none", "x-queue-type", None),
            ("PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'p.channel.q' in vhost '/': received none but current is the value 'quorum' of type 'longstr'", "x-queue-type", Some("quorum")),
            ("PRECONDITION_FAILED - inequivalent arg 'x-max-length' for queue 'q' in vhost '/': received '4' but current is '3'", "x-max-length", Some("3")),
            ("PRECONDITION_FAILED - inequivalent arg 'x-expires' for queue 'q' in vhost '/': received none but current is the value '60000' of type 'long'", "x-expires", Some("60000")),
        ];
        for (text, arg, current) in cases {
            let found = inequivalent(text).expect(text);
            assert_eq!(found.arg, arg);
            assert_eq!(found.current.as_deref(), current);
        }
        assert_eq!(inequivalent("NOT_FOUND - no queue 'q' in vhost '/'"), None);
        assert_eq!(
            inequivalent("inequivalent arg 'x' for queue 'q': received 'a' but current is 'b"),
            None
        );
    }

    #[test]
    fn adopts_what_instances_may_disagree_on() {
        let mut args = channel_arguments(100, None, QueueType::Quorum);
        let found = |arg: &str, current: Option<&str>| Inequivalent {
            arg: arg.into(),
            current: current.map(Into::into),
        };
        assert!(adopt(&mut args, &found("x-max-length", Some("7"))));
        assert!(adopt(&mut args, &found("x-expires", Some("60000"))));
        assert_eq!(
            args,
            channel_arguments(7, Some(Duration::from_secs(60)), QueueType::Quorum)
        );
        assert!(adopt(&mut args, &found("x-expires", None)));
        assert_eq!(args, channel_arguments(7, None, QueueType::Quorum));
        assert!(!adopt(&mut args, &found("x-queue-type", Some("quorum"))));
        assert!(!adopt(&mut args, &found("x-overflow", Some("drop-head"))));
        assert!(!adopt(&mut args, &found("x-max-length", Some("lots"))));
    }

    #[test]
    fn only_quorum_queues_say_their_type() {
        let classic = channel_arguments(5, None, QueueType::Classic);
        assert!(!classic.inner().contains_key(QUEUE_TYPE));
        let quorum = channel_arguments(5, None, QueueType::Quorum);
        assert_eq!(
            quorum.inner().get(QUEUE_TYPE),
            Some(&AMQPValue::LongString(LongString::from("quorum")))
        );
    }
}
