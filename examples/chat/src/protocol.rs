//! What travels: the browser's requests (JSON), the server's events to the browser (JSON),
//! and the chat message that crosses the channel layer between server processes.

use serde::{Deserialize, Serialize};

/// Longest room name a client may use (the group name adds [`GROUP_PREFIX`]).
pub const MAX_ROOM_LEN: usize = 64;
/// Longest text a client may send, in characters.
pub const MAX_TEXT_CHARS: usize = 2000;
/// Longest sender name, in characters (longer names are cut).
pub const MAX_NAME_CHARS: usize = 32;
/// The channel layer's group of room `r` is `room.r`.
pub const GROUP_PREFIX: &str = "room.";
/// The `type` of [`ChatMessage`] on the channel layer.
pub const CHAT_MESSAGE_TYPE: &str = "chat.message";

/// A chat line as it crosses the channel layer (one `group_send` to the room's group).
/// A plain struct, so it works with every codec (bincode, the default, included).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// The room it was said in.
    pub room: String,
    /// What was said.
    pub text: String,
    /// Who said it (the name the browser gave).
    pub name: String,
    /// The id of the server process the sender is connected to.
    pub server: String,
    /// When the sender's server took it, in milliseconds since the Unix epoch.
    pub sent_ms: u64,
}

impl chanlayer::MessageType for ChatMessage {
    fn message_type(&self) -> &str {
        CHAT_MESSAGE_TYPE
    }
}

/// What a browser asks for, one JSON object per websocket text frame:
/// `{"join": "r1"}`, `{"leave": "r1"}`, `{"room": "r1", "text": "hi", "name": "ann"}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Join a room (the connection's channel is added to the room's group).
    Join(String),
    /// Leave a room.
    Leave(String),
    /// Say something in a room the connection has joined.
    Say {
        /// The room.
        room: String,
        /// The text.
        text: String,
        /// The sender's name (`anonymous` when absent or blank).
        name: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRequest {
    join: Option<String>,
    leave: Option<String>,
    room: Option<String>,
    text: Option<String>,
    name: Option<String>,
}

impl Request {
    /// Parses and checks one frame. The error is a sentence for the browser.
    pub fn parse(frame: &str) -> Result<Request, String> {
        let raw: RawRequest = serde_json::from_str(frame).map_err(|e| {
            format!(
                "not a request ({e}); send {{\"join\": ROOM}}, {{\"leave\": ROOM}} or {{\"room\": ROOM, \"text\": TEXT}}"
            )
        })?;
        match raw {
            RawRequest {
                join: Some(room),
                leave: None,
                room: None,
                text: None,
                ..
            } => Ok(Request::Join(check_room(room)?)),
            RawRequest {
                join: None,
                leave: Some(room),
                room: None,
                text: None,
                ..
            } => Ok(Request::Leave(check_room(room)?)),
            RawRequest {
                join: None,
                leave: None,
                room: Some(room),
                text: Some(text),
                name,
            } => {
                if text.chars().count() > MAX_TEXT_CHARS {
                    return Err(format!(
                        "text too long: at most {MAX_TEXT_CHARS} characters"
                    ));
                }
                Ok(Request::Say {
                    room: check_room(room)?,
                    text,
                    name: clean_name(name.as_deref()),
                })
            }
            _ => Err("a request is one of {\"join\": ROOM}, {\"leave\": ROOM} or {\"room\": ROOM, \"text\": TEXT}".to_owned()),
        }
    }
}

/// A room name: 1 to [`MAX_ROOM_LEN`] ASCII letters, digits, `.`, `_` or `-`.
pub fn check_room(room: String) -> Result<String, String> {
    let ok = !room.is_empty()
        && room.len() <= MAX_ROOM_LEN
        && room
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(room)
    } else {
        Err(format!(
            "bad room name {room:?}: use 1 to {MAX_ROOM_LEN} ASCII letters, digits, '.', '_' or '-'"
        ))
    }
}

/// The channel layer group of a room.
pub fn group_of(room: &str) -> String {
    format!("{GROUP_PREFIX}{room}")
}

fn clean_name(name: Option<&str>) -> String {
    let name: String = name
        .unwrap_or_default()
        .chars()
        .filter(|c| !c.is_control())
        .collect();
    let name: String = name.trim().chars().take(MAX_NAME_CHARS).collect();
    if name.is_empty() {
        "anonymous".to_owned()
    } else {
        name
    }
}

