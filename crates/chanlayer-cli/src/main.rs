//! `chanlayer`: the chanlayer command-line tool.
//!
//! ```text
//! chanlayer zmq-proxy [--pull tcp://127.0.0.1:5557] [--pub tcp://127.0.0.1:5558] [...]
//! ```
//!
//! Each subcommand is a variant of [`Command`] with its own module; adding one is adding a
//! variant, its arguments struct and a `run` function.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod zmq_proxy;

/// The chanlayer command-line tool.
#[derive(Debug, Parser)]
#[command(name = "chanlayer", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
enum Command {
    /// Run the ZeroMQ proxy of dedicated mode: senders PUSH to --pull, subscribers connect
    /// to --pub. Stops cleanly on SIGINT or SIGTERM and prints its counters; SIGUSR1 prints
    /// them while it runs.
    ZmqProxy(zmq_proxy::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::ZmqProxy(args) => zmq_proxy::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chanlayer: {e}");
            ExitCode::FAILURE
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
        let Command::ZmqProxy(args) = cli.command;
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
        let Command::ZmqProxy(args) = cli.command;
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
        let Command::ZmqProxy(args) = cli.command;
        let e = args.proxy_config().expect_err("a bad endpoint");
        assert!(e.to_string().contains("udp://x:1"), "{e}");
    }
}
