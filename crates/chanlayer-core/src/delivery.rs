//! At-least-once receiving: [`Delivery`] with `ack` / `nack`, and the batch handler helper.

use std::time::Duration;

use async_trait::async_trait;
use serde::de::DeserializeOwned;

use crate::envelope::MessageId;
use crate::error::{Error, Result};
use crate::layer::ChannelLayer;
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

/// Why [`handle_batch`] did not commit a batch.
#[derive(Debug, thiserror::Error)]
pub enum BatchError<E> {
    /// The handler failed; the whole batch was nacked and will come back.
    #[error("batch handler failed; the batch was nacked: {0}")]
    Handler(E),
    /// The layer failed.
    #[error(transparent)]
    Layer(#[from] Error),
}

/// Receives up to `max` messages from `channel` (waiting up to `timeout` for the first) and
/// runs `handler` on them. When the handler succeeds, every message is acked (committed);
/// when it fails, every message is nacked in reverse order (so they come back in their
/// original order) and the handler's error is returned. Returns how many were handled
/// (0 if nothing arrived in time; the handler is not called then).
pub async fn handle_batch<F, Fut, E>(
    layer: &dyn ChannelLayer,
    channel: &str,
    max: usize,
    timeout: Duration,
    handler: F,
) -> Result<usize, BatchError<E>>
where
    F: FnOnce(Vec<Message>) -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
{
    let batch = layer.receive_batch(channel, max, timeout).await?;
    if batch.is_empty() {
        return Ok(0);
    }
    let n = batch.len();
    let (messages, handles): (Vec<_>, Vec<_>) = (batch.into_iter())
        .map(|d| {
            let (m, _, h) = d.into_parts();
            (m, h)
        })
        .unzip();
    let span = tracing::debug_span!(
        "chanlayer",
        op = "batch_handler",
        backend = layer.capabilities().backend,
        kind = crate::telemetry::Kind::of_channel(channel).label(),
        messages = n
    );
    match tracing::Instrument::instrument(handler(messages), span).await {
        Ok(()) => {
            for h in handles {
                h.ack().await?;
            }
            Ok(n)
        }
        Err(e) => {
            for h in handles.into_iter().rev() {
                h.nack().await?;
            }
            Err(BatchError::Handler(e))
        }
    }
}
