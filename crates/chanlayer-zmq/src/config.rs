//! `zmq://` URLs: the mode and its endpoints, socket settings, retention, CURVE, and
//! pass-through socket options.
//!
//! ```text
//! zmq://HOST:PORT[?OPTIONS]                      embedded mode on tcp://HOST:PORT
//! zmq://HOST[?OPTIONS]                           embedded mode on tcp://HOST:5556
//! zmq://[::1]:5556                               IPv6 (ipv6 is switched on)
//! zmq://tcp://HOST:PORT[?OPTIONS]                embedded mode, endpoint spelled out
//! zmq://ipc:///run/app/chanlayer.sock            embedded mode on a Unix socket
//! zmq://?pull=ENDPOINT&pub=ENDPOINT[&OPTIONS]    dedicated mode: a proxy's PULL and PUB
//! zmq://HOST?mode=dedicated                      dedicated mode on tcp://HOST:5557 (pull)
//!                                                and tcp://HOST:5558 (pub), the proxy's defaults
//! zmq://                                         embedded mode on tcp://127.0.0.1:5556
//! ```
//!
//! `ENDPOINT` is a libzmq endpoint: `tcp://HOST:PORT` or `ipc://PATH`. In a URL, `?`, `&`,
//! `#` and `%` inside an endpoint must be percent-encoded.
//!
//! Every option, its default and its meaning: `docs/backends/zmq.md` ("URL and options").

use std::time::Duration;

use chanlayer_core::config::BackendSettings;
use chanlayer_core::config::{BackendOptions, ConfigDuration, MAX_TIMEOUT, MIN_TIMEOUT};
use chanlayer_core::{Error, LayerConfig, Result};

use crate::bridge::{zmq_err, CONTEXT};
use crate::retention::Retention;
use crate::BACKEND;

/// The options only this backend reads, for the "unknown option" error.
const OPTIONS: &str = "mode, pull, pub, bind, sndhwm, rcvhwm, send_queue, subscribe_timeout, connect_timeout, reconnect_interval, reconnect_interval_max, linger, close_linger, retain, retain_for, retain_bytes, ipv6, curve_serverkey, curve_publickey, curve_secretkey, curve_server_secretkey, zmq.<socket option>";

/// The libzmq socket options `zmq.<option>=<integer>` passes through to every socket, each
/// with its setter: libzmq takes an int for every one but `maxmsgsize` (an int64).
const SOCKET_OPTIONS: [(&str, SetOption); 15] = [
    ("backlog", |s, v| s.set_backlog(int(v)?)),
    ("connect_timeout", |s, v| s.set_connect_timeout(int(v)?)),
    ("handshake_ivl", |s, v| s.set_handshake_ivl(int(v)?)),
    ("heartbeat_ivl", |s, v| s.set_heartbeat_ivl(int(v)?)),
    ("heartbeat_timeout", |s, v| s.set_heartbeat_timeout(int(v)?)),
    ("heartbeat_ttl", |s, v| s.set_heartbeat_ttl(int(v)?)),
    ("immediate", |s, v| s.set_immediate(v != 0)),
    ("maxmsgsize", |s, v| s.set_maxmsgsize(v)),
    ("rcvbuf", |s, v| s.set_rcvbuf(int(v)?)),
    ("sndbuf", |s, v| s.set_sndbuf(int(v)?)),
    ("tcp_keepalive", |s, v| s.set_tcp_keepalive(int(v)?)),
    ("tcp_keepalive_cnt", |s, v| s.set_tcp_keepalive_cnt(int(v)?)),
    ("tcp_keepalive_idle", |s, v| {
        s.set_tcp_keepalive_idle(int(v)?)
    }),
    ("tcp_keepalive_intvl", |s, v| {
        s.set_tcp_keepalive_intvl(int(v)?)
    }),
    ("tos", |s, v| s.set_tos(int(v)?)),
];

type SetOption = fn(&zmq::Socket, i64) -> zmq::Result<()>;

