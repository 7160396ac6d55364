//! The inbox consumer: moves what arrives on this instance's inbox queue (process-local
//! channel messages and group messages) into the shared [`LocalInbox`], which demultiplexes
//! it, enforces per-channel capacity and expiry, and fans group messages out to local
//! members.
//!
//! The inbox is consumed without acks (at-most-once, like Django Channels' process-local
//! channels): a message the broker handed over is this instance's. A message for a local
//! channel that is at capacity is dropped here and counted (`dropped_full`); undecodable
//! bytes are counted and skipped.
//!
//! [`LocalInbox`]: chanlayer_core::toolkit::LocalInbox

use std::sync::Arc;

use futures::StreamExt;
use lapin::{Channel, Consumer};

use crate::shared::Shared;

/// Runs until the consumer ends (connection lost, or closed) or the layer closes.
pub(crate) async fn run(shared: Arc<Shared>, mut consumer: Consumer, channel: Channel) {
    let inbound = &shared.inbound;
    let source = format!("amqp inbox {}", shared.names.inbox);
    loop {
        let next = tokio::select! {
            _ = inbound.closed().closed() => break,
            n = consumer.next() => n,
        };
        match next {
            // Decoded, checked (only this instance's own process-local channels live in its
            // inbox), delivered; what cannot be is counted.
            Some(Ok(delivery)) => shared.ingest(&delivery.data, &source),
            Some(Err(e)) => {
                tracing::debug!(error = %e, "inbox consumer stopped");
                break;
            }
            None => break,
        }
    }
    // The supervisor opens a new channel and consumer after a reconnection.
    drop(channel);
}
