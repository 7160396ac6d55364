//! Capacity: `ChannelFull`, glob overrides, full group members.
//!
//! `Capabilities::broker_side_capacity` is checked both ways. Where it is `true`, a send to
//! a normal channel at capacity is `ChannelFull`, from the instance that filled it and from
//! any other. Where it is `false`, such sends are accepted (`Ok`), and every accepted
//! message is then either received or counted where it was dropped (`dropped_full`): the
//! documented weaker behaviour, never a silent loss. Process-local channels, which the flag
//! does not cover, must show one of their two documented behaviours: `ChannelFull` at send,
//! or accepted and dropped where it arrives, counted.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chanlayer_core::{ChannelLayer, Codec, Error, LayerOptions};

use crate::config_override;
use crate::{
    assert_err, assert_quiet, caps, eventually, recv, seq_msg, seq_of, Ctx, ARRIVAL_DEADLINE,
};

fn is_full(e: &Error) -> bool {
    matches!(e, Error::ChannelFull { .. })
}

/// Receives from `ch` until `accepted` messages are accounted for, each either received or
/// counted in `dropped_full` (by any instance of the test, since `dropped_before`); fails if
/// some are neither by [`ARRIVAL_DEADLINE`], or if more arrive. Returns the received seqs.
async fn received_or_counted(
    ctx: &Ctx,
    l: &Arc<dyn ChannelLayer>,
    ch: &str,
    accepted: u64,
    dropped_before: u64,
) -> Vec<u64> {
    let start = Instant::now();
    let mut got = Vec::new();
    loop {
        let dropped = ctx.stats_sum().dropped_full - dropped_before;
        let accounted = got.len() as u64 + dropped;
        if accounted >= accepted {
            assert_eq!(
                accounted, accepted,
                "{ch}: received {got:?} and counted {dropped} dropped, for {accepted} accepted"
            );
            break;
        }
        assert!(
            start.elapsed() < ARRIVAL_DEADLINE,
            "{ch}: of {accepted} accepted messages, {got:?} were received and {dropped} counted as dropped_full within {ARRIVAL_DEADLINE:?}; the rest vanished"
        );
        // A bounded receive, then the counters again (receive is cancellation-safe).
        match tokio::time::timeout(Duration::from_millis(50), l.receive(ch)).await {
            Ok(Ok(m)) => got.push(seq_of(&m)),
            Ok(Err(e)) => panic!("receive({ch}) failed: {e}"),
            Err(_) => {}
        }
    }
    assert_quiet(l, ch).await;
    got
}

/// `got` holds `0..cap` first (the messages that fit), then ascending seqs only.
fn assert_first_fit(got: &[u64], cap: u64, ch: &str) {
    assert!(
        got.len() as u64 >= cap && got[..cap as usize] == (0..cap).collect::<Vec<_>>()[..],
        "{ch}: the {cap} messages that fit arrive first, in order: {got:?}"
    );
    assert!(
        got.windows(2).all(|w| w[0] < w[1]),
        "{ch}: in order: {got:?}"
    );
}

/// Process-local channel `ch` of `owner` holds `cap` messages (seqs `0..cap`); `sender`
/// sends seq `cap`. It must be `ChannelFull` (nothing sent), or accepted and dropped where it
/// arrives, counted in `dropped_full`. Either way `owner` then receives exactly `0..cap`.
async fn one_more_to_full_local(
    ctx: &Ctx,
    sender: &Arc<dyn ChannelLayer>,
    owner: &Arc<dyn ChannelLayer>,
    ch: &str,
    cap: u64,
) {
    let dropped_before = ctx.stats_sum().dropped_full;
    match sender.send(ch, seq_msg(cap, Codec::Bincode)).await {
        Err(e @ Error::ChannelFull { .. }) => {
            assert!(
                e.to_string().contains(ch),
                "the error names the channel: {e}"
            );
            for i in 0..cap {
                assert_eq!(seq_of(&recv(owner, ch).await), i, "{ch}: in order");
            }
            assert_quiet(owner, ch).await;
        }
        Ok(()) => {
            // Nobody receives yet, so the first `cap` fill the channel where they arrive and
            // the one beyond must be dropped there, and counted.
            eventually(
                &format!("{ch}: the message accepted beyond capacity is counted in dropped_full where it arrives"),
                || ctx.stats_sum().dropped_full > dropped_before,
            )
            .await;
            assert_eq!(
                ctx.stats_sum().dropped_full,
                dropped_before + 1,
                "{ch}: one drop"
            );
            for i in 0..cap {
                assert_eq!(seq_of(&recv(owner, ch).await), i, "{ch}: in order");
            }
            assert_quiet(owner, ch).await;
        }
        Err(e) => panic!("send beyond capacity to process-local {ch}: {e}"),
    }
}