/// A socket option's value as libzmq's int (out of range: `EINVAL`).
fn int(v: i64) -> zmq::Result<i32> {
    i32::try_from(v).map_err(|_| zmq::Error::EINVAL)
}

/// The default port of embedded mode.
pub const DEFAULT_PORT: u16 = 5556;
/// The default port of the proxy's PULL socket (`chanlayer zmq-proxy --pull`).
pub const DEFAULT_PULL_PORT: u16 = 5557;
/// The default port of the proxy's PUB socket (`chanlayer zmq-proxy --pub`).
pub const DEFAULT_PUB_PORT: u16 = 5558;

/// Which topology a layer uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// One process per address binds the publisher (XPUB); every instance connects a SUB.
    Embedded {
        /// The endpoint the publisher binds and the subscribers connect to.
        endpoint: String,
    },
    /// Senders PUSH to a proxy's PULL; the proxy republishes on its PUB (XPUB).
    Dedicated {
        /// The proxy's PULL endpoint.
        pull: String,
        /// The proxy's PUB endpoint.
        publish: String,
    },
}

/// When an embedded-mode instance binds the publisher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindPolicy {
    /// On the first send (the default).
    Lazy,
    /// At connect: an address taken by another process fails `connect`.
    Eager,
    /// Never: a receive-only instance; `send` and `group_send` are `Unsupported`.
    Never,
}

impl std::str::FromStr for BindPolicy {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "lazy" => Ok(BindPolicy::Lazy),
            "eager" => Ok(BindPolicy::Eager),
            "never" => Ok(BindPolicy::Never),
            _ => Err(Error::Config(
                "use lazy (bind on the first send), eager (bind at connect) or never (receive only)"
                    .into(),
            )),
        }
    }
}

/// A libzmq socket option passed through with `zmq.<name>=<value>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketOption {
    /// The option's name (`backlog`, `sndbuf`, ...; see `docs/backends/zmq.md`).
    pub name: String,
    /// Its value.
    pub value: i64,
}

/// CURVE keys (32 bytes each). `Debug` shows only which keys are set.
#[derive(Clone, PartialEq, Eq)]
pub struct CurveKeys {
    /// The public key of the publisher (embedded) or the proxy (dedicated).
    pub server_public: [u8; 32],
    /// This instance's public key.
    pub public: [u8; 32],
    /// This instance's secret key.
    pub secret: [u8; 32],
    /// Embedded mode: the publisher's secret key, for the process that binds.
    pub server_secret: Option<[u8; 32]>,
}

impl std::fmt::Debug for CurveKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let server_secret = self.server_secret.map_or("<unset>", |_| "***");
        write!(f, "CurveKeys {{ server_public: <set>, public: <set>, secret: ***, server_secret: {server_secret} }}")
    }
}

/// The ZeroMQ backend's settings, parsed from a [`LayerConfig`].
#[derive(Debug, Clone, PartialEq)]
pub struct ZmqConfig {
    /// Embedded or dedicated, with the endpoints.
    pub mode: Mode,
    /// When an embedded-mode instance binds the publisher.
    pub bind: BindPolicy,
    /// CURVE keys, when CURVE is on (the publisher that binds is the CURVE server).
    pub curve: Option<CurveKeys>,
    /// ZMQ_SNDHWM of sending sockets.
    pub sndhwm: i32,
    /// ZMQ_RCVHWM of the SUB socket.
    pub rcvhwm: i32,
    /// Messages queued for a socket thread before `send` is `ChannelFull`.
    pub send_queue: usize,
    /// How long `group_add` waits for its subscription to be confirmed.
    pub subscribe_timeout: Duration,
    /// How long `connect` waits for the publisher or proxy.
    pub connect_timeout: Duration,
    /// ZMQ_RECONNECT_IVL.
    pub reconnect_interval: Duration,
    /// ZMQ_RECONNECT_IVL_MAX.
    pub reconnect_interval_max: Duration,
    /// ZMQ_LINGER.
    pub linger: Duration,
    /// How long closing the sending side waits for what it accepted to get out: the
    /// embedded publisher, for subscribers to take the retained messages none has had yet
    /// (a receiver still connecting); the dedicated sender, for the PUSH socket to take its
    /// queue (a proxy that is away). What is left then is counted and logged.
    pub close_linger: Duration,
    /// Retention of the embedded publisher (the proxy has its own flags).
    pub retention: Retention,
    /// ZMQ_IPV6.
    pub ipv6: bool,
    /// `zmq.<option>` pass-through.
    pub socket_options: Vec<SocketOption>,
}

