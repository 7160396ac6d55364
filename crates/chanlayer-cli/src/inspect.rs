//! `chanlayer groups` and `chanlayer stats`: ask every running instance under the URL's
//! prefix for its members of a group or its counters (`chanlayer::inspect`), and print one
//! entry per instance that answered within `--wait`, and a total.

use std::time::Duration;

use chanlayer::config::{CapacityOverride, ConfigDuration};
use chanlayer::inspect::{self, InstanceMembers, InstanceStats};
use chanlayer::{Layer, LayerConfig, StatsSnapshot};
use serde_json::json;

use crate::{connect_config, CliError, EXIT_TIMEOUT};

/// Arguments of `chanlayer groups`.
#[derive(Debug, clap::Args)]
pub struct GroupsArgs {
    /// The group whose members to list.
    pub group: String,
    /// `--wait` and `--json`.
    #[command(flatten)]
    pub common: Common,
}

/// Arguments of `chanlayer stats`.
#[derive(Debug, clap::Args)]
pub struct StatsArgs {
    /// `--wait` and `--json`.
    #[command(flatten)]
    pub common: Common,
}

/// What both commands take.
#[derive(Debug, clap::Args)]
pub struct Common {
    /// How long to collect answers: every instance that answers within it is listed.
    #[arg(long, value_name = "DURATION", default_value = "2s")]
    pub wait: ConfigDuration,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Reads one counter of a snapshot.
type Counter = fn(&StatsSnapshot) -> u64;

/// The counters of a stats row, in print order.
const COUNTERS: [(&str, Counter); 11] = [
    ("sent", |s| s.sent),
    ("received", |s| s.received),
    ("expired", |s| s.expired),
    ("undecodable", |s| s.undecodable),
    ("undeliverable", |s| s.undeliverable),
    ("group_member_full", |s| s.group_member_full),
    ("dropped_full", |s| s.dropped_full),
    ("redelivered", |s| s.redelivered),
    ("dead_lettered", |s| s.dead_lettered),
    ("lost", |s| s.lost),
    ("reconnects", |s| s.reconnects),
];

/// Connects an instance to ask with: it does not answer requests itself, and its reply
/// channels hold an answer from every instance of a large deployment. A layer that is not
/// cross-process (memory://) is a usage error (exit 2): there is nobody else to ask.
async fn asker(url: &str) -> Result<Layer, CliError> {
    let mut config = LayerConfig::from_url(url).map_err(|e| CliError::usage(e.to_string()))?;
    config.options.inspect = false;
    let replies = format!("{}.*", inspect::REPLY_PREFIX);
    let big = CapacityOverride::new(&replies, 1_000_000)
        .map_err(|e| CliError::failure(format!("the reply channel's capacity: {e}")))?;
    config.options.channel_capacity.insert(0, big);
    let layer = connect_config(config).await?;
    let caps = layer.capabilities();
    if !caps.cross_process {
        let _ = layer.close().await;
        return Err(CliError::usage(format!(
            "{} layers are process-local: a {}:// layer lives in one process and cannot be inspected from another; run the command against the broker URL of a deployment (amqp://, kafka://, zmq://)",
            caps.backend, caps.backend
        )));
    }
    Ok(layer)
}

/// Exit 3 when nobody answered (nothing runs under this prefix, or `inspect=false`).
fn nobody(wait: Duration, json: bool) -> Result<(), CliError> {
    Err(CliError {
        code: EXIT_TIMEOUT,
        message: format!(
            "no instance answered within {wait:?}{}; are instances running with the same URL prefix, and without inspect=false?",
            if json { "" } else { " (the total above is 0)" }
        ),
    })
}

/// `chanlayer groups`.
pub async fn groups(url: &str, args: GroupsArgs) -> Result<(), CliError> {
    chanlayer::names::validate_group(&args.group).map_err(|e| CliError::usage(e.to_string()))?;
    let layer = asker(url).await?;
    let wait = args.common.wait.0;
    let answers = inspect::groups(&*layer, &args.group, wait).await;
    let _ = layer.close().await;
    let answers = answers.map_err(|e| CliError::layer("groups", e))?;
    let total: usize = answers.iter().map(|a| a.members.len()).sum();
    if args.common.json {
        println!(
            "{}",
            json!({
                "group": args.group,
                "instances": answers,
                "total": {"instances": answers.len(), "members": total},
            })
        );
    } else {
        print!("{}", groups_text(&args.group, &answers, total));
    }
    if answers.is_empty() {
        return nobody(wait, args.common.json);
    }
    Ok(())
}

fn groups_text(group: &str, answers: &[InstanceMembers], total: usize) -> String {
    let mut out = String::new();
    for a in answers {
        let n = a.members.len();
        out += &format!(
            "instance {} ({}): {n} member{}\n",
            a.instance,
            a.backend,
            plural(n)
        );
        for m in &a.members {
            out += &format!("  {m}\n");
        }
    }
    out += &format!(
        "total: {total} member{} of {group} in {} instance{}\n",
        plural(total),
        answers.len(),
        plural(answers.len())
    );
    out
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// `chanlayer stats`.
pub async fn stats(url: &str, args: StatsArgs) -> Result<(), CliError> {
    let layer = asker(url).await?;
    let wait = args.common.wait.0;
    let answers = inspect::stats(&*layer, wait).await;
    let _ = layer.close().await;
    let answers = answers.map_err(|e| CliError::layer("stats", e))?;
    let total = answers
        .iter()
        .fold(StatsSnapshot::default(), |t, a| t.sum(a.stats));
    if args.common.json {
        println!(
            "{}",
            json!({
                "instances": answers,
                "total": {"instances": answers.len(), "stats": total},
            })
        );
    } else {
        print!("{}", stats_text(&answers, &total));
    }
    if answers.is_empty() {
        return nobody(wait, args.common.json);
    }
    Ok(())
}

/// A table: a header, a row per instance, and the total row.
fn stats_text(answers: &[InstanceStats], total: &StatsSnapshot) -> String {
    let mut rows: Vec<Vec<String>> = Vec::new();
    let header = ["instance", "backend"]
        .into_iter()
        .chain(COUNTERS.iter().map(|(name, _)| *name))
        .map(str::to_owned)
        .collect();
    rows.push(header);
    let counts = |s: &StatsSnapshot| -> Vec<String> {
        COUNTERS.iter().map(|(_, get)| get(s).to_string()).collect()
    };
    for a in answers {
        let row = [a.instance.clone(), a.backend.clone()]
            .into_iter()
            .chain(counts(&a.stats))
            .collect();
        rows.push(row);
    }
    let n = answers.len();
    let label = format!("total ({n} instance{})", plural(n));
    rows.push(
        [label, String::new()]
            .into_iter()
            .chain(counts(total))
            .collect(),
    );
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in &rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(c, (cell, w))| {
                if c < 2 {
                    format!("{cell:<w$}")
                } else {
                    format!("{cell:>w$}")
                }
            })
            .collect();
        out += cells.join("  ").trim_end();
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_output() {
        let answers = vec![
            InstanceMembers {
                instance: "aaaa".into(),
                backend: "amqp".into(),
                members: vec!["ws.aaaa!1".into(), "ws.aaaa!2".into()],
            },
            InstanceMembers {
                instance: "bbbb".into(),
                backend: "amqp".into(),
                members: vec![],
            },
        ];
        assert_eq!(
            groups_text("room", &answers, 2),
            "instance aaaa (amqp): 2 members\n  ws.aaaa!1\n  ws.aaaa!2\ninstance bbbb (amqp): 0 members\ntotal: 2 members of room in 2 instances\n"
        );
        let one = StatsSnapshot {
            sent: 12,
            received: 3,
            ..StatsSnapshot::default()
        };
        let text = stats_text(
            &[InstanceStats {
                instance: "aaaa".into(),
                backend: "kafka".into(),
                stats: one,
            }],
            &one,
        );
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(
            lines[0].starts_with("instance            backend  sent  received"),
            "{text}"
        );
        assert!(
            lines[1].starts_with("aaaa                kafka      12         3"),
            "{text}"
        );
        assert!(
            lines[2].starts_with("total (1 instance)             12         3"),
            "{text}"
        );
    }
}
