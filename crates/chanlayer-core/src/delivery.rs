//! At-least-once receiving: [`Delivery`] with `ack` / `nack` (the batch handler helper is
//! [`handle_batch`](crate::handle_batch)).

use async_trait::async_trait;
use serde::de::DeserializeOwned;

use crate::envelope::MessageId;
use crate::error::{Error, Result};
use crate::message::Message;

/// The backend's side of a delivery: settles it with the broker.
///
/// Dropping an acknowledger that was neither acked nor nacked must make the message come
/// back (at the latest when the consumer goes away), never lose it.
#[async_trait]
pub trait Acknowledger: Send + Sync + 'static {
    /// The message was handled; it will not come back.
    async fn ack(&mut self) -> Result<()>;
    /// The message was not handled; deliver it again (to this or another reader).
    async fn nack(&mut self) -> Result<()>;
}

/// Where a delivery came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryInfo {
    /// The message id.
    pub id: MessageId,
    /// The channel it was received on.
    pub channel: String,
    /// `true` if it was handed out before and not acked.
    pub redelivered: bool,
    /// When it was sent, in milliseconds since the epoch.
    pub sent_at_ms: u64,
}

/// Settles one delivery: [`AckHandle::ack`] or [`AckHandle::nack`]. Dropped without either,
/// the message comes back (for at-least-once channels).
#[must_use = "an unsettled delivery is redelivered; call ack() or nack()"]
pub struct AckHandle(Option<Box<dyn Acknowledger>>);

impl AckHandle {
    /// A handle that settles through `acker`.
    pub fn new(acker: Box<dyn Acknowledger>) -> Self {
        AckHandle(Some(acker))
    }

    /// A handle with nothing to settle (at-most-once deliveries: already removed).
    pub fn settled() -> Self {
        AckHandle(None)
    }

    /// Acknowledges.
    pub async fn ack(mut self) -> Result<()> {
        match self.0.as_mut() {
            Some(a) => a.ack().await,
            None => Ok(()),
        }
    }

    /// Rejects; the message is delivered again.
    pub async fn nack(mut self) -> Result<()> {
        match self.0.as_mut() {
            Some(a) => a.nack().await,
            None => Err(Error::InvalidMessage(
                "this delivery was at-most-once (already removed from its channel); it cannot be nacked"
                    .into(),
            )),
        }
    }
}

impl std::fmt::Debug for AckHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "AckHandle(pending)"
        } else {
            "AckHandle(settled)"
        })
    }
}

/// A received message that must be settled: [`Delivery::ack`] after handling it,
/// [`Delivery::nack`] to have it delivered again. Dropped unsettled, it comes back.
#[derive(Debug)]
pub struct Delivery {
    message: Message,
    info: DeliveryInfo,
    handle: AckHandle,
}

impl Delivery {
    /// A delivery (for backends).
    pub fn new(message: Message, info: DeliveryInfo, handle: AckHandle) -> Self {
        Delivery {
            message,
            info,
            handle,
        }
    }

    /// The message.
    pub fn message(&self) -> &Message {
        &self.message
    }

    /// Where it came from.
    pub fn info(&self) -> &DeliveryInfo {
        &self.info
    }

    /// Decodes the body.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T> {
        self.message.decode()
    }

    /// Acknowledges: the message will not come back.
    pub async fn ack(self) -> Result<()> {
        self.handle.ack().await
    }

    /// Rejects: the message is delivered again.
    pub async fn nack(self) -> Result<()> {
        self.handle.nack().await
    }

    /// Splits into the message, its info and the handle that settles it.
    pub fn into_parts(self) -> (Message, DeliveryInfo, AckHandle) {
        (self.message, self.info, self.handle)
    }
}
