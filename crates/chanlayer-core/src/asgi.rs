//! The message dicts of Django Channels' layers on the wire, for transports that speak them
//! (AMQP's `wire=channels_rabbitmq`): a MessagePack map of the message's `"type"` and its
//! other keys, plus `"__asgi_channel__"` (a message for a channel) or `"__asgi_group__"` (for
//! a group), and nothing else: no id, timestamps or headers. It is what `channels_rabbitmq`
//! (and `channels_redis`) put in a message body.
//!
//! A chanlayer [`Message`] maps to such a dict: the dict's `"type"` is the
//! message type and its other keys are the body, which must be a map:
//!
//! - sending, the body is encoded with the `msgpack` or `json` codec from a struct with named
//!   fields, a map with string keys, or `()` / a unit struct (no keys). A `bincode` body
//!   (not self-describing), a body that is not a map (a number, a list, a tuple struct), a
//!   key that is not a string or is reserved (`type`, `__asgi_channel__`,
//!   `__asgi_group__`), or headers (this wire has no place for them) are an
//!   [`Error::Codec`] that says so, and nothing is sent;
//! - receiving, the body is the map of the dict's other keys, in the `msgpack` codec:
//!   decode it into a struct with named fields, or a map. Bytes that are not such a dict (not
//!   MessagePack, not a map, no string `"type"`, not exactly one of the two address keys)
//!   are refused with the reason ([`decode`]); the transport counts them `undecodable`.
//!
//! ```
//! use chanlayer_core::{asgi, Codec, Message};
//! use chanlayer_core::toolkit::Destination;
//! #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
//! struct Chat { text: String }
//! let m = Message::encode_as("chat.message", &Chat { text: "hi".into() }, Codec::Msgpack)?;
//! let bytes = asgi::encode_message(&m, Destination::Group, "room.1")?;
//! let env = asgi::decode(&bytes, std::time::Duration::from_secs(60)).unwrap();
//! assert_eq!((env.kind, env.destination.as_str()), (Destination::Group, "room.1"));
//! let back = env.into_message();
//! assert_eq!(back.message_type(), "chat.message");
//! assert_eq!(back.decode::<Chat>()?, Chat { text: "hi".into() });
//! # Ok::<(), chanlayer_core::Error>(())
//! ```

use std::time::Duration;

use rmpv::Value;

use crate::codec::Codec;
use crate::envelope::{Destination, Envelope, MessageId};
use crate::error::{Error, Result};
use crate::message::{intern_type, Message};

/// The key that carries the channel of a message for a channel.
pub const CHANNEL_KEY: &str = "__asgi_channel__";
/// The key that carries the group of a message for a group.
pub const GROUP_KEY: &str = "__asgi_group__";
/// The key of the message type.
pub const TYPE_KEY: &str = "type";

fn refuse(codec: Codec, why: impl std::fmt::Display) -> Error {
    Error::Codec {
        codec,
        message: format!("this message cannot travel as a Django Channels message dict (the channels_rabbitmq wire): {why}"),
    }
}

