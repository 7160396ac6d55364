//! `amqp://` and `amqps://` URLs: the broker address, credentials, and the AMQP options.
//!
//! ```text
//! amqp://USER:PASSWORD@HOST:PORT/VHOST?OPTIONS
//! amqps://USER:PASSWORD@HOST:5671/VHOST?ca_file=/path/ca.pem&OPTIONS
//! amqp://USER:PASSWORD@HOST1:PORT1,HOST2:PORT2,HOST3/VHOST?OPTIONS
//! ```
//!
//! Several hosts, separated by commas, are the nodes of one cluster: the layer connects to
//! the first that answers, and after a lost connection tries them in turn from the one after
//! the node it lost. The vhost is percent-encoded (`%2f` is `/`, the default when the path is
//! empty). Options
//! besides the shared ones (`prefix`, `capacity`, ...):
//!
//! | option | default | meaning |
//! |---|---|---|
//! | `prefetch` | 100 | unacked deliveries a normal-channel consumer may hold |
//! | `wire` | `chanlayer` | `channels_rabbitmq`: speak Django `channels_rabbitmq`'s wire ([`Wire`]) |
//! | `groups_exchange` | `{prefix}.groups` (`groups` with `wire=channels_rabbitmq`) | the direct exchange group messages go through |
//! | `inbox_capacity` | 10000 (100 with `wire=channels_rabbitmq`) | `x-max-length` of the instance's inbox queue |
//! | `queue_expires` | none | `x-expires` of normal-channel queues (deleted when unused that long) |
//! | `queue_type` | `classic` | `quorum`: normal-channel queues are replicated quorum queues ([`QueueType`]) |
//! | `connection_timeout` | 10s | how long one connection attempt may take |
//! | `heartbeat` | 30 | AMQP heartbeat, in seconds (0 turns it off) |
//! | `reconnect_timeout` | 30s | how long an operation waits for a lost broker to come back |
//! | `connection_name` | `chanlayer {instance}` | the name the broker shows for the connection |
//! | `ca_file` | system roots | PEM file of the CA that signed the broker's certificate (`amqps://`) |

use std::time::Duration;

use chanlayer_core::config::{hosts, BackendOptions, BackendSettings, HostPort};
use chanlayer_core::{Error, LayerConfig, Result};
use lapin::uri::{AMQPAuthority, AMQPQueryString, AMQPScheme, AMQPUri, AMQPUserInfo};
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};

use crate::BACKEND;

/// What an AMQP layer puts on the wire (option `wire`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Wire {
    /// chanlayer's own (`wire=chanlayer`): versioned envelopes with ids, times and headers,
    /// queues and the groups exchange named after the layer's prefix, normal channels.
    #[default]
    Chanlayer,
    /// Django `channels_rabbitmq` 4.x's (`wire=channels_rabbitmq`): an instance is
    /// indistinguishable from a `channels_rabbitmq` process on the broker. Its queue is
    /// `channels_` and 12 letters (exclusive; `x-max-length` = `inbox_capacity`, default
    /// 100, with reject-publish; `x-message-ttl` = `expiry`), its channels
    /// `{queue}!{12 letters}`, group messages go through the non-durable direct exchange
    /// `groups`, and a body is a MessagePack message dict
    /// ([`chanlayer_core::asgi`]) with no properties. There are no normal channels
    /// (`Unsupported`, as in `channels_rabbitmq`); bodies must use the `msgpack` or `json`
    /// codec.
    ChannelsRabbitmq,
}

impl Wire {
    /// How instances on this wire name their channels.
    pub fn naming(self) -> chanlayer_core::names::Naming {
        match self {
            Wire::Chanlayer => chanlayer_core::names::Naming::Layer,
            Wire::ChannelsRabbitmq => chanlayer_core::names::Naming::ChannelsRabbitmq,
        }
    }
}

/// The kind of queue that holds a normal channel (option `queue_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QueueType {
    /// `queue_type=classic`: a classic durable queue, on the node that declared it.
    #[default]
    Classic,
    /// `queue_type=quorum`: a quorum queue (`x-queue-type=quorum`), replicated on the
    /// cluster's nodes with Raft, so it survives the loss of a minority of them. Needs
    /// RabbitMQ 3.10 or later (message TTL). Process-local inboxes stay exclusive classic
    /// queues (a quorum queue cannot be exclusive).
    Quorum,
}

