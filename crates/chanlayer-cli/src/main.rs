//! `chanlayer`: the chanlayer command-line tool.
//!
//! ```text
//! chanlayer send        --url URL CHANNEL --type T [--json JSON]   send one message
//! chanlayer group-send  --url URL GROUP --type T [--json JSON]     send to a group
//! chanlayer receive     --url URL CHANNEL [--count N] [--timeout D] print messages as JSON lines
//! chanlayer tail        --url URL GROUP [--count N] [--timeout D]   join a group, print what arrives
//! chanlayer check       --url URL                                   connect, round trip, capabilities
//! chanlayer groups      --url URL GROUP [--wait D] [--json]          every instance's members of GROUP
//! chanlayer stats       --url URL [--wait D] [--json]                every instance's counters
//! chanlayer bench       --url URL [--url URL]... [--scenario local,normal,group,roundtrip]
//!                       [--messages N] [--size BYTES] [--concurrency C] [--json F] [--plot F.svg]
//! chanlayer kafka-inboxes --url URL [--remove INSTANCE]...          Kafka inbox topics left behind
//! chanlayer zmq-proxy   [--pull tcp://127.0.0.1:5557] [--pub tcp://127.0.0.1:5558] [...]
//! ```
//!
//! `--url` defaults to `$CHANLAYER_URL`. Exit status: 0 done; 1 the layer or broker failed
//! (the message says what and what to do); 2 bad arguments (for `groups` and `stats`, also a
//! process-local `memory://` URL); 3 `--timeout` passed before `--count` messages arrived
//! (for `groups` and `stats`: no instance answered within `--wait`).
//!
//! `groups` and `stats` ask the running instances under the URL's prefix through
//! `chanlayer::inspect` (module `inspect`): each instance answers for itself, this command's
//! own instance never does.
//!
//! Each subcommand is a variant of [`Command`] with its own module.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod bench;
mod check;
mod inspect;
mod kafka_inboxes;
mod messages;
mod zmq_proxy;

/// Exit status: the layer or the broker failed.
pub const EXIT_FAILURE: u8 = 1;
/// Exit status: bad arguments (clap's own usage errors exit 2 as well).
pub const EXIT_USAGE: u8 = 2;
/// Exit status: `--timeout` passed before `--count` messages arrived.
pub const EXIT_TIMEOUT: u8 = 3;

/// The chanlayer command-line tool.
#[derive(Debug, Parser)]
#[command(name = "chanlayer", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where a subcommand connects.
#[derive(Debug, clap::Args)]
struct Url {
    /// The layer URL (memory://, amqp://, kafka://, zmq://; see docs/configuration.md).
    #[arg(long, env = "CHANLAYER_URL", value_name = "URL")]
    url: String,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
enum Command {
    /// Send one message to a channel.
    Send {
        #[command(flatten)]
        url: Url,
        #[command(flatten)]
        args: messages::SendArgs,
    },
    /// Send one message to a group.
    GroupSend {
        #[command(flatten)]
        url: Url,
        #[command(flatten)]
        args: messages::GroupSendArgs,
    },
    /// Receive from a (normal) channel and print each message as a JSON line.
    Receive {
        #[command(flatten)]
        url: Url,
        #[command(flatten)]
        args: messages::ReceiveArgs,
    },
    /// Join a group and print each message that arrives as a JSON line.
    Tail {
        #[command(flatten)]
        url: Url,
        #[command(flatten)]
        args: messages::TailArgs,
    },
    /// Connect, round-trip a message through a channel and a group, print the capabilities.
    Check {
        #[command(flatten)]
        url: Url,
        #[command(flatten)]
        args: check::CheckArgs,
    },
    /// Ask every running instance under the URL's prefix for its members of GROUP; print
    /// them per instance, and the total.
    Groups {
        #[command(flatten)]
        url: Url,
        #[command(flatten)]
        args: inspect::GroupsArgs,
    },
    /// Ask every running instance under the URL's prefix for its counters; print a row per
    /// instance, and the total.
    Stats {
        #[command(flatten)]
        url: Url,
        #[command(flatten)]
        args: inspect::StatsArgs,
    },
    /// List the inbox topics of Kafka layer instances (leftovers of crashed ones among
    /// them), or remove some.
    KafkaInboxes {
        #[command(flatten)]
        url: Url,
        #[command(flatten)]
        args: kafka_inboxes::Args,
    },
    /// Measure each --url side by side: msgs/s, MB/s, latency percentiles, lost and
    /// duplicated messages (see docs/benchmarks.md).
    Bench(bench::Args),
    /// Run the ZeroMQ proxy of dedicated mode: senders PUSH to --pull, subscribers connect
    /// to --pub. Stops cleanly on SIGINT or SIGTERM and prints its counters; SIGUSR1 prints
    /// them while it runs.
    ZmqProxy(zmq_proxy::Args),
}

/// A failed command: the message for stderr and the exit status.
#[derive(Debug)]
pub struct CliError {
    /// The exit status.
    pub code: u8,
    /// What went wrong, for a person.
    pub message: String,
}

impl CliError {
    /// A failure of the layer or broker (exit 1).
    pub fn failure(message: impl Into<String>) -> CliError {
        CliError {
            code: EXIT_FAILURE,
            message: message.into(),
        }
    }

