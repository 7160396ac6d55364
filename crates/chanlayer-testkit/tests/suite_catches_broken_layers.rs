//! The suite can fail: layers with deliberate bugs must fail the tests that cover them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chanlayer_core::toolkit::Acknowledger;
use chanlayer_core::{
    AckHandle, Capabilities, ChannelLayer, Delivery, LayerOptions, Message, Result, StatsSnapshot,
};
use chanlayer_testkit::{run_test, suite, Ctx, LayerFactory, MemoryFactory, TestLayer};

/// What a broken layer gets wrong.
#[derive(Clone, Copy, Debug)]
enum Bug {
    /// Silently drops every 10th `send`.
    DropEveryTenth,
    /// Delivers group messages to nobody.
    IgnoreGroups,
    /// Never reports `ChannelFull` (sends succeed and vanish).
    NoCapacity,
    /// Claims `broker_side_capacity: false` while sends to a full normal channel are
    /// `ChannelFull`.
    ClaimsNoBrokerCapacity,
    /// Claims `at_least_once_local: false` while process-local deliveries can be nacked.
    ClaimsAtMostOnceLocal,
    /// `nack` acknowledges: a nacked delivery never comes back.
    NackAcks,
}

/// Settles a delivery with `ack` whatever it is asked (the `NackAcks` bug).
struct AlwaysAck(Option<AckHandle>);

#[async_trait]
impl Acknowledger for AlwaysAck {
    async fn ack(&mut self) -> Result<()> {
        match self.0.take() {
            Some(h) => h.ack().await,
            None => Ok(()),
        }
    }
    async fn nack(&mut self) -> Result<()> {
        self.ack().await
    }
}

/// The memory layer with one bug.
struct Broken {
    inner: Arc<dyn ChannelLayer>,
    bug: Bug,
    sends: AtomicU64,
}

#[async_trait]
impl ChannelLayer for Broken {
    fn capabilities(&self) -> Capabilities {
        let caps = self.inner.capabilities();
        match self.bug {
            Bug::ClaimsNoBrokerCapacity => Capabilities {
                broker_side_capacity: false,
                ..caps
            },
            Bug::ClaimsAtMostOnceLocal => Capabilities {
                at_least_once_local: false,
                ..caps
            },
            _ => caps,
        }
    }
    fn options(&self) -> &LayerOptions {
        self.inner.options()
    }
    fn instance_id(&self) -> &str {
        self.inner.instance_id()
    }
    fn stats(&self) -> StatsSnapshot {
        self.inner.stats()
    }
    async fn send(&self, channel: &str, message: Message) -> Result<()> {
        let n = self.sends.fetch_add(1, Ordering::SeqCst) + 1;
        match self.bug {
            Bug::DropEveryTenth if n % 10 == 0 => Ok(()),
            Bug::NoCapacity => match self.inner.send(channel, message).await {
                Err(chanlayer_core::Error::ChannelFull { .. }) => Ok(()),
                other => other,
            },
            _ => self.inner.send(channel, message).await,
        }
    }
    async fn receive(&self, channel: &str) -> Result<Message> {
        self.inner.receive(channel).await
    }
    async fn receive_delivery(&self, channel: &str) -> Result<Delivery> {
        let d = self.inner.receive_delivery(channel).await?;
        match self.bug {
            Bug::NackAcks => {
                let (message, info, handle) = d.into_parts();
                let handle = AckHandle::new(Box::new(AlwaysAck(Some(handle))));
                Ok(Delivery::new(message, info, handle))
            }
            _ => Ok(d),
        }
    }
    async fn receive_batch(
        &self,
        channel: &str,
        max: usize,
        timeout: Duration,
    ) -> Result<Vec<Delivery>> {
        self.inner.receive_batch(channel, max, timeout).await
    }
    async fn new_channel(&self, prefix: &str) -> Result<String> {
        self.inner.new_channel(prefix).await
    }
    async fn group_add(&self, group: &str, channel: &str) -> Result<()> {
        self.inner.group_add(group, channel).await
    }
    async fn group_discard(&self, group: &str, channel: &str) -> Result<()> {
        self.inner.group_discard(group, channel).await
    }
    async fn group_send(&self, group: &str, message: Message) -> Result<()> {
        match self.bug {
            Bug::IgnoreGroups => Ok(()),
            _ => self.inner.group_send(group, message).await,
        }
    }
    async fn flush(&self) -> Result<()> {
        self.inner.flush().await
    }
    async fn close(&self) -> Result<()> {
        self.inner.close().await
    }
}

struct BrokenFactory(Bug);

