//! [`Instance`]: what one layer instance shares between its transport, its receiver thread,
//! its forwarder task and its normal-channel consumers. Every other part of the crate that needs it imports it from here.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::AtomicI64;
use std::sync::{Arc, Mutex};

use chanlayer_core::toolkit::{lock, Inbound};

use crate::config::KafkaConfig;
use crate::producer::Sender;
use crate::topics::{Names, Topics};

/// The key of the notice a closing instance puts on the groups topic (its id as the value).
/// Group names cannot contain `!`, so it never collides with a group.
pub(crate) const CLOSED_KEY: &[u8] = b"!closed";

/// Everything one layer instance shares with its threads and tasks.
pub(crate) struct Instance {
    pub cfg: KafkaConfig,
    /// `client.id` of this instance's librdkafka clients.
    pub client_id: String,
    pub names: Names,
    /// Core's side of the instance: id, options, counters, close signal, local inbox,
    /// group registries, and the ingest path.
    pub inbound: Arc<Inbound>,
    pub topics: Topics,
    pub sender: Sender,
    /// Inbox offsets below this were sent before a `flush`: the receiver drops them.
    pub inbox_skip_below: AtomicI64,
    /// Instances that announced their close: their process-local channels are gone.
    pub closed_instances: ClosedInstances,
}

/// The instances known to have closed (at most [`ClosedInstances::CAP`], oldest forgotten
/// first).
#[derive(Default)]
pub(crate) struct ClosedInstances(Mutex<(HashSet<String>, VecDeque<String>)>);

impl ClosedInstances {
    const CAP: usize = 65_536;

    pub fn insert(&self, id: &str) {
        let mut g = lock(&self.0);
        if g.0.insert(id.to_owned()) {
            g.1.push_back(id.to_owned());
            if g.1.len() > Self::CAP {
                if let Some(old) = g.1.pop_front() {
                    g.0.remove(&old);
                }
            }
        }
    }

    pub fn contains(&self, id: &str) -> bool {
        lock(&self.0).0.contains(id)
    }
}
