//! `kafka://` URLs: the bootstrap brokers, the topic settings, security, and pass-through
//! librdkafka properties.
//!
//! ```text
//! kafka://HOST:PORT[,HOST:PORT...]?OPTIONS
//! kafka://USER:PASSWORD@HOST:PORT?security.protocol=sasl_ssl&sasl.mechanism=SCRAM-SHA-512&ca_file=/ca.pem
//! ```
//!
//! Options besides the shared ones (`prefix`, `capacity`, ...):
//!
//! | option | default | meaning |
//! |---|---|---|
//! | `partitions` | 1 | partitions of the normal-channel and groups topics it creates |
//! | `replication` | -1 | replication factor of the topics it creates (-1: the broker's default) |
//! | `retention` | 1d | `retention.ms` of the topics it creates |
//! | `create_topics` | true | create missing channel and groups topics; with `false` a missing one is an error (inboxes are always created) |
//! | `groups_topic` | `{prefix}.groups` | the topic group messages go through |
//! | `prefetch` | 500 | messages a normal-channel consumer buffers ahead of `receive` |
//! | `linger` | 1ms | producer `linger.ms`: how long a send waits to share a batch |
//! | `delivery_timeout` | 30s | how long a send may wait for the broker (`message.timeout.ms`) |
//! | `connection_timeout` | 10s | how long a request to the cluster (admin, metadata) may take |
//! | `session_timeout` | 10s | consumer-group `session.timeout.ms`: how soon a dead reader's partitions move |
//! | `commit_interval` | 100ms | how often acknowledged offsets are committed |
//! | `security.protocol` | plaintext | `plaintext`, `ssl`, `sasl_plaintext`, `sasl_ssl` |
//! | `sasl.mechanism` | PLAIN (with a user) | `PLAIN`, `SCRAM-SHA-256`, `SCRAM-SHA-512` |
//! | `username`, `password` | from the URL | SASL credentials (the URL's `USER:PASSWORD@` too) |
//! | `ca_file` | system roots | PEM file of the CA that signed the brokers' certificates |
//! | `kafka.<property>` | | any librdkafka property, passed through as is (wins over the above) |
//! | `topic.<config>` | | any topic config for the topics it creates (`topic.min.insync.replicas=2`; wins over `retention`) |

use std::time::Duration;

use chanlayer_core::config::{hosts, BackendSettings, HostPort};
use chanlayer_core::config::{BackendOptions, MIN_TIMEOUT};
use chanlayer_core::{Error, LayerConfig, Result, Secret};
use rdkafka::ClientConfig;

use crate::BACKEND;

/// The Kafka backend's settings, parsed from a [`LayerConfig`].
#[derive(Debug, Clone, PartialEq)]
pub struct KafkaConfig {
    /// `bootstrap.servers`: `host:port[,host:port...]`.
    pub brokers: String,
    /// Partitions of the normal-channel and groups topics this layer creates.
    pub partitions: i32,
    /// Replication factor of the topics this layer creates (-1: the broker's default).
    pub replication: i32,
    /// `retention.ms` of the topics this layer creates.
    pub retention: Duration,
    /// Create missing topics (otherwise a missing topic is an error).
    pub create_topics: bool,
    /// The topic group messages go through.
    pub groups_topic: String,
    /// Messages a normal-channel consumer buffers ahead of `receive`.
    pub prefetch: usize,
    /// Producer `linger.ms`.
    pub linger: Duration,
    /// Producer `message.timeout.ms`: how long a send may wait for the broker.
    pub delivery_timeout: Duration,
    /// How long one request to the cluster (admin, metadata, watermarks) may take.
    pub connection_timeout: Duration,
    /// Consumer-group `session.timeout.ms`.
    pub session_timeout: Duration,
    /// How often acknowledged offsets are committed.
    pub commit_interval: Duration,
    /// `security.protocol` (lower case), if set.
    pub security_protocol: Option<String>,
    /// `sasl.mechanism` (upper case), if SASL is used.
    pub sasl_mechanism: Option<String>,
    /// SASL user name.
    pub username: Option<String>,
    /// SASL password (redacted in `Debug`).
    pub password: Option<Secret>,
    /// `ssl.ca.location`.
    pub ca_file: Option<std::path::PathBuf>,
    /// `kafka.<property>` pass-through, prefix removed (secret-looking values redacted in
    /// `Debug`).
    pub client_properties: BackendOptions,
    /// `topic.<config>` pass-through: topic configs of the topics it creates (prefix
    /// removed), e.g. `min.insync.replicas`.
    pub topic_properties: BackendOptions,
}

