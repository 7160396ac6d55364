//! A [`Session`]: one live connection with the channels the layer uses, and the helpers
//! every module uses on lapin's errors. Opening and supervising sessions is in
//! `connection.rs`.

use std::sync::Mutex;
use std::time::Duration;

use chanlayer_core::toolkit::lock;
use chanlayer_core::{Error, Result};
use lapin::tcp::OwnedTLSConfig;
use lapin::{Channel, Connection};
use tokio::sync::Notify;

use crate::BACKEND;

/// One live connection with the channels the layer uses.
pub(crate) struct Session {
    pub conn: Connection,
    /// Publishes, with publisher confirms.
    pub publish: Channel,
    /// Declares, binds, purges. Replaced when the broker closes it (a refused declaration).
    pub admin: Mutex<Channel>,
    /// Counts up with every reconnection.
    pub generation: u64,
    /// Which of the URL's hosts it is connected to (an index into `AmqpConfig::hosts`).
    pub host: usize,
    /// Poked by operations that saw the connection fail, so the supervisor looks at once.
    pub broken: Notify,
}

impl Session {
    /// A usable channel for declarations.
    pub async fn admin(&self) -> Result<Channel> {
        let current = lock(&self.admin).clone();
        if current.status().connected() {
            return Ok(current);
        }
        let fresh = self
            .conn
            .create_channel()
            .await
            .map_err(|e| backend("could not open a channel", e))?;
        *lock(&self.admin) = fresh.clone();
        Ok(fresh)
    }

    /// Closes the connection with `code` and reason `why`, waiting up to `bound` for the
    /// broker to confirm; `None` if it did not in time (dropping the connection ends it from
    /// our side).
    pub async fn close(&self, code: u16, why: &str, bound: Duration) -> Option<lapin::Result<()>> {
        let closing = self.conn.close(code, why.into());
        tokio::time::timeout(bound, closing).await.ok()
    }

    /// `true` while the connection and its publish channel are up.
    pub fn alive(&self) -> bool {
        self.conn.status().connected() && self.publish.status().connected()
    }
}

/// A [`Error::Backend`] for a lapin error: what failed, and why (lapin's errors carry no
/// password), with the lapin error as the source.
pub(crate) fn backend(what: &str, e: lapin::Error) -> Error {
    let why = e.to_string();
    Error::backend(BACKEND, format!("{what}: {why}"), e)
}

/// `true` for errors that mean the connection (not just one operation) is gone.
pub(crate) fn is_connection_error(e: &lapin::Error) -> bool {
    use lapin::ErrorKind as K;
    matches!(
        e.kind(),
        K::IOError(_)
            | K::InvalidConnectionState(_)
            | K::MissingHeartbeatError
            | K::RuntimeShutdownError(_)
            | K::InvalidChannelState(..)
    ) || e.is_amqp_hard_error()
}

/// The TLS settings: the given CA file, or the system's roots.
pub(crate) fn tls_config(inner_cfg: &crate::AmqpConfig) -> Result<OwnedTLSConfig> {
    let read = |path: &std::path::PathBuf| {
        std::fs::read_to_string(path).map_err(|e| {
            Error::Config(format!(
                "option ca_file={}: cannot read the CA certificate: {e}",
                path.display()
            ))
        })
    };
    let cert_chain = inner_cfg.ca_file.as_ref().map(read).transpose()?;
    Ok(OwnedTLSConfig {
        identity: None,
        cert_chain,
    })
}