    /// Bad arguments (exit 2).
    pub fn usage(message: impl Into<String>) -> CliError {
        CliError {
            code: EXIT_USAGE,
            message: message.into(),
        }
    }

    /// A layer operation failed: exit 2 when the arguments were at fault (configuration,
    /// an invalid name or message, a message too large), 1 otherwise.
    pub fn layer(what: impl std::fmt::Display, e: chanlayer::Error) -> CliError {
        use chanlayer::Error as E;
        let message = format!("{what}: {e}");
        match e {
            E::Config(_)
            | E::InvalidName { .. }
            | E::InvalidMessage(_)
            | E::MessageTooLarge { .. }
            | E::NotOwner { .. } => CliError::usage(message),
            _ => CliError::failure(message),
        }
    }

    /// `--timeout` passed (exit 3).
    pub fn timeout(got: u64, wanted: Option<u64>, after: std::time::Duration) -> CliError {
        let wanted = wanted.map_or(String::new(), |n| format!(" of {n}"));
        CliError {
            code: EXIT_TIMEOUT,
            message: format!("timed out: no message within {after:?} ({got}{wanted} received)"),
        }
    }

    /// Writing output failed (exit 1).
    pub fn io(what: &str, e: std::io::Error) -> CliError {
        CliError::failure(format!("could not write to {what}: {e}"))
    }
}

/// A layer error at connect, with what to do about it.
trait WithHint {
    fn with_hint(self, hint: &str) -> CliError;
}

impl WithHint for chanlayer::Error {
    fn with_hint(self, hint: &str) -> CliError {
        let e = CliError::layer("connect", self);
        if e.code == EXIT_USAGE {
            e
        } else {
            CliError::failure(format!("{}; {hint}", e.message))
        }
    }
}

/// Connects to `url`; a failure says what to check.
pub async fn connect(url: &str) -> Result<chanlayer::Layer, CliError> {
    let config =
        chanlayer::LayerConfig::from_url(url).map_err(|e| CliError::usage(e.to_string()))?;
    connect_config(config).await
}

/// Connects to `config`; a failure says what to check.
pub async fn connect_config(config: chanlayer::LayerConfig) -> Result<chanlayer::Layer, CliError> {
    let scheme = config.backend.scheme.clone();
    chanlayer::connect_config(config)
        .await
        .map_err(|e| e.with_hint(check::hint(&scheme)))
}

fn runtime() -> Result<tokio::runtime::Runtime, CliError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| CliError::failure(format!("could not start the tokio runtime: {e}")))
}