/// Capacity 3: the 4th send to a normal channel is `ChannelFull` where the backend claims
/// `broker_side_capacity`; otherwise it is accepted, and received or counted as dropped. On
/// a process-local channel, one of the two documented behaviours. After draining, sends
/// work again.
pub async fn capacity_full_then_drains(ctx: Ctx) {
    let l = ctx
        .layer_with(LayerOptions {
            capacity: 3,
            ..ctx.options()
        })
        .await;
    let exact = caps(&l).broker_side_capacity;
    let ch = ctx.name("cap");
    for i in 0..3 {
        l.send(&ch, seq_msg(i, Codec::Bincode))
            .await
            .expect("send under capacity");
    }
    let dropped_before = ctx.stats_sum().dropped_full;
    let fourth = l.send(&ch, seq_msg(3, Codec::Bincode)).await;
    if exact {
        let e = assert_err(
            fourth,
            "4th send at capacity 3 (broker_side_capacity)",
            is_full,
        );
        assert!(
            e.to_string().contains(&ch),
            "the error names the channel: {e}"
        );
        for i in 0..3 {
            assert_eq!(
                seq_of(&recv(&l, &ch).await),
                i,
                "the first three arrive in order"
            );
        }
        assert_quiet(&l, &ch).await;
    } else {
        fourth.expect("without broker_side_capacity, a send beyond capacity is accepted");
        let got = received_or_counted(&ctx, &l, &ch, 4, dropped_before).await;
        assert_first_fit(&got, 3, &ch);
    }
    l.send(&ch, seq_msg(10, Codec::Bincode))
        .await
        .expect("send after draining");
    assert_eq!(seq_of(&recv(&l, &ch).await), 10);

    let local = l.new_channel("cap").await.expect("new_channel");
    for i in 0..3 {
        l.send(&local, seq_msg(i, Codec::Bincode))
            .await
            .expect("send under capacity");
    }
    one_more_to_full_local(&ctx, &l, &l, &local, 3).await;
    l.send(&local, seq_msg(10, Codec::Bincode))
        .await
        .expect("send after draining");
    assert_eq!(seq_of(&recv(&l, &local).await), 10);
}

/// A `send_batch` of 5 to a normal channel of capacity 3. Where the backend keeps the
/// capacity at the broker, the first 3 are sent and the call says so: `PartlySent { sent: 3,
/// total: 5 }` caused by `ChannelFull`, and resending from message 3 once there is room
/// duplicates nothing; a batch refused at its first message is `ChannelFull` itself.
/// Otherwise the batch is accepted, and each message received or counted as dropped.
pub async fn send_batch_partly_refused_says_how_many_were_sent(ctx: Ctx) {
    let l = ctx
        .layer_with(LayerOptions {
            capacity: 3,
            ..ctx.options()
        })
        .await;
    let ch = ctx.name("batch-cap");
    let batch = |from: u64, to: u64| (from..to).map(|i| seq_msg(i, Codec::Bincode)).collect();
    let dropped_before = ctx.stats_sum().dropped_full;
    let sent_before = l.stats().sent;
    let r = l.send_batch(&ch, batch(0, 5)).await;
    if !caps(&l).broker_side_capacity {
        r.expect("without broker_side_capacity, the batch is accepted");
        let got = received_or_counted(&ctx, &l, &ch, 5, dropped_before).await;
        assert_first_fit(&got, 3, &ch);
        return;
    }
    let e = assert_err(
        r,
        "send_batch of 5 at capacity 3",
        |e| matches!(e, Error::PartlySent { sent: 3, total: 5, cause } if is_full(cause)),
    );
    assert!(e.to_string().contains("sent 3 of 5"), "{e}");
    assert_eq!(
        l.stats().sent - sent_before,
        3,
        "the 3 sent are counted sent"
    );
    assert_err(
        l.send_batch(&ch, batch(3, 5)).await,
        "send_batch to a full channel",
        is_full,
    );
    for i in 0..3 {
        assert_eq!(seq_of(&recv(&l, &ch).await), i, "the first three, in order");
    }
    l.send_batch(&ch, batch(3, 5))
        .await
        .expect("the rest, once there is room");
    for i in 3..5 {
        assert_eq!(seq_of(&recv(&l, &ch).await), i, "then the rest, once each");
    }
    assert_quiet(&l, &ch).await;
}

