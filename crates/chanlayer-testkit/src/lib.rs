//! # chanlayer-testkit
//!
//! The conformance suite every chanlayer backend runs: one public async function per
//! behaviour in [`suite`], and [`conformance_tests!`] to turn all of them into `#[test]`s for
//! a [`LayerFactory`].
//!
//! The suite is driven by [`Capabilities`]: where a backend says it cannot do something, the
//! test checks that it reports `Unsupported` or shows the documented weaker behaviour; it
//! never passes silently.
//!
//! ```text
//! // crates/chanlayer-foo/tests/conformance.rs
//! chanlayer_testkit::conformance_tests!(chanlayer_foo::testing::Factory::new());
//! ```
//!
//! Each test runs in its own namespace ([`Ctx::ns`]), so tests can share one broker and run
//! in parallel. A backend that needs a broker must fail loudly when it is missing: the
//! factory's `connect` returns the error and the test panics with it.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
pub use chanlayer_core;
use chanlayer_core::{
    Capabilities, ChannelLayer, Codec, Error, LayerOptions, Message, Result, StatsSnapshot,
};

pub mod memory;
pub mod options;
pub mod peer;
pub mod secrets;
pub mod suite;

pub use memory::MemoryFactory;

/// How long a single conformance test may run before it fails as hung.
pub const TEST_DEADLINE: Duration = Duration::from_secs(120);
/// How long the suite waits for a message that should arrive.
pub const ARRIVAL_DEADLINE: Duration = Duration::from_secs(15);
/// How long the suite watches a channel that should stay empty.
pub const QUIET_PERIOD: Duration = Duration::from_millis(300);

/// Feeds raw bytes to a layer instance the way its broker would deliver them, so the suite
/// can check that garbage is skipped and counted.
#[async_trait]
pub trait RawInjector: Send + Sync {
    /// Puts `bytes` where messages for `channel` travel (the instance's inbox topic or queue,
    /// the channel's queue), bypassing the layer's own encoding.
    async fn inject(&self, channel: &str, bytes: Vec<u8>) -> Result<()>;
}

/// A layer instance made for a test, with its raw-bytes hook.
pub struct TestLayer {
    /// The instance.
    pub layer: Arc<dyn ChannelLayer>,
    /// Its raw-bytes hook.
    pub injector: Arc<dyn RawInjector>,
}

/// Makes layer instances for the suite.
#[async_trait]
pub trait LayerFactory: Send + Sync + 'static {
    /// Connects a new instance. Instances connected with the same `ns` must share a broker
    /// namespace (they see each other's channels and groups); different `ns` must not
    /// interfere. `options` carries the shared options the test needs (capacity, expiry...);
    /// `options.prefix` is already set to `ns`.
    async fn connect(&self, ns: &str, options: LayerOptions) -> Result<TestLayer>;
}

#[derive(Default)]
struct CtxInner {
    layers: Vec<TestLayer>,
}

/// One test's context: its namespace, and every instance it connected (closed at the end).
#[derive(Clone)]
pub struct Ctx {
    factory: Arc<dyn LayerFactory>,
    ns: String,
    inner: Arc<Mutex<CtxInner>>,
}

impl Ctx {
    fn new(factory: Arc<dyn LayerFactory>) -> Self {
        let ns = format!("t{:016x}", rand_u64());
        Ctx {
            factory,
            ns,
            inner: Arc::default(),
        }
    }

    /// This test's namespace (unique per test run).
    pub fn ns(&self) -> &str {
        &self.ns
    }

    /// A channel or group name inside this test's namespace: `"{ns}.{suffix}"`.
    pub fn name(&self, suffix: &str) -> String {
        format!("{}.{suffix}", self.ns)
    }

    /// Default options for this test (prefix = namespace).
    pub fn options(&self) -> LayerOptions {
        LayerOptions {
            prefix: self.ns.clone(),
            ..LayerOptions::default()
        }
    }

    /// A new instance with default options.
    pub async fn layer(&self) -> Arc<dyn ChannelLayer> {
        self.layer_with(self.options()).await
    }

    /// A new instance with `options` (its prefix is forced to the namespace).
    pub async fn layer_with(&self, mut options: LayerOptions) -> Arc<dyn ChannelLayer> {
        options.prefix = self.ns.clone();
        let t = match self.factory.connect(&self.ns, options).await {
            Ok(t) => t,
            Err(e) => panic!("the layer factory could not connect (is the broker running?): {e}"),
        };
        let layer = t.layer.clone();
        lock(&self.inner).layers.push(t);
        layer
    }

