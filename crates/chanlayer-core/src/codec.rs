//! Body codecs: `bincode` (default), `msgpack`, `json`.
//!
//! The codec is chosen per layer (`codec` option) and travels with every message, so a
//! receiver always decodes with the codec the sender used.
//!
//! bincode is the fastest and most compact, but it is not self-describing: it cannot decode
//! serde shapes that need `deserialize_any` (`#[serde(tag = "...")]`, `#[serde(untagged)]`,
//! `#[serde(flatten)]`, `serde_json::Value`). Those fail with a clear [`Error::Codec`] that
//! names the fix (use `msgpack` or `json`); they never panic.
//!
//! ```
//! use chanlayer_core::Codec;
//! let bytes = Codec::Json.encode(&vec![1, 2, 3]).unwrap();
//! assert_eq!(bytes, b"[1,2,3]");
//! let back: Vec<u32> = Codec::Json.decode(&bytes).unwrap();
//! assert_eq!(back, vec![1, 2, 3]);
//! ```

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::error::{Error, Result};

/// The largest body bincode will decode; a length prefix above it is garbage, not a reason to
/// allocate.
const BINCODE_LIMIT: usize = 512 * 1024 * 1024;

pub(crate) fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<BINCODE_LIMIT>()
}

const SELF_DESCRIBING_HINT: &str = "bincode cannot handle self-describing serde shapes \
(#[serde(tag = \"...\")], #[serde(untagged)], #[serde(flatten)], serde_json::Value, maps without a known length); \
use the msgpack or json codec for this type (option codec=msgpack or codec=json)";

/// A body encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", try_from = "String")]
pub enum Codec {
    /// bincode 2 (serde), standard config. Fastest; Rust to Rust. The default.
    #[default]
    Bincode,
    /// MessagePack (rmp-serde, structs as maps): self-describing, the format Django's
    /// channels_redis and channels_rabbitmq use.
    Msgpack,
    /// JSON (serde_json): human-readable, what many Kafka services exchange.
    Json,
}

impl Codec {
    /// All codecs.
    pub const ALL: [Codec; 3] = [Codec::Bincode, Codec::Msgpack, Codec::Json];

    /// The codec's wire id (stored in the envelope).
    pub fn id(self) -> u8 {
        match self {
            Codec::Bincode => 1,
            Codec::Msgpack => 2,
            Codec::Json => 3,
        }
    }

    /// The codec with this wire id.
    pub fn from_id(id: u8) -> Option<Codec> {
        Codec::ALL.into_iter().find(|c| c.id() == id)
    }

    /// The codec's name as used in configuration.
    pub fn name(self) -> &'static str {
        match self {
            Codec::Bincode => "bincode",
            Codec::Msgpack => "msgpack",
            Codec::Json => "json",
        }
    }

    fn err(self, what: &str, detail: impl std::fmt::Display, hint: bool) -> Error {
        let message = if hint {
            format!("{what} failed: {detail}. {SELF_DESCRIBING_HINT}")
        } else {
            format!("{what} failed: {detail}")
        };
        Error::Codec {
            codec: self,
            message,
        }
    }

    /// Encodes a value.
    pub fn encode<T: Serialize + ?Sized>(self, value: &T) -> Result<Vec<u8>> {
        match self {
            Codec::Bincode => bincode::serde::encode_to_vec(value, bincode_config()).map_err(|e| {
                let hint = matches!(
                    e,
                    bincode::error::EncodeError::Serde(_)
                        | bincode::error::EncodeError::Other(_)
                        | bincode::error::EncodeError::OtherString(_)
                );
                self.err("encoding", e, hint)
            }),
            Codec::Msgpack => {
                rmp_serde::to_vec_named(value).map_err(|e| self.err("encoding", e, false))
            }
            Codec::Json => serde_json::to_vec(value).map_err(|e| self.err("encoding", e, false)),
        }
    }

    /// Decodes a value; trailing bytes are an error.
    pub fn decode<T: DeserializeOwned>(self, bytes: &[u8]) -> Result<T> {
        match self {
            Codec::Bincode => {
                let (value, used) = bincode::serde::decode_from_slice(bytes, bincode_config())
                    .map_err(|e| {
                        let hint = matches!(e, bincode::error::DecodeError::Serde(_));
                        self.err("decoding", e, hint)
                    })?;
                if used != bytes.len() {
                    return Err(self.err(
                        "decoding",
                        format!("{} trailing bytes after the value", bytes.len() - used),
                        false,
                    ));
                }
                Ok(value)
            }
            Codec::Msgpack => {
                rmp_serde::from_slice(bytes).map_err(|e| self.err("decoding", e, false))
            }
            Codec::Json => {
                serde_json::from_slice(bytes).map_err(|e| self.err("decoding", e, false))
            }
        }
    }
}

impl std::fmt::Display for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl TryFrom<String> for Codec {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl std::str::FromStr for Codec {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "bincode" => Ok(Codec::Bincode),
            "msgpack" | "messagepack" => Ok(Codec::Msgpack),
            "json" => Ok(Codec::Json),
            other => Err(Error::Config(format!(
                "unknown codec {other:?}; expected bincode, msgpack or json"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    #[serde(tag = "kind")]
    enum Tagged {
        A { x: u32 },
    }

    #[test]
    fn tagged_enum_is_a_clear_error_with_bincode() {
        let v = Tagged::A { x: 1 };
        let err = Codec::Bincode
            .encode(&v)
            .and_then(|b| Codec::Bincode.decode::<Tagged>(&b))
            .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("msgpack") && text.contains("json"), "{text}");
        for c in [Codec::Msgpack, Codec::Json] {
            let b = c.encode(&v).unwrap();
            assert_eq!(c.decode::<Tagged>(&b).unwrap(), v);
        }
    }

    #[test]
    fn garbage_does_not_panic() {
        for c in Codec::ALL {
            assert!(c
                .decode::<Vec<String>>(&[0xff, 0xff, 0xff, 0xff, 0x0f])
                .is_err());
        }
    }
}
