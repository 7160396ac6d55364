//! Configuration: the options every backend shares ([`LayerOptions`]), the backend section
//! ([`BackendConfig`]), and parsing both from a URL ([`LayerConfig::from_url`]).
//!
//! URL grammar (see `docs/configuration.md`):
//!
//! ```text
//! scheme://[user[:password]@]address[?key=value&...]
//! ```
//!
//! Shared keys: `prefix`, `capacity`, `channel_capacity.<glob>`, `expiry`, `group_expiry`,
//! `codec`, `max_message_size`, `max_deliveries`, `dead_letter`, `inspect`. Every other key belongs to the backend (and is passed through
//! to its client library where the backend says so). Durations are seconds (`60`, `0.5`) or
//! humantime strings (`500ms`, `1h`).
//!
//! ```
//! use chanlayer_core::{Codec, LayerConfig};
//! use std::time::Duration;
//! let cfg = LayerConfig::from_url("memory://app?capacity=10&expiry=500ms&codec=json&channel_capacity.http.*=200").unwrap();
//! assert_eq!(cfg.backend.scheme, "memory");
//! assert_eq!(cfg.backend.address, "app");
//! assert_eq!(cfg.options.capacity, 10);
//! assert_eq!(cfg.options.expiry, Duration::from_millis(500));
//! assert_eq!(cfg.options.codec, Codec::Json);
//! assert_eq!(cfg.options.capacity_for("http.request"), 200);
//! assert_eq!(cfg.options.capacity_for("other"), 10);
//! ```

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::codec::Codec;
use crate::error::{Error, Result};
use crate::names;

/// Default per-channel capacity.
pub const DEFAULT_CAPACITY: usize = 100;
/// Default message expiry.
pub const DEFAULT_EXPIRY: Duration = Duration::from_secs(60);
/// Default group membership expiry.
pub const DEFAULT_GROUP_EXPIRY: Duration = Duration::from_secs(86_400);
/// Default `max_message_size`: 4 MiB.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 4 * 1024 * 1024;
/// Default prefix for broker-side names (topics, queues, exchanges).
pub const DEFAULT_PREFIX: &str = "chanlayer";
/// The shortest timeout (and the shortest `expiry`, `group_expiry`): 1 ms. Durations reach
/// envelopes, brokers and client libraries in whole milliseconds, so anything shorter is
/// zero there.
pub const MIN_TIMEOUT: Duration = Duration::from_millis(1);
/// The longest timeout a backend option takes: 2147483647 ms (about 24.8 days), the largest
/// millisecond count librdkafka and libzmq take (a C `int`).
pub const MAX_TIMEOUT: Duration = Duration::from_millis(i32::MAX as u64);

/// A capacity override: channels whose full name matches `pattern` (a glob: `*`, `?`,
/// `[abc]`) hold `capacity` messages.
#[derive(Debug, Clone, PartialEq)]
pub struct CapacityOverride {
    /// The glob.
    pub pattern: glob::Pattern,
    /// The capacity for matching channels.
    pub capacity: usize,
}

impl CapacityOverride {
    /// An override; the pattern must be a valid glob.
    pub fn new(pattern: &str, capacity: usize) -> Result<Self> {
        let pattern = glob::Pattern::new(pattern).map_err(|e| {
            Error::Config(format!("invalid channel_capacity pattern {pattern:?}: {e}"))
        })?;
        Ok(CapacityOverride { pattern, capacity })
    }
}

/// The options every backend shares.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerOptions {
    /// Prefix for broker-side names, so two applications on one broker don't collide.
    pub prefix: String,
    /// Messages a channel holds before `send` is `ChannelFull` (default 100).
    pub capacity: usize,
    /// Per-channel overrides, matched in order against the full channel name; first wins.
    pub channel_capacity: Vec<CapacityOverride>,
    /// How long a message lives before it is dropped on receive (default 60 s).
    pub expiry: Duration,
    /// How long a group membership lives without a refreshing `group_add` (default 1 day).
    pub group_expiry: Duration,
    /// Body codec for messages this layer encodes (default bincode).
    pub codec: Codec,
    /// Largest message `send` accepts, counting body, type, headers and destination.
    pub max_message_size: usize,
    /// How many times a message of a normal channel may be delivered and nacked before it
    /// goes to the dead-letter channel instead of coming back (default: no limit).
    pub max_deliveries: Option<u32>,
    /// Where such a message goes: this channel for every channel, or (`None`, the default)
    /// `{channel}.dead`.
    pub dead_letter: Option<String>,
    /// This instance answers [`inspect`](crate::inspect) requests (`chanlayer groups`,
    /// `chanlayer stats`) where its backend is cross-process (default `true`).
    pub inspect: bool,
}

