//! The one error type every chanlayer operation returns.

use std::time::Duration;

use crate::codec::Codec;

/// What kind of name an [`Error::InvalidName`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameKind {
    /// A channel name (`send`, `receive`, `group_add`'s channel).
    Channel,
    /// A group name (`group_add`, `group_discard`, `group_send`).
    Group,
    /// The prefix given to `new_channel`.
    Prefix,
}

impl std::fmt::Display for NameKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NameKind::Channel => "channel",
            NameKind::Group => "group",
            NameKind::Prefix => "channel prefix",
        })
    }
}

/// Every failure a channel layer reports, as variants a caller can act on.
///
/// Backends map their client library's errors into these; the original error is kept as the
/// `source` of [`Error::Backend`]. No variant ever carries a password.
///
/// ```
/// use chanlayer_core::{names, Error};
/// let err = names::validate_group("room!1").unwrap_err();
/// assert!(matches!(err, Error::InvalidName { .. }));
/// assert!(err.to_string().contains("group names cannot contain '!'"));
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A channel, group or prefix name broke the naming rules.
    #[error("invalid {kind} name {name:?}: {rule}")]
    InvalidName {
        /// Which kind of name.
        kind: NameKind,
        /// The name as given.
        name: String,
        /// The rule it broke, in words.
        rule: String,
    },
    /// The message itself is malformed (missing or bad `type`, bad header).
    #[error("invalid message: {0}")]
    InvalidMessage(String),
    /// The message is larger than `max_message_size`; nothing was sent.
    #[error(
        "message of {size} bytes is larger than max_message_size ({max} bytes); nothing was sent"
    )]
    MessageTooLarge {
        /// The message's size as counted by chanlayer (body, type, headers, destination).
        size: usize,
        /// The configured limit.
        max: usize,
    },
    /// The channel holds `capacity` messages already; nothing was sent.
    #[error("channel {channel:?} is full (capacity {capacity}); nothing was sent")]
    ChannelFull {
        /// The full channel.
        channel: String,
        /// Its capacity (0 when the broker enforced a limit chanlayer does not know).
        capacity: usize,
    },
    /// A process-local channel (`prefix!...`) can only be received by the layer instance that
    /// created it.
    #[error("channel {channel:?} is process-local to another layer instance; only its owner may receive from it")]
    NotOwner {
        /// The channel.
        channel: String,
    },
    /// The layer was closed; no further operations are possible.
    #[error("the channel layer is closed")]
    Closed,
    /// The backend cannot do this operation.
    #[error("{operation} is not supported by the {backend} backend: {reason}")]
    Unsupported {
        /// The operation asked for.
        operation: &'static str,
        /// The backend's name.
        backend: &'static str,
        /// Why, and what to do instead.
        reason: String,
    },
    /// The configuration (URL, file, environment) is wrong.
    #[error("configuration error: {0}")]
    Config(String),
    /// A body could not be encoded or decoded.
    #[error("{codec} codec error: {message}")]
    Codec {
        /// The codec that failed.
        codec: Codec,
        /// What went wrong, and the fix where there is one.
        message: String,
    },
    /// The broker or its client library failed.
    #[error("{backend} backend error: {message}")]
    Backend {
        /// The backend's name.
        backend: &'static str,
        /// What failed.
        message: String,
        /// The client library's error.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
    },
    /// An operation did not finish in time.
    #[error("{operation} timed out after {after:?}")]
    Timeout {
        /// The operation.
        operation: &'static str,
        /// How long it was given.
        after: Duration,
    },
    /// A `send_batch` sent its first `sent` messages, then one failed with `cause`: the
    /// messages from there on were not sent. (When the first message fails, the error is
    /// `cause` itself: nothing was sent.) To retry without duplicates, send the batch again
    /// from message `sent`.
    #[error("send_batch sent {sent} of {total} messages, then: {cause}; the other {} were not sent", total - sent)]
    PartlySent {
        /// How many messages, from the first, were sent.
        sent: usize,
        /// How many the batch held.
        total: usize,
        /// Why the next one was not sent (`ChannelFull`, say).
        #[source]
        cause: Box<Error>,
    },
}

impl Error {
    /// The failure of a batch of `total` messages whose first `sent` went out: `cause` itself
    /// when none did, [`Error::PartlySent`] otherwise.
    pub fn partly_sent(sent: usize, total: usize, cause: Error) -> Self {
        if sent == 0 {
            cause
        } else {
            Error::PartlySent {
                sent,
                total,
                cause: Box::new(cause),
            }
        }
    }

    /// A [`Error::Backend`] with a client library error as its source.
    pub fn backend<E>(backend: &'static str, message: impl Into<String>, source: E) -> Self
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        Error::Backend {
            backend,
            message: message.into(),
            source: Some(Box::new(source)),
        }
    }

    /// A [`Error::Backend`] with no lower-level cause.
    pub fn failure(backend: &'static str, message: impl Into<String>) -> Self {
        Error::Backend {
            backend,
            message: message.into(),
            source: None,
        }
    }

    /// An [`Error::Unsupported`].
    pub fn unsupported(
        operation: &'static str,
        backend: &'static str,
        reason: impl Into<String>,
    ) -> Self {
        Error::Unsupported {
            operation,
            backend,
            reason: reason.into(),
        }
    }
}

/// `Result` with chanlayer's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
