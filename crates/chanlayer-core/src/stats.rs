//! Counters every layer keeps: what was sent, received, dropped and skipped, and why.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::telemetry::{Handles, Kind};

/// How long a burst of undecodable messages is reported by one log line.
const BURST: Duration = Duration::from_secs(5);

/// A counter on its own cache line: senders and receivers update different counters from
/// different threads, and sharing a line would make every update a cache miss.
#[derive(Debug, Default)]
#[repr(align(64))]
struct Counter(AtomicU64);

/// Live counters of one layer instance. Cheap to update from any thread: each update is
/// one atomic add on a counter of its own cache line; the metrics are exported from them
/// once a second ([`Stats::export_metrics`]), not per message.
#[derive(Debug, Default)]
pub struct Stats {
    sent: [Counter; 3],
    received: [Counter; 3],
    undeliverable: [Counter; 3],
    expired: Counter,
    undecodable: Counter,
    group_member_full: Counter,
    redelivered: Counter,
    dropped_full: Counter,
    dead_lettered: Counter,
    lost: Counter,
    reconnects: Counter,
    /// Deliveries handed out and not settled yet (a wrapping count: +1, -1).
    unsettled: Counter,
    last_undecodable_log: Mutex<Option<Instant>>,
    /// The `metrics` handles, once the layer knows its backend ([`Stats::export`]).
    export: OnceLock<Handles>,
}

/// A copy of the counters at one moment. It is serde-serializable (the
/// [`inspect`](crate::inspect) replies carry it as JSON); a field missing from the input
/// reads as 0, so instances of different versions can read each other's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct StatsSnapshot {
    /// Messages handed to the broker (channel sends and group sends).
    pub sent: u64,
    /// Messages returned by receive operations.
    pub received: u64,
    /// Messages dropped on receive because they were past their expiry.
    pub expired: u64,
    /// Bytes from the wire that were not a valid envelope, skipped.
    pub undecodable: u64,
    /// Group copies dropped because the member channel was full.
    pub group_member_full: u64,
    /// Messages dropped because nobody could ever receive them (for example addressed to a
    /// process-local channel of an instance that is gone).
    pub undeliverable: u64,
    /// Deliveries handed out again after a nack or an unacked drop.
    pub redelivered: u64,
    /// Messages for a process-local channel that reached its instance while that channel
    /// was at capacity, dropped there (backends that enforce local capacity at the receiver,
    /// where the sender could not be told `ChannelFull`).
    pub dropped_full: u64,
    /// Messages of normal channels moved to their dead-letter channel after
    /// `max_deliveries` deliveries that were nacked.
    pub dead_lettered: u64,
    /// Messages counted missing by sequence gaps (ZeroMQ, whose PUB/SUB is at-most-once;
    /// 0 on the other backends). Exported as `chanlayer_lost_total`.
    pub lost: u64,
    /// Broker connections lost and restored (AMQP; 0 on the other backends). Exported as
    /// `chanlayer_reconnects_total`.
    pub reconnects: u64,
}

impl StatsSnapshot {
    /// Field-wise sum, for adding up several instances.
    pub fn sum(self, other: StatsSnapshot) -> StatsSnapshot {
        StatsSnapshot {
            sent: self.sent + other.sent,
            received: self.received + other.received,
            expired: self.expired + other.expired,
            undecodable: self.undecodable + other.undecodable,
            group_member_full: self.group_member_full + other.group_member_full,
            undeliverable: self.undeliverable + other.undeliverable,
            redelivered: self.redelivered + other.redelivered,
            dropped_full: self.dropped_full + other.dropped_full,
            dead_lettered: self.dead_lettered + other.dead_lettered,
            lost: self.lost + other.lost,
            reconnects: self.reconnects + other.reconnects,
        }
    }
}

#[inline]
fn bump(c: &Counter, n: u64) {
    c.0.fetch_add(n, Ordering::Relaxed);
}

impl Stats {
    /// From now on the counts are exported through the `metrics` facade with label
    /// `backend` (see [`telemetry`](crate::telemetry)), by [`export_metrics`](Self::export_metrics).
    /// Called once, when the layer connects; later calls change nothing.
    pub fn export(&self, backend: &'static str) {
        let _ = self.export.get_or_init(|| Handles::new(backend));
    }

    /// Moves the exported metrics to the counts now (`inbox` messages wait in the
    /// instance's local inbox). Called once a second by the layer's export task, and when
    /// it closes.
    pub fn export_metrics(&self, inbox: i64) {
        let Some(m) = self.export.get() else {
            return;
        };
        let get = |c: &Counter| c.0.load(Ordering::Relaxed);
        let by_kind = |cs: &[Counter; 3]| cs.each_ref().map(get);
        m.update(crate::telemetry::Counts {
            by_kind: [&self.sent, &self.received, &self.undeliverable].map(by_kind),
            // In the order of `telemetry::SINGLE`.
            single: [
                &self.expired,
                &self.undecodable,
                &self.dropped_full,
                &self.group_member_full,
                &self.redelivered,
                &self.dead_lettered,
                &self.lost,
                &self.reconnects,
            ]
            .map(get),
            unsettled: get(&self.unsettled) as i64,
            inbox,
        });
    }

