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

/// The counts of one layer instance at one moment, for [`Handles::update`].
pub(crate) struct Counts {
    pub sent: [u64; 3],
    pub received: [u64; 3],
    pub undeliverable: [u64; 3],
    pub expired: u64,
    pub undecodable: u64,
    pub dropped_full: u64,
    pub group_member_full: u64,
    pub redelivered: u64,
    pub dead_lettered: u64,
    pub lost: u64,
    pub reconnects: u64,
    pub unsettled: i64,
    pub inbox: i64,
}

/// The handles of one layer instance, and what it exported so far: each update adds the
/// difference, so several instances of a backend add up in one series.
pub(crate) struct Handles {
    sent: [Counter; 3],
    received: [Counter; 3],
    undeliverable: [Counter; 3],
    pub send_seconds: [Histogram; 3],
    expired: Counter,
    undecodable: Counter,
    dropped_full: Counter,
    group_member_full: Counter,
    redelivered: Counter,
    dead_lettered: Counter,
    lost: Counter,
    reconnects: Counter,
    inbox: Gauge,
    unsettled: Gauge,
    last: std::sync::Mutex<Option<Counts>>,
}

impl std::fmt::Debug for Handles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Handles")
    }
}

impl Handles {
    pub fn new(backend: &'static str) -> Handles {
        let by_kind = |name: &'static str| {
            Kind::ALL.map(|k| metrics::counter!(name, "backend" => backend, "kind" => k.label()))
        };
        let one = |name: &'static str| metrics::counter!(name, "backend" => backend);
        Handles {
            sent: by_kind("chanlayer_sent_total"),
            received: by_kind("chanlayer_received_total"),
            undeliverable: by_kind("chanlayer_undeliverable_total"),
            send_seconds: Kind::ALL.map(|k| {
                metrics::histogram!("chanlayer_send_seconds", "backend" => backend, "kind" => k.label())
            }),
            expired: one("chanlayer_expired_total"),
            undecodable: one("chanlayer_undecodable_total"),
            dropped_full: one("chanlayer_dropped_full_total"),
            group_member_full: one("chanlayer_group_member_full_total"),
            redelivered: one("chanlayer_redelivered_total"),
            dead_lettered: one("chanlayer_dead_lettered_total"),
            lost: one("chanlayer_lost_total"),
            reconnects: one("chanlayer_reconnects_total"),
            inbox: metrics::gauge!("chanlayer_inbox_messages", "backend" => backend),
            unsettled: metrics::gauge!("chanlayer_unsettled_deliveries", "backend" => backend),
            last: std::sync::Mutex::new(None),
        }
    }

    /// Adds what changed since the last update.
    pub fn update(&self, now: Counts) {
        let mut last = crate::toolkit::lock(&self.last);
        let before = last.take().unwrap_or(Counts {
            sent: [0; 3],
            received: [0; 3],
            undeliverable: [0; 3],
            expired: 0,
            undecodable: 0,
            dropped_full: 0,
            group_member_full: 0,
            redelivered: 0,
            dead_lettered: 0,
            lost: 0,
            reconnects: 0,
            unsettled: 0,
            inbox: 0,
        });
        let add = |c: &Counter, now: u64, then: u64| {
            if now > then {
                c.increment(now - then);
            }
        };
        for k in 0..3 {
            add(&self.sent[k], now.sent[k], before.sent[k]);
            add(&self.received[k], now.received[k], before.received[k]);
            add(
                &self.undeliverable[k],
                now.undeliverable[k],
                before.undeliverable[k],
            );
        }
        add(&self.expired, now.expired, before.expired);
        add(&self.undecodable, now.undecodable, before.undecodable);
        add(&self.dropped_full, now.dropped_full, before.dropped_full);
        add(
            &self.group_member_full,
            now.group_member_full,
            before.group_member_full,
        );
        add(&self.redelivered, now.redelivered, before.redelivered);
        add(&self.dead_lettered, now.dead_lettered, before.dead_lettered);
        add(&self.lost, now.lost, before.lost);
        add(&self.reconnects, now.reconnects, before.reconnects);
        if now.inbox != before.inbox {
            self.inbox.increment((now.inbox - before.inbox) as f64);
        }
        if now.unsettled != before.unsettled {
            self.unsettled
                .increment((now.unsettled - before.unsettled) as f64);
        }
        *last = Some(now);
    }
}

/// How often a layer exports its counts.
pub const EXPORT_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// `true` for the sends whose latency is measured: one in [`SEND_SAMPLE`] per thread.
pub(crate) fn sample_send() -> bool {
    thread_local! {
        static N: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
    }
    N.with(|n| {
        let v = n.get().wrapping_add(1);
        n.set(v);
        v % SEND_SAMPLE == 0
    })
}