/// `broker_side_capacity`, both ways, across instances. Instance `a` fills a normal channel
/// (capacity 3) and instance `b` sends to it: where the backend claims the capacity is kept
/// at the broker, `b` gets `ChannelFull` and nothing of it is stored; where it does not,
/// `b`'s sends are accepted, and each is received or counted as dropped. A full process-local
/// channel of `a`, sent to by `b`, shows one of its two documented behaviours.
pub async fn capacity_across_instances(ctx: Ctx) {
    let opts = LayerOptions {
        capacity: 3,
        ..ctx.options()
    };
    let a = ctx.layer_with(opts.clone()).await;
    let b = ctx.layer_with(opts).await;
    let ch = ctx.name("shared-cap");
    for i in 0..3 {
        a.send(&ch, seq_msg(i, Codec::Bincode))
            .await
            .expect("a sends under capacity");
    }
    let dropped_before = ctx.stats_sum().dropped_full;
    if caps(&a).broker_side_capacity {
        let e = assert_err(
            b.send(&ch, seq_msg(3, Codec::Bincode)).await,
            "b's send to a normal channel that a filled (broker_side_capacity)",
            is_full,
        );
        assert!(
            e.to_string().contains(&ch),
            "the error names the channel: {e}"
        );
        for i in 0..3 {
            assert_eq!(seq_of(&recv(&b, &ch).await), i, "a's three, in order");
        }
        assert_quiet(&b, &ch).await;
        b.send(&ch, seq_msg(10, Codec::Bincode))
            .await
            .expect("b's send after draining");
        assert_eq!(seq_of(&recv(&b, &ch).await), 10);
    } else {
        for i in 3..6 {
            b.send(&ch, seq_msg(i, Codec::Bincode))
                .await
                .expect("without broker_side_capacity, a send beyond capacity is accepted");
        }
        let got = received_or_counted(&ctx, &b, &ch, 6, dropped_before).await;
        // Two senders: each one's messages keep their order, but the two may interleave.
        assert!(
            got.len() >= 3,
            "{ch}: at least the capacity arrives: {got:?}"
        );
        for (who, seqs) in [("a", 0..3), ("b", 3..6)] {
            let mine: Vec<u64> = got.iter().copied().filter(|s| seqs.contains(s)).collect();
            assert!(
                mine.windows(2).all(|w| w[0] < w[1]),
                "{ch}: {who}'s in order: {got:?}"
            );
        }
    }

    let local = a.new_channel("cap").await.expect("new_channel");
    for i in 0..3 {
        b.send(&local, seq_msg(i, Codec::Bincode))
            .await
            .expect("b sends under capacity to a's channel");
    }
    one_more_to_full_local(&ctx, &b, &a, &local, 3).await;
}

/// `channel_capacity` glob overrides apply by full channel name, first match wins.
pub async fn channel_capacity_glob_override(ctx: Ctx) {
    let opts = config_override(
        LayerOptions {
            capacity: 5,
            ..ctx.options()
        },
        &[(&format!("{}.small.*", ctx.ns()), 2), ("*", 4)],
    );
    let l = ctx.layer_with(opts).await;
    // Process-local channels count against their own full name, on every backend.
    let local = l.new_channel("loc").await.expect("new_channel");
    for i in 0..4 {
        l.send(&local, seq_msg(i, Codec::Bincode))
            .await
            .expect("send local");
    }
    one_more_to_full_local(&ctx, &l, &l, &local, 4).await;
    if !caps(&l).broker_side_capacity {
        // Normal channels: broker-side capacity is not claimed; the override is still read.
        assert_eq!(l.options().capacity_for(&ctx.name("small.x")), 2);
        return;
    }
    let small = ctx.name("small.x");
    let other = ctx.name("big.x");
    for i in 0..2 {
        l.send(&small, seq_msg(i, Codec::Bincode))
            .await
            .expect("send");
    }
    assert_err(
        l.send(&small, seq_msg(2, Codec::Bincode)).await,
        "3rd send to small.*",
        is_full,
    );
    for i in 0..4 {
        l.send(&other, seq_msg(i, Codec::Bincode))
            .await
            .expect("send");
    }
    assert_err(
        l.send(&other, seq_msg(4, Codec::Bincode)).await,
        "5th send to * (4)",
        is_full,
    );
}

/// `group_send` to a group with a full member raises nothing, the other members still get
/// the message, and the skipped copy is counted.
pub async fn group_send_full_member_skipped_and_counted(ctx: Ctx) {
    let l = ctx
        .layer_with(LayerOptions {
            capacity: 1,
            ..ctx.options()
        })
        .await;
    let group = ctx.name("g");
    let full = l.new_channel("full").await.expect("new_channel");
    let free = l.new_channel("free").await.expect("new_channel");
    l.group_add(&group, &full).await.expect("group_add");
    l.group_add(&group, &free).await.expect("group_add");
    l.send(&full, seq_msg(0, Codec::Bincode))
        .await
        .expect("fill the member");
    let before = ctx.stats_sum().group_member_full;
    l.group_send(&group, seq_msg(1, Codec::Bincode))
        .await
        .expect("group_send never fails for capacity");
    assert_eq!(seq_of(&recv(&l, &free).await), 1, "the free member gets it");
    eventually("the skipped copy is counted", || {
        ctx.stats_sum().group_member_full > before
    })
    .await;
    assert_eq!(
        seq_of(&recv(&l, &full).await),
        0,
        "the full member kept its message"
    );
    crate::assert_quiet(&l, &full).await;
}
