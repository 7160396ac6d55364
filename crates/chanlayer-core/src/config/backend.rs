//! The backend section of a configuration: address, credentials (with [`Secret`]
//! passwords), and the backend's own options.

use super::*;

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
        self.take_with(key, |v| {
            v.parse().map_err(|e: T::Err| {
                let why = e.to_string();
                let why = why.strip_prefix("configuration error: ").unwrap_or(&why);
                Error::Config(why.to_owned())
            })
        })
    }

    /// Removes `key` and reads its value with `read`; its error becomes that of the option
    /// ([`option_error`]: named, the value shown unless secret).
    fn take_with<T>(
        &mut self,
        key: &str,
        read: impl FnOnce(&str) -> Result<T>,
    ) -> Result<Option<T>> {
        let Some(v) = self.0.remove(key) else {
            return Ok(None);
        };
        read(&v).map(Some).map_err(|e| option_error(key, &v, e))
    }

    /// Parses ([`ConfigDuration`]) and removes the duration option `key`, which must lie in
    /// `range` (see [`check_duration`]); the error names the option and the range.
    pub fn take_duration(
        &mut self,
        key: &str,
        range: std::ops::RangeInclusive<Duration>,
    ) -> Result<Option<Duration>> {
        self.take_with(key, |v| {
            let ConfigDuration(d) = v.parse()?;
            duration_outside(d, &range).map_or(Ok(d), |why| Err(Error::Config(why)))
        })
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
        self.take_with(key, |v| parse_int(v, range))
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
    /// The URL's scheme if it is one of `schemes` (backend `backend`'s own); otherwise a
    /// [`Error::Config`] saying which URLs the backend takes.
    ///
    /// ```
    /// let c = chanlayer_core::LayerConfig::from_url("amqps://h").unwrap();
    /// assert_eq!(c.backend.scheme_of("amqp", &["amqp", "amqps"]).unwrap(), "amqps");
    /// let e = c.backend.scheme_of("kafka", &["kafka"]).unwrap_err().to_string();
    /// assert!(e.contains("the kafka backend takes kafka:// URLs, not amqps://"), "{e}");
    /// ```
    pub fn scheme_of(&self, backend: &str, schemes: &[&str]) -> Result<&str> {
        if schemes.contains(&self.scheme.as_str()) {
            return Ok(&self.scheme);
        }
        let takes: Vec<String> = schemes.iter().map(|s| format!("{s}://")).collect();
        Err(Error::Config(format!(
            "the {backend} backend takes {} URLs, not {}://",
            takes.join(" or "),
            self.scheme
        )))
    }

    /// The URL with the password and secret options replaced by `***`.
    pub fn redacted_url(&self) -> String {
        let user = match &self.credentials {
            Some(c) if c.password.is_some() => format!("{}:***@", c.username),
            Some(c) => format!("{}@", c.username),
            None => String::new(),
        };
        let query: Vec<String> = (self.options.0.iter())
            .map(|(k, v)| format!("{k}={}", if is_secret_key(k) { "***" } else { v }))
            .collect();
        let mark = if query.is_empty() { "" } else { "?" };
        let query = query.join("&");
        format!("{}://{user}{}{mark}{query}", self.scheme, self.address)
    }
}
