//! Unit tests of the local inbox.

use super::*;
use crate::{Codec, Message};

fn env(i: u64) -> Envelope {
    let m = Message::encode_as("t", &i, Codec::Bincode).expect("encode");
    Envelope::seal(Destination::Channel, "c", m, &LayerOptions::default()).expect("seal")
}

fn seq_of(e: &Entry) -> u64 {
    e.envelope.clone().into_message().decode().expect("decode")
}

#[test]
fn deliver_all_keeps_order_fans_out_groups_and_counts_full_channels() {
    let stats = Stats::default();
    let options = LayerOptions {
        capacity: 3,
        ..LayerOptions::default()
    };
    let groups = GroupRegistry::default();
    groups.add("g", "c", Duration::from_secs(60));
    groups.add("g", "d", Duration::from_secs(60));
    let inbox = LocalInbox::default();
    let group_env = |i: u64| {
        let m = Message::encode_as("t", &i, Codec::Bincode).expect("encode");
        Envelope::seal(Destination::Group, "g", m, &options).expect("seal")
    };
    // c gets 0, 1 (channel), 2 (group), then 3 and 4 find it full; d gets the group's 2.
    let mut batch = vec![env(0), env(1), group_env(2), env(3), env(4)];
    inbox.deliver_all(&mut batch, &groups, &options, &stats);
    assert!(batch.is_empty(), "everything was taken");
    let c: Vec<u64> = (0..3)
        .map(|_| seq_of(&inbox.try_take("c", &stats).expect("take")))
        .collect();
    assert_eq!(c, vec![0, 1, 2], "in order, the group copy in its place");
    assert!(inbox.try_take("c", &stats).is_none());
    assert_eq!(seq_of(&inbox.try_take("d", &stats).expect("take")), 2);
    assert_eq!(stats.snapshot().dropped_full, 2);
}

#[test]
fn deliver_all_runs_of_a_channel_keep_order_and_wake_a_waiting_take() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let stats = Arc::new(Stats::default());
        let inbox = Arc::new(LocalInbox::default());
        let closed = Arc::new(CloseSignal::default());
        let waiting = {
            let (inbox, stats, closed) = (inbox.clone(), stats.clone(), closed.clone());
            tokio::spawn(async move { inbox.take("c", &stats, &closed).await })
        };
        // Let the take register as a waiter before anything arrives.
        while inbox.lock().map.get("c").is_none_or(|s| s.waiters == 0) {
            tokio::task::yield_now().await;
        }
        let to = |ch: &str, i: u64| {
            let m = Message::encode_as("t", &i, Codec::Bincode).expect("encode");
            Envelope::seal(Destination::Channel, ch, m, &LayerOptions::default()).expect("seal")
        };
        // Runs c c | e | c c: each channel in its order, every message delivered.
        let mut batch = vec![to("c", 0), to("c", 1), to("e", 2), to("c", 3), to("c", 4)];
        inbox.deliver_all(
            &mut batch,
            &GroupRegistry::default(),
            &LayerOptions::default(),
            &stats,
        );
        let first = tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("the waiting take was woken")
            .expect("task")
            .expect("take");
        assert_eq!(seq_of(&first), 0);
        let c: Vec<u64> = std::iter::from_fn(|| inbox.try_take("c", &stats))
            .map(|e| seq_of(&e))
            .collect();
        assert_eq!(c, vec![1, 3, 4]);
        assert_eq!(seq_of(&inbox.try_take("e", &stats).expect("take")), 2);
        assert_eq!(stats.snapshot().dropped_full, 0);
    });
}

#[test]
fn requeued_entries_keep_arrival_order_in_any_return_order() {
    let stats = Stats::default();
    for reverse in [false, true] {
        let inbox = LocalInbox::default();
        for i in 0..4 {
            inbox.push("c", env(i), 10, &stats).expect("push");
        }
        let mut taken: Vec<Entry> = (0..3)
            .map(|_| inbox.try_take("c", &stats).expect("take"))
            .collect();
        if reverse {
            taken.reverse();
        }
        for e in taken {
            inbox.requeue_front("c", e);
        }
        let order: Vec<u64> = (0..4)
            .map(|_| seq_of(&inbox.try_take("c", &stats).expect("take")))
            .collect();
        assert_eq!(order, vec![0, 1, 2, 3], "reverse={reverse}");
    }
}

#[test]
fn empty_slots_are_swept() {
    let stats = Stats::default();
    let inbox = LocalInbox::default();
    for i in 0..5000u64 {
        let ch = format!("c{i}");
        inbox.push(&ch, env(i), 10, &stats).expect("push");
        inbox.try_take(&ch, &stats).expect("take");
    }
    let slots = inbox.lock().map.len();
    assert!(
        slots <= 2 * SWEEP_MIN,
        "{slots} slots kept for 0 live channels"
    );
}
