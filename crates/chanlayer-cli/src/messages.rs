//! `chanlayer send`, `receive`, `group-send` and `tail`: messages from and to a shell.
//!
//! Every message read is printed as one JSON line on stdout:
//!
//! ```text
//! {"channel":"orders","type":"order.created","codec":"json","body":{"id":7},"headers":{}}
//! ```
//!
//! `body` is the decoded value for self-describing codecs (JSON, MessagePack); a bincode
//! body, which cannot be decoded without its Rust type, is `"body_hex"` instead.

use std::io::Write;

use chanlayer::{Codec, Layer, Message};
use chanlayer_core::config::ConfigDuration;
use serde_json::{json, Map, Value};

use crate::{connect, CliError};

/// What to send: the message type and a JSON body.
#[derive(Debug, clap::Args)]
pub struct Body {
    /// The message type (e.g. `chat.message`).
    #[arg(long = "type", value_name = "TYPE")]
    pub msg_type: String,
    /// The body, as JSON text; it travels JSON-encoded (`--codec` to change).
    #[arg(long, value_name = "JSON", default_value = "null")]
    pub json: String,
    /// The codec the body is encoded with: json, msgpack or bincode.
    #[arg(long, value_name = "CODEC", default_value = "json")]
    pub codec: Codec,
    /// A header, `KEY=VALUE` (repeatable).
    #[arg(long = "header", value_name = "KEY=VALUE")]
    pub headers: Vec<String>,
}

impl Body {
    /// The message these arguments describe.
    pub fn message(&self) -> Result<Message, CliError> {
        let value: Value = serde_json::from_str(&self.json)
            .map_err(|e| CliError::usage(format!("--json is not valid JSON: {e}")))?;
        let mut message = Message::encode_as(self.msg_type.clone(), &value, self.codec)
            .map_err(|e| CliError::usage(format!("--type/--json: {e}")))?;
        for h in &self.headers {
            let (k, v) = h
                .split_once('=')
                .ok_or_else(|| CliError::usage(format!("--header {h:?}: use KEY=VALUE")))?;
            message = message.with_header(k, v);
        }
        message
            .validate()
            .map_err(|e| CliError::usage(e.to_string()))?;
        Ok(message)
    }
}

/// Arguments of `chanlayer send`.
#[derive(Debug, clap::Args)]
pub struct SendArgs {
    /// The channel to send to.
    pub channel: String,
    #[command(flatten)]
    pub body: Body,
}

/// Arguments of `chanlayer group-send`.
#[derive(Debug, clap::Args)]
pub struct GroupSendArgs {
    /// The group to send to.
    pub group: String,
    #[command(flatten)]
    pub body: Body,
}

/// How many messages to wait for, and how long.
#[derive(Debug, clap::Args)]
pub struct Wait {
    /// Stop after this many messages (default: run until interrupted).
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
    /// Give up after this long without the next message: exit status 3.
    #[arg(long, value_name = "DURATION")]
    pub timeout: Option<ConfigDuration>,
}

/// Arguments of `chanlayer receive`.
#[derive(Debug, clap::Args)]
pub struct ReceiveArgs {
    /// The channel to receive from (a normal channel: a process-local one belongs to the
    /// instance that made it).
    pub channel: String,
    #[command(flatten)]
    pub wait: Wait,
}

/// Arguments of `chanlayer tail`.
#[derive(Debug, clap::Args)]
pub struct TailArgs {
    /// The group to join (with a channel of this process, left again at exit).
    pub group: String,
    #[command(flatten)]
    pub wait: Wait,
}

/// `chanlayer send`.
pub async fn send(url: &str, args: SendArgs) -> Result<(), CliError> {
    let message = args.body.message()?;
    let layer = connect(url).await?;
    let sent = layer.send_message(&args.channel, message).await;
    let _ = layer.close().await;
    sent.map_err(|e| CliError::layer(format!("send to {}", args.channel), e))
}

/// `chanlayer group-send`.
pub async fn group_send(url: &str, args: GroupSendArgs) -> Result<(), CliError> {
    let message = args.body.message()?;
    let layer = connect(url).await?;
    let sent = layer.group_send_message(&args.group, message).await;
    let _ = layer.close().await;
    sent.map_err(|e| CliError::layer(format!("group_send to {}", args.group), e))
}

