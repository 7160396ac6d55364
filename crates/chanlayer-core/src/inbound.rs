//! [`Inbound`]: one layer instance's receiving side, shared between core's
//! [`TransportLayer`](crate::toolkit::TransportLayer) and its transport. It holds the instance's id,
//! options, counters and close signal, its [`LocalInbox`] and its group registries, and it
//! is the one ingest path: decode → owner check → deliver → counted drops.

use std::sync::Arc;

use crate::config::LayerOptions;
use crate::envelope::{Destination, Envelope, EnvelopeError};
use crate::error::{Error, Result};
use crate::groups::GroupRegistry;
use crate::inbox::{CloseSignal, Entry, LocalInbox};
use crate::incoming::{Incoming, Settler};
use crate::names;
use crate::stats::Stats;

/// One instance's receiving side. See the module docs.
#[derive(Debug)]
pub struct Inbound {
    id: String,
    options: LayerOptions,
    stats: Arc<Stats>,
    closed: Arc<CloseSignal>,
    inbox: Arc<LocalInbox>,
    groups: GroupRegistry,
    normal_groups: GroupRegistry,
    /// Normal-channel messages arrive in this instance's inbox (the transport's
    /// `NORMAL_VIA_INBOX`); otherwise one there is misrouted.
    normal_via_inbox: bool,
    naming: names::Naming,
}

impl Inbound {
    /// A fresh instance with a new id made by `naming`. `normal_via_inbox`: the transport
    /// reads normal channels from the inbox (its `NORMAL_VIA_INBOX`).
    pub fn new(options: LayerOptions, normal_via_inbox: bool, naming: names::Naming) -> Self {
        Inbound {
            id: naming.new_instance_id(),
            naming,
            options,
            stats: Arc::new(Stats::default()),
            closed: Arc::new(CloseSignal::default()),
            inbox: Arc::default(),
            groups: GroupRegistry::default(),
            normal_groups: GroupRegistry::default(),
            normal_via_inbox,
        }
    }

    /// This instance's id (what its process-local channel names carry).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// How this instance names its process-local channels and routes channel names.
    pub fn naming(&self) -> names::Naming {
        self.naming
    }

    /// The shared options.
    pub fn options(&self) -> &LayerOptions {
        &self.options
    }

    /// The counters.
    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    /// The close signal (set by core before the transport's `close`).
    pub fn closed(&self) -> &Arc<CloseSignal> {
        &self.closed
    }

