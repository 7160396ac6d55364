//! Channels: collisions, process-local channels, competing readers, cancellation,
//! concurrency.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chanlayer_core::{names, Codec, Error, LayerOptions};

use crate::{assert_err, assert_quiet, caps, recv, seq_msg, seq_of, Ctx};

/// `ch1` never receives `ch11`'s messages and vice versa (normal and process-local).
pub async fn prefix_channels_do_not_collide(ctx: Ctx) {
    let l = ctx.layer().await;
    let local = l.new_channel("p").await.expect("new_channel");
    for (a, b) in [
        (ctx.name("ch1"), ctx.name("ch11")),
        (format!("{local}1"), format!("{local}11")),
    ] {
        l.send(&a, seq_msg(1, Codec::Bincode))
            .await
            .expect("send a");
        l.send(&b, seq_msg(11, Codec::Bincode))
            .await
            .expect("send b");
        assert_eq!(seq_of(&recv(&l, &b).await), 11);
        assert_eq!(seq_of(&recv(&l, &a).await), 1);
        assert_quiet(&l, &a).await;
        assert_quiet(&l, &b).await;
    }
}

/// A channel and a group with the same name do not see each other's messages.
pub async fn channel_and_group_do_not_collide(ctx: Ctx) {
    let l = ctx.layer().await;
    let same = ctx.name("same");
    let member = l.new_channel("m").await.expect("new_channel");
    l.group_add(&same, &member).await.expect("group_add");
    l.group_send(&same, seq_msg(1, Codec::Bincode))
        .await
        .expect("group_send");
    l.send(&same, seq_msg(2, Codec::Bincode))
        .await
        .expect("send");
    assert_eq!(
        seq_of(&recv(&l, &member).await),
        1,
        "the member gets the group message"
    );
    assert_eq!(
        seq_of(&recv(&l, &same).await),
        2,
        "the channel gets only its own"
    );
    assert_quiet(&l, &member).await;
    assert_quiet(&l, &same).await;
}

/// `new_channel` names contain `!` and are valid channel names owned by this instance.
pub async fn new_channel_contains_bang(ctx: Ctx) {
    let l = ctx.layer().await;
    let ch = l.new_channel("ws").await.expect("new_channel");
    assert!(ch.starts_with("ws."), "{ch} starts with the prefix");
    assert_eq!(ch.matches('!').count(), 1, "{ch} has one '!'");
    names::validate_channel(&ch).expect("a valid channel name");
    assert_eq!(names::owner_instance(&ch), Some(l.instance_id()));
}

/// 10,000 `new_channel` names are unique.
pub async fn new_channel_10000_unique(ctx: Ctx) {
    let l = ctx.layer().await;
    let mut seen = HashSet::with_capacity(10_000);
    for _ in 0..10_000 {
        let ch = l.new_channel("u").await.expect("new_channel");
        assert!(seen.insert(ch.clone()), "duplicate name {ch}");
    }
}

/// Names from two instances never collide, and their routing parts differ.
pub async fn new_channel_unique_across_instances(ctx: Ctx) {
    let a = ctx.layer().await;
    let b = ctx.layer().await;
    assert_ne!(a.instance_id(), b.instance_id());
    let mut seen = HashSet::new();
    for _ in 0..500 {
        for l in [&a, &b] {
            let ch = l.new_channel("x").await.expect("new_channel");
            assert!(seen.insert(ch.clone()), "duplicate name {ch}");
        }
    }
    let ra = a.new_channel("x").await.expect("new_channel");
    let rb = b.new_channel("x").await.expect("new_channel");
    assert_ne!(names::routing_prefix(&ra), names::routing_prefix(&rb));
}

/// Receiving on another instance's process-local channel is `NotOwner`.
pub async fn receive_other_instance_local_is_not_owner(ctx: Ctx) {
    let a = ctx.layer().await;
    let b = ctx.layer().await;
    let ch = b.new_channel("mine").await.expect("new_channel");
    assert_err(a.receive(&ch).await, "receive on another's channel", |e| {
        matches!(e, Error::NotOwner { .. })
    });
    assert_err(
        a.receive_delivery(&ch).await,
        "receive_delivery on another's channel",
        |e| matches!(e, Error::NotOwner { .. }),
    );
    // The owner still can.
    a.send(&ch, seq_msg(3, Codec::Bincode)).await.expect("send");
    assert_eq!(seq_of(&recv(&b, &ch).await), 3);
}

