//! A layer's counters through the [`metrics`] facade, for whatever recorder the application
//! installs (`metrics-exporter-prometheus` for a Prometheus `/metrics`, or any other). With
//! no recorder every update is a no-op on a handle made once per layer instance.
//!
//! Install the recorder before connecting: a layer takes its handles when it connects.
//!
//! | metric | type | labels | what |
//! |---|---|---|---|
//! | `chanlayer_sent_total` | counter | backend, kind | messages handed to the broker ([`Stats`](crate::Stats) `sent`) |
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

/// The handles of one layer instance.
pub(crate) struct Handles {
    pub sent: [Counter; 3],
    pub received: [Counter; 3],
    pub undeliverable: [Counter; 3],
    pub send_seconds: [Histogram; 3],
    pub expired: Counter,
    pub undecodable: Counter,
    pub dropped_full: Counter,
    pub group_member_full: Counter,
    pub redelivered: Counter,
    pub dead_lettered: Counter,
    pub lost: Counter,
    pub reconnects: Counter,
    pub inbox: Gauge,
    pub unsettled: Gauge,
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
        }
    }
}

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
