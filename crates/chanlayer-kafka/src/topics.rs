//! Topic names and the admin work on them: creation when missing, deletion of an instance's
//! inbox on close, and listing leftovers.
//!
//! ```text
//! send("ws.ID!r") ──▶ {prefix}.inbox.ID        1 partition, read by instance ID only
//!                                               (assigned, from the start; no consumer group)
//! send("jobs") ─────▶ {prefix}.channel.jobs    `partitions` partitions, consumer group
//!                                               {prefix}.channel.jobs: readers compete
//! group_send("room")▶ {groups_topic}           key "room"; every instance reads it from the
//!                                               end it found at connect and fans out to its
//!                                               own members
//! ```
//!
//! Every name starts with the layer's `prefix`, so two applications on one cluster with
//! different prefixes never share a topic.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chanlayer_core::config::BackendSettings;
use chanlayer_core::toolkit::lock;
use chanlayer_core::{Error, Result};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::Client;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::{Offset, TopicPartitionList};

use crate::cause::{Cause, Watch};
use crate::config::{KafkaConfig, RECORD_OVERHEAD};
use crate::BACKEND;

pub use chanlayer_core::names::BrokerNames as Names;

/// The inbox topic of instance `instance` of a layer with prefix `prefix`:
/// `{prefix}.inbox.{instance}`.
pub use chanlayer_core::names::inbox_name as inbox_topic;

pub(crate) fn backend_err(what: &str, e: KafkaError) -> Error {
    Error::backend(BACKEND, what, e)
}

/// Creates topics when missing (or checks they exist, with `create_topics=false`); remembers
/// the ones it has seen.
pub(crate) struct Topics {
    admin: Arc<AdminClient<Watch>>,
    /// Why the cluster is unreachable, as the admin client and the producer report it.
    pub cause: Cause,
    cfg: KafkaConfig,
    max_message_size: usize,
    /// This instance's inbox topic (empty for the tools): one partition (one reader, in
    /// order); the other topics (normal channels, groups) get `partitions`.
    inbox: String,
    known: Mutex<HashSet<String>>,
    /// Serialises creations, so concurrent first sends to one channel create it once.
    creating: tokio::sync::Mutex<()>,
}

impl Topics {
    pub fn new(cfg: &KafkaConfig, client_id: &str, max: usize, inbox: &str) -> Result<Self> {
        let cause = Cause::new(cfg);
        let admin = cfg
            .client_config(client_id)
            .create_with_context(Watch(cause.clone()))
            .map_err(|e| backend_err("could not create the admin client", e))?;
        Ok(Topics {
            admin: Arc::new(admin),
            cause,
            cfg: cfg.clone(),
            max_message_size: max,
            inbox: inbox.to_owned(),
            known: Mutex::new(HashSet::new()),
            creating: tokio::sync::Mutex::new(()),
        })
    }

    fn options(&self) -> AdminOptions {
        AdminOptions::new()
            .operation_timeout(Some(self.cfg.connection_timeout))
            .request_timeout(Some(self.cfg.connection_timeout))
    }

    /// Makes sure `topic` exists: known already, or found, or created.
    pub async fn ensure(&self, topic: &str) -> Result<()> {
        if self.is_known(topic) {
            return Ok(());
        }
        let _one = self.creating.lock().await;
        if self.is_known(topic) {
            return Ok(());
        }
        // An instance's inbox is its own and always created; `create_topics=false` is about
        // the shared topics (normal channels, groups) an operator may want to manage.
        let inbox = topic == self.inbox;
        if !self.cfg.create_topics && !inbox {
            if !self.exists(topic).await? {
                return Err(Error::Config(format!(
                    "topic {topic:?} does not exist on {} and create_topics=false; create it, or let chanlayer create topics",
                    self.cfg.display_address()
                )));
            }
            self.remember(topic);
            return Ok(());
        }
        let partitions = if inbox { 1 } else { self.cfg.partitions };
        let replication = TopicReplication::Fixed(self.cfg.replication);
        let max_bytes = self.max_message_size.saturating_add(RECORD_OVERHEAD);
        // The `topic.*` configs win over these.
        let mut configs = self.cfg.topic_properties.0.clone();
        let retention = self.cfg.retention.as_millis().to_string();
        configs.entry("retention.ms".into()).or_insert(retention);
        configs
            .entry("max.message.bytes".into())
            .or_insert(max_bytes.to_string());
        let new = NewTopic::new(topic, partitions, replication);
        let new = configs.iter().fold(new, |n, (k, v)| n.set(k, v));
        let results = self
            .admin
            .create_topics([&new], &self.options())
            .await
            .map_err(|e| backend_err(&format!("could not create topic {topic:?}"), e))?;
        let mut failed = results.into_iter().filter_map(Result::err);
        if let Some((t, code)) = failed.find(|(_, c)| *c != RDKafkaErrorCode::TopicAlreadyExists) {
            let m = format!("could not create topic {t:?}: {code}");
            return Err(Error::failure(BACKEND, m));
        }
        self.remember(topic);
        Ok(())
    }

