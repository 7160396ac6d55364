//! What a normal channel's source yields: an [`Incoming`] item, settled through its
//! transport's [`Settler`] (ack) or handed back (nack, or dropped unsettled).

use std::sync::Arc;

use async_trait::async_trait;

use crate::delivery::{AckHandle, Acknowledger, Delivery, DeliveryInfo};
use crate::envelope::Envelope;
use crate::error::Result;
use crate::inbound::Inbound;
use crate::signal::CloseSignal;
use crate::stats::Stats;

/// One item taken from a normal channel, not settled yet.
pub struct Incoming {
    /// The message.
    pub envelope: Envelope,
    /// `true` if it was delivered before and came back.
    pub redelivered: bool,
    /// Settles it with the broker (ack) or hands it back (nack, or dropped unsettled).
    pub ack: AckHandle,
}

/// How a transport settles the deliveries it took from its broker (an AMQP consumer acks
/// one, a Kafka consumer marks its offset for commit) and hands one back.
/// [`Incoming::unsettled`] pairs a [`Pending`](Settler::Pending) with its settler; the
/// item's ack settles it, its nack or a drop without either requeues it.
#[async_trait]
pub trait Settler: Send + Sync + 'static {
    /// One delivery taken from the broker and not settled yet.
    type Pending: Send + Sync + 'static;

    /// Settles `pending` with the broker (the ack).
    async fn settle(&self, pending: Self::Pending) -> Result<()>;

    /// Hands `pending` back (a nack, or a delivery dropped unsettled): it is delivered
    /// again, and counted in `stats` as redelivered.
    fn requeue(&self, pending: Self::Pending, stats: &Stats);
}

impl Incoming {
    /// An item carrying `envelope` whose ack settles `pending` through `settler` (`Closed`
    /// once `inbound`'s layer closed: it then comes back), and whose nack, or a drop
    /// without either, requeues it (counted in `inbound`'s stats as unsettled meanwhile).
    pub fn unsettled<S: Settler>(
        envelope: Envelope,
        redelivered: bool,
        settler: Arc<S>,
        pending: S::Pending,
        inbound: &Inbound,
    ) -> Incoming {
        let stats = inbound.stats().clone();
        stats.record_unsettled(true);
        let acker = UnsettledAcker {
            item: Some((settler, pending)),
            stats,
            closed: inbound.closed().clone(),
        };
        Incoming {
            envelope,
            redelivered,
            ack: AckHandle::new(Box::new(acker)),
        }
    }

    /// As a [`Delivery`] of `channel`.
    pub fn into_delivery(self, channel: &str) -> Delivery {
        let info = DeliveryInfo {
            id: self.envelope.id,
            channel: channel.to_owned(),
            redelivered: self.redelivered,
            sent_at_ms: self.envelope.sent_at_ms,
        };
        Delivery::new(self.envelope.into_message(), info, self.ack)
    }
}

/// The [`Acknowledger`] of [`Incoming::unsettled`].
struct UnsettledAcker<S: Settler> {
    item: Option<(Arc<S>, S::Pending)>,
    stats: Arc<Stats>,
    closed: Arc<CloseSignal>,
}

impl<S: Settler> UnsettledAcker<S> {
    fn requeue(&mut self) {
        if let Some((settler, pending)) = self.item.take() {
            self.stats.record_unsettled(false);
            settler.requeue(pending, &self.stats);
        }
    }
}

#[async_trait]
impl<S: Settler> Acknowledger for UnsettledAcker<S> {
    async fn ack(&mut self) -> Result<()> {
        self.closed.check()?;
        match self.item.take() {
            Some((settler, pending)) => {
                self.stats.record_unsettled(false);
                settler.settle(pending).await
            }
            None => Ok(()),
        }
    }

    async fn nack(&mut self) -> Result<()> {
        self.requeue();
        Ok(())
    }
}

impl<S: Settler> Drop for UnsettledAcker<S> {
    fn drop(&mut self) {
        self.requeue();
    }
}