    /// Exports this instance's counts to the `metrics` recorder every
    /// [`EXPORT_EVERY`](crate::telemetry::EXPORT_EVERY) until the layer closes, and once
    /// more then (so the figures end exact, and a closed instance's messages leave the
    /// gauges).
    pub(crate) async fn export_metrics(self: Arc<Self>) {
        let mut tick = tokio::time::interval(crate::telemetry::EXPORT_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.closed.closed() => break,
                _ = tick.tick() => self.stats.export_metrics(self.inbox.depth()),
            }
        }
        // The instance is gone: its inbox leaves the gauge.
        self.stats.export_metrics(0);
    }

    /// The local inbox (process-local channels; normal channels of inbox-read transports).
    pub fn inbox(&self) -> &Arc<LocalInbox> {
        &self.inbox
    }

    /// Groups with local members (process-local channels, and normal channels of
    /// inbox-read transports).
    pub fn groups(&self) -> &GroupRegistry {
        &self.groups
    }

    /// Normal-channel memberships this instance added (for a transport that forwards group
    /// messages to normal channels itself).
    pub fn normal_groups(&self) -> &GroupRegistry {
        &self.normal_groups
    }

    /// `true` if this instance may take `envelope`: a message for a process-local channel
    /// must be for one of this instance's own; one for a normal channel only where normal
    /// channels are read from the inbox. One it may not take is counted `undeliverable`.
    fn admit(&self, envelope: &Envelope) -> bool {
        let owned = self.owns(envelope);
        if !owned {
            self.stats.record_undeliverable(&envelope.destination);
        }
        owned
    }

    /// The verdict of [`admit`](Self::admit), uncounted.
    fn owns(&self, envelope: &Envelope) -> bool {
        let dest = envelope.destination.as_str();
        envelope.kind == Destination::Group
            || match self.naming.owner(dest) {
                Some(owner) => owner == self.id,
                // A `!` name this naming cannot route: nobody's.
                None if names::is_process_local(dest) => false,
                // A normal channel's message belongs in the inbox only where the transport
                // reads normal channels from it; elsewhere nothing would ever take it.
                None => self.normal_via_inbox,
            }
    }

    /// Delivers an envelope that arrived: to its channel, or one copy to each live local
    /// member of its group. A message for another instance's channel is counted
    /// `undeliverable`; one for a full channel `dropped_full` (a full group member
    /// `group_member_full`).
    pub fn ingest(&self, envelope: Envelope) {
        if let Err(Error::ChannelFull { channel, .. }) = self.offer(envelope) {
            self.stats.record_dropped_full(&channel);
        }
    }

    /// [`ingest`](Self::ingest), except that a full channel is returned as
    /// `Err(ChannelFull)` instead of counted: for an in-process transport whose sender can
    /// be told at once.
    pub fn offer(&self, mut envelope: Envelope) -> Result<()> {
        if !self.admit(&envelope) {
            return Ok(());
        }
        // The queue a message goes to is its address: the name moves out of the envelope
        // (no copy per message, none per group member).
        let name = std::mem::take(&mut envelope.destination);
        match envelope.kind {
            Destination::Channel => {
                let capacity = self.options.capacity_for(&name);
                self.inbox.push(&name, envelope, capacity, &self.stats)
            }
            Destination::Group => {
                self.offer_group(&name, envelope);
                Ok(())
            }
        }
    }

    /// Delivers a group message whose envelope does not carry the name to this instance's
    /// live members of `group`.
    pub fn offer_group(&self, group: &str, envelope: Envelope) {
        self.inbox.fan_out(
            group,
            envelope,
            self.groups.members(group),
            &self.options,
            &self.stats,
        );
    }

    /// [`ingest`](Self::ingest)s a burst in order (one lock per run of one channel).
    pub fn ingest_all(&self, envelopes: &mut Vec<Envelope>) {
        // A run of messages to one address (a stream) is checked once: finding the owner
        // in a name was a tenth of a ZeroMQ receiving thread's work (callgrind). Kept
        // envelopes move to the front in order (a stable in-place `retain`), and `last` is
        // where the one before now sits, with its verdict.
        let mut last: Option<(usize, bool)> = None;
        let mut kept = 0;
        for i in 0..envelopes.len() {
            let owned = match last {
                Some((j, owned)) if same_address(&envelopes[j], &envelopes[i]) => owned,
                _ => self.owns(&envelopes[i]),
            };
            if owned {
                if kept != i {
                    envelopes.swap(kept, i);
                }
                last = Some((kept, true));
                kept += 1;
            } else {
                self.stats.record_undeliverable(&envelopes[i].destination);
                last = Some((i, false));
            }
        }
        envelopes.truncate(kept);
        self.inbox
            .deliver_all(envelopes, &self.groups, &self.options, &self.stats);
    }

    /// Decodes bytes that arrived and [`ingest`](Self::ingest)s them. Bytes that are not an
    /// envelope are counted (`undecodable`, logged once per burst with `source`) and
    /// skipped: `false`.
    pub fn ingest_bytes(&self, bytes: &[u8], source: &str) -> bool {
        self.decode(bytes, source)
            .map(|env| self.ingest(env))
            .is_some()
    }

    /// Decodes bytes that arrived, for a transport that gathers a burst for
    /// [`ingest_all`](Self::ingest_all): the envelope, or `None` for bytes that are not one
    /// (counted `undecodable`, logged once per burst with `source`).
    pub fn decode(&self, bytes: &[u8], source: impl std::fmt::Display) -> Option<Envelope> {
        // `source` is formatted only on error: a transport may name it lazily (a topic).
        let bad = |e: &EnvelopeError| self.stats.record_undecodable(&source.to_string(), e);
        Envelope::decode(bytes).inspect_err(bad).ok()
    }

    /// [`decode`](Self::decode) for an address that carries only `kind` (a transport's
    /// groups topic): an envelope of the other kind is counted `undecodable` too.
    pub fn decode_as(
        &self,
        bytes: &[u8],
        kind: Destination,
        source: impl std::fmt::Display,
    ) -> Option<Envelope> {
        let env = self.decode(bytes, &source)?;
        if env.kind != kind {
            let why = format!(
                "a {:?} envelope where only {kind:?} envelopes arrive",
                env.kind
            );
            self.stats.record_undecodable(&source.to_string(), &why);
            return None;
        }
        Some(env)
    }
}

