//! Inspecting a running deployment: every instance's members of a group, every instance's
//! counters, asked from any process, as `celery inspect` asks Celery's workers.
//!
//! A broker does not tell who is a member of a group (Kafka's groups are filtered by each
//! instance, AMQP 0-9-1 cannot list bindings), so the instances are asked. Every instance of
//! a cross-process backend ([`Capabilities::cross_process`]) with the shared option
//! `inspect` on (the default) answers: on connect it makes a hidden process-local channel
//! (`chanlayer.inspect.<instance>!...`), adds it to the reserved group [`GROUP`] with a
//! membership that never expires (`group_expiry` does not end it, `flush` keeps it), and a
//! task of the instance answers each request that arrives there until the instance closes.
//!
//! Asking is [`groups`] or [`stats`]: a fresh reply channel, one `group_send` of the
//! request to [`GROUP`], and every reply that arrives before `wait` has passed, one per
//! instance, sorted by instance id. The asking instance does not answer itself (its own
//! are [`ChannelLayer::group_members`] and [`ChannelLayer::stats`]); instances that closed
//! do not answer. Only instances under the same `prefix` are asked.
//!
//! What travels is JSON whatever the layer's codec, so instances of different versions read
//! each other (unknown fields are ignored, missing ones read as empty):
//!
//! ```text
//! request  {"v":1,"what":"groups","group":"room.1","reply_to":"chanlayer.inspect.reply.<id>!..."}
//!          {"v":1,"what":"stats","reply_to":"..."}
//! reply    {"v":1,"instance":"<id>","backend":"amqp","what":"groups","group":"room.1","members":[...]}
//!          {"v":1,"instance":"<id>","backend":"amqp","what":"stats","stats":{"sent":3,...}}
//!          {"v":1,"instance":"<id>","backend":"amqp","what":"nope","error":"unknown request ..."}
//! ```
//!
//! The answering instance does not count this traffic in its own counters (nor in the
//! metrics exported from them); the asking instance counts its request and the replies as
//! its own sends and receives. A request that is not one (wrong type, undecodable body, a
//! `reply_to` that is not a process-local channel) is skipped and logged at debug level; it
//! never stops the task.
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! use chanlayer_core::{inspect, ChannelLayer, LayerConfig, MemoryLayer};
//! use std::time::Duration;
//! let layer = MemoryLayer::connect(&LayerConfig::from_url("memory://").unwrap()).await.unwrap();
//! // memory:// is process-local: there is nobody else to ask.
//! let e = inspect::stats(&layer, Duration::from_secs(1)).await.unwrap_err();
//! assert!(e.to_string().contains("process-local"), "{e}");
//! # });
//! ```

use std::collections::BTreeMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::capabilities::Capabilities;
use crate::codec::Codec;
use crate::envelope::{Destination, Envelope};
use crate::error::{Error, Result};
use crate::expiry::GroupState;
use crate::inbound::Inbound;
use crate::layer::ChannelLayer;
use crate::message::Message;
use crate::names;
use crate::stats::{Stats, StatsSnapshot};
use crate::transport::{Outgoing, Transport};

/// The reserved group every answering instance's hidden channel belongs to.
pub const GROUP: &str = "chanlayer.inspect";
/// The message type of a request.
pub const REQUEST_TYPE: &str = "chanlayer.inspect.request";
/// The message type of a reply.
pub const REPLY_TYPE: &str = "chanlayer.inspect.reply";
/// The version of the request and reply bodies.
const VERSION: u32 = 1;
/// The `new_channel` prefix of an instance's hidden channel.
const RESPONDER_PREFIX: &str = "chanlayer.inspect";
/// The `new_channel` prefix of an asker's reply channel: its capacity is
/// `capacity_for("chanlayer.inspect.reply.<instance>!...")`, which a
/// `channel_capacity.chanlayer.inspect.*` override raises for deployments of more instances
/// than `capacity`.
pub const REPLY_PREFIX: &str = "chanlayer.inspect.reply";