/// What the server tells a browser, one JSON object per text frame, tagged by `type`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event<'a> {
    /// First frame of a connection: which server process this is.
    Hello {
        /// The server's id.
        server: &'a str,
        /// The channel layer backend (`amqp`, `kafka`, `zmq`, `memory`).
        backend: &'a str,
    },
    /// The room is joined: messages said in it from now on arrive.
    Joined {
        /// The room.
        room: &'a str,
    },
    /// The room is left.
    Left {
        /// The room.
        room: &'a str,
    },
    /// A chat line from a room this connection is in.
    Message(&'a ChatMessage),
    /// Messages for this connection were dropped because it did not keep up.
    Dropped {
        /// How many since the last such notice.
        count: u64,
    },
    /// A request failed.
    Error {
        /// Why, in words.
        error: &'a str,
    },
}

impl Event<'_> {
    /// The JSON text of this event.
    pub fn to_json(&self) -> String {
        // Serializing these plain structs cannot fail; fall back to an error event anyway.
        serde_json::to_string(self)
            .unwrap_or_else(|e| format!("{{\"type\":\"error\",\"error\":\"encode: {e}\"}}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse() {
        assert_eq!(
            Request::parse(r#"{"join":"r1"}"#),
            Ok(Request::Join("r1".into()))
        );
        assert_eq!(
            Request::parse(r#"{"leave":"r1"}"#),
            Ok(Request::Leave("r1".into()))
        );
        assert_eq!(
            Request::parse(r#"{"room":"r1","text":"hi","name":"  ann \u0007"}"#),
            Ok(Request::Say {
                room: "r1".into(),
                text: "hi".into(),
                name: "ann".into()
            })
        );
        assert_eq!(
            Request::parse(r#"{"room":"r1","text":"hi"}"#),
            Ok(Request::Say {
                room: "r1".into(),
                text: "hi".into(),
                name: "anonymous".into()
            })
        );
    }

    #[test]
    fn bad_requests_are_refused_with_a_reason() {
        for frame in [
            "",
            "[]",
            r#"{"join":"r1","leave":"r1"}"#,
            r#"{"join":"bad room"}"#,
            r#"{"join":""}"#,
            r#"{"room":"r1"}"#,
            r#"{"text":"hi"}"#,
            r#"{"join":"r1","extra":1}"#,
        ] {
            assert!(Request::parse(frame).is_err(), "{frame:?} parsed");
        }
        let long = format!(
            r#"{{"room":"r1","text":"{}"}}"#,
            "x".repeat(MAX_TEXT_CHARS + 1)
        );
        assert!(Request::parse(&long).unwrap_err().contains("too long"));
        let room = "r".repeat(MAX_ROOM_LEN + 1);
        assert!(Request::parse(&format!(r#"{{"join":"{room}"}}"#)).is_err());
    }

    #[test]
    fn groups_are_valid_layer_names() {
        let room = check_room("a.B_c-9".repeat(9)).unwrap();
        chanlayer::names::validate_group(&group_of(&room)).unwrap();
    }

    #[test]
    fn events_are_tagged_json() {
        let m = ChatMessage {
            room: "r1".into(),
            text: "hi".into(),
            name: "ann".into(),
            server: "a".into(),
            sent_ms: 5,
        };
        assert_eq!(
            Event::Message(&m).to_json(),
            r#"{"type":"message","room":"r1","text":"hi","name":"ann","server":"a","sent_ms":5}"#
        );
        assert_eq!(
            Event::Dropped { count: 3 }.to_json(),
            r#"{"type":"dropped","count":3}"#
        );
    }

    #[test]
    fn chat_messages_cross_every_codec() {
        let m = ChatMessage {
            room: "r1".into(),
            text: "héllo".into(),
            name: "ann".into(),
            server: "a".into(),
            sent_ms: 1,
        };
        for codec in [
            chanlayer::Codec::Bincode,
            chanlayer::Codec::Msgpack,
            chanlayer::Codec::Json,
        ] {
            let msg = chanlayer::Message::encode(&m, codec).unwrap();
            assert_eq!(msg.message_type(), CHAT_MESSAGE_TYPE);
            assert_eq!(msg.decode::<ChatMessage>().unwrap(), m);
        }
    }
}