/// Checks a libzmq endpoint: `tcp://HOST:PORT` (PORT may be `*` or `0` when `bind_any` is
/// set, for a listener on a free port) or `ipc://PATH`.
pub fn check_endpoint(endpoint: &str, bind_any: bool) -> Result<()> {
    let why = match (
        endpoint.strip_prefix("tcp://"),
        endpoint.strip_prefix("ipc://"),
    ) {
        (Some(rest), _) => match rest.rsplit_once(':') {
            None => "no port",
            Some(("", _)) => "no host",
            Some((host, _)) if host.starts_with('[') != host.ends_with(']') => {
                "an IPv6 host goes in brackets, [::1]"
            }
            Some((_, "*" | "0")) if bind_any => return Ok(()),
            Some((_, port)) if port.parse::<u16>().is_ok_and(|p| p > 0) => return Ok(()),
            Some(_) => "the port is not a number from 1 to 65535",
        },
        (None, Some("")) => "no path",
        (None, Some(_)) => return Ok(()),
        (None, None) => "unsupported transport",
    };
    Err(Error::Config(format!(
        "endpoint {endpoint:?}: {why}; use tcp://HOST:PORT or ipc://PATH"
    )))
}

fn tcp_endpoint(host_port: &str, default_port: u16) -> Result<String> {
    let bad = |why: String| Err(Error::Config(format!("address {host_port:?}: {why}")));
    let (host, port) = match host_port.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            None => return bad("an IPv6 host needs a closing ']'".into()),
            Some((h, "")) => (format!("[{h}]"), None),
            Some((h, after)) => match after.strip_prefix(':') {
                Some(p) => (format!("[{h}]"), Some(p)),
                None => return bad("expected HOST:PORT".into()),
            },
        },
        None => match host_port.rsplit_once(':') {
            Some((h, p)) => (h.to_owned(), Some(p)),
            None => (host_port.to_owned(), None),
        },
    };
    if host.is_empty() || host.contains([',', '/', '@']) {
        return bad("expected HOST:PORT (one host)".into());
    }
    match port.map(|p| (p, p.parse::<u16>())) {
        None => Ok(format!("tcp://{host}:{default_port}")),
        Some((_, Ok(p))) if p > 0 => Ok(format!("tcp://{host}:{p}")),
        Some((p, _)) => bad(format!("the port {p:?} is not a number from 1 to 65535")),
    }
}

fn z85_key(name: &str, value: &str) -> Result<[u8; 32]> {
    decode_z85_key(value).ok_or_else(|| {
        Error::Config(format!(
            "option {name}: not a Z85 CURVE key (40 characters, 32 bytes, as zmq_curve_keypair prints)"
        ))
    })
}

/// Decodes a Z85 CURVE key (40 characters) into its 32 bytes.
pub fn decode_z85_key(z85: &str) -> Option<[u8; 32]> {
    zmq::z85_decode(z85).ok()?.try_into().ok()
}

/// `true` if this build of libzmq can do CURVE.
pub fn curve_available() -> bool {
    zmq::has("curve").unwrap_or(false)
}

/// The error for CURVE options on a libzmq without CURVE.
pub(crate) fn curve_missing() -> Error {
    Error::Config(
        "CURVE options were given, but this build of libzmq has no CURVE support (zmq::has(\"curve\") is false: the bundled libzmq of the zmq crate is built without libsodium); use a libzmq built with libsodium, or leave out the curve_* options"
            .into(),
    )
}

