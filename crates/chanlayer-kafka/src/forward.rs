//! The forwarder: copies group messages to the topics of this instance's normal-channel
//! members (the memberships it added, `Inbound::normal_groups`). The receiver thread reads
//! the groups topic and hands each message with such members to this task, in arrival
//! order; up to 256 copies are in flight at once. A copy that cannot be produced is counted
//! `undeliverable`.

use std::sync::Arc;

use futures::stream::{FuturesUnordered, StreamExt};

use crate::state::Instance;

/// A group message for normal-channel members: the topics to copy it to, and its bytes.
pub(crate) type Forward = (Vec<String>, Vec<u8>);

/// Copies in flight at most.
const IN_FLIGHT: usize = 256;

/// Runs until the layer closes (or the receiver, the only sender, is gone).
pub(crate) async fn run(
    instance: Arc<Instance>,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Forward>,
) {
    let mut in_flight = FuturesUnordered::new();
    loop {
        tokio::select! {
            next = rx.recv(), if in_flight.len() < IN_FLIGHT => {
                let Some((topics, payload)) = next else { break };
                for topic in topics {
                    let enqueued = match instance.topics.ensure(&topic).await {
                        Ok(()) => instance.sender.enqueue(&topic, None, &payload).await.ok(),
                        Err(_) => None,
                    };
                    let Some(f) = enqueued else {
                        instance.inbound.stats().record_undeliverable(&topic);
                        continue;
                    };
                    let instance = instance.clone();
                    in_flight.push(async move {
                        if instance.sender.delivered(&topic, f).await.is_err() {
                            instance.inbound.stats().record_undeliverable(&topic);
                        }
                    });
                }
            }
            Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
            _ = instance.inbound.closed().closed() => break,
        }
    }
}
