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
//! [`LocalInbox`]: chanlayer_core::LocalInbox

use std::sync::Arc;

use chanlayer_core::{names, Destination, Envelope, Error};
use futures::StreamExt;
use lapin::{Channel, Consumer};

use crate::layer::Inner;

/// Runs until the consumer ends (connection lost, or closed) or the layer closes.
pub(crate) async fn run(inner: Arc<Inner>, mut consumer: Consumer, channel: Channel) {
    let source = format!("amqp inbox {}", inner.names.inbox);
    loop {
        let next = tokio::select! {
            _ = inner.closed.closed() => break,
            n = consumer.next() => n,
        };
        match next {
            Some(Ok(delivery)) => {
                let envelope = match Envelope::decode(&delivery.data) {
                    Ok(e) => e,
                    Err(e) => {
                        inner.stats.record_undecodable(&source, &e);
                        continue;
                    }
                };
                // Only this instance's own process-local channels live in its inbox.
                if envelope.kind == Destination::Channel
                    && names::owner_instance(&envelope.destination) != Some(inner.id.as_str())
                {
                    inner.stats.record_undeliverable(&envelope.destination);
                    continue;
                }
                let r = inner.inbox.deliver(
                    envelope,
                    &inner.local_groups,
                    &inner.options,
                    &inner.stats,
                );
                if let Err(Error::ChannelFull { channel, .. }) = r {
                    inner.stats.record_dropped_full(&channel);
                }
            }
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