impl QueueType {
    /// The option's value: `classic` or `quorum`.
    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Classic => "classic",
            QueueType::Quorum => "quorum",
        }
    }
}

/// The AMQP backend's settings, parsed from a [`LayerConfig`].
#[derive(Debug, Clone, PartialEq)]
pub struct AmqpConfig {
    /// `true` for `amqps://`.
    pub tls: bool,
    /// The brokers, in the URL's order (at least one): the nodes of one cluster, tried in
    /// turn.
    pub hosts: Vec<HostPort>,
    /// Virtual host (percent-decoded).
    pub vhost: String,
    /// User name.
    pub username: String,
    /// Password (redacted in `Debug`).
    pub password: chanlayer_core::Secret,
    /// What goes on the wire.
    pub wire: Wire,
    /// Unacked deliveries a normal-channel consumer may hold.
    pub prefetch: u16,
    /// The groups exchange.
    pub groups_exchange: String,
    /// `x-max-length` of the inbox queue.
    pub inbox_capacity: u32,
    /// `x-expires` of normal-channel queues.
    pub queue_expires: Option<Duration>,
    /// Classic or quorum queues for normal channels.
    pub queue_type: QueueType,
    /// Time limit of one connection attempt.
    pub connection_timeout: Duration,
    /// Heartbeat in seconds.
    pub heartbeat: u16,
    /// How long operations wait for a lost connection to come back.
    pub reconnect_timeout: Duration,
    /// Connection name shown by the broker.
    pub connection_name: Option<String>,
    /// CA certificate file (PEM) for `amqps://`.
    pub ca_file: Option<std::path::PathBuf>,
}

impl BackendSettings for AmqpConfig {
    const SCHEMES: &'static [&'static str] = &[BACKEND, "amqps"];
    const OPTIONS: &'static str = "wire, prefetch, groups_exchange, inbox_capacity, queue_expires, queue_type, connection_timeout, heartbeat, reconnect_timeout, connection_name, ca_file";

    /// Reads the AMQP settings of `config` (scheme `amqp` or `amqps`).
    fn read(config: &LayerConfig, o: &mut BackendOptions) -> Result<AmqpConfig> {
        let b = &config.backend;
        let tls = b.scheme == "amqps";
        let (authority, path) = b.address.split_once('/').unwrap_or((&b.address, ""));
        let vhost = match path {
            "" => "/".to_owned(),
            _ => percent_encoding::percent_decode_str(path)
                .decode_utf8_lossy()
                .into(),
        };
        let default_port = if tls { 5671 } else { 5672 };
        let hosts = hosts(authority, default_port)?;
        let (username, password) = match &b.credentials {
            Some(c) => (c.username.clone(), c.password.clone().unwrap_or_default()),
            None => ("guest".to_owned(), chanlayer_core::Secret::new("guest")),
        };
        let wire = match o.take("wire").as_deref() {
            None | Some("chanlayer") => Wire::Chanlayer,
            Some("channels_rabbitmq") => Wire::ChannelsRabbitmq,
            Some(other) => {
                return Err(Error::Config(format!(
                    "option wire={other:?}: the amqp backend speaks wire=chanlayer (its own, the default) or wire=channels_rabbitmq (Django channels_rabbitmq's)"
                )))
            }
        };
        let django = wire == Wire::ChannelsRabbitmq;
        if django && config.options.codec == chanlayer_core::Codec::Bincode {
            return Err(Error::Config(
                "option wire=channels_rabbitmq carries MessagePack message dicts: bodies must be maps encoded with codec=msgpack (or json); add codec=msgpack to the URL".into(),
            ));
        }
        let queue_type = match o.take("queue_type").as_deref() {
            None | Some("classic") => QueueType::Classic,
            Some("quorum") => QueueType::Quorum,
            Some(other) => {
                return Err(Error::Config(format!(
                    "option queue_type={other:?}: normal-channel queues are classic (the default) or quorum (replicated across a RabbitMQ cluster)"
                )))
            }
        };
        if django && queue_type == QueueType::Quorum {
            return Err(Error::Config(
                "option queue_type=quorum is for normal-channel queues, and wire=channels_rabbitmq has no normal channels (its process queues are exclusive, so they stay classic); remove queue_type".into(),
            ));
        }
        Ok(AmqpConfig {
            wire,
            tls,
            hosts,
            queue_type,
            vhost,
            username,
            password,
            prefetch: o.take_int("prefetch", 1..=u16::MAX)?.unwrap_or(100),
            groups_exchange: o.take("groups_exchange").unwrap_or_else(|| {
                if django {
                    "groups".to_owned()
                } else {
                    format!("{}.groups", config.options.prefix)
                }
            }),
            inbox_capacity: o
                .take_int("inbox_capacity", 1..=u32::MAX)?
                .unwrap_or(if django { 100 } else { 10_000 }),
            queue_expires: o.take_timeout("queue_expires")?,
            connection_timeout: o
                .take_timeout("connection_timeout")?
                .unwrap_or(Duration::from_secs(10)),
            heartbeat: o.take_int("heartbeat", 0..=u16::MAX)?.unwrap_or(30),
            reconnect_timeout: o
                .take_timeout("reconnect_timeout")?
                .unwrap_or(Duration::from_secs(30)),
            connection_name: o.take("connection_name"),
            ca_file: o.take("ca_file").map(Into::into),
        })
    }

    fn check(&self) -> Result<()> {
        if self.ca_file.is_some() && !self.tls {
            return Err(Error::Config(
                "option ca_file is for amqps:// URLs; this URL is amqp:// (no TLS)".into(),
            ));
        }
        let x = &self.groups_exchange;
        if x.is_empty() || x.starts_with("amq.") {
            return Err(Error::Config(format!(
                "option groups_exchange={x:?}: an exchange name must be non-empty and must not start with \"amq.\" (reserved by the broker)"
            )));
        }
        Ok(())
    }
}

