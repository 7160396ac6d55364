//! A layer's counters through the [`metrics`] facade, for whatever recorder the application
//! installs (`metrics-exporter-prometheus` for a Prometheus `/metrics`, or any other).
//!
//! The per-message paths only bump the layer's own [`Stats`](crate::toolkit::Stats) counters (one
//! atomic add each, on a cache line of its own); a task of each layer exports them every
//! [`EXPORT_EVERY`] (one second) and when the layer closes, adding what changed. So the
//! metrics cost the send and receive paths nothing, recorder or not, and lag the counts by
//! at most a second. Install the recorder before connecting: a layer takes its handles when
//! it connects.
//!
//! | metric | type | labels | what |
//! |---|---|---|---|
//! | `chanlayer_sent_total` | counter | backend, kind | messages handed to the broker ([`Stats`](crate::toolkit::Stats) `sent`) |
//! | `chanlayer_received_total` | counter | backend, kind | messages returned by receive operations |
//! | `chanlayer_expired_total` | counter | backend | dropped on receive, past their expiry |
//! | `chanlayer_undecodable_total` | counter | backend | bytes that were not a message, skipped |
//! | `chanlayer_dropped_full_total` | counter | backend | dropped on arrival at a full channel |
//! | `chanlayer_group_member_full_total` | counter | backend | group copies skipped for a full member |
//! | `chanlayer_undeliverable_total` | counter | backend, kind | nobody could ever receive them |
//! | `chanlayer_redelivered_total` | counter | backend | handed out again after a nack or a drop |
//! | `chanlayer_dead_lettered_total` | counter | backend | moved to a dead-letter channel after `max_deliveries` |
//! | `chanlayer_lost_total` | counter | backend | counted missing by sequence gaps (ZeroMQ) |
//! | `chanlayer_reconnects_total` | counter | backend | connections lost and restored |
//! | `chanlayer_inbox_messages` | gauge | backend | messages waiting in this process's local inboxes |
//! | `chanlayer_unsettled_deliveries` | gauge | backend | deliveries handed out, neither acked nor nacked yet |
//! | `chanlayer_send_seconds` | histogram | backend, kind | send call to the broker's acknowledgement, one send in [`SEND_SAMPLE`] |
//!
//! `kind` is the address's kind, `local` (a process-local channel), `normal` or `group`:
//! never a channel or group name, so the number of series stays fixed. Several instances of
//! one backend in a process add up in the same series.

use metrics::{Counter, Gauge, Histogram};

/// One send in this many (per thread) has its latency measured: two clock reads per sample
/// cost nothing measurable spread over the others.
pub const SEND_SAMPLE: u32 = 64;

/// What an address is, the `kind` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A process-local channel (a name with `!`).
    Local = 0,
    /// A normal channel.
    Normal = 1,
    /// A group.
    Group = 2,
}

impl Kind {
    /// The kind of channel `name`.
    pub fn of_channel(name: &str) -> Kind {
        if crate::names::is_process_local(name) {
            Kind::Local
        } else {
            Kind::Normal
        }
    }

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            Kind::Local => "local",
            Kind::Normal => "normal",
            Kind::Group => "group",
        }
    }

    const ALL: [Kind; 3] = [Kind::Local, Kind::Normal, Kind::Group];
}

/// The counters by kind, in the order of [`Counts::by_kind`].
const BY_KIND: [&str; 3] = [
    "chanlayer_sent_total",
    "chanlayer_received_total",
    "chanlayer_undeliverable_total",
];

/// The counters without a kind, in the order of [`Counts::single`].
const SINGLE: [&str; 8] = [
    "chanlayer_expired_total",
    "chanlayer_undecodable_total",
    "chanlayer_dropped_full_total",
    "chanlayer_group_member_full_total",
    "chanlayer_redelivered_total",
    "chanlayer_dead_lettered_total",
    "chanlayer_lost_total",
    "chanlayer_reconnects_total",
];

/// The counts of one layer instance at one moment, for [`Handles::update`].
#[derive(Debug, Default)]
pub(crate) struct Counts {
    /// Sent, received and undeliverable, each by [`Kind`] ([`BY_KIND`]).
    pub by_kind: [[u64; 3]; 3],
    /// The counters named in [`SINGLE`], in that order.
    pub single: [u64; SINGLE.len()],
    pub unsettled: i64,
    pub inbox: i64,
}

/// The handles of one layer instance, and what it exported so far: each update adds the
/// difference, so several instances of a backend add up in one series.
#[derive(Debug)]
pub(crate) struct Handles {
    by_kind: [[Counter; 3]; 3],
    single: [Counter; SINGLE.len()],
    pub send_seconds: [Histogram; 3],
    inbox: Gauge,
    unsettled: Gauge,
    last: std::sync::Mutex<Counts>,
}

impl Handles {
    pub fn new(backend: &'static str) -> Handles {
        Handles {
            by_kind: BY_KIND.map(|name| {
                Kind::ALL.map(|k| metrics::counter!(name, "backend" => backend, "kind" => k.label()))
            }),
            single: SINGLE.map(|name| metrics::counter!(name, "backend" => backend)),
            send_seconds: Kind::ALL.map(|k| {
                metrics::histogram!("chanlayer_send_seconds", "backend" => backend, "kind" => k.label())
            }),
            inbox: metrics::gauge!("chanlayer_inbox_messages", "backend" => backend),
            unsettled: metrics::gauge!("chanlayer_unsettled_deliveries", "backend" => backend),
            last: Default::default(),
        }
    }

    /// Adds what changed since the last update.
    pub fn update(&self, now: Counts) {
        let mut last = crate::toolkit::lock(&self.last);
        let counters = self.by_kind.iter().flatten().chain(&self.single);
        let before = last.by_kind.iter().flatten().chain(&last.single);
        let after = now.by_kind.iter().flatten().chain(&now.single);
        for (c, (now, then)) in counters.zip(after.zip(before)) {
            if now > then {
                c.increment(now - then);
            }
        }
        if now.inbox != last.inbox {
            self.inbox.increment((now.inbox - last.inbox) as f64);
        }
        if now.unsettled != last.unsettled {
            self.unsettled
                .increment((now.unsettled - last.unsettled) as f64);
        }
        *last = now;
    }
}

/// How often a layer exports its counts.
pub const EXPORT_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// This thread's sends, counted (wrapping): what [`sampled`] and the send's yield budget
/// go by. One counter for both: a send reads it once.
#[inline]
pub(crate) fn next_send() -> u32 {
    thread_local! {
        static N: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
    }
    N.with(|n| {
        let v = n.get().wrapping_add(1);
        n.set(v);
        v
    })
}

/// `true` for the sends whose latency is measured: one in [`SEND_SAMPLE`] per thread
/// (`n` from [`next_send`]).
#[inline]
pub(crate) fn sampled(n: u32) -> bool {
    n % SEND_SAMPLE == 0
}
