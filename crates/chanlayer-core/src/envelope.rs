//! The versioned [`Envelope`] that crosses the wire.
//!
//! Wire format: the two magic bytes `CL`, one format-version byte, then the envelope encoded
//! with bincode 2 (serde, standard config). Bytes that do not decode (wrong magic, unknown
//! version, garbage, truncation, trailing bytes) are an [`EnvelopeError`]; receivers count
//! and skip them (see [`crate::toolkit::Stats::record_undecodable`]).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::codec::{bincode_config, Codec};
use crate::config::LayerOptions;
use crate::error::Result;
use crate::message::{Headers, Message};

/// The magic bytes every envelope starts with.
pub const MAGIC: [u8; 2] = *b"CL";
/// The envelope format version this build writes and reads.
pub const FORMAT_VERSION: u8 = 1;

/// A unique, time-sortable message id: 48 bits of milliseconds since the epoch, then 80
/// random bits (the ULID layout). Displayed as 32 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct MessageId(pub u128);

impl MessageId {
    /// A new id for a message sent at `at_ms`.
    pub fn new(at_ms: u64) -> Self {
        let random: u128 = rand::random::<u128>() & ((1u128 << 80) - 1);
        MessageId((u128::from(at_ms) << 80) | random)
    }

    /// The milliseconds part.
    pub fn timestamp_ms(self) -> u64 {
        (self.0 >> 80) as u64
    }
}

impl std::fmt::Display for MessageId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl std::fmt::Debug for MessageId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MessageId({self})")
    }
}

/// Whether an envelope is addressed to a channel or to a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Destination {
    /// A channel (normal or process-local).
    Channel,
    /// A group: every receiving instance fans it out to its local members.
    Group,
}

/// What crosses the wire: the message plus routing and timing.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// Unique, sortable id.
    pub id: MessageId,
    /// Channel or group.
    pub kind: Destination,
    /// The channel or group name.
    pub destination: String,
    /// Milliseconds since the epoch when it was sent.
    pub sent_at_ms: u64,
    /// Milliseconds since the epoch after which it is dropped on receive.
    pub expires_at_ms: u64,
    /// The message type.
    pub msg_type: std::borrow::Cow<'static, str>,
    /// The body's codec id ([`Codec::id`]).
    pub codec: u8,
    /// Headers (trace context, refs).
    pub headers: Headers,
    /// The encoded body.
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
}

impl std::fmt::Debug for Envelope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Envelope")
            .field("id", &self.id)
            .field("kind", &self.kind)
            .field("destination", &self.destination)
            .field("sent_at_ms", &self.sent_at_ms)
            .field("expires_at_ms", &self.expires_at_ms)
            .field("msg_type", &self.msg_type)
            .field("codec", &self.codec)
            .field("body_len", &self.body.len())
            .finish()
    }
}

/// Why bytes from the wire are not an envelope.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    /// Shorter than the header.
    #[error("truncated: {0} bytes is shorter than the envelope header")]
    Truncated(usize),
    /// Not a chanlayer envelope.
    #[error("not a chanlayer envelope (bad magic bytes)")]
    BadMagic,
    /// A format version this build does not read.
    #[error(
        "envelope format version {0} is not supported (this build reads version {FORMAT_VERSION})"
    )]
    UnsupportedVersion(u8),
    /// The body did not decode.
    #[error("malformed envelope: {0}")]
    Malformed(String),
}

impl Envelope {
    /// Validates `message` for `destination` against `options` (type, size) and wraps it.
    /// This is the one place every backend checks a message before sending it.
    pub fn seal(
        kind: Destination,
        destination: &str,
        message: Message,
        options: &LayerOptions,
    ) -> Result<Envelope> {
        let mut env = Self::seal_unaddressed(kind, destination, message, options)?;
        env.destination = destination.to_owned();
        Ok(env)
    }

    /// [`Envelope::seal`] without storing the destination (left empty), for in-process
    /// delivery where the queue a message is pushed to is its address. The checks are the
    /// same, the size counted includes `destination`; it saves a copy of the name per message.
    pub fn seal_unaddressed(
        kind: Destination,
        destination: &str,
        message: Message,
        options: &LayerOptions,
    ) -> Result<Envelope> {
        message.validate_for(destination, options.max_message_size)?;
        // The cheap clock: one system clock read per message is a few per cent of a small
        // message's path (see `clock`).
        let now = crate::clock::recent_ms();
        let (msg_type, codec, body, headers) = message.into_parts();
        Ok(Envelope {
            id: MessageId::new(now),
            kind,
            destination: String::new(),
            sent_at_ms: now,
            expires_at_ms: now.saturating_add(duration_ms(options.expiry)),
            msg_type,
            codec: codec.id(),
            headers,
            body,
        })
    }

    /// `true` once `now_ms` is at or past the expiry.
    pub fn is_expired_at(&self, now_ms: u64) -> bool {
        now_ms >= self.expires_at_ms
    }