impl BackendSettings for ZmqConfig {
    const SCHEMES: &'static [&'static str] = &[BACKEND];
    const OPTIONS: &'static str = OPTIONS;

    /// Reads the ZeroMQ settings of `config` (scheme `zmq`).
    fn read(config: &LayerConfig, o: &mut BackendOptions) -> Result<ZmqConfig> {
        let b = &config.backend;
        if b.credentials.is_some() {
            return Err(Error::Config(
                "zmq:// URLs take no user or password; secure a ZeroMQ layer with CURVE keys (curve_serverkey, ...)".into(),
            ));
        }
        let address = percent_encoding::percent_decode_str(&b.address)
            .decode_utf8_lossy()
            .into_owned();
        let mode = match (o.take("mode").as_deref(), o.take("pull"), o.take("pub")) {
            (Some("embedded"), Some(_), _) | (Some("embedded"), _, Some(_)) => Err(Error::Config(
                "mode=embedded takes no pull= or pub= (those are the proxy's endpoints in dedicated mode)".into(),
            )),
            (Some("embedded") | None, None, None) => Ok(Mode::Embedded {
                endpoint: if address.is_empty() {
                    format!("tcp://127.0.0.1:{DEFAULT_PORT}")
                } else if address.contains("://") {
                    check_endpoint(&address, false)?;
                    address.clone()
                } else {
                    tcp_endpoint(&address, DEFAULT_PORT)?
                },
            }),
            (Some("dedicated") | None, Some(pull), Some(publish)) => {
                if !address.is_empty() {
                    return Err(Error::Config(format!(
                        "give either an address ({address:?}) or pull= and pub=, not both"
                    )));
                }
                for (key, endpoint) in [("pull", &pull), ("pub", &publish)] {
                    if let Err(Error::Config(why)) = check_endpoint(endpoint, false) {
                        return Err(Error::Config(format!("option {key}: {why}")));
                    }
                }
                Ok(Mode::Dedicated { pull, publish })
            }
            (Some("dedicated") | None, Some(_), None) | (Some("dedicated") | None, None, Some(_)) => Err(Error::Config(
                "dedicated mode needs both pull= (the proxy's PULL endpoint) and pub= (its PUB endpoint)".into(),
            )),
            (Some("dedicated"), None, None) => {
                let has_port = (address.contains(':') && !address.starts_with('['))
                    || address.contains("]:");
                if address.contains("://") || has_port {
                    return Err(Error::Config(format!(
                        "mode=dedicated with address {address:?}: give a host only (the proxy's default ports {DEFAULT_PULL_PORT} and {DEFAULT_PUB_PORT} are used) or pull= and pub="
                    )));
                }
                let host = if address.is_empty() { "127.0.0.1" } else { &address };
                Ok(Mode::Dedicated {
                    pull: tcp_endpoint(host, DEFAULT_PULL_PORT)?,
                    publish: tcp_endpoint(host, DEFAULT_PUB_PORT)?,
                })
            }
            (Some(other), _, _) => Err(Error::Config(format!(
                "option mode={other}: use embedded or dedicated"
            ))),
        }?;
        let ipv6_default = match &mode {
            Mode::Embedded { endpoint } => endpoint.starts_with("tcp://["),
            Mode::Dedicated { pull, publish } => {
                pull.starts_with("tcp://[") || publish.starts_with("tcp://[")
            }
        };
        let curve = curve_keys(o)?;
        let mut socket_options = Vec::new();
        for k in o.0.clone().into_keys().filter(|k| k.starts_with("zmq.")) {
            let name = k["zmq.".len()..].to_owned();
            if !SOCKET_OPTIONS.iter().any(|(n, _)| *n == name) {
                return Err(Error::Config(format!(
                    "option {k}: unknown socket option; zmq.<option> takes one of {}",
                    SOCKET_OPTIONS.map(|(n, _)| n).join(", ")
                )));
            }
            // libzmq takes an int for every option but maxmsgsize (int64).
            let range = match name.as_str() {
                "maxmsgsize" => -1..=i64::MAX,
                _ => i32::MIN.into()..=i32::MAX.into(),
            };
            let value = o.take_int(&k, range)?.unwrap_or_default();
            socket_options.push(SocketOption { name, value });
        }
        let (s, ms, zero) = (Duration::from_secs, Duration::from_millis, Duration::ZERO);
        let d = Retention::default();
        Ok(ZmqConfig {
            mode,
            subscribe_timeout: dur(o, "subscribe_timeout", MIN_TIMEOUT, s(5))?,
            connect_timeout: dur(o, "connect_timeout", MIN_TIMEOUT, s(5))?,
            reconnect_interval: dur(o, "reconnect_interval", MIN_TIMEOUT, ms(100))?,
            reconnect_interval_max: dur(o, "reconnect_interval_max", zero, zero)?,
            linger: dur(o, "linger", zero, s(1))?,
            close_linger: dur(o, "close_linger", zero, s(2))?,
            bind: o.take_parsed("bind")?.unwrap_or(BindPolicy::Lazy),
            sndhwm: o.take_int("sndhwm", 0..=i32::MAX)?.unwrap_or(10_000),
            rcvhwm: o.take_int("rcvhwm", 0..=i32::MAX)?.unwrap_or(10_000),
            send_queue: o.take_int("send_queue", 1..=usize::MAX)?.unwrap_or(10_000),
            retention: Retention {
                per_topic: o.take_int("retain", 0..=usize::MAX)?.unwrap_or(d.per_topic),
                max_age: o
                    .take_parsed("retain_for")?
                    .map_or(d.max_age, |c: ConfigDuration| c.0),
                max_bytes: o
                    .take_int("retain_bytes", 0..=usize::MAX)?
                    .unwrap_or(d.max_bytes),
            },
            ipv6: o.take_parsed("ipv6")?.unwrap_or(ipv6_default),
            curve,
            socket_options,
        })
    }

    fn check(&self) -> Result<()> {
        let embedded = matches!(self.mode, Mode::Embedded { .. });
        let why = if !embedded && self.bind != BindPolicy::Lazy {
            "option bind is for embedded mode; in dedicated mode the proxy binds"
        } else if embedded
            && self.bind != BindPolicy::Never
            && self
                .curve
                .as_ref()
                .is_some_and(|c| c.server_secret.is_none())
        {
            "CURVE in embedded mode: the publishing process needs curve_server_secretkey (or bind=never for a receive-only instance)"
        } else {
            return Ok(());
        };
        Err(Error::Config(why.into()))
    }
}