    /// The raw-bytes hook of `layer` (an instance this context connected).
    pub fn injector(&self, layer: &Arc<dyn ChannelLayer>) -> Arc<dyn RawInjector> {
        lock(&self.inner)
            .layers
            .iter()
            .find(|t| Arc::ptr_eq(&t.layer, layer))
            .map(|t| t.injector.clone())
            .expect("injector() takes an instance made by this Ctx")
    }

    /// The counters of every instance this test connected, added up.
    pub fn stats_sum(&self) -> StatsSnapshot {
        lock(&self.inner)
            .layers
            .iter()
            .fold(StatsSnapshot::default(), |acc, t| acc.sum(t.layer.stats()))
    }

    async fn close_all(&self) {
        let layers: Vec<_> = lock(&self.inner)
            .layers
            .iter()
            .map(|t| t.layer.clone())
            .collect();
        for l in layers {
            let _ = l.close().await;
        }
    }
}

use chanlayer_core::toolkit::lock;

fn rand_u64() -> u64 {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    let mut h = RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

/// Runs one suite function against `factory` on a fresh two-worker runtime, with
/// [`TEST_DEADLINE`]; panics (fails the test) on any failure or on a hang. Every instance the
/// test connected is closed afterwards.
pub fn run_test<F, Fut>(factory: Arc<dyn LayerFactory>, name: &str, test: F)
where
    F: FnOnce(Ctx) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime must build for the test");
    let ctx = Ctx::new(factory);
    let fut = test(ctx.clone());
    rt.block_on(async move {
        let handle = tokio::spawn(fut);
        let outcome = tokio::time::timeout(TEST_DEADLINE, handle).await;
        ctx.close_all().await;
        match outcome {
            Err(_) => panic!("conformance test {name} did not finish within {TEST_DEADLINE:?}"),
            Ok(Err(e)) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Ok(Err(e)) => panic!("conformance test {name} was cancelled: {e}"),
            Ok(Ok(())) => {}
        }
    });
}

/// Expands to one `#[test]` per conformance behaviour, for the factory expression given.
///
/// ```
/// // In a backend's tests/conformance.rs this is one line:
/// // chanlayer_testkit::conformance_tests!(my_backend_factory());
/// // A second form runs a subset, by suite function name:
/// chanlayer_testkit::conformance_tests!(chanlayer_testkit::MemoryFactory; names_valid_pass, fifo_1000_local);
/// # fn main() {}
/// ```
#[macro_export]
macro_rules! conformance_tests {
    ($factory:expr) => {
        $crate::conformance_tests!($factory;
            names_valid_pass,
            names_99_pass_100_fail,
            names_non_ascii_fails,
            names_trailing_newline_fails,
            names_question_mark_fails,
            names_two_bangs_fail,
            names_empty_fails,
            names_bang_in_group_fails,
            round_trip_bincode,
            round_trip_msgpack,
            round_trip_json,
            receive_started_before_send,
            fifo_1000_local,
            prefix_channels_do_not_collide,
            channel_and_group_do_not_collide,
            new_channel_contains_bang,
            new_channel_10000_unique,
            new_channel_unique_across_instances,
            receive_other_instance_local_is_not_owner,
            send_to_other_instance_local,
            normal_channel_two_readers,
            normal_channels_follow_the_capability,
            cancelled_receives_lose_nothing,
            concurrent_receivers_get_distinct,
            one_mib_round_trip,
            too_large_fails_before_sending,
            invalid_type_fails,
            capacity_full_then_drains,
            send_batch_partly_refused_says_how_many_were_sent,
            capacity_across_instances,
            channel_capacity_glob_override,
            group_send_full_member_skipped_and_counted,
            expiry_earliest_expires_later_arrive,
            expiry_unexpired_arrive_in_order,
            expiry_group_messages,
            group_discard_excludes,
            group_add_twice_one_copy,
            group_discard_absent_and_empty_send_ok,
            group_same_prefix_members_one_copy_each,
            group_members_on_two_instances,
            group_members_lists_the_members,
            inspect_answers_from_every_other_instance,
            group_membership_expires_and_refreshes,
            group_membership_expires_normal_channels,
            group_send_1000_members,
            flush_empties_messages_and_groups,
            close_fails_pending_receive,
            close_fails_later_calls,
            close_is_idempotent,
            close_racing_traffic_does_not_deadlock,
            concurrent_100_sends,
            concurrent_100_group_sends,
            undecodable_bytes_skipped_and_counted,
            codec_struct_and_enum_round_trip,
            codec_tagged_enum,
            unacked_delivery_comes_back,
            nack_redelivers,
            poison_message_goes_to_the_dead_letter_channel,
            failing_batch_handler_gets_batch_again,
            succeeding_batch_handler_commits,
            local_delivery_follows_at_least_once_local,
        );
    };
    ($factory:expr; $($name:ident),+ $(,)?) => {
        $(
            #[test]
            fn $name() {
                let factory: ::std::sync::Arc<dyn $crate::LayerFactory> =
                    ::std::sync::Arc::new($factory);
                $crate::run_test(factory, stringify!($name), $crate::suite::$name);
            }
        )+
    };
}