/// One instance's members of a group (the answer of [`groups`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceMembers {
    /// The instance's id (what its process-local channel names carry).
    pub instance: String,
    /// Its backend (`amqp`, `kafka`, `zmq`, ...).
    pub backend: String,
    /// Its members of the group, sorted (its [`ChannelLayer::group_members`]).
    pub members: Vec<String>,
}

/// One instance's counters (the answer of [`stats`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceStats {
    /// The instance's id (what its process-local channel names carry).
    pub instance: String,
    /// Its backend (`amqp`, `kafka`, `zmq`, ...).
    pub backend: String,
    /// Its counters (its [`ChannelLayer::stats`]).
    pub stats: StatsSnapshot,
}

/// A request on the wire.
#[derive(Debug, Serialize, Deserialize)]
struct Request {
    #[serde(default)]
    v: u32,
    what: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    group: Option<String>,
    reply_to: String,
}

/// A reply on the wire.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default)]
struct Reply {
    v: u32,
    instance: String,
    backend: String,
    what: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    group: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    members: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stats: Option<StatsSnapshot>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// Every other instance's members of `group` (under this layer's prefix), as they answer
/// within `wait`; one entry per instance, sorted by instance id, instances without members
/// included. `Unsupported` on a backend that is not cross-process (memory: call
/// [`ChannelLayer::group_members`], which lists every instance's there).
pub async fn groups(
    layer: &dyn ChannelLayer,
    group: &str,
    wait: Duration,
) -> Result<Vec<InstanceMembers>> {
    names::validate_group(group)?;
    ask(layer, "groups", Some(group), wait, |r| {
        Some(InstanceMembers {
            members: r.members?,
            instance: r.instance,
            backend: r.backend,
        })
    })
    .await
}

/// Every other instance's counters (under this layer's prefix), as they answer within
/// `wait`; one entry per instance, sorted by instance id. `Unsupported` on a backend that
/// is not cross-process.
pub async fn stats(layer: &dyn ChannelLayer, wait: Duration) -> Result<Vec<InstanceStats>> {
    ask(layer, "stats", None, wait, |r| {
        Some(InstanceStats {
            stats: r.stats?,
            instance: r.instance,
            backend: r.backend,
        })
    })
    .await
}

/// Sends request `what` and collects the replies until `wait` has passed: what `answer`
/// takes of each reply (one per instance, by instance id).
async fn ask<T>(
    layer: &dyn ChannelLayer,
    what: &str,
    group: Option<&str>,
    wait: Duration,
    answer: impl Fn(Reply) -> Option<T>,
) -> Result<Vec<T>> {
    let caps = layer.capabilities();
    if !caps.cross_process {
        return Err(Error::unsupported(
            "inspect",
            caps.backend,
            format!(
                "{} layers are process-local: there are no other instances to ask; call group_members and stats on the layer itself",
                caps.backend
            ),
        ));
    }
    let reply_to = layer.new_channel(REPLY_PREFIX).await?;
    let request = Request {
        v: VERSION,
        what: what.to_owned(),
        group: group.map(str::to_owned),
        reply_to: reply_to.clone(),
    };
    let deadline = tokio::time::Instant::now() + wait;
    layer
        .group_send(
            GROUP,
            Message::encode_as(REQUEST_TYPE, &request, Codec::Json)?,
        )
        .await?;
    let mut by_instance = BTreeMap::new();
    while let Ok(received) = tokio::time::timeout_at(deadline, layer.receive(&reply_to)).await {
        match read_reply(&received?, what, group) {
            Ok(reply) => {
                by_instance.insert(reply.instance.clone(), reply);
            }
            Err(why) => tracing::debug!("inspect: skipped a reply: {why}"),
        }
    }
    Ok(by_instance.into_values().filter_map(answer).collect())
}

/// The body of `message`, which must be of type `ty`.
fn decode<T: serde::de::DeserializeOwned>(message: &Message, ty: &str) -> Result<T> {
    if message.message_type() != ty {
        return Err(Error::InvalidMessage(format!(
            "type {:?} where {ty} was expected",
            message.message_type()
        )));
    }
    message.decode()
}

/// A reply to the request `what` (for `group`), or why it is not one.
fn read_reply(message: &Message, what: &str, group: Option<&str>) -> Result<Reply> {
    let reply: Reply = decode(message, REPLY_TYPE)?;
    if let Some(e) = &reply.error {
        tracing::warn!(instance = %reply.instance, "inspect: an instance could not answer: {e}");
    }
    if reply.instance.is_empty() || reply.what != what || reply.group.as_deref() != group {
        return Err(Error::InvalidMessage(format!(
            "a reply to another request: {reply:?}"
        )));
    }
    Ok(reply)
}

/// This instance's members of `group` (sorted): every instance's where the transport sees
/// them, else its own process-local channels and the normal channels it added.
pub(crate) fn members_of<T: Transport>(
    transport: &T,
    inbound: &Inbound,
    group: &str,
) -> Vec<String> {
    let mut members = match transport.group_members(group) {
        Some(all) => all,
        None => (inbound.groups().members(group).into_iter())
            .chain(inbound.normal_groups().members(group))
            .map(|m| m.to_string())
            .collect(),
    };
    members.sort_unstable();
    members.dedup();
    members
}

/// Starts answering requests, where this instance should (option `inspect`, a
/// cross-process backend): joins [`GROUP`] with a hidden channel now, and spawns the task
/// that answers until the instance closes. A failed join is logged and tried again by the
/// task; it never fails the connect.
pub(crate) async fn start<T: Transport>(
    transport: &Arc<T>,
    inbound: &Arc<Inbound>,
    groups: &Arc<GroupState>,
    caps: Capabilities,
) {
    if !inbound.options().inspect || !caps.cross_process {
        return;
    }
    let channel = match inbound.naming().new_channel(RESPONDER_PREFIX, inbound.id()) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "inspect: no channel to answer on; this instance will not answer");
            return;
        }
    };
    let joined = join(&**transport, inbound, groups, &channel).await;
    if let Err(e) = &joined {
        tracing::warn!(error = %e, "inspect: could not join {GROUP}; trying again in the background");
    }
    tokio::spawn(serve(
        Arc::downgrade(transport),
        inbound.clone(),
        groups.clone(),
        caps.backend,
        channel,
        joined.is_ok(),
    ));
}

