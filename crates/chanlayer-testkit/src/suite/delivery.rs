//! At-least-once: deliveries, ack, nack, batch handler. Where the backend does not offer
//! at-least-once on normal channels, each test checks that it says `Unsupported`. On
//! process-local channels (`at_least_once_local`), both ways: a nacked delivery comes back
//! where it is claimed; elsewhere deliveries are already settled (at-most-once).

use std::sync::Arc;
use std::time::Duration;

use chanlayer_core::{handle_batch, BatchError, ChannelLayer, Codec, Error, LayerOptions, Message};

use crate::{assert_err, assert_quiet, caps, seq_msg, seq_of, Ctx, ARRIVAL_DEADLINE};

/// `true` if the backend is at-least-once; otherwise asserts it says `Unsupported`.
async fn at_least_once_or_unsupported(l: &Arc<dyn ChannelLayer>, ch: &str) -> bool {
    if caps(l).at_least_once {
        return true;
    }
    assert_err(
        l.receive_delivery(ch).await,
        "receive_delivery without at-least-once",
        |e| matches!(e, Error::Unsupported { .. }),
    );
    assert_err(
        l.receive_batch(ch, 10, Duration::from_millis(10)).await,
        "receive_batch without at-least-once",
        |e| matches!(e, Error::Unsupported { .. }),
    );
    false
}

async fn delivery(l: &Arc<dyn ChannelLayer>, ch: &str) -> chanlayer_core::Delivery {
    match tokio::time::timeout(ARRIVAL_DEADLINE, l.receive_delivery(ch)).await {
        Ok(Ok(d)) => d,
        Ok(Err(e)) => panic!("receive_delivery({ch}): {e}"),
        Err(_) => panic!("no delivery on {ch} within {ARRIVAL_DEADLINE:?}"),
    }
}

/// A delivery that was never acked comes back after its consumer is dropped (the instance
/// that received it closes): another instance receives it, marked redelivered.
pub async fn unacked_delivery_comes_back(ctx: Ctx) {
    let a = ctx.layer().await;
    let b = ctx.layer().await;
    let ch = ctx.name("alo");
    if !at_least_once_or_unsupported(&a, &ch).await {
        return;
    }
    a.send(&ch, seq_msg(1, Codec::Bincode)).await.expect("send");
    a.send(&ch, seq_msg(2, Codec::Bincode)).await.expect("send");
    let d = delivery(&a, &ch).await;
    assert_eq!(seq_of(d.message()), 1);
    assert!(!d.info().redelivered);
    drop(d);
    a.close().await.expect("close the consumer");
    let again = delivery(&b, &ch).await;
    assert_eq!(
        seq_of(again.message()),
        1,
        "the unacked message comes back first"
    );
    assert!(again.info().redelivered, "and is marked redelivered");
    again.ack().await.expect("ack");
    let next = delivery(&b, &ch).await;
    assert_eq!(seq_of(next.message()), 2);
    next.ack().await.expect("ack");
    assert_quiet(&b, &ch).await;
}

/// A nacked delivery is delivered again; an acked one is not.
pub async fn nack_redelivers(ctx: Ctx) {
    let l = ctx.layer().await;
    let ch = ctx.name("nack");
    if !at_least_once_or_unsupported(&l, &ch).await {
        return;
    }
    l.send(&ch, seq_msg(1, Codec::Bincode)).await.expect("send");
    let d = delivery(&l, &ch).await;
    assert_eq!(seq_of(d.message()), 1);
    d.nack().await.expect("nack");
    let d = delivery(&l, &ch).await;
    assert_eq!(seq_of(d.message()), 1, "nacked message comes back");
    assert!(d.info().redelivered);
    d.ack().await.expect("ack");
    assert_quiet(&l, &ch).await;
}