    /// The message inside. An unknown codec id decodes as bincode and fails on `decode`
    /// with a codec error; [`Envelope::decode`] already rejects unknown ids.
    pub fn into_message(self) -> Message {
        let codec = Codec::from_id(self.codec).unwrap_or_default();
        let mut msg = Message::new(self.msg_type, codec, self.body);
        *msg.headers_mut() = self.headers;
        msg
    }

    /// Encodes for the wire.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.body.len() + self.destination.len() + 96);
        self.encode_to(&self.destination, &mut out);
        out
    }

    /// Appends the wire bytes of this envelope addressed to `destination` (whatever its own
    /// `destination` field holds): what a transport sends for an envelope core sealed
    /// unaddressed.
    pub fn encode_to(&self, destination: &str, out: &mut Vec<u8>) {
        // The bytes bincode 2's standard config writes for `Wire`, field by field, written
        // here directly: a third of the instructions of the serde path, on every message
        // sent (a unit test holds the two byte for byte).
        let headers: usize = self
            .headers
            .iter()
            .map(|(k, v)| k.len() + v.len() + 6)
            .sum();
        out.reserve(48 + destination.len() + self.msg_type.len() + headers + self.body.len());
        out.extend_from_slice(&MAGIC);
        out.push(FORMAT_VERSION);
        varint128(out, self.id.0);
        varint(out, self.kind as u64);
        bytes(out, destination.as_bytes());
        varint(out, self.sent_at_ms);
        varint(out, self.expires_at_ms);
        bytes(out, self.msg_type.as_bytes());
        out.push(self.codec);
        varint(out, self.headers.len() as u64);
        for (key, value) in &self.headers {
            bytes(out, key.as_bytes());
            bytes(out, value.as_bytes());
        }
        bytes(out, &self.body);
    }

    /// Decodes bytes from the wire.
    pub fn decode(bytes: &[u8]) -> Result<Envelope, EnvelopeError> {
        if bytes.len() < MAGIC.len() + 1 {
            return Err(EnvelopeError::Truncated(bytes.len()));
        }
        if bytes[..2] != MAGIC {
            return Err(EnvelopeError::BadMagic);
        }
        if bytes[2] != FORMAT_VERSION {
            return Err(EnvelopeError::UnsupportedVersion(bytes[2]));
        }
        let payload = &bytes[3..];
        // Decoded by reference first (no zero-filled buffers), checked whole, then copied
        // once into the owned envelope.
        let (env, used): (Wire<'_, Headers>, usize) =
            bincode::serde::borrow_decode_from_slice(payload, bincode_config())
                .map_err(|e| EnvelopeError::Malformed(e.to_string()))?;
        if used != payload.len() {
            return Err(EnvelopeError::Malformed(format!(
                "{} trailing bytes",
                payload.len() - used
            )));
        }
        if Codec::from_id(env.codec).is_none() {
            return Err(EnvelopeError::Malformed(format!(
                "unknown codec id {}",
                env.codec
            )));
        }
        Ok(Envelope {
            id: env.id,
            kind: env.kind,
            destination: env.destination.to_owned(),
            sent_at_ms: env.sent_at_ms,
            expires_at_ms: env.expires_at_ms,
            msg_type: crate::message::intern_type(env.msg_type),
            codec: env.codec,
            headers: env.headers,
            body: env.body.to_vec(),
        })
    }
}

/// Appends `v` as bincode 2's variable-length integer: one byte up to 250, else a marker byte
/// (251 to 253) and the value in 2, 4 or 8 little-endian bytes.
#[inline]
fn varint(out: &mut Vec<u8>, v: u64) {
    if v <= 250 {
        out.push(v as u8);
    } else if let Ok(v) = u16::try_from(v) {
        out.push(251);
        out.extend_from_slice(&v.to_le_bytes());
    } else if let Ok(v) = u32::try_from(v) {
        out.push(252);
        out.extend_from_slice(&v.to_le_bytes());
    } else {
        out.push(253);
        out.extend_from_slice(&v.to_le_bytes());
    }
}

