//! The layer's one producer: idempotent, `acks=all`; every send waits for its delivery
//! report, so an `Ok` means the broker has the message.

use std::time::Duration;

use chanlayer_core::{Error, Result};
use rdkafka::error::{KafkaError, RDKafkaErrorCode as Code};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;

use crate::cause::{Cause, Watch};
use crate::config::KafkaConfig;
use crate::topics::backend_err;
use crate::BACKEND;

/// How a produce ended when it did not store the message.
#[derive(Debug)]
pub(crate) enum Refused {
    /// The topic does not exist (an instance's inbox after it closed).
    UnknownTopic,
    /// Anything else, as a layer error.
    Failed(Error),
}

/// A produce's outcome.
type Sent<T = ()> = std::result::Result<T, Refused>;

impl Refused {
    /// As a layer error: a missing topic is a backend error saying `gone`.
    pub fn or_gone(self, gone: impl FnOnce() -> String) -> Error {
        match self {
            Refused::UnknownTopic => Error::failure(BACKEND, gone()),
            Refused::Failed(e) => e,
        }
    }
}

pub(crate) struct Sender {
    producer: FutureProducer<Watch>,
    cause: Cause,
    delivery_timeout: Duration,
    address: String,
}

impl Sender {
    /// The producer; its connection problems go to `cause` (shared with the admin client).
    pub fn new(
        cfg: &KafkaConfig,
        client_id: &str,
        max_message_size: usize,
        cause: Cause,
    ) -> Result<Self> {
        let producer: FutureProducer<Watch> = cfg
            .producer_config(client_id, max_message_size)
            .create_with_context(Watch(cause.clone()))
            .map_err(|e| backend_err("could not create the producer", e))?;
        Ok(Sender {
            producer,
            cause,
            delivery_timeout: cfg.delivery_timeout,
            address: cfg.display_address(),
        })
    }

    /// Enqueues one record and returns the future of its delivery report. A full local
    /// queue (more than librdkafka buffers) is waited out, up to `delivery_timeout`.
    pub async fn enqueue(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: &[u8],
    ) -> Sent<rdkafka::producer::DeliveryFuture> {
        let deadline = tokio::time::Instant::now() + self.delivery_timeout;
        let mut pause = Duration::from_millis(1);
        loop {
            let mut record = FutureRecord::<[u8], [u8]>::to(topic).payload(payload);
            if let Some(k) = key {
                record = record.key(k);
            }
            match self.producer.send_result(record) {
                Ok(f) => return Ok(f),
                Err((KafkaError::MessageProduction(Code::QueueFull), _))
                    if tokio::time::Instant::now() < deadline =>
                {
                    // librdkafka's queue drains as batches are acknowledged.
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(50));
                }
                Err((e, _)) => return Err(self.refused(topic, e)),
            }
        }
    }

    /// Waits for a delivery report.
    pub async fn delivered(&self, topic: &str, f: rdkafka::producer::DeliveryFuture) -> Sent {
        match f.await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err((e, _))) => Err(self.refused(topic, e)),
            Err(_) => Err(Refused::Failed(Error::Closed)),
        }
    }

    /// Produces one record and waits until the broker has it.
    pub async fn send(&self, topic: &str, key: Option<&[u8]>, payload: &[u8]) -> Sent {
        let f = self.enqueue(topic, key, payload).await?;
        self.delivered(topic, f).await
    }

    fn refused(&self, topic: &str, e: KafkaError) -> Refused {
        let message = match e.rdkafka_error_code() {
            Some(Code::UnknownTopicOrPartition | Code::UnknownTopic) => return Refused::UnknownTopic,
            Some(Code::MessageTimedOut) => {
                let why = (self.cause.last()).map_or("; the broker may be down".into(), |c| {
                    format!(": {c}")
                });
                format!(
                    "no acknowledgement from {} for a message to {topic:?} within delivery_timeout ({:?}){why}",
                    self.address, self.delivery_timeout
                )
            }
            Some(Code::MessageSizeTooLarge) => format!(
                "the broker refused a message to {topic:?} as too large (its message.max.bytes is lower than chanlayer's max_message_size)"
            ),
            _ => format!("could not produce to {topic:?} on {}", self.address),
        };
        Refused::Failed(Error::backend(BACKEND, message, e))
    }

    /// Waits up to `timeout` for everything enqueued to be delivered.
    pub fn flush(&self, timeout: Duration) {
        if let Err(e) = self.producer.flush(Timeout::After(timeout)) {
            tracing::debug!(error = %e, "producer flush on close did not finish");
        }
    }
}

/// librdkafka's in-process mock cluster: fault injection a real broker cannot do on demand
/// (in addition to the real-broker tests, never instead of them). The mock cluster has no
/// admin API, so these test the producer path on a topic the mock creates.
#[cfg(test)]
mod tests {
    use super::*;
    use chanlayer_core::config::BackendSettings;
    use chanlayer_core::LayerConfig;
    use rdkafka::mocking::MockCluster;
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

    fn sender(bootstrap: &str, extra: &str) -> Sender {
        let cfg = KafkaConfig::from_layer_config(
            &LayerConfig::from_url(&format!("kafka://{bootstrap}?{extra}")).expect("url"),
        )
        .expect("config");
        Sender::new(&cfg, "mock-test", 1 << 20, Cause::new(&cfg)).expect("producer")
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    }

    /// The broker goes down: a send waits `delivery_timeout` and fails with an error that
    /// names the broker and the timeout; when it is back, sends work again.
    #[test]
    fn broker_down_fails_sends_clearly_then_recovers() {
        let mock = MockCluster::new(1).expect("a mock cluster");
        mock.create_topic("t", 1, 1).expect("topic");
        let s = sender(&mock.bootstrap_servers(), "delivery_timeout=1500ms");
        runtime().block_on(async {
            s.send("t", None, b"one").await.expect("send while up");
            mock.broker_down(1).expect("broker down");
            let err = match s.send("t", None, b"two").await {
                Err(Refused::Failed(e)) => e,
                other => panic!("expected a failure, got {other:?}"),
            };
            let text = err.to_string();
            assert!(text.contains("delivery_timeout"), "{text}");
            assert!(text.contains(&mock.bootstrap_servers()), "{text}");
            mock.broker_up(1).expect("broker up");
            // librdkafka reconnects with backoff: sends work again within a deadline.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            while let Err(e) = s.send("t", None, b"three").await {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "sends still fail after the broker came back: {e:?}"
                );
            }
        });
    }

    /// Produce requests failing with retriable errors are retried by the idempotent
    /// producer: the send succeeds.
    #[test]
    fn retriable_produce_errors_are_retried() {
        let mock = MockCluster::new(1).expect("a mock cluster");
        mock.create_topic("t", 1, 1).expect("topic");
        let s = sender(&mock.bootstrap_servers(), "");
        runtime().block_on(async {
            s.send("t", None, b"zero").await.expect("first send");
            mock.request_errors(
                RDKafkaApiKey::Produce,
                &[
                    RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
                    RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
                ],
            );
            s.send("t", None, b"one")
                .await
                .expect("retried until it succeeds");
        });
    }
}