/// A batch handler that fails gets the whole batch again, in order.
pub async fn failing_batch_handler_gets_batch_again(ctx: Ctx) {
    let l = ctx
        .layer_with(LayerOptions {
            capacity: 100,
            ..ctx.options()
        })
        .await;
    let ch = ctx.name("batch-fail");
    if !at_least_once_or_unsupported(&l, &ch).await {
        return;
    }
    for i in 0..5 {
        l.send(&ch, seq_msg(i, Codec::Bincode)).await.expect("send");
    }
    let mut first_batch = Vec::new();
    let r = handle_batch(
        l.as_ref(),
        &ch,
        5,
        ARRIVAL_DEADLINE,
        |msgs: Vec<Message>| {
            first_batch = msgs.iter().map(seq_of).collect();
            async { Err::<(), &str>("handler failed") }
        },
    )
    .await;
    assert!(
        matches!(r, Err(BatchError::Handler("handler failed"))),
        "{r:?}"
    );
    assert!(!first_batch.is_empty());
    // Everything comes back: the failed batch first, in its order, then the rest.
    let mut again = Vec::new();
    while again.len() < 5 {
        let n = handle_batch(
            l.as_ref(),
            &ch,
            5,
            ARRIVAL_DEADLINE,
            |msgs: Vec<Message>| {
                again.extend(msgs.iter().map(seq_of));
                async { Ok::<(), &str>(()) }
            },
        )
        .await
        .expect("second attempt succeeds");
        assert!(n > 0, "the failed batch comes back");
    }
    assert_eq!(
        &again[..first_batch.len()],
        &first_batch[..],
        "the same batch, in order"
    );
    assert_eq!(again, (0..5).collect::<Vec<_>>());
    assert_quiet(&l, &ch).await;
}

/// A batch handler that succeeds commits: the batch does not come back.
pub async fn succeeding_batch_handler_commits(ctx: Ctx) {
    let a = ctx.layer().await;
    let ch = ctx.name("batch-ok");
    if !at_least_once_or_unsupported(&a, &ch).await {
        return;
    }
    for i in 0..3 {
        a.send(&ch, seq_msg(i, Codec::Bincode)).await.expect("send");
    }
    let mut got = Vec::new();
    while got.len() < 3 {
        handle_batch(
            a.as_ref(),
            &ch,
            10,
            ARRIVAL_DEADLINE,
            |msgs: Vec<Message>| {
                got.extend(msgs.iter().map(seq_of));
                async { Ok::<(), ()>(()) }
            },
        )
        .await
        .expect("handler succeeds");
    }
    assert_eq!(got, vec![0, 1, 2]);
    // Even after the consumer goes away, a committed batch does not come back.
    a.close().await.expect("close");
    let b = ctx.layer().await;
    let n = handle_batch(
        b.as_ref(),
        &ch,
        10,
        crate::QUIET_PERIOD,
        |_msgs: Vec<Message>| async { Ok::<(), ()>(()) },
    )
    .await
    .expect("receive");
    assert_eq!(n, 0, "nothing comes back after a successful batch");
}

