//! [`Message`]: a `type`, an encoded body, and headers.

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::{de::DeserializeOwned, Serialize};

use crate::codec::Codec;
use crate::error::{Error, Result};

/// Message headers: trace context, correlation ids, anything small. Sorted by key.
pub type Headers = BTreeMap<String, String>;

/// The longest message `type`, in bytes.
pub const MAX_TYPE_LEN: usize = 255;

/// A value that knows its own message `type`.
///
/// The type travels beside the body (not inside it), so this works with every codec,
/// bincode included. Implement it by hand; for an enum, return a type per variant.
///
/// ```
/// use chanlayer_core::{Codec, Message, MessageType};
/// #[derive(serde::Serialize, serde::Deserialize)]
/// struct Chat { text: String }
/// impl MessageType for Chat {
///     fn message_type(&self) -> &str { "chat.message" }
/// }
/// let msg = Message::encode(&Chat { text: "hi".into() }, Codec::Bincode).unwrap();
/// assert_eq!(msg.message_type(), "chat.message");
/// assert_eq!(msg.decode::<Chat>().unwrap().text, "hi");
/// ```
pub trait MessageType {
    /// The message's `type`: non-empty, not starting with `_` or `.`.
    fn message_type(&self) -> &str;
}

/// A message as channel layers carry it: `type`, body bytes in a [`Codec`], and headers.
///
/// Build one from a value with [`Message::encode`] / [`Message::encode_as`], or from raw
/// bytes with [`Message::new`]; read it with [`Message::decode`].
#[derive(Clone, PartialEq, Eq)]
pub struct Message {
    msg_type: Cow<'static, str>,
    codec: Codec,
    body: Vec<u8>,
    headers: Headers,
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Message")
            .field("type", &self.msg_type)
            .field("codec", &self.codec)
            .field("body_len", &self.body.len())
            .field("headers", &self.headers)
            .finish()
    }
}

impl Message {
    /// A message from already-encoded body bytes. A `&'static str` type is stored without
    /// copying.
    pub fn new(msg_type: impl Into<Cow<'static, str>>, codec: Codec, body: Vec<u8>) -> Self {
        Message {
            msg_type: msg_type.into(),
            codec,
            body,
            headers: Headers::new(),
        }
    }

    /// Encodes `value` with `codec`, taking the type from [`MessageType`].
    pub fn encode<T: Serialize + MessageType + ?Sized>(value: &T, codec: Codec) -> Result<Self> {
        Self::encode_as(value.message_type().to_owned(), value, codec)
    }

    /// Encodes `value` with `codec` under an explicit type.
    ///
    /// ```
    /// use chanlayer_core::{Codec, Message};
    /// let msg = Message::encode_as("counter.set", &42u64, Codec::Msgpack).unwrap();
    /// assert_eq!(msg.decode::<u64>().unwrap(), 42);
    /// ```
    pub fn encode_as<T: Serialize + ?Sized>(
        msg_type: impl Into<Cow<'static, str>>,
        value: &T,
        codec: Codec,
    ) -> Result<Self> {
        let msg_type = msg_type.into();
        validate_type(&msg_type)?;
        Ok(Message::new(msg_type, codec, codec.encode(value)?))
    }

    /// Decodes the body with the codec it was encoded with.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T> {
        self.codec.decode(&self.body)
    }

    /// Adds a header.
    pub fn with_header(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(key.into(), value.into());
        self
    }

    /// The message `type`.
    pub fn message_type(&self) -> &str {
        &self.msg_type
    }

    /// The body's codec.
    pub fn codec(&self) -> Codec {
        self.codec
    }

    /// The encoded body.
    pub fn body(&self) -> &[u8] {
        &self.body
    }

    /// The headers.
    pub fn headers(&self) -> &Headers {
        &self.headers
    }

    /// The headers, mutable.
    pub fn headers_mut(&mut self) -> &mut Headers {
        &mut self.headers
    }

    /// Splits the message into its parts: type, codec, body, headers.
    pub fn into_parts(self) -> (Cow<'static, str>, Codec, Vec<u8>, Headers) {
        (self.msg_type, self.codec, self.body, self.headers)
    }

    /// The size chanlayer counts against `max_message_size`: body, type and headers, plus
    /// the destination name.
    pub fn wire_size(&self, destination: &str) -> usize {
        wire_size(&self.body, &self.msg_type, destination, &self.headers)
    }

    /// Checks the type and headers.
    pub fn validate(&self) -> Result<()> {
        validate_type(&self.msg_type)?;
        if self.headers.keys().any(String::is_empty) {
            return Err(Error::InvalidMessage("a header key is empty".into()));
        }
        Ok(())
    }

    /// [`validate`](Self::validate), then `MessageTooLarge` if its
    /// [`wire_size`](Self::wire_size) for `destination` is over `max`.
    pub(crate) fn validate_for(&self, destination: &str, max: usize) -> Result<()> {
        self.validate()?;
        let size = self.wire_size(destination);
        if size > max {
            return Err(Error::MessageTooLarge { size, max });
        }
        Ok(())
    }
}

/// The size counted against `max_message_size`: body, type, destination and headers.
pub(crate) fn wire_size(
    body: &[u8],
    msg_type: &str,
    destination: &str,
    headers: &Headers,
) -> usize {
    let headers: usize = headers.iter().map(|(k, v)| k.len() + v.len()).sum();
    body.len() + msg_type.len() + destination.len() + headers
}