/// The body of `codec` as the entries of a map.
fn body_entries(codec: Codec, body: &[u8]) -> Result<Vec<(Value, Value)>> {
    let value = match codec {
        Codec::Msgpack => rmpv::decode::read_value(&mut &body[..])
            .map_err(|e| refuse(codec, format!("the body is not MessagePack ({e})")))?,
        Codec::Json => {
            let json: serde_json::Value = serde_json::from_slice(body)
                .map_err(|e| refuse(codec, format!("the body is not JSON ({e})")))?;
            let packed = rmp_serde::to_vec(&json).map_err(|e| refuse(codec, e))?;
            rmpv::decode::read_value(&mut &packed[..]).map_err(|e| refuse(codec, e))?
        }
        Codec::Bincode => {
            return Err(refuse(
                codec,
                "its body is bincode, which does not say its field names; encode it with the msgpack or json codec (option codec=msgpack)",
            ))
        }
    };
    match value {
        Value::Map(entries) => {
            let bad = entries.iter().find_map(|(k, _)| match k.as_str() {
                Some(TYPE_KEY | CHANNEL_KEY | GROUP_KEY) => Some((k, "the wire keeps for itself")),
                Some(_) => None,
                None => Some((k, "is not a string")),
            });
            match bad {
                Some((k, why)) => Err(refuse(
                    codec,
                    format!("its body has the key {k}, which {why}"),
                )),
                None => Ok(entries),
            }
        }
        Value::Nil => Ok(Vec::new()),
        other => Err(refuse(
            codec,
            format!(
                "its body is {}, not a map (use a struct with named fields or a map)",
                kind_of(&other)
            ),
        )),
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Nil => "nil",
        Value::Boolean(_) => "a boolean",
        Value::Integer(_) | Value::F32(_) | Value::F64(_) => "a number",
        Value::String(_) => "a string",
        Value::Binary(_) => "binary",
        Value::Array(_) => "an array",
        Value::Map(_) => "a map",
        Value::Ext(..) => "an extension value",
    }
}

/// The dict of `message` for `kind` `destination`: its bytes, or why it cannot be one.
pub fn encode_message(message: &Message, kind: Destination, destination: &str) -> Result<Vec<u8>> {
    encode_parts(
        message.message_type(),
        message.codec(),
        message.body(),
        !message.headers().is_empty(),
        kind,
        destination,
    )
}

/// [`encode_message`] of a sealed envelope (the transports' form).
pub fn encode(envelope: &Envelope, destination: &str) -> Result<Vec<u8>> {
    let codec = Codec::from_id(envelope.codec).unwrap_or_default();
    encode_parts(
        &envelope.msg_type,
        codec,
        &envelope.body,
        !envelope.headers.is_empty(),
        envelope.kind,
        destination,
    )
}

fn encode_parts(
    msg_type: &str,
    codec: Codec,
    body: &[u8],
    has_headers: bool,
    kind: Destination,
    destination: &str,
) -> Result<Vec<u8>> {
    if has_headers {
        return Err(refuse(
            codec,
            "it has headers, and the dict has no place for them (put what they carry in the body)",
        ));
    }
    let entries = body_entries(codec, body)?;
    let address = match kind {
        Destination::Channel => CHANNEL_KEY,
        Destination::Group => GROUP_KEY,
    };
    let mut map = Vec::with_capacity(entries.len() + 2);
    map.push((Value::from(TYPE_KEY), Value::from(msg_type)));
    map.extend(entries);
    map.push((Value::from(address), Value::from(destination)));
    let mut out = Vec::with_capacity(body.len() + msg_type.len() + destination.len() + 48);
    rmpv::encode::write_value(&mut out, &Value::Map(map)).map_err(|e| refuse(codec, e))?;
    Ok(out)
}

