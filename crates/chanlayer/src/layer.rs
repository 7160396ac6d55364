//! [`Layer`]: the cloneable handle applications use, with typed conveniences built once on
//! top of [`ChannelLayer`].

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use chanlayer_core::{BatchError, ChannelLayer, Message, MessageType, Result};
use serde::{de::DeserializeOwned, Serialize};

/// A connected channel layer. Cheap to clone (an `Arc`); every clone is the same instance
/// (same process-local channels, same counters). It dereferences to the
/// [`ChannelLayer`], whose operations it adds typed conveniences to.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// use chanlayer::{Layer, MessageType};
/// #[derive(serde::Serialize, serde::Deserialize)]
/// struct Chat { text: String }
/// impl MessageType for Chat { fn message_type(&self) -> &str { "chat.message" } }
///
/// let layer: Layer = chanlayer::connect("memory://").await.unwrap();
/// let me = layer.new_channel("ws").await.unwrap();
/// layer.group_add("room.42", &me).await.unwrap();
/// layer.group_send("room.42", &Chat { text: "hi".into() }).await.unwrap();
/// let chat: Chat = layer.receive_as(&me).await.unwrap();
/// assert_eq!(chat.text, "hi");
/// # });
/// ```
#[derive(Clone)]
pub struct Layer {
    inner: Arc<dyn ChannelLayer>,
}

impl std::fmt::Debug for Layer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Layer")
            .field("backend", &self.inner.capabilities().backend)
            .field("instance", &self.inner.instance_id())
            .finish()
    }
}

/// Every [`ChannelLayer`] operation is called on the handle itself: `receive`,
/// `receive_delivery`, `receive_batch`, `send_batch`, `new_channel`, `group_add`,
/// `group_discard`, `flush`, `close`, `stats`, `options`, `capabilities`, `instance_id`.
/// `send` and `group_send` are the typed ones of [`Layer`]; the raw forms are
/// [`send_message`](Layer::send_message) and [`group_send_message`](Layer::group_send_message).
impl std::ops::Deref for Layer {
    type Target = dyn ChannelLayer;
    fn deref(&self) -> &Self::Target {
        self.inner.as_ref()
    }
}

impl From<Arc<dyn ChannelLayer>> for Layer {
    fn from(inner: Arc<dyn ChannelLayer>) -> Self {
        Layer { inner }
    }
}

impl Layer {
    /// Wraps any backend.
    pub fn new(inner: Arc<dyn ChannelLayer>) -> Self {
        Layer { inner }
    }

    /// The backend behind this handle.
    pub fn inner(&self) -> &Arc<dyn ChannelLayer> {
        &self.inner
    }

    /// Encodes `value` in this layer's codec, with its [`MessageType`].
    pub fn message<T: Serialize + MessageType + ?Sized>(&self, value: &T) -> Result<Message> {
        Message::encode(value, self.options().codec)
    }

    /// Encodes `value` in this layer's codec under an explicit type.
    pub fn message_as<T: Serialize + ?Sized>(
        &self,
        msg_type: impl Into<Cow<'static, str>>,
        value: &T,
    ) -> Result<Message> {
        Message::encode_as(msg_type, value, self.options().codec)
    }

    /// Sends a typed value to `channel`.
    pub async fn send<T: Serialize + MessageType + ?Sized>(
        &self,
        channel: &str,
        value: &T,
    ) -> Result<()> {
        self.inner.send(channel, self.message(value)?).await
    }

    /// Sends a value under an explicit type.
    pub async fn send_as<T: Serialize + ?Sized>(
        &self,
        channel: &str,
        msg_type: impl Into<Cow<'static, str>>,
        value: &T,
    ) -> Result<()> {
        self.send_message(channel, self.message_as(msg_type, value)?)
            .await
    }

    /// Sends a raw [`Message`].
    pub async fn send_message(&self, channel: &str, message: Message) -> Result<()> {
        self.inner.send(channel, message).await
    }

    /// Waits for the next message and decodes its body as `T`.
    pub async fn receive_as<T: DeserializeOwned>(&self, channel: &str) -> Result<T> {
        self.inner.receive(channel).await?.decode()
    }

    /// Runs `handler` on a batch and acks it only if the handler succeeds (see
    /// [`chanlayer_core::handle_batch`]).
    pub async fn handle_batch<F, Fut, E>(
        &self,
        channel: &str,
        max: usize,
        timeout: Duration,
        handler: F,
    ) -> Result<usize, BatchError<E>>
    where
        F: FnOnce(Vec<Message>) -> Fut,
        Fut: std::future::Future<Output = Result<(), E>>,
    {
        chanlayer_core::handle_batch(self.inner.as_ref(), channel, max, timeout, handler).await
    }

    /// Sends a typed value to every member of `group`.
    pub async fn group_send<T: Serialize + MessageType + ?Sized>(
        &self,
        group: &str,
        value: &T,
    ) -> Result<()> {
        self.inner.group_send(group, self.message(value)?).await
    }

    /// Sends a value under an explicit type to every member of `group`.
    pub async fn group_send_as<T: Serialize + ?Sized>(
        &self,
        group: &str,
        msg_type: impl Into<Cow<'static, str>>,
        value: &T,
    ) -> Result<()> {
        self.group_send_message(group, self.message_as(msg_type, value)?)
            .await
    }

    /// Sends a raw [`Message`] to every member of `group`.
    pub async fn group_send_message(&self, group: &str, message: Message) -> Result<()> {
        self.inner.group_send(group, message).await
    }
}