/// Adds `channel` to [`GROUP`] for good ([`GroupRegistry::pin`](crate::groups::GroupRegistry::pin)),
/// bound at the transport.
async fn join<T: Transport>(
    transport: &T,
    inbound: &Inbound,
    groups: &GroupState,
    channel: &str,
) -> Result<()> {
    let _one = groups.bindings.lock().await;
    inbound.closed().check()?;
    if inbound.groups().pin(GROUP, channel) {
        if let Err(e) = transport.bind_group(GROUP).await {
            inbound.groups().discard(GROUP, channel);
            return Err(e);
        }
    }
    Ok(())
}

/// The answering task: joins if [`start`] could not, then answers each request on
/// `channel` until the instance closes or is dropped.
async fn serve<T: Transport>(
    transport: Weak<T>,
    inbound: Arc<Inbound>,
    groups: Arc<GroupState>,
    backend: &'static str,
    channel: String,
    mut joined: bool,
) {
    let mut retry = Duration::from_secs(1);
    while !joined {
        tokio::select! {
            _ = inbound.closed().closed() => return,
            _ = tokio::time::sleep(retry) => {}
        }
        let Some(t) = transport.upgrade() else {
            return;
        };
        match join(&*t, &inbound, &groups, &channel).await {
            Ok(()) => joined = true,
            Err(e) => tracing::debug!(error = %e, "inspect: joining {GROUP} failed again"),
        }
        retry = (retry * 2).min(Duration::from_secs(30));
    }
    // The hidden channel's own counts (expired requests) stay out of the instance's.
    let uncounted = Stats::default();
    let mut skipped = 0u64;
    let inbox = inbound.inbox();
    while let Ok(entry) = inbox.take(&channel, &uncounted, inbound.closed()).await {
        let Some(t) = transport.upgrade() else {
            return;
        };
        if let Err(e) = answer(&*t, &inbound, backend, entry.envelope.into_message()).await {
            skipped += 1;
            tracing::debug!(skipped, error = %e, "inspect: skipped a request");
        }
    }
}

