//! chanlayer quickstart: new_channel, send/receive, and a group broadcast.
//!
//! ```text
//! cargo run --example quickstart                       # in-memory, no broker needed
//! CHANLAYER_URL=memory://demo cargo run --example quickstart
//! ```
//!
//! Two layer instances share one broker, as two processes would: a "server" instance with
//! three websocket-like channels in a chat room, and a "worker" instance that sends to them.

use chanlayer::{Layer, MessageType};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct ChatMessage {
    user: String,
    text: String,
}

impl MessageType for ChatMessage {
    fn message_type(&self) -> &str {
        "chat.message"
    }
}

#[tokio::main]
async fn main() -> Result<(), chanlayer::Error> {
    // One URL picks the broker. Two instances on the same named in-memory broker stand in
    // for two processes; with a network broker they would be two processes.
    let url = std::env::var(chanlayer::ENV_URL).unwrap_or_else(|_| "memory://quickstart".into());
    let config = chanlayer::LayerConfig::from_url(&url)?;
    let server: Layer = chanlayer::connect_config(config.clone()).await?;
    let worker: Layer = chanlayer::connect_config(config.clone()).await?;
    // A LayerConfig displays with its password replaced by ***.
    println!(
        "connected two instances to {config} (backend: {})",
        server.capabilities().backend
    );

    // 1. A process-local channel, and a direct send from the other instance.
    let inbox = server.new_channel("ws").await?;
    println!("server created channel {inbox}");
    worker
        .send(
            &inbox,
            &ChatMessage {
                user: "worker".into(),
                text: "hello, server".into(),
            },
        )
        .await?;
    let direct: ChatMessage = server.receive_as(&inbox).await?;
    println!("server received on {inbox}: {direct:?}");

    // 2. A group broadcast: three members, one group_send, three copies.
    let mut members = Vec::new();
    for _ in 0..3 {
        let ch = server.new_channel("ws").await?;
        server.group_add("room.42", &ch).await?;
        members.push(ch);
    }
    worker
        .group_send(
            "room.42",
            &ChatMessage {
                user: "ann".into(),
                text: "hi, room 42".into(),
            },
        )
        .await?;
    for ch in &members {
        let msg = server.receive(ch).await?;
        let chat: ChatMessage = msg.decode()?;
        println!(
            "member {ch} got {} from {}: {:?}",
            msg.message_type(),
            chat.user,
            chat.text
        );
    }

    // 3. One member leaves; the next broadcast reaches two.
    server.group_discard("room.42", &members[0]).await?;
    worker
        .group_send_as("room.42", "chat.notice", &"ann left")
        .await?;
    for ch in &members[1..] {
        let notice: String = server.receive_as(ch).await?;
        println!("member {ch} got notice: {notice}");
    }

    let s = server.stats();
    let w = worker.stats();
    println!(
        "done: worker sent {} messages, server received {}",
        w.sent, s.received
    );
    server.close().await?;
    worker.close().await?;
    Ok(())
}