/// Instance A sends to B's process-local channel and B receives it.
pub async fn send_to_other_instance_local(ctx: Ctx) {
    let a = ctx.layer().await;
    let b = ctx.layer().await;
    let ch_b = b.new_channel("inbox").await.expect("new_channel");
    let ch_a = a.new_channel("inbox").await.expect("new_channel");
    for i in 0..10 {
        a.send(&ch_b, seq_msg(i, Codec::Bincode))
            .await
            .expect("a -> b");
        b.send(&ch_a, seq_msg(100 + i, Codec::Bincode))
            .await
            .expect("b -> a");
    }
    for i in 0..10 {
        assert_eq!(seq_of(&recv(&b, &ch_b).await), i);
        assert_eq!(seq_of(&recv(&a, &ch_a).await), 100 + i);
    }
}

/// Two instances receive one normal channel: with single-reader capability, 200 messages
/// are received exactly once in total; otherwise (documented broadcast) each reader gets all.
pub async fn normal_channel_two_readers(ctx: Ctx) {
    let opts = LayerOptions {
        capacity: 1000,
        ..ctx.options()
    };
    let r1 = ctx.layer_with(opts.clone()).await;
    let r2 = ctx.layer_with(opts.clone()).await;
    let sender = ctx.layer_with(opts).await;
    let ch = ctx.name("work");
    let single = caps(&r1).single_reader_normal_channels;
    let total = 200u64;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut readers = Vec::new();
    for (who, r) in [(1, r1.clone()), (2, r2.clone())] {
        let (tx, ch) = (tx.clone(), ch.clone());
        readers.push(tokio::spawn(async move {
            loop {
                match r.receive(&ch).await {
                    Ok(m) => {
                        if tx.send((who, seq_of(&m))).is_err() {
                            break;
                        }
                    }
                    Err(Error::Closed) => break,
                    Err(e) => panic!("reader {who}: {e}"),
                }
            }
        }));
    }
    for i in 0..total {
        sender
            .send(&ch, seq_msg(i, Codec::Bincode))
            .await
            .expect("send");
    }
    let expected = if single { total } else { 2 * total };
    let mut got: Vec<(u8, u64)> = Vec::new();
    while (got.len() as u64) < expected {
        match tokio::time::timeout(crate::ARRIVAL_DEADLINE, rx.recv()).await {
            Ok(Some((who, seq))) => got.push((who, seq)),
            _ => panic!("only {} of {expected} deliveries arrived", got.len()),
        }
    }
    r1.close().await.expect("close");
    r2.close().await.expect("close");
    for h in readers {
        h.await.expect("reader task");
    }
    // Nothing beyond the expected count.
    while let Ok(extra) = rx.try_recv() {
        got.push(extra);
    }
    if single {
        let seqs: Vec<u64> = got.iter().map(|(_, s)| *s).collect();
        let unique: BTreeSet<u64> = seqs.iter().copied().collect();
        assert_eq!(
            seqs.len() as u64,
            total,
            "each message received exactly once in total"
        );
        assert_eq!(
            unique,
            (0..total).collect(),
            "no message lost, none duplicated"
        );
    } else {
        for who in [1, 2] {
            let mine: BTreeSet<u64> = got
                .iter()
                .filter(|(w, _)| *w == who)
                .map(|(_, s)| *s)
                .collect();
            assert_eq!(
                mine,
                (0..total).collect(),
                "broadcast: reader {who} gets every message"
            );
        }
    }
}

/// A receive cancelled by a timeout 1,000 times while sends interleave loses no message.
pub async fn cancelled_receives_lose_nothing(ctx: Ctx) {
    let l = ctx
        .layer_with(LayerOptions {
            capacity: 1000,
            ..ctx.options()
        })
        .await;
    for ch in [
        ctx.name("cancel"),
        l.new_channel("cancel").await.expect("new_channel"),
    ] {
        let total = 200u64;
        let mut sent = 0u64;
        let mut got = Vec::new();
        for i in 0..1000u32 {
            if i % 5 == 0 && sent < total {
                l.send(&ch, seq_msg(sent, Codec::Bincode))
                    .await
                    .expect("send");
                sent += 1;
            }
            let wait = Duration::from_micros(u64::from(i % 7) * 150);
            if let Ok(r) = tokio::time::timeout(wait, l.receive(&ch)).await {
                got.push(seq_of(&r.expect("receive")));
            }
        }
        while (got.len() as u64) < total {
            got.push(seq_of(&recv(&l, &ch).await));
        }
        assert_eq!(
            got,
            (0..total).collect::<Vec<_>>(),
            "every message exactly once, in order"
        );
        assert_quiet(&l, &ch).await;
    }
}

