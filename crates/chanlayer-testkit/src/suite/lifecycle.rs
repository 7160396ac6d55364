//! flush and close.

use std::time::Duration;

use chanlayer_core::{Codec, Error};

use crate::{assert_err, assert_quiet, recv, seq_msg, seq_of, Ctx};

fn is_closed(e: &Error) -> bool {
    matches!(e, Error::Closed)
}

/// `flush` empties queued messages and group memberships.
pub async fn flush_empties_messages_and_groups(ctx: Ctx) {
    let l = ctx.layer().await;
    let ch = ctx.name("f");
    let local = l.new_channel("f").await.expect("new_channel");
    let group = ctx.name("fg");
    l.group_add(&group, &local).await.expect("group_add");
    for i in 0..5 {
        l.send(&ch, seq_msg(i, Codec::Bincode)).await.expect("send");
        l.send(&local, seq_msg(i, Codec::Bincode))
            .await
            .expect("send");
    }
    l.flush().await.expect("flush");
    assert_quiet(&l, &ch).await;
    assert_quiet(&l, &local).await;
    l.group_send(&group, seq_msg(100, Codec::Bincode))
        .await
        .expect("group_send");
    assert_quiet(&l, &local).await;
    // The layer still works after a flush.
    l.send(&ch, seq_msg(7, Codec::Bincode)).await.expect("send");
    assert_eq!(seq_of(&recv(&l, &ch).await), 7);
}

/// A receive waiting when `close` is called returns `Closed`.
pub async fn close_fails_pending_receive(ctx: Ctx) {
    let l = ctx.layer().await;
    let local = l.new_channel("c").await.expect("new_channel");
    let mut pending = Vec::new();
    for ch in [ctx.name("c"), local] {
        let (l, ch) = (l.clone(), ch.clone());
        pending.push(tokio::spawn(async move { l.receive(&ch).await }));
    }
    tokio::task::yield_now().await;
    l.close().await.expect("close");
    for p in pending {
        let r = tokio::time::timeout(crate::ARRIVAL_DEADLINE, p)
            .await
            .expect("a pending receive returns after close")
            .expect("task");
        assert_err(r, "pending receive after close", is_closed);
    }
}

/// After `close` every operation returns `Closed`.
pub async fn close_fails_later_calls(ctx: Ctx) {
    let l = ctx.layer().await;
    let ch = ctx.name("c");
    let local = l.new_channel("c").await.expect("new_channel");
    l.close().await.expect("close");
    let m = || seq_msg(1, Codec::Bincode);
    assert_err(l.send(&ch, m()).await, "send", is_closed);
    assert_err(l.send_batch(&ch, vec![m()]).await, "send_batch", is_closed);
    assert_err(l.receive(&ch).await, "receive", is_closed);
    assert_err(l.receive(&local).await, "receive local", is_closed);
    assert_err(l.receive_delivery(&ch).await, "receive_delivery", is_closed);
    assert_err(
        l.receive_batch(&ch, 10, Duration::from_millis(10)).await,
        "receive_batch",
        is_closed,
    );
    assert_err(l.new_channel("x").await, "new_channel", is_closed);
    assert_err(l.group_add(&ch, &local).await, "group_add", is_closed);
    assert_err(
        l.group_discard(&ch, &local).await,
        "group_discard",
        is_closed,
    );
    assert_err(l.group_send(&ch, m()).await, "group_send", is_closed);
    assert_err(l.flush().await, "flush", is_closed);
}

/// `close` twice (or concurrently) is fine.
pub async fn close_is_idempotent(ctx: Ctx) {
    let l = ctx.layer().await;
    l.close().await.expect("close");
    l.close().await.expect("close again");
    let l2 = ctx.layer().await;
    let (a, b) = tokio::join!(l2.close(), l2.close());
    a.expect("concurrent close");
    b.expect("concurrent close");
}

/// `close` racing with sends and receives does not deadlock: every task finishes.
pub async fn close_racing_traffic_does_not_deadlock(ctx: Ctx) {
    let l = ctx.layer().await;
    let ch = ctx.name("race");
    let local = l.new_channel("race").await.expect("new_channel");
    let group = ctx.name("race-g");
    l.group_add(&group, &local).await.expect("group_add");
    let mut tasks = Vec::new();
    for t in 0..4u64 {
        let (l, ch, local, group) = (l.clone(), ch.clone(), local.clone(), group.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0.. {
                let r = match (t + i) % 4 {
                    0 => l.send(&ch, seq_msg(i, Codec::Bincode)).await,
                    1 => l.group_send(&group, seq_msg(i, Codec::Bincode)).await,
                    2 => tokio::time::timeout(Duration::from_millis(5), l.receive(&local))
                        .await
                        .unwrap_or(Ok(seq_msg(0, Codec::Bincode)))
                        .map(|_| ()),
                    _ => tokio::time::timeout(Duration::from_millis(5), l.receive(&ch))
                        .await
                        .unwrap_or(Ok(seq_msg(0, Codec::Bincode)))
                        .map(|_| ()),
                };
                match r {
                    Err(Error::Closed) => return i,
                    Ok(()) | Err(Error::ChannelFull { .. }) => {}
                    Err(e) => panic!("unexpected error while racing close: {e}"),
                }
            }
            unreachable!("the loop only ends with Closed")
        }));
    }
    // Let traffic flow for a moment, measured in operations rather than time.
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    for _ in 0..10 {
        tick.tick().await;
    }
    tokio::time::timeout(crate::ARRIVAL_DEADLINE, l.close())
        .await
        .expect("close does not deadlock")
        .expect("close");
    for t in tasks {
        tokio::time::timeout(crate::ARRIVAL_DEADLINE, t)
            .await
            .expect("every task finishes after close")
            .expect("task");
    }
}