fn run(command: Command) -> Result<(), CliError> {
    let block = |f: std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), CliError>>>>| {
        runtime()?.block_on(f)
    };
    match command {
        Command::ZmqProxy(args) => zmq_proxy::run(args).map_err(|e| match e {
            chanlayer::Error::Config(_) => CliError::usage(e.to_string()),
            e => CliError::failure(e.to_string()),
        }),
        Command::Bench(args) => block(Box::pin(bench::run(args))),
        Command::Send { url, args } => block(Box::pin(messages::send(&url.url, args))),
        Command::GroupSend { url, args } => block(Box::pin(messages::group_send(&url.url, args))),
        Command::Receive { url, args } => block(Box::pin(messages::receive(&url.url, args))),
        Command::Tail { url, args } => block(Box::pin(messages::tail(&url.url, args))),
        Command::Check { url, args } => block(Box::pin(check::run(&url.url, args))),
        Command::Groups { url, args } => block(Box::pin(inspect::groups(&url.url, args))),
        Command::Stats { url, args } => block(Box::pin(inspect::stats(&url.url, args))),
        Command::KafkaInboxes { url, args } => block(Box::pin(kafka_inboxes::run(&url.url, args))),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chanlayer: {}", e.message);
            ExitCode::from(e.code)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn zmq_proxy_defaults_bind_loopback() {
        let cli = Cli::try_parse_from(["chanlayer", "zmq-proxy"]).expect("parse");
        let Command::ZmqProxy(args) = cli.command else {
            panic!("zmq-proxy parses as ZmqProxy");
        };
        assert_eq!(args.pull, "tcp://127.0.0.1:5557");
        assert_eq!(args.publish, "tcp://127.0.0.1:5558");
        assert_eq!(args.stats_interval, None);
    }

    #[test]
    fn zmq_proxy_takes_its_options() {
        let cli = Cli::try_parse_from([
            "chanlayer",
            "zmq-proxy",
            "--pull",
            "ipc:///run/p.sock",
            "--pub",
            "tcp://0.0.0.0:7000",
            "--retain",
            "5",
            "--retain-for",
            "2s",
            "--retain-bytes",
            "1000",
            "--sndhwm",
            "7",
            "--rcvhwm",
            "8",
            "--stats-interval",
            "500ms",
        ])
        .expect("parse");
        let Command::ZmqProxy(args) = cli.command else {
            panic!("zmq-proxy parses as ZmqProxy");
        };
        let config = args.proxy_config().expect("config");
        assert_eq!(config.pull, "ipc:///run/p.sock");
        assert_eq!(config.publish, "tcp://0.0.0.0:7000");
        assert_eq!(config.retention.per_topic, 5);
        assert_eq!(config.retention.max_age, std::time::Duration::from_secs(2));
        assert_eq!(config.retention.max_bytes, 1000);
        assert_eq!((config.sndhwm, config.rcvhwm), (7, 8));
        assert_eq!(
            args.stats_interval.map(|d| d.0),
            Some(std::time::Duration::from_millis(500))
        );
    }

    #[test]
    fn bad_arguments_are_refused() {
        assert!(Cli::try_parse_from(["chanlayer", "zmq-proxy", "--retain", "lots"]).is_err());
        assert!(Cli::try_parse_from(["chanlayer", "zmq-proxy", "--retain-for", "soon"]).is_err());
        assert!(Cli::try_parse_from(["chanlayer", "nope"]).is_err());
        let cli =
            Cli::try_parse_from(["chanlayer", "zmq-proxy", "--pull", "udp://x:1"]).expect("parse");
        let Command::ZmqProxy(args) = cli.command else {
            panic!("zmq-proxy parses as ZmqProxy");
        };
        let e = args.proxy_config().expect_err("a bad endpoint");
        assert!(e.to_string().contains("udp://x:1"), "{e}");
    }
}
