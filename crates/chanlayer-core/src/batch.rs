//! The batch handler helper: [`handle_batch`] receives a batch and commits it only when the
//! handler succeeded.

use std::time::Duration;

use crate::error::{Error, Result};
use crate::layer::ChannelLayer;
use crate::message::Message;

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