const PROTOCOLS: [&str; 4] = ["plaintext", "ssl", "sasl_plaintext", "sasl_ssl"];
const MECHANISMS: [&str; 3] = ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"];

/// Room above `max_message_size` for the envelope and the record's own overhead.
pub(crate) const RECORD_OVERHEAD: usize = 64 * 1024;

/// The largest `message.max.bytes` librdkafka takes (its range is 1000 to 1000000000).
const LIBRDKAFKA_MAX_MESSAGE_BYTES: usize = 1_000_000_000;

/// The largest `max_message_size` the Kafka backend takes: librdkafka's largest
/// `message.max.bytes` less the room it adds for the envelope (999934464 bytes).
pub const MAX_MESSAGE_SIZE: usize = LIBRDKAFKA_MAX_MESSAGE_BYTES - RECORD_OVERHEAD;

/// The largest `session_timeout`: librdkafka's `session.timeout.ms` takes 1 to 3600000.
const MAX_SESSION_TIMEOUT: Duration = Duration::from_secs(3600);

/// The largest `linger`: librdkafka's `linger.ms` takes 0 to 900000.
const MAX_LINGER: Duration = Duration::from_secs(900);

/// The largest `retention`: the topic config `retention.ms` is a signed 64-bit count.
const MAX_RETENTION: Duration = Duration::from_millis(i64::MAX as u64);

/// Adds to an option error which librdkafka property the option becomes, and its range.
fn librdkafka_range(e: Error, property: &str, range: &str) -> Error {
    match e {
        Error::Config(m) => Error::Config(format!("{m} (librdkafka's {property} takes {range})")),
        other => other,
    }
}