/// The envelope of a dict that arrived, or why the bytes are not one. It has a fresh id,
/// is sent now and expires `expiry` from now (the wire carries no times; the broker's
/// message TTL bounds the time before).
pub fn decode(bytes: &[u8], expiry: Duration) -> std::result::Result<Envelope, String> {
    let mut rest = bytes;
    let value = rmpv::decode::read_value(&mut rest)
        .map_err(|e| format!("not a MessagePack value ({e})"))?;
    if !rest.is_empty() {
        return Err(format!("{} bytes after the MessagePack value", rest.len()));
    }
    let Value::Map(entries) = value else {
        return Err(format!(
            "a MessagePack {} where a message dict (a map) belongs",
            kind_of(&value)
        ));
    };
    let mut msg_type = None;
    let mut address: Option<(Destination, String)> = None;
    let mut body = Vec::with_capacity(entries.len());
    for (k, v) in entries {
        let Some(key) = k.as_str() else {
            return Err(format!("the dict has a key that is not a string ({k})"));
        };
        let kind = match key {
            TYPE_KEY => None,
            CHANNEL_KEY => Some(Destination::Channel),
            GROUP_KEY => Some(Destination::Group),
            _ => {
                body.push((k, v));
                continue;
            }
        };
        let Some(text) = v.as_str() else {
            return Err(format!(
                "the dict's {key:?} is {}, not a string",
                kind_of(&v)
            ));
        };
        match kind {
            None => msg_type = Some(text.to_owned()),
            Some(_) if address.is_some() => {
                return Err(format!(
                    "the dict has both {CHANNEL_KEY:?} and {GROUP_KEY:?}"
                ))
            }
            Some(kind) => address = Some((kind, text.to_owned())),
        }
    }
    let msg_type = msg_type.ok_or("the dict has no \"type\"")?;
    crate::message::validate_type(&msg_type).map_err(|e| e.to_string())?;
    let (kind, destination) = address.ok_or(format!(
        "the dict has neither {CHANNEL_KEY:?} nor {GROUP_KEY:?}"
    ))?;
    let mut packed = Vec::with_capacity(bytes.len());
    rmpv::encode::write_value(&mut packed, &Value::Map(body)).map_err(|e| e.to_string())?;
    let now = crate::clock::now_ms();
    Ok(Envelope {
        id: MessageId::new(now),
        kind,
        destination,
        sent_at_ms: now,
        expires_at_ms: now.saturating_add(crate::envelope::duration_ms(expiry)),
        msg_type: intern_type(&msg_type),
        codec: Codec::Msgpack.id(),
        headers: Default::default(),
        body: packed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dict(entries: Vec<(&str, Value)>) -> Vec<u8> {
        let map = entries
            .into_iter()
            .map(|(k, v)| (Value::from(k), v))
            .collect();
        let mut out = Vec::new();
        rmpv::encode::write_value(&mut out, &Value::Map(map)).expect("encodes");
        out
    }

    #[test]
    fn a_python_dict_keeps_every_value_and_its_order() {
        let bytes = dict(vec![
            ("type", Value::from("websocket.send")),
            ("bytes", Value::Binary(vec![0, 255])),
            ("text", Value::from("hi")),
            ("__asgi_channel__", Value::from("channels_a!b")),
        ]);
        let env = decode(&bytes, Duration::from_secs(60)).expect("a dict");
        assert_eq!(env.kind, Destination::Channel);
        assert_eq!(env.destination, "channels_a!b");
        assert_eq!(env.msg_type, "websocket.send");
        assert!(env.expires_at_ms >= env.sent_at_ms + 60_000);
        let body = rmpv::decode::read_value(&mut &env.body[..]).expect("msgpack");
        assert_eq!(
            body,
            Value::Map(vec![
                (Value::from("bytes"), Value::Binary(vec![0, 255])),
                (Value::from("text"), Value::from("hi")),
            ])
        );
        // And back: the same dict, byte for byte.
        assert_eq!(encode(&env, "channels_a!b").expect("encodes"), bytes);
    }

    #[test]
    fn what_is_not_a_dict_says_why() {
        let s = Value::from;
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![0x81], "not a MessagePack value"),
            (vec![0x01], "a number where a message dict"),
            (vec![0x80, 0x80], "bytes after"),
            (
                dict(vec![("text", s("x")), ("__asgi_group__", s("g"))]),
                "no \"type\"",
            ),
            (
                dict(vec![("type", Value::from(1)), ("__asgi_group__", s("g"))]),
                "not a string",
            ),
            (dict(vec![("type", s("a.b"))]), "neither"),
            (
                dict(vec![
                    ("type", s("a.b")),
                    ("__asgi_group__", s("g")),
                    ("__asgi_channel__", s("c")),
                ]),
                "both",
            ),
            (
                dict(vec![("type", s("")), ("__asgi_group__", s("g"))]),
                "type",
            ),
        ];
        for (bytes, why) in cases {
            let e = decode(&bytes, Duration::from_secs(1)).expect_err("refused");
            assert!(e.contains(why), "{bytes:02x?}: {e}");
        }
    }
}