/// Two concurrent receivers on one channel each get distinct messages, and together all.
pub async fn concurrent_receivers_get_distinct(ctx: Ctx) {
    let l = ctx
        .layer_with(LayerOptions {
            capacity: 1000,
            ..ctx.options()
        })
        .await;
    for ch in [
        ctx.name("two"),
        l.new_channel("two").await.expect("new_channel"),
    ] {
        let total = 100u64;
        let mut tasks = Vec::new();
        let counter = Arc::new(std::sync::atomic::AtomicU64::new(0));
        for _ in 0..2 {
            let (l, ch, counter) = (l.clone(), ch.clone(), counter.clone());
            tasks.push(tokio::spawn(async move {
                let mut mine = Vec::new();
                while counter.load(std::sync::atomic::Ordering::SeqCst) < total {
                    if let Ok(r) =
                        tokio::time::timeout(Duration::from_millis(50), l.receive(&ch)).await
                    {
                        mine.push(seq_of(&r.expect("receive")));
                        counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                }
                mine
            }));
        }
        for i in 0..total {
            l.send(&ch, seq_msg(i, Codec::Bincode)).await.expect("send");
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.expect("receiver task"));
        }
        all.sort_unstable();
        assert_eq!(
            all,
            (0..total).collect::<Vec<_>>(),
            "distinct messages, none lost"
        );
    }
}

/// 100 concurrent sends to one channel all arrive intact.
pub async fn concurrent_100_sends(ctx: Ctx) {
    let l = ctx
        .layer_with(LayerOptions {
            capacity: 1000,
            ..ctx.options()
        })
        .await;
    let other = ctx.layer().await;
    for ch in [
        ctx.name("conc"),
        l.new_channel("conc").await.expect("new_channel"),
    ] {
        let sends = (0..100u64).map(|i| {
            let (other, ch) = (other.clone(), ch.clone());
            tokio::spawn(async move {
                let body = format!("{i}:{}", "x".repeat(i as usize * 10));
                other
                    .send(
                        &ch,
                        chanlayer_core::Message::encode_as("test.conc", &body, Codec::Msgpack)
                            .expect("encode"),
                    )
                    .await
            })
        });
        for s in futures::future::join_all(sends).await {
            s.expect("send task").expect("send");
        }
        let mut seen = BTreeSet::new();
        for _ in 0..100 {
            let body: String = recv(&l, &ch).await.decode().expect("decode");
            let (i, pad) = body.split_once(':').expect("intact body");
            let i: u64 = i.parse().expect("intact number");
            assert_eq!(pad.len() as u64, i * 10, "intact body for {i}");
            assert!(seen.insert(i), "duplicate {i}");
        }
        assert_eq!(seen.len(), 100);
    }
}

/// `Capabilities::normal_channels`, both ways: where it is `true`, a normal channel takes a
/// send, gives it back on receive and joins a group; where it is `false`, each of those is
/// `Unsupported` (and process-local channels still work).
pub async fn normal_channels_follow_the_capability(ctx: Ctx) {
    let l = ctx.layer().await;
    let normal = ctx.name("normal");
    let group = ctx.name("g");
    if caps(&l).normal_channels {
        l.send(&normal, seq_msg(1, Codec::Bincode))
            .await
            .expect("send to a normal channel");
        assert_eq!(seq_of(&recv(&l, &normal).await), 1);
        l.group_add(&group, &normal)
            .await
            .expect("a normal channel joins a group");
    } else {
        let send = l.send(&normal, seq_msg(1, Codec::Bincode)).await;
        assert!(
            matches!(send, Err(Error::Unsupported { .. })),
            "send: {send:?}"
        );
        let receive = tokio::time::timeout(Duration::from_secs(5), l.receive(&normal)).await;
        assert!(
            matches!(receive, Ok(Err(Error::Unsupported { .. }))),
            "receive: {receive:?}"
        );
        let add = l.group_add(&group, &normal).await;
        assert!(
            matches!(add, Err(Error::Unsupported { .. })),
            "group_add: {add:?}"
        );
    }
    let local = l.new_channel("p").await.expect("new_channel");
    l.send(&local, seq_msg(2, Codec::Bincode))
        .await
        .expect("send to a process-local channel");
    assert_eq!(seq_of(&recv(&l, &local).await), 2);
}