/// [`varint`] of a `u128`: above `u64::MAX`, the marker byte 254 and 16 bytes.
fn varint128(out: &mut Vec<u8>, v: u128) {
    match u64::try_from(v) {
        Ok(v) => varint(out, v),
        Err(_) => {
            out.push(254);
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
}

/// Appends a string's or a byte string's length, then its bytes, as bincode writes them.
#[inline]
fn bytes(out: &mut Vec<u8>, b: &[u8]) {
    varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

/// An [`Envelope`] on the wire, field for field, decoded borrowing the strings and the body
/// from the bytes ([`Envelope::encode_to`] writes the same bytes by hand; the tests encode
/// it with bincode to hold the two together).
#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct Wire<'a, H> {
    id: MessageId,
    kind: Destination,
    destination: &'a str,
    sent_at_ms: u64,
    expires_at_ms: u64,
    msg_type: &'a str,
    codec: u8,
    headers: H,
    #[serde(borrow)]
    body: &'a serde_bytes::Bytes,
}

pub(crate) fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;

    fn sample() -> Envelope {
        let msg = Message::encode_as("t.x", &"hello", Codec::Json)
            .unwrap()
            .with_header("traceparent", "00-abc");
        Envelope::seal(Destination::Channel, "ch", msg, &LayerOptions::default()).unwrap()
    }

    /// The hand encoding writes exactly what bincode writes for `Wire`: every width of
    /// variable-length integer, both kinds, headers or none, any strings and bodies.
    #[test]
    fn the_hand_encoding_is_bincode_byte_for_byte() {
        let ints = [
            0,
            1,
            250,
            251,
            65_535,
            65_536,
            u64::from(u32::MAX),
            1 << 32,
            u64::MAX,
        ];
        let long = "é".repeat(200);
        let mut n = 0;
        for (i, &int) in ints.iter().enumerate() {
            for kind in [Destination::Channel, Destination::Group] {
                let mut env = sample();
                env.kind = kind;
                env.id = MessageId(if i % 2 == 0 {
                    u128::from(int)
                } else {
                    u128::MAX - u128::from(int)
                });
                env.sent_at_ms = int;
                env.expires_at_ms = ints[ints.len() - 1 - i];
                env.codec = i as u8;
                env.body = vec![7; (int % 70_000) as usize];
                if i % 3 == 0 {
                    env.headers.clear();
                } else {
                    env.headers.insert(long.clone(), "v".repeat(i * 40));
                }
                let destination = if i % 2 == 0 { "ch" } else { long.as_str() };
                let mut mine = vec![1, 2];
                env.encode_to(destination, &mut mine);
                let wire = Wire {
                    id: env.id,
                    kind: env.kind,
                    destination,
                    sent_at_ms: env.sent_at_ms,
                    expires_at_ms: env.expires_at_ms,
                    msg_type: &env.msg_type,
                    codec: env.codec,
                    headers: &env.headers,
                    body: serde_bytes::Bytes::new(&env.body),
                };
                let mut theirs = vec![1, 2, b'C', b'L', FORMAT_VERSION];
                theirs.extend(bincode::serde::encode_to_vec(wire, bincode_config()).unwrap());
                assert_eq!(mine, theirs, "int {int}, {kind:?}");
                n += 1;
            }
        }
        assert_eq!(n, 18);
    }

    #[test]
    fn round_trip() {
        let env = sample();
        let bytes = env.encode();
        assert_eq!(Envelope::decode(&bytes).unwrap(), env);
    }

    #[test]
    fn rejects_garbage_truncation_and_versions() {
        let bytes = sample().encode();
        for cut in 0..bytes.len() {
            assert!(Envelope::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut v2 = bytes.clone();
        v2[2] = 2;
        assert_eq!(
            Envelope::decode(&v2),
            Err(EnvelopeError::UnsupportedVersion(2))
        );
        let mut extra = bytes.clone();
        extra.push(0);
        assert!(Envelope::decode(&extra).is_err());
        assert_eq!(Envelope::decode(b"XXgarbage"), Err(EnvelopeError::BadMagic));
        let mut huge = b"CL\x01".to_vec();
        huge.extend_from_slice(&[0xff; 32]);
        assert!(Envelope::decode(&huge).is_err());
    }

    #[test]
    fn unaddressed_seal_encodes_to_its_destination() {
        let msg = Message::encode_as("t.x", &"hello", Codec::Json)
            .unwrap()
            .with_header("traceparent", "00-abc");
        let env = Envelope::seal_unaddressed(
            Destination::Group,
            "room",
            msg.clone(),
            &LayerOptions::default(),
        )
        .unwrap();
        assert_eq!(env.destination, "");
        let mut out = b"kept".to_vec();
        env.encode_to("room", &mut out);
        assert_eq!(&out[..4], b"kept", "appended");
        let back = Envelope::decode(&out[4..]).unwrap();
        assert_eq!(back.destination, "room");
        assert_eq!(back.kind, Destination::Group);
        assert_eq!(back.encode(), &out[4..], "the same bytes as encode");
        assert_eq!(back.into_message(), msg);
        let too_big = Message::new("t", Codec::Bincode, vec![0; 100]);
        let small = LayerOptions {
            max_message_size: 50,
            ..LayerOptions::default()
        };
        assert!(matches!(
            Envelope::seal_unaddressed(Destination::Channel, "c", too_big, &small),
            Err(Error::MessageTooLarge { .. })
        ));
    }

    #[test]
    fn ids_sort_by_time() {
        let a = MessageId::new(1000);
        let b = MessageId::new(1001);
        assert!(a < b);
        assert_eq!(a.timestamp_ms(), 1000);
    }
}