/// How many distinct message types [`intern_type`] keeps for the life of the process.
pub const INTERNED_TYPES_MAX: usize = 1024;
/// The longest message type [`intern_type`] keeps, in bytes.
pub const INTERNED_TYPE_LEN_MAX: usize = 64;

/// The message types kept so far (leaked on purpose: at most [`INTERNED_TYPES_MAX`] of at
/// most [`INTERNED_TYPE_LEN_MAX`] bytes, 64 KiB in all).
static INTERNED: std::sync::LazyLock<std::sync::RwLock<std::collections::HashSet<&'static str>>> =
    std::sync::LazyLock::new(Default::default);

thread_local! {
    /// The types this thread interned or found most recently, newest first: a receiving
    /// thread sees the same few types over and over, and finds them here without a lock.
    static RECENT: std::cell::Cell<[Option<&'static str>; 4]> =
        const { std::cell::Cell::new([None; 4]) };
}

/// A message type read off the wire, as a type that costs no allocation when it was seen
/// before: receivers decode the same few types again and again, and each owned copy would
/// be allocated on the receiving thread and freed on the application's. The first
/// [`INTERNED_TYPES_MAX`] distinct types of at most [`INTERNED_TYPE_LEN_MAX`] bytes are kept
/// for the life of the process; any other type is copied as before.
pub fn intern_type(msg_type: &str) -> Cow<'static, str> {
    if msg_type.len() > INTERNED_TYPE_LEN_MAX {
        return Cow::Owned(msg_type.to_owned());
    }
    let recent = RECENT.try_with(std::cell::Cell::get).unwrap_or([None; 4]);
    if let Some(t) = recent.iter().flatten().find(|t| **t == msg_type) {
        return Cow::Borrowed(t);
    }
    let found = INTERNED
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .get(msg_type)
        .copied();
    let kept = match found {
        Some(t) => t,
        None => {
            let mut types = INTERNED
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match types.get(msg_type) {
                Some(t) => *t,
                None if types.len() < INTERNED_TYPES_MAX => {
                    let t: &'static str = Box::leak(msg_type.to_owned().into_boxed_str());
                    types.insert(t);
                    t
                }
                None => return Cow::Owned(msg_type.to_owned()),
            }
        }
    };
    let _ = RECENT.try_with(|r| {
        let [a, b, c, _] = r.get();
        r.set([Some(kept), a, b, c]);
    });
    Cow::Borrowed(kept)
}

/// Checks a message type: non-empty, at most 255 bytes, no leading `_` or `.`, no control
/// characters or whitespace.
pub fn validate_type(msg_type: &str) -> Result<()> {
    if msg_type.is_empty() {
        return Err(Error::InvalidMessage(
            "the message has no type; every message needs a non-empty `type`".into(),
        ));
    }
    if msg_type.len() > MAX_TYPE_LEN {
        return Err(Error::InvalidMessage(format!(
            "the message type is {} bytes long; the limit is {MAX_TYPE_LEN}",
            msg_type.len()
        )));
    }
    if let Some(first @ ('_' | '.')) = msg_type.chars().next() {
        return Err(Error::InvalidMessage(format!(
            "the message type {msg_type:?} starts with {first:?}; types may not start with '_' or '.'"
        )));
    }
    if let Some(c) = msg_type
        .chars()
        .find(|c| c.is_control() || c.is_whitespace())
    {
        return Err(Error::InvalidMessage(format!(
            "the message type {msg_type:?} contains {c:?}; types may not contain whitespace or control characters"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whitespace and control characters, ASCII or not, are refused in a type; other
    /// characters pass.
    #[test]
    fn types_with_whitespace_or_control_characters_are_refused() {
        for bad in [
            "a b",
            "a\tb",
            "a\x0bb",
            "a\x7f",
            "\x00",
            "é\u{a0}x",
            "x\u{2028}",
            "é\u{85}",
        ] {
            let e = validate_type(bad).expect_err(bad);
            assert!(
                e.to_string().contains("whitespace or control"),
                "{bad:?}: {e}"
            );
        }
        for good in ["chat.message", "a-b_c:d/e", "café.commande", "~x"] {
            validate_type(good).expect(good);
        }
    }

    #[test]
    fn interned_types_are_shared_equal_and_bounded() {
        let a = intern_type("chat.message");
        let b = intern_type(&String::from("chat.message"));
        assert_eq!(a, "chat.message");
        match (&a, &b) {
            (Cow::Borrowed(x), Cow::Borrowed(y)) => {
                assert!(std::ptr::eq(*x, *y), "one copy for the process");
            }
            _ => panic!("a short type is interned: {a:?} {b:?}"),
        }
        let long = "x".repeat(INTERNED_TYPE_LEN_MAX + 1);
        assert!(matches!(intern_type(&long), Cow::Owned(ref s) if *s == long));
        // Past the limit, new types are copied; the ones kept stay shared.
        let mut owned = 0;
        for i in 0..INTERNED_TYPES_MAX + 10 {
            let t = format!("bounded.{i}");
            match intern_type(&t) {
                Cow::Borrowed(s) => assert_eq!(s, t),
                Cow::Owned(s) => {
                    assert_eq!(s, t);
                    owned += 1;
                }
            }
        }
        assert!(owned >= 10, "at most {INTERNED_TYPES_MAX} types are kept");
        assert!(matches!(intern_type("chat.message"), Cow::Borrowed(_)));
        assert!(INTERNED.read().expect("not poisoned").len() <= INTERNED_TYPES_MAX);
    }
}