impl ZmqConfig {
    /// A socket of this layer (SUB, PUSH, the embedded XPUB) with every setting it gets:
    /// reconnection, linger (0 for a SUB, which holds nothing worth waiting for), IPv6, the
    /// high-water mark of its direction, the pass-through options, and CURVE (the server
    /// side for the XPUB, the client side otherwise).
    pub(crate) fn socket(&self, kind: zmq::SocketType) -> Result<zmq::Socket> {
        let s = CONTEXT
            .socket(kind)
            .map_err(|e| zmq_err(format!("could not create the {kind:?} socket"), e))?;
        let ms = |d: Duration| i32::try_from(d.as_millis()).unwrap_or(i32::MAX);
        let opt = |what: &'static str| {
            move |err: zmq::Error| Error::Config(format!("socket option {what}: {err}"))
        };
        let linger = if kind == zmq::SUB { 0 } else { ms(self.linger) };
        s.set_linger(linger).map_err(opt("linger"))?;
        s.set_reconnect_ivl(ms(self.reconnect_interval))
            .map_err(opt("reconnect_interval"))?;
        s.set_reconnect_ivl_max(ms(self.reconnect_interval_max))
            .map_err(opt("reconnect_interval_max"))?;
        s.set_ipv6(self.ipv6).map_err(opt("ipv6"))?;
        for SocketOption { name, value } in &self.socket_options {
            let Some((_, set)) = SOCKET_OPTIONS.iter().find(|(n, _)| n == name) else {
                return Err(Error::Config(format!(
                    "option zmq.{name}: unknown socket option"
                )));
            };
            set(&s, *value)
                .map_err(|e| Error::Config(format!("option zmq.{name}={value}: {e}")))?;
        }
        let (hwm, set) = match kind {
            zmq::SUB => ("rcvhwm", s.set_rcvhwm(self.rcvhwm)),
            _ => ("sndhwm", s.set_sndhwm(self.sndhwm)),
        };
        set.map_err(|e| zmq_err(format!("could not set {hwm}"), e))?;
        let Some(c) = &self.curve else {
            return Ok(s);
        };
        if kind == zmq::XPUB {
            let Some(secret) = &c.server_secret else {
                return Err(Error::Config(
                    "CURVE: this instance would bind the publisher but has no curve_server_secretkey".into(),
                ));
            };
            s.set_curve_server(true)
                .and_then(|()| s.set_curve_secretkey(secret))
                .map_err(|e| Error::Config(format!("CURVE server key: {e}")))?;
        } else {
            s.set_curve_serverkey(&c.server_public)
                .and_then(|()| s.set_curve_publickey(&c.public))
                .and_then(|()| s.set_curve_secretkey(&c.secret))
                .map_err(|e| Error::Config(format!("CURVE client keys: {e}")))?;
        }
        Ok(s)
    }

    /// The endpoint subscribers connect to.
    pub fn subscribe_endpoint(&self) -> &str {
        match &self.mode {
            Mode::Embedded { endpoint } => endpoint,
            Mode::Dedicated { publish, .. } => publish,
        }
    }
}