impl Default for LayerOptions {
    fn default() -> Self {
        LayerOptions {
            prefix: DEFAULT_PREFIX.to_owned(),
            capacity: DEFAULT_CAPACITY,
            channel_capacity: Vec::new(),
            expiry: DEFAULT_EXPIRY,
            group_expiry: DEFAULT_GROUP_EXPIRY,
            codec: Codec::default(),
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            max_deliveries: None,
            dead_letter: None,
            inspect: true,
        }
    }
}

impl LayerOptions {
    /// The capacity of `channel`: the first matching override, else `capacity`.
    pub fn capacity_for(&self, channel: &str) -> usize {
        self.channel_capacity
            .iter()
            .find(|o| o.pattern.matches(channel))
            .map_or(self.capacity, |o| o.capacity)
    }

    /// Applies the values set in `partial` on top of these.
    pub fn apply(&mut self, partial: PartialOptions) -> Result<()> {
        // A later source (the file over the URL) takes precedence: its patterns go first,
        // in their own order.
        let mut newer = (partial.channel_capacity.iter())
            .map(|(pattern, capacity)| CapacityOverride::new(pattern, *capacity))
            .collect::<Result<Vec<_>>>()?;
        newer.append(&mut self.channel_capacity);
        self.channel_capacity = newer;
        self.prefix = partial.prefix.unwrap_or(std::mem::take(&mut self.prefix));
        self.capacity = partial.capacity.unwrap_or(self.capacity);
        self.expiry = partial.expiry.map_or(self.expiry, |d| d.0);
        self.group_expiry = partial.group_expiry.map_or(self.group_expiry, |d| d.0);
        self.codec = partial.codec.unwrap_or(self.codec);
        self.max_message_size = partial.max_message_size.unwrap_or(self.max_message_size);
        self.max_deliveries = partial.max_deliveries.or(self.max_deliveries);
        self.dead_letter = partial.dead_letter.or(self.dead_letter.take());
        self.inspect = partial.inspect.unwrap_or(self.inspect);
        self.validate()
    }

    /// Checks the values make sense together.
    pub fn validate(&self) -> Result<()> {
        names::validate_prefix(&self.prefix)
            .map_err(|e| Error::Config(format!("option prefix: {e}")))?;
        if self.capacity == 0 {
            return Err(Error::Config("option capacity must be at least 1".into()));
        }
        if let Some(o) = self.channel_capacity.iter().find(|o| o.capacity == 0) {
            return Err(Error::Config(format!(
                "channel_capacity for {:?} must be at least 1",
                o.pattern.as_str()
            )));
        }
        let positive = MIN_TIMEOUT..=Duration::MAX;
        check_duration("expiry", self.expiry, positive.clone())?;
        check_duration("group_expiry", self.group_expiry, positive)?;
        if self.max_message_size == 0 {
            return Err(Error::Config(
                "option max_message_size must be at least 1".into(),
            ));
        }
        if self.max_deliveries == Some(0) {
            return Err(Error::Config(
                "option max_deliveries must be at least 1 (leave it out for no limit)".into(),
            ));
        }
        if let Some(d) = &self.dead_letter {
            names::validate_channel(d)
                .map_err(|e| Error::Config(format!("option dead_letter: {e}")))?;
            if names::is_process_local(d) {
                return Err(Error::Config(format!(
                    "option dead_letter={d:?}: the dead-letter channel must be a normal channel (no '!')"
                )));
            }
        }
        Ok(())
    }
}

/// A duration in configuration: a number of seconds (`60`, `0.25`) or a humantime string
/// (`"500ms"`, `"2m"`, `"1h 30m"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfigDuration(pub Duration);

impl std::str::FromStr for ConfigDuration {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim();
        if let Ok(secs) = s.parse::<f64>() {
            return Duration::try_from_secs_f64(secs)
                .map(ConfigDuration)
                .map_err(|_| Error::Config(format!("duration {s:?} is negative or too large")));
        }
        humantime::parse_duration(s)
            .map(ConfigDuration)
            .map_err(|e| {
                Error::Config(format!(
                    "invalid duration {s:?}: {e}; use seconds (60, 0.5) or units (500ms, 2m, 1h)"
                ))
            })
    }
}

impl<'de> Deserialize<'de> for ConfigDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Float(f64),
            Text(String),
        }
        let parsed = match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(ConfigDuration(Duration::from_secs(n))),
            Raw::Float(f) => f.to_string().parse(),
            Raw::Text(s) => s.parse(),
        };
        parsed.map_err(serde::de::Error::custom)
    }
}