    /// `true` if the cluster has `topic` (a metadata request).
    pub async fn exists(&self, topic: &str) -> Result<bool> {
        Ok(self.partition_count(topic).await?.is_some())
    }

    /// The number of partitions of `topic`, `None` if it does not exist.
    pub async fn partition_count(&self, topic: &str) -> Result<Option<usize>> {
        let t = topic.to_owned();
        let what = format!("could not read the metadata of {topic:?}");
        let md = self.ask(what, move |c, timeout| c.fetch_metadata(Some(&t), timeout));
        Ok(md
            .await?
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .filter(|t| t.error().is_none() && !t.partitions().is_empty())
            .map(|t| t.partitions().len()))
    }

    /// The high watermark (the next offset) of `topic`'s `partition`.
    pub async fn high_watermark(&self, topic: &str, partition: i32) -> Result<i64> {
        let t = topic.to_owned();
        let what = format!("could not read the end of {topic:?}");
        let ends = self.ask(what, move |c, wait| c.fetch_watermarks(&t, partition, wait));
        Ok(ends.await?.1)
    }

    /// Runs the admin client's request `f` (blocking, given `connection_timeout`) off the
    /// async workers; `what` says what failed.
    async fn ask<T: Send + 'static>(
        &self,
        what: String,
        f: impl FnOnce(&Client<Watch>, Duration) -> KafkaResult<T> + Send + 'static,
    ) -> Result<T> {
        let (admin, timeout) = (self.admin.clone(), self.cfg.connection_timeout);
        tokio::task::spawn_blocking(move || f(admin.inner(), timeout))
            .await
            .map_err(|e| Error::backend(BACKEND, what.as_str(), e))?
            .map_err(|e| backend_err(&what, e))
    }

    /// `true` if this layer has seen `topic` exist.
    pub fn is_known(&self, topic: &str) -> bool {
        lock(&self.known).contains(topic)
    }

    /// Remembers that `topic` exists.
    pub fn remember(&self, topic: &str) {
        lock(&self.known).insert(topic.to_owned());
    }

    /// The known topics whose names start with `head`.
    pub fn known_with(&self, head: &str) -> Vec<String> {
        lock(&self.known)
            .iter()
            .filter(|t| t.starts_with(head))
            .cloned()
            .collect()
    }

    /// Forgets that `topic` exists (it was deleted, or a send found it gone).
    pub fn forget(&self, topic: &str) {
        lock(&self.known).remove(topic);
    }

    /// Deletes `topics` (missing ones are fine).
    pub async fn delete(&self, topics: &[&str]) -> Result<()> {
        if topics.is_empty() {
            return Ok(());
        }
        let results = self
            .admin
            .delete_topics(topics, &self.options())
            .await
            .map_err(|e| backend_err("could not delete topics", e))?;
        let mut known = lock(&self.known);
        for r in results {
            match r {
                Ok(t) | Err((t, RDKafkaErrorCode::UnknownTopicOrPartition)) => {
                    known.remove(&t);
                }
                Err((t, code)) => {
                    let m = format!("could not delete topic {t:?}: {code}");
                    return Err(Error::failure(BACKEND, m));
                }
            }
        }
        Ok(())
    }
}

