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
//! `codec`, `max_message_size`. Every other key belongs to the backend (and is passed through
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
        if let Some(v) = partial.prefix {
            self.prefix = v;
        }
        if let Some(v) = partial.capacity {
            self.capacity = v;
        }
        // A later source (the file over the URL) takes precedence: its patterns go first,
        // in their own order.
        let mut newer = Vec::with_capacity(partial.channel_capacity.len());
        for (pattern, capacity) in partial.channel_capacity {
            newer.push(CapacityOverride::new(&pattern, capacity)?);
        }
        newer.append(&mut self.channel_capacity);
        self.channel_capacity = newer;
        if let Some(v) = partial.expiry {
            self.expiry = v.0;
        }
        if let Some(v) = partial.group_expiry {
            self.group_expiry = v.0;
        }
        if let Some(v) = partial.codec {
            self.codec = v;
        }
        if let Some(v) = partial.max_message_size {
            self.max_message_size = v;
        }
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
        check_duration("expiry", self.expiry, MIN_TIMEOUT..=Duration::MAX)?;
        check_duration(
            "group_expiry",
            self.group_expiry,
            MIN_TIMEOUT..=Duration::MAX,
        )?;
        if self.max_message_size == 0 {
            return Err(Error::Config(
                "option max_message_size must be at least 1".into(),
            ));
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

/// An integer type an option can be read as, with [`parse_int`] or
/// [`BackendOptions::take_int`].
pub trait ConfigInt: Copy + PartialOrd + std::fmt::Display + std::str::FromStr {}

macro_rules! config_int {
    ($($t:ty),*) => { $(impl ConfigInt for $t {})* };
}
config_int!(u8, u16, u32, u64, usize, i8, i16, i32, i64, isize);

/// Parses the value of an integer option that must lie in `range`. The one integer parser
/// of every option, shared and backend: a value that is not a whole number, and one that is
/// but lies outside `range` (or outside what `T` can hold), are errors that say which, and
/// give the allowed range. The error does not quote the value; callers name the option.
///
/// ```
/// use chanlayer_core::config::parse_int;
/// assert_eq!(parse_int::<u16>("100", 1..=u16::MAX).unwrap(), 100);
/// let e = parse_int::<usize>("99999999999999999999999", 1..=usize::MAX).unwrap_err();
/// assert!(e.to_string().contains(&format!("too large; use a whole number from 1 to {}", usize::MAX)));
/// let e = parse_int::<u16>("lots", 1..=u16::MAX).unwrap_err();
/// assert!(e.to_string().contains("not a whole number"));
/// let e = parse_int::<i32>("0", 1..=i32::MAX).unwrap_err();
/// assert!(e.to_string().contains("too small"));
/// ```
pub fn parse_int<T: ConfigInt>(value: &str, range: std::ops::RangeInclusive<T>) -> Result<T> {
    let rule = format!(
        "use a whole number from {} to {}",
        range.start(),
        range.end()
    );
    let v = value.trim();
    let digits = v.strip_prefix(['+', '-']).unwrap_or(v);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Error::Config(format!("not a whole number; {rule}")));
    }
    let too_small = v.starts_with('-');
    match v.parse::<T>() {
        Ok(n) if range.contains(&n) => Ok(n),
        Ok(n) if n < *range.start() => Err(Error::Config(format!("too small; {rule}"))),
        Ok(_) => Err(Error::Config(format!("too large; {rule}"))),
        // A whole number that `T` cannot hold: too far from zero on its side.
        Err(_) if too_small => Err(Error::Config(format!("too small; {rule}"))),
        Err(_) => Err(Error::Config(format!("too large; {rule}"))),
    }
}

/// Why `d` is outside `range`, with the rule (`None` when it is inside).
fn duration_outside(d: Duration, range: &std::ops::RangeInclusive<Duration>) -> Option<String> {
    let show = |d: Duration| humantime::format_duration(d).to_string();
    let rule = if *range.end() == Duration::MAX {
        format!("use a duration of at least {}", show(*range.start()))
    } else {
        format!(
            "use a duration from {} to {}",
            show(*range.start()),
            show(*range.end())
        )
    };
    if d < *range.start() {
        Some(if *range.start() <= MIN_TIMEOUT {
            format!("must be more than zero; {rule}")
        } else {
            format!("too short; {rule}")
        })
    } else if d > *range.end() {
        Some(format!("too long; {rule}"))
    } else {
        None
    }
}

