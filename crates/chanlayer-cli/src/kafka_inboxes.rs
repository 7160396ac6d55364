//! `chanlayer kafka-inboxes`: list, and remove, the inbox topics of Kafka layer instances.
//!
//! A closed instance deletes its own inbox topic; an instance that crashed leaves it behind
//! until retention empties it. This lists the inbox topics under the URL's `prefix` and
//! removes the ones named.

use chanlayer::LayerConfig;

use crate::CliError;

/// Arguments of `chanlayer kafka-inboxes`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Delete the inbox topic of this instance id (repeatable). Only for instances that are
    /// gone: a running instance loses the messages sent to its process-local channels.
    #[arg(long = "remove", value_name = "INSTANCE")]
    pub remove: Vec<String>,
}

/// `chanlayer kafka-inboxes`.
pub async fn run(url: &str, args: Args) -> Result<(), CliError> {
    let config = LayerConfig::from_url(url).map_err(|e| CliError::usage(e.to_string()))?;
    if config.backend.scheme != "kafka" {
        return Err(CliError::usage(format!(
            "kafka-inboxes needs a kafka:// URL, not {}://",
            config.backend.scheme
        )));
    }
    if args.remove.is_empty() {
        let inboxes = chanlayer_kafka::list_inboxes(&config)
            .await
            .map_err(|e| CliError::layer("list the inbox topics", e))?;
        for i in &inboxes {
            println!("{}\t{}", i.instance, i.topic);
        }
        eprintln!(
            "{} inbox topic(s) under prefix {:?}",
            inboxes.len(),
            config.options.prefix
        );
        return Ok(());
    }
    let removed = chanlayer_kafka::remove_inboxes(&config, &args.remove)
        .await
        .map_err(|e| CliError::layer("remove inbox topics", e))?;
    for t in removed {
        println!("removed\t{t}");
    }
    Ok(())
}