/// Moves the consumer group of a normal channel's topic (the group has the topic's name) to
/// the end of each of its `partitions`: what was there is skipped by every reader. Blocking.
/// The group must have no running member (a broker refuses commits from outside a live group).
pub(crate) fn skip_to_end(
    cfg: &KafkaConfig,
    client_id: &str,
    topic: &str,
    partitions: usize,
) -> Result<()> {
    let consumer: BaseConsumer = cfg
        .consumer_config(client_id, Some(topic))
        .create()
        .map_err(|e| backend_err("could not create a consumer to flush", e))?;
    let tpl = ends(&consumer, topic, partitions, cfg.connection_timeout)?;
    if tpl.count() == 0 {
        return Ok(());
    }
    let what = format!(
        "could not move the readers of {topic:?} to its end (are other instances receiving it?)"
    );
    (consumer.commit(&tpl, CommitMode::Sync)).map_err(|e| backend_err(&what, e))
}

/// Partitions `0..partitions` of `topic` at their current ends (high watermarks).
/// Blocking.
pub(crate) fn ends<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    partitions: usize,
    timeout: Duration,
) -> Result<TopicPartitionList> {
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        let p = i32::try_from(p).unwrap_or(i32::MAX);
        let (_, high) = consumer
            .fetch_watermarks(topic, p, timeout)
            .map_err(|e| backend_err(&format!("could not read the end of {topic:?}"), e))?;
        tpl.add_partition_offset(topic, p, Offset::Offset(high))
            .map_err(|e| backend_err(&format!("could not assign {topic:?}"), e))?;
    }
    Ok(tpl)
}

/// An inbox topic found by [`list_inboxes`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxTopic {
    /// The topic name, `{prefix}.inbox.{instance}`.
    pub topic: String,
    /// The instance id it belongs to.
    pub instance: String,
}

/// Lists the inbox topics of layers with `prefix` on the cluster of `config`: those of
/// running instances and leftovers of instances that crashed (a closed instance deletes its
/// own).
pub async fn list_inboxes(config: &chanlayer_core::LayerConfig) -> Result<Vec<InboxTopic>> {
    let cfg = KafkaConfig::from_layer_config(config)?;
    let topics = Topics::new(&cfg, "chanlayer-admin", config.options.max_message_size, "")?;
    let what = "could not list topics".to_owned();
    let md = topics
        .ask(what, |c, timeout| c.fetch_metadata(None, timeout))
        .await?;
    let head = format!("{}.inbox.", config.options.prefix);
    let mut out: Vec<InboxTopic> = md
        .topics()
        .iter()
        .filter_map(|t| {
            let instance = t.name().strip_prefix(&head)?;
            (!instance.is_empty() && !instance.contains('.')).then(|| InboxTopic {
                topic: t.name().to_owned(),
                instance: instance.to_owned(),
            })
        })
        .collect();
    out.sort_by(|a, b| a.topic.cmp(&b.topic));
    Ok(out)
}

/// Deletes the inbox topics of the given instances (as listed by [`list_inboxes`]). Deleting
/// the inbox of a running instance loses what it has not read yet and stops its
/// process-local channels; remove only those of instances that are gone.
pub async fn remove_inboxes(
    config: &chanlayer_core::LayerConfig,
    instances: &[String],
) -> Result<Vec<String>> {
    let cfg = KafkaConfig::from_layer_config(config)?;
    let topics = Topics::new(&cfg, "chanlayer-admin", config.options.max_message_size, "")?;
    let names: Vec<String> = instances
        .iter()
        .map(|i| inbox_topic(&config.options.prefix, i))
        .collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    topics.delete(&refs).await?;
    Ok(names)
}

/// Errors a consumer cannot get past by retrying: the broker refuses it.
pub(crate) fn is_fatal(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::TopicAuthorizationFailed
                | RDKafkaErrorCode::GroupAuthorizationFailed
                | RDKafkaErrorCode::SaslAuthenticationFailed
                | RDKafkaErrorCode::Authentication
                | RDKafkaErrorCode::ClusterAuthorizationFailed
        )
    )
}