/// Checks the duration option `key` against `range`: the one bounds check of every
/// duration option, shared and backend (timeouts, which must be positive, use
/// `MIN_TIMEOUT..=MAX_TIMEOUT`; see [`BackendOptions::take_timeout`]). The error names the
/// option, the value and the allowed range.
///
/// ```
/// use chanlayer_core::config::{check_duration, MAX_TIMEOUT, MIN_TIMEOUT};
/// use std::time::Duration;
/// let e = check_duration("connection_timeout", Duration::ZERO, MIN_TIMEOUT..=MAX_TIMEOUT).unwrap_err();
/// assert_eq!(
///     e.to_string(),
///     "configuration error: option connection_timeout=0s: must be more than zero; use a duration from 1ms to 24days 20h 31m 23s 647ms"
/// );
/// ```
pub fn check_duration(
    key: &str,
    d: Duration,
    range: std::ops::RangeInclusive<Duration>,
) -> Result<()> {
    match duration_outside(d, &range) {
        None => Ok(()),
        Some(why) => Err(Error::Config(format!(
            "option {key}={}: {why}",
            humantime::format_duration(d)
        ))),
    }
}

/// The error for option `key` with `value`: `option key=value: why`, the value redacted
/// when the key is secret-looking ([`is_secret_key`]).
fn option_error(key: &str, value: &str, why: Error) -> Error {
    let shown = if is_secret_key(key) { "***" } else { value };
    let why = match why {
        Error::Config(m) => m,
        other => other.to_string(),
    };
    Error::Config(format!("option {key}={shown}: {why}"))
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

/// A secret (a password): `Debug` and `Display` print `***`.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    /// The secret itself, for handing to a client library. Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// `true` for option keys whose values are secrets (redacted in `Debug` and URLs).
pub fn is_secret_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    ["password", "secret", "token", "credential", "private"]
        .iter()
        .any(|s| k.contains(s))
        || k.ends_with(".key")
        || k.ends_with("_key")
        || k == "key"
}

/// Backend options: every query key that is not a shared option. Values of secret-looking
/// keys (`password`, `secret`, `token`, `*.key`, ...) are redacted in `Debug`.
#[derive(Clone, PartialEq, Default)]
pub struct BackendOptions(pub BTreeMap<String, String>);

impl BackendOptions {
    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    /// Removes and returns `key`, for backends that consume the options they know.
    pub fn take(&mut self, key: &str) -> Option<String> {
        self.0.remove(key)
    }

    /// Parses and removes `key`.
    pub fn take_parsed<T: std::str::FromStr>(&mut self, key: &str) -> Result<Option<T>>
    where
        T::Err: std::fmt::Display,
    {
        match self.0.remove(key) {
            None => Ok(None),
            Some(v) => v.parse().map(Some).map_err(|e: T::Err| {
                let why = e.to_string();
                let why = why.strip_prefix("configuration error: ").unwrap_or(&why);
                option_error(key, &v, Error::Config(why.to_owned()))
            }),
        }
    }

    /// Parses ([`ConfigDuration`]) and removes the duration option `key`, which must lie in
    /// `range` (see [`check_duration`]); the error names the option and the range.
    pub fn take_duration(
        &mut self,
        key: &str,
        range: std::ops::RangeInclusive<Duration>,
    ) -> Result<Option<Duration>> {
        let Some(v) = self.0.get(key).cloned() else {
            return Ok(None);
        };
        let d = self
            .take_parsed::<ConfigDuration>(key)?
            .map_or(Duration::ZERO, |d| d.0);
        match duration_outside(d, &range) {
            None => Ok(Some(d)),
            Some(why) => Err(option_error(key, &v, Error::Config(why))),
        }
    }

    /// Parses and removes the timeout option `key`: a duration that must be positive, from
    /// [`MIN_TIMEOUT`] (1 ms) to [`MAX_TIMEOUT`] (about 24.8 days). Zero is refused here,
    /// at parse time, rather than failing every attempt "after 0ns" later.
    pub fn take_timeout(&mut self, key: &str) -> Result<Option<Duration>> {
        self.take_duration(key, MIN_TIMEOUT..=MAX_TIMEOUT)
    }