impl BackendSettings for KafkaConfig {
    const SCHEMES: &'static [&'static str] = &[BACKEND];
    const OPTIONS: &'static str = "partitions, replication, retention, create_topics, groups_topic, prefetch, linger, delivery_timeout, connection_timeout, session_timeout, commit_interval, security.protocol, sasl.mechanism, username, password, ca_file, kafka.<librdkafka property>, topic.<topic config>";

    /// Reads the Kafka settings of `config` (scheme `kafka`).
    fn read(config: &LayerConfig, o: &mut BackendOptions) -> Result<KafkaConfig> {
        let b = &config.backend;
        let max = config.options.max_message_size;
        if max > MAX_MESSAGE_SIZE {
            return Err(Error::Config(format!(
                "option max_message_size={max}: too large; use a whole number from 1 to {MAX_MESSAGE_SIZE} (the kafka backend sets librdkafka's message.max.bytes to max_message_size + {RECORD_OVERHEAD}, and librdkafka takes message.max.bytes from 1000 to {LIBRDKAFKA_MAX_MESSAGE_BYTES})"
            )));
        }
        let brokers = parse_brokers(&b.address)?;
        // The options win over the URL's user-info.
        let url = b.credentials.as_ref();
        let username = o
            .take("username")
            .or_else(|| url.map(|c| c.username.clone()));
        let password =
            (o.take("password").map(Secret::new)).or_else(|| url.and_then(|c| c.password.clone()));
        let client_properties = take_prefixed(o, "kafka.", "librdkafka property")?;
        let topic_properties = take_prefixed(o, "topic.", "topic config")?;
        let security_protocol = o.take("security.protocol").map(|p| p.to_ascii_lowercase());
        one_of("security.protocol", &security_protocol, &PROTOCOLS, "")?;
        let sasl_mechanism = o.take("sasl.mechanism").map(|m| m.to_ascii_uppercase());
        let others = " (others through kafka.sasl.mechanism)";
        one_of("sasl.mechanism", &sasl_mechanism, &MECHANISMS, others)?;
        Ok(KafkaConfig {
            brokers,
            partitions: o.take_int("partitions", 1..=i32::MAX)?.unwrap_or(1),
            replication: o
                .take_int("replication", -1..=i32::from(i16::MAX))?
                .unwrap_or(-1),
            retention: o
                .take_duration("retention", MIN_TIMEOUT..=MAX_RETENTION)?
                .unwrap_or(Duration::from_secs(24 * 3600)),
            create_topics: o.take_parsed("create_topics")?.unwrap_or(true),
            groups_topic: o
                .take("groups_topic")
                .unwrap_or_else(|| format!("{}.groups", config.options.prefix)),
            prefetch: o.take_int("prefetch", 1..=usize::MAX)?.unwrap_or(500),
            linger: o
                .take_duration("linger", Duration::ZERO..=MAX_LINGER)
                .map_err(|e| librdkafka_range(e, "linger.ms", "0 to 900000"))?
                .unwrap_or(Duration::from_millis(1)),
            delivery_timeout: o
                .take_timeout("delivery_timeout")?
                .unwrap_or(Duration::from_secs(30)),
            connection_timeout: o
                .take_timeout("connection_timeout")?
                .unwrap_or(Duration::from_secs(10)),
            session_timeout: o
                .take_duration("session_timeout", MIN_TIMEOUT..=MAX_SESSION_TIMEOUT)
                .map_err(|e| librdkafka_range(e, "session.timeout.ms", "1 to 3600000"))?
                .unwrap_or(Duration::from_secs(10)),
            commit_interval: o
                .take_timeout("commit_interval")?
                .unwrap_or(Duration::from_millis(100)),
            security_protocol,
            sasl_mechanism,
            username,
            password,
            ca_file: o.take("ca_file").map(Into::into),
            client_properties,
            topic_properties,
        })
    }

    fn check(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.replication == 0 {
            return bad("option replication=0: use a replication factor of at least 1, or -1 for the broker's default".into());
        }
        if self.password.is_some() && self.username.is_none() {
            return bad("a SASL password was given without a username".into());
        }
        let topic = &self.groups_topic;
        let topic_byte = |b: u8| b.is_ascii_alphanumeric() || b"._-".contains(&b);
        if topic.is_empty() || !topic.bytes().all(topic_byte) {
            return bad(format!(
                "option groups_topic={topic:?}: a Kafka topic name is 1 to 249 of [A-Za-z0-9._-]"
            ));
        }
        Ok(())
    }
}

impl KafkaConfig {
    /// `security.protocol` as librdkafka gets it: the option, else implied by SASL
    /// credentials and a CA file, else `plaintext`.
    pub fn effective_protocol(&self) -> &str {
        if let Some(p) = &self.security_protocol {
            return p;
        }
        match (self.username.is_some(), self.ca_file.is_some()) {
            (true, true) => "sasl_ssl",
            (true, false) => "sasl_plaintext",
            (false, true) => "ssl",
            (false, false) => "plaintext",
        }
    }

    /// The brokers without credentials, for messages and logs: `kafka://h1:9092,h2:9092`.
    pub fn display_address(&self) -> String {
        format!("kafka://{}", self.brokers)
    }

    /// The librdkafka settings every client of this layer shares: brokers, client id,
    /// security, then the `kafka.*` pass-through (which wins).
    pub fn client_config(&self, client_id: &str) -> ClientConfig {
        let mut c = ClientConfig::new();
        let setup_timeout = millis(self.connection_timeout).max(1000).to_string();
        c.set("bootstrap.servers", &self.brokers)
            .set("client.id", client_id)
            .set("security.protocol", self.effective_protocol())
            .set("socket.connection.setup.timeout.ms", setup_timeout);
        if let Some(user) = &self.username {
            let mechanism = self.sasl_mechanism.as_deref().unwrap_or("PLAIN");
            c.set("sasl.mechanism", mechanism)
                .set("sasl.username", user);
            if let Some(p) = &self.password {
                c.set("sasl.password", p.expose());
            }
        } else if let Some(m) = &self.sasl_mechanism {
            c.set("sasl.mechanism", m);
        }
        if let Some(ca) = &self.ca_file {
            c.set("ssl.ca.location", ca.to_string_lossy());
        }
        for (k, v) in &self.client_properties.0 {
            c.set(k, v);
        }
        c
    }