#[async_trait]
impl LayerFactory for BrokenFactory {
    async fn connect(&self, ns: &str, options: LayerOptions) -> Result<TestLayer> {
        let t = MemoryFactory.connect(ns, options).await?;
        Ok(TestLayer {
            layer: Arc::new(Broken {
                inner: t.layer,
                bug: self.0,
                sends: AtomicU64::new(0),
            }),
            injector: t.injector,
        })
    }
}

/// Runs `test` against a layer with `bug` and asserts that the test fails.
fn must_fail<F, Fut>(bug: Bug, name: &str, test: F)
where
    F: FnOnce(Ctx) -> Fut + std::panic::UnwindSafe,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let outcome = std::panic::catch_unwind(|| run_test(Arc::new(BrokenFactory(bug)), name, test));
    assert!(
        outcome.is_err(),
        "{name} passed against a layer that has bug {bug:?}"
    );
}

#[test]
fn dropping_every_tenth_message_fails_fifo() {
    must_fail(
        Bug::DropEveryTenth,
        "fifo_1000_local",
        suite::fifo_1000_local,
    );
}

#[test]
fn dropping_every_tenth_message_fails_competing_readers() {
    must_fail(
        Bug::DropEveryTenth,
        "normal_channel_two_readers",
        suite::normal_channel_two_readers,
    );
}

#[test]
fn dropping_every_tenth_message_fails_cancellation() {
    must_fail(
        Bug::DropEveryTenth,
        "cancelled_receives_lose_nothing",
        suite::cancelled_receives_lose_nothing,
    );
}

#[test]
fn dropping_every_tenth_message_fails_concurrent_sends() {
    must_fail(
        Bug::DropEveryTenth,
        "concurrent_100_sends",
        suite::concurrent_100_sends,
    );
}

#[test]
fn ignoring_groups_fails_group_tests() {
    must_fail(
        Bug::IgnoreGroups,
        "group_discard_excludes",
        suite::group_discard_excludes,
    );
    must_fail(
        Bug::IgnoreGroups,
        "group_members_on_two_instances",
        suite::group_members_on_two_instances,
    );
}

#[test]
fn ignoring_capacity_fails_capacity_test() {
    must_fail(
        Bug::NoCapacity,
        "capacity_full_then_drains",
        suite::capacity_full_then_drains,
    );
}

#[test]
fn ignoring_capacity_fails_the_cross_instance_capacity_test() {
    must_fail(
        Bug::NoCapacity,
        "capacity_across_instances",
        suite::capacity_across_instances,
    );
}

/// `broker_side_capacity` is checked the other way too: a layer that does enforce
/// capacity at send but does not claim it fails.
#[test]
fn an_unclaimed_broker_side_capacity_fails_the_capacity_tests() {
    must_fail(
        Bug::ClaimsNoBrokerCapacity,
        "capacity_across_instances",
        suite::capacity_across_instances,
    );
    must_fail(
        Bug::ClaimsNoBrokerCapacity,
        "capacity_full_then_drains",
        suite::capacity_full_then_drains,
    );
}

/// `at_least_once_local` both ways: a nack that loses the message fails where the flag is
/// claimed, a nack that works fails where it is not.
#[test]
fn at_least_once_local_is_checked_both_ways() {
    must_fail(
        Bug::NackAcks,
        "local_delivery_follows_at_least_once_local",
        suite::local_delivery_follows_at_least_once_local,
    );
    must_fail(
        Bug::ClaimsAtMostOnceLocal,
        "local_delivery_follows_at_least_once_local",
        suite::local_delivery_follows_at_least_once_local,
    );
    must_fail(Bug::NackAcks, "nack_redelivers", suite::nack_redelivers);
}

/// The same suite functions pass against the correct layer (so the failures above are the
/// bugs, not the tests).
#[test]
fn the_correct_layer_passes_the_same_tests() {
    run_test(
        Arc::new(MemoryFactory),
        "fifo_1000_local",
        suite::fifo_1000_local,
    );
    run_test(
        Arc::new(MemoryFactory),
        "capacity_full_then_drains",
        suite::capacity_full_then_drains,
    );
    run_test(
        Arc::new(MemoryFactory),
        "capacity_across_instances",
        suite::capacity_across_instances,
    );
    run_test(
        Arc::new(MemoryFactory),
        "local_delivery_follows_at_least_once_local",
        suite::local_delivery_follows_at_least_once_local,
    );
    run_test(
        Arc::new(MemoryFactory),
        "nack_redelivers",
        suite::nack_redelivers,
    );
}
