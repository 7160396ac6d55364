//! [`LayerConfig`] and parsing it from a URL.

use super::*;

/// A whole layer configuration: shared options plus the backend section.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LayerConfig {
    /// Options every backend shares.
    pub options: LayerOptions,
    /// The backend and its own options.
    pub backend: BackendConfig,
}

/// The URL with secrets replaced by `***`, and the shared options that differ from their
/// defaults after the backend's own (`prefix`, `capacity`, `channel_capacity.<glob>`,
/// `expiry`, `group_expiry`, `codec`, `max_message_size`, `max_deliveries`, `dead_letter`,
/// `inspect`): what a log line should show of
/// the configuration a process runs with.
impl std::fmt::Display for LayerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (o, d) = (&self.options, LayerOptions::default());
        let pick = |differs: bool, kv: String| differs.then_some(kv);
        let first = [
            pick(o.prefix != d.prefix, format!("prefix={}", o.prefix)),
            pick(o.capacity != d.capacity, format!("capacity={}", o.capacity)),
        ];
        let overrides = (o.channel_capacity.iter())
            .map(|c| Some(format!("channel_capacity.{}={}", c.pattern, c.capacity)));
        let rest = [
            pick(
                o.expiry != d.expiry,
                format!("expiry={}ms", o.expiry.as_millis()),
            ),
            pick(
                o.group_expiry != d.group_expiry,
                format!("group_expiry={}ms", o.group_expiry.as_millis()),
            ),
            pick(o.codec != d.codec, format!("codec={}", o.codec.name())),
            pick(
                o.max_message_size != d.max_message_size,
                format!("max_message_size={}", o.max_message_size),
            ),
            o.max_deliveries.map(|n| format!("max_deliveries={n}")),
            o.dead_letter.as_ref().map(|c| format!("dead_letter={c}")),
            pick(o.inspect != d.inspect, format!("inspect={}", o.inspect)),
        ];
        let shared: Vec<String> = first
            .into_iter()
            .chain(overrides)
            .chain(rest)
            .flatten()
            .collect();
        let url = self.backend.redacted_url();
        if shared.is_empty() {
            return f.write_str(&url);
        }
        let join = if url.contains('?') { '&' } else { '?' };
        write!(f, "{url}{join}{}", shared.join("&"))
    }
}

pub(super) fn decode_component(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// `true` if `s` is a URL scheme as RFC 3986 spells one: a letter, then letters, digits,
/// `+`, `-`, `.`. Anything else before `://` is not echoed in errors (it may be a password).
pub fn is_scheme(s: &str) -> bool {
    let mut bytes = s.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_alphabetic())
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
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
        // Which schemes exist is the facade's registry's business; here only the syntax.
        let scheme = scheme.to_ascii_lowercase();
        // The user-info, address and path end at the first '?' or '#'. A password with an
        // unencoded '?' or '#' would end there too and spill into the query or fragment; an
        // '@' after that point is the sign, and such a URL cannot be split safely.
        let end = rest.find(['?', '#']).unwrap_or(rest.len());
        let (authority_path, tail) = rest.split_at(end);
        if tail.contains('@') {
            // Not quoted: the part in doubt may be a password.
            return Err(Error::Config(format!(
                "this {scheme}:// URL has an '@' after a '?' or '#', so where its user-info (user:password@) \
                 ends and its query or fragment begins is ambiguous; the URL is refused and not shown, since \
                 it may hold a password; percent-encode reserved characters in a password \
                 (? as %3F, # as %23, @ as %40, % as %25) and an '@' in an option value as %40"
            )));
        }
        let query = tail.split('#').next().unwrap_or_default();
        let query = query.strip_prefix('?').unwrap_or_default();
        // The user-info ends at the last '@' (so an unencoded '/', ':' or '@' in a password
        // still counts as password, never as address); the user ends at the first ':'.
        let (credentials, address) = match authority_path.rsplit_once('@') {
            Some((info, address)) => {
                let (user, pass) =
                    (info.split_once(':')).map_or((info, None), |(u, p)| (u, Some(p)));
                let username = decode_component(user);
                let password = pass.map(|p| Secret::new(decode_component(p)));
                (Some(Credentials { username, password }), address)
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
                "max_deliveries" => {
                    partial.max_deliveries =
                        Some(parse_int::<u32>(&value, 1..=u32::MAX).map_err(bad)?)
                }
                "dead_letter" => partial.dead_letter = Some(value),
                "inspect" => {
                    let use_bool = |_| bad(Error::Config("use true or false".to_string()));
                    partial.inspect = Some(value.parse().map_err(use_bool)?);
                }
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

/// One broker of a URL's list of brokers (see [`hosts`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPort {
    /// Host name or IP address (an IPv6 address without brackets).
    pub host: String,
    /// The port (the backend's default where the URL gives none).
    pub port: u16,
}

/// `host:port`, an IPv6 address in brackets (`[::1]:5672`).
impl std::fmt::Display for HostPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.host.contains(':') {
            true => write!(f, "[{}]:{}", self.host, self.port),
            false => write!(f, "{}:{}", self.host, self.port),
        }
    }
}

/// Reads a URL's list of brokers, `HOST[:PORT][,HOST[:PORT]...]` with an IPv6 host in
/// brackets (`[::1]:5672`): the brokers in order, `default_port` where one gives no port,
/// `127.0.0.1` when the list is empty; hosts are percent-decoded. The one reader of every
/// backend's broker list: an empty entry, an IPv6 host without its `]` and a port outside
/// 1-65535 are errors that say which.
///
/// ```
/// use chanlayer_core::config::hosts;
/// let h = hosts("a:1,b,[::1]:3", 9092).unwrap();
/// assert_eq!(h.iter().map(|h| h.to_string()).collect::<Vec<_>>(), ["a:1", "b:9092", "[::1]:3"]);
/// assert_eq!(hosts("", 5672).unwrap()[0].to_string(), "127.0.0.1:5672");
/// assert!(hosts("a,,b", 1).unwrap_err().to_string().contains("an empty broker address"));
/// assert!(hosts("a:0", 1).unwrap_err().to_string().contains("not a port number (1-65535)"));
/// ```
pub fn hosts(list: &str, default_port: u16) -> Result<Vec<HostPort>> {
    if list.is_empty() {
        return Ok(vec![HostPort {
            host: "127.0.0.1".to_owned(),
            port: default_port,
        }]);
    }
    let bad = |m: String| Error::Config(m);
    let one = |one: &str| {
        let one = one.trim();
        if one.is_empty() {
            return Err(bad(format!(
                "{list:?}: an empty broker address in the list; separate host:port pairs with single commas"
            )));
        }
        let (host, port) = match one.strip_prefix('[') {
            Some(rest) => match rest.split_once(']') {
                Some((h, after)) => (h, after.strip_prefix(':')),
                None => return Err(bad(format!("{one:?}: an IPv6 address needs a closing ']'"))),
            },
            None => (one.rsplit_once(':')).map_or((one, None), |(h, p)| (h, Some(p))),
        };
        let port =
            match port {
                None | Some("") => default_port,
                Some(p) => p.parse().ok().filter(|p| *p > 0).ok_or_else(|| {
                    bad(format!("{p:?} is not a port number (1-65535) in {one:?}"))
                })?,
            };
        let host = percent_encoding::percent_decode_str(host).decode_utf8_lossy();
        Ok(HostPort {
            host: host.into_owned(),
            port,
        })
    };
    list.split(',').map(one).collect()
}