/// Answers one request: to its `reply_to`, unless that is this instance's own.
async fn answer<T: Transport>(
    transport: &T,
    inbound: &Inbound,
    backend: &'static str,
    message: Message,
) -> Result<()> {
    let request: Request = decode(&message, REQUEST_TYPE)?;
    names::validate_channel(&request.reply_to)?;
    let Some(owner) = inbound.naming().owner(&request.reply_to) else {
        return Err(Error::InvalidMessage(format!(
            "reply_to {:?} is not a process-local channel",
            request.reply_to
        )));
    };
    if owner == inbound.id() {
        // This instance asked: it knows its own.
        return Ok(());
    }
    let mut reply = Reply {
        v: VERSION,
        instance: inbound.id().to_owned(),
        backend: backend.to_owned(),
        what: request.what.clone(),
        group: request.group.clone(),
        ..Reply::default()
    };
    match (request.what.as_str(), request.group.as_deref()) {
        ("groups", Some(g)) => match names::validate_group(g) {
            Ok(()) => reply.members = Some(members_of(transport, inbound, g)),
            Err(e) => reply.error = Some(e.to_string()),
        },
        ("stats", _) => reply.stats = Some(inbound.stats().snapshot()),
        (other, _) => {
            reply.error = Some(format!(
                "unknown request {other:?}: this instance answers \"groups\" (with a group) and \"stats\""
            ))
        }
    }
    let message = Message::encode_as(REPLY_TYPE, &reply, Codec::Json)?;
    let env = Envelope::seal_unaddressed(
        Destination::Channel,
        &request.reply_to,
        message,
        inbound.options(),
    )?;
    transport
        .publish_local(owner, Outgoing::new(env, &request.reply_to))
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_read_across_versions() {
        // A newer instance's reply with a field this version does not know, and an older
        // one's stats without a counter added since.
        let newer = Message::encode_as(
            REPLY_TYPE,
            &serde_json::json!({"v": 2, "instance": "i1", "backend": "amqp", "what": "stats",
                "stats": {"sent": 3, "future_counter": 9}, "uptime": 12}),
            Codec::Json,
        )
        .expect("json");
        let r = read_reply(&newer, "stats", None).expect("a reply");
        assert_eq!(r.instance, "i1");
        assert_eq!(
            r.stats,
            Some(StatsSnapshot {
                sent: 3,
                ..StatsSnapshot::default()
            })
        );
        let other = Message::encode_as(
            REPLY_TYPE,
            &serde_json::json!({"instance": "i1", "what": "groups", "group": "g", "members": []}),
            Codec::Json,
        )
        .expect("json");
        assert!(
            read_reply(&other, "groups", Some("h")).is_err(),
            "another group"
        );
        assert!(
            read_reply(&other, "stats", None).is_err(),
            "another request"
        );
        let garbage = Message::new(REPLY_TYPE, Codec::Json, b"{not json".to_vec());
        assert!(read_reply(&garbage, "stats", None).is_err());
        let wrong = Message::encode_as("chat", &1, Codec::Json).expect("json");
        assert!(read_reply(&wrong, "stats", None).is_err());
    }
}
