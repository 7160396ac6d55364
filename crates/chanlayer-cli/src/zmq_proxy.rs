//! `chanlayer zmq-proxy`: the proxy of the ZeroMQ backend's dedicated mode, as a daemon.

use std::time::Duration;

use chanlayer_core::config::ConfigDuration;
use chanlayer_core::{Error, Result};
use chanlayer_zmq::{HubStats, Proxy, ProxyConfig, Retention};

/// Arguments of `chanlayer zmq-proxy`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where senders connect their PUSH sockets (tcp://HOST:PORT or ipc://PATH).
    #[arg(long, value_name = "ENDPOINT", default_value = "tcp://127.0.0.1:5557")]
    pub pull: String,
    /// Where subscribers connect their SUB sockets (tcp://HOST:PORT or ipc://PATH).
    #[arg(
        long = "pub",
        value_name = "ENDPOINT",
        default_value = "tcp://127.0.0.1:5558"
    )]
    pub publish: String,
    /// Messages kept per normal channel (and per unsubscribed inbox) for late joiners; 0
    /// keeps none.
    #[arg(long, value_name = "N", default_value_t = Retention::default().per_topic)]
    pub retain: usize,
    /// How long kept messages are kept (60, 0.5, 500ms, 2m).
    #[arg(long, value_name = "DURATION", default_value = "60s")]
    pub retain_for: ConfigDuration,
    /// Bytes kept in all; the oldest go first.
    #[arg(long, value_name = "BYTES", default_value_t = Retention::default().max_bytes)]
    pub retain_bytes: usize,
    /// ZMQ_SNDHWM of the PUB socket: messages queued per subscriber before PUB/SUB drops
    /// for that subscriber (receivers count such drops).
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    pub sndhwm: i32,
    /// ZMQ_RCVHWM of the PULL socket: messages queued from senders before they are held
    /// back (their sends then end in ChannelFull).
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    pub rcvhwm: i32,
    /// Print the counters this often (they are always printed at exit and on SIGUSR1).
    #[arg(long, value_name = "DURATION")]
    pub stats_interval: Option<ConfigDuration>,
    /// CURVE: a file holding the proxy's Z85 secret key (clients need the matching public
    /// key as curve_serverkey). Needs a libzmq with CURVE.
    #[arg(long, value_name = "PATH")]
    pub curve_secret_key_file: Option<std::path::PathBuf>,
}

impl Args {
    /// The proxy's settings (checks the endpoints and reads the key file).
    pub fn proxy_config(&self) -> Result<ProxyConfig> {
        chanlayer_zmq::check_endpoint(&self.pull, true)
            .map_err(|e| Error::Config(format!("--pull: {e}")))?;
        chanlayer_zmq::check_endpoint(&self.publish, true)
            .map_err(|e| Error::Config(format!("--pub: {e}")))?;
        let mut config = ProxyConfig::new(&self.pull, &self.publish);
        config.retention = Retention {
            per_topic: self.retain,
            max_age: self.retain_for.0,
            max_bytes: self.retain_bytes,
        };
        config.sndhwm = self.sndhwm;
        config.rcvhwm = self.rcvhwm;
        if let Some(path) = &self.curve_secret_key_file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                Error::Config(format!("--curve-secret-key-file {}: {e}", path.display()))
            })?;
            let key = zmq_key(text.trim()).map_err(|why| {
                Error::Config(format!("--curve-secret-key-file {}: {why}", path.display()))
            })?;
            config.curve_secret_key = Some(key);
        }
        Ok(config)
    }
}

fn zmq_key(z85: &str) -> std::result::Result<[u8; 32], String> {
    if z85.len() != 40 {
        return Err("a CURVE key is 40 Z85 characters".into());
    }
    chanlayer_zmq::decode_z85_key(z85).ok_or_else(|| "not a Z85 key".to_owned())
}

/// One line with every counter, as the proxy prints them.
pub fn counters_line(s: &HubStats) -> String {
    format!(
        "forwarded={} dropped={} received={} undecodable={} flushed={} replayed={} batches={} batched={} retained={} retained_bytes={} pending={} abandoned={}",
        s.forwarded, s.dropped, s.received, s.undecodable, s.flushed, s.replayed, s.batches, s.batched, s.retained, s.retained_bytes, s.pending, s.abandoned
    )
}

fn say(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    // A closed stdout (the parent went away) is no reason to stop proxying.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Runs the proxy until SIGINT or SIGTERM.
pub fn run(args: Args) -> Result<()> {
    let config = args.proxy_config()?;
    let proxy = Proxy::spawn(config)?;
    say(&format!(
        "chanlayer zmq-proxy: listening pull={} pub={}",
        proxy.pull_endpoint(),
        proxy.pub_endpoint()
    ));
    // Signals through a small current-thread tokio runtime (tokio::signal): one select over
    // SIGINT, SIGTERM, SIGUSR1 and the stats timer. The proxy itself runs on its own thread.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::backend("zmq", "could not start the signal runtime", e))?;
    let interval = args.stats_interval.map(|d| d.0);
    rt.block_on(wait_for_stop(&proxy, interval))?;
    let stats = proxy.stop();
    say(&format!(
        "chanlayer zmq-proxy: stopped: {}",
        counters_line(&stats)
    ));
    Ok(())
}

async fn wait_for_stop(proxy: &Proxy, interval: Option<Duration>) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let listen = |kind: SignalKind, name: &str| {
        signal(kind).map_err(|e| Error::backend("zmq", format!("could not listen for {name}"), e))
    };
    let mut int = listen(SignalKind::interrupt(), "SIGINT")?;
    let mut term = listen(SignalKind::terminate(), "SIGTERM")?;
    let mut usr1 = listen(SignalKind::user_defined1(), "SIGUSR1")?;
    let mut tick = interval.map(|d| {
        let mut t = tokio::time::interval(d.max(Duration::from_millis(10)));
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        t
    });
    if let Some(t) = tick.as_mut() {
        t.tick().await; // the first tick is immediate
    }
    loop {
        tokio::select! {
            _ = int.recv() => return Ok(()),
            _ = term.recv() => return Ok(()),
            _ = usr1.recv() => say(&format!("chanlayer zmq-proxy: {}", counters_line(&proxy.stats()))),
            _ = async {
                match tick.as_mut() {
                    Some(t) => { t.tick().await; }
                    None => std::future::pending::<()>().await,
                }
            } => say(&format!("chanlayer zmq-proxy: {}", counters_line(&proxy.stats()))),
        }
    }
}
