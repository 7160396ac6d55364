//! Capacity: `ChannelFull`, glob overrides, full group members.

use chanlayer_core::{Codec, Error, LayerOptions};

use crate::config_override;
use crate::{assert_err, caps, eventually, recv, seq_msg, seq_of, Ctx};

fn is_full(e: &Error) -> bool {
    matches!(e, Error::ChannelFull { .. })
}

/// Capacity 3: the 4th send is `ChannelFull`; after draining, sends work again.
pub async fn capacity_full_then_drains(ctx: Ctx) {
    let l = ctx
        .layer_with(LayerOptions {
            capacity: 3,
            ..ctx.options()
        })
        .await;
    let exact = caps(&l).broker_side_capacity;
    for ch in [
        ctx.name("cap"),
        l.new_channel("cap").await.expect("new_channel"),
    ] {
        for i in 0..3 {
            l.send(&ch, seq_msg(i, Codec::Bincode))
                .await
                .expect("send under capacity");
        }
        let fourth = l.send(&ch, seq_msg(3, Codec::Bincode)).await;
        if exact {
            let e = assert_err(fourth, "4th send at capacity 3", is_full);
            assert!(
                e.to_string().contains(&ch),
                "the error names the channel: {e}"
            );
        } else {
            // Documented weaker guarantee: capacity is enforced by the receiving inbox only.
            assert!(
                matches!(fourth, Ok(()) | Err(Error::ChannelFull { .. })),
                "{fourth:?}"
            );
        }
        for i in 0..3 {
            assert_eq!(
                seq_of(&recv(&l, &ch).await),
                i,
                "the first three arrive in order"
            );
        }
        if !exact {
            // Drain whatever the weaker backend accepted.
            let _ = tokio::time::timeout(crate::QUIET_PERIOD, l.receive(&ch)).await;
        }
        l.send(&ch, seq_msg(10, Codec::Bincode))
            .await
            .expect("send after draining");
        assert_eq!(seq_of(&recv(&l, &ch).await), 10);
    }
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
    if !caps(&l).broker_side_capacity {
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
    // Process-local channels count against their own full name.
    let local = l.new_channel("loc").await.expect("new_channel");
    for i in 0..4 {
        l.send(&local, seq_msg(i, Codec::Bincode))
            .await
            .expect("send local");
    }
    assert_err(
        l.send(&local, seq_msg(4, Codec::Bincode)).await,
        "5th send to local",
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