/// `at_least_once_local`, both ways, on a process-local channel. Where it is claimed, a
/// nacked delivery comes back (marked redelivered) and an acked one does not. Where it is
/// not, `receive_delivery` is `Unsupported`, or returns an already-settled delivery
/// (at-most-once): its `nack` is an error, and the message does not come back.
pub async fn local_delivery_follows_at_least_once_local(ctx: Ctx) {
    let l = ctx.layer().await;
    let ch = l.new_channel("alo").await.expect("new_channel");
    l.send(&ch, seq_msg(1, Codec::Bincode)).await.expect("send");
    l.send(&ch, seq_msg(2, Codec::Bincode)).await.expect("send");
    if caps(&l).at_least_once_local {
        let d = delivery(&l, &ch).await;
        assert_eq!(seq_of(d.message()), 1);
        assert!(!d.info().redelivered);
        d.nack().await.expect("nack");
        let d = delivery(&l, &ch).await;
        assert_eq!(
            seq_of(d.message()),
            1,
            "the nacked message comes back first"
        );
        assert!(d.info().redelivered, "and is marked redelivered");
        d.ack().await.expect("ack");
        let d = delivery(&l, &ch).await;
        assert_eq!(seq_of(d.message()), 2);
        d.ack().await.expect("ack");
        assert_quiet(&l, &ch).await;
        return;
    }
    match tokio::time::timeout(ARRIVAL_DEADLINE, l.receive_delivery(&ch)).await {
        Err(_) => panic!("no delivery on {ch} within {ARRIVAL_DEADLINE:?}"),
        Ok(Err(Error::Unsupported { .. })) => {
            // Nothing was taken: both messages are still there for receive.
            assert_eq!(seq_of(&crate::recv(&l, &ch).await), 1);
            assert_eq!(seq_of(&crate::recv(&l, &ch).await), 2);
        }
        Ok(Err(e)) => panic!("receive_delivery({ch}): {e}"),
        Ok(Ok(d)) => {
            assert_eq!(seq_of(d.message()), 1);
            assert!(
                d.nack().await.is_err(),
                "without at_least_once_local, a process-local delivery is settled: nack is an error"
            );
            let next = delivery(&l, &ch).await;
            assert_eq!(
                seq_of(next.message()),
                2,
                "without at_least_once_local, the nacked message does not come back"
            );
            next.ack()
                .await
                .expect("ack of a settled delivery is a no-op");
        }
    }
    assert_quiet(&l, &ch).await;
}

/// `max_deliveries=3`: a consumer that always fails (nacks, and once a batch handler that
/// fails) sees the message three times, each time marked redelivered after the first; the
/// third nack moves it to `{channel}.dead` with headers saying why, from where and how
/// often, and counts it; the channel is then empty, and a later message on it is
/// delivered as usual.
pub async fn poison_message_goes_to_the_dead_letter_channel(ctx: Ctx) {
    use chanlayer_core::poison;
    let l = ctx
        .layer_with(LayerOptions {
            max_deliveries: Some(3),
            ..ctx.options()
        })
        .await;
    let ch = ctx.name("poison");
    if !at_least_once_or_unsupported(&l, &ch).await {
        return;
    }
    l.send(&ch, seq_msg(7, Codec::Bincode)).await.expect("send");
    for n in 1..=2u32 {
        let d = delivery(&l, &ch).await;
        assert_eq!(seq_of(d.message()), 7);
        assert_eq!(d.info().redelivered, n > 1, "delivery {n}");
        d.nack().await.expect("nack");
    }
    // The third delivery fails in a batch handler.
    let r = handle_batch(
        l.as_ref(),
        &ch,
        10,
        ARRIVAL_DEADLINE,
        |msgs: Vec<Message>| {
            assert_eq!(msgs.iter().map(seq_of).collect::<Vec<_>>(), vec![7]);
            async { Err::<(), &str>("always fails") }
        },
    )
    .await;
    assert!(
        matches!(r, Err(BatchError::Handler("always fails"))),
        "{r:?}"
    );
    let dead = poison::dead_letter_of(&ch, None);
    let d = delivery(&l, &dead).await;
    assert_eq!(seq_of(d.message()), 7);
    let h = d.message().headers();
    assert_eq!(
        h.get(poison::DEAD_CHANNEL).map(String::as_str),
        Some(ch.as_str())
    );
    assert_eq!(
        h.get(poison::DEAD_DELIVERIES).map(String::as_str),
        Some("3")
    );
    assert!(
        h.get(poison::DEAD_REASON)
            .is_some_and(|r| r.contains("max_deliveries=3")),
        "{h:?}"
    );
    d.ack().await.expect("ack the dead letter");
    assert_eq!(l.stats().dead_lettered, 1);
    assert_quiet(&l, &ch).await;
    l.send(&ch, seq_msg(8, Codec::Bincode)).await.expect("send");
    let d = delivery(&l, &ch).await;
    assert_eq!(seq_of(d.message()), 8);
    assert!(!d.info().redelivered);
    d.ack().await.expect("ack");
}
