//! A second OS process for the AMQP backend's cross-process tests, and a small tool to poke a
//! broker by hand. It speaks through stdout lines.
//!
//! ```text
//! chanlayer-amqp-peer URL serve GROUP
//!     joins GROUP with a new process-local channel, prints "READY <channel>", then answers
//!     every message: a "ping" or a group message with header reply_to gets a "pong" with the
//!     same body sent to reply_to; a "stop" ends the process.
//! chanlayer-amqp-peer URL hold CHANNEL N
//!     takes N deliveries from normal channel CHANNEL without acking them, prints
//!     "HELD <seq> <seq> ...", then waits until it is killed.
//! ```

use std::io::Write;

use chanlayer_amqp::AmqpLayer;
use chanlayer_core::{ChannelLayer, LayerConfig, Message, Result};

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    // The parent reads these lines; a closed pipe means it is gone and we stop anyway.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

async fn serve(layer: AmqpLayer, group: &str) -> Result<()> {
    let me = layer.new_channel("peer").await?;
    layer.group_add(group, &me).await?;
    say(&format!("READY {me}"));
    loop {
        let m = layer.receive(&me).await?;
        if m.message_type() == "stop" {
            break;
        }
        let Some(reply_to) = m.headers().get("reply_to").cloned() else {
            say(&format!("NO-REPLY-TO {}", m.message_type()));
            continue;
        };
        let reply = Message::new("pong", m.codec(), m.body().to_vec())
            .with_header("seen_type", m.message_type());
        layer.send(&reply_to, reply).await?;
    }
    layer.close().await
}

async fn hold(layer: AmqpLayer, channel: &str, n: usize) -> Result<()> {
    let mut held = Vec::with_capacity(n);
    let mut seqs = Vec::with_capacity(n);
    while held.len() < n {
        let d = layer.receive_delivery(channel).await?;
        seqs.push(d.decode::<u64>()?.to_string());
        held.push(d);
    }
    say(&format!("HELD {}", seqs.join(" ")));
    // Keep the deliveries unacked until the parent kills this process.
    std::future::pending::<()>().await;
    drop(held);
    Ok(())
}

fn usage() -> ! {
    eprintln!("usage: chanlayer-amqp-peer URL serve GROUP | URL hold CHANNEL N");
    std::process::exit(2);
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 3 {
        usage();
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("chanlayer-amqp-peer: no tokio runtime: {e}");
            std::process::exit(1);
        }
    };
    let result = rt.block_on(async {
        let config = LayerConfig::from_url(&args[0])?;
        let layer = AmqpLayer::connect(&config).await?;
        match (args[1].as_str(), args.get(2), args.get(3)) {
            ("serve", Some(group), None) => serve(layer, group).await,
            ("hold", Some(channel), Some(n)) => {
                let n = n.parse().unwrap_or_else(|_| usage());
                hold(layer, channel, n).await
            }
            _ => usage(),
        }
    });
    if let Err(e) = result {
        eprintln!("chanlayer-amqp-peer: {e}");
        std::process::exit(1);
    }
}
