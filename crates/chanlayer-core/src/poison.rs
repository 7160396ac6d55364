//! Poison messages on normal channels: with `max_deliveries` set, a delivery that is nacked
//! goes back to the end of its channel carrying how often it was delivered (header
//! [`DELIVERIES`]), and the one nacked for the `max_deliveries`-th time goes to the
//! dead-letter channel instead (`dead_letter`, by default `{channel}.dead`), with headers
//! saying why, where from and how often ([`DEAD_REASON`], [`DEAD_CHANNEL`],
//! [`DEAD_DELIVERIES`]). The same on every backend with at-least-once normal channels; a
//! copy is stored before the original is settled, so a crash in between delivers it once
//! more rather than never.
//!
//! A delivery dropped without ack or nack (a crashed or cancelled consumer) comes back
//! through the broker as before and is not counted: only nacks count.

use std::sync::Arc;

use async_trait::async_trait;

use crate::config::LayerOptions;
use crate::delivery::{AckHandle, Acknowledger};
use crate::envelope::Envelope;
use crate::error::Result;
use crate::stats::Stats;
use crate::transport::{Incoming, Outgoing, Transport};

/// How many deliveries of this message were nacked before this one.
pub const DELIVERIES: &str = "chanlayer-deliveries";
/// On a dead letter: why it is there.
pub const DEAD_REASON: &str = "chanlayer-dead-reason";
/// On a dead letter: the channel it came from.
pub const DEAD_CHANNEL: &str = "chanlayer-dead-channel";
/// On a dead letter: how many times it was delivered and nacked.
pub const DEAD_DELIVERIES: &str = "chanlayer-dead-deliveries";

/// The dead-letter channel of `channel` (`dead_letter`, else `{channel}.dead`).
pub fn dead_letter_of(channel: &str, dead_letter: Option<&str>) -> String {
    dead_letter.map_or_else(|| format!("{channel}.dead"), str::to_owned)
}

/// With `max_deliveries` set in `options`, wraps `item`'s acknowledger so that a nack moves
/// it as the module docs say; without, `item` as it is.
pub(crate) fn guard<T: Transport>(
    item: Incoming,
    channel: &str,
    options: &LayerOptions,
    transport: &Arc<T>,
    stats: &Arc<Stats>,
) -> Incoming {
    let Some(max) = options.max_deliveries else {
        return item;
    };
    let before: u32 = item
        .envelope
        .headers
        .get(DELIVERIES)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let acker = PoisonAcker {
        inner: Some(item.ack),
        transport: transport.clone(),
        envelope: item.envelope.clone(),
        channel: channel.to_owned(),
        delivered: before.saturating_add(1),
        max,
        dead: dead_letter_of(channel, options.dead_letter.as_deref()),
        stats: stats.clone(),
    };
    Incoming {
        envelope: item.envelope,
        redelivered: item.redelivered || before > 0,
        ack: AckHandle::new(Box::new(acker)),
    }
}

struct PoisonAcker<T: Transport> {
    inner: Option<AckHandle>,
    transport: Arc<T>,
    envelope: Envelope,
    channel: String,
    /// This delivery's number: 1 for the first.
    delivered: u32,
    max: u32,
    dead: String,
    stats: Arc<Stats>,
}

#[async_trait]
impl<T: Transport> Acknowledger for PoisonAcker<T> {
    async fn ack(&mut self) -> Result<()> {
        match self.inner.take() {
            Some(h) => h.ack().await,
            None => Ok(()),
        }
    }

    async fn nack(&mut self) -> Result<()> {
        let Some(inner) = self.inner.take() else {
            return Ok(());
        };
        let mut env = self.envelope.clone();
        let (h, delivered) = (&mut env.headers, self.delivered);
        let dead = delivered >= self.max;
        let target = if dead {
            h.remove(DELIVERIES);
            let why = format!(
                "delivered and nacked {delivered} times (max_deliveries={})",
                self.max
            );
            h.insert(DEAD_REASON.into(), why);
            h.insert(DEAD_CHANNEL.into(), self.channel.clone());
            h.insert(DEAD_DELIVERIES.into(), delivered.to_string());
            &self.dead
        } else {
            h.insert(DELIVERIES.into(), delivered.to_string());
            &self.channel
        };
        match self
            .transport
            .publish_normal(Outgoing::new(env, target))
            .await
        {
            Ok(_) => {
                if dead {
                    self.stats
                        .record_dead_lettered(&self.channel, &self.dead, self.delivered);
                } else {
                    self.stats.record_redelivered(1);
                }
                inner.ack().await
            }
            Err(e) => {
                // Not stored elsewhere: hand the original back, as a plain nack does.
                tracing::warn!(channel = %self.channel, target = %target, error = %e, "could not move a nacked message; it comes back as it is");
                inner.nack().await
            }
        }
    }
}