    /// Parses ([`parse_int`]) and removes the integer option `key`, which must lie in
    /// `range`; the error names the option and the range.
    pub fn take_int<T: ConfigInt>(
        &mut self,
        key: &str,
        range: std::ops::RangeInclusive<T>,
    ) -> Result<Option<T>> {
        match self.0.remove(key) {
            None => Ok(None),
            Some(v) => parse_int(&v, range)
                .map(Some)
                .map_err(|e| option_error(key, &v, e)),
        }
    }

    /// Fails with a clear error naming the first option nobody consumed.
    pub fn reject_unknown(&self, backend: &str, known: &str) -> Result<()> {
        match self.0.keys().next() {
            None => Ok(()),
            Some(k) => Err(Error::Config(format!(
                "unknown option {k:?} for the {backend} backend; known options: {known}"
            ))),
        }
    }
}

impl std::fmt::Debug for BackendOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map()
            .entries(self.0.iter().map(|(k, v)| {
                let v: &dyn std::fmt::Debug = if is_secret_key(k) { &"***" } else { v };
                (k, v)
            }))
            .finish()
    }
}

/// Credentials from the URL's user-info.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Credentials {
    /// User name (percent-decoded).
    pub username: String,
    /// Password (percent-decoded), redacted everywhere.
    pub password: Option<Secret>,
}

/// The backend's part of the configuration.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BackendConfig {
    /// The URL scheme: `memory`, `kafka`, `amqp`, `amqps`, `zmq`.
    pub scheme: String,
    /// User and password from the URL, if any.
    pub credentials: Option<Credentials>,
    /// Everything between `://` (after any user-info) and `?`: hosts, ports, path, still
    /// percent-encoded (`127.0.0.1:5672/%2f`, `h1:9092,h2:9092`, `app`).
    pub address: String,
    /// Backend options (query keys that are not shared options).
    pub options: BackendOptions,
}

impl BackendConfig {
    /// The URL with the password and secret options replaced by `***`.
    pub fn redacted_url(&self) -> String {
        let mut out = format!("{}://", self.scheme);
        if let Some(c) = &self.credentials {
            out.push_str(&c.username);
            if c.password.is_some() {
                out.push_str(":***");
            }
            out.push('@');
        }
        out.push_str(&self.address);
        let mut sep = '?';
        for (k, v) in &self.options.0 {
            let v = if is_secret_key(k) { "***" } else { v.as_str() };
            out.push(sep);
            out.push_str(k);
            out.push('=');
            out.push_str(v);
            sep = '&';
        }
        out
    }
}

/// A whole layer configuration: shared options plus the backend section.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LayerConfig {
    /// Options every backend shares.
    pub options: LayerOptions,
    /// The backend and its own options.
    pub backend: BackendConfig,
}

impl std::fmt::Display for LayerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.backend.redacted_url())
    }
}

fn decode_component(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// `true` if `s` is a URL scheme as RFC 3986 spells one: a letter, then letters, digits,
/// `+`, `-`, `.`. Anything else before `://` is not echoed in errors (it may be a password).
fn is_scheme(s: &str) -> bool {
    let mut bytes = s.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_alphabetic())
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
}

/// The error for a URL whose user-info cannot be told apart from its query or fragment.
/// It does not quote the URL: the part in doubt may be a password.
fn ambiguous_userinfo(scheme: &str) -> Error {
    Error::Config(format!(
        "this {scheme}:// URL has an '@' after a '?' or '#', so where its user-info (user:password@) \
         ends and its query or fragment begins is ambiguous; the URL is refused and not shown, since \
         it may hold a password; percent-encode reserved characters in a password \
         (? as %3F, # as %23, @ as %40, % as %25) and an '@' in an option value as %40"
    ))
}