/// The duration option `key`: from `least` to MAX_TIMEOUT (ZMQ_RECONNECT_IVL, _MAX and
/// ZMQ_LINGER are C ints of milliseconds), `or` when not given.
fn dur(o: &mut BackendOptions, key: &str, least: Duration, or: Duration) -> Result<Duration> {
    Ok(o.take_duration(key, least..=MAX_TIMEOUT)?.unwrap_or(or))
}

fn curve_keys(o: &mut BackendOptions) -> Result<Option<CurveKeys>> {
    let keys = [
        "curve_serverkey",
        "curve_publickey",
        "curve_secretkey",
        "curve_server_secretkey",
    ];
    let [server, public, secret, server_secret] = keys.map(|k| o.take(k));
    if server.is_none() && public.is_none() && secret.is_none() && server_secret.is_none() {
        return Ok(None);
    }
    if !curve_available() {
        return Err(curve_missing());
    }
    let Some(server) = server else {
        return Err(Error::Config(
            "CURVE needs curve_serverkey (the publisher's or proxy's public key)".into(),
        ));
    };
    let server_public = z85_key("curve_serverkey", &server)?;
    let (public, secret) =
        match (public, secret) {
            (Some(p), Some(s)) => (
                z85_key("curve_publickey", &p)?,
                z85_key("curve_secretkey", &s)?,
            ),
            (None, None) => {
                let pair = zmq::CurveKeyPair::new()
                    .map_err(|e| Error::backend(BACKEND, "could not make a CURVE key pair", e))?;
                (pair.public_key, pair.secret_key)
            }
            _ => return Err(Error::Config(
                "give both curve_publickey and curve_secretkey, or neither (a fresh pair is made)"
                    .into(),
            )),
        };
    let server_secret = server_secret
        .map(|s| z85_key("curve_server_secretkey", &s))
        .transpose()?;
    Ok(Some(CurveKeys {
        server_public,
        public,
        secret,
        server_secret,
    }))
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