impl Serialize for ConfigDuration {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(self.0).to_string())
    }
}

/// Options as read from one source (URL query, config file, environment), each optional;
/// [`LayerOptions::apply`] layers them.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PartialOptions {
    /// See [`LayerOptions::prefix`].
    pub prefix: Option<String>,
    /// See [`LayerOptions::capacity`].
    pub capacity: Option<usize>,
    /// Glob pattern to capacity, in order.
    #[serde(default, with = "ordered_map")]
    pub channel_capacity: Vec<(String, usize)>,
    /// See [`LayerOptions::expiry`].
    pub expiry: Option<ConfigDuration>,
    /// See [`LayerOptions::group_expiry`].
    pub group_expiry: Option<ConfigDuration>,
    /// See [`LayerOptions::codec`].
    pub codec: Option<Codec>,
    /// See [`LayerOptions::max_message_size`].
    pub max_message_size: Option<usize>,
    /// See [`LayerOptions::max_deliveries`].
    pub max_deliveries: Option<u32>,
    /// See [`LayerOptions::dead_letter`].
    pub dead_letter: Option<String>,
    /// See [`LayerOptions::inspect`].
    pub inspect: Option<bool>,
}

/// A table of `pattern = capacity`, kept in the order written.
mod ordered_map {
    use serde::de::{MapAccess, Visitor};
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[(String, usize)], s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(v.iter().map(|(k, v)| (k, v)))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<(String, usize)>, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Vec<(String, usize)>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a table of glob pattern = capacity")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(entry) = map.next_entry::<String, usize>()? {
                    out.push(entry);
                }
                Ok(out)
            }
        }
        d.deserialize_map(V)
    }
}

mod backend;
mod url;
mod values;

pub use backend::{is_secret_key, BackendConfig, BackendOptions, Credentials, Secret};

/// The options every backend shares (read into [`LayerOptions`]), as the "unknown option"
/// error lists them before a backend's own.
pub const SHARED_OPTIONS: &str = "prefix, capacity, channel_capacity.<glob>, expiry, group_expiry, codec, max_message_size, max_deliveries, dead_letter, inspect";

/// A backend's own settings, read from a [`LayerConfig`]: its scheme, address and the
/// options only it knows (`AmqpConfig`, `KafkaConfig`, `ZmqConfig`). A backend says what it
/// reads ([`read`](Self::read)) and how its settings must fit together
/// ([`check`](Self::check)); [`from_layer_config`](Self::from_layer_config) does the rest
/// the same way for every backend.
pub trait BackendSettings: Sized {
    /// The URL schemes it reads, the first its name as errors say it (`["amqp", "amqps"]`).
    const SCHEMES: &'static [&'static str];
    /// The options only this backend reads, for the "unknown option" error.
    const OPTIONS: &'static str;

    /// Reads the settings of `config` (whose scheme is one of [`SCHEMES`](Self::SCHEMES)),
    /// taking every option it knows out of `options` (a copy of the backend's options):
    /// what is left there is unknown.
    fn read(config: &LayerConfig, options: &mut BackendOptions) -> Result<Self>;

    /// Checks the settings together, once every option is read and none is unknown.
    fn check(&self) -> Result<()> {
        Ok(())
    }

    /// Reads the settings of `config`: its scheme, the shared options' consistency
    /// ([`LayerOptions::validate`]), [`read`](Self::read), no option left unknown,
    /// [`check`](Self::check). An unknown option, a value out of its range or a URL of
    /// another backend's scheme is an [`Error::Config`] naming it; no error contains a
    /// password or a secret key.
    fn from_layer_config(config: &LayerConfig) -> Result<Self> {
        let backend = Self::SCHEMES.first().copied().unwrap_or_default();
        config.backend.scheme_of(backend, Self::SCHEMES)?;
        config.options.validate()?;
        let mut options = config.backend.options.clone();
        let settings = Self::read(config, &mut options)?;
        // Every option a URL of this backend may carry: the shared ones, then its own.
        options.reject_unknown(backend, &format!("{SHARED_OPTIONS}, {}", Self::OPTIONS))?;
        settings.check()?;
        Ok(settings)
    }

    /// [`LayerConfig::from_url`], then [`from_layer_config`](Self::from_layer_config).
    fn from_url(url: &str) -> Result<Self> {
        Self::from_layer_config(&LayerConfig::from_url(url)?)
    }
}
pub use url::{hosts, is_scheme, HostPort, LayerConfig};
pub use values::{check_duration, parse_int, ConfigInt};
use values::{duration_outside, option_error};

#[cfg(test)]
mod tests;