impl LayerConfig {
    /// Parses a layer URL. Errors, `Debug` and `Display` never contain the password.
    ///
    /// The user-info ends at the last `@` before the first `?` or `#`, so a password may hold
    /// unencoded `/`, `@` and `:`. A URL with an `@` after its first `?` or `#` is refused
    /// with an [`Error::Config`]: there a password with an unencoded `?` or `#` cannot be told
    /// apart from a query or fragment.
    ///
    /// ```
    /// use chanlayer_core::LayerConfig;
    /// let cfg = LayerConfig::from_url("amqp://guest:pa/ss@w:rd@127.0.0.1:5672/%2f").unwrap();
    /// assert_eq!(cfg.backend.address, "127.0.0.1:5672/%2f");
    /// assert_eq!(cfg.to_string(), "amqp://guest:***@127.0.0.1:5672/%2f");
    /// let err = LayerConfig::from_url("amqp://guest:S3cr?Pw5J@127.0.0.1:5672/%2f").unwrap_err();
    /// assert!(err.to_string().contains("percent-encode"));
    /// assert!(!err.to_string().contains("Pw5J"));
    /// ```
    pub fn from_url(url: &str) -> Result<LayerConfig> {
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err(Error::Config(
                "a layer URL looks like scheme://address?options (for example memory:// or amqp://guest:guest@127.0.0.1:5672/%2f)"
                    .to_string(),
            ));
        };
        if !is_scheme(scheme) {
            return Err(Error::Config(
                "a layer URL starts with a scheme (memory, kafka, amqp, amqps, zmq) and ://; this one does not, and is not shown, since it may hold a password"
                    .to_string(),
            ));
        }
        let scheme = scheme.to_ascii_lowercase();
        // Which schemes exist is the facade's registry's business; here only the syntax.
        let mut chars = scheme.chars();
        let syntax_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
            && chars.all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
        if !syntax_ok {
            return Err(Error::Config(
                "a layer URL starts with a scheme of letters, digits, '+', '-' or '.' (for example memory:// or amqp://)".to_string(),
            ));
        }
        // The user-info, address and path end at the first '?' or '#'. A password with an
        // unencoded '?' or '#' would end there too and spill into the query or fragment; an
        // '@' after that point is the sign, and such a URL cannot be split safely.
        let end = rest.find(['?', '#']).unwrap_or(rest.len());
        let (authority_path, tail) = rest.split_at(end);
        if tail.contains('@') {
            return Err(ambiguous_userinfo(&scheme));
        }
        let query = match tail.strip_prefix('?') {
            Some(q) => q.split('#').next().unwrap_or_default(),
            None => "",
        };
        // The user-info ends at the last '@' (so an unencoded '/', ':' or '@' in a password
        // still counts as password, never as address); the user ends at the first ':'.
        let (credentials, address) = match authority_path.rfind('@') {
            Some(at) => {
                let info = &authority_path[..at];
                let (user, pass) = match info.split_once(':') {
                    Some((u, p)) => (u, Some(p)),
                    None => (info, None),
                };
                (
                    Some(Credentials {
                        username: decode_component(user),
                        password: pass.map(|p| Secret::new(decode_component(p))),
                    }),
                    &authority_path[at + 1..],
                )
            }
            None => (None, authority_path),
        };