impl AmqpConfig {
    /// The broker address without credentials, for messages and logs:
    /// `amqp://host:port/vhost`, or `amqp://h1:5672,h2:5672,h3:5672/vhost` for several.
    pub fn display_address(&self) -> String {
        self.address_of(&self.hosts)
    }

    /// The address of host number `index` (of [`AmqpConfig::hosts`]) without credentials:
    /// `amqp://host:port/vhost`.
    pub fn host_address(&self, index: usize) -> String {
        self.address_of(self.hosts.get(index..=index).unwrap_or(&self.hosts))
    }

    fn address_of(&self, hosts: &[HostPort]) -> String {
        let hosts: Vec<String> = hosts.iter().map(HostPort::to_string).collect();
        let vhost = utf8_percent_encode(&self.vhost, NON_ALPHANUMERIC);
        let scheme = if self.tls { "amqps" } else { "amqp" };
        format!("{scheme}://{}/{vhost}", hosts.join(","))
    }

    /// The lapin URI of host number `index` (with the password: hand it to lapin only).
    pub(crate) fn lapin_uri(&self, index: usize) -> AMQPUri {
        let (host, port) = match self.hosts.get(index).or(self.hosts.first()) {
            Some(h) => (h.host.clone(), h.port),
            None => ("127.0.0.1".to_owned(), if self.tls { 5671 } else { 5672 }),
        };
        let timeout_ms = u64::try_from(self.connection_timeout.as_millis()).unwrap_or(u64::MAX);
        AMQPUri {
            scheme: if self.tls {
                AMQPScheme::AMQPS
            } else {
                AMQPScheme::AMQP
            },
            authority: AMQPAuthority {
                userinfo: AMQPUserInfo {
                    username: self.username.clone(),
                    password: self.password.expose().to_owned(),
                },
                host,
                port,
            },
            vhost: self.vhost.clone(),
            query: AMQPQueryString {
                heartbeat: Some(self.heartbeat),
                connection_timeout: Some(timeout_ms),
                ..AMQPQueryString::default()
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chanlayer_testkit::options::check_refused;

    #[test]
    fn full_url() {
        let c = AmqpConfig::from_url("amqps://app:s3cret@mq.example:5999/my%2Fvhost?prefix=app&prefetch=7&heartbeat=5&reconnect_timeout=2s&ca_file=/tmp/ca.pem&groups_exchange=g.x&queue_expires=10m&inbox_capacity=50").unwrap();
        assert!(c.tls);
        assert_eq!(
            c.hosts,
            [HostPort {
                host: "mq.example".into(),
                port: 5999
            }]
        );
        assert_eq!(c.queue_type, QueueType::Classic);
        assert_eq!(c.vhost, "my/vhost");
        assert_eq!(c.username, "app");
        assert_eq!(c.password.expose(), "s3cret");
        assert_eq!(c.prefetch, 7);
        assert_eq!(c.heartbeat, 5);
        assert_eq!(c.reconnect_timeout, Duration::from_secs(2));
        assert_eq!(c.queue_expires, Some(Duration::from_secs(600)));
        assert_eq!(c.inbox_capacity, 50);
        assert_eq!(c.groups_exchange, "g.x");
        assert_eq!(
            c.ca_file.as_deref(),
            Some(std::path::Path::new("/tmp/ca.pem"))
        );
        assert!(!format!("{c:?}").contains("s3cret"));
        assert_eq!(c.display_address(), "amqps://mq.example:5999/my%2Fvhost");
    }

    #[test]
    fn defaults() {
        let c = AmqpConfig::from_url("amqp://").unwrap();
        assert_eq!(
            (c.hosts[0].host.as_str(), c.hosts[0].port, c.vhost.as_str()),
            ("127.0.0.1", 5672, "/")
        );
        assert_eq!(c.hosts.len(), 1);
        assert_eq!(c.username, "guest");
        assert_eq!(c.groups_exchange, "chanlayer.groups");
        assert_eq!(c.prefetch, 100);
        let c = AmqpConfig::from_url("amqps://h/%2f").unwrap();
        assert_eq!((c.hosts[0].port, c.vhost.as_str()), (5671, "/"));
        let c = AmqpConfig::from_url("amqp://[::1]:5673/v").unwrap();
        assert_eq!(
            (c.hosts[0].host.as_str(), c.hosts[0].port, c.vhost.as_str()),
            ("::1", 5673, "v")
        );
        assert_eq!(c.display_address(), "amqp://[::1]:5673/v");
    }

    /// Several hosts: every one, in order, with the default port where none is given; the
    /// display address shows them all, a host address one; quorum queues.
    #[test]
    fn several_hosts() {
        let c =
            AmqpConfig::from_url("amqp://app:s3cret@h1:5672,h2:5673,[::1],h3/v?queue_type=quorum")
                .unwrap();
        let hosts: Vec<(&str, u16)> = c.hosts.iter().map(|h| (h.host.as_str(), h.port)).collect();
        assert_eq!(
            hosts,
            [("h1", 5672), ("h2", 5673), ("::1", 5672), ("h3", 5672)]
        );
        assert_eq!(
            c.display_address(),
            "amqp://h1:5672,h2:5673,[::1]:5672,h3:5672/v"
        );
        assert_eq!(c.host_address(1), "amqp://h2:5673/v");
        assert_eq!(c.lapin_uri(2).authority.host, "::1");
        assert_eq!(c.lapin_uri(3).authority.userinfo.password, "s3cret");
        assert_eq!(c.queue_type, QueueType::Quorum);
        let shown = format!("{c:?} {}", c.display_address());
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("h3"), "{shown}");
        let c = AmqpConfig::from_url("amqps://h1,h2:6000").unwrap();
        assert_eq!((c.hosts[0].port, c.hosts[1].port), (5671, 6000));
        for bad in ["amqp://u:pw@h1,,h2", "amqp://u:pw@h1,", "amqp://u:pw@,h2"] {
            let e = AmqpConfig::from_url(bad).unwrap_err().to_string();
            assert!(e.contains("empty broker address"), "{bad}: {e}");
            assert!(!e.contains("pw"), "{e}");
        }
        let e = AmqpConfig::from_url("amqp://u:pw@h1,h2:nope/v")
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"nope\" is not a port"), "{e}");
    }

