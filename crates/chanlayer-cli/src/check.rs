//! `chanlayer check`: connect, round-trip a message, and report the backend's capabilities,
//! with what is wrong said in words a user can act on.

use std::time::{Duration, Instant};

use chanlayer::{Layer, LayerConfig, Message};

use crate::{connect_config, CliError};

/// Arguments of `chanlayer check`.
#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// How long each step may take.
    #[arg(long, value_name = "DURATION", default_value = "10s")]
    pub timeout: chanlayer_core::config::ConfigDuration,
}

/// `chanlayer check`: prints one line per step; the first failing step ends it (exit 1).
pub async fn run(url: &str, args: CheckArgs) -> Result<(), CliError> {
    let config = LayerConfig::from_url(url).map_err(|e| CliError::usage(e.to_string()))?;
    let scheme = config.backend.scheme.clone();
    println!("url:          {}", config.backend.redacted_url());
    let wait = args.timeout.0;
    let started = Instant::now();
    let layer = match tokio::time::timeout(wait, connect_config(config)).await {
        Ok(Ok(layer)) => layer,
        Ok(Err(e)) => {
            println!("connect:      FAILED");
            return Err(e);
        }
        Err(_) => {
            println!("connect:      FAILED (no answer within {wait:?})");
            return Err(CliError::failure(format!(
                "connect timed out after {wait:?}; {}",
                hint(&scheme)
            )));
        }
    };
    println!("connect:      ok ({})", ms(started.elapsed()));
    let result = steps(&layer, wait).await;
    let _ = layer.close().await;
    if result.is_ok() {
        let c = layer.capabilities();
        println!("backend:      {}", c.backend);
        println!(
            "capabilities: single_reader_normal_channels={} at_least_once={} at_least_once_local={} persistent={} broker_side_capacity={} cross_process={} normal_channels={} headers={}",
            c.single_reader_normal_channels,
            c.at_least_once,
            c.at_least_once_local,
            c.persistent,
            c.broker_side_capacity,
            c.cross_process,
            c.normal_channels,
            c.headers
        );
        let o = layer.options();
        println!(
            "options:      prefix={} capacity={} expiry={:?} group_expiry={:?} codec={} max_message_size={}",
            o.prefix, o.capacity, o.expiry, o.group_expiry, o.codec, o.max_message_size
        );
        println!("check:        ok");
    }
    result
}

async fn steps(layer: &Layer, wait: Duration) -> Result<(), CliError> {
    let step = |what: &'static str| {
        move |e: chanlayer::Error| {
            println!("{what:<13} FAILED");
            CliError::layer(what.trim_end_matches(':'), e)
        }
    };
    let timed_out = |what: &'static str| {
        println!("{what:<13} FAILED (no answer within {wait:?})");
        CliError::failure(format!(
            "{} timed out after {wait:?}: the layer connected but the message did not come back",
            what.trim_end_matches(':')
        ))
    };
    let me = layer
        .new_channel("check")
        .await
        .map_err(step("new_channel:"))?;
    // A struct with a named field: a map in msgpack and json, so it also travels where a
    // body must be one (AMQP's wire=channels_rabbitmq).
    #[derive(serde::Serialize)]
    struct Probe {
        check: &'static str,
    }
    let probe = Message::encode_as(
        "chanlayer.check",
        &Probe { check: "ping" },
        layer.options().codec,
    )
    .map_err(step("encode:"))?;

    let t = Instant::now();
    layer
        .send_message(&me, probe.clone())
        .await
        .map_err(step("round trip:"))?;
    match tokio::time::timeout(wait, layer.receive(&me)).await {
        Ok(Ok(m)) if m.message_type() == "chanlayer.check" => {}
        Ok(Ok(m)) => {
            println!("round trip:   FAILED");
            return Err(CliError::failure(format!(
                "round trip: got a {:?} message instead of the check's",
                m.message_type()
            )));
        }
        Ok(Err(e)) => return Err(step("round trip:")(e)),
        Err(_) => return Err(timed_out("round trip:")),
    }
    println!(
        "round trip:   ok, process-local channel ({})",
        ms(t.elapsed())
    );

    let t = Instant::now();
    let group = format!("chanlayer-check.{}", layer.instance_id());
    layer.group_add(&group, &me).await.map_err(step("group:"))?;
    layer
        .group_send_message(&group, probe)
        .await
        .map_err(step("group:"))?;
    let got = tokio::time::timeout(wait, layer.receive(&me)).await;
    let _ = layer.group_discard(&group, &me).await;
    match got {
        Ok(Ok(_)) => println!(
            "group:        ok, group_add + group_send ({})",
            ms(t.elapsed())
        ),
        Ok(Err(e)) => return Err(step("group:")(e)),
        Err(_) => return Err(timed_out("group:")),
    }
    Ok(())
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// What to do when a backend cannot be reached.
pub fn hint(scheme: &str) -> &'static str {
    match scheme {
        "amqp" | "amqps" => "is RabbitMQ running at that host and port, and are the user, password and vhost right? (scripts/brokers/rabbitmq.sh starts a local one)",
        "kafka" => "is a Kafka broker listening at the bootstrap address? (scripts/brokers/kafka.sh starts a local Apache Kafka)",
        "zmq" => "in dedicated mode (pull=/pub=), is `chanlayer zmq-proxy` running with the same addresses? In embedded mode, is another process already bound to the address?",
        _ => "check the URL (docs/configuration.md)",
    }
}