    /// The producer's settings: idempotent, `acks=all`, delivery reports awaited by `send`.
    pub fn producer_config(&self, client_id: &str, max_message_size: usize) -> ClientConfig {
        let max_bytes = max_message_size.saturating_add(RECORD_OVERHEAD);
        let timeout = millis(self.delivery_timeout).max(1);
        defaults(
            self.client_config(client_id),
            [
                ("enable.idempotence", "true".into()),
                ("acks", "all".into()),
                ("linger.ms", millis(self.linger).to_string()),
                ("message.timeout.ms", timeout.to_string()),
                ("message.max.bytes", max_bytes.to_string()),
                // A send to a topic that does not exist (an instance that closed) must not
                // create it.
                ("allow.auto.create.topics", "false".into()),
            ],
        )
    }

    /// A consumer's settings: manual commits only, no offset store, no topic creation.
    /// `group` is the consumer group (normal channels) or `None` (assigned partitions only:
    /// librdkafka wants a group id for a consumer, and nothing joins or commits with it).
    pub fn consumer_config(&self, client_id: &str, group: Option<&str>) -> ClientConfig {
        let mut c = self.client_config(client_id);
        c.set("group.id", group.unwrap_or(client_id));
        let session = millis(self.session_timeout);
        defaults(
            c,
            [
                ("enable.auto.commit", "false".into()),
                ("enable.auto.offset.store", "false".into()),
                ("auto.offset.reset", "earliest".into()),
                ("enable.partition.eof", "false".into()),
                ("allow.auto.create.topics", "false".into()),
                ("session.timeout.ms", session.to_string()),
                // librdkafka refuses a session.timeout.ms above max.poll.interval.ms
                // (default 5 min).
                ("max.poll.interval.ms", session.max(300_000).to_string()),
                // Latency: answer a fetch as soon as anything is there, or after 100 ms.
                ("fetch.wait.max.ms", "100".into()),
            ],
        )
    }
}

/// Checks that option `key`, if given, is one of `choices` (`more` adds to the error).
fn one_of(key: &str, value: &Option<String>, choices: &[&str], more: &str) -> Result<()> {
    match value {
        Some(v) if !choices.contains(&v.as_str()) => Err(Error::Config(format!(
            "option {key}={v}: use one of {}{more}",
            choices.join(", ")
        ))),
        _ => Ok(()),
    }
}

/// Takes every option `{head}<name>` out of `o`, as `name -> value`.
fn take_prefixed(o: &mut BackendOptions, head: &str, what: &str) -> Result<BackendOptions> {
    if o.0.contains_key(head) {
        return Err(Error::Config(format!(
            "option \"{head}\" names no {what} ({head}<{}>=<value>)",
            what.rsplit(' ').next().unwrap_or(what)
        )));
    }
    let (ours, rest): (std::collections::BTreeMap<_, _>, _) =
        (std::mem::take(&mut o.0).into_iter()).partition(|(k, _)| k.starts_with(head));
    o.0 = rest;
    let named = ours
        .into_iter()
        .map(|(k, v)| (k[head.len()..].to_owned(), v));
    Ok(BackendOptions(named.collect()))
}

/// Sets each key of `values` unless the `kafka.*` pass-through already did.
fn defaults<const N: usize>(mut c: ClientConfig, values: [(&str, String); N]) -> ClientConfig {
    for (key, value) in values {
        if c.get(key).is_none() {
            c.set(key, value);
        }
    }
    c
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// `bootstrap.servers` from the URL's address: its brokers as `host:port,...`.
fn parse_brokers(address: &str) -> Result<String> {
    let address = address.trim_end_matches('/');
    if address.contains('/') {
        return Err(Error::Config(format!(
            "{address:?}: a kafka:// URL has no path; it is kafka://host:port[,host:port...]?options"
        )));
    }
    let brokers = hosts(address, 9092)?;
    Ok((brokers.iter().map(HostPort::to_string))
        .collect::<Vec<_>>()
        .join(","))
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