    #[test]
    fn queue_type_is_classic_or_quorum() {
        let c = AmqpConfig::from_url("amqp://h?queue_type=classic").unwrap();
        assert_eq!(c.queue_type, QueueType::Classic);
        let e = AmqpConfig::from_url("amqp://h?queue_type=stream")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("queue_type=\"stream\"") && e.contains("quorum"),
            "{e}"
        );
        let e =
            AmqpConfig::from_url("amqp://h?queue_type=quorum&wire=channels_rabbitmq&codec=msgpack")
                .unwrap_err()
                .to_string();
        assert!(e.contains("no normal channels"), "{e}");
    }

    /// No part of a hostile password shows in an `AmqpConfig`'s `Debug`, its display
    /// address, or an error, whatever the URL around it.
    #[test]
    fn hostile_passwords_never_show() {
        use chanlayer_testkit::secrets::{
            check_redaction, encode, hostile_urls, HOSTILE_PASSWORDS,
        };
        let mut accepted = 0;
        for scheme in ["amqp", "amqps"] {
            for password in HOSTILE_PASSWORDS {
                let mut urls = hostile_urls(scheme, password);
                // Encoded, the password always parses, and must come through unchanged.
                urls.push(format!(
                    "{scheme}://guest:{}@127.0.0.1:5672/%2f?heartbeat=5",
                    encode(password)
                ));
                urls.push(format!("{scheme}://guest:{}@h:x", encode(password)));
                // Several hosts, good and bad.
                urls.push(format!(
                    "{scheme}://guest:{}@h1:5672,h2:5673,h3/v?queue_type=quorum",
                    encode(password)
                ));
                urls.push(format!("{scheme}://guest:{password}@h1:5672,h2:5673,h3/v"));
                urls.push(format!("{scheme}://guest:{}@h1,,h3:x", encode(password)));
                accepted += check_redaction(password, urls, |url| {
                    LayerConfig::from_url(url)
                        .and_then(|c| AmqpConfig::from_layer_config(&c))
                        .map(|c| {
                            let text = format!("{c:?} {}", c.display_address());
                            (text, Some(c.password.expose().to_owned()))
                        })
                        .map_err(|e| format!("{e} {e:?}"))
                });
            }
        }
        assert!(accepted > 0);
    }

    /// Every integer option says "too large" with its range for a whole number beyond it.
    #[test]
    fn integers_out_of_range_name_the_range() {
        let ranges = [
            ("prefetch", "1 to 65535"),
            ("inbox_capacity", "1 to 4294967295"),
            ("heartbeat", "0 to 65535"),
            ("capacity", "1 to 18446744073709551615"),
            ("max_message_size", "1 to 18446744073709551615"),
        ];
        check_refused(
            AmqpConfig::from_url,
            "amqp://h",
            ranges.iter().flat_map(|(key, range)| {
                [
                    (
                        *key,
                        "99999999999999999999999",
                        format!("too large; use a whole number from {range}"),
                    ),
                    (*key, "x", "not a whole number".to_owned()),
                ]
            }),
        );
        assert_eq!(
            AmqpConfig::from_url("amqp://h?heartbeat=0")
                .unwrap()
                .heartbeat,
            0
        );
        assert_eq!(
            AmqpConfig::from_url("amqp://h?prefetch=65535")
                .unwrap()
                .prefetch,
            65535
        );
    }

    /// Timeouts must be positive: zero is refused at AmqpConfig::from_url time, naming the option and the
    /// rule, instead of every connect failing "after 0ns".
    #[test]
    fn zero_timeouts_are_refused() {
        let keys = ["connection_timeout", "reconnect_timeout", "queue_expires"];
        let zero = "must be more than zero; use a duration from 1ms to 24days 20h 31m 23s 647ms";
        check_refused(
            AmqpConfig::from_url,
            "amqp://h",
            keys.iter().flat_map(|key| {
                ["0", "0s", "0ms", "0.0001", "30d"].map(|v| {
                    let why = if v == "30d" { "too long" } else { zero };
                    (*key, v, why)
                })
            }),
        );
        for key in keys {
            assert!(AmqpConfig::from_url(&format!("amqp://h?{key}=1ms")).is_ok());
        }
    }

    #[test]
    fn bad_options_are_clear() {
        let e = AmqpConfig::from_url("amqp://u:pw@h?prefetsh=3")
            .unwrap_err()
            .to_string();
        assert!(e.contains("prefetsh") && e.contains("prefetch"), "{e}");
        assert!(!e.contains("pw"), "{e}");
        let e = AmqpConfig::from_url("amqp://h:notaport")
            .unwrap_err()
            .to_string();
        assert!(e.contains("notaport"), "{e}");
        let e = AmqpConfig::from_url("amqp://h?prefetch=0")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("prefetch=0: too small; use a whole number from 1 to 65535"),
            "{e}"
        );
        let e = AmqpConfig::from_url("amqp://h?ca_file=/x")
            .unwrap_err()
            .to_string();
        assert!(e.contains("amqps"), "{e}");
        let e = AmqpConfig::from_url("amqp://h?groups_exchange=amq.direct")
            .unwrap_err()
            .to_string();
        assert!(e.contains("amq."), "{e}");
    }
}
