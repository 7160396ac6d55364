//! The layer's one producer: idempotent, `acks=all`; every send waits for its delivery
//! report, so an `Ok` means the broker has the message.

use std::time::Duration;

use chanlayer_core::{Error, Result};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;

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

pub(crate) struct Sender {
    producer: FutureProducer,
    delivery_timeout: Duration,
    address: String,
}

impl Sender {
    pub fn new(cfg: &KafkaConfig, client_id: &str, max_message_size: usize) -> Result<Self> {
        let producer: FutureProducer = cfg
            .producer_config(client_id, max_message_size)
            .create()
            .map_err(|e| backend_err("could not create the producer", e))?;
        Ok(Sender {
            producer,
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
    ) -> std::result::Result<rdkafka::producer::DeliveryFuture, Refused> {
        let deadline = tokio::time::Instant::now() + self.delivery_timeout;
        let mut pause = Duration::from_millis(1);
        loop {
            let mut record = FutureRecord::<[u8], [u8]>::to(topic).payload(payload);
            if let Some(k) = key {
                record = record.key(k);
            }
            match self.producer.send_result(record) {
                Ok(f) => return Ok(f),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _))
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
    pub async fn delivered(
        &self,
        topic: &str,
        f: rdkafka::producer::DeliveryFuture,
    ) -> std::result::Result<(), Refused> {
        match f.await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err((e, _))) => Err(self.refused(topic, e)),
            Err(_) => Err(Refused::Failed(Error::Closed)),
        }
    }

    /// Produces one record and waits until the broker has it.
    pub async fn send(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: &[u8],
    ) -> std::result::Result<(), Refused> {
        let f = self.enqueue(topic, key, payload).await?;
        self.delivered(topic, f).await
    }

    fn refused(&self, topic: &str, e: KafkaError) -> Refused {
        if crate::topics::is_unknown_topic(&e) {
            return Refused::UnknownTopic;
        }
        let message = match e.rdkafka_error_code() {
            Some(RDKafkaErrorCode::MessageTimedOut) => format!(
                "no acknowledgement from {} for a message to {topic:?} within delivery_timeout ({:?}); the broker may be down",
                self.address, self.delivery_timeout
            ),
            Some(RDKafkaErrorCode::MessageSizeTooLarge) => format!(
                "the broker refused a message to {topic:?} as too large (its message.max.bytes is lower than chanlayer's max_message_size)"
            ),
            _ => format!("could not produce to {topic:?} on {}", self.address),
        };
        Refused::Failed(Error::Backend {
            backend: BACKEND,
            message,
            source: Some(Box::new(e)),
        })
    }

    /// Waits up to `timeout` for everything enqueued to be delivered.
    pub fn flush(&self, timeout: Duration) {
        if let Err(e) = self.producer.flush(Timeout::After(timeout)) {
            tracing::debug!(error = %e, "producer flush on close did not finish");
        }
    }
}
