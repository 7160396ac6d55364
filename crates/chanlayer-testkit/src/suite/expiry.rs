//! Message expiry. These tests wait for time to pass on purpose: the passing of time is the
//! behaviour under test.

use std::time::Duration;

use chanlayer_core::{Codec, LayerOptions};

use crate::{assert_quiet, eventually, let_time_pass, recv, seq_msg, seq_of, Ctx};

/// The earliest message expires while later ones are still live: they arrive, it does not,
/// and the drop is counted.
pub async fn expiry_earliest_expires_later_arrive(ctx: Ctx) {
    let l = ctx
        .layer_with(LayerOptions {
            expiry: Duration::from_millis(2000),
            ..ctx.options()
        })
        .await;
    let local = l.new_channel("exp").await.expect("new_channel");
    let channels = [ctx.name("exp"), local];
    let before = ctx.stats_sum().expired;
    for ch in &channels {
        l.send(ch, seq_msg(1, Codec::Bincode))
            .await
            .expect("send 1");
    }
    let_time_pass(Duration::from_millis(1200)).await;
    for ch in &channels {
        l.send(ch, seq_msg(2, Codec::Bincode))
            .await
            .expect("send 2");
    }
    let_time_pass(Duration::from_millis(1200)).await;
    for ch in &channels {
        l.send(ch, seq_msg(3, Codec::Bincode))
            .await
            .expect("send 3");
    }
    for ch in &channels {
        assert_eq!(
            seq_of(&recv(&l, ch).await),
            2,
            "message 1 expired, 2 is next"
        );
        assert_eq!(seq_of(&recv(&l, ch).await), 3);
    }
    eventually("expired messages are counted", || {
        ctx.stats_sum().expired >= before + 2
    })
    .await;
}

/// Everything received before its expiry arrives, in order.
pub async fn expiry_unexpired_arrive_in_order(ctx: Ctx) {
    let l = ctx
        .layer_with(LayerOptions {
            expiry: Duration::from_secs(5),
            ..ctx.options()
        })
        .await;
    let ch = l.new_channel("ok").await.expect("new_channel");
    for i in 0..5 {
        l.send(&ch, seq_msg(i, Codec::Bincode)).await.expect("send");
    }
    let_time_pass(Duration::from_millis(500)).await;
    for i in 5..10 {
        l.send(&ch, seq_msg(i, Codec::Bincode)).await.expect("send");
    }
    for i in 0..10 {
        assert_eq!(seq_of(&recv(&l, &ch).await), i);
    }
    assert_eq!(ctx.stats_sum().expired, 0, "nothing expired early");
}

/// Messages sent with `group_send` expire too.
pub async fn expiry_group_messages(ctx: Ctx) {
    let l = ctx
        .layer_with(LayerOptions {
            expiry: Duration::from_millis(1000),
            ..ctx.options()
        })
        .await;
    let group = ctx.name("g");
    let member = l.new_channel("m").await.expect("new_channel");
    l.group_add(&group, &member).await.expect("group_add");
    let before = ctx.stats_sum().expired;
    l.group_send(&group, seq_msg(1, Codec::Bincode))
        .await
        .expect("group_send");
    let_time_pass(Duration::from_millis(1400)).await;
    l.group_send(&group, seq_msg(2, Codec::Bincode))
        .await
        .expect("group_send");
    assert_eq!(
        seq_of(&recv(&l, &member).await),
        2,
        "the expired group message is dropped"
    );
    assert_quiet(&l, &member).await;
    eventually("the expired group message is counted", || {
        ctx.stats_sum().expired > before
    })
    .await;
}