/// `true` if `a` and `b` go to the same channel or group.
fn same_address(a: &Envelope, b: &Envelope) -> bool {
    a.kind == b.kind && a.destination == b.destination
}

/// An [`Incoming`] of `entry`, taken from `inbox`'s `channel`, that goes back to the head of
/// that channel on nack or when dropped unsettled (at-least-once over a [`LocalInbox`]);
/// `inbound` is the receiving instance (its counters, its close signal).
pub fn requeuing_incoming(
    inbox: Arc<LocalInbox>,
    channel: &str,
    entry: Entry,
    inbound: &Inbound,
) -> Incoming {
    let (envelope, redelivered) = (entry.envelope.clone(), entry.redelivered);
    let pending = (channel.to_owned(), entry, inbound.closed().clone());
    Incoming::unsettled(envelope, redelivered, inbox, pending, inbound)
}

/// A [`LocalInbox`] settles what was taken from it: an ack forgets it; a nack, or a drop
/// without either, puts it back at the head of its channel.
#[async_trait::async_trait]
impl Settler for LocalInbox {
    /// The channel, the entry, and the receiving instance's close signal.
    type Pending = (String, Entry, Arc<CloseSignal>);

    async fn settle(&self, _taken: Self::Pending) -> Result<()> {
        Ok(())
    }

    fn requeue(&self, (channel, entry, closed): Self::Pending, stats: &Stats) {
        if closed.is_closed() && names::is_process_local(&channel) {
            // Its instance is gone: nobody can receive it any more. (A normal channel's
            // message goes back for the other readers.)
            stats.record_undeliverable(&channel);
            return;
        }
        stats.record_redelivered(1);
        self.requeue_front(&channel, entry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Codec;
    use crate::message::Message;

    fn envelope(inbound: &Inbound, kind: Destination, to: &str, body: u8) -> Envelope {
        let m = Message::new("t", Codec::Json, vec![body]);
        Envelope::seal(kind, to, m, inbound.options()).expect("seals")
    }

    /// A burst mixing this instance's channels, another's and a normal channel's (not read
    /// from the inbox here) keeps this instance's messages in order and counts each other
    /// one `undeliverable`, however the runs of one address fall.
    #[test]
    fn a_burst_keeps_its_own_messages_in_order_and_counts_the_rest() {
        let inbound = Inbound::new(LayerOptions::default(), false, names::Naming::Layer);
        let mine = |n: &str| format!("app.{}!{n}", inbound.id());
        let (a, b) = (mine("a"), mine("b"));
        let other = "app.someoneelse!x";
        let ch = Destination::Channel;
        let plan: [(&str, u8); 9] = [
            (&a, 1),
            (other, 0),
            (other, 0),
            (&a, 2),
            ("jobs", 0),
            (&b, 3),
            (&b, 4),
            (other, 0),
            (&a, 5),
        ];
        let mut burst: Vec<Envelope> = plan
            .iter()
            .map(|(to, body)| envelope(&inbound, ch, to, *body))
            .collect();
        inbound.ingest_all(&mut burst);
        assert_eq!(inbound.stats().snapshot().undeliverable, 4);
        let take = |c: &str| {
            std::iter::from_fn(|| inbound.inbox().try_take(c, inbound.stats()))
                .map(|e| e.envelope.body[0])
                .collect::<Vec<_>>()
        };
        assert_eq!((take(&a), take(&b)), (vec![1, 2, 5], vec![3, 4]));
        assert!(take(other).is_empty() && take("jobs").is_empty());
    }
}
