//! Why the cluster cannot be reached. librdkafka reports a refused login or a failed TLS
//! handshake only through its error callback (and its log), while the request that needed
//! the connection just times out. [`Watch`] is the client context of the layer's admin
//! client and producer: it keeps the last such report in a [`Cause`], so `connect` and
//! `send` can say "authentication failed: ..." instead of "operation timed out", and
//! `connect` fails as soon as the broker refuses the credentials or the certificate.

use std::sync::{Arc, Mutex};

use chanlayer_core::toolkit::lock;
use chanlayer_core::Secret;
use rdkafka::error::{KafkaError, RDKafkaErrorCode as Code};
use rdkafka::ClientContext;

use crate::config::KafkaConfig;

#[derive(Default)]
struct Shared {
    /// The last authentication or TLS failure, which retrying with the same settings does
    /// not mend. It stays: the "brokers are down" that follows it says less.
    fatal: tokio::sync::watch::Sender<Option<String>>,
    /// The last other report (no connection).
    transient: Mutex<Option<String>>,
    /// Values never to show (the SASL password, secret-looking `kafka.*` values).
    secrets: Vec<String>,
}

/// The last connection problem the layer's clients reported, with secrets removed.
#[derive(Clone)]
pub(crate) struct Cause(Arc<Shared>);

impl Cause {
    pub fn new(cfg: &KafkaConfig) -> Cause {
        let props = cfg.client_properties.0.iter();
        let props = props.filter(|(k, _)| chanlayer_core::config::is_secret_key(k));
        let secrets = props
            .map(|(_, v)| v.as_str())
            .chain(cfg.password.as_ref().map(Secret::expose))
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        Cause(Arc::new(Shared {
            secrets,
            ..Shared::default()
        }))
    }

    fn record(&self, error: &KafkaError, reason: &str) {
        let (fatal, what) = match error.rdkafka_error_code() {
            Some(Code::Authentication | Code::SaslAuthenticationFailed) => {
                (true, "authentication failed")
            }
            Some(Code::SSL) => (true, "TLS failed"),
            Some(Code::BrokerTransportFailure | Code::AllBrokersDown) => (false, "no connection"),
            _ => return,
        };
        let text = Some(self.scrub(&format!("{what}: {reason}")));
        if fatal {
            self.0.fatal.send_replace(text);
        } else {
            *lock(&self.0.transient) = text;
        }
    }

    /// `text` with every secret replaced by `***`.
    fn scrub(&self, text: &str) -> String {
        let mut text = text.to_owned();
        for s in self.0.secrets.iter() {
            text = text.replace(s.as_str(), "***");
        }
        text
    }

    /// The last authentication or TLS failure, else the last other report, if any.
    pub fn last(&self) -> Option<String> {
        let fatal = self.0.fatal.borrow().clone();
        fatal.or_else(|| lock(&self.0.transient).clone())
    }

    /// Resolves with the report when authentication or TLS fails (a report made before the
    /// call counts).
    pub async fn fatal(&self) -> String {
        let mut reports = self.0.fatal.subscribe();
        // The sender lives as long as `self`: the wait ends only with a report.
        let report = reports.wait_for(Option::is_some).await;
        report.ok().and_then(|r| r.clone()).unwrap_or_default()
    }
}

/// The client context that feeds a [`Cause`] (and logs what librdkafka reports, as its
/// default context does).
pub(crate) struct Watch(pub Cause);

impl ClientContext for Watch {
    fn error(&self, error: KafkaError, reason: &str) {
        self.0.record(&error, reason);
        tracing::error!(error = %error, "librdkafka: {}", self.0.scrub(reason));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chanlayer_core::config::BackendSettings;
    use chanlayer_core::LayerConfig;

    fn cause(url: &str) -> Cause {
        let cfg = KafkaConfig::from_layer_config(&LayerConfig::from_url(url).unwrap()).unwrap();
        Cause::new(&cfg)
    }

    fn auth() -> KafkaError {
        KafkaError::Global(Code::Authentication)
    }

    #[test]
    fn secrets_never_show_in_a_report() {
        let c = cause("kafka://u:hunter2@h:9092?kafka.ssl.key.password=k3y-pass");
        c.record(&auth(), "failed for u with hunter2 and k3y-pass");
        let shown = c.last().expect("a report");
        assert!(shown.starts_with("authentication failed: "), "{shown}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("k3y-pass"),
            "{shown}"
        );
    }

    #[test]
    fn an_authentication_failure_outlives_the_brokers_down_that_follows() {
        let c = cause("kafka://h:9092");
        assert_eq!(c.last(), None);
        c.record(
            &KafkaError::Global(Code::AllBrokersDown),
            "1/1 brokers are down",
        );
        assert_eq!(
            c.last().as_deref(),
            Some("no connection: 1/1 brokers are down")
        );
        c.record(&auth(), "SASL authentication error");
        c.record(
            &KafkaError::Global(Code::AllBrokersDown),
            "1/1 brokers are down",
        );
        assert_eq!(
            c.last().as_deref(),
            Some("authentication failed: SASL authentication error")
        );
        // Other errors are not causes.
        c.record(&KafkaError::Global(Code::MessageTimedOut), "x");
        assert!(c.last().unwrap().starts_with("authentication failed"));
    }

    #[tokio::test]
    async fn fatal_resolves_for_a_report_made_before_or_after_the_call() {
        let c = cause("kafka://h:9092");
        let waiter = {
            let c = c.clone();
            tokio::spawn(async move { c.fatal().await })
        };
        c.record(&KafkaError::Global(Code::SSL), "certificate verify failed");
        assert_eq!(
            waiter.await.unwrap(),
            "TLS failed: certificate verify failed"
        );
        // Already there: at once.
        assert_eq!(c.fatal().await, "TLS failed: certificate verify failed");
    }
}