// ---- helpers for suite functions ----

/// A small test message `{type: "test.seq", body: i}` in `codec`.
pub fn seq_msg(i: u64, codec: Codec) -> Message {
    Message::encode_as("test.seq", &i, codec).expect("a u64 encodes in every codec")
}

/// The sequence number in a [`seq_msg`].
pub fn seq_of(m: &Message) -> u64 {
    assert_eq!(m.message_type(), "test.seq", "unexpected message {m:?}");
    m.decode::<u64>().expect("a seq_msg body decodes")
}

/// Receives from `channel`, failing the test if nothing comes within [`ARRIVAL_DEADLINE`].
pub async fn recv(layer: &Arc<dyn ChannelLayer>, channel: &str) -> Message {
    match tokio::time::timeout(ARRIVAL_DEADLINE, layer.receive(channel)).await {
        Ok(Ok(m)) => m,
        Ok(Err(e)) => panic!("receive({channel}) failed: {e}"),
        Err(_) => panic!("nothing arrived on {channel} within {ARRIVAL_DEADLINE:?}"),
    }
}

/// Asserts that nothing arrives on `channel` within [`QUIET_PERIOD`] (a bounded watch for
/// something that must not happen, not a sleep).
pub async fn assert_quiet(layer: &Arc<dyn ChannelLayer>, channel: &str) {
    match tokio::time::timeout(QUIET_PERIOD, layer.receive(channel)).await {
        Err(_) => {}
        Ok(Ok(m)) => panic!("expected nothing on {channel}, got {m:?}"),
        Ok(Err(e)) => panic!("receive({channel}) failed: {e}"),
    }
}

/// Polls `cond` until it is true, failing the test after [`ARRIVAL_DEADLINE`].
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    while !cond() {
        if start.elapsed() > ARRIVAL_DEADLINE {
            panic!("{what}: not true within {ARRIVAL_DEADLINE:?}");
        }
        tick.tick().await;
    }
}

/// Lets wall-clock time pass so that messages or memberships age. Only the expiry tests use
/// it: there the passing of time is the behaviour under test, not a wait for an event (waits
/// for events use [`recv`] or [`eventually`], which poll with a deadline).
pub async fn let_time_pass(d: Duration) {
    tokio::time::sleep(d).await;
}

/// Asserts `r` is the error `pred` accepts, with a readable failure.
pub fn assert_err<T: std::fmt::Debug>(
    r: Result<T>,
    what: &str,
    pred: impl Fn(&Error) -> bool,
) -> Error {
    match r {
        Ok(v) => panic!("{what}: expected an error, got Ok({v:?})"),
        Err(e) if pred(&e) => e,
        Err(e) => panic!("{what}: wrong error: {e:?}"),
    }
}

/// `options` with `channel_capacity` overrides appended (glob, capacity), in order.
pub fn config_override(mut options: LayerOptions, overrides: &[(&str, usize)]) -> LayerOptions {
    for (pattern, cap) in overrides {
        options.channel_capacity.push(
            chanlayer_core::config::CapacityOverride::new(pattern, *cap)
                .expect("a valid glob in the suite"),
        );
    }
    options
}

/// The capabilities of a layer (shorthand).
pub fn caps(layer: &Arc<dyn ChannelLayer>) -> Capabilities {
    layer.capabilities()
}