        let mut partial = PartialOptions::default();
        let mut backend_options = BTreeMap::new();
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            let key = key.into_owned();
            let value = value.into_owned();
            let bad = |e: Error| option_error(&key, &value, e);
            let int = |v: &str| parse_int::<usize>(v, 1..=usize::MAX);
            match key.as_str() {
                "prefix" => partial.prefix = Some(value),
                "capacity" => partial.capacity = Some(int(&value).map_err(bad)?),
                "expiry" => partial.expiry = Some(value.parse().map_err(bad)?),
                "group_expiry" => partial.group_expiry = Some(value.parse().map_err(bad)?),
                "codec" => partial.codec = Some(value.parse().map_err(bad)?),
                "max_message_size" => partial.max_message_size = Some(int(&value).map_err(bad)?),
                _ => {
                    if let Some(pattern) = key.strip_prefix("channel_capacity.") {
                        let cap = int(&value).map_err(bad)?;
                        partial.channel_capacity.push((pattern.to_owned(), cap));
                    } else {
                        backend_options.insert(key, value);
                    }
                }
            }
        }
        let mut options = LayerOptions::default();
        options.apply(partial)?;
        Ok(LayerConfig {
            options,
            backend: BackendConfig {
                scheme,
                credentials,
                address: address.to_owned(),
                options: BackendOptions(backend_options),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_parsed_and_redacted() {
        let cfg = LayerConfig::from_url(
            "amqp://guest:s3cr%40t@127.0.0.1:5672/%2f?prefix=app&heartbeat=10&sasl.password=hunter2",
        )
        .unwrap();
        let c = cfg.backend.credentials.as_ref().unwrap();
        assert_eq!(c.username, "guest");
        assert_eq!(c.password.as_ref().unwrap().expose(), "s3cr@t");
        assert_eq!(cfg.backend.address, "127.0.0.1:5672/%2f");
        assert_eq!(cfg.options.prefix, "app");
        assert_eq!(cfg.backend.options.get("heartbeat"), Some("10"));
        for text in [format!("{cfg}"), format!("{cfg:?}")] {
            assert!(!text.contains("s3cr"), "{text}");
            assert!(!text.contains("hunter2"), "{text}");
        }
        assert_eq!(
            cfg.to_string(),
            "amqp://guest:***@127.0.0.1:5672/%2f?heartbeat=10&sasl.password=***"
        );
    }

    /// Passwords with every character that has a meaning in a URL, unencoded.
    const HOSTILE_PASSWORDS: &[&str] = &[
        "S3cr?Pw5J",
        "Xq#9zLmK",
        "p@ss@W0rdZ",
        "pa/ss/Wq7r",
        "Co:lOn:Kx9",
        "Pe%rc%Ent%2",
        "%41Bz%zzQv",
        "sP aCe Yy8",
        "\u{fc}ml\u{e4}utP\u{e4}\u{df}w\u{f6}rd\u{20ac}",
        "Mx?#@/:%Zz 9\u{fc}",
        "Tr@il?",
        "#Lead1ng",
        "?q=Vv&Ww=7",
        "Amp&Key=Q1",
    ];

    /// URLs around `password` (unencoded) for `scheme`: valid ones and ones that fail in
    /// different places after the user-info.
    fn hostile_urls(scheme: &str, password: &str) -> Vec<String> {
        [
            "127.0.0.1:5672/%2f?prefix=app",
            "127.0.0.1:5672//=",
            "h1:9092,h2:9092",
            "host",
            "",
            "host?capacity=lots",
            "host:notaport/x?password=Other&codec=nope",
            "host/path#frag",
            "[::1]:5672/v?expiry=soon",
        ]
        .iter()
        .map(|rest| format!("{scheme}://guest:{password}@{rest}"))
        .collect()
    }

    /// Asserts that `text` contains neither `password` nor any 4-character run of it, as
    /// written or percent-decoded.
    fn assert_hidden(text: &str, password: &str, url: &str) {
        for form in [password.to_owned(), decode_component(password)] {
            let chars: Vec<char> = form.chars().collect();
            for w in chars.windows(4.min(chars.len())) {
                let w: String = w.iter().collect();
                assert!(
                    !text.contains(&w),
                    "{url}: {w:?} of the password shows in {text}"
                );
            }
        }
    }

    /// Whatever the URL, no part of its password shows in the config or in an error; an
    /// `@` after `?` or `#` is refused with a hint to percent-encode.
    #[test]
    fn hostile_passwords_never_show() {
        let mut accepted = 0;
        let mut refused = 0;
        for scheme in ["amqp", "amqps", "kafka", "zmq", "AMQP"] {
            for password in HOSTILE_PASSWORDS {
                for url in hostile_urls(scheme, password) {
                    match LayerConfig::from_url(&url) {
                        Ok(cfg) => {
                            accepted += 1;
                            assert_hidden(&format!("{cfg} {cfg:?}"), password, &url);
                            let c = cfg.backend.credentials.as_ref().expect("credentials");
                            assert_eq!(c.username, "guest", "{url}");
                            let got = c.password.as_ref().expect("a password").expose();
                            assert_eq!(got, decode_component(password), "{url}");
                            assert!(!cfg.backend.address.contains('@'), "{url}");
                        }
                        Err(e) => {
                            refused += 1;
                            assert!(matches!(e, Error::Config(_)), "{url}: {e:?}");
                            assert_hidden(&format!("{e} {e:?}"), password, &url);
                            if password.contains(['?', '#']) {
                                assert!(e.to_string().contains("percent-encode"), "{url}: {e}");
                            }
                        }
                    }
                }
            }
        }
        assert!(
            accepted > 0 && refused > 0,
            "{accepted} accepted, {refused} refused"
        );
        // The case from the field: a '?' in the password.
        let e = LayerConfig::from_url("amqp://guest:S3cr?Pw5J@127.0.0.1:5672//=").unwrap_err();
        assert!(e.to_string().contains("percent-encode"), "{e}");
        // Passwords with unencoded '/', '@', ':' parse, and the address is right.
        for (url, password, address) in [
            ("amqp://guest:pa/ss@h:1/%2f", "pa/ss", "h:1/%2f"),
            ("amqp://guest:p@ss@h:1/v", "p@ss", "h:1/v"),
            (
                "kafka://guest:a:b/c@d@h1:1,h2:2?prefix=x",
                "a:b/c@d",
                "h1:1,h2:2",
            ),
            ("amqp://guest:%3F%23%40@h", "?#@", "h"),
        ] {
            let cfg = LayerConfig::from_url(url).unwrap();
            assert_eq!(cfg.backend.address, address, "{url}");
            let c = cfg.backend.credentials.unwrap();
            assert_eq!(c.password.unwrap().expose(), password, "{url}");
        }
        // A password where the scheme should be is not echoed either.
        let e = LayerConfig::from_url("guest:Hid3Me@host://x").unwrap_err();
        assert!(
            !e.to_string().contains("Hid3Me") && !e.to_string().contains("hid3me"),
            "{e}"
        );
    }

    #[test]
    fn kafka_host_lists_survive() {
        let cfg =
            LayerConfig::from_url("kafka://h1:9092,h2:9092?kafka.compression.type=lz4").unwrap();
        assert_eq!(cfg.backend.address, "h1:9092,h2:9092");
        assert_eq!(
            cfg.backend.options.get("kafka.compression.type"),
            Some("lz4")
        );
    }

    #[test]
    fn bad_values_are_clear() {
        let e = LayerConfig::from_url("memory://?capacity=lots").unwrap_err();
        assert!(e.to_string().contains("capacity=lots"), "{e}");
        // Which schemes exist is the facade's registry's business; the syntax is checked here.
        assert_eq!(
            LayerConfig::from_url("redis://x").unwrap().backend.scheme,
            "redis"
        );
        let e = LayerConfig::from_url("1redis://x").unwrap_err();
        assert!(e.to_string().contains("scheme"), "{e}");
        let e = LayerConfig::from_url("memory://?capacity=0").unwrap_err();
        assert!(
            e.to_string()
                .contains("too small; use a whole number from 1 to"),
            "{e}"
        );
        let e = LayerConfig::from_url("memory://?expiry=soon").unwrap_err();
        assert!(e.to_string().contains("expiry=soon"), "{e}");
        let e = LayerConfig::from_url("nonsense").unwrap_err();
        assert!(matches!(e, Error::Config(_)));
        let e = LayerConfig::from_url("amqp://u:pw@h?password=abc&capacity=x").unwrap_err();
        assert!(!e.to_string().contains("pw@") && !e.to_string().contains("abc"));
        assert_eq!(
            e.to_string().matches("configuration error").count(),
            1,
            "{e}"
        );
        let cfg = LayerConfig::from_url("amqp://u:pa/ss@w0rd@host:5672/%2f").unwrap();
        assert_eq!(cfg.backend.address, "host:5672/%2f");
        assert_eq!(
            cfg.backend.credentials.unwrap().password.unwrap().expose(),
            "pa/ss@w0rd"
        );
        assert!(LayerConfig::from_url("memory://?expiry=0.0001").is_err());
    }

    /// A whole number too large for an integer option is "too large", with the range, not
    /// "not a whole number"; every integer option of the URL is read this way.
    #[test]
    fn integers_out_of_range_name_the_range() {
        let max = usize::MAX;
        for key in ["capacity", "max_message_size", "channel_capacity.a.*"] {
            let e = LayerConfig::from_url(&format!("memory://?{key}=99999999999999999999999"))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(&format!(
                    "option {key}=99999999999999999999999: too large; use a whole number from 1 to {max}"
                )),
                "{e}"
            );
            assert!(!e.contains("not a whole number"), "{e}");
            for (v, why) in [
                ("0", "too small"),
                ("-3", "too small"),
                ("1.5", "not a whole number"),
                ("", "not a whole number"),
            ] {
                let e = LayerConfig::from_url(&format!("memory://?{key}={v}"))
                    .unwrap_err()
                    .to_string();
                assert!(e.contains(why) && e.contains("from 1 to"), "{key}={v}: {e}");
            }
            let cfg = LayerConfig::from_url(&format!("memory://?{key}={max}")).unwrap();
            assert_eq!(
                cfg.options
                    .capacity_for("a.b")
                    .max(cfg.options.max_message_size),
                max
            );
        }
        assert_eq!(parse_int::<i32>("-1", -1..=i32::MAX).unwrap(), -1);
        assert_eq!(parse_int::<u8>(" +7 ", 0..=u8::MAX).unwrap(), 7);
        let e = parse_int::<i8>("-129", -1..=5).unwrap_err().to_string();
        assert!(
            e.contains("too small; use a whole number from -1 to 5"),
            "{e}"
        );
        let e = parse_int::<i8>("6", -1..=5).unwrap_err().to_string();
        assert!(
            e.contains("too large; use a whole number from -1 to 5"),
            "{e}"
        );
        // A secret-looking option's value is not quoted.
        let mut o = BackendOptions::default();
        o.0.insert("token".into(), "abc".into());
        let e = o.take_int::<u32>("token", 0..=9).unwrap_err().to_string();
        assert!(e.contains("option token=***: not a whole number"), "{e}");
    }

    /// The shared duration check: timeouts are positive and bounded; expiry and
    /// group_expiry are positive; the errors name the option, the value and the range.
    #[test]
    fn duration_bounds() {
        let mut o = BackendOptions::default();
        for (v, want) in [
            ("0", Err("option t=0: must be more than zero; use a duration from 1ms to 24days 20h 31m 23s 647ms")),
            ("0.0004", Err("option t=0.0004: must be more than zero")),
            ("25d", Err("option t=25d: too long; use a duration from 1ms to")),
            ("soon", Err("option t=soon: invalid duration")),
            ("1ms", Ok(Duration::from_millis(1))),
            ("24d", Ok(Duration::from_secs(24 * 86_400))),
        ] {
            o.0.insert("t".into(), v.into());
            match (o.take_timeout("t"), want) {
                (Ok(d), Ok(w)) => assert_eq!(d, Some(w)),
                (Err(e), Err(w)) => assert!(e.to_string().contains(w), "{v}: {e}"),
                (got, w) => panic!("{v}: {got:?}, wanted {w:?}"),
            }
            assert!(o.get("t").is_none(), "taken");
        }
        assert_eq!(o.take_timeout("absent").unwrap(), None);
        o.0.insert("d".into(), "2s".into());
        let e = o
            .take_duration("d", Duration::from_secs(5)..=Duration::from_secs(9))
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("option d=2s: too short; use a duration from 5s to 9s"),
            "{e}"
        );
        for key in ["expiry", "group_expiry"] {
            let e = LayerConfig::from_url(&format!("memory://?{key}=0")).unwrap_err();
            assert!(
                e.to_string().contains(&format!(
                    "option {key}=0s: must be more than zero; use a duration of at least 1ms"
                )),
                "{e}"
            );
        }
    }

    #[test]
    fn durations() {
        assert_eq!(
            "60".parse::<ConfigDuration>().unwrap().0,
            Duration::from_secs(60)
        );
        assert_eq!(
            "0.5".parse::<ConfigDuration>().unwrap().0,
            Duration::from_millis(500)
        );
        assert_eq!(
            "2m".parse::<ConfigDuration>().unwrap().0,
            Duration::from_secs(120)
        );
        assert!("-1".parse::<ConfigDuration>().is_err());
    }

    #[test]
    fn capacity_overrides_first_match_wins() {
        let cfg = LayerConfig::from_url(
            "memory://?channel_capacity.http.*=5&channel_capacity.*=7&capacity=3",
        )
        .unwrap();
        assert_eq!(cfg.options.capacity_for("http.x"), 5);
        assert_eq!(cfg.options.capacity_for("ws.x"), 7);
    }
}
