//! The [`ChannelLayer`] trait every backend implements.

use std::time::Duration;

use async_trait::async_trait;

use crate::capabilities::Capabilities;
use crate::config::LayerOptions;
use crate::delivery::Delivery;
use crate::error::{Error, Result};
use crate::message::Message;
use crate::stats::StatsSnapshot;

/// A channel layer: named channels, groups, and the broker behind them.
///
/// Object-safe: the `chanlayer` facade holds an `Arc<dyn ChannelLayer>`. Names are `&str`
/// and messages raw [`Message`]s; typed conveniences live in the facade, once.
///
/// Every async operation is cancellation-safe: dropping its future loses no message (a
/// receive that did not return did not take anything).
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// use chanlayer_core::{ChannelLayer, Codec, LayerConfig, Message, MemoryLayer};
/// let layer = MemoryLayer::connect(&LayerConfig::from_url("memory://").unwrap()).await.unwrap();
/// let me = layer.new_channel("ws").await.unwrap();
/// layer.group_add("room", &me).await.unwrap();
/// layer.group_send("room", Message::encode_as("chat", &"hi", Codec::Json).unwrap()).await.unwrap();
/// let got = layer.receive(&me).await.unwrap();
/// assert_eq!(got.decode::<String>().unwrap(), "hi");
/// # });
/// ```
#[async_trait]
pub trait ChannelLayer: Send + Sync + 'static {
    /// What this backend guarantees.
    fn capabilities(&self) -> Capabilities;

    /// The shared options this layer runs with.
    fn options(&self) -> &LayerOptions;

    /// The instance id that `new_channel` names carry.
    fn instance_id(&self) -> &str;

    /// A snapshot of this instance's counters.
    fn stats(&self) -> StatsSnapshot;

    /// Sends to one reader of `channel`. `Err(ChannelFull)` when the channel is known to be
    /// at capacity; `Err(MessageTooLarge)` / `Err(InvalidMessage)` before anything is sent.
    async fn send(&self, channel: &str, message: Message) -> Result<()>;

    /// Sends several messages to `channel`, in order. Every message is checked before any
    /// is sent; on a later failure (for example `ChannelFull`) the ones before it were sent.
    async fn send_batch(&self, channel: &str, messages: Vec<Message>) -> Result<()> {
        for m in &messages {
            m.validate_for(channel, self.options().max_message_size)?;
        }
        for m in messages {
            self.send(channel, m).await?;
        }
        Ok(())
    }

    /// Waits for the next message on `channel` (auto-acked).
    async fn receive(&self, channel: &str) -> Result<Message>;

    /// Waits for the next message on `channel` as a [`Delivery`] to ack or nack. On
    /// backends without at-least-once (see [`Capabilities::at_least_once`]) this is
    /// `Unsupported` for normal channels.
    async fn receive_delivery(&self, channel: &str) -> Result<Delivery>;

    /// Waits up to `timeout` for the first message, then takes up to `max` in all without
    /// waiting further. Returns an empty vector if nothing arrived in time. Like
    /// `receive_delivery`, `Unsupported` for normal channels on backends without
    /// at-least-once.
    async fn receive_batch(
        &self,
        channel: &str,
        max: usize,
        timeout: Duration,
    ) -> Result<Vec<Delivery>>;

    /// A fresh process-local channel `"{prefix}.{instance}!{random}"` owned by this instance.
    async fn new_channel(&self, prefix: &str) -> Result<String>;

    /// Adds `channel` to `group` (idempotent; refreshes the membership's expiry).
    async fn group_add(&self, group: &str, channel: &str) -> Result<()>;

    /// Removes `channel` from `group` (no error if it was not a member).
    async fn group_discard(&self, group: &str, channel: &str) -> Result<()>;

    /// Sends one copy to every member of `group`. Never `ChannelFull`: a full member is
    /// skipped and counted.
    async fn group_send(&self, group: &str, message: Message) -> Result<()>;

    /// The live members of `group` (channel names, sorted): on a backend whose
    /// capabilities say `all_group_members` (memory), every instance's; elsewhere this
    /// instance's own (its process-local channels, and the normal channels it added). By
    /// default `Unsupported`.
    async fn group_members(&self, group: &str) -> Result<Vec<String>> {
        let _ = group;
        Err(Error::unsupported(
            "group_members",
            self.capabilities().backend,
            "this layer does not list group members",
        ))
    }

    /// Empties everything this layer can see: messages and groups.
    async fn flush(&self) -> Result<()>;

    /// Stops background work and releases broker resources. Pending and later calls get
    /// `Error::Closed`. Idempotent.
    async fn close(&self) -> Result<()>;
}