    /// Counts sent messages to an address of `kind`.
    #[inline]
    pub fn record_sent(&self, kind: Kind, n: u64) {
        bump(&self.sent[kind as usize], n);
    }
    /// Counts messages received from a channel of `kind`.
    pub fn record_received(&self, kind: Kind, n: u64) {
        bump(&self.received[kind as usize], n);
    }
    /// Counts expired messages dropped on receive.
    pub fn record_expired(&self, n: u64) {
        if n > 0 {
            bump(&self.expired, n);
        }
    }
    /// Counts a group copy dropped because its member was full.
    pub fn record_group_member_full(&self, group: &str, channel: &str) {
        bump(&self.group_member_full, 1);
        tracing::debug!(group, channel, "group_send skipped a full member");
    }
    /// Counts a message for channel (or group) `name` that nobody can receive.
    pub fn record_undeliverable(&self, name: &str) {
        self.record_undeliverable_to(Kind::of_channel(name), name);
    }
    /// [`record_undeliverable`](Self::record_undeliverable) with the kind given (a group's
    /// name does not say it is one).
    pub fn record_undeliverable_to(&self, kind: Kind, name: &str) {
        bump(&self.undeliverable[kind as usize], 1);
        tracing::debug!(name, "message dropped: nobody can receive it");
    }
    /// Counts a message dropped on arrival because its process-local channel was full.
    pub fn record_dropped_full(&self, channel: &str) {
        bump(&self.dropped_full, 1);
        tracing::debug!(
            channel,
            "message dropped on arrival: the channel is at capacity"
        );
    }
    /// Counts a redelivery.
    pub fn record_redelivered(&self, n: u64) {
        bump(&self.redelivered, n);
    }
    /// Counts a message moved to its dead-letter channel.
    pub fn record_dead_lettered(&self, channel: &str, dead: &str, deliveries: u32) {
        bump(&self.dead_lettered, 1);
        tracing::warn!(
            channel,
            dead_letter = dead,
            deliveries,
            "a message was nacked max_deliveries times; moved to the dead-letter channel"
        );
    }
    /// Counts messages a transport found missing (ZeroMQ's sequence gaps; the transport
    /// reports them in its own stats too). Exported as `chanlayer_lost_total`.
    pub fn record_lost(&self, n: u64) {
        bump(&self.lost, n);
    }
    /// Counts a connection lost and restored. Exported as `chanlayer_reconnects_total`.
    pub fn record_reconnect(&self) {
        bump(&self.reconnects, 1);
    }
    /// One more (`true`) or one fewer delivery handed out and not settled yet.
    pub fn record_unsettled(&self, more: bool) {
        bump(&self.unsettled, if more { 1 } else { 1u64.wrapping_neg() });
    }
    /// Records one sampled send latency (see [`telemetry::SEND_SAMPLE`](crate::telemetry::SEND_SAMPLE)).
    pub fn export_send_latency(&self, kind: Kind, elapsed: Duration) {
        if let Some(m) = self.export.get() {
            m.send_seconds[kind as usize].record(elapsed.as_secs_f64());
        }
    }

    /// Counts bytes that did not decode, and logs once per burst (at most one warning every
    /// few seconds, with the running count) so a flood of garbage cannot flood the log.
    pub fn record_undecodable(&self, source: &str, error: &dyn std::fmt::Display) {
        let total = self.undecodable.0.fetch_add(1, Ordering::Relaxed) + 1;
        let now = Instant::now();
        let mut last = crate::toolkit::lock(&self.last_undecodable_log);
        if last.is_none_or(|t| now.duration_since(t) >= BURST) {
            *last = Some(now);
            tracing::warn!(
                source,
                total_skipped = total,
                "skipped undecodable message: {error} (further ones in the next {BURST:?} are counted, not logged)"
            );
        }
    }

    /// A snapshot of the counters.
    pub fn snapshot(&self) -> StatsSnapshot {
        let get = |c: &Counter| c.0.load(Ordering::Relaxed);
        StatsSnapshot {
            sent: self.sent.iter().map(get).sum(),
            received: self.received.iter().map(get).sum(),
            expired: get(&self.expired),
            undecodable: get(&self.undecodable),
            group_member_full: get(&self.group_member_full),
            undeliverable: self.undeliverable.iter().map(get).sum(),
            redelivered: get(&self.redelivered),
            dropped_full: get(&self.dropped_full),
            dead_lettered: get(&self.dead_lettered),
            lost: get(&self.lost),
            reconnects: get(&self.reconnects),
        }
    }
}