/// `chanlayer receive`.
pub async fn receive(url: &str, args: ReceiveArgs) -> Result<(), CliError> {
    let layer = connect(url).await?;
    let result = print_messages(&layer, &args.channel, &args.channel, &args.wait).await;
    let _ = layer.close().await;
    result
}

/// `chanlayer tail`.
pub async fn tail(url: &str, args: TailArgs) -> Result<(), CliError> {
    let layer = connect(url).await?;
    let result = async {
        let me = layer
            .new_channel("tail")
            .await
            .map_err(|e| CliError::layer("new_channel", e))?;
        layer
            .group_add(&args.group, &me)
            .await
            .map_err(|e| CliError::layer(format!("group_add {}", args.group), e))?;
        eprintln!("chanlayer: joined {} as {me}", args.group);
        let printed = print_messages(&layer, &me, &args.group, &args.wait).await;
        let _ = layer.group_discard(&args.group, &me).await;
        printed
    }
    .await;
    let _ = layer.close().await;
    result
}

/// Receives from `channel` and prints each message as a JSON line naming `shown`, until
/// `wait.count` messages, a timeout (exit status 3) or Ctrl-C.
async fn print_messages(
    layer: &Layer,
    channel: &str,
    shown: &str,
    wait: &Wait,
) -> Result<(), CliError> {
    let mut got = 0u64;
    let mut out = std::io::stdout().lock();
    while wait.count.is_none_or(|n| got < n) {
        let next = layer.receive(channel);
        let message = match wait.timeout {
            Some(ConfigDuration(d)) => tokio::select! {
                r = tokio::time::timeout(d, next) => match r {
                    Ok(r) => r,
                    Err(_) => return Err(CliError::timeout(got, wait.count, d)),
                },
                _ = tokio::signal::ctrl_c() => return Ok(()),
            },
            None => tokio::select! {
                r = next => r,
                _ = tokio::signal::ctrl_c() => return Ok(()),
            },
        }
        .map_err(|e| CliError::layer(format!("receive from {channel}"), e))?;
        let line = message_json(shown, &message);
        writeln!(out, "{line}")
            .and_then(|()| out.flush())
            .map_err(|e| CliError::io("stdout", e))?;
        got += 1;
    }
    Ok(())
}

/// The JSON line `receive` and `tail` print for a message.
pub fn message_json(channel: &str, message: &Message) -> Value {
    let mut line = Map::new();
    line.insert("channel".into(), json!(channel));
    line.insert("type".into(), json!(message.message_type()));
    line.insert("codec".into(), json!(message.codec().name()));
    match message.codec() {
        Codec::Json | Codec::Msgpack => match message.decode::<Value>() {
            Ok(v) => {
                line.insert("body".into(), v);
            }
            Err(_) => {
                line.insert("body_hex".into(), json!(hex(message.body())));
            }
        },
        Codec::Bincode => {
            line.insert("body_hex".into(), json!(hex(message.body())));
        }
    }
    line.insert("headers".into(), json!(message.headers()));
    Value::Object(line)
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(json: &str, codec: Codec) -> Body {
        Body {
            msg_type: "t.x".into(),
            json: json.into(),
            codec,
            headers: vec!["k=v".into()],
        }
    }

    #[test]
    fn bodies_round_trip_to_json_lines() {
        for codec in [Codec::Json, Codec::Msgpack] {
            let m = body(r#"{"id":7,"tags":["a"]}"#, codec)
                .message()
                .expect("message");
            let line = message_json("orders", &m);
            assert_eq!(line["body"], json!({"id": 7, "tags": ["a"]}), "{codec}");
            assert_eq!(line["type"], "t.x");
            assert_eq!(line["headers"]["k"], "v");
        }
        let m = body("5", Codec::Bincode).message().expect("message");
        assert!(message_json("c", &m)["body_hex"].is_string());
    }

    #[test]
    fn bad_bodies_are_usage_errors() {
        let e = body("{nope", Codec::Json).message().expect_err("bad json");
        assert_eq!(e.code, crate::EXIT_USAGE);
        let mut b = body("1", Codec::Json);
        b.headers = vec!["novalue".into()];
        assert_eq!(b.message().expect_err("bad header").code, crate::EXIT_USAGE);
        let mut b = body("1", Codec::Json);
        b.msg_type = String::new();
        assert_eq!(b.message().expect_err("empty type").code, crate::EXIT_USAGE);
    }
}
